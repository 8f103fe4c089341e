//! The WebSocket wing: everything about sockets, and nothing the core needs to know.
//!
//! - `connection`: the upgrade (admission, subprotocol), each socket's reader and writer and its
//!   timer, the subprotocols' frames (parse and encode), and `Sockets`, the table of every
//!   agent's sockets, which implements the core's delivery port (`crate::port`);
//! - `inflight`: a socket's calls in flight (replies, cancels, deadlines, stream credit);
//! - `outbound`: a socket's bounded queue of frames to write (slow readers are closed).
//!
//! The core reaches this wing only through the port; the wing reaches the core's registry to
//! route its events. The HTTP routes live with the router (`crate::server`).

mod connection;
mod inflight;
mod outbound;

pub(crate) use connection::{agent_root, refuse, root, Sockets};
