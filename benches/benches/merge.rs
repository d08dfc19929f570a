//! Weight merging on one core: task arithmetic, linear, TIES and DARE-TIES
//! over 3 models of one large tensor, in GB/s of input read, against a
//! memcpy of the same input bytes.
//!
//! The tensor has `MEDLEY_MERGE_N` elements (default 16M = 2^24: 64 MB per
//! f32 tensor, 256 MB of f32 input for 3 models and a base, far past the
//! last-level cache, so throughput is the large-tensor one; the 64M
//! is `MEDLEY_MERGE_N=67108864`). Outputs have the input's element type.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use medley_benches::random_f32;
use medley_core::bf16;
use medley_core::merge::gta::{Gta, GtaOptions, TaskParams, merge};
use medley_core::merge::linear::linear;
use std::hint::black_box;
use std::sync::OnceLock;
use std::time::Duration;

fn len() -> usize {
    std::env::var("MEDLEY_MERGE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1 << 24)
}

/// memcpy of `bytes` bytes, reported in bytes/s (buffers made only if the
/// benchmark runs).
fn memcpy(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, bytes: usize) {
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function("memcpy", |b| {
        // Both buffers written at creation: no page faults while timed.
        let src = vec![1u8; bytes];
        let mut dst = vec![2u8; bytes];
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
}

/// Base and three fine-tunes of it, as f32 (built once, on first use).
fn tensors_f32() -> &'static [Vec<f32>] {
    static T: OnceLock<Vec<Vec<f32>>> = OnceLock::new();
    T.get_or_init(|| {
        let n = len();
        let base = random_f32(1, n, 0.05);
        let mut t = vec![base.clone()];
        for s in 2..5u64 {
            let d = random_f32(s, n, 0.002);
            t.push(base.iter().zip(&d).map(|(b, d)| b + d).collect());
        }
        t
    })
}

trait Data: medley_core::Element {
    const NAME: &'static str;
    fn tensors() -> &'static [Vec<Self>];
}
impl Data for f32 {
    const NAME: &'static str = "f32";
    fn tensors() -> &'static [Vec<f32>] {
        tensors_f32()
    }
}
impl Data for bf16 {
    const NAME: &'static str = "bf16";
    fn tensors() -> &'static [Vec<bf16>] {
        static T: OnceLock<Vec<Vec<bf16>>> = OnceLock::new();
        T.get_or_init(|| {
            tensors_f32()
                .iter()
                .map(|v| v.iter().map(|&x| bf16::from_f32(x)).collect())
                .collect()
        })
    }
}

fn run<T: Data>(c: &mut Criterion) {
    let n = len();
    let es = std::mem::size_of::<T>();

    // Linear: 3 models in.
    let mut g = c.benchmark_group(format!("merge/linear_{}", T::NAME));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    memcpy(&mut g, 3 * n * es);
    g.throughput(Throughput::Bytes((3 * n * es) as u64));
    g.bench_function(BenchmarkId::new("linear", "3 models"), |b| {
        let views: Vec<&[T]> = T::tensors()[1..].iter().map(|x| &x[..]).collect();
        let mut out = vec![T::from_f32(1.0); n];
        b.iter(|| linear(black_box(&views), &[0.2, 0.3, 0.5], true, &mut out).unwrap())
    });
    g.finish();

    // Task-vector family: 3 models and a base in.
    let mut g = c.benchmark_group(format!("merge/gta_{}", T::NAME));
    g.sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(4));
    memcpy(&mut g, 4 * n * es);
    g.throughput(Throughput::Bytes((4 * n * es) as u64));
    let w = [TaskParams::new(0.5), TaskParams::new(0.3), TaskParams::new(0.2)];
    let d = w.map(|p| p.with_density(0.2));
    for (name, opts, params) in [
        (
            "task_arithmetic",
            GtaOptions {
                lambda: 0.8,
                ..GtaOptions::task_arithmetic()
            },
            w,
        ),
        ("ties_d0.2", GtaOptions::ties(), d),
        ("dare_ties_d0.2", GtaOptions::dare_ties(42, 0), d),
    ] {
        g.bench_function(name, |b| {
            let t = T::tensors();
            let views: Vec<&[T]> = t[1..].iter().map(|x| &x[..]).collect();
            let base = &t[0][..];
            let mut out = vec![T::from_f32(1.0); n];
            let plan = Gta::new(n, &params, &opts).unwrap();
            let mut scratch = vec![1u32; plan.scratch_len()];
            b.iter(|| {
                merge(
                    black_box(&views),
                    black_box(base),
                    &params,
                    &opts,
                    &mut scratch,
                    &mut out,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}

fn merge_benches(c: &mut Criterion) {
    medley_benches::simd_level_from_env();
    run::<f32>(c);
    run::<bf16>(c);
}

criterion_group!(benches, merge_benches);
