//! Replay and explain: a crafted file where the answer is known, determinism,
//! bad input reported by line, and a round trip through a running server.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tokenwarden::enrich::UaParser;
use tokenwarden::replay::{OnError, ReplayContext, replay};
use tokenwarden::risk::RuleSet;

use crate::support::{ADMIN_TOKEN, Fixture, TestApp, USER_AGENT, s, settings};

fn repo(p: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(p)
}

fn ua() -> &'static UaParser {
    static UA: std::sync::OnceLock<UaParser> = std::sync::OnceLock::new();
    UA.get_or_init(|| UaParser::new().unwrap())
}

fn cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tokenwarden"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

#[test]
fn the_diff_against_recorded_decisions_is_right_on_a_crafted_file() {
    let input = std::fs::read(repo("tests/data/replay/stolen_token.ndjson")).unwrap();
    let rules = RuleSet::load(&repo("rules/default.toml")).unwrap();
    let mut emitted = Vec::new();
    let report = replay(
        &input[..],
        rules,
        None,
        ReplayContext {
            ua: ua(),
            geo: None,
            on_error: OnError::Stop,
        },
        Some(&mut emitted),
        |_| {},
    )
    .unwrap();
    assert_eq!((report.events, report.scored, report.changed), (6, 4, 2));
    assert_eq!(report.decisions["allow"], (4, 2));
    assert_eq!(report.decisions["step_up"], (0, 1));
    assert_eq!(report.decisions["revoke"], (0, 1));
    assert_eq!(report.newly_revoked.len(), 1);
    let alice = &report.newly_revoked[0];
    assert_eq!(
        (
            alice.session_id.as_str(),
            alice.baseline.as_str(),
            alice.candidate.as_str()
        ),
        ("s-alice", "allow", "revoke")
    );
    assert_eq!(
        alice.samples.iter().map(|s| s.line).collect::<Vec<_>>(),
        [3, 4]
    );
    assert!(report.newly_stepped_up.is_empty() && report.no_longer_revoked.is_empty());
    // Twice: the second Lagos request is still measured from Oslo, the last request let through.
    assert_eq!(report.rules["impossible_travel"].candidate_fires, 2);
    assert_eq!(report.rules["country_changed"].candidate_fires, 2);
    assert_eq!(report.rules["country_changed"].baseline_fires, 0);

    // --emit: every event, with the candidate's decision where it was scored.
    let emitted: Vec<Value> = String::from_utf8(emitted)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(emitted.len(), 6);
    assert_eq!(emitted[2]["decision"], "step_up");
    assert_eq!(emitted[3]["decision"], "revoke");
    assert!(emitted[3]["session_risk"].as_f64().unwrap() >= 90.0);
}

#[test]
fn a_baseline_rule_file_is_compared_rule_for_rule() {
    let input = std::fs::read(repo("tests/data/replay/stolen_token.ndjson")).unwrap();
    let candidate = RuleSet::load(&repo("rules/strict.toml")).unwrap();
    let baseline = RuleSet::load(&repo("rules/default.toml")).unwrap();
    let report = replay(
        &input[..],
        candidate,
        Some(baseline),
        ReplayContext {
            ua: ua(),
            geo: None,
            on_error: OnError::Stop,
        },
        None,
        |_| {},
    )
    .unwrap();
    assert_eq!(
        report.decisions["revoke"].0, 1,
        "default revokes alice on the fourth event"
    );
    assert!(
        report.rules.contains_key("new_network_for_user"),
        "a strict-only rule: {:?}",
        report.rules.keys()
    );
    assert_eq!(report.rules["new_network_for_user"].baseline_fires, 0);
}

#[test]
fn replay_output_is_byte_identical_run_after_run() {
    let args = [
        "replay",
        "--rules",
        "rules/strict.toml",
        "--baseline",
        "rules/default.toml",
        "tests/data/replay/stolen_token.ndjson",
    ];
    let (a, b) = (cli(&args), cli(&args));
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    assert_eq!(a.stdout, b.stdout);
    let mut json_args = args.to_vec();
    json_args.splice(1..1, ["--format", "json"]);
    let (a, b) = (cli(&json_args), cli(&json_args));
    assert_eq!(a.stdout, b.stdout);
    let report: Value = serde_json::from_slice(&a.stdout).unwrap();
    assert_eq!(report["events"], 6);
}

#[test]
fn bad_lines_are_reported_with_their_number_and_stop_or_skip_as_asked() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(repo("tests/data/replay/stolen_token.ndjson")).unwrap();
    let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
    lines.insert(2, "{not json".to_owned());
    lines.insert(
        4,
        r#"{"ts": "2026-03-02T09:10:30Z", "kind": "request", "colour": "blue"}"#.to_owned(),
    );
    lines.insert(
        5,
        r#"{"ts": "2026-03-01T00:00:00Z", "kind": "request", "session_id": "s-alice"}"#.to_owned(),
    );
    let path = dir.path().join("bad.ndjson");
    std::fs::write(&path, lines.join("\n")).unwrap();
    let out = cli(&[
        "replay",
        "--rules",
        "rules/default.toml",
        path.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.ndjson:3:"), "{err}");
    let out = cli(&[
        "replay",
        "--skip-bad-lines",
        "--format",
        "json",
        "--rules",
        "rules/default.toml",
        path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let bad: Vec<(u64, String)> = report["bad_lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["line"].as_u64().unwrap(),
                b["message"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        bad.iter().map(|b| b.0).collect::<Vec<_>>(),
        [3, 5, 6],
        "{bad:?}"
    );
    assert!(bad[1].1.contains("colour"), "{bad:?}");
    assert!(bad[2].1.contains("backwards"), "{bad:?}");
    assert_eq!(report["events"], 6, "the good lines were all replayed");
}

#[test]
fn explain_shows_every_rule_and_why_the_decision_was_made() {
    let out = cli(&[
        "rules",
        "explain",
        "--rules",
        "rules/default.toml",
        "--line",
        "3",
        "tests/data/replay/stolen_token.ndjson",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("bound to: ip 198.51.100.10"), "{text}");
    let travel = text
        .lines()
        .find(|l| l.trim_start().starts_with("impossible_travel "))
        .unwrap();
    assert!(
        travel.contains("FIRED") && travel.contains("45"),
        "{travel}"
    );
    let browser = text
        .lines()
        .find(|l| l.trim_start().starts_with("browser_changed"))
        .unwrap();
    assert!(browser.contains("did not fire"), "{browser}");
    assert!(text.contains("decision: step_up"), "{text}");
    let rules = RuleSet::load(&repo("rules/default.toml")).unwrap();
    for rule in &rules.rules {
        assert!(
            text.contains(&rule.id),
            "{} missing from the explanation",
            rule.id
        );
    }
}

#[tokio::test]
async fn events_exported_from_a_running_server_replay_to_the_same_decisions() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let mut config = settings(&db.url, &keys, "ed-1", data.path());
    config.geoip_city = Some(repo("tests/data/geoip/GeoIP2-City-Test.mmdb"));
    config.rules = Some(repo("rules/default.toml"));
    let app = TestApp::spawn(config).await;
    let verify = |token: String, ip: &'static str| {
        let app = &app;
        async move {
            app.post(
                "/v1/verify",
                serde_json::json!({"token": token, "request": {"ip": ip, "user_agent": USER_AGENT, "method": "GET", "path": "/"}}),
            )
            .await
        }
    };
    let mut decisions = Vec::new();
    for (subject, first, second) in [
        ("alice", "81.2.69.142", "216.160.83.56"),
        ("bob", "81.2.69.142", "81.2.69.160"),
    ] {
        let opened: Value = app
            .post("/v1/sessions", serde_json::json!({"subject": subject, "client": {"ip": first, "user_agent": USER_AGENT}}))
            .await
            .json()
            .await
            .unwrap();
        let token = s(&opened, "access_token");
        for ip in [first, second, second] {
            app.clock.advance(Duration::from_secs(60));
            let v: Value = verify(token.clone(), ip).await.json().await.unwrap();
            decisions.push(v["decision"].as_str().unwrap().to_owned());
        }
    }
    assert!(
        decisions.iter().any(|d| d != "allow"),
        "the traffic exercises the rules: {decisions:?}"
    );
    // Wait (bounded) for the writer, then export: 2 opens, 6 requests, 1 revocation by the rules.
    let start = std::time::Instant::now();
    let export = loop {
        let text = app
            .http
            .get(format!("{}/admin/events?limit=1000", app.admin))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.lines().count() >= 9 {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "events not written: {text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let rules = RuleSet::load(&repo("rules/default.toml")).unwrap();
    let report = replay(
        export.as_bytes(),
        rules,
        None,
        ReplayContext {
            ua: ua(),
            geo: None,
            on_error: OnError::Stop,
        },
        None,
        |_| {},
    )
    .unwrap();
    assert!(report.bad_lines.is_empty());
    assert_eq!(report.scored, 6, "{report:?}");
    assert_eq!(
        report.changed,
        0,
        "the same rules replay to the same decisions: {}",
        report.render()
    );
}
