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
    extern crate std;

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
    fn tunnel_entropy_spreads_ipv4_flows_and_is_flow_hash_for_ipv6() {
        let key = |src: u32, sport: u16, proto: u8| FlowKey {
            src: [src, 0, 0, 0],
            dst: [0x6400_12c6, 0, 0, 0],
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto,
            family: FAMILY_IPV4,
            _pad: [0; 2],
        };
        // GUE source ports (hash mod 16384) of neighbouring client ports
        // and of neighbouring clients: as distinct as a random function's
        // (about 970 of 1000).
        let by_port: std::collections::BTreeSet<u32> =
            (40000..41000u16).map(|p| tunnel_entropy(&key(0x0100_12c6, p, PROTO_TCP)) % 16384).collect();
        assert!(by_port.len() > 960, "{} distinct of 1000", by_port.len());
        let by_client: std::collections::BTreeSet<u32> = (0..1000u32)
            .map(|c| {
                tunnel_entropy(&key(u32::from_ne_bytes([198, 18, (c >> 8) as u8, c as u8]), 40000, PROTO_TCP)) % 16384
            })
            .collect();
        assert!(by_client.len() > 960, "{} distinct of 1000", by_client.len());
        let tcp = key(0x0100_12c6, 40000, PROTO_TCP);
        assert_ne!(tunnel_entropy(&tcp), tunnel_entropy(&key(0x0100_12c6, 40000, PROTO_UDP)));
        let v6 = FlowKey { src: [1, 2, 3, 4], dst: [5, 6, 7, 8], family: FAMILY_IPV6, ..tcp };
        assert_eq!(tunnel_entropy(&v6), flow_hash(&v6));
    }

    #[test]
    fn global_counter_table_is_complete() {
        for (i, c) in GlobalCounter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i);
        }
    }
}
