//! When a failed save of the node's state is tried again, and when the
//! loop gives up. A save can fail for a moment (no file descriptors left,
//! a disk briefly full or read-only); the node then answers nothing that
//! depends on the unsaved state and tries again, backing off. Only a
//! failure that lasts [`GIVE_UP_AFTER`] stops the loop, and with it the
//! agent, so that the node is restarted rather than left unable to
//! allocate without anyone noticing.

use std::time::Duration;

/// The wait before the second attempt; each later wait doubles.
pub const FIRST_WAIT: Duration = Duration::from_millis(100);
/// The longest wait between two attempts.
pub const MAX_WAIT: Duration = Duration::from_secs(10);
/// How long saves may fail without a break before the loop stops.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(120);

/// What to do after the `attempt`-th failure in a row (counting from 1),
/// when the first of them was `failing_for` ago: wait this long and try
/// again, or `None`: give up.
pub fn retry_after(attempt: u32, failing_for: Duration) -> Option<Duration> {
    if failing_for >= GIVE_UP_AFTER {
        return None;
    }
    let doublings = attempt.saturating_sub(1).min(31);
    let wait = FIRST_WAIT.saturating_mul(1 << doublings).min(MAX_WAIT);
    // The last wait ends at the bound, so the final attempt is made there.
    Some(wait.min(GIVE_UP_AFTER - failing_for))
}

/// Saves failing right now: for status and the local API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveTrouble {
    /// The last error.
    pub error: String,
    /// Failed attempts in a row.
    pub attempts: u32,
    /// Since the first of them.
    pub failing_for: Duration,
    /// Until the next attempt.
    pub retry_in: Duration,
}

impl std::fmt::Display for SaveTrouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "cannot save the node's state ({}); failing for {} s, {} attempts, next in {} ms; the agent stops if this lasts {} s",
            self.error,
            self.failing_for.as_secs(),
            self.attempts,
            self.retry_in.as_millis(),
            GIVE_UP_AFTER.as_secs()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn waits_double_from_100_ms_up_to_10_s() {
        let waits: Vec<u128> = (1..=9)
            .map(|a| retry_after(a, Duration::ZERO).unwrap().as_millis())
            .collect();
        assert_eq!(
            waits,
            [100, 200, 400, 800, 1_600, 3_200, 6_400, 10_000, 10_000]
        );
        assert_eq!(retry_after(u32::MAX, S), Some(MAX_WAIT));
    }

    #[test]
    fn gives_up_once_saves_failed_for_two_minutes_with_a_last_try_at_the_bound() {
        assert_eq!(retry_after(20, 115 * S), Some(5 * S));
        assert_eq!(retry_after(20, 119 * S), Some(S));
        assert_eq!(retry_after(21, 120 * S), None);
        assert_eq!(retry_after(1, 600 * S), None);
    }

    #[test]
    fn trouble_reads_as_a_sentence_with_the_bound() {
        let t = SaveTrouble {
            error: "Too many open files (os error 24)".into(),
            attempts: 3,
            failing_for: 2 * S,
            retry_in: Duration::from_millis(400),
        };
        let text = t.to_string();
        assert!(text.contains("Too many open files"), "{text}");
        assert!(text.contains("stops if this lasts 120 s"), "{text}");
    }
}
