//! The HTTP front: how [`Runtime::serve`](crate::Runtime::serve) accepts connections and what
//! it bounds.
//!
//! Every connection takes a slot under `max_connections`, held as long as it lives (a WebSocket
//! holds its slot until it closes). An eighth of the slots is kept spare: a connection that
//! finds the others taken (by sockets, or a crowd of handshakes) has its request's head looked
//! at, without reading it, and gets a spare slot for that one request if it is a plain one (a
//! health check, a call); a WebSocket handshake, or a connection that finds no spare slot either,
//! is answered `503` with `Retry-After` and closed at once. So a flood costs a descriptor for a
//! moment, not for as long as it lasts, and the server keeps answering. At most [`TRIAGE`]
//! connections are looked at or turned away at once; past that, new ones wait in the kernel's
//! backlog. A client gets `header_timeout` to send a request's head, and a kept-alive
//! connection as long to start its next request: slow and idle clients give their slots back.
//! When the process has no descriptor left to accept with, the loop waits a moment instead of
//! spinning.

use std::{sync::Arc, time::Duration};

use axum::{extract::Request, http::header, Router};
use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore},
};
use tower::ServiceExt;

use crate::origins::Origins;

/// The front's settings.
#[derive(Debug, Clone)]
pub(crate) struct Front {
    /// Which other origins browsers may call from.
    pub origins: Origins,
    /// The most connections held at once; 0: derived from the descriptor limit at `build`.
    pub max_connections: usize,
    /// How long a request's head may take to arrive, and a kept-alive connection may idle.
    pub header_timeout: Duration,
    /// Who may use the admin routes; `None`: they are off.
    pub admin: Option<crate::admin::AdminHook>,
}

impl Default for Front {
    fn default() -> Self {
        Front {
            origins: Origins::default(),
            max_connections: 0,
            header_timeout: Duration::from_secs(10),
            admin: None,
        }
    }
}

/// A connection's slot under the limit: the request's extensions carry it, so that a WebSocket
/// upgraded from the connection keeps it while it lives.
#[derive(Clone)]
struct Slot(#[allow(dead_code)] Arc<OwnedSemaphorePermit>);

/// Marks a request on a spare slot: it may not become a WebSocket.
#[derive(Clone, Copy)]
pub(crate) struct Spare;

/// How many connections past the main slots may be looked at, or told that the server is
/// busy, at once; past that, new connections wait in the kernel's backlog (no descriptor)
/// until one is done.
const TRIAGE: usize = 64;

/// Serves `app` on `listener` within `front`'s limits, until the process ends.
pub(crate) async fn serve(app: Router, listener: TcpListener, front: &Front) {
    let spare = (front.max_connections / 8).max(1);
    let slots = Arc::new(Semaphore::new(front.max_connections - spare));
    let spares = Arc::new(Semaphore::new(spare));
    let triage = Arc::new(Semaphore::new(TRIAGE));
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(front.header_timeout);
    let mut once = http.clone();
    once.keep_alive(false);
    loop {
        let Ok(looking) = triage.clone().acquire_owned().await else {
            return;
        };
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or a connection that died before it was accepted): the
                // ones in use are given back as their clients finish or time out.
                tracing::warn!("accepting a connection: {e}");
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            drop(looking);
            tokio::spawn(connection(&http, app.clone(), stream, slot, None));
        } else {
            // A plain request may have a spare slot; a handshake is told to come back.
            let (once, app, spares) = (once.clone(), app.clone(), spares.clone());
            tokio::spawn(async move {
                if is_upgrade(&stream).await == Some(false) {
                    if let Ok(slot) = spares.try_acquire_owned() {
                        drop(looking);
                        return connection(&once, app, stream, slot, Some(Spare)).await;
                    }
                }
                turn_away(stream).await;
                drop(looking);
            });
        }
    }
}

/// Serves one connection on `slot`; a request on a spare slot is marked so.
fn connection(
    http: &http1::Builder,
    app: Router,
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    spare: Option<Spare>,
) -> impl std::future::Future<Output = ()> {
    let slot = Slot(Arc::new(slot));
    let service = app
        .clone()
        .map_request(move |mut request: Request<Incoming>| {
            // Only an upgrade needs them (a socket keeps the slot; a spare one refuses it): a
            // plain request allocates no extensions for them.
            if request.headers().contains_key(header::UPGRADE) {
                request.extensions_mut().insert(slot.clone());
                if let Some(spare) = spare {
                    request.extensions_mut().insert(spare);
                }
            }
            request
        });
    let connection = http
        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(service))
        .with_upgrades();
    async move {
        if let Err(e) = connection.await {
            tracing::debug!("an HTTP connection ended: {e}");
        }
    }
}

/// How long a connection past the main slots has to send its request's head: a client sends it
/// as soon as it connects; one that does not is turned away before it holds up the others.
const HEAD_WAIT: Duration = Duration::from_millis(250);

/// Whether the request waiting on `stream` is a WebSocket handshake, from its head, looked at
/// without reading it (`None`: no whole head came within `HEAD_WAIT`).
async fn is_upgrade(stream: &TcpStream) -> Option<bool> {
    let mut head = [0; 4096];
    let look = async {
        loop {
            let n = stream.peek(&mut head).await.ok()?;
            let seen = String::from_utf8_lossy(&head[..n]).to_ascii_lowercase();
            if seen.contains("\r\n\r\n") || n == head.len() || n == 0 {
                let upgrade = seen.lines().any(|line| {
                    line.strip_prefix("upgrade:")
                        .is_some_and(|value| value.contains("websocket"))
                });
                return Some(upgrade);
            }
            tokio::time::sleep(Duration::from_millis(5)).await; // more of the head is coming
        }
    };
    tokio::time::timeout(HEAD_WAIT, look).await.ok().flatten()
}

/// Answers a connection over the limit with 503 and closes it. The request is read (briefly)
/// after the answer, so that closing does not reset the connection before the client reads it.
async fn turn_away(mut stream: TcpStream) {
    const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain\r\nContent-Length: 33\r\nConnection: close\r\n\r\nthe server has too many clients\r\n";
    let answer = async {
        stream.write_all(BUSY).await?;
        stream.shutdown().await?;
        let mut sink = [0; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_millis(200), answer).await;
}
