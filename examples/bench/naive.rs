//! A common baseline, measured beside tokenwarden: a naive axum + jsonwebtoken
//! HS512 verifier. Every request's bearer token is decoded and its signature and
//! expiry checked, with no cache, no revocation, no session and no record; 200
//! with a small body, or 401.
//! `cargo run --release --example bench-naive -- PORT KEY_FILE`: the key file
//! `tokenwarden keys generate --alg HS512` writes, whose text (trimmed) is the
//! HMAC secret, as tokenwarden reads it.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::any;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
}

async fn verify(
    State(verifier): State<Arc<(DecodingKey, Validation)>>,
    headers: HeaderMap,
    _body: Bytes,
) -> (StatusCode, &'static str) {
    let (key, validation) = &*verifier;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token.map(|t| jsonwebtoken::decode::<Claims>(t, key, validation)) {
        Some(Ok(data)) if !data.claims.sub.is_empty() => {
            (StatusCode::OK, r#"{"decision":"allow"}"#)
        }
        _ => (StatusCode::UNAUTHORIZED, r#"{"decision":"deny"}"#),
    }
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(7001);
    let path = args.next().unwrap_or_else(|| "bench.key".into());
    let secret = std::fs::read(&path)?;
    let key = DecodingKey::from_secret(secret.trim_ascii());
    let mut validation = Validation::new(Algorithm::HS512);
    // Signature and expiry only.
    validation.validate_aud = false;
    let app = Router::new()
        .fallback(any(verify))
        .with_state(Arc::new((key, validation)));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    axum::serve(listener, app).await
}
