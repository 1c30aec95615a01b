//! Virtual time. The core never reads a clock: every input carries `now`.

use std::ops::{Add, Sub};
use std::time::Duration;

/// A point in time, measured from an epoch the caller chooses (boot of the
/// agent, start of a simulation). Only differences between two `Time`s mean
/// anything, so the same code runs on a real clock and on a virtual one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(Duration);

impl Time {
    pub const ZERO: Time = Time(Duration::ZERO);

    pub const fn from_duration(since_epoch: Duration) -> Time {
        Time(since_epoch)
    }

    pub const fn from_millis(ms: u64) -> Time {
        Time(Duration::from_millis(ms))
    }

    pub const fn since_epoch(self) -> Duration {
        self.0
    }

    /// Time elapsed from `earlier` to `self`, or zero if `earlier` is later.
    pub fn saturating_since(self, earlier: Time) -> Duration {
        self.0.saturating_sub(earlier.0)
    }
}

impl Add<Duration> for Time {
    type Output = Time;
    fn add(self, d: Duration) -> Time {
        Time(self.0.saturating_add(d))
    }
}

impl Sub<Duration> for Time {
    type Output = Time;
    fn sub(self, d: Duration) -> Time {
        Time(self.0.saturating_sub(d))
    }
}

impl std::fmt::Display for Time {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.3}s", self.0.as_secs_f64())
    }
}
