//! The ports between the core and its front ends: what the core (registry, instances, `Ctx`)
//! needs of the front ends that hold connections (`Connections`, `ReplyPort`), and the one way
//! in a front end has (`Door`), with the vocabulary both sides share. The WebSocket wing
//! implements the first and uses the second; it names nothing else of the core, and the core
//! names nothing of it (`tests/layering.rs` checks both).

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{sync::oneshot, time::Instant};

pub(crate) use crate::{
    address::AgentKey,
    agent::{Admission, Refusal, RequestHead},
    conn::{close_reason, ConnId, Effect, Encoded, Outgoing, Protocol, Speaks, WsMessage},
    registry::CallReply,
    stream::Returned,
};
use crate::{
    agent::Invocation,
    error::Error,
    registry::{CallEvent, Chain, Event, Refused, Reply, ReplyTo, Shared},
};
use agents_client::{trace::TraceContext, Payload, RawError};
use axum::{http::StatusCode, response::IntoResponse};

/// The close code of a normal closure.
pub(crate) const NORMAL_CLOSURE: u16 = 1000;
/// The close code of a socket whose agent moved to another node: reconnect (1012, "service
/// restart").
pub(crate) const SERVICE_RESTART: u16 = 1012;

/// The connections of every agent, live or hibernating.
pub(crate) trait Connections: Send + Sync + 'static {
    /// Sends what an event produced (once it is durable) to `key`'s connections.
    fn deliver(&self, key: &AgentKey, effects: Vec<Effect>);
    /// The ids of `key`'s open connections.
    fn ids(&self, key: &AgentKey) -> Vec<ConnId>;
    /// Whether `key`'s connection `id` is open.
    fn is_open(&self, key: &AgentKey, id: &ConnId) -> bool;
    /// What `key`'s open connections speak (a value they are sent is encoded in that only).
    fn speaks(&self, key: &AgentKey) -> Speaks;
    /// How many connections `key` has open.
    fn count_of(&self, key: &AgentKey) -> usize;
    /// How many connections are open, over all agents.
    fn count(&self) -> usize;
    /// Closes every connection of `key` with `code` and `reason`, and forgets them: their
    /// `on_close` does not run (the agent is gone).
    fn close_agent(&self, key: &AgentKey, code: u16, reason: &str);
    /// Closes every connection (the runtime is shutting down).
    fn close_all(&self);
}

/// Where the reply to a call that a front end made goes (say, straight into a socket's queue).
pub(crate) trait ReplyPort: Send + 'static {
    /// Whether nobody waits for the reply any more (the call need not run).
    fn is_gone(&self) -> bool;
    /// Delivers the reply (dropped if nobody waits for it).
    fn send(self: Box<Self>, reply: CallReply);
}

/// A call a connection made.
pub(crate) struct ConnCall {
    pub method: String,
    pub args: Payload,
    /// Where the reply goes.
    pub reply: Box<dyn ReplyPort>,
    pub deadline: Instant,
    pub conn: ConnId,
    /// Who made it, as the admission hook said.
    pub principal: Option<Arc<str>>,
    /// The trace it belongs to, as the caller said.
    pub trace: Option<TraceContext>,
}

/// The limits a front end keeps for its connections.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// The largest message a client may send.
    pub max_message_bytes: usize,
    /// How many frames may wait for a connection's writer.
    pub outbound_queue: usize,
    /// A connection that sends nothing for this long is closed.
    pub connection_idle: Option<Duration>,
    /// A call without a deadline of its own has this one.
    pub call_timeout: Duration,
}

/// The core's way in for a front end: what a connection's frames become, routed to its agent
/// (waking it) in the order they are handed over. Each method waits while the agent's mailbox
/// is full, which slows the connection's reader (and so its client) down. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Door(Arc<Shared>);

/// What a connection's `Connect` event comes to, once durable (see [`Door::connect`]): an
/// error if the agent refused the connection or cannot run.
pub(crate) struct Admitting(oneshot::Receiver<Reply>);

impl Future for Admitting {
    type Output = Result<(), RawError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|outcome| match outcome {
            Ok(result) => result.map(drop),
            Err(_) => Err(RawError::internal("the agent stopped")),
        })
    }
}

impl Door {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Door(shared)
    }

    /// The limits of the runtime's configuration.
    pub(crate) fn limits(&self) -> Limits {
        let config = &self.0.config;
        Limits {
            max_message_bytes: config.max_message_bytes,
            outbound_queue: config.outbound_queue,
            connection_idle: config.connection_idle,
            call_timeout: config.call_timeout,
        }
    }

    /// Runs the class's `on_before_connect` for a connection to `key` (before anything is
    /// woken).
    pub(crate) async fn admit(&self, key: &AgentKey, head: &RequestHead) -> Admission {
        let Some(class) = self.0.class(key.class()) else {
            let e = Error::UnknownClass(key.class().to_owned());
            return Err((StatusCode::NOT_FOUND, e.to_string()).into_response());
        };
        (class.before_connect)(key.name(), head).await
    }

    /// Connection `conn` to `key` opened: hands the agent the event that records it and runs
    /// `on_connect`, and returns (once it is in the mailbox: the connection's frames may be
    /// routed from then on) what that event comes to, once durable: an error if the agent
    /// refused the connection or cannot run. `refused` is called as soon as it is refused.
    pub(crate) async fn connect(
        &self,
        key: &AgentKey,
        conn: ConnId,
        protocol: Protocol,
        principal: Option<String>,
        refused: Refused,
    ) -> Result<Admitting, RawError> {
        let (done, connected) = oneshot::channel();
        let event = Event::Connect {
            conn,
            protocol,
            principal,
            done,
            refused,
        };
        match self.0.route(key, event).await {
            Ok(()) => Ok(Admitting(connected)),
            Err((e, _)) => Err(e.told("the agent cannot be reached")),
        }
    }

    /// A call: its reply goes to `call.reply`, which is answered with the error if the call
    /// cannot be routed.
    pub(crate) async fn call(&self, key: &AgentKey, call: ConnCall) {
        let event = Event::Call(Box::new(CallEvent {
            inv: Invocation::remote(call.method, call.args),
            reply: ReplyTo::Port(call.reply),
            chain: call.trace.map(Chain::in_trace).unwrap_or_default(),
            deadline: Some(call.deadline),
            received: std::time::Instant::now(),
            conn: Some(call.conn),
            principal: call.principal,
        }));
        if let Err((e, event)) = self.0.route(key, event).await {
            event.abandon(e.told("the agent cannot be reached"));
        }
    }

    /// A message for `on_message`.
    pub(crate) async fn message(
        &self,
        key: &AgentKey,
        conn: ConnId,
        message: WsMessage,
    ) -> Result<(), Error> {
        let event = Event::Message { conn, message };
        self.0.route(key, event).await.map_err(|(e, _)| e)
    }

    /// Connection `conn` closed (after failing, if `error`): `on_error`, `on_close`.
    pub(crate) async fn close(
        &self,
        key: &AgentKey,
        conn: ConnId,
        code: u16,
        reason: String,
        error: Option<String>,
    ) -> Result<(), Error> {
        let event = Event::Close {
            conn,
            code,
            reason,
            error,
        };
        self.0.route(key, event).await.map_err(|(e, _)| e)
    }
}
