//! A chat server with a web page: one `ChatRoom` agent per room.
//!
//! ```text
//! cargo run --example chat                          # serves http://127.0.0.1:8080/: open it
//! cargo run --example chat -- serve --addr 127.0.0.1:0 --data DIR   # prints `ready <url>`
//! cargo run --example chat -- cli --room lobby --name ann [--url http://127.0.0.1:8080]
//! curl 127.0.0.1:8080/agents/chat-room/lobby/count  # {"messages":3}
//! ```
//!
//! What the room does:
//! - a name, given when connecting (`?name=ann`), is kept as the connection's state;
//! - messages are stored in the room's SQLite; who joins gets the history;
//! - a message goes to everyone but its sender; who is online is the room's shared state;
//! - "is typing" is kept in memory only (lost on hibernation, as it should be);
//! - a room is purged after 30 minutes without a message: every message pushes its alarm back.
//!
//! The page (`examples/chat/index.html`, served at `/`) is built on the JavaScript client the
//! runtime serves at `/agents.js`; the CLI on the generated `ChatRoomClient`.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant, UNIX_EPOCH},
};

use agents::{
    axum::{
        extract::Query,
        response::{Html, IntoResponse},
        routing::get,
    },
    prelude::*,
    AlarmInfo, Codec, ConnectOptions,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};

/// How long a room keeps its messages without a new one.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// How many messages someone who joins gets.
pub const HISTORY: usize = 100;

/// One chat room. `typing` lives in memory only.
#[derive(Default)]
pub struct ChatRoom {
    typing: HashMap<String, Instant>,
}

/// Each connection's state: who it is.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
}

/// The room's shared state: who is online.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub online: Vec<String>,
}

/// One stored message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: i64,
    pub from: String,
    pub text: String,
    pub at_ms: u64,
}

/// What the room sends to connections, shaped for JavaScript (`{"type":"message",..}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ChatEvent {
    /// Someone else posted.
    Message(Message),
    /// The last messages, sent to who just joined.
    History {
        messages: Vec<Message>,
    },
    Joined {
        name: String,
    },
    Left {
        name: String,
    },
    Typing {
        name: String,
    },
}

impl Agent for ChatRoom {
    /// A name of 1 to 32 characters, from `?name=`, or a refusal the page can show.
    async fn on_before_connect(_room: &str, req: &RequestHead) -> Admission {
        let query = Query::<HashMap<String, String>>::try_from_uri(&req.uri);
        let name = query
            .ok()
            .and_then(|q| q.0.get("name").map(|n| n.trim().to_owned()));
        match name {
            Some(name) if (1..=32).contains(&name.chars().count()) => Ok(Some(name)),
            _ => Err(agents::refuse(4400, "pick a name of 1 to 32 characters")),
        }
    }

    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&["CREATE TABLE messages(
            id INTEGER PRIMARY KEY, sender TEXT NOT NULL, text TEXT NOT NULL, at_ms INTEGER NOT NULL)"])?;
        Ok(())
    }

    async fn on_connect(&mut self, ctx: &mut Ctx<Self>, conn: &Conn<Self>) -> Result<(), AppError> {
        let name = conn.principal().unwrap_or("?").to_owned();
        conn.set_state(&Member { name: name.clone() })?;
        conn.send(&ChatEvent::History {
            messages: history(ctx)?,
        })?;
        ctx.set_state(&presence(ctx, None)?)?;
        ctx.broadcast(&ChatEvent::Joined { name }, &[conn.id().clone()])?;
        Ok(())
    }

    async fn on_close(
        &mut self,
        ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        _code: u16,
        _reason: &str,
    ) -> Result<(), AppError> {
        let name = conn.state()?.unwrap_or_default().name;
        self.typing.remove(&name);
        ctx.set_state(&presence(ctx, Some(conn.id()))?)?;
        ctx.broadcast(&ChatEvent::Left { name }, &[conn.id().clone()])?;
        Ok(())
    }

    /// `GET /agents/chat-room/{room}/count`: how many messages the room holds.
    async fn on_request(
        &mut self,
        ctx: &mut Ctx<Self>,
        request: HttpRequest,
    ) -> Result<HttpResponse, AppError> {
        if request.uri().path().ends_with("/count") {
            let n: i64 = ctx
                .sql()
                .query_row("SELECT count(*) FROM messages", [], |r| r.get(0))?;
            return Ok(agents::axum::Json(serde_json::json!({ "messages": n })).into_response());
        }
        Ok((agents::axum::http::StatusCode::NOT_FOUND, "not found").into_response())
    }

    /// Thirty minutes without a message: the room forgets.
    async fn on_alarm(&mut self, ctx: &mut Ctx<Self>, _info: AlarmInfo) -> Result<(), AppError> {
        ctx.sql().execute("DELETE FROM messages", [])?;
        Ok(())
    }
}

/// The last `HISTORY` messages, oldest first.
fn history(ctx: &Ctx<ChatRoom>) -> Result<Vec<Message>, AppError> {
    let mut stmt = ctx.sql().prepare(
        "SELECT id, sender, text, at_ms FROM (SELECT * FROM messages ORDER BY id DESC LIMIT ?1) ORDER BY id",
    )?;
    let rows = stmt.query_map([HISTORY as i64], |r| {
        Ok(Message {
            id: r.get(0)?,
            from: r.get(1)?,
            text: r.get(2)?,
            at_ms: r.get::<_, i64>(3)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Who is online: the names of the open connections, but `leaving`.
fn presence(ctx: &Ctx<ChatRoom>, leaving: Option<&ConnId>) -> Result<Presence, AppError> {
    let mut online = Vec::new();
    for conn in ctx.connections()? {
        if Some(conn.id()) != leaving {
            online.extend(conn.state()?.map(|m| m.name));
        }
    }
    online.sort();
    online.dedup();
    Ok(Presence { online })
}

#[agent(state = "Presence", conn_state = "Member", event = "ChatEvent")]
impl ChatRoom {
    /// Posts `text` (1 to 2,000 characters) as the connection's member (or as the caller an
    /// admission hook named, over HTTP); everyone else gets it. Returns the stored message.
    #[callable]
    pub async fn post(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<Message, AppError> {
        let text = text.trim().to_owned();
        if text.is_empty() || text.chars().count() > 2000 {
            return Err(AppError::msg("a message has 1 to 2,000 characters"));
        }
        let from = match ctx.caller().cloned() {
            Some(id) => ctx.connection(&id)?.and_then(|c| c.state().ok().flatten()),
            None => None,
        };
        let from = from.map(|m| m.name).unwrap_or_else(|| "api".into());
        self.typing.remove(&from);
        let at_ms = ctx
            .now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        let id = ctx.sql().query_row(
            "INSERT INTO messages(sender, text, at_ms) VALUES (?1, ?2, ?3) RETURNING id",
            (&from, &text, at_ms as i64),
            |r| r.get(0),
        )?;
        let message = Message {
            id,
            from,
            text,
            at_ms,
        };
        let except: Vec<ConnId> = ctx.caller().cloned().into_iter().collect();
        ctx.broadcast(&ChatEvent::Message(message.clone()), &except)?;
        ctx.set_alarm(ctx.now() + IDLE)?;
        Ok(message)
    }

    /// The caller is typing: everyone else hears of it (once every 2 s at most).
    #[callable]
    pub async fn typing(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        let Some(id) = ctx.caller().cloned() else {
            return Ok(());
        };
        let Some(member) = ctx.connection(&id)?.and_then(|c| c.state().ok().flatten()) else {
            return Ok(());
        };
        let now = Instant::now();
        let recent = self
            .typing
            .get(&member.name)
            .is_some_and(|at| now.duration_since(*at) < Duration::from_secs(2));
        if !recent {
            self.typing.insert(member.name.clone(), now);
            ctx.broadcast(&ChatEvent::Typing { name: member.name }, &[id])?;
        }
        Ok(())
    }

    /// The last messages, oldest first.
    #[callable]
    pub async fn history(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<Message>, AppError> {
        history(ctx)
    }
}

/// The page.
const PAGE: &str = include_str!("chat/index.html");

/// Serves the page and the agents on `addr`, with data in `data`; prints `ready <url>`.
async fn serve(addr: SocketAddr, data: &str) -> Result<(), Box<dyn std::error::Error>> {
    let runtime = Runtime::builder()
        .data_dir(data)
        .agent::<ChatRoom>()
        .build()?;
    let app = agents::router(runtime).route("/", get(|| async { Html(PAGE) }));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let url = format!("http://{}/", listener.local_addr()?);
    println!("ready {url}");
    println!("open {url} in a browser (or two), or chat from a terminal:");
    println!("  cargo run --example chat -- cli --room lobby --name you --url {url}");
    agents::axum::serve(listener, app).await?;
    Ok(())
}

/// Chats from a terminal: stdin lines are posted, what happens in the room is printed.
async fn cli(url: &str, room: &str, name: &str) -> Result<(), Box<dyn std::error::Error>> {
    let base = url.trim_end_matches('/').replacen("http", "ws", 1);
    let encode = |s: &str| -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect()
    };
    let url = format!(
        "{base}/agents/chat-room/{}?name={}",
        encode(room),
        encode(name)
    );
    // The events are tagged enums, which postcard cannot carry: JSON.
    let options = ConnectOptions::new().codec(Codec::Json);
    let chat = ChatRoomClient::connect_with(&url, options).await?;
    let mut events = chat.events();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event {
                Ok(ChatEvent::Message(m)) => println!("[{}] {}", m.from, m.text),
                Ok(ChatEvent::History { messages }) => {
                    for m in messages {
                        println!("[{}] {}", m.from, m.text);
                    }
                }
                Ok(ChatEvent::Joined { name }) => println!("* {name} joined"),
                Ok(ChatEvent::Left { name }) => println!("* {name} left"),
                Ok(ChatEvent::Typing { .. }) => {}
                Err(e) => eprintln!("! {e}"),
            }
        }
    });
    println!("* joined {room} as {name}; type a message and press enter");
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Some(line) = lines.next_line().await? {
        if line.trim().is_empty() {
            continue;
        }
        if let Err(e) = chat.post(line).await {
            eprintln!("! {e}");
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    match args.first().map(String::as_str) {
        None | Some("serve") => {
            let addr = flag("--addr").unwrap_or_else(|| "127.0.0.1:8080".into());
            let data = flag("--data").unwrap_or_else(|| "./data/chat".into());
            serve(addr.parse()?, &data).await
        }
        Some("cli") => {
            let url = flag("--url").unwrap_or_else(|| "http://127.0.0.1:8080".into());
            let room = flag("--room").unwrap_or_else(|| "lobby".into());
            let name = flag("--name").ok_or("usage: chat cli --room ROOM --name NAME [--url URL]")?;
            cli(&url, &room, &name).await
        }
        Some(other) => Err(format!(
            "unknown command `{other}`: run `chat`, `chat serve --addr A --data DIR`, or `chat cli --room R --name N`"
        )
        .into()),
    }
}
