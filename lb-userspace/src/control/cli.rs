//! The command line: `xdplb run` starts the agent; every other command talks
//! to a running agent over its control socket.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    config::{
        BackendAddress, DEFAULT_CONTROL_SOCKET, Forwarding, HealthKind, OnFailure, Protocol, XdpModeConfig, value_name,
    },
    control::{
        self, Request, Response, Status,
        views::{status_table, top_view},
    },
};

#[derive(Parser)]
#[command(name = "xdplb", version, about = "XDP L4 load balancer (Maglev, L2 DSR)")]
pub struct Cli {
    /// The running agent's control socket ([agent] control_socket).
    #[arg(long, global = true, env = "XDPLB_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,
    /// Log lines as text (under systemd: without timestamps, with journald
    /// levels) or as one JSON object each.
    #[arg(long, global = true, value_enum, default_value = "text")]
    pub log_format: crate::logging::LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Attach to the configured interface (or adopt the pinned state a
    /// previous agent left) and run the agent until SIGINT/SIGTERM.
    Run {
        #[arg(long, short)]
        config: PathBuf,
        /// At exit, detach the program and remove the pinned state (by
        /// default forwarding continues without the agent).
        #[arg(long)]
        detach_on_exit: bool,
    },
    /// Remove xdplb from the interface: stops a running agent and detaches
    /// the program, or removes the pinned state an agent left behind.
    Stop {
        /// Read the control socket and pin directory from this config.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The pin directory ([agent] pin_dir) when no agent is running.
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
    /// Live per-service and per-backend rates, refreshed every second.
    Top {
        /// Print one snapshot (rates over one interval) and exit.
        #[arg(long)]
        once: bool,
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
    },
    /// Switch eBPF-side debug logging (to the agent's log) on or off.
    Debug {
        #[arg(value_enum)]
        state: OnOff,
    },
    /// Validate a configuration file and exit.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Services and backends: weight, health, admin state, flows, traffic.
    Status {
        /// Machine-readable output (stable; see README).
        #[arg(long)]
        json: bool,
    },
    /// Change a service's backends (until the next reload or restart).
    Backend {
        #[command(subcommand)]
        action: BackendAction,
    },
    /// Add or remove services (until the next reload or restart).
    Service {
        #[command(subcommand)]
        action: ServiceAction,
    },
    /// Re-read the configuration file and apply the difference (as SIGHUP).
    Reload,
    /// This node's VIP announcements ([agent] announce_table).
    Node {
        #[command(subcommand)]
        action: NodeAction,
    },
    /// Print a shell completion script: `xdplb completions bash > /etc/bash_completion.d/xdplb`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// On a backend: register it under a service in etcd and keep the
    /// registration alive (a lease of --ttl seconds); SIGTERM deregisters.
    Register(Box<RegisterArgs>),
    /// Write the man pages (xdplb.8 and one per command) into a directory.
    #[command(hide = true)]
    Manpages {
        #[arg(long)]
        dir: PathBuf,
    },
    /// On a backend of a tunnel service: attach the XDP program that opens
    /// xdplb's IPIP and GUE tunnels (it stays attached after this exits).
    Decap {
        #[arg(long)]
        interface: String,
        /// The UDP port GUE arrives on (the services' gue_port).
        #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
        gue_port: u16,
        /// Remove it instead.
        #[arg(long, conflicts_with = "stats")]
        detach: bool,
        /// Print what it has decapsulated and exit.
        #[arg(long)]
        stats: bool,
        #[arg(long, value_enum, default_value = "driver")]
        xdp_mode: XdpModeConfig,
        /// Where its link and maps are pinned (default /sys/fs/bpf/xdplb/decap/INTERFACE).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
    },
}

#[derive(Args)]
pub struct RegisterArgs {
    /// An etcd endpoint, http://HOST:PORT or https://HOST:PORT; repeat for more.
    #[arg(long, required = true)]
    pub etcd: Vec<String>,
    /// The service (as named in the agents' config) this backend serves.
    #[arg(long)]
    pub service: String,
    /// This backend's address as the LB reaches it: ADDRESS or ADDRESS:PORT.
    #[arg(long, value_parser = parse_address)]
    pub address: BackendAddress,
    #[arg(long, default_value_t = 1)]
    pub weight: u32,
    /// Register as a backup: new flows only while no primary is available.
    #[arg(long)]
    pub backup: bool,
    /// Seconds the registration outlives this process if it dies.
    #[arg(long, default_value_t = 5)]
    pub ttl: i64,
    /// The agents' [discovery] prefix.
    #[arg(long, default_value = crate::config::DEFAULT_DISCOVERY_PREFIX)]
    pub prefix: String,
    /// The CA of etcd's certificates (https endpoints).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    #[arg(long, requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    #[arg(long, requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    #[arg(long, requires = "password_file")]
    pub username: Option<String>,
    /// A file whose first line is the password.
    #[arg(long, requires = "username")]
    pub password_file: Option<PathBuf>,
}

impl RegisterArgs {
    pub fn into_registrant(self) -> Result<crate::discovery::register::Registrant> {
        crate::config::check_endpoints(&self.etcd, self.ca_file.is_some(), "--ca-file")
            .map_err(|e| anyhow::anyhow!("--etcd: {e}"))?;
        crate::config::check_prefix(&self.prefix).map_err(|e| anyhow::anyhow!("--{e}"))?;
        Ok(crate::discovery::register::Registrant {
            settings: crate::discovery::etcd::EtcdSettings {
                endpoints: self.etcd,
                ca_file: self.ca_file,
                cert_file: self.cert_file,
                key_file: self.key_file,
                username: self.username,
                password_file: self.password_file,
            },
            prefix: self.prefix,
            service: self.service,
            address: self.address,
            registration: crate::discovery::Registration { weight: self.weight, backup: self.backup },
            ttl_s: self.ttl,
        })
    }
}

#[derive(Subcommand)]
pub enum BackendAction {
    /// Add a backend to a service.
    Add {
        service: String,
        #[arg(value_parser = parse_address)]
        address: BackendAddress,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// A backup: new flows only while no primary backend is available.
        #[arg(long)]
        backup: bool,
    },
    /// Remove a backend; its established flows continue while it still answers.
    Remove {
        service: String,
        #[arg(value_parser = parse_address)]
        address: BackendAddress,
    },
    /// No new flows; established flows continue until they end.
    Drain {
        service: String,
        #[arg(value_parser = parse_address)]
        address: BackendAddress,
    },
    /// Undo a drain.
    Enable {
        service: String,
        #[arg(value_parser = parse_address)]
        address: BackendAddress,
    },
    /// Set a backend's weight (0..=1000); existing flows never move.
    Weight {
        service: String,
        #[arg(value_parser = parse_address)]
        address: BackendAddress,
        #[arg(long)]
        weight: u32,
    },
}

#[derive(Subcommand)]
pub enum NodeAction {
    /// Maintenance: withdraw every VIP; packets that still arrive are
    /// forwarded, so established flows finish. Survives agent restarts.
    Drain,
    /// Announce the VIPs again (those whose services qualify).
    Enable,
}

#[derive(Subcommand)]
pub enum ServiceAction {
    /// Add a service; the fields are those of a [[service]] table.
    Add(Box<ServiceArgs>),
    /// Remove a service.
    Remove { name: String },
}

#[derive(Args)]
pub struct ServiceArgs {
    pub name: String,
    /// VIP and port: 198.18.0.100:80 or [2001:db8::100]:80; port 0 = every port.
    #[arg(long)]
    pub vip: String,
    #[arg(long, value_enum)]
    pub protocol: Protocol,
    #[arg(long, value_enum, default_value_t)]
    pub forwarding: Forwarding,
    /// GUE: the backends' decapsulation port (default 6080).
    #[arg(long)]
    pub gue_port: Option<u16>,
    /// A backend, ADDRESS or ADDRESS=WEIGHT; repeat for more.
    #[arg(long = "backend")]
    pub backends: Vec<String>,
    #[arg(long, value_enum)]
    pub on_failure: Option<OnFailure>,
    #[arg(long)]
    pub drain_timeout_s: Option<u64>,
    #[arg(long, value_enum)]
    pub health_kind: Option<HealthKind>,
    #[arg(long)]
    pub health_port: Option<u16>,
    #[arg(long)]
    pub health_path: Option<String>,
    /// Comma-separated HTTP status codes.
    #[arg(long, value_delimiter = ',')]
    pub health_expect_status: Vec<u16>,
    #[arg(long)]
    pub health_expect_body: Option<String>,
    #[arg(long)]
    pub health_interval_ms: Option<u64>,
    #[arg(long)]
    pub health_timeout_ms: Option<u64>,
    #[arg(long)]
    pub health_rise: Option<u32>,
    #[arg(long)]
    pub health_fall: Option<u32>,
    /// Tunnel services: probe the VIP through the tunnel (default true).
    #[arg(long)]
    pub health_through_tunnel: Option<bool>,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

impl ServiceArgs {
    /// The `[[service]]` table these flags describe, as TOML text: the agent
    /// parses and validates it with the same code as the config file.
    pub fn to_toml(&self) -> Result<String> {
        use toml::{Table, Value};
        let mut service = Table::new();
        service.insert("name".into(), self.name.clone().into());
        service.insert("vip".into(), self.vip.clone().into());
        service.insert("protocol".into(), value_name(self.protocol).into());
        service.insert("forwarding".into(), value_name(self.forwarding).into());
        if let Some(v) = self.on_failure {
            service.insert("on_failure".into(), value_name(v).into());
        }
        if let Some(v) = self.drain_timeout_s {
            service.insert("drain_timeout_s".into(), Value::Integer(v as i64));
        }
        if let Some(v) = self.gue_port {
            service.insert("gue_port".into(), Value::Integer(v.into()));
        }
        let mut health = Table::new();
        if let Some(v) = self.health_kind {
            health.insert("kind".into(), value_name(v).into());
        }
        if let Some(v) = self.health_port {
            health.insert("port".into(), Value::Integer(v.into()));
        }
        if let Some(v) = &self.health_path {
            health.insert("path".into(), v.clone().into());
        }
        if !self.health_expect_status.is_empty() {
            let codes = self.health_expect_status.iter().map(|c| Value::Integer((*c).into())).collect();
            health.insert("expect_status".into(), Value::Array(codes));
        }
        if let Some(v) = &self.health_expect_body {
            health.insert("expect_body".into(), v.clone().into());
        }
        if let Some(v) = self.health_through_tunnel {
            health.insert("through_tunnel".into(), v.into());
        }
        for (key, value) in [
            ("interval_ms", self.health_interval_ms),
            ("timeout_ms", self.health_timeout_ms),
            ("rise", self.health_rise.map(u64::from)),
            ("fall", self.health_fall.map(u64::from)),
        ] {
            if let Some(v) = value {
                health.insert(key.into(), Value::Integer(v as i64));
            }
        }
        if !health.is_empty() {
            service.insert("health".into(), Value::Table(health));
        }
        let mut backends = Vec::new();
        for spec in &self.backends {
            let (address, weight) = match spec.split_once('=') {
                Some((a, w)) => match w.parse::<i64>() {
                    Ok(w) => (a, w),
                    Err(_) => bail!("--backend {spec:?}: the weight must be a number"),
                },
                None => (spec.as_str(), 1),
            };
            if let Err(err) = address.parse::<BackendAddress>() {
                bail!("--backend {spec:?}: {err}");
            }
            let mut backend = Table::new();
            backend.insert("address".into(), address.into());
            backend.insert("weight".into(), Value::Integer(weight));
            backends.push(Value::Table(backend));
        }
        if !backends.is_empty() {
            service.insert("backend".into(), Value::Array(backends));
        }
        let mut document = Table::new();
        document.insert("service".into(), Value::Array(vec![Value::Table(service)]));
        Ok(toml::to_string(&document)?)
    }
}

/// The completion script for `shell`, generated from the clap definitions.
pub fn completions(shell: clap_complete::Shell) -> String {
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut <Cli as clap::CommandFactory>::command(), "xdplb", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// Man pages from the clap definitions: `xdplb.8` and `xdplb-COMMAND.8`.
pub fn write_manpages(dir: &std::path::Path) -> Result<String> {
    // Section 8: system administration commands (the binary is /usr/sbin/xdplb).
    fn write(command: clap::Command, dir: &std::path::Path) -> std::io::Result<()> {
        for sub in command.get_subcommands().filter(|s| !s.is_hide_set()).cloned() {
            write(sub, dir)?;
        }
        clap_mangen::Man::new(command).section("8").generate_to(dir).map(drop)
    }
    std::fs::create_dir_all(dir)?;
    let mut command = <Cli as clap::CommandFactory>::command().name("xdplb").disable_help_subcommand(true);
    command.build();
    write(command, dir)?;
    let mut pages: Vec<String> =
        std::fs::read_dir(dir)?.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    pages.sort();
    Ok(format!("wrote {} man pages to {}: {}\n", pages.len(), dir.display(), pages.join(" ")))
}

/// A backend address from the command line: ADDRESS or ADDRESS:PORT.
fn parse_address(text: &str) -> Result<BackendAddress, String> {
    text.parse()
}

/// Runs a client command against the agent; returns what to print.
pub fn client(socket: &PathBuf, command: Command) -> Result<String> {
    let (request, json) = match command {
        Command::Run { .. }
        | Command::Check { .. }
        | Command::Stop { .. }
        | Command::Decap { .. }
        | Command::Completions { .. }
        | Command::Register(_)
        | Command::Manpages { .. } => {
            unreachable!("handled by main")
        }
        Command::Top { once, interval_ms } => {
            return top(socket, once, std::time::Duration::from_millis(interval_ms));
        }
        Command::Debug { state } => (Request::Debug { on: matches!(state, OnOff::On) }, false),
        Command::Status { json } => (Request::Status {}, json),
        Command::Reload => (Request::Reload {}, false),
        Command::Node { action: NodeAction::Drain } => (Request::NodeDrain {}, false),
        Command::Node { action: NodeAction::Enable } => (Request::NodeEnable {}, false),
        Command::Service { action: ServiceAction::Add(args) } => (Request::ServiceAdd { toml: args.to_toml()? }, false),
        Command::Service { action: ServiceAction::Remove { name } } => (Request::ServiceRemove { name }, false),
        Command::Backend { action } => (
            match action {
                BackendAction::Add { service, address, weight, backup } => {
                    Request::BackendAdd { service, address, weight: Some(weight), backup }
                }
                BackendAction::Remove { service, address } => Request::BackendRemove { service, address },
                BackendAction::Drain { service, address } => Request::BackendDrain { service, address },
                BackendAction::Enable { service, address } => Request::BackendEnable { service, address },
                BackendAction::Weight { service, address, weight } => {
                    Request::BackendWeight { service, address, weight }
                }
            },
            false,
        ),
    };
    match control::call(socket, &request)? {
        Response::Status { status, .. } if json => Ok(serde_json::to_string_pretty(&status)? + "\n"),
        Response::Status { status, .. } => Ok(status_table(&status)),
        Response::Done { message, .. } => Ok(message + "\n"),
        Response::Error { error, .. } => bail!("{error}"),
    }
}

/// `xdplb stop`: through the agent when one answers, else by removing the
/// pins directly (which detaches the program once nothing holds it).
pub fn stop(socket: &std::path::Path, config: Option<PathBuf>, pin_dir: Option<PathBuf>) -> Result<String> {
    let (socket, pin_root) = match &config {
        Some(path) => {
            let config = crate::config::Config::load(path)?;
            (config.agent.control_socket.clone(), Some(config.agent.pin_root()))
        }
        None => (socket.to_path_buf(), pin_dir),
    };
    if std::os::unix::net::UnixStream::connect(&socket).is_ok() {
        // Only the agent whose state the operator named: never another one
        // that happens to answer on this socket.
        if let Some(wanted) = &pin_root {
            let owned = match control::call(&socket, &Request::Status {})? {
                Response::Status { status, .. } => status.pin_dir,
                Response::Error { error, .. } => bail!("{error}"),
                Response::Done { message, .. } => bail!("unexpected answer {message:?}"),
            };
            if owned.as_deref().is_some_and(|owned| !same_path(owned, wanted)) {
                bail!(
                    "the agent at {} owns {}, not {}: nothing stopped or removed (give --socket of the agent \
                     that owns {}, or stop that agent first)",
                    socket.display(),
                    owned.unwrap().display(),
                    wanted.display(),
                    wanted.display()
                );
            }
        }
        match control::call(&socket, &Request::Stop { detach: true })? {
            Response::Error { error, .. } => bail!("{error}"),
            _ => {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
                while socket.exists() && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                return Ok("stopped the agent; the program is detached and the pinned state removed\n".into());
            }
        }
    }
    let Some(root) = pin_root else {
        bail!(
            "no agent answers at {}; give --pin-dir or --config to remove what an agent left behind",
            socket.display()
        );
    };
    let removed = crate::dataplane::pins::remove_all(&root)?;
    if removed.is_empty() {
        return Ok(format!("nothing pinned in {}\n", root.display()));
    }
    Ok(format!("removed {} pin(s) in {}; the program is detached\n", removed.len(), root.display()))
}

/// Whether two paths name the same directory (either may not exist).
fn same_path(a: &std::path::Path, b: &std::path::Path) -> bool {
    let canonical = |p: &std::path::Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canonical(a) == canonical(b)
}

/// `xdplb top`: rates between two status samples, like `ipvsadm -L --rate`.
fn top(socket: &PathBuf, once: bool, interval: std::time::Duration) -> Result<String> {
    let sample = || -> Result<(std::time::Instant, Status)> {
        match control::call(socket, &Request::Status {})? {
            Response::Status { status, .. } => Ok((std::time::Instant::now(), status)),
            Response::Error { error, .. } => bail!("{error}"),
            Response::Done { message, .. } => bail!("unexpected answer {message:?}"),
        }
    };
    let mut previous = sample()?;
    loop {
        std::thread::sleep(interval);
        let current = sample()?;
        let view = top_view(&previous, &current);
        if once {
            return Ok(view);
        }
        print!("\x1b[2J\x1b[H{view}");
        use std::io::Write as _;
        std::io::stdout().flush()?;
        previous = current;
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    #[test]
    fn service_flags_become_a_service_table_the_config_parser_accepts() {
        let cli = Cli::parse_from([
            "xdplb",
            "service",
            "add",
            "dns",
            "--vip",
            "198.18.0.53:53",
            "--protocol",
            "udp",
            "--backend",
            "198.18.1.21",
            "--backend",
            "198.18.1.22=3",
            "--health-kind",
            "tcp",
            "--health-port",
            "8053",
            "--health-expect-status",
            "200,204",
            "--on-failure",
            "keep",
        ]);
        let Command::Service { action: ServiceAction::Add(args) } = cli.command else { panic!() };
        let text = args.to_toml().unwrap();
        let services = Config::parse_services(&text, Path::new("<cli>")).unwrap();
        let s = &services[0];
        assert_eq!(s.name.get_ref(), "dns");
        assert_eq!(s.backends.len(), 2);
        assert_eq!(s.backends[1].weight.0, 3);
        let check = s.health_check(&s.backends[0]);
        assert_eq!((check.port, check.expect_status.clone()), (8053, vec![200, 204]));
        assert_eq!(s.on_failure, crate::config::OnFailure::Keep);
    }

    #[test]
    fn tunnel_service_flags_become_a_tunnel_service() {
        let cli = Cli::parse_from([
            "xdplb",
            "service",
            "add",
            "remote",
            "--vip",
            "[2001:db8::100]:80",
            "--protocol",
            "tcp",
            "--forwarding",
            "gue",
            "--gue-port",
            "7000",
            "--health-through-tunnel",
            "false",
            "--backend",
            "198.18.3.21",
        ]);
        let Command::Service { action: ServiceAction::Add(args) } = cli.command else { panic!() };
        let services = Config::parse_services(&args.to_toml().unwrap(), Path::new("<cli>")).unwrap();
        let s = &services[0];
        assert_eq!((s.forwarding, *s.gue_port.get_ref()), (Forwarding::Gue, 7000));
        assert_eq!(s.health_check(&s.backends[0]).through_tunnel, None);
    }

    #[test]
    fn completions_and_man_pages_come_from_the_command_definitions() {
        for shell in [clap_complete::Shell::Bash, clap_complete::Shell::Zsh, clap_complete::Shell::Fish] {
            let script = completions(shell);
            for word in ["status", "decap", "gue-port", "log-format"] {
                assert!(script.contains(word), "{shell} completion lacks {word}");
            }
        }
        let dir = std::env::temp_dir().join(format!("xdplb-man-{}", std::process::id()));
        let report = write_manpages(&dir).unwrap();
        let main = std::fs::read_to_string(dir.join("xdplb.8")).unwrap();
        let decap = std::fs::read_to_string(dir.join("xdplb-decap.8")).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(main.starts_with(".ie") || main.contains(".TH xdplb 8"), "{main}");
        assert!(decap.contains("gue\\-port"), "{decap}");
        assert!(report.contains("xdplb-backend-add.8"), "{report}");
        assert!(!report.contains("manpages"), "the hidden command has no page: {report}");
    }

    #[test]
    fn bad_backend_flags_are_refused_before_sending() {
        let cli = Cli::parse_from([
            "xdplb",
            "service",
            "add",
            "x",
            "--vip",
            "198.18.0.1:80",
            "--protocol",
            "tcp",
            "--backend",
            "nope",
        ]);
        let Command::Service { action: ServiceAction::Add(args) } = cli.command else { panic!() };
        assert!(args.to_toml().unwrap_err().to_string().contains("is not a backend address"));
    }
}
