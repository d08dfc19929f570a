//! Weight merging: combining the parameters of several fine-tuned models
//! (and usually their common base) into one model, tensor by tensor.
//!
//! Every function here works on **one tensor**: the same tensor of `M`
//! models, each a slice of `n` elements of one [`Element`] type (`f32`,
//! `f16`, `bf16`), plus the base model's tensor where the method uses one.
//! Arithmetic is `f32`; whole-tensor statistics (norms, dot products) are
//! accumulated in chunk-invariant blocks and `f64` (see below). Outputs are
//! written to a caller slice of any [`Element`] type, rounded once.
//!
//! | method | module | mergekit name | needs |
//! |---|---|---|---|
//! | linear / weighted soup / uniform soup / parameter and checkpoint averaging | [`linear`] | `linear` | — |
//! | task vectors: extract, add, negate, scale | [`linear`] | — | base |
//! | task arithmetic, TIES, DARE (linear and TIES), breadcrumbs (and TIES), DELLA (and linear) | [`gta`] | `task_arithmetic`, `ties`, `dare_*`, `breadcrumbs*`, `della*` | base |
//! | SLERP, NuSLERP, multi-SLERP, Karcher mean | [`sphere`] | `slerp`, `nuslerp`, `multislerp`, `karcher` | (base) |
//! | Model Stock (whole tensor or per row) | [`stock`] | `model_stock` | base |
//! | SCE | [`sce`] | `sce` | base |
//! | greedy soup, pruned soup | [`soup`] | — | an evaluation callback |
//! | exact top-k by magnitude (and DELLA's ranks) | [`select`] | (the TIES, breadcrumbs and SCE selections) | — |
//!
//! # Conventions of this module
//!
//! - **mergekit compatibility.** Each method's preset reproduces mergekit's
//!   per-tensor semantics and defaults; where the paper differs, the paper's
//!   variant is an explicit option; where mergekit has a bug, the right
//!   thing is done and documented on the method.
//! - **Exact counts.** A fraction `d` of `n` elements is `floor(d * n)`
//!   computed in `f64` ([`select::count_of`]), as mergekit's `int(d * n)`.
//!   Fractions are therefore `f64`; weights and scalars are `f32`.
//! - **Streaming.** A method that needs a whole-tensor statistic has a
//!   two-phase form: a statistics state fed the tensor in chunks, in order
//!   (possibly over several passes), then an apply step over chunks in any
//!   order. Results are **bit-identical to the one-shot call for any
//!   chunking**: sums put element `p` in lane `p % 16` of a block aligned to
//!   global positions, so the order of every addition is fixed by positions
//!   alone; masks and random draws are keyed by the global element index.
//!   Element-wise methods (linear, task vectors) need no state: calling them
//!   on chunks is the streaming form. (A NaN output is NaN for every
//!   chunking, but its payload bits may differ: when both operands of an
//!   addition are NaN, vectorized and scalar code may return either.)
//! - **Randomness** (DARE, DELLA) comes only from [`crate::rng`]
//!   (Philox4x32-10), keyed by `(seed, [model_index, tensor_id])` and the
//!   global element index, so masks do not depend on chunking or threads and
//!   a GPU kernel reproduces them bit for bit.
//! - **Bad input** (mismatched lengths, empty model lists, fractions outside
//!   their range, non-finite parameters, weights that sum to zero where a
//!   normalization divides by them) returns an [`Error`]
//!   naming the argument, before any output is written.
//! - **NaN and infinities in tensors** are not errors: they propagate to the
//!   output elements they touch (and, through a whole-tensor statistic such
//!   as a norm, to every element that statistic scales). Each method notes
//!   where that differs.

use crate::element::{DType, Element, widen};
use crate::error::{Error, ensure, ensure_len_at};

pub mod gta;
pub mod linear;
pub mod sce;
pub mod select;
pub mod soup;
pub mod sphere;
pub mod stock;
mod sum;

/// Most models one merge call combines.
pub const MAX_MODELS: usize = 64;

/// Elements converted and processed at a time in element-wise kernels.
pub(crate) const TILE: usize = 1024;

/// `src` as `f32`: borrowed for `f32` input, widened into `buf` otherwise.
#[inline(always)]
pub(crate) fn as_f32<'a, T: Element>(src: &'a [T], buf: &'a mut [f32]) -> &'a [f32] {
    if T::DTYPE == DType::F32 {
        bytemuck::cast_slice(src)
    } else {
        let t = &mut buf[..src.len()];
        widen(src, t);
        t
    }
}

/// `f32` to `bf16` bits, rounding to nearest even, NaN kept quiet: the same
/// bits as `half::bf16::from_f32`, branch-free so that loops vectorize.
#[inline(always)]
pub(crate) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) as u16) | 0x0040;
    if x.is_nan() { nan } else { rounded }
}

/// Writes `src` to `dst` (same length), rounding to `O`.
#[inline(always)]
pub(crate) fn store<O: Element>(src: &[f32], dst: &mut [O]) {
    if O::DTYPE == DType::F32 {
        let d: &mut [f32] = bytemuck::cast_slice_mut(dst);
        d.copy_from_slice(src);
    } else if O::DTYPE == DType::BF16 {
        let d: &mut [u16] = bytemuck::cast_slice_mut(dst);
        for (d, &s) in d.iter_mut().zip(src) {
            *d = bf16_bits(s);
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = O::from_f32(s);
        }
    }
}

/// Checks a model list: non-empty, at most `max` models, each of length `n`.
pub(crate) fn check_models<T>(models: &[&[T]], n: usize, max: usize) -> Result<(), Error> {
    ensure(!models.is_empty(), Error::Empty { arg: "models" })?;
    ensure(
        models.len() <= max,
        Error::TooLarge {
            arg: "models",
            index: 0,
            max,
            got: models.len(),
        },
    )?;
    for (i, m) in models.iter().enumerate() {
        ensure_len_at("models", i, n, m.len())?;
    }
    Ok(())
}

/// Checks that every value of `v` is finite.
pub(crate) fn check_finite(arg: &'static str, v: &[f32]) -> Result<(), Error> {
    for (index, x) in v.iter().enumerate() {
        ensure(x.is_finite(), Error::NonFinite { arg, index })?;
    }
    Ok(())
}

/// Checks a fraction: finite and in `(0, 1]` (or `[0, 1]` with `zero_ok`).
pub(crate) fn check_fraction(arg: &'static str, index: usize, v: f64, zero_ok: bool) -> Result<(), Error> {
    ensure(v.is_finite(), Error::NonFinite { arg, index })?;
    let lo_ok = if zero_ok { v >= 0.0 } else { v > 0.0 };
    ensure(lo_ok && v <= 1.0, Error::OutOfRange { arg, index })
}

/// Sum of `w` in `f32`, in order (the divisor a normalized weighted sum
/// uses), or [`Error::ZeroSum`] when the sum is zero up to rounding:
/// `|sum| <= 1e-6 * sum |w_i|` (so weights like `(1, -1)` or
/// `(0.1, 0.2, -0.3)` are rejected rather than amplified by 1e7).
pub(crate) fn weight_sum(arg: &'static str, w: &[f32]) -> Result<f32, Error> {
    let s = w.iter().fold(0.0f32, |a, &x| a + x);
    let mag = w.iter().fold(0.0f32, |a, &x| a + x.abs());
    ensure(s.abs() > 1e-6 * mag, Error::ZeroSum { arg, index: 0 })?;
    ensure(s.is_finite(), Error::OutOfRange { arg, index: 0 })?;
    Ok(s)
}

/// A statistics pass must have been fed exactly `n` elements (reported
/// against `base`, the tensor every pass walks).
pub(crate) fn check_pass_fed(fed: u64, n: usize) -> Result<(), Error> {
    ensure(
        fed == n as u64,
        Error::LengthMismatch {
            arg: "base",
            index: 0,
            expected: n,
            got: fed as usize,
        },
    )
}

/// Checks that a chunk of `len` elements at `offset` lies inside a tensor of
/// `n` elements ([`Error::TooLarge`] `offset` otherwise).
pub(crate) fn check_span(offset: usize, len: usize, n: usize) -> Result<(), Error> {
    ensure(
        offset <= n && len <= n - offset,
        Error::TooLarge {
            arg: "offset",
            index: 0,
            max: n,
            got: offset.saturating_add(len),
        },
    )
}

/// Checks a streamed chunk: `models.len() == m`, every model chunk as long
/// as `len`.
pub(crate) fn check_chunk<T>(models: &[&[T]], m: usize, len: usize) -> Result<(), Error> {
    ensure(
        models.len() == m,
        Error::LengthMismatch {
            arg: "models.count",
            index: 0,
            expected: m,
            got: models.len(),
        },
    )?;
    for (i, x) in models.iter().enumerate() {
        ensure_len_at("models", i, len, x.len())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::bf16_bits;

    #[test]
    fn bf16_rounding_matches_half() {
        // Every 97th bit pattern plus the neighbourhoods of the edges.
        let edges = [
            0u32,
            0x7f7f_ffff,
            0x7f80_0000,
            0x7fc0_0000,
            0x0000_8000,
            0x3f80_8000,
            0x3f81_8000,
        ];
        let it = (0..=u32::MAX / 97)
            .map(|i| i * 97)
            .chain(edges.iter().flat_map(|&e| {
                (0..64u32).flat_map(move |d| [e.wrapping_add(d), e.wrapping_sub(d), e ^ 0x8000_0000])
            }));
        for bits in it {
            let x = f32::from_bits(bits);
            assert_eq!(bf16_bits(x), half::bf16::from_f32(x).to_bits(), "{bits:#010x}");
        }
    }
}
