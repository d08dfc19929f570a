//! MoE gating on the GPU (`medley_cuda::gating::gate`), timed with CUDA
//! events over back-to-back launches, inputs rotating through at least
//! 120 MB. Throughput is the effective bandwidth: router logits read (bf16)
//! plus ids and weights written. Shapes of the PyTorch baselines (E, k) =
//! (8, 2), (64, 6), (128, 8), (256, 8) for T in {1, 64, 1024, 16384}, plus
//! DeepSeek-V3 grouped routing at E = 256. `bf16` runs the default kernel
//! (`GateKernel::Auto`: `gate_topk_v2` / `gate_grouped_v2` at these sizes
//! until the v3 kernels have run on a GPU),
//! `bf16_v1` the reference `gate_topk`, `bf16_v2` `gate_topk_v2` /
//! `gate_grouped_v2`, `bf16_v3` the v3 kernel; the `_graph` variants
//! replay the same kernel from a CUDA graph that holds [`GRAPH_CALLS`]
//! calls (call i reads input set i % sets), as SGLang times its router:
//! the launch overhead is paid once per replay.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use medley_benches::random_f32;
use medley_core::bf16;
use medley_core::moe::gating::GroupedConfig;
use medley_cuda::Launch;
use medley_cuda::driver::{CaptureMode, Event};
use medley_cuda::gating::{Gate, GateKernel, Gating, RouterLogits};
use medley_cuda::graph::Graph;
use medley_cuda::mem::DeviceRows;
use medley_cuda::owned::{Buffer, Gpu};
use std::time::Duration;

const ROTATE_BYTES: usize = 120 << 20;
/// Calls recorded in one graph of the `bf16_graph` variant.
const GRAPH_CALLS: usize = 1024;

/// The ids of one gating group (selected by the command line's filter
/// before its inputs are built).
fn gating_ids(e: usize, k: usize, t: usize) -> Vec<String> {
    let mut names = vec!["topk_softmax"];
    if e == 256 {
        names.push("deepseek_v3");
    }
    names
        .into_iter()
        .flat_map(|n| {
            KERNELS
                .into_iter()
                .map(move |(p, _, _)| format!("cuda/gating/E{e}_k{k}_T{t}/{n}/{p}"))
        })
        .collect()
}

/// The variants: id, kernel, replayed from a graph.
const KERNELS: [(&str, GateKernel, bool); 7] = [
    ("bf16", GateKernel::Auto, false),
    ("bf16_v1", GateKernel::V1, false),
    ("bf16_v2", GateKernel::V2, false),
    ("bf16_v3", GateKernel::V3, false),
    ("bf16_graph", GateKernel::Auto, true),
    ("bf16_v2_graph", GateKernel::V2, true),
    ("bf16_v3_graph", GateKernel::V3, true),
];

const SHAPES: [(usize, usize); 4] = [(8, 2), (64, 6), (128, 8), (256, 8)];
const TOKENS: [usize; 4] = [1, 64, 1024, 16384];

fn gating(c: &mut Criterion) {
    let selected = |e: usize, k: usize, t: usize| medley_benches::filter().any(gating_ids(e, k, t));
    if !SHAPES
        .iter()
        .any(|&(e, k)| TOKENS.iter().any(|&t| selected(e, k, t)))
    {
        return;
    }
    let Some(gpu) = Gpu::open_or_skip("cuda/gating benchmarks") else {
        return;
    };
    let host = random_f32(5, 1 << 22, 4.0);
    let bias_h = vec![0.0f32; 256];
    let bias = Buffer::from_slice(&bias_h).expect("bias");
    for (e, k) in SHAPES {
        for t in TOKENS {
            if !selected(e, k, t) {
                continue;
            }
            let set = t * e;
            let sets = ROTATE_BYTES.div_ceil(set * 2).clamp(1, 4096);
            let data: Vec<bf16> = (0..sets * set)
                .map(|i| bf16::from_f32(host[i % host.len()]))
                .collect();
            let input = Buffer::from_slice(&data).expect("inputs");
            let ids = Buffer::zeroed(t * k * 4).expect("ids");
            let w = Buffer::zeroed(t * k * 4).expect("weights");
            let mut group = c.benchmark_group(format!("cuda/gating/E{e}_k{k}_T{t}"));
            group
                .sample_size(10)
                .warm_up_time(Duration::from_millis(100))
                .measurement_time(Duration::from_millis(300))
                .throughput(Throughput::BytesDecimal((set * 2 + t * k * 8) as u64));
            let mut variants = vec![("topk_softmax", Gating::TopkSoftmax { renormalize: true })];
            if e == 256 {
                variants.push((
                    "deepseek_v3",
                    Gating::Grouped {
                        config: GroupedConfig::deepseek_v3(&bias_h),
                        bias: Some(bias.view(256)),
                    },
                ));
            }
            // Call i of a run reads input set i % sets.
            let call = |i: usize, g: &Gating<'_>, kernel: GateKernel, s: medley_cuda::Stream<'_>| {
                let off = (i % sets) * set * 2;
                // SAFETY: [off, off + set * 2) lies inside `input`.
                let slice =
                    unsafe { medley_cuda::mem::DeviceSlice::from_raw(input.as_raw() + off as u64, set) };
                let logits = RouterLogits::BF16(DeviceRows::dense(slice, t, e).unwrap());
                Gate::new(logits, k, g, ids.view_mut(t * k), w.view_mut(t * k))
                    .with_kernel(kernel)
                    .launch(gpu.kernels(), s)
            };
            for ((name, g), (param, kernel, graph)) in
                variants.iter().flat_map(|v| KERNELS.iter().map(move |k| (v, k)))
            {
                assert!(gating_ids(e, k, t).contains(&format!("cuda/gating/E{e}_k{k}_T{t}/{name}/{param}")));
                if !medley_benches::filter().matches(&format!("cuda/gating/E{e}_k{k}_T{t}/{name}/{param}")) {
                    continue;
                }
                if *graph {
                    let n = GRAPH_CALLS;
                    let graph =
                        Graph::capture_counted(gpu.graph_stream(), CaptureMode::ThreadLocal, n, |s| {
                            (0..n).try_for_each(|i| call(i, g, *kernel, s))
                        })
                        .expect("capture");
                    group.bench_function(BenchmarkId::new(*name, param), |bch| {
                        // SAFETY: `input`, `ids` and `w` outlive `graph`.
                        bch.iter_custom(|iters| unsafe { medley_benches::time_graph(&gpu, &graph, iters) })
                    });
                    continue;
                }
                group.bench_function(BenchmarkId::new(*name, param), |bch| {
                    bch.iter_custom(|iters| {
                        let (start, end) = (Event::new().unwrap(), Event::new().unwrap());
                        // SAFETY: the Gpu's own stream is live.
                        unsafe { start.record(gpu.stream().raw()) }.unwrap();
                        for i in 0..iters as usize {
                            call(i, g, *kernel, gpu.stream()).expect("launch");
                        }
                        // SAFETY: as above.
                        unsafe { end.record(gpu.stream().raw()) }.unwrap();
                        end.synchronize().unwrap();
                        Duration::from_secs_f64(end.elapsed_ms(&start).unwrap() as f64 / 1e3)
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, gating);
