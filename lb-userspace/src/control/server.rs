//! The agent's side of the control socket. The socket is created mode 0600
//! and every peer's credentials are checked: only root may talk to the agent.

use std::{os::unix::fs::PermissionsExt, path::Path};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

use super::protocol::{MAX_REQUEST_BYTES, Request, Response};

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
