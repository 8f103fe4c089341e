//! Durable calls to other agents: `ctx.enqueue_to` / `ctx.schedule_to` put a call to another
//! agent in this agent's queue, delivered with the same retries and dead letters.

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, Clock};

/// Receives deliveries; refuses while `closed`.
#[derive(Default)]
pub struct Inbox;
impl Agent for Inbox {}

#[agent]
impl Inbox {
    #[callable]
    pub async fn deliver(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<(), AppError> {
        if ctx.kv().get::<bool>("closed")?.unwrap_or(false) {
            return Err(AppError::msg("the inbox is closed"));
        }
        let mut all: Vec<String> = ctx.kv().get("all")?.unwrap_or_default();
        all.push(text);
        ctx.kv().put("all", &all)?;
        Ok(())
    }

    #[callable]
    pub async fn all(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<String>, AppError> {
        Ok(ctx.kv().get("all")?.unwrap_or_default())
    }

    #[callable]
    pub async fn close(&mut self, ctx: &mut Ctx<Self>, closed: bool) -> Result<(), AppError> {
        Ok(ctx.kv().put("closed", &closed)?)
    }
}

/// Sends to inboxes through its own queue.
#[derive(Default)]
pub struct Outbox;
impl Agent for Outbox {}

#[agent]
impl Outbox {
    #[callable]
    pub async fn send(
        &mut self,
        ctx: &mut Ctx<Self>,
        to: String,
        text: String,
        in_s: u64,
    ) -> Result<i64, AppError> {
        let call = Inbox::calls().deliver(text);
        Ok(if in_s == 0 {
            ctx.enqueue_to::<Inbox>(&to, call)?
        } else {
            ctx.schedule_to::<Inbox>(&to, When::after(Duration::from_secs(in_s)), call)?
        })
    }

    /// (method, target) of each dead letter.
    #[callable]
    pub async fn dead(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<(String, String)>, AppError> {
        Ok(ctx
            .dead_letters()?
            .into_iter()
            .map(|d| {
                (
                    d.method,
                    d.target.map(|t| t.to_string()).unwrap_or_default(),
                )
            })
            .collect())
    }

    /// How many rows are queued.
    #[callable]
    pub async fn queued(&mut self, ctx: &mut Ctx<Self>) -> Result<usize, AppError> {
        Ok(ctx.schedules()?.len())
    }
}

fn runtime() -> TestRuntime {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(start))
            .agent::<Inbox>()
            .agent::<Outbox>(),
    )
    .unwrap()
}

#[tokio::test]
async fn calls_to_other_agents_are_delivered_from_the_queue() {
    let rt = runtime();
    let start = rt.now();
    assert_eq!(rt.clock().now(), start, "the manual clock stands still");
    let out = rt.agent::<Outbox>("out");
    out.send("ann".into(), "now".into(), 0).await.unwrap();
    out.send("ann".into(), "later".into(), 3600).await.unwrap();
    rt.advance(Duration::ZERO).await;
    assert_eq!(rt.agent::<Inbox>("ann").all().await.unwrap(), ["now"]);
    rt.advance(Duration::from_secs(3600)).await;
    assert_eq!(
        rt.agent::<Inbox>("ann").all().await.unwrap(),
        ["now", "later"]
    );
    assert_eq!(out.queued().await.unwrap(), 0);
    assert_eq!(rt.now(), start + Duration::from_secs(3600));
}

#[tokio::test]
async fn a_refused_delivery_is_retried_then_becomes_a_dead_letter() {
    let mut rt = runtime();
    let out = rt.agent::<Outbox>("out");
    let bob = rt.agent::<Inbox>("bob");
    bob.close(true).await.unwrap();
    out.send("bob".into(), "hello".into(), 0).await.unwrap();
    rt.advance(Duration::ZERO).await;
    // It survives a restart in the queue, and is delivered once the inbox opens.
    rt.restart().await.unwrap();
    rt.agent::<Inbox>("bob").close(false).await.unwrap();
    rt.advance(Duration::from_secs(2)).await;
    assert_eq!(rt.agent::<Inbox>("bob").all().await.unwrap(), ["hello"]);

    rt.agent::<Inbox>("bob").close(true).await.unwrap();
    let out = rt.agent::<Outbox>("out");
    out.send("bob".into(), "never".into(), 0).await.unwrap();
    for _ in 0..200 {
        rt.advance(Duration::from_secs(1)).await;
    }
    assert_eq!(
        out.dead().await.unwrap(),
        [("deliver".to_owned(), "inbox/bob".to_owned())]
    );
    assert_eq!(rt.agent::<Inbox>("bob").all().await.unwrap(), ["hello"]);
}

#[tokio::test]
async fn a_target_must_be_a_registered_class_and_a_valid_name() {
    let rt = runtime();
    let e = rt
        .agent::<Outbox>("out")
        .send(String::new(), "x".into(), 0)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("name"), "{e}");
}
