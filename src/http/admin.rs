//! The admin API, behind its own bearer credential (compared in constant time).

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use super::extract::bearer;

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin/status", get(status))
        .route_layer(middleware::from_fn_with_state(state, require_admin))
}

/// Refuses the request unless it carries the configured admin token.
pub async fn require_admin(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let ok = match (&state.admin_token, bearer(req.headers())) {
        (Some(expected), Some(presented)) => {
            bool::from(expected.expose().as_bytes().ct_eq(presented.as_bytes()))
        }
        _ => false,
    };
    if ok {
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
    }))
}
