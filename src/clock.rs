//! The one source of time. Everything that needs "now" (token minting and
//! verification, refresh grace windows, revocation pruning) asks a [`Clock`],
//! so tests move time with [`ManualClock`] instead of sleeping.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A point in time as whole seconds since the Unix epoch (what JWTs and the store use).
pub type UnixSeconds = i64;

pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_millis(&self) -> i64;

    /// Whole seconds since the Unix epoch.
    fn now(&self) -> UnixSeconds {
        self.now_millis().div_euclid(1000)
    }
}

pub type SharedClock = Arc<dyn Clock>;

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to. Used by tests and by replay.
#[derive(Debug)]
pub struct ManualClock {
    millis: AtomicI64,
}

impl ManualClock {
    pub fn at(unix_seconds: UnixSeconds) -> Self {
        Self {
            millis: AtomicI64::new(unix_seconds.saturating_mul(1000)),
        }
    }

    pub fn advance(&self, by: Duration) {
        let ms = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.millis.fetch_add(ms, Ordering::SeqCst);
    }

    pub fn set_millis(&self, millis: i64) {
        self.millis.store(millis, Ordering::SeqCst);
    }

    pub fn set(&self, unix_seconds: UnixSeconds) {
        self.millis
            .store(unix_seconds.saturating_mul(1000), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> i64 {
        self.millis.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::at(1_700_000_000);
        assert_eq!(clock.now(), 1_700_000_000);
        clock.advance(Duration::from_millis(1500));
        assert_eq!(clock.now(), 1_700_000_001);
        assert_eq!(clock.now_millis(), 1_700_000_001_500);
    }
}
