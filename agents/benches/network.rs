//! Network benchmarks, printed as JSON lines, next to raw baselines measured in the same run:
//! a tokio-tungstenite echo server (no work at all), and for RPC also a hand-written durable
//! server (tokio-tungstenite and rusqlite, no framework, the same write per call). Every agent
//! call does a durable SQLite write (Durability::Full). The sequential and pipelined lines
//! give ours twice: through the typed client, and driven by the baselines' own load generator
//! (`raw_generator_*`: the same loop, the frames a typed call sends), which compares the
//! servers alone.
//!
//! `cargo bench -p agents --bench network` (add `-- --quick` for a smoke run, `-- pipelined` to
//! run only the benches whose name has `pipelined`, `-- --normal` for Durability::Normal).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

mod common;

use agents::{prelude::*, testing::TestRuntime};
use common::{Counter, CounterClient};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

/// A raw WebSocket echo server on 127.0.0.1: the baseline. Shaped like tokio-tungstenite's own
/// echo example (`read.forward(write)`), which flushes only when no frame is ready, so that
/// frames read together are written together.
async fn echo_server() -> std::net::SocketAddr {
    raw_server(|_, ws| async move {
        let (sink, stream) = ws.split();
        let binary =
            |m: &Result<Message, _>| std::future::ready(m.as_ref().is_ok_and(Message::is_binary));
        let _ = stream.take_while(binary).forward(sink).await;
    })
    .await
}

/// A server side socket of the raw baselines.
type RawWs = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// A raw WebSocket server on 127.0.0.1: `serve(i, socket)` serves the `i`th socket accepted
/// (from 0) once its handshake is done.
async fn raw_server<F, Fut>(serve: F) -> std::net::SocketAddr
where
    F: Fn(usize, RawWs) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serve = Arc::new(serve);
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((stream, _)) = listener.accept().await {
            let (serve, i) = (serve.clone(), accepted);
            accepted += 1;
            tokio::spawn(async move {
                let ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                serve(i, ws).await;
            });
        }
    });
    addr
}

/// The hand-written equivalent of the bench's agent, with no framework: a tokio-tungstenite
/// server whose sockets hand every frame to one writer thread, which runs the same UPSERT for
/// each, commits whatever is queued in one transaction (`synchronous=FULL`: an fsync of the
/// WAL each), and only then answers each frame with the total (8 bytes). Frames queued for a
/// socket are written together.
async fn raw_durable_server(dir: &std::path::Path) -> std::net::SocketAddr {
    type Request = (i64, tokio::sync::mpsc::UnboundedSender<Message>);
    let (tx, rx) = std::sync::mpsc::channel::<Request>();
    let conn = common::raw_open(&dir.join("raw.sqlite"), "FULL");
    std::thread::spawn(move || {
        while let Ok(first) = rx.recv() {
            let batch: Vec<Request> = std::iter::once(first).chain(rx.try_iter()).collect();
            conn.execute_batch("BEGIN").unwrap();
            let mut stmt = conn.prepare_cached(common::UPSERT).unwrap();
            let totals: Vec<i64> = batch
                .iter()
                .map(|(by, _)| stmt.query_row([by], |r| r.get(0)).unwrap())
                .collect();
            drop(stmt);
            conn.execute_batch("COMMIT").unwrap();
            for ((_, reply), total) in batch.into_iter().zip(totals) {
                let _ = reply.send(Message::Binary(total.to_le_bytes().to_vec().into()));
            }
        }
    });
    raw_server(move |_, ws| {
        let writes = tx.clone();
        async move {
            let (sink, mut stream) = ws.split();
            let (reply, replies) = tokio::sync::mpsc::unbounded_channel();
            let replies = futures_util::stream::unfold(replies, |mut r| async move {
                Some((Ok(r.recv().await?), r))
            });
            tokio::spawn(replies.forward(sink)); // queued replies are written together
            while let Some(Ok(Message::Binary(b))) = stream.next().await {
                let by = i64::from(b.first().copied().unwrap_or(0));
                if writes.send((by, reply.clone())).is_err() {
                    break;
                }
            }
        }
    })
    .await
}

/// The hand-written equivalent of a new agent per connection: each socket's first frame creates
/// a database file of its own (WAL, `synchronous=FULL`) on a blocking thread, which runs the
/// same UPSERT and commits (an fsync) before the answer.
async fn raw_file_per_socket_server(dir: std::path::PathBuf) -> std::net::SocketAddr {
    std::fs::create_dir_all(&dir).unwrap();
    raw_server(move |i, mut ws| {
        let path = dir.join(format!("socket-{i}.sqlite"));
        async move {
            if let Some(Ok(Message::Binary(_))) = ws.next().await {
                let total = tokio::task::spawn_blocking(move || {
                    let conn = common::raw_open(&path, "FULL");
                    conn.query_row(common::UPSERT, [1], |r| r.get::<_, i64>(0))
                        .unwrap()
                })
                .await
                .unwrap();
                let _ = ws
                    .send(Message::Binary(total.to_le_bytes().to_vec().into()))
                    .await;
            }
        }
    })
    .await
}

/// Connect + first call to the hand-written file-per-socket server on the files in `dir` (made
/// by the first run on it, opened again by the next).
async fn hand_written_files(dir: &std::path::Path, n: usize) -> (f64, f64) {
    raw_connect_and_round_trip(raw_file_per_socket_server(dir.to_owned()).await, n).await
}

/// One round of the pipelined bench: calls (or round trips, or writes) per second.
struct Round {
    /// Typed calls through the runtime, each a durable write.
    ours: f64,
    /// The same calls sent by the raw load generator, as the baselines are: what the server
    /// side does, without the typed client's share of the two cores.
    ours_raw: f64,
    /// The raw echo: no work, no storage.
    echo: f64,
    /// The hand-written durable server.
    hand: f64,
    /// The SQL alone: the ceiling of any server that does these writes on one writer.
    sql: f64,
}

/// One round of the sequential bench: each server's calls per second and latencies (µs,
/// sorted), and the floor's fsync latencies.
struct SequentialRound {
    ours: (f64, Vec<f64>),
    /// Ours driven by the baselines' own loop.
    ours_raw: (f64, Vec<f64>),
    echo: (f64, Vec<f64>),
    hand: (f64, Vec<f64>),
    sync_us: Vec<f64>,
}

/// Rounds of a bench that runs ours and the baselines in each (so that all see the same spells
/// of a noisy machine), sorted by `ratio`: the one to report is `median()`.
struct Rounds<R> {
    rounds: Vec<R>,
}

impl<R> Rounds<R> {
    fn new(mut rounds: Vec<R>, ratio: fn(&R) -> f64) -> Self {
        rounds.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
        Rounds { rounds }
    }

    fn median(&self) -> &R {
        &self.rounds[self.rounds.len() / 2]
    }

    /// `f` of every round, as a JSON list's items.
    fn each(&self, f: fn(&R) -> f64) -> String {
        let all: Vec<String> = self.rounds.iter().map(|r| format!("{:.3}", f(r))).collect();
        all.join(",")
    }
}

/// The SQL alone, on this thread: `n` times the same UPSERT, 512 to a transaction, and no fsync
/// at all (`synchronous=OFF`). No server whose writes to one database go through one writer
/// can answer more calls per second than this, whatever it does about the network.
fn sql_only(path: &std::path::Path, n: usize) -> f64 {
    let conn = common::raw_open(path, "OFF");
    let started = Instant::now();
    for start in (0..n).step_by(512) {
        conn.execute_batch("BEGIN").unwrap();
        let mut stmt = conn.prepare_cached(common::UPSERT).unwrap();
        for _ in start..n.min(start + 512) {
            let _: i64 = stmt.query_row([1], |r| r.get(0)).unwrap();
        }
        drop(stmt);
        conn.execute_batch("COMMIT").unwrap();
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// What the raw load generator talks to: a WebSocket URL, the subprotocol it asks for, how many
/// frames the server sends before answering anything, and the frame it sends as request `id`.
struct RawTarget {
    url: String,
    protocol: Option<&'static str>,
    greeting: usize,
    frame: fn(u64) -> Message,
}

impl RawTarget {
    /// A raw server of this file (the echo, the hand-written durable server): a 16-byte frame,
    /// the size of a call to `add`.
    fn raw(addr: std::net::SocketAddr) -> Self {
        RawTarget {
            url: format!("ws://{addr}/"),
            protocol: None,
            greeting: 0,
            frame: |_| Message::Binary(vec![1; 16].into()),
        }
    }

    /// An agent over `agents.v1.postcard`: each request a call of `add(1)`, encoded as the typed
    /// client encodes it, with the id the generator gives it; the server's first frame is the
    /// connection's identity.
    fn counter(url: String) -> Self {
        use agents_client::protocol::{to_postcard, PostcardClientFrame, POSTCARD_PROTOCOL};
        RawTarget {
            url,
            protocol: Some(POSTCARD_PROTOCOL),
            greeting: 1,
            frame: |id| {
                Message::Binary(
                    to_postcard(&PostcardClientFrame::Call {
                        id,
                        method: "add".into(),
                        args: to_postcard(&(1i64,)),
                        deadline_ms: None,
                    })
                    .into(),
                )
            },
        }
    }

    /// A socket to the target that has made one round trip (with request id 0).
    async fn connect(&self) -> Ws {
        let mut ws = open(&self.url, self.protocol).await;
        for _ in 0..self.greeting {
            ws.next().await.unwrap().unwrap();
        }
        ws.send((self.frame)(0)).await.unwrap();
        ws.next().await.unwrap().unwrap();
        ws
    }
}

/// `sockets` connections to `target` with `window` requests in flight each; returns round trips
/// per second, timed from when every socket is open and has made one round trip. The same load
/// generator for every server: it reads each answer as a frame and nothing more.
async fn raw_pipelined(
    target: &RawTarget,
    sockets: usize,
    window: usize,
    per_socket: usize,
) -> f64 {
    let mut open = Vec::new();
    for _ in 0..sockets {
        open.push(target.connect().await);
    }
    let started = Instant::now();
    let mut tasks = Vec::new();
    for ws in open {
        let (mut sink, mut stream) = ws.split();
        let credits = Arc::new(Semaphore::new(window));
        let frame = target.frame;
        let sender = {
            let credits = credits.clone();
            tokio::spawn(async move {
                // Frames that have credit go out together, as `WsTransport` writes them.
                let mut sent = 0;
                while sent < per_socket {
                    credits.acquire().await.unwrap().forget();
                    sent += 1;
                    sink.feed(frame(sent as u64)).await.unwrap();
                    while sent < per_socket {
                        let Ok(credit) = credits.try_acquire() else {
                            break;
                        };
                        credit.forget();
                        sent += 1;
                        sink.feed(frame(sent as u64)).await.unwrap();
                    }
                    sink.flush().await.unwrap();
                }
                sink
            })
        };
        tasks.push(tokio::spawn(async move {
            for _ in 0..per_socket {
                stream.next().await.unwrap().unwrap();
                credits.add_permits(1);
            }
            drop(sender.await);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (sockets * per_socket) as f64 / started.elapsed().as_secs_f64()
}

/// `n` sequential round trips on one socket to `target` (the same loop for every server): per
/// second, and each one's latency in µs, sorted.
async fn sequential_round_trips(target: &RawTarget, n: usize) -> (f64, Vec<f64>) {
    let mut ws = target.connect().await;
    let (started, mut us) = (Instant::now(), Vec::with_capacity(n));
    for id in 1..=n {
        let t = Instant::now();
        ws.send((target.frame)(id as u64)).await.unwrap();
        ws.next().await.unwrap().unwrap();
        us.push(micros(t));
    }
    per_sec_and_sorted(started, us)
}

/// `n` sequential typed calls on one socket, each a durable write: per second, and each one's
/// latency in µs, sorted.
async fn sequential_calls(base: &str, n: usize) -> (f64, Vec<f64>) {
    let client = CounterClient::connect(&format!("{base}/hot"))
        .await
        .unwrap();
    client.add(0).await.unwrap();
    let (started, mut us) = (Instant::now(), Vec::with_capacity(n));
    for _ in 0..n {
        let t = Instant::now();
        client.add(1).await.unwrap();
        us.push(micros(t));
    }
    per_sec_and_sorted(started, us)
}

/// The µs since `t`.
fn micros(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e6
}

/// Steps timed in `us` from `started`: how many per second, and their times sorted.
fn per_sec_and_sorted(started: Instant, mut us: Vec<f64>) -> (f64, Vec<f64>) {
    let rate = us.len() as f64 / started.elapsed().as_secs_f64();
    us.sort_by(f64::total_cmp);
    (rate, us)
}

/// `n` writes of a WAL frame (a 4 KiB page and its 24-byte header) to a file at `path` whose
/// blocks are already written, as a WAL's are once it starts over (1 MiB, cycled through),
/// each followed by an fdatasync: each one's time in µs, sorted.
fn fdatasync_latencies(path: &std::path::Path, n: usize) -> Vec<f64> {
    use std::os::unix::fs::FileExt;
    const FRAME: usize = 4096 + 24;
    const FRAMES: usize = (1 << 20) / FRAME;
    let file = std::fs::File::create(path).unwrap();
    file.write_all_at(&vec![0; FRAME * FRAMES], 0).unwrap();
    file.sync_all().unwrap();
    let frame = vec![7u8; FRAME];
    let (started, mut us) = (Instant::now(), Vec::with_capacity(n));
    for i in 0..n {
        let t = Instant::now();
        file.write_all_at(&frame, ((i % FRAMES) * FRAME) as u64)
            .unwrap();
        file.sync_data().unwrap();
        us.push(micros(t));
    }
    per_sec_and_sorted(started, us).1
}

/// The same shape through the runtime: typed calls, each a durable write, timed from when
/// every client is connected and has made one call (so the agent is awake).
async fn rpc(base: &str, sockets: usize, window: usize, per_socket: usize) -> f64 {
    let mut clients = Vec::new();
    let mut before = 0;
    for _ in 0..sockets {
        let client = CounterClient::connect(&format!("{base}/hot"))
            .await
            .unwrap();
        before = client.add(0).await.unwrap();
        clients.push(client);
    }
    let check = clients[0].clone();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in clients {
        for k in 0..window {
            let client = client.clone();
            // `per_socket` calls in all, shared out among the socket's `window` callers.
            let calls = per_socket / window + usize::from(k < per_socket % window);
            tasks.push(tokio::spawn(async move {
                for _ in 0..calls {
                    client.add(1).await.unwrap();
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let rate = (sockets * per_socket) as f64 / started.elapsed().as_secs_f64();
    let after = check.add(0).await.unwrap();
    assert_eq!(
        after - before,
        (sockets * per_socket) as i64,
        "every call ran"
    );
    rate
}

/// Runs `load` against the counter agent at `base` through the raw load generator
/// (`RawTarget::counter`), which makes `calls` calls in all; checks that each ran.
async fn raw_calls<T>(base: &str, calls: usize, load: impl AsyncFnOnce(&RawTarget) -> T) -> T {
    let check = CounterClient::connect(&format!("{base}/hot"))
        .await
        .unwrap();
    let before = check.add(0).await.unwrap();
    let outcome = load(&RawTarget::counter(format!("{base}/hot"))).await;
    let after = check.add(0).await.unwrap();
    assert_eq!(after - before, calls as i64, "every call ran");
    outcome
}

/// An agent that broadcasts: each `shout` is a durable write and one event to every socket.
#[derive(Default)]
pub struct Hub;

impl Agent for Hub {}

#[agent(event = "u64")]
impl Hub {
    /// Broadcasts `stamp` (microseconds since the bench started) to every connection.
    #[callable]
    pub async fn shout(&mut self, ctx: &mut Ctx<Self>, stamp: u64) -> Result<(), AppError> {
        ctx.kv().put("last", &stamp)?;
        ctx.broadcast(&stamp, &[])?;
        Ok(())
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket to `url`, asking for `protocol` if any.
async fn open(url: &str, protocol: Option<&str>) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    if let Some(protocol) = protocol {
        request
            .headers_mut()
            .insert("sec-websocket-protocol", protocol.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request).await.unwrap().0
}

async fn open_postcard(url: &str) -> Ws {
    open(url, Some(agents::client::protocol::POSTCARD_PROTOCOL)).await
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

/// Runs `job(i)` for `i` in `0..n`, 32 at a time: jobs per second and the p99 of their
/// durations in ms.
async fn timed_jobs<F, Fut>(n: usize, job: F) -> (f64, f64)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let started = Instant::now();
    let limit = Arc::new(Semaphore::new(32));
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let run = job(i);
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            run.await;
            drop(permit);
            t.elapsed().as_secs_f64() * 1e3
        }));
    }
    let mut ms = Vec::new();
    for t in tasks {
        ms.push(t.await.unwrap());
    }
    ms.sort_by(f64::total_cmp);
    (
        n as f64 / started.elapsed().as_secs_f64(),
        percentile(&ms, 0.99),
    )
}

/// Connect + first call to `n` distinct agents (`first-0`, `first-1` ..) with the typed client.
async fn connect_and_call(base: &str, n: usize) -> (f64, f64) {
    timed_jobs(n, |i| {
        let url = format!("{base}/first-{i}");
        async move {
            let client = CounterClient::connect(&url).await.unwrap();
            client.add(1).await.unwrap();
        }
    })
    .await
}

/// The same with the load generator of the baselines (`raw-0`, `raw-1` ..): what the server
/// side does, without the typed client's share of the two cores.
async fn connect_and_call_raw(base: &str, n: usize) -> (f64, f64) {
    timed_jobs(n, |i| {
        let target = RawTarget::counter(format!("{base}/raw-{i}"));
        async move {
            target.connect().await;
        }
    })
    .await
}

/// Waits until the agents of [`connect_and_call`] and [`connect_and_call_raw`] have no
/// connection left, then hibernates them.
async fn hibernate_all(runtime: &Runtime, n: usize) {
    while runtime.connection_count() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..n {
        for name in [format!("first-{i}"), format!("raw-{i}")] {
            runtime.hibernate::<Counter>(&name).await.unwrap();
        }
    }
}

/// The raw baselines: connect + one round trip (to the echo, or to the file-per-socket server).
async fn raw_connect_and_round_trip(addr: std::net::SocketAddr, n: usize) -> (f64, f64) {
    timed_jobs(n, |_| async move {
        RawTarget::raw(addr).connect().await;
    })
    .await
}

/// Reads `count` events from each socket, decoding the stamp in each; returns every
/// delivery's latency in ms.
fn readers(
    sockets: Vec<Ws>,
    count: usize,
    origin: Instant,
    decode: fn(&[u8]) -> Option<u64>,
) -> Vec<tokio::task::JoinHandle<Vec<f64>>> {
    sockets
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                let mut lat = Vec::with_capacity(count);
                while lat.len() < count {
                    let Some(Ok(Message::Binary(b))) = ws.next().await else {
                        continue;
                    };
                    if let Some(stamp) = decode(&b) {
                        let now = origin.elapsed().as_micros() as u64;
                        lat.push(now.saturating_sub(stamp) as f64 / 1e3);
                    }
                }
                lat
            })
        })
        .collect()
}

fn decode_event(bytes: &[u8]) -> Option<u64> {
    match postcard::from_bytes(bytes).ok()? {
        agents::client::protocol::PostcardServerFrame::Event { data } => {
            postcard::from_bytes(&data).ok()
        }
        _ => None,
    }
}

fn decode_raw(bytes: &[u8]) -> Option<u64> {
    postcard::from_bytes(bytes).ok()
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<Vec<f64>>>, started: Instant) -> (f64, f64) {
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_by(f64::total_cmp);
    (all.len() as f64 / elapsed, percentile(&all, 0.99))
}

/// `rounds` broadcasts to `n` sockets of one agent, each a durable write.
async fn broadcast(runtime: &Runtime, base: &str, n: usize, rounds: usize) -> (f64, f64) {
    let url = format!("{}/hub/all", base.trim_end_matches("/counter"));
    let mut sockets = Vec::new();
    for _ in 0..n {
        let mut ws = open_postcard(&url).await;
        ws.next().await.unwrap().unwrap(); // identity
        sockets.push(ws);
    }
    let hub = runtime.agent::<Hub>("all");
    let origin = Instant::now();
    let tasks = readers(sockets, rounds, origin, decode_event);
    let started = Instant::now();
    // 16 callers at a time: broadcasts share commits as calls do.
    let limit = Arc::new(Semaphore::new(16));
    for _ in 0..rounds {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let hub = hub.clone();
        tokio::spawn(async move {
            hub.shout(origin.elapsed().as_micros() as u64)
                .await
                .unwrap();
            drop(permit);
        });
    }
    collect(tasks, started).await
}

/// The raw baseline: a tokio-tungstenite server writing each stamp to `n` sockets, each socket
/// writing what is queued for it in one go.
async fn raw_broadcast(n: usize, rounds: usize) -> (f64, f64) {
    let (tx, _) = tokio::sync::broadcast::channel::<Vec<u8>>(1024);
    let sender = tx.clone();
    let addr = raw_server(move |_, ws| {
        let frames = futures_util::stream::unfold(sender.subscribe(), |mut rx| async move {
            Some((Ok(Message::Binary(rx.recv().await.ok()?.into())), rx))
        });
        // Frames queued together are written together, as the runtime writes them.
        async move {
            let _ = frames.forward(ws).await;
        }
    })
    .await;
    let mut sockets = Vec::new();
    for _ in 0..n {
        sockets.push(
            tokio_tungstenite::connect_async(format!("ws://{addr}/"))
                .await
                .unwrap()
                .0,
        );
    }
    while tx.receiver_count() < n {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let origin = Instant::now();
    let tasks = readers(sockets, rounds, origin, decode_raw);
    let started = Instant::now();
    for _ in 0..rounds {
        let stamp = origin.elapsed().as_micros() as u64;
        tx.send(postcard::to_stdvec(&stamp).unwrap()).unwrap();
        tokio::task::yield_now().await;
    }
    collect(tasks, started).await
}

/// The raw baseline for HTTP: an axum route answering the same JSON, with no agent.
async fn raw_http_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = agents::axum::Router::new().route(
        "/agents/counter/{name}/call/{method}",
        agents::axum::routing::post(|body: String| async move { format!("{}", body.len()) }),
    );
    tokio::spawn(async move { agents::axum::serve(listener, app).await });
    addr
}

/// This process's resident set, in bytes.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// In a child process: opens `n` connections to `url` (raw sockets, or typed clients if
/// `typed`), says its own RSS growth per connection, and holds them until stdin closes.
fn hold_connections(url: &str, n: usize, typed: bool) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut sockets, mut clients) = (Vec::new(), Vec::new());
        // Warm up the paths (allocator arenas) with a connection of each kind.
        drop(open_postcard(url).await);
        drop(HubClient::connect(url).await.unwrap());
        let before = rss_bytes();
        for _ in 0..n {
            if typed {
                clients.push(HubClient::connect(url).await.unwrap());
            } else {
                let mut ws = open_postcard(url).await;
                ws.next().await.unwrap().unwrap(); // identity
                sockets.push(ws);
            }
        }
        let per = rss_bytes().saturating_sub(before) / n as u64;
        println!("ready {per}");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
        drop((sockets, clients));
    });
}

/// RSS growth per idle connection: a child process opens `n` connections to one agent, which
/// is then hibernated; this process measures its own RSS before and after (the server's
/// share), the child its own (the client's). Server and child bytes per connection.
async fn rss_per_connection(runtime: &Runtime, base: &str, n: usize, typed: bool) -> (f64, f64) {
    use std::io::BufRead;
    let url = format!("{}/hub/idle", base.trim_end_matches("/counter"));
    // Warm up the paths (allocator arenas, the agent's first activation).
    runtime.agent::<Hub>("idle").shout(0).await.unwrap();
    let _ = runtime.hibernate::<Hub>("idle").await;
    let before = rss_bytes();
    let hold = if typed { "--hold-typed" } else { "--hold" };
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([hold, &url, &n.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .unwrap();
        line
    })
    .await
    .unwrap();
    let client = ready
        .trim()
        .strip_prefix("ready ")
        .unwrap()
        .parse::<f64>()
        .unwrap();
    while runtime.connection_count() < n {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = runtime.hibernate::<Hub>("idle").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_bytes();
    drop(child.stdin.take());
    let _ = child.wait();
    // Let the 2,000 closes run (on_close each) before the next bench.
    while runtime.connection_count() > 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = runtime.hibernate::<Hub>("idle").await;
    ((after.saturating_sub(before)) as f64 / n as f64, client)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a.starts_with("--hold")) {
        let typed = args[i] == "--hold-typed";
        return hold_connections(&args[i + 1], args[i + 2].parse().unwrap(), typed);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let normal = args.iter().any(|a| a == "--normal");
    // `cargo bench -p agents --bench network -- pipelined` runs the benches whose name has it.
    let filter = args.iter().skip(1).find(|a| !a.starts_with("--")).cloned();
    let run = |name: &str| filter.as_deref().is_none_or(|f| name.contains(f));
    let scale = if quick { 10 } else { 1 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // `-- --normal`: Durability::Normal, to see what the fsyncs cost.
        let durability = if normal {
            Durability::Normal
        } else {
            Durability::Full
        };
        let agents = TestRuntime::start(
            Runtime::builder()
                .durability(durability)
                .agent::<Counter>()
                .agent::<Hub>(),
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let base = format!("ws://{addr}/agents/counter");
        let runtime = agents.runtime().clone();
        tokio::spawn(async move { runtime.serve_on(listener).await });
        let echo = echo_server().await;
        let dir = tempfile::tempdir().unwrap();
        let durable = raw_durable_server(dir.path()).await;
        tokio::time::sleep(Duration::from_millis(100)).await;

        // First, while the heap is cold: after the other benches, freed memory would be reused
        // for the connections and the growth per connection would look smaller than it is.
        if run("rss") {
            let n = 2_000 / scale;
            let (per, raw) = rss_per_connection(agents.runtime(), &base, n, false).await;
            let (_, typed) = rss_per_connection(agents.runtime(), &base, n, true).await;
            println!(
                "{{\"bench\":\"rss_per_idle_connection\",\"connections\":{n},\"bytes_per_connection\":{per:.0},\"typed_client_bytes_per_connection\":{typed:.0},\"baseline\":\"raw_tungstenite_client\",\"baseline_bytes_per_connection\":{raw:.0},\"client_ratio\":{:.2}}}",
                typed / raw
            );
        }

        if run("sequential") {
            let n = 2_000 / scale;
            // Three rounds, each of ours, the echo, the hand-written server and the floor's
            // fsync, so that all see the same spells of a noisy machine; the line reports the
            // round with the median ratio to the hand-written server.
            let mut rounds = Vec::new();
            for _ in 0..3 {
                let ours = sequential_calls(&base, n).await;
                let ours_raw = raw_calls(&base, n + 1, async |target| {
                    sequential_round_trips(target, n).await
                })
                .await;
                let echo = sequential_round_trips(&RawTarget::raw(echo), n).await;
                let hand = sequential_round_trips(&RawTarget::raw(durable), n).await;
                // The floor of any durable reply: one fdatasync (of a WAL frame) and one
                // loopback round trip.
                let path = dir.path().join("floor");
                let sync_us = tokio::task::spawn_blocking(move || fdatasync_latencies(&path, n))
                    .await
                    .unwrap();
                rounds.push(SequentialRound {
                    ours,
                    ours_raw,
                    echo,
                    hand,
                    sync_us,
                });
            }
            let rounds = Rounds::new(rounds, |r| r.ours.0 / r.hand.0);
            let SequentialRound {
                ours: (ours, ours_us),
                ours_raw: (ours_raw, ours_raw_us),
                echo: (raw, raw_us),
                hand: (hand, hand_us),
                sync_us,
            } = rounds.median();
            let p50 = |us: &[f64]| percentile(us, 0.5);
            let floor = p50(sync_us) + p50(raw_us);
            println!(
                "{{\"bench\":\"sequential_rpc_one_socket\",\"calls\":{n},\"calls_per_sec\":{ours:.0},\"p50_us\":{:.0},\"baseline\":\"raw_tungstenite_echo\",\"baseline_per_sec\":{raw:.0},\"ratio\":{:.3},\"hand_written_durable_per_sec\":{hand:.0},\"hand_written_p50_us\":{:.0},\"ratio_to_hand_written\":{:.3},\"ratios_to_hand_written\":[{}],\"echo_p50_us\":{:.0},\"fdatasync_p50_us\":{:.0},\"floor_p50_us\":{floor:.0},\"p50_over_floor_us\":{:.0},\"hand_written_p50_over_floor_us\":{:.0},\"raw_generator_per_sec\":{ours_raw:.0},\"raw_generator_p50_us\":{:.0},\"raw_generator_ratio_to_hand_written\":{:.3},\"raw_generator_ratios_to_hand_written\":[{}],\"raw_generator_p50_over_floor_us\":{:.0}}}",
                p50(ours_us),
                ours / raw,
                p50(hand_us),
                ours / hand,
                rounds.each(|r| r.ours.0 / r.hand.0),
                p50(raw_us),
                p50(sync_us),
                p50(ours_us) - floor,
                p50(hand_us) - floor,
                p50(ours_raw_us),
                ours_raw / hand,
                rounds.each(|r| r.ours_raw.0 / r.hand.0),
                p50(ours_raw_us) - floor,
            );
        }

        if run("pipelined") {
            // 131,072 calls: long enough for both sides to reach their steady rate (the raw echo
            // keeps speeding up over the first few hundred thousand round trips).
            let per_socket = 8_192 / scale;
            // Three rounds, ours then the baselines in each, so that all see the same spells of
            // a noisy machine; the line reports the round with the median ratio to the echo.
            let mut rounds = Vec::new();
            for round in 0..3 {
                let ours = rpc(&base, 16, 32, per_socket).await;
                // Each socket's first round trip is a call too.
                let ours_raw = raw_calls(&base, 16 * (per_socket + 1), async |target| {
                    raw_pipelined(target, 16, 32, per_socket).await
                })
                .await;
                let raw = raw_pipelined(&RawTarget::raw(echo), 16, 32, per_socket).await;
                let hand = raw_pipelined(&RawTarget::raw(durable), 16, 32, per_socket).await;
                let path = dir.path().join(format!("sql-{round}.sqlite"));
                let sql = tokio::task::spawn_blocking(move || sql_only(&path, 16 * per_socket))
                    .await
                    .unwrap();
                rounds.push(Round {
                    ours,
                    ours_raw,
                    echo: raw,
                    hand,
                    sql,
                });
            }
            let rounds = Rounds::new(rounds, |r| r.ours / r.echo);
            let r = rounds.median();
            let ratios = |f| rounds.each(f);
            println!(
                "{{\"bench\":\"pipelined_rpc_16x32_one_agent\",\"calls\":{},\"calls_per_sec\":{:.0},\"baseline\":\"raw_tungstenite_echo\",\"baseline_per_sec\":{:.0},\"ratio\":{:.3},\"ratios\":[{}],\"hand_written_durable_per_sec\":{:.0},\"ratio_to_hand_written\":{:.3},\"ratios_to_hand_written\":[{}],\"raw_generator_per_sec\":{:.0},\"raw_generator_ratio_to_hand_written\":{:.3},\"raw_generator_ratios_to_hand_written\":[{}],\"hand_written_to_echo\":[{}],\"sql_only_per_sec\":{:.0},\"sql_only_to_echo\":[{}]}}",
                16 * per_socket,
                r.ours,
                r.echo,
                r.ours / r.echo,
                ratios(|r| r.ours / r.echo),
                r.hand,
                r.ours / r.hand,
                ratios(|r| r.ours / r.hand),
                r.ours_raw,
                r.ours_raw / r.hand,
                ratios(|r| r.ours_raw / r.hand),
                ratios(|r| r.hand / r.echo),
                r.sql,
                ratios(|r| r.sql / r.echo),
            );
        }

        if run("connect") {
            let n = 2_000 / scale;
            let (ours, p99) = connect_and_call(&base, n).await;
            hibernate_all(agents.runtime(), n).await;
            let (ours_raw, ours_raw_p99) = connect_and_call_raw(&base, n).await;
            let (raw, raw_p99) = raw_connect_and_round_trip(echo, n).await;
            let (hand, hand_p99) = hand_written_files(&dir.path().join("files"), n).await;
            println!(
                "{{\"bench\":\"connect_and_first_call_distinct_agents\",\"agents\":{n},\"per_sec\":{ours:.0},\"p99_ms\":{p99:.2},\"baseline\":\"raw_connect_and_round_trip\",\"baseline_per_sec\":{raw:.0},\"baseline_p99_ms\":{raw_p99:.2},\"ratio\":{:.3},\"hand_written_file_per_socket_per_sec\":{hand:.0},\"hand_written_p99_ms\":{hand_p99:.2},\"ratio_to_hand_written\":{:.3},\"raw_generator_per_sec\":{ours_raw:.0},\"raw_generator_p99_ms\":{ours_raw_p99:.2},\"raw_generator_ratio_to_hand_written\":{:.3}}}",
                ours / raw,
                ours / hand,
                ours_raw / hand
            );
            // The same agents again, hibernated, and the hand-written server again on the files
            // it made: connect + first call to an agent whose files exist (what a pool of
            // files made ahead of time could give a new agent at best).
            hibernate_all(agents.runtime(), n).await;
            let (ours, p99) = connect_and_call(&base, n).await;
            hibernate_all(agents.runtime(), n).await;
            let (ours_raw, ours_raw_p99) = connect_and_call_raw(&base, n).await;
            let (hand, hand_p99) = hand_written_files(&dir.path().join("files"), n).await;
            println!(
                "{{\"bench\":\"connect_and_first_call_hibernated_agents\",\"agents\":{n},\"per_sec\":{ours:.0},\"p99_ms\":{p99:.2},\"hand_written_file_per_socket_per_sec\":{hand:.0},\"hand_written_p99_ms\":{hand_p99:.2},\"ratio_to_hand_written\":{:.3},\"raw_generator_per_sec\":{ours_raw:.0},\"raw_generator_p99_ms\":{ours_raw_p99:.2},\"raw_generator_ratio_to_hand_written\":{:.3}}}",
                ours / hand,
                ours_raw / hand
            );
        }

        if run("connect_spares") {
            let n = 2_000 / scale;
            // New agents again, on a runtime that keeps as many spare files as the burst has
            // agents (made before it, as a runtime with time between bursts has them), against
            // the hand-written server making new files in the same sitting.
            let spared = TestRuntime::start(
                Runtime::builder()
                    .durability(durability)
                    .spare_files(n)
                    .agent::<Counter>(),
            )
            .unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let spared_base = format!("ws://{}/agents/counter", listener.local_addr().unwrap());
            let runtime = spared.runtime().clone();
            tokio::spawn(async move { runtime.serve_on(listener).await });
            let spares_ready = async || {
                let started = Instant::now();
                while spared.runtime().spare_files_ready() < n {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                started.elapsed().as_secs_f64() * 1e3
            };
            // The first new agent starts the maker.
            CounterClient::connect(&format!("{spared_base}/warm"))
                .await
                .unwrap()
                .add(1)
                .await
                .unwrap();
            let making_ms = spares_ready().await;
            let (ours, p99) = connect_and_call(&spared_base, n).await;
            spares_ready().await;
            let (ours_raw, ours_raw_p99) = connect_and_call_raw(&spared_base, n).await;
            let (hand, hand_p99) = hand_written_files(&dir.path().join("files-new"), n).await;
            println!(
                "{{\"bench\":\"connect_and_first_call_new_agents_from_spares\",\"agents\":{n},\"spare_files\":{n},\"making_spares_ms\":{making_ms:.0},\"per_sec\":{ours:.0},\"p99_ms\":{p99:.2},\"hand_written_file_per_socket_per_sec\":{hand:.0},\"hand_written_p99_ms\":{hand_p99:.2},\"ratio_to_hand_written\":{:.3},\"raw_generator_per_sec\":{ours_raw:.0},\"raw_generator_p99_ms\":{ours_raw_p99:.2},\"raw_generator_ratio_to_hand_written\":{:.3}}}",
                ours / hand,
                ours_raw / hand
            );
        }

        if run("broadcast") {
            let (sockets, rounds) = (1_000 / scale, 200);
            let (ours, p99) = broadcast(agents.runtime(), &base, sockets, rounds).await;
            let (raw, raw_p99) = raw_broadcast(sockets, rounds).await;
            println!(
                "{{\"bench\":\"broadcast\",\"sockets\":{sockets},\"broadcasts\":{rounds},\"deliveries_per_sec\":{ours:.0},\"p99_ms\":{p99:.2},\"baseline\":\"raw_tungstenite_broadcast\",\"baseline_per_sec\":{raw:.0},\"baseline_p99_ms\":{raw_p99:.2},\"ratio\":{:.3}}}",
                ours / raw
            );
        }

        if run("http") {
            let per_client = 500 / scale;
            let ours = common::http_load(addr, "/agents/counter/http/call/add", "[1]", 32, per_client).await;
            let raw = common::http_load(raw_http_server().await, "/agents/counter/http/call/add", "[1]", 32, per_client).await;
            println!(
                "{{\"bench\":\"http_post_call_32_clients\",\"calls\":{},\"calls_per_sec\":{ours:.0},\"baseline\":\"raw_axum_handler\",\"baseline_per_sec\":{raw:.0},\"ratio\":{:.3}}}",
                32 * per_client,
                ours / raw
            );
        }
    });
}
