//! CPU entry points over host memory: ensemble combination
//! (`medley_ensemble_combine`) and top-k gating (`medley_moe_topk_softmax`,
//! `medley_moe_keep_topk_softmax`).

use crate::args::{
    Region, Regions, Versioned, at_most, dtype, get, init_versioned, slice, slice_mut, stride_or, versioned,
    versioned_out_size, write_versioned,
};
use crate::status::{Fail, medley_status};
use core::ffi::c_void;
use medley_core::ensemble::{
    Config, Logits, MAX_MODELS, MaskRule, Mode, Model, Output, Plausibility, Weights, combine,
};
use medley_core::moe::gating::{keep_topk_softmax, topk_softmax};
use medley_core::{DType, Error, Report, Rows, RowsMut, bf16, f16};

/// Linear (mixture) or log-linear (product of experts) combination; the
/// `mode` field of `medley_ensemble_config`.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_mode {
    /// `P ∝ (sum_m w_m P_m)^(1/T_out)` with `w_m >= 0` ("logical OR").
    Linear = 0,
    /// `P = softmax(sum_m c_m z_m / (T_m T_out))` with signed `c_m`
    /// ("logical AND": product of experts, contrastive decoding, DExperts,
    /// classifier-free guidance).
    LogLinear = 1,
}

/// Which `-inf` logits mask a token in linear mode; the `mask_rule` field
/// of `medley_ensemble_config` (log-linear mode always behaves as `ANY`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_mask_rule {
    /// A token is masked when every model with nonzero weight masks it.
    All = 0,
    /// A token is masked when any model with nonzero weight masks it.
    Any = 1,
}

/// A strided view of `rows x len` elements in host memory: row `i` starts at
/// element `i * stride` of `data`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_rows {
    /// Host pointer to element 0 of row 0, aligned for `dtype`. May be null
    /// only when `data_len` is 0.
    pub data: *const c_void,
    /// Elements (of `dtype`) readable at `data`: at least
    /// `(rows - 1) * stride + len` (0 when `rows` is 0).
    pub data_len: usize,
    /// A `medley_dtype` value.
    pub dtype: u32,
    /// Number of rows.
    pub rows: usize,
    /// Elements per row.
    pub len: usize,
    /// Elements between row starts, `>= len`; 0 means `len` (dense rows).
    pub stride: usize,
}

/// One model of a CPU combination: `rows x V_m` logits (`V_m <= vocab`:
/// tokens beyond a model's `len` have probability 0 under it) and a
/// temperature.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_model {
    /// The logits (host memory).
    pub logits: medley_rows,
    /// Temperature `T_m > 0` (1 for none).
    pub temperature: f32,
}

/// What a row-wise call found: rows with no surviving token and rows made
/// NaN by NaN or `+inf` inputs. Written only on success. A versioned
/// output struct: the caller sets `struct_size` (`medley_report_init`) and
/// the library writes the fields of that layout, nothing past it.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct medley_report {
    /// `sizeof(medley_report)` of the caller's header (set by
    /// `medley_report_init`); never written by the library.
    pub struct_size: usize,
    /// Fully masked rows (log-probabilities all `-inf`, probabilities 0,
    /// argmax `MEDLEY_NO_TOKEN`).
    pub masked_rows: usize,
    /// Rows whose outputs are NaN (argmax `MEDLEY_NO_TOKEN`).
    pub nan_rows: usize,
}

impl From<Report> for medley_report {
    fn from(r: Report) -> Self {
        medley_report {
            masked_rows: r.masked_rows,
            nan_rows: r.nan_rows,
            ..medley_report::DEFAULT
        }
    }
}

/// Size of the first `medley_report` layout (ABI 1.0): `struct_size`,
/// `masked_rows`, `nan_rows`.
pub const MEDLEY_REPORT_SIZE_V1: usize = 24;

// SAFETY: repr(C), `struct_size: usize` first, integer fields only.
unsafe impl Versioned for medley_report {
    const DEFAULT: Self = medley_report {
        struct_size: size_of::<medley_report>(),
        masked_rows: 0,
        nan_rows: 0,
    };
    const SIZES: &'static [usize] = &[MEDLEY_REPORT_SIZE_V1];
}

/// Fills `*report` with zero counts and sets its `struct_size` to
/// `struct_size` (pass `sizeof *report`): call it on every
/// `medley_report` before passing it. Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED` or
/// `MEDLEY_STATUS_STRUCT_SIZE` (a size this library does not know).
///
/// # Safety
/// `report` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_report_init(report: *mut medley_report, struct_size: usize) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(report, struct_size, "report") } })
}

/// A nullable report out-pointer, checked (`struct_size` included) before
/// anything runs: `(pointer, caller's size)`.
pub(crate) fn report_out(p: *mut medley_report) -> Result<Option<(*mut medley_report, usize)>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null; the caller of the entry point guarantees
    // struct_size writable bytes.
    let size = unsafe { versioned_out_size(p, "report") }?;
    Ok(Some((p, size)))
}

/// Writes a report checked by [`report_out`].
///
/// # Safety
/// `r` came from `report_out` and overlaps no other buffer of the call.
pub(crate) unsafe fn write_report(r: (*mut medley_report, usize), rep: Report) {
    // SAFETY: see above.
    unsafe { write_versioned(r.0, r.1, &rep.into()) }
}

/// Parameters of a combination, for `medley_ensemble_combine` and
/// `medley_cuda_ensemble_combine`. A versioned struct: fill it with
/// `medley_ensemble_config_init(&cfg, sizeof cfg)` (a linear combination
/// at `T_out = 1` with no mask and no weights), then set `weights` and
/// `weights_len`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_ensemble_config {
    /// `sizeof(medley_ensemble_config)` of the caller's header (set by
    /// `medley_ensemble_config_init`).
    pub struct_size: usize,
    /// A `medley_mode` value.
    pub mode: u32,
    /// A `medley_mask_rule` value (linear mode).
    pub mask_rule: u32,
    /// Output temperature `T_out > 0` (1 for none).
    pub out_temperature: f32,
    /// Contrastive decoding's plausibility mask: keep only tokens with
    /// `P_j(v) >= alpha * max P_j` for model `j = plausibility_model`; a
    /// negative value disables the mask.
    pub plausibility_model: i32,
    /// `alpha` of the plausibility mask, in `[0, 1]`.
    pub plausibility_alpha: f32,
    /// Weights (linear, `>= 0`, normalized by their sum) or coefficients
    /// (log-linear, signed), in host memory. `weights_stride == 0`: one
    /// value per model (`n_models` values). `weights_stride > 0`: a per-row
    /// table of `rows x n_models` values with that row stride (CPU only;
    /// the GPU function reads a per-row table from `device_weights` and
    /// then `weights` must be null). May be null only when `weights_len`
    /// is 0.
    pub weights: *const f32,
    /// Elements readable at `weights`.
    pub weights_len: usize,
    /// 0 for per-model weights, else the row stride of the per-row table
    /// (`>= n_models`).
    pub weights_stride: usize,
    /// GPU only: device address of a per-row weight table (`rows x
    /// n_models` `float`s, row stride `weights_stride`, `weights_len`
    /// elements); 0 when the weights are per model. Must be 0 for the CPU
    /// function.
    pub device_weights: u64,
}

/// Where `medley_ensemble_combine` writes (host memory). Each output is
/// optional: a null pointer means "not requested" (its length and stride
/// are then ignored). At least one of `log_probs` and `probs` must be
/// given. No output may overlap another output or an input. A versioned
/// struct: start from `medley_ensemble_output_init(&out, sizeof out)` (no
/// outputs requested).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_ensemble_output {
    /// `sizeof(medley_ensemble_output)` of the caller's header (set by
    /// `medley_ensemble_output_init`). Layout 1 (`MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1`)
    /// ends after `log_normalizer_len`; layout 2 adds the per-row
    /// uncertainty outputs.
    pub struct_size: usize,
    /// `rows x vocab` log-probabilities (nullable).
    pub log_probs: *mut f32,
    /// Elements writable at `log_probs`.
    pub log_probs_len: usize,
    /// Row stride of `log_probs` (0 means `vocab`).
    pub log_probs_stride: usize,
    /// `rows x vocab` probabilities (nullable).
    pub probs: *mut f32,
    /// Elements writable at `probs`.
    pub probs_len: usize,
    /// Row stride of `probs` (0 means `vocab`).
    pub probs_stride: usize,
    /// `rows` argmax token ids (nullable; `MEDLEY_NO_TOKEN` for masked and
    /// NaN rows; the lowest index among ties).
    pub argmax: *mut u32,
    /// Elements writable at `argmax` (must be `rows`).
    pub argmax_len: usize,
    /// `rows` log-normalizers `ln Z` (nullable): `log_probs = u - ln Z`
    /// with `u` the unnormalized log-score.
    pub log_normalizer: *mut f32,
    /// Elements writable at `log_normalizer` (must be `rows`).
    pub log_normalizer_len: usize,
    /// Layout 2: `rows` entropies (nats) of the combined distribution
    /// (nullable; NaN for masked and NaN rows).
    pub entropy: *mut f32,
    /// Elements writable at `entropy` (must be `rows`).
    pub entropy_len: usize,
    /// Layout 2: `rows` probabilities of the argmax token (nullable; NaN
    /// for masked and NaN rows).
    pub top1_prob: *mut f32,
    /// Elements writable at `top1_prob` (must be `rows`).
    pub top1_prob_len: usize,
    /// Layout 2: `rows` margins `p(top1) - p(top2)` (nullable; NaN for
    /// masked and NaN rows; `p(top1)` when one token survives).
    pub margin: *mut f32,
    /// Elements writable at `margin` (must be `rows`).
    pub margin_len: usize,
    /// Layout 2: `rows` model disagreements, the mutual information
    /// `H(mixture) - sum_m w_m H(P_m)` in nats (nullable; linear mode only,
    /// `MEDLEY_STATUS_UNSUPPORTED` in log-linear mode; NaN for masked and
    /// NaN rows).
    pub disagreement: *mut f32,
    /// Elements writable at `disagreement` (must be `rows`).
    pub disagreement_len: usize,
}

/// Size of the first `medley_ensemble_output` layout (ABI 1.0): up to and
/// including `log_normalizer_len`.
pub const MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1: usize = 88;
/// Size of the second layout (ABI 1.1): layout 1 and the four per-row
/// uncertainty outputs.
pub const MEDLEY_ENSEMBLE_OUTPUT_SIZE_V2: usize = 152;
/// Size of the first `medley_ensemble_config` layout (ABI 1.0).
pub const MEDLEY_ENSEMBLE_CONFIG_SIZE_V1: usize = 64;

const _: () = assert!(size_of::<medley_ensemble_config>() == MEDLEY_ENSEMBLE_CONFIG_SIZE_V1);

const _: () = assert!(size_of::<medley_ensemble_output>() == MEDLEY_ENSEMBLE_OUTPUT_SIZE_V2);
const _: () = assert!(size_of::<medley_report>() == MEDLEY_REPORT_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; integers, floats and raw
// pointers only.
unsafe impl Versioned for medley_ensemble_config {
    const DEFAULT: Self = DEFAULT_CONFIG;
    const SIZES: &'static [usize] = &[MEDLEY_ENSEMBLE_CONFIG_SIZE_V1];
}

// SAFETY: as above.
unsafe impl Versioned for medley_ensemble_output {
    const DEFAULT: Self = medley_ensemble_output {
        struct_size: size_of::<medley_ensemble_output>(),
        log_probs: core::ptr::null_mut(),
        log_probs_len: 0,
        log_probs_stride: 0,
        probs: core::ptr::null_mut(),
        probs_len: 0,
        probs_stride: 0,
        argmax: core::ptr::null_mut(),
        argmax_len: 0,
        log_normalizer: core::ptr::null_mut(),
        log_normalizer_len: 0,
        entropy: core::ptr::null_mut(),
        entropy_len: 0,
        top1_prob: core::ptr::null_mut(),
        top1_prob_len: 0,
        margin: core::ptr::null_mut(),
        margin_len: 0,
        disagreement: core::ptr::null_mut(),
        disagreement_len: 0,
    };
    const SIZES: &'static [usize] = &[MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1, MEDLEY_ENSEMBLE_OUTPUT_SIZE_V2];
}

/// Fills `*config` with the defaults (a linear combination at `T_out = 1`,
/// `MEDLEY_MASK_ALL`, no plausibility mask, no weights) and sets its
/// `struct_size` to `struct_size` (pass `sizeof *config`). Returns
/// `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED` or `MEDLEY_STATUS_STRUCT_SIZE`.
///
/// # Safety
/// `config` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_ensemble_config_init(
    config: *mut medley_ensemble_config,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(config, struct_size, "config") } })
}

/// Fills `*out` with no outputs requested (every pointer null) and sets its
/// `struct_size` to `struct_size` (pass `sizeof *out`). Returns as
/// `medley_ensemble_config_init`.
///
/// # Safety
/// `out` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_ensemble_output_init(
    out: *mut medley_ensemble_output,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(out, struct_size, "out") } })
}

/// The defaults of `medley_ensemble_config_init`.
pub(crate) const DEFAULT_CONFIG: medley_ensemble_config = medley_ensemble_config {
    struct_size: size_of::<medley_ensemble_config>(),
    mode: medley_mode::Linear as u32,
    mask_rule: medley_mask_rule::All as u32,
    out_temperature: 1.0,
    plausibility_model: -1,
    plausibility_alpha: 0.0,
    weights: core::ptr::null(),
    weights_len: 0,
    weights_stride: 0,
    device_weights: 0,
};

/// The scalar part of a config.
pub(crate) struct Scalars {
    pub(crate) mode: Mode,
    pub(crate) mask_rule: MaskRule,
    pub(crate) out_temperature: f32,
    pub(crate) plausibility: Option<Plausibility>,
}

pub(crate) fn scalars(c: &medley_ensemble_config) -> Result<Scalars, Fail> {
    let mode = match c.mode {
        0 => Mode::Linear,
        1 => Mode::LogLinear,
        v => {
            return Err(Fail::BadEnum {
                arg: "config.mode",
                value: v,
            });
        }
    };
    let mask_rule = match c.mask_rule {
        0 => MaskRule::All,
        1 => MaskRule::Any,
        v => {
            return Err(Fail::BadEnum {
                arg: "config.mask_rule",
                value: v,
            });
        }
    };
    let plausibility = usize::try_from(c.plausibility_model)
        .ok()
        .map(|model| Plausibility {
            model,
            alpha: c.plausibility_alpha,
        });
    Ok(Scalars {
        mode,
        mask_rule,
        out_temperature: c.out_temperature,
        plausibility,
    })
}

/// Re-labels a core error about a view (the core names its parts `data`,
/// `stride`, ...) with the view's argument name.
pub(crate) fn at(arg: &'static str, index: usize) -> impl Fn(Error) -> Fail {
    move |err| Fail::At { arg, index, err }
}

/// A typed, checked view of a `medley_rows`, registered as read.
///
/// # Safety
/// `r.data` must be readable for `r.data_len` elements of `r.dtype`, not
/// written during `'a`.
pub(crate) unsafe fn host_rows<'a>(
    r: &medley_rows,
    arg: &'static str,
    index: usize,
    regions: &mut Regions,
) -> Result<Logits<'a>, Fail> {
    let dt = dtype(arg, r.dtype)?;
    let stride = stride_or(r.stride, r.len);
    // SAFETY (each arm): `Region::host` checked null, alignment and the
    // byte size for this element type; the caller guarantees readability.
    Ok(match dt {
        DType::F32 => {
            let p = r.data.cast::<f32>();
            regions.read(Region::host(p, r.data_len, arg, index)?);
            // SAFETY: see above.
            let s = unsafe { slice(p, r.data_len) };
            Logits::F32(Rows::new(s, r.rows, r.len, stride).map_err(at(arg, index))?)
        }
        DType::F16 => {
            let p = r.data.cast::<f16>();
            regions.read(Region::host(p, r.data_len, arg, index)?);
            // SAFETY: see above.
            let s = unsafe { slice(p, r.data_len) };
            Logits::F16(Rows::new(s, r.rows, r.len, stride).map_err(at(arg, index))?)
        }
        DType::BF16 => {
            let p = r.data.cast::<bf16>();
            regions.read(Region::host(p, r.data_len, arg, index)?);
            // SAFETY: see above.
            let s = unsafe { slice(p, r.data_len) };
            Logits::BF16(Rows::new(s, r.rows, r.len, stride).map_err(at(arg, index))?)
        }
    })
}

/// Copies the caller's array of `n` structs (checked) onto the stack, so
/// no reference into caller memory outlives the argument checks.
///
/// # Safety
/// `p` must be readable for `n` elements when non-null.
pub(crate) unsafe fn copy_list<T: Copy>(
    p: *const T,
    n: usize,
    max: usize,
    fill: T,
    arg: &'static str,
) -> Result<([T; MAX_MODELS], usize), Fail> {
    debug_assert!(max <= MAX_MODELS);
    Region::host(p, n, arg, 0)?;
    at_most(arg, n, max)?;
    let mut out = [fill; MAX_MODELS];
    // SAFETY: (p, n) passed Region::host; readable (the caller).
    out[..n].copy_from_slice(unsafe { slice(p, n) });
    Ok((out, n))
}

const NO_ROWS: medley_rows = medley_rows {
    data: core::ptr::null(),
    data_len: 0,
    dtype: 0,
    rows: 0,
    len: 0,
    stride: 0,
};

/// Combines the next-token distributions of `n_models` models into one
/// distribution per row (`rows x vocab`), on the CPU, with the semantics
/// of medley's core (`medley_core::ensemble::combine`): linear mixtures
/// computed in log space (a token impossible under one model keeps the mass
/// the others give it), log-linear products with signed coefficients,
/// per-model temperatures, models with shorter vocabularies, masks,
/// contrastive decoding's plausibility constraint. Fully masked rows and
/// NaN rows are defined and counted in `report`.
///
/// Every argument is checked before anything is written; on failure the
/// outputs and `report` are untouched.
///
/// - `models`: `n_models` (1 to `MEDLEY_MAX_MODELS`) models, each with
///   `rows` rows of `len <= vocab` logits; element types may differ.
/// - `config`: mode, weights, temperatures, masks (required).
/// - `out`: the outputs (required; see `medley_ensemble_output`).
/// - `report`: nullable; receives the masked and NaN row counts.
///
/// Returns `MEDLEY_STATUS_OK`, or `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_BAD_SHAPE` (row counts, lengths,
/// strides, more models than supported), `MEDLEY_STATUS_BAD_PARAMETER`
/// (temperatures, weights, `alpha`, `plausibility_model`, enum values),
/// `MEDLEY_STATUS_UNSUPPORTED` (no row output, `device_weights` set).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it (and
/// structs for one struct); buffers must not be modified by another thread
/// during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_ensemble_combine(
    models: *const medley_model,
    n_models: usize,
    config: *const medley_ensemble_config,
    rows: usize,
    vocab: usize,
    out: *const medley_ensemble_output,
    report: *mut medley_report,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointers (checked for
        // null and alignment by `get`); both are copied out at once.
        let cfg = unsafe { versioned(config, "config") }?;
        // SAFETY: as above.
        let o = unsafe { versioned(out, "out") }?;
        let report = report_out(report)?;
        let fill = medley_model {
            logits: NO_ROWS,
            temperature: 1.0,
        };
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, n) = unsafe { copy_list(models, n_models, MAX_MODELS, fill, "models") }?;
        let sc = scalars(&cfg)?;
        let mut regions = Regions::new();
        let mut ms = [Model::new(Rows::single(&[] as &[f32])); MAX_MODELS];
        for (i, (m, c)) in ms.iter_mut().zip(&list[..n]).enumerate() {
            // SAFETY: the caller guarantees each model's data pointer.
            let logits = unsafe { host_rows(&c.logits, "models[].logits", i, &mut regions) }?;
            *m = Model {
                logits,
                temperature: c.temperature,
            };
        }
        if cfg.device_weights != 0 {
            return Err(Error::Unsupported {
                what: "config.device_weights in a CPU call (per-row host weights use weights_stride)",
            }
            .into());
        }
        regions.read(Region::host(cfg.weights, cfg.weights_len, "config.weights", 0)?);
        // SAFETY: checked by Region::host; readable (the caller).
        let ws = unsafe { slice(cfg.weights, cfg.weights_len) };
        let weights = if cfg.weights_stride == 0 {
            Weights::PerModel(ws)
        } else {
            Weights::PerRow(Rows::new(ws, rows, n, cfg.weights_stride).map_err(at("config.weights", 0))?)
        };
        if !o.log_probs.is_null() {
            regions.written(Region::host(o.log_probs, o.log_probs_len, "out.log_probs", 0)?);
        }
        if !o.probs.is_null() {
            regions.written(Region::host(o.probs, o.probs_len, "out.probs", 0)?);
        }
        if !o.argmax.is_null() {
            regions.written(Region::host(o.argmax, o.argmax_len, "out.argmax", 0)?);
        }
        if !o.log_normalizer.is_null() {
            regions.written(Region::host(
                o.log_normalizer,
                o.log_normalizer_len,
                "out.log_normalizer",
                0,
            )?);
        }
        let row_outs = [
            (o.entropy, o.entropy_len, "out.entropy"),
            (o.top1_prob, o.top1_prob_len, "out.top1_prob"),
            (o.margin, o.margin_len, "out.margin"),
            (o.disagreement, o.disagreement_len, "out.disagreement"),
        ];
        for &(p, len, arg) in &row_outs {
            if !p.is_null() {
                regions.written(Region::host(p, len, arg, 0)?);
            }
        }
        if let Some((r, size)) = report {
            regions.written(Region::host(r.cast_const().cast::<u8>(), size, "report", 0)?);
        }
        regions.check()?;
        // SAFETY (the outputs): each non-null output passed
        // Region::host and overlaps no other buffer of the call
        // (Regions::check); writable (the caller).
        let rows_mut = |p: *mut f32, len: usize, stride: usize, arg: &'static str| {
            if p.is_null() {
                return Ok(None);
            }
            // SAFETY: see above.
            let s = unsafe { slice_mut(p, len) };
            RowsMut::new(s, rows, vocab, stride_or(stride, vocab))
                .map(Some)
                .map_err(at(arg, 0))
        };
        let output = Output {
            log_probs: rows_mut(o.log_probs, o.log_probs_len, o.log_probs_stride, "out.log_probs")?,
            probs: rows_mut(o.probs, o.probs_len, o.probs_stride, "out.probs")?,
            // SAFETY: see above.
            argmax: (!o.argmax.is_null()).then(|| unsafe { slice_mut(o.argmax, o.argmax_len) }),
            // SAFETY: see above.
            log_normalizer: (!o.log_normalizer.is_null())
                .then(|| unsafe { slice_mut(o.log_normalizer, o.log_normalizer_len) }),
            // SAFETY: see above.
            entropy: (!o.entropy.is_null()).then(|| unsafe { slice_mut(o.entropy, o.entropy_len) }),
            // SAFETY: see above.
            top1_prob: (!o.top1_prob.is_null()).then(|| unsafe { slice_mut(o.top1_prob, o.top1_prob_len) }),
            // SAFETY: see above.
            margin: (!o.margin.is_null()).then(|| unsafe { slice_mut(o.margin, o.margin_len) }),
            // SAFETY: see above.
            disagreement: (!o.disagreement.is_null())
                .then(|| unsafe { slice_mut(o.disagreement, o.disagreement_len) }),
        };
        if output.log_probs.is_none() && output.probs.is_none() {
            // The core reports this too; checking here keeps `rows` and
            // `vocab` meaningful in the message.
            return Err(Error::Unsupported {
                what: "no row output: give out.log_probs or out.probs",
            }
            .into());
        }
        let config = Config {
            mode: sc.mode,
            weights,
            out_temperature: sc.out_temperature,
            plausibility: sc.plausibility,
            mask_rule: sc.mask_rule,
        };
        let rep = combine(&ms[..n], &config, output)?;
        if let Some(r) = report {
            // SAFETY: checked by report_out, disjoint from every other
            // buffer (Regions::check), writable (the caller).
            unsafe { write_report(r, rep) };
        }
        Ok(())
    })
}

/// Which gating function runs.
#[derive(Clone, Copy)]
enum Gate {
    TopkSoftmax { renormalize: bool },
    KeepTopk,
}

/// The shared body of the gating entry points.
///
/// # Safety
/// As the entry points.
#[allow(clippy::too_many_arguments)]
unsafe fn gate(
    logits: *const medley_rows,
    k: usize,
    gate: Gate,
    ids: *mut u32,
    ids_len: usize,
    weights: *mut f32,
    weights_len: usize,
    report: *mut medley_report,
) -> Result<(), Fail> {
    // SAFETY: the caller guarantees the struct pointer; copied at once.
    let r = *unsafe { get(logits, "logits") }?;
    let report = report_out(report)?;
    let mut regions = Regions::new();
    // SAFETY: the caller guarantees the logits buffer.
    let x = unsafe { host_rows(&r, "logits", 0, &mut regions) }?;
    regions.written(Region::host(ids, ids_len, "ids", 0)?);
    regions.written(Region::host(weights, weights_len, "weights", 0)?);
    if let Some((p, size)) = report {
        regions.written(Region::host(p.cast_const().cast::<u8>(), size, "report", 0)?);
    }
    regions.check()?;
    // SAFETY: both outputs passed Region::host and overlap nothing else
    // (Regions::check); writable (the caller).
    let (ids, w) = unsafe { (slice_mut(ids, ids_len), slice_mut(weights, weights_len)) };
    macro_rules! run {
        ($rows:expr) => {
            match gate {
                Gate::TopkSoftmax { renormalize } => topk_softmax($rows, k, renormalize, ids, w),
                Gate::KeepTopk => keep_topk_softmax($rows, k, ids, w),
            }
        };
    }
    let rep = match x {
        Logits::F32(rows) => run!(rows),
        Logits::F16(rows) => run!(rows),
        Logits::BF16(rows) => run!(rows),
    }?;
    if let Some(r) = report {
        // SAFETY: checked by report_out, disjoint from the outputs,
        // writable (the caller).
        unsafe { write_report(r, rep) };
    }
    Ok(())
}

/// Top-k gating as vLLM's `topk_softmax`: softmax over all `E` router
/// logits of each token, the `k` largest picked (descending; ties to the
/// lower expert index; selection on the exact logits), weights the softmax
/// probabilities of the picks, renormalized to sum to 1 when `renormalize`
/// is nonzero (Mixtral, Qwen3-MoE) or not (Qwen2-MoE).
///
/// - `logits`: `T x E` router logits (`rows = T` tokens, `len = E`
///   experts, 1 to 4096; any `medley_dtype`).
/// - `k`: experts per token, 1 to `min(E, 32)`.
/// - `ids`, `weights`: `T * k` outputs each (row `t` is
///   `[t*k, (t+1)*k)`); `ids_len` and `weights_len` must equal `T * k`.
/// - `report`: nullable. A NaN row gets ids `0..k-1` and NaN weights; a
///   fully `-inf` row ids `0..k-1` and weights 0; both are counted.
///
/// Checked before anything is written; on failure the outputs are
/// untouched. Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_BAD_SHAPE` (`E` of 0 or above
/// 4096, `k` above `E` or 32, output lengths) or
/// `MEDLEY_STATUS_BAD_PARAMETER` (`k` of 0, `dtype`).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it (and
/// `logits` for one struct).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_moe_topk_softmax(
    logits: *const medley_rows,
    k: usize,
    renormalize: u32,
    ids: *mut u32,
    ids_len: usize,
    weights: *mut f32,
    weights_len: usize,
    report: *mut medley_report,
) -> medley_status {
    ffi_boundary!({
        let g = Gate::TopkSoftmax {
            renormalize: renormalize != 0,
        };
        // SAFETY: the caller's guarantees are those of `gate`.
        unsafe { gate(logits, k, g, ids, ids_len, weights, weights_len, report) }
    })
}

/// Top-k gating as `Softmax(KeepTopK(x, k))` (Shazeer et al. 2017): the
/// `k` largest logits of each token, weights the softmax over those `k`
/// logits only. Arguments, edge cases and errors as
/// `medley_moe_topk_softmax`.
///
/// # Safety
/// As `medley_moe_topk_softmax`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_moe_keep_topk_softmax(
    logits: *const medley_rows,
    k: usize,
    ids: *mut u32,
    ids_len: usize,
    weights: *mut f32,
    weights_len: usize,
    report: *mut medley_report,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller's guarantees are those of `gate`.
        unsafe {
            gate(
                logits,
                k,
                Gate::KeepTopk,
                ids,
                ids_len,
                weights,
                weights_len,
                report,
            )
        }
    })
}
