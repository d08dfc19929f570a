//! TIES weight merging (trim, elect sign, disjoint merge) of one tensor over
//! host memory: `medley_merge_ties` and its scratch-size query.

use crate::args::{Region, Regions, Versioned, init_versioned, req_out_ptr, slice, slice_mut, versioned};
use crate::cpu::copy_list;
use crate::status::{Fail, medley_status};
use core::ffi::c_void;
use medley_core::merge::MAX_MODELS;
use medley_core::merge::gta::{
    Consensus, Divisor, Gta, GtaOptions, Rescale, Sparsify, TaskParams, Votes, merge,
};
use medley_core::{DType, Element, bf16, f16};

/// What elects the sign of an element (`consensus` field of
/// `medley_ties_options`).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_ties_consensus {
    /// The sign of the total mass of the votes (TIES; mergekit `"sum"`).
    Sum = 0,
    /// The sign of the number of positive minus negative votes (mergekit
    /// `"count"`).
    Count = 1,
}

/// What votes in the sign election (`votes` field).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_ties_votes {
    /// The weighted trimmed task vectors `w_i delta_i` (mergekit).
    Weighted = 0,
    /// The unweighted trimmed task vectors `delta_i` (the TIES paper).
    Unweighted = 1,
}

/// The divisor of a normalized merge (`divisor` field).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_ties_divisor {
    /// The sum of the agreeing models' weights (mergekit).
    WeightSum = 0,
    /// The number of agreeing models: the paper's disjoint mean.
    Count = 1,
}

/// Options of a TIES merge. A versioned struct:
/// `medley_ties_options_init(&o, sizeof o)` fills in mergekit's `ties`,
/// `medley_ties_options_init_paper(&o, sizeof o)` the paper's variant.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_ties_options {
    /// `sizeof(medley_ties_options)` of the caller's header (set by the
    /// init functions).
    pub struct_size: usize,
    /// A `medley_ties_consensus` value.
    pub consensus: u32,
    /// A `medley_ties_votes` value.
    pub votes: u32,
    /// A `medley_ties_divisor` value.
    pub divisor: u32,
    /// Nonzero: divide the merged task vector by the divisor (mergekit's
    /// `normalize: true`).
    pub normalize: u32,
    /// Scale of the merged task vector (finite; mergekit's `lambda`).
    pub lambda: f32,
    /// 0: trim over the whole tensor (mergekit); else trim each row of
    /// this many elements separately (must divide the tensor length).
    pub row_len: usize,
}

/// One fine-tuned model's tensor and its merge parameters.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_merge_model {
    /// Host pointer to the tensor (`data_len` elements of the call's
    /// `dtype`, aligned for it); may be null only when `data_len` is 0.
    pub data: *const c_void,
    /// Elements at `data`: must equal the base's length.
    pub data_len: usize,
    /// Weight `w_i` (finite; may be negative).
    pub weight: f32,
    /// Fraction of the task vector kept by the trim, in `(0, 1]`: the
    /// `floor(density * n)` largest magnitudes of `x_i - base` (ties to the
    /// lower index).
    pub density: f64,
}

fn options(o: &medley_ties_options) -> Result<GtaOptions, Fail> {
    let consensus = match o.consensus {
        0 => Consensus::Sum,
        1 => Consensus::Count,
        v => {
            return Err(Fail::BadEnum {
                arg: "options.consensus",
                value: v,
            });
        }
    };
    let votes = match o.votes {
        0 => Votes::Weighted,
        1 => Votes::Unweighted,
        v => {
            return Err(Fail::BadEnum {
                arg: "options.votes",
                value: v,
            });
        }
    };
    let divisor = match o.divisor {
        0 => Divisor::WeightSum,
        1 => Divisor::Count,
        v => {
            return Err(Fail::BadEnum {
                arg: "options.divisor",
                value: v,
            });
        }
    };
    Ok(GtaOptions {
        sparsify: Sparsify::Magnitude,
        row_len: (o.row_len != 0).then_some(o.row_len),
        consensus,
        votes,
        divisor,
        normalize: o.normalize != 0,
        rescale: Rescale::None,
        lambda: o.lambda,
        ..GtaOptions::ties()
    })
}

/// Size of the first `medley_ties_options` layout (ABI 1.0).
pub const MEDLEY_TIES_OPTIONS_SIZE_V1: usize = 40;

const _: () = assert!(size_of::<medley_ties_options>() == MEDLEY_TIES_OPTIONS_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; integers and floats only.
unsafe impl Versioned for medley_ties_options {
    const DEFAULT: Self = TIES_FALLBACK;
    const SIZES: &'static [usize] = &[MEDLEY_TIES_OPTIONS_SIZE_V1];
}

fn from_gta(g: &GtaOptions) -> medley_ties_options {
    medley_ties_options {
        struct_size: size_of::<medley_ties_options>(),
        consensus: match g.consensus {
            Consensus::Count => medley_ties_consensus::Count as u32,
            _ => medley_ties_consensus::Sum as u32,
        },
        votes: match g.votes {
            Votes::Weighted => medley_ties_votes::Weighted as u32,
            Votes::Unweighted => medley_ties_votes::Unweighted as u32,
        },
        divisor: match g.divisor {
            Divisor::WeightSum => medley_ties_divisor::WeightSum as u32,
            Divisor::Count => medley_ties_divisor::Count as u32,
        },
        normalize: g.normalize as u32,
        lambda: g.lambda,
        row_len: 0,
    }
}

/// Fills `*options` with mergekit's `ties` (weighted votes, sum
/// consensus, weight-sum divisor, normalized, `lambda = 1`, trim over the
/// whole tensor) and sets its `struct_size` to `struct_size` (pass
/// `sizeof *options`). Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED` or
/// `MEDLEY_STATUS_STRUCT_SIZE`.
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_ties_options_init(
    options: *mut medley_ties_options,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(options, struct_size, "options") } })
}

/// mergekit's `ties` spelled out: the defaults of
/// `medley_ties_options_init` (checked against the core's preset in the
/// tests).
const TIES_FALLBACK: medley_ties_options = medley_ties_options {
    struct_size: size_of::<medley_ties_options>(),
    consensus: medley_ties_consensus::Sum as u32,
    votes: medley_ties_votes::Weighted as u32,
    divisor: medley_ties_divisor::WeightSum as u32,
    normalize: 1,
    lambda: 1.0,
    row_len: 0,
};

/// As `medley_ties_options_init`, with TIES as in the paper (Yadav et al.
/// 2023): unweighted votes and the disjoint mean over the agreeing models.
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_ties_options_init_paper(
    options: *mut medley_ties_options,
    struct_size: usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees struct_size writable bytes.
        unsafe { init_versioned(options, struct_size, "options") }?;
        let paper = from_gta(&GtaOptions::ties_paper());
        // SAFETY: init_versioned checked the pointer and the size, which
        // holds at least the first layout (every field of paper's).
        unsafe { crate::args::write_versioned(options, struct_size, &paper) };
        Ok(())
    })
}

const NO_MODEL: medley_merge_model = medley_merge_model {
    data: core::ptr::null(),
    data_len: 0,
    weight: 0.0,
    density: 1.0,
};

fn params(list: &[medley_merge_model]) -> [TaskParams; MAX_MODELS] {
    let mut p = [TaskParams::new(0.0); MAX_MODELS];
    for (d, m) in p.iter_mut().zip(list) {
        *d = TaskParams::new(m.weight).with_density(m.density);
    }
    p
}

/// The `u32` scratch elements `medley_merge_ties` needs for these models,
/// tensor length `n` and options, into `*scratch_len` (0 when none is
/// needed: then `scratch` may be null). About 8% of `n` for tensors of
/// 2^24 elements, 2048 below 2^20, per model that is trimmed.
///
/// Returns `MEDLEY_STATUS_OK` or the parameter errors of
/// `medley_merge_ties` (the tensors themselves are not read).
///
/// # Safety
/// `models` must hold `n_models` structs; `options` one struct;
/// `scratch_len` must point to a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_ties_scratch_len(
    models: *const medley_merge_model,
    n_models: usize,
    n: usize,
    options: *const medley_ties_options,
    scratch_len: *mut usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointers.
        let opts = self::options(&unsafe { versioned(options, "options") }?)?;
        let out = req_out_ptr(scratch_len, "scratch_len")?;
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { copy_list(models, n_models, MAX_MODELS, NO_MODEL, "models") }?;
        let p = params(&list[..k]);
        let len = Gta::new(n, &p[..k], &opts)?.scratch_len();
        // SAFETY: non-null, aligned (req_out_ptr), writable (the caller).
        unsafe { out.write(len) };
        Ok(())
    })
}

/// Typed, checked slices of one call, then the merge.
///
/// # Safety
/// As `medley_merge_ties`.
#[allow(clippy::too_many_arguments)]
unsafe fn run<T: Element, O: Element>(
    list: &[medley_merge_model],
    base: *const c_void,
    base_len: usize,
    opts: &GtaOptions,
    out: *mut c_void,
    out_len: usize,
    scratch: *mut u32,
    scratch_len: usize,
) -> Result<(), Fail> {
    let mut regions = Regions::new();
    let mut ms: [&[T]; MAX_MODELS] = [&[]; MAX_MODELS];
    for (i, (d, m)) in ms.iter_mut().zip(list).enumerate() {
        let p = m.data.cast::<T>();
        regions.read(Region::host(p, m.data_len, "models[].data", i)?);
        // SAFETY: checked by Region::host; readable for data_len elements
        // (the caller).
        *d = unsafe { slice(p, m.data_len) };
    }
    let bp = base.cast::<T>();
    regions.read(Region::host(bp, base_len, "base", 0)?);
    let op = out.cast::<O>();
    regions.written(Region::host(op.cast_const(), out_len, "out", 0)?);
    regions.written(Region::host(scratch.cast_const(), scratch_len, "scratch", 0)?);
    regions.check()?;
    // SAFETY: every buffer passed Region::host; out and scratch overlap
    // nothing else of the call (Regions::check); valid for their lengths
    // (the caller).
    let (b, o, s) = unsafe {
        (
            slice(bp, base_len),
            slice_mut(op, out_len),
            slice_mut(scratch, scratch_len),
        )
    };
    let p = params(list);
    merge(&ms[..list.len()], b, &p[..list.len()], opts, s, o)?;
    Ok(())
}

/// Merges one tensor of `n_models` fine-tuned models onto their base with
/// TIES (Yadav et al. 2023, with mergekit's semantics and defaults): each
/// task vector `delta_i = x_i - base` is trimmed to its `floor(density_i *
/// n)` largest magnitudes, a sign is elected per element from the (weighted)
/// trimmed vectors, and the agreeing contributions `w_i delta_i` are summed
/// and divided by the agreeing weights (or count); `out = base + lambda *
/// merged`, rounded once to `out_dtype`. Arithmetic is `float`, in
/// mergekit's order of operations.
///
/// - `models`, `n_models`: 1 to 64 models, each with `n = base_len`
///   elements of `dtype`, a weight and a density.
/// - `base`, `base_len`: the base model's tensor (`dtype`).
/// - `options`: required (`medley_ties_options_init`).
/// - `out`, `out_len`: `n` elements of `out_dtype` (any `medley_dtype`).
/// - `scratch`, `scratch_len`: at least `medley_merge_ties_scratch_len`
///   `uint32_t` elements (null with 0 when none is needed).
///
/// Checked before anything is written: on failure `out` is untouched.
/// Errors name the per-model lengths `models`, weights `params.weight`
/// and densities `params.density`. Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED`,
/// `MEDLEY_STATUS_OVERFLOW`, `MEDLEY_STATUS_OVERLAP`,
/// `MEDLEY_STATUS_BAD_SHAPE` (lengths, no or too many models, scratch too
/// short) or `MEDLEY_STATUS_BAD_PARAMETER` (weights, densities outside
/// `(0, 1]`, `lambda`, `row_len` not dividing `n`, enum values).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it
/// (`models` for `n_models` structs, `options` for one); no buffer may be
/// modified by another thread during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_ties(
    models: *const medley_merge_model,
    n_models: usize,
    base: *const c_void,
    base_len: usize,
    dtype: u32,
    options: *const medley_ties_options,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
    scratch: *mut u32,
    scratch_len: usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = self::options(&unsafe { versioned(options, "options") }?)?;
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { copy_list(models, n_models, MAX_MODELS, NO_MODEL, "models") }?;
        let t = crate::args::dtype("dtype", dtype)?;
        let o = crate::args::dtype("out_dtype", out_dtype)?;
        let l = &list[..k];
        macro_rules! go {
            ($t:ty, $o:ty) => {
                // SAFETY: the caller's guarantees are those of `run`.
                unsafe { run::<$t, $o>(l, base, base_len, &opts, out, out_len, scratch, scratch_len) }
            };
        }
        macro_rules! by_out {
            ($t:ty) => {
                match o {
                    DType::F32 => go!($t, f32),
                    DType::F16 => go!($t, f16),
                    DType::BF16 => go!($t, bf16),
                }
            };
        }
        match t {
            DType::F32 => by_out!(f32),
            DType::F16 => by_out!(f16),
            DType::BF16 => by_out!(bf16),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_round_trip() {
        for g in [GtaOptions::ties(), GtaOptions::ties_paper()] {
            assert_eq!(options(&from_gta(&g)).unwrap(), g);
        }
        assert_eq!(options(&TIES_FALLBACK).unwrap(), GtaOptions::ties());
        assert_eq!(
            from_gta(&GtaOptions::ties()).struct_size,
            TIES_FALLBACK.struct_size
        );
    }
}
