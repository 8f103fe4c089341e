//! Serving agents over HTTP (axum): `POST /agents/{class}/{name}/call/{method}`, and
//! WebSockets on `GET /agents/{class}/{name}` (see [`connection`](crate::connection)).
//!
//! The body is the JSON array of arguments (`[5]`, or `[]` for none); the answer is `200` with
//! the result as JSON, or the error object of the JSON protocol
//! (`{"kind":"bad_args","message":"..","data":..}`) with a status that fits its kind:
//!
//! | kind | status |
//! |---|---|
//! | `bad_args` (also malformed JSON, a body that is not an array, an invalid name) | 400 |
//! | `unknown_method` | 404 |
//! | `app` (the callable's typed error, in `data`) | 422 |
//! | `overloaded` | 503 |
//! | `timeout` | 504 |
//! | `cycle`, `cancelled`, `internal` | 500 |
//!
//! ```sh
//! curl -X POST localhost:8080/agents/counter/bob/call/add -d '[5]'
//! ```

use std::net::SocketAddr;

use agents_client::{protocol, ErrorKind, Payload, RawError};
use axum::{
    body::Bytes,
    extract::{Path, State},
    http::{header, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};

use crate::{connection, error::Error, runtime::Runtime};

/// The HTTP routes of `runtime`, as an `axum::Router` to serve as is or to mount (`.merge`,
/// `.nest`) in an application of your own.
pub fn router(runtime: Runtime) -> Router {
    Router::new()
        .route("/agents/{class}/{name}", get(connection::upgrade))
        .route("/agents/{class}/{name}/call/{method}", post(call))
        .with_state(runtime)
}

async fn call(
    State(runtime): State<Runtime>,
    Path((class, name, method)): Path<(String, String, String)>,
    body: Bytes,
) -> Response {
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
    match runtime
        .call(&class, &name, &method, Payload::Json(args))
        .await
    {
        Ok(Payload::Json(value)) => json(StatusCode::OK, &value),
        Ok(Payload::Postcard(_)) => error(RawError::internal(
            "the agent answered a JSON call in postcard",
        )),
        Err(e) => error(e),
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
fn error(e: RawError) -> Response {
    let status = match e.kind {
        ErrorKind::BadArgs => StatusCode::BAD_REQUEST,
        ErrorKind::UnknownMethod => StatusCode::NOT_FOUND,
        ErrorKind::App => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorKind::Cycle | ErrorKind::Cancelled | ErrorKind::Internal => {
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    json(status, &protocol::error_object(&e))
}

impl Runtime {
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
    pub async fn serve_on(&self, listener: tokio::net::TcpListener) -> Result<(), Error> {
        let addr = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        axum::serve(listener, router(self.clone()))
            .await
            .map_err(|source| Error::Io {
                path: addr.into(),
                source,
            })
    }
}
