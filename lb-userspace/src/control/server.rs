//! The agent's side of the control socket. The socket is created mode 0600
//! and every peer's credentials are checked: only root may talk to the agent.

use std::{os::unix::fs::PermissionsExt, path::Path};

use anyhow::{Context as _, Result, bail};
use futures::{SinkExt as _, StreamExt as _};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::codec::{Framed, LinesCodec, LinesCodecError};

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
    // The limit holds while reading: a longer line is discarded as it
    // arrives, never buffered whole.
    let mut lines = Framed::new(stream, LinesCodec::new_with_max_length(MAX_REQUEST_BYTES));
    if uid != 0 {
        log::warn!("control socket: refused a connection from uid {uid}");
        let refusal = Response::error("permission denied: only root may control xdplb");
        lines.send(serde_json::to_string(&refusal)?).await?;
        return Ok(());
    }
    while let Some(line) = lines.next().await {
        let response = match line {
            Ok(line) => match serde_json::from_str::<Request>(line.trim_end()) {
                Err(err) => Response::error(format!("malformed request: {err}")),
                Ok(request) => {
                    let (reply, answer) = oneshot::channel();
                    if calls.send(ControlCall { request, reply }).await.is_err() {
                        return Ok(());
                    }
                    answer.await.unwrap_or_else(|_| Response::error("the agent is shutting down"))
                }
            },
            // A framing error ends the stream: answer it, then close.
            Err(LinesCodecError::MaxLineLengthExceeded) => {
                let refusal = Response::error(format!("malformed request: longer than {MAX_REQUEST_BYTES} bytes"));
                return Ok(lines.send(serde_json::to_string(&refusal)?).await?);
            }
            Err(LinesCodecError::Io(err)) if err.kind() == std::io::ErrorKind::InvalidData => {
                let refusal = Response::error("malformed request: not UTF-8");
                return Ok(lines.send(serde_json::to_string(&refusal)?).await?);
            }
            Err(LinesCodecError::Io(err)) => return Err(err.into()),
        };
        lines.send(serde_json::to_string(&response)?).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    use super::*;

    /// Runs `handle` on one end of a socket pair (the test runs as root, as
    /// the agent does) with an agent that answers every call "done".
    async fn exchange(input: Vec<u8>, answers: usize) -> Vec<Response> {
        let (server, client) = UnixStream::pair().unwrap();
        let (calls, mut agent) = mpsc::channel::<ControlCall>(4);
        tokio::spawn(async move {
            while let Some(call) = agent.recv().await {
                let _ = call.reply.send(Response::done(format!("{:?}", call.request)));
            }
        });
        tokio::spawn(handle(server, calls));
        let (read, mut write) = client.into_split();
        let writer = tokio::spawn(async move { write.write_all(&input).await });
        let mut lines = BufReader::new(read).lines();
        let mut out = Vec::new();
        for _ in 0..answers {
            let line = lines.next_line().await.unwrap().expect("an answer per request");
            out.push(serde_json::from_str(&line).unwrap());
        }
        writer.await.unwrap().unwrap();
        out
    }

    fn error_of(response: &Response) -> &str {
        match response {
            Response::Error { error, .. } => error,
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_malformed_request_is_answered_and_the_connection_goes_on() {
        let answers = exchange(b"{\"cmd\":\"explode\"}\nnot json\n{\"cmd\":\"status\"}\n".to_vec(), 3).await;
        assert!(error_of(&answers[0]).contains("malformed request"), "{answers:?}");
        assert!(error_of(&answers[1]).contains("malformed request"), "{answers:?}");
        assert_eq!(answers[2], Response::done("Status"));
    }

    #[tokio::test]
    async fn an_oversized_or_binary_request_is_answered_before_the_connection_closes() {
        let mut oversized = vec![b'x'; MAX_REQUEST_BYTES + 10];
        oversized.extend(b"\n{\"cmd\":\"status\"}\n");
        let answers = exchange(oversized, 1).await;
        assert!(error_of(&answers[0]).contains("longer than 1048576 bytes"), "{answers:?}");
        let answers = exchange(b"\xff\xfe\n".to_vec(), 1).await;
        assert!(error_of(&answers[0]).contains("not UTF-8"), "{answers:?}");
    }
}
