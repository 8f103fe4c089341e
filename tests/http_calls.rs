//! `POST /agents/{class}/{name}/call/{method}` over a real socket on 127.0.0.1.

mod common;

use agents::{prelude::*, testing::TestRuntime};
use common::Counter;
use serde_json::{json, Value};

async fn serve() -> (TestRuntime, std::net::SocketAddr) {
    common::serve(Runtime::builder().agent::<Counter>()).await
}

async fn request(addr: std::net::SocketAddr, method: &str, path: &str, body: &str) -> (u16, Value) {
    common::http_request(addr, method, path, body).await
}

async fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> (u16, Value) {
    request(addr, "POST", path, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_answer_json_results() {
    let (rt, addr) = serve().await;
    assert_eq!(
        post(addr, "/agents/counter/bob/call/add", "[5]").await,
        (200, json!(5))
    );
    assert_eq!(
        post(addr, "/agents/counter/bob/call/add", "[2]").await,
        (200, json!(7))
    );
    assert_eq!(
        post(addr, "/agents/counter/bob/call/get", "[]").await,
        (200, json!(7))
    );
    assert_eq!(
        rt.agent::<Counter>("bob").get().await.unwrap(),
        7,
        "the same agent as in-process"
    );
    // Names are percent-decoded: `team%2F1` is the agent named "team/1".
    assert_eq!(
        post(addr, "/agents/counter/team%2F1/call/add", "[3]").await,
        (200, json!(3))
    );
    assert_eq!(rt.agent::<Counter>("team/1").get().await.unwrap(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_the_documented_kinds_and_statuses() {
    let (_rt, addr) = serve().await;
    let cases = [
        ("/agents/counter/e/call/nope", "[]", 404, "unknown_method"),
        ("/agents/counter/e/call/add", "[\"five\"]", 400, "bad_args"),
        ("/agents/counter/e/call/add", "[1, 2]", 400, "bad_args"),
        ("/agents/counter/e/call/add", "{\"by\": 1}", 400, "bad_args"),
        ("/agents/counter/e/call/add", "not json", 400, "bad_args"),
        ("/agents/counter/e/call/add", "", 400, "bad_args"),
        ("/agents/no-such-class/e/call/add", "[1]", 404, "bad_args"),
        (
            "/agents/counter/e/call/add_then_panic",
            "[1]",
            500,
            "internal",
        ),
    ];
    for (path, body, status, kind) in cases {
        let (got, answer) = post(addr, path, body).await;
        assert_eq!(
            (got, answer["kind"].as_str()),
            (status, Some(kind)),
            "{path} {body}: {answer}"
        );
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{answer}"
        );
    }
    let long = "x".repeat(10 * 1024);
    let (status, answer) = post(addr, &format!("/agents/counter/{long}/call/add"), "[1]").await;
    assert_eq!(
        (status, answer["kind"].as_str()),
        (400, Some("bad_args")),
        "{answer}"
    );

    // A typed application error carries its data.
    let (status, answer) = post(addr, "/agents/counter/e/call/add_then_fail", "[4]").await;
    assert_eq!(status, 422);
    assert_eq!(
        answer,
        json!({"kind": "app", "message": "refused: not adding 4", "data": {"Refused": "not adding 4"}})
    );

    // Other methods on the route are refused by HTTP itself; nothing was hurt.
    assert_eq!(
        request(addr, "GET", "/agents/counter/e/call/get", "")
            .await
            .0,
        405
    );
    assert_eq!(
        post(addr, "/agents/counter/e/call/get", "[]").await,
        (200, json!(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_clients_lose_nothing() {
    let (_rt, addr) = serve().await;
    let clients: Vec<_> = (0..32)
        .map(|_| {
            tokio::spawn(async move {
                for _ in 0..20 {
                    assert_eq!(
                        post(addr, "/agents/counter/shared/call/add", "[1]").await.0,
                        200
                    );
                }
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(
        post(addr, "/agents/counter/shared/call/get", "[]").await,
        (200, json!(640))
    );
}
