//! Cluster mode: N nodes on one PostgreSQL, each agent on at most one of them.
//!
//! PostgreSQL is the coordination and durability engine (see `store` for the tables):
//! membership is a lease per node, ownership a compare-and-set that bumps the agent's epoch,
//! and an agent's durable state is its SQLite change log (the WAL frames its batches
//! committed, `replica`), appended under the epoch's fence, with snapshots that bound what a
//! restore replays. The runtime reaches it through its seams:
//! - activation: before an agent's database opens, the node takes the agent ([`Node::activate`]);
//!   if the epoch moved (another node or nobody had it), the local file is rebuilt from
//!   PostgreSQL first; if a live node has it, the event fails with `Error::Moved`;
//! - the commit gate ([`LogGate`]): a batch is durable once its frames are appended in
//!   PostgreSQL under the fence; the appends of every agent of the node share statements
//!   (`Shipper`); a refused append (the agent moved) or a failed one marks the agent lost: its
//!   replies fail, and its local copy is dropped;
//! - checkpoints: the checkpointed file is stored as a snapshot, and the log before it goes.
//!
//! The local database is a cache: its WAL is not fsynced (`Durability` is `Normal` locally).

mod store;

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use crate::{
    address::AgentKey,
    alarms::AlarmMirror,
    error::Error,
    gate::{CommitGate, Committed},
    lock::lock,
    replica::{self, ChangeSet},
    storage,
};
pub(crate) use store::{Append, Owner, Store, StoreError};

/// Cluster mode's settings (feature `cluster`), for [`Builder::cluster`](crate::Builder::cluster).
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    postgres: String,
    advertise: String,
    lease: Duration,
}

impl ClusterOptions {
    /// Nodes that share the PostgreSQL database `postgres` (a connection string:
    /// `host=10.0.0.2 user=agents dbname=agents`, or `postgres://agents@10.0.0.2/agents`);
    /// this node is reached by the others at `advertise` (`host:port` of its server).
    pub fn new(postgres: impl Into<String>, advertise: impl Into<String>) -> Self {
        ClusterOptions {
            postgres: postgres.into(),
            advertise: advertise.into(),
            lease: Duration::from_secs(10),
        }
    }

    /// How long this node's lease lasts without renewal (default 10 s; renewed every third of
    /// it): when it lapses, other nodes take its agents.
    pub fn lease(mut self, ttl: Duration) -> Self {
        self.lease = ttl;
        self
    }

    /// The shortest lease: a third of it is the renewal interval.
    const MIN_LEASE: Duration = Duration::from_millis(300);

    /// Checks what can be checked before connecting (`Builder::build`).
    pub(crate) fn check(&self) -> Result<(), Error> {
        let bad = |why: String| Err(Error::Config(format!("cluster: {why}")));
        if let Err(e) = self.postgres.parse::<tokio_postgres::Config>() {
            return bad(format!(
                "`{}` is not a PostgreSQL connection string: {e}",
                self.postgres
            ));
        }
        if self.advertise.is_empty() {
            return bad(
                "no address to advertise (the host:port other nodes reach this one at)".into(),
            );
        }
        if self.lease < Self::MIN_LEASE {
            return bad(format!(
                "a lease of {:?} is too short (at least {:?})",
                self.lease,
                Self::MIN_LEASE
            ));
        }
        Ok(())
    }
}

/// This node: its membership, the agents it owns, and its connections to PostgreSQL.
pub(crate) struct Node {
    id: String,
    options: ClusterOptions,
    /// For takes, restores and the lease (connected, migrated and registered on first use,
    /// and again if the connection drops).
    store: tokio::sync::Mutex<Option<Arc<Store>>>,
    /// Appends, snapshots and removals, batched across agents.
    shipper: mpsc::UnboundedSender<Job>,
    /// The node has left (its runtime stopped): its lease is not renewed again.
    left: AtomicBool,
    /// Where agents that are not here were found (`locate`), until a request there fails.
    owners: std::sync::Mutex<HashMap<AgentKey, Arc<str>>>,
    /// Agents lost while live here (see `AgentLog::lost`): requests for them are forwarded at
    /// once, not served by the instance that is leaving. Until this node takes them again.
    lost: std::sync::Mutex<HashSet<AgentKey>>,
    /// Until when (ns after `started`) the lease is surely held: a renewal's lease counted
    /// from before it was sent (0: none).
    leased_until: AtomicU64,
    started: Instant,
    /// The cluster's secret, read when the node first connects (see `store::SECRET`).
    secret: std::sync::OnceLock<String>,
    /// How many times the lease was found lapsed: every agent taken before a lapse may have
    /// been taken by another node meanwhile, and is dropped (see `LogGate::is_lost`).
    lapses: AtomicU64,
}

/// The most agents `Node::owners` (or `Node::lost`) remembers (when full, it starts again).
const MAX_REMEMBERED: usize = 65_536;

/// One agent's log as its owner writes it.
pub(crate) struct AgentLog {
    key: AgentKey,
    epoch: i64,
    /// The last sequence number appended.
    last_seq: AtomicI64,
    /// A new agent: its first append stores its file as the snapshot everything applies to.
    needs_base: AtomicBool,
    /// Its append was refused (it moved) or failed: nothing more is appended, and its local
    /// copy must go.
    lost: AtomicBool,
    /// `Node::lapses` when it was taken.
    lapses: u64,
}

impl AgentLog {
    /// Whether this agent was lost to this node (see `lost`).
    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }
}

impl Node {
    /// Starts the node: connects (on first use), registers, renews its lease.
    pub fn start(options: ClusterOptions) -> Arc<Node> {
        let id = format!("{:016x}", random());
        let (shipper, jobs) = mpsc::unbounded_channel();
        let node = Arc::new(Node {
            id,
            options,
            store: tokio::sync::Mutex::default(),
            shipper,
            left: AtomicBool::new(false),
            owners: Default::default(),
            lost: Default::default(),
            leased_until: AtomicU64::new(0),
            started: Instant::now(),
            lapses: AtomicU64::new(0),
            secret: std::sync::OnceLock::new(),
        });
        tokio::spawn(ship(node.options.postgres.clone(), node.id.clone(), jobs));
        let renewing = Arc::downgrade(&node);
        tokio::spawn(async move {
            loop {
                let Some(node) = renewing
                    .upgrade()
                    .filter(|n| !n.left.load(Ordering::Acquire))
                else {
                    return;
                };
                let every = node.renewal();
                if let Err(e) = node.renew().await {
                    tracing::warn!(
                        "cluster: the lease of node {} was not renewed: {e}",
                        node.id
                    );
                }
                drop(node);
                tokio::time::sleep(every).await;
            }
        });
        node
    }

    /// The connection for takes and the lease, once it is registered.
    async fn store(&self) -> Result<Arc<Store>, Error> {
        let mut slot = self.store.lock().await;
        if let Some(store) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(store.clone());
        }
        let store = Store::connect(&self.options.postgres).await.map_err(pg)?;
        store.migrate().await.map_err(pg)?;
        if self.secret.get().is_none() {
            let _ = self.secret.set(store.secret().await.map_err(pg)?);
        }
        let (id, advertise, lease) = (&self.id, &self.options.advertise, self.options.lease);
        let sent = Instant::now();
        store.register(id, advertise, lease).await.map_err(pg)?;
        self.leased(sent);
        let store = Arc::new(store);
        *slot = Some(store.clone());
        Ok(store)
    }

    /// Renews the lease; one that lapsed is taken again (an agent another node took
    /// meanwhile is fenced off: this node's appends for it are refused).
    async fn renew(&self) -> Result<(), Error> {
        let store = self.store().await?;
        if self.left.load(Ordering::Acquire) {
            return Ok(()); // it left while this renewal connected
        }
        let sent = Instant::now();
        if !store
            .renew(&self.id, self.options.lease)
            .await
            .map_err(pg)?
        {
            tracing::warn!(
                "cluster: node {}'s lease had lapsed; registering again (its agents are dropped: \
                 another node may have taken them)",
                self.id
            );
            self.lapses.fetch_add(1, Ordering::AcqRel);
            let sent = Instant::now();
            store
                .register(&self.id, &self.options.advertise, self.options.lease)
                .await
                .map_err(pg)?;
            self.leased(sent);
            return Ok(());
        }
        self.leased(sent);
        Ok(())
    }

    /// A lease was granted by a statement sent at `sent`: PostgreSQL counted it from later
    /// (its clock read after the statement arrived), so it surely lasts until `sent` + lease.
    fn leased(&self, sent: Instant) {
        let until = (sent + self.options.lease).duration_since(self.started);
        let until = u64::try_from(until.as_nanos()).unwrap_or(u64::MAX);
        self.leased_until.fetch_max(until, Ordering::AcqRel);
    }

    /// Whether the lease is surely held now: no other node can have taken an agent this node
    /// has (since the last lapse), so what it reads is current.
    fn holds_lease(&self) -> bool {
        let now = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        now < self.leased_until.load(Ordering::Acquire)
    }

    /// Ends the lease now (the node stops): other nodes take its agents at once.
    pub async fn leave(&self) {
        self.left.store(true, Ordering::Release);
        self.leased_until.store(0, Ordering::Release);
        let store = self.store.lock().await.clone();
        if let Some(store) = store {
            if let Err(e) = store
                .register(&self.id, &self.options.advertise, Duration::ZERO)
                .await
            {
                tracing::warn!("cluster: node {} could not end its lease: {e}", self.id);
            }
        }
    }

    /// Where a request for `key` (not live here) goes: the address of the live node that has
    /// it, or `None` for this node (nobody has it, its owner is dead, this node has it, or
    /// PostgreSQL cannot say: the activation's take decides). Remembered until [`forget`]
    /// (a request there failed, or was refused as that node's no longer).
    ///
    /// [`forget`]: Node::forget
    pub async fn locate(&self, key: &AgentKey) -> Option<Arc<str>> {
        if let Some(addr) = lock(&self.owners).get(key) {
            return Some(addr.clone());
        }
        let store = self.store().await.ok()?;
        match store.locate(&self.id, key).await {
            Ok(found) => Some(self.remember(key, found?)),
            Err(e) => {
                tracing::warn!("cluster: where {key} is could not be read: {e}");
                None
            }
        }
    }

    /// The cluster's secret, which the calls nodes forward to each other carry.
    pub async fn secret(&self) -> Result<&str, Error> {
        if self.secret.get().is_none() {
            self.store().await?;
        }
        Ok(self.secret.get().expect("read when connected"))
    }

    /// How often the lease is renewed (and dead nodes' due alarms looked for).
    pub fn renewal(&self) -> Duration {
        self.options.lease / 3
    }

    /// Up to 256 agents due by `now` (ms) whose node is dead (or that nobody has).
    pub async fn orphans(&self, now: u64) -> Vec<AgentKey> {
        let found = match self.store().await {
            Ok(store) => store.orphans(now).await.map_err(pg),
            Err(e) => Err(e),
        };
        found.unwrap_or_else(|e| {
            tracing::warn!("cluster: due alarms could not be read: {e}");
            Vec::new()
        })
    }

    /// Remembers that `key` is at the node at `addr`.
    fn remember(&self, key: &AgentKey, addr: String) -> Arc<str> {
        let addr: Arc<str> = addr.into();
        let mut owners = lock(&self.owners);
        if owners.len() >= MAX_REMEMBERED {
            owners.clear();
        }
        owners.insert(key.clone(), addr.clone());
        addr
    }

    /// Forgets where `key` was found.
    pub fn forget(&self, key: &AgentKey) {
        lock(&self.owners).remove(key);
    }

    /// Whether `key` was lost while live here (and not taken again since).
    pub fn has_lost(&self, key: &AgentKey) -> bool {
        lock(&self.lost).contains(key)
    }

    /// Takes `key` before its database at `path` opens: rebuilds the file from PostgreSQL if
    /// another node had it (or this node has no copy); `Error::Moved` if a live node has it.
    pub async fn activate(&self, key: &AgentKey, path: &Path) -> Result<AgentLog, Error> {
        if self.left.load(Ordering::Acquire) {
            return Err(Error::Shutdown);
        }
        let store = self.store().await?;
        lock(&self.lost).remove(key);
        let lapses = self.lapses.load(Ordering::Acquire);
        let log = |epoch, last_seq, needs_base: bool| AgentLog {
            key: key.clone(),
            epoch,
            last_seq: AtomicI64::new(last_seq),
            needs_base: AtomicBool::new(needs_base),
            lost: AtomicBool::new(false),
            lapses,
        };
        let epoch = match store.take(&self.id, key).await.map_err(pg)? {
            // This node's copy is current: nobody else took the agent since this node did (a
            // copy another process left in the data dir was a node of another id).
            Owner::Kept {
                epoch,
                last_seq,
                has_base,
            } if path.exists() => return Ok(log(epoch, last_seq, !has_base)),
            Owner::Kept { epoch, .. } | Owner::Taken { epoch, new: false } => epoch,
            // Nothing is stored: a copy left here is of an agent that was removed.
            Owner::Taken { epoch, new: true } => {
                let file = path.to_owned();
                storage::blocking(move || rebuild(&file, None, &[])).await?;
                return Ok(log(epoch, 0, true));
            }
            Owner::Other { addr, .. } if addr.is_empty() => {
                return Err(Error::Moved(format!(
                    "{key} cannot be taken: this node's lease has lapsed"
                )))
            }
            Owner::Other { addr, .. } => {
                // The next request for it goes there without asking PostgreSQL again.
                let addr = self.remember(key, addr);
                return Err(Error::Moved(format!(
                    "{key} is served by the node at {addr}"
                )));
            }
        };
        let restored = store.restore(key).await.map_err(pg)?;
        let (file, last_seq) = (path.to_owned(), restored.last_seq());
        let needs_base = restored.image.is_none();
        if needs_base && !restored.sets.is_empty() {
            return Err(Error::Internal(format!(
                "{key}'s log in PostgreSQL has no snapshot to apply it to"
            )));
        }
        storage::blocking(move || rebuild(&file, restored.image, &restored.sets)).await?;
        Ok(log(epoch, last_seq, needs_base))
    }

    /// Hands `job` to the shipper and waits for its outcome (blocking): whether it was kept
    /// (not fenced off).
    fn ship(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<bool, Error>>) -> Job,
    ) -> Result<bool, Error> {
        let (done, outcome) = oneshot::channel();
        self.shipper.send(job(done)).map_err(|_| Error::Shutdown)?;
        outcome.blocking_recv().map_err(|_| Error::Shutdown)?
    }

    /// The commit gate of `log`'s agent, whose database is at `path`.
    pub fn gate(self: &Arc<Self>, log: AgentLog, path: &Path) -> LogGate {
        LogGate {
            log,
            node: self.clone(),
            db: path.to_owned(),
            wal: path.with_extension("sqlite-wal"),
        }
    }
}

/// The alarm index's entries go to PostgreSQL too, through the shipper (in order with the
/// node's other writes), for the agents this node has.
impl AlarmMirror for Node {
    fn set(&self, key: &AgentKey, at: Option<u64>, durable: bool) -> Result<(), Error> {
        let key = key.clone();
        if !durable {
            let _ = self.shipper.send(Job::Alarm {
                key,
                at,
                done: None,
            });
            return Ok(());
        }
        self.ship(|done| Job::Alarm {
            key,
            at,
            done: Some(done),
        })
        .map(drop)
    }
}

/// Replaces the local files of a database at `path` with `image` and `sets` applied to it
/// (none: no file, a new agent). Blocking.
fn rebuild(path: &Path, image: Option<Vec<u8>>, sets: &[(i64, ChangeSet)]) -> Result<(), Error> {
    for file in [
        path.with_extension("sqlite-wal"),
        path.with_extension("sqlite-shm"),
    ] {
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(storage::io(&file)(e))
            }
            _ => {}
        }
    }
    let Some(image) = image else {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(storage::io(path)(e)),
            _ => Ok(()),
        };
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(storage::io(dir))?;
    }
    let making = path.with_extension("sqlite-restoring");
    let file = std::fs::File::create(&making).map_err(storage::io(&making))?;
    std::io::Write::write_all(&mut &file, &image).map_err(storage::io(&making))?;
    for (_, set) in sets {
        replica::apply(&file, set).map_err(storage::io(&making))?;
    }
    drop(file);
    std::fs::rename(&making, path).map_err(storage::io(path))
}

/// A batch is durable once its frames are appended to the agent's log in PostgreSQL, under
/// the fence of the agent's epoch.
pub(crate) struct LogGate {
    log: AgentLog,
    node: Arc<Node>,
    db: PathBuf,
    wal: PathBuf,
}

impl LogGate {
    /// Marks the agent lost (see `AgentLog::lost`).
    fn lose(&self) {
        self.log.lost.store(true, Ordering::Release);
        let mut lost = lock(&self.node.lost);
        if lost.len() >= MAX_REMEMBERED {
            lost.clear();
        }
        lost.insert(self.log.key.clone());
    }

    /// Hands `job` to the shipper and waits for its outcome (blocking); one fenced off marks
    /// the agent lost.
    fn ship(
        &self,
        job: impl FnOnce(oneshot::Sender<Result<bool, Error>>) -> Job,
    ) -> Result<(), Error> {
        if self.node.ship(job)? {
            Ok(())
        } else {
            self.lose();
            Err(self.moved())
        }
    }

    /// What a batch of an agent this node lost fails with.
    fn moved(&self) -> Error {
        Error::Moved(format!(
            "{} moved to another node: this batch's writes were not kept",
            self.log.key
        ))
    }

    /// Stores the database file as the snapshot at `seq` (fenced).
    fn snapshot(&self, seq: i64) -> Result<(), Error> {
        let image = std::fs::read(&self.db).map_err(storage::io(&self.db))?;
        let (key, epoch) = (self.log.key.clone(), self.log.epoch);
        self.ship(|done| Job::Snapshot {
            key,
            epoch,
            seq,
            image,
            done,
        })
    }
}

impl CommitGate for LogGate {
    fn make_durable(&self, committed: &Committed) -> Result<(), Error> {
        if CommitGate::is_lost(self) {
            return Err(self.moved());
        }
        if committed.frames.is_empty() {
            // Nothing to fence: what it read is current only while no other node can have
            // taken the agent, that is while this node surely holds its lease.
            if self.node.holds_lease() {
                return Ok(());
            }
            return Err(Error::Moved(format!(
                "{}: this node's lease lapsed, and what it read may be stale",
                self.log.key
            )));
        }
        let result = (|| {
            if self.log.needs_base.load(Ordering::Acquire) {
                // A new agent: the file before its first batch (its WAL was never
                // checkpointed) is what its log applies to.
                self.snapshot(0)?;
                self.log.needs_base.store(false, Ordering::Release);
            }
            let set = replica::read_frames(&self.wal, committed.frames.clone())
                .map_err(storage::io(&self.wal))?;
            let seq = self.log.last_seq.load(Ordering::Acquire) + 1;
            let (key, epoch) = (self.log.key.clone(), self.log.epoch);
            self.ship(|done| Job::Append {
                key,
                epoch,
                seq,
                set,
                done,
            })?;
            self.log.last_seq.store(seq, Ordering::Release);
            Ok(())
        })();
        if result.is_err() {
            // Whether it was kept is unknown, or it was not: the local copy is no longer the
            // log's, and goes (the next activation restores the agent from the log).
            self.lose();
        }
        result
    }

    fn checkpointed(&self) -> Result<(), Error> {
        self.snapshot(self.log.last_seq.load(Ordering::Acquire))
    }

    fn is_lost(&self) -> bool {
        // (Taken before a lapse of the lease, it may be another node's now.)
        self.log.is_lost() || self.log.lapses != self.node.lapses.load(Ordering::Acquire)
    }

    fn removed(&self) -> Result<(), Error> {
        let (key, epoch) = (self.log.key.clone(), self.log.epoch);
        self.ship(|done| Job::Remove { key, epoch, done })
    }
}

/// What the shipper does: appends (batched across agents) and snapshots.
enum Job {
    Append {
        key: AgentKey,
        epoch: i64,
        seq: i64,
        set: ChangeSet,
        done: oneshot::Sender<Result<bool, Error>>,
    },
    Snapshot {
        key: AgentKey,
        epoch: i64,
        seq: i64,
        image: Vec<u8>,
        done: oneshot::Sender<Result<bool, Error>>,
    },
    Remove {
        key: AgentKey,
        epoch: i64,
        done: oneshot::Sender<Result<bool, Error>>,
    },
    /// An alarm index entry (`done`: waited for).
    Alarm {
        key: AgentKey,
        at: Option<u64>,
        done: Option<oneshot::Sender<Result<bool, Error>>>,
    },
}

/// How many appends one statement carries at most.
const MAX_APPENDS: usize = 256;

/// The shipper of node `node`: takes the appends every agent's gate hands over meanwhile and
/// makes them one statement (group commit across agents), on a connection of its own.
async fn ship(postgres: String, node: String, mut jobs: mpsc::UnboundedReceiver<Job>) {
    let mut store: Option<Store> = None;
    while let Some(first) = jobs.recv().await {
        let (mut appends, mut others) = (Vec::new(), Vec::new());
        let mut next = Some(first);
        while let Some(job) = next.take() {
            match job {
                Job::Append { .. } => appends.push(job),
                Job::Snapshot { .. } | Job::Remove { .. } | Job::Alarm { .. } => others.push(job),
            }
            if appends.len() < MAX_APPENDS {
                next = jobs.try_recv().ok();
            }
        }
        if store.as_ref().is_none_or(Store::is_closed) {
            match Store::connect(&postgres).await {
                Ok(connected) => store = Some(connected),
                Err(e) => {
                    let e = pg(e);
                    for job in appends.into_iter().chain(others) {
                        answer(job, Err(Error::Internal(e.to_string())));
                    }
                    continue;
                }
            }
        }
        let pg_store = store.as_ref().expect("connected");
        // Snapshots first: a new agent's base comes before its first append. (An agent has one
        // job in flight at a time: its syncer waits for each.)
        for job in others {
            let outcome = match &job {
                Job::Snapshot {
                    key,
                    epoch,
                    seq,
                    image,
                    ..
                } => pg_store.snapshot(&node, key, *epoch, *seq, image).await,
                Job::Remove { key, epoch, .. } => pg_store.remove(&node, key, *epoch).await,
                Job::Alarm { key, at, .. } => pg_store.set_alarm(&node, key, *at).await,
                Job::Append { .. } => continue,
            };
            let outcome = match outcome {
                Ok(()) => Ok(true),
                Err(StoreError::Fenced(..)) => Ok(false),
                Err(e) => Err(pg(e)),
            };
            answer(job, outcome);
        }
        if appends.is_empty() {
            continue;
        }
        let batch: Vec<Append<'_>> = appends
            .iter()
            .filter_map(|job| match job {
                Job::Append {
                    key,
                    epoch,
                    seq,
                    set,
                    ..
                } => Some(Append {
                    key,
                    epoch: *epoch,
                    seq: *seq,
                    set,
                }),
                Job::Snapshot { .. } | Job::Remove { .. } | Job::Alarm { .. } => None,
            })
            .collect();
        let outcome = pg_store.append(&node, &batch).await;
        drop(batch);
        match outcome {
            Ok(kept) => {
                for (job, kept) in appends.into_iter().zip(kept) {
                    answer(job, Ok(kept));
                }
            }
            Err(e) => {
                // The connection may be gone: the next batch connects again.
                if pg_store.is_closed() {
                    store = None;
                }
                let e = pg(e);
                for job in appends {
                    answer(job, Err(Error::Internal(e.to_string())));
                }
            }
        }
    }
}

fn answer(job: Job, outcome: Result<bool, Error>) {
    let done = match job {
        Job::Append { done, .. } | Job::Snapshot { done, .. } | Job::Remove { done, .. } => done,
        Job::Alarm {
            done: Some(done), ..
        } => done,
        Job::Alarm { done: None, .. } => return,
    };
    let _ = done.send(outcome);
}

fn pg(e: StoreError) -> Error {
    Error::Internal(format!("cluster: {e}"))
}

/// A random `u64` (node ids, test databases' names).
pub(crate) fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(test)]
mod tests;
