//! CUDA-graph capture and replay of medley calls (`medley_cuda::graph`).
//!
//! One "decode step" of an engine is recorded into one graph on the Gpu's
//! non-blocking `graph_stream` (`CaptureMode::ThreadLocal`: any call of
//! this thread the driver deems unsafe during capture, an allocation or a
//! synchronous copy, fails the capture; `Global` would also fail the other
//! test threads' allocations): top-k gating, grouped
//! (DeepSeek-V3) gating, alignment and the bf16 expert layer, the split-row
//! ensemble in both modes (with its workspace) and the fused sampler. The
//! test checks that
//! - capturing runs nothing (the poisoned outputs stay poisoned);
//! - a replay writes exactly what direct launches of the same calls wrote;
//! - a replay reads the buffers' current contents: after new inputs are
//!   uploaded into the same buffers, replays equal direct launches on the
//!   new inputs (and differ from the first results);
//! - a call that fails validation inside `record` ends the capture: the
//!   error is the call's, and the stream launches normally afterwards.
//!
//! Without a GPU the tests print why they skipped (an error under
//! `MEDLEY_REQUIRE_GPU=1`).

use medley_core::bf16;
use medley_core::moe::ExpertRange;
use medley_core::moe::gating::{GroupedConfig, topk_softmax};
use medley_core::moe::plan::block_padded_len;
use medley_core::sample::Sampling;
use medley_cuda::driver::CaptureMode;
use medley_cuda::ensemble::{
    Combine, DeviceConfig, DeviceLogits, DeviceModel, DeviceOutput, Sample, workspace_bytes,
};
use medley_cuda::experts::{DeviceActMut, DevicePlan, GemmDtype, Layer, LayerChoice, LayerScratch, Tuning};
use medley_cuda::gating::{Gate, Gating};
use medley_cuda::graph::Graph;
use medley_cuda::mem::{DeviceMatrix, DeviceRows, DeviceRowsMut};
use medley_cuda::owned::{Buffer, Gpu};
use medley_cuda::routing::{Align, AlignOutput, DeviceMatrixMut};
use medley_cuda::{CudaError, Launch, Stream};

/// Router tokens (odd: a partial last block).
const T: usize = 77;
/// Experts of the top-k router and of the layer.
const E: usize = 8;
/// Experts of the grouped router.
const EG: usize = 256;
/// Experts per token.
const K: usize = 2;
/// Experts per token of the grouped router.
const KG: usize = 8;
/// Layer sizes.
const H: usize = 256;
const I: usize = 128;
/// Ensemble models, rows and vocabulary (several blocks per row in v2).
const M: usize = 3;
const B: usize = 5;
const V: usize = 50_000;

#[path = "../../core/tests/common/mod.rs"]
mod common;
use common::Gen as Rng;

/// `n` bf16 values uniform in `[-scale, scale)`.
fn bf16s(r: &mut Rng, n: usize, scale: f32) -> Vec<bf16> {
    (0..n)
        .map(|_| bf16::from_f32(r.range(-scale as f64, scale as f64) as f32))
        .collect()
}

/// The inputs of one step (uploaded into the same buffers for each set).
struct Inputs {
    router: Vec<bf16>,
    router_g: Vec<bf16>,
    x: Vec<bf16>,
    logits: Vec<bf16>,
}

impl Inputs {
    fn new(seed: u64) -> Inputs {
        let mut r = Rng(seed);
        Inputs {
            router: bf16s(&mut r, T * E, 4.0),
            router_g: bf16s(&mut r, T * EG, 4.0),
            x: bf16s(&mut r, T * H, 2.0),
            logits: bf16s(&mut r, M * B * V, 8.0),
        }
    }
}

/// Every buffer of the step.
struct Step {
    router: Buffer,
    router_g: Buffer,
    bias: Buffer,
    ids: Buffer,
    wt: Buffer,
    ids_g: Buffer,
    wt_g: Buffer,
    sorted: Buffer,
    blocks: Buffer,
    inv: Buffer,
    total: Buffer,
    x: Buffer,
    w13: Buffer,
    w2: Buffer,
    xp: Buffer,
    act: Buffer,
    y: Buffer,
    out: Buffer,
    logits: Buffer,
    lp_lin: Buffer,
    lp_log: Buffer,
    tokens: Buffer,
    tok_lp: Buffer,
    ws: [Buffer; 3],
    len: usize,
    nblocks: usize,
    choice: LayerChoice,
    ws_len: usize,
}

/// Output buffers and their sizes in bytes, for poisoning and reading back.
fn outputs(s: &Step) -> [(&Buffer, usize); 11] {
    [
        (&s.ids, T * K * 4),
        (&s.wt, T * K * 4),
        (&s.ids_g, T * KG * 4),
        (&s.wt_g, T * KG * 4),
        (&s.sorted, s.len * 4),
        (&s.out, T * H * 4),
        (&s.lp_lin, B * V * 4),
        (&s.lp_log, B * V * 4),
        (&s.tokens, B * 4),
        (&s.tok_lp, B * 4),
        (&s.total, 4),
    ]
}

const BIAS: [f32; EG] = {
    let mut b = [0.0f32; EG];
    let mut i = 0;
    while i < EG {
        b[i] = (i % 7) as f32 * 0.01;
        i += 1;
    }
    b
};

impl Step {
    fn new(gpu: &Gpu, inp: &Inputs) -> Step {
        let k = gpu.kernels();
        let n = T * K;
        let choice = LayerChoice::pick(&Tuning::builtin(), k, GemmDtype::BF16, n, E, None)
            .expect("a bf16 expert GEMM configuration for this device");
        let (len, nblocks) = block_padded_len(n, E, choice.block_m).unwrap();
        let mut r = Rng(0x6A_0F);
        let w13 = bf16s(&mut r, E * 2 * I * H, 2.0 / (H as f32).sqrt());
        let w2 = bf16s(&mut r, E * H * I, 2.0 / (I as f32).sqrt());
        let ws_len = workspace_bytes(k, B, V, M, 2).unwrap();
        assert!(ws_len > 0, "the split-row ensemble kernel applies at B={B} V={V}");
        let z = |n: usize| Buffer::zeroed(n).unwrap();
        Step {
            router: Buffer::from_slice(&inp.router).unwrap(),
            router_g: Buffer::from_slice(&inp.router_g).unwrap(),
            bias: Buffer::from_slice(&BIAS).unwrap(),
            ids: z(n * 4),
            wt: z(n * 4),
            ids_g: z(T * KG * 4),
            wt_g: z(T * KG * 4),
            sorted: z(len * 4),
            blocks: z(nblocks * 4),
            inv: z(n * 4),
            total: z(4),
            x: Buffer::from_slice(&inp.x).unwrap(),
            w13: Buffer::from_slice(&w13).unwrap(),
            w2: Buffer::from_slice(&w2).unwrap(),
            xp: z(len * H * 2),
            act: z(len * I * 2),
            y: z(len * H * 4),
            out: z(T * H * 4),
            logits: Buffer::from_slice(&inp.logits).unwrap(),
            lp_lin: z(B * V * 4),
            lp_log: z(B * V * 4),
            tokens: z(B * 4),
            tok_lp: z(B * 4),
            ws: [z(ws_len), z(ws_len), z(ws_len)],
            len,
            nblocks,
            choice,
            ws_len,
        }
    }

    fn upload(&mut self, inp: &Inputs) {
        self.router.upload(&inp.router).unwrap();
        self.router_g.upload(&inp.router_g).unwrap();
        self.x.upload(&inp.x).unwrap();
        self.logits.upload(&inp.logits).unwrap();
    }

    /// Enqueues the whole step on `stream`.
    fn record(&self, gpu: &Gpu, stream: Stream<'_>) -> Result<(), CudaError> {
        let k = gpu.kernels();
        let n = T * K;
        let topk = Gating::TopkSoftmax { renormalize: true };
        Gate::new(
            DeviceMatrix::BF16(DeviceRows::dense(self.router.view(T * E), T, E)?),
            K,
            &topk,
            self.ids.view_mut(n),
            self.wt.view_mut(n),
        )
        .launch(k, stream)?;
        let grouped = Gating::Grouped {
            config: GroupedConfig::deepseek_v3(&BIAS),
            bias: Some(self.bias.view(EG)),
        };
        Gate::new(
            DeviceMatrix::BF16(DeviceRows::dense(self.router_g.view(T * EG), T, EG)?),
            KG,
            &grouped,
            self.ids_g.view_mut(T * KG),
            self.wt_g.view_mut(T * KG),
        )
        .launch(k, stream)?;
        Align::new(
            self.ids.view(n),
            E,
            ExpertRange::all(E),
            self.choice.block_m,
            AlignOutput {
                sorted_ids: self.sorted.view_mut(self.len),
                block_experts: self.blocks.view_mut(self.nblocks),
                total: self.total.view_mut(1),
                offsets: None,
                inverse: Some(self.inv.view_mut(n)),
            },
        )
        .launch(k, stream)?;
        let plan = DevicePlan {
            sorted_ids: self.sorted.view(self.len),
            block_experts: self.blocks.view(self.nblocks),
            total: self.total.view(1),
            block_m: self.choice.block_m,
            slots: n,
            k: K,
        };
        let len = self.len;
        let scratch = LayerScratch {
            xp: DeviceMatrixMut::BF16(DeviceRowsMut::dense(self.xp.view_mut::<bf16>(len * H), len, H)?),
            act: DeviceActMut::BF16(DeviceRowsMut::dense(self.act.view_mut::<bf16>(len * I), len, I)?),
            y: DeviceRowsMut::dense(self.y.view_mut(len * H), len, H)?,
        };
        Layer::new(
            &self.choice,
            DeviceMatrix::BF16(DeviceRows::dense(self.x.view::<bf16>(T * H), T, H)?),
            &plan,
            self.inv.view(n),
            self.wt.view(n),
            DeviceMatrix::BF16(DeviceRows::dense(
                self.w13.view::<bf16>(E * 2 * I * H),
                E * 2 * I,
                H,
            )?),
            DeviceMatrix::BF16(DeviceRows::dense(self.w2.view::<bf16>(E * H * I), E * H, I)?),
            scratch,
            DeviceRowsMut::dense(self.out.view_mut(T * H), T, H)?,
        )
        .launch(k, stream)?;
        let models: Vec<DeviceModel<'_>> = (0..M)
            .map(|m| {
                // SAFETY: model m's rows lie inside `logits` (M * B * V
                // elements), which outlives the views.
                let s = unsafe {
                    medley_cuda::mem::DeviceSlice::from_raw(
                        self.logits.as_raw() + (m * B * V * 2) as u64,
                        B * V,
                    )
                };
                DeviceModel {
                    logits: DeviceLogits::BF16(DeviceRows::dense(s, B, V).unwrap()),
                    temperature: 1.0,
                }
            })
            .collect();
        let lin = DeviceConfig::linear(&[0.5, 0.3, 0.2]);
        let log = DeviceConfig::log_linear(&[1.0, 1.0, -0.5]);
        for (cfg, lp, ws) in [
            (&lin, &self.lp_lin, &self.ws[0]),
            (&log, &self.lp_log, &self.ws[1]),
        ] {
            let out = DeviceOutput {
                log_probs: Some(DeviceRowsMut::dense(lp.view_mut(B * V), B, V)?),
                ..Default::default()
            };
            Combine::new(&models, cfg, out)
                .with_workspace(ws.view_mut(self.ws_len))
                .launch(k, stream)?;
        }
        let mut sp = Sampling::new(0.8, 0x5EED);
        sp.top_p = 0.9;
        Sample::new(&models, &lin, &sp, V, self.tokens.view_mut(B))
            .with_log_probs(self.tok_lp.view_mut(B))
            .with_workspace(self.ws[2].view_mut(self.ws_len))
            .launch(k, stream)
    }

    fn poison(&self, gpu: &Gpu) {
        for (b, n) in outputs(self) {
            // SAFETY: [as_raw, as_raw + n) lies inside the buffer; the
            // stream is the Gpu's own.
            unsafe { medley_cuda::driver::memset_d8_async(b.as_raw(), 0xFF, n, gpu.stream().raw()) }.unwrap();
        }
        gpu.synchronize().unwrap();
    }

    /// Every output, as raw bytes.
    fn read(&self, gpu: &Gpu) -> Vec<Vec<u8>> {
        gpu.synchronize().unwrap();
        outputs(self)
            .iter()
            .map(|(b, n)| b.to_vec::<u8>(*n).unwrap())
            .collect()
    }
}

const NAMES: [&str; 11] = [
    "topk ids",
    "topk weights",
    "grouped ids",
    "grouped weights",
    "sorted ids",
    "layer out",
    "linear log-probs",
    "log-linear log-probs",
    "sampled tokens",
    "sampled log-probs",
    "align total",
];

fn assert_same(what: &str, got: &[Vec<u8>], want: &[Vec<u8>]) {
    for ((g, w), name) in got.iter().zip(want).zip(NAMES) {
        let differ = g.iter().zip(w).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "{what}: {name}: {differ} of {} bytes differ", g.len());
    }
}

#[test]
fn a_replayed_decode_step_equals_direct_launches_and_reads_the_current_inputs() {
    let Some(gpu) = Gpu::open_or_skip("graph") else {
        return;
    };
    let (a, b) = (Inputs::new(1), Inputs::new(2));
    let mut step = Step::new(&gpu, &a);

    // Direct launches on inputs A: the reference (and gating against the core).
    step.poison(&gpu);
    step.record(&gpu, gpu.stream()).unwrap();
    let want_a = step.read(&gpu);
    let (mut ids, mut wt) = (vec![0u32; T * K], vec![0f32; T * K]);
    topk_softmax(
        medley_core::Rows::dense(&a.router, T, E).unwrap(),
        K,
        true,
        &mut ids,
        &mut wt,
    )
    .unwrap();
    assert_eq!(
        want_a[0],
        bytemuck::cast_slice::<u32, u8>(&ids),
        "direct top-k ids vs the core"
    );
    assert_eq!(
        want_a[1],
        bytemuck::cast_slice::<f32, u8>(&wt),
        "direct top-k weights vs the core"
    );

    // Capturing runs nothing.
    step.poison(&gpu);
    let graph = Graph::capture_counted(gpu.graph_stream(), CaptureMode::ThreadLocal, 8, |s| {
        step.record(&gpu, s)
    })
    .expect("every call of the step is capturable");
    assert_eq!(graph.calls(), 8);
    let idle = step.read(&gpu);
    for (bytes, name) in idle.iter().zip(NAMES) {
        assert!(bytes.iter().all(|&x| x == 0xFF), "capture wrote {name}");
    }

    // A replay equals the direct launches.
    // SAFETY: every buffer of `step` outlives `graph` (dropped first below).
    unsafe { graph.launch(gpu.graph_stream()) }.unwrap();
    assert_same("replay on inputs A", &step.read(&gpu), &want_a);

    // New inputs in the same buffers: the direct reference, then two replays.
    step.upload(&b);
    step.poison(&gpu);
    step.record(&gpu, gpu.stream()).unwrap();
    let want_b = step.read(&gpu);
    for (i, name) in NAMES.iter().enumerate().take(10) {
        assert_ne!(
            want_a[i], want_b[i],
            "{name}: inputs B gave the same output as inputs A"
        );
    }
    step.poison(&gpu);
    // SAFETY: as above.
    unsafe { graph.launch(gpu.graph_stream()) }.unwrap();
    // SAFETY: as above.
    unsafe { graph.launch(gpu.graph_stream()) }.unwrap();
    assert_same("two replays on inputs B", &step.read(&gpu), &want_b);
    drop(graph);
}

#[test]
fn a_call_that_fails_inside_the_capture_ends_it_with_the_calls_error() {
    let Some(gpu) = Gpu::open_or_skip("graph") else {
        return;
    };
    let router = Buffer::from_slice(&bf16s(&mut Rng(3), T * E, 4.0)).unwrap();
    let (ids, wt) = (
        Buffer::zeroed(T * K * 4).unwrap(),
        Buffer::zeroed(T * K * 4).unwrap(),
    );
    let g = Gating::TopkSoftmax { renormalize: true };
    let logits = || DeviceMatrix::BF16(DeviceRows::dense(router.view(T * E), T, E).unwrap());
    let err = Graph::capture(gpu.graph_stream(), CaptureMode::ThreadLocal, |s| {
        Gate::new(logits(), K, &g, ids.view_mut(T * K), wt.view_mut(T * K)).launch(gpu.kernels(), s)?;
        // One id short: refused before anything is enqueued.
        Gate::new(logits(), K, &g, ids.view_mut(T * K - 1), wt.view_mut(T * K)).launch(gpu.kernels(), s)
    })
    .unwrap_err();
    assert!(
        matches!(
            err,
            CudaError::Invalid(medley_core::Error::LengthMismatch { arg: "ids", .. })
        ),
        "{err:?}"
    );
    // The stream is not capturing any more: a direct launch runs.
    Gate::new(logits(), K, &g, ids.view_mut(T * K), wt.view_mut(T * K))
        .launch(gpu.kernels(), gpu.graph_stream())
        .unwrap();
    gpu.synchronize().unwrap();
    assert!(
        ids.to_vec::<u32>(T * K)
            .unwrap()
            .iter()
            .all(|&i| (i as usize) < E)
    );
}

#[test]
fn without_a_gpu_capture_reports_the_drivers_code() {
    // Only meaningful where there is no driver or device (CI): the capture
    // fails on its first driver call with the raw code, nothing panics.
    let Err(e) = medley_cuda::probe() else {
        return;
    };
    // SAFETY: a null handle is the legacy default stream; the stub driver
    // never dereferences anything.
    let stream = unsafe { Stream::from_raw(core::ptr::null_mut()) };
    let mut called = false;
    let err = Graph::capture(stream, CaptureMode::ThreadLocal, |_| {
        called = true;
        Ok(())
    })
    .unwrap_err();
    assert!(!called, "record ran although the capture could not begin");
    match err {
        CudaError::Driver(d) => assert_eq!(d.code, e.code, "{d}"),
        other => panic!("{other:?}"),
    }
}
