//! The verify API: `/v1/verify` answers with a decision for a request context;
//! `/v1/forward-auth` reads the gateway's own request and answers 200 or 401.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, post};
use axum::{Json, Router};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::AppState;
use super::error::{ApiError, bearer_challenge, bearer_challenge_with};
use super::extract::{App, JsonBody, bearer};
use crate::monitor::RequestInfo;
use crate::risk::{Reason, ReasonMode};
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

/// The decision, in the shape of the HTTP contract.
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
    /// What the decision would be if the shadow rules were enforced.
    pub shadow_decision: Option<&'static str>,
    /// The rule set that decided.
    pub rules_hash: Option<String>,
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
    fn info(&self) -> RequestInfo {
        RequestInfo {
            ip: self
                .ip
                .as_deref()
                .and_then(|ip| ip.trim().parse::<IpAddr>().ok())
                .map(|ip| ip.to_canonical()),
            user_agent: self.user_agent.clone(),
            method: self.method.clone(),
            path: self.path.clone(),
            referrer: self.referrer.clone(),
            origin: self.origin.clone(),
            sec_fetch_site: self.sec_fetch_site.clone(),
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
        .verify(&body.token, &body.request.info())
        .await?;
    let d = decide(verdict);
    state
        .metrics
        .answered("verify", d.decision, started.elapsed().as_secs_f64());
    Ok(Json(d))
}

/// Identity headers the gateway copies upstream.
const SUBJECT_HEADER: &str = "x-auth-subject";
const SESSION_HEADER: &str = "x-auth-session";
const RISK_HEADER: &str = "x-auth-risk";

fn header(headers: &HeaderMap, names: &[&str]) -> Option<String> {
    names
        .iter()
        .find_map(|n| headers.get(*n))
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= MAX_CONTEXT_FIELD)
        .map(str::to_owned)
}

/// The client's address: the peer itself, unless the peer is a trusted proxy; then
/// the rightmost `X-Forwarded-For` address that is not a trusted proxy.
fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Walk from the right (the hops our proxies appended) and stop at the first
    // address they did not add. Anything unreadable ends the walk: what lies left
    // of it was written by the client and is not evidence.
    let mut last_trusted = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(value) = value.to_str() else {
            return last_trusted;
        };
        for part in value.rsplit(',') {
            let Ok(ip) = part.trim().parse::<IpAddr>() else {
                return last_trusted;
            };
            let ip = ip.to_canonical();
            if !is_trusted(&ip) {
                return ip;
            }
            last_trusted = ip;
        }
    }
    last_trusted
}

/// The protected request as the gateway describes it.
fn forwarded_request(headers: &HeaderMap, client: IpAddr) -> RequestInfo {
    RequestInfo {
        ip: Some(client),
        // The token holder controls this header: missing or unreadable is compared as
        // an empty user agent, never replaced by the bound one.
        user_agent: Some(
            headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .map(|v| v.chars().take(MAX_CONTEXT_FIELD).collect())
                .unwrap_or_default(),
        ),
        method: header(headers, &["x-original-method", "x-forwarded-method"]),
        path: header(headers, &["x-original-uri", "x-forwarded-uri"]),
        referrer: header(headers, &["referer"]),
        origin: header(headers, &["origin"]),
        sec_fetch_site: header(headers, &["sec-fetch-site"]),
        cost: None,
    }
}

/// What the gateway may pass on to whoever holds the token: the decision, the user
/// message and the rule ids. Never the details, which describe the victim's binding.
fn problem(status: StatusCode, d: &Decision, challenge: Option<HeaderValue>) -> Response {
    let rules: Vec<&str> = d
        .reasons
        .iter()
        .filter(|r| r.mode == ReasonMode::Enforce)
        .map(|r| r.rule.as_str())
        .collect();
    let body = serde_json::json!({
        "type": format!("urn:tokenwarden:problem:{}", d.decision),
        "title": match d.decision { "step_up" => "Re-authentication required", "deny" => "Too many requests", _ => "Invalid token" },
        "status": status.as_u16(),
        "decision": d.decision,
        "user_message": d.user_message,
        "rules": rules,
        "retry_after": d.retry_after,
    });
    let mut r = (status, Json(body)).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(c) = challenge {
        h.insert(header::WWW_AUTHENTICATE, c);
    }
    if let Some(secs) = d.retry_after
        && let Ok(v) = HeaderValue::from_str(&secs.to_string())
    {
        h.insert(header::RETRY_AFTER, v);
    }
    r
}

async fn forward_auth(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let peer_ip = peer.ip().to_canonical();
    if !state.trusted_proxies.is_empty()
        && !state.trusted_proxies.iter().any(|n| n.contains(&peer_ip))
    {
        return ApiError::Forbidden(format!(
            "{peer_ip} is not a trusted proxy (TOKENWARDEN_TRUSTED_PROXIES)"
        ))
        .into_response();
    }
    let Some(token) = bearer(&headers) else {
        let mut r = (StatusCode::UNAUTHORIZED, "").into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"tokenwarden\""),
        );
        return r;
    };
    let started = std::time::Instant::now();
    let client = client_ip(peer_ip, &headers, &state.trusted_proxies);
    let verdict = match state
        .sessions
        .verify(token, &forwarded_request(&headers, client))
        .await
    {
        Ok(v) => v,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let d = decide(verdict);
    state
        .metrics
        .answered("forward_auth", d.decision, started.elapsed().as_secs_f64());
    match d.decision {
        "allow" => {
            let mut r = StatusCode::OK.into_response();
            let h = r.headers_mut();
            for (name, value) in [
                (SUBJECT_HEADER, d.subject.as_deref()),
                (SESSION_HEADER, d.session_id.as_deref()),
            ] {
                if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                    h.insert(name, v);
                }
            }
            if let Ok(v) = HeaderValue::from_str(&format!("{:.0}", d.session_risk)) {
                h.insert(RISK_HEADER, v);
            }
            r
        }
        // RFC 9470: the token is fine, the authentication event is not recent enough.
        "step_up" => {
            let description = d.user_message.clone().unwrap_or_default();
            let challenge = bearer_challenge_with(
                "insufficient_user_authentication",
                &description,
                ", max_age=0",
            );
            problem(StatusCode::UNAUTHORIZED, &d, Some(challenge))
        }
        "deny" => problem(StatusCode::TOO_MANY_REQUESTS, &d, None),
        decision => {
            let description = match decision {
                "invalid" => "the token is not valid",
                _ => "the token has been revoked",
            };
            problem(
                StatusCode::UNAUTHORIZED,
                &d,
                Some(bearer_challenge("invalid_token", description)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_count_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.9, 198.51.100.7, 10.0.0.2"),
        );
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let outsider: IpAddr = "192.0.2.1".parse().unwrap();
        // The rightmost address a trusted proxy did not add: what the client spoofed on the left is ignored.
        assert_eq!(client_ip(proxy, &h, &trusted).to_string(), "198.51.100.7");
        assert_eq!(
            client_ip(outsider, &h, &trusted),
            outsider,
            "an untrusted peer's headers are ignored"
        );
        assert_eq!(client_ip(proxy, &h, &[]), proxy);
        let mut garbage = HeaderMap::new();
        garbage.insert("x-forwarded-for", HeaderValue::from_static("not-an-ip"));
        assert_eq!(client_ip(proxy, &garbage, &trusted), proxy);
        // A junk entry on the left cannot hide the address the proxy appended.
        let mut hiding = HeaderMap::new();
        hiding.insert(
            "x-forwarded-for",
            HeaderValue::from_static("x, 203.0.113.66"),
        );
        hiding.insert("x-real-ip", HeaderValue::from_static("198.51.100.1"));
        assert_eq!(
            client_ip(proxy, &hiding, &trusted).to_string(),
            "203.0.113.66"
        );
    }
}
