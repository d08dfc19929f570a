//! # medley-cuda
//!
//! medley's GPU layer: hand-written PTX kernels (`ptx/*.ptx`, embedded at
//! compile time) loaded through cust into a fixed registry, launched on the
//! caller's stream over the caller's device memory.
//!
//! ## Glossary
//!
//! - **context**: the CUDA driver's per-device state (memory, modules,
//!   streams). medley never creates one: it works in the caller's.
//! - **stream**: an ordered queue of device work. Every medley call enqueues
//!   on the caller's stream ([`Stream`]) and returns without waiting, so it
//!   can be captured in a CUDA graph.
//! - **module**: loaded PTX. [`Kernels`] loads every module of medley once
//!   per context and resolves every entry point once; launches index an
//!   array, never look up a name.
//! - **grid / block**: a launch runs `grid` blocks of `block` threads; every
//!   medley kernel documents its launch shape at the top of its `.ptx` file.
//!
//! ## Integration model
//!
//! - [`Kernels::load`] (current context) or [`Kernels::load_for_stream`]
//!   (the caller's stream's context) once; [`Kernels::destroy`] reports
//!   teardown errors.
//! - Device memory is wrapped in borrowed views ([`mem::DeviceSlice`],
//!   [`mem::DeviceRows`], ...); nothing is allocated, freed or synchronized
//!   inside a call. Workspace needs are reported by `*_workspace_bytes`.
//! - Every call validates shapes, strides, alignment and parameters before
//!   launching (the CPU core's [`medley_core::Error`] variants, wrapped in
//!   [`CudaError::Invalid`]) and keeps the raw driver code of any failure
//!   ([`driver::DriverError`]).
//!
//! Building needs no CUDA toolkit: `build.rs` links a generated stub driver
//! when no real one is installed; GPU tests then report that they were
//! skipped.

pub mod driver;
pub mod ensemble;
pub mod error;
pub mod experts;
pub mod gating;
mod gemm_table;
pub mod graph;
pub mod mem;
#[cfg(feature = "testing")]
pub mod owned;
pub mod registry;
pub mod routing;
pub mod specs;

pub use error::CudaError;
pub use mem::Stream;
pub use registry::{Kernel, Kernels, LoadError, Modules};

/// One GPU operation, described by a call struct (its inputs, outputs and
/// options: [`ensemble::Combine`], [`gating::Gate`], [`routing::Align`],
/// [`routing::Permute`], [`routing::Combine`], [`experts::Gemm1`],
/// [`experts::Gemm2`], [`experts::Layer`]) and enqueued by its one method.
///
/// `launch` validates every argument before anything is enqueued (a failed
/// call leaves its outputs untouched), checks that `stream` belongs to the
/// context `kernels` were loaded in ([`CudaError::WrongContext`]), never
/// allocates and never synchronizes.
pub trait Launch {
    /// Enqueues the operation on `stream`.
    fn launch(self, kernels: &Kernels, stream: Stream<'_>) -> Result<(), CudaError>;
}

/// Whether a usable CUDA device is present: `Ok(())`, or the reason it is
/// not (`cuInit`'s raw code: 34 = the stub driver, 100 = no device).
pub fn probe() -> Result<(), driver::DriverError> {
    driver::init()
}
