//! target/bench/report.md and its charts.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Result;
use plotters::prelude::*;

use crate::{
    control::ControlPlane,
    packet::Cost,
    peer::{NO_LB, PeerRun},
    throughput::Throughput,
};

pub struct Report {
    pub quick: bool,
    pub iterations: u32,
    pub rounds: usize,
    pub costs: Vec<Cost>,
    pub throughput: Vec<Throughput>,
    pub peer: Vec<PeerRun>,
    pub control: Option<ControlPlane>,
    /// The fuzzing soak's summary line, when it ran.
    pub soak: Option<String>,
}

/// Goals (net ns) from the benchmark's brief, by fixture.
/// Section 1b: the tunnel fixtures against the baseline that encapsulates
/// the same way without any lookup.
fn tunnels(md: &mut String, r: &Report) -> Result<()> {
    let median = |fixture: &str, program: &str| {
        r.costs.iter().find(|c| c.fixture == fixture && c.program == program).map(|c| c.ns.median())
    };
    writeln!(md, "\n### Tunnel forwarding\n")?;
    writeln!(
        md,
        "The tunnel fixtures (3 backends; IPv6 VIP → IPv6 backends) against parse + the same encapsulation (xdplb's \
         header writer) to a fixed backend + XDP_TX, with no lookup: **xdplb − baseline** is what xdplb's own logic \
         (VIP lookup, connection table, scheduling, MTU check) costs on the tunnel paths. Net = minus the XDP_DROP run.\n"
    )?;
    writeln!(md, "| fixture | xdplb net ns | encap baseline net ns | **xdplb − baseline ns** | xdplb / baseline |")?;
    writeln!(md, "|---|---:|---:|---:|---:|")?;
    for c in r
        .costs
        .iter()
        .filter(|c| c.program == "xdplb" && (c.fixture.starts_with("ipip_") || c.fixture.starts_with("gue_")))
    {
        let (Some(drop), Some(base)) = (median(&c.fixture, "xdp_drop"), median(&c.fixture, "parse_encap_tx")) else {
            continue;
        };
        let (ours, theirs) = (c.ns.median() - drop, base - drop);
        writeln!(md, "| {} | {ours:.1} | {theirs:.1} | **{:.1}** | {:.2}× |", c.fixture, ours - theirs, ours / theirs)?;
    }
    Ok(())
}

/// Section 2b: the connection table's flavours side by side, established
/// and new flows, one and two generator threads.
fn flavours(md: &mut String, r: &Report) -> Result<()> {
    let find = |program: &str, frame: &str, threads: usize| {
        r.throughput
            .iter()
            .find(|t| t.program == program && t.frame == frame && t.threads == threads)
            .map(|t| t.mpps.median())
    };
    if find("flow_no_common_lru", "tcp_ack_64B", 1).is_none() {
        return Ok(());
    }
    writeln!(md, "\n### Connection-table flavour\n")?;
    writeln!(
        md,
        "The flow-lookup program (parse, one lookup, an insert when the flow is new, MAC swap) with each flavour of \
         LRU table, the same size: the kernel's common LRU (xdplb's), per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`), and \
         one table per CPU (Katran's choice; RSS keeps a flow on one CPU). Established: the generator's 60000 flows in \
         turn; new: every frame a new flow (the table fills, then evicts). Median Mpps.\n"
    )?;
    writeln!(
        md,
        "| flows | threads | common LRU | per-CPU lists | per-CPU tables | xdplb |\n|---|---:|---:|---:|---:|---:|"
    )?;
    for (frame, label) in [("tcp_ack_64B", "established"), (crate::throughput::NEW_FLOWS_FRAME, "new")] {
        for threads in [1, 2] {
            let cell = |program: &str| find(program, frame, threads).map_or("–".to_string(), |m| format!("{m:.3}"));
            writeln!(
                md,
                "| {label} | {threads} | {} | {} | {} | {} |",
                cell("parse_flow_lookup_tx"),
                cell("flow_no_common_lru"),
                cell("flow_per_cpu_tables"),
                cell("xdplb")
            )?;
        }
    }
    Ok(())
}

/// Section 1b: every fixture against the floor program of its path.
fn floors(md: &mut String, r: &Report) -> Result<()> {
    writeln!(
        md,
        "\n### Against the floor of each path
"
    )?;
    writeln!(
        md,
        "The floor program does the least a stateful balancer does on the fixture's path, with xdplb's parser and map \
         shapes and sizes: parse, one VIP lookup, then for a SYN a Maglev slot read and a flow insert, for any other \
         packet one flow lookup (a slot read and an insert when the flow is new), and a MAC swap (tunnel fixtures: \
         the same encapsulation as xdplb). Its table is warmed like xdplb's; before the new-flow SYN fixtures, \
         `tcp_handshake` and `tcp_ack_60k_flows`, both tables are emptied and refilled alike, so that their entries lie alike in memory \
         (`tcp_ack_60k_flows` visits its flows in another order than it pinned them: in that order a table that \
         hands out its elements in sequence lets the prefetcher read ahead, 200 ns against 400). NAT's floor, client → backend: one \
         lookup of the flow's translation (for a SYN or a flow without one: a slot read, a reply entry inserted to \
         reserve a source port, the translation inserted), then the same rewrite as xdplb and a MAC swap; backend → \
         client: a VIP miss, the reply entry, the rewrite, the kernel's FIB for the client's next hop. Its NAT tables \
         are emptied with xdplb's before each NAT fixture. Net ns (minus XDP_DROP). Goal: xdplb ≤ 1.15× its floor.\n"
    )?;
    writeln!(md, "| fixture | backends | xdplb net ns | floor net ns | xdplb − floor ns | **xdplb / floor** |")?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|")?;
    for c in r.costs.iter().filter(|c| c.program == "xdplb") {
        let median = |p: &str| {
            r.costs
                .iter()
                .find(|x| x.fixture == c.fixture && x.backends == c.backends && x.program == p)
                .map(|x| x.ns.median())
        };
        let (Some(drop), Some(floor)) = (median("xdp_drop"), median("floor")) else { continue };
        let (ours, theirs) = (c.ns.median() - drop, floor - drop);
        let ratio = ours / theirs;
        let goal = if ratio <= 1.15 { "✔" } else { "✘" };
        writeln!(
            md,
            "| {} | {} | {ours:.1} | {theirs:.1} | {:.1} | **{ratio:.2}×** {goal} |",
            c.fixture,
            c.backends,
            ours - theirs
        )?;
    }
    Ok(())
}

/// Section 1c: what a SYN costs with the half-open table, and under a
/// flood (nothing recorded), beside an established flow's packet.
fn syn_path(md: &mut String, r: &Report) -> Result<()> {
    let net = |fixture: &str, backends: usize| {
        let median = |program: &str| {
            r.costs
                .iter()
                .find(|c| c.fixture == fixture && c.backends == backends && c.program == program)
                .map(|c| c.ns.median())
        };
        Some(median("xdplb")? - median("xdp_drop")?)
    };
    writeln!(md, "\n### The SYN path and SYN floods\n")?;
    writeln!(
        md,
        "A SYN never writes the connection table: it records the new flow in the half-open table, which the client's \
         ACK moves to the connection table. It looks its five-tuple up in the connection table first (a live flow \
         keeps its backend) unless the agent's table scan found every pinned flow of the service on the backend its \
         ring gives (a hash scheduler, no ring change since): the ring then gives a live flow's backend anyway. A CPU \
         that sees more than `syn_flood_threshold` SYNs in a second records nothing for hash-scheduled services. Net \
         ns (minus XDP_DROP), new five-tuple per packet, tables warmed to the default connection-table size, flood \
         detection on but not tripped except in the flooded column.\n"
    )?;
    writeln!(
        md,
        "| backends | SYN, recorded half-open | … ring changed (connection table looked at) | SYN, flooded (nothing \
         recorded) | flooded / recorded | ACK, established |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|")?;
    for backends in [3, 100] {
        let (Some(recorded), Some(changed), Some(flooded), Some(ack)) = (
            net("tcp_syn_new_flow", backends),
            net("tcp_syn_new_flow_ring_changed", backends),
            net("tcp_syn_new_flow_flooded", backends),
            net("tcp_ack_established", backends),
        ) else {
            continue;
        };
        writeln!(
            md,
            "| {backends} | {recorded:.1} | {changed:.1} | {flooded:.1} | {:.2}× | {ack:.1} |",
            flooded / recorded
        )?;
    }
    writeln!(md, "\n### Connection-table sync\n")?;
    writeln!(
        md,
        "With `[sync]`, every flow the data plane pins (the handshake's ACK, a new flow that does not start with a \
         SYN) is also written to a ring buffer that the agent drains and sends to its peers. SYNs and established \
         flows do not touch it. Net ns (minus XDP_DROP), a new non-SYN five-tuple per packet, the ring drained by a \
         thread on the other CPU.\n"
    )?;
    writeln!(
        md,
        "| backends | SYN, sync off | SYN, sync on | added on the SYN path | new flow (pinned), sync off | \
         new flow, sync on | added per pinned flow |"
    )?;
    writeln!(md, "|---:|---:|---:|---:|---:|---:|---:|")?;
    for backends in [3, 100] {
        let (Some(syn_off), Some(syn_on), Some(off), Some(on)) = (
            net("tcp_syn_new_flow", backends),
            net("tcp_syn_new_flow_synced", backends),
            net("tcp_ack_new_flow", backends),
            net("tcp_ack_new_flow_synced", backends),
        ) else {
            continue;
        };
        writeln!(
            md,
            "| {backends} | {syn_off:.1} | {syn_on:.1} | {:+.1} ns | {off:.1} | {on:.1} | {:+.1} ns |",
            syn_on - syn_off,
            on - off
        )?;
    }
    Ok(())
}

fn goal(fixture: &str) -> Option<f64> {
    match fixture {
        "tcp_ack_established" => Some(35.0),
        "udp" => Some(40.0),
        "tcp_syn" => Some(110.0),
        "tcp_syn_new_flow" => Some(400.0),
        "non_vip" => Some(10.0),
        _ => None,
    }
}

fn command(cmd: &str, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_else(|| "unknown".into())
}

pub fn write(r: &Report, dir: &Path) -> Result<PathBuf> {
    let mut md = String::new();
    writeln!(md, "# xdplb benchmark report\n")?;
    if r.quick {
        writeln!(md, "**`--quick` run: a smoke test of the harness; its figures are rough.**\n")?;
    }
    writeln!(md, "| | |\n|---|---|")?;
    writeln!(md, "| date | {} |", command("date", &["-u", "+%Y-%m-%d %H:%M UTC"]))?;
    writeln!(md, "| kernel | {} |", command("uname", &["-r"]))?;
    writeln!(md, "| CPU | {} × {} |", std::thread::available_parallelism().map_or(0, |n| n.get()), cpu_model())?;
    writeln!(md, "| xdplb | {} |", command("git", &["describe", "--always", "--dirty"]))?;
    writeln!(md)?;

    // 1. Per-packet cost.
    let drop_cost = |fixture: &str, backends: usize| {
        r.costs
            .iter()
            .find(|c| c.fixture == fixture && c.backends == backends && c.program == "xdp_drop")
            .map(|c| c.ns.median())
    };
    writeln!(md, "## 1. Per-packet cost (BPF_PROG_TEST_RUN)\n")?;
    writeln!(
        md,
        "One call per packet, {} calls per fixture and program, mean of the kernel-reported duration; {} interleaved rounds, \
         median (min–max). Programs attached to idle veths (XDP dispatcher), CPU {} pinned. **net** = xdplb − the XDP_DROP \
         program (the fixed cost of a test run). The MAC-swap baseline parses Ethernet/IP/L4 with xdplb's own parser, swaps \
         MACs and returns XDP_TX.\n",
        r.iterations,
        r.rounds,
        crate::BENCH_CPU
    )?;
    writeln!(md, "| fixture | backends | xdplb ns | XDP_DROP ns | parse+swap+TX ns | **xdplb net ns** | goal (net) |")?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|")?;
    let mut chart_rows = Vec::new();
    for c in r.costs.iter().filter(|c| c.program == "xdplb") {
        let find =
            |p: &str| r.costs.iter().find(|x| x.fixture == c.fixture && x.backends == c.backends && x.program == p);
        let (drop, swap) = (find("xdp_drop"), find("parse_macswap_tx"));
        let net = c.ns.median() - drop_cost(&c.fixture, c.backends).unwrap_or(0.0);
        let range = |s: &crate::stats::Samples| format!("{:.1} ({:.1}–{:.1})", s.median(), s.min(), s.max());
        let goal_text = match goal(&c.fixture) {
            Some(g) if net <= g => format!("≤ {g:.0} ✔"),
            Some(g) => format!("≤ {g:.0} ✘"),
            None => "–".into(),
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | **{net:.1}** | {goal_text} |",
            c.fixture,
            c.backends,
            range(&c.ns),
            drop.map(|d| range(&d.ns)).unwrap_or_default(),
            swap.map(|d| range(&d.ns)).unwrap_or_default(),
        )?;
        chart_rows.push((
            format!("{} ({})", c.fixture, c.backends),
            net,
            swap.map_or(0.0, |s| s.ns.median()) - drop_cost(&c.fixture, c.backends).unwrap_or(0.0),
        ));
    }
    floors(&mut md, r)?;
    tunnels(&mut md, r)?;
    syn_path(&mut md, r)?;
    anatomy(&mut md, r)?;
    bars(
        &dir.join("per_packet.png"),
        "Per-packet cost, net of the XDP_DROP run (ns)",
        &chart_rows,
        ("xdplb", "parse + MAC swap + XDP_TX"),
    )?;
    writeln!(md, "\n![per-packet cost](per_packet.png)\n")?;

    // 2. Throughput.
    writeln!(md, "## 2. Throughput through the namespace topology\n")?;
    writeln!(
        md,
        "A live-frames traffic generator (BPF_F_TEST_XDP_LIVE_FRAMES) sends 64-byte frames from the generator's veth \
         with the next of 60000 source ports each; the LB's veth runs the program under test; frames sent back towards \
         the backend are counted by an XDP sink. The sink row counts what reaches the LB at all. Median Mpps (min–max). \
         For `udp_64B_ipip` (an IPIP service) the baseline column is the parse + IPIP + XDP_TX program instead of the MAC \
         swap. The flow-lookup baseline adds one lookup in an LRU table of the connection table's shape and size (its \
         60000 flows present after the first frames; new flows inserted): the floor of a stateful balancer, which the \
         goal (≥ 0.9×) is measured against for the TCP frames (it runs only those).\n"
    )?;
    writeln!(
        md,
        "| frame | threads | xdplb Mpps | parse+swap+TX Mpps | + flow lookup Mpps | XDP_DROP sink Mpps | xdplb / swap | \
         **xdplb / flow lookup** |"
    )?;
    writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut tp_rows = Vec::new();
    for t in r.throughput.iter().filter(|t| t.program == "xdplb") {
        let find = |p: &str| {
            r.throughput
                .iter()
                .find(|x| x.program == p && x.frame == t.frame && x.threads == t.threads)
                .map(|x| &x.mpps)
        };
        // The tunnel frame's fair baseline encapsulates too.
        let swap = if t.frame.ends_with("_ipip") { find("parse_encap_tx") } else { find("parse_macswap_tx") };
        let lookup = find("parse_flow_lookup_tx");
        let sink = find("xdp_drop_sink");
        let range = |s: &crate::stats::Samples| format!("{:.3} ({:.3}–{:.3})", s.median(), s.min(), s.max());
        let ratio = swap.map_or(f64::NAN, |s| t.mpps.median() / s.median());
        let to_lookup = match lookup {
            Some(s) if t.mpps.median() / s.median() >= 0.9 => format!("**{:.2}×** ✔", t.mpps.median() / s.median()),
            Some(s) => format!("**{:.2}×** ✘", t.mpps.median() / s.median()),
            None => "–".to_string(),
        };
        writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {ratio:.2}× | {to_lookup} |",
            t.frame,
            t.threads,
            range(&t.mpps),
            swap.map(range).unwrap_or_default(),
            lookup.map(range).unwrap_or_default(),
            sink.map(range).unwrap_or_default()
        )?;
        tp_rows.push((format!("{} ×{}", t.frame, t.threads), t.mpps.median(), swap.map_or(0.0, |s| s.median())));
    }
    flavours(&mut md, r)?;
    bars(&dir.join("throughput.png"), "Delivered Mpps", &tp_rows, ("xdplb", "parse + MAC swap + XDP_TX"))?;
    writeln!(md, "\n![throughput](throughput.png)\n")?;

    // 3. Peer.
    writeln!(md, "## 3. Against HAProxy (mode tcp, roundrobin)\n")?;
    writeln!(
        md,
        "Same harness topology and backends (nginx); wrk -t2 -c64 from the client. LB CPU = the LB's processes (agent or \
         haproxy) + xdplb's XDP run time (kernel BPF stats). Machine softirq covers every namespace on this one host.\n"
    )?;
    writeln!(
        md,
        "| LB | mode | requests/s | LB CPU s | of which XDP s | LB CPU s per 100k requests | machine softirq s |"
    )?;
    writeln!(md, "|---|---|---:|---:|---:|---:|---:|")?;
    for p in &r.peer {
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.3} | {:.3} | {:.3} | {:.2} |",
            p.lb,
            p.mode,
            p.requests_per_s,
            p.lb_process_cpu_s + p.lb_xdp_cpu_s,
            p.lb_xdp_cpu_s,
            p.cpu_per_100k(),
            p.machine_softirq_s
        )?;
    }
    let mut peer_rows = Vec::new();
    for mode in ["keep-alive", "new connections"] {
        let get = |lb: &str| r.peer.iter().find(|p| p.lb == lb && p.mode == mode);
        if let (Some(x), Some(h)) = (get("xdplb"), get("haproxy")) {
            writeln!(
                md,
                "\n{mode}: xdplb / HAProxy requests/s **{:.2}×**; LB CPU per 100k requests **{:.3}×** (lower is better).",
                x.requests_per_s / h.requests_per_s,
                x.cpu_per_100k() / h.cpu_per_100k().max(1e-12)
            )?;
            peer_rows.push((format!("{mode} (k req/s)"), x.requests_per_s / 1000.0, h.requests_per_s / 1000.0));
        }
    }
    // NAT against HAProxy: the like-for-like pair (both hide the backends).
    // Goal: ≥ 5× HAProxy's new connections per second at ≤ 5% of its LB CPU.
    let get = |lb: &str| r.peer.iter().find(|p| p.lb == lb && p.mode == "new connections");
    if let (Some(x), Some(h)) = (get("xdplb NAT"), get("haproxy")) {
        writeln!(
            md,
            "\nnew connections, xdplb NAT / HAProxy: requests/s **{:.2}×** (goal ≥ 5×); LB CPU per 100k requests \
             **{:.3}×** (goal ≤ 0.05×).",
            x.requests_per_s / h.requests_per_s,
            x.cpu_per_100k() / h.cpu_per_100k().max(1e-12)
        )?;
        if let Some(none) = get(NO_LB) {
            writeln!(
                md,
                "\nWithout a load balancer (one wrk per backend, the same 64 connections) the client and backends \
                 sustain {:.0} new connections/s on this machine: **{:.2}×** HAProxy's, the most any LB could reach \
                 here. xdplb NAT reaches {:.0} % of it, HAProxy {:.0} %.",
                none.requests_per_s,
                none.requests_per_s / h.requests_per_s,
                100.0 * x.requests_per_s / none.requests_per_s,
                100.0 * h.requests_per_s / none.requests_per_s
            )?;
        }
    }
    bars(&dir.join("peer.png"), "Requests per second (thousands)", &peer_rows, ("xdplb", "HAProxy"))?;
    writeln!(md, "\n![xdplb vs HAProxy](peer.png)\n")?;

    // 4. Control plane.
    if let Some(control) = &r.control {
        control_plane(&mut md, control)?;
    }
    // 5. Fuzzing soak.
    if let Some(soak) = &r.soak {
        writeln!(md, "\n## 5. Fuzzing soak\n")?;
        writeln!(
            md,
            "The packet test's fuzzer (bit flips, truncation at every length, random lengths and bytes, bogus header \
             lengths, protocols and fragment fields, VLAN and QinQ tags) through the real program with DSR, IPIP, GUE \
             and NAT services, every result checked against the documented rules; a new seed each run. No frame \
             broke a rule (the soak fails the benchmark otherwise).\n\n    {}",
            soak.trim()
        )?;
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md)?;
    Ok(path)
}

fn control_plane(md: &mut String, control: &ControlPlane) -> Result<()> {
    writeln!(md, "## 4. Control plane\n")?;
    writeln!(md, "| Maglev table build (65537 slots, criterion) | mean |\n|---|---:|")?;
    for (n, ns) in &control.maglev_build {
        writeln!(md, "| {n} backends | {:.2} ms |", ns / 1e6)?;
    }
    let ms = |d: &std::time::Duration| d.as_secs_f64() * 1e3;
    writeln!(
        md,
        "\nRing slots are written in place through a mapping of the map (`BPF_F_MMAPABLE`), only the slots that \
         change; a service's new or changed backends go in one `BPF_MAP_UPDATE_BATCH`; other writes are one \
         syscall each.\n\n| change | planned (Maglev, diff) | config → maps updated | map writes | \
         goal |\n|---|---:|---:|---:|---:|"
    )?;
    for change in &control.changes {
        let goal = match ms(&change.total) {
            _ if change.name.contains("10,000") => "–",
            ms if ms <= 10.0 => "≤ 10 ms ✔",
            _ => "≤ 10 ms ✘",
        };
        writeln!(
            md,
            "| {} | {:.1} ms | {:.1} ms | {} | {goal} |",
            change.name,
            ms(&change.planned),
            ms(&change.total),
            change.writes
        )?;
    }
    let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
    let total: u64 = control.memory.iter().map(|(_, b, _)| b).sum();
    let estimated: u64 = control.memory.iter().map(|(_, _, e)| e).sum();
    writeln!(
        md,
        "\nDefault sizes (64 services × 65537 slots, 524288 flows), a config without persistence or NAT: the \
         affinity and NAT tables have one entry until a service needs them.\n\n| map | kernel memory | `xdplb \
         check` estimate |\n|---|---:|---:|"
    )?;
    for (name, bytes, estimate) in &control.memory {
        writeln!(md, "| {name} | {:.1} MiB | {:.1} MiB |", mib(*bytes), mib(*estimate))?;
    }
    let goal = if mib(total) <= 80.0 { "✔" } else { "✘" };
    writeln!(md, "| **total** (goal ≤ 80 MiB {goal}) | **{:.1} MiB** | {:.1} MiB |", mib(total), mib(estimated))?;
    writeln!(
        md,
        "\nWith a persistence and a NAT service as well (`xdplb check`): {:.1} MiB.",
        mib(control.memory_all_tables)
    )?;
    let scale = &control.scale;
    let table = &scale.flow_table;
    writeln!(md, "\n| scale | result |\n|---|---|")?;
    writeln!(
        md,
        "| a service of 10,000 backends (65537 slots) | {} backends in its Maglev table; maps updated in the row above |",
        scale.backends_with_slots
    )?;
    writeln!(
        md,
        "| connection table of {} entries | {:.1} MiB; {} new flows sent in {:.1} s, {} of them in the table after |",
        table.entries,
        mib(table.memory),
        table.sent,
        table.sent_in.as_secs_f64(),
        table.found
    )?;
    Ok(())
}

/// Where an established flow's time goes: the baselines that add one
/// lookup, clock read, xdplb's counters or its backend slot each to parse +
/// MAC swap + XDP_TX, against xdplb and its floor program.
fn anatomy(md: &mut String, r: &Report) -> Result<()> {
    let net = |fixture: &str, program: &str| -> Option<f64> {
        let get = |p: &str| {
            r.costs.iter().find(|c| c.fixture == fixture && c.backends == 3 && c.program == p).map(|c| c.ns.median())
        };
        Some(get(program)? - get("xdp_drop")?)
    };
    for fixture in ["tcp_ack_established", "tcp_ack_60k_flows", "non_vip"] {
        let (Some(swap), Some(vip), Some(flow), Some(xdplb)) = (
            net(fixture, "parse_macswap_tx"),
            net(fixture, "swap_plus_vip_lookup"),
            net(fixture, "swap_plus_flow_lookup"),
            net(fixture, "xdplb"),
        ) else {
            continue;
        };
        writeln!(md, "\n**Where the time goes, `{fixture}` (3 backends), ns net of XDP_DROP:**\n")?;
        writeln!(md, "| program | net ns |\n|---|---:|")?;
        writeln!(md, "| parse + MAC swap + XDP_TX | {swap:.1} |")?;
        writeln!(md, "| … + one VIP-shaped hash lookup (20-byte key) | {vip:.1} (lookup ≈ {:.1}) |", vip - swap)?;
        writeln!(
            md,
            "| … + one flow-shaped LRU lookup (40-byte key, 524288 entries) | {flow:.1} (lookup ≈ {:.1}) |",
            flow - swap
        )?;
        writeln!(md, "| parse + both lookups + swap (the rows above added up) | {:.1} |", vip + flow - swap)?;
        for (program, helper) in [
            ("swap_plus_coarse_clock", "bpf_ktime_get_coarse_ns"),
            ("swap_plus_ns_clock", "bpf_ktime_get_ns"),
            ("swap_plus_jiffies", "bpf_jiffies64"),
        ] {
            if let Some(clock) = net(fixture, program) {
                writeln!(md, "| … swap + one clock read, `{helper}` | {clock:.1} (read ≈ {:.1}) |", clock - swap)?;
            }
        }
        let (counters, backend, jiffies) =
            (net(fixture, "swap_plus_counters"), net(fixture, "backend_macs"), net(fixture, "swap_plus_jiffies"));
        if let Some(counters) = counters {
            writeln!(
                md,
                "| … swap + xdplb's five counter updates (3 global, the VIP's, the backend's) | {counters:.1} (counters ≈ {:.1}) |",
                counters - swap
            )?;
        }
        if let Some(backend) = backend {
            writeln!(
                md,
                "| parse + the MACs from a backend slot (array lookup) instead of the swap + XDP_TX | {backend:.1} (≈ {:+.1}) |",
                backend - swap
            )?;
        }
        match (net(fixture, "floor"), counters, backend, jiffies) {
            // Each part alone, in a program of its own: in one program the
            // CPU overlaps some of them, so they may add up to more.
            (Some(floor), Some(counters), Some(backend), Some(jiffies)) => {
                writeln!(md, "| the floor program (parse + both lookups + swap, one program) | {floor:.1} |")?;
                writeln!(
                    md,
                    "| xdplb | {xdplb:.1} ({:+.1} above the floor program; alone, the counters {:.1}, the backend slot {:+.1}, \
                     a clock read shaped as xdplb's cached one (jiffies and a per-CPU slot) {:.1}) |",
                    xdplb - floor,
                    counters - swap,
                    backend - swap,
                    jiffies - swap
                )?;
            }
            _ => writeln!(md, "| xdplb | {xdplb:.1} |")?,
        }
    }
    Ok(())
}

/// A horizontal grouped bar chart: one row per label, two bars, the label
/// and both values written above them.
fn bars(path: &Path, title: &str, rows: &[(String, f64, f64)], legend: (&str, &str)) -> Result<()> {
    let n = rows.len().max(1);
    let root = BitMapBackend::new(path, (1100, 110 + 64 * n as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = rows.iter().map(|r| r.1.max(r.2)).fold(0.0, f64::max).max(1e-9) * 1.1;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(14)
        .x_label_area_size(34)
        .build_cartesian_2d(0.0..max, 0.0..n as f64)?;
    chart.configure_mesh().disable_y_mesh().y_labels(0).draw()?;
    let colors = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xff, 0x7f, 0x0e)];
    for (k, name) in [legend.0, legend.1].into_iter().enumerate() {
        let color = colors[k];
        let value = move |r: &(String, f64, f64)| if k == 0 { r.1 } else { r.2 };
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let top = n as f64 - i as f64 - 0.38 - 0.28 * k as f64;
                Rectangle::new([(0.0, top), (value(r), top - 0.24)], color.filled())
            }))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], color.filled()));
    }
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        Text::new(
            format!("{}: {:.1} / {:.1}", r.0, r.1, r.2),
            (max * 0.005, n as f64 - i as f64 - 0.06),
            ("sans-serif", 15),
        )
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}
