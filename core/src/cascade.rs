//! Cascades: answer most rows with a small model, escalate the uncertain
//! ones to a large model.
//!
//! [`defer`] takes one uncertainty score per row (**higher = more
//! uncertain**) and marks the rows to escalate, either above a fixed
//! threshold ([`Threshold::Value`]) or at a target escalation rate
//! ([`Threshold::Rate`]: exactly `round(rate * B)` rows, chosen by exact
//! selection, ties to the lower row index). A NaN score always escalates: a
//! row without a valid distribution must not be answered by the small model.
//!
//! Good scores, all "higher = more uncertain":
//! - the entropy of the small model's distribution, `-sum_v P(v) ln P(v)`;
//! - `1 - P(top1)`;
//! - the negative margin `-(P(top1) - P(top2))`;
//! - for an ensemble, the disagreement of its members (below).
//!
//! [`ensemble::Output`](crate::ensemble::Output) computes these per row
//! in the same pass as the combination: `entropy`, `top1_prob`, `margin`
//! and, for linear mixtures, `disagreement` (the generalized Jensen-Shannon
//! divergence of the members). Pass `entropy` (or `disagreement`) straight
//! to [`defer`], or negate `top1_prob` / `margin` first. Rows without a
//! distribution (fully masked, NaN) have NaN there, so they escalate.
//!
//! # Recipe: a two-model cascade at a 25% escalation rate
//!
//! ```
//! use medley_core::cascade::{defer, defer_scratch_len, Threshold};
//! use medley_core::ensemble::{combine, Config, Model, Output};
//! use medley_core::{Rows, RowsMut};
//! let (rows, v) = (4, 3);
//! // The small model's logits: sure on rows 0, 1, 3, unsure on row 2.
//! let small = [5.0f32, 0.0, 0.0,  0.0, 5.0, 0.0,  1.0, 1.1, 0.9,  0.0, 0.0, 4.0];
//! // Its distribution and per-row entropy in one call (one "model").
//! let mut p = [0.0f32; 12];
//! let mut entropy = [0.0f32; 4];
//! let out = Output {
//!     probs: Some(RowsMut::dense(&mut p, rows, v)?),
//!     entropy: Some(&mut entropy),
//!     ..Default::default()
//! };
//! combine(&[Model::new(Rows::dense(&small, rows, v)?)], &Config::linear(&[1.0]), out)?;
//! // Escalate the 25% most uncertain rows.
//! let rate = Threshold::Rate(0.25);
//! let mut scratch = vec![0.0f32; defer_scratch_len(rows, rate)];
//! let mut escalate = [false; 4];
//! let d = defer(&entropy, rate, &mut scratch, &mut escalate)?;
//! assert_eq!((d.count, escalate), (1, [false, false, true, false]));
//! // Run the large model on the escalated rows only (gather, run, scatter),
//! // and merge: each row's answer comes from the model that handled it.
//! let large_answer = |_row: usize| 1u32; // stands in for the large model
//! let answers: Vec<u32> = (0..rows)
//!     .map(|b| if escalate[b] { large_answer(b) } else {
//!         let r = &p[b * v..(b + 1) * v];
//!         (0..v).max_by(|&i, &j| r[i].total_cmp(&r[j])).unwrap() as u32
//!     })
//!     .collect();
//! assert_eq!(answers, [0, 1, 1, 2]);
//! // Later batches can reuse the threshold the rate selected.
//! assert_eq!(d.threshold, entropy[2]);
//! # Ok::<(), medley_core::Error>(())
//! ```
//!
//! To escalate at a fixed entropy instead, use `Threshold::Value(t)`
//! (calibrate `t` once on held-out data with `Threshold::Rate`, as above).
//!
//! # Recipes for ensembles of one model
//!
//! - **MC dropout.** Run the model `n` times with dropout left on (different
//!   seeds), giving `n` sets of logits for the same rows. Combine them with
//!   [`ensemble::combine`](crate::ensemble::combine) in linear mode with
//!   equal weights (`Config::linear(&[1.0; n])`; the weights are normalized),
//!   which is the Monte-Carlo estimate of the predictive distribution. The
//!   members' disagreement (the `disagreement` output, mutual information
//!   between prediction and dropout mask) measures the model's
//!   *epistemic* uncertainty; the entropy of the mixture measures the total.
//!   Either can feed [`defer`].
//! - **Bagging.** Train `n` models on bootstrap resamples of the data and
//!   combine them the same way (linear, equal weights); disagreement again
//!   flags rows the data does not pin down. With held-out data,
//!   [`learn::fit_linear_em`](crate::learn::fit_linear_em) fits unequal
//!   weights instead.
//! - **Checkpoint ensembles** ("average the last 5 checkpoints"). Either
//!   average the *predictions*: the 5 checkpoints are 5 models for
//!   [`ensemble::combine`](crate::ensemble::combine), linear with uniform
//!   weights (5 forward passes per token, and disagreement comes for free);
//!   or average the *weights* once: [`merge::linear::average`](crate::merge::linear::average)
//!   is the uniform soup of the checkpoints' tensors (one model, one forward
//!   pass; checkpoints of one training run are usually close enough in
//!   weight space for this to work), and
//!   [`merge::soup::greedy_soup`](crate::merge::soup::greedy_soup) keeps only
//!   the checkpoints that help a held-out score.

use crate::error::{Error, ensure, ensure_len};

/// How [`defer`] picks the rows to escalate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    /// Defer the rows with uncertainty `u > t` (and NaN). `t` may be
    /// infinite (`+inf`: only NaN rows defer), not NaN.
    Value(f32),
    /// Defer exactly `k = round(rate * B)` rows (halves round up), the `k`
    /// most uncertain, ties broken by the lower row index; `0 <= rate <= 1`.
    /// NaN rows are the most uncertain of all: if more than `k` rows are
    /// NaN, exactly the NaN rows defer.
    Rate(f32),
}

/// What [`defer`] decided.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Deferral {
    /// Rows deferred.
    pub count: usize,
    /// The threshold used: `t` for [`Threshold::Value`]; for
    /// [`Threshold::Rate`], the uncertainty of the least uncertain deferred
    /// row that is not NaN (every row above it is deferred; rows equal to it
    /// are deferred in row order until the count is reached), or `+inf` when
    /// only NaN rows (or none) are deferred.
    pub threshold: f32,
}

/// Scratch elements [`defer`] needs for `rows` rows: `rows` for
/// [`Threshold::Rate`], 0 for [`Threshold::Value`].
///
/// ```
/// use medley_core::cascade::{defer_scratch_len, Threshold};
/// assert_eq!(defer_scratch_len(10, Threshold::Rate(0.1)), 10);
/// assert_eq!(defer_scratch_len(10, Threshold::Value(2.0)), 0);
/// ```
pub fn defer_scratch_len(rows: usize, threshold: Threshold) -> usize {
    match threshold {
        Threshold::Value(_) => 0,
        Threshold::Rate(_) => rows,
    }
}

/// Marks the rows to escalate: `defer[b] = true` for each deferred row,
/// `false` for the others. `uncertainty` holds one score per row, higher =
/// more uncertain; NaN always defers. See [`Threshold`] for the two modes.
///
/// [`Threshold::Rate`] selects the `k`-th largest score exactly, by
/// introselect over a copy of the non-NaN scores in `scratch` (at least
/// [`defer_scratch_len`] elements; clobbered): `O(B)`, no sorting, no
/// allocation, the caller's data untouched. Then the rows above it defer,
/// and rows equal to it defer in row order until exactly `k` rows (with the
/// NaN rows) are deferred. `-0.0` and `0.0` count as equal.
///
/// Errors (checked before anything is written): [`Error::LengthMismatch`]
/// (`defer` not of length `B`), [`Error::BufferTooShort`] (`scratch`),
/// [`Error::NonFinite`] (`threshold`: a NaN value or rate, an infinite rate),
/// [`Error::OutOfRange`] (`threshold`: a rate outside `[0, 1]`).
///
/// ```
/// use medley_core::cascade::{defer, Threshold};
/// let u = [0.5f32, 2.0, f32::NAN, 2.0, 0.1];
/// let mut d = [false; 5];
/// let r = defer(&u, Threshold::Value(1.0), &mut [], &mut d)?;
/// assert_eq!((r.count, d), (3, [false, true, true, true, false]));
/// // Exactly round(0.4 * 5) = 2 rows: the NaN row, then the first 2.0.
/// let mut scratch = [0.0f32; 5];
/// let r = defer(&u, Threshold::Rate(0.4), &mut scratch, &mut d)?;
/// assert_eq!((r.count, r.threshold, d), (2, 2.0, [false, true, true, false, false]));
/// # Ok::<(), medley_core::Error>(())
/// ```
pub fn defer(
    uncertainty: &[f32],
    threshold: Threshold,
    scratch: &mut [f32],
    defer: &mut [bool],
) -> Result<Deferral, Error> {
    let n = uncertainty.len();
    ensure_len("defer", n, defer.len())?;
    match threshold {
        Threshold::Value(t) => {
            ensure(
                !t.is_nan(),
                Error::NonFinite {
                    arg: "threshold",
                    index: 0,
                },
            )?;
            let mut count = 0;
            for (d, &u) in defer.iter_mut().zip(uncertainty) {
                *d = u.is_nan() || u > t;
                count += *d as usize;
            }
            Ok(Deferral { count, threshold: t })
        }
        Threshold::Rate(r) => {
            ensure(
                r.is_finite(),
                Error::NonFinite {
                    arg: "threshold",
                    index: 0,
                },
            )?;
            ensure(
                (0.0..=1.0).contains(&r),
                Error::OutOfRange {
                    arg: "threshold",
                    index: 0,
                },
            )?;
            ensure(
                scratch.len() >= n,
                Error::BufferTooShort {
                    arg: "scratch",
                    needed: n,
                    got: scratch.len(),
                },
            )?;
            let k = ((r as f64 * n as f64 + 0.5) as usize).min(n);
            // The non-NaN scores, in row order.
            let mut valid = 0;
            for &u in uncertainty {
                if !u.is_nan() {
                    scratch[valid] = u;
                    valid += 1;
                }
            }
            let nan = n - valid;
            let want = k.saturating_sub(nan); // non-NaN rows to defer
            if want == 0 {
                for (d, &u) in defer.iter_mut().zip(uncertainty) {
                    *d = u.is_nan();
                }
                return Ok(Deferral {
                    count: nan,
                    threshold: f32::INFINITY,
                });
            }
            // The want-th largest score: index want - 1 in descending order.
            let s = &mut scratch[..valid];
            let (_, &mut t, _) = s.select_nth_unstable_by(want - 1, |a, b| b.total_cmp(a));
            let above = uncertainty.iter().filter(|&&u| u > t).count();
            let mut ties = want - above; // rows equal to t still to defer
            for (d, &u) in defer.iter_mut().zip(uncertainty) {
                *d = if u.is_nan() || u > t {
                    true
                } else if u == t && ties > 0 {
                    ties -= 1;
                    true
                } else {
                    false
                };
            }
            Ok(Deferral {
                count: nan + want,
                threshold: t,
            })
        }
    }
}
