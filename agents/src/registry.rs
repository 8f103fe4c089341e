//! The registry: address → mailbox of the live instance, activation on first event, and the
//! hand-over that keeps exactly one live instance per address across hibernation.

use std::{
    any::TypeId,
    collections::HashMap,
    fmt,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    task::{Context, Poll},
    time::Duration,
};

use agents_client::{trace::TraceContext, BoxFuture, Payload, RawError};
use tokio::{
    sync::{
        mpsc::{self, error::TrySendError},
        oneshot, Semaphore,
    },
    time::Instant,
};
use tokio_util::task::TaskTracker;

use crate::{
    address::AgentKey,
    agent::{Admission, HttpRequest, HttpResponse, Invocation},
    alarms::AlarmIndex,
    catalog::Catalog,
    clock::Clock,
    conn::{ConnId, Protocol, WsMessage},
    error::Error,
    lock::lock,
    metrics::Metrics,
    port::{Connections, ReplyPort},
    storage::Durability,
    stream::Returned,
};

/// How many databases may be opening at the same time: half the cores, so that the async
/// workers keep the other half. (A new agent's file is made before its open, without a permit:
/// copying the template and syncing the copy mostly wait for the disk.)
fn opening_at_once() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

/// Settings every instance reads.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub data_dir: PathBuf,
    pub durability: Durability,
    pub locking: crate::storage::Locking,
    pub idle_timeout: Duration,
    pub quiet_after: Duration,
    pub mailbox_capacity: usize,
    pub call_timeout: Duration,
    pub max_batch: usize,
    pub max_live: usize,
    pub clock: Clock,
    pub max_message_bytes: usize,
    pub outbound_queue: usize,
    /// Close a connection that sends nothing (not even a ping) for this long.
    pub connection_idle: Option<Duration>,
    /// How many spare database files are kept ready for new agents (see `spares`).
    pub spare_files: usize,
}

/// Starts the task of one instance of a class.
pub(crate) type Spawner = fn(Arc<Shared>, AgentKey, u64, mpsc::Receiver<Event>);

/// An admission hook (`on_before_connect`, `on_before_request`) of a class.
pub(crate) type Admit =
    for<'a> fn(&'a str, &'a crate::agent::RequestHead) -> agents_client::BoxFuture<'a, Admission>;

/// A registered class: the type that implements it, how to start an instance, and its
/// admission hooks (which run before any instance exists).
#[derive(Clone, Copy)]
pub(crate) struct Class {
    pub type_id: TypeId,
    pub type_name: &'static str,
    pub spawn: Spawner,
    /// `#[agent(internal)]`: not reachable from the network.
    pub internal: bool,
    /// Its callables.
    pub methods: &'static [agents_client::MethodInfo],
    pub before_connect: Admit,
    pub before_request: Admit,
}

/// What an instance's mailbox carries.
pub(crate) enum Event {
    /// A call (boxed, as the largest variant: a mailbox's slots are the size of its events).
    Call(Box<CallEvent>),
    /// Drop the instance now (testing and operations); answered once its database is closed.
    Hibernate(oneshot::Sender<()>),
    /// Destroy the agent (`runtime.destroy`); answered once its files are gone.
    Destroy(oneshot::Sender<Result<(), RawError>>),
    /// Copy the database into the file (`runtime.backup`), between two batches.
    Backup(std::path::PathBuf, oneshot::Sender<Result<(), Error>>),
    /// Run the rows that are due, then re-derive the alarm; answered once that is durable.
    Alarm(Option<oneshot::Sender<()>>),
    /// An alarm is about to go off: open the database now, so that it runs on time.
    Warm,
    /// A WebSocket connected: record it, run `on_connect`; answered once that is durable.
    /// The connection's frames are routed meanwhile (their events come after this one):
    /// `refused` is called as soon as `on_connect` refuses it (or the event cannot run), so
    /// that the calls it made never run.
    Connect {
        conn: ConnId,
        protocol: Protocol,
        principal: Option<String>,
        done: oneshot::Sender<Reply>,
        refused: Refused,
    },
    /// A message for `on_message`.
    Message { conn: ConnId, message: WsMessage },
    /// A connection closed (after failing, if `error`): `on_error`, `on_close`, forget it.
    Close {
        conn: ConnId,
        code: u16,
        reason: String,
        error: Option<String>,
    },
    /// An HTTP request for `on_request`.
    Request {
        request: Box<HttpRequest>,
        reply: oneshot::Sender<Result<HttpResponse, RawError>>,
    },
}

pub(crate) type Reply = Result<Payload, RawError>;

/// What a connection does when the agent refuses it (see `Event::Connect`).
pub(crate) type Refused = Box<dyn FnOnce() + Send>;

/// The outcome of a call: a value or a stream.
pub(crate) type CallReply = Result<Returned, RawError>;

pub(crate) struct CallEvent {
    pub inv: Invocation,
    pub reply: ReplyTo,
    /// The agents waiting on this call (its callers, transitively).
    pub chain: Chain,
    pub deadline: Option<Instant>,
    /// When it was made (for the end-to-end latency).
    pub received: std::time::Instant,
    /// The connection the call arrived on.
    pub conn: Option<ConnId>,
    /// Who made the call, as an admission hook said (HTTP and WebSocket calls).
    pub principal: Option<Arc<str>>,
}

/// Where a call's reply goes.
pub(crate) enum ReplyTo {
    /// To a caller in this process, waiting for it.
    Caller(oneshot::Sender<CallReply>),
    /// To the front end the call came from (straight into a socket's queue, say).
    Port(Box<dyn ReplyPort>),
}

impl ReplyTo {
    /// Whether nobody waits for the reply any more (the call need not run).
    pub fn is_gone(&self) -> bool {
        match self {
            ReplyTo::Caller(tx) => tx.is_closed(),
            ReplyTo::Port(port) => port.is_gone(),
        }
    }

    /// Delivers the reply (dropped if nobody waits for it).
    pub fn send(self, reply: CallReply) {
        match self {
            ReplyTo::Caller(tx) => drop(tx.send(reply)),
            ReplyTo::Port(port) => port.send(reply),
        }
    }
}

impl Event {
    /// Answers an event that will never run.
    pub fn abandon(self, why: RawError) {
        match self {
            Event::Call(c) => c.reply.send(Err(why)),
            Event::Hibernate(done) | Event::Alarm(Some(done)) => {
                let _ = done.send(());
            }
            Event::Connect { done, refused, .. } => {
                refused();
                let _ = done.send(Err(why));
            }
            Event::Destroy(done) => {
                let _ = done.send(Err(why));
            }
            Event::Backup(_, done) => {
                let _ = done.send(Err(Error::Internal(why.to_string())));
            }
            Event::Request { reply, .. } => {
                let _ = reply.send(Err(why));
            }
            Event::Alarm(None) | Event::Warm | Event::Message { .. } | Event::Close { .. } => {}
        }
    }
}

/// The chain of agents waiting on a call, innermost last. Calls carry it so that a call back
/// into any of them (a cycle, which would deadlock) fails at once. It also carries the trace
/// context the calls are made in: the running event's (see `trace`), or a caller's.
#[derive(Clone, Default)]
pub(crate) struct Chain {
    /// The innermost agent, and those before it.
    last: Option<Arc<Link>>,
    trace: Option<TraceContext>,
}

struct Link {
    key: AgentKey,
    prev: Option<Arc<Link>>,
}

tokio::task_local! {
    /// The chain of the handler running on this task.
    static CURRENT: Chain;
}

impl Chain {
    /// The agents waiting on a call made now: those of the handler running on this task (set
    /// by [`scope`](Chain::scope)); none on any other task (one the handler spawned, a
    /// caller outside the runtime), since nothing waits on those.
    pub fn current() -> Chain {
        CURRENT.try_with(Chain::clone).unwrap_or_default()
    }

    /// Runs `handler` with this chain as [`current`](Chain::current), and its trace context
    /// as `agents_client::trace::current` (which network clients send along).
    pub fn scope<F: Future>(self, handler: F) -> impl Future<Output = F::Output> {
        let trace = self.trace.unwrap_or_else(TraceContext::root);
        CURRENT.scope(self, agents_client::trace::scope(trace, handler))
    }

    /// This chain with `key` last: an event of `key` on behalf of this chain's agents, made
    /// in their trace context (if any).
    pub fn push(&self, key: AgentKey) -> Chain {
        Chain {
            last: Some(Arc::new(Link {
                key,
                prev: self.last.clone(),
            })),
            trace: self.trace,
        }
    }

    /// No agent waits, but the call is made in `trace` (a caller's over the network).
    pub fn in_trace(trace: TraceContext) -> Chain {
        Chain {
            last: None,
            trace: Some(trace),
        }
    }

    /// The trace context the calls of this chain are made in (`None`: none yet).
    pub fn trace(&self) -> Option<TraceContext> {
        self.trace
    }

    /// Calls made from now on are made in `trace` (the running event's own context).
    pub fn set_trace(&mut self, trace: TraceContext) {
        self.trace = Some(trace);
    }

    /// Its agents, the outermost first (cluster mode sends them with a call it forwards).
    #[cfg(feature = "cluster")]
    pub fn keys(&self) -> Vec<&AgentKey> {
        let mut keys: Vec<_> = self.iter().collect();
        keys.reverse();
        keys
    }

    /// The chain of `keys` (the outermost first), in `trace`: a forwarded call's.
    #[cfg(feature = "cluster")]
    pub fn of(keys: impl IntoIterator<Item = AgentKey>, trace: Option<TraceContext>) -> Chain {
        let mut chain = Chain { last: None, trace };
        for key in keys {
            chain = chain.push(key);
        }
        chain
    }

    fn iter(&self) -> impl Iterator<Item = &AgentKey> {
        std::iter::successors(self.last.as_deref(), |l| l.prev.as_deref()).map(|l| &l.key)
    }

    pub fn contains(&self, key: &AgentKey) -> bool {
        self.iter().any(|k| k == key)
    }
}

impl fmt::Display for Chain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut keys: Vec<_> = self.iter().collect();
        keys.reverse();
        for (i, k) in keys.iter().enumerate() {
            if i > 0 {
                f.write_str(" -> ")?;
            }
            write!(f, "{k}")?;
        }
        Ok(())
    }
}

struct Slot {
    tx: mpsc::Sender<Event>,
    generation: u64,
    /// The registry's clock when an event was last routed here (for LRU eviction).
    last_used: u64,
    /// Asked to hibernate to make room; not asked again.
    evicting: bool,
}

#[derive(Default)]
struct Agents {
    live: HashMap<AgentKey, Slot>,
    next_generation: u64,
    /// Ticks once per routed event.
    clock: u64,
    closed: bool,
}

impl Agents {
    /// Asks the least recently used live agent to hibernate, to keep the number of open
    /// databases (and file descriptors) under the limit. A soft limit: the agent leaves once
    /// its current batch is done.
    fn evict_one(&mut self) {
        let victim = self
            .live
            .values_mut()
            .filter(|s| !s.evicting)
            .min_by_key(|s| s.last_used);
        if let Some(slot) = victim {
            if slot
                .tx
                .try_send(Event::Hibernate(oneshot::channel().0))
                .is_ok()
            {
                slot.evicting = true;
            }
        }
    }
}

/// What routing without waiting came to.
enum Routed {
    Delivered,
    /// The mailbox is full: here it is, to wait on, with the event.
    Full(mpsc::Sender<Event>, Event),
    Failed(Error, Event),
}

/// The future of [`Shared::route`]: done already, or waiting for room (boxed, being rare).
pub(crate) struct Routing<'a>(Option<BoxFuture<'a, Result<(), (Error, Event)>>>);

impl Future for Routing<'_> {
    type Output = Result<(), (Error, Event)>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match &mut self.0 {
            None => Poll::Ready(Ok(())),
            Some(waiting) => waiting.as_mut().poll(cx),
        }
    }
}

/// State shared by the runtime handle, every instance task and every local client.
pub(crate) struct Shared {
    pub config: Config,
    pub alarms: AlarmIndex,
    /// The record of every agent that exists.
    pub catalog: Catalog,
    /// New agents' files, made ahead of time.
    pub spares: crate::spares::Spares,
    /// The runtime's metrics.
    pub metrics: Metrics,
    classes: HashMap<&'static str, Class>,
    agents: Mutex<Agents>,
    pub tracker: TaskTracker,
    /// Bounds how many databases open at once, so that a burst of activations cannot crowd
    /// the async workers off the CPU with blocking threads.
    pub opening: Semaphore,
    /// A permit per open database (`max_live` in all): the live-agent cap as a hard bound on
    /// the descriptors agents hold, evicted agents that are still closing included.
    pub databases: Arc<Semaphore>,
    /// The open WebSockets of every agent, live or hibernating.
    pub sockets: Arc<dyn Connections>,
    /// The data dir's lock, held until the runtime has shut down (see `storage::lock_data_dir`).
    pub dir_lock: Mutex<Option<std::fs::File>>,
    /// The runtime's handle, for code that runs inside it (`ctx.runtime()`); weak, so that
    /// dropping the last `Runtime` still shuts it down.
    pub handle: std::sync::OnceLock<std::sync::Weak<crate::runtime::Handle>>,
    /// Cluster mode: this node.
    #[cfg(feature = "cluster")]
    pub cluster: Option<Arc<crate::cluster::Node>>,
}

impl Shared {
    pub fn new(
        config: Config,
        alarms: AlarmIndex,
        catalog: Catalog,
        metrics: Metrics,
        classes: HashMap<&'static str, Class>,
        sockets: Arc<dyn Connections>,
        dir_lock: std::fs::File,
    ) -> Result<Self, crate::error::Error> {
        let spares =
            crate::spares::Spares::open(&config.data_dir, config.durability, config.spare_files)?;
        Ok(Shared {
            dir_lock: Mutex::new(Some(dir_lock)),
            databases: Arc::new(Semaphore::new(config.max_live)),
            config,
            alarms,
            catalog,
            spares,
            metrics,
            classes,
            agents: Mutex::default(),
            tracker: TaskTracker::new(),
            opening: Semaphore::new(opening_at_once()),
            sockets,
            handle: Default::default(),
            #[cfg(feature = "cluster")]
            cluster: None,
        })
    }

    /// Asks the least recently used live agent to hibernate (see `Agents::evict_one`).
    pub fn make_room(&self) {
        self.agents().evict_one();
    }

    fn agents(&self) -> MutexGuard<'_, Agents> {
        // No code panics while holding this lock; recover the data if it ever does.
        lock(&self.agents)
    }

    /// The registered class `class`.
    pub fn class(&self, class: &str) -> Option<Class> {
        self.classes.get(class).copied()
    }

    /// Checks that `class` is registered (for the type `type_id`, if given).
    pub fn check_class(&self, class: &str, type_id: Option<TypeId>) -> Result<(), Error> {
        match self.classes.get(class) {
            Some(c) if type_id.is_none_or(|t| t == c.type_id) => Ok(()),
            Some(c) => Err(Error::UnknownClass(format!(
                "{class} (registered for {}, not this type)",
                c.type_name
            ))),
            None => Err(Error::UnknownClass(class.to_owned())),
        }
    }

    /// Delivers `event` to the live instance of `key`, activating one if there is none.
    /// Waits while the mailbox is full. On failure the event is handed back.
    ///
    /// The usual case (room in the mailbox) is done before the first poll, and the future is
    /// two words: every task that routes (each connection's reader) stays small.
    pub fn route<'a>(self: &'a Arc<Self>, key: &'a AgentKey, event: Event) -> Routing<'a> {
        let mut spawned = None;
        Routing(match self.try_route(key, event, &mut spawned) {
            Routed::Delivered => None,
            Routed::Full(tx, event) => Some(Box::pin(self.wait_route(key, tx, event, spawned))),
            Routed::Failed(e, event) => Some(Box::pin(std::future::ready(Err((e, event))))),
        })
    }

    /// Waits for room in a full mailbox (the instance may go away meanwhile).
    async fn wait_route(
        self: &Arc<Self>,
        key: &AgentKey,
        mut tx: mpsc::Sender<Event>,
        mut event: Event,
        mut spawned: Option<u64>,
    ) -> Result<(), (Error, Event)> {
        loop {
            match tx.send(event).await {
                Ok(()) => return Ok(()),
                Err(mpsc::error::SendError(e)) => event = e,
            }
            match self.try_route(key, event, &mut spawned) {
                Routed::Delivered => return Ok(()),
                Routed::Full(full, e) => (tx, event) = (full, e),
                Routed::Failed(e, event) => return Err((e, event)),
            }
        }
    }

    /// Delivers `event` if the mailbox has room. `spawned`: the generation of the instance
    /// this routing activated, if it did.
    fn try_route(
        self: &Arc<Self>,
        key: &AgentKey,
        mut event: Event,
        spawned: &mut Option<u64>,
    ) -> Routed {
        let mut agents = self.agents();
        loop {
            if agents.closed {
                return Routed::Failed(Error::Shutdown, event);
            }
            agents.clock += 1;
            let now = agents.clock;
            match agents.live.get_mut(key) {
                Some(slot) => {
                    slot.last_used = now;
                    match slot.tx.try_send(event) {
                        Ok(()) => return Routed::Delivered,
                        Err(TrySendError::Full(e)) => return Routed::Full(slot.tx.clone(), e),
                        Err(TrySendError::Closed(e)) => {
                            // The instance is gone without detaching. If it is the one this
                            // routing just started, the tokio runtime is shutting down
                            // (spawning drops the task): trying again would spin forever.
                            event = e;
                            let ours = *spawned == Some(slot.generation);
                            agents.live.remove(key);
                            if ours {
                                return Routed::Failed(Error::Shutdown, event);
                            }
                        }
                    }
                }
                None => {
                    let Some(&class) = self.classes.get(key.class()) else {
                        return Routed::Failed(Error::UnknownClass(key.class().to_owned()), event);
                    };
                    if agents.live.len() >= self.config.max_live {
                        agents.evict_one();
                    }
                    let (tx, rx) = mpsc::channel(self.config.mailbox_capacity);
                    let generation = agents.next_generation;
                    agents.next_generation += 1;
                    agents.live.insert(
                        key.clone(),
                        Slot {
                            tx,
                            generation,
                            last_used: now,
                            evicting: false,
                        },
                    );
                    (class.spawn)(self.clone(), key.clone(), generation, rx);
                    *spawned = Some(generation);
                }
            }
        }
    }

    /// Takes the instance `generation` of `key` out of the registry and closes its mailbox, so
    /// that the next event activates a fresh instance. Unless `force`, only when its mailbox is
    /// empty. Events already in the mailbox are left for the caller to hand over.
    pub fn detach(
        &self,
        key: &AgentKey,
        generation: u64,
        rx: &mut mpsc::Receiver<Event>,
        force: bool,
    ) -> bool {
        let mut agents = self.agents();
        if !force && !rx.is_empty() {
            return false;
        }
        if agents
            .live
            .get(key)
            .is_some_and(|s| s.generation == generation)
        {
            agents.live.remove(key);
        }
        rx.close();
        true
    }

    /// Asks the live instance of `key` to hibernate; `false` if none is live.
    pub async fn hibernate(&self, key: &AgentKey) -> Result<bool, Error> {
        let tx = match self.agents().live.get(key) {
            Some(slot) => slot.tx.clone(),
            None => return Ok(false),
        };
        let (done, wait) = oneshot::channel();
        if tx.send(Event::Hibernate(done)).await.is_err() {
            return Ok(false);
        }
        wait.await.map_err(|_| Error::Shutdown)?;
        Ok(true)
    }

    pub fn is_closed(&self) -> bool {
        self.agents().closed
    }

    pub fn is_live(&self, key: &AgentKey) -> bool {
        self.agents().live.contains_key(key)
    }

    pub fn live_count(&self) -> usize {
        self.agents().live.len()
    }

    /// Refuses new events and drops every mailbox sender: each instance finishes what is queued,
    /// commits, closes its database and ends.
    pub fn close(&self) {
        let live = {
            let mut agents = self.agents();
            agents.closed = true;
            std::mem::take(&mut agents.live)
        };
        drop(live);
        self.alarms.changed.notify_one(); // the timer notices `closed`
        self.spares.wake(); // and so does the spares' maker
        self.tracker.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_keeps_its_trace() {
        let key = |n: &str| AgentKey::new("relay", n).unwrap();
        let mut root = Chain::default().push(key("a"));
        assert!(root.trace().is_none());
        let context = TraceContext::root();
        root.set_trace(context);
        let inner = root.push(key("b"));
        assert_eq!(inner.trace(), Some(context));
        assert!(inner.contains(&key("a")) && inner.contains(&key("b")));
        let joined = Chain::in_trace(context).push(key("c"));
        assert_eq!(joined.trace(), Some(context));
        assert!(
            !joined.contains(&key("a")),
            "a trace is not a chain of waiting agents"
        );
    }
}
