//! The client side of both subprotocols in one shape: the frames a client sends, made in the
//! connection's codec, and the frames it receives, read into [`Received`].

use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::{
    protocol::{to_postcard, Body, ClientFrame, ServerFrame, JSON_PROTOCOL, POSTCARD_PROTOCOL},
    trace::TraceContext,
    Codec, Payload, RawError,
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

/// The subprotocol of `codec` (only postcard and JSON travel).
pub(crate) fn subprotocol(codec: Codec) -> Option<&'static str> {
    match codec {
        Codec::Postcard => Some(POSTCARD_PROTOCOL),
        Codec::Json => Some(JSON_PROTOCOL),
        Codec::Value => None,
    }
}

/// `call` in `codec`, `traced` if it belongs to a trace; `args` must be in `codec`.
pub(crate) fn call(
    codec: Codec,
    id: u64,
    method: String,
    args: Payload,
    deadline_ms: u64,
    traced: Option<TraceContext>,
) -> Result<Message, RawError> {
    fn frame<B>(
        id: u64,
        method: String,
        args: B,
        deadline_ms: u64,
        traced: Option<TraceContext>,
    ) -> ClientFrame<B> {
        let deadline_ms = Some(deadline_ms);
        match traced {
            Some(context) => ClientFrame::TracedCall {
                id,
                method,
                args,
                deadline_ms,
                traceparent: context.traceparent(),
            },
            None => ClientFrame::Call {
                id,
                method,
                args,
                deadline_ms,
            },
        }
    }
    match (codec, args) {
        (Codec::Postcard, Payload::Postcard(args)) => {
            Ok(binary(frame(id, method, args, deadline_ms, traced)))
        }
        (Codec::Json, Payload::Json(args)) => {
            Ok(text(frame(id, method, args, deadline_ms, traced)))
        }
        (codec, args) => Err(RawError::bad_args(format!(
            "this connection speaks {codec:?}, not {:?}",
            args.codec()
        ))),
    }
}

/// `cancel` in `codec`.
pub(crate) fn cancel(codec: Codec, id: u64) -> Message {
    match codec {
        Codec::Postcard => binary(ClientFrame::Cancel { id }),
        _ => text(ClientFrame::Cancel { id }),
    }
}

/// `credit` in `codec`.
pub(crate) fn credit(codec: Codec, id: u64, chunks: u32) -> Message {
    match codec {
        Codec::Postcard => binary(ClientFrame::Credit { id, chunks }),
        _ => text(ClientFrame::Credit { id, chunks }),
    }
}

fn binary(frame: ClientFrame<Vec<u8>>) -> Message {
    Message::Binary(to_postcard(&frame).into())
}

fn text(frame: ClientFrame<Value>) -> Message {
    Message::Text(frame.to_json().into())
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
    match postcard::from_bytes::<ServerFrame<Vec<u8>>>(bytes) {
        Ok(frame) => received(frame),
        Err(e) => Received::Unknown(format!("a frame that did not decode: {e}")),
    }
}

fn read_json(text: &str) -> Received {
    match ServerFrame::<Value>::from_json(text) {
        Ok(frame) => received(frame),
        Err(e) => Received::Unknown(format!("a frame that did not parse: {e}")),
    }
}

/// What a frame of either subprotocol says.
fn received<B: Body>(frame: ServerFrame<B>) -> Received {
    match frame {
        ServerFrame::Identity { class, name, conn } => Received::Identity { class, name, conn },
        ServerFrame::Reply { id, result } => Received::Reply {
            id,
            result: result.map(B::into_payload).map_err(RawError::from),
        },
        ServerFrame::Chunk { id, data } => Received::Chunk {
            id,
            data: data.into_payload(),
        },
        ServerFrame::Event { data } => Received::Event(data.into_payload()),
        ServerFrame::State { state } => Received::State(state.into_payload()),
        ServerFrame::Error { message } => Received::Error(RawError::internal(message)),
        ServerFrame::Failed { error } => Received::Error(error.into()),
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
    use serde_json::json;

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
