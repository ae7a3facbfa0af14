//! Standard endpoints: RFC 7009 revocation, RFC 7662 introspection, and the JWKS.

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::AppState;
use super::error::ApiError;
use super::extract::{App, FormBody};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/oauth/revoke", post(revoke))
        .route("/oauth/introspect", post(introspect))
        .route("/.well-known/jwks.json", get(jwks))
}

#[derive(Deserialize)]
struct TokenForm {
    token: Option<String>,
    /// Accepted and ignored: the token's own shape tells us what it is.
    #[allow(dead_code)]
    token_type_hint: Option<String>,
}

impl TokenForm {
    fn token(&self) -> Result<&str, ApiError> {
        self.token
            .as_deref()
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::BadRequest("token: is required".into()))
    }
}

async fn revoke(
    _app: App,
    State(state): State<AppState>,
    FormBody(form): FormBody<TokenForm>,
) -> Result<impl IntoResponse, ApiError> {
    state.sessions.revoke_token(form.token()?).await?;
    Ok(StatusCode::OK)
}

async fn introspect(
    _app: App,
    State(state): State<AppState>,
    FormBody(form): FormBody<TokenForm>,
) -> Result<impl IntoResponse, ApiError> {
    let body = state.sessions.introspect(form.token()?).await?;
    let mut r = Json(body).into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

async fn jwks(State(state): State<AppState>) -> impl IntoResponse {
    let mut r = Json(state.sessions.codec().keys().jwks().clone()).into_response();
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    r
}
