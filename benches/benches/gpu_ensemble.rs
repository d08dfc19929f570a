//! Fused ensemble softmax on the GPU (`medley_cuda::ensemble::combine`),
//! timed with CUDA events on the stream over back-to-back launches. Inputs
//! rotate through at least 120 MB of copies so L2 (50 MB on the H100) never
//! holds them. Throughput is the effective bandwidth: bytes read (every
//! model's logits) plus bytes written (one f32 log-probability row), per
//! second. Without a GPU the group prints why it was skipped.
//!
//! For M 2/8 and B 1/64/256 each mode also runs with every applicable
//! per-row uncertainty output requested (`linear+unc`: entropy, top-1,
//! margin, disagreement; `loglinear+unc`: the first three), next to the
//! plain call, so their cost reads off the same table (same bytes counted:
//! the per-row outputs are a few bytes).

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use medley_benches::random_f32;
use medley_core::bf16;
use medley_core::sample::Sampling;
use medley_cuda::Launch;
use medley_cuda::driver::{CaptureMode, Event};
use medley_cuda::ensemble::{
    Combine, DeviceConfig, DeviceLogits, DeviceModel, DeviceOutput, Sample, Version, workspace_bytes,
};
use medley_cuda::graph::Graph;
use medley_cuda::mem::{DeviceRows, DeviceRowsMut};
use medley_cuda::owned::{Buffer, Gpu};
use std::time::Duration;

/// Bytes the rotating input sets span at least.
const ROTATE_BYTES: usize = 120 << 20;

/// [`ROTATE_BYTES`], or `MEDLEY_BENCH_ROTATE_BYTES` when set (0: one input
/// set, warm in L2 after the first launch; for telling cold-cache costs from
/// kernel work).
fn rotate_bytes() -> usize {
    std::env::var("MEDLEY_BENCH_ROTATE_BYTES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROTATE_BYTES)
}

/// Whether shape (m, b) also runs with the uncertainty outputs.
fn with_unc(m: usize, b: usize) -> &'static [bool] {
    if [2, 8].contains(&m) && [1, 64, 256].contains(&b) {
        &[false, true]
    } else {
        &[false]
    }
}

/// The kernel versions shape (m, b) runs: (name, version, replayed from a
/// CUDA graph). Decode shapes (B = 1, 8) also run `v2_graph`: the default
/// kernel replayed from a graph holding [`GRAPH_CALLS`] calls (call i
/// reads input set i % sets), as short kernels are timed in SGLang.
fn versions(b: usize) -> &'static [(&'static str, Version, bool)] {
    match b {
        1 => &[
            ("v2", Version::Auto, false),
            ("v1", Version::V1, false),
            ("v2_graph", Version::Auto, true),
        ],
        8 => &[("v2", Version::Auto, false), ("v2_graph", Version::Auto, true)],
        256 => &[("v2", Version::Auto, false), ("v1", Version::V1, false)],
        _ => &[("v2", Version::Auto, false)],
    }
}

/// Calls recorded in one graph of the `v2_graph` variant.
const GRAPH_CALLS: usize = 256;

/// The benchmark id of one combination call.
fn ensemble_id(m: usize, b: usize, v: usize, mode: &str, unc: bool, name: &str) -> String {
    format!(
        "cuda/ensemble/M{m}_B{b}_V{v}/{mode}{}/{name}",
        if unc { "+unc" } else { "" }
    )
}

fn ensemble(c: &mut Criterion) {
    // Only the shapes the command line's filter selects get inputs (building
    // the rotating inputs of every shape took most of a filtered run).
    let shapes: Vec<(usize, usize, usize)> = [32_000usize, 128_256]
        .iter()
        .flat_map(|&v| {
            [1usize, 8, 64, 256]
                .into_iter()
                .flat_map(move |b| [2usize, 4, 8].into_iter().map(move |m| (m, b, v)))
        })
        .filter(|&(m, b, v)| {
            medley_benches::filter().any(["linear", "loglinear"].iter().flat_map(|mode| {
                with_unc(m, b).iter().flat_map(move |&unc| {
                    versions(b)
                        .iter()
                        .map(move |&(name, _, _)| ensemble_id(m, b, v, mode, unc, name))
                })
            }))
        })
        .collect();
    if shapes.is_empty() {
        return;
    }
    let Some(gpu) = Gpu::open_or_skip("cuda/ensemble benchmarks") else {
        return;
    };
    let host = random_f32(11, 8 * 256 * 128_256, 8.0);
    for (m, b, v) in shapes {
        let set = m * b * v; // elements per input set (all models)
        let sets = rotate_bytes().div_ceil(set * 2).clamp(1, 4096);
        let data: Vec<bf16> = (0..sets * set)
            .map(|i| bf16::from_f32(host[i % host.len()]))
            .collect();
        let input = Buffer::from_slice(&data).expect("inputs");
        let out = Buffer::zeroed(b * v * 4).expect("outputs");
        let unc_out: [Buffer; 4] = [(); 4].map(|_| Buffer::zeroed(b * 4).expect("uncertainty outputs"));
        let with_unc = with_unc(m, b);
        let ws_len = workspace_bytes(gpu.kernels(), b, v, m, 2).expect("workspace size");
        let ws = Buffer::zeroed(ws_len).expect("workspace");
        let bytes = (set * 2 + b * v * 4) as u64;
        let mut group = c.benchmark_group(format!("cuda/ensemble/M{m}_B{b}_V{v}"));
        group
            .sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(400))
            .throughput(Throughput::BytesDecimal(bytes));
        let weights: Vec<f32> = (0..m).map(|i| 1.0 + i as f32).collect();
        let coefs: Vec<f32> = (0..m).map(|i| if i == m - 1 { -0.5 } else { 1.0 }).collect();
        let versions = versions(b);
        let configs = [
            ("linear", DeviceConfig::linear(&weights)),
            ("loglinear", DeviceConfig::log_linear(&coefs)),
        ];
        for (mode, cfg, unc) in configs
            .iter()
            .flat_map(|(mode, cfg)| with_unc.iter().map(move |&unc| (*mode, cfg, unc)))
        {
            let base_mode = mode;
            let mode = if unc {
                format!("{mode}+unc")
            } else {
                mode.to_string()
            };
            let linear = cfg.mode == medley_core::ensemble::Mode::Linear;
            // Call i of a run reads input set i % sets.
            let call = |i: usize, version: Version, st: medley_cuda::Stream<'_>| {
                let s = (i % sets) * set;
                let models: Vec<DeviceModel<'_>> = (0..m)
                    .map(|k| {
                        let off = (s + k * b * v) * 2;
                        // SAFETY: [off, off + b*v*2) lies inside `input`, which outlives the launch.
                        let slice = unsafe {
                            medley_cuda::mem::DeviceSlice::from_raw(input.as_raw() + off as u64, b * v)
                        };
                        DeviceModel {
                            logits: DeviceLogits::BF16(DeviceRows::dense(slice, b, v).unwrap()),
                            temperature: 1.0,
                        }
                    })
                    .collect();
                let o = DeviceOutput {
                    log_probs: Some(DeviceRowsMut::dense(out.view_mut::<f32>(b * v), b, v).unwrap()),
                    entropy: unc.then(|| unc_out[0].view_mut(b)),
                    top1_prob: unc.then(|| unc_out[1].view_mut(b)),
                    margin: unc.then(|| unc_out[2].view_mut(b)),
                    disagreement: (unc && linear).then(|| unc_out[3].view_mut(b)),
                    ..Default::default()
                };
                let w = (version != Version::V1).then(|| ws.view_mut::<u8>(ws.len()));
                let mut c = Combine::new(&models, cfg, o).with_version(version);
                c.workspace = w;
                c.launch(gpu.kernels(), st)
            };
            for &(name, version, graph) in versions {
                if graph && unc {
                    continue;
                }
                // The filter above selected shapes by these ids.
                let id = ensemble_id(m, b, v, base_mode, unc, name);
                assert_eq!(id, format!("cuda/ensemble/M{m}_B{b}_V{v}/{mode}/{name}"));
                if !medley_benches::filter().matches(&id) {
                    continue;
                }
                if graph {
                    let n = GRAPH_CALLS;
                    let graph =
                        Graph::capture_counted(gpu.graph_stream(), CaptureMode::ThreadLocal, n, |st| {
                            (0..n).try_for_each(|i| call(i, version, st))
                        })
                        .expect("capture");
                    group.bench_function(BenchmarkId::new(&mode, name), |bch| {
                        // SAFETY: `input`, `out` and `ws` outlive `graph`.
                        bch.iter_custom(|iters| unsafe { medley_benches::time_graph(&gpu, &graph, iters) })
                    });
                    continue;
                }
                group.bench_function(BenchmarkId::new(&mode, name), |bch| {
                    bch.iter_custom(|iters| {
                        let start = Event::new().expect("event");
                        let end = Event::new().expect("event");
                        // SAFETY: the stream is the Gpu's own, live here.
                        unsafe { start.record(gpu.stream().raw()) }.expect("record");
                        for i in 0..iters as usize {
                            call(i, version, gpu.stream()).expect("launch");
                        }
                        // SAFETY: as above.
                        unsafe { end.record(gpu.stream().raw()) }.expect("record");
                        end.synchronize().expect("sync");
                        let ms = end.elapsed_ms(&start).expect("elapsed");
                        Duration::from_secs_f64(ms as f64 / 1e3)
                    })
                });
            }
        }
        group.finish();
    }
}

/// Sampling fused with the combination (`medley_cuda::ensemble::Sample`):
/// the next token per row, greedy / temperature / top-k / top-p, beside the
/// plain combination writing its f32 rows, on the same rotating inputs.
/// Throughput counts only the bytes of the inputs (the floor of any
/// sampler is reading them once).
/// The sampling group's function names (its ids: group/mode/name).
const SAMPLERS: [&str; 7] = [
    "greedy",
    "temperature",
    "temperature_v1",
    "min_p0.1",
    "top_k50",
    "top_p0.9",
    "combine_rows",
];

fn sampling(c: &mut Criterion) {
    // Inputs only for the groups the command line's filter selects.
    let selected = |m: usize, b: usize, v: usize| {
        medley_benches::filter().any(["linear", "loglinear"].iter().flat_map(|mode| {
            SAMPLERS
                .iter()
                .map(move |name| format!("cuda/sample/M{m}_B{b}_V{v}/{mode}/{name}"))
        }))
    };
    let any = [32_000usize, 128_256].iter().any(|&v| {
        [1usize, 64, 256]
            .iter()
            .any(|&b| [2usize, 8].iter().any(|&m| selected(m, b, v)))
    });
    if !any {
        return;
    }
    let Some(gpu) = Gpu::open_or_skip("cuda/sample benchmarks") else {
        return;
    };
    let host = random_f32(12, 8 * 256 * 128_256, 8.0);
    for v in [32_000usize, 128_256] {
        for b in [1usize, 64, 256] {
            for m in [2usize, 8] {
                if !selected(m, b, v) {
                    continue;
                }
                let set = m * b * v;
                let sets = rotate_bytes().div_ceil(set * 2).clamp(1, 4096);
                let data: Vec<bf16> = (0..sets * set)
                    .map(|i| bf16::from_f32(host[i % host.len()]))
                    .collect();
                let input = Buffer::from_slice(&data).expect("inputs");
                let out = Buffer::zeroed(b * v * 4).expect("outputs");
                let tokens = Buffer::zeroed(b * 4).expect("tokens");
                let ws_len = workspace_bytes(gpu.kernels(), b, v, m, 2).expect("workspace size");
                let ws = Buffer::zeroed(ws_len).expect("workspace");
                let mut group = c.benchmark_group(format!("cuda/sample/M{m}_B{b}_V{v}"));
                group
                    .sample_size(10)
                    .warm_up_time(Duration::from_millis(100))
                    .measurement_time(Duration::from_millis(400))
                    .throughput(Throughput::BytesDecimal((set * 2) as u64));
                let weights: Vec<f32> = (0..m).map(|i| 1.0 + i as f32).collect();
                let coefs: Vec<f32> = (0..m).map(|i| if i == m - 1 { -0.5 } else { 1.0 }).collect();
                let configs = [
                    ("linear", DeviceConfig::linear(&weights)),
                    ("loglinear", DeviceConfig::log_linear(&coefs)),
                ];
                let greedy = Sampling::greedy();
                let temp = Sampling::new(0.8, 7);
                let mut topk = Sampling::new(0.8, 7);
                topk.top_k = 50;
                let mut topp = Sampling::new(0.8, 7);
                topp.top_p = 0.9;
                let mut minp = Sampling::new(0.8, 7);
                minp.min_p = 0.1;
                // (name, sampling, forced kernel): every sampler runs
                // ensemble_v2s (with the workspace); temperature_v1 is
                // ensemble_sample on the temperature call, side by side.
                let samplers = [
                    ("greedy", Some(&greedy), Version::Auto),
                    ("temperature", Some(&temp), Version::Auto),
                    ("temperature_v1", Some(&temp), Version::V1),
                    ("min_p0.1", Some(&minp), Version::Auto),
                    ("top_k50", Some(&topk), Version::Auto),
                    ("top_p0.9", Some(&topp), Version::Auto),
                    ("combine_rows", None, Version::Auto),
                ];
                assert!(samplers.iter().map(|s| s.0).eq(SAMPLERS));
                for (mode, cfg) in &configs {
                    for (name, sp, version) in samplers {
                        group.bench_function(BenchmarkId::new(*mode, name), |bch| {
                            bch.iter_custom(|iters| {
                                let start = Event::new().expect("event");
                                let end = Event::new().expect("event");
                                // SAFETY: the stream is the Gpu's own, live here.
                                unsafe { start.record(gpu.stream().raw()) }.expect("record");
                                for i in 0..iters as usize {
                                    let s = (i % sets) * set;
                                    let models: Vec<DeviceModel<'_>> = (0..m)
                                        .map(|k| {
                                            let off = (s + k * b * v) * 2;
                                            // SAFETY: [off, off + b*v*2) lies inside `input`, which outlives the launch.
                                            let slice = unsafe {
                                                medley_cuda::mem::DeviceSlice::from_raw(
                                                    input.as_raw() + off as u64,
                                                    b * v,
                                                )
                                            };
                                            DeviceModel {
                                                logits: DeviceLogits::BF16(
                                                    DeviceRows::dense(slice, b, v).unwrap(),
                                                ),
                                                temperature: 1.0,
                                            }
                                        })
                                        .collect();
                                    match sp {
                                        Some(sp) => Sample::new(&models, cfg, sp, v, tokens.view_mut(b))
                                            .with_workspace(ws.view_mut::<u8>(ws.len()))
                                            .with_version(version)
                                            .launch(gpu.kernels(), gpu.stream())
                                            .expect("launch"),
                                        None => {
                                            let o = DeviceOutput {
                                                log_probs: Some(
                                                    DeviceRowsMut::dense(out.view_mut::<f32>(b * v), b, v)
                                                        .unwrap(),
                                                ),
                                                argmax: Some(tokens.view_mut(b)),
                                                ..Default::default()
                                            };
                                            let mut call = Combine::new(&models, cfg, o);
                                            call.workspace = Some(ws.view_mut::<u8>(ws.len()));
                                            call.launch(gpu.kernels(), gpu.stream()).expect("launch");
                                        }
                                    }
                                }
                                // SAFETY: as above.
                                unsafe { end.record(gpu.stream().raw()) }.expect("record");
                                end.synchronize().expect("sync");
                                let ms = end.elapsed_ms(&start).expect("elapsed");
                                Duration::from_secs_f64(ms as f64 / 1e3)
                            })
                        });
                    }
                }
                group.finish();
            }
        }
    }
}

criterion_group!(benches, ensemble, sampling);
