//! Access tokens: the claims we mint, and verification that pins the algorithm to
//! the key named by `kid`. This is the only module that touches jsonwebtoken.
//! Time checks (`exp`, `nbf`, `iat`) use the injected clock, not the library's.
//!
//! jsonwebtoken mints our tokens and verifies other issuers'. Our own tokens are
//! verified here, on the path of every never-seen token: the compact JWS is split
//! once, its header read once, the signature checked with a key prepared when it
//! was loaded (aws-lc-rs, the library's own backend: an HMAC key schedule, a
//! decoded public point) and the claims parsed once, only under a valid signature.
//! The library's `decode` read the header three times, built the key for every
//! token and parsed the claims twice: 6.4 µs against 3.4 µs for an HS512 token.

mod external;
mod keys;

use std::borrow::Cow;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Header};
use serde::{Deserialize, Serialize};

pub use external::{ExternalIssuer, ExternalIssuers, JwksError, session_id as external_session_id};
pub use keys::{KeyError, KeySet, check_secret_strength, generate, random_bytes, write_private};

use crate::clock::UnixSeconds;
use crate::config::TokenSettings;

/// Memory for verified tokens, by weighed size: bounded whatever the claims.
const VERIFIED_CACHE_BYTES: u64 = 64 * 1024 * 1024;
/// Longer than any access token lives here; tokens are re-verified after it (on
/// the injected clock).
const VERIFIED_CACHE_TTL_SECS: UnixSeconds = 15 * 60;
/// Tokens remembered as refused for their signature (a digest and a count each).
const REFUSED_CACHE_ITEMS: usize = 16_384;
/// About how many tokens fit in [`VERIFIED_CACHE_BYTES`] (the cache sizes its
/// table from it; the weight is the bound).
const VERIFIED_CACHE_ITEMS: usize = 65_536;

/// Tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// RFC 9068 media type of access tokens.
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// The claims of an access token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub jti: String,
    pub sid: String,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub exp: i64,
    pub auth_time: i64,
    /// Digest of the client the session is bound to (IP and user agent at issue).
    pub bnd: String,
    /// The user's generation at issue: "log out everywhere" raises it.
    #[serde(default, rename = "gen")]
    pub generation: i64,
    /// The session's epoch at issue: re-authentication raises it.
    #[serde(default, rename = "sep")]
    pub epoch: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amr: Option<Vec<String>>,
    /// The app's own claims, copied from the session.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Issued by another issuer (verifier-only mode): `sid` is our id for its
    /// session, `generation` is checked against the session's record, not the token.
    #[serde(skip)]
    pub foreign: bool,
    /// When the revocation view last found this token clear (see
    /// [`crate::revocation::Cleared`]).
    #[serde(skip)]
    pub cleared: crate::revocation::Cleared,
}

/// Claim names the app may not set through `claims`.
pub const RESERVED_CLAIMS: &[&str] = &[
    "iss",
    "aud",
    "sub",
    "jti",
    "sid",
    "iat",
    "nbf",
    "exp",
    "auth_time",
    "bnd",
    "gen",
    "sep",
    "acr",
    "amr",
    "typ",
    "cnf",
    "scope",
    "client_id",
];

/// Why a token is not accepted. `code()` is stable and appears in answers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's claims are malformed: {0}")]
    MalformedClaims(String),
    #[error("the token is not an access token (typ must be at+jwt)")]
    WrongType,
    #[error("the token names no key (kid) or an unknown one")]
    UnknownKey,
    #[error("the token's algorithm is not the one pinned to its key")]
    AlgorithmNotAllowed,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued by someone else")]
    WrongIssuer,
    #[error("the token is meant for another audience")]
    WrongAudience,
    #[error("the token lacks the required claim {0}")]
    MissingClaim(String),
    #[error("the token could not be signed")]
    Signing,
}

impl TokenError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge => "token_too_large",
            Self::Malformed => "malformed",
            Self::MalformedClaims(_) => "malformed_claims",
            Self::WrongType => "wrong_type",
            Self::UnknownKey => "unknown_kid",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::MissingClaim(_) => "missing_claim",
            Self::Signing => "signing_failed",
        }
    }
}

/// Mints and verifies access tokens with one key set and one policy.
pub struct TokenCodec {
    keys: KeySet,
    /// Tokens whose signature and claims already verified, by SHA-256 of the whole
    /// token: a token seen again skips the signature work. Times are still checked on
    /// every use (and revocation and rules run after this, as always).
    verified: quick_cache::sync::Cache<[u8; 32], Verified, ByWeight>,
    /// Tokens whose signature did not verify, by SHA-256 of the whole token, with the
    /// count of key withdrawals they were refused under: a client (or a gateway's
    /// retries) presenting the same tampered token again is refused without the
    /// signature work. Apart from `verified`, so refusals never evict verified tokens.
    refused: quick_cache::sync::Cache<[u8; 32], u64>,
    /// Other issuers whose tokens we verify.
    external: Arc<ExternalIssuers>,
    issuer: String,
    audience: String,
    leeway: i64,
}

impl std::fmt::Debug for TokenCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCodec")
            .field("keys", &self.keys)
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl TokenCodec {
    pub fn new(keys: KeySet, settings: &TokenSettings) -> Self {
        Self {
            keys,
            verified: quick_cache::sync::Cache::with_weighter(
                VERIFIED_CACHE_ITEMS,
                VERIFIED_CACHE_BYTES,
                ByWeight,
            ),
            refused: quick_cache::sync::Cache::new(REFUSED_CACHE_ITEMS),
            external: Arc::new(ExternalIssuers::default()),
            issuer: settings.issuer.clone(),
            audience: settings.audience.clone(),
            leeway: i64::try_from(settings.leeway.as_secs()).unwrap_or(i64::MAX),
        }
    }

    /// Also verifies the tokens of these issuers.
    pub fn with_external(mut self, external: Arc<ExternalIssuers>) -> Self {
        self.external = external;
        self
    }

    pub fn external(&self) -> &Arc<ExternalIssuers> {
        &self.external
    }

    pub fn keys(&self) -> &KeySet {
        &self.keys
    }
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
    pub fn audience(&self) -> &str {
        &self.audience
    }
    pub fn leeway(&self) -> i64 {
        self.leeway
    }

    /// Signs the claims with the active key.
    pub fn mint(&self, claims: &AccessClaims) -> Result<String, TokenError> {
        let signing = &self.keys.signing;
        let mut header = Header::new(signing.alg);
        header.typ = Some(ACCESS_TOKEN_TYP.to_owned());
        header.kid = Some(signing.kid.clone());
        jsonwebtoken::encode(&header, claims, &signing.encoding).map_err(|_| TokenError::Signing)
    }

    /// Checks size, header, signature (with the algorithm pinned to the `kid`), issuer,
    /// audience, required claims and times. Revocation is the caller's next step.
    /// The claims come shared: a token seen before is answered from the cache
    /// without copying them.
    pub fn verify(&self, token: &str, now: UnixSeconds) -> Result<Arc<AccessClaims>, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge);
        }
        let digest = crate::config::sha256(token.as_bytes());
        // Read before any key is: a key withdrawn from here on makes this entry stale.
        let withdrawals = self.external.withdrawals();
        if let Some(hit) = self.verified.get(&digest)
            && hit.withdrawals == withdrawals
            && (hit.at..hit.at.saturating_add(VERIFIED_CACHE_TTL_SECS)).contains(&now)
        {
            self.check_times(&hit.claims, now)?;
            return Ok(Arc::clone(&hit.claims));
        }
        if self.refused.get(&digest) == Some(withdrawals) {
            return Err(TokenError::BadSignature);
        }
        let refused = |e: TokenError| {
            if e == TokenError::BadSignature {
                self.refused.insert(digest, withdrawals);
            }
            e
        };
        let Some(parts) = Compact::split(token) else {
            return Err(TokenError::Malformed);
        };
        let header_json = URL_SAFE_NO_PAD
            .decode(parts.header)
            .map_err(|_| classify_bad_header(token))?;
        let header = serde_json::from_slice::<JoseHeader<'_>>(&header_json)
            .map_err(|_| classify_bad_header(token))?;
        let Some(key) = header.kid.as_deref().and_then(|k| self.keys.verify.get(k)) else {
            // Another issuer's token, or a kid nobody knows: read with the library's
            // whole header, as other issuers' keys are checked by the library.
            let header =
                jsonwebtoken::decode_header(token).map_err(|_| classify_bad_header(token))?;
            let claims = self
                .external
                .verify(token, &header)
                .unwrap_or(Err(TokenError::UnknownKey))
                .map_err(refused)?;
            // Remembered before its times are checked: an expired token presented
            // again is refused without the signature work too.
            let claims = self.remember(digest, claims, token.len(), (now, withdrawals));
            self.check_times(&claims, now)?;
            return Ok(claims);
        };
        if !header.typ.as_deref().is_some_and(|t| {
            t.eq_ignore_ascii_case(ACCESS_TOKEN_TYP) || t.eq_ignore_ascii_case("application/at+jwt")
        }) {
            return Err(TokenError::WrongType);
        }
        if header.alg != key.alg {
            return Err(TokenError::AlgorithmNotAllowed);
        }
        if header.crit {
            // No header extension is understood here, so none may be critical
            // (RFC 7515 section 4.1.11); we never mint one.
            return Err(TokenError::Malformed);
        }
        let signature = URL_SAFE_NO_PAD
            .decode(parts.signature)
            .map_err(|_| TokenError::Malformed)?;
        if !key.check.verifies(parts.signed.as_bytes(), &signature) {
            return Err(refused(TokenError::BadSignature));
        }
        // Only a payload under a valid signature is parsed, and only once.
        let payload = URL_SAFE_NO_PAD
            .decode(parts.payload)
            .map_err(|_| TokenError::Malformed)?;
        let claims =
            serde_json::from_slice::<AccessClaims>(&payload).map_err(|e| claims_error(&e))?;
        if claims.iss != self.issuer {
            return Err(TokenError::WrongIssuer);
        }
        if claims.aud != self.audience {
            return Err(TokenError::WrongAudience);
        }
        let missing = [
            ("jti", &claims.jti),
            ("sid", &claims.sid),
            ("sub", &claims.sub),
        ]
        .into_iter()
        .find_map(|(name, value)| value.is_empty().then_some(name));
        if let Err(e) = self.check_times(&claims, now) {
            // Remembered though refused for its times, as above.
            if missing.is_none() {
                self.remember(digest, claims, token.len(), (now, withdrawals));
            }
            return Err(e);
        }
        if let Some(name) = missing {
            return Err(TokenError::MissingClaim(name.to_owned()));
        }
        Ok(self.remember(digest, claims, token.len(), (now, withdrawals)))
    }

    /// Remembers a verified token, with when it was verified and the count of key
    /// withdrawals read before verifying it.
    fn remember(
        &self,
        digest: [u8; 32],
        claims: AccessClaims,
        token_len: usize,
        (now, withdrawals): (UnixSeconds, u64),
    ) -> Arc<AccessClaims> {
        let claims = Arc::new(claims);
        // Weighed by the token's length, which bounds the claims' size.
        let weight = u32::try_from(token_len.saturating_mul(2) + 256).unwrap_or(u32::MAX);
        self.verified.insert(
            digest,
            Verified {
                claims: Arc::clone(&claims),
                weight,
                at: now,
                withdrawals,
            },
        );
        claims
    }
}

/// A token whose signature and claims verified at `at`, when `withdrawals` keys
/// had been withdrawn.
#[derive(Clone)]
struct Verified {
    claims: Arc<AccessClaims>,
    weight: u32,
    at: UnixSeconds,
    withdrawals: u64,
}

#[derive(Clone)]
struct ByWeight;

impl quick_cache::Weighter<[u8; 32], Verified> for ByWeight {
    fn weight(&self, _: &[u8; 32], entry: &Verified) -> u64 {
        u64::from(entry.weight)
    }
}

impl TokenCodec {
    /// `exp`, `nbf` and `iat` against the injected clock, with the leeway.
    fn check_times(&self, claims: &AccessClaims, now: UnixSeconds) -> Result<(), TokenError> {
        if now > claims.exp.saturating_add(self.leeway) {
            return Err(TokenError::Expired);
        }
        if claims
            .nbf
            .is_some_and(|nbf| nbf > now.saturating_add(self.leeway))
            || claims.iat > now.saturating_add(self.leeway)
        {
            return Err(TokenError::NotYetValid);
        }
        Ok(())
    }
}

fn map_error(kind: ErrorKind) -> TokenError {
    match kind {
        ErrorKind::InvalidSignature => TokenError::BadSignature,
        ErrorKind::InvalidAlgorithm
        | ErrorKind::InvalidAlgorithmName
        | ErrorKind::UnsupportedAlgorithm
        | ErrorKind::InvalidKeyFormat
        | ErrorKind::InvalidEcdsaKey
        | ErrorKind::InvalidEddsaKey => TokenError::AlgorithmNotAllowed,
        ErrorKind::ExpiredSignature => TokenError::Expired,
        ErrorKind::ImmatureSignature => TokenError::NotYetValid,
        ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
        ErrorKind::InvalidAudience => TokenError::WrongAudience,
        ErrorKind::MissingRequiredClaim(c) => TokenError::MissingClaim(c),
        ErrorKind::InvalidClaimFormat(c) => TokenError::MalformedClaims(c),
        ErrorKind::Json(e) => claims_error(&e),
        _ => TokenError::Malformed,
    }
}

/// Claims that do not read as [`AccessClaims`] (or another issuer's claims).
fn claims_error(e: &serde_json::Error) -> TokenError {
    let msg = e.to_string();
    match msg.split('`').nth(1) {
        Some(field) if msg.starts_with("missing field") => {
            TokenError::MissingClaim(field.to_owned())
        }
        _ => TokenError::MalformedClaims(msg),
    }
}

/// A compact JWS split at its two dots: `header.payload.signature`, each part
/// base64url without padding. Anything else is not a JWS.
struct Compact<'a> {
    header: &'a str,
    payload: &'a str,
    signature: &'a str,
    /// `header.payload`: what the signature covers.
    signed: &'a str,
}

impl<'a> Compact<'a> {
    fn split(token: &'a str) -> Option<Self> {
        let (signed, signature) = token.rsplit_once('.')?;
        let (header, payload) = signed.split_once('.')?;
        if payload.contains('.') {
            return None;
        }
        Some(Self {
            header,
            payload,
            signature,
            signed,
        })
    }
}

/// The JOSE header fields read before the signature is checked: `alg` (one of the
/// library's algorithm names: `none` does not read), `kid` and `typ`. Other fields
/// are ignored, except `crit`, which is refused. A field given twice does not read.
#[derive(Deserialize)]
struct JoseHeader<'a> {
    alg: Algorithm,
    #[serde(borrow, default)]
    kid: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    typ: Option<Cow<'a, str>>,
    /// Present at all, `null` included.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

/// Called only for a field that is there: whatever its value, it is present.
fn present<'de, D: serde::Deserializer<'de>>(field: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(field).map(|_| true)
}

/// A header that does not read: say plainly when it asks for `alg: none`
/// (or any algorithm we never accept) rather than "malformed".
fn classify_bad_header(token: &str) -> TokenError {
    let Some(first) = token.split('.').next() else {
        return TokenError::Malformed;
    };
    let alg = URL_SAFE_NO_PAD
        .decode(first.trim_end_matches('='))
        .ok()
        .and_then(|raw| serde_json::from_slice::<serde_json::Value>(&raw).ok())
        .and_then(|h| h.get("alg").and_then(|a| a.as_str()).map(str::to_owned));
    match alg {
        // A header that fails for another reason names a known algorithm.
        Some(alg) if alg.parse::<Algorithm>().is_err() => TokenError::AlgorithmNotAllowed,
        _ => TokenError::Malformed,
    }
}

/// A base64url digest (128 bits) of the binding a session carries: the canonical
/// text of its enriched client (IP, prefix, ASN, country, coordinates, user-agent
/// fingerprint). In the token it makes the binding tamper-evident.
pub fn binding_digest(canonical: &str) -> String {
    let digest = crate::config::sha256(canonical.as_bytes());
    URL_SAFE_NO_PAD.encode(&digest[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> (tempfile::TempDir, TokenCodec) {
        let dir = tempfile::tempdir().unwrap();
        let (keys, _) = KeySet::load_or_create_dev(dir.path()).unwrap();
        let settings = crate::config::Settings::resolve(
            crate::config::FileConfig::default(),
            &Default::default(),
        )
        .unwrap();
        let codec = TokenCodec::new(keys, &settings.tokens);
        (dir, codec)
    }

    /// A codec whose one key is a new key of `alg`.
    fn codec_with(alg: crate::config::KeyAlgorithm) -> (tempfile::TempDir, TokenCodec) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, keys::generate(alg).unwrap()).unwrap();
        let entry = crate::config::KeyEntry {
            kid: format!("k-{alg}"),
            alg,
            path,
        };
        let keys = KeySet::load(&[entry], None).unwrap();
        let settings = crate::config::Settings::resolve(
            crate::config::FileConfig::default(),
            &Default::default(),
        )
        .unwrap();
        (dir, TokenCodec::new(keys, &settings.tokens))
    }

    fn claims(codec: &TokenCodec, at: UnixSeconds) -> AccessClaims {
        AccessClaims {
            iss: codec.issuer().into(),
            aud: codec.audience().into(),
            sub: "alice".into(),
            jti: "j".into(),
            sid: "s".into(),
            iat: at,
            nbf: None,
            exp: at + 86_400,
            auth_time: at,
            bnd: "b".into(),
            generation: 0,
            epoch: 0,
            acr: None,
            amr: None,
            extra: Default::default(),
            foreign: false,
            cleared: Default::default(),
        }
    }

    /// A token with exactly this header and payload JSON, signed with the codec's key.
    fn signed(codec: &TokenCodec, header: &str, payload: &str) -> String {
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signing = &codec.keys.signing;
        let signature =
            jsonwebtoken::crypto::sign(signed.as_bytes(), &signing.encoding, signing.alg).unwrap();
        format!("{signed}.{signature}")
    }

    fn header(codec: &TokenCodec) -> String {
        format!(
            r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{}"}}"#,
            codec.keys.signing_kid()
        )
    }

    #[test]
    fn claims_read_back_as_they_were_minted_with_the_apps_own_beside_them() {
        let (_dir, codec) = codec();
        let at = 1_800_000_000;
        let mut minted = claims(&codec, at);
        minted.nbf = Some(at);
        minted.generation = 3;
        minted.epoch = 2;
        minted.acr = Some("urn:mfa".into());
        minted.amr = Some(vec!["pwd".into(), "otp".into()]);
        minted
            .extra
            .insert("tenant".into(), serde_json::json!({"id": 7}));
        let token = codec.mint(&minted).unwrap();
        assert_eq!(codec.verify(&token, at), Ok(Arc::new(minted)));

        // A claim name written with escapes is the same claim; absent optional
        // claims take their defaults.
        let payload = format!(
            r#"{{"iss":"{}","aud":"{}","\u0073ub":"bob","jti":"j2","sid":"s","iat":{at},"exp":{},"auth_time":{at},"bnd":"b"}}"#,
            codec.issuer(),
            codec.audience(),
            at + 60
        );
        let read = codec
            .verify(&signed(&codec, &header(&codec), &payload), at)
            .unwrap();
        assert_eq!(
            (read.sub.as_str(), read.generation, read.nbf),
            ("bob", 0, None)
        );
    }

    #[test]
    fn a_registered_claim_given_twice_or_missing_is_refused_under_a_valid_signature() {
        let (_dir, codec) = codec();
        let at = 1_800_000_000;
        let body = |extra: &str| {
            format!(
                r#"{{"iss":"{}","aud":"{}","jti":"j","sid":"s","iat":{at},"exp":{},"auth_time":{at},"bnd":"b"{extra}}}"#,
                codec.issuer(),
                codec.audience(),
                at + 60
            )
        };
        let verify = |payload: &str| codec.verify(&signed(&codec, &header(&codec), payload), at);
        assert!(verify(&body(r#","sub":"alice""#)).is_ok());
        assert!(
            matches!(
                verify(&body(r#","sub":"alice","sub":"mallory""#)),
                Err(TokenError::MalformedClaims(m)) if m.contains("duplicate field `sub`")
            ),
            "a registered claim twice"
        );
        assert_eq!(
            verify(&body("")),
            Err(TokenError::MissingClaim("sub".into()))
        );
        assert!(matches!(
            verify(&body(r#","sub":7"#)),
            Err(TokenError::MalformedClaims(_))
        ));
    }

    #[test]
    fn only_a_compact_jws_with_a_known_header_is_read() {
        let (_dir, codec) = codec();
        let at = 1_800_000_000;
        let token = codec.mint(&claims(&codec, at)).unwrap();
        let payload = serde_json::to_string(&claims(&codec, at)).unwrap();
        let kid = codec.keys.signing_kid();

        assert_eq!(
            codec.verify(&format!("{token}.x"), at),
            Err(TokenError::Malformed)
        );
        assert_eq!(
            codec.verify(&format!("{token}="), at),
            Err(TokenError::Malformed)
        );
        let critical =
            format!(r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}","crit":["b64"],"b64":false}}"#);
        assert_eq!(
            codec.verify(&signed(&codec, &critical, &payload), at),
            Err(TokenError::Malformed),
            "a critical extension we do not understand"
        );
        let null = format!(r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}","crit":null}}"#);
        assert_eq!(
            codec.verify(&signed(&codec, &null, &payload), at),
            Err(TokenError::Malformed),
            "crit is refused whatever its value"
        );
        let twice = format!(r#"{{"alg":"EdDSA","typ":"at+jwt","kid":"{kid}","kid":"other"}}"#);
        assert_eq!(
            codec.verify(&signed(&codec, &twice, &payload), at),
            Err(TokenError::Malformed)
        );
        // The classic confusion: an HMAC keyed with the key's published public key.
        let public = codec.keys.jwks()["keys"][0]["x"].as_str().unwrap();
        let public = URL_SAFE_NO_PAD.decode(public).unwrap();
        let confused = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS512","typ":"at+jwt","kid":"{kid}"}}"#)),
            URL_SAFE_NO_PAD.encode(&payload)
        );
        let mac = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA512, &public),
            confused.as_bytes(),
        );
        let confused = format!("{confused}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()));
        assert_eq!(
            codec.verify(&confused, at),
            Err(TokenError::AlgorithmNotAllowed),
            "the algorithm is the key's, never the token's"
        );
        let none = format!(r#"{{"alg":"none","typ":"at+jwt","kid":"{kid}"}}"#);
        let unsigned = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(none),
            URL_SAFE_NO_PAD.encode(&payload)
        );
        assert_eq!(
            codec.verify(&unsigned, at),
            Err(TokenError::AlgorithmNotAllowed)
        );
        let untyped = format!(r#"{{"alg":"EdDSA","kid":"{kid}"}}"#);
        assert_eq!(
            codec.verify(&signed(&codec, &untyped, &payload), at),
            Err(TokenError::WrongType)
        );
        let mut elsewhere = claims(&codec, at);
        elsewhere.iss = "https://elsewhere.example".into();
        let elsewhere = signed(
            &codec,
            &header(&codec),
            &serde_json::to_string(&elsewhere).unwrap(),
        );
        assert_eq!(codec.verify(&elsewhere, at), Err(TokenError::WrongIssuer));

        // None of these refusals is remembered: only a bad signature is, and
        // only a token whose signature and claims passed is kept as verified.
        for refused in [
            format!("{token}.x"),
            signed(&codec, &critical, &payload),
            signed(&codec, &null, &payload),
            signed(&codec, &twice, &payload),
            confused,
            unsigned,
            signed(&codec, &untyped, &payload),
            elsewhere,
            signed(&codec, &header(&codec), r#"{"sub":7}"#),
        ] {
            assert!(codec.verify(&refused, at).is_err());
            let digest = crate::config::sha256(refused.as_bytes());
            assert!(codec.verified.get(&digest).is_none(), "{refused}");
            assert_eq!(codec.refused.get(&digest), None, "{refused}");
        }
    }

    #[test]
    fn a_signature_of_the_wrong_shape_is_refused_for_every_algorithm() {
        use crate::config::KeyAlgorithm;
        let at = 1_800_000_000;
        for alg in [
            KeyAlgorithm::HS512,
            KeyAlgorithm::ES256,
            KeyAlgorithm::EdDSA,
        ] {
            let (_dir, codec) = codec_with(alg);
            let token = codec.mint(&claims(&codec, at)).unwrap();
            assert!(codec.verify(&token, at).is_ok(), "{alg}");
            let (signed, signature) = token.rsplit_once('.').unwrap();
            let signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
            let with = |signature: &[u8]| format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature));
            let short = with(&signature[..signature.len() - 1]);
            assert_eq!(
                codec.verify(&short, at),
                Err(TokenError::BadSignature),
                "{alg} short"
            );
            let long = with(&[signature.as_slice(), &[0]].concat());
            assert_eq!(
                codec.verify(&long, at),
                Err(TokenError::BadSignature),
                "{alg} long"
            );
            let empty = format!("{signed}.");
            assert_eq!(
                codec.verify(&empty, at),
                Err(TokenError::BadSignature),
                "{alg} empty"
            );
            if alg == KeyAlgorithm::ES256 {
                // JWS carries r || s; the same signature in DER does not verify.
                let der = der_signature(&signature[..32], &signature[32..]);
                assert_eq!(codec.verify(&with(&der), at), Err(TokenError::BadSignature));
            }
        }
    }

    /// An ECDSA signature `r`, `s` (big-endian) as ASN.1 DER, as X.509 tools write it.
    fn der_signature(r: &[u8], s: &[u8]) -> Vec<u8> {
        let integer = |n: &[u8]| {
            let n = &n[n.iter().take_while(|b| **b == 0).count()..];
            let pad = n.first().is_some_and(|b| b & 0x80 != 0);
            let mut out = vec![0x02, (n.len() + usize::from(pad)) as u8];
            if pad {
                out.push(0);
            }
            out.extend_from_slice(n);
            out
        };
        let body = [integer(r), integer(s)].concat();
        [vec![0x30, body.len() as u8], body].concat()
    }

    #[test]
    fn a_verified_token_is_remembered_for_fifteen_minutes_of_the_injected_clock() {
        let (_dir, codec) = codec();
        let at = 1_800_000_000;
        let claims = claims(&codec, at);
        // An entry planted for a string that would never verify shows when the
        // cache answers and when verification runs afresh.
        let planted = "not-a-token";
        codec.remember(
            crate::config::sha256(planted.as_bytes()),
            claims.clone(),
            planted.len(),
            (at, 0),
        );
        assert_eq!(codec.verify(planted, at), Ok(Arc::new(claims.clone())));
        assert_eq!(
            codec.verify(planted, at + 899),
            Ok(Arc::new(claims.clone()))
        );
        assert!(codec.verify(planted, at + 900).is_err(), "after 15 minutes");
        assert!(
            codec.verify(planted, at - 1).is_err(),
            "a clock stepped back"
        );
    }

    #[test]
    fn an_expired_or_tampered_token_presented_again_is_refused_from_memory() {
        let (_dir, codec) = codec();
        let at = 1_800_000_000;
        let digest = |t: &str| crate::config::sha256(t.as_bytes());

        let mut expired = claims(&codec, at - 3_600);
        expired.exp = at - 60;
        let token = codec.mint(&expired).unwrap();
        assert_eq!(codec.verify(&token, at), Err(TokenError::Expired));
        assert!(
            codec.verified.get(&digest(&token)).is_some(),
            "its signature verified: remembered, and refused for its time on every use"
        );
        assert_eq!(codec.verify(&token, at + 1), Err(TokenError::Expired));

        let token = codec.mint(&claims(&codec, at)).unwrap();
        let mut tampered = token.clone().into_bytes();
        let i = tampered.len() - 10;
        tampered[i] = if tampered[i] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert_eq!(codec.verify(&tampered, at), Err(TokenError::BadSignature));
        assert_eq!(codec.refused.get(&digest(&tampered)), Some(0));
        assert_eq!(codec.verify(&tampered, at), Err(TokenError::BadSignature));

        // A refusal planted for a good token shows when memory answers: under the
        // same keys it does; after a key was withdrawn or replaced it does not.
        codec.refused.insert(digest(&token), 0);
        assert_eq!(codec.verify(&token, at), Err(TokenError::BadSignature));
        codec.refused.insert(digest(&token), 1);
        assert!(codec.verify(&token, at).is_ok(), "refused under other keys");
    }
}
