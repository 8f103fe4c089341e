//! A gateway in the user's own axum app hands requests on to agents with `runtime.fetch`:
//! `on_request`, calls and WebSockets, after the agent's admission hooks.

mod common;

use agents::{
    axum::{
        extract::{Path, Request, State},
        response::{IntoResponse, Response},
        routing::any,
        Router,
    },
    prelude::*,
};
use common::{http_request, next_json, ws_connect};
use serde_json::json;

#[derive(Default)]
pub struct User;

impl Agent for User {
    /// The gateway authenticated the caller and says who it is.
    async fn on_before_request(_name: &str, req: &RequestHead) -> Admission {
        match req.headers.get("x-user").and_then(|v| v.to_str().ok()) {
            Some(user) => Ok(Some(user.to_owned())),
            None => Err((agents::axum::http::StatusCode::UNAUTHORIZED, "no user").into_response()),
        }
    }

    async fn on_request(
        &mut self,
        ctx: &mut Ctx<Self>,
        request: HttpRequest,
    ) -> Result<HttpResponse, AppError> {
        let who = request
            .extensions()
            .get::<agents::Principal>()
            .map(|p| p.0.clone());
        let text = format!(
            "{} {} of {} for {who:?}",
            request.method(),
            request.uri().path(),
            ctx.name()
        );
        Ok(text.into_response())
    }
}

#[agent(internal)]
impl User {
    #[callable]
    pub async fn add(&mut self, ctx: &mut Ctx<Self>, by: i64) -> Result<i64, AppError> {
        let n = ctx.kv().get::<i64>("n")?.unwrap_or(0) + by;
        ctx.kv().put("n", &n)?;
        Ok(n)
    }
}

/// `/api/users/{id}/{*rest}` → `user`/`id` with the path `/{rest}`, as user `id`.
async fn gateway(
    State(runtime): State<Runtime>,
    Path((id, rest)): Path<(String, String)>,
    mut request: Request,
) -> Response {
    *request.uri_mut() = format!("/{rest}").parse().unwrap();
    let user = id.parse().unwrap();
    request.headers_mut().insert("x-user", user);
    runtime.fetch::<User>(&id, request).await
}

/// `/api/users/{id}`: the agent's root (WebSockets).
async fn gateway_root(
    State(runtime): State<Runtime>,
    Path(id): Path<String>,
    mut request: Request,
) -> Response {
    *request.uri_mut() = "/".parse().unwrap();
    runtime.fetch::<User>(&id, request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_forwards_requests_calls_and_websockets() {
    let rt = agents::testing::TestRuntime::start(Runtime::builder().agent::<User>()).unwrap();
    let app = Router::new()
        .route("/api/users/{id}", any(gateway_root))
        .route("/api/users/{id}/{*rest}", any(gateway))
        .with_state(rt.runtime().clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { agents::axum::serve(listener, app).await });

    let (status, body) = http_request(addr, "GET", "/api/users/ann/profile", "").await;
    assert_eq!(status, 200);
    assert_eq!(body, json!(r#"GET /profile of ann for Some("ann")"#));
    let (status, body) = http_request(addr, "POST", "/api/users/ann/call/add", "[5]").await;
    assert_eq!((status, body), (200, json!(5)));
    // The class is internal: the runtime's own routes do not serve it, the gateway does.
    assert_eq!(rt.agent::<User>("ann").add(1).await, Ok(6));

    let mut ws = ws_connect(addr, "/api/users/bob", Some("agents.v1.json"))
        .await
        .unwrap();
    let identity = next_json(&mut ws).await;
    assert_eq!(
        (&identity["class"], &identity["name"]),
        (&json!("user"), &json!("bob"))
    );
    common::send_json(
        &mut ws,
        json!({"type": "call", "id": 1, "method": "add", "args": [2]}),
    )
    .await;
    assert_eq!(
        next_json(&mut ws).await,
        json!({"type": "reply", "id": 1, "ok": 2})
    );

    let (status, _) = http_request(addr, "GET", "/agents/user/ann/profile", "").await;
    assert_eq!(
        status, 404,
        "the runtime's own routes do not serve an internal class"
    );
}
