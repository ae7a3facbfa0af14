//! Configuration: one TOML file (every key optional, unknown keys are errors) with
//! `TOKENWARDEN_*` environment variables on top, validated once into [`Settings`].
//! Nothing else in the crate reads the environment.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

/// Everything that can go wrong before the service starts, worded for the operator.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{name}: {message}")]
    Invalid { name: String, message: String },
}

fn invalid(name: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name: name.to_owned(),
        message: message.into(),
    }
}

/// A secret value: never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// The config file as written. Every field is optional; defaults live in [`Settings::resolve`].
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `sqlite://path` or `postgres://user@host/db`. Default: `sqlite://<data_dir>/tokenwarden.db`.
    pub database_url: Option<String>,
    /// Public listener. Default `127.0.0.1:8080`.
    pub listen: Option<SocketAddr>,
    /// Admin listener. Default `127.0.0.1:9090`.
    pub admin_listen: Option<SocketAddr>,
    /// Where generated keys and the default SQLite file live. Default `./data`.
    pub data_dir: Option<PathBuf>,
    /// The analysts' rule file.
    pub rules: Option<PathBuf>,
    /// MaxMind-format city database.
    pub geoip_city: Option<PathBuf>,
    /// MaxMind-format ASN database.
    pub geoip_asn: Option<PathBuf>,
    /// Accuracy radius (km) assumed when the city database gives none (DB-IP Lite). Default 50.
    pub geoip_default_radius_km: Option<f64>,
    /// Prefix length that makes two IPv4 addresses "the same network". Default 24.
    pub ip_prefix_v4: Option<u8>,
    /// Prefix length that makes two IPv6 addresses "the same network". Default 48.
    pub ip_prefix_v6: Option<u8>,
    /// Bearer token for the admin listener.
    pub admin_token: Option<String>,
    /// Proxies whose forwarding headers are believed (CIDRs).
    pub trusted_proxies: Option<Vec<IpNet>>,
    /// Log filter, e.g. `info` or `tokenwarden=debug`.
    pub log: Option<String>,
    /// Serve `/metrics` on the admin listener without the admin token. Default false.
    pub metrics_open: Option<bool>,
    /// App credentials for the session and verify APIs.
    #[serde(default)]
    pub apps: Vec<AppEntry>,
    /// Access and refresh token settings.
    #[serde(default)]
    pub tokens: TokensSection,
    /// Signing and verification keys. Empty: a generated EdDSA key in `data_dir`.
    #[serde(default)]
    pub keys: Vec<KeyEntry>,
    /// Several nodes on one PostgreSQL.
    #[serde(default)]
    pub cluster: ClusterSection,
    /// Audit events.
    #[serde(default)]
    pub events: EventsSection,
    /// How `/v1/forward-auth` reads the gateway's request and answers it.
    #[serde(default)]
    pub forward_auth: ForwardAuthSection,
    /// Other issuers whose access tokens are verified and monitored (verifier-only mode).
    #[serde(default)]
    pub issuers: Vec<IssuerEntry>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerEntry {
    /// The `iss` of its tokens.
    pub issuer: String,
    /// The `aud` its tokens must carry for us.
    pub audience: String,
    /// Its public keys as a JWKS file…
    pub jwks_file: Option<PathBuf>,
    /// …or fetched from this URL (cached; refetched on an unknown `kid`).
    pub jwks_url: Option<String>,
    /// Algorithms accepted from it. Default `["RS256", "ES256", "EdDSA"]`.
    pub algorithms: Option<Vec<String>>,
    /// Least time between two fetches of the JWKS URL. Default `30s`.
    pub min_refresh_interval: Option<String>,
    /// How long a fetched JWKS is used before it is fetched again. Default `1h`.
    pub cache_ttl: Option<String>,
}

/// A validated `[[issuers]]` entry.
#[derive(Debug, Clone)]
pub struct IssuerSettings {
    pub issuer: String,
    pub audience: String,
    pub jwks: JwksSource,
    pub algorithms: Vec<String>,
    pub min_refresh_interval: Duration,
    pub cache_ttl: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    Url(String),
}

fn is_loopback_http(url: &str) -> bool {
    [
        "http://127.0.0.1:",
        "http://127.0.0.1/",
        "http://[::1]:",
        "http://[::1]/",
        "http://localhost:",
        "http://localhost/",
    ]
    .iter()
    .any(|p| url.starts_with(p))
}

/// Algorithms another issuer may use: asymmetric only (a shared secret is not a
/// public key, and would let anyone holding it mint tokens).
pub const EXTERNAL_ALGORITHMS: &[&str] = &[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

fn resolve_issuers(entries: Vec<IssuerEntry>) -> Result<Vec<IssuerSettings>, ConfigError> {
    let mut seen = std::collections::HashSet::new();
    entries
        .into_iter()
        .map(|e| {
            if e.issuer.is_empty() || e.audience.is_empty() {
                return Err(invalid("issuers", "issuer and audience are required"));
            }
            if !seen.insert(e.issuer.clone()) {
                return Err(invalid(
                    "issuers",
                    format!("issuer {:?} appears twice", e.issuer),
                ));
            }
            let jwks = match (e.jwks_file, e.jwks_url) {
                (Some(f), None) => JwksSource::File(f),
                (None, Some(u)) if u.starts_with("https://") || is_loopback_http(&u) => {
                    JwksSource::Url(u)
                }
                (None, Some(u)) => {
                    return Err(invalid(
                        "issuers.jwks_url",
                        format!(
                            "{u:?} must be https (plain http only to 127.0.0.1, [::1] or localhost): whoever can change the keys can mint tokens"
                        ),
                    ));
                }
                _ => {
                    return Err(invalid(
                        "issuers",
                        format!("{:?}: set exactly one of jwks_file and jwks_url", e.issuer),
                    ));
                }
            };
            let algorithms = e
                .algorithms
                .unwrap_or_else(|| vec!["RS256".into(), "ES256".into(), "EdDSA".into()]);
            if algorithms.is_empty() {
                return Err(invalid("issuers.algorithms", "must name at least one"));
            }
            if let Some(bad) = algorithms
                .iter()
                .find(|a| !EXTERNAL_ALGORITHMS.contains(&a.as_str()))
            {
                return Err(invalid(
                    "issuers.algorithms",
                    format!(
                        "{bad:?} is not accepted from another issuer; use {}",
                        EXTERNAL_ALGORITHMS.join(", ")
                    ),
                ));
            }
            Ok(IssuerSettings {
                issuer: e.issuer,
                audience: e.audience,
                jwks,
                algorithms,
                min_refresh_interval: parse_duration(
                    "issuers.min_refresh_interval",
                    e.min_refresh_interval,
                    Duration::from_secs(30),
                )?,
                cache_ttl: parse_duration(
                    "issuers.cache_ttl",
                    e.cache_ttl,
                    Duration::from_secs(3600),
                )?,
            })
        })
        .collect()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardAuthSection {
    /// Cookie that carries the access token when there is no `Authorization` header.
    pub cookie: Option<String>,
    /// The app's re-authentication page, for `step_up` answers (absolute or `/path`).
    pub reauth_url: Option<String>,
    /// The app's sign-in page, for missing, invalid and revoked tokens.
    pub login_url: Option<String>,
    /// Answer a browser navigation (`Sec-Fetch-Mode: navigate`, GET) that must go to
    /// `reauth_url` or `login_url` with a 302 there, for gateways that pass the answer
    /// on as it is (Traefik, Caddy, Envoy). Not for nginx `auth_request`, which turns
    /// a 302 into a 500: its recipe redirects by itself. Default false.
    pub redirect_navigations: Option<bool>,
    /// Name of the identity header with the subject. Default `X-Auth-Subject`.
    pub subject_header: Option<String>,
    /// Name of the identity header with the session id. Default `X-Auth-Session`.
    pub session_header: Option<String>,
    /// Name of the identity header with the rounded session risk. Default `X-Auth-Risk`.
    pub risk_header: Option<String>,
}

/// Validated `[forward_auth]`: header names are lower-case and legal.
#[derive(Debug, Clone)]
pub struct ForwardAuthSettings {
    pub cookie: Option<String>,
    pub reauth_url: Option<String>,
    pub login_url: Option<String>,
    pub redirect_navigations: bool,
    pub subject_header: String,
    pub session_header: String,
    pub risk_header: String,
}

impl Default for ForwardAuthSettings {
    fn default() -> Self {
        Self {
            cookie: None,
            reauth_url: None,
            login_url: None,
            redirect_navigations: false,
            subject_header: "x-auth-subject".into(),
            session_header: "x-auth-session".into(),
            risk_header: "x-auth-risk".into(),
        }
    }
}

fn resolve_forward_auth(f: ForwardAuthSection) -> Result<ForwardAuthSettings, ConfigError> {
    let defaults = ForwardAuthSettings::default();
    let header_name = |name: &str, value: Option<String>, default: String| match value {
        None => Ok(default),
        Some(v) => {
            let lower = v.to_ascii_lowercase();
            let legal = !lower.is_empty()
                && lower.len() <= 64
                && lower
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
            if legal {
                Ok(lower)
            } else {
                Err(invalid(
                    name,
                    format!("{v:?} is not a header name (letters, digits, '-', '_'; at most 64)"),
                ))
            }
        }
    };
    let url = |name: &str, value: Option<String>| match value {
        None => Ok(None),
        Some(v) => {
            let ok = (v.starts_with('/') && !v.starts_with("//") && !v.starts_with("/\\"))
                || v.starts_with("https://")
                || v.starts_with("http://");
            if ok && v.len() <= 2048 && v.bytes().all(|b| b.is_ascii_graphic()) {
                Ok(Some(v))
            } else {
                Err(invalid(
                    name,
                    format!("{v:?} must be an http(s) URL or a path starting with '/'"),
                ))
            }
        }
    };
    let cookie = match f.cookie {
        None => None,
        Some(c) => {
            // RFC 6265 cookie-name: an HTTP token.
            let legal = !c.is_empty()
                && c.len() <= 64
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !legal {
                return Err(invalid(
                    "forward_auth.cookie",
                    format!("{c:?} is not a cookie name"),
                ));
            }
            Some(c)
        }
    };
    let settings = ForwardAuthSettings {
        cookie,
        reauth_url: url("forward_auth.reauth_url", f.reauth_url)?,
        login_url: url("forward_auth.login_url", f.login_url)?,
        redirect_navigations: f.redirect_navigations.unwrap_or(false),
        subject_header: header_name(
            "forward_auth.subject_header",
            f.subject_header,
            defaults.subject_header,
        )?,
        session_header: header_name(
            "forward_auth.session_header",
            f.session_header,
            defaults.session_header,
        )?,
        risk_header: header_name(
            "forward_auth.risk_header",
            f.risk_header,
            defaults.risk_header,
        )?,
    };
    let names = [
        &settings.subject_header,
        &settings.session_header,
        &settings.risk_header,
    ];
    if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
        return Err(invalid(
            "forward_auth",
            "subject_header, session_header and risk_header must differ",
        ));
    }
    Ok(settings)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsSection {
    /// Events waiting to be written; beyond this they are dropped and counted. Default
    /// 50000: about a second at saturation on one core, so a checkpoint or a slow
    /// fsync does not cost events; under 1 KB each while they wait (the JSON line,
    /// 500–700 bytes, and the columns it is filtered by).
    pub queue: Option<usize>,
    /// How long events are kept. Default `30d`.
    pub retention: Option<String>,
}

#[derive(Debug, Clone)]
pub struct EventsSettings {
    pub queue: usize,
    pub retention: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Declares that several nodes share the database (refused on SQLite).
    pub enabled: Option<bool>,
    /// How often a node reads the change feed without a notification. Default `1s`.
    pub poll_interval: Option<String>,
    /// A node that has not read the feed for this long is stale. Default `30s`.
    pub max_lag: Option<String>,
    /// A stale node stops answering `allow` (503 instead). Default true.
    pub fail_closed: Option<bool>,
    /// Name of this node in `pg_stat_activity` and logs. Default `tokenwarden-<pid>`.
    pub node_name: Option<String>,
    /// How long changes stay in the feed. Default `24h`.
    pub change_retention: Option<String>,
}

#[derive(Debug, Clone)]
pub struct ClusterSettings {
    pub enabled: bool,
    pub poll_interval: Duration,
    pub max_lag: Duration,
    pub fail_closed: bool,
    pub node_name: String,
    pub change_retention: Duration,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppEntry {
    pub id: String,
    /// The raw key (prefer `key_sha256` in files).
    pub key: Option<String>,
    /// Hex SHA-256 of the key, as printed by `tokenwarden keys app`.
    pub key_sha256: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensSection {
    /// `iss` of minted tokens. Default `tokenwarden`.
    pub issuer: Option<String>,
    /// `aud` of minted tokens. Default `tokenwarden`.
    pub audience: Option<String>,
    /// Access token lifetime. Default `5m`.
    pub access_ttl: Option<String>,
    /// Refresh token lifetime (each rotation starts a new one). Default `30d`.
    pub refresh_ttl: Option<String>,
    /// How long the immediate predecessor of the current refresh token stays usable. Default `10s`.
    pub refresh_reuse_grace: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`. Default `30s`.
    pub leeway: Option<String>,
    /// `kid` of the signing key. Required when `keys` lists more than one signing key.
    pub signing_kid: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    pub kid: String,
    pub alg: KeyAlgorithm,
    /// PEM file (private key to sign, public key to verify only) or, for HS512, a file holding the secret.
    pub path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KeyAlgorithm {
    HS512,
    ES256,
    EdDSA,
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "HS512" => Ok(Self::HS512),
            "ES256" => Ok(Self::ES256),
            "EdDSA" => Ok(Self::EdDSA),
            other => Err(format!(
                "unsupported algorithm {other:?}: use HS512, ES256 or EdDSA"
            )),
        }
    }
}

impl fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::HS512 => "HS512",
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
        })
    }
}

/// An app allowed to call the session and verify APIs; only the key's hash is kept.
#[derive(Debug, Clone)]
pub struct AppCredential {
    /// Shared with every request the app makes, not copied into it.
    pub id: std::sync::Arc<str>,
    pub key_sha256: [u8; 32],
}

#[derive(Debug, Clone)]
pub struct TokenSettings {
    pub issuer: String,
    pub audience: String,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    pub refresh_reuse_grace: Duration,
    pub leeway: Duration,
    pub signing_kid: Option<String>,
}

/// Validated settings the application is built from.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database_url: String,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub data_dir: PathBuf,
    pub rules: Option<PathBuf>,
    pub geoip_city: Option<PathBuf>,
    pub geoip_asn: Option<PathBuf>,
    pub geoip_default_radius_km: f64,
    pub ip_prefix_v4: u8,
    pub ip_prefix_v6: u8,
    pub admin_token: Option<Secret>,
    pub trusted_proxies: Vec<IpNet>,
    pub log: String,
    pub metrics_open: bool,
    /// Empty means: development mode, a generated app key in `data_dir`.
    pub apps: Vec<AppCredential>,
    pub tokens: TokenSettings,
    /// Empty means: a generated EdDSA key in `data_dir`.
    pub keys: Vec<KeyEntry>,
    pub cluster: ClusterSettings,
    pub events: EventsSettings,
    pub forward_auth: ForwardAuthSettings,
    pub issuers: Vec<IssuerSettings>,
}

/// The environment variables we read, each overriding the file key of the same meaning.
pub const ENV_VARS: &[&str] = &[
    "TOKENWARDEN_CONFIG",
    "TOKENWARDEN_DATABASE_URL",
    "TOKENWARDEN_LISTEN",
    "TOKENWARDEN_ADMIN_LISTEN",
    "TOKENWARDEN_DATA_DIR",
    "TOKENWARDEN_RULES",
    "TOKENWARDEN_GEOIP_CITY",
    "TOKENWARDEN_GEOIP_ASN",
    "TOKENWARDEN_APP_KEYS",
    "TOKENWARDEN_ADMIN_TOKEN",
    "TOKENWARDEN_TRUSTED_PROXIES",
    "TOKENWARDEN_LOG",
];

/// Shortest raw app or admin key we accept.
const MIN_CREDENTIAL_LEN: usize = 32;

impl Settings {
    /// Reads the config file (if any) and applies the environment given as `(name, value)` pairs.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let parsed = match file {
            Some(path) => parse_file(path)?,
            None => FileConfig::default(),
        };
        let env: BTreeMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with("TOKENWARDEN_") && !k.starts_with("TOKENWARDEN_TEST_"))
            .collect();
        Self::resolve(parsed, &env)
    }

    /// Applies defaults and environment overrides, then validates.
    pub fn resolve(file: FileConfig, env: &BTreeMap<String, String>) -> Result<Self, ConfigError> {
        if let Some(unknown) = env.keys().find(|k| !ENV_VARS.contains(&k.as_str())) {
            return Err(invalid(
                unknown,
                format!(
                    "unknown environment variable; tokenwarden reads {}",
                    ENV_VARS.join(", ")
                ),
            ));
        }
        let var = |name: &str| env.get(name).filter(|v| !v.is_empty()).cloned();

        let data_dir = var("TOKENWARDEN_DATA_DIR")
            .map(PathBuf::from)
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from("data"));
        let database_url = var("TOKENWARDEN_DATABASE_URL")
            .or(file.database_url)
            .unwrap_or_else(|| format!("sqlite://{}", data_dir.join("tokenwarden.db").display()));
        if !(database_url.starts_with("sqlite:")
            || database_url.starts_with("postgres://")
            || database_url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "database_url",
                "must start with sqlite:// or postgres://",
            ));
        }
        if database_url.starts_with("sqlite:")
            && (database_url.contains(":memory:") || database_url.contains("mode=memory"))
        {
            return Err(invalid(
                "database_url",
                "an in-memory SQLite database forgets every revocation at restart: \
                 give a file (sqlite://data/tokenwarden.db)",
            ));
        }
        let listen = parse_addr("TOKENWARDEN_LISTEN", var("TOKENWARDEN_LISTEN"))?
            .or(file.listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080)));
        let admin_listen = parse_addr("TOKENWARDEN_ADMIN_LISTEN", var("TOKENWARDEN_ADMIN_LISTEN"))?
            .or(file.admin_listen)
            .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 9090)));
        if listen == admin_listen && listen.port() != 0 {
            return Err(invalid(
                "admin_listen",
                "must differ from listen: the admin API has its own listener",
            ));
        }

        let rules = var("TOKENWARDEN_RULES").map(PathBuf::from).or(file.rules);
        let geoip_city = var("TOKENWARDEN_GEOIP_CITY")
            .map(PathBuf::from)
            .or(file.geoip_city);
        let geoip_asn = var("TOKENWARDEN_GEOIP_ASN")
            .map(PathBuf::from)
            .or(file.geoip_asn);
        for (name, path) in [
            ("rules", &rules),
            ("geoip_city", &geoip_city),
            ("geoip_asn", &geoip_asn),
        ] {
            if let Some(p) = path
                && !p.is_file()
            {
                return Err(invalid(
                    name,
                    format!("{} is not a readable file", p.display()),
                ));
            }
        }

        let geoip_default_radius_km = file.geoip_default_radius_km.unwrap_or(50.0);
        if !(0.0..=20_000.0).contains(&geoip_default_radius_km) {
            return Err(invalid(
                "geoip_default_radius_km",
                "must be between 0 and 20000",
            ));
        }
        let ip_prefix_v4 = file.ip_prefix_v4.unwrap_or(24);
        let ip_prefix_v6 = file.ip_prefix_v6.unwrap_or(48);
        if !(8..=32).contains(&ip_prefix_v4) || !(16..=128).contains(&ip_prefix_v6) {
            return Err(invalid(
                "ip_prefix_v4/ip_prefix_v6",
                "must be 8 to 32 (IPv4) and 16 to 128 (IPv6)",
            ));
        }
        let admin_token = var("TOKENWARDEN_ADMIN_TOKEN")
            .or(file.admin_token)
            .map(|t| {
                if t.len() < MIN_CREDENTIAL_LEN {
                    Err(invalid(
                        "admin_token",
                        format!("must be at least {MIN_CREDENTIAL_LEN} characters; generate one with `openssl rand -base64 32`"),
                    ))
                } else {
                    Ok(Secret::new(t))
                }
            })
            .transpose()?;

        let trusted_proxies = match var("TOKENWARDEN_TRUSTED_PROXIES") {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| {
                    s.parse::<IpNet>()
                        .or_else(|_| s.parse::<std::net::IpAddr>().map(IpNet::from))
                        .map_err(|_| {
                            invalid(
                                "TOKENWARDEN_TRUSTED_PROXIES",
                                format!("{s:?} is not a CIDR such as 10.0.0.0/8"),
                            )
                        })
                })
                .collect::<Result<Vec<_>, _>>()?,
            None => file.trusted_proxies.unwrap_or_default(),
        };

        let log = var("TOKENWARDEN_LOG")
            .or(file.log)
            .unwrap_or_else(|| "info".to_owned());

        let apps = match var("TOKENWARDEN_APP_KEYS") {
            Some(list) => parse_app_keys_env(&list)?,
            None => file
                .apps
                .into_iter()
                .map(app_from_entry)
                .collect::<Result<Vec<_>, _>>()?,
        };
        let mut seen = std::collections::HashSet::new();
        for app in &apps {
            if !seen.insert(&*app.id) {
                return Err(invalid(
                    "apps",
                    format!("app id {:?} appears twice", app.id),
                ));
            }
        }

        let c = file.cluster;
        let cluster = ClusterSettings {
            enabled: c.enabled.unwrap_or(false),
            poll_interval: parse_duration(
                "cluster.poll_interval",
                c.poll_interval,
                Duration::from_secs(1),
            )?,
            max_lag: parse_duration("cluster.max_lag", c.max_lag, Duration::from_secs(30))?,
            fail_closed: c.fail_closed.unwrap_or(true),
            node_name: c
                .node_name
                .unwrap_or_else(|| format!("tokenwarden-{}", std::process::id())),
            change_retention: parse_duration(
                "cluster.change_retention",
                c.change_retention,
                Duration::from_secs(24 * 3600),
            )?,
        };
        if cluster.poll_interval.is_zero() || cluster.poll_interval > Duration::from_secs(60) {
            return Err(invalid(
                "cluster.poll_interval",
                "must be between 1ms and 60s",
            ));
        }
        if cluster.max_lag <= cluster.poll_interval {
            return Err(invalid(
                "cluster.max_lag",
                "must be longer than cluster.poll_interval",
            ));
        }
        if cluster.enabled && database_url.starts_with("sqlite:") {
            return Err(invalid(
                "cluster.enabled",
                "SQLite is single-node: several nodes need a shared PostgreSQL (database_url = \"postgres://…\")",
            ));
        }
        let events = EventsSettings {
            queue: file.events.queue.unwrap_or(50_000),
            retention: parse_duration(
                "events.retention",
                file.events.retention,
                Duration::from_secs(30 * 24 * 3600),
            )?,
        };
        if events.queue == 0 || events.queue > 10_000_000 {
            return Err(invalid("events.queue", "must be between 1 and 10000000"));
        }
        let tokens = resolve_tokens(file.tokens)?;
        let forward_auth = resolve_forward_auth(file.forward_auth)?;
        let issuers = resolve_issuers(file.issuers)?;
        if issuers.iter().any(|i| i.issuer == tokens.issuer) {
            return Err(invalid(
                "issuers",
                "an issuer may not share tokens.issuer: that is us",
            ));
        }
        let mut kids = std::collections::HashSet::new();
        for key in &file.keys {
            if key.kid.is_empty() || key.kid.len() > 64 {
                return Err(invalid("keys.kid", "must be 1 to 64 characters"));
            }
            if !kids.insert(key.kid.as_str()) {
                return Err(invalid("keys", format!("kid {:?} appears twice", key.kid)));
            }
        }
        if let Some(kid) = &tokens.signing_kid
            && !kids.contains(kid.as_str())
        {
            return Err(invalid(
                "tokens.signing_kid",
                format!("{kid:?} is not one of the configured keys"),
            ));
        }

        Ok(Self {
            database_url,
            listen,
            admin_listen,
            data_dir,
            rules,
            geoip_city,
            geoip_asn,
            geoip_default_radius_km,
            ip_prefix_v4,
            ip_prefix_v6,
            admin_token,
            trusted_proxies,
            log,
            metrics_open: file.metrics_open.unwrap_or(false),
            apps,
            tokens,
            keys: file.keys,
            cluster,
            events,
            forward_auth,
            issuers,
        })
    }
}

fn parse_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

fn parse_addr(name: &str, value: Option<String>) -> Result<Option<SocketAddr>, ConfigError> {
    value
        .map(|v| {
            v.parse::<SocketAddr>().map_err(|_| {
                invalid(
                    name,
                    format!("{v:?} is not an address such as 127.0.0.1:8080"),
                )
            })
        })
        .transpose()
}

fn parse_duration(
    name: &str,
    value: Option<String>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(v) => humantime::parse_duration(&v).map_err(|e| {
            invalid(
                name,
                format!("{v:?} is not a duration such as 5m or 10s: {e}"),
            )
        }),
    }
}

fn resolve_tokens(t: TokensSection) -> Result<TokenSettings, ConfigError> {
    let access_ttl = parse_duration("tokens.access_ttl", t.access_ttl, Duration::from_secs(300))?;
    let refresh_ttl = parse_duration(
        "tokens.refresh_ttl",
        t.refresh_ttl,
        Duration::from_secs(30 * 24 * 3600),
    )?;
    let refresh_reuse_grace = parse_duration(
        "tokens.refresh_reuse_grace",
        t.refresh_reuse_grace,
        Duration::from_secs(10),
    )?;
    let leeway = parse_duration("tokens.leeway", t.leeway, Duration::from_secs(30))?;
    if access_ttl < Duration::from_secs(10) || access_ttl > Duration::from_secs(24 * 3600) {
        return Err(invalid("tokens.access_ttl", "must be between 10s and 24h"));
    }
    if refresh_ttl < access_ttl {
        return Err(invalid(
            "tokens.refresh_ttl",
            "must not be shorter than access_ttl",
        ));
    }
    if refresh_reuse_grace > Duration::from_secs(120) {
        return Err(invalid(
            "tokens.refresh_reuse_grace",
            "must be at most 2m: a longer window lets a stolen refresh token be replayed",
        ));
    }
    if leeway > Duration::from_secs(300) {
        return Err(invalid("tokens.leeway", "must be at most 5m"));
    }
    let text = |name: &str, v: Option<String>| -> Result<String, ConfigError> {
        let v = v.unwrap_or_else(|| "tokenwarden".to_owned());
        if v.is_empty() || v.len() > 256 {
            return Err(invalid(name, "must be 1 to 256 characters"));
        }
        Ok(v)
    };
    Ok(TokenSettings {
        issuer: text("tokens.issuer", t.issuer)?,
        audience: text("tokens.audience", t.audience)?,
        access_ttl,
        refresh_ttl,
        refresh_reuse_grace,
        leeway,
        signing_kid: t.signing_kid,
    })
}

/// Hex-encoded SHA-256, used for app keys and refresh tokens at rest.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

pub fn to_hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn from_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn valid_app_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

fn app_from_entry(entry: AppEntry) -> Result<AppCredential, ConfigError> {
    if !valid_app_id(&entry.id) {
        return Err(invalid(
            "apps.id",
            format!(
                "{:?}: use 1 to 64 letters, digits, '-', '_' or '.'",
                entry.id
            ),
        ));
    }
    let key_sha256 = match (entry.key, entry.key_sha256) {
        (Some(key), None) => hash_raw_key(&entry.id, &key)?,
        (None, Some(hex)) => from_hex32(&hex.to_ascii_lowercase()).ok_or_else(|| {
            invalid(
                "apps.key_sha256",
                format!("app {:?}: expected 64 hex digits", entry.id),
            )
        })?,
        _ => {
            return Err(invalid(
                "apps",
                format!("app {:?}: set exactly one of key or key_sha256", entry.id),
            ));
        }
    };
    Ok(AppCredential {
        id: entry.id.into(),
        key_sha256,
    })
}

fn hash_raw_key(id: &str, key: &str) -> Result<[u8; 32], ConfigError> {
    if key.len() < MIN_CREDENTIAL_LEN {
        return Err(invalid(
            "apps.key",
            format!(
                "app {id:?}: a key must be at least {MIN_CREDENTIAL_LEN} characters; generate one with `openssl rand -base64 32`"
            ),
        ));
    }
    Ok(sha256(key.as_bytes()))
}

fn parse_app_keys_env(list: &str) -> Result<Vec<AppCredential>, ConfigError> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|pair| {
            let (id, key) = pair.split_once(':').ok_or_else(|| {
                invalid(
                    "TOKENWARDEN_APP_KEYS",
                    "expected comma-separated app_id:key pairs",
                )
            })?;
            app_from_entry(AppEntry {
                id: id.to_owned(),
                key: Some(key.to_owned()),
                key_sha256: None,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_config_at_all_gives_local_sqlite_and_default_listeners() {
        let s = Settings::resolve(FileConfig::default(), &BTreeMap::new()).unwrap();
        assert_eq!(s.database_url, "sqlite://data/tokenwarden.db");
        assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(s.admin_listen.to_string(), "127.0.0.1:9090");
        assert_eq!(s.tokens.access_ttl, Duration::from_secs(300));
        assert_eq!(s.tokens.refresh_reuse_grace, Duration::from_secs(10));
        assert!(s.apps.is_empty() && s.keys.is_empty());
    }

    #[test]
    fn unknown_file_keys_are_errors_naming_the_key() {
        let err =
            toml::from_str::<FileConfig>("listen = \"127.0.0.1:1\"\nlsten = 3\n").unwrap_err();
        assert!(err.to_string().contains("lsten"), "{err}");
        let err = toml::from_str::<FileConfig>("[tokens]\naccess_tl = \"5m\"\n").unwrap_err();
        assert!(err.to_string().contains("access_tl"), "{err}");
    }

    #[test]
    fn environment_overrides_the_file() {
        let file: FileConfig =
            toml::from_str("listen = \"127.0.0.1:1000\"\ndatabase_url = \"sqlite://a.db\"\n")
                .unwrap();
        let s = Settings::resolve(
            file,
            &env(&[
                ("TOKENWARDEN_LISTEN", "127.0.0.1:2000"),
                (
                    "TOKENWARDEN_DATABASE_URL",
                    "postgres://postgres@127.0.0.1/test",
                ),
                ("TOKENWARDEN_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.1"),
                (
                    "TOKENWARDEN_APP_KEYS",
                    "web:0123456789abcdef0123456789abcdef,api:abcdefghijabcdefghijabcdefghijabcd",
                ),
            ]),
        )
        .unwrap();
        assert_eq!(s.listen.port(), 2000);
        assert!(s.database_url.starts_with("postgres://"));
        assert_eq!(s.trusted_proxies.len(), 2);
        assert_eq!(s.apps.len(), 2);
        assert_eq!(
            s.apps[0].key_sha256,
            sha256(b"0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn misspelt_environment_variables_are_errors() {
        let err = Settings::resolve(
            FileConfig::default(),
            &env(&[("TOKENWARDEN_DATABSE_URL", "x")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("TOKENWARDEN_DATABSE_URL"), "{err}");
    }

    #[test]
    fn short_app_keys_and_bad_values_are_refused_with_a_hint() {
        let err = Settings::resolve(
            FileConfig::default(),
            &env(&[("TOKENWARDEN_APP_KEYS", "web:short")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("openssl rand"), "{err}");
        let err = Settings::resolve(
            FileConfig::default(),
            &env(&[("TOKENWARDEN_LISTEN", "8080")]),
        )
        .unwrap_err();
        assert!(err.to_string().contains("TOKENWARDEN_LISTEN"), "{err}");
        let file: FileConfig = toml::from_str("[tokens]\naccess_ttl = \"forever\"\n").unwrap();
        let err = Settings::resolve(file, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("tokens.access_ttl"), "{err}");
        let file: FileConfig = toml::from_str("[tokens]\nrefresh_reuse_grace = \"1h\"\n").unwrap();
        assert!(Settings::resolve(file, &BTreeMap::new()).is_err());
    }

    #[test]
    fn the_example_config_parses_with_every_key() {
        let file: FileConfig =
            toml::from_str(include_str!("../examples/tokenwarden.toml")).unwrap();
        assert_eq!(file.apps.len(), 1);
        assert_eq!(file.keys.len(), 2);
        assert_eq!(file.tokens.signing_kid.as_deref(), Some("2026-11"));
    }

    #[test]
    fn forward_auth_names_and_urls_are_checked() {
        let parse = |text: &str| {
            toml::from_str::<FileConfig>(text)
                .map_err(|e| e.to_string())
                .and_then(|f| Settings::resolve(f, &BTreeMap::new()).map_err(|e| e.to_string()))
        };
        let s = parse(
            "[forward_auth]\ncookie = \"tw_at\"\nreauth_url = \"/reauth\"\nsubject_header = \"X-User\"\n",
        )
        .unwrap();
        assert_eq!(s.forward_auth.cookie.as_deref(), Some("tw_at"));
        assert_eq!(s.forward_auth.subject_header, "x-user");
        assert_eq!(s.forward_auth.session_header, "x-auth-session");
        for bad in [
            "[forward_auth]\ncookie = \"a b\"\n",
            "[forward_auth]\nreauth_url = \"//evil.example/\"\n",
            "[forward_auth]\nlogin_url = \"javascript:alert(1)\"\n",
            "[forward_auth]\nrisk_header = \"X Risk\"\n",
            "[forward_auth]\nrisk_header = \"x-auth-subject\"\n",
            "[forward_auth]\ncolor = \"red\"\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn another_issuer_needs_https_keys_and_public_key_algorithms() {
        let parse = |extra: &str| {
            let text =
                format!("[[issuers]]\nissuer = \"https://idp\"\naudience = \"api\"\n{extra}");
            toml::from_str::<FileConfig>(&text)
                .map_err(|e| e.to_string())
                .and_then(|f| Settings::resolve(f, &BTreeMap::new()).map_err(|e| e.to_string()))
        };
        assert!(parse("jwks_url = \"https://idp/jwks.json\"\n").is_ok());
        assert!(parse("jwks_url = \"http://127.0.0.1:9000/jwks.json\"\n").is_ok());
        assert!(parse("jwks_file = \"jwks.json\"\n").is_ok());
        for bad in [
            "jwks_url = \"http://idp.example.com/jwks.json\"\n",
            "jwks_url = \"http://localhost.evil.example/jwks.json\"\n",
            "jwks_url = \"https://idp/jwks.json\"\njwks_file = \"jwks.json\"\n",
            "",
            "jwks_file = \"j\"\nalgorithms = [\"HS256\"]\n",
            "jwks_file = \"j\"\nalgorithms = [\"none\"]\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn an_in_memory_sqlite_database_is_refused() {
        for url in [
            "sqlite::memory:",
            "sqlite://file:tw?mode=memory&cache=shared",
        ] {
            let file: FileConfig = toml::from_str(&format!("database_url = \"{url}\"\n")).unwrap();
            let err = Settings::resolve(file, &BTreeMap::new()).unwrap_err();
            assert!(
                err.to_string().contains("forgets every revocation"),
                "{url}: {err}"
            );
        }
    }

    #[test]
    fn a_cluster_on_sqlite_is_refused_with_the_way_out() {
        let file: FileConfig = toml::from_str("[cluster]\nenabled = true\n").unwrap();
        let err = Settings::resolve(file, &BTreeMap::new()).unwrap_err();
        assert!(err.to_string().contains("PostgreSQL"), "{err}");
        let file: FileConfig =
            toml::from_str("database_url = \"postgres://x@h/db\"\n[cluster]\nenabled = true\n")
                .unwrap();
        assert!(
            Settings::resolve(file, &BTreeMap::new())
                .unwrap()
                .cluster
                .enabled
        );
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let s = Settings::resolve(
            FileConfig::default(),
            &env(&[(
                "TOKENWARDEN_ADMIN_TOKEN",
                "super-secret-admin-token-0123456789",
            )]),
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("super-secret"));
    }
}
