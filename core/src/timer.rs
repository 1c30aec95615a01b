//! The router's timers: one table of deadlines, after quinn-proto's
//! `TimerTable`, so the next wake-up is one minimum over it and a new timer
//! is a new variant the compiler makes every handler consider.

use crate::time::Time;

/// What the router does when time passes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timer {
    /// Debounced routes, learnt addresses and the IPAM step.
    Housekeeping,
    /// Announce our changed connection list.
    Announce,
    /// The heartbeat tick: liveness, heartbeats, forgetting, anti-entropy.
    /// Always armed.
    Tick,
    /// Probe silent links, while there are any.
    Probe,
    /// Push news to a few peers, while there is news.
    Gossip,
    /// Try the addresses due for a connection attempt.
    Attempt,
}

impl Timer {
    /// Every timer, in the order due ones run at the same instant (the
    /// simulator's traces depend on it).
    pub const ALL: [Timer; 6] = [
        Timer::Housekeeping,
        Timer::Announce,
        Timer::Tick,
        Timer::Probe,
        Timer::Gossip,
        Timer::Attempt,
    ];
}

// The table indexes its slots by discriminant: `ALL` must list them in order.
const _: () = {
    let mut i = 0;
    while i < Timer::ALL.len() {
        assert!(Timer::ALL[i] as usize == i);
        i += 1;
    }
};

/// When each timer is due; `None` when stopped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TimerTable {
    due: [Option<Time>; Timer::ALL.len()],
}

impl TimerTable {
    pub fn set(&mut self, timer: Timer, at: Time) {
        self.due[timer as usize] = Some(at);
    }

    /// Sets `timer` to `at`, or stops it when `at` is `None`.
    pub fn set_or_stop(&mut self, timer: Timer, at: Option<Time>) {
        self.due[timer as usize] = at;
    }

    pub fn get(&self, timer: Timer) -> Option<Time> {
        self.due[timer as usize]
    }

    pub fn is_armed(&self, timer: Timer) -> bool {
        self.get(timer).is_some()
    }

    pub fn stop(&mut self, timer: Timer) {
        self.due[timer as usize] = None;
    }

    /// The earliest deadline of all armed timers.
    pub fn next_timeout(&self) -> Option<Time> {
        self.due.iter().flatten().min().copied()
    }

    /// Whether `timer` is armed and due at `now`.
    pub fn is_expired(&self, timer: Timer, now: Time) -> bool {
        self.get(timer).is_some_and(|at| at <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Time {
        Time::from_millis(n)
    }

    #[test]
    fn a_new_table_has_nothing_armed() {
        let table = TimerTable::default();
        assert_eq!(table.next_timeout(), None);
        for timer in Timer::ALL {
            assert!(!table.is_armed(timer));
            assert!(!table.is_expired(timer, Time::from_duration(std::time::Duration::MAX)));
        }
    }

    #[test]
    fn the_next_timeout_is_the_earliest_armed_deadline() {
        let mut table = TimerTable::default();
        table.set(Timer::Tick, ms(1000));
        table.set(Timer::Gossip, ms(200));
        table.set(Timer::Attempt, ms(500));
        assert_eq!(table.next_timeout(), Some(ms(200)));
        table.stop(Timer::Gossip);
        assert_eq!(table.next_timeout(), Some(ms(500)));
        table.set_or_stop(Timer::Attempt, None);
        assert_eq!(table.next_timeout(), Some(ms(1000)));
        table.set(Timer::Tick, ms(1500));
        assert_eq!(table.get(Timer::Tick), Some(ms(1500)), "set replaces");
    }

    #[test]
    fn a_timer_expires_at_its_deadline_not_before() {
        let mut table = TimerTable::default();
        table.set_or_stop(Timer::Probe, Some(ms(250)));
        assert!(!table.is_expired(Timer::Probe, ms(249)));
        assert!(table.is_expired(Timer::Probe, ms(250)));
        assert!(table.is_expired(Timer::Probe, ms(251)));
        assert!(!table.is_expired(Timer::Announce, ms(251)), "others stay");
        table.stop(Timer::Probe);
        assert!(!table.is_expired(Timer::Probe, ms(251)));
    }

    #[test]
    fn timers_are_independent() {
        let mut table = TimerTable::default();
        for (k, timer) in Timer::ALL.into_iter().enumerate() {
            table.set(timer, ms(k as u64));
        }
        for (k, timer) in Timer::ALL.into_iter().enumerate() {
            assert_eq!(table.get(timer), Some(ms(k as u64)));
        }
    }
}
