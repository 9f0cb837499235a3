//! The probes: TCP connect or HTTP GET from the LB host to each backend,
//! on a timer per backend, reported to the agent. A probe through the
//! tunnel connects to the VIP instead, on a socket marked with the
//! backend's id, which the tc program encapsulates to that backend.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::SystemTime,
};

use http_body_util::{BodyExt as _, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::{
    net::{TcpSocket, TcpStream},
    sync::mpsc,
};

use super::ProbeOutcome;
use crate::config::{BackendAddress, HealthCheck, HealthKind};

/// A probe result on its way to the agent.
#[derive(Debug)]
pub struct ProbeReport {
    pub service: String,
    pub address: BackendAddress,
    /// Identifies the checker; reports of a replaced checker are ignored.
    pub generation: u64,
    pub outcome: ProbeOutcome,
}

/// The backend slot a tunnelled probe is encapsulated to: set by the agent
/// after each reconcile (0 while the backend has no slot).
pub type TunnelSlot = Arc<AtomicU32>;

/// Runs `check` against `address` forever, reporting every result. The first
/// probe starts at a random point within the first interval, so the probes
/// of many backends do not run in lockstep; after that at a fixed period.
pub async fn run_checker(
    service: String,
    address: BackendAddress,
    check: HealthCheck,
    tunnel_slot: TunnelSlot,
    generation: u64,
    reports: mpsc::UnboundedSender<ProbeReport>,
) {
    let jitter = check.interval.mul_f64(fastrand::f64());
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + jitter, check.interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let outcome = probe(address.ip, &check, tunnel_slot.load(Ordering::Relaxed)).await;
        let report = ProbeReport { service: service.clone(), address, generation, outcome };
        if reports.send(report).is_err() {
            return; // the agent is gone
        }
    }
}

/// One probe. `tunnel_slot` is the backend's slot, for probes through the
/// tunnel.
pub async fn probe(address: IpAddr, check: &HealthCheck, tunnel_slot: u32) -> ProbeOutcome {
    let start = std::time::Instant::now();
    let at = SystemTime::now();
    let result = match check.kind {
        HealthKind::None => Ok("not checked".to_string()),
        kind => match tokio::time::timeout(check.timeout, probe_once(kind, address, check, tunnel_slot)).await {
            Ok(result) => result,
            Err(_) => Err(Failure::Backend(format!("timed out after {:?}", check.timeout))),
        },
    };
    let latency = start.elapsed();
    match result {
        Ok(detail) => ProbeOutcome { ok: true, latency, detail, at, local: false },
        Err(Failure::Backend(detail)) => ProbeOutcome { ok: false, latency, detail, at, local: false },
        Err(Failure::Local(detail)) => ProbeOutcome { ok: false, latency, detail, at, local: true },
    }
}

/// Why a probe failed: the backend, or the LB itself.
enum Failure {
    Backend(String),
    Local(String),
}

impl From<String> for Failure {
    fn from(detail: String) -> Self {
        Failure::Backend(detail)
    }
}

/// Errors a probe meets on the LB host itself, whatever the backend does:
/// out of file descriptors, buffers or memory, no route or no usable local
/// address, or the host's own firewall. ECONNREFUSED, EHOSTUNREACH (the
/// neighbour does not answer) and timeouts are the backend's.
pub fn is_local_failure(err: &std::io::Error) -> bool {
    use nix::errno::Errno;
    let local = [
        Errno::EMFILE,
        Errno::ENFILE,
        Errno::ENOBUFS,
        Errno::ENOMEM,
        Errno::ENETUNREACH,
        Errno::EADDRNOTAVAIL,
        Errno::EPERM,
        Errno::EACCES,
    ];
    err.raw_os_error().is_some_and(|code| local.iter().any(|e| *e as i32 == code))
}

async fn probe_once(
    kind: HealthKind,
    address: IpAddr,
    check: &HealthCheck,
    tunnel_slot: u32,
) -> Result<String, Failure> {
    let (target, mark) = match check.through_tunnel {
        Some(vip) if tunnel_slot == 0 => {
            return Err(Failure::Backend(format!(
                "no tunnel to the backend yet (probing {vip} through it needs a resolved path)"
            )));
        }
        Some(vip) => (SocketAddr::new(vip, check.port), Some(lb_common::PROBE_MARK | tunnel_slot)),
        None => (SocketAddr::new(address, check.port), None),
    };
    let stream = connect(target, mark).await.map_err(|e| {
        if is_local_failure(&e) {
            Failure::Local(format!("local error, not counted: {e}"))
        } else {
            Failure::Backend(e.to_string())
        }
    })?;
    let via = if mark.is_some() { " through the tunnel" } else { "" };
    match kind {
        HealthKind::Http => Ok(http_get(stream, target, check).await.map(|status| format!("{status}{via}"))?),
        _ => Ok(format!("connected{via}")),
    }
}

async fn connect(target: SocketAddr, mark: Option<u32>) -> std::io::Result<TcpStream> {
    let socket = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(mark) = mark {
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Mark, &mark)?;
    }
    socket.connect(target).await
}

/// HTTP/1.1 GET on a new connection: the probe checks that the backend
/// accepts connections, not that an old one still works.
async fn http_get(stream: TcpStream, target: SocketAddr, check: &HealthCheck) -> Result<String, String> {
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| innermost(&e))?;
    let driver = tokio::spawn(connection);
    let request = hyper::Request::get(check.path.as_str())
        .header(hyper::header::HOST, target.to_string())
        .header(hyper::header::CONNECTION, "close")
        .header(hyper::header::USER_AGENT, concat!("xdplb/", env!("CARGO_PKG_VERSION")))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let result = async {
        let response = sender.send_request(request).await.map_err(|e| innermost(&e))?;
        let status = response.status().as_u16();
        if !check.expect_status.contains(&status) {
            return Err(format!("HTTP {status}, expected {:?}", check.expect_status));
        }
        if let Some(needle) = &check.expect_body {
            let body = response.into_body().collect().await.map_err(|e| innermost(&e))?.to_bytes();
            if !String::from_utf8_lossy(&body).contains(needle.as_str()) {
                return Err(format!("HTTP {status} body lacks {needle:?}"));
            }
        }
        Ok(format!("HTTP {status}"))
    }
    .await;
    driver.abort();
    result
}

/// The innermost cause: "connection reset by peer" rather than "error sending request".
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut source = e;
    while let Some(next) = source.source() {
        source = next;
    }
    source.to_string()
}

#[cfg(test)]
mod tests {
    use std::io::Error;

    use super::*;

    #[test]
    fn failures_of_the_lb_itself_are_told_from_the_backends() {
        for local in [libc_errno(nix::errno::Errno::EMFILE), libc_errno(nix::errno::Errno::ENOBUFS)] {
            assert!(is_local_failure(&local), "{local}");
        }
        assert!(is_local_failure(&libc_errno(nix::errno::Errno::ENETUNREACH)));
        for backend in [nix::errno::Errno::ECONNREFUSED, nix::errno::Errno::EHOSTUNREACH, nix::errno::Errno::ETIMEDOUT]
        {
            assert!(!is_local_failure(&libc_errno(backend)), "{backend}");
        }
        assert!(!is_local_failure(&Error::other("no errno")));
    }

    fn libc_errno(errno: nix::errno::Errno) -> Error {
        Error::from_raw_os_error(errno as i32)
    }
}
