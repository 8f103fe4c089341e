//! Destroying an agent: `ctx.destroy()` and `runtime.destroy`, after the event commits; files,
//! schedules, the alarm index entry and connections go; a later event finds a new agent.

mod common;

use std::time::Duration;

use agents::prelude::*;
use common::{next_frame, next_json, send_json, serve, ws_connect};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[derive(Default)]
pub struct Note;
impl Agent for Note {}

#[agent(event = "String")]
impl Note {
    /// Counts, and schedules a reminder an hour away (so the agent has an alarm).
    #[callable]
    pub async fn touch(&mut self, ctx: &mut Ctx<Self>) -> Result<u32, AppError> {
        let n = ctx.kv().get::<u32>("n")?.unwrap_or(0) + 1;
        ctx.kv().put("n", &n)?;
        ctx.schedule_keyed(
            "remind",
            When::after(Duration::from_secs(3600)),
            Note::calls().remind(),
        )?;
        Ok(n)
    }

    #[callable]
    pub async fn remind(&mut self, _ctx: &mut Ctx<Self>) {}

    /// Says goodbye to every connection and destroys the agent; `fail` fails the event instead.
    #[callable]
    pub async fn bye(&mut self, ctx: &mut Ctx<Self>, fail: bool) -> Result<(), AppError> {
        ctx.broadcast(&"bye".to_owned(), &[])?;
        ctx.destroy()?;
        if fail {
            return Err(AppError::msg("not today"));
        }
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_destroys_itself_after_its_event_commits() {
    let (rt, addr) = serve(Runtime::builder().agent::<Note>()).await;
    let note = rt.agent::<Note>("n");
    assert_eq!(note.touch().await, Ok(1));
    let path = rt.database_path::<Note>("n").unwrap();
    assert!(path.exists());
    assert_eq!(rt.pending_alarms(), 1);

    let mut ws = ws_connect(addr, "/agents/note/n", Some("agents.v1.json"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "identity");
    send_json(&mut ws, json!({"type": "call", "id": 1, "method": "touch"})).await;
    assert_eq!(next_json(&mut ws).await["ok"], 2); // admitted

    // A failed event destroys nothing.
    assert!(note.bye(true).await.is_err());
    assert_eq!(note.touch().await, Ok(3));

    note.bye(false).await.unwrap();
    // What the event sent leaves first, then the connection closes (without on_close).
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "event", "data": "bye"})
    );
    match next_frame(&mut ws).await {
        Message::Close(Some(frame)) => {
            assert_eq!(u16::from(frame.code), 1000);
            assert_eq!(frame.reason.as_str(), "the agent was destroyed");
        }
        other => panic!("expected a close, got {other:?}"),
    }
    assert!(!path.exists(), "the database file is gone");
    assert!(!path.with_extension("sqlite-wal").exists());
    assert_eq!(rt.pending_alarms(), 0);
    assert_eq!(rt.connection_count(), 0);
    // A later event finds a new, empty agent.
    assert_eq!(note.touch().await, Ok(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_runtime_destroys_an_agent_live_or_not() {
    let mut rt = agents::testing::TestRuntime::start(Runtime::builder().agent::<Note>()).unwrap();
    let note = rt.agent::<Note>("r");
    assert_eq!(note.touch().await, Ok(1));
    rt.hibernate::<Note>("r").await.unwrap();
    rt.destroy::<Note>("r").await.unwrap();
    assert!(!rt.database_path::<Note>("r").unwrap().exists());
    assert_eq!(rt.pending_alarms(), 0);
    assert!(rt.destroy::<Note>("").await.is_err(), "an invalid name");

    // Destroyed but not yet deleted when the process stopped: the next open finishes the job.
    assert_eq!(note.touch().await, Ok(1));
    assert_eq!(note.touch().await, Ok(2));
    rt.restart().await.unwrap();
    let path = rt.database_path::<Note>("r").unwrap();
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO _agents_meta(k, v) VALUES ('destroyed', '1')",
            [],
        )
        .unwrap();
    assert_eq!(rt.agent::<Note>("r").touch().await, Ok(1));
}
