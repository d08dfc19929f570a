//! CPU entry points of the MoE path over host memory: DeepSeek-V3 style
//! grouped, biased gating (`medley_moe_grouped_topk`), the block-padded
//! routing plan (`medley_moe_block_padded_len`,
//! `medley_moe_align_block_size`) and the whole expert layer
//! (`medley_moe_layer`, `medley_moe_layer_scratch_bytes`): the CPU core's
//! answers, which the GPU entry points (`medley_cuda_moe_*`) are checked
//! against.

use crate::args::{
    Region, Regions, Versioned, dtype, get, init_versioned, req_out_ptr, slice, slice_mut, stride_or,
    versioned,
};
use crate::cpu::{at, host_rows, medley_report, medley_rows, report_out, write_report};
use crate::status::{Fail, medley_status};
use core::ffi::c_void;
use medley_core::ensemble::Logits;
use medley_core::moe::ExpertRange;
use medley_core::moe::gating::{GroupScore, GroupedConfig, Scoring, grouped_topk};
use medley_core::moe::layer::{Experts, Plan, Routing, layer_scratch_len, moe_layer};
use medley_core::moe::plan::{align_block_size, block_padded_len, sort_by_expert};
use medley_core::{DType, Error, RowsMut, bf16, f16};

/// How `medley_moe_grouped_topk` turns router logits into scores; the
/// `scoring` field of `medley_moe_grouped_config`.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_moe_scoring {
    /// `s = softmax(x)` over the row.
    Softmax = 0,
    /// `s = sigmoid(x)` per expert (DeepSeek-V3).
    Sigmoid = 1,
}

/// How `medley_moe_grouped_topk` scores a group of experts; the
/// `group_score` field of `medley_moe_grouped_config`.
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_moe_group_score {
    /// Sum of the group's two largest selection scores (DeepSeek-V3
    /// `noaux_tc`; groups of at least 2 experts).
    Top2Sum = 0,
    /// The group's largest selection score (DeepSeek-V2).
    Max = 1,
}

/// Parameters of grouped, bias-corrected top-k routing
/// (`medley_moe_grouped_topk`, `medley_cuda_moe_grouped_topk`). A
/// versioned struct: fill it with `medley_moe_grouped_config_init(&c,
/// sizeof c)` (DeepSeek-V3's router: `k = 8`, sigmoid scores, 8 groups, 4
/// kept, top-2-sum group score, renormalized, scaled by 2.5), then change
/// fields by name. The bias is an argument of the functions (host or
/// device memory).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_moe_grouped_config {
    /// `sizeof(medley_moe_grouped_config)` of the caller's header (set by
    /// `medley_moe_grouped_config_init`).
    pub struct_size: usize,
    /// Experts per token, `1..=min(32, topk_group * E / n_group)`.
    pub k: usize,
    /// A `medley_moe_scoring` value.
    pub scoring: u32,
    /// A `medley_moe_group_score` value.
    pub group_score: u32,
    /// Number of equal contiguous expert groups (divides `E`, 1 to 256;
    /// 1 disables group limiting).
    pub n_group: usize,
    /// Groups kept per token, `1..=n_group`.
    pub topk_group: usize,
    /// Nonzero: divide the `k` unbiased scores by their sum.
    pub renormalize: u32,
    /// Multiplies every weight (after renormalization); finite, `> 0`.
    pub routed_scaling_factor: f32,
}

/// Size of the first `medley_moe_grouped_config` layout (ABI 1.1).
pub const MEDLEY_MOE_GROUPED_CONFIG_SIZE_V1: usize = 48;
const _: () = assert!(size_of::<medley_moe_grouped_config>() == MEDLEY_MOE_GROUPED_CONFIG_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; integers and a float only.
unsafe impl Versioned for medley_moe_grouped_config {
    const DEFAULT: Self = medley_moe_grouped_config {
        struct_size: size_of::<medley_moe_grouped_config>(),
        k: 8,
        scoring: medley_moe_scoring::Sigmoid as u32,
        group_score: medley_moe_group_score::Top2Sum as u32,
        n_group: 8,
        topk_group: 4,
        renormalize: 1,
        routed_scaling_factor: 2.5,
    };
    const SIZES: &'static [usize] = &[MEDLEY_MOE_GROUPED_CONFIG_SIZE_V1];
}

/// Fills `*config` with DeepSeek-V3's router parameters (`k = 8`,
/// `MEDLEY_MOE_SCORING_SIGMOID`, `n_group = 8`, `topk_group = 4`,
/// `MEDLEY_MOE_GROUP_SCORE_TOP2_SUM`, renormalized, `routed_scaling_factor
/// = 2.5`) and sets its `struct_size` to `struct_size` (pass `sizeof
/// *config`). Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED` or `MEDLEY_STATUS_STRUCT_SIZE`.
///
/// # Safety
/// `config` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_moe_grouped_config_init(
    config: *mut medley_moe_grouped_config,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(config, struct_size, "config") } })
}

/// The core's grouped configuration of a C one (the bias set by the
/// caller).
pub(crate) fn grouped_config<'a>(
    c: &medley_moe_grouped_config,
    bias: Option<&'a [f32]>,
) -> Result<GroupedConfig<'a>, Fail> {
    let scoring = match c.scoring {
        0 => Scoring::Softmax,
        1 => Scoring::Sigmoid,
        v => {
            return Err(Fail::BadEnum {
                arg: "config.scoring",
                value: v,
            });
        }
    };
    let group_score = match c.group_score {
        0 => GroupScore::Top2Sum,
        1 => GroupScore::Max,
        v => {
            return Err(Fail::BadEnum {
                arg: "config.group_score",
                value: v,
            });
        }
    };
    Ok(GroupedConfig {
        k: c.k,
        scoring,
        bias,
        n_group: c.n_group,
        topk_group: c.topk_group,
        group_score,
        renormalize: c.renormalize != 0,
        routed_scaling_factor: c.routed_scaling_factor,
    })
}

/// The local experts of a plan or a layer: global expert ids `first` to
/// `last - 1` (`first <= last <= E`). All experts: `{0, E}`. A plain
/// descriptor (passed by value, never grows).
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct medley_moe_range {
    /// First local expert (inclusive).
    pub first: u32,
    /// End of the local experts (exclusive).
    pub last: u32,
}

impl From<medley_moe_range> for ExpertRange {
    fn from(r: medley_moe_range) -> Self {
        ExpertRange {
            first: r.first,
            last: r.last,
        }
    }
}

/// Group-limited, bias-corrected top-k routing on the CPU (DeepSeek-V2/V3,
/// vLLM's `grouped_topk` / `fused_topk_bias` / `topk_sigmoid`), with the
/// semantics of medley's core (`medley_core::moe::gating::grouped_topk`):
/// scores `s` (sigmoid or softmax of the logits), selection scores `s + b`
/// (`b` the bias), the `topk_group` best of `n_group` contiguous groups
/// kept, the top `k` selection scores over their experts picked
/// (descending, ties to the lower index), weights the unbiased `s` of the
/// picks, renormalized when asked, times `routed_scaling_factor`.
///
/// - `logits`: `T x E` router logits (any `medley_dtype`, `E` 1 to 4096).
/// - `config`: the routing parameters (required; `k` is `config->k`).
/// - `bias`, `bias_len`: `E` finite per-expert selection biases
///   (`e_score_correction_bias`), or NULL and 0 for none.
/// - `ids`, `weights`: `T * k` outputs each (row `t` is `[t*k, (t+1)*k)`).
/// - `report`: nullable. A NaN row gets ids `0..k-1` and NaN weights; a
///   fully `-inf` row ids `0..k-1` and weights 0; both are counted.
///
/// Checked before anything is written; on failure the outputs and
/// `report` are untouched. Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED`,
/// `MEDLEY_STATUS_OVERFLOW`, `MEDLEY_STATUS_OVERLAP`,
/// `MEDLEY_STATUS_STRUCT_SIZE`, `MEDLEY_STATUS_BAD_SHAPE` (`E`, `k`, output
/// and bias lengths, `n_group` above 256) or `MEDLEY_STATUS_BAD_PARAMETER`
/// (`k` of 0, a non-finite bias, the scaling factor, `n_group` not
/// dividing `E`, `topk_group`, enum values).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it (and
/// `logits`, `config` for one struct, `report` for its `struct_size`).
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn medley_moe_grouped_topk(
    logits: *const medley_rows,
    config: *const medley_moe_grouped_config,
    bias: *const f32,
    bias_len: usize,
    ids: *mut u32,
    ids_len: usize,
    weights: *mut f32,
    weights_len: usize,
    report: *mut medley_report,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointers; copied at once.
        let r = *unsafe { get(logits, "logits") }?;
        // SAFETY: as above.
        let c = unsafe { versioned(config, "config") }?;
        let report = report_out(report)?;
        let mut regions = Regions::new();
        // SAFETY: the caller guarantees the logits buffer.
        let x = unsafe { host_rows(&r, "logits", 0, &mut regions) }?;
        regions.read(Region::host(bias, bias_len, "bias", 0)?);
        regions.written(Region::host(ids, ids_len, "ids", 0)?);
        regions.written(Region::host(weights, weights_len, "weights", 0)?);
        if let Some((p, size)) = report {
            regions.written(Region::host(p.cast_const().cast::<u8>(), size, "report", 0)?);
        }
        regions.check()?;
        // SAFETY: checked by Region::host; readable (the caller).
        let b = (!bias.is_null()).then(|| unsafe { slice(bias, bias_len) });
        let cfg = grouped_config(&c, b)?;
        // SAFETY: both outputs passed Region::host and overlap nothing else
        // (Regions::check); writable (the caller).
        let (ids, w) = unsafe { (slice_mut(ids, ids_len), slice_mut(weights, weights_len)) };
        let rep = match x {
            Logits::F32(rows) => grouped_topk(rows, &cfg, ids, w),
            Logits::F16(rows) => grouped_topk(rows, &cfg, ids, w),
            Logits::BF16(rows) => grouped_topk(rows, &cfg, ids, w),
        }?;
        if let Some(r) = report {
            // SAFETY: checked by report_out, disjoint from the outputs,
            // writable (the caller).
            unsafe { write_report(r, rep) };
        }
        Ok(())
    })
}

/// Buffer lengths of the block-padded routing plan (vLLM's
/// `moe_align_block_size` layout) for `slots = T * k` slots over
/// `local_experts` experts in blocks of `block_m` rows: `*sorted_ids_len =
/// round_up(slots + min(local_experts, slots) * (block_m - 1), block_m)`
/// and `*blocks = *sorted_ids_len / block_m`. The sizes of the outputs of
/// `medley_moe_align_block_size` and `medley_cuda_moe_align` (whose
/// `offsets` hold `local_experts + 1` values and `inverse` `slots`).
///
/// Both out-pointers are required; on failure they are untouched. Returns
/// `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERLAP` (the two outputs),
/// `MEDLEY_STATUS_BAD_SHAPE` (more than `UINT32_MAX` slots, a padded length
/// above `UINT32_MAX`) or `MEDLEY_STATUS_BAD_PARAMETER` (`block_m` of 0).
///
/// # Safety
/// The out-pointers must point to writable `size_t`s.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_moe_block_padded_len(
    slots: usize,
    local_experts: usize,
    block_m: usize,
    sorted_ids_len: *mut usize,
    blocks: *mut usize,
) -> medley_status {
    ffi_boundary!({
        let a = req_out_ptr(sorted_ids_len, "sorted_ids_len")?;
        let b = req_out_ptr(blocks, "blocks")?;
        if a == b {
            return Err(Fail::Overlap {
                written: "blocks",
                other: "sorted_ids_len",
            });
        }
        let (len, nb) = block_padded_len(slots, local_experts, block_m)?;
        // SAFETY: non-null, aligned (req_out_ptr), distinct, writable (the
        // caller).
        unsafe {
            a.write(len);
            b.write(nb);
        }
        Ok(())
    })
}

/// Where `medley_moe_align_block_size` writes its plan (host memory). A
/// versioned struct: start from `medley_moe_align_output_init(&o, sizeof
/// o)` (nothing set), then set the buffers.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_moe_align_output {
    /// `sizeof(medley_moe_align_output)` of the caller's header (set by
    /// `medley_moe_align_output_init`).
    pub struct_size: usize,
    /// Slot ids grouped by local expert, each expert's run padded to a
    /// multiple of `block_m` with the sentinel `T * k` (required;
    /// `sorted_ids_len` from `medley_moe_block_padded_len`).
    pub sorted_ids: *mut u32,
    /// Elements at `sorted_ids` (exactly the padded length).
    pub sorted_ids_len: usize,
    /// Local expert of each block of `block_m` positions, `UINT32_MAX`
    /// (`-1`) for blocks past the end (required).
    pub block_experts: *mut u32,
    /// Elements at `block_experts` (exactly `blocks`).
    pub block_experts_len: usize,
    /// `local_experts + 1` padded starts of the experts' runs (required on
    /// the CPU: the core uses them as cursors).
    pub offsets: *mut u64,
    /// Elements at `offsets` (exactly `local_experts + 1`).
    pub offsets_len: usize,
    /// Position of each slot in `sorted_ids`, `UINT32_MAX` for slots not
    /// placed (nullable).
    pub inverse: *mut u32,
    /// Elements at `inverse` (exactly `T * k` when given).
    pub inverse_len: usize,
    /// One `uint32_t`: `num_tokens_post_padded`, the positions in use
    /// (nullable).
    pub total: *mut u32,
}

/// Size of the first `medley_moe_align_output` layout (ABI 1.1).
pub const MEDLEY_MOE_ALIGN_OUTPUT_SIZE_V1: usize = 80;
const _: () = assert!(size_of::<medley_moe_align_output>() == MEDLEY_MOE_ALIGN_OUTPUT_SIZE_V1);

// SAFETY: repr(C), `struct_size: usize` first; integers and raw pointers.
unsafe impl Versioned for medley_moe_align_output {
    const DEFAULT: Self = medley_moe_align_output {
        struct_size: size_of::<medley_moe_align_output>(),
        sorted_ids: core::ptr::null_mut(),
        sorted_ids_len: 0,
        block_experts: core::ptr::null_mut(),
        block_experts_len: 0,
        offsets: core::ptr::null_mut(),
        offsets_len: 0,
        inverse: core::ptr::null_mut(),
        inverse_len: 0,
        total: core::ptr::null_mut(),
    };
    const SIZES: &'static [usize] = &[MEDLEY_MOE_ALIGN_OUTPUT_SIZE_V1];
}

/// Fills `*out` with no buffers set and sets its `struct_size` to
/// `struct_size` (pass `sizeof *out`). Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED` or
/// `MEDLEY_STATUS_STRUCT_SIZE`.
///
/// # Safety
/// `out` must be writable for `struct_size` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_moe_align_output_init(
    out: *mut medley_moe_align_output,
    struct_size: usize,
) -> medley_status {
    // SAFETY: the caller guarantees struct_size writable bytes.
    ffi_boundary!({ unsafe { init_versioned(out, struct_size, "out") } })
}

/// The block-padded routing plan on the CPU (vLLM's
/// `moe_align_block_size`, medley's `medley_core::moe::plan::
/// align_block_size`): the slots `i = t * k + j` of `ids` routed to the
/// local experts `range` are grouped by expert (a stable counting sort:
/// increasing slot id within an expert), each expert's run starting at a
/// multiple of `block_m` and padded with the sentinel `ids_len`. Slots
/// routed elsewhere (another rank's expert, or `UINT32_MAX` = routed
/// nowhere) are not placed. An expert with no slot owns no block. Equal
/// bit for bit to `medley_cuda_moe_align`.
///
/// - `ids`, `ids_len`: the `T * k` expert ids (each `< experts` or
///   `UINT32_MAX`).
/// - `experts`: `E`, all experts over all ranks (`>= 1`).
/// - `range`: the local experts (`first <= last <= experts`).
/// - `block_m`: rows per block (`>= 1`, any value).
/// - `out`: the buffers (required; lengths from
///   `medley_moe_block_padded_len`).
///
/// Checked before anything is written; on failure the outputs are
/// untouched. Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_STRUCT_SIZE`,
/// `MEDLEY_STATUS_BAD_SHAPE` (`experts` 0, output lengths, too many slots)
/// or `MEDLEY_STATUS_BAD_PARAMETER` (`range`, `block_m` 0, an id `>=
/// experts`).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it
/// (`out` for one struct of its `struct_size`, `total` for one value).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_moe_align_block_size(
    ids: *const u32,
    ids_len: usize,
    experts: usize,
    range: medley_moe_range,
    block_m: usize,
    out: *const medley_moe_align_output,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct; copied at once.
        let o = unsafe { versioned(out, "out") }?;
        let mut regions = Regions::new();
        regions.read(Region::host(ids, ids_len, "ids", 0)?);
        regions.written(Region::host(o.sorted_ids, o.sorted_ids_len, "out.sorted_ids", 0)?);
        regions.written(Region::host(
            o.block_experts,
            o.block_experts_len,
            "out.block_experts",
            0,
        )?);
        regions.written(Region::host(o.offsets, o.offsets_len, "out.offsets", 0)?);
        if !o.inverse.is_null() {
            regions.written(Region::host(o.inverse, o.inverse_len, "out.inverse", 0)?);
        }
        if !o.total.is_null() {
            regions.written(Region::host(o.total, 1, "out.total", 0)?);
        }
        regions.check()?;
        // SAFETY: every buffer passed Region::host; the written ones overlap
        // nothing else of the call (Regions::check); valid (the caller).
        let (ids, sorted, bexp, offsets) = unsafe {
            (
                slice(ids, ids_len),
                slice_mut(o.sorted_ids, o.sorted_ids_len),
                slice_mut(o.block_experts, o.block_experts_len),
                slice_mut(o.offsets, o.offsets_len),
            )
        };
        // SAFETY: as above.
        let inverse = (!o.inverse.is_null()).then(|| unsafe { slice_mut(o.inverse, o.inverse_len) });
        let total = align_block_size(
            ids,
            experts,
            range.into(),
            block_m,
            sorted,
            bexp,
            offsets,
            inverse,
        )?;
        if !o.total.is_null() {
            // SAFETY: checked above (non-null, aligned, disjoint); the
            // padded length, hence the total, fits u32 (block_padded_len).
            unsafe { o.total.write(total as u32) };
        }
        Ok(())
    })
}

/// The expert weights of a CPU layer (host memory): a plain descriptor
/// (never grows). Local expert `l` is global expert `range.first + l`.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_moe_experts {
    /// `[L, 2I, H]` row-major: each local expert's gate rows `0..I`, then
    /// its up rows `I..2I` (vLLM's `w13`).
    pub w13: *const c_void,
    /// Elements at `w13` (exactly `L * 2I * H`).
    pub w13_len: usize,
    /// `[L, H, I]` row-major down projections (vLLM's `w2`).
    pub w2: *const c_void,
    /// Elements at `w2` (exactly `L * H * I`).
    pub w2_len: usize,
    /// A `medley_dtype` value (both tensors).
    pub dtype: u32,
    /// Hidden size `H`.
    pub hidden: usize,
    /// Intermediate size `I`.
    pub inter: usize,
    /// The local experts these weights hold (`L = last - first`).
    pub range: medley_moe_range,
}

/// The routing of a CPU layer (host memory): a plain descriptor.
#[repr(C)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy)]
pub struct medley_moe_routing {
    /// `[T, k]` global expert ids (`< experts`, or `UINT32_MAX`: routed
    /// nowhere).
    pub ids: *const u32,
    /// Elements at `ids` (exactly `T * k`).
    pub ids_len: usize,
    /// `[T, k]` routing weights.
    pub weights: *const f32,
    /// Elements at `weights` (exactly `T * k`).
    pub weights_len: usize,
    /// Experts per token.
    pub k: usize,
    /// `E`, all experts over all ranks.
    pub experts: usize,
}

/// The byte layout of the CPU layer's scratch: `(offsets, sorted, f32
/// scratch)` lengths and the total in bytes.
fn cpu_layer_layout(
    t: usize,
    k: usize,
    h: usize,
    i: usize,
    l: usize,
) -> Result<(usize, usize, usize, usize), Fail> {
    let of = || Fail::Core(Error::SizeOverflow { arg: "scratch" });
    let n = t.checked_mul(k).ok_or_else(of)?;
    let f = layer_scratch_len(t, k, h, i)?;
    let off = l.checked_add(1).ok_or_else(of)?;
    let bytes = off
        .checked_mul(8)
        .and_then(|a| a.checked_add(n.checked_mul(4)?))
        .and_then(|a| a.checked_add(f.checked_mul(4)?))
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or_else(of)?;
    Ok((off, n, f, bytes))
}

/// Scratch bytes `medley_moe_layer` needs for `tokens` tokens, `k` experts
/// per token, hidden size `hidden`, intermediate size `inter` and
/// `local_experts` local experts, into `*bytes` (the expert-sorted plan
/// and the per-slot expert outputs: about `4 * T * k * H` bytes).
/// Allocate it 8-byte aligned; its contents on entry do not matter.
///
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED` or `MEDLEY_STATUS_OVERFLOW`; on failure
/// `*bytes` is untouched.
///
/// # Safety
/// `bytes` must point to a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_moe_layer_scratch_bytes(
    tokens: usize,
    k: usize,
    hidden: usize,
    inter: usize,
    local_experts: usize,
    bytes: *mut usize,
) -> medley_status {
    ffi_boundary!({
        let out = req_out_ptr(bytes, "bytes")?;
        let (_, _, _, b) = cpu_layer_layout(tokens, k, hidden, inter, local_experts)?;
        // SAFETY: non-null, aligned, writable (the caller).
        unsafe { out.write(b) };
        Ok(())
    })
}

/// A checked host weight tensor of `dtype`, registered as read.
enum HostW<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

/// # Safety
/// `p` must be readable for `len` elements of `dt`.
unsafe fn host_w<'a>(
    p: *const c_void,
    len: usize,
    dt: DType,
    arg: &'static str,
    regions: &mut Regions,
) -> Result<HostW<'a>, Fail> {
    // SAFETY (each arm): Region::host checked the pointer for this type;
    // readable (the caller).
    Ok(match dt {
        DType::F32 => {
            regions.read(Region::host(p.cast::<f32>(), len, arg, 0)?);
            // SAFETY: see above.
            HostW::F32(unsafe { slice(p.cast(), len) })
        }
        DType::F16 => {
            regions.read(Region::host(p.cast::<f16>(), len, arg, 0)?);
            // SAFETY: see above.
            HostW::F16(unsafe { slice(p.cast(), len) })
        }
        DType::BF16 => {
            regions.read(Region::host(p.cast::<bf16>(), len, arg, 0)?);
            // SAFETY: see above.
            HostW::BF16(unsafe { slice(p.cast(), len) })
        }
    })
}

/// The whole MoE expert layer on the CPU, medley's reference
/// (`medley_core::moe::layer::moe_layer` after the expert-sorted plan of
/// `medley_core::moe::plan::sort_by_expert`): for token `t` with picks
/// `(ids[t, j], weights[t, j])`, `out_t = sum_j weights[t, j] * W2[e] .
/// (silu(W13[e][0..I] . x_t) * (W13[e][I..2I] . x_t))`, the `k` terms
/// added in `j` order, everything in `f32` (inputs widened exactly; the
/// output rounded once to `out_dtype`). Deterministic and
/// batch-invariant.
///
/// Edge cases: a slot routed to a non-local expert or to `UINT32_MAX`
/// contributes nothing; a slot of weight exactly 0 contributes exactly 0
/// (it is not computed); a NaN weight makes its token's row NaN (counted
/// in `report->nan_rows`); a token with no contributing slot gets a zero
/// row (counted in `report->masked_rows`, normal under expert
/// parallelism); an expert with no slot costs nothing.
///
/// - `x`: `T x H` activations (any `medley_dtype`, any stride).
/// - `experts`: the local experts' weights (required).
/// - `routing`: ids and weights (`T * k` each), `k`, `E` (required).
/// - `scratch`, `scratch_bytes`: at least `medley_moe_layer_scratch_bytes`
///   bytes, 8-byte aligned (contents do not matter; overwritten).
/// - `out`, `out_len`, `out_dtype`, `out_stride`: `T x H` outputs of
///   `out_dtype` with row stride `out_stride` (0: `H`).
/// - `report`: nullable.
///
/// Checked before anything is written; on failure `out` and `report` are
/// untouched (`scratch` may have been written). Returns
/// `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_BAD_SHAPE` (lengths, sizes of 0,
/// a short scratch, too many slots) or `MEDLEY_STATUS_BAD_PARAMETER`
/// (`k` 0, the range, an id `>= E`, enum values).
///
/// # Safety
/// Every non-null pointer must be valid for the length given with it (the
/// structs for one struct each, `report` for its `struct_size`).
#[unsafe(no_mangle)]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn medley_moe_layer(
    x: *const medley_rows,
    experts: *const medley_moe_experts,
    routing: *const medley_moe_routing,
    scratch: *mut c_void,
    scratch_bytes: usize,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
    out_stride: usize,
    report: *mut medley_report,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointers; copied at once.
        let (xr, ex, ro) = unsafe {
            (
                *get(x, "x")?,
                *get(experts, "experts")?,
                *get(routing, "routing")?,
            )
        };
        let report = report_out(report)?;
        let mut regions = Regions::new();
        // SAFETY: the caller guarantees the activations.
        let xs = unsafe { host_rows(&xr, "x", 0, &mut regions) }?;
        let wdt = dtype("experts.dtype", ex.dtype)?;
        // SAFETY: the caller guarantees the weights.
        let w13 = unsafe { host_w(ex.w13, ex.w13_len, wdt, "experts.w13", &mut regions) }?;
        // SAFETY: as above.
        let w2 = unsafe { host_w(ex.w2, ex.w2_len, wdt, "experts.w2", &mut regions) }?;
        regions.read(Region::host(ro.ids, ro.ids_len, "routing.ids", 0)?);
        regions.read(Region::host(ro.weights, ro.weights_len, "routing.weights", 0)?);
        let odt = dtype("out_dtype", out_dtype)?;
        let out_region = match odt {
            DType::F32 => Region::host(out.cast_const().cast::<f32>(), out_len, "out", 0)?,
            DType::F16 => Region::host(out.cast_const().cast::<f16>(), out_len, "out", 0)?,
            DType::BF16 => Region::host(out.cast_const().cast::<bf16>(), out_len, "out", 0)?,
        };
        regions.written(out_region);
        regions.written(Region::host(
            scratch.cast_const().cast::<u8>(),
            scratch_bytes,
            "scratch",
            0,
        )?);
        if let Some((p, size)) = report {
            regions.written(Region::host(p.cast_const().cast::<u8>(), size, "report", 0)?);
        }
        regions.check()?;
        if scratch_bytes > 0 && !(scratch as usize).is_multiple_of(8) {
            return Err(Fail::Misaligned {
                arg: "scratch",
                index: 0,
                align: 8,
            });
        }
        if ro.k == 0 {
            return Err(Error::OutOfRange {
                arg: "routing.k",
                index: 0,
            }
            .into());
        }
        let t = xr.rows;
        let range: ExpertRange = ex.range.into();
        if range.first > range.last || range.last as usize > ro.experts {
            return Err(Error::OutOfRange {
                arg: "experts.range",
                index: 0,
            }
            .into());
        }
        let (noff, n, nf, need) = cpu_layer_layout(t, ro.k, ex.hidden, ex.inter, range.len())?;
        if scratch_bytes < need {
            return Err(Error::BufferTooShort {
                arg: "scratch",
                needed: need,
                got: scratch_bytes,
            }
            .into());
        }
        // SAFETY: checked by Region::host; readable (the caller).
        let (ids, rw) = unsafe { (slice(ro.ids, ro.ids_len), slice(ro.weights, ro.weights_len)) };
        // The scratch, carved: offsets (u64, at the 8-aligned base),
        // sorted slot ids (u32), the core's f32 scratch. Exclusive to the
        // call (Regions::check) and long enough (checked above).
        let base = scratch.cast::<u8>();
        // SAFETY: see above; each piece lies within the scratch, aligned
        // for its type (8 * noff and 4 * n keep the alignments).
        let (offsets, sorted, fs) = unsafe {
            (
                slice_mut(base.cast::<u64>(), noff),
                slice_mut(base.add(8 * noff).cast::<u32>(), n),
                slice_mut(base.add(8 * noff + 4 * n).cast::<f32>(), nf),
            )
        };
        if ids.len() == n {
            // The plan; a mismatched ids length is left for the layer to
            // report under its own name.
            sort_by_expert(ids, ro.experts, range, sorted, offsets, None)?;
        } else {
            return Err(Error::LengthMismatch {
                arg: "routing.ids",
                index: 0,
                expected: n,
                got: ids.len(),
            }
            .into());
        }
        let plan = Plan { sorted, offsets };
        let rt = Routing {
            ids,
            weights: rw,
            k: ro.k,
            experts: ro.experts,
        };
        let ostride = stride_or(out_stride, ex.hidden);
        macro_rules! with_out {
            ($xrows:expr, $w13:expr, $w2:expr) => {{
                let e = Experts {
                    w13: $w13,
                    w2: $w2,
                    hidden: ex.hidden,
                    inter: ex.inter,
                    range,
                };
                match odt {
                    DType::F32 => {
                        // SAFETY: `out` passed Region::host for f32 and
                        // Regions::check; writable (the caller).
                        let s = unsafe { slice_mut(out.cast::<f32>(), out_len) };
                        let o = RowsMut::new(s, t, ex.hidden, ostride).map_err(at("out", 0))?;
                        moe_layer($xrows, &e, &rt, &plan, fs, o)?
                    }
                    DType::F16 => {
                        // SAFETY: as above, for f16.
                        let s = unsafe { slice_mut(out.cast::<f16>(), out_len) };
                        let o = RowsMut::new(s, t, ex.hidden, ostride).map_err(at("out", 0))?;
                        moe_layer($xrows, &e, &rt, &plan, fs, o)?
                    }
                    DType::BF16 => {
                        // SAFETY: as above, for bf16.
                        let s = unsafe { slice_mut(out.cast::<bf16>(), out_len) };
                        let o = RowsMut::new(s, t, ex.hidden, ostride).map_err(at("out", 0))?;
                        moe_layer($xrows, &e, &rt, &plan, fs, o)?
                    }
                }
            }};
        }
        macro_rules! with_w {
            ($xrows:expr) => {
                match (w13, w2) {
                    (HostW::F32(a), HostW::F32(b)) => with_out!($xrows, a, b),
                    (HostW::F16(a), HostW::F16(b)) => with_out!($xrows, a, b),
                    (HostW::BF16(a), HostW::BF16(b)) => with_out!($xrows, a, b),
                    _ => unreachable!("one dtype for both weight tensors"),
                }
            };
        }
        let rep = match xs {
            Logits::F32(r) => with_w!(r),
            Logits::F16(r) => with_w!(r),
            Logits::BF16(r) => with_w!(r),
        };
        if let Some(r) = report {
            // SAFETY: checked by report_out, disjoint from every other
            // buffer (Regions::check), writable (the caller).
            unsafe { write_report(r, rep) };
        }
        Ok(())
    })
}
