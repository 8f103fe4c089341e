//! Streaming callables: chunks in process, over the typed WebSocket client, over the JSON
//! protocol and over HTTP; typed errors, panics, cancellation, timeouts, a slow reader.

mod common;

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
    time::{Duration, Instant},
};

use agents::{prelude::*, testing::TestRuntime};
use common::{next_json, send_json, ws_connect, Socket};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Default)]
pub struct Feed;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
pub enum FeedError {
    #[error("refused: {0}")]
    Refused(String),
    #[error("broke after {0}")]
    Broke(u32),
}

impl Agent for Feed {
    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&["CREATE TABLE started(topic TEXT NOT NULL)"])?;
        Ok(())
    }
}

/// How many items each `numbered` producer has handed over, by tag.
static PRODUCED: Mutex<Option<HashMap<String, u32>>> = Mutex::new(None);

fn produced(tag: &str) -> u32 {
    PRODUCED
        .lock()
        .unwrap()
        .as_ref()
        .and_then(|p| p.get(tag).copied())
        .unwrap_or(0)
}

/// Tags whose producer saw its stream's receiver go away.
static STOPPED: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// Tags whose `hold` stream may go on.
static RELEASED: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn stopped(tag: &str) -> bool {
    STOPPED.lock().unwrap().iter().any(|t| t == tag)
}

fn release(tag: &str) {
    RELEASED
        .lock()
        .unwrap()
        .get_or_insert_with(HashSet::new)
        .insert(tag.to_owned());
}

fn released(tag: &str) -> bool {
    RELEASED
        .lock()
        .unwrap()
        .as_ref()
        .is_some_and(|r| r.contains(tag))
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[agent]
impl Feed {
    /// Records `topic`, then streams `topic-0..topic-n`; an empty topic is refused.
    #[callable]
    pub async fn start(
        &mut self,
        ctx: &mut Ctx<Self>,
        topic: String,
        n: u32,
    ) -> Result<Streaming<String, FeedError>, FeedError> {
        ctx.sql()
            .execute("INSERT INTO started(topic) VALUES (?1)", [&topic])
            .map_err(|e| FeedError::Refused(e.to_string()))?;
        if topic.is_empty() {
            return Err(FeedError::Refused("an empty topic".into()));
        }
        Ok(Streaming::iter((0..n).map(move |i| format!("{topic}-{i}"))))
    }

    #[callable]
    pub async fn started(&mut self, ctx: &mut Ctx<Self>) -> Vec<String> {
        let mut stmt = ctx.sql().prepare("SELECT topic FROM started").unwrap();
        let rows = stmt.query_map([], |r| r.get(0)).unwrap();
        rows.map(Result::unwrap).collect()
    }

    #[callable]
    pub async fn count(&mut self, _ctx: &mut Ctx<Self>, n: u32) -> Streaming<u32> {
        Streaming::iter(0..n)
    }

    /// `0..n`, then the typed error `Broke(n)`.
    #[callable]
    pub async fn fail_after(
        &mut self,
        _ctx: &mut Ctx<Self>,
        n: u32,
    ) -> Result<Streaming<u32, FeedError>, FeedError> {
        let items = (0..=n).map(move |i| {
            if i < n {
                Ok(i)
            } else {
                Err(FeedError::Broke(n))
            }
        });
        Ok(Streaming::new(futures_util::stream::iter(items)))
    }

    /// `0..n`, then a panic.
    #[callable]
    pub async fn panic_after(&mut self, _ctx: &mut Ctx<Self>, n: u32) -> Streaming<u32> {
        Streaming::new(futures_util::stream::iter(0..=n).map(move |i| {
            assert!(i < n, "stream boom at {i}");
            Ok(i)
        }))
    }

    /// `n` items `gap_ms` apart from a task of its own, which records `tag` in `STOPPED` when
    /// the receiver goes away.
    #[callable]
    pub async fn ticks(
        &mut self,
        _ctx: &mut Ctx<Self>,
        tag: String,
        n: u32,
        gap_ms: u64,
    ) -> Streaming<u32> {
        let (tx, stream) = Streaming::channel(1);
        tokio::spawn(async move {
            for i in 0..n {
                if tx.send(i).await.is_err() {
                    STOPPED.lock().unwrap().push(tag);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(gap_ms)).await;
            }
        });
        stream
    }

    /// `0`, then `1` once the test releases `tag` (recording `tag` in `STOPPED` if the
    /// receiver goes away first).
    #[callable]
    pub async fn hold(&mut self, _ctx: &mut Ctx<Self>, tag: String) -> Streaming<u32> {
        let (tx, stream) = Streaming::channel(1);
        tokio::spawn(async move {
            let _ = tx.send(0).await;
            while !released(&tag) {
                if tx.is_closed() {
                    STOPPED.lock().unwrap().push(tag);
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let _ = tx.send(1).await;
        });
        stream
    }

    /// `0..n` from a task of its own, which counts what it handed over in `PRODUCED`.
    #[callable]
    pub async fn numbered(&mut self, _ctx: &mut Ctx<Self>, tag: String, n: u32) -> Streaming<u32> {
        let (tx, stream) = Streaming::channel(1);
        tokio::spawn(async move {
            for i in 0..n {
                if tx.send(i).await.is_err() {
                    return;
                }
                let mut produced = PRODUCED.lock().unwrap();
                *produced
                    .get_or_insert_with(HashMap::new)
                    .entry(tag.clone())
                    .or_default() += 1;
            }
        });
        stream
    }

    /// `n` chunks of `size` bytes each.
    #[callable]
    pub async fn blobs(&mut self, _ctx: &mut Ctx<Self>, n: u32, size: u32) -> Streaming<String> {
        Streaming::iter((0..n).map(move |i| format!("{i}:{}", "x".repeat(size as usize))))
    }
}

async fn serve() -> (TestRuntime, std::net::SocketAddr) {
    // What is committed is read by another connection while the agent is live.
    common::serve(Runtime::builder().readable_while_live(true).agent::<Feed>()).await
}

/// Checks `count`, `start`, `fail_after` and `panic_after` through `feed`, whatever carries it.
async fn check_streams(feed: &FeedClient) {
    assert_eq!(
        feed.count(5).await.collect().await.unwrap(),
        vec![0, 1, 2, 3, 4]
    );
    assert_eq!(
        feed.count(0).await.collect().await.unwrap(),
        Vec::<u32>::new()
    );

    let before = feed.started().await.unwrap();
    let mut news = feed.start("news".into(), 3).await;
    for i in 0..3 {
        assert_eq!(news.next().await.unwrap().unwrap(), format!("news-{i}"));
    }
    assert!(news.next().await.is_none());
    assert!(news.next().await.is_none(), "an ended stream stays ended");

    // A refused start is a typed error, its write rolled back, and no chunk.
    let mut refused = feed.start(String::new(), 3).await;
    assert_eq!(
        refused.next().await.unwrap().unwrap_err(),
        RpcError::App(FeedError::Refused("an empty topic".into()))
    );
    assert!(refused.next().await.is_none());
    let mut after = before.clone();
    after.push("news".into());
    assert_eq!(feed.started().await.unwrap(), after);

    // A stream that fails midway: its chunks, then its typed error, then the end.
    let mut broken = feed.fail_after(2).await;
    assert_eq!(broken.next().await.unwrap().unwrap(), 0);
    assert_eq!(broken.next().await.unwrap().unwrap(), 1);
    assert_eq!(
        broken.next().await.unwrap().unwrap_err(),
        RpcError::App(FeedError::Broke(2))
    );
    assert!(broken.next().await.is_none());
    assert_eq!(
        feed.fail_after(1).await.collect().await.unwrap_err(),
        RpcError::App(FeedError::Broke(1))
    );

    // A panic in the stream ends it with an internal error; the agent goes on.
    let mut panics = feed.panic_after(1).await;
    assert_eq!(panics.next().await.unwrap().unwrap(), 0);
    let e = panics.next().await.unwrap().unwrap_err();
    assert!(
        matches!(&e, RpcError::Internal(m) if m.contains("panicked")),
        "{e:?}"
    );
    assert!(panics.next().await.is_none());
    assert_eq!(feed.count(2).await.collect().await.unwrap(), vec![0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_process_arrive_in_order_and_fail_typed() {
    let (rt, _) = serve().await;
    check_streams(&rt.agent::<Feed>("local")).await;

    // The untyped path collects a stream into one value: a postcard sequence decodes as a Vec.
    let args = agents::client::Codec::Postcard.encode(&(3u32,)).unwrap();
    let reply = rt.runtime().call("feed", "local", "count", args).await;
    assert_eq!(reply.unwrap().decode::<Vec<u32>>().unwrap(), vec![0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_typed_client_streams_over_a_websocket() {
    let (rt, addr) = serve().await;
    let remote = FeedClient::connect(&format!("ws://{addr}/agents/feed/remote"))
        .await
        .unwrap();
    check_streams(&remote).await;

    // The first chunk arrives only once the call's write is durable: an independent
    // connection to the database sees it.
    let mut gated = remote.start("gated".into(), 2).await;
    assert_eq!(gated.next().await.unwrap().unwrap(), "gated-0");
    let path = rt.runtime().database_path::<Feed>("remote").unwrap();
    let db = rusqlite::Connection::open(path).unwrap();
    let seen: i64 = db
        .query_row(
            "SELECT count(*) FROM started WHERE topic = 'gated'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(seen, 1);
    drop(gated);

    // A stream that waits does not hold the agent: other calls, over the same socket and
    // in-process, are answered meanwhile.
    let mut held = remote.hold("remote-held".into()).await;
    assert_eq!(held.next().await.unwrap().unwrap(), 0);
    assert_eq!(remote.count(2).await.collect().await.unwrap(), vec![0, 1]);
    assert!(rt.agent::<Feed>("remote").started().await.is_ok());
    release("remote-held");
    assert_eq!(held.next().await.unwrap().unwrap(), 1);
    assert!(held.next().await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_stream_cancels_it_and_a_silent_stream_times_out() {
    let (rt, addr) = serve().await;
    let url = format!("ws://{addr}/agents/feed/cancel");
    let remote = FeedClient::connect(&url).await.unwrap();
    let local = rt.agent::<Feed>("cancel");
    for (client, tag) in [(&remote, "remote-drop"), (&local, "local-drop")] {
        let mut ticks = client.ticks(tag.into(), 10_000, 5).await;
        assert_eq!(ticks.next().await.unwrap().unwrap(), 0);
        assert_eq!(ticks.next().await.unwrap().unwrap(), 1);
        drop(ticks);
        wait_until(
            &format!("{tag}: the producer learns that nobody listens"),
            || stopped(tag),
        )
        .await;
    }

    // The timeout applies to each wait for a chunk; when it passes, the agent's stream stops.
    for (client, tag) in [(&remote, "remote-idle"), (&local, "local-idle")] {
        let client = client.clone().with_timeout(Duration::from_millis(300));
        let mut held = client.hold(tag.into()).await;
        assert_eq!(held.next().await.unwrap().unwrap(), 0);
        let e = held.next().await.unwrap().unwrap_err();
        assert!(matches!(e, RpcError::Timeout), "{e:?}");
        assert!(held.next().await.is_none());
        wait_until(
            &format!("{tag}: the producer learns of the timeout"),
            || stopped(tag),
        )
        .await;
    }
}

/// Reads chunks `data` of call `id`, in order (JSON protocol).
async fn expect_chunks(ws: &mut Socket, id: u64, data: std::ops::Range<u32>) {
    for i in data {
        let chunk = json!({"type": "chunk", "id": id, "data": i});
        assert_eq!(next_json(ws).await, chunk);
    }
}

/// Reads the `ok: null` reply that ends the stream of call `id` (JSON protocol).
async fn expect_end(ws: &mut Socket, id: u64) {
    let end = json!({"type": "reply", "id": id, "ok": null});
    assert_eq!(next_json(ws).await, end);
}

async fn open_json(addr: std::net::SocketAddr, name: &str) -> Socket {
    let path = format!("/agents/feed/{name}");
    let mut ws = ws_connect(addr, &path, Some("agents.v1.json"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "identity");
    ws
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_paces_a_stream_and_the_typed_client_keeps_a_slow_readers_buffer_small() {
    let (_rt, addr) = serve().await;
    // The JSON protocol: 5 chunks for 5 credits (sent before the call), then nothing until
    // more credit.
    let mut ws = open_json(addr, "credit").await;
    send_json(&mut ws, json!({"type": "credit", "id": 1, "chunks": 5})).await;
    send_json(
        &mut ws,
        json!({"type": "call", "id": 1, "method": "count", "args": [100]}),
    )
    .await;
    expect_chunks(&mut ws, 1, 0..5).await;
    let more = tokio::time::timeout(Duration::from_millis(300), next_json(&mut ws)).await;
    assert!(more.is_err(), "a chunk without credit: {more:?}");
    send_json(&mut ws, json!({"type": "credit", "id": 1, "chunks": 95})).await;
    expect_chunks(&mut ws, 1, 5..100).await;
    expect_end(&mut ws, 1).await;
    // Without credit, a stream is not paced.
    send_json(
        &mut ws,
        json!({"type": "call", "id": 2, "method": "count", "args": [3]}),
    )
    .await;
    expect_chunks(&mut ws, 2, 0..3).await;
    expect_end(&mut ws, 2).await;

    // Early credit is kept for 1,024 calls not yet made, no more: past that, a credit is
    // ignored (call 5000 is not paced), while one kept in time paces its call (call 1000).
    for id in 1000..2024 {
        send_json(&mut ws, json!({"type": "credit", "id": id, "chunks": 1})).await;
    }
    send_json(&mut ws, json!({"type": "credit", "id": 5000, "chunks": 1})).await;
    let call = |id: u64| json!({"type": "call", "id": id, "method": "count", "args": [3]});
    send_json(&mut ws, call(5000)).await;
    expect_chunks(&mut ws, 5000, 0..3).await;
    expect_end(&mut ws, 5000).await;
    send_json(&mut ws, call(1000)).await;
    expect_chunks(&mut ws, 1000, 0..1).await;
    let more = tokio::time::timeout(Duration::from_millis(300), next_json(&mut ws)).await;
    assert!(more.is_err(), "a chunk past the early credit: {more:?}");

    // The typed client: a reader that took one item of a fast stream holds a few dozen, not
    // the whole stream; reading on, it gets the rest in order.
    let feed = FeedClient::connect(&format!("ws://{addr}/agents/feed/credit"))
        .await
        .unwrap();
    let mut numbers = feed.numbered("paced".into(), 100_000).await;
    assert_eq!(numbers.next().await.unwrap().unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let ahead = produced("paced");
    assert!(
        ahead < 64,
        "the producer ran {ahead} items ahead of a reader that took 1"
    );
    for i in 1..5_000 {
        assert_eq!(numbers.next().await.unwrap().unwrap(), i);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_json_protocol_streams_chunks_and_cancels_and_http_collects() {
    let (_rt, addr) = serve().await;
    let mut ws = open_json(addr, "json").await;

    send_json(
        &mut ws,
        json!({"type": "call", "id": 1, "method": "count", "args": [3]}),
    )
    .await;
    expect_chunks(&mut ws, 1, 0..3).await;
    expect_end(&mut ws, 1).await;

    send_json(
        &mut ws,
        json!({"type": "call", "id": 2, "method": "fail_after", "args": [1]}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "chunk", "id": 2, "data": 0})
    );
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "reply", "id": 2, "err": {"kind": "app", "message": "broke after 1", "data": {"Broke": 1}}})
    );

    // A cancel stops the stream: its reply is `cancelled`, and no chunk follows it.
    let call =
        json!({"type": "call", "id": 3, "method": "ticks", "args": ["json-cancel", 10_000, 5]});
    send_json(&mut ws, call).await;
    assert_eq!(next_json(&mut ws).await["type"], "chunk");
    send_json(&mut ws, json!({"type": "cancel", "id": 3})).await;
    let reply = loop {
        let frame = next_json(&mut ws).await;
        if frame["type"] != "chunk" {
            break frame;
        }
        assert_eq!(frame["id"], 3);
    };
    assert_eq!(reply["id"], 3);
    assert_eq!(reply["err"]["kind"], "cancelled", "{reply}");
    send_json(
        &mut ws,
        json!({"type": "call", "id": 4, "method": "count", "args": [0]}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "reply", "id": 4, "ok": null}),
        "nothing of call 3 after its reply"
    );
    wait_until("the cancelled producer stops", || stopped("json-cancel")).await;

    // Over HTTP, a stream is collected into one array (or its error).
    let (status, body) =
        common::http_request(addr, "POST", "/agents/feed/json/call/count", "[3]").await;
    assert_eq!((status, body), (200, json!([0, 1, 2])));
    let (status, body) =
        common::http_request(addr, "POST", "/agents/feed/json/call/fail_after", "[2]").await;
    assert_eq!((status, &body["kind"]), (422, &json!("app")), "{body}");
    // A stream too large for one reply (2 MB; the limit is 1 MiB) is refused, not buffered on.
    let (status, body) =
        common::http_request(addr, "POST", "/agents/feed/json/call/blobs", "[2000, 1000]").await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("too much for one reply"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_waits_for_a_slow_reader_instead_of_closing_it() {
    let (_rt, addr) = common::serve(Runtime::builder().agent::<Feed>().outbound_queue(8)).await;
    let mut ws = open_json(addr, "slow").await;
    // 20 MB: more than the socket buffers hold, with a queue of 8 frames.
    let (n, size) = (20_000, 1000);
    send_json(
        &mut ws,
        json!({"type": "call", "id": 1, "method": "blobs", "args": [n, size]}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..n {
        let frame = next_json(&mut ws).await;
        assert_eq!(
            (&frame["type"], &frame["id"]),
            (&json!("chunk"), &json!(1)),
            "{frame}"
        );
        let data = frame["data"].as_str().unwrap();
        assert!(data.starts_with(&format!("{i}:")), "chunk {i} in order");
    }
    expect_end(&mut ws, 1).await;
    // The connection is still up.
    send_json(
        &mut ws,
        json!({"type": "call", "id": 2, "method": "count", "args": [1]}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "chunk", "id": 2, "data": 0})
    );
    expect_end(&mut ws, 2).await;
}
