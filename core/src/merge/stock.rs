//! Model Stock (Jang, Yun and Han, ECCV 2024), as mergekit's `model_stock`.
//!
//! With base `b` and `N >= 2` fine-tuned models `x_i`, task vectors
//! `delta_i = x_i - b`:
//!
//! - `cos θ` is the **mean over all pairs `i < j`** of
//!   `clamp(delta_i . delta_j / max(|delta_i| |delta_j|, 1e-6), -1, 1)` (the
//!   authors' answer for `N > 2`, mergekit issue #453);
//! - `t = N cos θ / (1 + (N - 1) cos θ)`;
//! - `out = t · mean_i(x_i) + (1 - t) · b`, with `mean_i(x_i)` summed in
//!   model order and divided by `N`, and `1 - t` formed in `f32`.
//!
//! Per-model weights are not used (mergekit ignores them too).
//!
//! For `cos θ` in `[0, 1]`, `t` is in `[0, 1]` and matches mergekit.
//! **Negative mean cosines (mergekit bug fixed):** mergekit has no guard
//! there: `t` goes negative (extrapolating away from the average), becomes
//! infinite at `cos θ = -1/(N-1)` (two exactly opposite task vectors) and
//! turns positive and large beyond it. Model Stock's derivation assumes
//! fine-tunes at acute angles, so here a negative mean cosine gives `t = 0`:
//! the base.
//!
//! [`StockOptions::rows`] selects mergekit's `filter_wise: true`: a separate
//! `t` for every row of the last dimension (a 1-D tensor is one row, as in
//! mergekit). The whole-tensor form needs one statistics pass (the Gram
//! matrix of the task vectors, chunk-invariant); the row-wise form needs
//! none (each row's statistics are taken in cache), but its chunks must be
//! whole rows.

use super::sum::{GRAM_MAX, GRAM_TILE, Gram};
use super::{as_f32, check_chunk, check_models, store};
use crate::element::Element;
use crate::error::{Error, ensure, ensure_len};
use crate::math::sqrt_f64;

/// Most models (besides the base) of a Model Stock merge.
pub const MAX_MODELS: usize = GRAM_MAX;

const TILE: usize = GRAM_TILE;

/// Options of [`model_stock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StockOptions {
    /// `None` (mergekit default, `filter_wise: false`): one `t` for the whole
    /// tensor. `Some(len)`: one `t` per contiguous row of `len` elements
    /// (`filter_wise: true`).
    pub rows: Option<usize>,
}

/// The interpolation parameter from the Gram matrix of the task vectors.
fn t_from_gram(g: &Gram, m: usize) -> f64 {
    let mut sum = 0.0f64;
    let mut pairs = 0u32;
    for i in 0..m {
        for j in i + 1..m {
            let np = sqrt_f64(g.get(i, i)) * sqrt_f64(g.get(j, j));
            let c = g.get(i, j) / np.max(1e-6);
            sum += if c.is_nan() { c } else { c.clamp(-1.0, 1.0) };
            pairs += 1;
        }
    }
    let c = sum / pairs as f64;
    let nf = m as f64;
    if c < 0.0 {
        0.0
    } else {
        nf * c / (1.0 + (nf - 1.0) * c)
    }
}

/// Adds the Gram matrix of the task vectors of `models` over `base`
/// (chunks of equal length) to `g`.
fn push_gram<T: Element>(g: &mut Gram, models: &[&[T]], base: &[T]) {
    let mut rows = [[0.0f32; TILE]; MAX_MODELS];
    let mut xb = [0.0f32; TILE];
    let mut bb = [0.0f32; TILE];
    let len = base.len();
    let mut lo = 0;
    while lo < len {
        let hi = (lo + TILE).min(len);
        let b = as_f32(&base[lo..hi], &mut bb);
        for (row, x) in rows.iter_mut().zip(models) {
            let x = as_f32(&x[lo..hi], &mut xb);
            for ((r, &x), &b) in row.iter_mut().zip(x).zip(b) {
                *r = x - b;
            }
        }
        g.push_rows(&rows[..models.len()], hi - lo);
        lo = hi;
    }
}

/// `out = t · (sum_i x_i) / N + (1 - t) · b` over one chunk.
fn stock_kernel<T: Element, O: Element>(t: f32, models: &[&[T]], base: &[T], out: &mut [O]) {
    let one_minus = 1.0f32 - t;
    let nf = models.len() as f32;
    let mut xb = [0.0f32; TILE];
    let mut bb = [0.0f32; TILE];
    let mut acc = [0.0f32; TILE];
    let len = base.len();
    let mut lo = 0;
    while lo < len {
        let hi = (lo + TILE).min(len);
        let acc = &mut acc[..hi - lo];
        acc.copy_from_slice(as_f32(&models[0][lo..hi], &mut xb));
        for x in &models[1..] {
            for (a, &x) in acc.iter_mut().zip(as_f32(&x[lo..hi], &mut xb)) {
                *a += x;
            }
        }
        let b = as_f32(&base[lo..hi], &mut bb);
        for (a, &b) in acc.iter_mut().zip(b) {
            *a = t * (*a / nf) + one_minus * b;
        }
        store(acc, &mut out[lo..hi]);
        lo = hi;
    }
}

/// A validated Model Stock merge of `m` models over tensors of `n` elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelStock {
    n: usize,
    m: usize,
    opts: StockOptions,
}

impl ModelStock {
    /// Plans the merge.
    ///
    /// Errors: [`Error::Unsupported`] (fewer than 2 models: Model Stock
    /// needs two task vectors for an angle), [`Error::TooLarge`] (`models`
    /// beyond [`MAX_MODELS`]), [`Error::OutOfRange`] (`rows`: zero, or not
    /// dividing `n`).
    pub fn new(n: usize, m: usize, opts: &StockOptions) -> Result<Self, Error> {
        ensure(
            m >= 2,
            Error::Unsupported {
                what: "Model Stock needs at least 2 models besides the base",
            },
        )?;
        ensure(
            m <= MAX_MODELS,
            Error::TooLarge {
                arg: "models",
                index: 0,
                max: MAX_MODELS,
                got: m,
            },
        )?;
        if let Some(r) = opts.rows {
            ensure(
                r > 0 && n.is_multiple_of(r),
                Error::OutOfRange {
                    arg: "rows",
                    index: 0,
                },
            )?;
        }
        Ok(Self { n, m, opts: *opts })
    }

    /// Starts the statistics pass (none is needed per row).
    pub fn stats(&self) -> StockStats {
        StockStats {
            plan: *self,
            fed: 0,
            gram: Gram::new(self.m),
        }
    }
}

/// The statistics pass of a whole-tensor [`ModelStock`].
#[derive(Debug, Clone, Copy)]
pub struct StockStats {
    plan: ModelStock,
    fed: usize,
    gram: Gram,
}

impl StockStats {
    /// True when a pass is needed (whole-tensor form).
    pub fn needs_pass(&self) -> bool {
        self.plan.opts.rows.is_none()
    }

    /// Feeds the next chunk of every model and of the base (no-op per row).
    ///
    /// Errors: [`Error::LengthMismatch`] (`models.count`, `models`),
    /// [`Error::TooLarge`] (`base`, past `n`). Nothing changes on error.
    pub fn feed<T: Element>(&mut self, models: &[&[T]], base: &[T]) -> Result<(), Error> {
        let len = base.len();
        check_chunk(models, self.plan.m, len)?;
        ensure(
            len <= self.plan.n - self.fed,
            Error::TooLarge {
                arg: "base",
                index: 0,
                max: self.plan.n - self.fed,
                got: len,
            },
        )?;
        if self.needs_pass() {
            push_gram(&mut self.gram, models, base);
        }
        self.fed += len;
        Ok(())
    }

    /// The finished statistics.
    ///
    /// Errors: [`Error::LengthMismatch`] (`base`: fewer than `n` fed, whole-
    /// tensor form).
    pub fn finish(&self) -> Result<StockApply, Error> {
        let t = if self.needs_pass() {
            ensure_len("base", self.plan.n, self.fed)?;
            t_from_gram(&self.gram, self.plan.m) as f32
        } else {
            f32::NAN
        };
        Ok(StockApply { plan: self.plan, t })
    }
}

/// Finished Model Stock statistics; apply to chunks in any order (whole
/// rows for the row-wise form).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StockApply {
    plan: ModelStock,
    t: f32,
}

impl StockApply {
    /// The whole-tensor interpolation parameter `t` (NaN for the row-wise
    /// form, whose `t` varies by row).
    pub fn t(&self) -> f32 {
        self.t
    }

    /// Merges elements `offset..offset + base.len()`.
    ///
    /// Errors: [`Error::LengthMismatch`] (`models.count`, `models`, `out`),
    /// [`Error::TooLarge`] (`offset`), [`Error::OutOfRange`] (`offset`: not
    /// whole rows, row-wise form). Nothing is written on error.
    pub fn apply<T: Element, O: Element>(
        &self,
        models: &[&[T]],
        base: &[T],
        offset: usize,
        out: &mut [O],
    ) -> Result<(), Error> {
        let len = base.len();
        let p = &self.plan;
        check_chunk(models, p.m, len)?;
        ensure_len("out", len, out.len())?;
        super::check_span(offset, len, p.n)?;
        match p.opts.rows {
            None => stock_kernel(self.t, models, base, out),
            Some(r) => {
                ensure(
                    offset.is_multiple_of(r) && len.is_multiple_of(r),
                    Error::OutOfRange {
                        arg: "offset",
                        index: 0,
                    },
                )?;
                let mut views = [&models[0][..0]; MAX_MODELS];
                let mut lo = 0;
                while lo < len {
                    let hi = lo + r;
                    for (v, x) in views.iter_mut().zip(models) {
                        *v = &x[lo..hi];
                    }
                    let mut g = Gram::new(p.m);
                    push_gram(&mut g, &views[..p.m], &base[lo..hi]);
                    let t = t_from_gram(&g, p.m) as f32;
                    stock_kernel(t, &views[..p.m], &base[lo..hi], &mut out[lo..hi]);
                    lo = hi;
                }
            }
        }
        Ok(())
    }
}

/// One-shot Model Stock of `models` over `base` into `out`; returns the
/// whole-tensor `t` (NaN for the row-wise form).
///
/// Errors: as [`ModelStock::new`], plus [`Error::Empty`] /
/// [`Error::LengthMismatch`] (`models`, `out`). Nothing is written on
/// error.
pub fn model_stock<T: Element, O: Element>(
    models: &[&[T]],
    base: &[T],
    opts: &StockOptions,
    out: &mut [O],
) -> Result<f32, Error> {
    let n = base.len();
    check_models(models, n, MAX_MODELS)?;
    ensure_len("out", n, out.len())?;
    let plan = ModelStock::new(n, models.len(), opts)?;
    let mut st = plan.stats();
    st.feed(models, base)?;
    let a = st.finish()?;
    a.apply(models, base, 0, out)?;
    Ok(a.t)
}
