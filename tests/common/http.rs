//! HTTP clients of the harness's backends (each answers with its name):
//! one request per new connection, long-lived connections, steady streams.
#![allow(dead_code)]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use lb_testkit::topology::Topology;
use socket2::{Domain, Protocol, Socket, Type};

pub fn get_new_connection(vip: SocketAddr) -> Result<String, String> {
    get_new_connection_within(vip, Duration::from_secs(3))
}

pub fn get_new_connection_within(vip: SocketAddr, timeout: Duration) -> Result<String, String> {
    let stream = TcpStream::connect_timeout(&vip, timeout).map_err(|e| format!("connect: {e}"))?;
    http_get_name(stream, timeout)
}

/// `get_new_connection` from a given client source port.
pub fn get_new_connection_from(vip: SocketAddr, source_port: u16) -> Result<String, String> {
    let timeout = Duration::from_secs(3);
    let socket =
        Socket::new(Domain::for_address(vip), Type::STREAM, Some(Protocol::TCP)).map_err(|e| format!("socket: {e}"))?;
    socket.set_reuse_address(true).map_err(|e| format!("SO_REUSEADDR: {e}"))?;
    let any: IpAddr = if vip.is_ipv4() { Ipv4Addr::UNSPECIFIED.into() } else { Ipv6Addr::UNSPECIFIED.into() };
    socket.bind(&SocketAddr::new(any, source_port).into()).map_err(|e| format!("bind port {source_port}: {e}"))?;
    socket.connect_timeout(&vip.into(), timeout).map_err(|e| format!("connect from port {source_port}: {e}"))?;
    http_get_name(socket.into(), timeout)
}

pub fn http_get_name(mut stream: TcpStream, timeout: Duration) -> Result<String, String> {
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n").map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream.read_to_string(&mut response).map_err(|e| format!("read: {e}"))?;
    body_of(&response)
}

pub fn body_of(response: &str) -> Result<String, String> {
    if !response.starts_with("HTTP/1.1 200") {
        return Err(format!("bad response {response:?}"));
    }
    let (_, body) = response.split_once("\r\n\r\n").ok_or("no body")?;
    Ok(body.trim().to_string())
}

pub struct LongLived {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LongLived {
    /// `n` connections, each with the backend that answered its first request.
    pub fn open_homed(topology: &Topology, vip: &str, n: usize) -> Vec<(Self, String)> {
        Self::open_homed_from(&topology.ns("client"), vip, n)
    }

    /// `open_homed` from namespace `ns`.
    pub fn open_homed_from(ns: &str, vip: &str, n: usize) -> Vec<(Self, String)> {
        (0..n)
            .map(|_| {
                let mut connection = Self::open_from(ns, vip);
                let home = connection.get();
                (connection, home)
            })
            .collect()
    }

    pub fn open(topology: &Topology, vip: &str) -> Self {
        Self::open_from(&topology.ns("client"), vip)
    }

    pub fn open_from(ns: &str, vip: &str) -> Self {
        let vip: SocketAddr = vip.parse().unwrap();
        let stream = lb_testkit::run_in(ns, move || TcpStream::connect_timeout(&vip, Duration::from_secs(3)).unwrap())
            .expect("entering the namespace");
        stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        LongLived { stream, reader }
    }

    pub fn get(&mut self) -> String {
        self.try_get().unwrap_or_else(|e| panic!("long-lived connection: {e}"))
    }

    /// One request on the connection; its backend's name, or what failed.
    pub fn try_get(&mut self) -> Result<String, String> {
        self.stream.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n").map_err(|e| format!("write: {e}"))?;
        let mut status = String::new();
        self.reader.read_line(&mut status).map_err(|e| format!("read: {e}"))?;
        if !status.starts_with("HTTP/1.1 200") {
            return Err(format!("status line {status:?}"));
        }
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).map_err(|e| format!("read: {e}"))?;
            if line == "\r\n" || line.is_empty() {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().map_err(|_| format!("content-length {v:?}"))?;
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
        Ok(String::from_utf8_lossy(&body).trim().to_string())
    }
}

/// New connections one after another from namespace `ns` until `stop`
/// (or `longest`, or 100,000 of them): when each started, and its backend
/// or what failed.
pub fn steady_stream_from(
    ns: &str,
    vip: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    longest: Duration,
) -> thread::JoinHandle<Vec<(Instant, Result<String, String>)>> {
    let vip: SocketAddr = vip.parse().unwrap();
    let ns = ns.to_string();
    thread::spawn(move || {
        lb_testkit::run_in(&ns, move || {
            let mut results = Vec::new();
            let limit = Instant::now() + longest;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < limit && results.len() < 100_000
            {
                let start = Instant::now();
                results.push((start, get_new_connection_within(vip, Duration::from_secs(1))));
            }
            results
        })
        .expect("entering the namespace")
    })
}
