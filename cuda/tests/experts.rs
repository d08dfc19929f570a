//! Conformance of the expert GEMMs (`ptx/moe_mma.ptx`, `ptx/moe_wgmma.ptx`)
//! with the core's CPU MoE layer (`medley_core::moe::layer::moe_layer`), on
//! fresh random inputs: every GEMM configuration this device loads runs the
//! whole layer (plan on the GPU, GEMM1 + SwiGLU, GEMM2 + routing weight,
//! combine) and must match the CPU within the dtype's tolerance, with
//! poisoned outputs, odd row counts, empty experts, dropped and zero-weight
//! slots, local expert ranges, NaN routing weights, and Mixtral- and
//! DeepSeek-V3-like shapes (scaled down, plus one token at full size).
//!
//! Without a CUDA device the CPU half still runs and the GPU half reports
//! that it was skipped.

#![allow(clippy::needless_range_loop)]

#[path = "../../core/tests/common/mod.rs"]
mod common;

use common::Gen;
use medley_core::moe::layer::{Experts, Plan, Routing, layer_scratch_len, moe_layer};
use medley_core::moe::plan::{block_padded_len, sort_by_expert};
use medley_core::moe::{ExpertRange, NO_EXPERT};
use medley_core::{Rows, RowsMut, bf16, f16};
use medley_cuda::CudaError;
mod calls;
use calls::{align, gemm1, gemm2, gid, layer};
use medley_cuda::experts::{
    DeviceActMut, DevicePlan, Epilogue, GEMMS, GemmDtype, Generation, LayerChoice, LayerScratch,
};
use medley_cuda::mem::{DeviceMatrix, DeviceRows, DeviceRowsMut};
use medley_cuda::owned::{Buffer, Gpu};
use medley_cuda::routing::{AlignOutput, DeviceMatrixMut};

const POISON: u32 = 0x7FA5_A5A5;

fn trace(what: &str) {
    if std::env::var_os("MEDLEY_TRACE").is_some() {
        eprintln!("trace: {what}");
    }
}

fn gpu() -> Option<Gpu> {
    trace("open");
    Gpu::open_or_skip("experts")
}

#[derive(Debug, Clone)]
struct Case {
    name: String,
    t: usize,
    h: usize,
    i: usize,
    e: usize,
    k: usize,
    range: ExpertRange,
    dtype: GemmDtype,
    x: Vec<u16>,   // [T, H] bits
    w13: Vec<u16>, // [L, 2I, H] bits
    w2: Vec<u16>,  // [L, H, I] bits
    ids: Vec<u32>,
    weights: Vec<f32>,
}

fn bits(dt: GemmDtype, v: f32) -> u16 {
    match dt {
        GemmDtype::BF16 => bf16::from_f32(v).to_bits(),
        GemmDtype::F16 => f16::from_f32(v).to_bits(),
    }
}

impl Case {
    #[allow(clippy::too_many_arguments)]
    fn build(
        name: &str,
        g: &mut Gen,
        t: usize,
        h: usize,
        i: usize,
        e: usize,
        k: usize,
        range: ExpertRange,
        dtype: GemmDtype,
        used: &[u32],
    ) -> Case {
        let l = range.len();
        let ids: Vec<u32> = (0..t * k)
            .map(|_| {
                if g.chance(0.04) {
                    NO_EXPERT
                } else {
                    used[g.below(used.len())]
                }
            })
            .collect();
        let weights: Vec<f32> = (0..t * k)
            .map(|_| {
                if g.chance(0.08) {
                    0.0
                } else {
                    g.range(0.05, 1.0) as f32
                }
            })
            .collect();
        // Only the experts a slot uses get random weights (the others stay
        // zero): full-size shapes stay cheap to build.
        let mut touched = vec![false; l];
        for &id in &ids {
            if let Some(le) = range.local(id) {
                touched[le] = true;
            }
        }
        let s13 = 1.0 / (h as f64).sqrt();
        let s2 = 1.0 / (i as f64).sqrt();
        let mut w13 = vec![0u16; l * 2 * i * h];
        let mut w2 = vec![0u16; l * h * i];
        for le in 0..l {
            if !touched[le] {
                continue;
            }
            for v in &mut w13[le * 2 * i * h..(le + 1) * 2 * i * h] {
                *v = bits(dtype, g.range(-2.0 * s13, 2.0 * s13) as f32);
            }
            for v in &mut w2[le * h * i..(le + 1) * h * i] {
                *v = bits(dtype, g.range(-2.0 * s2, 2.0 * s2) as f32);
            }
        }
        let x: Vec<u16> = (0..t * h)
            .map(|_| bits(dtype, g.range(-2.0, 2.0) as f32))
            .collect();
        Case {
            name: name.to_string(),
            t,
            h,
            i,
            e,
            k,
            range,
            dtype,
            x,
            w13,
            w2,
            ids,
            weights,
        }
    }

    fn random(seed: u64) -> Case {
        let mut g = Gen(seed);
        let t = [1usize, 2, 5, 17, 64, 131, 300][g.below(7)];
        let h = [8usize, 64, 72, 200, 256, 520][g.below(6)];
        let i = [8usize, 16, 136, 256, 392][g.below(5)];
        let e = [1usize, 3, 8, 16, 64][g.below(5)];
        let k = 1 + g.below(e.min(8));
        let range = if g.chance(0.4) {
            let first = g.below(e) as u32;
            let last = first + 1 + g.below(e - first as usize) as u32;
            ExpertRange { first, last }
        } else {
            ExpertRange::all(e)
        };
        // Some experts get no slot at all.
        let mut used: Vec<u32> = (0..e as u32).filter(|_| g.chance(0.7)).collect();
        if used.is_empty() {
            used.push(g.below(e) as u32);
        }
        let dtype = if g.chance(0.5) {
            GemmDtype::BF16
        } else {
            GemmDtype::F16
        };
        let mut c = Case::build(
            &format!("random {seed:#x}"),
            &mut g,
            t,
            h,
            i,
            e,
            k,
            range,
            dtype,
            &used,
        );
        if g.chance(0.2) && !c.weights.is_empty() {
            let s = g.below(c.weights.len());
            c.weights[s] = f32::NAN;
        }
        if g.chance(0.2) && c.t > 1 {
            // One token's activations hold a NaN or an infinity: only that
            // token's output may change.
            let tok = g.below(c.t);
            let v = if g.chance(0.5) { f32::NAN } else { f32::INFINITY };
            c.x[tok * c.h + g.below(c.h)] = bits(c.dtype, v);
        }
        c
    }

    /// CPU reference output `[T, H]`.
    fn cpu(&self) -> Vec<f32> {
        let (t, h, i, k) = (self.t, self.h, self.i, self.k);
        let l = self.range.len();
        let n = t * k;
        let mut sorted = vec![0u32; n];
        let mut offsets = vec![0u64; l + 1];
        sort_by_expert(&self.ids, self.e, self.range, &mut sorted, &mut offsets, None).unwrap();
        let mut scratch = vec![0.0f32; layer_scratch_len(t, k, h, i).unwrap()];
        let mut out = vec![0.0f32; t * h];
        fn go<T: medley_core::Element + bytemuck::Pod>(
            c: &Case,
            sorted: &[u32],
            offsets: &[u64],
            scratch: &mut [f32],
            out: &mut [f32],
        ) {
            let x: &[T] = bytemuck::cast_slice(&c.x);
            let w13: &[T] = bytemuck::cast_slice(&c.w13);
            let w2: &[T] = bytemuck::cast_slice(&c.w2);
            let experts = Experts {
                w13,
                w2,
                hidden: c.h,
                inter: c.i,
                range: c.range,
            };
            let routing = Routing {
                ids: &c.ids,
                weights: &c.weights,
                k: c.k,
                experts: c.e,
            };
            let plan = Plan { sorted, offsets };
            moe_layer(
                Rows::dense(x, c.t, c.h).unwrap(),
                &experts,
                &routing,
                &plan,
                scratch,
                RowsMut::dense(out, c.t, c.h).unwrap(),
            )
            .unwrap();
        }
        match self.dtype {
            GemmDtype::BF16 => go::<bf16>(self, &sorted, &offsets, &mut scratch, &mut out),
            GemmDtype::F16 => go::<f16>(self, &sorted, &offsets, &mut scratch, &mut out),
        }
        out
    }

    /// The layer on the GPU with GEMM configurations `g1`, `g2`.
    fn gpu(&self, g: &Gpu, g1: usize, g2: usize) -> Result<Vec<f32>, String> {
        let (t, h, i, k) = (self.t, self.h, self.i, self.k);
        let l = self.range.len();
        let n = t * k;
        let block_m = GEMMS[g1].bm.max(GEMMS[g2].bm) as usize;
        trace(&format!(
            "{} {} + {}",
            self.name,
            GEMMS[g1].name(),
            GEMMS[g2].name()
        ));
        let (len, blocks) = block_padded_len(n, l, block_m).map_err(|e| format!("{e:?}"))?;
        let e = |e: medley_cuda::CudaError| format!("{e:?}");
        let d_ids = Buffer::from_slice(&self.ids)?;
        let (ds, dbe, dinv, dtot) = (
            Buffer::filled(len, POISON)?,
            Buffer::filled(blocks, POISON)?,
            Buffer::filled(n, POISON)?,
            Buffer::filled(1, POISON)?,
        );
        align(
            g.kernels(),
            d_ids.view(n),
            self.e,
            self.range,
            block_m,
            AlignOutput {
                sorted_ids: ds.view_mut(len),
                block_experts: dbe.view_mut(blocks),
                total: dtot.view_mut(1),
                offsets: None,
                inverse: Some(dinv.view_mut(n)),
            },
            g.stream(),
        )
        .map_err(e)?;
        let dx = Buffer::from_slice(&self.x)?;
        let dw13 = Buffer::from_slice(&self.w13)?;
        let dw2 = Buffer::from_slice(&self.w2)?;
        let dwt = Buffer::from_slice(&self.weights)?;
        let dxp = Buffer::filled(len * h, 0x7FA5u16)?;
        let dact = Buffer::filled(len * i, 0x7FA5u16)?;
        let dy = Buffer::filled(len * h, POISON)?;
        let dout = Buffer::filled(t * h, POISON)?;
        let plan = DevicePlan {
            sorted_ids: ds.view(len),
            block_experts: dbe.view(blocks),
            total: dtot.view(1),
            block_m,
            slots: n,
            k,
        };
        let choice = LayerChoice {
            gemm1: gid(g1),
            gemm2: gid(g2),
            block_m,
        };
        macro_rules! run {
            ($T:ty, $M:ident) => {{
                let x = DeviceMatrix::$M(DeviceRows::dense(dx.view::<$T>(t * h), t, h).map_err(e)?);
                let w13 = DeviceMatrix::$M(
                    DeviceRows::dense(dw13.view::<$T>(l * 2 * i * h), l * 2 * i, h).map_err(e)?,
                );
                let w2 = DeviceMatrix::$M(DeviceRows::dense(dw2.view::<$T>(l * h * i), l * h, i).map_err(e)?);
                let scratch = LayerScratch {
                    xp: DeviceMatrixMut::$M(
                        DeviceRowsMut::dense(dxp.view_mut::<$T>(len * h), len, h).map_err(e)?,
                    ),
                    act: DeviceActMut::$M(
                        DeviceRowsMut::dense(dact.view_mut::<$T>(len * i), len, i).map_err(e)?,
                    ),
                    y: DeviceRowsMut::dense(dy.view_mut(len * h), len, h).map_err(e)?,
                };
                trace("layer");
                layer(
                    g.kernels(),
                    &choice,
                    x,
                    &plan,
                    dinv.view(n),
                    dwt.view(n),
                    w13,
                    w2,
                    scratch,
                    DeviceRowsMut::dense(dout.view_mut(t * h), t, h).map_err(e)?,
                    g.stream(),
                )
                .map_err(e)?;
            }};
        }
        match self.dtype {
            GemmDtype::BF16 => run!(bf16, BF16),
            GemmDtype::F16 => run!(f16, F16),
        }
        trace("sync");
        g.synchronize().map_err(|e| format!("{e:?}"))?;
        trace("synced");
        dout.to_vec(t * h)
    }
}

/// Relative error of `got` vs `want` over rows that are finite in the
/// reference, or a description of the first structural mismatch (NaN rows,
/// nonzero output for a token with no contributing slot).
fn compare(c: &Case, got: &[f32], want: &[f32]) -> Result<f64, String> {
    let h = c.h;
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for t in 0..c.t {
        let (gr, wr) = (&got[t * h..(t + 1) * h], &want[t * h..(t + 1) * h]);
        let wnan = wr.iter().any(|v| v.is_nan());
        let gnan = gr.iter().any(|v| v.is_nan());
        if wnan != gnan {
            return Err(format!("token {t}: NaN row mismatch (cpu {wnan}, gpu {gnan})"));
        }
        if wnan {
            continue;
        }
        if wr.iter().all(|&v| v == 0.0) && gr.iter().any(|&v| v != 0.0) {
            // A token with no contributing slot must be exactly zero.
            let live = (0..c.k).any(|j| {
                let s = t * c.k + j;
                c.range.local(c.ids[s]).is_some() && c.weights[s] != 0.0
            });
            if !live {
                return Err(format!("token {t}: nonzero row for a token with no slot"));
            }
        }
        for (&a, &b) in gr.iter().zip(wr) {
            if !a.is_finite() {
                return Err(format!("token {t}: non-finite {a} where the CPU has {b}"));
            }
            num += (a as f64 - b as f64).powi(2);
            den += (b as f64).powi(2);
        }
    }
    Ok(if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    })
}

fn tolerance(dt: GemmDtype) -> f64 {
    // The intermediate activation is rounded to the dtype (the CPU keeps it
    // in f32): ~2^-9 (bf16) / 2^-12 (f16) relative per element.
    match dt {
        GemmDtype::BF16 => 1.5e-2,
        GemmDtype::F16 => 2.5e-3,
    }
}

/// Every loaded GEMM of the case's dtype, each paired with a partner of the
/// other epilogue (cycling through them) so both run in every pairing
/// order over the suite.
fn pairs(g: &Gpu, dt: GemmDtype, salt: usize) -> Vec<(usize, usize)> {
    let loaded = |epi: Epilogue| -> Vec<usize> {
        (0..GEMMS.len())
            .filter(|&id| GEMMS[id].epilogue == epi && GEMMS[id].dtype == dt)
            .filter(|&id| g.kernels().gemm_info(gid(id)).is_some())
            .collect()
    };
    let (s, d) = (loaded(Epilogue::SwiGlu), loaded(Epilogue::Down));
    let mut out = Vec::new();
    for (n, &a) in s.iter().enumerate() {
        out.push((a, d[(n + salt) % d.len()]));
    }
    for (n, &b) in d.iter().enumerate() {
        out.push((s[(n + salt) % s.len()], b));
    }
    out
}

fn check_case(
    g: Option<&Gpu>,
    c: &Case,
    salt: usize,
    failures: &mut Vec<String>,
    runs: &mut usize,
    worst: &mut [f64; 2],
) {
    let want = c.cpu();
    let Some(g) = g else { return };
    for (g1, g2) in pairs(g, c.dtype, salt) {
        *runs += 1;
        let tag = format!(
            "{} [T={} H={} I={} E={} k={} {:?}] {} + {}",
            c.name,
            c.t,
            c.h,
            c.i,
            c.e,
            c.k,
            c.dtype,
            GEMMS[g1].name(),
            GEMMS[g2].name()
        );
        match c.gpu(g, g1, g2).and_then(|got| compare(c, &got, &want)) {
            Ok(err) if err <= tolerance(c.dtype) => {
                let w = &mut worst[(c.dtype == GemmDtype::F16) as usize];
                *w = w.max(err);
            }
            Ok(err) => failures.push(format!("{tag}: relative error {err:.3e}")),
            Err(why) => failures.push(format!("{tag}: {why}")),
        }
    }
}

#[test]
fn expert_gemms_match_the_cpu_layer() {
    let g = gpu();
    let mut failures = Vec::new();
    let mut runs = 0usize;
    let mut worst = [0.0f64; 2];
    let n: usize = std::env::var("MEDLEY_EXPERT_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let mut rng = Gen(0xE6E6);
    // Shaped cases: Mixtral-like (H = 4096, I = 14336, E = 8, k = 2) and
    // DeepSeek-V3-like (H = 7168, I = 2048, E = 256, k = 8), scaled by 1/4
    // with odd token counts, one of them on a local expert range.
    let mixtral_all: Vec<u32> = (0..8).collect();
    let ds_used: Vec<u32> = (0..256).filter(|e| e % 3 != 0).collect();
    let shaped = [
        Case::build(
            "mixtral/4",
            &mut rng,
            37,
            1024,
            3584,
            8,
            2,
            ExpertRange::all(8),
            GemmDtype::BF16,
            &mixtral_all,
        ),
        Case::build(
            "mixtral/4 f16",
            &mut rng,
            9,
            1024,
            3584,
            8,
            2,
            ExpertRange::all(8),
            GemmDtype::F16,
            &mixtral_all,
        ),
        Case::build(
            "deepseek/4 local 64..192",
            &mut rng,
            45,
            1792,
            512,
            256,
            8,
            ExpertRange { first: 64, last: 192 },
            GemmDtype::BF16,
            &ds_used,
        ),
    ];
    if std::env::var("MEDLEY_EXPERT_SHAPED")
        .map(|v| v != "0")
        .unwrap_or(true)
    {
        for (s, c) in shaped.iter().enumerate() {
            check_case(g.as_ref(), c, s, &mut failures, &mut runs, &mut worst);
        }
    }
    for case in 0..n {
        let c = Case::random(0x5EED_0000 + case as u64);
        check_case(g.as_ref(), &c, case, &mut failures, &mut runs, &mut worst);
    }
    if std::env::var("MEDLEY_EXPERT_FULL")
        .map(|v| v != "0")
        .unwrap_or(true)
        && g.is_some()
    {
        // Full size, one and three tokens (only the routed experts hold
        // weights; the CPU reference stays quick).
        let full = [
            Case::build(
                "mixtral full",
                &mut rng,
                1,
                4096,
                14336,
                8,
                2,
                ExpertRange::all(8),
                GemmDtype::BF16,
                &mixtral_all,
            ),
            Case::build(
                "deepseek full",
                &mut rng,
                3,
                7168,
                2048,
                256,
                8,
                ExpertRange::all(256),
                GemmDtype::BF16,
                &ds_used,
            ),
        ];
        for (s, c) in full.iter().enumerate() {
            check_case(g.as_ref(), c, s, &mut failures, &mut runs, &mut worst);
        }
    }
    eprintln!(
        "expert GEMM conformance: {runs} GPU runs, {} failed; worst passing relative error bf16 {:.2e}, f16 {:.2e}",
        failures.len(),
        worst[0],
        worst[1]
    );
    for f in failures.iter().take(30) {
        eprintln!("  {f}");
    }
    assert!(failures.is_empty(), "{} of {runs} runs failed", failures.len());
}

#[test]
fn every_gemm_entry_has_a_consistent_table_row() {
    for (id, c) in GEMMS.iter().enumerate() {
        assert!(
            c.bm.is_power_of_two() && c.bm >= 16 && 128 % c.bm == 0,
            "{}",
            c.name()
        );
        assert!(c.smem <= 227 * 1024, "{}", c.name());
        let want = match c.generation {
            Generation::Mma => 32 * c.warps_m * c.warps_n,
            Generation::Wgmma => 128 * c.warps_m + 32,
        };
        assert_eq!(c.threads, want, "{}", c.name());
        assert_eq!(medley_cuda::experts::find(c.name()), Some(gid(id)));
    }
}

/// GEMM1 of the mma generation reads token rows either gathered through the
/// plan or already in plan order (`routing::permute`): the two paths run
/// the same arithmetic, so their outputs must agree bit for bit.
#[test]
fn gemm1_gathered_and_in_plan_order_agree_bitwise() {
    let Some(g) = gpu() else { return };
    let mut failures = Vec::new();
    let mut runs = 0;
    for case in 0..4u64 {
        let c = Case::random(0xB17_0000 + case);
        let (t, h, i, k, l) = (c.t, c.h, c.i, c.k, c.range.len());
        let n = t * k;
        for id in 0..GEMMS.len() {
            let cfg = &GEMMS[id];
            if cfg.generation != Generation::Mma || cfg.epilogue != Epilogue::SwiGlu || cfg.dtype != c.dtype {
                continue;
            }
            runs += 1;
            let bm = cfg.bm as usize;
            let r = (|| -> Result<bool, String> {
                let e = |e: CudaError| format!("{e:?}");
                let (len, blocks) = block_padded_len(n, l, bm).map_err(|e| format!("{e:?}"))?;
                let d_ids = Buffer::from_slice(&c.ids)?;
                let (ds, dbe, dtot) = (
                    Buffer::filled(len, POISON)?,
                    Buffer::filled(blocks, POISON)?,
                    Buffer::filled(1, POISON)?,
                );
                align(
                    g.kernels(),
                    d_ids.view(n),
                    c.e,
                    c.range,
                    bm,
                    AlignOutput {
                        sorted_ids: ds.view_mut(len),
                        block_experts: dbe.view_mut(blocks),
                        total: dtot.view_mut(1),
                        offsets: None,
                        inverse: None,
                    },
                    g.stream(),
                )
                .map_err(e)?;
                let plan = DevicePlan {
                    sorted_ids: ds.view(len),
                    block_experts: dbe.view(blocks),
                    total: dtot.view(1),
                    block_m: bm,
                    slots: n,
                    k,
                };
                let dx = Buffer::from_slice(&c.x)?;
                let dw13 = Buffer::from_slice(&c.w13)?;
                let dxp = Buffer::filled(len * h, 0u16)?;
                let (a1, a2) = (Buffer::filled(len * i, 0u16)?, Buffer::filled(len * i, 0u16)?);
                macro_rules! go {
                    ($T:ty, $M:ident) => {{
                        let x = DeviceMatrix::$M(DeviceRows::dense(dx.view::<$T>(t * h), t, h).map_err(e)?);
                        let w = || -> Result<DeviceMatrix<'_>, String> {
                            Ok(DeviceMatrix::$M(
                                DeviceRows::dense(dw13.view::<$T>(l * 2 * i * h), l * 2 * i, h).map_err(e)?,
                            ))
                        };

                        gemm1(
                            g.kernels(),
                            id,
                            x,
                            false,
                            &plan,
                            w()?,
                            DeviceActMut::$M(
                                DeviceRowsMut::dense(a1.view_mut::<$T>(len * i), len, i).map_err(e)?,
                            ),
                            g.stream(),
                        )
                        .map_err(e)?;
                        calls::permute(
                            g.kernels(),
                            x,
                            k,
                            ds.view(len),
                            dtot.view(1),
                            DeviceMatrixMut::$M(
                                DeviceRowsMut::dense(dxp.view_mut::<$T>(len * h), len, h).map_err(e)?,
                            ),
                            g.stream(),
                        )
                        .map_err(e)?;
                        let xp =
                            DeviceMatrix::$M(DeviceRows::dense(dxp.view::<$T>(len * h), len, h).map_err(e)?);
                        gemm1(
                            g.kernels(),
                            id,
                            xp,
                            true,
                            &plan,
                            w()?,
                            DeviceActMut::$M(
                                DeviceRowsMut::dense(a2.view_mut::<$T>(len * i), len, i).map_err(e)?,
                            ),
                            g.stream(),
                        )
                        .map_err(e)?;
                    }};
                }
                match c.dtype {
                    GemmDtype::BF16 => go!(bf16, BF16),
                    GemmDtype::F16 => go!(f16, F16),
                }
                g.synchronize().map_err(|e| format!("{e:?}"))?;
                Ok(a1.to_vec::<u16>(len * i)? == a2.to_vec::<u16>(len * i)?)
            })();
            match r {
                Ok(true) => {}
                Ok(false) => failures.push(format!("{}: {}: outputs differ", c.name, cfg.name())),
                Err(why) => failures.push(format!("{}: {}: {why}", c.name, cfg.name())),
            }
        }
    }
    eprintln!("gather vs plan order: {runs} runs, {} failed", failures.len());
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Bad calls fail before anything is launched, with the error that names
/// the problem; a call with no tokens launches nothing and succeeds.
#[test]
fn bad_expert_gemm_calls_are_refused() {
    let Some(g) = gpu() else { return };
    let kn = g.kernels();
    let (t, h, i, l, k) = (4usize, 64usize, 32usize, 2usize, 2usize);
    let n = t * k;
    let bm = 16usize;
    let (len, blocks) = block_padded_len(n, l, bm).unwrap();
    let zeros = Buffer::zeroed(1 << 20).unwrap();
    let plan = DevicePlan {
        sorted_ids: zeros.view(len),
        block_experts: zeros.view(blocks),
        total: zeros.view(1),
        block_m: bm,
        slots: n,
        k,
    };
    let mma1 = GEMMS
        .iter()
        .position(|c| {
            c.generation == Generation::Mma
                && c.epilogue == Epilogue::SwiGlu
                && c.dtype == GemmDtype::BF16
                && c.bm == 16
        })
        .unwrap();
    let mma2 = GEMMS
        .iter()
        .position(|c| {
            c.generation == Generation::Mma
                && c.epilogue == Epilogue::Down
                && c.dtype == GemmDtype::BF16
                && c.bm == 16
        })
        .unwrap();
    let x = |rows: usize, cols: usize| {
        DeviceMatrix::BF16(DeviceRows::dense(zeros.view::<bf16>(rows * cols), rows, cols).unwrap())
    };
    let act = |rows: usize, cols: usize| {
        DeviceActMut::BF16(DeviceRowsMut::dense(zeros.view_mut::<bf16>(rows * cols), rows, cols).unwrap())
    };
    let call1 =
        |id: usize,
         xm: DeviceMatrix<'_>,
         in_order: bool,
         w: DeviceMatrix<'_>,
         out: DeviceActMut<'_>,
         plan: &DevicePlan<'_>| { gemm1(kn, id, xm, in_order, plan, w, out, g.stream()) };
    // f32 activations.
    let xf = DeviceMatrix::F32(DeviceRows::dense(zeros.view::<f32>(t * h), t, h).unwrap());
    assert!(matches!(
        call1(mma1, xf, false, x(l * 2 * i, h), act(len, i), &plan),
        Err(CudaError::Unsupported { .. })
    ));
    // A down-projection configuration passed to gemm1.
    assert!(matches!(
        call1(mma2, x(t, h), false, x(l * 2 * i, h), act(len, i), &plan),
        Err(CudaError::Unsupported { .. })
    ));
    // H not a multiple of 8.
    assert!(call1(mma1, x(t, 60), false, x(l * 2 * i, 60), act(len, i), &plan).is_err());
    // Weights of the wrong shape (rows not a multiple of 2I).
    assert!(call1(mma1, x(t, h), false, x(l * 2 * i + 8, h), act(len, i), &plan).is_err());
    // Output rows that are not the plan's length.
    assert!(call1(mma1, x(t, h), false, x(l * 2 * i, h), act(len - 16, i), &plan).is_err());
    // A plan whose block size the configuration does not divide.
    let odd = DevicePlan { block_m: 24, ..plan };
    assert!(call1(mma1, x(t, h), false, x(l * 2 * i, h), act(len, i), &odd).is_err());
    // Gathering with a wgmma configuration.
    let wg = GEMMS.iter().position(|c| {
        c.generation == Generation::Wgmma && c.epilogue == Epilogue::SwiGlu && c.dtype == GemmDtype::BF16
    });
    if let Some(wg) = wg.filter(|&wg| kn.gemm_info(gid(wg)).is_some()) {
        let plan64 = DevicePlan { block_m: 64, ..plan };
        assert!(matches!(
            call1(wg, x(t, h), false, x(l * 2 * i, h), act(len, i), &plan64),
            Err(CudaError::Unsupported { .. })
        ));
    }
    // gemm2: routing weights of the wrong length.
    let y = DeviceRowsMut::dense(zeros.view_mut::<f32>(len * h), len, h).unwrap();
    assert!(
        gemm2(
            kn,
            mma2,
            x(len, i),
            &plan,
            x(l * h, i),
            zeros.view(n - 1),
            y,
            g.stream()
        )
        .is_err()
    );
    // No tokens: nothing to launch, success.
    let empty = DevicePlan {
        sorted_ids: zeros.view(0),
        block_experts: zeros.view(0),
        total: zeros.view(1),
        block_m: bm,
        slots: 0,
        k,
    };
    let r = gemm1(
        kn,
        mma1,
        x(0, h),
        false,
        &empty,
        x(l * 2 * i, h),
        act(0, i),
        g.stream(),
    );
    assert!(r.is_ok(), "{r:?}");
    g.synchronize().unwrap();
}
