//! The delivery port: what the core (registry, instances, `Ctx`) needs of the front ends that
//! hold connections, and nothing more. The WebSocket wing implements it; the core names no type
//! of the wing (`tests/layering.rs` checks the imports).

use crate::{
    address::AgentKey,
    conn::{ConnId, Effect, Speaks},
    registry::CallReply,
};

/// The close code of a normal closure.
pub(crate) const NORMAL_CLOSURE: u16 = 1000;

/// The connections of every agent, live or hibernating.
pub(crate) trait Connections: Send + Sync + 'static {
    /// Sends what an event produced (once it is durable) to `key`'s connections.
    fn deliver(&self, key: &AgentKey, effects: Vec<Effect>);
    /// The ids of `key`'s open connections.
    fn ids(&self, key: &AgentKey) -> Vec<ConnId>;
    /// Whether `key`'s connection `id` is open.
    fn is_open(&self, key: &AgentKey, id: &ConnId) -> bool;
    /// What `key`'s open connections speak (a value they are sent is encoded in that only).
    fn speaks(&self, key: &AgentKey) -> Speaks;
    /// How many connections `key` has open.
    fn count_of(&self, key: &AgentKey) -> usize;
    /// How many connections are open, over all agents.
    fn count(&self) -> usize;
    /// Closes every connection of `key` with `code` and `reason`, and forgets them: their
    /// `on_close` does not run (the agent is gone).
    fn close_agent(&self, key: &AgentKey, code: u16, reason: &str);
    /// Closes every connection (the runtime is shutting down).
    fn close_all(&self);
}

/// Where the reply to a call that a front end made goes (say, straight into a socket's queue).
pub(crate) trait ReplyPort: Send + 'static {
    /// Whether nobody waits for the reply any more (the call need not run).
    fn is_gone(&self) -> bool;
    /// Delivers the reply (dropped if nobody waits for it).
    fn send(self: Box<Self>, reply: CallReply);
}
