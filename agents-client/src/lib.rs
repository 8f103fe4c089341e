//! The wire side of [`agents`](https://docs.rs/agents): what a caller needs and nothing more.
//!
//! - [`RpcError`] / [`RawError`] / [`ErrorKind`]: how a call fails, typed and on the wire.
//! - [`Payload`] / [`Codec`]: encoded arguments and results (postcard for Rust, JSON for
//!   everything else). Arguments are always a tuple: `(5,)` in postcard, `[5]` in JSON.
//! - [`Transport`]: how a generated client reaches an agent. The runtime provides an
//!   in-process transport; any other (a network one) plugs in the same way, and the generated
//!   client type is the same for all of them.
//! - [`trace`]: the trace context calls carry from agent to agent (W3C `traceparent`).
//!
//! Generated code refers to items in the hidden `__private` module; they are not a stable API.
#![warn(missing_docs)]

mod error;
mod framing;
mod lock;
mod payload;
pub mod protocol;
mod stream;
pub mod trace;
mod transport;
#[cfg(feature = "typescript")]
pub mod typescript;
mod ws;

pub use error::{ErrorKind, FrameworkError, NoError, RawError, RpcError};
pub use payload::{Codec, CodecError, Passed, Payload};
pub use stream::{CallStream, EventStream, StateStream, StreamError};
pub use transport::{
    BoxFuture, ClientCore, MethodCall, MethodInfo, OutgoingCall, RawStream, Transport,
};
pub use ws::{
    ConnectError, ConnectOptions, WsTransport, DEFAULT_MAX_MESSAGE_BYTES, DEFAULT_TIMEOUT,
};

/// Declares an agent's API as a trait, in a crate that needs nothing but this one (and serde):
/// no SQLite, no server. The trait is written as its client calls it; the macro generates the
/// typed client `<Trait>Client` (the same kind of client `#[agent]` generates, over any
/// transport), and turns the trait into what the agent implements with `#[agent]`:
///
/// ```
/// use agents_client::interface;
///
/// #[derive(Debug, serde::Serialize, serde::Deserialize, thiserror::Error)]
/// #[error("refused: {0}")]
/// pub struct Refused(pub String);
///
/// #[interface]
/// pub trait CounterApi {
///     /// Adds `by`; returns the total.
///     async fn add(&self, by: i64) -> Result<i64, Refused>;
///     async fn get(&self) -> i64;
/// }
///
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// let counter = CounterApiClient::connect("ws://127.0.0.1:8080/agents/counter/bob").await?;
/// counter.add(5).await?;
/// # Ok(()) }
/// ```
///
/// The server side (a crate with `agents`) implements the trait, every method with `&mut self`
/// and `ctx` first, as a callable; the compiler checks each method against the trait:
///
/// ```ignore
/// #[agent]
/// impl CounterApi for Counter {
///     async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, Refused> { .. }
///     async fn get(&mut self, ctx: &mut Ctx<Self>) -> i64 { .. }
/// }
/// ```
///
/// Options: `#[interface(state = "T", event = "T")]`, the types the agent's connections
/// receive (its client's `state()` and `events()`); `#[interface(typescript)]` (feature
/// `typescript`), TypeScript declarations for `agents.js` (see the `typescript` module). Streaming
/// methods are declared on an inherent `#[agent]` impl for now.
pub use agents_macros::interface;

#[doc(hidden)]
pub mod __private {
    pub use crate::transport::{deadline_in, Interface};
    pub use crate::ws::next_queued;
    pub use crate::{
        CallStream, ClientCore, ConnectError, ConnectOptions, EventStream, MethodCall, MethodInfo,
        NoError, RpcError, StateStream, WsTransport,
    };
    pub use crate::{Payload, RawError, Transport};
    pub use serde;
    pub use std::{boxed::Box, sync::Arc};
    #[cfg(feature = "typescript")]
    pub use {crate::typescript, ts_rs};
}
