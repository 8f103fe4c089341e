//! A workspace agent with child thread agents. `cargo run --example workspace`
//!
//! The parent keeps the registry of threads; each thread keeps its own messages in its own
//! database. Deleting a thread clears it and tells the parent. A monthly cron on the workspace
//! forgets deleted threads for good.

use std::time::{Duration, SystemTime};

use agents::{prelude::*, testing::TestRuntime, Clock};

/// The parent: a registry of threads.
#[derive(Default)]
pub struct Workspace;

impl Agent for Workspace {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&["CREATE TABLE threads(name TEXT PRIMARY KEY, title TEXT NOT NULL, deleted INTEGER NOT NULL DEFAULT 0)"])?;
        Ok(())
    }
}

/// The agent name of thread `n` of workspace `ws`.
pub fn thread_name(ws: &str, n: i64) -> String {
    format!("{ws}/{n}")
}

#[agent]
impl Workspace {
    /// Creates a thread; returns its agent name.
    #[callable]
    pub async fn create_thread(
        &mut self,
        ctx: &mut Ctx<Self>,
        title: String,
    ) -> Result<String, AppError> {
        let n: i64 = ctx
            .sql()
            .query_row("SELECT count(*) + 1 FROM threads", [], |r| r.get(0))?;
        let name = thread_name(ctx.name(), n);
        ctx.sql().execute(
            "INSERT INTO threads(name, title) VALUES (?1, ?2)",
            (&name, &title),
        )?;
        ctx.agent::<Thread>(&name)
            .init(ctx.name().to_owned(), title)
            .await?;
        Ok(name)
    }

    /// Live threads: (name, title).
    #[callable]
    pub async fn threads(
        &mut self,
        ctx: &mut Ctx<Self>,
    ) -> Result<Vec<(String, String)>, AppError> {
        let mut stmt = ctx
            .sql()
            .prepare("SELECT name, title FROM threads WHERE deleted = 0 ORDER BY name")?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Called by a thread when it is deleted.
    #[callable]
    pub async fn thread_deleted(
        &mut self,
        ctx: &mut Ctx<Self>,
        name: String,
    ) -> Result<(), AppError> {
        ctx.sql()
            .execute("UPDATE threads SET deleted = 1 WHERE name = ?1", [&name])?;
        Ok(())
    }

    /// Registry rows, deleted ones included.
    #[callable]
    pub async fn registry_size(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT count(*) FROM threads", [], |r| r.get(0))?)
    }

    /// Monthly: forget deleted threads (03:00 UTC on the 1st).
    #[schedule(cron = "0 3 1 * *")]
    async fn monthly_cleanup(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.sql()
            .execute("DELETE FROM threads WHERE deleted = 1", [])?;
        Ok(())
    }
}

/// A child: one thread's messages.
#[derive(Default)]
pub struct Thread;

impl Agent for Thread {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&["CREATE TABLE messages(id INTEGER PRIMARY KEY, text TEXT NOT NULL)"])?;
        Ok(())
    }
}

#[agent]
impl Thread {
    /// Records the parent and title (called by the workspace).
    #[callable]
    pub async fn init(
        &mut self,
        ctx: &mut Ctx<Self>,
        workspace: String,
        title: String,
    ) -> Result<(), AppError> {
        ctx.kv().put("workspace", &workspace)?;
        ctx.kv().put("title", &title)?;
        Ok(())
    }

    /// Posts a message; returns the thread's message count.
    #[callable]
    pub async fn post(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<i64, AppError> {
        ctx.sql()
            .execute("INSERT INTO messages(text) VALUES (?1)", [&text])?;
        Ok(ctx
            .sql()
            .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?)
    }

    /// The messages, oldest first.
    #[callable]
    pub async fn messages(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<String>, AppError> {
        let mut stmt = ctx.sql().prepare("SELECT text FROM messages ORDER BY id")?;
        let rows = stmt
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        Ok(rows)
    }

    /// Deletes the thread's content and tells the workspace.
    #[callable]
    pub async fn delete(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.sql().execute("DELETE FROM messages", [])?;
        let workspace: String = ctx
            .kv()
            .get("workspace")?
            .ok_or_else(|| AppError::msg("not initialised"))?;
        ctx.agent::<Workspace>(&workspace)
            .thread_deleted(ctx.name().to_owned())
            .await?;
        Ok(())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_790_000_000); // 2026-09-21 14:13 UTC
    let rt = TestRuntime::start(
        Runtime::builder()
            .clock(Clock::manual(start))
            .agent::<Workspace>()
            .agent::<Thread>(),
    )?;
    let ws = rt.agent::<Workspace>("acme");
    let general = ws.create_thread("general".into()).await?;
    let random = ws.create_thread("random".into()).await?;
    rt.agent::<Thread>(&general).post("hi all".into()).await?;
    rt.agent::<Thread>(&random).delete().await?;
    println!(
        "threads: {:?} (registry holds {})",
        ws.threads().await?,
        ws.registry_size().await?
    );
    rt.advance(Duration::from_secs(10 * 24 * 3600)).await; // past 1 October 03:00
    println!(
        "after the monthly cleanup the registry holds {}",
        ws.registry_size().await?
    );
    Ok(())
}
