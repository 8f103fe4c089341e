//! Trace context: which trace a call belongs to, and which span made it, carried from caller to
//! agent so that one request's path through several agents (in one process or over the
//! network) is one trace.
//!
//! Inside an agent's handler the runtime sets the [`current`] context (the event's own), and
//! every call the handler makes carries it: in process, over HTTP (a W3C `traceparent`
//! header) and over a WebSocket (a `call` frame with a `traceparent` field, see
//! [`protocol`](crate::protocol)). Code outside any runtime joins a trace of its own with
//! [`scope`]:
//!
//! ```
//! use agents_client::trace::{self, TraceContext};
//!
//! # async fn f() {
//! let incoming = TraceContext::from_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
//! trace::scope(incoming.unwrap(), async {
//!     // calls made here (by any typed client) belong to trace 4bf92f35…
//! })
//! .await;
//! # }
//! ```

use std::{cell::Cell, fmt, future::Future, num::NonZeroU64};

/// A trace's id: 128 bits, written as 32 hex digits (as W3C trace context writes them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub u128);

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

/// A trace, and the span in it that work is done in (a call made there has that span as its
/// parent). Neither id is ever zero.
///
/// (The trace id is kept as two halves, so that the context is aligned as a `u64` and an
/// `Option` of it takes 24 bytes: it rides in every call and in connections' futures.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_hi: u64,
    trace_lo: u64,
    span_id: NonZeroU64,
}

impl TraceContext {
    /// The span `span_id` of trace `trace_id`; `None` if either is zero (W3C: invalid).
    pub fn new(trace_id: u128, span_id: u64) -> Option<Self> {
        let span_id = NonZeroU64::new(span_id).filter(|_| trace_id != 0)?;
        Some(TraceContext {
            trace_hi: (trace_id >> 64) as u64,
            trace_lo: trace_id as u64,
            span_id,
        })
    }

    /// A new trace, with a first span: random ids.
    pub fn root() -> Self {
        TraceContext {
            trace_hi: random().get(),
            trace_lo: random().get(),
            span_id: random(),
        }
    }

    /// A new span in this trace (a random id).
    pub fn child(&self) -> Self {
        TraceContext {
            span_id: random(),
            ..*self
        }
    }

    /// The context of a W3C `traceparent` header (`00-<32 hex trace>-<16 hex parent>-<2 hex
    /// flags>`), if it is one: zero ids and other versions' extra fields are refused as W3C
    /// says for version `00`.
    pub fn from_traceparent(header: &str) -> Option<Self> {
        let mut parts = header.trim().split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        let valid = hex(version, 2)
            && version != "ff"
            && hex(trace, 32)
            && hex(span, 16)
            && hex(flags, 2)
            && (version != "00" || parts.next().is_none());
        if !valid {
            return None;
        }
        let trace_id = u128::from_str_radix(trace, 16).ok()?;
        let span_id = u64::from_str_radix(span, 16).ok()?;
        TraceContext::new(trace_id, span_id)
    }

    /// The W3C `traceparent` of a call made in this span (sampled).
    pub fn traceparent(&self) -> String {
        format!("00-{}-{:016x}-01", self.trace_id(), self.span_id)
    }

    /// The trace.
    pub fn trace_id(&self) -> TraceId {
        TraceId(u128::from(self.trace_hi) << 64 | u128::from(self.trace_lo))
    }

    /// The span work is done in.
    pub fn span_id(&self) -> u64 {
        self.span_id.get()
    }
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// The trace context of the code running on this task: the event's inside an agent's handler,
/// what [`scope`] set elsewhere, or none.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|c| *c).ok()
}

/// Runs `work` with `context` as the [`current`] one: the calls it makes belong to that trace.
pub fn scope<F: Future>(context: TraceContext, work: F) -> impl Future<Output = F::Output> {
    CURRENT.scope(context, work)
}

/// A random non-zero `u64`: splitmix64 over a per-thread state seeded from the OS's randomness
/// (each `RandomState` is), a few nanoseconds a draw.
fn random() -> NonZeroU64 {
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            use std::hash::{BuildHasher, Hasher};
            std::collections::hash_map::RandomState::new().build_hasher().finish()
        });
    }
    STATE.with(|state| loop {
        let s = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        if let Some(z) = NonZeroU64::new(z) {
            return z;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_reads_back_as_written_and_anything_else_is_none() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::from_traceparent(header).unwrap();
        assert_eq!(
            context.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(context.span_id(), 0x00f0_67aa_0ba9_02b7);
        assert_eq!(context.traceparent(), header);
        // A later version may add fields.
        assert!(TraceContext::from_traceparent(&format!("01{}-extra", &header[2..])).is_some());
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",
            "000-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert_eq!(TraceContext::from_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_optional_context_is_three_words() {
        assert_eq!(std::mem::size_of::<Option<TraceContext>>(), 24);
    }

    #[test]
    fn roots_are_new_traces_and_children_stay_in_theirs() {
        let (a, b) = (TraceContext::root(), TraceContext::root());
        assert_ne!(a.trace_id(), b.trace_id());
        let child = a.child();
        assert_eq!(child.trace_id(), a.trace_id());
        assert_ne!(child.span_id(), a.span_id());
        assert!(TraceContext::new(0, 1).is_none() && TraceContext::new(1, 0).is_none());
    }

    #[tokio::test]
    async fn scope_sets_the_current_context() {
        assert_eq!(current(), None);
        let context = TraceContext::root();
        assert_eq!(scope(context, async { current() }).await, Some(context));
    }
}
