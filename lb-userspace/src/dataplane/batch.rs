//! Batch map operations, many elements in one syscall. aya has none; these
//! are the only raw `bpf(2)` calls the agent makes.
//!
//! - `update_array` (`BPF_MAP_UPDATE_BATCH`): a new service's backends.
//!   10,000 of them took 10,000 syscalls (about 17 ms) before.
//! - `read_hash` (`BPF_MAP_LOOKUP_BATCH`): the scans and snapshots of the
//!   connection, half-open and NAT tables. Reading entry by entry took two syscalls each (next
//!   key, then value), which made the scan thread a fifth of the LB's CPU
//!   under a stream of new NAT connections.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

/// uapi bpf.h `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;

/// `union bpf_attr`'s `batch` member.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Sets `values[i]` at index `keys[i]` of the array `map`, in order. On a
/// refusal, returns how many elements were written before it, with the
/// kernel's error.
pub fn update_array<V: aya::Pod>(map: BorrowedFd<'_>, keys: &[u32], values: &[V]) -> Result<(), (usize, io::Error)> {
    assert_eq!(keys.len(), values.len(), "one value per key");
    if keys.is_empty() {
        return Ok(());
    }
    let count = u32::try_from(keys.len()).map_err(|_| (0, io::Error::other("too many elements for one batch")))?;
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.as_ptr() as u64,
        count,
        map_fd: map.as_raw_fd() as u32,
        ..Default::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix of its own size; the
    // kernel reads `count` keys and values from the slices, which outlive
    // the call, and writes back only `attr.count`.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
    };
    if rc < 0 {
        let error = io::Error::last_os_error();
        // The kernel reports in `count` how far it got, except when it
        // refused the call as a whole, which leaves `count` as it was.
        let written = if attr.count < count { attr.count as usize } else { 0 };
        return Err((written, error));
    }
    Ok(())
}

/// Entries a hash-map lookup batch asks for at first. A batch holds whole
/// hash buckets; a bucket larger than the batch makes it grow.
const LOOKUP_BATCH_ENTRIES: usize = 4096;

/// Every entry of the hash map `name` (plain or LRU, not per-CPU), read in
/// batches of whole buckets. Entries added or removed during the read may
/// be missed, as with any walk of a live table.
pub fn read_hash<K: aya::Pod, V: aya::Pod>(map: &aya::maps::MapData, name: &str) -> anyhow::Result<Vec<(K, V)>> {
    use anyhow::Context as _;
    // The batch read hands the kernel buffers of K and V: their sizes must be the map's.
    let info = map.info().with_context(|| format!("map {name}"))?;
    let (key, value) = (info.key_size() as usize, info.value_size() as usize);
    if (key, value) != (size_of::<K>(), size_of::<V>()) {
        anyhow::bail!(
            "map {name} has {key}-byte keys and {value}-byte values, the agent expects {} and {}",
            size_of::<K>(),
            size_of::<V>()
        );
    }
    lookup_hash(map.fd().as_fd()).with_context(|| format!("reading map {name}"))
}

/// `read_hash` without the size check: `K` and `V` must have the sizes of
/// the map's keys and values.
fn lookup_hash<K: aya::Pod, V: aya::Pod>(map: BorrowedFd<'_>) -> io::Result<Vec<(K, V)>> {
    let mut entries = Vec::new();
    let mut capacity = LOOKUP_BATCH_ENTRIES;
    // SAFETY (both): `Pod` types are valid for any bytes, zeroes included.
    let mut keys: Vec<K> = vec![unsafe { std::mem::zeroed() }; capacity];
    let mut values: Vec<V> = vec![unsafe { std::mem::zeroed() }; capacity];
    // The kernel's position (a bucket index) between calls; none at first.
    let mut position: Option<u32> = None;
    loop {
        let mut next: u32 = 0;
        let mut attr = BatchAttr {
            in_batch: position.as_ref().map_or(0, |p| p as *const u32 as u64),
            out_batch: &mut next as *mut u32 as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: capacity as u32,
            map_fd: map.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is a valid `bpf_attr` prefix of its own size; the
        // kernel writes at most `count` keys and values of the map's sizes,
        // which are `K`'s and `V`'s, into buffers of `capacity` each, the
        // next position into `next`, and back into `attr.count`.
        let rc = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        // ENOENT: these were the last buckets, and what they held is in the buffers.
        let last = if rc < 0 {
            let error = io::Error::last_os_error();
            match error.raw_os_error() {
                // One bucket holds more entries than the batch: a larger one.
                Some(libc::ENOSPC) if attr.count == 0 => {
                    capacity *= 2;
                    keys.resize(capacity, unsafe { std::mem::zeroed() });
                    values.resize(capacity, unsafe { std::mem::zeroed() });
                    continue;
                }
                Some(libc::ENOENT) => true,
                _ => return Err(error),
            }
        } else {
            false
        };
        let read = (attr.count as usize).min(capacity);
        entries.extend(keys[..read].iter().copied().zip(values[..read].iter().copied()));
        if last {
            return Ok(entries);
        }
        position = Some(next);
    }
}
