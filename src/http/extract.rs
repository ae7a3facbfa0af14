//! Extractors that validate at the edge: app and admin credentials, and JSON or
//! form bodies whose rejections become our own problem answers.

use axum::extract::rejection::{FormRejection, JsonRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode, header};
use serde::de::DeserializeOwned;
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::ApiError;
use crate::config::sha256;

/// The app that called, authenticated by `Authorization: Bearer <app key>`.
#[derive(Debug, Clone)]
pub struct App {
    pub id: String,
}

/// The credential of an `Authorization: Bearer …` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim())
        .filter(|t| !t.is_empty())
}

impl FromRequestParts<AppState> for App {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = bearer(&parts.headers).ok_or(ApiError::Unauthorized)?;
        let presented = sha256(key.as_bytes());
        // Compare against every app without stopping early, in constant time.
        let mut found = None;
        for app in state.apps.iter() {
            if bool::from(app.key_sha256.ct_eq(&presented)) {
                found = Some(app.id.clone());
            }
        }
        found.map(|id| App { id }).ok_or(ApiError::Unauthorized)
    }
}

/// `axum::Json`, with malformed bodies answered as 400 problem details.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let text = r.body_text();
    match r.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::BadRequest("the body is too large".into()),
        _ => ApiError::BadRequest(text),
    }
}

/// `axum::Form` (for the OAuth endpoints), with rejections as 400 problem details.
pub struct FormBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for FormBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match axum::Form::<T>::from_request(req, state).await {
            Ok(axum::Form(v)) => Ok(Self(v)),
            Err(r) => Err(form_rejection(r)),
        }
    }
}

fn form_rejection(r: FormRejection) -> ApiError {
    ApiError::BadRequest(r.body_text())
}
