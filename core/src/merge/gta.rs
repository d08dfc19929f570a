//! The task-vector family ("generalized task arithmetic" in mergekit):
//! task arithmetic, TIES, DARE (linear and TIES), breadcrumbs (and
//! breadcrumbs-TIES), DELLA (and DELLA-linear).
//!
//! # Semantics, per tensor
//!
//! With base `b`, models `x_i` (`i < M`), task vectors `delta_i = x_i - b`,
//! per-model [`TaskParams`] (`weight w_i`, `density d_i`, `gamma_i`,
//! `epsilon_i`) and the [`GtaOptions`]:
//!
//! 1. **Sparsify** each task vector ([`Sparsify`]):
//!    `delta~_i = s_i * mask_i * delta_i`, where `s_i` is the rescale factor
//!    ([`Rescale`]). A model with `d_i = 1` is never sparsified or rescaled.
//! 2. **Weight**: `u_i = w_i * delta~_i`.
//! 3. **Combine**, per element:
//!    - without consensus ([`Consensus::None`]): `D = sum_i u_i`, divisor
//!      `W = sum_i w_i` (a tensor-wide constant);
//!    - with consensus: the elected sign is `+1` if `V >= 0` else `-1`, with
//!      `V = sum_i v_i` ([`Consensus::Sum`], "mass") or
//!      `V = sum_i sign(v_i)` ([`Consensus::Count`]), where the votes are
//!      `v_i = u_i` ([`Votes::Weighted`], mergekit) or `v_i = delta~_i`
//!      ([`Votes::Unweighted`], the TIES paper). Model `i` *agrees* when
//!      `v_i != 0` has the elected sign. `D = sum_{agreeing} u_i` and
//!      `W = sum_{agreeing} w_i` ([`Divisor::WeightSum`], mergekit) or the
//!      number of agreeing models ([`Divisor::Count`], the paper's disjoint
//!      mean); `W = 0` becomes 1 (nothing agrees: `D = 0`).
//! 4. `D <- D / W` if `normalize`; then `D <- lambda * D` (skipped when
//!    `lambda == 1`); the output is `b + D`, rounded once to the output type.
//!
//! All of it is `f32` in mergekit's operation order (products, then sums in
//! model order, then the division), so f32 results agree with mergekit's
//! per-tensor output to rounding, except where this page says otherwise.
//!
//! # Sparsifiers
//!
//! - [`Sparsify::Magnitude`] (TIES trim): keep exactly
//!   `k_i = floor(d_i * n)` elements of largest `|delta_i|`, ties to the lower
//!   index ([`select`](super::select)). mergekit asserts `k > 0`; here
//!   `k = 0` keeps nothing (the model then contributes nothing to the
//!   tensor).
//! - [`Sparsify::Random`] (DARE): element `j` of model `i` is **dropped iff
//!   `rng::uniform(seed, [i, tensor_id], j) < p_i`** with `p_i = f32(1 - d_i)`
//!   (computed in `f64`, rounded once), `j` the global element index. The
//!   mask is the same for any chunking and on any device.
//! - [`Sparsify::Outliers`] (breadcrumbs): with `n_keep = floor(d n)`,
//!   `n_top = floor(gamma n)` and, if `n_keep + n_top > n`,
//!   `n_top = n - n_keep`: drop the `n_top` largest magnitudes, keep the next
//!   `n_keep`, drop the rest (the same total order as TIES). Exactly
//!   `n_keep` survive. **mergekit bug fixed:** mergekit keeps
//!   `sorted[n_bot:-n_top]`, which is empty when `n_top == 0` (`gamma = 0`,
//!   or any tensor under `1/gamma` elements, i.e. under 100 at the default),
//!   zeroing the whole task vector; here `n_top = 0` drops nothing at the
//!   top.
//! - [`Sparsify::Della`] (DELLA MagPrune): within each row (see
//!   [`GtaOptions::row_len`]), rank the magnitudes ascending, `r = 1` the
//!   smallest (ties: the lower index ranks higher), and keep element `j`
//!   with probability `p_j = (d - eps) + (r - 1) * (2 eps / (len - 1))`
//!   (computed in `f64`): dropped iff
//!   `rng::uniform(seed, [i, tensor_id], j) < f32(1 - p_j)`. A row of length
//!   1 uses `p = d` (mergekit divides 0 by 0 there). Requires
//!   `d - eps > 0` and `d + eps <= 1`.
//!
//! Granularity: Magnitude and Outliers select over the whole flattened
//! tensor (mergekit) unless [`GtaOptions::row_len`] asks for rows (the
//! breadcrumbs paper's code selects per row of the last dimension). DELLA
//! always ranks within rows; mergekit ranks along dimension 1, which is the
//! last dimension of a 2-D weight and the whole vector of a 1-D one
//! (`row_len: None`); for 3-D tensors mergekit's dimension 1 is the middle
//! one, which contiguous rows cannot express.
//!
//! # Rescaling ([`Rescale`])
//!
//! - `L1` (mergekit's `rescale: true`, default of DARE and DELLA):
//!   `s_i = |delta_i|_1 / |mask_i delta_i|_1`, one factor per tensor, skipped
//!   (`s_i = 1`) when either norm is below 1e-7. `L2` and `Linf` likewise
//!   with those norms. These need a statistics pass.
//! - `InverseKeep` (the DARE and DELLA papers): each survivor is divided by
//!   its keep probability: `s = f32(1 / d_i)` for DARE,
//!   `s_j = f32(1 / p_j)` per element for DELLA. No statistics pass.
//!   Unsupported for the deterministic sparsifiers.
//!
//! # Streaming
//!
//! [`Gta::new`] validates everything and plans the passes;
//! [`Gta::stats`] returns a [`GtaStats`] that is fed the tensor in order,
//! pass after pass, while [`GtaStats::needs_pass`]; [`GtaStats::finish`]
//! gives a small `Copy` [`GtaApply`] whose [`apply`](GtaApply::apply)
//! merges any chunk at any offset. Passes: for a tensor-wide selection
//! (Magnitude, Outliers; see [`select`](super::select)) 2 on tensors of
//! 2^20 elements or more (a sample pass reading 1/64 of the data, then one
//! full pass; up to 4 more if the sample misleads) and up to 4 below;
//! plus 1 for an `L1`/`L2`/`Linf` rescale; none otherwise (task arithmetic,
//! DARE with `InverseKeep`, row-wise selections and DELLA with
//! `InverseKeep` go straight to apply). Row-wise methods need chunks made of whole rows.
//! [`merge`] is the one-shot form; its output is bit-identical to any
//! chunked run.
//!
//! ```
//! use medley_core::merge::gta::{merge, Gta, GtaOptions, TaskParams};
//! let base = [0.0f32; 6];
//! let a = [3.0f32, -1.0, 0.5, 0.0, 2.0, -4.0];
//! let b = [1.0f32, -2.0, -0.5, 0.0, -3.0, -1.0];
//! let params = [TaskParams::new(1.0).with_density(0.5), TaskParams::new(1.0).with_density(0.5)];
//! let opts = GtaOptions::ties();
//! let plan = Gta::new(6, &params, &opts).unwrap();
//! let mut scratch = vec![0u32; plan.scratch_len()];
//! let mut out = [0.0f32; 6];
//! merge(&[&a[..], &b[..]], &base, &params, &opts, &mut scratch, &mut out).unwrap();
//! // a keeps 3, -4, 2; b keeps -2, -3, 1: element 4 is elected negative.
//! assert_eq!(out, [2.0, -2.0, 0.0, 0.0, -3.0, -4.0]);
//! ```

use super::select::{
    BAND_BUF, HIST_LEN, Threshold, TopK, count_of, hist_of, magnitude_key, ranks_ascending, sample_ranges,
};
use super::sum::Sum;
use super::{MAX_MODELS, as_f32, check_chunk, check_fraction, check_models, store};
use crate::element::Element;
use crate::error::{Error, ensure, ensure_len};
use crate::rng::{BATCH, philox4x32_10, philox4x32_10_x8};

/// How each task vector is sparsified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsify {
    /// Keep every element (task arithmetic).
    None,
    /// TIES trim: the `floor(d n)` largest magnitudes.
    Magnitude,
    /// DARE: drop each element with probability `1 - d`.
    Random,
    /// Breadcrumbs: drop the `floor(gamma n)` largest and the smallest,
    /// keeping `floor(d n)`.
    Outliers,
    /// DELLA MagPrune: rank-dependent keep probabilities in
    /// `[d - eps, d + eps]` within each row.
    Della,
}

/// Sign consensus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consensus {
    /// No sign election: a plain (weighted) sum.
    None,
    /// Elect the sign of the total mass `sum_i v_i` (TIES, mergekit "sum").
    Sum,
    /// Elect the sign of `sum_i sign(v_i)` (mergekit "count").
    Count,
}

/// What votes in the sign election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Votes {
    /// The weighted task vectors `w_i delta~_i` (mergekit; a negative or
    /// small weight changes the vote, mergekit issue #474).
    Weighted,
    /// The unweighted trimmed task vectors `delta~_i` (the TIES paper).
    Unweighted,
}

/// The divisor of a normalized consensus merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Divisor {
    /// Sum of the agreeing models' weights (mergekit).
    WeightSum,
    /// Number of agreeing models: the paper's disjoint mean.
    Count,
}

/// How survivors of a sparsifier are rescaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rescale {
    /// No rescaling.
    None,
    /// Match the tensor's L1 norm (mergekit's `rescale: true`).
    L1,
    /// Match the tensor's L2 norm.
    L2,
    /// Match the tensor's largest magnitude.
    Linf,
    /// Divide by the keep probability (DARE and DELLA papers).
    InverseKeep,
}

/// Per-model parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TaskParams {
    /// Weight `w_i` (finite; may be negative).
    pub weight: f32,
    /// Fraction kept, in `(0, 1]` (mergekit default 1: no sparsification).
    pub density: f64,
    /// Breadcrumbs: fraction of largest magnitudes dropped, in `[0, 1]`
    /// (mergekit default 0.01).
    pub gamma: f64,
    /// DELLA: half-width of the keep-probability window, `>= 0`
    /// (mergekit default 0.15).
    pub epsilon: f64,
}

impl TaskParams {
    /// `weight` with mergekit's defaults: density 1, gamma 0.01, epsilon 0.15.
    pub const fn new(weight: f32) -> Self {
        Self {
            weight,
            density: 1.0,
            gamma: 0.01,
            epsilon: 0.15,
        }
    }

    /// The same with `density`.
    pub const fn with_density(mut self, density: f64) -> Self {
        self.density = density;
        self
    }

    /// The same with `gamma`.
    pub const fn with_gamma(mut self, gamma: f64) -> Self {
        self.gamma = gamma;
        self
    }

    /// The same with `epsilon`.
    pub const fn with_epsilon(mut self, epsilon: f64) -> Self {
        self.epsilon = epsilon;
        self
    }
}

/// Options of a task-vector merge. Build one from a preset (each documents
/// its mergekit defaults) and adjust fields for the paper variants.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GtaOptions {
    /// The sparsifier.
    pub sparsify: Sparsify,
    /// Row length for row-wise work: DELLA's ranking rows (`None`: the whole
    /// tensor is one row, mergekit's 1-D case); for Magnitude and Outliers,
    /// `Some(len)` selects per row instead of over the whole tensor.
    /// Ignored by the other sparsifiers. Must divide the tensor length.
    pub row_len: Option<usize>,
    /// Sign consensus.
    pub consensus: Consensus,
    /// Votes of the sign election.
    pub votes: Votes,
    /// Divisor of a normalized consensus merge.
    pub divisor: Divisor,
    /// Divide by the (agreeing) weight sum.
    pub normalize: bool,
    /// Rescaling of sparsified task vectors.
    pub rescale: Rescale,
    /// Scale of the merged task vector (finite).
    pub lambda: f32,
    /// Seed of the random sparsifiers.
    pub seed: u64,
    /// Identifies the tensor in the random streams (`[model, tensor_id]`).
    pub tensor_id: u32,
}

impl GtaOptions {
    const BASE: GtaOptions = GtaOptions {
        sparsify: Sparsify::None,
        row_len: None,
        consensus: Consensus::None,
        votes: Votes::Weighted,
        divisor: Divisor::WeightSum,
        normalize: false,
        rescale: Rescale::None,
        lambda: 1.0,
        seed: 0,
        tensor_id: 0,
    };

    /// mergekit `task_arithmetic`: no sparsification, no consensus,
    /// `normalize: false`, `lambda: 1`.
    pub const fn task_arithmetic() -> Self {
        Self::BASE
    }

    /// mergekit `ties`: Magnitude, weighted "sum" votes, weight-sum divisor,
    /// `normalize: true`, no rescale. (The paper: set `votes` to
    /// [`Votes::Unweighted`] and `divisor` to [`Divisor::Count`], or use
    /// [`ties_paper`](Self::ties_paper).)
    pub const fn ties() -> Self {
        Self {
            sparsify: Sparsify::Magnitude,
            consensus: Consensus::Sum,
            normalize: true,
            ..Self::BASE
        }
    }

    /// TIES as in the paper (Yadav et al. 2023): unweighted votes and the
    /// disjoint mean over agreeing models; otherwise as [`ties`](Self::ties).
    /// (The paper's code trims over the whole model at once and resolves
    /// exact zero vote sums to the majority sign; here trimming is per
    /// tensor and a zero sum elects `+1`.)
    pub const fn ties_paper() -> Self {
        Self {
            votes: Votes::Unweighted,
            divisor: Divisor::Count,
            ..Self::ties()
        }
    }

    /// mergekit `dare_ties`: Random, "sum" consensus, `normalize: false`,
    /// L1 rescale. (The paper's `1/(1-p)`: `rescale: Rescale::InverseKeep`.)
    pub const fn dare_ties(seed: u64, tensor_id: u32) -> Self {
        Self {
            sparsify: Sparsify::Random,
            consensus: Consensus::Sum,
            rescale: Rescale::L1,
            seed,
            tensor_id,
            ..Self::BASE
        }
    }

    /// mergekit `dare_linear`: Random, no consensus, `normalize: false`,
    /// L1 rescale.
    pub const fn dare_linear(seed: u64, tensor_id: u32) -> Self {
        Self {
            consensus: Consensus::None,
            ..Self::dare_ties(seed, tensor_id)
        }
    }

    /// mergekit `breadcrumbs`: Outliers over the whole tensor, no consensus,
    /// `normalize: false`, no rescale. (The paper's per-row selection:
    /// `row_len: Some(last_dim)`.)
    pub const fn breadcrumbs() -> Self {
        Self {
            sparsify: Sparsify::Outliers,
            ..Self::BASE
        }
    }

    /// mergekit `breadcrumbs_ties`: as [`breadcrumbs`](Self::breadcrumbs)
    /// with "sum" consensus (and still `normalize: false`).
    pub const fn breadcrumbs_ties() -> Self {
        Self {
            consensus: Consensus::Sum,
            ..Self::breadcrumbs()
        }
    }

    /// mergekit `della`: DELLA MagPrune over rows of `row_len` (`None`: one
    /// row), "sum" consensus, `normalize: true`, L1 rescale. (The paper's
    /// per-element `1/p`: `rescale: Rescale::InverseKeep`.)
    pub const fn della(row_len: Option<usize>, seed: u64, tensor_id: u32) -> Self {
        Self {
            sparsify: Sparsify::Della,
            row_len,
            consensus: Consensus::Sum,
            normalize: true,
            rescale: Rescale::L1,
            seed,
            tensor_id,
            ..Self::BASE
        }
    }

    /// mergekit `della_linear`: as [`della`](Self::della) without consensus
    /// and with `normalize: false`.
    pub const fn della_linear(row_len: Option<usize>, seed: u64, tensor_id: u32) -> Self {
        Self {
            consensus: Consensus::None,
            normalize: false,
            ..Self::della(row_len, seed, tensor_id)
        }
    }
}

/// Resolved per-model parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct ModelPlan {
    weight: f32,
    /// The model keeps everything (density 1 or no sparsifier).
    dense: bool,
    /// Selection counts over one unit (tensor or row): keep the top `k_lo`
    /// minus the top `k_hi`.
    k_lo: u64,
    k_hi: u64,
    /// DARE drop probability.
    drop: f32,
    /// DARE `InverseKeep` factor.
    inv_keep: f32,
    /// DELLA keep probability `a + (r - 1) * step` (`step = 0`, `a = d`
    /// for rows of length 1).
    della_a: f64,
    della_step: f64,
}

/// A validated task-vector merge of `M` models over tensors of `n` elements
/// (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gta {
    n: usize,
    m: usize,
    opts: GtaOptions,
    /// Selection/ranking unit: `row_len` for row-wise work, else `n`.
    unit: usize,
    row_local: bool,
    models: [ModelPlan; MAX_MODELS],
    /// Non-consensus divisor `sum_i w_i`.
    wsum: f32,
}

fn is_select(s: Sparsify) -> bool {
    matches!(s, Sparsify::Magnitude | Sparsify::Outliers)
}

impl Gta {
    /// Validates and plans a merge of `params.len()` models over tensors of
    /// `n` elements.
    ///
    /// Errors: [`Error::Empty`] (`params`); [`Error::TooLarge`] (`params`
    /// beyond [`MAX_MODELS`]; `n` beyond `u32::MAX` for selections and
    /// DELLA); [`Error::NonFinite`] (`params.weight`, `params.density`,
    /// `params.gamma`, `params.epsilon`, `lambda`); [`Error::OutOfRange`]
    /// (`params.density` outside `(0, 1]`, `params.gamma` outside `[0, 1]`,
    /// `params.epsilon` with `d - eps <= 0` or `d + eps > 1`, `row_len` zero or
    /// not dividing `n`); [`Error::ZeroSum`] (`params.weight`, with
    /// `normalize` and no consensus, when the weights sum to zero up to
    /// rounding; mergekit silently divides by 1 then); [`Error::Unsupported`]
    /// (`InverseKeep` with a deterministic sparsifier).
    pub fn new(n: usize, params: &[TaskParams], opts: &GtaOptions) -> Result<Self, Error> {
        let m = params.len();
        ensure(m > 0, Error::Empty { arg: "params" })?;
        ensure(
            m <= MAX_MODELS,
            Error::TooLarge {
                arg: "params",
                index: 0,
                max: MAX_MODELS,
                got: m,
            },
        )?;
        ensure(
            opts.lambda.is_finite(),
            Error::NonFinite {
                arg: "lambda",
                index: 0,
            },
        )?;
        let sp = opts.sparsify;
        let row_local = match sp {
            Sparsify::Della => true,
            Sparsify::Magnitude | Sparsify::Outliers => opts.row_len.is_some(),
            _ => false,
        };
        let unit = if row_local { opts.row_len.unwrap_or(n) } else { n };
        if row_local {
            ensure(
                unit > 0 || n == 0,
                Error::OutOfRange {
                    arg: "row_len",
                    index: 0,
                },
            )?;
            ensure(
                unit == 0 || n.is_multiple_of(unit),
                Error::OutOfRange {
                    arg: "row_len",
                    index: 0,
                },
            )?;
        }
        if sp != Sparsify::None && sp != Sparsify::Random {
            ensure(
                unit as u64 <= super::select::MAX_LEN,
                Error::TooLarge {
                    arg: "n",
                    index: 0,
                    max: super::select::MAX_LEN as usize,
                    got: unit,
                },
            )?;
        }
        if opts.rescale == Rescale::InverseKeep && is_select(sp) {
            return Err(Error::Unsupported {
                what: "InverseKeep rescale with a deterministic sparsifier",
            });
        }
        let mut models = [ModelPlan::default(); MAX_MODELS];
        for (i, p) in params.iter().enumerate() {
            ensure(
                p.weight.is_finite(),
                Error::NonFinite {
                    arg: "params.weight",
                    index: i,
                },
            )?;
            let mut mp = ModelPlan {
                weight: p.weight,
                dense: true,
                ..ModelPlan::default()
            };
            if sp != Sparsify::None {
                check_fraction("params.density", i, p.density, false)?;
                let d = p.density;
                mp.dense = d >= 1.0;
                match sp {
                    Sparsify::Magnitude => {
                        mp.k_lo = count_of(d, unit) as u64;
                    }
                    Sparsify::Outliers => {
                        check_fraction("params.gamma", i, p.gamma, true)?;
                        let keep = count_of(d, unit);
                        let top = count_of(p.gamma, unit).min(unit - keep);
                        mp.k_lo = (keep + top) as u64;
                        mp.k_hi = top as u64;
                        mp.dense = keep == unit;
                    }
                    Sparsify::Random => {
                        mp.drop = (1.0 - d) as f32;
                        mp.inv_keep = (1.0 / d) as f32;
                    }
                    Sparsify::Della => {
                        let e = p.epsilon;
                        ensure(
                            e.is_finite(),
                            Error::NonFinite {
                                arg: "params.epsilon",
                                index: i,
                            },
                        )?;
                        if !mp.dense {
                            ensure(
                                e >= 0.0 && d - e > 0.0 && d + e <= 1.0,
                                Error::OutOfRange {
                                    arg: "params.epsilon",
                                    index: i,
                                },
                            )?;
                        }
                        if unit > 1 {
                            mp.della_a = d - e;
                            mp.della_step = 2.0 * e / (unit - 1) as f64;
                        } else {
                            mp.della_a = d;
                            mp.della_step = 0.0;
                        }
                    }
                    Sparsify::None => {}
                }
            }
            models[i] = mp;
        }
        let mut wsum = 1.0f32;
        if opts.consensus == Consensus::None && opts.normalize {
            let mut w = [0.0f32; MAX_MODELS];
            for (d, p) in w.iter_mut().zip(params) {
                *d = p.weight;
            }
            wsum = super::weight_sum("params.weight", &w[..m])?;
        }
        Ok(Self {
            n,
            m,
            opts: *opts,
            unit,
            row_local,
            models,
            wsum,
        })
    }

    /// Tensor length.
    pub fn len(&self) -> usize {
        self.n
    }

    /// True for an empty tensor.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Number of models.
    pub fn models(&self) -> usize {
        self.m
    }

    /// The options.
    pub fn options(&self) -> &GtaOptions {
        &self.opts
    }

    /// Whether a tensor-wide selection pass is needed.
    fn tensor_select(&self) -> bool {
        is_select(self.opts.sparsify) && !self.row_local && self.models[..self.m].iter().any(|p| !p.dense)
    }

    fn sels_per_model(&self) -> usize {
        if self.opts.sparsify == Sparsify::Outliers {
            2
        } else {
            1
        }
    }

    fn needs_norms(&self) -> bool {
        matches!(self.opts.rescale, Rescale::L1 | Rescale::L2 | Rescale::Linf)
            && self.opts.sparsify != Sparsify::None
            && self.models[..self.m].iter().any(|p| !p.dense)
    }

    /// Length of the `u32` scratch buffer [`stats`](Self::stats),
    /// [`GtaApply::apply`] and [`merge`] need: one
    /// [`TopK::work_len_for`]`(n)` per tensor-wide selection (one per model,
    /// two for Outliers: 2048 words below 2^20 elements; above, the sampled
    /// strategy's sample and candidates, `n/64 + 2 (16 n / sqrt(n/64) + 4096)`
    /// words, about 8% of `n` at 2^24 elements), or for row-wise work
    /// `2048 + row_len * (4 + M)` (DELLA) / `2048` (row-wise selections);
    /// 0 when nothing is needed.
    pub fn scratch_len(&self) -> usize {
        let stats = if self.tensor_select() {
            TopK::work_len_for(self.n as u64) * self.sels_per_model() * self.m
        } else {
            0
        };
        stats.max(self.apply_scratch_len())
    }

    /// Length of the `u32` scratch [`GtaApply::apply`] alone needs (at most
    /// [`scratch_len`](Self::scratch_len)): the row-wise part, 0 for
    /// tensor-wide selections. Chunks applied in parallel each need this
    /// much, not the statistics' share.
    pub fn apply_scratch_len(&self) -> usize {
        if !self.row_local {
            0
        } else if self.opts.sparsify == Sparsify::Della {
            HIST_LEN + self.unit * (4 + self.m)
        } else {
            HIST_LEN
        }
    }

    /// Starts the statistics passes, borrowing `scratch` (at least
    /// [`scratch_len`](Self::scratch_len) long) until
    /// [`finish`](GtaStats::finish).
    ///
    /// Errors: [`Error::BufferTooShort`] (`scratch`).
    pub fn stats<'s>(&self, scratch: &'s mut [u32]) -> Result<GtaStats<'s>, Error> {
        let need = self.scratch_len();
        ensure(
            scratch.len() >= need,
            Error::BufferTooShort {
                arg: "scratch",
                needed: need,
                got: scratch.len(),
            },
        )?;
        let mut lo = [TopK::new(0, 0).expect("k = 0 <= n = 0"); MAX_MODELS];
        let mut hi = lo;
        let phase = if self.tensor_select() {
            for (i, p) in self.models[..self.m].iter().enumerate() {
                let (klo, khi) = if p.dense {
                    (self.n as u64, 0)
                } else {
                    (p.k_lo, p.k_hi)
                };
                lo[i] = TopK::new(self.n as u64, klo)?;
                hi[i] = TopK::new(self.n as u64, khi)?;
            }
            Phase::Select
        } else if self.needs_norms() {
            Phase::Norms
        } else {
            Phase::Done
        };
        Ok(GtaStats {
            plan: *self,
            phase,
            lo,
            hi,
            before: [Sum::ZERO; MAX_MODELS],
            after: [Sum::ZERO; MAX_MODELS],
            max_before: [0.0; MAX_MODELS],
            max_after: [0.0; MAX_MODELS],
            fed: 0,
            scratch,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Select,
    Norms,
    Done,
}

/// The statistics passes of a [`Gta`] merge (see the module documentation).
#[derive(Debug)]
pub struct GtaStats<'s> {
    plan: Gta,
    phase: Phase,
    lo: [TopK; MAX_MODELS],
    hi: [TopK; MAX_MODELS],
    before: [Sum; MAX_MODELS],
    after: [Sum; MAX_MODELS],
    max_before: [f32; MAX_MODELS],
    max_after: [f32; MAX_MODELS],
    fed: u64,
    scratch: &'s mut [u32],
}

/// Elements per tile of the statistics passes.
const STILE: usize = 1024;
/// Elements per tile of the apply kernel (bounded by the per-model storage
/// consensus needs: `MAX_MODELS x GTILE` floats on the stack).
const GTILE: usize = 128;

impl GtaStats<'_> {
    /// True while another pass over the tensor is needed.
    pub fn needs_pass(&self) -> bool {
        self.phase != Phase::Done
    }

    /// Values fed so far in the current pass.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Feeds the next chunk of the current pass: `models[i]` and `base` hold
    /// the next elements of model `i` and of the base, in order. Does
    /// nothing when no pass is needed.
    ///
    /// Errors (nothing changes on error): [`Error::LengthMismatch`]
    /// (`models.count` not `M`, `models` of lengths other than `base`'s),
    /// [`Error::TooLarge`] (`base`, the pass would exceed `n`),
    /// [`Error::OutOfRange`] (`base`: a row-wise pass not fed whole rows).
    pub fn feed<T: Element>(&mut self, models: &[&[T]], base: &[T]) -> Result<(), Error> {
        if self.phase == Phase::Done {
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
        if self.plan.row_local {
            let u = self.plan.unit as u64;
            ensure(
                self.fed.is_multiple_of(u) && (len as u64).is_multiple_of(u),
                Error::OutOfRange {
                    arg: "base",
                    index: 0,
                },
            )?;
        }
        match self.phase {
            Phase::Select => self.feed_select(models, base),
            Phase::Norms => self.feed_norms(models, base),
            Phase::Done => {}
        }
        self.fed += len as u64;
        Ok(())
    }

    fn feed_select<T: Element>(&mut self, models: &[&[T]], base: &[T]) {
        let spm = self.plan.sels_per_model();
        let wl = TopK::work_len_for(self.plan.n as u64);
        let mut bbuf = [0.0f32; STILE];
        let mut xbuf = [0.0f32; STILE];
        let mut d = [0.0f32; STILE];
        let m = self.plan.m;
        if !(0..m).any(|i| self.lo[i].wants_all() || self.hi[i].wants_all()) {
            // Sample pass: read only the sampled ranges.
            let start = self.fed;
            let end = start + base.len() as u64;
            for (g0, g1) in sample_ranges(start, end) {
                let (lo, hi) = ((g0 - start) as usize, (g1 - start) as usize);
                let b = as_f32(&base[lo..hi], &mut bbuf);
                for (i, xm) in models.iter().enumerate() {
                    let x = as_f32(&xm[lo..hi], &mut xbuf);
                    let d = &mut d[..hi - lo];
                    for ((d, &x), &b) in d.iter_mut().zip(x).zip(b) {
                        *d = x - b;
                    }
                    let w = &mut self.scratch[i * spm * wl..];
                    let (w0, w1) = w.split_at_mut(wl);
                    for (sel, w) in [(&mut self.lo[i], w0), (&mut self.hi[i], w1)]
                        .into_iter()
                        .take(spm)
                    {
                        sel.skip_unchecked(g0 - sel.fed());
                        sel.feed_unchecked(d, w);
                    }
                }
            }
            for sel in self.lo[..m].iter_mut().chain(self.hi[..m].iter_mut()) {
                sel.skip_unchecked(end - sel.fed());
            }
            return;
        }
        let mut tile = [0u32; BAND_BUF];
        let mut lo = 0;
        while lo < base.len() {
            let hi = (lo + STILE).min(base.len());
            let b = as_f32(&base[lo..hi], &mut bbuf);
            for (i, xm) in models.iter().enumerate() {
                if self.lo[i].is_done() && self.hi[i].is_done() {
                    continue;
                }
                let x = as_f32(&xm[lo..hi], &mut xbuf);
                let w = &mut self.scratch[i * spm * wl..];
                let (w0, w1) = w.split_at_mut(wl);
                self.lo[i].feed_diff_unchecked(x, b, w0, &mut tile);
                if spm == 2 {
                    self.hi[i].feed_diff_unchecked(x, b, w1, &mut tile);
                }
            }
            lo = hi;
        }
    }

    fn feed_norms<T: Element>(&mut self, models: &[&[T]], base: &[T]) {
        let thr = self.thresholds();
        let plan = self.plan;
        let m = plan.m;
        let before = &mut self.before;
        let after = &mut self.after;
        let max_b = &mut self.max_before;
        let max_a = &mut self.max_after;
        let rescale = plan.opts.rescale;
        let mut raw = [0.0f32; GTILE];
        let mut xbuf = [0.0f32; GTILE];
        let mut dt = [[0.0f32; GTILE]; MAX_MODELS];
        for_each_tile(
            &plan,
            &thr,
            models,
            base,
            self.fed,
            self.scratch,
            false,
            &mut dt,
            &mut |lo, hi, _g0, b, dt| {
                let len = hi - lo;
                for i in 0..m {
                    let d = &dt[i][..len];
                    let raw = &mut raw[..len];
                    let x = as_f32(&models[i][lo..hi], &mut xbuf);
                    for ((r, &x), &b) in raw.iter_mut().zip(x).zip(b) {
                        *r = x - b;
                    }
                    match rescale {
                        Rescale::L1 => {
                            for r in raw.iter_mut() {
                                *r = r.abs();
                            }
                            before[i].push(raw);
                            for (r, &v) in raw.iter_mut().zip(d.iter()) {
                                *r = v.abs();
                            }
                            after[i].push(raw);
                        }
                        Rescale::L2 => {
                            before[i].push_prod(raw, raw);
                            after[i].push_prod(d, d);
                        }
                        _ => {
                            for (&r, &v) in raw.iter().zip(d.iter()) {
                                let (r, v) = (r.abs(), v.abs());
                                max_b[i] = if r > max_b[i] || r.is_nan() { r } else { max_b[i] };
                                max_a[i] = if v > max_a[i] || v.is_nan() { v } else { max_a[i] };
                            }
                        }
                    }
                }
            },
        );
    }

    /// The tensor-wide thresholds found so far (all-keeping before then).
    fn thresholds(&self) -> Thresholds {
        let mut t = Thresholds::default();
        if self.plan.tensor_select() {
            for i in 0..self.plan.m {
                if !self.plan.models[i].dense {
                    t.lo[i] = self.lo[i].threshold().unwrap_or(Threshold::ALL);
                    t.hi[i] = self.hi[i].threshold().unwrap_or(Threshold::NONE);
                }
            }
        }
        t
    }

    /// Ends the current pass.
    ///
    /// Errors: [`Error::LengthMismatch`] (`base`) when the pass was not fed
    /// exactly `n` elements (nothing changes; complete it and call again).
    pub fn end_pass(&mut self) -> Result<(), Error> {
        if self.phase == Phase::Done {
            return Ok(());
        }
        super::check_pass_fed(self.fed, self.plan.n)?;
        self.fed = 0;
        match self.phase {
            Phase::Select => {
                let spm = self.plan.sels_per_model();
                let wl = TopK::work_len_for(self.plan.n as u64);
                let mut all = true;
                for i in 0..self.plan.m {
                    let w = &mut self.scratch[i * spm * wl..];
                    let (w0, w1) = w.split_at_mut(wl);
                    self.lo[i].end_pass_unchecked(w0);
                    if spm == 2 {
                        self.hi[i].end_pass_unchecked(w1);
                    }
                    all &= self.lo[i].is_done() && self.hi[i].is_done();
                }
                if all {
                    self.phase = if self.plan.needs_norms() {
                        Phase::Norms
                    } else {
                        Phase::Done
                    };
                }
            }
            Phase::Norms => self.phase = Phase::Done,
            Phase::Done => {}
        }
        Ok(())
    }

    /// The finished statistics, ready to apply.
    ///
    /// Errors: [`Error::Unsupported`] while a pass is still needed.
    pub fn finish(self) -> Result<GtaApply, Error> {
        ensure(
            self.phase == Phase::Done,
            Error::Unsupported {
                what: "statistics passes remain (feed and end_pass until needs_pass() is false)",
            },
        )?;
        let thr = self.thresholds();
        let mut scale = [1.0f32; MAX_MODELS];
        let p = &self.plan;
        for (i, (s, mp)) in scale.iter_mut().zip(&p.models[..p.m]).enumerate() {
            if mp.dense {
                continue;
            }
            *s = match p.opts.rescale {
                Rescale::None => 1.0,
                Rescale::InverseKeep => {
                    if p.opts.sparsify == Sparsify::Random {
                        mp.inv_keep
                    } else {
                        1.0 // DELLA: per element
                    }
                }
                Rescale::L1 | Rescale::L2 | Rescale::Linf => {
                    let (b, a) = match p.opts.rescale {
                        Rescale::L1 => (self.before[i].value(), self.after[i].value()),
                        Rescale::L2 => (
                            crate::math::sqrt_f64(self.before[i].value()),
                            crate::math::sqrt_f64(self.after[i].value()),
                        ),
                        _ => (self.max_before[i] as f64, self.max_after[i] as f64),
                    };
                    // mergekit: no rescale when either norm is below 1e-7.
                    if b < 1e-7 || a < 1e-7 { 1.0 } else { (b / a) as f32 }
                }
            };
        }
        Ok(GtaApply {
            plan: self.plan,
            thr,
            scale,
        })
    }
}

/// Tensor-wide selection thresholds per model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Thresholds {
    lo: [Threshold; MAX_MODELS],
    hi: [Threshold; MAX_MODELS],
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            lo: [Threshold::ALL; MAX_MODELS],
            hi: [Threshold::NONE; MAX_MODELS],
        }
    }
}

/// Finished statistics of a [`Gta`] merge: thresholds and rescale factors.
/// Small and `Copy`; [`apply`](Self::apply) merges any chunk, in any order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GtaApply {
    plan: Gta,
    thr: Thresholds,
    scale: [f32; MAX_MODELS],
}

impl GtaApply {
    /// The tensor-wide rescale factor of model `i` (1 when not rescaled or
    /// per element).
    pub fn scale(&self, i: usize) -> f32 {
        self.scale[i]
    }

    /// Model `i`'s tensor-wide selection: elements kept are those kept by
    /// the first threshold and not by the second (`None` for row-wise or
    /// non-selecting sparsifiers).
    pub fn selection(&self, i: usize) -> Option<(Threshold, Threshold)> {
        (is_select(self.plan.opts.sparsify) && !self.plan.row_local && i < self.plan.m)
            .then(|| (self.thr.lo[i], self.thr.hi[i]))
    }

    /// Merges one chunk: `models[i]` and `base` hold elements
    /// `offset..offset + len` of model `i` and of the base; `out` receives
    /// the merged elements. `scratch` holds at least
    /// [`Gta::apply_scratch_len`] words (any longer buffer, such as the one
    /// of [`Gta::scratch_len`], serves).
    ///
    /// Errors (nothing is written on error): [`Error::LengthMismatch`]
    /// (`models.count`, `models`, `out`), [`Error::TooLarge`] (`offset`: the
    /// chunk runs past the tensor), [`Error::OutOfRange`] (`offset`: a
    /// row-wise merge given a chunk that is not whole rows),
    /// [`Error::BufferTooShort`] (`scratch`).
    pub fn apply<T: Element, O: Element>(
        &self,
        models: &[&[T]],
        base: &[T],
        offset: usize,
        scratch: &mut [u32],
        out: &mut [O],
    ) -> Result<(), Error> {
        let p = &self.plan;
        let len = base.len();
        check_chunk(models, p.m, len)?;
        ensure_len("out", len, out.len())?;
        super::check_span(offset, len, p.n)?;
        if p.row_local && p.unit > 0 {
            ensure(
                offset.is_multiple_of(p.unit) && len.is_multiple_of(p.unit),
                Error::OutOfRange {
                    arg: "offset",
                    index: 0,
                },
            )?;
        }
        let need = p.apply_scratch_len();
        ensure(
            scratch.len() >= need,
            Error::BufferTooShort {
                arg: "scratch",
                needed: need,
                got: scratch.len(),
            },
        )?;
        apply_chunk(self, models, base, offset as u64, scratch, out);
        Ok(())
    }
}

/// Uniform draws `rng::uniform(seed, stream, start + j)` for `j < out.len()`,
/// one Philox block per 4 elements (the layout of [`crate::rng`]), at the
/// machine's SIMD level ([`crate::simd::dispatch`], bit-identical at every
/// level): the Philox rounds widen to 8 blocks per vector with AVX-512
/// (DARE-TIES 1.8x faster in f32 and bf16 on the development VM,
/// benches/results/merge.md). The walks around it stay portable: their
/// loops are memory-bound, and no gain from dispatching them showed
/// through the VM's noise.
#[inline]
fn uniforms(seed: u64, stream: [u32; 2], start: u64, out: &mut [f32]) {
    crate::simd::dispatch(
        #[inline(always)]
        || uniforms_at_level(seed, stream, start, out),
    )
}

/// [`uniforms`]' body, compiled into each SIMD level's wrapper.
#[inline(always)]
fn uniforms_at_level(seed: u64, stream: [u32; 2], start: u64, out: &mut [f32]) {
    const SCALE: f32 = 1.0 / 16_777_216.0;
    let key = [seed as u32, (seed >> 32) as u32];
    let end = start + out.len() as u64;
    let mut g = start;
    let mut j = 0;
    while g < end {
        let q = g >> 2;
        if g & 3 == 0 && end - g >= (4 * BATCH) as u64 {
            // Whole blocks: BATCH of them at once (vectorized rounds).
            let w = philox4x32_10_x8(q, stream, key);
            // Convert lane-wise (vectorized), then interleave into element
            // order (element 4 l + k is word k of block l).
            let mut f = [[0.0f32; BATCH]; 4];
            for (fk, wk) in f.iter_mut().zip(&w) {
                for (x, &v) in fk.iter_mut().zip(wk) {
                    *x = (v >> 8) as f32 * SCALE;
                }
            }
            let o = &mut out[j..j + 4 * BATCH];
            for l in 0..BATCH {
                o[4 * l] = f[0][l];
                o[4 * l + 1] = f[1][l];
                o[4 * l + 2] = f[2][l];
                o[4 * l + 3] = f[3][l];
            }
            j += 4 * BATCH;
            g += (4 * BATCH) as u64;
            continue;
        }
        let w = philox4x32_10([q as u32, (q >> 32) as u32, stream[0], stream[1]], key);
        let first = (g & 3) as usize;
        let cnt = (4 - first).min((end - g) as usize);
        for t in 0..cnt {
            out[j + t] = (w[first + t] >> 8) as f32 * SCALE;
        }
        j += cnt;
        g += cnt as u64;
    }
}

/// Per-tile storage: every model's trimmed task vector of the tile.
type Tiles = [[f32; GTILE]; MAX_MODELS];

/// Walks a chunk tile by tile: fills `dt[i][..len]` with model `i`'s masked
/// task vector (without tensor-wide rescale factors; with DELLA's
/// per-element `1/p` when `inverse_keep`) and calls
/// `f(lo, hi, g0, b, dt)` with the tile's chunk-relative range, global start
/// and `f32` base values. Row-wise masks are prepared per row here.
#[allow(clippy::too_many_arguments)]
fn for_each_tile<T: Element, F>(
    plan: &Gta,
    thr: &Thresholds,
    models: &[&[T]],
    base: &[T],
    offset: u64,
    scratch: &mut [u32],
    inverse_keep: bool,
    dt: &mut Tiles,
    f: &mut F,
) where
    F: FnMut(usize, usize, u64, &[f32], &mut Tiles),
{
    let len = base.len();
    let seg = if plan.row_local {
        plan.unit.max(1)
    } else {
        len.max(1)
    };
    let mut row_thr = *thr;
    let (hist_buf, rest) = scratch.split_at_mut(if plan.row_local { HIST_LEN } else { 0 });
    let mut bbuf = [0.0f32; GTILE];
    let mut u = [0.0f32; GTILE];
    let mut s0 = 0;
    while s0 < len {
        let s1 = (s0 + seg).min(len);
        let row_start = offset + s0 as u64;
        if plan.row_local {
            prepare_row(plan, models, base, s0, s1, hist_buf, rest, &mut row_thr);
        }
        let ranks: &[u32] = if plan.opts.sparsify == Sparsify::Della {
            rest
        } else {
            &[]
        };
        let mut lo = s0;
        while lo < s1 {
            let hi = (lo + GTILE).min(s1);
            let g0 = offset + lo as u64;
            let b = as_f32(&base[lo..hi], &mut bbuf);
            for (i, (xm, row)) in models.iter().zip(dt.iter_mut()).enumerate() {
                let d = &mut row[..hi - lo];
                for ((d, &x), &b) in d.iter_mut().zip(&xm[lo..hi]).zip(b) {
                    *d = x.to_f32() - b;
                }
                let mp = &plan.models[i];
                if mp.dense {
                    continue;
                }
                // Index used by the selection: global, or within the row.
                let base_idx = if plan.row_local { g0 - row_start } else { g0 };
                match plan.opts.sparsify {
                    Sparsify::None => {}
                    Sparsify::Magnitude | Sparsify::Outliers => {
                        let (tl, th) = (row_thr.lo[i], row_thr.hi[i]);
                        let end = base_idx + d.len() as u64;
                        match (tl.min_key_in(base_idx, end), th.min_key_in(base_idx, end)) {
                            (Some(lo), Some(hi)) => {
                                // Kept iff lo <= key < hi: branch-free.
                                for v in d.iter_mut() {
                                    let key = magnitude_key(*v);
                                    *v = if key >= lo && key < hi { *v } else { 0.0 };
                                }
                            }
                            _ => {
                                for (j, v) in d.iter_mut().enumerate() {
                                    let key = magnitude_key(*v);
                                    let idx = base_idx + j as u64;
                                    if !tl.keeps_key(idx, key) || th.keeps_key(idx, key) {
                                        *v = 0.0;
                                    }
                                }
                            }
                        }
                    }
                    Sparsify::Random => {
                        let u = &mut u[..hi - lo];
                        uniforms(plan.opts.seed, [i as u32, plan.opts.tensor_id], g0, u);
                        let p = mp.drop;
                        for (v, &u) in d.iter_mut().zip(u.iter()) {
                            *v = if u < p { 0.0 } else { *v };
                        }
                    }
                    Sparsify::Della => {
                        let u = &mut u[..hi - lo];
                        uniforms(plan.opts.seed, [i as u32, plan.opts.tensor_id], g0, u);
                        let rk = &ranks[i * plan.unit + (lo - s0)..][..hi - lo];
                        for ((v, &u), &r) in d.iter_mut().zip(u.iter()).zip(rk) {
                            let pk = mp.della_a + (r - 1) as f64 * mp.della_step;
                            if u < (1.0 - pk) as f32 {
                                *v = 0.0;
                            } else if inverse_keep {
                                *v *= (1.0 / pk) as f32;
                            }
                        }
                    }
                }
            }
            f(lo, hi, g0, b, dt);
            lo = hi;
        }
        s0 = s1;
    }
}

/// Row-wise preparation for rows `s0..s1` of the chunk: per-row selection
/// thresholds (Magnitude, Outliers) or DELLA ranks (into `rest`, model `i`
/// at `rest[i * len..]`, after which `4 * len` words of sort buffers).
#[allow(clippy::too_many_arguments)]
fn prepare_row<T: Element>(
    plan: &Gta,
    models: &[&[T]],
    base: &[T],
    s0: usize,
    s1: usize,
    hist_buf: &mut [u32],
    rest: &mut [u32],
    row_thr: &mut Thresholds,
) {
    let hist = hist_of(hist_buf).expect("sized by scratch_len");
    let len = s1 - s0;
    let mut bbuf = [0.0f32; STILE];
    let mut xbuf = [0.0f32; STILE];
    let mut d = [0.0f32; STILE];
    for i in 0..plan.m {
        let mp = &plan.models[i];
        if mp.dense {
            continue;
        }
        match plan.opts.sparsify {
            Sparsify::Magnitude | Sparsify::Outliers => {
                let mut lo_sel = TopK::with_strategy(len as u64, mp.k_lo, false).expect("validated");
                let mut hi_sel = TopK::with_strategy(len as u64, mp.k_hi, false).expect("validated");
                while !(lo_sel.is_done() && hi_sel.is_done()) {
                    let sel = if lo_sel.is_done() {
                        &mut hi_sel
                    } else {
                        &mut lo_sel
                    };
                    let mut lo = s0;
                    while lo < s1 {
                        let hi = (lo + STILE).min(s1);
                        let b = as_f32(&base[lo..hi], &mut bbuf);
                        let x = as_f32(&models[i][lo..hi], &mut xbuf);
                        let d = &mut d[..hi - lo];
                        for ((d, &x), &b) in d.iter_mut().zip(x).zip(b) {
                            *d = x - b;
                        }
                        sel.feed_unchecked(d, hist);
                        lo = hi;
                    }
                    sel.end_pass_unchecked(hist);
                }
                row_thr.lo[i] = lo_sel.threshold().expect("done");
                row_thr.hi[i] = hi_sel.threshold().expect("done");
            }
            Sparsify::Della => {
                let (ranks, bufs) = rest.split_at_mut(plan.m * len);
                let (keys, bufs) = bufs.split_at_mut(len);
                let (idx, bufs) = bufs.split_at_mut(len);
                let (keys2, bufs) = bufs.split_at_mut(len);
                let idx2 = &mut bufs[..len];
                let mut lo = s0;
                while lo < s1 {
                    let hi = (lo + STILE).min(s1);
                    let b = as_f32(&base[lo..hi], &mut bbuf);
                    let x = as_f32(&models[i][lo..hi], &mut xbuf);
                    for ((k, &x), &b) in keys[lo - s0..hi - s0].iter_mut().zip(x).zip(b) {
                        *k = magnitude_key(x - b);
                    }
                    lo = hi;
                }
                let rank = &mut ranks[i * len..(i + 1) * len];
                ranks_ascending(keys, idx, keys2, idx2, rank, hist);
            }
            _ => {}
        }
    }
}

/// The apply kernel for a validated chunk.
fn apply_chunk<T: Element, O: Element>(
    a: &GtaApply,
    models: &[&[T]],
    base: &[T],
    offset: u64,
    scratch: &mut [u32],
    out: &mut [O],
) {
    let p = &a.plan;
    let m = p.m;
    let o = &p.opts;
    let inverse_keep = o.rescale == Rescale::InverseKeep && o.sparsify == Sparsify::Della;
    let mut w = [0.0f32; MAX_MODELS];
    for (w, mp) in w.iter_mut().zip(&p.models[..m]) {
        *w = mp.weight;
    }
    let w = &w[..m];
    let scaled = a.scale[..m].iter().any(|&s| s != 1.0);
    let mut dt = [[0.0f32; GTILE]; MAX_MODELS];
    let mut res = [0.0f32; GTILE];
    for_each_tile(
        p,
        &a.thr,
        models,
        base,
        offset,
        scratch,
        inverse_keep,
        &mut dt,
        &mut |lo, hi, _g0, b, dt| {
            let len = hi - lo;
            let rows = &mut dt[..m];
            if scaled {
                for (row, &s) in rows.iter_mut().zip(&a.scale[..m]) {
                    if s != 1.0 {
                        for v in row[..len].iter_mut() {
                            *v *= s;
                        }
                    }
                }
            }
            let r = &mut res[..len];
            match o.consensus {
                Consensus::None => combine_sum(rows, w, len, o.normalize.then_some(p.wsum), r),
                c => combine_consensus(
                    rows,
                    w,
                    len,
                    Vote {
                        count: c == Consensus::Count,
                        weighted: o.votes == Votes::Weighted,
                        div_weights: o.divisor == Divisor::WeightSum,
                        normalize: o.normalize,
                    },
                    r,
                ),
            }
            if o.lambda != 1.0 {
                for v in r.iter_mut() {
                    *v *= o.lambda;
                }
            }
            for (v, &b) in r.iter_mut().zip(b) {
                *v += b;
            }
            store(r, &mut out[lo..hi]);
        },
    );
}

/// `r = sum_i w_i d_i`, divided by `div` if given.
#[inline(always)]
fn combine_sum(rows: &[[f32; GTILE]], w: &[f32], len: usize, div: Option<f32>, r: &mut [f32]) {
    match rows.len() {
        1 => sum_fixed::<1>(rows, w, len, r),
        2 => sum_fixed::<2>(rows, w, len, r),
        3 => sum_fixed::<3>(rows, w, len, r),
        4 => sum_fixed::<4>(rows, w, len, r),
        _ => {
            for (v, &d) in r.iter_mut().zip(&rows[0][..len]) {
                *v = w[0] * d;
            }
            for (row, &wi) in rows.iter().zip(w).skip(1) {
                for (v, &d) in r.iter_mut().zip(&row[..len]) {
                    *v += wi * d;
                }
            }
        }
    }
    if let Some(ws) = div {
        for v in r.iter_mut() {
            *v /= ws;
        }
    }
}

/// [`combine_sum`]'s sum for a fixed small number of models: element-major,
/// so the model loop unrolls and the element loop vectorizes.
#[inline(always)]
fn sum_fixed<const M: usize>(rows: &[[f32; GTILE]], w: &[f32], len: usize, r: &mut [f32]) {
    let rs: [&[f32; GTILE]; M] = core::array::from_fn(|i| &rows[i]);
    let ws: [f32; M] = core::array::from_fn(|i| w[i]);
    for (j, v) in r[..len.min(GTILE)].iter_mut().enumerate() {
        let mut a = ws[0] * rs[0][j];
        for i in 1..M {
            a += ws[i] * rs[i][j];
        }
        *v = a;
    }
}

/// The options of a consensus combination.
#[derive(Clone, Copy)]
struct Vote {
    count: bool,
    weighted: bool,
    div_weights: bool,
    normalize: bool,
}

/// Sign election and the (normalized) sum of the agreeing models; NaN where
/// a vote is NaN.
#[inline(always)]
fn combine_consensus(rows: &[[f32; GTILE]], w: &[f32], len: usize, v: Vote, r: &mut [f32]) {
    match (v.count, v.normalize) {
        (false, true) => consensus_m::<false, true>(rows, w, len, v, r),
        (false, false) => consensus_m::<false, false>(rows, w, len, v, r),
        (true, true) => consensus_m::<true, true>(rows, w, len, v, r),
        (true, false) => consensus_m::<true, false>(rows, w, len, v, r),
    }
}

#[inline(always)]
fn consensus_m<const COUNT: bool, const NORM: bool>(
    rows: &[[f32; GTILE]],
    w: &[f32],
    len: usize,
    v: Vote,
    r: &mut [f32],
) {
    match rows.len() {
        1 => consensus_fixed::<1, COUNT, NORM>(rows, w, len, v, r),
        2 => consensus_fixed::<2, COUNT, NORM>(rows, w, len, v, r),
        3 => consensus_fixed::<3, COUNT, NORM>(rows, w, len, v, r),
        4 => consensus_fixed::<4, COUNT, NORM>(rows, w, len, v, r),
        _ => consensus_any(rows, w, len, v, r),
    }
}

#[inline(always)]
fn sign(x: f32) -> f32 {
    (x > 0.0) as i32 as f32 - (x < 0.0) as i32 as f32
}

/// [`combine_consensus`] for a fixed small number of models: element-major,
/// branch-free, so the model loop unrolls and the element loop vectorizes.
#[inline(always)]
fn consensus_fixed<const M: usize, const COUNT: bool, const NORM: bool>(
    rows: &[[f32; GTILE]],
    w: &[f32],
    len: usize,
    v: Vote,
    r: &mut [f32],
) {
    let rs: [&[f32; GTILE]; M] = core::array::from_fn(|i| &rows[i]);
    let ws: [f32; M] = core::array::from_fn(|i| w[i]);
    let cs: [f32; M] = core::array::from_fn(|i| if v.weighted { w[i] } else { 1.0 });
    let dw: [f32; M] = core::array::from_fn(|i| if v.div_weights { w[i] } else { 1.0 });
    for (j, out) in r[..len.min(GTILE)].iter_mut().enumerate() {
        let mut vote = 0.0f32;
        let mut nan = 0u32;
        for i in 0..M {
            let x = cs[i] * rs[i][j];
            nan |= x.is_nan() as u32;
            vote += if COUNT { sign(x) } else { x };
        }
        let pos = vote >= 0.0;
        let (mut a, mut dv) = (0.0f32, 0.0f32);
        for i in 0..M {
            let d = rs[i][j];
            let x = cs[i] * d;
            let agree = (pos & (x > 0.0)) | (!pos & (x < 0.0));
            a += if agree { ws[i] * d } else { 0.0 };
            dv += if agree { dw[i] } else { 0.0 };
        }
        if NORM {
            a /= if dv == 0.0 { 1.0 } else { dv };
        }
        *out = if nan != 0 { f32::NAN } else { a };
    }
}

/// [`combine_consensus`] for any number of models (model-major passes).
fn consensus_any(rows: &[[f32; GTILE]], w: &[f32], len: usize, v: Vote, r: &mut [f32]) {
    let mut vote = [0.0f32; GTILE];
    let mut nan = [0u32; GTILE];
    let vote = &mut vote[..len];
    let nan = &mut nan[..len];
    for (row, &wi) in rows.iter().zip(w) {
        let c = if v.weighted { wi } else { 1.0 };
        for ((vt, nn), &d) in vote.iter_mut().zip(nan.iter_mut()).zip(&row[..len]) {
            let x = c * d;
            *nn |= x.is_nan() as u32;
            *vt += if v.count { sign(x) } else { x };
        }
    }
    let mut div = [0.0f32; GTILE];
    let div = &mut div[..len];
    r.fill(0.0);
    for (row, &wi) in rows.iter().zip(w) {
        let c = if v.weighted { wi } else { 1.0 };
        let dw = if v.div_weights { wi } else { 1.0 };
        for (((a, dv), &d), &vt) in r.iter_mut().zip(div.iter_mut()).zip(&row[..len]).zip(vote.iter()) {
            let x = c * d;
            let agree = if vt >= 0.0 { x > 0.0 } else { x < 0.0 };
            *a += if agree { wi * d } else { 0.0 };
            *dv += if agree { dw } else { 0.0 };
        }
    }
    if v.normalize {
        for (a, &dv) in r.iter_mut().zip(div.iter()) {
            *a /= if dv == 0.0 { 1.0 } else { dv };
        }
    }
    for (a, &nn) in r.iter_mut().zip(nan.iter()) {
        *a = if nn != 0 { f32::NAN } else { *a };
    }
}

/// One-shot merge of `models` onto `base` (see the module documentation):
/// plans with [`Gta::new`] (`n = base.len()`), runs the statistics passes
/// over the whole tensor and applies. `scratch` must hold
/// [`Gta::scratch_len`] words.
///
/// Errors (nothing is written on error): those of [`Gta::new`], plus
/// [`Error::Empty`] / [`Error::TooLarge`] / [`Error::LengthMismatch`]
/// (`models`: none, too many, a length other than `base`'s;
/// `params` not one per model; `out`), [`Error::BufferTooShort`] (`scratch`).
pub fn merge<T: Element, O: Element>(
    models: &[&[T]],
    base: &[T],
    params: &[TaskParams],
    opts: &GtaOptions,
    scratch: &mut [u32],
    out: &mut [O],
) -> Result<(), Error> {
    let n = base.len();
    check_models(models, n, MAX_MODELS)?;
    ensure_len("params", models.len(), params.len())?;
    ensure_len("out", n, out.len())?;
    let plan = Gta::new(n, params, opts)?;
    let mut st = plan.stats(scratch)?;
    while st.needs_pass() {
        st.feed(models, base)?;
        st.end_pass()?;
    }
    let ready = st.finish()?;
    ready.apply(models, base, 0, scratch, out)
}
