#![allow(clippy::needless_range_loop)]
//! Ensemble distillation against an f64 reference, including a
//! finite-difference check of the gradient formula itself.

mod common;

use common::{Gen, RefMode, RefModel, combine_row, log_softmax};
use medley_core::distill::{DistillOutput, distill};
use medley_core::ensemble::{Config, Model};
use medley_core::{Error, Rows, RowsMut, bf16};
use proptest::prelude::*;

/// (CE, KL) of a student row against the reference teacher row.
fn ref_losses(lq: &[f64], z: &[f64], ts: f64) -> (f64, f64) {
    let lp = log_softmax(z, ts);
    let (mut ce, mut kl) = (0.0, 0.0);
    for (&a, &b) in lq.iter().zip(&lp) {
        if a > f64::NEG_INFINITY {
            ce -= a.exp() * b;
            kl += a.exp() * (a - b);
        }
    }
    (ce, kl)
}

struct Setup {
    b: usize,
    v: usize,
    teachers: Vec<Vec<f32>>,
    student: Vec<f32>,
    w: Vec<f32>,
    ts: f32,
    linear: bool,
}

fn setup(seed: u64) -> Setup {
    let mut g = Gen(seed);
    let b = 1 + g.below(3);
    let long = g.chance(0.1);
    let v = 1 + g.below(if long { 4000 } else { 80 });
    let m = 1 + g.below(3);
    let linear = g.chance(0.5);
    let teachers = (0..m)
        .map(|_| (0..b * v).map(|_| g.logit(8.0, 0.05)).collect())
        .collect();
    let student = (0..b * v).map(|_| g.logit(8.0, 0.0)).collect();
    let w = (0..m)
        .map(|_| {
            if linear {
                g.range(0.1, 1.0) as f32
            } else {
                g.range(-0.5, 1.0) as f32
            }
        })
        .collect();
    Setup {
        b,
        v,
        teachers,
        student,
        w,
        ts: g.range(0.5, 3.0) as f32,
        linear,
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn matches_reference(seed in any::<u64>(), scale in 0.1f32..4.0) {
        let s = setup(seed);
        let (b, v) = (s.b, s.v);
        let teachers: Vec<Model<'_>> = s.teachers.iter().map(|t| Model::new(Rows::dense(&t[..], b, v).unwrap())).collect();
        let student = Model::new(Rows::dense(&s.student[..], b, v).unwrap()).with_temperature(s.ts);
        let cfg = if s.linear { Config::linear(&s.w) } else { Config::log_linear(&s.w) };
        let (mut ce, mut kl, mut g) = (vec![0.0f32; b], vec![0.0f32; b], vec![0.0f32; b * v]);
        let out = DistillOutput { cross_entropy: Some(&mut ce), kl: Some(&mut kl), grad: RowsMut::dense(&mut g, b, v).unwrap() };
        let rep = distill(&teachers, &cfg, &student, scale, out).unwrap();
        let refs: Vec<RefModel> = s.teachers.iter().map(|t| RefModel {
            rows: (0..b).map(|r| t[r * v..(r + 1) * v].iter().map(|&x| x as f64).collect()).collect(),
            t: 1.0,
        }).collect();
        let wf: Vec<f64> = s.w.iter().map(|&x| x as f64).collect();
        let mode = if s.linear { RefMode::Linear { mask_any: false } } else { RefMode::LogLinear };
        let mut masked = 0;
        for r in 0..b {
            let z: Vec<f64> = s.student[r * v..(r + 1) * v].iter().map(|&x| x as f64).collect();
            let grow = &g[r * v..(r + 1) * v];
            let Some((lq, _)) = combine_row(&refs, r, &wf, mode, 1.0, None, v) else {
                masked += 1;
                prop_assert_eq!((ce[r], kl[r]), (0.0, 0.0));
                prop_assert!(grow.iter().all(|&x| x == 0.0));
                continue;
            };
            let (rce, rkl) = ref_losses(&lq, &z, s.ts as f64);
            prop_assert!((ce[r] as f64 - rce).abs() <= 1e-4 * (1.0 + rce.abs()), "ce {} vs {rce}", ce[r]);
            prop_assert!((kl[r] as f64 - rkl).abs() <= 1e-4 * (1.0 + rkl.abs()), "kl {} vs {rkl}", kl[r]);
            prop_assert!(kl[r] >= -1e-5);
            let lp = log_softmax(&z, s.ts as f64);
            let (mut num, mut den) = (0.0, 0.0);
            for i in 0..v {
                let want = scale as f64 * (lp[i].exp() - lq[i].exp()) / s.ts as f64;
                num += (grow[i] as f64 - want).powi(2);
                den += want * want;
            }
            prop_assert!(num.sqrt() <= 1e-4 * den.sqrt() + 1e-6, "grad error {} of norm {}", num.sqrt(), den.sqrt());
            let gs: f64 = grow.iter().map(|&x| x as f64).sum();
            prop_assert!(gs.abs() < 1e-5 * scale as f64 * v as f64, "gradient sums to {gs}");
        }
        prop_assert_eq!(rep.masked_rows, masked);
    }
}

#[test]
fn gradient_formula_matches_finite_differences() {
    // Checks the math (not just the code against itself): d CE / d z_s by
    // central differences of the f64 reference loss.
    let mut g = Gen(3);
    let v = 17;
    let lq = log_softmax(&(0..v).map(|_| g.range(-3.0, 3.0)).collect::<Vec<_>>(), 1.0);
    let z: Vec<f64> = (0..v).map(|_| g.range(-3.0, 3.0)).collect();
    let zf: Vec<f32> = z.iter().map(|&x| x as f32).collect();
    let tq: Vec<f32> = lq.iter().map(|&x| x as f32).collect();
    let ts = 1.7f32;
    let mut grad = vec![0.0f32; v];
    let teachers = [Model::new(Rows::single(&tq))];
    let student = Model::new(Rows::single(&zf)).with_temperature(ts);
    let out = DistillOutput {
        cross_entropy: None,
        kl: None,
        grad: RowsMut::single(&mut grad),
    };
    distill(&teachers, &Config::log_linear(&[1.0]), &student, 1.0, out).unwrap();
    let lqf: Vec<f64> = log_softmax(&tq.iter().map(|&x| x as f64).collect::<Vec<_>>(), 1.0);
    let zr: Vec<f64> = zf.iter().map(|&x| x as f64).collect();
    for i in 0..v {
        let h = 1e-5;
        let mut zp = zr.clone();
        zp[i] += h;
        let mut zm = zr.clone();
        zm[i] -= h;
        let fd = (ref_losses(&lqf, &zp, ts as f64).0 - ref_losses(&lqf, &zm, ts as f64).0) / (2.0 * h);
        assert!(
            (grad[i] as f64 - fd).abs() < 1e-5,
            "token {i}: {} vs {fd}",
            grad[i]
        );
    }
}

#[test]
fn edge_rows() {
    let ninf = f32::NEG_INFINITY;
    // Row 0: teacher fully masked (no target). Row 1: student masks a token
    // the teacher likes (CE = KL = +inf). Row 2: NaN student.
    let t = [ninf, ninf, 0.0, 1.0, 0.0, 0.0];
    let st = [0.0, 0.0, ninf, 0.0, f32::NAN, 0.0];
    let teachers = [Model::new(Rows::dense(&t, 3, 2).unwrap())];
    let student = Model::new(Rows::dense(&st, 3, 2).unwrap());
    let (mut ce, mut kl, mut g) = ([9.0f32; 3], [9.0f32; 3], [9.0f32; 6]);
    let out = DistillOutput {
        cross_entropy: Some(&mut ce),
        kl: Some(&mut kl),
        grad: RowsMut::dense(&mut g, 3, 2).unwrap(),
    };
    let rep = distill(&teachers, &Config::linear(&[1.0]), &student, 1.0, out).unwrap();
    assert_eq!(
        rep,
        medley_core::Report {
            masked_rows: 1,
            nan_rows: 1
        }
    );
    assert_eq!((ce[0], kl[0], g[0], g[1]), (0.0, 0.0, 0.0, 0.0));
    assert_eq!((ce[1], kl[1]), (f32::INFINITY, f32::INFINITY));
    assert!(g[2].is_finite() && g[3].is_finite());
    assert!(ce[2].is_nan() && kl[2].is_nan() && g[4].is_nan() && g[5].is_nan());
}

#[test]
fn bf16_teachers_and_errors() {
    let t: Vec<bf16> = [1.0f32, 0.0, -1.0].iter().map(|&x| bf16::from_f32(x)).collect();
    let st = [0.0f32; 3];
    let teachers = [Model::new(Rows::single(&t[..]))];
    let mut g = [7.0f32; 3];
    let mut ce = [7.0f32; 2];
    let out = DistillOutput {
        cross_entropy: Some(&mut ce),
        kl: None,
        grad: RowsMut::single(&mut g),
    };
    let e = distill(
        &teachers,
        &Config::linear(&[1.0]),
        &Model::new(Rows::single(&st[..])),
        1.0,
        out,
    )
    .unwrap_err();
    assert_eq!(
        e,
        Error::LengthMismatch {
            arg: "cross_entropy",
            index: 0,
            expected: 1,
            got: 2
        }
    );
    let out = DistillOutput {
        cross_entropy: None,
        kl: None,
        grad: RowsMut::single(&mut g),
    };
    let e = distill(
        &teachers,
        &Config::linear(&[1.0]),
        &Model::new(Rows::single(&st[..2])),
        1.0,
        out,
    )
    .unwrap_err();
    assert_eq!(
        e,
        Error::LengthMismatch {
            arg: "student.logits.len",
            index: 0,
            expected: 3,
            got: 2
        }
    );
    let out = DistillOutput {
        cross_entropy: None,
        kl: None,
        grad: RowsMut::single(&mut g),
    };
    let e = distill(
        &teachers,
        &Config::linear(&[1.0]),
        &Model::new(Rows::single(&st[..])),
        f32::NAN,
        out,
    )
    .unwrap_err();
    assert_eq!(
        e,
        Error::NonFinite {
            arg: "grad_scale",
            index: 0
        }
    );
    assert!(g.iter().chain(&ce).all(|&x| x == 7.0));
}
