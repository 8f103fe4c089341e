//! The client side of both subprotocols in one shape: the frames a client sends, made in the
//! connection's codec, and the frames it receives, read into [`Received`].

use serde::Deserialize;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::{
    protocol::{
        to_postcard, PostcardClientFrame, PostcardServerFrame, JSON_PROTOCOL, POSTCARD_PROTOCOL,
    },
    Codec, ErrorKind, Payload, RawError,
};

/// A frame from the server, whatever the codec.
#[derive(Debug)]
pub(crate) enum Received {
    Identity {
        class: String,
        name: String,
        conn: String,
    },
    Reply {
        id: u64,
        result: Result<Payload, RawError>,
    },
    Chunk {
        id: u64,
        data: Payload,
    },
    Event(Payload),
    State(Payload),
    Error(RawError),
    /// A frame of another kind (a newer server), or not a frame of the protocol.
    Unknown(String),
}

/// A frame from server to client as `agents.v1.json` writes it.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum JsonServerFrame {
    Identity {
        class: String,
        name: String,
        conn: String,
    },
    Reply {
        id: u64,
        #[serde(default)]
        ok: Value,
        #[serde(default)]
        err: Option<JsonError>,
    },
    Chunk {
        id: u64,
        data: Value,
    },
    Event {
        data: Value,
    },
    State {
        state: Value,
    },
    Error(JsonError),
}

/// The error object of `agents.v1.json`.
#[derive(Deserialize)]
struct JsonError {
    #[serde(default = "internal")]
    kind: ErrorKind,
    message: String,
    #[serde(default)]
    data: Option<Value>,
}

fn internal() -> ErrorKind {
    ErrorKind::Internal
}

impl From<JsonError> for RawError {
    fn from(e: JsonError) -> Self {
        RawError {
            kind: e.kind,
            message: e.message,
            data: e.data.map(Payload::Json),
        }
    }
}

/// The subprotocol of `codec` (only postcard and JSON travel).
pub(crate) fn subprotocol(codec: Codec) -> Option<&'static str> {
    match codec {
        Codec::Postcard => Some(POSTCARD_PROTOCOL),
        Codec::Json => Some(JSON_PROTOCOL),
        Codec::Value => None,
    }
}

/// `call` in `codec`; `args` must be in it.
pub(crate) fn call(
    codec: Codec,
    id: u64,
    method: String,
    args: Payload,
    deadline_ms: u64,
) -> Result<Message, RawError> {
    match (codec, args) {
        (Codec::Postcard, Payload::Postcard(args)) => Ok(postcard(&PostcardClientFrame::Call {
            id,
            method,
            args,
            deadline_ms: Some(deadline_ms),
        })),
        (Codec::Json, Payload::Json(args)) => Ok(text(json!({
            "type": "call", "id": id, "method": method, "args": args, "deadline_ms": deadline_ms
        }))),
        (codec, args) => Err(RawError::bad_args(format!(
            "this connection speaks {codec:?}, not {:?}",
            args.codec()
        ))),
    }
}

/// `cancel` in `codec`.
pub(crate) fn cancel(codec: Codec, id: u64) -> Message {
    match codec {
        Codec::Postcard => postcard(&PostcardClientFrame::Cancel { id }),
        _ => text(json!({ "type": "cancel", "id": id })),
    }
}

/// `credit` in `codec`.
pub(crate) fn credit(codec: Codec, id: u64, chunks: u32) -> Message {
    match codec {
        Codec::Postcard => postcard(&PostcardClientFrame::Credit { id, chunks }),
        _ => text(json!({ "type": "credit", "id": id, "chunks": chunks })),
    }
}

fn postcard(frame: &PostcardClientFrame) -> Message {
    Message::Binary(to_postcard(frame).into())
}

fn text(frame: Value) -> Message {
    Message::Text(frame.to_string().into())
}

/// Reads a data frame; `None` for frames that carry nothing for the client (pings, pongs,
/// closes are handled by the caller).
pub(crate) fn read(codec: Codec, message: &Message) -> Option<Received> {
    Some(match (codec, message) {
        (Codec::Postcard, Message::Binary(bytes)) => read_postcard(bytes),
        (Codec::Json, Message::Text(text)) => read_json(text),
        (_, Message::Binary(_) | Message::Text(_)) => {
            Received::Unknown(format!("a frame that is not {codec:?}"))
        }
        _ => return None,
    })
}

fn read_postcard(bytes: &[u8]) -> Received {
    match postcard::from_bytes::<PostcardServerFrame>(bytes) {
        Ok(PostcardServerFrame::Identity { class, name, conn }) => {
            Received::Identity { class, name, conn }
        }
        Ok(PostcardServerFrame::Reply { id, result }) => Received::Reply {
            id,
            result: result.map(Payload::Postcard).map_err(RawError::from),
        },
        Ok(PostcardServerFrame::Chunk { id, data }) => Received::Chunk {
            id,
            data: Payload::Postcard(data),
        },
        Ok(PostcardServerFrame::Event { data }) => Received::Event(Payload::Postcard(data)),
        Ok(PostcardServerFrame::State { state }) => Received::State(Payload::Postcard(state)),
        Ok(PostcardServerFrame::Error { message }) => Received::Error(RawError::internal(message)),
        Ok(PostcardServerFrame::Failed { error }) => Received::Error(error.into()),
        Err(e) => Received::Unknown(format!("a frame that did not decode: {e}")),
    }
}

fn read_json(text: &str) -> Received {
    match serde_json::from_str::<JsonServerFrame>(text) {
        Ok(JsonServerFrame::Identity { class, name, conn }) => {
            Received::Identity { class, name, conn }
        }
        Ok(JsonServerFrame::Reply { id, ok, err }) => Received::Reply {
            id,
            result: match err {
                Some(e) => Err(e.into()),
                None => Ok(Payload::Json(ok)),
            },
        },
        Ok(JsonServerFrame::Chunk { id, data }) => Received::Chunk {
            id,
            data: Payload::Json(data),
        },
        Ok(JsonServerFrame::Event { data }) => Received::Event(Payload::Json(data)),
        Ok(JsonServerFrame::State { state }) => Received::State(Payload::Json(state)),
        Ok(JsonServerFrame::Error(e)) => Received::Error(e.into()),
        Err(e) => Received::Unknown(format!("a frame that did not parse: {e}")),
    }
}

/// Whether `result` is the end of a stream: `()` in its codec.
pub(crate) fn is_end(result: &Payload) -> bool {
    match result {
        Payload::Postcard(bytes) => bytes.is_empty(),
        Payload::Json(value) => value.is_null(),
        Payload::Value(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_frames_read_as_the_server_writes_them() {
        use crate::protocol::{error_frame, identity_frame, reply_frame};
        let read = |s: String| read(Codec::Json, &Message::Text(s.into())).unwrap();
        assert!(
            matches!(read(identity_frame("c", "n", "1")), Received::Identity { conn, .. } if conn == "1")
        );
        let ok = read(reply_frame(7, &Ok(Payload::Json(json!([1, 2])))));
        assert!(
            matches!(ok, Received::Reply { id: 7, result: Ok(Payload::Json(v)) } if v == json!([1, 2]))
        );
        let end = read(reply_frame(7, &Ok(Payload::Json(Value::Null))));
        assert!(matches!(end, Received::Reply { result: Ok(p), .. } if is_end(&p)));
        let e = RawError::app(Codec::Json, "no".to_string());
        let err = read(reply_frame(8, &Err(e.clone())));
        assert!(matches!(err, Received::Reply { id: 8, result: Err(r) } if r == e));
        assert!(matches!(read(error_frame(&e)), Received::Error(r) if r == e));
        assert!(matches!(read("{}".into()), Received::Unknown(_)));
    }
}
