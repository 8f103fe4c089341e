//! One live agent: the task that owns the struct and its database and drains its mailbox.
//!
//! The task takes a *batch* of events (whatever is queued, up to `max_batch`), runs each in
//! its own savepoint inside one transaction, and commits once. Under `Durability::Full` the
//! replies then go to the instance's syncer, which fsyncs the WAL on a blocking thread and
//! only then releases them (the output gate); meanwhile the agent takes its next batch, and the
//! next sync covers every batch committed while the previous one ran (group commit). Handlers
//! run one at a time to completion, awaits included: the single writer.

use std::{
    any::Any,
    fs::File,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use agents_client::{ErrorKind, RawError};
use futures_util::FutureExt;
use rusqlite::Connection;
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tracing::Instrument;

use crate::{
    address::AgentKey,
    agent::AgentClass,
    context::Ctx,
    error::Error,
    registry::{CallEvent, Event, Reply, Shared},
    storage::{self, Durability},
};

/// Starts an instance of `A` for `key` reading `rx`.
pub(crate) fn spawn<A: AgentClass>(
    shared: Arc<Shared>,
    key: AgentKey,
    generation: u64,
    rx: mpsc::Receiver<Event>,
) {
    let span = tracing::debug_span!("agent", class = key.class(), name = key.name());
    let instance = Instance::<A> {
        agent: None,
        ctx: Ctx::new(shared.clone(), key),
        generation,
        in_txn: false,
        wal: None,
        syncer: None,
        in_handler: Arc::default(),
    };
    shared.tracker.spawn(instance.run(rx).instrument(span));
}

struct Instance<A> {
    /// `None` until created (and again after a panic or a failed commit).
    agent: Option<A>,
    ctx: Ctx<A>,
    generation: u64,
    /// Whether the batch transaction is open.
    in_txn: bool,
    /// The open database's WAL file (to sync, and to watch its size).
    wal: Option<Arc<File>>,
    /// Releases replies once their commit is synced (`Durability::Full` only).
    syncer: Option<Syncer>,
    /// Set while user code runs: the database then refuses transaction control.
    in_handler: Arc<AtomicBool>,
}

/// The syncer of one open database: a task that fsyncs the WAL and then releases the replies
/// of every commit that the sync covers.
struct Syncer {
    tx: mpsc::UnboundedSender<Outbox>,
    task: tokio::task::JoinHandle<()>,
}

impl Syncer {
    fn start(wal: Arc<File>) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Outbox>();
        let task = tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut covered = vec![first];
                while let Ok(more) = rx.try_recv() {
                    covered.push(more);
                }
                let wal = wal.clone();
                let synced = tokio::task::spawn_blocking(move || wal.sync_data())
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e)));
                for outbox in covered {
                    match &synced {
                        Ok(()) => release(outbox),
                        Err(e) => {
                            tracing::error!("fsync of the WAL failed: {e}");
                            fail(
                                outbox,
                                &RawError::internal(format!(
                                    "the write may not be durable: fsync failed: {e}"
                                )),
                            );
                        }
                    }
                }
            }
        });
        Syncer { tx, task }
    }
}

fn release(outbox: Outbox) {
    for (tx, reply) in outbox {
        let _ = tx.send(reply);
    }
}

fn fail(outbox: Outbox, error: &RawError) {
    for (tx, _) in outbox {
        let _ = tx.send(Err(error.clone()));
    }
}

type Outbox = Vec<(oneshot::Sender<Reply>, Reply)>;

impl<A: AgentClass> Instance<A> {
    async fn run(mut self, mut rx: mpsc::Receiver<Event>) {
        let idle = self.ctx.shared.config.idle_timeout;
        loop {
            let first = match tokio::time::timeout(idle, rx.recv()).await {
                Ok(Some(event)) => event,
                Ok(None) => break, // the runtime shut down and the mailbox is drained
                Err(_) => {
                    if self
                        .ctx
                        .shared
                        .detach(self.ctx.key(), self.generation, &mut rx, false)
                    {
                        tracing::debug!("hibernating after {idle:?} idle");
                        hand_over(&self.ctx.shared, self.ctx.key(), rx).await;
                        break;
                    }
                    continue;
                }
            };
            if let Some(done) = self.run_batch(first, &mut rx).await {
                tracing::debug!("hibernating on request");
                self.ctx
                    .shared
                    .detach(self.ctx.key(), self.generation, &mut rx, true);
                hand_over(&self.ctx.shared, self.ctx.key(), rx).await;
                self.close_db().await;
                let _ = done.send(());
                return;
            }
        }
        self.close_db().await;
    }

    /// Runs `first` and whatever else is queued, commits once, then releases the replies.
    /// Returns the hibernation request that ended the batch, if one did.
    async fn run_batch(
        &mut self,
        first: Event,
        rx: &mut mpsc::Receiver<Event>,
    ) -> Option<oneshot::Sender<()>> {
        let max_batch = self.ctx.shared.config.max_batch;
        let mut outbox = Outbox::new();
        let mut next = Some(first);
        let mut hibernate = None;
        let mut yielded = false;
        while let Some(event) = next.take() {
            match event {
                Event::Call(call) => {
                    self.call(call, &mut outbox).await;
                    if self.in_txn && self.ctx.sql().is_autocommit() {
                        // SQLite rolled the whole transaction back by itself (an I/O error, a
                        // full disk, `INSERT OR ROLLBACK`): every event of the batch so far lost
                        // its writes. (Handlers cannot end it: see `storage::guard_transaction`.)
                        self.in_txn = false;
                        self.agent = None;
                        let lost = RawError::internal(
                            "SQLite rolled the transaction back (an I/O error or an ON CONFLICT ROLLBACK clause); nothing of this call was written",
                        );
                        fail(std::mem::take(&mut outbox), &lost);
                    }
                }
                Event::Hibernate(done) => {
                    hibernate = Some(done);
                    break;
                }
            }
            if outbox.len() >= max_batch {
                break;
            }
            next = rx.try_recv().ok();
            if next.is_none() && !yielded {
                // Callers released by the last sync are re-sending right now: give them one
                // scheduler round to join this commit rather than the next one.
                yielded = true;
                tokio::task::yield_now().await;
                next = rx.try_recv().ok();
            }
        }
        if !self.in_txn {
            release(outbox); // nothing ran, nothing to make durable
            return hibernate;
        }
        match self.commit() {
            Err(e) => {
                tracing::error!("commit failed, the batch is rolled back: {e}");
                // Memory may hold what storage lost: re-create the agent from storage.
                self.agent = None;
                fail(
                    outbox,
                    &RawError::internal(format!("the commit failed, nothing was written: {e}")),
                );
            }
            Ok(()) => match &self.syncer {
                Some(syncer) => {
                    if let Err(mpsc::error::SendError(outbox)) = syncer.tx.send(outbox) {
                        fail(outbox, &RawError::internal("the syncer stopped"));
                    }
                }
                None => release(outbox),
            },
        }
        self.checkpoint_if_large().await;
        hibernate
    }

    async fn call(&mut self, call: CallEvent, outbox: &mut Outbox) {
        let CallEvent {
            inv,
            reply,
            chain,
            deadline,
        } = call;
        if reply.is_closed() {
            return; // the caller gave up before the call ran: nothing to do
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let e = RawError::new(
                ErrorKind::Timeout,
                format!("`{}` was dequeued after its deadline", inv.method()),
            );
            outbox.push((reply, Err(e)));
            return;
        }
        self.ctx.chain = chain.push(self.ctx.key().clone());
        let span = tracing::debug_span!("call", method = inv.method());
        let result = async {
            self.begin().await.map_err(RawError::internal)?;
            self.ensure_started().await?;
            let agent = self.agent.as_mut().expect("started");
            savepoint(self.ctx.sql())?;
            self.in_handler.store(true, Ordering::Relaxed);
            let (result, panicked) = catch_panic(agent.dispatch(&mut self.ctx, &inv)).await;
            self.in_handler.store(false, Ordering::Relaxed);
            if panicked {
                self.agent = None;
            }
            end_savepoint(self.ctx.sql(), result)
        }
        .instrument(span)
        .await;
        if let Err(e) = &result {
            tracing::debug!(kind = %e.kind, "call failed: {}", e.message);
        }
        outbox.push((reply, result));
    }

    /// Creates the agent and runs `on_start`, if it is not live.
    async fn ensure_started(&mut self) -> Result<(), RawError> {
        if self.agent.is_some() {
            return Ok(());
        }
        let mut agent = A::default();
        savepoint(self.ctx.sql())?;
        let start = async {
            agent
                .on_start(&mut self.ctx)
                .await
                .map_err(|e| RawError::internal(format!("on_start failed: {e}")))
        };
        self.in_handler.store(true, Ordering::Relaxed);
        let (result, _) = catch_panic(start).await;
        self.in_handler.store(false, Ordering::Relaxed);
        end_savepoint(self.ctx.sql(), result)?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Opens the database if needed and the batch transaction if needed.
    async fn begin(&mut self) -> Result<(), Error> {
        if self.ctx.conn.is_none() {
            let shared = self.ctx.shared.clone();
            let key = self.ctx.key().clone();
            let (conn, wal) = tokio::task::spawn_blocking(move || {
                storage::open(&shared.config.data_dir, &key, shared.config.durability)
            })
            .await
            .map_err(|e| Error::Io {
                path: self.ctx.shared.config.data_dir.clone(),
                source: std::io::Error::other(e),
            })??;
            let wal = Arc::new(wal);
            if self.ctx.shared.config.durability == Durability::Full {
                self.syncer = Some(Syncer::start(wal.clone()));
            }
            storage::guard_transaction(&conn, self.in_handler.clone());
            self.wal = Some(wal);
            self.ctx.conn = Some(conn);
        }
        if !self.in_txn {
            self.ctx.sql().prepare_cached("BEGIN")?.execute([])?;
            self.in_txn = true;
        }
        Ok(())
    }

    /// Commits the batch transaction. SQLite does not sync here (see `Durability`): this is a
    /// write into the WAL, cheap enough for the async worker.
    fn commit(&mut self) -> Result<(), Error> {
        self.in_txn = false;
        let conn = self.ctx.sql();
        let result = conn
            .prepare_cached("COMMIT")
            .and_then(|mut s| s.execute([]));
        if result.is_err() && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        result.map(drop).map_err(Error::from)
    }

    /// Checkpoints on a blocking thread once the WAL has grown past its limit.
    async fn checkpoint_if_large(&mut self) {
        let size = self
            .wal
            .as_ref()
            .and_then(|w| w.metadata().ok())
            .map_or(0, |m| m.len());
        if size < storage::CHECKPOINT_WAL_BYTES {
            return;
        }
        let conn = self.ctx.conn.take().expect("open after a commit");
        let (conn, result) = tokio::task::spawn_blocking(move || {
            let result = storage::checkpoint(&conn);
            (conn, result)
        })
        .await
        .expect("checkpoint does not panic");
        if let Err(e) = result {
            tracing::warn!("checkpoint failed (the WAL keeps growing): {e}");
        }
        self.ctx.conn = Some(conn);
    }

    /// Waits for the syncer to release every reply, then closes the database on a blocking thread.
    async fn close_db(&mut self) {
        if let Some(syncer) = self.syncer.take() {
            drop(syncer.tx);
            let _ = syncer.task.await;
        }
        self.wal = None;
        if let Some(conn) = self.ctx.conn.take() {
            match tokio::task::spawn_blocking(move || storage::close(conn)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("closing the database: {e}"),
                Err(e) => tracing::warn!("closing the database panicked: {e}"),
            }
        }
    }
}

/// Passes events that reached a detached mailbox on to the next instance of `key`.
async fn hand_over(shared: &Arc<Shared>, key: &AgentKey, mut rx: mpsc::Receiver<Event>) {
    while let Some(event) = rx.recv().await {
        if let Err((e, event)) = shared.route(key, event).await {
            event.abandon(RawError::internal(e));
        }
    }
}

/// Opens the savepoint of one event (`storage::EVENT_SAVEPOINT`).
fn savepoint(conn: &Connection) -> Result<(), RawError> {
    conn.prepare_cached("SAVEPOINT agents_event")
        .and_then(|mut s| s.execute([]))
        .map(drop)
        .map_err(|e| RawError::internal(format!("could not open a savepoint: {e}")))
}

/// Ends the savepoint of one event: `Ok` releases it, `Err` rolls it back first.
fn end_savepoint<T>(conn: &Connection, result: Result<T, RawError>) -> Result<T, RawError> {
    let end = if result.is_ok() {
        conn.prepare_cached("RELEASE agents_event")
            .and_then(|mut s| s.execute([]))
            .map(drop)
    } else {
        conn.execute_batch("ROLLBACK TO agents_event; RELEASE agents_event")
    };
    end.map_err(|e| RawError::internal(format!("could not end the event's savepoint: {e}")))?;
    result
}

/// Runs a handler, turning a panic into an `internal` error. Returns whether it panicked.
async fn catch_panic<T>(
    handler: impl Future<Output = Result<T, RawError>>,
) -> (Result<T, RawError>, bool) {
    match AssertUnwindSafe(handler).catch_unwind().await {
        Ok(result) => (result, false),
        Err(panic) => {
            let message = panic_message(&*panic);
            tracing::error!("handler panicked: {message}");
            (
                Err(RawError::internal(format!(
                    "the handler panicked: {message}"
                ))),
                true,
            )
        }
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".to_owned()
    }
}
