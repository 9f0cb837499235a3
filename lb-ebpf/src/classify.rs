//! VIP lookup: exact (address, port, protocol) first, then the port-0
//! wildcard of the same address and protocol.

use lb_common::{FlowKey, VipAddressKey, VipInfo, VipKey};

use crate::maps::{VIP_ADDRESSES, VIPS, WILDCARD_VIPS};

#[inline(always)]
pub fn lookup_vip(flow: &FlowKey) -> Option<VipInfo> {
    let mut key = VipKey { addr: flow.dst, port: flow.dport, proto: flow.proto, family: flow.family };
    // SAFETY: a hash lookup whose value outlives this run; it is only read.
    if let Some(vip) = unsafe { VIPS.get(&key) } {
        return Some(*vip);
    }
    if WILDCARD_VIPS.get(0).copied().unwrap_or(0) == 0 {
        return None;
    }
    key.port = 0;
    // SAFETY: a hash lookup whose value outlives this run; it is only read.
    unsafe { VIPS.get(&key) }.copied()
}

/// Whether some VIP lives on this address (for packets without ports).
#[inline(always)]
pub fn is_vip_address(dst: [u32; 4], family: u8) -> bool {
    let key = VipAddressKey { addr: dst, family, _pad: [0; 3] };
    // SAFETY: a hash lookup whose value outlives this run; it is only read.
    unsafe { VIP_ADDRESSES.get(&key) }.is_some()
}
