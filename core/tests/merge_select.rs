//! Top-k by magnitude: the radix select against a sorting reference, its
//! state machine under random chunkings, and its edge cases.

mod merge_util;

use medley_core::Error;
use medley_core::merge::select::{HIST_LEN, Threshold, TopK, magnitude_key, top_k};
use merge_util::*;
use proptest::prelude::*;

fn kept(t: &Threshold, v: &[f32]) -> Vec<bool> {
    v.iter().enumerate().map(|(i, &x)| t.keeps(i as u64, x)).collect()
}

/// Runs the state machine over `v` with the given chunk boundaries; returns
/// the threshold and the number of passes.
fn chunked(v: &[f32], k: usize, cuts: &[usize]) -> (Threshold, usize) {
    let mut sel = TopK::new(v.len() as u64, k as u64).unwrap();
    let mut hist = vec![0u32; HIST_LEN];
    let mut passes = 0;
    while !sel.is_done() {
        for w in cuts.windows(2) {
            sel.feed(&v[w[0]..w[1]], &mut hist).unwrap();
        }
        sel.end_pass(&mut hist).unwrap();
        passes += 1;
    }
    (sel.threshold().unwrap(), passes)
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
            arg: "hist",
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
    sel.feed(&v[60..], &mut hist).unwrap();
    sel.end_pass(&mut hist).unwrap();
    while !sel.is_done() {
        sel.feed(&v, &mut hist).unwrap();
        sel.end_pass(&mut hist).unwrap();
    }
    assert_eq!(sel.threshold().unwrap(), top_k(&v, 10).unwrap());
}
