//! Operating a server: the admin routes (off by default, behind their hook), the metrics after a
//! known workload (exact counts), the status JSON, and the status page in headless Chromium.

mod common;

use std::{
    collections::HashMap,
    time::{Duration, SystemTime},
};

use agents::{prelude::*, testing::TestRuntime, Clock};
use serde_json::json;

/// Adds, fails when asked, broadcasts what sockets send, and schedules a job that always fails.
#[derive(Default)]
pub struct Meter;

impl Agent for Meter {
    async fn on_message(
        &mut self,
        ctx: &mut Ctx<Self>,
        _conn: &Conn<Self>,
        message: WsMessage,
    ) -> Result<(), AppError> {
        if let WsMessage::Text(text) = message {
            ctx.broadcast(&text.to_string(), &[])?;
        }
        Ok(())
    }
}

#[agent(event = "String")]
impl Meter {
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>, n: i64) -> Result<i64, AppError> {
        let total = ctx.kv().get::<i64>("total")?.unwrap_or(0) + n;
        ctx.kv().put("total", &total)?;
        Ok(total)
    }

    #[callable]
    pub async fn total(&mut self, ctx: &mut Ctx<Self>) -> Result<i64, AppError> {
        Ok(ctx.kv().get::<i64>("total")?.unwrap_or(0))
    }

    #[callable]
    pub async fn refuse(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        Err(AppError::msg("no"))
    }

    #[callable]
    pub async fn doom(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.schedule(When::after(Duration::ZERO), Self::calls().fail())?;
        Ok(())
    }

    #[callable(private)]
    pub async fn fail(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        Err(AppError::msg("the job failed"))
    }
}

/// Records each connection that closed.
#[derive(Default)]
pub struct Leaver;

impl Agent for Leaver {
    async fn on_close(
        &mut self,
        ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        _code: u16,
        _reason: &str,
    ) -> Result<(), AppError> {
        ctx.kv().put(&format!("left/{}", conn.id()), &true)?;
        Ok(())
    }
}

#[agent]
impl Leaver {
    #[callable]
    pub async fn hello(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        Ok(())
    }
}

/// The admin hook of the test: `?token=t`. (`Admission`'s refusal is a whole response.)
#[allow(clippy::result_large_err)]
fn builder() -> agents::Builder {
    Runtime::builder()
        .clock(Clock::manual(SystemTime::now()))
        .agent::<Meter>()
        .agent::<Leaver>()
        .admin(|request| match request.uri.query() {
            Some("token=t") => Ok(None),
            _ => Err(agents::refuse(401, "who are you?")),
        })
}

/// The samples of `text` (Prometheus's format), by name with labels as written.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.rsplit_once(' '))
        .map(|(name, value)| (name.to_owned(), value.parse().unwrap()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_count_a_known_workload_exactly() {
    let (rt, addr) = common::serve(builder()).await;
    let m = rt.agent::<Meter>("m");
    for n in 1..=5 {
        m.add(n).await.unwrap();
    }
    m.refuse().await.unwrap_err();
    m.refuse().await.unwrap_err();
    let (status, _) =
        common::http_request(addr, "POST", "/agents/meter/m/call/add", "[\"x\"]").await;
    assert_eq!(status, 400);

    // Two sockets; one sends a message, which is broadcast to both.
    let mut a = common::ws_connect(addr, "/agents/meter/m", Some("agents.v1.json"))
        .await
        .unwrap();
    let mut b = common::ws_connect(addr, "/agents/meter/m", Some("agents.v1.json"))
        .await
        .unwrap();
    common::next_json(&mut a).await; // identity
    common::next_json(&mut b).await;
    let reply = common::call(&mut a, 1, "add", json!([10])).await;
    assert_eq!(reply["ok"], 25);
    common::send_json(&mut a, json!({"type": "message", "data": "hi"})).await;
    for socket in [&mut a, &mut b] {
        let event = common::next_json(socket).await;
        assert_eq!(event["data"], "hi", "{event}");
    }

    // A job that fails once and is retried 6 times, then is a dead letter.
    m.doom().await.unwrap();
    rt.advance(Duration::ZERO).await;
    for _ in 0..130 {
        rt.advance(Duration::from_secs(1)).await;
    }

    let (status, text) = common::http_request(addr, "GET", "/admin/metrics?token=t", "").await;
    assert_eq!(status, 200);
    let text = text.as_str().unwrap().to_owned();
    let s = samples(&text);
    let get = |name: &str| {
        s.get(name)
            .copied()
            .unwrap_or_else(|| panic!("no {name} in\n{text}"))
    };
    // 5 + 1 (socket) adds, 1 with bad arguments (the agent decodes them), 2 refusals, 1 doom,
    // 7 runs of the scheduled job; end to end, the 10 calls made by callers (the schedule's
    // runs have none).
    let expected = [
        (
            r#"agents_calls_total{class="meter",method="add",outcome="ok"}"#,
            6.0,
        ),
        (
            r#"agents_calls_total{class="meter",method="add",outcome="bad_args"}"#,
            1.0,
        ),
        (
            r#"agents_calls_total{class="meter",method="refuse",outcome="app"}"#,
            2.0,
        ),
        (
            r#"agents_calls_total{class="meter",method="doom",outcome="ok"}"#,
            1.0,
        ),
        (
            r#"agents_calls_total{class="meter",method="fail",outcome="app"}"#,
            7.0,
        ),
        (
            r#"agents_handler_seconds_count{class="meter",method="add"}"#,
            7.0,
        ),
        (r#"agents_call_seconds_count{class="meter"}"#, 10.0),
        (r#"agents_activations_total{class="meter"}"#, 1.0),
        (r#"agents_live{class="meter"}"#, 1.0),
        ("agents_connections", 2.0),
        (r#"agents_messages_in_total{class="meter"}"#, 1.0),
        (r#"agents_broadcast_deliveries_total{class="meter"}"#, 2.0),
        (r#"agents_frames_out_total{class="meter"}"#, 2.0),
        (r#"agents_schedule_retries_total{class="meter"}"#, 6.0),
        (r#"agents_dead_letters_total{class="meter"}"#, 1.0),
        (
            r#"agents_schedule_lateness_seconds_count{class="meter"}"#,
            7.0,
        ),
    ];
    for (name, value) in expected {
        assert_eq!(get(name), value, "{name}");
    }
    assert!(get(r#"agents_batch_events_count{class="meter"}"#) >= 1.0);
    assert!(text.contains("# HELP agents_calls_total"), "{text}");

    // The status, as JSON.
    assert!(rt.hibernate::<Meter>("m").await.unwrap());
    let (status, s) = common::http_request(addr, "GET", "/admin/status.json?token=t", "").await;
    assert_eq!(status, 200);
    assert_eq!(s["live"], 0);
    assert_eq!(s["connections"], 2);
    assert_eq!(s["classes"][0]["class"], "meter");
    assert_eq!(s["classes"][0]["calls"], 17);
    assert_eq!(s["classes"][0]["failed"], 10);
    assert!(s["classes"][0]["p99_ms"].as_f64().unwrap() > 0.0, "{s}");
    assert_eq!(
        s["dead_letters"],
        json!([{"agent": "meter/m", "dead_letters": 1}])
    );
    let _ = rt;
}

/// Method names are the client's: calls to methods a class does not have share one label, so
/// that no client can add series to the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_to_unknown_methods_share_one_label() {
    let (_rt, addr) = common::serve(builder()).await;
    for i in 0..20 {
        let path = format!("/agents/meter/m/call/nope{i}");
        let (status, _) = common::http_request(addr, "POST", &path, "[]").await;
        assert_eq!(status, 404);
    }
    let (_, text) = common::http_request(addr, "GET", "/admin/metrics?token=t", "").await;
    let text = text.as_str().unwrap();
    let s = samples(text);
    let unknown =
        r#"agents_calls_total{class="meter",method="(unknown)",outcome="unknown_method"}"#;
    assert_eq!(s.get(unknown), Some(&20.0), "{text}");
    assert!(
        !text.contains("nope"),
        "no series per unknown name:\n{text}"
    );
}

#[tokio::test]
async fn the_admin_routes_are_off_by_default_and_behind_their_hook() {
    let (_rt, addr) = common::serve(Runtime::builder().agent::<Meter>()).await;
    for path in ["/admin/metrics", "/admin/status", "/admin/status.json"] {
        let (status, _) = common::http_request(addr, "GET", path, "").await;
        assert_eq!(status, 404, "{path} without an admin hook");
    }
    let (_rt, addr) = common::serve(builder()).await;
    for path in [
        "/admin/metrics",
        "/admin/status",
        "/admin/status.json?token=wrong",
    ] {
        let (status, body) = common::http_request(addr, "GET", path, "").await;
        assert_eq!(status, 401, "{path}: {body}");
    }
    let (status, body) = common::http_request(addr, "GET", "/admin/status?token=t", "").await;
    assert_eq!(status, 200);
    assert!(body.as_str().unwrap().contains("<title>agents"));
}

/// The page in headless Chromium: it fills itself from `status.json` (passing its token on),
/// and a screenshot is kept in `target/status-page.png`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_runtime_in_a_real_browser() {
    let browser = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        std::path::Path::new(&browser).exists(),
        "no browser at {browser}: run scripts/setup (it installs Debian's chromium), or set CHROMIUM"
    );
    let rt = TestRuntime::start(builder()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = rt.runtime().clone();
    tokio::spawn(async move { serving.serve_on(listener).await });
    for name in ["a", "b", "c"] {
        rt.agent::<Meter>(name).add(1).await.unwrap();
    }
    rt.agent::<Meter>("a").refuse().await.unwrap_err();
    // Due now, on a clock that stands still: listed as due soon.
    rt.agent::<Meter>("c").doom().await.unwrap();

    let url = format!("http://{addr}/admin/status?token=t");
    let screenshot = concat!(env!("CARGO_MANIFEST_DIR"), "/target/status-page.png");
    let _ = std::fs::remove_file(screenshot);
    let run = |args: Vec<String>| {
        let browser = browser.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(browser)
                .args([
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--virtual-time-budget=3000",
                    "--window-size=1000,800",
                ])
                .args(args)
                .output()
                .unwrap()
        })
    };
    let dom = run(vec!["--dump-dom".into(), url.clone()]).await.unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout).into_owned();
    let live = dom
        .split(r#"id="live">"#)
        .nth(1)
        .and_then(|rest| rest.split('<').next());
    assert_eq!(live, Some("3"), "the page shows 3 live agents:\n{dom}");
    assert!(dom.contains("<td>meter</td>"), "the calls by class:\n{dom}");
    assert!(
        dom.contains("<td>meter/c</td>"),
        "the schedules due soon:\n{dom}"
    );
    assert!(
        !dom.contains("status.json: 401"),
        "the page passed its token on:\n{dom}"
    );
    let shot = run(vec![format!("--screenshot={screenshot}"), url])
        .await
        .unwrap();
    let png = std::fs::read(screenshot).unwrap_or_else(|e| {
        panic!(
            "no screenshot ({e}): {}",
            String::from_utf8_lossy(&shot.stderr)
        )
    });
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
}

/// A sample of the metrics, 0 if absent.
async fn sample(addr: std::net::SocketAddr, name: &str) -> f64 {
    let (_, text) = common::http_request(addr, "GET", "/admin/metrics?token=t", "").await;
    samples(text.as_str().unwrap())
        .get(name)
        .copied()
        .unwrap_or(0.0)
}

/// Waits (up to 10 s) until the sample `name` is past `was`.
async fn past(addr: std::net::SocketAddr, name: &str, was: f64) -> f64 {
    for _ in 0..1_000 {
        let now = sample(addr, name).await;
        if now > was {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("{name} stayed at {was}");
}

/// Under `Durability::Full`, a socket's close whose hooks write nothing (only the runtime forgets
/// the connection: nobody is told anything) has no fsync of its own; the next sync covers it,
/// here the one of the hibernation. A close whose `on_close` writes is synced at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_that_writes_nothing_waits_for_the_next_sync() {
    let (rt, addr) = common::serve(builder()).await;
    for (class, writes) in [("meter", false), ("leaver", true)] {
        let batches = format!(r#"agents_batch_events_count{{class="{class}"}}"#);
        let syncs = format!(r#"agents_sync_seconds_count{{class="{class}"}}"#);
        let mut ws =
            common::ws_connect(addr, &format!("/agents/{class}/a"), Some("agents.v1.json"))
                .await
                .unwrap();
        common::next_json(&mut ws).await; // identity
        let method = if writes { "hello" } else { "add" };
        let args = if writes { json!([]) } else { json!([1]) };
        assert!(common::call(&mut ws, 1, method, args)
            .await
            .get("ok")
            .is_some());
        let (before, synced) = (sample(addr, &batches).await, sample(addr, &syncs).await);
        drop(ws);
        past(addr, &batches, before).await; // the close's batch committed
        if writes {
            past(addr, &syncs, synced).await;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert_eq!(
                sample(addr, &syncs).await,
                synced,
                "the close was synced alone"
            );
        }
        let synced = sample(addr, &syncs).await;
        if writes {
            assert!(rt.hibernate::<Leaver>("a").await.unwrap());
            assert_eq!(
                sample(addr, &syncs).await,
                synced,
                "nothing was left to sync"
            );
        } else {
            assert!(rt.hibernate::<Meter>("a").await.unwrap());
            assert_eq!(
                sample(addr, &syncs).await,
                synced + 1.0,
                "the hibernation synced it"
            );
        }
    }
}

/// Under `Durability::Full`, a call that only reads has nothing to sync: once every write before
/// it is durable, its reply leaves at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_only_reads_has_no_sync() {
    let (rt, addr) = common::serve(builder()).await;
    let syncs = r#"agents_sync_seconds_count{class="meter"}"#;
    let m = rt.agent::<Meter>("reader");
    assert_eq!(m.add(3).await.unwrap(), 3);
    let synced = sample(addr, syncs).await;
    assert!(synced >= 1.0, "the write was synced");
    for _ in 0..10 {
        assert_eq!(m.total().await.unwrap(), 3);
    }
    assert_eq!(sample(addr, syncs).await, synced, "a read was synced");
    assert_eq!(m.add(1).await.unwrap(), 4);
    assert_eq!(sample(addr, syncs).await, synced + 1.0);
}
