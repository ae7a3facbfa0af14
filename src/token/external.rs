//! Access tokens from other issuers (verifier-only mode): their public keys from a
//! JWKS file or URL, algorithms pinned per issuer (asymmetric only), and a token
//! mapped onto our claims so revocation and the rules treat it like our own.
//!
//! A JWKS URL is fetched at start, again when its copy is older than `cache_ttl`,
//! and when a token names a `kid` we do not have — never more often than
//! `min_refresh_interval`, so a flood of made-up `kid`s cannot hammer the issuer.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use serde::Deserialize;

use super::{AccessClaims, TokenError, map_error};
use crate::clock::SharedClock;
use crate::config::{IssuerSettings, JwksSource};

/// The largest JWKS document we read.
const MAX_JWKS_BYTES: usize = 256 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The claims we read from another issuer's token.
#[derive(Debug, Deserialize)]
struct ForeignClaims {
    iss: String,
    sub: String,
    exp: i64,
    #[serde(default)]
    iat: Option<i64>,
    #[serde(default)]
    nbf: Option<i64>,
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    auth_time: Option<i64>,
    #[serde(default)]
    acr: Option<String>,
    #[serde(default)]
    amr: Option<Vec<String>>,
}

struct Key {
    decoding: DecodingKey,
    /// The key's own `alg`, when the JWKS names one.
    alg: Option<Algorithm>,
    /// SHA-256 of the JWK as published: a key replaced under the same `kid` differs.
    material: [u8; 32],
}

#[derive(Default)]
struct KeySnapshot {
    by_kid: HashMap<String, Key>,
    /// When (ms, injected clock) these keys were read.
    fetched: Option<i64>,
}

/// One configured issuer and its current keys.
pub struct ExternalIssuer {
    settings: IssuerSettings,
    algorithms: Vec<Algorithm>,
    keys: ArcSwap<KeySnapshot>,
    /// When (ms) the JWKS was last asked for, successful or not: the refresh rate bound.
    last_attempt: Mutex<Option<i64>>,
    clock: SharedClock,
    /// Serialises fetches, so concurrent unknown `kid`s cause one request.
    fetching: tokio::sync::Mutex<()>,
    http: reqwest::Client,
    /// Shared by all issuers: bumped when a key is withdrawn or replaced.
    withdrawals: Arc<AtomicU64>,
}

impl std::fmt::Debug for ExternalIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExternalIssuer")
            .field("issuer", &self.settings.issuer)
            .field("kids", &self.keys.load().by_kid.len())
            .finish()
    }
}

/// Why a JWKS could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read {0}: {1}")]
    Read(String, std::io::Error),
    #[error("cannot fetch {0}: {1}")]
    Fetch(String, String),
    #[error("{0} is not a JWKS: {1}")]
    Parse(String, String),
}

fn parse_jwks(text: &[u8], from: &str) -> Result<HashMap<String, Key>, JwksError> {
    let set: JwkSet =
        serde_json::from_slice(text).map_err(|e| JwksError::Parse(from.into(), e.to_string()))?;
    let mut by_kid = HashMap::new();
    for jwk in &set.keys {
        let Some(kid) = jwk.common.key_id.clone() else {
            continue;
        };
        // Public keys only: a shared secret published as `oct` is nobody's signature.
        if matches!(
            jwk.algorithm,
            AlgorithmParameters::OctetKey(_) | AlgorithmParameters::Other(_)
        ) {
            tracing::warn!(kid, from, "ignoring a JWKS key that is not a public key");
            continue;
        }
        let alg = jwk
            .common
            .key_algorithm
            .and_then(|a| Algorithm::try_from(a).ok());
        match DecodingKey::from_jwk(jwk) {
            Ok(decoding) => {
                let material = crate::config::sha256(&serde_json::to_vec(jwk).unwrap_or_default());
                by_kid.insert(
                    kid,
                    Key {
                        decoding,
                        alg,
                        material,
                    },
                );
            }
            Err(e) => tracing::warn!(kid, from, error = %e, "ignoring an unreadable JWKS key"),
        }
    }
    Ok(by_kid)
}

impl ExternalIssuer {
    fn new(
        settings: IssuerSettings,
        http: reqwest::Client,
        clock: SharedClock,
        withdrawals: Arc<AtomicU64>,
    ) -> Self {
        let algorithms = settings
            .algorithms
            .iter()
            .filter_map(|a| a.parse::<Algorithm>().ok())
            .collect();
        Self {
            settings,
            algorithms,
            keys: ArcSwap::from_pointee(KeySnapshot::default()),
            last_attempt: Mutex::new(None),
            clock,
            fetching: tokio::sync::Mutex::new(()),
            http,
            withdrawals,
        }
    }

    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    pub fn kid_count(&self) -> usize {
        self.keys.load().by_kid.len()
    }

    /// Reads the JWKS file or fetches the URL now, whatever the rate bound.
    pub async fn load(&self) -> Result<usize, JwksError> {
        if let Ok(mut last) = self.last_attempt.lock() {
            *last = Some(self.clock.now_millis());
        }
        let (bytes, from) = match &self.settings.jwks {
            JwksSource::File(path) => (
                tokio::fs::read(path)
                    .await
                    .map_err(|e| JwksError::Read(path.display().to_string(), e))?,
                path.display().to_string(),
            ),
            JwksSource::Url(url) => (self.fetch(url).await?, url.clone()),
        };
        let by_kid = parse_jwks(&bytes, &from)?;
        let n = by_kid.len();
        let withdrawn = self.keys.load().by_kid.iter().any(|(kid, old)| {
            by_kid
                .get(kid)
                .is_none_or(|new| new.material != old.material)
        });
        self.keys.store(Arc::new(KeySnapshot {
            by_kid,
            fetched: Some(self.clock.now_millis()),
        }));
        if withdrawn {
            // After the swap: whoever reads the new count also sees the new keys.
            self.withdrawals.fetch_add(1, Ordering::AcqRel);
            tracing::info!(issuer = %self.settings.issuer, "issuer keys withdrawn or replaced");
        }
        tracing::info!(issuer = %self.settings.issuer, keys = n, from, "issuer keys loaded");
        Ok(n)
    }

    async fn fetch(&self, url: &str) -> Result<Vec<u8>, JwksError> {
        let fail = |e: String| JwksError::Fetch(url.to_owned(), e);
        let mut r = self
            .http
            .get(url)
            .timeout(FETCH_TIMEOUT)
            .send()
            .await
            .map_err(|e| fail(e.to_string()))?;
        if !r.status().is_success() {
            return Err(fail(format!("HTTP {}", r.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = r.chunk().await.map_err(|e| fail(e.to_string()))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_JWKS_BYTES {
                return Err(fail(format!("larger than {MAX_JWKS_BYTES} bytes")));
            }
        }
        Ok(body)
    }

    /// Fetches the keys again if the URL source allows it now (rate-bounded).
    /// `true` when new keys were loaded.
    pub async fn refresh(&self) -> bool {
        if !matches!(self.settings.jwks, JwksSource::Url(_)) {
            return false;
        }
        let _one = self.fetching.lock().await;
        let now = self.clock.now_millis();
        let allowed = self.last_attempt.lock().is_ok_and(|last| {
            last.is_none_or(|t| now - t >= millis(self.settings.min_refresh_interval))
        });
        if !allowed {
            return false;
        }
        match self.load().await {
            Ok(_) => true,
            Err(e) => {
                tracing::warn!(error = %e, "issuer keys could not be refreshed");
                false
            }
        }
    }

    /// The cached copy is older than `cache_ttl`.
    pub fn stale(&self) -> bool {
        matches!(self.settings.jwks, JwksSource::Url(_))
            && self
                .keys
                .load()
                .fetched
                .is_none_or(|t| self.clock.now_millis() - t >= millis(self.settings.cache_ttl))
    }

    /// Signature (algorithm pinned), issuer, audience and claims; the caller checks times.
    fn verify(&self, token: &str, header: &Header) -> Result<AccessClaims, TokenError> {
        if !self.algorithms.contains(&header.alg) {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        let kid = header.kid.as_deref().ok_or(TokenError::UnknownKey)?;
        let keys = self.keys.load();
        let key = keys.by_kid.get(kid).ok_or(TokenError::UnknownKey)?;
        if key.alg.is_some_and(|a| a != header.alg) {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        let mut v = Validation::new(header.alg);
        v.set_issuer(&[&self.settings.issuer]);
        v.set_audience(&[&self.settings.audience]);
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        v.validate_exp = false;
        v.validate_nbf = false;
        v.leeway = 0;
        let c = jsonwebtoken::decode::<ForeignClaims>(token, &key.decoding, &v)
            .map_err(|e| map_error(e.into_kind()))?
            .claims;
        if c.sub.is_empty() {
            return Err(TokenError::MissingClaim("sub".into()));
        }
        // The subject becomes a header value and a path segment: the same rules as ours.
        if c.sub.len() > 256 || c.sub.chars().any(char::is_control) {
            return Err(TokenError::MalformedClaims(
                "sub must be at most 256 bytes of printable characters".into(),
            ));
        }
        let jti = match c.jti.filter(|j| !j.is_empty()) {
            Some(j) => j,
            // No jti: the token itself is its identity.
            None => format!(
                "sha256:{}",
                &crate::config::to_hex(&crate::config::sha256(token.as_bytes()))[..32]
            ),
        };
        // The issuer's session, as of its last authentication: a user who re-authenticates
        // there (new auth_time, often the same sid) starts a new, freshly bound session
        // here, while a thief's older copy stays on the old one.
        let session_key = match (c.sid.filter(|s| !s.is_empty()), c.auth_time) {
            (Some(sid), Some(at)) => format!("{sid}\0{at}"),
            (Some(sid), None) => sid,
            (None, _) => jti.clone(),
        };
        if jti.len() > 256 || session_key.len() > 256 || c.sub.len() > 256 {
            return Err(TokenError::MalformedClaims(
                "sub, jti and sid must be at most 256 bytes".into(),
            ));
        }
        Ok(AccessClaims {
            sid: session_id(&c.iss, &session_key),
            iss: c.iss,
            aud: self.settings.audience.clone(),
            sub: c.sub,
            jti,
            iat: c.iat.unwrap_or(0),
            nbf: c.nbf,
            exp: c.exp,
            auth_time: c.auth_time.or(c.iat).unwrap_or(0),
            bnd: String::new(),
            // Checked against the session's record once it is loaded.
            generation: i64::MAX,
            epoch: 0,
            acr: c.acr,
            amr: c.amr,
            extra: serde_json::Map::new(),
            foreign: true,
            cleared: Default::default(),
        })
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Our session id for another issuer's session (its `sid`, else the token's `jti`):
/// the same on every node, so the first sighting anywhere creates one record.
pub fn session_id(issuer: &str, key: &str) -> String {
    let digest = crate::config::sha256(format!("{issuer}\0{key}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes)
        .into_uuid()
        .to_string()
}

/// Every configured issuer.
#[derive(Debug, Default)]
pub struct ExternalIssuers {
    list: Vec<ExternalIssuer>,
    withdrawals: Arc<AtomicU64>,
}

impl ExternalIssuers {
    /// Loads every issuer's keys. A JWKS file must read; an unreachable JWKS URL is
    /// logged and fetched again on the first token that needs it.
    pub async fn load(settings: &[IssuerSettings], clock: SharedClock) -> Result<Self, JwksError> {
        let http = reqwest::Client::builder()
            .timeout(FETCH_TIMEOUT)
            // A redirect could lead a fetch off https: keys come from the configured URL only.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| JwksError::Fetch("(client)".into(), e.to_string()))?;
        let mut list = Vec::new();
        let withdrawals = Arc::new(AtomicU64::new(0));
        for s in settings {
            let issuer = ExternalIssuer::new(
                s.clone(),
                http.clone(),
                clock.clone(),
                Arc::clone(&withdrawals),
            );
            match (&s.jwks, issuer.load().await) {
                (_, Ok(_)) => {}
                (JwksSource::File(_), Err(e)) => return Err(e),
                (JwksSource::Url(_), Err(e)) => {
                    tracing::warn!(issuer = %s.issuer, error = %e, "issuer keys not loaded yet")
                }
            }
            list.push(issuer);
        }
        Ok(Self { list, withdrawals })
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// How many times an issuer withdrew or replaced a key: a token verified under
    /// an earlier count may have been signed by a key no longer published.
    pub fn withdrawals(&self) -> u64 {
        self.withdrawals.load(Ordering::Acquire)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ExternalIssuer> {
        self.list.iter()
    }

    /// The issuer a token claims to come from (read before any check: it only picks
    /// which keys to try).
    pub fn claimed_by(&self, token: &str) -> Option<&ExternalIssuer> {
        if self.list.is_empty() {
            return None;
        }
        #[derive(Deserialize)]
        struct Iss {
            iss: String,
        }
        let payload = token.split('.').nth(1)?;
        let raw = URL_SAFE_NO_PAD.decode(payload).ok()?;
        let iss: Iss = serde_json::from_slice(&raw).ok()?;
        self.list.iter().find(|i| i.settings.issuer == iss.iss)
    }

    pub(super) fn verify(
        &self,
        token: &str,
        header: &Header,
    ) -> Option<Result<AccessClaims, TokenError>> {
        self.claimed_by(token).map(|i| i.verify(token, header))
    }
}
