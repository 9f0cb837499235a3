//! `BPF_MAP_UPDATE_BATCH` for arrays: many elements in one syscall. aya
//! has no batch operations; this is the one raw `bpf(2)` call the agent
//! makes. A new service's backends go this way: 10,000 of them took 10,000
//! syscalls (about 17 ms) before.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

/// `BPF_MAP_UPDATE_BATCH` (uapi bpf.h `enum bpf_cmd`).
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
