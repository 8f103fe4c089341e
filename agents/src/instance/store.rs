//! The agent's database as its instance uses it: opened on the first event that needs it (a
//! few at a time, see `Shared::opening`), one transaction per batch with a savepoint per event,
//! the commit and what makes it durable (its `CommitGate`: the output gate waits on it),
//! checkpoints once the WAL is large, and the close.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use rusqlite::Connection;

use crate::{
    address::AgentKey,
    catalog::{self, Figures},
    database::Database,
    error::{Error, Failure},
    gate::{release, AfterDurable, CommitGate, Committed, NoSync, Outbox, Syncer, WalSync},
    registry::Shared,
    storage::{self, blocking},
};

/// The open database's side of an instance (the connection itself is the `Ctx`'s, which
/// handlers query).
pub(super) struct Store {
    /// Whether the batch transaction is open.
    in_txn: bool,
    /// Set while user code runs: the database then refuses transaction control.
    in_handler: Arc<AtomicBool>,
    /// Releases replies once their commit is durable (`None`: released at once).
    syncer: Option<Syncer>,
    /// What makes a commit durable, while the database is open.
    gate: Option<Arc<dyn CommitGate>>,
    /// How many frames the WAL held after the last commit.
    wal_frames: u32,
    /// Checkpoint once the WAL holds this many frames.
    checkpoint_at: u32,
    /// Keeps other processes out of the open database (see `storage::Opened`).
    guard: Option<std::fs::File>,
    /// The open database's permit among the runtime's (`Shared::databases`).
    database: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The open database was created by this instance and no event has succeeded since: if
    /// the batch ends so, the files go (a request that fails leaves no database behind).
    pub(super) unused: bool,
    /// The open database was created by this instance and the catalog was not told yet: it is
    /// told once an event succeeded (junk never enters it).
    uncataloged: bool,
    /// The open database's `#[schedule]` rows were registered, and the connections that closed
    /// while nobody listened forgotten (once per open: a database made again after its junk
    /// went needs them as much as the first).
    pub(super) checked: bool,
    /// The agent had schedules in this activation (or changed its dead letters): the catalog's
    /// counts are taken again at the close (a query not worth making otherwise).
    pub(super) schedules_seen: bool,
    /// The open database's path.
    path: std::path::PathBuf,
    /// Cluster mode: another node has the agent (its activation here was refused), so this
    /// instance goes, and requests for it are forwarded there.
    elsewhere: bool,
    /// Cluster mode: the open database is replicated (a checkpoint stores a snapshot).
    replicated: bool,
}

impl Store {
    pub(super) fn new() -> Self {
        Store {
            in_txn: false,
            in_handler: Arc::default(),
            syncer: None,
            gate: None,
            wal_frames: 0,
            checkpoint_at: u32::MAX,
            guard: None,
            database: None,
            unused: false,
            uncataloged: false,
            checked: false,
            schedules_seen: false,
            path: std::path::PathBuf::new(),
            elsewhere: false,
            replicated: false,
        }
    }

    /// Opens the database of `key` into `slot`, if it is not open; its syncs are timed into
    /// `sync`.
    pub(super) async fn open(
        &mut self,
        slot: &mut Option<Database>,
        shared: &Arc<Shared>,
        key: &AgentKey,
        sync: &prometheus::Histogram,
    ) -> Result<(), Error> {
        if slot.is_some() {
            return Ok(());
        }
        let database = open_database_permit(shared).await?;
        // Cluster mode: the agent is taken first (its file rebuilt if it moved here).
        #[cfg(feature = "cluster")]
        let log = match &shared.cluster {
            Some(node) => {
                let path = storage::db_path(&shared.config.data_dir, key);
                let log = node.activate(key, &path).await;
                self.elsewhere = matches!(log, Err(Error::Moved(_)));
                Some((node.clone(), log?))
            }
            None => None,
        };
        // A new agent's file is made holding no `opening` permit: copying the template and
        // syncing the copy mostly wait for the disk. When a permit is free, the open comes first
        // (a wake: one hop), and says when there is no file; when others hold them all, the file
        // is made (if new) while this waits for one.
        let create = || {
            let (maker, k) = (shared.clone(), key.clone());
            blocking(move || {
                let config = &maker.config;
                storage::create(&config.data_dir, &k, config.durability, Some(&maker.spares))
            })
        };
        let acquire = || async { shared.opening.acquire().await.map_err(|_| Error::Shutdown) };
        let mut made = false;
        let mut held = shared.opening.try_acquire().ok();
        if held.is_none() {
            let (new, permit) = tokio::join!(create(), acquire());
            made = true;
            new?;
            held = Some(permit?);
        }
        // The file's lock may be held a moment (the instance before this one is closing it) or
        // longer (another process): try again every millisecond, for `LOCK_WAIT`, holding no
        // `opening` permit meanwhile, so that other agents open as usual.
        let waiting = std::time::Instant::now();
        let storage::Opened {
            conn,
            wal,
            dir_unsynced,
            guard,
            created,
            path,
        } = loop {
            let permit = match held.take() {
                Some(permit) => permit,
                None => acquire().await?,
            };
            let (opener, k) = (shared.clone(), key.clone());
            let opened = blocking(move || {
                let config = &opener.config;
                storage::open(&config.data_dir, &k, config.durability, config.locking)
            })
            .await;
            drop(permit);
            match opened {
                Ok(None) if !made => {
                    made = true;
                    create().await?;
                }
                Err(e) if storage::is_busy(&e) && waiting.elapsed() < LOCK_WAIT => {
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                opened => {
                    let gone =
                        || Error::Internal(format!("the database of {key} went as it was made"));
                    break opened?.ok_or_else(gone)?;
                }
            }
        };
        let gate: Arc<dyn CommitGate> = match wal {
            Some(wal) => {
                let dir = dir_unsynced.then(|| path.parent().expect("a file's").to_owned());
                Arc::new(WalSync::new(wal, dir))
            }
            None => Arc::new(NoSync),
        };
        #[cfg(feature = "cluster")]
        let gate: Arc<dyn CommitGate> = match log {
            Some((node, log)) => {
                self.replicated = true;
                Arc::new(node.gate(log, &path))
            }
            None => gate,
        };
        if !gate.is_open() {
            self.syncer = Some(Syncer::start(gate.clone(), sync.clone()));
        }
        self.gate = Some(gate);
        let page_size: u64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
        let limit = storage::checkpoint_wal_bytes(shared.config.durability, self.replicated);
        self.checkpoint_at = storage::wal_frames_for(limit, page_size);
        // Counted from the WAL's start: a WAL a crash left behind is covered by the first range
        // a gate is told of (a clean close leaves it empty).
        self.wal_frames = 0;
        storage::guard_transaction(&conn, self.in_handler.clone());
        *slot = Some(Database::new(conn));
        self.guard = guard;
        self.database = Some(database);
        self.unused = created;
        self.uncataloged = created;
        self.checked = false;
        self.path = path;
        Ok(())
    }

    /// Tells the catalog of `key`, created by this instance, once an event on it succeeded.
    pub(super) fn catalog_if_used(&mut self, shared: &Shared, key: &AgentKey) {
        if self.uncataloged && !self.unused {
            self.uncataloged = false;
            shared.catalog.created(key, shared.config.clock.now_ms());
        }
    }

    /// Opens the batch transaction if it is not open.
    pub(super) fn begin(&mut self, conn: &Connection) -> Result<(), Error> {
        if !self.in_txn {
            conn.prepare_cached("BEGIN")?.execute([])?;
            self.in_txn = true;
        }
        Ok(())
    }

    /// Whether the batch transaction is open.
    pub(super) fn in_txn(&self) -> bool {
        self.in_txn
    }

    /// Whether SQLite ended the batch transaction by itself (an I/O error, a full disk,
    /// `INSERT OR ROLLBACK`): every event of the batch so far lost its writes. (Handlers cannot
    /// end it: see `storage::guard_transaction`.)
    pub(super) fn lost_txn(&mut self, conn: &Connection) -> bool {
        let lost = self.in_txn && conn.is_autocommit();
        if lost {
            self.in_txn = false;
        }
        lost
    }

    /// Rolls the batch transaction back.
    pub(super) fn rollback(&mut self, conn: &Connection) {
        self.in_txn = false;
        let _ = conn.execute_batch("ROLLBACK");
    }

    /// Commits the batch transaction (a write into the WAL: cheap enough for the async worker).
    pub(super) fn commit(&mut self, conn: &Connection) -> Result<Committed, Error> {
        self.in_txn = false;
        let start = self.wal_frames;
        if let Some(end) = storage::commit(conn)? {
            self.wal_frames = end;
        }
        Ok(Committed {
            frames: start..self.wal_frames,
        })
    }

    /// Releases `outbox` once what `committed` says is durable, and runs `after` (blocking)
    /// just before. A batch that wrote only the runtime's bookkeeping (`bookkeeping`), with
    /// nothing to release or to run, is made durable by the next sync rather than its own.
    pub(super) async fn seal(
        &self,
        outbox: Outbox,
        committed: Committed,
        after: Option<AfterDurable>,
        bookkeeping: bool,
    ) {
        match &self.syncer {
            Some(syncer) if bookkeeping && outbox.is_empty() && after.is_none() => {
                syncer.defer(committed)
            }
            Some(syncer) => syncer.send(outbox, committed, after),
            None => {
                if let Some(after) = after {
                    let _ = blocking(move || {
                        after();
                        Ok(())
                    })
                    .await;
                }
                release(outbox)
            }
        }
    }

    /// Runs user code: the database refuses transaction control meanwhile.
    pub(super) async fn user_code<T>(&self, code: impl std::future::Future<Output = T>) -> T {
        self.in_handler.store(true, Ordering::Relaxed);
        let result = code.await;
        self.in_handler.store(false, Ordering::Relaxed);
        result
    }

    /// Checkpoints on a blocking thread once the WAL has grown past its limit, after every
    /// batch before it is durable (a gate may read their frames until then).
    pub(super) async fn checkpoint_if_large(&mut self, slot: &mut Option<Database>) {
        // The WAL's file is kept for the frames to come, unless a replicator reads it.
        self.checkpoint_from(self.checkpoint_at, self.replicated, slot)
            .await;
    }

    /// Gives back what the open database needs only while the agent is busy (see
    /// `Builder::quiet_after`): SQLite's caches, and the WAL index once the WAL is checkpointed
    /// (not in cluster mode, where every checkpoint stores a snapshot).
    pub(super) async fn quiet(&mut self, slot: &mut Option<Database>) {
        if !self.replicated {
            // Emptied: a quiet agent keeps no WAL on disk either.
            self.checkpoint_from(1, true, slot).await;
        }
        if let Some(conn) = slot {
            conn.forget_statements();
            conn.flush_prepared_statement_cache();
            if let Err(e) = conn.release_memory() {
                tracing::debug!("releasing SQLite's memory: {e}");
            }
            #[cfg(target_os = "linux")]
            if self.wal_frames == 0 {
                crate::vfs::release_index(conn);
            }
        }
    }

    /// Checkpoints on a blocking thread if the WAL holds `frames` or more, once every batch
    /// before is durable (a gate may read their frames until then); `truncate`: and empties the
    /// WAL's file.
    async fn checkpoint_from(&mut self, frames: u32, truncate: bool, slot: &mut Option<Database>) {
        if self.wal_frames < frames {
            return;
        }
        if let Some(syncer) = &self.syncer {
            syncer.drain().await;
        }
        let Some(conn) = slot.take() else {
            return;
        };
        // On a panic the connection is lost with the task: the next event reopens the database.
        let (gate, durable_wal) = (self.gate.clone(), self.durable_wal());
        let checkpointed = move || {
            let result = storage::checkpoint(&conn, truncate, durable_wal);
            let result = match (result, gate) {
                (Ok(()), Some(gate)) => gate.checkpointed(),
                (result, _) => result,
            };
            Ok((result, conn))
        };
        match blocking(checkpointed).await {
            Ok((result, conn)) => {
                match result {
                    Ok(()) => self.wal_frames = 0,
                    Err(e) => tracing::warn!("checkpoint failed (the WAL keeps growing): {e}"),
                }
                *slot = Some(conn);
            }
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// Whether every frame of the WAL is durable (asked once every batch is: see
    /// `CommitGate::wal_is_durable`).
    fn durable_wal(&self) -> bool {
        self.gate.as_ref().is_some_and(|g| g.wal_is_durable())
    }

    /// What makes a commit durable, while the database is open.
    pub(super) fn gate(&self) -> Option<Arc<dyn CommitGate>> {
        self.gate.clone()
    }

    /// Whether the open database stopped being a copy of the agent's durable state (see
    /// `CommitGate::is_lost`): it must be closed and dropped; or the agent could not be
    /// taken, being another node's.
    pub(super) fn is_lost(&self) -> bool {
        self.elsewhere || self.gate.as_ref().is_some_and(|g| g.is_lost())
    }

    /// Waits for every reply to be released, then closes the database of `key` on a blocking
    /// thread, and tells the catalog its figures.
    pub(super) async fn close(
        &mut self,
        slot: &mut Option<Database>,
        shared: &Arc<Shared>,
        key: &AgentKey,
    ) {
        if let Some(syncer) = self.syncer.take() {
            syncer.finish().await;
        }
        self.in_txn = false;
        if let Some(conn) = slot.take() {
            let cataloged = !std::mem::take(&mut self.uncataloged);
            let count = std::mem::take(&mut self.schedules_seen);
            let (closer, key, path) = (shared.clone(), key.clone(), self.path.clone());
            let durable_wal = self.durable_wal();
            let closed = blocking(move || {
                let counts = count.then(|| catalog::counts(&conn));
                storage::close(conn.into_connection(), durable_wal)?;
                let figures = Figures {
                    at_ms: closer.config.clock.now_ms(),
                    size: catalog::files_size(&path),
                    counts,
                };
                if cataloged {
                    closer.catalog.closed(&key, figures);
                }
                Ok(())
            });
            if let Err(e) = closed.await {
                tracing::warn!("closing the database: {e}");
            }
        }
        self.guard = None; // only once the connection is closed
        self.database = None;
        if std::mem::take(&mut self.gate).is_some_and(|g| g.is_lost()) {
            // Cluster mode: the local copy holds writes that are not the agent's (they were
            // refused, or may not have been kept): it goes, and the agent's next activation
            // restores it from its log.
            let (data_dir, lost) = (shared.config.data_dir.clone(), key.clone());
            if let Err(e) = blocking(move || storage::remove(&data_dir, &lost)).await {
                tracing::error!("dropping a lost agent's local copy: {e}");
            }
        }
    }
}

/// How long opening a database waits for another holder of its lock to let it go.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long opening a database waits for another to close when `max_live_agents` are open.
const DATABASE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A permit to open a database: at once if fewer than `max_live_agents` are open, or once the
/// least recently used agent, asked to hibernate, has closed its own.
async fn open_database_permit(
    shared: &Arc<Shared>,
) -> Result<tokio::sync::OwnedSemaphorePermit, Error> {
    if let Ok(permit) = shared.databases.clone().try_acquire_owned() {
        return Ok(permit);
    }
    shared.make_room();
    match tokio::time::timeout(DATABASE_WAIT, shared.databases.clone().acquire_owned()).await {
        Ok(permit) => permit.map_err(|_| Error::Shutdown),
        Err(_) => Err(Error::Overloaded(format!(
            "{} agents are live, the most this runtime keeps, and none hibernated within {DATABASE_WAIT:?}",
            shared.config.max_live
        ))),
    }
}

/// Opens the savepoint of one event (see `storage::RUNTIME_SAVEPOINTS`).
pub(super) fn savepoint(db: &Database) -> Result<(), Failure> {
    db.savepoint()
        .map_err(|e| Failure::runtime("could not open a savepoint", e))
}

/// Ends the savepoint of one event: `Ok` releases it, `Err` rolls it back first.
pub(super) fn end_savepoint<T>(db: &Database, result: Result<T, Failure>) -> Result<T, Failure> {
    let end = if result.is_ok() {
        db.release()
    } else {
        db.roll_back()
    };
    end.map_err(|e| Failure::runtime("could not end the event's savepoint", e))?;
    result
}
