//! The subprotocols' frames, parsed and encoded in one place: what a client's frame asks for
//! (`Incoming`), and each thing the server sends as a frame of the connection's protocol
//! (`agents.v1.json`, `agents.v1.postcard`, or raw; see `agents_client::protocol`).

use agents_client::{
    protocol::{self, Body, ClientFrame, ServerFrame, WireError},
    trace::TraceContext,
    Payload, RawError,
};
use axum::extract::ws::{CloseFrame, Message};
use serde_json::Value;

use crate::port::{close_reason, AgentKey, Encoded, Outgoing, Protocol, WsMessage};

/// A close frame with `code` and `reason` (cut to what a close frame can hold).
pub(super) fn close(code: u16, reason: &str) -> Message {
    Message::Close(Some(CloseFrame {
        code,
        reason: close_reason(reason).into(),
    }))
}

/// A frame from the client, whatever its encoding.
pub(super) enum Incoming {
    Call {
        id: u64,
        method: String,
        args: Payload,
        deadline_ms: Option<u64>,
        /// The caller's trace context, if it sent one it could read.
        trace: Option<TraceContext>,
    },
    Cancel {
        id: u64,
    },
    Credit {
        id: u64,
        chunks: u32,
    },
    Message(WsMessage),
    /// A call that is refused before it is made (its id is known, so it gets a reply).
    Refused {
        id: u64,
        error: RawError,
    },
}

impl Protocol {
    /// What the agent sends, as a frame of this protocol (`None`: not for this protocol).
    pub(super) fn outgoing(self, outgoing: &Outgoing) -> Option<Message> {
        Some(match (outgoing, self) {
            (Outgoing::Raw(WsMessage::Text(t)), _) => Message::Text(t.clone().into()),
            (Outgoing::Raw(WsMessage::Binary(b)), _) => Message::Binary(b.clone().into()),
            (Outgoing::Close(code, reason), _) => close(*code, reason),
            (Outgoing::Event(e), Protocol::Raw) => Message::Text(e.json().ok()?.to_owned().into()),
            (Outgoing::State(_) | Outgoing::Error(..), Protocol::Raw) => return None,
            (Outgoing::Event(e), wire) => {
                wire.encoded(e, protocol::event_frame, |data| ServerFrame::Event { data })
            }
            (Outgoing::State(s), wire) => wire.encoded(s, protocol::state_frame, |state| {
                ServerFrame::State { state }
            }),
            (Outgoing::Error(error, data), wire) => wire.frame(
                || {
                    let data = data.as_ref().map(|d| Payload::Json(d.json_value()));
                    protocol::error_frame(&RawError {
                        data,
                        ..error.clone()
                    })
                },
                || ServerFrame::Failed {
                    error: WireError {
                        data: data
                            .as_ref()
                            .and_then(|d| d.postcard().ok().map(<[u8]>::to_vec)),
                        ..WireError::from(error)
                    },
                },
            ),
        })
    }

    /// The frame of an encoded value (an event, the state), made by `json` from its JSON or by
    /// `postcard` from its bytes; a value that could not be encoded in this protocol is an
    /// `internal` error frame instead.
    fn encoded(
        self,
        value: &Encoded,
        json: fn(&str) -> String,
        postcard: fn(Vec<u8>) -> ServerFrame<Vec<u8>>,
    ) -> Message {
        self.frame(
            || match value.json() {
                Ok(text) => json(text),
                Err(why) => protocol::error_frame(&RawError::internal(why)),
            },
            || match value.postcard() {
                Ok(bytes) => postcard(bytes.to_vec()),
                Err(why) => ServerFrame::failed(&why),
            },
        )
    }

    /// The frame in this protocol's encoding (only the one needed is built).
    fn frame(
        self,
        json: impl FnOnce() -> String,
        postcard: impl FnOnce() -> ServerFrame<Vec<u8>>,
    ) -> Message {
        match self {
            Protocol::Json | Protocol::Raw => Message::Text(json().into()),
            Protocol::Postcard => Message::Binary(protocol::to_postcard(&postcard()).into()),
        }
    }

    pub(super) fn identity(self, key: &AgentKey, conn: &str) -> Message {
        let (class, name) = (key.class(), key.name());
        self.frame(
            || protocol::identity_frame(class, name, conn),
            || ServerFrame::Identity {
                class: class.to_owned(),
                name: name.to_owned(),
                conn: conn.to_owned(),
            },
        )
    }

    pub(super) fn reply(self, id: u64, result: &Result<Payload, RawError>) -> Message {
        self.frame(
            || protocol::reply_frame(id, result),
            || ServerFrame::reply(id, result),
        )
    }

    pub(super) fn chunk(self, id: u64, data: &Payload) -> Message {
        self.frame(
            || protocol::chunk_frame(id, data),
            || ServerFrame::chunk(id, data),
        )
    }

    /// An `error` frame: a frame that could not be read (`bad_args`), a message that could not
    /// be delivered.
    pub(super) fn error(self, error: &RawError) -> Message {
        self.frame(
            || protocol::error_frame(error),
            || ServerFrame::Failed {
                error: WireError::from(error),
            },
        )
    }

    /// Reads one data frame.
    pub(super) fn parse(self, frame: &Message) -> Result<Incoming, String> {
        match (self, frame) {
            (Protocol::Raw, Message::Text(text)) => {
                Ok(Incoming::Message(WsMessage::Text(text.as_str().to_owned())))
            }
            (Protocol::Raw, Message::Binary(bytes)) => {
                Ok(Incoming::Message(WsMessage::Binary(bytes.to_vec())))
            }
            (Protocol::Json, Message::Text(text)) => {
                match ClientFrame::<Value>::from_json(text.as_str())? {
                    ClientFrame::Call { id, args, .. }
                    | ClientFrame::TracedCall { id, args, .. }
                        if !args.is_array() =>
                    {
                        Ok(Incoming::Refused {
                            id,
                            error: RawError::bad_args(format!(
                                "`args` must be an array, not {args}"
                            )),
                        })
                    }
                    frame => incoming(frame, |data| {
                        WsMessage::Text(match data {
                            Value::String(text) => text,
                            other => other.to_string(),
                        })
                    }),
                }
            }
            (Protocol::Postcard, Message::Binary(bytes)) => {
                match postcard::from_bytes::<ClientFrame<Vec<u8>>>(bytes) {
                    Ok(frame) => incoming(frame, WsMessage::Binary),
                    Err(e) => Err(format!(
                        "not a frame of {}: {e}",
                        protocol::POSTCARD_PROTOCOL
                    )),
                }
            }
            (Protocol::Json, _) => {
                Err("binary frames are not part of agents.v1.json; send JSON text frames".into())
            }
            (Protocol::Postcard, _) => {
                Err("text frames are not part of agents.v1.postcard; send binary frames".into())
            }
            (Protocol::Raw, _) => Err("not a data frame".into()),
        }
    }
}

/// What a client's frame of either subprotocol asks for; `message`: what a message's data is
/// for `on_message`.
fn incoming<B: Body>(
    frame: ClientFrame<B>,
    message: impl FnOnce(B) -> WsMessage,
) -> Result<Incoming, String> {
    Ok(match frame {
        ClientFrame::Call {
            id,
            method,
            args,
            deadline_ms,
        } => Incoming::Call {
            id,
            method,
            args: args.into_payload(),
            deadline_ms,
            trace: None,
        },
        ClientFrame::TracedCall {
            id,
            method,
            args,
            deadline_ms,
            traceparent,
        } => Incoming::Call {
            id,
            method,
            args: args.into_payload(),
            deadline_ms,
            trace: TraceContext::from_traceparent(&traceparent),
        },
        ClientFrame::Cancel { id } => Incoming::Cancel { id },
        ClientFrame::Credit { id, chunks } => Incoming::Credit { id, chunks },
        ClientFrame::Message { data } => Incoming::Message(message(data)),
        _ => return Err("a kind of frame this server does not know".into()),
    })
}
