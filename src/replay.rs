//! Replay: recorded events (NDJSON, the audit log's export format) re-evaluated in
//! order, with their own timestamps and a fresh in-memory state, under a candidate
//! rule set — and under a baseline rule set, or against the recorded decisions —
//! and a report of what would change. Deterministic: the same input gives
//! byte-identical output.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::IpAddr;
use std::sync::Arc;

use serde::Serialize;

use crate::enrich::{ClientInfo, Enricher, Location, UaParser, network_prefix};
use crate::events::{Event, EventKind};
use crate::risk::sim::{RequestFields, Scored, Simulator};
use crate::risk::{Decision, RequestKind, RuleSet};

/// What to do with a line that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    Stop,
    Skip,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BadLine {
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct RuleStats {
    pub baseline_fires: u64,
    pub baseline_points: u64,
    pub candidate_fires: u64,
    pub candidate_points: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    pub line: usize,
    pub ts: String,
    pub baseline: String,
    pub candidate: String,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SessionChange {
    pub session_id: String,
    pub subject: String,
    pub baseline: String,
    pub candidate: String,
    pub samples: Vec<Sample>,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct Report {
    pub events: u64,
    pub scored: u64,
    pub changed: u64,
    /// Per decision: (baseline, candidate) counts over scored events.
    pub decisions: BTreeMap<String, (u64, u64)>,
    pub rules: BTreeMap<String, RuleStats>,
    pub newly_stepped_up: Vec<SessionChange>,
    pub newly_revoked: Vec<SessionChange>,
    pub no_longer_stepped_up: Vec<SessionChange>,
    pub no_longer_revoked: Vec<SessionChange>,
    pub bad_lines: Vec<BadLine>,
    pub baseline: String,
    pub candidate_rules_hash: String,
}

const SAMPLES: usize = 3;

/// Updates the map's entry for `key`, allocating the key only when it is new.
fn counter<V: Default>(map: &mut BTreeMap<String, V>, key: &str, update: impl FnOnce(&mut V)) {
    match map.get_mut(key) {
        Some(v) => update(v),
        None => update(map.entry(key.to_owned()).or_default()),
    }
}

/// The client an event describes: its recorded enrichment, or a fresh lookup.
pub fn client_of(e: &Event, ua: &UaParser, geo: Option<&Enricher>) -> Option<Arc<ClientInfo>> {
    let ip: IpAddr = e.ip.as_deref()?.trim().parse().ok()?;
    let ip = ip.to_canonical();
    let user_agent = e.user_agent.as_deref().unwrap_or("");
    let recorded = e.country.is_some() || e.latitude.is_some() || e.asn.is_some();
    if let (Some(g), false) = (geo, recorded) {
        let mut c = g.enrich(ip, user_agent);
        if let Some(fp) = recorded_fingerprint(e) {
            c.ua = Arc::new(fp);
        }
        return Some(Arc::new(c));
    }
    let location = match (e.latitude, e.longitude) {
        (Some(latitude), Some(longitude)) => Some(Location {
            country: e.country.clone(),
            city: e.city.clone(),
            latitude,
            longitude,
            radius_km: e.radius_km.unwrap_or(0.0),
        }),
        _ => None,
    };
    Some(Arc::new(ClientInfo {
        ip,
        prefix: network_prefix(ip, 24, 48),
        country: e.country.clone(),
        location,
        asn: e.asn,
        asn_org: None,
        ua: recorded_fingerprint(e).map_or_else(|| ua.fingerprint(user_agent), Arc::new),
    }))
}

/// Without a user agent, the fingerprint the live service used (recorded with the
/// event: the bound browser) stands in, as it did live.
fn recorded_fingerprint(e: &Event) -> Option<crate::enrich::UaFingerprint> {
    if e.user_agent.is_some() {
        return None;
    }
    let key = e.ua_fingerprint.as_ref()?.text();
    let mut parts = key.split('/');
    let family = parts.next()?.to_owned();
    let major = parts.next().filter(|m| *m != "-").map(str::to_owned);
    let os = parts.next()?.to_owned();
    let device =
        serde_json::from_value(serde_json::Value::String(parts.next()?.to_owned())).ok()?;
    Some(crate::enrich::UaFingerprint::new(family, major, os, device))
}

pub fn parse_ts(ts: &str) -> Result<i64, String> {
    crate::clock::parse_rfc3339_ms(ts).map_err(|e| format!("ts {ts:?} is not RFC 3339: {e}"))
}

/// One line parsed and checked; `Err` carries the message for the report.
pub fn parse_line(line: &str, last_ms: i64) -> Result<(Event, i64), String> {
    let event: Event = serde_json::from_str(line).map_err(|e| e.to_string())?;
    let ms = parse_ts(&event.ts)?;
    if ms < last_ms {
        return Err(format!(
            "time goes backwards ({} is before the previous event)",
            event.ts
        ));
    }
    Ok((event, ms))
}

/// Recorded revocations that were not rule decisions are facts to replay; the
/// rules' own revocations are what the simulators decide for themselves.
fn external_revocation(e: &Event) -> bool {
    e.kind == EventKind::Revoke && !e.detail.as_deref().is_some_and(|d| d.starts_with("risk"))
}

struct Track {
    subject: String,
    baseline: Decision,
    candidate: Decision,
    samples: Vec<Sample>,
}

/// Feeds one event to a simulator; `Some` when it was scored.
pub fn feed(
    sim: &mut Simulator,
    e: &Event,
    ms: i64,
    client: Option<&Arc<ClientInfo>>,
) -> Option<Scored> {
    let subject = e.subject.as_deref().unwrap_or("");
    // "Log out everywhere" names the user, not a session.
    if external_revocation(e) && e.decision.as_deref() == Some("revoke_user") {
        sim.revoke_user(subject);
        return None;
    }
    let session = e.session_id.as_deref()?;
    match e.kind {
        EventKind::SessionOpen => {
            sim.open(ms, session, subject, ClientInfo::clone(client?));
            None
        }
        EventKind::Reauth => {
            sim.reauth(ms, session, subject, ClientInfo::clone(client?));
            None
        }
        EventKind::Revoke if external_revocation(e) => {
            // A reused refresh token is also evidence the rules see (they may widen it).
            let scored = match (e.detail.as_deref(), client) {
                (Some("refresh_reuse"), Some(c)) => Some(sim.request(
                    ms,
                    RequestKind::Refresh,
                    session,
                    subject,
                    c,
                    RequestFields::default(),
                    true,
                )),
                _ => None,
            };
            if e.decision.as_deref() == Some("revoke_user") {
                sim.revoke_user(subject);
            } else {
                sim.revoke(session);
            }
            scored
        }
        EventKind::Revoke => None,
        EventKind::Request | EventKind::Refresh => {
            let kind = if e.kind == EventKind::Request {
                RequestKind::Request
            } else {
                RequestKind::Refresh
            };
            let fields = RequestFields {
                method: e.method.as_deref(),
                path: e.path.as_deref(),
                referrer: e.referrer.as_deref(),
                origin: e.origin.as_deref(),
                sec_fetch_site: e.sec_fetch_site.as_deref(),
                cost: e.cost,
            };
            Some(sim.request(ms, kind, session, subject, client?, fields, false))
        }
    }
}

fn recorded_decision(e: &Event) -> Option<Decision> {
    serde_json::from_value(serde_json::Value::String(e.decision.as_deref()?.to_owned())).ok()
}

/// How events are turned into clients, and what a bad line does.
#[derive(Clone, Copy)]
pub struct ReplayContext<'a> {
    pub ua: &'a UaParser,
    /// GeoIP for events recorded without enrichment.
    pub geo: Option<&'a Enricher>,
    pub on_error: OnError,
}

/// Replays `input`. With `emit`, every replayed event is written back with the
/// candidate's decision, score, session risk and reasons.
pub fn replay(
    input: impl BufRead,
    candidate: RuleSet,
    baseline: Option<RuleSet>,
    cx: ReplayContext<'_>,
    mut emit: Option<&mut dyn Write>,
    mut progress: impl FnMut(usize),
) -> Result<Report, BadLine> {
    let ReplayContext { ua, geo, on_error } = cx;
    let mut report = Report {
        baseline: baseline.as_ref().map_or_else(
            || "recorded decisions".to_owned(),
            |b| format!("{} ({})", b.source, b.hash),
        ),
        candidate_rules_hash: candidate.hash.to_string(),
        ..Report::default()
    };
    let mut cand = Simulator::new(candidate);
    let mut base = baseline.map(Simulator::new);
    let mut tracks: BTreeMap<String, Track> = BTreeMap::new();
    let mut last_ms = i64::MIN;
    for (i, line) in input.lines().enumerate() {
        let n = i + 1;
        progress(n);
        let line = match line {
            Ok(l) => l,
            Err(e) => {
                let bad = BadLine {
                    line: n,
                    message: format!("cannot read: {e}"),
                };
                return Err(bad);
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let (event, ms) = match parse_line(&line, last_ms) {
            Ok(x) => x,
            Err(message) => {
                let bad = BadLine { line: n, message };
                match on_error {
                    OnError::Stop => return Err(bad),
                    OnError::Skip => {
                        report.bad_lines.push(bad);
                        continue;
                    }
                }
            }
        };
        last_ms = ms;
        report.events += 1;
        let client = client_of(&event, ua, geo);
        let scored = feed(&mut cand, &event, ms, client.as_ref());
        let base_scored = base
            .as_mut()
            .and_then(|b| feed(b, &event, ms, client.as_ref()));
        let Some(cand_scored) = scored else {
            if let Some(out) = emit.as_deref_mut() {
                let _ = writeln!(out, "{line}");
            }
            continue;
        };
        let Some(c) = cand_scored.decision() else {
            continue;
        };
        let b = match (&base, &base_scored) {
            (Some(_), Some(s)) => s.decision(),
            (Some(_), None) => None,
            (None, _) => recorded_decision(&event),
        };
        let Some(b) = b else { continue };
        report.scored += 1;
        // Counting allocates a key only the first time it is seen (millions of events).
        counter(&mut report.decisions, b.as_str(), |d| d.0 += 1);
        counter(&mut report.decisions, c.as_str(), |d| d.1 += 1);
        let empty = Vec::new();
        let candidate_reasons = match &cand_scored {
            Scored::Evaluated(e) => &e.reasons,
            _ => &empty,
        };
        let baseline_reasons = match &base_scored {
            Some(Scored::Evaluated(e)) => &e.reasons,
            Some(_) => &empty,
            None => &event.reasons,
        };
        let counted = |r: &&crate::risk::Reason| r.mode != crate::risk::ReasonMode::Suppressed;
        for r in candidate_reasons.iter().filter(counted) {
            counter(&mut report.rules, &r.rule, |s| {
                s.candidate_fires += 1;
                s.candidate_points += u64::from(r.points);
            });
        }
        for r in baseline_reasons.iter().filter(counted) {
            counter(&mut report.rules, &r.rule, |s| {
                s.baseline_fires += 1;
                s.baseline_points += u64::from(r.points);
            });
        }
        let session = event.session_id.as_deref().unwrap_or_default();
        if !tracks.contains_key(session) {
            tracks.insert(
                session.to_owned(),
                Track {
                    subject: event.subject.clone().unwrap_or_default(),
                    baseline: Decision::Allow,
                    candidate: Decision::Allow,
                    samples: Vec::new(),
                },
            );
        }
        let Some(track) = tracks.get_mut(session) else {
            continue;
        };
        track.baseline = track.baseline.max(b);
        track.candidate = track.candidate.max(c);
        if b != c {
            report.changed += 1;
            if track.samples.len() < SAMPLES {
                track.samples.push(Sample {
                    line: n,
                    ts: event.ts.clone(),
                    baseline: b.as_str().to_owned(),
                    candidate: c.as_str().to_owned(),
                });
            }
        }
        if let Some(out) = emit.as_deref_mut() {
            let mut replayed = event.clone();
            replayed.decision = Some(std::borrow::Cow::Borrowed(c.as_str()));
            replayed.reasons = candidate_reasons.clone();
            if let Scored::Evaluated(e) = &cand_scored {
                replayed.score = Some(e.score);
                replayed.session_risk = Some(e.session_risk);
                replayed.rules_hash = Some(e.rules_hash.clone());
            }
            if let Ok(json) = serde_json::to_string(&replayed) {
                let _ = writeln!(out, "{json}");
            }
        }
    }
    for (session_id, t) in tracks {
        let change = |t: &Track| SessionChange {
            session_id: session_id.clone(),
            subject: t.subject.clone(),
            baseline: t.baseline.as_str().to_owned(),
            candidate: t.candidate.as_str().to_owned(),
            samples: t.samples.clone(),
        };
        let revoked = |d: Decision| d >= Decision::Revoke;
        let stepped = |d: Decision| d == Decision::StepUp;
        if revoked(t.candidate) && !revoked(t.baseline) {
            report.newly_revoked.push(change(&t));
        } else if stepped(t.candidate) && t.baseline < Decision::StepUp {
            report.newly_stepped_up.push(change(&t));
        }
        if revoked(t.baseline) && !revoked(t.candidate) {
            report.no_longer_revoked.push(change(&t));
        } else if stepped(t.baseline) && t.candidate < Decision::StepUp {
            report.no_longer_stepped_up.push(change(&t));
        }
    }
    Ok(report)
}

impl Report {
    /// The human-readable tables.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(
            o,
            "replayed {} events, {} scored, {} with a different decision",
            self.events, self.scored, self.changed
        );
        let _ = writeln!(
            o,
            "baseline: {}; candidate rules {}",
            self.baseline, self.candidate_rules_hash
        );
        let _ = writeln!(
            o,
            "\n{:<14} {:>12} {:>12} {:>10}",
            "decision", "baseline", "candidate", "change"
        );
        for (d, (b, c)) in &self.decisions {
            let _ = writeln!(
                o,
                "{:<14} {:>12} {:>12} {:>+10}",
                d,
                b,
                c,
                *c as i64 - *b as i64
            );
        }
        let _ = writeln!(
            o,
            "\n{:<36} {:>10} {:>10} {:>12} {:>12}",
            "rule", "fires (b)", "fires (c)", "points (b)", "points (c)"
        );
        for (rule, s) in &self.rules {
            let _ = writeln!(
                o,
                "{:<36} {:>10} {:>10} {:>12} {:>12}",
                rule, s.baseline_fires, s.candidate_fires, s.baseline_points, s.candidate_points
            );
        }
        for (title, list) in [
            ("newly stepped up", &self.newly_stepped_up),
            ("newly revoked", &self.newly_revoked),
            ("no longer stepped up", &self.no_longer_stepped_up),
            ("no longer revoked", &self.no_longer_revoked),
        ] {
            let _ = writeln!(o, "\n{title}: {} sessions", list.len());
            for c in list.iter().take(20) {
                let _ = writeln!(
                    o,
                    "  {} ({}): {} -> {}",
                    c.session_id, c.subject, c.baseline, c.candidate
                );
                for s in &c.samples {
                    let _ = writeln!(
                        o,
                        "      line {} at {}: {} -> {}",
                        s.line, s.ts, s.baseline, s.candidate
                    );
                }
            }
            if list.len() > 20 {
                let _ = writeln!(
                    o,
                    "  … and {} more (--format json lists all)",
                    list.len() - 20
                );
            }
        }
        if !self.bad_lines.is_empty() {
            let _ = writeln!(o, "\nskipped {} bad lines:", self.bad_lines.len());
            for b in self.bad_lines.iter().take(20) {
                let _ = writeln!(o, "  line {}: {}", b.line, b.message);
            }
        }
        o
    }
}

fn describe(c: &ClientInfo) -> String {
    format!(
        "ip {} (network {}), country {}, city {}, ASN {}, browser {}",
        c.ip,
        c.prefix,
        c.country.as_deref().unwrap_or("?"),
        c.location
            .as_ref()
            .and_then(|l| l.city.as_deref())
            .unwrap_or("?"),
        c.asn.map_or_else(|| "?".to_owned(), |a| format!("AS{a}")),
        c.ua.key()
    )
}

/// Explains one event (line `target`, 1-based; 0 means the last one): the events
/// before it are replayed to build the state it meets, then every rule is shown
/// with what it saw, whether it fired, its points and why.
pub fn explain(
    input: impl BufRead,
    rules: RuleSet,
    target: usize,
    ua: &UaParser,
    geo: Option<&Enricher>,
) -> Result<String, BadLine> {
    use std::fmt::Write as _;
    let lines: Vec<(usize, String)> = input
        .lines()
        .enumerate()
        .map(|(i, l)| {
            l.map(|l| (i + 1, l)).map_err(|e| BadLine {
                line: i + 1,
                message: e.to_string(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|(_, l)| !l.trim().is_empty())
        .collect();
    let target = if target == 0 {
        lines.last().map_or(0, |l| l.0)
    } else {
        target
    };
    let mut sim = Simulator::new(rules);
    let mut last_ms = i64::MIN;
    for (n, line) in &lines {
        let (event, ms) =
            parse_line(line, last_ms).map_err(|message| BadLine { line: *n, message })?;
        last_ms = ms;
        let client = client_of(&event, ua, geo);
        if *n < target {
            feed(&mut sim, &event, ms, client.as_ref());
            continue;
        }
        let mut o = String::new();
        let _ = writeln!(
            o,
            "line {n}: {} {:?} at {}",
            event.kind.as_str(),
            event.session_id.as_deref().unwrap_or("-"),
            event.ts
        );
        match &client {
            Some(c) => {
                let _ = writeln!(o, "  client:   {}", describe(c));
            }
            None => {
                let _ = writeln!(
                    o,
                    "  client:   none (the event has no IP): it cannot be scored"
                );
            }
        }
        if let Some(state) = event.session_id.as_deref().and_then(|s| sim.session(s)) {
            if let Some(b) = &state.binding {
                let _ = writeln!(o, "  bound to: {}", describe(b));
            }
            if let Some(prev) = state.recent.back() {
                let _ = writeln!(
                    o,
                    "  previous: {} at {}",
                    describe(&prev.client),
                    crate::events::rfc3339_ms(prev.at_ms)
                );
            }
            let _ = writeln!(
                o,
                "  risk before: {:.1}{}",
                state.risk,
                if state.step_up {
                    " (step-up pending)"
                } else {
                    ""
                }
            );
        }
        let rule_list = sim.rules().rules.clone();
        let thresholds = sim.rules().thresholds;
        let scored = feed(&mut sim, &event, ms, client.as_ref());
        let evaluation = match &scored {
            Some(Scored::Evaluated(e)) => Some(e.clone()),
            Some(Scored::Revoked) => {
                let _ = writeln!(
                    o,
                    "  the session was revoked earlier in this file: refused without evaluation"
                );
                None
            }
            Some(Scored::UnknownSession) => {
                let _ = writeln!(
                    o,
                    "  no session_open for this session earlier in the file: not scored"
                );
                None
            }
            None => {
                let _ = writeln!(
                    o,
                    "  this kind of event is not scored (it changes the session's state)"
                );
                None
            }
        };
        if let Some(e) = evaluation {
            let _ = writeln!(
                o,
                "
  {:<34} {:<9} {:>6}  result",
                "rule", "mode", "points"
            );
            for rule in &rule_list {
                let fired = e.reasons.iter().find(|r| r.rule == rule.id);
                let mode = match rule.mode {
                    crate::risk::Mode::Enforce => "enforce",
                    crate::risk::Mode::Shadow => "shadow",
                    crate::risk::Mode::Off => "off",
                };
                let result = match (fired, rule.mode) {
                    (_, crate::risk::Mode::Off) => "not evaluated (off)".to_owned(),
                    (Some(r), _) => format!(
                        "FIRED ({}): {}",
                        format!("{:?}", r.mode).to_lowercase(),
                        r.detail
                    ),
                    (None, _) if !rule.in_scope(event.method.as_deref(), event.path.as_deref()) => {
                        format!(
                            "out of scope (paths {:?}, methods {:?})",
                            rule.paths, rule.methods
                        )
                    }
                    (None, _) => format!(
                        "did not fire ({} {})",
                        rule.detector.kind(),
                        serde_json::to_string(&rule.detector).unwrap_or_default()
                    ),
                };
                let points = if fired.is_some() {
                    rule.points.to_string()
                } else {
                    "-".to_owned()
                };
                let _ = writeln!(o, "  {:<34} {:<9} {:>6}  {}", rule.id, mode, points, result);
            }
            let _ = writeln!(
                o,
                "\n  score {} -> session risk {:.1} (step_up at {}, revoke at {}, revoke_user at {})",
                e.score,
                e.session_risk,
                thresholds.step_up,
                thresholds.revoke,
                thresholds.revoke_user
            );
            let _ = writeln!(
                o,
                "  decision: {} (with shadow rules enforced: {})",
                e.decision.as_str(),
                e.shadow_decision.as_str()
            );
            if let Some(m) = &e.user_message {
                let _ = writeln!(o, "  user message: {m}");
            }
        }
        return Ok(o);
    }
    Err(BadLine {
        line: target,
        message: "no such line in the file".to_owned(),
    })
}
