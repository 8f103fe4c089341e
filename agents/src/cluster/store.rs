//! What the cluster keeps in PostgreSQL, and every statement it runs there.
//!
//! - `agents_nodes`: each node's id, address and lease (`lease_until`, in PostgreSQL's clock:
//!   one clock for every node's lease).
//! - `agents_owners`: each agent's owner and **epoch**. Taking an agent is one statement that
//!   bumps the epoch, and only if the owner is this node or a node whose lease expired.
//! - `agents_log`: the change sets (WAL frames, see `replica`) an agent's batches committed,
//!   by sequence number. An append is one statement that locks the agents' owner rows `FOR
//!   SHARE` and inserts only the sets whose epoch is still current: a take waits for an append
//!   in flight (so the new owner reads what it committed), and an append after a take is
//!   refused (so a node paused past its lease never commits for an agent that moved). Batches
//!   of many agents share one statement.
//! - `agents_snapshots`: an agent's database image as of a sequence number; the log before it
//!   is deleted in the same statement (fenced as an append).
//! - `agents_schema`: the version of these tables. Frames are SQLite's page images, which any
//!   later SQLite reads; a runtime refuses tables of a version newer than its own.
//!
//! Every statement is prepared once per connection (an unprepared one costs a round trip and
//! an implicit transaction more).

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use tokio_postgres::{types::ToSql, Client, NoTls, Row, Statement};

use crate::{address::AgentKey, lock::lock, replica::ChangeSet};

/// What went wrong in PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The connection or a statement failed.
    #[error("postgresql: {0}")]
    Pg(#[from] tokio_postgres::Error),
    /// The agent was taken by another node (a newer epoch): this node must not write for it.
    #[error("{0} moved to another node (epoch {1} is no longer current)")]
    Fenced(AgentKey, i64),
    /// The tables were made by a newer runtime.
    #[error("the cluster's tables are of version {0}, newer than this runtime's ({VERSION})")]
    Newer(i32),
}

/// The version of the tables this runtime makes and reads.
const VERSION: i32 = 1;

/// The tables, made if missing (idempotent), and their version.
const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS agents_schema (version INTEGER NOT NULL);
INSERT INTO agents_schema(version) SELECT 1 WHERE NOT EXISTS (SELECT 1 FROM agents_schema);
CREATE TABLE IF NOT EXISTS agents_nodes (
    id TEXT PRIMARY KEY,
    addr TEXT NOT NULL,
    lease_until TIMESTAMPTZ NOT NULL
);
CREATE TABLE IF NOT EXISTS agents_owners (
    class TEXT NOT NULL,
    name TEXT NOT NULL,
    node TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    PRIMARY KEY (class, name)
);
CREATE TABLE IF NOT EXISTS agents_log (
    class TEXT NOT NULL,
    name TEXT NOT NULL,
    seq BIGINT NOT NULL,
    epoch BIGINT NOT NULL,
    page_size INTEGER NOT NULL,
    frames BYTEA NOT NULL,
    PRIMARY KEY (class, name, seq)
);
CREATE TABLE IF NOT EXISTS agents_snapshots (
    class TEXT NOT NULL,
    name TEXT NOT NULL,
    seq BIGINT NOT NULL,
    image BYTEA NOT NULL,
    PRIMARY KEY (class, name)
);
CREATE TABLE IF NOT EXISTS agents_alarms (
    class TEXT NOT NULL,
    name TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (class, name)
);
CREATE INDEX IF NOT EXISTS agents_alarms_at ON agents_alarms (at_ms);
CREATE TABLE IF NOT EXISTS agents_secret (
    one BOOLEAN PRIMARY KEY DEFAULT true CHECK (one),
    secret TEXT NOT NULL
);
INSERT INTO agents_secret(secret) VALUES (gen_random_uuid()::text || gen_random_uuid()::text)
    ON CONFLICT DO NOTHING;
";

/// The cluster's secret: nodes send it with the calls they forward for their agents (which may
/// reach internal classes and methods), and check it on those they receive.
const SECRET: &str = "SELECT secret FROM agents_secret";

const SCHEMA_VERSION: &str = "SELECT max(version) FROM agents_schema";

/// `$1` at `$2`, with a lease of `$3` ms (a new one, or again).
const REGISTER: &str = "
    INSERT INTO agents_nodes(id, addr, lease_until)
    VALUES ($1, $2, now() + $3 * interval '1 millisecond')
    ON CONFLICT (id) DO UPDATE SET addr = EXCLUDED.addr, lease_until = EXCLUDED.lease_until";

/// `$1`'s lease for `$2` ms more, if it has not lapsed.
const RENEW: &str = "
    UPDATE agents_nodes SET lease_until = now() + $2 * interval '1 millisecond'
    WHERE id = $1 AND lease_until > now()";

/// Takes agent `$1/$2` for node `$3` (whose lease must be valid) if nobody has it (epoch 1)
/// or its owner's lease lapsed (the epoch bumped); returns the epoch.
const TAKE: &str = "
    WITH me AS (SELECT 1 FROM agents_nodes WHERE id = $3 AND lease_until > now())
    INSERT INTO agents_owners(class, name, node, epoch)
    SELECT $1, $2, $3, 1 FROM me
    ON CONFLICT (class, name) DO UPDATE SET node = EXCLUDED.node, epoch = agents_owners.epoch + 1
    WHERE agents_owners.node <> EXCLUDED.node AND NOT EXISTS (
        SELECT 1 FROM agents_nodes n WHERE n.id = agents_owners.node AND n.lease_until > now())
    RETURNING epoch";

/// Who has agent `$1/$2`: node, epoch, address, and the last sequence number of its log and
/// whether it has a snapshot (for an owner that keeps it).
const OWNER: &str = "
    SELECT o.node, o.epoch, n.addr,
           coalesce((SELECT max(seq) FROM agents_log l WHERE l.class = $1 AND l.name = $2),
                    (SELECT seq FROM agents_snapshots s WHERE s.class = $1 AND s.name = $2), 0),
           EXISTS (SELECT 1 FROM agents_snapshots s WHERE s.class = $1 AND s.name = $2)
    FROM agents_owners o LEFT JOIN agents_nodes n ON n.id = o.node
    WHERE o.class = $1 AND o.name = $2";

/// The address of the live node other than `$3` that has agent `$1/$2`, if one has it.
const LOCATE: &str = "
    SELECT n.addr FROM agents_owners o JOIN agents_nodes n ON n.id = o.node
    WHERE o.class = $1 AND o.name = $2 AND o.node <> $3 AND n.lease_until > now()";

/// Appends change sets (`$1`..`$6`: classes, names, epochs, seqs, page sizes, frames) for node
/// `$7`, each only at its agent's current epoch; the owner rows are locked `FOR SHARE` until
/// the statement's transaction ends, so a take waits for it. Returns what it kept.
pub(crate) const APPEND: &str = "
    WITH b AS (
        SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::int8[], $5::int4[], $6::bytea[])
            AS b(class, name, epoch, seq, page_size, frames)
    ), fence AS (
        SELECT o.class, o.name, o.epoch FROM agents_owners o
        WHERE o.node = $7 AND (o.class, o.name) IN (SELECT class, name FROM b)
        FOR SHARE
    )
    INSERT INTO agents_log(class, name, seq, epoch, page_size, frames)
    SELECT b.class, b.name, b.seq, b.epoch, b.page_size, b.frames
    FROM b JOIN fence f ON f.class = b.class AND f.name = b.name AND f.epoch = b.epoch
    RETURNING class, name, seq";

/// Stores `$6` as agent `$1/$2`'s snapshot at `$5` and deletes its log up to it, if node `$3`
/// has it at epoch `$4`; returns 0 if not.
const SNAPSHOT: &str = "
    WITH fence AS (
        SELECT 1 FROM agents_owners
        WHERE class = $1 AND name = $2 AND node = $3 AND epoch = $4 FOR SHARE
    ), s AS (
        INSERT INTO agents_snapshots(class, name, seq, image)
        SELECT $1, $2, $5, $6 FROM fence
        ON CONFLICT (class, name) DO UPDATE SET seq = EXCLUDED.seq, image = EXCLUDED.image
        WHERE agents_snapshots.seq < EXCLUDED.seq
        RETURNING 1
    ), d AS (
        DELETE FROM agents_log
        WHERE class = $1 AND name = $2 AND seq <= $5 AND EXISTS (SELECT 1 FROM s)
    )
    SELECT (SELECT count(*) FROM fence)";

/// Deletes agent `$1/$2` (owner row, log, snapshot) if node `$3` has it at epoch `$4`;
/// returns 0 if not.
const REMOVE: &str = "
    WITH fence AS (
        DELETE FROM agents_owners
        WHERE class = $1 AND name = $2 AND node = $3 AND epoch = $4 RETURNING 1
    ), l AS (
        DELETE FROM agents_log WHERE class = $1 AND name = $2 AND EXISTS (SELECT 1 FROM fence)
    ), s AS (
        DELETE FROM agents_snapshots WHERE class = $1 AND name = $2 AND EXISTS (SELECT 1 FROM fence)
    ), a AS (
        DELETE FROM agents_alarms WHERE class = $1 AND name = $2 AND EXISTS (SELECT 1 FROM fence)
    )
    SELECT count(*) FROM fence";

/// Agent `$1/$2` is next due at `$4` (ms), if node `$3` has it.
const SET_ALARM: &str = "
    INSERT INTO agents_alarms(class, name, at_ms)
    SELECT $1, $2, $4 WHERE EXISTS (
        SELECT 1 FROM agents_owners WHERE class = $1 AND name = $2 AND node = $3)
    ON CONFLICT (class, name) DO UPDATE SET at_ms = EXCLUDED.at_ms";

/// Agent `$1/$2` has no alarm, if node `$3` has it.
const CLEAR_ALARM: &str = "
    DELETE FROM agents_alarms WHERE class = $1 AND name = $2 AND EXISTS (
        SELECT 1 FROM agents_owners WHERE class = $1 AND name = $2 AND node = $3)";

/// Agents due by `$1` (ms) that no live node has, earliest first.
const ORPHANS: &str = "
    SELECT a.class, a.name FROM agents_alarms a
    LEFT JOIN agents_owners o ON o.class = a.class AND o.name = a.name
    LEFT JOIN agents_nodes n ON n.id = o.node
    WHERE a.at_ms <= $1 AND (n.id IS NULL OR n.lease_until <= now())
    ORDER BY a.at_ms LIMIT 256";

const RESTORE_SNAPSHOT: &str =
    "SELECT seq, image FROM agents_snapshots WHERE class = $1 AND name = $2";

const RESTORE_LOG: &str = "
    SELECT seq, page_size, frames FROM agents_log
    WHERE class = $1 AND name = $2 AND seq > $3 ORDER BY seq";

/// Who owns an agent, as a take found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    /// This node took it now, at `epoch`: nobody had it (`new`: epoch 1, nothing stored), or
    /// its owner's lease had lapsed (a local copy, if any, may be stale).
    Taken { epoch: i64, new: bool },
    /// This node had it already, at `epoch`: a local copy it made is current. `last_seq` is
    /// the last sequence number its log has; `has_base`, whether it has a snapshot.
    Kept {
        epoch: i64,
        last_seq: i64,
        has_base: bool,
    },
    /// A live node: `node` at `addr` (both empty: nobody has it, and this node's own lease
    /// lapsed).
    Other { node: String, addr: String },
}

/// One agent's change set, to append.
pub(crate) struct Append<'a> {
    pub key: &'a AgentKey,
    /// The epoch it was written at.
    pub epoch: i64,
    /// Its sequence number: one more than the agent's last.
    pub seq: i64,
    pub set: &'a ChangeSet,
}

/// An agent's durable state: a snapshot (if any) and the change sets after it, in order.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    /// The database's image as of `snapshot_seq`.
    pub image: Option<Vec<u8>>,
    pub snapshot_seq: i64,
    /// `(seq, set)` after the snapshot.
    pub sets: Vec<(i64, ChangeSet)>,
}

impl Restored {
    /// The last sequence number the agent has.
    pub fn last_seq(&self) -> i64 {
        self.sets.last().map_or(self.snapshot_seq, |(seq, _)| *seq)
    }
}

/// A connection to the cluster's PostgreSQL database.
pub(crate) struct Store {
    client: Client,
    /// Its statements, prepared once: at most one per statement above.
    prepared: std::sync::Mutex<HashMap<&'static str, Statement>>,
}

impl Store {
    /// Connects to `url` (`postgres://user@host:port/db`, or `host=.. dbname=..`).
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::warn!("cluster: the PostgreSQL connection ended: {e}");
            }
        });
        Ok(Store {
            client,
            prepared: Default::default(),
        })
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// `sql`, prepared on this connection.
    async fn statement(&self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(statement) = lock(&self.prepared).get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        lock(&self.prepared).insert(sql, statement.clone());
        Ok(statement)
    }

    /// Runs the prepared `sql` with `params`: its rows.
    async fn rows(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, StoreError> {
        Ok(self
            .client
            .query(&self.statement(sql).await?, params)
            .await?)
    }

    /// Runs the prepared `sql` with `params`: its one row, if any.
    async fn row(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, StoreError> {
        Ok(self.rows(sql, params).await?.into_iter().next())
    }

    /// Makes the tables if they are missing; refuses tables a newer runtime made.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.client.batch_execute(SCHEMA).await?;
        let version: Option<i32> = self.client.query_one(SCHEMA_VERSION, &[]).await?.get(0);
        match version.unwrap_or(VERSION) {
            newer if newer > VERSION => Err(StoreError::Newer(newer)),
            _ => Ok(()),
        }
    }

    /// Registers `node` at `addr` with a lease of `ttl` (again, if it was registered).
    pub async fn register(&self, node: &str, addr: &str, ttl: Duration) -> Result<(), StoreError> {
        self.rows(REGISTER, &[&node, &addr, &millis(ttl)]).await?;
        Ok(())
    }

    /// Renews `node`'s lease for `ttl`, if it has not expired: `false` if it had (the node is
    /// dead to the others, and may have lost its agents).
    pub async fn renew(&self, node: &str, ttl: Duration) -> Result<bool, StoreError> {
        let statement = self.statement(RENEW).await?;
        let renewed = self
            .client
            .execute(&statement, &[&node, &millis(ttl)])
            .await?;
        Ok(renewed == 1)
    }

    /// Takes `key` for `node` if nobody has it, or its owner's lease expired (bumping the
    /// epoch), or `node` has it already; `node`'s own lease must be valid. Otherwise says who
    /// has it.
    pub async fn take(&self, node: &str, key: &AgentKey) -> Result<Owner, StoreError> {
        let (class, name) = (key.class(), key.name());
        if let Some(row) = self.row(TAKE, &[&class, &name, &node]).await? {
            let epoch: i64 = row.get(0);
            return Ok(Owner::Taken {
                epoch,
                new: epoch == 1,
            });
        }
        Ok(match self.row(OWNER, &[&class, &name]).await? {
            Some(row) if row.get::<_, String>(0) == node => Owner::Kept {
                epoch: row.get(1),
                last_seq: row.get(3),
                has_base: row.get(4),
            },
            Some(row) => Owner::Other {
                node: row.get(0),
                addr: row.get::<_, Option<String>>(2).unwrap_or_default(),
            },
            // Nobody has it and `node`'s own lease expired.
            None => Owner::Other {
                node: String::new(),
                addr: String::new(),
            },
        })
    }

    /// The address of the live node other than `node` that has `key`, if one has it.
    pub async fn locate(&self, node: &str, key: &AgentKey) -> Result<Option<String>, StoreError> {
        let row = self
            .row(LOCATE, &[&key.class(), &key.name(), &node])
            .await?;
        Ok(row.map(|row| row.get(0)))
    }

    /// The cluster's secret (see `SECRET`).
    pub async fn secret(&self) -> Result<String, StoreError> {
        Ok(self.client.query_one(SECRET, &[]).await?.get(0))
    }

    /// Records that `key` is next due at `at` (ms; `None`: never), if `node` has it (else
    /// nothing: the node lost it, and its batch is refused too).
    pub async fn set_alarm(
        &self,
        node: &str,
        key: &AgentKey,
        at: Option<u64>,
    ) -> Result<(), StoreError> {
        let (class, name) = (key.class(), key.name());
        match at {
            Some(at) => {
                let at = i64::try_from(at).unwrap_or(i64::MAX);
                self.rows(SET_ALARM, &[&class, &name, &node, &at]).await?
            }
            None => self.rows(CLEAR_ALARM, &[&class, &name, &node]).await?,
        };
        Ok(())
    }

    /// Up to 256 agents due by `now` (ms) that no live node has, earliest first.
    pub async fn orphans(&self, now: u64) -> Result<Vec<AgentKey>, StoreError> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        let rows = self.rows(ORPHANS, &[&now]).await?;
        Ok(rows
            .iter()
            .filter_map(|row| AgentKey::new(row.get::<_, &str>(0), row.get::<_, &str>(1)).ok())
            .collect())
    }

    /// Appends the change sets of `batch` (agents `node` owns), in one statement: each is kept
    /// only if its epoch is still its agent's current one. Returns, in order, whether each was.
    pub async fn append(&self, node: &str, batch: &[Append<'_>]) -> Result<Vec<bool>, StoreError> {
        let classes: Vec<&str> = batch.iter().map(|a| a.key.class()).collect();
        let names: Vec<&str> = batch.iter().map(|a| a.key.name()).collect();
        let epochs: Vec<i64> = batch.iter().map(|a| a.epoch).collect();
        let seqs: Vec<i64> = batch.iter().map(|a| a.seq).collect();
        let sizes: Vec<i32> = batch.iter().map(|a| a.set.page_size as i32).collect();
        let frames: Vec<&[u8]> = batch.iter().map(|a| a.set.frames.as_slice()).collect();
        let params: [&(dyn ToSql + Sync); 7] =
            [&classes, &names, &epochs, &seqs, &sizes, &frames, &node];
        let kept: HashSet<(String, String, i64)> = self
            .rows(APPEND, &params)
            .await?
            .iter()
            .map(|row| (row.get(0), row.get(1), row.get(2)))
            .collect();
        Ok(batch
            .iter()
            .map(|a| kept.contains(&(a.key.class().to_owned(), a.key.name().to_owned(), a.seq)))
            .collect())
    }

    /// Stores `image` as `key`'s database as of `seq` and deletes the log up to it, if `epoch`
    /// is still current for `node`.
    pub async fn snapshot(
        &self,
        node: &str,
        key: &AgentKey,
        epoch: i64,
        seq: i64,
        image: &[u8],
    ) -> Result<(), StoreError> {
        let params: [&(dyn ToSql + Sync); 6] =
            [&key.class(), &key.name(), &node, &epoch, &seq, &image];
        self.fenced(SNAPSHOT, &params, key, epoch).await
    }

    /// Deletes everything of `key` (it was destroyed, or never used), if `epoch` is still
    /// current for `node`. (A later take starts at epoch 1 again: an append is fenced by node
    /// and epoch, and a node's id is new each time it starts.)
    pub async fn remove(&self, node: &str, key: &AgentKey, epoch: i64) -> Result<(), StoreError> {
        let params: [&(dyn ToSql + Sync); 4] = [&key.class(), &key.name(), &node, &epoch];
        self.fenced(REMOVE, &params, key, epoch).await
    }

    /// Runs a statement that answers how many owner rows its fence found.
    async fn fenced(
        &self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
        key: &AgentKey,
        epoch: i64,
    ) -> Result<(), StoreError> {
        let row = self.row(sql, params).await?;
        match row.map(|r| r.get::<_, i64>(0)) {
            Some(found) if found > 0 => Ok(()),
            _ => Err(StoreError::Fenced(key.clone(), epoch)),
        }
    }

    /// Everything durable of `key`: its snapshot and the change sets after it. (Read after a
    /// take: every append of the epochs before it has committed or was refused.)
    pub async fn restore(&self, key: &AgentKey) -> Result<Restored, StoreError> {
        let (class, name) = (key.class(), key.name());
        let mut restored = Restored::default();
        if let Some(row) = self.row(RESTORE_SNAPSHOT, &[&class, &name]).await? {
            restored.snapshot_seq = row.get(0);
            restored.image = Some(row.get(1));
        }
        let rows = self
            .rows(RESTORE_LOG, &[&class, &name, &restored.snapshot_seq])
            .await?;
        restored.sets = rows
            .iter()
            .map(|row| {
                let set = ChangeSet {
                    page_size: row.get::<_, i32>(1) as u32,
                    frames: row.get(2),
                };
                (row.get(0), set)
            })
            .collect();
        Ok(restored)
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
