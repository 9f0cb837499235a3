//! Schedulers: the backend of a new flow. The connection table pins the flow
//! afterwards, whatever the scheduler.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::bpf_get_prandom_u32;
use lb_common::{MAX_LEAST_CONN_CANDIDATES, NO_BACKEND, SLOTS_PER_ELEMENT, VipInfo, flow_hash, scheduler, source_hash};

use lb_ebpf::parse::Packet;

use crate::{
    affinity,
    maps::{ACTIVE_CORRECTION, ACTIVE_FLOWS, CURSORS, LEAST_CONN_CANDIDATES, RING_SLOTS, ring_size},
};

/// The backend for a new flow of `vip`, client affinity first; `remember`:
/// record it as the client's affinity (not for SYNs of a flood, which
/// would evict real clients' affinity).
#[inline(always)]
pub fn pick(packet: &Packet, vip: &VipInfo, now: u64, remember: bool) -> Option<u32> {
    picked(packet, vip, now, pick_raw(packet, vip, now), remember)
}

/// `pick` in two steps: the scheduler's raw choice (call it where the
/// caller holds little state, see `pick_subprogram`)...
#[inline(always)]
pub fn pick_raw(packet: &Packet, vip: &VipInfo, now: u64) -> u32 {
    pick_subprogram(packet, vip, now)
}

/// ...and what it means: the backend, the client's affinity recorded.
#[inline(always)]
pub fn picked(packet: &Packet, vip: &VipInfo, now: u64, picked: u32, remember: bool) -> Option<u32> {
    if picked == NO_BACKEND {
        return None;
    }
    let backend_id = picked & !FROM_AFFINITY;
    if remember && vip.persistence_timeout_ns != 0 && picked & FROM_AFFINITY == 0 {
        affinity::remember(packet, vip, backend_id, now);
    }
    Some(backend_id)
}

/// Marks a pick that followed the client's affinity (backend ids are far
/// below it).
const FROM_AFFINITY: u32 = 1 << 31;

/// The scheduler's pick as a BPF subprogram returning a scalar
/// (`NO_BACKEND`: none): the schedulers' many paths (least_conn's scan
/// above all) end in one return, so the SYN and non-SYN paths that call it
/// are each verified once, not once per scheduler path.
#[inline(never)]
fn pick_subprogram(packet: &Packet, vip: &VipInfo, now: u64) -> u32 {
    if vip.persistence_timeout_ns != 0
        && let Some(backend_id) = affinity::lookup(packet, vip, now)
    {
        crate::counters::count(lb_common::GlobalCounter::AffinityHit);
        return backend_id | FROM_AFFINITY;
    }
    let backend_id = match vip.scheduler {
        scheduler::SEQUENCE => sequence(vip),
        // SAFETY: a helper without arguments or preconditions.
        scheduler::RANDOM => ring_slot(vip, unsafe { bpf_get_prandom_u32() }),
        scheduler::SOURCE_HASH => ring_slot(vip, source_hash(&packet.flow.src)),
        scheduler::LEAST_CONN => least_conn(vip),
        _ => ring_slot(vip, flow_hash(&packet.flow)),
    };
    backend_id.unwrap_or(NO_BACKEND)
}

/// Slot `hash % size` of the VIP's Maglev table.
#[inline(always)]
fn ring_slot(vip: &VipInfo, hash: u32) -> Option<u32> {
    let size = ring_size();
    if size == 0 {
        return None; // never loaded so; also removes the divide-by-zero panic path
    }
    slot(vip.id.wrapping_mul(size).wrapping_add(hash % size))
}

/// Backend id number `index` of `RING_SLOTS`.
#[inline(always)]
fn slot(index: u32) -> Option<u32> {
    let group = RING_SLOTS.get(index / SLOTS_PER_ELEMENT)?;
    Some(u32::from(group[(index % SLOTS_PER_ELEMENT) as usize]))
}

/// The next entry of the VIP's smooth weighted sequence, by this CPU's cursor.
#[inline(always)]
fn sequence(vip: &VipInfo) -> Option<u32> {
    let len = vip.seq_len;
    if len == 0 {
        return None;
    }
    // SAFETY: a per-CPU slot: no other CPU touches it.
    let cursor = unsafe { &mut *CURSORS.get_ptr_mut(vip.id)? };
    let position = *cursor % len;
    *cursor = cursor.wrapping_add(1);
    slot(vip.id.wrapping_mul(ring_size()).wrapping_add(position))
}

/// Weighted least connections: the candidate with the fewest active flows
/// per unit of weight (compared as a·w_b < b·w_a, no division). Ties (idle
/// backends, short requests) go to the smallest `mix(id ^ salt)` with a
/// fresh random salt per scan: each tied candidate is as likely to win, so
/// they never all go to one backend. (A counting reservoir would do the
/// same but makes the verifier track every tie count: too many states.)
/// The candidates and weights come from one value (`LEAST_CONN_CANDIDATES`):
/// reading each one's ring slot and `BACKENDS` entry cost a new flow 65 ns
/// more at 32 backends. (The ring's first slots name the same candidates,
/// for a program of an older release while an upgrade swaps it out.)
#[inline(always)]
fn least_conn(vip: &VipInfo) -> Option<u32> {
    let candidates = LEAST_CONN_CANDIDATES.get(vip.id)?;
    // SAFETY: a helper without arguments or preconditions.
    let salt = unsafe { bpf_get_prandom_u32() };
    // The best so far; plain words, not an Option (whose unset fields the
    // compiler spills unread, which the verifier refuses).
    let (mut best_id, mut best_active, mut best_weight, mut best_key) = (NO_BACKEND, 0u64, 0u64, 0u32);
    for i in 0..MAX_LEAST_CONN_CANDIDATES as usize {
        if i as u32 >= vip.seq_len {
            break;
        }
        // The agent writes backends in use with a weight only (no test
        // here: a branch more per candidate costs the verifier its limit);
        // `select` checks the pick.
        let (id, weight) = (u32::from(candidates.ids[i]), u64::from(candidates.weights[i]));
        let active = active_flows(id);
        let key = (id ^ salt).wrapping_mul(0x9e37_79b1).rotate_left(13);
        let (this, other) = (active * best_weight, best_active * weight);
        if best_id == NO_BACKEND || this < other || (this == other && key < best_key) {
            (best_id, best_active, best_weight, best_key) = (id, active, weight, key);
        }
    }
    (best_id != NO_BACKEND).then_some(best_id)
}

#[inline(always)]
fn active_flows(backend_id: u32) -> u64 {
    let counted = ACTIVE_FLOWS.get(backend_id).copied().unwrap_or(0) as i64;
    let correction = ACTIVE_CORRECTION.get(backend_id).copied().unwrap_or(0);
    let active = counted + correction;
    if active < 0 { 0 } else { active as u64 }
}

/// Counts a flow starting (`+1`) or ending (`-1`) on a least_conn backend.
#[inline(always)]
pub fn account(backend_id: u32, delta: i64) {
    if let Some(counter) = ACTIVE_FLOWS.get_ptr_mut(backend_id) {
        // A plain atomic add whose result is unused: one BPF XADD. (The BPF
        // target has no compare-and-swap, so core's AtomicU64 offers no
        // fetch_add; the intrinsic is what it would call.)
        // SAFETY: `counter` points into the ACTIVE_FLOWS array; XADD is atomic across CPUs.
        unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(counter, delta as u64) };
    }
}
