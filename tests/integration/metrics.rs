//! Metrics: every name the dashboards and alert rules use is exported by a running
//! server, histograms are histograms, and labels stay bounded.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::support::{ADMIN_TOKEN, APP_KEY, Fixture, TestApp, s, settings};

/// Every `tokenwarden_…` name in the dashboards and alert rules, without the
/// `_total`/`_bucket`/`_sum`/`_count` sample suffixes.
fn names_in_dashboards() -> BTreeSet<String> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let mut names = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("json" | "yml")
        ) {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for (i, _) in text.match_indices("tokenwarden_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let base = ["_total", "_bucket", "_sum", "_count"]
                .iter()
                .find_map(|sfx| name.strip_suffix(sfx))
                .unwrap_or(&name)
                .to_owned();
            names.insert(base);
        }
    }
    names
}

#[tokio::test]
async fn every_metric_the_dashboards_use_is_exported() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.geoip_city = Some(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/geoip/GeoIP2-City-Test.mmdb"),
    );
    let app = TestApp::spawn(config).await;
    let opened = app.open("alice").await;
    app.verify(&s(&opened, "access_token")).await;
    app.http
        .delete(app.url(&format!("/v1/sessions/{}", s(&opened, "session_id"))))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();

    let unauthenticated = app
        .http
        .get(format!("{}/metrics", app.admin))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    let r = app
        .http
        .get(format!("{}/metrics", app.admin))
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let text = r.text().await.unwrap();

    let names = names_in_dashboards();
    assert!(
        names.len() >= 10,
        "the dashboards use the metrics: {names:?}"
    );
    for name in &names {
        assert!(
            text.contains(&format!("# TYPE {name} ")),
            "{name} is used by a dashboard but not exported:\n{text}"
        );
    }
    assert!(text.contains("# TYPE tokenwarden_request_duration_seconds histogram"));
    assert!(
        text.contains(
            "tokenwarden_request_duration_seconds_bucket{le=\"0.001\",endpoint=\"verify\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("tokenwarden_requests_total{endpoint=\"verify\",decision=\"allow\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("tokenwarden_revocations_total{reason=\"logout\"} 1"),
        "{text}"
    );
    // Bounded labels: nothing about the user or the network.
    assert!(!text.contains("alice") && !text.contains("203.0.113.7"));
}
