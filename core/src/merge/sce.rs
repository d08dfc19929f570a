//! SCE (Select, Calculate, Erase; FuseChat, Wan et al. 2024), as mergekit's
//! `sce`.
//!
//! With base `b` and task vectors `delta_i = x_i - b` (`i < M`):
//!
//! 1. **Select** (only when `select_topk < 1`): per element, the population
//!    variance over the models `var = mean_i (delta_i - mean_i delta_i)^2`
//!    (`f32`); with `c` the number of elements whose variance is non-zero,
//!    keep the `k = floor(select_topk * c)` elements of largest variance
//!    (exact, ties to the lower index; see [`select`](super::select)),
//!    **one mask shared by all models**: `delta~_i = mask * delta_i`.
//!    `k = 0` keeps nothing.
//! 2. **Calculate**: matrix-level weights from the selected task vectors,
//!    `e_i = mean(delta~_i^2)` (accumulated chunk-invariantly in `f64`),
//!    `omega_i = f32(e_i / sum_j e_j)`, or `1/M` each when `|sum_j e_j| < 1e-6`.
//! 3. **Erase**: the elected sign is `+1` where `sum_i delta~_i >= 0`, else
//!    `-1` (unweighted "sum" votes); model `i` agrees where `delta~_i != 0`
//!    has that sign.
//! 4. `out = b + sum_{agreeing} omega_i delta~_i / max(sum_{agreeing} omega_i, 1e-6)`.
//!
//! Per-model weights are not used. NaN in a task vector makes that
//! element's output NaN (and, through `e_i`, every weight NaN).
//!
//! Passes of the two-phase form: 1 (variance count) + up to 4 (the
//! selection) + 1 (energies) with selection; 1 (energies) without.

use super::select::{BAND_BUF, Threshold, TopK, count_of};
use super::sum::Sum;
use super::{MAX_MODELS, as_f32, check_chunk, check_fraction, check_models, store};
use crate::element::Element;
use crate::error::{Error, ensure, ensure_len};

/// Options of [`sce`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SceOptions {
    /// Fraction of the non-zero-variance elements selected, in `(0, 1]`
    /// (mergekit default 1: no selection).
    pub select_topk: f64,
}

impl SceOptions {
    /// mergekit's default: `select_topk: 1.0`.
    pub const fn new() -> Self {
        Self { select_topk: 1.0 }
    }
}

impl Default for SceOptions {
    fn default() -> Self {
        Self::new()
    }
}

const TILE: usize = 128;

/// Fills `rows[i][..len]` with the task vectors of the tile and `var` with
/// their population variance over the models.
#[inline]
fn tile_stats<T: Element>(
    models: &[&[T]],
    base: &[T],
    lo: usize,
    hi: usize,
    rows: &mut [[f32; TILE]; MAX_MODELS],
    var: &mut [f32; TILE],
) {
    let mut xb = [0.0f32; TILE];
    let mut bb = [0.0f32; TILE];
    let len = hi - lo;
    let b = as_f32(&base[lo..hi], &mut bb);
    for (row, x) in rows.iter_mut().zip(models) {
        let x = as_f32(&x[lo..hi], &mut xb);
        for ((r, &x), &b) in row.iter_mut().zip(x).zip(b) {
            *r = x - b;
        }
    }
    let m = models.len();
    let mf = m as f32;
    let mut mean = [0.0f32; TILE];
    for row in &rows[..m] {
        for (s, &d) in mean[..len].iter_mut().zip(&row[..len]) {
            *s += d;
        }
    }
    for s in mean[..len].iter_mut() {
        *s /= mf;
    }
    var[..len].fill(0.0);
    for row in &rows[..m] {
        for ((v, &d), &mu) in var[..len].iter_mut().zip(&row[..len]).zip(&mean[..len]) {
            let e = d - mu;
            *v += e * e;
        }
    }
    for v in var[..len].iter_mut() {
        *v /= mf;
    }
}

/// A validated SCE merge of `m` models over tensors of `n` elements.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sce {
    n: usize,
    m: usize,
    opts: SceOptions,
}

impl Sce {
    /// Plans the merge.
    ///
    /// Errors: [`Error::Empty`] (`models`: `m == 0`), [`Error::TooLarge`]
    /// (`models` beyond [`MAX_MODELS`]; `n` beyond `u32::MAX` with a
    /// selection), [`Error::NonFinite`] / [`Error::OutOfRange`]
    /// (`select_topk` outside `(0, 1]`).
    pub fn new(n: usize, m: usize, opts: &SceOptions) -> Result<Self, Error> {
        ensure(m > 0, Error::Empty { arg: "models" })?;
        ensure(
            m <= MAX_MODELS,
            Error::TooLarge {
                arg: "models",
                index: 0,
                max: MAX_MODELS,
                got: m,
            },
        )?;
        check_fraction("select_topk", 0, opts.select_topk, false)?;
        if opts.select_topk < 1.0 {
            ensure(
                n as u64 <= super::select::MAX_LEN,
                Error::TooLarge {
                    arg: "n",
                    index: 0,
                    max: super::select::MAX_LEN as usize,
                    got: n,
                },
            )?;
        }
        Ok(Self { n, m, opts: *opts })
    }

    /// `u32` scratch the statistics need: [`TopK::work_len_for`]`(n)` with a
    /// selection, else 0.
    pub fn scratch_len(&self) -> usize {
        if self.opts.select_topk < 1.0 {
            TopK::work_len_for(self.n as u64)
        } else {
            0
        }
    }

    /// Starts the statistics passes.
    ///
    /// Errors: [`Error::BufferTooShort`] (`scratch`).
    pub fn stats<'s>(&self, scratch: &'s mut [u32]) -> Result<SceStats<'s>, Error> {
        let need = self.scratch_len();
        ensure(
            scratch.len() >= need,
            Error::BufferTooShort {
                arg: "scratch",
                needed: need,
                got: scratch.len(),
            },
        )?;
        Ok(SceStats {
            plan: *self,
            phase: if self.opts.select_topk < 1.0 {
                ScePhase::Count
            } else {
                ScePhase::Energy
            },
            fed: 0,
            nonzero: 0,
            sel: TopK::new(0, 0).expect("k = 0 <= n = 0"),
            energy: [Sum::ZERO; MAX_MODELS],
            scratch,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScePhase {
    Count,
    Select,
    Energy,
    Done,
}

/// The statistics passes of an [`Sce`] merge.
#[derive(Debug)]
pub struct SceStats<'s> {
    plan: Sce,
    phase: ScePhase,
    fed: u64,
    nonzero: u64,
    sel: TopK,
    energy: [Sum; MAX_MODELS],
    scratch: &'s mut [u32],
}

impl SceStats<'_> {
    /// True while another pass is needed.
    pub fn needs_pass(&self) -> bool {
        self.phase != ScePhase::Done
    }

    fn threshold(&self) -> Threshold {
        if self.plan.opts.select_topk < 1.0 {
            self.sel.threshold().unwrap_or(Threshold::ALL)
        } else {
            Threshold::ALL
        }
    }

    /// Feeds the next chunk of every model and of the base, in order.
    ///
    /// Errors: [`Error::LengthMismatch`] (`models.count`, `models`),
    /// [`Error::TooLarge`] (`base`, past `n`). Nothing changes on error.
    pub fn feed<T: Element>(&mut self, models: &[&[T]], base: &[T]) -> Result<(), Error> {
        if self.phase == ScePhase::Done {
            return Ok(());
        }
        let len = base.len();
        check_chunk(models, self.plan.m, len)?;
        ensure(
            self.fed + len as u64 <= self.plan.n as u64,
            Error::TooLarge {
                arg: "base",
                index: 0,
                max: self.plan.n - self.fed as usize,
                got: len,
            },
        )?;
        let thr = self.threshold();
        let m = self.plan.m;
        let mut rows = [[0.0f32; TILE]; MAX_MODELS];
        let mut var = [0.0f32; TILE];
        let mut sq = [0.0f32; TILE];
        let mut tile = [0u32; BAND_BUF];
        let mut lo = 0;
        while lo < len {
            let hi = (lo + TILE).min(len);
            let l = hi - lo;
            tile_stats(models, base, lo, hi, &mut rows, &mut var);
            match self.phase {
                ScePhase::Count => {
                    self.nonzero += var[..l].iter().filter(|&&v| v != 0.0).count() as u64;
                }
                ScePhase::Select => {
                    self.sel.feed_tiled(&var[..l], self.scratch, &mut tile);
                }
                ScePhase::Energy => {
                    let g0 = self.fed + lo as u64;
                    for (row, e) in rows[..m].iter().zip(self.energy.iter_mut()) {
                        for (j, (s, &d)) in sq[..l].iter_mut().zip(&row[..l]).enumerate() {
                            *s = if thr.keeps(g0 + j as u64, var[j]) { d } else { 0.0 };
                        }
                        e.push_prod(&sq[..l], &sq[..l]);
                    }
                }
                ScePhase::Done => {}
            }
            lo = hi;
        }
        self.fed += len as u64;
        Ok(())
    }

    /// Ends the current pass.
    ///
    /// Errors: [`Error::LengthMismatch`] (`base`) if the pass was not fed
    /// exactly `n` elements (nothing changes).
    pub fn end_pass(&mut self) -> Result<(), Error> {
        if self.phase == ScePhase::Done {
            return Ok(());
        }
        super::check_pass_fed(self.fed, self.plan.n)?;
        self.fed = 0;
        match self.phase {
            ScePhase::Count => {
                let k = count_of(self.plan.opts.select_topk, self.nonzero as usize) as u64;
                self.sel = TopK::new(self.plan.n as u64, k)?;
                self.phase = if self.sel.is_done() {
                    ScePhase::Energy
                } else {
                    ScePhase::Select
                };
            }
            ScePhase::Select => {
                self.sel.end_pass_unchecked(self.scratch);
                if self.sel.is_done() {
                    self.phase = ScePhase::Energy;
                }
            }
            ScePhase::Energy => self.phase = ScePhase::Done,
            ScePhase::Done => {}
        }
        Ok(())
    }

    /// The finished statistics.
    ///
    /// Errors: [`Error::Unsupported`] while a pass is still needed.
    pub fn finish(self) -> Result<SceApply, Error> {
        ensure(
            self.phase == ScePhase::Done,
            Error::Unsupported {
                what: "statistics passes remain (feed and end_pass until needs_pass() is false)",
            },
        )?;
        let m = self.plan.m;
        let n = self.plan.n.max(1) as f64;
        let mut e = [0.0f64; MAX_MODELS];
        let mut total = 0.0f64;
        for (e, s) in e[..m].iter_mut().zip(&self.energy) {
            *e = s.value() / n;
            total += *e;
        }
        let mut omega = [0.0f32; MAX_MODELS];
        for (o, &e) in omega[..m].iter_mut().zip(&e) {
            *o = if total.abs() < 1e-6 {
                (1.0 / m as f64) as f32
            } else {
                (e / total) as f32
            };
        }
        Ok(SceApply {
            plan: self.plan,
            thr: self.threshold(),
            omega,
        })
    }
}

/// Finished SCE statistics: the selection and the model weights. Apply to
/// chunks in any order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SceApply {
    plan: Sce,
    thr: Threshold,
    omega: [f32; MAX_MODELS],
}

impl SceApply {
    /// The model weights `omega_i`.
    pub fn weights(&self) -> &[f32] {
        &self.omega[..self.plan.m]
    }

    /// The variance selection ([`Threshold::ALL`] without one).
    pub fn selection(&self) -> Threshold {
        self.thr
    }

    /// Merges elements `offset..offset + base.len()` into `out`.
    ///
    /// Errors: [`Error::LengthMismatch`] (`models.count`, `models`, `out`),
    /// [`Error::TooLarge`] (`offset`). Nothing is written on error.
    pub fn apply<T: Element, O: Element>(
        &self,
        models: &[&[T]],
        base: &[T],
        offset: usize,
        out: &mut [O],
    ) -> Result<(), Error> {
        let p = &self.plan;
        let len = base.len();
        check_chunk(models, p.m, len)?;
        ensure_len("out", len, out.len())?;
        super::check_span(offset, len, p.n)?;
        let m = p.m;
        let mut rows = [[0.0f32; TILE]; MAX_MODELS];
        let mut var = [0.0f32; TILE];
        let mut bb = [0.0f32; TILE];
        let mut res = [0.0f32; TILE];
        let mut lo = 0;
        while lo < len {
            let hi = (lo + TILE).min(len);
            let l = hi - lo;
            tile_stats(models, base, lo, hi, &mut rows, &mut var);
            let g0 = (offset + lo) as u64;
            let mut keep = [false; TILE];
            for (j, k) in keep[..l].iter_mut().enumerate() {
                *k = self.thr.keeps(g0 + j as u64, var[j]);
            }
            let mut vote = [0.0f32; TILE];
            let mut nan = [false; TILE];
            for row in &rows[..m] {
                for (((v, r), &k), nn) in vote[..l]
                    .iter_mut()
                    .zip(&row[..l])
                    .zip(&keep[..l])
                    .zip(nan.iter_mut())
                {
                    let d = if k { *r } else { 0.0 };
                    *v += d;
                    *nn |= d.is_nan();
                }
            }
            let mut num = [0.0f32; TILE];
            let mut den = [0.0f32; TILE];
            for (row, &w) in rows[..m].iter().zip(&self.omega[..m]) {
                for ((((a, dv), &r), &k), &vt) in num[..l]
                    .iter_mut()
                    .zip(den[..l].iter_mut())
                    .zip(&row[..l])
                    .zip(&keep[..l])
                    .zip(&vote[..l])
                {
                    let d = if k { r } else { 0.0 };
                    let agree = if vt >= 0.0 { d > 0.0 } else { d < 0.0 };
                    *a += if agree { d * w } else { 0.0 };
                    *dv += if agree { w } else { 0.0 };
                }
            }
            let b = as_f32(&base[lo..hi], &mut bb);
            for ((((r, &a), &dv), &b), &nn) in res[..l]
                .iter_mut()
                .zip(&num[..l])
                .zip(&den[..l])
                .zip(b)
                .zip(&nan[..l])
            {
                let d = if dv > 1e-6 { dv } else { 1e-6 };
                *r = if nn { f32::NAN } else { b + a / d };
            }
            store(&res[..l], &mut out[lo..hi]);
            lo = hi;
        }
        Ok(())
    }
}

/// One-shot SCE merge of `models` over `base` into `out`; `scratch` holds
/// [`Sce::scratch_len`] words.
///
/// Errors: as [`Sce::new`], plus [`Error::LengthMismatch`] (`models`,
/// `out`), [`Error::BufferTooShort`] (`scratch`). Nothing is written on
/// error.
pub fn sce<T: Element, O: Element>(
    models: &[&[T]],
    base: &[T],
    opts: &SceOptions,
    scratch: &mut [u32],
    out: &mut [O],
) -> Result<SceApply, Error> {
    let n = base.len();
    check_models(models, n, MAX_MODELS)?;
    ensure_len("out", n, out.len())?;
    let plan = Sce::new(n, models.len(), opts)?;
    let mut st = plan.stats(scratch)?;
    while st.needs_pass() {
        st.feed(models, base)?;
        st.end_pass()?;
    }
    let a = st.finish()?;
    a.apply(models, base, 0, out)?;
    Ok(a)
}
