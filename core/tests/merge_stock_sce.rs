//! Model Stock and SCE against f64 references of mergekit's formulas, with
//! the chunked/one-shot identity.

#![allow(clippy::needless_range_loop)]

mod merge_util;

use medley_core::Error;
use medley_core::merge::sce::{Sce, SceOptions, sce};
use medley_core::merge::stock::{ModelStock, StockOptions, model_stock};
use merge_util::*;
use proptest::prelude::*;

fn stock_ref(models: &[Vec<f32>], base: &[f32], r0: usize, r1: usize) -> f64 {
    let m = models.len();
    let d: Vec<Vec<f64>> = models
        .iter()
        .map(|x| (r0..r1).map(|j| x[j] as f64 - base[j] as f64).collect())
        .collect();
    let nrm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut s = 0.0;
    let mut k = 0;
    for i in 0..m {
        for j in i + 1..m {
            let dot: f64 = d[i].iter().zip(&d[j]).map(|(a, b)| a * b).sum();
            s += (dot / (nrm(&d[i]) * nrm(&d[j])).max(1e-6)).clamp(-1.0, 1.0);
            k += 1;
        }
    }
    let c = s / k as f64;
    if c < 0.0 {
        0.0
    } else {
        m as f64 * c / (1.0 + (m as f64 - 1.0) * c)
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn model_stock_matches_reference(
        seed in any::<u64>(), rows in 1usize..30, cols in 1usize..40, m in 2usize..6, per_row in any::<bool>(),
        spread in 0.0f32..1.0, parts in 0usize..6,
    ) {
        let n = rows * cols;
        let base = vec(seed, n, 1.0);
        // Correlated task vectors: a shared direction plus noise.
        let shared = vec(seed + 50, n, 0.1);
        let models: Vec<Vec<f32>> = (0..m)
            .map(|i| {
                let noise = vec(seed + 1 + i as u64, n, 0.1 * spread);
                (0..n).map(|j| base[j] + shared[j] + noise[j]).collect()
            })
            .collect();
        let views: Vec<&[f32]> = models.iter().map(|x| &x[..]).collect();
        let opts = StockOptions { rows: per_row.then_some(cols) };
        let mut out = vec![0.0f32; n];
        let t = model_stock(&views, &base, &opts, &mut out).unwrap();
        let mut want = vec![0.0f64; n];
        let mut sc = vec![0.0f64; n];
        let unit = if per_row { cols } else { n };
        for r0 in (0..n).step_by(unit) {
            let tr = stock_ref(&models, &base, r0, r0 + unit);
            if !per_row {
                prop_assert!((t as f64 - tr).abs() < 1e-6 * (1.0 + tr.abs()), "t {t} vs {tr}");
            }
            for j in r0..r0 + unit {
                let avg: f64 = models.iter().map(|x| x[j] as f64).sum::<f64>() / m as f64;
                want[j] = tr * avg + (1.0 - tr) * base[j] as f64;
                // t is rounded to f32 (as mergekit's is): that moves (1 - t) b
                // by about 6e-8 |b|.
                sc[j] = (tr * avg).abs() + ((1.0 - tr) * base[j] as f64).abs() + 0.01 * base[j].abs() as f64;
            }
        }
        assert_close(&out, &want, &sc, 1e-5, 1e-30);
        // Chunked.
        let plan = ModelStock::new(n, m, &opts).unwrap();
        let mut st = plan.stats();
        let fc = cuts(seed ^ 1, n, parts);
        for w in fc.windows(2) {
            let v: Vec<&[f32]> = models.iter().map(|x| &x[w[0]..w[1]]).collect();
            st.feed(&v, &base[w[0]..w[1]]).unwrap();
        }
        let a = st.finish().unwrap();
        let ac = if per_row { row_cuts(seed, n, cols, parts) } else { cuts(seed ^ 2, n, parts) };
        let mut ch = vec![SENTINEL; n];
        for w in ac.windows(2).rev() {
            let v: Vec<&[f32]> = models.iter().map(|x| &x[w[0]..w[1]]).collect();
            a.apply(&v, &base[w[0]..w[1]], w[0], &mut ch[w[0]..w[1]]).unwrap();
        }
        assert_bits(&ch, &out);
    }

    #[test]
    fn sce_matches_reference(
        seed in any::<u64>(), n in 1usize..2500, m in 1usize..5, topk in 0.05f64..=1.0, tied in any::<bool>(),
        parts in 0usize..6,
    ) {
        let base = vec(seed, n, 1.0);
        let models: Vec<Vec<f32>> = (0..m)
            .map(|i| {
                if tied {
                    let g = grid(seed + 7 + i as u64, n, 2);
                    base.iter().zip(&g).map(|(&b, &d)| b + d).collect()
                } else {
                    near(&base, seed + 7 + i as u64, 0.05)
                }
            })
            .collect();
        let views: Vec<&[f32]> = models.iter().map(|x| &x[..]).collect();
        let opts = SceOptions { select_topk: if topk > 0.95 { 1.0 } else { topk } };
        let plan = Sce::new(n, m, &opts).unwrap();
        let mut scratch = vec![0u32; plan.scratch_len()];
        let mut out = vec![0.0f32; n];
        let applied = sce(&views, &base, &opts, &mut scratch, &mut out).unwrap();
        // Reference: f32 deltas and variances (mergekit's), f64 values.
        let d: Vec<Vec<f32>> = models.iter().map(|x| x.iter().zip(&base).map(|(&a, &b)| a - b).collect()).collect();
        let var: Vec<f32> = (0..n)
            .map(|j| {
                let mean = d.iter().fold(0.0f32, |s, v| s + v[j]) / m as f32;
                d.iter().fold(0.0f32, |s, v| s + (v[j] - mean) * (v[j] - mean)) / m as f32
            })
            .collect();
        let keep = if opts.select_topk < 1.0 {
            let nz = var.iter().filter(|&&v| v != 0.0).count();
            topk_mask(&var, count(opts.select_topk, nz))
        } else {
            vec![true; n]
        };
        let dt: Vec<Vec<f32>> = d.iter().map(|v| (0..n).map(|j| if keep[j] { v[j] } else { 0.0 }).collect()).collect();
        let e: Vec<f64> = dt.iter().map(|v| v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n as f64).collect();
        let tot: f64 = e.iter().sum();
        let om: Vec<f64> = e.iter().map(|&x| if tot.abs() < 1e-6 { 1.0 / m as f64 } else { x / tot }).collect();
        for i in 0..m {
            prop_assert!((applied.weights()[i] as f64 - om[i]).abs() < 1e-6);
        }
        let mut want = vec![0.0f64; n];
        let mut sc = vec![0.0f64; n];
        for j in 0..n {
            let vote = dt.iter().fold(0.0f32, |s, v| s + v[j]);
            let (mut num, mut den, mut mag) = (0.0f64, 0.0f64, 0.0f64);
            for i in 0..m {
                let x = dt[i][j];
                let agree = if vote >= 0.0 { x > 0.0 } else { x < 0.0 };
                if agree {
                    num += om[i] * x as f64;
                    den += om[i];
                    mag += (om[i] * x as f64).abs();
                }
            }
            let den = den.max(1e-6);
            want[j] = base[j] as f64 + num / den;
            sc[j] = base[j].abs() as f64 + mag / den;
        }
        assert_close(&out, &want, &sc, 1e-5, 1e-30);
        // Chunked.
        let mut scratch = vec![0u32; plan.scratch_len()];
        let mut st = plan.stats(&mut scratch).unwrap();
        let fc = cuts(seed ^ 3, n, parts);
        while st.needs_pass() {
            for w in fc.windows(2) {
                let v: Vec<&[f32]> = models.iter().map(|x| &x[w[0]..w[1]]).collect();
                st.feed(&v, &base[w[0]..w[1]]).unwrap();
            }
            st.end_pass().unwrap();
        }
        let a = st.finish().unwrap();
        prop_assert_eq!(a, applied);
        let mut ch = vec![SENTINEL; n];
        for w in cuts(seed ^ 4, n, parts).windows(2).rev() {
            let v: Vec<&[f32]> = models.iter().map(|x| &x[w[0]..w[1]]).collect();
            a.apply(&v, &base[w[0]..w[1]], w[0], &mut ch[w[0]..w[1]]).unwrap();
        }
        assert_bits(&ch, &out);
    }
}

#[test]
fn model_stock_negative_cosine_guard() {
    // Two (nearly) opposite task vectors: cos ~ -1, where mergekit's t blows
    // up; here t = 0 (the base).
    let base = vec(1, 100, 1.0);
    let d = vec(2, 100, 0.1);
    let a: Vec<f32> = base.iter().zip(&d).map(|(b, d)| b + d).collect();
    let b: Vec<f32> = base.iter().zip(&d).map(|(b, d)| b - d).collect();
    let mut out = vec![0.0f32; 100];
    let t = model_stock(&[&a[..], &b[..]], &base, &StockOptions::default(), &mut out).unwrap();
    assert_eq!(t, 0.0);
    assert_bits(&out, &base);
    // Identical fine-tunes: cos = 1, t = 1: the average (the model).
    let t = model_stock(&[&a[..], &a[..]], &base, &StockOptions::default(), &mut out).unwrap();
    assert!((t - 1.0).abs() < 1e-6);
    for j in 0..100 {
        assert!((out[j] - a[j]).abs() < 1e-6);
    }
}

#[test]
fn sce_zero_selection_and_zero_vectors() {
    let base = vec(1, 50, 1.0);
    let mut scratch = vec![0u32; 2048];
    let mut out = vec![0.0f32; 50];
    // Identical models: all variances are zero, k = 0, nothing selected.
    let a = near(&base, 2, 0.1);
    sce(
        &[&a[..], &a[..]],
        &base,
        &SceOptions { select_topk: 0.5 },
        &mut scratch,
        &mut out,
    )
    .unwrap();
    assert_bits(&out, &base);
    // No selection: identical models agree everywhere -> the model.
    let r = sce(
        &[&a[..], &a[..]],
        &base,
        &SceOptions::new(),
        &mut scratch,
        &mut out,
    )
    .unwrap();
    assert_eq!(r.weights(), [0.5, 0.5]);
    for j in 0..50 {
        assert!((out[j] - a[j]).abs() < 1e-6);
    }
}

#[test]
fn bad_input_is_rejected_and_leaves_out_untouched() {
    let base = vec(1, 12, 1.0);
    let a = near(&base, 2, 0.1);
    let mut out = vec![SENTINEL; 12];
    assert!(matches!(
        model_stock(&[&a[..]], &base, &StockOptions::default(), &mut out),
        Err(Error::Unsupported { .. })
    ));
    assert_eq!(
        model_stock(
            &[&a[..], &a[..]],
            &base,
            &StockOptions { rows: Some(5) },
            &mut out
        )
        .unwrap_err(),
        Error::OutOfRange {
            arg: "rows",
            index: 0
        }
    );
    assert_eq!(
        model_stock(&[&a[..], &a[..4]], &base, &StockOptions::default(), &mut out).unwrap_err(),
        Error::LengthMismatch {
            arg: "models",
            index: 1,
            expected: 12,
            got: 4
        }
    );
    let mut scratch = vec![0u32; 2048];
    for bad in [0.0, -0.5, 1.01] {
        assert_eq!(
            sce(
                &[&a[..]],
                &base,
                &SceOptions { select_topk: bad },
                &mut scratch,
                &mut out
            )
            .unwrap_err(),
            Error::OutOfRange {
                arg: "select_topk",
                index: 0
            }
        );
    }
    assert_eq!(
        sce(
            &[&a[..]],
            &base,
            &SceOptions {
                select_topk: f64::NAN
            },
            &mut scratch,
            &mut out
        )
        .unwrap_err(),
        Error::NonFinite {
            arg: "select_topk",
            index: 0
        }
    );
    assert_eq!(
        sce(
            &[&a[..]],
            &base,
            &SceOptions { select_topk: 0.5 },
            &mut scratch[..10],
            &mut out
        )
        .unwrap_err(),
        Error::BufferTooShort {
            arg: "scratch",
            needed: 2048,
            got: 10
        }
    );
    assert_eq!(
        sce::<f32, f32>(&[], &base, &SceOptions::new(), &mut scratch, &mut out).unwrap_err(),
        Error::Empty { arg: "models" }
    );
    assert!(out.iter().all(|&v| v == SENTINEL));
}
