//! A tour of medley's GPU layer, checked against the CPU core.
//!
//! The example opens device 0 ([`medley_cuda::owned::Gpu::open`], which
//! loads every kernel), then:
//!
//! 1. combines two models' logits (`B = 4` rows of `V = 1000`, f32) on the
//!    GPU with [`medley_cuda::ensemble::Combine`], linearly (weights
//!    0.3 / 0.7) and log-linearly (coefficients 1.0 / -0.5), and compares
//!    the log-probabilities and argmax with
//!    [`medley_core::ensemble::combine`];
//! 2. runs a bf16 mixture-of-experts layer (`T = 64` tokens, `H = 256`,
//!    `I = 128`, `E = 8` experts, `k = 2`): router logits are gated on the
//!    GPU ([`medley_cuda::gating::Gate`], top-k softmax, renormalized; bit
//!    for bit equal to [`medley_core::moe::gating::topk_softmax`]), aligned
//!    into a block-padded plan ([`medley_cuda::routing::Align`]) and sent
//!    through the expert layer ([`medley_cuda::experts::Layer`]); the f32
//!    output is compared with [`medley_core::moe::layer::moe_layer`] by
//!    relative error.
//!
//! Run it with
//!
//! ```text
//! cargo run --release -p medley-cuda --features testing --example gpu_tour
//! ```
//!
//! Without a CUDA driver or device it says so and exits with 0 (1 under
//! `MEDLEY_REQUIRE_GPU=1`). It exits with 1 if any check fails.

use medley_core::ensemble::{self as core_ensemble, Config, Logits, MaskRule, Mode, Model, Output, Weights};
use medley_core::moe::ExpertRange;
use medley_core::moe::gating::topk_softmax;
use medley_core::moe::layer::{Experts, Plan, Routing, layer_scratch_len, moe_layer};
use medley_core::moe::plan::{block_padded_len, sort_by_expert};
use medley_core::{Rows, RowsMut, bf16};
use medley_cuda::ensemble::{
    Combine, DeviceConfig, DeviceLogits, DeviceModel, DeviceOutput, workspace_bytes,
};
use medley_cuda::experts::{DeviceActMut, DevicePlan, GemmDtype, Layer, LayerChoice, LayerScratch, Tuning};
use medley_cuda::gating::{Gate, Gating};
use medley_cuda::mem::{DeviceMatrix, DeviceRows, DeviceRowsMut};
use medley_cuda::owned::{Buffer, Gpu, OpenError, gpu_required};
use medley_cuda::routing::{Align, AlignOutput, DeviceMatrixMut};
use medley_cuda::{CudaError, Launch};

/// Ensemble rows.
const B: usize = 4;
/// Ensemble vocabulary.
const V: usize = 1000;
/// MoE tokens.
const T: usize = 64;
/// MoE hidden size.
const H: usize = 256;
/// MoE intermediate size.
const I: usize = 128;
/// Experts.
const E: usize = 8;
/// Experts per token.
const K: usize = 2;

/// Tolerance on log-probabilities (f32 logits).
const ENSEMBLE_TOL: f64 = 1e-4;
/// Relative error tolerance of the bf16 layer (the intermediate activation
/// is rounded to bf16 on the GPU, kept in f32 on the CPU; as in
/// `cuda/tests/experts.rs`).
const MOE_TOL: f64 = 1.5e-2;

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[lo, hi)`.
    fn range(&mut self, lo: f32, hi: f32) -> f32 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        (lo as f64 + (hi - lo) as f64 * u) as f32
    }
}

/// One check's outcome.
struct Check {
    name: String,
    detail: String,
    pass: bool,
}

/// Every fallible step reports a message instead of panicking.
type Res<T> = Result<T, String>;

fn dev(e: CudaError) -> String {
    format!("{e:?}")
}

fn main() {
    let gpu = match Gpu::open() {
        Ok(g) => g,
        Err(OpenError::NoGpu(e)) => {
            if gpu_required() {
                eprintln!(
                    "gpu_tour: MEDLEY_REQUIRE_GPU=1 but there is no usable CUDA driver or device ({e})"
                );
                std::process::exit(1);
            }
            println!("gpu_tour: no usable CUDA driver or device ({e}); nothing to show, exiting.");
            println!(
                "gpu_tour: run it on a machine with an NVIDIA GPU (MEDLEY_REQUIRE_GPU=1 makes this an error)."
            );
            return;
        }
        Err(OpenError::Failed(why)) => {
            eprintln!("gpu_tour: opening the GPU failed: {why}");
            std::process::exit(1);
        }
    };
    let k = gpu.kernels();
    let (major, minor) = k.compute_capability();
    println!(
        "gpu_tour: device compute capability {major}.{minor}, {} SMs; kernels loaded in {:.1} ms",
        k.sm_count(),
        gpu.load_ms()
    );

    let mut checks = Vec::new();
    ensemble_part(&gpu, &mut checks);
    moe_part(&gpu, &mut checks);

    println!();
    let mut failed = 0;
    for c in &checks {
        println!(
            "  [{}] {}: {}",
            if c.pass { "PASS" } else { "FAIL" },
            c.name,
            c.detail
        );
        failed += usize::from(!c.pass);
    }
    if failed > 0 {
        println!("gpu_tour: {failed} of {} checks FAILED", checks.len());
        std::process::exit(1);
    }
    println!("gpu_tour: all {} checks PASS", checks.len());
}

// ---------------------------------------------------------------------------
// Part 1: ensemble.

fn ensemble_part(gpu: &Gpu, checks: &mut Vec<Check>) {
    let mut rng = Rng(0x70_0A);
    let a: Vec<f32> = (0..B * V).map(|_| rng.range(-8.0, 8.0)).collect();
    let b: Vec<f32> = (0..B * V).map(|_| rng.range(-8.0, 8.0)).collect();
    println!("part 1: ensemble of two models, B={B} V={V}, f32 logits");
    for (mode, w) in [(Mode::Linear, [0.3f32, 0.7]), (Mode::LogLinear, [1.0f32, -0.5])] {
        let name = format!("ensemble {mode:?} {w:?}");
        match ensemble_case(gpu, &a, &b, mode, &w) {
            Ok((diff, am_gpu, am_cpu)) => {
                let pass = diff <= ENSEMBLE_TOL && am_gpu == am_cpu;
                checks.push(Check {
                    name,
                    detail: format!(
                        "max |log p gpu - cpu| {diff:.2e} (tol {ENSEMBLE_TOL:.0e}); argmax {}",
                        if am_gpu == am_cpu {
                            format!("equal {am_gpu:?}")
                        } else {
                            format!("gpu {am_gpu:?} cpu {am_cpu:?}")
                        }
                    ),
                    pass,
                });
            }
            Err(why) => checks.push(Check {
                name,
                detail: why,
                pass: false,
            }),
        }
    }
}

/// The max abs log-prob difference and both argmax vectors.
fn ensemble_case(
    gpu: &Gpu,
    a: &[f32],
    b: &[f32],
    mode: Mode,
    w: &[f32; 2],
) -> Res<(f64, Vec<u32>, Vec<u32>)> {
    // CPU: the core.
    let mut lp_cpu = vec![0.0f32; B * V];
    let mut am_cpu = vec![0u32; B];
    {
        let la: Logits<'_> = Rows::dense(a, B, V).map_err(|e| format!("{e:?}"))?.into();
        let lb: Logits<'_> = Rows::dense(b, B, V).map_err(|e| format!("{e:?}"))?.into();
        let models = [
            Model {
                logits: la,
                temperature: 1.0,
            },
            Model {
                logits: lb,
                temperature: 1.0,
            },
        ];
        let cfg = Config {
            mode,
            weights: Weights::PerModel(w),
            out_temperature: 1.0,
            plausibility: None,
            mask_rule: MaskRule::All,
        };
        let out = Output {
            log_probs: Some(RowsMut::dense(&mut lp_cpu, B, V).map_err(|e| format!("{e:?}"))?),
            probs: None,
            argmax: Some(&mut am_cpu),
            ..Default::default()
        };
        core_ensemble::combine(&models, &cfg, out).map_err(|e| format!("cpu combine: {e:?}"))?;
    }

    // GPU.
    let k = gpu.kernels();
    let da = Buffer::from_slice(a)?;
    let db = Buffer::from_slice(b)?;
    let dlp = Buffer::zeroed(B * V * 4)?;
    let dam = Buffer::zeroed(B * 4)?;
    // Zeroed once; lets the split-row kernel (v2) run where it applies.
    let ws_len = workspace_bytes(k, B, V, 2, 4).map_err(dev)?;
    let ws = Buffer::zeroed(ws_len)?;
    let models = [
        DeviceModel {
            logits: DeviceLogits::F32(DeviceRows::dense(da.view(B * V), B, V).map_err(dev)?),
            temperature: 1.0,
        },
        DeviceModel {
            logits: DeviceLogits::F32(DeviceRows::dense(db.view(B * V), B, V).map_err(dev)?),
            temperature: 1.0,
        },
    ];
    let cfg = match mode {
        Mode::Linear => DeviceConfig::linear(w),
        Mode::LogLinear => DeviceConfig::log_linear(w),
    };
    let out = DeviceOutput {
        log_probs: Some(DeviceRowsMut::dense(dlp.view_mut(B * V), B, V).map_err(dev)?),
        argmax: Some(dam.view_mut(B)),
        ..Default::default()
    };
    let mut call = Combine::new(&models, &cfg, out);
    if ws_len > 0 {
        call = call.with_workspace(ws.view_mut(ws_len));
    }
    call.launch(k, gpu.stream())
        .map_err(|e| format!("gpu combine: {e:?}"))?;
    gpu.synchronize().map_err(|e| format!("synchronize: {e}"))?;
    let lp_gpu: Vec<f32> = dlp.to_vec(B * V)?;
    let am_gpu: Vec<u32> = dam.to_vec(B)?;

    let mut diff = 0.0f64;
    for (&g, &c) in lp_gpu.iter().zip(&lp_cpu) {
        let d = if g.is_finite() && c.is_finite() {
            (g as f64 - c as f64).abs()
        } else if g == c {
            0.0
        } else {
            f64::INFINITY
        };
        diff = diff.max(d);
    }
    Ok((diff, am_gpu, am_cpu))
}

// ---------------------------------------------------------------------------
// Part 2: mixture-of-experts layer.

fn moe_part(gpu: &Gpu, checks: &mut Vec<Check>) {
    println!("part 2: MoE layer, T={T} H={H} I={I} E={E} k={K}, bf16 weights and activations");
    if let Err(why) = moe_case(gpu, checks) {
        checks.push(Check {
            name: "moe layer".into(),
            detail: why,
            pass: false,
        });
    }
}

fn bf16s(rng: &mut Rng, n: usize, scale: f32) -> Vec<bf16> {
    (0..n).map(|_| bf16::from_f32(rng.range(-scale, scale))).collect()
}

fn moe_case(gpu: &Gpu, checks: &mut Vec<Check>) -> Res<()> {
    let k = gpu.kernels();
    let n = T * K;
    let range = ExpertRange::all(E);
    let mut rng = Rng(0x0E_6E);
    let router: Vec<bf16> = bf16s(&mut rng, T * E, 4.0);
    let x: Vec<bf16> = bf16s(&mut rng, T * H, 2.0);
    let w13: Vec<bf16> = bf16s(&mut rng, E * 2 * I * H, 2.0 / (H as f32).sqrt());
    let w2: Vec<bf16> = bf16s(&mut rng, E * H * I, 2.0 / (I as f32).sqrt());

    // Gating: CPU core and GPU, compared bit for bit.
    let (mut ids_cpu, mut wt_cpu) = (vec![0u32; n], vec![0.0f32; n]);
    topk_softmax(
        Rows::dense(&router, T, E).map_err(|e| format!("{e:?}"))?,
        K,
        true,
        &mut ids_cpu,
        &mut wt_cpu,
    )
    .map_err(|e| format!("cpu gating: {e:?}"))?;
    let d_router = Buffer::from_slice(&router)?;
    let d_ids = Buffer::zeroed(n * 4)?;
    let d_wt = Buffer::zeroed(n * 4)?;
    let gating = Gating::TopkSoftmax { renormalize: true };
    Gate::new(
        DeviceMatrix::BF16(DeviceRows::dense(d_router.view(T * E), T, E).map_err(dev)?),
        K,
        &gating,
        d_ids.view_mut(n),
        d_wt.view_mut(n),
    )
    .launch(k, gpu.stream())
    .map_err(|e| format!("gpu gating: {e:?}"))?;
    gpu.synchronize().map_err(|e| format!("synchronize: {e}"))?;
    let ids_gpu: Vec<u32> = d_ids.to_vec(n)?;
    let wt_gpu: Vec<f32> = d_wt.to_vec(n)?;
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let differ = (0..n)
        .filter(|&s| ids_gpu[s] != ids_cpu[s] || wt_gpu[s].to_bits() != wt_cpu[s].to_bits())
        .count();
    let gate_ok = ids_gpu == ids_cpu && bits(&wt_gpu) == bits(&wt_cpu);
    checks.push(Check {
        name: "gating top-k softmax (renormalized)".into(),
        detail: format!("{differ} of {n} slots differ from the core (tol: bit-exact)"),
        pass: gate_ok,
    });

    // The expert layer on the GPU: plan from the GPU's own gating.
    let choice = LayerChoice::pick(&Tuning::builtin(), k, GemmDtype::BF16, n, E, None)
        .ok_or("no bf16 expert GEMM configuration loads on this device")?;
    let block_m = choice.block_m;
    println!(
        "  layer: GEMM1 {:?}, GEMM2 {:?}, block_m {block_m}",
        choice.gemm1, choice.gemm2
    );
    let (len, blocks) = block_padded_len(n, E, block_m).map_err(|e| format!("{e:?}"))?;
    let (d_sorted, d_blocks, d_inv, d_total) = (
        Buffer::zeroed(len * 4)?,
        Buffer::zeroed(blocks * 4)?,
        Buffer::zeroed(n * 4)?,
        Buffer::zeroed(4)?,
    );
    Align::new(
        d_ids.view(n),
        E,
        range,
        block_m,
        AlignOutput {
            sorted_ids: d_sorted.view_mut(len),
            block_experts: d_blocks.view_mut(blocks),
            total: d_total.view_mut(1),
            offsets: None,
            inverse: Some(d_inv.view_mut(n)),
        },
    )
    .launch(k, gpu.stream())
    .map_err(|e| format!("align: {e:?}"))?;
    let dx = Buffer::from_slice(&x)?;
    let dw13 = Buffer::from_slice(&w13)?;
    let dw2 = Buffer::from_slice(&w2)?;
    let dxp = Buffer::zeroed(len * H * 2)?;
    let dact = Buffer::zeroed(len * I * 2)?;
    let dy = Buffer::zeroed(len * H * 4)?;
    let dout = Buffer::zeroed(T * H * 4)?;
    let plan = DevicePlan {
        sorted_ids: d_sorted.view(len),
        block_experts: d_blocks.view(blocks),
        total: d_total.view(1),
        block_m,
        slots: n,
        k: K,
    };
    let scratch = LayerScratch {
        xp: DeviceMatrixMut::BF16(DeviceRowsMut::dense(dxp.view_mut::<bf16>(len * H), len, H).map_err(dev)?),
        act: DeviceActMut::BF16(DeviceRowsMut::dense(dact.view_mut::<bf16>(len * I), len, I).map_err(dev)?),
        y: DeviceRowsMut::dense(dy.view_mut(len * H), len, H).map_err(dev)?,
    };
    Layer::new(
        &choice,
        DeviceMatrix::BF16(DeviceRows::dense(dx.view::<bf16>(T * H), T, H).map_err(dev)?),
        &plan,
        d_inv.view(n),
        d_wt.view(n),
        DeviceMatrix::BF16(DeviceRows::dense(dw13.view::<bf16>(E * 2 * I * H), E * 2 * I, H).map_err(dev)?),
        DeviceMatrix::BF16(DeviceRows::dense(dw2.view::<bf16>(E * H * I), E * H, I).map_err(dev)?),
        scratch,
        DeviceRowsMut::dense(dout.view_mut(T * H), T, H).map_err(dev)?,
    )
    .launch(k, gpu.stream())
    .map_err(|e| format!("layer: {e:?}"))?;
    gpu.synchronize().map_err(|e| format!("synchronize: {e}"))?;
    let got: Vec<f32> = dout.to_vec(T * H)?;

    // The core's CPU layer, on the core's gating.
    let mut sorted = vec![0u32; n];
    let mut offsets = vec![0u64; E + 1];
    sort_by_expert(&ids_cpu, E, range, &mut sorted, &mut offsets, None).map_err(|e| format!("{e:?}"))?;
    let mut scratch = vec![0.0f32; layer_scratch_len(T, K, H, I).map_err(|e| format!("{e:?}"))?];
    let mut want = vec![0.0f32; T * H];
    moe_layer(
        Rows::dense(&x, T, H).map_err(|e| format!("{e:?}"))?,
        &Experts {
            w13: &w13,
            w2: &w2,
            hidden: H,
            inter: I,
            range,
        },
        &Routing {
            ids: &ids_cpu,
            weights: &wt_cpu,
            k: K,
            experts: E,
        },
        &Plan {
            sorted: &sorted,
            offsets: &offsets,
        },
        &mut scratch,
        RowsMut::dense(&mut want, T, H).map_err(|e| format!("{e:?}"))?,
    )
    .map_err(|e| format!("cpu layer: {e:?}"))?;

    let (mut num, mut den) = (0.0f64, 0.0f64);
    let mut finite = true;
    for (&a, &b) in got.iter().zip(&want) {
        finite &= a.is_finite();
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    let rel = if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    };
    let pass = finite && rel <= MOE_TOL && gate_ok;
    checks.push(Check {
        name: "moe layer (gate -> align -> experts)".into(),
        detail: format!(
            "relative error ||out - ref|| / ||ref|| {rel:.2e} (tol {MOE_TOL:.1e}){}{}",
            if finite { "" } else { "; non-finite output" },
            if gate_ok {
                ""
            } else {
                "; gating differs, so the routes differ"
            }
        ),
        pass,
    });
    Ok(())
}
