//! The risk engine end to end: real GeoIP databases (MaxMind's test data and
//! databases written here), the shipped rule files, over HTTP.

use std::path::PathBuf;
use std::time::Duration;

use mmdb_writer::IpVersion;
use serde_json::{Value, json};

use crate::enrich::{asn_record, geoip2_city, install, net, writer};
use crate::support::{APP_KEY, Backend, Fixture, Keys, TestApp, USER_AGENT, database, s, settings};

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

async fn verify_from(app: &TestApp, token: &str, ip: &str) -> Value {
    let r = app
        .post(
            "/v1/verify",
            json!({"token": token, "request": {"ip": ip, "user_agent": USER_AGENT, "method": "GET", "path": "/account"}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

async fn open_from(app: &TestApp, subject: &str, ip: &str) -> Value {
    let r = app
        .post(
            "/v1/sessions",
            json!({"subject": subject, "client": {"ip": ip, "user_agent": USER_AGENT}}),
        )
        .await;
    assert_eq!(r.status(), 201);
    r.json().await.unwrap()
}

#[tokio::test]
async fn a_token_replayed_from_another_continent_is_stepped_up_then_revoked() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.geoip_city = Some(repo("tests/data/geoip/GeoIP2-City-Test.mmdb"));
    config.geoip_asn = Some(repo("tests/data/geoip/GeoLite2-ASN-Test.mmdb"));
    config.rules = Some(repo("rules/default.toml"));
    let app = TestApp::spawn(config).await;

    let london = "81.2.69.142";
    let milton_us = "216.160.83.56";
    let opened = open_from(&app, "alice", london).await;
    let token = s(&opened, "access_token");
    assert_eq!(verify_from(&app, &token, london).await["decision"], "allow");

    // Within the access token's five minutes, as a thief replaying it would be.
    app.clock.advance(Duration::from_secs(3 * 60));
    let v = verify_from(&app, &token, milton_us).await;
    assert_eq!(v["decision"], "step_up", "{v}");
    let fired: Vec<&str> = v["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert!(
        fired.contains(&"impossible_travel") && fired.contains(&"country_changed"),
        "{fired:?}"
    );
    let message = v["user_message"].as_str().unwrap();
    assert!(
        message.contains("Milton") && message.contains("London"),
        "{message}"
    );

    // The gateway sees an RFC 9470 challenge; the legitimate user at home is stepped up too.
    let r = app
        .http
        .get(app.url("/v1/forward-auth"))
        .bearer_auth(&token)
        .header("user-agent", USER_AGENT)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let challenge = r.headers()["www-authenticate"].to_str().unwrap().to_owned();
    assert!(
        challenge.contains("error=\"insufficient_user_authentication\"")
            && challenge.contains("max_age=0"),
        "{challenge}"
    );
    let body: Value = r.json().await.unwrap();
    assert!(body["user_message"].as_str().is_some());

    app.clock.advance(Duration::from_secs(60));
    let v = verify_from(&app, &token, milton_us).await;
    assert_eq!(v["decision"], "revoke", "{v}");
    // Durable before the answer: after a restart the token is still refused.
    let app = app.restart().await;
    let v = verify_from(&app, &token, london).await;
    assert_eq!(
        (v["decision"].as_str(), v["reasons"][0]["detail"].as_str()),
        (Some("revoke"), Some("session_revoked"))
    );
    let listed: Value = app
        .http
        .get(app.url("/v1/users/alice/sessions"))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let reason = listed["sessions"][0]["revoked_reason"].as_str().unwrap();
    assert!(
        reason.starts_with("risk: ") && reason.contains("country_changed"),
        "{reason}"
    );
}

#[tokio::test]
async fn the_owner_is_told_why_and_reauth_closes_the_door_on_the_thief() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.geoip_city = Some(repo("tests/data/geoip/GeoIP2-City-Test.mmdb"));
    config.geoip_asn = Some(repo("tests/data/geoip/GeoLite2-ASN-Test.mmdb"));
    config.rules = Some(repo("rules/default.toml"));
    let app = TestApp::spawn(config).await;
    let (london, milton_us) = ("81.2.69.142", "216.160.83.56");
    let opened = open_from(&app, "alice", london).await;
    let (token, refresh) = (s(&opened, "access_token"), s(&opened, "refresh_token"));
    let id = s(&opened, "session_id");
    assert_eq!(verify_from(&app, &token, london).await["decision"], "allow");

    app.clock.advance(Duration::from_secs(3 * 60));
    let thief = verify_from(&app, &token, milton_us).await;
    assert_eq!(thief["decision"], "step_up", "{thief}");
    let why = thief["user_message"].as_str().unwrap().to_owned();

    // The owner, still in London: asked to confirm, told the same honest reason. The
    // thief's refused request is not where the owner "was", so no travel is counted.
    app.clock.advance(Duration::from_secs(60));
    let owner = verify_from(&app, &token, london).await;
    assert_eq!(owner["decision"], "step_up", "{owner}");
    assert_eq!(owner["user_message"], why.as_str());
    assert_eq!(owner["score"], 0, "{owner}");

    // The app's re-authentication page can read why.
    let shown: Value = app
        .http
        .get(app.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (shown["state"].as_str(), shown["step_up_message"].as_str()),
        (Some("step_up"), Some(why.as_str()))
    );

    let r = app
        .post(
            &format!("/v1/sessions/{id}/reauth"),
            json!({"client": {"ip": london, "user_agent": USER_AGENT}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let fresh: Value = r.json().await.unwrap();
    assert_eq!(
        verify_from(&app, &s(&fresh, "access_token"), london).await["decision"],
        "allow"
    );
    // Everything the session had before is dead: the thief's copy of both tokens.
    let v = verify_from(&app, &token, milton_us).await;
    assert_eq!(v["decision"], "revoke", "{v}");
    let r = app
        .post(
            "/v1/sessions/refresh",
            json!({"refresh_token": refresh, "client": {"ip": milton_us, "user_agent": USER_AGENT}}),
        )
        .await;
    assert_eq!(r.status(), 401);
    let shown: Value = app
        .http
        .get(app.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["step_up_message"], Value::Null);
}

#[tokio::test]
async fn step_up_survives_a_restart_and_reauth_clears_it() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.geoip_city = Some(repo("tests/data/geoip/GeoIP2-City-Test.mmdb"));
    // Only the flag can step this session up: one rule, and no threshold to accumulate to.
    let rules = data.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[thresholds]\nstep_up = 40\n[[rule]]\nid = \"country_changed\"\npoints = 50\nip_binding = { tier = \"country\" }\n",
    )
    .unwrap();
    config.rules = Some(rules);
    let app = TestApp::spawn(config).await;
    let opened = open_from(&app, "alice", "81.2.69.142").await;
    let token = s(&opened, "access_token");
    app.clock.advance(Duration::from_secs(180));
    let v = verify_from(&app, &token, "216.160.83.56").await;
    assert_eq!(v["decision"], "step_up", "{v}");
    let app = app.restart().await;
    assert_eq!(
        verify_from(&app, &token, "81.2.69.142").await["decision"],
        "step_up",
        "the flag is durable"
    );
    let r = app
        .post(
            &format!("/v1/sessions/{}/reauth", s(&opened, "session_id")),
            json!({"client": {"ip": "81.2.69.142", "user_agent": USER_AGENT}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let fresh: Value = r.json().await.unwrap();
    assert_eq!(
        verify_from(&app, &s(&fresh, "access_token"), "81.2.69.142").await["decision"],
        "allow"
    );
}

#[tokio::test]
async fn moving_from_home_wifi_to_the_mobile_carrier_in_the_same_city_is_allowed() {
    let Some(db) = database(Backend::Sqlite).await else {
        return;
    };
    let geo = tempfile::tempdir().unwrap();
    let mut city = writer("GeoIP2-City", IpVersion::V6);
    city.insert_value(
        net("192.0.2.0/24"),
        geoip2_city("NO", "Oslo", 59.9139, 10.7522, 10),
    )
    .unwrap();
    city.insert_value(
        net("198.51.100.0/24"),
        geoip2_city("NO", "Oslo", 59.95, 10.80, 100),
    )
    .unwrap();
    install(&city, &geo.path().join("city.mmdb"));
    let mut asn = writer("GeoLite2-ASN", IpVersion::V6);
    asn.insert_value(net("192.0.2.0/24"), asn_record(64_500, "Home Fibre"))
        .unwrap();
    asn.insert_value(net("198.51.100.0/24"), asn_record(64_501, "Mobile Carrier"))
        .unwrap();
    install(&asn, &geo.path().join("asn.mmdb"));

    let keys = Keys::all();
    let data = tempfile::tempdir().unwrap();
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.geoip_city = Some(geo.path().join("city.mmdb"));
    config.geoip_asn = Some(geo.path().join("asn.mmdb"));
    let app = TestApp::spawn(config).await;
    let opened = open_from(&app, "bob", "192.0.2.10").await;
    let token = s(&opened, "access_token");
    for (minutes, ip) in [
        (1, "192.0.2.10"),
        (1, "198.51.100.23"),
        (1, "198.51.100.99"),
        (1, "192.0.2.10"),
    ] {
        app.clock.advance(Duration::from_secs(60 * minutes));
        let v = verify_from(&app, &token, ip).await;
        assert_eq!(v["decision"], "allow", "{ip}: {v}");
    }
}

#[tokio::test]
async fn a_burst_over_the_rate_rule_is_denied_with_retry_after() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.rules = Some(repo("rules/tests/fixtures/rate_and_referrer.toml"));
    let app = TestApp::spawn(config).await;
    let opened = open_from(&app, "carol", "192.0.2.10").await;
    let token = s(&opened, "access_token");
    for _ in 0..5 {
        assert_eq!(
            verify_from(&app, &token, "192.0.2.10").await["decision"],
            "allow"
        );
    }
    let v = verify_from(&app, &token, "192.0.2.10").await;
    assert_eq!(v["decision"], "deny", "{v}");
    assert_eq!(v["retry_after"], 2);
    assert_eq!(v["user_message"], "Too many requests: try again in 2 s.");
    let r = app
        .http
        .get(app.url("/v1/forward-auth"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "2");
    app.clock.advance(Duration::from_secs(2));
    assert_eq!(
        verify_from(&app, &token, "192.0.2.10").await["decision"],
        "allow"
    );
}

async fn ready(app: &TestApp) -> Value {
    app.http
        .get(app.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn an_edited_rule_file_is_reloaded_and_a_broken_one_is_refused() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let rules_dir = tempfile::tempdir().unwrap();
    let path = rules_dir.path().join("rules.toml");
    std::fs::write(&path, "[thresholds]\nstep_up = 40\n").unwrap();
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.rules = Some(path.clone());
    let app = TestApp::spawn(config).await;
    let first = ready(&app).await["rules"]["hash"]
        .as_str()
        .unwrap()
        .to_owned();

    // Editors write a new file and rename it over the old one.
    let replace = |text: &str| {
        let tmp = rules_dir.path().join(".rules.toml.swp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    };
    replace(
        "[thresholds]\nstep_up = 40\n\n[[rule]]\nid = \"x\"\npoints = 5\nua_binding = { colour = 1 }\n",
    );
    let status = wait_for(&app, |r| !r["rules"]["last_error"].is_null()).await;
    assert_eq!(
        status["rules"]["hash"],
        first.as_str(),
        "the previous rules keep serving"
    );
    let error = status["rules"]["last_error"].as_str().unwrap();
    assert!(
        error.contains("rules.toml:7:") && error.contains("colour"),
        "{error}"
    );

    replace("[thresholds]\nstep_up = 30\n");
    let status = wait_for(&app, |r| r["rules"]["hash"] != first.as_str()).await;
    assert!(status["rules"]["last_error"].is_null());
}

/// Polls `/readyz` until the condition holds; file events arrive asynchronously.
async fn wait_for(app: &TestApp, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let r = ready(app).await;
        if cond(&r) {
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "condition not reached: {r}"
        );
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_shipped_rule_cases_pass_through_the_real_cli() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["rules", "test", "rules/tests"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(" 0 failed"), "{stdout}");
    let check = std::process::Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["rules", "check", "rules/default.toml", "rules/strict.toml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(check.status.success());
}

#[test]
fn a_broken_rule_file_is_reported_with_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[thresholds]\nstep_up = 40\n\n[[rule]]\nid = \"a\"\npoints = 5\nip_binding = { tier = \"planet\" }\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(["rules", "check"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{}:7:", path.display())) && stdout.contains("planet"),
        "{stdout}"
    );
}

#[tokio::test]
async fn forward_auth_believes_forwarding_headers_only_from_trusted_proxies() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.geoip_city = Some(repo("tests/data/geoip/GeoIP2-City-Test.mmdb"));
    config.trusted_proxies = vec!["127.0.0.1/32".parse().unwrap()];
    let app = TestApp::spawn(config).await;
    let opened = open_from(&app, "alice", "81.2.69.142").await;
    let token = s(&opened, "access_token");
    let gate = |xff: &'static str| {
        let app = &app;
        let token = token.clone();
        async move {
            app.http
                .get(app.url("/v1/forward-auth"))
                .bearer_auth(token)
                .header("user-agent", USER_AGENT)
                .header("x-forwarded-for", xff)
                .send()
                .await
                .unwrap()
        }
    };
    // The client spoofs London on the left; the proxy appended the real address.
    app.clock.advance(Duration::from_secs(60));
    let r = gate("81.2.69.142").await;
    assert_eq!(r.status(), 200);
    app.clock.advance(Duration::from_secs(60));
    let r = gate("81.2.69.142, 216.160.83.56").await;
    assert_eq!(r.status(), 401);
    assert!(
        r.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_user_authentication")
    );
    let body: Value = r.json().await.unwrap();
    assert!(
        body.get("reasons").is_none(),
        "the token holder does not learn the victim's binding: {body}"
    );
    assert!(
        body["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "impossible_travel"),
        "{body}"
    );
}

#[tokio::test]
async fn forward_auth_refuses_peers_outside_the_trusted_proxy_list() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.trusted_proxies = vec!["10.0.0.0/8".parse().unwrap()];
    let app = TestApp::spawn(config).await;
    let opened = open_from(&app, "alice", "192.0.2.1").await;
    let r = app
        .http
        .get(app.url("/v1/forward-auth"))
        .bearer_auth(s(&opened, "access_token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn the_admin_api_shows_and_reloads_the_rules() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let path = data.path().join("rules.toml");
    std::fs::write(
        &path,
        "[thresholds]\nstep_up = 40\n[[rule]]\nid = \"a\"\npoints = 5\nua_binding = {}\n",
    )
    .unwrap();
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.rules = Some(path.clone());
    let app = TestApp::spawn(config).await;
    let admin = |method: reqwest::Method, p: &'static str| {
        app.http
            .request(method, format!("{}{p}", app.admin))
            .bearer_auth(crate::support::ADMIN_TOKEN)
    };
    let shown: Value = admin(reqwest::Method::GET, "/admin/rules")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["rules"]["rules"][0]["id"], "a");
    // Written in place (no watcher event needed): the reload endpoint picks it up.
    std::fs::write(
        &path,
        "[thresholds]\nstep_up = 40\n[[rule]]\nid = \"b\"\npoints = 7\nua_binding = {}\n",
    )
    .unwrap();
    let r: Value = admin(reqwest::Method::POST, "/admin/rules/reload")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(r["result"] == "loaded" || r["result"] == "unchanged", "{r}");
    let shown: Value = admin(reqwest::Method::GET, "/admin/rules")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(shown["rules"]["rules"][0]["id"], "b");
    std::fs::write(&path, "[[rule]]\nid = \"c\"\npoints = 1\n").unwrap();
    let r = admin(reqwest::Method::POST, "/admin/rules/reload")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["detail"].as_str().unwrap().contains("rules.toml:1:1"),
        "{body}"
    );
    let shown: Value = admin(reqwest::Method::GET, "/admin/rules")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        shown["rules"]["rules"][0]["id"], "b",
        "the previous rules stay"
    );
}
