//! # agents
//!
//! Durable, addressable agents. Annotate a struct's `impl` with [`#[agent]`](macro@agent) and
//! every `(class, name)` pair becomes one live object: one instance, one writer, its own SQLite
//! database, and a generated typed client.
//!
//! ```
//! use agents::prelude::*;
//!
//! #[derive(Default)]
//! pub struct Counter;
//!
//! impl Agent for Counter {
//!     async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
//!         ctx.migrate(&["CREATE TABLE counter(id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL)"])?;
//!         Ok(())
//!     }
//! }
//!
//! #[agent]
//! impl Counter {
//!     /// Adds `by` and returns the new total.
//!     #[callable]
//!     pub async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, AppError> {
//!         Ok(ctx.sql().query_row(
//!             "INSERT INTO counter(id, n) VALUES (0, ?1)
//!              ON CONFLICT(id) DO UPDATE SET n = n + excluded.n RETURNING n",
//!             [by],
//!             |r| r.get(0),
//!         )?)
//!     }
//! }
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! let runtime = Runtime::builder().data_dir(dir.path()).agent::<Counter>().build()?;
//! let bob = runtime.agent::<Counter>("bob");   // a CounterClient
//! assert_eq!(bob.add(5).await?, 5);
//! assert_eq!(bob.add(2).await?, 7);
//! # Ok(()) }
//! ```
//!
//! ## The guarantees
//! - **One writer, no interleaving.** Handlers take `&mut self` and run to completion, awaits
//!   included, before the agent takes its next event. A call cycle (A → B → A) fails at once
//!   with [`RpcError::Cycle`] instead of deadlocking.
//! - **Every event is a transaction.** Each call runs in a SQLite savepoint: `Ok` keeps its
//!   writes, `Err` or a panic discards them (and a panic never takes the runtime down: the agent
//!   is re-created on its next event).
//! - **Replies wait for durability** (the output gate), and the events an agent has queued share
//!   one commit (group commit), run on a blocking thread so that an fsync never stalls the async
//!   workers. See [`Durability`].
//! - **Memory is a cache.** An idle agent is hibernated: its struct dropped, its database
//!   closed. The next event re-creates it (`Default`, then [`Agent::on_start`]). One that stays
//!   live but quiet gives back what it needs only while busy (see [`Builder::quiet_after`]).
//!
//! ## Storage
//! [`Ctx::sql`] is the agent's own rusqlite connection; [`Ctx::kv`] a typed key-value store;
//! [`Ctx::migrate`] a schema-migration helper. Tables named `_agents_*` are the runtime's.
//! What the runtime stores for you (kv values, connection state, shared state, a scheduled
//! call's arguments) is JSON, so it still reads after a deploy that evolved its types as serde
//! allows; see [`#[agent]`](macro@agent) for how values travel and are kept.
//!
//! ## Beyond one event
//! [`Ctx::enqueue_to`] and [`Ctx::schedule_to`] make durable calls to other agents;
//! [`Ctx::spawn`] runs slow work outside the agent's turn and delivers its result as an event;
//! [`Ctx::destroy`] and [`Runtime::destroy`] delete an agent; [`Runtime::fetch`] hands a
//! request from a gateway of your own to an agent.
//!
//! ## Beyond one machine
//! With the `cluster` feature, `Builder::cluster` makes the runtime one node of several on one
//! PostgreSQL database: each agent lives on one node at a time, its batches durable once they
//! are in PostgreSQL under a fence that a node which lost the agent cannot pass; any node
//! accepts any request and forwards it to the agent's node, agents' calls to each other reach
//! the callee's node, and the agents of a node that dies are taken over by the others (their
//! alarms too). See the README's "Beyond one machine" for what is guaranteed.
//!
//! ## Testing
//! [`testing::TestRuntime`] runs on a temporary data dir and can hibernate agents and restart.
#![warn(missing_docs)]

// Lets generated code name `::agents` inside this crate's own tests.
extern crate self as agents;

mod address;
mod admin;
mod agent;
mod alarms;
mod backup;
mod catalog;
mod clock;
#[cfg(feature = "cluster")]
mod cluster;
mod conn;
mod context;
mod database;
mod error;
#[cfg(feature = "cluster")]
mod forward;
mod front;
mod gate;
pub mod inspect;
mod instance;
mod lock;
mod metrics;
mod origins;
mod port;
mod registry;
#[cfg(feature = "cluster")]
mod replica;
mod runtime;
mod schedule;
mod server;
mod spares;
mod storage;
mod stream;
mod telemetry;
pub mod testing;
#[cfg(target_os = "linux")]
mod vfs;
mod ws;

pub use address::{AgentKey, MAX_CLASS_LEN, MAX_NAME_LEN};
pub use agent::{
    refuse, Admission, Agent, AgentClass, AppError, HttpRequest, HttpResponse, Invocation,
    Principal, RequestHead,
};
/// The wire crate: transports, codecs and client plumbing.
pub use agents_client as client;
pub use agents_client::{
    CallStream, Codec, ConnectError, ConnectOptions, ErrorKind, MethodCall, MethodInfo, NoError,
    Payload, RawError, RpcError,
};
/// Turns an inherent `impl` block into an agent class; see the crate docs.
///
/// Methods marked `#[callable]` (async, `&mut self`, then `ctx: &mut Ctx<Self>`, then
/// arguments) can be called by clients. The macro generates the dispatch by method name, the
/// typed client `<Type>Client`, and `<Type>::calls()` describing calls for later use.
///
/// A callable returning `Result<T, E>` (spelled that way) fails with its typed `E`: its writes
/// are rolled back and the caller gets `RpcError::App(e)`; `E` must be `Serialize +
/// DeserializeOwned + Display` ([`AppError`] is ready-made). Any other return type is a plain
/// value. The macro reads the return type as written, so a type alias of `Result` would be
/// taken as a plain value; `io::Result<T>` and other one-parameter `Result`s are refused.
///
/// A callable that returns [`Streaming<T>`](Streaming) (or `Result<Streaming<T, E>, E>`)
/// streams: its client method returns a [`CallStream`] of `T`, and over a WebSocket each item
/// is a `chunk` frame. See [`Streaming`] for how such a stream runs.
///
/// Options:
/// - `#[agent(class = "name")]` overrides the class (kebab-case of the type by default);
/// - `#[agent(state = "T", conn_state = "T", event = "T")]` name the shared state, each
///   connection's state and the events clients receive (`()` by default);
/// - `#[agent(internal)]` serves the class in-process only: over HTTP and WebSockets it does
///   not exist (404), while `runtime.agent::<A>(..)` and `ctx.agent::<A>(..)` reach it;
/// - `#[agent(typescript)]` (feature `typescript`) gives the client a `typescript()` function:
///   TypeScript declarations of its methods, event and state for `agents.js`, from types that
///   derive `ts_rs::TS` (see `agents_client::typescript`);
/// - `#[callable(name = "wire-name")]` overrides a method's wire name;
/// - `#[callable(internal)]` makes a method callable in-process only (`unknown_method` to
///   callers over the network).
///
/// ## How values travel and are kept
/// Arguments, results, errors, events and states are serde types, and each path picks what
/// suits it:
/// - **in-process** (`runtime.agent(..)`, `ctx.agent(..)`) values are passed as they are, never
///   encoded: any type works, at no cost;
/// - **over the network**, a Rust client speaks postcard (compact; its types must be compiled
///   from the same definitions as the agent's) or JSON
///   ([`ConnectOptions::codec`](crate::ConnectOptions::codec)); browsers and HTTP speak JSON.
///   Postcard cannot carry self-describing types (`serde_json::Value`, `#[serde(tag = ..)]`,
///   `untagged`, `flatten`): use JSON for agents that have them;
/// - **stored** values (kv, connection state, shared state, a scheduled call's arguments) are
///   JSON, so they evolve as serde allows: add fields with `#[serde(default)]`, remove fields,
///   rename with `#[serde(alias = ..)]`, and what is on disk still reads.
///
/// The rule for changing an agent that is deployed: add callables freely, never change an
/// existing callable's argument or return types (add `add_v2`); evolve stored types only in
/// the ways serde reads old data with.
pub use agents_macros::agent;
/// Marks a method of an [`#[agent]`](macro@agent) impl block as callable by clients.
pub use agents_macros::callable;
/// Declares an agent's API as a trait: see [`agents_client::interface`]. (In a crate that
/// depends on `agents`; a client-only crate uses `agents_client::interface`.)
pub use agents_macros::interface_in_agents as interface;
/// Runs a method of an [`#[agent]`](macro@agent) impl block on a schedule:
/// `#[schedule(cron = "*/30 * * * *")]`, `#[schedule(cron = "0 9 * * *", tz = "Europe/Paris")]`
/// or `#[schedule(every = "30s")]` (units `ms`, `s`, `m`, `h`, `d`). The method takes only
/// `&mut self` and `ctx`. Each agent registers its rows when it is first activated, keyed by
/// method: never duplicated, updated when the attribute changes. Such methods cannot be called
/// by clients.
pub use agents_macros::schedule;
/// The HTTP framework the server is built on: for responses (`axum::response::IntoResponse`),
/// status codes (`axum::http::StatusCode`), extractors a gateway needs (`axum::Json`,
/// `axum::extract::Query`, `axum::extract::Path`), and mounting [`router`] in an app of your
/// own.
pub use axum;
pub use backup::BackupReport;
pub use catalog::AgentInfo;
pub use clock::Clock;
#[cfg(feature = "cluster")]
pub use cluster::ClusterOptions;
pub use conn::{Conn, ConnId, Protocol, WsMessage};
pub use context::Ctx;
pub use error::{Error, Result};
pub use runtime::{Builder, Runtime};
pub use schedule::{AlarmInfo, DeadLetter, Schedule, ScheduleKind, When, RETRIES, RETRY_BASE};
pub use server::{router, JS_CLIENT, JS_TYPES};
pub use storage::{Durability, Kv};
pub use stream::{StreamClosed, StreamSender, Streaming};

/// What most agent code needs: `use agents::prelude::*;`
pub mod prelude {
    pub use crate::{
        agent, callable, Admission, Agent, AppError, Conn, ConnId, Ctx, Durability, HttpRequest,
        HttpResponse, RequestHead, RpcError, Runtime, Streaming, When, WsMessage,
    };
    pub use agents_macros::schedule;
}

#[doc(hidden)]
pub mod __private {
    pub use crate::{agent::AgentClass, agent::Invocation, context::Ctx, schedule::StaticSchedule};
    pub use agents_client::__private::*;
    pub use agents_client::{BoxFuture, Payload, RawError, Transport};
    pub use std::{boxed::Box, sync::Arc};
}
