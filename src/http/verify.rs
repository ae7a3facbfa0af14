//! The verify API: `/v1/verify` answers with a decision for a request context
//! (`/v1/forward-auth`, the gateway's variant, lives in `forward_auth`).

use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::ApiError;
use super::extract::{App, JsonBody};
use crate::monitor::{RequestInfo, method_name};
use crate::risk::{Reason, ReasonMode};
use crate::session::Verdict;
use crate::token::AccessClaims;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/verify", post(verify))
        .merge(super::forward_auth::router())
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

pub(super) const MAX_CONTEXT_FIELD: usize = 4096;
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

/// The decision, in the shape of the HTTP contract.
#[derive(Debug, Serialize)]
pub struct Decision {
    pub decision: &'static str,
    pub score: u32,
    pub session_risk: f64,
    pub subject: Option<Claim>,
    pub session_id: Option<Claim>,
    pub jti: Option<Claim>,
    pub reasons: Vec<Reason>,
    pub user_message: Option<String>,
    pub retry_after: Option<u64>,
    /// What the decision would be if the shadow rules were enforced.
    pub shadow_decision: Option<&'static str>,
    /// The rule set that decided.
    pub rules_hash: Option<std::sync::Arc<str>>,
}

/// One claim of the verified token, shared with it (and with the verified-token
/// cache) instead of copied into every answer.
#[derive(Clone)]
pub struct Claim(Arc<AccessClaims>, fn(&AccessClaims) -> &str);

impl Claim {
    pub fn as_str(&self) -> &str {
        (self.1)(&self.0)
    }
}

impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl Serialize for Claim {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

const SIGN_IN_AGAIN: &str = "Your session has ended. Please sign in again.";

fn reason(rule: &str, detail: String) -> Reason {
    Reason {
        rule: rule.to_owned(),
        kind: rule.to_owned(),
        points: 0,
        mode: ReasonMode::Enforce,
        detail,
    }
}

pub fn decide(verdict: Verdict) -> Decision {
    let base = |decision, claims: Option<&Arc<AccessClaims>>| Decision {
        decision,
        score: 0,
        session_risk: 0.0,
        subject: claims.map(|c| Claim(Arc::clone(c), |c| &c.sub)),
        session_id: claims.map(|c| Claim(Arc::clone(c), |c| &c.sid)),
        jti: claims.map(|c| Claim(Arc::clone(c), |c| &c.jti)),
        reasons: Vec::new(),
        user_message: None,
        retry_after: None,
        shadow_decision: None,
        rules_hash: None,
    };
    match verdict {
        Verdict::Assessed(claims, e) => Decision {
            score: e.score,
            session_risk: e.session_risk,
            reasons: e.reasons,
            user_message: e.user_message,
            retry_after: e.retry_after,
            shadow_decision: Some(e.shadow_decision.as_str()),
            rules_hash: Some(e.rules_hash),
            ..base(e.decision.as_str(), Some(&claims))
        },
        Verdict::Revoked(claims, by) => Decision {
            reasons: vec![reason("revocation", by.code().to_owned())],
            user_message: Some(SIGN_IN_AGAIN.to_owned()),
            ..base("revoke", Some(&claims))
        },
        Verdict::Invalid(e) => Decision {
            reasons: vec![reason("token", format!("{}: {e}", e.code()))],
            user_message: Some(SIGN_IN_AGAIN.to_owned()),
            ..base("invalid", None)
        },
    }
}

impl RequestContext {
    /// The request as the engine reads it; its text moves, it is not copied.
    fn into_info(self) -> RequestInfo {
        RequestInfo {
            ip: self
                .ip
                .as_deref()
                .and_then(|ip| ip.trim().parse::<IpAddr>().ok())
                .map(|ip| ip.to_canonical()),
            user_agent: self.user_agent,
            method: self.method.map(method_name),
            path: self.path,
            referrer: self.referrer,
            origin: self.origin,
            sec_fetch_site: self.sec_fetch_site,
            cost: self.cost,
        }
    }
}

async fn verify(
    _app: App,
    State(state): State<AppState>,
    JsonBody(body): JsonBody<VerifyBody>,
) -> Result<Json<Decision>, ApiError> {
    body.request.validate()?;
    let started = std::time::Instant::now();
    let verdict = state
        .sessions
        .verify(&body.token, &body.request.into_info())
        .await?;
    let d = decide(verdict);
    state
        .metrics
        .answered("verify", d.decision, started.elapsed().as_secs_f64());
    Ok(Json(d))
}
