//! MoE routing on the GPU (`ptx/routing.ptx`): the block-padded plan of
//! vLLM's `moe_align_block_size` ([`Align`], equal to the CPU's
//! [`medley_core::moe::plan::align_block_size`] bit for bit), the gather of
//! token rows into plan order ([`Permute`]) and the weighted k-way combine
//! back to token order ([`Combine`]).
//!
//! No host synchronization inside any call: [`Permute`] reads the padded
//! row count from device memory, so the three calls can be captured in one
//! CUDA graph. Differences from the CPU functions: expert ids in device
//! memory cannot be checked before the launch; an id outside `[first,
//! last)` (including one `>= E`) is simply not placed, as `NO_EXPERT` is.

use crate::error::CudaError;
use crate::mem::{DeviceRowsMut, DeviceSlice, DeviceSliceMut, Stream, check_ptr, need_len};
use crate::registry::{BLOCK, Kernel, Kernels};
use cust_core::DeviceCopy;
use half::{bf16, f16};
use medley_core::Error;
use medley_core::moe::ExpertRange;
use medley_core::moe::plan::block_padded_len;

pub use crate::specs::MAX_ALIGN_EXPERTS;
use crate::specs::align_smem;

#[repr(C, align(8))]
#[derive(Debug, Clone, Copy)]
struct AlignParams {
    ids: u64,
    sorted: u64,
    block_experts: u64,
    offsets: u64,
    inverse: u64,
    total: u64,
    n: u32,
    first: u32,
    last: u32,
    block_m: u32,
    len: u32,
    blocks: u32,
}
const _: () = assert!(core::mem::size_of::<AlignParams>() == 72);
// SAFETY: #[repr(C)] plain data laid out as moe_align's 72-byte parameter
// (ptx/routing.ptx), size asserted.
unsafe impl DeviceCopy for AlignParams {}

/// Outputs of [`Align`] (device memory, lengths from
/// [`block_padded_len`]).
#[derive(Debug)]
pub struct AlignOutput<'o> {
    /// `u32 [len]`: slot ids grouped by local expert, padded with `T * k`.
    pub sorted_ids: DeviceSliceMut<'o, u32>,
    /// `u32 [blocks]`: local expert of each block, `NO_EXPERT` past the end.
    pub block_experts: DeviceSliceMut<'o, u32>,
    /// `u32 [1]`: `num_tokens_post_padded`.
    pub total: DeviceSliceMut<'o, u32>,
    /// `u64 [L + 1]`: padded starts, optional.
    pub offsets: Option<DeviceSliceMut<'o, u64>>,
    /// `u32 [T * k]`: position of each slot, or `NO_POSITION`; optional.
    pub inverse: Option<DeviceSliceMut<'o, u32>>,
}

/// The block-padded routing plan on the GPU (the twin of
/// [`medley_core::moe::plan::align_block_size`]): see [`Align`]'s rules.
#[derive(Debug)]
#[non_exhaustive]
pub struct Align<'a> {
    /// `u32 [T * k]`: every slot's expert.
    pub ids: DeviceSlice<'a, u32>,
    /// Experts in all.
    pub experts: usize,
    /// The local experts this plan covers.
    pub range: ExpertRange,
    /// The plan's block size.
    pub block_m: usize,
    /// The plan, written.
    pub out: AlignOutput<'a>,
}

impl<'a> Align<'a> {
    /// A plan of `ids` over `range` of `experts` in blocks of `block_m`.
    pub fn new(
        ids: DeviceSlice<'a, u32>,
        experts: usize,
        range: ExpertRange,
        block_m: usize,
        out: AlignOutput<'a>,
    ) -> Self {
        Align {
            ids,
            experts,
            range,
            block_m,
            out,
        }
    }
}

impl crate::Launch for Align<'_> {
    fn launch(self, kernels: &Kernels, stream: Stream<'_>) -> Result<(), CudaError> {
        align(
            kernels,
            self.ids,
            self.experts,
            self.range,
            self.block_m,
            self.out,
            stream,
        )
    }
}

/// Gathers token rows into plan order: see [`Permute`]'s rules.
#[derive(Debug)]
#[non_exhaustive]
pub struct Permute<'a> {
    /// Token rows `[T, H]`.
    pub x: DeviceMatrix<'a>,
    /// Experts per token.
    pub k: usize,
    /// The plan's `sorted_ids`.
    pub sorted_ids: DeviceSlice<'a, u32>,
    /// The plan's `total`.
    pub total: DeviceSlice<'a, u32>,
    /// `[len, H]` rows in plan order, written.
    pub out: DeviceMatrixMut<'a>,
}

impl<'a> Permute<'a> {
    /// Gathers `x` by the plan into `out`.
    pub fn new(
        x: DeviceMatrix<'a>,
        k: usize,
        sorted_ids: DeviceSlice<'a, u32>,
        total: DeviceSlice<'a, u32>,
        out: DeviceMatrixMut<'a>,
    ) -> Self {
        Permute {
            x,
            k,
            sorted_ids,
            total,
            out,
        }
    }
}

impl crate::Launch for Permute<'_> {
    fn launch(self, kernels: &Kernels, stream: Stream<'_>) -> Result<(), CudaError> {
        permute(
            kernels,
            self.x,
            self.k,
            self.sorted_ids,
            self.total,
            self.out,
            stream,
        )
    }
}

/// The weighted k-way combine: `out[t, h] = sum_j w[t, j] * y[inverse[t *
/// k + j], h]` in `j` order (f32), skipping unplaced slots (`NO_POSITION`)
/// and zero weights. `y` holds one row per plan position; a position at or
/// past `y.rows()` (a plan that does not belong to this `y`) makes that
/// token's output NaN instead of reading out of bounds.
///
/// `prescaled`: the rows already hold `w[t, j] * y` (as
/// [`crate::experts::Gemm2`] writes them): `out[t, h] = sum_j y[inverse[t
/// * k + j], h]` with the same skips and poisoning, bit for bit what the
/// unscaled combine gives when the scaling was `w * y` rounded to `f32`.
#[derive(Debug)]
#[non_exhaustive]
pub struct Combine<'a> {
    /// One row per plan position.
    pub y: DeviceMatrix<'a>,
    /// Experts per token.
    pub k: usize,
    /// `u32 [T * k]`: the plan's inverse.
    pub inverse: DeviceSlice<'a, u32>,
    /// `f32 [T * k]`: routing weights.
    pub weights: DeviceSlice<'a, f32>,
    /// `f32 [T, H]`, written.
    pub out: DeviceRowsMut<'a, f32>,
    /// Rows are already weighted (the weight only decides which slots
    /// count).
    pub prescaled: bool,
}

impl<'a> Combine<'a> {
    /// A weighted combine (not prescaled).
    pub fn new(
        y: DeviceMatrix<'a>,
        k: usize,
        inverse: DeviceSlice<'a, u32>,
        weights: DeviceSlice<'a, f32>,
        out: DeviceRowsMut<'a, f32>,
    ) -> Self {
        Combine {
            y,
            k,
            inverse,
            weights,
            out,
            prescaled: false,
        }
    }

    /// Marks the rows as already weighted.
    pub fn prescaled(mut self) -> Self {
        self.prescaled = true;
        self
    }
}

impl crate::Launch for Combine<'_> {
    fn launch(self, kernels: &Kernels, stream: Stream<'_>) -> Result<(), CudaError> {
        let flags = u32::from(self.prescaled);
        combine_impl(
            kernels,
            self.y,
            self.k,
            self.inverse,
            self.weights,
            self.out,
            stream,
            flags,
        )
    }
}

/// The block-padded plan of the slots' expert `ids` (`T * k` u32) for the
/// local experts `range` of `experts`, in blocks of `block_m`.
pub(crate) fn align(
    kernels: &Kernels,
    ids: DeviceSlice<'_, u32>,
    experts: usize,
    range: ExpertRange,
    block_m: usize,
    out: AlignOutput<'_>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
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
    let l = range.len();
    if l > MAX_ALIGN_EXPERTS {
        return Err(Error::TooLarge {
            arg: "range",
            index: 0,
            max: MAX_ALIGN_EXPERTS,
            got: l,
        }
        .into());
    }
    let n = ids.len();
    let (len, blocks) = block_padded_len(n, l, block_m)?;
    need_len("sorted_ids", len, out.sorted_ids.len())?;
    need_len("block_experts", blocks, out.block_experts.len())?;
    need_len("total", 1, out.total.len())?;
    check_ptr(ids.as_raw(), n, 4, "ids")?;
    check_ptr(out.sorted_ids.as_raw(), len, 4, "sorted_ids")?;
    check_ptr(out.block_experts.as_raw(), blocks, 4, "block_experts")?;
    check_ptr(out.total.as_raw(), 1, 4, "total")?;
    let mut p = AlignParams {
        ids: ids.as_raw(),
        sorted: out.sorted_ids.as_raw(),
        block_experts: out.block_experts.as_raw(),
        offsets: 0,
        inverse: 0,
        total: out.total.as_raw(),
        n: n as u32,
        first: range.first,
        last: range.last,
        block_m: block_m as u32,
        len: len as u32,
        blocks: blocks as u32,
    };
    if let Some(o) = &out.offsets {
        need_len("offsets", l + 1, o.len())?;
        check_ptr(o.as_raw(), l + 1, 8, "offsets")?;
        p.offsets = o.as_raw();
    }
    if let Some(i) = &out.inverse {
        need_len("inverse", n, i.len())?;
        check_ptr(i.as_raw(), n, 4, "inverse")?;
        p.inverse = i.as_raw();
    }
    let smem = align_smem(l);
    if smem > kernels.info(Kernel::MoeAlign).max_dynamic_smem {
        return Err(CudaError::Unsupported {
            what: "moe_align: not enough shared memory for this many local experts",
        });
    }
    let _ctx = kernels.enter()?;
    let f = *kernels.func(Kernel::MoeAlign);
    let grid = 1u32;
    let block = 1024u32;
    // SAFETY: `p` is moe_align's 72-byte parameter (size asserted); every
    // view was checked against the lengths the kernel writes
    // (block_padded_len for sorted_ids and block_experts, L + 1 offsets, n
    // slots); the dynamic shared memory is the 4 * (33 L + 1) bytes it
    // indexes (L <= 1024, within the opt-in limit the registry set); one
    // block of 1024 threads as the kernel requires; the stream belongs to
    // the kernels' context.
    unsafe { kernels.launch(f, grid, block, smem, stream, &p) }
}

/// Token rows or expert outputs in device memory (any element type).
pub use crate::mem::DeviceMatrix;

/// Writable rows in device memory (any element type).
#[derive(Debug)]
pub enum DeviceMatrixMut<'a> {
    /// `f32` rows.
    F32(DeviceRowsMut<'a, f32>),
    /// `f16` rows.
    F16(DeviceRowsMut<'a, f16>),
    /// `bf16` rows.
    BF16(DeviceRowsMut<'a, bf16>),
}

impl DeviceMatrixMut<'_> {
    /// A writable view of the same rows for a shorter borrow.
    pub fn reborrow(&mut self) -> DeviceMatrixMut<'_> {
        match self {
            DeviceMatrixMut::F32(r) => DeviceMatrixMut::F32(r.reborrow()),
            DeviceMatrixMut::F16(r) => DeviceMatrixMut::F16(r.reborrow()),
            DeviceMatrixMut::BF16(r) => DeviceMatrixMut::BF16(r.reborrow()),
        }
    }

    /// A read-only view of the same rows, borrowing this one.
    pub fn as_matrix(&self) -> DeviceMatrix<'_> {
        match self {
            DeviceMatrixMut::F32(r) => DeviceMatrix::F32(r.as_rows()),
            DeviceMatrixMut::F16(r) => DeviceMatrix::F16(r.as_rows()),
            DeviceMatrixMut::BF16(r) => DeviceMatrix::BF16(r.as_rows()),
        }
    }

    fn parts(&self) -> (u64, usize, usize, usize, u32, usize) {
        match self {
            DeviceMatrixMut::F32(r) => (r.as_raw(), r.rows(), r.len(), r.stride(), 0, 4),
            DeviceMatrixMut::F16(r) => (r.as_raw(), r.rows(), r.len(), r.stride(), 1, 2),
            DeviceMatrixMut::BF16(r) => (r.as_raw(), r.rows(), r.len(), r.stride(), 2, 2),
        }
    }
}

#[repr(C, align(8))]
#[derive(Debug, Clone, Copy)]
struct PermuteParams {
    x: u64,
    sorted: u64,
    total: u64,
    out: u64,
    len: u32,
    h: u32,
    xs: u32,
    os: u32,
    k: u32,
    n: u32,
    esize: u32,
    vec: u32,
}
const _: () = assert!(core::mem::size_of::<PermuteParams>() == 64);
// SAFETY: #[repr(C)] plain data laid out as moe_permute's 64-byte
// parameter (ptx/routing.ptx), size asserted.
unsafe impl DeviceCopy for PermuteParams {}

/// Gathers token rows `x` (`T x H`) into plan order: `out` row `p` (of
/// `sorted_ids.len()` rows) is token `sorted_ids[p] / k` for `p <
/// total[0]`, zero for padding rows and rows past `total`.
pub(crate) fn permute(
    kernels: &Kernels,
    x: DeviceMatrix<'_>,
    k: usize,
    sorted_ids: DeviceSlice<'_, u32>,
    total: DeviceSlice<'_, u32>,
    out: DeviceMatrixMut<'_>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    let (xp, t, h, xs, xd, esize) = x.parts();
    let (op, rows, oh, os, od, _) = out.parts();
    if xd != od {
        return Err(Error::Unsupported {
            what: "permute: x and out of different element types",
        }
        .into());
    }
    if k == 0 {
        return Err(Error::OutOfRange { arg: "k", index: 0 }.into());
    }
    let n = t
        .checked_mul(k)
        .filter(|&n| n < u32::MAX as usize)
        .ok_or(Error::SizeOverflow { arg: "T * k" })?;
    need_len("out.rows", sorted_ids.len(), rows)?;
    need_len("out.len", h, oh)?;
    need_len("total", 1, total.len())?;
    check_ptr(xp, t * h, esize, "x")?;
    check_ptr(op, rows * h, esize, "out")?;
    check_ptr(sorted_ids.as_raw(), rows, 4, "sorted_ids")?;
    check_ptr(total.as_raw(), 1, 4, "total")?;
    let fits = |v: usize, arg| u32::try_from(v).map_err(|_| CudaError::from(Error::SizeOverflow { arg }));
    let vec = (h * esize).is_multiple_of(16)
        && (xs * esize).is_multiple_of(16)
        && (os * esize).is_multiple_of(16)
        && xp.is_multiple_of(16)
        && op.is_multiple_of(16);
    let p = PermuteParams {
        x: xp,
        sorted: sorted_ids.as_raw(),
        total: total.as_raw(),
        out: op,
        len: fits(rows, "out.rows")?,
        h: fits(h, "x.len")?,
        xs: fits(xs, "x.stride")?,
        os: fits(os, "out.stride")?,
        k: fits(k, "k")?,
        n: n as u32,
        esize: esize as u32,
        vec: vec as u32,
    };
    if rows == 0 {
        return Ok(());
    }
    let _ctx = kernels.enter()?;
    let f = *kernels.func(Kernel::MoePermute);
    let grid = (rows as u32).min(kernels.sm_count() * 16);
    // SAFETY: `p` is moe_permute's 64-byte parameter (size asserted); x
    // holds T rows of xs elements (the kernel reads rows sorted_ids[p] / k
    // < T only for sorted_ids[p] < n = T * k), out holds `rows` rows of os
    // elements, sorted_ids `rows` values and total one; 16-byte copies only
    // when every row start and length is a 16-byte multiple; the stream
    // belongs to the kernels' context.
    unsafe { kernels.launch(f, grid, BLOCK, 0, stream, &p) }
}

#[repr(C, align(8))]
#[derive(Debug, Clone, Copy)]
struct CombineParams {
    y: u64,
    inverse: u64,
    weights: u64,
    out: u64,
    t: u32,
    h: u32,
    ys: u32,
    os: u32,
    k: u32,
    dtype: u32,
    yrows: u32,
    flags: u32,
}
const _: () = assert!(core::mem::size_of::<CombineParams>() == 64);
// SAFETY: #[repr(C)] plain data laid out as moe_combine's 64-byte
// parameter (ptx/routing.ptx), size asserted.
unsafe impl DeviceCopy for CombineParams {}

/// [`Combine`] with `prescaled` set (called by the expert layer).
pub(crate) fn combine_prescaled(
    kernels: &Kernels,
    y: DeviceMatrix<'_>,
    k: usize,
    inverse: DeviceSlice<'_, u32>,
    weights: DeviceSlice<'_, f32>,
    out: DeviceRowsMut<'_, f32>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    combine_impl(kernels, y, k, inverse, weights, out, stream, 1)
}

#[allow(clippy::too_many_arguments)]
fn combine_impl(
    kernels: &Kernels,
    y: DeviceMatrix<'_>,
    k: usize,
    inverse: DeviceSlice<'_, u32>,
    weights: DeviceSlice<'_, f32>,
    out: DeviceRowsMut<'_, f32>,
    stream: Stream<'_>,
    flags: u32,
) -> Result<(), CudaError> {
    let (yp, yrows, h, ys, yd, esize) = y.parts();
    let t = out.rows();
    if k == 0 {
        return Err(Error::OutOfRange { arg: "k", index: 0 }.into());
    }
    if k > 32 {
        return Err(Error::TooLarge {
            arg: "k",
            index: 0,
            max: 32,
            got: k,
        }
        .into());
    }
    let n = t
        .checked_mul(k)
        .filter(|&n| n <= u32::MAX as usize)
        .ok_or(Error::SizeOverflow { arg: "T * k" })?;
    need_len("inverse", n, inverse.len())?;
    need_len("weights", n, weights.len())?;
    need_len("out.len", h, out.len())?;
    check_ptr(yp, yrows * h, esize, "y")?;
    check_ptr(inverse.as_raw(), n, 4, "inverse")?;
    check_ptr(weights.as_raw(), n, 4, "weights")?;
    check_ptr(out.as_raw(), t * h, 4, "out")?;
    let fits = |v: usize, arg| u32::try_from(v).map_err(|_| CudaError::from(Error::SizeOverflow { arg }));
    let p = CombineParams {
        y: yp,
        inverse: inverse.as_raw(),
        weights: weights.as_raw(),
        out: out.as_raw(),
        t: fits(t, "out.rows")?,
        h: fits(h, "y.len")?,
        ys: fits(ys, "y.stride")?,
        os: fits(out.stride(), "out.stride")?,
        k: k as u32,
        dtype: yd,
        yrows: fits(yrows, "y.rows")?,
        flags,
    };
    if t == 0 {
        return Ok(());
    }
    let _ctx = kernels.enter()?;
    let f = *kernels.func(Kernel::MoeCombine);
    let grid = (t as u32).min(kernels.sm_count() * 16);
    // SAFETY: `p` is moe_combine's 64-byte parameter (size asserted); the
    // kernel reads y rows only at positions below `yrows` (checked in the
    // kernel, others poison the token), T * k inverse entries and weights,
    // and writes T rows of `out`; k <= 32 fits its shared arrays; the
    // stream belongs to the kernels' context.
    unsafe { kernels.launch(f, grid, BLOCK, 0, stream, &p) }
}
