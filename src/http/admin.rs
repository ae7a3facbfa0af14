//! The admin API, behind its own bearer credential (compared in constant time).

use axum::Json;
use axum::Router;
use std::convert::Infallible;

use axum::extract::{Query, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;
use tokio::sync::broadcast;

use super::AppState;
use super::error::ApiError;
use super::extract::bearer;
use crate::store::EventFilter;

pub fn router(state: AppState) -> Router<AppState> {
    let protected = Router::new()
        .route("/admin/status", get(status))
        .route("/admin/events", get(events))
        .route("/admin/events/stream", get(stream))
        .route("/admin/rules", get(rules))
        .route("/admin/rules/reload", post(reload_rules))
        .route_layer(middleware::from_fn_with_state(state, require_admin));
    Router::new()
        .route("/metrics", get(metrics))
        .merge(protected)
}

fn is_admin(state: &AppState, headers: &axum::http::HeaderMap) -> bool {
    match (&state.admin_token, bearer(headers)) {
        (Some(expected), Some(presented)) => {
            bool::from(expected.expose().as_bytes().ct_eq(presented.as_bytes()))
        }
        _ => false,
    }
}

/// Prometheus exposition; open without the admin token only if `metrics_open` says so.
async fn metrics(State(state): State<AppState>, headers: axum::http::HeaderMap) -> Response {
    if !state.metrics_open && !is_admin(&state, &headers) {
        return ApiError::Unauthorized.into_response();
    }
    let m = &state.metrics;
    let s = &state.sessions;
    let gauge = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
    m.sessions_in_memory
        .set(gauge(s.monitor().sessions_in_memory()));
    m.revocations_in_memory.set(gauge(s.view().len()));
    if let Some(sink) = s.event_sink() {
        m.event_queue_depth.set(gauge(sink.depth()));
        let dropped = sink.dropped();
        let seen = m.events_dropped.get();
        if dropped > seen {
            m.events_dropped.inc_by(dropped - seen);
        }
    }
    let geo = s.monitor().enricher().geoip().status();
    let now = s.now();
    for (database, db) in [("city", &geo.city), ("asn", &geo.asn)] {
        if let Some(epoch) = db.build_epoch {
            let age = (now - i64::try_from(epoch).unwrap_or(now)).max(0);
            m.geoip_age
                .get_or_create(&crate::metrics::DatabaseLabels { database })
                .set(age as f64);
        }
    }
    if let Some(feed) = &state.feed {
        let status = feed.status();
        m.feed_lag.set(status.lag_ms as f64 / 1000.0);
        m.feed_connected.set(i64::from(status.listener_connected));
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// Refuses the request unless it carries the configured admin token.
pub async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if is_admin(&state, req.headers()) {
        next.run(req).await
    } else {
        ApiError::Unauthorized.into_response()
    }
}

async fn status(State(state): State<AppState>) -> Json<serde_json::Value> {
    Json(json!({
        "database": state.sessions.store().backend(),
        "signing_kid": state.sessions.codec().keys().signing_kid(),
        "revocations_in_memory": state.sessions.view().len(),
        "events": state.sessions.event_sink().map(|e| json!({
            "queued": e.depth(),
            "written": e.written(),
            "dropped": e.dropped(),
            "dropped_queue_full": e.dropped_queue_full(),
        })),
    }))
}

/// Filters of `GET /admin/events`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventQuery {
    since: Option<String>,
    until: Option<String>,
    session_id: Option<String>,
    subject: Option<String>,
    decision: Option<String>,
    limit: Option<i64>,
}

const MAX_EVENTS: i64 = 100_000;

fn millis(name: &str, value: Option<&str>) -> Result<Option<i64>, ApiError> {
    value
        .map(|v| {
            crate::clock::parse_rfc3339_ms(v)
                .map_err(|_| ApiError::BadRequest(format!("{name}: {v:?} is not an RFC 3339 time")))
        })
        .transpose()
}

/// NDJSON in the replay format, oldest first.
async fn events(
    State(state): State<AppState>,
    Query(q): Query<EventQuery>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=MAX_EVENTS).contains(&limit) {
        return Err(ApiError::BadRequest(format!(
            "limit: must be 1 to {MAX_EVENTS}"
        )));
    }
    let filter = EventFilter {
        since_ms: millis("since", q.since.as_deref())?,
        until_ms: millis("until", q.until.as_deref())?,
        subject: q.subject,
        session_id: q.session_id,
        decision: q.decision,
        after: (i64::MIN, 0),
        limit,
    };
    let rows = state
        .sessions
        .store()
        .events(&filter)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut body = String::with_capacity(rows.iter().map(|r| r.2.len() + 1).sum());
    for (_, _, line) in rows {
        body.push_str(&line);
        body.push('\n');
    }
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// Server-sent events: every event as it is recorded (one JSON line per `data:`).
async fn stream(State(state): State<AppState>) -> Result<Response, ApiError> {
    let sink = state
        .sessions
        .event_sink()
        .ok_or(ApiError::NotFound("events are not recorded"))?;
    let rx = sink.subscribe();
    let events = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = match rx.recv().await {
            Ok(line) => SseEvent::default().data(line.as_str()),
            // A slow reader misses events; tell it how many instead of stalling writers.
            Err(broadcast::error::RecvError::Lagged(n)) => {
                SseEvent::default().event("lagged").data(n.to_string())
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok::<_, Infallible>(event), rx))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The active rule set, as validated, with where it came from and its hash.
async fn rules(State(state): State<AppState>) -> Json<serde_json::Value> {
    let monitor = state.sessions.monitor();
    Json(json!({
        "status": monitor.rules_status(),
        "rules": *monitor.rules(),
    }))
}

/// Re-reads the rule file now (as a change on disk or SIGHUP would).
async fn reload_rules(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let monitor = state.sessions.monitor();
    if monitor.rules_path().is_none() {
        return Err(ApiError::Conflict {
            code: "no_rule_file",
            detail: "no rule file is configured (TOKENWARDEN_RULES): the built-in rules cannot be reloaded".into(),
        });
    }
    let (result, outcome) = match monitor.reload_rules() {
        Ok(Some(_)) => ("loaded", Ok(())),
        Ok(None) => ("unchanged", Ok(())),
        Err(e) => ("refused", Err(e)),
    };
    state
        .metrics
        .rule_reloads
        .get_or_create(&crate::metrics::ResultLabels { result })
        .inc();
    match outcome {
        Ok(()) => {
            state.metrics.preset(&monitor.rules());
            Ok(Json(
                json!({ "result": result, "status": monitor.rules_status() }),
            ))
        }
        Err(e) => Err(ApiError::BadRequest(format!(
            "rule file refused, the previous rules stay active: {e}"
        ))),
    }
}
