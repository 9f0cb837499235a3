//! The control socket: the protocol the `xdplb` CLI speaks with a running
//! agent, and the server side of it.
//!
//! One JSON object per line each way. The socket is created mode 0600 and
//! every peer's credentials are checked: only root may talk to the agent.

use std::{
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

/// Longest request line accepted; anything longer is malformed.
const MAX_REQUEST_BYTES: usize = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    Status {},
    BackendAdd {
        service: String,
        address: String,
        weight: Option<u32>,
    },
    BackendRemove {
        service: String,
        address: String,
    },
    BackendDrain {
        service: String,
        address: String,
    },
    BackendEnable {
        service: String,
        address: String,
    },
    BackendWeight {
        service: String,
        address: String,
        weight: u32,
    },
    /// `toml` holds one `[[service]]` table, exactly as in the config file.
    ServiceAdd {
        toml: String,
    },
    ServiceRemove {
        name: String,
    },
    Reload {},
    /// End the agent; with `detach`, also remove the program and pinned state.
    Stop {
        detach: bool,
    },
    /// Switch eBPF-side debug logging (swaps in a program built for it).
    Debug {
        on: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Response {
    Status { ok: bool, status: Status },
    Done { ok: bool, message: String },
    Error { ok: bool, error: String },
}

impl Response {
    pub fn done(message: impl Into<String>) -> Self {
        Response::Done { ok: true, message: message.into() }
    }
    pub fn error(error: impl Into<String>) -> Self {
        Response::Error { ok: false, error: error.into() }
    }
}

/// `xdplb status --json`. Field names and meanings are stable; new fields
/// may be added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub interface: String,
    pub services: Vec<ServiceStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceStatus {
    pub name: String,
    pub vip: String,
    pub protocol: String,
    pub forwarding: String,
    pub scheduler: String,
    /// Client affinity in seconds; 0 = off.
    pub persistence_timeout_s: u32,
    /// Every backend is down and the service keeps them all in its ring.
    pub fail_open: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub backends: Vec<BackendStatus>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendStatus {
    pub address: String,
    pub weight: u32,
    /// The weight the scheduler uses now: 0 when the backend takes no new
    /// flows; least_response_time's derived weight.
    pub effective_weight: u32,
    /// least_conn only: the data plane's live count of active flows.
    pub least_conn_active: Option<u64>,
    /// "up", "down", or "unchecked" (health check kind none).
    pub health: String,
    pub last_probe: Option<ProbeStatus>,
    /// "enabled", "draining" or "drained".
    pub admin: String,
    /// Takes new flows right now.
    pub in_ring: bool,
    /// The neighbour is resolved (MAC known); unresolved backends get no traffic.
    pub resolved: bool,
    pub active_flows: u64,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub ok: bool,
    pub detail: String,
    pub latency_ms: f64,
    /// Milliseconds since the probe started.
    pub age_ms: u64,
}

/// A request on its way to the agent, with where to send the answer.
pub struct ControlCall {
    pub request: Request,
    pub reply: oneshot::Sender<Response>,
}

/// Binds the socket: parent directory created, a stale socket replaced,
/// mode 0600.
pub fn bind(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!("{} is in use: is another xdplb agent running?", path.display());
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Accepts CLI connections until the agent goes away.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<ControlCall>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let calls = calls.clone();
        tokio::spawn(async move {
            if let Err(err) = handle(stream, calls).await {
                log::debug!("control connection: {err:#}");
            }
        });
    }
}

async fn handle(stream: UnixStream, calls: mpsc::Sender<ControlCall>) -> Result<()> {
    let uid = stream.peer_cred()?.uid();
    let (read, mut write) = stream.into_split();
    if uid != 0 {
        log::warn!("control socket: refused a connection from uid {uid}");
        let reply = serde_json::to_string(&Response::error("permission denied: only root may control xdplb"))?;
        write.write_all(format!("{reply}\n").as_bytes()).await?;
        return Ok(());
    }
    let mut lines = BufReader::new(read).take(MAX_REQUEST_BYTES as u64 * 16);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let response = if line.len() > MAX_REQUEST_BYTES {
            Response::error(format!("request longer than {MAX_REQUEST_BYTES} bytes"))
        } else {
            match serde_json::from_str::<Request>(line.trim_end()) {
                Err(err) => Response::error(format!("malformed request: {err}")),
                Ok(request) => {
                    let (reply, answer) = oneshot::channel();
                    if calls.send(ControlCall { request, reply }).await.is_err() {
                        return Ok(());
                    }
                    answer.await.unwrap_or_else(|_| Response::error("the agent is shutting down"))
                }
            }
        };
        let mut text = serde_json::to_string(&response)?;
        text.push('\n');
        write.write_all(text.as_bytes()).await?;
    }
}

/// The CLI side: sends one request, returns the answer.
pub fn call(socket: &PathBuf, request: &Request) -> Result<Response> {
    use std::io::{BufRead as _, Write as _};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!("connecting to the agent at {} (is `xdplb run` running? are you root?)", socket.display())
    })?;
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    stream.write_all(line.as_bytes())?;
    let mut answer = String::new();
    std::io::BufReader::new(stream).read_line(&mut answer)?;
    if answer.is_empty() {
        bail!("the agent closed the connection without answering");
    }
    serde_json::from_str(&answer).with_context(|| format!("unreadable answer from the agent: {answer:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let r = Request::BackendWeight { service: "web".into(), address: "198.18.1.11".into(), weight: 3 };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"cmd":"backend_weight","service":"web","address":"198.18.1.11","weight":3}"#
        );
        assert_eq!(serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(), Request::Status {});
    }

    #[test]
    fn malformed_requests_are_rejected() {
        for bad in [
            r#"{"cmd":"explode"}"#,
            r#"{"cmd":"backend_drain","service":"web"}"#,
            "not json",
            r#"{"cmd":"status","x":1}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_round_trip() {
        for r in [Response::done("ok"), Response::error("no such service \"x\"")] {
            let text = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Response>(&text).unwrap(), r);
        }
    }
}
