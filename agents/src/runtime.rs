//! The [`Runtime`]: its [`Builder`], the handle, and the in-process transport behind
//! `runtime.agent::<A>(name)` and `ctx.agent::<A>(name)`.

use std::{
    any::{type_name, TypeId},
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use agents_client::{
    __private::deadline_in, BoxFuture, ClientCore, Codec, ErrorKind, OutgoingCall, Payload,
    RawError, RawStream, Transport,
};
use tokio::sync::oneshot;

use crate::{
    address::{validate_class, AgentKey},
    agent::{AgentClass, Invocation, Origin},
    alarms::{self, AlarmIndex},
    backup::BackupReport,
    catalog::{AgentInfo, Catalog},
    clock::Clock,
    error::Error,
    front::Front,
    instance,
    lock::lock,
    metrics::Metrics,
    origins::Origins,
    port::Door,
    registry::{CallEvent, CallReply, Chain, Class, Config, Event, ReplyTo, Shared},
    storage::{self, Durability},
    stream::{collect, Returned},
    ws::{Sockets, Wing},
};

/// Configures and builds a [`Runtime`].
///
/// ```no_run
/// # use agents::prelude::*;
/// # #[derive(Default)] struct Counter;
/// # impl Agent for Counter {}
/// # #[agent] impl Counter {}
/// let runtime = Runtime::builder()
///     .data_dir("./data")
///     .agent::<Counter>()
///     .build()?;
/// # Ok::<(), agents::Error>(())
/// ```
#[derive(Clone)]
pub struct Builder {
    /// `data_dir` empty: not set yet; `max_live` 0: derived from the descriptor limit.
    config: Config,
    classes: HashMap<&'static str, Class>,
    /// The HTTP front's settings.
    front: Front,
    error: Option<String>,
    #[cfg(feature = "cluster")]
    cluster: Option<crate::cluster::ClusterOptions>,
}

impl Default for Builder {
    fn default() -> Self {
        Builder {
            config: Config {
                data_dir: PathBuf::new(),
                durability: Durability::Full,
                locking: storage::Locking::Exclusive,
                idle_timeout: Duration::from_secs(60),
                quiet_after: Duration::from_secs(10),
                mailbox_capacity: 1024,
                call_timeout: Duration::from_secs(30),
                max_batch: 256,
                max_live: 0,
                clock: Clock::system(),
                max_message_bytes: 1 << 20,
                outbound_queue: 1024,
                connection_idle: None,
                spare_files: 64,
            },
            classes: HashMap::new(),
            front: Front::default(),
            error: None,
            #[cfg(feature = "cluster")]
            cluster: None,
        }
    }
}

impl fmt::Debug for Builder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Builder")
            .field("data_dir", &self.config.data_dir)
            .field("durability", &self.config.durability)
            .field("classes", &self.classes.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Builder {
    /// Where the agents' databases live (required). Created if missing.
    ///
    /// One data dir serves one runtime at a time: `build` takes the dir's lock file
    /// (`agents.lock`), held until [`Runtime::shutdown`] has closed every database (or the
    /// process ends), and a second runtime on the same dir fails with
    /// [`Error::DataDirInUse`]. The agents' databases are opened in SQLite's exclusive locking
    /// mode: read them with other tools once the runtime has stopped.
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.data_dir = dir.into();
        self
    }

    /// When a reply is released: after an fsync ([`Durability::Full`], the default) or after the
    /// write reaches the OS ([`Durability::Normal`]).
    pub fn durability(mut self, durability: Durability) -> Self {
        self.config.durability = durability;
        self
    }

    /// Cluster mode (feature `cluster`): this runtime is one node of several on one
    /// PostgreSQL database, and each agent lives on one of them at a time, its durable state
    /// in PostgreSQL (see the README's "Beyond one machine"). The data dir holds this node's
    /// copies of the agents it serves; [`durability`](Builder::durability) no longer applies
    /// (a batch is durable once PostgreSQL has it). Serve its [`router`](crate::router) at the
    /// root of the address the options advertise: the other nodes send it the requests and
    /// calls for the agents it has there.
    #[cfg(feature = "cluster")]
    pub fn cluster(mut self, options: crate::cluster::ClusterOptions) -> Self {
        self.cluster = Some(options);
        self
    }

    /// Lets other processes (the `sqlite3` shell, a backup tool) read an agent's database
    /// while the agent is live. By default (`false`) each database is the runtime's alone while
    /// it is open: one lock taken at the open keeps others out, and the WAL index is kept in
    /// memory (on Linux, in pages a quiet agent gives back), so transactions make no lock calls,
    /// and the file can be read once the agent hibernates or the runtime has stopped. With
    /// `true`, every transaction takes SQLite's shared file locks and a `-shm` file sits beside
    /// each open database.
    pub fn readable_while_live(mut self, readable: bool) -> Self {
        self.config.locking = if readable {
            storage::Locking::Shared
        } else {
            storage::Locking::Exclusive
        };
        self
    }

    /// How long an agent may sit idle before it is hibernated (dropped from memory, its
    /// database closed). Default 60 s.
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        self.config.idle_timeout = idle;
        self
    }

    /// How long a live agent may go without events before it gives back the memory it needs
    /// only while busy. Default 10 s.
    ///
    /// Then SQLite's caches go (its prepared statements and cached pages), and its WAL is
    /// checkpointed into the database (synced) and emptied, which lets the 32 KiB WAL index go
    /// too (Linux). A quiet agent keeps its instance, its connections and its open database:
    /// its next event pays only for statements prepared again. (In cluster mode the WAL stays:
    /// a checkpoint stores a snapshot.) No effect if the [idle timeout](Builder::idle_timeout)
    /// is shorter: hibernation gives back everything.
    pub fn quiet_after(mut self, quiet: Duration) -> Self {
        self.config.quiet_after = quiet;
        self
    }

    /// How many events may wait in one agent's mailbox before senders wait. Default 1024.
    pub fn mailbox_capacity(mut self, capacity: usize) -> Self {
        self.config.mailbox_capacity = capacity.max(1);
        self
    }

    /// The timeout of in-process calls that set none. Default 30 s.
    pub fn call_timeout(mut self, timeout: Duration) -> Self {
        self.config.call_timeout = timeout;
        self
    }

    /// At most this many events share one commit. Default 256.
    pub fn max_batch(mut self, events: usize) -> Self {
        self.config.max_batch = events.max(1);
        self
    }

    /// How many agents may be live (in memory, database open) at once; activating one more
    /// hibernates the least recently used. The default is the lower of two budgets: descriptors
    /// (a live agent holds four: its database and its log, and the runtime's lock and sync
    /// handles on them; `build` raises the process's limit to its hard maximum, keeps a quarter
    /// of it aside, at most 256, and gives half the rest to agents, half to
    /// [connections](Builder::max_connections)) and memory (a quarter of the memory available
    /// at `build`, at 256 KiB per live agent); at least 16.
    pub fn max_live_agents(mut self, agents: usize) -> Self {
        self.config.max_live = agents.max(1);
        self
    }

    /// How many database files for new agents the runtime keeps made ahead of time (64 by
    /// default; 0: none). A new agent's activation renames a spare into place instead of
    /// creating its files (two inodes, and a copy of the runtime's tables to write and sync).
    /// Spares are made one at a time in the background, from the first new agent a runtime
    /// makes on, in `spare/` under the data dir: 48 KiB and two inodes each. Under
    /// [`Durability::Full`] each is synced as it is made, not when it is taken. Size it to the
    /// bursts of new agents you expect (the README's figures).
    pub fn spare_files(mut self, files: usize) -> Self {
        self.config.spare_files = files;
        self
    }

    /// The most connections [`serve`](Runtime::serve) holds at once, HTTP and WebSocket alike;
    /// one more is answered `503` with `Retry-After: 1` and closed at once, so that a flood
    /// costs a descriptor for a moment and the server keeps answering. An eighth is kept for one
    /// plain request each (never a WebSocket), so that a health check still gets in while
    /// sockets, or a crowd of handshakes, hold the rest. Default: the other half of the
    /// descriptors (see [`max_live_agents`](Builder::max_live_agents)), at least 16.
    pub fn max_connections(mut self, connections: usize) -> Self {
        self.front.max_connections = connections.max(2);
        self
    }

    /// Turns on the admin routes of [`router`](crate::router) and [`serve`](Runtime::serve):
    /// `GET /admin/metrics` (Prometheus), `/admin/status` (a page) and `/admin/status.json`
    /// (see the README's "Operating" section). `hook` admits each request first, as an agent's
    /// `on_before_request` does: `Ok(_)` lets it through, `Err(response)` is the answer (say,
    /// [`refuse(401, ..)`](crate::refuse)). Off by default: without it the routes answer 404.
    ///
    /// ```
    /// # use agents::prelude::*;
    /// let builder = Runtime::builder().admin(|request| {
    ///     let token = request.headers.get("authorization");
    ///     match token.and_then(|t| t.to_str().ok()) {
    ///         Some("Bearer s3cret") => Ok(None),
    ///         _ => Err(agents::refuse(401, "who are you?")),
    ///     }
    /// });
    /// ```
    pub fn admin(
        mut self,
        hook: impl Fn(&crate::RequestHead) -> crate::Admission + Send + Sync + 'static,
    ) -> Self {
        self.front.admin = Some(crate::admin::AdminHook(Arc::new(hook)));
        self
    }

    /// How long [`serve`](Runtime::serve) lets a client take to send a request's head, and lets
    /// a kept-alive HTTP connection wait for its next request, before closing it: slow and idle
    /// clients give their connection back. Default 10 s. (An open WebSocket is bounded by
    /// [`connection_idle_timeout`](Builder::connection_idle_timeout) instead.)
    pub fn header_timeout(mut self, timeout: Duration) -> Self {
        self.front.header_timeout = timeout.max(Duration::from_millis(1));
        self
    }

    /// The largest WebSocket message accepted, in bytes; a larger one closes the connection
    /// with code 1009 as soon as its frame's header says so (nothing of it is buffered).
    /// Default 1 MiB.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.config.max_message_bytes = bytes.max(1024);
        self
    }

    /// How many frames may wait to be written to one WebSocket while its client does not
    /// read: past that, once frames have waited a second with none taken by the client, it is
    /// disconnected (close code 1008), so that it never holds up the agent. A burst to a client
    /// that reads (one event that sends thousands of frames) passes, up to 16 times this many
    /// frames, which bounds what a connection may hold in any case. Default 1024.
    pub fn outbound_queue(mut self, frames: usize) -> Self {
        self.config.outbound_queue = frames.max(1);
        self
    }

    /// Closes a WebSocket that sends nothing, not even a ping, for `idle` (close code 1000;
    /// `on_close` runs). Default: no limit.
    pub fn connection_idle_timeout(mut self, idle: Duration) -> Self {
        self.config.connection_idle = Some(idle);
        self
    }

    /// The clock every schedule time is read from. Default: the system clock. With a
    /// [`Clock::manual`] the runtime runs no timer: tests move the clock and fire what is due
    /// with [`TestRuntime::advance`](crate::testing::TestRuntime::advance).
    pub fn clock(mut self, clock: Clock) -> Self {
        self.config.clock = clock;
        self
    }

    /// The web origins, besides the server's own, whose pages may call agents from a browser:
    /// `["https://app.example.com", "http://localhost:5173"]`, or `["*"]` for any. Default:
    /// none.
    ///
    /// A browser says where a request comes from in its `Origin` header (every WebSocket
    /// handshake and every cross-site `POST` carry it). A request with no `Origin` (curl, a
    /// service, the typed client) or with the server's own (its host and port are the
    /// request's `Host`) is served; one from an allowed origin is served with the CORS headers
    /// a browser needs (credentials included; preflights are answered); any other is refused
    /// with 403 before an admission hook runs, so that a page on another site cannot call agents
    /// with the cookies of a user who is logged in here. Behind a proxy that rewrites `Host`,
    /// list the public origin. An entry that is not an origin (`https://host[:port]`, nothing
    /// after it) fails [`build`](Builder::build).
    pub fn allowed_origins<S: Into<String>>(
        mut self,
        origins: impl IntoIterator<Item = S>,
    ) -> Self {
        match Origins::new(origins.into_iter().map(Into::into)) {
            Ok(origins) => self.front.origins = origins,
            Err(e) => {
                self.error.get_or_insert(e);
            }
        }
        self
    }

    /// Registers the agent type `A` under its class (`A::CLASS`).
    pub fn agent<A: AgentClass>(mut self) -> Self {
        let class = Class {
            type_id: TypeId::of::<A>(),
            type_name: type_name::<A>(),
            spawn: instance::spawn::<A>,
            internal: A::INTERNAL,
            methods: A::METHODS,
            before_connect: |name, request| Box::pin(A::on_before_connect(name, request)),
            before_request: |name, request| Box::pin(A::on_before_request(name, request)),
        };
        if let Err(e) = validate_class(A::CLASS) {
            self.error.get_or_insert(e.to_string());
        }
        for s in A::SCHEDULES {
            if let Err(e) = s.when() {
                self.error
                    .get_or_insert(format!("{}: {e}", type_name::<A>()));
            }
        }
        match self.classes.get(A::CLASS) {
            Some(existing) if existing.type_id != class.type_id => {
                self.error.get_or_insert(format!(
                    "the class `{}` is registered twice: for {} and for {}",
                    A::CLASS,
                    existing.type_name,
                    class.type_name
                ));
            }
            _ => {
                self.classes.insert(A::CLASS, class);
            }
        }
        self
    }

    /// Builds the runtime (inside a tokio runtime: it starts the alarm timer). Agents are
    /// activated lazily, on their first event.
    pub fn build(self) -> Result<Runtime, Error> {
        if let Some(e) = self.error {
            return Err(Error::Config(e));
        }
        #[cfg(feature = "cluster")]
        if let Some(cluster) = &self.cluster {
            cluster.check()?;
        }
        let mut config = self.config;
        if config.data_dir.as_os_str().is_empty() {
            return Err(Error::Config(
                "no data_dir was set on the runtime builder".into(),
            ));
        }
        std::fs::create_dir_all(&config.data_dir).map_err(|source| Error::Io {
            path: config.data_dir.clone(),
            source,
        })?;
        let mut front = self.front;
        if config.max_live == 0 || front.max_connections == 0 {
            let budget = Budget::of_this_process();
            if config.max_live == 0 {
                config.max_live = budget.live_agents();
            }
            if front.max_connections == 0 {
                front.max_connections = budget.connections();
            }
        }
        let timer = !config.clock.is_manual();
        if timer && tokio::runtime::Handle::try_current().is_err() {
            return Err(Error::Config(
                "Runtime::build must be called inside a tokio runtime (it starts the alarm timer)"
                    .into(),
            ));
        }
        storage::configure_sqlite();
        let dir_lock = storage::lock_data_dir(&config.data_dir)?;
        storage::make_dirs(&config.data_dir, config.durability)?;
        let alarms = AlarmIndex::open(&config.data_dir)?;
        let catalog = Catalog::open(&config.data_dir)?;
        let unregistered = unregistered(&catalog, |class| self.classes.contains_key(class))?;
        let metrics = Metrics::new();
        let sockets = Arc::new(Sockets::new(metrics.wing()));
        #[cfg(feature = "cluster")]
        if self.cluster.is_some() {
            // The local copies need no syncs: a batch is durable once PostgreSQL has it.
            config.durability = Durability::Normal;
        }
        // Cluster mode: the node, to which the alarm index is mirrored.
        #[cfg(feature = "cluster")]
        let node = self.cluster.map(crate::cluster::Node::start);
        #[cfg(feature = "cluster")]
        let alarms = match &node {
            Some(node) => alarms.mirrored(node.clone()),
            None => alarms,
        };
        #[allow(unused_mut)]
        let mut shared = Shared::new(
            config,
            alarms,
            catalog,
            metrics,
            self.classes,
            sockets.clone(),
            dir_lock,
        )?;
        #[cfg(feature = "cluster")]
        {
            shared.cluster = node;
        }
        let shared = Arc::new(shared);
        shared
            .tracker
            .spawn(crate::spares::keep_ready(shared.clone()));
        if timer {
            // Overdue alarms (say, from before a restart) fire as soon as the timer starts.
            shared.tracker.spawn(alarms::run_timer(shared.clone()));
            #[cfg(feature = "cluster")]
            if shared.cluster.is_some() {
                shared.tracker.spawn(alarms::fire_orphans(shared.clone()));
            }
        }
        let wing = Wing::new(Door::new(shared.clone()), sockets);
        let handle = Arc::new(Handle {
            shared: shared.clone(),
            wing,
            front,
            unregistered,
        });
        let _ = shared.handle.set(Arc::downgrade(&handle));
        Ok(Runtime { handle })
    }
}

/// The classes that `catalog` lists agents of and that are not `registered`, with how many;
/// each is logged as a warning (a renamed type changes its class, and its agents' data is then
/// out of reach).
fn unregistered(
    catalog: &Catalog,
    registered: impl Fn(&str) -> bool,
) -> Result<Vec<(String, u64)>, Error> {
    let mut unregistered = catalog.classes()?;
    unregistered.retain(|(class, _)| !registered(class));
    for (class, agents) in &unregistered {
        tracing::warn!(
            "the data dir holds {agents} agents of class `{class}`, which no registered agent type has: \
             was a type renamed? (a class is the type's name in kebab-case unless \
             #[agent(class = \"..\")] names it; register the type under its old class to reach them)"
        );
    }
    Ok(unregistered)
}

/// What the defaults of the live-agent cap and the connection limit are derived from.
struct Budget {
    /// The descriptor limit, raised to the hard one.
    descriptors: u64,
    /// The memory available (Linux: `MemAvailable`), if known.
    memory: Option<u64>,
}

impl Budget {
    /// Descriptors kept aside for everything else (the alarm index, the data dir, logs,
    /// databases being created, connections being turned away): a quarter, at most 256.
    fn reserve(&self) -> u64 {
        (self.descriptors / 4).min(256)
    }

    /// A live agent's descriptors: its database and its log, each opened by SQLite, and the
    /// runtime's own handles on them (the lock that keeps other processes out, the log's sync).
    /// (Under `Durability::Normal` the last is not opened: three; the budget counts four.)
    const AGENT_DESCRIPTORS: u64 = 4;
    /// What a live agent is reckoned to cost in memory (a small one measures about 90 KB).
    const AGENT_MEMORY: u64 = 256 * 1024;

    fn of_this_process() -> Self {
        let memory = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
            let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        });
        Budget {
            descriptors: rlimit::increase_nofile_limit(u64::MAX).unwrap_or(1024),
            memory,
        }
    }

    /// Half the descriptors left after the reserve, and a quarter of the memory.
    fn live_agents(&self) -> usize {
        let half = self.descriptors.saturating_sub(self.reserve()) / 2;
        let by_descriptors = half / Self::AGENT_DESCRIPTORS;
        let by_memory = self.memory.map_or(u64::MAX, |m| m / 4 / Self::AGENT_MEMORY);
        by_descriptors.min(by_memory).clamp(16, 1 << 20) as usize
    }

    /// The other half of the descriptors, one per connection.
    fn connections(&self) -> usize {
        (self.descriptors.saturating_sub(self.reserve()) / 2).clamp(16, 1 << 20) as usize
    }
}

/// A running set of agents: one live instance per address, activated on demand, hibernated
/// when idle. Cheap to clone; dropping the last clone shuts the runtime down (use
/// [`shutdown`](Runtime::shutdown) to wait for every agent to close its database).
#[derive(Clone)]
pub struct Runtime {
    handle: Arc<Handle>,
}

pub(crate) struct Handle {
    shared: Arc<Shared>,
    /// The WebSocket wing: the core reaches its sockets as `shared.sockets`, through the
    /// delivery port; the router hands it upgrades.
    wing: Wing,
    /// The HTTP front's settings.
    front: Front,
    /// The classes with agents in the data dir and no registered type, when the runtime was
    /// built.
    unregistered: Vec<(String, u64)>,
}

impl Runtime {
    /// The runtime of `shared`, unless every handle to it is gone (it is shutting down).
    pub(crate) fn of(shared: &Shared) -> Result<Runtime, Error> {
        let handle = shared.handle.get().and_then(std::sync::Weak::upgrade);
        handle
            .map(|handle| Runtime { handle })
            .ok_or(Error::Shutdown)
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.close();
    }
}

impl Runtime {
    /// Starts configuring a runtime.
    pub fn builder() -> Builder {
        Builder::default()
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// The WebSocket wing, for the router.
    pub(crate) fn wing(&self) -> &Wing {
        &self.handle.wing
    }

    /// The HTTP front's settings, for its accept loop.
    pub(crate) fn front(&self) -> &Front {
        &self.handle.front
    }

    /// A typed client for the agent `name` of type `A`. An invalid name is reported by each
    /// call (as `RpcError::BadArgs`); use [`try_agent`](Runtime::try_agent) to check it first.
    pub fn agent<A: AgentClass>(&self, name: &str) -> A::Client {
        client_for::<A>(self.shared(), name)
    }

    /// Like [`agent`](Runtime::agent), but checks the name and the registration first.
    pub fn try_agent<A: AgentClass>(&self, name: &str) -> Result<A::Client, Error> {
        self.try_key::<A>(name)?;
        Ok(self.agent::<A>(name))
    }

    /// The address of `A`/`name`, checked: a valid name, and `A` registered.
    pub(crate) fn try_key<A: AgentClass>(&self, name: &str) -> Result<AgentKey, Error> {
        let key = AgentKey::new(A::CLASS, name)?;
        self.shared()
            .check_class(key.class(), Some(TypeId::of::<A>()))?;
        Ok(key)
    }

    /// The agents of class `A` that exist, live or hibernated, by name: at most `limit`, from
    /// the first whose name comes after `after` (`None`: from the first). Pass the last name of
    /// a page as `after` for the next. Read from the runtime's catalog (see the README's
    /// "Operating" section): an agent is listed from its creation until it is destroyed (or,
    /// if no event on it ever succeeded, its files removed).
    pub async fn agents<A: AgentClass>(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AgentInfo>, Error> {
        let shared = self.shared().clone();
        let after = after.map(str::to_owned);
        let mut page = storage::blocking(move || {
            // What was noted so far is listed (the writer runs behind the agents).
            shared.catalog.flush(false);
            shared.catalog.list(A::CLASS, after.as_deref(), limit)
        })
        .await?;
        for info in &mut page {
            info.live =
                AgentKey::new(&info.class, &info.name).is_ok_and(|key| self.shared().is_live(&key));
        }
        Ok(page)
    }

    /// Backs up the data dir into `dest` (a new or empty directory) while the runtime serves:
    /// every agent's database as it was when its copy was made (so every write acknowledged
    /// before the call, and some made while it runs), an alarm index that matches the copies,
    /// and the catalog; all fsynced before it returns. Agents are not stopped: a live one copies
    /// its own database between two batches, a hibernated one is copied from outside (an event
    /// for it meanwhile waits for the copy). Restore with `agents restore` or
    /// [`inspect::restore`](crate::inspect::restore).
    pub async fn backup(&self, dest: impl AsRef<std::path::Path>) -> Result<BackupReport, Error> {
        crate::backup::online(self.shared(), dest.as_ref()).await
    }

    /// The classes whose agents the data dir holds but no registered type has, with how many
    /// agents each, as found when the runtime was built. Non-empty usually means that a type
    /// was renamed (its class with it) and its agents' data is out of reach; it is also logged
    /// as a warning at start-up.
    pub fn unregistered_classes(&self) -> &[(String, u64)] {
        &self.handle.unregistered
    }

    /// Hibernates the agent now: its struct is dropped and its database closed once the event
    /// in progress is done. Returns `false` if it was not live.
    pub async fn hibernate<A: AgentClass>(&self, name: &str) -> Result<bool, Error> {
        self.shared()
            .hibernate(&AgentKey::new(A::CLASS, name)?)
            .await
    }

    /// Destroys the agent `A`/`name`: the same as its own [`Ctx::destroy`](crate::Ctx::destroy),
    /// after the events queued before this one. Returns once its files are gone. A later event
    /// finds a new, empty agent.
    pub async fn destroy<A: AgentClass>(&self, name: &str) -> Result<(), Error> {
        let key = self.try_key::<A>(name)?;
        let (done, wait) = oneshot::channel();
        self.shared()
            .route(&key, Event::Destroy(done))
            .await
            .map_err(|(e, _)| e)?;
        match wait.await {
            Ok(result) => result.map_err(|e| Error::Internal(e.message)),
            Err(_) => Err(Error::Shutdown),
        }
    }

    /// Whether the agent is live (in memory) right now.
    pub fn is_live<A: AgentClass>(&self, name: &str) -> bool {
        AgentKey::new(A::CLASS, name).is_ok_and(|k| self.shared().is_live(&k))
    }

    /// Calls `method` of the agent `class`/`name` with encoded arguments (a postcard tuple or a
    /// JSON array); the reply comes back in the same codec. This is the untyped path that
    /// network front ends use; Rust code uses the typed client of [`agent`](Runtime::agent).
    ///
    /// ```
    /// # use agents::prelude::*;
    /// # use agents_client::Payload;
    /// # #[derive(Default)] struct Counter;
    /// # impl Agent for Counter {}
    /// # #[agent] impl Counter { #[callable] async fn add(&mut self, _c: &mut Ctx<Self>, by: i64) -> i64 { by } }
    /// # #[tokio::main] async fn main() {
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let runtime = Runtime::builder().data_dir(dir.path()).agent::<Counter>().build().unwrap();
    /// let reply = runtime.call("counter", "bob", "add", Payload::Json(serde_json::json!([5]))).await;
    /// assert_eq!(reply.unwrap(), Payload::Json(serde_json::json!(5)));
    /// # }
    /// ```
    pub async fn call(
        &self,
        class: &str,
        name: &str,
        method: &str,
        args: Payload,
    ) -> Result<Payload, RawError> {
        self.call_with_timeout(class, name, method, args, None)
            .await
    }

    /// [`call`](Runtime::call) with its own timeout instead of the runtime's default.
    pub async fn call_with_timeout(
        &self,
        class: &str,
        name: &str,
        method: &str,
        args: Payload,
        timeout: Option<Duration>,
    ) -> Result<Payload, RawError> {
        let key = AgentKey::new(class, name).map_err(RawError::bad_args)?;
        let call = OutgoingCall {
            method: method.to_owned().into(),
            args,
            timeout,
        };
        call_value(self.shared(), key, call, Caller::local(Chain::current())).await
    }

    /// The settings the runtime was built with.
    pub(crate) fn config(&self) -> &Config {
        &self.shared().config
    }

    /// The database file of an agent (whether or not it exists yet): for backups and tests.
    pub fn database_path<A: AgentClass>(&self, name: &str) -> Result<PathBuf, Error> {
        Ok(crate::storage::db_path(
            self.data_dir(),
            &AgentKey::new(A::CLASS, name)?,
        ))
    }

    /// With a manual clock: moves it forward by `by`, then fires every alarm that is due, again
    /// and again until none is (a run may schedule another row that is already due), waiting
    /// for each to be durable.
    pub(crate) async fn advance(&self, by: Duration) {
        let shared = self.shared();
        let now = shared.config.clock.advance(by);
        let now = crate::clock::to_ms(now);
        loop {
            let fired = alarms::fire_due(shared, now);
            if fired.is_empty() {
                return;
            }
            for done in fired {
                let _ = done.await;
            }
        }
    }

    /// The runtime's clock (the system clock, or the manual one a test set).
    pub fn clock(&self) -> &Clock {
        &self.shared().config.clock
    }

    /// The time on the runtime's clock.
    pub fn now(&self) -> std::time::SystemTime {
        self.clock().now()
    }

    /// How many agents have a pending alarm in the runtime's index.
    pub fn pending_alarms(&self) -> usize {
        self.shared().alarms.len()
    }

    /// How many spare files for new agents are ready right now (see
    /// [`Builder::spare_files`]).
    pub fn spare_files_ready(&self) -> usize {
        self.shared().spares.ready()
    }

    /// How many agents are live right now.
    pub fn live_count(&self) -> usize {
        self.shared().live_count()
    }

    /// How many WebSockets are open, over all agents (live or hibernating).
    pub fn connection_count(&self) -> usize {
        self.shared().sockets.count()
    }

    /// The data dir.
    pub fn data_dir(&self) -> &Path {
        &self.shared().config.data_dir
    }

    /// Stops taking events, lets every agent finish and commit what it has queued, closes every
    /// database, and returns when all of that is done. Clients fail with an `internal` error
    /// afterwards. Open WebSockets are closed with 1001 (going away).
    pub async fn shutdown(self) {
        let shared = self.shared().clone();
        shared.sockets.close_all();
        shared.close();
        shared.tracker.wait().await;
        // Every database is closed: the catalog has every agent's last figures.
        let catalog = shared.clone();
        let flushed = storage::blocking(move || {
            catalog.catalog.flush(true);
            Ok(())
        });
        let _ = flushed.await;
        #[cfg(feature = "cluster")]
        if let Some(node) = &shared.cluster {
            node.leave().await;
        }
        // Another runtime may open the data dir now.
        drop(lock(&shared.dir_lock).take());
    }
}

impl fmt::Debug for Runtime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Runtime")
            .field("data_dir", &self.data_dir())
            .field("live", &self.live_count())
            .finish()
    }
}

pub(crate) fn client_for<A: AgentClass>(shared: &Arc<Shared>, name: &str) -> A::Client {
    let target = AgentKey::new(A::CLASS, name)
        .and_then(|key| {
            shared
                .check_class(key.class(), Some(TypeId::of::<A>()))
                .map(|()| key)
        })
        .map_err(|e| e.to_string());
    let transport = LocalTransport {
        shared: shared.clone(),
        target,
    };
    A::Client::from(ClientCore::new(Arc::new(transport)))
}

/// Who makes a call.
pub(crate) struct Caller {
    /// The agents waiting on it.
    pub chain: Chain,
    /// Who made it, as an admission hook said (`ctx.principal()` tells the handler).
    pub principal: Option<Arc<str>>,
    pub origin: Origin,
}

impl Caller {
    /// Rust code in this process, on behalf of `chain`.
    pub fn local(chain: Chain) -> Self {
        Caller {
            chain,
            principal: None,
            origin: Origin::Local,
        }
    }

    /// The runtime on the agent's own behalf (its spawned work's result), which may reach its
    /// `#[callable(private)]` methods.
    pub fn agent_itself() -> Self {
        Caller {
            chain: Chain::default(),
            principal: None,
            origin: Origin::Runtime,
        }
    }

    /// The network, as `principal` if the admission hook named one.
    pub fn remote(principal: Option<String>) -> Self {
        Caller {
            chain: Chain::default(),
            principal: principal.map(Arc::from),
            origin: Origin::Remote,
        }
    }
}

/// Delivers one call to the agent `key` and waits for its reply, up to the call's deadline.
async fn call_local(
    shared: &Arc<Shared>,
    key: AgentKey,
    call: OutgoingCall,
    caller: Caller,
) -> CallReply {
    let Caller {
        chain,
        principal,
        origin,
    } = caller;
    if chain.contains(&key) {
        return Err(RawError::new(
            ErrorKind::Cycle,
            format!("{chain} -> {key}: {key} is already waiting on this call"),
        ));
    }
    let deadline = deadline_in(call.timeout.unwrap_or(shared.config.call_timeout));
    let (reply, wait) = oneshot::channel();
    let event = Event::Call(Box::new(CallEvent {
        inv: Invocation::new(call.method, call.args, origin),
        reply: ReplyTo::Caller(reply),
        chain,
        deadline: Some(deadline),
        received: std::time::Instant::now(),
        conn: None,
        principal,
    }));
    let exchange = async {
        shared
            .route(&key, event)
            .await
            .map_err(|(e, _)| e.told("the agent cannot be reached"))?;
        wait.await
            .map_err(|_| RawError::internal("the agent stopped before it replied"))?
    };
    match tokio::time::timeout_at(deadline, exchange).await {
        Ok(result) => result,
        Err(_) => Err(RawError::new(
            ErrorKind::Timeout,
            format!("no reply from {key} before the deadline"),
        )),
    }
}

/// A call whose caller wants one value: a stream's chunks are collected (each within the
/// call's timeout, up to the message size limit in all).
pub(crate) async fn call_value(
    shared: &Arc<Shared>,
    key: AgentKey,
    call: OutgoingCall,
    caller: Caller,
) -> Result<Payload, RawError> {
    // Cluster mode: to the node that has the agent, if another has it.
    #[cfg(feature = "cluster")]
    if let Some(result) = crate::forward::call(shared, &key, &call, &caller.chain).await {
        return result;
    }
    call_value_here(shared, key, call, caller).await
}

/// `call_value`, served by this runtime (cluster mode: a call the network brought, which was
/// forwarded already if it had to be).
pub(crate) async fn call_value_here(
    shared: &Arc<Shared>,
    key: AgentKey,
    call: OutgoingCall,
    caller: Caller,
) -> Result<Payload, RawError> {
    let codec = call.args.codec();
    let idle = call.timeout.unwrap_or(shared.config.call_timeout);
    match call_local(shared, key, call, caller).await? {
        Returned::Value(value) => Ok(value),
        Returned::Stream(stream) => {
            let limit = shared.config.max_message_bytes;
            collect(stream.with_idle(idle), codec, limit).await
        }
    }
}

/// Calls an agent of this runtime without leaving the process.
struct LocalTransport {
    shared: Arc<Shared>,
    target: Result<AgentKey, String>,
}

impl Transport for LocalTransport {
    fn call(&self, call: OutgoingCall) -> BoxFuture<'static, Result<Payload, RawError>> {
        let shared = self.shared.clone();
        let target = self.target.clone();
        let chain = Chain::current();
        Box::pin(async move {
            let key = target.map_err(RawError::bad_args)?;
            call_value(&shared, key, call, Caller::local(chain)).await
        })
    }

    fn call_stream(&self, call: OutgoingCall) -> BoxFuture<'static, RawStream> {
        let shared = self.shared.clone();
        let target = self.target.clone();
        let chain = Chain::current();
        Box::pin(async move {
            let idle = call.timeout.unwrap_or(shared.config.call_timeout);
            let key = match target {
                Ok(key) => key,
                Err(e) => return RawStream::failed(RawError::bad_args(e)),
            };
            let method = call.method.clone();
            match call_local(&shared, key, call, Caller::local(chain)).await {
                Ok(Returned::Stream(stream)) => stream.with_idle(idle),
                Ok(Returned::Value(_)) => RawStream::failed(RawError::internal(format!(
                    "`{method}` answered with a value: it does not stream"
                ))),
                Err(e) => RawStream::failed(e),
            }
        })
    }

    fn codec(&self) -> Codec {
        // Cluster mode: an agent that is not here may be another node's, and its arguments
        // would travel there.
        #[cfg(feature = "cluster")]
        if let (Some(node), Ok(key)) = (&self.shared.cluster, &self.target) {
            if !self.shared.is_live(key) || node.has_lost(key) {
                return Codec::Postcard;
            }
        }
        Codec::Value
    }

    fn describe(&self) -> String {
        match &self.target {
            Ok(key) => format!("local {key}"),
            Err(e) => format!("invalid ({e})"),
        }
    }
}
