//! `rate`: a keyed quota per `jti`, `sid`, `sub` or client IP (IPv6 by /64),
//! optionally scoped by the rule's paths and methods, weighted by the request's
//! cost. Fires with the seconds until the request would fit. A quota per `sid`
//! is counted in the session's own state (see [`crate::risk::rate`]).

use std::net::{IpAddr, Ipv6Addr};

use super::hit;
use crate::risk::rate::{LimitKey, SessionQuotas};
use crate::risk::rules::{Rate, RateKey};
use crate::risk::{Hit, RateLimiters, RequestContext};

/// `None` for a key the request has none of (a refresh has no jti: a jti quota
/// does not apply, it would be one shared bucket). Not for `sid` quotas.
fn key(p: &Rate, ctx: &RequestContext<'_>) -> Option<LimitKey> {
    let id = match p.key {
        RateKey::Jti => ctx.jti,
        RateKey::Sid => ctx.sid,
        RateKey::Sub => ctx.sub,
        // One IPv6 host usually owns a whole /64.
        RateKey::Ip => {
            return Some(LimitKey::Ip(match ctx.client.ip {
                IpAddr::V6(v6) => {
                    IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX)))
                }
                v4 => v4,
            }));
        }
    };
    (!id.is_empty()).then(|| LimitKey::from(id))
}

pub fn evaluate(
    rule_id: &str,
    p: &Rate,
    limiters: &RateLimiters,
    ctx: &RequestContext<'_>,
    quotas: &mut SessionQuotas,
) -> Option<Hit> {
    let cost = if p.weighted { ctx.cost.max(1) } else { 1 };
    let checked = match p.key {
        // The state scored is the session's: its quota is kept there.
        RateKey::Sid if !ctx.sid.is_empty() => {
            limiters.check_session(rule_id, p, ctx.sid, quotas, cost, ctx.at_ms)
        }
        _ => limiters.check(rule_id, p, key(p, ctx)?, cost, ctx.at_ms),
    };
    let wait = checked.err()?;
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

    /// A quota whose burst is its limit, and limiters on a manual clock.
    fn quota(key: RateKey, limit: u32, per_secs: u64, weighted: bool) -> Rate {
        Rate {
            key,
            limit,
            per: Duration::from_secs(per_secs),
            burst: limit,
            weighted,
        }
    }

    fn limiters() -> (Arc<ManualClock>, RateLimiters, i64) {
        let clock = Arc::new(ManualClock::at(1_800_000_000));
        let limiters = RateLimiters::new(clock.clone(), 1000);
        let at = crate::clock::Clock::now_millis(&*clock);
        (clock, limiters, at)
    }

    #[test]
    fn a_burst_over_the_quota_fires_until_the_quota_refills() {
        let (clock, limiters, at) = limiters();
        let mut q = SessionQuotas::default();
        let p = quota(RateKey::Sid, 5, 10, true);
        let c = oslo();
        for _ in 0..5 {
            assert!(evaluate("r", &p, &limiters, &ctx(&c, at), &mut q).is_none());
        }
        let h = evaluate("r", &p, &limiters, &ctx(&c, at), &mut q).unwrap();
        assert_eq!(h.retry_after, Some(2));
        // Measured at the decision's time: two seconds later, one cell has refilled.
        clock.advance(Duration::from_secs(2));
        assert!(evaluate("r", &p, &limiters, &ctx(&c, at), &mut q).is_some());
        let later = crate::clock::Clock::now_millis(&*clock);
        assert!(evaluate("r", &p, &limiters, &ctx(&c, later), &mut q).is_none());
        // A request costing more than the burst can never fit.
        let mut heavy = ctx(&c, later);
        heavy.cost = 50;
        assert!(evaluate("r", &p, &limiters, &heavy, &mut q).is_some());
        // Counted in the session's own state, not as a key of the shared limiter.
        assert_eq!(limiters.keys(), 0);
        assert!(q.is_held());
    }

    #[test]
    fn a_session_quota_counts_the_session_it_is_kept_in_and_no_other() {
        let (_clock, limiters, at) = limiters();
        let p = quota(RateKey::Sid, 2, 60, false);
        let c = oslo();
        let (mut mine, mut other) = (SessionQuotas::default(), SessionQuotas::default());
        for _ in 0..2 {
            assert!(evaluate("r", &p, &limiters, &ctx(&c, at), &mut mine).is_none());
        }
        let h = evaluate("r", &p, &limiters, &ctx(&c, at), &mut mine).unwrap();
        assert_eq!(h.retry_after, Some(30));
        // Another session (its own state) has its whole quota.
        assert!(evaluate("r", &p, &limiters, &ctx(&c, at), &mut other).is_none());
        // A second `sid` rule is counted in the shared map, the first one stays.
        let q2 = quota(RateKey::Sid, 1, 60, false);
        assert!(evaluate("r2", &q2, &limiters, &ctx(&c, at), &mut mine).is_none());
        assert!(evaluate("r2", &q2, &limiters, &ctx(&c, at), &mut mine).is_some());
        assert!(evaluate("r", &p, &limiters, &ctx(&c, at), &mut mine).is_some());
        assert_eq!(limiters.keys(), 1);
        assert!(mine.is_held());
    }

    #[test]
    fn a_session_quota_whose_rule_changed_starts_afresh_and_drops_the_old_cell() {
        let (_clock, limiters, at) = limiters();
        let c = oslo();
        let mut q = SessionQuotas::default();
        let before = quota(RateKey::Sid, 1, 60, false);
        assert!(evaluate("r", &before, &limiters, &ctx(&c, at), &mut q).is_none());
        assert!(evaluate("r", &before, &limiters, &ctx(&c, at), &mut q).is_some());
        // The rule file now allows 3 a minute: a new quota, not the spent one.
        let after = quota(RateKey::Sid, 3, 60, false);
        for _ in 0..3 {
            assert!(evaluate("r", &after, &limiters, &ctx(&c, at), &mut q).is_none());
        }
        assert!(evaluate("r", &after, &limiters, &ctx(&c, at), &mut q).is_some());
        assert_eq!(
            limiters.keys(),
            0,
            "the new limiter took the session's cell over"
        );
    }

    #[test]
    fn changing_one_sid_rule_never_resets_another() {
        let (_clock, limiters, at) = limiters();
        let c = oslo();
        let mut q = SessionQuotas::default();
        let (a1, b) = (
            quota(RateKey::Sid, 1, 60, false),
            quota(RateKey::Sid, 1, 60, false),
        );
        // `a` checks the session first and holds its cell; `b` is keyed.
        assert!(evaluate("a", &a1, &limiters, &ctx(&c, at), &mut q).is_none());
        assert!(evaluate("b", &b, &limiters, &ctx(&c, at), &mut q).is_none());
        // `a` changes; `b` runs first on the next request and is still spent.
        let a2 = quota(RateKey::Sid, 2, 60, false);
        assert!(evaluate("b", &b, &limiters, &ctx(&c, at), &mut q).is_some());
        // `a`'s new limiter inherits the cell and starts afresh.
        assert!(evaluate("a", &a2, &limiters, &ctx(&c, at), &mut q).is_none());
        assert!(evaluate("a", &a2, &limiters, &ctx(&c, at), &mut q).is_none());
        assert!(evaluate("a", &a2, &limiters, &ctx(&c, at), &mut q).is_some());
        assert!(evaluate("b", &b, &limiters, &ctx(&c, at), &mut q).is_some());
        assert_eq!(limiters.keys(), 1, "only `b`'s key");
    }

    #[test]
    fn a_session_quota_and_a_keyed_one_answer_alike() {
        // The same quota, counted by session (in the session) and by subject (in
        // governor's keyed map), over the same requests and times.
        let (clock, limiters, _) = limiters();
        let c = oslo();
        let mut q = SessionQuotas::default();
        let by_sid = quota(RateKey::Sid, 4, 10, true);
        let by_sub = quota(RateKey::Sub, 4, 10, true);
        for (step, cost, advance_ms) in [
            (0, 1, 0),
            (1, 2, 0),
            (2, 1, 0),
            (3, 1, 1200),
            (4, 3, 0),
            (5, 1, 2500),
            (6, 9, 0),
            (7, 1, 0),
        ] {
            let mut r = ctx(&c, crate::clock::Clock::now_millis(&*clock));
            r.cost = cost;
            let a = evaluate("sid", &by_sid, &limiters, &r, &mut q).map(|h| h.retry_after);
            let b = evaluate("sub", &by_sub, &limiters, &r, &mut SessionQuotas::default())
                .map(|h| h.retry_after);
            assert_eq!(a, b, "step {step}");
            clock.advance(Duration::from_millis(advance_ms));
        }
    }

    #[test]
    fn an_ipv6_quota_counts_a_whole_64_and_an_ipv4_quota_one_address() {
        let (_clock, limiters, at) = limiters();
        let mut q = SessionQuotas::default();
        let p = quota(RateKey::Ip, 2, 60, false);
        let from = |ip: &str| {
            let mut c = (*oslo()).clone();
            c.ip = ip.parse().unwrap();
            Arc::new(c)
        };
        let (a, b) = (from("2001:db8:1:2::1"), from("2001:db8:1:2:ffff::9"));
        assert!(evaluate("r", &p, &limiters, &ctx(&a, at), &mut q).is_none());
        assert!(evaluate("r", &p, &limiters, &ctx(&b, at), &mut q).is_none());
        // A third request from the same /64, whichever host sends it, is over.
        assert!(evaluate("r", &p, &limiters, &ctx(&a, at), &mut q).is_some());
        // The next /64 has its own quota.
        let next = from("2001:db8:1:3::1");
        assert!(evaluate("r", &p, &limiters, &ctx(&next, at), &mut q).is_none());
        // IPv4 addresses count one by one, even in one /24.
        let (v4a, v4b) = (from("198.51.100.7"), from("198.51.100.8"));
        for _ in 0..2 {
            assert!(evaluate("r", &p, &limiters, &ctx(&v4a, at), &mut q).is_none());
        }
        assert!(evaluate("r", &p, &limiters, &ctx(&v4a, at), &mut q).is_some());
        assert!(evaluate("r", &p, &limiters, &ctx(&v4b, at), &mut q).is_none());
        assert_eq!(limiters.keys(), 4);
    }

    #[test]
    fn a_jti_quota_does_not_apply_to_a_request_without_a_jti() {
        let (_clock, limiters, at) = limiters();
        let mut q = SessionQuotas::default();
        let p = quota(RateKey::Jti, 1, 60, false);
        let c = oslo();
        let mut refresh = ctx(&c, at);
        refresh.jti = "";
        for _ in 0..3 {
            assert!(evaluate("r", &p, &limiters, &refresh, &mut q).is_none());
        }
        assert_eq!(limiters.keys(), 0);
    }
}
