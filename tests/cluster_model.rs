//! A model of the cluster's lease and fencing protocol (`agents::cluster`), run under random
//! delays, pauses (a SIGSTOPped or GC-paused node), lapsed leases and crashes over thousands
//! of seeds, checking the single-writer property.
//!
//! PostgreSQL is modelled as what the protocol relies on: each statement takes effect
//! atomically at one instant between its sending and its answer (the take is one statement; an
//! append is one statement that locks the owner row, so a take and an append are ordered), and
//! leases are in PostgreSQL's clock. Nodes are modelled as the runtime's cluster code behaves:
//! renew every third of the lease and register again if it lapsed, take an agent before
//! writing (restoring its log if the epoch moved), append with the epoch it took, and treat a
//! refused or unanswered append as the agent lost. Messages take random times each way; a
//! paused node's statements in flight still run; a crashed node forgets everything and comes
//! back as a new node.
//!
//! Checked on every seed: every append kept in the log was made by the node that took that
//! epoch, epochs never go back in an agent's log, its sequence numbers run 1, 2, 3.. without a
//! gap or a repeat (a new owner continues exactly where the log ends), and every write a node
//! acknowledged is in the log.
//!
//! The model bites: with the append's epoch check removed it fails on the first seeds (a
//! repeated sequence number). With takes that ignore the owner's lease it still holds: safety
//! rests on the epoch fence alone, and leases decide only when a take may happen (liveness).

use std::collections::{BTreeMap, HashMap};

/// The model's time, in milliseconds.
type Time = u64;

const LEASE: Time = 3_000;
const AGENTS: usize = 3;
const NODES: usize = 3;

/// A deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// A one-way message delay: mostly small, sometimes long (a slow network, a stalled
    /// connection).
    fn delay(&mut self) -> Time {
        if self.chance(3) {
            self.below(3 * LEASE)
        } else {
            1 + self.below(30)
        }
    }
}

/// PostgreSQL's state: the tables of `agents::cluster::store`.
#[derive(Default)]
struct Pg {
    /// Node id → lease end (PostgreSQL's clock).
    leases: HashMap<u64, Time>,
    /// Agent → (owner, epoch).
    owners: HashMap<usize, (u64, u64)>,
    /// Agent → its log: (seq, epoch, the node that appended).
    log: HashMap<usize, Vec<(u64, u64, u64)>>,
    /// (agent, epoch) → the node a take gave it to.
    granted: HashMap<(usize, u64), u64>,
}

/// A statement, as sent.
#[derive(Clone, Debug)]
enum Statement {
    Register,
    Renew,
    Take(usize),
    Append { agent: usize, epoch: u64, seq: u64 },
}

/// Its answer.
#[derive(Clone, Debug)]
enum Answer {
    Registered,
    Renewed(bool),
    /// `Some((epoch, moved, last seq of the log))` if taken.
    Took(usize, Option<(u64, bool, u64)>),
    Appended {
        agent: usize,
        seq: u64,
        kept: bool,
    },
}

impl Pg {
    fn alive(&self, node: u64, now: Time) -> bool {
        self.leases.get(&node).is_some_and(|&until| until > now)
    }

    fn run(&mut self, node: u64, statement: &Statement, now: Time) -> Answer {
        match *statement {
            Statement::Register => {
                self.leases.insert(node, now + LEASE);
                Answer::Registered
            }
            Statement::Renew => {
                let alive = self.alive(node, now);
                if alive {
                    self.leases.insert(node, now + LEASE);
                }
                Answer::Renewed(alive)
            }
            Statement::Take(agent) => {
                if !self.alive(node, now) {
                    return Answer::Took(agent, None);
                }
                let last = self
                    .log
                    .get(&agent)
                    .and_then(|l| l.last())
                    .map_or(0, |e| e.0);
                match self.owners.get(&agent).copied() {
                    Some((owner, epoch)) if owner == node => {
                        Answer::Took(agent, Some((epoch, false, last)))
                    }
                    Some((owner, _)) if self.alive(owner, now) => Answer::Took(agent, None),
                    owner => {
                        let epoch = owner.map_or(1, |(_, e)| e + 1);
                        self.owners.insert(agent, (node, epoch));
                        self.granted.insert((agent, epoch), node);
                        Answer::Took(agent, Some((epoch, true, last)))
                    }
                }
            }
            Statement::Append { agent, epoch, seq } => {
                let kept = self.owners.get(&agent) == Some(&(node, epoch));
                if kept {
                    let log = self.log.entry(agent).or_default();
                    // The primary key (agent, seq): a repeat would fail the statement.
                    assert!(
                        log.last().is_none_or(|e| e.0 < seq),
                        "a repeated sequence number {seq} for agent {agent}: {log:?}"
                    );
                    log.push((seq, epoch, node));
                }
                Answer::Appended { agent, seq, kept }
            }
        }
    }
}

/// What a node knows of an agent it took.
#[derive(Clone, Copy)]
struct Owned {
    epoch: u64,
    last_seq: u64,
    /// An append is in flight (the agent's syncer waits for it before the next).
    appending: bool,
}

#[derive(PartialEq)]
enum State {
    Running,
    Paused { until: Time },
    Crashed { until: Time },
}

struct Node {
    id: u64,
    state: State,
    registered: bool,
    owned: HashMap<usize, Owned>,
    /// Takes in flight.
    taking: Vec<usize>,
    next_renew: Time,
}

impl Node {
    /// A node that just started: it knows nothing and registers first.
    fn new(id: u64) -> Self {
        Node {
            id,
            state: State::Running,
            registered: false,
            owned: HashMap::new(),
            taking: Vec::new(),
            next_renew: 0,
        }
    }
}

/// A message in flight: to PostgreSQL (`answer` none) or back to a node.
struct Flight {
    node: u64,
    statement: Statement,
    /// The answer, once PostgreSQL ran it.
    answer: Option<Answer>,
}

fn simulate(seed: u64) -> (usize, usize) {
    let mut rng = Rng(seed);
    let mut pg = Pg::default();
    let mut next_id = 1u64;
    let mut nodes: Vec<Node> = (0..NODES)
        .map(|_| {
            next_id += 1;
            Node::new(next_id)
        })
        .collect();
    // Time → messages due then (at PostgreSQL, or back at their node).
    let mut flights: BTreeMap<Time, Vec<Flight>> = BTreeMap::new();
    let send = |flights: &mut BTreeMap<Time, Vec<Flight>>, at: Time, node: u64, statement| {
        flights.entry(at).or_default().push(Flight {
            node,
            statement,
            answer: None,
        });
    };
    let mut acknowledged: Vec<(usize, u64)> = Vec::new();

    for now in (0..60_000).step_by(5) {
        // Deliver what is due: statements run at PostgreSQL, answers reach their nodes.
        let due: Vec<Time> = flights.range(..=now).map(|(t, _)| *t).collect();
        for t in due {
            for flight in flights.remove(&t).unwrap() {
                match flight.answer {
                    None => {
                        let answer = pg.run(flight.node, &flight.statement, now);
                        let back = now + rng.delay();
                        flights.entry(back).or_default().push(Flight {
                            answer: Some(answer),
                            ..flight
                        });
                    }
                    Some(answer) => {
                        let Some(node) = nodes.iter_mut().find(|n| n.id == flight.node) else {
                            continue; // it crashed: the answer reaches nobody
                        };
                        if let State::Paused { until } = node.state {
                            // Read once it runs again.
                            flights.entry(until.max(now + 1)).or_default().push(Flight {
                                answer: Some(answer),
                                ..flight
                            });
                            continue;
                        }
                        match answer {
                            Answer::Registered => node.registered = true,
                            Answer::Renewed(alive) => {
                                if !alive {
                                    node.registered = false; // registers again below
                                }
                            }
                            Answer::Took(agent, took) => {
                                node.taking.retain(|&a| a != agent);
                                match took {
                                    // The epoch moved: the local copy is rebuilt from the
                                    // log, whose last seq the restore reads after the take.
                                    Some((epoch, true, _)) => {
                                        let last_seq = pg
                                            .log
                                            .get(&agent)
                                            .and_then(|l| l.last())
                                            .map_or(0, |e| e.0);
                                        node.owned.insert(
                                            agent,
                                            Owned {
                                                epoch,
                                                last_seq,
                                                appending: false,
                                            },
                                        );
                                    }
                                    Some((epoch, false, last)) => {
                                        let kept = node
                                            .owned
                                            .get(&agent)
                                            .filter(|o| o.epoch == epoch)
                                            .copied();
                                        let owned = kept.unwrap_or(Owned {
                                            epoch,
                                            last_seq: last,
                                            appending: false,
                                        });
                                        node.owned.insert(agent, owned);
                                    }
                                    None => {
                                        node.owned.remove(&agent);
                                    }
                                }
                            }
                            Answer::Appended { agent, seq, kept } => {
                                if kept {
                                    acknowledged.push((agent, seq));
                                    if let Some(o) = node.owned.get_mut(&agent) {
                                        o.appending = false;
                                        o.last_seq = seq;
                                    }
                                } else {
                                    // Refused: the agent is lost, its copy dropped.
                                    node.owned.remove(&agent);
                                }
                            }
                        }
                    }
                }
            }
        }

        for node in nodes.iter_mut() {
            // Faults: pauses past the lease, crashes (back as a new node).
            match node.state {
                State::Paused { until } | State::Crashed { until } if until > now => continue,
                State::Crashed { .. } => {
                    next_id += 1;
                    *node = Node::new(next_id);
                }
                State::Paused { .. } => node.state = State::Running,
                State::Running => {}
            }
            if rng.chance(1) && rng.chance(10) {
                node.state = State::Paused {
                    until: now + rng.below(3 * LEASE),
                };
                continue;
            }
            if rng.chance(1) && rng.chance(5) {
                node.state = State::Crashed {
                    until: now + rng.below(2 * LEASE),
                };
                continue;
            }
            // The lease: registered first, renewed every third of it.
            if now >= node.next_renew {
                let statement = if node.registered {
                    Statement::Renew
                } else {
                    Statement::Register
                };
                send(&mut flights, now + rng.delay(), node.id, statement);
                node.next_renew = now + LEASE / 3;
            }
            if !node.registered || !rng.chance(20) {
                continue;
            }
            // Work: a write to a random agent, taken first if need be.
            let agent = rng.below(AGENTS as u64) as usize;
            match node.owned.get_mut(&agent) {
                Some(owned) if !owned.appending => {
                    owned.appending = true;
                    let statement = Statement::Append {
                        agent,
                        epoch: owned.epoch,
                        seq: owned.last_seq + 1,
                    };
                    send(&mut flights, now + rng.delay(), node.id, statement);
                }
                Some(_) => {}
                None if !node.taking.contains(&agent) => {
                    node.taking.push(agent);
                    send(
                        &mut flights,
                        now + rng.delay(),
                        node.id,
                        Statement::Take(agent),
                    );
                }
                None => {}
            }
        }
    }

    // Single writer: each kept append was made by the node its epoch was given to; epochs
    // never go back; sequence numbers run without gaps or repeats.
    let mut kept = 0;
    let mut moves = 0;
    for (agent, log) in &pg.log {
        for (i, &(seq, epoch, node)) in log.iter().enumerate() {
            assert_eq!(
                seq,
                i as u64 + 1,
                "seed {seed}: agent {agent}'s log {log:?}"
            );
            assert_eq!(
                pg.granted.get(&(*agent, epoch)),
                Some(&node),
                "seed {seed}: agent {agent} epoch {epoch} written by node {node}"
            );
            if i > 0 {
                assert!(
                    log[i - 1].1 <= epoch,
                    "seed {seed}: an epoch went back: {log:?}"
                );
                moves += usize::from(log[i - 1].1 < epoch);
            }
        }
        kept += log.len();
    }
    for (agent, seq) in &acknowledged {
        assert!(
            pg.log[agent].iter().any(|e| e.0 == *seq),
            "seed {seed}: acknowledged write {seq} of agent {agent} is not in the log"
        );
    }
    (kept, moves)
}

#[test]
fn one_writer_per_agent_under_random_delays_pauses_and_crashes() {
    let (mut kept, mut moves) = (0, 0);
    let seeds = 2_000;
    for seed in 0..seeds {
        let (k, m) = simulate(seed);
        kept += k;
        moves += m;
    }
    // The model exercises what it claims: writes, and agents moving between nodes.
    assert!(kept > seeds as usize * 50, "{kept} writes kept");
    assert!(moves > seeds as usize, "{moves} moves");
    println!("{seeds} seeds: {kept} appends kept, {moves} moves between epochs");
}
