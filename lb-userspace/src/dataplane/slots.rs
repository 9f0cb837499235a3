//! `RING_SLOTS` through shared memory. The map is `BPF_F_MMAPABLE`, so the
//! agent reads and writes the slots in place: a new service's 65537 slots
//! took 68 ms as one syscall per slot and 21 ms as one
//! `BPF_MAP_UPDATE_BATCH` (the kernel still copies slot by slot); stores
//! into the mapping take well under a millisecond. Each slot is an aligned
//! 16-bit store, so the data plane reads an old or a new id, never a mix.

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::NonNull,
};

use anyhow::{Result, bail};
use lb_common::SLOTS_PER_ELEMENT;

/// The kernel places an array's elements this far apart (8-byte aligned).
const ELEMENT_BYTES: usize = 8;

/// The slots of a mapped `RING_SLOTS` map, unmapped on drop.
pub struct SlotTable {
    base: NonNull<u16>,
    slots: usize,
    mapped: usize,
}

impl SlotTable {
    /// Maps the array `map` of `elements` elements.
    pub fn map(map: BorrowedFd<'_>, elements: u32) -> io::Result<Self> {
        let mapped = elements as usize * ELEMENT_BYTES;
        // SAFETY: a shared mapping of a map the kernel sized `mapped` bytes
        // (page-rounded); nothing else in this process aliases it.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(address.cast::<u16>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(SlotTable { base, slots: elements as usize * SLOTS_PER_ELEMENT as usize, mapped })
    }

    pub fn get(&self, index: usize) -> Result<u32> {
        if index >= self.slots {
            bail!("slot {index} is beyond the {} slots of the map", self.slots);
        }
        // SAFETY: in bounds (checked), aligned (2-byte slots from a page).
        Ok(u32::from(unsafe { self.base.as_ptr().add(index).read_volatile() }))
    }

    pub fn set(&mut self, index: usize, backend_id: u32) -> Result<()> {
        let Ok(id) = u16::try_from(backend_id) else { bail!("backend id {backend_id} does not fit a slot") };
        if index >= self.slots {
            bail!("slot {index} is beyond the {} slots of the map", self.slots);
        }
        // SAFETY: as in `get`; the data plane only reads the slot.
        unsafe { self.base.as_ptr().add(index).write_volatile(id) };
        Ok(())
    }
}

impl Drop for SlotTable {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped) };
    }
}
