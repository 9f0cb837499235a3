//! Host-side stub: the XDP program itself is the `lb-ebpf` binary target,
//! built for `bpfel-unknown-none` by `lb-userspace/build.rs`. This library
//! exists so that the userspace crate can depend on this package and be
//! rebuilt when it changes.
#![no_std]
