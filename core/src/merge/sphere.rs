//! Spherical merges: SLERP, NuSLERP, multi-SLERP and the Karcher mean.
//!
//! Each needs whole-tensor (or whole-row / whole-column) norms and dot
//! products, then applies a linear combination of the inputs with
//! coefficients computed once from them. The statistics are chunk-invariant
//! sums (see [`merge`](super)), so every method has a two-phase form
//! (`*Stats` fed in order, then an `apply` over chunks in any order) that is
//! bit-identical to the one-shot function. Coefficients are computed in
//! `f64` (with [`crate::math::trig`]) and rounded once to `f32`; the apply is
//! `f32`.
//!
//! A NaN anywhere in a vector makes its norms, hence every coefficient and
//! every output element computed from them, NaN.
//!
//! | method | mergekit | here |
//! |---|---|---|
//! | SLERP | numpy `f32` on the CPU, `|dot| > 0.9995` → lerp | [`slerp`], [`SlerpStats`] |
//! | NuSLERP | flat / rows / columns, optional base, `|sin θ| < 1e-8` → lerp | [`nuslerp`], [`Nuslerp`] |
//! | multi-SLERP | tangent-space barycentre (which reduces to the formula below) | [`multislerp`], [`MultislerpStats`] |
//! | Karcher | iterates over full tensors (up to `10 M` passes) | [`karcher`], [`KarcherStats`]: one pass, iterations on the Gram matrix |

use super::sum::{GRAM_MAX, GRAM_TILE, Gram, Sum};
use super::{as_f32, check_finite, check_models, store};
use crate::element::Element;
use crate::error::{Error, ensure, ensure_len};
use crate::math::sqrt_f64;
use crate::math::trig::{acos, cos, sin};

/// Most models of [`multislerp`] and [`karcher`].
pub const MAX_MODELS: usize = GRAM_MAX;

const TILE: usize = GRAM_TILE;

// ---------------------------------------------------------------------------
// Shared pieces.

/// `out = c0 v0 + c1 v1`, optionally on task vectors: with a base,
/// `out = b + (c0 (x0 - b) + c1 (x1 - b))`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pair {
    /// Coefficient of the first vector.
    pub c0: f32,
    /// Coefficient of the second vector.
    pub c1: f32,
    /// True when the linear-interpolation fallback was taken.
    pub lerp: bool,
}

impl Pair {
    /// Applies the combination to one chunk (element-wise: any chunk, any
    /// order). With `base`, the combination acts on `x_i - base` and `base`
    /// is added back.
    ///
    /// Errors: [`Error::LengthMismatch`] (`x1`, `base`, `out`) when lengths
    /// differ from `x0`'s.
    pub fn apply<T: Element, O: Element>(
        &self,
        x0: &[T],
        x1: &[T],
        base: Option<&[T]>,
        out: &mut [O],
    ) -> Result<(), Error> {
        let n = x0.len();
        ensure_len("x1", n, x1.len())?;
        if let Some(b) = base {
            ensure_len("base", n, b.len())?;
        }
        ensure_len("out", n, out.len())?;
        pair_kernel(self.c0, self.c1, x0, x1, base, out);
        Ok(())
    }
}

fn pair_kernel<T: Element, O: Element>(
    c0: f32,
    c1: f32,
    x0: &[T],
    x1: &[T],
    base: Option<&[T]>,
    out: &mut [O],
) {
    let mut b0 = [0.0f32; TILE];
    let mut b1 = [0.0f32; TILE];
    let mut bb = [0.0f32; TILE];
    let mut r = [0.0f32; TILE];
    let n = x0.len();
    let mut lo = 0;
    while lo < n {
        let hi = (lo + TILE).min(n);
        let a = as_f32(&x0[lo..hi], &mut b0);
        let c = as_f32(&x1[lo..hi], &mut b1);
        let r = &mut r[..hi - lo];
        match base {
            None => {
                for ((r, &a), &c) in r.iter_mut().zip(a).zip(c) {
                    *r = c0 * a + c1 * c;
                }
            }
            Some(base) => {
                let b = as_f32(&base[lo..hi], &mut bb);
                for (((r, &a), &c), &b) in r.iter_mut().zip(a).zip(c).zip(b) {
                    *r = b + (c0 * (a - b) + c1 * (c - b));
                }
            }
        }
        store(r, &mut out[lo..hi]);
        lo = hi;
    }
}

/// Sums of `v0^2`, `v1^2`, `v0 v1` (`v_i = x_i - b` with a base) over the
/// next elements, chunk-invariant.
fn push_pair<T: Element>(s: &mut [Sum; 3], x0: &[T], x1: &[T], base: Option<&[T]>) {
    let mut b0 = [0.0f32; TILE];
    let mut b1 = [0.0f32; TILE];
    let mut bb = [0.0f32; TILE];
    let mut v0 = [0.0f32; TILE];
    let mut v1 = [0.0f32; TILE];
    let n = x0.len();
    let mut lo = 0;
    while lo < n {
        let hi = (lo + TILE).min(n);
        let len = hi - lo;
        let (v0, v1) = (&mut v0[..len], &mut v1[..len]);
        v0.copy_from_slice(as_f32(&x0[lo..hi], &mut b0));
        v1.copy_from_slice(as_f32(&x1[lo..hi], &mut b1));
        if let Some(base) = base {
            let b = as_f32(&base[lo..hi], &mut bb);
            for ((a, c), &b) in v0.iter_mut().zip(v1.iter_mut()).zip(b) {
                *a -= b;
                *c -= b;
            }
        }
        s[0].push_prod(v0, v0);
        s[1].push_prod(v1, v1);
        s[2].push_prod(v0, v1);
        lo = hi;
    }
}

fn check_t(t: f32) -> Result<(), Error> {
    ensure(t.is_finite(), Error::NonFinite { arg: "t", index: 0 })
}

fn check_nonneg(arg: &'static str, v: f64) -> Result<(), Error> {
    ensure(v.is_finite(), Error::NonFinite { arg, index: 0 })?;
    ensure(v >= 0.0, Error::OutOfRange { arg, index: 0 })
}

// ---------------------------------------------------------------------------
// SLERP.

/// Options of [`slerp`] (mergekit's defaults in [`SlerpOptions::new`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlerpOptions {
    /// Interpolation parameter: 0 gives `v0` (mergekit: the base model), 1
    /// gives `v1`. Any finite value (outside `[0, 1]` extrapolates).
    pub t: f32,
    /// Fall back to lerp when `|cos θ| >` this (mergekit: 0.9995). Also
    /// covers anti-parallel vectors.
    pub dot_threshold: f64,
    /// Vectors with norm `<= eps` are not normalized (mergekit: 1e-8).
    pub eps: f64,
}

impl SlerpOptions {
    /// `t` with mergekit's `DOT_THRESHOLD = 0.9995` and `eps = 1e-8`.
    pub const fn new(t: f32) -> Self {
        Self {
            t,
            dot_threshold: 0.9995,
            eps: 1e-8,
        }
    }
}

/// Statistics of a SLERP of two tensors of `n` elements: fed both tensors
/// in order, then [`finish`](Self::finish) gives the [`Pair`] to apply.
#[derive(Debug, Clone, Copy)]
pub struct SlerpStats {
    opts: SlerpOptions,
    n: usize,
    fed: usize,
    s: [Sum; 3],
}

impl SlerpStats {
    /// Starts a SLERP over tensors of `n` elements.
    ///
    /// Errors: [`Error::NonFinite`] (`t`, `dot_threshold`, `eps`),
    /// [`Error::OutOfRange`] (`dot_threshold`, `eps` negative).
    pub fn new(n: usize, opts: &SlerpOptions) -> Result<Self, Error> {
        check_t(opts.t)?;
        check_nonneg("dot_threshold", opts.dot_threshold)?;
        check_nonneg("eps", opts.eps)?;
        Ok(Self {
            opts: *opts,
            n,
            fed: 0,
            s: [Sum::ZERO; 3],
        })
    }

    /// Feeds the next elements of `v0` and `v1` (same length).
    ///
    /// Errors: [`Error::LengthMismatch`] (`v1`), [`Error::TooLarge`] (`v0`,
    /// past `n` elements). Nothing changes on error.
    pub fn feed<T: Element>(&mut self, v0: &[T], v1: &[T]) -> Result<(), Error> {
        ensure_len("v1", v0.len(), v1.len())?;
        ensure(
            v0.len() <= self.n - self.fed,
            Error::TooLarge {
                arg: "v0",
                index: 0,
                max: self.n - self.fed,
                got: v0.len(),
            },
        )?;
        push_pair(&mut self.s, v0, v1, None);
        self.fed += v0.len();
        Ok(())
    }

    /// The interpolation, mergekit's `slerp`: normalize each vector whose
    /// norm exceeds `eps`; `c = u0 . u1`; if `|c| > dot_threshold` return the
    /// lerp `(1 - t) v0 + t v1`; else with `θ = acos c`:
    /// `out = sin(θ - tθ)/sin θ · v0 + sin(tθ)/sin θ · v1`.
    ///
    /// Errors: [`Error::LengthMismatch`] (`v0`) if fewer than `n` elements
    /// were fed.
    pub fn finish(&self) -> Result<Pair, Error> {
        ensure_len("v0", self.n, self.fed)?;
        let o = &self.opts;
        let t = o.t as f64;
        let n0 = sqrt_f64(self.s[0].value());
        let n1 = sqrt_f64(self.s[1].value());
        let d0 = if n0 > o.eps { n0 } else { 1.0 };
        let d1 = if n1 > o.eps { n1 } else { 1.0 };
        let dot = self.s[2].value() / (d0 * d1);
        if dot.abs() > o.dot_threshold {
            return Ok(Pair {
                c0: (1.0 - t) as f32,
                c1: o.t,
                lerp: true,
            });
        }
        let theta = acos(dot);
        let st = sin(theta);
        let tt = theta * t;
        Ok(Pair {
            c0: (sin(theta - tt) / st) as f32,
            c1: (sin(tt) / st) as f32,
            lerp: false,
        })
    }
}

/// One-shot SLERP of `v0` (t = 0; mergekit passes the base model here) and
/// `v1` (t = 1) into `out`; returns the coefficients used. See
/// [`SlerpStats::finish`] for the formula. At `t = 0` and `t = 1` the output
/// is exactly `v0` and `v1` (coefficients 1 and 0).
///
/// Errors: as [`SlerpStats::new`], and [`Error::LengthMismatch`] (`v1`,
/// `out`). Nothing is written on error.
///
/// ```
/// use medley_core::merge::sphere::{slerp, SlerpOptions};
/// let a = [1.0f32, 0.0];
/// let b = [0.0f32, 1.0];
/// let mut out = [0.0f32; 2];
/// slerp(&a, &b, &SlerpOptions::new(0.5), &mut out).unwrap();
/// assert!((out[0] - 0.5f32.sqrt()).abs() < 1e-6 && (out[1] - 0.5f32.sqrt()).abs() < 1e-6);
/// ```
pub fn slerp<T: Element, O: Element>(
    v0: &[T],
    v1: &[T],
    opts: &SlerpOptions,
    out: &mut [O],
) -> Result<Pair, Error> {
    let n = v0.len();
    ensure_len("v1", n, v1.len())?;
    ensure_len("out", n, out.len())?;
    let mut st = SlerpStats::new(n, opts)?;
    st.feed(v0, v1)?;
    let p = st.finish()?;
    pair_kernel(p.c0, p.c1, v0, v1, None, out);
    Ok(p)
}

// ---------------------------------------------------------------------------
// NuSLERP.

/// Which vectors NuSLERP interpolates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// The whole tensor is one vector (mergekit `nuslerp_flatten: true`, its
    /// default).
    Flat,
    /// Each contiguous row of this length is a vector (mergekit
    /// `nuslerp_flatten: false`, `nuslerp_row_wise: false`: the last
    /// dimension).
    Rows(usize),
    /// Each column of the row-major matrix with rows of this length is a
    /// vector (mergekit `nuslerp_flatten: false`, `nuslerp_row_wise: true`:
    /// dimension 0; mergekit's documentation describes the two backwards).
    Columns(usize),
}

/// Options of [`nuslerp`] (mergekit's defaults in [`NuslerpOptions::new`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NuslerpOptions {
    /// The vectors.
    pub layout: Layout,
    /// Fall back to lerp where `|sin θ| < eps` (mergekit: 1e-8).
    pub eps: f64,
}

impl NuslerpOptions {
    /// mergekit's defaults: [`Layout::Flat`], `eps = 1e-8`.
    pub const fn new() -> Self {
        Self {
            layout: Layout::Flat,
            eps: 1e-8,
        }
    }
}

impl Default for NuslerpOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// NuSLERP's interpolation parameter from the two model weights:
/// `t = w1 / (w0 + w1)`, or `0.5` when `|w0 + w1| < 1e-6` (mergekit).
pub fn nuslerp_t(w0: f32, w1: f32) -> f64 {
    let s = w0 as f64 + w1 as f64;
    if s.abs() < 1e-6 { 0.5 } else { w1 as f64 / s }
}

/// NuSLERP coefficients from `|v0|^2`, `|v1|^2`, `v0 . v1`: norms clamped
/// below at 1e-7, `cos θ` clamped to `[-1, 1]`, lerp where `|sin θ| < eps`.
fn nuslerp_coeffs(s00: f64, s11: f64, s01: f64, t: f64, eps: f64) -> (f64, f64) {
    let n0 = sqrt_f64(s00).max(1e-7);
    let n1 = sqrt_f64(s11).max(1e-7);
    let c = s01 / (n0 * n1);
    let c = if c.is_nan() { c } else { c.clamp(-1.0, 1.0) };
    let theta = acos(c);
    let st = sin(theta);
    if st.abs() < eps {
        (1.0 - t, t)
    } else {
        (sin((1.0 - t) * theta) / st, sin(t * theta) / st)
    }
}

/// A validated NuSLERP of two tensors of `n` elements, optionally on task
/// vectors over a base (mergekit: `out = b + nuslerp(t, x0 - b, x1 - b)`).
///
/// Per vector (see [`Layout`]): `t` from [`nuslerp_t`]; with
/// `u_i = v_i / max(|v_i|, 1e-7)`, `θ = acos(clamp(u0 . u1, -1, 1))`,
/// `out = sin((1-t)θ)/sin θ · v0 + sin(tθ)/sin θ · v1`, or the lerp
/// `(1-t) v0 + t v1` where `|sin θ| < eps` (exactly parallel or
/// anti-parallel vectors; compare SLERP's 0.9995).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nuslerp {
    n: usize,
    t: f64,
    opts: NuslerpOptions,
}

impl Nuslerp {
    /// Plans a NuSLERP with model weights `weights` (`t` from [`nuslerp_t`]).
    ///
    /// Errors: [`Error::NonFinite`] (`weights`, `eps`), [`Error::OutOfRange`]
    /// (`eps` negative; `layout` with a zero length or one not dividing `n`),
    /// [`Error::TooLarge`] (`layout`: columns whose scratch, `3 * len`,
    /// overflows).
    pub fn new(n: usize, weights: [f32; 2], opts: &NuslerpOptions) -> Result<Self, Error> {
        check_finite("weights", &weights)?;
        check_nonneg("eps", opts.eps)?;
        match opts.layout {
            Layout::Flat => {}
            Layout::Rows(l) | Layout::Columns(l) => {
                ensure(
                    l > 0 && n.is_multiple_of(l),
                    Error::OutOfRange {
                        arg: "layout",
                        index: 0,
                    },
                )?;
            }
        }
        if let Layout::Columns(l) = opts.layout {
            // The column statistics take `3 * l` f64s (`scratch_len`).
            ensure(
                l <= usize::MAX / 3,
                Error::TooLarge {
                    arg: "layout",
                    index: 0,
                    max: usize::MAX / 3,
                    got: l,
                },
            )?;
        }
        Ok(Self {
            n,
            t: nuslerp_t(weights[0], weights[1]),
            opts: *opts,
        })
    }

    /// The interpolation parameter.
    pub fn t(&self) -> f64 {
        self.t
    }

    /// `f64` scratch [`stats`](Self::stats) needs: `3 * len` for
    /// [`Layout::Columns`]`(len)`, else 0.
    pub fn scratch_len(&self) -> usize {
        match self.opts.layout {
            Layout::Columns(l) => 3 * l,
            _ => 0,
        }
    }

    /// Starts the statistics pass (none is needed for [`Layout::Rows`]).
    ///
    /// Errors: [`Error::BufferTooShort`] (`scratch`).
    pub fn stats<'s>(&self, scratch: &'s mut [f64]) -> Result<NuslerpStats<'s>, Error> {
        let need = self.scratch_len();
        ensure(
            scratch.len() >= need,
            Error::BufferTooShort {
                arg: "scratch",
                needed: need,
                got: scratch.len(),
            },
        )?;
        let cols = &mut scratch[..need];
        cols.fill(0.0);
        Ok(NuslerpStats {
            plan: *self,
            fed: 0,
            s: [Sum::ZERO; 3],
            cols,
        })
    }
}

/// The statistics pass of a [`Nuslerp`]: feed both tensors (and the base,
/// if any) in order, then [`finish`](Self::finish).
#[derive(Debug)]
pub struct NuslerpStats<'s> {
    plan: Nuslerp,
    fed: usize,
    s: [Sum; 3],
    cols: &'s mut [f64],
}

impl<'s> NuslerpStats<'s> {
    /// Feeds the next elements (no-op for [`Layout::Rows`]).
    ///
    /// Errors: [`Error::LengthMismatch`] (`x1`, `base`), [`Error::TooLarge`]
    /// (`x0`, past `n`). Nothing changes on error.
    pub fn feed<T: Element>(&mut self, x0: &[T], x1: &[T], base: Option<&[T]>) -> Result<(), Error> {
        let len = x0.len();
        ensure_len("x1", len, x1.len())?;
        if let Some(b) = base {
            ensure_len("base", len, b.len())?;
        }
        ensure(
            len <= self.plan.n - self.fed,
            Error::TooLarge {
                arg: "x0",
                index: 0,
                max: self.plan.n - self.fed,
                got: len,
            },
        )?;
        match self.plan.opts.layout {
            Layout::Flat => push_pair(&mut self.s, x0, x1, base),
            Layout::Rows(_) => {}
            Layout::Columns(c) => {
                // Per-column f64 sums, accumulated in row order.
                let (s00, rest) = self.cols.split_at_mut(c);
                let (s11, s01) = rest.split_at_mut(c);
                let mut b0 = [0.0f32; TILE];
                let mut b1 = [0.0f32; TILE];
                let mut bb = [0.0f32; TILE];
                let mut lo = 0;
                while lo < len {
                    let col = (self.fed + lo) % c;
                    let hi = (lo + TILE).min(len).min(lo + (c - col));
                    let a = as_f32(&x0[lo..hi], &mut b0);
                    let d = as_f32(&x1[lo..hi], &mut b1);
                    let b: &[f32] = match base {
                        Some(base) => as_f32(&base[lo..hi], &mut bb),
                        None => &[],
                    };
                    for j in 0..hi - lo {
                        let (mut v0, mut v1) = (a[j] as f64, d[j] as f64);
                        if !b.is_empty() {
                            v0 = (a[j] - b[j]) as f64;
                            v1 = (d[j] - b[j]) as f64;
                        }
                        s00[col + j] += v0 * v0;
                        s11[col + j] += v1 * v1;
                        s01[col + j] += v0 * v1;
                    }
                    lo = hi;
                }
            }
        }
        self.fed += len;
        Ok(())
    }

    /// The coefficients.
    ///
    /// Errors: [`Error::LengthMismatch`] (`x0`) if fewer than `n` elements
    /// were fed (for [`Layout::Rows`] nothing needs feeding).
    pub fn finish(self) -> Result<NuslerpApply<'s>, Error> {
        let p = self.plan;
        if !matches!(p.opts.layout, Layout::Rows(_)) {
            ensure_len("x0", p.n, self.fed)?;
        }
        let flat = match p.opts.layout {
            Layout::Flat => {
                let (c0, c1) = nuslerp_coeffs(
                    self.s[0].value(),
                    self.s[1].value(),
                    self.s[2].value(),
                    p.t,
                    p.opts.eps,
                );
                (c0 as f32, c1 as f32)
            }
            _ => (0.0, 0.0),
        };
        if let Layout::Columns(c) = p.opts.layout {
            for col in 0..c {
                let (c0, c1) = nuslerp_coeffs(
                    self.cols[col],
                    self.cols[c + col],
                    self.cols[2 * c + col],
                    p.t,
                    p.opts.eps,
                );
                self.cols[col] = c0;
                self.cols[c + col] = c1;
            }
        }
        Ok(NuslerpApply {
            plan: p,
            flat,
            cols: self.cols,
        })
    }
}

/// Finished NuSLERP statistics: apply to chunks (any order; whole rows for
/// [`Layout::Rows`]).
#[derive(Debug)]
pub struct NuslerpApply<'s> {
    plan: Nuslerp,
    flat: (f32, f32),
    cols: &'s mut [f64],
}

impl NuslerpApply<'_> {
    /// Merges elements `offset..offset + x0.len()` into `out`.
    ///
    /// Errors: [`Error::LengthMismatch`] (`x1`, `base`, `out`),
    /// [`Error::TooLarge`] (`offset`, past the tensor), [`Error::OutOfRange`]
    /// (`offset`: not whole rows for [`Layout::Rows`]). Nothing is written
    /// on error.
    pub fn apply<T: Element, O: Element>(
        &self,
        x0: &[T],
        x1: &[T],
        base: Option<&[T]>,
        offset: usize,
        out: &mut [O],
    ) -> Result<(), Error> {
        let len = x0.len();
        ensure_len("x1", len, x1.len())?;
        if let Some(b) = base {
            ensure_len("base", len, b.len())?;
        }
        ensure_len("out", len, out.len())?;
        let n = self.plan.n;
        super::check_span(offset, len, n)?;
        match self.plan.opts.layout {
            Layout::Flat => pair_kernel(self.flat.0, self.flat.1, x0, x1, base, out),
            Layout::Rows(r) => {
                ensure(
                    offset.is_multiple_of(r) && len.is_multiple_of(r),
                    Error::OutOfRange {
                        arg: "offset",
                        index: 0,
                    },
                )?;
                let mut lo = 0;
                while lo < len {
                    let hi = lo + r;
                    let b = base.map(|b| &b[lo..hi]);
                    let mut s = [Sum::ZERO; 3];
                    push_pair(&mut s, &x0[lo..hi], &x1[lo..hi], b);
                    let (c0, c1) = nuslerp_coeffs(
                        s[0].value(),
                        s[1].value(),
                        s[2].value(),
                        self.plan.t,
                        self.plan.opts.eps,
                    );
                    pair_kernel(
                        c0 as f32,
                        c1 as f32,
                        &x0[lo..hi],
                        &x1[lo..hi],
                        b,
                        &mut out[lo..hi],
                    );
                    lo = hi;
                }
            }
            Layout::Columns(c) => {
                let mut b0 = [0.0f32; TILE];
                let mut b1 = [0.0f32; TILE];
                let mut bb = [0.0f32; TILE];
                let mut r = [0.0f32; TILE];
                let mut lo = 0;
                while lo < len {
                    let col = (offset + lo) % c;
                    let hi = (lo + TILE).min(len).min(lo + (c - col));
                    let a = as_f32(&x0[lo..hi], &mut b0);
                    let d = as_f32(&x1[lo..hi], &mut b1);
                    let r = &mut r[..hi - lo];
                    match base {
                        None => {
                            for j in 0..hi - lo {
                                let (c0, c1) = (self.cols[col + j] as f32, self.cols[c + col + j] as f32);
                                r[j] = c0 * a[j] + c1 * d[j];
                            }
                        }
                        Some(base) => {
                            let b = as_f32(&base[lo..hi], &mut bb);
                            for j in 0..hi - lo {
                                let (c0, c1) = (self.cols[col + j] as f32, self.cols[c + col + j] as f32);
                                r[j] = b[j] + (c0 * (a[j] - b[j]) + c1 * (d[j] - b[j]));
                            }
                        }
                    }
                    store(r, &mut out[lo..hi]);
                    lo = hi;
                }
            }
        }
        Ok(())
    }
}

/// One-shot NuSLERP of `x0` and `x1` (weights `weights`, optional `base`)
/// into `out`. `scratch` holds [`Nuslerp::scratch_len`] `f64`s.
///
/// Errors: as [`Nuslerp::new`] and [`NuslerpApply::apply`], plus
/// [`Error::BufferTooShort`] (`scratch`). Nothing is written on error.
pub fn nuslerp<T: Element, O: Element>(
    x0: &[T],
    x1: &[T],
    base: Option<&[T]>,
    weights: [f32; 2],
    opts: &NuslerpOptions,
    scratch: &mut [f64],
    out: &mut [O],
) -> Result<(), Error> {
    let n = x0.len();
    ensure_len("x1", n, x1.len())?;
    if let Some(b) = base {
        ensure_len("base", n, b.len())?;
    }
    ensure_len("out", n, out.len())?;
    let plan = Nuslerp::new(n, weights, opts)?;
    let mut st = plan.stats(scratch)?;
    st.feed(x0, x1, base)?;
    st.finish()?.apply(x0, x1, base, 0, out)
}

// ---------------------------------------------------------------------------
// Multi-SLERP and Karcher: Gram-matrix methods.

/// A linear combination `out = b + sum_i a_i (x_i - b)` (with a base) or
/// `out = sum_i a_i x_i`, the result of the Gram-matrix methods. Apply it to
/// chunks in any order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Combination {
    m: usize,
    coeffs: [f32; MAX_MODELS],
    /// Output is the first input unchanged (single-model merges).
    copy_first: bool,
}

impl Combination {
    /// The coefficients `a_i`.
    pub fn coefficients(&self) -> &[f32] {
        &self.coeffs[..self.m]
    }

    /// Applies the combination to one chunk of every model (and the base,
    /// which must be given iff the statistics were fed one).
    ///
    /// Errors: [`Error::LengthMismatch`] (`models.count`, `models`, `base`,
    /// `out`). Nothing is written on error.
    pub fn apply<T: Element, O: Element>(
        &self,
        models: &[&[T]],
        base: Option<&[T]>,
        out: &mut [O],
    ) -> Result<(), Error> {
        let len = out.len();
        super::check_chunk(models, self.m, len)?;
        if let Some(b) = base {
            ensure_len("base", len, b.len())?;
        }
        if self.copy_first {
            let mut buf = [0.0f32; TILE];
            for (c, o) in models[0].chunks(TILE).zip(out.chunks_mut(TILE)) {
                store(as_f32(c, &mut buf), o);
            }
            return Ok(());
        }
        let mut xb = [0.0f32; TILE];
        let mut bb = [0.0f32; TILE];
        let mut acc = [0.0f32; TILE];
        let mut lo = 0;
        while lo < len {
            let hi = (lo + TILE).min(len);
            let acc = &mut acc[..hi - lo];
            acc.fill(0.0);
            let b: &[f32] = match base {
                Some(base) => as_f32(&base[lo..hi], &mut bb),
                None => &[],
            };
            for (x, &a) in models.iter().zip(&self.coeffs[..self.m]) {
                let x = as_f32(&x[lo..hi], &mut xb);
                if b.is_empty() {
                    for (s, &x) in acc.iter_mut().zip(x) {
                        *s += a * x;
                    }
                } else {
                    for ((s, &x), &b) in acc.iter_mut().zip(x).zip(b) {
                        *s += a * (x - b);
                    }
                }
            }
            if !b.is_empty() {
                for (s, &b) in acc.iter_mut().zip(b) {
                    *s += b;
                }
            }
            store(acc, &mut out[lo..hi]);
            lo = hi;
        }
        Ok(())
    }
}

/// The Gram statistics shared by multi-SLERP and Karcher.
#[derive(Debug, Clone, Copy)]
struct GramFeed {
    m: usize,
    n: usize,
    fed: usize,
    with_base: bool,
    gram: Gram,
}

impl GramFeed {
    fn new(m: usize, n: usize, with_base: bool) -> Result<Self, Error> {
        ensure(m > 0, Error::Empty { arg: "weights" })?;
        ensure(
            m <= MAX_MODELS,
            Error::TooLarge {
                arg: "weights",
                index: 0,
                max: MAX_MODELS,
                got: m,
            },
        )?;
        Ok(Self {
            m,
            n,
            fed: 0,
            with_base,
            gram: Gram::new(m),
        })
    }

    fn feed<T: Element>(&mut self, models: &[&[T]], base: Option<&[T]>) -> Result<(), Error> {
        let len = models.first().map_or(0, |x| x.len());
        super::check_chunk(models, self.m, len)?;
        ensure(
            base.is_some() == self.with_base,
            Error::Unsupported {
                what: "give the base with every chunk iff the merge was planned with one",
            },
        )?;
        if let Some(b) = base {
            ensure_len("base", len, b.len())?;
        }
        ensure(
            len <= self.n - self.fed,
            Error::TooLarge {
                arg: "models",
                index: 0,
                max: self.n - self.fed,
                got: len,
            },
        )?;
        let mut rows = [[0.0f32; TILE]; MAX_MODELS];
        let mut xb = [0.0f32; TILE];
        let mut bb = [0.0f32; TILE];
        let mut lo = 0;
        while lo < len {
            let hi = (lo + TILE).min(len);
            let b: &[f32] = match base {
                Some(base) => as_f32(&base[lo..hi], &mut bb),
                None => &[],
            };
            for (row, x) in rows.iter_mut().zip(models) {
                let x = as_f32(&x[lo..hi], &mut xb);
                let row = &mut row[..hi - lo];
                row.copy_from_slice(x);
                if !b.is_empty() {
                    for (r, &b) in row.iter_mut().zip(b) {
                        *r -= b;
                    }
                }
            }
            self.gram.push_rows(&rows[..self.m], hi - lo);
            lo = hi;
        }
        self.fed += len;
        Ok(())
    }

    fn done(&self) -> Result<(), Error> {
        ensure_len("models", self.n, self.fed)
    }
}

/// Options of [`multislerp`] (mergekit's defaults in
/// [`MultislerpOptions::new`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultislerpOptions {
    /// Divide the weights by their sum (mergekit: true).
    pub normalize_weights: bool,
    /// Added to each norm before dividing, and the degenerate-mean threshold
    /// (mergekit: 1e-8).
    pub eps: f64,
}

impl MultislerpOptions {
    /// mergekit's defaults: `normalize_weights: true`, `eps: 1e-8`.
    pub const fn new() -> Self {
        Self {
            normalize_weights: true,
            eps: 1e-8,
        }
    }
}

impl Default for MultislerpOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Statistics of a multi-SLERP: the Gram matrix of the (task) vectors.
///
/// mergekit's multislerp projects the normalized inputs onto the tangent
/// plane at their weighted mean, averages there and maps back; but the
/// weighted sum of those projections is identically zero
/// (`sum w_i (u_i - (u_i . m) m) = M - (M . m) m = 0` for `M = sum w_i u_i`,
/// `m = M / |M|`), so the exponential map returns `m` itself. The method is
/// exactly `out = m · sum_i w_i |v_i|` with `m = normalize(sum_i w_i
/// v_i / (|v_i| + eps))`, which is what this computes, in one statistics
/// pass and one apply pass (mergekit's result differs only by the rounding
/// noise of its zero tangent step).
#[derive(Debug, Clone, Copy)]
pub struct MultislerpStats {
    feed: GramFeed,
    w: [f64; MAX_MODELS],
    opts: MultislerpOptions,
}

impl MultislerpStats {
    /// Starts a multi-SLERP of `weights.len()` models over tensors of `n`
    /// elements, on task vectors over a base iff `with_base`.
    ///
    /// Errors: [`Error::Empty`] / [`Error::TooLarge`] (`weights`: none, more
    /// than [`MAX_MODELS`]), [`Error::NonFinite`] (`weights`, `eps`),
    /// [`Error::OutOfRange`] (`eps` negative), [`Error::ZeroSum`]
    /// (`weights`, normalized, summing to zero).
    pub fn new(n: usize, weights: &[f32], with_base: bool, opts: &MultislerpOptions) -> Result<Self, Error> {
        let feed = GramFeed::new(weights.len(), n, with_base)?;
        check_finite("weights", weights)?;
        check_nonneg("eps", opts.eps)?;
        let mut w = [0.0f64; MAX_MODELS];
        // mergekit: weights / weights.sum() in f32.
        let s = if opts.normalize_weights {
            super::weight_sum("weights", weights)?
        } else {
            1.0
        };
        for (d, &x) in w.iter_mut().zip(weights) {
            *d = if opts.normalize_weights {
                (x / s) as f64
            } else {
                x as f64
            };
        }
        Ok(Self { feed, w, opts: *opts })
    }

    /// Feeds the next chunk of every model (and of the base iff planned with
    /// one).
    ///
    /// Errors: [`Error::LengthMismatch`] (`models.count`, `models`, `base`),
    /// [`Error::TooLarge`] (`models`, past `n`), [`Error::Unsupported`] (base
    /// given or missing against the plan). Nothing changes on error.
    pub fn feed<T: Element>(&mut self, models: &[&[T]], base: Option<&[T]>) -> Result<(), Error> {
        self.feed.feed(models, base)
    }

    /// The combination.
    ///
    /// Errors: [`Error::LengthMismatch`] (`models`: fewer than `n` elements
    /// fed); [`Error::ZeroSum`] (`weights`) when the weighted mean direction
    /// is zero (`|m| < eps`, e.g. antipodal vectors with equal weights) and
    /// there are more than 2 models (with 2 models mergekit falls back to
    /// the weighted sum `w0 v0 + w1 v1`, and so does this).
    pub fn finish(&self) -> Result<Combination, Error> {
        self.feed.done()?;
        let m = self.feed.m;
        let mut coeffs = [0.0f32; MAX_MODELS];
        if m == 1 {
            // mergekit returns the single input as it is.
            return Ok(Combination {
                m,
                coeffs,
                copy_first: true,
            });
        }
        let g = &self.feed.gram;
        let eps = self.opts.eps;
        let mut norms = [0.0f64; MAX_MODELS];
        let mut c = [0.0f64; MAX_MODELS];
        for i in 0..m {
            norms[i] = sqrt_f64(g.get(i, i));
            c[i] = self.w[i] / (norms[i] + eps);
        }
        let mut mm = 0.0f64;
        for i in 0..m {
            for j in 0..m {
                mm += c[i] * c[j] * g.get(i, j);
            }
        }
        let mnorm = sqrt_f64(mm.max(0.0));
        if mnorm < eps {
            ensure(
                m == 2,
                Error::ZeroSum {
                    arg: "weights",
                    index: 0,
                },
            )?;
            coeffs[0] = self.w[0] as f32;
            coeffs[1] = self.w[1] as f32;
            return Ok(Combination {
                m,
                coeffs,
                copy_first: false,
            });
        }
        let scale: f64 = (0..m).map(|i| self.w[i] * norms[i]).sum();
        for i in 0..m {
            coeffs[i] = (c[i] / mnorm * scale) as f32;
        }
        Ok(Combination {
            m,
            coeffs,
            copy_first: false,
        })
    }
}

/// One-shot multi-SLERP (see [`MultislerpStats`] for the formula) of
/// `models` (on task vectors over `base` if given) into `out`.
///
/// Errors: as [`MultislerpStats::new`] / [`MultislerpStats::finish`], plus
/// [`Error::LengthMismatch`] (`models`, `base`, `out`). Nothing is written
/// on error.
pub fn multislerp<T: Element, O: Element>(
    models: &[&[T]],
    base: Option<&[T]>,
    weights: &[f32],
    opts: &MultislerpOptions,
    out: &mut [O],
) -> Result<Combination, Error> {
    let n = out.len();
    check_models(models, n, MAX_MODELS)?;
    ensure_len("weights", models.len(), weights.len())?;
    if let Some(b) = base {
        ensure_len("base", n, b.len())?;
    }
    let mut st = MultislerpStats::new(n, weights, base.is_some(), opts)?;
    st.feed(models, base)?;
    let c = st.finish()?;
    c.apply(models, base, out)?;
    Ok(c)
}

/// Most fixed-point iterations a Karcher mean accepts
/// ([`KarcherOptions::max_iter`]): the iteration converges in a handful
/// (mergekit stops at 10), and the bound keeps a mistaken value (the C
/// ABI's fuzzer passed 4e9: hours of work for one tensor) a named error.
pub const KARCHER_MAX_ITER: u32 = 10_000;

/// Options of [`karcher`] (mergekit's defaults in [`KarcherOptions::new`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KarcherOptions {
    /// Most fixed-point iterations (mergekit: 10; at most
    /// [`KARCHER_MAX_ITER`]).
    pub max_iter: u32,
    /// Convergence and degeneracy tolerance (mergekit: 1e-5).
    pub tol: f64,
}

impl KarcherOptions {
    /// mergekit's defaults: `max_iter: 10`, `tol: 1e-5`.
    pub const fn new() -> Self {
        Self {
            max_iter: 10,
            tol: 1e-5,
        }
    }
}

impl Default for KarcherOptions {
    fn default() -> Self {
        Self::new()
    }
}

/// Statistics of a Karcher (Riemannian) mean on the unit sphere.
///
/// With weights `a_i = w_i / sum w` (mergekit: equal weights over every
/// input, **the base model included as one more input**), norms `|x_i|`
/// and units `u_i = x_i / |x_i|`: inputs with `|x_i| <= tol` are left out
/// of the direction (their weights renormalized over the rest) but count
/// in the scale. The start is the normalized weighted mean of the units (the
/// first valid unit if that mean is shorter than `tol`); each iteration
/// takes `T = sum_i a_i θ_i / sin θ_i (u_i - cos θ_i u)` over the units with
/// `θ_i = acos(clamp(u . u_i)) >= tol`, stops when `|T| < tol`, else moves
/// `u <- cos|T| u + sin|T| T/|T|` and renormalizes. The output is
/// `(sum_i a_i |x_i|) u` (all zeros if no input is valid).
///
/// The mean stays in the span of the inputs, so it is carried as
/// coefficients over them and every inner product comes from the Gram
/// matrix: one statistics pass and one apply pass, where mergekit makes
/// several passes over the tensors per iteration. The iterations are `f64`.
#[derive(Debug, Clone, Copy)]
pub struct KarcherStats {
    feed: GramFeed,
    a: [f64; MAX_MODELS],
    opts: KarcherOptions,
}

impl KarcherStats {
    /// Starts a Karcher mean of `weights.len()` models over tensors of `n`
    /// elements.
    ///
    /// Errors: [`Error::Empty`] / [`Error::TooLarge`] (`weights`),
    /// [`Error::NonFinite`] (`weights`, `tol`), [`Error::OutOfRange`]
    /// (`weights` negative, `tol` negative), [`Error::ZeroSum`] (`weights`),
    /// [`Error::TooLarge`] (`max_iter` above [`KARCHER_MAX_ITER`]).
    pub fn new(n: usize, weights: &[f32], opts: &KarcherOptions) -> Result<Self, Error> {
        let feed = GramFeed::new(weights.len(), n, false)?;
        check_finite("weights", weights)?;
        for (index, &w) in weights.iter().enumerate() {
            ensure(
                w >= 0.0,
                Error::OutOfRange {
                    arg: "weights",
                    index,
                },
            )?;
        }
        check_nonneg("tol", opts.tol)?;
        ensure(
            opts.max_iter <= KARCHER_MAX_ITER,
            Error::TooLarge {
                arg: "max_iter",
                index: 0,
                max: KARCHER_MAX_ITER as usize,
                got: opts.max_iter as usize,
            },
        )?;
        let s: f64 = weights.iter().map(|&w| w as f64).sum();
        ensure(
            s > 0.0,
            Error::ZeroSum {
                arg: "weights",
                index: 0,
            },
        )?;
        let mut a = [0.0f64; MAX_MODELS];
        for (d, &w) in a.iter_mut().zip(weights) {
            *d = w as f64 / s;
        }
        Ok(Self { feed, a, opts: *opts })
    }

    /// Feeds the next chunk of every model.
    ///
    /// Errors: [`Error::LengthMismatch`] (`models.count`, `models`),
    /// [`Error::TooLarge`] (`models`, past `n`). Nothing changes on error.
    pub fn feed<T: Element>(&mut self, models: &[&[T]]) -> Result<(), Error> {
        self.feed.feed(models, None)
    }

    /// The combination (see the type's documentation).
    ///
    /// Errors: [`Error::LengthMismatch`] (`models`: fewer than `n` fed).
    pub fn finish(&self) -> Result<Combination, Error> {
        self.feed.done()?;
        let m = self.feed.m;
        let mut coeffs = [0.0f32; MAX_MODELS];
        if m == 1 {
            return Ok(Combination {
                m,
                coeffs,
                copy_first: true,
            });
        }
        let tol = self.opts.tol;
        let g = &self.feed.gram;
        let mut norm = [0.0f64; MAX_MODELS];
        for (i, v) in norm[..m].iter_mut().enumerate() {
            *v = sqrt_f64(g.get(i, i));
        }
        // Unit Gram matrix over the valid inputs.
        let mut valid = [false; MAX_MODELS];
        let mut asum = 0.0;
        for i in 0..m {
            valid[i] = norm[i] > tol;
            if valid[i] {
                asum += self.a[i];
            }
        }
        let Some(first) = (0..m).find(|&i| valid[i]) else {
            // No valid direction: zeros (mergekit).
            return Ok(Combination {
                m,
                coeffs,
                copy_first: false,
            });
        };
        let mut gu = [[0.0f64; MAX_MODELS]; MAX_MODELS];
        for i in 0..m {
            for j in 0..m {
                if valid[i] && valid[j] {
                    gu[i][j] = g.get(i, j) / (norm[i] * norm[j]);
                }
            }
        }
        let na: [f64; MAX_MODELS] = core::array::from_fn(|i| {
            if i < m && valid[i] && asum > 0.0 {
                self.a[i] / asum
            } else {
                0.0
            }
        });
        let quad = |c: &[f64; MAX_MODELS]| -> f64 {
            let mut s = 0.0;
            for i in 0..m {
                for j in 0..m {
                    s += c[i] * c[j] * gu[i][j];
                }
            }
            sqrt_f64(s.max(0.0))
        };
        // Start: normalized weighted mean of the units.
        let mut c = na;
        let mn = quad(&c);
        if mn < tol {
            c = [0.0; MAX_MODELS];
            c[first] = 1.0;
        } else {
            for v in c[..m].iter_mut() {
                *v /= mn;
            }
        }
        for _ in 0..self.opts.max_iter {
            let mut tv = [0.0f64; MAX_MODELS];
            for i in 0..m {
                if !valid[i] {
                    continue;
                }
                let dot: f64 = (0..m).map(|j| c[j] * gu[j][i]).sum::<f64>();
                let dot = if dot.is_nan() { dot } else { dot.clamp(-1.0, 1.0) };
                let theta = acos(dot);
                if theta < tol {
                    continue;
                }
                let f = na[i] * theta / sin(theta);
                tv[i] += f;
                for j in 0..m {
                    tv[j] -= f * dot * c[j];
                }
            }
            let tn = quad(&tv);
            if tn.is_nan() || tn < tol {
                break;
            }
            let (ct, st) = (cos(tn), sin(tn));
            for j in 0..m {
                c[j] = ct * c[j] + st * tv[j] / tn;
            }
            let un = quad(&c);
            if un > tol {
                for v in c[..m].iter_mut() {
                    *v /= un;
                }
            }
        }
        let scale: f64 = (0..m).map(|i| self.a[i] * norm[i]).sum();
        for i in 0..m {
            if valid[i] {
                coeffs[i] = (scale * c[i] / norm[i]) as f32;
            }
        }
        Ok(Combination {
            m,
            coeffs,
            copy_first: false,
        })
    }
}

/// One-shot Karcher mean (see [`KarcherStats`]) of `models` with weights
/// `weights` (mergekit: equal weights, the base listed as one of the
/// models) into `out`.
///
/// Errors: as [`KarcherStats::new`], plus [`Error::LengthMismatch`]
/// (`models`, `out`). Nothing is written on error.
pub fn karcher<T: Element, O: Element>(
    models: &[&[T]],
    weights: &[f32],
    opts: &KarcherOptions,
    out: &mut [O],
) -> Result<Combination, Error> {
    let n = out.len();
    check_models(models, n, MAX_MODELS)?;
    ensure_len("weights", models.len(), weights.len())?;
    let mut st = KarcherStats::new(n, weights, opts)?;
    st.feed(models)?;
    let c = st.finish()?;
    c.apply(models, None, out)?;
    Ok(c)
}
