//! `on_message` gets the same message whatever the connection speaks, and knows which it is.

mod common;

use agents::{client::protocol::PostcardClientFrame, prelude::*, Protocol};
use common::{next_frame, next_json, send_json, serve, ws_connect};
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

#[derive(Default)]
pub struct Parrot;

impl Agent for Parrot {
    /// Answers with what it got, as a raw text frame.
    async fn on_message(
        &mut self,
        _ctx: &mut Ctx<Self>,
        conn: &Conn<Self>,
        msg: WsMessage,
    ) -> Result<(), AppError> {
        let protocol = conn.protocol();
        assert!(matches!(
            protocol,
            Protocol::Json | Protocol::Postcard | Protocol::Raw
        ));
        let decoded = msg.json::<serde_json::Value>().ok();
        conn.send_raw(WsMessage::Text(format!("{protocol:?} {msg:?} {decoded:?}")));
        Ok(())
    }
}

#[agent]
impl Parrot {}

async fn text(ws: &mut common::Socket) -> String {
    loop {
        match next_frame(ws).await {
            Message::Text(t) if !t.starts_with('{') => return t.as_str().to_owned(),
            Message::Text(_) => continue, // identity
            other => panic!("expected text, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_arrives_the_same_on_every_protocol() {
    let (_rt, addr) = serve(Runtime::builder().agent::<Parrot>()).await;

    let mut raw = ws_connect(addr, "/agents/parrot/p", None).await.unwrap();
    raw.send(Message::Text("hi".into())).await.unwrap();
    assert_eq!(text(&mut raw).await, r#"Raw Text("hi") None"#);
    raw.send(Message::Text(r#"{"x":1}"#.into())).await.unwrap();
    assert_eq!(
        text(&mut raw).await,
        r#"Raw Text("{\"x\":1}") Some(Object {"x": Number(1)})"#
    );

    let mut js = ws_connect(addr, "/agents/parrot/p", Some("agents.v1.json"))
        .await
        .unwrap();
    assert_eq!(next_json(&mut js).await["type"], "identity");
    send_json(&mut js, json!({"type": "message", "data": "hi"})).await;
    assert_eq!(text(&mut js).await, r#"Json Text("hi") None"#);
    send_json(&mut js, json!({"type": "message", "data": {"x": 1}})).await;
    assert_eq!(
        text(&mut js).await,
        r#"Json Text("{\"x\":1}") Some(Object {"x": Number(1)})"#
    );

    let mut pc = ws_connect(addr, "/agents/parrot/p", Some("agents.v1.postcard"))
        .await
        .unwrap();
    assert!(
        matches!(next_frame(&mut pc).await, Message::Binary(_)),
        "identity"
    );
    let frame = PostcardClientFrame::Message {
        data: b"hi".to_vec(),
    };
    pc.send(Message::Binary(postcard::to_stdvec(&frame).unwrap().into()))
        .await
        .unwrap();
    assert_eq!(text(&mut pc).await, r#"Postcard Binary([104, 105]) None"#);
}

/// Records, in `on_connect`, what it sees of its connections right after changing its own.
#[derive(Default)]
pub struct Census;

impl Agent for Census {
    async fn on_connect(&mut self, ctx: &mut Ctx<Self>, conn: &Conn<Self>) -> Result<(), AppError> {
        conn.set_state(&format!("member {}", conn.id()))?;
        conn.set_tags(&["counted"]);
        let states: Vec<String> = ctx
            .connections()?
            .iter()
            .filter_map(|c| c.state().ok().flatten())
            .collect();
        let tagged = ctx.connections_tagged("counted")?.len();
        let own = ctx
            .connection(conn.id())?
            .and_then(|c| c.state().ok().flatten());
        ctx.kv().put("seen", &(states, tagged, own))?;
        ctx.kv().put("count", &ctx.connection_count())?;
        Ok(())
    }
}

#[agent(conn_state = "String")]
impl Census {
    #[callable]
    pub async fn count(&mut self, ctx: &mut Ctx<Self>) -> Result<Option<usize>, AppError> {
        Ok(ctx.kv().get("count")?)
    }

    #[callable]
    pub async fn seen(
        &mut self,
        ctx: &mut Ctx<Self>,
    ) -> Result<Option<(Vec<String>, usize, Option<String>)>, AppError> {
        Ok(ctx.kv().get("seen")?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_sees_the_connection_changes_it_made() {
    let (rt, addr) = serve(Runtime::builder().agent::<Census>()).await;
    let mut ws = ws_connect(addr, "/agents/census/c", Some("agents.v1.json"))
        .await
        .unwrap();
    let identity = next_json(&mut ws).await;
    let id = identity["conn"].as_str().unwrap().to_owned();
    let mut seen = None;
    for _ in 0..400 {
        seen = rt.agent::<Census>("c").seen().await.unwrap();
        if seen.is_some() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let member = format!("member {id}");
    assert_eq!(seen, Some((vec![member.clone()], 1, Some(member))));
    assert_eq!(rt.agent::<Census>("c").count().await, Ok(Some(1)));
}
