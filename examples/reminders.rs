//! Durable reminders: schedules that survive restarts and fire once. `cargo run --example reminders`
//!
//! `cargo run --example reminders -- serve DIR` speaks a line protocol on stdin/stdout (used by
//! the downtime test): `remind <name> <delay_ms> <text>` answers `ok <name> <text>` once the
//! schedule is durable; each reminder prints `fired <name> <text> <late_ms>` when it runs;
//! `count <name>` answers `count <name> <n>`, the reminders that have fired.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agents::prelude::*;

/// The reminders of one person.
#[derive(Default)]
pub struct Reminders;

impl Agent for Reminders {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&["CREATE TABLE fired(text TEXT NOT NULL, due_ms INTEGER NOT NULL, at_ms INTEGER NOT NULL)"])?;
        Ok(())
    }
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[agent]
impl Reminders {
    /// Reminds of `text` in `delay_ms`.
    #[callable]
    pub async fn remind_in(
        &mut self,
        ctx: &mut Ctx<Self>,
        delay_ms: u64,
        text: String,
    ) -> Result<i64, AppError> {
        let due = ms(ctx.now()) + delay_ms;
        Ok(ctx.schedule(
            When::after(Duration::from_millis(delay_ms)),
            Reminders::calls().fire(text, due),
        )?)
    }

    /// The reminder itself: records it and tells the world.
    #[callable(private)] // run by its schedule only: no client may call it
    pub async fn fire(
        &mut self,
        ctx: &mut Ctx<Self>,
        text: String,
        due_ms: u64,
    ) -> Result<(), AppError> {
        let now = ms(ctx.now());
        ctx.sql().execute(
            "INSERT INTO fired VALUES (?1, ?2, ?3)",
            (&text, due_ms as i64, now as i64),
        )?;
        println!("fired {} {text} {}", ctx.name(), now.saturating_sub(due_ms));
        Ok(())
    }

    /// How many reminders have fired.
    #[callable]
    pub async fn count(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT count(*) FROM fired", [], |r| r.get(0))?)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let dir = args.get(1).ok_or("usage: reminders serve DATA_DIR")?;
            serve(
                Runtime::builder()
                    .data_dir(dir)
                    .agent::<Reminders>()
                    .build()?,
            )
            .await
        }
        Some(other) => {
            Err(format!("unknown command `{other}`; try `serve DATA_DIR` or nothing").into())
        }
        None => {
            let dir = tempfile::tempdir()?;
            let runtime = Runtime::builder()
                .data_dir(dir.path())
                .agent::<Reminders>()
                .build()?;
            let ada = runtime.agent::<Reminders>("ada");
            ada.remind_in(300, "stretch".into()).await?;
            ada.remind_in(100, "water".into()).await?;
            runtime.hibernate::<Reminders>("ada").await?; // the alarm index wakes it
            tokio::time::sleep(Duration::from_millis(500)).await;
            println!("{} reminders fired", ada.count().await?);
            runtime.shutdown().await;
            Ok(())
        }
    }
}

async fn serve(runtime: Runtime) -> Result<(), Box<dyn std::error::Error>> {
    use tokio::io::{AsyncBufReadExt, BufReader};
    println!("ready");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["remind", name, delay, text] => match delay.parse() {
                Ok(delay) => match runtime
                    .agent::<Reminders>(name)
                    .remind_in(delay, text.to_string())
                    .await
                {
                    Ok(_) => println!("ok {name} {text}"),
                    Err(e) => println!("err {name} {e}"),
                },
                Err(e) => println!("err - bad delay: {e}"),
            },
            ["count", name] => match runtime.agent::<Reminders>(name).count().await {
                Ok(n) => println!("count {name} {n}"),
                Err(e) => println!("err {name} {e}"),
            },
            _ => println!("err - cannot parse `{line}`"),
        }
    }
    runtime.shutdown().await;
    Ok(())
}
