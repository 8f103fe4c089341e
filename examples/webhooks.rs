//! A webhook processor: accepts events once (deduplicated by id), queues their delivery
//! durably, and retries failed deliveries with backoff. `cargo run --example webhooks`
//!
//! The downstream service is another agent (`Endpoint`) that answers 503 a configurable number
//! of times: the processor turns that into an `Err`, and the runtime retries after 2 s, 4 s, ..
//! and dead-letters the event after 6 retries.

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, Clock};

/// Receives webhooks and delivers them downstream.
#[derive(Default)]
pub struct WebhookProcessor;

impl Agent for WebhookProcessor {}

#[agent]
impl WebhookProcessor {
    /// Accepts an event; `false` if it was seen before. Delivery happens after the event is
    /// durably queued, in its own event.
    #[callable]
    pub async fn receive(
        &mut self,
        ctx: &mut Ctx<Self>,
        id: String,
        body: String,
    ) -> Result<bool, AppError> {
        if ctx.kv().get::<bool>(&format!("seen/{id}"))?.is_some() {
            return Ok(false);
        }
        ctx.kv().put(&format!("seen/{id}"), &true)?;
        ctx.enqueue(WebhookProcessor::calls().deliver(id, body))?;
        Ok(true)
    }

    /// Delivers one event downstream; an error means "retry later".
    #[callable(private)] // run by its schedule only: no client may call it
    pub async fn deliver(
        &mut self,
        ctx: &mut Ctx<Self>,
        id: String,
        body: String,
    ) -> Result<(), AppError> {
        let status = ctx
            .agent::<Endpoint>("downstream")
            .post(id.clone(), body)
            .await?;
        if status != 200 {
            return Err(AppError::msg(format!(
                "downstream answered {status} for {id}"
            )));
        }
        ctx.kv().put(&format!("delivered/{id}"), &true)?;
        Ok(())
    }

    /// Ids delivered so far.
    #[callable]
    pub async fn delivered(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<String>, AppError> {
        Ok(ctx
            .kv()
            .list::<bool>("delivered/")?
            .into_iter()
            .map(|(k, _)| k["delivered/".len()..].to_owned())
            .collect())
    }

    /// Events given up on: (method, attempts, last error).
    #[callable]
    pub async fn dead_letters(
        &mut self,
        ctx: &mut Ctx<Self>,
    ) -> Result<Vec<(String, u32, String)>, AppError> {
        Ok(ctx
            .dead_letters()?
            .into_iter()
            .map(|d| (d.method, d.attempts, d.error))
            .collect())
    }
}

/// A downstream service that fails the first `failures` posts of each event.
#[derive(Default)]
pub struct Endpoint;

impl Agent for Endpoint {}

#[agent]
impl Endpoint {
    /// How many times each event is refused before it is accepted.
    #[callable]
    pub async fn fail_first(&mut self, ctx: &mut Ctx<Self>, failures: u32) -> Result<(), AppError> {
        Ok(ctx.kv().put("failures", &failures)?)
    }

    /// Receives an event: 503 while it still has failures to give, then 200.
    #[callable]
    pub async fn post(
        &mut self,
        ctx: &mut Ctx<Self>,
        id: String,
        _body: String,
    ) -> Result<u16, AppError> {
        let key = format!("attempts/{id}");
        let attempts = ctx.kv().get::<u32>(&key)?.unwrap_or(0) + 1;
        ctx.kv().put(&key, &attempts)?;
        let failures = ctx.kv().get::<u32>("failures")?.unwrap_or(0);
        Ok(if attempts > failures { 200 } else { 503 })
    }

    /// How many times `id` was posted.
    #[callable]
    pub async fn attempts(&mut self, ctx: &mut Ctx<Self>, id: String) -> Result<u32, AppError> {
        Ok(ctx.kv().get(&format!("attempts/{id}"))?.unwrap_or(0))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(SystemTime::now()))
            .agent::<WebhookProcessor>()
            .agent::<Endpoint>(),
    )?;
    rt.agent::<Endpoint>("downstream").fail_first(2).await?;
    let hooks = rt.agent::<WebhookProcessor>("stripe");
    println!(
        "evt_1 accepted: {}",
        hooks.receive("evt_1".into(), "{}".into()).await?
    );
    println!(
        "evt_1 again accepted: {}",
        hooks.receive("evt_1".into(), "{}".into()).await?
    );
    for _ in 0..10 {
        rt.advance(Duration::from_secs(1)).await;
    }
    let attempts = rt
        .agent::<Endpoint>("downstream")
        .attempts("evt_1".into())
        .await?;
    println!(
        "delivered {:?} after {attempts} attempts",
        hooks.delivered().await?
    );
    Ok(())
}
