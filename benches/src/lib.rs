//! Shared helpers for medley's criterion benchmarks: deterministic inputs and
//! the memcpy ceiling every memory-bound benchmark is measured against.

pub mod experts;
pub mod filter;

use criterion::{BenchmarkGroup, Throughput, measurement::WallTime};
pub use filter::{Filter, filter};
use std::hint::black_box;

/// Deterministic pseudo-random `f32` values in `[-scale, scale)`
/// (SplitMix64), so runs compare like with like.
pub fn random_f32(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// Adds a `memcpy` of `bytes` bytes to `group` under the id `memcpy`,
/// with throughput reported as `elements` (so it reads in the same unit as
/// the benchmarks beside it). This is the ceiling of a one-pass kernel.
pub fn memcpy_ceiling(group: &mut BenchmarkGroup<'_, WallTime>, bytes: usize, elements: u64) {
    let src = vec![1u8; bytes];
    let mut dst = vec![0u8; bytes];
    group.throughput(Throughput::Elements(elements));
    group.bench_function("memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&mut dst);
        })
    });
}

/// Caps the core's SIMD level from `MEDLEY_SIMD` (`portable`, `avx2`,
/// `avx512`; unset or anything else: detected), so one binary measures the
/// default build's dispatch at each level.
pub fn simd_level_from_env() {
    use medley_core::simd::{Level, force};
    let level = match std::env::var("MEDLEY_SIMD").as_deref() {
        Ok("portable") => Some(Level::Portable),
        Ok("avx2") => Some(Level::Avx2),
        Ok("avx512") => Some(Level::Avx512),
        _ => None,
    };
    force(level);
}

/// Criterion's time for `iters` calls recorded in `graph` (which holds
/// [`Graph::calls`] of them, back to back): replays the graph
/// `ceil(iters / calls)` times between two events on the Gpu's graph stream and
/// scales the elapsed time to `iters` calls. This is how SGLang and
/// Triton's `do_bench_cudagraph` time short kernels: launch overhead is
/// paid once per replay, not once per call.
///
/// # Safety
/// Every buffer the graph's calls name must be alive.
///
/// [`Graph::calls`]: medley_cuda::graph::Graph::calls
pub unsafe fn time_graph(
    gpu: &medley_cuda::owned::Gpu,
    graph: &medley_cuda::graph::Graph,
    iters: u64,
) -> std::time::Duration {
    use medley_cuda::driver::Event;
    let per = graph.calls().max(1) as u64;
    let replays = iters.div_ceil(per).max(1);
    let (start, end) = (Event::new().expect("event"), Event::new().expect("event"));
    // SAFETY: the Gpu's own stream is live.
    unsafe { start.record(gpu.graph_stream().raw()) }.expect("record");
    for _ in 0..replays {
        // SAFETY: the caller keeps every buffer the graph's calls name
        // alive (this function's contract).
        unsafe { graph.launch(gpu.graph_stream()) }.expect("graph launch");
    }
    // SAFETY: as above.
    unsafe { end.record(gpu.graph_stream().raw()) }.expect("record");
    end.synchronize().expect("sync");
    let ms = end.elapsed_ms(&start).expect("elapsed") as f64;
    std::time::Duration::from_secs_f64(ms / 1e3 * iters as f64 / (replays * per) as f64)
}
