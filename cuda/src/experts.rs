//! The sparse expert matmuls of an MoE layer on the GPU: grouped GEMMs that
//! run each local expert's weights only over the rows the block-padded plan
//! ([`crate::routing::Align`]) routes to it. Empty experts own no plan block
//! and cost nothing; blocks of other ranks' experts are never placed.
//!
//! - [`Gemm1`]: gate and up projections with SwiGLU fused into the
//!   epilogue: `act[p, n] = silu(x[row(p)] . w13[e][n]) * (x[row(p)] .
//!   w13[e][I + n])`, rounded once to the activation dtype.
//! - [`Gemm2`]: the down projection with the routing weight applied in the
//!   epilogue: `y[p, h] = w[slot(p)] * (act[p] . w2[e][h])` as `f32`; then
//!   [`crate::routing::Combine`] (prescaled) sums each token's `k` rows in `j`
//!   order (deterministic, batch-invariant).
//! - [`Layer`]: permute (when needed), GEMM1, GEMM2 and combine on one
//!   stream: the GPU twin of [`medley_core::moe::layer::moe_layer`].
//!
//! Two generations of kernels, side by side (`ptx/gen/moe_gemm.py` writes
//! both and the table [`GEMMS`]):
//!
//! - [`Generation::Mma`] (`ptx/moe_mma.ptx`, sm_80+): `mma.sync` with
//!   `ldmatrix`, a multi-stage `cp.async` pipeline and XOR-swizzled shared
//!   memory; token rows are gathered inside the kernel.
//! - [`Generation::Wgmma`] (`ptx/moe_wgmma.ptx`, sm_90a): `wgmma` fed by TMA
//!   through a full/empty mbarrier ring, a producer warp and one or two
//!   consumer warpgroups; A must already be in plan order (TMA cannot
//!   gather), so [`Layer`] permutes `x` first.
//!
//! Which configuration runs for a shape comes from a [`Tuning`] table: the
//! one `benches/src/bin/tune_experts.rs` wrote on the GPU at hand (read at
//! run time from `MEDLEY_GEMM_TUNING`), else the built-in table for the
//! device ([`Tuning::for_kernels`]: the table of that device name, else of
//! that GPU model, else the H100's, `cuda/tuning/h100.txt`).
//!
//! Arithmetic: bf16 or f16 activations and weights (one dtype for both),
//! f32 accumulation in the tensor cores (their order, not the CPU's),
//! `silu(g) = g / (1 + 2^(-g log2 e))` with the hardware `ex2`, the
//! intermediate activation rounded to the input dtype (the CPU reference
//! keeps it in `f32`): results match the reference within bf16/f16
//! rounding, not bitwise. Limits: `H` and `I` multiples of 8, row strides
//! multiples of 8 elements, base addresses 16-byte aligned.

use crate::driver::{self, TensorMap};
use crate::error::CudaError;
use crate::mem::{DeviceMatrix, DeviceRowsMut, DeviceSlice, Stream, check_ptr, need_len};
use crate::registry::Kernels;
use cust_core::DeviceCopy;
use medley_core::Error;

pub use crate::gemm_table::GEMMS;

pub use crate::specs::{Epilogue, GemmConfig, GemmDtype, GemmId, Generation};

/// Index of the configuration named `name` in [`GEMMS`] (for configuration
/// files; never used on the launch path).
pub fn find(name: &str) -> Option<GemmId> {
    GemmId::find(name)
}

/// Raster group: M blocks that sweep the N tiles together (weights reused
/// from L2 by the group's blocks).
const GROUP_M: u32 = 8;

/// The block-padded plan in device memory (the outputs of
/// [`crate::routing::Align`] or [`medley_core::moe::plan::align_block_size`]).
#[derive(Debug, Clone, Copy)]
pub struct DevicePlan<'a> {
    /// `u32 [len]`: the slot of each plan position (`>= slots`: padding).
    pub sorted_ids: DeviceSlice<'a, u32>,
    /// `u32 [len / block_m]`: local expert of each block (`NO_EXPERT`:
    /// none).
    pub block_experts: DeviceSlice<'a, u32>,
    /// `u32 [1]`: `num_tokens_post_padded`.
    pub total: DeviceSlice<'a, u32>,
    /// The plan's block size.
    pub block_m: usize,
    /// `T * k`.
    pub slots: usize,
    /// Experts per token.
    pub k: usize,
}

/// Writable activations in plan order (GEMM1's output).
#[derive(Debug)]
pub enum DeviceActMut<'a> {
    /// `f16` rows.
    F16(DeviceRowsMut<'a, half::f16>),
    /// `bf16` rows.
    BF16(DeviceRowsMut<'a, half::bf16>),
}

impl DeviceActMut<'_> {
    /// A writable view of the same rows for a shorter borrow.
    pub fn reborrow(&mut self) -> DeviceActMut<'_> {
        match self {
            DeviceActMut::F16(r) => DeviceActMut::F16(r.reborrow()),
            DeviceActMut::BF16(r) => DeviceActMut::BF16(r.reborrow()),
        }
    }

    /// A read-only view of the same rows, borrowing this one.
    pub fn as_matrix(&self) -> DeviceMatrix<'_> {
        match self {
            DeviceActMut::F16(r) => DeviceMatrix::F16(r.as_rows()),
            DeviceActMut::BF16(r) => DeviceMatrix::BF16(r.as_rows()),
        }
    }

    fn parts(&self) -> (u64, usize, usize, usize, GemmDtype) {
        match self {
            DeviceActMut::F16(r) => (r.as_raw(), r.rows(), r.len(), r.stride(), GemmDtype::F16),
            DeviceActMut::BF16(r) => (r.as_raw(), r.rows(), r.len(), r.stride(), GemmDtype::BF16),
        }
    }
}

#[repr(C, align(8))]
#[derive(Debug, Clone, Copy, Default)]
struct GemmParams {
    a: u64,
    w: u64,
    sorted: u64,
    bexp: u64,
    total: u64,
    out: u64,
    weights: u64,
    lda: u32,
    ldo: u32,
    n: u32,
    k: u32,
    ktop: u32,
    nslots: u32,
    len: u32,
    plan_bm: u32,
    group_m: u32,
    ntiles: u32,
    nexp: u32,
    pad: u32,
}
const _: () = assert!(core::mem::size_of::<GemmParams>() == 104);
// SAFETY: #[repr(C)] plain data laid out as the 104-byte parameter of every
// moe_mma_* entry (ptx/moe_mma.ptx), size asserted.
unsafe impl DeviceCopy for GemmParams {}

#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
struct WgParams {
    map_a: TensorMap,
    map_w: TensorMap,
    g: GemmParams,
}
const _: () = assert!(core::mem::size_of::<WgParams>() == 384);
// SAFETY: #[repr(C)] plain data laid out as the 384-byte, 64-aligned
// parameter of every moe_wgmma_* entry (ptx/moe_wgmma.ptx), size asserted.
unsafe impl DeviceCopy for WgParams {}

fn invalid(e: Error) -> CudaError {
    e.into()
}

fn mismatch(arg: &'static str, expected: usize, got: usize) -> CudaError {
    invalid(Error::LengthMismatch {
        arg,
        index: 0,
        expected,
        got,
    })
}

fn need(cond: bool, e: CudaError) -> Result<(), CudaError> {
    if cond { Ok(()) } else { Err(e) }
}

fn fits(v: usize, arg: &'static str) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| invalid(Error::SizeOverflow { arg }))
}

fn mult8(v: usize, arg: &'static str) -> Result<(), CudaError> {
    need(
        v.is_multiple_of(8) && v > 0,
        invalid(Error::OutOfRange { arg, index: v }),
    )
}

fn dtype_of(m: &DeviceMatrix<'_>, arg: &'static str) -> Result<GemmDtype, CudaError> {
    match m {
        DeviceMatrix::F16(_) => Ok(GemmDtype::F16),
        DeviceMatrix::BF16(_) => Ok(GemmDtype::BF16),
        DeviceMatrix::F32(_) => Err(CudaError::Unsupported {
            what: match arg {
                "x" => "f32 activations in the expert GEMMs (bf16 or f16 only)",
                _ => "f32 weights in the expert GEMMs (bf16 or f16 only)",
            },
        }),
    }
}

/// Everything one launch needs, checked.
struct Launch {
    id: GemmId,
    p: GemmParams,
    a_rows: usize,
    w_rows: usize,
    grid: u32,
}

#[allow(clippy::too_many_arguments)]
fn prepare(
    kernels: &Kernels,
    id: GemmId,
    epi: Epilogue,
    a: &DeviceMatrix<'_>,
    a_in_plan_order: bool,
    plan: &DevicePlan<'_>,
    w: &DeviceMatrix<'_>,
    n: usize,
    out: (u64, usize, usize, usize),
    weights: u64,
) -> Result<Launch, CudaError> {
    let cfg = id.config();
    need(
        cfg.epilogue == epi,
        CudaError::Unsupported {
            what: "a GEMM configuration of the other epilogue",
        },
    )?;
    let dt = dtype_of(a, "x")?;
    need(
        dtype_of(w, "w")? == dt && cfg.dtype == dt,
        invalid(Error::OutOfRange {
            arg: "dtype",
            index: 0,
        }),
    )?;
    need(
        kernels.gemm(id).is_some(),
        CudaError::Unsupported {
            what: "this expert GEMM generation (wgmma needs compute capability 9.0)",
        },
    )?;
    need(
        a_in_plan_order || cfg.generation == Generation::Mma,
        CudaError::Unsupported {
            what: "gathering rows in a wgmma GEMM (permute x into plan order first)",
        },
    )?;
    let (ap, arows, k, lda, _, _) = a.parts();
    let (wp, wrows, wk, ldw, _, _) = w.parts();
    let (op, orows, on, ldo) = out;
    mult8(k, "K")?;
    mult8(n, "N")?;
    mult8(lda, "x.stride")?;
    need_len("w.len", k, wk)?;
    need_len("w.stride", wk, ldw)?;
    need_len("out.len", n, on)?;
    need(
        ldo.is_multiple_of(2),
        invalid(Error::OutOfRange {
            arg: "out.stride",
            index: ldo,
        }),
    )?;
    let nw = if epi == Epilogue::SwiGlu { 2 * n } else { n };
    need(
        wrows.is_multiple_of(nw) && wrows > 0,
        mismatch("w.rows", wrows.div_ceil(nw).max(1) * nw, wrows),
    )?;
    let nexp = wrows / nw;
    // The plan.
    let bm = plan.block_m;
    need(
        bm > 0 && bm.is_multiple_of(cfg.bm as usize),
        invalid(Error::OutOfRange {
            arg: "plan.block_m",
            index: bm,
        }),
    )?;
    let len = plan.sorted_ids.len();
    need(
        len.is_multiple_of(bm),
        mismatch("plan.sorted_ids", len.div_ceil(bm) * bm, len),
    )?;
    need_len("plan.block_experts", len / bm, plan.block_experts.len())?;
    need_len("plan.total", 1, plan.total.len())?;
    need(
        plan.k > 0,
        invalid(Error::OutOfRange {
            arg: "plan.k",
            index: 0,
        }),
    )?;
    need_len("out.rows", len, orows)?;
    if a_in_plan_order {
        need_len("x.rows", len, arows)?;
    } else {
        need(
            plan.slots == arows * plan.k,
            mismatch("plan.slots", arows * plan.k, plan.slots),
        )?;
    }
    for (p, arg) in [(ap, "x"), (wp, "w"), (op, "out")] {
        check_ptr(p, 1, 16, arg)?;
    }
    check_ptr(plan.sorted_ids.as_raw(), len, 4, "plan.sorted_ids")?;
    check_ptr(plan.block_experts.as_raw(), len / bm, 4, "plan.block_experts")?;
    check_ptr(plan.total.as_raw(), 1, 4, "plan.total")?;
    let ntiles = n.div_ceil(cfg.bn as usize);
    let blocks = (len / cfg.bm as usize)
        .checked_mul(ntiles)
        .filter(|&b| b <= i32::MAX as usize)
        .ok_or(invalid(Error::SizeOverflow { arg: "grid" }))?;
    let p = GemmParams {
        a: ap,
        w: wp,
        sorted: plan.sorted_ids.as_raw(),
        bexp: plan.block_experts.as_raw(),
        total: plan.total.as_raw(),
        out: op,
        weights,
        lda: fits(lda, "x.stride")?,
        ldo: fits(ldo, "out.stride")?,
        n: fits(n, "N")?,
        k: fits(k, "K")?,
        ktop: if a_in_plan_order {
            0
        } else {
            fits(plan.k, "plan.k")?
        },
        nslots: fits(plan.slots, "plan.slots")?,
        len: fits(len, "plan.sorted_ids")?,
        plan_bm: fits(bm, "plan.block_m")?,
        group_m: GROUP_M,
        ntiles: fits(ntiles, "N")?,
        nexp: fits(nexp, "w.rows")?,
        pad: 0,
    };
    Ok(Launch {
        id,
        p,
        a_rows: arows,
        w_rows: wrows,
        grid: blocks as u32,
    })
}

fn run(kernels: &Kernels, l: Launch, stream: Stream<'_>) -> Result<(), CudaError> {
    if l.grid == 0 {
        return Ok(());
    }
    let cfg = l.id.config();
    let _ctx = kernels.enter()?;
    let (f, info) = *kernels.gemm(l.id).expect("checked in prepare");
    match cfg.generation {
        Generation::Mma => {
            // SAFETY: `l.p` is the entry's 104-byte parameter (size asserted);
            // prepare checked every buffer against the plan and shapes: the
            // kernel reads `len` plan entries, `len / plan_bm` block experts
            // (experts >= nexp exit), A rows below `a_rows` (gathered rows
            // are `slot / k < T` for real slots, row 0 for padding),
            // `nexp * NW` weight rows of K, and writes `len x N` outputs.
            unsafe { kernels.launch(f, l.grid, cfg.threads, cfg.smem, stream, &l.p) }
        }
        Generation::Wgmma => {
            let k = l.p.k as u64;
            let box_w = cfg.bn.min(128);
            let map_a = driver::tensor_map_2d_u16(l.p.a, l.a_rows as u64, k, l.p.lda as u64, 64, cfg.bm)?;
            let map_w = driver::tensor_map_2d_u16(l.p.w, l.w_rows as u64, k, k, 64, box_w)?;
            let p = WgParams { map_a, map_w, g: l.p };
            // Persistent: one wave of resident blocks walks all the tiles;
            // otherwise one block per tile (the kernel handles both).
            let grid = if cfg.persistent {
                l.grid.min(kernels.sm_count() * info.blocks_per_sm.max(1))
            } else {
                l.grid
            };
            // SAFETY: `p` is the entry's 384-byte parameter (size asserted);
            // the tensor maps cover exactly the A rows and weight rows
            // prepare checked (TMA never reads outside them), and the
            // other pointers are as for the mma generation.
            unsafe { kernels.launch(f, grid, cfg.threads, cfg.smem, stream, &p) }
        }
    }
}

/// GEMM1 with the fused SwiGLU: for every plan position `p` of a real slot,
/// `out[p, n] = silu(g) * u` with `g = x_row . w13[e][n]`, `u = x_row .
/// w13[e][I + n]`, `e` the block's local expert, `x_row` token `slot / k` of
/// `x` (or row `p` when `x_in_plan_order`, as [`crate::routing::Permute`]
/// writes it; required by the wgmma generation). Rows of padding positions
/// are not written.
///
/// `x`: `[T, H]` or `[len, H]` (bf16/f16); `w13`: `[L * 2I, H]` dense, the
/// same dtype; `out`: `[len, I]`, the same dtype; `gemm`: an index into
/// [`GEMMS`] of a [`Epilogue::SwiGlu`] entry of that dtype whose `bm`
/// divides `plan.block_m`.
///
/// Errors (before any launch): [`CudaError::Unsupported`] (f32 data, a
/// configuration this device did not load, gathering with wgmma),
/// [`medley_core::Error`] variants for shapes (`H`, `I` multiples of 8;
/// plan lengths) and [`CudaError::Null`] / [`CudaError::Misaligned`]
/// (16-byte alignment).
#[allow(clippy::too_many_arguments)]
fn gemm1(
    kernels: &Kernels,
    gemm: GemmId,
    x: DeviceMatrix<'_>,
    x_in_plan_order: bool,
    plan: &DevicePlan<'_>,
    w13: DeviceMatrix<'_>,
    out: DeviceActMut<'_>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    let (op, orows, on, ldo, odt) = out.parts();
    need(
        dtype_of(&x, "x")? == odt,
        invalid(Error::OutOfRange {
            arg: "out.dtype",
            index: 0,
        }),
    )?;
    let l = prepare(
        kernels,
        gemm,
        Epilogue::SwiGlu,
        &x,
        x_in_plan_order,
        plan,
        &w13,
        on,
        (op, orows, on, ldo),
        0,
    )?;
    run(kernels, l, stream)
}

/// GEMM2 with the routing weight: for every plan position `p` of a real
/// slot `s`, `out[p, h] = weights[s] * (act[p] . w2[e][h])` (f32, the
/// product rounded). Rows of padding positions are not written.
///
/// `act`: `[len, I]` in plan order (bf16/f16, GEMM1's output); `w2`: `[L *
/// H, I]` dense, the same dtype; `weights`: `f32 [T * k]`; `out`: `f32
/// [len, H]`. Errors as [`Gemm1`].
#[allow(clippy::too_many_arguments)]
fn gemm2(
    kernels: &Kernels,
    gemm: GemmId,
    act: DeviceMatrix<'_>,
    plan: &DevicePlan<'_>,
    w2: DeviceMatrix<'_>,
    weights: DeviceSlice<'_, f32>,
    out: DeviceRowsMut<'_, f32>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    need_len("weights", plan.slots, weights.len())?;
    check_ptr(weights.as_raw(), plan.slots, 4, "weights")?;
    let l = prepare(
        kernels,
        gemm,
        Epilogue::Down,
        &act,
        true,
        plan,
        &w2,
        out.len(),
        (out.as_raw(), out.rows(), out.len(), out.stride()),
        weights.as_raw(),
    )?;
    run(kernels, l, stream)
}

/// Average rows per local expert, bucketed: the key of [`Tuning`] tables.
/// Bucket `b` holds `m_avg` in `(4^(b-1), 4^b]` (bucket 0: `m_avg <= 1`),
/// the last bucket everything above `4^5 = 1024`.
pub fn bucket(slots: usize, local_experts: usize) -> u8 {
    let m = slots as f64 / local_experts.max(1) as f64;
    let mut b = 0u8;
    let mut edge = 1.0;
    while m > edge && b < 6 {
        b += 1;
        edge *= 4.0;
    }
    b
}

/// Number of [`bucket`] values.
pub const BUCKETS: usize = 7;

/// One row of a [`Tuning`] table.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct TuningEntry {
    /// The GEMM's epilogue.
    pub epilogue: Epilogue,
    /// Its element type.
    pub dtype: GemmDtype,
    /// The [`bucket`] of rows per expert the time was measured for.
    pub bucket: u8,
    /// The configuration.
    pub gemm: GemmId,
    /// Microseconds measured.
    pub micros: f64,
}

/// Why a tuning table was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum TuningError {
    /// A line is not `epilogue dtype bucket entry microseconds` (or its
    /// bucket or time is out of range).
    Syntax {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// A line names no known kernel (a table from another medley version).
    UnknownKernel {
        /// 1-based line number.
        line: usize,
        /// The name given.
        name: String,
    },
    /// A line files a kernel under another epilogue or dtype than its own.
    Mismatch {
        /// 1-based line number.
        line: usize,
        /// The kernel.
        name: String,
    },
    /// The file `MEDLEY_GEMM_TUNING` names could not be read.
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        message: String,
    },
}

impl core::fmt::Display for TuningError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TuningError::Syntax { line, text } => {
                write!(
                    f,
                    "line {line}: expected `epilogue dtype bucket entry us`: {text}"
                )
            }
            TuningError::UnknownKernel { line, name } => write!(
                f,
                "line {line}: unknown kernel {name} (a table from another medley version? re-run tune_experts)"
            ),
            TuningError::Mismatch { line, name } => {
                write!(f, "line {line}: {name} is filed under another epilogue or dtype")
            }
            TuningError::Read { path, message } => write!(f, "MEDLEY_GEMM_TUNING={path}: {message}"),
        }
    }
}

impl std::error::Error for TuningError {}

/// Which GEMM configuration runs per (epilogue, dtype, bucket): the best
/// a tuning run measured, per generation.
#[derive(Debug, Clone)]
pub struct Tuning {
    entries: Vec<TuningEntry>,
    device: String,
}

/// The built-in tables: the tuning harness's output per GPU, each naming
/// its device on its `# device:` line. The first is the fallback.
const BUILTIN_TABLES: [(&str, &str); 2] = [
    ("cuda/tuning/h100.txt", include_str!("../tuning/h100.txt")),
    ("cuda/tuning/h200.txt", include_str!("../tuning/h200.txt")),
];

/// How [`Tuning::builtin_for`] chose its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TableMatch {
    /// The table was measured on a device of exactly this name.
    Exact,
    /// Same GPU model, another variant (`NVIDIA H100 PCIe` for a table of
    /// `NVIDIA H100 80GB HBM3`): the model is the first word after the
    /// vendor.
    Model,
    /// No table for this GPU model: the first built-in table (the H100's).
    /// Choices stay correct on any device (only loaded kernels are picked);
    /// they may not be the fastest there, which a harness run fixes.
    Fallback,
}

/// The GPU model in a device name: the first word after `NVIDIA` (`H200`
/// in `NVIDIA H200 NVL`), else the first word; case-insensitive.
fn gpu_model(name: &str) -> String {
    let mut words = name.split_whitespace();
    let first = words.next().unwrap_or("");
    let model = if first.eq_ignore_ascii_case("nvidia") {
        words.next().unwrap_or("")
    } else {
        first
    };
    model.to_ascii_lowercase()
}

impl Tuning {
    /// Parses a table written by the tuning harness: `#` comment lines
    /// (`# device: NAME` names the GPU) and lines `epilogue dtype bucket
    /// entry microseconds` (`swiglu|down bf16|f16 0..6 moe_... 12.5`).
    /// Entries naming no known kernel are an error (a stale file).
    pub fn parse(text: &str) -> Result<Tuning, TuningError> {
        let mut t = Tuning {
            entries: Vec::new(),
            device: String::new(),
        };
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(d) = line.strip_prefix("# device:") {
                t.device = d.trim().to_string();
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let bad = || TuningError::Syntax {
                line: i + 1,
                text: line.to_string(),
            };
            if f.len() != 5 {
                return Err(bad());
            }
            let epi = match f[0] {
                "swiglu" => Epilogue::SwiGlu,
                "down" => Epilogue::Down,
                _ => return Err(bad()),
            };
            let dt = match f[1] {
                "bf16" => GemmDtype::BF16,
                "f16" => GemmDtype::F16,
                _ => return Err(bad()),
            };
            let b: u8 = f[2].parse().map_err(|_| bad())?;
            let id = GemmId::find(f[3]).ok_or_else(|| TuningError::UnknownKernel {
                line: i + 1,
                name: f[3].to_string(),
            })?;
            let us: f64 = f[4].parse().map_err(|_| bad())?;
            if b as usize >= BUCKETS || !(us.is_finite() && us > 0.0) {
                return Err(bad());
            }
            if id.config().epilogue != epi || id.config().dtype != dt {
                return Err(TuningError::Mismatch {
                    line: i + 1,
                    name: f[3].to_string(),
                });
            }
            t.entries.push(TuningEntry {
                epilogue: epi,
                dtype: dt,
                bucket: b,
                gemm: id,
                micros: us,
            });
        }
        Ok(t)
    }

    /// The table's rows.
    pub fn entries(&self) -> &[TuningEntry] {
        &self.entries
    }

    /// The device the table was measured on (the file's `# device:` line).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// The fallback built-in table (the harness's H100 output, compiled in).
    pub fn builtin() -> Tuning {
        let (file, text) = BUILTIN_TABLES[0];
        Tuning::parse(text).unwrap_or_else(|e| panic!("{file} parses: {e:?}"))
    }

    /// The built-in table for the device named `device` (as the driver
    /// reports it, [`Kernels::device_name`]): the table measured on a device
    /// of that exact name, else one of the same GPU model ([`TableMatch`]),
    /// else the fallback, the H100 table. Built-in tables: the files of
    /// `cuda/tuning/` (the harness, `tune_experts`, writes one for any GPU).
    pub fn builtin_for(device: &str) -> (Tuning, TableMatch) {
        let tables = BUILTIN_TABLES
            .map(|(file, text)| Tuning::parse(text).unwrap_or_else(|e| panic!("{file} parses: {e:?}")));
        let model = gpu_model(device);
        if let Some(t) = tables.iter().find(|t| t.device.trim() == device.trim()) {
            return (t.clone(), TableMatch::Exact);
        }
        if let Some(t) = tables
            .iter()
            .find(|t| !model.is_empty() && gpu_model(&t.device) == model)
        {
            return (t.clone(), TableMatch::Model);
        }
        (Tuning::builtin(), TableMatch::Fallback)
    }

    /// The table for the device `kernels` run on: the file `MEDLEY_GEMM_TUNING`
    /// names when it is set, else [`Tuning::builtin_for`] that device. A file
    /// that cannot be read or parsed is an error (never silently ignored).
    pub fn for_kernels(kernels: &Kernels) -> Result<Tuning, TuningError> {
        match Self::env_table()? {
            Some(t) => Ok(t),
            None => Ok(Tuning::builtin_for(kernels.device_name()).0),
        }
    }

    /// The table in the file `MEDLEY_GEMM_TUNING` names, else the fallback
    /// built-in one (whatever the device: prefer [`Tuning::for_kernels`]).
    /// A file that cannot be read or parsed is an error.
    pub fn from_env() -> Result<Tuning, TuningError> {
        Ok(Self::env_table()?.unwrap_or_else(Tuning::builtin))
    }

    fn env_table() -> Result<Option<Tuning>, TuningError> {
        match std::env::var_os("MEDLEY_GEMM_TUNING") {
            Some(path) => {
                let text = std::fs::read_to_string(&path).map_err(|e| TuningError::Read {
                    path: path.to_string_lossy().into_owned(),
                    message: e.to_string(),
                })?;
                Tuning::parse(&text).map(Some)
            }
            None => Ok(None),
        }
    }

    /// The fastest configuration for the key among those `kernels` loaded
    /// and `allow` accepts, or a default: the first loaded mma entry of the
    /// epilogue and dtype whose bm suits the bucket.
    pub fn pick(
        &self,
        kernels: &Kernels,
        epi: Epilogue,
        dt: GemmDtype,
        bucket: u8,
        allow: impl Fn(&GemmConfig) -> bool,
    ) -> Option<GemmId> {
        let best = self
            .entries
            .iter()
            .filter(|e| e.epilogue == epi && e.dtype == dt && e.bucket == bucket)
            .filter(|e| kernels.gemm(e.gemm).is_some() && allow(e.gemm.config()))
            .min_by(|a, b| a.micros.total_cmp(&b.micros))
            .map(|e| e.gemm);
        best.or_else(|| {
            let want_bm = match bucket {
                0..=2 => 16,
                3 => 64,
                _ => 128,
            };
            GemmId::all().find(|&id| {
                let g = id.config();
                g.generation == Generation::Mma
                    && g.epilogue == epi
                    && g.dtype == dt
                    && g.bm == want_bm
                    && kernels.gemm(id).is_some()
                    && allow(g)
            })
        })
    }
}

/// The kernels one layer call runs and the plan block size they need.
#[derive(Debug, Clone, Copy)]
pub struct LayerChoice {
    /// GEMM1.
    pub gemm1: GemmId,
    /// GEMM2.
    pub gemm2: GemmId,
    /// The plan's `block_m` (a multiple of both configurations' `bm`).
    pub block_m: usize,
}

impl LayerChoice {
    /// Picks both GEMMs from `tuning` for `slots = T * k` over
    /// `local_experts`; `generation` restricts the choice to one
    /// generation.
    pub fn pick(
        tuning: &Tuning,
        kernels: &Kernels,
        dt: GemmDtype,
        slots: usize,
        local_experts: usize,
        generation: Option<Generation>,
    ) -> Option<LayerChoice> {
        let b = bucket(slots, local_experts);
        let ok = |g: &GemmConfig| generation.is_none_or(|want| g.generation == want);
        let g1 = tuning.pick(kernels, Epilogue::SwiGlu, dt, b, ok)?;
        let g2 = tuning.pick(kernels, Epilogue::Down, dt, b, ok)?;
        let block_m = g1.config().bm.max(g2.config().bm) as usize;
        Some(LayerChoice {
            gemm1: g1,
            gemm2: g2,
            block_m,
        })
    }
}

/// Scratch buffers of [`Layer`] (device memory, the plan's `len` rows).
#[derive(Debug)]
pub struct LayerScratch<'a> {
    /// `[len, H]` in the activation dtype: `x` in plan order (used only
    /// when GEMM1 is a wgmma configuration; may be empty otherwise).
    pub xp: crate::routing::DeviceMatrixMut<'a>,
    /// `[len, I]`: GEMM1's output.
    pub act: DeviceActMut<'a>,
    /// `f32 [len, H]`: GEMM2's output.
    pub y: DeviceRowsMut<'a, f32>,
}

/// The experts of an MoE layer on the GPU: the twin of
/// [`medley_core::moe::layer::moe_layer`] after gating and planning.
/// Runs on `stream`: [`crate::routing::Permute`] of `x` into `scratch.xp`
/// when GEMM1 is a wgmma configuration, [`Gemm1`], [`Gemm2`], then
/// [`crate::routing::Combine`] (prescaled) into `out` (`f32 [T, H]`).
///
/// `plan` must come from [`crate::routing::Align`] with `block_m =
/// choice.block_m` for the same `T * k` slots and local experts as the
/// weights; `inverse` is that call's inverse (`u32 [T * k]`), `weights`
/// the routing weights (`f32 [T * k]`). Tokens with no placed slot get
/// zero rows; a zero weight drops its slot; a NaN weight poisons its token
/// (the CPU layer's rules).
#[allow(clippy::too_many_arguments)]
fn layer(
    kernels: &Kernels,
    choice: &LayerChoice,
    x: DeviceMatrix<'_>,
    plan: &DevicePlan<'_>,
    inverse: DeviceSlice<'_, u32>,
    weights: DeviceSlice<'_, f32>,
    w13: DeviceMatrix<'_>,
    w2: DeviceMatrix<'_>,
    scratch: LayerScratch<'_>,
    out: DeviceRowsMut<'_, f32>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    need_len("plan.block_m", choice.block_m, plan.block_m)?;
    let LayerScratch {
        mut xp,
        mut act,
        mut y,
    } = scratch;
    if choice.gemm1.config().generation == Generation::Wgmma {
        crate::routing::permute(
            kernels,
            x,
            plan.k,
            plan.sorted_ids,
            plan.total,
            xp.reborrow(),
            stream,
        )?;

        gemm1(
            kernels,
            choice.gemm1,
            xp.as_matrix(),
            true,
            plan,
            w13,
            act.reborrow(),
            stream,
        )?;
    } else {
        gemm1(kernels, choice.gemm1, x, false, plan, w13, act.reborrow(), stream)?;
    }
    gemm2(
        kernels,
        choice.gemm2,
        act.as_matrix(),
        plan,
        w2,
        weights,
        y.reborrow(),
        stream,
    )?;
    crate::routing::combine_prescaled(
        kernels,
        DeviceMatrix::F32(y.as_rows()),
        plan.k,
        inverse,
        weights,
        out,
        stream,
    )
}

/// GEMM1 of the experts with the fused SwiGLU (the operation, shapes and
/// errors are those of the GEMM1 description above).
#[derive(Debug)]
#[non_exhaustive]
pub struct Gemm1<'a> {
    /// The configuration (a [`Epilogue::SwiGlu`] entry of the data's dtype
    /// whose `bm` divides `plan.block_m`).
    pub gemm: GemmId,
    /// Token rows `[T, H]`, or `[len, H]` in plan order.
    pub x: DeviceMatrix<'a>,
    /// `x` is already in plan order (required by the wgmma generation).
    pub x_in_plan_order: bool,
    /// The block-padded plan.
    pub plan: &'a DevicePlan<'a>,
    /// `[L * 2I, H]` gate and up weights.
    pub w13: DeviceMatrix<'a>,
    /// `[len, I]`, written.
    pub out: DeviceActMut<'a>,
}

impl<'a> Gemm1<'a> {
    /// GEMM1 gathering token rows of `x` by the plan.
    pub fn new(
        gemm: GemmId,
        x: DeviceMatrix<'a>,
        plan: &'a DevicePlan<'a>,
        w13: DeviceMatrix<'a>,
        out: DeviceActMut<'a>,
    ) -> Self {
        Gemm1 {
            gemm,
            x,
            x_in_plan_order: false,
            plan,
            w13,
            out,
        }
    }

    /// Marks `x` as already permuted into plan order.
    pub fn in_plan_order(mut self) -> Self {
        self.x_in_plan_order = true;
        self
    }
}

impl crate::Launch for Gemm1<'_> {
    fn launch(self, kernels: &Kernels, stream: Stream<'_>) -> Result<(), CudaError> {
        gemm1(
            kernels,
            self.gemm,
            self.x,
            self.x_in_plan_order,
            self.plan,
            self.w13,
            self.out,
            stream,
        )
    }
}

/// GEMM2 of the experts with the routing weight (see [`Gemm2`]).
#[derive(Debug)]
#[non_exhaustive]
pub struct Gemm2<'a> {
    /// The configuration (a [`Epilogue::Down`] entry).
    pub gemm: GemmId,
    /// `[len, I]` activations in plan order.
    pub act: DeviceMatrix<'a>,
    /// The block-padded plan.
    pub plan: &'a DevicePlan<'a>,
    /// `[L * H, I]` down weights.
    pub w2: DeviceMatrix<'a>,
    /// `f32 [T * k]` routing weights.
    pub weights: DeviceSlice<'a, f32>,
    /// `f32 [len, H]`, written.
    pub out: DeviceRowsMut<'a, f32>,
}

impl<'a> Gemm2<'a> {
    /// GEMM2 of `act` by `w2`, scaled by `weights`.
    pub fn new(
        gemm: GemmId,
        act: DeviceMatrix<'a>,
        plan: &'a DevicePlan<'a>,
        w2: DeviceMatrix<'a>,
        weights: DeviceSlice<'a, f32>,
        out: DeviceRowsMut<'a, f32>,
    ) -> Self {
        Gemm2 {
            gemm,
            act,
            plan,
            w2,
            weights,
            out,
        }
    }
}

impl crate::Launch for Gemm2<'_> {
    fn launch(self, kernels: &Kernels, stream: Stream<'_>) -> Result<(), CudaError> {
        gemm2(
            kernels,
            self.gemm,
            self.act,
            self.plan,
            self.w2,
            self.weights,
            self.out,
            stream,
        )
    }
}

/// The experts of an MoE layer on the GPU (see [`Layer`]): permute when
/// GEMM1 is a wgmma configuration, GEMM1, GEMM2, the prescaled combine.
#[derive(Debug)]
#[non_exhaustive]
pub struct Layer<'a> {
    /// The two GEMMs and the plan block size.
    pub choice: &'a LayerChoice,
    /// Token rows `[T, H]`.
    pub x: DeviceMatrix<'a>,
    /// The block-padded plan (`block_m = choice.block_m`).
    pub plan: &'a DevicePlan<'a>,
    /// `u32 [T * k]`: the plan's inverse.
    pub inverse: DeviceSlice<'a, u32>,
    /// `f32 [T * k]`: routing weights.
    pub weights: DeviceSlice<'a, f32>,
    /// `[L * 2I, H]` gate and up weights.
    pub w13: DeviceMatrix<'a>,
    /// `[L * H, I]` down weights.
    pub w2: DeviceMatrix<'a>,
    /// Intermediate buffers.
    pub scratch: LayerScratch<'a>,
    /// `f32 [T, H]`, written.
    pub out: DeviceRowsMut<'a, f32>,
}

impl<'a> Layer<'a> {
    /// The layer call.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        choice: &'a LayerChoice,
        x: DeviceMatrix<'a>,
        plan: &'a DevicePlan<'a>,
        inverse: DeviceSlice<'a, u32>,
        weights: DeviceSlice<'a, f32>,
        w13: DeviceMatrix<'a>,
        w2: DeviceMatrix<'a>,
        scratch: LayerScratch<'a>,
        out: DeviceRowsMut<'a, f32>,
    ) -> Self {
        Layer {
            choice,
            x,
            plan,
            inverse,
            weights,
            w13,
            w2,
            scratch,
            out,
        }
    }
}

impl crate::Launch for Layer<'_> {
    fn launch(self, kernels: &Kernels, stream: Stream<'_>) -> Result<(), CudaError> {
        layer(
            kernels,
            self.choice,
            self.x,
            self.plan,
            self.inverse,
            self.weights,
            self.w13,
            self.w2,
            self.scratch,
            self.out,
            stream,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_split_rows_per_expert_by_powers_of_four() {
        assert_eq!(bucket(2, 8), 0); // Mixtral T = 1
        assert_eq!(bucket(8, 8), 0);
        assert_eq!(bucket(9, 8), 1);
        assert_eq!(bucket(32, 8), 1); // Mixtral T = 16
        assert_eq!(bucket(256, 8), 3); // Mixtral T = 128
        assert_eq!(bucket(2048, 8), 4); // Mixtral T = 1024
        assert_eq!(bucket(8192, 8), 5); // Mixtral T = 4096
        assert_eq!(bucket(1 << 30, 1), 6);
        assert_eq!(bucket(5, 0), 2); // no local expert: counted as one
    }

    #[test]
    fn the_builtin_table_parses_and_names_known_kernels() {
        let t = Tuning::builtin();
        assert!(!t.entries.is_empty());
        assert!(t.device().contains("H100"), "{}", t.device());
        for e in t.entries() {
            assert_eq!(e.gemm.config().epilogue, e.epilogue);
            assert_eq!(e.gemm.config().dtype, e.dtype);
            assert!((e.bucket as usize) < BUCKETS && e.micros > 0.0);
        }
    }

    #[test]
    fn each_device_gets_the_table_of_its_name_or_model_else_the_fallback() {
        let h100 = Tuning::builtin();
        let (t, m) = Tuning::builtin_for(h100.device());
        assert_eq!((t.device(), m), (h100.device(), TableMatch::Exact));
        let (t, m) = Tuning::builtin_for("NVIDIA H100 PCIe");
        assert_eq!((t.device(), m), (h100.device(), TableMatch::Model));
        assert_eq!(Tuning::builtin_for("nvidia h100 nvl").1, TableMatch::Model);
        // The H200's own table (measured on one, 2026-12-04), for its
        // variants too.
        let (t, m) = Tuning::builtin_for("NVIDIA H200");
        assert_eq!((t.device(), m), ("NVIDIA H200", TableMatch::Exact));
        assert!(!t.entries().is_empty());
        let (t, m) = Tuning::builtin_for("NVIDIA H200 NVL");
        assert_eq!((t.device(), m), ("NVIDIA H200", TableMatch::Model));
        // No built-in table for these models (yet): the H100 table.
        for name in ["NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 4090", "", "H20"] {
            let (t, m) = Tuning::builtin_for(name);
            assert_eq!((t.device(), m), (h100.device(), TableMatch::Fallback), "{name:?}");
        }
        assert_eq!(gpu_model("NVIDIA H200 NVL"), "h200");
        assert_eq!(gpu_model("Tesla V100"), "tesla");
        assert_eq!(gpu_model("  "), "");
        // Every built-in table parses and names its device.
        for (file, text) in BUILTIN_TABLES {
            let t = Tuning::parse(text).unwrap();
            assert!(!t.device().is_empty() && !t.entries().is_empty(), "{file}");
        }
    }

    #[test]
    fn bad_tables_are_errors_not_ignored() {
        assert!(matches!(
            Tuning::parse("swiglu bf16 0 no_such_kernel 1.0"),
            Err(TuningError::UnknownKernel { line: 1, .. })
        ));
        assert!(Tuning::parse("swiglu bf16 0").is_err());
        let name = GEMMS
            .iter()
            .find(|g| g.epilogue == Epilogue::Down)
            .unwrap()
            .name();
        // An entry filed under the wrong epilogue.
        assert!(Tuning::parse(&format!("swiglu bf16 0 {name} 1.0")).is_err());
        assert!(Tuning::parse(&format!("down bf16 9 {name} 1.0")).is_err());
        let ok = Tuning::parse(&format!(
            "# device: X\n\ndown {} 2 {name} 1.5\n",
            match find(name).unwrap().config().dtype {
                GemmDtype::BF16 => "bf16",
                GemmDtype::F16 => "f16",
            }
        ))
        .unwrap();
        assert_eq!(ok.device(), "X");
        assert_eq!(ok.entries().len(), 1);
    }
}
