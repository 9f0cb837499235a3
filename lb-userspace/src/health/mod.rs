//! Health checks: the rise/fall state machine (pure) here, the probes (I/O)
//! in `probe`.

mod probe;

use std::time::{Duration, SystemTime};

pub use self::probe::{ProbeReport, TunnelSlot, probe, run_checker};

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub ok: bool,
    pub latency: Duration,
    /// "connected", "HTTP 200", "connection refused", "timed out after 500ms", ...
    pub detail: String,
    pub at: SystemTime,
    /// Failed for a reason on the LB itself (out of file descriptors or
    /// buffers, no route, no local address): no evidence against the
    /// backend, so it counts toward neither `fall` nor `rise`.
    pub local: bool,
}

/// Consecutive-result health state of one backend. A backend starts up (so
/// that an agent start does not empty every ring while the first probes run)
/// and goes down after `fall` consecutive failures, up after `rise`
/// consecutive successes. A success resets the failure streak and vice versa.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthState {
    pub up: bool,
    ok_streak: u32,
    fail_streak: u32,
    pub last: Option<ProbeOutcome>,
    pub transitions: u64,
}

impl Default for HealthState {
    fn default() -> Self {
        Self { up: true, ok_streak: 0, fail_streak: 0, last: None, transitions: 0 }
    }
}

impl HealthState {
    /// Records a probe; returns the new state when it changed.
    pub fn record(&mut self, outcome: ProbeOutcome, rise: u32, fall: u32) -> Option<bool> {
        if outcome.local {
            return None;
        }
        if outcome.ok {
            self.ok_streak += 1;
            self.fail_streak = 0;
        } else {
            self.fail_streak += 1;
            self.ok_streak = 0;
        }
        self.last = Some(outcome);
        let next = if self.up { self.fail_streak < fall } else { self.ok_streak >= rise };
        if next == self.up {
            return None;
        }
        self.up = next;
        self.transitions += 1;
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ok: bool) -> ProbeOutcome {
        ProbeOutcome {
            ok,
            latency: Duration::from_millis(1),
            detail: String::new(),
            at: SystemTime::UNIX_EPOCH,
            local: false,
        }
    }

    fn feed(state: &mut HealthState, results: &str, rise: u32, fall: u32) -> Vec<Option<bool>> {
        results.chars().map(|c| state.record(outcome(c == '+'), rise, fall)).collect()
    }

    #[test]
    fn goes_down_after_fall_consecutive_failures() {
        let mut s = HealthState::default();
        assert!(s.up);
        assert_eq!(feed(&mut s, "--", 2, 3), [None, None]);
        assert_eq!(feed(&mut s, "-", 2, 3), [Some(false)]);
        assert!(!s.up);
        assert_eq!(s.transitions, 1);
    }

    #[test]
    fn streaks_are_consecutive_not_cumulative() {
        let mut s = HealthState::default();
        // Five failures, never three in a row: stays up.
        assert!(feed(&mut s, "--+--+-+", 2, 3).iter().all(Option::is_none));
        assert!(s.up);
        assert_eq!(feed(&mut s, "---", 2, 3), [None, None, Some(false)]);
        // Down: successes must come `rise` in a row.
        assert!(feed(&mut s, "+-+-+-", 2, 3).iter().all(Option::is_none));
        assert!(!s.up);
        assert_eq!(feed(&mut s, "++", 2, 3), [None, Some(true)]);
        assert_eq!(s.transitions, 2);
    }

    #[test]
    fn local_failures_count_toward_nothing() {
        let mut s = HealthState::default();
        let local = ProbeOutcome { local: true, ..outcome(false) };
        for _ in 0..100 {
            assert_eq!(s.record(local.clone(), 2, 3), None);
        }
        assert!(s.up, "local errors marked the backend down");
        // Nor do they break a streak: two failures, local ones, a third failure.
        assert_eq!(feed(&mut s, "--", 2, 3), [None, None]);
        assert_eq!(s.record(local, 2, 3), None);
        assert_eq!(feed(&mut s, "-", 2, 3), [Some(false)]);
    }

    #[test]
    fn rise_and_fall_of_one_flip_on_every_change() {
        let mut s = HealthState::default();
        assert_eq!(feed(&mut s, "-+-", 1, 1), [Some(false), Some(true), Some(false)]);
        assert_eq!(s.last.as_ref().map(|o| o.ok), Some(false));
    }
}
