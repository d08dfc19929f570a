//! Top-k gating on the GPU: [`Gate`] launches `ptx/gating.ptx` (or the tuned
//! `ptx/gating_v2.ptx`) with the
//! semantics of [`medley_core::moe::gating`] (ids and weights equal the
//! CPU's bit for bit; see the PTX header).
//!
//! Differences from the CPU functions (no host synchronization inside a
//! call): no [`medley_core::Report`] (NaN and masked rows are visible in
//! the outputs: NaN weights, zero weights); a grouped router's bias lives in
//! device memory, so a non-finite bias value makes that row a NaN row
//! instead of an error; at most [`MAX_DEVICE_EXPERTS`] experts.

use crate::error::CudaError;
use crate::mem::{DeviceSlice, DeviceSliceMut, Stream, check_ptr};
use crate::registry::{BLOCK, Kernel, Kernels};
use cust_core::DeviceCopy;
use medley_core::Error;
use medley_core::moe::MAX_K;
use medley_core::moe::gating::{GroupScore, GroupedConfig, Scoring};

use crate::specs::{GATE_WARPS as WARPS, gate_smem};
pub use crate::specs::{MAX_DEVICE_EXPERTS, V2_MAX_EXPERTS, V3_MAX_EXPERTS};

/// The v2 entry of a mode.
fn v2_kernel(mode: u32) -> Kernel {
    if mode == 2 {
        Kernel::GateGroupedV2
    } else {
        Kernel::GateTopkV2
    }
}

/// Which gating kernel runs. All give the same bits (the core's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GateKernel {
    /// `gate_topk_v2` (`gate_grouped_v2` for grouped routing) when
    /// `E <= V2_MAX_EXPERTS`, except for many tokens over few experts
    /// (`T >= 4096`, `E <= 64`, not grouped), where `gate_topk` measured
    /// 6-10% faster on an H100 (BENCHMARKS.md); else `gate_topk`.
    #[default]
    Auto,
    /// `gate_topk`: the straightforward kernel (the on-device reference).
    V1,
    /// `gate_topk_v2`: keys in registers, unrolled; an error above
    /// [`V2_MAX_EXPERTS`].
    V2,
    /// `gate_topk_v3` for renormalized top-k softmax
    /// ([`Gating::TopkSoftmax`] with `renormalize`, [`Gating::KeepTopkSoftmax`]):
    /// sorted per-lane lists of index-carrying keys, one `redux.sync` per
    /// pick; `gate_grouped_v3` for [`Gating::Grouped`] with
    /// [`Scoring::Sigmoid`]: the experts' sigmoids in registers, group
    /// scores by an xor butterfly over a group's lanes, two `redux.sync`
    /// per pick. Both take f16 or bf16 logits (`gate_grouped_v3` f32 too)
    /// with `E <= V3_MAX_EXPERTS` (256), `E % 8 == 0` and rows starting
    /// 16-byte aligned; `gate_grouped_v3` also a 16-byte aligned bias (or none) and either
    /// no group limiting (`topk_group == n_group`) or groups of
    /// `8 * 2^j` experts. Anything else is [`CudaError::Unsupported`].
    ///
    /// **Not yet run on a GPU**: both are assembled by ptxas 13.0 for sm_80
    /// and sm_90 and pass a warp emulator against the core
    /// (`tools/ptx-emu/gating.py`, in CI), but their GPU conformance tests
    /// (cuda/tests/moe.rs, `gate_v3_kernels_match_the_core_bit_for_bit`)
    /// have not run yet, so [`GateKernel::Auto`] does not pick them.
    V3,
}

/// Router logits `[T, E]` in device memory.
pub type RouterLogits<'a> = crate::mem::DeviceMatrix<'a>;

/// Which gating function runs.
#[derive(Debug, Clone, Copy)]
pub enum Gating<'a> {
    /// [`medley_core::moe::gating::topk_softmax`].
    TopkSoftmax {
        /// Renormalize the `k` weights.
        renormalize: bool,
    },
    /// [`medley_core::moe::gating::keep_topk_softmax`].
    KeepTopkSoftmax,
    /// [`medley_core::moe::gating::grouped_topk`] with the bias in device
    /// memory (`E` values) and the other parameters as in
    /// [`GroupedConfig`] (its `bias` field is ignored; its `k` is the `k`).
    Grouped {
        /// Groups, scoring, renormalization, scaling.
        config: GroupedConfig<'a>,
        /// The per-expert selection bias, or `None`.
        bias: Option<DeviceSlice<'a, f32>>,
    },
}

#[repr(C, align(8))]
#[derive(Debug, Clone, Copy)]
struct GateParams {
    logits: u64,
    ids: u64,
    weights: u64,
    bias: u64,
    rows: u32,
    experts: u32,
    stride: u32,
    k: u32,
    dtype: u32,
    mode: u32,
    scoring: u32,
    n_group: u32,
    topk_group: u32,
    group_score: u32,
    renormalize: u32,
    scale: f32,
}

const _: () = assert!(core::mem::size_of::<GateParams>() == 80);

// SAFETY: #[repr(C)] plain data (device addresses as u64, integers,
// floats), laid out as the 80-byte parameter documented in ptx/gating.ptx
// (size asserted above).
unsafe impl DeviceCopy for GateParams {}

/// Top-k gating on the GPU: routes every token of `logits` to `k`
/// experts, bit-exact with [`medley_core::moe::gating`]. Errors (before launching): those of the CPU function for the same
/// arguments, `Error::TooLarge` for `E` above [`MAX_DEVICE_EXPERTS`], and
/// null / misaligned pointers; `kernel` picks the kernel (default [`GateKernel::Auto`]; the
/// others are for conformance tests and benchmarks).
#[derive(Debug)]
#[non_exhaustive]
pub struct Gate<'a> {
    /// Router logits `[T, E]`.
    pub logits: RouterLogits<'a>,
    /// Experts per token.
    pub k: usize,
    /// The gating rule.
    pub gating: &'a Gating<'a>,
    /// `u32 [T * k]`: chosen experts, written.
    pub ids: DeviceSliceMut<'a, u32>,
    /// `f32 [T * k]`: their weights, written.
    pub weights: DeviceSliceMut<'a, f32>,
    /// Which kernel runs.
    pub kernel: GateKernel,
}

impl<'a> Gate<'a> {
    /// Gating with [`GateKernel::Auto`].
    pub fn new(
        logits: RouterLogits<'a>,
        k: usize,
        gating: &'a Gating<'a>,
        ids: DeviceSliceMut<'a, u32>,
        weights: DeviceSliceMut<'a, f32>,
    ) -> Self {
        Gate {
            logits,
            k,
            gating,
            ids,
            weights,
            kernel: GateKernel::Auto,
        }
    }

    /// Chooses the kernel ([`GateKernel::V2`] with more than
    /// [`V2_MAX_EXPERTS`] experts is [`CudaError::Unsupported`]).
    pub fn with_kernel(mut self, kernel: GateKernel) -> Self {
        self.kernel = kernel;
        self
    }
}

impl crate::Launch for Gate<'_> {
    fn launch(self, kernels: &Kernels, stream: Stream<'_>) -> Result<(), CudaError> {
        gate_with(kernels, self, stream)
    }
}

/// Routes every token of `logits` to `k` experts: `ids` (`T * k` u32) and
/// `weights` (`T * k` f32), on the caller's `stream`, without
/// synchronizing. Errors (before launching): those of the CPU function for
/// the same arguments, [`Error::TooLarge`] for `E` above
/// [`MAX_DEVICE_EXPERTS`], and null / misaligned pointers.
fn gate_with(kernels: &Kernels, call: Gate<'_>, stream: Stream<'_>) -> Result<(), CudaError> {
    let Gate {
        logits,
        k,
        gating,
        ids,
        weights,
        kernel,
    } = call;
    let (ptr, t, e, stride, dtype, size) = logits.parts();
    if e == 0 {
        return Err(Error::Empty { arg: "logits.len" }.into());
    }
    if e > MAX_DEVICE_EXPERTS {
        return Err(Error::TooLarge {
            arg: "logits.len",
            index: 0,
            max: MAX_DEVICE_EXPERTS,
            got: e,
        }
        .into());
    }
    if k == 0 {
        return Err(Error::OutOfRange { arg: "k", index: 0 }.into());
    }
    let kmax = MAX_K.min(e);
    if k > kmax {
        return Err(Error::TooLarge {
            arg: "k",
            index: 0,
            max: kmax,
            got: k,
        }
        .into());
    }
    let n = t
        .checked_mul(k)
        .filter(|&n| n <= u32::MAX as usize)
        .ok_or(Error::SizeOverflow { arg: "ids" })?;
    if ids.len() != n {
        return Err(Error::LengthMismatch {
            arg: "ids",
            index: 0,
            expected: n,
            got: ids.len(),
        }
        .into());
    }
    if weights.len() != n {
        return Err(Error::LengthMismatch {
            arg: "weights",
            index: 0,
            expected: n,
            got: weights.len(),
        }
        .into());
    }
    let stride32 = u32::try_from(stride).map_err(|_| Error::SizeOverflow { arg: "logits.stride" })?;
    check_ptr(ptr, t * e, size, "logits")?;
    check_ptr(ids.as_raw(), n, 4, "ids")?;
    check_ptr(weights.as_raw(), n, 4, "weights")?;
    let mut p = GateParams {
        logits: ptr,
        ids: ids.as_raw(),
        weights: weights.as_raw(),
        bias: 0,
        rows: t as u32,
        experts: e as u32,
        stride: stride32,
        k: k as u32,
        // bit 8: every row starts 16-byte aligned (the kernel's vector loads)
        dtype: dtype
            | if ptr.is_multiple_of(16) && (stride * size).is_multiple_of(16) {
                256
            } else {
                0
            },
        mode: 0,
        scoring: 0,
        n_group: 1,
        topk_group: 1,
        group_score: 1,
        renormalize: 0,
        scale: 1.0,
    };
    match gating {
        Gating::TopkSoftmax { renormalize } => p.mode = if *renormalize { 1 } else { 0 },
        Gating::KeepTopkSoftmax => p.mode = 1,
        Gating::Grouped { config, bias } => {
            let cfg = GroupedConfig {
                k,
                bias: None,
                ..*config
            };
            cfg.validate(e)?;
            if let Some(b) = bias {
                if b.len() != e {
                    return Err(Error::LengthMismatch {
                        arg: "bias",
                        index: 0,
                        expected: e,
                        got: b.len(),
                    }
                    .into());
                }
                check_ptr(b.as_raw(), e, 4, "bias")?;
                p.bias = b.as_raw();
            }
            p.mode = 2;
            p.scoring = match cfg.scoring {
                Scoring::Softmax => 0,
                Scoring::Sigmoid => 1,
            };
            p.n_group = cfg.n_group as u32;
            p.topk_group = cfg.topk_group as u32;
            p.group_score = match cfg.group_score {
                GroupScore::Top2Sum => 0,
                GroupScore::Max => 1,
            };
            p.renormalize = cfg.renormalize as u32;
            p.scale = cfg.routed_scaling_factor;
        }
    }
    // The v3 kernels: 16-bit logits in whole 16-byte vectors per lane, at
    // most 8 per lane (gate_grouped_v3: f32 too, two vectors per lane);
    // gate_topk_v3 renormalized top-k softmax,
    // gate_grouped_v3 sigmoid grouped routing with a 16-byte aligned bias
    // and groups of whole lanes (or none).
    let v3_rows = (p.dtype & 255 == 1 || p.dtype & 255 == 2)
        && p.dtype & 256 != 0
        && e.is_multiple_of(8)
        && e <= V3_MAX_EXPERTS;
    // gate_grouped_v3 also reads f32 logits (two 16-byte loads per lane).
    let v3_f32 = p.dtype & 255 == 0 && p.dtype & 256 != 0 && e.is_multiple_of(8) && e <= V3_MAX_EXPERTS;
    let v3_kernel = match p.mode {
        1 if v3_rows => Some(Kernel::GateTopkV3),
        2 if (v3_rows || v3_f32) && p.scoring == 1 && p.bias.is_multiple_of(16) && {
            // experts per group: 8 per lane, a power of two of lanes
            let size = e / p.n_group as usize;
            p.topk_group == p.n_group || (size.is_multiple_of(8) && (size / 8).is_power_of_two())
        } =>
        {
            Some(Kernel::GateGroupedV3)
        }
        _ => None,
    };
    // Auto does not pick a v3 kernel until their GPU conformance has run
    // (GateKernel::V3's doc).
    let which = match (kernel, v3_kernel) {
        (GateKernel::Auto, _) if e <= V2_MAX_EXPERTS && (p.mode == 2 || e > 64 || t < 4096) => {
            v2_kernel(p.mode)
        }
        (GateKernel::Auto | GateKernel::V1, _) => Kernel::GateTopk,
        (GateKernel::V2, _) if e <= V2_MAX_EXPERTS => v2_kernel(p.mode),
        (GateKernel::V2, _) => {
            return Err(CudaError::Unsupported {
                what: "gate_topk_v2 takes at most V2_MAX_EXPERTS (512) experts",
            });
        }
        (GateKernel::V3, Some(v3)) => v3,
        (GateKernel::V3, None) => {
            return Err(CudaError::Unsupported {
                what: "the v3 gating kernels take f16/bf16 logits (grouped routing: f32 too) with E <= 256, \
                       E % 8 == 0 and 16-byte aligned rows, and either renormalized top-k softmax or \
                       sigmoid grouped routing \
                       (16-byte aligned bias; groups of a power-of-two multiple of 8 experts, or \
                       topk_group == n_group)",
            });
        }
    };
    if t == 0 {
        return Ok(());
    }
    let _ctx = kernels.enter()?;
    let f = *kernels.func(which);
    let grid = (t as u32).div_ceil(WARPS);
    let smem = if matches!(which, Kernel::GateTopkV3 | Kernel::GateGroupedV3) {
        0
    } else {
        gate_smem(e)
    };
    // SAFETY: `p` is the single 80-byte by-value parameter of gate_topk,
    // gate_topk_v2, gate_grouped_v2, gate_topk_v3 and gate_grouped_v3 (same
    // layout; size asserted; the v2 kernels run only modes they implement,
    // E <= V2_MAX_EXPERTS; the v3 kernels only as `v3_kernel` chose them:
    // their mode, E <= 256 logits in whole aligned 16-byte vectors (16-bit;
    // f32 for gate_grouped_v3), so each lane's one or two vector loads stay
    // inside the row, and for
    // gate_grouped_v3 a 16-byte aligned bias of E values read as 8 per
    // lane); every device view was checked above against the extent the
    // kernel touches (T rows of stride elements, T * k ids and weights, E
    // bias values) and is non-null and aligned; the dynamic shared memory
    // is the 8 * (E + 256) * 4 bytes the kernel indexes; the stream belongs
    // to the kernels' context, current via `enter`.
    unsafe { kernels.launch(f, grid, BLOCK, smem, stream, &p) }
}
