//! Rule files: the TOML analysts edit, validated into a [`RuleSet`]. Every
//! table is `deny_unknown_fields`; each error names file, line and column.
//!
//! A rule names its detector by the key that holds the detector's parameters:
//!
//! ```toml
//! [[rule]]
//! id = "country_changed"
//! points = 40
//! message = "We noticed activity from {country}. Please confirm it's you."
//! ip_binding = { tier = "country" }
//! ```

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{Action, Mode};
use crate::config::{sha256, to_hex};

/// A rule file that cannot be used, with where the problem is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct RuleError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default)]
    settings: SettingsRaw,
    #[serde(default)]
    thresholds: ThresholdsRaw,
    #[serde(default, rename = "rule")]
    rules: Vec<Spanned<RuleRaw>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsRaw {
    /// Session risk halves every this long. Default 30m.
    risk_half_life: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ThresholdsRaw {
    step_up: Option<f64>,
    revoke: Option<f64>,
    revoke_user: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleRaw {
    id: Spanned<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    points: u32,
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    action: Option<Action>,
    #[serde(default)]
    message: Option<Spanned<String>>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    ip_binding: Option<IpBinding>,
    ua_binding: Option<UaBinding>,
    geo_velocity: Option<GeoVelocityRaw>,
    new_location: Option<NewLocation>,
    rate: Option<RateRaw>,
    referrer: Option<Referrer>,
    concurrent_use: Option<ConcurrentUseRaw>,
    refresh_reuse: Option<RefreshReuse>,
    network_list: Option<NetworkList>,
}

/// Which part of the binding must match.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    Exact,
    Prefix,
    Asn,
    Country,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpBinding {
    pub tier: Tier,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UaBinding {
    /// Also fire when only the device class changed (desktop → mobile). Default true.
    #[serde(default = "yes")]
    pub device_class: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Compare with this session's last request.
    Session,
    /// Compare with the user's last request in any session.
    User,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GeoVelocityRaw {
    max_speed_kmh: Option<f64>,
    min_distance_km: Option<f64>,
    min_elapsed: Option<String>,
    scope: Option<Scope>,
    use_accuracy_radius: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GeoVelocity {
    pub max_speed_kmh: f64,
    pub min_distance_km: f64,
    /// Elapsed time is never taken as less than this (clock skew, bursts).
    pub min_elapsed_secs: f64,
    pub scope: Scope,
    pub use_accuracy_radius: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LocationKind {
    Country,
    Asn,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLocation {
    pub what: LocationKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RateKey {
    Jti,
    Sid,
    Sub,
    Ip,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateRaw {
    key: RateKey,
    limit: u32,
    per: String,
    burst: Option<u32>,
    /// Count the request's `cost` instead of 1. Default true.
    weighted: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rate {
    pub key: RateKey,
    pub limit: u32,
    pub per: Duration,
    pub burst: u32,
    pub weighted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Missing {
    /// A request without the header passes (non-browser clients).
    #[default]
    Allow,
    /// A request without the header fires the rule.
    Fire,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Referrer {
    /// Origins (`https://app.example.com`) allowed in `Origin` or as the origin of `Referer`.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// `Sec-Fetch-Site` values allowed, e.g. `same-origin`.
    #[serde(default)]
    pub allowed_sec_fetch_site: Vec<String>,
    #[serde(default)]
    pub missing: Missing,
}

/// What tells two holders of one session apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NetworkBy {
    Ip,
    Prefix,
    Asn,
    Country,
    /// The browser alone: Wi-Fi/mobile flapping with one browser never looks like two holders.
    UserAgent,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConcurrentUseRaw {
    window: Option<String>,
    by: Option<NetworkBy>,
    include_user_agent: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConcurrentUse {
    pub window_secs: i64,
    pub by: NetworkBy,
    pub include_user_agent: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshReuse {}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkList {
    #[serde(default)]
    pub cidrs: Vec<IpNet>,
    #[serde(default)]
    pub asns: Vec<u32>,
    /// Rules that do not count when the client is on this list (allow-listed ranges).
    #[serde(default)]
    pub suppress: Vec<String>,
}

/// A detector with its validated parameters.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Detector {
    IpBinding(IpBinding),
    UaBinding(UaBinding),
    GeoVelocity(GeoVelocity),
    NewLocation(NewLocation),
    Rate(Rate),
    Referrer(Referrer),
    ConcurrentUse(ConcurrentUse),
    RefreshReuse(RefreshReuse),
    NetworkList(NetworkList),
}

impl Detector {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::IpBinding(_) => "ip_binding",
            Self::UaBinding(_) => "ua_binding",
            Self::GeoVelocity(_) => "geo_velocity",
            Self::NewLocation(_) => "new_location",
            Self::Rate(_) => "rate",
            Self::Referrer(_) => "referrer",
            Self::ConcurrentUse(_) => "concurrent_use",
            Self::RefreshReuse(_) => "refresh_reuse",
            Self::NetworkList(_) => "network_list",
        }
    }
}

/// One validated rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rule {
    pub id: String,
    pub description: Option<String>,
    pub points: u32,
    pub mode: Mode,
    pub action: Option<Action>,
    pub message: Option<String>,
    pub paths: Vec<String>,
    pub methods: Vec<String>,
    pub detector: Detector,
}

impl Rule {
    /// Whether the rule's scope (path prefixes, methods) covers the request.
    #[inline]
    pub fn in_scope(&self, method: Option<&str>, path: Option<&str>) -> bool {
        let path_ok = self.paths.is_empty()
            || path.is_some_and(|p| {
                self.paths
                    .iter()
                    .any(|prefix| p.starts_with(prefix.as_str()))
            });
        let method_ok = self.methods.is_empty()
            || method.is_some_and(|m| self.methods.iter().any(|x| x.eq_ignore_ascii_case(m)));
        path_ok && method_ok
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Thresholds {
    pub step_up: f64,
    pub revoke: f64,
    pub revoke_user: f64,
}

/// A validated rule file, ready for the engine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleSet {
    /// Where it came from (for messages).
    pub source: String,
    /// First 16 hex digits of the file's SHA-256: which rules decided an event.
    pub hash: Arc<str>,
    pub risk_half_life_secs: f64,
    pub thresholds: Thresholds,
    pub rules: Vec<Rule>,
}

impl RuleSet {
    /// The rule set with no rules: every valid token is allowed.
    pub fn empty() -> Self {
        Self {
            source: "(none)".into(),
            hash: "0000000000000000".into(),
            risk_half_life_secs: 1800.0,
            thresholds: Thresholds {
                step_up: f64::INFINITY,
                revoke: f64::INFINITY,
                revoke_user: f64::INFINITY,
            },
            rules: Vec::new(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, RuleError> {
        let text = std::fs::read_to_string(path).map_err(|e| RuleError {
            file: path.display().to_string(),
            line: 0,
            column: 0,
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    pub fn parse(source: &str, text: &str) -> Result<Self, RuleError> {
        let at = |offset: usize, message: String| {
            let (line, column) = line_col(text, offset);
            RuleError {
                file: source.to_owned(),
                line,
                column,
                message,
            }
        };
        let file: RuleFile = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            at(offset, e.message().trim().to_owned())
        })?;

        let half_life = duration(
            file.settings.risk_half_life.as_deref(),
            Duration::from_secs(1800),
        )
        .map_err(|m| at(0, format!("settings.risk_half_life: {m}")))?;
        if half_life.is_zero() {
            return Err(at(
                0,
                "settings.risk_half_life: must be more than zero".into(),
            ));
        }
        let t = &file.thresholds;
        let thresholds = Thresholds {
            step_up: t.step_up.unwrap_or(f64::INFINITY),
            revoke: t.revoke.unwrap_or(f64::INFINITY),
            revoke_user: t.revoke_user.unwrap_or(f64::INFINITY),
        };
        for (name, v) in [
            ("step_up", thresholds.step_up),
            ("revoke", thresholds.revoke),
            ("revoke_user", thresholds.revoke_user),
        ] {
            if v.is_nan() || v <= 0.0 {
                return Err(at(
                    0,
                    format!("thresholds.{name}: must be a positive number"),
                ));
            }
        }
        if !(thresholds.step_up <= thresholds.revoke && thresholds.revoke <= thresholds.revoke_user)
        {
            return Err(at(
                0,
                "thresholds: expected step_up <= revoke <= revoke_user".into(),
            ));
        }

        let mut ids = HashSet::new();
        let mut rules = Vec::with_capacity(file.rules.len());
        for spanned in file.rules {
            let offset = spanned.span().start;
            let raw = spanned.into_inner();
            let id_at = raw.id.span().start;
            let id = raw.id.get_ref().clone();
            if id.is_empty()
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                return Err(at(
                    id_at,
                    format!("rule id {id:?}: use letters, digits, '_' or '-'"),
                ));
            }
            if !ids.insert(id.clone()) {
                return Err(at(id_at, format!("rule id {id:?} appears twice")));
            }
            let rule = compile(&id, raw).map_err(|m| at(offset, format!("rule {id:?}: {m}")))?;
            rules.push(rule);
        }
        for rule in &rules {
            if let Detector::NetworkList(list) = &rule.detector
                && let Some(unknown) = list.suppress.iter().find(|s| !ids.contains(*s))
            {
                return Err(at(
                    0,
                    format!("rule {:?}: suppress names no rule {unknown:?}", rule.id),
                ));
            }
        }
        Ok(Self {
            source: source.to_owned(),
            hash: Arc::from(&to_hex(&sha256(text.as_bytes()))[..16]),
            risk_half_life_secs: half_life.as_secs_f64(),
            thresholds,
            rules,
        })
    }
}

fn duration(value: Option<&str>, default: Duration) -> Result<Duration, String> {
    value.map_or(Ok(default), |v| {
        humantime::parse_duration(v)
            .map_err(|e| format!("{v:?} is not a duration such as 30m: {e}"))
    })
}

fn compile(id: &str, raw: RuleRaw) -> Result<Rule, String> {
    let mut detectors = Vec::new();
    if let Some(p) = raw.ip_binding {
        detectors.push(Detector::IpBinding(p));
    }
    if let Some(p) = raw.ua_binding {
        detectors.push(Detector::UaBinding(p));
    }
    if let Some(p) = raw.geo_velocity {
        let min_elapsed = duration(p.min_elapsed.as_deref(), Duration::from_secs(60))?;
        let g = GeoVelocity {
            max_speed_kmh: p.max_speed_kmh.unwrap_or(900.0),
            min_distance_km: p.min_distance_km.unwrap_or(100.0),
            min_elapsed_secs: min_elapsed.as_secs_f64().max(1.0),
            scope: p.scope.unwrap_or(Scope::Session),
            use_accuracy_radius: p.use_accuracy_radius.unwrap_or(true),
        };
        if g.max_speed_kmh.is_nan()
            || g.max_speed_kmh <= 0.0
            || g.min_distance_km.is_nan()
            || g.min_distance_km < 0.0
        {
            return Err(
                "geo_velocity: max_speed_kmh must be positive and min_distance_km not negative"
                    .into(),
            );
        }
        detectors.push(Detector::GeoVelocity(g));
    }
    if let Some(p) = raw.new_location {
        detectors.push(Detector::NewLocation(p));
    }
    if let Some(p) = raw.rate {
        let per = duration(Some(&p.per), Duration::from_secs(60))?;
        if p.limit == 0 || per.is_zero() {
            return Err("rate: limit and per must be more than zero".into());
        }
        detectors.push(Detector::Rate(Rate {
            key: p.key,
            limit: p.limit,
            per,
            burst: p.burst.unwrap_or(p.limit).max(1),
            weighted: p.weighted.unwrap_or(true),
        }));
    }
    if let Some(p) = raw.referrer {
        if p.allowed_origins.is_empty() && p.allowed_sec_fetch_site.is_empty() {
            return Err("referrer: list allowed_origins, allowed_sec_fetch_site or both".into());
        }
        detectors.push(Detector::Referrer(p));
    }
    if let Some(p) = raw.concurrent_use {
        let window = duration(p.window.as_deref(), Duration::from_secs(300))?;
        detectors.push(Detector::ConcurrentUse(ConcurrentUse {
            window_secs: i64::try_from(window.as_secs()).unwrap_or(i64::MAX),
            by: p.by.unwrap_or(NetworkBy::Prefix),
            include_user_agent: p.include_user_agent.unwrap_or(true),
        }));
    }
    if let Some(p) = raw.refresh_reuse {
        detectors.push(Detector::RefreshReuse(p));
    }
    if let Some(p) = raw.network_list {
        if p.cidrs.is_empty() && p.asns.is_empty() {
            return Err("network_list: list cidrs, asns or both".into());
        }
        if p.suppress.iter().any(|s| s == id) {
            return Err("network_list: a rule cannot suppress itself".into());
        }
        detectors.push(Detector::NetworkList(p));
    }
    let detector = match detectors.len() {
        1 => detectors.remove(0),
        0 => {
            return Err("names no detector: add one of ip_binding, ua_binding, geo_velocity, new_location, rate, referrer, concurrent_use, refresh_reuse, network_list".into());
        }
        _ => return Err("names several detectors: one rule, one detector".into()),
    };
    let message = match raw.message {
        Some(m) => {
            let m = m.into_inner();
            let unknown = super::message::unknown_placeholders(&m);
            if !unknown.is_empty() {
                return Err(format!(
                    "message uses unknown placeholders {unknown:?}; known: {}",
                    super::message::PLACEHOLDERS.join(", ")
                ));
            }
            Some(m)
        }
        None => None,
    };
    if raw.points == 0
        && raw.action.is_none()
        && !matches!(detector, Detector::NetworkList(NetworkList { ref suppress, .. }) if !suppress.is_empty())
    {
        return Err("has neither points nor an action: it could never change anything".into());
    }
    Ok(Rule {
        id: id.to_owned(),
        description: raw.description,
        points: raw.points,
        mode: raw.mode,
        action: raw.action,
        message,
        paths: raw.paths,
        methods: raw.methods,
        detector,
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_file_line_and_column() {
        let text = "[thresholds]\nstep_up = 40\n\n[[rule]]\nid = \"x\"\npoints = 5\nip_binding = { tir = \"country\" }\n";
        let e = RuleSet::parse("r.toml", text).unwrap_err();
        assert_eq!((e.file.as_str(), e.line), ("r.toml", 7), "{e}");
        assert!(e.message.contains("tir"), "{e}");
        assert!(e.to_string().starts_with("r.toml:7:"), "{e}");
    }

    #[test]
    fn semantic_errors_point_at_the_rule() {
        let text = "[[rule]]\nid = \"a\"\npoints = 5\nua_binding = {}\n\n[[rule]]\nid = \"b\"\npoints = 1\n";
        let e = RuleSet::parse("r.toml", text).unwrap_err();
        assert_eq!(e.line, 6, "{e}");
        assert!(e.message.contains("no detector"), "{e}");
        let e = RuleSet::parse(
            "r.toml",
            "[[rule]]\nid = \"a\"\npoints = 5\nmessage = \"{town}\"\nua_binding = {}\n",
        )
        .unwrap_err();
        assert!(e.message.contains("town"), "{e}");
        let e = RuleSet::parse("r.toml", "[[rule]]\nid = \"a\"\nua_binding = {}\n").unwrap_err();
        assert!(e.message.contains("neither points nor an action"), "{e}");
        let e = RuleSet::parse("r.toml", "[thresholds]\nstep_up = 50\nrevoke = 10\n").unwrap_err();
        assert!(e.message.contains("step_up <= revoke"), "{e}");
    }

    #[test]
    fn the_hash_changes_with_the_file() {
        let a = RuleSet::parse("a", "[thresholds]\nstep_up = 40\n").unwrap();
        let b = RuleSet::parse("a", "[thresholds]\nstep_up = 41\n").unwrap();
        assert_ne!(a.hash, b.hash);
        assert_eq!(a.hash.len(), 16);
    }
}
