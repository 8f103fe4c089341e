//! The output gate: what a batch of events answers and sends (its *outbox*) is released only
//! once the batch is durable, and what "durable" means is a [`CommitGate`].
//!
//! A gate that must be waited for (the WAL's fsync under `Durability::Full`) gets a [`Syncer`]
//! per open database: a sync on a blocking thread, started by a batch committed while none runs,
//! that takes the outboxes of the batches committed so far, makes them durable with one
//! [`CommitGate::make_durable`] (group commit, while the agent goes on), and then releases them
//! from there, or fails every reply they hold if that failed.
//! A gate that is open as soon as a batch committed (`Durability::Normal`: [`NoSync`]) has no
//! syncer: the instance releases the outbox at once. (As workerd's actor-sqlite lets the output
//! gate wait on a commit callback.)

use std::{
    fs::File,
    ops::Range,
    path::PathBuf,
    sync::{
        atomic::{AtomicU8, Ordering},
        Arc, Mutex,
    },
};

use agents_client::{BoxFuture, RawError, RawStream};
use tokio::sync::oneshot;

use prometheus::Histogram;

use crate::{
    address::AgentKey,
    agent::HttpResponse,
    conn::Effect,
    error::Error,
    lock::lock,
    metrics::Timed,
    registry::{Reply, ReplyTo, Shared},
    stream::Returned,
};

/// What batches committed to an agent's database: the WAL frames they appended, by SQLite's
/// frame numbers in the current WAL (frame `n` is at byte `32 + (n - 1) × (24 + page size)`
/// of the `-wal` file). The WAL is emptied only by a checkpoint, which waits until every batch
/// before it was made durable: the frames a gate is told of are in the file while it runs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Committed {
    /// Frames `start + 1 ..= end` (empty when the batches wrote nothing).
    pub frames: Range<u32>,
}

impl Committed {
    /// What this and the `later` batches committed together.
    fn and(&mut self, later: &Committed) {
        if self.frames.is_empty() {
            self.frames = later.frames.clone();
        } else if !later.frames.is_empty() {
            self.frames.end = later.frames.end;
        }
    }
}

/// What makes the batches an agent committed to its database durable. Blocking: it runs on a
/// blocking thread, and is told what the batches it covers committed.
///
/// The local WAL's fsync is one ([`WalSync`]), and no wait at all is the other ([`NoSync`]); a
/// replicator that ships the committed WAL frames elsewhere is the next: it reads `committed`'s
/// frames from the WAL and returns once they are stored there.
pub(crate) trait CommitGate: Send + Sync + 'static {
    /// Whether a batch is durable as soon as it committed: its outbox is released at once, by
    /// the agent (no syncer, no thread hop).
    fn is_open(&self) -> bool {
        false
    }

    /// Makes what `committed` describes durable (and every batch before it). Told of a batch
    /// that wrote nothing while every batch before it is durable, it says only whether what
    /// the batch read may be released, without blocking: it is then called on the agent's task.
    fn make_durable(&self, committed: &Committed) -> Result<(), Error>;

    /// The database was checkpointed (its file holds everything committed, its WAL is empty):
    /// a replicator stores it as a snapshot. Blocking.
    fn checkpointed(&self) -> Result<(), Error> {
        Ok(())
    }

    /// Whether every frame the local WAL holds is durable on this machine's disk, asked once
    /// every batch handed over is (after a drain): a checkpoint then syncs only the database's
    /// file, not the WAL again (see `storage::checkpoint`).
    fn wal_is_durable(&self) -> bool {
        false
    }

    /// Whether the agent's local database stopped being the durable state's copy (a batch
    /// it committed was refused, or may not have been kept): the instance must close it and
    /// drop it.
    fn is_lost(&self) -> bool {
        false
    }

    /// The agent is removed (destroyed, or never used; its files are gone): a replicator
    /// deletes what it stored of it. Blocking.
    fn removed(&self) -> Result<(), Error> {
        Ok(())
    }
}

/// Durable once the database's WAL is fsynced (`Durability::Full`).
pub(crate) struct WalSync {
    wal: File,
    /// The WAL's directory while an entry there is not durable (a new database's, a new WAL's):
    /// synced once, after the WAL's first sync (as SQLite does itself when it syncs a WAL it
    /// made).
    dir: Mutex<Option<PathBuf>>,
    /// Whether the WAL was synced since it was opened, and its directory if it had to be
    /// ([`SYNCED`]; what a crash left in it is durable from then on, as every sync covers the
    /// whole file), or a sync of the WAL failed ([`FAILED`], for good: what the failed sync
    /// held may be lost, whatever a later one says).
    synced: AtomicU8,
}

/// [`WalSync::synced`]: a sync succeeded, and none failed.
const SYNCED: u8 = 1;
/// [`WalSync::synced`]: a sync failed.
const FAILED: u8 = 2;

impl WalSync {
    /// Syncs `wal`, and once `dir` (if it holds new entries).
    pub fn new(wal: File, dir: Option<PathBuf>) -> Self {
        WalSync {
            wal,
            dir: Mutex::new(dir),
            synced: Default::default(),
        }
    }
}

impl CommitGate for WalSync {
    fn make_durable(&self, committed: &Committed) -> Result<(), Error> {
        if committed.frames.is_empty() {
            // Nothing new in the WAL: what the batches before wrote was synced by theirs.
            return Ok(());
        }
        let failed = |e| {
            self.synced.store(FAILED, Ordering::Relaxed);
            Error::Internal(format!("fsync failed: {e}"))
        };
        self.wal.sync_data().map_err(failed)?;
        let mut dir = lock(&self.dir);
        if let Some(path) = dir.as_ref() {
            crate::storage::sync_path(path)?;
            *dir = None;
        }
        // Durable as SQLite's own sync would leave it only now: that sync of a WAL it made
        // also syncs the directory, and a checkpoint that skips it relies on this one.
        let _ = self
            .synced
            .compare_exchange(0, SYNCED, Ordering::Relaxed, Ordering::Relaxed);
        Ok(())
    }

    /// Every batch was synced by the time this is asked (a drain waited for them), so the
    /// WAL's frames are durable if a sync since the open covered what was there before it and
    /// none failed.
    fn wal_is_durable(&self) -> bool {
        self.synced.load(Ordering::Relaxed) == SYNCED
    }
}

/// Durable enough once committed: the write reached the operating system
/// (`Durability::Normal`).
pub(crate) struct NoSync;

impl CommitGate for NoSync {
    fn is_open(&self) -> bool {
        true
    }

    fn make_durable(&self, _: &Committed) -> Result<(), Error> {
        Ok(())
    }
}

/// Who waits for an event's outcome.
pub(crate) enum Responder {
    /// A call, the stream it returned if it was a streaming callable, and its end-to-end
    /// latency's measure.
    Call(ReplyTo, Option<RawStream>, Timed),
    /// A hook whose caller waits for its outcome (`on_connect`).
    Hook(oneshot::Sender<Reply>),
    Done(Option<oneshot::Sender<()>>),
    /// Frames for the agent's connections.
    Frames(Arc<Shared>, AgentKey, Vec<Effect>),
    /// Work `ctx.spawn` started, to run once the event is durable.
    Spawn(Vec<BoxFuture<'static, ()>>),
    /// An HTTP request and the response `on_request` made.
    Request(
        oneshot::Sender<Result<HttpResponse, RawError>>,
        Option<HttpResponse>,
    ),
}

/// What a batch answers and sends, each with its event's outcome.
pub(crate) type Outbox = Vec<(Responder, Reply)>;

/// What to do once a batch is durable, before its outbox is released (blocking).
pub(crate) type AfterDurable = Box<dyn FnOnce() + Send>;

/// Releases an outbox: replies go to their callers, frames to their sockets (if their event
/// succeeded), spawned work starts.
pub(crate) fn release(outbox: Outbox) {
    for (to, reply) in outbox {
        match to {
            Responder::Call(to, stream, timed) => {
                to.send(reply.map(|value| match stream {
                    Some(stream) => Returned::Stream(stream),
                    None => Returned::Value(value),
                }));
                timed.stop();
            }
            Responder::Hook(tx) => {
                let _ = tx.send(reply);
            }
            Responder::Done(Some(tx)) => {
                let _ = tx.send(());
            }
            Responder::Done(None) => {}
            Responder::Frames(shared, key, effects) => {
                if reply.is_ok() {
                    shared.sockets.deliver(&key, effects);
                }
            }
            Responder::Spawn(work) => {
                if reply.is_ok() {
                    work.into_iter().for_each(|w| drop(tokio::spawn(w)));
                }
            }
            Responder::Request(tx, response) => {
                let response = reply.and_then(|_| {
                    response.ok_or_else(|| RawError::internal("on_request made no response"))
                });
                let _ = tx.send(response);
            }
        }
    }
}

/// Releases an outbox with `error` as every event's outcome: nothing of it is sent.
pub(crate) fn fail(outbox: Outbox, error: &RawError) {
    release(
        outbox
            .into_iter()
            .map(|(to, _)| (to, Err(error.clone())))
            .collect(),
    );
}

/// The syncer of one open database: releases each committed batch's outbox once its
/// [`CommitGate`] made it durable; one `make_durable` covers every batch committed meanwhile.
///
/// No task waits for batches: the first batch handed over while none is being synced starts a
/// sync on a blocking thread, which releases the replies from there (no hop back to a worker),
/// and then starts the next sync if batches were committed meanwhile.
pub(crate) struct Syncer(Arc<SyncState>);

struct SyncState {
    gate: Arc<dyn CommitGate>,
    /// Each `make_durable`'s time.
    sync: Histogram,
    queue: Mutex<Queue>,
}

/// What waits for the syncer.
#[derive(Default)]
struct Queue {
    /// Batches committed and not yet taken by a sync.
    sealed: Vec<Sealed>,
    /// A sync runs (or waits for a blocking thread); the next one takes `sealed`.
    running: bool,
    /// Who waits for every batch handed over to be released.
    idle: Vec<oneshot::Sender<()>>,
}

/// A committed batch as the syncer takes it.
struct Sealed {
    outbox: Outbox,
    committed: Committed,
    after: Option<AfterDurable>,
}

impl Syncer {
    /// A syncer for `gate`, timing each `make_durable` into `sync`.
    pub fn start(gate: Arc<dyn CommitGate>, sync: Histogram) -> Self {
        Syncer(Arc::new(SyncState {
            gate,
            sync,
            queue: Mutex::default(),
        }))
    }

    /// Hands over the outbox of a batch that just committed what `committed` says (and what to
    /// do once it is durable). A batch that wrote nothing, handed over while every batch before
    /// it is durable, is released at once (if the gate agrees: see `CommitGate::make_durable`).
    pub fn send(&self, outbox: Outbox, committed: Committed, after: Option<AfterDurable>) {
        let sealed = Sealed {
            outbox,
            committed,
            after,
        };
        let mut queue = lock(&self.0.queue);
        let read_only = sealed.committed.frames.is_empty() && sealed.after.is_none();
        if read_only && !queue.running && queue.sealed.is_empty() {
            drop(queue);
            return self.0.sync(vec![sealed]);
        }
        queue.sealed.push(sealed);
        if !std::mem::replace(&mut queue.running, true) {
            drop(queue);
            self.0.clone().start();
        }
    }

    /// Hands over a batch that has nothing to release and nothing to run once durable (only the
    /// runtime's own bookkeeping): no sync starts for it; the next one covers it (a later
    /// batch's, a drain's, or the one `finish` starts). If it is lost in a crash meanwhile,
    /// nobody was told of it. What waits so is bounded by the WAL: once it outgrows its
    /// checkpoint size, the checkpoint's drain syncs it.
    pub fn defer(&self, committed: Committed) {
        lock(&self.0.queue).sealed.push(Sealed {
            outbox: Outbox::new(),
            committed,
            after: None,
        });
    }

    /// Waits until every batch handed over so far is durable (or failed to be).
    pub async fn drain(&self) {
        let (done, drained) = oneshot::channel();
        let after: AfterDurable = Box::new(move || {
            let _ = done.send(());
        });
        let committed = Committed::default();
        self.send(Outbox::new(), committed, Some(after));
        let _ = drained.await;
    }

    /// Waits until every batch handed over is durable (a deferred one too) and its outbox
    /// released.
    pub async fn finish(self) {
        let (idle, start) = {
            let mut queue = lock(&self.0.queue);
            let start = !queue.running && !queue.sealed.is_empty();
            if !queue.running && !start {
                return;
            }
            queue.running = true;
            let (tx, rx) = oneshot::channel();
            queue.idle.push(tx);
            (rx, start)
        };
        if start {
            self.0.clone().start();
        }
        let _ = idle.await;
    }
}

impl SyncState {
    /// Syncs and releases what is queued, on a blocking thread.
    fn start(self: Arc<Self>) {
        drop(tokio::task::spawn_blocking(move || self.run()));
    }

    /// Syncs and releases the batches queued (on a blocking thread). The batches committed
    /// meanwhile are synced next on the blocking pool again, behind the work that waits there:
    /// a busy agent does not keep a thread to itself.
    fn run(self: Arc<Self>) {
        let covered = std::mem::take(&mut lock(&self.queue).sealed);
        self.sync(covered);
        let mut queue = lock(&self.queue);
        if !queue.sealed.is_empty() {
            drop(queue);
            return self.start();
        }
        queue.running = false;
        for idle in queue.idle.drain(..) {
            let _ = idle.send(());
        }
    }

    /// Makes `covered` durable with one `make_durable` (timed into the histogram if they wrote
    /// anything), runs what follows it, and releases their outboxes (or fails them). The
    /// outboxes of a release that panicked are dropped (their callers are told that the agent
    /// is gone).
    fn sync(&self, covered: Vec<Sealed>) {
        let sync = std::panic::AssertUnwindSafe(|| self.sync_uncaught(covered));
        if std::panic::catch_unwind(sync).is_err() {
            tracing::error!("releasing a durable batch panicked");
        }
    }

    fn sync_uncaught(&self, mut covered: Vec<Sealed>) {
        let mut committed = Committed::default();
        covered.iter().for_each(|b| committed.and(&b.committed));
        let after: Vec<AfterDurable> = covered.iter_mut().filter_map(|b| b.after.take()).collect();
        let durable = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let started = std::time::Instant::now();
            self.gate.make_durable(&committed)?;
            if !committed.frames.is_empty() {
                self.sync.observe(started.elapsed().as_secs_f64());
            }
            after.into_iter().for_each(|a| a());
            Ok(())
        }))
        .unwrap_or_else(|_| Err(Error::Internal("making a batch durable panicked".into())))
        .map_err(|e| e.told("the write may not be durable"));
        for Sealed { outbox, .. } in covered {
            match &durable {
                Ok(()) => release(outbox),
                Err(e) => fail(outbox, e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex,
    };

    use agents_client::Payload;

    use super::*;

    /// A gate the test opens: `make_durable` waits for a permit, then answers as told.
    struct Held {
        permits: Mutex<std::sync::mpsc::Receiver<Result<(), Error>>>,
        calls: AtomicUsize,
        told: Mutex<Vec<Range<u32>>>,
    }

    impl CommitGate for Held {
        fn make_durable(&self, committed: &Committed) -> Result<(), Error> {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.told.lock().unwrap().push(committed.frames.clone());
            let permits = self.permits.lock().unwrap();
            permits.recv().unwrap_or(Err(Error::Shutdown))
        }
    }

    fn held() -> (Arc<Held>, std::sync::mpsc::Sender<Result<(), Error>>) {
        let (open, permits) = std::sync::mpsc::channel();
        let gate = Held {
            permits: Mutex::new(permits),
            calls: AtomicUsize::new(0),
            told: Mutex::default(),
        };
        (Arc::new(gate), open)
    }

    #[test]
    fn a_new_wal_syncs_its_directory_once_and_again_after_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let wal = File::create(dir.path().join("a-wal")).unwrap();
        let committed = Committed { frames: 0..1 };
        let gate = WalSync::new(wal, Some(dir.path().join("gone")));
        assert!(
            gate.make_durable(&committed).is_err(),
            "a directory that is not there"
        );
        assert!(lock(&gate.dir).is_some(), "kept for the next sync");
        *lock(&gate.dir) = Some(dir.path().to_owned());
        gate.make_durable(&committed).unwrap();
        assert!(lock(&gate.dir).is_none(), "synced once");
        gate.make_durable(&committed).unwrap();
    }

    #[test]
    fn a_wal_is_durable_once_synced_and_never_again_after_a_failed_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (some, none) = (Committed { frames: 0..1 }, Committed::default());
        let gate = WalSync::new(File::create(dir.path().join("a-wal")).unwrap(), None);
        assert!(!gate.wal_is_durable(), "not synced since the open");
        gate.make_durable(&none).unwrap();
        assert!(
            !gate.wal_is_durable(),
            "a batch that wrote nothing syncs nothing"
        );
        gate.make_durable(&some).unwrap();
        assert!(gate.wal_is_durable());
        // A pipe cannot be synced: the sync fails.
        let (_read, write) = std::io::pipe().unwrap();
        let gate = WalSync::new(File::from(std::os::fd::OwnedFd::from(write)), None);
        assert!(gate.make_durable(&some).is_err());
        assert!(!gate.wal_is_durable());
        // One that failed before (as the pipe's did) stays so, whatever later syncs say.
        let failed = WalSync::new(File::create(dir.path().join("b-wal")).unwrap(), None);
        failed.synced.store(FAILED, Ordering::Relaxed);
        failed.make_durable(&some).unwrap();
        assert!(!failed.wal_is_durable());
        // Its directory's new entries not synced (the sync failed), it is not durable yet; it is
        // once a later sync gets the directory synced too.
        let gone = dir.path().join("gone");
        let entries = WalSync::new(File::create(dir.path().join("c-wal")).unwrap(), Some(gone));
        assert!(entries.make_durable(&some).is_err());
        assert!(!entries.wal_is_durable(), "its directory is not synced");
        *lock(&entries.dir) = Some(dir.path().to_owned());
        entries.make_durable(&some).unwrap();
        assert!(entries.wal_is_durable());
    }

    /// A histogram for the syncer's timings.
    fn sync() -> Histogram {
        Histogram::with_opts(prometheus::HistogramOpts::new("sync", "test")).unwrap()
    }

    fn frames(frames: Range<u32>) -> Committed {
        Committed { frames }
    }

    /// A batch of one hook event that succeeded, and its caller's end.
    fn batch() -> (Outbox, oneshot::Receiver<Reply>) {
        let (tx, rx) = oneshot::channel();
        let ok = Ok(Payload::Json(serde_json::json!("ok")));
        (vec![(Responder::Hook(tx), ok)], rx)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reply_leaves_only_once_its_batch_is_durable() {
        let (gate, open) = held();
        let syncer = Syncer::start(gate.clone(), sync());
        let (outbox, mut reply) = batch();
        let (after_ran, after) = std::sync::mpsc::channel();
        let then: AfterDurable = Box::new(move || after_ran.send(()).unwrap());
        syncer.send(outbox, frames(0..2), Some(then));
        while gate.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(reply.try_recv().is_err(), "released before it was durable");
        assert!(after.try_recv().is_err());
        open.send(Ok(())).unwrap();
        assert!(reply.await.unwrap().is_ok());
        assert!(
            after.try_recv().is_ok(),
            "what follows durability ran before the release"
        );
        syncer.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_committed_meanwhile_share_one_sync_and_its_failure() {
        let (gate, open) = held();
        let syncer = Syncer::start(gate.clone(), sync());
        let (first, first_reply) = batch();
        syncer.send(first, frames(0..3), None);
        while gate.calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        // While the first sync runs, two more batches commit: the next sync covers both.
        let (second, second_reply) = batch();
        let (third, third_reply) = batch();
        syncer.send(second, frames(3..5), None);
        syncer.send(third, frames(5..9), None);
        open.send(Ok(())).unwrap();
        assert!(first_reply.await.unwrap().is_ok());
        open.send(Err(Error::Internal("the disk is gone".into())))
            .unwrap();
        // Both are told of the one failure, by one reference; the detail went to the log.
        let second = second_reply.await.unwrap().unwrap_err();
        let third = third_reply.await.unwrap().unwrap_err();
        assert!(second.message.contains("may not be durable"), "{second}");
        assert!(!second.message.contains("the disk is gone"), "{second}");
        assert_eq!(second, third);
        assert_eq!(gate.calls.load(Ordering::SeqCst), 2, "one sync for the two");
        // The gate was told which WAL frames each sync covers.
        assert_eq!(*gate.told.lock().unwrap(), [0..3, 3..9]);
        syncer.finish().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deferred_batch_starts_no_sync_and_the_next_sync_or_the_finish_covers_it() {
        let (gate, open) = held();
        let syncer = Syncer::start(gate.clone(), sync());
        syncer.defer(frames(0..2));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert_eq!(
            gate.calls.load(Ordering::SeqCst),
            0,
            "a sync for bookkeeping alone"
        );
        // The next batch's sync covers it.
        let (outbox, reply) = batch();
        syncer.send(outbox, frames(2..3), None);
        open.send(Ok(())).unwrap();
        assert!(reply.await.unwrap().is_ok());
        // A deferred batch that nothing follows is synced by the finish.
        syncer.defer(frames(3..5));
        open.send(Ok(())).unwrap();
        syncer.finish().await;
        assert_eq!(*gate.told.lock().unwrap(), [0..3, 3..5]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_that_wrote_nothing_is_released_at_once_unless_a_sync_is_due_before_it() {
        let (gate, open) = held();
        let syncer = Syncer::start(gate.clone(), sync());
        // Every batch before it is durable: the gate is asked on the spot, and the reply leaves.
        open.send(Ok(())).unwrap();
        let (read, mut reply) = batch();
        syncer.send(read, Committed::default(), None);
        assert!(
            reply.try_recv().unwrap().is_ok(),
            "released when handed over"
        );
        // A sync runs: what the batch read may be what that sync is making durable.
        let (write, write_reply) = batch();
        syncer.send(write, frames(0..1), None);
        while gate.calls.load(Ordering::SeqCst) == 1 {
            tokio::task::yield_now().await;
        }
        let (read, mut reply) = batch();
        syncer.send(read, Committed::default(), None);
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            reply.try_recv().is_err(),
            "released before the write it may have read"
        );
        open.send(Ok(())).unwrap();
        open.send(Ok(())).unwrap();
        assert!(write_reply.await.unwrap().is_ok());
        assert!(reply.await.unwrap().is_ok());
        syncer.finish().await;
    }

    /// A gate whose first `make_durable` panics.
    struct PanicsOnce(AtomicUsize);

    impl CommitGate for PanicsOnce {
        fn make_durable(&self, _: &Committed) -> Result<(), Error> {
            if self.0.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("the gate panicked");
            }
            Ok(())
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_sync_that_panics_fails_its_batch_and_the_next_batch_is_still_released() {
        let syncer = Syncer::start(Arc::new(PanicsOnce(AtomicUsize::new(0))), sync());
        let (first, first_reply) = batch();
        syncer.send(first, frames(0..1), None);
        let e = first_reply.await.unwrap().unwrap_err();
        assert!(e.message.contains("may not be durable"), "{e}");
        let (second, second_reply) = batch();
        syncer.send(second, frames(1..2), None);
        let released = tokio::time::timeout(std::time::Duration::from_secs(10), second_reply);
        assert!(released.await.expect("the syncer stopped").unwrap().is_ok());
        syncer.finish().await;
    }

    /// A gate whose every sync takes 5 ms.
    struct Slow;

    impl CommitGate for Slow {
        fn make_durable(&self, _: &Committed) -> Result<(), Error> {
            std::thread::sleep(std::time::Duration::from_millis(5));
            Ok(())
        }
    }

    #[test]
    fn a_busy_agent_does_not_keep_the_blocking_pool_to_itself() {
        // One blocking thread, and an agent that commits faster than it syncs: its syncer has
        // batches waiting after every sync, and other blocking work still gets the thread.
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(1)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let syncer = Syncer::start(Arc::new(Slow), sync());
            let (stop, mut stopped) = oneshot::channel::<()>();
            let busy = tokio::spawn(async move {
                let mut replies = Vec::new();
                while stopped.try_recv().is_err() {
                    let (outbox, reply) = batch();
                    syncer.send(outbox, frames(0..1), None);
                    replies.push(reply);
                    tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                }
                syncer.finish().await;
                replies
            });
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            let other = tokio::task::spawn_blocking(|| 42);
            let other = tokio::time::timeout(std::time::Duration::from_secs(5), other).await;
            stop.send(()).unwrap();
            assert_eq!(other.expect("starved by the syncer").unwrap(), 42);
            for reply in busy.await.unwrap() {
                assert!(reply.await.unwrap().is_ok());
            }
        });
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn drain_waits_for_every_batch_handed_over() {
        let (gate, open) = held();
        let syncer = Syncer::start(gate.clone(), sync());
        let (outbox, reply) = batch();
        syncer.send(outbox, frames(0..4), None);
        {
            let drain = syncer.drain();
            tokio::pin!(drain);
            let early = tokio::time::timeout(std::time::Duration::from_millis(50), &mut drain);
            assert!(early.await.is_err(), "drained before the batch was durable");
            open.send(Ok(())).unwrap();
            open.send(Ok(())).unwrap(); // the drain's own turn, if it got one
            drain.await;
        }
        // Durable when the drain returned (its release follows at once).
        assert_eq!(gate.told.lock().unwrap().first(), Some(&(0..4)));
        assert!(reply.await.unwrap().is_ok());
        syncer.finish().await;
    }
}
