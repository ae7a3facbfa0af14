//! The verify API: `/v1/verify` answers with a decision for a request context;
//! `/v1/forward-auth` reads the gateway's own request and answers 200 or 401.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::extract::{App, JsonBody, bearer};
use crate::session::Verdict;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/verify", post(verify))
        .route("/v1/forward-auth", any(forward_auth))
}

/// The request the app is protecting, as it saw it.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestContext {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub method: Option<String>,
    pub path: Option<String>,
    pub referrer: Option<String>,
    pub origin: Option<String>,
    pub sec_fetch_site: Option<String>,
    pub cost: Option<u32>,
}

const MAX_CONTEXT_FIELD: usize = 4096;
const MAX_COST: u32 = 1_000_000;

impl RequestContext {
    fn validate(&self) -> Result<(), ApiError> {
        if let Some(ip) = &self.ip {
            ip.trim().parse::<std::net::IpAddr>().map_err(|_| {
                ApiError::BadRequest(format!("request.ip: {ip:?} is not an IP address"))
            })?;
        }
        for (name, value) in [
            ("request.user_agent", &self.user_agent),
            ("request.method", &self.method),
            ("request.path", &self.path),
            ("request.referrer", &self.referrer),
            ("request.origin", &self.origin),
            ("request.sec_fetch_site", &self.sec_fetch_site),
        ] {
            if value
                .as_ref()
                .is_some_and(|v| v.len() > MAX_CONTEXT_FIELD || v.chars().any(char::is_control))
            {
                return Err(ApiError::BadRequest(format!(
                    "{name}: must be at most {MAX_CONTEXT_FIELD} bytes of printable characters"
                )));
            }
        }
        if self.cost.is_some_and(|c| c > MAX_COST) {
            return Err(ApiError::BadRequest(format!(
                "request.cost: must be at most {MAX_COST}"
            )));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    token: String,
    #[serde(default)]
    request: RequestContext,
}

#[derive(Debug, Serialize)]
pub struct Reason {
    pub rule: &'static str,
    pub points: u32,
    pub mode: &'static str,
    pub detail: String,
}

/// The decision, in the shape the risk engine will keep.
#[derive(Debug, Serialize)]
pub struct Decision {
    pub decision: &'static str,
    pub score: u32,
    pub session_risk: f64,
    pub subject: Option<String>,
    pub session_id: Option<String>,
    pub jti: Option<String>,
    pub reasons: Vec<Reason>,
    pub user_message: Option<String>,
    pub retry_after: Option<u64>,
}

const SIGN_IN_AGAIN: &str = "Your session has ended. Please sign in again.";

pub fn decide(verdict: Verdict) -> Decision {
    let base = |decision, claims: Option<&crate::token::AccessClaims>| Decision {
        decision,
        score: 0,
        session_risk: 0.0,
        subject: claims.map(|c| c.sub.clone()),
        session_id: claims.map(|c| c.sid.clone()),
        jti: claims.map(|c| c.jti.clone()),
        reasons: Vec::new(),
        user_message: None,
        retry_after: None,
    };
    match verdict {
        Verdict::Allow(claims) => base("allow", Some(&claims)),
        Verdict::Revoked(claims, by) => Decision {
            reasons: vec![Reason {
                rule: "revocation",
                points: 0,
                mode: "enforce",
                detail: by.code().to_owned(),
            }],
            user_message: Some(SIGN_IN_AGAIN.to_owned()),
            ..base("revoke", Some(&claims))
        },
        Verdict::Invalid(e) => Decision {
            reasons: vec![Reason {
                rule: "token",
                points: 0,
                mode: "enforce",
                detail: format!("{}: {e}", e.code()),
            }],
            user_message: Some(SIGN_IN_AGAIN.to_owned()),
            ..base("invalid", None)
        },
    }
}

async fn verify(
    _app: App,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<VerifyBody>,
) -> Result<Json<Decision>, ApiError> {
    body.request.validate()?;
    Ok(Json(decide(state.sessions.verify(&body.token))))
}

/// Identity headers the gateway copies upstream.
const SUBJECT_HEADER: &str = "x-auth-subject";
const SESSION_HEADER: &str = "x-auth-session";
const RISK_HEADER: &str = "x-auth-risk";

async fn forward_auth(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(token) = bearer(&headers) else {
        let mut r = (StatusCode::UNAUTHORIZED, "").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tokenwarden\""),
        );
        return r;
    };
    match state.sessions.verify(token) {
        Verdict::Allow(claims) => {
            let mut r = StatusCode::OK.into_response();
            let h = r.headers_mut();
            if let Ok(v) = HeaderValue::from_str(&claims.sub) {
                h.insert(SUBJECT_HEADER, v);
            }
            if let Ok(v) = HeaderValue::from_str(&claims.sid) {
                h.insert(SESSION_HEADER, v);
            }
            h.insert(RISK_HEADER, HeaderValue::from_static("0"));
            r
        }
        Verdict::Revoked(_, by) => ApiError::InvalidToken {
            code: by.code(),
            detail: "the token has been revoked".into(),
        }
        .into_response(),
        Verdict::Invalid(e) => ApiError::from(e).into_response(),
    }
}
