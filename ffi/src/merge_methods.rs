//! Every other merge method of medley-core over host memory, one tensor per
//! call: linear merges, the task-vector family (task arithmetic, TIES, DARE,
//! breadcrumbs, DELLA) with every option, soups (with a C evaluator), SLERP,
//! NuSLERP, multi-SLERP, the Karcher mean, Model Stock and SCE. Each is a
//! thin checked wrapper over the core function of the same name; their
//! streaming forms are in `merge_stream`.

use crate::args::{
    Region, Regions, Versioned, init_versioned, req_out_ptr, slice, slice_mut, versioned, versioned_out_size,
    write_versioned,
};
use crate::cpu::copy_list;
use crate::status::{Fail, medley_status};
use core::ffi::c_void;
use medley_core::merge::MAX_MODELS;
use medley_core::merge::gta::{
    Consensus, Divisor, Gta, GtaOptions, Rescale, Sparsify, TaskParams, Votes, merge as gta_merge,
};
use medley_core::merge::linear::linear;
use medley_core::merge::sce::{Sce, SceOptions, sce};
use medley_core::merge::soup::{SoupReport, greedy_soup, pruned_soup};
use medley_core::merge::sphere::{
    KarcherOptions, Layout, MultislerpOptions, Nuslerp, NuslerpOptions, SlerpOptions, karcher, multislerp,
    nuslerp, slerp,
};
use medley_core::merge::stock::{StockOptions, model_stock};
use medley_core::{DType, Element, bf16, f16};

use crate::merge::medley_merge_model;

/// Runs `$body` with `$T` bound to the element type of `$t` (a `DType`).
macro_rules! with_type {
    ($t:expr, |$T:ident| $body:block) => {
        match $t {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F16 => {
                type $T = f16;
                $body
            }
            DType::BF16 => {
                type $T = bf16;
                $body
            }
        }
    };
}

/// Runs `$body` with `$T` and `$O` bound to the element types of the input
/// and output dtypes.
macro_rules! with_types {
    ($t:expr, $o:expr, |$T:ident, $O:ident| $body:block) => {
        match $o {
            DType::F32 => {
                type $O = f32;
                with_type!($t, |$T| $body)
            }
            DType::F16 => {
                type $O = f16;
                with_type!($t, |$T| $body)
            }
            DType::BF16 => {
                type $O = bf16;
                with_type!($t, |$T| $body)
            }
        }
    };
}
pub(crate) use {with_type, with_types};

// ---------------------------------------------------------------------------
// Element structs and enums.

/// One tensor (or one chunk of a tensor) of one model: the element struct
/// of the methods without per-model parameters (Model Stock, SCE, soups)
/// and of the streaming calls. An array element: never changes.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_merge_tensor {
    /// Host pointer to `data_len` elements of the call's `dtype`, aligned
    /// for it; may be null only when `data_len` is 0.
    pub data: *const c_void,
    /// Elements at `data`.
    pub data_len: usize,
}

/// One fine-tuned model's tensor and its parameters for the task-vector
/// family (`medley_merge_gta`): `medley_merge_model` plus breadcrumbs'
/// `gamma` and DELLA's `epsilon`. An array element: never changes.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_gta_model {
    /// Host pointer to the tensor (`data_len` elements of the call's
    /// `dtype`, aligned for it); may be null only when `data_len` is 0.
    /// Not read by `medley_merge_stream_new_gta` (parameters only).
    pub data: *const c_void,
    /// Elements at `data`: must equal the base's length.
    pub data_len: usize,
    /// Weight `w_i` (finite; may be negative).
    pub weight: f32,
    /// Fraction kept by the sparsifier, in `(0, 1]` (1: not sparsified;
    /// ignored without a sparsifier).
    pub density: f64,
    /// Breadcrumbs: fraction of the largest magnitudes dropped, in
    /// `[0, 1]` (mergekit: 0.01).
    pub gamma: f64,
    /// DELLA: half-width of the keep-probability window, with
    /// `density - epsilon > 0` and `density + epsilon <= 1` (mergekit: 0.15).
    pub epsilon: f64,
}

/// The sparsifier of a task-vector merge (`sparsify` field of
/// `medley_gta_options`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_gta_sparsify {
    /// Keep every element (task arithmetic).
    None = 0,
    /// TIES trim: the `floor(density n)` largest magnitudes.
    Magnitude = 1,
    /// DARE: drop each element with probability `1 - density` (Philox,
    /// keyed by `seed`, `[model, tensor_id]` and the element index).
    Random = 2,
    /// Breadcrumbs: drop the `floor(gamma n)` largest magnitudes, keep the
    /// next `floor(density n)`.
    Outliers = 3,
    /// DELLA MagPrune: rank-dependent keep probabilities in
    /// `[density - epsilon, density + epsilon]` within each row.
    Della = 4,
}

/// The sign consensus of a task-vector merge (`consensus` field).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_gta_consensus {
    /// No sign election: a plain weighted sum.
    None = 0,
    /// The sign of the total mass of the votes (mergekit `"sum"`).
    Sum = 1,
    /// The sign of the number of positive minus negative votes (`"count"`).
    Count = 2,
}

/// The rescaling of sparsified task vectors (`rescale` field).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_gta_rescale {
    /// No rescaling.
    None = 0,
    /// Match the task vector's L1 norm (mergekit's `rescale: true`).
    L1 = 1,
    /// Match its L2 norm.
    L2 = 2,
    /// Match its largest magnitude.
    Linf = 3,
    /// Divide survivors by their keep probability (the DARE and DELLA
    /// papers); random sparsifiers only.
    InverseKeep = 4,
}

/// The mergekit presets of `medley_gta_options_init_preset`.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_gta_preset {
    /// `task_arithmetic` (the default of `medley_gta_options_init`).
    TaskArithmetic = 0,
    /// `ties`.
    Ties = 1,
    /// TIES as in the paper (unweighted votes, disjoint mean).
    TiesPaper = 2,
    /// `dare_ties`.
    DareTies = 3,
    /// `dare_linear`.
    DareLinear = 4,
    /// `breadcrumbs`.
    Breadcrumbs = 5,
    /// `breadcrumbs_ties`.
    BreadcrumbsTies = 6,
    /// `della` (one row: set `row_len` for rows).
    Della = 7,
    /// `della_linear`.
    DellaLinear = 8,
}

/// Which vectors NuSLERP interpolates (`layout` field of
/// `medley_nuslerp_options`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_nuslerp_layout {
    /// The whole tensor is one vector (mergekit's default).
    Flat = 0,
    /// Each contiguous row of `layout_len` elements is a vector.
    Rows = 1,
    /// Each column of the row-major matrix with rows of `layout_len`
    /// elements is a vector.
    Columns = 2,
}

// ---------------------------------------------------------------------------
// Options structs.

/// Options of a task-vector merge (`medley_merge_gta` and its streaming
/// form). A versioned struct: `medley_gta_options_init(&o, sizeof o)` fills
/// in task arithmetic, `medley_gta_options_init_preset` any mergekit preset.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_gta_options {
    /// `sizeof(medley_gta_options)` of the caller's header.
    pub struct_size: usize,
    /// A `medley_gta_sparsify` value.
    pub sparsify: u32,
    /// A `medley_gta_consensus` value.
    pub consensus: u32,
    /// A `medley_ties_votes` value.
    pub votes: u32,
    /// A `medley_ties_divisor` value.
    pub divisor: u32,
    /// Nonzero: divide by the (agreeing) weight sum.
    pub normalize: u32,
    /// A `medley_gta_rescale` value.
    pub rescale: u32,
    /// Scale of the merged task vector (finite).
    pub lambda: f32,
    /// Identifies the tensor in the random streams.
    pub tensor_id: u32,
    /// 0: select over the whole tensor (DELLA: one row); else rows of this
    /// many elements (must divide the tensor length).
    pub row_len: usize,
    /// Seed of the random sparsifiers.
    pub seed: u64,
}

/// Size of the first `medley_gta_options` layout (ABI 1.1).
pub const MEDLEY_GTA_OPTIONS_SIZE_V1: usize = 56;
const _: () = assert!(size_of::<medley_gta_options>() == MEDLEY_GTA_OPTIONS_SIZE_V1);

fn gta_to_c(g: &GtaOptions) -> medley_gta_options {
    medley_gta_options {
        struct_size: size_of::<medley_gta_options>(),
        sparsify: match g.sparsify {
            Sparsify::None => 0,
            Sparsify::Magnitude => 1,
            Sparsify::Random => 2,
            Sparsify::Outliers => 3,
            Sparsify::Della => 4,
        },
        consensus: match g.consensus {
            Consensus::None => 0,
            Consensus::Sum => 1,
            Consensus::Count => 2,
        },
        votes: match g.votes {
            Votes::Weighted => 0,
            Votes::Unweighted => 1,
        },
        divisor: match g.divisor {
            Divisor::WeightSum => 0,
            Divisor::Count => 1,
        },
        normalize: g.normalize as u32,
        rescale: match g.rescale {
            Rescale::None => 0,
            Rescale::L1 => 1,
            Rescale::L2 => 2,
            Rescale::Linf => 3,
            Rescale::InverseKeep => 4,
        },
        lambda: g.lambda,
        tensor_id: g.tensor_id,
        row_len: g.row_len.unwrap_or(0),
        seed: g.seed,
    }
}

/// Task arithmetic spelled out (the defaults of `medley_gta_options_init`).
const GTA_FALLBACK: medley_gta_options = medley_gta_options {
    struct_size: size_of::<medley_gta_options>(),
    sparsify: 0,
    consensus: 0,
    votes: 0,
    divisor: 0,
    normalize: 0,
    rescale: 0,
    lambda: 1.0,
    tensor_id: 0,
    row_len: 0,
    seed: 0,
};

// SAFETY: repr(C), `struct_size: usize` first; integers and floats only.
unsafe impl Versioned for medley_gta_options {
    const DEFAULT: Self = GTA_FALLBACK;
    const SIZES: &'static [usize] = &[MEDLEY_GTA_OPTIONS_SIZE_V1];
}

fn bad(arg: &'static str, value: u32) -> Fail {
    Fail::BadEnum { arg, value }
}

/// The core options of a C `medley_gta_options` (enum values checked).
pub(crate) fn gta_options(o: &medley_gta_options) -> Result<GtaOptions, Fail> {
    Ok(GtaOptions {
        sparsify: match o.sparsify {
            0 => Sparsify::None,
            1 => Sparsify::Magnitude,
            2 => Sparsify::Random,
            3 => Sparsify::Outliers,
            4 => Sparsify::Della,
            v => return Err(bad("options.sparsify", v)),
        },
        consensus: match o.consensus {
            0 => Consensus::None,
            1 => Consensus::Sum,
            2 => Consensus::Count,
            v => return Err(bad("options.consensus", v)),
        },
        votes: match o.votes {
            0 => Votes::Weighted,
            1 => Votes::Unweighted,
            v => return Err(bad("options.votes", v)),
        },
        divisor: match o.divisor {
            0 => Divisor::WeightSum,
            1 => Divisor::Count,
            v => return Err(bad("options.divisor", v)),
        },
        normalize: o.normalize != 0,
        rescale: match o.rescale {
            0 => Rescale::None,
            1 => Rescale::L1,
            2 => Rescale::L2,
            3 => Rescale::Linf,
            4 => Rescale::InverseKeep,
            v => return Err(bad("options.rescale", v)),
        },
        lambda: o.lambda,
        row_len: (o.row_len != 0).then_some(o.row_len),
        seed: o.seed,
        tensor_id: o.tensor_id,
    })
}

/// Fills `*options` with mergekit's `task_arithmetic` (no sparsifier, no
/// consensus, not normalized, `lambda = 1`, seed 0, tensor 0) and sets its
/// `struct_size` to `struct_size` (pass `sizeof *options`). Returns
/// `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED` or `MEDLEY_STATUS_STRUCT_SIZE`.
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_gta_options_init(
    options: *mut medley_gta_options,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(options, struct_size, "options") } })
}

/// As `medley_gta_options_init`, with the mergekit preset `preset` (a
/// `medley_gta_preset` value; seed, tensor id and `row_len` 0: set them
/// afterwards). Returns as `medley_gta_options_init`, plus
/// `MEDLEY_STATUS_BAD_PARAMETER` for an unknown preset (nothing written).
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_gta_options_init_preset(
    options: *mut medley_gta_options,
    struct_size: usize,
    preset: u32,
) -> medley_status {
    ffi_boundary!({
        let g = match preset {
            0 => GtaOptions::task_arithmetic(),
            1 => GtaOptions::ties(),
            2 => GtaOptions::ties_paper(),
            3 => GtaOptions::dare_ties(0, 0),
            4 => GtaOptions::dare_linear(0, 0),
            5 => GtaOptions::breadcrumbs(),
            6 => GtaOptions::breadcrumbs_ties(),
            7 => GtaOptions::della(None, 0, 0),
            8 => GtaOptions::della_linear(None, 0, 0),
            v => return Err(bad("preset", v)),
        };
        // SAFETY: the caller guarantees struct_size writable bytes.
        unsafe { init_versioned(options, struct_size, "options") }?;
        // SAFETY: init_versioned checked the pointer and the size.
        unsafe { write_versioned(options, struct_size, &gta_to_c(&g)) };
        Ok(())
    })
}

/// Options of `medley_merge_slerp`. A versioned struct:
/// `medley_slerp_options_init(&o, sizeof o)` gives `t = 0.5` and mergekit's
/// `dot_threshold = 0.9995`, `eps = 1e-8`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_slerp_options {
    /// `sizeof(medley_slerp_options)` of the caller's header.
    pub struct_size: usize,
    /// Interpolation parameter: 0 gives `v0`, 1 gives `v1` (finite).
    pub t: f32,
    /// Lerp when `|cos theta| >` this (>= 0).
    pub dot_threshold: f64,
    /// Vectors of norm `<= eps` are not normalized (>= 0).
    pub eps: f64,
}

/// Size of the first `medley_slerp_options` layout (ABI 1.1).
pub const MEDLEY_SLERP_OPTIONS_SIZE_V1: usize = 32;
const _: () = assert!(size_of::<medley_slerp_options>() == MEDLEY_SLERP_OPTIONS_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; floats only.
unsafe impl Versioned for medley_slerp_options {
    const DEFAULT: Self = medley_slerp_options {
        struct_size: size_of::<medley_slerp_options>(),
        t: 0.5,
        dot_threshold: 0.9995,
        eps: 1e-8,
    };
    const SIZES: &'static [usize] = &[MEDLEY_SLERP_OPTIONS_SIZE_V1];
}

pub(crate) fn slerp_options(o: &medley_slerp_options) -> SlerpOptions {
    SlerpOptions {
        t: o.t,
        dot_threshold: o.dot_threshold,
        eps: o.eps,
    }
}

/// Fills `*options` with `t = 0.5`, `dot_threshold = 0.9995`, `eps = 1e-8`
/// and sets `struct_size`. Returns as `medley_gta_options_init`.
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_slerp_options_init(
    options: *mut medley_slerp_options,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(options, struct_size, "options") } })
}

/// Options of `medley_merge_nuslerp`. A versioned struct:
/// `medley_nuslerp_options_init(&o, sizeof o)` gives mergekit's defaults
/// (flat layout, `eps = 1e-8`).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_nuslerp_options {
    /// `sizeof(medley_nuslerp_options)` of the caller's header.
    pub struct_size: usize,
    /// A `medley_nuslerp_layout` value.
    pub layout: u32,
    /// Row length of the `ROWS` and `COLUMNS` layouts (nonzero, dividing
    /// the tensor length); ignored by `FLAT`.
    pub layout_len: usize,
    /// Lerp where `|sin theta| < eps` (>= 0).
    pub eps: f64,
}

/// Size of the first `medley_nuslerp_options` layout (ABI 1.1).
pub const MEDLEY_NUSLERP_OPTIONS_SIZE_V1: usize = 32;
const _: () = assert!(size_of::<medley_nuslerp_options>() == MEDLEY_NUSLERP_OPTIONS_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; integers and floats only.
unsafe impl Versioned for medley_nuslerp_options {
    const DEFAULT: Self = medley_nuslerp_options {
        struct_size: size_of::<medley_nuslerp_options>(),
        layout: 0,
        layout_len: 0,
        eps: 1e-8,
    };
    const SIZES: &'static [usize] = &[MEDLEY_NUSLERP_OPTIONS_SIZE_V1];
}

pub(crate) fn nuslerp_options(o: &medley_nuslerp_options) -> Result<NuslerpOptions, Fail> {
    Ok(NuslerpOptions {
        layout: match o.layout {
            0 => Layout::Flat,
            1 => Layout::Rows(o.layout_len),
            2 => Layout::Columns(o.layout_len),
            v => return Err(bad("options.layout", v)),
        },
        eps: o.eps,
    })
}

/// Fills `*options` with mergekit's NuSLERP defaults and sets
/// `struct_size`. Returns as `medley_gta_options_init`.
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_nuslerp_options_init(
    options: *mut medley_nuslerp_options,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(options, struct_size, "options") } })
}

/// Options of `medley_merge_multislerp`. A versioned struct:
/// `medley_multislerp_options_init(&o, sizeof o)` gives mergekit's defaults.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_multislerp_options {
    /// `sizeof(medley_multislerp_options)` of the caller's header.
    pub struct_size: usize,
    /// Nonzero: divide the weights by their sum (mergekit: 1).
    pub normalize_weights: u32,
    /// Added to each norm before dividing; the degenerate-mean threshold
    /// (>= 0; mergekit: 1e-8).
    pub eps: f64,
}

/// Size of the first `medley_multislerp_options` layout (ABI 1.1).
pub const MEDLEY_MULTISLERP_OPTIONS_SIZE_V1: usize = 24;
const _: () = assert!(size_of::<medley_multislerp_options>() == MEDLEY_MULTISLERP_OPTIONS_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; integers and floats only.
unsafe impl Versioned for medley_multislerp_options {
    const DEFAULT: Self = medley_multislerp_options {
        struct_size: size_of::<medley_multislerp_options>(),
        normalize_weights: 1,
        eps: 1e-8,
    };
    const SIZES: &'static [usize] = &[MEDLEY_MULTISLERP_OPTIONS_SIZE_V1];
}

pub(crate) fn multislerp_options(o: &medley_multislerp_options) -> MultislerpOptions {
    MultislerpOptions {
        normalize_weights: o.normalize_weights != 0,
        eps: o.eps,
    }
}

/// Fills `*options` with mergekit's multi-SLERP defaults
/// (`normalize_weights = 1`, `eps = 1e-8`) and sets `struct_size`. Returns
/// as `medley_gta_options_init`.
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_multislerp_options_init(
    options: *mut medley_multislerp_options,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(options, struct_size, "options") } })
}

/// Options of `medley_merge_karcher`. A versioned struct:
/// `medley_karcher_options_init(&o, sizeof o)` gives mergekit's defaults.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_karcher_options {
    /// `sizeof(medley_karcher_options)` of the caller's header.
    pub struct_size: usize,
    /// Most fixed-point iterations (mergekit: 10; at most 10000, above it
    /// `MEDLEY_STATUS_BAD_SHAPE`).
    pub max_iter: u32,
    /// Convergence and degeneracy tolerance (>= 0; mergekit: 1e-5).
    pub tol: f64,
}

/// Size of the first `medley_karcher_options` layout (ABI 1.1).
pub const MEDLEY_KARCHER_OPTIONS_SIZE_V1: usize = 24;
const _: () = assert!(size_of::<medley_karcher_options>() == MEDLEY_KARCHER_OPTIONS_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; integers and floats only.
unsafe impl Versioned for medley_karcher_options {
    const DEFAULT: Self = medley_karcher_options {
        struct_size: size_of::<medley_karcher_options>(),
        max_iter: 10,
        tol: 1e-5,
    };
    const SIZES: &'static [usize] = &[MEDLEY_KARCHER_OPTIONS_SIZE_V1];
}

pub(crate) fn karcher_options(o: &medley_karcher_options) -> KarcherOptions {
    KarcherOptions {
        max_iter: o.max_iter,
        tol: o.tol,
    }
}

/// Fills `*options` with mergekit's Karcher defaults (`max_iter = 10`,
/// `tol = 1e-5`) and sets `struct_size`. Returns as
/// `medley_gta_options_init`.
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_karcher_options_init(
    options: *mut medley_karcher_options,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(options, struct_size, "options") } })
}

/// Options of `medley_merge_model_stock`. A versioned struct:
/// `medley_stock_options_init(&o, sizeof o)` gives mergekit's default (one
/// `t` for the whole tensor).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_stock_options {
    /// `sizeof(medley_stock_options)` of the caller's header.
    pub struct_size: usize,
    /// 0: one `t` per tensor (mergekit `filter_wise: false`); else one `t`
    /// per contiguous row of this many elements (`filter_wise: true`).
    pub row_len: usize,
}

/// Size of the first `medley_stock_options` layout (ABI 1.1).
pub const MEDLEY_STOCK_OPTIONS_SIZE_V1: usize = 16;
const _: () = assert!(size_of::<medley_stock_options>() == MEDLEY_STOCK_OPTIONS_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; integers only.
unsafe impl Versioned for medley_stock_options {
    const DEFAULT: Self = medley_stock_options {
        struct_size: size_of::<medley_stock_options>(),
        row_len: 0,
    };
    const SIZES: &'static [usize] = &[MEDLEY_STOCK_OPTIONS_SIZE_V1];
}

pub(crate) fn stock_options(o: &medley_stock_options) -> StockOptions {
    StockOptions {
        rows: (o.row_len != 0).then_some(o.row_len),
    }
}

/// Fills `*options` with Model Stock's defaults and sets `struct_size`.
/// Returns as `medley_gta_options_init`.
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_stock_options_init(
    options: *mut medley_stock_options,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(options, struct_size, "options") } })
}

/// Options of `medley_merge_sce`. A versioned struct:
/// `medley_sce_options_init(&o, sizeof o)` gives mergekit's default
/// (`select_topk = 1`: no selection).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_sce_options {
    /// `sizeof(medley_sce_options)` of the caller's header.
    pub struct_size: usize,
    /// Fraction of the non-zero-variance elements selected, in `(0, 1]`.
    pub select_topk: f64,
}

/// Size of the first `medley_sce_options` layout (ABI 1.1).
pub const MEDLEY_SCE_OPTIONS_SIZE_V1: usize = 16;
const _: () = assert!(size_of::<medley_sce_options>() == MEDLEY_SCE_OPTIONS_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; floats only.
unsafe impl Versioned for medley_sce_options {
    const DEFAULT: Self = medley_sce_options {
        struct_size: size_of::<medley_sce_options>(),
        select_topk: 1.0,
    };
    const SIZES: &'static [usize] = &[MEDLEY_SCE_OPTIONS_SIZE_V1];
}

pub(crate) fn sce_options(o: &medley_sce_options) -> SceOptions {
    SceOptions {
        select_topk: o.select_topk,
    }
}

/// Fills `*options` with SCE's defaults and sets `struct_size`. Returns as
/// `medley_gta_options_init`.
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_sce_options_init(
    options: *mut medley_sce_options,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(options, struct_size, "options") } })
}

/// What a soup recipe did (output of `medley_merge_greedy_soup` and
/// `medley_merge_pruned_soup`). A versioned struct:
/// `medley_soup_report_init(&r, sizeof r)` before the call.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_soup_report {
    /// `sizeof(medley_soup_report)` of the caller's header.
    pub struct_size: usize,
    /// Ingredients in the final soup.
    pub ingredients: usize,
    /// Evaluator calls made.
    pub evaluations: usize,
    /// The final soup's score (as the evaluator returned it).
    pub score: f32,
}

/// Size of the first `medley_soup_report` layout (ABI 1.1).
pub const MEDLEY_SOUP_REPORT_SIZE_V1: usize = 32;
const _: () = assert!(size_of::<medley_soup_report>() == MEDLEY_SOUP_REPORT_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; integers and floats only.
unsafe impl Versioned for medley_soup_report {
    const DEFAULT: Self = medley_soup_report {
        struct_size: size_of::<medley_soup_report>(),
        ingredients: 0,
        evaluations: 0,
        score: 0.0,
    };
    const SIZES: &'static [usize] = &[MEDLEY_SOUP_REPORT_SIZE_V1];
}

/// Zeroes `*report` and sets its `struct_size`. Returns as
/// `medley_gta_options_init`.
///
/// # Safety
/// `report` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_soup_report_init(
    report: *mut medley_soup_report,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(report, struct_size, "report") } })
}

// ---------------------------------------------------------------------------
// Checked buffers.

/// Checks a list of tensors (`(data, len)` pairs) as reads of `T` and
/// borrows them.
///
/// # Safety
/// Every non-null pointer is readable for its length (the caller).
pub(crate) unsafe fn tensors<'a, T: Element>(
    it: impl Iterator<Item = (*const c_void, usize)>,
    arg: &'static str,
    regions: &mut Regions,
) -> Result<([&'a [T]; MAX_MODELS], usize), Fail> {
    let mut ms: [&[T]; MAX_MODELS] = [&[]; MAX_MODELS];
    let mut k = 0;
    for (i, (d, (p, len))) in ms.iter_mut().zip(it).enumerate() {
        let p = p.cast::<T>();
        regions.read(Region::host(p, len, arg, i)?);
        // SAFETY: checked by Region::host; readable (the caller).
        *d = unsafe { slice(p, len) };
        k = i + 1;
    }
    Ok((ms, k))
}

/// Checks one input buffer of `T` and borrows it.
///
/// # Safety
/// When non-null, `p` is readable for `len` elements (the caller).
pub(crate) unsafe fn input<'a, T>(
    p: *const c_void,
    len: usize,
    arg: &'static str,
    regions: &mut Regions,
) -> Result<&'a [T], Fail> {
    let p = p.cast::<T>();
    regions.read(Region::host(p, len, arg, 0)?);
    // SAFETY: checked by Region::host; readable (the caller).
    Ok(unsafe { slice(p, len) })
}

/// An optional input: `None` when `p` is null (then `len` must be 0).
///
/// # Safety
/// As [`input`].
pub(crate) unsafe fn opt_input<'a, T>(
    p: *const c_void,
    len: usize,
    arg: &'static str,
    regions: &mut Regions,
) -> Result<Option<&'a [T]>, Fail> {
    if p.is_null() {
        Region::host(p.cast::<T>(), len, arg, 0)?;
        return Ok(None);
    }
    // SAFETY: as input.
    Ok(Some(unsafe { input(p, len, arg, regions) }?))
}

/// Registers an output buffer of `O`; borrow it with [`output`] after
/// `Regions::check`.
pub(crate) fn out_region<O>(
    p: *mut c_void,
    len: usize,
    arg: &'static str,
    regions: &mut Regions,
) -> Result<(), Fail> {
    regions.written(Region::host(p.cast::<O>().cast_const(), len, arg, 0)?);
    Ok(())
}

/// The output registered by [`out_region`].
///
/// # Safety
/// `(p, len)` passed `out_region` and the call's `Regions::check`;
/// writable (the caller).
pub(crate) unsafe fn output<'a, O>(p: *mut c_void, len: usize) -> &'a mut [O] {
    // SAFETY: see the function's contract.
    unsafe { slice_mut(p.cast::<O>(), len) }
}

const NO_MODEL: medley_merge_model = medley_merge_model {
    data: core::ptr::null(),
    data_len: 0,
    weight: 0.0,
    density: 1.0,
};

const NO_GTA_MODEL: medley_gta_model = medley_gta_model {
    data: core::ptr::null(),
    data_len: 0,
    weight: 0.0,
    density: 1.0,
    gamma: 0.01,
    epsilon: 0.15,
};

pub(crate) const NO_TENSOR: medley_merge_tensor = medley_merge_tensor {
    data: core::ptr::null(),
    data_len: 0,
};

/// Copies a C list of `medley_merge_model` (at most `MAX_MODELS`).
///
/// # Safety
/// `p` holds `n` structs when non-null (the caller).
pub(crate) unsafe fn model_list(
    p: *const medley_merge_model,
    n: usize,
) -> Result<([medley_merge_model; MAX_MODELS], usize), Fail> {
    // SAFETY: the caller's guarantee.
    unsafe { copy_list(p, n, MAX_MODELS, NO_MODEL, "models") }
}

/// Copies a C list of `medley_gta_model`.
///
/// # Safety
/// `p` holds `n` structs when non-null (the caller).
pub(crate) unsafe fn gta_list(
    p: *const medley_gta_model,
    n: usize,
) -> Result<([medley_gta_model; MAX_MODELS], usize), Fail> {
    // SAFETY: the caller's guarantee.
    unsafe { copy_list(p, n, MAX_MODELS, NO_GTA_MODEL, "models") }
}

/// Copies a C list of `medley_merge_tensor`.
///
/// # Safety
/// `p` holds `n` structs when non-null (the caller).
pub(crate) unsafe fn tensor_list(
    p: *const medley_merge_tensor,
    n: usize,
    arg: &'static str,
) -> Result<([medley_merge_tensor; MAX_MODELS], usize), Fail> {
    // SAFETY: the caller's guarantee.
    unsafe { copy_list(p, n, MAX_MODELS, NO_TENSOR, arg) }
}

/// The core's per-model parameters of a `medley_gta_model` list.
pub(crate) fn gta_params(list: &[medley_gta_model]) -> [TaskParams; MAX_MODELS] {
    let mut p = [TaskParams::new(0.0); MAX_MODELS];
    for (d, m) in p.iter_mut().zip(list) {
        *d = TaskParams {
            weight: m.weight,
            density: m.density,
            gamma: m.gamma,
            epsilon: m.epsilon,
        };
    }
    p
}

fn weights_of(list: &[medley_merge_model]) -> [f32; MAX_MODELS] {
    let mut w = [0.0f32; MAX_MODELS];
    for (d, m) in w.iter_mut().zip(list) {
        *d = m.weight;
    }
    w
}

fn dtypes(dtype: u32, out_dtype: u32) -> Result<(DType, DType), Fail> {
    Ok((
        crate::args::dtype("dtype", dtype)?,
        crate::args::dtype("out_dtype", out_dtype)?,
    ))
}

// ---------------------------------------------------------------------------
// Linear.

/// Linear merge (mergekit `linear`; parameter, checkpoint and weighted soup
/// averaging) of one tensor: `out = sum_i w_i x_i`, divided by
/// `sum_i w_i` when `normalize` is nonzero (mergekit's default; evaluated
/// as `x_0 + sum_{i>=1} f32(w_i / W) (x_i - x_0)`, exact for identical
/// models). Element-wise: calling it on chunks of the tensors (any order)
/// writes the bits of the one-shot call, which makes it its own streaming
/// form. Arithmetic is `float`, rounded once to `out_dtype`.
///
/// - `models`, `n_models`: 1 to 64 models of `out_len` elements of `dtype`
///   with their weights (`density` is not read).
/// - `normalize`: nonzero to divide by the weight sum.
/// - `out`, `out_len`: the merged tensor (`out_dtype`).
///
/// Checked before anything is written: on failure `out` is untouched.
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_BAD_SHAPE` (no or too many
/// models, lengths) or `MEDLEY_STATUS_BAD_PARAMETER` (non-finite weights,
/// normalized weights summing to zero, enum values).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it
/// (`models` for `n_models` structs); no buffer may be modified by another
/// thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_linear(
    models: *const medley_merge_model,
    n_models: usize,
    dtype: u32,
    normalize: u32,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { model_list(models, n_models) }?;
        let (t, o) = dtypes(dtype, out_dtype)?;
        let l = &list[..k];
        let w = weights_of(l);
        with_types!(t, o, |T, O| {
            let mut regions = Regions::new();
            // SAFETY: the caller guarantees the model buffers.
            let (ms, _) = unsafe {
                tensors::<T>(
                    l.iter().map(|m| (m.data, m.data_len)),
                    "models[].data",
                    &mut regions,
                )
            }?;
            out_region::<O>(out, out_len, "out", &mut regions)?;
            regions.check()?;
            // SAFETY: registered and checked above.
            let out = unsafe { output::<O>(out, out_len) };
            linear(&ms[..k], &w[..k], normalize != 0, out)?;
        });
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// The task-vector family.

/// The `u32` scratch elements `medley_merge_gta` (and the statistics of a
/// streamed merge) needs for these models, tensor length `n` and options,
/// into `*scratch_len` (0 when none is needed). Only the parameters of
/// `models` are read (not the tensors).
///
/// Returns `MEDLEY_STATUS_OK` or the parameter errors of
/// `medley_merge_gta`.
///
/// # Safety
/// `models` must hold `n_models` structs; `options` one struct;
/// `scratch_len` must point to a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_gta_scratch_len(
    models: *const medley_gta_model,
    n_models: usize,
    n: usize,
    options: *const medley_gta_options,
    scratch_len: *mut usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointers.
        let opts = gta_options(&unsafe { versioned(options, "options") }?)?;
        let out = req_out_ptr(scratch_len, "scratch_len")?;
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { gta_list(models, n_models) }?;
        let p = gta_params(&list[..k]);
        let len = Gta::new(n, &p[..k], &opts)?.scratch_len();
        // SAFETY: non-null, aligned (req_out_ptr), writable (the caller).
        unsafe { out.write(len) };
        Ok(())
    })
}

/// Merges one tensor of `n_models` fine-tuned models onto their base with
/// any method of the task-vector family (mergekit's "generalized task
/// arithmetic"), as chosen by `options` (`medley_gta_options_init_preset`):
/// task arithmetic, TIES (mergekit's and the paper's), DARE (TIES and
/// linear), breadcrumbs (and TIES), DELLA (and linear). Each task vector
/// `delta_i = x_i - base` is sparsified (`sparsify`, with each model's
/// `density`, `gamma`, `epsilon`) and rescaled (`rescale`), weighted by
/// `w_i`, combined with or without a sign election (`consensus`, `votes`),
/// optionally divided by the (agreeing) weights (`normalize`, `divisor`)
/// and scaled by `lambda`: `out = base + lambda * merged`, rounded once to
/// `out_dtype`. Random masks depend only on `seed`, the model index,
/// `tensor_id` and the element index.
///
/// - `models`, `n_models`: 1 to 64 models of `base_len` elements of `dtype`.
/// - `base`, `base_len`: the base model's tensor.
/// - `options`: required.
/// - `out`, `out_len`: `base_len` elements of `out_dtype`.
/// - `scratch`, `scratch_len`: at least `medley_merge_gta_scratch_len`
///   `uint32_t` elements (null with 0 when none is needed).
///
/// Checked before anything is written: on failure `out` is untouched.
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_STRUCT_SIZE`,
/// `MEDLEY_STATUS_BAD_SHAPE` (lengths, models, scratch too short, a tensor
/// above 2^32 elements with a selection), `MEDLEY_STATUS_BAD_PARAMETER`
/// (weights, densities, gammas, epsilons, `lambda`, `row_len`, normalized
/// weights summing to zero, enum values) or `MEDLEY_STATUS_UNSUPPORTED`
/// (`INVERSE_KEEP` with a deterministic sparsifier).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it
/// (`models` for `n_models` structs, `options` for one); no buffer may be
/// modified by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_gta(
    models: *const medley_gta_model,
    n_models: usize,
    base: *const c_void,
    base_len: usize,
    dtype: u32,
    options: *const medley_gta_options,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
    scratch: *mut u32,
    scratch_len: usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = gta_options(&unsafe { versioned(options, "options") }?)?;
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { gta_list(models, n_models) }?;
        let (t, o) = dtypes(dtype, out_dtype)?;
        let l = &list[..k];
        let p = gta_params(l);
        with_types!(t, o, |T, O| {
            let mut regions = Regions::new();
            // SAFETY: the caller guarantees every buffer.
            let (ms, _) = unsafe {
                tensors::<T>(
                    l.iter().map(|m| (m.data, m.data_len)),
                    "models[].data",
                    &mut regions,
                )
            }?;
            // SAFETY: as above.
            let b = unsafe { input::<T>(base, base_len, "base", &mut regions) }?;
            out_region::<O>(out, out_len, "out", &mut regions)?;
            regions.written(Region::host(scratch.cast_const(), scratch_len, "scratch", 0)?);
            regions.check()?;
            // SAFETY: registered and checked above.
            let (out, s) = unsafe { (output::<O>(out, out_len), slice_mut(scratch, scratch_len)) };
            gta_merge(&ms[..k], b, &p[..k], &opts, s, out)?;
        });
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Soups.

/// The held-out evaluator of the soups: returns the score (higher is
/// better; NaN is the worst) of the parameters `params[0..len]` (`float`,
/// the candidate soup). `user` is the caller's pointer, passed through. It
/// must not unwind (throw) and must not call back into the soup; it may
/// read `params` only during the call.
#[allow(non_camel_case_types)]
pub type medley_soup_eval =
    Option<unsafe extern "C" fn(params: *const f32, len: usize, user: *mut c_void) -> f32>;

#[allow(clippy::too_many_arguments)]
unsafe fn soup_run(
    greedy: bool,
    models: *const medley_merge_tensor,
    n_models: usize,
    dtype: u32,
    scores: *const f32,
    scores_len: usize,
    passes: usize,
    eval: medley_soup_eval,
    user: *mut c_void,
    selected: *mut u8,
    selected_len: usize,
    soup: *mut f32,
    soup_len: usize,
    report: *mut medley_soup_report,
) -> Result<(), Fail> {
    let eval = eval.ok_or(Fail::Null {
        arg: "eval",
        index: 0,
    })?;
    // SAFETY: the caller guarantees `models` holds n_models structs.
    let (list, k) = unsafe { tensor_list(models, n_models, "models") }?;
    let t = crate::args::dtype("dtype", dtype)?;
    let rsize = if report.is_null() {
        None
    } else {
        // SAFETY: non-null; the caller guarantees struct_size bytes.
        Some(unsafe { versioned_out_size(report, "report") }?)
    };
    let l = &list[..k];
    let r = with_type!(t, |T| {
        let mut regions = Regions::new();
        // SAFETY: the caller guarantees every buffer.
        let (ms, _) = unsafe {
            tensors::<T>(
                l.iter().map(|m| (m.data, m.data_len)),
                "models[].data",
                &mut regions,
            )
        }?;
        let sc = if greedy && !scores.is_null() {
            regions.read(Region::host(scores, scores_len, "scores", 0)?);
            // SAFETY: checked; readable (the caller).
            Some(unsafe { slice(scores, scores_len) })
        } else {
            Region::host(scores, scores_len, "scores", 0)?;
            None
        };
        regions.written(Region::host(selected.cast_const(), selected_len, "selected", 0)?);
        regions.written(Region::host(soup.cast_const(), soup_len, "soup", 0)?);
        if let Some(size) = rsize {
            regions.written(Region::host(report.cast::<u8>().cast_const(), size, "report", 0)?);
        }
        regions.check()?;
        // The core checks the models, the soup and the scores before it
        // calls the evaluator or writes; `selected` is a local there.
        if selected_len != k {
            return Err(medley_core::Error::LengthMismatch {
                arg: "selected",
                index: 0,
                expected: k,
                got: selected_len,
            }
            .into());
        }
        // SAFETY: registered and checked above.
        let (sel, out) = unsafe { (slice_mut(selected, selected_len), slice_mut(soup, soup_len)) };
        let mut chosen = [false; MAX_MODELS];
        let f = |s: &[f32]| {
            // SAFETY: the caller's evaluator, given a valid buffer.
            unsafe { eval(s.as_ptr(), s.len(), user) }
        };
        let r: SoupReport = if greedy {
            greedy_soup(&ms[..k], sc, f, &mut chosen[..k], out)?
        } else {
            pruned_soup(&ms[..k], passes, f, &mut chosen[..k], out)?
        };
        for (d, &c) in sel.iter_mut().zip(&chosen[..k]) {
            *d = c as u8;
        }
        r
    });
    if let Some(size) = rsize {
        let v = medley_soup_report {
            struct_size: size,
            ingredients: r.ingredients,
            evaluations: r.evaluations,
            score: r.score,
        };
        // SAFETY: checked by versioned_out_size; writable (the caller).
        unsafe { write_versioned(report, size, &v) };
    }
    Ok(())
}

/// Greedy soup (Wortsman et al. 2022): ranks the models by their own
/// held-out score (descending, ties to the lower index, NaN last), starts
/// from the best and adds each next one only if the score of the uniform
/// soup with it does not drop. On return `selected[i]` is 1 for the models
/// in the soup (else 0), `soup` holds their uniform average (`float`) and
/// `*report` (optional, `medley_soup_report_init` first) what was done.
///
/// - `models`, `n_models`: 1 to 64 tensors of `soup_len` elements of
///   `dtype`.
/// - `scores`, `scores_len`: the models' own scores, one per model; null
///   (with 0) to have `eval` compute them (each model copied into `soup`).
/// - `eval`, `user`: the evaluator (required), called with the candidate
///   soup in `soup`.
/// - `selected`, `selected_len`: `n_models` bytes.
/// - `soup`, `soup_len`: the soup, `float`.
///
/// Every argument is checked before `eval` is called or anything is
/// written: on failure `selected`, `soup` and `report` are untouched.
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT` (also a null
/// `eval`), `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_STRUCT_SIZE` (`report`),
/// `MEDLEY_STATUS_BAD_SHAPE` (no or too many models, lengths) or
/// `MEDLEY_STATUS_BAD_PARAMETER` (`dtype`).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it;
/// `eval` must be safe to call with any buffer and `user`; no buffer may
/// be modified by another thread (or by `eval`) during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_greedy_soup(
    models: *const medley_merge_tensor,
    n_models: usize,
    dtype: u32,
    scores: *const f32,
    scores_len: usize,
    eval: medley_soup_eval,
    user: *mut c_void,
    selected: *mut u8,
    selected_len: usize,
    soup: *mut f32,
    soup_len: usize,
    report: *mut medley_soup_report,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller's guarantees are soup_run's.
        unsafe {
            soup_run(
                true,
                models,
                n_models,
                dtype,
                scores,
                scores_len,
                0,
                eval,
                user,
                selected,
                selected_len,
                soup,
                soup_len,
                report,
            )
        }
    })
}

/// Pruned soup: starts from the uniform soup of all models; in each of up
/// to `passes` passes visits the remaining ones in index order and removes
/// one whenever the score of the soup without it does not drop, never the
/// last one; stops after a pass that removes nothing. Outputs, arguments
/// and statuses as `medley_merge_greedy_soup` (no `scores`).
///
/// # Safety
/// As `medley_merge_greedy_soup`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_pruned_soup(
    models: *const medley_merge_tensor,
    n_models: usize,
    dtype: u32,
    passes: usize,
    eval: medley_soup_eval,
    user: *mut c_void,
    selected: *mut u8,
    selected_len: usize,
    soup: *mut f32,
    soup_len: usize,
    report: *mut medley_soup_report,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller's guarantees are soup_run's.
        unsafe {
            soup_run(
                false,
                models,
                n_models,
                dtype,
                core::ptr::null(),
                0,
                passes,
                eval,
                user,
                selected,
                selected_len,
                soup,
                soup_len,
                report,
            )
        }
    })
}

// ---------------------------------------------------------------------------
// The spherical family.

/// SLERP of two tensors (mergekit `slerp`, where `v0` is the base model):
/// normalizes each vector of norm above `eps`; `c = u0 . u1`; if
/// `|c| > dot_threshold` the lerp `(1 - t) v0 + t v1`, else with
/// `theta = acos c`: `sin((1 - t) theta) / sin theta * v0 + sin(t theta) /
/// sin theta * v1`. Norms and the dot product are accumulated in `double`;
/// the combination is `float`, rounded once to `out_dtype`.
///
/// - `v0`, `v0_len`, `v1`, `v1_len`: the tensors (`dtype`, equal lengths).
/// - `options`: required (`medley_slerp_options_init`).
/// - `out`, `out_len`: `v0_len` elements of `out_dtype`.
///
/// Checked before anything is written: on failure `out` is untouched.
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_STRUCT_SIZE`,
/// `MEDLEY_STATUS_BAD_SHAPE` (lengths) or `MEDLEY_STATUS_BAD_PARAMETER`
/// (`t` not finite, negative or non-finite thresholds, enum values).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it; no
/// buffer may be modified by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_slerp(
    v0: *const c_void,
    v0_len: usize,
    v1: *const c_void,
    v1_len: usize,
    dtype: u32,
    options: *const medley_slerp_options,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = slerp_options(&unsafe { versioned(options, "options") }?);
        let (t, o) = dtypes(dtype, out_dtype)?;
        with_types!(t, o, |T, O| {
            let mut regions = Regions::new();
            // SAFETY: the caller guarantees every buffer.
            let a = unsafe { input::<T>(v0, v0_len, "v0", &mut regions) }?;
            // SAFETY: as above.
            let b = unsafe { input::<T>(v1, v1_len, "v1", &mut regions) }?;
            out_region::<O>(out, out_len, "out", &mut regions)?;
            regions.check()?;
            // SAFETY: registered and checked above.
            let out = unsafe { output::<O>(out, out_len) };
            slerp(a, b, &opts, out)?;
        });
        Ok(())
    })
}

/// The `double` scratch elements `medley_merge_nuslerp` needs for a tensor
/// of `n` elements and these options (`3 * layout_len` for the `COLUMNS`
/// layout, else 0), into `*scratch_len`. Returns `MEDLEY_STATUS_OK` or the
/// option errors of `medley_merge_nuslerp`.
///
/// # Safety
/// `options` must hold one struct; `scratch_len` must point to a writable
/// `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_nuslerp_scratch_len(
    n: usize,
    options: *const medley_nuslerp_options,
    scratch_len: *mut usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = nuslerp_options(&unsafe { versioned(options, "options") }?)?;
        let out = req_out_ptr(scratch_len, "scratch_len")?;
        let len = Nuslerp::new(n, [1.0, 1.0], &opts)?.scratch_len();
        // SAFETY: non-null, aligned (req_out_ptr), writable (the caller).
        unsafe { out.write(len) };
        Ok(())
    })
}

/// NuSLERP (mergekit `nuslerp`) of two models, optionally on task vectors
/// over a base: `t = w1 / (w0 + w1)` (0.5 when the sum is below 1e-6); per
/// vector (`layout`: the whole tensor, each row, or each column) with
/// `u_i = v_i / max(|v_i|, 1e-7)` and `theta = acos(clamp(u0 . u1))`:
/// `sin((1 - t) theta) / sin theta * v0 + sin(t theta) / sin theta * v1`,
/// the lerp where `|sin theta| < eps`; with a base, `v_i = x_i - base` and
/// the base is added back.
///
/// - `models`: exactly 2 models (tensor and weight; `density` not read).
/// - `base`, `base_len`: null (with 0) for no base, else the base tensor.
/// - `options`: required (`medley_nuslerp_options_init`).
/// - `out`, `out_len`: the merged tensor (`out_dtype`).
/// - `scratch`, `scratch_len`: at least `medley_merge_nuslerp_scratch_len`
///   `double`s (null with 0 when none is needed).
///
/// Checked before anything is written: on failure `out` is untouched.
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_STRUCT_SIZE`,
/// `MEDLEY_STATUS_BAD_SHAPE` (not 2 models, lengths, scratch) or
/// `MEDLEY_STATUS_BAD_PARAMETER` (weights, `eps`, `layout_len`, enums).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it; no
/// buffer may be modified by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_nuslerp(
    models: *const medley_merge_model,
    n_models: usize,
    base: *const c_void,
    base_len: usize,
    dtype: u32,
    options: *const medley_nuslerp_options,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
    scratch: *mut f64,
    scratch_len: usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = nuslerp_options(&unsafe { versioned(options, "options") }?)?;
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { model_list(models, n_models) }?;
        if k != 2 {
            return Err(medley_core::Error::LengthMismatch {
                arg: "models.count",
                index: 0,
                expected: 2,
                got: k,
            }
            .into());
        }
        let (t, o) = dtypes(dtype, out_dtype)?;
        let l = &list[..2];
        with_types!(t, o, |T, O| {
            let mut regions = Regions::new();
            // SAFETY: the caller guarantees every buffer.
            let (ms, _) = unsafe {
                tensors::<T>(
                    l.iter().map(|m| (m.data, m.data_len)),
                    "models[].data",
                    &mut regions,
                )
            }?;
            // SAFETY: as above.
            let b = unsafe { opt_input::<T>(base, base_len, "base", &mut regions) }?;
            out_region::<O>(out, out_len, "out", &mut regions)?;
            regions.written(Region::host(scratch.cast_const(), scratch_len, "scratch", 0)?);
            regions.check()?;
            // SAFETY: registered and checked above.
            let (out, s) = unsafe { (output::<O>(out, out_len), slice_mut(scratch, scratch_len)) };
            nuslerp(ms[0], ms[1], b, [l[0].weight, l[1].weight], &opts, s, out)?;
        });
        Ok(())
    })
}

/// Multi-SLERP (mergekit `multislerp`) of 1 to 64 models, optionally on
/// task vectors over a base: `out = m * sum_i a_i |v_i|` with
/// `m = normalize(sum_i a_i v_i / (|v_i| + eps))` and `a_i` the weights
/// (divided by their sum with `normalize_weights`); `v_i = x_i - base` and
/// the base added back when a base is given.
///
/// - `models`, `n_models`: tensors of `out_len` elements and weights.
/// - `base`, `base_len`: null (with 0) for no base.
/// - `options`: required (`medley_multislerp_options_init`).
///
/// Checked before anything is written: on failure `out` is untouched.
/// Returns the statuses of `medley_merge_linear`, plus
/// `MEDLEY_STATUS_STRUCT_SIZE` and `MEDLEY_STATUS_BAD_PARAMETER` for `eps`
/// and for a degenerate mean direction of more than 2 models.
///
/// # Safety
/// As `medley_merge_linear`; `options` valid for one struct.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_multislerp(
    models: *const medley_merge_model,
    n_models: usize,
    base: *const c_void,
    base_len: usize,
    dtype: u32,
    options: *const medley_multislerp_options,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = multislerp_options(&unsafe { versioned(options, "options") }?);
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { model_list(models, n_models) }?;
        let (t, o) = dtypes(dtype, out_dtype)?;
        let l = &list[..k];
        let w = weights_of(l);
        with_types!(t, o, |T, O| {
            let mut regions = Regions::new();
            // SAFETY: the caller guarantees every buffer.
            let (ms, _) = unsafe {
                tensors::<T>(
                    l.iter().map(|m| (m.data, m.data_len)),
                    "models[].data",
                    &mut regions,
                )
            }?;
            // SAFETY: as above.
            let b = unsafe { opt_input::<T>(base, base_len, "base", &mut regions) }?;
            out_region::<O>(out, out_len, "out", &mut regions)?;
            regions.check()?;
            // SAFETY: registered and checked above.
            let out = unsafe { output::<O>(out, out_len) };
            multislerp(&ms[..k], b, &w[..k], &opts, out)?;
        });
        Ok(())
    })
}

/// Karcher (Riemannian) mean on the sphere (mergekit `karcher`, which lists
/// the base as one more model with equal weights): with `a_i = w_i / sum
/// w`, norms `|x_i|` and units `u_i`, iterates the fixed point from the
/// normalized weighted mean of the units (at most `max_iter` times, until
/// the tangent step is below `tol`); `out = (sum_i a_i |x_i|) u`. One pass
/// of `double` Gram statistics; iterations in `double`.
///
/// - `models`, `n_models`: 1 to 64 tensors of `out_len` elements and
///   weights (non-negative).
/// - `options`: required (`medley_karcher_options_init`).
///
/// Checked before anything is written: on failure `out` is untouched.
/// Returns the statuses of `medley_merge_linear`, plus
/// `MEDLEY_STATUS_STRUCT_SIZE` and `MEDLEY_STATUS_BAD_PARAMETER` (negative
/// weights, `tol`).
///
/// # Safety
/// As `medley_merge_linear`; `options` valid for one struct.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_karcher(
    models: *const medley_merge_model,
    n_models: usize,
    dtype: u32,
    options: *const medley_karcher_options,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = karcher_options(&unsafe { versioned(options, "options") }?);
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { model_list(models, n_models) }?;
        let (t, o) = dtypes(dtype, out_dtype)?;
        let l = &list[..k];
        let w = weights_of(l);
        with_types!(t, o, |T, O| {
            let mut regions = Regions::new();
            // SAFETY: the caller guarantees every buffer.
            let (ms, _) = unsafe {
                tensors::<T>(
                    l.iter().map(|m| (m.data, m.data_len)),
                    "models[].data",
                    &mut regions,
                )
            }?;
            out_region::<O>(out, out_len, "out", &mut regions)?;
            regions.check()?;
            // SAFETY: registered and checked above.
            let out = unsafe { output::<O>(out, out_len) };
            karcher(&ms[..k], &w[..k], &opts, out)?;
        });
        Ok(())
    })
}

// ---------------------------------------------------------------------------
// Model Stock and SCE.

/// Model Stock (Jang et al. 2024; mergekit `model_stock`) of 2 to 64
/// fine-tuned models over their base: with the task vectors
/// `delta_i = x_i - base` and `cos` the mean pairwise cosine of their
/// angles, `t = M cos / (1 + (M - 1) cos)` and
/// `out = t * mean_i x_i + (1 - t) * base`, one `t` per tensor or per row
/// (`row_len`).
///
/// - `models`, `n_models`: tensors of `base_len` elements of `dtype`.
/// - `base`, `base_len`: the base tensor.
/// - `options`: required (`medley_stock_options_init`).
/// - `out`, `out_len`: `base_len` elements of `out_dtype`.
///
/// Checked before anything is written: on failure `out` is untouched.
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_STRUCT_SIZE`,
/// `MEDLEY_STATUS_BAD_SHAPE` (lengths, too many models),
/// `MEDLEY_STATUS_BAD_PARAMETER` (`row_len` not dividing the length,
/// enums) or `MEDLEY_STATUS_UNSUPPORTED` (fewer than 2 models).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it; no
/// buffer may be modified by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_model_stock(
    models: *const medley_merge_tensor,
    n_models: usize,
    base: *const c_void,
    base_len: usize,
    dtype: u32,
    options: *const medley_stock_options,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = stock_options(&unsafe { versioned(options, "options") }?);
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { tensor_list(models, n_models, "models") }?;
        let (t, o) = dtypes(dtype, out_dtype)?;
        let l = &list[..k];
        with_types!(t, o, |T, O| {
            let mut regions = Regions::new();
            // SAFETY: the caller guarantees every buffer.
            let (ms, _) = unsafe {
                tensors::<T>(
                    l.iter().map(|m| (m.data, m.data_len)),
                    "models[].data",
                    &mut regions,
                )
            }?;
            // SAFETY: as above.
            let b = unsafe { input::<T>(base, base_len, "base", &mut regions) }?;
            out_region::<O>(out, out_len, "out", &mut regions)?;
            regions.check()?;
            // SAFETY: registered and checked above.
            let out = unsafe { output::<O>(out, out_len) };
            model_stock(&ms[..k], b, &opts, out)?;
        });
        Ok(())
    })
}

/// The `u32` scratch elements `medley_merge_sce` (and a streamed SCE) needs
/// for `n_models` models over tensors of `n` elements, into
/// `*scratch_len`. Returns `MEDLEY_STATUS_OK` or the parameter errors of
/// `medley_merge_sce`.
///
/// # Safety
/// `options` must hold one struct; `scratch_len` must point to a writable
/// `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_sce_scratch_len(
    n_models: usize,
    n: usize,
    options: *const medley_sce_options,
    scratch_len: *mut usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = sce_options(&unsafe { versioned(options, "options") }?);
        let out = req_out_ptr(scratch_len, "scratch_len")?;
        let len = Sce::new(n, n_models, &opts)?.scratch_len();
        // SAFETY: non-null, aligned (req_out_ptr), writable (the caller).
        unsafe { out.write(len) };
        Ok(())
    })
}

/// SCE (mergekit `sce`: select, calculate, erase) of 1 to 64 models over
/// their base: keeps the `select_topk` fraction of the elements of highest
/// variance across the task vectors, weights each model by its share of
/// the squared task-vector mass (over the selection), elects a sign per
/// element by the total mass and averages the agreeing weighted task
/// vectors: `out = base + merged`.
///
/// - `models`, `n_models`: tensors of `base_len` elements of `dtype`.
/// - `base`, `base_len`: the base tensor.
/// - `options`: required (`medley_sce_options_init`).
/// - `out`, `out_len`: `base_len` elements of `out_dtype`.
/// - `scratch`, `scratch_len`: at least `medley_merge_sce_scratch_len`
///   `uint32_t` elements (null with 0 when none is needed).
///
/// Checked before anything is written: on failure `out` is untouched.
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_STRUCT_SIZE`,
/// `MEDLEY_STATUS_BAD_SHAPE` (lengths, models, scratch) or
/// `MEDLEY_STATUS_BAD_PARAMETER` (`select_topk` outside `(0, 1]`, enums).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it; no
/// buffer may be modified by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_sce(
    models: *const medley_merge_tensor,
    n_models: usize,
    base: *const c_void,
    base_len: usize,
    dtype: u32,
    options: *const medley_sce_options,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
    scratch: *mut u32,
    scratch_len: usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = sce_options(&unsafe { versioned(options, "options") }?);
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { tensor_list(models, n_models, "models") }?;
        let (t, o) = dtypes(dtype, out_dtype)?;
        let l = &list[..k];
        with_types!(t, o, |T, O| {
            let mut regions = Regions::new();
            // SAFETY: the caller guarantees every buffer.
            let (ms, _) = unsafe {
                tensors::<T>(
                    l.iter().map(|m| (m.data, m.data_len)),
                    "models[].data",
                    &mut regions,
                )
            }?;
            // SAFETY: as above.
            let b = unsafe { input::<T>(base, base_len, "base", &mut regions) }?;
            out_region::<O>(out, out_len, "out", &mut regions)?;
            regions.written(Region::host(scratch.cast_const(), scratch_len, "scratch", 0)?);
            regions.check()?;
            // SAFETY: registered and checked above.
            let (out, s) = unsafe { (output::<O>(out, out_len), slice_mut(scratch, scratch_len)) };
            sce(&ms[..k], b, &opts, s, out)?;
        });
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gta_presets_round_trip() {
        for g in [
            GtaOptions::task_arithmetic(),
            GtaOptions::ties(),
            GtaOptions::ties_paper(),
            GtaOptions::dare_ties(0, 0),
            GtaOptions::dare_linear(0, 0),
            GtaOptions::breadcrumbs(),
            GtaOptions::breadcrumbs_ties(),
            GtaOptions::della(None, 0, 0),
            GtaOptions::della_linear(None, 0, 0),
        ] {
            assert_eq!(gta_options(&gta_to_c(&g)).unwrap(), g);
        }
        assert_eq!(gta_options(&GTA_FALLBACK).unwrap(), GtaOptions::task_arithmetic());
    }

    #[test]
    fn defaults_are_the_cores() {
        assert_eq!(
            slerp_options(&medley_slerp_options::DEFAULT),
            SlerpOptions::new(0.5)
        );
        assert_eq!(
            nuslerp_options(&medley_nuslerp_options::DEFAULT).unwrap(),
            NuslerpOptions::new()
        );
        assert_eq!(
            multislerp_options(&medley_multislerp_options::DEFAULT),
            MultislerpOptions::new()
        );
        assert_eq!(
            karcher_options(&medley_karcher_options::DEFAULT),
            KarcherOptions::new()
        );
        assert_eq!(
            stock_options(&medley_stock_options::DEFAULT),
            StockOptions::default()
        );
        assert_eq!(sce_options(&medley_sce_options::DEFAULT), SceOptions::new());
    }
}
