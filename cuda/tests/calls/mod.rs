//! The tests' spelling of the launch calls: one function per call struct
//! with its fields as arguments (GEMM configurations by table index), so the
//! suites read as before the call structs existed. Each builds the struct
//! and calls [`Launch::launch`], the one public launch path.
#![allow(dead_code, unreachable_pub, clippy::too_many_arguments)]

use medley_core::moe::ExpertRange;
use medley_cuda::ensemble::{self, DeviceConfig, DeviceModel, DeviceOutput, Version};
use medley_cuda::experts::{self, DeviceActMut, DevicePlan, GemmId, LayerChoice, LayerScratch};
use medley_cuda::gating::{self, GateKernel, Gating, RouterLogits};
use medley_cuda::mem::{DeviceMatrix, DeviceRowsMut, DeviceSlice, DeviceSliceMut};
use medley_cuda::routing::{self, AlignOutput, DeviceMatrixMut};
use medley_cuda::{CudaError, Kernels, Launch, Stream};

/// The id of GEMM table row `i`.
pub fn gid(i: usize) -> GemmId {
    GemmId::from_index(i).expect("a GEMM table index")
}

pub fn gpu_combine<'a>(
    k: &Kernels,
    models: &'a [DeviceModel<'a>],
    cfg: &'a DeviceConfig<'a>,
    out: DeviceOutput<'a>,
    workspace: Option<DeviceSliceMut<'a, u8>>,
    stream: Stream<'_>,
    version: Version,
) -> Result<(), CudaError> {
    let mut c = ensemble::Combine::new(models, cfg, out).with_version(version);
    c.workspace = workspace;
    c.launch(k, stream)
}

pub fn gate_with<'a>(
    k: &Kernels,
    logits: RouterLogits<'a>,
    kk: usize,
    gating: &'a Gating<'a>,
    ids: DeviceSliceMut<'a, u32>,
    weights: DeviceSliceMut<'a, f32>,
    stream: Stream<'_>,
    kernel: GateKernel,
) -> Result<(), CudaError> {
    gating::Gate::new(logits, kk, gating, ids, weights)
        .with_kernel(kernel)
        .launch(k, stream)
}

pub fn align(
    k: &Kernels,
    ids: DeviceSlice<'_, u32>,
    experts: usize,
    range: ExpertRange,
    block_m: usize,
    out: AlignOutput<'_>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    routing::Align::new(ids, experts, range, block_m, out).launch(k, stream)
}

pub fn permute(
    k: &Kernels,
    x: DeviceMatrix<'_>,
    kk: usize,
    sorted_ids: DeviceSlice<'_, u32>,
    total: DeviceSlice<'_, u32>,
    out: DeviceMatrixMut<'_>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    routing::Permute::new(x, kk, sorted_ids, total, out).launch(k, stream)
}

pub fn combine(
    k: &Kernels,
    y: DeviceMatrix<'_>,
    kk: usize,
    inverse: DeviceSlice<'_, u32>,
    weights: DeviceSlice<'_, f32>,
    out: DeviceRowsMut<'_, f32>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    routing::Combine::new(y, kk, inverse, weights, out).launch(k, stream)
}

pub fn gemm1<'a>(
    k: &Kernels,
    gemm: usize,
    x: DeviceMatrix<'a>,
    x_in_plan_order: bool,
    plan: &'a DevicePlan<'a>,
    w13: DeviceMatrix<'a>,
    out: DeviceActMut<'a>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    let mut c = experts::Gemm1::new(gid(gemm), x, plan, w13, out);
    c.x_in_plan_order = x_in_plan_order;
    c.launch(k, stream)
}

pub fn gemm2<'a>(
    k: &Kernels,
    gemm: usize,
    act: DeviceMatrix<'a>,
    plan: &'a DevicePlan<'a>,
    w2: DeviceMatrix<'a>,
    weights: DeviceSlice<'a, f32>,
    out: DeviceRowsMut<'a, f32>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    experts::Gemm2::new(gid(gemm), act, plan, w2, weights, out).launch(k, stream)
}

pub fn layer<'a>(
    k: &Kernels,
    choice: &'a LayerChoice,
    x: DeviceMatrix<'a>,
    plan: &'a DevicePlan<'a>,
    inverse: DeviceSlice<'a, u32>,
    weights: DeviceSlice<'a, f32>,
    w13: DeviceMatrix<'a>,
    w2: DeviceMatrix<'a>,
    scratch: LayerScratch<'a>,
    out: DeviceRowsMut<'a, f32>,
    stream: Stream<'_>,
) -> Result<(), CudaError> {
    experts::Layer::new(choice, x, plan, inverse, weights, w13, w2, scratch, out).launch(k, stream)
}
