#![allow(clippy::needless_range_loop)]
//! The softmax family against the f64 reference, every dtype, strides,
//! temperatures, and the documented edge table.

mod common;

use common::{Gen, lse};
use medley_core::softmax::{log_softmax, log_softmax_inplace, logsumexp, softmax, softmax_inplace};
use medley_core::{Element, Error, Rows, RowsMut, bf16, f16};
use proptest::prelude::*;

fn check<T: Element>(seed: u64, to: fn(f32) -> T) -> Result<(), TestCaseError> {
    let mut g = Gen(seed);
    let rows = 1 + g.below(4);
    let long = g.chance(0.1);
    let len = g.below(if long { 5000 } else { 100 });
    let stride = len + g.below(4);
    let t = if g.chance(0.5) {
        1.0
    } else {
        g.range(0.05, 5.0) as f32
    };
    let p_mask = [0.0, 0.1, 0.9][g.below(3)];
    let scale = [1.0, 30.0, 1e4][g.below(3)];
    let data: Vec<T> = (0..rows * stride).map(|_| to(g.logit(scale, p_mask))).collect();
    let x = Rows::new(&data[..], rows, len, stride).unwrap();
    let mut lp = vec![f32::NAN; rows * len];
    let mut p = vec![f32::NAN; rows * len];
    let mut l = vec![f32::NAN; rows];
    let r1 = log_softmax(x, t, RowsMut::dense(&mut lp, rows, len).unwrap()).unwrap();
    let r2 = softmax(x, t, RowsMut::dense(&mut p, rows, len).unwrap()).unwrap();
    let r3 = logsumexp(x, t, &mut l).unwrap();
    prop_assert_eq!(r1, r2);
    prop_assert_eq!(r1, r3);
    let mut masked = 0;
    for b in 0..rows {
        let xs: Vec<f64> = data[b * stride..b * stride + len]
            .iter()
            .map(|v| v.to_f32() as f64 / t as f64)
            .collect();
        let want_lse = lse(&xs);
        let got_lp = &lp[b * len..(b + 1) * len];
        let got_p = &p[b * len..(b + 1) * len];
        if want_lse == f64::NEG_INFINITY {
            masked += 1;
            prop_assert_eq!(l[b], f32::NEG_INFINITY);
            prop_assert!(got_lp.iter().all(|&v| v == f32::NEG_INFINITY));
            prop_assert!(got_p.iter().all(|&v| v == 0.0));
            continue;
        }
        prop_assert!(
            (l[b] as f64 - want_lse).abs() <= 1e-5 * (1.0 + want_lse.abs()),
            "lse {} vs {want_lse}",
            l[b]
        );
        let mut s = 0.0f64;
        let (mut num, mut den) = (0.0, 0.0);
        for (i, &xv) in xs.iter().enumerate() {
            let want = xv - want_lse;
            if want == f64::NEG_INFINITY {
                prop_assert_eq!(got_lp[i], f32::NEG_INFINITY);
                prop_assert_eq!(got_p[i], 0.0);
                continue;
            }
            prop_assert!(
                (got_lp[i] as f64 - want).abs() <= 1e-5 * (1.0 + want.abs()),
                "{} vs {want}",
                got_lp[i]
            );
            let pw = want.exp();
            num += (got_p[i] as f64 - pw).powi(2);
            den += pw * pw;
            s += got_p[i] as f64;
        }
        prop_assert!((s - 1.0).abs() < 1e-5, "probs sum to {s}");
        prop_assert!((num / den).sqrt() < 1e-6);
    }
    prop_assert_eq!(r1.masked_rows, masked);
    prop_assert_eq!(r1.nan_rows, 0);
    // In-place forms agree bit for bit with the out-of-place ones (f32 rows).
    let up: Vec<f32> = data.iter().map(|v| v.to_f32()).collect();
    let mut a = up.clone();
    let mut lse_ip = vec![0.0f32; rows];
    log_softmax_inplace(
        RowsMut::new(&mut a, rows, len, stride).unwrap(),
        t,
        Some(&mut lse_ip),
    )
    .unwrap();
    let mut c = up.clone();
    softmax_inplace(RowsMut::new(&mut c, rows, len, stride).unwrap(), t).unwrap();
    for b in 0..rows {
        for i in 0..len {
            prop_assert_eq!(a[b * stride + i].to_bits(), lp[b * len + i].to_bits());
            prop_assert!((c[b * stride + i] - p[b * len + i]).abs() <= 2e-7);
        }
        // Padding between rows is never written.
        for i in len..stride.min(up.len() - b * stride) {
            prop_assert_eq!(a[b * stride + i].to_bits(), up[b * stride + i].to_bits());
        }
    }
    prop_assert_eq!(lse_ip, l);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]
    #[test]
    fn f32_matches_reference(seed in any::<u64>()) { check::<f32>(seed, |x| x)?; }
    #[test]
    fn f16_matches_reference(seed in any::<u64>()) { check::<f16>(seed, f16::from_f32)?; }
    #[test]
    fn bf16_matches_reference(seed in any::<u64>()) { check::<bf16>(seed, bf16::from_f32)?; }
}

#[test]
fn edge_table() {
    let inf = f32::INFINITY;
    let ninf = f32::NEG_INFINITY;
    // rows: mixed, all masked, two +inf, NaN
    let x = [
        0.0,
        ninf,
        1.0,
        ninf,
        ninf,
        ninf,
        inf,
        0.0,
        inf,
        0.0,
        f32::NAN,
        1.0,
    ];
    let v = Rows::dense(&x, 4, 3).unwrap();
    let mut p = [0.0f32; 12];
    let mut lp = [0.0f32; 12];
    let mut l = [0.0f32; 4];
    let r = softmax(v, 0.5, RowsMut::dense(&mut p, 4, 3).unwrap()).unwrap();
    log_softmax(v, 0.5, RowsMut::dense(&mut lp, 4, 3).unwrap()).unwrap();
    logsumexp(v, 0.5, &mut l).unwrap();
    assert_eq!(
        r,
        medley_core::Report {
            masked_rows: 1,
            nan_rows: 1
        }
    );
    assert_eq!(p[1], 0.0);
    assert_eq!(&p[3..6], &[0.0; 3]);
    assert_eq!(&lp[3..6], &[ninf; 3]);
    assert_eq!(&p[6..9], &[0.5, 0.0, 0.5]);
    assert_eq!(&lp[6..9], &[-(2f32.ln()), ninf, -(2f32.ln())]);
    assert!(p[9..].iter().chain(&lp[9..]).all(|v| v.is_nan()));
    assert_eq!(l[1], ninf);
    assert_eq!(l[2], inf);
    assert!(l[3].is_nan());
    // Empty rows are fully masked.
    let e: [f32; 0] = [];
    let mut out: [f32; 0] = [];
    let r = softmax(
        Rows::dense(&e, 2, 0).unwrap(),
        1.0,
        RowsMut::dense(&mut out, 2, 0).unwrap(),
    )
    .unwrap();
    assert_eq!(r.masked_rows, 2);
}

#[test]
fn huge_logits_with_small_temperature_do_not_overflow() {
    let x = [3.0e38f32, 2.9e38, -3.0e38];
    let mut p = [0.0f32; 3];
    let r = softmax(Rows::single(&x), 1e-3, RowsMut::single(&mut p)).unwrap();
    assert!(r.is_clean());
    assert_eq!(p, [1.0, 0.0, 0.0]);
}

#[test]
fn errors() {
    let x = [0.0f32; 6];
    let mut o = [9.0f32; 6];
    let v = Rows::dense(&x, 2, 3).unwrap();
    for (t, e) in [
        (
            0.0,
            Error::OutOfRange {
                arg: "temperature",
                index: 0,
            },
        ),
        (
            -1.0,
            Error::OutOfRange {
                arg: "temperature",
                index: 0,
            },
        ),
        (
            1e-40,
            Error::OutOfRange {
                arg: "temperature",
                index: 0,
            },
        ),
        (
            f32::NAN,
            Error::NonFinite {
                arg: "temperature",
                index: 0,
            },
        ),
        (
            f32::INFINITY,
            Error::NonFinite {
                arg: "temperature",
                index: 0,
            },
        ),
    ] {
        assert_eq!(
            softmax(v, t, RowsMut::dense(&mut o, 2, 3).unwrap()).unwrap_err(),
            e
        );
    }
    assert_eq!(
        softmax(v, 1.0, RowsMut::dense(&mut o, 3, 2).unwrap()).unwrap_err(),
        Error::LengthMismatch {
            arg: "out.rows",
            index: 0,
            expected: 2,
            got: 3
        }
    );
    assert_eq!(
        logsumexp(v, 1.0, &mut o[..3]).unwrap_err(),
        Error::LengthMismatch {
            arg: "out",
            index: 0,
            expected: 2,
            got: 3
        }
    );
    assert!(o.iter().all(|&v| v == 9.0));
}
