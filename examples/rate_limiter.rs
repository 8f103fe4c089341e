//! A token-bucket rate limiter: one agent per client key. `cargo run --example rate_limiter`
//!
//! Read-modify-write of the bucket is atomic without locks: concurrent requests for the same
//! key are handled one at a time by its agent.

use std::time::{SystemTime, UNIX_EPOCH};

use agents::prelude::*;
use serde::{Deserialize, Serialize};

/// Bucket size: the burst a key may spend at once.
pub const CAPACITY: f64 = 10.0;
/// Tokens added per second.
pub const REFILL_PER_SEC: f64 = 2.0;

/// The bucket of one key.
#[derive(Default)]
pub struct RateLimiter;

impl Agent for RateLimiter {}

/// The outcome of a request for tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the tokens were granted (and spent).
    pub allowed: bool,
    /// Whole tokens left.
    pub remaining: u32,
    /// When refused: how long until enough tokens are back.
    pub retry_after_ms: u64,
}

#[derive(Serialize, Deserialize)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[agent]
impl RateLimiter {
    /// Takes `cost` tokens if the bucket has them.
    #[callable]
    pub async fn acquire(&mut self, ctx: &mut Ctx<Self>, cost: u32) -> Result<Decision, AppError> {
        let now = now_ms();
        let kv = ctx.kv();
        let bucket = kv.get::<Bucket>("bucket")?.unwrap_or(Bucket {
            tokens: CAPACITY,
            at_ms: now,
        });
        let elapsed = now.saturating_sub(bucket.at_ms) as f64 / 1000.0;
        let mut tokens = (bucket.tokens + elapsed * REFILL_PER_SEC).min(CAPACITY);
        let cost = f64::from(cost);
        let allowed = tokens >= cost;
        if allowed {
            tokens -= cost;
        }
        kv.put("bucket", &Bucket { tokens, at_ms: now })?;
        let retry_after_ms = if allowed {
            0
        } else {
            ((cost - tokens) / REFILL_PER_SEC * 1000.0).ceil() as u64
        };
        Ok(Decision {
            allowed,
            remaining: tokens.floor() as u32,
            retry_after_ms,
        })
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let runtime = Runtime::builder()
        .data_dir(dir.path())
        .agent::<RateLimiter>()
        .build()?;
    let limiter = runtime.agent::<RateLimiter>("api-key-123");
    let tasks: Vec<_> = (0..15)
        .map(|_| {
            let limiter = limiter.clone();
            tokio::spawn(async move { limiter.acquire(1).await })
        })
        .collect();
    let mut allowed = 0;
    for t in tasks {
        if t.await??.allowed {
            allowed += 1;
        }
    }
    println!("15 concurrent requests, bucket of {CAPACITY}: {allowed} allowed");
    let d = limiter.acquire(1).await?;
    println!(
        "next request: allowed={} retry after {} ms",
        d.allowed, d.retry_after_ms
    );
    runtime.shutdown().await;
    Ok(())
}
