//! Cluster mode's routing (feature `cluster`): any node accepts a request for any agent, and
//! one for an agent another live node has goes to that node as it came. An HTTP request is
//! relayed with its answer; a WebSocket is piped frame for frame, so its close (1012 when the
//! agent moves) reaches the client, who connects again, through any node. The owner serves it
//! as a request of its own (its admission hooks run there). A forwarded request is marked and
//! never forwarded again: the node it reaches serves it, or answers 503 naming where the agent
//! is (and the node that forwarded it asks PostgreSQL again next time).

use axum::{
    body::Body,
    extract::{ws::WebSocketUpgrade, FromRequestParts, OriginalUri, Request},
    http::{header, HeaderValue, StatusCode},
    response::Response,
};

use crate::{address::AgentKey, runtime::Runtime};

/// The header that marks a forwarded request.
const FORWARDED: &str = "agents-forwarded";

/// Forwards `request` to the node that has `key`, if another live node has it and the
/// request did not come forwarded; else gives it back, to be served here.
pub(crate) async fn elsewhere(
    runtime: &Runtime,
    key: &AgentKey,
    request: Request,
) -> Result<Response, Request> {
    let shared = runtime.shared();
    let Some(node) = shared.cluster.as_ref() else {
        return Err(request);
    };
    // Live here, it is this node's (unless it was lost while live, and its instance is leaving).
    let here = shared.is_live(key) && !node.has_lost(key);
    if here || request.headers().contains_key(FORWARDED) {
        return Err(request);
    }
    // A spare slot serves one plain request here, never a socket (`server::root` says so).
    if request.extensions().get::<crate::front::Spare>().is_some() {
        return Err(request);
    }
    let Some(addr) = node.locate(key).await else {
        return Err(request);
    };
    let stream = match tokio::net::TcpStream::connect(&*addr).await {
        Ok(stream) => stream,
        Err(e) => {
            // Its node is gone (or going): ask again, and let the activation take the agent.
            tracing::debug!("cluster: {key}'s node at {addr} cannot be reached: {e}");
            node.forget(key);
            return Err(request);
        }
    };
    let _ = stream.set_nodelay(true);
    let (mut parts, body) = request.into_parts();
    // The path the request came with (a gateway may have rewritten it for `fetch`).
    let target = parts
        .extensions
        .get::<OriginalUri>()
        .map_or(&parts.uri, |o| &o.0)
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.to_string());
    let response = match WebSocketUpgrade::from_request_parts(&mut parts, &()).await {
        Ok(upgrade) => websocket(runtime, stream, &addr, &target, parts, upgrade).await,
        Err(_) => http(stream, &target, Request::from_parts(parts, body)).await,
    };
    if response.status() == StatusCode::SERVICE_UNAVAILABLE
        || response.status() == StatusCode::BAD_GATEWAY
    {
        node.forget(key);
    }
    Ok(response)
}

/// Relays an HTTP request to the node at the other end of `stream`, and its answer back.
async fn http(stream: tokio::net::TcpStream, target: &str, mut request: Request) -> Response {
    let io = hyper_util::rt::TokioIo::new(stream);
    let (mut sender, connection) = match hyper::client::conn::http1::handshake(io).await {
        Ok(handshake) => handshake,
        Err(e) => return bad_gateway(e),
    };
    tokio::spawn(connection);
    match target.parse() {
        Ok(uri) => *request.uri_mut() = uri,
        Err(e) => return bad_gateway(e),
    }
    mark(request.headers_mut());
    match sender.send_request(request).await {
        Ok(response) => response.map(Body::new),
        Err(e) => bad_gateway(e),
    }
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
