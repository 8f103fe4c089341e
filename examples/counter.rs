//! A durable counter: in-process typed calls, and persistence across a restart.
//!
//! ```text
//! cargo run --example counter                 # the demo: run it twice, the totals keep growing
//! cargo run --example counter -- serve DIR [normal]  # a line protocol on stdin/stdout (the crash test)
//! cargo run --example counter -- http [ADDR]  # HTTP on ADDR (default 127.0.0.1:8080), then:
//! curl 127.0.0.1:8080/agents/counter/bob/call/add -H 'Content-Type: application/json' -d '[5]'
//! cargo run --example counter -- cluster POSTGRES ADDR DIR  # one node of a cluster (see README)
//! ```
//!
//! The line protocol: `add <name> <by> <tag>` answers `ack <tag> <total>` once the write is
//! durable; `get <name> <tag>` answers `val <tag> <total>`. Lines are handled concurrently.

use agents::{prelude::*, ClusterOptions};

/// A counter per name, stored in the agent's own SQLite database.
#[derive(Default)]
pub struct Counter;

impl Agent for Counter {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&[
            "CREATE TABLE counter(id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL)",
        ])?;
        Ok(())
    }
}

#[agent]
impl Counter {
    /// Adds `by` and returns the new total.
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, AppError> {
        Ok(ctx.sql().query_row(
            "INSERT INTO counter(id, n) VALUES (0, ?1)
             ON CONFLICT(id) DO UPDATE SET n = n + excluded.n RETURNING n",
            [by],
            |r| r.get(0),
        )?)
    }

    /// The current total.
    #[callable]
    pub async fn get(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .query_row("SELECT coalesce((SELECT n FROM counter), 0)", [], |r| {
                r.get(0)
            })?)
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") => {
            let dir = args
                .get(1)
                .ok_or("usage: counter serve DATA_DIR [normal]")?;
            let durability = match args.get(2).map(String::as_str) {
                Some("normal") => Durability::Normal,
                _ => Durability::Full,
            };
            serve(
                Runtime::builder()
                    .data_dir(dir)
                    .durability(durability)
                    .agent::<Counter>()
                    .build()?,
            )
            .await
        }
        Some("http") => {
            let addr = args
                .get(1)
                .map_or("127.0.0.1:8080", String::as_str)
                .parse()?;
            let dir = std::env::temp_dir().join("agents-counter-example");
            let runtime = Runtime::builder()
                .data_dir(&dir)
                .agent::<Counter>()
                .build()?;
            println!("serving on http://{addr}; try: curl {addr}/agents/counter/bob/call/add -H 'Content-Type: application/json' -d '[5]'");
            Ok(runtime.serve(addr).await?)
        }
        Some("cluster") => {
            let [postgres, addr, dir] = &args[1..] else {
                return Err("usage: counter cluster POSTGRES ADDR DATA_DIR".into());
            };
            // This node serves on ADDR, and the others reach it there.
            let runtime = Runtime::builder()
                .data_dir(dir)
                .cluster(ClusterOptions::new(postgres, addr))
                .agent::<Counter>()
                .build()?;
            println!("node serving on http://{addr}, data in {dir}");
            Ok(runtime.serve(addr.parse()?).await?)
        }
        Some(other) => Err(format!(
            "unknown command `{other}`; try `serve DATA_DIR`, `http [ADDR]`, `cluster POSTGRES ADDR DATA_DIR` or nothing"
        )
        .into()),
        None => demo().await,
    }
}

async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join("agents-counter-example");
    let runtime = Runtime::builder()
        .data_dir(&dir)
        .agent::<Counter>()
        .build()?;
    let bob = runtime.agent::<Counter>("bob");
    let alice = runtime.agent::<Counter>("alice");
    println!("bob   + 5 = {}", bob.add(5).await?);
    println!("bob   + 2 = {}", bob.add(2).await?);
    println!("alice + 1 = {}", alice.add(1).await?);

    // Many concurrent callers, one writer: no increment is lost.
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let bob = bob.clone();
            tokio::spawn(async move { bob.add(1).await })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    println!("bob after 100 concurrent +1: {}", bob.get().await?);

    // Drop everything from memory and start again on the same data dir.
    runtime.shutdown().await;
    let runtime = Runtime::builder()
        .data_dir(&dir)
        .agent::<Counter>()
        .build()?;
    let bob = runtime.agent::<Counter>("bob");
    println!(
        "bob after a restart: {} (data in {})",
        bob.get().await?,
        dir.display()
    );
    runtime.shutdown().await;
    Ok(())
}

async fn serve(runtime: Runtime) -> Result<(), Box<dyn std::error::Error>> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let writer = tokio::spawn(async move {
        let mut stdout = tokio::io::stdout();
        while let Some(mut lines) = out_rx.recv().await {
            // Whatever else is answered by now goes in the same write.
            while let Ok(line) = out_rx.try_recv() {
                lines.push_str(&line);
            }
            if stdout.write_all(lines.as_bytes()).await.is_err() || stdout.flush().await.is_err() {
                break;
            }
        }
    });
    out_tx.send("ready\n".into())?;
    // At most 256 lines in flight: reading stdin waits for a free slot (backpressure).
    let in_flight = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        let runtime = runtime.clone();
        let out = out_tx.clone();
        let permit = in_flight.clone().acquire_owned().await?;
        tokio::spawn(async move {
            let _permit = permit;
            let words: Vec<&str> = line.split_whitespace().collect();
            let answer = match words.as_slice() {
                ["add", name, by, tag] => match by.parse() {
                    Ok(by) => match runtime.agent::<Counter>(name).add(by).await {
                        Ok(n) => format!("ack {tag} {n}"),
                        Err(e) => format!("err {tag} {e}"),
                    },
                    Err(e) => format!("err {tag} bad number: {e}"),
                },
                ["get", name, tag] => match runtime.agent::<Counter>(name).get().await {
                    Ok(n) => format!("val {tag} {n}"),
                    Err(e) => format!("err {tag} {e}"),
                },
                _ => format!("err - cannot parse `{line}`"),
            };
            let _ = out.send(answer + "\n");
        });
    }
    drop(out_tx);
    runtime.shutdown().await;
    let _ = writer.await;
    Ok(())
}
