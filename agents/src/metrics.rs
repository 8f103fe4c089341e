//! The runtime's metrics, per class, in a Prometheus registry of its own (two runtimes in one
//! process count apart). They are always kept — an atomic add per event, a few per batch — and
//! read through the admin routes (`/admin/metrics`, see [`Builder::admin`](crate::Builder::admin)).

use std::time::Instant;

use agents_client::ErrorKind;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

/// The `method` label of calls to a method the class does not have.
pub(crate) const UNKNOWN_METHOD: &str = "(unknown)";

/// Latency buckets, in seconds: 50 µs to 10 s.
const SECONDS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 10.0,
];

/// Schedule lateness buckets, in seconds: 1 ms to 10 min.
const LATENESS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0, 60.0, 600.0,
];

/// Events per batch.
const EVENTS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Every metric of a runtime.
pub(crate) struct Metrics {
    registry: Registry,
    /// Each class's metrics, resolved once.
    classes: std::sync::Mutex<std::collections::HashMap<String, ClassMetrics>>,
    /// `agents_calls_total{class, method, outcome}`: calls that ran (from callers and from
    /// schedules; `on_alarm` for the alarm), by outcome (`ok` or the error's kind).
    calls: IntCounterVec,
    /// `agents_handler_seconds{class, method}`: how long a call's handler ran.
    handler: HistogramVec,
    /// `agents_call_seconds{class}`: a call from its arrival in the mailbox to its reply's
    /// release (so: waiting, running, committing and the output gate).
    call: HistogramVec,
    /// `agents_batch_events{class}`: events per batch (one commit each).
    batch: HistogramVec,
    /// `agents_sync_seconds{class}`: how long making a group of batches durable took.
    sync: HistogramVec,
    /// `agents_live{class}`: live agents.
    live: IntGaugeVec,
    /// `agents_activations_total{class}`.
    activations: IntCounterVec,
    /// `agents_hibernations_total{class}`: instances that ended (idle, evicted, asked to,
    /// destroyed, shut down).
    hibernations: IntCounterVec,
    /// `agents_connections`: open WebSockets (set when read).
    pub connections: IntGauge,
    /// `agents_messages_in_total{class}`: messages from sockets, for `on_message`.
    messages_in: IntCounterVec,
    /// `agents_frames_out_total{class}`: frames an agent sent to sockets (its messages and
    /// broadcasts, one per socket reached).
    frames_out: IntCounterVec,
    /// `agents_broadcast_deliveries_total{class}`: sockets a broadcast reached.
    broadcast_deliveries: IntCounterVec,
    /// `agents_slow_reader_closes_total{class}`: sockets closed for not reading.
    slow_closes: IntCounterVec,
    /// `agents_schedule_lateness_seconds{class}`: how late a due row started.
    lateness: HistogramVec,
    /// `agents_schedule_retries_total{class}`: failed runs that will be retried.
    retries: IntCounterVec,
    /// `agents_dead_letters_total{class}`: rows moved to the dead letters.
    dead_letters: IntCounterVec,
}

/// What a metric is made from.
fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: &[f64],
) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    let metric = HistogramVec::new(opts, labels).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let metric = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("registered once");
    metric
}

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let class = &["class"][..];
        let connections =
            IntGauge::new("agents_connections", "Open WebSockets.").expect("a valid metric");
        r.register(Box::new(connections.clone()))
            .expect("registered once");
        Metrics {
            calls: counter(&r, "agents_calls_total", "Calls that ran, from callers and schedules (on_alarm for the alarm), by outcome (ok or the error's kind).", &["class", "method", "outcome"]),
            handler: histogram(&r, "agents_handler_seconds", "How long a call's handler ran.", &["class", "method"], SECONDS),
            call: histogram(&r, "agents_call_seconds", "A call from its arrival in the agent's mailbox to its reply's release (after the output gate).", class, SECONDS),
            batch: histogram(&r, "agents_batch_events", "Events per batch (one commit each).", class, EVENTS),
            sync: histogram(&r, "agents_sync_seconds", "How long making a group of committed batches durable took.", class, SECONDS),
            live: gauge(&r, "agents_live", "Live agents.", class),
            activations: counter(&r, "agents_activations_total", "Agents activated.", class),
            hibernations: counter(&r, "agents_hibernations_total", "Instances that ended: idle, evicted, asked to, destroyed or shut down.", class),
            connections,
            messages_in: counter(&r, "agents_messages_in_total", "Messages from sockets, for on_message.", class),
            frames_out: counter(&r, "agents_frames_out_total", "Frames an agent sent to sockets: its messages and broadcasts, one per socket reached.", class),
            broadcast_deliveries: counter(&r, "agents_broadcast_deliveries_total", "Sockets a broadcast reached.", class),
            slow_closes: counter(&r, "agents_slow_reader_closes_total", "Sockets closed because they did not read.", class),
            lateness: histogram(&r, "agents_schedule_lateness_seconds", "How late a due schedule started.", class, LATENESS),
            retries: counter(&r, "agents_schedule_retries_total", "Failed schedule runs that will be retried.", class),
            dead_letters: counter(&r, "agents_dead_letters_total", "Schedules moved to the dead letters.", class),
            registry: r,
            classes: Default::default(),
        }
    }

    /// The metrics of `class` (an instance keeps them).
    pub fn class(&self, class: &str) -> ClassMetrics {
        let mut classes = crate::lock::lock(&self.classes);
        if let Some(resolved) = classes.get(class) {
            return resolved.clone();
        }
        let resolved = self.resolve(class);
        classes.insert(class.to_owned(), resolved.clone());
        resolved
    }

    fn resolve(&self, class: &str) -> ClassMetrics {
        let of = |v: &IntCounterVec| v.with_label_values(&[class]);
        ClassMetrics {
            class: class.to_owned(),
            calls: self.calls.clone(),
            handler: self.handler.clone(),
            ok: Default::default(),
            call: self.call.with_label_values(&[class]),
            batch: self.batch.with_label_values(&[class]),
            sync: self.sync.with_label_values(&[class]),
            live: self.live.with_label_values(&[class]),
            activations: of(&self.activations),
            hibernations: of(&self.hibernations),
            messages_in: of(&self.messages_in),
            lateness: self.lateness.with_label_values(&[class]),
            retries: of(&self.retries),
            dead_letters: of(&self.dead_letters),
        }
    }

    /// The metrics the WebSocket wing counts into.
    pub fn wing(&self) -> WingMetrics {
        WingMetrics {
            frames_out: self.frames_out.clone(),
            broadcast_deliveries: self.broadcast_deliveries.clone(),
            slow_closes: self.slow_closes.clone(),
        }
    }

    /// Everything, in Prometheus's text format.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_else(|e| format!("# the metrics could not be encoded: {e}\n"))
    }

    /// Calls so far by class, with the end-to-end latency's p50 and p99 (estimated from the
    /// histogram's buckets: the bound of the bucket the percentile falls in), for the status
    /// page.
    pub fn calls_by_class(&self) -> Vec<CallsOf> {
        let mut by_class: std::collections::BTreeMap<String, CallsOf> = Default::default();
        let label = |m: &prometheus::proto::Metric, name: &str| {
            m.get_label()
                .iter()
                .find(|l| l.name() == name)
                .map(|l| l.value().to_owned())
                .unwrap_or_default()
        };
        for family in self.registry.gather() {
            for m in family.get_metric() {
                let class = label(m, "class");
                let entry = by_class.entry(class.clone()).or_insert_with(|| CallsOf {
                    class,
                    ..CallsOf::default()
                });
                match family.name() {
                    "agents_calls_total" => {
                        let n = m.get_counter().get_value() as u64;
                        entry.calls += n;
                        if label(m, "outcome") != "ok" {
                            entry.failed += n;
                        }
                    }
                    "agents_call_seconds" => {
                        let h = m.get_histogram();
                        let count = h.get_sample_count();
                        let at = |q: f64| {
                            let rank = (q * count as f64).ceil() as u64;
                            h.get_bucket()
                                .iter()
                                .find(|b| b.cumulative_count() >= rank.max(1))
                                .map(|b| b.upper_bound())
                        };
                        if count > 0 {
                            (entry.p50, entry.p99) = (at(0.5), at(0.99));
                        }
                    }
                    _ => {}
                }
            }
        }
        by_class.into_values().filter(|c| c.calls > 0).collect()
    }
}

/// A class's calls, for the status page.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct CallsOf {
    pub class: String,
    pub calls: u64,
    /// Those whose outcome was an error.
    pub failed: u64,
    /// Seconds, end to end.
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// The metrics of one class.
#[derive(Clone)]
pub(crate) struct ClassMetrics {
    class: String,
    calls: IntCounterVec,
    handler: HistogramVec,
    /// The metrics of a method's successful calls, once resolved (the common case, without
    /// the label lookup).
    ok: std::collections::HashMap<Box<str>, (IntCounter, Histogram)>,
    pub call: Histogram,
    pub batch: Histogram,
    pub sync: Histogram,
    pub live: IntGauge,
    pub activations: IntCounter,
    pub hibernations: IntCounter,
    pub messages_in: IntCounter,
    pub lateness: Histogram,
    pub retries: IntCounter,
    pub dead_letters: IntCounter,
}

impl ClassMetrics {
    /// A call of `method` ran for `ran` seconds to `outcome` (`ok` or an error's kind).
    ///
    /// A method the class does not have is counted as [`UNKNOWN_METHOD`]: the name is the
    /// client's, and a label per name would let any client grow the registry without bound.
    pub fn called(&mut self, method: &str, outcome: &str, ran: f64) {
        let method = if outcome == ErrorKind::UnknownMethod.as_str() {
            UNKNOWN_METHOD
        } else {
            method
        };
        if outcome == "ok" {
            if let Some((calls, handler)) = self.ok.get(method) {
                calls.inc();
                handler.observe(ran);
                return;
            }
        }
        let calls = self
            .calls
            .with_label_values(&[&self.class, method, outcome]);
        let handler = self.handler.with_label_values(&[&self.class, method]);
        calls.inc();
        handler.observe(ran);
        if outcome == "ok" {
            self.ok.insert(method.into(), (calls, handler));
        }
    }
}

/// What the WebSocket wing counts, by the class of the agent a socket is connected to.
#[derive(Clone)]
pub(crate) struct WingMetrics {
    frames_out: IntCounterVec,
    broadcast_deliveries: IntCounterVec,
    slow_closes: IntCounterVec,
}

impl WingMetrics {
    /// `class` sent `frames` frames to sockets, `broadcast` of them by broadcasts.
    pub fn delivered(&self, class: &str, frames: u64, broadcast: u64) {
        if frames > 0 {
            self.frames_out.with_label_values(&[class]).inc_by(frames);
        }
        if broadcast > 0 {
            let deliveries = self.broadcast_deliveries.with_label_values(&[class]);
            deliveries.inc_by(broadcast);
        }
    }

    /// A socket of `class` was closed for not reading.
    pub fn slow_close(&self, class: &str) {
        self.slow_closes.with_label_values(&[class]).inc();
    }
}

/// A duration being measured into a histogram.
pub(crate) struct Timed {
    since: Instant,
    into: Histogram,
}

impl Timed {
    pub fn new(since: Instant, into: &Histogram) -> Self {
        Timed {
            since,
            into: into.clone(),
        }
    }

    /// Records the time since the start.
    pub fn stop(self) {
        self.into.observe(self.since.elapsed().as_secs_f64());
    }
}
