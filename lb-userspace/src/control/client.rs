//! The CLI's side of the control socket.

use std::path::PathBuf;

use anyhow::{Context as _, Result, bail};

use super::protocol::{Request, Response};

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
