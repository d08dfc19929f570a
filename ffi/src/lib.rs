//! # medley-ffi
//!
//! The C ABI of medley, for C and C++ runtimes. The header is
//! `ffi/include/medley.h`, generated from this crate by cbindgen (pinned
//! version in `.ci/run`, which fails when the checked-in header differs).
//! The crate builds as a static library (`libmedley_ffi.a`), a shared
//! library (`libmedley_ffi.so`) and an rlib (for Rust tests and fuzzing).
//!
//! ## Features
//!
//! - `cuda` (default): the GPU entry points (`medley_cuda_*`, module
//!   `gpu`) over medley-cuda; the library then needs `-lcuda`. Built with
//!   `--no-default-features`, the library is CPU-only and links without
//!   libcuda; the header hides its GPU declarations when the C user
//!   defines `MEDLEY_NO_CUDA`, and [`medley_has_cuda`] tells at run time
//!   which build was linked. The status codes are the same in both builds.
//!
//! ## Contract (every entry point)
//!
//! - Functions return a [`medley_status`]: `MEDLEY_STATUS_OK` (0) or a
//!   failure code (7000 block: arguments and panics; 7100 block: CUDA).
//!   [`medley_status_name`] names a code, [`medley_last_error_message`]
//!   describes the calling thread's last failure, and
//!   [`medley_last_cuda_error`] gives the raw `CUresult` of a driver
//!   failure (thread-local, like `errno`).
//! - No panic crosses the boundary: every body runs inside
//!   `ffi_boundary!` (`catch_unwind`); a panic returns
//!   `MEDLEY_STATUS_PANIC`.
//! - Buffers are (pointer, length in elements) pairs; a pointer may be null
//!   only when its length is 0; optional outputs are null when not wanted.
//!   Every pointer is checked for null and alignment, every size product
//!   and end address for overflow, every written buffer for overlap with
//!   the call's other buffers, and the core validates shapes and
//!   parameters, all before any output is written: a failed call leaves
//!   its outputs untouched.
//! - CPU functions take host pointers; GPU functions take the caller's
//!   `CUstream` / `cudaStream_t` as `void *` and device addresses as
//!   `uint64_t`, enqueue on that stream and never synchronize.
//! - State is kept only in opaque, Box-owned handles created and destroyed
//!   explicitly (`medley_cuda_engine`, `medley_merge_stream`); destroy
//!   reports errors.

// The published struct sizes (`MEDLEY_*_SIZE_V<n>`) are those of a 64-bit
// target, the only kind CUDA and medley's kernels support.
#[cfg(not(target_pointer_width = "64"))]
compile_error!("medley-ffi supports 64-bit targets only (its struct sizes are published for them)");

#[macro_use]
mod boundary;
pub mod args;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod gpu;
#[cfg(feature = "cuda")]
pub mod gpu_moe;
pub mod merge;
pub mod merge_methods;
pub mod merge_stream;
pub mod moe;
pub mod status;

pub use args::medley_dtype;
pub use cpu::{
    MEDLEY_ENSEMBLE_CONFIG_SIZE_V1, MEDLEY_ENSEMBLE_OUTPUT_SIZE_V1, MEDLEY_ENSEMBLE_OUTPUT_SIZE_V2,
    MEDLEY_REPORT_SIZE_V1, medley_ensemble_combine, medley_ensemble_config, medley_ensemble_config_init,
    medley_ensemble_output, medley_ensemble_output_init, medley_mask_rule, medley_mode, medley_model,
    medley_moe_keep_topk_softmax, medley_moe_topk_softmax, medley_report, medley_report_init, medley_rows,
};
#[cfg(feature = "cuda")]
pub use gpu::{
    MEDLEY_CUDA_ENGINE_OPTIONS_SIZE_V1, medley_cuda_engine_new_with, medley_cuda_engine_options,
    medley_cuda_engine_options_init, medley_cuda_last_jit_log, medley_cuda_modules,
};
#[cfg(feature = "cuda")]
pub use gpu::{
    MEDLEY_CUDA_ENSEMBLE_OUTPUT_SIZE_V1, MEDLEY_CUDA_ENSEMBLE_OUTPUT_SIZE_V2, medley_cuda_engine,
    medley_cuda_engine_destroy, medley_cuda_engine_new, medley_cuda_ensemble_combine,
    medley_cuda_ensemble_output, medley_cuda_ensemble_output_init, medley_cuda_ensemble_workspace_bytes,
    medley_cuda_kernel, medley_cuda_model, medley_cuda_moe_keep_topk_softmax, medley_cuda_moe_topk_softmax,
    medley_cuda_probe, medley_cuda_rows,
};
#[cfg(feature = "cuda")]
pub use gpu_moe::{
    MEDLEY_CUDA_MOE_ALIGN_OUTPUT_SIZE_V1, MEDLEY_CUDA_MOE_CHOICE_SIZE_V1, medley_cuda_moe_align,
    medley_cuda_moe_align_output, medley_cuda_moe_align_output_init, medley_cuda_moe_choice,
    medley_cuda_moe_choice_init, medley_cuda_moe_choose, medley_cuda_moe_combine, medley_cuda_moe_experts,
    medley_cuda_moe_gemm1, medley_cuda_moe_gemm2, medley_cuda_moe_generation, medley_cuda_moe_grouped_topk,
    medley_cuda_moe_layer, medley_cuda_moe_layer_workspace_bytes, medley_cuda_moe_permute,
    medley_cuda_moe_plan, medley_cuda_moe_routing,
};
pub use merge::{
    MEDLEY_TIES_OPTIONS_SIZE_V1, medley_merge_model, medley_merge_ties, medley_merge_ties_scratch_len,
    medley_ties_consensus, medley_ties_divisor, medley_ties_options, medley_ties_options_init,
    medley_ties_options_init_paper, medley_ties_votes,
};
pub use moe::{
    MEDLEY_MOE_ALIGN_OUTPUT_SIZE_V1, MEDLEY_MOE_GROUPED_CONFIG_SIZE_V1, medley_moe_align_block_size,
    medley_moe_align_output, medley_moe_align_output_init, medley_moe_block_padded_len, medley_moe_experts,
    medley_moe_group_score, medley_moe_grouped_config, medley_moe_grouped_config_init,
    medley_moe_grouped_topk, medley_moe_layer, medley_moe_layer_scratch_bytes, medley_moe_range,
    medley_moe_routing, medley_moe_scoring,
};
// Every other merge method and the streamed merges (merge_methods.rs,
// merge_stream.rs).
pub use merge_methods::{
    MEDLEY_GTA_OPTIONS_SIZE_V1, MEDLEY_KARCHER_OPTIONS_SIZE_V1, MEDLEY_MULTISLERP_OPTIONS_SIZE_V1,
    MEDLEY_NUSLERP_OPTIONS_SIZE_V1, MEDLEY_SCE_OPTIONS_SIZE_V1, MEDLEY_SLERP_OPTIONS_SIZE_V1,
    MEDLEY_SOUP_REPORT_SIZE_V1, MEDLEY_STOCK_OPTIONS_SIZE_V1, medley_gta_consensus, medley_gta_model,
    medley_gta_options, medley_gta_options_init, medley_gta_options_init_preset, medley_gta_preset,
    medley_gta_rescale, medley_gta_sparsify, medley_karcher_options, medley_karcher_options_init,
    medley_merge_greedy_soup, medley_merge_gta, medley_merge_gta_scratch_len, medley_merge_karcher,
    medley_merge_linear, medley_merge_model_stock, medley_merge_multislerp, medley_merge_nuslerp,
    medley_merge_nuslerp_scratch_len, medley_merge_pruned_soup, medley_merge_sce,
    medley_merge_sce_scratch_len, medley_merge_slerp, medley_merge_tensor, medley_multislerp_options,
    medley_multislerp_options_init, medley_nuslerp_layout, medley_nuslerp_options,
    medley_nuslerp_options_init, medley_sce_options, medley_sce_options_init, medley_slerp_options,
    medley_slerp_options_init, medley_soup_eval, medley_soup_report, medley_soup_report_init,
    medley_stock_options, medley_stock_options_init,
};
pub use merge_stream::{
    medley_merge_stream, medley_merge_stream_apply, medley_merge_stream_destroy,
    medley_merge_stream_end_pass, medley_merge_stream_feed, medley_merge_stream_needs_pass,
    medley_merge_stream_new_gta, medley_merge_stream_new_karcher, medley_merge_stream_new_model_stock,
    medley_merge_stream_new_multislerp, medley_merge_stream_new_nuslerp, medley_merge_stream_new_sce,
    medley_merge_stream_new_slerp,
};
pub use status::{
    Fail, medley_abi_version, medley_has_cuda, medley_last_cuda_error, medley_last_error_message,
    medley_status, medley_status_name, medley_version,
};

/// Major version of the C ABI: changes only with an incompatible change
/// (a function or field removed or changed); see "ABI policy" in
/// ffi/README.md.
pub const MEDLEY_ABI_VERSION_MAJOR: u32 = 1;
/// Minor version of the C ABI: grows with every added function, enum
/// value, status or struct field (each struct layout keeps its
/// `MEDLEY_*_SIZE_V<n>` constant).
pub const MEDLEY_ABI_VERSION_MINOR: u32 = 1;
/// `MEDLEY_ABI_VERSION_MAJOR << 16 | MEDLEY_ABI_VERSION_MINOR`, what
/// `medley_abi_version()` returns for the header the library was built
/// with.
pub const MEDLEY_ABI_VERSION: u32 = (MEDLEY_ABI_VERSION_MAJOR << 16) | MEDLEY_ABI_VERSION_MINOR;

/// The argmax of a row with no valid token (fully masked or NaN).
pub const MEDLEY_NO_TOKEN: u32 = 0xFFFF_FFFF;
/// Most models one CPU combination takes.
pub const MEDLEY_MAX_MODELS: usize = 64;
/// Most models one GPU combination takes.
#[cfg(feature = "cuda")]
pub const MEDLEY_MAX_DEVICE_MODELS: usize = 16;
/// Most experts (router row length) the gating functions take.
pub const MEDLEY_MOE_MAX_EXPERTS: usize = 4096;
/// Most experts per token (`k`) the gating functions take.
pub const MEDLEY_MOE_MAX_K: usize = 32;
/// Most experts (router row length) the GPU gating functions take.
#[cfg(feature = "cuda")]
pub const MEDLEY_MOE_MAX_DEVICE_EXPERTS: usize = 1024;
/// Most models one merge takes.
pub const MEDLEY_MERGE_MAX_MODELS: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_constants_match_the_crates() {
        assert_eq!(MEDLEY_NO_TOKEN, medley_core::ensemble::NO_TOKEN);
        assert_eq!(MEDLEY_MAX_MODELS, medley_core::ensemble::MAX_MODELS);
        assert_eq!(MEDLEY_MOE_MAX_EXPERTS, medley_core::moe::MAX_EXPERTS);
        assert_eq!(MEDLEY_MOE_MAX_K, medley_core::moe::MAX_K);
        assert_eq!(MEDLEY_MERGE_MAX_MODELS, medley_core::merge::MAX_MODELS);
    }

    #[cfg(feature = "cuda")]
    #[test]
    fn device_constants_match_medley_cuda() {
        assert_eq!(MEDLEY_MAX_DEVICE_MODELS, medley_cuda::ensemble::MAX_DEVICE_MODELS);
        assert_eq!(
            MEDLEY_MOE_MAX_DEVICE_EXPERTS,
            medley_cuda::gating::MAX_DEVICE_EXPERTS
        );
    }

    #[test]
    fn has_cuda_reflects_the_feature() {
        assert_eq!(medley_has_cuda(), cfg!(feature = "cuda"));
    }
}
