//! Liveness and readiness, on both listeners.

use axum::Json;
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::json;

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<serde_json::Value>) {
    let store = state.sessions.store();
    let database = match store.ping().await {
        Ok(()) => "ok".to_owned(),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: database unreachable");
            "unreachable".to_owned()
        }
    };
    let feed = state.feed.as_ref().map(|f| f.status());
    let ready = database == "ok" && !feed.as_ref().is_some_and(|f| f.stale);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({
            "status": if ready { "ready" } else { "not_ready" },
            "database": { "backend": store.backend(), "status": database },
            "revocations_in_memory": state.sessions.view().len(),
            "sessions_in_memory": state.sessions.monitor().sessions_in_memory(),
            "rules": state.sessions.monitor().rules_status(),
            "geoip": state.sessions.monitor().enricher().geoip().status(),
            "change_feed": feed,
            // Other issuers and how many of their keys we hold (0: not fetched yet).
            "issuers": state.sessions.codec().external().iter()
                .map(|i| json!({"issuer": i.issuer(), "keys": i.kid_count()}))
                .collect::<Vec<_>>(),
        })),
    )
}
