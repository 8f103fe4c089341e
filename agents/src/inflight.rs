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
use tokio::{task::AbortHandle, time::Instant};

use crate::{connection::Wire, outbound::Outbound, registry::CallReply, stream::Returned};

/// The table of one connection's calls in flight.
#[derive(Default)]
pub(crate) struct InFlight(Mutex<Table>);

#[derive(Default)]
struct Table {
    calls: HashMap<u64, Entry>,
    next_seq: u64,
}

struct Entry {
    seq: u64,
    /// When the call times out; `None` once it streams (its chunks may take longer).
    deadline: Option<Instant>,
    /// The task sending the call's stream.
    stream: Option<AbortHandle>,
}

impl InFlight {
    fn table(&self) -> MutexGuard<'_, Table> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Answers the call, unless it is no longer in flight. A stream is sent by a task of its
    /// own, chunk after chunk, then the `()` reply.
    pub fn send(self, reply: CallReply) {
        let calls = self.calls.clone();
        let mut table = calls.table();
        let Some(entry) = table.calls.get_mut(&self.id).filter(|e| e.seq == self.seq) else {
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

    /// Sends the chunks of `stream` in order as the client reads them, then the final reply.
    async fn stream(self, mut stream: RawStream) {
        let end = loop {
            match stream.next().await {
                Some(Ok(chunk)) => {
                    if !self.out.wait_for_room().await {
                        return; // the connection is gone
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
