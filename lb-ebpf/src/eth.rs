//! Ethernet addresses written into the frame.

/// Writes the destination and source MAC addresses at `start` (the frame's
/// first byte).
///
/// Not a plain assignment: the compiler cannot rule out that a map value
/// and the frame overlap, so `eth.dst_addr = mac` becomes a call of a
/// byte-by-byte `memmove` subprogram; a non-overlapping copy of 6 bytes is
/// inlined as loads and stores.
///
/// # Safety
/// `start..start + 12` must be inside the frame (checked against
/// `data_end`), and neither address may point into it.
#[inline(always)]
pub unsafe fn set_addresses(start: usize, dst: &[u8; 6], src: &[u8; 6]) {
    // SAFETY: the caller guarantees 12 writable bytes at `start`, apart
    // from `dst` and `src`.
    unsafe {
        core::ptr::copy_nonoverlapping(dst.as_ptr(), start as *mut u8, 6);
        core::ptr::copy_nonoverlapping(src.as_ptr(), (start + 6) as *mut u8, 6);
    }
}
