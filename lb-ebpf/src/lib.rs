//! What the eBPF binaries of this package share: the parser, the tunnel
//! header writer, NAT's rewrite, the Ethernet address writer and the panic
//! handler. The XDP programs themselves are the binary targets (`lb-ebpf`:
//! the load balancer; `xdp-pass`: a test-topology helper; `xdp-baselines`:
//! the benchmark's baselines), built for `bpfel-unknown-none` by
//! `lb-userspace/build.rs`. On the host this library is empty: it exists so
//! that lb-userspace can depend on this package and be rebuilt when it changes.
#![no_std]

#[cfg(target_arch = "bpf")]
pub mod encap;
#[cfg(target_arch = "bpf")]
pub mod eth;
#[cfg(target_arch = "bpf")]
pub mod parse;
#[cfg(target_arch = "bpf")]
pub mod rewrite;

/// BPF programs cannot unwind, and the verifier rejects any path that could
/// reach this; it exists because `no_std` binaries must name one.
#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
