//! `referrer`: for the rule's paths, the request's `Origin` (or the origin of its
//! `Referer`) is not an allowed one, or `Sec-Fetch-Site` is not an allowed value —
//! the "only my app's own pages make these calls" scheme. `missing` decides
//! what a request without the headers does (non-browser clients send none).

use super::hit;
use crate::risk::rules::{Missing, Referrer};
use crate::risk::{Hit, RequestContext};

/// `scheme://host[:port]` of a URL, lower-cased.
fn origin_of(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let host = rest.split(['/', '?', '#']).next()?;
    (!host.is_empty()).then(|| {
        format!(
            "{}://{}",
            scheme.to_ascii_lowercase(),
            host.to_ascii_lowercase()
        )
    })
}

fn allowed_origin(allowed: &[String], origin: &str) -> bool {
    let origin = origin.trim_end_matches('/');
    allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
}

pub fn evaluate(p: &Referrer, ctx: &RequestContext<'_>) -> Option<Hit> {
    if !p.allowed_origins.is_empty() {
        let seen = ctx
            .origin
            .filter(|o| !o.is_empty() && *o != "null")
            .map(str::to_owned)
            .or_else(|| ctx.referrer.and_then(origin_of));
        match seen {
            Some(o) if !allowed_origin(&p.allowed_origins, &o) => {
                return Some(hit(ctx, format!("origin {o} is not allowed here")));
            }
            None if p.missing == Missing::Fire => {
                return Some(hit(ctx, "no Origin or Referer header".to_owned()));
            }
            _ => {}
        }
    }
    if !p.allowed_sec_fetch_site.is_empty() {
        match ctx.sec_fetch_site {
            Some(v)
                if !p
                    .allowed_sec_fetch_site
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(v)) =>
            {
                return Some(hit(ctx, format!("Sec-Fetch-Site {v} is not allowed here")));
            }
            None if p.missing == Missing::Fire => {
                return Some(hit(ctx, "no Sec-Fetch-Site header".to_owned()));
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::risk::detectors::fixtures::*;

    #[test]
    fn only_the_apps_own_pages_pass() {
        let c = oslo();
        let p = Referrer {
            allowed_origins: vec!["https://app.example.com".into()],
            allowed_sec_fetch_site: vec!["same-origin".into()],
            missing: Missing::Allow,
        };
        let mut x = ctx(&c, 0);
        assert!(evaluate(&p, &x).is_none(), "no headers, missing = allow");
        x.origin = Some("https://app.example.com");
        x.sec_fetch_site = Some("same-origin");
        assert!(evaluate(&p, &x).is_none());
        x.origin = Some("https://evil.example");
        assert!(evaluate(&p, &x).is_some());
        x.origin = None;
        x.referrer = Some("https://APP.example.com/page?q=1");
        assert!(evaluate(&p, &x).is_none(), "the referer's origin counts");
        x.sec_fetch_site = Some("cross-site");
        assert!(evaluate(&p, &x).is_some());
        let strict = Referrer {
            missing: Missing::Fire,
            ..p
        };
        assert!(evaluate(&strict, &ctx(&c, 0)).is_some());
    }
}
