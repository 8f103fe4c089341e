//! A counter spread over N shard agents, summed by a parent agent through typed calls.
//! `cargo run --example sharded_counter`
//!
//! Writers hit the shards directly (spreading load over N single writers); the parent
//! `ShardedCounter` agent reads them all concurrently when asked for the total.

use agents::prelude::*;

/// How many shards a counter has.
pub const SHARDS: u32 = 8;

/// One shard: a plain durable counter.
#[derive(Default)]
pub struct Shard;

impl Agent for Shard {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&[
            "CREATE TABLE n(id INTEGER PRIMARY KEY CHECK (id = 0), v INTEGER NOT NULL)",
        ])?;
        Ok(())
    }
}

#[agent]
impl Shard {
    /// Adds `by`; returns this shard's value.
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, AppError> {
        Ok(ctx.sql().query_row(
            "INSERT INTO n(id, v) VALUES (0, ?1) ON CONFLICT(id) DO UPDATE SET v = v + excluded.v RETURNING v",
            [by],
            |r| r.get(0),
        )?)
    }

    /// This shard's value.
    #[callable]
    pub async fn get(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT coalesce((SELECT v FROM n), 0)", [], |r| r.get(0))?)
    }
}

/// The shard of counter `counter` that `item` writes to.
pub fn shard_name(counter: &str, item: u64) -> String {
    format!("{counter}#{}", item % u64::from(SHARDS))
}

/// The parent: knows its shards and sums them.
#[derive(Default)]
pub struct ShardedCounter;

impl Agent for ShardedCounter {}

#[agent]
impl ShardedCounter {
    /// The sum over every shard, read concurrently.
    #[callable]
    pub async fn total(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        let mut reads = tokio::task::JoinSet::new();
        for i in 0..u64::from(SHARDS) {
            let shard = ctx.agent::<Shard>(&shard_name(ctx.name(), i));
            reads.spawn(async move { shard.get().await });
        }
        let mut total = 0;
        while let Some(read) = reads.join_next().await {
            total += read.map_err(AppError::msg)??;
        }
        Ok(total)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::builder()
        .data_dir(dir.path())
        .agent::<Shard>()
        .agent::<ShardedCounter>()
        .build()?;
    let tasks: Vec<_> = (0..1000u64)
        .map(|item| {
            let shard = runtime.agent::<Shard>(&shard_name("page-views", item));
            tokio::spawn(async move { shard.add(1).await })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let total = runtime
        .agent::<ShardedCounter>("page-views")
        .total()
        .await?;
    println!("1000 increments over {SHARDS} shards: total {total}");
    runtime.shutdown().await;
    Ok(())
}
