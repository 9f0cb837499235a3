//! The agent's side of the control socket. The socket is created mode 0600
//! and every peer's credentials are checked: only root may talk to the agent.

use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use futures::{SinkExt as _, StreamExt as _};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};
use tokio_util::{
    codec::{Framed, LinesCodec, LinesCodecError},
    sync::CancellationToken,
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
    // A short queue: a flood of connections waits in its own connect()
    // rather than in thousands of queued connections the agent must drain
    // before it reaches the next `status`.
    let backlog = nix::sys::socket::Backlog::new(lb_common::MAX_CONTROL_CONNECTIONS as i32)?;
    nix::sys::socket::listen(&listener, backlog).context("setting the control socket's backlog")?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

const IDLE_TIMEOUT: Duration = Duration::from_millis(lb_common::CONTROL_IDLE_TIMEOUT_MS);
const ACCEPT_BACKOFF_FIRST: Duration = Duration::from_millis(lb_common::CONTROL_ACCEPT_BACKOFF_MS);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Connections waiting for a request, by age: the oldest is closed to make
/// room when every slot is taken.
#[derive(Default)]
struct Waiting(std::sync::Mutex<std::collections::BTreeMap<u64, CancellationToken>>);

impl Waiting {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::BTreeMap<u64, CancellationToken>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Accepts CLI connections until the agent goes away: about
/// MAX_CONTROL_CONNECTIONS at once. When all are taken, the one that has
/// waited longest for a request is closed for the newcomer (so idle or
/// hostile clients cannot lock `xdplb status` out, nor take the agent's file
/// descriptors); a failed accept pauses, growing, instead of spinning.
pub async fn serve(listener: UnixListener, calls: mpsc::Sender<ControlCall>) {
    let live = Arc::new(AtomicUsize::new(0));
    let waiting = Arc::new(Waiting::default());
    let mut next_id = 0u64;
    let mut backoff = ACCEPT_BACKOFF_FIRST;
    let mut last_logged: Option<tokio::time::Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(err) => {
                if last_logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                    log::error!("control socket: accept failed: {err}; retrying in {backoff:?}");
                    last_logged = Some(tokio::time::Instant::now());
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                continue;
            }
        };
        backoff = ACCEPT_BACKOFF_FIRST;
        // Never wait here: the accept loop must keep up with any flood, so
        // the oldest idle connection is told to go and the newcomer served
        // at once (the count exceeds the limit only while those exit).
        if live.load(Ordering::Relaxed) >= lb_common::MAX_CONTROL_CONNECTIONS {
            // An evicted connection stops counting at once, not when its
            // task gets to exit (cancelled under the lock, so that it is
            // counted out exactly once).
            let mut queue = waiting.lock();
            match queue.pop_first() {
                Some((_, token)) => {
                    token.cancel();
                    live.fetch_sub(1, Ordering::Relaxed);
                }
                None => {
                    drop(queue);
                    tokio::spawn(refuse_busy(stream));
                    continue;
                }
            }
        }
        next_id += 1;
        live.fetch_add(1, Ordering::Relaxed);
        let (id, calls, waiting, live) = (next_id, calls.clone(), waiting.clone(), live.clone());
        let evicted = CancellationToken::new();
        // Waiting for its first request from the moment it is accepted, so
        // a burst of new connections can be evicted before their tasks run.
        waiting.lock().insert(id, evicted.clone());
        tokio::spawn(async move {
            if let Err(err) = handle(stream, calls, &waiting, id, &evicted).await {
                log::debug!("control connection: {err:#}");
            }
            let mut queue = waiting.lock();
            queue.remove(&id);
            if !evicted.is_cancelled() {
                live.fetch_sub(1, Ordering::Relaxed);
            }
        });
    }
}

async fn refuse_busy(stream: UnixStream) {
    let busy = Response::error(format!(
        "busy: {} control connections are open already; try again",
        lb_common::MAX_CONTROL_CONNECTIONS
    ));
    let mut lines = Framed::new(stream, LinesCodec::new());
    if let Ok(text) = serde_json::to_string(&busy) {
        let _ = tokio::time::timeout(Duration::from_secs(1), lines.send(text)).await;
    }
}

async fn handle(
    stream: UnixStream,
    calls: mpsc::Sender<ControlCall>,
    waiting: &Waiting,
    id: u64,
    evicted: &CancellationToken,
) -> Result<()> {
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
    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(IDLE_TIMEOUT, lines.next()) => next,
            _ = evicted.cancelled() => {
                let closing = Response::error("closing: idle while every control connection was taken");
                return Ok(lines.send(serde_json::to_string(&closing)?).await?);
            }
        };
        waiting.lock().remove(&id);
        let Ok(next) = next else {
            let idle = Response::error(format!("closing: no request within {IDLE_TIMEOUT:?}"));
            return Ok(lines.send(serde_json::to_string(&idle)?).await?);
        };
        let Some(line) = next else { return Ok(()) };
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
        waiting.lock().insert(id, evicted.clone());
    }
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
        tokio::spawn(async move { handle(server, calls, &Waiting::default(), 1, &CancellationToken::new()).await });
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
