//! Each event's span and its trace context.
//!
//! Every event runs in an info-level span `event` (class, name, method or hook, outcome, and
//! `trace`, the trace's id). Its trace context is the one its caller made the call in (an agent's
//! event, a W3C `traceparent` of an HTTP call or a WebSocket call, `agents_client::trace::scope`),
//! with a span of its own; an event nobody called in a trace starts one. The calls it makes carry
//! its context (see `registry::Chain`), so one request's path through several agents, in this
//! process or over the network, is one trace.
//!
//! With the `opentelemetry` feature and a `tracing_opentelemetry` layer installed, the event's
//! span *is* the OpenTelemetry span of that context: its parent is the caller's span, and the
//! ids the calls carry are OpenTelemetry's, so an exporter sees the agents' spans as one tree.

use agents_client::trace::TraceContext;
use tracing::Span;

use crate::address::AgentKey;

/// The span of an event of `key` running `method` (fields evaluated only if a subscriber
/// wants the span), and its trace context, made in `parent` (its caller's) if any.
pub(crate) fn event_span(
    key: &AgentKey,
    method: &str,
    parent: Option<TraceContext>,
) -> (Span, TraceContext) {
    // A root of its own, or its caller's child (below): not a child of the agent's span, which
    // lives as long as the agent and would put every event of it in one trace.
    let span = tracing::info_span!(
        parent: None,
        "event",
        class = key.class(),
        name = key.name(),
        method,
        trace = tracing::field::Empty,
        outcome = tracing::field::Empty,
    );
    let context = context_of(&span, parent);
    if !span.is_disabled() {
        span.record("trace", tracing::field::display(context.trace_id()));
    }
    (span, context)
}

/// The trace context of `span`: OpenTelemetry's, when it records the span.
#[cfg(feature = "opentelemetry")]
fn context_of(span: &Span, parent: Option<TraceContext>) -> TraceContext {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if span.is_disabled() {
        return mine(parent);
    }
    if let Some(parent) = parent {
        let remote = SpanContext::new(
            TraceId::from(parent.trace_id().0),
            SpanId::from(parent.span_id()),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
    let otel = span.context();
    let ids = otel.span().span_context().clone();
    let trace = u128::from_be_bytes(ids.trace_id().to_bytes());
    let span_id = u64::from_be_bytes(ids.span_id().to_bytes());
    TraceContext::new(trace, span_id).unwrap_or_else(|| mine(parent))
}

#[cfg(not(feature = "opentelemetry"))]
fn context_of(_: &Span, parent: Option<TraceContext>) -> TraceContext {
    mine(parent)
}

/// A span of our own: in `parent`'s trace, or the first of a new one.
fn mine(parent: Option<TraceContext>) -> TraceContext {
    parent.map_or_else(TraceContext::root, |p| p.child())
}
