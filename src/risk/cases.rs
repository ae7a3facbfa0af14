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

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use super::sim::{RequestFields, Scored, Simulator};
use super::{Decision, RequestKind, RuleSet};
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
    crate::clock::parse_rfc3339_ms(s).map_err(|e| format!("{s:?} is not an RFC 3339 time: {e}"))
}

fn client(step: &Step, ua: &UaParser) -> ClientInfo {
    let ip = step.ip.to_canonical();
    let location = step.geo.as_ref().map(|g| Location {
        country: g.country.as_deref().map(Arc::from),
        city: g.city.as_deref().map(Arc::from),
        latitude: g.lat,
        longitude: g.lon,
        radius_km: g.radius_km.unwrap_or(0.0),
    });
    ClientInfo {
        ip,
        prefix: network_prefix(ip, 24, 48),
        country: step
            .country
            .as_deref()
            .map(Arc::from)
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
    let mut sim = Simulator::new(rules);
    let mut failures = Vec::new();

    for (i, step) in case.steps.iter().enumerate() {
        let n = i + 1;
        let at_ms =
            parse_time(&step.at).map_err(|e| format!("{}: step {n}: {e}", path.display()))?;
        let info = Arc::new(client(step, ua));
        let (decision, fired) = match step.event {
            Event::Open => {
                sim.open(
                    at_ms,
                    &step.session,
                    &step.subject,
                    ClientInfo::clone(&info),
                );
                (Decision::Allow, Vec::new())
            }
            Event::Reauth => {
                sim.reauth(
                    at_ms,
                    &step.session,
                    &step.subject,
                    ClientInfo::clone(&info),
                );
                (Decision::Allow, Vec::new())
            }
            Event::Request | Event::Refresh | Event::RefreshReuse => {
                let kind = if step.event == Event::Request {
                    RequestKind::Request
                } else {
                    RequestKind::Refresh
                };
                let fields = RequestFields {
                    method: step.method.as_deref(),
                    path: step.path.as_deref(),
                    referrer: step.referrer.as_deref(),
                    origin: step.origin.as_deref(),
                    sec_fetch_site: step.sec_fetch_site.as_deref(),
                    cost: step.cost,
                };
                let reused = step.event == Event::RefreshReuse;
                match sim.request(
                    at_ms,
                    kind,
                    &step.session,
                    &step.subject,
                    &info,
                    fields,
                    reused,
                ) {
                    Scored::Evaluated(e) => (
                        e.decision,
                        e.reasons.iter().map(|r| r.rule.clone()).collect(),
                    ),
                    Scored::Revoked => (Decision::Revoke, Vec::new()),
                    Scored::UnknownSession => {
                        return Err(format!(
                            "{}: step {n}: session {:?} was never opened",
                            path.display(),
                            step.session
                        ));
                    }
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
