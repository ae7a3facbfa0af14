//! Verifier-only mode: access tokens of another issuer, its keys served as a JWKS
//! by the test itself (and read from a file), bound at their first sighting and
//! scored like our own.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokenwarden::clock::Clock;
use tokenwarden::config::{IssuerSettings, JwksSource, KeyAlgorithm, KeyEntry};
use tokenwarden::token::{KeySet, external_session_id, generate};

use crate::support::{APP_KEY, Fixture, TestApp, USER_AGENT, settings};

const IDP: &str = "https://idp.example.test";
const AUDIENCE: &str = "shop-api";

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The other issuer: signing keys by kid, and the JWKS it publishes.
struct Idp {
    dir: tempfile::TempDir,
    pems: Mutex<Vec<(String, KeyAlgorithm, String)>>,
    jwks: Mutex<Value>,
    fetches: AtomicUsize,
}

impl Idp {
    fn new() -> Arc<Self> {
        let idp = Arc::new(Self {
            dir: tempfile::tempdir().unwrap(),
            pems: Mutex::new(Vec::new()),
            jwks: Mutex::new(json!({"keys": []})),
            fetches: AtomicUsize::new(0),
        });
        idp.add_key("idp-1", KeyAlgorithm::ES256);
        idp
    }

    /// A new signing key, published in the JWKS next to the others.
    fn add_key(&self, kid: &str, alg: KeyAlgorithm) {
        let pem = generate(alg).unwrap();
        let mut pems = self.pems.lock().unwrap();
        pems.push((kid.to_owned(), alg, pem));
        self.publish(&pems, kid);
    }

    /// The key is withdrawn from the JWKS (the issuer's answer to its theft).
    fn retire(&self, kid: &str) {
        let mut pems = self.pems.lock().unwrap();
        pems.retain(|(k, _, _)| k != kid);
        let signer = pems[0].0.clone();
        self.publish(&pems, &signer);
    }

    fn publish(&self, pems: &[(String, KeyAlgorithm, String)], signer: &str) {
        let entries: Vec<KeyEntry> = pems
            .iter()
            .map(|(kid, alg, pem)| {
                let path = self.dir.path().join(kid);
                std::fs::write(&path, pem).unwrap();
                KeyEntry {
                    kid: kid.clone(),
                    alg: *alg,
                    path,
                }
            })
            .collect();
        let set = KeySet::load(&entries, Some(signer)).unwrap();
        *self.jwks.lock().unwrap() = set.jwks().clone();
    }

    fn sign(&self, kid: &str, claims: &Value) -> String {
        let pems = self.pems.lock().unwrap();
        let (_, alg, pem) = pems.iter().find(|(k, _, _)| k == kid).unwrap();
        let (alg, key) = match alg {
            KeyAlgorithm::ES256 => (
                Algorithm::ES256,
                EncodingKey::from_ec_pem(pem.as_bytes()).unwrap(),
            ),
            KeyAlgorithm::EdDSA => (
                Algorithm::EdDSA,
                EncodingKey::from_ed_pem(pem.as_bytes()).unwrap(),
            ),
            KeyAlgorithm::HS512 => unreachable!("the IdP publishes public keys"),
        };
        let mut header = Header::new(alg);
        header.typ = Some("JWT".into());
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }

    /// Serves `/jwks.json` on loopback, counting fetches.
    async fn serve(self: &Arc<Self>) -> String {
        let idp = self.clone();
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let idp = idp.clone();
                async move {
                    idp.fetches.fetch_add(1, Ordering::SeqCst);
                    axum::Json(idp.jwks.lock().unwrap().clone())
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}/jwks.json")
    }
}

/// When carol signed in at the issuer (the tests' clock starts at T0).
const SIGNED_IN: i64 = crate::support::T0 - 30;

fn claims(now: i64, sid: &str, jti: &str) -> Value {
    json!({"iss": IDP, "aud": [AUDIENCE, "other"], "sub": "carol", "sid": sid, "jti": jti,
           "iat": now, "exp": now + 600, "auth_time": SIGNED_IN})
}

/// Our id for the issuer's session `sid` as of carol's sign-in at `SIGNED_IN`.
fn our_id(sid: &str) -> String {
    external_session_id(IDP, &format!("{sid}\0{SIGNED_IN}"))
}

async fn spawn(jwks: JwksSource) -> (TestApp, Fixture) {
    let fixture = Fixture::sqlite().await;
    let mut config = settings(&fixture.db.url, &fixture.keys, "ed-1", fixture.data.path());
    config.geoip_city = Some(repo("tests/data/geoip/GeoIP2-City-Test.mmdb"));
    config.rules = Some(repo("rules/default.toml"));
    config.issuers = vec![IssuerSettings {
        issuer: IDP.into(),
        audience: AUDIENCE.into(),
        jwks,
        algorithms: vec!["ES256".into(), "EdDSA".into()],
        min_refresh_interval: Duration::from_secs(30),
        cache_ttl: Duration::from_secs(3600),
    }];
    (TestApp::spawn(config).await, fixture)
}

async fn verify(app: &TestApp, token: &str, ip: &str) -> Value {
    let r = app
        .post(
            "/v1/verify",
            json!({"token": token, "request": {"ip": ip, "user_agent": USER_AGENT}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn session(app: &TestApp, id: &str) -> reqwest::Response {
    app.http
        .get(app.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn another_issuers_token_is_bound_at_first_sighting_and_scored_like_ours() {
    let idp = Idp::new();
    let url = idp.serve().await;
    let (app, _f) = spawn(JwksSource::Url(url)).await;
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 1, "fetched at start");
    let now = app.clock.now();
    let (london, milton_us) = ("81.2.69.142", "216.160.83.56");

    let first = idp.sign("idp-1", &claims(now, "idp-sess-1", "t1"));
    let v = verify(&app, &first, london).await;
    assert_eq!(v["decision"], "allow", "{v}");
    let id = our_id("idp-sess-1");
    assert_eq!(v["session_id"], id.as_str());
    let shown: Value = session(&app, &id).await.json().await.unwrap();
    assert_eq!(
        (
            shown["subject"].as_str(),
            shown["state"].as_str(),
            shown["ip"].as_str()
        ),
        (Some("carol"), Some("active"), Some(london)),
        "bound to the first client: {shown}"
    );

    // Another token of the same session of the issuer: the same session here.
    let second = idp.sign("idp-1", &claims(now, "idp-sess-1", "t2"));
    assert_eq!(
        verify(&app, &second, london).await["session_id"],
        id.as_str()
    );

    // Replayed from another continent three minutes later: stepped up, as ours would be.
    app.clock.advance(Duration::from_secs(180));
    let v = verify(&app, &first, milton_us).await;
    assert_eq!(v["decision"], "step_up", "{v}");
    assert!(v["user_message"].as_str().unwrap().contains("Milton"));

    // Re-authentication happens at the issuer, not here.
    let r = app
        .post(
            &format!("/v1/sessions/{id}/reauth"),
            json!({"client": {"ip": london, "user_agent": USER_AGENT}}),
        )
        .await;
    assert_eq!(r.status(), 409);
    // The user does so: the issuer keeps its sid, the new auth_time makes it a new
    // session here, bound afresh; the stepped-up one is left to the thief.
    let mut again = claims(app.clock.now(), "idp-sess-1", "t-again");
    again["auth_time"] = json!(app.clock.now());
    let v = verify(&app, &idp.sign("idp-1", &again), london).await;
    assert_eq!(v["decision"], "allow", "{v}");
    assert_ne!(v["session_id"], id.as_str());
    let v = verify(&app, &second, london).await;
    assert_eq!(
        v["decision"], "step_up",
        "the old session is still flagged: {v}"
    );

    // Logging the session out here refuses every token of it.
    let r = app
        .http
        .delete(app.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let v = verify(&app, &second, london).await;
    assert_eq!(
        (v["decision"].as_str(), v["reasons"][0]["detail"].as_str()),
        (Some("revoke"), Some("session_revoked"))
    );

    // Log out everywhere: a session sighted before is dead; one sighted later is not.
    let other = idp.sign("idp-1", &claims(now, "idp-sess-2", "t3"));
    assert_eq!(verify(&app, &other, london).await["decision"], "allow");
    let r = app
        .http
        .delete(app.url("/v1/users/carol/sessions"))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(verify(&app, &other, london).await["decision"], "revoke");
    let fresh = idp.sign("idp-1", &claims(app.clock.now(), "idp-sess-3", "t4"));
    assert_eq!(verify(&app, &fresh, london).await["decision"], "allow");

    // Hours later the issuer still mints tokens for the logged-out sessions. After a
    // restart the revocation view holds nothing that old; the records still refuse.
    app.clock.advance(Duration::from_secs(2 * 3600));
    let app = app.restart().await;
    let now = app.clock.now();
    for (sid, jti) in [("idp-sess-1", "t8"), ("idp-sess-2", "t9")] {
        let later = idp.sign("idp-1", &claims(now, sid, jti));
        let v = verify(&app, &later, london).await;
        assert_eq!(v["decision"], "revoke", "{sid}: {v}");
    }
    // Introspection agrees, and does not show our own claims' placeholders.
    let r = app
        .http
        .post(app.url("/oauth/introspect"))
        .bearer_auth(APP_KEY)
        .form(&[(
            "token",
            idp.sign("idp-1", &claims(now, "idp-sess-2", "t10")),
        )])
        .send()
        .await
        .unwrap();
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"active": false}));
    let live = idp.sign("idp-1", &claims(now, "idp-sess-3", "t11"));
    assert_eq!(verify(&app, &live, london).await["decision"], "allow");
    let r: Value = app
        .http
        .post(app.url("/oauth/introspect"))
        .bearer_auth(APP_KEY)
        .form(&[("token", live.as_str())])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (r["active"].as_bool(), r["sub"].as_str()),
        (Some(true), Some("carol"))
    );
    assert!(r.get("gen").is_none() && r.get("bnd").is_none(), "{r}");

    // No request IP at a first sighting: nothing to bind to.
    let unbound = idp.sign("idp-1", &claims(app.clock.now(), "idp-sess-4", "t5"));
    let r = app
        .post("/v1/verify", json!({"token": unbound, "request": {}}))
        .await;
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn a_rotated_key_is_fetched_on_its_first_token_and_fetches_are_rate_bounded() {
    let idp = Idp::new();
    let url = idp.serve().await;
    let (app, _f) = spawn(JwksSource::Url(url)).await;
    let now = app.clock.now();
    idp.add_key("idp-2", KeyAlgorithm::EdDSA);
    let rotated = idp.sign("idp-2", &claims(now, "s-rot", "r1"));

    // Within min_refresh_interval of the fetch at start: not fetched again.
    let v = verify(&app, &rotated, "81.2.69.142").await;
    assert_eq!(v["decision"], "invalid");
    assert!(
        v["reasons"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("unknown_kid")
    );
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 1);

    app.clock.advance(Duration::from_secs(31));
    let v = verify(&app, &rotated, "81.2.69.142").await;
    assert_eq!(v["decision"], "allow", "{v}");
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 2);

    // A flood of made-up kids: at most one fetch per interval.
    app.clock.advance(Duration::from_secs(31));
    let made_up: Vec<String> = (0..20)
        .map(|i| {
            let mut t = idp.sign("idp-1", &claims(now, "s-x", &format!("x{i}")));
            // Re-sign under a kid nobody published.
            let header = URL_SAFE_NO_PAD
                .encode(format!(r#"{{"alg":"ES256","typ":"JWT","kid":"nope-{i}"}}"#));
            let rest = t.split_once('.').unwrap().1.to_owned();
            t = format!("{header}.{rest}");
            t
        })
        .collect();
    for t in &made_up {
        assert_eq!(verify(&app, t, "81.2.69.142").await["decision"], "invalid");
    }
    assert_eq!(
        idp.fetches.load(Ordering::SeqCst),
        3,
        "one fetch for 20 unknown kids"
    );
}

#[tokio::test]
async fn a_withdrawn_key_stops_its_tokens_at_once_though_they_were_verified_before() {
    let idp = Idp::new();
    let url = idp.serve().await;
    let (app, _f) = spawn(JwksSource::Url(url)).await;
    let now = app.clock.now();
    let stolen = idp.sign("idp-1", &claims(now, "s-w", "w1"));
    assert_eq!(
        verify(&app, &stolen, "81.2.69.142").await["decision"],
        "allow"
    );
    assert_eq!(
        verify(&app, &stolen, "81.2.69.142").await["decision"],
        "allow"
    );

    // The issuer rotates: idp-1 leaves the JWKS, idp-2 signs. The first idp-2 token
    // fetches the new set.
    idp.add_key("idp-2", KeyAlgorithm::EdDSA);
    idp.retire("idp-1");
    app.clock.advance(Duration::from_secs(31));
    let fresh = idp.sign("idp-2", &claims(app.clock.now(), "s-w2", "w2"));
    assert_eq!(
        verify(&app, &fresh, "81.2.69.142").await["decision"],
        "allow"
    );
    assert_eq!(idp.fetches.load(Ordering::SeqCst), 2);

    // The token verified (and cached) under idp-1 is refused now, not 15 minutes on.
    let v = verify(&app, &stolen, "81.2.69.142").await;
    assert_eq!(v["decision"], "invalid", "{v}");
    assert!(
        v["reasons"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("unknown_kid"),
        "{v}"
    );
    // Tokens of the keys still published verify as before.
    assert_eq!(
        verify(&app, &fresh, "81.2.69.142").await["decision"],
        "allow"
    );
}

#[tokio::test]
async fn what_another_issuer_may_not_do_is_refused() {
    let idp = Idp::new();
    let jwks = idp.dir.path().join("jwks.json");
    std::fs::write(&jwks, idp.jwks.lock().unwrap().to_string()).unwrap();
    let (app, _f) = spawn(JwksSource::File(jwks)).await;
    let now = app.clock.now();
    let ok = idp.sign("idp-1", &claims(now, "s", "j"));
    assert_eq!(
        verify(&app, &ok, "81.2.69.142").await["decision"],
        "allow",
        "from a JWKS file"
    );

    let code = |v: Value| {
        v["reasons"][0]["detail"]
            .as_str()
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .to_owned()
    };
    let mut wrong_aud = claims(now, "s", "j2");
    wrong_aud["aud"] = json!("someone-else");
    let v = verify(&app, &idp.sign("idp-1", &wrong_aud), "81.2.69.142").await;
    assert_eq!(code(v), "wrong_audience");

    let mut expired = claims(now - 3600, "s", "j3");
    expired["exp"] = json!(now - 600);
    let v = verify(&app, &idp.sign("idp-1", &expired), "81.2.69.142").await;
    assert_eq!(code(v), "expired");

    // HS256 with the issuer's public key as the secret: algorithm confusion.
    let public = serde_json::to_vec(&idp.jwks.lock().unwrap()["keys"][0]).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("idp-1".into());
    let confused = jsonwebtoken::encode(
        &header,
        &claims(now, "s", "j4"),
        &EncodingKey::from_secret(&public),
    )
    .unwrap();
    let v = verify(&app, &confused, "81.2.69.142").await;
    assert_eq!(code(v), "algorithm_not_allowed");

    // An issuer nobody configured.
    let mut stranger = claims(now, "s", "j5");
    stranger["iss"] = json!("https://evil.example");
    let v = verify(&app, &idp.sign("idp-1", &stranger), "81.2.69.142").await;
    assert_eq!(code(v), "unknown_kid");

    // No subject.
    let mut anonymous = claims(now, "s", "j6");
    anonymous.as_object_mut().unwrap().remove("sub");
    let v = verify(&app, &idp.sign("idp-1", &anonymous), "81.2.69.142").await;
    assert_eq!(code(v), "missing_claim");
}
