//! The admin routes, off unless [`Builder::admin`](crate::Builder::admin) turns them on, each
//! behind that hook as agent routes are behind their admission hooks:
//! - `GET /admin/metrics`: the metrics, in Prometheus's text format;
//! - `GET /admin/status`: a page showing live agents, calls per second, latency percentiles,
//!   schedules due soon and dead letters (it reads `status.json` every second, passing on its
//!   own query string, so a `?token=..` the hook checks works for both);
//! - `GET /admin/status.json`: what the page shows;
//! - `POST /admin/backup` with `{"dest": "/an/absolute/dir"}` (`application/json`): an online
//!   backup ([`Runtime::backup`]) into that directory of the server's machine (new or empty),
//!   answered with `{"dest":..,"agents":..,"bytes":..,"ms":..}` once it is fsynced (`agents
//!   backup URL DEST`), or with the error object of calls (`{"kind":..,"message":..}`).

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Json, Router,
};
use serde_json::json;

use agents_client::RawError;

use crate::{
    agent::{Admission, RequestHead},
    runtime::Runtime,
    server,
    storage::blocking,
};

/// Decides whether a request may use the admin routes.
#[derive(Clone)]
pub(crate) struct AdminHook(pub Arc<dyn Fn(&RequestHead) -> Admission + Send + Sync>);

impl std::fmt::Debug for AdminHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminHook")
    }
}

/// The admin routes (answering 404 while the runtime has no admin hook).
pub(crate) fn routes() -> Router<Runtime> {
    Router::new()
        .route("/admin/metrics", get(metrics))
        .route("/admin/status", get(page))
        .route("/admin/status.json", get(status))
        .route("/admin/backup", post(backup))
}

/// Runs the admin hook on `request`: the answer if it may not pass.
fn refused(runtime: &Runtime, request: Request) -> Option<Response> {
    let Some(hook) = &runtime.front().admin else {
        return Some(StatusCode::NOT_FOUND.into_response());
    };
    let (head, _) = request.into_parts();
    (hook.0)(&head).err()
}

async fn metrics(State(runtime): State<Runtime>, request: Request) -> Response {
    if let Some(refused) = refused(&runtime, request) {
        return refused;
    }
    let shared = runtime.shared();
    shared
        .metrics
        .connections
        .set(runtime.connection_count() as i64);
    let text = shared.metrics.render();
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], text).into_response()
}

/// How many schedules due soon and agents with dead letters the status lists.
const LISTED: usize = 20;

async fn status(State(runtime): State<Runtime>, request: Request) -> Response {
    if let Some(refused) = refused(&runtime, request) {
        return refused;
    }
    let shared = runtime.shared().clone();
    let now = shared.config.clock.now_ms();
    let due_soon: Vec<_> = shared
        .alarms
        .first(LISTED)
        .into_iter()
        .map(|(at, key)| json!({"agent": key.to_string(), "in_s": (at as f64 - now as f64) / 1000.0}))
        .collect();
    let catalog = shared.clone();
    let dead = blocking(move || {
        catalog.catalog.flush(false);
        catalog.catalog.with_dead_letters(LISTED)
    })
    .await;
    let dead_letters: Vec<_> = dead
        .unwrap_or_default()
        .into_iter()
        .map(|(key, count)| json!({"agent": key, "dead_letters": count}))
        .collect();
    let classes: Vec<_> = shared
        .metrics
        .calls_by_class()
        .into_iter()
        .map(|c| {
            json!({"class": c.class, "calls": c.calls, "failed": c.failed,
                   "p50_ms": c.p50.map(|s| s * 1000.0), "p99_ms": c.p99.map(|s| s * 1000.0)})
        })
        .collect();
    Json(json!({
        "live": runtime.live_count(),
        "connections": runtime.connection_count(),
        "pending_alarms": runtime.pending_alarms(),
        "classes": classes,
        "due_soon": due_soon,
        "dead_letters": dead_letters,
    }))
    .into_response()
}

/// The body of `POST /admin/backup`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupTo {
    /// Where the backup goes, on the server's machine: an absolute path.
    dest: std::path::PathBuf,
}

/// What `POST /admin/backup`'s body is.
const BACKUP_BODY: &str = "the body is `{\"dest\": \"/an/absolute/dir\"}`";

async fn backup(State(runtime): State<Runtime>, request: Request) -> Response {
    // A cross-site form cannot send JSON without asking first (CORS); told only to those the
    // hook lets in.
    let wrong_type = server::not_json(request.headers(), BACKUP_BODY);
    let (head, body) = request.into_parts();
    if let Some(refused) = refused(&runtime, Request::from_parts(head, Default::default())) {
        return refused;
    }
    if let Some(wrong_type) = wrong_type {
        return wrong_type;
    }
    let bad = |why: String| server::error(RawError::bad_args(why));
    let Ok(body) = axum::body::to_bytes(body, 64 * 1024).await else {
        return bad("the body cannot be read, or is larger than 64 KiB".into());
    };
    let dest = match serde_json::from_slice::<BackupTo>(&body) {
        Ok(BackupTo { dest }) if dest.is_absolute() => dest,
        Ok(BackupTo { dest }) => {
            return bad(format!(
                "`dest` must be an absolute path on the server's machine, not {}",
                dest.display()
            ))
        }
        Err(e) => return bad(format!("{BACKUP_BODY}: {e}")),
    };
    let started = std::time::Instant::now();
    match runtime.backup(&dest).await {
        Ok(report) => Json(json!({
            "dest": dest,
            "agents": report.agents,
            "bytes": report.bytes,
            "ms": started.elapsed().as_millis() as u64,
        }))
        .into_response(),
        Err(e) => {
            // The operator asked: the detail is theirs.
            tracing::error!("backup into {} failed: {e}", dest.display());
            let why = format!("the backup into {} failed: {e}", dest.display());
            server::error(RawError::internal(why))
        }
    }
}

async fn page(State(runtime): State<Runtime>, request: Request) -> Response {
    if let Some(refused) = refused(&runtime, request) {
        return refused;
    }
    let headers = [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-cache"),
    ];
    (headers, PAGE).into_response()
}

/// The status page: one file, no dependencies.
const PAGE: &str = include_str!("admin/status.html");
