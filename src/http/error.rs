//! The one error type of the HTTP layer. Each variant maps to a status code and
//! an RFC 9457 problem body; 401s carry `WWW-Authenticate`; 5xx say little and
//! log the cause.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::session::SessionError;
use crate::session::input::InputError;
use crate::token::TokenError;

#[derive(Debug)]
pub enum ApiError {
    /// Malformed or invalid input.
    BadRequest(String),
    /// Missing or wrong app or admin credential.
    Unauthorized,
    /// The presented access token is at fault (RFC 6750 `invalid_token`).
    InvalidToken {
        code: &'static str,
        detail: String,
    },
    /// A refresh token is not accepted (`invalid_grant`).
    InvalidGrant {
        code: &'static str,
        detail: String,
    },
    NotFound(&'static str),
    /// The caller may not use this endpoint (e.g. not a trusted proxy).
    Forbidden(String),
    /// Over a rate rule: try again after `retry_after` seconds.
    TooManyRequests {
        retry_after: u64,
        detail: String,
    },
    Conflict {
        code: &'static str,
        detail: String,
    },
    /// This node must not answer now (e.g. its change feed is stale); says why.
    Unavailable(String),
    /// Something failed on our side; the cause is logged, not shown.
    Internal(String),
}

fn problem(status: StatusCode, code: &str, title: &str, detail: &str) -> serde_json::Value {
    json!({
        "type": format!("urn:tokenwarden:problem:{code}"),
        "title": title,
        "status": status.as_u16(),
        "detail": detail,
        "error": code,
        "error_description": detail,
    })
}

fn problem_response(status: StatusCode, body: serde_json::Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    response
}

/// `Bearer error="…", error_description="…"` plus any extra parameters. The
/// description keeps printable ASCII only (RFC 6750 §3), so a message such as
/// "São Paulo" can never make the header invalid and lose the challenge.
pub fn bearer_challenge_with(error: &str, description: &str, extra: &str) -> HeaderValue {
    let clean: String = description
        .chars()
        .map(|c| if c == '’' { '\'' } else { c })
        .filter(|c| (' '..='~').contains(c) && *c != '"' && *c != '\\')
        .collect();
    HeaderValue::from_str(&format!(
        "Bearer realm=\"tokenwarden\", error=\"{error}\", error_description=\"{clean}\"{extra}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("Bearer realm=\"tokenwarden\""))
}

pub fn bearer_challenge(error: &str, description: &str) -> HeaderValue {
    bearer_challenge_with(error, description, "")
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            Self::BadRequest(detail) => problem_response(
                StatusCode::BAD_REQUEST,
                problem(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Bad request",
                    &detail,
                ),
            ),
            Self::Unauthorized => {
                let mut r = problem_response(
                    StatusCode::UNAUTHORIZED,
                    problem(
                        StatusCode::UNAUTHORIZED,
                        "invalid_client",
                        "Unauthorized",
                        "a valid credential is required: Authorization: Bearer <key>",
                    ),
                );
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tokenwarden\""),
                );
                r
            }
            Self::InvalidToken { code, detail } => {
                let mut body = problem(
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    "Invalid token",
                    &detail,
                );
                body["reason"] = code.into();
                let mut r = problem_response(StatusCode::UNAUTHORIZED, body);
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    bearer_challenge("invalid_token", &detail),
                );
                r
            }
            Self::InvalidGrant { code, detail } => {
                let mut body = problem(
                    StatusCode::UNAUTHORIZED,
                    "invalid_grant",
                    "Invalid grant",
                    &detail,
                );
                body["reason"] = code.into();
                problem_response(StatusCode::UNAUTHORIZED, body)
            }
            Self::TooManyRequests {
                retry_after,
                detail,
            } => {
                let mut body = problem(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    "Too many requests",
                    &detail,
                );
                body["retry_after"] = retry_after.into();
                let mut r = problem_response(StatusCode::TOO_MANY_REQUESTS, body);
                r.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                r
            }
            Self::Forbidden(why) => problem_response(
                StatusCode::FORBIDDEN,
                problem(StatusCode::FORBIDDEN, "forbidden", "Forbidden", &why),
            ),
            Self::NotFound(what) => problem_response(
                StatusCode::NOT_FOUND,
                problem(StatusCode::NOT_FOUND, "not_found", "Not found", what),
            ),
            Self::Conflict { code, detail } => problem_response(
                StatusCode::CONFLICT,
                problem(StatusCode::CONFLICT, code, "Conflict", &detail),
            ),
            Self::Unavailable(why) => {
                tracing::warn!(%why, "refusing to answer");
                problem_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "temporarily_unavailable",
                        "Unavailable",
                        &why,
                    ),
                )
            }
            Self::Internal(cause) => {
                tracing::error!(%cause, "internal error");
                problem_response(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    problem(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "server_error",
                        "Internal error",
                        "the request could not be completed; it has been logged",
                    ),
                )
            }
        }
    }
}

impl From<InputError> for ApiError {
    fn from(e: InputError) -> Self {
        Self::BadRequest(e.to_string())
    }
}

impl From<TokenError> for ApiError {
    fn from(e: TokenError) -> Self {
        Self::InvalidToken {
            code: e.code(),
            detail: e.to_string(),
        }
    }
}

impl From<SessionError> for ApiError {
    fn from(e: SessionError) -> Self {
        let message = e.to_string();
        match e {
            SessionError::InvalidGrant(code) => Self::InvalidGrant {
                code: code.code(),
                detail: e.to_string(),
            },
            SessionError::RefreshReuse => Self::InvalidGrant {
                code: "refresh_token_reused",
                detail: e.to_string(),
            },
            SessionError::NotFound => Self::NotFound("no such session"),
            SessionError::Revoked => Self::Conflict {
                code: "session_revoked",
                detail: "the session is revoked; open a new one".into(),
            },
            SessionError::StepUpRequired(ev) => Self::InvalidGrant {
                code: "step_up_required",
                detail: ev.user_message.unwrap_or(message),
            },
            SessionError::RiskRevoked(ev) => Self::InvalidGrant {
                code: "session_revoked_by_rules",
                detail: ev.user_message.unwrap_or(message),
            },
            SessionError::Denied(ev) => Self::TooManyRequests {
                retry_after: ev.retry_after.unwrap_or(1),
                detail: ev.user_message.unwrap_or(message),
            },
            SessionError::Unavailable(why) => Self::Unavailable(why),
            SessionError::MissingClientIp => Self::BadRequest(message),
            SessionError::ForeignSession => Self::Conflict {
                code: "external_session",
                detail: message,
            },
            SessionError::Token(TokenError::Signing) => Self::Internal(e.to_string()),
            SessionError::Token(t) => t.into(),
            SessionError::Store(s) => Self::Internal(s.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_stay_valid_ascii_whatever_the_message() {
        let h = bearer_challenge_with(
            "insufficient_user_authentication",
            "Activity from São Paulo, BR \"now\". Please confirm it’s you.",
            ", max_age=0",
        );
        let text = h.to_str().unwrap();
        assert!(
            text.contains("error=\"insufficient_user_authentication\""),
            "{text}"
        );
        assert!(
            text.contains("Please confirm it's you.\", max_age=0"),
            "{text}"
        );
        assert!(text.contains("So Paulo"), "{text}");
    }
}
