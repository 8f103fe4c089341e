//! WebSocket lifecycle over real sockets on 127.0.0.1: hooks and their order, broadcast with
//! exclusions, connection state and tags across hibernation, the output gate, slow readers,
//! shared state, admission hooks and `on_request`.

mod common;

use std::{net::SocketAddr, time::Duration};

use agents::{prelude::*, testing::TestRuntime};
use common::{call, next_frame as next, next_json, send_json, ws_connect, Socket};
use futures_util::SinkExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::{
    protocol::{frame::coding::CloseCode, CloseFrame},
    Message,
};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub name: String,
    pub messages: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum RoomEvent {
    Said { from: String, text: String },
    Flood(String),
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Topic {
    pub topic: String,
    pub posts: u64,
}

/// A chat room that logs every hook it runs.
#[derive(Default)]
pub struct Room;

fn log(ctx: &Ctx<Room>, entry: String) -> Result<(), AppError> {
    ctx.sql()
        .execute("INSERT INTO log(entry) VALUES (?1)", [entry])?;
    Ok(())
}

fn query(parts: &RequestHead, key: &str) -> Option<String> {
    parts.uri.query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_owned())
    })
}

impl Agent for Room {
    async fn on_before_connect(name: &str, request: &RequestHead) -> Admission {
        let _ = name;
        if query(request, "token").as_deref() == Some("bad") {
            let refusal = (agents::axum::http::StatusCode::UNAUTHORIZED, "bad token");
            return Err(agents::axum::response::IntoResponse::into_response(refusal));
        }
        Ok(query(request, "user"))
    }

    async fn on_before_request(name: &str, request: &RequestHead) -> Admission {
        Self::on_before_connect(name, request).await
    }

    async fn on_start(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.migrate(&[
            "CREATE TABLE log(n INTEGER PRIMARY KEY, entry TEXT NOT NULL);
             CREATE TABLE posts(n INTEGER PRIMARY KEY, text TEXT NOT NULL);",
        ])?;
        Ok(())
    }

    async fn on_connect(&mut self, ctx: &mut Ctx<Self>, conn: &Conn<Self>) -> Result<(), AppError> {
        let name = conn.principal().unwrap_or("anonymous").to_owned();
        if name == "slow-banned" {
            // Refuses after a while: the frames its client sends meanwhile are read.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        if name.ends_with("banned") {
            return Err(AppError::msg("banned users may not join"));
        }
        log(ctx, format!("connect {name}"))?;
        conn.set_state(&Member {
            name: name.clone(),
            messages: 0,
        })?;
        conn.set_tags(&["member", &format!("user:{name}")]);
        Ok(())
    }

    async fn on_message(
        &mut self,
        ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        message: WsMessage,
    ) -> Result<(), AppError> {
        let text = message.as_text().unwrap_or("<binary>").to_owned();
        let mut member = conn.state()?.unwrap_or_default();
        member.messages += 1;
        conn.set_state(&member)?;
        log(ctx, format!("message {} {text}", member.name))?;
        if text == "fail" {
            ctx.broadcast(
                &RoomEvent::Said {
                    from: member.name,
                    text: "never sent".into(),
                },
                &[],
            )?;
            return Err(AppError::msg("refused to say it"));
        }
        ctx.broadcast(
            &RoomEvent::Said {
                from: member.name,
                text,
            },
            &[conn.id().clone()],
        )?;
        Ok(())
    }

    async fn on_error(
        &mut self,
        ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        error: &str,
    ) -> Result<(), AppError> {
        let name = conn.state()?.unwrap_or_default().name;
        log(ctx, format!("error {name} {error}"))
    }

    async fn on_close(
        &mut self,
        ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        code: u16,
        reason: &str,
    ) -> Result<(), AppError> {
        let name = conn.state()?.unwrap_or_default().name;
        log(ctx, format!("close {name} {code} {reason}"))
    }

    async fn on_request(
        &mut self,
        ctx: &mut Ctx<Self>,
        request: HttpRequest,
    ) -> Result<HttpResponse, AppError> {
        let who = request
            .extensions()
            .get::<agents::Principal>()
            .map(|p| p.0.clone());
        // `ctx.principal()` is for calls: None here (the request carries its own).
        let call_principal = ctx.principal();
        log(
            ctx,
            format!(
                "request {} {who:?} {call_principal:?}",
                request.uri().path()
            ),
        )?;
        let body = serde_json::to_string(&(request.uri().path(), who, request.body().len()))?;
        Ok(agents::axum::response::IntoResponse::into_response(body))
    }
}

#[agent(state = "Topic", conn_state = "Member", event = "RoomEvent")]
impl Room {
    /// Posts `text` to everyone but the connection it came from; bumps the shared state.
    #[callable]
    pub async fn post(&mut self, ctx: &mut Ctx<Self>, text: String) -> Result<u64, AppError> {
        let n: u64 = ctx.sql().query_row(
            "INSERT INTO posts(text) VALUES (?1) RETURNING n",
            [&text],
            |r| r.get(0),
        )?;
        let except: Vec<ConnId> = ctx.caller().cloned().into_iter().collect();
        ctx.broadcast(
            &RoomEvent::Said {
                from: "api".into(),
                text,
            },
            &except,
        )?;
        let mut state = ctx.state()?.unwrap_or_default();
        state.posts = n;
        ctx.set_state(&state)?;
        Ok(n)
    }

    /// Broadcasts, then fails: nothing may leave.
    #[callable]
    pub async fn post_then_fail(&mut self, ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        ctx.sql()
            .execute("INSERT INTO posts(text) VALUES ('doomed')", [])?;
        ctx.broadcast(
            &RoomEvent::Said {
                from: "api".into(),
                text: "doomed".into(),
            },
            &[],
        )?;
        Err(AppError::msg("changed my mind"))
    }

    #[callable]
    pub async fn log(&mut self, ctx: &mut Ctx<Self>) -> Result<Vec<String>, AppError> {
        let mut stmt = ctx.sql().prepare("SELECT entry FROM log ORDER BY n")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The members tagged `tag`, by name.
    #[callable]
    pub async fn members(
        &mut self,
        ctx: &mut Ctx<Self>,
        tag: String,
    ) -> Result<Vec<Member>, AppError> {
        let mut members = Vec::new();
        for conn in ctx.connections_tagged(&tag)? {
            members.push(conn.state()?.unwrap_or_default());
        }
        members.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(members)
    }

    /// Broadcasts `text` to everyone but the connections `except`.
    #[callable]
    pub async fn announce(
        &mut self,
        ctx: &mut Ctx<Self>,
        text: String,
        except: Vec<ConnId>,
    ) -> Result<(), AppError> {
        let from = "api".into();
        ctx.broadcast(&RoomEvent::Said { from, text }, &except)?;
        Ok(())
    }

    /// Who is calling, as the admission hooks said.
    #[callable]
    pub async fn whoami(&mut self, ctx: &mut Ctx<Self>) -> Result<Option<String>, AppError> {
        Ok(ctx.principal().map(str::to_owned))
    }

    /// How many connections are open.
    #[callable]
    pub async fn count(&mut self, ctx: &mut Ctx<Self>) -> Result<usize, AppError> {
        Ok(ctx.connections()?.len())
    }

    /// Sends `n` events of `size` bytes to the user `name` only.
    #[callable]
    pub async fn flood(
        &mut self,
        ctx: &mut Ctx<Self>,
        name: String,
        n: usize,
        size: usize,
    ) -> Result<(), AppError> {
        for conn in ctx.connections_tagged(&format!("user:{name}"))? {
            for _ in 0..n {
                conn.send(&RoomEvent::Flood("x".repeat(size)))?;
            }
        }
        Ok(())
    }

    /// The ids of the connections tagged `tag`.
    #[callable]
    pub async fn ids(&mut self, ctx: &mut Ctx<Self>, tag: String) -> Result<Vec<ConnId>, AppError> {
        Ok(ctx
            .connections_tagged(&tag)?
            .iter()
            .map(|c| c.id().clone())
            .collect())
    }

    /// Sends `text` to the connection `to` only.
    #[callable]
    pub async fn whisper(
        &mut self,
        ctx: &mut Ctx<Self>,
        to: ConnId,
        text: String,
    ) -> Result<(), AppError> {
        let said = RoomEvent::Said {
            from: "whisper".into(),
            text,
        };
        Ok(ctx.send(&to, &said)?)
    }

    /// Sends the raw text frame `poke` to `to`; `false` if it is not open.
    #[callable]
    pub async fn poke(&mut self, ctx: &mut Ctx<Self>, to: ConnId) -> Result<bool, AppError> {
        let conn = ctx.connection(&to)?;
        if let Some(conn) = &conn {
            conn.send_raw(WsMessage::Text("poke".into()));
        }
        Ok(conn.is_some())
    }

    /// Closes the connections of user `name` with 4001.
    #[callable]
    pub async fn kick(&mut self, ctx: &mut Ctx<Self>, name: String) -> Result<usize, AppError> {
        let conns = ctx.connections_tagged(&format!("user:{name}"))?;
        for conn in &conns {
            conn.close(4001, "kicked");
        }
        Ok(conns.len())
    }
}

async fn serve(builder: agents::Builder) -> (TestRuntime, SocketAddr) {
    common::serve(builder.agent::<Room>().agent::<common::Counter>()).await
}

/// The text of the next `Said` event on `ws`, skipping other frames.
async fn next_said(ws: &mut Socket) -> String {
    loop {
        let frame = next_json(ws).await;
        if frame["type"] == "event" {
            return frame["data"]["Said"]["text"].as_str().unwrap().to_owned();
        }
    }
}

/// A JSON-protocol member of room `room`, admitted; returns the socket and its connection id.
/// The identity frame comes before `on_connect` runs; a call answered on the socket proves it
/// ran (the call runs after it, and its reply leaves after the admission), so broadcasts from
/// then on reach this member.
async fn member(addr: SocketAddr, room: &str, user: &str) -> (Socket, String) {
    let path = format!("/agents/room/{room}?user={user}");
    let mut ws = ws_connect(addr, &path, Some("agents.v1.json"))
        .await
        .unwrap();
    let identity = next_json(&mut ws).await;
    assert_eq!(identity["type"], "identity");
    let admitted = call(&mut ws, 0, "count", json!([])).await;
    assert!(
        admitted["ok"].as_u64().is_some_and(|n| n >= 1),
        "{admitted}"
    );
    (ws, identity["conn"].as_str().unwrap().to_owned())
}

/// Reads a refused connection to its end: nothing but its identity may come before the close,
/// which is returned.
async fn closed_unadmitted(ws: &mut Socket) -> Option<CloseFrame> {
    loop {
        match next(ws).await {
            Message::Close(frame) => return frame,
            Message::Text(t) => {
                let frame: Value = serde_json::from_str(&t).unwrap();
                assert_eq!(
                    frame["type"], "identity",
                    "a refused connection got {frame}"
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Polls the room's log until it has an entry starting with `prefix`.
async fn wait_for_log(rt: &TestRuntime, room: &str, prefix: &str) -> Vec<String> {
    let client = rt.runtime().agent::<Room>(room);
    for _ in 0..400 {
        let log = client.log().await.unwrap();
        if log.iter().any(|e| e.starts_with(prefix)) {
            return log;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no `{prefix}` in the log of {room}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_in_order_connect_message_close() {
    // Its database is read while it is live.
    let (rt, addr) = serve(Runtime::builder().readable_while_live(true)).await;
    // No subprotocol: frames go as they are to on_message.
    let mut raw = ws_connect(addr, "/agents/room/order?user=ann", None)
        .await
        .unwrap();
    raw.send(Message::Text("hello".into())).await.unwrap();
    raw.send(Message::Binary(vec![1, 2].into())).await.unwrap();
    raw.close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
        code: CloseCode::Library(4000),
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    let log = wait_for_log(&rt, "order", "close").await;
    assert_eq!(
        log,
        [
            "connect ann",
            "message ann hello",
            "message ann <binary>",
            "close ann 4000 bye"
        ]
    );
    // The connection's rows are gone with it.
    assert_eq!(
        rt.runtime().agent::<Room>("order").count().await.unwrap(),
        0
    );
    let db =
        rusqlite::Connection::open(rt.runtime().database_path::<Room>("order").unwrap()).unwrap();
    let rows: i64 = db
        .query_row(
            "SELECT (SELECT count(*) FROM _agents_connections) + (SELECT count(*) FROM _agents_conn_tags)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rows, 0);

    // A connection that just goes away gets 1006.
    let (ws, _) = member(addr, "order", "bob").await;
    drop(ws);
    let log = wait_for_log(&rt, "order", "close bob").await;
    assert!(log.contains(&"close bob 1006 ".to_owned()), "{log:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_exactly_the_right_sockets() {
    let (rt, addr) = serve(Runtime::builder()).await;
    let mut members = Vec::new();
    for i in 0..5 {
        members.push(member(addr, "bc", &format!("m{i}")).await);
    }
    let mut raw = ws_connect(addr, "/agents/room/bc?user=raw", None)
        .await
        .unwrap();
    // Wait until every on_connect has run (the raw one gets no identity frame).
    let room = rt.runtime().agent::<Room>("bc");
    while room.count().await.unwrap() < 6 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // m0 posts: everyone but m0 gets the event.
    let reply = call(&mut members[0].0, 1, "post", json!(["first"])).await;
    assert_eq!(reply["ok"], 1);
    // m1 says something: everyone but m1 gets it.
    members[1]
        .0
        .send(Message::Text(
            json!({"type": "message", "data": "second"})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    wait_for_log(&rt, "bc", "message m1").await;
    // Then a post from outside any connection reaches all.
    assert_eq!(room.post("third".into()).await.unwrap(), 2);

    let said = |from: &str, text: &str| json!({"Said": {"from": from, "text": text}});
    let all = [
        said("api", "first"),
        said("m1", "second"),
        said("api", "third"),
    ];
    for (i, (ws, _)) in members.iter_mut().enumerate() {
        // m0 does not get its own post, m1 not its own message.
        let own = |k: usize| k == i && i < 2;
        let expected: Vec<Value> = (0..3)
            .filter(|&k| !own(k))
            .map(|k| all[k].clone())
            .collect();
        let mut events = Vec::new();
        while events.len() < expected.len() {
            let frame = next_json(ws).await;
            match frame["type"].as_str() {
                Some("event") => events.push(frame["data"].clone()),
                Some("state" | "reply") => {}
                _ => panic!("unexpected {frame}"),
            }
        }
        assert_eq!(events, expected, "member {i}");
    }
    // A long exclusion list (hashed rather than scanned): m2 and m3, among ids of no socket.
    let mut except: Vec<String> = (0..10).map(|i| format!("gone{i}")).collect();
    except.extend([members[2].1.clone(), members[3].1.clone()]);
    let except: Vec<ConnId> = serde_json::from_value(json!(except)).unwrap();
    room.announce("fourth".into(), except).await.unwrap();
    assert_eq!(room.post("fifth".into()).await.unwrap(), 3);
    for (i, (ws, _)) in members.iter_mut().enumerate() {
        let expected: &[&str] = if i == 2 || i == 3 {
            &["fifth"]
        } else {
            &["fourth", "fifth"]
        };
        for text in expected {
            let event = loop {
                let frame = next_json(ws).await;
                if frame["type"] == "event" {
                    break frame["data"].clone();
                }
            };
            assert_eq!(event, said("api", text), "member {i}");
        }
    }
    // The raw socket gets each event as its bare JSON, and no state frames.
    for text in ["first", "second", "third", "fourth", "fifth"] {
        let Message::Text(t) = next(&mut raw).await else {
            panic!("a text frame")
        };
        let from = if text == "second" { "m1" } else { "api" };
        assert_eq!(serde_json::from_str::<Value>(&t).unwrap(), said(from, text));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_state_and_tags_survive_hibernation_and_a_wake_by_message() {
    // Its database is read while it is live.
    let (rt, addr) = serve(Runtime::builder().readable_while_live(true)).await;
    let (mut ann, _) = member(addr, "hib", "ann").await;
    let (_bob, _) = member(addr, "hib", "bob").await;
    let send =
        |text: &str| Message::Text(json!({"type": "message", "data": text}).to_string().into());
    ann.send(send("one")).await.unwrap();
    wait_for_log(&rt, "hib", "message ann one").await;

    for round in 0..3 {
        assert!(rt.hibernate::<Room>("hib").await.unwrap());
        assert!(!rt.runtime().is_live::<Room>("hib"));
        // The sockets stayed open; a message wakes the agent, which finds the state.
        ann.send(send(&format!("r{round}"))).await.unwrap();
        wait_for_log(&rt, "hib", &format!("message ann r{round}")).await;
    }
    let members = rt
        .runtime()
        .agent::<Room>("hib")
        .members("member".into())
        .await
        .unwrap();
    assert_eq!(
        members,
        [
            Member {
                name: "ann".into(),
                messages: 4
            },
            Member {
                name: "bob".into(),
                messages: 0
            }
        ]
    );
    let tagged = rt
        .runtime()
        .agent::<Room>("hib")
        .members("user:bob".into())
        .await
        .unwrap();
    assert_eq!(tagged.len(), 1);

    // A connection's tags are found by index, not by scanning everyone's; a file from before
    // the index gets it when next opened.
    let path = rt.runtime().database_path::<Room>("hib").unwrap();
    let plan = |db: &rusqlite::Connection| -> String {
        let sql = "EXPLAIN QUERY PLAN SELECT tag FROM _agents_conn_tags WHERE conn = 'x'";
        db.query_row(sql, [], |r| r.get(3)).unwrap()
    };
    assert!(rt.hibernate::<Room>("hib").await.unwrap());
    {
        let db = rusqlite::Connection::open(&path).unwrap();
        assert!(
            plan(&db).contains("_agents_conn_tags_by_conn"),
            "{}",
            plan(&db)
        );
        db.execute_batch(
            "DROP INDEX _agents_conn_tags_by_conn; PRAGMA application_id = 1097269250;",
        )
        .unwrap();
        assert!(plan(&db).starts_with("SCAN"), "{}", plan(&db));
    }
    ann.send(send("again")).await.unwrap();
    wait_for_log(&rt, "hib", "message ann again").await;
    let db = rusqlite::Connection::open(&path).unwrap();
    assert!(
        plan(&db).contains("_agents_conn_tags_by_conn"),
        "{}",
        plan(&db)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_gate_frames_leave_after_the_commit_and_never_for_a_failed_event() {
    // What is committed is read by another connection while the agent is live.
    let (rt, addr) = serve(Runtime::builder().readable_while_live(true)).await;
    let (mut listener, _) = member(addr, "gate", "listener").await;
    let (mut speaker, _) = member(addr, "gate", "speaker").await;
    let db_path = rt.runtime().database_path::<Room>("gate").unwrap();

    // A failed call and a failed on_message broadcast nothing.
    let reply = call(&mut speaker, 1, "post_then_fail", json!([])).await;
    assert_eq!(reply["err"]["kind"], "app");
    speaker
        .send(Message::Text(
            json!({"type": "message", "data": "fail"})
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    // Reported as a call's error would be: kind, message, and the typed error as data.
    let error = next_json(&mut speaker).await;
    assert_eq!(
        error,
        json!({"type": "error", "kind": "app", "message": "refused to say it",
               "data": {"message": "refused to say it"}})
    );

    // Every event the listener sees is already committed, as seen from another connection.
    let db = rusqlite::Connection::open(&db_path).unwrap();
    for i in 1..=50u64 {
        let reply = call(&mut speaker, 100 + i, "post", json!([format!("p{i}")])).await;
        assert_eq!(reply["ok"], i);
        loop {
            let frame = next_json(&mut listener).await;
            if frame["type"] != "event" {
                continue;
            }
            assert_eq!(frame["data"]["Said"]["text"], format!("p{i}"), "{frame}");
            let stored: i64 = db
                .query_row(
                    "SELECT count(*) FROM posts WHERE text = ?1",
                    [format!("p{i}")],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(
                stored, 1,
                "event p{i} arrived before its write was committed"
            );
            break;
        }
    }
    let doomed: i64 = db
        .query_row(
            "SELECT count(*) FROM posts WHERE text = 'doomed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(doomed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_is_closed_while_100_others_keep_receiving() {
    let (rt, addr) = serve(Runtime::builder().outbound_queue(64)).await;
    let (slow, _) = member(addr, "slow", "slow").await;
    let mut others = Vec::new();
    for i in 0..100 {
        others.push(member(addr, "slow", &format!("o{i}")).await.0);
    }
    let room = rt.runtime().agent::<Room>("slow");
    while room.count().await.unwrap() < 101 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // 16 MB for the client that never reads: more than the socket buffers and its queue.
    room.flood("slow".into(), 2000, 8 * 1024).await.unwrap();
    for i in 0..20 {
        room.post(format!("b{i}")).await.unwrap();
    }
    let log = wait_for_log(&rt, "slow", "close slow").await;
    assert!(
        log.iter().any(|e| e.starts_with("close slow 1008")),
        "{log:?}"
    );
    assert!(
        log.iter()
            .any(|e| e.starts_with("error slow the client does not read")),
        "{log:?}"
    );
    // Every other client got all 20 broadcasts, in order.
    for ws in &mut others {
        let mut got = Vec::new();
        while got.len() < 20 {
            let frame = next_json(ws).await;
            if frame["type"] == "event" {
                got.push(frame["data"]["Said"]["text"].as_str().unwrap().to_owned());
            }
        }
        assert_eq!(got, (0..20).map(|i| format!("b{i}")).collect::<Vec<_>>());
    }
    assert_eq!(room.count().await.unwrap(), 100);
    drop(slow);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_state_arrives_on_connect_and_on_change() {
    let (rt, addr) = serve(Runtime::builder()).await;
    let (mut a, _) = member(addr, "state", "a").await;
    rt.runtime()
        .agent::<Room>("state")
        .post("hello".into())
        .await
        .unwrap();
    // The existing connection gets the event, then the state change.
    assert_eq!(next_json(&mut a).await["type"], "event");
    assert_eq!(
        next_json(&mut a).await,
        json!({"type": "state", "state": {"topic": "", "posts": 1}})
    );
    // A new connection gets identity, then the state.
    let mut b = ws_connect(addr, "/agents/room/state?user=b", Some("agents.v1.json"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut b).await["type"], "identity");
    assert_eq!(
        next_json(&mut b).await,
        json!({"type": "state", "state": {"topic": "", "posts": 1}})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admission_hooks_refuse_without_waking_the_agent() {
    let (rt, addr) = serve(Runtime::builder()).await;
    let err = ws_connect(
        addr,
        "/agents/room/guarded?token=bad",
        Some("agents.v1.json"),
    )
    .await
    .unwrap_err();
    assert!(err.contains("401"), "{err}");
    let http = reqwest_like_post(addr, "/agents/room/guarded/call/count?token=bad", "[]").await;
    assert!(http.starts_with("HTTP/1.1 401"), "{http}");
    // Nothing was woken: no database was ever opened (on_start never ran).
    assert!(!rt.runtime().is_live::<Room>("guarded"));
    assert!(!rt
        .runtime()
        .database_path::<Room>("guarded")
        .unwrap()
        .exists());

    // on_connect can refuse too, after the agent woke: closed with 1008 and the reason.
    let mut ws = ws_connect(
        addr,
        "/agents/room/guarded?user=banned",
        Some("agents.v1.json"),
    )
    .await
    .unwrap();
    assert_eq!(next_json(&mut ws).await["type"], "identity");
    match next(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!(f.code, CloseCode::Policy);
            assert!(f.reason.contains("banned users may not join"), "{f:?}");
        }
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_sent_before_on_connect_refuses_never_run() {
    let (rt, addr) = serve(Runtime::builder()).await;
    // Frames are read while on_connect runs (slowly, here): these calls reach the agent
    // before it refuses the connection, and must never run.
    let mut ws = ws_connect(
        addr,
        "/agents/room/sneaky?user=slow-banned",
        Some("agents.v1.json"),
    )
    .await
    .unwrap();
    for id in 0..5 {
        let frame = json!({"type": "call", "id": id, "method": "post", "args": ["sneaked in"]});
        send_json(&mut ws, frame).await;
    }
    let f = closed_unadmitted(&mut ws).await.expect("a close frame");
    assert_eq!(f.code, CloseCode::Policy);
    assert!(f.reason.contains("banned users may not join"), "{f:?}");
    // None of them was posted: the room's first post is this one.
    let room = rt.runtime().agent::<Room>("sneaky");
    assert_eq!(room.post("after".into()).await.unwrap(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_request_serves_other_paths_and_defaults_to_404() {
    let (rt, addr) = serve(Runtime::builder()).await;
    let answer = reqwest_like_post(addr, "/agents/room/req/some/path?user=zoe", "abc").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(r#"["/agents/room/req/some/path","zoe",3]"#),
        "{answer}"
    );
    let log = rt.runtime().agent::<Room>("req").log().await.unwrap();
    assert_eq!(
        log,
        [r#"request /agents/room/req/some/path Some("zoe") None"#]
    );
    // A plain GET of the agent's own path (no upgrade) reaches on_request as well.
    let answer = http(
        addr,
        "GET /agents/room/req HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // An agent without on_request answers 404.
    let answer = reqwest_like_post(addr, "/agents/counter/c/anything", "").await;
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_can_close_a_connection() {
    let (rt, addr) = serve(Runtime::builder()).await;
    let (mut ws, _) = member(addr, "kick", "eve").await;
    assert_eq!(
        rt.runtime()
            .agent::<Room>("kick")
            .kick("eve".into())
            .await
            .unwrap(),
        1
    );
    match next(&mut ws).await {
        Message::Close(Some(f)) => {
            assert_eq!((u16::from(f.code), f.reason.as_str()), (4001, "kicked"))
        }
        other => panic!("expected a close, got {other:?}"),
    }
    let log = wait_for_log(&rt, "kick", "close eve").await;
    assert!(log.contains(&"close eve 4001 kicked".to_owned()), "{log:?}");
}

/// A raw HTTP/1.1 exchange: the whole response as text.
async fn http(addr: SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

async fn reqwest_like_post(addr: SocketAddr, path: &str, body: &str) -> String {
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_knows_its_principal_over_http_and_websocket_but_not_in_process() {
    let (rt, addr) = serve(Runtime::builder()).await;
    let http = reqwest_like_post(addr, "/agents/room/who/call/whoami?user=ann", "[]").await;
    assert!(http.ends_with("\r\n\r\n\"ann\""), "{http}");
    let http = reqwest_like_post(addr, "/agents/room/who/call/whoami", "[]").await;
    assert!(http.ends_with("\r\n\r\nnull"), "{http}");
    let (mut ws, _) = member(addr, "who", "bob").await;
    assert_eq!(call(&mut ws, 1, "whoami", json!([])).await["ok"], "bob");
    let room = rt.runtime().agent::<Room>("who");
    assert_eq!(room.whoami().await.unwrap(), None);
    // A call on the connection after an HTTP call still sees its own principal.
    assert_eq!(call(&mut ws, 2, "whoami", json!([])).await["ok"], "bob");
    // An event after a call does not see the call's principal.
    let answer = reqwest_like_post(addr, "/agents/room/who/after?user=cy", "").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let log = room.log().await.unwrap();
    assert_eq!(
        log.last().unwrap(),
        r#"request /agents/room/who/after Some("cy") None"#
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_remote_client_gets_events_and_state_and_reconnects() {
    let (rt, addr) = serve(Runtime::builder()).await;
    let room = rt.runtime().agent::<Room>("typed");
    room.post("before".into()).await.unwrap();
    let client = RoomClient::connect(&format!("ws://{addr}/agents/room/typed?user=cli"))
        .await
        .unwrap();
    let mut events = client.events();
    let mut changes = client.state_changes();
    // The state arrived on connect.
    while client.state().is_none() {
        changes.changed().await.unwrap().unwrap();
    }
    assert_eq!(client.state().unwrap().posts, 1);

    assert_eq!(room.post("one".into()).await.unwrap(), 2);
    assert_eq!(
        events.next().await.unwrap().unwrap(),
        RoomEvent::Said {
            from: "api".into(),
            text: "one".into()
        }
    );
    assert_eq!(changes.changed().await.unwrap().unwrap().posts, 2);
    // Its own post is not echoed back to it (the agent excludes the caller).
    assert_eq!(client.post("mine".into()).await.unwrap(), 3);

    // The agent closes the connection: the client reconnects, and the same subscriptions go on.
    assert_eq!(room.kick("cli".into()).await.unwrap(), 1);
    wait_for_log(&rt, "typed", "close cli 4001").await;
    while room.count().await.unwrap() == 0 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(room.post("two".into()).await.unwrap(), 4);
    assert_eq!(
        events.next().await.unwrap().unwrap(),
        RoomEvent::Said {
            from: "api".into(),
            text: "two".into()
        }
    );
    while client.state().map(|s| s.posts) != Some(4) {
        changes.changed().await.unwrap().unwrap();
    }
    // Typed errors and calls over the new connection.
    assert_eq!(
        client.post_then_fail().await.unwrap_err(),
        RpcError::App(AppError::msg("changed my mind"))
    );
    assert_eq!(client.count().await.unwrap(), 1);
    // In-process clients have no events.
    assert!(room.events().next().await.is_none());
    // Dropping the client closes its socket properly (a close frame, not a lost connection).
    drop((client, events, changes));
    let log = wait_for_log(&rt, "typed", "close cli 100").await;
    assert!(
        log.iter().any(|e| e.starts_with("close cli 1000")),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gets_no_broadcast_before_on_connect_admits_it() {
    let (rt, addr) = serve(Runtime::builder()).await;
    let room = rt.runtime().agent::<Room>("admit");
    room.post("warm".into()).await.unwrap();
    // Broadcasts flow the whole time the refused connections try to join.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let poster = tokio::spawn({
        let (room, stop) = (room.clone(), stop.clone());
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                room.post("flowing".into()).await.unwrap();
            }
        }
    });
    for _ in 0..20 {
        let mut ws = ws_connect(
            addr,
            "/agents/room/admit?user=banned",
            Some("agents.v1.json"),
        )
        .await
        .unwrap();
        closed_unadmitted(&mut ws).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    poster.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_sends_reach_one_connection_and_postcard_messages_reach_on_message() {
    let (rt, addr) = serve(Runtime::builder()).await;
    let room = rt.runtime().agent::<Room>("direct");
    let (mut a, a_id) = member(addr, "direct", "a").await;
    let (mut b, _) = member(addr, "direct", "b").await;
    let mut raw = ws_connect(addr, "/agents/room/direct?user=raw", None)
        .await
        .unwrap();
    let raw_id = loop {
        if let Some(id) = room.ids("user:raw".into()).await.unwrap().pop() {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let a_conn: ConnId = serde_json::from_value(json!(a_id)).unwrap();

    room.whisper(a_conn, "psst".into()).await.unwrap();
    assert!(room.poke(raw_id).await.unwrap());
    let gone: ConnId = serde_json::from_value(json!("0000000000000000")).unwrap();
    assert!(!room.poke(gone).await.unwrap());
    room.post("after".into()).await.unwrap();

    assert_eq!(next_said(&mut a).await, "psst");
    assert_eq!(next_said(&mut a).await, "after");
    assert_eq!(
        next_said(&mut b).await,
        "after",
        "the whisper reached only a"
    );
    assert_eq!(next(&mut raw).await, Message::Text("poke".into()));

    // A postcard `Message` frame reaches on_message as binary.
    let mut pc = ws_connect(
        addr,
        "/agents/room/direct?user=pc",
        Some("agents.v1.postcard"),
    )
    .await
    .unwrap();
    next(&mut pc).await; // identity
    let frame = agents::client::protocol::PostcardClientFrame::Message {
        data: vec![1, 2, 3],
    };
    pc.send(Message::Binary(
        agents::client::protocol::to_postcard(&frame).into(),
    ))
    .await
    .unwrap();
    wait_for_log(&rt, "direct", "message pc <binary>").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_with_1000() {
    let (rt, addr) =
        serve(Runtime::builder().connection_idle_timeout(Duration::from_millis(300))).await;
    let (mut ws, _) = member(addr, "idle", "sleepy").await;
    loop {
        match next(&mut ws).await {
            Message::Close(Some(f)) => {
                assert_eq!(f.code, CloseCode::Normal);
                break;
            }
            Message::Text(_) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    }
    let log = wait_for_log(&rt, "idle", "close sleepy").await;
    assert!(
        log.contains(&"close sleepy 1000 no frame for 300ms".to_owned()),
        "{log:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_with_1001() {
    let (rt, addr) = serve(Runtime::builder()).await;
    let (mut ws, _) = member(addr, "down", "x").await;
    rt.runtime().clone().shutdown().await;
    loop {
        match next(&mut ws).await {
            Message::Close(Some(f)) => {
                assert_eq!(f.code, CloseCode::Away);
                break;
            }
            Message::Text(_) => continue,
            other => panic!("expected a close, got {other:?}"),
        }
    }
}

/// A reply the agent writes straight into the socket (the only call in flight, see
/// `Outbound::send_now`) never overtakes the frames its event queued before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_comes_after_the_events_its_call_sent() {
    let (_rt, addr) = serve(Runtime::builder()).await;
    let (mut ws, _) = member(addr, "order", "me").await;
    for round in 1..=20u64 {
        let n = 50 * round as usize;
        send_json(
            &mut ws,
            json!({"type": "call", "id": round, "method": "flood", "args": ["me", n, 100]}),
        )
        .await;
        let mut events = 0;
        loop {
            let frame = next_json(&mut ws).await;
            match frame["type"].as_str() {
                Some("event") => events += 1,
                Some("reply") => {
                    assert_eq!(frame["id"], round, "{frame}");
                    break;
                }
                _ => {}
            }
        }
        assert_eq!(
            events, n,
            "every event of call {round} came before its reply"
        );
    }
}
