//! The CLI's side of the control socket.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use super::protocol::{Request, Response};

/// The CLI side: sends one request, returns the answer.
pub fn call(socket: &PathBuf, request: &Request) -> Result<Response> {
    use std::io::{BufRead as _, Write as _};
    let stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!("connecting to the agent at {} (is `xdplb run` running? are you root?)", socket.display())
    })?;
    let timeout = std::time::Duration::from_millis(lb_common::CLI_TIMEOUT_MS);
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let no_answer = |err: std::io::Error| {
        let timed_out = matches!(err.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut);
        if timed_out {
            anyhow::anyhow!("the agent at {} did not answer within {timeout:?}", socket.display())
        } else {
            anyhow::anyhow!("talking to the agent at {}: {err}", socket.display())
        }
    };
    let mut line = serde_json::to_string(request)?;
    line.push('\n');
    let mut reader = std::io::BufReader::new(stream);
    // A refusal (non-root peer, busy) may arrive before the request is
    // even read: a failed write still reads what the agent said.
    let written = reader.get_mut().write_all(line.as_bytes());
    let mut answer = String::new();
    let read = reader.read_line(&mut answer);
    if answer.is_empty() {
        written.map_err(no_answer)?;
        read.map_err(no_answer)?;
    }
    if answer.is_empty() {
        bail!("the agent closed the connection without answering");
    }
    serde_json::from_str(&answer).with_context(|| format!("unreadable answer from the agent: {answer:?}"))
}
