//! One live agent: the task that owns the struct and its database and drains its mailbox.
//!
//! The task takes a *batch* of events (whatever is queued, up to `max_batch`), runs each in
//! its own savepoint inside one transaction, and commits once. Under `Durability::Full` the
//! replies then go to the instance's syncer, which fsyncs the WAL on a blocking thread and
//! only then releases them (the output gate); meanwhile the agent takes its next batch, and the
//! next sync covers every batch committed while the previous one ran (group commit). Handlers
//! run one at a time to completion, awaits included: the single writer.
//!
//! After each batch the agent's alarm is re-derived from its schedule table and the runtime's
//! alarm index is kept early, never late: an earlier time is written (and synced) before the
//! commit, a later one only once the commit is durable.

use std::{
    any::Any,
    fs::File,
    future::Future,
    panic::AssertUnwindSafe,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
};

use agents_client::{BoxFuture, ErrorKind, OutgoingCall, Payload, RawError};
use futures_util::FutureExt;
use rusqlite::Connection;
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};
use tracing::Instrument;

use crate::{
    address::AgentKey,
    agent::{AgentClass, AppError, HttpRequest, HttpResponse, Invocation},
    clock::from_ms,
    conn::{self, ConnId, Effect, Encoded, Outgoing, Protocol, Speaks, WsMessage},
    context::{Ctx, Ended, Turn},
    error::Error,
    gate::{fail, release, AfterDurable, Outbox, Responder, Syncer, WalSync},
    lock::lock,
    port::NORMAL_CLOSURE,
    registry::{CallEvent, Event, Shared},
    runtime::{call_value, Caller},
    schedule::{self, AlarmInfo},
    storage::{self, blocking, Durability, Stored},
};

/// How many due rows one alarm event runs; the rest run on the next (immediate) alarm.
const DUE_PER_BATCH: usize = 256;

/// Starts an instance of `A` for `key` reading `rx`.
pub(crate) fn spawn<A: AgentClass>(
    shared: Arc<Shared>,
    key: AgentKey,
    generation: u64,
    rx: mpsc::Receiver<Event>,
) {
    let span = tracing::debug_span!("agent", class = key.class(), name = key.name());
    let index = Arc::new(Mutex::new(IndexState {
        seq: 0,
        at: shared.alarms.get(&key),
    }));
    let instance = Instance::<A> {
        agent: None,
        ctx: Ctx::new(shared.clone(), key),
        generation,
        in_txn: false,
        wal: None,
        syncer: None,
        in_handler: Arc::default(),
        index,
        refresh_index: false,
        statics_synced: false,
        conns_checked: false,
        destroying: false,
        spare_effects: None,
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
    /// This agent's entry in the runtime's alarm index, as last written.
    index: Arc<Mutex<IndexState>>,
    /// Write the index entry after this batch even if it looks unchanged (the timer took it).
    refresh_index: bool,
    /// Whether the `#[schedule]` rows were registered by this instance.
    statics_synced: bool,
    /// Whether this instance forgot the connections that closed while nobody listened.
    conns_checked: bool,
    /// An event of this batch destroyed the agent (`ctx.destroy()`, `runtime.destroy`).
    destroying: bool,
    /// The last event's effects list, empty, for the next one.
    spare_effects: Option<conn::Effects>,
}

/// Why an instance leaves after a batch.
enum Leave {
    /// Hibernation was asked for; answered once the database is closed.
    Hibernate(oneshot::Sender<()>),
    /// The agent was destroyed (by `runtime.destroy`, answered once its files are gone, or by
    /// `ctx.destroy()`).
    Destroy(Option<oneshot::Sender<Result<(), RawError>>>),
}

/// What this agent last wrote to the alarm index, and a sequence number that every lowering
/// bumps, so that a raise computed before a lowering is not applied after it.
struct IndexState {
    seq: u64,
    at: Option<u64>,
}

/// What a batch does to the agent's alarm index entry, so that the index is early, never late:
/// the timer must never sleep past a row a durable commit made due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IndexPlan {
    /// The schedule's earliest time is earlier than the entry: write it (synced) before the
    /// commit, so that no commit is durable while the index is late for it.
    LowerNow,
    /// Later, or gone (or the timer took the entry): write it only once the commit is durable,
    /// so that a batch that is lost never leaves the index late.
    RaiseWhenDurable,
    /// The entry is right.
    Keep,
}

impl IndexPlan {
    /// The plan for a schedule whose earliest time is `earliest`, given the entry `indexed`;
    /// `refresh`: write it even if it looks right (the timer took it).
    fn of(earliest: Option<u64>, indexed: Option<u64>, refresh: bool) -> Self {
        match (earliest, indexed) {
            (Some(new), Some(old)) if new < old => IndexPlan::LowerNow,
            (Some(_), None) => IndexPlan::LowerNow,
            (new, old) if new == old && !refresh => IndexPlan::Keep,
            _ => IndexPlan::RaiseWhenDurable,
        }
    }
}

/// A raise of the index entry, to apply once the batch that computed it is durable.
struct Raise {
    key: AgentKey,
    shared: Arc<Shared>,
    state: Arc<Mutex<IndexState>>,
    seq: u64,
    at: Option<u64>,
}

impl Raise {
    /// Applies the raise unless a lowering came after it. Blocking.
    fn apply(self) {
        let mut state = lock(&self.state);
        if state.seq != self.seq {
            return;
        }
        match self.shared.alarms.set(&self.key, self.at, false) {
            Ok(()) => state.at = self.at,
            Err(e) => tracing::warn!("could not update the alarm index (it stays early): {e}"),
        }
    }
}

/// How a batch grows: whatever is queued joins it, up to `max` events; when nothing is, it
/// waits one scheduler round, once, for callers that the last sync released and that are
/// sending again right now (to join this commit rather than the next one).
struct Batching {
    max: usize,
    yielded: bool,
}

impl Batching {
    fn new(max: usize) -> Self {
        Batching {
            max,
            yielded: false,
        }
    }

    /// The next event of a batch that holds `len` outcomes; `None`: commit now.
    async fn next(&mut self, len: usize, rx: &mut mpsc::Receiver<Event>) -> Option<Event> {
        if len >= self.max {
            return None;
        }
        if let Ok(event) = rx.try_recv() {
            return Some(event);
        }
        if std::mem::replace(&mut self.yielded, true) {
            return None;
        }
        tokio::task::yield_now().await;
        rx.try_recv().ok()
    }
}

/// What an event comes from: the agents waiting on it (its callers, for a call), the
/// connection it arrived on and who made it. Hooks and schedules come from nobody.
#[derive(Default)]
struct Cause {
    waiting: crate::registry::Chain,
    caller: Option<ConnId>,
    principal: Option<Arc<str>>,
}

/// What a handler event runs.
#[allow(clippy::large_enum_variant)] // one lives at a time, on the stack of its event
enum Work<'a> {
    Call(&'a Invocation),
    Alarm(AlarmInfo),
    Connect(&'a ConnId, Protocol, Option<String>),
    Message(&'a ConnId, WsMessage),
    ConnError(&'a ConnId, String),
    Close(&'a ConnId, u16, String),
    Request(HttpRequest, &'a mut Option<HttpResponse>),
    /// A stored call to another agent, made on this agent's turn.
    Deliver(AgentKey, OutgoingCall),
}

impl Work<'_> {
    /// The connection this work is about.
    fn conn(&self) -> Option<&ConnId> {
        match self {
            Work::Connect(c, ..)
            | Work::Message(c, _)
            | Work::ConnError(c, _)
            | Work::Close(c, ..) => Some(c),
            Work::Call(_) | Work::Alarm(_) | Work::Request(..) | Work::Deliver(..) => None,
        }
    }
}

fn app_error(e: AppError) -> RawError {
    e.into_raw(agents_client::Codec::Json)
}

/// The outcome of a lifecycle hook, as an event's result.
fn hook(result: Result<(), crate::AppError>) -> Result<Payload, RawError> {
    result.map(|()| empty()).map_err(app_error)
}

fn empty() -> Payload {
    Payload::Postcard(Vec::new())
}

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
            match self.run_batch(first, &mut rx).await {
                None => {}
                Some(Leave::Hibernate(done)) => {
                    tracing::debug!("hibernating on request");
                    self.ctx
                        .shared
                        .detach(self.ctx.key(), self.generation, &mut rx, true);
                    hand_over(&self.ctx.shared, self.ctx.key(), rx).await;
                    self.close_db().await;
                    let _ = done.send(());
                    return;
                }
                Some(Leave::Destroy(done)) => {
                    tracing::debug!("destroyed");
                    // Events that come meanwhile wait in the mailbox: the next instance must
                    // not open the files before they are gone.
                    let result = self.destroy().await;
                    if let Err(e) = &result {
                        tracing::error!("destroying the agent: {e}");
                    }
                    self.ctx
                        .shared
                        .detach(self.ctx.key(), self.generation, &mut rx, true);
                    hand_over(&self.ctx.shared, self.ctx.key(), rx).await;
                    if let Some(done) = done {
                        let _ = done.send(result.map_err(RawError::internal));
                    }
                    return;
                }
            }
        }
        self.close_db().await;
    }

    /// Deletes the agent once its destruction committed: closes the database (the batch's
    /// replies and frames leave first), closes its connections, and removes its alarm index
    /// entry and its files.
    async fn destroy(&mut self) -> Result<(), Error> {
        self.agent = None;
        self.close_db().await;
        let (shared, key) = (self.ctx.shared.clone(), self.ctx.key().clone());
        let reason = "the agent was destroyed";
        shared.sockets.close_agent(&key, NORMAL_CLOSURE, reason);
        blocking(move || {
            shared.alarms.set(&key, None, true)?;
            storage::remove(&shared.config.data_dir, &key)
        })
        .await
    }

    /// Runs `first` and whatever else is queued, commits once, then releases the replies.
    /// Returns why the instance leaves after this batch, if it does.
    async fn run_batch(&mut self, first: Event, rx: &mut mpsc::Receiver<Event>) -> Option<Leave> {
        let mut batch = Batching::new(self.ctx.shared.config.max_batch);
        let mut outbox = Outbox::new();
        let mut next = Some(first);
        let mut leave = None;
        while let Some(event) = next.take() {
            match event {
                Event::Call(call) => self.call(call, &mut outbox).await,
                Event::Alarm(done) => self.alarm(done, &mut outbox).await,
                Event::Warm => {
                    if let Err(e) = self.open().await {
                        tracing::warn!("warming up for an alarm: {e}");
                    }
                }
                Event::Hibernate(done) => {
                    leave = Some(Leave::Hibernate(done));
                    break;
                }
                Event::Destroy(done) => {
                    let marked = self
                        .begin()
                        .await
                        .and_then(|()| storage::mark_destroyed(self.ctx.sql()));
                    match marked {
                        Ok(()) => {
                            self.destroying = true;
                            leave = Some(Leave::Destroy(Some(done)));
                            break;
                        }
                        Err(e) => drop(done.send(Err(RawError::internal(e)))),
                    }
                }
                Event::Connect {
                    conn,
                    protocol,
                    principal,
                    done,
                } => {
                    let span = tracing::debug_span!("connect", conn = %conn);
                    let result = self
                        .run_handler(
                            Work::Connect(&conn, protocol, principal),
                            Cause::default(),
                            &mut outbox,
                        )
                        .instrument(span)
                        .await;
                    if result.is_ok() {
                        self.frames(&mut outbox, vec![Effect::Admit(conn)]);
                    }
                    outbox.push((Responder::Hook(done), result));
                }
                Event::Message { conn, message } => {
                    let span = tracing::debug_span!("message", conn = %conn);
                    let result = self
                        .run_handler(Work::Message(&conn, message), Cause::default(), &mut outbox)
                        .instrument(span)
                        .await;
                    if let Err(mut e) = result {
                        tracing::debug!("on_message failed: {e}");
                        // The application's error goes in both encodings, as a call's would.
                        let data = e.data.take().and_then(|d| d.decode::<AppError>().ok());
                        let data =
                            data.and_then(|d| Encoded::new(&d, "the error", Speaks::ALL).ok());
                        let error = Outgoing::Error(e, data);
                        self.frames(&mut outbox, vec![Effect::Send(conn, Arc::new(error))]);
                    }
                }
                Event::Close {
                    conn,
                    code,
                    reason,
                    error,
                } => {
                    self.close(conn, code, reason, error, &mut outbox)
                        .instrument(tracing::debug_span!("close", code))
                        .await
                }
                Event::Request { request, reply } => {
                    let span = tracing::debug_span!("request", method = %request.method(), uri = %request.uri());
                    let mut response = None;
                    let result = self
                        .run_handler(
                            Work::Request(request, &mut response),
                            Cause::default(),
                            &mut outbox,
                        )
                        .instrument(span)
                        .await;
                    outbox.push((Responder::Request(reply, response), result));
                }
            }
            if self.in_txn && self.ctx.sql().is_autocommit() {
                // SQLite rolled the whole transaction back by itself (an I/O error, a full disk,
                // `INSERT OR ROLLBACK`): every event of the batch so far lost its writes.
                // (Handlers cannot end it: see `storage::guard_transaction`.)
                self.in_txn = false;
                self.agent = None;
                let lost = RawError::internal(
                    "SQLite rolled the transaction back (an I/O error or an ON CONFLICT ROLLBACK clause); nothing of this call was written",
                );
                fail(std::mem::take(&mut outbox), &lost);
                self.destroying = false;
            }
            if self.destroying {
                // Nothing runs after the event that destroyed the agent.
                leave = Some(Leave::Destroy(None));
                break;
            }
            next = batch.next(outbox.len(), rx).await;
        }
        if !self.in_txn {
            release(outbox); // nothing ran, nothing to make durable
            return leave;
        }
        let raise = match self.lower_index().await {
            Ok(raise) => raise,
            Err(e) => {
                // Committing could leave a schedule the timer does not know about.
                tracing::error!("the alarm index cannot be written, the batch is rolled back: {e}");
                let _ = self.ctx.sql().execute_batch("ROLLBACK");
                self.in_txn = false;
                self.agent = None;
                let e = RawError::internal(format!("the alarm index cannot be written: {e}"));
                fail(outbox, &e);
                return self.not_committed(leave, &e);
            }
        };
        match self.commit() {
            Err(e) => {
                tracing::error!("commit failed, the batch is rolled back: {e}");
                // Memory may hold what storage lost: re-create the agent from storage.
                self.agent = None;
                let e = RawError::internal(format!("the commit failed, nothing was written: {e}"));
                fail(outbox, &e);
                leave = self.not_committed(leave, &e);
            }
            Ok(()) => match &self.syncer {
                Some(syncer) => {
                    let after = raise.map(|r| Box::new(move || r.apply()) as AfterDurable);
                    syncer.send(outbox, after);
                }
                None => {
                    if let Some(raise) = raise {
                        let _ = blocking(move || {
                            raise.apply();
                            Ok(())
                        })
                        .await;
                    }
                    release(outbox)
                }
            },
        }
        self.checkpoint_if_large().await;
        leave
    }

    /// The batch did not commit: a destruction in it did not happen.
    fn not_committed(&mut self, leave: Option<Leave>, e: &RawError) -> Option<Leave> {
        self.destroying = false;
        match leave {
            Some(Leave::Destroy(done)) => {
                if let Some(done) = done {
                    let _ = done.send(Err(e.clone()));
                }
                None
            }
            other => other,
        }
    }

    /// Before the commit: re-derives the alarm from the schedule table. If it moved earlier than
    /// the index entry, writes the index now (synced); if it moved later, returns the raise to
    /// apply once the commit is durable.
    async fn lower_index(&mut self) -> Result<Option<Raise>, Error> {
        let earliest = schedule::earliest(self.ctx.sql())?;
        let clock = &self.ctx.shared.config.clock;
        if clock.is_manual() && earliest.is_some_and(|at| at <= clock.now_ms()) {
            // No timer runs on a manual clock: what is due already (an `enqueue`, say) runs
            // now, after this commit, rather than on the test's next `advance`.
            self.alarm_self();
        }
        let refresh = std::mem::take(&mut self.refresh_index);
        let (seq, indexed) = {
            let state = lock(&self.index);
            (state.seq, state.at)
        };
        let plan = IndexPlan::of(earliest, indexed, refresh);
        if plan == IndexPlan::LowerNow {
            let (state, shared, key) = (
                self.index.clone(),
                self.ctx.shared.clone(),
                self.ctx.key().clone(),
            );
            blocking(move || {
                let mut state = lock(&state);
                state.seq += 1;
                shared.alarms.set(&key, earliest, true)?;
                state.at = earliest;
                Ok(())
            })
            .await?;
            return Ok(None);
        }
        if plan == IndexPlan::Keep {
            return Ok(None);
        }
        Ok(Some(Raise {
            key: self.ctx.key().clone(),
            shared: self.ctx.shared.clone(),
            state: self.index.clone(),
            seq,
            at: earliest,
        }))
    }

    /// Queues frames for the agent's connections, released with the batch.
    fn frames(&self, outbox: &mut Outbox, effects: Vec<Effect>) {
        if !effects.is_empty() {
            let to = Responder::Frames(self.ctx.shared.clone(), self.ctx.key().clone(), effects);
            outbox.push((to, Ok(empty())));
        }
    }

    /// A connection closed: `on_error` (if it failed), `on_close`, then its row goes.
    async fn close(
        &mut self,
        conn: ConnId,
        code: u16,
        reason: String,
        error: Option<String>,
        outbox: &mut Outbox,
    ) {
        if let Some(error) = error {
            if let Err(e) = self
                .run_handler(Work::ConnError(&conn, error), Cause::default(), outbox)
                .await
            {
                tracing::debug!("on_error failed: {e}");
            }
        }
        if let Err(e) = self
            .run_handler(Work::Close(&conn, code, reason), Cause::default(), outbox)
            .await
        {
            tracing::debug!("on_close failed: {e}");
        }
        if self.in_txn {
            if let Err(e) = conn::remove(self.ctx.sql(), &conn) {
                tracing::warn!("forgetting connection {conn}: {e}");
            }
        }
    }

    async fn call(&mut self, call: CallEvent, outbox: &mut Outbox) {
        let CallEvent {
            inv,
            reply,
            chain,
            deadline,
            conn,
            principal,
        } = call;
        if reply.is_gone() {
            return; // the caller gave up before the call ran: nothing to do
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            let e = RawError::new(
                ErrorKind::Timeout,
                format!("`{}` was dequeued after its deadline", inv.method()),
            );
            outbox.push((Responder::Call(reply, None), Err(e)));
            return;
        }
        let cause = Cause {
            waiting: chain,
            caller: conn,
            principal,
        };
        let span = tracing::debug_span!("call", method = inv.method());
        let result = self
            .run_handler(Work::Call(&inv), cause, outbox)
            .instrument(span)
            .await;
        if let Err(e) = &result {
            tracing::debug!(kind = %e.kind, "call failed: {}", e.message);
        }
        let stream = inv.take_stream().filter(|_| result.is_ok());
        outbox.push((Responder::Call(reply, stream), result));
    }

    /// Runs every due row, each as its own event, and records its outcome in the same batch.
    async fn alarm(&mut self, done: Option<oneshot::Sender<()>>, outbox: &mut Outbox) {
        self.refresh_index = true;
        let result = self.run_due(outbox).await;
        if let Err(e) = &result {
            tracing::error!("running due schedules: {e}");
        }
        outbox.push((
            Responder::Done(done),
            result
                .map(|()| Payload::Postcard(Vec::new()))
                .map_err(RawError::internal),
        ));
    }

    async fn run_due(&mut self, outbox: &mut Outbox) -> Result<(), Error> {
        self.begin().await?;
        let now = self.ctx.shared.config.clock.now_ms();
        let due = schedule::due(self.ctx.sql(), now, DUE_PER_BATCH)?;
        for row in &due {
            let span = tracing::debug_span!("schedule", id = row.id, method = %row.method, attempt = row.attempts + 1);
            // A one-shot (or the alarm) leaves the schedule as it starts, so that its handler can
            // re-arm it (even under the same key); a failure rolls that back and retries it.
            let one_shot = row.is_one_shot();
            if one_shot {
                self.ctx.sql().execute_batch("SAVEPOINT agents_row")?;
                schedule::remove(self.ctx.sql(), row.id)?;
            }
            let result = if row.is_alarm() {
                let info = AlarmInfo {
                    retry_count: row.attempts,
                    is_retry: row.attempts > 0,
                    scheduled: from_ms(row.next_ms),
                };
                self.run_handler(Work::Alarm(info), Cause::default(), outbox)
                    .instrument(span)
                    .await
            } else {
                let args = match &row.args {
                    Stored::Json(text) => serde_json::from_str(text).map(Payload::Json),
                    Stored::Postcard(bytes) => Ok(Payload::Postcard(bytes.clone())),
                };
                let args = args.unwrap_or_else(|e| {
                    Payload::Json(serde_json::json!(format!("unreadable arguments: {e}")))
                });
                let method = row.method.clone();
                match row.target.clone() {
                    Some(target) => {
                        let call = OutgoingCall {
                            method: method.into(),
                            args,
                            timeout: None,
                        };
                        self.run_handler(Work::Deliver(target, call), Cause::default(), outbox)
                            .instrument(span)
                            .await
                    }
                    None => {
                        let inv = Invocation::internal(method, args);
                        self.run_handler(Work::Call(&inv), Cause::default(), outbox)
                            .instrument(span)
                            .await
                    }
                }
            };
            if self.ctx.sql().is_autocommit() {
                return Ok(()); // the batch transaction is gone; `run_batch` reports it
            }
            if one_shot {
                self.ctx.sql().execute_batch(if result.is_ok() {
                    "RELEASE agents_row"
                } else {
                    "ROLLBACK TO agents_row; RELEASE agents_row"
                })?;
            }
            match result {
                Ok(_) => schedule::succeeded(self.ctx.sql(), row, now)?,
                Err(e) => {
                    let dead = schedule::failed(self.ctx.sql(), row, now, &e.to_string())?;
                    if dead {
                        tracing::warn!(id = row.id, method = %row.method, "moved to the dead letters: {e}");
                    } else {
                        tracing::debug!(id = row.id, method = %row.method, "failed, will retry: {e}");
                    }
                }
            }
        }
        if due.len() == DUE_PER_BATCH {
            // More are due: come back at once, after the events already waiting.
            self.alarm_self();
        }
        Ok(())
    }

    /// Sends this agent an alarm event, to run after the events already waiting.
    fn alarm_self(&self) {
        let (shared, key) = (self.ctx.shared.clone(), self.ctx.key().clone());
        tokio::spawn(async move {
            shared
                .route(&key, Event::Alarm(None))
                .await
                .map_err(|(e, _)| e)
        });
    }

    /// Runs one handler in its own savepoint, creating the agent first if needed. What it does
    /// to connections goes to `outbox` if it succeeds (its writes to them are stored first).
    async fn run_handler(
        &mut self,
        work: Work<'_>,
        cause: Cause,
        outbox: &mut Outbox,
    ) -> Result<Payload, RawError> {
        self.begin().await.map_err(RawError::internal)?;
        let effects = self.effects();
        let Cause {
            waiting,
            caller,
            principal,
        } = cause;
        self.ctx.turn = Turn::new(self.ctx.key(), &waiting, caller, principal, effects);
        let started = self.ensure_started().await;
        let started = started.and_then(|()| savepoint(self.ctx.sql()));
        let result = match started {
            Ok(()) => self.run_in_turn(work).await,
            Err(e) => {
                std::mem::take(&mut self.ctx.turn).end();
                return Err(e);
            }
        };
        let Ended {
            mut effects,
            reusable,
            spawned,
            destroy,
        } = std::mem::take(&mut self.ctx.turn).end();
        self.spare_effects = reusable;
        let result = result.and_then(|payload| {
            conn::apply_writes(self.ctx.sql(), &effects)
                .map(|()| payload)
                .map_err(RawError::internal)
        });
        let result = end_savepoint(self.ctx.sql(), result);
        if result.is_ok() {
            effects.retain(Effect::is_delivery);
            self.frames(outbox, effects);
            if !spawned.is_empty() {
                outbox.push((Responder::Spawn(spawned), Ok(empty())));
            }
            self.destroying |= destroy;
        }
        result
    }

    /// The handler of `work`, inside its event's savepoint (a panic becomes an error).
    async fn run_in_turn(&mut self, work: Work<'_>) -> Result<Payload, RawError> {
        match self.prepare(&work) {
            Err(e) => Err(e),
            // A connection that closed before the agent got to its event: nothing to run.
            Ok(None) if work.conn().is_some() => Ok(empty()),
            Ok(conn) => {
                let chain = self.ctx.turn.chain.clone();
                let agent = self.agent.as_mut().expect("started");
                let ctx = &mut self.ctx;
                let conn = || conn.as_ref().expect("loaded for connection events");
                let handler: BoxFuture<'_, Result<Payload, RawError>> = match work {
                    Work::Call(inv) => agent.dispatch(ctx, inv),
                    Work::Alarm(info) => {
                        Box::pin(async move { hook(agent.on_alarm(ctx, info).await) })
                    }
                    Work::Connect(..) => {
                        let conn = conn();
                        Box::pin(async move { hook(agent.on_connect(ctx, conn).await) })
                    }
                    Work::Message(_, message) => {
                        let conn = conn();
                        Box::pin(async move { hook(agent.on_message(ctx, conn, message).await) })
                    }
                    Work::ConnError(_, error) => {
                        let conn = conn();
                        Box::pin(async move { hook(agent.on_error(ctx, conn, &error).await) })
                    }
                    Work::Close(_, code, reason) => {
                        let conn = conn();
                        Box::pin(
                            async move { hook(agent.on_close(ctx, conn, code, &reason).await) },
                        )
                    }
                    Work::Request(request, slot) => Box::pin(async move {
                        let response = agent.on_request(ctx, request).await.map_err(app_error)?;
                        *slot = Some(response);
                        Ok(empty())
                    }),
                    Work::Deliver(target, call) => {
                        let (shared, caller) = (ctx.shared.clone(), Caller::local(chain.clone()));
                        Box::pin(async move {
                            call_value(&shared, target, call, caller)
                                .await
                                .map(|_| empty())
                        })
                    }
                };
                self.in_handler.store(true, Ordering::Relaxed);
                let (result, panicked) = catch_panic(chain.scope(handler)).await;
                self.in_handler.store(false, Ordering::Relaxed);
                if panicked {
                    self.agent = None;
                }
                result
            }
        }
    }

    /// An empty effects list for the next event (the last one's, when nothing holds it).
    fn effects(&mut self) -> conn::Effects {
        self.spare_effects.take().unwrap_or_default()
    }

    /// Before a connection's hook: records a new connection (and queues the shared state for
    /// it), and loads the connection; `None` if it is no longer recorded (it closed before the
    /// agent got to its event), and for events that are not about a connection.
    fn prepare(&mut self, work: &Work<'_>) -> Result<Option<conn::Conn<A>>, RawError> {
        let Some(id) = work.conn() else {
            return Ok(None);
        };
        let sql = self.ctx.sql();
        if let Work::Connect(_, protocol, principal) = work {
            conn::insert(sql, id, *protocol, principal.as_deref()).map_err(RawError::internal)?;
            if let Some(stored) = conn::load_state(sql).map_err(RawError::internal)? {
                let state: A::State = stored
                    .decode("the shared state")
                    .map_err(RawError::internal)?;
                let encoded = Encoded::new(&state, "the shared state", Speaks::of(*protocol))
                    .map_err(RawError::internal)?;
                conn::push(
                    &self.ctx.turn.effects,
                    Effect::Send(id.clone(), Arc::new(Outgoing::State(encoded))),
                );
            }
        }
        let conn = conn::load(sql, id, &self.ctx.turn.effects).map_err(RawError::internal)?;
        if conn.is_none() {
            tracing::debug!("connection {id} is gone: its event is skipped");
        }
        Ok(conn)
    }

    /// Creates the agent and runs `on_start`, if it is not live.
    async fn ensure_started(&mut self) -> Result<(), RawError> {
        if self.agent.is_some() {
            return Ok(());
        }
        let mut agent = A::default();
        let chain = self.ctx.turn.chain.clone();
        savepoint(self.ctx.sql())?;
        let start = async {
            agent
                .on_start(&mut self.ctx)
                .await
                .map_err(|e| RawError::internal(format!("on_start failed: {e}")))
        };
        self.in_handler.store(true, Ordering::Relaxed);
        let (result, _) = catch_panic(chain.scope(start)).await;
        self.in_handler.store(false, Ordering::Relaxed);
        end_savepoint(self.ctx.sql(), result)?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Opens the database if it is not open.
    async fn open(&mut self) -> Result<(), Error> {
        if self.ctx.conn.is_some() {
            return Ok(());
        }
        let shared = self.ctx.shared.clone();
        let key = self.ctx.key().clone();
        let _permit = self
            .ctx
            .shared
            .opening
            .acquire()
            .await
            .map_err(|_| Error::Shutdown)?;
        let (conn, wal) = blocking(move || {
            storage::open(&shared.config.data_dir, &key, shared.config.durability)
        })
        .await?;
        let wal = Arc::new(wal);
        if self.ctx.shared.config.durability == Durability::Full {
            self.syncer = Some(Syncer::start(Arc::new(WalSync(wal.clone()))));
        }
        storage::guard_transaction(&conn, self.in_handler.clone());
        self.wal = Some(wal);
        self.ctx.conn = Some(conn);
        Ok(())
    }

    /// Opens the database and the batch transaction if needed; the first transaction of an
    /// instance also registers its `#[schedule]` rows.
    async fn begin(&mut self) -> Result<(), Error> {
        self.open().await?;
        if !self.in_txn {
            self.ctx.sql().prepare_cached("BEGIN")?.execute([])?;
            self.in_txn = true;
        }
        if !self.statics_synced {
            let now = self.ctx.shared.config.clock.now_ms();
            schedule::sync_static(self.ctx.sql(), A::SCHEDULES, now)?;
            self.statics_synced = true;
        }
        if !self.conns_checked {
            let (sockets, key) = (&self.ctx.shared.sockets, self.ctx.key());
            conn::remove_stale(self.ctx.sql(), |id| sockets.is_open(key, id))?;
            self.conns_checked = true;
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
        let Some(conn) = self.ctx.conn.take() else {
            return;
        };
        // On a panic the connection is lost with the task: the next event reopens the database.
        match blocking(move || Ok((storage::checkpoint(&conn), conn))).await {
            Ok((result, conn)) => {
                if let Err(e) = result {
                    tracing::warn!("checkpoint failed (the WAL keeps growing): {e}");
                }
                self.ctx.conn = Some(conn);
            }
            Err(e) => tracing::error!("{e}"),
        }
    }

    /// Waits for the syncer to release every reply, then closes the database on a blocking thread.
    async fn close_db(&mut self) {
        if let Some(syncer) = self.syncer.take() {
            syncer.finish().await;
        }
        self.wal = None;
        if let Some(conn) = self.ctx.conn.take() {
            if let Err(e) = blocking(move || storage::close(conn)).await {
                tracing::warn!("closing the database: {e}");
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

/// Opens the savepoint of one event (see `storage::RUNTIME_SAVEPOINTS`).
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

#[cfg(test)]
mod tests {
    use super::{
        Batching, Event,
        IndexPlan::{self, *},
    };
    use tokio::sync::mpsc;

    #[tokio::test]
    async fn a_batch_takes_what_is_queued_up_to_its_limit_and_waits_one_round_once() {
        let (tx, mut rx) = mpsc::channel(16);
        for _ in 0..3 {
            tx.send(Event::Warm).await.unwrap();
        }
        let mut batch = Batching::new(3);
        assert!(batch.next(1, &mut rx).await.is_some());
        assert!(batch.next(2, &mut rx).await.is_some());
        assert!(batch.next(3, &mut rx).await.is_none(), "full: commit now");
        // Empty: one scheduler round for a sender that is about to send...
        let late = tokio::spawn({
            let tx = tx.clone();
            async move { tx.send(Event::Warm).await.unwrap() }
        });
        let mut batch = Batching::new(256);
        assert!(batch.next(1, &mut rx).await.is_some(), "the queued one");
        assert!(
            batch.next(2, &mut rx).await.is_some(),
            "the late one joined"
        );
        late.await.unwrap();
        // ...but only once per batch.
        assert!(batch.next(3, &mut rx).await.is_none());
    }

    #[test]
    fn the_alarm_index_is_early_never_late() {
        // Earlier than the index, or new: written before the commit.
        assert_eq!(IndexPlan::of(Some(5), Some(9), false), LowerNow);
        assert_eq!(IndexPlan::of(Some(5), None, false), LowerNow);
        // Later, or gone: only once the commit is durable (until then the index stays early).
        assert_eq!(IndexPlan::of(Some(9), Some(5), false), RaiseWhenDurable);
        assert_eq!(IndexPlan::of(None, Some(5), false), RaiseWhenDurable);
        // Unchanged: nothing, unless the timer took the entry.
        assert_eq!(IndexPlan::of(Some(5), Some(5), false), Keep);
        assert_eq!(IndexPlan::of(None, None, false), Keep);
        assert_eq!(IndexPlan::of(Some(5), Some(5), true), RaiseWhenDurable);
        // Never lowered late: whatever the entry, an earlier time is written at once.
        for old in [None, Some(6), Some(u64::MAX)] {
            assert_eq!(IndexPlan::of(Some(5), old, true), LowerNow, "{old:?}");
        }
    }
}
