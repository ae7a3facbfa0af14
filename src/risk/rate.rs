//! Keyed GCRA quotas (governor) for `rate` rules, on the injected clock. Memory
//! is bounded: idle keys are dropped by [`RateLimiters::maintain`], and a limiter
//! found at its key cap is pruned before it takes more keys. The cap is looked at
//! once every [`CAP_CHECK_EVERY`] checks (counting keys takes every shard's lock),
//! so a limiter may pass it by that many keys.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use super::rules::Rate;
use crate::ConcurrentMap;
use crate::clock::SharedClock;

/// governor's view of our clock: time since the Unix epoch.
#[derive(Clone)]
pub struct LimiterClock(SharedClock);

impl GovernorClock for LimiterClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Duration::from_millis(u64::try_from(self.0.now_millis()).unwrap_or(0))
    }
}

type Params = (u32, Duration, u32);

/// What a quota counts by: an address (an IPv6 client by its /64) is kept as
/// one, not formatted as text for every request.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum LimitKey {
    Ip(IpAddr),
    Id(Box<str>),
}

impl From<&str> for LimitKey {
    fn from(id: &str) -> Self {
        Self::Id(id.into())
    }
}

type Keyed = RateLimiter<
    LimitKey,
    DashMapStateStore<LimitKey, ahash::RandomState>,
    LimiterClock,
    NoOpMiddleware<Duration>,
>;

/// How many checks a limiter takes between two looks at its key count.
pub const CAP_CHECK_EVERY: u32 = 64;

/// One rule's limiter, with the parameters it was built for.
struct Limiter {
    params: Params,
    keyed: Keyed,
    checks: AtomicU32,
}

/// The limiters of every `rate` rule, created on first use.
pub struct RateLimiters {
    clock: SharedClock,
    /// By rule id.
    limiters: ConcurrentMap<String, Arc<Limiter>>,
    max_keys: usize,
}

impl RateLimiters {
    pub fn new(clock: SharedClock, max_keys: usize) -> Self {
        Self {
            clock,
            limiters: ConcurrentMap::default(),
            max_keys: max_keys.max(1),
        }
    }

    fn limiter(&self, rule_id: &str, rate: &Rate) -> Option<Arc<Limiter>> {
        let params = (rate.limit, rate.per, rate.burst);
        if let Some(l) = self.limiters.get(rule_id)
            && l.params == params
        {
            return Some(Arc::clone(&l));
        }
        // New rule, or its parameters changed on reload: start afresh.
        let period = rate.per.checked_div(rate.limit)?;
        let quota = Quota::with_period(period)?.allow_burst(NonZeroU32::new(rate.burst)?);
        let limiter = Arc::new(Limiter {
            params,
            keyed: RateLimiter::dashmap_with_clock_and_hasher(
                quota,
                LimiterClock(self.clock.clone()),
                ahash::RandomState::new(),
            ),
            checks: AtomicU32::new(0),
        });
        self.limiters
            .insert(rule_id.to_owned(), Arc::clone(&limiter));
        Some(limiter)
    }

    /// `Ok` if the request fits the quota, else the seconds until it would.
    pub fn check(&self, rule_id: &str, rate: &Rate, key: LimitKey, cost: u32) -> Result<(), u64> {
        let Some(limiter) = self.limiter(rule_id, rate) else {
            return Ok(());
        };
        if limiter
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(CAP_CHECK_EVERY)
            && limiter.keyed.len() >= self.max_keys
        {
            limiter.keyed.retain_recent();
        }
        let n = NonZeroU32::new(cost.max(1)).unwrap_or(NonZeroU32::MIN);
        match limiter.keyed.check_key_n(&key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(LimiterClock(self.clock.clone()).now());
                Err(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
            }
            // More than the burst in one request: it can never fit.
            Err(_) => Err(rate.per.as_secs().max(1)),
        }
    }

    /// Drops keys whose quota has fully refilled; call periodically.
    pub fn maintain(&self) {
        for l in self.limiters.iter() {
            l.keyed.retain_recent();
            l.keyed.shrink_to_fit();
        }
    }

    /// Keys held across all limiters.
    pub fn keys(&self) -> usize {
        self.limiters.iter().map(|l| l.keyed.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::risk::rules::RateKey;

    fn rate() -> Rate {
        Rate {
            key: RateKey::Ip,
            limit: 10,
            per: Duration::from_secs(1),
            burst: 10,
            weighted: false,
        }
    }

    #[test]
    fn a_limiter_at_its_key_cap_drops_refilled_keys_before_taking_more() {
        let clock = Arc::new(ManualClock::at(1_800_000_000));
        let limiters = RateLimiters::new(clock.clone(), 100);
        for i in 0..1000 {
            assert_eq!(
                limiters.check("r", &rate(), format!("k{i}").as_str().into(), 1),
                Ok(())
            );
            // Every key so far has refilled by the next one.
            clock.advance(Duration::from_secs(2));
        }
        let held = limiters.keys();
        assert!(
            held <= 100 + CAP_CHECK_EVERY as usize,
            "{held} keys held for a cap of 100"
        );
    }

    #[test]
    fn pruning_never_forgets_a_key_that_is_still_limited() {
        let clock = Arc::new(ManualClock::at(1_800_000_000));
        let limiters = RateLimiters::new(clock.clone(), 10);
        for _ in 0..10 {
            assert_eq!(limiters.check("r", &rate(), "hot".into(), 1), Ok(()));
        }
        assert!(limiters.check("r", &rate(), "hot".into(), 1).is_err());
        // Far past the cap, at the same instant: nothing has refilled, nothing goes.
        for i in 0..500 {
            let _ = limiters.check("r", &rate(), format!("k{i}").as_str().into(), 1);
        }
        assert!(limiters.keys() > 500);
        assert!(limiters.check("r", &rate(), "hot".into(), 1).is_err());
    }
}
