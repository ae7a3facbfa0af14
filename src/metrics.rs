//! Prometheus metrics, per application instance (no global registry). Label values
//! are always bounded: endpoints, decisions, rule ids from the loaded rule file,
//! a fixed set of revocation reasons — never a subject or an IP.

use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::events::{EventKind, EventRef};
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
    // Private: `answered` keeps handles to their series, which a series removed
    // from the family would cut off from the exposition.
    requests: Family<RequestLabels, Counter>,
    latency: Latency,
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
    /// The series [`Metrics::answered`] updates, each found in its family once: a
    /// family's lookup takes its lock and hashes the labels, on every request.
    answered_series: [OnceLock<(Counter, Histogram)>; ANSWERED_SERIES],
}

/// The endpoints and decisions [`Metrics::answered`] remembers its series for.
const ENDPOINTS: [&str; 2] = ["verify", "forward_auth"];
const DECISIONS: [&str; 6] = [
    "allow",
    "step_up",
    "deny",
    "revoke",
    "revoke_user",
    "invalid",
];
const ANSWERED_SERIES: usize = ENDPOINTS.len() * DECISIONS.len();

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
            answered_series: std::array::from_fn(|_| OnceLock::new()),
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
    pub fn observe(&self, event: &EventRef<'_>) {
        for r in event.reasons {
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
        let series = ENDPOINTS
            .iter()
            .position(|e| *e == endpoint)
            .zip(DECISIONS.iter().position(|d| *d == decision))
            .and_then(|(e, d)| self.answered_series.get(e * DECISIONS.len() + d));
        let Some(series) = series else {
            // Not one of the usual pairs: looked up as it comes.
            self.requests
                .get_or_create(&RequestLabels { endpoint, decision })
                .inc();
            self.latency
                .get_or_create(&EndpointLabels { endpoint })
                .observe(seconds);
            return;
        };
        // Created on first use, as the family would: a pair never answered stays
        // out of the exposition.
        let (requests, latency) = series.get_or_init(|| {
            (
                self.requests
                    .get_or_create_owned(&RequestLabels { endpoint, decision }),
                self.latency
                    .get_or_create_owned(&EndpointLabels { endpoint }),
            )
        });
        requests.inc();
        latency.observe(seconds);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The remembered series are the families' own: what `answered` counts is what
    /// the exposition shows, for every pair it remembers and for one it does not,
    /// and a pair never answered is not in it.
    #[test]
    fn answered_requests_are_counted_in_their_families() {
        let m = Metrics::new();
        let mut expected = Vec::new();
        let mut per_endpoint = [0; ENDPOINTS.len()];
        for (e, endpoint) in ENDPOINTS.iter().enumerate() {
            for (d, decision) in DECISIONS.iter().enumerate() {
                // A different count for every pair, none for one of them.
                let n = e * DECISIONS.len() + d;
                for _ in 0..n {
                    m.answered(endpoint, decision, 0.0002);
                }
                per_endpoint[e] += n;
                expected.push((*endpoint, *decision, n));
            }
        }
        m.answered("refresh", "allow", 0.003);
        let text = m.render();
        let value = |prefix: String| {
            text.lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .map(|v| v.trim().to_owned())
        };
        for (endpoint, decision, n) in expected {
            let count = value(format!(
                r#"tokenwarden_requests_total{{endpoint="{endpoint}",decision="{decision}"}}"#
            ));
            if n == 0 {
                assert_eq!(count, None, "{endpoint} {decision} never answered\n{text}");
            } else {
                assert_eq!(count, Some(n.to_string()), "{endpoint} {decision}\n{text}");
            }
        }
        for (endpoint, n) in ENDPOINTS.iter().zip(per_endpoint) {
            assert_eq!(
                value(format!(
                    r#"tokenwarden_request_duration_seconds_count{{endpoint="{endpoint}"}}"#
                )),
                Some(n.to_string())
            );
        }
        assert_eq!(
            value(r#"tokenwarden_requests_total{endpoint="refresh",decision="allow"}"#.into()),
            Some("1".into())
        );
        assert_eq!(
            value(r#"tokenwarden_request_duration_seconds_count{endpoint="refresh"}"#.into()),
            Some("1".into())
        );
    }
}
