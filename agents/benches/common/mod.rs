//! The agent the benchmarks call: one durable UPSERT per call, the same write the raw rusqlite
//! baselines do.
#![allow(dead_code)]

use agents::prelude::*;

pub const SCHEMA: &str =
    "CREATE TABLE counter(id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL)";
pub const UPSERT: &str =
    "INSERT INTO counter(id, n) VALUES (0, ?1) ON CONFLICT(id) DO UPDATE SET n = n + excluded.n RETURNING n";

#[derive(Default)]
pub struct Counter;

impl Agent for Counter {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&[SCHEMA])?;
        Ok(())
    }
}

#[agent]
impl Counter {
    /// Adds `by`; returns the total.
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .prepare_cached(UPSERT)?
            .query_row([by], |r| r.get(0))?)
    }
}

/// A plain rusqlite connection for the raw baselines: WAL, the given `synchronous` setting, and
/// the bench's table.
pub fn raw_open(path: &std::path::Path, synchronous: &str) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", synchronous)
        .unwrap();
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {}",
        &SCHEMA["CREATE TABLE ".len()..]
    ))
    .unwrap();
    conn
}
