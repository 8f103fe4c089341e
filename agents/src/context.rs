//! [`Ctx`]: what a handler can reach besides `self`.

use std::{fmt, marker::PhantomData, sync::Arc};

use rusqlite::Connection;

use crate::{
    address::AgentKey,
    agent::AgentClass,
    error::Error,
    registry::{Chain, Shared},
    runtime::client_for,
    storage::{self, Kv},
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
    pub(crate) conn: Option<Connection>,
    /// The agents waiting on the current event, this one included.
    pub(crate) chain: Chain,
    _agent: PhantomData<fn() -> A>,
}

impl<A> Ctx<A> {
    pub(crate) fn new(shared: Arc<Shared>, key: AgentKey) -> Self {
        Ctx {
            id: key.id(),
            key,
            shared,
            conn: None,
            chain: Chain::default(),
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

    /// A typed client for another agent (or another instance of this class). While this
    /// handler awaits it, this agent keeps its turn; a call that would come back to an agent
    /// already waiting in this chain fails at once with `RpcError::Cycle`.
    pub fn agent<B: AgentClass>(&self, name: &str) -> B::Client {
        client_for::<B>(&self.shared, name, self.chain.clone())
    }
}

impl<A> fmt::Debug for Ctx<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ctx")
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}
