//! Conformance of the MoE kernels (`gating.ptx`, `routing.ptx`) with the
//! CPU core, on fresh random inputs with poisoned outputs. The kernels
//! promise bit-for-bit equality with the core, so these tests compare bits:
//! gating ids and weights, plan arrays, permuted rows, combined rows.
//!
//! Without a CUDA device every test reports that it was skipped and why;
//! the CPU references still run (and are checked against simple loops).

#![allow(clippy::needless_range_loop)]

#[path = "../../core/tests/common/mod.rs"]
mod common;

use common::Gen;
use medley_core::moe::gating::{
    GroupScore, GroupedConfig, Scoring, grouped_topk, keep_topk_softmax, topk_softmax,
};
use medley_core::moe::plan::{align_block_size, block_padded_len};
use medley_core::moe::{ExpertRange, NO_EXPERT};
use medley_core::{Rows, bf16, f16};
mod calls;
use calls::{align, combine, gate_with, permute};
use medley_cuda::gating::{GateKernel, Gating, RouterLogits, V2_MAX_EXPERTS, V3_MAX_EXPERTS};
use medley_cuda::mem::{DeviceRows, DeviceRowsMut};
use medley_cuda::owned::{Buffer, Gpu};
use medley_cuda::routing::{AlignOutput, DeviceMatrix, DeviceMatrixMut};

const POISON: u32 = 0x7FA5_A5A5;

/// A GPU for this test (each test runs on its own thread, and cust's
/// allocations use the thread's current context, so every test opens its
/// own).
fn gpu() -> Option<Gpu> {
    Gpu::open_or_skip("moe")
}

#[derive(Debug, Clone)]
struct GateCase {
    t: usize,
    e: usize,
    k: usize,
    dtype: u8,
    logits: Vec<f32>, // t x e, already rounded to dtype
    mode: u8,         // 0 topk_softmax, 1 topk_softmax renorm, 2 keep, 3 grouped
    n_group: usize,
    topk_group: usize,
    scoring: Scoring,
    group_score: GroupScore,
    renorm: bool,
    scale: f32,
    bias: Option<Vec<f32>>,
    /// The bias starts this many f32 into its buffer (1: not 16-byte
    /// aligned, which the v3 kernels refuse).
    bias_offset: usize,
}

/// Cases per test: `MEDLEY_MOE_CASES=n` (compute-sanitizer runs use few),
/// else `default`.
fn moe_cases(default: usize) -> usize {
    std::env::var("MEDLEY_MOE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Prints the first ten failures and fails if there is any.
fn assert_none_failed(failures: &[String]) {
    for f in failures.iter().take(10) {
        eprintln!("  {f}");
    }
    assert!(failures.is_empty());
}

/// Weight bits for comparing GPU and CPU: every NaN as one value (the
/// kernels write 0x7FFFFFFF, the core `f32::NAN`).
fn wb(v: &[f32]) -> Vec<u32> {
    v.iter()
        .map(|x| if x.is_nan() { u32::MAX } else { x.to_bits() })
        .collect()
}

fn round(dtype: u8, x: f32) -> f32 {
    match dtype {
        1 => f16::from_f32(x).to_f32(),
        2 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

impl GateCase {
    fn random(seed: u64) -> GateCase {
        let mut g = Gen(seed);
        let es = [
            1usize, 2, 3, 5, 8, 16, 60, 64, 128, 144, 160, 256, 257, 384, 511, 512, 1000, 1024,
        ];
        let e = es[g.below(es.len())];
        let mode = g.below(4) as u8;
        let t = g.below(70);
        let dtype = g.below(3) as u8;
        let mut c = GateCase {
            t,
            e,
            k: 1,
            dtype,
            logits: Vec::new(),
            mode,
            n_group: 1,
            topk_group: 1,
            scoring: if g.chance(0.5) {
                Scoring::Sigmoid
            } else {
                Scoring::Softmax
            },
            group_score: if g.chance(0.5) {
                GroupScore::Top2Sum
            } else {
                GroupScore::Max
            },
            renorm: g.chance(0.7),
            scale: if g.chance(0.5) { 1.0 } else { 2.5 },
            bias: None,
            bias_offset: 0,
        };
        if mode == 3 {
            let divisors: Vec<usize> = (1..=e.min(256)).filter(|d| e.is_multiple_of(*d)).collect();
            c.n_group = divisors[g.below(divisors.len())];
            if c.group_score == GroupScore::Top2Sum && e / c.n_group < 2 {
                c.group_score = GroupScore::Max;
            }
            c.topk_group = 1 + g.below(c.n_group);
            if g.chance(0.6) {
                c.bias = Some((0..e).map(|_| g.range(-0.5, 0.5) as f32).collect());
            }
        }
        let reach = if mode == 3 {
            c.topk_group * (e / c.n_group)
        } else {
            e
        };
        c.k = 1 + g.below(reach.min(32));
        // Logits: a mix of spreads, ties (small integer grid), masked entries,
        // and the odd +inf / NaN row.
        let grid = g.chance(0.3);
        c.logits = (0..t * e)
            .map(|_| {
                let x = if grid {
                    g.below(7) as f32 - 3.0
                } else {
                    g.range(-8.0, 8.0) as f32
                };
                let x = if g.chance(0.05) { f32::NEG_INFINITY } else { x };
                round(dtype, x)
            })
            .collect();
        for row in 0..t {
            let r = g.below(40);
            let s = &mut c.logits[row * e..(row + 1) * e];
            match r {
                0 => s.fill(f32::NEG_INFINITY),
                1 => s[g.below(e)] = f32::NAN,
                2 => s[g.below(e)] = f32::INFINITY,
                3 => {
                    s[g.below(e)] = f32::INFINITY;
                    s[g.below(e)] = f32::INFINITY;
                }
                _ => {}
            }
        }
        c
    }

    /// Whether a v3 kernel takes this case: E a multiple of 8 up to 256 (the
    /// buffers are aligned), and either renormalized top-k softmax over
    /// 16-bit logits (`gate_topk_v3`) or sigmoid grouped routing over any
    /// dtype with an aligned bias and groups of whole lanes, or none
    /// (`gate_grouped_v3`).
    fn v3_applies(&self) -> bool {
        let shape = self.e.is_multiple_of(8) && self.e <= V3_MAX_EXPERTS;
        let half = matches!(self.dtype, 1 | 2);
        let size = self.e / self.n_group;
        let groups =
            self.topk_group == self.n_group || (size.is_multiple_of(8) && (size / 8).is_power_of_two());
        shape
            && match self.mode {
                1 | 2 => half,
                3 => self.scoring == Scoring::Sigmoid && self.bias_offset == 0 && groups,
                _ => false,
            }
    }

    /// A grouped case `gate_grouped_v3` takes (half of them DeepSeek-V3's
    /// configuration), over the logits of `random_v3`: a bias most of the
    /// time, on a grid of 0.25 a third of the time (ties between selection
    /// and group scores).
    fn random_grouped_v3(seed: u64) -> GateCase {
        let mut c = GateCase::random_v3(seed);
        let mut g = Gen(seed ^ 0x6E0_0000);
        c.mode = 3;
        if g.chance(0.3) {
            c.dtype = 0; // the logits are f16/bf16 values: exact in f32 too
        }
        c.scoring = Scoring::Sigmoid;
        c.renorm = g.chance(0.7);
        c.scale = if g.chance(0.5) { 1.0 } else { 2.5 };
        if c.e == 256 && g.chance(0.5) {
            (c.n_group, c.topk_group, c.group_score, c.k) = (8, 4, GroupScore::Top2Sum, 8);
            c.renorm = true;
            c.scale = 2.5;
        } else {
            let ok: Vec<(usize, usize)> = (1..=c.e)
                .filter(|d| c.e.is_multiple_of(*d))
                .flat_map(|d| (1..=d).map(move |t| (d, t)))
                .filter(|&(d, t)| {
                    let size = c.e / d;
                    t == d || (size.is_multiple_of(8) && (size / 8).is_power_of_two())
                })
                .collect();
            (c.n_group, c.topk_group) = ok[g.below(ok.len())];
            c.group_score = if c.e / c.n_group >= 2 && g.chance(0.5) {
                GroupScore::Top2Sum
            } else {
                GroupScore::Max
            };
            c.k = 1 + g.below((c.topk_group * (c.e / c.n_group)).min(32));
        }
        if g.chance(0.8) {
            let grid = g.chance(0.35);
            c.bias = Some(
                (0..c.e)
                    .map(|_| {
                        let b = g.range(-0.5, 0.5) as f32;
                        if grid { (b * 4.0).round() / 4.0 } else { b }
                    })
                    .collect(),
            );
        }
        c
    }

    /// A case `gate_topk_v3` takes, with its edge values: many ties, both
    /// zeros, NaN of either sign, +-inf entries and rows.
    fn random_v3(seed: u64) -> GateCase {
        let mut g = Gen(seed);
        let es = [8usize, 16, 32, 64, 128, 160, 256];
        let e = es[g.below(es.len())];
        let t = if g.chance(0.25) {
            1 + g.below(3000)
        } else {
            g.below(70)
        };
        let mut c = GateCase {
            t,
            e,
            k: 1 + g.below(e.min(32)),
            dtype: 1 + g.below(2) as u8,
            logits: Vec::new(),
            mode: 1 + g.below(2) as u8,
            n_group: 1,
            topk_group: 1,
            scoring: Scoring::Softmax,
            group_score: GroupScore::Max,
            renorm: true,
            scale: 1.0,
            bias: None,
            bias_offset: 0,
        };
        let grid = g.chance(0.4);
        let big = if c.dtype == 1 { 60000.0 } else { 1e30 };
        c.logits = (0..t * e)
            .map(|_| {
                let x = match g.below(50) {
                    0 => f32::NEG_INFINITY,
                    1 => -0.0,
                    2 => 0.0,
                    3 => big,
                    4 => -big,
                    _ if grid => g.below(7) as f32 - 3.0,
                    _ => g.range(-8.0, 8.0) as f32,
                };
                round(c.dtype, x)
            })
            .collect();
        for row in 0..t {
            let s = &mut c.logits[row * e..(row + 1) * e];
            match g.below(30) {
                0 => s.fill(f32::NEG_INFINITY),
                1 => s[g.below(e)] = f32::NAN,
                2 => s[g.below(e)] = f32::from_bits(0xFFC0_0000), // -NaN
                3 => s[g.below(e)] = f32::INFINITY,
                4 => {
                    s[g.below(e)] = f32::INFINITY;
                    s[g.below(e)] = f32::INFINITY;
                }
                5 => s.fill(0.0),
                6 => {
                    for (i, x) in s.iter_mut().enumerate() {
                        *x = if i % 2 == 0 { -0.0 } else { 0.0 };
                    }
                }
                7 => s.fill(f32::INFINITY),
                _ => {}
            }
        }
        c
    }

    fn grouped(&self) -> GroupedConfig<'_> {
        GroupedConfig {
            k: self.k,
            scoring: self.scoring,
            bias: self.bias.as_deref(),
            n_group: self.n_group,
            topk_group: self.topk_group,
            group_score: self.group_score,
            renormalize: self.renorm,
            routed_scaling_factor: self.scale,
        }
    }

    fn cpu(&self) -> (Vec<u32>, Vec<f32>) {
        let n = self.t * self.k;
        let (mut ids, mut w) = (vec![0u32; n], vec![0.0f32; n]);
        fn run<T: medley_core::Element>(c: &GateCase, data: &[T], ids: &mut [u32], w: &mut [f32]) {
            let rows = Rows::dense(data, c.t, c.e).unwrap();
            match c.mode {
                0 => topk_softmax(rows, c.k, false, ids, w),
                1 => topk_softmax(rows, c.k, true, ids, w),
                2 => keep_topk_softmax(rows, c.k, ids, w),
                _ => grouped_topk(rows, &c.grouped(), ids, w),
            }
            .unwrap();
        }
        match self.dtype {
            1 => run(
                self,
                &self.logits.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>(),
                &mut ids,
                &mut w,
            ),
            2 => run(
                self,
                &self.logits.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>(),
                &mut ids,
                &mut w,
            ),
            _ => run(self, &self.logits, &mut ids, &mut w),
        }
        (ids, w)
    }

    fn gpu(&self, g: &Gpu, kernel: GateKernel) -> Result<(Vec<u32>, Vec<f32>), String> {
        let n = self.t * self.k;
        let input = match self.dtype {
            1 => Buffer::from_slice(&self.logits.iter().map(|&x| f16::from_f32(x)).collect::<Vec<_>>()),
            2 => Buffer::from_slice(&self.logits.iter().map(|&x| bf16::from_f32(x)).collect::<Vec<_>>()),
            _ => Buffer::from_slice(&self.logits),
        }?;
        let ids = Buffer::filled(n, POISON)?;
        let w = Buffer::filled(n, POISON)?;
        let mut bias_h = vec![0.0f32; self.bias_offset];
        bias_h.extend_from_slice(self.bias.as_deref().unwrap_or(&[0.0f32]));
        let bias = Buffer::from_slice(&bias_h)?;
        let te = self.t * self.e;
        let logits = match self.dtype {
            1 => RouterLogits::F16(DeviceRows::dense(input.view(te), self.t, self.e).unwrap()),
            2 => RouterLogits::BF16(DeviceRows::dense(input.view(te), self.t, self.e).unwrap()),
            _ => RouterLogits::F32(DeviceRows::dense(input.view(te), self.t, self.e).unwrap()),
        };
        let gating = match self.mode {
            0 => Gating::TopkSoftmax { renormalize: false },
            1 => Gating::TopkSoftmax { renormalize: true },
            2 => Gating::KeepTopkSoftmax,
            _ => Gating::Grouped {
                config: GroupedConfig {
                    bias: None,
                    ..self.grouped()
                },
                bias: self.bias.as_ref().map(|b| {
                    // SAFETY: [bias_offset, bias_offset + len) f32 lie inside `bias`.
                    unsafe {
                        medley_cuda::mem::DeviceSlice::from_raw(
                            bias.as_raw() + 4 * self.bias_offset as u64,
                            b.len(),
                        )
                    }
                }),
            },
        };
        gate_with(
            g.kernels(),
            logits,
            self.k,
            &gating,
            ids.view_mut(n),
            w.view_mut(n),
            g.stream(),
            kernel,
        )
        .map_err(|e| format!("launch: {e:?}"))?;
        g.synchronize().map_err(|e| format!("{e:?}"))?;
        let ids_h: Vec<u32> = ids.to_vec(n)?;
        let w_h: Vec<u32> = w.to_vec(n)?;
        if ids_h.contains(&POISON) || w_h.contains(&POISON) {
            return Err("an output was never written".into());
        }
        Ok((ids_h, w_h.into_iter().map(f32::from_bits).collect()))
    }
}

#[test]
fn gating_matches_the_core_bit_for_bit() {
    let n = moe_cases(400) as u64;
    let cases: Vec<GateCase> = (0..n).map(|s| GateCase::random(0x6A7E_0000 + s)).collect();
    // CPU half: the core's outputs are well formed (ids distinct, in range).
    for c in &cases {
        let (ids, w) = c.cpu();
        for r in 0..c.t {
            let row = &ids[r * c.k..(r + 1) * c.k];
            assert!(row.iter().all(|&i| (i as usize) < c.e), "{c:?}");
            let mut s = row.to_vec();
            s.sort();
            s.dedup();
            assert_eq!(s.len(), c.k);
            assert!(w[r * c.k..(r + 1) * c.k].iter().all(|x| x.is_nan() || *x >= 0.0));
        }
    }
    let Some(g) = gpu() else { return };
    let mut failures = Vec::new();
    let mut runs = 0;
    // Both kernels on every case (v2 where it applies), each against the core.
    let runs_of = |c: &GateCase| {
        let mut v = vec![GateKernel::V1];
        if c.e <= V2_MAX_EXPERTS {
            v.push(GateKernel::V2);
        }
        if c.v3_applies() {
            v.push(GateKernel::V3);
        }
        v
    };
    for (c, kernel) in cases
        .iter()
        .flat_map(|c| runs_of(c).into_iter().map(move |k| (c, k)))
    {
        let (ids, w) = c.cpu();
        runs += 1;
        match c.gpu(&g, kernel) {
            Err(e) => failures.push(format!("{kernel:?} E={} k={} mode={}: {e}", c.e, c.k, c.mode)),
            Ok((gi, gw)) => {
                if gi != ids || wb(&gw) != wb(&w) {
                    let at = (0..ids.len())
                        .find(|&i| gi[i] != ids[i] || wb(&gw[i..i + 1]) != wb(&w[i..i + 1]))
                        .unwrap();
                    failures.push(format!(
                        "{kernel:?} T={} E={} k={} mode={} dtype={} groups={}/{}: slot {at}: gpu ({}, {}) cpu ({}, {})",
                        c.t,
                        c.e,
                        c.k,
                        c.mode,
                        c.dtype,
                        c.topk_group,
                        c.n_group,
                        gi[at],
                        gw[at],
                        ids[at],
                        w[at]
                    ));
                }
            }
        }
    }
    eprintln!(
        "gating: {} cases, {runs} GPU runs (gate_topk, gate_topk_v2, gate_topk_v3), {} differ from the core",
        cases.len(),
        failures.len()
    );
    assert_none_failed(&failures);
}

#[test]
fn gate_v3_kernels_match_the_core_bit_for_bit() {
    let n = moe_cases(300) as u64;
    let cases: Vec<GateCase> = (0..n)
        .map(|s| {
            if s % 2 == 0 {
                GateCase::random_v3(0x7E53_0000 + s)
            } else {
                GateCase::random_grouped_v3(0x7E53_0000 + s)
            }
        })
        .collect();
    assert!(cases.iter().all(GateCase::v3_applies));
    let Some(g) = gpu() else { return };
    let mut failures = Vec::new();
    let (mut rows, mut special) = (0, 0);
    for c in &cases {
        let (ids, w) = c.cpu();
        rows += c.t;
        special += w.iter().filter(|x| x.is_nan() || **x == 0.0).count();
        // V3 forced, Auto (v2 until v3 has run on a GPU) and V2 beside them.
        for kernel in [GateKernel::V3, GateKernel::Auto, GateKernel::V2] {
            match c.gpu(&g, kernel) {
                Err(e) => failures.push(format!("{kernel:?} T={} E={} k={}: {e}", c.t, c.e, c.k)),
                Ok((gi, gw)) => {
                    if gi != ids || wb(&gw) != wb(&w) {
                        let at = (0..ids.len())
                            .find(|&i| gi[i] != ids[i] || wb(&gw[i..i + 1]) != wb(&w[i..i + 1]))
                            .unwrap();
                        let row = at / c.k;
                        failures.push(format!(
                            "{kernel:?} T={} E={} k={} mode={} dtype={} groups={}/{} {:?} bias={}: slot {at}: gpu ({}, {}) cpu ({}, {}); row {:?}",
                            c.t,
                            c.e,
                            c.k,
                            c.mode,
                            c.dtype,
                            c.topk_group,
                            c.n_group,
                            c.group_score,
                            c.bias.is_some(),
                            gi[at],
                            gw[at],
                            ids[at],
                            w[at],
                            &c.logits[row * c.e..(row * c.e + c.e).min(row * c.e + 16)]
                        ));
                    }
                }
            }
        }
    }
    eprintln!(
        "gate_v3: {} cases ({} grouped), {rows} rows ({special} NaN or zero weights), {} differ from the core",
        cases.len(),
        cases.iter().filter(|c| c.mode == 3).count(),
        failures.len()
    );
    assert_none_failed(&failures);
}

#[test]
fn gate_v3_kernels_refuse_what_they_do_not_take() {
    let Some(g) = gpu() else { return };
    let grouped = GateCase::random_grouped_v3(0x7E53_F001);
    let topk = GateCase::random_v3(0x7E53_F000);
    for (base, what, f) in [
        (
            &grouped,
            "grouped softmax scores",
            (|c: &mut GateCase| c.scoring = Scoring::Softmax) as fn(&mut GateCase),
        ),
        (&grouped, "misaligned bias", |c| {
            c.bias = Some(vec![0.125; c.e]);
            c.bias_offset = 1;
        }),
        (&grouped, "groups of 24 experts", |c| {
            c.e = 192;
            c.logits.resize(c.t * 192, 0.5);
            (c.n_group, c.topk_group, c.k) = (8, 3, c.k.min(24));
            c.bias = None;
        }),
        (&grouped, "grouped, E = 264", |c| {
            c.e = 264;
            c.logits.resize(c.t * 264, 0.0);
            (c.n_group, c.topk_group) = (1, 1);
            c.bias = None;
        }),
        (&topk, "f32 logits", |c| c.dtype = 0),
        (&topk, "E = 60", |c| {
            c.e = 60;
            c.k = c.k.min(60);
            c.logits.truncate(c.t * 60);
        }),
        (&topk, "E = 264", |c| {
            c.e = 264;
            c.logits.resize(c.t * 264, 0.0);
        }),
        (&topk, "softmax over E (mode 0)", |c| c.mode = 0),
    ] {
        let mut c = base.clone();
        c.t = c.t.max(1);
        c.logits.resize(c.t * c.e, 1.0);
        f(&mut c);
        assert!(!c.v3_applies(), "{what}");
        let err = c.gpu(&g, GateKernel::V3).unwrap_err();
        assert!(err.contains("Unsupported"), "{what}: {err}");
        // Auto runs another kernel, bit-exact too.
        let (gi, gw) = c.gpu(&g, GateKernel::Auto).unwrap();
        let (ids, w) = c.cpu();
        assert_eq!(gi, ids, "{what}");
        assert_eq!(wb(&gw), wb(&w), "{what}");
    }
}

/// A bias lives in device memory, so the core's check (finite values) is
/// the kernels' to make: every row that is neither NaN nor masked becomes
/// a NaN row (ids 0..k-1, NaN weights). All three grouped kernels.
#[test]
fn grouped_kernels_make_nan_rows_of_a_non_finite_bias() {
    let n = moe_cases(40) as u64;
    let Some(g) = gpu() else { return };
    let mut failures = Vec::new();
    let mut nan_rows = 0;
    for s in 0..n {
        let mut c = GateCase::random_grouped_v3(0xB1A5_0000 + s);
        c.t = c.t.max(1);
        c.logits.resize(c.t * c.e, 0.25);
        let mut bias = c.bias.clone().unwrap_or_else(|| vec![0.0; c.e]);
        c.bias = Some(bias.clone());
        let (mut ids, mut w) = c.cpu();
        for r in 0..c.t {
            let row = &c.logits[r * c.e..(r + 1) * c.e];
            let masked = row.iter().all(|&x| x == f32::NEG_INFINITY);
            if !masked && !row.iter().any(|x| x.is_nan()) {
                for j in 0..c.k {
                    (ids[r * c.k + j], w[r * c.k + j]) = (j as u32, f32::NAN);
                }
                nan_rows += 1;
            }
        }
        let mut rng = Gen(s);
        bias[rng.below(c.e)] = [f32::INFINITY, f32::NEG_INFINITY, f32::NAN][rng.below(3)];
        c.bias = Some(bias);
        for kernel in [GateKernel::V1, GateKernel::V2, GateKernel::V3, GateKernel::Auto] {
            match c.gpu(&g, kernel) {
                Err(e) => failures.push(format!("{kernel:?} E={} k={}: {e}", c.e, c.k)),
                Ok((gi, gw)) if gi != ids || wb(&gw) != wb(&w) => {
                    failures.push(format!("{kernel:?} T={} E={} k={}: differs", c.t, c.e, c.k))
                }
                Ok(_) => {}
            }
        }
    }
    eprintln!(
        "non-finite bias: {n} cases, {nan_rows} rows made NaN, {} runs differ",
        failures.len()
    );
    assert!(nan_rows > 0);
    assert_none_failed(&failures);
}

#[test]
fn routing_plan_permute_and_combine_match_the_core() {
    let mut rng = Gen(0x9047);
    let mut failures = Vec::new();
    let g = gpu();
    let n = moe_cases(120);
    for case in 0..n.min(120) {
        let t = [0usize, 1, 2, 7, 33, 257, 1000, 4096][rng.below(8)];
        let k = 1 + rng.below(8);
        let experts = [1usize, 3, 8, 60, 256, 1000][rng.below(6)];
        let first = rng.below(experts) as u32;
        let last = (first as usize + 1 + rng.below(experts - first as usize)) as u32;
        let range = if rng.chance(0.5) {
            ExpertRange::all(experts)
        } else {
            ExpertRange { first, last }
        };
        let block_m = [1usize, 4, 16, 64, 128][rng.below(5)];
        let n = t * k;
        let ids: Vec<u32> = (0..n)
            .map(|_| {
                if rng.chance(0.05) {
                    NO_EXPERT
                } else {
                    rng.below(experts) as u32
                }
            })
            .collect();
        let l = range.len();
        let (len, blocks) = block_padded_len(n, l, block_m).unwrap();
        let (mut s, mut be, mut off, mut inv) = (
            vec![0u32; len],
            vec![0u32; blocks],
            vec![0u64; l + 1],
            vec![0u32; n],
        );
        let total = align_block_size(
            &ids,
            experts,
            range,
            block_m,
            &mut s,
            &mut be,
            &mut off,
            Some(&mut inv),
        )
        .unwrap();
        // Token rows and expert outputs (bf16), routing weights.
        let h = [1usize, 8, 24, 100, 256][rng.below(5)];
        let x: Vec<bf16> = (0..t * h)
            .map(|_| bf16::from_f32(rng.range(-2.0, 2.0) as f32))
            .collect();
        let y: Vec<bf16> = (0..len * h)
            .map(|_| bf16::from_f32(rng.range(-2.0, 2.0) as f32))
            .collect();
        let w: Vec<f32> = (0..n)
            .map(|_| {
                if rng.chance(0.1) {
                    0.0
                } else {
                    rng.range(0.0, 1.0) as f32
                }
            })
            .collect();
        // CPU references of permute and combine (simple loops, the kernels'
        // documented arithmetic).
        let mut xp = vec![bf16::from_f32(0.0); len * h];
        for p in 0..(total as usize) {
            if (s[p] as usize) < n {
                let tok = s[p] as usize / k;
                xp[p * h..(p + 1) * h].copy_from_slice(&x[tok * h..(tok + 1) * h]);
            }
        }
        let mut out = vec![0.0f32; t * h];
        for tok in 0..t {
            for c in 0..h {
                let mut acc = 0.0f32;
                for j in 0..k {
                    let (pos, wj) = (inv[tok * k + j], w[tok * k + j]);
                    if pos != u32::MAX && wj != 0.0 {
                        acc += wj * y[pos as usize * h + c].to_f32();
                    }
                }
                out[tok * h + c] = acc;
            }
        }
        let Some(g) = g.as_ref() else { continue };
        let run = || -> Result<Vec<String>, String> {
            let mut f = Vec::new();
            let d_ids = Buffer::from_slice(&ids)?;
            let (ds, dbe, doff, dinv, dtot) = (
                Buffer::filled(len, POISON)?,
                Buffer::filled(blocks, POISON)?,
                Buffer::filled(2 * (l + 1), POISON)?,
                Buffer::filled(n, POISON)?,
                Buffer::filled(1, POISON)?,
            );
            let o = AlignOutput {
                sorted_ids: ds.view_mut(len),
                block_experts: dbe.view_mut(blocks),
                total: dtot.view_mut(1),
                offsets: Some(doff.view_mut(l + 1)),
                inverse: Some(dinv.view_mut(n)),
            };
            align(g.kernels(), d_ids.view(n), experts, range, block_m, o, g.stream())
                .map_err(|e| format!("{e:?}"))?;
            let dx = Buffer::from_slice(&x)?;
            let dxp = Buffer::filled(len * h, 0x7FA5u16)?;
            permute(
                g.kernels(),
                DeviceMatrix::BF16(DeviceRows::dense(dx.view(t * h), t, h).unwrap()),
                k,
                ds.view(len),
                dtot.view(1),
                DeviceMatrixMut::BF16(DeviceRowsMut::dense(dxp.view_mut(len * h), len, h).unwrap()),
                g.stream(),
            )
            .map_err(|e| format!("{e:?}"))?;
            let dy = Buffer::from_slice(&y)?;
            let dw = Buffer::from_slice(&w)?;
            let dout = Buffer::filled(t * h, POISON)?;
            combine(
                g.kernels(),
                DeviceMatrix::BF16(DeviceRows::dense(dy.view(len * h), len, h).unwrap()),
                k,
                dinv.view(n),
                dw.view(n),
                DeviceRowsMut::dense(dout.view_mut(t * h), t, h).unwrap(),
                g.stream(),
            )
            .map_err(|e| format!("{e:?}"))?;
            g.synchronize().map_err(|e| format!("{e:?}"))?;
            if ds.to_vec::<u32>(len)? != s {
                f.push("sorted_ids".into());
            }
            if dbe.to_vec::<u32>(blocks)? != be {
                f.push("block_experts".into());
            }
            if dtot.to_vec::<u32>(1)?[0] as u64 != total {
                f.push("total".into());
            }
            if doff.to_vec::<u64>(l + 1)? != off {
                f.push("offsets".into());
            }
            if dinv.to_vec::<u32>(n)? != inv {
                f.push("inverse".into());
            }
            let gxp: Vec<u16> = dxp.to_vec(len * h)?;
            if gxp != xp.iter().map(|v| v.to_bits()).collect::<Vec<_>>() {
                f.push("permute".into());
            }
            let gout: Vec<u32> = dout.to_vec(t * h)?;
            if gout != out.iter().map(|v| v.to_bits()).collect::<Vec<_>>() {
                f.push("combine".into());
            }
            Ok(f)
        };
        match run() {
            Ok(f) if f.is_empty() => {}
            Ok(f) => failures.push(format!(
                "case {case} T={t} k={k} E={experts} {range:?} bm={block_m} H={h}: {f:?}"
            )),
            Err(e) => failures.push(format!("case {case}: {e}")),
        }
    }
    if g.is_some() {
        eprintln!(
            "routing: {} cases on the GPU, {} differ from the core",
            n.min(120),
            failures.len()
        );
    }
    assert_none_failed(&failures);
}
