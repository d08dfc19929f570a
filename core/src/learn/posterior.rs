//! Context-dependent linear weights from recent log-likelihood.

// Matrix and per-model loops read best with indices.
#![allow(clippy::needless_range_loop)]

use super::math64::{exp64, ln64};
use super::{check_table_width, normalized};
use crate::ensemble::MAX_MODELS;
use crate::error::{Error, ensure, ensure_len};
use crate::rows::{Rows, RowsMut};

/// Options of [`posterior_weights`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PosteriorOptions {
    /// Rows of history `n`: row `b` looks at rows `b - n .. b - 1` (fewer at
    /// the start). 0 gives every row the prior. Default 64.
    pub window: usize,
    /// Decay `d` in `[0, 1]`: the row `j` rows back counts `d^(j-1)` times
    /// (1: a plain window sum; 0: only the previous row). Default 1.
    pub decay: f32,
    /// Floor `f` in `[0, 1/M]`: no weight ends below it (see
    /// [`posterior_weights`]). Default 0.
    pub floor: f32,
}

impl Default for PosteriorOptions {
    fn default() -> Self {
        Self {
            window: 64,
            decay: 1.0,
            floor: 0.0,
        }
    }
}

/// Raises the weights below `floor` to it and scales the others down in
/// proportion, repeating while that pushes another weight below the floor.
fn apply_floor(w: &mut [f64], floor: f64) {
    let m = w.len();
    let mut fixed = [false; MAX_MODELS];
    loop {
        let mut k = 0usize;
        let mut rest = 0.0f64;
        for i in 0..m {
            if fixed[i] || w[i] < floor {
                fixed[i] = true;
                k += 1;
            } else {
                rest += w[i];
            }
        }
        let budget = 1.0 - k as f64 * floor;
        let scale = if rest > 0.0 { budget / rest } else { 0.0 };
        let mut again = false;
        for i in 0..m {
            if !fixed[i] && w[i] * scale < floor {
                fixed[i] = true;
                again = true;
            }
        }
        if !again {
            for i in 0..m {
                w[i] = if fixed[i] { floor } else { w[i] * scale };
            }
            return;
        }
    }
}

/// Per-row linear interpolation weights from each model's recent
/// log-likelihood: a Bayesian posterior over the models given the preceding
/// rows, with no training.
///
/// With `table[b][m] = ln P_m(y_b)` (from
/// [`target_log_probs`](super::target_log_probs)), window `n` and decay `d`:
///
/// - `L[b][m] = sum_{j=1..min(n, b)} d^(j-1) table[b-j][m]` (only rows
///   before `b`: row 0 gets the prior),
/// - `w[b] = softmax_m(ln prior_m + L[b][m])`,
/// - then the floor `f`: weights below `f` are raised to `f` and the others
///   scaled down in proportion so the row still sums to 1 (repeated while
///   that pushes another weight below `f`). For `M = 2` this is exactly
///   clamping `w[b][0]` to `[f, 1 - f]`.
///
/// The sum is taken directly over the window (`O(B n M)`, `f64`, no running
/// sum that could drift, so `-inf` entries are exact): a model that gave an
/// observed token probability 0 within the window gets weight 0 (before the
/// floor) until that row leaves the window. A row where every model has
/// weight 0 that way gets the prior. Terms whose factor `d^(j-1)` is 0 are
/// skipped (never `0 * -inf`).
///
/// `prior`: `M` finite values `>= 0` with a positive sum (normalized by
/// it), or `None` for uniform. Output: `weights`, `B x M`, each row summing
/// to 1 (up to `f32` rounding), ready for
/// [`Weights::PerRow`](crate::ensemble::Weights::PerRow).
///
/// With `prior = None`, `window = 64`, `decay = 1` and `floor = 0.01`, two
/// models get `w[b][0] = clamp(sigmoid(L[b][0] - L[b][1]), 0.01, 0.99)`,
/// `w[b][1] = 1 - w[b][0]`: the hand-written posterior of the n-gram example
/// (`core/examples/ngram.rs`), which keeps a running sum instead; the two
/// agree to `f32` rounding.
///
/// Errors (checked before anything is written): [`Error::Empty`]
/// (`log_probs` with no column), [`Error::TooLarge`] (`log_probs.len` beyond
/// [`MAX_MODELS`](crate::ensemble::MAX_MODELS)), [`Error::LengthMismatch`]
/// (`weights.rows`, `weights.len`, `prior`), [`Error::NonFinite`]
/// (`log_probs` with `index = b * M + m` for a NaN or `+inf` entry, `prior`,
/// `opts.decay`, `opts.floor`), [`Error::OutOfRange`] (negative `prior`,
/// `opts.decay` outside `[0, 1]`, `opts.floor` outside `[0, 1/M]`),
/// [`Error::ZeroSum`] (`prior`).
///
/// ```
/// use medley_core::learn::{posterior_weights, PosteriorOptions};
/// use medley_core::{Rows, RowsMut};
/// // Model 0 explains the first rows, model 1 the last ones.
/// let table = [-0.1f32, -3.0,  -0.1, -3.0,  -3.0, -0.1,  -3.0, -0.1,  -3.0, -0.1];
/// let mut w = [0.0f32; 10];
/// let opts = PosteriorOptions { window: 2, ..Default::default() };
/// posterior_weights(Rows::dense(&table, 5, 2)?, None, &opts, RowsMut::dense(&mut w, 5, 2)?)?;
/// assert_eq!(&w[..2], &[0.5, 0.5]);          // row 0: the prior
/// assert!(w[4] > 0.99);                      // rows 0, 1 favour model 0
/// assert!(w[9] > 0.99);                      // rows 2, 3 favour model 1
/// # Ok::<(), medley_core::Error>(())
/// ```
pub fn posterior_weights(
    log_probs: Rows<'_, f32>,
    prior: Option<&[f32]>,
    opts: &PosteriorOptions,
    mut weights: RowsMut<'_, f32>,
) -> Result<(), Error> {
    let (rows, m) = (log_probs.rows(), log_probs.len());
    check_table_width(m)?;
    ensure_len("weights.rows", rows, weights.rows())?;
    ensure_len("weights.len", m, weights.len())?;
    // ln prior and the normalized prior.
    let mut lp = [0.0f64; MAX_MODELS];
    let mut prior_w = [0.0f64; MAX_MODELS];
    match prior {
        None => {
            lp[..m].fill(-ln64(m as f64));
            prior_w[..m].fill(1.0 / m as f64);
        }
        Some(p) => {
            ensure_len("prior", m, p.len())?;
            normalized("prior", p, &mut prior_w[..m])?;
            for (l, &w) in lp.iter_mut().zip(&prior_w[..m]) {
                *l = ln64(w);
            }
        }
    }
    // The floor's bound is 1/M rounded to f32, so `1.0 / M as f32` passes.
    for (arg, v, hi) in [
        ("opts.decay", opts.decay, 1.0f32),
        ("opts.floor", opts.floor, 1.0 / m as f32),
    ] {
        ensure(v.is_finite(), Error::NonFinite { arg, index: 0 })?;
        ensure(v >= 0.0 && v <= hi, Error::OutOfRange { arg, index: 0 })?;
    }
    for b in 0..rows {
        for (i, &x) in log_probs.row(b).iter().enumerate() {
            ensure(
                !(x.is_nan() || x == f32::INFINITY),
                Error::NonFinite {
                    arg: "log_probs",
                    index: b * m + i,
                },
            )?;
        }
    }
    let (decay, floor) = (opts.decay as f64, opts.floor as f64);
    for b in 0..rows {
        let mut s = [0.0f64; MAX_MODELS];
        s[..m].copy_from_slice(&lp[..m]);
        let mut f = 1.0f64;
        for j in 1..=opts.window.min(b) {
            if f == 0.0 {
                break;
            }
            for (si, &x) in s.iter_mut().zip(log_probs.row(b - j)) {
                *si += f * x as f64;
            }
            f *= decay;
        }
        let mx = s[..m]
            .iter()
            .fold(f64::NEG_INFINITY, |a, &x| if x > a { x } else { a });
        let mut w = [0.0f64; MAX_MODELS];
        if mx == f64::NEG_INFINITY {
            w[..m].copy_from_slice(&prior_w[..m]);
        } else {
            let mut sum = 0.0f64;
            for (wi, &x) in w.iter_mut().zip(&s[..m]) {
                *wi = exp64(x - mx);
                sum += *wi;
            }
            for wi in &mut w[..m] {
                *wi /= sum;
            }
        }
        if floor > 0.0 {
            apply_floor(&mut w[..m], floor);
        }
        for (o, &x) in weights.row_mut(b).iter_mut().zip(&w[..m]) {
            *o = x as f32;
        }
    }
    Ok(())
}
