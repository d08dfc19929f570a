//! Greedy and pruned soups against straightforward reference
//! implementations of the recipes (candidates built with `average`).

#![allow(clippy::needless_range_loop)]

mod merge_util;

use medley_core::Error;
use medley_core::merge::linear::average;
use medley_core::merge::soup::{greedy_soup, pruned_soup};
use merge_util::*;
use proptest::prelude::*;

fn soup_of(models: &[Vec<f32>], sel: &[bool]) -> Vec<f32> {
    let v: Vec<&[f32]> = models
        .iter()
        .zip(sel)
        .filter(|(_, s)| **s)
        .map(|(x, _)| &x[..])
        .collect();
    let mut out = vec![0.0f32; models[0].len()];
    average(&v, &mut out).unwrap();
    out
}

/// Score: closeness to a target, quantized so that exact ties happen.
fn scorer(target: Vec<f32>, quantum: f32) -> impl Fn(&[f32]) -> f32 {
    move |s: &[f32]| {
        let d: f32 = s.iter().zip(&target).map(|(a, b)| (a - b) * (a - b)).sum();
        -(d / quantum).round() * quantum
    }
}

fn greedy_ref(models: &[Vec<f32>], f: &dyn Fn(&[f32]) -> f32) -> (Vec<bool>, f32, usize) {
    let m = models.len();
    let own: Vec<f32> = models.iter().map(|x| f(x)).collect();
    let mut order: Vec<usize> = (0..m).collect();
    order.sort_by(|&a, &b| {
        let (sa, sb) = (own[a], own[b]);
        let ka = if sa.is_nan() { f32::NEG_INFINITY } else { sa };
        let kb = if sb.is_nan() { f32::NEG_INFINITY } else { sb };
        kb.partial_cmp(&ka)
            .unwrap()
            .then((sa.is_nan()).cmp(&sb.is_nan()))
            .then(a.cmp(&b))
    });
    let mut sel = vec![false; m];
    sel[order[0]] = true;
    let mut best = own[order[0]];
    let mut evals = m;
    for &c in &order[1..] {
        sel[c] = true;
        let s = f(&soup_of(models, &sel));
        evals += 1;
        if !s.is_nan() && (best.is_nan() || s >= best) {
            best = s;
        } else {
            sel[c] = false;
        }
    }
    (sel, best, evals)
}

fn pruned_ref(models: &[Vec<f32>], passes: usize, f: &dyn Fn(&[f32]) -> f32) -> (Vec<bool>, f32, usize) {
    let m = models.len();
    let mut sel = vec![true; m];
    let mut score = f(&soup_of(models, &sel));
    let mut evals = 1;
    for _ in 0..passes {
        let mut removed = false;
        for i in 0..m {
            if !sel[i] || sel.iter().filter(|&&s| s).count() == 1 {
                continue;
            }
            sel[i] = false;
            let s = f(&soup_of(models, &sel));
            evals += 1;
            if !s.is_nan() && (score.is_nan() || s >= score) {
                score = s;
                removed = true;
            } else {
                sel[i] = true;
            }
        }
        if !removed {
            break;
        }
    }
    (sel, score, evals)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn greedy_soup_follows_the_recipe(seed in any::<u64>(), n in 1usize..300, m in 1usize..9, quantum in 0.0001f32..0.5) {
        let target = vec(seed, n, 1.0);
        let models: Vec<Vec<f32>> = (0..m).map(|i| near(&target, seed + 1 + i as u64, 0.1 + 0.1 * i as f32)).collect();
        let f = scorer(target.clone(), quantum);
        let views: Vec<&[f32]> = models.iter().map(|x| &x[..]).collect();
        let mut sel = vec![false; m];
        let mut soup = vec![0.0f32; n];
        let r = greedy_soup(&views, None, &f, &mut sel, &mut soup).unwrap();
        let (want_sel, want_score, evals) = greedy_ref(&models, &f);
        prop_assert_eq!(&sel, &want_sel);
        prop_assert_eq!(r.score, want_score);
        prop_assert_eq!(r.evaluations, evals);
        prop_assert_eq!(r.ingredients, sel.iter().filter(|&&s| s).count());
        assert_bits(&soup, &soup_of(&models, &sel));
        prop_assert_eq!(f(&soup), r.score);
        // Given the own scores, the same soup with M fewer evaluations.
        let own: Vec<f32> = models.iter().map(|x| f(x)).collect();
        let mut sel2 = vec![false; m];
        let r2 = greedy_soup(&views, Some(&own), &f, &mut sel2, &mut soup).unwrap();
        prop_assert_eq!(sel2, sel);
        prop_assert_eq!(r2.evaluations + m, r.evaluations);
        // Never worse than the best ingredient.
        prop_assert!(own.iter().all(|&s| r.score >= s));
    }

    #[test]
    fn pruned_soup_follows_the_recipe(seed in any::<u64>(), n in 1usize..300, m in 1usize..9, passes in 0usize..4, quantum in 0.0001f32..0.5) {
        let target = vec(seed, n, 1.0);
        let models: Vec<Vec<f32>> = (0..m).map(|i| near(&target, seed + 1 + i as u64, 0.05 + 0.2 * (i % 3) as f32)).collect();
        let f = scorer(target.clone(), quantum);
        let views: Vec<&[f32]> = models.iter().map(|x| &x[..]).collect();
        let mut sel = vec![false; m];
        let mut soup = vec![0.0f32; n];
        let r = pruned_soup(&views, passes, &f, &mut sel, &mut soup).unwrap();
        let (want_sel, want_score, evals) = pruned_ref(&models, passes, &f);
        prop_assert_eq!(&sel, &want_sel);
        prop_assert_eq!(r.score, want_score);
        prop_assert_eq!(r.evaluations, evals);
        assert_bits(&soup, &soup_of(&models, &sel));
        prop_assert!(r.ingredients >= 1);
        // Never worse than the uniform soup.
        prop_assert!(r.score >= f(&soup_of(&models, &vec![true; m])));
    }
}

#[test]
fn nan_scores_are_never_accepted() {
    let a = [1.0f32; 4];
    let b = [2.0f32; 4];
    let c = [3.0f32; 4];
    // Scores NaN whenever the soup contains a 3.
    let f = |s: &[f32]| if s[0] > 1.9 { f32::NAN } else { -s[0] };
    let mut sel = [false; 3];
    let mut soup = [0.0f32; 4];
    let r = greedy_soup(&[&a[..], &b[..], &c[..]], None, f, &mut sel, &mut soup).unwrap();
    assert_eq!(sel, [true, false, false]);
    assert_eq!(r.score, -1.0);
}

#[test]
fn bad_input_is_rejected_without_calling_eval() {
    let a = [1.0f32; 4];
    let b = [2.0f32; 3];
    let mut calls = 0;
    let mut f = |_: &[f32]| {
        calls += 1;
        0.0
    };
    let mut sel = [false; 2];
    let mut soup = [SENTINEL; 4];
    assert_eq!(
        greedy_soup(&[&a[..], &b[..]], None, &mut f, &mut sel, &mut soup).unwrap_err(),
        Error::LengthMismatch {
            arg: "models",
            index: 1,
            expected: 4,
            got: 3
        }
    );
    assert_eq!(
        greedy_soup(&[&a[..], &a[..]], Some(&[1.0]), &mut f, &mut sel, &mut soup).unwrap_err(),
        Error::LengthMismatch {
            arg: "scores",
            index: 0,
            expected: 2,
            got: 1
        }
    );
    assert_eq!(
        pruned_soup(&[&a[..], &a[..]], 2, &mut f, &mut sel[..1], &mut soup).unwrap_err(),
        Error::LengthMismatch {
            arg: "selected",
            index: 0,
            expected: 2,
            got: 1
        }
    );
    assert_eq!(
        pruned_soup::<f32, _>(&[], 2, &mut f, &mut [], &mut soup).unwrap_err(),
        Error::Empty { arg: "models" }
    );
    assert_eq!(calls, 0);
    assert!(soup.iter().all(|&v| v == SENTINEL));
    assert_eq!(sel, [false; 2]);
}
