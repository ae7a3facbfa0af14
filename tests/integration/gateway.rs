//! tokenwarden behind a real nginx (Debian `nginx-light`, `auth_request`), in
//! front of a tiny upstream, on loopback ports.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{Backend, Keys, TestApp, USER_AGENT, database, s, settings};

struct Nginx(Child);

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx_binary() -> Option<&'static str> {
    ["/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/bin/nginx"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `examples/gateways/nginx.conf`, the README's recipe, filled in.
fn nginx_conf(port: u16, tokenwarden: SocketAddr, upstream: SocketAddr, dir: &Path) -> String {
    let recipe =
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/gateways/nginx.conf");
    std::fs::read_to_string(recipe)
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

#[tokio::test]
async fn behind_real_nginx_the_decisions_reach_the_client_as_the_gateway_should_answer() {
    let Some(nginx) = nginx_binary() else {
        if std::env::var_os("TOKENWARDEN_TEST_REQUIRE_NGINX").is_some() {
            panic!("nginx is required in CI (Debian nginx-light): .ci/run installs it");
        }
        eprintln!(
            "\n*** SKIPPED: nginx gateway test; nginx is not installed (apt-get install nginx-light).\n"
        );
        return;
    };
    let Some(db) = database(Backend::Sqlite).await else {
        return;
    };
    let keys = Keys::all();
    let data = tempfile::tempdir().unwrap();
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.geoip_city = Some(
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/data/geoip/GeoIP2-City-Test.mmdb"),
    );
    config.rules = Some(data.path().join("rules.toml"));
    std::fs::write(
        config.rules.as_ref().unwrap(),
        std::fs::read_to_string(std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules/default.toml")).unwrap()
            + "\n[[rule]]\nid = \"burst\"\naction = \"deny\"\nrate = { key = \"sid\", limit = 3, per = \"10s\", burst = 3 }\n",
    )
    .unwrap();
    config.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let app = TestApp::spawn(config).await;
    let tw: SocketAddr = app.base.trim_start_matches("http://").parse().unwrap();
    let up = upstream().await;
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("nginx.conf");
    std::fs::write(&conf, nginx_conf(port, tw, up, dir.path())).unwrap();
    let _nginx = Nginx(
        Command::new(nginx)
            .args(["-e", "stderr", "-p"])
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .args(["-g", "daemon off;"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx"),
    );
    let gate = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let start = Instant::now();
    while http.get(format!("{gate}/")).send().await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "nginx did not start"
        );
        tokio::task::yield_now().await;
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

    // The same token from far away (through the trusted proxy's header): step-up challenge.
    app.clock.advance(Duration::from_secs(120));
    let r = get(token.clone(), "216.160.83.56").await;
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.contains("error=\"insufficient_user_authentication\"")
            && challenge.contains("max_age=0"),
        "{challenge}"
    );

    // A rate burst on another session: 429 with Retry-After, through nginx.
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
