//! Programs for `cargo xtask bench`, compared side by side with xdplb:
//! - `bench_drop`: XDP_DROP, the fixed cost of a run;
//! - `bench_macswap`: parses Ethernet/IP/L4 with xdplb's own parser, swaps
//!   the MACs and returns XDP_TX: the least a forwarding program does;
//! - `trafficgen`: run in live-frames mode, sends each frame with the next
//!   source port, and optionally the next source address (a new flow per
//!   packet for a load balancer), checksums kept right;
//! - `sink`: counts and drops what arrives;
//! - `bench_vip_lookup`, `bench_flow_lookup`: the MAC-swap baseline plus one
//!   hash lookup shaped like xdplb's VIP lookup, or like its connection-table
//!   lookup: what those steps cost on their own;
//! - `bench_flow_no_common_lru`, `bench_flow_per_cpu_tables`: the flow
//!   lookup with the other connection-table flavours, compared with xdplb's;
//! - `bench_floor`, `bench_floor_ipip`, `bench_floor_gue`: the floor of
//!   every DSR and tunnel path (parse, VIP lookup, then a flow lookup, or a
//!   Maglev slot read and a flow insert; MAC swap or encapsulation);
//! - `bench_floor_nat`, `bench_floor_nat_reply`: the floor of each NAT
//!   direction (a translation looked up or made, the rewrite; the reply's
//!   next hop from the kernel's FIB);
//! - `bench_clock_coarse`, `bench_clock_ns`, `bench_clock_jiffies`: the
//!   MAC-swap baseline plus one clock read by each helper, to pick the
//!   cheapest for the connection table's timestamps;
//! - `bench_encap_ipip`, `bench_encap_gue`: parse, then the same IPIP or GUE
//!   encapsulation as xdplb (its own header writer) to a fixed backend of
//!   the packet's family, and XDP_TX: no lookup at all, so that xdplb's own
//!   logic on the tunnel paths stays visible.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_fib_lookup, xdp_action},
    helpers::{
        bpf_get_smp_processor_id, bpf_ktime_get_ns,
        generated::{
            bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_jiffies64, bpf_ktime_get_coarse_ns, bpf_redirect,
        },
    },
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    BPF_F_NO_COMMON_LRU, Backend, DEFAULT_CONNTRACK_SIZE, DEFAULT_GUE_PORT, DEFAULT_NAT_TABLE_SIZE, DEFAULT_RING_SIZE,
    FAMILY_IPV4, FLOW_TABLE_FLAGS, FlowKey, FlowState, GLOBAL_COUNTER_SLOTS, GlobalCounter, MAX_BACKENDS, MAX_VIPS,
    NatFlow, NatReply, NatScratch, SLOTS_PER_ELEMENT, TrafficCounters, VipInfo, VipKey, flow_hash, forwarding,
    nat::reply_key,
};
use lb_ebpf::{encap, parse, rewrite};
use network_types::eth::EthHdr;

/// Frames seen by `sink`, per CPU.
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

/// `trafficgen`'s per-CPU frame counter (the source port varies with it).
#[map]
static GEN_COUNTER: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// Offsets in the generator's frames (Ethernet + IPv4 without options).
const IPV4_PROTOCOL_OFFSET: usize = 14 + 9;
const IPV4_CHECKSUM_OFFSET: usize = 14 + 10;
/// The low half of the IPv4 source address.
const IPV4_SOURCE_LOW_OFFSET: usize = 14 + 14;
const L4_SOURCE_PORT_OFFSET: usize = 14 + 20;
const TCP_CHECKSUM_OFFSET: usize = 14 + 20 + 16;
const UDP_CHECKSUM_OFFSET: usize = 14 + 20 + 6;
/// The generator's frame headers as sent: Ethernet, IPv4 and a TCP header
/// (or a UDP header and the start of its payload).
const GEN_HEADER_LEN: usize = lb_common::TRAFFICGEN_HEADER_LEN;

/// The frame's headers (`GEN_HEADER_LEN` bytes), written by the benchmark
/// before each run. Live frames are recycled pages, and the program under
/// test rewrites them in place (NAT changes addresses, ports and checksums;
/// IPIP writes its outer header over the Ethernet header): every frame gets
/// its headers back before it is sent again.
#[map]
static GEN_HEADERS: Array<[u8; GEN_HEADER_LEN]> = Array::with_max_entries(1, 0);
/// Source ports cycle through this many values.
#[unsafe(no_mangle)]
static GEN_PORTS: u32 = 60000;
/// Source addresses cycle through this many values (added to the low half
/// of the frame's IPv4 source), each with every port in turn: up to
/// GEN_ADDRESSES × GEN_PORTS frames have five-tuples of their own.
#[unsafe(no_mangle)]
static GEN_ADDRESSES: u32 = 1;

#[xdp]
pub fn bench_drop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_DROP
}

#[xdp]
pub fn bench_macswap(ctx: XdpContext) -> u32 {
    if !matches!(parse::parse(&ctx), parse::Parsed::Packet(_)) {
        return xdp_action::XDP_PASS;
    }
    swap_and_tx(&ctx)
}

/// Same shapes and sizes as xdplb's VIPS and CONNTRACK.
#[map]
static ANATOMY_VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);
#[map]
static ANATOMY_FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, FLOW_TABLE_FLAGS);

/// The baselines keep no time. Their entries' timestamps are this, not 0:
/// LLVM turns 16 zero bytes in a row into a byte-loop `memset` call per
/// insert, which xdplb (whose timestamps are the clock's) never makes.
const UNTIMED: u64 = u64::MAX;

#[inline(always)]
fn swap_and_tx(ctx: &XdpContext) -> u32 {
    let start = ctx.data();
    if start + EthHdr::LEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the Ethernet header was bounds-checked against data_end just above.
    let eth = unsafe { &mut *(start as *mut EthHdr) };
    core::mem::swap(&mut eth.dst_addr, &mut eth.src_addr);
    xdp_action::XDP_TX
}

/// Where the clock baselines leave their reading, so that it is not
/// optimised away.
#[map]
static CLOCK_SINK: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
fn clock_and_tx(ctx: &XdpContext, read: fn() -> u64) -> u32 {
    if !matches!(parse::parse(ctx), parse::Parsed::Packet(_)) {
        return xdp_action::XDP_PASS;
    }
    if let Some(sink) = CLOCK_SINK.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot: no other CPU writes it.
        unsafe { *sink = read() };
    }
    swap_and_tx(ctx)
}

#[xdp]
pub fn bench_clock_coarse(ctx: XdpContext) -> u32 {
    // SAFETY: helpers without arguments or preconditions (also below).
    clock_and_tx(&ctx, || unsafe { bpf_ktime_get_coarse_ns() })
}

#[xdp]
pub fn bench_clock_ns(ctx: XdpContext) -> u32 {
    clock_and_tx(&ctx, || unsafe { bpf_ktime_get_ns() })
}

#[xdp]
pub fn bench_clock_jiffies(ctx: XdpContext) -> u32 {
    clock_and_tx(&ctx, || unsafe { bpf_jiffies64() })
}

/// xdplb's per-packet counters, same shapes and sizes (`GLOBAL_COUNTERS`,
/// `VIP_COUNTERS`, `BACKEND_COUNTERS`).
#[map]
static ANATOMY_GLOBAL_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(GLOBAL_COUNTER_SLOTS, 0);
#[map]
static ANATOMY_VIP_COUNTERS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
static ANATOMY_BACKEND_COUNTERS: PerCpuArray<TrafficCounters> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Parse, then the five counter updates of an established DSR packet in
/// xdplb (connection-table hit, forwarded by DSR, XDP_TX, the VIP's and
/// the backend's packets, bytes and new flows), then swap: what xdplb's
/// counting costs.
#[xdp]
pub fn bench_counters(ctx: XdpContext) -> u32 {
    let parse::Parsed::Packet(packet) = parse::parse(&ctx) else { return xdp_action::XDP_PASS };
    // As xdplb's: a runtime flag (false for an established packet).
    let new_flow = packet.tcp_flags & parse::TCP_SYN != 0;
    for counter in [GlobalCounter::ConntrackHit, GlobalCounter::ForwardedDsr, GlobalCounter::ActionTx] {
        if let Some(value) = ANATOMY_GLOBAL_COUNTERS.get_ptr_mut(counter as u32) {
            // SAFETY: a per-CPU slot: no other CPU writes it.
            unsafe { *value += 1 };
        }
    }
    let bytes = (ctx.data_end() - ctx.data()) as u64;
    if let Some(vip) = ANATOMY_VIP_COUNTERS.get_ptr_mut(1) {
        // SAFETY: a per-CPU slot: no other CPU writes it (also below).
        unsafe { count_packet(&mut *vip, bytes, new_flow) };
    }
    if let Some(backend) = ANATOMY_BACKEND_COUNTERS.get_ptr_mut(1) {
        unsafe { count_packet(&mut *backend, bytes, new_flow) };
    }
    swap_and_tx(&ctx)
}

#[inline(always)]
fn count_packet(traffic: &mut TrafficCounters, bytes: u64, new_flow: bool) {
    traffic.packets += 1;
    traffic.bytes += bytes;
    traffic.new_flows += new_flow as u64;
}

/// xdplb's backend slots, same shape and size (`BACKENDS`).
#[map]
static ANATOMY_BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Parse, then the frame's MACs from a backend slot (an array lookup, as
/// xdplb's `BACKENDS`) instead of a swap: what reading the backend costs.
#[xdp]
pub fn bench_backend_macs(ctx: XdpContext) -> u32 {
    if !matches!(parse::parse(&ctx), parse::Parsed::Packet(_)) {
        return xdp_action::XDP_PASS;
    }
    let start = ctx.data();
    let Some(backend) = ANATOMY_BACKENDS.get(1) else { return xdp_action::XDP_PASS };
    if start + EthHdr::LEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the Ethernet header was bounds-checked against data_end just
    // above; the addresses are in a map value.
    unsafe { lb_ebpf::eth::set_addresses(start, &backend.dst_mac, &backend.src_mac) };
    xdp_action::XDP_TX
}

#[xdp]
pub fn bench_vip_lookup(ctx: XdpContext) -> u32 {
    let parse::Parsed::Packet(packet) = parse::parse(&ctx) else { return xdp_action::XDP_PASS };
    let f = &packet.flow;
    let key = VipKey { addr: f.dst, port: f.dport, proto: f.proto, family: f.family };
    // SAFETY: a hash lookup whose value outlives this run; it is only read.
    if unsafe { ANATOMY_VIPS.get(&key) }.is_none() {
        // Present after the first packet, as a configured VIP would be.
        let _ = ANATOMY_VIPS.insert(&key, &VipInfo::default(), 0);
    }
    swap_and_tx(&ctx)
}

#[xdp]
pub fn bench_flow_lookup(ctx: XdpContext) -> u32 {
    flow_lookup_and_tx(&ctx, &ANATOMY_FLOWS)
}

/// Look the flow up (insert it when new) in `table`, swap, XDP_TX.
#[inline(always)]
fn flow_lookup_and_tx(ctx: &XdpContext, table: &LruHashMap<FlowKey, FlowState>) -> u32 {
    let parse::Parsed::Packet(packet) = parse::parse(ctx) else { return xdp_action::XDP_PASS };
    // SAFETY: a hash lookup whose value is not used.
    if unsafe { table.get(&packet.flow) }.is_none() {
        // Not `FlowState::default()`: see `UNTIMED`.
        let state = FlowState { backend_id: 0, flags: 0, last_seen_ns: UNTIMED };
        let _ = table.insert(&packet.flow, &state, 0);
    }
    swap_and_tx(ctx)
}

// The connection table's flavours, compared by the throughput benchmark at
// one and two CPUs: `bench_flow_lookup` has xdplb's (the common LRU); these
// have per-CPU LRU lists, and one table per CPU (as Katran: RSS keeps a
// flow on one CPU; 4 tables here, enough for the benchmark's machines).
#[map]
static FLAVOUR_NO_COMMON_LRU: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, BPF_F_NO_COMMON_LRU);
#[map]
static FLAVOUR_CPU0: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE / 4, FLOW_TABLE_FLAGS);
#[map]
static FLAVOUR_CPU1: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE / 4, FLOW_TABLE_FLAGS);
#[map]
static FLAVOUR_CPU2: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE / 4, FLOW_TABLE_FLAGS);
#[map]
static FLAVOUR_CPU3: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE / 4, FLOW_TABLE_FLAGS);

#[xdp]
pub fn bench_flow_no_common_lru(ctx: XdpContext) -> u32 {
    flow_lookup_and_tx(&ctx, &FLAVOUR_NO_COMMON_LRU)
}

#[xdp]
pub fn bench_flow_per_cpu_tables(ctx: XdpContext) -> u32 {
    // SAFETY: a helper without arguments or preconditions.
    let table = match unsafe { bpf_get_smp_processor_id() } % 4 {
        0 => &FLAVOUR_CPU0,
        1 => &FLAVOUR_CPU1,
        2 => &FLAVOUR_CPU2,
        _ => &FLAVOUR_CPU3,
    };
    flow_lookup_and_tx(&ctx, table)
}

/// The floor's Maglev table: one VIP's region of xdplb's `RING_SLOTS`.
#[map]
static FLOOR_SLOTS: Array<[u16; SLOTS_PER_ELEMENT as usize]> =
    Array::with_max_entries(DEFAULT_RING_SIZE.div_ceil(SLOTS_PER_ELEMENT), 0);
/// The floor's connection table: xdplb's shape, size and flavour.
#[map]
static FLOOR_FLOWS: LruHashMap<FlowKey, FlowState> =
    LruHashMap::with_max_entries(DEFAULT_CONNTRACK_SIZE, FLOW_TABLE_FLAGS);

/// The least a stateful balancer does per path, with xdplb's parser and
/// map shapes: parse, look the VIP up, then a SYN reads its slot of the
/// Maglev table and inserts the flow, any other packet looks its flow up
/// (inserting as a SYN does when it is new); then the MACs are swapped, or
/// the packet is encapsulated (the tunnel paths' floors).
#[xdp]
pub fn bench_floor(ctx: XdpContext) -> u32 {
    let parse::Parsed::Packet(packet) = parse::parse(&ctx) else { return xdp_action::XDP_PASS };
    floor_select(&packet);
    swap_and_tx(&ctx)
}

#[xdp]
pub fn bench_floor_ipip(ctx: XdpContext) -> u32 {
    let parse::Parsed::Packet(packet) = parse::parse(&ctx) else { return xdp_action::XDP_PASS };
    floor_select(&packet);
    encap_packet_and_tx(&ctx, &packet, forwarding::IPIP)
}

#[xdp]
pub fn bench_floor_gue(ctx: XdpContext) -> u32 {
    let parse::Parsed::Packet(packet) = parse::parse(&ctx) else { return xdp_action::XDP_PASS };
    floor_select(&packet);
    encap_packet_and_tx(&ctx, &packet, forwarding::GUE)
}

/// The floor's VIP lookup and connection-table step.
#[inline(always)]
fn floor_select(packet: &parse::Packet) {
    floor_vip(packet);
    let f = &packet.flow;
    let syn = packet.tcp_flags & parse::TCP_SYN != 0;
    // SAFETY: a hash lookup whose value is not used.
    if syn || unsafe { FLOOR_FLOWS.get(f) }.is_none() {
        let backend_id = floor_slot(f);
        let _ = FLOOR_FLOWS.insert(f, &FlowState { backend_id, flags: 0, last_seen_ns: UNTIMED }, 0);
    }
}

/// The floor's VIP lookup (the packet's VIP is added when missing, as a
/// configured VIP would be there).
#[inline(always)]
fn floor_vip(packet: &parse::Packet) {
    let f = &packet.flow;
    let key = VipKey { addr: f.dst, port: f.dport, proto: f.proto, family: f.family };
    // SAFETY: a hash lookup whose value outlives this run; it is only read.
    if unsafe { ANATOMY_VIPS.get(&key) }.is_none() {
        let _ = ANATOMY_VIPS.insert(&key, &VipInfo::default(), 0);
    }
}

/// The backend in the flow's slot of the floor's Maglev table.
#[inline(always)]
fn floor_slot(f: &FlowKey) -> u32 {
    let slot = flow_hash(f) % DEFAULT_RING_SIZE;
    FLOOR_SLOTS.get(slot / SLOTS_PER_ELEMENT).map_or(0, |group| u32::from(group[(slot % SLOTS_PER_ELEMENT) as usize]))
}

/// The NAT floors' tables: xdplb's shapes, sizes and flavour (the benchmark
/// empties them with xdplb's before each NAT fixture).
#[map]
static FLOOR_NAT_FLOWS: HashMap<FlowKey, NatFlow> = HashMap::with_max_entries(DEFAULT_NAT_TABLE_SIZE, 0);
#[map]
static FLOOR_NAT_REPLIES: HashMap<FlowKey, NatReply> = HashMap::with_max_entries(DEFAULT_NAT_TABLE_SIZE, 0);

/// The benchmark's NAT addresses, network byte order: the backend the
/// floor translates to, its NAT source, and the client and VIP of the
/// reply fixture's flow (what xdplb's fixtures configure).
const FLOOR_NAT_BACKEND: u32 = u32::from_ne_bytes([198, 18, 1, 11]);
const FLOOR_NAT_SOURCE: u32 = u32::from_ne_bytes([198, 18, 2, 1]);
/// The floor's source addresses: `FLOOR_NAT_SOURCE` and the next ones
/// (the benchmark's new-flow NAT fixture configures 8 for xdplb).
const FLOOR_NAT_SOURCES: u32 = 8;
const FLOOR_NAT_CLIENT: u32 = u32::from_ne_bytes([198, 18, 2, 2]);
const FLOOR_NAT_VIP: u32 = u32::from_ne_bytes([198, 18, 0, 100]);
/// The reply fixture's client port (the flow xdplb's fixture primes).
const FLOOR_NAT_CLIENT_PORT: u16 = 40050;

/// NAT, client → backend, at least: parse, look the VIP up, then the
/// flow's translation (one lookup), or for a SYN or a flow without one a
/// Maglev slot, one source port reserved by inserting its reply entry, and
/// the translation inserted; then rewrite (addresses, ports, checksums),
/// swap the MACs, XDP_TX. IPv4 (the NAT fixtures').
#[xdp]
pub fn bench_floor_nat(ctx: XdpContext) -> u32 {
    let parse::Parsed::Packet(packet) = parse::parse(&ctx) else { return xdp_action::XDP_PASS };
    floor_vip(&packet);
    let f = &packet.flow;
    let syn = packet.tcp_flags & (parse::TCP_SYN | parse::TCP_ACK) == parse::TCP_SYN;
    let known = if syn { None } else { FLOOR_NAT_FLOWS.get_ptr(f) };
    let (nat_addr, nat_port) = match known {
        // SAFETY: a pointer to a live entry; plain words.
        Some(entry) => unsafe { ((*entry).nat_addr[0], (*entry).nat_port) },
        None => {
            // As xdplb: the new entries are built in a per-CPU scratch slot
            // (built on the stack, their zero words become `memset` calls).
            let Some(scratch) = FLOOR_NAT_SCRATCH.get_ptr_mut(0) else { return xdp_action::XDP_DROP };
            // SAFETY: this CPU's slot; nothing else uses it during this packet.
            let scratch = unsafe { &mut *scratch };
            let backend_id = floor_slot(f);
            // SAFETY: a helper without arguments or preconditions.
            let random = unsafe { bpf_get_prandom_u32() };
            let port = ((1024 + random % 64512) as u16).to_be();
            // One of as many source addresses as xdplb's fixture has: a
            // round's new flows fit, so (nearly) every insert reserves a
            // port, as xdplb's must; with one address most would find
            // theirs taken, and a refused insert costs less.
            let source = FLOOR_NAT_SOURCE + ((random >> 24) % FLOOR_NAT_SOURCES << 24);
            scratch.key = reply_key(f, [FLOOR_NAT_BACKEND, 0, 0, 0], f.dport, [source, 0, 0, 0], port);
            scratch.reply = NatReply {
                client: f.src,
                vip: f.dst,
                client_port: f.sport,
                vip_port: f.dport,
                backend_id,
                vip_id: 0,
                flags: 0,
                last_seen_ns: UNTIMED,
            };
            let _ = FLOOR_NAT_REPLIES.insert(&scratch.key, &scratch.reply, BPF_NOEXIST as u64);
            scratch.flow = NatFlow {
                nat_addr: [source, 0, 0, 0],
                nat_port: port,
                _pad: 0,
                backend_id,
                flags: 0,
                _pad2: 0,
                last_seen_ns: UNTIMED,
            };
            let _ = FLOOR_NAT_FLOWS.insert(f, &scratch.flow, 0);
            (source, port)
        }
    };
    if !rewrite::rewrite(&ctx, &packet, &[nat_addr, 0, 0, 0], nat_port, &[FLOOR_NAT_BACKEND, 0, 0, 0], f.dport) {
        return xdp_action::XDP_DROP;
    }
    swap_and_tx(&ctx)
}

/// The reply floor's VIP table: xdplb's shape, and empty, since a reply's
/// destination is no VIP (`ANATOMY_VIPS` would not do: the VIP-lookup
/// baseline adds every destination it sees, the reply's too).
#[map]
static FLOOR_NAT_NO_VIPS: HashMap<VipKey, VipInfo> = HashMap::with_max_entries(MAX_VIPS, 0);

/// The NAT floors' scratch space, as xdplb's `NAT_SCRATCH`.
#[map]
static FLOOR_NAT_SCRATCH: PerCpuArray<NatScratch> = PerCpuArray::with_max_entries(1, 0);

/// NAT, backend → client, at least: parse, look the VIP up (a miss), then
/// the reply entry (inserted by the first packet, as xdplb's fixture primes
/// its own), rewrite to VIP → client, ask the kernel's FIB for the client's
/// next hop, set the MACs it names and send the frame there.
#[xdp]
pub fn bench_floor_nat_reply(ctx: XdpContext) -> u32 {
    let parse::Parsed::Packet(packet) = parse::parse(&ctx) else { return xdp_action::XDP_PASS };
    let f = &packet.flow;
    let key = VipKey { addr: f.dst, port: f.dport, proto: f.proto, family: f.family };
    // SAFETY: a hash lookup whose value is not used.
    if unsafe { FLOOR_NAT_NO_VIPS.get(&key) }.is_some() {
        return xdp_action::XDP_PASS;
    }
    let entry = match FLOOR_NAT_REPLIES.get_ptr(f) {
        Some(entry) => entry,
        None => {
            let reply = NatReply {
                client: [FLOOR_NAT_CLIENT, 0, 0, 0],
                vip: [FLOOR_NAT_VIP, 0, 0, 0],
                client_port: FLOOR_NAT_CLIENT_PORT.to_be(),
                vip_port: f.sport,
                backend_id: 0,
                vip_id: 0,
                flags: 0,
                last_seen_ns: 0,
            };
            let _ = FLOOR_NAT_REPLIES.insert(f, &reply, 0);
            let Some(entry) = FLOOR_NAT_REPLIES.get_ptr(f) else { return xdp_action::XDP_DROP };
            entry
        }
    };
    // SAFETY: a pointer to a live entry; plain words, only read.
    let (client, vip, client_port, vip_port) =
        unsafe { ((*entry).client[0], (*entry).vip[0], (*entry).client_port, (*entry).vip_port) };
    if !rewrite::rewrite(&ctx, &packet, &[vip, 0, 0, 0], vip_port, &[client, 0, 0, 0], client_port) {
        return xdp_action::XDP_DROP;
    }
    // As xdplb: the parameters in a per-CPU scratch slot, each field the
    // lookup reads written (a zeroed struct on the stack is a `memset` call).
    let Some(scratch) = FLOOR_NAT_SCRATCH.get_ptr_mut(0) else { return xdp_action::XDP_DROP };
    // SAFETY: this CPU's slot's 64 bytes are a `bpf_fib_lookup`: all zeros,
    // or what the last lookup left, is valid.
    let params = unsafe { &mut *((*scratch).fib.as_mut_ptr() as *mut bpf_fib_lookup) };
    params.family = 2; // AF_INET
    params.l4_protocol = f.proto;
    params.sport = vip_port;
    params.dport = client_port;
    params.__bindgen_anon_1.tot_len = packet.ip.len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_2.flowinfo = 0;
    params.__bindgen_anon_5.tbid = 0;
    params.__bindgen_anon_3.ipv6_src = [vip, 0, 0, 0];
    params.__bindgen_anon_4.ipv6_dst = [client, 0, 0, 0];
    // SAFETY: the context is this program's; params is a writable `bpf_fib_lookup`.
    let rc = unsafe {
        fib_lookup(ctx.ctx as *mut _, params as *mut _ as *mut _, core::mem::size_of::<bpf_fib_lookup>() as i32, 0)
    };
    let start = ctx.data();
    if rc != 0 || start + EthHdr::LEN > ctx.data_end() {
        return xdp_action::XDP_PASS;
    }
    // SAFETY: the Ethernet header was bounds-checked just above.
    unsafe { lb_ebpf::eth::set_addresses(start, &params.dmac, &params.smac) };
    if params.ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: a helper that only records the target for this packet.
    unsafe { bpf_redirect(params.ifindex, 0) as u32 }
}

#[xdp]
pub fn bench_encap_ipip(ctx: XdpContext) -> u32 {
    encap_and_tx(&ctx, forwarding::IPIP)
}

#[xdp]
pub fn bench_encap_gue(ctx: XdpContext) -> u32 {
    encap_and_tx(&ctx, forwarding::GUE)
}

#[inline(always)]
fn encap_and_tx(ctx: &XdpContext, mode: u8) -> u32 {
    let parse::Parsed::Packet(packet) = parse::parse(ctx) else { return xdp_action::XDP_PASS };
    encap_packet_and_tx(ctx, &packet, mode)
}

/// The tunnel baselines' backends, one per (mode, family): a map value, as
/// xdplb's are (built on the stack, the constant addresses became `memset`
/// calls into the frame that xdplb's own encapsulation never makes).
#[map]
static TUNNEL_BACKENDS: Array<Backend> = Array::with_max_entries(4, 0);

#[inline(always)]
fn encap_packet_and_tx(ctx: &XdpContext, packet: &parse::Packet, mode: u8) -> u32 {
    let v4 = packet.flow.family == FAMILY_IPV4;
    let index = u32::from(mode == forwarding::GUE) * 2 + u32::from(!v4);
    let Some(backend) = TUNNEL_BACKENDS.get_ptr_mut(index) else { return xdp_action::XDP_DROP };
    // SAFETY: a pointer to this map's value; the benchmark runs one packet
    // at a time, and the first one fills the slot.
    let backend = unsafe { &mut *backend };
    if backend.family == 0 {
        fill_tunnel_backend(backend, packet.flow.family, mode);
    }
    if !encap::encapsulate_xdp(ctx, packet, backend) {
        return xdp_action::XDP_DROP;
    }
    xdp_action::XDP_TX
}

/// 198.18.3.21 from 198.18.2.1, or 2001:db8:3::21 from 2001:db8:2::1.
#[inline(never)]
fn fill_tunnel_backend(backend: &mut Backend, family: u8, mode: u8) {
    backend.family = family;
    backend.forwarding = mode;
    backend.gue_port = DEFAULT_GUE_PORT.to_be();
    backend.mtu = 1500;
    if family == FAMILY_IPV4 {
        backend.addr[0] = u32::from_ne_bytes([198, 18, 3, 21]);
        backend.tunnel_src[0] = u32::from_ne_bytes([198, 18, 2, 1]);
    } else {
        backend.addr = [u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]), 0, 0, u32::from_ne_bytes([0, 0, 0, 0x21])];
        backend.tunnel_src = [u32::from_ne_bytes([0x20, 0x01, 0x0d, 0xb8]), 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
    }
}

#[xdp]
pub fn trafficgen(ctx: XdpContext) -> u32 {
    let start = ctx.data();
    if start + GEN_HEADER_LEN > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    if let Some(headers) = GEN_HEADERS.get(0) {
        // SAFETY: the frame holds GEN_HEADER_LEN bytes (checked just above).
        unsafe { core::ptr::write_unaligned(start as *mut [u8; GEN_HEADER_LEN], *headers) };
    }
    let Some(counter) = GEN_COUNTER.get_ptr_mut(0) else { return xdp_action::XDP_DROP };
    // SAFETY: a per-CPU slot: no other CPU touches it.
    let n = unsafe { *counter };
    // SAFETY: a per-CPU slot: no other CPU touches it.
    unsafe { *counter = n.wrapping_add(1) };
    // SAFETY: plain reads of statics that the loader may rewrite.
    let (ports, addresses) =
        unsafe { (core::ptr::read_volatile(&GEN_PORTS).max(1), core::ptr::read_volatile(&GEN_ADDRESSES).max(1)) };
    let port = (1024 + (n / addresses) % ports) as u16;
    // SAFETY (all accesses below): the frame was bounds-checked to hold
    // GEN_HEADER_LEN bytes, past every offset used.
    let word = |offset: usize| u16::from_be_bytes(unsafe { *((start + offset) as *const [u8; 2]) });
    let set = |offset: usize, value: u16| unsafe { *((start + offset) as *mut [u8; 2]) = value.to_be_bytes() };
    let (old_port, old_address) = (word(L4_SOURCE_PORT_OFFSET), word(IPV4_SOURCE_LOW_OFFSET));
    let address = old_address.wrapping_add((n % addresses) as u16);
    set(L4_SOURCE_PORT_OFFSET, port);
    set(IPV4_SOURCE_LOW_OFFSET, address);
    set(IPV4_CHECKSUM_OFFSET, checksum_update(word(IPV4_CHECKSUM_OFFSET), old_address, address));
    // SAFETY: as above.
    let l4_checksum = match unsafe { *((start + IPV4_PROTOCOL_OFFSET) as *const u8) } {
        lb_common::PROTO_TCP => TCP_CHECKSUM_OFFSET,
        lb_common::PROTO_UDP if word(UDP_CHECKSUM_OFFSET) != 0 => UDP_CHECKSUM_OFFSET,
        _ => return xdp_action::XDP_TX,
    };
    let check = checksum_update(word(l4_checksum), old_address, address);
    set(l4_checksum, checksum_update(check, old_port, port));
    xdp_action::XDP_TX
}

/// RFC 1624's incremental update of a ones' complement checksum for one
/// 16-bit word that changed from `old` to `new`.
#[inline(always)]
fn checksum_update(check: u16, old: u16, new: u16) -> u16 {
    let mut sum = (!check as u32) + (!old as u32) + new as u32;
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

#[xdp]
pub fn sink(_ctx: XdpContext) -> u32 {
    if let Some(count) = SINK_COUNT.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot: no other CPU touches it.
        unsafe { *count += 1 };
    }
    xdp_action::XDP_DROP
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
