//! Work outside the turn: `ctx.spawn` runs a slow future while the agent takes other events,
//! then delivers its result as an event of its own; `ctx.runtime()` reaches the runtime.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use agents::{prelude::*, testing::TestRuntime};
use tokio::sync::Notify;

/// Opened by the test: the "model" answers only then.
static GATE: Notify = Notify::const_new();
/// How many pieces of work started.
static STARTED: AtomicU32 = AtomicU32::new(0);

#[derive(Default)]
pub struct Assistant;

impl Agent for Assistant {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&["CREATE TABLE asked(q TEXT PRIMARY KEY, a TEXT)"])?;
        Ok(())
    }
}

/// A slow model call.
async fn model(question: String) -> String {
    STARTED.fetch_add(1, Ordering::SeqCst);
    GATE.notified().await;
    format!("the answer to {question}")
}

#[agent]
impl Assistant {
    /// Records the question and asks the model outside the turn; `fail` fails the event.
    #[callable]
    pub async fn ask(
        &mut self,
        ctx: &mut Ctx<Self>,
        question: String,
        fail: bool,
    ) -> Result<(), AppError> {
        ctx.sql()
            .execute("INSERT INTO asked(q) VALUES (?1)", [&question])?;
        let q = question.clone();
        ctx.spawn(model(q), move |answer| {
            Assistant::calls().answered(question, answer)
        });
        if fail {
            return Err(AppError::msg("changed my mind"));
        }
        Ok(())
    }

    #[callable(internal)]
    pub async fn answered(
        &mut self,
        ctx: &mut Ctx<Self>,
        question: String,
        answer: String,
    ) -> Result<(), AppError> {
        ctx.sql()
            .execute("UPDATE asked SET a = ?2 WHERE q = ?1", [&question, &answer])?;
        Ok(())
    }

    #[callable]
    pub async fn answer(
        &mut self,
        ctx: &mut Ctx<Self>,
        question: String,
    ) -> Result<Option<String>, AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT a FROM asked WHERE q = ?1", [&question], |r| {
                r.get(0)
            })
            .unwrap_or(None))
    }

    #[callable]
    pub async fn ping(&mut self, _ctx: &mut Ctx<Self>) -> String {
        "pong".into()
    }

    /// From a task of its own, calls this very agent through the runtime (no cycle: nothing
    /// waits on that task) and reports what came back.
    #[callable]
    pub async fn ping_myself_later(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        let me = ctx.runtime()?.agent::<Assistant>(ctx.name());
        tokio::spawn(async move {
            let pong = me.ping().await.map_err(|e| e.to_string());
            *PONG.lock().unwrap() = Some(pong);
        });
        Ok(())
    }
}

static PONG: std::sync::Mutex<Option<Result<String, String>>> = std::sync::Mutex::new(None);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_reaches_the_runtime() {
    let rt = TestRuntime::start(Runtime::builder().agent::<Assistant>()).unwrap();
    rt.agent::<Assistant>("b")
        .ping_myself_later()
        .await
        .unwrap();
    for _ in 0..2_000 {
        if PONG.lock().unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(*PONG.lock().unwrap(), Some(Ok("pong".to_owned())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_work_runs_outside_the_turn_and_its_result_comes_back_as_an_event() {
    let rt = TestRuntime::start(Runtime::builder().agent::<Assistant>()).unwrap();
    let a = rt.agent::<Assistant>("a");
    a.ask("life".into(), false).await.unwrap();
    // The model is still thinking (the gate is shut), and the agent answers other calls.
    for _ in 0..3 {
        assert_eq!(a.ping().await.unwrap(), "pong");
    }
    assert_eq!(a.answer("life".into()).await.unwrap(), None);
    // A failed event starts nothing.
    assert!(a.ask("never".into(), true).await.is_err());
    while STARTED.load(Ordering::SeqCst) < 1 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    GATE.notify_one(); // kept as a permit if the model is not waiting yet
    let mut answer = None;
    for _ in 0..2_000 {
        answer = a.answer("life".into()).await.unwrap();
        if answer.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(answer.as_deref(), Some("the answer to life"));
    assert_eq!(
        STARTED.load(Ordering::SeqCst),
        1,
        "the failed event's work never started"
    );
    assert_eq!(a.answer("never".into()).await.unwrap(), None);
}
