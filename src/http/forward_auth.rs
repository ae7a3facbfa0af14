//! `/v1/forward-auth`: reads the protected request as the gateway describes it and
//! answers 200 (identity headers), 401 (`invalid_token`, or the RFC 9470 step-up
//! challenge), 429 or 400.
//!
//! Gateway conventions read here:
//! - nginx `auth_request`: `X-Original-URI`, `X-Original-Method`;
//! - Traefik `ForwardAuth`, Caddy `forward_auth`: `X-Forwarded-Method`, `-Uri`,
//!   `-Proto`, `-Host`, `-For`;
//! - Envoy `ext_authz` (HTTP service): the original path appended to the
//!   configured `path_prefix` (`/v1/forward-auth/<path>`), the original method.
//!
//! Every header that feeds a rule must be present at most once, readable and short:
//! anything else is answered 400 rather than guessed at, so an oversized or doubled
//! `Referer` cannot slip past a referrer rule.

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use ipnet::IpNet;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::AppState;
use super::error::{ApiError, bearer_challenge, bearer_challenge_with};
use super::verify::{Decision, MAX_CONTEXT_FIELD, decide};
use crate::config::ForwardAuthSettings;
use crate::monitor::{RequestInfo, method_name};
use crate::risk::ReasonMode;

pub const PATH: &str = "/v1/forward-auth";

pub fn router() -> Router<AppState> {
    Router::new()
        .route(PATH, any(forward_auth))
        // Envoy ext_authz appends the original path to `path_prefix`.
        .route("/v1/forward-auth/{*path}", any(forward_auth))
}

/// `[forward_auth]` with its header names ready to use.
#[derive(Debug, Clone)]
pub struct ForwardAuth {
    pub settings: ForwardAuthSettings,
    subject: HeaderName,
    session: HeaderName,
    risk: HeaderName,
}

impl ForwardAuth {
    pub fn new(settings: ForwardAuthSettings) -> Result<Self, String> {
        let name = |n: &str| HeaderName::from_bytes(n.as_bytes()).map_err(|e| format!("{n}: {e}"));
        Ok(Self {
            subject: name(&settings.subject_header)?,
            session: name(&settings.session_header)?,
            risk: name(&settings.risk_header)?,
            settings,
        })
    }
}

/// The header that tells the gateway where to send a browser: the app's
/// re-authentication or sign-in page, with the request's path as `next`.
const REDIRECT_HEADER: &str = "x-auth-redirect";

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The headers read for a value of their own: each must be present at most once,
/// except `X-Forwarded-For`, which may repeat (see [`Gateway::client_ip`]).
/// `Authorization` stays last (it sizes the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Field {
    OriginalUri,
    ForwardedUri,
    OriginalMethod,
    ForwardedMethod,
    ForwardedProto,
    ForwardedHost,
    UserAgent,
    Referer,
    Origin,
    SecFetchSite,
    SecFetchMode,
    /// Not a single value: read in the pass for the usual case of one header.
    ForwardedFor,
    Authorization,
}

impl Field {
    const COUNT: usize = Self::Authorization as usize + 1;
    #[cfg(test)]
    const ALL: [Self; Self::COUNT] = [
        Self::OriginalUri,
        Self::ForwardedUri,
        Self::OriginalMethod,
        Self::ForwardedMethod,
        Self::ForwardedProto,
        Self::ForwardedHost,
        Self::UserAgent,
        Self::Referer,
        Self::Origin,
        Self::SecFetchSite,
        Self::SecFetchMode,
        Self::ForwardedFor,
        Self::Authorization,
    ];

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "x-original-uri" => Self::OriginalUri,
            "x-forwarded-uri" => Self::ForwardedUri,
            "x-original-method" => Self::OriginalMethod,
            "x-forwarded-method" => Self::ForwardedMethod,
            "x-forwarded-proto" => Self::ForwardedProto,
            "x-forwarded-host" => Self::ForwardedHost,
            "user-agent" => Self::UserAgent,
            "referer" => Self::Referer,
            "origin" => Self::Origin,
            "sec-fetch-site" => Self::SecFetchSite,
            "sec-fetch-mode" => Self::SecFetchMode,
            "x-forwarded-for" => Self::ForwardedFor,
            "authorization" => Self::Authorization,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Self::OriginalUri => "x-original-uri",
            Self::ForwardedUri => "x-forwarded-uri",
            Self::OriginalMethod => "x-original-method",
            Self::ForwardedMethod => "x-forwarded-method",
            Self::ForwardedProto => "x-forwarded-proto",
            Self::ForwardedHost => "x-forwarded-host",
            Self::UserAgent => "user-agent",
            Self::Referer => "referer",
            Self::Origin => "origin",
            Self::SecFetchSite => "sec-fetch-site",
            Self::SecFetchMode => "sec-fetch-mode",
            Self::ForwardedFor => "x-forwarded-for",
            Self::Authorization => "authorization",
        }
    }
}

/// The request's headers as this endpoint reads them, gathered in one pass: a
/// lookup by name hashes the name and probes the map, and the dozen of them a
/// request needed were a visible share of its cost.
struct Gateway<'h> {
    headers: &'h HeaderMap,
    /// Each field's first value and how many it has (counted to two).
    fields: [(Option<&'h HeaderValue>, u8); Field::COUNT],
}

impl<'h> Gateway<'h> {
    fn read(headers: &'h HeaderMap) -> Self {
        let mut fields = [(None, 0u8); Field::COUNT];
        for (name, value) in headers {
            if let Some(field) = Field::from_name(name.as_str()) {
                let (first, count) = &mut fields[field as usize];
                first.get_or_insert(value);
                *count = count.saturating_add(1).min(2);
            }
        }
        Self { headers, fields }
    }

    /// The first value, unchecked.
    fn first(&self, field: Field) -> Option<&'h HeaderValue> {
        self.fields[field as usize].0
    }

    /// The one value of a header, if present. Doubled, unreadable or oversized is an error.
    fn single(&self, field: Field) -> Result<Option<&'h str>, ApiError> {
        let name = field.name();
        let (first, count) = self.fields[field as usize];
        let Some(first) = first else {
            return Ok(None);
        };
        if count > 1 {
            return Err(ApiError::BadRequest(format!(
                "{name}: sent more than once; the request is ambiguous"
            )));
        }
        if first.len() > MAX_CONTEXT_FIELD {
            return Err(ApiError::BadRequest(format!(
                "{name}: longer than {MAX_CONTEXT_FIELD} bytes"
            )));
        }
        let value = first
            .to_str()
            .map_err(|_| ApiError::BadRequest(format!("{name}: not printable ASCII")))?;
        Ok(Some(value))
    }

    /// The value of `fields` (one gateway convention each), each checked. Gateways
    /// pass the client's own headers on and set only their own convention's, so two
    /// that disagree mean the client wrote one of them: refused, never picked from.
    fn one_of(&self, fields: &[Field]) -> Result<Option<&'h str>, ApiError> {
        let mut found: Option<(Field, &'h str)> = None;
        for &field in fields {
            if let Some(v) = self.single(field)? {
                match found {
                    Some((first, prev)) if prev != v => {
                        return Err(ApiError::BadRequest(format!(
                            "{} and {} disagree; the request is ambiguous",
                            first.name(),
                            field.name()
                        )));
                    }
                    _ => found = Some((field, v)),
                }
            }
        }
        Ok(found.map(|(_, v)| v))
    }

    /// [`client_ip`], with the `X-Forwarded-For` header found in the pass when
    /// there is at most one (nearly always), not looked up again by name.
    fn client_ip(&self, peer: IpAddr, trusted: &[IpNet]) -> IpAddr {
        match self.fields[Field::ForwardedFor as usize] {
            (one, 0 | 1) => client_ip_from(peer, one.into_iter(), trusted),
            _ => client_ip(peer, self.headers, trusted),
        }
    }
}

/// Where the access token came from.
enum Presented<'h> {
    Token(&'h str),
    /// No credential at all (RFC 6750 §3.1: challenge without an error code).
    Nothing,
}

/// `Authorization: Bearer` or the configured cookie. Two candidates that disagree
/// (two headers, two cookies, a header and a cookie) are refused: the gateway must
/// vouch for the token the app will act on, and which one that is is not ours to guess.
fn presented_token<'h>(
    gateway: &Gateway<'h>,
    cookie: Option<&str>,
) -> Result<Presented<'h>, ApiError> {
    let mut bearer = None;
    if let (Some(value), count) = gateway.fields[Field::Authorization as usize] {
        if count > 1 {
            return Err(ApiError::BadRequest(
                "authorization: sent more than once; the request is ambiguous".into(),
            ));
        }
        let value = value
            .to_str()
            .map_err(|_| ApiError::BadRequest("authorization: not printable ASCII".into()))?;
        let (scheme, rest) = value.split_once(' ').unwrap_or((value, ""));
        if scheme.eq_ignore_ascii_case("bearer") {
            let token = rest.trim();
            if token.is_empty() || memchr::memchr(b' ', token.as_bytes()).is_some() {
                return Err(ApiError::BadRequest(
                    "authorization: expected \"Bearer <token>\"".into(),
                ));
            }
            bearer = Some(token);
        }
        // Another scheme (Basic for the app itself, say) is not ours: the cookie may still be.
    }
    let mut from_cookie: Option<&str> = None;
    if let Some(name) = cookie {
        // Byte-wise: other cookies of the site may hold anything; only ours must be ASCII.
        for value in gateway.headers.get_all(header::COOKIE) {
            for pair in value.as_bytes().split(|b| *b == b';') {
                let pair = pair.trim_ascii();
                let Some(eq) = pair.iter().position(|b| *b == b'=') else {
                    continue;
                };
                if &pair[..eq] != name.as_bytes() {
                    continue;
                }
                let v = std::str::from_utf8(&pair[eq + 1..])
                    .ok()
                    .filter(|v| v.is_ascii())
                    .ok_or_else(|| {
                        ApiError::BadRequest(format!("cookie {name}: not printable ASCII"))
                    })?
                    .trim()
                    .trim_matches('"');
                match from_cookie {
                    Some(prev) if prev != v => {
                        return Err(ApiError::BadRequest(format!(
                            "cookie {name}: sent twice with different values"
                        )));
                    }
                    _ => from_cookie = Some(v),
                }
            }
        }
    }
    let from_cookie = from_cookie.filter(|t| !t.is_empty());
    Ok(match (bearer, from_cookie) {
        (Some(b), Some(c)) if b != c => {
            return Err(ApiError::BadRequest(
                "the Authorization header and the token cookie hold different tokens".into(),
            ));
        }
        (Some(t), _) | (None, Some(t)) => Presented::Token(t),
        (None, None) => Presented::Nothing,
    })
}

/// The client's address: the peer itself, unless the peer is a trusted proxy; then
/// the rightmost `X-Forwarded-For` address that is not a trusted proxy.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    client_ip_from(peer, headers.get_all(X_FORWARDED_FOR).iter(), trusted)
}

/// [`client_ip`] of the request's `X-Forwarded-For` headers, in their order.
fn client_ip_from<'h>(
    peer: IpAddr,
    forwarded_for: impl DoubleEndedIterator<Item = &'h HeaderValue>,
    trusted: &[IpNet],
) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    // Walk from the right (the hops our proxies appended) and stop at the first
    // address they did not add. Anything unreadable ends the walk: what lies left
    // of it was written by the client and is not evidence.
    let mut last_trusted = peer;
    for value in forwarded_for.rev() {
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

/// Risk values an allowed request usually carries (below the default revoke
/// threshold, 90), rendered once.
const RISK_RENDERED: u16 = 100;

/// The session's risk as its header carries it: rounded as `{:.0}` rounds (half to
/// even). The usual values are rendered once and shared, not formatted and copied
/// for every answer.
fn risk_header(risk: f64) -> Option<HeaderValue> {
    static RENDERED: std::sync::LazyLock<Vec<HeaderValue>> =
        std::sync::LazyLock::new(|| (0..=RISK_RENDERED).map(HeaderValue::from).collect());
    let rounded = risk.round_ties_even();
    if rounded.is_sign_positive() && rounded <= f64::from(RISK_RENDERED) {
        // In 0..=RISK_RENDERED, so the cast is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        return RENDERED.get(rounded as usize).cloned();
    }
    HeaderValue::from_str(&format!("{risk:.0}")).ok()
}

/// The protected request as the gateway describes it. `envoy_path` is the path
/// appended to our prefix, if the gateway used that convention.
fn forwarded_request(
    gateway: &Gateway<'_>,
    client: IpAddr,
    method: &Method,
    envoy_path: Option<String>,
) -> Result<RequestInfo, ApiError> {
    let owned = |v: Option<&str>| v.filter(|v| !v.is_empty()).map(str::to_owned);
    let path = match (
        gateway.one_of(&[Field::OriginalUri, Field::ForwardedUri])?,
        envoy_path,
    ) {
        (Some(h), Some(e)) if h != e => {
            return Err(ApiError::BadRequest(
                "the path after /v1/forward-auth and X-Original-URI/X-Forwarded-Uri disagree"
                    .into(),
            ));
        }
        (Some(h), _) => Some(h.to_owned()),
        (None, e) => e,
    };
    let method = match gateway.one_of(&[Field::OriginalMethod, Field::ForwardedMethod])? {
        Some(m) => Some(method_name(m)),
        // Envoy (and a gateway calling us with the original method) says it this way.
        None if *method != Method::GET || path.is_some() => Some(method_name(method.as_str())),
        None => None,
    };
    // Checked for shape even though no rule reads them yet.
    gateway.single(Field::ForwardedProto)?;
    gateway.single(Field::ForwardedHost)?;
    Ok(RequestInfo {
        ip: Some(client),
        // The token holder controls this header: missing is compared as an empty
        // user agent, never replaced by the bound one.
        user_agent: Some(
            gateway
                .single(Field::UserAgent)?
                .unwrap_or_default()
                .to_owned(),
        ),
        method,
        path,
        referrer: owned(gateway.single(Field::Referer)?),
        origin: owned(gateway.single(Field::Origin)?),
        sec_fetch_site: owned(gateway.single(Field::SecFetchSite)?),
        cost: None,
    })
}

/// Characters kept as they are in a query value.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'/');

/// `url?next=<path>`: only a local path is passed on, so the page cannot be
/// turned into an open redirect.
fn redirect_to(url: &str, next: Option<&str>) -> Option<HeaderValue> {
    let next = next.filter(|p| p.starts_with('/') && !p.starts_with("//") && !p.contains('\\'));
    let value = match next {
        Some(p) => {
            let sep = if url.contains('?') { '&' } else { '?' };
            format!("{url}{sep}next={}", utf8_percent_encode(p, QUERY_VALUE))
        }
        None => url.to_owned(),
    };
    HeaderValue::from_str(&value).ok()
}

/// Where a refused request should send the user, if anywhere.
#[derive(Clone, Copy)]
struct Page<'a> {
    /// `reauth_url` or `login_url`.
    url: Option<&'a str>,
    /// The protected request's path, passed on as `next`.
    path: Option<&'a str>,
    /// Answer 302 to it (a browser navigation, and the gateway passes answers on).
    redirect: bool,
}

/// The body of a refused request (RFC 9457). Its fields are in alphabetical order,
/// the order the `serde_json::json!` map it replaced wrote them in (serde_json's
/// map is a `BTreeMap` without its `preserve_order` feature): keep a new field in
/// that order.
#[derive(serde::Serialize)]
struct Problem<'a> {
    decision: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    login_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reauth_url: Option<&'a str>,
    retry_after: Option<u64>,
    rules: Vec<&'a str>,
    status: u16,
    title: &'static str,
    #[serde(rename = "type")]
    problem_type: Cow<'static, str>,
    user_message: Option<&'a str>,
}

/// What the gateway may pass on to whoever holds the token: the decision, the user
/// message, the rule ids and where to go. Never the details, which describe the
/// victim's binding.
fn problem(
    status: StatusCode,
    d: &Decision,
    challenge: Option<HeaderValue>,
    page: Page<'_>,
) -> Response {
    let (next_url, path) = (page.url, page.path);
    let rules: Vec<&str> = d
        .reasons
        .iter()
        .filter(|r| r.mode == ReasonMode::Enforce)
        .map(|r| r.rule.as_str())
        .collect();
    let next = next_url.filter(|_| d.decision != "deny");
    let step_up = d.decision == "step_up";
    let body = Problem {
        decision: d.decision,
        login_url: next.filter(|_| !step_up),
        reauth_url: next.filter(|_| step_up),
        retry_after: d.retry_after,
        rules,
        status: status.as_u16(),
        title: match d.decision {
            "step_up" => "Re-authentication required",
            "deny" => "Too many requests",
            _ => "Invalid token",
        },
        problem_type: match d.decision {
            "step_up" => Cow::Borrowed("urn:tokenwarden:problem:step_up"),
            "deny" => Cow::Borrowed("urn:tokenwarden:problem:deny"),
            "revoke" => Cow::Borrowed("urn:tokenwarden:problem:revoke"),
            "revoke_user" => Cow::Borrowed("urn:tokenwarden:problem:revoke_user"),
            "invalid" => Cow::Borrowed("urn:tokenwarden:problem:invalid"),
            other => Cow::Owned(format!("urn:tokenwarden:problem:{other}")),
        },
        user_message: d.user_message.as_deref(),
    };
    let mut r = (status, axum::Json(body)).into_response();
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
    if d.decision != "deny"
        && let Some(v) = next_url.and_then(|u| redirect_to(u, path))
    {
        if page.redirect {
            *r.status_mut() = StatusCode::FOUND;
            r.headers_mut().insert(header::LOCATION, v.clone());
        }
        r.headers_mut().insert(REDIRECT_HEADER, v);
    }
    r
}

/// 400 with the RFC 6750 `invalid_request` challenge.
fn bad_request(e: ApiError) -> Response {
    let detail = match &e {
        ApiError::BadRequest(d) => d.clone(),
        _ => String::new(),
    };
    let mut r = e.into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        bearer_challenge("invalid_request", &detail),
    );
    r
}

async fn forward_auth(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    // The request itself, not the `HeaderMap` extractor: that one copies every header.
    // Its URI is the one the gateway sent (this router is never nested).
    incoming: Request,
) -> Response {
    let headers = incoming.headers();
    let uri = incoming.uri();
    let peer_ip = peer.ip().to_canonical();
    if !state.trusted_proxies.is_empty()
        && !state.trusted_proxies.iter().any(|n| n.contains(&peer_ip))
    {
        return ApiError::Forbidden(format!(
            "{peer_ip} is not a trusted proxy (TOKENWARDEN_TRUSTED_PROXIES)"
        ))
        .into_response();
    }
    let fa = &state.forward_auth;
    // Envoy: everything after our prefix is the original path and query.
    let envoy_path = uri
        .path()
        .strip_prefix(PATH)
        .filter(|rest| rest.starts_with('/'))
        .map(|rest| match uri.query() {
            Some(q) => format!("{rest}?{q}"),
            None => rest.to_owned(),
        });
    let gateway = Gateway::read(headers);
    let client = gateway.client_ip(peer_ip, &state.trusted_proxies);
    let request = match forwarded_request(&gateway, client, incoming.method(), envoy_path) {
        Ok(r) => r,
        Err(e) => return bad_request(e),
    };
    // A browser navigating (not a script): it can be sent to a page.
    let redirect = fa.settings.redirect_navigations
        && request.method.as_deref().is_none_or(|m| m == "GET")
        && gateway
            .first(Field::SecFetchMode)
            .is_some_and(|v| v.as_bytes() == b"navigate");
    let token = match presented_token(&gateway, fa.settings.cookie.as_deref()) {
        Ok(Presented::Token(t)) => t,
        Ok(Presented::Nothing) => {
            let d = Decision {
                decision: "invalid",
                score: 0,
                session_risk: 0.0,
                subject: None,
                session_id: None,
                jti: None,
                reasons: Vec::new(),
                user_message: Some("Please sign in.".into()),
                retry_after: None,
                shadow_decision: None,
                rules_hash: None,
            };
            let mut r = problem(
                StatusCode::UNAUTHORIZED,
                &d,
                None,
                Page {
                    url: fa.settings.login_url.as_deref(),
                    path: request.path.as_deref(),
                    redirect,
                },
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"tokenwarden\""),
            );
            return r;
        }
        Err(e) => return bad_request(e),
    };
    let started = std::time::Instant::now();
    let verdict = match state.sessions.verify(token, &request).await {
        Ok(v) => v,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let d = decide(verdict);
    state
        .metrics
        .answered("forward_auth", d.decision, started.elapsed().as_secs_f64());
    let path = request.path.as_deref();
    match d.decision {
        "allow" => {
            let mut r = StatusCode::OK.into_response();
            let h = r.headers_mut();
            for (name, value) in [
                (&fa.subject, d.subject.as_ref()),
                (&fa.session, d.session_id.as_ref()),
            ] {
                if let Some(v) = value.and_then(|v| HeaderValue::from_str(v.as_str()).ok()) {
                    h.insert(name.clone(), v);
                }
            }
            if let Some(v) = risk_header(d.session_risk) {
                h.insert(fa.risk.clone(), v);
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
            problem(
                StatusCode::UNAUTHORIZED,
                &d,
                Some(challenge),
                Page {
                    url: fa.settings.reauth_url.as_deref(),
                    path,
                    redirect,
                },
            )
        }
        "deny" => problem(
            StatusCode::TOO_MANY_REQUESTS,
            &d,
            None,
            Page {
                url: None,
                path,
                redirect: false,
            },
        ),
        decision => {
            let description = match decision {
                "invalid" => "the token is not valid",
                _ => "the token has been revoked",
            };
            problem(
                StatusCode::UNAUTHORIZED,
                &d,
                Some(bearer_challenge("invalid_token", description)),
                Page {
                    url: fa.settings.login_url.as_deref(),
                    path,
                    redirect,
                },
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The refusal's body is what the `serde_json::json!` map it replaced wrote, byte
    /// for byte, for every decision, with and without a page to go to.
    #[tokio::test]
    async fn a_refusal_body_is_written_as_before() {
        let reason = |rule: &str, mode| crate::risk::Reason {
            rule: rule.into(),
            kind: "rate".into(),
            points: 10,
            mode,
            detail: "the victim's binding".into(),
        };
        for decision in [
            "step_up",
            "deny",
            "revoke",
            "revoke_user",
            "invalid",
            "allow",
        ] {
            for url in [None, Some("https://app.example/login?x=1")] {
                for (message, retry) in [(None, None), (Some("Please sign in \"again\"."), Some(7))]
                {
                    let d = Decision {
                        decision,
                        score: 0,
                        session_risk: 0.0,
                        subject: None,
                        session_id: None,
                        jti: None,
                        reasons: vec![
                            reason("burst", ReasonMode::Enforce),
                            reason("quiet", ReasonMode::Shadow),
                            reason("geo", ReasonMode::Enforce),
                        ],
                        user_message: message.map(str::to_owned),
                        retry_after: retry,
                        shadow_decision: None,
                        rules_hash: None,
                    };
                    let page = Page {
                        url,
                        path: Some("/a"),
                        redirect: false,
                    };
                    let r = problem(StatusCode::UNAUTHORIZED, &d, None, page);
                    let body = axum::body::to_bytes(r.into_body(), usize::MAX)
                        .await
                        .unwrap();
                    let key = if decision == "step_up" {
                        "reauth_url"
                    } else {
                        "login_url"
                    };
                    let mut before = serde_json::json!({
                        "type": format!("urn:tokenwarden:problem:{decision}"),
                        "title": match decision { "step_up" => "Re-authentication required", "deny" => "Too many requests", _ => "Invalid token" },
                        "status": 401,
                        "decision": decision,
                        "user_message": message,
                        "rules": ["burst", "geo"],
                        "retry_after": retry,
                    });
                    if decision != "deny"
                        && let Some(url) = url
                    {
                        before[key] = url.into();
                    }
                    assert_eq!(
                        String::from_utf8_lossy(&body),
                        serde_json::to_string(&before).unwrap(),
                        "{decision} {url:?} {message:?}"
                    );
                }
            }
        }
    }

    /// Every field is found by its name as the request's header map spells it, and
    /// a doubled or disagreeing header is refused in the words it always was.
    #[test]
    fn each_gateway_header_is_read_by_its_own_name() {
        for (i, field) in Field::ALL.into_iter().enumerate() {
            assert_eq!(field as usize, i);
            let name = HeaderName::from_static(field.name());
            assert_eq!(name.as_str(), field.name());
            assert_eq!(Field::from_name(name.as_str()), Some(field));
            let mut once = HeaderMap::new();
            once.insert(name.clone(), HeaderValue::from_static("a"));
            assert_eq!(Gateway::read(&once).first(field).unwrap(), "a");
            let mut twice = once.clone();
            twice.append(name.clone(), HeaderValue::from_static("b"));
            let gateway = Gateway::read(&twice);
            assert_eq!(
                gateway.first(field).unwrap(),
                "a",
                "{name}: the first value"
            );
            match gateway.single(field) {
                Err(ApiError::BadRequest(m)) => assert_eq!(
                    m,
                    format!("{name}: sent more than once; the request is ambiguous")
                ),
                other => panic!("{name}: {other:?}"),
            }
        }
        let mut h = HeaderMap::new();
        h.insert(X_ORIGINAL_URI_NAME, HeaderValue::from_static("/a"));
        h.insert("x-forwarded-uri", HeaderValue::from_static("/b"));
        match Gateway::read(&h).one_of(&[Field::OriginalUri, Field::ForwardedUri]) {
            Err(ApiError::BadRequest(m)) => assert_eq!(
                m,
                "x-original-uri and x-forwarded-uri disagree; the request is ambiguous"
            ),
            other => panic!("{other:?}"),
        }
        h.insert("x-forwarded-uri", HeaderValue::from_static("/a"));
        assert_eq!(
            Gateway::read(&h)
                .one_of(&[Field::OriginalUri, Field::ForwardedUri])
                .unwrap(),
            Some("/a")
        );
    }

    const X_ORIGINAL_URI_NAME: HeaderName = HeaderName::from_static("x-original-uri");

    #[test]
    fn the_risk_header_reads_as_the_risk_formatted() {
        for risk in [
            0.0,
            0.4,
            0.5,
            1.5,
            2.5,
            42.49,
            42.5,
            43.5,
            89.99,
            99.5,
            100.0,
            100.4,
            100.5,
            100.6,
            150.7,
            1e9,
            -0.0,
            -0.4,
            -3.2,
            f64::NAN,
        ] {
            let header = risk_header(risk).unwrap();
            assert_eq!(
                header.to_str().unwrap(),
                format!("{risk:.0}"),
                "risk {risk}"
            );
        }
    }

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

    /// The address forward-auth finds from its one pass over the headers is the one
    /// `client_ip` finds by name, with no `X-Forwarded-For`, one, or several (read
    /// right to left across them).
    #[test]
    fn the_client_address_from_the_pass_is_the_one_found_by_name() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let outsider: IpAddr = "192.0.2.1".parse().unwrap();
        let cases: [&[&str]; 5] = [
            &[],
            &["203.0.113.9, 10.0.0.2"],
            &["not-an-ip"],
            &["203.0.113.9", "198.51.100.7, 10.0.0.3"],
            &["203.0.113.9, 198.51.100.7", "10.0.0.3", "10.0.0.4"],
        ];
        let expected = [
            "10.0.0.1",
            "203.0.113.9",
            "10.0.0.1",
            "198.51.100.7",
            "198.51.100.7",
        ];
        for (values, expected) in cases.into_iter().zip(expected) {
            let mut h = HeaderMap::new();
            h.insert(header::USER_AGENT, HeaderValue::from_static("ua"));
            for v in values {
                h.append(X_FORWARDED_FOR, HeaderValue::from_static(v));
            }
            let gateway = Gateway::read(&h);
            for peer in [proxy, outsider] {
                assert_eq!(
                    gateway.client_ip(peer, &trusted),
                    client_ip(peer, &h, &trusted),
                    "{values:?} from {peer}"
                );
            }
            assert_eq!(
                gateway.client_ip(proxy, &trusted).to_string(),
                expected,
                "{values:?}"
            );
        }
    }

    #[test]
    fn the_token_comes_from_one_place_only() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; tw=tok; b=2"));
        assert!(matches!(
            presented_token(&Gateway::read(&h), Some("tw")),
            Ok(Presented::Token("tok"))
        ));
        assert!(matches!(
            presented_token(&Gateway::read(&h), None),
            Ok(Presented::Nothing)
        ));
        h.append(header::COOKIE, HeaderValue::from_static("tw=other"));
        assert!(
            presented_token(&Gateway::read(&h), Some("tw")).is_err(),
            "two different cookies"
        );
        let mut both = HeaderMap::new();
        both.insert(header::COOKIE, HeaderValue::from_static("tw=abc"));
        both.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        assert!(
            matches!(
                presented_token(&Gateway::read(&both), Some("tw")),
                Ok(Presented::Token("abc"))
            ),
            "the same token twice is one token"
        );
        both.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer xyz"),
        );
        assert!(
            presented_token(&Gateway::read(&both), Some("tw")).is_err(),
            "a header and a cookie that disagree"
        );
        let mut utf8 = HeaderMap::new();
        utf8.insert(
            header::COOKIE,
            HeaderValue::from_bytes("lang=fr-\u{e9}; tw=tok".as_bytes()).unwrap(),
        );
        assert!(
            matches!(
                presented_token(&Gateway::read(&utf8), Some("tw")),
                Ok(Presented::Token("tok"))
            ),
            "another cookie's bytes do not hide ours"
        );
        let mut twice = HeaderMap::new();
        twice.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer abc"),
        );
        twice.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer def"),
        );
        assert!(
            presented_token(&Gateway::read(&twice), None).is_err(),
            "two Authorization headers"
        );
        let mut basic = HeaderMap::new();
        basic.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic eDp5"),
        );
        basic.insert(header::COOKIE, HeaderValue::from_static("tw=tok"));
        assert!(
            matches!(
                presented_token(&Gateway::read(&basic), Some("tw")),
                Ok(Presented::Token("tok"))
            ),
            "another scheme is not ours; the cookie still is"
        );
        let mut empty = HeaderMap::new();
        empty.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer  "));
        assert!(presented_token(&Gateway::read(&empty), None).is_err());
    }

    #[test]
    fn redirects_only_carry_local_paths() {
        let v = |next| {
            redirect_to("/reauth", next)
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap()
        };
        assert_eq!(
            v(Some("/orders?id=7&x=é")),
            "/reauth?next=/orders%3Fid%3D7%26x%3D%C3%A9"
        );
        assert_eq!(v(Some("//evil.example/")), "/reauth");
        assert_eq!(v(Some("https://evil.example/")), "/reauth");
        assert_eq!(v(Some("/\\evil.example")), "/reauth");
        assert_eq!(v(None), "/reauth");
        assert_eq!(
            redirect_to("https://app.example/reauth?lang=en", Some("/a"))
                .unwrap()
                .to_str()
                .unwrap(),
            "https://app.example/reauth?lang=en&next=/a"
        );
    }
}
