//! Health checks: the rise/fall state machine (pure) and the probes (I/O).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use tokio::{net::TcpStream, sync::mpsc};

use crate::config::{HealthCheck, HealthKind};

/// The result of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeOutcome {
    pub ok: bool,
    pub latency: Duration,
    /// "connected", "HTTP 200", "connection refused", "timed out after 500ms", ...
    pub detail: String,
    pub at: SystemTime,
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

/// A probe result on its way to the agent.
#[derive(Debug)]
pub struct ProbeReport {
    pub service: String,
    pub address: IpAddr,
    /// Identifies the checker; reports of a replaced checker are ignored.
    pub generation: u64,
    pub outcome: ProbeOutcome,
}

/// Runs `check` against `address` forever, reporting every result. The first
/// probe starts at a random point within the first interval, so the probes
/// of many backends do not run in lockstep; after that at a fixed period.
pub async fn run_checker(
    service: String,
    address: IpAddr,
    check: HealthCheck,
    generation: u64,
    reports: mpsc::UnboundedSender<ProbeReport>,
) {
    let jitter = check.interval.mul_f64(fastrand::f64());
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + jitter, check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let client = http_client(&check);
    loop {
        ticks.tick().await;
        let outcome = probe(address, &check, client.as_ref()).await;
        let report = ProbeReport { service: service.clone(), address, generation, outcome };
        if reports.send(report).is_err() {
            return; // the agent is gone
        }
    }
}

fn http_client(check: &HealthCheck) -> Option<reqwest::Client> {
    if check.kind != HealthKind::Http {
        return None;
    }
    reqwest::Client::builder()
        .no_proxy()
        // A new connection for every probe: the probe checks that the
        // backend accepts connections, not that an old one still works.
        .pool_max_idle_per_host(0)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(check.timeout)
        .build()
        .ok()
}

pub async fn probe(address: IpAddr, check: &HealthCheck, client: Option<&reqwest::Client>) -> ProbeOutcome {
    let start = std::time::Instant::now();
    let at = SystemTime::now();
    let target = SocketAddr::new(address, check.port);
    let result = match check.kind {
        HealthKind::None => Ok("not checked".to_string()),
        HealthKind::Tcp => match tokio::time::timeout(check.timeout, TcpStream::connect(target)).await {
            Ok(Ok(_)) => Ok("connected".to_string()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("timed out after {:?}", check.timeout)),
        },
        HealthKind::Http => match client {
            Some(client) => http_probe(client, target, check).await,
            None => Err("no HTTP client".to_string()),
        },
    };
    let latency = start.elapsed();
    match result {
        Ok(detail) => ProbeOutcome { ok: true, latency, detail, at },
        Err(detail) => ProbeOutcome { ok: false, latency, detail, at },
    }
}

async fn http_probe(client: &reqwest::Client, target: SocketAddr, check: &HealthCheck) -> Result<String, String> {
    let url = format!("http://{target}{}", check.path);
    let response = client.get(&url).send().await.map_err(|e| {
        if e.is_timeout() { format!("timed out after {:?}", check.timeout) } else { describe_reqwest_error(&e) }
    })?;
    let status = response.status().as_u16();
    if !check.expect_status.contains(&status) {
        return Err(format!("HTTP {status}, expected {:?}", check.expect_status));
    }
    if let Some(needle) = &check.expect_body {
        let body = response.text().await.map_err(|e| describe_reqwest_error(&e))?;
        if !body.contains(needle.as_str()) {
            return Err(format!("HTTP {status} body lacks {needle:?}"));
        }
    }
    Ok(format!("HTTP {status}"))
}

/// The innermost cause: "connection refused" rather than "error sending request".
fn describe_reqwest_error(e: &reqwest::Error) -> String {
    let mut source: &dyn std::error::Error = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(ok: bool) -> ProbeOutcome {
        ProbeOutcome { ok, latency: Duration::from_millis(1), detail: String::new(), at: SystemTime::UNIX_EPOCH }
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
    fn rise_and_fall_of_one_flip_on_every_change() {
        let mut s = HealthState::default();
        assert_eq!(feed(&mut s, "-+-", 1, 1), [Some(false), Some(true), Some(false)]);
        assert_eq!(s.last.as_ref().map(|o| o.ok), Some(false));
    }
}
