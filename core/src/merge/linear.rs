//! Linear merges and task vectors: element-wise, one pass, no state.
//!
//! - [`linear`]: `out = sum_i w_i x_i` (or `/ sum_i w_i` with `normalize`,
//!   mergekit's default): parameter averaging, checkpoint averaging, weighted
//!   model soups. [`average`] is the uniform soup (`w_i = 1`, normalized).
//! - Task vectors (Ilharco et al., 2023): [`task_vector`] extracts
//!   `tau = x_ft - x_base`; [`add_task_vectors`] computes
//!   `x_base + lambda * sum_i w_i tau_i` (negative weights forget a task,
//!   `lambda` is task arithmetic's scaling coefficient); [`scale`] and
//!   [`negate`] act on one task vector. Task arithmetic straight from model
//!   tensors (`tau_i = x_i - x_base` fused) is
//!   [`gta::GtaOptions::task_arithmetic`](super::gta::GtaOptions::task_arithmetic).
//!
//! Every function here is element-wise: calling it on chunks of the tensors
//! (in any order, on any threads) writes exactly the bits of the one-shot
//! call. That is their streaming form.
//!
//! Arithmetic is `f32`. Unnormalized sums are mergekit's operation order
//! (products `w_i x_i` summed in model order). A **normalized** weighted
//! average `sum_i w_i x_i / sum_i w_i` is evaluated in the algebraically
//! equal anchored form `x_0 + sum_{i>=1} c_i (x_i - x_0)` with
//! `c_i = f32(w_i / W)`, `W = sum_i w_i` summed in order: it is exact when the
//! models agree (the uniform soup of identical models is the model, bit for
//! bit) and its rounding error scales with the differences between the
//! models (small for fine-tunes of one base) rather than with their
//! magnitudes. It agrees with mergekit's order to a few `f32` ulps. NaN
//! propagates element-wise; an infinite element becomes NaN in a normalized
//! average (`inf - inf`) where mergekit's order would give an infinity.

use super::{TILE, as_f32, check_finite, check_models, store, weight_sum};
use crate::element::Element;
use crate::error::{Error, ensure_len};

/// `acc = sum_m weights[m] * models[m][lo..hi]`, in model order.
#[inline(always)]
fn weighted_tile<T: Element>(
    models: &[&[T]],
    weights: &[f32],
    lo: usize,
    hi: usize,
    acc: &mut [f32],
    buf: &mut [f32],
) {
    let _ = buf;
    let acc = &mut acc[..hi - lo];
    let w0 = weights[0];
    // Conversions inline (no widened copy): `to_f32` is a move for `f32`, a
    // shift for `bf16`.
    for (a, &x) in acc.iter_mut().zip(&models[0][lo..hi]) {
        *a = w0 * x.to_f32();
    }
    for (m, &w) in models.iter().zip(weights).skip(1) {
        for (a, &x) in acc.iter_mut().zip(&m[lo..hi]) {
            *a += w * x.to_f32();
        }
    }
}

/// Weighted sum of `models` into `out`: `out = sum_i w_i x_i`, divided by
/// `sum_i w_i` when `normalize` (mergekit's `linear`, whose default is
/// `normalize: true`; evaluated in the anchored form described in the
/// module documentation). Weights may be negative.
///
/// Errors (nothing is written on error): [`Error::Empty`] (`models`),
/// [`Error::TooLarge`] (`models`, more than [`MAX_MODELS`](super::MAX_MODELS)),
/// [`Error::LengthMismatch`] (`models` of different lengths, `weights` not one
/// per model, `out` not as long as the models), [`Error::NonFinite`]
/// (`weights`), [`Error::ZeroSum`] (`weights`, with `normalize`, when the
/// sum is zero up to rounding: `|sum w| <= 1e-6 sum |w|`; mergekit divides
/// by it and writes inf/NaN).
///
/// ```
/// use medley_core::merge::linear::linear;
/// let a = [1.0f32, 2.0];
/// let b = [3.0f32, 6.0];
/// let mut out = [0.0f32; 2];
/// linear(&[&a[..], &b[..]], &[1.0, 3.0], true, &mut out).unwrap();
/// assert_eq!(out, [2.5, 5.0]);
/// ```
pub fn linear<T: Element, O: Element>(
    models: &[&[T]],
    weights: &[f32],
    normalize: bool,
    out: &mut [O],
) -> Result<(), Error> {
    let n = models.first().map_or(0, |m| m.len());
    check_models(models, n, super::MAX_MODELS)?;
    ensure_len("weights", models.len(), weights.len())?;
    check_finite("weights", weights)?;
    ensure_len("out", n, out.len())?;
    let div = if normalize {
        Some(weight_sum("weights", weights)?)
    } else {
        None
    };
    let mut acc = [0.0f32; TILE];
    let mut buf = [0.0f32; TILE];
    let mut lo = 0;
    crate::simd::dispatch(
        #[inline(always)]
        || match div {
            None => {
                while lo < n {
                    let hi = (lo + TILE).min(n);
                    weighted_tile(models, weights, lo, hi, &mut acc, &mut buf);
                    store(&acc[..hi - lo], &mut out[lo..hi]);
                    lo = hi;
                }
            }
            Some(w) => {
                let mut c = [0.0f32; super::MAX_MODELS];
                for (c, &wi) in c.iter_mut().zip(weights) {
                    *c = wi / w;
                }
                let mut buf0 = [0.0f32; TILE];
                while lo < n {
                    let hi = (lo + TILE).min(n);
                    let a = &mut acc[..hi - lo];
                    let x0 = as_f32(&models[0][lo..hi], &mut buf0);
                    a.copy_from_slice(x0);
                    for (m, &ci) in models.iter().zip(&c).skip(1) {
                        for ((a, &x), &x0) in a.iter_mut().zip(&m[lo..hi]).zip(x0) {
                            *a += ci * (x.to_f32() - x0);
                        }
                    }
                    store(a, &mut out[lo..hi]);
                    lo = hi;
                }
            }
        },
    );
    Ok(())
}

/// Uniform soup (parameter averaging, checkpoint averaging):
/// `out = (sum_i x_i) / M`, i.e. [`linear`] with unit weights and
/// `normalize` (so `x_0 + sum_{i>=1} f32(1/M) (x_i - x_0)`: the average of
/// identical models is exactly the model). Errors as [`linear`].
pub fn average<T: Element, O: Element>(models: &[&[T]], out: &mut [O]) -> Result<(), Error> {
    check_models(models, models.first().map_or(0, |m| m.len()), super::MAX_MODELS)?;
    let ones = [1.0f32; super::MAX_MODELS];
    linear(models, &ones[..models.len()], true, out)
}

/// Task vector `out = finetuned - base` (element-wise, `f32`).
///
/// Errors: [`Error::LengthMismatch`] (`base`, `out`) when the lengths differ
/// from `finetuned`'s.
pub fn task_vector<T: Element, O: Element>(finetuned: &[T], base: &[T], out: &mut [O]) -> Result<(), Error> {
    let n = finetuned.len();
    ensure_len("base", n, base.len())?;
    ensure_len("out", n, out.len())?;
    let mut b1 = [0.0f32; TILE];
    let mut b2 = [0.0f32; TILE];
    let mut acc = [0.0f32; TILE];
    let mut lo = 0;
    crate::simd::dispatch(
        #[inline(always)]
        || {
            while lo < n {
                let hi = (lo + TILE).min(n);
                let x = as_f32(&finetuned[lo..hi], &mut b1);
                let b = as_f32(&base[lo..hi], &mut b2);
                let a = &mut acc[..hi - lo];
                for ((a, &x), &b) in a.iter_mut().zip(x).zip(b) {
                    *a = x - b;
                }
                store(a, &mut out[lo..hi]);
                lo = hi;
            }
        },
    );
    Ok(())
}

/// Task arithmetic on task vectors: `out = base + lambda * sum_i w_i tau_i`
/// (Ilharco et al.: add task vectors to learn tasks, `w_i = -1` to forget
/// one). `lambda` is applied after the weighted sum, as mergekit does; the
/// multiplication is skipped when `lambda == 1` (it is exact then anyway).
///
/// Errors: [`Error::Empty`] (`vectors`), [`Error::TooLarge`] (`vectors`),
/// [`Error::LengthMismatch`] (`vectors` not as long as `base`, `weights` not
/// one per vector, `out`), [`Error::NonFinite`] (`weights`, `lambda`).
pub fn add_task_vectors<T: Element, U: Element, O: Element>(
    base: &[T],
    vectors: &[&[U]],
    weights: &[f32],
    lambda: f32,
    out: &mut [O],
) -> Result<(), Error> {
    let n = base.len();
    check_models(vectors, n, super::MAX_MODELS).map_err(|e| rename(e, "vectors"))?;
    ensure_len("weights", vectors.len(), weights.len())?;
    check_finite("weights", weights)?;
    check_finite("lambda", &[lambda])?;
    ensure_len("out", n, out.len())?;
    let mut acc = [0.0f32; TILE];
    let mut buf = [0.0f32; TILE];
    let mut lo = 0;
    crate::simd::dispatch(
        #[inline(always)]
        || {
            while lo < n {
                let hi = (lo + TILE).min(n);
                weighted_tile(vectors, weights, lo, hi, &mut acc, &mut buf);
                let a = &mut acc[..hi - lo];
                if lambda != 1.0 {
                    for v in a.iter_mut() {
                        *v *= lambda;
                    }
                }
                let b = as_f32(&base[lo..hi], &mut buf);
                for (v, &b) in a.iter_mut().zip(b) {
                    *v += b;
                }
                store(a, &mut out[lo..hi]);
                lo = hi;
            }
        },
    );
    Ok(())
}

/// `out = lambda * tau` (scaling one task vector).
///
/// Errors: [`Error::NonFinite`] (`lambda`), [`Error::LengthMismatch`] (`out`).
pub fn scale<T: Element, O: Element>(tau: &[T], lambda: f32, out: &mut [O]) -> Result<(), Error> {
    check_finite("lambda", &[lambda])?;
    ensure_len("out", tau.len(), out.len())?;
    let mut buf = [0.0f32; TILE];
    let mut acc = [0.0f32; TILE];
    crate::simd::dispatch(
        #[inline(always)]
        || {
            for (c, o) in tau.chunks(TILE).zip(out.chunks_mut(TILE)) {
                let x = as_f32(c, &mut buf);
                let a = &mut acc[..c.len()];
                for (a, &x) in a.iter_mut().zip(x) {
                    *a = lambda * x;
                }
                store(a, o);
            }
        },
    );
    Ok(())
}

/// `out = -tau` (negation for forgetting; exact).
///
/// Errors: [`Error::LengthMismatch`] (`out`).
pub fn negate<T: Element, O: Element>(tau: &[T], out: &mut [O]) -> Result<(), Error> {
    scale(tau, -1.0, out)
}

/// Renames the argument of a model-list error.
fn rename(e: Error, arg: &'static str) -> Error {
    match e {
        Error::Empty { .. } => Error::Empty { arg },
        Error::TooLarge { index, max, got, .. } => Error::TooLarge { arg, index, max, got },
        Error::LengthMismatch {
            index, expected, got, ..
        } => Error::LengthMismatch {
            arg,
            index,
            expected,
            got,
        },
        other => other,
    }
}
