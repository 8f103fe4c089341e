//! With the `opentelemetry` feature, the events' spans are OpenTelemetry spans of one tree per
//! request: exported by the SDK (its in-memory exporter here) behind a `tracing_opentelemetry`
//! layer, a call through three agents, in process and over WebSockets, is one trace whose spans
//! are each the parent of the next; an HTTP call with a `traceparent` hangs under its caller's
//! span.

mod common;

use std::time::Duration;

use agents::{prelude::*, Codec, ConnectOptions};
use opentelemetry::trace::{SpanId, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;

/// Passes a call on to the next agent: `first` → `second` → `third`, in process or over a
/// WebSocket to `base`.
#[derive(Default)]
pub struct Relay;

impl Agent for Relay {}

#[agent]
impl Relay {
    #[callable]
    pub async fn pass(
        &mut self,
        ctx: &mut Ctx<Self>,
        base: Option<String>,
        hops: u32,
    ) -> Result<u32, AppError> {
        if hops == 0 {
            return Ok(0);
        }
        let next = match ctx.name() {
            "first" => "second",
            _ => "third",
        };
        let passed = match &base {
            None => {
                ctx.runtime()?
                    .agent::<Relay>(next)
                    .pass(None, hops - 1)
                    .await?
            }
            Some(url) => {
                let url = format!("{url}/agents/relay/{next}");
                let options = ConnectOptions::new().codec(Codec::Json);
                let client = RelayClient::connect_with(&url, options)
                    .await
                    .map_err(|e| AppError::msg(e.to_string()))?;
                client.pass(base, hops - 1).await?
            }
        };
        Ok(passed + 1)
    }
}

/// The exported spans of `pass` events, once there are `count` (a span ends after its reply
/// may have left); the exporter is emptied.
async fn events(exporter: &InMemorySpanExporter, count: usize) -> Vec<SpanData> {
    for _ in 0..200 {
        let spans: Vec<SpanData> = exporter
            .get_finished_spans()
            .unwrap()
            .into_iter()
            .filter(|s| s.name == "event" && attribute(s, "method") == Some("pass"))
            .collect();
        if spans.len() >= count {
            exporter.reset();
            return spans;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!(
        "fewer than {count} spans exported: {:?}",
        exporter.get_finished_spans()
    );
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a str> {
    let kv = span.attributes.iter().find(|kv| kv.key.as_str() == key)?;
    match &kv.value {
        opentelemetry::Value::String(s) => Some(s.as_str()),
        _ => None,
    }
}

fn named<'a>(spans: &'a [SpanData], name: &str) -> &'a SpanData {
    spans
        .iter()
        .find(|s| attribute(s, "name") == Some(name))
        .unwrap_or_else(|| panic!("no span of {name}: {spans:?}"))
}

/// Checks that `spans` are one trace, `first` → `second` → `third`, each the parent of the
/// next; returns the first's.
fn one_tree(spans: &[SpanData]) -> &SpanData {
    let (first, second, third) = (
        named(spans, "first"),
        named(spans, "second"),
        named(spans, "third"),
    );
    let trace = first.span_context.trace_id();
    assert_ne!(trace, TraceId::INVALID);
    for span in [second, third] {
        assert_eq!(span.span_context.trace_id(), trace, "one trace: {spans:?}");
    }
    assert_eq!(second.parent_span_id, first.span_context.span_id());
    assert_eq!(third.parent_span_id, second.span_context.span_id());
    first
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_through_three_agents_is_one_opentelemetry_tree() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("agents-test"));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer)).unwrap();
    let (rt, addr) = common::serve(Runtime::builder().agent::<Relay>()).await;

    // In process: the first event starts the trace.
    let first = rt.agent::<Relay>("first");
    assert_eq!(first.pass(None, 2).await.unwrap(), 2);
    let spans = events(&exporter, 3).await;
    assert_eq!(one_tree(&spans).parent_span_id, SpanId::INVALID);

    // Over WebSockets (JSON), agent to agent.
    let base = format!("ws://{addr}");
    assert_eq!(first.pass(Some(base), 2).await.unwrap(), 2);
    let spans = events(&exporter, 3).await;
    assert_eq!(one_tree(&spans).parent_span_id, SpanId::INVALID);

    // Over HTTP, under the caller's span.
    let header = "traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let (status, body) = common::http_request_with(
        addr,
        "POST",
        "/agents/relay/first/call/pass",
        &[header],
        "[null, 2]",
    )
    .await;
    assert_eq!((status, body), (200, serde_json::json!(2)));
    let spans = events(&exporter, 3).await;
    let first = one_tree(&spans);
    assert_eq!(
        first.span_context.trace_id(),
        TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128)
    );
    assert_eq!(
        first.parent_span_id,
        SpanId::from(0x00f0_67aa_0ba9_02b7_u64)
    );
}
