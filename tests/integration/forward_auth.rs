//! `/v1/forward-auth` as each gateway calls it (nginx, Traefik, Caddy, Envoy header
//! conventions), the cookie token source, configurable identity headers, the
//! redirect hints for browsers, and bad input at this edge.
//!
//! nginx and Caddy are also run for real in `gateway.rs`; Traefik and Envoy are
//! not installable here, so their conventions are checked at the HTTP level.

use std::path::PathBuf;
use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderValue};
use serde_json::{Value, json};

use crate::support::{Fixture, TestApp, USER_AGENT, s, settings};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

async fn app_with(edit: impl FnOnce(&mut tokenwarden::config::Settings)) -> (TestApp, Fixture) {
    let fixture = Fixture::sqlite().await;
    let mut config = settings(&fixture.db.url, &fixture.keys, "ed-1", fixture.data.path());
    config.geoip_city = Some(repo("tests/data/geoip/GeoIP2-City-Test.mmdb"));
    config.rules = Some(repo("rules/tests/fixtures/rate_and_referrer.toml"));
    config.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    edit(&mut config);
    (TestApp::spawn(config).await, fixture)
}

async fn open(app: &TestApp) -> Value {
    let r = app
        .post(
            "/v1/sessions",
            json!({"subject": "alice", "client": {"ip": "81.2.69.142", "user_agent": USER_AGENT}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

/// One gateway convention: how it says "this method on this path".
struct Convention {
    name: &'static str,
    /// Method and path of the call to tokenwarden, for a protected `method path`.
    call: fn(&str, &str) -> (reqwest::Method, String, HeaderMap),
}

fn nginx(method: &str, path: &str) -> (reqwest::Method, String, HeaderMap) {
    // auth_request always sends GET; the recipe passes the original in these headers.
    let h = headers(&[("x-original-uri", path), ("x-original-method", method)]);
    (reqwest::Method::GET, "/v1/forward-auth".into(), h)
}

fn traefik_or_caddy(method: &str, path: &str) -> (reqwest::Method, String, HeaderMap) {
    let h = headers(&[
        ("x-forwarded-method", method),
        ("x-forwarded-uri", path),
        ("x-forwarded-proto", "https"),
        ("x-forwarded-host", "app.example.com"),
    ]);
    (reqwest::Method::GET, "/v1/forward-auth".into(), h)
}

fn envoy(method: &str, path: &str) -> (reqwest::Method, String, HeaderMap) {
    // ext_authz HTTP service: the original method, the original path after `path_prefix`.
    (
        method.parse().unwrap(),
        format!("/v1/forward-auth{path}"),
        HeaderMap::new(),
    )
}

#[tokio::test]
async fn each_gateway_convention_reaches_the_path_scoped_rules() {
    let (app, _f) = app_with(|_| {}).await;
    for c in [
        Convention {
            name: "nginx",
            call: nginx,
        },
        Convention {
            name: "traefik/caddy",
            call: traefik_or_caddy,
        },
        Convention {
            name: "envoy",
            call: envoy,
        },
    ] {
        let session = open(&app).await;
        let token = s(&session, "access_token");
        let send = |method: &str, path: &str| {
            let (m, url, mut h) = (c.call)(method, path);
            h.insert("user-agent", HeaderValue::from_static(USER_AGENT));
            h.insert("x-forwarded-for", HeaderValue::from_static("81.2.69.142"));
            // The referrer rule watches /api/ only.
            h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
            app.http
                .request(m, app.url(&url))
                .headers(h)
                .bearer_auth(&token)
                .send()
        };
        let r = send("GET", "/home?tab=1").await.unwrap();
        assert_eq!(r.status(), 200, "{}: outside /api/", c.name);
        assert_eq!(r.headers()["x-auth-subject"], "alice", "{}", c.name);
        assert_eq!(
            r.headers()["x-auth-session"].to_str().unwrap(),
            s(&session, "session_id")
        );
        assert!(r.headers().contains_key("x-auth-risk"));
        let r = send("POST", "/api/orders").await.unwrap();
        assert_eq!(r.status(), 401, "{}: cross-site call to /api/", c.name);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["decision"], "step_up", "{}: {body}", c.name);
        assert_eq!(body["rules"], json!(["api_called_from_elsewhere"]));
    }
}

#[tokio::test]
async fn the_token_can_come_from_a_cookie_and_answers_name_the_pages_to_go_to() {
    let (app, _f) = app_with(|c| {
        c.forward_auth.cookie = Some("tw_at".into());
        c.forward_auth.subject_header = "x-user".into();
        c.forward_auth.reauth_url = Some("/reauth".into());
        c.forward_auth.login_url = Some("https://login.example.com/".into());
    })
    .await;
    let session = open(&app).await;
    let token = s(&session, "access_token");
    let gate = |cookie: Option<String>, path: &'static str, xff: &'static str| {
        let mut r = app
            .http
            .get(app.url("/v1/forward-auth"))
            .header("user-agent", USER_AGENT)
            .header("x-forwarded-for", xff)
            .header("x-original-uri", path);
        if let Some(c) = cookie {
            r = r.header("cookie", c);
        }
        r.send()
    };
    let r = gate(
        Some(format!("theme=dark; tw_at={token}")),
        "/",
        "81.2.69.142",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-user"], "alice");
    assert!(!r.headers().contains_key("x-auth-subject"));

    // No token: the sign-in page, with where the user was going.
    let r = gate(None, "/orders?id=7", "81.2.69.142").await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"tokenwarden\""
    );
    assert_eq!(
        r.headers()["x-auth-redirect"],
        "https://login.example.com/?next=/orders%3Fid%3D7"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["login_url"], "https://login.example.com/");

    // Stolen and used from the US three minutes later: the re-authentication page.
    app.clock.advance(Duration::from_secs(180));
    let r = gate(Some(format!("tw_at={token}")), "/orders", "216.160.83.56")
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-auth-redirect"], "/reauth?next=/orders");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["decision"].as_str(), body["reauth_url"].as_str()),
        (Some("step_up"), Some("/reauth"))
    );

    // Logged out: the token is dead, the browser goes to sign in.
    let r = app
        .http
        .delete(app.url(&format!("/v1/sessions/{}", s(&session, "session_id"))))
        .bearer_auth(crate::support::APP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = gate(Some(format!("tw_at={token}")), "/", "81.2.69.142")
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\"")
    );
    assert_eq!(
        r.headers()["x-auth-redirect"],
        "https://login.example.com/?next=/"
    );
}

/// What is sent, the headers, the status expected and a word the challenge must hold.
type EdgeCase = (
    &'static str,
    Vec<(&'static str, HeaderValue)>,
    u16,
    &'static str,
);

#[tokio::test]
async fn browser_navigations_can_be_redirected_by_tokenwarden_itself() {
    let (app, _f) = app_with(|c| {
        c.forward_auth.cookie = Some("tw_at".into());
        c.forward_auth.login_url = Some("/login".into());
        c.forward_auth.redirect_navigations = true;
    })
    .await;
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let ask = |mode: &'static str, method: &'static str| {
        http.get(app.url("/v1/forward-auth"))
            .header("x-forwarded-uri", "/orders")
            .header("x-forwarded-method", method)
            .header("sec-fetch-mode", mode)
            .send()
    };
    let r = ask("navigate", "GET").await.unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], "/login?next=/orders");
    assert_eq!(ask("cors", "GET").await.unwrap().status(), 401, "a script");
    assert_eq!(
        ask("navigate", "POST").await.unwrap().status(),
        401,
        "a form post is not replayed through a redirect"
    );
}

#[tokio::test]
async fn bad_input_at_the_edge_is_a_clear_400_or_401_never_a_500() {
    let (app, _f) = app_with(|c| c.forward_auth.cookie = Some("tw_at".into())).await;
    let session = open(&app).await;
    let token = s(&session, "access_token");
    let bearer = format!("Bearer {token}");
    let long = "x".repeat(5000);
    let huge_token = format!("Bearer {}", "a".repeat(16 * 1024));
    let cases: Vec<EdgeCase> = vec![
        (
            "two Authorization headers",
            vec![
                ("authorization", HeaderValue::from_str(&bearer).unwrap()),
                ("authorization", HeaderValue::from_static("Bearer other")),
            ],
            400,
            "invalid_request",
        ),
        (
            "two X-Original-URI headers",
            vec![
                ("authorization", HeaderValue::from_str(&bearer).unwrap()),
                ("x-original-uri", HeaderValue::from_static("/a")),
                ("x-original-uri", HeaderValue::from_static("/api/b")),
            ],
            400,
            "invalid_request",
        ),
        (
            "X-Original-URI and X-Forwarded-Uri that disagree",
            vec![
                ("authorization", HeaderValue::from_str(&bearer).unwrap()),
                ("x-forwarded-uri", HeaderValue::from_static("/api/orders")),
                ("x-original-uri", HeaderValue::from_static("/home")),
            ],
            400,
            "invalid_request",
        ),
        (
            "a bearer token and a different token cookie",
            vec![
                ("authorization", HeaderValue::from_str(&bearer).unwrap()),
                ("cookie", HeaderValue::from_static("tw_at=another")),
            ],
            400,
            "invalid_request",
        ),
        (
            "a Referer over 4 KiB",
            vec![
                ("authorization", HeaderValue::from_str(&bearer).unwrap()),
                ("referer", HeaderValue::from_str(&long).unwrap()),
            ],
            400,
            "invalid_request",
        ),
        (
            "a user agent that is not ASCII",
            vec![
                ("authorization", HeaderValue::from_str(&bearer).unwrap()),
                (
                    "user-agent",
                    HeaderValue::from_bytes(b"Mozilla \xff").unwrap(),
                ),
            ],
            400,
            "invalid_request",
        ),
        (
            "two different token cookies",
            vec![(
                "cookie",
                HeaderValue::from_str(&format!("tw_at={token}; tw_at=forged")).unwrap(),
            )],
            400,
            "invalid_request",
        ),
        (
            "an empty bearer",
            vec![("authorization", HeaderValue::from_static("Bearer "))],
            400,
            "invalid_request",
        ),
        (
            "garbage",
            vec![("authorization", HeaderValue::from_static("Bearer garbage"))],
            401,
            "invalid_token",
        ),
        (
            "three empty segments",
            vec![("authorization", HeaderValue::from_static("Bearer a.b.c"))],
            401,
            "invalid_token",
        ),
        (
            "a 16 KiB token",
            vec![("authorization", HeaderValue::from_str(&huge_token).unwrap())],
            401,
            "invalid_token",
        ),
        (
            "a garbage cookie",
            vec![("cookie", HeaderValue::from_static("tw_at=%00%ff"))],
            401,
            "invalid_token",
        ),
        ("nothing at all", vec![], 401, "realm"),
    ];
    for (what, pairs, status, challenge) in cases {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(k, v);
        }
        let r = app
            .http
            .get(app.url("/v1/forward-auth"))
            .headers(h)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), status, "{what}");
        let www = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
        assert!(www.contains(challenge), "{what}: {www}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["status"], status, "{what}: a problem body");
    }

    // Forwarding headers from a peer that is not a trusted proxy are not evidence.
    let (open_app, _g) = app_with(|c| c.trusted_proxies.clear()).await;
    let session = open(&open_app).await;
    open_app.clock.advance(Duration::from_secs(180));
    let r = open_app
        .http
        .get(open_app.url("/v1/forward-auth"))
        .bearer_auth(s(&session, "access_token"))
        .header("user-agent", USER_AGENT)
        .header("x-forwarded-for", "216.160.83.56")
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a spoofed far-away X-Forwarded-For from the socket peer itself is ignored"
    );

    // Headers far beyond any gateway's: the HTTP layer refuses them, the server lives on.
    let r = app
        .http
        .get(app.url("/v1/forward-auth"))
        .header("x-padding", "p".repeat(1024 * 1024))
        .send()
        .await;
    if let Ok(r) = r {
        assert!(r.status().is_client_error(), "{}", r.status());
    }
    let r = app
        .http
        .get(app.url("/v1/forward-auth"))
        .bearer_auth(&token)
        .header("user-agent", USER_AGENT)
        .header("x-forwarded-for", "81.2.69.142")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "still serving");
}
