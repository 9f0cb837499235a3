//! The harness topology (`tests/netns-harness.sh`): client, router, LB and
//! backend namespaces under a prefix unique to the run, torn down on drop,
//! also when a test fails or a benchmark returns early.

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
};

use anyhow::{Result, bail};

pub struct Topology {
    pub prefix: String,
    client_ports_used: AtomicUsize,
}

/// Client source ports handed out by `Topology::client_ports`: below the
/// kernel's default ephemeral range (32768-60999), so they never collide
/// with ports the kernel picks for other sockets.
/// The LB nodes a topology can have (`lb2` with `up_nodes`).
pub const LB_NODES: [&str; 2] = ["lb", "lb2"];

const CLIENT_PORTS_FIRST: usize = 20000;
const CLIENT_PORTS_COUNT: usize = 12000;

fn harness() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/netns-harness.sh")
}

impl Topology {
    /// Builds the namespaces under `PREFIX-*` (at most 10 characters, so
    /// interface names fit); `xdp_pass` is the XDP_PASS object the harness
    /// attaches to the peers of XDP_TX / XDP_REDIRECT interfaces.
    pub fn up(prefix: &str, xdp_pass: &Path) -> Result<Self> {
        Self::build(prefix, xdp_pass, false)
    }

    /// `up`, plus a second LB node `lb2` beside `lb` and a client `far`
    /// behind the router `sw`, which reaches the VIPs only by the routes
    /// that BGP gives it (no static route).
    pub fn up_nodes(prefix: &str, xdp_pass: &Path) -> Result<Self> {
        Self::build_with(prefix, xdp_pass, &[("HARNESS_NODES", "1")])
    }

    /// `up`, plus the routed subnet (router `rt`, backends `t1`..`t3`) that
    /// only tunnels reach.
    pub fn up_routed(prefix: &str, xdp_pass: &Path) -> Result<Self> {
        Self::build(prefix, xdp_pass, true)
    }

    fn build(prefix: &str, xdp_pass: &Path, routed: bool) -> Result<Self> {
        Self::build_with(prefix, xdp_pass, &[("HARNESS_ROUTED", if routed { "1" } else { "0" })])
    }

    fn build_with(prefix: &str, xdp_pass: &Path, options: &[(&str, &str)]) -> Result<Self> {
        let prefix = prefix[..prefix.len().min(10)].to_string();
        let status = Command::new("bash")
            .arg(harness())
            .args(["up", &prefix])
            .env("XDP_PASS_OBJ", xdp_pass)
            .envs(options.iter().copied())
            .status()?;
        if !status.success() {
            bail!("harness up {prefix} failed");
        }
        Ok(Topology { prefix, client_ports_used: AtomicUsize::new(0) })
    }

    /// A prefix unique to this process and moment.
    pub fn unique_prefix(tag: &str) -> String {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        format!("{tag}{:x}", (std::process::id() << 12) ^ nanos)
    }

    /// The full name of namespace `name` (client, router, lb, b1, ...).
    pub fn ns(&self, name: &str) -> String {
        format!("{}-{name}", self.prefix)
    }

    /// The next `n` source ports for the client's test connections: the
    /// same sequence in every run of a test, so the flows (and hence how a
    /// hash-based scheduler spreads them) do not vary from run to run the
    /// way kernel-chosen ephemeral ports do.
    pub fn client_ports(&self, n: usize) -> Vec<u16> {
        let first = self.client_ports_used.fetch_add(n, Ordering::Relaxed);
        (first..first + n).map(|i| (CLIENT_PORTS_FIRST + i % CLIENT_PORTS_COUNT) as u16).collect()
    }

    /// This run's own bpffs pin directory for an agent.
    pub fn pin_root(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/xdplb-test-{}", self.prefix))
    }

    /// The pin directory of the agent on LB node `node` (`lb` is `pin_root`).
    pub fn node_pin_root(&self, node: &str) -> PathBuf {
        match node {
            "lb" => self.pin_root(),
            other => PathBuf::from(format!("/sys/fs/bpf/xdplb-test-{}-{other}", self.prefix)),
        }
    }

    /// Where `xdplb decap` on backend `name` pins its state in this run.
    pub fn decap_pin_dir(&self, name: &str) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/xdplb-test-{}-decap", self.prefix)).join(name)
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(harness()).args(["down", &self.prefix]).status();
        for node in LB_NODES {
            let _ = std::fs::remove_dir_all(self.node_pin_root(node));
        }
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/xdplb-test-{}-decap", self.prefix));
    }
}
