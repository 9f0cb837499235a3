//! Pinned arrays that a newer version made longer (`MAX_BACKENDS` grew from
//! 4096 to 16384 slots for services of 10,000 backends). An upgraded agent
//! must not lose what they hold: backend slots are what the connection
//! table's entries point at. Before the load, such an array is unpinned but
//! kept open; the load creates and pins the longer one; every entry is then
//! copied over before the new program is attached. The old program keeps
//! counting into the old array until it is swapped out: the counts of those
//! few milliseconds are lost.

use std::path::Path;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf,
    maps::{Array, Map, MapData, MapInfo, PerCpuArray},
};
use lb_common::{Backend, Capacity, MAP_SPECS, MapKind, TrafficCounters, map_names};

/// A pinned array shorter than this version's, unpinned and still open.
pub struct Outgrown {
    name: &'static str,
    old: MapData,
    entries: u32,
    path: std::path::PathBuf,
}

/// Unpins the pinned fixed-size arrays of `layout_dir` that this version
/// makes longer, keeping them open for `copy_over`.
pub fn take(layout_dir: &Path) -> Result<Vec<Outgrown>> {
    let mut taken = Vec::new();
    let growable = MAP_SPECS.iter().filter(|spec| {
        spec.pinned && spec.capacity == Capacity::Fixed && matches!(spec.kind, MapKind::Array | MapKind::PerCpuArray)
    });
    for spec in growable {
        let path = layout_dir.join(spec.name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).with_context(|| format!("reading pinned map {}", path.display()))?;
        let same_shape = info.key_size() as usize == spec.key_size && info.value_size() as usize == spec.value_size;
        if !same_shape || info.max_entries() >= spec.default_entries {
            continue; // equal: adopted as is; otherwise the shape check refuses it
        }
        let old = MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        std::fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
        log::info!("{} grows from {} to {} entries", spec.name, info.max_entries(), spec.default_entries);
        taken.push(Outgrown { name: spec.name, old, entries: info.max_entries(), path });
    }
    Ok(taken)
}

/// Copies every entry of the outgrown arrays into their successors in `ebpf`.
pub fn copy_over(ebpf: &mut Ebpf, outgrown: Vec<Outgrown>) -> Result<()> {
    for Outgrown { name, old, entries, .. } in outgrown {
        let new = ebpf.map_mut(name).with_context(|| format!("map {name} missing from object"))?;
        let old = Map::from_map_data(old)?;
        match name {
            map_names::BACKENDS => copy_array::<Backend>(old, new, entries),
            map_names::ACTIVE_FLOWS => copy_array::<u64>(old, new, entries),
            map_names::ACTIVE_CORRECTION => copy_array::<i64>(old, new, entries),
            map_names::BACKEND_COUNTERS => copy_per_cpu::<TrafficCounters>(old, new, entries),
            _ => anyhow::bail!("no rule to copy the entries of {name} into a longer map"),
        }
        .with_context(|| format!("copying {name} into its longer successor"))?;
    }
    Ok(())
}

/// Pins the outgrown arrays again (the load failed: nothing replaced them).
pub fn restore(outgrown: Vec<Outgrown>) {
    for Outgrown { old, path, .. } in outgrown {
        if let Err(err) = old.pin(&path) {
            log::error!("pinning {} again: {err}", path.display());
        }
    }
}

fn copy_array<V: aya::Pod>(old: Map, new: &mut Map, entries: u32) -> Result<()> {
    let old: Array<MapData, V> = Array::try_from(old)?;
    let mut new: Array<&mut MapData, V> = Array::try_from(new)?;
    for index in 0..entries {
        new.set(index, old.get(&index, 0)?, 0)?;
    }
    Ok(())
}

fn copy_per_cpu<V: aya::Pod>(old: Map, new: &mut Map, entries: u32) -> Result<()> {
    let old: PerCpuArray<MapData, V> = PerCpuArray::try_from(old)?;
    let mut new: PerCpuArray<&mut MapData, V> = PerCpuArray::try_from(new)?;
    for index in 0..entries {
        new.set(index, old.get(&index, 0)?, 0)?;
    }
    Ok(())
}
