//! The wire side of [`agents`](https://docs.rs/agents): what a caller needs and nothing more.
//!
//! - [`RpcError`] / [`RawError`] / [`ErrorKind`]: how a call fails, typed and on the wire.
//! - [`Payload`] / [`Codec`]: encoded arguments and results (postcard for Rust, JSON for
//!   everything else). Arguments are always a tuple: `(5,)` in postcard, `[5]` in JSON.
//! - [`Transport`]: how a generated client reaches an agent. The runtime provides an
//!   in-process transport; any other (a network one) plugs in the same way, and the generated
//!   client type is the same for all of them.
//!
//! Generated code refers to items in the hidden `__private` module; they are not a stable API.
#![warn(missing_docs)]

mod error;
mod framing;
mod payload;
pub mod protocol;
mod stream;
mod transport;
mod ws;

pub use error::{ErrorKind, FrameworkError, NoError, RawError, RpcError};
pub use payload::{Codec, CodecError, Passed, Payload};
pub use stream::{CallStream, EventStream, StateStream, StreamError};
pub use transport::{
    BoxFuture, ClientCore, MethodCall, MethodInfo, OutgoingCall, RawStream, Transport,
};
pub use ws::{ConnectError, ConnectOptions, WsTransport, DEFAULT_TIMEOUT};

#[doc(hidden)]
pub mod __private {
    pub use crate::transport::deadline_in;
    pub use crate::ws::next_queued;
    pub use crate::{
        CallStream, ClientCore, ConnectError, ConnectOptions, EventStream, MethodCall, MethodInfo,
        NoError, RpcError, StateStream, WsTransport,
    };
    pub use serde;
}
