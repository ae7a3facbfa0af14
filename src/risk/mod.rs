//! The risk engine. [`evaluate`] is a pure function of (rule set, request
//! context, session view, time) → [`Evaluation`]: no I/O, no clock reads. Its
//! one piece of state is the rate quotas handed to it (the rate limiters, and
//! the session's own quotas of `sid` rules), which are driven by the same
//! injected clock the caller used to stamp the request.

pub mod cases;
pub mod detectors;
pub mod geo;
pub mod message;
pub mod rate;
pub mod rules;
pub mod sim;
pub mod state;

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::enrich::ClientInfo;
pub use rate::RateLimiters;
pub use rules::{Rule, RuleError, RuleSet};

/// How a rule takes part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Its points count and its action applies.
    #[default]
    Enforce,
    /// Evaluated and reported, never changes a decision.
    Shadow,
    /// Not evaluated.
    Off,
}

/// What a rule can ask for directly, besides its points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Deny,
    StepUp,
    Revoke,
    RevokeUser,
}

/// The answer for one request. Ordered by severity (`Allow` < … < `RevokeUser`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    Allow,
    /// This request only (e.g. rate limit): 429 with `Retry-After`.
    Deny,
    /// Re-authenticate (RFC 9470); the session stays marked until reauth.
    StepUp,
    /// The token and its session.
    Revoke,
    /// Every session of the subject.
    RevokeUser,
    /// The token itself is bad (signature, claims, expiry).
    Invalid,
}

impl Decision {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::StepUp => "step_up",
            Self::Revoke => "revoke",
            Self::RevokeUser => "revoke_user",
            Self::Invalid => "invalid",
        }
    }
}

impl From<Action> for Decision {
    fn from(a: Action) -> Self {
        match a {
            Action::Deny => Self::Deny,
            Action::StepUp => Self::StepUp,
            Action::Revoke => Self::Revoke,
            Action::RevokeUser => Self::RevokeUser,
        }
    }
}

/// What kind of call is being scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    Request,
    Refresh,
}

/// Everything known about the request being scored.
#[derive(Debug, Clone)]
pub struct RequestContext<'a> {
    pub kind: RequestKind,
    pub at_ms: i64,
    /// Shared with the observation the request leaves behind.
    pub client: &'a Arc<ClientInfo>,
    pub method: Option<&'a str>,
    pub path: Option<&'a str>,
    pub referrer: Option<&'a str>,
    pub origin: Option<&'a str>,
    pub sec_fetch_site: Option<&'a str>,
    /// Items this request touches (weights rate rules); at least 1.
    pub cost: u32,
    pub jti: &'a str,
    pub sid: &'a str,
    pub sub: &'a str,
    /// A rotated refresh token was presented again.
    pub refresh_reused: bool,
}

/// One earlier request, as remembered for velocity and concurrent-use checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    pub at_ms: i64,
    /// Shared: a session's binding, its recent requests and its user's last request
    /// usually name the same client.
    pub client: Arc<ClientInfo>,
}

/// What the engine may know about the session and its user.
#[derive(Debug, Clone, Copy)]
pub struct SessionView<'a> {
    /// The client the session was issued to (or last re-authenticated from).
    pub binding: Option<&'a ClientInfo>,
    /// This session's last request that was let through (or its sign-in).
    pub last: Option<&'a Observation>,
    /// The user's last request let through, in any session.
    pub user_last: Option<&'a Observation>,
    /// This session's recent requests, oldest first (bounded).
    pub recent: &'a [Observation],
    pub known_countries: &'a [Arc<str>],
    pub known_asns: &'a [u32],
    pub risk: f64,
    pub risk_at_ms: i64,
    pub step_up: bool,
    /// Why the session was asked to re-authenticate, told again until it does.
    pub step_up_message: Option<&'a str>,
}

/// How a reason took part in the decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReasonMode {
    Enforce,
    Shadow,
    /// Fired, but an allow-list rule suppressed it.
    Suppressed,
}

/// One rule that fired, with its points and a human-readable detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reason {
    pub rule: String,
    pub kind: String,
    pub points: u32,
    pub mode: ReasonMode,
    pub detail: String,
}

/// The engine's answer, always explainable.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    pub decision: Decision,
    /// Points of enforced rules that fired on this request.
    pub score: u32,
    /// Decayed session risk including this request's score.
    pub session_risk: f64,
    pub reasons: Vec<Reason>,
    pub user_message: Option<String>,
    pub retry_after: Option<u64>,
    /// What the decision would be if shadow rules were enforced.
    pub shadow_decision: Decision,
    pub rules_hash: Arc<str>,
}

/// A detector's finding.
#[derive(Debug, Clone, Default)]
pub struct Hit {
    pub detail: String,
    pub vars: BTreeMap<&'static str, String>,
    pub retry_after: Option<u64>,
}

/// What every message can say about the request and the one before it.
fn context_vars(
    ctx: &RequestContext<'_>,
    view: &SessionView<'_>,
) -> BTreeMap<&'static str, String> {
    let c = ctx.client;
    let mut vars = BTreeMap::new();
    vars.insert("ip", c.ip.to_string());
    if let Some(country) = &c.country {
        vars.insert("country", country.to_string());
    }
    if let Some(city) = c.location.as_ref().and_then(|l| l.city.as_deref()) {
        vars.insert("city", city.to_owned());
    }
    if let Some(asn) = c.asn {
        vars.insert("asn", format!("AS{asn}"));
    }
    vars.insert("browser", c.ua.family.clone());
    vars.insert("os", c.ua.os.clone());
    if let Some(prev) = view.last {
        if let Some(country) = &prev.client.country {
            vars.insert("prev_country", country.to_string());
        }
        if let Some(city) = prev
            .client
            .location
            .as_ref()
            .and_then(|l| l.city.as_deref())
        {
            vars.insert("prev_city", city.to_owned());
        }
        vars.insert(
            "minutes",
            ((ctx.at_ms - prev.at_ms).max(0) / 60_000).to_string(),
        );
    }
    vars
}

/// The session risk at `at_ms`, decayed with the half-life (never negative).
pub fn decayed_risk(risk: f64, risk_at_ms: i64, at_ms: i64, half_life_secs: f64) -> f64 {
    // NaN and negative risk both read as none.
    if risk.is_nan() || risk <= 0.0 {
        return 0.0;
    }
    let elapsed = (at_ms - risk_at_ms).max(0) as f64 / 1000.0;
    risk * 0.5f64.powf(elapsed / half_life_secs)
}

fn threshold_decision(risk: f64, t: &rules::Thresholds) -> Decision {
    if risk >= t.revoke_user {
        Decision::RevokeUser
    } else if risk >= t.revoke {
        Decision::Revoke
    } else if risk >= t.step_up {
        Decision::StepUp
    } else {
        Decision::Allow
    }
}

const DEFAULT_STEP_UP_MESSAGE: &str =
    "We noticed something unusual about this session. Please confirm it's you.";
const DEFAULT_REVOKE_MESSAGE: &str =
    "For your security this session has been ended. Please sign in again.";
const DEFAULT_DENY_MESSAGE: &str = "Too many requests. Please wait a moment and try again.";

/// Scores one request. Pure apart from the rate limiters and the session's own
/// quotas (see the module doc).
pub fn evaluate(
    rules: &RuleSet,
    limiters: &RateLimiters,
    ctx: &RequestContext<'_>,
    view: &SessionView<'_>,
    quotas: &mut rate::SessionQuotas,
) -> Evaluation {
    let mut hits: Vec<(&Rule, Hit)> = Vec::new();
    for rule in &rules.rules {
        if rule.mode == Mode::Off || !rule.in_scope(ctx.method, ctx.path) {
            continue;
        }
        if let Some(hit) = detectors::run(rule, limiters, ctx, view, quotas) {
            hits.push((rule, hit));
        }
    }
    // Allow-listed networks suppress named rules (only an enforced list suppresses).
    let suppressed: Vec<(&str, &str)> = hits
        .iter()
        .filter(|(r, _)| r.mode == Mode::Enforce)
        .filter_map(|(r, _)| match &r.detector {
            rules::Detector::NetworkList(list) => Some((r.id.as_str(), list)),
            _ => None,
        })
        .flat_map(|(by, list)| list.suppress.iter().map(move |s| (s.as_str(), by)))
        .collect();

    let mut reasons = Vec::with_capacity(hits.len());
    let (mut score, mut shadow_score) = (0u32, 0u32);
    let (mut direct, mut shadow_direct) = (Decision::Allow, Decision::Allow);
    let mut retry_after: Option<u64> = None;
    let mut message: Option<(u32, String)> = None;
    for (rule, hit) in &hits {
        let suppressed_by = suppressed
            .iter()
            .find(|(s, _)| *s == rule.id)
            .map(|(_, by)| *by);
        let mode = match (suppressed_by, rule.mode) {
            (Some(_), _) => ReasonMode::Suppressed,
            (None, Mode::Shadow) => ReasonMode::Shadow,
            _ => ReasonMode::Enforce,
        };
        let action = rule.action.map(Decision::from).or_else(|| {
            // A rate rule with no action denies this request.
            matches!(rule.detector, rules::Detector::Rate(_)).then_some(Decision::Deny)
        });
        if mode != ReasonMode::Suppressed {
            shadow_score = shadow_score.saturating_add(rule.points);
            shadow_direct = shadow_direct.max(action.unwrap_or(Decision::Allow));
        }
        if mode == ReasonMode::Enforce {
            score = score.saturating_add(rule.points);
            direct = direct.max(action.unwrap_or(Decision::Allow));
            if action == Some(Decision::Deny) {
                retry_after = retry_after.max(hit.retry_after);
            }
            if let Some(template) = &rule.message
                && message.as_ref().is_none_or(|(p, _)| rule.points > *p)
            {
                let mut vars = context_vars(ctx, view);
                vars.extend(hit.vars.clone());
                message = Some((rule.points, message::render(template, &vars)));
            }
        }
        let detail = match suppressed_by {
            Some(by) => format!("{} (suppressed by {by})", hit.detail),
            None => hit.detail.clone(),
        };
        reasons.push(Reason {
            rule: rule.id.clone(),
            kind: rule.detector.kind().to_owned(),
            points: rule.points,
            mode,
            detail,
        });
    }

    let base = decayed_risk(
        view.risk,
        view.risk_at_ms,
        ctx.at_ms,
        rules.risk_half_life_secs,
    );
    let session_risk = base + f64::from(score);
    let shadow_risk = base + f64::from(shadow_score);
    let flagged = if view.step_up {
        Decision::StepUp
    } else {
        Decision::Allow
    };
    let decision = threshold_decision(session_risk, &rules.thresholds)
        .max(direct)
        .max(flagged);
    let shadow_decision = threshold_decision(shadow_risk, &rules.thresholds)
        .max(shadow_direct)
        .max(flagged);
    let user_message = match decision {
        Decision::Allow => None,
        _ => Some(message.map(|(_, m)| m).unwrap_or_else(|| {
            match decision {
                Decision::Deny => DEFAULT_DENY_MESSAGE,
                Decision::StepUp => view.step_up_message.unwrap_or(DEFAULT_STEP_UP_MESSAGE),
                _ => DEFAULT_REVOKE_MESSAGE,
            }
            .to_owned()
        })),
    };
    Evaluation {
        decision,
        score,
        session_risk,
        reasons,
        user_message,
        retry_after: if decision == Decision::Deny {
            retry_after.or(Some(1))
        } else {
            None
        },
        shadow_decision,
        rules_hash: Arc::clone(&rules.hash),
    }
}
