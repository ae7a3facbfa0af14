//! Hostile and broken tokens, over HTTP and as properties of the codec.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use serde_json::{Value, json};
use tokenwarden::config::{FileConfig, Settings};
use tokenwarden::token::{KeySet, TokenCodec, TokenError};

use crate::support::{Fixture, Keys, TestApp, s, settings};

fn claims_of(token: &str) -> Value {
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

/// The token with one character of its signature changed to another base64url character.
pub fn flip_char(token: &str, at: usize) -> String {
    let mut bytes = token.as_bytes().to_vec();
    bytes[at] = if bytes[at] == b'A' { b'B' } else { b'A' };
    String::from_utf8(bytes).unwrap()
}

fn header(alg: Algorithm, kid: &str, typ: &str) -> Header {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    h.typ = Some(typ.into());
    h
}

fn unsigned(header: Value, claims: &Value) -> String {
    format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// A token with this header, HS512-signed with `secret`.
fn hmac_signed(header: Value, claims: &Value, secret: &[u8]) -> String {
    hmac_signed_raw(&header.to_string(), claims, secret)
}

/// The same, with the header's JSON exactly as given.
fn hmac_signed_raw(header: &str, claims: &Value, secret: &[u8]) -> String {
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA512, secret);
    let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
}

#[tokio::test]
async fn every_kind_of_bad_token_is_refused_with_its_reason() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let app = TestApp::spawn(settings(&db.url, &keys, "hs-1", data.path())).await;
    let opened = app.open("alice").await;
    let good = s(&opened, "access_token");
    let claims = claims_of(&good);
    let secret = keys.read("hs-1");
    let hs = EncodingKey::from_secret(secret.trim().as_bytes());
    let sign = |h: &Header, c: &Value| jsonwebtoken::encode(h, c, &hs).unwrap();
    let with = |k: &str, v: Value| {
        let mut c = claims.clone();
        c[k] = v;
        c
    };
    let without = |k: &str| {
        let mut c = claims.clone();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let hs_header = header(Algorithm::HS512, "hs-1", "at+jwt");
    // The same claims, re-signed by us with the real key: accepted (the baseline).
    assert_eq!(
        app.verify(&sign(&hs_header, &claims)).await["decision"],
        "allow"
    );

    // Signed by hand the same way, with a plain header: accepted, so the cases
    // below are refused for their header alone.
    assert_eq!(
        app.verify(&hmac_signed(
            json!({"alg": "HS512", "typ": "at+jwt", "kid": "hs-1"}),
            &claims,
            secret.trim().as_bytes(),
        ))
        .await["decision"],
        "allow"
    );

    let bad_sig = flip_char(&good, good.len() - 10);
    // An HMAC made with the ES256 key's public JWK: the classic algorithm confusion.
    let es_public = app
        .http
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let confused = jsonwebtoken::encode(
        &header(Algorithm::HS512, "es-1", "at+jwt"),
        &claims,
        &EncodingKey::from_secret(es_public.as_bytes()),
    )
    .unwrap();

    let cases: Vec<(&str, String)> = vec![
        ("bad_signature", bad_sig),
        ("algorithm_not_allowed", confused),
        (
            "algorithm_not_allowed",
            unsigned(
                json!({"alg": "none", "typ": "at+jwt", "kid": "hs-1"}),
                &claims,
            ),
        ),
        (
            "unknown_kid",
            sign(&header(Algorithm::HS512, "nope", "at+jwt"), &claims),
        ),
        (
            "wrong_type",
            sign(&header(Algorithm::HS512, "hs-1", "JWT"), &claims),
        ),
        (
            "wrong_issuer",
            sign(&hs_header, &with("iss", json!("https://evil.example"))),
        ),
        (
            "wrong_audience",
            sign(&hs_header, &with("aud", json!("another-api"))),
        ),
        ("missing_claim", sign(&hs_header, &without("jti"))),
        ("missing_claim", sign(&hs_header, &without("sid"))),
        ("missing_claim", sign(&hs_header, &without("exp"))),
        (
            "not_yet_valid",
            sign(
                &hs_header,
                &with("nbf", json!(claims["iat"].as_i64().unwrap() + 3600)),
            ),
        ),
        (
            "token_too_large",
            sign(&hs_header, &with("padding", json!("x".repeat(9000)))),
        ),
        ("malformed", "not-a-jwt".into()),
        ("malformed", "a.b.c".into()),
        // Two parts and four: never a compact JWS, whatever the parts hold.
        ("malformed", good.rsplit_once('.').unwrap().0.to_owned()),
        (
            "malformed",
            format!("{good}.{}", good.rsplit_once('.').unwrap().1),
        ),
        // Signed with the real key, but naming an extension we would have to
        // understand (RFC 7515 §4.1.11): refused, whatever `crit` holds.
        (
            "malformed",
            hmac_signed(
                json!({"alg": "HS512", "typ": "at+jwt", "kid": "hs-1", "crit": ["exp"]}),
                &claims,
                secret.trim().as_bytes(),
            ),
        ),
        (
            "malformed",
            hmac_signed(
                json!({"alg": "HS512", "typ": "at+jwt", "kid": "hs-1", "crit": null}),
                &claims,
                secret.trim().as_bytes(),
            ),
        ),
        // A header that names its key twice is not ours to pick from.
        (
            "malformed",
            hmac_signed_raw(
                r#"{"alg":"HS512","typ":"at+jwt","kid":"hs-1","kid":"hs-1"}"#,
                &claims,
                secret.trim().as_bytes(),
            ),
        ),
    ];
    for (code, token) in &cases {
        let v = app.verify(token).await;
        assert_eq!(v["decision"], "invalid", "{code}: {v}");
        let detail = v["reasons"][0]["detail"].as_str().unwrap();
        assert!(detail.starts_with(code), "expected {code}, got {detail}");
        assert!(v["subject"].is_null(), "nothing from a bad token is echoed");

        let r = app
            .http
            .get(app.url("/v1/forward-auth"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{code}");
        let challenge = r.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    }

    // Expiry is judged by the injected clock: 5 min lifetime plus 30 s leeway.
    app.clock.advance(Duration::from_secs(330));
    assert_eq!(app.verify(&good).await["decision"], "allow");
    app.clock.advance(Duration::from_secs(1));
    let v = app.verify(&good).await;
    assert_eq!(
        (
            v["decision"].as_str(),
            v["reasons"][0]["detail"]
                .as_str()
                .map(|d| d.starts_with("expired"))
        ),
        (Some("invalid"), Some(true))
    );

    let r = app
        .http
        .get(app.url("/v1/forward-auth"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "no token at all");
}

#[tokio::test]
async fn forward_auth_passes_identity_headers_for_a_good_token() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let app = TestApp::spawn(settings(&db.url, &keys, "ed-1", data.path())).await;
    let opened = app.open("alice").await;
    let r = app
        .http
        .post(app.url("/v1/forward-auth"))
        .bearer_auth(s(&opened, "access_token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-auth-subject"], "alice");
    assert_eq!(
        r.headers()["x-auth-session"],
        s(&opened, "session_id").as_str()
    );
}

fn codecs() -> Vec<(String, TokenCodec, Keys)> {
    ["hs-1", "es-1", "ed-1"]
        .into_iter()
        .map(|kid| {
            let keys = Keys::all();
            let set = KeySet::load(&keys.entries, Some(kid)).unwrap();
            let tokens = Settings::resolve(FileConfig::default(), &Default::default())
                .unwrap()
                .tokens;
            (kid.to_owned(), TokenCodec::new(set, &tokens), keys)
        })
        .collect()
}

fn claims(
    sub: &str,
    sid: &str,
    jti: &str,
    iat: i64,
    extra: Option<(String, String)>,
) -> tokenwarden::token::AccessClaims {
    tokenwarden::token::AccessClaims {
        iss: "tokenwarden".into(),
        aud: "tokenwarden".into(),
        sub: sub.into(),
        jti: jti.into(),
        sid: sid.into(),
        iat,
        nbf: None,
        exp: iat + 300,
        auth_time: iat,
        bnd: "b".into(),
        generation: 0,
        epoch: 0,
        acr: None,
        amr: None,
        extra: extra
            .into_iter()
            .map(|(k, v)| (format!("x_{k}"), Value::String(v)))
            .collect(),
        foreign: false,
        cleared: Default::default(),
    }
}

#[test]
fn a_token_seen_before_is_still_checked_against_the_clock() {
    for (kid, codec, _keys) in codecs() {
        let iat = 1_800_000_000;
        let c = claims("alice", "s", "j", iat, None);
        let token = codec.mint(&c).unwrap();
        let leeway = codec.leeway();
        assert_eq!(codec.verify(&token, iat + 10).as_deref(), Ok(&c), "{kid}");
        assert_eq!(
            codec.verify(&token, iat + 11).as_deref(),
            Ok(&c),
            "{kid}: seen before"
        );
        assert_eq!(
            codec.verify(&token, c.exp + leeway + 1),
            Err(TokenError::Expired),
            "{kid}: the verified-token cache never outlives the token"
        );
        // A clock stepped back verifies afresh; the last valid second is still valid.
        assert_eq!(codec.verify(&token, iat + 5).as_deref(), Ok(&c), "{kid}");
        assert_eq!(
            codec.verify(&token, c.exp + leeway).as_deref(),
            Ok(&c),
            "{kid}"
        );
        let tampered = format!("{token}x");
        assert!(
            codec.verify(&tampered, iat + 10).is_err(),
            "{kid}: another token is not a hit"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn what_we_mint_verifies_to_the_same_claims(
        sub in "\\PC{1,40}", sid in "[a-f0-9-]{1,36}", jti in "[A-Za-z0-9_-]{1,22}",
        iat in 1_600_000_000i64..2_000_000_000, extra in proptest::option::of(("[a-z]{1,8}", "\\PC{0,20}")),
    ) {
        for (kid, codec, _keys) in codecs() {
            let c = claims(&sub, &sid, &jti, iat, extra.clone());
            let token = codec.mint(&c).unwrap();
            let verified = codec.verify(&token, iat + 10);
            prop_assert_eq!(verified.as_deref(), Ok(&c), "{}", kid);
        }
    }

    #[test]
    fn any_single_changed_byte_is_rejected(pos in any::<prop::sample::Index>(), byte in 0x21u8..0x7f) {
        for (kid, codec, _keys) in codecs() {
            let token = codec.mint(&claims("alice", "s", "j", 1_800_000_000, None)).unwrap();
            let i = pos.index(token.len());
            prop_assume!(token.as_bytes()[i] != byte);
            let mut bytes = token.into_bytes();
            bytes[i] = byte;
            let tampered = String::from_utf8(bytes).unwrap();
            prop_assert!(codec.verify(&tampered, 1_800_000_010).is_err(), "{} accepted a change at {}", kid, i);
        }
    }
}
