//! The agent the benchmarks call: one durable UPSERT per call, the same write the raw rusqlite
//! baselines do.
#![allow(dead_code)]

use agents::prelude::*;

pub const SCHEMA: &str =
    "CREATE TABLE counter(id INTEGER PRIMARY KEY CHECK (id = 0), n INTEGER NOT NULL)";
pub const UPSERT: &str =
    "INSERT INTO counter(id, n) VALUES (0, ?1) ON CONFLICT(id) DO UPDATE SET n = n + excluded.n RETURNING n";

pub const SELECT: &str = "SELECT coalesce((SELECT n FROM counter WHERE id = 0), 0)";

#[derive(Default)]
pub struct Counter;

impl Agent for Counter {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&[SCHEMA])?;
        Ok(())
    }
}

#[agent]
impl Counter {
    /// Adds `by`; returns the total.
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .prepare_cached(UPSERT)?
            .query_row([by], |r| r.get(0))?)
    }

    /// The total (a read: no write, no sync).
    #[callable]
    pub async fn get(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx
            .sql()
            .prepare_cached(SELECT)?
            .query_row([], |r| r.get(0))?)
    }
}

/// A plain rusqlite connection for the raw baselines: WAL, the given `synchronous` setting, and
/// the bench's table.
pub fn raw_open(path: &std::path::Path, synchronous: &str) -> rusqlite::Connection {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.pragma_update(None, "journal_mode", "WAL").unwrap();
    conn.pragma_update(None, "synchronous", synchronous)
        .unwrap();
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {}",
        &SCHEMA["CREATE TABLE ".len()..]
    ))
    .unwrap();
    conn
}

/// `clients` keep-alive HTTP/1.1 clients posting `body` to `path`; requests per second.
pub async fn http_load(
    addr: std::net::SocketAddr,
    path: &str,
    body: &str,
    clients: usize,
    per_client: usize,
) -> f64 {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let request = request.clone();
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let mut stream = BufReader::new(stream);
            for _ in 0..per_client {
                stream
                    .get_mut()
                    .write_all(request.as_bytes())
                    .await
                    .unwrap();
                let mut length = 0;
                let mut line = String::new();
                loop {
                    line.clear();
                    stream.read_line(&mut line).await.unwrap();
                    if line == "\r\n" {
                        break;
                    }
                    let lower = line.to_ascii_lowercase();
                    if let Some(v) = lower.strip_prefix("content-length:") {
                        length = v.trim().parse().unwrap();
                    }
                    assert!(!lower.starts_with("http/1.1 5"), "{line}");
                }
                let mut body = vec![0; length];
                stream.read_exact(&mut body).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (clients * per_client) as f64 / started.elapsed().as_secs_f64()
}
