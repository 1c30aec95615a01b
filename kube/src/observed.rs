//! How long this agent has seen each Lease record unchanged, on its own
//! monotonic clock, and which Leases it is acting under right now.
//!
//! Lease times written by another node come from that node's wall clock,
//! so comparing them with ours breaks as soon as the clocks differ by more
//! than a lease duration. As client-go's leader election does, an agent
//! instead remembers when it last saw the record change (its
//! resourceVersion) and calls a claim stale only after seeing it unchanged
//! for the whole lease duration on its own clock. The holder's write
//! happened before any observer could see it, so a holder that acts only
//! within a lease duration of *sending* its last successful write acts
//! before anyone may take over, whatever the wall clocks say.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// One Lease's record as last seen.
#[derive(Debug, Clone)]
struct Seen {
    version: String,
    since: Instant,
}

#[derive(Debug, Default)]
struct State {
    seen: BTreeMap<String, Seen>,
    /// Leases a task of this agent holds and is acting under.
    active: BTreeSet<String>,
}

/// Shared by every clone of a [`crate::Reclaimer`] in one agent.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    state: Arc<Mutex<State>>,
}

impl Observed {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated
        // (each update is one insert or remove), so a poisoned lock is usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records that `lease` reads `version` now (`None`: no such Lease) and
    /// returns how long it has read the same.
    pub fn unchanged_for(&self, lease: &str, version: Option<&str>) -> Duration {
        self.unchanged_for_at(lease, version, Instant::now())
    }

    fn unchanged_for_at(&self, lease: &str, version: Option<&str>, now: Instant) -> Duration {
        let mut state = self.lock();
        let Some(version) = version else {
            state.seen.remove(lease);
            return Duration::ZERO;
        };
        let seen = state.seen.entry(lease.to_string()).or_insert(Seen {
            version: version.to_string(),
            since: now,
        });
        if seen.version != version {
            *seen = Seen {
                version: version.to_string(),
                since: now,
            };
        }
        now.saturating_duration_since(seen.since)
    }

    /// Drops what is known about a settled Lease.
    pub fn forget(&self, lease: &str) {
        self.lock().seen.remove(lease);
    }

    /// Marks `lease` as acted under by this agent; `None` if another task
    /// of this agent already is (a second delete event for the same Node,
    /// or a sweep racing a watch event). The mark ends when the guard drops.
    pub fn begin(&self, lease: &str) -> Option<Active> {
        self.lock()
            .active
            .insert(lease.to_string())
            .then(|| Active {
                observed: self.clone(),
                lease: lease.to_string(),
            })
    }
}

/// This agent's exclusive turn at one Lease.
#[derive(Debug)]
pub struct Active {
    observed: Observed,
    lease: String,
}

impl Drop for Active {
    fn drop(&mut self) {
        self.observed.lock().active.remove(&self.lease);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_counts_from_the_last_change_seen() {
        let o = Observed::default();
        let t0 = Instant::now();
        let s = Duration::from_secs;
        assert_eq!(o.unchanged_for_at("l", Some("1"), t0), s(0));
        assert_eq!(o.unchanged_for_at("l", Some("1"), t0 + s(5)), s(5));
        // A renewal (new resourceVersion) starts the count again.
        assert_eq!(o.unchanged_for_at("l", Some("2"), t0 + s(6)), s(0));
        assert_eq!(o.unchanged_for_at("l", Some("2"), t0 + s(9)), s(3));
        // Gone and back: a new record.
        assert_eq!(o.unchanged_for_at("l", None, t0 + s(10)), s(0));
        assert_eq!(o.unchanged_for_at("l", Some("2"), t0 + s(11)), s(0));
        o.forget("l");
        assert_eq!(o.unchanged_for_at("l", Some("2"), t0 + s(12)), s(0));
        // Other Leases are counted apart.
        assert_eq!(o.unchanged_for_at("m", Some("2"), t0 + s(20)), s(0));
        assert_eq!(o.unchanged_for_at("l", Some("2"), t0 + s(20)), s(8));
    }

    #[test]
    fn one_task_at_a_time_acts_under_a_lease() {
        let o = Observed::default();
        let first = o.begin("l").unwrap();
        assert!(o.begin("l").is_none());
        assert!(o.clone().begin("m").is_some());
        drop(first);
        assert!(o.begin("l").is_some());
    }
}
