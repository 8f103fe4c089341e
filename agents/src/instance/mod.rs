//! One live agent: the task that owns the struct and its database and drains its mailbox.
//!
//! - this module: the mailbox loop (batches, hibernation, hand-over) and each event's run
//!   (dispatch to the handler in its turn);
//! - `batching`: how a batch grows;
//! - `store`: the database (open, transaction and savepoints, commit and its gate, checkpoint,
//!   close);
//! - `index`: the agent's entry in the alarm index (early, never late);
//! - `panics`: a handler's panic as an error.
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

mod batching;
mod index;
mod panics;
mod store;

use std::{sync::Arc, time::Duration};

use agents_client::{BoxFuture, ErrorKind, OutgoingCall, Payload, RawError};
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
    error::{Error, Failure},
    gate::{fail, release, AfterDurable, Outbox, Responder},
    metrics::{ClassMetrics, Timed},
    port::{NORMAL_CLOSURE, SERVICE_RESTART},
    registry::{CallEvent, Event, Shared},
    runtime::{call_value, Caller},
    schedule::{self, AlarmInfo},
    storage::{self, blocking, Stored},
    telemetry,
};
use batching::Batching;
use index::{AlarmEntry, Raise};
use panics::catch_panic;
use store::{end_savepoint, savepoint, Store};

/// How many due rows one alarm event runs; the rest run on the next (immediate) alarm.
const DUE_PER_BATCH: usize = 256;

/// Starts an instance of `A` for `key` reading `rx`.
pub(crate) fn spawn<A: AgentClass>(
    shared: Arc<Shared>,
    key: AgentKey,
    generation: u64,
    rx: mpsc::Receiver<Event>,
) {
    // A root: an agent outlives the event that woke it (a child span would hold its parent
    // open, and an exporter would never see that event end).
    let span = tracing::debug_span!(parent: None, "agent", class = key.class(), name = key.name());
    let metrics = shared.metrics.class(key.class());
    let mut instance = Instance::<A> {
        agent: None,
        index: AlarmEntry::new(shared.clone(), key.clone()),
        ctx: Ctx::new(shared.clone(), key),
        generation,
        store: Store::new(),
        destroying: false,
        spare_effects: None,
        backups: Vec::new(),
        metrics: metrics.clone(),
    };
    metrics.activations.inc();
    metrics.live.inc();
    shared.tracker.spawn(
        // `instance` is borrowed, not moved, by `run`: a moved one would take its room twice in
        // this future, which every live agent keeps.
        async move {
            instance.run(rx).await;
            metrics.live.dec();
            metrics.hibernations.inc();
        }
        .instrument(span),
    );
}

struct Instance<A> {
    /// `None` until created (and again after a panic or a failed commit).
    agent: Option<A>,
    ctx: Ctx<A>,
    generation: u64,
    /// The database's side: transaction, commit and its gate, checkpoints.
    store: Store,
    /// This agent's entry in the runtime's alarm index.
    index: AlarmEntry,
    /// An event of this batch destroyed the agent (`ctx.destroy()`, `runtime.destroy`).
    destroying: bool,
    /// The last event's effects list, empty, for the next one.
    spare_effects: Option<conn::Effects>,
    /// Copies of the database asked for (`Event::Backup`), made once the batch is over.
    backups: Vec<(std::path::PathBuf, oneshot::Sender<Result<(), Error>>)>,
    /// The metrics of its class.
    metrics: ClassMetrics,
}

/// Why an instance leaves after a batch.
enum Leave {
    /// Hibernation was asked for; answered once the database is closed.
    Hibernate(oneshot::Sender<()>),
    /// The agent was destroyed (by `runtime.destroy`, answered once its files are gone, or by
    /// `ctx.destroy()`).
    Destroy(Option<oneshot::Sender<Result<(), RawError>>>),
}

/// Why an instance stops serving events.
enum Exit {
    /// The agent is another node's now (cluster mode), with the event that found it out.
    Lost(Option<Event>),
    /// The runtime shut down.
    Shutdown,
    /// Idle past the idle timeout, and detached: it hibernates.
    Idle,
    /// An event asked it to leave.
    Leave(Leave),
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
    /// What runs: the callable's name, or the hook's.
    fn method(&self) -> &str {
        match self {
            Work::Call(inv) => inv.method(),
            Work::Alarm(_) => "on_alarm",
            Work::Connect(..) => "on_connect",
            Work::Message(..) => "on_message",
            Work::ConnError(..) => "on_error",
            Work::Close(..) => "on_close",
            Work::Request(..) => "on_request",
            Work::Deliver(_, call) => &call.method,
        }
    }

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

/// Whether an event of `outbox` succeeded (a reply, a hook, an alarm, spawned work, an HTTP
/// response below 400): then the agent is used, and its database stays.
fn any_succeeded(outbox: &Outbox) -> bool {
    outbox.iter().any(|(to, reply)| match to {
        Responder::Request(_, response) => {
            reply.is_ok() && response.as_ref().is_some_and(|r| r.status().as_u16() < 400)
        }
        Responder::Frames(..) => false,
        _ => reply.is_ok(),
    })
}

/// What the caller of an event that came to `result` is told.
fn told<T>(result: Result<T, Failure>) -> Result<T, RawError> {
    result.map_err(|failure| failure.told())
}

fn empty() -> Payload {
    Payload::Postcard(Vec::new())
}

impl<A: AgentClass> Instance<A> {
    async fn run(&mut self, mut rx: mpsc::Receiver<Event>) {
        let exit = self.serve(&mut rx).await;
        // Boxed, as are the batches: what the future of a live agent holds while it waits for
        // events is only this loop's state.
        Box::pin(self.exit(exit, rx)).await;
    }

    /// Runs batches of events until the agent leaves, and says why.
    async fn serve(&mut self, rx: &mut mpsc::Receiver<Event>) -> Exit {
        let idle = self.ctx.shared.config.idle_timeout;
        loop {
            if self.store.is_lost() {
                return Exit::Lost(None);
            }
            let first = match self.next_event(rx, idle).await {
                Ok(Some(event)) => event,
                Ok(None) => return Exit::Shutdown, // the mailbox is drained
                Err(_) if self.store.is_lost() => return Exit::Lost(None),
                Err(_) => {
                    if self
                        .ctx
                        .shared
                        .detach(self.ctx.key(), self.generation, rx, false)
                    {
                        tracing::debug!("hibernating after {idle:?} idle");
                        return Exit::Idle;
                    }
                    continue;
                }
            };
            if self.store.is_lost() {
                return Exit::Lost(Some(first));
            }
            match Box::pin(self.run_batch(first, rx)).await {
                None if self.backups.is_empty() => {}
                None => Box::pin(self.back_up()).await,
                Some(leave) => return Exit::Leave(leave),
            }
        }
    }

    /// Leaves as `exit` says: the events still in (or yet to reach) the detached mailbox `rx`
    /// go to the next instance.
    async fn exit(&mut self, exit: Exit, mut rx: mpsc::Receiver<Event>) {
        match exit {
            Exit::Lost(first) => self.leave_lost(first, rx).await,
            Exit::Shutdown => self.close_db().await,
            Exit::Idle => {
                hand_over(&self.ctx.shared, self.ctx.key(), rx).await;
                self.close_db().await;
            }
            Exit::Leave(Leave::Hibernate(done)) => {
                tracing::debug!("hibernating on request");
                self.ctx
                    .shared
                    .detach(self.ctx.key(), self.generation, &mut rx, true);
                hand_over(&self.ctx.shared, self.ctx.key(), rx).await;
                self.close_db().await;
                let _ = done.send(());
            }
            Exit::Leave(Leave::Destroy(done)) => {
                tracing::debug!("destroyed");
                // Events that come meanwhile wait in the mailbox: the next instance must
                // not open the files before they are gone.
                // An error is logged as it is told.
                let result = self
                    .destroy()
                    .await
                    .map_err(|e| e.told("destroying the agent"));
                self.ctx
                    .shared
                    .detach(self.ctx.key(), self.generation, &mut rx, true);
                hand_over(&self.ctx.shared, self.ctx.key(), rx).await;
                if let Some(done) = done {
                    let _ = done.send(result);
                }
            }
        }
    }

    /// The next event, or `Err` once none came for `idle`; if none came for the quiet period
    /// (see `Builder::quiet_after`) before, the agent gives back the memory it needs only while
    /// busy.
    async fn next_event(
        &mut self,
        rx: &mut mpsc::Receiver<Event>,
        idle: Duration,
    ) -> Result<Option<Event>, tokio::time::error::Elapsed> {
        let quiet = self.ctx.shared.config.quiet_after;
        if quiet < idle && self.ctx.conn.is_some() {
            if let Ok(event) = tokio::time::timeout(quiet, rx.recv()).await {
                return Ok(event);
            }
            self.store.quiet(&mut self.ctx.conn).await;
            return tokio::time::timeout(idle - quiet, rx.recv()).await;
        }
        tokio::time::timeout(idle, rx.recv()).await
    }

    /// Cluster mode: the agent moved to another node while this one wrote (or a write may not
    /// have been kept), or another node has it (its activation here was refused); the
    /// instance learns it at its next event, or when it goes idle. Its local copy goes (before
    /// anything else may take the agent here again), its sockets are closed with 1012 (clients
    /// reconnect, and reach its new owner), and `first` and the events that wait go to the
    /// next instance, which takes the agent again (or says where it is).
    async fn leave_lost(&mut self, first: Option<Event>, mut rx: mpsc::Receiver<Event>) {
        if self.store.gate().is_some() {
            tracing::warn!("the agent moved to another node; its local copy is dropped");
        }
        self.agent = None;
        self.close_db().await;
        let shared = self.ctx.shared.clone();
        shared.detach(self.ctx.key(), self.generation, &mut rx, true);
        let reason = "the agent moved to another node";
        shared
            .sockets
            .close_agent(self.ctx.key(), SERVICE_RESTART, reason);
        if let Some(first) = first {
            if let Err((e, event)) = shared.route(self.ctx.key(), first).await {
                event.abandon(e.told("the agent cannot be reached"));
            }
        }
        hand_over(&shared, self.ctx.key(), rx).await;
    }

    /// Deletes the agent once its destruction committed: closes the database (the batch's
    /// replies and frames leave first), closes its connections, and removes its alarm index
    /// entry and its files.
    async fn destroy(&mut self) -> Result<(), Error> {
        // The files go first: a client told that the agent was destroyed finds it gone.
        let removed = self.remove_files().await;
        let reason = "the agent was destroyed";
        let sockets = &self.ctx.shared.sockets;
        sockets.close_agent(self.ctx.key(), NORMAL_CLOSURE, reason);
        removed
    }

    /// Drops the agent, closes its database (the batch's replies and frames leave first), and
    /// removes its alarm index entry and its files.
    async fn remove_files(&mut self) -> Result<(), Error> {
        self.agent = None;
        let gate = self.store.gate();
        self.close_db().await;
        let (shared, key) = (self.ctx.shared.clone(), self.ctx.key().clone());
        self.index.removed();
        blocking(move || {
            shared.alarms.set(&key, None, true)?;
            storage::remove(&shared.config.data_dir, &key)?;
            shared.catalog.removed(&key);
            // What the commit gate stored of it (cluster mode: its log in PostgreSQL) too.
            gate.map_or(Ok(()), |g| g.removed())
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
        let mut events = 0u32;
        // Whether the batch wrote nothing but the runtime's bookkeeping (closes whose hooks
        // changed nothing): then no sync of its own (see `Store::seal`).
        let mut bookkeeping = true;
        while let Some(event) = next.take() {
            events += 1;
            bookkeeping &= matches!(event, Event::Close { .. });
            match event {
                Event::Call(call) => self.call(*call, &mut outbox).await,
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
                Event::Backup(to, done) => {
                    // Copied once the batch committed (not inside its transaction).
                    self.backups.push((to, done));
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
                        Err(e) => drop(done.send(Err(e.told("destroying the agent")))),
                    }
                }
                Event::Connect {
                    conn,
                    protocol,
                    principal,
                    done,
                    refused,
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
                    match &result {
                        Ok(_) => self.frames(&mut outbox, vec![Effect::Admit(conn)]),
                        Err(_) => refused(),
                    }
                    outbox.push((Responder::Hook(done), told(result)));
                }
                Event::Message { conn, message } => {
                    self.metrics.messages_in.inc();
                    let span = tracing::debug_span!("message", conn = %conn);
                    let result = self
                        .run_handler(Work::Message(&conn, message), Cause::default(), &mut outbox)
                        .instrument(span)
                        .await;
                    self.store.unused &= result.is_err();
                    if let Err(failure) = result {
                        tracing::debug!("on_message failed: {failure}");
                        let mut e = failure.told();
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
                    let hooks_wrote = self
                        .close(conn, code, reason, error, &mut outbox)
                        .instrument(tracing::debug_span!("close", code))
                        .await;
                    bookkeeping &= !hooks_wrote;
                }
                Event::Request { request, reply } => {
                    let span = tracing::debug_span!("request", method = %request.method(), uri = %request.uri());
                    let mut response = None;
                    let result = self
                        .run_handler(
                            Work::Request(*request, &mut response),
                            Cause::default(),
                            &mut outbox,
                        )
                        .instrument(span)
                        .await;
                    outbox.push((Responder::Request(reply, response), told(result)));
                }
            }
            if self
                .ctx
                .conn
                .as_ref()
                .is_some_and(|c| self.store.lost_txn(c))
            {
                // SQLite rolled the whole transaction back by itself: every event of the batch
                // so far lost its writes.
                self.agent = None;
                let lost = Error::Internal(
                    "SQLite rolled the transaction back (an I/O error or an ON CONFLICT ROLLBACK clause)".into(),
                );
                let lost = Failure::runtime("nothing of this call was written", lost);
                fail(std::mem::take(&mut outbox), &lost.told());
                self.destroying = false;
            }
            if self.destroying {
                // Nothing runs after the event that destroyed the agent.
                leave = Some(Leave::Destroy(None));
                break;
            }
            next = batch.next(outbox.len(), rx).await;
        }
        self.store.unused &= !any_succeeded(&outbox);
        self.metrics.batch.observe(f64::from(events));
        if !self.store.in_txn() {
            release(outbox); // nothing ran, nothing to make durable
            return leave;
        }
        let raise = match self.lower_index().await {
            Ok(raise) => raise,
            Err(e) => {
                // Committing could leave a schedule the timer does not know about.
                tracing::error!("the alarm index cannot be written, the batch is rolled back: {e}");
                self.store.rollback(self.ctx.sql());
                self.agent = None;
                let e = Failure::runtime("the alarm index cannot be written", e).told();
                fail(outbox, &e);
                return self.not_committed(leave, &e);
            }
        };
        match self.store.commit(self.ctx.sql()) {
            Err(e) => {
                tracing::error!("commit failed, the batch is rolled back: {e}");
                // Memory may hold what storage lost: re-create the agent from storage.
                self.agent = None;
                let e = Failure::runtime("the commit failed, nothing was written", e).told();
                fail(outbox, &e);
                leave = self.not_committed(leave, &e);
            }
            Ok(committed) => {
                // Listed before any reply says that the agent exists.
                self.store.catalog_if_used(&self.ctx.shared, self.ctx.key());
                let after = raise.map(|r| Box::new(move || r.apply()) as AfterDurable);
                self.store.seal(outbox, committed, after, bookkeeping).await;
            }
        }
        self.store.checkpoint_if_large(&mut self.ctx.conn).await;
        if self.store.unused && leave.is_none() {
            self.forget_unused().await;
        }
        leave
    }

    /// Removes the files of an agent that this instance created and for which every event
    /// failed (a junk request to a new name): its replies leave first; the next event starts
    /// it afresh. Nothing it wrote survives a failed event anyway, but what `on_start` wrote.
    async fn forget_unused(&mut self) {
        if let Err(e) = self.remove_files().await {
            tracing::warn!("removing the files of an agent no event succeeded on: {e}");
        }
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
        self.store.schedules_seen |= earliest.is_some();
        let clock = &self.ctx.shared.config.clock;
        if clock.is_manual() && earliest.is_some_and(|at| at <= clock.now_ms()) {
            // No timer runs on a manual clock: what is due already (an `enqueue`, say) runs
            // now, after this commit, rather than on the test's next `advance`.
            self.alarm_self();
        }
        self.index.before_commit(earliest).await
    }

    /// Queues frames for the agent's connections, released with the batch.
    fn frames(&self, outbox: &mut Outbox, effects: Vec<Effect>) {
        if !effects.is_empty() {
            let to = Responder::Frames(self.ctx.shared.clone(), self.ctx.key().clone(), effects);
            outbox.push((to, Ok(empty())));
        }
    }

    /// A connection closed: `on_error` (if it failed), `on_close`, then its row goes. Returns
    /// whether the hooks (or anything around them: `on_start`, the connection's state) may
    /// have changed a row.
    async fn close(
        &mut self,
        conn: ConnId,
        code: u16,
        reason: String,
        error: Option<String>,
        outbox: &mut Outbox,
    ) -> bool {
        let before = self
            .begin()
            .await
            .ok()
            .map(|()| self.ctx.sql().total_changes());
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
        let wrote = before.is_none_or(|before| self.ctx.sql().total_changes() != before);
        if self.store.in_txn() {
            if let Err(e) = conn::remove(self.ctx.sql(), &conn) {
                tracing::warn!("forgetting connection {conn}: {e}");
            }
        }
        wrote
    }

    async fn call(&mut self, call: CallEvent, outbox: &mut Outbox) {
        let CallEvent {
            inv,
            reply,
            chain,
            deadline,
            received,
            conn,
            principal,
        } = call;
        if reply.is_gone() {
            return; // the caller gave up before the call ran: nothing to do
        }
        let timed = Timed::new(received, &self.metrics.call);
        let started = Instant::now();
        if deadline.is_some_and(|d| started >= d) {
            let e = RawError::new(
                ErrorKind::Timeout,
                format!("`{}` was dequeued after its deadline", inv.method()),
            );
            self.metrics.called(inv.method(), e.kind.as_str(), 0.0);
            outbox.push((Responder::Call(reply, None, timed), Err(e)));
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
        if let Err(failure) = &result {
            tracing::debug!("call failed: {failure}");
        }
        let stream = inv.take_stream().filter(|_| result.is_ok());
        let result = told(result);
        let outcome = result.as_ref().map_or_else(|e| e.kind.as_str(), |_| "ok");
        self.metrics
            .called(inv.method(), outcome, started.elapsed().as_secs_f64());
        outbox.push((Responder::Call(reply, stream, timed), result));
    }

    /// Runs every due row, each as its own event, and records its outcome in the same batch.
    async fn alarm(&mut self, done: Option<oneshot::Sender<()>>, outbox: &mut Outbox) {
        self.index.refresh();
        let result = self.run_due(outbox).await;
        if let Err(e) = &result {
            tracing::error!("running due schedules: {e}");
        }
        outbox.push((
            Responder::Done(done),
            result
                .map(|()| empty())
                .map_err(|e| Failure::runtime("running due schedules", e).told()),
        ));
    }

    async fn run_due(&mut self, outbox: &mut Outbox) -> Result<(), Error> {
        self.begin().await?;
        // Rows run here may end as dead letters: the catalog counts them at the close.
        self.store.schedules_seen = true;
        let now = self.ctx.shared.config.clock.now_ms();
        let due = schedule::due(self.ctx.sql(), now, DUE_PER_BATCH)?;
        for row in &due {
            let late = now.saturating_sub(row.next_ms);
            self.metrics.lateness.observe(late as f64 / 1000.0);
            let started = Instant::now();
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
            let outcome = match &result {
                Ok(_) => "ok",
                Err(e) => e.kind().as_str(),
            };
            let method = if row.is_alarm() {
                "on_alarm"
            } else {
                &row.method
            };
            let ran = started.elapsed().as_secs_f64();
            self.metrics.called(method, outcome, ran);
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
                    let dead = schedule::failed(self.ctx.sql(), row, now, &e.detail())?;
                    if dead {
                        self.metrics.dead_letters.inc();
                        tracing::warn!(id = row.id, method = %row.method, "moved to the dead letters: {e}");
                    } else {
                        self.metrics.retries.inc();
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
    ) -> Result<Payload, Failure> {
        self.begin()
            .await
            .map_err(|e| Failure::runtime("the database cannot be used", e))?;
        let effects = self.effects();
        let Cause {
            waiting,
            caller,
            principal,
        } = cause;
        self.ctx.turn = Turn::new(self.ctx.key(), &waiting, caller, principal, effects);
        // The event's span, and its trace context: the calls it makes carry it (see
        // `telemetry`), so a request's path through several agents is one trace.
        let parent = self.ctx.turn.chain.trace();
        let (span, context) = telemetry::event_span(self.ctx.key(), work.method(), parent);
        self.ctx.turn.chain.set_trace(context);
        let started = self.ensure_started().await;
        let started = started.and_then(|()| savepoint(self.ctx.database()));
        let result = match started {
            Ok(()) => self.run_in_turn(work).instrument(span.clone()).await,
            Err(e) => {
                std::mem::take(&mut self.ctx.turn).end();
                span.record("outcome", e.kind().as_str());
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
                .map_err(|e| Failure::runtime("the connections' changes cannot be stored", e))
        });
        let result = end_savepoint(self.ctx.database(), result);
        let outcome = match &result {
            Ok(_) => "ok",
            Err(e) => e.kind().as_str(),
        };
        span.record("outcome", outcome);
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
    async fn run_in_turn(&mut self, work: Work<'_>) -> Result<Payload, Failure> {
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
                let handler =
                    catch_panic(chain.scope(async { handler.await.map_err(Failure::Told) }));
                let result = self.store.user_code(handler).await;
                if matches!(result, Err(Failure::Panic(_))) {
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
    fn prepare(&mut self, work: &Work<'_>) -> Result<Option<conn::Conn<A>>, Failure> {
        let Some(id) = work.conn() else {
            return Ok(None);
        };
        let sql = self.ctx.sql();
        let failed = |e| Failure::runtime("the connection cannot be loaded", e);
        if let Work::Connect(_, protocol, principal) = work {
            conn::insert(sql, id, *protocol, principal.as_deref()).map_err(failed)?;
            if let Some(stored) = conn::load_state(sql).map_err(failed)? {
                let state: A::State = stored.decode("the shared state").map_err(failed)?;
                let encoded = Encoded::new(&state, "the shared state", Speaks::of(*protocol))
                    .map_err(failed)?;
                conn::push(
                    &self.ctx.turn.effects,
                    Effect::Send(id.clone(), Arc::new(Outgoing::State(encoded))),
                );
            }
        }
        let conn = conn::load(sql, id, &self.ctx.turn.effects).map_err(failed)?;
        if conn.is_none() {
            tracing::debug!("connection {id} is gone: its event is skipped");
        }
        Ok(conn)
    }

    /// Creates the agent and runs `on_start`, if it is not live.
    async fn ensure_started(&mut self) -> Result<(), Failure> {
        if self.agent.is_some() {
            return Ok(());
        }
        let mut agent = A::default();
        let chain = self.ctx.turn.chain.clone();
        savepoint(self.ctx.database())?;
        let start = async {
            agent
                .on_start(&mut self.ctx)
                .await
                .map_err(|e| Failure::Told(RawError::internal(format!("on_start failed: {e}"))))
        };
        let result = self.store.user_code(catch_panic(chain.scope(start))).await;
        end_savepoint(self.ctx.database(), result)?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Opens the database if it is not open.
    async fn open(&mut self) -> Result<(), Error> {
        let shared = self.ctx.shared.clone();
        let key = self.ctx.key().clone();
        let sync = self.metrics.sync.clone();
        self.store
            .open(&mut self.ctx.conn, &shared, &key, &sync)
            .await
    }

    /// Opens the database and the batch transaction if needed; the first transaction of an
    /// instance also registers its `#[schedule]` rows.
    async fn begin(&mut self) -> Result<(), Error> {
        self.open().await?;
        self.store.begin(self.ctx.sql())?;
        if !self.store.checked {
            // A database this activation made holds no rows yet: only a class's own
            // `#[schedule]`s are to be registered in it, and no connection can be stale.
            let new = self.store.unused;
            if !(new && A::SCHEDULES.is_empty()) {
                let now = self.ctx.shared.config.clock.now_ms();
                schedule::sync_static(self.ctx.sql(), A::SCHEDULES, now)?;
            }
            if !new {
                let (sockets, key) = (&self.ctx.shared.sockets, self.ctx.key());
                conn::remove_stale(self.ctx.sql(), |id| sockets.is_open(key, id))?;
            }
            self.store.checked = true;
        }
        Ok(())
    }

    /// Makes the copies of the database asked for, of what it has committed.
    async fn back_up(&mut self) {
        for (to, done) in std::mem::take(&mut self.backups) {
            let copied = match self.open().await {
                // Opening made a new database: the agent is gone (destroyed since it was
                // listed), and so is the file just made.
                Ok(()) if self.store.unused => {
                    self.forget_unused().await;
                    Err(Error::NoSuchAgent(self.ctx.key().to_string()))
                }
                Ok(()) => {
                    let conn = self.ctx.conn.take().expect("open");
                    let copied = blocking(move || {
                        let copied = crate::backup::vacuum_into(&conn, &to);
                        Ok((conn, copied))
                    });
                    match copied.await {
                        Ok((conn, copied)) => {
                            self.ctx.conn = Some(conn);
                            copied
                        }
                        // A panic lost the connection: the next event reopens the database.
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            let _ = done.send(copied);
        }
    }

    /// Waits for every reply to be released, then closes the database.
    async fn close_db(&mut self) {
        let (shared, key) = (self.ctx.shared.clone(), self.ctx.key().clone());
        let changed = &self.ctx.dead_letters_changed;
        self.store.schedules_seen |= changed.swap(false, std::sync::atomic::Ordering::Relaxed);
        self.store.close(&mut self.ctx.conn, &shared, &key).await;
    }
}

/// Passes events that reached a detached mailbox on to the next instance of `key`.
async fn hand_over(shared: &Arc<Shared>, key: &AgentKey, mut rx: mpsc::Receiver<Event>) {
    while let Some(event) = rx.recv().await {
        if let Err((e, event)) = shared.route(key, event).await {
            event.abandon(e.told("the agent cannot be reached"));
        }
    }
}
