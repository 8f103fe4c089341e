//! What a handler sees of a WebSocket connection: [`Conn`], its [`ConnId`], the messages it
//! receives ([`WsMessage`]), and the effects an event has on connections (sends, broadcasts,
//! closes, state), which leave only once the event's writes are durable (the output gate).

use std::{
    fmt,
    marker::PhantomData,
    sync::{Arc, Mutex},
};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{agent::AgentClass, error::Error, lock::lock, storage::Stored};

/// A connection's id: stable for the connection's lifetime (across the agent's hibernation),
/// never reused, and the same string the client received in its `identity` frame.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConnId(String);

impl ConnId {
    pub(crate) fn new(id: String) -> Self {
        ConnId(id)
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ConnId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A message from (or to) a WebSocket, as `on_message` receives it.
///
/// The same message arrives the same way whatever the connection speaks
/// ([`Conn::protocol`] tells which):
/// - without a subprotocol, every data frame as is: `ws.send("hi")` is `Text("hi")`;
/// - on `agents.v1.json`, a `{"type":"message","data":..}` frame: a string `data` as its text
///   (`"data":"hi"` is `Text("hi")` too), any other `data` as its JSON text
///   (`"data":{"x":1}` is `Text(r#"{"x":1}"#)`, which [`json`](WsMessage::json) decodes);
/// - on `agents.v1.postcard`, a `Message` frame's bytes as `Binary`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsMessage {
    /// A text frame.
    Text(String),
    /// A binary frame.
    Binary(Vec<u8>),
}

impl WsMessage {
    /// The text of a `Text` message.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            WsMessage::Text(s) => Some(s),
            WsMessage::Binary(_) => None,
        }
    }

    /// Decodes the message as JSON (a text, or the bytes of a binary message).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        let decoded = match self {
            WsMessage::Text(s) => serde_json::from_str(s),
            WsMessage::Binary(b) => serde_json::from_slice(b),
        };
        decoded.map_err(|e| Error::Codec(format!("the message is not the JSON expected: {e}")))
    }

    /// The message's bytes, text or binary.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            WsMessage::Text(s) => s.as_bytes(),
            WsMessage::Binary(b) => b,
        }
    }
}

/// Which encodings the connections a value goes to speak: a value is encoded only in those.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Speaks {
    /// JSON text: `agents.v1.json`, and raw connections (which get an event's JSON).
    pub json: bool,
    /// `agents.v1.postcard`.
    pub postcard: bool,
}

impl Speaks {
    /// Both.
    pub const ALL: Speaks = Speaks {
        json: true,
        postcard: true,
    };

    /// What a connection of `protocol` speaks.
    pub fn of(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Postcard => Speaks {
                json: false,
                postcard: true,
            },
            Protocol::Json | Protocol::Raw => Speaks {
                json: true,
                postcard: false,
            },
        }
    }
}

/// A value encoded for the protocols the connections it goes to speak (see [`Speaks`]). Some
/// types have no postcard form (`serde_json::Value`, tagged enums): postcard connections then
/// get an error frame that says so.
#[derive(Debug)]
pub(crate) struct Encoded {
    json: Option<String>,
    postcard: Option<Result<Vec<u8>, String>>,
}

impl Encoded {
    /// `value` in what `speaks` says; `what` names it in errors.
    pub fn new<T: Serialize + ?Sized>(
        value: &T,
        what: &str,
        speaks: Speaks,
    ) -> Result<Self, Error> {
        let json = speaks
            .json
            .then(|| serde_json::to_string(value))
            .transpose()
            .map_err(|e| Error::Codec(format!("{what} as JSON: {e}")))?;
        let postcard = speaks.postcard.then(|| {
            agents_client::Codec::postcard_bytes(value)
                .map_err(|e| format!("{what} cannot be sent in postcard: {e}"))
        });
        Ok(Encoded { json, postcard })
    }

    /// The JSON text, or why there is none.
    pub fn json(&self) -> Result<&str, String> {
        self.json.as_deref().ok_or_else(not_encoded)
    }

    /// The JSON as a value (`null` if there is none).
    pub fn json_value(&self) -> serde_json::Value {
        self.json
            .as_deref()
            .and_then(|j| serde_json::from_str(j).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// The postcard bytes, or why there are none.
    pub fn postcard(&self) -> Result<&[u8], String> {
        match &self.postcard {
            Some(Ok(bytes)) => Ok(bytes),
            Some(Err(why)) => Err(why.clone()),
            None => Err(not_encoded()),
        }
    }
}

fn not_encoded() -> String {
    "the value was not encoded for this protocol (no connection spoke it when it was sent)".into()
}

/// Something an event sends.
#[derive(Debug)]
pub(crate) enum Outgoing {
    /// A typed event (`event` frame; raw connections get its JSON as a text frame).
    Event(Encoded),
    /// The shared state (`state` frame; raw connections do not get it).
    State(Encoded),
    /// A frame sent exactly as given, whatever the connection's protocol.
    Raw(WsMessage),
    /// An `error` frame (raw connections do not get it): the error, and for an application
    /// error its value in both encodings.
    Error(agents_client::RawError, Option<Encoded>),
    /// Closes the connection with a code and a reason.
    Close(u16, String),
}

/// What an event does to connections, applied only if it succeeds.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Deliver to one connection.
    Send(ConnId, Arc<Outgoing>),
    /// Deliver to every admitted connection of the agent except some.
    Broadcast(Arc<Outgoing>, Vec<ConnId>),
    /// `on_connect` accepted the connection: broadcasts released from now on reach it.
    Admit(ConnId),
    /// Store a connection's state, in the event's transaction.
    SetState(ConnId, Stored),
    /// Store a connection's tags, in the event's transaction.
    SetTags(ConnId, Vec<String>),
}

impl Effect {
    /// Whether this effect is a delivery (as opposed to a write).
    pub fn is_delivery(&self) -> bool {
        matches!(
            self,
            Effect::Send(..) | Effect::Broadcast(..) | Effect::Admit(..)
        )
    }
}

/// The effects of the current event, shared by its `Ctx` and the `Conn`s it handed out.
pub(crate) type Effects = Arc<Mutex<Vec<Effect>>>;

pub(crate) fn push(effects: &Effects, effect: Effect) {
    lock(effects).push(effect);
}

/// The reason of a close frame is limited to 123 bytes: cut at a character boundary.
pub(crate) fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}

/// What a connection speaks, chosen by the client with the `Sec-WebSocket-Protocol` header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Protocol {
    /// `agents.v1.json`: JSON frames (browsers, other languages).
    Json,
    /// `agents.v1.postcard`: binary frames (Rust clients).
    Postcard,
    /// No subprotocol: raw frames to and from `on_message`.
    Raw,
}

impl Protocol {
    /// As stored with the connection.
    fn name(self) -> &'static str {
        match self {
            Protocol::Json => "json",
            Protocol::Postcard => "postcard",
            Protocol::Raw => "raw",
        }
    }

    /// The protocol stored as `name` (raw for anything else).
    fn named(name: &str) -> Self {
        [Protocol::Json, Protocol::Postcard]
            .into_iter()
            .find(|p| p.name() == name)
            .unwrap_or(Protocol::Raw)
    }
}

/// One WebSocket connection of an agent, as handlers see it.
///
/// The socket itself belongs to the runtime: it stays open while the agent hibernates, and a
/// message on it wakes the agent. The connection's state ([`set_state`](Conn::set_state), typed
/// by the agent's `conn_state`) and tags are stored in the agent's database, so they survive
/// hibernation and are part of the event's transaction. What [`send`](Conn::send) and
/// [`close`](Conn::close) do happens only once the event's writes are durable, and not at all
/// if the event fails.
pub struct Conn<A> {
    id: ConnId,
    protocol: Protocol,
    principal: Option<String>,
    state: Mutex<Option<Stored>>,
    tags: Mutex<Vec<String>>,
    effects: Effects,
    _agent: PhantomData<fn() -> A>,
}

impl<A> fmt::Debug for Conn<A> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("id", &self.id)
            .field("principal", &self.principal)
            .field("tags", &*lock(&self.tags))
            .finish_non_exhaustive()
    }
}

impl<A> Conn<A> {
    /// This connection's id.
    pub fn id(&self) -> &ConnId {
        &self.id
    }

    /// What the connection speaks.
    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// What `on_before_connect` passed on for this connection (say, the authenticated user),
    /// if anything.
    pub fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }

    /// The connection's tags.
    pub fn tags(&self) -> Vec<String> {
        lock(&self.tags).clone()
    }

    /// Replaces the connection's tags (stored with the event's writes); find connections by tag
    /// with [`Ctx::connections_tagged`](crate::Ctx::connections_tagged).
    pub fn set_tags<S: AsRef<str>>(&self, tags: &[S]) {
        let mut tags: Vec<String> = tags.iter().map(|t| t.as_ref().to_owned()).collect();
        tags.sort();
        tags.dedup();
        *lock(&self.tags) = tags.clone();
        push(&self.effects, Effect::SetTags(self.id.clone(), tags));
    }

    /// Sends a frame exactly as given (text or binary), whatever the connection's protocol.
    pub fn send_raw(&self, message: WsMessage) {
        self.deliver(Outgoing::Raw(message));
    }

    /// Closes the connection with `code` (e.g. 1000, or 4000–4999 for your own) and `reason`
    /// (cut to the 123 bytes a close frame allows). `on_close` follows.
    pub fn close(&self, code: u16, reason: &str) {
        self.deliver(Outgoing::Close(code, close_reason(reason)));
    }

    fn deliver(&self, outgoing: Outgoing) {
        push(
            &self.effects,
            Effect::Send(self.id.clone(), Arc::new(outgoing)),
        );
    }
}

impl<A: AgentClass> Conn<A> {
    /// The connection's state, if it was ever set.
    pub fn state(&self) -> Result<Option<A::ConnState>, Error> {
        let state = lock(&self.state);
        let what = format!("the state of connection {}", self.id);
        state.as_ref().map(|s| s.decode(&what)).transpose()
    }

    /// Replaces the connection's state; it is stored with the event's writes.
    pub fn set_state(&self, state: &A::ConnState) -> Result<(), Error> {
        let stored = Stored::encode(state, &format!("the state of connection {}", self.id))?;
        *lock(&self.state) = Some(stored.clone());
        push(&self.effects, Effect::SetState(self.id.clone(), stored));
        Ok(())
    }

    /// Sends `event` to this connection: an `event` frame, or its JSON as a text frame on a
    /// connection without a subprotocol.
    pub fn send(&self, event: &A::Event) -> Result<(), Error> {
        let speaks = Speaks::of(self.protocol);
        self.deliver(Outgoing::Event(Encoded::new(event, "the event", speaks)?));
        Ok(())
    }
}

/// The runtime's table of connections (one row per open connection) and their tags.
pub(crate) const TABLES: &str = "
CREATE TABLE IF NOT EXISTS _agents_connections(
    id TEXT PRIMARY KEY,
    principal TEXT,
    state BLOB,
    protocol TEXT
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS _agents_conn_tags(
    tag TEXT NOT NULL,
    conn TEXT NOT NULL,
    PRIMARY KEY (tag, conn)
) WITHOUT ROWID;
-- A connection's tags are read on every event about it: by connection, not a scan.
CREATE INDEX IF NOT EXISTS _agents_conn_tags_by_conn ON _agents_conn_tags(conn);
CREATE TABLE IF NOT EXISTS _agents_state(
    id INTEGER PRIMARY KEY CHECK (id = 0),
    state BLOB NOT NULL
);
";

/// Records a new connection.
pub(crate) fn insert(
    sql: &Connection,
    id: &ConnId,
    protocol: Protocol,
    principal: Option<&str>,
) -> Result<(), Error> {
    sql.prepare_cached(
        "INSERT OR REPLACE INTO _agents_connections(id, principal, state, protocol) VALUES (?1, ?2, NULL, ?3)",
    )?
    .execute(params![id.as_str(), principal, protocol.name()])?;
    Ok(())
}

/// Forgets a closed connection.
pub(crate) fn remove(sql: &Connection, id: &ConnId) -> Result<(), Error> {
    sql.prepare_cached("DELETE FROM _agents_connections WHERE id = ?1")?
        .execute([id.as_str()])?;
    sql.prepare_cached("DELETE FROM _agents_conn_tags WHERE conn = ?1")?
        .execute([id.as_str()])?;
    Ok(())
}

/// Forgets every connection that is not open (rows left by a crash or a shutdown).
pub(crate) fn remove_stale(
    sql: &Connection,
    is_open: impl Fn(&ConnId) -> bool,
) -> Result<(), Error> {
    let mut stmt = sql.prepare_cached("SELECT id FROM _agents_connections")?;
    let stored: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for id in stored {
        let id = ConnId(id);
        if !is_open(&id) {
            remove(sql, &id)?;
        }
    }
    Ok(())
}

/// Loads the connection `id` as a handler sees it; `None` if it is not recorded.
pub(crate) fn load<A>(
    sql: &Connection,
    id: &ConnId,
    effects: &Effects,
) -> Result<Option<Conn<A>>, Error> {
    let row: Option<(Option<String>, Option<Stored>, Option<String>)> = sql
        .prepare_cached("SELECT principal, state, protocol FROM _agents_connections WHERE id = ?1")?
        .query_row([id.as_str()], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((principal, state, protocol)) = row else {
        return Ok(None);
    };
    let protocol = Protocol::named(protocol.as_deref().unwrap_or_default());
    let tags: Vec<String> = sql
        .prepare_cached("SELECT tag FROM _agents_conn_tags WHERE conn = ?1 ORDER BY tag")?
        .query_map([id.as_str()], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(Some(Conn {
        id: id.clone(),
        protocol,
        principal,
        state: Mutex::new(state),
        tags: Mutex::new(tags),
        effects: effects.clone(),
        _agent: PhantomData,
    }))
}

/// The ids of the connections tagged `tag`.
pub(crate) fn tagged(sql: &Connection, tag: &str) -> Result<Vec<ConnId>, Error> {
    let ids = sql
        .prepare_cached("SELECT conn FROM _agents_conn_tags WHERE tag = ?1 ORDER BY conn")?
        .query_map([tag], |r| r.get(0).map(ConnId))?
        .collect::<Result<_, _>>()?;
    Ok(ids)
}

/// Stores the connection writes (state, tags) the current event made so far, and takes them out
/// of its effects: what it reads of its connections afterwards sees them.
pub(crate) fn flush_writes(sql: &Connection, effects: &Effects) -> Result<(), Error> {
    let mut effects = lock(effects);
    if effects.iter().all(Effect::is_delivery) {
        return Ok(());
    }
    let (deliveries, writes) = std::mem::take(&mut *effects)
        .into_iter()
        .partition(Effect::is_delivery);
    *effects = deliveries;
    apply_writes(sql, &writes)
}

/// Stores an event's connection writes (state, tags).
pub(crate) fn apply_writes(sql: &Connection, effects: &[Effect]) -> Result<(), Error> {
    for effect in effects {
        match effect {
            Effect::SetState(id, state) => {
                sql.prepare_cached("UPDATE _agents_connections SET state = ?2 WHERE id = ?1")?
                    .execute(params![id.as_str(), state])?;
            }
            Effect::SetTags(id, tags) => {
                sql.prepare_cached("DELETE FROM _agents_conn_tags WHERE conn = ?1")?
                    .execute([id.as_str()])?;
                let mut insert = sql.prepare_cached(
                    "INSERT OR IGNORE INTO _agents_conn_tags(tag, conn) VALUES (?1, ?2)",
                )?;
                for tag in tags {
                    insert.execute(params![tag, id.as_str()])?;
                }
            }
            Effect::Send(..) | Effect::Broadcast(..) | Effect::Admit(..) => {}
        }
    }
    Ok(())
}

/// The shared state, if it was ever set.
pub(crate) fn load_state(sql: &Connection) -> Result<Option<Stored>, Error> {
    Ok(sql
        .prepare_cached("SELECT state FROM _agents_state WHERE id = 0")?
        .query_row([], |r| r.get(0))
        .optional()?)
}

/// Stores the shared state.
pub(crate) fn store_state(sql: &Connection, state: &Stored) -> Result<(), Error> {
    sql.prepare_cached(
        "INSERT INTO _agents_state(id, state) VALUES (0, ?1) ON CONFLICT(id) DO UPDATE SET state = excluded.state",
    )?
    .execute([state])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{address::AgentKey, prelude::*, storage};

    #[derive(Serialize, Deserialize)]
    struct MemberV1 {
        name: String,
        legacy: bool,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct MemberV2 {
        name: String,
        #[serde(default)]
        email: Option<String>,
    }

    #[derive(Default)]
    struct RoomV1;
    impl Agent for RoomV1 {}
    #[agent(conn_state = "MemberV1")]
    impl RoomV1 {}

    #[derive(Default)]
    struct RoomV2;
    impl Agent for RoomV2 {}
    #[agent(conn_state = "MemberV2")]
    impl RoomV2 {}

    #[test]
    fn a_value_is_encoded_only_for_the_protocols_its_connections_speak() {
        let json_only = Encoded::new(&5u8, "five", Speaks::of(Protocol::Raw)).unwrap();
        assert_eq!(json_only.json(), Ok("5"));
        assert!(json_only.postcard().unwrap_err().contains("not encoded"));
        let postcard_only = Encoded::new(&5u8, "five", Speaks::of(Protocol::Postcard)).unwrap();
        assert_eq!(postcard_only.postcard(), Ok(&[5u8][..]));
        assert!(postcard_only.json().is_err());
        let both = Encoded::new(&5u8, "five", Speaks::ALL).unwrap();
        assert_eq!((both.json(), both.postcard()), (Ok("5"), Ok(&[5u8][..])));
    }

    #[test]
    fn connection_state_written_by_one_version_reads_in_the_next() {
        let dir = tempfile::tempdir().unwrap();
        let key = AgentKey::new("room", "r").unwrap();
        let sql = storage::opened(dir.path(), &key, storage::Durability::Normal)
            .unwrap()
            .conn;
        let id = ConnId::new("c1".into());
        insert(&sql, &id, Protocol::Json, Some("ann")).unwrap();
        let effects = Effects::default();
        let v1: Conn<RoomV1> = load(&sql, &id, &effects).unwrap().unwrap();
        let member = MemberV1 {
            name: "ann".into(),
            legacy: true,
        };
        v1.set_state(&member).unwrap();
        apply_writes(&sql, &effects.lock().unwrap()).unwrap();

        let v2: Conn<RoomV2> = load(&sql, &id, &Effects::default()).unwrap().unwrap();
        let expected = MemberV2 {
            name: "ann".into(),
            email: None,
        };
        assert_eq!(v2.state().unwrap(), Some(expected));
        assert_eq!(
            (v2.protocol(), v2.principal()),
            (Protocol::Json, Some("ann"))
        );

        // A row an older runtime wrote in postcard still reads.
        let old = postcard::to_stdvec(&("bob", Some("bob@example.com"))).unwrap();
        sql.execute("UPDATE _agents_connections SET state = ?1", [old])
            .unwrap();
        let v2: Conn<RoomV2> = load(&sql, &id, &Effects::default()).unwrap().unwrap();
        let bob = v2.state().unwrap().unwrap();
        assert_eq!(bob.email.as_deref(), Some("bob@example.com"));
    }
}
