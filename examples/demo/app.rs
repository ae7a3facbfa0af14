//! The demo web app: a sign-in page with a password, a few pages that nginx guards
//! with tokenwarden's forward-auth, and the re-authentication page that tells the
//! user why and asks for the password again.
//!
//! The app keeps no session of its own: the access token lives in an HttpOnly
//! cookie (`tw_at`) that nginx passes to `/v1/forward-auth`, and every page behind
//! nginx trusts the `X-Auth-Subject` header nginx copies from tokenwarden's answer.
//!
//! A demo, not a template: the sign-in and re-authentication pages read the session
//! id from the cookie's token without verifying it (the password decides), and
//! `GET /logout` has no CSRF protection. A real app verifies the token (or asks
//! tokenwarden) and signs out with a POST carrying a CSRF token.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::get;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

/// The cookie that carries the access token (`[forward_auth] cookie`).
pub const COOKIE: &str = "tw_at";

/// Demo accounts: (user, password).
pub const USERS: &[(&str, &str)] = &[("alice", "correct horse battery staple")];

#[derive(Clone)]
pub struct Demo {
    /// tokenwarden's public API, e.g. `http://127.0.0.1:8080`.
    pub tokenwarden: String,
    /// The app key this app calls the session API with.
    pub app_key: String,
    pub http: reqwest::Client,
}

pub fn router(demo: Demo) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/reauth", get(reauth_page).post(reauth))
        .route("/logout", get(logout))
        .route("/", get(page))
        .route("/account", get(page))
        .route("/orders", get(page))
        .with_state(Arc::new(demo))
}

#[derive(Deserialize)]
struct Next {
    next: Option<String>,
}

#[derive(Deserialize)]
struct Credentials {
    user: Option<String>,
    password: String,
    next: Option<String>,
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn encode(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// Only a path on this site: never an open redirect.
fn local(next: Option<&str>) -> String {
    match next {
        Some(p) if p.starts_with('/') && !p.starts_with("//") && !p.contains('\\') => p.into(),
        _ => "/".into(),
    }
}

fn layout(title: &str, body: &str) -> Html<String> {
    Html(format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title} · Demo Bank</title>
<style>body{{font-family:system-ui,sans-serif;max-width:40rem;margin:3rem auto;color:#1d2330}}
nav a{{margin-right:1rem}} .notice{{background:#fff4d6;border:1px solid #e0b84c;padding:1rem;border-radius:6px}}
label{{display:block;margin:.6rem 0}} input{{font-size:1rem;padding:.3rem}} button{{font-size:1rem;padding:.4rem 1rem}}
.error{{color:#a40000}} table{{border-collapse:collapse}} td,th{{padding:.2rem .8rem;border-bottom:1px solid #ddd;text-align:left}}</style>
</head><body><h1>Demo Bank</h1>{body}</body></html>"#,
        title = escape(title)
    ))
}

/// The client as nginx saw it: its address (the demo's nginx sets exactly one) and browser.
fn client(headers: &HeaderMap) -> Value {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    let ip = h("x-forwarded-for");
    let ip = ip.rsplit(',').next().unwrap_or("").trim().to_owned();
    json!({"ip": ip, "user_agent": h("user-agent")})
}

fn check_password(user: &str, password: &str) -> bool {
    let mut ok = false;
    for (u, p) in USERS {
        let same = u.as_bytes().ct_eq(user.as_bytes()) & p.as_bytes().ct_eq(password.as_bytes());
        ok |= bool::from(same);
    }
    ok
}

fn token_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// The session id inside the access token. Unverified on purpose: it only says
/// which session to ask tokenwarden about; the password decides the rest.
fn session_of(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let sid = claims["sid"].as_str()?;
    uuid::Uuid::try_parse(sid).ok().map(|_| sid.to_owned())
}

fn with_token(mut r: Response, token: &str) -> Response {
    if let Ok(v) =
        HeaderValue::from_str(&format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax"))
    {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

fn failure(status: StatusCode, what: &str) -> Response {
    (
        status,
        layout("Error", &format!("<p class=error>{}</p>", escape(what))),
    )
        .into_response()
}

async fn login_page(Query(q): Query<Next>) -> Html<String> {
    login_form(&local(q.next.as_deref()), None)
}

fn login_form(next: &str, error: Option<&str>) -> Html<String> {
    let error = error
        .map(|e| format!("<p class=error>{}</p>", escape(e)))
        .unwrap_or_default();
    layout(
        "Sign in",
        &format!(
            r#"<h2>Sign in</h2>{error}<form method="post" action="/login">
<input type="hidden" name="next" value="{next}">
<label>User <input name="user" id="user" value="alice" autocomplete="username"></label>
<label>Password <input name="password" id="password" type="password" autocomplete="current-password"></label>
<button id="sign-in" type="submit">Sign in</button></form>
<p><small>Demo account: alice / correct horse battery staple</small></p>"#,
            next = escape(next)
        ),
    )
}

async fn login(
    State(demo): State<Arc<Demo>>,
    headers: HeaderMap,
    Form(c): Form<Credentials>,
) -> Response {
    let next = local(c.next.as_deref());
    let user = c.user.unwrap_or_default();
    if !check_password(&user, &c.password) {
        return (
            StatusCode::UNAUTHORIZED,
            login_form(&next, Some("Wrong user or password.")),
        )
            .into_response();
    }
    let opened = demo
        .http
        .post(format!("{}/v1/sessions", demo.tokenwarden))
        .bearer_auth(&demo.app_key)
        .json(&json!({"subject": user, "client": client(&headers), "amr": ["pwd"]}))
        .send()
        .await;
    let body: Value = match opened {
        Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
        _ => {
            return failure(
                StatusCode::BAD_GATEWAY,
                "The sign-in service did not answer.",
            );
        }
    };
    match body["access_token"].as_str() {
        Some(token) => with_token(Redirect::to(&next).into_response(), token),
        None => failure(
            StatusCode::BAD_GATEWAY,
            "The sign-in service did not answer.",
        ),
    }
}

/// What tokenwarden knows of the cookie's session.
async fn session(demo: &Demo, headers: &HeaderMap) -> Option<(String, Value)> {
    let sid = session_of(&token_cookie(headers)?)?;
    let r = demo
        .http
        .get(format!("{}/v1/sessions/{sid}", demo.tokenwarden))
        .bearer_auth(&demo.app_key)
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    Some((sid, r.json().await.ok()?))
}

async fn reauth_page(
    State(demo): State<Arc<Demo>>,
    headers: HeaderMap,
    Query(q): Query<Next>,
) -> Response {
    let next = local(q.next.as_deref());
    let Some((_, s)) = session(&demo, &headers).await else {
        return Redirect::to(&format!("/login?next={}", encode(&next))).into_response();
    };
    reauth_form(&s, &next, None).into_response()
}

fn reauth_form(s: &Value, next: &str, error: Option<&str>) -> Html<String> {
    let why = s["step_up_message"]
        .as_str()
        .unwrap_or("For your security, please confirm it's you.");
    let error = error
        .map(|e| format!("<p class=error>{}</p>", escape(e)))
        .unwrap_or_default();
    layout(
        "Confirm it's you",
        &format!(
            r#"<h2>Confirm it's you</h2><p class="notice" id="why">{why}</p>{error}
<form method="post" action="/reauth"><input type="hidden" name="next" value="{next}">
<p>Signed in as <b>{user}</b>.</p>
<label>Password <input name="password" id="password" type="password" autocomplete="current-password"></label>
<button id="confirm" type="submit">Confirm</button></form>
<p><small>If that wasn't you, confirm anyway: the copy of your session the other party holds stops working the moment you do. Or <a href="/logout">sign out</a>.</small></p>"#,
            why = escape(why),
            user = escape(s["subject"].as_str().unwrap_or("")),
            next = escape(next),
        ),
    )
}

async fn reauth(
    State(demo): State<Arc<Demo>>,
    headers: HeaderMap,
    Form(c): Form<Credentials>,
) -> Response {
    let next = local(c.next.as_deref());
    let Some((sid, s)) = session(&demo, &headers).await else {
        return Redirect::to("/login").into_response();
    };
    let subject = s["subject"].as_str().unwrap_or("");
    if !check_password(subject, &c.password) {
        return (
            StatusCode::UNAUTHORIZED,
            reauth_form(&s, &next, Some("Wrong password.")),
        )
            .into_response();
    }
    let done = demo
        .http
        .post(format!("{}/v1/sessions/{sid}/reauth", demo.tokenwarden))
        .bearer_auth(&demo.app_key)
        .json(&json!({"client": client(&headers)}))
        .send()
        .await;
    let body: Value = match done {
        Ok(r) if r.status().is_success() => r.json().await.unwrap_or_default(),
        // Revoked meanwhile: a full sign-in.
        _ => return Redirect::to(&format!("/login?next={}", encode(&next))).into_response(),
    };
    match body["access_token"].as_str() {
        Some(token) => with_token(Redirect::to(&next).into_response(), token),
        None => failure(
            StatusCode::BAD_GATEWAY,
            "The sign-in service did not answer.",
        ),
    }
}

async fn logout(State(demo): State<Arc<Demo>>, headers: HeaderMap) -> Response {
    if let Some(sid) = token_cookie(&headers).as_deref().and_then(session_of) {
        let _ = demo
            .http
            .delete(format!("{}/v1/sessions/{sid}", demo.tokenwarden))
            .bearer_auth(&demo.app_key)
            .send()
            .await;
    }
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tw_at=; Path=/; HttpOnly; SameSite=Lax; Max-Age=0"),
    );
    r
}

/// A page behind nginx: tokenwarden said who it is.
async fn page(State(demo): State<Arc<Demo>>, uri: axum::http::Uri, headers: HeaderMap) -> Response {
    let Some(user) = headers
        .get("x-auth-subject")
        .and_then(|v| v.to_str().ok())
        .filter(|u| !u.is_empty())
    else {
        return failure(
            StatusCode::UNAUTHORIZED,
            "This page is served behind nginx and tokenwarden only.",
        );
    };
    let nav = r#"<nav><a href="/">Home</a><a href="/account">Account</a><a href="/orders">Orders</a><a href="/logout">Sign out</a></nav>"#;
    let content = match uri.path() {
        "/account" => {
            let sessions: Value = match demo
                .http
                .get(format!("{}/v1/users/{user}/sessions", demo.tokenwarden))
                .bearer_auth(&demo.app_key)
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or_default(),
                Err(_) => Value::Null,
            };
            let rows: String = sessions["sessions"]
                .as_array()
                .map(|list| {
                    list.iter()
                        .filter(|s| s["state"] != "revoked")
                        .map(|s| {
                            format!(
                                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                                escape(s["device"].as_str().unwrap_or("")),
                                escape(s["location"]["city"].as_str().unwrap_or("?")),
                                escape(s["last_seen_at"].as_str().unwrap_or("")),
                                escape(s["state"].as_str().unwrap_or("")),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!(
                "<h2 id=title>Your account</h2><p>Where you are signed in:</p>\
                 <table><tr><th>Device</th><th>City</th><th>Last seen</th><th>State</th></tr>{rows}</table>"
            )
        }
        "/orders" => "<h2 id=title>Orders</h2><ul><li>#1041 · 2 books · shipped</li><li>#1042 · 1 lamp · on its way</li></ul>".into(),
        _ => "<h2 id=title>Home</h2><p>Your balance: 1,024.00 EUR</p>".into(),
    };
    layout(
        "Demo Bank",
        &format!(
            "{nav}<p id=who>Signed in as <b>{}</b></p>{content}",
            escape(user)
        ),
    )
    .into_response()
}
