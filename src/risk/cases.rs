//! Rule test cases: data files that replay a timestamped sequence of session
//! events through a rule set and state the decision (and the rules that fire)
//! expected at each step. `tokenwarden rules test DIR` runs every `*.toml` in
//! DIR; so does the test suite, on `rules/tests`.
//!
//! ```toml
//! description = "A stolen token used from Lagos minutes after Oslo"
//! rules = "../default.toml"            # relative to this file
//!
//! [[step]]
//! at = "2026-03-02T09:00:00Z"
//! event = "open"                       # open | request | refresh | refresh_reuse | reauth
//! session = "laptop"
//! subject = "alice"
//! ip = "198.51.100.10"
//! user_agent = "Mozilla/5.0 … Firefox/133.0"
//! geo = { country = "NO", city = "Oslo", lat = 59.91, lon = 10.75, radius_km = 10 }
//! asn = 2119
//! expect = "allow"
//! fires = []                           # rules that must fire (any mode)
//! not_fires = []                       # rules that must not fire
//! ```

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::state::{SessionState, UserState, assess};
use super::{Decision, RateLimiters, RequestContext, RequestKind, RuleSet};
use crate::clock::ManualClock;
use crate::enrich::{ClientInfo, Location, UaParser, network_prefix};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CaseFile {
    description: Option<String>,
    rules: PathBuf,
    #[serde(rename = "step")]
    steps: Vec<Step>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Event {
    Open,
    Request,
    Refresh,
    RefreshReuse,
    Reauth,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Geo {
    country: Option<String>,
    city: Option<String>,
    lat: f64,
    lon: f64,
    radius_km: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Step {
    at: String,
    event: Event,
    session: String,
    subject: String,
    ip: IpAddr,
    #[serde(default)]
    user_agent: String,
    geo: Option<Geo>,
    country: Option<String>,
    asn: Option<u32>,
    method: Option<String>,
    path: Option<String>,
    referrer: Option<String>,
    origin: Option<String>,
    sec_fetch_site: Option<String>,
    cost: Option<u32>,
    expect: Option<Decision>,
    #[serde(default)]
    fires: Vec<String>,
    #[serde(default)]
    not_fires: Vec<String>,
}

/// The result of one case file.
#[derive(Debug)]
pub struct CaseReport {
    pub file: PathBuf,
    pub description: Option<String>,
    pub steps: usize,
    pub failures: Vec<String>,
}

impl CaseReport {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

fn parse_time(s: &str) -> Result<i64, String> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("{s:?} is out of range"))
}

fn client(step: &Step, ua: &UaParser) -> ClientInfo {
    let ip = step.ip.to_canonical();
    let location = step.geo.as_ref().map(|g| Location {
        country: g.country.clone(),
        city: g.city.clone(),
        latitude: g.lat,
        longitude: g.lon,
        radius_km: g.radius_km.unwrap_or(0.0),
    });
    ClientInfo {
        ip,
        prefix: network_prefix(ip, 24, 48),
        country: step
            .country
            .clone()
            .or_else(|| location.as_ref().and_then(|l| l.country.clone())),
        location,
        asn: step.asn,
        asn_org: None,
        ua: ua.fingerprint(&step.user_agent),
    }
}

/// Runs one case file. Errors in the file itself (unreadable, bad rules) are `Err`.
pub fn run_file(path: &Path, ua: &UaParser) -> Result<CaseReport, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let case: CaseFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let rules_path = path.parent().unwrap_or(Path::new(".")).join(&case.rules);
    let rules = RuleSet::load(&rules_path).map_err(|e| e.to_string())?;
    let clock = Arc::new(ManualClock::at(0));
    let limiters = RateLimiters::new(clock.clone(), 100_000);
    let mut sessions: HashMap<String, SessionState> = HashMap::new();
    let mut users: HashMap<String, UserState> = HashMap::new();
    let mut revoked: Vec<String> = Vec::new();
    let mut failures = Vec::new();

    for (i, step) in case.steps.iter().enumerate() {
        let n = i + 1;
        let at_ms =
            parse_time(&step.at).map_err(|e| format!("{}: step {n}: {e}", path.display()))?;
        clock.set_millis(at_ms);
        let info = client(step, ua);
        let user = users.entry(step.subject.clone()).or_default();
        let (decision, fired) = match step.event {
            Event::Open => {
                user.learn(&info);
                let state = SessionState::opened(&step.subject, info, at_ms);
                user.last = state.recent.back().cloned();
                sessions.insert(step.session.clone(), state);
                (Decision::Allow, Vec::new())
            }
            Event::Reauth => {
                user.learn(&info);
                revoked.retain(|s| s != &step.session);
                let session = sessions
                    .entry(step.session.clone())
                    .or_insert_with(|| SessionState::new(&step.subject, None));
                session.rebind(info, at_ms);
                user.last = session.recent.back().cloned();
                (Decision::Allow, Vec::new())
            }
            Event::Request | Event::Refresh | Event::RefreshReuse => {
                if revoked.contains(&step.session) {
                    (Decision::Revoke, Vec::new())
                } else {
                    let Some(session) = sessions.get_mut(&step.session) else {
                        return Err(format!(
                            "{}: step {n}: session {:?} was never opened",
                            path.display(),
                            step.session
                        ));
                    };
                    let ctx = RequestContext {
                        kind: if step.event == Event::Request {
                            RequestKind::Request
                        } else {
                            RequestKind::Refresh
                        },
                        at_ms,
                        client: &info,
                        method: step.method.as_deref(),
                        path: step.path.as_deref(),
                        referrer: step.referrer.as_deref(),
                        origin: step.origin.as_deref(),
                        sec_fetch_site: step.sec_fetch_site.as_deref(),
                        cost: step.cost.unwrap_or(1).max(1),
                        jti: "case",
                        sid: &step.session,
                        sub: &step.subject,
                        refresh_reused: step.event == Event::RefreshReuse,
                    };
                    let e = assess(&rules, &limiters, &ctx, session, user);
                    let fired: Vec<String> = e.reasons.iter().map(|r| r.rule.clone()).collect();
                    match e.decision {
                        Decision::Revoke => revoked.push(step.session.clone()),
                        Decision::RevokeUser => {
                            revoked.extend(
                                sessions
                                    .iter()
                                    .filter(|(_, s)| s.subject == step.subject)
                                    .map(|(k, _)| k.clone()),
                            );
                        }
                        _ => {}
                    }
                    (e.decision, fired)
                }
            }
        };
        if let Some(expected) = step.expect
            && expected != decision
        {
            failures.push(format!(
                "step {n} ({}): expected {}, got {} (fired: {})",
                step.at,
                expected.as_str(),
                decision.as_str(),
                if fired.is_empty() {
                    "none".to_owned()
                } else {
                    fired.join(", ")
                }
            ));
        }
        for rule in &step.fires {
            if !fired.contains(rule) {
                failures.push(format!(
                    "step {n} ({}): {rule} should fire but did not (fired: {})",
                    step.at,
                    fired.join(", ")
                ));
            }
        }
        for rule in &step.not_fires {
            if fired.contains(rule) {
                failures.push(format!(
                    "step {n} ({}): {rule} fired but should not",
                    step.at
                ));
            }
        }
    }
    Ok(CaseReport {
        file: path.to_owned(),
        description: case.description,
        steps: case.steps.len(),
        failures,
    })
}

/// Runs every `*.toml` case in a directory (or one file), in name order.
pub fn run_dir(path: &Path, ua: &UaParser) -> Result<Vec<CaseReport>, String> {
    if path.is_file() {
        return Ok(vec![run_file(path, ua)?]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(format!("{}: no *.toml case files", path.display()));
    }
    files.iter().map(|f| run_file(f, ua)).collect()
}
