//! Prometheus metrics, per application instance (no global registry). Label values
//! are always bounded: endpoints, decisions, rule ids from the loaded rule file,
//! a fixed set of revocation reasons — never a subject or an IP.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::events::{Event, EventKind};
use crate::risk::ReasonMode;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: &'static str,
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    pub rule: String,
    pub mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatabaseLabels {
    pub database: &'static str,
}

type Latency = Family<EndpointLabels, Histogram, fn() -> Histogram>;

/// Latency buckets (seconds): verification is sub-millisecond; the top buckets catch
/// database stalls on the paths that write.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

fn latency_histogram() -> Histogram {
    Histogram::new(LATENCY_BUCKETS)
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Latency,
    pub rule_hits: Family<RuleLabels, Counter>,
    pub revocations: Family<ReasonLabels, Counter>,
    pub rule_reloads: Family<ResultLabels, Counter>,
    pub events_dropped: Counter,
    pub event_queue_depth: Gauge,
    pub sessions_in_memory: Gauge,
    pub revocations_in_memory: Gauge,
    pub geoip_age: Family<DatabaseLabels, Gauge<f64, AtomicU64>>,
    pub feed_lag: Gauge<f64, AtomicU64>,
    pub feed_connected: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tokenwarden");
        let m = Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            rule_hits: Family::default(),
            revocations: Family::default(),
            rule_reloads: Family::default(),
            events_dropped: Counter::default(),
            event_queue_depth: Gauge::default(),
            sessions_in_memory: Gauge::default(),
            revocations_in_memory: Gauge::default(),
            geoip_age: Family::default(),
            feed_lag: Gauge::default(),
            feed_connected: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Answered requests by endpoint and decision",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer, by endpoint",
            m.latency.clone(),
        );
        registry.register(
            "rule_hits",
            "Rules that fired, by rule and mode (enforce, shadow, suppressed)",
            m.rule_hits.clone(),
        );
        registry.register(
            "revocations",
            "Sessions revoked, by reason",
            m.revocations.clone(),
        );
        registry.register(
            "rule_reloads",
            "Rule file reloads, by result",
            m.rule_reloads.clone(),
        );
        registry.register(
            "events_dropped",
            "Audit events lost: queue full or refused by the database",
            m.events_dropped.clone(),
        );
        registry.register(
            "event_queue_depth",
            "Audit events accepted and not yet stored (queued or in the batch being written; up to twice the queue)",
            m.event_queue_depth.clone(),
        );
        registry.register(
            "sessions_in_memory",
            "Sessions whose risk state is in memory",
            m.sessions_in_memory.clone(),
        );
        registry.register(
            "revocations_in_memory",
            "Entries in the in-memory revocation view",
            m.revocations_in_memory.clone(),
        );
        registry.register(
            "geoip_database_age_seconds",
            "Age of the loaded GeoIP database (from its build time)",
            m.geoip_age.clone(),
        );
        registry.register(
            "change_feed_lag_seconds",
            "Time since this node last caught up with the change feed",
            m.feed_lag.clone(),
        );
        registry.register(
            "change_feed_connected",
            "1 while the change feed's LISTEN connection is up",
            m.feed_connected.clone(),
        );
        Self { registry, ..m }
    }

    /// Starts every known series at zero, so `rate()` and `increase()` see the first event.
    pub fn preset(&self, rules: &crate::risk::RuleSet) {
        for rule in &rules.rules {
            let mode = match rule.mode {
                crate::risk::Mode::Shadow => "shadow",
                _ => "enforce",
            };
            let _ = self.rule_hits.get_or_create(&RuleLabels {
                rule: rule.id.clone(),
                mode,
            });
        }
        for result in ["loaded", "unchanged", "refused"] {
            let _ = self.rule_reloads.get_or_create(&ResultLabels { result });
        }
        for reason in ["logout", "logout_all", "refresh_reuse", "rfc7009", "risk"] {
            let _ = self.revocations.get_or_create(&ReasonLabels { reason });
        }
    }

    /// Counts what an audit event says: rule hits and revocations.
    pub fn observe(&self, event: &Event) {
        for r in &event.reasons {
            let mode = match r.mode {
                ReasonMode::Enforce => "enforce",
                ReasonMode::Shadow => "shadow",
                ReasonMode::Suppressed => "suppressed",
            };
            self.rule_hits
                .get_or_create(&RuleLabels {
                    rule: r.rule.clone(),
                    mode,
                })
                .inc();
        }
        if event.kind == EventKind::Revoke {
            let detail = event.detail.as_deref().unwrap_or("");
            let reason = if detail.starts_with("risk") {
                "risk"
            } else if detail.starts_with("logout_all") {
                "logout_all"
            } else if detail.starts_with("rfc7009") {
                "rfc7009"
            } else {
                match detail {
                    "logout" => "logout",
                    "refresh_reuse" => "refresh_reuse",
                    _ => "other",
                }
            };
            self.revocations
                .get_or_create(&ReasonLabels { reason })
                .inc();
        }
    }

    pub fn answered(&self, endpoint: &'static str, decision: &'static str, seconds: f64) {
        self.requests
            .get_or_create(&RequestLabels { endpoint, decision })
            .inc();
        self.latency
            .get_or_create(&EndpointLabels { endpoint })
            .observe(seconds);
    }

    /// The exposition text (OpenMetrics).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
