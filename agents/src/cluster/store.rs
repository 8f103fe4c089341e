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

use std::time::Duration;

use std::collections::HashMap;

use tokio_postgres::{Client, NoTls, Statement};

use crate::{address::AgentKey, replica::ChangeSet};

/// What went wrong in PostgreSQL.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The connection or a statement failed.
    #[error("postgresql: {0}")]
    Pg(#[from] tokio_postgres::Error),
    /// The agent was taken by another node (a newer epoch): this node must not write for it.
    #[error("{0} moved to another node (epoch {1} is no longer current)")]
    Fenced(AgentKey, i64),
}

/// The tables, made if missing (a statement each; idempotent).
const SCHEMA: &str = "
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
";

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

/// Who owns an agent, as a take found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owner {
    /// This node, at `epoch`; `moved` if the take bumped the epoch (another node, or nobody, had
    /// it: its local copy, if any, may be stale).
    Me { epoch: i64, moved: bool },
    /// A live node: `node` at `addr`.
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
    /// Its statements, prepared once (a statement that is not prepared costs a round trip
    /// more each time).
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

    /// `sql`, prepared on this connection.
    async fn statement(&self, sql: &'static str) -> Result<Statement, StoreError> {
        if let Some(statement) = crate::lock::lock(&self.prepared).get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        crate::lock::lock(&self.prepared).insert(sql, statement.clone());
        Ok(statement)
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Makes the tables if they are missing.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        self.client.batch_execute(SCHEMA).await?;
        Ok(())
    }

    /// Registers `node` at `addr` with a lease of `ttl` (again, if it was registered).
    pub async fn register(&self, node: &str, addr: &str, ttl: Duration) -> Result<(), StoreError> {
        self.client
            .execute(
                &self.statement("INSERT INTO agents_nodes(id, addr, lease_until)
                 VALUES ($1, $2, now() + $3 * interval '1 millisecond')
                 ON CONFLICT (id) DO UPDATE SET addr = EXCLUDED.addr, lease_until = EXCLUDED.lease_until").await?,
                &[&node, &addr, &millis(ttl)],
            )
            .await?;
        Ok(())
    }

    /// Renews `node`'s lease for `ttl`, if it has not expired: `false` if it had (the node is
    /// dead to the others, and may have lost its agents).
    pub async fn renew(&self, node: &str, ttl: Duration) -> Result<bool, StoreError> {
        let renewed = self
            .client
            .execute(
                &self.statement("UPDATE agents_nodes SET lease_until = now() + $2 * interval '1 millisecond'
                 WHERE id = $1 AND lease_until > now()").await?,
                &[&node, &millis(ttl)],
            )
            .await?;
        Ok(renewed == 1)
    }

    /// Takes `key` for `node` if nobody has it, or its owner's lease expired (bumping the
    /// epoch), or `node` has it already; `node`'s own lease must be valid. Otherwise says who
    /// has it.
    pub async fn take(&self, node: &str, key: &AgentKey) -> Result<Owner, StoreError> {
        let (class, name) = (key.class(), key.name());
        let taken = self
            .client
            .query_opt(
                &self.statement("WITH me AS (SELECT 1 FROM agents_nodes WHERE id = $3 AND lease_until > now())
                 INSERT INTO agents_owners(class, name, node, epoch)
                 SELECT $1, $2, $3, 1 FROM me
                 ON CONFLICT (class, name) DO UPDATE SET node = EXCLUDED.node, epoch = agents_owners.epoch + 1
                 WHERE agents_owners.node <> EXCLUDED.node AND NOT EXISTS (
                     SELECT 1 FROM agents_nodes n
                     WHERE n.id = agents_owners.node AND n.lease_until > now())
                 RETURNING epoch").await?,
                &[&class, &name, &node],
            )
            .await?;
        if let Some(row) = taken {
            return Ok(Owner::Me {
                epoch: row.get(0),
                moved: true,
            });
        }
        let row = self
            .client
            .query_opt(
                &self
                    .statement(
                        "SELECT o.node, o.epoch, n.addr, n.lease_until > now()
                 FROM agents_owners o LEFT JOIN agents_nodes n ON n.id = o.node
                 WHERE o.class = $1 AND o.name = $2",
                    )
                    .await?,
                &[&class, &name],
            )
            .await?;
        Ok(match row {
            Some(row) if row.get::<_, String>(0) == node => Owner::Me {
                epoch: row.get(1),
                moved: false,
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

    /// Appends the change sets of `batch` (agents `node` owns), in one statement: each is kept
    /// only if its epoch is still its agent's current one. Returns, in order, whether each was.
    pub async fn append(&self, node: &str, batch: &[Append<'_>]) -> Result<Vec<bool>, StoreError> {
        let mut classes = Vec::with_capacity(batch.len());
        let mut names = Vec::with_capacity(batch.len());
        let (mut epochs, mut seqs, mut sizes, mut frames) = (
            Vec::with_capacity(batch.len()),
            Vec::with_capacity(batch.len()),
            Vec::with_capacity(batch.len()),
            Vec::with_capacity(batch.len()),
        );
        for a in batch {
            classes.push(a.key.class());
            names.push(a.key.name());
            epochs.push(a.epoch);
            seqs.push(a.seq);
            sizes.push(a.set.page_size as i32);
            frames.push(a.set.frames.as_slice());
        }
        let kept = self
            .client
            .query(
                &self.statement(APPEND).await?,
                &[&classes, &names, &epochs, &seqs, &sizes, &frames, &node],
            )
            .await?;
        let kept: std::collections::HashSet<(String, String, i64)> = kept
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
        let stored = self
            .client
            .query_one(
                &self.statement("WITH fence AS (
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
                 SELECT (SELECT count(*) FROM fence)").await?,
                &[&key.class(), &key.name(), &node, &epoch, &seq, &image],
            )
            .await?;
        match stored.get::<_, i64>(0) {
            0 => Err(StoreError::Fenced(key.clone(), epoch)),
            _ => Ok(()),
        }
    }

    /// Everything durable of `key`: its snapshot and the change sets after it. (Read after a
    /// take: every append of the epochs before it has committed or was refused.)
    pub async fn restore(&self, key: &AgentKey) -> Result<Restored, StoreError> {
        let (class, name) = (key.class(), key.name());
        let mut restored = Restored::default();
        if let Some(row) = self
            .client
            .query_opt(
                &self
                    .statement(
                        "SELECT seq, image FROM agents_snapshots WHERE class = $1 AND name = $2",
                    )
                    .await?,
                &[&class, &name],
            )
            .await?
        {
            restored.snapshot_seq = row.get(0);
            restored.image = Some(row.get(1));
        }
        let rows = self
            .client
            .query(
                &self
                    .statement(
                        "SELECT seq, page_size, frames FROM agents_log
                 WHERE class = $1 AND name = $2 AND seq > $3 ORDER BY seq",
                    )
                    .await?,
                &[&class, &name, &restored.snapshot_seq],
            )
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
