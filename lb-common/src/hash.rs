//! Hashes the data plane schedules by (the agent computes the same ones),
//! and a tunnelled flow's entropy.

use crate::FlowKey;

/// Hash of a five-tuple, used to pick a Maglev slot. MurmurHash3's x86_32
/// mixing over the key's ten words: cheap in BPF (no loops over bytes) and
/// well spread modulo a prime ring size.
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let ports = (key.sport as u32) << 16 | key.dport as u32;
    let mut h: u32 = 0x7864_706c ^ key.proto as u32; // "xdpl"
    h = mix(h, key.src[0]);
    h = mix(h, key.src[1]);
    h = mix(h, key.src[2]);
    h = mix(h, key.src[3]);
    h = mix(h, key.dst[0]);
    h = mix(h, key.dst[1]);
    h = mix(h, key.dst[2]);
    h = mix(h, key.dst[3]);
    h = mix(h, ports);
    fmix32(h ^ 36)
}

/// A tunnelled flow's entropy: the GUE source port and outer IPv6 flow
/// label that routers and the backend's NIC spread flows by. Nothing has
/// to agree with it, unlike `flow_hash`, whose Maglev picks every node and
/// release must share; so it hashes only the words a family has: an IPv4
/// flow's three (addresses, ports) instead of nine, a third of the
/// serial mixing a GUE or 4in6 packet waits for. IPv6 flows get
/// `flow_hash`.
#[inline(always)]
pub fn tunnel_entropy(key: &FlowKey) -> u32 {
    if key.family != crate::FAMILY_IPV4 {
        return flow_hash(key);
    }
    let ports = (key.sport as u32) << 16 | key.dport as u32;
    let mut h: u32 = 0x7475_6e6c ^ key.proto as u32; // "tunl"
    h = mix(h, key.src[0]);
    h = mix(h, key.dst[0]);
    h = mix(h, ports);
    fmix32(h ^ 12)
}

/// Hash of a client address alone (source_hash scheduling, affinity).
#[inline(always)]
pub fn source_hash(addr: &[u32; 4]) -> u32 {
    let mut h: u32 = 0x7372_6368; // "srch"
    h = mix(h, addr[0]);
    h = mix(h, addr[1]);
    h = mix(h, addr[2]);
    h = mix(h, addr[3]);
    fmix32(h ^ 16)
}

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let mut k = word.wrapping_mul(0xcc9e_2d51);
    k = k.rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
