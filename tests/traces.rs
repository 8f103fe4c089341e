//! Traces: every event has an info-level span `event` with its agent's class and name, the
//! method (or hook) and the outcome; calls made while it runs carry its `trace`, so one
//! request's path through three agents is one trace, and another request is another; an HTTP
//! call with a W3C `traceparent` joins the caller's trace, and so does a call over a WebSocket
//! (the typed network client sends its handler's trace along, in both codecs; a JSON `call`
//! frame may carry a `traceparent`).

mod common;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
};

use agents::{prelude::*, Codec, ConnectOptions};
use tracing::{
    field::{Field, Visit},
    span::{Attributes, Id, Record},
    Event, Metadata, Subscriber,
};

/// The fields of every `event` span, by span id.
#[derive(Default)]
struct Spans {
    fields: Mutex<HashMap<u64, HashMap<String, String>>>,
    next: AtomicU64,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), value.to_owned());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().to_owned(), format!("{value:?}"));
    }
}

/// A subscriber that records the `event` spans (the test's only one: installed globally, as
/// the agents run on the runtime's worker threads).
struct Recorder(Arc<Spans>);

impl Subscriber for Recorder {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.is_span() && metadata.name() == "event"
    }

    fn new_span(&self, attrs: &Attributes<'_>) -> Id {
        let id = self.0.next.fetch_add(1, Ordering::Relaxed) + 1;
        let mut fields = HashMap::new();
        attrs.record(&mut Fields(&mut fields));
        self.0.fields.lock().unwrap().insert(id, fields);
        Id::from_u64(id)
    }

    fn record(&self, span: &Id, values: &Record<'_>) {
        if let Some(fields) = self.0.fields.lock().unwrap().get_mut(&span.into_u64()) {
            values.record(&mut Fields(fields));
        }
    }

    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, _: &Event<'_>) {}
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

/// Passes a call on to the next agent: `first` → `second` → `third`.
#[derive(Default)]
pub struct Relay;

impl Agent for Relay {}

#[agent]
impl Relay {
    #[callable]
    pub async fn pass(&mut self, ctx: &mut Ctx<Self>, hops: u32) -> Result<u32, AppError> {
        if hops == 0 {
            return Ok(0);
        }
        let next = match ctx.name() {
            "first" => "second",
            _ => "third",
        };
        let runtime = ctx.runtime()?;
        let passed = runtime.agent::<Relay>(next).pass(hops - 1).await?;
        Ok(passed + 1)
    }

    /// As `pass`, but over the network: the next agent is called through a WebSocket to
    /// `base`, in postcard or JSON.
    #[callable]
    pub async fn pass_over(
        &mut self,
        ctx: &mut Ctx<Self>,
        base: String,
        json: bool,
        hops: u32,
    ) -> Result<u32, AppError> {
        if hops == 0 {
            return Ok(0);
        }
        let next = match ctx.name() {
            "first" => "second",
            _ => "third",
        };
        let codec = if json { Codec::Json } else { Codec::Postcard };
        let url = format!("{base}/agents/relay/{next}");
        let client = RelayClient::connect_with(&url, ConnectOptions::new().codec(codec))
            .await
            .map_err(|e| AppError::msg(e.to_string()))?;
        Ok(client.pass_over(base, json, hops - 1).await? + 1)
    }

    #[callable]
    pub async fn refuse(&mut self, _ctx: &mut Ctx<Self>) -> Result<(), AppError> {
        Err(AppError::msg("no"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_through_three_agents_is_one_trace() {
    let spans = Arc::new(Spans::default());
    tracing::subscriber::set_global_default(Recorder(spans.clone())).unwrap();
    let (rt, addr) = common::serve(Runtime::builder().agent::<Relay>()).await;
    assert_eq!(rt.agent::<Relay>("first").pass(2).await.unwrap(), 2);
    assert_eq!(rt.agent::<Relay>("first").pass(2).await.unwrap(), 2);
    rt.agent::<Relay>("third").refuse().await.unwrap_err();

    let recorded: Vec<HashMap<String, String>> =
        spans.fields.lock().unwrap().values().cloned().collect();
    let calls: Vec<_> = recorded.iter().filter(|f| f["method"] == "pass").collect();
    assert_eq!(
        calls.len(),
        6,
        "two requests of three events each: {recorded:?}"
    );
    let mut traces: HashMap<&str, Vec<&str>> = HashMap::new();
    for span in &calls {
        assert_eq!(span["class"], "relay");
        assert_eq!(
            span.get("outcome").map(String::as_str),
            Some("ok"),
            "{span:?}"
        );
        assert_eq!(span["trace"].len(), 32, "{span:?}");
        traces
            .entry(&span["trace"])
            .or_default()
            .push(&span["name"]);
    }
    assert_eq!(traces.len(), 2, "one trace per request: {traces:?}");
    for names in traces.values_mut() {
        names.sort();
        assert_eq!(names, &["first", "second", "third"]);
    }
    let refused: Vec<_> = recorded
        .iter()
        .filter(|f| f["method"] == "refuse")
        .collect();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["outcome"], "app");
    assert!(
        !traces.contains_key(refused[0]["trace"].as_str()),
        "a new request, a new trace"
    );

    // Over HTTP, in the caller's trace.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let header = format!("traceparent: 00-{trace}-00f067aa0ba902b7-01");
    let (status, body) = common::http_request_with(
        addr,
        "POST",
        "/agents/relay/first/call/pass",
        &[&header],
        "[2]",
    )
    .await;
    assert_eq!((status, body), (200, serde_json::json!(2)));
    assert_eq!(
        traces_of(&spans, "pass")[trace],
        ["first", "second", "third"]
    );

    // Over WebSockets, agent to agent: each request one trace, through all three.
    let base = format!("ws://{addr}");
    for json in [false, true] {
        let first = rt.agent::<Relay>("first");
        assert_eq!(first.pass_over(base.clone(), json, 2).await.unwrap(), 2);
    }
    let traces = traces_of(&spans, "pass_over");
    assert_eq!(traces.len(), 2, "one trace per request: {traces:?}");
    for names in traces.values() {
        assert_eq!(names, &["first", "second", "third"]);
    }

    // A JSON `call` frame with a `traceparent`, from any client.
    let trace = "0af7651916cd43dd8448eb211c80319c";
    let mut ws = common::ws_connect(addr, "/agents/relay/first", Some("agents.v1.json"))
        .await
        .unwrap();
    common::next_json(&mut ws).await; // identity
    let call = serde_json::json!({"type": "call", "id": 1, "method": "pass", "args": [2],
        "traceparent": format!("00-{trace}-b7ad6b7169203331-01")});
    common::send_json(&mut ws, call).await;
    let reply = common::next_json(&mut ws).await;
    assert_eq!(
        reply,
        serde_json::json!({"type": "reply", "id": 1, "ok": 2})
    );
    assert_eq!(
        traces_of(&spans, "pass")[trace],
        ["first", "second", "third"]
    );
}

/// The names of the agents whose `method` events succeeded, sorted, by trace.
fn traces_of(spans: &Spans, method: &str) -> HashMap<String, Vec<String>> {
    let mut traces: HashMap<String, Vec<String>> = HashMap::new();
    for span in spans.fields.lock().unwrap().values() {
        if span["method"] == method {
            assert_eq!(
                span.get("outcome").map(String::as_str),
                Some("ok"),
                "{span:?}"
            );
            let names = traces.entry(span["trace"].clone()).or_default();
            names.push(span["name"].clone());
            names.sort();
        }
    }
    traces
}
