//! Keyed GCRA quotas (governor) for `rate` rules, on the injected clock. Memory
//! is bounded: idle keys are dropped by [`RateLimiters::maintain`], and a limiter
//! that reaches its key cap is pruned before it takes a new key.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DashMapStateStore;
use governor::{Quota, RateLimiter};

use super::rules::Rate;
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

type Keyed = RateLimiter<String, DashMapStateStore<String>, LimiterClock, NoOpMiddleware<Duration>>;

/// The limiters of every `rate` rule, created on first use.
pub struct RateLimiters {
    clock: SharedClock,
    /// By rule id, with the parameters it was built for.
    limiters: DashMap<String, (Params, Arc<Keyed>)>,
    max_keys: usize,
}

impl RateLimiters {
    pub fn new(clock: SharedClock, max_keys: usize) -> Self {
        Self {
            clock,
            limiters: DashMap::new(),
            max_keys: max_keys.max(1),
        }
    }

    fn limiter(&self, rule_id: &str, rate: &Rate) -> Option<Arc<Keyed>> {
        if let Some(l) = self.limiters.get(rule_id)
            && l.0 == (rate.limit, rate.per, rate.burst)
        {
            return Some(l.1.clone());
        }
        // New rule, or its parameters changed on reload: start afresh.
        let period = rate.per.checked_div(rate.limit)?;
        let quota = Quota::with_period(period)?.allow_burst(NonZeroU32::new(rate.burst)?);
        let limiter = Arc::new(RateLimiter::dashmap_with_clock(
            quota,
            LimiterClock(self.clock.clone()),
        ));
        self.limiters.insert(
            rule_id.to_owned(),
            ((rate.limit, rate.per, rate.burst), limiter.clone()),
        );
        Some(limiter)
    }

    /// `Ok` if the request fits the quota, else the seconds until it would.
    pub fn check(&self, rule_id: &str, rate: &Rate, key: String, cost: u32) -> Result<(), u64> {
        let Some(limiter) = self.limiter(rule_id, rate) else {
            return Ok(());
        };
        if limiter.len() >= self.max_keys {
            limiter.retain_recent();
        }
        let n = NonZeroU32::new(cost.max(1)).unwrap_or(NonZeroU32::MIN);
        match limiter.check_key_n(&key, n) {
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
            l.1.retain_recent();
            l.1.shrink_to_fit();
        }
    }

    /// Keys held across all limiters.
    pub fn keys(&self) -> usize {
        self.limiters.iter().map(|l| l.1.len()).sum()
    }
}
