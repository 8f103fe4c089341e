//! What belongs to one event stays with it: a call carries the agents really waiting on it
//! (not those of an event that ended, nor those of a handler that spawned it), and who called
//! is never seen by a later event.

mod common;

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use agents::{prelude::*, testing::TestRuntime};
use common::{next_frame, serve, ws_connect};

/// What the calls made outside a handler came to, by the name of the agent that made them.
static OUTCOMES: Mutex<Option<HashMap<String, String>>> = Mutex::new(None);

fn record(name: &str, outcome: String) {
    OUTCOMES
        .lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(name.to_owned(), outcome);
}

async fn outcome(name: &str) -> String {
    let start = Instant::now();
    loop {
        if let Some(o) = OUTCOMES.lock().unwrap().as_ref().and_then(|m| m.get(name)) {
            return o.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no outcome for {name}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[derive(Default)]
pub struct Looper {
    kept: Option<LooperClient>,
}

impl Agent for Looper {
    /// A raw message names an agent to ping; the outcome comes back as a text frame.
    async fn on_message(
        &mut self,
        ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        msg: WsMessage,
    ) -> Result<(), AppError> {
        let target = msg.as_text().unwrap_or_default().to_owned();
        let outcome = ctx.agent::<Looper>(&target).ping().await;
        conn.send_raw(WsMessage::Text(format!("{outcome:?}")));
        Ok(())
    }
}

#[agent]
impl Looper {
    #[callable]
    pub async fn ping(&mut self, ctx: &mut Ctx<Self>) -> u64 {
        let n = ctx.kv().get::<u64>("pings").unwrap().unwrap_or(0) + 1;
        ctx.kv().put("pings", &n).unwrap();
        n
    }

    /// Calls `target`'s `ping`.
    #[callable]
    pub async fn call(&mut self, ctx: &mut Ctx<Self>, target: String) -> Result<u64, AppError> {
        Ok(ctx.agent::<Looper>(&target).ping().await?)
    }

    /// After this handler returned, a task calls back into this agent: directly, or through
    /// `via`. Nothing waits on that call, so it must not be refused as a cycle.
    #[callable]
    pub async fn later(&mut self, ctx: &mut Ctx<Self>, via: Option<String>) {
        let me = ctx.name().to_owned();
        let client = ctx.agent::<Looper>(via.as_deref().unwrap_or(&me));
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let outcome = match via {
                Some(_) => client.call(me.clone()).await.map_err(|e| e.to_string()),
                None => client.ping().await.map_err(|e| e.to_string()),
            };
            record(&me, format!("{outcome:?}"));
        });
    }

    #[callable]
    pub async fn nap(&mut self, _ctx: &mut Ctx<Self>, ms: u64) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }

    /// Calls `target`'s `nap(ms)` with a 20 ms timeout, and lets its error pass with `?`.
    #[callable]
    pub async fn impatient(
        &mut self,
        ctx: &mut Ctx<Self>,
        target: String,
        ms: u64,
    ) -> Result<(), AppError> {
        let target = ctx.agent::<Looper>(&target);
        Ok(target
            .with_timeout(Duration::from_millis(20))
            .nap(ms)
            .await?)
    }

    /// Keeps a client of `target` for a later event.
    #[callable]
    pub async fn keep(&mut self, ctx: &mut Ctx<Self>, target: String) {
        self.kept = Some(ctx.agent::<Looper>(&target));
    }

    /// Makes `target` (the kept client's agent) call this agent back, from a later event: a
    /// real cycle, which must fail at once, not wait for the timeout.
    #[callable]
    pub async fn use_kept(&mut self, ctx: &mut Ctx<Self>) -> Result<u64, AppError> {
        let kept = self.kept.clone().expect("keep ran first");
        Ok(kept.call(ctx.name().to_owned()).await?)
    }
}

fn runtime() -> TestRuntime {
    TestRuntime::start(
        Runtime::builder()
            .agent::<Looper>()
            .call_timeout(Duration::from_secs(10)),
    )
    .unwrap()
}

#[tokio::test]
async fn a_task_spawned_by_a_handler_calls_back_into_its_agent() {
    let rt = runtime();
    rt.agent::<Looper>("self-spawner")
        .later(None)
        .await
        .unwrap();
    assert_eq!(outcome("self-spawner").await, "Ok(1)");
}

#[tokio::test]
async fn a_task_spawned_by_a_handler_calls_back_through_a_third_agent() {
    let rt = runtime();
    let w = rt.agent::<Looper>("via-spawner");
    w.later(Some("third".into())).await.unwrap();
    assert_eq!(outcome("via-spawner").await, "Ok(1)");
}

#[tokio::test]
async fn a_client_kept_in_a_field_carries_the_event_that_uses_it() {
    let rt = runtime();
    let w = rt.agent::<Looper>("keeper");
    w.keep("kept".into()).await.unwrap();
    let start = Instant::now();
    let e = w.use_kept().await.unwrap_err();
    assert!(matches!(e, RpcError::Cycle(_)), "{e:?}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "it waited for the timeout"
    );
    // And outside any event the same agents call each other freely.
    assert_eq!(
        rt.agent::<Looper>("kept").call("keeper".into()).await,
        Ok(1)
    );
}

#[tokio::test]
async fn a_hook_after_a_call_does_not_inherit_the_call_chain() {
    let (rt, addr) = serve(Runtime::builder().agent::<Looper>()).await;
    // x calls w: w's event runs on behalf of x.
    assert_eq!(rt.agent::<Looper>("x").call("w".into()).await, Ok(1));
    // Then w's on_message calls x: nothing waits on w now, so this is no cycle.
    let mut ws = ws_connect(addr, "/agents/looper/w", None).await.unwrap();
    futures_util::SinkExt::send(&mut ws, "x".into())
        .await
        .unwrap();
    assert_eq!(next_frame(&mut ws).await.to_text().unwrap(), "Ok(1)");
    // A call to itself from its own hook is a cycle, at once.
    futures_util::SinkExt::send(&mut ws, "w".into())
        .await
        .unwrap();
    let frame = next_frame(&mut ws).await;
    assert!(frame.to_text().unwrap().starts_with("Err(Cycle"), "{frame}");
}

#[tokio::test]
async fn a_failed_call_passed_on_with_question_mark_keeps_its_kind() {
    let (rt, addr) = serve(Runtime::builder().agent::<Looper>()).await;
    let e = rt
        .agent::<Looper>("impatient")
        .impatient("sleepy".into(), 2_000)
        .await
        .unwrap_err();
    assert_eq!(e, RpcError::Timeout);
    let (status, body) = common::http_request(
        addr,
        "POST",
        "/agents/looper/impatient/call/impatient",
        r#"["sleepy", 2000]"#,
    )
    .await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["kind"], "timeout");
    // So is a call to an address that cannot exist.
    let e = rt
        .agent::<Looper>("impatient")
        .impatient("".into(), 0)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), agents::ErrorKind::BadArgs, "{e:?}");
}
