//! A traffic generator in live-frames mode (BPF_PROG_TEST_RUN with
//! BPF_F_TEST_XDP_LIVE_FRAMES, the mechanism xdp-trafficgen uses): the
//! kernel runs lb-ebpf's `trafficgen` program over a frame and transmits
//! its XDP_TX result out of an interface, as fast as the CPU allows. Each
//! frame leaves with the next source port, and optionally the next source
//! address, so that every frame is a new flow to a load balancer.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp},
};
use lb_common::TRAFFICGEN_HEADER_LEN;

/// Frames one test run sends at most (the kernel's batch loop re-checks
/// for signals between batches).
const FRAMES_PER_RUN: u32 = 1 << 15;

pub struct Generator {
    ebpf: Arc<Ebpf>,
    headers: Array<MapData, [u8; TRAFFICGEN_HEADER_LEN]>,
    ns: String,
    ifindex: u32,
    rx_queues: u32,
}

impl Generator {
    /// Loads `trafficgen` from the xdp-baselines object at `object`, to send
    /// out of `interface` in namespace `ns`, which has `rx_queues` receive
    /// queues in use (thread t runs as if on queue t modulo that); source
    /// addresses cycle through `addresses` values (1: the frame's own only).
    pub fn load(object: &Path, ns: &str, interface: &str, rx_queues: u32, addresses: u32) -> Result<Self> {
        let (object, ns_name, interface) = (object.to_path_buf(), ns.to_string(), interface.to_string());
        crate::run_in(ns, move || -> Result<Self> {
            let mut ebpf = EbpfLoader::new()
                .override_global("GEN_ADDRESSES", &addresses, true)
                .load_file(&object)
                .with_context(|| format!("loading {}", object.display()))?;
            let program: &mut Xdp = ebpf.program_mut("trafficgen").context("trafficgen")?.try_into()?;
            program.load()?;
            let headers = Array::try_from(ebpf.take_map("GEN_HEADERS").context("GEN_HEADERS")?)?;
            let ifindex = nix::net::if_::if_nametoindex(interface.as_str())
                .with_context(|| format!("interface {interface} in {ns_name}"))?;
            Ok(Generator { ebpf: Arc::new(ebpf), headers, ns: ns_name, ifindex, rx_queues: rx_queues.max(1) })
        })?
    }

    /// Frames sent so far.
    pub fn sent(&self) -> Result<u64> {
        let map = self.ebpf.map("GEN_COUNTER").context("GEN_COUNTER")?;
        let counter: PerCpuArray<&MapData, u32> = PerCpuArray::try_from(map)?;
        Ok(counter.get(&0, 0)?.iter().map(|n| *n as u64).sum())
    }

    /// Sends `frame` `count` times, split over `threads` threads (one per
    /// CPU); returns how long that took.
    pub fn send_count(&mut self, frame: &[u8], count: u64, threads: usize) -> Result<Duration> {
        let per_thread = count.div_ceil(threads as u64);
        self.send(frame, threads, move |_, sent| per_thread.saturating_sub(sent))
    }

    /// Sends `frame` for `duration` with `threads` threads; returns how long
    /// that took.
    pub fn send_for(&mut self, frame: &[u8], duration: Duration, threads: usize) -> Result<Duration> {
        let started = Instant::now();
        self.send(frame, threads, move |stop: &AtomicBool, _| {
            if stop.load(Ordering::Relaxed) || started.elapsed() >= duration { 0 } else { u64::MAX }
        })
    }

    /// Sends `frame` from `threads` threads until `remaining(stop, sent by
    /// this thread)` says 0.
    fn send(
        &mut self,
        frame: &[u8],
        threads: usize,
        remaining: impl Fn(&AtomicBool, u64) -> u64 + Send + Sync + Copy + 'static,
    ) -> Result<Duration> {
        if frame.len() < TRAFFICGEN_HEADER_LEN {
            bail!("a generator frame holds at least {TRAFFICGEN_HEADER_LEN} bytes, not {}", frame.len());
        }
        // The program restores these headers in every recycled frame.
        self.headers.set(0, <[u8; TRAFFICGEN_HEADER_LEN]>::try_from(&frame[..TRAFFICGEN_HEADER_LEN])?, 0)?;
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (ebpf, stop, frame, ns, ifindex) =
                    (self.ebpf.clone(), stop.clone(), frame.to_vec(), self.ns.clone(), self.ifindex);
                let rx_queue = t as u32 % self.rx_queues;
                std::thread::spawn(move || -> Result<()> {
                    crate::enter(&ns)?;
                    crate::pin_to_cpu(t)?;
                    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
                    let ctx: Vec<u8> =
                        [0, frame.len() as u32, 0, ifindex, rx_queue, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
                    let program: &Xdp = ebpf.program("trafficgen").context("trafficgen")?.try_into()?;
                    let mut sent = 0u64;
                    loop {
                        let left = remaining(&stop, sent);
                        if left == 0 {
                            return Ok(());
                        }
                        let batch = left.min(FRAMES_PER_RUN as u64) as u32;
                        let opts = TestRunOptions {
                            data_in: Some(&frame),
                            ctx_in: Some(&ctx),
                            repeat: batch,
                            attrs: TestRunAttrs::new().xdp_live_frames(64),
                            ..Default::default()
                        };
                        if let Err(err) = program.test_run(opts) {
                            stop.store(true, Ordering::Relaxed);
                            return Err(err).context("live-frames test run");
                        }
                        sent += batch as u64;
                    }
                })
            })
            .collect();
        let mut result = Ok(());
        for worker in workers {
            let outcome = worker.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a generator thread panicked")));
            result = result.and(outcome);
        }
        result.map(|()| started.elapsed())
    }
}
