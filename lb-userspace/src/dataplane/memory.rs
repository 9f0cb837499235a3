//! The kernel memory the maps take, computed from the schema the way the
//! kernel accounts it (`map_mem_usage` of kernel/bpf/arraymap.c, hashtab.c,
//! ringbuf.c, devmap.c; what `/proc/PID/fdinfo` reports as memlock). `xdplb
//! check` prints it for a config; the benchmark prints it next to the
//! kernel's own figures.

use anyhow::Result;
use lb_common::{BPF_F_MMAPABLE, MAP_SPECS, MapKind, MapSpec};

use super::DataplaneParams;

/// `struct htab_elem` before its key (x86-64 and arm64).
const HTAB_ELEM_HEADER: u64 = 48;
/// `struct bucket`: a list head and a spinlock.
const HTAB_BUCKET: u64 = 16;
/// `HASHTAB_MAP_LOCK_COUNT` per-CPU lock counters of a hash map.
const HTAB_LOCKS_PER_CPU: u64 = 8 * 4;
const PAGE: u64 = 4096;

fn round8(bytes: usize) -> u64 {
    (bytes as u64).div_ceil(8) * 8
}

/// Bytes of kernel memory of one map with `entries` entries on a machine
/// with `cpus` possible CPUs (small fixed headers left out).
pub fn map_bytes(spec: &MapSpec, entries: u32, cpus: u64) -> u64 {
    let entries = u64::from(entries);
    let (key, value) = (round8(spec.key_size), round8(spec.value_size));
    match spec.kind {
        MapKind::Array if spec.flags & BPF_F_MMAPABLE != 0 => PAGE + (entries * value).next_multiple_of(PAGE),
        MapKind::Array => entries * value,
        MapKind::PerCpuArray => entries * (8 + value * cpus),
        MapKind::HashMap | MapKind::LruHashMap => {
            let lru = spec.kind == MapKind::LruHashMap;
            // A plain preallocated hash keeps one spare element per CPU.
            let elements = if lru { entries } else { entries + cpus };
            let spare_pointers = if lru { 0 } else { 8 * cpus };
            entries.next_power_of_two() * HTAB_BUCKET
                + HTAB_LOCKS_PER_CPU * cpus
                + elements * (HTAB_ELEM_HEADER + key + value)
                + spare_pointers
        }
        // Its entries are allocated when inserted; the buckets are not.
        MapKind::DevMapHash => entries.next_power_of_two() * 8,
        // Data pages (`entries` is the capacity in bytes) and the
        // consumer and producer pages.
        MapKind::RingBuf => entries + 2 * PAGE,
    }
}

/// Every map's kernel memory under `params`, largest first.
pub fn estimate(params: &DataplaneParams, cpus: u64) -> Result<Vec<(&'static str, u64)>> {
    let mut maps = MAP_SPECS
        .iter()
        .map(|spec| Ok((spec.name, map_bytes(spec, params.entries(spec.capacity, spec.default_entries)?, cpus))))
        .collect::<Result<Vec<_>>>()?;
    maps.sort_by_key(|(_, bytes)| std::cmp::Reverse(*bytes));
    Ok(maps)
}

/// "78.1 MiB (CONNTRACK 60.0 MiB, …)": the total and the maps of at least
/// 1 MiB.
pub fn summary(maps: &[(&str, u64)]) -> String {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let total: u64 = maps.iter().map(|(_, bytes)| bytes).sum();
    let large: Vec<String> = maps
        .iter()
        .filter(|(_, bytes)| *bytes >= 1024 * 1024)
        .map(|(name, bytes)| format!("{name} {:.1} MiB", mib(*bytes)))
        .collect();
    format!("{:.1} MiB ({})", mib(total), large.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str) -> &'static MapSpec {
        MAP_SPECS.iter().find(|spec| spec.name == name).expect("in the schema")
    }

    const MIB: f64 = 1024.0 * 1024.0;

    /// Against what kernel 6.18 reported (fdinfo memlock) for the maps at
    /// their default sizes on 2 CPUs, in `cargo xtask bench`.
    #[test]
    fn matches_what_the_kernel_reported() {
        let reported = [
            ("CONNTRACK", 524_288, 60.0),
            ("HALF_OPEN", 131_072, 15.0),
            ("NAT_FLOWS", 262_144, 36.0),
            ("NAT_REPLIES", 262_144, 40.0),
            ("RING_SLOTS", (64 * 65_537u32).div_ceil(4), 8.0),
            ("FLOW_EVENTS", 256 * 1024, 0.3),
        ];
        for (name, entries, mib) in reported {
            let estimate = map_bytes(spec(name), entries, 2) as f64 / MIB;
            assert!((estimate - mib).abs() < 0.06, "{name}: estimated {estimate:.2} MiB, kernel {mib} MiB");
        }
    }

    fn params(tables: crate::dataplane::TablesInUse) -> DataplaneParams {
        DataplaneParams { tables, ..DataplaneParams::unpinned() }
    }

    #[test]
    fn tables_no_service_uses_cost_almost_nothing() {
        use crate::dataplane::TablesInUse;
        let bytes = |maps: &[(&str, u64)], name: &str| maps.iter().find(|(n, _)| *n == name).unwrap().1;
        let unused = estimate(&params(TablesInUse::default()), 2).unwrap();
        let used = estimate(&params(TablesInUse::ALL), 2).unwrap();
        for name in ["AFFINITY", "NAT_FLOWS", "NAT_REPLIES"] {
            assert!(bytes(&unused, name) < 1024, "{name} unused: {} B", bytes(&unused, name));
            assert!(bytes(&used, name) > 30 * 1024 * 1024, "{name} in use: {} B", bytes(&used, name));
        }
        let total = |maps: &[(&str, u64)]| maps.iter().map(|(_, b)| b).sum::<u64>();
        assert!(total(&used) - total(&unused) > 120 * 1024 * 1024);
    }

    #[test]
    fn per_cpu_arrays_grow_with_the_cpus() {
        let one = map_bytes(spec("VIP_COUNTERS"), 1024, 1);
        let four = map_bytes(spec("VIP_COUNTERS"), 1024, 4);
        assert!(four > 3 * one, "{one} vs {four}");
    }

    #[test]
    fn summary_names_the_large_maps() {
        let text = summary(&[("CONNTRACK", 60 * 1024 * 1024), ("VIPS", 4096)]);
        assert_eq!(text, "60.0 MiB (CONNTRACK 60.0 MiB)");
    }
}
