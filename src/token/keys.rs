//! Signing and verification keys: loading PEM and secret files, pinning one
//! algorithm per `kid`, generating new keys, and the public JWKS.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, ED25519, EcdsaKeyPair,
    Ed25519KeyPair, KeyPair, ParsedPublicKey, VerificationAlgorithm,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::json;

use crate::config::{KeyAlgorithm, KeyEntry, sha256, to_hex};

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key {kid:?}: cannot read {path}: {source}")]
    Read {
        kid: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key {kid:?} ({path}): {message}")]
    Format {
        kid: String,
        path: PathBuf,
        message: String,
    },
    #[error(
        "key {kid:?} ({path}): the HS512 secret is too weak ({message}). Use at least 64 random bytes: `tokenwarden keys generate --alg HS512 --out {path}`"
    )]
    WeakSecret {
        kid: String,
        path: PathBuf,
        message: String,
    },
    #[error("no signing key: {0}")]
    NoSigningKey(String),
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key generation failed")]
    Generate,
}

/// One verification key: the algorithm is pinned to the key, never taken from the token.
pub(crate) struct VerifyKey {
    pub(crate) alg: Algorithm,
    pub(crate) check: SignatureCheck,
}

/// A key prepared once, when it is loaded, for the one algorithm pinned to it: the
/// HMAC key schedule is computed and the public point decoded and validated here,
/// not for every token.
pub(crate) enum SignatureCheck {
    /// HS512.
    Hmac(Box<hmac::Key>),
    /// ES256 (fixed-size `r || s` signatures, as JWS uses) or EdDSA (Ed25519).
    Public(ParsedPublicKey),
}

impl SignatureCheck {
    /// Whether `signature` is this key's over `message`. The HMAC comparison is in
    /// constant time.
    pub(crate) fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        match self {
            Self::Hmac(key) => hmac::verify(key, message, signature).is_ok(),
            Self::Public(key) => key.verify_sig(message, signature).is_ok(),
        }
    }
}

pub(crate) struct SigningKey {
    pub(crate) kid: String,
    pub(crate) alg: Algorithm,
    pub(crate) encoding: EncodingKey,
}

/// All keys by `kid`, the one active signing key and the public JWKS document.
pub struct KeySet {
    pub(crate) verify: HashMap<String, VerifyKey>,
    pub(crate) signing: SigningKey,
    jwks: serde_json::Value,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.verify.keys().collect::<Vec<_>>())
            .field("signing_kid", &self.signing.kid)
            .finish()
    }
}

/// A key as loaded from its file, before it joins a [`KeySet`].
struct Loaded {
    kid: String,
    alg: KeyAlgorithm,
    check: SignatureCheck,
    encoding: Option<EncodingKey>,
    jwk: Option<serde_json::Value>,
}

/// Shortest HS512 secret we accept, in bytes (RFC 7518 §3.2 asks for at least the hash size).
const HS512_MIN_BYTES: usize = 64;
/// Estimated entropy an HS512 secret must carry at least.
const HS512_MIN_BITS: f64 = 256.0;

const P256_SPKI_PREFIX: &[u8] = &[
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
const ED25519_SPKI_PREFIX: &[u8] = &[
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

impl KeySet {
    /// Loads every configured key; `signing_kid` picks the signer when several can sign.
    pub fn load(entries: &[KeyEntry], signing_kid: Option<&str>) -> Result<Self, KeyError> {
        let loaded = entries
            .iter()
            .map(load_entry)
            .collect::<Result<Vec<_>, _>>()?;
        Self::assemble(loaded, signing_kid)
    }

    /// The development key: `data_dir/keys/dev-eddsa.pem`, generated (mode 0600) on first start.
    /// Returns the key set and whether the key was created now.
    pub fn load_or_create_dev(data_dir: &Path) -> Result<(Self, bool), KeyError> {
        let path = data_dir.join("keys").join("dev-eddsa.pem");
        let created = if path.exists() {
            false
        } else {
            let pem = generate(KeyAlgorithm::EdDSA)?;
            write_private(&path, pem.as_bytes())?;
            true
        };
        let mut loaded = load_file("dev", KeyAlgorithm::EdDSA, &path)?;
        if let Some(jwk) = &loaded.jwk {
            // A stable kid derived from the public key, so restarts keep verifying old tokens.
            let x = jwk["x"].as_str().unwrap_or_default();
            loaded.kid = format!("dev-{}", &to_hex(&sha256(x.as_bytes()))[..12]);
            if let Some(obj) = loaded.jwk.as_mut().and_then(|j| j.as_object_mut()) {
                obj.insert("kid".into(), json!(loaded.kid));
            }
        }
        Ok((Self::assemble(vec![loaded], None)?, created))
    }

    fn assemble(loaded: Vec<Loaded>, signing_kid: Option<&str>) -> Result<Self, KeyError> {
        let signers: Vec<&Loaded> = loaded.iter().filter(|k| k.encoding.is_some()).collect();
        let chosen = match signing_kid {
            Some(kid) => loaded
                .iter()
                .find(|k| k.kid == kid)
                .ok_or_else(|| KeyError::NoSigningKey(format!("kid {kid:?} is not configured")))?,
            None => match signers.as_slice() {
                [one] => *one,
                [] => {
                    return Err(KeyError::NoSigningKey(
                        "every configured key is public-only; add a private key or a secret".into(),
                    ));
                }
                _ => {
                    return Err(KeyError::NoSigningKey(
                        "several keys can sign: set tokens.signing_kid to the active one".into(),
                    ));
                }
            },
        };
        let signing = SigningKey {
            kid: chosen.kid.clone(),
            alg: jwt_alg(chosen.alg),
            encoding: chosen.encoding.clone().ok_or_else(|| {
                KeyError::NoSigningKey(format!(
                    "kid {:?} is a public key only and cannot sign",
                    chosen.kid
                ))
            })?,
        };
        let jwks = json!({
            "keys": loaded.iter().filter_map(|k| k.jwk.clone()).collect::<Vec<_>>()
        });
        let verify = loaded
            .into_iter()
            .map(|k| {
                (
                    k.kid,
                    VerifyKey {
                        alg: jwt_alg(k.alg),
                        check: k.check,
                    },
                )
            })
            .collect();
        Ok(Self {
            verify,
            signing,
            jwks,
        })
    }

    /// The public keys as a JWKS document (HS512 secrets are never published).
    pub fn jwks(&self) -> &serde_json::Value {
        &self.jwks
    }

    pub fn signing_kid(&self) -> &str {
        &self.signing.kid
    }
}

fn jwt_alg(alg: KeyAlgorithm) -> Algorithm {
    match alg {
        KeyAlgorithm::HS512 => Algorithm::HS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}

fn load_entry(entry: &KeyEntry) -> Result<Loaded, KeyError> {
    load_file(&entry.kid, entry.alg, &entry.path)
}

fn load_file(kid: &str, alg: KeyAlgorithm, path: &Path) -> Result<Loaded, KeyError> {
    let bytes = std::fs::read(path).map_err(|source| KeyError::Read {
        kid: kid.to_owned(),
        path: path.to_owned(),
        source,
    })?;
    let format_err = |message: String| KeyError::Format {
        kid: kid.to_owned(),
        path: path.to_owned(),
        message,
    };
    // A secret, or a PEM key on one of the two curves: every match below is on
    // the curve, so no algorithm falls into another's arm.
    let curve = match alg {
        KeyAlgorithm::HS512 => {
            let secret = trim_ascii(&bytes);
            check_secret_strength(secret).map_err(|message| KeyError::WeakSecret {
                kid: kid.to_owned(),
                path: path.to_owned(),
                message,
            })?;
            return Ok(Loaded {
                kid: kid.to_owned(),
                alg,
                check: SignatureCheck::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA512, secret))),
                encoding: Some(EncodingKey::from_secret(secret)),
                jwk: None,
            });
        }
        KeyAlgorithm::ES256 => Curve::P256,
        KeyAlgorithm::EdDSA => Curve::Ed25519,
    };
    let pem = pem::parse(&bytes).map_err(|e| format_err(format!("not a PEM file: {e}")))?;
    let (public, encoding) = match pem.tag() {
        "PRIVATE KEY" => {
            let public =
                public_from_pkcs8(curve, pem.contents()).map_err(|m| format_err(m.into()))?;
            let encoding = match curve {
                Curve::P256 => EncodingKey::from_ec_der(pem.contents()),
                Curve::Ed25519 => EncodingKey::from_ed_der(pem.contents()),
            };
            (public, Some(encoding))
        }
        "PUBLIC KEY" => {
            let prefix = match curve {
                Curve::P256 => P256_SPKI_PREFIX,
                Curve::Ed25519 => ED25519_SPKI_PREFIX,
            };
            let public = pem
                .contents()
                .strip_prefix(prefix)
                .ok_or_else(|| format_err(format!("not an {alg} public key")))?;
            (public.to_vec(), None)
        }
        "EC PRIVATE KEY" => {
            return Err(format_err(
                "SEC1 EC key: convert it to PKCS#8 with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pem`".into(),
            ));
        }
        other => return Err(format_err(format!("unexpected PEM block {other:?}"))),
    };
    let (verification, jwk): (&'static dyn VerificationAlgorithm, _) = match curve {
        Curve::P256 => {
            if public.len() != 65 || public[0] != 4 {
                return Err(format_err("not an uncompressed P-256 point".into()));
            }
            let x = URL_SAFE_NO_PAD.encode(&public[1..33]);
            let y = URL_SAFE_NO_PAD.encode(&public[33..]);
            let jwk = json!({"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"});
            (&ECDSA_P256_SHA256_FIXED, jwk)
        }
        Curve::Ed25519 => {
            if public.len() != 32 {
                return Err(format_err("not an Ed25519 public key".into()));
            }
            let x = URL_SAFE_NO_PAD.encode(&public);
            let jwk = json!({"kty": "OKP", "crv": "Ed25519", "x": x, "kid": kid, "alg": "EdDSA", "use": "sig"});
            (&ED25519, jwk)
        }
    };
    // The point is decoded and checked to be on the curve once, here.
    let check = ParsedPublicKey::new(verification, &public)
        .map(SignatureCheck::Public)
        .map_err(|e| format_err(format!("not a usable {alg} public key: {e}")))?;
    Ok(Loaded {
        kid: kid.to_owned(),
        alg,
        check,
        encoding,
        jwk: Some(jwk),
    })
}

/// The curve of an ES256 or EdDSA key.
#[derive(Clone, Copy)]
enum Curve {
    P256,
    Ed25519,
}

fn public_from_pkcs8(curve: Curve, der: &[u8]) -> Result<Vec<u8>, &'static str> {
    match curve {
        Curve::P256 => EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map(|k| k.public_key().as_ref().to_vec())
            .map_err(|_| "not a PKCS#8 P-256 private key"),
        Curve::Ed25519 => Ed25519KeyPair::from_pkcs8(der)
            .map(|k| k.public_key().as_ref().to_vec())
            .map_err(|_| "not a PKCS#8 Ed25519 private key"),
    }
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    bytes.trim_ascii()
}

/// Refuses secrets that are short or visibly non-random (repeated or low-variety bytes).
pub fn check_secret_strength(secret: &[u8]) -> Result<(), String> {
    if secret.len() < HS512_MIN_BYTES {
        return Err(format!(
            "{} bytes, at least {HS512_MIN_BYTES} are required",
            secret.len()
        ));
    }
    let mut counts = [0usize; 256];
    for b in secret {
        counts[usize::from(*b)] += 1;
    }
    let n = secret.len() as f64;
    let per_byte: f64 = counts
        .iter()
        .filter(|c| **c > 0)
        .map(|c| {
            let p = *c as f64 / n;
            -p * p.log2()
        })
        .sum();
    let bits = per_byte * n;
    if bits < HS512_MIN_BITS || per_byte < 3.0 {
        return Err(format!(
            "about {bits:.0} bits of entropy, at least {HS512_MIN_BITS:.0} are required"
        ));
    }
    Ok(())
}

/// A new key in the text form its file holds: a PKCS#8 PEM, or for HS512 a base64url secret.
pub fn generate(alg: KeyAlgorithm) -> Result<String, KeyError> {
    let rng = SystemRandom::new();
    let der = match alg {
        KeyAlgorithm::HS512 => {
            let mut secret = [0u8; 64];
            rng.fill(&mut secret).map_err(|_| KeyError::Generate)?;
            return Ok(format!("{}\n", URL_SAFE_NO_PAD.encode(secret)));
        }
        KeyAlgorithm::ES256 => EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| KeyError::Generate)?
            .as_ref()
            .to_vec(),
        // PKCS#8 v1, as `openssl genpkey -algorithm ED25519` writes: other tools read it.
        KeyAlgorithm::EdDSA => Ed25519KeyPair::generate_pkcs8v1(&rng)
            .map_err(|_| KeyError::Generate)?
            .as_ref()
            .to_vec(),
    };
    Ok(pem::encode(&pem::Pem::new("PRIVATE KEY", der)))
}

/// Writes a secret file readable by its owner only (mode 0600), creating parent folders.
pub fn write_private(path: &Path, contents: &[u8]) -> Result<(), KeyError> {
    let err = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        let mut dirs = std::fs::DirBuilder::new();
        dirs.recursive(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::DirBuilderExt;
            dirs.mode(0o700);
        }
        dirs.create(parent).map_err(err)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

/// Random bytes from the system generator, for refresh tokens, ids and credentials.
pub fn random_bytes<const N: usize>() -> Result<[u8; N], KeyError> {
    let mut out = [0u8; N];
    SystemRandom::new()
        .fill(&mut out)
        .map_err(|_| KeyError::Generate)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_or_repetitive_secrets_are_refused() {
        assert!(check_secret_strength(b"short").is_err());
        assert!(check_secret_strength(&[b'a'; 128]).is_err());
        assert!(check_secret_strength("password".repeat(16).as_bytes()).is_err());
        let generated = generate(KeyAlgorithm::HS512).unwrap();
        assert!(check_secret_strength(generated.trim().as_bytes()).is_ok());
    }

    #[test]
    fn generated_keys_load_and_publish_only_public_parts() {
        let dir = tempfile::tempdir().unwrap();
        let mut entries = Vec::new();
        for (kid, alg) in [
            ("h", KeyAlgorithm::HS512),
            ("e", KeyAlgorithm::ES256),
            ("d", KeyAlgorithm::EdDSA),
        ] {
            let path = dir.path().join(kid);
            write_private(&path, generate(alg).unwrap().as_bytes()).unwrap();
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path).unwrap().permissions().mode();
                assert_eq!(mode & 0o777, 0o600);
            }
            entries.push(KeyEntry {
                kid: kid.into(),
                alg,
                path,
            });
        }
        let set = KeySet::load(&entries, Some("e")).unwrap();
        assert_eq!(set.signing_kid(), "e");
        let keys = set.jwks()["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2, "the HS512 secret must not be published");
        assert!(keys.iter().all(|k| k.get("d").is_none()));
        let err = KeySet::load(&entries, None).unwrap_err();
        assert!(err.to_string().contains("signing_kid"), "{err}");
    }

    #[test]
    fn a_weak_hs512_secret_refuses_to_start_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weak");
        std::fs::write(&path, "changeme").unwrap();
        let err = KeySet::load(
            &[KeyEntry {
                kid: "k".into(),
                alg: KeyAlgorithm::HS512,
                path,
            }],
            None,
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("keys generate --alg HS512"),
            "{err}"
        );
    }

    #[test]
    fn the_dev_key_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (first, created) = KeySet::load_or_create_dev(dir.path()).unwrap();
        assert!(created);
        let (second, created) = KeySet::load_or_create_dev(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(first.signing_kid(), second.signing_kid());
        assert_eq!(first.jwks(), second.jwks());
    }
}
