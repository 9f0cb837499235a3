//! Maglev table build at the default size, 10/100/1000/10,000 backends.
use std::net::Ipv4Addr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use xdplb::scheduling::maglev::{MaglevBackend, build_table, stable_hash};

fn maglev_build(c: &mut Criterion) {
    let mut group = c.benchmark_group("maglev_build");
    for n in [10u32, 100, 1000, 10_000] {
        let backends: Vec<MaglevBackend> = (0..n)
            .map(|i| MaglevBackend {
                id: i + 1,
                identity: stable_hash(&Ipv4Addr::from(0xc612_0000 + i).octets()),
                weight: 1 + i % 3,
            })
            .collect();
        group.bench_with_input(BenchmarkId::from_parameter(n), &backends, |b, backends| {
            b.iter(|| build_table(backends, lb_common::DEFAULT_RING_SIZE))
        });
    }
    group.finish();
}

criterion_group!(benches, maglev_build);
criterion_main!(benches);
