//! The wire protocol of agent connections.
//!
//! A WebSocket to `GET /agents/{class}/{name}` picks a subprotocol with the
//! `Sec-WebSocket-Protocol` header:
//! - `agents.v1.json`: one JSON object per text frame, described here exactly (browsers, other
//!   languages, command-line tools);
//! - `agents.v1.postcard`: the same frames as the Rust enums [`PostcardClientFrame`] and
//!   [`PostcardServerFrame`], one per binary frame (Rust clients: `WsTransport`);
//! - no subprotocol: every data frame, text or binary, goes as is to the agent's `on_message`,
//!   and what the agent sends arrives as is (an event as its JSON in a text frame). No identity,
//!   replies or state frames.
//!
//! ## `agents.v1.json`
//! Every frame is a JSON object whose field `type` comes first.
//!
//! Client → server:
//! - `{"type":"call","id":7,"method":"add","args":[5],"deadline_ms":30000}`: calls a callable.
//!   `id` is any unsigned integer chosen by the client, unique among its calls in flight;
//!   `args` is the positional argument array (`[]` for none); `deadline_ms` (optional) is
//!   relative: the call fails with `timeout` if no reply is ready by then (for a streaming
//!   callable: if its stream has not started by then; the chunks may take longer).
//! - `{"type":"cancel","id":7}`: gives up on call 7. If it has not run yet it never will; its
//!   reply is `cancelled` either way.
//! - `{"type":"message","data":<any JSON>}`: a message for the agent's `on_message`, which
//!   receives a string `data` as its text (as if sent on a raw socket) and any other `data` as
//!   its JSON text.
//! - `{"type":"credit","id":7,"chunks":16}`: flow control for streaming call 7 (optional).
//!   Without it, chunks come as fast as the client reads the socket. With it, the server sends
//!   a chunk only while the call has credit left, each chunk using one, and waits for more.
//!   Send the first credit just *before* the call (it is kept for the call: a connection holds
//!   early credit for up to 1,024 ids, and ignores more), then more as chunks are consumed. A
//!   first credit sent after the call applies from when it arrives.
//!
//! Server → client:
//! - `{"type":"identity","class":"counter","name":"bob","conn":"<id>"}`: the first frame, sent
//!   before the agent's `on_connect` has run. Broadcasts reach the connection once
//!   `on_connect` has admitted it, and what the client sends is read from then on, so the reply
//!   to a first call tells the client it is admitted.
//! - `{"type":"state","state":<state>}`: the agent's shared state, right after `identity` if
//!   the agent has one, and again on every change.
//! - `{"type":"reply","id":7,"ok":<result>}`, or
//!   `{"type":"reply","id":7,"err":{"kind":"<kind>","message":"..","data":<typed app error>}}`
//!   with `kind` one of `app`, `unknown_method`, `bad_args`, `timeout`, `cancelled`,
//!   `overloaded`, `cycle`, `internal`; `data` only for `app`.
//! - `{"type":"chunk","id":7,"data":<chunk>}`: one item of a streaming callable's output, in
//!   order; any number of them come before the call's final reply, which is then
//!   `{"type":"reply","id":7,"ok":null}` (or an error that ends the stream early). A `cancel`
//!   stops the stream.
//! - `{"type":"event","data":<event>}`: an event the agent sent to this connection or
//!   broadcast. Events a call sends arrive before the call's reply.
//! - `{"type":"error","kind":"<kind>","message":"..","data":..}`: the same error object as a
//!   call's `err`, for what is not a call: a frame that could not be understood at all (not
//!   JSON, an unknown `type`, a binary frame: `bad_args`), or a `message` whose `on_message`
//!   failed (`app` with the handler's error in `data`, or `internal` if it panicked). The
//!   connection stays open.
//!
//! Every frame the server sends leaves only once the writes of the event that produced it are
//! durable; a failed event sends nothing (except its error).
//!
//! Close codes the server uses: 1008 when the client does not read its frames fast enough (or
//! `on_connect` refused it, with the reason), 1009 for a message over the size limit, 1000
//! after the idle limit, 1001 when the server shuts down, and whatever the agent chose with
//! `conn.close(code, reason)`.

use serde::Deserialize;
use serde_json::{json, Value};

use crate::{Payload, RawError};

/// The JSON subprotocol's name.
pub const JSON_PROTOCOL: &str = "agents.v1.json";
/// The postcard subprotocol's name.
pub const POSTCARD_PROTOCOL: &str = "agents.v1.postcard";

/// A frame from client to server, as parsed from `agents.v1.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Call a callable.
    Call {
        /// Chosen by the client; echoed in the reply.
        id: u64,
        /// The callable's wire name.
        method: String,
        /// Positional arguments.
        #[serde(default = "no_args")]
        args: Value,
        /// Relative deadline in milliseconds.
        #[serde(default)]
        deadline_ms: Option<u64>,
    },
    /// Give up on a call.
    Cancel {
        /// The call's id.
        id: u64,
    },
    /// A message for `on_message`.
    Message {
        /// Any JSON.
        data: Value,
    },
    /// Let a stream send `chunks` more chunks (flow control).
    Credit {
        /// The streaming call's id.
        id: u64,
        /// How many more chunks the client can take.
        chunks: u32,
    },
}

fn no_args() -> Value {
    Value::Array(Vec::new())
}

impl ClientFrame {
    /// Parses one text frame.
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| format!("not a frame of {JSON_PROTOCOL}: {e}"))
    }
}

/// The error object of the JSON protocol (and of HTTP errors):
/// `{"kind":"..","message":"..","data":..}`, `data` only when there is some.
pub fn error_object(e: &RawError) -> Value {
    let mut object = json!({ "kind": e.kind.as_str(), "message": e.message });
    if let Some(data) = &e.data {
        object["data"] = match data {
            Payload::Json(v) => v.clone(),
            Payload::Postcard(_) | Payload::Value(_) => Value::Null,
        };
    }
    object
}

/// `{"type":"identity",..}`
pub fn identity_frame(class: &str, name: &str, conn: &str) -> String {
    json!({ "type": "identity", "class": class, "name": name, "conn": conn }).to_string()
}

/// `{"type":"reply","id":..,"ok":..}` or `{"type":"reply","id":..,"err":{..}}`
pub fn reply_frame(id: u64, result: &Result<Payload, RawError>) -> String {
    match result {
        Ok(Payload::Json(v)) => json!({ "type": "reply", "id": id, "ok": v }).to_string(),
        Ok(_) => {
            let e = RawError::internal("a JSON call was answered in another codec");
            json!({ "type": "reply", "id": id, "err": error_object(&e) }).to_string()
        }
        Err(e) => json!({ "type": "reply", "id": id, "err": error_object(e) }).to_string(),
    }
}

/// `{"type":"chunk","id":..,"data":..}`
pub fn chunk_frame(id: u64, data: &Payload) -> String {
    match data {
        Payload::Json(v) => json!({ "type": "chunk", "id": id, "data": v }).to_string(),
        _ => {
            let e = RawError::internal("a JSON call streamed another codec");
            json!({ "type": "reply", "id": id, "err": error_object(&e) }).to_string()
        }
    }
}

/// `{"type":"event","data":..}`, from the JSON of the event.
pub fn event_frame(data_json: &str) -> String {
    format!(r#"{{"type":"event","data":{data_json}}}"#)
}

/// `{"type":"state","state":..}`, from the JSON of the state.
pub fn state_frame(state_json: &str) -> String {
    format!(r#"{{"type":"state","state":{state_json}}}"#)
}

/// `{"type":"error","kind":..,"message":..,"data":..}`: the error object of a call error, in a
/// frame of its own.
pub fn error_frame(error: &RawError) -> String {
    let mut frame = json!({ "type": "error" });
    if let (Value::Object(frame), Value::Object(object)) = (&mut frame, error_object(error)) {
        frame.extend(object);
    }
    frame.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn frames_have_the_documented_shapes() {
        let call = ClientFrame::from_json(
            r#"{"type":"call","id":7,"method":"add","args":[5],"deadline_ms":30000}"#,
        )
        .unwrap();
        assert_eq!(
            call,
            ClientFrame::Call {
                id: 7,
                method: "add".into(),
                args: json!([5]),
                deadline_ms: Some(30000)
            }
        );
        let bare = ClientFrame::from_json(r#"{"type":"call","id":1,"method":"get"}"#).unwrap();
        assert_eq!(
            bare,
            ClientFrame::Call {
                id: 1,
                method: "get".into(),
                args: json!([]),
                deadline_ms: None
            }
        );
        assert_eq!(
            ClientFrame::from_json(r#"{"type":"cancel","id":7}"#).unwrap(),
            ClientFrame::Cancel { id: 7 }
        );
        assert_eq!(
            ClientFrame::from_json(r#"{"type":"credit","id":7,"chunks":16}"#).unwrap(),
            ClientFrame::Credit { id: 7, chunks: 16 }
        );
        assert!(ClientFrame::from_json(r#"{"type":"credit","id":7,"chunks":-1}"#).is_err());
        // Postcard: the variants added later come last, so the earlier ones keep their tags.
        let cancel = to_postcard(&PostcardClientFrame::Cancel { id: 7 });
        assert_eq!(cancel[0], 1);
        let credit = to_postcard(&PostcardClientFrame::Credit { id: 7, chunks: 16 });
        assert_eq!(credit[0], 3);
        assert!(ClientFrame::from_json(r#"{"type":"teleport"}"#).is_err());
        assert!(ClientFrame::from_json(r#"{"type":"call","id":-1,"method":"x"}"#).is_err());
        assert!(ClientFrame::from_json("[1]").is_err());

        // `type` comes first in every frame, as the protocol promises.
        assert_eq!(
            reply_frame(7, &Ok(Payload::Json(json!(5)))),
            r#"{"type":"reply","id":7,"ok":5}"#
        );
        assert_eq!(
            error_frame(&RawError::bad_args("x")),
            r#"{"type":"error","kind":"bad_args","message":"x"}"#
        );
        let ok: Value =
            serde_json::from_str(&reply_frame(7, &Ok(Payload::Json(json!(5))))).unwrap();
        assert_eq!(ok, json!({"type": "reply", "id": 7, "ok": 5}));
        let err = RawError {
            kind: ErrorKind::App,
            message: "no".into(),
            data: Some(Payload::Json(json!({"Refused": 1}))),
        };
        let err: Value = serde_json::from_str(&reply_frame(7, &Err(err))).unwrap();
        assert_eq!(
            err,
            json!({"type": "reply", "id": 7, "err": {"kind": "app", "message": "no", "data": {"Refused": 1}}})
        );
        assert!(identity_frame("c", "n", "1").starts_with(r#"{"type":"identity""#));
        assert_eq!(
            chunk_frame(7, &Payload::Json(json!("tok"))),
            r#"{"type":"chunk","id":7,"data":"tok"}"#
        );
    }
}

/// A frame from client to server in `agents.v1.postcard` (one per binary frame).
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub enum PostcardClientFrame {
    /// Call a callable with postcard-encoded arguments (a tuple).
    Call {
        /// Chosen by the client; echoed in the reply.
        id: u64,
        /// The callable's wire name.
        method: String,
        /// The arguments as a postcard tuple.
        args: Vec<u8>,
        /// Relative deadline in milliseconds.
        deadline_ms: Option<u64>,
    },
    /// Give up on a call.
    Cancel {
        /// The call's id.
        id: u64,
    },
    /// A message for the agent's `on_message` (which receives it as a binary message).
    Message {
        /// Whatever the agent expects.
        data: Vec<u8>,
    },
    /// Let a stream send `chunks` more chunks (flow control); added last, so that the other
    /// variants keep their discriminants.
    Credit {
        /// The streaming call's id.
        id: u64,
        /// How many more chunks the client can take.
        chunks: u32,
    },
}

/// A frame from server to client in `agents.v1.postcard`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub enum PostcardServerFrame {
    /// The first frame.
    Identity {
        /// The agent's class.
        class: String,
        /// The agent's name.
        name: String,
        /// This connection's id.
        conn: String,
    },
    /// The outcome of a call: postcard result bytes, or an error.
    Reply {
        /// The call's id.
        id: u64,
        /// The result or the error.
        result: Result<Vec<u8>, WireError>,
    },
    /// A frame that could not be understood, or an `on_message` that failed (older servers;
    /// this one sends [`Failed`](PostcardServerFrame::Failed)).
    Error {
        /// Why.
        message: String,
    },
    /// An event the agent sent or broadcast: the agent's event type, postcard-encoded.
    Event {
        /// The encoded event.
        data: Vec<u8>,
    },
    /// The agent's shared state, postcard-encoded: after `Identity`, and on every change.
    State {
        /// The encoded state.
        state: Vec<u8>,
    },
    /// One item of a streaming call's output, before its final `Reply` (whose result is then
    /// `()`, postcard-encoded: no bytes).
    Chunk {
        /// The call's id.
        id: u64,
        /// The encoded item.
        data: Vec<u8>,
    },
    /// A frame that could not be understood (`bad_args`), or an `on_message` that failed (with
    /// the application's error, as a call's); added last, so that the other variants keep
    /// their discriminants.
    Failed {
        /// What went wrong.
        error: WireError,
    },
}

/// An error in a postcard reply.
#[derive(Debug, Clone, PartialEq, serde::Serialize, Deserialize)]
pub struct WireError {
    /// What went wrong.
    pub kind: crate::ErrorKind,
    /// For people.
    pub message: String,
    /// The typed application error, postcard-encoded.
    pub data: Option<Vec<u8>>,
}

impl From<&RawError> for WireError {
    fn from(e: &RawError) -> Self {
        let data = match &e.data {
            Some(Payload::Postcard(bytes)) => Some(bytes.clone()),
            _ => None,
        };
        WireError {
            kind: e.kind,
            message: e.message.clone(),
            data,
        }
    }
}

impl From<WireError> for RawError {
    fn from(e: WireError) -> Self {
        RawError {
            kind: e.kind,
            message: e.message,
            data: e.data.map(Payload::Postcard),
        }
    }
}

impl PostcardServerFrame {
    /// An `internal` error frame saying `why`.
    pub fn failed(why: &str) -> Self {
        PostcardServerFrame::Failed {
            error: WireError::from(&RawError::internal(why)),
        }
    }

    /// The chunk frame for `data` (which is in postcard).
    pub fn chunk(id: u64, data: &Payload) -> Self {
        match data {
            Payload::Postcard(bytes) => PostcardServerFrame::Chunk {
                id,
                data: bytes.clone(),
            },
            _ => PostcardServerFrame::reply(
                id,
                &Err(RawError::internal("a postcard call streamed another codec")),
            ),
        }
    }

    /// The reply frame for `result` (which is in postcard).
    pub fn reply(id: u64, result: &Result<Payload, RawError>) -> Self {
        let result = match result {
            Ok(Payload::Postcard(bytes)) => Ok(bytes.clone()),
            Ok(_) => Err(WireError::from(&RawError::internal(
                "a postcard call was answered in another codec",
            ))),
            Err(e) => Err(WireError::from(e)),
        };
        PostcardServerFrame::Reply { id, result }
    }
}

/// Encodes a postcard frame.
pub fn to_postcard<T: serde::Serialize>(frame: &T) -> Vec<u8> {
    postcard::to_stdvec(frame).expect("frames always encode")
}
