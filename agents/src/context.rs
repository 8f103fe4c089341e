//! [`Ctx`]: what a handler can reach besides `self`.

use std::{
    fmt,
    future::Future,
    marker::PhantomData,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::SystemTime,
};

use agents_client::{BoxFuture, MethodCall, OutgoingCall, Payload};

use rusqlite::Connection;

use crate::{
    address::AgentKey,
    agent::AgentClass,
    clock::{from_ms, to_ms},
    conn::{self, Conn, ConnId, Effect, Effects, Encoded, Outgoing, Speaks},
    database::Database,
    error::Error,
    lock::lock,
    registry::{Chain, Shared},
    runtime::{call_value, client_for, Caller, Runtime},
    schedule::{self, DeadLetter, Schedule, When},
    storage::{self, Kv, Stored},
};

/// The context of the event an agent is handling: its identity, its database, and typed
/// clients for other agents.
///
/// Everything written through [`sql`](Ctx::sql) or [`kv`](Ctx::kv) is part of the event's
/// transaction: kept if the handler returns `Ok`, rolled back if it returns `Err` or panics.
pub struct Ctx<A> {
    key: AgentKey,
    id: String,
    pub(crate) shared: Arc<Shared>,
    pub(crate) conn: Option<Database>,
    /// What belongs to the event being handled (a fresh one for each event).
    pub(crate) turn: Turn,
    /// Set when a dead letter was retried or discarded: the catalog's counts are taken again
    /// when the database closes.
    pub(crate) dead_letters_changed: AtomicBool,
    _agent: PhantomData<fn() -> A>,
}

/// The per-event part of a [`Ctx`]: made when an event starts, ended when it ends, so nothing
/// of one event (who called, who waits, what it sends) leaks into the next.
#[derive(Default)]
pub(crate) struct Turn {
    /// The agents waiting on this event, this one included. Calls made while the handler
    /// runs (on its task: see [`Chain::current`]) carry it.
    pub chain: Chain,
    /// What the event does to connections (applied if it succeeds).
    pub effects: Effects,
    /// Work to start once the event is durable (`ctx.spawn`).
    spawned: Mutex<Vec<BoxFuture<'static, ()>>>,
    /// `ctx.destroy()` was called.
    destroy: AtomicBool,
    /// The connection the call arrived on, if any.
    caller: Option<ConnId>,
    /// Who made the call, as an admission hook said.
    principal: Option<Arc<str>>,
}

impl Turn {
    /// An event of `key` on behalf of `waiting` (the chain of its callers, empty for events
    /// nobody waits on), from the connection `caller` and the principal `principal`.
    ///
    /// `effects` is where its effects go: empty, and held by nobody else.
    pub fn new(
        key: &AgentKey,
        waiting: &Chain,
        caller: Option<ConnId>,
        principal: Option<Arc<str>>,
        effects: Effects,
    ) -> Self {
        Turn {
            chain: waiting.push(key.clone()),
            effects,
            spawned: Mutex::default(),
            destroy: AtomicBool::new(false),
            caller,
            principal,
        }
    }

    /// Ends the event; returns what it did: to connections, the work it spawned, and whether
    /// it destroyed the agent.
    pub fn end(self) -> Ended {
        let effects = std::mem::take(&mut *lock(&self.effects));
        // A `Conn` kept past the event still holds the list: it must not see the next event's.
        let reusable = (Arc::strong_count(&self.effects) == 1).then_some(self.effects);
        Ended {
            effects,
            reusable,
            spawned: self.spawned.into_inner().unwrap_or_else(|e| e.into_inner()),
            destroy: self.destroy.into_inner(),
        }
    }
}

/// What an event did, besides its writes.
pub(crate) struct Ended {
    pub effects: Vec<Effect>,
    /// The (empty) effects list, for the next event, unless something still holds it.
    pub reusable: Option<Effects>,
    pub spawned: Vec<BoxFuture<'static, ()>>,
    pub destroy: bool,
}

impl<A> Ctx<A> {
    pub(crate) fn new(shared: Arc<Shared>, key: AgentKey) -> Self {
        Ctx {
            id: key.id(),
            key,
            shared,
            conn: None,
            turn: Turn::default(),
            dead_letters_changed: AtomicBool::new(false),
            _agent: PhantomData,
        }
    }

    /// This agent's name.
    pub fn name(&self) -> &str {
        self.key.name()
    }

    /// This agent's class, e.g. `counter`.
    pub fn class(&self) -> &str {
        self.key.class()
    }

    /// This agent's stable id (a hash of class and name; also its database's file name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// This agent's address.
    pub fn key(&self) -> &AgentKey {
        &self.key
    }

    /// The agent's SQLite database, inside the current event's transaction.
    ///
    /// Use savepoints freely; do not run `BEGIN`, `COMMIT` or `ROLLBACK` yourself: the runtime
    /// owns the transaction (and fails the event if it finds it ended).
    pub fn sql(&self) -> &Connection {
        self.database()
    }

    /// The open database (with the runtime's own statements).
    pub(crate) fn database(&self) -> &Database {
        self.conn
            .as_ref()
            .expect("the database is open while a handler runs")
    }

    /// The typed key-value store in the agent's database.
    pub fn kv(&self) -> Kv<'_> {
        Kv::new(self.sql())
    }

    /// Brings the agent's own schema up to date: a database at `PRAGMA user_version = v` runs
    /// `migrations[v..]`, then records `migrations.len()`. Append migrations, never edit or
    /// reorder them. Typically called from `on_start`.
    pub fn migrate(&self, migrations: &[&str]) -> Result<(), Error> {
        storage::migrate(self.sql(), migrations)
    }

    /// The runtime's clock (the system clock, or the test's manual one).
    pub fn now(&self) -> SystemTime {
        self.shared.config.clock.now()
    }

    fn now_ms(&self) -> u64 {
        self.shared.config.clock.now_ms()
    }

    /// Schedules `call` (from `A::calls()`, so its argument types are checked at compile time)
    /// to run `when`. Returns the row's id. The row is part of this event's transaction.
    ///
    /// ```no_run
    /// # use agents::prelude::*;
    /// # #[derive(Default)] struct Reminders;
    /// # impl Agent for Reminders {}
    /// # #[agent] impl Reminders {
    /// #[callable]
    /// async fn remind_daily(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<i64, AppError> {
    ///     Ok(ctx.schedule(When::cron("0 9 * * *")?, Reminders::calls().notify(text))?)
    /// }
    /// #[callable]
    /// async fn notify(&mut self, ctx: &mut Ctx<Self>, text: String) { /* .. */ }
    /// # }
    /// ```
    pub fn schedule(&self, when: When, call: MethodCall<A>) -> Result<i64, Error> {
        self.insert(None, None, when, call)
    }

    /// Like [`schedule`](Ctx::schedule), but idempotent: if a row with `key` exists, it is kept
    /// and its id returned (cancel it first to replace it).
    pub fn schedule_keyed(&self, key: &str, when: When, call: MethodCall<A>) -> Result<i64, Error> {
        if key.starts_with("static:") || key.starts_with("__") {
            return Err(Error::Schedule(format!(
                "the key `{key}` is reserved (`static:` and `__` are the runtime's)"
            )));
        }
        self.insert(Some(key), None, when, call)
    }

    /// Runs `call` as soon as possible, durably: after this event commits, in its own event,
    /// retried with backoff on failure.
    pub fn enqueue(&self, call: MethodCall<A>) -> Result<i64, Error> {
        self.insert(None, None, When::now(), call)
    }

    fn insert<B>(
        &self,
        key: Option<&str>,
        target: Option<&AgentKey>,
        when: When,
        call: MethodCall<B>,
    ) -> Result<i64, Error> {
        let args = call
            .args()
            .map_err(|e| Error::Codec(format!("arguments of `{}`: {e}", call.method())))?;
        let args = Stored::Json(args.to_string());
        let now = self.now_ms();
        schedule::insert(self.sql(), key, target, call.method(), &args, &when, now)
    }

    /// Schedules `call` to the agent `B`/`name`: a durable call from this agent's queue. It
    /// runs `when` as one of this agent's events (which waits for `B`'s reply), with the same
    /// retries and dead letters as this agent's own rows: delivered at least once (a retry after
    /// a timeout may deliver it twice, so make the callee idempotent).
    pub fn schedule_to<B: AgentClass>(
        &self,
        name: &str,
        when: When,
        call: MethodCall<B>,
    ) -> Result<i64, Error> {
        let target = AgentKey::new(B::CLASS, name)?;
        self.shared
            .check_class(B::CLASS, Some(std::any::TypeId::of::<B>()))?;
        self.insert(None, Some(&target), when, call)
    }

    /// Calls the agent `B`/`name` as soon as possible, durably, from this agent's queue (see
    /// [`schedule_to`](Ctx::schedule_to)): after this event commits, retried with backoff.
    pub fn enqueue_to<B: AgentClass>(&self, name: &str, call: MethodCall<B>) -> Result<i64, Error> {
        self.schedule_to(name, When::now(), call)
    }

    /// The agent's scheduled rows (not its alarm), by next time.
    pub fn schedules(&self) -> Result<Vec<Schedule>, Error> {
        schedule::list(self.sql())
    }

    /// Cancels the row `id`; `false` if there was none.
    pub fn cancel(&self, id: i64) -> Result<bool, Error> {
        schedule::cancel(self.sql(), id)
    }

    /// Sets the agent's alarm to go off at `at` (replacing any earlier setting); `on_alarm`
    /// runs then.
    pub fn set_alarm(&self, at: SystemTime) -> Result<(), Error> {
        schedule::set_alarm(self.sql(), to_ms(at), self.now_ms())
    }

    /// When the alarm goes off, if it is set.
    pub fn alarm(&self) -> Result<Option<SystemTime>, Error> {
        Ok(schedule::alarm(self.sql())?.map(from_ms))
    }

    /// Clears the alarm; `false` if it was not set.
    pub fn delete_alarm(&self) -> Result<bool, Error> {
        schedule::delete_alarm(self.sql())
    }

    /// Rows that failed `1 + RETRIES` times and were taken off the schedule.
    pub fn dead_letters(&self) -> Result<Vec<DeadLetter>, Error> {
        schedule::dead_letters(self.sql())
    }

    /// Puts a dead letter back on the schedule, due now. Returns its new schedule id (`None`
    /// if there was no such dead letter, or a row with its key is already scheduled).
    pub fn retry_dead_letter(&self, id: i64) -> Result<Option<i64>, Error> {
        self.dead_letters_changed.store(true, Ordering::Relaxed);
        schedule::retry_dead_letter(self.sql(), id, self.now_ms())
    }

    /// Deletes a dead letter; `false` if there was none.
    pub fn discard_dead_letter(&self, id: i64) -> Result<bool, Error> {
        self.dead_letters_changed.store(true, Ordering::Relaxed);
        schedule::discard_dead_letter(self.sql(), id)
    }

    /// Destroys this agent once the event commits: its database and files are deleted, its
    /// schedules and alarm go with them, its connections are closed (1000, without `on_close`),
    /// and it costs nothing any more. The event's reply and what it sent are released first.
    /// An event that comes later finds a new, empty agent. If the event fails, nothing happens.
    ///
    /// Durable: the destruction commits with the event's writes, so a crash before the files
    /// are gone finishes it when the agent is next opened.
    pub fn destroy(&self) -> Result<(), Error> {
        storage::mark_destroyed(self.sql())?;
        self.turn.destroy.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// The runtime this agent runs in: for clients that wait on behalf of nobody, or anything
    /// else a [`Runtime`] does. Fails only while the runtime shuts down.
    pub fn runtime(&self) -> Result<Runtime, Error> {
        Runtime::of(&self.shared)
    }

    /// Runs `work` outside the agent's turn (an LLM call, an HTTP fetch: anything slow the
    /// agent should not wait for), then delivers `then(output)` to this agent as a call: an
    /// ordinary event, in its own transaction.
    ///
    /// Meanwhile the agent takes its other events. The work starts once this event's writes
    /// are durable, and never if the event fails. It lives in memory only: a crash or a
    /// shutdown loses work in progress (its result is never delivered). For work that must
    /// survive a crash, record it in the database first (and start it again from `on_start`),
    /// or `enqueue` a callable that does it inside the turn. The delivered call's arguments
    /// travel as JSON, as a scheduled call's do; its failure is logged.
    ///
    /// ```no_run
    /// # use agents::prelude::*;
    /// # #[derive(Default)] struct Assistant;
    /// # impl Agent for Assistant {}
    /// # async fn ask_model(q: String) -> String { q }
    /// # #[agent] impl Assistant {
    /// #[callable]
    /// async fn ask(&mut self, ctx: &mut Ctx<Self>, question: String) -> Result<(), AppError> {
    ///     ctx.sql().execute("INSERT INTO asked(q) VALUES (?1)", [&question])?;
    ///     let q = question.clone();
    ///     ctx.spawn(ask_model(q), move |answer| Assistant::calls().answered(question, answer));
    ///     Ok(())
    /// }
    ///
    /// #[callable(internal)]
    /// async fn answered(&mut self, ctx: &mut Ctx<Self>, question: String, answer: String) -> Result<(), AppError> {
    ///     ctx.sql().execute("UPDATE asked SET a = ?2 WHERE q = ?1", [&question, &answer])?;
    ///     Ok(())
    /// }
    /// # }
    /// ```
    pub fn spawn<F, T>(&self, work: F, then: impl FnOnce(T) -> MethodCall<A> + Send + 'static)
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let (shared, key) = (self.shared.clone(), self.key.clone());
        let task = async move {
            let call = then(work.await);
            let method = call.method();
            let args = match call.args() {
                Ok(args) => Payload::Json(args.clone()),
                Err(e) => {
                    return tracing::warn!(%key, "the result of spawned work for `{method}` could not be encoded: {e}")
                }
            };
            let call = OutgoingCall {
                method: method.into(),
                args,
                timeout: None,
            };
            if let Err(e) = call_value(&shared, key.clone(), call, Caller::agent_itself()).await {
                tracing::warn!(%key, "delivering the result of spawned work to `{method}` failed: {e}");
            }
        };
        lock(&self.turn.spawned).push(Box::pin(task));
    }

    /// A typed client for another agent (or another instance of this class). While this
    /// handler awaits it, this agent keeps its turn; a call that would come back to an agent
    /// already waiting in this chain fails at once with `RpcError::Cycle`.
    ///
    /// What a call waits on behalf of is decided when it is made, not when the client was: a
    /// call made by a handler (on its task) carries the agents waiting on that handler; a
    /// call made from a task the handler spawned, or after the handler returned (a client
    /// kept in a field and used by a later event carries that event's), carries only what
    /// really waits on it.
    pub fn agent<B: AgentClass>(&self, name: &str) -> B::Client {
        client_for::<B>(&self.shared, name)
    }
}

/// Connections and shared state.
impl<A: AgentClass> Ctx<A> {
    /// The connection the current call arrived on (`None` for calls from other agents, from
    /// HTTP, from schedules, and in hooks, which get their `Conn` as an argument).
    pub fn caller(&self) -> Option<&ConnId> {
        self.turn.caller.as_ref()
    }

    /// Who made the current call: the principal that `on_before_request` passed on for a call
    /// over HTTP, or that `on_before_connect` passed on for a call on a WebSocket. `None` for
    /// calls from Rust code (other agents, in-process clients, schedules), in hooks (see
    /// [`Conn::principal`] and the [`Principal`](crate::Principal) of an `HttpRequest`), and
    /// when the hook let the caller in without one.
    pub fn principal(&self) -> Option<&str> {
        self.turn.principal.as_deref()
    }

    /// The agent's open connections.
    pub fn connections(&self) -> Result<Vec<Conn<A>>, Error> {
        conn::flush_writes(self.sql(), &self.turn.effects)?;
        let open = self.shared.sockets.ids(self.key());
        self.load_conns(&open)
    }

    /// How many connections the agent has open (without loading them).
    pub fn connection_count(&self) -> usize {
        self.shared.sockets.count_of(self.key())
    }

    /// The open connections tagged `tag` (see [`Conn::set_tags`]).
    pub fn connections_tagged(&self, tag: &str) -> Result<Vec<Conn<A>>, Error> {
        conn::flush_writes(self.sql(), &self.turn.effects)?;
        let sockets = &self.shared.sockets;
        let ids: Vec<ConnId> = conn::tagged(self.sql(), tag)?
            .into_iter()
            .filter(|id| sockets.is_open(self.key(), id))
            .collect();
        self.load_conns(&ids)
    }

    /// The connection `id`, if it is open.
    pub fn connection(&self, id: &ConnId) -> Result<Option<Conn<A>>, Error> {
        if !self.shared.sockets.is_open(self.key(), id) {
            return Ok(None);
        }
        conn::flush_writes(self.sql(), &self.turn.effects)?;
        conn::load(self.sql(), id, &self.turn.effects)
    }

    fn load_conns(&self, ids: &[ConnId]) -> Result<Vec<Conn<A>>, Error> {
        let mut conns = Vec::with_capacity(ids.len());
        for id in ids {
            // A connection whose `on_connect` has not run yet is not listed.
            if let Some(c) = conn::load(self.sql(), id, &self.turn.effects)? {
                conns.push(c);
            }
        }
        Ok(conns)
    }

    /// Sends `event` to every open connection except those in `except` (and those whose
    /// `on_connect` has not succeeded yet), once this event's writes are durable (and not at
    /// all if it fails). A connection whose client does not keep up is closed; it never slows
    /// the others or the agent. The event is encoded only for the protocols they speak.
    pub fn broadcast(&self, event: &A::Event, except: &[ConnId]) -> Result<(), Error> {
        let speaks = self.shared.sockets.speaks(self.key());
        let outgoing = Arc::new(Outgoing::Event(Encoded::new(event, "the event", speaks)?));
        conn::push(
            &self.turn.effects,
            Effect::Broadcast(outgoing, except.to_vec()),
        );
        Ok(())
    }

    /// Sends `event` to the connection `to` (if it is still open then), after this event's
    /// writes are durable.
    pub fn send(&self, to: &ConnId, event: &A::Event) -> Result<(), Error> {
        let speaks = self.shared.sockets.speaks(self.key());
        let outgoing = Arc::new(Outgoing::Event(Encoded::new(event, "the event", speaks)?));
        conn::push(&self.turn.effects, Effect::Send(to.clone(), outgoing));
        Ok(())
    }

    /// The shared state, if it was ever set.
    pub fn state(&self) -> Result<Option<A::State>, Error> {
        conn::load_state(self.sql())?
            .map(|s| s.decode("the shared state"))
            .transpose()
    }

    /// Stores the shared state (in this event's transaction) and pushes it to every
    /// connection as a `state` frame once the write is durable.
    pub fn set_state(&self, state: &A::State) -> Result<(), Error> {
        // JSON always: it is what is stored.
        let speaks = Speaks {
            json: true,
            ..self.shared.sockets.speaks(self.key())
        };
        let encoded = Encoded::new(state, "the shared state", speaks)?;
        let json = encoded.json().map_err(Error::Codec)?.to_owned();
        conn::store_state(self.sql(), &Stored::Json(json))?;
        conn::push(
            &self.turn.effects,
            Effect::Broadcast(Arc::new(Outgoing::State(encoded)), Vec::new()),
        );
        Ok(())
    }
}

impl<A> fmt::Debug for Ctx<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
