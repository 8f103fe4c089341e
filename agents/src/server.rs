//! Serving agents over HTTP (axum): `GET /agents.js` (the JavaScript client),
//! `POST /agents/{class}/{name}/call/{method}`, WebSockets
//! on `GET /agents/{class}/{name}` (see [`connection`](crate::connection)), and every other
//! request under `/agents/{class}/{name}` to the agent's `on_request`. `on_before_request` /
//! `on_before_connect` run first, without waking the agent.
//!
//! The body is the JSON array of arguments (`[5]`, or `[]` for none), sent with
//! `Content-Type: application/json` (any other type is refused with 415: a browser sends only
//! those other types across sites without a CORS preflight); the answer is `200` with
//! the result as JSON, or the error object of the JSON protocol
//! (`{"kind":"bad_args","message":"..","data":..}`) with a status that fits its kind:
//!
//! | kind | status |
//! |---|---|
//! | `bad_args` (also malformed JSON, a body that is not an array, an invalid name) | 400 |
//! | `bad_args` for a body that is not `application/json` | 415 |
//! | `bad_args` for a class that is not served: unregistered, or `#[agent(internal)]` | 404 |
//! | `unknown_method` | 404 |
//! | `app` (the callable's typed error, in `data`) | 422 |
//! | `overloaded` | 503 |
//! | `timeout` | 504 |
//! | `cycle`, `cancelled`, `internal` | 500 |
//!
//! ```sh
//! curl localhost:8080/agents/counter/bob/call/add -H 'Content-Type: application/json' -d '[5]'
//! ```

use std::net::SocketAddr;

use agents_client::{protocol, trace::TraceContext, ErrorKind, OutgoingCall, Payload, RawError};
use axum::{
    body::Bytes,
    extract::{ws::WebSocketUpgrade, FromRequestParts, Path, Request, State},
    http::{header, Method, StatusCode},
    response::{IntoResponse, Response},
    routing::{any, get, post},
    Router,
};
use tokio::sync::oneshot;

use crate::{
    address::AgentKey,
    agent::{AgentClass, Principal},
    error::Error,
    front, origins,
    registry::{Chain, Class, Event},
    runtime::{call_value_here, Caller, Runtime},
    ws,
};

/// The HTTP routes of `runtime`, as an `axum::Router` to serve as is or to mount (`.merge`,
/// `.nest`) in an application of your own.
pub fn router(runtime: Runtime) -> Router {
    Router::new()
        .route(
            "/agents.js",
            get(|| async { file("text/javascript; charset=utf-8", JS_CLIENT) }),
        )
        .route(
            "/agents.d.ts",
            get(|| async { file("application/typescript; charset=utf-8", JS_TYPES) }),
        )
        .route("/agents/{class}", get(describe))
        .route("/agents/{class}/{name}", any(agent_root))
        .route("/agents/{class}/{name}/call/{method}", post(call))
        .route("/agents/{class}/{name}/{*rest}", any(other))
        .merge(crate::admin::routes())
        .layer(axum::middleware::from_fn_with_state(
            runtime.clone(),
            guard_origins,
        ))
        .with_state(runtime)
}

/// Every route is behind the origins check (see [`Builder::allowed_origins`]).
///
/// [`Builder::allowed_origins`]: crate::Builder::allowed_origins
async fn guard_origins(
    State(runtime): State<Runtime>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    origins::guard(&runtime.front().origins, request, |request| {
        next.run(request)
    })
    .await
}

/// The JavaScript client, `agents/js/agents.js`: one dependency-free ES module.
pub const JS_CLIENT: &str = include_str!("../js/agents.js");

/// `GET /agents.js` and `/agents.d.ts`: the JavaScript client and its types, so that a page
/// needs no build step.
fn file(content_type: &'static str, body: &'static str) -> Response {
    let headers = [
        (header::CONTENT_TYPE, content_type),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, body).into_response()
}

/// `GET /agents/{class}`: what the class offers the network, for tools and generated clients:
/// `{"class":"counter","methods":[{"name":"add","params":["by: i64"],"returns":"i64",
/// "error":"AppError"}]}` (types as written in Rust; `error` is null for a callable that cannot
/// fail). `#[callable(internal)]` methods are left out; an internal class is 404.
async fn describe(State(runtime): State<Runtime>, Path(class): Path<String>) -> Response {
    let served = match served(&runtime, &class) {
        Ok(served) => served,
        Err(refused) => return refused.into_response(),
    };
    let methods: Vec<_> = served
        .methods
        .iter()
        .filter(|m| !m.internal)
        .map(|m| {
            serde_json::json!({
                "name": m.name, "params": m.params, "returns": m.returns, "error": m.error,
            })
        })
        .collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "class": class, "methods": methods }),
    )
}

/// The JavaScript client's type declarations, `agents/js/agents.d.ts`.
pub const JS_TYPES: &str = include_str!("../js/agents.d.ts");

/// Checks the address and runs the class's `on_before_request`; then reads the body (up to the
/// message-size limit). On failure, the response to give.
async fn admit(
    runtime: &Runtime,
    key: &AgentKey,
    request: Request,
) -> Result<(Option<String>, axum::http::request::Parts, Bytes), Response> {
    let class = runtime.shared().class(key.class()).expect("checked");
    let (parts, body) = request.into_parts();
    let principal = (class.before_request)(key.name(), &parts).await?;
    let limit = runtime.config().max_message_bytes;
    let body = axum::body::to_bytes(body, limit).await.map_err(|e| {
        let message = format!("the body could not be read (the limit is {limit} bytes): {e}");
        (StatusCode::PAYLOAD_TOO_LARGE, message).into_response()
    })?;
    Ok((principal, parts, body))
}

/// `GET /agents/{class}/{name}`: a WebSocket upgrade, or else a request for `on_request`.
/// The address and the admission hook are checked before anything is woken.
async fn agent_root(
    State(runtime): State<Runtime>,
    Path((class, name)): Path<(String, String)>,
    request: Request,
) -> Response {
    match address(&runtime, &class, &name) {
        Ok(key) => root(runtime, key, request).await,
        Err(refused) => refused.into_response(),
    }
}

/// A request to the root of the agent `key` (registered): a WebSocket upgrade, handed to the
/// WebSocket wing, or else a request for `on_request`.
async fn root(runtime: Runtime, key: AgentKey, request: Request) -> Response {
    let request = match elsewhere(&runtime, &key, request).await {
        Ok(forwarded) => return forwarded,
        Err(here) => here,
    };
    let (mut parts, body) = request.into_parts();
    match WebSocketUpgrade::from_request_parts(&mut parts, &runtime).await {
        Ok(_) if parts.extensions.get::<front::Spare>().is_some() => {
            // A spare slot serves one plain request, never a socket that would keep it.
            let busy = "the server has as many connections as it allows; try again later";
            let headers = [(header::RETRY_AFTER, "1"), (header::CONNECTION, "close")];
            (StatusCode::SERVICE_UNAVAILABLE, headers, busy).into_response()
        }
        Ok(upgrade) => ws::upgrade(runtime.wing().clone(), key, parts, upgrade).await,
        Err(_) => request_here(runtime, key, Request::from_parts(parts, body)).await,
    }
}

/// Cluster mode: a request for an agent another node has goes there (see `crate::forward`);
/// else it comes back, to be served here.
async fn elsewhere(
    runtime: &Runtime,
    key: &AgentKey,
    request: Request,
) -> Result<Response, Request> {
    #[cfg(feature = "cluster")]
    return crate::forward::elsewhere(runtime, key, request).await;
    #[cfg(not(feature = "cluster"))]
    {
        let _ = (runtime, key);
        Err(request)
    }
}

async fn other(
    State(runtime): State<Runtime>,
    Path((class, name, _)): Path<(String, String, String)>,
    request: Request,
) -> Response {
    match address(&runtime, &class, &name) {
        Ok(key) => to_agent(runtime, key, request).await,
        Err(refused) => refused.into_response(),
    }
}

/// An address the network may not reach, and the status to answer.
pub(crate) struct NotServed(StatusCode, RawError);

impl IntoResponse for NotServed {
    fn into_response(self) -> Response {
        with_status(self.0, self.1)
    }
}

/// The agent `class`/`name` as the network may address it: a valid name of a registered class
/// that is not `#[agent(internal)]`; else why not (400 for an invalid name, 404 for a class
/// that is not served, the same whether it is unknown or internal).
pub(crate) fn address(runtime: &Runtime, class: &str, name: &str) -> Result<AgentKey, NotServed> {
    served(runtime, class)?;
    AgentKey::new(class, name)
        .map_err(|e| NotServed(StatusCode::BAD_REQUEST, RawError::bad_args(e)))
}

/// The registered class `class` if the network may reach it (not `#[agent(internal)]`); 404
/// otherwise, the same whether it is unknown or internal.
fn served(runtime: &Runtime, class: &str) -> Result<Class, NotServed> {
    match runtime.shared().class(class) {
        Some(c) if !c.internal => Ok(c),
        _ => {
            let e = RawError::bad_args(format!("no agent class `{class}` is served here"));
            Err(NotServed(StatusCode::NOT_FOUND, e))
        }
    }
}

/// Hands a request to the agent's `on_request`, after its `on_before_request`.
pub(crate) async fn to_agent(runtime: Runtime, key: AgentKey, request: Request) -> Response {
    match elsewhere(&runtime, &key, request).await {
        Ok(forwarded) => forwarded,
        Err(here) => request_here(runtime, key, here).await,
    }
}

/// `to_agent`, served by this node.
async fn request_here(runtime: Runtime, key: AgentKey, request: Request) -> Response {
    let (principal, parts, body) = match admit(&runtime, &key, request).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    let mut request = axum::http::Request::from_parts(parts, body);
    if let Some(p) = principal {
        request.extensions_mut().insert(Principal(p));
    }
    let (reply, response) = oneshot::channel();
    let event = Event::Request {
        request: Box::new(request),
        reply,
    };
    if let Err((e, _)) = runtime.shared().route(&key, event).await {
        return error(e.told("the agent cannot be reached"));
    }
    match response.await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => error(e),
        Err(_) => error(RawError::internal("the agent stopped before it answered")),
    }
}

async fn call(
    State(runtime): State<Runtime>,
    Path((class, name, method)): Path<(String, String, String)>,
    request: Request,
) -> Response {
    // Cluster mode: a call another node forwarded for one of its agents.
    #[cfg(feature = "cluster")]
    let request = match crate::forward::serve_call(&runtime, &class, &name, &method, request).await
    {
        Ok(served) => return served,
        Err(request) => request,
    };
    match address(&runtime, &class, &name) {
        Ok(key) => call_agent(runtime, key, method, request).await,
        Err(refused) => refused.into_response(),
    }
}

/// `POST .../call/{method}` to the agent `key` (registered).
async fn call_agent(runtime: Runtime, key: AgentKey, method: String, request: Request) -> Response {
    if let Some(refused) = not_json(request.headers(), "a call's body is a JSON array") {
        return refused;
    }
    #[cfg(feature = "cluster")]
    let request = match crate::forward::call_elsewhere(&runtime, &key, request).await {
        Ok(forwarded) => return forwarded,
        Err(here) => here,
    };
    let (principal, parts, body) = match admit(&runtime, &key, request).await {
        Ok(admitted) => admitted,
        Err(response) => return response,
    };
    // A caller's W3C trace context: the call joins its trace.
    let trace = parts
        .headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::from_traceparent);
    let args = match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(args @ serde_json::Value::Array(_)) => args,
        Ok(other) => {
            return error(RawError::bad_args(format!(
                "the body must be a JSON array of arguments, not {other}"
            )))
        }
        Err(e) if body.is_empty() => {
            return error(RawError::bad_args(format!(
                "the body must be a JSON array of arguments ({e})"
            )))
        }
        Err(e) => return error(RawError::bad_args(format!("the body is not JSON: {e}"))),
    };
    let call = OutgoingCall {
        method: method.into(),
        args: Payload::Json(args),
        timeout: None,
    };
    let mut caller = Caller::remote(principal);
    if let Some(trace) = trace {
        caller.chain = Chain::in_trace(trace);
    }
    match call_value_here(runtime.shared(), key, call, caller).await {
        Ok(Payload::Json(value)) => json(StatusCode::OK, &value),
        Ok(_) => error(RawError::internal(
            "the agent answered a JSON call in another codec",
        )),
        Err(e) => error(e),
    }
}

/// The refusal of a body that does not say it is JSON (`Content-Type: application/json`), the
/// one type of body a browser sends to another site only after asking (a CORS preflight):
/// `text/plain`, forms and bodies with no type it sends from any page. `expected` says what the
/// body is (`a call's body is a JSON array`).
pub(crate) fn not_json(headers: &axum::http::HeaderMap, expected: &str) -> Option<Response> {
    let media = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or_default().trim());
    match media {
        Some(m) if m.eq_ignore_ascii_case("application/json") => None,
        other => {
            let sent = other.map_or("no Content-Type".to_owned(), |m| format!("`{m}`"));
            let e = RawError::bad_args(format!(
                "{expected} sent with `Content-Type: application/json`, not {sent}"
            ));
            Some(with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE, e))
        }
    }
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

/// The JSON protocol's error object, with the status of its kind.
pub(crate) fn error(e: RawError) -> Response {
    with_status(status_of(e.kind), e)
}

/// The status an error of `kind` is answered with (see the table above).
pub(crate) fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadArgs => StatusCode::BAD_REQUEST,
        ErrorKind::UnknownMethod => StatusCode::NOT_FOUND,
        ErrorKind::App => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Cycle | ErrorKind::Cancelled | ErrorKind::Internal => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    }
}

/// The JSON protocol's error object, with `status`.
pub(crate) fn with_status(status: StatusCode, e: RawError) -> Response {
    json(status, &protocol::error_object(&e))
}

impl Runtime {
    /// Hands an HTTP request to the agent `A`/`name`, as if it had arrived at
    /// `/agents/{class}/{name}` followed by the request's own path: what a gateway in your own
    /// axum app does after taking its prefix off (Durable Objects' `stub.fetch(request)`).
    ///
    /// The origins check runs first (see [`Builder::allowed_origins`](crate::Builder::allowed_origins)),
    /// then the agent's `on_before_request` (or `on_before_connect`), as for any request;
    /// then the path decides: `/` or nothing with a WebSocket upgrade opens a connection to the
    /// agent, `POST /call/{method}` calls a callable (JSON arguments), anything else goes to
    /// `on_request` with the request as it is. `#[agent(internal)]` classes are reached too:
    /// the gateway is code of this process.
    ///
    /// ```no_run
    /// use agents::{axum::{extract::{Path, Request, State}, response::Response, routing::any, Router}, prelude::*};
    /// # #[derive(Default)] struct User;
    /// # impl Agent for User {}
    /// # #[agent] impl User {}
    ///
    /// /// `/api/users/{id}/...` → the agent `user`/`id`, with `/...` as its path.
    /// async fn gateway(
    ///     State(runtime): State<Runtime>,
    ///     Path((id, rest)): Path<(String, String)>,
    ///     mut request: Request,
    /// ) -> Response {
    ///     *request.uri_mut() = format!("/{rest}").parse().unwrap();
    ///     runtime.fetch::<User>(&id, request).await
    /// }
    ///
    /// # fn app(runtime: Runtime) -> Router {
    /// Router::new()
    ///     .route("/api/users/{id}/{*rest}", any(gateway))
    ///     .with_state(runtime)
    /// # }
    /// ```
    pub async fn fetch<A: AgentClass>(&self, name: &str, request: Request) -> Response {
        let key = match self.try_key::<A>(name) {
            Ok(key) => key,
            Err(e) => return error(RawError::bad_args(e)),
        };
        origins::guard(&self.front().origins, request, |request| async move {
            let path = request.uri().path().trim_start_matches('/');
            if path.is_empty() {
                return root(self.clone(), key, request).await;
            }
            match path.strip_prefix("call/") {
                Some(method) if request.method() == Method::POST && !method.contains('/') => {
                    let method = method.to_owned();
                    call_agent(self.clone(), key, method, request).await
                }
                _ => to_agent(self.clone(), key, request).await,
            }
        })
        .await
    }

    /// Answers `request` with `refusal` (a response of [`refuse`](crate::refuse)) as an
    /// admission hook's refusal is answered: a WebSocket upgrade is accepted and closed at once
    /// with the code and reason, which a browser can read; an HTTP request gets the response.
    /// For a gateway that refuses before it would [`fetch`](Runtime::fetch).
    pub async fn refuse(&self, request: Request, refusal: Response) -> Response {
        let (mut parts, _) = request.into_parts();
        match WebSocketUpgrade::from_request_parts(&mut parts, self).await {
            Ok(upgrade) => ws::refused(upgrade, refusal),
            Err(_) => refusal,
        }
    }

    /// Serves [`router`] on `addr` until the process ends.
    pub async fn serve(&self, addr: SocketAddr) -> Result<(), Error> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Io {
                path: addr.to_string().into(),
                source,
            })?;
        self.serve_on(listener).await
    }

    /// Serves [`router`] on a listener you bound (for example to port 0, to learn the port).
    ///
    /// It bounds what clients can hold: see [`Builder::max_connections`] and
    /// [`Builder::header_timeout`] (serving [`router`] with a server of your own, set its limits
    /// there).
    ///
    /// [`Builder::max_connections`]: crate::Builder::max_connections
    /// [`Builder::header_timeout`]: crate::Builder::header_timeout
    pub async fn serve_on(&self, listener: tokio::net::TcpListener) -> Result<(), Error> {
        front::serve(router(self.clone()), listener, self.front()).await;
        Ok(())
    }
}
