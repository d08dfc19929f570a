#![allow(clippy::needless_range_loop)]
//! Properties of `ensemble::combine` against the f64 reference in
//! `common`, plus fixed cases for every documented edge.

mod common;

use common::{
    Gen, RefMode, RefModel, assert_logprobs_close, combine_row as ref_row, plaus_margin, ref_disagreement,
    ref_uncertainty,
};
use medley_core::ensemble::{
    Config, Logits, MaskRule, Mode, Model, NO_TOKEN, Output, Plausibility, Weights, combine,
};
use medley_core::{Error, Rows, RowsMut, bf16, f16};
use proptest::prelude::*;

/// A randomly shaped problem: M models with their own vocab lengths and
/// strides, over B rows and V tokens.
#[derive(Debug, Clone)]
struct Case {
    m: usize,
    b: usize,
    v: usize,
    vms: Vec<usize>,
    strides: Vec<usize>,
    temps: Vec<f32>,
    data: Vec<Vec<f32>>,
    weights: Vec<f32>, // b x m when per_row, else m
    per_row: bool,
    mode: Mode,
    mask_rule: MaskRule,
    t_out: f32,
    plaus: Option<(usize, f32)>,
}

impl Case {
    fn generate(seed: u64, mode: Mode, max_v: usize) -> Case {
        let mut g = Gen(seed);
        let m = 1 + g.below(4);
        let b = 1 + g.below(3);
        let v = 1 + g.below(max_v);
        let vms: Vec<usize> = (0..m)
            .map(|_| if g.chance(0.3) { 1 + g.below(v) } else { v })
            .collect();
        let strides: Vec<usize> = vms
            .iter()
            .map(|&vm| vm + if g.chance(0.5) { g.below(5) } else { 0 })
            .collect();
        let temps: Vec<f32> = (0..m)
            .map(|_| {
                if g.chance(0.5) {
                    1.0
                } else {
                    g.range(0.3, 3.0) as f32
                }
            })
            .collect();
        let p_mask = if g.chance(0.5) { 0.0 } else { 0.1 };
        let data: Vec<Vec<f32>> = (0..m)
            .map(|i| {
                let n = (b - 1) * strides[i] + vms[i];
                (0..n).map(|_| g.logit(12.0, p_mask)).collect()
            })
            .collect();
        let per_row = g.chance(0.3);
        let nw = if per_row { b * m } else { m };
        let weights: Vec<f32> = (0..nw)
            .map(|_| match mode {
                Mode::Linear => {
                    if g.chance(0.2) {
                        0.0
                    } else {
                        g.range(0.05, 2.0) as f32
                    }
                }
                Mode::LogLinear => {
                    if g.chance(0.2) {
                        0.0
                    } else {
                        g.range(-1.5, 1.5) as f32
                    }
                }
            })
            .collect();
        let mut c = Case {
            m,
            b,
            v,
            vms,
            strides,
            temps,
            data,
            weights,
            per_row,
            mode,
            mask_rule: if g.chance(0.3) {
                MaskRule::Any
            } else {
                MaskRule::All
            },
            t_out: if g.chance(0.6) {
                1.0
            } else {
                g.range(0.5, 2.0) as f32
            },
            plaus: None,
        };
        if g.chance(0.3) {
            c.plaus = Some((g.below(m), [0.0, 0.05, 0.1, 0.5, 1.0][g.below(5)]));
        }
        // Linear weights need a positive sum in every row.
        if mode == Mode::Linear {
            for r in 0..(if per_row { b } else { 1 }) {
                if c.weights[r * m..(r + 1) * m].iter().all(|&w| w == 0.0) {
                    c.weights[r * m] = 1.0;
                }
            }
        }
        c
    }

    fn models<'a>(
        &self,
        f16s: &'a [Vec<f16>],
        bf16s: &'a [Vec<bf16>],
        data: &'a [Vec<f32>],
        dtype: u8,
    ) -> Vec<Model<'a>> {
        (0..self.m)
            .map(|i| {
                let logits: Logits<'a> = match dtype {
                    0 => Rows::new(&data[i][..], self.b, self.vms[i], self.strides[i])
                        .unwrap()
                        .into(),
                    1 => Rows::new(&f16s[i][..], self.b, self.vms[i], self.strides[i])
                        .unwrap()
                        .into(),
                    _ => Rows::new(&bf16s[i][..], self.b, self.vms[i], self.strides[i])
                        .unwrap()
                        .into(),
                };
                Model {
                    logits,
                    temperature: self.temps[i],
                }
            })
            .collect()
    }

    fn config(&self) -> Config<'_> {
        Config {
            mode: self.mode,
            weights: if self.per_row {
                Weights::PerRow(Rows::dense(&self.weights, self.b, self.m).unwrap())
            } else {
                Weights::PerModel(&self.weights)
            },
            out_temperature: self.t_out,
            plausibility: self.plaus.map(|(model, alpha)| Plausibility { model, alpha }),
            mask_rule: self.mask_rule,
        }
    }

    fn row_weights(&self, b: usize) -> Vec<f64> {
        let w = if self.per_row {
            &self.weights[b * self.m..(b + 1) * self.m]
        } else {
            &self.weights[..]
        };
        w.iter().map(|&x| x as f64).collect()
    }

    /// The reference models, from the values a given dtype actually holds.
    fn ref_models(&self, data: &[Vec<f32>]) -> Vec<RefModel> {
        (0..self.m)
            .map(|i| RefModel {
                rows: (0..self.b)
                    .map(|r| {
                        data[i][r * self.strides[i]..r * self.strides[i] + self.vms[i]]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    })
                    .collect(),
                t: self.temps[i] as f64,
            })
            .collect()
    }

    fn ref_mode(&self) -> RefMode {
        match self.mode {
            Mode::Linear => RefMode::Linear {
                mask_any: self.mask_rule == MaskRule::Any,
            },
            Mode::LogLinear => RefMode::LogLinear,
        }
    }
}

struct Run {
    lp: Vec<f32>,
    p: Vec<f32>,
    am: Vec<u32>,
    lz: Vec<f32>,
    /// entropy, top-1 probability, margin, disagreement (NaN-poisoned
    /// before the call; disagreement only in linear mode).
    unc: [Vec<f32>; 4],
    report: medley_core::Report,
}

fn run(models: &[Model<'_>], cfg: &Config<'_>, b: usize, v: usize) -> Result<Run, Error> {
    let mut lp = vec![f32::NAN; b * v];
    let mut p = vec![f32::NAN; b * v];
    let mut am = vec![0u32; b];
    let mut lz = vec![0.0f32; b];
    let poison = -12345.0f32;
    let [mut h, mut t1, mut mg, mut js] = [(); 4].map(|_| vec![poison; b]);
    let linear = cfg.mode == medley_core::ensemble::Mode::Linear;
    let out = Output {
        log_probs: Some(RowsMut::dense(&mut lp, b, v).unwrap()),
        probs: Some(RowsMut::dense(&mut p, b, v).unwrap()),
        argmax: Some(&mut am),
        log_normalizer: Some(&mut lz),
        entropy: Some(&mut h),
        top1_prob: Some(&mut t1),
        margin: Some(&mut mg),
        disagreement: linear.then_some(&mut js[..]),
    };
    let report = combine(models, cfg, out)?;
    Ok(Run {
        lp,
        p,
        am,
        lz,
        unc: [h, t1, mg, js],
        report,
    })
}

fn rounded<T: Copy>(data: &[Vec<f32>], f: impl Fn(f32) -> T) -> Vec<Vec<T>> {
    data.iter().map(|r| r.iter().map(|&x| f(x)).collect()).collect()
}

fn widen_all<T: Copy>(data: &[Vec<T>], f: impl Fn(T) -> f32) -> Vec<Vec<f32>> {
    data.iter().map(|r| r.iter().map(|&x| f(x)).collect()).collect()
}

fn check_against_reference(c: &Case, dtype: u8) -> Result<(), TestCaseError> {
    let f16s = rounded(&c.data, f16::from_f32);
    let bf16s = rounded(&c.data, bf16::from_f32);
    // The values each dtype holds, as f32, for the reference.
    let held: Vec<Vec<f32>> = match dtype {
        0 => c.data.clone(),
        1 => widen_all(&f16s, |x| x.to_f32()),
        _ => widen_all(&bf16s, |x| x.to_f32()),
    };
    let models = c.models(&f16s, &bf16s, &c.data, dtype);
    let r = run(&models, &c.config(), c.b, c.v).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
    let refs = c.ref_models(&held);
    if let Some((j, alpha)) = c.plaus {
        for b in 0..c.b {
            prop_assume!(plaus_margin(&refs[j], b, alpha as f64, c.v) > 1e-3);
        }
    }
    let mut masked = 0;
    for b in 0..c.b {
        let row = &r.lp[b * c.v..(b + 1) * c.v];
        let prow = &r.p[b * c.v..(b + 1) * c.v];
        let want = ref_row(
            &refs,
            b,
            &c.row_weights(b),
            c.ref_mode(),
            c.t_out as f64,
            c.plaus.map(|(j, a)| (j, a as f64)),
            c.v,
        );
        match want {
            None => {
                masked += 1;
                prop_assert!(
                    row.iter().all(|&x| x == f32::NEG_INFINITY),
                    "masked row {b}: {row:?}"
                );
                prop_assert!(prow.iter().all(|&x| x == 0.0));
                prop_assert_eq!(r.am[b], NO_TOKEN);
                prop_assert_eq!(r.lz[b], f32::NEG_INFINITY);
                for (k, u) in r.unc.iter().enumerate() {
                    if k < 3 || c.ref_mode() != RefMode::LogLinear {
                        prop_assert!(u[b].is_nan(), "masked row {b}: uncertainty {k} = {}", u[b]);
                    }
                }
            }
            Some((want, log_z)) => {
                assert_logprobs_close(row, &want, 2e-4, 2e-5, 1e-4).map_err(TestCaseError::fail)?;
                // Normalization of both outputs.
                let s: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
                prop_assert!((s - 1.0).abs() < 1e-5, "log-probs sum to {s}");
                let s: f64 = prow.iter().map(|&x| x as f64).sum();
                prop_assert!((s - 1.0).abs() < 1e-5, "probs sum to {s}");
                for (&l, &p) in row.iter().zip(prow) {
                    prop_assert!((l.exp() - p).abs() <= 1e-6 + 1e-6 * p);
                }
                // Argmax: a maximal token, lowest index among exact ties.
                let a = r.am[b] as usize;
                let mx = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                prop_assert_eq!(row[a], mx);
                prop_assert!(row[..a].iter().all(|&x| x < mx));
                prop_assert!(
                    (r.lz[b] as f64 - log_z).abs() < 1e-4 + 1e-5 * log_z.abs(),
                    "lz {} vs {log_z}",
                    r.lz[b]
                );
                // Uncertainty outputs against their f64 definitions.
                let (h, p1, mg) = ref_uncertainty(&want);
                let close =
                    |got: f32, want: f64, tol: f64| (got as f64 - want).abs() <= tol * (1.0 + want.abs());
                prop_assert!(
                    close(r.unc[0][b], h, 2e-4),
                    "row {b}: entropy {} vs {h}",
                    r.unc[0][b]
                );
                prop_assert!(
                    close(r.unc[1][b], p1, 2e-5),
                    "row {b}: top1 {} vs {p1}",
                    r.unc[1][b]
                );
                prop_assert!(
                    close(r.unc[2][b], mg, 2e-5),
                    "row {b}: margin {} vs {mg}",
                    r.unc[2][b]
                );
                if c.ref_mode() != RefMode::LogLinear {
                    let js = ref_disagreement(&refs, b, &c.row_weights(b), c.v).expect("a live model");
                    prop_assert!(
                        close(r.unc[3][b], js, 2e-4),
                        "row {b}: disagreement {} vs {js}",
                        r.unc[3][b]
                    );
                    prop_assert!(r.unc[3][b] >= 0.0);
                } else {
                    prop_assert_eq!(r.unc[3][b], -12345.0, "disagreement written in log-linear mode");
                }
            }
        }
    }
    prop_assert_eq!(r.report.masked_rows, masked);
    prop_assert_eq!(r.report.nan_rows, 0);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn linear_matches_reference(seed in any::<u64>(), dtype in 0u8..3) {
        check_against_reference(&Case::generate(seed, Mode::Linear, 70), dtype)?;
    }

    #[test]
    fn loglinear_matches_reference(seed in any::<u64>(), dtype in 0u8..3) {
        check_against_reference(&Case::generate(seed, Mode::LogLinear, 70), dtype)?;
    }
}

proptest! {
    // Rows longer than the internal tile (2048) exercise tile boundaries.
    #![proptest_config(ProptestConfig { cases: 12, ..ProptestConfig::default() })]

    #[test]
    fn long_rows_match_reference(seed in any::<u64>(), linear in any::<bool>(), dtype in 0u8..3) {
        let mode = if linear { Mode::Linear } else { Mode::LogLinear };
        let mut c = Case::generate(seed, mode, 6000);
        c.v = c.v.max(2049);
        c = Case { vms: c.vms.iter().map(|_| c.v).collect(), strides: c.vms.iter().map(|_| c.v).collect(), ..c };
        let mut g = Gen(seed ^ 1);
        c.data = (0..c.m).map(|_| (0..c.b * c.v).map(|_| g.logit(10.0, 0.02)).collect()).collect();
        check_against_reference(&c, dtype)?;
    }
}

fn simple_models(data: &[Vec<f32>], v: usize) -> Vec<Model<'_>> {
    data.iter()
        .map(|d| Model::new(Rows::dense(&d[..], d.len() / v, v).unwrap()))
        .collect()
}

fn gen_data(seed: u64, m: usize, b: usize, v: usize, p_mask: f64) -> Vec<Vec<f32>> {
    let mut g = Gen(seed);
    (0..m)
        .map(|_| (0..b * v).map(|_| g.logit(10.0, p_mask)).collect())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Linear with one-hot weights is that model's softmax.
    #[test]
    fn linear_one_hot_is_the_model(seed in any::<u64>(), m in 1usize..5, hot in 0usize..4, v in 1usize..100, t in 0.3f32..3.0) {
        let hot = hot % m;
        let data = gen_data(seed, m, 2, v, 0.05);
        let mut models = simple_models(&data, v);
        models[hot].temperature = t;
        let w: Vec<f32> = (0..m).map(|i| if i == hot { 2.5 } else { 0.0 }).collect();
        let r = run(&models, &Config::linear(&w), 2, v).unwrap();
        let mut want = vec![0.0f32; 2 * v];
        medley_core::softmax::log_softmax(Rows::dense(&data[hot][..], 2, v).unwrap(), t, RowsMut::dense(&mut want, 2, v).unwrap()).unwrap();
        for (g, w) in r.lp.iter().zip(&want) {
            prop_assert!((g == w) || (g - w).abs() < 2e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    /// Log-linear with lambda = (1, 0, ...) is model 0's softmax at T_0 * T_out.
    #[test]
    fn loglinear_unit_first_is_model_zero(seed in any::<u64>(), m in 1usize..5, v in 1usize..100, t in 0.3f32..3.0, t_out in 0.5f32..2.0) {
        let data = gen_data(seed, m, 2, v, 0.05);
        let mut models = simple_models(&data, v);
        models[0].temperature = t;
        let w: Vec<f32> = (0..m).map(|i| if i == 0 { 1.0 } else { 0.0 }).collect();
        let cfg = Config { out_temperature: t_out, ..Config::log_linear(&w) };
        let r = run(&models, &cfg, 2, v).unwrap();
        let mut want = vec![0.0f32; 2 * v];
        medley_core::softmax::log_softmax(Rows::dense(&data[0][..], 2, v).unwrap(), t * t_out, RowsMut::dense(&mut want, 2, v).unwrap()).unwrap();
        for (g, w) in r.lp.iter().zip(&want) {
            prop_assert!((g == w) || (g - w).abs() < 2e-5 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }

    /// A zero-weight model changes nothing (bit for bit), even if its logits are NaN:
    /// it is never read.
    #[test]
    fn zero_weight_model_is_skipped(seed in any::<u64>(), m in 1usize..4, v in 1usize..80, linear in any::<bool>()) {
        let mut data = gen_data(seed, m, 2, v, 0.05);
        let mut g = Gen(seed ^ 7);
        let w: Vec<f32> = (0..m).map(|_| if linear { g.range(0.1, 2.0) as f32 } else { g.range(-1.0, 1.0) as f32 }).collect();
        fn cfg_of(w: &[f32], linear: bool) -> Config<'_> {
            if linear { Config::linear(w) } else { Config::log_linear(w) }
        }
        let without = run(&simple_models(&data, v), &cfg_of(&w, linear), 2, v).unwrap();
        data.push(vec![f32::NAN; 2 * v]);
        let mut w2 = w.clone();
        w2.push(0.0);
        let with = run(&simple_models(&data, v), &cfg_of(&w2, linear), 2, v).unwrap();
        prop_assert_eq!(with.lp.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), without.lp.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        prop_assert_eq!(with.am, without.am);
        prop_assert_eq!(with.report, without.report);
    }

    /// f16 and bf16 inputs give exactly the result of their f32 upcasts.
    #[test]
    fn half_inputs_equal_their_upcasts(seed in any::<u64>(), linear in any::<bool>()) {
        let mode = if linear { Mode::Linear } else { Mode::LogLinear };
        let c = Case::generate(seed, mode, 100);
        let f16s = rounded(&c.data, f16::from_f32);
        let bf16s = rounded(&c.data, bf16::from_f32);
        for dtype in [1u8, 2] {
            let up: Vec<Vec<f32>> =
                if dtype == 1 { widen_all(&f16s, |x| x.to_f32()) } else { widen_all(&bf16s, |x| x.to_f32()) };
            let a = run(&c.models(&f16s, &bf16s, &c.data, dtype), &c.config(), c.b, c.v).unwrap();
            let b = run(&c.models(&f16s, &bf16s, &up, 0), &c.config(), c.b, c.v).unwrap();
            prop_assert_eq!(a.lp.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.lp.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
        }
    }

    /// Log-linear masking: -inf in any active model masks the token, for
    /// either coefficient sign; other tokens stay finite.
    #[test]
    fn loglinear_masking_rule(seed in any::<u64>(), v in 2usize..60, c1 in -2.0f32..2.0) {
        prop_assume!(c1 != 0.0);
        let mut data = gen_data(seed, 2, 1, v, 0.0);
        let mut g = Gen(seed);
        let masked: Vec<bool> = (0..v).map(|_| g.chance(0.3)).collect();
        prop_assume!(masked.iter().any(|&x| !x));
        for (i, &mk) in masked.iter().enumerate() {
            if mk {
                data[i % 2][i] = f32::NEG_INFINITY;
            }
        }
        let w = [1.0, c1];
        let r = run(&simple_models(&data, v), &Config::log_linear(&w), 1, v).unwrap();
        for i in 0..v {
            prop_assert_eq!(r.lp[i] == f32::NEG_INFINITY, masked[i], "token {} -> {}", i, r.lp[i]);
            prop_assert!(!r.lp[i].is_nan());
        }
    }
}

// ---------------------------------------------------------------------------
// Fixed cases.

fn one_row(z: &[&[f32]], cfg: &Config<'_>) -> Run {
    let v = z.iter().map(|r| r.len()).max().unwrap();
    let models: Vec<Model<'_>> = z.iter().map(|r| Model::new(Rows::single(r))).collect();
    run(&models, cfg, 1, v).unwrap()
}

#[test]
fn linear_is_or_and_any_rule_is_and() {
    let a = [0.0f32, 0.0, f32::NEG_INFINITY];
    let b = [0.0f32, f32::NEG_INFINITY, 0.0];
    let r = one_row(&[&a, &b], &Config::linear(&[1.0, 1.0]));
    // Each model puts 1/2 on two tokens: the mixture is (1/2, 1/4, 1/4).
    let want = [0.5f32, 0.25, 0.25];
    for (p, w) in r.p.iter().zip(want) {
        assert!((p - w).abs() < 1e-6, "{:?}", r.p);
    }
    assert!((r.lz[0] - 2f32.ln()).abs() < 1e-6);
    let r = one_row(
        &[&a, &b],
        &Config {
            mask_rule: MaskRule::Any,
            ..Config::linear(&[1.0, 1.0])
        },
    );
    assert_eq!(r.p, vec![1.0, 0.0, 0.0]);
    let r = one_row(&[&a, &b], &Config::log_linear(&[1.0, 1.0]));
    assert_eq!(r.p, vec![1.0, 0.0, 0.0]);
}

#[test]
fn negative_coefficient_with_masked_amateur_is_masked_not_nan() {
    // Contrastive decoding: expert - amateur; the amateur masks token 2.
    let expert = [1.0f32, 2.0, 3.0];
    let amateur = [0.0f32, 0.0, f32::NEG_INFINITY];
    let r = one_row(&[&expert, &amateur], &Config::log_linear(&[1.0, -1.0]));
    assert_eq!(r.lp[2], f32::NEG_INFINITY);
    assert_eq!(r.am[0], 1);
    assert!(r.report.is_clean());
}

#[test]
fn plausibility_keeps_tokens_near_the_expert_max() {
    // Expert probabilities ~ (0.665, 0.245, 0.090); alpha 0.2 keeps tokens 0 and 1.
    let expert = [2.0f32, 1.0, 0.0];
    let amateur = [3.0f32, 0.0, -5.0];
    let cfg = Config {
        plausibility: Some(Plausibility { model: 0, alpha: 0.2 }),
        ..Config::log_linear(&[1.0, -1.0])
    };
    let r = one_row(&[&expert, &amateur], &cfg);
    assert_eq!(
        r.lp[2],
        f32::NEG_INFINITY,
        "token 2 is implausible even though it wins the contrast"
    );
    assert_eq!(r.am[0], 1);
    let s: f32 = r.p.iter().sum();
    assert!((s - 1.0).abs() < 1e-6);
}

#[test]
fn plausibility_model_with_zero_weight_is_still_read() {
    let a = [0.0f32, 0.0, 0.0];
    let judge = [5.0f32, -5.0, -5.0];
    let cfg = Config {
        plausibility: Some(Plausibility { model: 1, alpha: 0.5 }),
        ..Config::linear(&[1.0, 0.0])
    };
    let r = one_row(&[&a, &judge], &cfg);
    assert_eq!(r.p, vec![1.0, 0.0, 0.0]);
}

#[test]
fn padded_vocabularies_mask_the_tail() {
    // Model b covers 3 of 5 tokens, stored with stride 4.
    let a = [0.0f32; 5];
    let b = [0.0f32, 0.0, 0.0, 99.0]; // 99 is padding, never read
    let models = [
        Model::new(Rows::single(&a)),
        Model::new(Rows::new(&b, 1, 3, 4).unwrap()),
    ];
    let lin = run(&models, &Config::linear(&[1.0, 1.0]), 1, 5).unwrap();
    // (1/2)(1/5) + (1/2)(1/3) for the shared tokens, (1/2)(1/5) for the tail.
    assert!((lin.p[0] - (0.1 + 1.0 / 6.0)).abs() < 1e-6);
    assert!((lin.p[4] - 0.1).abs() < 1e-6);
    let ll = run(&models, &Config::log_linear(&[1.0, 1.0]), 1, 5).unwrap();
    assert_eq!(&ll.lp[3..], &[f32::NEG_INFINITY; 2]);
}

#[test]
fn fully_masked_and_nan_rows_are_reported() {
    let a = [f32::NEG_INFINITY, f32::NEG_INFINITY, 0.0, 1.0, f32::NAN, 0.0];
    let b = [f32::NEG_INFINITY, f32::NEG_INFINITY, 1.0, 0.0, 0.0, 0.0];
    let models = [
        Model::new(Rows::dense(&a, 3, 2).unwrap()),
        Model::new(Rows::dense(&b, 3, 2).unwrap()),
    ];
    for cfg in [Config::linear(&[1.0, 1.0]), Config::log_linear(&[1.0, -0.5])] {
        let r = run(&models, &cfg, 3, 2).unwrap();
        assert_eq!(r.report.masked_rows, 1);
        assert_eq!(r.report.nan_rows, 1);
        assert_eq!(&r.lp[0..2], &[f32::NEG_INFINITY; 2]);
        assert_eq!(&r.p[0..2], &[0.0; 2]);
        assert!(r.lp[2..4].iter().all(|x| x.is_finite()));
        assert!(r.lp[4..6].iter().all(|x| x.is_nan()) && r.p[4..6].iter().all(|x| x.is_nan()));
        assert_eq!(r.am, vec![NO_TOKEN, r.am[1], NO_TOKEN]);
        assert!(r.lz[2].is_nan() && r.lz[0] == f32::NEG_INFINITY);
    }
}

#[test]
fn positive_infinity_logit_is_a_nan_row_in_both_signs() {
    let a = [0.0f32, f32::INFINITY];
    let b = [0.0f32, 0.0];
    for w in [[1.0f32, 1.0], [-1.0, 1.0]] {
        let r = one_row(&[&a, &b], &Config::log_linear(&w));
        assert_eq!(r.report.nan_rows, 1, "{w:?}");
    }
    let r = one_row(&[&a, &b], &Config::linear(&[1.0, 1.0]));
    assert_eq!(r.report.nan_rows, 1);
}

#[test]
fn all_zero_loglinear_coefficients_give_uniform() {
    let a = [5.0f32, -3.0, 1.0, 0.0];
    let r = one_row(&[&a], &Config::log_linear(&[0.0]));
    assert!(r.p.iter().all(|&p| (p - 0.25).abs() < 1e-7));
}

#[test]
fn huge_logits_and_small_temperatures_stay_finite() {
    let a = [3.0e38f32, -3.0e38, 1.0e38];
    let models = [Model::new(Rows::single(&a)).with_temperature(0.01)];
    let r = run(&models, &Config::linear(&[1.0]), 1, 3).unwrap();
    assert_eq!(r.p, vec![1.0, 0.0, 0.0]);
    assert!(r.report.is_clean());
    // Log-linear scores overflow f32 (3e40): reported, not silent.
    let r = run(&models, &Config::log_linear(&[1.0]), 1, 3).unwrap();
    assert_eq!(r.report.nan_rows, 1);
}

#[test]
fn output_temperature_in_linear_mode() {
    let a = [0.0f32, 1.0];
    let b = [2.0f32, 0.0];
    let cfg = Config {
        out_temperature: 0.5,
        ..Config::linear(&[1.0, 3.0])
    };
    let r = one_row(&[&a, &b], &cfg);
    let pa = [1.0 / (1.0 + 1f64.exp()), 1f64.exp() / (1.0 + 1f64.exp())];
    let pb = [2f64.exp() / (1.0 + 2f64.exp()), 1.0 / (1.0 + 2f64.exp())];
    let mix: Vec<f64> = (0..2).map(|i| 0.25 * pa[i] + 0.75 * pb[i]).collect();
    let sq: Vec<f64> = mix.iter().map(|p| p * p).collect();
    let s: f64 = sq.iter().sum();
    for i in 0..2 {
        assert!((r.p[i] as f64 - sq[i] / s).abs() < 1e-6);
    }
    assert!((r.lz[0] as f64 - (2.0 * 4f64.ln() + s.ln())).abs() < 1e-5);
}

// ---------------------------------------------------------------------------
// Errors: the right variant, and outputs untouched.

fn expect_err(models: &[Model<'_>], cfg: &Config<'_>, b: usize, v: usize, want: Error) {
    let mut lp = vec![7.0f32; b * v];
    let mut am = vec![3u32; b];
    let out = Output {
        log_probs: Some(RowsMut::dense(&mut lp, b, v).unwrap()),
        argmax: Some(&mut am),
        ..Default::default()
    };
    assert_eq!(combine(models, cfg, out).unwrap_err(), want);
    assert!(lp.iter().all(|&x| x == 7.0) && am.iter().all(|&x| x == 3));
}

#[test]
fn errors_name_the_argument_and_leave_outputs_untouched() {
    let a = [0.0f32; 8];
    let m2 = [
        Model::new(Rows::dense(&a, 2, 4).unwrap()),
        Model::new(Rows::dense(&a, 2, 4).unwrap()),
    ];
    expect_err(&[], &Config::linear(&[]), 2, 4, Error::Empty { arg: "models" });
    expect_err(
        &m2,
        &Config::linear(&[1.0]),
        2,
        4,
        Error::LengthMismatch {
            arg: "weights",
            index: 0,
            expected: 2,
            got: 1,
        },
    );
    expect_err(
        &m2,
        &Config::linear(&[1.0, f32::NAN]),
        2,
        4,
        Error::NonFinite {
            arg: "weights",
            index: 1,
        },
    );
    expect_err(
        &m2,
        &Config::linear(&[1.0, -1.0]),
        2,
        4,
        Error::OutOfRange {
            arg: "weights",
            index: 1,
        },
    );
    expect_err(
        &m2,
        &Config::linear(&[0.0, 0.0]),
        2,
        4,
        Error::ZeroSum {
            arg: "weights",
            index: 0,
        },
    );
    expect_err(
        &m2,
        &Config::log_linear(&[1.0, f32::INFINITY]),
        2,
        4,
        Error::NonFinite {
            arg: "weights",
            index: 1,
        },
    );
    expect_err(
        &m2,
        &Config {
            out_temperature: 0.5,
            ..Config::log_linear(&[1.0, 3e38])
        },
        2,
        4,
        Error::OutOfRange {
            arg: "weights",
            index: 1,
        },
    );
    // Wrong row count, vocab too long.
    expect_err(
        &m2,
        &Config::linear(&[1.0, 1.0]),
        3,
        4,
        Error::LengthMismatch {
            arg: "models.logits.rows",
            index: 0,
            expected: 3,
            got: 2,
        },
    );
    expect_err(
        &m2,
        &Config::linear(&[1.0, 1.0]),
        2,
        3,
        Error::TooLarge {
            arg: "models.logits.len",
            index: 0,
            max: 3,
            got: 4,
        },
    );
    // Temperatures.
    let cold = [m2[0], m2[1].with_temperature(0.0)];
    expect_err(
        &cold,
        &Config::linear(&[1.0, 1.0]),
        2,
        4,
        Error::OutOfRange {
            arg: "models.temperature",
            index: 1,
        },
    );
    let cfg = Config {
        out_temperature: f32::NAN,
        ..Config::linear(&[1.0, 1.0])
    };
    expect_err(
        &m2,
        &cfg,
        2,
        4,
        Error::NonFinite {
            arg: "out_temperature",
            index: 0,
        },
    );
    // Plausibility.
    let cfg = Config {
        plausibility: Some(Plausibility { model: 2, alpha: 0.1 }),
        ..Config::linear(&[1.0, 1.0])
    };
    expect_err(
        &m2,
        &cfg,
        2,
        4,
        Error::IndexOutOfBounds {
            arg: "plausibility.model",
            index: 2,
            bound: 2,
        },
    );
    let cfg = Config {
        plausibility: Some(Plausibility { model: 0, alpha: 1.5 }),
        ..Config::linear(&[1.0, 1.0])
    };
    expect_err(
        &m2,
        &cfg,
        2,
        4,
        Error::OutOfRange {
            arg: "plausibility.alpha",
            index: 0,
        },
    );
    // Per-row weights: shape and per-row zero sum (flat index b * M + m).
    let t = [1.0f32, 1.0, 0.0, 0.0];
    let cfg = Config {
        weights: Weights::PerRow(Rows::dense(&t, 2, 2).unwrap()),
        ..Config::linear(&[])
    };
    expect_err(
        &m2,
        &cfg,
        2,
        4,
        Error::ZeroSum {
            arg: "weights",
            index: 1,
        },
    );
    let t = [1.0f32, 1.0, 1.0, -2.0];
    let cfg = Config {
        weights: Weights::PerRow(Rows::dense(&t, 2, 2).unwrap()),
        ..Config::linear(&[])
    };
    expect_err(
        &m2,
        &cfg,
        2,
        4,
        Error::OutOfRange {
            arg: "weights",
            index: 3,
        },
    );
    let cfg = Config {
        weights: Weights::PerRow(Rows::dense(&t, 1, 2).unwrap()),
        ..Config::linear(&[])
    };
    expect_err(
        &m2,
        &cfg,
        2,
        4,
        Error::LengthMismatch {
            arg: "weights.rows",
            index: 0,
            expected: 2,
            got: 1,
        },
    );
    // Too many models.
    let many = vec![m2[0]; 65];
    expect_err(
        &many,
        &Config::linear(&[1.0; 65]),
        2,
        4,
        Error::TooLarge {
            arg: "models",
            index: 0,
            max: 64,
            got: 65,
        },
    );
    // No row output; mismatched outputs.
    let out = Output::default();
    assert_eq!(
        combine(&m2, &Config::linear(&[1.0, 1.0]), out).unwrap_err(),
        Error::Unsupported {
            what: "no row output: give log_probs or probs"
        }
    );
    let (mut lp, mut am) = (vec![0.0f32; 8], vec![0u32; 3]);
    let out = Output {
        log_probs: Some(RowsMut::dense(&mut lp, 2, 4).unwrap()),
        argmax: Some(&mut am),
        ..Default::default()
    };
    assert_eq!(
        combine(&m2, &Config::linear(&[1.0, 1.0]), out).unwrap_err(),
        Error::LengthMismatch {
            arg: "argmax",
            index: 0,
            expected: 2,
            got: 3
        }
    );
}

#[test]
fn deep_tail_log_probs_do_not_underflow() {
    // Token 1 has log-probability about -150 under both models: far below
    // f32's smallest probability, but its log-probability is representable.
    let a = [0.0f32, -150.0, 0.0];
    let b = [0.0f32, -151.0, -1.0];
    let r = one_row(&[&a, &b], &Config::linear(&[1.0, 1.0]));
    let la = -150.0 - (2.0f64 + (-150f64).exp()).ln();
    let lb = -151.0 - (1.0f64 + (-1f64).exp() + (-151f64).exp()).ln();
    let want = (0.5 * la.exp() + 0.5 * lb.exp()).ln();
    let want = if want.is_finite() {
        want
    } else {
        (0.5f64).ln() + la + (1.0 + (lb - la).exp()).ln()
    };
    assert!((r.lp[1] as f64 - want).abs() < 1e-4, "{} vs {want}", r.lp[1]);
    assert_eq!(r.p[1], 0.0);
}

#[test]
fn huge_combined_scores_still_normalize() {
    // Found by the fuzzer: a tiny temperature makes the combined scores about
    // -2e32; the normalizer must still separate two tied tokens (p = 1/2 each).
    let a = [f32::NEG_INFINITY, -0.125, -0.125];
    let models = [Model::new(Rows::single(&a)).with_temperature(1.745_798_8e-33)];
    let r = run(&models, &Config::log_linear(&[3.03125]), 1, 3).unwrap();
    assert_eq!(r.p, vec![0.0, 0.5, 0.5]);
}

#[test]
fn subnormal_output_temperature_overflows_cleanly() {
    // Found by the fuzzer: T_out = 3.2e-39 made ln Z = inf + (-inf) = NaN.
    let a = [11.5f32, 11.75, 11.5];
    let b = [3.875f32, -12.625, -13.875];
    let models = [
        Model::new(Rows::single(&a)).with_temperature(0.15625),
        Model::new(Rows::single(&b)),
    ];
    let cfg = Config {
        out_temperature: 3.214_242e-39,
        ..Config::linear(&[2.4375, 2.4375])
    };
    let r = run(&models, &cfg, 1, 3).unwrap();
    assert!(r.report.is_clean());
    assert!(!r.lz[0].is_nan(), "{}", r.lz[0]);
    // Mixture ~ (0.58, 0.33, 0.08); a vanishing T_out makes it one-hot.
    assert_eq!(r.am[0], 0);
    assert_eq!(r.p, vec![1.0, 0.0, 0.0]);
}

#[test]
fn nan_beyond_another_models_vocabulary_still_surfaces() {
    // Model 0 has a NaN at token 3, which model 1 does not cover: the row
    // must still be reported as NaN (it was masked silently before).
    let a = [0.0f32, 1.0, 2.0, f32::NAN];
    let b = [0.0f32, 1.0, 2.0];
    let models = [Model::new(Rows::single(&a)), Model::new(Rows::single(&b))];
    let r = run(&models, &Config::log_linear(&[1.0, 1.0]), 1, 4).unwrap();
    assert_eq!(r.report.nan_rows, 1);
}

/// Uncertainty outputs of one call: (entropy, top1, margin, disagreement).
fn uncertainty(models: &[Model<'_>], cfg: &Config<'_>, b: usize, v: usize) -> Result<[Vec<f32>; 4], Error> {
    let mut lp = vec![0.0f32; b * v];
    let [mut h, mut t1, mut mg, mut js] = [(); 4].map(|_| vec![-7.0f32; b]);
    let linear = cfg.mode == medley_core::ensemble::Mode::Linear;
    combine(
        models,
        cfg,
        Output {
            log_probs: Some(RowsMut::dense(&mut lp, b, v).unwrap()),
            entropy: Some(&mut h),
            top1_prob: Some(&mut t1),
            margin: Some(&mut mg),
            disagreement: linear.then_some(&mut js[..]),
            ..Default::default()
        },
    )?;
    Ok([h, t1, mg, js])
}

#[test]
fn uncertainty_of_one_hot_uniform_and_tied_rows() {
    let ninf = f32::NEG_INFINITY;
    // Row 0 one-hot, row 1 uniform over 4, row 2 two tokens tied at the top.
    let z = [0.0, ninf, ninf, ninf, 1.0, 1.0, 1.0, 1.0, 3.0, 3.0, 0.0, ninf];
    let m = [Model::new(Rows::dense(&z, 3, 4).unwrap())];
    for cfg in [Config::linear(&[1.0]), Config::log_linear(&[1.0])] {
        let [h, t1, mg, js] = uncertainty(&m, &cfg, 3, 4).unwrap();
        assert_eq!(h[0], 0.0);
        assert_eq!((t1[0], mg[0]), (1.0, 1.0), "one token with mass: margin = top1");
        assert!((h[1] - 4f32.ln()).abs() < 1e-6, "{}", h[1]);
        assert!((t1[1] - 0.25).abs() < 1e-7 && mg[1] == 0.0);
        assert!(mg[2] == 0.0 && t1[2] > 0.4, "tie at the top: {} {}", mg[2], t1[2]);
        if cfg.mode == medley_core::ensemble::Mode::Linear {
            // One model agrees with itself.
            assert!(js.iter().all(|&d| d == 0.0), "{js:?}");
        }
    }
}

#[test]
fn disagreement_is_zero_for_equal_models_and_ln2_for_disjoint_ones() {
    let ninf = f32::NEG_INFINITY;
    let a = [5.0f32, 1.0, 0.0, -2.0];
    let hot_a = [0.0, ninf, ninf, ninf];
    let hot_b = [ninf, ninf, 0.0, ninf];
    let same = [Model::new(Rows::single(&a)), Model::new(Rows::single(&a))];
    let [_, _, _, js] = uncertainty(&same, &Config::linear(&[0.3, 0.7]), 1, 4).unwrap();
    assert!(js[0].abs() < 1e-6, "{}", js[0]);
    let disjoint = [Model::new(Rows::single(&hot_a)), Model::new(Rows::single(&hot_b))];
    let [h, t1, mg, js] = uncertainty(&disjoint, &Config::linear(&[1.0, 1.0]), 1, 4).unwrap();
    assert!((js[0] - 2f32.ln()).abs() < 1e-6, "{}", js[0]);
    assert!((h[0] - 2f32.ln()).abs() < 1e-6 && t1[0] == 0.5 && mg[0] == 0.0);
    // A zero-weight model is not live: it does not disagree.
    let [_, _, _, js] = uncertainty(&disjoint, &Config::linear(&[1.0, 0.0]), 1, 4).unwrap();
    assert_eq!(js[0], 0.0);
    // Disagreement ignores the output temperature (it describes the models).
    let cfg = Config {
        out_temperature: 3.0,
        ..Config::linear(&[1.0, 1.0])
    };
    let [h3, _, _, js3] = uncertainty(&disjoint, &cfg, 1, 4).unwrap();
    assert!((js3[0] - 2f32.ln()).abs() < 1e-6 && (h3[0] - 2f32.ln()).abs() < 1e-6);
}

#[test]
fn uncertainty_of_masked_and_nan_rows_is_nan() {
    let ninf = f32::NEG_INFINITY;
    let z = [ninf, ninf, 1.0, f32::NAN, 0.5, 0.5];
    let m = [Model::new(Rows::dense(&z, 3, 2).unwrap())];
    for cfg in [Config::linear(&[1.0]), Config::log_linear(&[1.0])] {
        let u = uncertainty(&m, &cfg, 3, 2).unwrap();
        let linear = cfg.mode == medley_core::ensemble::Mode::Linear;
        for (k, col) in u.iter().enumerate() {
            if k == 3 && !linear {
                assert_eq!(col, &vec![-7.0; 3], "not written in log-linear mode");
                continue;
            }
            assert!(
                col[0].is_nan() && col[1].is_nan() && col[2].is_finite(),
                "output {k}: {col:?}"
            );
        }
    }
}

#[test]
fn uncertainty_errors_leave_every_output_untouched() {
    let a = [1.0f32, 2.0, 3.0, 4.0];
    let m = [Model::new(Rows::dense(&a, 2, 2).unwrap())];
    let mut lp = [9.0f32; 4];
    let mut h = [9.0f32; 2];
    let mut short = [9.0f32; 2];
    // Disagreement in log-linear mode.
    let err = combine(
        &m,
        &Config::log_linear(&[1.0]),
        Output {
            log_probs: Some(RowsMut::dense(&mut lp, 2, 2).unwrap()),
            entropy: Some(&mut h),
            disagreement: Some(&mut short[..]),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::Unsupported { .. }), "{err:?}");
    for (arg, which) in [
        ("entropy", 0),
        ("top1_prob", 1),
        ("margin", 2),
        ("disagreement", 3),
    ] {
        let mut bad = [9.0f32; 3];
        let mut out = Output {
            log_probs: Some(RowsMut::dense(&mut lp, 2, 2).unwrap()),
            entropy: Some(&mut h),
            ..Default::default()
        };
        let slot = match which {
            0 => &mut out.entropy,
            1 => &mut out.top1_prob,
            2 => &mut out.margin,
            _ => &mut out.disagreement,
        };
        *slot = Some(&mut bad[..]);
        let err = combine(&m, &Config::linear(&[1.0]), out).unwrap_err();
        assert_eq!(
            err,
            Error::LengthMismatch {
                arg,
                index: 0,
                expected: 2,
                got: 3
            }
        );
        assert_eq!(bad, [9.0; 3]);
    }
    assert_eq!((lp, h, short), ([9.0; 4], [9.0; 2], [9.0; 2]));
}

/// Long rows (a 256k vocabulary, many tokens in the deep tail): the
/// entropies and the disagreement stay within 1e-5 of f64.
#[test]
fn uncertainty_of_long_rows_matches_f64() {
    let v = 256_000;
    // The last case is the GPU conformance suite's "M=2 B=1 V=256000 linear"
    // (seed 15, 1% masked tokens, bf16-rounded, weights 1 and 2).
    for (seed, scale, p_mask, w) in [
        (1u64, 10.0, 0.0, [0.4f32, 0.6]),
        (2, 3.0, 0.0, [0.4, 0.6]),
        (15, 10.0, 0.01, [1.0, 2.0]),
    ] {
        let mut g = Gen(seed);
        let data: Vec<Vec<f32>> = (0..2)
            .map(|_| {
                (0..v)
                    .map(|_| bf16::from_f32(g.logit(scale, p_mask)).to_f32())
                    .collect()
            })
            .collect();
        let models = simple_models(&data, v);
        let [h, t1, _, js] = uncertainty(&models, &Config::linear(&w), 1, v).unwrap();
        let refs: Vec<RefModel> = data
            .iter()
            .map(|d| RefModel {
                rows: vec![d.iter().map(|&x| x as f64).collect()],
                t: 1.0,
            })
            .collect();
        let w64 = [w[0] as f64, w[1] as f64];
        let (want_lp, _) =
            ref_row(&refs, 0, &w64, RefMode::Linear { mask_any: false }, 1.0, None, v).unwrap();
        let (want_h, want_t1, _) = ref_uncertainty(&want_lp);
        let want_js = ref_disagreement(&refs, 0, &w64, v).unwrap();
        eprintln!(
            "seed {seed}: entropy {} vs {want_h}, disagreement {} vs {want_js}",
            h[0], js[0]
        );
        let rel = |got: f32, want: f64| (got as f64 - want).abs() / want.abs().max(1e-3);
        assert!(rel(h[0], want_h) < 1e-5, "entropy {} vs {want_h}", h[0]);
        assert!(rel(t1[0], want_t1) < 1e-5, "top1 {} vs {want_t1}", t1[0]);
        // The disagreement is a difference of entropies: its error scales
        // with them.
        assert!(
            (js[0] as f64 - want_js).abs() < 1e-5 * want_h,
            "disagreement {} vs {want_js}",
            js[0]
        );
    }
}
