//! Validated inputs of the session API ("parse, don't validate"): once one of
//! these exists, the domain code never checks it again.

use std::net::IpAddr;

use serde::Deserialize;

/// Why an input was refused; the message is shown to the caller as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InputError {
    pub field: &'static str,
    pub message: String,
}

fn err(field: &'static str, message: impl Into<String>) -> InputError {
    InputError {
        field,
        message: message.into(),
    }
}

const MAX_SUBJECT: usize = 256;
const MAX_USER_AGENT: usize = 1024;
const MAX_ACR: usize = 128;
const MAX_AMR: usize = 16;
const MAX_CLAIMS_BYTES: usize = 2048;

fn printable(s: &str) -> bool {
    !s.chars().any(char::is_control)
}

/// A user identifier as the app knows it: 1 to 256 printable characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject(String);

impl Subject {
    pub fn parse(s: &str) -> Result<Self, InputError> {
        if s.is_empty() || s.len() > MAX_SUBJECT || !printable(s) {
            return Err(err(
                "subject",
                format!("must be 1 to {MAX_SUBJECT} bytes of printable characters"),
            ));
        }
        Ok(Self(s.to_owned()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The client as the app saw it, as sent in request bodies.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientBody {
    pub ip: Option<String>,
    pub user_agent: Option<String>,
}

/// A validated client: an IP address (IPv4-mapped IPv6 folded to IPv4) and a user agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub ip: IpAddr,
    pub user_agent: String,
}

impl Client {
    /// The client as a request context (IP and user agent only).
    pub fn request_info(&self) -> crate::monitor::RequestInfo {
        crate::monitor::RequestInfo {
            ip: Some(self.ip),
            user_agent: Some(self.user_agent.clone()),
            ..crate::monitor::RequestInfo::default()
        }
    }

    pub fn parse(body: &ClientBody) -> Result<Self, InputError> {
        let ip = body
            .ip
            .as_deref()
            .ok_or_else(|| err("client.ip", "is required"))?;
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| err("client.ip", format!("{ip:?} is not an IP address")))?;
        let ip = ip.to_canonical();
        let user_agent = body.user_agent.clone().unwrap_or_default();
        if user_agent.len() > MAX_USER_AGENT || !printable(&user_agent) {
            return Err(err(
                "client.user_agent",
                format!("must be at most {MAX_USER_AGENT} bytes of printable characters"),
            ));
        }
        Ok(Self { ip, user_agent })
    }
}

/// Authentication context of a new session (`acr`, `amr`) and the app's own claims.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AuthContext {
    pub acr: Option<String>,
    pub amr: Option<Vec<String>>,
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
}

impl AuthContext {
    pub fn parse(
        acr: Option<String>,
        amr: Option<Vec<String>>,
        claims: Option<serde_json::Value>,
    ) -> Result<Self, InputError> {
        if let Some(a) = &acr
            && (a.is_empty() || a.len() > MAX_ACR || !printable(a))
        {
            return Err(err(
                "acr",
                format!("must be 1 to {MAX_ACR} printable characters"),
            ));
        }
        if let Some(list) = &amr
            && (list.len() > MAX_AMR
                || list
                    .iter()
                    .any(|m| m.is_empty() || m.len() > 32 || !printable(m)))
        {
            return Err(err(
                "amr",
                format!("must be at most {MAX_AMR} method names of 1 to 32 characters"),
            ));
        }
        let claims = match claims {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::Object(map)) => {
                if let Some(reserved) = map
                    .keys()
                    .find(|k| crate::token::RESERVED_CLAIMS.contains(&k.as_str()))
                {
                    return Err(err(
                        "claims",
                        format!("{reserved:?} is set by tokenwarden and cannot be overridden"),
                    ));
                }
                if serde_json::to_vec(&map).map_or(usize::MAX, |v| v.len()) > MAX_CLAIMS_BYTES {
                    return Err(err(
                        "claims",
                        format!("must serialize to at most {MAX_CLAIMS_BYTES} bytes"),
                    ));
                }
                Some(map)
            }
            Some(_) => return Err(err("claims", "must be a JSON object")),
        };
        Ok(Self { acr, amr, claims })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn ipv4_mapped_addresses_are_folded_to_ipv4() {
        let c = Client::parse(&ClientBody {
            ip: Some("::ffff:203.0.113.7".into()),
            user_agent: None,
        })
        .unwrap();
        assert_eq!(c.ip.to_string(), "203.0.113.7");
    }

    #[test]
    fn reserved_claims_cannot_be_smuggled_in() {
        let e =
            AuthContext::parse(None, None, Some(serde_json::json!({"sub": "admin"}))).unwrap_err();
        assert_eq!(e.field, "claims");
        assert!(AuthContext::parse(None, None, Some(serde_json::json!([1]))).is_err());
        assert!(AuthContext::parse(None, None, Some(serde_json::json!({"tenant": "t1"}))).is_ok());
    }

    proptest! {
        #[test]
        fn a_subject_is_accepted_exactly_when_it_is_short_and_printable(s in "\\PC{0,300}|[\\x00-\\x1f]{1,3}") {
            let ok = !s.is_empty() && s.len() <= 256 && !s.chars().any(char::is_control);
            prop_assert_eq!(Subject::parse(&s).is_ok(), ok);
        }

        #[test]
        fn client_parsing_never_panics(ip in ".{0,64}", ua in ".{0,64}") {
            let _ = Client::parse(&ClientBody { ip: Some(ip), user_agent: Some(ua) });
        }
    }
}
