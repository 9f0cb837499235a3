//! NAT: packets are rewritten in place, so backends need no change at all.
//!
//! Client → backend (`translate`): the destination becomes the backend's
//! address and port; the source becomes one of the LB's addresses and a
//! port from the service's pool (full NAT), or stays the client's
//! (`nat_preserve_client`). The translation is kept twice: `NAT_FLOWS`
//! under the client's five-tuple, `NAT_REPLIES` under the five-tuple the
//! backend's replies will carry.
//!
//! Backend → client (`reply`): a packet that is not for a VIP but matches a
//! `NAT_REPLIES` entry is rewritten to VIP → client and sent to the client's
//! next hop as the kernel's FIB names it.
//!
//! Checksums are patched from what changed (`lb_common::nat`), never
//! re-summed over the payload (`lb_ebpf::rewrite`).

use aya_ebpf::{
    bindings::{BPF_NOEXIST, bpf_fib_lookup, xdp_action},
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_get_prandom_u32, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{
    BACKEND_F_DOWN, BACKEND_F_IN_USE, Backend, FAMILY_IPV4, FLOW_F_FINISHED, FlowKey, GlobalCounter,
    LAST_SEEN_REFRESH_NS, MAX_NAT_SOURCES, NAT_F_PRESERVE_CLIENT, NAT_FLOW_F_PINNED, NatFlow, NatPool, NatReply,
    NatScratch, PROTO_TCP, PROTO_UDP, VipInfo, flow_hash, forwarding,
    nat::{NAT_PORT_ATTEMPTS, NatFlowPhase, address_words, attempts, candidate_port, replace, replace_udp, reply_key},
    wire::{
        ETH_P_8021AD, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, ICMP_DEST_UNREACH, ICMP_TIME_EXCEEDED, ICMPV6_DEST_UNREACH,
        ICMPV6_PKT_TOOBIG, ICMPV6_TIME_EXCEEDED, IPPROTO_ICMP, IPPROTO_ICMPV6,
    },
};
use lb_ebpf::{
    parse::{Packet, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
    rewrite::{read16, read32, read128, rewrite, write},
};

use super::Prepared;
use crate::{
    counters::{count, count_traffic},
    maps::{
        BACKENDS, EGRESS_DEVICES, NAT_EXHAUSTED, NAT_FLOWS, NAT_POOLS, NAT_REPLIES, NAT_SCRATCH, NAT_SERVICES,
        udp_idle_timeout_ns,
    },
};

const EEXIST: i32 = 17;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const BPF_FIB_LKUP_RET_SUCCESS: i64 = 0;

/// Whether any NAT service exists (else replies are not looked for).
#[inline(always)]
pub fn enabled() -> bool {
    NAT_SERVICES.get(0).copied().unwrap_or(0) != 0
}

/// Client → backend, an established packet: its translation (the flow's
/// only record, see `select`) names the backend, so select is skipped.
/// Also the client's ACK that ends the handshake: the SYN's translation is
/// its record, and pinning it here spares select's two more lookups of it
/// (a service with persistence goes the full way, to remember the client).
/// `None` sends the packet the full way (select, then `translate`): a SYN,
/// FIN or RST, a UDP flow idle past its timeout, a backend marked down
/// (rescheduled there) or a slot gone.
#[inline(always)]
pub fn established(ctx: &XdpContext, packet: &Packet, vip: &VipInfo) -> Option<u32> {
    if packet.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) != 0 {
        return None;
    }
    let action = forward_established(ctx, packet, vip.id, vip.persistence_timeout_ns == 0);
    (action != FULL_WAY).then_some(action)
}

/// `forward_established`'s "go the full way" (no XDP action).
const FULL_WAY: u32 = u32::MAX;

/// One scalar for every way through it (`FULL_WAY` for none). It was a
/// subprogram, to spare the verifier; inlined, the verifier's work is
/// lower still (603,987 instructions against 606,220), and NAT's
/// established packets are spared a call. Not folded into `established`:
/// returning the `Option` straight from `established_action` is simpler
/// and verifies in fewer instructions (598,556), but compiled so that NAT's
/// established and UDP packets took 8-12 ns more in A/B runs.
#[inline(always)]
fn forward_established(ctx: &XdpContext, packet: &Packet, vip_id: u32, may_promote: bool) -> u32 {
    let Some(action) = established_action(ctx, packet, vip_id, may_promote) else {
        return FULL_WAY;
    };
    action
}

#[inline(always)]
fn established_action(ctx: &XdpContext, packet: &Packet, vip_id: u32, may_promote: bool) -> Option<u32> {
    let entry = NAT_FLOWS.get_ptr_mut(&packet.flow)?;
    // SAFETY: a pointer to a live entry; plain words (a lost update of its
    // timestamp or flags by another CPU is harmless: both write the same).
    let entry = unsafe { &mut *entry };
    let now = crate::clock::now_ns();
    let handshake = match entry.phase(now, packet.flow.proto, udp_idle_timeout_ns()) {
        NatFlowPhase::Live => false,
        NatFlowPhase::Handshake { .. } if may_promote => true,
        _ => return None,
    };
    if now.saturating_sub(entry.last_seen_ns) > LAST_SEEN_REFRESH_NS {
        entry.last_seen_ns = now;
    }
    let backend = BACKENDS.get(entry.backend_id)?;
    if backend.flags & (BACKEND_F_IN_USE | BACKEND_F_DOWN) != BACKEND_F_IN_USE
        || backend.vip_id != vip_id
        || backend.forwarding != forwarding::NAT
    {
        return None;
    }
    if handshake {
        // As select counts it: no pin found, the SYN's record promoted.
        // (least_conn counted the flow at its SYN.)
        entry.flags |= NAT_FLOW_F_PINNED;
        count(GlobalCounter::ConntrackMiss);
        count(GlobalCounter::HalfOpenPromoted);
    } else {
        count(GlobalCounter::ConntrackHit);
    }
    count_traffic(vip_id, entry.backend_id, (ctx.data_end() - ctx.data()) as u64, false);
    let backend_port = if backend.port != 0 { backend.port } else { packet.flow.dport };
    if !rewrite(ctx, packet, &entry.nat_addr, entry.nat_port, &backend.addr, backend_port)
        || !super::dsr::set_macs(ctx, backend)
    {
        return Some(xdp_action::XDP_DROP);
    }
    count(GlobalCounter::ForwardedNat);
    Some(super::transmit(ctx, backend))
}

/// What select knows of a NAT flow's translation when `translate` runs.
/// (Values for a 3-bit field of the packed selection; `Unclaimed` is the
/// one value that `NOTHING_SELECTED`, all ones, cannot be read as.)
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Translation {
    /// Not looked for: `translate` looks for it (and keeps it, or makes one).
    Unknown = 0,
    /// Made for this SYN by `new_translation` (`select::claim_nat_syn`),
    /// and in the CPU's scratch slot.
    Made = 1,
    /// `new_translation` could make none (counted): the packet is dropped.
    Refused = 2,
    /// A SYN whose backend select picked, before `claim_nat_syn`.
    Unclaimed = 4,
}

/// Client → backend, the full way: after select (the flow's record, the
/// scheduler), which may have looked for the flow's translation already
/// (`translation`). A subprogram: verified apart from the scheduler paths.
#[inline(never)]
pub fn translate(
    ctx: &XdpContext,
    packet: &Packet,
    backend_id: u32,
    translation: Translation,
    backend: &Backend,
) -> Prepared {
    let Some(scratch) = NAT_SCRATCH.get_ptr_mut(0) else {
        return Prepared::Drop;
    };
    // SAFETY: this CPU's scratch slot; nothing else uses it during this
    // packet (a translation `new_translation` made for it waits there).
    let scratch = unsafe { &mut *scratch };
    match translation {
        Translation::Made => {}
        Translation::Refused | Translation::Unclaimed => return Prepared::Drop,
        Translation::Unknown => match NAT_FLOWS.get_ptr_mut(&packet.flow) {
            // SAFETY: a pointer to a live entry; plain words, written whole.
            Some(entry) if unsafe { (*entry).backend_id } == backend_id => unsafe {
                // Not `scratch.flow = *entry`: see `copy_address`.
                core::ptr::copy_nonoverlapping(entry, &mut scratch.flow, 1);
                keep(entry, packet, backend, scratch);
            },
            // New, or rescheduled to another backend: a new translation (the
            // old reply entry is left to the agent, which removes orphans).
            _ => {
                if allocate(packet, backend_id, backend, crate::clock::now_ns(), false, scratch) != NewTranslation::Made
                {
                    return Prepared::Drop;
                }
            }
        },
    }
    let backend_port = if backend.port != 0 { backend.port } else { packet.flow.dport };
    if !rewrite(ctx, packet, &scratch.flow.nat_addr, scratch.flow.nat_port, &backend.addr, backend_port) {
        return Prepared::Drop;
    }
    if !super::dsr::set_macs(ctx, backend) {
        return Prepared::Drop;
    }
    count(GlobalCounter::ForwardedNat);
    Prepared::ToBackend
}

/// A packet that keeps its flow's translation (`scratch.flow`, a copy of
/// `entry`): its marks and timestamp.
///
/// # Safety
/// `entry` points to a live `NAT_FLOWS` entry.
#[inline(always)]
unsafe fn keep(entry: *mut NatFlow, packet: &Packet, backend: &Backend, scratch: &mut NatScratch) {
    let now = crate::clock::now_ns();
    let finishing = packet.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    // SAFETY (whole body): the caller's pointer to a live entry; plain words.
    unsafe {
        if packet.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN && scratch.flow.flags & FLOW_F_FINISHED != 0 {
            // The client opens a new connection on the five-tuple of one
            // that ended: it keeps the translation, which lives again.
            restart(entry, packet, backend, now, scratch);
        } else if now.wrapping_sub(scratch.flow.last_seen_ns) > LAST_SEEN_REFRESH_NS
            || (finishing && scratch.flow.flags & FLOW_F_FINISHED == 0)
        {
            (*entry).last_seen_ns = now;
            if finishing {
                (*entry).flags |= FLOW_F_FINISHED;
            }
        }
        // Any packet but a SYN pins the flow to its translation's backend
        // (see `flow_flags`).
        if packet.tcp_flags & TCP_SYN == 0 && scratch.flow.flags & NAT_FLOW_F_PINNED == 0 {
            (*entry).flags |= NAT_FLOW_F_PINNED;
        }
    }
}

/// A new translation's marks. Any packet but a SYN pins the flow to its
/// translation's backend (a SYN's translation is only its half-open
/// record): its next packets take the translation alone (`established`),
/// and a flow that ends with this packet keeps its backend for its last
/// ACKs.
#[inline(always)]
fn flow_flags(packet: &Packet) -> u32 {
    let pinned = if packet.tcp_flags & TCP_SYN == 0 { NAT_FLOW_F_PINNED } else { 0 };
    let finished = if packet.tcp_flags & (TCP_FIN | TCP_RST) != 0 { FLOW_F_FINISHED } else { 0 };
    pinned | finished
}

/// Clears the "finished" marks of a translation whose five-tuple a new
/// connection reuses, in both entries, so that its linger does not end it.
#[inline(always)]
fn restart(entry: *mut NatFlow, packet: &Packet, backend: &Backend, now: u64, scratch: &mut NatScratch) {
    let backend_port = if backend.port != 0 { backend.port } else { packet.flow.dport };
    scratch.key = reply_key(&packet.flow, backend.addr, backend_port, scratch.flow.nat_addr, scratch.flow.nat_port);
    // SAFETY: pointers to live map entries; plain words.
    unsafe {
        (*entry).flags = 0;
        (*entry).last_seen_ns = now;
        if let Some(reply) = NAT_REPLIES.get_ptr_mut(&scratch.key) {
            (*reply).flags = 0;
            (*reply).last_seen_ns = now;
        }
    }
}

/// What making a new translation did.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NewTranslation {
    /// Made, into `NAT_FLOWS`, `NAT_REPLIES` and the CPU's scratch slot.
    Made,
    /// Only if none was asked for, and the five-tuple has a translation:
    /// nothing done.
    Exists,
    /// No source port or no room (counted): nothing done.
    Refused,
}

/// A new flow's SYN (`select::claim_nat_syn`): its translation, unless the
/// five-tuple has one (`Exists`). The insert that makes it is also the look
/// for an earlier one (`allocate`), which spares the SYN of a new flow a
/// lookup in that table: 40-60 ns of its 650-700 here. A subprogram
/// returning a scalar.
#[inline(never)]
pub fn new_translation(packet: &Packet, backend_id: u32, backend: &Backend, now: u64) -> NewTranslation {
    let Some(scratch) = NAT_SCRATCH.get_ptr_mut(0) else {
        return NewTranslation::Refused;
    };
    // SAFETY: this CPU's scratch slot; nothing else uses it during this packet.
    allocate(packet, backend_id, backend, now, true, unsafe { &mut *scratch })
}

/// A new translation for the packet's flow to `backend`, in the CPU's
/// scratch slot (`scratch.flow`) and both tables. The flow's entry goes in
/// first: with `only_if_none` (`BPF_NOEXIST`) its insert is also the look
/// for an earlier translation of the five-tuple; otherwise it replaces one
/// (which is gone, too, if no port is then found: the flow's next packet is
/// scheduled afresh). Then the reply entry, whose insert is what reserves
/// the source port (the flow's entry is corrected when the first port tried
/// is taken). Inlined
/// in `translate`: a call to `new_translation` from there would take the
/// stack of three frames past the verifier's 512 bytes.
#[inline(always)]
fn allocate(
    packet: &Packet,
    backend_id: u32,
    backend: &Backend,
    now: u64,
    only_if_none: bool,
    scratch: &mut NatScratch,
) -> NewTranslation {
    let Some(pool) = NAT_POOLS.get(backend.vip_id) else {
        return NewTranslation::Refused;
    };
    let flow = &packet.flow;
    let backend_port = if backend.port != 0 { backend.port } else { flow.dport };
    // DNAT's key (the client's own address and port); SNAT replaces both.
    scratch.key = reply_key(flow, backend.addr, backend_port, flow.src, flow.sport);
    let preserve_client = pool.flags & NAT_F_PRESERVE_CLIENT != 0;
    // SAFETY: a helper without arguments or preconditions.
    let start = if preserve_client { 0 } else { unsafe { bpf_get_prandom_u32() } };
    if !preserve_client {
        let source = if pool.source_count == 0 {
            &backend.tunnel_src
        } else {
            let index = (flow_hash(flow) % pool.source_count) as usize & (MAX_NAT_SOURCES - 1);
            &pool.sources[index]
        };
        copy_address(&mut scratch.key.dst, source);
        scratch.key.dport =
            candidate_port(start, 0, pool.port_low, pool.port_count, pool.skip_from, pool.skip_len).to_be();
    }
    scratch.flow = NatFlow {
        nat_addr: scratch.key.dst,
        nat_port: scratch.key.dport,
        _pad: 0,
        backend_id,
        flags: flow_flags(packet),
        _pad2: 0,
        last_seen_ns: now,
    };
    let insert_flags = if only_if_none { BPF_NOEXIST as u64 } else { 0 };
    match NAT_FLOWS.insert(flow, &scratch.flow, insert_flags) {
        Ok(()) => {}
        Err(err) if err == -EEXIST => return NewTranslation::Exists,
        Err(_) => return refused(GlobalCounter::DropNatTableFull, backend.vip_id),
    }
    scratch.reply = NatReply {
        client: flow.src,
        vip: flow.dst,
        client_port: flow.sport,
        vip_port: flow.dport,
        backend_id,
        vip_id: backend.vip_id,
        flags: 0,
        last_seen_ns: now,
    };
    let reserved =
        if preserve_client { reserve_client_port(flow, scratch) } else { reserve_port(pool, start, scratch) };
    if let Err(refusal) = reserved {
        let _ = NAT_FLOWS.remove(flow);
        return refused(refusal, backend.vip_id);
    }
    if scratch.key.dport != scratch.flow.nat_port {
        // The first port tried was taken: the flow's entry names the one reserved.
        scratch.flow.nat_port = scratch.key.dport;
        if NAT_FLOWS.insert(flow, &scratch.flow, 0).is_err() {
            let _ = NAT_REPLIES.remove(&scratch.key);
            let _ = NAT_FLOWS.remove(flow);
            return refused(GlobalCounter::DropNatTableFull, backend.vip_id);
        }
    }
    NewTranslation::Made
}

/// DNAT: the reply carries the client's own address and port, so the
/// reply entry's key (`scratch.key`) is fixed.
#[inline(always)]
fn reserve_client_port(flow: &FlowKey, scratch: &mut NatScratch) -> Result<(), GlobalCounter> {
    if let Err(err) = NAT_REPLIES.insert(&scratch.key, &scratch.reply, BPF_NOEXIST as u64) {
        if err != -EEXIST {
            return Err(GlobalCounter::DropNatTableFull);
        }
        // SAFETY: a hash lookup whose value outlives this run; only read.
        let owner = unsafe { NAT_REPLIES.get(&scratch.key) };
        // This flow's own entry (an earlier translation) is taken over;
        // another VIP's flow from the same client port is not.
        if !owner.is_some_and(|o| o.vip == flow.dst && o.vip_port == flow.dport) {
            return Err(GlobalCounter::DropNatPortExhausted);
        }
        let _ = NAT_REPLIES.insert(&scratch.key, &scratch.reply, 0);
    }
    Ok(())
}

/// SNAT: the first free port of the candidates (`candidate_port`) from
/// `start`, reserved by inserting the reply entry under it
/// (`scratch.key.dport`).
#[inline(always)]
fn reserve_port(pool: &NatPool, start: u32, scratch: &mut NatScratch) -> Result<(), GlobalCounter> {
    let tries = attempts(pool.port_count);
    for attempt in 0..NAT_PORT_ATTEMPTS {
        if attempt >= tries {
            break;
        }
        let port = candidate_port(start, attempt, pool.port_low, pool.port_count, pool.skip_from, pool.skip_len);
        scratch.key.dport = port.to_be();
        match NAT_REPLIES.insert(&scratch.key, &scratch.reply, BPF_NOEXIST as u64) {
            Ok(()) => return Ok(()),
            Err(err) if err == -EEXIST => {}
            Err(_) => return Err(GlobalCounter::DropNatTableFull),
        }
    }
    Err(GlobalCounter::DropNatPortExhausted)
}

/// Counts a translation refused; `Refused`.
#[inline(always)]
fn refused(refusal: GlobalCounter, vip_id: u32) -> NewTranslation {
    count(refusal);
    if refusal == GlobalCounter::DropNatPortExhausted
        && let Some(exhausted) = NAT_EXHAUSTED.get_ptr_mut(vip_id)
    {
        // SAFETY: a per-CPU slot: no other CPU writes it.
        unsafe { *exhausted += 1 };
    }
    NewTranslation::Refused
}

/// Backend → client: `None` when the packet is no NAT reply.
#[inline(always)]
pub fn reply(ctx: &XdpContext, packet: &Packet) -> Option<u32> {
    let entry = NAT_REPLIES.get_ptr_mut(&packet.flow)?;
    Some(to_client(ctx, packet, entry))
}

/// A subprogram, so that its stack is not added to the main program's.
#[inline(never)]
fn to_client(ctx: &XdpContext, packet: &Packet, entry: *mut NatReply) -> u32 {
    let Some(scratch) = NAT_SCRATCH.get_ptr_mut(0) else {
        return xdp_action::XDP_DROP;
    };
    // SAFETY: a pointer to a live map entry; plain words, and only this
    // flow's replies write its timestamp and flags.
    let reply = unsafe { &mut *entry };
    let now = crate::clock::now_ns();
    let finishing = packet.tcp_flags & (TCP_FIN | TCP_RST) != 0;
    if now.wrapping_sub(reply.last_seen_ns) > LAST_SEEN_REFRESH_NS || (finishing && reply.flags & FLOW_F_FINISHED == 0)
    {
        reply.last_seen_ns = now;
        if finishing {
            reply.flags |= FLOW_F_FINISHED;
        }
    }
    if !rewrite(ctx, packet, &reply.vip, reply.vip_port, &reply.client, reply.client_port) {
        return xdp_action::XDP_DROP;
    }
    count(GlobalCounter::NatReplies);
    // SAFETY: this CPU's scratch slot, nothing else uses it during this packet.
    let scratch = unsafe { &mut *scratch };
    send_to_client(ctx, scratch, packet.flow.family, packet.flow.proto, reply, packet.ip.len)
}

/// Sends a rewritten reply to the client's next hop, as the kernel's FIB
/// names it: from interface to interface (or back out), or to the kernel
/// when it has no answer yet.
#[inline(always)]
fn send_to_client(
    ctx: &XdpContext,
    scratch: &mut NatScratch,
    family: u8,
    proto: u8,
    reply: &NatReply,
    len: u16,
) -> u32 {
    let v4 = family == FAMILY_IPV4;
    // SAFETY: the scratch slot's 64 bytes are a `bpf_fib_lookup`, all zeros valid.
    let params = unsafe { &mut *(scratch.fib.as_mut_ptr() as *mut bpf_fib_lookup) };
    params.family = if v4 { AF_INET } else { AF_INET6 };
    params.l4_protocol = proto;
    let (sport, dport) =
        if proto == PROTO_TCP || proto == PROTO_UDP { (reply.vip_port, reply.client_port) } else { (0, 0) };
    params.sport = sport;
    params.dport = dport;
    params.__bindgen_anon_1.tot_len = len;
    params.ifindex = ctx.ingress_ifindex() as u32;
    params.__bindgen_anon_2.flowinfo = 0;
    params.__bindgen_anon_5.tbid = 0;
    if v4 {
        params.__bindgen_anon_3.ipv6_src = [reply.vip[0], 0, 0, 0];
        params.__bindgen_anon_4.ipv6_dst = [reply.client[0], 0, 0, 0];
    } else {
        // SAFETY: writes to the scratch slot's plain words.
        unsafe {
            copy_address(&mut params.__bindgen_anon_3.ipv6_src, &reply.vip);
            copy_address(&mut params.__bindgen_anon_4.ipv6_dst, &reply.client);
        }
    }
    // SAFETY: the context is this program's; params is a writable `bpf_fib_lookup`.
    let rc =
        unsafe { fib_lookup(ctx.ctx as *mut _, params as *mut _, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    if rc != BPF_FIB_LKUP_RET_SUCCESS {
        // No route or no neighbour entry yet: the kernel forwards the
        // rewritten packet (and resolves the neighbour).
        count(GlobalCounter::NatReplyToKernel);
        return xdp_action::XDP_PASS;
    }
    let start = ctx.data();
    if start + 12 > ctx.data_end() {
        return xdp_action::XDP_DROP;
    }
    // SAFETY: the Ethernet addresses were bounds-checked just above; the
    // new ones are on the stack.
    unsafe { lb_ebpf::eth::set_addresses(start, &params.dmac, &params.smac) };
    if params.ifindex == ctx.ingress_ifindex() as u32 {
        count(GlobalCounter::ActionTx);
        return xdp_action::XDP_TX;
    }
    // Clients may be behind any interface: one the agent did not put in
    // EGRESS_DEVICES is redirected to by index.
    let action = match EGRESS_DEVICES.redirect(params.ifindex, xdp_action::XDP_DROP as u64) {
        Ok(action) => action,
        // SAFETY: a helper that only records the target for this packet.
        Err(_) => unsafe { bpf_redirect(params.ifindex, 0) as u32 },
    };
    count(GlobalCounter::ActionRedirect);
    action
}

/// An ICMP error about a NAT flow (port unreachable, fragmentation needed
/// or packet too big, time exceeded), from its backend or a router on the
/// way: the outer header becomes VIP → client, the quoted packet what the
/// client sent (client → VIP), every checksum patched. `None` when it is
/// about no NAT flow. A subprogram: verified once, apart from the rest.
#[inline(never)]
pub fn icmp_error(ctx: &XdpContext) -> Option<u32> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + 18 > end {
        return None;
    }
    // SAFETY: every read and write below lies within bounds checked before
    // it (the quoted TCP checksum's own check is separate).
    unsafe {
        // Ethernet, one VLAN tag at most, then IP: what the parser accepts.
        let (ethertype, ip) = match u16::from_be(read16(start + 12)) {
            ETH_P_8021Q | ETH_P_8021AD => (u16::from_be(read16(start + 16)), start + 18),
            ethertype => (ethertype, start + 14),
        };
        if ip + 40 > end {
            return None;
        }
        let (family, icmp) = match ethertype {
            ETH_P_IP => {
                let vihl = *(ip as *const u8);
                let frags = u16::from_be(read16(ip + 6));
                if vihl >> 4 != 4 || vihl & 0x0f < 5 || frags & 0x3fff != 0 || *((ip + 9) as *const u8) != IPPROTO_ICMP
                {
                    return None;
                }
                (FAMILY_IPV4, ip + ((vihl & 0x0f) as usize * 4))
            }
            ETH_P_IPV6 if *((ip + 6) as *const u8) == IPPROTO_ICMPV6 => (lb_common::FAMILY_IPV6, ip + 40),
            _ => return None,
        };
        let v4 = family == FAMILY_IPV4;
        let inner_ip = icmp + 8;
        let inner_l4 = inner_ip + if v4 { 20 } else { 40 };
        if inner_l4 + 8 > end {
            return None;
        }
        let kind = *(icmp as *const u8);
        let error = if v4 {
            kind == ICMP_DEST_UNREACH || kind == ICMP_TIME_EXCEEDED
        } else {
            kind == ICMPV6_DEST_UNREACH || kind == ICMPV6_PKT_TOOBIG || kind == ICMPV6_TIME_EXCEEDED
        };
        if !error {
            return None;
        }
        let scratch = &mut *NAT_SCRATCH.get_ptr_mut(0)?;
        // The quoted packet went LB → backend: its reply five-tuple is the
        // quote's reversed. Addresses go straight into the scratch key
        // (`key.dst` is the quote's source, `key.src` its destination).
        let proto = if v4 {
            // The quoted header without options (what the LB sent has none).
            if *(inner_ip as *const u8) != 0x45 {
                return None;
            }
            scratch.key.dst = [read32(inner_ip + 12), 0, 0, 0];
            scratch.key.src = [read32(inner_ip + 16), 0, 0, 0];
            scratch.outer_src = [read32(ip + 12), 0, 0, 0];
            *((inner_ip + 9) as *const u8)
        } else {
            if *(inner_ip as *const u8) >> 4 != 6 {
                return None;
            }
            scratch.key.dst = read128(inner_ip + 8);
            scratch.key.src = read128(inner_ip + 24);
            scratch.outer_src = read128(ip + 8);
            *((inner_ip + 6) as *const u8)
        };
        if proto != PROTO_TCP && proto != PROTO_UDP {
            return None;
        }
        let (inner_sport, inner_dport) = (read16(inner_l4), read16(inner_l4 + 2));
        scratch.key.sport = inner_dport;
        scratch.key.dport = inner_sport;
        scratch.key.proto = proto;
        scratch.key.family = family;
        scratch.key._pad = [0; 2];
        let reply = &*NAT_REPLIES.get_ptr(&scratch.key)?;

        // The quoted packet becomes client → VIP; its checksums follow.
        let quoted_addresses = address_words(&scratch.key.dst) + address_words(&scratch.key.src);
        let client_addresses = address_words(&reply.client) + address_words(&reply.vip);
        let inner_removed = quoted_addresses + inner_sport as u64 + inner_dport as u64;
        let inner_added = client_addresses + reply.client_port as u64 + reply.vip_port as u64;
        let mut icmp_removed = inner_removed;
        let mut icmp_added = inner_added;
        let l4_check = inner_l4 + if proto == PROTO_TCP { 16 } else { 6 };
        if l4_check + 2 <= end {
            let old = read16(l4_check);
            let new = if proto == PROTO_TCP {
                replace(old, inner_removed, inner_added)
            } else {
                replace_udp(old, inner_removed, inner_added, v4)
            };
            write(l4_check, &new.to_ne_bytes());
            icmp_removed += old as u64;
            icmp_added += new as u64;
        }
        write(inner_l4, &reply.client_port.to_ne_bytes());
        write(inner_l4 + 2, &reply.vip_port.to_ne_bytes());
        // The outer header: VIP → client (it was sender → NAT address).
        let outer_removed = address_words(&scratch.outer_src) + address_words(&scratch.key.dst);
        let outer_added = address_words(&reply.vip) + address_words(&reply.client);
        if v4 {
            let old = read16(inner_ip + 10);
            let new = replace(old, quoted_addresses, client_addresses);
            write(inner_ip + 10, &new.to_ne_bytes());
            icmp_removed += old as u64;
            icmp_added += new as u64;
            write(inner_ip + 12, &reply.client[0].to_ne_bytes());
            write(inner_ip + 16, &reply.vip[0].to_ne_bytes());
            let check = replace(read16(ip + 10), outer_removed, outer_added);
            write(ip + 10, &check.to_ne_bytes());
            write(ip + 12, &reply.vip[0].to_ne_bytes());
            write(ip + 16, &reply.client[0].to_ne_bytes());
        } else {
            // ICMPv6 sums the outer addresses too (its pseudo header).
            icmp_removed += outer_removed;
            icmp_added += outer_added;
            for i in 0..4 {
                write(inner_ip + 8 + 4 * i, &reply.client[i].to_ne_bytes());
                write(inner_ip + 24 + 4 * i, &reply.vip[i].to_ne_bytes());
                write(ip + 8 + 4 * i, &reply.vip[i].to_ne_bytes());
                write(ip + 24 + 4 * i, &reply.client[i].to_ne_bytes());
            }
        }
        let check = replace(read16(icmp + 2), icmp_removed, icmp_added);
        write(icmp + 2, &check.to_ne_bytes());
        count(GlobalCounter::NatIcmpErrors);
        let len = if v4 { u16::from_be(read16(ip + 2)) } else { u16::from_be(read16(ip + 4)) + 40 };
        let icmp_proto = if v4 { IPPROTO_ICMP } else { IPPROTO_ICMPV6 };
        Some(send_to_client(ctx, scratch, family, icmp_proto, reply, len))
    }
}

/// `*dst = *src` between map values, without the byte-loop `memmove`
/// subprogram the compiler calls for an assignment it cannot prove
/// non-overlapping: four word loads and stores.
#[inline(always)]
fn copy_address(dst: &mut [u32; 4], src: &[u32; 4]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
    }
}
