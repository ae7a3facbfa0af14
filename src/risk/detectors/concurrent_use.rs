//! `concurrent_use`: one session used from two network fingerprints, interleaved
//! (A, then B, then A again) within a window — two holders of one token, not one
//! user who moved. The fingerprint is the IP, prefix, ASN or country (plus by
//! default the user-agent fingerprint), or the user-agent fingerprint alone.

use super::hit;
use crate::enrich::ClientInfo;
use crate::risk::rules::{ConcurrentUse, NetworkBy};
use crate::risk::{Hit, RequestContext, SessionView};

/// The fingerprint, for messages only (comparisons never allocate).
fn fingerprint(p: &ConcurrentUse, c: &ClientInfo) -> String {
    let net = match p.by {
        NetworkBy::Ip => c.ip.to_string(),
        NetworkBy::Prefix => c.prefix.to_string(),
        NetworkBy::Asn => c
            .asn
            .map_or_else(|| c.prefix.to_string(), |a| format!("AS{a}")),
        NetworkBy::Country => c.country.as_deref().unwrap_or("??").to_owned(),
        NetworkBy::UserAgent => return c.ua.key(),
    };
    if p.include_user_agent {
        format!("{net}|{}", c.ua.key())
    } else {
        net
    }
}

/// Whether two clients have the same fingerprint.
fn same(p: &ConcurrentUse, a: &ClientInfo, b: &ClientInfo) -> bool {
    let net = match p.by {
        NetworkBy::Ip => a.ip == b.ip,
        NetworkBy::Prefix => a.prefix == b.prefix,
        NetworkBy::Asn => match (a.asn, b.asn) {
            (Some(x), Some(y)) => x == y,
            _ => a.prefix == b.prefix,
        },
        NetworkBy::Country => a.country == b.country,
        NetworkBy::UserAgent => true,
    };
    net && (!(p.include_user_agent || p.by == NetworkBy::UserAgent) || a.ua == b.ua)
}

pub fn evaluate(
    p: &ConcurrentUse,
    ctx: &RequestContext<'_>,
    view: &SessionView<'_>,
) -> Option<Hit> {
    let since = ctx.at_ms - p.window_secs.saturating_mul(1000);
    let mut seen_current = false;
    let mut other: Option<&ClientInfo> = None;
    for obs in view.recent.iter().filter(|o| o.at_ms >= since) {
        if same(p, &obs.client, ctx.client) {
            seen_current = true;
        } else if seen_current {
            other = Some(&obs.client);
        }
    }
    let other = other?;
    Some(hit(
        ctx,
        format!(
            "used alternately from {} and {} within {}s",
            fingerprint(p, ctx.client),
            fingerprint(p, other),
            p.window_secs
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::risk::Observation;
    use crate::risk::detectors::fixtures::*;
    use std::sync::Arc;

    #[test]
    fn alternating_networks_fire_but_moving_once_does_not() {
        let (a, b) = (oslo(), lagos());
        let p = ConcurrentUse {
            window_secs: 300,
            by: NetworkBy::Prefix,
            include_user_agent: true,
        };
        let obs = |c: &ClientInfo, at_ms| Observation {
            at_ms,
            client: Arc::new(c.clone()),
        };
        let moved = [obs(&a, 0), obs(&a, 1000), obs(&b, 2000)];
        let mut v = view(&a, None);
        v.recent = &moved;
        assert!(
            evaluate(&p, &ctx(&b, 3000), &v).is_none(),
            "A A B then B: moved once"
        );
        let alternating = [obs(&a, 0), obs(&b, 1000)];
        v.recent = &alternating;
        assert!(evaluate(&p, &ctx(&a, 2000), &v).is_some(), "A B A");
        assert!(
            evaluate(&p, &ctx(&a, 400_000), &v).is_none(),
            "outside the window"
        );
    }
}
