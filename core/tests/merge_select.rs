//! Top-k by magnitude: the radix select against a sorting reference, its
//! state machine under random chunkings, and its edge cases.

#![allow(clippy::needless_range_loop)]

mod merge_util;

use medley_core::Error;
use medley_core::merge::select::{
    HIST_LEN, SAMPLE_MIN, Threshold, TopK, magnitude_key, sample_ranges, top_k,
};
use merge_util::*;
use proptest::prelude::*;

fn kept(t: &Threshold, v: &[f32]) -> Vec<bool> {
    v.iter().enumerate().map(|(i, &x)| t.keeps(i as u64, x)).collect()
}

/// Runs the state machine over `v` with the given chunk boundaries (and the
/// given strategy; `skip` feeds only the sample during a sample pass);
/// returns the threshold and the number of passes.
fn run(v: &[f32], k: usize, cuts: &[usize], sampled: bool, skip: bool) -> (Threshold, usize) {
    let mut sel = TopK::with_strategy(v.len() as u64, k as u64, sampled).unwrap();
    let mut work = vec![0u32; sel.work_len()];
    let mut passes = 0;
    while !sel.is_done() {
        for w in cuts.windows(2) {
            if skip && !sel.wants_all() {
                for (lo, hi) in sample_ranges(w[0] as u64, w[1] as u64) {
                    sel.skip(lo - sel.fed()).unwrap();
                    sel.feed(&v[lo as usize..hi as usize], &mut work).unwrap();
                }
                sel.skip(w[1] as u64 - sel.fed()).unwrap();
            } else {
                sel.feed(&v[w[0]..w[1]], &mut work).unwrap();
            }
        }
        sel.end_pass(&mut work).unwrap();
        passes += 1;
    }
    (sel.threshold().unwrap(), passes)
}

fn chunked(v: &[f32], k: usize, cuts: &[usize]) -> (Threshold, usize) {
    run(v, k, cuts, false, false)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn exactly_k_kept_matching_the_sorted_reference(
        seed in any::<u64>(), n in 0usize..3000, kfrac in 0.0f64..=1.0, tied in any::<bool>(),
    ) {
        let v = if tied { grid(seed, n, 6) } else { vec(seed, n, 3.0) };
        let k = count(kfrac, n);
        let t = top_k(&v, k).unwrap();
        let got = kept(&t, &v);
        prop_assert_eq!(got.iter().filter(|&&b| b).count(), k);
        prop_assert_eq!(got, topk_mask(&v, k));
    }

    #[test]
    fn any_chunking_gives_the_one_shot_threshold(
        seed in any::<u64>(), n in 1usize..2500, kfrac in 0.0f64..=1.0, parts in 0usize..12, tied in any::<bool>(),
    ) {
        let v = if tied { grid(seed, n, 3) } else { vec(seed, n, 1.0) };
        let k = count(kfrac, n);
        let one = top_k(&v, k).unwrap();
        let (t, passes) = chunked(&v, k, &cuts(seed ^ 1, n, parts));
        prop_assert_eq!(t, one);
        prop_assert!(passes <= 4);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn sampled_strategy_selects_the_same_set_in_two_passes(
        seed in any::<u64>(), n in 1usize..400_000, kfrac in 0.0f64..=1.0, parts in 0usize..6, tied in any::<bool>(),
        skip in any::<bool>(),
    ) {
        let v = if tied { grid(seed, n, 40) } else { vec(seed, n, 1.0) };
        let k = count(kfrac, n);
        let (t, passes) = run(&v, k, &cuts(seed ^ 2, n, parts), true, skip);
        let got = kept(&t, &v);
        prop_assert_eq!(got.iter().filter(|&&b| b).count(), k);
        prop_assert_eq!(&got, &topk_mask(&v, k));
        // iid data: the band never misses.
        prop_assert!(passes <= 2, "{} passes", passes);
    }
}

#[test]
fn sampled_strategy_falls_back_when_the_sample_lies() {
    // The sampled lines hold tiny values, everything else large ones: the
    // band from the sample misses, the radix passes finish exactly.
    let n = 300_000;
    let mut v = vec(4, n, 1.0);
    for (lo, hi) in sample_ranges(0, n as u64) {
        for x in &mut v[lo as usize..hi as usize] {
            *x *= 1e-6;
        }
    }
    for k in [1, 1000, 150_000, 299_999] {
        let (t, passes) = run(&v, k, &[0, 77_777, n], true, true);
        // (For k = n - 1 the band still holds the answer: nothing to fall
        // back from.)
        assert!(passes > 2 || k == 299_999, "k {k}: {passes} passes");
        assert_eq!(kept(&t, &v), topk_mask(&v, k), "k {k}");
    }
    // A tie level larger than the candidate buffer: the band histogram
    // pins the k-th key to one bin; a radix pass inside it and a tie pass
    // finish (instead of the 4 radix passes of a full fallback).
    let mut r = Rng(8);
    let v: Vec<f32> = (0..n)
        .map(|_| if r.below(10) < 4 { -1.0 } else { r.unit() * 3.0 })
        .collect();
    let above = v.iter().filter(|x| x.abs() > 1.0).count();
    for k in [above + 1, above + 50_000, above + 119_000] {
        let (t, passes) = run(&v, k, &[0, 1234, n], true, true);
        assert!(passes <= 4, "k {k}: {passes} passes");
        assert_eq!(kept(&t, &v), topk_mask(&v, k), "k {k}");
    }
    // A dense cluster of distinct values: radix passes inside one bin.
    let v: Vec<f32> = (0..n)
        .map(|_| {
            if r.below(2) == 0 {
                1.0 + r.unit().abs() * 1e-4
            } else {
                r.unit()
            }
        })
        .collect();
    for k in [1000, 100_000, 160_000] {
        let (t, _) = run(&v, k, &[0, n / 3, n], true, false);
        assert_eq!(kept(&t, &v), topk_mask(&v, k), "k {k}");
    }
    // The automatic choice samples from SAMPLE_MIN on.
    assert!(TopK::new(SAMPLE_MIN, 5).unwrap().work_len() > HIST_LEN);
    assert_eq!(TopK::new(SAMPLE_MIN - 1, 5).unwrap().work_len(), HIST_LEN);
    assert!(!TopK::new(SAMPLE_MIN, 5).unwrap().wants_all());
    assert_eq!(
        TopK::new(SAMPLE_MIN, 0).unwrap().threshold(),
        Some(Threshold::NONE)
    );
}

#[test]
fn ties_go_to_the_lower_index() {
    let v = [1.0f32, -1.0, 1.0, 0.5, -1.0, 2.0];
    let t = top_k(&v, 3).unwrap();
    assert_eq!(kept(&t, &v), [true, true, false, false, false, true]);
    // The tie pass ran: cutoff is just after index 1.
    assert_eq!(t.key(), magnitude_key(1.0));
    assert_eq!(t.cutoff(), 2);
}

#[test]
fn zeros_nan_and_infinities() {
    let z = [0.0f32, -0.0, 0.0, 0.0];
    let t = top_k(&z, 2).unwrap();
    assert_eq!(kept(&t, &z), [true, true, false, false]);
    let v = [1.0f32, f32::NAN, f32::NEG_INFINITY, 3.0, f32::INFINITY];
    let t = top_k(&v, 2).unwrap();
    // NaN ranks above +-inf; -inf and +inf tie in magnitude.
    assert_eq!(kept(&t, &v), [false, true, true, false, false]);
    assert_eq!(top_k(&v, 0).unwrap(), Threshold::NONE);
    assert_eq!(top_k(&v, 5).unwrap(), Threshold::ALL);
    assert_eq!(top_k::<f32>(&[], 0).unwrap(), Threshold::NONE);
}

#[test]
fn half_precision_inputs_select_on_their_f32_values() {
    use medley_core::{bf16, f16};
    let v = vec(9, 777, 2.0);
    let b: Vec<bf16> = v.iter().map(|&x| bf16::from_f32(x)).collect();
    let h: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
    let bw: Vec<f32> = b.iter().map(|x| x.to_f32()).collect();
    let hw: Vec<f32> = h.iter().map(|x| x.to_f32()).collect();
    assert_eq!(kept(&top_k(&b, 100).unwrap(), &bw), topk_mask(&bw, 100));
    assert_eq!(kept(&top_k(&h, 333).unwrap(), &hw), topk_mask(&hw, 333));
}

#[test]
fn state_machine_errors_change_nothing() {
    assert_eq!(
        TopK::new(3, 4).unwrap_err(),
        Error::OutOfRange { arg: "k", index: 0 }
    );
    assert!(matches!(
        TopK::new(u32::MAX as u64 + 1, 1),
        Err(Error::TooLarge { arg: "n", .. })
    ));
    let v = vec(3, 100, 1.0);
    let mut sel = TopK::new(100, 10).unwrap();
    let mut hist = vec![0u32; HIST_LEN];
    let mut short = vec![0u32; HIST_LEN - 1];
    assert_eq!(
        sel.feed(&v, &mut short).unwrap_err(),
        Error::BufferTooShort {
            arg: "work",
            needed: HIST_LEN,
            got: HIST_LEN - 1
        }
    );
    sel.feed(&v[..60], &mut hist).unwrap();
    let before = sel;
    assert!(matches!(
        sel.feed(&v[..41], &mut hist),
        Err(Error::TooLarge { arg: "values", .. })
    ));
    assert_eq!(sel, before);
    assert_eq!(
        sel.end_pass(&mut hist).unwrap_err(),
        Error::LengthMismatch {
            arg: "values",
            index: 0,
            expected: 100,
            got: 60
        }
    );
    assert_eq!(sel, before);
    assert!(matches!(sel.skip(3), Err(Error::Unsupported { .. })));
    sel.feed(&v[60..], &mut hist).unwrap();
    sel.end_pass(&mut hist).unwrap();
    while !sel.is_done() {
        sel.feed(&v, &mut hist).unwrap();
        sel.end_pass(&mut hist).unwrap();
    }
    assert_eq!(sel.threshold().unwrap(), top_k(&v, 10).unwrap());
}
