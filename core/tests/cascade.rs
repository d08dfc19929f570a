//! `cascade::defer` against a sorting reference: exact counts, ties to the
//! lower row index, NaN always deferred, and the documented errors.

mod common;

use common::Gen;
use medley_core::Error;
use medley_core::cascade::{Threshold, defer, defer_scratch_len};
use proptest::prelude::*;

/// Reference: order rows by (NaN first, uncertainty descending, index
/// ascending) with a full sort and take the first `max(k, #NaN)`.
fn ref_rate(u: &[f32], rate: f32) -> (Vec<bool>, usize, f32) {
    let n = u.len();
    let k = ((rate as f64 * n as f64) + 0.5).floor() as usize;
    let k = k.min(n);
    let mut idx: Vec<usize> = (0..n).collect();
    idx.sort_by(|&a, &b| {
        let key = |i: usize| (!u[i].is_nan(), if u[i].is_nan() { 0.0 } else { -u[i] });
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.partial_cmp(&kb.1).unwrap())
            .then(a.cmp(&b))
    });
    let nan = u.iter().filter(|x| x.is_nan()).count();
    let take = k.max(nan);
    let mut mask = vec![false; n];
    for &i in &idx[..take] {
        mask[i] = true;
    }
    let thr = if take > nan {
        u[idx[take - 1]]
    } else {
        f32::INFINITY
    };
    (mask, take, thr)
}

fn scores(g: &mut Gen, n: usize) -> Vec<f32> {
    let ties = g.chance(0.5);
    let p_nan = [0.0, 0.05, 0.3][g.below(3)];
    (0..n)
        .map(|_| {
            if g.chance(p_nan) {
                f32::NAN
            } else if ties {
                [0.0f32, -0.0, 0.5, 1.0, 2.0, f32::INFINITY, f32::NEG_INFINITY][g.below(7)]
            } else {
                g.range(-3.0, 3.0) as f32
            }
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn rate_defers_exactly_the_reference_rows(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let n = g.below(60);
        let u = scores(&mut g, n);
        let rate = if g.chance(0.2) { [0.0f32, 1.0, 0.5][g.below(3)] } else { g.unit() as f32 };
        let t = Threshold::Rate(rate);
        let mut scratch = vec![0.0f32; defer_scratch_len(n, t)];
        let mut d = vec![false; n];
        let before = u.clone();
        let r = defer(&u, t, &mut scratch, &mut d).unwrap();
        let (mask, count, thr) = ref_rate(&u, rate);
        prop_assert_eq!(&d, &mask);
        prop_assert_eq!(r.count, count);
        prop_assert_eq!(d.iter().filter(|&&x| x).count(), count);
        prop_assert!(r.threshold == thr, "{} vs {}", r.threshold, thr);
        prop_assert!(u.iter().zip(&before).all(|(a, b)| a.to_bits() == b.to_bits()));
    }

    #[test]
    fn value_defers_above_the_threshold_and_nan(seed in any::<u64>()) {
        let mut g = Gen(seed);
        let n = g.below(60);
        let u = scores(&mut g, n);
        let t = [f32::INFINITY, f32::NEG_INFINITY, 0.0, 1.0, g.range(-3.0, 3.0) as f32][g.below(5)];
        let mut d = vec![true; n];
        let r = defer(&u, Threshold::Value(t), &mut [], &mut d).unwrap();
        for i in 0..n {
            prop_assert_eq!(d[i], u[i].is_nan() || u[i] > t);
        }
        prop_assert_eq!(r.count, d.iter().filter(|&&x| x).count());
        prop_assert_eq!(r.threshold, t);
    }
}

#[test]
fn rate_counts_round_to_nearest() {
    let u: Vec<f32> = (0..100).map(|i| i as f32).collect();
    let mut s = [0.0f32; 100];
    let mut d = [false; 100];
    for (n, rate, k) in [
        (10, 0.7f32, 7),
        (10, 0.25, 3),
        (10, 0.24, 2),
        (100, 0.29, 29),
        (100, 1.0, 100),
        (100, 0.0, 0),
        (3, 0.5, 2),
    ] {
        let r = defer(&u[..n], Threshold::Rate(rate), &mut s, &mut d[..n]).unwrap();
        assert_eq!(r.count, k, "n {n} rate {rate}");
        // The k largest: the last k rows.
        assert!(d[..n].iter().enumerate().all(|(i, &x)| x == (i >= n - k)));
        let want = if k == 0 { f32::INFINITY } else { u[n - k] };
        assert_eq!(r.threshold, want);
    }
}

#[test]
fn ties_go_to_the_lower_row_index() {
    let u = [1.0f32, 3.0, 1.0, 3.0, 1.0, 3.0, 0.0, -0.0, 0.0];
    let mut s = [0.0f32; 9];
    let mut d = [false; 9];
    // round(5/9 * 9) = 5: the three 3.0s, then the first two 1.0s.
    let r = defer(&u, Threshold::Rate(5.0 / 9.0), &mut s, &mut d).unwrap();
    assert_eq!(d, [true, true, true, true, false, true, false, false, false]);
    assert_eq!((r.count, r.threshold), (5, 1.0));
    // -0.0 and 0.0 tie: 7 rows take the 1.0s and then row 6.
    let r = defer(&u, Threshold::Rate(7.0 / 9.0), &mut s, &mut d).unwrap();
    assert_eq!(d, [true, true, true, true, true, true, true, false, false]);
    assert_eq!(r.count, 7);
    assert_eq!(r.threshold, 0.0);
    let r = defer(&u, Threshold::Rate(8.0 / 9.0), &mut s, &mut d).unwrap();
    assert_eq!(d, [true, true, true, true, true, true, true, true, false]);
    assert_eq!(r.count, 8);
}

#[test]
fn nan_always_defers() {
    let u = [f32::NAN, 0.1, f32::NAN, 5.0, f32::NAN];
    let mut s = [0.0f32; 5];
    let mut d = [false; 5];
    // Rate 0: still the NaN rows.
    let r = defer(&u, Threshold::Rate(0.0), &mut s, &mut d).unwrap();
    assert_eq!(d, [true, false, true, false, true]);
    assert_eq!((r.count, r.threshold), (3, f32::INFINITY));
    // Rate 0.2 (1 row) < 3 NaN rows: exactly the NaN rows.
    let r = defer(&u, Threshold::Rate(0.2), &mut s, &mut d).unwrap();
    assert_eq!(r.count, 3);
    // Rate 0.8 (4 rows): the NaN rows and the largest score.
    let r = defer(&u, Threshold::Rate(0.8), &mut s, &mut d).unwrap();
    assert_eq!(d, [true, false, true, true, true]);
    assert_eq!((r.count, r.threshold), (4, 5.0));
    // A threshold of +inf defers only the NaN rows.
    let r = defer(&u, Threshold::Value(f32::INFINITY), &mut [], &mut d).unwrap();
    assert_eq!(d, [true, false, true, false, true]);
    assert_eq!(r.count, 3);
}

#[test]
fn empty_batches_defer_nothing() {
    let r = defer(&[], Threshold::Rate(0.5), &mut [], &mut []).unwrap();
    assert_eq!((r.count, r.threshold), (0, f32::INFINITY));
    let r = defer(&[], Threshold::Value(1.0), &mut [], &mut []).unwrap();
    assert_eq!(r.count, 0);
}

#[test]
fn bad_arguments_leave_the_mask_untouched() {
    let u = [0.5f32, 2.0, 1.0];
    let run = |t: Threshold, scratch: usize, out: usize| {
        let mut s = vec![0.0f32; scratch];
        let mut d: Vec<bool> = (0..out).map(|i| i % 2 == 0).collect();
        let before = d.clone();
        let r = defer(&u, t, &mut s, &mut d);
        assert_eq!(d, before);
        r.unwrap_err()
    };
    let th = |e| match e {
        0 => Error::NonFinite {
            arg: "threshold",
            index: 0,
        },
        _ => Error::OutOfRange {
            arg: "threshold",
            index: 0,
        },
    };
    assert_eq!(run(Threshold::Value(f32::NAN), 0, 3), th(0));
    assert_eq!(run(Threshold::Rate(f32::NAN), 3, 3), th(0));
    assert_eq!(run(Threshold::Rate(f32::INFINITY), 3, 3), th(0));
    assert_eq!(run(Threshold::Rate(-0.1), 3, 3), th(1));
    assert_eq!(run(Threshold::Rate(1.01), 3, 3), th(1));
    assert_eq!(
        run(Threshold::Rate(0.5), 2, 3),
        Error::BufferTooShort {
            arg: "scratch",
            needed: 3,
            got: 2
        }
    );
    assert_eq!(
        run(Threshold::Value(1.0), 0, 4),
        Error::LengthMismatch {
            arg: "defer",
            index: 0,
            expected: 3,
            got: 4
        }
    );
}
