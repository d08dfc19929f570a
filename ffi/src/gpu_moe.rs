//! CUDA entry points of the MoE path on the caller's stream over the
//! caller's device memory: grouped gating (`medley_cuda_moe_grouped_topk`),
//! the block-padded plan (`medley_cuda_moe_align`), the gather into plan
//! order (`medley_cuda_moe_permute`), the expert GEMMs
//! (`medley_cuda_moe_gemm1`, `medley_cuda_moe_gemm2`), the k-way combine
//! (`medley_cuda_moe_combine`), the kernel choice
//! (`medley_cuda_moe_choose`) and the whole expert layer in one call
//! (`medley_cuda_moe_layer`, `medley_cuda_moe_layer_workspace_bytes`).
//!
//! Every function checks its host-side arguments (structs, buffer
//! descriptors, shapes, overlaps) before the engine handle, so a call with
//! bad arguments fails the same way with or without an engine; nothing is
//! enqueued on a failed call.

use crate::args::{
    Region, Regions, Versioned, at_most, dtype, get, init_versioned, req_out_ptr, stride_or, versioned,
    versioned_out_size, write_versioned,
};
use crate::gpu::{device_rows, medley_cuda_engine, medley_cuda_rows};
use crate::moe::{grouped_config, medley_moe_grouped_config, medley_moe_range};
use crate::status::{Fail, medley_status};
use core::ffi::c_void;
use half::{bf16, f16};
use medley_core::moe::ExpertRange;
use medley_core::moe::plan::block_padded_len;
use medley_core::{DType, Error};
use medley_cuda::experts::{
    DeviceActMut, DevicePlan, Epilogue, Gemm1, Gemm2, GemmDtype, GemmId, Generation, Layer, LayerChoice,
    LayerScratch, Tuning,
};
use medley_cuda::gating::{Gate, Gating, RouterLogits};
use medley_cuda::mem::{DeviceMatrix, DeviceRows, DeviceRowsMut, DeviceSlice, DeviceSliceMut, Stream};
use medley_cuda::routing::{Align, AlignOutput, Combine, DeviceMatrixMut, MAX_ALIGN_EXPERTS, Permute};
use medley_cuda::{CudaError, Launch};

/// Re-labels a medley-cuda shape error about a view with the view's name.
fn view_err(arg: &'static str) -> impl Fn(CudaError) -> Fail {
    move |e| match e {
        CudaError::Invalid(err) => Fail::At { arg, index: 0, err },
        other => other.into(),
    }
}

/// A checked writable device view of a `medley_cuda_rows`, registered as
/// written.
///
/// # Safety
/// `r.data` must be device memory of the engine's context holding
/// `r.data_len` elements, used by nothing else while the kernel may run.
unsafe fn device_rows_mut<'a>(
    r: &medley_cuda_rows,
    arg: &'static str,
    regions: &mut Regions,
) -> Result<DeviceMatrixMut<'a>, Fail> {
    let dt = dtype(arg, r.dtype)?;
    regions.written(Region::device(r.data, r.data_len, dt.size_bytes(), arg, 0)?);
    let stride = stride_or(r.stride, r.len);
    macro_rules! view {
        ($t:ty, $v:ident) => {{
            // SAFETY: the caller guarantees the memory; Region::device
            // checked that the byte range does not wrap.
            let s = unsafe { DeviceSliceMut::<$t>::from_raw(r.data, r.data_len) };
            DeviceMatrixMut::$v(DeviceRowsMut::new(s, r.rows, r.len, stride).map_err(view_err(arg))?)
        }};
    }
    Ok(match dt {
        DType::F32 => view!(f32, F32),
        DType::F16 => view!(f16, F16),
        DType::BF16 => view!(bf16, BF16),
    })
}

/// An `f32` output view (`Unsupported` for another dtype).
fn f32_out<'a>(m: DeviceMatrixMut<'a>, arg: &'static str) -> Result<DeviceRowsMut<'a, f32>, Fail> {
    match m {
        DeviceMatrixMut::F32(r) => Ok(r),
        _ => Err(Error::Unsupported {
            what: match arg {
                "y" => "a non-f32 y in a combine (the layer's y is f32)",
                _ => "a non-f32 output (this output is float)",
            },
        }
        .into()),
    }
}

/// `len` read-only elements of `T` at `p`.
///
/// # Safety
/// Device memory of the engine's context (the caller), checked by
/// `Region::device`.
unsafe fn ro<'a, T>(p: u64, len: usize) -> DeviceSlice<'a, T> {
    // SAFETY: see above.
    unsafe { DeviceSlice::from_raw(p, len) }
}

/// `len` writable elements of `T` at `p`.
///
/// # Safety
/// As [`ro`], and exclusive to the call (`Regions::check`).
unsafe fn rw<'a, T>(p: u64, len: usize) -> DeviceSliceMut<'a, T> {
    // SAFETY: see above.
    unsafe { DeviceSliceMut::from_raw(p, len) }
}

/// `medley_moe_grouped_topk` on the GPU: DeepSeek-V3 style group-limited,
/// bias-corrected top-k routing, enqueued on `stream` without waiting.
/// Ids and weights equal the CPU function's bit for bit. No report: NaN
/// rows have NaN weights, fully masked rows zero weights; the bias lives
/// in device memory, so a non-finite bias value makes its rows NaN rows
/// instead of an error. At most `MEDLEY_MOE_MAX_DEVICE_EXPERTS` experts.
///
/// - `logits`: host struct describing `T x E` router logits in device
///   memory (any `medley_dtype`).
/// - `config`: the routing parameters (host, required).
/// - `bias`, `bias_len`: device address of `E` `float` biases, or 0 and 0.
/// - `ids`, `weights`: device addresses of `T * k` `uint32_t` / `float`.
///
/// Checked before the launch; on failure nothing is enqueued. Returns the
/// statuses of `medley_moe_grouped_topk` (without the bias values) plus
/// `MEDLEY_STATUS_DRIVER`.
///
/// # Safety
/// `engine` must be a live handle; `stream` a valid stream of its context;
/// the device addresses device memory of that context holding the lengths
/// given, not used by other work while the kernel may run.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn medley_cuda_moe_grouped_topk(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    logits: *const medley_cuda_rows,
    config: *const medley_moe_grouped_config,
    bias: u64,
    bias_len: usize,
    ids: u64,
    ids_len: usize,
    weights: u64,
    weights_len: usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointers; copied at once.
        let r = *unsafe { get(logits, "logits") }?;
        // SAFETY: as above.
        let c = unsafe { versioned(config, "config") }?;
        let mut regions = Regions::new();
        // SAFETY: the caller guarantees the device memory.
        let x: RouterLogits<'_> = unsafe { device_rows(&r, "logits", 0, &mut regions) }?;
        regions.read(Region::device(bias, bias_len, 4, "bias", 0)?);
        regions.written(Region::device(ids, ids_len, 4, "ids", 0)?);
        regions.written(Region::device(weights, weights_len, 4, "weights", 0)?);
        regions.check()?;
        let cfg = grouped_config(&c, None)?;
        if r.len > 0 {
            cfg.validate(r.len)?;
        }
        // SAFETY: the caller guarantees a live handle.
        let e = unsafe { get(engine, "engine") }?;
        // SAFETY: checked by Region::device (the caller guarantees the
        // memory); the outputs overlap nothing else (Regions::check).
        let (b, i, w) = unsafe {
            (
                (bias != 0).then(|| ro::<f32>(bias, bias_len)),
                rw::<u32>(ids, ids_len),
                rw::<f32>(weights, weights_len),
            )
        };
        let gating = Gating::Grouped { config: cfg, bias: b };
        // SAFETY: the caller guarantees a valid stream of the engine's
        // context.
        let st = unsafe { Stream::from_raw(stream) };
        Gate::new(x, c.k, &gating, i, w).launch(&e.kernels, st)?;
        Ok(())
    })
}

/// Where `medley_cuda_moe_align` writes its plan (device addresses). A
/// versioned struct: start from `medley_cuda_moe_align_output_init(&o,
/// sizeof o)` (nothing set).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_cuda_moe_align_output {
    /// `sizeof(medley_cuda_moe_align_output)` of the caller's header.
    pub struct_size: usize,
    /// `uint32_t [sorted_ids_len]`: slot ids grouped by local expert,
    /// padded with `T * k` (required).
    pub sorted_ids: u64,
    /// Elements at `sorted_ids` (exactly the padded length of
    /// `medley_moe_block_padded_len`).
    pub sorted_ids_len: usize,
    /// `uint32_t [blocks]`: local expert of each block, `UINT32_MAX` past
    /// the end (required).
    pub block_experts: u64,
    /// Elements at `block_experts` (exactly `blocks`).
    pub block_experts_len: usize,
    /// One `uint32_t`: `num_tokens_post_padded` (required; the permute and
    /// the GEMMs read it on the device).
    pub total: u64,
    /// `uint64_t [L + 1]`: padded starts (0: not wanted).
    pub offsets: u64,
    /// Elements at `offsets` (exactly `L + 1` when given).
    pub offsets_len: usize,
    /// `uint32_t [T * k]`: position of each slot, `UINT32_MAX` for unplaced
    /// slots (0: not wanted; the combine needs it).
    pub inverse: u64,
    /// Elements at `inverse` (exactly `T * k` when given).
    pub inverse_len: usize,
}

/// Size of the first `medley_cuda_moe_align_output` layout (ABI 1.1).
pub const MEDLEY_CUDA_MOE_ALIGN_OUTPUT_SIZE_V1: usize = 80;
const _: () = assert!(size_of::<medley_cuda_moe_align_output>() == MEDLEY_CUDA_MOE_ALIGN_OUTPUT_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first, integer fields only.
unsafe impl Versioned for medley_cuda_moe_align_output {
    const DEFAULT: Self = medley_cuda_moe_align_output {
        struct_size: size_of::<medley_cuda_moe_align_output>(),
        sorted_ids: 0,
        sorted_ids_len: 0,
        block_experts: 0,
        block_experts_len: 0,
        total: 0,
        offsets: 0,
        offsets_len: 0,
        inverse: 0,
        inverse_len: 0,
    };
    const SIZES: &'static [usize] = &[MEDLEY_CUDA_MOE_ALIGN_OUTPUT_SIZE_V1];
}

/// Fills `*out` with nothing set and sets its `struct_size` to
/// `struct_size` (pass `sizeof *out`). Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED` or
/// `MEDLEY_STATUS_STRUCT_SIZE`.
///
/// # Safety
/// `out` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_moe_align_output_init(
    out: *mut medley_cuda_moe_align_output,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(out, struct_size, "out") } })
}

/// Checks an expert count and local range as the plans do; returns `L`.
fn check_range(experts: usize, range: medley_moe_range) -> Result<usize, Fail> {
    if experts == 0 {
        return Err(Error::Empty { arg: "experts" }.into());
    }
    if range.first > range.last || range.last as usize > experts {
        return Err(Error::OutOfRange {
            arg: "range",
            index: 0,
        }
        .into());
    }
    let l = ExpertRange::from(range).len();
    at_most("range", l, MAX_ALIGN_EXPERTS)?;
    Ok(l)
}

fn need_len(arg: &'static str, expected: usize, got: usize) -> Result<(), Fail> {
    if expected != got {
        return Err(Error::LengthMismatch {
            arg,
            index: 0,
            expected,
            got,
        }
        .into());
    }
    Ok(())
}

/// `medley_moe_align_block_size` on the GPU (one block, deterministic:
/// equal to the CPU's plan bit for bit), enqueued on `stream` without
/// waiting, so that the plan, the permute, the GEMMs and the combine can
/// be captured in one CUDA graph. Differences from the CPU function: the
/// ids in device memory cannot be checked before the launch, so an id
/// outside `range` (including one `>= experts`) is simply not placed, as
/// `UINT32_MAX` is; `offsets` is optional; at most 1024 local experts.
///
/// - `ids`, `ids_len`: device address of the `T * k` expert ids.
/// - `experts`, `range`, `block_m`: as for the CPU function.
/// - `out`: the device buffers (host struct, required).
///
/// Checked before the launch; on failure nothing is enqueued. Returns the
/// statuses of `medley_moe_align_block_size` plus `MEDLEY_STATUS_DRIVER`
/// and `MEDLEY_STATUS_DEVICE_UNSUPPORTED` (too little shared memory for
/// this many local experts).
///
/// # Safety
/// `engine` must be a live handle; `stream` a valid stream of its context;
/// the device addresses device memory of that context holding the lengths
/// given, not used by other work while the kernel may run.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn medley_cuda_moe_align(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    ids: u64,
    ids_len: usize,
    experts: usize,
    range: medley_moe_range,
    block_m: usize,
    out: *const medley_cuda_moe_align_output,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct; copied at once.
        let o = unsafe { versioned(out, "out") }?;
        let mut regions = Regions::new();
        regions.read(Region::device(ids, ids_len, 4, "ids", 0)?);
        regions.written(Region::device(
            o.sorted_ids,
            o.sorted_ids_len,
            4,
            "out.sorted_ids",
            0,
        )?);
        regions.written(Region::device(
            o.block_experts,
            o.block_experts_len,
            4,
            "out.block_experts",
            0,
        )?);
        regions.written(Region::device(o.total, 1, 4, "out.total", 0)?);
        if o.offsets != 0 {
            regions.written(Region::device(o.offsets, o.offsets_len, 8, "out.offsets", 0)?);
        }
        if o.inverse != 0 {
            regions.written(Region::device(o.inverse, o.inverse_len, 4, "out.inverse", 0)?);
        }
        regions.check()?;
        let l = check_range(experts, range)?;
        let (len, blocks) = block_padded_len(ids_len, l, block_m)?;
        need_len("out.sorted_ids", len, o.sorted_ids_len)?;
        need_len("out.block_experts", blocks, o.block_experts_len)?;
        if o.offsets != 0 {
            need_len("out.offsets", l + 1, o.offsets_len)?;
        }
        if o.inverse != 0 {
            need_len("out.inverse", ids_len, o.inverse_len)?;
        }
        // SAFETY: the caller guarantees a live handle.
        let e = unsafe { get(engine, "engine") }?;
        // SAFETY: every buffer passed Region::device and the written ones
        // Regions::check; device memory of the context (the caller).
        let (idv, ao) = unsafe {
            (
                ro::<u32>(ids, ids_len),
                AlignOutput {
                    sorted_ids: rw(o.sorted_ids, o.sorted_ids_len),
                    block_experts: rw(o.block_experts, o.block_experts_len),
                    total: rw(o.total, 1),
                    offsets: (o.offsets != 0).then(|| rw(o.offsets, o.offsets_len)),
                    inverse: (o.inverse != 0).then(|| rw(o.inverse, o.inverse_len)),
                },
            )
        };
        // SAFETY: the caller guarantees a valid stream of the context.
        let st = unsafe { Stream::from_raw(stream) };
        Align::new(idv, experts, range.into(), block_m, ao).launch(&e.kernels, st)?;
        Ok(())
    })
}

/// Gathers token rows into plan order on the GPU (enqueued on `stream`):
/// row `p` of `out` (`sorted_ids_len` rows of `H`) is row `sorted_ids[p] /
/// k` of `x` for `p < total[0]` and a real slot, zero for padding rows and
/// rows past `total`. `total` is read on the device (no synchronization).
///
/// - `x`: `T x H` token rows (device, any `medley_dtype`).
/// - `k`: experts per token (`>= 1`).
/// - `sorted_ids`, `sorted_ids_len`, `total`: the plan of
///   `medley_cuda_moe_align` (`total` one `uint32_t`).
/// - `out`: `sorted_ids_len x H` rows of `x`'s dtype (device, written).
///
/// Checked before the launch; on failure nothing is enqueued. Returns
/// `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_BAD_SHAPE`,
/// `MEDLEY_STATUS_BAD_PARAMETER` (`k` 0, dtype),
/// `MEDLEY_STATUS_UNSUPPORTED` (`x` and `out` of different dtypes) or
/// `MEDLEY_STATUS_DRIVER`.
///
/// # Safety
/// As `medley_cuda_moe_align`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn medley_cuda_moe_permute(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    x: *const medley_cuda_rows,
    k: usize,
    sorted_ids: u64,
    sorted_ids_len: usize,
    total: u64,
    out: *const medley_cuda_rows,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointers; copied at once.
        let (xr, or) = unsafe { (*get(x, "x")?, *get(out, "out")?) };
        let mut regions = Regions::new();
        // SAFETY: the caller guarantees the device memory.
        let xm = unsafe { device_rows(&xr, "x", 0, &mut regions) }?;
        regions.read(Region::device(sorted_ids, sorted_ids_len, 4, "sorted_ids", 0)?);
        regions.read(Region::device(total, 1, 4, "total", 0)?);
        // SAFETY: as above.
        let om = unsafe { device_rows_mut(&or, "out", &mut regions) }?;
        regions.check()?;
        if k == 0 {
            return Err(Error::OutOfRange { arg: "k", index: 0 }.into());
        }
        // SAFETY: the caller guarantees a live handle.
        let e = unsafe { get(engine, "engine") }?;
        // SAFETY: checked by Region::device; device memory (the caller).
        let (s, t) = unsafe { (ro::<u32>(sorted_ids, sorted_ids_len), ro::<u32>(total, 1)) };
        // SAFETY: the caller guarantees a valid stream of the context.
        let st = unsafe { Stream::from_raw(stream) };
        Permute::new(xm, k, s, t, om).launch(&e.kernels, st)?;
        Ok(())
    })
}

/// The block-padded plan as the expert GEMMs read it (device addresses): a
/// plain descriptor (never grows), filled from the buffers given to
/// `medley_cuda_moe_align`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_cuda_moe_plan {
    /// `uint32_t [sorted_ids_len]`: the plan's slot of each position.
    pub sorted_ids: u64,
    /// Elements at `sorted_ids` (a multiple of `block_m`).
    pub sorted_ids_len: usize,
    /// `uint32_t [sorted_ids_len / block_m]`: local expert of each block.
    pub block_experts: u64,
    /// Elements at `block_experts`.
    pub block_experts_len: usize,
    /// One `uint32_t`: `num_tokens_post_padded`.
    pub total: u64,
    /// The plan's block size (a multiple of the GEMM configuration's
    /// `bm`; `medley_cuda_moe_choose` gives one that suits both GEMMs).
    pub block_m: usize,
    /// `T * k`, the slots the plan was made of.
    pub slots: usize,
    /// Experts per token.
    pub k: usize,
}

/// A checked device plan, its buffers registered as read.
///
/// # Safety
/// The plan's addresses are device memory holding the lengths given.
unsafe fn device_plan<'a>(p: &medley_cuda_moe_plan, regions: &mut Regions) -> Result<DevicePlan<'a>, Fail> {
    regions.read(Region::device(
        p.sorted_ids,
        p.sorted_ids_len,
        4,
        "plan.sorted_ids",
        0,
    )?);
    regions.read(Region::device(
        p.block_experts,
        p.block_experts_len,
        4,
        "plan.block_experts",
        0,
    )?);
    regions.read(Region::device(p.total, 1, 4, "plan.total", 0)?);
    // SAFETY: checked by Region::device (the caller guarantees the memory).
    unsafe {
        Ok(DevicePlan {
            sorted_ids: ro(p.sorted_ids, p.sorted_ids_len),
            block_experts: ro(p.block_experts, p.block_experts_len),
            total: ro(p.total, 1),
            block_m: p.block_m,
            slots: p.slots,
            k: p.k,
        })
    }
}

/// The GEMM configuration of index `gemm`.
fn gemm_id(arg: &'static str, gemm: u32) -> Result<GemmId, Fail> {
    GemmId::from_index(gemm as usize).ok_or(Fail::BadEnum { arg, value: gemm })
}

/// GEMM1 of the experts with SwiGLU fused (enqueued on `stream`): for
/// every plan position `p` of a real slot, `out[p, n] = silu(g) * u` with
/// `g = x_row . w13[e][n]`, `u = x_row . w13[e][I + n]` (`e` the block's
/// local expert, `x_row` token `sorted_ids[p] / k` of `x`, or row `p` when
/// `x_in_plan_order` is nonzero, as `medley_cuda_moe_permute` writes it),
/// accumulated in `f32` by the tensor cores and rounded once to the
/// activation dtype. Rows of padding positions are not written; experts
/// with no slot cost nothing.
///
/// - `gemm`: a configuration index (`medley_cuda_moe_choose`'s `gemm1`): a
///   SwiGLU entry of the data's dtype whose `bm` divides `plan->block_m`.
/// - `x`: `T x H` (or `sorted_ids_len x H` in plan order; the wgmma
///   generation requires plan order), bf16 or f16, 16-byte aligned, `H`
///   and the row stride multiples of 8.
/// - `plan`: the plan (host struct of device addresses).
/// - `w13`: `L * 2I` dense rows of `H` (each expert's gate rows, then its
///   up rows), `x`'s dtype.
/// - `out`: `sorted_ids_len x I` of `x`'s dtype (written; `I` a multiple
///   of 8).
///
/// Checked before the launch; on failure nothing is enqueued. Returns
/// `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED` (16-byte alignment), `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_BAD_SHAPE` (lengths),
/// `MEDLEY_STATUS_BAD_PARAMETER` (`gemm`, sizes not multiples of 8,
/// dtypes, `block_m`), `MEDLEY_STATUS_UNSUPPORTED` (f32 data, a
/// configuration of the other epilogue), `MEDLEY_STATUS_DEVICE_UNSUPPORTED`
/// (a configuration this device did not load, gathering with wgmma) or
/// `MEDLEY_STATUS_DRIVER`.
///
/// # Safety
/// As `medley_cuda_moe_align`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn medley_cuda_moe_gemm1(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    gemm: u32,
    x: *const medley_cuda_rows,
    x_in_plan_order: u32,
    plan: *const medley_cuda_moe_plan,
    w13: *const medley_cuda_rows,
    out: *const medley_cuda_rows,
) -> medley_status {
    ffi_boundary!({
        let id = gemm_id("gemm", gemm)?;
        // SAFETY: the caller guarantees the struct pointers; copied at once.
        let (xr, pr, wr, or) = unsafe {
            (
                *get(x, "x")?,
                *get(plan, "plan")?,
                *get(w13, "w13")?,
                *get(out, "out")?,
            )
        };
        let mut regions = Regions::new();
        // SAFETY: the caller guarantees the device memory.
        let xm = unsafe { device_rows(&xr, "x", 0, &mut regions) }?;
        // SAFETY: as above.
        let dp = unsafe { device_plan(&pr, &mut regions) }?;
        // SAFETY: as above.
        let wm = unsafe { device_rows(&wr, "w13", 0, &mut regions) }?;
        // SAFETY: as above.
        let om = unsafe { device_rows_mut(&or, "out", &mut regions) }?;
        regions.check()?;
        let act = match om {
            DeviceMatrixMut::F16(r) => DeviceActMut::F16(r),
            DeviceMatrixMut::BF16(r) => DeviceActMut::BF16(r),
            DeviceMatrixMut::F32(_) => {
                return Err(Error::Unsupported {
                    what: "f32 activations in the expert GEMMs (bf16 or f16 only)",
                }
                .into());
            }
        };
        // SAFETY: the caller guarantees a live handle.
        let e = unsafe { get(engine, "engine") }?;
        // SAFETY: the caller guarantees a valid stream of the context.
        let st = unsafe { Stream::from_raw(stream) };
        let mut call = Gemm1::new(id, xm, &dp, wm, act);
        if x_in_plan_order != 0 {
            call = call.in_plan_order();
        }
        call.launch(&e.kernels, st)?;
        Ok(())
    })
}

/// GEMM2 of the experts with the routing weight (enqueued on `stream`):
/// for every plan position `p` of a real slot `s`, `out[p, h] =
/// weights[s] * (act[p] . w2[e][h])` as `float`. Rows of padding positions
/// are not written.
///
/// - `gemm`: a configuration index (`medley_cuda_moe_choose`'s `gemm2`): a
///   down entry of the data's dtype whose `bm` divides `plan->block_m`.
/// - `act`: `sorted_ids_len x I` in plan order (GEMM1's output).
/// - `plan`: the plan.
/// - `w2`: `L * H` dense rows of `I`, `act`'s dtype.
/// - `weights`, `weights_len`: device address of the `T * k` routing
///   weights (`float`; `weights_len` = `plan->slots`).
/// - `out`: `sorted_ids_len x H` `float` (written; the row stride even).
///
/// Checked before the launch; on failure nothing is enqueued. Returns the
/// statuses of `medley_cuda_moe_gemm1`.
///
/// # Safety
/// As `medley_cuda_moe_align`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn medley_cuda_moe_gemm2(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    gemm: u32,
    act: *const medley_cuda_rows,
    plan: *const medley_cuda_moe_plan,
    w2: *const medley_cuda_rows,
    weights: u64,
    weights_len: usize,
    out: *const medley_cuda_rows,
) -> medley_status {
    ffi_boundary!({
        let id = gemm_id("gemm", gemm)?;
        // SAFETY: the caller guarantees the struct pointers; copied at once.
        let (ar, pr, wr, or) = unsafe {
            (
                *get(act, "act")?,
                *get(plan, "plan")?,
                *get(w2, "w2")?,
                *get(out, "out")?,
            )
        };
        let mut regions = Regions::new();
        // SAFETY: the caller guarantees the device memory.
        let am = unsafe { device_rows(&ar, "act", 0, &mut regions) }?;
        // SAFETY: as above.
        let dp = unsafe { device_plan(&pr, &mut regions) }?;
        // SAFETY: as above.
        let wm = unsafe { device_rows(&wr, "w2", 0, &mut regions) }?;
        regions.read(Region::device(weights, weights_len, 4, "weights", 0)?);
        // SAFETY: as above.
        let om = unsafe { device_rows_mut(&or, "out", &mut regions) }?;
        regions.check()?;
        let o = f32_out(om, "out")?;
        // SAFETY: the caller guarantees a live handle.
        let e = unsafe { get(engine, "engine") }?;
        // SAFETY: checked by Region::device; device memory (the caller).
        let wv = unsafe { ro::<f32>(weights, weights_len) };
        // SAFETY: the caller guarantees a valid stream of the context.
        let st = unsafe { Stream::from_raw(stream) };
        Gemm2::new(id, am, &dp, wm, wv, o).launch(&e.kernels, st)?;
        Ok(())
    })
}

/// The weighted k-way combine back to token order (enqueued on `stream`):
/// `out[t, h] = sum_j weights[t*k + j] * y[inverse[t*k + j], h]`, the
/// terms added in `j` order in `float` (deterministic, batch-invariant),
/// skipping unplaced slots (`UINT32_MAX`) and zero weights; a token with
/// no term gets a zero row; a NaN weight makes its row NaN; a position at
/// or past `y`'s rows (a plan that does not belong to `y`) makes that
/// token's row NaN instead of reading out of bounds. With `prescaled`
/// nonzero the rows of `y` already hold `weights * y` (as
/// `medley_cuda_moe_gemm2` writes them) and are only summed.
///
/// - `y`: one row of `H` per plan position (device, any `medley_dtype`).
/// - `k`: experts per token, 1 to 32.
/// - `inverse`, `weights`: device addresses of the `T * k` plan inverse
///   (`uint32_t`) and routing weights (`float`).
/// - `out`: `T x H` `float` (written).
///
/// Checked before the launch; on failure nothing is enqueued. Returns
/// `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_BAD_SHAPE`,
/// `MEDLEY_STATUS_BAD_PARAMETER` (`k` 0, dtype),
/// `MEDLEY_STATUS_UNSUPPORTED` (a non-float `out`) or
/// `MEDLEY_STATUS_DRIVER`.
///
/// # Safety
/// As `medley_cuda_moe_align`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn medley_cuda_moe_combine(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    y: *const medley_cuda_rows,
    k: usize,
    inverse: u64,
    inverse_len: usize,
    weights: u64,
    weights_len: usize,
    prescaled: u32,
    out: *const medley_cuda_rows,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointers; copied at once.
        let (yr, or) = unsafe { (*get(y, "y")?, *get(out, "out")?) };
        let mut regions = Regions::new();
        // SAFETY: the caller guarantees the device memory.
        let ym = unsafe { device_rows(&yr, "y", 0, &mut regions) }?;
        regions.read(Region::device(inverse, inverse_len, 4, "inverse", 0)?);
        regions.read(Region::device(weights, weights_len, 4, "weights", 0)?);
        // SAFETY: as above.
        let om = unsafe { device_rows_mut(&or, "out", &mut regions) }?;
        regions.check()?;
        let o = f32_out(om, "out")?;
        if k == 0 {
            return Err(Error::OutOfRange { arg: "k", index: 0 }.into());
        }
        at_most("k", k, 32)?;
        // SAFETY: the caller guarantees a live handle.
        let e = unsafe { get(engine, "engine") }?;
        // SAFETY: checked by Region::device; device memory (the caller).
        let (iv, wv) = unsafe { (ro::<u32>(inverse, inverse_len), ro::<f32>(weights, weights_len)) };
        // SAFETY: the caller guarantees a valid stream of the context.
        let st = unsafe { Stream::from_raw(stream) };
        let mut call = Combine::new(ym, k, iv, wv, o);
        if prescaled != 0 {
            call = call.prescaled();
        }
        call.launch(&e.kernels, st)?;
        Ok(())
    })
}

/// Which generation of expert-GEMM kernels `medley_cuda_moe_choose` may
/// pick.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_cuda_moe_generation {
    /// Any loaded one (the fastest the tuning table knows).
    Any = 0,
    /// `mma.sync` kernels (compute capability 8.0 and later).
    Mma = 1,
    /// `wgmma` + TMA kernels (compute capability 9.0: H100, H200).
    Wgmma = 2,
}

/// The expert-GEMM configurations of one layer shape and the plan block
/// size they need, from `medley_cuda_moe_choose`; the input of
/// `medley_cuda_moe_layer`. A versioned struct: start from
/// `medley_cuda_moe_choice_init(&c, sizeof c)`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct medley_cuda_moe_choice {
    /// `sizeof(medley_cuda_moe_choice)` of the caller's header.
    pub struct_size: usize,
    /// GEMM1's configuration (the `gemm` of `medley_cuda_moe_gemm1`).
    pub gemm1: u32,
    /// GEMM2's configuration (the `gemm` of `medley_cuda_moe_gemm2`).
    pub gemm2: u32,
    /// The plan's `block_m` (a multiple of both configurations' `bm`).
    pub block_m: usize,
    /// GEMM1's generation, a `medley_cuda_moe_generation` value (wgmma:
    /// GEMM1 needs `x` permuted into plan order first). Informative: the
    /// layer ignores it.
    pub generation1: u32,
    /// GEMM2's generation (informative).
    pub generation2: u32,
}

/// Size of the first `medley_cuda_moe_choice` layout (ABI 1.1).
pub const MEDLEY_CUDA_MOE_CHOICE_SIZE_V1: usize = 32;
const _: () = assert!(size_of::<medley_cuda_moe_choice>() == MEDLEY_CUDA_MOE_CHOICE_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first, integer fields only.
unsafe impl Versioned for medley_cuda_moe_choice {
    const DEFAULT: Self = medley_cuda_moe_choice {
        struct_size: size_of::<medley_cuda_moe_choice>(),
        gemm1: 0,
        gemm2: 0,
        block_m: 0,
        generation1: 0,
        generation2: 0,
    };
    const SIZES: &'static [usize] = &[MEDLEY_CUDA_MOE_CHOICE_SIZE_V1];
}

/// Fills `*choice` with zeros (no choice made) and sets its `struct_size`
/// to `struct_size` (pass `sizeof *choice`). Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED` or
/// `MEDLEY_STATUS_STRUCT_SIZE`.
///
/// # Safety
/// `choice` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_moe_choice_init(
    choice: *mut medley_cuda_moe_choice,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(choice, struct_size, "choice") } })
}

fn gemm_dtype(arg: &'static str, v: u32) -> Result<GemmDtype, Fail> {
    match dtype(arg, v)? {
        DType::BF16 => Ok(GemmDtype::BF16),
        DType::F16 => Ok(GemmDtype::F16),
        DType::F32 => Err(Error::Unsupported {
            what: "f32 data in the expert GEMMs (bf16 or f16 only)",
        }
        .into()),
    }
}

fn generation_code(g: Generation) -> u32 {
    match g {
        Generation::Mma => medley_cuda_moe_generation::Mma as u32,
        Generation::Wgmma => medley_cuda_moe_generation::Wgmma as u32,
    }
}

/// Picks the expert GEMMs of a layer for `slots = T * k` slots over
/// `local_experts` experts of `dtype` (bf16 or f16) on the engine's device:
/// the fastest loaded configurations of the tuning table (the file
/// `MEDLEY_GEMM_TUNING` names, else the built-in table of the device's name
/// or GPU model, falling back to the H100 table), restricted
/// to one `generation` when it is not `MEDLEY_CUDA_MOE_GENERATION_ANY`, and
/// the plan `block_m` both need. Writes `*choice` (its `struct_size` set
/// by `medley_cuda_moe_choice_init`); on failure it is untouched.
///
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_STRUCT_SIZE`,
/// `MEDLEY_STATUS_BAD_PARAMETER` (`dtype`, `generation`),
/// `MEDLEY_STATUS_UNSUPPORTED` (f32, an unreadable `MEDLEY_GEMM_TUNING`)
/// or `MEDLEY_STATUS_DEVICE_UNSUPPORTED` (no configuration of that
/// generation loaded on this device: wgmma needs compute capability 9.0).
///
/// # Safety
/// `engine` must be a live handle; `choice` writable for its
/// `struct_size`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_moe_choose(
    engine: *const medley_cuda_engine,
    dtype: u32,
    slots: usize,
    local_experts: usize,
    generation: u32,
    choice: *mut medley_cuda_moe_choice,
) -> medley_status {
    ffi_boundary!({
        let p = req_out_ptr(choice, "choice")?;
        // SAFETY: non-null; the caller guarantees struct_size bytes.
        let size = unsafe { versioned_out_size(p, "choice") }?;
        let dt = gemm_dtype("dtype", dtype)?;
        let g = match generation {
            0 => None,
            1 => Some(Generation::Mma),
            2 => Some(Generation::Wgmma),
            v => {
                return Err(Fail::BadEnum {
                    arg: "generation",
                    value: v,
                });
            }
        };
        // SAFETY: the caller guarantees a live handle.
        let e = unsafe { get(engine, "engine") }?;
        let tuning = Tuning::for_kernels(&e.kernels).map_err(|_| {
            Fail::from(Error::Unsupported {
                what: "the tuning table MEDLEY_GEMM_TUNING names cannot be read or parsed",
            })
        })?;
        // The table (and its default) may name no configuration of a forced
        // generation for this bucket (the built-in table picks mma for
        // small batches): then the loaded configuration of that generation
        // with the smallest bm, so a forced generation runs wherever it is
        // loaded.
        let c = LayerChoice::pick(&tuning, &e.kernels, dt, slots, local_experts, g)
            .or_else(|| {
                let want = g?;
                let find = |epi: Epilogue| {
                    GemmId::all()
                        .filter(|&id| {
                            let c = id.config();
                            c.generation == want
                                && c.epilogue == epi
                                && c.dtype == dt
                                && e.kernels.gemm_info(id).is_some()
                        })
                        .min_by_key(|id| id.config().bm)
                };
                let (g1, g2) = (find(Epilogue::SwiGlu)?, find(Epilogue::Down)?);
                Some(LayerChoice {
                    gemm1: g1,
                    gemm2: g2,
                    block_m: g1.config().bm.max(g2.config().bm) as usize,
                })
            })
            .ok_or(Fail::Cuda(CudaError::Unsupported {
                what: "no expert GEMM of this dtype and generation is loaded on this device (wgmma needs \
                       compute capability 9.0 and the EXPERTS module)",
            }))?;
        let v = medley_cuda_moe_choice {
            struct_size: size,
            gemm1: c.gemm1.index() as u32,
            gemm2: c.gemm2.index() as u32,
            block_m: c.block_m,
            generation1: generation_code(c.gemm1.config().generation),
            generation2: generation_code(c.gemm2.config().generation),
        };
        // SAFETY: checked by versioned_out_size; writable (the caller).
        unsafe { write_versioned(p, size, &v) };
        Ok(())
    })
}

/// A checked layer choice (the configurations' epilogues and `block_m`).
fn layer_choice(c: &medley_cuda_moe_choice) -> Result<LayerChoice, Fail> {
    let g1 = gemm_id("choice.gemm1", c.gemm1)?;
    let g2 = gemm_id("choice.gemm2", c.gemm2)?;
    if g1.config().epilogue != Epilogue::SwiGlu || g2.config().epilogue != Epilogue::Down {
        return Err(Error::Unsupported {
            what: "choice.gemm1 must be a SwiGLU configuration and choice.gemm2 a down one",
        }
        .into());
    }
    if g1.config().dtype != g2.config().dtype {
        return Err(Error::OutOfRange {
            arg: "choice.gemm2",
            index: 0,
        }
        .into());
    }
    let bm = c.block_m;
    if bm == 0 || !bm.is_multiple_of(g1.config().bm as usize) || !bm.is_multiple_of(g2.config().bm as usize) {
        return Err(Error::OutOfRange {
            arg: "choice.block_m",
            index: bm,
        }
        .into());
    }
    Ok(LayerChoice {
        gemm1: g1,
        gemm2: g2,
        block_m: bm,
    })
}

/// Byte offsets of the layer's workspace pieces.
#[derive(Debug, Clone, Copy)]
struct Layout {
    len: usize,
    blocks: usize,
    sorted: u64,
    bexp: u64,
    total: u64,
    inverse: u64,
    xp: u64,
    act: u64,
    y: u64,
    bytes: usize,
}

/// The workspace of `medley_cuda_moe_layer`: the plan (sorted ids, block
/// experts, total, inverse), `x` in plan order (wgmma GEMM1 only), GEMM1's
/// activations and GEMM2's `f32` rows, each 256-byte aligned.
fn layout(c: &LayerChoice, n: usize, l: usize, h: usize, i: usize, esize: usize) -> Result<Layout, Fail> {
    let (len, blocks) = block_padded_len(n, l, c.block_m)?;
    let of = || Fail::Core(Error::SizeOverflow { arg: "workspace" });
    let mut at: u128 = 0;
    let mut take = |bytes: u128| {
        let start = at;
        at = (at + bytes).div_ceil(256) * 256;
        start as u64
    };
    let (len128, h128, i128) = (len as u128, h as u128, i as u128);
    let sorted = take(4 * len128);
    let bexp = take(4 * blocks as u128);
    let total = take(4);
    let inverse = take(4 * n as u128);
    let xp = if c.gemm1.config().generation == Generation::Wgmma {
        take(len128 * h128 * esize as u128)
    } else {
        0
    };
    let act = take(len128 * i128 * esize as u128);
    let y = take(len128 * h128 * 4);
    let bytes = usize::try_from(at)
        .ok()
        .filter(|&b| b as u64 <= i64::MAX as u64)
        .ok_or_else(of)?;
    Ok(Layout {
        len,
        blocks,
        sorted,
        bexp,
        total,
        inverse,
        xp,
        act,
        y,
        bytes,
    })
}

/// Device workspace bytes `medley_cuda_moe_layer` needs for `tokens`
/// tokens, `k` experts per token, `local_experts` local experts, hidden
/// size `hidden`, intermediate size `inter` and activations of `dtype`
/// with the kernels of `choice`, into `*bytes` (the plan, `x` in plan
/// order for a wgmma GEMM1, the activations and the `f32` expert outputs
/// of about `T * k + L * block_m` rows). Allocate it 256-byte aligned
/// (`cuMemAlloc` is); it needs no initialization and must not be shared
/// by calls that may run concurrently.
///
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_STRUCT_SIZE`,
/// `MEDLEY_STATUS_OVERFLOW`, `MEDLEY_STATUS_BAD_SHAPE` (too many slots),
/// `MEDLEY_STATUS_BAD_PARAMETER` (`choice`, `dtype`) or
/// `MEDLEY_STATUS_UNSUPPORTED` (f32); on failure `*bytes` is untouched.
///
/// # Safety
/// `choice` must point to a readable struct of its `struct_size`, `bytes`
/// to a writable `size_t`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn medley_cuda_moe_layer_workspace_bytes(
    choice: *const medley_cuda_moe_choice,
    tokens: usize,
    k: usize,
    local_experts: usize,
    hidden: usize,
    inter: usize,
    dtype: u32,
    bytes: *mut usize,
) -> medley_status {
    ffi_boundary!({
        let out = req_out_ptr(bytes, "bytes")?;
        // SAFETY: the caller guarantees the struct; copied at once.
        let c = layer_choice(&unsafe { versioned(choice, "choice") }?)?;
        gemm_dtype("dtype", dtype)?;
        let n = tokens
            .checked_mul(k)
            .ok_or(Error::SizeOverflow { arg: "tokens * k" })?;
        let lay = layout(&c, n, local_experts, hidden, inter, 2)?;
        // SAFETY: non-null, aligned, writable (the caller).
        unsafe { out.write(lay.bytes) };
        Ok(())
    })
}

/// The expert weights of a GPU layer (device addresses): a plain
/// descriptor (never grows), the device twin of `medley_moe_experts`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_cuda_moe_experts {
    /// `[L, 2I, H]` gate rows then up rows per local expert (16-byte
    /// aligned).
    pub w13: u64,
    /// Elements at `w13` (exactly `L * 2I * H`).
    pub w13_len: usize,
    /// `[L, H, I]` down projections (16-byte aligned).
    pub w2: u64,
    /// Elements at `w2` (exactly `L * H * I`).
    pub w2_len: usize,
    /// A `medley_dtype` value: bf16 or f16 (the activations' too).
    pub dtype: u32,
    /// Hidden size `H` (a multiple of 8).
    pub hidden: usize,
    /// Intermediate size `I` (a multiple of 8).
    pub inter: usize,
    /// The local experts these weights hold (`L >= 1`).
    pub range: medley_moe_range,
}

/// The routing of a GPU layer (device addresses): a plain descriptor, the
/// device twin of `medley_moe_routing`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_cuda_moe_routing {
    /// `uint32_t [T * k]` global expert ids (an id outside the local range,
    /// `UINT32_MAX` included, is not placed).
    pub ids: u64,
    /// Elements at `ids` (exactly `T * k`).
    pub ids_len: usize,
    /// `float [T * k]` routing weights.
    pub weights: u64,
    /// Elements at `weights` (exactly `T * k`).
    pub weights_len: usize,
    /// Experts per token (1 to 32).
    pub k: usize,
    /// `E`, all experts over all ranks.
    pub experts: usize,
}

fn mult8(v: usize, arg: &'static str) -> Result<(), Fail> {
    if v == 0 || !v.is_multiple_of(8) {
        return Err(Error::OutOfRange { arg, index: v }.into());
    }
    Ok(())
}

fn aligned16(p: u64, arg: &'static str) -> Result<(), Fail> {
    if p == 0 {
        return Err(Fail::Null { arg, index: 0 });
    }
    if !p.is_multiple_of(16) {
        return Err(Fail::Misaligned {
            arg,
            index: 0,
            align: 16,
        });
    }
    Ok(())
}

/// The whole MoE expert layer on the GPU in one call, the twin of
/// `medley_moe_layer`: enqueues on `stream`, without waiting, the
/// block-padded plan of the routing (into the workspace), the gather of
/// `x` into plan order (for a wgmma GEMM1), GEMM1 with SwiGLU, GEMM2 with
/// the routing weights and the prescaled k-way combine into `out` (`T x
/// H` `float`). Experts with no slot cost nothing; a slot routed outside
/// the local range is not placed; a zero weight drops its slot, a NaN
/// weight makes its token's row NaN; a token with no placed slot gets a
/// zero row. Arithmetic: tensor-core `f32` accumulation, the intermediate
/// activation rounded to the data dtype (the CPU keeps `f32`): results
/// match `medley_moe_layer` within bf16/f16 rounding, not bitwise.
///
/// - `x`: `T x H` activations (bf16 or f16, the weights' dtype; 16-byte
///   aligned, row stride a multiple of 8).
/// - `experts`: the local experts' weights (host struct, required).
/// - `routing`: ids and weights in device memory, `k`, `E` (host struct).
/// - `choice`: from `medley_cuda_moe_choose` for this dtype, `T * k` and
///   `L`.
/// - `workspace`, `workspace_len`: at least
///   `medley_cuda_moe_layer_workspace_bytes` bytes of device memory,
///   16-byte aligned.
/// - `out`: `T x H` `float` (device, written; 16-byte aligned, even row
///   stride).
///
/// Every argument of every step is checked before the first launch; on
/// failure nothing is enqueued. Returns `MEDLEY_STATUS_OK`, the statuses
/// of the step functions, `MEDLEY_STATUS_BAD_SHAPE` (a short workspace,
/// no local expert) or `MEDLEY_STATUS_DRIVER`.
///
/// # Safety
/// As `medley_cuda_moe_align`.
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn medley_cuda_moe_layer(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    x: *const medley_cuda_rows,
    experts: *const medley_cuda_moe_experts,
    routing: *const medley_cuda_moe_routing,
    choice: *const medley_cuda_moe_choice,
    workspace: u64,
    workspace_len: usize,
    out: *const medley_cuda_rows,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointers; copied at once.
        let (xr, ex, ro_, or) = unsafe {
            (
                *get(x, "x")?,
                *get(experts, "experts")?,
                *get(routing, "routing")?,
                *get(out, "out")?,
            )
        };
        // SAFETY: as above.
        let choice = layer_choice(&unsafe { versioned(choice, "choice") }?)?;
        let mut regions = Regions::new();
        // SAFETY: the caller guarantees the device memory.
        let xm = unsafe { device_rows(&xr, "x", 0, &mut regions) }?;
        let wdt = gemm_dtype("experts.dtype", ex.dtype)?;
        let esize = 2;
        regions.read(Region::device(ex.w13, ex.w13_len, esize, "experts.w13", 0)?);
        regions.read(Region::device(ex.w2, ex.w2_len, esize, "experts.w2", 0)?);
        regions.read(Region::device(ro_.ids, ro_.ids_len, 4, "routing.ids", 0)?);
        regions.read(Region::device(
            ro_.weights,
            ro_.weights_len,
            4,
            "routing.weights",
            0,
        )?);
        regions.written(Region::device(workspace, workspace_len, 1, "workspace", 0)?);
        // SAFETY: as above.
        let om = unsafe { device_rows_mut(&or, "out", &mut regions) }?;
        regions.check()?;
        let o = f32_out(om, "out")?;
        // The checks of every step, before anything is enqueued.
        let (t, h, i, k) = (xr.rows, ex.hidden, ex.inter, ro_.k);
        let xdt = match xm {
            DeviceMatrix::BF16(_) => GemmDtype::BF16,
            DeviceMatrix::F16(_) => GemmDtype::F16,
            DeviceMatrix::F32(_) => {
                return Err(Error::Unsupported {
                    what: "f32 activations in the expert GEMMs (bf16 or f16 only)",
                }
                .into());
            }
        };
        if xdt != wdt || choice.gemm1.config().dtype != wdt {
            return Err(Error::OutOfRange {
                arg: "experts.dtype",
                index: 0,
            }
            .into());
        }
        mult8(h, "experts.hidden")?;
        mult8(i, "experts.inter")?;
        need_len("x.len", h, xr.len)?;
        mult8(stride_or(xr.stride, xr.len), "x.stride")?;
        need_len("out.rows", t, o.rows())?;
        need_len("out.len", h, o.len())?;
        if !o.stride().is_multiple_of(2) {
            return Err(Error::OutOfRange {
                arg: "out.stride",
                index: o.stride(),
            }
            .into());
        }
        if k == 0 {
            return Err(Error::OutOfRange {
                arg: "routing.k",
                index: 0,
            }
            .into());
        }
        at_most("routing.k", k, 32)?;
        let n = t
            .checked_mul(k)
            .filter(|&n| n < u32::MAX as usize)
            .ok_or(Error::SizeOverflow { arg: "T * k" })?;
        need_len("routing.ids", n, ro_.ids_len)?;
        need_len("routing.weights", n, ro_.weights_len)?;
        let l = check_range(ro_.experts, ex.range)?;
        if l == 0 {
            return Err(Error::Empty { arg: "experts.range" }.into());
        }
        let of = Error::SizeOverflow { arg: "experts.w13" };
        let w13_rows = l.checked_mul(2 * i).ok_or(of)?;
        let w2_rows = l.checked_mul(h).ok_or(of)?;
        need_len("experts.w13", w13_rows.checked_mul(h).ok_or(of)?, ex.w13_len)?;
        need_len("experts.w2", w2_rows.checked_mul(i).ok_or(of)?, ex.w2_len)?;
        aligned16(xr.data, "x")?;
        aligned16(ex.w13, "experts.w13")?;
        aligned16(ex.w2, "experts.w2")?;
        aligned16(o.as_raw(), "out")?;
        let lay = layout(&choice, n, l, h, i, esize)?;
        for (g, width) in [(choice.gemm1, i), (choice.gemm2, h)] {
            let cfg = g.config();
            (lay.len / cfg.bm as usize)
                .checked_mul(width.div_ceil(cfg.bn as usize))
                .filter(|&b| b <= i32::MAX as usize)
                .ok_or(Error::SizeOverflow { arg: "grid" })?;
        }
        if workspace_len > 0 && !workspace.is_multiple_of(16) {
            return Err(Fail::Misaligned {
                arg: "workspace",
                index: 0,
                align: 16,
            });
        }
        if workspace_len < lay.bytes {
            return Err(Error::BufferTooShort {
                arg: "workspace",
                needed: lay.bytes,
                got: workspace_len,
            }
            .into());
        }
        // SAFETY: the caller guarantees a live handle.
        let e = unsafe { get(engine, "engine") }?;
        for g in [choice.gemm1, choice.gemm2] {
            if e.kernels.gemm_info(g).is_none() {
                return Err(Fail::Cuda(CudaError::Unsupported {
                    what: "this expert GEMM generation is not loaded on this device (wgmma needs compute \
                           capability 9.0)",
                }));
            }
        }
        let ws = workspace;
        // SAFETY: the caller guarantees a valid stream of the context.
        let st = unsafe { Stream::from_raw(stream) };
        let range: ExpertRange = ex.range.into();
        // The plan, into the workspace (exclusive to the call: checked
        // against every other buffer by Regions::check, and long enough:
        // checked above; the pieces are disjoint by construction).
        // SAFETY: see above; device memory of the context (the caller).
        let ao = unsafe {
            AlignOutput {
                sorted_ids: rw(ws + lay.sorted, lay.len),
                block_experts: rw(ws + lay.bexp, lay.blocks),
                total: rw(ws + lay.total, 1),
                offsets: None,
                inverse: Some(rw(ws + lay.inverse, n)),
            }
        };
        // SAFETY: as above.
        let idv = unsafe { ro::<u32>(ro_.ids, ro_.ids_len) };
        Align::new(idv, ro_.experts, range, choice.block_m, ao).launch(&e.kernels, st)?;
        // SAFETY: as above: the plan the launch above writes (stream
        // order), the routing weights, the weights and the scratch pieces.
        let (plan, inv, wv) = unsafe {
            (
                DevicePlan {
                    sorted_ids: ro(ws + lay.sorted, lay.len),
                    block_experts: ro(ws + lay.bexp, lay.blocks),
                    total: ro(ws + lay.total, 1),
                    block_m: choice.block_m,
                    slots: n,
                    k,
                },
                ro::<u32>(ws + lay.inverse, n),
                ro::<f32>(ro_.weights, ro_.weights_len),
            )
        };
        let wgmma = choice.gemm1.config().generation == Generation::Wgmma;
        macro_rules! run {
            ($t:ty, $v:ident) => {{
                // SAFETY: as above; the weights are dense (lengths checked).
                let (w13, w2, xp, act) = unsafe {
                    (
                        DeviceRows::dense(ro::<$t>(ex.w13, ex.w13_len), w13_rows, h)?,
                        DeviceRows::dense(ro::<$t>(ex.w2, ex.w2_len), w2_rows, i)?,
                        if wgmma {
                            DeviceRowsMut::dense(rw::<$t>(ws + lay.xp, lay.len * h), lay.len, h)?
                        } else {
                            DeviceRowsMut::dense(rw::<$t>(0, 0), 0, h)?
                        },
                        DeviceRowsMut::dense(rw::<$t>(ws + lay.act, lay.len * i), lay.len, i)?,
                    )
                };
                // SAFETY: as above.
                let y = unsafe { DeviceRowsMut::dense(rw::<f32>(ws + lay.y, lay.len * h), lay.len, h)? };
                let scratch = LayerScratch {
                    xp: DeviceMatrixMut::$v(xp),
                    act: DeviceActMut::$v(act),
                    y,
                };
                Layer::new(
                    &choice,
                    xm,
                    &plan,
                    inv,
                    wv,
                    DeviceMatrix::$v(w13),
                    DeviceMatrix::$v(w2),
                    scratch,
                    o,
                )
                .launch(&e.kernels, st)?
            }};
        }
        match wdt {
            GemmDtype::BF16 => run!(bf16, BF16),
            GemmDtype::F16 => run!(f16, F16),
        }
        Ok(())
    })
}
