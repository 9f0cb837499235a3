//! Per-CPU counters: plain increments, no atomics needed.

use lb_common::{GlobalCounter, TrafficCounters};

use crate::maps::{BACKEND_COUNTERS, GLOBAL_COUNTERS, VIP_COUNTERS};

#[inline(always)]
pub fn count(counter: GlobalCounter) {
    count_slot(counter as u32);
}

#[inline(always)]
pub fn count_slot(slot: u32) {
    if let Some(value) = GLOBAL_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: a per-CPU slot: no other CPU writes it.
        unsafe { *value += 1 };
    }
}

#[inline(always)]
pub fn count_traffic(vip_id: u32, backend_id: u32, bytes: u64, new_flow: bool) {
    if let Some(c) = VIP_COUNTERS.get_ptr_mut(vip_id) {
        // SAFETY: a per-CPU slot: no other CPU writes it.
        unsafe { add(&mut *c, bytes, new_flow) };
    }
    if let Some(c) = BACKEND_COUNTERS.get_ptr_mut(backend_id) {
        // SAFETY: a per-CPU slot: no other CPU writes it.
        unsafe { add(&mut *c, bytes, new_flow) };
    }
}

#[inline(always)]
fn add(c: &mut TrafficCounters, bytes: u64, new_flow: bool) {
    c.packets += 1;
    c.bytes += bytes;
    c.new_flows += new_flow as u64;
}
