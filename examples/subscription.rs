//! A subscription: renewal 30 days after signup, re-armed on success, downgraded after a failed
//! charge, cancellable. `cargo run --example subscription`
//!
//! The renewal is a keyed one-shot schedule. It re-arms itself under the same key, and
//! cancelling removes it. Time comes from the runtime's clock, so the demo (and the test)
//! run 90 days in milliseconds on a manual clock.

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, Clock};
use serde::{Deserialize, Serialize};

/// The renewal period.
pub const PERIOD: Duration = Duration::from_secs(30 * 24 * 3600);
const RENEWAL: &str = "renewal";

/// One customer's subscription.
#[derive(Default)]
pub struct Subscription;

impl Agent for Subscription {}

/// What the subscription looks like now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `"pro"` while paid, `"free"` after a failed charge or a cancellation.
    pub plan: String,
    /// Successful charges so far.
    pub charges: u32,
    /// When the next renewal runs, if one is scheduled.
    pub renews_at: Option<SystemTime>,
}

#[agent]
impl Subscription {
    /// Starts a paid plan and schedules its first renewal.
    #[callable]
    pub async fn signup(&mut self, ctx: &mut Ctx<Self>) -> Result<Status, AppError> {
        ctx.kv().put("plan", "pro")?;
        ctx.schedule_keyed(RENEWAL, When::after(PERIOD), Subscription::calls().renew())?;
        status(ctx)
    }

    /// Whether the card on file can be charged (the demo's stand-in for a payment provider).
    #[callable]
    pub async fn set_card_valid(
        &mut self,
        ctx: &mut Ctx<Self>,
        valid: bool,
    ) -> Result<(), AppError> {
        Ok(ctx.kv().put("card-declined", &!valid)?)
    }

    /// The renewal: charge, then re-arm; a declined card downgrades to the free plan.
    #[callable(private)] // run by its schedule only: no client may call it
    pub async fn renew(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        if ctx.kv().get::<bool>("card-declined")?.unwrap_or(false) {
            ctx.kv().put("plan", "free")?;
            return Ok(()); // handled: no retry, no new renewal
        }
        let charges = ctx.kv().get::<u32>("charges")?.unwrap_or(0);
        ctx.kv().put("charges", &(charges + 1))?;
        ctx.schedule_keyed(RENEWAL, When::after(PERIOD), Subscription::calls().renew())?;
        Ok(())
    }

    /// Cancels: no further renewals, back to free.
    #[callable]
    pub async fn cancel(&mut self, ctx: &mut Ctx<Self>) -> Result<Status, AppError> {
        for s in ctx.schedules()? {
            if s.key.as_deref() == Some(RENEWAL) {
                ctx.cancel(s.id)?;
            }
        }
        ctx.kv().put("plan", "free")?;
        status(ctx)
    }

    /// The current status.
    #[callable]
    pub async fn status(&mut self, ctx: &mut Ctx<Self>) -> Result<Status, AppError> {
        status(ctx)
    }
}

fn status(ctx: &Ctx<Subscription>) -> Result<Status, AppError> {
    let renews_at = ctx
        .schedules()?
        .into_iter()
        .find(|s| s.key.as_deref() == Some(RENEWAL))
        .map(|s| s.next);
    Ok(Status {
        plan: ctx
            .kv()
            .get::<String>("plan")?
            .unwrap_or_else(|| "free".into()),
        charges: ctx.kv().get("charges")?.unwrap_or(0),
        renews_at,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(SystemTime::now()))
            .agent::<Subscription>(),
    )?;
    let sub = rt.agent::<Subscription>("customer-42");
    println!("signed up: {:?}", sub.signup().await?.plan);
    rt.advance(PERIOD).await;
    println!("after 30 days: {:?}", sub.status().await?);
    sub.set_card_valid(false).await?;
    rt.advance(PERIOD).await;
    println!("after a declined card: {:?}", sub.status().await?);
    Ok(())
}
