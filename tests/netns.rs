//! End-to-end tests in the network-namespace harness (tests/netns-harness.sh):
//! `xdplb run` in the LB namespace, HTTP clients in the client namespace,
//! three backends answering with their names. Needs root.
//!
//! Each test builds its own topology under a unique prefix and tears it down
//! on drop, also when the test fails.

use std::{
    collections::BTreeMap,
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

const XDPLB: &str = env!("CARGO_BIN_EXE_xdplb");
const XDP_PASS_OBJ: &str = concat!(env!("OUT_DIR"), "/xdp-pass");
const VIP4: &str = "198.18.0.100:80";
const VIP6: &str = "[2001:db8::100]:80";
const BACKENDS4: [&str; 3] = ["198.18.1.11", "198.18.1.12", "198.18.2.13"];
const BACKENDS6: [&str; 3] = ["2001:db8:1::11", "2001:db8:1::12", "2001:db8:2::13"];
const NAMES: [&str; 3] = ["b1", "b2", "b3"];

fn harness() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/netns-harness.sh")
}

/// The namespaces of one harness run; removed on drop.
struct Topology {
    prefix: String,
}

impl Topology {
    fn up() -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let prefix = format!("xl{:x}", (std::process::id() << 12) ^ nanos);
        let prefix = prefix[..prefix.len().min(10)].to_string();
        let status = Command::new("bash")
            .arg(harness())
            .args(["up", &prefix])
            .env("XDP_PASS_OBJ", XDP_PASS_OBJ)
            .status()
            .expect("running the harness");
        assert!(status.success(), "harness up {prefix} failed");
        Topology { prefix }
    }

    fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(harness())
            .args(["down", &self.prefix])
            .status();
    }
}

/// Runs `f` on a thread that has entered namespace `ns`. Sockets made there
/// stay in that namespace whatever thread uses them later.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    thread::spawn(move || {
        let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A running `xdplb run` in the LB namespace; stopped on drop.
struct Agent {
    child: Option<Child>,
    config: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Agent {
    fn start(topology: &Topology, config: &str) -> Self {
        let agent = Self::spawn(topology, config);
        agent.wait_for_log("attached to", 1);
        // Backends whose neighbours are still being resolved are not in the
        // ring yet; the distribution tests need all of them.
        agent.wait_for_log("all backends resolved", 1);
        agent
    }

    fn spawn(topology: &Topology, config: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("xdplb-test-{}", topology.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("xdplb.toml");
        let socket = dir.join("xdplb.sock");
        let log = dir.join("xdplb.log");
        let mut agent = Agent {
            child: None,
            config: config_path,
            socket,
            log,
            _dir: TempDir(dir),
        };
        agent.write_config(config);
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", topology.ns("lb")))
            .args([XDPLB, "run", "--config"])
            .arg(&agent.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(File::create(&agent.log).unwrap())
            .spawn()
            .expect("starting xdplb");
        agent.child = Some(child);
        agent
    }

    /// Writes `config` with this agent's own control socket.
    fn write_config(&self, config: &str) {
        let text = config.replacen(
            "[agent]\n",
            &format!("[agent]\ncontrol_socket = {:?}\n", self.socket),
            1,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_for_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log_text().matches(needle).count() < count {
            assert!(
                Instant::now() < deadline,
                "xdplb never logged {needle:?} ×{count}; log:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites the config file and sends SIGHUP; returns once applied.
    fn reload(&self, config: &str) {
        let before = self.log_text().matches("reloaded").count();
        self.write_config(config);
        self.signal("HUP");
        self.wait_for_log("reloaded", before + 1);
    }

    /// Writes an invalid config and sends SIGHUP; returns once it was rejected.
    fn reload_rejected(&self, config: &str) {
        let before = self.log_text().matches("reload rejected").count();
        self.write_config(config);
        self.signal("HUP");
        self.wait_for_log("reload rejected", before + 1);
    }

    fn signal(&self, name: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let status = Command::new("kill")
            .args(["-s", name, &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Runs `xdplb --socket S ARGS...`; returns (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(XDPLB)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    }

    /// `xdplb status --json`, parsed.
    fn status(&self) -> serde_json::Value {
        let (ok, out, err) = self.cli(&["status", "--json"]);
        assert!(ok, "status failed: {err}");
        serde_json::from_str(&out).unwrap()
    }

    /// The status entry of one backend of one service.
    fn backend(&self, service: &str, address: &str) -> serde_json::Value {
        let status = self.status();
        let services = status["services"].as_array().unwrap();
        let s = services
            .iter()
            .find(|s| s["name"] == service)
            .unwrap_or_else(|| panic!("no service {service}"));
        s["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == address)
            .cloned()
            .unwrap_or_else(|| panic!("no backend {address}"))
    }

    /// Stops the agent and returns its exit summary (stdout).
    fn stop(mut self) -> String {
        self.signal("INT");
        let mut child = self.child.take().unwrap();
        let mut out = String::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut out)
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "xdplb exited with {status}; log:\n{}",
            self.log_text()
        );
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }
}

fn config(weights: [u32; 3]) -> String {
    let mut text = String::from("[agent]\ninterface = \"eth0\"\n");
    for (name, vip, backends) in [("web", VIP4, BACKENDS4), ("web6", VIP6, BACKENDS6)] {
        text += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"tcp\"\nforwarding = \"dsr\"\n"
        );
        for (address, weight) in backends.iter().zip(weights) {
            text += &format!("\n[[service.backend]]\naddress = \"{address}\"\nweight = {weight}\n");
        }
    }
    text
}

fn config_with(backends: &[(usize, u32)]) -> String {
    let mut text = format!(
        "[agent]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"{VIP4}\"\nprotocol = \"tcp\"\n"
    );
    for (i, weight) in backends {
        text += &format!(
            "\n[[service.backend]]\naddress = \"{}\"\nweight = {weight}\n",
            BACKENDS4[*i]
        );
    }
    text
}

/// One HTTP GET on a new connection; returns the backend's name.
fn get_new_connection(vip: SocketAddr) -> Result<String, String> {
    let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .map_err(|e| format!("read: {e}"))?;
    body_of(&response)
}

fn body_of(response: &str) -> Result<String, String> {
    if !response.starts_with("HTTP/1.1 200") {
        return Err(format!("bad response {response:?}"));
    }
    let (_, body) = response.split_once("\r\n\r\n").ok_or("no body")?;
    Ok(body.trim().to_string())
}

/// `n` GETs on new connections from the client; counts answers per backend.
fn spread(topology: &Topology, vip: &str, n: usize) -> BTreeMap<String, usize> {
    let vip: SocketAddr = vip.parse().unwrap();
    in_netns(&topology.ns("client"), move || {
        let mut counts = BTreeMap::new();
        for i in 0..n {
            let name = get_new_connection(vip)
                .unwrap_or_else(|e| panic!("request {i} to {vip} failed: {e}"));
            *counts.entry(name).or_insert(0) += 1;
        }
        counts
    })
}

fn assert_shares(counts: &BTreeMap<String, usize>, weights: [u32; 3], what: &str) {
    let total: usize = counts.values().sum();
    let weight_sum: u32 = weights.iter().sum();
    for (name, weight) in NAMES.iter().zip(weights) {
        let expected = total as f64 * weight as f64 / weight_sum as f64;
        let got = *counts.get(*name).unwrap_or(&0) as f64;
        assert!(
            (got - expected).abs() <= 0.25 * expected,
            "{what}: {name} got {got} of {total}, expected {expected:.0} ± 25%; all: {counts:?}"
        );
    }
}

/// Segments the client's TCP stack has sent (first transmissions and retransmissions).
fn tcp_segments_sent(topology: &Topology) -> u64 {
    in_netns(&topology.ns("client"), || {
        let snmp = std::fs::read_to_string("/proc/thread-self/net/snmp").unwrap();
        let mut lines = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (names, values) = (lines.next().unwrap(), lines.next().unwrap());
        let field = |wanted: &str| -> u64 {
            let i = names.split_whitespace().position(|n| n == wanted).unwrap();
            values.split_whitespace().nth(i).unwrap().parse().unwrap()
        };
        field("OutSegs") + field("RetransSegs")
    })
}

/// Values of `key=` in the summary lines that contain `line_marker`.
fn summary_value(summary: &str, line_marker: &str, key: &str) -> u64 {
    let line = summary
        .lines()
        .find(|l| l.contains(line_marker))
        .unwrap_or_else(|| panic!("no {line_marker:?} in\n{summary}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap()
}

#[test]
fn new_connections_follow_equal_then_weighted_shares_and_replies_bypass_the_lb() {
    let topology = Topology::up();
    let agent = Agent::start(&topology, &config([1, 1, 1]));
    let sent_before = tcp_segments_sent(&topology);

    assert_shares(&spread(&topology, VIP4, 600), [1, 1, 1], "IPv4 equal");
    assert_shares(&spread(&topology, VIP6, 600), [1, 1, 1], "IPv6 equal");

    agent.reload(&config([1, 2, 3]));
    assert_shares(&spread(&topology, VIP4, 600), [1, 2, 3], "IPv4 1:2:3");
    assert_shares(&spread(&topology, VIP6, 600), [1, 2, 3], "IPv6 1:2:3");

    let sent = tcp_segments_sent(&topology) - sent_before;
    let summary = agent.stop();
    // Direct server return: the XDP program saw exactly the client's
    // segments to the VIPs, and none of the backends' replies.
    let vip_packets = summary_value(&summary, "service web tcp", "packets")
        + summary_value(&summary, "service web6 tcp", "packets");
    assert_eq!(
        vip_packets, sent,
        "VIP packets seen by the LB vs TCP segments the client sent\n{summary}"
    );
    let other = summary_value(&summary, "global:", "pass_non_vip")
        + summary_value(&summary, "global:", "pass_unparsed");
    assert!(
        other < 50,
        "the LB saw {other} non-VIP packets: replies are flowing through it?\n{summary}"
    );
    assert!(
        summary_value(&summary, "global:", "action_tx") > 0,
        "no XDP_TX to b3\n{summary}"
    );
    assert!(
        summary_value(&summary, "global:", "action_redirect") > 0,
        "no XDP_REDIRECT to b1/b2\n{summary}"
    );
}

/// A keep-alive HTTP connection that must keep answering from one backend.
struct LongLived {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl LongLived {
    fn open(topology: &Topology, vip: &str) -> Self {
        let vip: SocketAddr = vip.parse().unwrap();
        let stream = in_netns(&topology.ns("client"), move || {
            TcpStream::connect_timeout(&vip, Duration::from_secs(3)).unwrap()
        });
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let reader = BufReader::new(stream.try_clone().unwrap());
        LongLived { stream, reader }
    }

    fn get(&mut self) -> String {
        self.stream
            .write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
            .expect("long-lived connection: write");
        let mut status = String::new();
        self.reader
            .read_line(&mut status)
            .expect("long-lived connection: read");
        assert!(
            status.starts_with("HTTP/1.1 200"),
            "long-lived connection: {status:?}"
        );
        let mut length = 0;
        loop {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; length];
        self.reader.read_exact(&mut body).unwrap();
        String::from_utf8(body).unwrap().trim().to_string()
    }
}

#[test]
fn long_lived_connection_survives_backends_added_removed_and_reweighted() {
    let topology = Topology::up();
    // Start with b1 and b2 only.
    let agent = Agent::start(&topology, &config_with(&[(0, 1), (1, 1)]));
    let mut conn = LongLived::open(&topology, VIP4);
    let home = conn.get();
    let home_index = NAMES.iter().position(|n| *n == home).unwrap();
    let other = 1 - home_index;
    assert!(home_index < 2, "first backend must be b1 or b2, got {home}");

    let steps: [(&str, Vec<(usize, u32)>); 5] = [
        ("add b3", vec![(0, 1), (1, 1), (2, 1)]),
        ("reweight", vec![(home_index, 1), (other, 5), (2, 3)]),
        ("remove the other backend", vec![(home_index, 1), (2, 3)]),
        (
            "remove the connection's own backend",
            vec![(2, 1), (other, 1)],
        ),
        ("add everything back", vec![(0, 2), (1, 2), (2, 2)]),
    ];
    for (step, backends) in steps {
        if step == "remove the other backend" {
            // A broken file on reload is rejected and changes nothing.
            agent.reload_rejected("[agent]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"198.18.0.100:80\"\nprotocol = \"tcp\"\n\n[[service.backend]]\naddress = \"198.18.1.300\"\n");
            assert_eq!(conn.get(), home, "after a rejected reload");
            assert!(
                agent
                    .log_text()
                    .contains("xdplb.toml:11:11: invalid IP address syntax"),
                "{}",
                agent.log_text()
            );
            let counts = spread(&topology, VIP4, 30);
            assert!(
                counts.len() >= 2,
                "a rejected reload changed the backends: {counts:?}"
            );
        }
        agent.reload(&config_with(&backends));
        for _ in 0..5 {
            assert_eq!(
                conn.get(),
                home,
                "after {step:?} the long-lived connection moved or broke"
            );
        }
        // New connections keep working and only reach configured backends.
        let counts = spread(&topology, VIP4, 60);
        for name in counts.keys() {
            let i = NAMES.iter().position(|n| n == name).unwrap();
            assert!(
                backends.iter().any(|(b, w)| *b == i && *w > 0),
                "after {step:?} a new connection reached {name}: {counts:?}"
            );
        }
        thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(conn.get(), home);
    agent.stop();
}

#[test]
fn invalid_config_is_refused_with_its_location_and_nothing_is_attached() {
    let topology = Topology::up();
    let dir = std::env::temp_dir().join(format!("xdplb-test-{}-bad", topology.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    let path = dir.join("bad.toml");
    std::fs::write(
        &path,
        config([1, 1, 1]).replace("weight = 1\n", "weight = 5000\n"),
    )
    .unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", topology.ns("lb")))
        .args([XDPLB, "run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "xdplb accepted a bad config");
    assert!(
        stderr.contains(&format!(
            "{}:12:10: weight 5000 is out of range 0..=1000",
            path.display()
        )),
        "{stderr}"
    );
    let link = Command::new("ip")
        .args([
            "netns",
            "exec",
            &topology.ns("lb"),
            "ip",
            "link",
            "show",
            "eth0",
        ])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "an XDP program is attached after a refused config"
    );
}
