//! `#[agent(internal)]` classes and `#[callable(internal)]` methods: reachable in-process,
//! not from the network.

mod common;

use agents::prelude::*;
use common::{http_request, next_json, send_json, serve, ws_connect};
use serde_json::json;

/// A rate limiter other agents use; nobody outside may drain it.
#[derive(Default)]
pub struct Limiter;
impl Agent for Limiter {}

#[agent(internal)]
impl Limiter {
    #[callable]
    pub async fn take(&mut self, ctx: &mut Ctx<Self>) -> Result<u32, AppError> {
        let left = ctx.kv().get::<u32>("left")?.unwrap_or(3);
        let left = left.saturating_sub(1);
        ctx.kv().put("left", &left)?;
        Ok(left)
    }
}

/// A public agent with one in-process-only method.
#[derive(Default)]
pub struct Api;
impl Agent for Api {}

#[agent]
impl Api {
    /// Takes a token from the internal limiter.
    #[callable]
    pub async fn request(&mut self, ctx: &mut Ctx<Self>) -> Result<u32, AppError> {
        Ok(ctx.agent::<Limiter>("global").take().await?)
    }

    #[callable(internal)]
    pub async fn reset(&mut self, _ctx: &mut Ctx<Self>) -> String {
        "reset".into()
    }
}

fn builder() -> agents::Builder {
    Runtime::builder().agent::<Limiter>().agent::<Api>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_class_is_served_in_process_only() {
    let (rt, addr) = serve(builder()).await;
    // HTTP: as if the class did not exist.
    let (status, body) = http_request(addr, "POST", "/agents/limiter/global/call/take", "[]").await;
    assert_eq!(status, 404, "{body}");
    let (unknown, _) = http_request(addr, "POST", "/agents/nothing/global/call/take", "[]").await;
    assert_eq!(unknown, 404);
    let (status, _) = http_request(addr, "GET", "/agents/limiter/global/anything", "").await;
    assert_eq!(status, 404);
    // WebSocket: refused at the handshake.
    let e = ws_connect(addr, "/agents/limiter/global", Some("agents.v1.json"))
        .await
        .unwrap_err();
    assert!(e.contains("404"), "{e}");
    // Nothing was drained; in-process callers reach it.
    assert_eq!(rt.agent::<Limiter>("global").take().await, Ok(2));
    let (status, body) = http_request(addr, "POST", "/agents/api/a/call/request", "[]").await;
    assert_eq!((status, body), (200, json!(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_callable_is_unknown_to_the_network() {
    let (rt, addr) = serve(builder()).await;
    let (status, body) = http_request(addr, "POST", "/agents/api/a/call/reset", "[]").await;
    assert_eq!(
        (status, &body["kind"]),
        (404, &json!("unknown_method")),
        "{body}"
    );
    let mut ws = ws_connect(addr, "/agents/api/a", Some("agents.v1.json"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "identity");
    send_json(&mut ws, json!({"type": "call", "id": 1, "method": "reset"})).await;
    assert_eq!(next_json(&mut ws).await["err"]["kind"], "unknown_method");
    assert_eq!(rt.agent::<Api>("a").reset().await, Ok("reset".into()));
    // The untyped in-process path is in-process too.
    let reply = rt
        .call("api", "a", "reset", agents::Payload::Json(json!([])))
        .await;
    assert_eq!(reply, Ok(agents::Payload::Json(json!("reset"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_class_describes_what_it_serves() {
    let (_rt, addr) = serve(builder()).await;
    let (status, body) = http_request(addr, "GET", "/agents/api", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"class": "api", "methods": [
            {"name": "request", "params": [], "returns": "u32", "error": "AppError"}
        ]}),
        "the internal `reset` is left out"
    );
    let (status, _) = http_request(addr, "GET", "/agents/limiter", "").await;
    assert_eq!(status, 404, "an internal class is not described");
    // The JavaScript client and its types are served as they are in the repository.
    for (path, file) in [
        ("/agents.js", agents::JS_CLIENT),
        ("/agents.d.ts", agents::JS_TYPES),
    ] {
        let (status, body) = http_request(addr, "GET", path, "").await;
        assert_eq!((status, body.as_str()), (200, Some(file)), "{path}");
    }
}
