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

/// Milliseconds since the Unix epoch of an RFC 3339 time, rounded down: a fraction
/// of a millisecond is dropped, and before the epoch that means the earlier one.
/// Every reader of a time (events, queries, the CLI, rule cases) goes through here,
/// so a time means the same millisecond everywhere.
pub fn parse_rfc3339_ms(text: &str) -> Result<i64, time::error::Parse> {
    let t = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)?;
    // Seconds are rounded down, so the millisecond of the second is always added.
    Ok(t.unix_timestamp() * 1000 + i64::from(t.millisecond()))
}

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

    #[test]
    fn rfc3339_times_read_as_milliseconds_rounded_down() {
        for (text, ms) in [
            ("2027-01-15T08:00:00.007Z", 1_800_000_000_007),
            ("2027-01-15T09:00:00.007+01:00", 1_800_000_000_007),
            ("2027-01-15T08:00:00Z", 1_800_000_000_000),
            ("2027-01-15T08:00:00.0079Z", 1_800_000_000_007),
            ("1970-01-01T00:00:00Z", 0),
            ("1969-12-31T23:59:59.999Z", -1),
            ("1969-12-31T23:59:59.9995Z", -1),
            ("1969-12-31T23:59:59.0001Z", -1_000),
        ] {
            assert_eq!(parse_rfc3339_ms(text).ok(), Some(ms), "{text}");
        }
        for text in [
            "2027-13-15T08:00:00Z",
            "2027-01-15T08:00Z",
            "not a time",
            "",
        ] {
            assert!(parse_rfc3339_ms(text).is_err(), "{text:?}");
        }
    }
}
