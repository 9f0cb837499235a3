//! `xdplb run` in a namespace of the harness, driven the way an operator
//! would: config file, signals, the CLI. Shared by the end-to-end tests.
#![allow(dead_code)]

use std::{
    fs::File,
    io::Read,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use lb_testkit::{TempDir, topology::Topology};
use xdplb::control::{BackendStatus, Status};

pub const XDPLB: &str = env!("CARGO_BIN_EXE_xdplb");

/// A running `xdplb run` in the LB namespace; stopped on drop.
pub struct Agent {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub pin_root: PathBuf,
    pub _dir: TempDir,
}

impl Agent {
    pub fn start(topology: &Topology, config: &str) -> Self {
        let agent = Self::spawn(topology, config);
        agent.wait_for_log("attached to", 1);
        // Backends whose neighbours are still being resolved are not in the
        // ring yet; the distribution tests need all of them.
        agent.wait_for_log("all backends resolved", 1);
        agent
    }

    pub fn spawn(topology: &Topology, config: &str) -> Self {
        Self::spawn_with_env(topology, config, &[])
    }

    /// `start` with extra environment variables.
    pub fn start_with_env(topology: &Topology, config: &str, env: &[(&str, &Path)]) -> Self {
        let agent = Self::spawn_with_env(topology, config, env);
        agent.wait_for_log("attached to", 1);
        agent.wait_for_log("all backends resolved", 1);
        agent
    }

    pub fn spawn_with_env(topology: &Topology, config: &str, env: &[(&str, &Path)]) -> Self {
        Self::spawn_wrapped(topology, config, env, &[])
    }

    /// The agent started through `wrapper` (a command that execs its arguments).
    pub fn spawn_wrapped(topology: &Topology, config: &str, env: &[(&str, &Path)], wrapper: &[&str]) -> Self {
        Self::spawn_on(topology, "lb", config, env, wrapper)
    }

    /// `start` on LB node `node` (lb, or lb2 of a multi-node topology),
    /// with its own pin directory.
    pub fn start_on(topology: &Topology, node: &str, config: &str) -> Self {
        let agent = Self::spawn_on(topology, node, config, &[], &[]);
        agent.wait_for_log("attached to", 1);
        agent.wait_for_log("all backends resolved", 1);
        agent
    }

    fn spawn_on(topology: &Topology, node: &str, config: &str, env: &[(&str, &Path)], wrapper: &[&str]) -> Self {
        static SPAWNED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = SPAWNED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("xdplb-test-{}-{n}", topology.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        let config_path = dir.join("xdplb.toml");
        let socket = dir.join("xdplb.sock");
        let log = dir.join("xdplb.log");
        let mut agent = Agent {
            child: None,
            config: config_path,
            socket,
            log,
            pin_root: topology.node_pin_root(node),
            _dir: TempDir(dir),
        };
        agent.write_config(config);
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", topology.ns(node)))
            .args(wrapper)
            .args([XDPLB, "run", "--config"])
            .arg(&agent.config)
            .env("RUST_LOG", "info")
            .env("XDPLB_TEST_REFUSE_MAP_WRITES", agent.refusal_flag())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(File::create(&agent.log).unwrap())
            .spawn()
            .expect("starting xdplb");
        agent.child = Some(child);
        agent
    }

    /// Writes `config` with this agent's own control socket.
    pub fn write_config(&self, config: &str) {
        // This agent's own control socket, and the topology's pin directory.
        let text = config.replacen(
            "[agent]\n",
            &format!("[agent]\ncontrol_socket = {:?}\npin_dir = {:?}\n", self.socket, self.pin_root),
            1,
        );
        std::fs::write(&self.config, text).unwrap();
    }

    /// While this file exists the agent's map writes are refused (the
    /// writer's test hook).
    pub fn refusal_flag(&self) -> PathBuf {
        self._dir.0.join("refuse-map-writes")
    }

    pub fn refuse_map_writes(&self, refuse: bool) {
        if refuse {
            std::fs::write(self.refusal_flag(), b"").unwrap();
        } else {
            std::fs::remove_file(self.refusal_flag()).unwrap();
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_for_log(&self, needle: &str, count: usize) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.log_text().matches(needle).count() < count {
            assert!(Instant::now() < deadline, "xdplb never logged {needle:?} ×{count}; log:\n{}", self.log_text());
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Rewrites the config file and sends SIGHUP; returns once applied.
    pub fn reload(&self, config: &str) {
        let before = self.log_text().matches("reloaded").count();
        self.write_config(config);
        self.signal("HUP");
        self.wait_for_log("reloaded", before + 1);
    }

    /// Writes an invalid config and sends SIGHUP; returns once it was rejected.
    pub fn reload_rejected(&self, config: &str) {
        let before = self.log_text().matches("reload rejected").count();
        self.write_config(config);
        self.signal("HUP");
        self.wait_for_log("reload rejected", before + 1);
    }

    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().unwrap().id();
        let status = Command::new("kill").args(["-s", name, &pid.to_string()]).status().unwrap();
        assert!(status.success());
    }

    /// Runs `xdplb --socket S ARGS...`; returns (success, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(XDPLB).arg("--socket").arg(&self.socket).args(args).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// `xdplb status --json`, parsed into the agent's own type.
    pub fn status(&self) -> Status {
        lb_testkit::status_via_cli(Path::new(XDPLB), &self.socket).unwrap()
    }

    /// The status entry of one backend of one service.
    pub fn backend(&self, service: &str, address: &str) -> BackendStatus {
        let address: xdplb::config::BackendAddress = address.parse().unwrap();
        let status = self.status();
        let s = status.services.iter().find(|s| s.name == service).unwrap_or_else(|| panic!("no service {service}"));
        s.backends.iter().find(|b| b.address == address).cloned().unwrap_or_else(|| panic!("no backend {address}"))
    }

    /// SIGKILL: the agent gets no chance to clean anything up.
    pub fn kill(mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Stops the agent and returns its exit summary (stdout).
    pub fn stop(mut self) -> String {
        self.signal("INT");
        let mut child = self.child.take().unwrap();
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        let status = child.wait().unwrap();
        assert!(status.success(), "xdplb exited with {status}; log:\n{}", self.log_text());
        out
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-INT", &child.id().to_string()]).status();
            let _ = child.wait();
        }
    }
}
