//! What the XDP program (`lb-ebpf`) and the agent (`lb-userspace`) share:
//! constants, map layouts, the map schema, counters and hashes. Each is
//! defined here once.
#![no_std]

pub mod consts;
pub mod counters;
pub mod hash;
pub mod layout;
pub mod nat;
pub mod schema;
pub mod wire;

pub use consts::*;
pub use counters::*;
pub use hash::*;
pub use layout::*;
pub use schema::{Capacity, MAP_SPECS, MapKind, MapSpec, map_names, map_spec, names};

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and byte
    // arrays, and have explicit padding fields, so every bit pattern is valid.
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipInfo {}
    unsafe impl aya::Pod for VipAddressKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for FlowState {}
    unsafe impl aya::Pod for TrafficCounters {}
    unsafe impl aya::Pod for AffinityKey {}
    unsafe impl aya::Pod for AffinityState {}
    unsafe impl aya::Pod for NatPool {}
    unsafe impl aya::Pod for NatFlow {}
    unsafe impl aya::Pod for NatReply {}
    unsafe impl aya::Pod for NatScratch {}
    unsafe impl aya::Pod for ClockReading {}
    unsafe impl aya::Pod for SynRate {}
    unsafe impl aya::Pod for LeastConnCandidates {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<VipKey>(), 20);
        assert_eq!(size_of::<VipInfo>(), 24);
        assert_eq!(size_of::<AffinityKey>(), 24);
        assert_eq!(size_of::<AffinityState>(), 16);
        assert_eq!(size_of::<VipAddressKey>(), 20);
        // Changing any of these changes what pinned maps hold: bump LAYOUT_VERSION.
        assert_eq!(size_of::<Backend>(), 64);
        assert_eq!(size_of::<FlowKey>(), 40);
        assert_eq!(size_of::<FlowState>(), 16);
        assert_eq!(size_of::<FlowEvent>(), 48);
        assert_eq!(size_of::<SynRate>(), 16);
        assert_eq!(size_of::<ClockReading>(), 16);
        assert_eq!(size_of::<LeastConnCandidates>(), 4 * MAX_LEAST_CONN_CANDIDATES as usize);
        assert_eq!(size_of::<TrafficCounters>(), 24);
        assert_eq!(size_of::<DevmapValue>(), 8);
        assert_eq!(size_of::<NatPool>(), 16 * MAX_NAT_SOURCES + 20);
        assert_eq!(size_of::<NatFlow>(), 40);
        assert_eq!(size_of::<NatReply>(), 56);
        assert_eq!(size_of::<NatScratch>(), 40 + 56 + 40 + 64 + 16);
    }

    #[test]
    fn map_schema_names_are_unique_and_sized() {
        for (i, a) in MAP_SPECS.iter().enumerate() {
            assert!(MAP_SPECS[i + 1..].iter().all(|b| b.name != a.name), "{} twice", a.name);
            if a.kind == MapKind::RingBuf {
                // A ring buffer has no keys or values; its size is in bytes,
                // a power-of-two multiple of the page size.
                assert!(a.default_entries.is_power_of_two() && a.default_entries % 4096 == 0, "{a:?}");
            } else {
                assert!(a.key_size > 0 && a.value_size > 0 && a.default_entries > 0, "{a:?}");
            }
        }
        assert_eq!(map_spec(map_names::CONNTRACK).unwrap().capacity, Capacity::Conntrack);
        assert_eq!(map_spec(map_names::HALF_OPEN).unwrap().capacity, Capacity::HalfOpen);
        assert!(map_spec(map_names::GLOBAL_COUNTERS).unwrap().default_entries >= GLOBAL_COUNTER_COUNT);
    }

    #[test]
    fn flow_hash_spreads_neighbouring_ports() {
        // Ports that differ in one bit must land in different buckets of a
        // small prime table most of the time.
        let mut buckets = [0u32; 13];
        for port in 0..1300u16 {
            let key = FlowKey {
                src: [0x0100_12c6, 0, 0, 0],
                dst: [0x6400_12c6, 0, 0, 0],
                sport: port.to_be(),
                dport: 80u16.to_be(),
                proto: PROTO_TCP,
                family: FAMILY_IPV4,
                _pad: [0; 2],
            };
            buckets[(flow_hash(&key) % 13) as usize] += 1;
        }
        for (i, n) in buckets.iter().enumerate() {
            assert!((70..=130).contains(n), "bucket {i} holds {n} of 1300");
        }
    }

    #[test]
    fn global_counter_table_is_complete() {
        for (i, c) in GlobalCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
