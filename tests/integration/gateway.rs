//! tokenwarden behind real gateways — nginx (`auth_request`, Debian `nginx-light`)
//! and Caddy (`forward_auth`, Debian `caddy`) — in front of a tiny upstream, on
//! loopback ports, each running the recipe shipped in `examples/gateways/`.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Fixture, KillOnDrop, TestApp, USER_AGENT, free_port, s, settings};

/// A recipe from `examples/gateways/`, filled in.
fn recipe(
    name: &str,
    port: u16,
    tokenwarden: SocketAddr,
    upstream: SocketAddr,
    dir: &Path,
) -> String {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("examples/gateways")
        .join(name);
    std::fs::read_to_string(path)
        .unwrap()
        .replace("@PORT@", &port.to_string())
        .replace("@TOKENWARDEN@", &tokenwarden.to_string())
        .replace("@UPSTREAM@", &upstream.to_string())
        .replace("@DIR@", &dir.display().to_string())
}

async fn upstream() -> SocketAddr {
    use axum::http::HeaderMap;
    let app = axum::Router::new().fallback(|headers: HeaderMap| async move {
        let h = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned()
        };
        axum::Json(
            serde_json::json!({"subject": h("x-auth-subject"), "session": h("x-auth-session")}),
        )
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Gateway {
    Nginx,
    Caddy,
}

#[tokio::test]
async fn behind_real_nginx_the_decisions_reach_the_client_as_the_gateway_should_answer() {
    behind(Gateway::Nginx).await;
}

#[tokio::test]
async fn behind_real_caddy_the_decisions_reach_the_client_as_the_gateway_should_answer() {
    behind(Gateway::Caddy).await;
}

async fn behind(gateway: Gateway) {
    let (candidates, package): (&[&str], &str) = match gateway {
        Gateway::Nginx => (&["/usr/sbin/nginx", "/usr/local/sbin/nginx"], "nginx-light"),
        Gateway::Caddy => (&["/usr/bin/caddy", "/usr/local/bin/caddy"], "caddy"),
    };
    let Some(program) = candidates.iter().copied().find(|p| Path::new(p).exists()) else {
        if std::env::var_os("TOKENWARDEN_TEST_REQUIRE_GATEWAYS").is_some() {
            panic!("{gateway:?} is required in CI (Debian {package}): .ci/run installs it");
        }
        eprintln!(
            "\n*** SKIPPED: {gateway:?} gateway test; it is not installed (apt-get install {package}).\n"
        );
        return;
    };
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let repo = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.geoip_city = Some(repo.join("tests/data/geoip/GeoIP2-City-Test.mmdb"));
    let rules = data.path().join("rules.toml");
    std::fs::write(
        &rules,
        std::fs::read_to_string(repo.join("rules/default.toml")).unwrap()
            + "\n[[rule]]\nid = \"burst\"\naction = \"deny\"\nrate = { key = \"sid\", limit = 3, per = \"10s\", burst = 3 }\n",
    )
    .unwrap();
    config.rules = Some(rules);
    config.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    config.forward_auth.reauth_url = Some("/reauth".into());
    config.forward_auth.login_url = Some("/login".into());
    // Caddy passes tokenwarden's answer on as it is, so tokenwarden can redirect
    // browsers itself; nginx's auth_request cannot (its recipe does it instead).
    config.forward_auth.redirect_navigations = gateway == Gateway::Caddy;
    let app = TestApp::spawn(config).await;
    let tw: SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();
    let up = upstream().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut command = match gateway {
        Gateway::Nginx => {
            let conf = dir.path().join("nginx.conf");
            std::fs::write(&conf, recipe("nginx.conf", port, tw, up, dir.path())).unwrap();
            let mut c = Command::new(program);
            c.args(["-e", "stderr", "-p"])
                .arg(dir.path())
                .arg("-c")
                .arg(&conf)
                .args(["-g", "daemon off;"]);
            c
        }
        Gateway::Caddy => {
            let conf = dir.path().join("Caddyfile");
            std::fs::write(&conf, recipe("Caddyfile", port, tw, up, dir.path())).unwrap();
            let mut c = Command::new(program);
            c.arg("run")
                .arg("--config")
                .arg(&conf)
                .args(["--adapter", "caddyfile"])
                .env("HOME", dir.path())
                .env("XDG_DATA_HOME", dir.path())
                .env("XDG_CONFIG_HOME", dir.path());
            c
        }
    };
    let _proxy = KillOnDrop(
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {gateway:?}: {e}")),
    );
    let gate = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let start = Instant::now();
    while http.get(format!("{gate}/")).send().await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nginx did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let opened: Value = app
        .post("/v1/sessions", serde_json::json!({"subject": "alice", "client": {"ip": "81.2.69.142", "user_agent": USER_AGENT}}))
        .await
        .json()
        .await
        .unwrap();
    let token = s(&opened, "access_token");
    let get = |token: String, xff: &'static str| {
        let http = http.clone();
        let url = format!("{gate}/account?tab=1");
        async move {
            http.get(url)
                .bearer_auth(token)
                .header("user-agent", USER_AGENT)
                .header("x-forwarded-for", xff)
                .send()
                .await
                .unwrap()
        }
    };

    // A valid token: the upstream is reached with the identity headers.
    let r = get(token.clone(), "81.2.69.142").await;
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["subject"].as_str(), body["session"].as_str()),
        (Some("alice"), opened["session_id"].as_str())
    );

    // A tampered token: 401 with the invalid_token challenge.
    let mut tampered = token.clone().into_bytes();
    let n = tampered.len() - 10;
    tampered[n] = if tampered[n] == b'A' { b'B' } else { b'A' };
    let r = get(String::from_utf8(tampered).unwrap(), "81.2.69.142").await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("error=\"invalid_token\"")
    );

    // The same token from far away: step-up challenge. nginx appends to the client's
    // X-Forwarded-For, so the test sets the far address there. Debian's Caddy 2.6
    // replaces it with the connecting address (the safe default, and too old for
    // `trusted_proxies`), so there the copied token shows up in another browser.
    app.clock.advance(Duration::from_secs(120));
    let r = match gateway {
        Gateway::Nginx => get(token.clone(), "216.160.83.56").await,
        Gateway::Caddy => {
            let other_browser = |token: String| {
                let http = http.clone();
                let url = format!("{gate}/account");
                async move {
                    http.get(url)
                        .bearer_auth(token)
                        .header("user-agent", "python-requests/2.32.3")
                        .send()
                        .await
                        .unwrap()
                }
            };
            assert_eq!(
                other_browser(token.clone()).await.status(),
                200,
                "30 points: not yet"
            );
            other_browser(token.clone()).await
        }
    };
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers().get_all("www-authenticate").iter().count(),
        1,
        "one challenge"
    );
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.contains("error=\"insufficient_user_authentication\"")
            && challenge.contains("max_age=0"),
        "{challenge}"
    );
    let page = match gateway {
        Gateway::Nginx => "/reauth?next=/account%3Ftab%3D1",
        Gateway::Caddy => "/reauth?next=/account",
    };
    assert_eq!(
        r.headers()["x-auth-redirect"],
        page,
        "{gateway:?}: the page for a script to send the browser to"
    );

    // A browser navigation without a token goes to the sign-in page: behind Caddy
    // tokenwarden's own 302 comes through.
    if gateway == Gateway::Caddy {
        let r = http
            .get(format!("{gate}/orders"))
            .header("sec-fetch-mode", "navigate")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 302);
        assert_eq!(r.headers()["location"], "/login?next=/orders");
    }

    // nginx sends a browser navigation to that page itself: the owner, at home,
    // is asked to confirm (the thief's next request would be revoked outright).
    if gateway == Gateway::Nginx {
        let r = http
            .get(format!("{gate}/account?tab=1"))
            .bearer_auth(&token)
            .header("user-agent", USER_AGENT)
            .header("sec-fetch-mode", "navigate")
            .header("x-forwarded-for", "81.2.69.142")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 302);
        let location = r.headers()["location"].to_str().unwrap();
        assert!(
            location.ends_with("/reauth?next=/account%3Ftab%3D1"),
            "{location}"
        );
        let r = http
            .get(format!("{gate}/orders"))
            .header("sec-fetch-mode", "navigate")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 302, "no token");
        let location = r.headers()["location"].to_str().unwrap();
        assert!(
            location.ends_with("/login?next=/orders"),
            "no token: the sign-in page, not {location}"
        );
        // Bad input stays a 400 instead of nginx's 500.
        let r = http
            .get(format!("{gate}/account"))
            .bearer_auth(&token)
            .header("referer", "r".repeat(5000))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
    }

    // A rate burst on another session: 429 with Retry-After, through the gateway.
    let other: Value = app
        .post("/v1/sessions", serde_json::json!({"subject": "bob", "client": {"ip": "81.2.69.142", "user_agent": USER_AGENT}}))
        .await
        .json()
        .await
        .unwrap();
    let token = s(&other, "access_token");
    for _ in 0..3 {
        assert_eq!(get(token.clone(), "81.2.69.142").await.status(), 200);
    }
    let r = get(token, "81.2.69.142").await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
}
