//! Typed streams of what an agent pushes to a connection ([`EventStream`], [`StateStream`]) and
//! of the chunks of a streaming call ([`CallStream`]).

use std::marker::PhantomData;

use serde::de::DeserializeOwned;
use tokio::sync::{broadcast, watch};

use crate::{Payload, RawStream, RpcError};

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

fn decode<T: DeserializeOwned + 'static>(payload: &Payload) -> Result<T, StreamError> {
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

impl<E: DeserializeOwned + 'static> EventStream<E> {
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

impl<S: DeserializeOwned + 'static> StateStream<S> {
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
pub(crate) fn latest<S: DeserializeOwned + 'static>(
    rx: &watch::Receiver<Option<Payload>>,
) -> Option<S> {
    rx.borrow().as_ref().and_then(|p| p.decode().ok())
}

/// The chunks of one call of a streaming callable, typed: `Ok` chunks in the order the agent
/// produced them, then the end (`None`), or an error as the last item. Each wait for a chunk has
/// the call's timeout. Dropping the stream cancels the call: the agent's stream is dropped.
///
/// The chunks leave the agent only once the writes of the call that started them are durable.
pub struct CallStream<T, E> {
    method: &'static str,
    raw: RawStream,
    _types: PhantomData<fn() -> (T, E)>,
}

impl<T: DeserializeOwned + 'static, E: DeserializeOwned + 'static> CallStream<T, E> {
    /// The typed chunks of `raw`, a stream of `method`.
    pub fn new(method: &'static str, raw: RawStream) -> Self {
        CallStream {
            method,
            raw,
            _types: PhantomData,
        }
    }

    /// The next chunk; `None` once the stream ended well. After an error, the stream is over.
    pub async fn next(&mut self) -> Option<Result<T, RpcError<E>>> {
        let item = match self.raw.next().await? {
            Ok(chunk) => chunk.decode().map_err(|e| {
                RpcError::Internal(format!(
                    "could not decode a chunk of `{}`: {e}",
                    self.method
                ))
            }),
            Err(raw) => Err(raw.into_typed()),
        };
        if item.is_err() {
            self.raw = RawStream::new(futures_util::stream::empty(), None);
        }
        Some(item)
    }

    /// Every chunk, once the stream has ended; the first error instead if it failed.
    pub async fn collect(mut self) -> Result<Vec<T>, RpcError<E>> {
        let mut all = Vec::new();
        while let Some(item) = self.next().await {
            all.push(item?);
        }
        Ok(all)
    }
}

impl<T, E> std::fmt::Debug for CallStream<T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallStream")
            .field("method", &self.method)
            .field("raw", &self.raw)
            .finish()
    }
}
