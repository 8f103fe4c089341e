//! Streaming callables: [`Streaming`], what such a callable returns, and [`StreamSender`], the
//! producer side of [`Streaming::channel`].

use std::{fmt, panic::AssertUnwindSafe, sync::Arc};

use agents_client::{Codec, NoError, Payload, RawError, RawStream};
use futures_util::{stream::BoxStream, FutureExt, Stream, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc;

/// The output of a streaming callable: items of type `T`, sent to the caller one by one (as
/// `chunk` frames over a WebSocket), ending well or with an error `E`.
///
/// A callable streams by returning it, `Streaming<T>` or `Result<Streaming<T, E>, E>` (the
/// stream fails with the callable's own error type):
///
/// ```
/// use agents::prelude::*;
/// # #[derive(Default)] pub struct Feed;
/// # impl Agent for Feed {}
/// #[agent]
/// impl Feed {
///     /// The numbers `0..n`, one chunk each.
///     #[callable]
///     pub async fn count(&mut self, ctx: &mut Ctx<Self>, n: u32) -> Streaming<u32> {
///         Streaming::iter(0..n)
///     }
/// }
/// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// # let dir = tempfile::tempdir()?;
/// # let runtime = Runtime::builder().data_dir(dir.path()).agent::<Feed>().build()?;
/// let mut chunks = runtime.agent::<Feed>("news").count(3).await;
/// while let Some(n) = chunks.next().await {
///     println!("{}", n?);
/// }
/// # Ok(()) }
/// ```
///
/// **How it runs.** The callable itself is an event like any other: it runs alone on the
/// agent, in a transaction, and its writes commit before anything leaves. The stream it
/// returns is then driven *outside* the agent, by the connection (or the caller) that receives
/// it: the agent takes its next event at once, and a slow stream (a model generating tokens)
/// never holds it up. So the stream cannot borrow the agent or its context; what it needs it
/// moves in, and to write to the agent again it calls it (`runtime.agent::<A>(name)`), which is
/// a new event. Dropping the stream (the caller cancelled, disconnected, or its timeout between
/// two chunks passed) stops it; a panic in it ends the stream with an `internal` error.
pub struct Streaming<T, E = NoError> {
    inner: BoxStream<'static, Result<T, E>>,
}

impl<T: Send + 'static, E: Send + 'static> Streaming<T, E> {
    /// Streams the items of `stream`; an `Err` item ends it with that error.
    pub fn new(stream: impl Stream<Item = Result<T, E>> + Send + 'static) -> Self {
        Streaming {
            inner: stream.boxed(),
        }
    }

    /// Streams the items of an iterator (which runs outside the agent, like any stream).
    pub fn iter<I>(items: I) -> Self
    where
        I: IntoIterator<Item = T>,
        I::IntoIter: Send + 'static,
    {
        Streaming::new(futures_util::stream::iter(items.into_iter().map(Ok)))
    }

    /// A stream fed by the returned sender, for items produced by a task of your own (a model
    /// generating tokens, a file being read). Up to `capacity` items wait for a slow receiver;
    /// beyond that [`StreamSender::send`] waits. The stream ends when the sender is dropped.
    ///
    /// ```
    /// # use agents::{Streaming, AppError};
    /// # #[tokio::main] async fn main() {
    /// let (tx, stream) = Streaming::<String, AppError>::channel(16);
    /// tokio::spawn(async move {
    ///     for word in ["hello", "world"] {
    ///         if tx.send(word.to_owned()).await.is_err() {
    ///             return; // the caller went away
    ///         }
    ///     }
    /// });
    /// # drop(stream);
    /// # }
    /// ```
    pub fn channel(capacity: usize) -> (StreamSender<T, E>, Self) {
        let (tx, mut rx) = mpsc::channel(capacity.max(1));
        let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        (StreamSender { tx }, Streaming::new(stream))
    }
}

impl<T, E> fmt::Debug for Streaming<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Streaming").finish_non_exhaustive()
    }
}

/// Feeds a [`Streaming::channel`].
pub struct StreamSender<T, E = NoError> {
    tx: mpsc::Sender<Result<T, E>>,
}

/// The receiving end of a stream is gone: the caller cancelled or disconnected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the caller no longer receives this stream")]
pub struct StreamClosed;

impl<T, E> StreamSender<T, E> {
    /// Sends one item, waiting while the stream's buffer is full.
    pub async fn send(&self, item: T) -> Result<(), StreamClosed> {
        self.tx.send(Ok(item)).await.map_err(|_| StreamClosed)
    }

    /// Ends the stream with `error`.
    pub async fn fail(self, error: E) -> Result<(), StreamClosed> {
        self.tx.send(Err(error)).await.map_err(|_| StreamClosed)
    }

    /// Whether the caller has gone away (sending would fail).
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

impl<T, E> fmt::Debug for StreamSender<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSender")
            .field("closed", &self.tx.is_closed())
            .finish()
    }
}

impl<T, E> Streaming<T, E>
where
    T: Serialize + Send + 'static,
    E: Serialize + fmt::Display + Send + 'static,
{
    /// The stream encoded in `codec`: each item a chunk, an error as an `app` error, a panic as
    /// an `internal` one.
    pub(crate) fn encode(self, codec: Codec, method: String) -> RawStream {
        let method: Arc<str> = method.into();
        let stream = futures_util::stream::unfold(Some(self.inner), move |inner| {
            let method = method.clone();
            async move {
                let mut inner = inner?;
                let item = match AssertUnwindSafe(inner.next()).catch_unwind().await {
                    Ok(None) => return None,
                    Ok(Some(Ok(item))) => codec.pass(item).map_err(|e| {
                        RawError::internal(format!("could not encode a chunk of `{method}`: {e}"))
                    }),
                    Ok(Some(Err(e))) => Err(RawError::app(codec, e)),
                    Err(_) => Err(RawError::internal(format!(
                        "the stream of `{method}` panicked"
                    ))),
                };
                let rest = item.is_ok().then_some(inner);
                Some((item, rest))
            }
        });
        RawStream::new(stream, None)
    }
}

/// What a call returned: a value, or the stream of a streaming callable.
#[derive(Debug)]
pub(crate) enum Returned {
    Value(Payload),
    Stream(RawStream),
}

/// The chunks of `stream` as one list (a JSON array, or a postcard sequence that decodes as
/// `Vec<T>`), or its first error; an error too if they add up to more than `limit` bytes.
pub(crate) async fn collect(
    mut stream: RawStream,
    codec: Codec,
    limit: usize,
) -> Result<Payload, RawError> {
    let mut items = Vec::new();
    let mut size = 0;
    while let Some(item) = stream.next().await {
        let item = item?;
        size += match &item {
            Payload::Json(v) => v.to_string().len(),
            Payload::Postcard(b) => b.len(),
            Payload::Value(_) => 0,
        };
        if size > limit {
            return Err(RawError::internal(format!(
                "the stream is over {limit} bytes: too much for one reply (read it as a stream, over a WebSocket)"
            )));
        }
        items.push(item);
    }
    Ok(match codec {
        Codec::Json => Payload::Json(serde_json::Value::Array(
            items
                .into_iter()
                .map(|p| match p {
                    Payload::Json(v) => v,
                    _ => serde_json::Value::Null,
                })
                .collect(),
        )),
        Codec::Postcard => {
            // A postcard sequence is its length (a varint), then its items back to back.
            let mut bytes = postcard::to_stdvec(&items.len()).expect("a length encodes");
            for item in items {
                if let Payload::Postcard(b) = item {
                    bytes.extend_from_slice(&b);
                }
            }
            Payload::Postcard(bytes)
        }
        Codec::Value => {
            return Err(RawError::internal(
                "the chunks of a stream passed in-process cannot be collected into one value: read it as a stream",
            ))
        }
    })
}
