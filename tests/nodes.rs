//! Several active LB nodes behind a router that spreads the VIPs' traffic
//! over them (ECMP), learning the VIPs by BGP. The harness topology with
//! `up_nodes`: nodes `lb` and `lb2` each run xdplb and BIRD with
//! config/bird/lb-node.conf, the router `sw` runs BIRD with
//! config/bird/router.conf, and the client `far` reaches the VIPs only
//! through the router. Needs root and BIRD 2 (`cargo xtask setup`).

#[path = "common/agent.rs"]
mod agent;
#[path = "common/http.rs"]
mod http;

use std::{
    collections::BTreeSet,
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, atomic::AtomicBool},
    thread,
    time::{Duration, Instant},
};

use agent::Agent;
use http::{LongLived, get_new_connection_from, steady_stream_from};
use lb_testkit::{TempDir, topology::Topology, wait_until};
use xdplb::announce::{Cause, NodeState};

const XDP_PASS_OBJ: &str = concat!(env!("OUT_DIR"), "/xdp-pass");
const XDP_BASELINES_OBJ: &str = concat!(env!("OUT_DIR"), "/xdp-baselines");
const VIP4: &str = "198.18.0.100";
const VIP6: &str = "2001:db8::100";
const ANNOUNCE_TABLE: u32 = 100;
/// Each node's address on the router's segment, as BGP next hop.
const NODES: [(&str, &str); 2] = [("lb", "198.18.2.3"), ("lb2", "198.18.2.4")];
const HEALTH_INTERVAL_MS: u64 = 100;
const HEALTH_TIMEOUT_MS: u64 = 80;
const HEALTH_FALL: u64 = 3;

fn config_file(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/bird").join(name)
}

/// A BIRD daemon in a namespace of the topology; killed on drop.
struct Bird {
    child: Child,
    socket: PathBuf,
    _dir: TempDir,
}

impl Bird {
    /// BIRD in `ns` with `config` (a file of config/bird/, with `edits`
    /// applied: what differs per node), logging to its own directory.
    fn start(topology: &Topology, node: &str, config: &str, edits: &[(&str, &str)]) -> Self {
        let dir = std::env::temp_dir().join(format!("xdplb-bird-{}-{node}", topology.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        let mut text = std::fs::read_to_string(config_file(config)).unwrap();
        for (from, to) in edits {
            assert!(text.contains(from), "{config} has no {from:?}");
            text = text.replace(from, to);
        }
        let path = dir.join("bird.conf");
        std::fs::write(&path, format!("log \"{}\" all;\n{text}", dir.join("bird.log").display())).unwrap();
        let socket = dir.join("bird.ctl");
        // `ip netns exec` execs BIRD in place: the child is BIRD itself.
        let child = Command::new("ip")
            .args(["netns", "exec", &topology.ns(node), "bird", "-f", "-c"])
            .arg(&path)
            .arg("-s")
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(File::create(dir.join("stderr")).unwrap())
            .spawn()
            .expect("starting bird");
        Bird { child, socket, _dir: TempDir(dir) }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn protocols(&self) -> String {
        let out = Command::new("birdc").arg("-s").arg(&self.socket).args(["show", "protocols"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The router and both nodes' BIRD.
fn start_birds(topology: &Topology) -> Vec<Bird> {
    vec![
        Bird::start(topology, "sw", "router.conf", &[]),
        Bird::start(topology, "lb", "lb-node.conf", &[]),
        Bird::start(topology, "lb2", "lb-node.conf", &[("router id 198.18.2.3;", "router id 198.18.2.4;")]),
    ]
}

fn node_config(min_healthy: u32) -> String {
    let health = format!(
        "\n[service.health]\nkind = \"tcp\"\ninterval_ms = {HEALTH_INTERVAL_MS}\ntimeout_ms = {HEALTH_TIMEOUT_MS}\n\
         rise = 3\nfall = {HEALTH_FALL}\n"
    );
    let mut text = format!("[agent]\ninterface = \"eth0\"\nannounce_table = {ANNOUNCE_TABLE}\n");
    for (name, vip, backends) in [
        ("web", format!("{VIP4}:80"), ["198.18.1.11", "198.18.1.12"]),
        ("web6", format!("[{VIP6}]:80"), ["2001:db8:1::11", "2001:db8:1::12"]),
    ] {
        text += &format!(
            "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"tcp\"\n\
             announce_min_healthy = {min_healthy}\n{health}"
        );
        for address in backends {
            text += &format!("\n[[service.backend]]\naddress = \"{address}\"\n");
        }
    }
    text
}

/// The next hops of the router's route to `vip` (empty: no route).
fn router_next_hops(topology: &Topology, vip: &str) -> BTreeSet<String> {
    let family = if vip.contains(':') { "-6" } else { "-4" };
    let out = Command::new("ip").args(["-n", &topology.ns("sw"), family, "-j", "route", "show", vip]).output().unwrap();
    let routes: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut hops = BTreeSet::new();
    for route in routes.as_array().into_iter().flatten() {
        if let Some(gateway) = route["gateway"].as_str() {
            hops.insert(gateway.to_string());
        }
        for hop in route["nexthops"].as_array().into_iter().flatten() {
            if let Some(gateway) = hop["gateway"].as_str() {
                hops.insert(gateway.to_string());
            }
        }
    }
    hops
}

fn hops(nodes: &[&str]) -> BTreeSet<String> {
    nodes.iter().map(|n| NODES.iter().find(|(name, _)| name == n).unwrap().1.to_string()).collect()
}

/// The IPv6 next hops the router should have for `nodes`.
fn hops6(nodes: &[&str]) -> BTreeSet<String> {
    hops(nodes).iter().map(|a| a.replace("198.18.2.", "2001:db8:2::")).collect()
}

/// Waits until the router's route to `vip` goes via exactly `expected`;
/// returns how long that took.
fn until_next_hops(
    topology: &Topology,
    vip: &str,
    expected: &BTreeSet<String>,
    within: Duration,
    birds: &[Bird],
) -> Duration {
    let start = Instant::now();
    loop {
        let now = router_next_hops(topology, vip);
        if &now == expected {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "the router's route to {vip} goes via {now:?}, not {expected:?}, after {within:?}; router's BGP:\n{}",
            birds[0].protocols()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// What the node's announce table holds.
fn announce_table(topology: &Topology, node: &str) -> BTreeSet<String> {
    let mut routes = BTreeSet::new();
    for family in ["-4", "-6"] {
        let table = ANNOUNCE_TABLE.to_string();
        let out = Command::new("ip")
            .args(["-n", &topology.ns(node), family, "-j", "route", "show", "table", &table])
            .output()
            .unwrap();
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        for route in list.as_array().into_iter().flatten() {
            routes.insert(format!(
                "{} dev {}",
                route["dst"].as_str().unwrap_or("?"),
                route["dev"].as_str().unwrap_or("?")
            ));
        }
    }
    routes
}

/// The announcement of `vip` in the agent's status.
fn announcement(agent: &Agent, vip: &str) -> (bool, Cause, NodeState) {
    let status = agent.status();
    let announce = status.announce.expect("status shows the announcements");
    let entry = announce.vips.iter().find(|a| a.vip.to_string() == vip).expect("the VIP is listed");
    (entry.announced, entry.cause, announce.node)
}

/// `n` new connections from `far` from distinct source ports; their backends.
fn requests_from_far(topology: &Topology, vip: &str, n: usize) -> Vec<Result<String, String>> {
    let vip: std::net::SocketAddr =
        format!("{}:80", if vip.contains(':') { format!("[{vip}]") } else { vip.into() }).parse().unwrap();
    let ports = topology.client_ports(n);
    lb_testkit::run_in(&topology.ns("far"), move || ports.iter().map(|p| get_new_connection_from(vip, *p)).collect())
        .unwrap()
}

fn service_packets(agent: &Agent, service: &str) -> u64 {
    agent.status().services.iter().find(|s| s.name == service).map_or(0, |s| s.packets)
}

/// Attaches lb-ebpf's XDP_DROP baseline to `interface` in `ns` until the
/// returned guard is dropped.
struct DroppedLink {
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DroppedLink {
    fn attach(ns: &str, interface: &'static str) -> Self {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready) = std::sync::mpsc::channel();
        let ns = ns.to_string();
        // The program is attached from a thread inside the namespace (the
        // interface index is resolved there) and detached by that thread.
        let thread = thread::spawn(move || {
            lb_testkit::enter(&ns).unwrap();
            let mut ebpf = aya::Ebpf::load_file(XDP_BASELINES_OBJ).unwrap();
            let drop: &mut aya::programs::Xdp = ebpf.program_mut("bench_drop").unwrap().try_into().unwrap();
            drop.load().unwrap();
            let link = drop.attach(interface, aya::programs::XdpMode::default()).unwrap();
            ready_tx.send(()).unwrap();
            let _ = stopped.recv_timeout(Duration::from_secs(60));
            drop.detach(link).unwrap();
        });
        ready.recv().unwrap();
        DroppedLink { stop, thread: Some(thread) }
    }
}

impl Drop for DroppedLink {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[test]
fn vips_are_announced_by_every_healthy_node_and_withdrawn_on_failure_drain_and_stop() {
    let topology = Topology::up_nodes(&Topology::unique_prefix("xn"), Path::new(XDP_PASS_OBJ)).expect("harness up");
    let birds = start_birds(&topology);
    let lb = Agent::start_on(&topology, "lb", &node_config(1));
    let lb2 = Agent::start_on(&topology, "lb2", &node_config(2));
    let both = ["lb", "lb2"];
    let setup = until_next_hops(&topology, VIP4, &hops(&both), Duration::from_secs(20), &birds);
    until_next_hops(&topology, VIP6, &hops6(&both), Duration::from_secs(5), &birds);
    eprintln!("measured: both nodes announced and merged into one ECMP route {setup:?} after the second agent was up");
    for node in both {
        assert_eq!(
            announce_table(&topology, node),
            BTreeSet::from([format!("{VIP4} dev eth0"), format!("{VIP6} dev eth0")]),
            "{node}'s announce table holds exactly the VIP routes"
        );
    }
    assert_eq!(announcement(&lb2, VIP4), (true, Cause::Healthy, NodeState::Active));

    // The router spreads new connections over both nodes.
    let (before1, before2) = (service_packets(&lb, "web"), service_packets(&lb2, "web"));
    for vip in [VIP4, VIP6] {
        let results = requests_from_far(&topology, vip, 40);
        assert!(results.iter().all(|r| r.is_ok()), "requests to {vip} failed: {results:?}");
    }
    let (carried1, carried2) = (service_packets(&lb, "web") - before1, service_packets(&lb2, "web") - before2);
    eprintln!("measured: 40 connections to {VIP4}: {carried1} packets through lb, {carried2} through lb2");
    assert!(carried1 > 0 && carried2 > 0, "ECMP used one node only: lb {carried1}, lb2 {carried2}");

    // lb2 loses its backends (its link to them drops every reply): after
    // one fall it withdraws both VIPs, and the router sends all to lb.
    let dropped = DroppedLink::attach(&topology.ns("lb2"), "eth1");
    let fall = Duration::from_millis(HEALTH_FALL * HEALTH_INTERVAL_MS + HEALTH_TIMEOUT_MS);
    let withdrawn = until_next_hops(&topology, VIP4, &hops(&["lb"]), fall + Duration::from_secs(2), &birds);
    until_next_hops(&topology, VIP6, &hops6(&["lb"]), Duration::from_secs(2), &birds);
    eprintln!(
        "measured: lb2's backends unreachable → withdrawn at the router after {withdrawn:?} (one fall: {fall:?})"
    );
    assert_eq!(announcement(&lb2, VIP4).1, Cause::TooFewHealthy);
    assert!(announce_table(&topology, "lb2").is_empty(), "lb2 still announces: {:?}", announce_table(&topology, "lb2"));
    let results = requests_from_far(&topology, VIP4, 20);
    assert!(results.iter().all(|r| r.is_ok()), "with lb2 withdrawn, requests failed: {results:?}");
    drop(dropped);
    let back = until_next_hops(&topology, VIP4, &hops(&both), Duration::from_secs(5), &birds);
    eprintln!("measured: lb2's backends reachable again → announced after {back:?} (rise 3 × {HEALTH_INTERVAL_MS} ms)");

    // Maintenance: `node drain` withdraws lb's VIPs at once and survives a
    // restart of its agent; `node enable` announces them again.
    let (ok, out, err) = lb.cli(&["node", "drain"]);
    assert!(ok && out.contains("node drained"), "{out}{err}");
    let drained = until_next_hops(&topology, VIP4, &hops(&["lb2"]), Duration::from_secs(2), &birds);
    until_next_hops(&topology, VIP6, &hops6(&["lb2"]), Duration::from_secs(2), &birds);
    eprintln!("measured: node drain → withdrawn at the router after {drained:?}");
    let results = requests_from_far(&topology, VIP4, 20);
    assert!(results.iter().all(|r| r.is_ok()), "with lb drained, requests failed: {results:?}");
    let (ok, table, _) = lb.cli(&["status"]);
    assert!(ok && table.contains("node DRAINED") && table.contains("WITHDRAWN"), "{table}");
    lb.stop();
    let lb = Agent::start_on(&topology, "lb", &node_config(1));
    assert_eq!(announcement(&lb, VIP4), (false, Cause::NodeDrained, NodeState::Drained));
    thread::sleep(Duration::from_millis(500));
    assert_eq!(router_next_hops(&topology, VIP4), hops(&["lb2"]), "a restarted agent re-announced a drained node");
    let (ok, out, err) = lb.cli(&["node", "enable"]);
    assert!(ok && out.contains("node enabled"), "{out}{err}");
    until_next_hops(&topology, VIP4, &hops(&both), Duration::from_secs(2), &birds);

    // An agent that dies leaves its routes (the pinned program forwards on),
    // and the next agent adopts them without withdrawing anything.
    lb.kill();
    let watch_until = Instant::now() + Duration::from_secs(1);
    let lb = Agent::start_on(&topology, "lb", &node_config(1));
    while Instant::now() < watch_until + Duration::from_secs(1) {
        assert_eq!(router_next_hops(&topology, VIP4), hops(&both), "a killed or restarted agent withdrew its VIP");
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(announcement(&lb, VIP4), (true, Cause::Healthy, NodeState::Active));

    // `xdplb stop` removes lb2 from service: its VIPs are withdrawn first.
    let (ok, out, err) = lb2.cli(&["stop"]);
    assert!(ok, "{out}{err}");
    let stopped = until_next_hops(&topology, VIP4, &hops(&["lb"]), Duration::from_secs(2), &birds);
    eprintln!("measured: xdplb stop → withdrawn at the router after {stopped:?}");
    assert!(announce_table(&topology, "lb2").is_empty());
    drop(lb2);
    let results = requests_from_far(&topology, VIP4, 20);
    assert!(results.iter().all(|r| r.is_ok()), "with lb2 stopped, requests failed: {results:?}");

    // A removed service's VIP is withdrawn; the other VIP stays.
    let (ok, out, err) = lb.cli(&["service", "remove", "web6"]);
    assert!(ok, "{out}{err}");
    until_next_hops(&topology, VIP6, &BTreeSet::new(), Duration::from_secs(2), &birds);
    assert_eq!(router_next_hops(&topology, VIP4), hops(&["lb"]));
    assert_eq!(announce_table(&topology, "lb"), BTreeSet::from([format!("{VIP4} dev eth0")]));
    lb.stop();
}

#[test]
fn a_killed_node_fails_over_within_a_second_and_its_long_lived_connections_keep_their_backends() {
    let topology = Topology::up_nodes(&Topology::unique_prefix("xk"), Path::new(XDP_PASS_OBJ)).expect("harness up");
    let mut birds = start_birds(&topology);
    let lb = Agent::start_on(&topology, "lb", &node_config(1));
    let lb2 = Agent::start_on(&topology, "lb2", &node_config(1));
    let both = ["lb", "lb2"];
    until_next_hops(&topology, VIP4, &hops(&both), Duration::from_secs(20), &birds);
    // BFD sessions come up a moment after BGP: wait for them too.
    thread::sleep(Duration::from_secs(1));

    let far = topology.ns("far");
    let lb2_before = service_packets(&lb2, "web");
    let mut long_lived = LongLived::open_homed_from(&far, &format!("{VIP4}:80"), 20);
    let through_lb2 = service_packets(&lb2, "web") - lb2_before;
    assert!(through_lb2 > 0, "no long-lived connection went through lb2: the kill would move nothing");
    let stop = Arc::new(AtomicBool::new(false));
    let stream = steady_stream_from(&far, &format!("{VIP4}:80"), stop.clone(), Duration::from_secs(30));
    thread::sleep(Duration::from_millis(500));

    // The node dies: its link is cut, its BGP speaker and agent are gone.
    let killed = Instant::now();
    let status = Command::new("ip").args(["-n", &topology.ns("sw"), "link", "set", "lb20", "down"]).status().unwrap();
    assert!(status.success());
    birds[2].kill();
    lb2.kill();
    let failover = until_next_hops(&topology, VIP4, &hops(&["lb"]), Duration::from_secs(5), &birds);
    eprintln!("measured: node lb2 killed → the router's route left it after {failover:?} (BFD 3 × 100 ms)");
    assert!(failover < Duration::from_secs(1), "failover took {failover:?}");
    thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();

    let mut moved = Vec::new();
    for (connection, home) in &mut long_lived {
        match connection.try_get() {
            Ok(now) if now == *home => {}
            other => moved.push((home.clone(), other)),
        }
    }
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let after: Vec<_> = failed.iter().filter(|(t, _)| t.duration_since(killed) > failover).collect();
    eprintln!(
        "measured: {} new connections during the kill, {} failed ({} started after the failover); \
         20 long-lived connections ({through_lb2} packets through lb2 when opened): {} broke or moved",
        results.len(),
        failed.len(),
        after.len(),
        moved.len()
    );
    assert!(moved.is_empty(), "long-lived connections broke or changed backend: {moved:?}");
    assert!(after.is_empty(), "new connections failed after the failover: {after:?}");
    assert!(results.len() > 20, "only {} new connections", results.len());
    lb.stop();
}

const SYNC_PORT: u16 = 7600;

/// A key file of the test's own, mode 0600 (or `mode`).
fn key_file(topology: &Topology, contents: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let path = std::env::temp_dir().join(format!("xdplb-sync-key-{}-{mode:o}", topology.prefix));
    std::fs::write(&path, contents).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

const SYNC_KEY: &str = "a sync key of more than 32 bytes, for tests only\n";

/// `node_config` plus `[sync]` between the two nodes (`node` is lb or lb2).
fn sync_config(node: &str, min_healthy: u32, key: &Path) -> String {
    let address = |n: &str| format!("{}:{SYNC_PORT}", NODES.iter().find(|(name, _)| *name == n).unwrap().1);
    let peer = if node == "lb" { "lb2" } else { "lb" };
    format!(
        "{}\n[sync]\nlisten = \"{}\"\npeers = [\"{}\"]\nkey_file = {:?}\n",
        node_config(min_healthy),
        address(node),
        address(peer),
        key
    )
}

/// 40 long-lived connections through both nodes; a backend added on both;
/// then lb2 killed. Returns (connections that broke or changed backend,
/// connections, packets lb2 carried when they opened).
fn connections_broken_by_a_kill_after_a_backend_change(sync: bool) -> (usize, usize, u64) {
    let topology = Topology::up_nodes(&Topology::unique_prefix("xs"), Path::new(XDP_PASS_OBJ)).expect("harness up");
    let mut birds = start_birds(&topology);
    let key = key_file(&topology, SYNC_KEY, 0o600);
    let config = |node: &str| if sync { sync_config(node, 1, &key) } else { node_config(1) };
    let lb = Agent::start_on(&topology, "lb", &config("lb"));
    let lb2 = Agent::start_on(&topology, "lb2", &config("lb2"));
    until_next_hops(&topology, VIP4, &hops(&["lb", "lb2"]), Duration::from_secs(20), &birds);
    thread::sleep(Duration::from_secs(1));

    let lb2_before = service_packets(&lb2, "web");
    let mut long_lived = LongLived::open_homed_from(&topology.ns("far"), &format!("{VIP4}:80"), 40);
    let through_lb2 = service_packets(&lb2, "web") - lb2_before;
    // A fourth backend on both nodes: Maglev now maps about a third of all
    // five-tuples to it, so a node that never saw a flow would move it.
    for agent in [&lb, &lb2] {
        let (ok, out, err) = agent.cli(&["backend", "add", "web", "198.18.1.14"]);
        assert!(ok, "{out}{err}");
    }
    for agent in [&lb, &lb2] {
        wait_until(
            Duration::from_secs(10),
            Duration::from_millis(20),
            || agent.backend("web", "198.18.1.14").in_ring,
            || "the added backend never entered the ring".into(),
        );
    }
    if sync {
        let status = lb.status().sync.expect("status shows sync");
        eprintln!("measured: lb's sync before the kill: {status:?}");
        assert!(status.adopted_flows > 0, "lb adopted none of lb2's flows: {status:?}");
        assert_eq!((status.rejected_unauthenticated, status.rejected_replayed, status.events_lost), (0, 0, 0));
    }

    let status = Command::new("ip").args(["-n", &topology.ns("sw"), "link", "set", "lb20", "down"]).status().unwrap();
    assert!(status.success());
    birds[2].kill();
    lb2.kill();
    until_next_hops(&topology, VIP4, &hops(&["lb"]), Duration::from_secs(5), &birds);
    let broken = long_lived
        .iter_mut()
        .map(|(connection, home)| connection.try_get().ok().as_deref() != Some(home.as_str()))
        .filter(|broke| *broke)
        .count();
    lb.stop();
    (broken, long_lived.len(), through_lb2)
}

#[test]
fn with_sync_no_connection_breaks_when_its_node_dies_after_a_backend_change_and_without_sync_some_do() {
    let (broken_without, total, lb2_without) = connections_broken_by_a_kill_after_a_backend_change(false);
    let (broken_with, _, lb2_with) = connections_broken_by_a_kill_after_a_backend_change(true);
    eprintln!(
        "measured: {total} long-lived connections, a backend added, then a node killed: without sync {broken_without} \
         broke ({lb2_without} packets through the killed node when opened), with sync {broken_with} broke \
         ({lb2_with} packets)"
    );
    assert!(lb2_without > 0 && lb2_with > 0, "no connection went through the node that was killed");
    assert_eq!(broken_with, 0, "with sync, connections broke");
    assert!(broken_without > 0, "without sync nothing broke: the test does not exercise the gap sync closes");
}

#[test]
fn forged_replayed_and_foreign_sync_messages_change_nothing_and_are_counted() {
    use xdplb::sync::message::{SyncedFlow, encode};
    let topology = Topology::up_nodes(&Topology::unique_prefix("xf"), Path::new(XDP_PASS_OBJ)).expect("harness up");
    // A key file others may read is refused before anything is attached.
    let readable = key_file(&topology, SYNC_KEY, 0o644);
    let mut refused = Agent::spawn(&topology, &sync_config("lb", 1, &readable));
    let deadline = Instant::now() + Duration::from_secs(20);
    let exit = loop {
        if let Some(status) = refused.child.as_mut().unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "the agent started with a world-readable key");
        thread::sleep(Duration::from_millis(50));
    };
    assert!(!exit.success());
    assert!(refused.log_text().contains("is readable by group or others"), "{}", refused.log_text());
    refused.child = None;
    let xdp = Command::new("ip").args(["-n", &topology.ns("lb"), "link", "show", "eth0"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&xdp.stdout).contains("xdp"), "something was attached");

    // The agent on lb; the test speaks for its peer lb2. Backend b3 has
    // weight 0: no scheduler ever picks it, so a flow reaches it only if a
    // sync message put it there.
    let key = key_file(&topology, SYNC_KEY, 0o600);
    let config = sync_config("lb", 1, &key).replace(
        "address = \"198.18.1.12\"\n",
        "address = \"198.18.1.12\"\n\n[[service.backend]]\naddress = \"198.18.2.13\"\nweight = 0\n",
    );
    let lb = Agent::start_on(&topology, "lb", &config);
    let [forged_port, steered_port] = <[u16; 2]>::try_from(topology.client_ports(2)).unwrap();
    let vip: std::net::SocketAddr = format!("{VIP4}:80").parse().unwrap();
    let flow = |port: u16| SyncedFlow {
        protocol: 6,
        client: format!("198.18.2.2:{port}").parse().unwrap(),
        vip,
        backend: "198.18.2.13".parse().unwrap(),
    };
    let peer: std::net::SocketAddr = format!("198.18.2.4:{SYNC_PORT}").parse().unwrap();
    let listen: std::net::SocketAddr = format!("198.18.2.3:{SYNC_PORT}").parse().unwrap();
    let key_bytes = SYNC_KEY.trim_end().as_bytes().to_vec();
    let forged = encode(b"not the key, but 32 bytes long!!", peer, 1, 1, &[flow(forged_port)]);
    let genuine = encode(&key_bytes, peer, 1, 2, &[flow(steered_port)]);
    let send_from = |ns: &str, from: std::net::SocketAddr, datagrams: Vec<Vec<u8>>| {
        lb_testkit::run_in(ns, move || {
            let socket = std::net::UdpSocket::bind(from).unwrap();
            for datagram in datagrams {
                socket.send_to(&datagram, listen).unwrap();
                thread::sleep(Duration::from_millis(50));
            }
        })
        .unwrap();
    };
    send_from(&topology.ns("lb2"), peer, vec![forged, genuine.clone(), genuine.clone()]);
    // The genuine message from an address that is not a peer.
    send_from(&topology.ns("client"), "198.18.2.2:7600".parse().unwrap(), vec![genuine]);
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        let status = lb.status().sync.expect("status shows sync");
        if status.rejected_unknown_peer > 0 || Instant::now() > deadline {
            break status;
        }
        thread::sleep(Duration::from_millis(20));
    };
    eprintln!("measured: {status:?}");
    assert_eq!(
        (status.rejected_unauthenticated, status.rejected_replayed, status.rejected_unknown_peer),
        (1, 1, 1),
        "{status:?}"
    );
    assert_eq!((status.received_flows, status.adopted_flows), (1, 1), "{status:?}");
    let (ok, table, _) = lb.cli(&["status"]);
    assert!(ok && table.contains("1 unauthenticated, 1 replayed, 1 not from a peer"), "{table}");

    // The genuine flow goes to the backend no scheduler picks; the forged
    // one goes wherever Maglev sends it.
    let ask = |port: u16| {
        lb_testkit::run_in(&topology.ns("client"), move || get_new_connection_from(vip, port)).unwrap().unwrap()
    };
    assert_eq!(ask(steered_port), "b3", "the authenticated sync message did not steer its flow");
    assert_ne!(ask(forged_port), "b3", "a forged sync message steered traffic");
    lb.stop();
}
