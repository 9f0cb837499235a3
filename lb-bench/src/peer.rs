//! xdplb against a real peer, HAProxy in TCP mode, on the harness topology
//! (tests/netns-harness.sh) with nginx as the backends' server. wrk runs in
//! the client namespace: requests per second over keep-alive connections,
//! and new connections per second (`Connection: close`).
//!
//! LB CPU: the LB namespace's processes (the xdplb agent, or haproxy) from
//! /proc/PID/stat, plus for xdplb the XDP program's own run time from the
//! kernel's BPF statistics (kernel.bpf_stats_enabled). The whole machine's
//! softirq time is reported beside it, since the kernel cannot say which
//! namespace it was spent for; with DSR the replies never touch the LB,
//! with NAT (the like-for-like comparison: both hide the backends, neither
//! needs them changed) every reply passes the XDP program too.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use lb_testkit::topology::Topology;

/// The run without a load balancer (`PeerRun::lb`).
pub const NO_LB: &str = "none (wrk to each backend)";

pub struct PeerRun {
    pub lb: &'static str,
    /// "keep-alive" or "new connections"
    pub mode: &'static str,
    pub requests_per_s: f64,
    pub requests: u64,
    /// Seconds of CPU the LB spent: its processes, and (xdplb) its XDP program.
    pub lb_process_cpu_s: f64,
    pub lb_xdp_cpu_s: f64,
    /// Softirq seconds of the whole machine during the run.
    pub machine_softirq_s: f64,
}

impl PeerRun {
    /// LB CPU seconds per 100 000 requests (each a new connection in that mode).
    pub fn cpu_per_100k(&self) -> f64 {
        (self.lb_process_cpu_s + self.lb_xdp_cpu_s) * 100_000.0 / self.requests.max(1) as f64
    }
}

fn sh(cmd: &str) -> Result<()> {
    let status = Command::new("sh").arg("-c").arg(cmd).status()?;
    if !status.success() {
        bail!("{cmd} failed");
    }
    Ok(())
}

/// wrk's open connections, each sending one request at a time.
const CONNECTIONS: usize = 64;

/// The backends' own addresses (b1, b2, b3 of the harness).
const BACKENDS: [&str; 3] = ["198.18.1.11", "198.18.1.12", "198.18.2.13"];

/// Replaces the harness's Python servers with nginx (answers with the name).
fn start_nginx(h: &Topology, dir: &Path) -> Result<()> {
    for name in ["b1", "b2", "b3"] {
        let ns = h.ns(name);
        let _ = sh(&format!("kill $(ip netns pids {ns}) 2>/dev/null; sleep 0.2"));
        let conf = dir.join(format!("nginx-{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\npid {d}/nginx-{name}.pid;\nerror_log {d}/nginx-{name}.err;\n\
                 events {{ worker_connections 8192; }}\n\
                 http {{ access_log off; keepalive_requests 1000000;\n\
                 server {{ listen 80 reuseport backlog=4096; listen [::]:80 reuseport backlog=4096; return 200 \"{name}\\n\"; }} }}\n",
                d = dir.display()
            ),
        )?;
        sh(&format!("ip netns exec {ns} nginx -c {}", conf.display()))?;
    }
    std::thread::sleep(Duration::from_millis(300));
    Ok(())
}

fn cpu_seconds_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may contain spaces): utime is 14th, stime 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / clock_ticks()
}

fn clock_ticks() -> f64 {
    // Linux always reports it; 100 is its value on every common build.
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().unwrap_or(100) as f64
}

fn machine_softirq_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or("");
    cpu.split_whitespace().nth(7).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / clock_ticks()
}

/// Run time of loaded programs named `name`, from the kernel's BPF stats.
fn xdp_run_seconds(name: &str) -> f64 {
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| p.name_as_str() == Some(name))
        .map(|p| p.run_time().as_secs_f64())
        .sum()
}

/// wrk in the client namespace against the VIP; returns (requests per
/// second, requests).
fn wrk(h: &Topology, seconds: u64, close: bool) -> Result<(f64, u64)> {
    wrk_output(wrk_command(h, "198.18.0.100", 2, CONNECTIONS, seconds, close).output().context("running wrk")?)
}

/// The same load without a load balancer: one wrk per backend on its own
/// address, the 64 connections split among them. What the client and the
/// backends sustain on this machine, which bounds any LB's figures here.
fn wrk_without_lb(h: &Topology, seconds: u64, close: bool) -> Result<(f64, u64)> {
    let share = |i: usize| CONNECTIONS / BACKENDS.len() + usize::from(i < CONNECTIONS % BACKENDS.len());
    let runs = BACKENDS
        .iter()
        .enumerate()
        .map(|(i, address)| wrk_command(h, address, 1, share(i), seconds, close).spawn())
        .collect::<std::io::Result<Vec<_>>>()
        .context("running wrk")?;
    let mut total = (0.0, 0);
    for run in runs {
        let (rps, requests) = wrk_output(run.wait_with_output()?)?;
        total = (total.0 + rps, total.1 + requests);
    }
    Ok(total)
}

fn wrk_command(h: &Topology, address: &str, threads: usize, connections: usize, seconds: u64, close: bool) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &h.ns("client"), "wrk"]).args([
        format!("-t{threads}"),
        format!("-c{connections}"),
        format!("-d{seconds}s"),
    ]);
    if close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(format!("http://{address}/")).stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn wrk_output(out: std::process::Output) -> Result<(f64, u64)> {
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| format!("no Requests/sec in wrk output:\n{text}{}", String::from_utf8_lossy(&out.stderr)))?;
    let requests = text
        .lines()
        .find(|l| l.contains("requests in"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    if text.contains("Non-2xx") || text.contains("Socket errors") {
        eprintln!("wrk reported errors:\n{text}");
    }
    Ok((rps, requests))
}

/// Waits until the VIP answers a request from the client (at most 10 s): a
/// load balancer that just started is measured only once it serves.
fn wait_until_serving(h: &Topology) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", &h.ns("client"), "curl", "-sf", "--max-time", "1", "http://198.18.0.100/"])
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the VIP does not answer the client: {}", String::from_utf8_lossy(&out.stderr));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn measure(h: &Topology, lb: &'static str, lb_pid: Option<u32>, seconds: u64) -> Result<Vec<PeerRun>> {
    let load = if lb_pid.is_some() {
        wait_until_serving(h)?;
        wrk
    } else {
        wrk_without_lb
    };
    let cpu_seconds_of = |pid: Option<u32>| pid.map_or(0.0, cpu_seconds_of);
    let mut runs = Vec::new();
    for (mode, close) in [("keep-alive", false), ("new connections", true)] {
        let (cpu0, xdp0, soft0) = (cpu_seconds_of(lb_pid), xdp_run_seconds("xdplb"), machine_softirq_seconds());
        let (rps, requests) = load(h, seconds, close)?;
        let (cpu1, xdp1, soft1) = (cpu_seconds_of(lb_pid), xdp_run_seconds("xdplb"), machine_softirq_seconds());
        runs.push(PeerRun {
            lb,
            mode,
            requests_per_s: rps,
            requests,
            lb_process_cpu_s: cpu1 - cpu0,
            lb_xdp_cpu_s: if lb.starts_with("xdplb") { xdp1 - xdp0 } else { 0.0 },
            machine_softirq_s: soft1 - soft0,
        });
    }
    Ok(runs)
}

fn wait_for(path: &Path, needle: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !std::fs::read_to_string(path).unwrap_or_default().contains(needle) {
        if Instant::now() > deadline {
            bail!("{} never said {needle:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

struct Stop(Child);

impl Drop for Stop {
    fn drop(&mut self) {
        // SIGTERM, not SIGINT: a run started in the background by a
        // non-interactive shell inherits an ignored SIGINT, which HAProxy
        // keeps (it then never exits and the benchmark waits for ever).
        let _ = Command::new("kill").args(["-TERM", &self.0.id().to_string()]).status();
        let _ = self.0.wait();
    }
}

/// Runs the agent with `config` in the LB namespace and measures it.
fn run_xdplb(
    h: &Topology,
    dir: &Path,
    xdplb: &Path,
    lb: &'static str,
    config: &str,
    seconds: u64,
) -> Result<Vec<PeerRun>> {
    let config = config.replacen(
        "[agent]\n",
        &format!(
            "[agent]\ncontrol_socket = \"{d}/xdplb.sock\"\npin_dir = \"{p}\"\n",
            d = dir.display(),
            p = h.pin_root().display()
        ),
        1,
    );
    std::fs::write(dir.join("xdplb.toml"), config)?;
    let log = dir.join(format!("{}.log", lb.replace(' ', "-")));
    let agent = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", h.ns("lb")))
        .arg(xdplb)
        .args(["run", "--detach-on-exit", "--config"])
        .arg(dir.join("xdplb.toml"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let agent = Stop(agent);
    wait_for(&log, "all backends resolved")?;
    let runs = measure(h, lb, Some(agent.0.id()), seconds)?;
    drop(agent);
    std::thread::sleep(Duration::from_millis(500));
    Ok(runs)
}

pub fn run(xdplb: &Path, xdp_pass: &Path, seconds: u64) -> Result<Vec<PeerRun>> {
    let h = Topology::up(&format!("xbp{}", std::process::id() % 100_000), xdp_pass)?;
    let scratch = lb_testkit::TempDir::new(format!("/tmp/{}", h.prefix))?;
    let dir = scratch.0.clone();
    start_nginx(&h, &dir)?;
    sh("sysctl -qw kernel.bpf_stats_enabled=1")?;
    let mut runs = Vec::new();

    // xdplb with direct server return: replies bypass the LB.
    let dsr = std::fs::read_to_string("config/harness.toml")?;
    runs.extend(run_xdplb(&h, &dir, xdplb, "xdplb", &dsr, seconds)?);

    // xdplb with NAT: like HAProxy, it hides the backends, which need no
    // change, and every reply comes back through the LB. The LB forwards
    // IP (its FIB lookup for replies needs that), and the backends' veths
    // fill in checksums themselves (a real NIC would have, on the wire).
    sh(&format!("ip netns exec {} sysctl -qw net.ipv4.conf.all.forwarding=1", h.ns("lb")))?;
    for name in ["b1", "b2", "b3"] {
        sh(&format!("ip netns exec {} ethtool -K eth0 tx off >/dev/null", h.ns(name)))?;
    }
    let nat = "[agent]\ninterface = \"eth0\"\nxdp_mode = \"driver\"\n\n[[service]]\nname = \"web\"\n\
               vip = \"198.18.0.100:80\"\nprotocol = \"tcp\"\nforwarding = \"nat\"\n\n\
               [[service.backend]]\naddress = \"198.18.1.11\"\n\n[[service.backend]]\naddress = \"198.18.1.12\"\n\n\
               [[service.backend]]\naddress = \"198.18.2.13\"\n";
    runs.extend(run_xdplb(&h, &dir, xdplb, "xdplb NAT", nat, seconds)?);
    // HAProxy, like DSR, on a LB that does not forward.
    sh(&format!("ip netns exec {} sysctl -qw net.ipv4.conf.all.forwarding=0", h.ns("lb")))?;

    // HAProxy, mode tcp, round robin, on the same VIP.
    sh(&format!("ip -n {} addr add 198.18.0.100/32 dev lo", h.ns("lb")))?;
    let cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n  maxconn 8000\n  nbthread 2\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend web\n  bind 198.18.0.100:80\n  default_backend pool\n\
         backend pool\n  balance roundrobin\n  server b1 {}:80\n  server b2 {}:80\n  server b3 {}:80\n",
            BACKENDS[0], BACKENDS[1], BACKENDS[2]
        ),
    )?;
    let haproxy = Command::new("ip")
        .args(["netns", "exec", &h.ns("lb"), "haproxy", "-db", "-f"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting haproxy")?;
    let haproxy = Stop(haproxy);
    std::thread::sleep(Duration::from_millis(700));
    // `ip netns exec` execs haproxy in place: the child's pid is haproxy's.
    runs.extend(measure(&h, "haproxy", Some(haproxy.0.id()), seconds)?);
    drop(haproxy);

    // No LB: what the client and backends sustain here, the ceiling of
    // every LB's requests/s on this machine.
    runs.extend(measure(&h, NO_LB, None, seconds)?);
    let _ = sh("sysctl -qw kernel.bpf_stats_enabled=0");
    Ok(runs)
}
