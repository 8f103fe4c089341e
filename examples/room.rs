//! A chat room that deletes its history after 30 minutes without activity.
//! `cargo run --example room`
//!
//! Every post pushes the room's alarm back to 30 minutes from now; when the alarm finally goes
//! off, `on_alarm` purges the room. One alarm per room, re-derived on every change: no timers to
//! leak, and it survives restarts and hibernation.

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, AlarmInfo, Clock};

/// How long a room keeps its history without activity.
pub const IDLE: Duration = Duration::from_secs(30 * 60);

/// A chat room.
#[derive(Default)]
pub struct Room;

impl Agent for Room {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&["CREATE TABLE messages(id INTEGER PRIMARY KEY, text TEXT NOT NULL)"])?;
        Ok(())
    }

    async fn on_alarm(&mut self, ctx: &mut Ctx<Self>, _info: AlarmInfo) -> Result<(), AppError> {
        ctx.sql().execute("DELETE FROM messages", [])?;
        ctx.kv().delete_all()?;
        Ok(())
    }
}

#[agent]
impl Room {
    /// Posts a message; returns how many the room holds.
    #[callable]
    pub async fn post(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<i64, AppError> {
        ctx.sql()
            .execute("INSERT INTO messages(text) VALUES (?1)", [&text])?;
        ctx.set_alarm(ctx.now() + IDLE)?;
        Ok(ctx
            .sql()
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?)
    }

    /// The history, oldest first.
    #[callable]
    pub async fn history(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<String>, AppError> {
        let mut stmt = ctx.sql().prepare("SELECT text FROM messages ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// When the room will be purged if nobody posts.
    #[callable]
    pub async fn purge_at(&mut self, ctx: &mut Ctx<Self>) -> Result<Option<SystemTime>, AppError> {
        Ok(ctx.alarm()?)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let rt = TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(SystemTime::now()))
            .agent::<Room>(),
    )?;
    let room = rt.agent::<Room>("lobby");
    room.post("hello".into()).await?;
    rt.advance(Duration::from_secs(20 * 60)).await;
    room.post("still here".into()).await?;
    rt.advance(Duration::from_secs(20 * 60)).await;
    println!(
        "40 minutes in, active 20 minutes ago: {:?}",
        room.history().await?
    );
    rt.advance(Duration::from_secs(11 * 60)).await;
    println!("after 30 quiet minutes: {:?}", room.history().await?);
    Ok(())
}
