//! `rate`: a keyed quota per `jti`, `sid`, `sub` or client IP (IPv6 by /64),
//! optionally scoped by the rule's paths and methods, weighted by the request's
//! cost. Fires with the seconds until the request would fit.

use std::net::IpAddr;

use super::hit;
use crate::risk::rules::{Rate, RateKey};
use crate::risk::{Hit, RateLimiters, RequestContext};

fn key(p: &Rate, ctx: &RequestContext<'_>) -> String {
    match p.key {
        RateKey::Jti => ctx.jti.to_owned(),
        RateKey::Sid => ctx.sid.to_owned(),
        RateKey::Sub => ctx.sub.to_owned(),
        // One IPv6 host usually owns a whole /64.
        RateKey::Ip => match ctx.client.ip {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
            }
            v4 => v4.to_string(),
        },
    }
}

pub fn evaluate(
    rule_id: &str,
    p: &Rate,
    limiters: &RateLimiters,
    ctx: &RequestContext<'_>,
) -> Option<Hit> {
    let key = key(p, ctx);
    // A refresh has no jti: a jti quota does not apply (it would be one shared bucket).
    if key.is_empty() {
        return None;
    }
    let cost = if p.weighted { ctx.cost.max(1) } else { 1 };
    let wait = limiters.check(rule_id, p, key, cost).err()?;
    let mut h = hit(
        ctx,
        format!(
            "more than {} per {}s by {:?} (cost {cost}); retry in {wait}s",
            p.limit,
            p.per.as_secs(),
            p.key
        ),
    );
    h.retry_after = Some(wait);
    h.vars.insert("retry_after", wait.to_string());
    Some(h)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::clock::ManualClock;
    use crate::risk::detectors::fixtures::*;

    #[test]
    fn a_burst_over_the_quota_fires_until_the_quota_refills() {
        let clock = Arc::new(ManualClock::at(1_800_000_000));
        let limiters = RateLimiters::new(clock.clone(), 1000);
        let p = Rate {
            key: RateKey::Sid,
            limit: 5,
            per: Duration::from_secs(10),
            burst: 5,
            weighted: true,
        };
        let c = oslo();
        let at = crate::clock::Clock::now_millis(&*clock);
        for _ in 0..5 {
            assert!(evaluate("r", &p, &limiters, &ctx(&c, at)).is_none());
        }
        let h = evaluate("r", &p, &limiters, &ctx(&c, at)).unwrap();
        assert_eq!(h.retry_after, Some(2));
        clock.advance(Duration::from_secs(2));
        assert!(evaluate("r", &p, &limiters, &ctx(&c, at)).is_none());
        // A request costing more than the burst can never fit.
        let mut heavy = ctx(&c, at);
        heavy.cost = 50;
        assert!(evaluate("r", &p, &limiters, &heavy).is_some());
        assert_eq!(limiters.keys(), 1);
    }
}
