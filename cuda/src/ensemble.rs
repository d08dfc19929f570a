//! Fused ensemble softmax on the GPU: [`Combine`] launches
//! `ptx/ensemble.ptx` on the caller's stream with the semantics of
//! [`medley_core::ensemble::combine`].
//!
//! Differences from the CPU function, all forced by "no host
//! synchronization inside a call":
//! - no [`medley_core::Report`]: masked and NaN rows are visible in the
//!   outputs (argmax [`NO_TOKEN`], log-normalizer `-inf` / NaN);
//! - per-row weight tables live on the device and cannot be checked before
//!   the launch: a row whose weights are invalid (non-finite, negative in
//!   linear mode, or all zero in linear mode) produces a NaN row instead of
//!   an error;
//! - all models share one element type, and at most
//!   [`MAX_DEVICE_MODELS`] models are combined per call.

use crate::error::CudaError;
use crate::mem::{DeviceRows, DeviceRowsMut, DeviceSliceMut, Stream, check_ptr};
use crate::registry::{BLOCK, Kernel, Kernels};
use cust_core::DeviceCopy;
use medley_core::Error;
use medley_core::ensemble::{Config, MaskRule, Mode, ModelShape, Plausibility, Weights, resolve};
use medley_core::sample::Sampling;

pub use medley_core::ensemble::NO_TOKEN;

/// Most models one GPU call combines.
pub const MAX_DEVICE_MODELS: usize = 16;

/// One model's logits in device memory.
pub type DeviceLogits<'a> = crate::mem::DeviceMatrix<'a>;

/// One input model: device logits and a temperature.
#[derive(Debug, Clone, Copy)]
pub struct DeviceModel<'a> {
    /// `B` rows of `V_m <= V` logits.
    pub logits: DeviceLogits<'a>,
    /// Temperature `T_m > 0`.
    pub temperature: f32,
}

/// Weights (linear) or coefficients (log-linear) of a GPU combination.
#[derive(Debug, Clone, Copy)]
pub enum DeviceWeights<'a> {
    /// One value per model, from host memory (validated before launch).
    PerModel(&'a [f32]),
    /// A `B x M` table in device memory (see the module notes).
    PerRow(DeviceRows<'a, f32>),
}

/// Parameters of a GPU combination (the device twin of
/// [`medley_core::ensemble::Config`]).
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct DeviceConfig<'a> {
    /// Linear or log-linear.
    pub mode: Mode,
    /// Weights or coefficients.
    pub weights: DeviceWeights<'a>,
    /// Output temperature.
    pub out_temperature: f32,
    /// Optional plausibility mask.
    pub plausibility: Option<Plausibility>,
    /// Masking rule in linear mode.
    pub mask_rule: MaskRule,
}

impl<'a> DeviceConfig<'a> {
    /// `mode` with `weights`, `T_out = 1`, no plausibility mask,
    /// [`MaskRule::All`]; set the other fields on the result.
    pub fn new(mode: Mode, weights: DeviceWeights<'a>) -> Self {
        DeviceConfig {
            mode,
            weights,
            out_temperature: 1.0,
            plausibility: None,
            mask_rule: MaskRule::All,
        }
    }

    /// Linear, per-model weights, `T_out = 1`, no mask.
    pub fn linear(weights: &'a [f32]) -> Self {
        DeviceConfig {
            mode: Mode::Linear,
            weights: DeviceWeights::PerModel(weights),
            out_temperature: 1.0,
            plausibility: None,
            mask_rule: MaskRule::All,
        }
    }

    /// Log-linear, per-model coefficients, `T_out = 1`, no mask.
    pub fn log_linear(coefficients: &'a [f32]) -> Self {
        DeviceConfig {
            mode: Mode::LogLinear,
            ..Self::linear(coefficients)
        }
    }
}

/// Where a GPU combination writes (device memory). At least one of
/// `log_probs` and `probs`.
#[derive(Debug, Default)]
pub struct DeviceOutput<'o> {
    /// `B x V` log-probabilities.
    pub log_probs: Option<DeviceRowsMut<'o, f32>>,
    /// `B x V` probabilities.
    pub probs: Option<DeviceRowsMut<'o, f32>>,
    /// `B` argmax token ids ([`NO_TOKEN`] for masked and NaN rows).
    pub argmax: Option<DeviceSliceMut<'o, u32>>,
    /// `B` log-normalizers (see the core's `Output::log_normalizer`).
    pub log_normalizer: Option<DeviceSliceMut<'o, f32>>,
    /// `B` entropies in nats of the output distribution (the core's
    /// `Output::entropy`: after `T_out`, the [`MaskRule::Any`] masks and
    /// the plausibility mask). NaN for masked and NaN rows.
    pub entropy: Option<DeviceSliceMut<'o, f32>>,
    /// `B` largest output probabilities (the core's `Output::top1_prob`).
    /// NaN for masked and NaN rows.
    pub top1_prob: Option<DeviceSliceMut<'o, f32>>,
    /// `B` differences between the largest and the second largest output
    /// probability, ties counted (the core's `Output::margin`). NaN for
    /// masked and NaN rows.
    pub margin: Option<DeviceSliceMut<'o, f32>>,
    /// `B` generalized Jensen-Shannon divergences of the live models' own
    /// distributions, before `T_out` and the masks (the core's
    /// `Output::disagreement`); [`Mode::Linear`] only (asking for it in
    /// [`Mode::LogLinear`] is [`Error::Unsupported`]). NaN for masked and
    /// NaN rows.
    pub disagreement: Option<DeviceSliceMut<'o, f32>>,
}

/// Which kernel version runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Version {
    /// `V2` when it applies (aligned rows, a large enough workspace,
    /// cooperative launch), else `V1`.
    #[default]
    Auto,
    /// `ensemble_v1`: one block per row (the on-device reference).
    V1,
    /// `ensemble_v2`: rows split over co-resident blocks; an error if it
    /// does not apply.
    V2,
}

/// How `ensemble_v2` splits the work for one call shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct V2Plan {
    /// Elements of a row per block (a multiple of 8).
    pub chunk: u32,
    /// Blocks per row.
    pub chunks: u32,
    /// Rows processed at once (grid = teams x chunks).
    pub teams: u32,
}

impl V2Plan {
    /// Workspace bytes this plan needs: the fixed 128 KiB barrier header,
    /// the partial records, and 6 KiB per team of radix-select histograms
    /// (`ensemble_v2s`'s top-k / top-p; the kernel zeroes them itself).
    pub fn workspace_bytes(&self) -> usize {
        // At most 2^32 * 512 * 2^32 on 64-bit targets; saturating so a plan
        // built by hand never wraps.
        (self.teams as usize)
            .saturating_mul(512)
            .saturating_mul(self.chunks as usize)
            .saturating_add((self.teams as usize).saturating_mul(SELECT_HIST_BYTES))
            .saturating_add(WORKSPACE_HEADER)
    }
}

pub use crate::specs::V2_MAX_CHUNK;

/// Barrier state for up to [`MAX_TEAMS`] teams at the start of every v2
/// workspace (fixed, so one zeroing serves calls of any shape).
const WORKSPACE_HEADER: usize = 128 * MAX_TEAMS;
/// Most rows v2 processes at once.
const MAX_TEAMS: usize = 1024;
/// Per team: `ensemble_v2s`'s three 256-bin u64 histogram buffers.
const SELECT_HIST_BYTES: usize = 3 * 256 * 8;

/// The v2 split for `rows x vocab` outputs of `n_models` models with
/// `elem_bytes`-byte logits: `Ok(None)` when v2 cannot run on this device
/// or for this shape (empty, or rows too long for the grid).
///
/// Errors (never a panic or a wrapped product): `elem_bytes` not 2 or 4,
/// more than [`MAX_DEVICE_MODELS`] models, `rows` or `vocab` above the
/// kernels' 32-bit limits. `log_linear` names the mode: both modes share
/// one split today (see the split's documentation in the source), and the
/// argument stays so that a split per mode needs no change of this API.
pub fn v2_plan(
    kernels: &Kernels,
    rows: usize,
    vocab: usize,
    n_models: usize,
    elem_bytes: usize,
    log_linear: bool,
) -> Result<Option<V2Plan>, CudaError> {
    check_plan_args(rows, vocab, n_models, elem_bytes)?;
    Ok(plan_v2(kernels, rows, vocab, n_models, elem_bytes, log_linear))
}

fn check_plan_args(rows: usize, vocab: usize, n_models: usize, elem_bytes: usize) -> Result<(), CudaError> {
    if elem_bytes != 2 && elem_bytes != 4 {
        return Err(Error::OutOfRange {
            arg: "elem_bytes",
            index: elem_bytes,
        }
        .into());
    }
    if n_models > MAX_DEVICE_MODELS {
        return Err(Error::TooLarge {
            arg: "n_models",
            index: 0,
            got: n_models,
            max: MAX_DEVICE_MODELS,
        }
        .into());
    }
    fits_u32("rows", 0, rows)?;
    fits_u32("vocab", 0, vocab)?;
    Ok(())
}

/// [`v2_plan`] after its argument checks (every product below stays far
/// from overflow: at most 2^32 rows or tokens, 16 models, 4-byte elements).
fn plan_v2(
    kernels: &Kernels,
    rows: usize,
    vocab: usize,
    n_models: usize,
    elem_bytes: usize,
    _log_linear: bool,
) -> Option<V2Plan> {
    if !kernels.cooperative() || rows == 0 || vocab == 0 || n_models == 0 {
        return None;
    }
    // One plan (and one workspace size) for both v2 entry points: the
    // tighter of the two occupancies.
    // (and for ensemble_v2s, which samples on the same plan and workspace)
    let (a, b, s) = (
        kernels.info(Kernel::EnsembleV2),
        kernels.info(Kernel::EnsembleV2U),
        kernels.info(Kernel::EnsembleV2S),
    );
    let g_max =
        kernels.sm_count() as usize * a.blocks_per_sm.min(b.blocks_per_sm).min(s.blocks_per_sm) as usize;
    if g_max == 0 {
        return None;
    }
    let (chunk, chunks, teams) = split_v2(rows, vocab, g_max, elem_bytes);
    // Rows too long for the grid at V2_MAX_CHUNK per block, or a device
    // without that much shared memory per block: v1 runs.
    if chunk > V2_MAX_CHUNK
        || 4 * chunk > a.max_dynamic_smem.min(b.max_dynamic_smem).min(s.max_dynamic_smem) as usize
    {
        return None;
    }
    Some(V2Plan {
        chunk: chunk as u32,
        chunks: chunks as u32,
        teams: teams as u32,
    })
}

/// A v2 row's fixed cost, in bytes of one block's piece: what a row costs
/// beyond streaming its piece (the team barriers, the per-model reductions
/// and merges, the first loads' latency). Fit on the H200 (2026-12-04,
/// `benches/results/ensemble-plan.md`): a team's time per row was close to
/// `ROW_COST_BYTES + chunk x elem_bytes` times a per-model constant for
/// chunks of 1976 to 11664 tokens at M = 2 and 8; the same-run benchmarks
/// of every shape did not move between 4096 and 18432.
const ROW_COST_BYTES: usize = 9216;

/// The split of `rows` rows of `vocab` tokens over `g_max >= 1` co-resident
/// blocks: `(chunk, chunks, teams)`. Each row is `chunks` blocks of `chunk`
/// tokens (a multiple of 8; above [`V2_MAX_CHUNK`] only when a row is too
/// long for the grid, where the caller falls back to v1), `teams` rows run
/// at once (`teams x chunks <= g_max`), so a call takes
/// `ceil(rows / teams)` rounds. The number of blocks per row ranges from
/// the fewest [`V2_MAX_CHUNK`] allows to one per 2048 tokens (a block
/// below one full 2048-token step only adds arrivals at the row's
/// barrier), at most `g_max`; the one minimizing
/// `rounds x (ROW_COST_BYTES + chunk x elem_bytes)` wins, fewer blocks
/// per row on a tie. Both modes: log-linear keeps its scores on chip and
/// linear reads its piece twice, but in both a row's fixed cost (barriers,
/// merges, latency) is what a short piece cannot hide, and the rounds are
/// what a split that leaves SMs idle costs.
fn split_v2(rows: usize, vocab: usize, g_max: usize, elem_bytes: usize) -> (usize, usize, usize) {
    let lo = vocab.div_ceil(V2_MAX_CHUNK).clamp(1, g_max);
    let hi = vocab.div_ceil(2048).min(g_max).max(lo);
    let mut best = (usize::MAX, 0, 0, 0);
    for n in lo..=hi {
        let chunk = vocab.div_ceil(n).next_multiple_of(8);
        let chunks = vocab.div_ceil(chunk);
        let teams = (g_max / chunks).min(rows).clamp(1, MAX_TEAMS);
        let cost = rows
            .div_ceil(teams)
            .saturating_mul(ROW_COST_BYTES + chunk * elem_bytes);
        if cost < best.0 {
            best = (cost, chunk, chunks, teams);
        }
    }
    (best.1, best.2, best.3)
}

/// Workspace bytes [`Combine`] needs to run `ensemble_v2` for this call
/// shape (0 when v2 cannot run; v1 needs none): the most either mode's
/// plan uses. Zero the workspace once before its first use; calls leave it
/// ready for the next, whatever their shape. Errors as [`v2_plan`].
pub fn workspace_bytes(
    kernels: &Kernels,
    rows: usize,
    vocab: usize,
    n_models: usize,
    elem_bytes: usize,
) -> Result<usize, CudaError> {
    check_plan_args(rows, vocab, n_models, elem_bytes)?;
    Ok([false, true]
        .iter()
        .filter_map(|&ll| plan_v2(kernels, rows, vocab, n_models, elem_bytes, ll))
        .map(|p| p.workspace_bytes())
        .max()
        .unwrap_or(0))
}

/// The 520-byte by-value parameter of `ensemble_v1/v2` (layout documented
/// at the top of `ptx/ensemble.ptx`).
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct EnsembleParams {
    logp: u64,
    prob: u64,
    argmax: u64,
    logz: u64,
    wtab: u64,
    work: u64,
    rows: u32,
    vocab: u32,
    logp_stride: u32,
    prob_stride: u32,
    wstride: u32,
    n_models: u32,
    dtype: u32,
    flags: u32,
    inv_t_out: f32,
    plaus_model: u32,
    ln_alpha: f32,
    chunk: u32,
    chunks: u32,
    teams: u32,
    models: [ModelParam; MAX_DEVICE_MODELS],
    entropy: u64,
    top1: u64,
    margin: u64,
    disagree: u64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct ModelParam {
    ptr: u64,
    stride: u32,
    len: u32,
    inv_t: f32,
    w: f32,
}

const _: () = assert!(core::mem::size_of::<EnsembleParams>() == 520);

// SAFETY: EnsembleParams is #[repr(C)] plain data (integers, floats and
// device addresses as u64), no host pointers or padding-sensitive
// invariants; the kernel reads it as the byte layout documented in
// ptx/ensemble.ptx (size asserted above).
unsafe impl DeviceCopy for EnsembleParams {}

const F_LOGLINEAR: u32 = 1;
const F_MASK_ANY: u32 = 2;
const F_PLAUS: u32 = 4;
const F_RENORM: u32 = 8;
const F_PERROW_SCALE: u32 = 16;
/// Any of entropy, top-1 probability, margin requested.
const F_UNC: u32 = 32;
/// Disagreement requested (linear mode).
const F_DIS: u32 = 64;

fn fits_u32(arg: &'static str, index: usize, v: usize) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| {
        Error::TooLarge {
            arg,
            index,
            max: u32::MAX as usize,
            got: v,
        }
        .into()
    })
}

/// Validates a call and builds the kernel parameter (no device access).
pub(crate) fn build_params(
    models: &[DeviceModel<'_>],
    cfg: &DeviceConfig<'_>,
    out: &DeviceOutput<'_>,
) -> Result<EnsembleParams, CudaError> {
    let (rows, vocab) = match (&out.log_probs, &out.probs) {
        (Some(l), Some(p)) => {
            if l.rows() != p.rows() {
                return Err(Error::LengthMismatch {
                    arg: "probs.rows",
                    index: 0,
                    expected: l.rows(),
                    got: p.rows(),
                }
                .into());
            }
            if l.len() != p.len() {
                return Err(Error::LengthMismatch {
                    arg: "probs.len",
                    index: 0,
                    expected: l.len(),
                    got: p.len(),
                }
                .into());
            }
            (l.rows(), l.len())
        }
        (Some(l), None) => (l.rows(), l.len()),
        (None, Some(p)) => (p.rows(), p.len()),
        (None, None) => {
            return Err(Error::Unsupported {
                what: "no row output: give log_probs or probs",
            }
            .into());
        }
    };
    build_params_shaped(models, cfg, out, rows, vocab)
}

/// [`build_params`] for `rows x vocab` outputs given explicitly (the
/// sampler has no row output).
fn build_params_shaped(
    models: &[DeviceModel<'_>],
    cfg: &DeviceConfig<'_>,
    out: &DeviceOutput<'_>,
    rows: usize,
    vocab: usize,
) -> Result<EnsembleParams, CudaError> {
    if models.len() > MAX_DEVICE_MODELS {
        return Err(Error::TooLarge {
            arg: "models",
            index: 0,
            max: MAX_DEVICE_MODELS,
            got: models.len(),
        }
        .into());
    }
    // Everything the CPU validates, with the same errors.
    let mut shapes = [ModelShape {
        rows: 0,
        len: 0,
        temperature: 1.0,
    }; MAX_DEVICE_MODELS];
    for (s, m) in shapes.iter_mut().zip(models) {
        let (_, r, l, _, _, _) = m.logits.parts();
        *s = ModelShape {
            rows: r,
            len: l,
            temperature: m.temperature,
        };
    }
    let ones = [1.0f32; MAX_DEVICE_MODELS];
    let host_weights = match cfg.weights {
        DeviceWeights::PerModel(w) => w,
        DeviceWeights::PerRow(_) => &ones[..models.len()],
    };
    let core_cfg = Config {
        mode: cfg.mode,
        weights: Weights::PerModel(host_weights),
        out_temperature: cfg.out_temperature,
        plausibility: cfg.plausibility,
        mask_rule: cfg.mask_rule,
    };
    // The uncertainty outputs' lengths, then disagreement's mode, before
    // the models (the core's order).
    for (arg, o) in [
        ("entropy", &out.entropy),
        ("top1_prob", &out.top1_prob),
        ("margin", &out.margin),
        ("disagreement", &out.disagreement),
    ] {
        if let Some(x) = o
            && x.len() != rows
        {
            return Err(Error::LengthMismatch {
                arg,
                index: 0,
                expected: rows,
                got: x.len(),
            }
            .into());
        }
    }
    if out.disagreement.is_some() && cfg.mode != Mode::Linear {
        return Err(Error::Unsupported {
            what: "disagreement is defined for linear mixtures",
        }
        .into());
    }
    let r = resolve(&shapes[..models.len()], &core_cfg, rows, vocab)?;
    let mut p = EnsembleParams {
        logp: 0,
        prob: 0,
        argmax: 0,
        logz: 0,
        wtab: 0,
        work: 0,
        rows: fits_u32("rows", 0, rows)?,
        vocab: fits_u32("vocab", 0, vocab)?,
        logp_stride: 0,
        prob_stride: 0,
        wstride: 0,
        n_models: models.len() as u32,
        dtype: 0,
        flags: 0,
        inv_t_out: r.inv_t_out,
        plaus_model: 0,
        ln_alpha: 0.0,
        chunk: 0,
        chunks: 0,
        teams: 0,
        models: [ModelParam::default(); MAX_DEVICE_MODELS],
        entropy: 0,
        top1: 0,
        margin: 0,
        disagree: 0,
    };
    if vocab >= u32::MAX as usize {
        return Err(Error::TooLarge {
            arg: "vocab",
            index: 0,
            max: u32::MAX as usize - 1,
            got: vocab,
        }
        .into());
    }
    if let Some(l) = &out.log_probs {
        check_ptr(l.as_raw(), rows * vocab, 4, "log_probs")?;
        p.logp = l.as_raw();
        p.logp_stride = fits_u32("log_probs.stride", 0, l.stride())?;
    }
    if let Some(q) = &out.probs {
        check_ptr(q.as_raw(), rows * vocab, 4, "probs")?;
        p.prob = q.as_raw();
        p.prob_stride = fits_u32("probs.stride", 0, q.stride())?;
    }
    if let Some(a) = &out.argmax {
        if a.len() != rows {
            return Err(Error::LengthMismatch {
                arg: "argmax",
                index: 0,
                expected: rows,
                got: a.len(),
            }
            .into());
        }
        check_ptr(a.as_raw(), rows, 4, "argmax")?;
        p.argmax = a.as_raw();
    }
    if let Some(z) = &out.log_normalizer {
        if z.len() != rows {
            return Err(Error::LengthMismatch {
                arg: "log_normalizer",
                index: 0,
                expected: rows,
                got: z.len(),
            }
            .into());
        }
        check_ptr(z.as_raw(), rows, 4, "log_normalizer")?;
        p.logz = z.as_raw();
    }
    for (arg, o, dst) in [
        ("entropy", &out.entropy, &mut p.entropy),
        ("top1_prob", &out.top1_prob, &mut p.top1),
        ("margin", &out.margin, &mut p.margin),
        ("disagreement", &out.disagreement, &mut p.disagree),
    ] {
        if let Some(x) = o {
            check_ptr(x.as_raw(), rows, 4, arg)?;
            *dst = x.as_raw();
        }
    }
    if p.entropy != 0 || p.top1 != 0 || p.margin != 0 {
        p.flags |= F_UNC;
    }
    if p.disagree != 0 {
        p.flags |= F_DIS;
    }
    let mut dtype = None;
    for (i, m) in models.iter().enumerate() {
        let (ptr, _, len, stride, dt, size) = m.logits.parts();
        match dtype {
            None => dtype = Some(dt),
            Some(d) if d != dt => {
                return Err(Error::Unsupported {
                    what: "models of different element types in one GPU call",
                }
                .into());
            }
            _ => {}
        }
        check_ptr(ptr, rows * len, size, "models.logits")?;
        let w = match (cfg.weights, cfg.mode) {
            (DeviceWeights::PerModel(ws), Mode::Linear) => ws[i],
            (DeviceWeights::PerModel(ws), Mode::LogLinear) => ws[i] * r.inv_t[i] * r.inv_t_out,
            (DeviceWeights::PerRow(_), _) => 0.0,
        };
        p.models[i] = ModelParam {
            ptr,
            stride: fits_u32("models.logits.stride", i, stride)?,
            len: fits_u32("models.logits.len", i, len)?,
            inv_t: r.inv_t[i],
            w,
        };
    }
    p.dtype = dtype.unwrap_or(0);
    if let DeviceWeights::PerRow(t) = cfg.weights {
        if t.rows() != rows {
            return Err(Error::LengthMismatch {
                arg: "weights.rows",
                index: 0,
                expected: rows,
                got: t.rows(),
            }
            .into());
        }
        if t.len() != models.len() {
            return Err(Error::LengthMismatch {
                arg: "weights.len",
                index: 0,
                expected: models.len(),
                got: t.len(),
            }
            .into());
        }
        check_ptr(t.as_raw(), rows * models.len(), 4, "weights")?;
        p.wtab = t.as_raw();
        p.wstride = fits_u32("weights.stride", 0, t.stride())?;
        if cfg.mode == Mode::LogLinear {
            p.flags |= F_PERROW_SCALE;
        }
    }
    if cfg.mode == Mode::LogLinear {
        p.flags |= F_LOGLINEAR;
    }
    if r.mask_any {
        p.flags |= F_MASK_ANY;
    }
    if let Some((j, ln_alpha)) = r.plausibility {
        p.flags |= F_PLAUS;
        p.plaus_model = j as u32;
        p.ln_alpha = ln_alpha;
    }
    if cfg.mode == Mode::Linear && (r.mask_any || r.plausibility.is_some() || r.inv_t_out != 1.0) {
        p.flags |= F_RENORM;
    }
    Ok(p)
}

/// Whether every row the v2 kernel touches starts 16-byte aligned.
fn v2_aligned(models: &[DeviceModel<'_>], out: &DeviceOutput<'_>) -> bool {
    let rows16 =
        |ptr: u64, stride: usize, size: usize| ptr.is_multiple_of(16) && (stride * size).is_multiple_of(16);
    models.iter().all(|m| {
        let (ptr, _, _, stride, _, size) = m.logits.parts();
        rows16(ptr, stride, size)
    }) && out
        .log_probs
        .as_ref()
        .is_none_or(|l| rows16(l.as_raw(), l.stride(), 4))
        && out
            .probs
            .as_ref()
            .is_none_or(|q| rows16(q.as_raw(), q.stride(), 4))
}

/// What [`pick_split`]'s errors name (the kernel the caller forced).
struct SplitNames {
    unsupported: &'static str,
    no_workspace: &'static str,
    misaligned: &'static str,
}

/// Whether a call runs a split-row kernel (`ensemble_v2` for [`Combine`],
/// `ensemble_v2s` for [`Sample`], which share the plan and the workspace):
/// `Some((plan, workspace address))` when it applies and `version` allows
/// it, `None` for the one-block-per-row kernel; an error when `version` is
/// [`Version::V2`] and it does not apply, or the workspace is too short or
/// misaligned.
#[allow(clippy::too_many_arguments)]
fn pick_split(
    kernels: &Kernels,
    params: &EnsembleParams,
    n_models: usize,
    mode: Mode,
    version: Version,
    workspace: Option<&DeviceSliceMut<'_, u8>>,
    aligned: bool,
    names: SplitNames,
) -> Result<Option<(V2Plan, u64)>, CudaError> {
    let elem_bytes = if params.dtype == 0 { 4 } else { 2 };
    let plan = plan_v2(
        kernels,
        params.rows as usize,
        params.vocab as usize,
        n_models,
        elem_bytes,
        mode == Mode::LogLinear,
    );
    match (version, plan, workspace) {
        (Version::V1, _, _) => Ok(None),
        (_, Some(p), Some(ws)) if aligned => {
            let needed = p.workspace_bytes();
            if ws.len() < needed {
                return Err(Error::BufferTooShort {
                    arg: "workspace",
                    needed,
                    got: ws.len(),
                }
                .into());
            }
            check_ptr(ws.as_raw(), needed, 16, "workspace")?;
            Ok(Some((p, ws.as_raw())))
        }
        (Version::V2, None, _) => Err(CudaError::Unsupported {
            what: names.unsupported,
        }),
        (Version::V2, _, None) => Err(Error::Unsupported {
            what: names.no_workspace,
        }
        .into()),
        (Version::V2, _, _) => Err(CudaError::Misaligned {
            arg: names.misaligned,
            align: 16,
        }),
        (Version::Auto, _, _) => Ok(None),
    }
}

/// Combines `models` into one distribution per row (the GPU twin of
/// [`medley_core::ensemble::combine`]), writing `out`. Validates everything
/// before launching (same errors as the CPU function, plus
/// [`CudaError::Null`], [`CudaError::Misaligned`] and the GPU limits);
/// never synchronizes, never allocates: the call can be captured in a CUDA
/// graph.
///
/// `workspace` (device memory of at least [`workspace_bytes`], 16-byte
/// aligned, zeroed once before its first use, not shared with a concurrent
/// call) lets the fast split-row kernel run; without it `ensemble_v1` runs.
///
/// ```no_run
/// # use medley_cuda::{Kernels, Launch, Stream, ensemble::*, mem::*};
/// # fn demo(k: &Kernels, stream: Stream<'_>, a: DeviceRows<'_, half::bf16>, b: DeviceRows<'_, half::bf16>,
/// #         lp: DeviceRowsMut<'_, f32>) -> Result<(), medley_cuda::CudaError> {
/// let models = [
///     DeviceModel { logits: DeviceLogits::BF16(a), temperature: 1.0 },
///     DeviceModel { logits: DeviceLogits::BF16(b), temperature: 1.0 },
/// ];
/// let out = DeviceOutput { log_probs: Some(lp), ..Default::default() };
/// let config = DeviceConfig::log_linear(&[1.0, -0.5]);
/// Combine::new(&models, &config, out).launch(k, stream)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct Combine<'a> {
    /// The ensemble members' logits.
    pub models: &'a [DeviceModel<'a>],
    /// Mode, weights, mask rule, plausibility.
    pub config: &'a DeviceConfig<'a>,
    /// What to write.
    pub out: DeviceOutput<'a>,
    /// Workspace for the split-row kernel (`None`: `ensemble_v1` runs).
    pub workspace: Option<DeviceSliceMut<'a, u8>>,
    /// Which kernel runs (default [`Version::Auto`]).
    pub version: Version,
}

impl<'a> Combine<'a> {
    /// A combination with no workspace and [`Version::Auto`].
    pub fn new(models: &'a [DeviceModel<'a>], config: &'a DeviceConfig<'a>, out: DeviceOutput<'a>) -> Self {
        Combine {
            models,
            config,
            out,
            workspace: None,
            version: Version::Auto,
        }
    }

    /// Gives the split-row kernel its workspace.
    pub fn with_workspace(mut self, workspace: DeviceSliceMut<'a, u8>) -> Self {
        self.workspace = Some(workspace);
        self
    }

    /// Chooses the kernel.
    pub fn with_version(mut self, version: Version) -> Self {
        self.version = version;
        self
    }
}

impl crate::Launch for Combine<'_> {
    fn launch(self, kernels: &Kernels, stream: Stream<'_>) -> Result<(), CudaError> {
        combine(
            kernels,
            self.models,
            self.config,
            self.out,
            self.workspace,
            stream,
            self.version,
        )
    }
}

fn combine(
    kernels: &Kernels,
    models: &[DeviceModel<'_>],
    cfg: &DeviceConfig<'_>,
    out: DeviceOutput<'_>,
    workspace: Option<DeviceSliceMut<'_, u8>>,
    stream: Stream<'_>,
    version: Version,
) -> Result<(), CudaError> {
    let mut params = build_params(models, cfg, &out)?;
    if params.rows == 0 {
        return Ok(());
    }
    let v2 = pick_split(
        kernels,
        &params,
        models.len(),
        cfg.mode,
        version,
        workspace.as_ref(),
        v2_aligned(models, &out),
        SplitNames {
            unsupported: "ensemble_v2 (cooperative launch, resident blocks, or rows longer than the grid can split)",
            no_workspace: "ensemble_v2 needs a workspace",
            misaligned: "models.logits / outputs (rows for v2)",
        },
    )?;
    let _ctx = kernels.enter()?;
    let (f, grid, smem) = match v2 {
        Some((p, ws)) => {
            params.work = ws;
            params.chunk = p.chunk;
            params.chunks = p.chunks;
            params.teams = p.teams;
            // The plain entry point unless an uncertainty output is asked for.
            let k = if params.flags & (F_UNC | F_DIS) != 0 {
                Kernel::EnsembleV2U
            } else {
                Kernel::EnsembleV2
            };
            (*kernels.func(k), p.teams * p.chunks, 4 * p.chunk)
        }
        None => (*kernels.func(Kernel::EnsembleV1), params.rows, 0),
    };
    // SAFETY: `params` matches the single by-value parameter of ensemble_v1,
    // ensemble_v2 and ensemble_v2u (size asserted, layout documented in the
    // PTX; both v2 entry points use the same plan and workspace layout);
    // build_params checked every device view against the shapes the kernel
    // indexes (rows x stride spans, output lengths, alignment, non-null);
    // for v2 the workspace holds the plan's bytes, the dynamic shared
    // memory is the 4 * chunk bytes the kernel keeps its scores in, and the
    // grid is the
    // plan.s teams x chunks, which the occupancy query allows to be
    // co-resident (the cooperative launch fails otherwise); the views'
    // lifetimes cover the launch; the stream belongs to the kernels'
    // context (made current by `enter`).
    unsafe { kernels.launch(f, grid, BLOCK, smem, stream, &params) }
}

/// The 552-byte parameter of `ensemble_sample`: ensemble_v1's, then the
/// sampling scalars (layout in `ptx/ensemble.ptx`).
#[repr(C, align(8))]
#[derive(Debug, Clone, Copy)]
struct SampleParams {
    base: EnsembleParams,
    seed: u64,
    step: u32,
    top_k: u32,
    inv_tau: f32,
    min_p_shift: f32,
    top_p: f32,
    reserved: u32,
}

const _: () = assert!(core::mem::size_of::<SampleParams>() == 552);

// SAFETY: plain #[repr(C)] data as EnsembleParams (size asserted above).
unsafe impl DeviceCopy for SampleParams {}

/// Samples the next token of every row from the combination of `models`
/// (the GPU twin of [`medley_core::sample::combine_sample`]): the combined
/// distribution is recomputed from the logits at each pass and never
/// written. Greedy, temperature, top-k, top-p and min-p, by Gumbel-max with
/// the core's Philox generator keyed by `(seed, row, step)`, so the CPU
/// function picks the same token for the same inputs (up to rounding ties:
/// see the `ensemble_sample` contract in `ptx/ensemble.ptx`).
///
/// Validation as [`Combine`] (same errors), plus the sampling parameters'
/// and the outputs' lengths (`tokens.len()` is the row count). Masked rows
/// get [`NO_TOKEN`] and log-probability `-inf`, NaN rows [`NO_TOKEN`] and
/// NaN. Never synchronizes, never allocates.
///
/// Two kernels, picked per call as [`Combine`] picks its version: with a
/// [`workspace`](Sample::with_workspace) (of [`workspace_bytes`], zeroed
/// once, as for [`Combine`]) and 16-byte aligned model rows, calls run
/// `ensemble_v2s` (the rows split over co-resident blocks, the scores kept
/// on chip, one read of the logits; top-k and top-p by a radix select
/// across the row's blocks); calls without a workspace run
/// `ensemble_sample` (one block per row, the naive reference).
///
/// ```no_run
/// # use medley_cuda::{Kernels, Launch, Stream, ensemble::*, mem::*};
/// # use medley_core::sample::Sampling;
/// # fn demo(k: &Kernels, stream: Stream<'_>, a: DeviceRows<'_, half::bf16>, b: DeviceRows<'_, half::bf16>,
/// #         tokens: DeviceSliceMut<'_, u32>) -> Result<(), medley_cuda::CudaError> {
/// let vocab = a.len();
/// let models = [
///     DeviceModel { logits: DeviceLogits::BF16(a), temperature: 1.0 },
///     DeviceModel { logits: DeviceLogits::BF16(b), temperature: 1.0 },
/// ];
/// let config = DeviceConfig::linear(&[0.5, 0.5]);
/// let mut sampling = Sampling::new(0.8, 1234);
/// sampling.top_p = 0.95;
/// Sample::new(&models, &config, &sampling, vocab, tokens).launch(k, stream)?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
#[non_exhaustive]
pub struct Sample<'a> {
    /// The models (as [`Combine`]).
    pub models: &'a [DeviceModel<'a>],
    /// The combination.
    pub config: &'a DeviceConfig<'a>,
    /// Sampling parameters (validated on the host).
    pub sampling: &'a Sampling,
    /// Vocabulary `V` of the combined distribution.
    pub vocab: usize,
    /// The token per row (`B` entries).
    pub tokens: DeviceSliceMut<'a, u32>,
    /// Optionally the token's combined log-probability per row.
    pub log_probs: Option<DeviceSliceMut<'a, f32>>,
    /// Workspace for `ensemble_v2s` (as [`Combine::workspace`]); `None`
    /// runs `ensemble_sample`.
    pub workspace: Option<DeviceSliceMut<'a, u8>>,
    /// Which kernel runs: [`Version::Auto`] (`ensemble_v2s` where it
    /// applies), [`Version::V1`] (`ensemble_sample` always) or
    /// [`Version::V2`] (`ensemble_v2s`, an error where it does not apply).
    pub version: Version,
}

impl<'a> Sample<'a> {
    /// A sampling call writing `tokens` (one per row).
    pub fn new(
        models: &'a [DeviceModel<'a>],
        config: &'a DeviceConfig<'a>,
        sampling: &'a Sampling,
        vocab: usize,
        tokens: DeviceSliceMut<'a, u32>,
    ) -> Self {
        Sample {
            models,
            config,
            sampling,
            vocab,
            tokens,
            log_probs: None,
            workspace: None,
            version: Version::Auto,
        }
    }

    /// Lets the split-row kernel `ensemble_v2s` run (see [`Sample`]).
    pub fn with_workspace(mut self, workspace: DeviceSliceMut<'a, u8>) -> Self {
        self.workspace = Some(workspace);
        self
    }

    /// Forces a kernel version (see [`Sample::version`]).
    pub fn with_version(mut self, version: Version) -> Self {
        self.version = version;
        self
    }

    /// Also writes each token's combined log-probability.
    pub fn with_log_probs(mut self, log_probs: DeviceSliceMut<'a, f32>) -> Self {
        self.log_probs = Some(log_probs);
        self
    }
}

/// Validates a sampling call and builds its parameter (no device access).
fn build_sample_params(s: &Sample<'_>) -> Result<SampleParams, CudaError> {
    let sp = s.sampling.resolve()?;
    let rows = s.tokens.len();
    if let Some(l) = &s.log_probs
        && l.len() != rows
    {
        return Err(Error::LengthMismatch {
            arg: "log_probs",
            index: 0,
            expected: rows,
            got: l.len(),
        }
        .into());
    }
    let mut base = build_params_shaped(s.models, s.config, &DeviceOutput::default(), rows, s.vocab)?;
    check_ptr(s.tokens.as_raw(), rows, 4, "tokens")?;
    base.argmax = s.tokens.as_raw();
    if let Some(l) = &s.log_probs {
        check_ptr(l.as_raw(), rows, 4, "log_probs")?;
        base.logz = l.as_raw();
    }
    Ok(SampleParams {
        base,
        seed: sp.seed,
        step: sp.step,
        top_k: sp.top_k,
        inv_tau: sp.inv_t,
        min_p_shift: sp.min_p_shift,
        top_p: sp.top_p,
        reserved: 0,
    })
}

impl crate::Launch for Sample<'_> {
    fn launch(self, kernels: &Kernels, stream: Stream<'_>) -> Result<(), CudaError> {
        let mut params = build_sample_params(&self)?;
        if params.base.rows == 0 {
            return Ok(());
        }
        let v2 = pick_split(
            kernels,
            &params.base,
            self.models.len(),
            self.config.mode,
            self.version,
            self.workspace.as_ref(),
            v2_aligned(self.models, &DeviceOutput::default()),
            SplitNames {
                unsupported: "ensemble_v2s (cooperative launch, resident blocks, or rows longer than the grid can split)",
                no_workspace: "ensemble_v2s needs a workspace",
                misaligned: "models.logits (rows for v2)",
            },
        )?;
        let _ctx = kernels.enter()?;
        if let Some((p, ws)) = v2 {
            params.base.work = ws;
            params.base.chunk = p.chunk;
            params.base.chunks = p.chunks;
            params.base.teams = p.teams;
            let f = *kernels.func(Kernel::EnsembleV2S);
            // SAFETY: `params` matches ensemble_v2s's single by-value
            // parameter (552 bytes, asserted; layout documented in the
            // PTX); build_params_shaped checked every model view against
            // the rows x len spans the kernel reads, the outputs hold `rows`
            // entries; the workspace holds the plan's bytes (checked above),
            // the dynamic shared memory is the 4 * chunk bytes the kernel
            // keeps its scores in, and the grid is the plan's teams x chunks,
            // which the occupancy query (plan_v2 includes ensemble_v2s)
            // allows to be co-resident (the cooperative launch fails
            // otherwise); the views outlive the launch; the stream belongs
            // to the kernels' context (made current by `enter`).
            return unsafe { kernels.launch(f, p.teams * p.chunks, BLOCK, 4 * p.chunk, stream, &params) };
        }
        let f = *kernels.func(Kernel::EnsembleSample);
        // SAFETY: `params` matches ensemble_sample's single by-value
        // parameter (552 bytes, asserted; layout documented in the PTX);
        // build_params_shaped checked every model view against the rows x
        // len spans the kernel reads, the token and log-probability outputs
        // hold `rows` entries; grid = rows blocks of BLOCK threads with only
        // static shared memory; the views outlive the launch; the stream
        // belongs to the kernels' context (made current by `enter`).
        unsafe { kernels.launch(f, params.base.rows, BLOCK, 0, stream, &params) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The split's invariants over a grid of shapes and grid sizes (the H100
    /// and H200 have 132 SMs; 528 = 4 blocks each), and the shapes whose
    /// H200 timings chose it (benches/results/ensemble-plan.md).
    #[test]
    fn split_v2_covers_rows_within_the_grid_in_the_fewest_rounds_it_can() {
        for g_max in [1usize, 7, 132, 528, 2048] {
            for vocab in [1usize, 8, 2047, 2048, 2049, 32_000, 128_256, 1 << 20, 1 << 24] {
                for rows in [1usize, 2, 8, 63, 64, 65, 256, 5000] {
                    for eb in [2usize, 4] {
                        let (chunk, chunks, teams) = split_v2(rows, vocab, g_max, eb);
                        let at = format!("rows {rows} vocab {vocab} g_max {g_max} elem {eb}");
                        assert_eq!(chunk % 8, 0, "{at}");
                        assert!(chunk * chunks >= vocab && chunk * (chunks - 1) < vocab, "{at}");
                        assert!(chunks >= 1 && chunks <= g_max, "{at}");
                        assert!(teams >= 1 && teams <= rows.min(MAX_TEAMS), "{at}");
                        if chunk <= V2_MAX_CHUNK {
                            assert!(teams * chunks <= g_max, "{at}");
                        }
                        // A row of at least one 2048-token step per block never
                        // gets more blocks than such steps.
                        if vocab >= 2048 && chunk <= V2_MAX_CHUNK {
                            assert!(chunks <= vocab.div_ceil(2048), "{at}");
                        }
                    }
                }
            }
        }
        // 64 rows of 32000 bf16 tokens on 528 blocks: one round of 8 blocks a
        // row, every row at once (the split before took 9 blocks a row, so 58 teams and two
        // rounds: 34.3 -> 19.8 us linear, 21.1 -> 13.4 us log-linear, M = 2).
        assert_eq!(split_v2(64, 32_000, 528, 2), (4000, 8, 64));
        // 256 rows of 128256: 12 blocks of 10688 tokens, 44 teams, 6 rounds
        // (before, linear at M = 8: 65 blocks of 1976, 8 teams, 32 rounds:
        // 1214 -> 532 us).
        assert_eq!(split_v2(256, 128_256, 528, 2), (10688, 12, 44));
        // Decode: one row over every 2048-token step.
        assert_eq!(split_v2(1, 128_256, 528, 2), (2040, 63, 1));
        // Too long for the grid: more than V2_MAX_CHUNK a block (v1 runs).
        assert!(split_v2(1, 1 << 24, 528, 2).0 > V2_MAX_CHUNK);
    }

    /// A fake device view (never dereferenced: build_params only checks
    /// shapes, nullness and alignment).
    fn fake<T>(addr: u64, n: usize) -> DeviceSliceMut<'static, T> {
        // SAFETY: build_params never reads or writes through the view.
        unsafe { DeviceSliceMut::from_raw(addr, n) }
    }

    #[test]
    fn uncertainty_outputs_are_validated_like_the_core() {
        let (b, v) = (3usize, 64usize);
        // SAFETY: as `fake`.
        let logits = unsafe { crate::mem::DeviceSlice::<f32>::from_raw(0x10_0000, b * v) };
        let models = [DeviceModel {
            logits: DeviceLogits::F32(DeviceRows::dense(logits, b, v).unwrap()),
            temperature: 1.0,
        }];
        let out = |e: usize, d: Option<usize>| DeviceOutput {
            log_probs: Some(DeviceRowsMut::dense(fake(0x20_0000, b * v), b, v).unwrap()),
            entropy: Some(fake(0x30_0000, e)),
            top1_prob: Some(fake(0x30_1000, b)),
            margin: Some(fake(0x30_2000, b)),
            disagreement: d.map(|n| fake(0x30_3000, n)),
            ..Default::default()
        };
        let lin = DeviceConfig::linear(&[1.0]);
        let ll = DeviceConfig::log_linear(&[1.0]);
        let p = build_params(&models, &lin, &out(b, Some(b))).unwrap();
        assert_eq!(p.flags & (F_UNC | F_DIS), F_UNC | F_DIS);
        assert_eq!(
            (p.entropy, p.top1, p.margin, p.disagree),
            (0x30_0000, 0x30_1000, 0x30_2000, 0x30_3000)
        );
        let p = build_params(&models, &ll, &out(b, None)).unwrap();
        assert_eq!(p.flags & (F_UNC | F_DIS), F_UNC);
        assert_eq!(
            build_params(&models, &ll, &out(b, Some(b))).unwrap_err(),
            CudaError::Invalid(Error::Unsupported {
                what: "disagreement is defined for linear mixtures"
            })
        );
        assert!(matches!(
            build_params(&models, &lin, &out(b + 1, None)),
            Err(CudaError::Invalid(Error::LengthMismatch { arg: "entropy", .. }))
        ));
        assert!(matches!(
            build_params(&models, &lin, &out(b, Some(1))),
            Err(CudaError::Invalid(Error::LengthMismatch {
                arg: "disagreement",
                ..
            }))
        ));
        // nothing requested: no flag, null pointers
        let plain = DeviceOutput {
            log_probs: Some(DeviceRowsMut::dense(fake(0x20_0000, b * v), b, v).unwrap()),
            ..Default::default()
        };
        let p = build_params(&models, &lin, &plain).unwrap();
        assert_eq!((p.flags & (F_UNC | F_DIS), p.entropy | p.disagree), (0, 0));
    }

    #[test]
    fn sampling_calls_are_validated_before_launch() {
        let (b, v) = (3usize, 64usize);
        // SAFETY: as `fake`.
        let logits = unsafe { crate::mem::DeviceSlice::<f32>::from_raw(0x10_0000, b * v) };
        let models = [DeviceModel {
            logits: DeviceLogits::F32(DeviceRows::dense(logits, b, v).unwrap()),
            temperature: 1.0,
        }];
        let cfg = DeviceConfig::log_linear(&[1.0]);
        let mut sp = Sampling::new(0.5, 0x1234_5678_9ABC_DEF0);
        sp.top_k = 7;
        sp.top_p = 0.9;
        sp.min_p = 0.25;
        sp.step = 3;
        let p = build_sample_params(&Sample::new(&models, &cfg, &sp, v, fake(0x40_0000, b))).unwrap();
        assert_eq!(
            (p.base.rows, p.base.vocab, p.base.argmax, p.base.logz),
            (3, 64, 0x40_0000, 0)
        );
        assert_eq!(
            (p.base.logp, p.base.prob, p.base.flags & (F_UNC | F_DIS)),
            (0, 0, 0)
        );
        assert_eq!(
            (p.seed, p.step, p.top_k, p.inv_tau, p.top_p),
            (0x1234_5678_9ABC_DEF0, 3, 7, 2.0, 0.9)
        );
        assert_eq!(p.min_p_shift, 0.5 * medley_core::math::ln(0.25));
        let with_lp =
            Sample::new(&models, &cfg, &sp, v, fake(0x40_0000, b)).with_log_probs(fake(0x50_0000, b));
        assert_eq!(build_sample_params(&with_lp).unwrap().base.logz, 0x50_0000);
        // wrong lengths, bad parameters, the combination's own errors
        let bad_lp =
            Sample::new(&models, &cfg, &sp, v, fake(0x40_0000, b)).with_log_probs(fake(0x50_0000, b + 1));
        assert!(matches!(
            build_sample_params(&bad_lp),
            Err(CudaError::Invalid(Error::LengthMismatch { arg: "log_probs", .. }))
        ));
        assert!(matches!(
            build_sample_params(&Sample::new(&models, &cfg, &sp, v, fake(0x40_0000, b + 1))),
            Err(CudaError::Invalid(Error::LengthMismatch { .. }))
        ));
        let mut bad = sp;
        bad.top_p = 0.0;
        assert_eq!(
            build_sample_params(&Sample::new(&models, &cfg, &bad, v, fake(0x40_0000, b))).unwrap_err(),
            CudaError::Invalid(Error::OutOfRange {
                arg: "sampling.top_p",
                index: 0
            })
        );
        assert!(matches!(
            build_sample_params(&Sample::new(&models, &cfg, &sp, v - 1, fake(0x40_0000, b))),
            Err(CudaError::Invalid(Error::TooLarge { .. }))
        ));
        assert!(matches!(
            build_sample_params(&Sample::new(&models, &cfg, &sp, v, fake(0x40_0002, b))),
            Err(CudaError::Misaligned { .. })
        ));
    }
}
