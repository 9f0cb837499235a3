//! The probes: TCP connect or HTTP GET from the LB host to each backend,
//! on a timer per backend, reported to the agent.

use std::{
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

use tokio::{net::TcpStream, sync::mpsc};

use super::ProbeOutcome;
use crate::config::{HealthCheck, HealthKind};

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
