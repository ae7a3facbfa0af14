//! GCRA quotas (governor) for `rate` rules, on the injected clock.
//!
//! A quota counted by session (`key = "sid"`) keeps its state in the session's own
//! state ([`SessionQuotas`]), which the request has already looked up and locked:
//! governor runs its GCRA on that cell through [`SessionCells`], a state store of
//! ours, so such a quota costs no lookup of the session in a shared keyed map, no
//! copy of the session id as a key, and no key to prune. The session's state stays
//! in memory while its quota has not refilled ([`RateLimiters::holds_back`]).
//!
//! Every other quota (`jti`, `sub`, `ip`) is keyed in governor's own map. Memory is
//! bounded: idle keys are dropped by [`RateLimiters::maintain`], and a limiter
//! found at its key cap is pruned before it takes more keys. The cap is looked at
//! once every [`CAP_CHECK_EVERY`] checks (counting keys takes every shard's lock),
//! so a limiter may pass it by that many keys.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock as GovernorClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::state::keyed::DashMapStateStore;
use governor::{NotUntil, Quota, RateLimiter};

use super::rules::Rate;
use crate::ConcurrentMap;
use crate::clock::SharedClock;

/// governor's view of our clock: time since the Unix epoch. While a check runs
/// for a decision ([`DecidingAt`]), it is the decision's time, read once for all
/// of the decision's rules; otherwise the clock's.
#[derive(Clone)]
pub struct LimiterClock(SharedClock);

impl GovernorClock for LimiterClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        let ms = DECIDING_AT.get().unwrap_or_else(|| self.0.now_millis());
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    }
}

thread_local! {
    /// The time of the decision whose quota this thread is checking, if any.
    static DECIDING_AT: std::cell::Cell<Option<i64>> = const { std::cell::Cell::new(None) };
}

/// The decision's time, set for the limiters on this thread while one check runs
/// (governor's calls are synchronous, so nothing else runs on the thread meanwhile);
/// the previous value comes back on drop.
struct DecidingAt(Option<i64>);

impl DecidingAt {
    fn set(at_ms: i64) -> Self {
        Self(DECIDING_AT.replace(Some(at_ms)))
    }
}

impl Drop for DecidingAt {
    fn drop(&mut self) {
        DECIDING_AT.set(self.0);
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

/// One session's GCRA state for one quota: governor's theoretical arrival time, in
/// nanoseconds since its limiter started (0: never measured), as governor's own
/// `InMemoryState` keeps it.
///
/// It is the key of a [`SessionLimiter`], because governor hands a keyed store the
/// key it was asked about: that key is the cell itself. governor's keyed limiters
/// require keys to be `Clone + Eq + Hash`; these are by the stored value (never
/// used: [`SessionCells`] neither clones, compares nor hashes its keys).
#[derive(Debug, Default)]
pub struct QuotaCell(AtomicU64);

impl Clone for QuotaCell {
    fn clone(&self) -> Self {
        Self(AtomicU64::new(self.0.load(Ordering::Relaxed)))
    }
}

impl PartialEq for QuotaCell {
    fn eq(&self, other: &Self) -> bool {
        self.0.load(Ordering::Relaxed) == other.0.load(Ordering::Relaxed)
    }
}

impl Eq for QuotaCell {}

impl Hash for QuotaCell {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.load(Ordering::Relaxed).hash(state);
    }
}

/// governor's state store for quotas kept in the sessions: the state of a key is
/// the key's own cell. The update is governor's `InMemoryState`'s: a
/// compare-and-swap loop on the cell (the session's lock already serialises its
/// requests, so the loop runs once).
#[derive(Debug, Default)]
pub struct SessionCells;

impl StateStore for SessionCells {
    type Key = QuotaCell;

    fn measure_and_replace<T, F, E>(&self, key: &QuotaCell, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut prev = key.0.load(Ordering::Acquire);
        loop {
            let (result, next) = f(NonZeroU64::new(prev).map(|n| Nanos::from(n.get())))?;
            match key.0.compare_exchange_weak(
                prev,
                next.into(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(result),
                Err(now) => prev = now,
            }
        }
    }
}

type SessionLimiter = RateLimiter<QuotaCell, SessionCells, LimiterClock, NoOpMiddleware<Duration>>;

/// A session's quota of a `sid` rule, kept in the session's state: one cell,
/// owned by the limiter of the first `sid` rule that checks the session (the
/// default rule set has one). A rule whose parameters change gets a new limiter,
/// which takes its predecessor's cell over and starts afresh, as keyed quotas do;
/// any other `sid` rule is counted in its limiter's keyed map. 16 bytes, in the
/// session's own allocation.
#[derive(Debug, Clone, Default)]
pub struct SessionQuotas {
    /// The limiter whose quota the cell holds (none yet: dangling). Weak, so a
    /// replaced limiter is freed and its cell seen to be free.
    owner: std::sync::Weak<Limiter>,
    cell: QuotaCell,
}

impl PartialEq for SessionQuotas {
    fn eq(&self, other: &Self) -> bool {
        self.owner.ptr_eq(&other.owner) && self.cell == other.cell
    }
}

impl SessionQuotas {
    /// The session's cell for `limiter`: its own; or, taken and reset, a cell no
    /// limiter has used or one the limiter's replaced predecessor held; else
    /// `None` (another rule's).
    fn cell_for(&mut self, limiter: &Arc<Limiter>) -> Option<&QuotaCell> {
        if !std::ptr::eq(self.owner.as_ptr(), Arc::as_ptr(limiter)) {
            let unused = self.owner.ptr_eq(&std::sync::Weak::new());
            let inherited = self.owner.strong_count() == 0 && self.owner.ptr_eq(&limiter.replaces);
            if !(unused || inherited) {
                return None;
            }
            self.owner = Arc::downgrade(limiter);
            self.cell = QuotaCell::default();
        }
        Some(&self.cell)
    }

    /// Whether a limiter's quota is held here.
    pub fn is_held(&self) -> bool {
        self.owner.strong_count() > 0
    }

    /// Whether the quota held here has not refilled at `now` (the limiters'
    /// clock): forgetting it would give the session a fresh quota early.
    fn pending(&self, now: Duration) -> bool {
        let Some(owner) = self.owner.upgrade() else {
            return false;
        };
        let tat = self.cell.0.load(Ordering::Acquire);
        tat != 0 && owner.start.saturating_add(Duration::from_nanos(tat)) > now
    }
}

/// How many checks a limiter takes between two looks at its key count.
pub const CAP_CHECK_EVERY: u32 = 64;

/// One rule's limiter, with the parameters it was built for.
struct Limiter {
    params: Params,
    keyed: Keyed,
    /// The same quota, on cells kept in the sessions (`sid` rules).
    sessions: SessionLimiter,
    /// The clock when `sessions` had started (read just after governor's own
    /// start, so a cell's time measured from here is never early).
    start: Duration,
    /// The limiter this one replaced (the rule's parameters changed): the sessions'
    /// cells it held pass to this one.
    replaces: std::sync::Weak<Limiter>,
    checks: AtomicU32,
}

/// The limiters of every `rate` rule, created on first use.
pub struct RateLimiters {
    clock: SharedClock,
    /// By rule id.
    limiters: ConcurrentMap<String, Arc<Limiter>>,
    max_keys: usize,
}

/// The cells of a request's cost (at least one).
fn cells(cost: u32) -> NonZeroU32 {
    NonZeroU32::new(cost).unwrap_or(NonZeroU32::MIN)
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
        let replaces = self
            .limiters
            .get(rule_id)
            .map(|l| Arc::downgrade(&l))
            .unwrap_or_default();
        let sessions = RateLimiter::new(quota, SessionCells, LimiterClock(self.clock.clone()));
        let limiter = Arc::new(Limiter {
            params,
            keyed: RateLimiter::dashmap_with_clock_and_hasher(
                quota,
                LimiterClock(self.clock.clone()),
                ahash::RandomState::new(),
            ),
            sessions,
            start: LimiterClock(self.clock.clone()).now(),
            replaces,
            checks: AtomicU32::new(0),
        });
        self.limiters
            .insert(rule_id.to_owned(), Arc::clone(&limiter));
        Some(limiter)
    }

    /// `Ok` if the request fits the quota at `at_ms` (the decision's time), else
    /// the seconds until it would.
    pub fn check(
        &self,
        rule_id: &str,
        rate: &Rate,
        key: LimitKey,
        cost: u32,
        at_ms: i64,
    ) -> Result<(), u64> {
        let _at = DecidingAt::set(at_ms);
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
        self.answer(rate, limiter.keyed.check_key_n(&key, cells(cost)))
    }

    /// [`Self::check`] for a quota counted by session, on the session's own cell.
    pub fn check_session(
        &self,
        rule_id: &str,
        rate: &Rate,
        sid: &str,
        quotas: &mut SessionQuotas,
        cost: u32,
        at_ms: i64,
    ) -> Result<(), u64> {
        let _at = DecidingAt::set(at_ms);
        let Some(limiter) = self.limiter(rule_id, rate) else {
            return Ok(());
        };
        match quotas.cell_for(&limiter) {
            Some(cell) => self.answer(rate, limiter.sessions.check_key_n(cell, cells(cost))),
            // The session's cell counts another `sid` rule: this one is kept here.
            None => self.check(rule_id, rate, LimitKey::Id(sid.into()), cost, at_ms),
        }
    }

    /// `Ok`, or the whole seconds until the request would fit.
    fn answer(
        &self,
        rate: &Rate,
        checked: Result<Result<(), NotUntil<Duration>>, governor::InsufficientCapacity>,
    ) -> Result<(), u64> {
        match checked {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(LimiterClock(self.clock.clone()).now());
                Err(wait.as_secs() + u64::from(wait.subsec_nanos() > 0))
            }
            // More than the burst in one request: it can never fit.
            Err(_) => Err(rate.per.as_secs().max(1)),
        }
    }

    /// Whether a session's state must stay in memory for its own quota: it has
    /// not refilled yet, and a state loaded again would start it afresh.
    pub fn holds_back(&self) -> impl Fn(&SessionQuotas) -> bool + use<> {
        let now = LimiterClock(self.clock.clone()).now();
        move |quotas| quotas.pending(now)
    }

    /// Drops keys whose quota has fully refilled; call periodically.
    pub fn maintain(&self) {
        for l in self.limiters.iter() {
            l.keyed.retain_recent();
            l.keyed.shrink_to_fit();
        }
    }

    /// Keys held across all limiters (quotas counted by session are held by the
    /// sessions, not here).
    pub fn keys(&self) -> usize {
        self.limiters.iter().map(|l| l.keyed.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
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
                limiters.check(
                    "r",
                    &rate(),
                    format!("k{i}").as_str().into(),
                    1,
                    clock.now_millis()
                ),
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
            assert_eq!(
                limiters.check("r", &rate(), "hot".into(), 1, clock.now_millis()),
                Ok(())
            );
        }
        assert!(
            limiters
                .check("r", &rate(), "hot".into(), 1, clock.now_millis())
                .is_err()
        );
        // Far past the cap, at the same instant: nothing has refilled, nothing goes.
        for i in 0..500 {
            let _ = limiters.check(
                "r",
                &rate(),
                format!("k{i}").as_str().into(),
                1,
                clock.now_millis(),
            );
        }
        assert!(limiters.keys() > 500);
        assert!(
            limiters
                .check("r", &rate(), "hot".into(), 1, clock.now_millis())
                .is_err()
        );
    }

    #[test]
    fn a_quota_is_measured_at_the_decisions_time_not_the_clocks() {
        let clock = Arc::new(ManualClock::at(1_800_000_000));
        let limiters = RateLimiters::new(clock.clone(), 100);
        let decided = clock.now_millis();
        for _ in 0..10 {
            assert_eq!(limiters.check("r", &rate(), "k".into(), 1, decided), Ok(()));
        }
        // The clock has moved on by the whole period; the decision's time has not.
        clock.advance(Duration::from_secs(1));
        assert_eq!(limiters.check("r", &rate(), "k".into(), 1, decided), Err(1));
        let mut quotas = SessionQuotas::default();
        let sid = Rate {
            key: RateKey::Sid,
            ..rate()
        };
        let later = clock.now_millis();
        for _ in 0..10 {
            assert_eq!(
                limiters.check_session("s", &sid, "sid", &mut quotas, 1, later),
                Ok(())
            );
        }
        clock.advance(Duration::from_secs(1));
        assert_eq!(
            limiters.check_session("s", &sid, "sid", &mut quotas, 1, later),
            Err(1)
        );
        // Once the quota has refilled at the time a decision is made, it fits again.
        let refilled = clock.now_millis();
        assert_eq!(
            limiters.check("r", &rate(), "k".into(), 1, refilled),
            Ok(())
        );
        assert_eq!(
            limiters.check_session("s", &sid, "sid", &mut quotas, 1, refilled),
            Ok(())
        );
        // Outside a check, the limiters read the clock.
        assert!(DECIDING_AT.get().is_none());
    }
}
