//! What a run samples every `SAMPLE` of simulated time (bytes sent, whether
//! the nodes agree), kept in memory that does not grow with the simulated
//! duration: the reports need only the last `TRAFFIC_WINDOW` of traffic and
//! the current streak of agreement, and the page's charts a bounded number
//! of points.

use std::collections::VecDeque;
use std::time::Duration;
use weft_core::Time;

/// How often convergence and traffic are sampled.
pub const SAMPLE: Duration = Duration::from_millis(100);
/// Traffic window of `gossip_bytes` checks and reports.
pub const TRAFFIC_WINDOW: Duration = Duration::from_secs(10);
/// Most points a chart keeps: 409.6 s at one a sample, then every other
/// one is dropped and the stride doubles (the page is 900 pixels wide).
pub const CHART_POINTS: usize = 4096;

/// One point of the page's charts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    pub at: Time,
    /// Bytes all nodes had sent.
    pub sent: u64,
    /// The least share of running nodes holding the most common view over
    /// the samples since the previous point (1.0 = converged).
    pub agreement: f64,
}

#[derive(Debug, Default)]
pub struct Samples {
    /// The samples of the last `TRAFFIC_WINDOW`: when, and the bytes each
    /// node had sent.
    recent: VecDeque<(Time, Vec<u64>)>,
    /// Since which sample every sample saw the nodes converged (`None`
    /// when the last one did not).
    converged_since: Option<Time>,
    /// The last disruption, and the first sample at or after it.
    disruption: Time,
    first_after_disruption: Option<Time>,
    chart: Chart,
}

/// The charts' points: every `stride`-th sample.
#[derive(Debug)]
struct Chart {
    points: Vec<Point>,
    stride: u64,
    /// Samples taken so far.
    taken: u64,
    /// Least agreement since the last point.
    least: f64,
}

impl Default for Chart {
    fn default() -> Chart {
        Chart {
            points: Vec::new(),
            stride: 1,
            taken: 0,
            least: 1.0,
        }
    }
}

impl Samples {
    /// Takes a sample at `now`: the bytes each node has sent so far and the
    /// share of running nodes that agree.
    pub fn take(&mut self, now: Time, sent: &[u64], agreement: f64) {
        let converged = agreement >= 1.0;
        self.converged_since = match (converged, self.converged_since) {
            (false, _) => None,
            (true, since) => since.or(Some(now)),
        };
        self.first_after_disruption.get_or_insert(now);
        let window_start = now
            .saturating_since(Time::ZERO)
            .saturating_sub(TRAFFIC_WINDOW);
        // Reuses the vector of the sample that falls out of the window.
        let mut counts = Vec::new();
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| t.since_epoch() < window_start)
        {
            counts = self.recent.pop_front().map(|(_, c)| c).unwrap_or_default();
        }
        counts.clear();
        counts.extend_from_slice(sent);
        self.recent.push_back((now, counts));
        self.chart.take(Point {
            at: now,
            sent: sent.iter().sum(),
            agreement,
        });
    }

    /// Something disrupted the cluster at `now` (after any sample at `now`).
    pub fn disrupted(&mut self, now: Time) {
        self.disruption = now;
        let sampled_now = self.recent.back().is_some_and(|(t, _)| *t == now);
        self.first_after_disruption = sampled_now.then_some(now);
    }

    /// Time from the last disruption until the cluster converged and
    /// stayed so, if the last sample saw it converged.
    pub fn convergence_time(&self) -> Option<Duration> {
        let first = self.first_after_disruption?;
        let since = self.converged_since?.max(first);
        Some(since.saturating_since(self.disruption))
    }

    /// Bytes sent per node over the last `TRAFFIC_WINDOW`, averaged over
    /// the nodes `counted`, in bytes per second.
    pub fn bytes_per_node_per_s(&self, counted: &[usize]) -> f64 {
        let (Some((t_start, start)), Some((t_end, end))) =
            (self.recent.front(), self.recent.back())
        else {
            return 0.0;
        };
        let secs = t_end.saturating_since(*t_start).as_secs_f64();
        if secs <= 0.0 || counted.is_empty() {
            return 0.0;
        }
        let bytes: u64 = counted
            .iter()
            .map(|i| end[*i].saturating_sub(start[*i]))
            .sum();
        bytes as f64 / counted.len() as f64 / secs
    }

    /// The charts' points, at most `CHART_POINTS`.
    pub fn points(&self) -> &[Point] {
        &self.chart.points
    }
}

impl Chart {
    fn take(&mut self, sample: Point) {
        self.least = self.least.min(sample.agreement);
        let due = self.taken.is_multiple_of(self.stride);
        self.taken += 1;
        if !due {
            return;
        }
        if self.points.len() == CHART_POINTS {
            self.thin();
        }
        self.points.push(Point {
            agreement: std::mem::replace(&mut self.least, 1.0),
            ..sample
        });
    }

    /// Keeps every other point (those on the doubled stride), each with the
    /// least agreement of the two it stands for.
    fn thin(&mut self) {
        let mut kept = 0;
        for i in (0..self.points.len()).step_by(2) {
            let mut p = self.points[i];
            if i > 0 {
                p.agreement = p.agreement.min(self.points[i - 1].agreement);
            }
            self.points[kept] = p;
            kept += 1;
        }
        self.points.truncate(kept);
        self.stride *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(tenths: u64) -> Time {
        Time::from_duration(SAMPLE * tenths as u32)
    }

    #[test]
    fn memory_does_not_grow_with_the_samples_taken() {
        let mut s = Samples::default();
        for k in 0..100_000u64 {
            s.take(
                at(k),
                &[k, 2 * k, 3 * k],
                if k % 7 == 0 { 0.5 } else { 1.0 },
            );
        }
        assert!(s.points().len() <= CHART_POINTS, "{}", s.points().len());
        let window = (TRAFFIC_WINDOW.as_millis() / SAMPLE.as_millis()) as usize + 1;
        assert_eq!(s.recent.len(), window);
        // Every point lies on the stride and records the dips it covers.
        let stride = s.chart.stride;
        for p in s.points() {
            let k = p.at.saturating_since(Time::ZERO).as_millis() as u64 / 100;
            assert_eq!(k % stride, 0);
            assert_eq!(p.sent, 6 * k);
            if k > 0 {
                assert_eq!(p.agreement, 0.5, "at sample {k}");
            }
        }
    }

    #[test]
    fn traffic_is_the_rate_over_the_last_window() {
        let mut s = Samples::default();
        for k in 0..=300u64 {
            // Node 0 sends 10 bytes a sample, node 1 nothing after 5 s.
            s.take(at(k), &[10 * k, 20 * k.min(50)], 1.0);
        }
        assert_eq!(s.bytes_per_node_per_s(&[0]), 100.0);
        assert_eq!(s.bytes_per_node_per_s(&[1]), 0.0);
        assert_eq!(s.bytes_per_node_per_s(&[0, 1]), 50.0);
        assert_eq!(s.bytes_per_node_per_s(&[]), 0.0);
    }

    #[test]
    fn convergence_counts_from_the_last_disruption() {
        let mut s = Samples::default();
        assert_eq!(s.convergence_time(), None);
        s.take(at(0), &[0], 1.0);
        assert_eq!(s.convergence_time(), Some(Duration::ZERO));
        // Disrupted at 1.05 s; diverged at the next sample, agreeing from 1.5 s.
        s.disrupted(at(10) + Duration::from_millis(50));
        assert_eq!(s.convergence_time(), None, "no sample since");
        s.take(at(11), &[0], 0.5);
        assert_eq!(s.convergence_time(), None);
        for k in 12..20 {
            s.take(at(k), &[0], if k < 15 { 0.5 } else { 1.0 });
        }
        assert_eq!(s.convergence_time(), Some(Duration::from_millis(450)));
        // A disruption at a sampled instant counts that sample.
        s.disrupted(at(19));
        assert_eq!(s.convergence_time(), Some(Duration::ZERO));
        s.take(at(20), &[0], 0.9);
        assert_eq!(
            s.convergence_time(),
            None,
            "not converged at the last sample"
        );
    }
}
