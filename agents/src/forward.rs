//! Cluster mode's routing (feature `cluster`): any node accepts a request for any agent, and
//! one for an agent another live node has goes to that node as it came. An HTTP request is
//! relayed with its answer; a WebSocket is piped frame for frame, so its close (1012 when the
//! agent moves) reaches the client, who connects again, through any node. The owner serves it
//! as a request of its own (its admission hooks run there). A forwarded request is marked and
//! never forwarded again: the node it reaches serves it, or answers 503 naming where the agent
//! is (and the node that forwarded it asks PostgreSQL again next time).
//!
//! Calls an agent makes to another (typed calls, durable deliveries) go the same way, to the
//! call route of the node that has the callee, marked with the cluster's secret (they may
//! reach internal classes and methods, as calls in one process may), with the waiting agents
//! and the trace context. Their arguments travel in postcard (a typed client encodes them so
//! for an agent that is not live here) or JSON. The runtime's router must be served at the
//! root of the address a node advertises.

use std::{collections::HashMap, sync::Arc};

use agents_client::{
    protocol::WireError, trace::TraceContext, ErrorKind, OutgoingCall, Payload, RawError,
};
use axum::{
    body::{Body, Bytes},
    extract::{ws::WebSocketUpgrade, FromRequestParts, OriginalUri, Request},
    http::{header, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
};

use crate::{
    address::AgentKey,
    lock::lock,
    registry::{Chain, Shared},
    runtime::{call_value_here, Caller, Runtime},
};

/// The header that marks a forwarded request.
const FORWARDED: &str = "agents-forwarded";

/// Forwards `request` to the node that has `key`, if another live node has it and the
/// request did not come forwarded; else gives it back, to be served here.
pub(crate) async fn elsewhere(
    runtime: &Runtime,
    key: &AgentKey,
    request: Request,
) -> Result<Response, Request> {
    if request.headers().contains_key(FORWARDED) {
        return Err(request);
    }
    // A spare slot serves one plain request here, never a socket (`server::root` says so).
    if request.extensions().get::<crate::front::Spare>().is_some() {
        return Err(request);
    }
    let Some((addr, stream)) = owner(runtime.shared(), key).await else {
        return Err(request);
    };
    let (mut parts, body) = request.into_parts();
    let target = target(&parts);
    let response = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => websocket(runtime, stream, &addr, &target, parts, upgrade).await,
        Err(_) => http(stream, &target, Request::from_parts(parts, body)).await,
    };
    forget_if_refused(runtime.shared(), key, response.status());
    Ok(response)
}

/// The path a request came with (a gateway may have rewritten it for `fetch`).
fn target(parts: &axum::http::request::Parts) -> String {
    let uri = parts
        .extensions
        .get::<OriginalUri>()
        .map_or(&parts.uri, |o| &o.0);
    uri.path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.to_string())
}

/// `elsewhere` for a request to the call route, whose answer is one JSON value: its body is
/// read first, and it goes over an idle connection to the owner (or a new one), which is kept
/// for the next once the answer is read whole.
pub(crate) async fn call_elsewhere(
    runtime: &Runtime,
    key: &AgentKey,
    request: Request,
) -> Result<Response, Request> {
    let shared = runtime.shared();
    if request.headers().contains_key(FORWARDED) {
        return Err(request);
    }
    let Some(addr) = elsewhere_at(shared, key).await else {
        return Err(request);
    };
    let (parts, body) = request.into_parts();
    let limit = runtime.config().max_message_bytes;
    let body = match axum::body::to_bytes(body, limit).await {
        Ok(body) => body,
        Err(e) => {
            let e = RawError::bad_args(format!("the body could not be read: {e}"));
            return Ok(crate::server::with_status(StatusCode::PAYLOAD_TOO_LARGE, e));
        }
    };
    let mut outgoing = Request::post(target(&parts));
    for (name, value) in &parts.headers {
        // The connection's own (this one is kept), and the body's length (hyper says it).
        let own = [
            header::CONNECTION,
            header::CONTENT_LENGTH,
            header::TRANSFER_ENCODING,
        ];
        if !own.contains(name) {
            outgoing = outgoing.header(name, value);
        }
    }
    let mut outgoing = match outgoing.body(Body::from(body.clone())) {
        Ok(outgoing) => outgoing,
        Err(e) => return Ok(bad_gateway(e)),
    };
    mark(outgoing.headers_mut());
    let answer = match exchange(shared, key, &addr, outgoing).await {
        None => return Err(Request::from_parts(parts, Body::from(body))),
        Some(Ok(answer)) => answer.map(Body::from),
        Some(Err(e)) => bad_gateway(e),
    };
    forget_if_refused(shared, key, answer.status());
    Ok(answer)
}

/// A connection to the live node other than this one that has `key`, and its address; `None`:
/// the agent is served here (it is live here, nobody has it, or its node is gone).
async fn owner(shared: &Shared, key: &AgentKey) -> Option<(Arc<str>, tokio::net::TcpStream)> {
    let addr = elsewhere_at(shared, key).await?;
    let stream = connect(shared, key, &addr).await?;
    Some((addr, stream))
}

/// The address of the live node other than this one that has `key`; `None`: it is live here,
/// or nobody has it.
async fn elsewhere_at(shared: &Shared, key: &AgentKey) -> Option<Arc<str>> {
    let node = shared.cluster.as_ref()?;
    // Live here, it is this node's (unless it was lost while live, and its instance is leaving).
    if shared.is_live(key) && !node.has_lost(key) {
        return None;
    }
    node.locate(key).await
}

/// A connection to `key`'s node at `addr`; `None` if its node is gone (forgotten: the next
/// request asks again, and the activation here takes the agent).
async fn connect(shared: &Shared, key: &AgentKey, addr: &str) -> Option<tokio::net::TcpStream> {
    match tokio::net::TcpStream::connect(addr).await {
        Ok(stream) => {
            let _ = stream.set_nodelay(true);
            Some(stream)
        }
        Err(e) => {
            tracing::debug!("cluster: {key}'s node at {addr} cannot be reached: {e}");
            forget(shared, key);
            None
        }
    }
}

/// Forgets where `key` was found: a request there failed, or was refused.
fn forget(shared: &Shared, key: &AgentKey) {
    if let Some(node) = &shared.cluster {
        node.forget(key);
    }
}

/// Forgets where `key` was found if the answer from there was 503 (that node no longer has it,
/// or is overloaded: ask again) or 502 (from here: it did not answer).
fn forget_if_refused(shared: &Shared, key: &AgentKey, status: StatusCode) {
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::BAD_GATEWAY {
        forget(shared, key);
    }
}

/// Relays an HTTP request to the node at the other end of `stream`, and its answer back.
async fn http(stream: tokio::net::TcpStream, target: &str, mut request: Request) -> Response {
    match target.parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(e) => return bad_gateway(e),
    }
    mark(request.headers_mut());
    match send(stream, request).await {
        Ok(response) => response.map(Body::new),
        Err(e) => bad_gateway(e),
    }
}

/// Sends `request` over `stream` (HTTP/1.1, one request): the answer, as it streams in.
async fn send(
    stream: tokio::net::TcpStream,
    request: Request,
) -> Result<axum::http::Response<hyper::body::Incoming>, hyper::Error> {
    handshake(stream).await?.send_request(request).await
}

/// One end of an HTTP/1.1 connection to another node.
type Sender = hyper::client::conn::http1::SendRequest<Body>;

/// An HTTP/1.1 connection over `stream` (its task spawned).
async fn handshake(stream: tokio::net::TcpStream) -> Result<Sender, hyper::Error> {
    let io = hyper_util::rt::TokioIo::new(stream);
    let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// Connections to other nodes left idle by the calls forwarded over them, by address (a call's
/// answer is read whole before its connection goes back): at most [`MAX_IDLE`] a node, and a
/// node that cannot be reached loses its entry.
static IDLE: std::sync::LazyLock<std::sync::Mutex<HashMap<Arc<str>, Vec<Sender>>>> =
    std::sync::LazyLock::new(Default::default);

/// The most idle connections kept to one node.
const MAX_IDLE: usize = 16;

/// Sends a forwarded call to `key`'s node at `addr` over an idle connection (or a new one), and
/// reads its answer whole; `None` if the node cannot be reached (the call was not sent).
async fn exchange(
    shared: &Shared,
    key: &AgentKey,
    addr: &Arc<str>,
    mut request: Request,
) -> Option<Result<axum::http::Response<Bytes>, RawError>> {
    loop {
        let idle = lock(&IDLE).get_mut(addr).and_then(Vec::pop);
        let (mut sender, reused) = match idle {
            Some(sender) => (sender, true),
            None => {
                let Some(stream) = connect(shared, key, addr).await else {
                    lock(&IDLE).remove(addr);
                    return None;
                };
                match handshake(stream).await {
                    Ok(sender) => (sender, false),
                    Err(e) => return Some(Err(unanswered(e))),
                }
            }
        };
        match sender.try_send_request(request).await {
            Ok(response) => {
                let (parts, body) = response.into_parts();
                let body = match axum::body::to_bytes(Body::new(body), usize::MAX).await {
                    Ok(body) => body,
                    Err(e) => return Some(Err(unanswered(e))),
                };
                let mut idle = lock(&IDLE);
                let kept = idle.entry(addr.clone()).or_default();
                if kept.len() < MAX_IDLE && !sender.is_closed() {
                    kept.push(sender);
                }
                return Some(Ok(axum::http::Response::from_parts(parts, body)));
            }
            Err(mut e) => match e.take_message() {
                // An idle connection had closed before the request left: again, on another.
                Some(unsent) if reused => request = unsent,
                _ => return Some(Err(unanswered(e.into_error()))),
            },
        }
    }
}

/// A call a node forwards for one of its agents (a typed call, a durable delivery) carries the
/// cluster's secret: it may reach internal classes and methods, as calls in one process may.
const NODE: &str = "agents-node";
/// The agents waiting on a forwarded call, the outermost first (a cycle across nodes is found
/// as one in a process is): a JSON array of `[class, name]`.
const CHAIN: &str = "agents-chain";
/// How long the caller of a forwarded call waits, in ms.
const TIMEOUT: &str = "agents-timeout-ms";
/// A forwarded call's arguments and answer in postcard (else JSON).
const POSTCARD: &str = "application/x-postcard";

/// Cluster mode: sends `call` to the node that has `key`, if another live node has it (and
/// its arguments are encoded: an agent here chose them so); `None`: it is served here.
pub(crate) async fn call(
    shared: &Arc<Shared>,
    key: &AgentKey,
    call: &OutgoingCall,
    chain: &Chain,
) -> Option<Result<Payload, RawError>> {
    let node = shared.cluster.as_ref()?;
    if matches!(call.args, Payload::Value(_)) || chain.contains(key) {
        return None; // (a cycle is told as it is in a process)
    }
    let addr = elsewhere_at(shared, key).await?;
    let secret = node.secret().await.ok()?;
    let timeout = call.timeout.unwrap_or(shared.config.call_timeout);
    let (content_type, body) = match &call.args {
        Payload::Json(value) => ("application/json", value.to_string().into_bytes()),
        Payload::Postcard(bytes) => (POSTCARD, bytes.clone()),
        Payload::Value(_) => return None,
    };
    let waiting: Vec<(&str, &str)> = chain.keys().iter().map(|k| (k.class(), k.name())).collect();
    let mut request = Request::post(format!(
        "/agents/{}/{}/call/{}",
        key.class(),
        segment(key.name()),
        segment(&call.method)
    ))
    .header(header::HOST, &*addr)
    .header(header::CONTENT_TYPE, content_type)
    .header(NODE, secret)
    .header(CHAIN, serde_json::to_string(&waiting).unwrap_or_default())
    .header(TIMEOUT, timeout.as_millis().to_string());
    if let Some(trace) = chain.trace() {
        request = request.header("traceparent", trace.traceparent());
    }
    let request = match request.body(Body::from(body)) {
        Ok(request) => request,
        Err(e) => return Some(Err(RawError::internal(e))),
    };
    let answer = match tokio::time::timeout(timeout, exchange(shared, key, &addr, request)).await {
        Ok(answer) => answer?,
        Err(_) => Err(RawError::new(
            ErrorKind::Timeout,
            format!("no reply from {key} (at {addr}) before the deadline"),
        )),
    };
    Some(answer.and_then(|answer| {
        forget_if_refused(shared, key, answer.status());
        decode(answer.status(), answer.body(), content_type == POSTCARD)
    }))
}

/// A forwarded call's answer: its result, or its error object.
fn decode(status: StatusCode, body: &[u8], postcard: bool) -> Result<Payload, RawError> {
    let malformed = |e: &dyn std::fmt::Display| {
        RawError::internal(format!(
            "the agent's node answered {status} with a malformed body: {e}"
        ))
    };
    match (status.is_success(), postcard) {
        (true, true) => Ok(Payload::Postcard(body.to_vec())),
        (true, false) => serde_json::from_slice(body)
            .map(Payload::Json)
            .map_err(|e| malformed(&e)),
        (false, true) => Err(serde_json::from_slice::<WireError<Vec<u8>>>(body)
            .map_err(|e| malformed(&e))?
            .into()),
        (false, false) => Err(serde_json::from_slice::<WireError<serde_json::Value>>(body)
            .map_err(|e| malformed(&e))?
            .into()),
    }
}

fn unanswered(e: impl std::fmt::Display) -> RawError {
    let message = format!("the node that has the agent did not answer: {e}");
    RawError::new(ErrorKind::Overloaded, message)
}

/// `text` as one segment of a path: every byte but the unreserved ones percent-encoded.
fn segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(byte as char)
            }
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Serves a call another node forwarded for one of its agents (marked with the cluster's
/// secret), as a call made in this process: no admission hook, internal classes and methods
/// reachable, the waiting agents and the trace carried over. Gives back any other request.
pub(crate) async fn serve_call(
    runtime: &Runtime,
    class: &str,
    name: &str,
    method: &str,
    request: Request,
) -> Result<Response, Request> {
    let shared = runtime.shared();
    let (Some(node), Some(sent)) = (&shared.cluster, request.headers().get(NODE)) else {
        return Err(request);
    };
    let refused = |status, e: RawError| crate::server::with_status(status, e);
    match node.secret().await {
        Ok(secret) if same(sent.as_bytes(), secret.as_bytes()) => {}
        Ok(_) => {
            let e = RawError::bad_args("a forwarded call without the cluster's secret");
            return Ok(refused(StatusCode::FORBIDDEN, e));
        }
        Err(e) => return Ok(crate::server::error(e.told("checking a forwarded call"))),
    }
    let key = match AgentKey::new(class, name) {
        Ok(key) if shared.class(class).is_some() => key,
        Ok(_) => {
            let e = RawError::bad_args(format!("no agent class `{class}` is registered here"));
            return Ok(refused(StatusCode::NOT_FOUND, e));
        }
        Err(e) => return Ok(refused(StatusCode::BAD_REQUEST, RawError::bad_args(e))),
    };
    let headers = request.headers();
    let postcard = headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes() == POSTCARD.as_bytes());
    let trace = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(TraceContext::from_traceparent);
    let waiting: Vec<(String, String)> = headers
        .get(CHAIN)
        .and_then(|v| serde_json::from_slice(v.as_bytes()).ok())
        .unwrap_or_default();
    let waiting = waiting
        .iter()
        .filter_map(|(class, name)| AgentKey::new(class, name).ok());
    let timeout = headers
        .get(TIMEOUT)
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .map(std::time::Duration::from_millis);
    let chain = Chain::of(waiting, trace);
    let limit = runtime.config().max_message_bytes;
    let body = match axum::body::to_bytes(request.into_body(), limit).await {
        Ok(body) => body,
        Err(e) => {
            return Ok(refused(
                StatusCode::PAYLOAD_TOO_LARGE,
                RawError::bad_args(e),
            ))
        }
    };
    let args = if postcard {
        Payload::Postcard(body.to_vec())
    } else {
        match serde_json::from_slice(&body) {
            Ok(args) => Payload::Json(args),
            Err(e) => return Ok(refused(StatusCode::BAD_REQUEST, RawError::bad_args(e))),
        }
    };
    let call = OutgoingCall {
        method: method.to_owned().into(),
        args,
        timeout,
    };
    let result = call_value_here(shared, key, call, Caller::local(chain)).await;
    Ok(match result {
        Ok(Payload::Postcard(bytes)) => ([(header::CONTENT_TYPE, POSTCARD)], bytes).into_response(),
        Ok(Payload::Json(value)) => (
            [(header::CONTENT_TYPE, "application/json")],
            value.to_string(),
        )
            .into_response(),
        Ok(Payload::Value(_)) => crate::server::error(RawError::internal(
            "the agent answered a forwarded call in no codec",
        )),
        Err(e) if postcard => {
            let status = crate::server::status_of(e.kind);
            let wire = WireError::<Vec<u8>>::from(&e);
            let body = serde_json::to_string(&wire).unwrap_or_default();
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Err(e) => crate::server::error(e),
    })
}

/// Whether `a` and `b` are equal, in a time that does not tell where they differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Connects a WebSocket to the node at the other end of `stream` with the client's headers,
/// then accepts the client's with the subprotocol that node chose and pipes the two. A refusal
/// there is the client's answer.
async fn websocket(
    runtime: &Runtime,
    stream: tokio::net::TcpStream,
    addr: &str,
    target: &str,
    parts: axum::http::request::Parts,
    upgrade: WebSocketUpgrade,
) -> Response {
    use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};
    let mut request = match format!("ws://{addr}{target}").into_client_request() {
        Ok(request) => request,
        Err(e) => return bad_gateway(e),
    };
    let headers = request.headers_mut();
    for (name, value) in &parts.headers {
        // Its own handshake's, made for this connection.
        let own = [
            header::HOST,
            header::CONNECTION,
            header::UPGRADE,
            header::SEC_WEBSOCKET_KEY,
            header::SEC_WEBSOCKET_VERSION,
            header::SEC_WEBSOCKET_EXTENSIONS,
            header::SEC_WEBSOCKET_PROTOCOL,
        ];
        if !own.contains(name) {
            headers.append(name, value.clone());
        }
    }
    // Only the subprotocols the runtime speaks (asked for one it does not, the handshake would
    // fail at this end).
    let asked = parts.headers.get_all(header::SEC_WEBSOCKET_PROTOCOL).iter();
    let ours: Vec<&str> = asked
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(str::trim))
        .filter(|p| {
            [
                agents_client::protocol::JSON_PROTOCOL,
                agents_client::protocol::POSTCARD_PROTOCOL,
            ]
            .contains(p)
        })
        .collect();
    if let Ok(value) = HeaderValue::from_str(&ours.join(", ")) {
        if !ours.is_empty() {
            headers.insert(header::SEC_WEBSOCKET_PROTOCOL, value);
        }
    }
    mark(headers);
    let max = runtime.config().max_message_bytes;
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max));
    let (upstream, answer) =
        match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
            Ok(connected) => connected,
            Err(tungstenite::Error::Http(refusal)) => {
                let (parts, body) = refusal.into_parts();
                return Response::from_parts(parts, Body::from(body.unwrap_or_default()));
            }
            Err(e) => return bad_gateway(e),
        };
    let mut upgrade = upgrade.max_message_size(max).max_frame_size(max);
    if let Some(protocol) = answer.headers().get(header::SEC_WEBSOCKET_PROTOCOL) {
        upgrade.set_selected_protocol(protocol.clone());
    }
    // The socket holds what the front put in the request (its connection's slot) while open.
    let held = parts.extensions;
    upgrade.on_upgrade(move |socket| {
        tokio::spawn(pipe(socket, upstream, held));
        std::future::ready(())
    })
}

/// Carries frames both ways until either side closes (its close frame passes on).
async fn pipe(
    client: axum::extract::ws::WebSocket,
    upstream: tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    held: axum::http::Extensions,
) {
    use axum::extract::ws::{CloseFrame, Message as A};
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{
        protocol::{frame::coding::CloseCode, CloseFrame as TsCloseFrame},
        Message as T, Utf8Bytes,
    };
    let (mut to_client, mut from_client) = client.split();
    let (mut to_owner, mut from_owner) = upstream.split();
    let up = async {
        while let Some(Ok(message)) = from_client.next().await {
            let message = match message {
                A::Text(text) => match Utf8Bytes::try_from(axum::body::Bytes::from(text)) {
                    Ok(text) => T::Text(text),
                    Err(_) => break,
                },
                A::Binary(data) => T::Binary(data),
                A::Close(frame) => T::Close(frame.map(|f| TsCloseFrame {
                    code: CloseCode::from(f.code),
                    reason: Utf8Bytes::from(f.reason.as_str()),
                })),
                // Each side keeps its own connection alive.
                A::Ping(_) | A::Pong(_) => continue,
            };
            let closing = matches!(message, T::Close(_));
            if to_owner.send(message).await.is_err() || closing {
                break;
            }
        }
        let _ = to_owner.close().await;
    };
    let down = async {
        let mut closed = false;
        while let Some(Ok(message)) = from_owner.next().await {
            let message = match message {
                T::Text(text) => {
                    match axum::extract::ws::Utf8Bytes::try_from(axum::body::Bytes::from(text)) {
                        Ok(text) => A::Text(text),
                        Err(_) => break,
                    }
                }
                T::Binary(data) => A::Binary(data),
                T::Close(frame) => A::Close(frame.map(|f| CloseFrame {
                    code: f.code.into(),
                    reason: f.reason.as_str().into(),
                })),
                T::Ping(_) | T::Pong(_) | T::Frame(_) => continue,
            };
            closed = matches!(message, A::Close(_));
            if to_client.send(message).await.is_err() || closed {
                break;
            }
        }
        if !closed {
            // The owner's node went away without a word: its agents move, and the client
            // connects again (1012, as a node that lost an agent says).
            let frame = CloseFrame {
                code: crate::port::SERVICE_RESTART,
                reason: "the agent's node went away".into(),
            };
            let _ = to_client.send(A::Close(Some(frame))).await;
        }
        let _ = to_client.close().await;
    };
    // When one direction ends, the other has little left to carry: both end.
    tokio::select! {
        () = up => {}
        () = down => {}
    }
    drop(held);
}

/// Marks a request as forwarded.
fn mark(headers: &mut axum::http::HeaderMap) {
    headers.insert(FORWARDED, HeaderValue::from_static("1"));
}

/// 502: the owner's node could not be reached or answered nothing.
fn bad_gateway(e: impl std::fmt::Display) -> Response {
    let message = format!("the node that has this agent did not answer: {e}");
    let e = agents_client::RawError::new(agents_client::ErrorKind::Overloaded, message);
    crate::server::with_status(StatusCode::BAD_GATEWAY, e)
}
