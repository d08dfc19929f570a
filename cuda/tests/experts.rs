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
use medley_cuda::experts::{
    DeviceActMut, DevicePlan, Epilogue, GEMMS, GemmDtype, Generation, LayerChoice, LayerScratch, layer,
};
use medley_cuda::mem::{DeviceMatrix, DeviceRows, DeviceRowsMut};
use medley_cuda::owned::{Buffer, Gpu};
use medley_cuda::routing::{AlignOutput, DeviceMatrixMut, align};

const POISON: u32 = 0x7FA5_A5A5;

fn trace(what: &str) {
    if std::env::var_os("MEDLEY_TRACE").is_some() {
        eprintln!("trace: {what}");
    }
}

fn gpu() -> Option<Gpu> {
    trace("open");
    match Gpu::open() {
        Ok(g) => Some(g),
        Err(why) => {
            eprintln!("GPU half skipped: {why}");
            None
        }
    }
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
            gemm1: g1,
            gemm2: g2,
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
            .filter(|&id| g.kernels().gemm_info(id).is_some())
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
        assert_eq!(medley_cuda::experts::find(c.name()), Some(id));
    }
}
