//! The table of every agent's open sockets: added and removed by each socket's task, and the
//! core's delivery port (`Connections`): effects of an event reach the sockets through it,
//! each encoded once per protocol the sockets speak.

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
};

use axum::extract::ws::{close_code, Message};

use crate::lock::lock;
use crate::metrics::WingMetrics;
use crate::port::{AgentKey, ConnId, Connections, Effect, Protocol, Speaks};

use super::{frames::close, outbound::Outbound};

/// The open sockets of every agent. Each agent's sockets have a lock of their own: a broadcast
/// to a big room holds only that room's, not every agent's.
pub(crate) struct Sockets {
    by_agent: Mutex<HashMap<AgentKey, Arc<AgentSockets>>>,
    metrics: WingMetrics,
}

type AgentSockets = Mutex<HashMap<ConnId, Socket>>;

/// One open socket: where its frames go, how to encode them, and whether `on_connect` has
/// admitted it (until then it gets only what is sent to it by id, never a broadcast).
struct Socket {
    out: Outbound,
    wire: Protocol,
    admitted: bool,
}

impl Sockets {
    pub(crate) fn new(metrics: WingMetrics) -> Self {
        Sockets {
            by_agent: Mutex::default(),
            metrics,
        }
    }

    /// A socket of `key` was closed for not reading its frames.
    pub(super) fn closed_slow(&self, key: &AgentKey) {
        self.metrics.slow_close(key.class());
    }

    /// `key`'s sockets, if it has any.
    fn of(&self, key: &AgentKey) -> Option<Arc<AgentSockets>> {
        lock(&self.by_agent).get(key).cloned()
    }

    // Adding and removing hold the outer lock too, so that an agent's map is never dropped
    // from it while a socket is being added to that map.
    pub(super) fn add(&self, key: &AgentKey, id: ConnId, out: Outbound, wire: Protocol) {
        let mut all = lock(&self.by_agent);
        let conns = all.entry(key.clone()).or_default();
        let socket = Socket {
            out,
            wire,
            admitted: false,
        };
        lock(conns).insert(id, socket);
    }

    /// Forgets socket `id`; whether it was registered (an agent destroyed since has
    /// forgotten it already).
    pub(super) fn remove(&self, key: &AgentKey, id: &ConnId) -> bool {
        let mut all = lock(&self.by_agent);
        let Some(conns) = all.get(key) else {
            return false;
        };
        let mut conns = lock(conns);
        let was = conns.remove(id).is_some();
        if conns.is_empty() {
            drop(conns);
            all.remove(key);
        }
        was
    }
}

/// The sockets as the core reaches them (the delivery port).
impl Connections for Sockets {
    fn close_agent(&self, key: &AgentKey, code: u16, reason: &str) {
        let Some(conns) = lock(&self.by_agent).remove(key) else {
            return;
        };
        for socket in lock(&conns).values() {
            socket.out.send(close(code, reason));
        }
    }

    /// The ids of `key`'s open sockets.
    fn ids(&self, key: &AgentKey) -> Vec<ConnId> {
        self.of(key)
            .map(|conns| lock(&conns).keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Whether `key`'s socket `id` is open.
    fn is_open(&self, key: &AgentKey, id: &ConnId) -> bool {
        self.of(key)
            .is_some_and(|conns| lock(&conns).contains_key(id))
    }

    /// How many sockets `key` has open.
    fn speaks(&self, key: &AgentKey) -> Speaks {
        let mut speaks = Speaks::default();
        if let Some(conns) = self.of(key) {
            for socket in lock(&conns).values() {
                let one = Speaks::of(socket.wire);
                speaks.json |= one.json;
                speaks.postcard |= one.postcard;
            }
        }
        speaks
    }

    fn count_of(&self, key: &AgentKey) -> usize {
        self.of(key).map_or(0, |conns| lock(&conns).len())
    }

    /// How many sockets are open, over all agents.
    fn count(&self) -> usize {
        lock(&self.by_agent)
            .values()
            .map(|conns| lock(conns).len())
            .sum()
    }

    /// Sends what an event produced (once it is durable) to `key`'s sockets.
    fn deliver(&self, key: &AgentKey, effects: Vec<Effect>) {
        let Some(conns) = self.of(key) else {
            return;
        };
        let mut conns = lock(&conns);
        let (mut sent, mut broadcast) = (0, 0);
        for effect in effects {
            match effect {
                Effect::Send(id, outgoing) => {
                    if let Some(socket) = conns.get(&id) {
                        if let Some(frame) = socket.wire.outgoing(&outgoing) {
                            socket.out.send(frame);
                            sent += 1;
                        }
                    }
                }
                Effect::Broadcast(outgoing, except) => {
                    // Encoded once per protocol, shared by every socket speaking it.
                    let mut frames: [Option<Option<Message>>; 3] = [None, None, None];
                    // A long exclusion list is looked up by hash, not scanned for every socket.
                    let long: Option<HashSet<&ConnId>> =
                        (except.len() > 8).then(|| except.iter().collect());
                    let excluded = |id| match &long {
                        Some(set) => set.contains(id),
                        None => except.contains(id),
                    };
                    for (id, socket) in conns.iter() {
                        if !socket.admitted || excluded(id) {
                            continue;
                        }
                        let frame = frames[socket.wire as usize]
                            .get_or_insert_with(|| socket.wire.outgoing(&outgoing));
                        if let Some(frame) = frame {
                            socket.out.send(frame.clone());
                            broadcast += 1;
                        }
                    }
                }
                Effect::Admit(id) => {
                    if let Some(socket) = conns.get_mut(&id) {
                        socket.admitted = true;
                    }
                }
                Effect::SetState(..) | Effect::SetTags(..) => {}
            }
        }
        drop(conns);
        self.metrics
            .delivered(key.class(), sent + broadcast, broadcast);
    }

    /// Closes every socket (the runtime is shutting down).
    fn close_all(&self) {
        for conns in lock(&self.by_agent).values() {
            for socket in lock(conns).values() {
                socket
                    .out
                    .send(close(close_code::AWAY, "the server is shutting down"));
            }
        }
    }
}
