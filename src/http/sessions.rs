//! The session API, called by the app's login code with its app key.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::extract::{App, JsonBody};
use crate::enrich::ClientInfo;
use crate::risk::{Observation, decayed_risk};
use crate::session::SessionError;
use crate::session::input::{AuthContext, Client, ClientBody, Subject};
use crate::store::SessionRecord;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/sessions", post(open))
        .route("/v1/sessions/refresh", post(refresh))
        .route("/v1/sessions/{session_id}/reauth", post(reauth))
        .route("/v1/sessions/{session_id}", get(show).delete(logout))
        .route("/v1/users/{subject}/sessions", get(list).delete(logout_all))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenBody {
    subject: String,
    client: ClientBody,
    acr: Option<String>,
    amr: Option<Vec<String>>,
    claims: Option<serde_json::Value>,
}

async fn open(
    app: App,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<OpenBody>,
) -> Result<impl IntoResponse, ApiError> {
    let subject = Subject::parse(&body.subject)?;
    let client = Client::parse(&body.client)?;
    let auth = AuthContext::parse(body.acr, body.amr, body.claims)?;
    let pair = state.sessions.open(&subject, &client, &auth).await?;
    tracing::info!(app = %app.id, session_id = %pair.session_id, subject = %subject.as_str(), "session opened");
    Ok((StatusCode::CREATED, Json(pair)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RefreshBody {
    refresh_token: String,
    client: ClientBody,
}

async fn refresh(
    _app: App,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<RefreshBody>,
) -> Result<impl IntoResponse, ApiError> {
    let client = Client::parse(&body.client)?;
    let started = std::time::Instant::now();
    let result = state.sessions.refresh(&body.refresh_token, &client).await;
    let decision = match &result {
        Ok(_) => "allow",
        Err(SessionError::Denied(_)) => "deny",
        Err(SessionError::StepUpRequired(_)) => "step_up",
        Err(SessionError::RiskRevoked(_) | SessionError::RefreshReuse) => "revoke",
        Err(SessionError::InvalidGrant(_)) => "invalid",
        Err(_) => "error",
    };
    state
        .metrics
        .answered("refresh", decision, started.elapsed().as_secs_f64());
    Ok(Json(result?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReauthBody {
    client: ClientBody,
}

fn session_id(raw: &str) -> Result<&str, ApiError> {
    uuid::Uuid::try_parse(raw)
        .map(|_| raw)
        .map_err(|_| ApiError::BadRequest("session_id: not a session id".into()))
}

async fn reauth(
    _app: App,
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(body): JsonBody<ReauthBody>,
) -> Result<impl IntoResponse, ApiError> {
    let id = session_id(&id)?;
    let client = Client::parse(&body.client)?;
    let pair = state.sessions.reauth(id, &client).await?;
    tracing::info!(session_id = %id, "session re-authenticated");
    Ok(Json(pair))
}

async fn logout(
    _app: App,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = session_id(&id)?;
    state.sessions.logout(id, "logout").await?;
    tracing::info!(session_id = %id, "session logged out");
    Ok(StatusCode::NO_CONTENT)
}

async fn logout_all(
    _app: App,
    State(state): State<AppState>,
    Path(subject): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let subject = Subject::parse(&subject)?;
    let revoked = state.sessions.logout_all(&subject).await?;
    tracing::info!(subject = %subject.as_str(), revoked, "user logged out everywhere");
    Ok(Json(json!({ "revoked": revoked })))
}

fn rfc3339(t: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn session_view(s: &SessionRecord, now_ms: i64, half_life_secs: f64) -> serde_json::Value {
    let binding: Option<ClientInfo> = s
        .binding_info
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok());
    let last: Option<Observation> = s
        .last_seen_info
        .as_deref()
        .and_then(|l| serde_json::from_str(l).ok());
    let seen = last.as_ref().map(|o| &*o.client).or(binding.as_ref());
    let location = seen.map(|c| {
        json!({
            "country": c.country,
            "city": c.location.as_ref().and_then(|l| l.city.clone()),
        })
    });
    json!({
        "session_id": s.session_id,
        "created_at": rfc3339(s.created_at),
        "last_seen_at": rfc3339(s.last_seen_at),
        "ip": s.ip,
        "last_seen_ip": seen.map(|c| c.ip.to_string()),
        "location": location,
        "device": binding.as_ref().map_or_else(|| s.user_agent.clone(), |b| b.ua.key()),
        "user_agent": s.user_agent,
        "risk": decayed_risk(s.risk, s.risk_at, now_ms, half_life_secs),
        "state": s.state,
        "revoked_at": s.revoked_at.map(rfc3339),
        "revoked_reason": s.revoked_reason,
        "subject": s.subject,
        "step_up_message": s.step_up_message,
    })
}

/// One session, for the app's re-authentication page: its state and, when it must
/// re-authenticate, the message that says why.
async fn show(
    _app: App,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = session_id(&id)?;
    let session = state
        .sessions
        .get(id)
        .await?
        .ok_or(ApiError::NotFound("no such session"))?;
    let now_ms = state.sessions.now().saturating_mul(1000);
    let half_life = state.sessions.monitor().rules().risk_half_life_secs;
    Ok(Json(session_view(&session, now_ms, half_life)))
}

async fn list(
    _app: App,
    State(state): State<AppState>,
    Path(subject): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let subject = Subject::parse(&subject)?;
    let sessions = state.sessions.list(&subject).await?;
    let now_ms = state.sessions.now().saturating_mul(1000);
    let half_life = state.sessions.monitor().rules().risk_half_life_secs;
    Ok(Json(json!({
        "sessions": sessions.iter().map(|s| session_view(s, now_ms, half_life)).collect::<Vec<_>>()
    })))
}
