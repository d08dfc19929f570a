//! CUDA entry points: the engine handle (medley's kernels loaded in one
//! CUDA context), the GPU ensemble combination and top-k gating on the
//! caller's stream over the caller's device memory.

use crate::args::{
    Region, Regions, Versioned, at_most, dtype, get, init_versioned, req_out_ptr, slice, stride_or, versioned,
};
use crate::cpu::{at, copy_list, medley_ensemble_config, scalars};
use crate::status::{Fail, medley_status};
use core::ffi::c_void;
use half::{bf16, f16};
use medley_core::{DType, Error};
use medley_cuda::ensemble::{
    Combine, DeviceConfig, DeviceLogits, DeviceModel, DeviceOutput, DeviceWeights, MAX_DEVICE_MODELS,
    Version, workspace_bytes,
};
use medley_cuda::gating::{Gate, Gating, RouterLogits};
use medley_cuda::mem::{DeviceRows, DeviceRowsMut, DeviceSlice, DeviceSliceMut, Stream};
use medley_cuda::{Kernels, Launch, Modules};

/// medley's CUDA kernels loaded in one CUDA context: an opaque handle,
/// created by `medley_cuda_engine_new`, released by
/// `medley_cuda_engine_destroy`. It may be used from any thread, by
/// concurrent calls too (it holds only immutable module and function
/// handles), with streams of the context it was created in.
#[allow(non_camel_case_types)]
#[derive(Debug)]
pub struct medley_cuda_engine {
    pub(crate) kernels: Kernels,
}

/// Which GPU kernel `medley_cuda_ensemble_combine` runs.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_cuda_kernel {
    /// The split-row kernel (`ensemble_v2`) when it applies (16-byte
    /// aligned rows, a large enough workspace, cooperative launch), else
    /// the one-block-per-row kernel.
    Auto = 0,
    /// `ensemble_v1`: one block per row (the on-device reference).
    V1 = 1,
    /// `ensemble_v2`: rows split over co-resident blocks; an error if it
    /// does not apply.
    V2 = 2,
}

/// A strided view of `rows x len` elements in device memory (the device
/// twin of `medley_rows`).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_cuda_rows {
    /// Device address (`CUdeviceptr`) of element 0 of row 0, aligned for
    /// `dtype`; 0 only when `data_len` is 0.
    pub data: u64,
    /// Elements (of `dtype`) at `data`: at least `(rows - 1) * stride + len`.
    pub data_len: usize,
    /// A `medley_dtype` value.
    pub dtype: u32,
    /// Number of rows.
    pub rows: usize,
    /// Elements per row.
    pub len: usize,
    /// Elements between row starts, `>= len`; 0 means `len`.
    pub stride: usize,
}

/// One model of a GPU combination. All models of one call share one
/// `dtype`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_cuda_model {
    /// The logits (device memory).
    pub logits: medley_cuda_rows,
    /// Temperature `T_m > 0`.
    pub temperature: f32,
}

/// Where `medley_cuda_ensemble_combine` writes (device memory; `float`
/// outputs 4-byte aligned). A zero address means "not requested". At least
/// one of `log_probs` and `probs` must be given. A versioned struct: start
/// from `medley_cuda_ensemble_output_init(&out, sizeof out)`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_cuda_ensemble_output {
    /// `sizeof(medley_cuda_ensemble_output)` of the caller's header (set
    /// by `medley_cuda_ensemble_output_init`). Layout 1
    /// (`MEDLEY_CUDA_ENSEMBLE_OUTPUT_SIZE_V1`) ends after
    /// `log_normalizer_len`; layout 2 adds the per-row uncertainty outputs.
    pub struct_size: usize,
    /// `rows x vocab` log-probabilities (0: none).
    pub log_probs: u64,
    /// Elements at `log_probs`.
    pub log_probs_len: usize,
    /// Row stride of `log_probs` (0 means `vocab`).
    pub log_probs_stride: usize,
    /// `rows x vocab` probabilities (0: none).
    pub probs: u64,
    /// Elements at `probs`.
    pub probs_len: usize,
    /// Row stride of `probs` (0 means `vocab`).
    pub probs_stride: usize,
    /// `rows` argmax token ids, `uint32_t` (0: none).
    pub argmax: u64,
    /// Elements at `argmax` (must be `rows`).
    pub argmax_len: usize,
    /// `rows` log-normalizers, `float` (0: none).
    pub log_normalizer: u64,
    /// Elements at `log_normalizer` (must be `rows`).
    pub log_normalizer_len: usize,
    /// Layout 2: `rows` entropies, `float` (0: none); as the CPU output.
    pub entropy: u64,
    /// Elements at `entropy` (must be `rows`).
    pub entropy_len: usize,
    /// Layout 2: `rows` argmax probabilities, `float` (0: none).
    pub top1_prob: u64,
    /// Elements at `top1_prob` (must be `rows`).
    pub top1_prob_len: usize,
    /// Layout 2: `rows` top-1 minus top-2 margins, `float` (0: none).
    pub margin: u64,
    /// Elements at `margin` (must be `rows`).
    pub margin_len: usize,
    /// Layout 2: `rows` model disagreements, `float` (0: none; linear mode
    /// only).
    pub disagreement: u64,
    /// Elements at `disagreement` (must be `rows`).
    pub disagreement_len: usize,
}

/// Size of the first `medley_cuda_ensemble_output` layout (ABI 1.0).
pub const MEDLEY_CUDA_ENSEMBLE_OUTPUT_SIZE_V1: usize = 88;
/// Size of the second layout (ABI 1.1, the uncertainty outputs added).
pub const MEDLEY_CUDA_ENSEMBLE_OUTPUT_SIZE_V2: usize = 152;

const _: () = assert!(size_of::<medley_cuda_ensemble_output>() == MEDLEY_CUDA_ENSEMBLE_OUTPUT_SIZE_V2);

// SAFETY: repr(C), `struct_size: usize` first, integer fields only.
unsafe impl Versioned for medley_cuda_ensemble_output {
    const DEFAULT: Self = medley_cuda_ensemble_output {
        struct_size: size_of::<medley_cuda_ensemble_output>(),
        log_probs: 0,
        log_probs_len: 0,
        log_probs_stride: 0,
        probs: 0,
        probs_len: 0,
        probs_stride: 0,
        argmax: 0,
        argmax_len: 0,
        log_normalizer: 0,
        log_normalizer_len: 0,
        entropy: 0,
        entropy_len: 0,
        top1_prob: 0,
        top1_prob_len: 0,
        margin: 0,
        margin_len: 0,
        disagreement: 0,
        disagreement_len: 0,
    };
    const SIZES: &'static [usize] = &[
        MEDLEY_CUDA_ENSEMBLE_OUTPUT_SIZE_V1,
        MEDLEY_CUDA_ENSEMBLE_OUTPUT_SIZE_V2,
    ];
}

/// Fills `*out` with no outputs requested and sets its `struct_size` to
/// `struct_size` (pass `sizeof *out`). Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED` or
/// `MEDLEY_STATUS_STRUCT_SIZE`.
///
/// # Safety
/// `out` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_ensemble_output_init(
    out: *mut medley_cuda_ensemble_output,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(out, struct_size, "out") } })
}

/// Whether a usable CUDA driver and device are present: `cuInit(0)`.
/// Returns `MEDLEY_STATUS_OK`, or `MEDLEY_STATUS_DRIVER` with the raw code
/// in `medley_last_cuda_error()` (34: the stub driver a CPU-only build
/// links, 100: no device).
#[unsafe(no_mangle)]
pub extern "C" fn medley_cuda_probe() -> medley_status {
    ffi_boundary!({
        medley_cuda::probe().map_err(|e| Fail::Cuda(e.into()))?;
        Ok(())
    })
}

/// Which kernel families `medley_cuda_engine_new_with` loads (the
/// `modules` field of `medley_cuda_engine_options`, bits or-ed together).
/// Loading fewer modules is faster: cold (no JIT cache) on an H200 the
/// ensemble alone took 0.83 s, gating and routing 0.83 s, the expert GEMMs
/// 9.9 s, everything 27.5 s as a process's first load (BENCHMARKS.md).
/// A call whose kernel was not loaded returns
/// `MEDLEY_STATUS_DEVICE_UNSUPPORTED` and says which module it needs.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_cuda_modules {
    /// The ensemble combination (`medley_cuda_ensemble_combine`).
    Ensemble = 1,
    /// Top-k gating, all variants.
    Gating = 2,
    /// The routing plan, permute and combine.
    Routing = 4,
    /// The expert GEMMs (GEMM1, GEMM2; most of the PTX).
    Experts = 8,
    /// Everything an MoE layer runs: gating, routing and experts.
    Moe = 14,
    /// Every kernel (what `medley_cuda_engine_new` loads).
    All = 15,
}

/// Options of `medley_cuda_engine_new_with`. A versioned struct: start
/// from `medley_cuda_engine_options_init(&o, sizeof o)` (every module).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_cuda_engine_options {
    /// `sizeof(medley_cuda_engine_options)` of the caller's header.
    pub struct_size: usize,
    /// `medley_cuda_modules` bits: which kernel families to load (nonzero;
    /// unknown bits are `MEDLEY_STATUS_BAD_PARAMETER`).
    pub modules: u32,
}

/// Size of the first `medley_cuda_engine_options` layout (ABI 1.1).
pub const MEDLEY_CUDA_ENGINE_OPTIONS_SIZE_V1: usize = 16;

const _: () = assert!(size_of::<medley_cuda_engine_options>() == MEDLEY_CUDA_ENGINE_OPTIONS_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first, integers only.
unsafe impl Versioned for medley_cuda_engine_options {
    const DEFAULT: Self = medley_cuda_engine_options {
        struct_size: size_of::<medley_cuda_engine_options>(),
        modules: medley_cuda_modules::All as u32,
    };
    const SIZES: &'static [usize] = &[MEDLEY_CUDA_ENGINE_OPTIONS_SIZE_V1];
}

/// Fills `*options` with the defaults (every module) and sets its
/// `struct_size` (pass `sizeof *options`). Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED` or
/// `MEDLEY_STATUS_STRUCT_SIZE`.
///
/// # Safety
/// `options` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_engine_options_init(
    options: *mut medley_cuda_engine_options,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(options, struct_size, "options") } })
}

/// The `Modules` of a `medley_cuda_modules` bit set.
fn modules(bits: u32) -> Result<Modules, Fail> {
    if bits == 0 || bits & !(medley_cuda_modules::All as u32) != 0 {
        return Err(Fail::BadEnum {
            arg: "options.modules",
            value: bits,
        });
    }
    let table = [
        (medley_cuda_modules::Ensemble, Modules::ENSEMBLE),
        (medley_cuda_modules::Gating, Modules::GATING),
        (medley_cuda_modules::Routing, Modules::ROUTING),
        (medley_cuda_modules::Experts, Modules::EXPERTS),
    ];
    let mut m: Option<Modules> = None;
    for (bit, family) in table {
        if bits & bit as u32 != 0 {
            m = Some(m.map_or(family, |m| m | family));
        }
    }
    m.ok_or(Fail::BadEnum {
        arg: "options.modules",
        value: bits,
    })
}

std::thread_local! {
    static JIT_LOG: core::cell::RefCell<String> = const { core::cell::RefCell::new(String::new()) };
}

/// Loads `modules` for `stream` into a new engine at `out`, keeping the
/// JIT's log of a failed load for `medley_cuda_last_jit_log`.
///
/// # Safety
/// As `medley_cuda_engine_new`.
unsafe fn new_engine(
    stream: *mut c_void,
    modules: Modules,
    out: *mut *mut medley_cuda_engine,
) -> Result<(), Fail> {
    // SAFETY: the caller guarantees the stream handle.
    let kernels = unsafe { Kernels::load_modules_for_stream(stream, modules) }.map_err(|e| {
        let fail = Fail::Load {
            error: e.error,
            module: e.module,
        };
        let log = e.jit_log().to_string();
        let _ = JIT_LOG.try_with(|l| *l.borrow_mut() = log);
        fail
    })?;
    let _ = JIT_LOG.try_with(|l| l.borrow_mut().clear());
    let raw = Box::into_raw(Box::new(medley_cuda_engine { kernels }));
    // SAFETY: out is non-null and aligned (the callers' req_out_ptr) and
    // writable (the caller); ownership of the box passes to the caller.
    unsafe { out.write(raw) };
    Ok(())
}

/// As `medley_cuda_engine_new`, loading only the kernel families named by
/// `options->modules` (`medley_cuda_modules` bits): a runtime that needs
/// the ensemble only, or the MoE path only, loads in a fraction of the
/// time. `options` is required (`medley_cuda_engine_options_init`).
/// Returns the statuses of `medley_cuda_engine_new`, plus
/// `MEDLEY_STATUS_BAD_PARAMETER` (no or unknown module bits) and
/// `MEDLEY_STATUS_STRUCT_SIZE`.
///
/// # Safety
/// As `medley_cuda_engine_new`; `options` must point to a struct of its
/// `struct_size`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_engine_new_with(
    stream: *mut c_void,
    options: *const medley_cuda_engine_options,
    engine: *mut *mut medley_cuda_engine,
) -> medley_status {
    ffi_boundary!({
        let out = req_out_ptr(engine, "engine")?;
        // SAFETY: the caller guarantees the struct.
        let o = unsafe { versioned(options, "options") }?;
        let m = modules(o.modules)?;
        // SAFETY: the caller's guarantees are new_engine's.
        unsafe { new_engine(stream, m, out) }
    })
}

/// The JIT compiler's log of the calling thread's last failed engine
/// creation (`medley_cuda_engine_new*`): the PTX assembler's message when
/// the driver rejected medley's PTX (for example a driver too old for the
/// PTX version), empty when the last creation succeeded or failed for
/// another reason. Written as `medley_last_error_message` writes: at most
/// `len` bytes, NUL-terminated when `len > 0`, truncated on a UTF-8
/// boundary; `out_len` (nullable) receives the full length.
///
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT` (`buf` null
/// with `len > 0`) or `MEDLEY_STATUS_MISALIGNED` (`out_len`); records no
/// failure of its own.
///
/// # Safety
/// `buf` must be writable for `len` bytes; `out_len`, when not null, must
/// point to a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_last_jit_log(
    buf: *mut core::ffi::c_char,
    len: usize,
    out_len: *mut usize,
) -> medley_status {
    ffi_boundary!(default = medley_status::Panic, {
        let log = JIT_LOG.try_with(|l| l.borrow().clone()).unwrap_or_default();
        // SAFETY: the caller's guarantees are write_text's.
        unsafe { crate::status::write_text(&log, buf, len, out_len) }
    })
}

/// Loads medley's kernels into the CUDA context of `stream` (a `CUstream`
/// or `cudaStream_t`; 0 (NULL) is the legacy default stream and 2 the
/// per-thread default stream, both of which need a current context) and
/// stores a new engine handle in `*engine`. The calling thread's current
/// context is left as it was. medley never creates contexts, streams or
/// device memory.
///
/// `engine` is required; on failure `*engine` is untouched. Returns
/// `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_DRIVER` (raw code in
/// `medley_last_cuda_error()`: 34 under the stub driver, 100 without a
/// device, 222 for a driver too old for the PTX), or
/// `MEDLEY_STATUS_DEVICE_UNSUPPORTED` (compute capability below 8.0, no
/// current context for stream 0 or 2).
///
/// # Safety
/// `stream` must be a valid stream handle (or 0 / 2 with a current
/// context); `engine` must point to writable storage for one pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_engine_new(
    stream: *mut c_void,
    engine: *mut *mut medley_cuda_engine,
) -> medley_status {
    ffi_boundary!({
        let out = req_out_ptr(engine, "engine")?;
        // SAFETY: the caller's guarantees are new_engine's.
        unsafe { new_engine(stream, Modules::ALL, out) }
    })
}

/// Unloads the engine's kernels and frees the handle, reporting a failure
/// (an asynchronous error from earlier work surfacing, or a context that
/// was destroyed before the engine). The handle is invalid after the call
/// whatever the status: on failure the remaining modules are released as
/// far as the driver allows. Call it while the engine's context is alive,
/// after the work using it has finished.
///
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT` (a null
/// handle; nothing to do), `MEDLEY_STATUS_MISALIGNED` (not a handle), or
/// `MEDLEY_STATUS_DRIVER` (raw code in `medley_last_cuda_error()`).
///
/// # Safety
/// `engine` must be null or a handle from `medley_cuda_engine_new` not yet
/// destroyed, used by no other call during this one.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_engine_destroy(engine: *mut medley_cuda_engine) -> medley_status {
    ffi_boundary!({
        let p = req_out_ptr(engine, "engine")?;
        // SAFETY: the caller guarantees p came from Box::into_raw in
        // medley_cuda_engine_new and is destroyed once.
        let medley_cuda_engine { kernels } = *unsafe { Box::from_raw(p) };
        // Kernels::destroy hands the registry back on failure; dropping
        // it retries the remaining unloads quietly. The handle is gone
        // either way, so the caller never holds a half-destroyed engine.
        kernels.destroy().map_err(|(e, rest)| {
            drop(rest);
            Fail::from(e)
        })
    })
}

/// Device workspace bytes `medley_cuda_ensemble_combine` needs to run the
/// fast split-row kernel for this call shape (0 when it cannot run on this
/// device; the one-block-per-row kernel needs none), into `*bytes`. Allocate
/// it 16-byte aligned and zero it once before its first use; calls leave it
/// ready for the next one (one workspace per concurrently running call).
///
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_BAD_SHAPE` (more than
/// `MEDLEY_MAX_DEVICE_MODELS` models, `rows` or `vocab` beyond the kernels'
/// 32-bit limits) or `MEDLEY_STATUS_BAD_PARAMETER` (`dtype`).
///
/// # Safety
/// `engine` must be a live handle; `bytes` must point to a writable
/// `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_ensemble_workspace_bytes(
    engine: *const medley_cuda_engine,
    rows: usize,
    vocab: usize,
    n_models: usize,
    dtype: u32,
    bytes: *mut usize,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees a live handle.
        let e = unsafe { get(engine, "engine") }?;
        let out = req_out_ptr(bytes, "bytes")?;
        let size = crate::args::dtype("dtype", dtype)?.size_bytes();
        // The kernels' limits, checked first so that the plan's arithmetic
        // stays small (medley_cuda's planner assumes shapes combine accepts).
        at_most("n_models", n_models, MAX_DEVICE_MODELS)?;
        at_most("rows", rows, u32::MAX as usize)?;
        at_most("vocab", vocab, u32::MAX as usize - 1)?;
        let n = workspace_bytes(&e.kernels, rows, vocab, n_models, size)?;
        // SAFETY: non-null, aligned (req_out_ptr), writable (the caller).
        unsafe { out.write(n) };
        Ok(())
    })
}

/// A checked device view of a `medley_cuda_rows`, registered as read.
///
/// # Safety
/// `r.data` must be device memory of the engine's context holding
/// `r.data_len` elements, not written during `'a` by anyone else.
pub(crate) unsafe fn device_rows<'a>(
    r: &medley_cuda_rows,
    arg: &'static str,
    index: usize,
    regions: &mut Regions,
) -> Result<DeviceLogits<'a>, Fail> {
    let dt = dtype(arg, r.dtype)?;
    regions.read(Region::device(r.data, r.data_len, dt.size_bytes(), arg, index)?);
    let stride = stride_or(r.stride, r.len);
    macro_rules! view {
        ($t:ty, $v:ident) => {{
            // SAFETY: the caller guarantees the memory; Region::device
            // checked that the byte range does not wrap.
            let s = unsafe { DeviceSlice::<$t>::from_raw(r.data, r.data_len) };
            DeviceLogits::$v(DeviceRows::new(s, r.rows, r.len, stride).map_err(|e| match e {
                medley_cuda::CudaError::Invalid(err) => Fail::At { arg, index, err },
                other => other.into(),
            })?)
        }};
    }
    Ok(match dt {
        DType::F32 => view!(f32, F32),
        DType::F16 => view!(f16, F16),
        DType::BF16 => view!(bf16, BF16),
    })
}

/// A checked writable device view, `None` for a zero address.
///
/// # Safety
/// As [`device_rows`], and exclusive to the call (checked against the
/// call's other buffers by the caller's `Regions::check` before the kernel
/// runs).
unsafe fn out_rows<'a>(
    p: u64,
    len: usize,
    stride: usize,
    rows: usize,
    vocab: usize,
    arg: &'static str,
) -> Result<Option<DeviceRowsMut<'a, f32>>, Fail> {
    if p == 0 {
        return Ok(None);
    }
    // SAFETY: guaranteed by the caller.
    let s = unsafe { DeviceSliceMut::<f32>::from_raw(p, len) };
    DeviceRowsMut::new(s, rows, vocab, stride_or(stride, vocab))
        .map(Some)
        .map_err(|e| match e {
            medley_cuda::CudaError::Invalid(err) => Fail::At { arg, index: 0, err },
            other => other.into(),
        })
}

/// Combines `n_models` models into one distribution per row on the GPU:
/// enqueues medley's ensemble kernel on the caller's `stream` over the
/// caller's device memory and returns without waiting (no synchronization,
/// no allocation: the call can be captured in a CUDA graph). Semantics are
/// those of `medley_ensemble_combine`, with these differences (forced by
/// "never synchronize"): no report (masked and NaN rows show in the
/// outputs: argmax `MEDLEY_NO_TOKEN`, log-normalizer `-inf` or NaN); a
/// per-row weight table lives in device memory and cannot be checked
/// before the launch, so a row with invalid weights becomes a NaN row;
/// all models share one `dtype`; at most `MEDLEY_MAX_DEVICE_MODELS` models.
///
/// - `engine`: from `medley_cuda_engine_new` in the context of `stream`.
/// - `stream`: a `CUstream` / `cudaStream_t` of that context (0: legacy
///   default stream).
/// - `models`, `n_models`: host array of `medley_cuda_model`.
/// - `config`: as for the CPU function; per-model weights are read from
///   host memory at `weights` during the call; a per-row table is given by
///   `device_weights` (and then `weights` must be null).
/// - `out`: device outputs (host struct).
/// - `workspace`, `workspace_len`: device scratch of at least
///   `medley_cuda_ensemble_workspace_bytes` bytes (16-byte aligned, zeroed
///   once before its first use, not shared by concurrent calls) for the
///   fast kernel; 0 and 0 for none (the one-block-per-row kernel runs).
/// - `kernel`: a `medley_cuda_kernel` value (`MEDLEY_CUDA_KERNEL_AUTO`).
///
/// Everything is checked before the launch; on failure nothing is
/// enqueued. Returns `MEDLEY_STATUS_OK` (enqueued), the argument errors of
/// `medley_ensemble_combine`, `MEDLEY_STATUS_MISALIGNED` (device pointers;
/// the split-row kernel wants 16-byte aligned rows and workspace),
/// `MEDLEY_STATUS_DEVICE_UNSUPPORTED` (`MEDLEY_CUDA_KERNEL_V2` where it
/// cannot run), or `MEDLEY_STATUS_DRIVER` (raw code in
/// `medley_last_cuda_error()`). Errors of the kernel itself surface, as
/// with any CUDA work, at the caller's next synchronization.
///
/// # Safety
/// `engine` must be a live handle; `stream` a valid stream of the engine's
/// context; host pointers valid for their lengths; device addresses device
/// memory of that context holding the lengths given, not used by other
/// work while the kernel may run.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_ensemble_combine(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    models: *const medley_cuda_model,
    n_models: usize,
    config: *const medley_ensemble_config,
    rows: usize,
    vocab: usize,
    out: *const medley_cuda_ensemble_output,
    workspace: u64,
    workspace_len: usize,
    kernel: u32,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees a live handle.
        let e = unsafe { get(engine, "engine") }?;
        // SAFETY: the caller guarantees the struct pointers; copied at once.
        let cfg = unsafe { versioned(config, "config") }?;
        // SAFETY: as above.
        let o = unsafe { versioned(out, "out") }?;
        let fill = medley_cuda_model {
            logits: medley_cuda_rows {
                data: 0,
                data_len: 0,
                dtype: 0,
                rows: 0,
                len: 0,
                stride: 0,
            },
            temperature: 1.0,
        };
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, n) = unsafe { copy_list(models, n_models, MAX_DEVICE_MODELS, fill, "models") }?;
        let version = match kernel {
            0 => Version::Auto,
            1 => Version::V1,
            2 => Version::V2,
            v => {
                return Err(Fail::BadEnum {
                    arg: "kernel",
                    value: v,
                });
            }
        };
        let sc = scalars(&cfg)?;
        let mut regions = Regions::new();
        // SAFETY: an empty view at address 0 is never dereferenced.
        let empty = DeviceRows::dense(unsafe { DeviceSlice::from_raw(0, 0) }, 0, 0).map_err(Fail::from)?;
        let mut dm = [DeviceModel {
            logits: DeviceLogits::F32(empty),
            temperature: 1.0,
        }; MAX_DEVICE_MODELS];
        for (i, (m, c)) in dm.iter_mut().zip(&list[..n]).enumerate() {
            // SAFETY: the caller guarantees the device memory.
            let logits = unsafe { device_rows(&c.logits, "models[].logits", i, &mut regions) }?;
            *m = DeviceModel {
                logits,
                temperature: c.temperature,
            };
        }
        let weights = if cfg.device_weights != 0 {
            if !cfg.weights.is_null() {
                return Err(Error::Unsupported {
                    what: "both config.weights and config.device_weights",
                }
                .into());
            }
            if cfg.weights_stride == 0 {
                return Err(Error::Unsupported {
                    what: "config.device_weights needs weights_stride > 0 (a per-row table)",
                }
                .into());
            }
            let w = cfg.device_weights;
            regions.read(Region::device(w, cfg.weights_len, 4, "config.device_weights", 0)?);
            // SAFETY: the caller guarantees the device table.
            let s = unsafe { DeviceSlice::<f32>::from_raw(w, cfg.weights_len) };
            DeviceWeights::PerRow(
                DeviceRows::new(s, rows, n, cfg.weights_stride).map_err(|e| match e {
                    medley_cuda::CudaError::Invalid(err) => at("config.device_weights", 0)(err),
                    other => other.into(),
                })?,
            )
        } else {
            if cfg.weights_stride != 0 {
                return Err(Error::Unsupported {
                    what: "a per-row weight table in host memory for a GPU call (use device_weights)",
                }
                .into());
            }
            Region::host(cfg.weights, cfg.weights_len, "config.weights", 0)?;
            // SAFETY: checked by Region::host; readable (the caller).
            DeviceWeights::PerModel(unsafe { slice(cfg.weights, cfg.weights_len) })
        };
        let dev_out = |p: u64, len: usize, size: usize, arg: &'static str, rs: &mut Regions| {
            if p != 0 {
                rs.written(Region::device(p, len, size, arg, 0)?);
            }
            Ok::<(), Fail>(())
        };
        dev_out(o.log_probs, o.log_probs_len, 4, "out.log_probs", &mut regions)?;
        dev_out(o.probs, o.probs_len, 4, "out.probs", &mut regions)?;
        dev_out(o.argmax, o.argmax_len, 4, "out.argmax", &mut regions)?;
        dev_out(
            o.log_normalizer,
            o.log_normalizer_len,
            4,
            "out.log_normalizer",
            &mut regions,
        )?;
        dev_out(o.entropy, o.entropy_len, 4, "out.entropy", &mut regions)?;
        dev_out(o.top1_prob, o.top1_prob_len, 4, "out.top1_prob", &mut regions)?;
        dev_out(o.margin, o.margin_len, 4, "out.margin", &mut regions)?;
        dev_out(
            o.disagreement,
            o.disagreement_len,
            4,
            "out.disagreement",
            &mut regions,
        )?;
        dev_out(workspace, workspace_len, 1, "workspace", &mut regions)?;
        regions.check()?;
        // SAFETY: each output passed Region::device and overlaps no other
        // buffer of the call (Regions::check); it is device memory of the
        // engine's context holding its length (the caller).
        let output = unsafe {
            DeviceOutput {
                log_probs: out_rows(
                    o.log_probs,
                    o.log_probs_len,
                    o.log_probs_stride,
                    rows,
                    vocab,
                    "out.log_probs",
                )?,
                probs: out_rows(o.probs, o.probs_len, o.probs_stride, rows, vocab, "out.probs")?,
                argmax: (o.argmax != 0).then(|| DeviceSliceMut::from_raw(o.argmax, o.argmax_len)),
                log_normalizer: (o.log_normalizer != 0)
                    .then(|| DeviceSliceMut::from_raw(o.log_normalizer, o.log_normalizer_len)),
                entropy: (o.entropy != 0).then(|| DeviceSliceMut::from_raw(o.entropy, o.entropy_len)),
                top1_prob: (o.top1_prob != 0).then(|| DeviceSliceMut::from_raw(o.top1_prob, o.top1_prob_len)),
                margin: (o.margin != 0).then(|| DeviceSliceMut::from_raw(o.margin, o.margin_len)),
                disagreement: (o.disagreement != 0)
                    .then(|| DeviceSliceMut::from_raw(o.disagreement, o.disagreement_len)),
            }
        };
        // SAFETY: the workspace too passed Region::device and
        // Regions::check; device memory of the context (the caller).
        let ws =
            (workspace != 0).then(|| unsafe { DeviceSliceMut::<u8>::from_raw(workspace, workspace_len) });
        let mut dcfg = DeviceConfig::new(sc.mode, weights);
        dcfg.out_temperature = sc.out_temperature;
        dcfg.plausibility = sc.plausibility;
        dcfg.mask_rule = sc.mask_rule;
        // SAFETY: the caller guarantees a valid stream of the engine's
        // context, alive for the call.
        let st = unsafe { Stream::from_raw(stream) };
        let mut call = Combine::new(&dm[..n], &dcfg, output).with_version(version);
        call.workspace = ws;
        call.launch(&e.kernels, st)?;
        Ok(())
    })
}

/// The shared body of the GPU gating entry points.
///
/// # Safety
/// As the entry points.
#[allow(clippy::too_many_arguments)]
unsafe fn gpu_gate(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    logits: *const medley_cuda_rows,
    k: usize,
    gating: Gating<'_>,
    ids: u64,
    ids_len: usize,
    weights: u64,
    weights_len: usize,
) -> Result<(), Fail> {
    // SAFETY: the caller guarantees a live handle and the struct pointer
    // (copied at once).
    let (e, r) = unsafe { (get(engine, "engine")?, *get(logits, "logits")?) };
    let mut regions = Regions::new();
    // SAFETY: the caller guarantees the device memory.
    let x = match unsafe { device_rows(&r, "logits", 0, &mut regions) }? {
        DeviceLogits::F32(v) => RouterLogits::F32(v),
        DeviceLogits::F16(v) => RouterLogits::F16(v),
        DeviceLogits::BF16(v) => RouterLogits::BF16(v),
    };
    regions.written(Region::device(ids, ids_len, 4, "ids", 0)?);
    regions.written(Region::device(weights, weights_len, 4, "weights", 0)?);
    regions.check()?;
    // SAFETY: both outputs passed Region::device and overlap nothing else
    // of the call; device memory of the engine's context (the caller).
    let (i, w) = unsafe {
        (
            DeviceSliceMut::<u32>::from_raw(ids, ids_len),
            DeviceSliceMut::<f32>::from_raw(weights, weights_len),
        )
    };
    // SAFETY: the caller guarantees a valid stream of the engine's context.
    let st = unsafe { Stream::from_raw(stream) };
    Gate::new(x, k, &gating, i, w).launch(&e.kernels, st)?;
    Ok(())
}

/// `medley_moe_topk_softmax` on the GPU: enqueues medley's gating kernel
/// on the caller's `stream` and returns without waiting. Ids and weights
/// equal the CPU function's bit for bit. No report: NaN rows have NaN
/// weights, fully masked rows zero weights. At most
/// `MEDLEY_MOE_MAX_DEVICE_EXPERTS` experts.
///
/// - `logits`: host struct describing `T x E` router logits in device
///   memory (any `medley_dtype`).
/// - `ids`, `weights`: device addresses of `T * k` `uint32_t` / `float`
///   (4-byte aligned); `ids_len` and `weights_len` must equal `T * k`.
///
/// Checked before the launch; on failure nothing is enqueued. Returns the
/// statuses of `medley_moe_topk_softmax` plus `MEDLEY_STATUS_DRIVER`.
///
/// # Safety
/// `engine` must be a live handle; `stream` a valid stream of its
/// context; the device addresses device memory of that context holding
/// the lengths given, not used by other work while the kernel may run.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_moe_topk_softmax(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    logits: *const medley_cuda_rows,
    k: usize,
    renormalize: u32,
    ids: u64,
    ids_len: usize,
    weights: u64,
    weights_len: usize,
) -> medley_status {
    ffi_boundary!({
        let g = Gating::TopkSoftmax {
            renormalize: renormalize != 0,
        };
        // SAFETY: the caller's guarantees are those of `gpu_gate`.
        unsafe { gpu_gate(engine, stream, logits, k, g, ids, ids_len, weights, weights_len) }
    })
}

/// `medley_moe_keep_topk_softmax` on the GPU (softmax over the kept
/// logits); arguments and errors as `medley_cuda_moe_topk_softmax`.
///
/// # Safety
/// As `medley_cuda_moe_topk_softmax`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_cuda_moe_keep_topk_softmax(
    engine: *const medley_cuda_engine,
    stream: *mut c_void,
    logits: *const medley_cuda_rows,
    k: usize,
    ids: u64,
    ids_len: usize,
    weights: u64,
    weights_len: usize,
) -> medley_status {
    ffi_boundary!({
        let g = Gating::KeepTopkSoftmax;
        // SAFETY: the caller's guarantees are those of `gpu_gate`.
        unsafe { gpu_gate(engine, stream, logits, k, g, ids, ids_len, weights, weights_len) }
    })
}
