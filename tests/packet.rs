//! Packet-level tests of the real XDP program, loaded into the kernel and run
//! with BPF_PROG_TEST_RUN. Maps are programmed through the same
//! `Reconciler` → `Dataplane::apply` path the agent uses.
//!
//! Each test runs in a network namespace of its own (a thread-level
//! `unshare`), where test runs see `lo` as the ingress interface and a dummy
//! device serves as the XDP_REDIRECT target. Needs root.

use std::{collections::BTreeMap, net::IpAddr, process::Command, thread, time::Duration};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{FlowKey, GlobalCounter};
use lb_testkit::frames::{
    ACK, CLIENT_MAC, FIN_ACK, Frame, LB_MAC, PSH_ACK, RST, SYN, Tunnel, dst_mac, encapsulated, internet_checksum,
    rewritten, tcp, udp,
};
use xdplb::{
    config::{BackendAddress, Forwarding, PortRange, Protocol, Scheduler},
    dataplane::planner::{MapWrite, Reconciler, address_words},
    dataplane::{Dataplane, DataplaneParams, DebugLog, TablesInUse},
    netlink::L2Path,
    state::{DesiredBackend, DesiredNat, DesiredService},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const EGRESS_MAC: [u8; 6] = [0x02, 0x1b, 0, 0, 0, 0xee];
const RING: u32 = 1021;

fn backend_mac(n: u8) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, n]
}

/// The connection-table key of a TCP packet from `src:sport` to `dst:dport`.
fn tcp_key(src: &str, sport: u16, dst: &str, dport: u16) -> FlowKey {
    let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    FlowKey {
        src: address_words(src),
        dst: address_words(dst),
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto: lb_common::PROTO_TCP,
        family: if src.is_ipv4() { lb_common::FAMILY_IPV4 } else { lb_common::FAMILY_IPV6 },
        _pad: [0; 2],
    }
}

/// A test world: its own netns, a loaded program, and a reconciler.
struct World {
    dataplane: Dataplane,
    reconciler: Reconciler,
    dummy_ifindex: u32,
}

impl World {
    fn new() -> Self {
        Self::with_udp_timeout(Duration::from_secs(30))
    }

    fn with_udp_timeout(udp_idle_timeout: Duration) -> Self {
        Self::with(udp_idle_timeout, lb_common::DEFAULT_SYN_FLOOD_THRESHOLD)
    }

    fn with(udp_idle_timeout: Duration, syn_flood_threshold: u64) -> Self {
        Self::sized(udp_idle_timeout, syn_flood_threshold, 4096)
    }

    fn sized(udp_idle_timeout: Duration, syn_flood_threshold: u64, conntrack_size: u32) -> Self {
        lb_testkit::isolate_thread().unwrap();
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", "xdplbtest0", "type", "veth", "peer", "name", "xdplbtest1"],
            &["link", "set", "xdplbtest0", "up"],
        ] {
            let status = Command::new("ip").args(args).status().expect("ip");
            assert!(status.success(), "ip {args:?}");
        }
        let dummy_ifindex = std::fs::read_to_string("/sys/class/net/xdplbtest0/ifindex")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| ifindex_via_ip("xdplbtest0"));
        let params = DataplaneParams {
            ring_size: RING,
            max_services: 8,
            conntrack_size,
            nat_table_size: 4096,
            udp_idle_timeout_ns: udp_idle_timeout.as_nanos() as u64,
            syn_flood_threshold,
            sync_flows: false,
            pin_dir: None,
            tables: TablesInUse::ALL,
        };
        World {
            dataplane: Dataplane::load(params, DebugLog::Off).expect("load XDP program"),
            reconciler: Reconciler::new(RING, 8),
            dummy_ifindex,
        }
    }

    fn set(&mut self, services: &[DesiredService]) {
        let (writes, errors) = self.reconciler.plan(services);
        assert!(errors.is_empty(), "{errors:?}");
        self.dataplane.apply(&writes).expect("apply");
    }

    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
        let result = self.dataplane.program().unwrap().test_run(opts).expect("test_run");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn counter(&self, which: GlobalCounter) -> u64 {
        self.dataplane.global_counters().unwrap().into_iter().find(|(c, _)| *c == which).unwrap().1
    }

    fn flows(&self) -> Vec<FlowKey> {
        self.dataplane.flows().unwrap().into_iter().map(|(k, _)| k).collect()
    }

    /// Keys of the half-open table (SYNs waiting for their ACK).
    fn half_open(&self) -> Vec<FlowKey> {
        self.dataplane.half_open_flows().unwrap().into_iter().map(|(k, _)| k).collect()
    }

    /// The MAC of the backend a Maglev service's ring names for `key`, read
    /// from the maps: what the program must have chosen.
    fn maglev_mac(&self, service: &str, key: &FlowKey) -> [u8; 6] {
        let vip_id = self.reconciler.vip_id(service).expect("service");
        let state = self.dataplane.read_state().unwrap();
        let ring = &state.rings[&vip_id];
        let backend_id = ring[(lb_common::flow_hash(key) % RING) as usize];
        state.backends.iter().find(|(id, _)| *id == backend_id).expect("ring names a backend in use").1.dst_mac
    }

    /// A backend reached through `lo` (the test-run ingress): XDP_TX.
    fn tx_backend(&self, address: &str, n: u8, weight: u32) -> DesiredBackend {
        self.backend_on(1, address, n, weight)
    }

    /// A backend behind the veth device: XDP_REDIRECT.
    fn redirect_backend(&self, address: &str, n: u8) -> DesiredBackend {
        self.backend_on(self.dummy_ifindex, address, n, 1)
    }

    fn backend_on(&self, ifindex: u32, address: &str, n: u8, weight: u32) -> DesiredBackend {
        let src_mac = if ifindex == 1 { LB_MAC } else { EGRESS_MAC };
        DesiredBackend {
            address: address.parse().unwrap(),
            weight,
            path: Some(L2Path { ifindex, src_mac, dst_mac: backend_mac(n), mtu: 1500, source: None }),
            down: false,
        }
    }
}

fn ifindex_via_ip(name: &str) -> u32 {
    let out = Command::new("ip").args(["-o", "link", "show", name]).output().expect("ip");
    String::from_utf8_lossy(&out.stdout).split(':').next().unwrap().trim().parse().unwrap()
}

fn service(name: &str, vip: &str, protocol: Protocol, backends: Vec<DesiredBackend>) -> DesiredService {
    DesiredService::dsr(name, vip.parse().unwrap(), protocol, backends)
}

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "2001:db8::100";

fn web4(w: &World) -> DesiredService {
    service(
        "web",
        "198.18.0.100:80",
        Protocol::Tcp,
        vec![
            w.tx_backend("198.18.1.11", 11, 1),
            w.tx_backend("198.18.1.12", 12, 1),
            w.tx_backend("198.18.1.13", 13, 1),
        ],
    )
}

fn web6(w: &World) -> DesiredService {
    service(
        "web6",
        "[2001:db8::100]:80",
        Protocol::Tcp,
        vec![
            w.tx_backend("2001:db8:0:2::11", 11, 1),
            w.tx_backend("2001:db8:0:2::12", 12, 1),
            w.tx_backend("2001:db8:0:2::13", 13, 1),
        ],
    )
}

fn in_world(test: impl FnOnce() + Send + 'static) {
    // A thread of its own: unshare() changes the calling thread's namespace.
    thread::spawn(test).join().unwrap_or_else(|e| std::panic::resume_unwind(e));
}

// ---- tests ----------------------------------------------------------------

#[test]
fn ipv4_tcp_syn_ack_rst_are_forwarded_with_only_macs_rewritten() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w)]);
        let syn = tcp("198.18.0.2", 40000, VIP4, 80, SYN).bytes();
        let (action, out) = w.run(&syn);
        assert_eq!(action, XDP_TX);
        let chosen = dst_mac(&out);
        assert!([11, 12, 13].map(backend_mac).contains(&chosen), "{chosen:02x?}");
        assert_eq!(chosen, w.maglev_mac("web", &tcp_key("198.18.0.2", 40000, VIP4, 80)));
        assert_eq!(out, rewritten(&syn, chosen, LB_MAC));
        // A SYN is recorded half-open; it never writes the connection table.
        assert!(w.flows().is_empty());
        assert_eq!(w.half_open().len(), 1);
        assert_eq!(w.counter(GlobalCounter::SynScheduled), 1);
        assert_eq!(w.counter(GlobalCounter::ConntrackMiss), 0);

        // The client's ACK moves the flow to the connection table, same backend.
        let ack = tcp("198.18.0.2", 40000, VIP4, 80, PSH_ACK).bytes();
        let (action, out) = w.run(&ack);
        assert_eq!((action, out), (XDP_TX, rewritten(&ack, chosen, LB_MAC)));
        assert_eq!(w.counter(GlobalCounter::HalfOpenPromoted), 1);
        assert_eq!((w.flows().len(), w.half_open().len()), (1, 0));
        let (action, out) = w.run(&ack);
        assert_eq!((action, out), (XDP_TX, rewritten(&ack, chosen, LB_MAC)));
        assert_eq!(w.counter(GlobalCounter::ConntrackHit), 1);

        let rst = tcp("198.18.0.2", 40000, VIP4, 80, RST).bytes();
        let (action, out) = w.run(&rst);
        assert_eq!((action, out), (XDP_TX, rewritten(&rst, chosen, LB_MAC)));
        assert_eq!(w.counter(GlobalCounter::ActionTx), 4);
    });
}

#[test]
fn rst_of_an_unknown_flow_is_forwarded_but_never_pinned() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w)]);
        let rst = tcp("198.18.0.2", 40001, VIP4, 80, RST | ACK).bytes();
        let (action, _) = w.run(&rst);
        assert_eq!(action, XDP_TX);
        assert!(w.flows().is_empty(), "a RST created a connection-table entry");
        assert_eq!(w.counter(GlobalCounter::ConntrackMiss), 1);
    });
}

#[test]
fn ipv6_tcp_syn_ack_rst() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web6(&w)]);
        let syn = tcp("2001:db8:0:1::2", 40000, VIP6, 80, SYN).bytes();
        let (action, out) = w.run(&syn);
        assert_eq!(action, XDP_TX);
        let chosen = dst_mac(&out);
        assert_eq!(chosen, w.maglev_mac("web6", &tcp_key("2001:db8:0:1::2", 40000, VIP6, 80)));
        assert_eq!(out, rewritten(&syn, chosen, LB_MAC));
        let ack = tcp("2001:db8:0:1::2", 40000, VIP6, 80, ACK).bytes();
        assert_eq!(w.run(&ack), (XDP_TX, rewritten(&ack, chosen, LB_MAC)));
        let flows = w.flows();
        assert_eq!(flows.len(), 1);
        assert_eq!(flows[0].dst, address_words(VIP6.parse().unwrap()));
        // RST of the pinned flow follows it; RST of an unknown flow pins nothing.
        let rst = tcp("2001:db8:0:1::2", 40000, VIP6, 80, RST).bytes();
        assert_eq!(w.run(&rst), (XDP_TX, rewritten(&rst, chosen, LB_MAC)));
        let stray = tcp("2001:db8:0:1::2", 40001, VIP6, 80, RST).bytes();
        assert_eq!(w.run(&stray).0, XDP_TX);
        assert_eq!(w.flows().len(), 1);
    });
}

#[test]
fn udp_vip_and_tcp_vip_on_the_same_address_are_distinct() {
    in_world(|| {
        let mut w = World::new();
        let dns = service("dns", "198.18.0.100:53", Protocol::Udp, vec![w.tx_backend("198.18.1.21", 21, 1)]);
        w.set(&[web4(&w), dns]);
        let query = udp("198.18.0.2", 5353, VIP4, 53).bytes();
        assert_eq!(w.run(&query), (XDP_TX, rewritten(&query, backend_mac(21), LB_MAC)));
        // TCP to port 53 is not a VIP: passed untouched.
        let tcp53 = tcp("198.18.0.2", 5353, VIP4, 53, SYN).bytes();
        assert_eq!(w.run(&tcp53), (XDP_PASS, tcp53.clone()));
        // UDP to port 80 neither.
        let udp80 = udp("198.18.0.2", 5353, VIP4, 80).bytes();
        assert_eq!(w.run(&udp80), (XDP_PASS, udp80.clone()));
        let udp6 = udp("2001:db8:0:1::2", 5353, VIP6, 53).bytes();
        assert_eq!(w.run(&udp6), (XDP_PASS, udp6.clone()));
    });
}

#[test]
fn ipv6_udp_vip() {
    in_world(|| {
        let mut w = World::new();
        let dns = service("dns6", "[2001:db8::100]:53", Protocol::Udp, vec![w.tx_backend("2001:db8:0:2::21", 21, 1)]);
        w.set(&[dns]);
        let query = udp("2001:db8:0:1::2", 5353, VIP6, 53).bytes();
        assert_eq!(w.run(&query), (XDP_TX, rewritten(&query, backend_mac(21), LB_MAC)));
    });
}

#[test]
fn vlan_tagged_frames_keep_their_tag() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w), web6(&w)]);
        for (frame, service, client, vip) in [
            (tcp("198.18.0.2", 40000, VIP4, 80, SYN), "web", "198.18.0.2", VIP4),
            (tcp("2001:db8:0:1::2", 40000, VIP6, 80, SYN), "web6", "2001:db8:0:1::2", VIP6),
        ] {
            let tagged = Frame { vlan: Some(0x0064), ..frame }.bytes();
            let (action, out) = w.run(&tagged);
            assert_eq!(action, XDP_TX);
            let chosen = w.maglev_mac(service, &tcp_key(client, 40000, vip, 80));
            assert_eq!(out, rewritten(&tagged, chosen, LB_MAC));
            assert_eq!(&out[12..16], &[0x81, 0x00, 0x00, 0x64]);
        }
    });
}

#[test]
fn non_vip_traffic_passes_untouched() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w)]);
        let frames = [
            tcp("198.18.0.2", 40000, "198.18.0.101", 80, SYN).bytes(),
            tcp("198.18.0.2", 40000, VIP4, 81, SYN).bytes(),
            tcp("2001:db8:0:1::2", 40000, VIP6, 80, SYN).bytes(),
        ];
        for frame in &frames {
            assert_eq!(w.run(frame), (XDP_PASS, frame.clone()));
        }
        // ARP is not IP at all.
        let mut arp = rewritten(&frames[0][..42], LB_MAC, CLIENT_MAC);
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert_eq!(w.run(&arp), (XDP_PASS, arp.clone()));
        assert_eq!(w.counter(GlobalCounter::PassNonVip), 3);
        assert_eq!(w.counter(GlobalCounter::PassUnparsed), 1);
        assert!(w.flows().is_empty());
    });
}

#[test]
fn wildcard_vip_takes_every_port_but_exact_vip_wins() {
    in_world(|| {
        let mut w = World::new();
        let any = service("any", "198.18.0.100:0", Protocol::Tcp, vec![w.tx_backend("198.18.1.31", 31, 1)]);
        let exact = service("exact", "198.18.0.100:443", Protocol::Tcp, vec![w.tx_backend("198.18.1.32", 32, 1)]);
        w.set(&[any, exact]);
        for port in [80, 8080, 22] {
            let f = tcp("198.18.0.2", 40000, VIP4, port, SYN).bytes();
            assert_eq!(w.run(&f), (XDP_TX, rewritten(&f, backend_mac(31), LB_MAC)), "port {port}");
        }
        let f = tcp("198.18.0.2", 40000, VIP4, 443, SYN).bytes();
        assert_eq!(w.run(&f), (XDP_TX, rewritten(&f, backend_mac(32), LB_MAC)));
    });
}

#[test]
fn truncated_frames_at_every_boundary_pass_without_faults() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w), web6(&w)]);
        let frames = [
            Frame { vlan: Some(7), payload: vec![], ..tcp("198.18.0.2", 40000, VIP4, 80, SYN) }.bytes(),
            Frame { payload: vec![], ..tcp("2001:db8:0:1::2", 40000, VIP6, 80, SYN) }.bytes(),
            Frame { payload: vec![], ..udp("198.18.0.2", 40000, VIP4, 80) }.bytes(),
        ];
        let mut runs = 0;
        for full in &frames {
            // The kernel refuses test runs shorter than an Ethernet header.
            for len in 14..full.len() {
                let cut = &full[..len];
                assert_eq!(w.run(cut), (XDP_PASS, cut.to_vec()), "frame cut to {len} bytes");
                runs += 1;
            }
        }
        assert_eq!(w.counter(GlobalCounter::PassUnparsed), runs);
        assert!(w.flows().is_empty());
    });
}

#[test]
fn ipv4_options_are_skipped_and_bad_ihl_is_rejected() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w)]);
        for words in [1, 3, 10] {
            let f =
                Frame { ipv4_option_words: words, ..tcp("198.18.0.2", 40000 + words as u16, VIP4, 80, SYN) }.bytes();
            let (action, out) = w.run(&f);
            assert_eq!(action, XDP_TX, "IHL {}", 5 + words);
            let chosen = w.maglev_mac("web", &tcp_key("198.18.0.2", 40000 + words as u16, VIP4, 80));
            assert_eq!(out, rewritten(&f, chosen, LB_MAC));
        }
        let mut bad = tcp("198.18.0.2", 40000, VIP4, 80, SYN).bytes();
        bad[14] = 0x44; // IHL 4 < 5
        assert_eq!(w.run(&bad), (XDP_PASS, bad.clone()));
        let keys = w.half_open();
        assert_eq!(keys.len(), 3);
        assert!(keys.iter().all(|k| u16::from_be(k.dport) == 80));
    });
}

#[test]
fn fragments_to_a_vip_address_are_dropped_and_counted() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w), web6(&w)]);
        for frag in [0x2000u16 /* MF, offset 0 */, 0x0010 /* last fragment */] {
            let f = Frame { frag, ..tcp("198.18.0.2", 40000, VIP4, 80, SYN) }.bytes();
            assert_eq!(w.run(&f).0, XDP_DROP);
            let other = Frame { frag, ..tcp("198.18.0.2", 40000, "198.18.0.101", 80, SYN) }.bytes();
            assert_eq!(w.run(&other), (XDP_PASS, other.clone()));
        }
        // DF alone is not a fragment.
        let df = Frame { frag: 0x4000, ..tcp("198.18.0.2", 40000, VIP4, 80, SYN) }.bytes();
        assert_eq!(w.run(&df).0, XDP_TX);
        assert_eq!(w.counter(GlobalCounter::DropFragment), 2);

        let ext = Frame { ipv6_next_header: Some(0), ..tcp("2001:db8:0:1::2", 40000, VIP6, 80, SYN) }.bytes();
        assert_eq!(w.run(&ext).0, XDP_DROP);
        let ext_other =
            Frame { ipv6_next_header: Some(60), ..tcp("2001:db8:0:1::2", 40000, "2001:db8::101", 80, SYN) }.bytes();
        assert_eq!(w.run(&ext_other), (XDP_PASS, ext_other.clone()));
        assert_eq!(w.counter(GlobalCounter::DropIpv6ExtHeader), 1);
    });
}

#[test]
fn a_table_larger_than_one_read_batch_is_read_whole() {
    in_world(|| {
        // One CPU: each CPU's LRU list holds its share of the table.
        pin_to_one_cpu();
        let mut w = World::sized(Duration::from_secs(30), lb_common::DEFAULT_SYN_FLOOD_THRESHOLD, 32768);
        w.set(&[web4(&w)]);
        // 10,000 flows: the agent reads 4096 entries per syscall at first,
        // so the read takes several batches and carries its position on.
        let mut sent = std::collections::HashSet::new();
        for i in 0..10_000u16 {
            let (client, port) = (format!("198.18.0.{}", 2 + i / 5000), 20000 + i % 5000);
            let (action, _) = w.run(&tcp(&client, port, VIP4, 80, ACK).bytes());
            assert_eq!(action, XDP_TX);
            sent.insert(tcp_key(&client, port, VIP4, 80));
        }
        let flows = w.dataplane.flows().unwrap();
        assert_eq!(flows.len(), 10_000, "entries read more than once or missed");
        let read: std::collections::HashSet<FlowKey> = flows.iter().map(|(k, _)| *k).collect();
        assert!(read == sent, "the table read is not the flows sent");
        let backends: std::collections::HashSet<u32> = flows.iter().map(|(_, v)| v.backend_id).collect();
        assert_eq!(backends.len(), 3, "{backends:?}");
    });
}

#[test]
fn backend_behind_another_interface_is_redirected() {
    in_world(|| {
        let mut w = World::new();
        let remote = service("remote", "198.18.0.100:80", Protocol::Tcp, vec![w.redirect_backend("198.18.1.41", 41)]);
        w.set(&[remote]);
        let syn = tcp("198.18.0.2", 40000, VIP4, 80, SYN).bytes();
        assert_eq!(w.run(&syn), (XDP_REDIRECT, rewritten(&syn, backend_mac(41), EGRESS_MAC)));
        assert_eq!(w.counter(GlobalCounter::ActionRedirect), 1);
    });
}

#[test]
fn service_without_backends_drops() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[service("empty", "198.18.0.100:80", Protocol::Tcp, vec![])]);
        let syn = tcp("198.18.0.2", 40000, VIP4, 80, SYN).bytes();
        assert_eq!(w.run(&syn).0, XDP_DROP);
        assert_eq!(w.counter(GlobalCounter::DropNoBackend), 1);
    });
}

#[test]
fn established_flows_keep_their_backend_when_the_ring_changes() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w)]);
        // Open 60 flows and remember where each went: the even ones
        // established (SYN, ACK), the odd ones still in their handshake.
        let mut pinned = Vec::new();
        for port in 0..60u16 {
            let (_, out) = w.run(&tcp("198.18.0.2", 41000 + port, VIP4, 80, SYN).bytes());
            pinned.push(dst_mac(&out));
            if port % 2 == 0 {
                w.run(&tcp("198.18.0.2", 41000 + port, VIP4, 80, ACK).bytes());
            }
        }
        assert_eq!((w.flows().len(), w.half_open().len()), (30, 30));
        let victim = pinned[0];
        // Rewrite the ring: remove the first flow's backend, add two, change weights.
        let n = victim[5];
        let mut backends: Vec<DesiredBackend> = [11u8, 12, 13]
            .into_iter()
            .filter(|b| *b != n)
            .map(|b| w.tx_backend(&format!("198.18.1.{b}"), b, 3))
            .collect();
        backends.push(w.tx_backend("198.18.1.14", 14, 1));
        backends.push(w.tx_backend("198.18.1.15", 15, 2));
        w.set(&[service("web", "198.18.0.100:80", Protocol::Tcp, backends)]);

        for (port, mac) in (0..60u16).zip(&pinned) {
            let ack = tcp("198.18.0.2", 41000 + port, VIP4, 80, ACK).bytes();
            assert_eq!(w.run(&ack), (XDP_TX, rewritten(&ack, *mac, LB_MAC)), "flow {port} moved");
        }
        assert_eq!(w.counter(GlobalCounter::HalfOpenPromoted), 60);
        // A SYN on a live flow's five-tuple (spoofed, or a client that lost
        // its connection) does not move it: its backend answers as TCP does.
        let (_, out) = w.run(&tcp("198.18.0.2", 41000, VIP4, 80, SYN).bytes());
        assert_eq!(dst_mac(&out), victim);
        assert_eq!(w.counter(GlobalCounter::SynToEstablished), 1);
        // Once the client ended it, a SYN on the five-tuple is a new
        // connection: it follows the new ring.
        w.run(&tcp("198.18.0.2", 41000, VIP4, 80, FIN_ACK).bytes());
        let (_, out) = w.run(&tcp("198.18.0.2", 41000, VIP4, 80, SYN).bytes());
        assert_ne!(dst_mac(&out), victim);
        // New flows now reach the added backends.
        let mut seen = std::collections::HashSet::new();
        for port in 0..200u16 {
            let (_, out) = w.run(&tcp("198.18.0.3", 42000 + port, VIP4, 80, SYN).bytes());
            seen.insert(dst_mac(&out)[5]);
        }
        assert!(seen.contains(&14) && seen.contains(&15) && !seen.contains(&n), "{seen:?}");
    });
}

#[test]
fn idle_udp_flows_are_scheduled_afresh_and_busy_ones_never_are() {
    in_world(|| {
        // udp_idle_timeout_s = 1 as the agent gives it to the data plane:
        // a flow's time is refreshed at most once a second, so a flow that
        // sends every 0.7 s may hold a time 1.4 s old.
        let timeout = Duration::from_nanos(xdplb::config::idle_timeout_ns(1));
        let mut w = World::with_udp_timeout(timeout);
        let dns = |w: &World, b: u8| {
            service("dns", "198.18.0.100:53", Protocol::Udp, vec![w.tx_backend(&format!("198.18.1.{b}"), b, 1)])
        };
        w.set(&[dns(&w, 21)]);
        let query = udp("198.18.0.2", 5353, VIP4, 53).bytes();
        assert_eq!(dst_mac(&w.run(&query).1), backend_mac(21));
        w.set(&[dns(&w, 22)]);
        // Within the timeout the flow stays where it was.
        for round in 0..4 {
            thread::sleep(Duration::from_millis(700));
            assert_eq!(dst_mac(&w.run(&query).1), backend_mac(21), "round {round}: a live flow was taken for idle");
        }
        // Idle past the timeout (and a refresh interval): a new flow,
        // through the new ring.
        thread::sleep(timeout + Duration::from_millis(200));
        assert_eq!(dst_mac(&w.run(&query).1), backend_mac(22));
    });
}

#[test]
fn idle_udp_nat_flows_are_scheduled_afresh_with_a_new_translation() {
    in_world(|| {
        let mut w = World::with_udp_timeout(Duration::from_secs(1));
        w.route_clients();
        let dns = |w: &World, b: u8| {
            let backend = w.nat_backend(&format!("198.18.1.{b}:53"), b);
            nat_service("dns", "198.18.0.100:53", Protocol::Udp, vec![backend], "40000-40009")
        };
        w.set(&[dns(&w, 21)]);
        let query = udp("198.18.0.2", 5353, VIP4, 53).checksummed();
        let (action, out) = w.run(&query);
        assert_eq!((action, dst_mac(&out)), (XDP_TX, backend_mac(21)));
        let translation = |w: &World| {
            let (flows, _) = w.dataplane.nat_tables().unwrap();
            assert_eq!(flows.len(), 1, "{flows:?}");
            flows[0].1
        };
        assert_ne!(translation(&w).flags & lb_common::NAT_FLOW_F_PINNED, 0);
        assert!(w.flows().is_empty(), "a NAT flow was pinned in the connection table");
        w.set(&[dns(&w, 22)]);
        // Within the timeout the flow keeps its (now retired) backend.
        thread::sleep(Duration::from_millis(600));
        assert_eq!(dst_mac(&w.run(&query).1), backend_mac(21));
        thread::sleep(Duration::from_millis(1600));
        // Idle past the timeout: a new flow, through the new ring, with a
        // translation to its backend.
        assert_eq!(dst_mac(&w.run(&query).1), backend_mac(22));
        let id = w.reconciler.backend_id("dns", "198.18.1.22:53".parse().unwrap()).unwrap();
        assert_eq!(translation(&w).backend_id, id);
        assert_eq!(dst_mac(&w.run(&query).1), backend_mac(22));
    });
}

#[test]
fn flows_pinned_to_a_down_backend_move_on_their_next_packet_and_stay_moved() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w)]);
        let pinned: Vec<[u8; 6]> =
            (0..60u16).map(|port| dst_mac(&w.run(&tcp("198.18.0.2", 43000 + port, VIP4, 80, SYN).bytes()).1)).collect();
        let victim = pinned[0];
        // What the agent writes when a backend fails: out of the ring, flagged down.
        let mut failed = web4(&w);
        for b in &mut failed.backends {
            if b.path.unwrap().dst_mac == victim {
                b.down = true;
                b.weight = 0;
            }
        }
        w.set(&[failed]);
        let mut moved = Vec::new();
        for (port, before) in (0..60u16).zip(&pinned) {
            let ack = tcp("198.18.0.2", 43000 + port, VIP4, 80, ACK).bytes();
            let (action, out) = w.run(&ack);
            assert_eq!(action, XDP_TX);
            let after = dst_mac(&out);
            if *before == victim {
                assert_ne!(after, victim, "flow {port} still goes to the down backend");
                moved.push((port, after));
            } else {
                assert_eq!(after, *before, "flow {port} of a healthy backend moved");
            }
        }
        assert!(!moved.is_empty());
        // The new choice is pinned: it holds when the old backend comes back.
        w.set(&[web4(&w)]);
        for (port, mac) in moved {
            let ack = tcp("198.18.0.2", 43000 + port, VIP4, 80, ACK).bytes();
            assert_eq!(dst_mac(&w.run(&ack).1), mac);
        }
    });
}

#[test]
fn the_clients_fin_or_rst_marks_a_flow_finished() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w)]);
        let finished = |w: &World, sport: u16| {
            let flows = w.dataplane.flows().unwrap();
            let (_, state) = flows.iter().find(|(k, _)| u16::from_be(k.sport) == sport).expect("flow entry");
            state.flags & lb_common::FLOW_F_FINISHED != 0
        };
        for (sport, last) in [(44000u16, 0x11u8 /* FIN|ACK */), (44001, RST | ACK)] {
            w.run(&tcp("198.18.0.2", sport, VIP4, 80, SYN).bytes());
            w.run(&tcp("198.18.0.2", sport, VIP4, 80, PSH_ACK).bytes());
            assert!(!finished(&w, sport));
            let (action, _) = w.run(&tcp("198.18.0.2", sport, VIP4, 80, last).bytes());
            assert_eq!(action, XDP_TX);
            assert!(finished(&w, sport), "flags {last:#x} did not finish the flow");
            // The last ACK still reaches the same backend.
            assert_eq!(w.run(&tcp("198.18.0.2", sport, VIP4, 80, ACK).bytes()).0, XDP_TX);
        }
        // A new SYN on the same five-tuple is a new handshake: the finished
        // entry goes, and the ACK starts a live flow again.
        w.run(&tcp("198.18.0.2", 44000, VIP4, 80, SYN).bytes());
        assert!(w.flows().iter().all(|k| u16::from_be(k.sport) != 44000), "the finished entry stayed");
        w.run(&tcp("198.18.0.2", 44000, VIP4, 80, ACK).bytes());
        assert!(!finished(&w, 44000));
    });
}

#[test]
fn debug_logging_off_is_pruned_from_the_program() {
    in_world(|| {
        // The log reader of the debug program runs on tokio.
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let _context = runtime.enter();
        let start = std::time::Instant::now();
        let mut w = World::new();
        eprintln!(
            "measured: program loaded and verified in {:?}, {} instructions processed by the verifier",
            start.elapsed(),
            w.dataplane.verified_instructions().unwrap()
        );
        let off = w.dataplane.program_size().unwrap();
        w.dataplane.set_debug_log(DebugLog::On).unwrap();
        let on = w.dataplane.program_size().unwrap();
        eprintln!(
            "measured: {} instructions processed with debug logging on",
            w.dataplane.verified_instructions().unwrap()
        );
        // The verifier removes the log calls when the level is a frozen 0:
        // the program with logging off is much smaller than with it on.
        eprintln!("measured: translated program size with debug logging off {off} B, on {on} B");
        assert!(off > 0 && on > off + 400, "translated size: off {off} B, on {on} B");
        // And the program with logging on still forwards the same way.
        w.set(&[web4(&w)]);
        let syn = tcp("198.18.0.2", 40000, VIP4, 80, SYN).bytes();
        let (action, out) = w.run(&syn);
        assert_eq!((action, out.len()), (XDP_TX, syn.len()));
    });
}

// ---- schedulers ------------------------------------------------------------

fn scheduled(w: &World, scheduler: Scheduler, persistence_s: u32, backends: &[(u8, u32)]) -> DesiredService {
    let backends = backends.iter().map(|(n, weight)| w.tx_backend(&format!("198.18.1.{n}"), *n, *weight)).collect();
    DesiredService {
        scheduler,
        persistence_timeout_s: persistence_s,
        forwarding: Forwarding::Dsr,
        gue_port: lb_common::DEFAULT_GUE_PORT,
        ..service("web", "198.18.0.100:80", Protocol::Tcp, backends)
    }
}

/// The backend (last MAC byte) a SYN from `client`:`port` goes to.
fn syn_to(w: &World, client: &str, port: u16) -> u8 {
    let (action, out) = w.run(&tcp(client, port, VIP4, 80, SYN).bytes());
    assert_eq!(action, XDP_TX);
    dst_mac(&out)[5]
}

/// Test runs execute on the calling CPU; the sequence cursor is per CPU.
fn pin_to_one_cpu() {
    lb_testkit::pin_to_cpu(0).unwrap();
}

fn tally(picks: &[u8]) -> std::collections::BTreeMap<u8, usize> {
    let mut t = std::collections::BTreeMap::new();
    for p in picks {
        *t.entry(*p).or_insert(0) += 1;
    }
    t
}

#[test]
fn round_robin_cycles_and_weighted_round_robin_follows_weights_exactly() {
    in_world(|| {
        pin_to_one_cpu();
        let mut w = World::new();
        w.set(&[scheduled(&w, Scheduler::RoundRobin, 0, &[(11, 1), (12, 5), (13, 1)])]);
        let picks: Vec<u8> = (0..9).map(|p| syn_to(&w, "198.18.0.2", 45000 + p)).collect();
        assert_eq!(tally(&picks[..3]).len(), 3, "{picks:?}");
        assert_eq!(picks[..3], picks[3..6], "not a cycle: {picks:?}");
        assert_eq!(picks[..3], picks[6..9], "not a cycle: {picks:?}");

        w.set(&[scheduled(&w, Scheduler::WeightedRoundRobin, 0, &[(11, 1), (12, 2), (13, 3)])]);
        let picks: Vec<u8> = (0..60).map(|p| syn_to(&w, "198.18.0.3", 46000 + p)).collect();
        assert_eq!(tally(&picks), [(11, 10), (12, 20), (13, 30)].into_iter().collect(), "{picks:?}");
        // Smooth: the two lighter backends never twice in a row.
        assert!(picks.windows(2).all(|p| p[0] != p[1] || p[0] == 13), "{picks:?}");
    });
}

#[test]
fn random_follows_weights() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[scheduled(&w, Scheduler::Random, 0, &[(11, 1), (12, 1), (13, 2)])]);
        let picks: Vec<u8> = (0..4000).map(|p| syn_to(&w, "198.18.0.2", 20000 + p)).collect();
        let t = tally(&picks);
        for (backend, share) in [(11u8, 0.25), (12, 0.25), (13, 0.5)] {
            let expected = 4000.0 * share;
            let got = t[&backend] as f64;
            assert!((got - expected).abs() <= 0.1 * expected, "backend {backend}: {got} of 4000, expected {expected}");
        }
        // Random, not hashed: the same five-tuple may land elsewhere on a new
        // connection (after the last one finished; a SYN retransmission stays).
        let again: std::collections::BTreeSet<u8> = (0..40)
            .map(|_| {
                let backend = syn_to(&w, "198.18.0.9", 40000);
                w.run(&tcp("198.18.0.9", 40000, VIP4, 80, RST).bytes());
                backend
            })
            .collect();
        assert!(again.len() > 1, "{again:?}");
    });
}

#[test]
fn source_hash_keeps_a_client_on_one_backend() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[scheduled(&w, Scheduler::SourceHash, 0, &[(11, 1), (12, 1), (13, 1)])]);
        let one: std::collections::BTreeSet<u8> = (0..100).map(|p| syn_to(&w, "198.18.0.2", 30000 + p)).collect();
        assert_eq!(one.len(), 1, "{one:?}");
        let many: std::collections::BTreeSet<u8> =
            (0..60).map(|c| syn_to(&w, &format!("198.18.3.{}", 10 + c), 30000)).collect();
        assert_eq!(many.len(), 3, "{many:?}");
    });
}

#[test]
fn least_conn_picks_the_backend_with_fewest_active_flows_per_weight() {
    in_world(|| {
        let mut w = World::new();
        // 20 established flows on backend 11 while it is alone.
        w.set(&[scheduled(&w, Scheduler::LeastConn, 0, &[(11, 1)])]);
        for p in 0..20 {
            assert_eq!(syn_to(&w, "198.18.0.2", 31000 + p), 11);
            w.run(&tcp("198.18.0.2", 31000 + p, VIP4, 80, ACK).bytes());
        }
        w.set(&[scheduled(&w, Scheduler::LeastConn, 0, &[(11, 1), (12, 2), (13, 1)])]);
        // The next 30 new flows avoid 11 and split 2:1 between 12 and 13.
        let picks: Vec<u8> = (0..30).map(|p| syn_to(&w, "198.18.0.3", 32000 + p)).collect();
        assert_eq!(tally(&picks), [(12, 20), (13, 10)].into_iter().collect(), "{picks:?}");
        // 15 of backend 11's flows end (FIN): it has the fewest per weight now.
        for p in 0..15 {
            w.run(&tcp("198.18.0.2", 31000 + p, VIP4, 80, FIN_ACK).bytes());
        }
        let ids: Vec<u32> = ["198.18.1.11", "198.18.1.12", "198.18.1.13"]
            .iter()
            .map(|a| w.reconciler.backend_id("web", a.parse().unwrap()).unwrap())
            .collect();
        let counts = w.dataplane.least_conn_counts(&ids).unwrap();
        assert_eq!(ids.iter().map(|id| counts[id].0).collect::<Vec<_>>(), [5, 20, 10]);
        assert_eq!(syn_to(&w, "198.18.0.4", 33000), 11);
        // A RST ends a flow too, and a SYN replacing a live five-tuple moves its count.
        w.run(&tcp("198.18.0.3", 32000, VIP4, 80, RST).bytes());
        let before = w.dataplane.least_conn_counts(&ids).unwrap();
        assert_eq!(before.values().map(|c| c.0).sum::<u64>(), 5 + 20 + 10 + 1 - 1);
        // Drained (weight 0), 11 takes no new flow though it has the fewest.
        w.set(&[scheduled(&w, Scheduler::LeastConn, 0, &[(11, 0), (12, 2), (13, 1)])]);
        let picks: Vec<u8> = (0..6).map(|p| syn_to(&w, "198.18.0.5", 35000 + p)).collect();
        assert!(!picks.contains(&11), "{picks:?}");
        // Its weight back: it is the least loaded again.
        w.set(&[scheduled(&w, Scheduler::LeastConn, 0, &[(11, 1), (12, 2), (13, 1)])]);
        assert_eq!(syn_to(&w, "198.18.0.5", 35100), 11);
    });
}

#[test]
fn persistence_keeps_a_client_on_its_backend_until_the_timeout_or_a_drain() {
    in_world(|| {
        pin_to_one_cpu();
        let mut w = World::new();
        // Round robin would move every new flow: affinity must override it.
        w.set(&[scheduled(&w, Scheduler::RoundRobin, 1, &[(11, 1), (12, 1), (13, 1)])]);
        let home = syn_to(&w, "198.18.0.2", 34000);
        for p in 1..10 {
            assert_eq!(syn_to(&w, "198.18.0.2", 34000 + p), home, "client left its backend");
        }
        assert_eq!(w.counter(GlobalCounter::AffinityHit), 9);
        // Another client is scheduled normally (the next in the cycle).
        assert_ne!(syn_to(&w, "198.18.0.3", 34000), home);
        // Past the timeout the client is scheduled afresh.
        thread::sleep(Duration::from_millis(1300));
        let next = syn_to(&w, "198.18.0.2", 34100);
        assert_ne!(next, home, "affinity outlived its timeout");
        // A backend that stops taking new flows (weight 0, drain) loses its clients at once.
        let backends: Vec<(u8, u32)> = [11u8, 12, 13].iter().map(|b| (*b, (*b != next) as u32)).collect();
        w.set(&[scheduled(&w, Scheduler::RoundRobin, 1, &backends)]);
        assert_ne!(syn_to(&w, "198.18.0.2", 34200), next);
    });
}

// ---- SYN retransmissions ---------------------------------------------------

const ALL_SCHEDULERS: [Scheduler; 7] = [
    Scheduler::Maglev,
    Scheduler::RoundRobin,
    Scheduler::WeightedRoundRobin,
    Scheduler::Random,
    Scheduler::SourceHash,
    Scheduler::LeastConn,
    Scheduler::LeastResponseTime,
];

#[test]
fn a_retransmitted_syn_goes_where_the_first_syn_went_under_every_scheduler() {
    in_world(|| {
        pin_to_one_cpu();
        let mut w = World::new();
        for (round, scheduler) in ALL_SCHEDULERS.into_iter().enumerate() {
            w.set(&[scheduled(&w, scheduler, 0, &[(11, 1), (12, 2), (13, 3)])]);
            let (scheduled_before, retransmits_before) =
                (w.counter(GlobalCounter::SynScheduled), w.counter(GlobalCounter::SynRetransmit));
            for client in 0..20u16 {
                let port = 50000 + round as u16 * 100 + client;
                let syn = tcp(&format!("198.18.3.{}", 10 + client), port, VIP4, 80, SYN).bytes();
                let (action, first) = w.run(&syn);
                assert_eq!(action, XDP_TX);
                for _ in 0..3 {
                    let (action, again) = w.run(&syn);
                    assert_eq!(action, XDP_TX);
                    assert_eq!(
                        again,
                        rewritten(&syn, dst_mac(&first), LB_MAC),
                        "{scheduler:?}: a retransmitted SYN changed backend"
                    );
                }
            }
            assert_eq!(w.counter(GlobalCounter::SynScheduled) - scheduled_before, 20, "{scheduler:?}");
            assert_eq!(w.counter(GlobalCounter::SynRetransmit) - retransmits_before, 60, "{scheduler:?}");
        }
    });
}

#[test]
fn a_syn_after_the_flow_finished_is_a_new_connection_but_one_on_a_live_flow_moves_nothing() {
    in_world(|| {
        pin_to_one_cpu();
        let mut w = World::new();
        // Round robin moves every new connection to the next backend.
        w.set(&[scheduled(&w, Scheduler::RoundRobin, 0, &[(11, 1), (12, 1), (13, 1)])]);
        let first = syn_to(&w, "198.18.0.2", 47000);
        w.run(&tcp("198.18.0.2", 47000, VIP4, 80, ACK).bytes());
        w.run(&tcp("198.18.0.2", 47000, VIP4, 80, FIN_ACK).bytes());
        let after_fin = syn_to(&w, "198.18.0.2", 47000);
        assert_ne!(after_fin, first, "a SYN after FIN was taken for a retransmission");
        // A handshake that ended with the client's RST: the same.
        let reset = syn_to(&w, "198.18.0.2", 47002);
        w.run(&tcp("198.18.0.2", 47002, VIP4, 80, RST).bytes());
        assert_ne!(syn_to(&w, "198.18.0.2", 47002), reset);
        // Established (the client's ACK completed the handshake): a SYN on
        // the same five-tuple goes to the flow's backend and changes nothing,
        // however often it comes (a spoofed SYN cannot move a flow).
        let established = syn_to(&w, "198.18.0.2", 47001);
        w.run(&tcp("198.18.0.2", 47001, VIP4, 80, ACK).bytes());
        for _ in 0..3 {
            assert_eq!(syn_to(&w, "198.18.0.2", 47001), established);
        }
        let ack = tcp("198.18.0.2", 47001, VIP4, 80, ACK).bytes();
        assert_eq!(dst_mac(&w.run(&ack).1)[5], established);
        assert_eq!(w.counter(GlobalCounter::SynToEstablished), 3);
        assert_eq!(w.counter(GlobalCounter::SynRetransmit), 0);
        assert_eq!(w.counter(GlobalCounter::SynScheduled), 5);
    });
}

impl World {
    /// What the agent does after a table scan: check every pin against
    /// the rings, then plan `services` with that verdict. Whether the web
    /// service's pins follow its ring.
    fn scan_rings(&mut self, services: &[DesiredService]) -> bool {
        let following = self.dataplane.pins_following_ring(&self.reconciler.ring_checks()).unwrap();
        self.reconciler.set_pins_follow(&following);
        self.set(services);
        let web = self.reconciler.vip_id("web").unwrap();
        assert_eq!(self.flagged(), following.iter().any(|(id, _)| *id == web), "the flag is not the verdict");
        self.flagged()
    }

    /// Whether the web service's VIP entry carries `VIP_F_PINS_FOLLOW_RING`.
    fn flagged(&self) -> bool {
        let web = self.reconciler.vip_id("web").unwrap();
        self.dataplane
            .read_state()
            .unwrap()
            .vips
            .iter()
            .any(|(_, info)| info.id == web && info.flags & lb_common::VIP_F_PINS_FOLLOW_RING != 0)
    }

    /// The slot of web's backend `198.18.1.n`.
    fn web_backend(&self, n: u8) -> u32 {
        self.reconciler.backend_id("web", format!("198.18.1.{n}").parse().unwrap()).unwrap()
    }

    /// Pins `key` to backend `n` (`198.18.1.n`) as a peer's flow is pinned,
    /// finished or not, last seen `idle` ago.
    fn plant(&mut self, key: FlowKey, n: u8, finished: bool, idle: Duration) {
        let state = lb_common::FlowState {
            backend_id: self.web_backend(n),
            flags: if finished { lb_common::FLOW_F_FINISHED } else { 0 },
            last_seen_ns: xdplb::dataplane::monotonic_coarse_ns() - idle.as_nanos() as u64,
        };
        self.dataplane.apply(&[MapWrite::AdoptFlow { key, state }]).unwrap();
    }
}

/// A backend of `web4` other than `n`.
fn other_than(n: u8) -> u8 {
    if n == 11 { 12 } else { 11 }
}

#[test]
fn syns_skip_the_connection_table_only_while_every_pin_follows_the_ring() {
    in_world(|| {
        pin_to_one_cpu();
        let mut w = World::new();
        w.set(&[web4(&w)]);
        for port in 0..20u16 {
            syn_to(&w, "198.18.0.2", 44000 + port);
            w.run(&tcp("198.18.0.2", 44000 + port, VIP4, 80, ACK).bytes());
        }
        // Every flow went where the ring said: the scan sets the flag.
        assert!(w.scan_rings(&[web4(&w)]));

        // A flow that strays (pinned elsewhere, unseen by any scan yet): its
        // packets keep their backend, but a SYN on its five-tuple takes the
        // ring's pick without looking, and records a handshake there.
        let key = tcp_key("198.18.0.2", 44100, VIP4, 80);
        let pick = w.maglev_mac("web", &key)[5];
        w.plant(key, other_than(pick), false, Duration::ZERO);
        let ack = tcp("198.18.0.2", 44100, VIP4, 80, PSH_ACK).bytes();
        assert_eq!(dst_mac(&w.run(&ack).1)[5], other_than(pick));
        assert_eq!(syn_to(&w, "198.18.0.2", 44100), pick);
        assert_eq!(w.counter(GlobalCounter::SynToEstablished), 0);
        assert_eq!(dst_mac(&w.run(&ack).1)[5], other_than(pick), "the live flow moved");
        // The next scan sees it and clears the flag: SYNs look again.
        assert!(!w.scan_rings(&[web4(&w)]));
        assert_eq!(syn_to(&w, "198.18.0.2", 44100), other_than(pick));
        assert_eq!(w.counter(GlobalCounter::SynToEstablished), 1);

        // Once the stray ended and its five-tuple was reused, every pin
        // follows again. A peer's flow on the ring's pick keeps the flag; a
        // stray one clears it (the agent then reconciles, before the flow
        // is pinned), and the SYNs look again.
        w.run(&tcp("198.18.0.2", 44100, VIP4, 80, RST).bytes());
        assert_eq!(syn_to(&w, "198.18.0.2", 44100), pick);
        w.run(&ack);
        assert!(w.scan_rings(&[web4(&w)]), "every pin follows the ring again");
        let peers = tcp_key("198.18.0.2", 44101, VIP4, 80);
        let peers_pick = w.maglev_mac("web", &peers)[5];
        assert!(!w.reconciler.admit_pins(&[(peers, w.web_backend(peers_pick))]));
        assert!(w.reconciler.admit_pins(&[(peers, w.web_backend(other_than(peers_pick)))]));
        w.set(&[web4(&w)]);
        assert!(!w.flagged(), "a peer's stray flow left the flag on");
        w.plant(peers, other_than(peers_pick), false, Duration::ZERO);
        assert_eq!(syn_to(&w, "198.18.0.2", 44101), other_than(peers_pick));

        // A finished flow past its linger is left to a new connection on its
        // five-tuple, whose SYN does not look: its ACK takes the SYN's
        // backend and pins it afresh. Within the linger it keeps its backend.
        let mut w = World::new();
        w.set(&[web4(&w)]);
        assert!(w.scan_rings(&[web4(&w)]));
        let ended = tcp_key("198.18.0.2", 44200, VIP4, 80);
        let pick = w.maglev_mac("web", &ended)[5];
        w.plant(ended, other_than(pick), true, Duration::from_secs(11));
        assert!(w.scan_rings(&[web4(&w)]), "a finished flow past its linger held the flag off");
        assert_eq!(syn_to(&w, "198.18.0.2", 44200), pick);
        let ack = tcp("198.18.0.2", 44200, VIP4, 80, ACK).bytes();
        assert_eq!(dst_mac(&w.run(&ack).1)[5], pick, "the new connection's ACK went to the ended flow's backend");
        assert_eq!(w.counter(GlobalCounter::HalfOpenPromoted), 1);
        let lingering = tcp_key("198.18.0.2", 44201, VIP4, 80);
        let pick = w.maglev_mac("web", &lingering)[5];
        w.plant(lingering, other_than(pick), true, Duration::from_secs(1));
        let ack = tcp("198.18.0.2", 44201, VIP4, 80, ACK).bytes();
        assert_eq!(dst_mac(&w.run(&ack).1)[5], other_than(pick), "a flow within its linger lost its backend");
        assert!(!w.scan_rings(&[web4(&w)]), "a lingering stray left the flag on");
    });
}

// ---- SYN floods ---------------------------------------------------------------

/// SYNs from `n` distinct clients (198.19.0.0/16, ports from 1024).
fn flood_syns(w: &World, n: u32) {
    for i in 0..n {
        let client = format!("198.19.{}.{}", (i >> 8) & 0xff, i & 0xff);
        let (action, _) = w.run(&tcp(&client, 1024 + (i >> 16) as u16, VIP4, 80, SYN).bytes());
        assert_eq!(action, XDP_TX);
    }
}

#[test]
fn a_syn_flood_cannot_evict_established_flows_even_across_a_ring_change() {
    in_world(|| {
        pin_to_one_cpu();
        // Flood detection off: every SYN of the flood is recorded half-open.
        let mut w = World::with(Duration::from_secs(30), 0);
        w.set(&[web4(&w)]);
        let established: Vec<(u16, [u8; 6])> = (0..20u16)
            .map(|p| {
                let (_, out) = w.run(&tcp("198.18.0.2", 45000 + p, VIP4, 80, SYN).bytes());
                w.run(&tcp("198.18.0.2", 45000 + p, VIP4, 80, ACK).bytes());
                (45000 + p, dst_mac(&out))
            })
            .collect();
        // The ring changes: the flows' slots now name other backends.
        w.set(&[scheduled(&w, Scheduler::Maglev, 0, &[(11, 1), (12, 5), (13, 3)])]);
        // Ten times the connection table's size (4096) in SYNs.
        flood_syns(&w, 40_960);
        assert_eq!(w.counter(GlobalCounter::SynScheduled), 20 + 40_960);
        assert_eq!(w.flows().len(), 20, "the flood wrote the connection table");
        assert!(w.half_open().len() <= 1024, "the half-open table outgrew its size");
        let mut moved_by_ring = 0;
        for (port, mac) in &established {
            let ack = tcp("198.18.0.2", *port, VIP4, 80, PSH_ACK).bytes();
            assert_eq!(w.run(&ack), (XDP_TX, rewritten(&ack, *mac, LB_MAC)), "flow {port} moved");
            moved_by_ring += (w.maglev_mac("web", &tcp_key("198.18.0.2", *port, VIP4, 80)) != *mac) as usize;
        }
        // The check means something: without their entries, some would move.
        assert!(moved_by_ring > 0, "the ring change moved no slot of the 20 flows");
    });
}

#[test]
fn a_flooded_cpu_records_no_handshakes_for_hash_scheduled_services_and_acks_still_follow_their_syns() {
    in_world(|| {
        pin_to_one_cpu();
        let mut w = World::with(Duration::from_secs(30), 100);
        let rr = DesiredService {
            name: "rr".into(),
            vip: "198.18.0.100:81".parse().unwrap(),
            ..scheduled(&w, Scheduler::RoundRobin, 0, &[(21, 1), (22, 1), (23, 1)])
        };
        w.set(&[web4(&w), rr]);
        // 300 SYNs within a second to the Maglev service: the first 100 are
        // recorded, the rest go by the hash alone.
        let started = std::time::Instant::now();
        let syns: Vec<(u16, [u8; 6])> = (0..300u16)
            .map(|p| (46000 + p, dst_mac(&w.run(&tcp("198.18.0.2", 46000 + p, VIP4, 80, SYN).bytes()).1)))
            .collect();
        assert!(started.elapsed() < Duration::from_millis(800), "too slow to stay within one window");
        assert_eq!(w.counter(GlobalCounter::SynFlood), 200);
        assert_eq!(w.half_open().len(), 100);
        for (port, mac) in &syns {
            let ack = tcp("198.18.0.2", *port, VIP4, 80, ACK).bytes();
            assert_eq!(dst_mac(&w.run(&ack).1), *mac, "the ACK of flow {port} left its SYN's backend");
        }
        assert_eq!(w.counter(GlobalCounter::HalfOpenPromoted), 100);
        assert_eq!(w.flows().len(), 300);
        // Round robin cannot find a SYN's backend again without its entry:
        // its SYNs are recorded even now.
        let rr: Vec<(u16, u8)> = (0..30u16)
            .map(|p| (47500 + p, dst_mac(&w.run(&tcp("198.18.0.2", 47500 + p, VIP4, 81, SYN).bytes()).1)[5]))
            .collect();
        assert!(rr.iter().map(|(_, b)| b).collect::<std::collections::BTreeSet<_>>().len() == 3);
        assert_eq!(w.counter(GlobalCounter::SynFlood), 230);
        for (port, backend) in rr {
            let ack = tcp("198.18.0.2", port, VIP4, 81, ACK).bytes();
            assert_eq!(dst_mac(&w.run(&ack).1)[5], backend, "round robin: the ACK of {port} moved");
        }
        assert_eq!(w.counter(GlobalCounter::HalfOpenPromoted), 130);
    });
}

#[test]
fn a_retransmitted_syn_leaves_a_backend_that_went_down() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[web4(&w)]);
        let first = syn_to(&w, "198.18.0.2", 48000);
        let mut down = web4(&w);
        down.backends.iter_mut().filter(|b| b.path.unwrap().dst_mac[5] == first).for_each(|b| {
            b.down = true;
            b.weight = 0;
        });
        w.set(&[down]);
        assert_ne!(syn_to(&w, "198.18.0.2", 48000), first);
    });
}

// ---- map writes the kernel refuses -----------------------------------------

#[test]
fn a_refused_map_write_is_retried_until_the_data_plane_matches() {
    in_world(|| {
        let mut w = World::new();
        // No interface has this index: the egress device insert is refused,
        // and the writer holds back the backend, ring and VIP writes after it.
        let mut unreachable =
            service("web", "198.18.0.100:80", Protocol::Tcp, vec![w.redirect_backend("198.18.1.11", 11)]);
        unreachable.backends[0].path.as_mut().unwrap().ifindex = 9999;
        let (writes, _) = w.reconciler.plan(std::slice::from_ref(&unreachable));
        let failure = w.dataplane.apply(&writes).expect_err("DEVMAP insert of a missing ifindex");
        assert!(failure.message.contains("EGRESS_DEVICES insert ifindex 9999"), "{failure}");
        assert_eq!(failure.unapplied.len(), writes.len(), "{failure}");
        for write in &failure.unapplied {
            w.reconciler.forget(write);
        }
        let syn = tcp("198.18.0.2", 49000, VIP4, 80, SYN).bytes();
        assert_eq!(w.run(&syn).0, XDP_PASS, "nothing was written, so the VIP does not exist yet");
        // The same desired state is planned in full again, not as "done".
        let (again, _) = w.reconciler.plan(std::slice::from_ref(&unreachable));
        assert_eq!(again, writes);
        for write in &w.dataplane.apply(&again).unwrap_err().unapplied {
            w.reconciler.forget(write);
        }
        // The interface is back (a valid ifindex): the next reconcile converges.
        w.set(&[service("web", "198.18.0.100:80", Protocol::Tcp, vec![w.redirect_backend("198.18.1.11", 11)])]);
        let (action, out) = w.run(&syn);
        assert_eq!((action, dst_mac(&out)), (XDP_REDIRECT, backend_mac(11)));
        assert_eq!(
            w.reconciler
                .plan(&[service("web", "198.18.0.100:80", Protocol::Tcp, vec![w.redirect_backend("198.18.1.11", 11)])])
                .0,
            vec![]
        );
    });
}

// ---- tunnels ---------------------------------------------------------------

const TUNNEL_SRC4: &str = "198.18.2.1";
const TUNNEL_SRC6: &str = "2001:db8:0:2::1";

/// A tunnel service with one backend at `backend`, reached through `lo`.
fn tunnelled(
    w: &World,
    forwarding: Forwarding,
    vip: &str,
    protocol: Protocol,
    backend: &str,
    mtu: u16,
) -> DesiredService {
    let source = if backend.contains(':') { TUNNEL_SRC6 } else { TUNNEL_SRC4 };
    let mut member = w.tx_backend(backend, 21, 1);
    member.path = member.path.map(|p| L2Path { mtu, source: Some(source.parse().unwrap()), ..p });
    DesiredService { forwarding, ..service("tunnel", vip, protocol, vec![member]) }
}

fn flow_of(frame: &Frame) -> FlowKey {
    FlowKey {
        src: address_words(frame.src),
        dst: address_words(frame.dst),
        sport: frame.sport.to_be(),
        dport: frame.dport.to_be(),
        proto: frame.proto,
        family: if frame.src.is_ipv4() { 4 } else { 6 },
        _pad: [0; 2],
    }
}

/// The tunnel xdplb must build for `frame` to `backend`.
fn expected_tunnel(frame: &Frame, forwarding: Forwarding, backend: &str) -> Tunnel {
    let hash = lb_common::tunnel_entropy(&flow_of(frame));
    let source = if backend.contains(':') { TUNNEL_SRC6 } else { TUNNEL_SRC4 };
    Tunnel {
        src: source.parse().unwrap(),
        dst: backend.parse().unwrap(),
        src_mac: LB_MAC,
        dst_mac: backend_mac(21),
        gue_ports: (forwarding == Forwarding::Gue)
            .then_some((49152 + (hash % 16384) as u16, lb_common::DEFAULT_GUE_PORT)),
        flow_label: hash & 0xfffff,
    }
}

#[test]
fn tunnels_encapsulate_every_family_combination_with_exact_headers() {
    in_world(|| {
        let mut w = World::new();
        let combinations = [
            ("198.18.0.100", "198.18.3.21", "198.18.0.2"),
            ("2001:db8::100", "2001:db8:0:3::21", "2001:db8:1::2"),
            ("198.18.0.100", "2001:db8:0:3::21", "198.18.0.2"),
            ("2001:db8::100", "198.18.3.21", "2001:db8:1::2"),
        ];
        let mut sent = 0;
        // Every combination's flows are new: a known five-tuple would keep
        // the backend it is pinned to.
        let mut client_port = 40000;
        for forwarding in [Forwarding::Ipip, Forwarding::Gue] {
            for (vip, backend, client) in combinations {
                client_port += 1;
                let bracketed = if vip.contains(':') { format!("[{vip}]") } else { vip.to_string() };
                w.set(&[
                    tunnelled(&w, forwarding, &format!("{bracketed}:80"), Protocol::Tcp, backend, 1500),
                    DesiredService {
                        name: "dns".into(),
                        ..tunnelled(&w, forwarding, &format!("{bracketed}:53"), Protocol::Udp, backend, 1500)
                    },
                ]);
                let mut syn = tcp(client, client_port, vip, 80, SYN);
                if syn.src.is_ipv4() {
                    syn.frag = 0x4000; // DF: the outer IPv4 header copies it
                }
                let ack = Frame { tcp_flags: PSH_ACK, ..syn.clone() };
                let query = udp(client, client_port, vip, 53);
                for frame in [&syn, &ack, &query] {
                    let (action, out) = w.run(&frame.bytes());
                    let expected = encapsulated(&frame.bytes(), &expected_tunnel(frame, forwarding, backend));
                    assert_eq!(action, XDP_TX, "{forwarding} {vip} → {backend}");
                    assert_eq!(out, expected, "{forwarding} {vip} → {backend}, {frame:?}");
                    sent += 1;
                }
                // The outer IPv4 checksum verifies on its own.
                let (_, out) = w.run(&syn.bytes());
                if out[12..14] == [0x08, 0x00] {
                    assert_eq!(internet_checksum(&out[14..34]), 0);
                }
            }
            let counter =
                if forwarding == Forwarding::Gue { GlobalCounter::ForwardedGue } else { GlobalCounter::ForwardedIpip };
            assert_eq!(w.counter(counter), 4 * 4, "{forwarding}");
        }
        assert_eq!(sent, 24);
        assert_eq!(w.counter(GlobalCounter::ForwardedDsr), 0);
    });
}

#[test]
fn gue_source_ports_are_stable_per_flow_and_spread_over_flows() {
    in_world(|| {
        let mut w = World::new();
        w.set(&[tunnelled(&w, Forwarding::Gue, "198.18.0.100:80", Protocol::Tcp, "198.18.3.21", 1500)]);
        let mut ports = std::collections::BTreeSet::new();
        for client_port in 40000..40256u16 {
            let syn = tcp("198.18.0.2", client_port, VIP4, 80, SYN).bytes();
            let ack = tcp("198.18.0.2", client_port, VIP4, 80, ACK).bytes();
            let (_, first) = w.run(&syn);
            let (_, second) = w.run(&ack);
            let port = u16::from_be_bytes([first[34], first[35]]);
            assert_eq!(port, u16::from_be_bytes([second[34], second[35]]), "stable within a flow");
            assert!(port >= 49152, "{port} outside the ephemeral range");
            ports.insert(port);
        }
        assert!(ports.len() > 240, "only {} distinct source ports for 256 flows", ports.len());
    });
}

/// The ICMP message of a "too big" reply, checked field by field.
fn assert_too_big_reply(out: &[u8], original: &[u8], mtu: u16) {
    // Back to the client, from the LB's MAC.
    assert_eq!(&out[0..6], &CLIENT_MAC);
    assert_eq!(&out[6..12], &LB_MAC);
    let quote = &original[14..14 + lb_common::TOO_BIG_QUOTE_LEN];
    if out[12..14] == [0x08, 0x00] {
        let ip = &out[14..34];
        assert_eq!(out.len(), 14 + 20 + 8 + quote.len());
        assert_eq!((ip[0], ip[9], u16::from_be_bytes([ip[2], ip[3]])), (0x45, 1, 92));
        assert_eq!(&ip[12..16], &original[30..34], "from the VIP");
        assert_eq!(&ip[16..20], &original[26..30], "to the client");
        assert_eq!(internet_checksum(ip), 0);
        let icmp = &out[34..];
        assert_eq!((icmp[0], icmp[1]), (3, 4), "fragmentation needed");
        assert_eq!(u16::from_be_bytes([icmp[6], icmp[7]]), mtu);
        assert_eq!(&icmp[8..], quote);
        assert_eq!(internet_checksum(icmp), 0);
    } else {
        let ip = &out[14..54];
        assert_eq!(out.len(), 14 + 40 + 8 + quote.len());
        assert_eq!((ip[0] >> 4, ip[6], u16::from_be_bytes([ip[4], ip[5]])), (6, 58, 72));
        assert_eq!(&ip[8..24], &original[38..54], "from the VIP");
        assert_eq!(&ip[24..40], &original[22..38], "to the client");
        let icmp = &out[54..];
        assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
        assert_eq!(u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]), mtu as u32);
        assert_eq!(&icmp[8..], quote);
        let mut pseudo = ip[8..40].to_vec();
        pseudo.extend(72u32.to_be_bytes());
        pseudo.extend([0, 0, 0, 58]);
        pseudo.extend(icmp);
        assert_eq!(internet_checksum(&pseudo), 0);
    }
}

#[test]
fn a_packet_too_big_for_the_tunnel_gets_icmp_too_big_from_xdp() {
    in_world(|| {
        let mut w = World::new();
        // 1500-byte IP packets: 1460 bytes of TCP payload over IPv4, 1440 over IPv6.
        let big4 = |flags: u16, port: u16| Frame {
            frag: flags,
            payload: vec![0x55; 1460],
            ..tcp("198.18.0.2", port, VIP4, 80, ACK)
        };
        let big6 = Frame { payload: vec![0x66; 1440], ..tcp("2001:db8:1::2", 40000, VIP6, 80, ACK) };

        w.set(&[tunnelled(&w, Forwarding::Ipip, "198.18.0.100:80", Protocol::Tcp, "198.18.3.21", 1500)]);
        let frame = big4(0x4000, 40000).bytes();
        assert_eq!(frame.len(), 1514);
        let (action, out) = w.run(&frame);
        assert_eq!(action, XDP_TX);
        assert_too_big_reply(&out, &frame, 1480);
        assert_eq!(w.counter(GlobalCounter::TooBigSentV4), 1);
        // Without DF it cannot be answered (nor fragmented in XDP): dropped.
        let (action, _) = w.run(&big4(0, 40000).bytes());
        assert_eq!(action, XDP_DROP);
        assert_eq!(w.counter(GlobalCounter::DropTooBig), 1);
        // 1480 bytes fit exactly.
        let fits = Frame { frag: 0x4000, payload: vec![0x55; 1440], ..tcp("198.18.0.2", 40000, VIP4, 80, ACK) };
        let (action, out) = w.run(&fits.bytes());
        assert_eq!((action, out.len()), (XDP_TX, 1514));

        // IPv6 in GUE over IPv6: 48 bytes of tunnel.
        w.set(&[tunnelled(&w, Forwarding::Gue, "[2001:db8::100]:80", Protocol::Tcp, "2001:db8:0:3::21", 1500)]);
        let frame = big6.bytes();
        let (action, out) = w.run(&frame);
        assert_eq!(action, XDP_TX);
        assert_too_big_reply(&out, &frame, 1452);
        assert_eq!(w.counter(GlobalCounter::TooBigSentV6), 1);

        // A route with a smaller MTU: IPv4 in IPIP over IPv6, 1400 - 40 (a
        // new flow: the old one stays with its backend).
        w.set(&[tunnelled(&w, Forwarding::Ipip, "198.18.0.100:80", Protocol::Tcp, "2001:db8:0:3::21", 1400)]);
        let frame = big4(0x4000, 40001).bytes();
        let (action, out) = w.run(&frame);
        assert_eq!(action, XDP_TX);
        assert_too_big_reply(&out, &frame, 1360);
        assert_eq!(w.counter(GlobalCounter::ForwardedIpip), 1);
    });
}

// ---- the backend's decapsulation program -------------------------------------

struct Decap {
    ebpf: aya::Ebpf,
}

impl Decap {
    fn new(local: &[&str]) -> Self {
        let mut ebpf = aya::Ebpf::load(xdplb::decap::DECAP_OBJECT).expect("load decap object");
        let program: &mut aya::programs::Xdp = ebpf.program_mut("xdplb_decap").unwrap().try_into().unwrap();
        program.load().expect("verify decap program");
        let mut addresses: aya::maps::HashMap<_, lb_common::AddressKey, u32> =
            aya::maps::HashMap::try_from(ebpf.map_mut("DECAP_ADDRESSES").unwrap()).unwrap();
        for address in local {
            let address: IpAddr = address.parse().unwrap();
            let key = lb_common::AddressKey {
                addr: address_words(address),
                family: if address.is_ipv4() { 4 } else { 6 },
                _pad: [0; 3],
            };
            addresses.insert(key, 1, 0).unwrap();
        }
        Decap { ebpf }
    }

    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let program: &aya::programs::Xdp = self.ebpf.program("xdplb_decap").unwrap().try_into().unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), ..Default::default() };
        let result = program.test_run(opts).expect("test_run");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn counter(&self, which: lb_common::DecapCounter) -> u64 {
        let array: aya::maps::PerCpuArray<_, u64> =
            aya::maps::PerCpuArray::try_from(self.ebpf.map("DECAP_COUNTERS").unwrap()).unwrap();
        array.get(&(which as u32), 0).unwrap().iter().sum()
    }
}

/// What the backend's stack must receive: the inner packet behind the
/// outer frame's Ethernet addresses.
fn decapsulated(outer: &[u8], inner_frame: &[u8]) -> Vec<u8> {
    let mut out = outer[..12].to_vec();
    out.extend(&inner_frame[12..]);
    out
}

#[test]
fn decap_opens_every_tunnel_for_this_host_and_nothing_else() {
    in_world(|| {
        lb_testkit::isolate_thread().unwrap();
        let decap = Decap::new(&["198.18.3.21", "2001:db8:0:3::21"]);
        let inner4 = tcp("198.18.0.2", 40000, VIP4, 80, SYN).bytes();
        let inner6 = tcp("2001:db8:1::2", 40000, VIP6, 80, SYN).bytes();
        let tunnel = |dst: &str, gue: bool| Tunnel {
            src: if dst.contains(':') { TUNNEL_SRC6 } else { TUNNEL_SRC4 }.parse().unwrap(),
            dst: dst.parse().unwrap(),
            src_mac: [0x02, 0x77, 0, 0, 0, 1],
            dst_mac: backend_mac(21),
            gue_ports: gue.then_some((50000, lb_common::DEFAULT_GUE_PORT)),
            flow_label: 0x12345,
        };
        let mut opened = 0;
        for gue in [false, true] {
            for outer_dst in ["198.18.3.21", "2001:db8:0:3::21"] {
                for inner in [&inner4, &inner6] {
                    let frame = encapsulated(inner, &tunnel(outer_dst, gue));
                    let (action, out) = decap.run(&frame);
                    assert_eq!((action, &out), (XDP_PASS, &decapsulated(&frame, inner)), "gue {gue} via {outer_dst}");
                    opened += 1;
                }
            }
        }
        assert_eq!(opened, 8);
        assert_eq!(decap.counter(lb_common::DecapCounter::Ipip), 4);
        assert_eq!(decap.counter(lb_common::DecapCounter::Gue), 4);

        // For another host: passed untouched.
        let other = encapsulated(&inner4, &tunnel("198.18.3.22", false));
        assert_eq!(decap.run(&other), (XDP_PASS, other.clone()));
        assert_eq!(decap.counter(lb_common::DecapCounter::PassNotLocal), 1);
        // UDP to another port, and plain traffic: not tunnels, untouched.
        let mut wrong_port = tunnel("198.18.3.21", true);
        wrong_port.gue_ports = Some((50000, 6081));
        let not_gue = encapsulated(&inner4, &wrong_port);
        assert_eq!(decap.run(&not_gue), (XDP_PASS, not_gue.clone()));
        let plain = tcp("198.18.0.2", 40000, "198.18.3.21", 80, SYN).bytes();
        assert_eq!(decap.run(&plain), (XDP_PASS, plain.clone()));

        // Malformed tunnels for this host are dropped, never half-opened.
        let whole = encapsulated(&inner4, &tunnel("198.18.3.21", false));
        let mut dropped = 0;
        for cut in 34..34 + 20 {
            // The inner IPv4 header cut short.
            let (action, _) = decap.run(&whole[..cut]);
            assert_eq!(action, XDP_DROP, "inner header cut at {cut}");
            dropped += 1;
        }
        // Announced IPv4 (protocol 4), but the inner packet is IPv6.
        let mut mislabelled = encapsulated(&inner6, &tunnel("198.18.3.21", false));
        mislabelled[23] = 4;
        mislabelled[24..26].copy_from_slice(&[0, 0]);
        let check = internet_checksum(&mislabelled[14..34]);
        mislabelled[24..26].copy_from_slice(&check.to_be_bytes());
        assert_eq!(decap.run(&mislabelled).0, XDP_DROP);
        // GUE whose payload is not IP.
        let mut not_ip = encapsulated(&inner4, &tunnel("198.18.3.21", true));
        not_ip[42] = 0x55;
        assert_eq!(decap.run(&not_ip).0, XDP_DROP);
        assert_eq!(decap.counter(lb_common::DecapCounter::DropMalformed), dropped + 2);
        // The outer header cut short: not recognisable, passed untouched.
        for cut in [14, 20, 33] {
            assert_eq!(decap.run(&whole[..cut]), (XDP_PASS, whole[..cut].to_vec()), "outer cut at {cut}");
        }
    });
}

// ---- NAT ------------------------------------------------------------------

/// The LB's address on the backends' side: full NAT's default source.
const NAT_SOURCE4: &str = "198.18.1.1";
const NAT_SOURCE6: &str = "2001:db8:0:2::1";
/// The client's next hop as the kernel's tables name it (`route_clients`).
const ROUTER_MAC: [u8; 6] = [0x02, 0x77, 0, 0, 0, 0x01];

impl World {
    /// A backend of a NAT service, reached through `lo` (XDP_TX), with the
    /// route source full NAT takes by default.
    fn nat_backend(&self, address: &str, n: u8) -> DesiredBackend {
        let address: BackendAddress = address.parse().unwrap();
        let source = if address.ip.is_ipv4() { NAT_SOURCE4 } else { NAT_SOURCE6 };
        DesiredBackend {
            address,
            weight: 1,
            path: Some(L2Path {
                ifindex: 1,
                src_mac: LB_MAC,
                dst_mac: backend_mac(n),
                mtu: 1500,
                source: Some(source.parse().unwrap()),
            }),
            down: false,
        }
    }

    /// Routes to the clients (198.18.0.0/24, 2001:db8::/64) through the veth
    /// device, their next hop's MAC in the neighbour table, and forwarding
    /// on: what the FIB lookup of a translated reply needs.
    fn route_clients(&self) {
        for args in [
            &["addr", "add", "198.18.0.1/24", "dev", "xdplbtest0"][..],
            &["addr", "add", "2001:db8::1/64", "dev", "xdplbtest0", "nodad"],
            &["neigh", "add", "198.18.0.2", "lladdr", "02:77:00:00:00:01", "dev", "xdplbtest0", "nud", "permanent"],
            &["neigh", "add", "2001:db8::2", "lladdr", "02:77:00:00:00:01", "dev", "xdplbtest0", "nud", "permanent"],
        ] {
            let status = Command::new("ip").args(args).status().expect("ip");
            assert!(status.success(), "ip {args:?}");
        }
        for sysctl in ["/proc/sys/net/ipv4/conf/all/forwarding", "/proc/sys/net/ipv6/conf/all/forwarding"] {
            std::fs::write(sysctl, "1").unwrap_or_else(|e| panic!("{sysctl}: {e}"));
        }
    }

    /// The veth device's MAC (this thread's /sys shows another namespace).
    fn veth_mac(&self) -> [u8; 6] {
        let out = Command::new("ip").args(["-br", "link", "show", "dev", "xdplbtest0"]).output().expect("ip");
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text.split_whitespace().nth(2).unwrap_or_else(|| panic!("no MAC in {text:?}"));
        let bytes: Vec<u8> = mac.split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
        bytes.try_into().unwrap()
    }

    fn nat_entries(&self) -> (usize, usize) {
        self.dataplane.nat_table_sizes().unwrap()
    }
}

fn nat_service(
    name: &str,
    vip: &str,
    protocol: Protocol,
    backends: Vec<DesiredBackend>,
    ports: &str,
) -> DesiredService {
    DesiredService {
        forwarding: Forwarding::Nat,
        nat: Some(DesiredNat {
            sources: Vec::new(),
            ports: ports.parse::<PortRange>().unwrap(),
            preserve_client: false,
            exclude: None,
        }),
        ..service(name, vip, protocol, backends)
    }
}

/// The NAT service web: 198.18.0.100:80 → 198.18.1.11:8080, its pool `ports`.
fn web_nat(w: &World, ports: &str) -> DesiredService {
    nat_service("web", "198.18.0.100:80", Protocol::Tcp, vec![w.nat_backend("198.18.1.11:8080", 11)], ports)
}

/// A world with routes to the clients and the NAT service web (`web_nat`).
fn web_behind_nat(ports: &str) -> World {
    let mut w = World::new();
    w.route_clients();
    w.set(&[web_nat(&w, ports)]);
    w
}

/// The source port a translated frame carries (after Ethernet and IP).
fn source_port(out: &[u8]) -> u16 {
    let l4 = if u16::from_be_bytes([out[12], out[13]]) == 0x0800 { 34 } else { 54 };
    u16::from_be_bytes([out[l4], out[l4 + 1]])
}

#[test]
fn nat_translates_both_directions_with_exact_bytes_and_checksums() {
    in_world(|| {
        let mut w = World::new();
        w.route_clients();
        let ports = "40000-40009";
        w.set(&[
            nat_service("web", "198.18.0.100:80", Protocol::Tcp, vec![w.nat_backend("198.18.1.11:8080", 11)], ports),
            nat_service("dns", "198.18.0.100:53", Protocol::Udp, vec![w.nat_backend("198.18.1.12:5353", 12)], ports),
            nat_service(
                "web6",
                "[2001:db8::100]:80",
                Protocol::Tcp,
                vec![w.nat_backend("[2001:db8:0:2::11]:8080", 11)],
                ports,
            ),
            nat_service(
                "dns6",
                "[2001:db8::100]:53",
                Protocol::Udp,
                vec![w.nat_backend("2001:db8:0:2::12", 12)],
                ports,
            ),
        ]);
        let veth = w.veth_mac();
        let cases = [
            ("198.18.0.2", VIP4, 80, NAT_SOURCE4, "198.18.1.11", 8080, 11, true),
            ("198.18.0.2", VIP4, 53, NAT_SOURCE4, "198.18.1.12", 5353, 12, false),
            ("2001:db8::2", VIP6, 80, NAT_SOURCE6, "2001:db8:0:2::11", 8080, 11, true),
            // No port given: the VIP's.
            ("2001:db8::2", VIP6, 53, NAT_SOURCE6, "2001:db8:0:2::12", 53, 12, false),
        ];
        for (n, (client, vip, vip_port, nat, backend, backend_port, mac, is_tcp)) in cases.into_iter().enumerate() {
            let frame = |src: &str, sport: u16, dst: &str, dport: u16, flags: u8| {
                // Odd payload lengths too: the checksums must not care.
                let mut f = if is_tcp { tcp(src, sport, dst, dport, flags) } else { udp(src, sport, dst, dport) };
                f.payload.extend(std::iter::repeat_n(0xa5u8, n));
                f
            };
            let request = frame(client, 40000, vip, vip_port, SYN).checksummed();
            let (action, out) = w.run(&request);
            assert_eq!(action, XDP_TX, "case {n}");
            let port = source_port(&out);
            assert!((40000..=40009).contains(&port), "case {n}: source port {port}");
            let expected = frame(nat, port, backend, backend_port, SYN).checksummed();
            assert_eq!(out, rewritten(&expected, backend_mac(mac), LB_MAC), "case {n}: request");

            // The flow's next packet keeps its translation.
            let next = frame(client, 40000, vip, vip_port, PSH_ACK).checksummed();
            let (_, out) = w.run(&next);
            assert_eq!(source_port(&out), port, "case {n}");

            // The backend's reply goes back to VIP → client, to the client's next hop.
            let reply = frame(backend, backend_port, nat, port, PSH_ACK).checksummed();
            let (action, out) = w.run(&reply);
            assert_eq!(action, XDP_REDIRECT, "case {n}: reply");
            let expected = frame(vip, vip_port, client, 40000, PSH_ACK).checksummed();
            assert_eq!(out, rewritten(&expected, ROUTER_MAC, veth), "case {n}: reply");
        }
        assert_eq!(w.counter(GlobalCounter::ForwardedNat), 8);
        assert_eq!(w.counter(GlobalCounter::NatReplies), 4);
        assert_eq!(w.nat_entries(), (4, 4));
    });
}

#[test]
fn a_nat_flow_to_another_backend_port_or_source_never_shares_a_translation() {
    in_world(|| {
        let mut w = World::new();
        // Two ports only.
        w.set(&[nat_service(
            "web",
            "198.18.0.100:80",
            Protocol::Tcp,
            vec![w.nat_backend("198.18.1.11", 11)],
            "40000-40001",
        )]);
        // The first port a new flow tries is drawn at random: in 16 rounds
        // the second flow finds it taken (its translation then names the
        // port it reserved instead) all but surely.
        for round in 0..16u64 {
            w.dataplane.clear_nat_tables().unwrap();
            let mut seen = Vec::new();
            for client_port in [1000u16, 1001] {
                let (action, out) = w.run(&tcp("198.18.0.2", client_port, VIP4, 80, SYN).checksummed());
                assert_eq!(action, XDP_TX);
                seen.push(source_port(&out));
            }
            let mut ports = seen.clone();
            ports.sort();
            assert_eq!(ports, [40000, 40001], "round {round}: both ports, each once");
            // Each translation names the port its reply entry holds.
            let (flows, replies) = w.dataplane.nat_tables().unwrap();
            for (_, flow) in &flows {
                assert!(
                    replies.iter().any(|(key, _)| key.dport == flow.nat_port),
                    "round {round}: a translation names a port no reply entry holds"
                );
            }
            // The pool is exhausted: the next new flow is dropped and counted,
            // never mis-translated, and leaves no entry behind.
            let (action, _) = w.run(&tcp("198.18.0.3", 1000, VIP4, 80, SYN).checksummed());
            assert_eq!(action, XDP_DROP);
            assert_eq!(w.counter(GlobalCounter::DropNatPortExhausted), round + 1);
            assert_eq!(w.dataplane.nat_exhausted(0).unwrap(), round + 1);
            assert_eq!(w.nat_entries(), (2, 2));
            // Established flows go on, each with its own port.
            for (client_port, port) in [1000u16, 1001].into_iter().zip(&seen) {
                let (action, out) = w.run(&tcp("198.18.0.2", client_port, VIP4, 80, PSH_ACK).checksummed());
                assert_eq!(action, XDP_TX);
                assert_eq!(source_port(&out), *port, "round {round}");
            }
        }
    });
}

#[test]
fn malformed_or_unknown_replies_pass_and_leave_nat_state_alone() {
    in_world(|| {
        let w = web_behind_nat("40000-40000");
        let (_, out) = w.run(&tcp("198.18.0.2", 1000, VIP4, 80, SYN).checksummed());
        assert_eq!(source_port(&out), 40000);
        let reply = tcp("198.18.1.11", 8080, NAT_SOURCE4, 40000, PSH_ACK);
        // Cut short inside the TCP header: not parsed, passed, nothing changes.
        let bytes = reply.checksummed();
        for cut in [34 + 4, 34 + 19] {
            assert_eq!(w.run(&bytes[..cut]), (XDP_PASS, bytes[..cut].to_vec()), "cut at {cut}");
        }
        // Not a translation we made (another port, another backend): passed untouched.
        for other in [
            tcp("198.18.1.11", 8080, NAT_SOURCE4, 40001, PSH_ACK),
            tcp("198.18.1.12", 8080, NAT_SOURCE4, 40000, PSH_ACK),
            tcp("198.18.1.11", 8081, NAT_SOURCE4, 40000, PSH_ACK),
        ] {
            let bytes = other.checksummed();
            assert_eq!(w.run(&bytes), (XDP_PASS, bytes.clone()));
        }
        // A wrong checksum stays exactly as wrong: the client's stack drops
        // the packet, as it would have without the LB in between.
        let mut bad = reply.checksummed();
        bad[34 + 16] ^= 0x5a;
        let (action, out) = w.run(&bad);
        assert_eq!(action, XDP_REDIRECT);
        let good = rewritten(&tcp(VIP4, 80, "198.18.0.2", 1000, PSH_ACK).checksummed(), ROUTER_MAC, w.veth_mac());
        let check = 34 + 16..34 + 18;
        assert_eq!((&out[..check.start], &out[check.end..]), (&good[..check.start], &good[check.end..]));
        assert_ne!(out[check.clone()], good[check], "a corrupted checksum came out valid");
        assert_eq!(w.nat_entries(), (1, 1));
        assert_eq!(w.counter(GlobalCounter::NatReplies), 1);
    });
}

#[test]
fn preserving_the_client_rewrites_only_the_destination() {
    in_world(|| {
        let mut w = World::new();
        w.route_clients();
        let mut service = web_nat(&w, "1024-65535");
        service.nat.as_mut().unwrap().preserve_client = true;
        w.set(&[service]);
        let (action, out) = w.run(&tcp("198.18.0.2", 40000, VIP4, 80, SYN).checksummed());
        assert_eq!(action, XDP_TX);
        let expected = tcp("198.18.0.2", 40000, "198.18.1.11", 8080, SYN).checksummed();
        assert_eq!(out, rewritten(&expected, backend_mac(11), LB_MAC));
        let (action, out) = w.run(&tcp("198.18.1.11", 8080, "198.18.0.2", 40000, PSH_ACK).checksummed());
        assert_eq!(action, XDP_REDIRECT);
        let expected = tcp(VIP4, 80, "198.18.0.2", 40000, PSH_ACK).checksummed();
        assert_eq!(out, rewritten(&expected, ROUTER_MAC, w.veth_mac()));
    });
}

/// An ICMP (IPv4) or ICMPv6 error from `src` to `dst` quoting `quote`, every
/// checksum computed in full.
fn icmp_error_frame(src: &str, dst: &str, kind: u8, code: u8, rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    let (src, dst): (IpAddr, IpAddr) = (src.parse().unwrap(), dst.parse().unwrap());
    let mut icmp = vec![kind, code, 0, 0];
    icmp.extend(rest);
    icmp.extend(quote);
    let mut f = Vec::new();
    f.extend(LB_MAC);
    f.extend(CLIENT_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let check = internet_checksum(&icmp);
            icmp[2..4].copy_from_slice(&check.to_be_bytes());
            f.extend(0x0800u16.to_be_bytes());
            let mut ip = vec![0x45, 0];
            ip.extend((20 + icmp.len() as u16).to_be_bytes());
            ip.extend([0x56, 0x78, 0, 0, 64, 1, 0, 0]);
            ip.extend(s.octets());
            ip.extend(d.octets());
            let check = internet_checksum(&ip);
            ip[10..12].copy_from_slice(&check.to_be_bytes());
            f.extend(ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut pseudo = [s.octets(), d.octets()].concat();
            pseudo.extend((icmp.len() as u32).to_be_bytes());
            pseudo.extend([0, 0, 0, 58]);
            pseudo.extend(&icmp);
            let check = internet_checksum(&pseudo);
            icmp[2..4].copy_from_slice(&check.to_be_bytes());
            f.extend(0x86ddu16.to_be_bytes());
            f.extend([0x60, 0, 0, 0]);
            f.extend((icmp.len() as u16).to_be_bytes());
            f.extend([58, 64]);
            f.extend(s.octets());
            f.extend(d.octets());
        }
        _ => panic!("mixed families"),
    }
    f.extend(icmp);
    f
}

#[test]
fn icmp_errors_about_nat_flows_reach_the_client_translated() {
    in_world(|| {
        let mut w = World::new();
        w.route_clients();
        w.set(&[
            nat_service(
                "dns",
                "198.18.0.100:53",
                Protocol::Udp,
                vec![w.nat_backend("198.18.1.12:5353", 12)],
                "40000-40009",
            ),
            nat_service(
                "web6",
                "[2001:db8::100]:80",
                Protocol::Tcp,
                vec![w.nat_backend("[2001:db8:0:2::11]:8080", 11)],
                "40000-40009",
            ),
        ]);
        let veth = w.veth_mac();
        // UDP over IPv4: the backend's port unreachable, quoting the IP
        // header and the UDP header (its checksum included).
        let request = udp("198.18.0.2", 40000, VIP4, 53).checksummed();
        let (_, translated) = w.run(&request);
        let port = source_port(&translated);
        let unreachable = icmp_error_frame("198.18.1.12", NAT_SOURCE4, 3, 3, [0; 4], &translated[14..14 + 28]);
        let (action, out) = w.run(&unreachable);
        assert_eq!(action, XDP_REDIRECT);
        let expected = icmp_error_frame(VIP4, "198.18.0.2", 3, 3, [0; 4], &request[14..14 + 28]);
        assert_eq!(out, rewritten(&expected, ROUTER_MAC, veth), "port unreachable (NAT port {port})");

        // TCP over IPv6: packet too big from a router on the way, quoting
        // the whole segment (the TCP checksum is in it too).
        let request = tcp("2001:db8::2", 40001, VIP6, 80, PSH_ACK).checksummed();
        let (_, translated) = w.run(&request);
        let mtu = 1400u32.to_be_bytes();
        let too_big = icmp_error_frame("2001:db8:0:2::fe", NAT_SOURCE6, 2, 0, mtu, &translated[14..]);
        let (action, out) = w.run(&too_big);
        assert_eq!(action, XDP_REDIRECT);
        let expected = icmp_error_frame(VIP6, "2001:db8::2", 2, 0, mtu, &request[14..]);
        assert_eq!(out, rewritten(&expected, ROUTER_MAC, veth), "packet too big");
        assert_eq!(w.counter(GlobalCounter::NatIcmpErrors), 2);

        // About no NAT flow (another port): passed untouched.
        let mut stray = translated[14..].to_vec();
        stray[40] ^= 0x01; // the quoted source port
        let stray = icmp_error_frame("2001:db8:0:2::fe", NAT_SOURCE6, 2, 0, mtu, &stray);
        assert_eq!(w.run(&stray), (XDP_PASS, stray.clone()));
        // An echo request to the NAT address is no error: passed.
        let echo = icmp_error_frame("198.18.1.12", NAT_SOURCE4, 8, 0, [0; 4], &translated[14..14 + 28]);
        assert_eq!(w.run(&echo), (XDP_PASS, echo.clone()));
    });
}

#[test]
fn a_new_connection_on_an_ended_nat_flows_five_tuple_revives_its_translation() {
    in_world(|| {
        let w = web_behind_nat("40000-40009");
        let finished = |w: &World| {
            let (flows, replies) = w.dataplane.nat_tables().unwrap();
            assert_eq!((flows.len(), replies.len()), (1, 1));
            (flows[0].1.flags & lb_common::FLOW_F_FINISHED != 0, replies[0].1.flags & lb_common::FLOW_F_FINISHED != 0)
        };
        let (_, out) = w.run(&tcp("198.18.0.2", 1000, VIP4, 80, SYN).checksummed());
        let port = source_port(&out);
        w.run(&tcp("198.18.0.2", 1000, VIP4, 80, FIN_ACK).checksummed());
        w.run(&tcp("198.18.1.11", 8080, NAT_SOURCE4, port, FIN_ACK).checksummed());
        assert_eq!(finished(&w), (true, true));
        // The client reuses the five-tuple: same backend, same translation,
        // no longer finished (its linger would end the new connection).
        let (_, out) = w.run(&tcp("198.18.0.2", 1000, VIP4, 80, SYN).checksummed());
        assert_eq!(source_port(&out), port);
        assert_eq!(finished(&w), (false, false));
    });
}

#[test]
fn established_nat_packets_take_their_translation_and_every_other_packet_the_full_way() {
    in_world(|| {
        let mut w = World::new();
        w.route_clients();
        let web = |w: &World, down: Option<u8>| {
            let backends = [11u8, 12]
                .map(|n| DesiredBackend {
                    down: Some(n) == down,
                    weight: u32::from(Some(n) != down),
                    ..w.nat_backend(&format!("198.18.1.{n}:8080"), n)
                })
                .to_vec();
            let service = nat_service("web", "198.18.0.100:80", Protocol::Tcp, backends, "40000-40009");
            DesiredService { scheduler: Scheduler::LeastConn, ..service }
        };
        w.set(&[web(&w, None)]);
        let id =
            |w: &World, n: u8| w.reconciler.backend_id("web", format!("198.18.1.{n}:8080").parse().unwrap()).unwrap();
        let ids = [id(&w, 11), id(&w, 12)];
        let active = |w: &World| {
            let counts = w.dataplane.least_conn_counts(&ids).unwrap();
            ids.map(|id| counts[&id].0)
        };
        let translation = |w: &World| {
            let (flows, _) = w.dataplane.nat_tables().unwrap();
            assert_eq!(flows.len(), 1, "{flows:?}");
            flows[0].1
        };
        let pinned = |w: &World| translation(w).flags & lb_common::NAT_FLOW_F_PINNED != 0;
        let client = |flags| tcp("198.18.0.2", 1000, VIP4, 80, flags).checksummed();
        // (backend, NAT source port) of a translated frame.
        let sent = |(action, out): (u32, Vec<u8>)| {
            assert_eq!(action, XDP_TX);
            (dst_mac(&out)[5], source_port(&out))
        };

        // The SYN is translated; the translation is its half-open record
        // (the half-open table is not written). It pins nothing.
        let (first, port) = sent(w.run(&client(SYN)));
        assert!(!pinned(&w));
        assert!(w.flows().is_empty());
        assert!(w.half_open().is_empty());
        // The handshake's ACK pins the flow to its translation, and writes
        // nothing else (no connection-table entry).
        assert_eq!(sent(w.run(&client(ACK))), (first, port));
        assert_eq!(w.counter(GlobalCounter::HalfOpenPromoted), 1);
        assert!(pinned(&w));
        assert!(w.flows().is_empty(), "a NAT flow was pinned in the connection table");
        let on_first = if first == 11 { [1, 0] } else { [0, 1] };
        assert_eq!(active(&w), on_first);
        for _ in 0..5 {
            assert_eq!(sent(w.run(&client(PSH_ACK))), (first, port));
        }
        assert_eq!(w.counter(GlobalCounter::ConntrackMiss), 1, "only the handshake's ACK missed");
        assert_eq!(w.counter(GlobalCounter::ConntrackHit), 5);
        assert_eq!(active(&w), on_first);
        // Once a second an established packet refreshes its translation
        // (so that the agent does not expire it), still without the full way.
        let before = translation(&w).last_seen_ns;
        thread::sleep(Duration::from_millis(1100));
        assert_eq!(sent(w.run(&client(PSH_ACK))), (first, port));
        assert!(translation(&w).last_seen_ns > before, "the translation was not refreshed");
        assert_eq!(w.counter(GlobalCounter::ConntrackMiss), 1, "the refresh went the full way");

        // Its backend fails: the next packet is rescheduled, with a new
        // translation (pinned again), and least_conn moves its count.
        w.set(&[web(&w, Some(first))]);
        let (second, _) = sent(w.run(&client(PSH_ACK)));
        assert_ne!(second, first);
        assert_eq!(translation(&w).backend_id, id(&w, second));
        assert!(pinned(&w));
        assert_eq!(active(&w), [on_first[1], on_first[0]]);
        assert_eq!(sent(w.run(&client(PSH_ACK))).0, second);

        // The client's FIN goes the full way: its translation marks the
        // flow finished (least_conn stops counting it), and its last ACKs
        // go the full way too, to the same backend.
        assert_eq!(sent(w.run(&client(FIN_ACK))).0, second);
        assert_ne!(translation(&w).flags & lb_common::FLOW_F_FINISHED, 0);
        assert_eq!(active(&w), [0, 0]);
        assert_eq!(sent(w.run(&client(ACK))).0, second);
        assert_eq!(active(&w), [0, 0]);
        assert!(w.flows().is_empty());
    });
}

#[test]
fn a_nat_handshake_is_recorded_by_its_translation_alone() {
    in_world(|| {
        let mut w = World::new();
        w.route_clients();
        // Round robin: a SYN scheduled afresh would go to the next backend.
        let web = |w: &World| DesiredService {
            scheduler: Scheduler::RoundRobin,
            ..nat_service(
                "web",
                "198.18.0.100:80",
                Protocol::Tcp,
                [11, 12].map(|n| w.nat_backend(&format!("198.18.1.{n}:8080"), n)).to_vec(),
                "40000-40009",
            )
        };
        w.set(&[web(&w)]);
        let client = |port, flags| tcp("198.18.0.2", port, VIP4, 80, flags).checksummed();
        let sent = |(action, out): (u32, Vec<u8>)| {
            assert_eq!(action, XDP_TX);
            (dst_mac(&out)[5], source_port(&out))
        };
        let translations = |w: &World| w.dataplane.nat_tables().unwrap().0;

        let first = sent(w.run(&client(1000, SYN)));
        assert!(w.half_open().is_empty(), "a NAT SYN wrote the half-open table");
        assert!(w.flows().is_empty());
        assert_eq!(translations(&w).len(), 1);
        // Another client's SYN takes the other backend: the scheduler moves on.
        let other = sent(w.run(&client(2000, SYN)));
        assert_ne!(other.0, first.0);
        // The first SYN again (retransmitted): its backend and source port.
        assert_eq!(sent(w.run(&client(1000, SYN))), first);
        assert_eq!(w.counter(GlobalCounter::SynRetransmit), 1);
        assert_eq!(w.counter(GlobalCounter::SynScheduled), 2, "a retransmission counted as scheduled");
        // The handshake's ACK: the SYN's backend, pinned by the translation
        // alone (NAT flows never enter the connection table, so no flood
        // can evict them from it).
        assert_eq!(sent(w.run(&client(1000, ACK))), first);
        assert_eq!(w.counter(GlobalCounter::HalfOpenPromoted), 1);
        assert!(w.flows().is_empty());
        // A SYN on the live flow, and a packet that goes the full way (its
        // FIN), keep its backend and translation: not scheduled afresh.
        let new_flows = |w: &World| -> u64 {
            [11, 12]
                .map(|n| w.reconciler.backend_id("web", format!("198.18.1.{n}:8080").parse().unwrap()).unwrap())
                .map(|id| w.dataplane.backend_counters(id).unwrap().new_flows)
                .iter()
                .sum()
        };
        assert_eq!(new_flows(&w), 2);
        assert_eq!(sent(w.run(&client(1000, SYN))), first);
        assert_eq!(w.counter(GlobalCounter::SynToEstablished), 1);
        assert_eq!(w.counter(GlobalCounter::SynScheduled), 2);
        assert_eq!(sent(w.run(&client(1000, FIN_ACK))), first);
        assert_eq!(sent(w.run(&client(1000, ACK))), first, "a last ACK left the ended flow's backend");
        assert_eq!(new_flows(&w), 2, "the flow was scheduled afresh");
        // A new connection on the same five-tuple: scheduled, and its ACK
        // goes where its SYN went.
        let again = sent(w.run(&client(1000, SYN)));
        assert_eq!(new_flows(&w), 3);
        assert_eq!(sent(w.run(&client(1000, ACK))), again);
        assert_eq!(w.counter(GlobalCounter::HalfOpenPromoted), 2);
        assert!(w.flows().is_empty());
        assert_eq!(translations(&w).len(), 2);
        // The translation expires (the agent removes idle ones): a new
        // connection on the five-tuple goes where its SYN went, in both of
        // two rounds (round robin picks the other backend each time).
        for round in 0..2 {
            w.dataplane.clear_nat_tables().unwrap();
            let syn = sent(w.run(&client(1000, SYN)));
            assert_eq!(sent(w.run(&client(1000, ACK))), syn, "round {round}");
            assert_eq!(sent(w.run(&client(1000, PSH_ACK))), syn, "round {round}");
            assert_eq!(translations(&w).len(), 1);
        }
    });
}

#[test]
fn a_nat_flow_keeps_its_translation_both_ways_after_its_service_turns_nat_off() {
    in_world(|| {
        let mut w = web_behind_nat("40000-40009");
        let client = |flags| tcp("198.18.0.2", 1000, VIP4, 80, flags).checksummed();
        let (_, out) = w.run(&client(SYN));
        let port = source_port(&out);
        w.run(&client(ACK));
        let reply = tcp("198.18.1.11", 8080, NAT_SOURCE4, port, PSH_ACK).checksummed();
        assert_eq!(w.run(&reply).0, XDP_REDIRECT);
        // The service turns to DSR: the flow stays on its retired NAT slot.
        let nat_off = DesiredService { forwarding: Forwarding::Dsr, nat: None, ..web_nat(&w, "40000-40009") };
        w.set(&[nat_off]);
        for round in 0..3 {
            let (action, out) = w.run(&client(PSH_ACK));
            assert_eq!((action, source_port(&out)), (XDP_TX, port), "round {round}: client to backend");
            let (action, out) = w.run(&reply);
            assert_eq!(action, XDP_REDIRECT, "round {round}: backend to client");
            assert_eq!(source_port(&out), 80, "round {round}");
        }
        // A new flow goes by DSR: its addresses and ports stay.
        let (action, out) = w.run(&tcp("198.18.0.2", 2000, VIP4, 80, SYN).checksummed());
        assert_eq!((action, source_port(&out), ip_destination(&out)), (XDP_TX, 2000, VIP4.parse().ok()));
        // What made the flow look for its translation is the VIP's flag:
        // once the agent clears it (the scan found the NAT slots
        // unreferenced; here only that write is applied, the slots kept),
        // the flow's packets go by DSR like any other unpinned one.
        let mut writes = w.reconciler.collect_retired(&std::collections::HashSet::new());
        writes.retain(|write| matches!(write, MapWrite::SetVip { .. }));
        assert_eq!(writes.len(), 1, "{writes:?}");
        w.dataplane.apply(&writes).expect("apply");
        let (action, out) = w.run(&client(PSH_ACK));
        assert_eq!((action, source_port(&out)), (XDP_TX, 1000));
    });
}

// ---- packet fuzzing --------------------------------------------------------

/// Frames the fuzzing test sends (`XDPLB_FUZZ_FRAMES` overrides it: the
/// benchmark's soak sends 10^7) and its seed (`XDPLB_FUZZ_SEED`).
const FUZZ_FRAMES: usize = 100_000;
const FUZZ_SEED: u64 = 0x786c_6662;

const FUZZ_TUNNEL4: &str = "198.18.0.101";
const FUZZ_GUE6: &str = "2001:db8::101";
const FUZZ_NAT4: &str = "198.18.0.102";
const FUZZ_NAT_BACKEND: &str = "198.18.1.11";

/// What the documented rules allow for one parsed frame.
enum Mode {
    Dsr(Vec<[u8; 6]>),
    Tunnel,
    Nat,
}

fn fuzz_service(parsed: &lb_testkit::fuzz::Packet) -> Option<Mode> {
    let dst = parsed.dst.to_string();
    let dsr = [11, 12, 13].map(backend_mac).to_vec();
    match (dst.as_str(), parsed.dport, parsed.proto) {
        (VIP4 | VIP6, 80, 6) => Some(Mode::Dsr(dsr)),
        (VIP4, 53, 17) => Some(Mode::Dsr(vec![backend_mac(31)])),
        (FUZZ_TUNNEL4, 80, 6) | (FUZZ_GUE6, 53, 17) => Some(Mode::Tunnel),
        (FUZZ_NAT4, 80, 6) => Some(Mode::Nat),
        _ => None,
    }
}

fn is_fuzz_vip_address(address: IpAddr) -> bool {
    [VIP4, VIP6, FUZZ_TUNNEL4, FUZZ_GUE6, FUZZ_NAT4].iter().any(|a| a.parse::<IpAddr>().unwrap() == address)
}

/// A frame's IP destination, if it has an IP header at all.
fn ip_destination(frame: &[u8]) -> Option<IpAddr> {
    let ip = if matches!(frame.get(12..14), Some([0x81, 0x00] | [0x88, 0xa8])) { 18 } else { 14 };
    match frame.get(ip).map(|b| b >> 4) {
        Some(4) => Some(IpAddr::from(<[u8; 4]>::try_from(frame.get(ip + 16..ip + 20)?).ok()?)),
        Some(6) => Some(IpAddr::from(<[u8; 16]>::try_from(frame.get(ip + 24..ip + 40)?).ok()?)),
        _ => None,
    }
}

/// Why `(action, out)` breaks the rules for `frame`, if it does.
fn fuzz_violation(frame: &[u8], action: u32, out: &[u8]) -> Option<String> {
    use lb_testkit::fuzz::{Parsed, parse};
    if ![XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT].contains(&action) {
        return Some(format!("action {action}"));
    }
    let untouched = action == XDP_PASS && out == frame;
    // Replies and ICMP errors to the NAT source may be translated back.
    let to_nat_source = ip_destination(frame) == Some(NAT_SOURCE4.parse().unwrap());
    match parse(frame) {
        Parsed::Unparsed | Parsed::OtherProtocol if untouched || to_nat_source => None,
        Parsed::Unparsed | Parsed::OtherProtocol => Some("not for a VIP, yet not passed untouched".into()),
        Parsed::Unclassifiable { dst } if is_fuzz_vip_address(dst) => {
            (action != XDP_DROP).then(|| "a fragment or extension header to a VIP address, not dropped".into())
        }
        Parsed::Unclassifiable { .. } if untouched => None,
        Parsed::Unclassifiable { .. } => Some("a fragment to no VIP, yet not passed untouched".into()),
        Parsed::Packet(p) => match fuzz_service(&p) {
            None if untouched || to_nat_source => None,
            None => Some("not for a VIP, yet not passed untouched".into()),
            Some(Mode::Dsr(macs)) => {
                if action != XDP_TX {
                    return Some("DSR: not sent".into());
                }
                if out.len() != frame.len() || out[12..] != frame[12..] || out[6..12] != LB_MAC {
                    return Some("DSR: more changed than the MAC addresses".into());
                }
                (!macs.contains(&out[..6].try_into().unwrap())).then(|| "DSR: not a backend's MAC".into())
            }
            Some(Mode::Tunnel) => {
                if action == XDP_DROP {
                    return None; // too big without DF, or not growable: counted drops
                }
                if action != XDP_TX {
                    return Some("tunnel: neither sent nor dropped".into());
                }
                if out[..6] == frame[6..12] {
                    // Returned to the client: only an ICMP "too big" may be.
                    let too_big = match parse(out) {
                        Parsed::OtherProtocol => ip_destination(out) == Some(p.src),
                        _ => false,
                    };
                    return (!too_big).then(|| "tunnel: returned to the client, but not as too-big".into());
                }
                let inner_end = frame.len().min(p.ip_offset + p.ip_len.max(1));
                let inner = &frame[p.ip_offset..inner_end.max(p.ip_offset)];
                let backend: IpAddr = if p.dst.is_ipv4() { "198.18.3.21" } else { "2001:db8:0:3::21" }.parse().unwrap();
                if out[..6] != backend_mac(21) || ip_destination(out) != Some(backend) {
                    return Some("tunnel: not encapsulated to the backend".into());
                }
                (!out.windows(inner.len().max(1)).any(|w| w == inner))
                    .then(|| "tunnel: the inner packet was not carried unchanged".into())
            }
            Some(Mode::Nat) => {
                if action == XDP_DROP {
                    return None; // table full or pool exhausted: counted drops
                }
                let Parsed::Packet(q) = parse(out) else { return Some("NAT: output unparsable".into()) };
                let payload = p.l4_offset + if p.proto == 6 { 20 } else { 8 };
                if out.len() != frame.len() || out[payload..] != frame[payload..] {
                    return Some("NAT: length or payload changed".into());
                }
                let backend: IpAddr = FUZZ_NAT_BACKEND.parse().unwrap();
                let source: IpAddr = NAT_SOURCE4.parse().unwrap();
                (q.dst != backend || q.dport != 8080 || q.src != source)
                    .then(|| format!("NAT: translated to {}:{} from {}", q.dst, q.dport, q.src))
            }
        },
    }
}

#[test]
fn fuzzed_frames_never_abort_and_change_only_what_their_mode_allows() {
    in_world(|| {
        let frames: usize = std::env::var("XDPLB_FUZZ_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(FUZZ_FRAMES);
        let seed: u64 = std::env::var("XDPLB_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(FUZZ_SEED);
        let mut w = World::new();
        w.route_clients();
        let dns = service("dns", "198.18.0.100:53", Protocol::Udp, vec![w.tx_backend("198.18.1.31", 31, 1)]);
        let ipip = DesiredService {
            name: "ipip".into(),
            ..tunnelled(&w, Forwarding::Ipip, &format!("{FUZZ_TUNNEL4}:80"), Protocol::Tcp, "198.18.3.21", 1500)
        };
        let gue = DesiredService {
            name: "gue".into(),
            ..tunnelled(&w, Forwarding::Gue, &format!("[{FUZZ_GUE6}]:53"), Protocol::Udp, "2001:db8:0:3::21", 1500)
        };
        let nat = nat_service(
            "nat",
            &format!("{FUZZ_NAT4}:80"),
            Protocol::Tcp,
            vec![w.nat_backend(&format!("{FUZZ_NAT_BACKEND}:8080"), 41)],
            "1024-65535",
        );
        w.set(&[web4(&w), web6(&w), dns, ipip, gue, nat]);

        let mut bases: Vec<Vec<u8>> = Vec::new();
        for flags in [SYN, ACK, PSH_ACK, FIN_ACK, RST] {
            bases.push(tcp("198.18.0.2", 40000, VIP4, 80, flags).bytes());
            bases.push(tcp("2001:db8:0:1::2", 40000, VIP6, 80, flags).bytes());
            bases.push(tcp("198.18.0.2", 40001, FUZZ_TUNNEL4, 80, flags).checksummed());
            bases.push(tcp("198.18.0.2", 40002, FUZZ_NAT4, 80, flags).checksummed());
        }
        bases.extend([
            udp("198.18.0.2", 5353, VIP4, 53).bytes(),
            udp("2001:db8:0:1::2", 5353, FUZZ_GUE6, 53).checksummed(),
            udp("198.18.0.2", 5353, VIP4, 54).bytes(),
            tcp("198.18.0.2", 40000, VIP4, 81, SYN).bytes(),
            tcp("198.18.0.2", 40000, "198.18.9.9", 80, SYN).bytes(),
            Frame { ipv4_option_words: 3, ..tcp("198.18.0.2", 40003, VIP4, 80, SYN) }.bytes(),
            Frame { frag: 0x2000, ..tcp("198.18.0.2", 40004, VIP4, 80, ACK) }.bytes(),
            Frame { frag: 0x0010, ..udp("198.18.0.2", 5353, VIP4, 53) }.bytes(),
            Frame { ipv6_next_header: Some(0), ..tcp("2001:db8:0:1::2", 40005, VIP6, 80, SYN) }.bytes(),
            Frame { vlan: Some(100), ..tcp("198.18.0.2", 40006, VIP4, 80, SYN) }.bytes(),
            Frame { vlan: Some(100), ..tcp("2001:db8:0:1::2", 40006, VIP6, 80, ACK) }.bytes(),
            Frame { proto: 1, ..udp("198.18.1.11", 0, NAT_SOURCE4, 0) }.bytes(),
        ]);
        // A backend's reply to a translated flow (its port from the flow's SYN).
        let (_, translated) = w.run(&bases[3]);
        let reply = tcp(FUZZ_NAT_BACKEND, 8080, NAT_SOURCE4, source_port(&translated), ACK).checksummed();
        bases.push(reply);

        let started = std::time::Instant::now();
        let (mut sent, mut too_short, mut actions) = (0usize, 0usize, BTreeMap::new());
        for (mutation, frame) in lb_testkit::fuzz::mutated(&bases, seed) {
            if sent == frames {
                break;
            }
            // The kernel runs XDP on no frame shorter than an Ethernet header.
            if frame.len() < 14 {
                too_short += 1;
                continue;
            }
            let (action, out) = w.run(&frame);
            if let Some(why) = fuzz_violation(&frame, action, &out) {
                panic!(
                    "frame {sent} (seed {seed:#x}, {mutation:?}): {why}\n in: {frame:02x?}\nout ({action}): {out:02x?}"
                );
            }
            *actions.entry(action).or_insert(0usize) += 1;
            sent += 1;
        }
        assert_eq!(sent, frames);
        // The mutations reach every outcome, not just the parser's rejections.
        for action in [XDP_DROP, XDP_PASS, XDP_TX] {
            assert!(actions.get(&action).copied().unwrap_or(0) > frames / 100, "{actions:?}");
        }
        eprintln!(
            "fuzzing: {sent} frames in {:?}, by action {actions:?}, seed {seed:#x} ({too_short} shorter than an \
             Ethernet header skipped)",
            started.elapsed()
        );
    });
}

#[test]
fn the_fuzzing_rules_reject_what_each_mode_must_not_do() {
    let syn = tcp("198.18.0.2", 40000, VIP4, 80, SYN).bytes();
    let to_backend = rewritten(&syn, backend_mac(11), LB_MAC);
    assert_eq!(fuzz_violation(&syn, XDP_TX, &to_backend), None);
    assert!(fuzz_violation(&syn, 0, &syn).is_some(), "XDP_ABORTED");
    assert!(fuzz_violation(&syn, XDP_PASS, &syn).is_some(), "a VIP's SYN passed");
    assert!(fuzz_violation(&syn, XDP_TX, &rewritten(&syn, backend_mac(99), LB_MAC)).is_some(), "no backend's MAC");
    let mut payload_changed = to_backend.clone();
    *payload_changed.last_mut().unwrap() ^= 1;
    assert!(fuzz_violation(&syn, XDP_TX, &payload_changed).is_some(), "DSR changed the payload");
    let other = tcp("198.18.0.2", 40000, "198.18.9.9", 80, SYN).bytes();
    assert_eq!(fuzz_violation(&other, XDP_PASS, &other), None);
    assert!(fuzz_violation(&other, XDP_PASS, &to_backend).is_some(), "a non-VIP frame changed");
    assert!(fuzz_violation(&other, XDP_DROP, &other).is_some(), "a non-VIP frame dropped");
    let fragment = Frame { frag: 0x2000, ..tcp("198.18.0.2", 40000, VIP4, 80, ACK) }.bytes();
    assert!(fuzz_violation(&fragment, XDP_PASS, &fragment).is_some(), "a VIP fragment passed");
    let tunnelled = tcp("198.18.0.2", 40001, FUZZ_TUNNEL4, 80, SYN).bytes();
    let tunnel = Tunnel {
        src: TUNNEL_SRC4.parse().unwrap(),
        dst: "198.18.3.21".parse().unwrap(),
        src_mac: LB_MAC,
        dst_mac: backend_mac(21),
        gue_ports: None,
        flow_label: 0,
    };
    let encapsulated_right = encapsulated(&tunnelled, &tunnel);
    assert_eq!(fuzz_violation(&tunnelled, XDP_TX, &encapsulated_right), None);
    let not_encapsulated = rewritten(&tunnelled, backend_mac(21), LB_MAC);
    assert!(fuzz_violation(&tunnelled, XDP_TX, &not_encapsulated).is_some(), "sent without a tunnel");
    let mut inner_changed = encapsulated_right.clone();
    inner_changed[60] ^= 0xff;
    assert!(fuzz_violation(&tunnelled, XDP_TX, &inner_changed).is_some(), "the tunnel's inner packet changed");
    let natted = tcp("198.18.0.2", 40002, FUZZ_NAT4, 80, SYN).bytes();
    assert!(fuzz_violation(&natted, XDP_TX, &natted).is_some(), "NAT left the destination");
}
