//! The task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA)
//! against an f64 reference of mergekit's semantics, the chunked/one-shot
//! identity, the DARE mask contract, and bad input.
//!
//! The reference takes its discrete decisions (masks, elected signs) the way
//! mergekit does on f32 data, and computes every value in f64.

#![allow(clippy::needless_range_loop)]

mod merge_util;

use medley_core::merge::gta::{
    Consensus, Divisor, Gta, GtaOptions, Rescale, Sparsify, TaskParams, Votes, merge,
};
use medley_core::merge::select::magnitude_key;
use medley_core::{Error, bf16, rng};
use merge_util::*;
use proptest::prelude::*;

/// f64 reference; returns (expected output, tolerance scale per element).
fn reference(
    models: &[Vec<f32>],
    base: &[f32],
    params: &[TaskParams],
    o: &GtaOptions,
) -> (Vec<f64>, Vec<f64>) {
    let n = base.len();
    let m = models.len();
    let unit = match (o.sparsify, o.row_len) {
        (Sparsify::Della, r) => r.unwrap_or(n),
        (Sparsify::Magnitude | Sparsify::Outliers, Some(r)) => r,
        _ => n,
    };
    let mut dt: Vec<Vec<f32>> = Vec::new();
    for (i, x) in models.iter().enumerate() {
        let p = params[i];
        let d: Vec<f32> = x.iter().zip(base).map(|(&x, &b)| x - b).collect();
        let mut keep = vec![true; n];
        let mut per = vec![1.0f32; n]; // per-element factor (DELLA 1/p)
        let dense = o.sparsify == Sparsify::None || p.density >= 1.0;
        if !dense {
            for r0 in (0..n).step_by(unit.max(1)) {
                let row = &d[r0..r0 + unit];
                match o.sparsify {
                    Sparsify::Magnitude => {
                        let mk = topk_mask(row, count(p.density, unit));
                        keep[r0..r0 + unit].copy_from_slice(&mk);
                    }
                    Sparsify::Outliers => {
                        let k = count(p.density, unit);
                        let top = count(p.gamma, unit).min(unit - k);
                        let lo = topk_mask(row, k + top);
                        let hi = topk_mask(row, top);
                        for j in 0..unit {
                            keep[r0 + j] = lo[j] && !hi[j];
                        }
                    }
                    Sparsify::Random => {
                        for j in 0..unit {
                            let g = (r0 + j) as u64;
                            keep[r0 + j] = !(rng::uniform(o.seed, [i as u32, o.tensor_id], g)
                                < (1.0 - p.density) as f32);
                        }
                    }
                    Sparsify::Della => {
                        let rk = ranks(row);
                        for j in 0..unit {
                            let pk = if unit > 1 {
                                (p.density - p.epsilon)
                                    + (rk[j] - 1) as f64 * (2.0 * p.epsilon / (unit - 1) as f64)
                            } else {
                                p.density
                            };
                            let g = (r0 + j) as u64;
                            keep[r0 + j] =
                                !(rng::uniform(o.seed, [i as u32, o.tensor_id], g) < (1.0 - pk) as f32);
                            per[r0 + j] = (1.0 / pk) as f32;
                        }
                    }
                    Sparsify::None => {}
                }
            }
        }
        let masked: Vec<f32> = (0..n).map(|j| if keep[j] { d[j] } else { 0.0 }).collect();
        let s: f32 = if dense {
            1.0
        } else {
            match o.rescale {
                Rescale::None => 1.0,
                Rescale::InverseKeep => {
                    if o.sparsify == Sparsify::Random {
                        (1.0 / p.density) as f32
                    } else {
                        1.0
                    }
                }
                r => {
                    let (b, a) = match r {
                        Rescale::L1 => (
                            d.iter().map(|&v| v.abs() as f64).sum::<f64>(),
                            masked.iter().map(|&v| v.abs() as f64).sum::<f64>(),
                        ),
                        Rescale::L2 => (
                            d.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt(),
                            masked.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt(),
                        ),
                        _ => (
                            d.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64)),
                            masked.iter().fold(0.0f64, |a, &v| a.max(v.abs() as f64)),
                        ),
                    };
                    if b < 1e-7 || a < 1e-7 { 1.0 } else { (b / a) as f32 }
                }
            }
        };
        let della_ik = o.sparsify == Sparsify::Della && o.rescale == Rescale::InverseKeep && !dense;
        dt.push(
            (0..n)
                .map(|j| {
                    let v = if della_ik && keep[j] {
                        masked[j] * per[j]
                    } else {
                        masked[j]
                    };
                    v * s
                })
                .collect(),
        );
    }
    let mut want = vec![0.0f64; n];
    let mut scale = vec![0.0f64; n];
    let wsum: f64 = params.iter().map(|p| p.weight as f64).sum();
    for j in 0..n {
        let w = |i: usize| params[i].weight;
        let (mut delta, mut div, mut mag) = (0.0f64, 0.0f64, 0.0f64);
        let mut nan = false;
        if o.consensus == Consensus::None {
            for i in 0..m {
                let u = w(i) as f64 * dt[i][j] as f64;
                delta += u;
                mag += u.abs();
            }
            div = if wsum.abs() < 1e-8 { 1.0 } else { wsum };
        } else {
            // f32 votes, as the implementation (and mergekit) elect them.
            let mut vote = 0.0f32;
            for i in 0..m {
                let v = if o.votes == Votes::Weighted {
                    w(i) * dt[i][j]
                } else {
                    dt[i][j]
                };
                nan |= v.is_nan();
                vote += if o.consensus == Consensus::Count {
                    (v > 0.0) as i32 as f32 - (v < 0.0) as i32 as f32
                } else {
                    v
                };
            }
            for i in 0..m {
                let v = if o.votes == Votes::Weighted {
                    w(i) * dt[i][j]
                } else {
                    dt[i][j]
                };
                let agree = if vote >= 0.0 { v > 0.0 } else { v < 0.0 };
                if agree {
                    let u = w(i) as f64 * dt[i][j] as f64;
                    delta += u;
                    mag += u.abs();
                    div += if o.divisor == Divisor::WeightSum {
                        w(i) as f64
                    } else {
                        1.0
                    };
                }
            }
            if div == 0.0 {
                div = 1.0;
            }
        }
        if o.normalize {
            delta /= div;
            mag /= div.abs();
        }
        delta *= o.lambda as f64;
        mag *= o.lambda.abs() as f64;
        want[j] = if nan { f64::NAN } else { base[j] as f64 + delta };
        scale[j] = base[j].abs() as f64 + mag;
    }
    (want, scale)
}

fn preset(k: u8, row_len: Option<usize>, seed: u64) -> GtaOptions {
    match k % 9 {
        0 => GtaOptions::task_arithmetic(),
        1 => GtaOptions::ties(),
        2 => GtaOptions::ties_paper(),
        3 => GtaOptions::dare_ties(seed, 7),
        4 => GtaOptions::dare_linear(seed, 3),
        5 => GtaOptions::breadcrumbs(),
        6 => GtaOptions::breadcrumbs_ties(),
        7 => GtaOptions::della(row_len, seed, 11),
        _ => GtaOptions::della_linear(row_len, seed, 0),
    }
}

/// One-shot merge through the public API.
fn one_shot(models: &[Vec<f32>], base: &[f32], params: &[TaskParams], o: &GtaOptions) -> Vec<f32> {
    let plan = Gta::new(base.len(), params, o).unwrap();
    let mut scratch = vec![0u32; plan.scratch_len()];
    let views: Vec<&[f32]> = models.iter().map(|x| &x[..]).collect();
    let mut out = vec![SENTINEL; base.len()];
    merge(&views, base, params, o, &mut scratch, &mut out).unwrap();
    out
}

/// Two-phase merge with the given chunk boundaries for the passes and the
/// apply (applied in reverse order, to show order does not matter).
fn chunked(
    models: &[Vec<f32>],
    base: &[f32],
    params: &[TaskParams],
    o: &GtaOptions,
    feed_cuts: &[usize],
    apply_cuts: &[usize],
) -> (Vec<f32>, usize) {
    let plan = Gta::new(base.len(), params, o).unwrap();
    let mut scratch = vec![0u32; plan.scratch_len()];
    let mut st = plan.stats(&mut scratch).unwrap();
    let mut passes = 0;
    while st.needs_pass() {
        for w in feed_cuts.windows(2) {
            let v: Vec<&[f32]> = models.iter().map(|x| &x[w[0]..w[1]]).collect();
            st.feed(&v, &base[w[0]..w[1]]).unwrap();
        }
        st.end_pass().unwrap();
        passes += 1;
    }
    let ready = st.finish().unwrap();
    let mut out = vec![SENTINEL; base.len()];
    let mut scratch = vec![0u32; plan.scratch_len()];
    for w in apply_cuts.windows(2).rev() {
        let v: Vec<&[f32]> = models.iter().map(|x| &x[w[0]..w[1]]).collect();
        ready
            .apply(&v, &base[w[0]..w[1]], w[0], &mut scratch, &mut out[w[0]..w[1]])
            .unwrap();
    }
    (out, passes)
}

#[derive(Debug, Clone)]
struct Case {
    models: Vec<Vec<f32>>,
    base: Vec<f32>,
    params: Vec<TaskParams>,
    opts: GtaOptions,
    unit: usize,
}

fn case(seed: u64, rows: usize, row_len: usize, m: usize, k: u8, variant: u8, tied: bool) -> Case {
    let n = rows * row_len;
    let mut r = Rng(seed);
    let base = vec(seed, n, 1.0);
    let models: Vec<Vec<f32>> = (0..m)
        .map(|i| {
            if tied {
                let g = grid(seed + 100 + i as u64, n, 4);
                base.iter().zip(&g).map(|(&b, &d)| b + d).collect()
            } else {
                near(&base, seed + 100 + i as u64, 0.05)
            }
        })
        .collect();
    let mut o = preset(k, Some(row_len), seed);
    // Variants: row-wise selection, count consensus, paper rescale, other
    // norms, flipped normalize, lambda.
    if variant & 1 != 0 && matches!(o.sparsify, Sparsify::Magnitude | Sparsify::Outliers) {
        o.row_len = Some(row_len);
    }
    if variant & 2 != 0 && o.consensus == Consensus::Sum {
        o.consensus = Consensus::Count;
    }
    if variant & 4 != 0 {
        o.rescale = match o.sparsify {
            Sparsify::Random | Sparsify::Della => Rescale::InverseKeep,
            Sparsify::None => Rescale::None,
            _ => [Rescale::L1, Rescale::L2, Rescale::Linf][r.below(3)],
        };
    }
    if variant & 8 != 0 && o.rescale == Rescale::L1 {
        o.rescale = [Rescale::L2, Rescale::Linf][r.below(2)];
    }
    if variant & 16 != 0 {
        o.normalize = !o.normalize;
    }
    if variant & 32 != 0 {
        o.lambda = 0.5 + r.unit().abs();
    }
    if o.sparsify == Sparsify::Della && variant & 64 != 0 {
        o.row_len = None;
    }
    let params: Vec<TaskParams> = (0..m)
        .map(|_| {
            let d = if r.below(6) == 0 {
                1.0
            } else {
                0.3 + 0.6 * r.unit().abs() as f64
            };
            TaskParams::new(0.3 + r.unit().abs())
                .with_density(d)
                .with_gamma(if r.below(3) == 0 {
                    0.0
                } else {
                    0.1 * r.unit().abs() as f64
                })
                .with_epsilon(0.2 * d.min(1.0 - d).max(0.0))
        })
        .collect();
    let unit = match o.sparsify {
        Sparsify::Della | Sparsify::Magnitude | Sparsify::Outliers => o.row_len.unwrap_or(n),
        _ => 1,
    };
    Case {
        models,
        base,
        params,
        opts: o,
        unit,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(160))]

    #[test]
    fn matches_reference_and_any_chunking(
        seed in any::<u64>(), rows in 1usize..40, row_len in 1usize..48, m in 1usize..5,
        k in 0u8..9, variant in any::<u8>(), tied in any::<bool>(), parts in 0usize..8,
    ) {
        let c = case(seed, rows, row_len, m, k, variant, tied);
        let n = c.base.len();
        let out = one_shot(&c.models, &c.base, &c.params, &c.opts);
        let (want, scale) = reference(&c.models, &c.base, &c.params, &c.opts);
        assert_close(&out, &want, &scale, 3e-6 * m as f64, 1e-30);
        let row_local = c.unit > 1 || matches!(c.opts.sparsify, Sparsify::Della);
        let (fc, ac) = if row_local {
            (row_cuts(seed ^ 5, n, c.unit, parts), row_cuts(seed ^ 9, n, c.unit, parts))
        } else {
            (cuts(seed ^ 5, n, parts), cuts(seed ^ 9, n, parts))
        };
        let (ch, passes) = chunked(&c.models, &c.base, &c.params, &c.opts, &fc, &ac);
        assert_bits(&ch, &out);
        prop_assert!(passes <= 5);
    }

    #[test]
    fn half_precision_inputs_merge_like_their_f32_values(
        seed in any::<u64>(), n in 1usize..600, m in 1usize..4, k in 0u8..7,
    ) {
        let c = case(seed, n, 1, m, k, 0, false);
        let bm: Vec<Vec<bf16>> = c.models.iter().map(|x| x.iter().map(|&v| bf16::from_f32(v)).collect()).collect();
        let bb: Vec<bf16> = c.base.iter().map(|&v| bf16::from_f32(v)).collect();
        let wm: Vec<Vec<f32>> = bm.iter().map(|x| x.iter().map(|v| v.to_f32()).collect()).collect();
        let wb: Vec<f32> = bb.iter().map(|v| v.to_f32()).collect();
        let plan = Gta::new(n, &c.params, &c.opts).unwrap();
        let mut scratch = vec![0u32; plan.scratch_len()];
        let views: Vec<&[bf16]> = bm.iter().map(|x| &x[..]).collect();
        let mut out = vec![0.0f32; n];
        merge(&views, &bb, &c.params, &c.opts, &mut scratch, &mut out).unwrap();
        assert_bits(&out, &one_shot(&wm, &wb, &c.params, &c.opts));
    }
}

#[test]
fn ties_with_density_one_and_one_model_is_task_arithmetic() {
    let base = vec(1, 1000, 1.0);
    let x = near(&base, 2, 0.1);
    for lambda in [1.0f32, 0.7, 2.5] {
        let p = [TaskParams::new(1.0)];
        let ties = one_shot(
            std::slice::from_ref(&x),
            &base,
            &p,
            &GtaOptions {
                lambda,
                ..GtaOptions::ties()
            },
        );
        let ta = one_shot(
            std::slice::from_ref(&x),
            &base,
            &p,
            &GtaOptions {
                lambda,
                ..GtaOptions::task_arithmetic()
            },
        );
        assert_bits(&ties, &ta);
        // With any weight, TIES (normalized) equals normalized task arithmetic.
        let p = [TaskParams::new(0.37)];
        let ties = one_shot(
            std::slice::from_ref(&x),
            &base,
            &p,
            &GtaOptions {
                lambda,
                ..GtaOptions::ties()
            },
        );
        let ta = one_shot(
            std::slice::from_ref(&x),
            &base,
            &p,
            &GtaOptions {
                lambda,
                normalize: true,
                ..GtaOptions::task_arithmetic()
            },
        );
        assert_bits(&ties, &ta);
    }
}

#[test]
fn exactly_k_elements_survive_trimming() {
    // Integer task vectors with many equal magnitudes, none zero.
    let n = 1000;
    let base = vec![0.0f32; n];
    let g = grid(5, n, 3);
    let x: Vec<f32> = g.iter().map(|&v| if v == 0.0 { 0.25 } else { v }).collect();
    for d in [0.01, 0.2, 0.29, 0.5, 0.999, 1.0] {
        let p = [TaskParams::new(1.0).with_density(d)];
        let out = one_shot(std::slice::from_ref(&x), &base, &p, &GtaOptions::ties());
        let survivors = out.iter().filter(|&&v| v != 0.0).count();
        assert_eq!(survivors, count(d, n), "density {d}");
        // The survivors are the top-k by magnitude with ties to lower indices.
        let mask = topk_mask(&x, count(d, n));
        for j in 0..n {
            assert_eq!(out[j] != 0.0, mask[j]);
        }
        let plan = Gta::new(n, &p, &GtaOptions::ties()).unwrap();
        let mut scratch = vec![0u32; plan.scratch_len()];
        let mut st = plan.stats(&mut scratch).unwrap();
        while st.needs_pass() {
            st.feed(&[&x[..]], &base).unwrap();
            st.end_pass().unwrap();
        }
        let (lo, hi) = st.finish().unwrap().selection(0).unwrap();
        let kept = (0..n)
            .filter(|&j| lo.keeps(j as u64, x[j]) && !hi.keeps(j as u64, x[j]))
            .count();
        assert_eq!(kept, count(d, n));
    }
}

#[test]
fn dare_mask_is_the_documented_rule_and_keeps_about_d() {
    let n = 200_000;
    let base = vec![0.0f32; n];
    let x = vec![1.0f32; n];
    for (d, seed, tid) in [(0.3, 42u64, 0u32), (0.9, 7, 12), (0.05, u64::MAX, u32::MAX)] {
        let p = [TaskParams::new(1.0).with_density(d)];
        let o = GtaOptions {
            rescale: Rescale::None,
            ..GtaOptions::dare_linear(seed, tid)
        };
        let out = one_shot(std::slice::from_ref(&x), &base, &p, &o);
        let drop_p = (1.0 - d) as f32;
        let mut kept = 0;
        for j in 0..n {
            let dropped = rng::uniform(seed, [0, tid], j as u64) < drop_p;
            assert_eq!(out[j] == 0.0, dropped, "element {j}");
            kept += !dropped as usize;
        }
        let rate = kept as f64 / n as f64;
        let sigma = (d * (1.0 - d) / n as f64).sqrt();
        assert!((rate - d).abs() < 5.0 * sigma, "keep rate {rate} for density {d}");
        // The paper's rescale: survivors are 1/d.
        let o = GtaOptions {
            rescale: Rescale::InverseKeep,
            ..o
        };
        let out2 = one_shot(std::slice::from_ref(&x), &base, &p, &o);
        for j in 0..n {
            assert_eq!(out2[j], if out[j] == 0.0 { 0.0 } else { (1.0 / d) as f32 });
        }
    }
    // Different models and tensors draw different masks.
    let p = [TaskParams::new(1.0).with_density(0.5); 2];
    let o = GtaOptions {
        rescale: Rescale::None,
        ..GtaOptions::dare_linear(1, 0)
    };
    let plan = Gta::new(1000, &p, &o).unwrap();
    let _ = plan;
    let a: Vec<bool> = (0..1000).map(|j| rng::uniform(1, [0, 0], j) < 0.5).collect();
    let b: Vec<bool> = (0..1000).map(|j| rng::uniform(1, [1, 0], j) < 0.5).collect();
    let c: Vec<bool> = (0..1000).map(|j| rng::uniform(1, [0, 1], j) < 0.5).collect();
    assert!(a != b && a != c);
}

#[test]
fn dare_l1_rescale_matches_the_l1_norm() {
    let base = vec(3, 50_000, 1.0);
    let x = near(&base, 4, 0.01);
    let p = [TaskParams::new(1.0).with_density(0.1)];
    let out = one_shot(
        std::slice::from_ref(&x),
        &base,
        &p,
        &GtaOptions::dare_linear(9, 1),
    );
    let l1_in: f64 = x.iter().zip(&base).map(|(&x, &b)| ((x - b) as f64).abs()).sum();
    let l1_out: f64 = out
        .iter()
        .zip(&base)
        .map(|(&o, &b)| (o as f64 - b as f64).abs())
        .sum();
    assert!((l1_out / l1_in - 1.0).abs() < 1e-3, "{l1_out} vs {l1_in}");
}

#[test]
fn breadcrumbs_on_small_tensors_keeps_the_top_not_nothing() {
    // mergekit zeroes the whole task vector when floor(gamma n) == 0.
    let base = vec![0.0f32; 50];
    let x = vec(8, 50, 1.0);
    for gamma in [0.0, 0.01] {
        let p = [TaskParams::new(1.0).with_density(0.5).with_gamma(gamma)];
        let out = one_shot(std::slice::from_ref(&x), &base, &p, &GtaOptions::breadcrumbs());
        let mask = topk_mask(&x, 25);
        for j in 0..50 {
            assert_eq!(out[j], if mask[j] { x[j] } else { 0.0 });
        }
    }
    // With outliers: the 5 largest and the 20 smallest go.
    let p = [TaskParams::new(1.0).with_density(0.5).with_gamma(0.1)];
    let out = one_shot(std::slice::from_ref(&x), &base, &p, &GtaOptions::breadcrumbs());
    let top30 = topk_mask(&x, 30);
    let top5 = topk_mask(&x, 5);
    for j in 0..50 {
        assert_eq!(out[j], if top30[j] && !top5[j] { x[j] } else { 0.0 });
    }
    // n_keep + n_top > n: the top shrinks to n - n_keep.
    let p = [TaskParams::new(1.0).with_density(0.9).with_gamma(0.3)];
    let out = one_shot(std::slice::from_ref(&x), &base, &p, &GtaOptions::breadcrumbs());
    let top5 = topk_mask(&x, 5);
    assert_eq!(out.iter().filter(|&&v| v != 0.0).count(), 45);
    for j in 0..50 {
        assert_eq!(out[j] == 0.0, top5[j]);
    }
}

#[test]
fn zero_task_vectors_give_the_base() {
    let base = vec(11, 300, 1.0);
    for k in 0..9 {
        let o = preset(k, Some(30), 5);
        let p = [TaskParams::new(0.5).with_density(0.5).with_epsilon(0.1); 3];
        let out = one_shot(&[base.clone(), base.clone(), base.clone()], &base, &p, &o);
        assert_bits(&out, &base);
    }
}

#[test]
fn della_rows_of_one_use_the_density() {
    // mergekit divides 0 by 0 for rows of length 1.
    let base = vec![0.0f32; 4000];
    let x = vec![1.0f32; 4000];
    let p = [TaskParams::new(1.0).with_density(0.4).with_epsilon(0.1)];
    let o = GtaOptions {
        rescale: Rescale::None,
        ..GtaOptions::della(Some(1), 3, 0)
    };
    let out = one_shot(std::slice::from_ref(&x), &base, &p, &o);
    for j in 0..4000 {
        assert_eq!(out[j] == 0.0, rng::uniform(3, [0, 0], j as u64) < 0.6f32);
    }
}

#[test]
fn nan_in_a_task_vector_makes_that_element_nan() {
    let base = vec![0.0f32; 8];
    let mut a = vec(1, 8, 1.0);
    let b = vec(2, 8, 1.0);
    a[3] = f32::NAN;
    let p = [TaskParams::new(1.0); 2];
    for o in [
        GtaOptions::ties(),
        GtaOptions::task_arithmetic(),
        GtaOptions {
            consensus: Consensus::Count,
            ..GtaOptions::ties()
        },
    ] {
        let out = one_shot(&[a.clone(), b.clone()], &base, &p, &o);
        assert!(out[3].is_nan());
        assert!(out.iter().enumerate().all(|(j, v)| j == 3 || v.is_finite()));
    }
}

#[test]
fn negative_weights_change_the_weighted_vote_not_the_paper_vote() {
    // mergekit issue #474: the vote uses w_i delta_i.
    let base = [0.0f32];
    let a = vec![1.0f32];
    let b = vec![-0.8f32];
    let p = [TaskParams::new(1.0), TaskParams::new(-2.0)];
    // Weighted: votes 1 and 1.6 -> both positive, both agree.
    let w = one_shot(&[a.clone(), b.clone()], &base, &p, &GtaOptions::ties());
    assert_eq!(w[0], (1.0f32 + 1.6) / (1.0 - 2.0));
    // Unweighted: votes 1 and -0.8 -> positive; only a agrees.
    let u = one_shot(&[a, b], &base, &p, &GtaOptions::ties_paper());
    assert_eq!(u[0], 1.0);
}

#[test]
fn bad_input_is_rejected_and_leaves_out_untouched() {
    let base = vec(1, 12, 1.0);
    let x = near(&base, 2, 0.1);
    let ok = [TaskParams::new(1.0).with_density(0.5)];
    let run = |models: &[&[f32]],
               base: &[f32],
               params: &[TaskParams],
               o: &GtaOptions,
               out_len: usize,
               scratch_len: usize| {
        let mut out = vec![SENTINEL; out_len];
        let mut scratch = vec![0u32; scratch_len];
        let e = merge(models, base, params, o, &mut scratch, &mut out).unwrap_err();
        assert!(out.iter().all(|&v| v == SENTINEL), "{e:?} wrote output");
        e
    };
    let t = GtaOptions::ties();
    let s = 1 << 16;
    let m = [&x[..]];
    let d = |v: f64| [TaskParams::new(1.0).with_density(v)];
    assert_eq!(
        run(&m, &base, &d(0.0), &t, 12, s),
        Error::OutOfRange {
            arg: "params.density",
            index: 0
        }
    );
    assert_eq!(
        run(&m, &base, &d(1.5), &t, 12, s),
        Error::OutOfRange {
            arg: "params.density",
            index: 0
        }
    );
    assert_eq!(
        run(&m, &base, &d(f64::NAN), &t, 12, s),
        Error::NonFinite {
            arg: "params.density",
            index: 0
        }
    );
    let g = [TaskParams::new(1.0).with_density(0.5).with_gamma(-0.1)];
    assert_eq!(
        run(&m, &base, &g, &GtaOptions::breadcrumbs(), 12, s),
        Error::OutOfRange {
            arg: "params.gamma",
            index: 0
        }
    );
    let e = [TaskParams::new(1.0).with_density(0.5).with_epsilon(0.5)];
    assert_eq!(
        run(&m, &base, &e, &GtaOptions::della(None, 0, 0), 12, s),
        Error::OutOfRange {
            arg: "params.epsilon",
            index: 0
        }
    );
    let w = [TaskParams::new(f32::INFINITY)];
    assert_eq!(
        run(&m, &base, &w, &t, 12, s),
        Error::NonFinite {
            arg: "params.weight",
            index: 0
        }
    );
    assert_eq!(
        run(
            &m,
            &base,
            &ok,
            &GtaOptions {
                lambda: f32::NAN,
                ..t
            },
            12,
            s
        ),
        Error::NonFinite {
            arg: "lambda",
            index: 0
        }
    );
    let zs = [TaskParams::new(1.0), TaskParams::new(-1.0)];
    let o = GtaOptions {
        normalize: true,
        ..GtaOptions::task_arithmetic()
    };
    assert_eq!(
        run(&[&x[..], &x[..]], &base, &zs, &o, 12, s),
        Error::ZeroSum {
            arg: "params.weight",
            index: 0
        }
    );
    assert_eq!(
        run(
            &m,
            &base,
            &ok,
            &GtaOptions {
                row_len: Some(5),
                ..t
            },
            12,
            s
        ),
        Error::OutOfRange {
            arg: "row_len",
            index: 0
        }
    );
    assert!(matches!(
        run(
            &m,
            &base,
            &ok,
            &GtaOptions {
                rescale: Rescale::InverseKeep,
                ..t
            },
            12,
            s
        ),
        Error::Unsupported { .. }
    ));
    assert_eq!(
        run(&[&x[..3]], &base, &ok, &t, 12, s),
        Error::LengthMismatch {
            arg: "models",
            index: 0,
            expected: 12,
            got: 3
        }
    );
    assert_eq!(run(&[], &base, &[], &t, 12, s), Error::Empty { arg: "models" });
    assert_eq!(
        run(&m, &base, &[ok[0], ok[0]], &t, 12, s),
        Error::LengthMismatch {
            arg: "params",
            index: 0,
            expected: 1,
            got: 2
        }
    );
    assert_eq!(
        run(&m, &base, &ok, &t, 11, s),
        Error::LengthMismatch {
            arg: "out",
            index: 0,
            expected: 12,
            got: 11
        }
    );
    assert_eq!(
        run(&m, &base, &ok, &t, 12, 5),
        Error::BufferTooShort {
            arg: "scratch",
            needed: 2048,
            got: 5
        }
    );
}

#[test]
fn streaming_protocol_errors() {
    let n = 64;
    let base = vec(1, n, 1.0);
    let x = near(&base, 2, 0.1);
    let p = [TaskParams::new(1.0).with_density(0.3)];
    let plan = Gta::new(n, &p, &GtaOptions::ties()).unwrap();
    let mut scratch = vec![0u32; plan.scratch_len()];
    let mut st = plan.stats(&mut scratch).unwrap();
    st.feed(&[&x[..10]], &base[..10]).unwrap();
    assert_eq!(
        st.end_pass().unwrap_err(),
        Error::LengthMismatch {
            arg: "base",
            index: 0,
            expected: n,
            got: 10
        }
    );
    assert!(matches!(
        st.feed(&[&x[..]], &base[..]),
        Err(Error::TooLarge { arg: "base", .. })
    ));
    assert_eq!(
        st.feed(&[&x[..3]], &base[..4]).unwrap_err(),
        Error::LengthMismatch {
            arg: "models",
            index: 0,
            expected: 4,
            got: 3
        }
    );
    assert!(matches!(
        st.feed::<f32>(&[], &base[..4]),
        Err(Error::LengthMismatch {
            arg: "models.count",
            ..
        })
    ));
    st.feed(&[&x[10..]], &base[10..]).unwrap();
    st.end_pass().unwrap();
    assert!(st.needs_pass());
    assert!(matches!(st.finish(), Err(Error::Unsupported { .. })));
    // Row-wise: chunks must be whole rows.
    let o = GtaOptions::della(Some(8), 1, 1);
    let p = [TaskParams::new(1.0).with_density(0.5).with_epsilon(0.1)];
    let plan = Gta::new(n, &p, &o).unwrap();
    let mut scratch = vec![0u32; plan.scratch_len()];
    let mut st = plan.stats(&mut scratch).unwrap();
    assert_eq!(
        st.feed(&[&x[..12]], &base[..12]).unwrap_err(),
        Error::OutOfRange {
            arg: "base",
            index: 0
        }
    );
    st.feed(&[&x[..]], &base[..]).unwrap();
    st.end_pass().unwrap();
    let ready = st.finish().unwrap();
    let mut out = vec![SENTINEL; 8];
    let mut scratch = vec![0u32; plan.scratch_len()];
    assert_eq!(
        ready
            .apply(&[&x[4..12]], &base[4..12], 4, &mut scratch, &mut out)
            .unwrap_err(),
        Error::OutOfRange {
            arg: "offset",
            index: 0
        }
    );
    assert!(matches!(
        ready.apply(&[&x[..8]], &base[..8], 60, &mut scratch, &mut out),
        Err(Error::TooLarge { arg: "offset", .. })
    ));
    assert!(out.iter().all(|&v| v == SENTINEL));
    let _ = magnitude_key(0.0);
}

#[test]
fn large_tensors_take_the_sampled_selection_path() {
    // Past SAMPLE_MIN the selections sample (the one-shot reads only the
    // sampled lines in pass 1); results must equal the reference and any
    // chunking, ties included.
    let n = (1 << 20) + 12_345;
    let base = vec(1, n, 1.0);
    let models: Vec<Vec<f32>> = (0..3)
        .map(|i| {
            if i == 2 {
                let g = grid(40, n, 30);
                base.iter().zip(&g).map(|(&b, &d)| b + d * 1e-3).collect()
            } else {
                near(&base, 10 + i as u64, 0.01)
            }
        })
        .collect();
    for opts in [GtaOptions::ties(), GtaOptions::breadcrumbs_ties()] {
        let params: Vec<TaskParams> = (0..3)
            .map(|i| {
                TaskParams::new(1.0)
                    .with_density(0.1 + 0.3 * i as f64)
                    .with_gamma(0.05)
            })
            .collect();
        let out = one_shot(&models, &base, &params, &opts);
        let (want, scale) = reference(&models, &base, &params, &opts);
        assert_close(&out, &want, &scale, 1e-5, 1e-30);
        let (ch, passes) = chunked(&models, &base, &params, &opts, &cuts(3, n, 7), &cuts(4, n, 3));
        assert_bits(&ch, &out);
        assert!(passes <= 4, "{passes} passes");
    }
}
