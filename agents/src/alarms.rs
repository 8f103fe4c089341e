//! The runtime's alarm index: for every agent with a schedule, its earliest due time.
//!
//! It lives in its own SQLite file (`<data_dir>/alarms.sqlite`) so that a hibernated agent is
//! woken on time without opening every agent's database, and it is mirrored in memory as a
//! queue the timer task reads. The index may be early, never late: an agent writes (and syncs)
//! an earlier time *before* committing the schedule that needs it, and a later time only after;
//! when woken, the agent re-derives its own alarm from its schedule table.

use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use rusqlite::Connection;
use tokio::sync::{oneshot, Notify};

use crate::{
    address::AgentKey,
    error::Error,
    lock::lock,
    registry::{Event, Shared},
};

/// The index: on disk and in memory.
pub(crate) struct AlarmIndex {
    db: Mutex<Connection>,
    mem: Mutex<Queue>,
    /// Woken when an entry becomes earlier than what the timer waits for.
    pub changed: Notify,
    /// Where every entry is written too (cluster mode: PostgreSQL).
    mirror: Option<Arc<dyn AlarmMirror>>,
}

/// Where the index is kept beyond this process (cluster mode: PostgreSQL, where another node
/// finds the due alarms of a dead node's agents), written as the file is, early never late.
pub(crate) trait AlarmMirror: Send + Sync {
    /// Records that `key` is next due at `at` (`None`: never). Blocking; a `durable` write is
    /// kept before it returns.
    fn set(&self, key: &AgentKey, at: Option<u64>, durable: bool) -> Result<(), Error>;
}

#[derive(Default)]
struct Queue {
    at: HashMap<AgentKey, u64>,
    due: BTreeSet<(u64, AgentKey)>,
    /// Entries due up to here were warmed up already (entries added below it later are not:
    /// warming up is an optimisation, not a promise).
    warmed_to: u64,
}

impl Queue {
    fn set(&mut self, key: &AgentKey, at: Option<u64>) {
        if let Some(old) = self.at.remove(key) {
            self.due.remove(&(old, key.clone()));
        }
        if let Some(at) = at {
            self.at.insert(key.clone(), at);
            self.due.insert((at, key.clone()));
        }
    }
}

impl AlarmIndex {
    /// Opens (creating if needed) the index of `data_dir` and loads it into memory.
    pub fn open(data_dir: &Path) -> Result<Self, Error> {
        let conn = Connection::open(data_dir.join("alarms.sqlite"))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS alarms(class TEXT NOT NULL, name TEXT NOT NULL, at_ms INTEGER NOT NULL,
                                               PRIMARY KEY (class, name)) WITHOUT ROWID",
        )?;
        let mut queue = Queue::default();
        {
            let mut stmt = conn.prepare("SELECT class, name, at_ms FROM alarms")?;
            let mut rows = stmt.query([])?;
            while let Some(row) = rows.next()? {
                let (class, name): (String, String) = (row.get(0)?, row.get(1)?);
                match AgentKey::new(&class, &name) {
                    Ok(key) => queue.set(&key, Some(row.get::<_, i64>(2)? as u64)),
                    Err(e) => tracing::warn!("ignoring an alarm index entry: {e}"),
                }
            }
        }
        Ok(AlarmIndex {
            db: Mutex::new(conn),
            mem: Mutex::new(queue),
            changed: Notify::new(),
            mirror: None,
        })
    }

    /// The index, with every entry written to `mirror` too.
    #[cfg(feature = "cluster")]
    pub fn mirrored(self, mirror: Arc<dyn AlarmMirror>) -> Self {
        AlarmIndex {
            mirror: Some(mirror),
            ..self
        }
    }

    fn mem(&self) -> std::sync::MutexGuard<'_, Queue> {
        lock(&self.mem)
    }

    /// The entry of `key` as the timer sees it.
    pub fn get(&self, key: &AgentKey) -> Option<u64> {
        self.mem().at.get(key).copied()
    }

    /// Records that `key` is next due at `at` (`None`: never). Blocking. A `durable` write is
    /// synced before it returns (needed when the entry moves earlier); otherwise a crash may
    /// lose it, which leaves the older, earlier entry: early, never late. (Not synced is
    /// SQLite's `synchronous=NORMAL`, not `OFF`: an automatic checkpoint still syncs the file
    /// before the WAL starts over, or a power cut would take durable entries with it.)
    pub fn set(&self, key: &AgentKey, at: Option<u64>, durable: bool) -> Result<(), Error> {
        {
            let db = lock(&self.db);
            db.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
            match at {
                Some(at) => db
                    .prepare_cached(
                        "INSERT INTO alarms(class, name, at_ms) VALUES (?1, ?2, ?3)
                         ON CONFLICT(class, name) DO UPDATE SET at_ms = excluded.at_ms",
                    )?
                    .execute((key.class(), key.name(), at as i64))?,
                None => db
                    .prepare_cached("DELETE FROM alarms WHERE class = ?1 AND name = ?2")?
                    .execute((key.class(), key.name()))?,
            };
        }
        if let Some(mirror) = &self.mirror {
            mirror.set(key, at, durable)?;
        }
        self.mem().set(key, at);
        self.changed.notify_one();
        Ok(())
    }

    /// The first `n` entries, earliest first.
    pub fn first(&self, n: usize) -> Vec<(u64, AgentKey)> {
        self.mem().due.iter().take(n).cloned().collect()
    }

    /// The earliest entry.
    pub fn earliest(&self) -> Option<u64> {
        self.mem().due.first().map(|(at, _)| *at)
    }

    /// Takes the agents due at `now` out of the in-memory queue (the file keeps them until the
    /// agents re-derive their alarms, so a crash in between fires them again).
    pub fn take_due(&self, now: u64) -> Vec<AgentKey> {
        let mut mem = self.mem();
        let mut out = Vec::new();
        while let Some((at, _)) = mem.due.first() {
            if *at > now {
                break;
            }
            let (_, key) = mem.due.pop_first().expect("first exists");
            mem.at.remove(&key);
            out.push(key);
        }
        out
    }

    /// The agents due by `horizon` that were not warmed up yet (now they are), and the time of
    /// the first entry after them that is still to warm.
    pub fn take_warm(&self, horizon: u64) -> (Vec<AgentKey>, Option<u64>) {
        let mut mem = self.mem();
        let from = (mem.warmed_to.saturating_add(1), AgentKey::smallest());
        let mut out = Vec::new();
        for (at, key) in mem.due.range(from..) {
            if *at > horizon {
                let next = *at;
                mem.warmed_to = mem.warmed_to.max(horizon);
                return (out, Some(next));
            }
            out.push(key.clone());
        }
        mem.warmed_to = mem.warmed_to.max(horizon);
        (out, None)
    }

    /// How many agents have an entry.
    pub fn len(&self) -> usize {
        self.mem().at.len()
    }
}

/// Sends an `Alarm` event to every agent due at `now`; returns one receiver per agent, answered
/// when its due rows ran and their outcome is durable.
pub(crate) fn fire_due(shared: &Arc<Shared>, now: u64) -> Vec<oneshot::Receiver<()>> {
    let mut fired = Vec::new();
    for key in shared.alarms.take_due(now) {
        let (done, wait) = oneshot::channel();
        fired.push(wait);
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err((e, event)) = shared.route(&key, Event::Alarm(Some(done))).await {
                tracing::warn!("cannot wake {key} for its alarm: {e}");
                event.abandon(e.told("the agent cannot be woken"));
            }
        });
    }
    fired
}

/// Cluster mode: every renewal of the lease, wakes the agents whose alarms are due and whose
/// node is dead (or that nobody has). Every node looks; the first to take an agent fires it
/// (the take is a compare-and-set: another node's activation is refused, and its event
/// dropped).
#[cfg(feature = "cluster")]
pub(crate) async fn fire_orphans(shared: Arc<Shared>) {
    let Some(node) = shared.cluster.clone() else {
        return;
    };
    loop {
        tokio::time::sleep(node.renewal()).await;
        if shared.is_closed() {
            return;
        }
        for key in node.orphans(shared.config.clock.now_ms()).await {
            if shared.is_live(&key) {
                continue;
            }
            let shared = shared.clone();
            tokio::spawn(async move {
                if let Err((e, event)) = shared.route(&key, Event::Alarm(None)).await {
                    event.abandon(e.told("the agent cannot be woken"));
                }
            });
        }
    }
}

/// How long before its alarm a hibernated agent is woken, so that opening its database is not
/// counted against its schedule.
const WARM_UP_MS: u64 = 1_000;

/// The timer: sleeps until the earliest entry of the index, wakes the agents that are due, and
/// repeats until the runtime closes. Hibernated agents are warmed up (their database opened)
/// shortly before they are due. (With a manual clock, tests fire alarms instead.)
pub(crate) async fn run_timer(shared: Arc<Shared>) {
    let clock = shared.config.clock.clone();
    loop {
        if shared.is_closed() {
            return;
        }
        let changed = shared.alarms.changed.notified();
        let now = clock.now_ms();
        let (warm, next_warm) = shared.alarms.take_warm(now + WARM_UP_MS);
        for key in warm.into_iter().filter(|k| !shared.is_live(k)) {
            let shared = shared.clone();
            tokio::spawn(async move { shared.route(&key, Event::Warm).await.map_err(|(e, _)| e) });
        }
        let wake = match (shared.alarms.earliest(), next_warm) {
            (Some(at), _) if at <= now => {
                fire_due(&shared, now);
                continue;
            }
            (Some(at), Some(warm)) => at.min(warm.saturating_sub(WARM_UP_MS)),
            (Some(at), None) => at,
            (None, _) => {
                changed.await;
                continue;
            }
        };
        let _ = tokio::time::timeout(
            Duration::from_millis(wake.saturating_sub(now).max(1)),
            changed,
        )
        .await;
    }
}
