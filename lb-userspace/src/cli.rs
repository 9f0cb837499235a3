//! The command line: `xdplb run` starts the agent; every other command talks
//! to a running agent over its control socket.

use std::{net::IpAddr, path::PathBuf};

use anyhow::{Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    config::DEFAULT_CONTROL_SOCKET,
    control::{self, Request, Response, Status},
};

#[derive(Parser)]
#[command(name = "xdplb", version, about = "XDP L4 load balancer (Maglev, L2 DSR)")]
pub struct Cli {
    /// The running agent's control socket ([agent] control_socket).
    #[arg(long, global = true, env = "XDPLB_SOCKET", default_value = DEFAULT_CONTROL_SOCKET)]
    pub socket: PathBuf,
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
}

#[derive(Subcommand)]
pub enum BackendAction {
    /// Add a backend to a service.
    Add {
        service: String,
        address: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Remove a backend; its established flows continue while it still answers.
    Remove { service: String, address: String },
    /// No new flows; established flows continue until they end.
    Drain { service: String, address: String },
    /// Undo a drain.
    Enable { service: String, address: String },
    /// Set a backend's weight (0..=1000); existing flows never move.
    Weight {
        service: String,
        address: String,
        #[arg(long)]
        weight: u32,
    },
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
    pub protocol: ProtocolArg,
    #[arg(long, default_value = "dsr")]
    pub forwarding: String,
    /// A backend, ADDRESS or ADDRESS=WEIGHT; repeat for more.
    #[arg(long = "backend")]
    pub backends: Vec<String>,
    #[arg(long, value_enum)]
    pub on_failure: Option<OnFailureArg>,
    #[arg(long)]
    pub drain_timeout_s: Option<u64>,
    #[arg(long, value_enum)]
    pub health_kind: Option<HealthKindArg>,
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
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ProtocolArg {
    Tcp,
    Udp,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum OnFailureArg {
    Reschedule,
    Keep,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum HealthKindArg {
    Tcp,
    Http,
    None,
}

fn name_of<T: ValueEnum>(value: T) -> String {
    value.to_possible_value().expect("no skipped variants").get_name().to_string()
}

impl ServiceArgs {
    /// The `[[service]]` table these flags describe, as TOML text: the agent
    /// parses and validates it with the same code as the config file.
    pub fn to_toml(&self) -> Result<String> {
        use toml::{Table, Value};
        let mut service = Table::new();
        service.insert("name".into(), self.name.clone().into());
        service.insert("vip".into(), self.vip.clone().into());
        service.insert("protocol".into(), name_of(self.protocol).into());
        service.insert("forwarding".into(), self.forwarding.clone().into());
        if let Some(v) = self.on_failure {
            service.insert("on_failure".into(), name_of(v).into());
        }
        if let Some(v) = self.drain_timeout_s {
            service.insert("drain_timeout_s".into(), Value::Integer(v as i64));
        }
        let mut health = Table::new();
        if let Some(v) = self.health_kind {
            health.insert("kind".into(), name_of(v).into());
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
            if address.parse::<IpAddr>().is_err() {
                bail!("--backend {spec:?}: {address:?} is not an IP address");
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

/// Runs a client command against the agent; returns what to print.
pub fn client(socket: &PathBuf, command: Command) -> Result<String> {
    let (request, json) = match command {
        Command::Run { .. } | Command::Check { .. } | Command::Stop { .. } => {
            unreachable!("handled by main")
        }
        Command::Top { once, interval_ms } => {
            return top(socket, once, std::time::Duration::from_millis(interval_ms));
        }
        Command::Debug { state } => (Request::Debug { on: matches!(state, OnOff::On) }, false),
        Command::Status { json } => (Request::Status {}, json),
        Command::Reload => (Request::Reload {}, false),
        Command::Service { action: ServiceAction::Add(args) } => (Request::ServiceAdd { toml: args.to_toml()? }, false),
        Command::Service { action: ServiceAction::Remove { name } } => (Request::ServiceRemove { name }, false),
        Command::Backend { action } => (
            match action {
                BackendAction::Add { service, address, weight } => {
                    Request::BackendAdd { service, address, weight: Some(weight) }
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
    let removed = crate::pins::remove_all(&root)?;
    if removed.is_empty() {
        return Ok(format!("nothing pinned in {}\n", root.display()));
    }
    Ok(format!("removed {} pin(s) in {}; the program is detached\n", removed.len(), root.display()))
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

pub fn top_view(previous: &(std::time::Instant, Status), current: &(std::time::Instant, Status)) -> String {
    let seconds = current.0.duration_since(previous.0).as_secs_f64().max(1e-3);
    let rate = |now: u64, before: Option<u64>| now.saturating_sub(before.unwrap_or(now)) as f64 / seconds;
    let mut rows = vec![
        ["SERVICE / BACKEND", "PKT/S", "BIT/S", "NEW FLOWS/S", "ACTIVE", "HEALTH", "ADMIN"].map(String::from).to_vec(),
    ];
    for s in &current.1.services {
        let old = previous.1.services.iter().find(|o| o.name == s.name);
        let active: u64 = s.backends.iter().map(|b| b.active_flows).sum();
        rows.push(vec![
            format!("{} {} {}", s.name, s.protocol, s.vip),
            human(rate(s.packets, old.map(|o| o.packets))),
            human(8.0 * rate(s.bytes, old.map(|o| o.bytes))),
            human(rate(s.new_flows, old.map(|o| o.new_flows))),
            active.to_string(),
            if s.fail_open { "FAIL-OPEN".into() } else { String::new() },
            String::new(),
        ]);
        for b in &s.backends {
            let old = old.and_then(|o| o.backends.iter().find(|ob| ob.address == b.address));
            rows.push(vec![
                format!("  {}", b.address),
                human(rate(b.packets, old.map(|o| o.packets))),
                human(8.0 * rate(b.bytes, old.map(|o| o.bytes))),
                human(rate(b.new_flows, old.map(|o| o.new_flows))),
                b.active_flows.to_string(),
                b.health.clone(),
                b.admin.clone(),
            ]);
        }
    }
    format!("xdplb top: {} (rates over {seconds:.1}s)\n{}", current.1.interface, aligned(&rows, ""))
}

/// 1234567.0 → "1.23M"
fn human(value: f64) -> String {
    match value {
        v if v >= 1e9 => format!("{:.2}G", v / 1e9),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e3 => format!("{:.2}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

/// `xdplb status` for people: one block per service, aligned columns.
pub fn status_table(status: &Status) -> String {
    let mut out = format!("interface {}\n", status.interface);
    for s in &status.services {
        out += &format!(
            "\nservice {}  {} {}  {}/{}{}{}  packets {}  bytes {}  new flows {}\n",
            s.name,
            s.protocol,
            s.vip,
            s.forwarding,
            s.scheduler,
            if s.persistence_timeout_s > 0 {
                format!(" persistence {}s", s.persistence_timeout_s)
            } else {
                String::new()
            },
            if s.fail_open { "  FAIL-OPEN (every backend down)" } else { "" },
            s.packets,
            s.bytes,
            s.new_flows
        );
        let mut rows = vec![
            ["BACKEND", "WEIGHT", "HEALTH", "LAST PROBE", "LATENCY", "ADMIN", "IN RING", "ACTIVE", "PACKETS", "BYTES"]
                .map(String::from)
                .to_vec(),
        ];
        for b in &s.backends {
            let (probe, latency) = match &b.last_probe {
                Some(p) => {
                    (format!("{} ({:.1}s ago)", p.detail, p.age_ms as f64 / 1000.0), format!("{:.1}ms", p.latency_ms))
                }
                None => ("-".into(), "-".into()),
            };
            let ring = if !b.resolved {
                "unresolved"
            } else if b.in_ring {
                "yes"
            } else {
                "no"
            };
            let active = match b.least_conn_active {
                Some(live) => format!("{} (lc {live})", b.active_flows),
                None => b.active_flows.to_string(),
            };
            let weight = if b.effective_weight != b.weight && b.in_ring {
                format!("{} (now {})", b.weight, b.effective_weight)
            } else {
                b.weight.to_string()
            };
            rows.push(vec![
                b.address.clone(),
                weight,
                b.health.clone(),
                probe,
                latency,
                b.admin.clone(),
                ring.into(),
                active,
                b.packets.to_string(),
                b.bytes.to_string(),
            ]);
        }
        out += &aligned(&rows, "  ");
    }
    out
}

fn aligned(rows: &[Vec<String>], indent: &str) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| rows.iter().filter_map(|r| r.get(c)).map(|v| v.chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        out += indent;
        out += cells.join("  ").trim_end();
        out += "\n";
    }
    out
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
        assert!(args.to_toml().unwrap_err().to_string().contains("not an IP address"));
    }

    #[test]
    fn top_computes_rates_between_samples() {
        let backend = |packets, bytes| crate::control::BackendStatus {
            address: "198.18.1.11".into(),
            weight: 1,
            effective_weight: 1,
            least_conn_active: None,
            health: "up".into(),
            last_probe: None,
            admin: "enabled".into(),
            in_ring: true,
            resolved: true,
            active_flows: 4,
            packets,
            bytes,
            new_flows: packets / 10,
        };
        let status = |packets, bytes| Status {
            interface: "eth0".into(),
            services: vec![crate::control::ServiceStatus {
                name: "web".into(),
                vip: "198.18.0.100:80".into(),
                protocol: "tcp".into(),
                forwarding: "dsr".into(),
                scheduler: "maglev".into(),
                persistence_timeout_s: 0,
                fail_open: false,
                packets,
                bytes,
                new_flows: packets / 10,
                backends: vec![backend(packets, bytes)],
            }],
        };
        let t0 = std::time::Instant::now();
        let view =
            top_view(&(t0, status(1000, 100_000)), &(t0 + std::time::Duration::from_secs(2), status(5000, 350_000)));
        // 4000 packets and 250 kB in 2 s: 2000 pkt/s, 1 Mbit/s, 200 new flows/s.
        assert!(view.contains("  198.18.1.11            2.00k  1.00M  200          4       up      enabled"), "{view}");
    }

    #[test]
    fn table_columns_line_up() {
        let rows = vec![vec!["A".into(), "BB".into()], vec!["CCC".into(), "D".into()]];
        assert_eq!(aligned(&rows, "  "), "  A    BB\n  CCC  D\n");
    }
}
