//! One table of every kernel's launch facts: entry name, module, launch
//! kind, shared-memory plan and block size, plus the limits those plans are
//! computed from and the expert-GEMM configuration types. The registry
//! reads only this module (and the generated GEMM table); the launchers
//! read it too, so no launcher and the registry import each other.

use crate::gemm_table::GEMMS;
use core::ffi::CStr;

/// Block size (threads) of every kernel except the expert GEMMs (whose
/// configurations carry their own).
pub const BLOCK: u32 = 256;

/// Warps per block of the gating kernels (one warp per token).
pub(crate) const GATE_WARPS: u32 = BLOCK / 32;

/// Most experts (router row length) the GPU gating kernels take.
pub const MAX_DEVICE_EXPERTS: usize = 1024;

/// Most experts the tuned kernel `gate_topk_v2` takes (its keys live in
/// 16 registers per lane); `GateKernel::Auto` runs `gate_topk` above.
pub const V2_MAX_EXPERTS: usize = 512;

/// Most experts `gate_topk_v3` takes (8 keys per lane, one warp).
pub const V3_MAX_EXPERTS: usize = 256;

/// Most local experts `routing::align` takes (its per-warp counts live in
/// shared memory).
pub const MAX_ALIGN_EXPERTS: usize = 1024;

/// Most elements of a row one `ensemble_v2` block handles (its scores stay
/// in `4 * V2_MAX_CHUNK` bytes of shared memory).
pub const V2_MAX_CHUNK: usize = 12288;

/// The dynamic shared memory `ensemble_v2` plans its occupancy with.
pub(crate) const V2_MAX_SMEM: u32 = (4 * V2_MAX_CHUNK) as u32;

/// Dynamic shared memory of the gating kernels for `e` experts.
pub(crate) const fn gate_smem(e: usize) -> u32 {
    (GATE_WARPS as usize * (e + 256) * 4) as u32
}

/// Dynamic shared memory `moe_align` uses for `l` local experts.
pub(crate) const fn align_smem(l: usize) -> u32 {
    (4 * (32 * l + l + 1)) as u32
}

/// The PTX modules (files of `ptx/`), in load order: indices into the
/// registry's embedded module table.
pub(crate) mod module {
    pub(crate) const UTIL: usize = 0;
    pub(crate) const ENSEMBLE: usize = 1;
    pub(crate) const GATING: usize = 2;
    pub(crate) const ROUTING: usize = 3;
    pub(crate) const MOE_MMA: usize = 4;
    pub(crate) const MOE_WGMMA: usize = 5;
    pub(crate) const GATING_V2: usize = 6;
}

/// Launch facts of one kernel, as the registry loads and plans it.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct KernelSpec {
    /// Index of its PTX module in load order.
    pub module: usize,
    /// The PTX entry name.
    pub entry: &'static CStr,
    /// Launched cooperatively (all blocks co-resident).
    pub cooperative: bool,
    /// Most dynamic shared memory per block, bytes: what the registry opts
    /// in to and the occupancy query plans with.
    pub smem: u32,
    /// Threads per block (the occupancy query's block size).
    pub block: u32,
}

const fn spec(module: usize, entry: &'static CStr, cooperative: bool, smem: u32) -> KernelSpec {
    KernelSpec {
        module,
        entry,
        cooperative,
        smem,
        block: BLOCK,
    }
}

/// Every [`Kernel`]'s row, in [`Kernel::ALL`] order.
pub const SPECS: [KernelSpec; 14] = [
    spec(module::UTIL, c"fill_u32", false, 0),
    spec(module::ENSEMBLE, c"ensemble_v1", false, 0),
    spec(module::ENSEMBLE, c"ensemble_v2", true, V2_MAX_SMEM),
    spec(module::GATING, c"gate_topk", false, gate_smem(MAX_DEVICE_EXPERTS)),
    spec(
        module::GATING_V2,
        c"gate_topk_v2",
        false,
        gate_smem(V2_MAX_EXPERTS),
    ),
    spec(
        module::GATING_V2,
        c"gate_grouped_v2",
        false,
        gate_smem(V2_MAX_EXPERTS),
    ),
    spec(
        module::ROUTING,
        c"moe_align",
        false,
        align_smem(MAX_ALIGN_EXPERTS),
    ),
    spec(module::ROUTING, c"moe_permute", false, 0),
    spec(module::ROUTING, c"moe_combine", false, 0),
    spec(module::ENSEMBLE, c"ensemble_v2u", true, V2_MAX_SMEM),
    spec(module::ENSEMBLE, c"ensemble_sample", false, 0),
    spec(module::ENSEMBLE, c"ensemble_v2s", true, V2_MAX_SMEM),
    spec(module::GATING_V2, c"gate_topk_v3", false, 0),
    spec(module::GATING_V2, c"gate_grouped_v3", false, 0),
];

/// Every kernel entry point medley-cuda launches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kernel {
    /// `util.ptx: fill_u32`.
    FillU32,
    /// `ensemble.ptx: ensemble_v1` (one block per row, the on-device
    /// reference).
    EnsembleV1,
    /// `ensemble.ptx: ensemble_v2` (rows split over co-resident blocks,
    /// launched cooperatively).
    EnsembleV2,
    /// `gating.ptx: gate_topk` (one warp per token; the on-device
    /// reference).
    GateTopk,
    /// `gating_v2.ptx: gate_topk_v2` (one warp per token, keys in registers;
    /// `E <= 512`; top-k softmax variants).
    GateTopkV2,
    /// `gating_v2.ptx: gate_grouped_v2` (as `gate_topk_v2`, grouped routing).
    GateGroupedV2,
    /// `routing.ptx: moe_align` (the block-padded plan, one block).
    MoeAlign,
    /// `routing.ptx: moe_permute` (gather rows into plan order).
    MoePermute,
    /// `routing.ptx: moe_combine` (weighted k-way combine).
    MoeCombine,
    /// `ensemble.ptx: ensemble_v2u` (`ensemble_v2` with the per-row
    /// uncertainty outputs; launched instead of it when any is asked for).
    EnsembleV2U,
    /// `ensemble.ptx: ensemble_sample` (one block per row: the combined
    /// distribution's next token, greedy / temperature / top-k / top-p /
    /// min-p, without writing the distribution).
    EnsembleSample,
    /// `ensemble.ptx: ensemble_v2s` (`ensemble_v2`'s split rows, then
    /// greedy / temperature / min-p / top-k / top-p sampling instead of
    /// the row write;
    /// launched cooperatively).
    EnsembleV2S,
    /// `gating_v2.ptx: gate_topk_v3` (one warp per token over sorted
    /// index-carrying keys; f16/bf16, `E <= 256`, `E % 8 == 0`, aligned
    /// rows; renormalized top-k softmax only).
    GateTopkV3,
    /// `gating_v2.ptx: gate_grouped_v3` (grouped, biased routing with
    /// sigmoid scores, one warp per token, experts in registers; f16/bf16,
    /// `E <= 256`, `E % 8 == 0`, aligned rows and bias, groups of whole
    /// lanes).
    GateGroupedV3,
}

impl Kernel {
    /// All kernels, in registry order.
    pub const ALL: [Kernel; 14] = [
        Kernel::FillU32,
        Kernel::EnsembleV1,
        Kernel::EnsembleV2,
        Kernel::GateTopk,
        Kernel::GateTopkV2,
        Kernel::GateGroupedV2,
        Kernel::MoeAlign,
        Kernel::MoePermute,
        Kernel::MoeCombine,
        Kernel::EnsembleV2U,
        Kernel::EnsembleSample,
        Kernel::EnsembleV2S,
        Kernel::GateTopkV3,
        Kernel::GateGroupedV3,
    ];

    /// The kernel's row of [`SPECS`].
    pub const fn spec(self) -> &'static KernelSpec {
        &SPECS[self as usize]
    }

    /// The PTX entry name.
    pub const fn entry(self) -> &'static CStr {
        self.spec().entry
    }
}

/// The kernel generation of an expert GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Generation {
    /// `mma.sync` + `ldmatrix` + `cp.async` (sm_80 and later).
    Mma,
    /// `wgmma` + TMA (sm_90a: H100/H200 only).
    Wgmma,
}

/// What an expert GEMM does with its accumulators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Epilogue {
    /// GEMM1: `silu(gate) * up`, rounded to the activation dtype.
    SwiGlu,
    /// GEMM2: `routing weight * acc` as `f32`.
    Down,
}

/// Element type of an expert GEMM's activations and weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmDtype {
    /// bfloat16.
    BF16,
    /// IEEE half.
    F16,
}

/// One expert-GEMM entry point: a fixed launch configuration.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct GemmConfig {
    /// Kernel generation.
    pub generation: Generation,
    /// Epilogue.
    pub epilogue: Epilogue,
    /// Element type.
    pub dtype: GemmDtype,
    /// Plan rows per block (the plan's `block_m` must be a multiple).
    pub bm: u32,
    /// Output columns per block.
    pub bn: u32,
    /// Warps along M (mma) or consumer warpgroups (wgmma).
    pub warps_m: u32,
    /// Warps along N (mma; 1 for wgmma).
    pub warps_n: u32,
    /// Pipeline stages.
    pub stages: u32,
    /// Threads per block.
    pub threads: u32,
    /// Dynamic shared memory per block, bytes.
    pub smem: u32,
    /// Launched as one wave of resident blocks that walk the tiles
    /// (wgmma only; the same entry otherwise gets one block per tile).
    pub persistent: bool,
    /// PTX entry name.
    pub entry: &'static CStr,
    /// The configuration's unique name (the entry name, plus
    /// `_persistent` for the persistent launch).
    pub label: &'static str,
}

impl GemmConfig {
    /// The configuration's unique name (as tuning tables spell it).
    pub fn name(&self) -> &'static str {
        self.label
    }
}

/// A typed id of one expert-GEMM configuration: a row of the generated
/// table [`crate::experts::GEMMS`]. Obtain one from [`GemmId::find`],
/// [`GemmId::all`] or a tuning table; it cannot be made out of range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GemmId(u16);

const _: () = assert!(GEMMS.len() <= u16::MAX as usize);

impl GemmId {
    /// Every configuration, in table order.
    pub fn all() -> impl Iterator<Item = GemmId> {
        (0..GEMMS.len()).map(|i| GemmId(i as u16))
    }

    /// The configuration named `name` (as tuning tables spell it).
    pub fn find(name: &str) -> Option<GemmId> {
        GEMMS
            .iter()
            .position(|g| g.name() == name)
            .map(|i| GemmId(i as u16))
    }

    /// The id of row `index` of the table, if there is one.
    pub fn from_index(index: usize) -> Option<GemmId> {
        (index < GEMMS.len()).then_some(GemmId(index as u16))
    }

    /// The row's index in the table.
    pub fn index(self) -> usize {
        self.0 as usize
    }

    /// The configuration.
    pub fn config(self) -> &'static GemmConfig {
        &GEMMS[self.0 as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_kernel_order() {
        let names = [
            "fill_u32",
            "ensemble_v1",
            "ensemble_v2",
            "gate_topk",
            "gate_topk_v2",
            "gate_grouped_v2",
            "moe_align",
            "moe_permute",
            "moe_combine",
            "ensemble_v2u",
            "ensemble_sample",
            "ensemble_v2s",
            "gate_topk_v3",
            "gate_grouped_v3",
        ];
        for (k, name) in Kernel::ALL.iter().zip(names) {
            assert_eq!(k.entry().to_str().unwrap(), name);
            assert_eq!(SPECS[*k as usize].entry, k.entry());
        }
    }
}
