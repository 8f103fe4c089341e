//! The wire protocol of agent connections.
//!
//! A WebSocket to `GET /agents/{class}/{name}` picks a subprotocol with the
//! `Sec-WebSocket-Protocol` header:
//! - `agents.v1.json`: one JSON object per text frame, described here exactly (browsers, other
//!   languages, command-line tools);
//! - `agents.v1.postcard`: the same frames, [`ClientFrame`] and [`ServerFrame`] with their
//!   payloads as bytes, in postcard, one per binary frame (Rust clients: `WsTransport`);
//! - no subprotocol: every data frame, text or binary, goes as is to the agent's `on_message`,
//!   and what the agent sends arrives as is (an event as its JSON in a text frame). No identity,
//!   replies or state frames.
//!
//! ## One definition, two encodings
//! [`ClientFrame`] and [`ServerFrame`] define the frames of both subprotocols, generic over how
//! a payload travels: [`Value`] in `agents.v1.json`, postcard bytes in `agents.v1.postcard`.
//! Postcard encodes the enums as they are (a variant by its position: new variants come last,
//! and the enums are `#[non_exhaustive]`); JSON writes a frame as an object with the variant's
//! name in `type` (see `to_json` and `from_json`), plus the two shapes JSON makes nicer: a
//! reply's result as `ok` or `err`, and a failure as an `error` frame holding the error object's
//! fields.
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
//!   A call may carry the caller's W3C trace context, `"traceparent":"00-<trace>-<span>-01"`:
//!   the agent's event joins that trace (a malformed one is ignored).
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
//!   `on_connect` has admitted it. What the client sends is read at once and runs after
//!   `on_connect` (never, if it refuses the connection, which is then closed), and a reply
//!   leaves after the admission, so the reply to a first call tells the client it is admitted.
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
//! `on_connect` refused it, with the reason), 1009 for a message over the size limit, 1007 for a
//! text frame that is not UTF-8, 1000 after the idle limit, 1001 when the server shuts down, and
//! whatever the agent chose with `conn.close(code, reason)`.

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::{ErrorKind, Payload, RawError};

/// The JSON subprotocol's name.
pub const JSON_PROTOCOL: &str = "agents.v1.json";
/// The postcard subprotocol's name.
pub const POSTCARD_PROTOCOL: &str = "agents.v1.postcard";

/// A frame from client to server; `B` is how a payload travels ([`Value`] in
/// `agents.v1.json`, postcard bytes in `agents.v1.postcard`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
#[non_exhaustive]
pub enum ClientFrame<B> {
    /// Call a callable.
    Call {
        /// Chosen by the client; echoed in the reply.
        id: u64,
        /// The callable's wire name.
        method: String,
        /// The positional arguments: a JSON array, or a postcard tuple (JSON: `[]` if left out).
        args: B,
        /// Relative deadline in milliseconds.
        #[serde(default)]
        deadline_ms: Option<u64>,
    },
    /// Give up on a call.
    Cancel {
        /// The call's id.
        id: u64,
    },
    /// A message for the agent's `on_message`: any JSON (a string arrives as its text, anything
    /// else as its JSON text), or bytes (arriving as a binary message).
    Message {
        /// What the agent expects.
        data: B,
    },
    /// Let a stream send `chunks` more chunks (flow control); added last, so that the other
    /// variants keep their postcard tags.
    Credit {
        /// The streaming call's id.
        id: u64,
        /// How many more chunks the client can take.
        chunks: u32,
    },
    /// A call that belongs to a trace: [`Call`](ClientFrame::Call) with the caller's W3C
    /// `traceparent`. JSON: a `call` frame with a `traceparent` field. Added last, so that the
    /// other variants keep their postcard tags.
    TracedCall {
        /// Chosen by the client; echoed in the reply.
        id: u64,
        /// The callable's wire name.
        method: String,
        /// The positional arguments, as in `Call`.
        args: B,
        /// Relative deadline in milliseconds.
        #[serde(default)]
        deadline_ms: Option<u64>,
        /// `00-<trace id>-<the caller's span id>-<flags>` (see
        /// [`TraceContext`](crate::trace::TraceContext)); one the server cannot read is ignored.
        traceparent: String,
    },
}

/// A frame of `agents.v1.postcard` from client to server.
pub type PostcardClientFrame = ClientFrame<Vec<u8>>;

/// A frame from server to client; `B` as in [`ClientFrame`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ServerFrame<B> {
    /// The first frame.
    Identity {
        /// The agent's class.
        class: String,
        /// The agent's name.
        name: String,
        /// This connection's id.
        conn: String,
    },
    /// The outcome of a call (JSON: `ok` or `err`). A streaming call's final reply is `()`:
    /// `null`, or no bytes.
    Reply {
        /// The call's id.
        id: u64,
        /// The result or the error.
        result: Result<B, WireError<B>>,
    },
    /// A failure with a message only: what older servers sent over postcard (this one sends
    /// [`Failed`](ServerFrame::Failed)); JSON reads it as an `internal` error.
    Error {
        /// Why.
        message: String,
    },
    /// An event the agent sent or broadcast.
    Event {
        /// The event.
        data: B,
    },
    /// The agent's shared state: after `Identity`, and on every change.
    State {
        /// The state.
        state: B,
    },
    /// One item of a streaming call's output, before its final `Reply`.
    Chunk {
        /// The call's id.
        id: u64,
        /// The item.
        data: B,
    },
    /// A frame that could not be understood (`bad_args`), or an `on_message` that failed (with
    /// the application's error, as a call's). JSON: an `error` frame with the error object's
    /// fields. Added last, so that the other variants keep their postcard tags.
    Failed {
        /// What went wrong.
        error: WireError<B>,
    },
}

/// A frame of `agents.v1.postcard` from server to client.
pub type PostcardServerFrame = ServerFrame<Vec<u8>>;

/// An error as it travels: `{"kind":"..","message":"..","data":..}` in JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireError<B> {
    /// What went wrong (JSON: `internal` if left out).
    #[serde(default = "internal")]
    pub kind: ErrorKind,
    /// For people.
    pub message: String,
    /// The typed application error (`app` only).
    #[serde(default = "none")]
    pub data: Option<B>,
}

fn internal() -> ErrorKind {
    ErrorKind::Internal
}

fn none<B>() -> Option<B> {
    None
}

/// A payload type of the frames: how a [`Payload`] travels in one subprotocol.
pub trait Body: Sized {
    /// The payload, if it is in this encoding.
    fn from_payload(payload: &Payload) -> Option<Self>;
    /// The payload this is.
    fn into_payload(self) -> Payload;
}

impl Body for Value {
    fn from_payload(payload: &Payload) -> Option<Self> {
        match payload {
            Payload::Json(v) => Some(v.clone()),
            _ => None,
        }
    }

    fn into_payload(self) -> Payload {
        Payload::Json(self)
    }
}

impl Body for Vec<u8> {
    fn from_payload(payload: &Payload) -> Option<Self> {
        match payload {
            Payload::Postcard(bytes) => Some(bytes.clone()),
            _ => None,
        }
    }

    fn into_payload(self) -> Payload {
        Payload::Postcard(self)
    }
}

impl<B: Body> From<&RawError> for WireError<B> {
    fn from(e: &RawError) -> Self {
        WireError {
            kind: e.kind,
            message: e.message.clone(),
            data: e.data.as_ref().and_then(B::from_payload),
        }
    }
}

impl<B: Body> From<WireError<B>> for RawError {
    fn from(e: WireError<B>) -> Self {
        RawError {
            kind: e.kind,
            message: e.message,
            data: e.data.map(B::into_payload),
        }
    }
}

impl<B: Body> ServerFrame<B> {
    /// An `internal` failure saying `why`.
    pub fn failed(why: &str) -> Self {
        ServerFrame::Failed {
            error: WireError::from(&RawError::internal(why)),
        }
    }

    /// The reply frame for `result` (a result in another encoding is an `internal` error).
    pub fn reply(id: u64, result: &Result<Payload, RawError>) -> Self {
        let result = match result {
            Ok(payload) => B::from_payload(payload).ok_or_else(|| {
                WireError::from(&RawError::internal(
                    "the call was answered in another codec than its connection's",
                ))
            }),
            Err(e) => Err(WireError::from(e)),
        };
        ServerFrame::Reply { id, result }
    }

    /// The chunk frame for `data` (in another encoding: an `internal` error as the reply).
    pub fn chunk(id: u64, data: &Payload) -> Self {
        match B::from_payload(data) {
            Some(data) => ServerFrame::Chunk { id, data },
            None => {
                let e = RawError::internal("a call streamed another codec than its connection's");
                ServerFrame::reply(id, &Err(e))
            }
        }
    }
}

impl ClientFrame<Value> {
    /// Parses one text frame of `agents.v1.json`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let why = |e: String| format!("not a frame of {JSON_PROTOCOL}: {e}");
        let (mut kind, mut fields) = untag(text).map_err(why)?;
        if kind == "call" {
            if !fields.contains_key("args") {
                fields.insert("args".into(), Value::Array(Vec::new()));
            }
            if fields.contains_key("traceparent") {
                kind = "traced_call".into();
            }
        }
        retag(kind, fields).map_err(why)
    }

    /// The text frame of `agents.v1.json`.
    pub fn to_json(&self) -> String {
        let mut frame = tag(self);
        if let ClientFrame::TracedCall { .. } = self {
            frame.insert("type".into(), "call".into());
        }
        Value::Object(frame).to_string()
    }
}

impl ServerFrame<Value> {
    /// Parses one text frame of `agents.v1.json`.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let (mut kind, mut fields) = untag(text)?;
        match kind.as_str() {
            "reply" => {
                let result = match fields.remove("err") {
                    Some(err) => json!({ "Err": err }),
                    None => json!({ "Ok": fields.remove("ok").unwrap_or(Value::Null) }),
                };
                fields.insert("result".into(), result);
            }
            "error" => {
                kind = "failed".into();
                fields = Map::from_iter([("error".to_owned(), Value::Object(fields))]);
            }
            _ => {}
        }
        retag(kind, fields)
    }

    /// The text frame of `agents.v1.json`.
    pub fn to_json(&self) -> String {
        let mut frame = tag(self);
        match self {
            ServerFrame::Reply { result, .. } => {
                let (field, variant) = if result.is_ok() {
                    ("ok", "Ok")
                } else {
                    ("err", "Err")
                };
                let value = match frame.shift_remove("result") {
                    Some(Value::Object(mut tagged)) => tagged.remove(variant),
                    _ => None,
                };
                frame.insert(field.into(), without_null_data(value.unwrap_or_default()));
            }
            ServerFrame::Failed { .. } => {
                frame.insert("type".into(), "error".into());
                if let Some(Value::Object(error)) =
                    frame.shift_remove("error").map(without_null_data)
                {
                    frame.extend(error);
                }
            }
            ServerFrame::Error { .. } => {
                frame.insert("kind".into(), "internal".into());
            }
            _ => {}
        }
        Value::Object(frame).to_string()
    }
}

/// `frame` in the JSON subprotocol's shape, `{"type":"<variant>", ..its fields}` (serde writes
/// an enum's variant as `{"<variant>":{..}}`).
fn tag<T: Serialize>(frame: &T) -> Map<String, Value> {
    let mut object = Map::new();
    if let Ok(Value::Object(outer)) = serde_json::to_value(frame) {
        for (variant, fields) in outer {
            object.insert("type".into(), Value::String(variant));
            if let Value::Object(fields) = fields {
                object.extend(fields);
            }
        }
    }
    object
}

/// A JSON frame's variant (its `type`) and its other fields.
fn untag(text: &str) -> Result<(String, Map<String, Value>), String> {
    let mut object: Map<String, Value> = serde_json::from_str(text).map_err(|e| e.to_string())?;
    match object.remove("type") {
        Some(Value::String(variant)) => Ok((variant, object)),
        Some(other) => Err(format!("`type` must be a string, not {other}")),
        None => Err("missing field `type`".into()),
    }
}

/// The frame `variant` with `fields`, read as serde reads an enum's variant.
fn retag<T: DeserializeOwned>(variant: String, fields: Map<String, Value>) -> Result<T, String> {
    let external = Value::Object(Map::from_iter([(variant, Value::Object(fields))]));
    serde_json::from_value(external).map_err(|e| e.to_string())
}

/// An error object without `"data": null` (JSON leaves `data` out when there is none).
fn without_null_data(mut error: Value) -> Value {
    if let Value::Object(fields) = &mut error {
        if fields.get("data") == Some(&Value::Null) {
            fields.shift_remove("data");
        }
    }
    error
}

/// The error object of the JSON protocol (and of HTTP errors):
/// `{"kind":"..","message":"..","data":..}`, `data` only when there is some.
pub fn error_object(e: &RawError) -> Value {
    without_null_data(serde_json::to_value(WireError::<Value>::from(e)).unwrap_or_default())
}

/// `{"type":"identity",..}`
pub fn identity_frame(class: &str, name: &str, conn: &str) -> String {
    ServerFrame::<Value>::Identity {
        class: class.to_owned(),
        name: name.to_owned(),
        conn: conn.to_owned(),
    }
    .to_json()
}

/// `{"type":"reply","id":..,"ok":..}` or `{"type":"reply","id":..,"err":{..}}`
pub fn reply_frame(id: u64, result: &Result<Payload, RawError>) -> String {
    ServerFrame::<Value>::reply(id, result).to_json()
}

/// `{"type":"chunk","id":..,"data":..}`
pub fn chunk_frame(id: u64, data: &Payload) -> String {
    ServerFrame::<Value>::chunk(id, data).to_json()
}

/// `{"type":"event","data":..}`, from the JSON of the event: spliced, as a broadcast encodes
/// its event once for every socket (the same text as `ServerFrame::Event`'s `to_json`).
pub fn event_frame(data_json: &str) -> String {
    format!(r#"{{"type":"event","data":{data_json}}}"#)
}

/// `{"type":"state","state":..}`, from the JSON of the state (spliced, as `event_frame`).
pub fn state_frame(state_json: &str) -> String {
    format!(r#"{{"type":"state","state":{state_json}}}"#)
}

/// `{"type":"error","kind":..,"message":..,"data":..}`: the error object of a call error, in a
/// frame of its own.
pub fn error_frame(error: &RawError) -> String {
    ServerFrame::<Value>::Failed {
        error: error.into(),
    }
    .to_json()
}

/// Encodes a postcard frame.
pub fn to_postcard<T: Serialize>(frame: &T) -> Vec<u8> {
    postcard::to_stdvec(frame).expect("frames always encode")
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
        // A traced call is a `call` with a `traceparent`, both ways.
        let traced = r#"{"type":"call","id":7,"method":"add","args":[5],"deadline_ms":null,"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#;
        let frame = ClientFrame::from_json(traced).unwrap();
        assert!(
            matches!(&frame, ClientFrame::TracedCall { id: 7, traceparent, .. } if traceparent.starts_with("00-4bf9"))
        );
        assert_eq!(frame.to_json(), traced);
        let traced = PostcardClientFrame::TracedCall {
            id: 7,
            method: "add".into(),
            args: vec![5],
            deadline_ms: None,
            traceparent: String::new(),
        };
        assert_eq!(to_postcard(&traced)[0], 4);
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

    /// Every frame, with payload `p` and error data `d`.
    fn every_server_frame<B: Clone>(p: B, d: B) -> Vec<ServerFrame<B>> {
        let error = |data| WireError {
            kind: ErrorKind::App,
            message: "no".into(),
            data,
        };
        vec![
            ServerFrame::Identity {
                class: "c".into(),
                name: "n".into(),
                conn: "1".into(),
            },
            ServerFrame::Reply {
                id: 1,
                result: Ok(p.clone()),
            },
            ServerFrame::Reply {
                id: 2,
                result: Err(error(Some(d.clone()))),
            },
            ServerFrame::Reply {
                id: 3,
                result: Err(error(None)),
            },
            ServerFrame::Event { data: p.clone() },
            ServerFrame::State { state: p.clone() },
            ServerFrame::Chunk {
                id: 4,
                data: p.clone(),
            },
            ServerFrame::Failed {
                error: error(Some(d)),
            },
        ]
    }

    #[test]
    fn one_definition_reads_back_in_both_encodings() {
        for frame in every_server_frame(json!({"n": 5}), json!("why")) {
            let text = frame.to_json();
            assert!(text.starts_with(r#"{"type":""#), "{text}");
            assert_eq!(ServerFrame::from_json(&text), Ok(frame), "{text}");
        }
        for frame in every_server_frame(vec![1, 2, 3], vec![9]) {
            let bytes = to_postcard(&frame);
            assert_eq!(
                postcard::from_bytes::<PostcardServerFrame>(&bytes),
                Ok(frame)
            );
        }
        let calls = |args| ClientFrame::Call {
            id: 7,
            method: "add".into(),
            args,
            deadline_ms: Some(5),
        };
        // Numbers read back exactly, however many digits they came with (serde_json's
        // `float_roundtrip`; found by the json_frame fuzz target).
        let text = r#"{"type":"call","id":1,"method":"add","args":[5555555555455555555555555555555555555555555555555]}"#;
        let frame = ClientFrame::<serde_json::Value>::from_json(text).unwrap();
        assert_eq!(ClientFrame::from_json(&frame.to_json()), Ok(frame));
        for frame in [
            calls(json!([1])),
            ClientFrame::Cancel { id: 7 },
            ClientFrame::Message { data: json!("hi") },
            ClientFrame::Credit { id: 7, chunks: 2 },
        ] {
            assert_eq!(ClientFrame::from_json(&frame.to_json()), Ok(frame));
        }
        let frame = PostcardClientFrame::Call {
            id: 7,
            method: "add".into(),
            args: vec![1, 2],
            deadline_ms: None,
        };
        assert_eq!(postcard::from_bytes(&to_postcard(&frame)), Ok(frame));
        // The JSON shapes the protocol documents, from the one definition.
        assert_eq!(
            ServerFrame::<Value>::from_json(r#"{"type":"error","message":"x"}"#),
            Ok(ServerFrame::Failed {
                error: WireError {
                    kind: ErrorKind::Internal,
                    message: "x".into(),
                    data: None
                }
            })
        );
        assert_eq!(
            ServerFrame::<Value>::from_json(r#"{"type":"reply","id":1}"#),
            Ok(ServerFrame::Reply {
                id: 1,
                result: Ok(Value::Null)
            })
        );
        // The spliced fast paths write what the definition writes.
        let event = ServerFrame::Event {
            data: json!([1, "a"]),
        };
        assert_eq!(event_frame(r#"[1,"a"]"#), event.to_json());
        let state = ServerFrame::State {
            state: json!({"k": 1}),
        };
        assert_eq!(state_frame(r#"{"k":1}"#), state.to_json());
        // What is not a frame says why.
        for (text, why) in [
            ("[1]", "invalid type"),
            (r#"{"id":1}"#, "missing field `type`"),
            (r#"{"type":"teleport"}"#, "unknown variant `teleport`"),
            (r#"{"type":"cancel","id":1,"x":2}"#, "unknown field `x`"),
            (r#"{"type":7}"#, "`type` must be a string"),
        ] {
            let e = ClientFrame::from_json(text).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
