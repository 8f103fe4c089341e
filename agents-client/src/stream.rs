//! Typed streams of what an agent pushes to a connection: [`EventStream`] and [`StateStream`].

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};

use crate::Payload;

/// Why an item of a stream is missing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The stream was read too slowly and `n` items were dropped (the newest are kept).
    #[error("{0} items were missed: the stream was read too slowly")]
    Lagged(u64),
    /// An item did not decode as the expected type (the agent's code changed its type?).
    #[error("an item did not decode: {0}")]
    Decode(String),
}

fn decode<T: DeserializeOwned>(payload: &Payload) -> Result<T, StreamError> {
    payload
        .decode()
        .map_err(|e| StreamError::Decode(e.to_string()))
}

/// The events an agent sends to one connection, typed, from the moment the stream was made.
/// Survives reconnects: events resume once the client is connected again (those sent while it
/// was away are lost).
pub struct EventStream<E> {
    rx: Option<broadcast::Receiver<Payload>>,
    _event: PhantomData<fn() -> E>,
}

impl<E: DeserializeOwned> EventStream<E> {
    /// A stream over `rx`; `None` makes a stream that ends at once.
    pub fn new(rx: Option<broadcast::Receiver<Payload>>) -> Self {
        EventStream {
            rx,
            _event: PhantomData,
        }
    }

    /// The next event; `None` once the client is gone for good (or has no connection).
    pub async fn next(&mut self) -> Option<Result<E, StreamError>> {
        let rx = self.rx.as_mut()?;
        match rx.recv().await {
            Ok(payload) => Some(decode(&payload)),
            Err(broadcast::error::RecvError::Lagged(n)) => Some(Err(StreamError::Lagged(n))),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// The changes of an agent's shared state, typed.
pub struct StateStream<S> {
    rx: Option<watch::Receiver<Option<Payload>>>,
    _state: PhantomData<fn() -> S>,
}

impl<S: DeserializeOwned> StateStream<S> {
    /// A stream over `rx`; `None` makes a stream that ends at once.
    pub fn new(rx: Option<watch::Receiver<Option<Payload>>>) -> Self {
        StateStream {
            rx,
            _state: PhantomData,
        }
    }

    /// Waits for the state to change and returns the new state (intermediate states may be
    /// skipped: this is the latest); `None` once the client is gone for good.
    pub async fn changed(&mut self) -> Option<Result<S, StreamError>> {
        let rx = self.rx.as_mut()?;
        loop {
            rx.changed().await.ok()?;
            if let Some(payload) = &*rx.borrow_and_update() {
                return Some(decode(payload));
            }
        }
    }
}

/// Decodes the latest state of `rx`, if any.
pub(crate) fn latest<S: DeserializeOwned>(rx: &watch::Receiver<Option<Payload>>) -> Option<S> {
    rx.borrow().as_ref().and_then(|p| p.decode().ok())
}
