//! The API of a counter agent, for its callers: `CounterApiClient`, generated from the trait.
//!
//! This crate depends on `agents-client` and serde only; the server crate implements the trait
//! with `#[agent] impl CounterApi for Counter` (see `tests/interface.rs`).

use agents_client::interface;
use serde::{Deserialize, Serialize};

/// Why the counter refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum CounterError {
    /// Counting down below zero.
    #[error("the counter cannot go below zero (it is at {0})")]
    BelowZero(i64),
}

/// What the counter pushes to its connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Changed {
    /// The total is now this.
    To(i64),
}

/// A durable counter.
#[interface(event = "Changed")]
pub trait CounterApi {
    /// Adds `by` (negative to count down); returns the total.
    async fn add(&self, by: i64) -> Result<i64, CounterError>;

    /// The total.
    async fn get(&self) -> i64;
}
