//! Cluster mode: N nodes on one PostgreSQL, each agent on at most one of them.
//!
//! PostgreSQL is the coordination and durability engine (see `store` for the tables):
//! membership is a lease per node, ownership a compare-and-set that bumps the agent's epoch,
//! and an agent's durable state is its SQLite change log (the WAL frames its batches
//! committed, `replica`), appended under the epoch's fence, with snapshots that bound what a
//! restore replays. The runtime reaches it through its seams: the commit gate (a batch is
//! durable once its frames are appended), the registry's routing (an agent another node owns
//! is reached there) and the alarm index.
//!
//! The protocol's safety rests on two statements of `store`, checked against a real
//! PostgreSQL (the tests below) and, under random delays, pauses and crashes, against a model
//! (`tests/cluster_model.rs`): a take bumps the epoch only when the owner's lease expired, and
//! an append locks the owner row and keeps a set only at the current epoch.

// The runtime's side (activation, the commit gate, routing) comes in the next step; until
// then only the tests use these.
#![cfg_attr(not(test), allow(dead_code))]

mod store;

#[allow(unused_imports)]
pub(crate) use store::{Append, Owner, Store, StoreError};

#[cfg(test)]
mod tests;
