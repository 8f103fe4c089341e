//! The calls in flight on one connection, by the client's id.
//!
//! A call is answered by whoever takes it out of the table first: the agent (its reply goes
//! straight from the agent into the socket's queue, with no task of its own), a `cancel`, the
//! call's deadline, or the end of the connection (which answers nothing). A call taken out
//! before the agent runs it is skipped by the agent: it never runs. Each entry has a sequence
//! number, so that a client reusing the id of a finished call is not confused with it.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard},
};

use agents_client::{Codec, Payload, RawError, RawStream};
use tokio::{sync::Notify, task::AbortHandle, time::Instant};

use super::outbound::Outbound;
use crate::lock::lock;
use crate::port::{CallReply, Protocol, ReplyPort, Returned};

/// The table of one connection's calls in flight.
#[derive(Default)]
pub(crate) struct InFlight {
    table: Mutex<Table>,
    /// Wakes the streams waiting for credit.
    credited: Notify,
}

#[derive(Default)]
struct Table {
    calls: HashMap<u64, Entry>,
    next_seq: u64,
    /// Credit that came before its call (at most `EARLY_CREDITS` ids).
    early: HashMap<u64, u64>,
    /// The agent refused the connection: calls are no longer entered (so never run).
    refused: bool,
}

/// How many calls not yet made a connection may hold credit for.
const EARLY_CREDITS: usize = 1024;

struct Entry {
    seq: u64,
    /// When the call times out; `None` once it streams (its chunks may take longer).
    deadline: Option<Instant>,
    /// The task sending the call's stream.
    stream: Option<AbortHandle>,
    /// How many more chunks the client takes; `None` until it first says (no flow control).
    credit: Option<u64>,
}

impl InFlight {
    fn table(&self) -> MutexGuard<'_, Table> {
        lock(&self.table)
    }

    /// Enters call `id`, due by `deadline`; `None` if a call with that id is in flight.
    pub fn start(
        self: &Arc<Self>,
        id: u64,
        deadline: Instant,
        out: &Outbound,
        wire: Protocol,
        codec: Codec,
    ) -> Option<SocketReply> {
        let mut table = self.table();
        let seq = table.next_seq;
        table.next_seq += 1;
        if table.calls.contains_key(&id) {
            return None;
        }
        let entry = Entry {
            seq,
            deadline: Some(deadline),
            stream: None,
            credit: table.early.remove(&id),
        };
        if !table.refused {
            table.calls.insert(id, entry);
        }
        Some(SocketReply {
            id,
            seq,
            calls: self.clone(),
            out: out.clone(),
            wire,
            codec,
        })
    }

    /// Takes call `id` out (stopping its stream, if it streams); whether it was in flight.
    pub fn cancel(&self, id: u64) -> bool {
        let entry = self.table().calls.remove(&id);
        entry.inspect(Entry::stop).is_some()
    }

    /// Lets call `id` stream `chunks` more chunks; kept for the call if it is not made yet.
    pub fn credit(&self, id: u64, chunks: u32) {
        let mut guard = self.table();
        let table = &mut *guard;
        let credit = match table.calls.get_mut(&id) {
            Some(entry) => entry.credit.get_or_insert(0),
            None if table.early.len() < EARLY_CREDITS || table.early.contains_key(&id) => {
                table.early.entry(id).or_default()
            }
            None => return,
        };
        *credit = credit.saturating_add(u64::from(chunks));
        drop(guard);
        self.credited.notify_waiters();
    }

    /// Takes out the calls whose deadline has passed, giving their ids to `expired`, and
    /// returns the earliest deadline of those left.
    pub fn expire(&self, now: Instant, mut expired: impl FnMut(u64)) -> Option<Instant> {
        let mut table = self.table();
        table.calls.retain(|&id, entry| match entry.deadline {
            Some(deadline) if deadline <= now => {
                expired(id);
                false
            }
            _ => true,
        });
        table.calls.values().filter_map(|e| e.deadline).min()
    }

    /// The agent refused the connection: the calls made on it never run, those to come
    /// neither (the agent skips a call that is not in flight).
    pub fn refuse(&self) {
        self.table().refused = true;
        self.clear();
    }

    /// Forgets every call (the connection ended): none of them will be answered, those not yet
    /// run never run, and streams stop.
    pub fn clear(&self) {
        let calls = std::mem::take(&mut self.table().calls);
        calls.values().for_each(Entry::stop);
    }
}

impl Entry {
    fn stop(&self) {
        if let Some(task) = &self.stream {
            task.abort();
        }
    }
}

/// The reply port of a call that arrived on a connection.
impl ReplyPort for SocketReply {
    /// Whether the call is no longer in flight (cancelled, timed out, or the connection ended).
    fn is_gone(&self) -> bool {
        !self.holds_call()
    }

    fn send(self: Box<Self>, reply: CallReply) {
        self.answer_with(reply)
    }
}

/// Where the reply to a call that arrived on a connection goes.
pub(crate) struct SocketReply {
    id: u64,
    seq: u64,
    calls: Arc<InFlight>,
    out: Outbound,
    wire: Protocol,
    /// The codec of the call's arguments (and so of the `()` that ends a stream).
    codec: Codec,
}

impl SocketReply {
    fn holds_call(&self) -> bool {
        self.holds(&self.calls.table())
    }

    fn holds(&self, table: &Table) -> bool {
        table.calls.get(&self.id).is_some_and(|e| e.seq == self.seq)
    }

    /// This call's entry, if it is still in flight.
    fn entry<'t>(&self, table: &'t mut Table) -> Option<&'t mut Entry> {
        table.calls.get_mut(&self.id).filter(|e| e.seq == self.seq)
    }

    /// Answers the call, unless it is no longer in flight. A stream is sent by a task of its
    /// own, chunk after chunk, then the `()` reply.
    pub fn answer_with(self, reply: CallReply) {
        let calls = self.calls.clone();
        let mut table = calls.table();
        let Some(entry) = self.entry(&mut table) else {
            return;
        };
        match reply {
            Ok(Returned::Stream(stream)) => {
                entry.deadline = None;
                entry.stream = Some(tokio::spawn(self.stream(stream)).abort_handle());
            }
            Ok(Returned::Value(value)) => self.answer(&mut table, &Ok(value)),
            Err(e) => self.answer(&mut table, &Err(e)),
        }
    }

    /// Takes the call out and sends its reply (the caller checked that it holds the call):
    /// written at once if it was the only call in flight (see `Outbound::send_now`); queued
    /// with the others otherwise, which the writer task writes together.
    fn answer(&self, table: &mut Table, result: &Result<Payload, RawError>) {
        table.calls.remove(&self.id);
        let reply = self.wire.reply(self.id, result);
        if table.calls.is_empty() {
            self.out.send_now(reply);
        } else {
            self.out.send(reply);
        }
    }

    /// Waits until the client has credit for one more chunk (if it uses flow control), and
    /// takes it. `false` if the call is no longer in flight.
    async fn take_credit(&self) -> bool {
        loop {
            let credited = self.calls.credited.notified();
            tokio::pin!(credited);
            credited.as_mut().enable();
            {
                let mut table = self.calls.table();
                let Some(entry) = self.entry(&mut table) else {
                    return false;
                };
                match &mut entry.credit {
                    None => return true,
                    Some(0) => {}
                    Some(left) => {
                        *left -= 1;
                        return true;
                    }
                }
            }
            credited.await;
        }
    }

    /// Sends the chunks of `stream` in order as the client reads them, then the final reply.
    async fn stream(self, mut stream: RawStream) {
        let end = loop {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    if !self.take_credit().await || !self.out.wait_for_room().await {
                        return; // the call or the connection is gone
                    }
                    // Under the lock: a cancel takes the call out and then replies, so no
                    // chunk follows its reply.
                    let table = self.calls.table();
                    if !self.holds(&table) {
                        return;
                    }
                    self.out.send(self.wire.chunk(self.id, &chunk));
                }
                Some(Err(e)) => break Err(e),
                None => break self.codec.encode(&()).map_err(RawError::internal),
            }
        };
        let mut table = self.calls.table();
        if self.holds(&table) {
            self.answer(&mut table, &end);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::super::outbound::{self, Frames};
    use super::*;

    fn socket() -> (Arc<InFlight>, Outbound, Frames) {
        let (out, frames) = outbound::queue(16, CancellationToken::new(), None);
        (Arc::default(), out, frames)
    }

    fn value(v: i64) -> CallReply {
        Ok(Returned::Value(Payload::Json(serde_json::json!(v))))
    }

    fn sent(frames: &Frames) -> Vec<String> {
        std::iter::from_fn(|| frames.try_recv())
            .map(|m| m.to_text().unwrap().to_owned())
            .collect()
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    #[tokio::test]
    async fn a_call_is_answered_once_by_whoever_takes_it_first() {
        let (calls, out, frames) = socket();
        let reply = calls
            .start(1, later(), &out, Protocol::Json, Codec::Json)
            .unwrap();
        assert!(
            calls
                .start(1, later(), &out, Protocol::Json, Codec::Json)
                .is_none(),
            "id 1 is in flight"
        );
        assert!(calls.cancel(1));
        assert!(!calls.cancel(1), "taken once");
        assert!(!reply.holds_call(), "the agent skips a call taken out");
        reply.answer_with(value(5));
        assert!(
            sent(&frames).is_empty(),
            "nothing answers a cancelled call twice"
        );
    }

    #[tokio::test]
    async fn a_reused_id_is_not_answered_by_the_call_that_had_it() {
        let (calls, out, frames) = socket();
        let old = calls
            .start(7, later(), &out, Protocol::Json, Codec::Json)
            .unwrap();
        calls.cancel(7);
        let new = calls
            .start(7, later(), &out, Protocol::Json, Codec::Json)
            .unwrap();
        old.answer_with(value(1));
        assert!(
            sent(&frames).is_empty(),
            "the old call's reply finds a newer call under its id"
        );
        new.answer_with(value(2));
        assert_eq!(sent(&frames), [r#"{"type":"reply","id":7,"ok":2}"#]);
        assert!(!calls.cancel(7), "answered: no longer in flight");
    }

    #[tokio::test]
    async fn deadlines_take_out_only_the_calls_due() {
        let (calls, out, _frames) = socket();
        let now = Instant::now();
        let _due = calls
            .start(1, now, &out, Protocol::Json, Codec::Json)
            .unwrap();
        let _later = calls
            .start(2, later(), &out, Protocol::Json, Codec::Json)
            .unwrap();
        let mut expired = Vec::new();
        let next = calls.expire(now, |id| expired.push(id));
        assert_eq!(expired, [1]);
        assert!(
            next.is_some_and(|at| at > now),
            "call 2's deadline is the next one"
        );
        assert!(calls.cancel(2), "call 2 is still in flight");
    }

    #[tokio::test]
    async fn credit_may_come_before_its_call_for_a_bounded_number_of_ids() {
        let (calls, _out, _frames) = socket();
        for id in 0..(EARLY_CREDITS as u64 + 10) {
            calls.credit(id, 1);
        }
        let table = calls.table();
        assert_eq!(
            table.early.len(),
            EARLY_CREDITS,
            "credit for more ids is ignored"
        );
        assert_eq!(table.early.get(&0), Some(&1));
    }
}
