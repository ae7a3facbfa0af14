//! The HTTP contract, end to end against the real server.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{APP_KEY, Backend, Fixture, Keys, TestApp, client, database, s, settings};

async fn spawn(
    backend: Backend,
    signing_kid: &str,
) -> Option<(TestApp, Keys, crate::support::TestDb, tempfile::TempDir)> {
    let db = database(backend).await?;
    let keys = Keys::all();
    let data = tempfile::tempdir().unwrap();
    let app = TestApp::spawn(settings(&db.url, &keys, signing_kid, data.path())).await;
    Some((app, keys, db, data))
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Sqlite).await })*
        }
        mod postgres {
            $(#[tokio::test] async fn $name() { super::$name(super::Backend::Postgres).await })*
        }
    };
}

on_both!(
    the_whole_lifecycle_and_refresh_reuse_kills_the_session,
    logging_out_everywhere_kills_every_token_of_that_user_only,
    revocations_survive_a_restart,
);

async fn the_whole_lifecycle_and_refresh_reuse_kills_the_session(backend: Backend) {
    let Some((app, _keys, _db, _data)) = spawn(backend, "ed-1").await else {
        return;
    };
    let opened = app.open("alice").await;
    assert_eq!(opened["token_type"], "Bearer");
    assert_eq!(opened["expires_in"], 300);
    let access1 = s(&opened, "access_token");
    let refresh1 = s(&opened, "refresh_token");
    let v = app.verify(&access1).await;
    assert_eq!(v["decision"], "allow", "{v}");
    assert_eq!(v["subject"], "alice");
    assert_eq!(v["session_id"], opened["session_id"]);

    app.clock.advance(Duration::from_secs(60));
    let r = app.refresh(&refresh1).await;
    assert_eq!(r.status(), 200);
    let rotated: Value = r.json().await.unwrap();
    let access2 = s(&rotated, "access_token");
    let refresh2 = s(&rotated, "refresh_token");
    assert_ne!(
        refresh1, refresh2,
        "every refresh returns a new refresh token"
    );
    assert_eq!(rotated["session_id"], opened["session_id"]);
    assert_eq!(app.verify(&access2).await["decision"], "allow");

    // The thief replays the old refresh token after the grace window.
    app.clock.advance(Duration::from_secs(11));
    let r = app.refresh(&refresh1).await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], "invalid_grant");
    assert_eq!(body["reason"], "refresh_token_reused");

    for token in [&access1, &access2] {
        let v = app.verify(token).await;
        assert_eq!(v["decision"], "revoke", "{v}");
        assert_eq!(v["reasons"][0]["detail"], "session_revoked");
    }
    assert_eq!(
        app.refresh(&refresh2).await.status(),
        401,
        "the victim's copy is dead too"
    );

    let r = app
        .http
        .get(app.url("/v1/users/alice/sessions"))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    let listed: Value = r.json().await.unwrap();
    assert_eq!(listed["sessions"][0]["state"], "revoked");
    assert_eq!(listed["sessions"][0]["revoked_reason"], "refresh_reuse");
    assert_eq!(listed["sessions"][0]["ip"], "203.0.113.7");
}

async fn logging_out_everywhere_kills_every_token_of_that_user_only(backend: Backend) {
    let Some((app, _keys, _db, _data)) = spawn(backend, "es-1").await else {
        return;
    };
    let a1 = app.open("alice").await;
    let a2 = app.open("alice").await;
    let b1 = app.open("bob").await;
    let r = app
        .http
        .delete(app.url("/v1/users/alice/sessions"))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap(), json!({"revoked": 2}));
    for opened in [&a1, &a2] {
        let v = app.verify(&s(opened, "access_token")).await;
        assert_eq!(v["decision"], "revoke");
        assert_eq!(app.refresh(&s(opened, "refresh_token")).await.status(), 401);
    }
    assert_eq!(
        app.verify(&s(&b1, "access_token")).await["decision"],
        "allow"
    );
    // Signing in again afterwards works.
    let a3 = app.open("alice").await;
    assert_eq!(
        app.verify(&s(&a3, "access_token")).await["decision"],
        "allow"
    );
}

async fn revocations_survive_a_restart(backend: Backend) {
    let Some((app, _keys, _db, _data)) = spawn(backend, "hs-1").await else {
        return;
    };
    let logged_out = app.open("alice").await;
    let jti_revoked = app.open("bob").await;
    let everywhere = app.open("carol").await;
    let untouched = app.open("dave").await;
    let r = app
        .http
        .delete(app.url(&format!("/v1/sessions/{}", s(&logged_out, "session_id"))))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let r = app
        .http
        .post(app.url("/oauth/revoke"))
        .bearer_auth(APP_KEY)
        .form(&[("token", s(&jti_revoked, "access_token"))])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = app
        .http
        .delete(app.url("/v1/users/carol/sessions"))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let app = app.restart().await;
    for (opened, detail) in [
        (&logged_out, "session_revoked"),
        (&jti_revoked, "token_revoked"),
        (&everywhere, "user_sessions_revoked"),
    ] {
        let v = app.verify(&s(opened, "access_token")).await;
        assert_eq!(v["decision"], "revoke", "{v}");
        assert_eq!(v["reasons"][0]["detail"], detail);
    }
    assert_eq!(
        app.verify(&s(&untouched, "access_token")).await["decision"],
        "allow"
    );
    // Only the access token was revoked for bob: his session goes on.
    assert_eq!(
        app.refresh(&s(&jti_revoked, "refresh_token"))
            .await
            .status(),
        200
    );
}

#[tokio::test]
async fn logging_out_one_session_is_idempotent_and_validates_the_id() {
    let Some((app, _keys, _db, _data)) = spawn(Backend::Sqlite, "ed-1").await else {
        return;
    };
    let opened = app.open("alice").await;
    let other = app.open("alice").await;
    let url = app.url(&format!("/v1/sessions/{}", s(&opened, "session_id")));
    for _ in 0..2 {
        let r = app
            .http
            .delete(&url)
            .bearer_auth(APP_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 204);
    }
    assert_eq!(
        app.verify(&s(&opened, "access_token")).await["decision"],
        "revoke"
    );
    assert_eq!(
        app.verify(&s(&other, "access_token")).await["decision"],
        "allow"
    );
    let r = app
        .http
        .delete(app.url("/v1/sessions/00000000-0000-4000-8000-000000000000"))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = app
        .http
        .delete(app.url("/v1/sessions/not-a-session"))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn reauth_issues_fresh_tokens_and_kills_every_earlier_one() {
    let Some((app, _keys, _db, _data)) = spawn(Backend::Sqlite, "ed-1").await else {
        return;
    };
    let opened = app.open("alice").await;
    let id = s(&opened, "session_id");
    app.clock.advance(Duration::from_secs(30));
    let r = app
        .post(
            &format!("/v1/sessions/{id}/reauth"),
            json!({"client": {"ip": "198.51.100.20", "user_agent": crate::support::USER_AGENT}}),
        )
        .await;
    assert_eq!(r.status(), 200);
    let fresh: Value = r.json().await.unwrap();
    assert_eq!(fresh["session_id"], opened["session_id"]);
    let v = app.verify(&s(&opened, "access_token")).await;
    assert_eq!(v["decision"], "revoke");
    assert_eq!(v["reasons"][0]["detail"], "session_reauthenticated");
    let r = app.refresh(&s(&opened, "refresh_token")).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.json::<Value>().await.unwrap()["reason"],
        "superseded_by_reauth"
    );
    assert_eq!(
        app.verify(&s(&fresh, "access_token")).await["decision"],
        "allow"
    );
    assert_eq!(app.refresh(&s(&fresh, "refresh_token")).await.status(), 200);

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
    assert_eq!(
        listed["sessions"][0]["ip"], "198.51.100.20",
        "re-bound to the new client"
    );

    // A revoked session cannot be re-authenticated.
    app.http
        .delete(app.url(&format!("/v1/sessions/{id}")))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    let r = app
        .post(
            &format!("/v1/sessions/{id}/reauth"),
            json!({"client": client()}),
        )
        .await;
    assert_eq!(r.status(), 409);
}

#[tokio::test]
async fn the_session_and_verify_apis_require_an_app_key() {
    let Some((app, _keys, _db, _data)) = spawn(Backend::Sqlite, "ed-1").await else {
        return;
    };
    for key in [None, Some("wrong-key-wrong-key-wrong-key-wrong-key")] {
        let mut req = app
            .http
            .post(app.url("/v1/sessions"))
            .json(&json!({"subject": "alice", "client": client()}));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401);
        assert!(
            r.headers()["www-authenticate"]
                .to_str()
                .unwrap()
                .starts_with("Bearer")
        );
    }
    // The admin API has its own credential: the app key does not open it.
    let r = app
        .http
        .get(format!("{}/admin/status", app.admin))
        .bearer_auth(APP_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .http
        .get(format!("{}/admin/status", app.admin))
        .bearer_auth(crate::support::ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn malformed_input_gets_a_400_problem_naming_the_field() {
    let Some((app, _keys, _db, _data)) = spawn(Backend::Sqlite, "ed-1").await else {
        return;
    };
    let cases = [
        (json!({"subject": "alice"}), "client"),
        (json!({"subject": "", "client": client()}), "subject"),
        (
            json!({"subject": "alice", "client": {"ip": "999.1.1.1"}}),
            "client.ip",
        ),
        (
            json!({"subject": "alice", "client": client(), "claims": {"sub": "root"}}),
            "claims",
        ),
        (
            json!({"subject": "alice", "client": client(), "colour": "blue"}),
            "colour",
        ),
    ];
    for (body, field) in cases {
        let r = app.post("/v1/sessions", body.clone()).await;
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(r.headers()["content-type"], "application/problem+json");
        let problem: Value = r.json().await.unwrap();
        assert!(
            problem["detail"].as_str().unwrap().contains(field),
            "{problem}"
        );
    }
    let r = app
        .http
        .post(app.url("/v1/verify"))
        .bearer_auth(APP_KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let r = app
        .post(
            "/v1/verify",
            json!({"token": "x", "request": {"ip": "nope"}}),
        )
        .await;
    assert_eq!(r.status(), 400);
    let r = app
        .post(
            "/v1/sessions/refresh",
            json!({"refresh_token": "garbage", "client": client()}),
        )
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.json::<Value>().await.unwrap()["reason"], "malformed");
    let r = app
        .http
        .post(app.url("/oauth/introspect"))
        .bearer_auth(APP_KEY)
        .form(&[("nothing", "here")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[tokio::test]
async fn bodies_over_64_kib_are_refused_whatever_the_route() {
    let Some((app, _keys, _db, _data)) = spawn(Backend::Sqlite, "hs-1").await else {
        return;
    };
    let too_large = |field: &str| json!({ field: "x".repeat(65 * 1024) });
    for (path, field) in [
        ("/v1/verify", "token"),
        ("/v1/sessions", "subject"),
        ("/v1/sessions/refresh", "refresh_token"),
    ] {
        let r = app.post(path, too_large(field)).await;
        assert_eq!(r.status(), 400, "{path}");
        let problem: Value = r.json().await.unwrap();
        assert_eq!(
            problem["detail"], "the body is too large",
            "{path}: {problem}"
        );
    }
    // Just under the limit, a body is read and judged for what it holds.
    let r = app
        .post("/v1/verify", json!({"token": "x".repeat(63 * 1024)}))
        .await;
    assert_eq!(r.status(), 200);
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["decision"], "invalid", "{v}");
}

#[tokio::test]
async fn introspection_and_rfc7009_revocation_follow_the_rfcs() {
    let Some((app, _keys, _db, _data)) = spawn(Backend::Sqlite, "es-1").await else {
        return;
    };
    let opened = app.open("alice").await;
    let introspect = |token: String| {
        let app = &app;
        async move {
            app.http
                .post(app.url("/oauth/introspect"))
                .bearer_auth(APP_KEY)
                .form(&[("token", token)])
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let a = introspect(s(&opened, "access_token")).await;
    assert_eq!(
        (
            a["active"].clone(),
            a["sub"].clone(),
            a["token_type"].clone()
        ),
        (json!(true), json!("alice"), json!("access_token"))
    );
    let r = introspect(s(&opened, "refresh_token")).await;
    assert_eq!(
        (r["active"].clone(), r["token_type"].clone()),
        (json!(true), json!("refresh_token"))
    );
    assert_eq!(introspect("garbage".into()).await, json!({"active": false}));

    // Revoking the refresh token ends the session, so its access tokens die too.
    let r = app
        .http
        .post(app.url("/oauth/revoke"))
        .bearer_auth(APP_KEY)
        .form(&[
            ("token", s(&opened, "refresh_token")),
            ("token_type_hint", "refresh_token".into()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        introspect(s(&opened, "access_token")).await,
        json!({"active": false})
    );
    assert_eq!(
        introspect(s(&opened, "refresh_token")).await,
        json!({"active": false})
    );
    // Unknown tokens are not an error (RFC 7009 §2.2).
    let r = app
        .http
        .post(app.url("/oauth/revoke"))
        .bearer_auth(APP_KEY)
        .form(&[("token", "twr_unknownunknown")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn signing_keys_rotate_without_logging_anyone_out() {
    let Fixture { db, keys, data } = Fixture::sqlite().await;
    let mut app = TestApp::spawn(settings(&db.url, &keys, "es-1", data.path())).await;
    let before = app.open("alice").await;
    let jwks: Value = app
        .http
        .get(app.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let kids: Vec<&str> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(
        kids.len(),
        2,
        "ES256 and EdDSA public keys, never the HS512 secret: {jwks}"
    );
    assert!(kids.contains(&"es-1") && kids.contains(&"ed-1"));

    app.stop().await;
    let app = TestApp::spawn_with_clock(
        settings(&db.url, &keys, "ed-1", data.path()),
        app.clock.clone(),
    )
    .await;
    assert_eq!(
        app.verify(&s(&before, "access_token")).await["decision"],
        "allow"
    );
    let after = app.open("alice").await;
    let header = s(&after, "access_token")
        .split('.')
        .next()
        .unwrap()
        .to_owned();
    let header: Value = serde_json::from_slice(
        &base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header).unwrap(),
    )
    .unwrap();
    assert_eq!(
        header,
        json!({"alg": "EdDSA", "kid": "ed-1", "typ": "at+jwt"})
    );
}

#[tokio::test]
async fn with_no_configuration_it_generates_a_private_dev_key_once() {
    let data = tempfile::tempdir().unwrap();
    let env: std::collections::BTreeMap<String, String> = [
        ("TOKENWARDEN_DATA_DIR", data.path().to_str().unwrap()),
        ("TOKENWARDEN_LISTEN", "127.0.0.1:0"),
        ("TOKENWARDEN_ADMIN_LISTEN", "127.0.0.1:0"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let settings = tokenwarden::config::Settings::resolve(Default::default(), &env).unwrap();
    assert!(settings.database_url.starts_with("sqlite://"));
    let mut app = TestApp::spawn(settings.clone()).await;
    let key = data.path().join("keys/dev-eddsa.pem");
    let hash = data.path().join("dev-app-key.sha256");
    use std::os::unix::fs::PermissionsExt;
    for f in [&key, &hash] {
        assert_eq!(
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777,
            0o600,
            "{}",
            f.display()
        );
    }
    assert!(data.path().join("tokenwarden.db").exists());
    let first_key = std::fs::read(&key).unwrap();
    let first_hash = std::fs::read(&hash).unwrap();
    app.stop().await;
    let _app = TestApp::spawn(settings).await;
    assert_eq!(
        std::fs::read(&key).unwrap(),
        first_key,
        "reused, not regenerated"
    );
    assert_eq!(std::fs::read(&hash).unwrap(), first_hash);
}
