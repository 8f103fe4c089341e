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

use crate::lock::lock;
use crate::{connection::Wire, outbound::Outbound, registry::CallReply, stream::Returned};

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
        wire: Wire,
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
        table.calls.insert(id, entry);
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

/// Where the reply to a call that arrived on a connection goes.
pub(crate) struct SocketReply {
    id: u64,
    seq: u64,
    calls: Arc<InFlight>,
    out: Outbound,
    wire: Wire,
    /// The codec of the call's arguments (and so of the `()` that ends a stream).
    codec: Codec,
}

impl SocketReply {
    /// Whether the call is no longer in flight (cancelled, timed out, or the connection ended).
    pub fn is_gone(&self) -> bool {
        !self.holds(&self.calls.table())
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
    pub fn send(self, reply: CallReply) {
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

    /// Takes the call out and sends its reply (the caller checked that it holds the call).
    fn answer(&self, table: &mut Table, result: &Result<Payload, RawError>) {
        table.calls.remove(&self.id);
        self.out.send(self.wire.reply(self.id, result));
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
