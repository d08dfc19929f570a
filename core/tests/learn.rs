#![allow(clippy::needless_range_loop)]
//! `learn`: target log-probabilities, EM, Newton and posterior weights
//! against direct f64 references, plus the documented errors.

mod common;

use common::{Gen, NEG_INF, log_softmax};
use medley_core::ensemble::{Logits, Model};
use medley_core::learn::{
    EmOptions, MAX_NEWTON_MODELS, NewtonOptions, PosteriorOptions, fit_linear_em, fit_log_linear_newton,
    posterior_weights, target_log_probs,
};
use medley_core::{Error, Rows, RowsMut, bf16, f16};
use proptest::prelude::*;

const SENTINEL: f32 = 12345.0;

// ---------------------------------------------------------------------------
// References.

/// Mean log-likelihood of a linear mixture with weights `w` on a table.
fn ref_mix_ll(table: &[f32], m: usize, w: &[f64]) -> f64 {
    let rows = table.len() / m;
    let mut ll = 0.0;
    for b in 0..rows {
        let p: f64 = (0..m).map(|i| w[i] * (table[b * m + i] as f64).exp()).sum();
        ll += p.ln();
    }
    ll / rows as f64
}

/// Per-model f64 features `x_m(v) = z_m(v) / T_m` of row `b`.
struct RefLL {
    /// feats[b][m][v]
    feats: Vec<Vec<Vec<f64>>>,
    targets: Vec<usize>,
}

impl RefLL {
    fn nll(&self, c: &[f64]) -> f64 {
        let mut t = 0.0;
        for (b, f) in self.feats.iter().enumerate() {
            let v = f[0].len();
            let u: Vec<f64> = (0..v)
                .map(|j| (0..c.len()).map(|i| c[i] * f[i][j]).sum())
                .collect();
            let mx = u.iter().cloned().fold(NEG_INF, f64::max);
            let lse = mx + u.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
            t += lse - u[self.targets[b]];
        }
        t / self.feats.len() as f64
    }

    fn grad(&self, c: &[f64]) -> Vec<f64> {
        let m = c.len();
        let mut g = vec![0.0; m];
        for (b, f) in self.feats.iter().enumerate() {
            let v = f[0].len();
            let u: Vec<f64> = (0..v).map(|j| (0..m).map(|i| c[i] * f[i][j]).sum()).collect();
            let mx = u.iter().cloned().fold(NEG_INF, f64::max);
            let e: Vec<f64> = u.iter().map(|x| (x - mx).exp()).collect();
            let s: f64 = e.iter().sum();
            for i in 0..m {
                let ex: f64 = (0..v).map(|j| e[j] * f[i][j]).sum::<f64>() / s;
                g[i] += ex - f[i][self.targets[b]];
            }
        }
        g.iter().map(|x| x / self.feats.len() as f64).collect()
    }
}

// ---------------------------------------------------------------------------
// target_log_probs.

struct TlpCase {
    b: usize,
    v: usize,
    vms: Vec<usize>,
    strides: Vec<usize>,
    temps: Vec<f32>,
    data: Vec<Vec<f32>>,
    dtypes: Vec<u8>,
    targets: Vec<u32>,
}

impl TlpCase {
    fn generate(seed: u64) -> TlpCase {
        let mut g = Gen(seed);
        let m = 1 + g.below(4);
        let b = 1 + g.below(5);
        let v = 1 + g.below(40);
        let vms: Vec<usize> = (0..m)
            .map(|_| if g.chance(0.4) { 1 + g.below(v) } else { v })
            .collect();
        let strides: Vec<usize> = vms.iter().map(|&x| x + g.below(3)).collect();
        let temps: Vec<f32> = (0..m)
            .map(|_| {
                if g.chance(0.5) {
                    1.0
                } else {
                    g.range(0.3, 3.0) as f32
                }
            })
            .collect();
        let p_mask = if g.chance(0.5) { 0.0 } else { 0.2 };
        let data = (0..m)
            .map(|i| {
                (0..(b - 1) * strides[i] + vms[i])
                    .map(|_| g.logit(12.0, p_mask))
                    .collect()
            })
            .collect();
        let dtypes = (0..m).map(|_| g.below(3) as u8).collect();
        let targets = (0..b).map(|_| g.below(v) as u32).collect();
        TlpCase {
            b,
            v,
            vms,
            strides,
            temps,
            data,
            dtypes,
            targets,
        }
    }
}

/// Logit data of one model in its element type, as f32 after the round trip.
enum Data {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl Data {
    fn new(x: &[f32], dtype: u8) -> Data {
        match dtype {
            0 => Data::F32(x.to_vec()),
            1 => Data::F16(x.iter().map(|&v| f16::from_f32(v)).collect()),
            _ => Data::BF16(x.iter().map(|&v| bf16::from_f32(v)).collect()),
        }
    }
    fn widened(&self) -> Vec<f32> {
        match self {
            Data::F32(d) => d.clone(),
            Data::F16(d) => d.iter().map(|v| v.to_f32()).collect(),
            Data::BF16(d) => d.iter().map(|v| v.to_f32()).collect(),
        }
    }
    fn logits(&self, rows: usize, len: usize, stride: usize) -> Logits<'_> {
        match self {
            Data::F32(d) => Rows::new(&d[..], rows, len, stride).unwrap().into(),
            Data::F16(d) => Rows::new(&d[..], rows, len, stride).unwrap().into(),
            Data::BF16(d) => Rows::new(&d[..], rows, len, stride).unwrap().into(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn target_log_probs_matches_f64_log_softmax(seed in any::<u64>()) {
        let c = TlpCase::generate(seed);
        let m = c.vms.len();
        let datas: Vec<Data> = (0..m).map(|i| Data::new(&c.data[i], c.dtypes[i])).collect();
        let models: Vec<Model> = (0..m)
            .map(|i| Model {
                logits: datas[i].logits(c.b, c.vms[i], c.strides[i]),
                temperature: c.temps[i],
            })
            .collect();
        let mut table = vec![SENTINEL; c.b * m];
        let rep = target_log_probs(&models, &c.targets, c.v, RowsMut::dense(&mut table, c.b, m).unwrap()).unwrap();
        let mut masked = 0;
        for b in 0..c.b {
            let y = c.targets[b] as usize;
            let mut all_inf = true;
            for i in 0..m {
                let w = datas[i].widened();
                let row: Vec<f64> = w[b * c.strides[i]..b * c.strides[i] + c.vms[i]].iter().map(|&x| x as f64).collect();
                let lp = log_softmax(&row, c.temps[i] as f64);
                let want = if y < c.vms[i] { lp[y] } else { NEG_INF };
                let got = table[b * m + i] as f64;
                if want == NEG_INF {
                    prop_assert_eq!(got, NEG_INF, "row {} model {}", b, i);
                } else {
                    all_inf = false;
                    prop_assert!((got - want).abs() <= 2e-5 * (1.0 + want.abs()), "row {b} model {i}: {got} vs {want}");
                }
            }
            masked += all_inf as usize;
        }
        prop_assert_eq!(rep.masked_rows, masked);
        prop_assert_eq!(rep.nan_rows, 0);
    }
}

#[test]
fn target_log_probs_nan_and_inf_rows_are_nan_entries() {
    let a = [1.0f32, f32::NAN, 0.0, 1.0, 2.0, 3.0, 0.0, f32::INFINITY, 0.0];
    let b = [0.0f32, 0.0, 0.0, 1.0, 1.0, 1.0, 2.0, 2.0, 2.0];
    let models = [
        Model::new(Rows::dense(&a, 3, 3).unwrap()),
        Model::new(Rows::dense(&b, 3, 3).unwrap()),
    ];
    let mut t = [0.0f32; 6];
    let rep = target_log_probs(&models, &[0, 0, 0], 3, RowsMut::dense(&mut t, 3, 2).unwrap()).unwrap();
    assert!(t[0].is_nan() && t[4].is_nan());
    assert!(t[1].is_finite() && t[2].is_finite() && t[3].is_finite() && t[5].is_finite());
    assert_eq!((rep.nan_rows, rep.masked_rows), (2, 0));
}

#[test]
fn target_log_probs_bad_arguments_leave_the_table_untouched() {
    let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [1.0f32, 2.0, 3.0, 4.0];
    let models = [
        Model::new(Rows::dense(&a, 2, 3).unwrap()),
        Model::new(Rows::dense(&b, 2, 2).unwrap()),
    ];
    let run = |targets: &[u32], vocab: usize, rows: usize, len: usize, models: &[Model]| {
        let mut t = vec![SENTINEL; rows * len];
        let r = target_log_probs(models, targets, vocab, RowsMut::dense(&mut t, rows, len).unwrap());
        assert!(t.iter().all(|&x| x == SENTINEL));
        r.unwrap_err()
    };
    assert_eq!(
        run(&[0, 3], 3, 2, 2, &models),
        Error::IndexOutOfBounds {
            arg: "targets",
            index: 1,
            bound: 3
        }
    );
    assert_eq!(
        run(&[0, 1], 3, 3, 2, &models),
        Error::LengthMismatch {
            arg: "table.rows",
            index: 0,
            expected: 2,
            got: 3
        }
    );
    assert_eq!(
        run(&[0, 1], 3, 2, 3, &models),
        Error::LengthMismatch {
            arg: "table.len",
            index: 0,
            expected: 2,
            got: 3
        }
    );
    assert_eq!(
        run(&[0, 1], 2, 2, 2, &models),
        Error::TooLarge {
            arg: "models.logits.len",
            index: 0,
            max: 2,
            got: 3
        }
    );
    assert_eq!(run(&[], 3, 0, 2, &[]), Error::Empty { arg: "models" });
    assert_eq!(
        run(&[0], 3, 1, 2, &models),
        Error::LengthMismatch {
            arg: "models.logits.rows",
            index: 0,
            expected: 1,
            got: 2
        }
    );
    let hot = [models[0].with_temperature(0.0), models[1]];
    assert_eq!(
        run(&[0, 1], 3, 2, 2, &hot),
        Error::OutOfRange {
            arg: "models.temperature",
            index: 0
        }
    );
}

// ---------------------------------------------------------------------------
// EM.

/// A B x M table of log-probabilities, some `-inf`, every row with a finite entry.
fn em_table(g: &mut Gen, b: usize, m: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; b * m];
    for r in 0..b {
        for i in 0..m {
            t[r * m + i] = if g.chance(0.1) {
                f32::NEG_INFINITY
            } else {
                // Models with different strengths: model i is good on some rows.
                -(g.range(0.0, 1.0).powi(2) * 6.0 * (1.0 + i as f64 * 0.3)) as f32
            };
        }
        if t[r * m..(r + 1) * m].iter().all(|&x| x == f32::NEG_INFINITY) {
            t[r * m + g.below(m)] = -1.0;
        }
    }
    t
}

fn em(
    table: &[f32],
    m: usize,
    init: Option<&[f32]>,
    tol: f64,
    cap: usize,
) -> (Vec<f32>, medley_core::learn::EmReport) {
    let mut w = vec![SENTINEL; m];
    let opts = EmOptions {
        tolerance: tol,
        max_iterations: cap,
    };
    let r = fit_linear_em(
        Rows::dense(table, table.len() / m, m).unwrap(),
        init,
        &opts,
        &mut w,
    )
    .unwrap();
    (w, r)
}

fn grid_best(table: &[f32], m: usize) -> f64 {
    let mut best = NEG_INF;
    match m {
        2 => {
            let n = 10_000;
            for k in 0..=n {
                let a = k as f64 / n as f64;
                best = best.max(ref_mix_ll(table, 2, &[a, 1.0 - a]));
            }
        }
        3 => {
            let n = 300;
            for i in 0..=n {
                for j in 0..=n - i {
                    let (a, b) = (i as f64 / n as f64, j as f64 / n as f64);
                    best = best.max(ref_mix_ll(table, 3, &[a, b, (1.0 - a - b).max(0.0)]));
                }
            }
        }
        _ => unreachable!(),
    }
    best
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn em_is_monotone_and_reaches_the_grid_optimum(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let m = 2 + g.below(2);
        let b = 5 + g.below(36);
        let t = em_table(&mut g, b, m);
        // Monotone: the run capped at k iterations is the prefix of the run
        // capped at k + 1.
        let mut prev = NEG_INF;
        for cap in 0..12 {
            let (w, r) = em(&t, m, None, 0.0, cap);
            prop_assert!(r.log_likelihood_after >= prev, "cap {cap}: {} < {prev}", r.log_likelihood_after);
            prop_assert!(r.log_likelihood_after >= r.log_likelihood_before);
            prop_assert!(r.iterations <= cap);
            prev = r.log_likelihood_after;
            let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            prop_assert!((ref_mix_ll(&t, m, &w64) - r.log_likelihood_after).abs() < 1e-6);
        }
        let (_, r0) = em(&t, m, None, 0.0, 0);
        prop_assert!((r0.log_likelihood_before - ref_mix_ll(&t, m, &vec![1.0 / m as f64; m])).abs() < 1e-12);
        // Optimum.
        let (w, r) = em(&t, m, None, 1e-14, 200_000);
        prop_assert!(w.iter().all(|&x| x >= 0.0));
        prop_assert!((w.iter().map(|&x| x as f64).sum::<f64>() - 1.0).abs() < 1e-6);
        let w64: Vec<f64> = w.iter().map(|&x| x as f64).collect();
        let fit = ref_mix_ll(&t, m, &w64);
        let best = grid_best(&t, m);
        prop_assert!(fit >= best - 1e-6, "EM {fit} (report {}, {} iterations) below grid {best}", r.log_likelihood_after, r.iterations);
    }
}

#[test]
fn em_keeps_zero_initial_weights_and_normalizes() {
    let t = [-0.1f32, -2.0, -1.0, -0.5, -2.0, -0.2, -3.0, -0.1, -0.3];
    let (w, r) = em(&t, 3, Some(&[2.0, 0.0, 2.0]), 1e-12, 1000);
    assert_eq!(w[1], 0.0);
    assert!((w[0] + w[2] - 1.0).abs() < 1e-6);
    assert!(r.converged);
    // Cap 0: the normalized initial weights.
    let (w, r) = em(&t, 3, Some(&[2.0, 1.0, 1.0]), 1e-12, 0);
    assert_eq!(w, [0.5, 0.25, 0.25]);
    assert_eq!((r.iterations, r.converged), (0, false));
    assert_eq!(r.log_likelihood_before, r.log_likelihood_after);
}

#[test]
fn em_finds_a_dominant_model() {
    // Model 0 is uniformly better: the optimum is at the vertex.
    let t = [-0.1f32, -5.0, -0.2, -4.0, -0.1, -6.0];
    let (w, r) = em(&t, 2, None, 1e-12, 100_000);
    assert!(w[0] > 0.999, "{w:?}");
    assert!(r.log_likelihood_after > r.log_likelihood_before);
}

#[test]
fn em_bad_arguments_leave_the_weights_untouched() {
    let good = [-0.1f32, -2.0, -1.0, -0.5];
    let opts = EmOptions::default();
    let run = |t: &[f32], rows: usize, m: usize, init: Option<&[f32]>, opts: &EmOptions, out_len: usize| {
        let mut w = vec![SENTINEL; out_len];
        let r = fit_linear_em(Rows::dense(t, rows, m).unwrap(), init, opts, &mut w);
        assert!(w.iter().all(|&x| x == SENTINEL));
        r.unwrap_err()
    };
    let nan = [-0.1f32, -2.0, f32::NAN, -0.5];
    assert_eq!(
        run(&nan, 2, 2, None, &opts, 2),
        Error::NonFinite {
            arg: "log_probs",
            index: 2
        }
    );
    let inf = [-0.1f32, f32::INFINITY, -1.0, -0.5];
    assert_eq!(
        run(&inf, 2, 2, None, &opts, 2),
        Error::NonFinite {
            arg: "log_probs",
            index: 1
        }
    );
    let dead = [-0.1f32, -2.0, f32::NEG_INFINITY, f32::NEG_INFINITY];
    assert_eq!(
        run(&dead, 2, 2, None, &opts, 2),
        Error::OutOfRange {
            arg: "log_probs",
            index: 1
        }
    );
    // Row 1 only has model 0, whose initial weight is 0.
    let half = [-0.1f32, -2.0, -1.0, f32::NEG_INFINITY];
    assert_eq!(
        run(&half, 2, 2, Some(&[0.0, 1.0]), &opts, 2),
        Error::OutOfRange {
            arg: "log_probs",
            index: 1
        }
    );
    assert_eq!(
        run(&good, 2, 2, Some(&[0.5, -0.1]), &opts, 2),
        Error::OutOfRange {
            arg: "initial",
            index: 1
        }
    );
    assert_eq!(
        run(&good, 2, 2, Some(&[f32::NAN, 1.0]), &opts, 2),
        Error::NonFinite {
            arg: "initial",
            index: 0
        }
    );
    assert_eq!(
        run(&good, 2, 2, Some(&[0.0, 0.0]), &opts, 2),
        Error::ZeroSum {
            arg: "initial",
            index: 0
        }
    );
    assert_eq!(
        run(&good, 2, 2, Some(&[1.0]), &opts, 2),
        Error::LengthMismatch {
            arg: "initial",
            index: 0,
            expected: 2,
            got: 1
        }
    );
    assert_eq!(
        run(&good, 2, 2, None, &opts, 3),
        Error::LengthMismatch {
            arg: "weights",
            index: 0,
            expected: 2,
            got: 3
        }
    );
    assert_eq!(
        run(&good, 0, 2, None, &opts, 2),
        Error::Empty { arg: "log_probs" }
    );
    assert_eq!(
        run(&good, 2, 0, None, &opts, 0),
        Error::Empty { arg: "log_probs" }
    );
    let bad = EmOptions {
        tolerance: -1.0,
        ..opts
    };
    assert_eq!(
        run(&good, 2, 2, None, &bad, 2),
        Error::OutOfRange {
            arg: "opts.tolerance",
            index: 0
        }
    );
    // A table from target_log_probs with a strided layout works as is.
    let strided = [-0.1f32, -2.0, 99.0, -1.0, -0.5, 99.0];
    let mut w = [0.0f32; 2];
    fit_linear_em(Rows::new(&strided, 2, 2, 3).unwrap(), None, &opts, &mut w).unwrap();
    assert!((w[0] + w[1] - 1.0).abs() < 1e-6);
}

// ---------------------------------------------------------------------------
// Newton.

/// `m` models of random logits over `v` tokens and `b` rows, targets drawn
/// from `softmax(sum_i truth_i z_i)`.
fn newton_case(g: &mut Gen, m: usize, b: usize, v: usize, truth: &[f64]) -> (Vec<Vec<f32>>, Vec<u32>) {
    let data: Vec<Vec<f32>> = (0..m)
        .map(|_| (0..b * v).map(|_| g.range(-2.0, 2.0) as f32).collect())
        .collect();
    let targets = (0..b)
        .map(|r| {
            let u: Vec<f64> = (0..v)
                .map(|j| (0..m).map(|i| truth[i] * data[i][r * v + j] as f64).sum())
                .collect();
            let mx = u.iter().cloned().fold(NEG_INF, f64::max);
            let p: Vec<f64> = u.iter().map(|x| (x - mx).exp()).collect();
            let s: f64 = p.iter().sum();
            let mut x = g.unit() * s;
            for (j, &pj) in p.iter().enumerate() {
                if x < pj {
                    return j as u32;
                }
                x -= pj;
            }
            (v - 1) as u32
        })
        .collect();
    (data, targets)
}

fn ref_of(data: &[Vec<f32>], targets: &[u32], v: usize, temps: &[f64]) -> RefLL {
    let b = targets.len();
    RefLL {
        feats: (0..b)
            .map(|r| {
                data.iter()
                    .zip(temps)
                    .map(|(d, &t)| d[r * v..(r + 1) * v].iter().map(|&x| x as f64 / t).collect())
                    .collect()
            })
            .collect(),
        targets: targets.iter().map(|&y| y as usize).collect(),
    }
}

fn newton(
    data: &[Vec<f32>],
    targets: &[u32],
    v: usize,
    opts: &NewtonOptions,
) -> (Vec<f32>, medley_core::learn::NewtonReport) {
    let b = targets.len();
    let models: Vec<Model> = data
        .iter()
        .map(|d| Model::new(Rows::dense(&d[..], b, v).unwrap()))
        .collect();
    let mut c = vec![SENTINEL; data.len()];
    let r = fit_log_linear_newton(&models, targets, None, opts, &mut c).unwrap();
    (c, r)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn newton_matches_a_grid_search_for_two_models(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let v = 5 + g.below(16);
        let b = 10 + g.below(41);
        let truth = [g.range(-1.0, 1.5), g.range(-1.0, 1.5)];
        let (data, targets) = newton_case(&mut g, 2, b, v, &truth);
        let rf = ref_of(&data, &targets, v, &[1.0, 1.0]);
        let (c, r) = newton(&data, &targets, v, &NewtonOptions::default());
        let c64 = [c[0] as f64, c[1] as f64];
        let fit = rf.nll(&c64);
        prop_assert!((fit - r.nll_after).abs() < 1e-6);
        prop_assert!(r.nll_after <= r.nll_before);
        prop_assert!((rf.nll(&[0.5, 0.5]) - r.nll_before).abs() < 1e-9);
        // Coarse grid over [-6, 6]^2, then a fine one around its best point.
        let (mut best, mut bc) = (f64::INFINITY, [0.0, 0.0]);
        for i in -60..=60 {
            for j in -60..=60 {
                let cc = [i as f64 * 0.1, j as f64 * 0.1];
                let f = rf.nll(&cc);
                if f < best { best = f; bc = cc; }
            }
        }
        let interior = bc[0].abs() < 5.9 && bc[1].abs() < 5.9;
        let centre = bc;
        for i in -50..=50 {
            for j in -50..=50 {
                let cc = [centre[0] + i as f64 * 0.002, centre[1] + j as f64 * 0.002];
                let f = rf.nll(&cc);
                if f < best { best = f; bc = cc; }
            }
        }
        prop_assert!(fit <= best + 1e-7, "Newton {fit} at {c:?} above grid {best} at {bc:?}");
        if interior && r.converged {
            prop_assert!((c64[0] - bc[0]).abs() < 0.02 && (c64[1] - bc[1]).abs() < 0.02, "{c:?} vs {bc:?}");
            let gr = rf.grad(&c64);
            prop_assert!(gr.iter().all(|x| x.abs() < 1e-5), "gradient {gr:?}");
        }
    }

    #[test]
    fn newton_never_increases_the_nll(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let m = 1 + g.below(4);
        let v = 3 + g.below(20);
        let b = 5 + g.below(40);
        let truth: Vec<f64> = (0..m).map(|_| g.range(-2.0, 2.0)).collect();
        let (data, targets) = newton_case(&mut g, m, b, v, &truth);
        let mut prev = f64::INFINITY;
        for cap in 0..8 {
            let opts = NewtonOptions { max_iterations: cap, tolerance: 0.0, ..Default::default() };
            let (_, r) = newton(&data, &targets, v, &opts);
            prop_assert!(r.nll_after <= prev, "cap {cap}: {} > {prev}", r.nll_after);
            prop_assert!(r.nll_after <= r.nll_before);
            prev = r.nll_after;
        }
    }

    #[test]
    fn newton_l2_shrinks_toward_zero(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let m = 1 + g.below(3);
        let v = 4 + g.below(10);
        let b = 10 + g.below(30);
        let truth: Vec<f64> = (0..m).map(|_| g.range(0.5, 2.0)).collect();
        let (data, targets) = newton_case(&mut g, m, b, v, &truth);
        let rf = ref_of(&data, &targets, v, &vec![1.0; m]);
        let mut prev = f64::INFINITY;
        for l2 in [0.0, 0.1, 1.0, 10.0] {
            let opts = NewtonOptions { l2, ..Default::default() };
            let (c, r) = newton(&data, &targets, v, &opts);
            let c64: Vec<f64> = c.iter().map(|&x| x as f64).collect();
            let norm: f64 = c64.iter().map(|x| x * x).sum::<f64>().sqrt();
            if l2 > 0.0 {
                prop_assert!(r.converged);
                prop_assert!(norm <= prev + 1e-6, "l2 {l2}: |c| = {norm} > {prev}");
                // Stationary point of the penalized objective.
                let gr = rf.grad(&c64);
                for i in 0..m {
                    prop_assert!((gr[i] + l2 * c64[i]).abs() < 1e-5);
                }
            }
            if r.converged || l2 > 0.0 {
                prev = norm;
            }
        }
    }
}

#[test]
fn newton_collinear_models_do_not_fail() {
    let mut g = Gen(7);
    let (v, b) = (8, 30);
    let (data, targets) = newton_case(&mut g, 1, b, v, &[1.3]);
    let (c1, r1) = newton(&data, &targets, v, &NewtonOptions::default());
    assert!(r1.converged);
    let twice = vec![data[0].clone(), data[0].clone()];
    let (c2, r2) = newton(&twice, &targets, v, &NewtonOptions::default());
    assert!(r2.converged, "{r2:?}");
    assert!((r2.nll_after - r1.nll_after).abs() < 1e-9);
    assert!((c2[0] + c2[1] - c1[0]).abs() < 1e-4, "{c2:?} vs {c1:?}");
    // Three copies and an L2 penalty: unique, symmetric solution.
    let thrice = vec![data[0].clone(), data[0].clone(), data[0].clone()];
    let opts = NewtonOptions {
        l2: 0.01,
        ..Default::default()
    };
    let (c3, r3) = newton(&thrice, &targets, v, &opts);
    assert!(r3.converged);
    assert!(
        (c3[0] - c3[1]).abs() < 1e-5 && (c3[1] - c3[2]).abs() < 1e-5,
        "{c3:?}"
    );
}

#[test]
fn newton_honours_temperatures_and_element_types() {
    let mut g = Gen(11);
    let (v, b) = (10, 40);
    let (data, targets) = newton_case(&mut g, 2, b, v, &[1.0, 0.5]);
    let (c, _) = newton(&data, &targets, v, &NewtonOptions::default());
    // Model 0 at temperature 2 in f16 (values exactly representable? no:
    // compare against the widened values' fit).
    let h: Vec<f16> = data[0].iter().map(|&x| f16::from_f32(x)).collect();
    let hw: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
    let models = [
        Model::new(Rows::dense(&h[..], b, v).unwrap()).with_temperature(2.0),
        Model::new(Rows::dense(&data[1][..], b, v).unwrap()),
    ];
    let mut ct = [0.0f32; 2];
    let r = fit_log_linear_newton(&models, &targets, None, &NewtonOptions::default(), &mut ct).unwrap();
    assert!(r.converged);
    let (cw, _) = newton(&[hw, data[1].clone()], &targets, v, &NewtonOptions::default());
    assert!((ct[0] - 2.0 * cw[0]).abs() < 1e-4, "{ct:?} vs {cw:?}");
    assert!((ct[1] - cw[1]).abs() < 1e-4);
    assert!((cw[0] - c[0]).abs() < 0.05); // f16 rounding moves the optimum a little
}

#[test]
fn newton_padded_vocabularies_use_the_common_tokens() {
    let mut g = Gen(3);
    let (v, b) = (6, 20);
    let (data, targets) = newton_case(&mut g, 2, b, v, &[1.0, 1.0]);
    let (c, _) = newton(&data, &targets, v, &NewtonOptions::default());
    // Model 1 with two extra tokens (stride 8): they are ignored.
    let mut wide = vec![0.0f32; b * 8];
    for r in 0..b {
        wide[r * 8..r * 8 + v].copy_from_slice(&data[1][r * v..(r + 1) * v]);
        wide[r * 8 + 6] = 50.0;
        wide[r * 8 + 7] = f32::NAN;
    }
    let models = [
        Model::new(Rows::dense(&data[0][..], b, v).unwrap()),
        Model::new(Rows::dense(&wide[..], b, 8).unwrap()),
    ];
    let mut cp = [0.0f32; 2];
    fit_log_linear_newton(&models, &targets, None, &NewtonOptions::default(), &mut cp).unwrap();
    assert_eq!(cp, [c[0], c[1]]);
}

#[test]
fn newton_bad_arguments_leave_the_coefficients_untouched() {
    let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
    let b = [1.0f32, 0.0, 2.0, 0.5];
    let m2 = [
        Model::new(Rows::dense(&a, 2, 3).unwrap()),
        Model::new(Rows::dense(&b, 2, 2).unwrap()),
    ];
    let run = |models: &[Model], targets: &[u32], init: Option<&[f32]>, opts: &NewtonOptions, n: usize| {
        let mut c = vec![SENTINEL; n];
        let r = fit_log_linear_newton(models, targets, init, opts, &mut c);
        assert!(c.iter().all(|&x| x == SENTINEL));
        r.unwrap_err()
    };
    let o = NewtonOptions::default();
    assert_eq!(
        run(&m2, &[0, 2], None, &o, 2),
        Error::IndexOutOfBounds {
            arg: "targets",
            index: 1,
            bound: 2
        }
    );
    let masked = [1.0f32, 2.0, 3.0, 4.0, f32::NEG_INFINITY, 6.0];
    let mm = [Model::new(Rows::dense(&masked, 2, 3).unwrap()), m2[1]];
    assert_eq!(
        run(&mm, &[0, 1], None, &o, 2),
        Error::NonFinite {
            arg: "models.logits",
            index: 1
        }
    );
    let nan = [f32::NAN, 2.0, 3.0, 4.0, 5.0, 6.0];
    let mn = [Model::new(Rows::dense(&nan, 2, 3).unwrap())];
    assert_eq!(
        run(&mn, &[0, 1], None, &o, 1),
        Error::NonFinite {
            arg: "models.logits",
            index: 0
        }
    );
    let many = vec![m2[0]; MAX_NEWTON_MODELS + 1];
    assert_eq!(
        run(&many, &[0, 1], None, &o, MAX_NEWTON_MODELS + 1),
        Error::TooLarge {
            arg: "models",
            index: 0,
            max: MAX_NEWTON_MODELS,
            got: MAX_NEWTON_MODELS + 1
        }
    );
    assert_eq!(
        run(&m2, &[0, 1], None, &o, 3),
        Error::LengthMismatch {
            arg: "coefficients",
            index: 0,
            expected: 2,
            got: 3
        }
    );
    assert_eq!(
        run(&m2, &[0, 1], Some(&[1.0, f32::INFINITY]), &o, 2),
        Error::NonFinite {
            arg: "initial",
            index: 1
        }
    );
    assert_eq!(
        run(&m2, &[0, 1], Some(&[1.0]), &o, 2),
        Error::LengthMismatch {
            arg: "initial",
            index: 0,
            expected: 2,
            got: 1
        }
    );
    let neg = NewtonOptions { l2: -1.0, ..o };
    assert_eq!(
        run(&m2, &[0, 1], None, &neg, 2),
        Error::OutOfRange {
            arg: "opts.l2",
            index: 0
        }
    );
    let nan_tol = NewtonOptions {
        tolerance: f64::NAN,
        ..o
    };
    assert_eq!(
        run(&m2, &[0, 1], None, &nan_tol, 2),
        Error::NonFinite {
            arg: "opts.tolerance",
            index: 0
        }
    );
    assert_eq!(run(&[], &[0, 1], None, &o, 0), Error::Empty { arg: "models" });
    let e0 = [Model::new(Rows::<f32>::dense(&[], 0, 3).unwrap())];
    assert_eq!(run(&e0, &[], None, &o, 1), Error::Empty { arg: "targets" });
    assert_eq!(
        run(&m2, &[0, 1, 1], None, &o, 2),
        Error::LengthMismatch {
            arg: "models.logits.rows",
            index: 0,
            expected: 3,
            got: 2
        }
    );
}

// ---------------------------------------------------------------------------
// Posterior weights.

/// Water-filling floor by sorting: the smallest `k` weights go to `f`, the
/// rest scale by `(1 - k f) / rest`, with the smallest `k` that keeps the
/// rest at or above `f`.
fn ref_floor(w: &mut [f64], f: f64) {
    let m = w.len();
    let mut idx: Vec<usize> = (0..m).collect();
    idx.sort_by(|&a, &b| w[a].partial_cmp(&w[b]).unwrap());
    for k in 0..=m {
        let rest: f64 = idx[k..].iter().map(|&i| w[i]).sum();
        let scale = if rest > 0.0 {
            (1.0 - k as f64 * f) / rest
        } else {
            0.0
        };
        if k == m || (w[idx[k]] >= f && w[idx[k]] * scale >= f) {
            for (r, &i) in idx.iter().enumerate() {
                w[i] = if r < k { f } else { w[i] * scale };
            }
            return;
        }
    }
}

fn ref_posterior(t: &[f32], m: usize, prior: &[f64], window: usize, decay: f64, floor: f64) -> Vec<f64> {
    let rows = t.len() / m;
    let ps: f64 = prior.iter().sum();
    let mut out = vec![0.0; rows * m];
    for b in 0..rows {
        let mut s: Vec<f64> = prior.iter().map(|p| (p / ps).ln()).collect();
        for j in 1..=window.min(b) {
            let f = decay.powi(j as i32 - 1);
            if f == 0.0 {
                continue;
            }
            for i in 0..m {
                s[i] += f * t[(b - j) * m + i] as f64;
            }
        }
        let mx = s.iter().cloned().fold(NEG_INF, f64::max);
        let mut w: Vec<f64> = if mx == NEG_INF {
            prior.iter().map(|p| p / ps).collect()
        } else {
            let e: Vec<f64> = s.iter().map(|x| (x - mx).exp()).collect();
            let z: f64 = e.iter().sum();
            e.iter().map(|x| x / z).collect()
        };
        if floor > 0.0 {
            ref_floor(&mut w, floor);
        }
        out[b * m..(b + 1) * m].copy_from_slice(&w);
    }
    out
}

/// The n-gram example's hand-written posterior (core/examples/ngram.rs),
/// on a dense 2-column table.
fn ngram_posterior(t: &[f32], window: usize) -> Vec<f32> {
    let rows = t.len() / 2;
    let mut w = vec![0.0f32; rows * 2];
    let (mut la, mut lb) = (0.0f64, 0.0f64);
    let mut hist = std::collections::VecDeque::new();
    for i in 0..rows {
        let d = la - lb;
        let pa = 1.0 / (1.0 + (-d).exp());
        let pa = pa.clamp(0.01, 0.99);
        w[2 * i] = pa as f32;
        w[2 * i + 1] = (1.0 - pa) as f32;
        let (x, y) = (t[2 * i] as f64, t[2 * i + 1] as f64);
        la += x;
        lb += y;
        hist.push_back((x, y));
        if hist.len() > window {
            let (x, y) = hist.pop_front().unwrap();
            la -= x;
            lb -= y;
        }
    }
    w
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn posterior_weights_match_a_direct_f64_reference(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let m = 1 + g.below(4);
        let rows = g.below(30);
        let p_inf = if g.chance(0.5) { 0.0 } else { 0.05 };
        let t: Vec<f32> = (0..rows * m)
            .map(|_| if g.chance(p_inf) { f32::NEG_INFINITY } else { -(g.range(0.0, 4.0) as f32) })
            .collect();
        let prior: Option<Vec<f32>> = if g.chance(0.5) {
            None
        } else {
            let mut p: Vec<f32> = (0..m).map(|_| if g.chance(0.2) { 0.0 } else { g.range(0.1, 2.0) as f32 }).collect();
            if p.iter().all(|&x| x == 0.0) { p[0] = 1.0; }
            Some(p)
        };
        let opts = PosteriorOptions {
            window: g.below(12),
            decay: [1.0, 0.5, 0.0, g.unit() as f32][g.below(4)],
            floor: if g.chance(0.5) { 0.0 } else { (g.unit() / m as f64) as f32 },
        };
        let mut w = vec![SENTINEL; rows * m];
        posterior_weights(
            Rows::dense(&t, rows, m).unwrap(),
            prior.as_deref(),
            &opts,
            RowsMut::dense(&mut w, rows, m).unwrap(),
        ).unwrap();
        let p64: Vec<f64> = match &prior { None => vec![1.0; m], Some(p) => p.iter().map(|&x| x as f64).collect() };
        let want = ref_posterior(&t, m, &p64, opts.window, opts.decay as f64, opts.floor as f64);
        for b in 0..rows {
            let s: f64 = w[b * m..(b + 1) * m].iter().map(|&x| x as f64).sum();
            prop_assert!((s - 1.0).abs() < 1e-5);
            for i in 0..m {
                let (got, want) = (w[b * m + i] as f64, want[b * m + i]);
                prop_assert!((got - want).abs() < 1e-6, "row {b} model {i}: {got} vs {want}");
                prop_assert!(got >= opts.floor as f64 * (1.0 - 1e-6));
            }
        }
    }

    #[test]
    fn posterior_weights_reproduce_the_ngram_example(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let rows = 1 + g.below(400);
        // Smoothed n-gram log-probabilities: finite, sometimes very small.
        let t: Vec<f32> = (0..rows * 2).map(|_| -(g.range(0.0, 1.0).powi(3) * 12.0) as f32).collect();
        let mut w = vec![0.0f32; rows * 2];
        let opts = PosteriorOptions { window: 64, decay: 1.0, floor: 0.01 };
        posterior_weights(Rows::dense(&t, rows, 2).unwrap(), None, &opts, RowsMut::dense(&mut w, rows, 2).unwrap()).unwrap();
        let want = ngram_posterior(&t, 64);
        for i in 0..rows * 2 {
            prop_assert!((w[i] - want[i]).abs() <= 1e-6, "entry {i}: {} vs {}", w[i], want[i]);
        }
    }
}

#[test]
fn posterior_weights_bad_arguments_leave_the_weights_untouched() {
    let t = [-0.1f32, -2.0, -1.0, -0.5];
    let run = |t: &[f32], m: usize, prior: Option<&[f32]>, opts: PosteriorOptions, wr: usize, wl: usize| {
        let mut w = vec![SENTINEL; wr * wl];
        let r = posterior_weights(
            Rows::dense(t, t.len() / m.max(1), m).unwrap(),
            prior,
            &opts,
            RowsMut::dense(&mut w, wr, wl).unwrap(),
        );
        assert!(w.iter().all(|&x| x == SENTINEL));
        r.unwrap_err()
    };
    let d = PosteriorOptions::default();
    let nan = [-0.1f32, f32::NAN, -1.0, -0.5];
    assert_eq!(
        run(&nan, 2, None, d, 2, 2),
        Error::NonFinite {
            arg: "log_probs",
            index: 1
        }
    );
    let inf = [-0.1f32, -2.0, -1.0, f32::INFINITY];
    assert_eq!(
        run(&inf, 2, None, d, 2, 2),
        Error::NonFinite {
            arg: "log_probs",
            index: 3
        }
    );
    assert_eq!(
        run(&t, 2, None, d, 3, 2),
        Error::LengthMismatch {
            arg: "weights.rows",
            index: 0,
            expected: 2,
            got: 3
        }
    );
    assert_eq!(
        run(&t, 2, None, d, 2, 1),
        Error::LengthMismatch {
            arg: "weights.len",
            index: 0,
            expected: 2,
            got: 1
        }
    );
    let f = PosteriorOptions { floor: 0.6, ..d };
    assert_eq!(
        run(&t, 2, None, f, 2, 2),
        Error::OutOfRange {
            arg: "opts.floor",
            index: 0
        }
    );
    let dc = PosteriorOptions { decay: 1.5, ..d };
    assert_eq!(
        run(&t, 2, None, dc, 2, 2),
        Error::OutOfRange {
            arg: "opts.decay",
            index: 0
        }
    );
    let dn = PosteriorOptions { decay: f32::NAN, ..d };
    assert_eq!(
        run(&t, 2, None, dn, 2, 2),
        Error::NonFinite {
            arg: "opts.decay",
            index: 0
        }
    );
    assert_eq!(
        run(&t, 2, Some(&[0.0, 0.0]), d, 2, 2),
        Error::ZeroSum {
            arg: "prior",
            index: 0
        }
    );
    assert_eq!(
        run(&t, 2, Some(&[1.0, -1.0]), d, 2, 2),
        Error::OutOfRange {
            arg: "prior",
            index: 1
        }
    );
    assert_eq!(run(&[], 0, None, d, 0, 0), Error::Empty { arg: "log_probs" });
    // The exact floor 1/M is allowed: every weight becomes 1/M.
    let mut w = [0.0f32; 6];
    let t3 = [-0.1f32, -2.0, -5.0, -1.0, -0.5, -3.0];
    let third = PosteriorOptions {
        floor: 1.0 / 3.0,
        ..d
    };
    posterior_weights(
        Rows::dense(&t3, 2, 3).unwrap(),
        None,
        &third,
        RowsMut::dense(&mut w, 2, 3).unwrap(),
    )
    .unwrap();
    assert!(w.iter().all(|&x| (x - 1.0 / 3.0).abs() < 1e-6), "{w:?}");
}
