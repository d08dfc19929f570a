//! Model-soup recipes driven by a held-out score: greedy soup (Wortsman et
//! al., ICML 2022) and pruned soup (start from the uniform soup, remove
//! ingredients).
//!
//! Both work on flat parameter vectors (one tensor, or a whole model
//! flattened by the caller) and a caller callback `eval(&soup) -> score`
//! (higher is better) that scores a candidate soup held in the caller's
//! `soup` buffer. Nothing is allocated. A NaN score counts as the worst
//! possible score (never accepted, ranks last).
//!
//! Every candidate is the **uniform soup of its ingredients**, recomputed
//! from the ingredients in index order by
//! [`average`](super::linear::average()), so the returned soup is
//! bit-identical to `average` of the selected models, with no drift from
//! incremental updates. Each candidate costs one pass over its ingredients.

use super::linear::average;
use super::{MAX_MODELS, TILE, as_f32, check_models};
use crate::element::Element;
use crate::error::{Error, ensure_len};

/// What a soup recipe did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SoupReport {
    /// Number of ingredients in the final soup.
    pub ingredients: usize,
    /// Held-out score of the final soup (as returned by `eval`).
    pub score: f32,
    /// Number of `eval` calls made.
    pub evaluations: usize,
}

/// `a` is at least as good as `b`, NaN being the worst score.
#[inline]
fn not_worse(a: f32, b: f32) -> bool {
    if a.is_nan() { false } else { b.is_nan() || a >= b }
}

/// `soup` = [`average`] of the selected models, in index order.
fn uniform_soup<T: Element>(models: &[&[T]], selected: &[bool], soup: &mut [f32]) {
    let mut views: [&[T]; MAX_MODELS] = [&[]; MAX_MODELS];
    let mut k = 0;
    for (x, _) in models.iter().zip(selected).filter(|(_, s)| **s) {
        views[k] = x;
        k += 1;
    }
    average(&views[..k], soup).expect("validated: same lengths, at least one ingredient");
}

fn check<T>(models: &[&[T]], selected: &[bool], soup: &[f32]) -> Result<(), Error> {
    let n = soup.len();
    check_models(models, n, MAX_MODELS)?;
    ensure_len("selected", models.len(), selected.len())
}

/// Greedy soup: rank the ingredients by their own score (descending; ties
/// to the lower index; NaN last), start from the best one, and add each next
/// candidate only if the held-out score of the uniform soup with it does not
/// drop (`score >= best`). On return `selected[i]` tells whether model `i`
/// is in the soup and `soup` holds it.
///
/// `scores`: the models' own held-out scores if the caller has them;
/// `None` evaluates each model first (`M` more calls, each with the model
/// copied into `soup`).
///
/// Errors (nothing is written and `eval` is not called on error):
/// [`Error::Empty`] / [`Error::TooLarge`] / [`Error::LengthMismatch`]
/// (`models`: none, more than [`MAX_MODELS`], a length other than
/// `soup.len()`; `selected`, `scores` not one per model).
///
/// ```
/// use medley_core::merge::soup::greedy_soup;
/// let good = [1.0f32, 1.0];
/// let ok = [0.8f32, 1.2];
/// let bad = [-5.0f32, 9.0];
/// // Score: closeness to (1, 1).
/// let eval = |s: &[f32]| -((s[0] - 1.0).powi(2) + (s[1] - 1.0).powi(2));
/// let mut selected = [false; 3];
/// let mut soup = [0.0f32; 2];
/// let r = greedy_soup(&[&good[..], &ok[..], &bad[..]], None, eval, &mut selected, &mut soup).unwrap();
/// assert_eq!(selected, [true, false, false]);
/// assert_eq!(r.ingredients, 1);
/// ```
pub fn greedy_soup<T: Element, F: FnMut(&[f32]) -> f32>(
    models: &[&[T]],
    scores: Option<&[f32]>,
    mut eval: F,
    selected: &mut [bool],
    soup: &mut [f32],
) -> Result<SoupReport, Error> {
    check(models, selected, soup)?;
    let m = models.len();
    if let Some(s) = scores {
        ensure_len("scores", m, s.len())?;
    }
    let mut evaluations = 0;
    let mut own = [0.0f32; MAX_MODELS];
    match scores {
        Some(s) => own[..m].copy_from_slice(s),
        None => {
            for (i, x) in models.iter().enumerate() {
                let mut buf = [0.0f32; TILE];
                for (c, o) in x.chunks(TILE).zip(soup.chunks_mut(TILE)) {
                    o.copy_from_slice(as_f32(c, &mut buf));
                }
                own[i] = eval(soup);
                evaluations += 1;
            }
        }
    }
    // Order by own score, descending, ties to the lower index, NaN last
    // (an insertion sort of at most MAX_MODELS indices).
    let mut order = [0usize; MAX_MODELS];
    for (i, o) in order[..m].iter_mut().enumerate() {
        *o = i;
    }
    let better = |a: usize, b: usize| -> bool {
        let (sa, sb) = (own[a], own[b]);
        match (sa.is_nan(), sb.is_nan()) {
            (false, true) => true,
            (true, false) => false,
            (true, true) => a < b,
            (false, false) => sa > sb || (sa == sb && a < b),
        }
    };
    for i in 1..m {
        let mut j = i;
        while j > 0 && better(order[j], order[j - 1]) {
            order.swap(j, j - 1);
            j -= 1;
        }
    }
    selected.fill(false);
    selected[order[0]] = true;
    let mut best = own[order[0]];
    let mut count = 1;
    for &c in &order[1..m] {
        selected[c] = true;
        uniform_soup(models, selected, soup);
        let s = eval(soup);
        evaluations += 1;
        if not_worse(s, best) {
            best = s;
            count += 1;
        } else {
            selected[c] = false;
        }
    }
    uniform_soup(models, selected, soup);
    Ok(SoupReport {
        ingredients: count,
        score: best,
        evaluations,
    })
}

/// Pruned soup: start from the uniform soup of all models; in each of up to
/// `passes` passes, visit the remaining ingredients in index order and
/// remove one whenever the held-out score of the soup without it does not
/// drop (`score >= current`), never removing the last one. Stops early after
/// a pass that removes nothing. On return `selected` and `soup` describe the
/// final soup.
///
/// Errors: as [`greedy_soup`] (nothing is written and `eval` is not called
/// on error).
pub fn pruned_soup<T: Element, F: FnMut(&[f32]) -> f32>(
    models: &[&[T]],
    passes: usize,
    mut eval: F,
    selected: &mut [bool],
    soup: &mut [f32],
) -> Result<SoupReport, Error> {
    check(models, selected, soup)?;
    let m = models.len();
    selected.fill(true);
    uniform_soup(models, selected, soup);
    let mut score = eval(soup);
    let mut evaluations = 1;
    let mut count = m;
    for _ in 0..passes {
        let mut removed = false;
        for i in 0..m {
            if !selected[i] || count == 1 {
                continue;
            }
            selected[i] = false;
            uniform_soup(models, selected, soup);
            let s = eval(soup);
            evaluations += 1;
            if not_worse(s, score) {
                score = s;
                count -= 1;
                removed = true;
            } else {
                selected[i] = true;
            }
        }
        if !removed {
            break;
        }
    }
    uniform_soup(models, selected, soup);
    Ok(SoupReport {
        ingredients: count,
        score,
        evaluations,
    })
}
