//! The WebSocket wing: everything about sockets, and nothing the core needs to know.
//!
//! - `connection`: the upgrade (admission, subprotocol), each socket's reader and writer;
//! - `frames`: the subprotocols' frames, parsed and encoded;
//! - `sockets`: the table of every agent's sockets, which implements the core's delivery port
//!   (`crate::port::Connections`);
//! - `inflight`: a socket's calls in flight (replies, cancels, deadlines, stream credit);
//! - `outbound`: a socket's bounded queue of frames to write (slow readers are closed);
//! - `timer`: the one timer of a socket's reader (idle limit, call deadlines).
//!
//! The core reaches this wing only through the delivery port, and the wing reaches the core
//! only through its door (`crate::port::Door`); `tests/layering.rs` checks both. The HTTP routes
//! live with the router (`crate::server`), which hands upgrades to [`upgrade`].

use std::sync::Arc;

use crate::port::Door;

mod connection;
mod frames;
mod inflight;
mod outbound;
mod sockets;
mod timer;

pub(crate) use connection::{refused, upgrade};
pub(crate) use sockets::Sockets;

/// What the wing is given by the composition root (`crate::runtime`): the core's door, and
/// its own table of sockets (which the core holds as its delivery port).
#[derive(Clone)]
pub(crate) struct Wing {
    door: Door,
    sockets: Arc<Sockets>,
}

impl Wing {
    pub(crate) fn new(door: Door, sockets: Arc<Sockets>) -> Self {
        Wing { door, sockets }
    }
}
