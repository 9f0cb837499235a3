//! End-to-end tests in the network-namespace harness (tests/netns-harness.sh):
//! `xdplb run` in the LB namespace, HTTP clients in the client namespace,
//! three backends answering with their names. Needs root.
//!
//! Each test builds its own topology under a unique prefix and tears it down
//! on drop, also when the test fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

#[path = "common/agent.rs"]
mod agent;
#[path = "common/http.rs"]
mod http;

use agent::{Agent, XDPLB};
use http::{LongLived, body_of, get_new_connection, get_new_connection_from, get_new_connection_within};
use lb_testkit::{TempDir, topology::Topology, wait_until};
use xdplb::control::{Admin, BackendStatus, Health, Status};

const XDP_PASS_OBJ: &str = concat!(env!("OUT_DIR"), "/xdp-pass");
const VIP4: &str = "198.18.0.100:80";
const VIP6: &str = "[2001:db8::100]:80";
const BACKENDS4: [&str; 3] = ["198.18.1.11", "198.18.1.12", "198.18.2.13"];
const BACKENDS6: [&str; 3] = ["2001:db8:1::11", "2001:db8:1::12", "2001:db8:2::13"];
const NAMES: [&str; 3] = ["b1", "b2", "b3"];

/// A harness topology of this test's own; torn down on drop.
fn topology() -> Topology {
    Topology::up(&Topology::unique_prefix("xl"), Path::new(XDP_PASS_OBJ)).expect("harness up")
}

/// The XDP program id attached to the LB's eth0, if any.
fn lb_program_id(topology: &Topology) -> Option<u64> {
    let out = Command::new("ip").args(["-n", &topology.ns("lb"), "-j", "link", "show", "eth0"]).output().unwrap();
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    links[0]["xdp"]["prog"]["id"].as_u64()
}

/// Runs `f` on a thread that has entered namespace `ns`. Sockets made there
/// stay in that namespace whatever thread uses them later.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    lb_testkit::run_in(ns, f).expect("entering the namespace")
}

fn config(weights: [u32; 3]) -> String {
    let mut text = String::from("[agent]\ninterface = \"eth0\"\n");
    for (name, vip, backends) in [("web", VIP4, BACKENDS4), ("web6", VIP6, BACKENDS6)] {
        text +=
            &format!("\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"tcp\"\nforwarding = \"dsr\"\n");
        for (address, weight) in backends.iter().zip(weights) {
            text += &format!("\n[[service.backend]]\naddress = \"{address}\"\nweight = {weight}\n");
        }
    }
    text
}

fn config_with(backends: &[(usize, u32)]) -> String {
    let mut text =
        format!("[agent]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"{VIP4}\"\nprotocol = \"tcp\"\n");
    for (i, weight) in backends {
        text += &format!("\n[[service.backend]]\naddress = \"{}\"\nweight = {weight}\n", BACKENDS4[*i]);
    }
    text
}

/// `n` GETs on new connections from the client; counts answers per backend.
/// The source ports are the topology's fixed sequence, so a run's flows
/// are the same every time and share checks do not fail by chance.
fn spread(topology: &Topology, vip: &str, n: usize) -> BTreeMap<String, usize> {
    let vip: SocketAddr = vip.parse().unwrap();
    let ports = topology.client_ports(n);
    in_netns(&topology.ns("client"), move || {
        let mut counts = BTreeMap::new();
        for (i, port) in ports.into_iter().enumerate() {
            let name = get_new_connection_from(vip, port)
                .unwrap_or_else(|e| panic!("request {i} to {vip} from port {port} failed: {e}"));
            *counts.entry(name).or_insert(0) += 1;
        }
        counts
    })
}

fn assert_shares(counts: &BTreeMap<String, usize>, weights: [u32; 3], what: &str) {
    assert_shares_of(counts, NAMES, weights, what);
}

fn assert_shares_of(counts: &BTreeMap<String, usize>, names: [&str; 3], weights: [u32; 3], what: &str) {
    if let Err(err) = shares_within(counts, names, weights) {
        panic!("{what}: {err}");
    }
}

/// Each backend's share within 25% of its weight's, and within five
/// standard deviations of a binomial draw of that many connections, which
/// ever is tighter: over 1,200 connections a 1:2:2 split fails a 1:2:3 check.
fn shares_within(counts: &BTreeMap<String, usize>, names: [&str; 3], weights: [u32; 3]) -> Result<(), String> {
    let total: usize = counts.values().sum();
    let weight_sum: u32 = weights.iter().sum();
    for (name, weight) in names.iter().zip(weights) {
        let p = weight as f64 / weight_sum as f64;
        let expected = total as f64 * p;
        let bound = (0.25 * expected).min(5.0 * (total as f64 * p * (1.0 - p)).sqrt());
        let got = *counts.get(*name).unwrap_or(&0) as f64;
        if (got - expected).abs() > bound {
            return Err(format!("{name} got {got} of {total}, expected {expected:.0} ± {bound:.0}; all: {counts:?}"));
        }
    }
    Ok(())
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
    let line =
        summary.lines().find(|l| l.contains(line_marker)).unwrap_or_else(|| panic!("no {line_marker:?} in\n{summary}"));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap()
}

#[test]
fn new_connections_follow_equal_then_weighted_shares_and_replies_bypass_the_lb() {
    let topology = topology();
    let agent = Agent::start(&topology, &config([1, 1, 1]));
    let sent_before = tcp_segments_sent(&topology);

    assert_shares(&spread(&topology, VIP4, 1200), [1, 1, 1], "IPv4 equal");
    assert_shares(&spread(&topology, VIP6, 1200), [1, 1, 1], "IPv6 equal");

    agent.reload(&config([1, 2, 3]));
    let counts = spread(&topology, VIP4, 1200);
    assert_shares(&counts, [1, 2, 3], "IPv4 1:2:3");
    assert_shares(&spread(&topology, VIP6, 1200), [1, 2, 3], "IPv6 1:2:3");
    // The check can fail: the same counts do not pass for a 1:2:2 weighting.
    assert!(shares_within(&counts, NAMES, [1, 2, 2]).is_err(), "1:2:3 counts {counts:?} pass as 1:2:2");

    let sent = tcp_segments_sent(&topology) - sent_before;
    let summary = agent.stop();
    // Direct server return: the XDP program saw exactly the client's
    // segments to the VIPs, and none of the backends' replies.
    let vip_packets =
        summary_value(&summary, "service web tcp", "packets") + summary_value(&summary, "service web6 tcp", "packets");
    assert_eq!(vip_packets, sent, "VIP packets seen by the LB vs TCP segments the client sent\n{summary}");
    let other =
        summary_value(&summary, "global:", "pass_non_vip") + summary_value(&summary, "global:", "pass_unparsed");
    assert!(other < 50, "the LB saw {other} non-VIP packets: replies are flowing through it?\n{summary}");
    assert!(summary_value(&summary, "global:", "action_tx") > 0, "no XDP_TX to b3\n{summary}");
    assert!(summary_value(&summary, "global:", "action_redirect") > 0, "no XDP_REDIRECT to b1/b2\n{summary}");
}

#[test]
fn syns_skip_the_connection_table_while_every_flow_follows_the_ring() {
    let topology = topology();
    let agent = Agent::start(&topology, &config_with_metrics(&config([1, 1, 1]), "127.0.0.1:9593"));
    let follows = || agent.status().services.iter().find(|s| s.name == "web").unwrap().pins_follow_ring;
    let until_follows = |what: &str| {
        wait_until(Duration::from_secs(30), Duration::from_millis(200), follows, || {
            format!("{what}: no table scan found web's flows on its ring")
        });
    };
    // Every connection went where the ring said: a table scan (every 5 s)
    // finds so, and the service's SYNs skip the connection table.
    spread(&topology, VIP4, 300);
    until_follows("after the first connections");
    let gauge = |text: &str| metric(text, "xdplb_service_pins_follow_ring", "service=\"web\"");
    assert_eq!(gauge(&scrape(&topology, "127.0.0.1:9593")), 1.0);

    // The ring changes: until the old ring's flows are gone (finished ones
    // after their linger, 10 s), SYNs look at the table again.
    agent.reload(&config_with_metrics(&config([1, 2, 3]), "127.0.0.1:9593"));
    assert!(!follows(), "the ring changed and web's SYNs still skip the connection table");
    assert_eq!(gauge(&scrape(&topology, "127.0.0.1:9593")), 0.0);
    let counts = spread(&topology, VIP4, 300);
    assert_shares(&counts, [1, 2, 3], "1:2:3 after the change");
    until_follows("after the reweighting");
    agent.stop();
}

fn config_with_metrics(config: &str, listen: &str) -> String {
    config.replacen("[agent]\n", &format!("[agent]\nmetrics_listen = \"{listen}\"\n"), 1)
}

/// A keep-alive HTTP connection that must keep answering from one backend.
#[test]
fn long_lived_connection_survives_backends_added_removed_and_reweighted() {
    let topology = topology();
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
        ("remove the connection's own backend", vec![(2, 1), (other, 1)]),
        ("add everything back", vec![(0, 2), (1, 2), (2, 2)]),
    ];
    for (step, backends) in steps {
        if step == "remove the other backend" {
            // A broken file on reload is rejected and changes nothing.
            agent.reload_rejected("[agent]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"198.18.0.100:80\"\nprotocol = \"tcp\"\n\n[[service.backend]]\naddress = \"198.18.1.300\"\n");
            assert_eq!(conn.get(), home, "after a rejected reload");
            assert!(
                agent.log_text().contains("xdplb.toml:12:11: \"198.18.1.300\" is not a backend address"),
                "{}",
                agent.log_text()
            );
            let counts = spread(&topology, VIP4, 30);
            assert!(counts.len() >= 2, "a rejected reload changed the backends: {counts:?}");
        }
        agent.reload(&config_with(&backends));
        for _ in 0..5 {
            assert_eq!(conn.get(), home, "after {step:?} the long-lived connection moved or broke");
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
    let topology = topology();
    let dir = std::env::temp_dir().join(format!("xdplb-test-{}-bad", topology.prefix));
    std::fs::create_dir_all(&dir).unwrap();
    let _cleanup = TempDir(dir.clone());
    let path = dir.join("bad.toml");
    std::fs::write(&path, config([1, 1, 1]).replace("weight = 1\n", "weight = 5000\n")).unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", topology.ns("lb")))
        .args([XDPLB, "run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "xdplb accepted a bad config");
    assert!(stderr.contains(&format!("{}:12:10: weight 5000 is out of range 0..=1000", path.display())), "{stderr}");
    let link =
        Command::new("ip").args(["netns", "exec", &topology.ns("lb"), "ip", "link", "show", "eth0"]).output().unwrap();
    assert!(
        !String::from_utf8_lossy(&link.stdout).contains("xdp"),
        "an XDP program is attached after a refused config"
    );
}

// ---- agent: health, drain, CLI, reload, permissions -----------------------

/// Kills the HTTP server of backend `name` (the only process in its namespace).
fn kill_backend_server(topology: &Topology, name: &str) {
    let status =
        Command::new("sh").arg("-c").arg(format!("kill $(ip netns pids {}) ", topology.ns(name))).status().unwrap();
    assert!(status.success());
}

fn start_backend_server(topology: &Topology, name: &str) {
    let server = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/backend_server.py");
    // setsid --fork: the server outlives the launcher, which returns at once.
    let status = Command::new("ip")
        .args(["netns", "exec", &topology.ns(name), "setsid", "--fork", "python3"])
        .arg(server)
        .args(["--name", name, "--port", "80"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
}

/// Polls the agent until `check` holds for the backend; returns when it did.
fn wait_for_backend(agent: &Agent, address: &str, what: &str, check: impl Fn(&BackendStatus) -> bool) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let backend = agent.backend("web", address);
        if check(&backend) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "backend {address} never became {what}: {backend:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// New connections, one after another, until stopped (or 60 s / 100k requests);
/// returns (start time, outcome) of each.
fn steady_stream(
    topology: &Topology,
    vip: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> thread::JoinHandle<Vec<(Instant, Result<String, String>)>> {
    steady_stream_for(topology, vip, stop, Duration::from_secs(60))
}

/// `steady_stream`, bounded by `longest` instead of a minute.
fn steady_stream_for(
    topology: &Topology,
    vip: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    longest: Duration,
) -> thread::JoinHandle<Vec<(Instant, Result<String, String>)>> {
    http::steady_stream_from(&topology.ns("client"), vip, stop, longest)
}

const FAST_HTTP_HEALTH: &str = "\n[service.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval_ms = 300\ntimeout_ms = 200\nrise = 2\nfall = 3\n";

fn config_with_health(health: &str, backends: &[(usize, u32)], extra_backend_tables: &str) -> String {
    let mut text = format!(
        "[agent]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"{VIP4}\"\nprotocol = \"tcp\"\n{health}"
    );
    for (i, weight) in backends {
        text += &format!("\n[[service.backend]]\naddress = \"{}\"\nweight = {weight}\n", BACKENDS4[*i]);
        if *i == 2 {
            text += extra_backend_tables;
        }
    }
    text
}

#[test]
fn a_killed_backend_leaves_the_ring_in_time_and_returns_after_rise_probes() {
    let topology = topology();
    let agent = Agent::start(&topology, &config_with_health(FAST_HTTP_HEALTH, &[(0, 1), (1, 1), (2, 1)], ""));
    let (interval, timeout, rise, fall) = (Duration::from_millis(300), Duration::from_millis(200), 2u32, 3u32);
    wait_for_backend(&agent, BACKENDS4[0], "probed", |b| b.last_probe.as_ref().is_some_and(|p| p.ok));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = steady_stream(&topology, VIP4, stop.clone());
    thread::sleep(Duration::from_millis(700));
    let killed = Instant::now();
    kill_backend_server(&topology, "b1");
    let down =
        wait_for_backend(&agent, BACKENDS4[0], "down and out of the ring", |b| b.health == Health::Down && !b.in_ring);
    let bound = interval * fall + timeout + Duration::from_millis(200);
    assert!(down - killed <= bound, "left the ring {:?} after the kill, bound {bound:?}", down - killed);
    thread::sleep(Duration::from_millis(1500));

    let restarted = Instant::now();
    start_backend_server(&topology, "b1");
    let up = wait_for_backend(&agent, BACKENDS4[0], "up and in the ring", |b| b.health == Health::Up && b.in_ring);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();

    let back = up - restarted;
    eprintln!(
        "measured: out of the ring {:?} after the kill (bound {bound:?}); back {back:?} after the restart",
        down - killed
    );
    assert!(back >= interval * (rise - 1), "back after {back:?}: faster than {rise} probes allow");
    // The first probe after the restart may come up to one interval later,
    // and the server needs a moment to start.
    assert!(back <= interval * (rise + 1) + Duration::from_millis(500), "back only after {back:?}");

    let after_removal: Vec<_> = results.iter().filter(|(t, _)| *t > down).collect();
    let failures: Vec<_> = after_removal.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(after_removal.len() > 50, "only {} requests after the removal", after_removal.len());
    assert!(
        failures.is_empty(),
        "{} of {} new connections failed after the backend left the ring: {:?}",
        failures.len(),
        after_removal.len(),
        failures.first()
    );
    // While it was down, nothing reached it.
    let while_down = results.iter().filter(|(t, r)| *t > down && *t < restarted && r.as_deref() == Ok("b1")).count();
    assert_eq!(while_down, 0);
    assert!(spread(&topology, VIP4, 60).contains_key("b1"), "b1 gets no new connections after coming back");
    agent.stop();
}

#[test]
fn a_backend_that_never_answers_arp_delays_nothing_but_itself() {
    let topology = topology();
    // 198.18.1.99 is on b1/b2's segment, where no host has it.
    let dead = "\n[[service.backend]]\naddress = \"198.18.1.99\"\n";
    let config = config_with_health(FAST_HTTP_HEALTH, &[(0, 1), (1, 1), (2, 1)], "") + dead;
    let agent = Agent::spawn(&topology, &config);
    agent.wait_for_log("attached to", 1);
    agent.wait_for_log("backend 198.18.1.99 unreachable", 1);
    wait_for_backend(&agent, BACKENDS4[0], "probed", |b| b.last_probe.as_ref().is_some_and(|p| p.ok));
    assert!(!agent.backend("web", "198.18.1.99").resolved);

    // status and reload answer as fast as without it, pass after pass.
    let call = |request: xdplb::control::Request| {
        let start = Instant::now();
        let answer = xdplb::control::call(&agent.socket, &request).unwrap();
        (start.elapsed(), answer)
    };
    let mut slowest_status = Duration::ZERO;
    for _ in 0..15 {
        slowest_status = slowest_status.max(call(xdplb::control::Request::Status {}).0);
        thread::sleep(Duration::from_millis(200));
    }
    let (reload, answer) = call(xdplb::control::Request::Reload {});
    assert!(matches!(answer, xdplb::control::Response::Done { .. }), "{answer:?}");
    eprintln!("measured: with an unresolvable backend: status at most {slowest_status:?}, reload {reload:?}");
    assert!(slowest_status < Duration::from_millis(100), "status took {slowest_status:?}");
    assert!(reload < Duration::from_millis(500), "reload took {reload:?}");

    // A killed backend is detected in the usual time; nothing fails after.
    let (interval, timeout, fall) = (Duration::from_millis(300), Duration::from_millis(200), 3u32);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = steady_stream(&topology, VIP4, stop.clone());
    thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    kill_backend_server(&topology, "b1");
    let down = wait_for_backend(&agent, BACKENDS4[0], "down", |b| b.health == Health::Down && !b.in_ring);
    let bound = interval * fall + timeout + Duration::from_millis(200);
    eprintln!("measured: with an unresolvable backend, a killed one left the ring {:?} after the kill", down - killed);
    assert!(down - killed <= bound, "left the ring {:?} after the kill, bound {bound:?}", down - killed);
    thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();
    let failed_after = results.iter().filter(|(t, r)| *t > down && r.is_err()).count();
    assert_eq!(failed_after, 0, "new connections failed after the detection");

    let stopping = Instant::now();
    agent.stop();
    eprintln!("measured: SIGINT to exit {:?}", stopping.elapsed());
    assert!(stopping.elapsed() < Duration::from_secs(2), "stopping took {:?}", stopping.elapsed());
}

#[test]
fn wrong_http_status_and_closed_tcp_port_mark_backends_down() {
    let topology = topology();
    let closed_port = "\n[service.backend.health]\nkind = \"tcp\"\nport = 8081\n";
    let health = "\n[service.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n";
    let agent = Agent::start(&topology, &config_with_health(health, &[(0, 1), (1, 1), (2, 1)], closed_port));
    wait_for_backend(&agent, BACKENDS4[2], "down (closed TCP port)", |b| {
        b.health == Health::Down && b.last_probe.as_ref().is_some_and(|p| p.detail.contains("refused"))
    });
    let set = |code: u16| set_healthz(&topology, BACKENDS4[1], code);
    set(503);
    wait_for_backend(&agent, BACKENDS4[1], "down (HTTP 503)", |b| {
        b.health == Health::Down && b.last_probe.as_ref().is_some_and(|p| p.detail.contains("HTTP 503"))
    });
    assert_eq!(agent.backend("web", BACKENDS4[0]).health, Health::Up);
    let counts = spread(&topology, VIP4, 60);
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["b1"], "{counts:?}");
    set(200);
    wait_for_backend(&agent, BACKENDS4[1], "up again", |b| b.health == Health::Up && b.in_ring);
    let (ok, table, _) = agent.cli(&["status"]);
    assert!(ok, "{table}");
    let b2 = status_row(&table, BACKENDS4[1]);
    assert!(b2.contains(" up ") && b2.contains("HTTP 200") && b2.contains(" yes "), "{b2}");
    let b3 = status_row(&table, BACKENDS4[2]);
    assert!(b3.contains(" down ") && b3.contains(" no "), "{b3}");
    agent.stop();
}

/// Makes the backend server at `address` answer /healthz with `code`.
fn set_healthz(topology: &Topology, address: &str, code: u16) {
    let url: SocketAddr = format!("{address}:80").parse().unwrap();
    in_netns(&topology.ns("client"), move || {
        let mut s = TcpStream::connect_timeout(&url, Duration::from_secs(2)).unwrap();
        write!(s, "GET /admin/healthz/{code} HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.contains(&format!("healthz {code}")), "{r}");
    })
}

const HTTP_HEALTH_200MS: &str = "\n[service.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 2\n";

#[test]
fn every_backend_failing_its_checks_fails_open_and_keeps_forwarding() {
    let topology = topology();
    let agent = Agent::start(&topology, &config_with_health(HTTP_HEALTH_200MS, &[(0, 1), (1, 1), (2, 1)], ""));
    // The servers keep serving; only their health checks fail.
    for address in BACKENDS4 {
        set_healthz(&topology, address, 503);
    }
    for address in BACKENDS4 {
        wait_for_backend(&agent, address, "down", |b| b.health == Health::Down);
    }
    let status = agent.status();
    assert!(status.services[0].fail_open, "{status:?}");
    assert!(status.services[0].backends.iter().all(|b| b.in_ring), "{status:?}");
    agent.wait_for_log("EVERY backend is down; failing open", 1);
    let counts = spread(&topology, VIP4, 60);
    assert_eq!(counts.len(), 3, "failing open, every backend takes new connections: {counts:?}");
    // One comes back: it alone takes new connections.
    set_healthz(&topology, BACKENDS4[0], 200);
    wait_for_backend(&agent, BACKENDS4[0], "up", |b| b.health == Health::Up);
    assert!(!agent.status().services[0].fail_open);
    assert_eq!(spread(&topology, VIP4, 30), BTreeMap::from([("b1".to_string(), 30)]));
    agent.wait_for_log("no longer failing open", 1);
    agent.stop();
}

#[test]
fn on_failure_keep_leaves_established_flows_on_a_failed_backend() {
    let topology = topology();
    let health = format!("on_failure = \"keep\"\n{HTTP_HEALTH_200MS}");
    let agent = Agent::start(&topology, &config_with_health(&health, &[(0, 1), (1, 1), (2, 1)], ""));
    let mut conn = LongLived::open(&topology, VIP4);
    let home = conn.get();
    let address = BACKENDS4[NAMES.iter().position(|n| *n == home).unwrap()];
    set_healthz(&topology, address, 503);
    wait_for_backend(&agent, address, "down and out of the ring", |b| b.health == Health::Down && !b.in_ring);
    for _ in 0..5 {
        assert_eq!(conn.get(), home, "the established connection left its failed backend");
        thread::sleep(Duration::from_millis(200));
    }
    let counts = spread(&topology, VIP4, 30);
    assert!(!counts.contains_key(&home), "new connections reached the failed backend: {counts:?}");
    set_healthz(&topology, address, 200);
    agent.stop();
}

#[test]
fn a_drain_ends_at_drain_timeout_s_while_connections_remain() {
    let topology = topology();
    let agent = Agent::start(&topology, &config_with_health("drain_timeout_s = 2\n", &[(0, 1), (1, 1), (2, 1)], ""));
    let mut conn = LongLived::open(&topology, VIP4);
    let home = conn.get();
    let address = BACKENDS4[NAMES.iter().position(|n| *n == home).unwrap()];
    let (ok, _, err) = agent.cli(&["backend", "drain", "web", address]);
    assert!(ok, "{err}");
    let started = Instant::now();
    let drained = wait_for_backend(&agent, address, "drained", |b| b.admin == Admin::Drained);
    let took = drained - started;
    eprintln!("measured: drained by its 2 s timeout after {took:?}, one connection still open");
    // The timeout, then at most one busy maintenance pass (1 s) and the poll.
    assert!(took >= Duration::from_secs(2) && took <= Duration::from_millis(3500), "{took:?}");
    agent.wait_for_log("drained (drain timeout passed)", 1);
    assert_eq!(conn.get(), home, "drained means no new flows, not a cut connection");
    agent.stop();
}

/// One UDP exchange from the client's `source_port`; the answering backend's name.
fn udp_ask_from(vip: SocketAddr, source_port: u16) -> String {
    let any = if vip.is_ipv4() { "0.0.0.0" } else { "[::]" };
    let socket = std::net::UdpSocket::bind(format!("{any}:{source_port}")).unwrap();
    socket.set_read_timeout(Some(Duration::from_millis(500))).unwrap();
    socket.connect(vip).unwrap();
    for _ in 0..5 {
        socket.send(b"who").unwrap();
        let mut buf = [0u8; 64];
        if let Ok(n) = socket.recv(&mut buf) {
            return String::from_utf8_lossy(&buf[..n]).into_owned();
        }
    }
    panic!("no UDP answer from {vip} to port {source_port}");
}

#[test]
fn a_udp_service_spreads_datagram_flows_and_keeps_each_on_its_backend() {
    let topology = topology();
    let mut config = String::from("[agent]\ninterface = \"eth0\"\n");
    for (name, vip, backends) in [("dns", "198.18.0.100:53", BACKENDS4), ("dns6", "[2001:db8::100]:53", BACKENDS6)] {
        config += &format!("\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"udp\"\n");
        for address in backends {
            config += &format!("\n[[service.backend]]\naddress = \"{address}\"\n");
        }
    }
    let agent = Agent::start(&topology, &config);
    for vip in ["198.18.0.100:53", "[2001:db8::100]:53"] {
        let vip: SocketAddr = vip.parse().unwrap();
        let ports = topology.client_ports(300);
        let counts = in_netns(&topology.ns("client"), move || {
            let mut counts = BTreeMap::new();
            for port in ports {
                *counts.entry(udp_ask_from(vip, port)).or_insert(0) += 1;
            }
            counts
        });
        assert_shares(&counts, [1, 1, 1], &format!("UDP flows to {vip}"));
        // One flow (the same source port) stays on one backend.
        let port = topology.client_ports(1)[0];
        let answers: BTreeSet<String> =
            in_netns(&topology.ns("client"), move || (0..20).map(|_| udp_ask_from(vip, port)).collect());
        assert_eq!(answers.len(), 1, "one UDP flow reached several backends: {answers:?}");
    }
    let status = agent.status();
    assert!(status.services.iter().all(|s| s.new_flows >= 301), "{status:?}");
    agent.stop();
}

/// The `status` table's row of backend `address`.
fn status_row<'a>(table: &'a str, address: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.trim_start().starts_with(&format!("{address} ")))
        .unwrap_or_else(|| panic!("no row for {address} in\n{table}"))
}

#[test]
fn drain_keeps_the_established_connection_and_reports_drained_when_it_closes() {
    let topology = topology();
    let agent = Agent::start(&topology, &config_with(&[(0, 1), (1, 1), (2, 1)]));
    let mut conn = LongLived::open(&topology, VIP4);
    let home = conn.get();
    let address = BACKENDS4[NAMES.iter().position(|n| *n == home).unwrap()];
    let (ok, out, err) = agent.cli(&["backend", "drain", "web", address]);
    assert!(ok, "{err}");
    assert!(out.contains("draining"), "{out}");
    let drained_at = Instant::now();
    while drained_at.elapsed() < Duration::from_millis(5500) {
        assert_eq!(conn.get(), home, "the drained backend's connection moved or broke");
        let counts = spread(&topology, VIP4, 15);
        assert!(!counts.contains_key(&home), "a new connection reached the draining backend: {counts:?}");
        thread::sleep(Duration::from_millis(300));
    }
    let b = agent.backend("web", address);
    assert_eq!((b.admin, b.in_ring), (Admin::Draining, false), "{b:?}");
    assert!(b.active_flows >= 1, "{b:?}");
    drop(conn); // the client closes: FIN
    let closed = Instant::now();
    wait_for_backend(&agent, address, "drained", |b| b.admin == Admin::Drained && b.active_flows == 0);
    assert!(closed.elapsed() < Duration::from_secs(5), "drained only after {:?}", closed.elapsed());
    eprintln!("measured: drained {:?} after the last connection closed", closed.elapsed());
    let (ok, _, err) = agent.cli(&["backend", "enable", "web", address]);
    assert!(ok, "{err}");
    assert!(spread(&topology, VIP4, 60).contains_key(&home));
    agent.stop();
}

#[test]
fn the_cli_manages_backends_and_services_of_a_running_agent() {
    let topology = topology();
    let agent = Agent::start(&topology, &config_with(&[(0, 1), (1, 1)]));
    let cli_ok = |args: &[&str]| {
        let (ok, out, err) = agent.cli(args);
        assert!(ok, "xdplb {args:?} failed: {err}");
        out
    };
    let cli_err = |args: &[&str], expected: &str| {
        let (ok, _, err) = agent.cli(args);
        assert!(!ok, "xdplb {args:?} succeeded");
        assert!(err.contains(expected), "xdplb {args:?}: {err:?} lacks {expected:?}");
    };
    let b3 = BACKENDS4[2];

    cli_ok(&["backend", "add", "web", b3]);
    wait_for_backend(&agent, b3, "in the ring", |b| b.in_ring);
    assert!(spread(&topology, VIP4, 90).contains_key("b3"));

    cli_ok(&["backend", "weight", "web", b3, "--weight", "0"]);
    assert_eq!(agent.backend("web", b3).weight, 0);
    assert!(!spread(&topology, VIP4, 60).contains_key("b3"));
    cli_ok(&["backend", "weight", "web", b3, "--weight", "2"]);
    assert!(spread(&topology, VIP4, 60).contains_key("b3"));

    cli_ok(&["backend", "remove", "web", b3]);
    let counts = spread(&topology, VIP4, 60);
    assert!(!counts.contains_key("b3") && counts.len() == 2, "{counts:?}");

    // Bad input is refused, names the problem, and changes nothing.
    let before = agent.status();
    cli_err(&["backend", "add", "nosuch", b3], "no service named \"nosuch\"");
    cli_err(&["backend", "add", "web", "198.18.1.999"], "is not a backend address");
    cli_err(&["backend", "add", "web", BACKENDS4[0]], "duplicate backend 198.18.1.11");
    cli_err(&["backend", "add", "web", "2001:db8:1::11"], "not of the same IP family");
    cli_err(&["backend", "weight", "web", BACKENDS4[0], "--weight", "5000"], "out of range");
    cli_err(&["backend", "drain", "web", b3], "has no backend 198.18.2.13");
    cli_err(&["service", "remove", "nosuch"], "no service named");
    cli_err(&["service", "add", "dup", "--vip", VIP4, "--protocol", "tcp"], "duplicate VIP 198.18.0.100:80/tcp");
    let socket = agent.socket.clone();
    let garbage = std::thread::spawn(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        s.write_all(b"{\"cmd\": \"backend_add\", \"service\": 7}\n").unwrap();
        let mut answer = String::new();
        BufReader::new(s).read_line(&mut answer).unwrap();
        answer
    })
    .join()
    .unwrap();
    assert!(garbage.contains("\"ok\":false") && garbage.contains("malformed request"), "{garbage}");
    let after = agent.status();
    let strip = |mut s: Status| {
        for svc in &mut s.services {
            (svc.packets, svc.bytes, svc.new_flows) = (0, 0, 0);
            for b in &mut svc.backends {
                (b.packets, b.bytes, b.new_flows, b.active_flows, b.last_probe) = (0, 0, 0, 0, None);
            }
        }
        s
    };
    assert_eq!(strip(before), strip(after), "refused commands changed the state");
    assert_eq!(spread(&topology, VIP4, 30).values().sum::<usize>(), 30);

    // A whole service, IPv6, through the CLI.
    cli_ok(&[
        "service",
        "add",
        "web6",
        "--vip",
        VIP6,
        "--protocol",
        "tcp",
        "--backend",
        BACKENDS6[0],
        "--backend",
        &format!("{}=2", BACKENDS6[2]),
    ]);
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || agent.status().services[1].backends.iter().all(|b| b.in_ring),
        || "web6 backends never entered the ring".into(),
    );
    let counts = spread(&topology, VIP6, 60);
    assert!(counts.keys().all(|k| k == "b1" || k == "b3") && counts.len() == 2, "{counts:?}");
    cli_ok(&["service", "remove", "web6"]);
    let vip6: SocketAddr = VIP6.parse().unwrap();
    let refused = in_netns(&topology.ns("client"), move || get_new_connection_within(vip6, Duration::from_millis(500)));
    assert!(refused.is_err(), "the removed service still answers: {refused:?}");
    agent.stop();
}

#[test]
fn reload_through_the_cli_applies_changes_and_refuses_a_broken_file() {
    let topology = topology();
    let agent = Agent::start(&topology, &config_with(&[(0, 1), (1, 1)]));
    agent.write_config(&config_with(&[(1, 1), (2, 1)]));
    let (ok, out, err) = agent.cli(&["reload"]);
    assert!(ok && out.contains("reloaded"), "{out}{err}");
    let counts = spread(&topology, VIP4, 60);
    assert!(!counts.contains_key("b1") && counts.contains_key("b3"), "{counts:?}");

    agent.write_config(&config_with(&[(1, 1), (2, 1)]).replace("protocol = \"tcp\"", "protocol = \"tcpx\""));
    let (ok, _, err) = agent.cli(&["reload"]);
    assert!(!ok, "a broken config was accepted");
    assert!(err.contains("xdplb.toml:9:12: unknown variant `tcpx`"), "{err}");
    let counts = spread(&topology, VIP4, 60);
    assert!(!counts.contains_key("b1") && counts.contains_key("b3") && counts.contains_key("b2"), "{counts:?}");
    agent.stop();
}

#[test]
fn only_root_may_use_the_control_socket() {
    let topology = topology();
    let agent = Agent::start(&topology, &config_with(&[(0, 1)]));
    let mode = std::fs::metadata(&agent.socket)
        .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777)
        .unwrap();
    assert_eq!(mode, 0o600);
    // Let nobody reach the socket file itself: the mode alone must stop it.
    let dir = agent.socket.parent().unwrap();
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // A copy nobody can run (the build tree may not be), proven to run.
    let copy = TempDir(std::env::temp_dir().join(format!("xdplb-nobody-{}", topology.prefix)));
    std::fs::create_dir_all(&copy.0).unwrap();
    let binary = copy.0.join("xdplb");
    std::fs::copy(XDPLB, &binary).unwrap();
    for path in [&copy.0, &binary] {
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let as_nobody = || {
        let mut command = Command::new("setpriv");
        command.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups"]).arg(&binary);
        command
    };
    let version = as_nobody().arg("--version").output().unwrap();
    assert!(
        version.status.success() && String::from_utf8_lossy(&version.stdout).starts_with("xdplb "),
        "the binary does not run as nobody: {}",
        String::from_utf8_lossy(&version.stderr)
    );
    let out = as_nobody().arg("--socket").arg(&agent.socket).arg("status").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody got an answer: {}", String::from_utf8_lossy(&out.stdout));
    // The refusal is the socket's, not the binary failing to run as nobody.
    assert!(err.contains("connecting to the agent at") && err.contains("Permission denied"), "{err}");
    // A socket someone made world-writable: the agent's own credential
    // check refuses, and the CLI prints that refusal (not "Broken pipe").
    std::fs::set_permissions(&agent.socket, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let out = as_nobody().arg("--socket").arg(&agent.socket).arg("status").output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("permission denied: only root may control xdplb"), "{err}");
    agent.wait_for_log("control socket: refused a connection from uid", 1);
    let (ok, _, _) = agent.cli(&["status"]);
    assert!(ok, "root lost access");
    agent.stop();
}

// ---- operations: pinned state, restart, upgrade, metrics, top ------------

/// Sum of a metric over the label sets whose text contains `labels`.
/// The sum of the series of `name` whose labels contain `labels`; a series
/// that is absent fails the test (it must never read as 0).
fn metric(text: &str, name: &str, labels: &str) -> f64 {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| l.contains(labels))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .collect();
    assert!(!values.is_empty(), "no series {name} with {labels:?} in the scrape:\n{text}");
    values.iter().sum()
}

fn scrape(topology: &Topology, address: &str) -> String {
    let address: SocketAddr = address.parse().unwrap();
    in_netns(&topology.ns("lb"), move || {
        let mut s = TcpStream::connect_timeout(&address, Duration::from_secs(2)).expect("metrics endpoint");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        r.split_once("\r\n\r\n").unwrap().1.to_string()
    })
}

/// Packets the upgrade-test variant of the program has counted (its own
/// slot of the pinned global counters; 0 while the usual program runs).
fn variant_packets(topology: &Topology) -> u64 {
    let path = topology.pin_root().join(format!("layout-{}/GLOBAL_COUNTERS", lb_common::LAYOUT_VERSION));
    let map = aya::maps::Map::PerCpuArray(aya::maps::MapData::from_pin(&path).unwrap());
    let counters: aya::maps::PerCpuArray<_, u64> = aya::maps::PerCpuArray::try_from(map).unwrap();
    counters.get(&lb_common::UPGRADE_VARIANT_COUNTER_SLOT, 0).unwrap().iter().sum()
}

/// An upgrade from an older release: `XDPLB_UPGRADE_FROM` names its
/// binary. Ignored by plain `cargo test`, which has no older binary;
/// `cargo xtask test` builds one from git history (xtask/src/older_release.rs)
/// and then runs this test on its own. By hand:
/// `XDPLB_UPGRADE_FROM=/path/to/old/xdplb cargo test ... -- --ignored upgrade_from`.
#[test]
#[ignore = "needs an older xdplb binary in XDPLB_UPGRADE_FROM"]
fn upgrade_from_an_older_release_keeps_flows_and_moves_the_state_it_reshaped() {
    let old = std::env::var("XDPLB_UPGRADE_FROM").expect("XDPLB_UPGRADE_FROM: an older xdplb binary");
    let topology = topology();
    let config = config([1, 1, 1]);
    // The wrapper replaces the binary the harness runs with the old one.
    let wrapper = ["sh", "-c", "shift; exec \"$XDPLB_OLD\" \"$@\"", "sh"];
    let old_agent = Agent::spawn_wrapped(&topology, &config, &[("XDPLB_OLD", Path::new(&old))], &wrapper);
    old_agent.wait_for_log("attached to", 1);
    old_agent.wait_for_log("all backends resolved", 1);
    let mut long_lived = LongLived::open_homed(&topology, VIP4, 6);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = steady_stream(&topology, VIP4, stop.clone());
    thread::sleep(Duration::from_millis(500));
    let before = old_agent.status().services[0].packets;
    old_agent.stop();

    let agent = Agent::start(&topology, &config);
    assert!(agent.log_text().contains("adopting the pinned state"), "{}", agent.log_text());
    for (c, home) in &mut long_lived {
        assert_eq!(c.get(), *home, "a long-lived connection moved in the upgrade");
    }
    let layout = topology.pin_root().join(format!("layout-{}", lb_common::LAYOUT_VERSION));
    assert!(!layout.join("RINGS").exists(), "the retired ring map is still pinned");
    assert_eq!(pinned_entries(&topology, "BACKENDS"), lb_common::MAX_BACKENDS);
    thread::sleep(Duration::from_millis(500));
    assert!(agent.status().services[0].packets > before, "the counters restarted");
    let counts = spread(&topology, VIP4, 60);
    assert_eq!(counts.len(), 3, "new connections after the upgrade: {counts:?}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();
    let failed = results.iter().filter(|(_, r)| r.is_err()).count();
    eprintln!("measured: upgrade from {old}: {} requests, {failed} failed; log:\n{}", results.len(), agent.log_text());
    assert_eq!(failed, 0, "requests failed across the upgrade");
    agent.stop();
}

#[test]
fn sigkill_restart_and_in_place_upgrade_lose_no_request_flow_or_counter() {
    let topology = topology();
    let config = config([1, 1, 1]);
    let agent = Agent::start(&topology, &config);
    let mut long_lived = LongLived::open_homed(&topology, VIP4, 3);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = steady_stream(&topology, VIP4, stop.clone());
    thread::sleep(Duration::from_millis(800));
    let before_kill = agent.status().services[0].packets;
    let sent_before_kill = tcp_segments_sent(&topology);
    let first_program = lb_program_id(&topology).expect("a program on eth0");

    // 1. SIGKILL: forwarding goes on without any agent.
    agent.kill();
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(lb_program_id(&topology), Some(first_program), "the program went away with the agent");
    for (c, home) in &mut long_lived {
        assert_eq!(c.get(), *home, "a long-lived connection broke while no agent ran");
    }
    // 2. A new agent adopts the pinned state.
    let agent = Agent::start(&topology, &config);
    assert!(agent.log_text().contains("adopting the pinned state"), "{}", agent.log_text());
    // Every segment the client sent meanwhile was counted: no counter
    // restarted (the client sends TCP to the VIP only).
    // Segments still in flight when the client counted them are counted by
    // the LB a moment later: settle before reading its counter.
    let sent_by_restart = tcp_segments_sent(&topology);
    thread::sleep(Duration::from_millis(200));
    let after_restart = agent.status().services[0].packets;
    let sent = sent_by_restart - sent_before_kill;
    let sent_after_restart = tcp_segments_sent(&topology);
    assert!(
        after_restart >= before_kill + sent,
        "counters lost packets: {before_kill} → {after_restart}, while the client sent {sent}"
    );
    for (c, home) in &mut long_lived {
        assert_eq!(c.get(), *home, "a long-lived connection moved after the restart");
    }

    // 3. In-place upgrade: the agent exits normally (the program stays) and
    // the next agent swaps another program onto the pinned link atomically:
    // the upgrade-test variant, other bytecode that also counts every packet
    // in a counter slot of its own.
    let running = lb_program_id(&topology);
    assert_ne!(running, Some(first_program), "adoption did not swap in the new agent's program");
    assert_eq!(variant_packets(&topology), 0, "the variant ran before the upgrade");
    agent.stop();
    assert_eq!(lb_program_id(&topology), running, "a normal exit detached the program");
    thread::sleep(Duration::from_millis(500));
    let agent = Agent::start_with_env(&topology, &config, &[("XDPLB_TEST_PROGRAM", Path::new("variant"))]);
    let upgraded = lb_program_id(&topology);
    assert_ne!(upgraded, running, "no new program was swapped in");
    assert!(agent.log_text().contains("swapped onto the pinned link"), "{}", agent.log_text());
    assert!(agent.log_text().contains("upgrade-test variant"), "{}", agent.log_text());
    thread::sleep(Duration::from_millis(800));
    let by_variant = variant_packets(&topology);
    assert!(by_variant > 100, "the variant forwarded only {by_variant} packets after the upgrade");
    for (c, home) in &mut long_lived {
        assert_eq!(c.get(), *home, "a long-lived connection moved after the upgrade");
    }
    let sent_by_upgrade = tcp_segments_sent(&topology);
    thread::sleep(Duration::from_millis(200));
    let after_upgrade = agent.status().services[0].packets;
    let sent = sent_by_upgrade - sent_after_restart;
    assert!(
        after_upgrade >= after_restart + sent,
        "counters lost packets: {after_restart} → {after_upgrade}, while the client sent {sent}"
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    eprintln!("measured: {} requests across SIGKILL, restart and upgrade, {} failed", results.len(), failed.len());
    assert!(results.len() > 300, "only {} requests", results.len());
    assert!(failed.is_empty(), "{} of {} requests failed: {:?}", failed.len(), results.len(), failed.first());

    // 4. `xdplb stop` is the explicit way out: program detached, pins gone.
    let (ok, out, err) = agent.cli(&["stop"]);
    assert!(ok, "{out}{err}");
    drop(agent);
    assert_eq!(lb_program_id(&topology), None, "xdplb stop left the program attached");
    assert!(!topology.pin_root().join(format!("layout-{}", lb_common::LAYOUT_VERSION)).exists(), "pins left behind");
}

#[test]
fn changed_map_sizes_or_another_layout_are_refused_with_a_clear_message() {
    let topology = topology();
    let agent = Agent::start(&topology, &config_with(&[(0, 1), (1, 1)]));
    agent.stop(); // the program and the pinned maps stay
    let refused = |config: &str, expected: &str| {
        let mut agent = Agent::spawn(&topology, config);
        wait_until(
            Duration::from_secs(15),
            Duration::from_millis(50),
            || agent.log_text().contains(expected),
            || format!("no {expected:?} in:\n{}", agent.log_text()),
        );
        let status = agent.child.take().unwrap().wait().unwrap();
        assert!(!status.success(), "the agent started anyway:\n{}", agent.log_text());
    };
    let bigger_ring = config_with(&[(0, 1), (1, 1)]).replace("[agent]\n", "[agent]\nring_size = 65521\n");
    refused(&bigger_ring, "ring_size × max_services changed");
    let layout = topology.pin_root().join("layout-999");
    std::fs::create_dir(&layout).unwrap();
    refused(&config_with(&[(0, 1)]), "holds pinned state of map layout 999");
    std::fs::remove_dir(&layout).unwrap();
    // The data plane kept forwarding through all of that.
    assert_eq!(spread(&topology, VIP4, 20).values().sum::<usize>(), 20);
    // Without an agent, stop removes what the last one left.
    let out = Command::new(XDPLB).args(["stop", "--pin-dir"]).arg(topology.pin_root()).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("the program is detached"));
    assert_eq!(lb_program_id(&topology), None);
}

#[test]
fn stop_acts_only_on_the_pin_directory_it_is_given() {
    let topology = topology();
    let mut agent = Agent::start(&topology, &config_with(&[(0, 1), (1, 1)]));
    let pins = topology.pin_root();
    let other = format!("/sys/fs/bpf/xdplb-test-{}-other", topology.prefix);
    let (ok, _, err) = agent.cli(&["stop", "--pin-dir", &other]);
    assert!(!ok, "stop --pin-dir of another directory stopped the agent");
    assert!(err.contains(&format!("owns {}, not {other}", pins.display())) && err.contains("nothing stopped"), "{err}");
    assert!(lb_program_id(&topology).is_some(), "the running agent's program was detached");
    assert!(pins.exists(), "the running agent's pins were removed");
    assert_eq!(agent.status().pin_dir.as_deref(), Some(pins.as_path()));
    assert_eq!(spread(&topology, VIP4, 10).values().sum::<usize>(), 10);

    let (ok, out, err) = agent.cli(&["stop", "--pin-dir", pins.to_str().unwrap()]);
    assert!(ok && out.contains("stopped the agent"), "{out}{err}");
    let status = agent.child.take().unwrap().wait().unwrap();
    assert!(status.success(), "{}", agent.log_text());
    assert_eq!(lb_program_id(&topology), None);
    let left = std::fs::read_dir(&pins).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "stop left pinned state in {}", pins.display());
}

/// (open file descriptors, resident set in KiB) of process `pid`.
fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
    (fds, rss.trim().trim_end_matches("kB").trim().parse().unwrap())
}

#[test]
fn idle_control_connections_cannot_starve_the_agent_or_fail_its_probes() {
    let topology = topology();
    let health = "\n[service.health]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2\n";
    let agent = Agent::start(&topology, &config_with_health(health, &[(0, 1), (1, 1), (2, 1)], ""));
    let pid = agent.child.as_ref().unwrap().id();
    let (fds_before, rss_before) = fds_and_rss(pid);
    // 20,400 connections held open, more than the agent's own descriptor
    // limit (20,000 here), by two processes (each within that limit too).
    let mut floods: Vec<KilledOnDrop> = (0..2)
        .map(|_| {
            let child = Command::new("python3")
                .arg("-c")
                .arg(
                    "import socket, sys, time\n\
                     held = []\n\
                     for _ in range(10200):\n\
                     \x20   s = socket.socket(socket.AF_UNIX)\n\
                     \x20   s.connect(sys.argv[1])\n\
                     \x20   held.append(s)\n\
                     print(len(held), flush=True)\n\
                     time.sleep(30)\n",
                )
                .arg(&agent.socket)
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            KilledOnDrop(child)
        })
        .collect();
    for flood in floods.iter_mut() {
        let mut opened = String::new();
        BufReader::new(flood.stdout.take().unwrap()).read_line(&mut opened).unwrap();
        assert_eq!(opened.trim(), "10200", "a flood did not open its connections");
    }
    // The agent answers status at once, holds a bounded number of
    // descriptors and memory, and its probes keep every backend up.
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let start = Instant::now();
        let answer = xdplb::control::call(&agent.socket, &xdplb::control::Request::Status {}).unwrap();
        slowest = slowest.max(start.elapsed());
        let xdplb::control::Response::Status { status, .. } = answer else { panic!("{answer:?}") };
        assert!(status.services[0].backends.iter().all(|b| b.health == Health::Up), "{status:?}");
        thread::sleep(Duration::from_millis(100));
    }
    let (ok, table, err) = agent.cli(&["status"]);
    assert!(ok, "{err}");
    for address in BACKENDS4 {
        let row = status_row(&table, address);
        assert!(row.contains(" up ") && row.contains(" yes "), "{row}");
    }
    let (fds, rss) = fds_and_rss(pid);
    eprintln!(
        "measured: under 20,400 idle control connections: status answered in at most {slowest:?}, \
         agent fds {fds_before} → {fds}, RSS {rss_before} → {rss} KiB"
    );
    assert!(slowest < Duration::from_millis(100), "status took {slowest:?}");
    assert!(fds < fds_before + lb_common::MAX_CONTROL_CONNECTIONS + 16, "agent fds {fds_before} → {fds}");
    assert!(rss < rss_before + 32 * 1024, "agent RSS {rss_before} → {rss} KiB");
    assert_eq!(spread(&topology, VIP4, 30).values().sum::<usize>(), 30);
    assert!(!agent.log_text().contains("DOWN"), "{}", agent.log_text());
    drop(floods);
    agent.stop();
}

struct KilledOnDrop(Child);

impl std::ops::Deref for KilledOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KilledOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn metrics_match_the_traffic_and_show_a_dead_backend() {
    let topology = topology();
    let health = "\n[service.health]\nkind = \"tcp\"\ninterval_ms = 200\ntimeout_ms = 100\nrise = 2\nfall = 2\n";
    let config = config_with_health(health, &[(0, 1), (1, 1), (2, 1)], "").replacen(
        "[agent]\n",
        "[agent]\nmetrics_listen = \"127.0.0.1:9591\"\n",
        1,
    );
    let agent = Agent::start(&topology, &config);
    let counts = spread(&topology, VIP4, 300);
    let text = scrape(&topology, "127.0.0.1:9591");
    for (name, address) in NAMES.iter().zip(BACKENDS4) {
        let labels = format!("backend=\"{address}\"");
        let flows = metric(&text, "xdplb_backend_new_flows_total", &labels);
        let packets = metric(&text, "xdplb_backend_packets_total", &labels);
        let requests = counts[*name] as f64;
        // Every request is one new connection; SYN retransmissions would add a few.
        assert!(
            flows >= requests && flows <= requests * 1.02 + 1.0,
            "{name}: {flows} new flows for {requests} requests"
        );
        // And a short HTTP exchange is 5 to 8 client→VIP packets.
        assert!(
            packets >= 5.0 * requests && packets <= 8.0 * requests,
            "{name}: {packets} packets for {requests} requests"
        );
    }
    assert_eq!(metric(&text, "xdplb_service_new_flows_total", "service=\"web\""), 300.0);
    // Probes run every 200 ms, apart from the traffic: the scrape may come
    // before b1's first one is timed, so wait for one (at most 5 s).
    let probed = |text: &str| {
        text.lines().any(|l| l.starts_with("xdplb_backend_probe_latency_seconds_count{") && l.contains("198.18.1.11"))
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut latest = text.clone();
    while !probed(&latest) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        latest = scrape(&topology, "127.0.0.1:9591");
    }
    assert!(metric(&latest, "xdplb_backend_probe_latency_seconds_count", "198.18.1.11") > 0.0);
    assert!(metric(&text, "xdplb_xdp_actions_total", "action=\"redirect\"") > 0.0);
    assert_eq!(metric(&text, "xdplb_backend_health", "198.18.1.11"), 1.0);
    assert_eq!(metric(&text, "xdplb_backend_in_ring", "198.18.1.11"), 1.0);

    kill_backend_server(&topology, "b1");
    wait_for_backend(&agent, BACKENDS4[0], "down", |b| b.health == Health::Down);
    let text = scrape(&topology, "127.0.0.1:9591");
    assert_eq!(metric(&text, "xdplb_backend_health", "198.18.1.11"), 0.0, "{text}");
    assert_eq!(metric(&text, "xdplb_backend_in_ring", "198.18.1.11"), 0.0);
    assert_eq!(metric(&text, "xdplb_backend_health_transitions_total", "198.18.1.11"), 1.0);
    assert!(metric(&text, "xdplb_ring_rebuilds_total", "") >= 2.0);
    agent.stop();
}

#[test]
fn a_refused_map_write_is_reported_counted_and_retried_while_the_data_plane_forwards() {
    let topology = topology();
    let config = config_with(&[(0, 1), (1, 1), (2, 1)]).replacen(
        "[agent]\n",
        "[agent]\nmetrics_listen = \"127.0.0.1:9592\"\n",
        1,
    );
    let agent = Agent::start(&topology, &config);
    assert_eq!(agent.status().outstanding_map_write, None);
    assert_eq!(metric(&scrape(&topology, "127.0.0.1:9592"), "xdplb_map_update_errors_total", ""), 0.0);

    // b3 should take no new flows, but the kernel refuses the writes.
    agent.refuse_map_writes(true);
    let (ok, out, err) = agent.cli(&["backend", "weight", "web", BACKENDS4[2], "--weight", "0"]);
    assert!(ok, "{err}");
    assert!(out.contains("not yet in the data plane, retrying"), "{out}");
    let refused = agent.status().outstanding_map_write.expect("status shows the refused write");
    assert!(refused.contains("BACKENDS set id") && refused.contains("refused by the test hook"), "{refused}");
    let (_, table, _) = agent.cli(&["status"]);
    assert!(table.contains("WARNING: a map write was refused"), "{table}");
    assert!(agent.log_text().contains("map write refused: BACKENDS set id"), "{}", agent.log_text());
    let first = metric(&scrape(&topology, "127.0.0.1:9592"), "xdplb_map_update_errors_total", "");
    assert!(first >= 1.0, "{first}");
    // Forwarding goes on with the state the kernel holds: b3 still takes new connections.
    let counts = spread(&topology, VIP4, 60);
    assert!(counts.get("b3").copied().unwrap_or(0) > 0, "{counts:?}");
    // Retried (and refused again) at least once a second.
    thread::sleep(Duration::from_millis(2500));
    let later = metric(&scrape(&topology, "127.0.0.1:9592"), "xdplb_map_update_errors_total", "");
    assert!(later >= first + 2.0, "{first} then {later}");

    // The kernel accepts writes again: the next retry converges.
    agent.refuse_map_writes(false);
    wait_until(
        Duration::from_secs(3),
        Duration::from_millis(50),
        || agent.status().outstanding_map_write.is_none(),
        || "the refused write was never applied".into(),
    );
    let counts = spread(&topology, VIP4, 60);
    assert_eq!(counts.get("b3"), None, "weight 0 is in the data plane now: {counts:?}");
    assert_eq!(counts.values().sum::<usize>(), 60);
    assert!(agent.log_text().contains("map writes applied after an earlier refusal"));
    agent.stop();
}

#[test]
fn top_once_shows_rates_under_traffic_and_debug_logging_switches_at_run_time() {
    let topology = topology();
    let agent = Agent::start(&topology, &config([1, 1, 1]));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = steady_stream(&topology, VIP4, stop.clone());
    thread::sleep(Duration::from_millis(300));
    let (ok, view, err) = agent.cli(&["top", "--once"]);
    assert!(ok, "{err}");
    for address in BACKENDS4 {
        let line = view.lines().find(|l| l.trim_start().starts_with(address)).unwrap_or_else(|| panic!("{view}"));
        let pps = line.split_whitespace().nth(1).unwrap();
        assert!(pps != "0", "no packet rate for {address}: {line}\n{view}");
    }

    let program = lb_program_id(&topology);
    let (ok, out, err) = agent.cli(&["debug", "on"]);
    assert!(ok && out.contains("swapped in"), "{out}{err}");
    assert_ne!(lb_program_id(&topology), program, "debug on did not swap the program");
    agent.wait_for_log("new flow from port", 3);
    let (ok, _, err) = agent.cli(&["debug", "off"]);
    assert!(ok, "{err}");
    thread::sleep(Duration::from_millis(300));
    let lines = agent.log_text().matches("new flow from port").count();
    thread::sleep(Duration::from_millis(700));
    assert_eq!(agent.log_text().matches("new flow from port").count(), lines, "logging went on after debug off");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();
    assert!(results.iter().all(|(_, r)| r.is_ok()), "requests failed across the program swaps");
    agent.stop();
}

// ---- schedulers -------------------------------------------------------------

/// A web service on the IPv4 VIP with `scheduler` and extra service keys.
fn scheduler_config(scheduler: &str, extra: &str, backends: &[(usize, u32)]) -> String {
    config_with_health(&format!("scheduler = \"{scheduler}\"\n{extra}"), backends, "")
}

/// Pins the calling thread to CPU 0: the LB's XDP program then runs there
/// too (veth delivers on the sender's CPU), so per-CPU cursors are one cursor.
fn pin_to_cpu0() {
    lb_testkit::pin_to_cpu(0).unwrap();
}

/// `n` sequential requests from the client, in order.
fn names_in_order(topology: &Topology, n: usize, pin: bool) -> Vec<String> {
    let vip: SocketAddr = VIP4.parse().unwrap();
    in_netns(&topology.ns("client"), move || {
        if pin {
            pin_to_cpu0();
        }
        (0..n).map(|i| get_new_connection(vip).unwrap_or_else(|e| panic!("request {i}: {e}"))).collect()
    })
}

fn counts_of(names: &[String]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for n in names {
        *counts.entry(n.clone()).or_insert(0) += 1;
    }
    counts
}

#[test]
fn scheduler_round_robin_cycles_through_backends() {
    let topology = topology();
    let agent = Agent::start(&topology, &scheduler_config("round_robin", "", &[(0, 1), (1, 3), (2, 1)]));
    let names = names_in_order(&topology, 30, true);
    assert_eq!(counts_of(&names[..3]).len(), 3, "{names:?}");
    for chunk in names.chunks(3) {
        assert_eq!(chunk, &names[..3], "not a cycle: {names:?}");
    }
    let (_, table, _) = agent.cli(&["status"]);
    assert!(table.contains("dsr/round_robin"), "{table}");
    agent.stop();
}

#[test]
fn scheduler_weighted_round_robin_follows_1_2_3_within_5_percent() {
    let topology = topology();
    let agent = Agent::start(&topology, &scheduler_config("weighted_round_robin", "", &[(0, 1), (1, 2), (2, 3)]));
    let counts = counts_of(&names_in_order(&topology, 600, false));
    for (name, expected) in [("b1", 100.0), ("b2", 200.0), ("b3", 300.0)] {
        let got = *counts.get(name).unwrap_or(&0) as f64;
        assert!((got - expected).abs() <= 0.05 * expected, "{name}: {got}, expected {expected} ± 5%: {counts:?}");
    }
    agent.stop();
}

#[test]
fn scheduler_random_follows_weights_within_10_percent() {
    let topology = topology();
    let agent = Agent::start(&topology, &scheduler_config("random", "", &[(0, 1), (1, 1), (2, 2)]));
    let counts = counts_of(&names_in_order(&topology, 3000, false));
    for (name, expected) in [("b1", 750.0), ("b2", 750.0), ("b3", 1500.0)] {
        let got = *counts.get(name).unwrap_or(&0) as f64;
        assert!((got - expected).abs() <= 0.1 * expected, "{name}: {got}, expected {expected} ± 10%: {counts:?}");
    }
    agent.stop();
}

/// `n` requests from the client bound to `source`; names in order.
fn names_from(topology: &Topology, source: &str, n: usize) -> Vec<String> {
    let source: SocketAddr = format!("{source}:0").parse().unwrap();
    let vip: SocketAddr = VIP4.parse().unwrap();
    in_netns(&topology.ns("client"), move || {
        (0..n)
            .map(|_| {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
                socket.bind(&source.into()).unwrap();
                socket.connect_timeout(&vip.into(), Duration::from_secs(3)).unwrap();
                let mut stream: TcpStream = socket.into();
                stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                stream.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n").unwrap();
                let mut response = String::new();
                stream.read_to_string(&mut response).unwrap();
                body_of(&response).unwrap()
            })
            .collect()
    })
}

#[test]
fn scheduler_source_hash_keeps_each_client_address_on_one_backend() {
    let topology = topology();
    let agent = Agent::start(&topology, &scheduler_config("source_hash", "", &[(0, 1), (1, 1), (2, 1)]));
    let one = counts_of(&names_from(&topology, "198.18.2.2", 100));
    assert_eq!(one.len(), 1, "one client address reached several backends: {one:?}");
    let mut homes = std::collections::BTreeSet::new();
    for host in 50..58 {
        let address = format!("198.18.2.{host}");
        let status = Command::new("ip")
            .args(["-n", &topology.ns("client"), "addr", "add", &format!("{address}/24"), "dev", "eth0"])
            .status()
            .unwrap();
        assert!(status.success());
        let counts = counts_of(&names_from(&topology, &address, 10));
        assert_eq!(counts.len(), 1, "{address} reached several backends: {counts:?}");
        homes.extend(counts.into_keys());
    }
    assert!(homes.len() >= 2, "8 client addresses all on {homes:?}");
    agent.stop();
}

#[test]
fn scheduler_least_conn_sends_new_connections_away_from_a_loaded_backend() {
    let topology = topology();
    let agent = Agent::start(&topology, &scheduler_config("least_conn", "", &[(0, 1)]));
    // 20 long-lived connections on b1 while it is alone.
    let mut held: Vec<LongLived> = (0..20).map(|_| LongLived::open(&topology, VIP4)).collect();
    for c in &mut held {
        assert_eq!(c.get(), "b1");
    }
    for address in &BACKENDS4[1..] {
        let (ok, _, err) = agent.cli(&["backend", "add", "web", address]);
        assert!(ok, "{err}");
    }
    wait_for_backend(&agent, BACKENDS4[2], "in the ring", |b| b.in_ring);
    let b1 = agent.backend("web", BACKENDS4[0]);
    assert_eq!(b1.least_conn_active, Some(20), "{b1:?}");
    let counts = spread(&topology, VIP4, 60);
    assert!(!counts.contains_key("b1"), "new connections reached the loaded backend: {counts:?}");
    // b2 and b3 are both idle between these short requests: ties, shared fairly.
    assert!(counts.get("b2").unwrap_or(&0) >= &15 && counts.get("b3").unwrap_or(&0) >= &15, "{counts:?}");
    let (_, table, _) = agent.cli(&["status"]);
    assert!(table.contains("(lc 20)"), "{table}");
    // A restarted agent swaps in a new program, whose candidate map it
    // writes before the swap: new connections still find a backend, and
    // still avoid the loaded one.
    agent.stop();
    let agent = Agent::start(&topology, &scheduler_config("least_conn", "", &[(0, 1), (1, 1), (2, 1)]));
    assert!(agent.log_text().contains("adopting the pinned state"), "{}", agent.log_text());
    let counts = spread(&topology, VIP4, 30);
    assert!(!counts.contains_key("b1"), "after a restart, new connections reached the loaded backend: {counts:?}");
    for c in &mut held {
        assert_eq!(c.get(), "b1");
    }
    drop(held);
    agent.stop();
}

#[test]
fn scheduler_least_response_time_sends_fewer_connections_to_a_slow_backend() {
    let topology = topology();
    let health = "\n[service.health]\nkind = \"http\"\npath = \"/healthz\"\ninterval_ms = 200\ntimeout_ms = 150\nrise = 2\nfall = 3\n";
    let agent = Agent::start(&topology, &scheduler_config("least_response_time", health, &[(0, 1), (1, 1), (2, 1)]));
    let url: SocketAddr = format!("{}:80", BACKENDS4[0]).parse().unwrap();
    in_netns(&topology.ns("client"), move || {
        let mut s = TcpStream::connect_timeout(&url, Duration::from_secs(2)).unwrap();
        s.write_all(b"GET /admin/delay/50 HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        assert!(r.contains("delay 50"), "{r}");
    });
    // Derived weights move at most halfway per rebalance (2 s): wait for them.
    let slow = wait_for_backend(&agent, BACKENDS4[0], "weighted down", |b| {
        let fast = agent.backend("web", BACKENDS4[1]).effective_weight as u64;
        (b.effective_weight as u64) * 4 < fast
    });
    let counts = spread(&topology, VIP4, 300);
    let (b1, others) =
        (*counts.get("b1").unwrap_or(&0), counts.get("b2").unwrap_or(&0) + counts.get("b3").unwrap_or(&0));
    eprintln!("measured: least_response_time with b1 50 ms slower: {counts:?} ({:?} to reweight)", slow.elapsed());
    assert!(b1 * 8 < others, "the slow backend still gets {b1} of 300: {counts:?}");
    agent.stop();
}

#[test]
fn scheduler_persistence_keeps_a_client_on_one_backend_until_the_timeout() {
    let topology = topology();
    // Round robin moves every new connection, unless affinity holds it.
    let agent = Agent::start(
        &topology,
        &scheduler_config("round_robin", "persistence_timeout_s = 1\n", &[(0, 1), (1, 1), (2, 1)]),
    );
    let mut homes = Vec::new();
    for _ in 0..4 {
        let counts = counts_of(&names_in_order(&topology, 10, true));
        assert_eq!(counts.len(), 1, "the client moved within the timeout: {counts:?}");
        homes.push(counts.into_keys().next().unwrap());
        thread::sleep(Duration::from_millis(1500));
    }
    // Each time the timeout passed, the client was scheduled afresh.
    assert!(homes.windows(2).all(|w| w[0] != w[1]), "affinity outlived its timeout: {homes:?}");
    let status = agent.status();
    assert_eq!(status.services[0].persistence_timeout_s, 1);
    agent.stop();
}

/// `max_entries` of the pinned map `name` of the test's agent.
fn pinned_entries(topology: &Topology, name: &str) -> u32 {
    let path = topology.pin_root().join(format!("layout-{}/{name}", lb_common::LAYOUT_VERSION));
    aya::maps::MapInfo::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).max_entries()
}

#[test]
fn the_affinity_and_nat_tables_cost_nothing_until_a_service_needs_them_then_grow_without_breaking_a_flow() {
    let topology = topology();
    let config = scheduler_config("round_robin", "", &[(0, 1), (1, 1), (2, 1)]);
    let agent = Agent::start(&topology, &config);
    for name in ["AFFINITY", "NAT_FLOWS", "NAT_REPLIES"] {
        assert_eq!(pinned_entries(&topology, name), lb_common::UNUSED_TABLE_ENTRIES, "{name} before use");
    }
    let mut conn = LongLived::open(&topology, VIP4);
    let home = conn.get();

    // Persistence: the affinity table grows (a program swap) and works.
    agent.reload(&scheduler_config("round_robin", "persistence_timeout_s = 30\n", &[(0, 1), (1, 1), (2, 1)]));
    agent.wait_for_log("program swapped in", 1);
    assert_eq!(pinned_entries(&topology, "AFFINITY"), lb_common::DEFAULT_CONNTRACK_SIZE);
    assert_eq!(pinned_entries(&topology, "NAT_FLOWS"), lb_common::UNUSED_TABLE_ENTRIES);
    assert_eq!(conn.try_get().as_deref(), Ok(home.as_str()), "the flow broke or moved when the table grew");
    let counts = counts_of(&names_in_order(&topology, 10, true));
    assert_eq!(counts.len(), 1, "round robin with persistence moved the client: {counts:?}");

    // A NAT service (port 81 → the backends' own servers on 8080).
    for name in NAMES {
        let server = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/backend_server.py");
        let start = format!(
            "ip netns exec {} setsid python3 {server} --name {name} --port 8080 </dev/null >/dev/null 2>&1 &",
            topology.ns(name)
        );
        assert!(Command::new("sh").arg("-c").arg(start).status().unwrap().success());
    }
    nat_ready(&topology);
    let nat = nat_service("natweb", &format!("{VIP_ADDRESS4}:81"), "tcp", &NAT_BACKENDS4[..2], "");
    let with_nat = scheduler_config("round_robin", "persistence_timeout_s = 30\n", &[(0, 1), (1, 1), (2, 1)]) + &nat;
    agent.reload(&with_nat);
    agent.wait_for_log("program swapped in", 2);
    for name in ["NAT_FLOWS", "NAT_REPLIES"] {
        assert_eq!(pinned_entries(&topology, name), lb_common::DEFAULT_NAT_TABLE_SIZE, "{name} in use");
    }
    assert_eq!(conn.try_get().as_deref(), Ok(home.as_str()), "the flow broke or moved when the NAT tables grew");
    let vip: SocketAddr = format!("{VIP_ADDRESS4}:81").parse().unwrap();
    let answers: BTreeSet<String> = in_netns(&topology.ns("client"), move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut answers = BTreeSet::new();
        while answers.len() < 2 {
            assert!(Instant::now() < deadline, "the NAT service did not answer from both backends: {answers:?}");
            match get_new_connection_within(vip, Duration::from_millis(500)) {
                Ok(name) => {
                    answers.insert(name);
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
        answers
    });
    assert_eq!(answers, BTreeSet::from(["b1".to_string(), "b2".to_string()]));

    // Back to DSR only: the tables stay (they may hold the removed
    // services' flows) and nothing is swapped.
    agent.reload(&config);
    assert_eq!(pinned_entries(&topology, "AFFINITY"), lb_common::DEFAULT_CONNTRACK_SIZE);
    assert_eq!(agent.log_text().matches("program swapped in").count(), 2);
    assert_eq!(conn.try_get().as_deref(), Ok(home.as_str()));
    agent.stop();
}

// ---- tunnels ------------------------------------------------------------------

/// Backends two routers away from the LB (the harness's routed subnet).
const ROUTED4: [&str; 3] = ["198.18.3.21", "198.18.3.22", "198.18.3.23"];
const ROUTED6: [&str; 3] = ["2001:db8:3::21", "2001:db8:3::22", "2001:db8:3::23"];
const ROUTED_NAMES: [&str; 3] = ["t1", "t2", "t3"];

fn routed_topology() -> Topology {
    Topology::up_routed(&Topology::unique_prefix("xt"), Path::new(XDP_PASS_OBJ)).expect("harness up")
}

/// `xdplb decap --interface eth0 ARGS...` on routed backend `name`.
fn decap(topology: &Topology, name: &str, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", topology.ns(name)))
        .args([XDPLB, "decap", "--interface", "eth0", "--pin-dir"])
        .arg(topology.decap_pin_dir(name))
        .args(args)
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "xdplb decap on {name} {args:?} failed: {stderr}");
    stdout.into_owned()
}

/// One `[[service]]` table of a tunnel configuration.
fn tunnel_service(name: &str, vip: &str, protocol: &str, forwarding: &str, backends: &[&str], extra: &str) -> String {
    let mut text = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"{protocol}\"\nforwarding = \"{forwarding}\"\n{extra}"
    );
    for address in backends {
        text += &format!("\n[[service.backend]]\naddress = \"{address}\"\n");
    }
    text
}

/// A counter of `xdplb decap --stats`.
fn decap_count(stats: &str, counter: &str) -> u64 {
    stats
        .lines()
        .find_map(|l| l.trim().strip_prefix(counter).map(|v| v.trim().parse().unwrap()))
        .unwrap_or_else(|| panic!("no {counter} in {stats}"))
}

/// One UDP datagram to `vip` from the client; the answering backend's name.
fn udp_ask(topology: &Topology, vip: &str) -> String {
    let vip: SocketAddr = vip.parse().unwrap();
    in_netns(&topology.ns("client"), move || {
        let bind = if vip.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
        let socket = std::net::UdpSocket::bind(bind).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        socket.connect(vip).unwrap();
        for _ in 0..3 {
            socket.send(b"who").unwrap();
            let mut buf = [0u8; 64];
            if let Ok(n) = socket.recv(&mut buf) {
                return String::from_utf8_lossy(&buf[..n]).into_owned();
            }
        }
        panic!("no UDP answer from {vip}");
    })
}

#[test]
fn tunnels_reach_backends_two_routers_away_in_every_family_combination() {
    let topology = routed_topology();
    for name in ROUTED_NAMES {
        let report = decap(&topology, name, &[]);
        assert!(report.contains("decap attached on eth0"), "{report}");
    }
    let agent_header = "[agent]\ninterface = \"eth0\"\n";
    // (forwarding, backends of the IPv4 VIP, backends of the IPv6 VIP)
    let phases: [(&str, [&str; 3], [&str; 3]); 4] =
        [("ipip", ROUTED4, ROUTED6), ("gue", ROUTED4, ROUTED6), ("ipip", ROUTED6, ROUTED4), ("gue", ROUTED6, ROUTED4)];
    let config_of = |(forwarding, v4, v6): (&str, [&str; 3], [&str; 3])| {
        let mut text = agent_header.to_string();
        text += &tunnel_service("web", VIP4, "tcp", forwarding, &v4, "");
        text += &tunnel_service("web6", VIP6, "tcp", forwarding, &v6, "");
        text += &tunnel_service("dns", "198.18.0.100:53", "udp", forwarding, &v4, "");
        text += &tunnel_service("dns6", "[2001:db8::100]:53", "udp", forwarding, &v6, "");
        text
    };
    let agent = Agent::start(&topology, &config_of(phases[0]));
    for (i, phase) in phases.into_iter().enumerate() {
        if i > 0 {
            agent.reload(&config_of(phase));
        }
        let what =
            format!("{} with IPv4 VIP → {} backends", phase.0, if phase.1[0].contains(':') { "IPv6" } else { "IPv4" });
        assert_shares_of(&spread(&topology, VIP4, 300), ROUTED_NAMES, [1, 1, 1], &what);
        let what =
            format!("{} with IPv6 VIP → {} backends", phase.0, if phase.2[0].contains(':') { "IPv6" } else { "IPv4" });
        assert_shares_of(&spread(&topology, VIP6, 300), ROUTED_NAMES, [1, 1, 1], &what);
        for vip in ["198.18.0.100:53", "[2001:db8::100]:53"] {
            let answer = udp_ask(&topology, vip);
            assert!(ROUTED_NAMES.contains(&answer.as_str()), "UDP answer {answer:?} from {vip} ({})", phase.0);
        }
    }
    let status = agent.status();
    assert_eq!(status.services.iter().find(|s| s.name == "web").unwrap().forwarding.to_string(), "gue");
    let summary = agent.stop();
    assert!(summary_value(&summary, "global:", "forwarded_ipip") > 1000, "{summary}");
    assert!(summary_value(&summary, "global:", "forwarded_gue") > 1000, "{summary}");
    assert_eq!(summary_value(&summary, "global:", "forwarded_dsr"), 0, "{summary}");
    // Each backend opened both kinds of tunnel.
    for name in ROUTED_NAMES {
        let stats = decap(&topology, name, &["--stats"]);
        assert!(decap_count(&stats, "decapsulated_ipip") > 100, "{name}: {stats}");
        assert!(decap_count(&stats, "decapsulated_gue") > 100, "{name}: {stats}");
        assert_eq!(decap_count(&stats, "dropped_malformed"), 0, "{name}: {stats}");
    }
}

#[test]
fn a_long_lived_connection_through_a_tunnel_survives_backend_changes() {
    let topology = routed_topology();
    for name in ROUTED_NAMES {
        decap(&topology, name, &[]);
    }
    let config = |backends: &[&str]| {
        format!("[agent]\ninterface = \"eth0\"\n{}", tunnel_service("web", VIP4, "tcp", "gue", backends, ""))
    };
    let agent = Agent::start(&topology, &config(&ROUTED4[..2]));
    let mut conn = LongLived::open(&topology, VIP4);
    let home = conn.get();
    let home_index = ROUTED_NAMES.iter().position(|n| *n == home).expect("t1 or t2");
    let other = ROUTED4[1 - home_index];
    for (step, backends) in [
        ("add t3", vec![ROUTED4[0], ROUTED4[1], ROUTED4[2]]),
        ("remove the other backend", vec![ROUTED4[home_index], ROUTED4[2]]),
        ("remove the connection's own backend", vec![ROUTED4[2], other]),
    ] {
        agent.reload(&config(&backends));
        for _ in 0..5 {
            assert_eq!(conn.get(), home, "after {step:?} the long-lived connection moved or broke");
        }
        let counts = spread(&topology, VIP4, 60);
        for name in counts.keys() {
            let i = ROUTED_NAMES.iter().position(|n| n == name).unwrap();
            assert!(backends.contains(&ROUTED4[i]), "after {step:?} a new connection reached {name}: {counts:?}");
        }
    }
    assert_eq!(conn.get(), home);
    agent.stop();
}

#[test]
fn tunnel_health_checks_probe_the_vip_through_the_tunnel() {
    let topology = routed_topology();
    for name in ROUTED_NAMES {
        decap(&topology, name, &[]);
    }
    let health = "[service.health]\ninterval_ms = 300\ntimeout_ms = 200\nrise = 2\nfall = 2\n";
    let config =
        format!("[agent]\ninterface = \"eth0\"\n{}", tunnel_service("web", VIP4, "tcp", "ipip", &ROUTED4, health));
    let agent = Agent::start(&topology, &config);
    let wait_for = |address: &str, health: Health| {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let backend = agent.backend("web", address);
            if backend.health == health {
                return backend;
            }
            assert!(Instant::now() < deadline, "{address} never became {health:?}: {backend:?}");
            thread::sleep(Duration::from_millis(100));
        }
    };
    thread::sleep(Duration::from_millis(1000));
    for address in ROUTED4 {
        let backend = wait_for(address, Health::Up);
        let probe = backend.last_probe.expect("probed");
        assert!(probe.detail.contains("through the tunnel"), "{address}: {probe:?}");
    }

    // t2 stops decapsulating: its own address still answers, but the VIP
    // through the tunnel does not.
    let report = decap(&topology, "t2", &["--detach"]);
    assert!(report.contains("decap detached"), "{report}");
    wait_for(ROUTED4[1], Health::Down);
    let own = in_netns(&topology.ns("client"), || get_new_connection("198.18.3.22:80".parse().unwrap()));
    assert_eq!(own.as_deref(), Ok("t2"), "t2's own address must still answer");
    let counts = spread(&topology, VIP4, 60);
    assert!(!counts.contains_key("t2"), "a down backend got new connections: {counts:?}");

    // t3 loses the VIP from lo: down too, while t1 stays up.
    let status = Command::new("ip")
        .args(["-n", &topology.ns("t3"), "addr", "del", "198.18.0.100/32", "dev", "lo"])
        .status()
        .unwrap();
    assert!(status.success());
    wait_for(ROUTED4[2], Health::Down);
    assert_eq!(agent.backend("web", ROUTED4[0]).health, Health::Up);
    let counts = spread(&topology, VIP4, 30);
    assert_eq!(counts.keys().collect::<Vec<_>>(), ["t1"], "{counts:?}");

    // Decapsulation back on t2: up again.
    decap(&topology, "t2", &[]);
    wait_for(ROUTED4[1], Health::Up);
    agent.stop();
}

#[test]
fn a_route_change_moves_tunnelled_traffic_to_the_new_next_hop_at_once() {
    let topology = routed_topology();
    for name in ROUTED_NAMES {
        decap(&topology, name, &[]);
    }
    let metrics = "127.0.0.1:9593";
    let config = format!(
        "[agent]\ninterface = \"eth0\"\nmetrics_listen = \"{metrics}\"\n{}",
        tunnel_service("web", VIP4, "tcp", "ipip", &ROUTED4, "")
    );
    let agent = Agent::start(&topology, &config);
    let actions = || {
        let text = scrape(&topology, metrics);
        let value = |action: &str| metric(&text, "xdplb_xdp_actions_total", &format!("action=\"{action}\""));
        (value("tx"), value("redirect"))
    };
    assert_shares_of(&spread(&topology, VIP4, 300), ROUTED_NAMES, [1, 1, 1], "through eth0");
    let (tx, redirect) = actions();
    assert!(tx >= 300.0 && redirect == 0.0, "tx {tx}, redirect {redirect}: the routed subnet is reached by eth0");

    // A more specific route by eth1 (the LB's other segment, whose router
    // also reaches the routed subnet): the agent hears of it from the
    // kernel, well before its 5 s maintenance pass.
    let route = |verb: &str| {
        let ns = topology.ns("lb");
        let args = ["-n", &ns, "route", verb, "198.18.3.0/24", "via", "198.18.1.1", "dev", "eth1"];
        assert!(Command::new("ip").args(args).status().unwrap().success());
    };
    let moved_within = |what: &str, moved: &dyn Fn(f64, f64) -> bool| {
        let start = Instant::now();
        loop {
            let name = in_netns(&topology.ns("client"), || get_new_connection(VIP4.parse().unwrap()));
            assert!(name.is_ok(), "{what}: a request failed: {name:?}");
            let (tx, redirect) = actions();
            if moved(tx, redirect) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(2),
                "{what}: not moved after 2 s: tx {tx} redirect {redirect}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    };
    let (tx_before, _) = actions();
    route("add");
    let took = moved_within("route added", &|_, redirect| redirect > 0.0);
    eprintln!("measured: tunnelled traffic moved to eth1 {took:?} after the route was added");
    let (_, redirect_before) = actions();
    assert_shares_of(&spread(&topology, VIP4, 300), ROUTED_NAMES, [1, 1, 1], "through eth1");
    let (tx_after, redirect_after) = actions();
    assert!(redirect_after >= redirect_before + 300.0, "redirect {redirect_before} → {redirect_after}");
    assert!(tx_after < tx_before + 20.0, "still sent by eth0: tx {tx_before} → {tx_after}");

    route("del");
    let (tx_now, _) = actions();
    let took = moved_within("route removed", &|tx, _| tx > tx_now + 1.0);
    eprintln!("measured: tunnelled traffic back on eth0 {took:?} after the route was removed");
    agent.stop();
}

// ---- running under systemd ----------------------------------------------------

#[test]
fn the_agent_tells_systemd_it_is_ready_only_once_attached_and_reports_reloads_and_stop() {
    let topology = topology();
    let dir = TempDir::new(format!("/tmp/xdplb-notify-{}", topology.prefix)).unwrap();
    let socket_path = dir.0.join("notify.sock");
    // Stands in for systemd's NOTIFY_SOCKET.
    let notify = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let receive = || {
        let mut buf = [0u8; 512];
        let n = notify.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let agent = Agent::spawn_with_env(&topology, &config([1, 1, 1]), &[("NOTIFY_SOCKET", socket_path.as_path())]);
    // The first message is READY=1, and when it arrives the program is
    // attached and the maps are programmed.
    let first = receive();
    let attached = lb_program_id(&topology);
    assert!(first.lines().any(|l| l == "READY=1"), "{first:?}");
    assert!(first.contains("STATUS=forwarding on eth0 with 2 service(s)"), "{first:?}");
    assert!(attached.is_some(), "READY=1 before the program was attached");
    assert!(agent.log_text().contains("attached to eth0"), "{}", agent.log_text());
    assert_shares(&spread(&topology, VIP4, 300), [1, 1, 1], "right after READY=1");

    // SIGHUP (systemctl reload): RELOADING=1 with the monotonic time, then READY=1.
    agent.signal("HUP");
    let reloading = receive();
    assert!(reloading.lines().any(|l| l == "RELOADING=1"), "{reloading:?}");
    assert!(reloading.lines().any(|l| l.starts_with("MONOTONIC_USEC=")), "{reloading:?}");
    let ready = receive();
    assert!(ready.lines().any(|l| l == "READY=1"), "{ready:?}");

    agent.stop();
    assert_eq!(receive(), "STOPPING=1\n");
}

#[test]
fn the_agent_runs_with_cap_bpf_net_admin_and_perfmon_only() {
    // What contrib/systemd/xdplb.service grants, nothing more.
    let topology = routed_topology();
    for name in ROUTED_NAMES {
        decap(&topology, name, &[]);
    }
    let health = "[service.health]\ninterval_ms = 300\ntimeout_ms = 200\n";
    let config =
        format!("[agent]\ninterface = \"eth0\"\n{}", tunnel_service("web", VIP4, "tcp", "ipip", &ROUTED4, health));
    let wrapper = ["setpriv", "--bounding-set", "-all,+bpf,+net_admin,+perfmon", "--"];
    let agent = Agent::spawn_wrapped(&topology, &config, &[], &wrapper);
    agent.wait_for_log("attached to", 1);
    agent.wait_for_log("all backends resolved", 1);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.child.as_ref().unwrap().id())).unwrap();
    let effective = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim().to_string();
    // CAP_NET_ADMIN 12, CAP_PERFMON 38, CAP_BPF 39.
    assert_eq!(u64::from_str_radix(&effective, 16).unwrap(), 1 << 12 | 1 << 38 | 1 << 39, "CapEff {effective}");
    assert_shares_of(&spread(&topology, VIP4, 300), ROUTED_NAMES, [1, 1, 1], "with three capabilities");
    // Probes through the tunnel (SO_MARK, the tc program) work too.
    thread::sleep(Duration::from_millis(1000));
    for address in ROUTED4 {
        let probe = agent.backend("web", address).last_probe.expect("probed");
        assert!(probe.ok && probe.detail.contains("through the tunnel"), "{address}: {probe:?}");
    }
    agent.stop();
}

// ---- the Grafana dashboard ------------------------------------------------------

/// A Prometheus server in the LB namespace; stopped on drop.
struct Prometheus {
    child: Child,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` with every byte outside [A-Za-z0-9] percent-encoded (a URL query value).
fn url_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

/// GET `path` from `address` in the LB namespace; the body.
fn http_get_in_lb(topology: &Topology, address: &str, path: &str) -> Result<String, String> {
    let address: SocketAddr = address.parse().unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n");
    in_netns(&topology.ns("lb"), move || {
        let mut s = TcpStream::connect_timeout(&address, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut r = String::new();
        s.read_to_string(&mut r).map_err(|e| e.to_string())?;
        Ok(r.split_once("\r\n\r\n").map(|(_, body)| body.to_string()).unwrap_or_default())
    })
}

#[test]
fn every_grafana_dashboard_query_returns_data_from_a_real_prometheus() {
    let topology = topology();
    let metrics = "127.0.0.1:9594";
    // A NAT service too (VIP port 8080 to the backends' port 80), for the
    // NAT panels.
    nat_ready(&topology);
    let backends: Vec<String> = BACKENDS4.iter().map(|b| format!("{b}:80")).collect();
    let backends: Vec<&str> = backends.iter().map(String::as_str).collect();
    let config = config([1, 1, 1]).replacen("[agent]\n", &format!("[agent]\nmetrics_listen = \"{metrics}\"\n"), 1)
        + &nat_service("app", &format!("{VIP_ADDRESS4}:8080"), "tcp", &backends, "");
    let agent = Agent::start(&topology, &config);

    let dir = TempDir::new(format!("/tmp/xdplb-prometheus-{}", topology.prefix)).unwrap();
    let prometheus_config = dir.0.join("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: xdplb\n    static_configs:\n      - targets: [\"{metrics}\"]\n"),
    )
    .unwrap();
    let prometheus_address = "127.0.0.1:9595";
    let child = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", topology.ns("lb")))
        .arg("prometheus")
        .arg(format!("--config.file={}", prometheus_config.display()))
        .arg(format!("--storage.tsdb.path={}", dir.0.join("data").display()))
        .arg(format!("--web.listen-address={prometheus_address}"))
        .stdout(Stdio::null())
        .stderr(File::create(dir.0.join("prometheus.log")).unwrap())
        .spawn()
        .expect("starting prometheus (cargo xtask setup installs it)");
    let _prometheus = Prometheus { child, _dir: TempDir(dir.0.clone()) };

    // Traffic while Prometheus scrapes every second, for longer than the
    // rate window the queries use.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(12) {
        spread(&topology, VIP4, 30);
        spread(&topology, VIP6, 30);
        spread(&topology, &format!("{VIP_ADDRESS4}:8080"), 10);
        thread::sleep(Duration::from_millis(300));
    }

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../contrib/grafana/xdplb.json")).unwrap(),
    )
    .unwrap();
    let mut checked = 0;
    let mut empty = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            // Grafana's variables, as Grafana would fill them in.
            let expr = target["expr"].as_str().unwrap().replace("$__rate_interval", "15s").replace("$service", ".*");
            let body =
                http_get_in_lb(&topology, prometheus_address, &format!("/api/v1/query?query={}", url_encoded(&expr)))
                    .unwrap_or_else(|e| panic!("querying Prometheus: {e}"));
            let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("{expr}: {body}"));
            assert_eq!(answer["status"], "success", "{expr}: {body}");
            if answer["data"]["result"].as_array().is_none_or(|r| r.is_empty()) {
                empty.push(format!("{} / {expr}", panel["title"]));
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} expressions in the dashboard");
    assert!(empty.is_empty(), "dashboard expressions without data:\n{}", empty.join("\n"));
    agent.stop();
}

// ---- NAT ------------------------------------------------------------------

const VIP_ADDRESS4: &str = "198.18.0.100";
const VIP_ADDRESS6: &str = "2001:db8::100";
/// The backends' own addresses and ports behind NAT: plain servers.
const NAT_BACKENDS4: [&str; 3] = ["198.18.1.11:8080", "198.18.1.12:8080", "198.18.2.13:8080"];
const NAT_BACKENDS6: [&str; 3] = ["[2001:db8:1::11]:8080", "[2001:db8:1::12]:8080", "[2001:db8:2::13]:8080"];
/// The LB's addresses on the backends' segments: full NAT's sources.
const LB_SOURCES4: [&str; 2] = ["198.18.1.3", "198.18.2.3"];
const LB_SOURCES6: [&str; 2] = ["2001:db8:1::3", "2001:db8:2::3"];

fn in_ns(topology: &Topology, name: &str, args: &[&str]) {
    let status = Command::new("ip").args(["netns", "exec", &topology.ns(name)]).args(args).status().unwrap();
    assert!(status.success(), "{name}: {args:?}");
}

/// What NAT on veth needs around the LB: forwarding on the LB (the kernel's
/// route lookup for NAT replies needs it), and the backends' veths filling
/// in their own checksums (a veth artifact: a real NIC does it on the wire,
/// while veth leaves it to "hardware" that XDP's rewrite bypasses; the
/// client's is off too).
fn nat_ready(topology: &Topology) {
    in_ns(topology, "lb", &["sysctl", "-qw", "net.ipv4.conf.all.forwarding=1", "net.ipv6.conf.all.forwarding=1"]);
    for name in NAMES {
        in_ns(topology, name, &["ethtool", "-K", "eth0", "tx", "off"]);
    }
}

/// Makes b1..b3 plain servers that know nothing of xdplb: no VIP on lo, no
/// ARP settings, default route not through the LB; each serves HTTP on
/// 8080 and UDP on 5353 at its own addresses. The LB forwards IP (the
/// kernel's route lookup for NAT replies needs it).
fn plain_backends(topology: &Topology) {
    for (i, name) in NAMES.iter().enumerate() {
        in_ns(topology, name, &["ip", "addr", "del", &format!("{VIP_ADDRESS4}/32"), "dev", "lo"]);
        in_ns(topology, name, &["ip", "addr", "del", &format!("{VIP_ADDRESS6}/128"), "dev", "lo"]);
        for key in ["all.arp_ignore", "all.arp_announce", "eth0.arp_ignore", "eth0.arp_announce"] {
            in_ns(topology, name, &["sysctl", "-qw", &format!("net.ipv4.conf.{key}=0")]);
        }
        let (v4, v6) = (BACKENDS4[i], BACKENDS6[i]);
        let server = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/backend_server.py");
        // In the background, as the harness starts its servers; `down` ends it.
        let start = format!(
            "ip netns exec {} setsid python3 {server} --name {name} --port 8080 --udp-port 5353 \
             --udp-address {v4} --udp-address {v6} </dev/null >/dev/null 2>&1 &",
            topology.ns(name)
        );
        assert!(Command::new("sh").arg("-c").arg(start).status().unwrap().success());
    }
    nat_ready(topology);
    // Up when the client reaches each server directly.
    let targets: Vec<SocketAddr> = NAT_BACKENDS4.iter().chain(&NAT_BACKENDS6).map(|a| a.parse().unwrap()).collect();
    in_netns(&topology.ns("client"), move || {
        let deadline = Instant::now() + Duration::from_secs(10);
        for target in targets {
            let remaining = deadline.saturating_duration_since(Instant::now());
            wait_until(
                remaining,
                Duration::from_millis(100),
                || get_new_connection_within(target, Duration::from_millis(500)).is_ok(),
                || format!("backend server at {target} did not come up"),
            );
        }
    });
}

fn nat_service(name: &str, vip: &str, protocol: &str, backends: &[&str], extra: &str) -> String {
    let mut text = format!(
        "\n[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\nprotocol = \"{protocol}\"\nforwarding = \"nat\"\n{extra}\n"
    );
    for backend in backends {
        text += &format!("\n[[service.backend]]\naddress = \"{backend}\"\n");
    }
    text
}

/// The NAT services of the tests: HTTP 80 → 8080 and UDP 53 → 5353, both families.
fn nat_config(agent_extra: &str, more: &str) -> String {
    let udp4: Vec<String> = NAT_BACKENDS4.iter().map(|a| a.replace(":8080", ":5353")).collect();
    let udp6: Vec<String> = NAT_BACKENDS6.iter().map(|a| a.replace(":8080", ":5353")).collect();
    let udp4: Vec<&str> = udp4.iter().map(String::as_str).collect();
    let udp6: Vec<&str> = udp6.iter().map(String::as_str).collect();
    format!("[agent]\ninterface = \"eth0\"\n{agent_extra}\n")
        + &nat_service("web", &format!("{VIP_ADDRESS4}:80"), "tcp", &NAT_BACKENDS4, "")
        + &nat_service("web6", &format!("[{VIP_ADDRESS6}]:80"), "tcp", &NAT_BACKENDS6, "")
        + &nat_service("dns", &format!("{VIP_ADDRESS4}:53"), "udp", &udp4, "")
        + &nat_service("dns6", &format!("[{VIP_ADDRESS6}]:53"), "udp", &udp6, "")
        + more
}

/// `n` GETs of /client through `vip`: the addresses the backends saw.
fn clients_seen(topology: &Topology, vip: &str, n: usize) -> BTreeSet<String> {
    let vip: SocketAddr = vip.parse().unwrap();
    in_netns(&topology.ns("client"), move || {
        (0..n)
            .map(|i| {
                let mut stream = TcpStream::connect_timeout(&vip, Duration::from_secs(3))
                    .unwrap_or_else(|e| panic!("connection {i} to {vip}: {e}"));
                stream.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
                stream.write_all(b"GET /client HTTP/1.1\r\nHost: vip\r\nConnection: close\r\n\r\n").unwrap();
                let mut response = String::new();
                stream.read_to_string(&mut response).unwrap();
                body_of(&response).unwrap()
            })
            .collect()
    })
}

#[test]
fn nat_reaches_plain_backends_in_both_families_and_they_see_the_lb_as_the_client() {
    let topology = topology();
    plain_backends(&topology);
    // A UDP service whose backend port is closed: the backend answers with
    // ICMP port unreachable, which must reach the client translated.
    let closed = nat_service("closed", &format!("{VIP_ADDRESS4}:54"), "udp", &["198.18.1.11:5999"], "");
    let agent = Agent::start(&topology, &nat_config("", &closed));
    for (vip, sources) in [(format!("{VIP_ADDRESS4}:80"), LB_SOURCES4), (format!("[{VIP_ADDRESS6}]:80"), LB_SOURCES6)] {
        let counts = spread(&topology, &vip, 600);
        assert_shares(&counts, [1, 1, 1], &format!("600 connections through NAT to {vip}"));
        let seen = clients_seen(&topology, &vip, 30);
        assert!(
            !seen.is_empty() && seen.iter().all(|a| sources.contains(&a.as_str())),
            "behind full NAT the backends must see only the LB's addresses {sources:?}, saw {seen:?}"
        );
    }
    // UDP, port 53 mapped to 5353: every answer from a backend, several of them.
    for vip in [format!("{VIP_ADDRESS4}:53"), format!("[{VIP_ADDRESS6}]:53")] {
        let answers: BTreeSet<String> = (0..30).map(|_| udp_ask(&topology, &vip)).collect();
        assert!(answers.iter().all(|a| NAMES.contains(&a.as_str())) && answers.len() >= 2, "{vip}: {answers:?}");
    }
    let vip: SocketAddr = format!("{VIP_ADDRESS4}:54").parse().unwrap();
    let refused = in_netns(&topology.ns("client"), move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        socket.connect(vip).unwrap();
        socket.send(b"anyone?").unwrap();
        socket.recv(&mut [0u8; 64]).map(|_| ()).map_err(|e| e.kind())
    });
    assert_eq!(
        refused,
        Err(std::io::ErrorKind::ConnectionRefused),
        "the backend's port unreachable did not reach the client's socket as one about VIP:54"
    );
    // The translations show up per backend, with the pool's free ports.
    agent.wait_for_log("all backends resolved", 1);
    thread::sleep(Duration::from_millis(5500)); // one maintenance scan
    let status = agent.status();
    let web = status.services.iter().find(|s| s.name == "web").unwrap();
    assert_eq!(web.nat_port_exhausted, Some(0));
    let translations: u64 = web.backends.iter().map(|b| b.nat_flows.unwrap()).sum();
    assert!(translations > 0, "no NAT flow in status: {web:?}");
    assert!(web.backends.iter().all(|b| b.nat_free_ports.unwrap() > 30_000), "{web:?}");
    let (ok, text, _) = agent.cli(&["status"]);
    assert!(ok && text.contains("NAT FLOWS") && text.contains("FREE PORTS"), "{text}");
    // A backend's address with its port in the CLI.
    let (ok, text, err) = agent.cli(&["backend", "drain", "web", "198.18.1.11:8080"]);
    assert!(ok, "{text}{err}");
    let (ok, _, err) = agent.cli(&["backend", "drain", "web", "198.18.1.11"]);
    assert!(!ok && err.contains("has no backend 198.18.1.11"), "{err}");
    agent.stop();
}

#[test]
fn nat_keeps_a_long_lived_connection_across_backend_changes_and_can_preserve_the_client() {
    let topology = topology();
    plain_backends(&topology);
    // DNAT only: b1 must send its replies to clients through the LB.
    in_ns(&topology, "b1", &["ip", "route", "add", "198.18.2.0/24", "via", "198.18.1.3"]);
    let preserve =
        nat_service("keep", &format!("{VIP_ADDRESS4}:81"), "tcp", &[NAT_BACKENDS4[0]], "nat_preserve_client = true");
    let weighted = |backends: &[(usize, u32)]| {
        let mut service = nat_service("web", &format!("{VIP_ADDRESS4}:80"), "tcp", &[], "");
        for (i, weight) in backends {
            service += &format!("\n[[service.backend]]\naddress = \"{}\"\nweight = {weight}\n", NAT_BACKENDS4[*i]);
        }
        String::from("[agent]\ninterface = \"eth0\"\n") + &service + &preserve
    };
    let with = |backends: &[usize]| weighted(&backends.iter().map(|i| (*i, 1)).collect::<Vec<_>>());
    let agent = Agent::start(&topology, &with(&[0, 1]));
    let seen = clients_seen(&topology, &format!("{VIP_ADDRESS4}:81"), 10);
    assert_eq!(seen, BTreeSet::from(["198.18.2.2".to_string()]), "nat_preserve_client shows the real client");

    let mut conn = LongLived::open(&topology, &format!("{VIP_ADDRESS4}:80"));
    let home = conn.get();
    let home_index = NAMES.iter().position(|n| *n == home).unwrap();
    let other = 1 - home_index;
    for (step, backends) in [
        ("add b3", vec![(0, 1), (1, 1), (2, 1)]),
        ("reweight", vec![(home_index, 1), (other, 5), (2, 3)]),
        ("remove the other backend", vec![(home_index, 1), (2, 1)]),
        ("remove the connection's own backend", vec![(2, 1), (other, 1)]),
        ("add everything back", vec![(0, 1), (1, 1), (2, 1)]),
    ] {
        agent.reload(&weighted(&backends));
        let backends: Vec<usize> = backends.iter().map(|(i, _)| *i).collect();
        for _ in 0..5 {
            assert_eq!(conn.get(), home, "after {step:?} the long-lived NAT connection moved or broke");
        }
        let counts = spread(&topology, &format!("{VIP_ADDRESS4}:80"), 30);
        for name in counts.keys() {
            let i = NAMES.iter().position(|n| n == name).unwrap();
            assert!(backends.contains(&i), "after {step:?} a new connection reached {name}: {counts:?}");
        }
    }
    assert_eq!(conn.get(), home);
    // The translations are pinned: the connection outlives a SIGKILLed agent
    // (the program forwards on, on both interfaces) and its successor.
    agent.kill();
    assert_eq!(conn.get(), home, "after SIGKILL");
    let agent = Agent::start(&topology, &with(&[0, 1, 2]));
    assert!(agent.log_text().contains("adopting the pinned state"), "{}", agent.log_text());
    for _ in 0..3 {
        assert_eq!(conn.get(), home, "after the restart");
    }
    assert_eq!(clients_seen(&topology, &format!("{VIP_ADDRESS4}:81"), 3), BTreeSet::from(["198.18.2.2".to_string()]));
    agent.stop();
}

/// A service that switches between DSR and NAT: each connection stays on
/// the mode that carried it until it ends (its backends' old slots are
/// retired with their flows), and the NAT replies of a connection outlive
/// the last NAT service, through the agent's table scans.
#[test]
fn long_lived_connections_survive_their_service_switching_between_dsr_and_nat() {
    let topology = topology();
    // Backends ready for both: the VIP on lo for DSR, and a server on
    // their own addresses that full NAT reaches.
    nat_ready(&topology);
    let web = |forwarding: &str| {
        let mut text = format!(
            "[agent]\ninterface = \"eth0\"\n\n[[service]]\nname = \"web\"\nvip = \"{VIP4}\"\nprotocol = \"tcp\"\nforwarding = \"{forwarding}\"\n"
        );
        for address in &BACKENDS4[..2] {
            text += &format!("\n[[service.backend]]\naddress = \"{address}\"\n");
        }
        text
    };
    let client = "198.18.2.2".to_string();
    let agent = Agent::start(&topology, &web("dsr"));
    assert_eq!(clients_seen(&topology, VIP4, 5), BTreeSet::from([client.clone()]), "DSR shows the client");
    let mut by_dsr = LongLived::open(&topology, VIP4);
    let dsr_home = by_dsr.get();

    agent.reload(&web("nat"));
    for _ in 0..3 {
        assert_eq!(by_dsr.get(), dsr_home, "the DSR connection moved or broke when its service turned NAT on");
    }
    let seen = clients_seen(&topology, VIP4, 10);
    assert!(seen.iter().all(|a| LB_SOURCES4.contains(&a.as_str())), "new connections not by NAT: {seen:?}");
    let mut by_nat = LongLived::open(&topology, VIP4);
    let nat_home = by_nat.get();

    // Back to DSR: the last NAT service is gone, yet the NAT connection's
    // replies are still translated, also after the agent's table scans.
    agent.reload(&web("dsr"));
    assert_eq!(clients_seen(&topology, VIP4, 5), BTreeSet::from([client]), "new connections not by DSR");
    for round in 0..3 {
        assert_eq!(by_nat.get(), nat_home, "round {round}: the NAT connection moved or broke after NAT was turned off");
        assert_eq!(by_dsr.get(), dsr_home, "round {round}: the DSR connection moved or broke");
        thread::sleep(Duration::from_millis(3000)); // the scans run every 5 s
    }
    assert!(!agent.log_text().contains("no NAT backend behind it"), "{}", agent.log_text());
    // Once the NAT connection has ended and lingered, its slot is freed and
    // the program leaves the interface its replies arrived on.
    drop(by_nat);
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || agent.log_text().contains("no NAT backend behind it"),
        || format!("the program stayed for NAT replies:\n{}", agent.log_text()),
    );
    assert_eq!(by_dsr.get(), dsr_home);
    agent.stop();
}

#[test]
fn an_exhausted_nat_pool_refuses_new_flows_and_recovers_when_flows_end() {
    let topology = topology();
    plain_backends(&topology);
    let config = String::from("[agent]\ninterface = \"eth0\"\nnat_fin_linger_s = 1\n")
        + &nat_service(
            "web",
            &format!("{VIP_ADDRESS4}:80"),
            "tcp",
            &[NAT_BACKENDS4[0]],
            "nat_source_ports = \"20000-20003\"",
        );
    let agent = Agent::start(&topology, &config);
    let vip: SocketAddr = format!("{VIP_ADDRESS4}:80").parse().unwrap();
    // Four ports: four long-lived connections take them all.
    let mut held: Vec<LongLived> = (0..4).map(|_| LongLived::open(&topology, &vip.to_string())).collect();
    for conn in &mut held {
        assert_eq!(conn.get(), "b1");
    }
    // The fifth is refused (its SYNs are dropped), never given a used port.
    let fifth = in_netns(&topology.ns("client"), move || get_new_connection_within(vip, Duration::from_secs(1)));
    assert!(fifth.is_err(), "a fifth connection got through a pool of four ports: {fifth:?}");
    let refused = agent.status().services[0].nat_port_exhausted.unwrap();
    assert!(refused >= 1, "refusals not counted");
    agent.wait_for_log("no free NAT source port", 1);
    // The held connections are untouched.
    for conn in &mut held {
        assert_eq!(conn.get(), "b1");
    }
    // Once they end (FIN, linger, a scan), their ports serve new flows again.
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let attempt = in_netns(&topology.ns("client"), move || get_new_connection_within(vip, Duration::from_secs(1)));
        if attempt.is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "ended flows never gave their ports back: {attempt:?}");
    }
    agent.stop();
}

// ---- backends from etcd, backup backends -------------------------------------

/// etcd's client URL in the harness: the switch namespace's backend-segment
/// address, reached by the LB (eth1) and every backend.
const ETCD: &str = "http://198.18.1.1:2379";
const REGISTRY_TTL_S: u64 = 2;

/// A real etcd (Debian's) in the switch namespace, data in a temp dir;
/// killed on drop.
struct Etcd {
    child: Option<Child>,
    ns: String,
    dir: TempDir,
    url: String,
    /// Server flags beyond the defaults (TLS).
    server_args: Vec<String>,
    /// etcdctl flags beyond the endpoint (CA, user).
    ctl_args: Vec<String>,
}

impl Etcd {
    fn start(topology: &Topology) -> Self {
        Self::start_with(topology, ETCD, Vec::new(), Vec::new())
    }

    fn start_with(topology: &Topology, url: &str, server_args: Vec<String>, ctl_args: Vec<String>) -> Self {
        let dir = std::env::temp_dir().join(format!("xdplb-etcd-{}", topology.prefix));
        std::fs::create_dir_all(&dir).unwrap();
        let mut etcd =
            Etcd { child: None, ns: topology.ns("sw"), dir: TempDir(dir), url: url.into(), server_args, ctl_args };
        etcd.restart();
        etcd
    }

    /// Starts etcd on the same data directory (after `kill`).
    fn restart(&mut self) {
        let peer = "http://127.0.0.1:2380";
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(["etcd", "--name", "t", "--data-dir"])
            .arg(self.dir.0.join("data"))
            .args(["--listen-client-urls", &self.url, "--advertise-client-urls", &self.url])
            .args(&self.server_args)
            .args(["--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer])
            .args(["--initial-cluster", &format!("t={peer}")])
            .stdout(Stdio::null())
            .stderr(File::create(self.dir.0.join("etcd.log")).unwrap())
            .spawn()
            .expect("starting etcd");
        self.child = Some(child);
        wait_until(
            Duration::from_secs(15),
            Duration::from_millis(100),
            || self.ctl_status(&["endpoint", "health"]).0,
            || "etcd did not come up".into(),
        );
    }

    fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }

    fn ctl_status(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.ns))
            .args(["etcdctl", "--endpoints", &self.url, "--dial-timeout", "1s", "--command-timeout", "2s"])
            .args(&self.ctl_args)
            .args(args)
            .env("ETCDCTL_API", "3")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
        )
    }

    fn ctl(&self, args: &[&str]) -> String {
        let (ok, out) = self.ctl_status(args);
        assert!(ok, "etcdctl {args:?}: {out}");
        out
    }

    /// The keys under the discovery prefix.
    fn keys(&self) -> Vec<String> {
        let out = self.ctl(&["get", "--prefix", "--keys-only", "/xdplb/services/"]);
        out.lines().filter(|l| !l.is_empty()).map(String::from).collect()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The agent's registry cache for this topology's pin directory.
fn discovery_cache(topology: &Topology) -> PathBuf {
    let pins = topology.pin_root().to_string_lossy().trim_matches('/').replace('/', "-");
    PathBuf::from(format!("/run/xdplb/discovery-{pins}.json"))
}

/// `xdplb register` on backend namespace `name` for its IPv4 address.
struct Sidecar {
    child: Option<Child>,
    log: PathBuf,
}

impl Sidecar {
    fn start(topology: &Topology, name: &str, address: &str, extra: &[&str]) -> Self {
        Self::start_with(topology, name, address, &[&["--etcd", ETCD][..], extra].concat())
    }

    /// `args` name the endpoint (and TLS, user) themselves.
    fn start_with(topology: &Topology, name: &str, address: &str, args: &[&str]) -> Self {
        let log = std::env::temp_dir().join(format!("xdplb-register-{}-{name}.log", topology.prefix));
        let ttl = REGISTRY_TTL_S.to_string();
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", topology.ns(name)))
            .args([XDPLB, "register", "--service", "web", "--address", address, "--ttl", &ttl])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(File::create(&log).unwrap())
            .spawn()
            .expect("starting xdplb register");
        Sidecar { child: Some(child), log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal`; returns the exit status and stdout.
    fn end(mut self, signal: &str) -> (std::process::ExitStatus, String) {
        let mut child = self.child.take().unwrap();
        assert!(Command::new("kill").args(["-s", signal, &child.id().to_string()]).status().unwrap().success());
        let mut out = String::new();
        child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
        (child.wait().unwrap(), out)
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn discovery_config(extra_agent: &str, static_backends: &str) -> String {
    format!(
        "[agent]\ninterface = \"eth0\"\n{extra_agent}\n[discovery]\netcd = [\"{ETCD}\"]\n\n\
         [[service]]\nname = \"web\"\nvip = \"{VIP4}\"\nprotocol = \"tcp\"\ndiscover = true\n\
         [service.health]\nkind = \"tcp\"\ninterval_ms = 300\ntimeout_ms = 200\nrise = 2\nfall = 3\n{static_backends}"
    )
}

/// Addresses of service web's backends, with their origin.
fn backends_of(agent: &Agent) -> BTreeMap<String, String> {
    let status = agent.status();
    let web = status.services.iter().find(|s| s.name == "web").expect("service web");
    web.backends.iter().map(|b| (b.address.to_string(), b.origin.name().to_string())).collect()
}

/// Polls until `check` holds for web's backends; returns how long it took.
fn until_backends(agent: &Agent, what: &str, check: impl Fn(&BTreeMap<String, String>) -> bool) -> Duration {
    let start = Instant::now();
    loop {
        let backends = backends_of(agent);
        if check(&backends) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{what}: never; backends {backends:?}; log:\n{}",
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn backends_follow_etcd_registrations_heartbeats_and_deregistration() {
    let topology = topology();
    let etcd = Etcd::start(&topology);
    let sidecars: Vec<Sidecar> = [("b1", BACKENDS4[0]), ("b2", BACKENDS4[1]), ("b3", BACKENDS4[2])]
        .map(|(n, a)| Sidecar::start(&topology, n, a, &[]))
        .into();
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || etcd.keys().len() >= 3,
        || format!("the sidecars did not register: {:?}", etcd.keys()),
    );
    let agent = Agent::start(&topology, &discovery_config("", ""));
    let backends = backends_of(&agent);
    assert_eq!(backends.values().filter(|o| *o == "etcd").count(), 3, "{backends:?}");
    let discovery = agent.status().discovery.expect("discovery status");
    assert!(discovery.up && discovery.backends == 3 && discovery.skipped.is_empty(), "{discovery:?}");
    assert_shares(&spread(&topology, VIP4, 300), [1, 1, 1], "three registered backends");
    let (ok, table, _) = agent.cli(&["status"]);
    assert!(ok && table.contains("ORIGIN") && table.contains("etcd"), "{table}");
    assert!(table.contains("discovery etcd http://198.18.1.1:2379 /xdplb/services/: up"), "{table}");

    // A fourth registers: it takes new connections within a second.
    let started = Instant::now();
    let b4 = Sidecar::start(&topology, "b4", "198.18.1.14", &["--weight", "2"]);
    let vip: SocketAddr = VIP4.parse().unwrap();
    let reached = in_netns(&topology.ns("client"), move || {
        loop {
            if get_new_connection(vip).unwrap() == "b4" {
                return started.elapsed();
            }
            assert!(started.elapsed() < Duration::from_secs(5), "b4 got no connection within 5 s");
        }
    });
    eprintln!(
        "measured: a newly registered backend got its first connection {reached:?} after `xdplb register` started"
    );
    assert!(reached < Duration::from_secs(1), "{reached:?}");
    assert!(b4.log_text().contains("registered /xdplb/services/web/198.18.1.14"), "{}", b4.log_text());

    // Malformed values are skipped and reported; the rest stays.
    etcd.ctl(&["put", "/xdplb/services/web/198.18.1.99", "weight=3"]);
    etcd.ctl(&["put", "/xdplb/services/web/2001:db8:1::15", "{}"]);
    etcd.ctl(&["put", "/xdplb/services/web/198.18.1.98", r#"{"weight": 5000}"#]);
    agent
        .wait_for_log("discovery: skipping /xdplb/services/web/198.18.1.99: the value \"weight=3\" is not the JSON", 1);
    agent.wait_for_log("discovery: skipping /xdplb/services/web/2001:db8:1::15: service \"web\": backend", 1);
    agent.wait_for_log("discovery: skipping /xdplb/services/web/198.18.1.98: weight 5000 is out of range", 1);
    let discovery = agent.status().discovery.unwrap();
    assert_eq!((discovery.backends, discovery.skipped.len()), (4, 3), "{discovery:?}");
    assert_eq!(backends_of(&agent).len(), 4);

    // SIGKILL a sidecar under a stream of new connections: its backend
    // leaves once the lease expires (TTL + 1 s at most), no request fails.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = steady_stream(&topology, VIP4, stop.clone());
    thread::sleep(Duration::from_millis(300));
    let [b1, b2, b3]: [Sidecar; 3] = sidecars.try_into().ok().unwrap();
    let (status, _) = b2.end("KILL");
    assert!(!status.success());
    let took = until_backends(&agent, "b2 gone after SIGKILL", |b| !b.contains_key(BACKENDS4[1]));
    eprintln!("measured: a SIGKILLed sidecar's backend left {took:?} after the kill (TTL {REGISTRY_TTL_S} s)");
    assert!(took <= Duration::from_secs(REGISTRY_TTL_S + 1), "{took:?}");
    agent.wait_for_log("backend 198.18.1.12 deregistered", 1);

    // SIGTERM: it deregisters, and the backend leaves at once.
    let terminated = Instant::now();
    let (status, out) = b3.end("TERM");
    assert!(status.success() && out.contains("deregistered /xdplb/services/web/198.18.2.13"), "{status} {out}");
    let took = until_backends(&agent, "b3 gone after SIGTERM", |b| !b.contains_key(BACKENDS4[2]));
    let took_total = terminated.elapsed();
    eprintln!("measured: a SIGTERMed sidecar's backend left {took_total:?} after the signal");
    assert!(took_total < Duration::from_millis(1000), "{took:?}");
    thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    eprintln!("measured: {} requests during the kill and the deregistration, {} failed", results.len(), failed.len());
    assert!(results.len() > 50 && failed.is_empty(), "{failed:?}");
    let counts = spread(&topology, VIP4, 60);
    assert!(!counts.contains_key("b2") && !counts.contains_key("b3") && counts.len() == 2, "{counts:?}");
    drop((b1, b4));
    agent.stop();
    let _ = std::fs::remove_file(discovery_cache(&topology));
}

/// A CA and a certificate for 198.18.1.1 signed by it, in `dir`:
/// ca.pem, server.pem, server.key.
fn test_certificates(dir: &Path) {
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let key = ["-newkey", "rsa:2048", "-nodes"];
    openssl(
        &[
            &["req", "-x509"][..],
            &key[..],
            &["-keyout", "ca.key", "-out", "ca.pem", "-days", "1", "-subj", "/CN=xdplb-test-ca"][..],
        ]
        .concat(),
    );
    std::fs::write(dir.join("ext"), "subjectAltName=IP:198.18.1.1\nextendedKeyUsage=serverAuth\n").unwrap();
    openssl(
        &[&["req"][..], &key[..], &["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=etcd"][..]].concat(),
    );
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "1",
        "-extfile",
        "ext",
    ]);
}

#[test]
fn discovery_and_registration_work_over_tls_with_etcd_users() {
    let topology = topology();
    let certs = TempDir(std::env::temp_dir().join(format!("xdplb-certs-{}", topology.prefix)));
    std::fs::create_dir_all(&certs.0).unwrap();
    test_certificates(&certs.0);
    let file = |name: &str| certs.0.join(name).to_str().unwrap().to_string();
    let url = "https://198.18.1.1:2379";
    let server_args = vec!["--cert-file".into(), file("server.pem"), "--key-file".into(), file("server.key")];
    let mut etcd = Etcd::start_with(&topology, url, server_args, vec!["--cacert".into(), file("ca.pem")]);
    // root, a read-only user for the LB, a writer for the backends.
    for args in [
        &["user", "add", "root:rootpw", "--interactive=false"][..],
        &["role", "add", "lb-read"],
        &["role", "grant-permission", "lb-read", "--prefix=true", "read", "/xdplb/services/"],
        &["role", "add", "backend-write"],
        &["role", "grant-permission", "backend-write", "--prefix=true", "readwrite", "/xdplb/services/"],
        &["user", "add", "xdplb:lbpw", "--interactive=false"],
        &["user", "grant-role", "xdplb", "lb-read"],
        &["user", "add", "backend:bepw", "--interactive=false"],
        &["user", "grant-role", "backend", "backend-write"],
        &["auth", "enable"],
    ] {
        etcd.ctl(args);
    }
    etcd.ctl_args.extend(["--user".to_string(), "root:rootpw".to_string()]);
    std::fs::write(certs.0.join("lb-password"), "lbpw\n").unwrap();
    std::fs::write(certs.0.join("backend-password"), "bepw\n").unwrap();
    let (ca, backend_password) = (file("ca.pem"), file("backend-password"));
    let args = ["--etcd", url, "--ca-file", &ca, "--username", "backend", "--password-file", &backend_password];
    let sidecar = Sidecar::start_with(&topology, "b1", BACKENDS4[0], &args);
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || !etcd.keys().is_empty(),
        || format!("the sidecar did not register over TLS: {}", sidecar.log_text()),
    );
    let discovery = format!(
        "[discovery]\netcd = [\"{url}\"]\nca_file = \"{}\"\nusername = \"xdplb\"\npassword_file = \"{}\"\n",
        file("ca.pem"),
        file("lb-password")
    );
    let config = discovery_config("", "").replace(&format!("[discovery]\netcd = [\"{ETCD}\"]\n"), &discovery);
    let agent = Agent::start(&topology, &config);
    assert_eq!(backends_of(&agent).get(BACKENDS4[0]).map(String::as_str), Some("etcd"), "{}", agent.log_text());
    assert!(agent.status().discovery.unwrap().up);
    assert_eq!(spread(&topology, VIP4, 20), BTreeMap::from([("b1".to_string(), 20)]));
    agent.stop();
    let (status, out) = sidecar.end("TERM");
    assert!(status.success() && out.contains("deregistered"), "{status} {out}");
    let _ = std::fs::remove_file(discovery_cache(&topology));
}

#[test]
fn the_pool_survives_an_etcd_outage_and_the_agent_catches_up_when_it_returns() {
    let topology = topology();
    let mut etcd = Etcd::start(&topology);
    let _sidecars: Vec<Sidecar> =
        [("b1", BACKENDS4[0]), ("b2", BACKENDS4[1])].map(|(n, a)| Sidecar::start(&topology, n, a, &[])).into();
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || etcd.keys().len() >= 2,
        || "the sidecars did not register".into(),
    );
    let metrics = "127.0.0.1:9594";
    let static_b3 = format!("\n[[service.backend]]\naddress = \"{}\"\n", BACKENDS4[2]);
    let agent = Agent::start(&topology, &discovery_config(&format!("metrics_listen = \"{metrics}\"\n"), &static_b3));
    let origins: Vec<String> = backends_of(&agent).into_values().collect();
    assert_eq!(origins, ["etcd", "etcd", "file"]);
    assert_eq!(metric(&scrape(&topology, metrics), "xdplb_discovery_up", "registry=\"etcd\""), 1.0);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = steady_stream(&topology, VIP4, stop.clone());
    etcd.kill();
    let down_after = Instant::now();
    while agent.status().discovery.unwrap().up {
        assert!(down_after.elapsed() < Duration::from_secs(10), "the agent did not notice etcd is gone");
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("measured: the agent reported etcd down {:?} after it was killed", down_after.elapsed());
    assert_eq!(metric(&scrape(&topology, metrics), "xdplb_discovery_up", "registry=\"etcd\""), 0.0);
    // Longer than the leases' TTL: the pool stays all the same.
    thread::sleep(Duration::from_secs(REGISTRY_TTL_S + 2));
    assert_eq!(backends_of(&agent).len(), 3);
    let (_, table, _) = agent.cli(&["status"]);
    assert!(table.contains("DOWN, keeping the last known pools"), "{table}");

    // etcd returns; a change is made before the agent's watch is back,
    // and the history before it is compacted away.
    etcd.restart();
    etcd.ctl(&["put", "/xdplb/services/web/198.18.1.14", r#"{"weight": 1}"#]);
    let revision = etcd.ctl(&["get", "/xdplb/services/web/198.18.1.14", "-w", "json"]);
    let revision: serde_json::Value = serde_json::from_str(&revision).unwrap();
    let revision = revision["header"]["revision"].as_i64().unwrap();
    etcd.ctl(&["compact", &revision.to_string()]);
    let took = until_backends(&agent, "b4 after etcd returned", |b| b.contains_key("198.18.1.14"));
    eprintln!("measured: the agent caught up {took:?} after etcd returned");
    wait_until(
        Duration::from_secs(10),
        Duration::from_millis(50),
        || agent.status().discovery.unwrap().up,
        || "discovery never came back up".into(),
    );
    assert_eq!(metric(&scrape(&topology, metrics), "xdplb_discovery_up", "registry=\"etcd\""), 1.0);
    thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    eprintln!("measured: {} requests across the etcd outage, {} failed", results.len(), failed.len());
    assert!(results.len() > 100 && failed.is_empty(), "{failed:?}");
    let log = agent.log_text();
    eprintln!(
        "resumed by: {}",
        if log.contains("was compacted") {
            "listing again (revision compacted)"
        } else {
            "the watch from its revision"
        }
    );
    assert_eq!(backends_of(&agent).len(), 4);
    agent.stop();

    // A restart while etcd is down starts from the cached pools; the
    // revision it resumes from has meanwhile been compacted away, so once
    // etcd is back it lists the prefix again and drops what was deleted.
    etcd.ctl(&["del", "/xdplb/services/web/198.18.1.14"]);
    // A write outside the prefix after it: compaction at the head leaves
    // the delete's own revision compacted (a watch starting exactly at a
    // compaction revision would not see tombstones of that revision).
    etcd.ctl(&["put", "/elsewhere/marker", "1"]);
    let status: serde_json::Value = serde_json::from_str(&etcd.ctl(&["endpoint", "status", "-w", "json"])).unwrap();
    let revision = status[0]["Status"]["header"]["revision"].as_i64().unwrap();
    etcd.ctl(&["compact", &revision.to_string()]);
    etcd.kill();
    let agent = Agent::start(&topology, &discovery_config(&format!("metrics_listen = \"{metrics}\"\n"), &static_b3));
    agent.wait_for_log("discovery: starting from the last known pools", 1);
    assert_eq!(backends_of(&agent).len(), 4, "the cached pools, etcd being down");
    assert!(!agent.status().discovery.unwrap().up);
    assert_eq!(spread(&topology, VIP4, 40).values().sum::<usize>(), 40);
    etcd.restart();
    let took = until_backends(&agent, "b4 gone after the re-listing", |b| !b.contains_key("198.18.1.14"));
    agent.wait_for_log("was compacted", 1);
    eprintln!("measured: after a restart on cached pools, the re-listing applied {took:?} after etcd returned");
    assert_eq!(backends_of(&agent).len(), 3);
    agent.stop();
    let _ = std::fs::remove_file(discovery_cache(&topology));
}

#[test]
fn backups_take_new_connections_only_while_no_primary_is_up_and_keep_theirs_after() {
    let topology = topology();
    let backup = format!("\n[[service.backend]]\naddress = \"{}\"\nbackup = true\n", BACKENDS4[2]);
    let agent = Agent::start(&topology, &(config_with_health(FAST_HTTP_HEALTH, &[(0, 1), (1, 1)], "") + &backup));
    let counts = spread(&topology, VIP4, 60);
    assert!(!counts.contains_key("b3") && counts.len() == 2, "primaries up: {counts:?}");
    assert!(!agent.status().services[0].backup_active);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = steady_stream(&topology, VIP4, stop.clone());
    kill_backend_server(&topology, "b1");
    kill_backend_server(&topology, "b2");
    wait_for_backend(&agent, BACKENDS4[0], "down", |b| b.health == Health::Down);
    let detected = wait_for_backend(&agent, BACKENDS4[1], "down", |b| b.health == Health::Down);
    thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();
    let after: Vec<_> = results.iter().filter(|(at, _)| *at > detected).collect();
    assert!(after.len() > 5, "too few requests after detection: {}", after.len());
    assert!(after.iter().all(|(_, r)| r.as_deref() == Ok("b3")), "after detection: {after:?}");
    let status = agent.status();
    assert!(status.services[0].backup_active && !status.services[0].fail_open);
    let (_, table, _) = agent.cli(&["status"]);
    assert!(table.contains("BACKUPS ACTIVE") && table.contains("file backup"), "{table}");
    assert_eq!(spread(&topology, VIP4, 30), BTreeMap::from([("b3".to_string(), 30)]));

    // A connection on the backup; then a primary returns.
    let mut long_lived = LongLived::open(&topology, VIP4);
    assert_eq!(long_lived.get(), "b3");
    start_backend_server(&topology, "b1");
    wait_for_backend(&agent, BACKENDS4[0], "up", |b| b.health == Health::Up);
    assert!(!agent.status().services[0].backup_active);
    assert_eq!(spread(&topology, VIP4, 30), BTreeMap::from([("b1".to_string(), 30)]));
    assert_eq!(long_lived.get(), "b3", "the established connection stays on the backup");
    agent.wait_for_log("new flows leave the backups", 1);
    agent.stop();
}

// ---- SYN floods -----------------------------------------------------------

const XDP_BASELINES_OBJ: &str = concat!(env!("OUT_DIR"), "/xdp-baselines");
/// SYNs the LB must have scheduled during a flood: twice the default
/// connection table.
const FLOOD_SYNS: u64 = 1_000_000;

/// The MAC address of `interface` in namespace `ns`.
fn mac_of(ns: &str, interface: &str) -> [u8; 6] {
    let out = Command::new("ip").args(["-n", ns, "-j", "link", "show", interface]).output().unwrap();
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let text = links[0]["address"].as_str().unwrap().to_string();
    let bytes: Vec<u8> = text.split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
    bytes.try_into().unwrap()
}

/// 20 keep-alive connections, a weight change, at least `FLOOD_SYNS` SYNs
/// with distinct sources from the client's segment at the generator's full
/// rate, another weight change: every connection must still answer from
/// its own backend.
/// `flood_mode`: the flood must push the LB into flood mode
/// (`syn_flood_threshold` set low enough).
fn established_connections_survive_a_syn_flood(agent_keys: &str, flood_mode: bool) {
    let topology = topology();
    let metrics = "127.0.0.1:9464";
    let with = |weights: &[(usize, u32)]| {
        config_with(weights).replacen("[agent]\n", &format!("[agent]\n{agent_keys}metrics_listen = \"{metrics}\"\n"), 1)
    };
    let agent = Agent::start(&topology, &with(&[(0, 1), (1, 1), (2, 1)]));
    let mut connections = LongLived::open_homed(&topology, VIP4, 20);
    agent.reload(&with(&[(0, 1), (1, 5), (2, 3)]));

    // SYNs from 198.19.0.0/16, each source address with each port in turn.
    let client = topology.ns("client");
    let (client_mac, lb_mac) = (mac_of(&client, "eth0"), mac_of(&topology.ns("lb"), "eth0"));
    let syn = lb_testkit::frames::tcp("198.19.0.0", 1024, "198.18.0.100", 80, lb_testkit::frames::SYN).bare();
    let mut frame = lb_testkit::frames::rewritten(&syn.checksummed(), lb_mac, client_mac);
    frame.resize(64, 0);
    let mut generator =
        lb_testkit::generator::Generator::load(Path::new(XDP_BASELINES_OBJ), &client, "eth0", 1, 65536).unwrap();
    let scheduled = || metric(&scrape(&topology, metrics), "xdplb_syn_scheduled_total", "") as u64;
    let before = scheduled();
    let (mut sending, started) = (Duration::ZERO, Instant::now());
    // Bounded: at most 20 batches of 250,000 and two minutes.
    for _ in 0..20 {
        sending += generator.send_count(&frame, 250_000, 2).unwrap();
        if scheduled() - before >= FLOOD_SYNS || started.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    let text = scrape(&topology, metrics);
    let (seen, flooded) = (
        metric(&text, "xdplb_syn_scheduled_total", "") as u64 - before,
        metric(&text, "xdplb_syn_flood_total", "") as u64,
    );
    let sent = generator.sent().unwrap();
    assert!(seen >= FLOOD_SYNS, "the LB scheduled only {seen} of {sent} SYNs sent");
    if flood_mode {
        assert!(flooded > 0, "{seen} SYNs never pushed the LB into flood mode");
    }
    eprintln!(
        "SYN flood ({agent_keys:?}): {sent} sent in {sending:?} ({:.0} SYN/s), {seen} scheduled by the LB, \
         {flooded} of them while flooded",
        sent as f64 / sending.as_secs_f64()
    );

    // The tables are full now; their scans (every 5 s) run beside the event
    // loop, which keeps answering at once.
    let mut latencies: Vec<Duration> = (0..24)
        .map(|_| {
            thread::sleep(Duration::from_millis(250));
            let asked = Instant::now();
            agent.status();
            asked.elapsed()
        })
        .collect();
    latencies.sort();
    eprintln!("status over 6 s after the flood: median {:?}, max {:?}", latencies[12], latencies[23]);
    assert!(latencies[23] < Duration::from_millis(250), "status took {:?}", latencies[23]);

    agent.reload(&with(&[(0, 3), (1, 1), (2, 1)]));
    for (i, (connection, home)) in connections.iter_mut().enumerate() {
        assert_eq!(&connection.get(), home, "connection {i} lost its backend after the flood");
    }
    // New connections still work, and half-open SYNs did not touch the
    // connection table: it holds the 20 and what was just opened.
    assert_eq!(spread(&topology, VIP4, 30).values().sum::<usize>(), 30);
    agent.stop();
}

#[test]
fn established_connections_survive_a_million_syn_flood_at_the_default_table_size() {
    // Default threshold: the flood stays below it on this machine, so the
    // half-open table takes every SYN.
    established_connections_survive_a_syn_flood("", false);
}

#[test]
fn established_connections_survive_a_million_syn_flood_with_a_4096_entry_table_in_flood_mode() {
    established_connections_survive_a_syn_flood("conntrack_size = 4096\nsyn_flood_threshold = 10000\n", true);
}

// ---- fault loops ----------------------------------------------------------

/// A stream request: when it started, and the backend that answered.
type StreamRequest = (Instant, Result<String, String>);

/// What the stream's requests came to: (requests, failures).
fn tally_stream(results: &[StreamRequest]) -> (usize, Vec<&StreamRequest>) {
    (results.len(), results.iter().filter(|(_, r)| r.is_err()).collect())
}

#[test]
fn ten_sigkill_restarts_and_fifty_reloads_under_new_connections_fail_no_request() {
    let topology = topology();
    let initial = config([1, 1, 1]);
    let mut agent = Agent::start(&topology, &initial);
    let mut long_lived = LongLived::open_homed(&topology, VIP4, 3);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Each restart loads and verifies the program (seconds): room for all.
    let stream = steady_stream_for(&topology, VIP4, stop.clone(), Duration::from_secs(300));
    thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    for kill in 0..10 {
        agent.kill();
        thread::sleep(Duration::from_millis(100));
        agent = Agent::start(&topology, &initial);
        assert!(agent.log_text().contains("adopting the pinned state"), "restart {kill}: {}", agent.log_text());
        for (c, home) in &mut long_lived {
            assert_eq!(c.get(), *home, "restart {kill}: a long-lived connection moved");
        }
    }
    let restarts = started.elapsed();
    let started = Instant::now();
    for reload in 0..50 {
        let weights = if reload % 2 == 0 { [1, 2, 3] } else { [3, 2, 1] };
        agent.reload(&config(weights));
    }
    let reloads = started.elapsed();
    for (c, home) in &mut long_lived {
        assert_eq!(c.get(), *home, "a long-lived connection moved during the reloads");
    }
    let ended = Instant::now();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();
    let (requests, failed) = tally_stream(&results);
    assert!(
        results.last().is_some_and(|(t, _)| ended.duration_since(*t) < Duration::from_secs(2)),
        "the stream of new connections ended before the loops did"
    );
    eprintln!(
        "measured: 10 SIGKILL restarts in {restarts:?}, 50 reloads in {reloads:?}: {requests} new connections, {} failed",
        failed.len()
    );
    assert!(requests > 200, "only {requests} requests");
    assert!(failed.is_empty(), "{} of {requests} requests failed: {:?}", failed.len(), failed.first());
    agent.stop();
}

#[test]
fn a_backend_flapping_every_300ms_fails_requests_only_before_its_first_fall() {
    let topology = topology();
    // A rise longer than the flapping backend stays up: once down, it stays out.
    let health = "\n[service.health]\nkind = \"tcp\"\ninterval_ms = 100\ntimeout_ms = 80\nrise = 5\nfall = 2\n";
    let agent = Agent::start(&topology, &config_with_health(health, &[(0, 1), (1, 1), (2, 1)], ""));
    wait_for_backend(&agent, BACKENDS4[1], "probed", |b| b.last_probe.as_ref().is_some_and(|p| p.ok));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stream = steady_stream(&topology, VIP4, stop.clone());
    // b2 flaps: every 300 ms, lb-ebpf's XDP_DROP baseline is attached to
    // its interface or detached again (while attached, it answers nothing).
    let flapping = {
        let (stop, ns) = (stop.clone(), topology.ns("b2"));
        thread::spawn(move || {
            lb_testkit::enter(&ns).unwrap();
            let mut ebpf = aya::Ebpf::load_file(XDP_BASELINES_OBJ).unwrap();
            let drop: &mut aya::programs::Xdp = ebpf.program_mut("bench_drop").unwrap().try_into().unwrap();
            drop.load().unwrap();
            let mut flaps = 0;
            // Bounded: 20 flaps (6 s).
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && flaps < 20 {
                let link = drop.attach("eth0", aya::programs::XdpMode::default()).unwrap();
                thread::sleep(Duration::from_millis(300));
                drop.detach(link).unwrap();
                thread::sleep(Duration::from_millis(300));
                flaps += 2;
            }
            flaps
        })
    };
    let first_fall = wait_for_backend(&agent, BACKENDS4[1], "down", |b| b.health == Health::Down);
    // Watched while it flaps, not after: once the flapping stops the backend
    // answers again, and rising then is right.
    let mut came_back = None;
    while !flapping.is_finished() {
        let backend = agent.backend("web", BACKENDS4[1]);
        if backend.health != Health::Down {
            came_back.get_or_insert((first_fall.elapsed(), backend.health));
        }
        thread::sleep(Duration::from_millis(20));
    }
    let flaps = flapping.join().unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let results = stream.join().unwrap();
    let (requests, failed) = tally_stream(&results);
    let late: Vec<_> = failed.iter().filter(|(t, _)| *t > first_fall).collect();
    eprintln!(
        "measured: {flaps} flaps of 300 ms, {requests} new connections, {} failed, all before the first fall: {}",
        failed.len(),
        late.is_empty()
    );
    assert!(requests > 100, "only {requests} requests");
    assert!(late.is_empty(), "{} requests failed after the first fall: {:?}", late.len(), late.first());
    assert_eq!(came_back, None, "the flapping backend came back while flapping (time after its first fall, health)");
    agent.stop();
}
