//! Audit events: recorded for every decision, exported as NDJSON, never a raw
//! token, and never in the way of verification.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::{
    ADMIN_TOKEN, APP_KEY, Backend, Fixture, Keys, TestApp, USER_AGENT, database, s, settings,
};

async fn admin_get(app: &TestApp, path: &str) -> reqwest::Response {
    app.http
        .get(format!("{}{path}", app.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap()
}

/// Waits (bounded) until every queued event is written.
async fn settled(app: &TestApp) -> Value {
    let start = Instant::now();
    loop {
        let status: Value = admin_get(app, "/admin/status").await.json().await.unwrap();
        if status["events"]["queued"] == 0 {
            let lines = admin_get(app, "/admin/events?limit=100000")
                .await
                .text()
                .await
                .unwrap();
            let n = lines.lines().count() as u64;
            if Some(n) == status["events"]["written"].as_u64() {
                return status;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "events never settled: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_decision_is_recorded_and_exported_without_a_raw_token() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let app = TestApp::spawn(settings(&db.url, &keys, "ed-1", data.path())).await;
    let opened = app.open("alice").await;
    let (access, refresh) = (s(&opened, "access_token"), s(&opened, "refresh_token"));
    app.verify(&access).await;
    app.verify("garbage").await;
    app.clock.advance(Duration::from_secs(30));
    let rotated: Value = app.refresh(&refresh).await.json().await.unwrap();
    app.http
        .delete(app.url(&format!("/v1/sessions/{}", s(&opened, "session_id"))))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    settled(&app).await;

    let r = admin_get(&app, "/admin/events?subject=alice").await;
    assert_eq!(r.headers()["content-type"], "application/x-ndjson");
    let text = r.text().await.unwrap();
    for secret in [
        &access,
        &refresh,
        &s(&rotated, "access_token"),
        &s(&rotated, "refresh_token"),
    ] {
        assert!(
            !text.contains(secret.as_str()),
            "a raw token reached the audit log"
        );
    }
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["session_open", "request", "refresh", "revoke"]);
    let request = &events[1];
    assert_eq!(request["decision"], "allow");
    assert_eq!(request["user_agent"], USER_AGENT);
    assert_eq!(request["ua_fingerprint"], "Firefox/133/Linux/desktop");
    assert!(
        request["rules_hash"]
            .as_str()
            .is_some_and(|h| h.len() == 16)
    );
    assert_eq!(events[3]["detail"], "logout");
    assert!(
        events
            .windows(2)
            .all(|w| w[0]["ts"].as_str() <= w[1]["ts"].as_str())
    );

    // The invalid token is recorded too, without a subject; filters work.
    let invalid = admin_get(&app, "/admin/events?decision=invalid")
        .await
        .text()
        .await
        .unwrap();
    let invalid: Value = serde_json::from_str(invalid.lines().next().unwrap()).unwrap();
    assert!(invalid["detail"].as_str().unwrap().starts_with("malformed"));
    let none = admin_get(&app, "/admin/events?since=2099-01-01T00:00:00Z")
        .await
        .text()
        .await
        .unwrap();
    assert!(none.is_empty());
    assert_eq!(
        admin_get(&app, "/admin/events?since=yesterday")
            .await
            .status(),
        400
    );
    let r = app
        .http
        .get(format!("{}/admin/events", app.admin))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the app key does not open the admin API");
}

#[tokio::test]
async fn the_live_stream_carries_each_event_as_it_happens() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let app = TestApp::spawn(settings(&db.url, &keys, "ed-1", data.path())).await;
    let mut stream = admin_get(&app, "/admin/events/stream").await;
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    app.open("carol").await;
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk())
            .await
            .expect("an event within 10 s")
            .unwrap()
            .expect("stream open");
        text.push_str(&String::from_utf8_lossy(&chunk));
    }
    let data = text
        .lines()
        .find_map(|l| l.strip_prefix("data: "))
        .expect("a data line");
    let event: Value = serde_json::from_str(data).unwrap();
    assert_eq!(
        (event["kind"].as_str(), event["subject"].as_str()),
        (Some("session_open"), Some("carol"))
    );
}

#[tokio::test]
async fn a_stalled_database_never_blocks_verification_and_drops_are_counted() {
    let Some(db) = database(Backend::Postgres).await else {
        return;
    };
    let keys = Keys::all();
    let data = tempfile::tempdir().unwrap();
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.events.queue = 4;
    let app = TestApp::spawn(config).await;
    let opened = app.open("bob").await;
    let token = s(&opened, "access_token");
    app.verify(&token).await;
    settled(&app).await;

    // Another session holds the events table: every insert waits.
    use sqlx::Connection;
    let mut blocker = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut blocker).await.unwrap();
    sqlx::query("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        .execute(&mut blocker)
        .await
        .unwrap();

    // While the lock is held, an insert never finishes: if a verification waited on
    // the event writer, it would hang here (and time out) instead of answering.
    for _ in 0..50 {
        let r = app
            .post(
                "/v1/verify",
                json!({"token": token, "request": {"ip": "203.0.113.7", "user_agent": USER_AGENT}}),
            )
            .await;
        assert_eq!(r.status(), 200);
    }
    let status: Value = admin_get(&app, "/admin/status").await.json().await.unwrap();
    assert!(
        status["events"]["dropped_queue_full"].as_u64().unwrap() >= 40,
        "{status}"
    );

    sqlx::query("ROLLBACK").execute(&mut blocker).await.unwrap();
    let start = Instant::now();
    loop {
        let status: Value = admin_get(&app, "/admin/status").await.json().await.unwrap();
        if status["events"]["queued"] == 0 && status["events"]["written"].as_u64() >= Some(6) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the writer never resumed: {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
