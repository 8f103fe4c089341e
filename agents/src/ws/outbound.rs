//! The frames waiting to go out on one connection: a bounded queue from everything that sends
//! on it (the agent's replies and events, streams) to the connection's writer task.
//!
//! Its slots are allocated as frames queue up, so a connection that never had much to send
//! holds few (a tokio channel allocates a block of 32 up front, 1.5 KiB of every idle
//! connection). A client that does not read is disconnected (`overflow` is cancelled), never
//! waited for; only the chunks of a stream wait for room (the stream slows down to the
//! client's pace).
//!
//! What counts is what the client has not read, not what one event queued: past `capacity`
//! frames the connection is closed only if the writer is stalled — frames have waited for
//! [`STALL`] without the writer taking one, because the client does not take what was written.
//! A burst (one event that sends thousands of frames to a client that reads) passes, up to
//! [`BURST`] times the capacity, which bounds what a connection can hold in any case.
//!
//! The queue also holds the socket's sending half, which the writer task writes through. A
//! reply that finds the writer idle and nothing queued is written at once by whoever sends it
//! ([`Outbound::send_now`]), as far as the socket takes it without waiting: a sequential call
//! does not wait for the writer task to wake up; what the socket does not take at once is left
//! to the writer.

use std::{
    collections::VecDeque,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex, MutexGuard,
    },
    task::{Context, Poll, Waker},
    time::Duration,
};

use axum::extract::ws::{Message, WebSocket};
use futures_util::{stream::SplitSink, SinkExt};
use tokio::{sync::Notify, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::lock::lock;

/// How long frames may wait without the writer taking one before a queue past its capacity
/// counts as a client that does not read.
pub(crate) const STALL: Duration = Duration::from_secs(1);

/// How many times its capacity a queue may hold while its writer keeps taking frames.
pub(crate) const BURST: usize = 16;

/// The sending half of a socket.
pub(crate) type Sink = SplitSink<WebSocket, Message>;

/// A queue of `capacity` frames to `sink` (none: frames are only queued); `overflow` is
/// cancelled when a frame finds it past that and the writer stalled, or past `BURST` times
/// that.
pub(crate) fn queue(
    capacity: usize,
    overflow: CancellationToken,
    sink: Option<Sink>,
) -> (Outbound, Frames) {
    let capacity = capacity.max(1);
    let shared = Arc::new(Shared {
        state: Mutex::default(),
        sink: Mutex::new(sink),
        senders: AtomicUsize::new(1),
        queued: Notify::new(),
        taken: Notify::new(),
        capacity,
        // Half the queue is kept for the frames that cannot wait.
        room: capacity - (capacity / 2).max(1),
        overflow,
    });
    (
        Outbound {
            shared: shared.clone(),
        },
        Frames { shared },
    )
}

struct Shared {
    state: Mutex<State>,
    /// The socket's sending half: held by the writer task while `State::writing`, written by
    /// a sender while not (under the state's lock); gone with the writer.
    sink: Mutex<Option<Sink>>,
    /// How many `Outbound`s there are: the writer ends when none is left and all is sent.
    senders: AtomicUsize,
    /// Wakes the writer: a frame was queued, or the last sender went away.
    queued: Notify,
    /// Wakes the streams waiting for room: the queue went down to `room` frames, or the writer
    /// went away.
    taken: Notify,
    capacity: usize,
    /// A frame that can wait is queued only while at most this many frames are.
    room: usize,
    overflow: CancellationToken,
}

#[derive(Default)]
struct State {
    frames: VecDeque<Message>,
    /// When the writer last took a frame, or the first of the frames now queued arrived:
    /// frames have waited since then with no progress.
    progress: Option<Instant>,
    /// The writer is gone (the connection closed): frames are dropped.
    writer_gone: bool,
    /// The writer task has frames in hand, or bytes in the socket's buffer to flush: a frame
    /// sent now must queue behind them.
    writing: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }
}

/// The sending side.
pub(crate) struct Outbound {
    shared: Arc<Shared>,
}

impl Clone for Outbound {
    fn clone(&self) -> Self {
        self.shared.senders.fetch_add(1, Ordering::Relaxed);
        Outbound {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Outbound {
    fn drop(&mut self) {
        if self.shared.senders.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.shared.queued.notify_one();
        }
    }
}

impl Outbound {
    /// Queues `frame`, or, if the client does not read (the queue is past its capacity and the
    /// writer stalled, or past `BURST` times it), has the connection closed. Dropped if the
    /// connection is gone.
    pub fn send(&self, frame: Message) {
        let mut state = self.shared.state();
        if state.writer_gone {
            return;
        }
        let queued = state.frames.len();
        if queued == 0 {
            state.progress = Some(Instant::now());
        } else if queued >= self.shared.capacity {
            let stalled = state.progress.is_some_and(|p| p.elapsed() >= STALL);
            if stalled || queued >= self.shared.capacity.saturating_mul(BURST) {
                drop(state);
                tracing::debug!("closing a connection whose client does not read its frames");
                self.shared.overflow.cancel();
                return;
            }
        }
        state.frames.push_back(frame);
        drop(state);
        self.shared.queued.notify_one();
    }

    /// Sends `frame` as [`send`](Self::send) does, but writes it at once if nothing is queued
    /// or being written, as far as the socket takes it without waiting (what it does not take
    /// is left to the writer task).
    pub fn send_now(&self, frame: Message) {
        let mut state = self.shared.state();
        if state.writing || !state.frames.is_empty() || state.writer_gone {
            drop(state);
            return self.send(frame);
        }
        let mut sink = lock(&self.shared.sink);
        let Some(sink) = sink.as_mut() else {
            drop((sink, state));
            return self.send(frame);
        };
        // Polled with a waker that does nothing: nobody waits here; the writer task, woken
        // below, polls again with its own.
        let mut cx = Context::from_waker(Waker::noop());
        let left = match sink.poll_ready_unpin(&mut cx) {
            // The connection failed: the reader sees it and ends it.
            Poll::Ready(Err(_)) => return,
            Poll::Ready(Ok(())) => match sink.start_send_unpin(frame) {
                Err(_) => return,
                Ok(()) => None,
            },
            // The socket's buffer is full: the frame waits for the writer.
            Poll::Pending => Some(frame),
        };
        if left.is_none() && sink.poll_flush_unpin(&mut cx).is_ready() {
            return;
        }
        // What is left (the frame, or its bytes in the socket's buffer) is the writer's.
        state.frames.extend(left);
        state.progress = Some(Instant::now());
        state.writing = true;
        drop(state);
        self.shared.queued.notify_one();
    }

    /// Waits until half the queue is free, for a frame that can wait (a chunk of a stream), so
    /// that the frames that cannot (replies, events) still find room. `false` if the
    /// connection is gone.
    pub async fn wait_for_room(&self) -> bool {
        loop {
            let taken = self.shared.taken.notified();
            tokio::pin!(taken);
            taken.as_mut().enable();
            {
                let state = self.shared.state();
                if state.writer_gone {
                    return false;
                }
                if state.frames.len() <= self.shared.room {
                    return true;
                }
            }
            taken.await;
        }
    }
}

/// The writer's side.
pub(crate) struct Frames {
    shared: Arc<Shared>,
}

/// What the writer is to do next.
pub(crate) enum Next {
    /// Write this frame.
    Frame(Message),
    /// Flush what a sender left in the socket's buffer.
    Flush,
}

impl Frames {
    /// What to do next: a frame to write, or a flush to finish; `None` once every sender is
    /// gone and everything was taken. Until [`written`](Self::written), the writer is writing:
    /// senders queue.
    pub async fn next(&self) -> Option<Next> {
        loop {
            if let Some(next) = self.try_next() {
                return Some(next);
            }
            // Nothing queued: wait, having checked again once registered for a wake-up.
            let queued = self.shared.queued.notified();
            tokio::pin!(queued);
            queued.as_mut().enable();
            if let Some(next) = self.try_next() {
                return Some(next);
            }
            if self.shared.senders.load(Ordering::Acquire) == 0 {
                return self.try_next();
            }
            queued.await;
        }
    }

    fn try_next(&self) -> Option<Next> {
        if let Some(frame) = self.try_recv() {
            return Some(Next::Frame(frame));
        }
        self.shared.state().writing.then_some(Next::Flush)
    }

    /// The writer wrote and flushed what it took: if nothing was queued meanwhile, senders
    /// may write again themselves.
    pub fn written(&self) {
        let mut state = self.shared.state();
        if state.frames.is_empty() {
            state.writing = false;
        }
    }

    /// The socket's sending half, for the writer while it writes (senders queue meanwhile);
    /// it goes back when the returned guard is dropped.
    pub fn hold(&self) -> Held<'_> {
        Held {
            sink: lock(&self.shared.sink).take(),
            frames: self,
        }
    }

    /// The next frame if one is queued (the writer is then writing).
    pub fn try_recv(&self) -> Option<Message> {
        let mut state = self.shared.state();
        let frame = state.frames.pop_front()?;
        state.writing = true;
        let left = state.frames.len();
        if left > 0 {
            state.progress = Some(Instant::now());
        }
        drop(state);
        if left == self.shared.room {
            self.shared.taken.notify_waiters();
        }
        Some(frame)
    }
}

/// The socket's sending half while the writer holds it (see [`Frames::hold`]).
pub(crate) struct Held<'a> {
    sink: Option<Sink>,
    frames: &'a Frames,
}

impl Held<'_> {
    /// Writes `frame` into the socket's buffer (its flush may wait for the next frames).
    pub async fn feed(&mut self, frame: Message) -> Result<(), axum::Error> {
        self.sink()?.feed(frame).await
    }

    /// Writes what the socket's buffer holds.
    pub async fn flush(&mut self) -> Result<(), axum::Error> {
        self.sink()?.flush().await
    }

    /// The sending half; an error if the queue has none (it was made without a socket).
    fn sink(&mut self) -> Result<&mut Sink, axum::Error> {
        self.sink
            .as_mut()
            .ok_or_else(|| axum::Error::new("the queue has no socket to write to"))
    }

    /// Writes `frame` and flushes.
    pub async fn send(&mut self, frame: Message) -> Result<(), axum::Error> {
        self.feed(frame).await?;
        self.flush().await
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        *lock(&self.frames.shared.sink) = self.sink.take();
    }
}

impl Drop for Frames {
    fn drop(&mut self) {
        let (frames, sink) = {
            let mut state = self.shared.state();
            state.writer_gone = true;
            let sink = lock(&self.shared.sink).take();
            (std::mem::take(&mut state.frames), sink)
        };
        drop((frames, sink));
        self.shared.taken.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Message {
        Message::Text(s.into())
    }

    fn taken(frames: &Frames) -> Vec<String> {
        std::iter::from_fn(|| frames.try_recv())
            .map(|m| m.to_text().unwrap().to_owned())
            .collect()
    }

    #[tokio::test]
    async fn frames_leave_in_order_and_the_writer_ends_with_the_last_sender() {
        let (out, frames) = queue(8, CancellationToken::new(), None);
        let other = out.clone();
        out.send(text("a"));
        other.send(text("b"));
        let Some(Next::Frame(a)) = frames.next().await else {
            panic!("a frame is queued")
        };
        assert_eq!(a.to_text().unwrap(), "a");
        drop(out);
        other.send(text("c"));
        drop(other);
        assert_eq!(taken(&frames), ["b", "c"]);
        frames.written();
        assert!(frames.next().await.is_none(), "every sender is gone");
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_whose_writer_stalled_closes_the_connection_instead_of_waiting() {
        let overflow = CancellationToken::new();
        let (out, frames) = queue(3, overflow.clone(), None);
        for f in ["1", "2", "3", "4"] {
            out.send(text(f));
        }
        assert!(!overflow.is_cancelled(), "a burst past the capacity passes");
        tokio::time::advance(STALL).await;
        out.send(text("5"));
        assert!(
            overflow.is_cancelled(),
            "frames waited for a second and the writer took none: the client does not read"
        );
        assert_eq!(
            taken(&frames),
            ["1", "2", "3", "4"],
            "the frame past the limit is not queued"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_writer_that_keeps_taking_frames_is_not_stalled_but_a_burst_is_bounded() {
        let overflow = CancellationToken::new();
        let (out, frames) = queue(3, overflow.clone(), None);
        for round in 0..10 {
            for _ in 0..3 {
                out.send(text(&round.to_string()));
            }
            tokio::time::advance(STALL).await;
            frames.try_recv().unwrap(); // the client read one: progress
        }
        assert!(!overflow.is_cancelled(), "slow, but reading");
        taken(&frames);
        for n in 0..3 * BURST {
            out.send(text(&n.to_string()));
        }
        assert!(!overflow.is_cancelled());
        out.send(text("one too many"));
        assert!(overflow.is_cancelled(), "BURST times the capacity at most");
    }

    #[tokio::test]
    async fn a_stream_waits_for_half_the_queue_and_stops_when_the_writer_is_gone() {
        let (out, frames) = queue(4, CancellationToken::new(), None);
        for f in ["1", "2", "3"] {
            out.send(text(f));
        }
        // Room is kept for frames that cannot wait: a chunk waits until two are left.
        let waiting = tokio::spawn({
            let out = out.clone();
            async move { out.wait_for_room().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        frames.try_recv();
        assert!(
            waiting.await.unwrap(),
            "room again once the queue is down to half"
        );
        assert!(out.wait_for_room().await);
        drop(frames);
        assert!(!out.wait_for_room().await, "the connection is gone");
        out.send(text("dropped")); // no panic, no overflow: nobody reads any more
    }
}
