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
    pub id: std::sync::Arc<str>,
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
                found = Some(std::sync::Arc::clone(&app.id));
            }
        }
        found.map(|id| App { id }).ok_or(ApiError::Unauthorized)
    }
}

/// `axum::Json`, with malformed bodies answered as 400 problem details.
///
/// A body that parses is read with `serde_json` alone: `axum::Json` tracks the
/// path of every key it reads (a string allocated per key) so that it can say
/// where a body went wrong. Only a body that fails, or one whose content type is
/// not plainly `application/json`, goes through `axum::Json`, for its message.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !plainly_json(req.headers()) {
            return match axum::Json::<T>::from_request(req, state).await {
                Ok(axum::Json(v)) => Ok(Self(v)),
                Err(rejection) => Err(json_rejection(rejection)),
            };
        }
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|r| json_rejection(r.into()))?;
        if let Ok(v) = serde_json::from_slice(&bytes) {
            return Ok(Self(v));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(Self(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// The content types apps send (`application/json`, with or without the UTF-8
/// charset), all of which `axum::Json` accepts too. Anything else is left to it.
fn plainly_json(headers: &HeaderMap) -> bool {
    const PLAIN: [&[u8]; 3] = [
        b"application/json",
        b"application/json; charset=utf-8",
        b"application/json;charset=utf-8",
    ];
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| PLAIN.iter().any(|p| v.as_bytes().eq_ignore_ascii_case(p)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Body {
        token: String,
        #[serde(default)]
        request: Inner,
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        ip: Option<String>,
    }

    async fn read(content_type: Option<&str>, body: &str) -> Result<Body, String> {
        let mut req = axum::http::Request::builder().method("POST").uri("/");
        if let Some(t) = content_type {
            req = req.header(header::CONTENT_TYPE, t);
        }
        let req = req.body(axum::body::Body::from(body.to_owned())).unwrap();
        match JsonBody::<Body>::from_request(req, &()).await {
            Ok(JsonBody(v)) => Ok(v),
            Err(ApiError::BadRequest(m)) => Err(m),
            Err(other) => Err(format!("not a bad request: {other:?}")),
        }
    }

    /// What `axum::Json` answers for the same request.
    async fn axum_says(content_type: Option<&str>, body: &str) -> Result<Body, String> {
        let mut req = axum::http::Request::builder().method("POST").uri("/");
        if let Some(t) = content_type {
            req = req.header(header::CONTENT_TYPE, t);
        }
        let req = req.body(axum::body::Body::from(body.to_owned())).unwrap();
        match axum::Json::<Body>::from_request(req, &()).await {
            Ok(axum::Json(v)) => Ok(v),
            Err(r) => Err(r.body_text()),
        }
    }

    #[tokio::test]
    async fn json_bodies_read_and_fail_as_axum_json_says() {
        let good = r#"{"token":"t","request":{"ip":"192.0.2.1"}}"#;
        let cases = [
            (Some("application/json"), good),
            (Some("Application/JSON; charset=UTF-8"), good),
            (Some("application/json;charset=utf-8"), good),
            (Some("application/vnd.api+json"), good),
            (Some("application/json; charset=latin1"), good),
            (Some("text/plain"), good),
            (None, good),
            (
                Some("application/json"),
                r#"{"token":"t","request":{"ip":7}}"#,
            ),
            (
                Some("application/json"),
                r#"{"token":"t","request":{"port":1}}"#,
            ),
            (Some("application/json"), r#"{"request":{}}"#),
            (Some("application/json"), r#"{"token":"t"} trailing"#),
            (Some("application/json"), r#"{"token":"t""#),
            (Some("application/json"), ""),
        ];
        for (content_type, body) in cases {
            let ours = read(content_type, body).await;
            assert_eq!(
                ours,
                axum_says(content_type, body).await,
                "{content_type:?} {body}"
            );
        }
        assert_eq!(
            read(Some("application/json"), good)
                .await
                .unwrap()
                .request
                .ip
                .as_deref(),
            Some("192.0.2.1")
        );
        let wrong_type = read(
            Some("application/json"),
            r#"{"token":"t","request":{"ip":7}}"#,
        )
        .await
        .unwrap_err();
        assert!(wrong_type.contains("request.ip"), "{wrong_type}");
    }
}
