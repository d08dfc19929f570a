//! Linear merges, soups and task vectors against f64 references.

#![allow(clippy::needless_range_loop)]

mod merge_util;

use medley_core::merge::linear::{add_task_vectors, average, linear, negate, scale, task_vector};
use medley_core::{Error, bf16, f16};
use merge_util::*;
use proptest::prelude::*;

fn linear_ref(models: &[Vec<f32>], w: &[f32], normalize: bool) -> (Vec<f64>, Vec<f64>) {
    let n = models[0].len();
    let ws: f64 = w.iter().map(|&x| x as f64).sum();
    let mut out = vec![0.0f64; n];
    let mut mag = vec![0.0f64; n];
    for (x, &wi) in models.iter().zip(w) {
        for j in 0..n {
            out[j] += wi as f64 * x[j] as f64;
            mag[j] += (wi as f64 * x[j] as f64).abs();
        }
    }
    if normalize {
        for j in 0..n {
            out[j] /= ws;
            mag[j] /= ws.abs();
        }
    }
    (out, mag)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn linear_matches_f64(seed in any::<u64>(), n in 0usize..3000, m in 1usize..6, normalize in any::<bool>()) {
        let base = vec(seed, n, 1.0);
        let models: Vec<Vec<f32>> = (0..m).map(|i| near(&base, seed + 1 + i as u64, 0.1)).collect();
        let w: Vec<f32> = (0..m).map(|i| 0.25 + (i as f32) * 0.5).collect();
        let views: Vec<&[f32]> = models.iter().map(|x| &x[..]).collect();
        let mut out = vec![0.0f32; n];
        linear(&views, &w, normalize, &mut out).unwrap();
        let (want, mag) = linear_ref(&models, &w, normalize);
        assert_close(&out, &want, &mag, 4e-7 * m as f64, 0.0);
        // Element-wise: any chunking writes the same bits.
        let mut chunked = vec![0.0f32; n];
        let c = cuts(seed ^ 7, n, 5);
        for win in c.windows(2) {
            let (lo, hi) = (win[0], win[1]);
            let v: Vec<&[f32]> = models.iter().map(|x| &x[lo..hi]).collect();
            linear(&v, &w, normalize, &mut chunked[lo..hi]).unwrap();
        }
        assert_bits(&chunked, &out);
    }

    #[test]
    fn uniform_soup_of_identical_models_is_the_model(seed in any::<u64>(), n in 0usize..2000, m in 1usize..9) {
        let x = vec(seed, n, 100.0);
        let views: Vec<&[f32]> = (0..m).map(|_| &x[..]).collect();
        let mut out = vec![0.0f32; n];
        average(&views, &mut out).unwrap();
        for (o, &v) in out.iter().zip(&x) {
            // Anchored form: exact.
            let ulps = (o.to_bits() as i64 - v.to_bits() as i64).abs();
            prop_assert!(ulps == 0, "{o} vs {v}");
        }
    }

    #[test]
    fn task_arithmetic_on_task_vectors(seed in any::<u64>(), n in 1usize..2000, m in 1usize..5, lambda in -2.0f32..2.0) {
        let base = vec(seed, n, 1.0);
        let fts: Vec<Vec<f32>> = (0..m).map(|i| near(&base, seed + 10 + i as u64, 0.05)).collect();
        let mut taus = vec![vec![0.0f32; n]; m];
        for (t, ft) in taus.iter_mut().zip(&fts) {
            task_vector(ft, &base, t).unwrap();
            for j in 0..n {
                prop_assert_eq!(t[j], ft[j] - base[j]);
            }
        }
        let w: Vec<f32> = (0..m).map(|i| if i % 2 == 0 { 1.0 } else { -0.5 }).collect();
        let views: Vec<&[f32]> = taus.iter().map(|x| &x[..]).collect();
        let mut out = vec![0.0f32; n];
        add_task_vectors(&base, &views, &w, lambda, &mut out).unwrap();
        let mut want = vec![0.0f64; n];
        let mut mag = vec![0.0f64; n];
        for j in 0..n {
            let s: f64 = taus.iter().zip(&w).map(|(t, &wi)| wi as f64 * t[j] as f64).sum();
            let a: f64 = taus.iter().zip(&w).map(|(t, &wi)| (wi as f64 * t[j] as f64).abs()).sum();
            want[j] = base[j] as f64 + lambda as f64 * s;
            mag[j] = base[j].abs() as f64 + (lambda as f64 * a).abs();
        }
        assert_close(&out, &want, &mag, 1e-6, 0.0);
        // Negation is exact, scaling rounds once.
        let mut neg = vec![0.0f32; n];
        negate(&taus[0], &mut neg).unwrap();
        let mut sc = vec![0.0f32; n];
        scale(&taus[0], lambda, &mut sc).unwrap();
        for j in 0..n {
            prop_assert_eq!(neg[j], -taus[0][j]);
            prop_assert_eq!(sc[j], lambda * taus[0][j]);
        }
    }
}

#[test]
fn half_precision_inputs_and_outputs() {
    let a = vec(1, 500, 3.0);
    let b = vec(2, 500, 3.0);
    let ab: Vec<bf16> = a.iter().map(|&x| bf16::from_f32(x)).collect();
    let bb: Vec<bf16> = b.iter().map(|&x| bf16::from_f32(x)).collect();
    let mut out = vec![0.0f32; 500];
    linear(&[&ab[..], &bb[..]], &[0.3, 0.7], true, &mut out).unwrap();
    let mut out16 = vec![f16::ZERO; 500];
    linear(&[&ab[..], &bb[..]], &[0.3, 0.7], true, &mut out16).unwrap();
    for j in 0..500 {
        // Anchored form: x0 + f32(w1 / W) (x1 - x0).
        let c1 = 0.7f32 / (0.3f32 + 0.7f32);
        let want = ab[j].to_f32() + c1 * (bb[j].to_f32() - ab[j].to_f32());
        assert_eq!(out[j], want);
        assert_eq!(out16[j], f16::from_f32(want));
    }
}

#[test]
fn bad_input_is_rejected_and_leaves_out_untouched() {
    let a = [1.0f32, 2.0, 3.0];
    let b = [1.0f32, 2.0];
    let mut out = [SENTINEL; 3];
    let e = linear(&[&a[..], &b[..]], &[1.0, 1.0], true, &mut out).unwrap_err();
    assert_eq!(
        e,
        Error::LengthMismatch {
            arg: "models",
            index: 1,
            expected: 3,
            got: 2
        }
    );
    let e = linear::<f32, f32>(&[], &[], true, &mut out).unwrap_err();
    assert_eq!(e, Error::Empty { arg: "models" });
    let e = linear(&[&a[..], &a[..]], &[1.0], true, &mut out).unwrap_err();
    assert_eq!(
        e,
        Error::LengthMismatch {
            arg: "weights",
            index: 0,
            expected: 2,
            got: 1
        }
    );
    let e = linear(&[&a[..], &a[..]], &[1.0, f32::NAN], true, &mut out).unwrap_err();
    assert_eq!(
        e,
        Error::NonFinite {
            arg: "weights",
            index: 1
        }
    );
    let e = linear(&[&a[..], &a[..]], &[1.0, -1.0], true, &mut out).unwrap_err();
    assert_eq!(
        e,
        Error::ZeroSum {
            arg: "weights",
            index: 0
        }
    );
    let e = linear(&[&a[..], &a[..]], &[0.1, 0.2], true, &mut out[..2]).unwrap_err();
    assert_eq!(
        e,
        Error::LengthMismatch {
            arg: "out",
            index: 0,
            expected: 3,
            got: 2
        }
    );
    assert!(out.iter().all(|&x| x == SENTINEL));
    // Without normalization a zero sum is fine (a difference of models).
    linear(&[&a[..], &a[..]], &[1.0, -1.0], false, &mut out).unwrap();
    assert_eq!(out, [0.0; 3]);
    let mut out = [SENTINEL; 3];
    assert_eq!(
        task_vector(&a, &b, &mut out).unwrap_err(),
        Error::LengthMismatch {
            arg: "base",
            index: 0,
            expected: 3,
            got: 2
        }
    );
    assert_eq!(
        add_task_vectors(&a, &[&a[..]], &[1.0], f32::INFINITY, &mut out).unwrap_err(),
        Error::NonFinite {
            arg: "lambda",
            index: 0
        }
    );
    assert_eq!(
        add_task_vectors::<f32, f32, f32>(&a, &[], &[], 1.0, &mut out).unwrap_err(),
        Error::Empty { arg: "vectors" }
    );
    assert_eq!(
        scale(&a, f32::NAN, &mut out).unwrap_err(),
        Error::NonFinite {
            arg: "lambda",
            index: 0
        }
    );
    assert!(out.iter().all(|&x| x == SENTINEL));
}

#[test]
fn nan_propagates_element_wise() {
    let a = [1.0f32, f32::NAN, 3.0];
    let b = [1.0f32, 2.0, f32::INFINITY];
    let mut out = [0.0f32; 3];
    average(&[&a[..], &b[..]], &mut out).unwrap();
    assert_eq!(out[0], 1.0);
    assert!(out[1].is_nan());
    assert_eq!(out[2], f32::INFINITY);
}
