//! The one benchmark entry point: `cargo bench -p medley-benches`
//! (filter with `-- <group>`, e.g. `-- ensemble`, `-- merge/`, `-- moe_`,
//! `-- cuda/`).

use criterion::criterion_main;

mod ensemble;
mod gpu_ensemble;
mod gpu_experts;
mod gpu_moe;
mod merge;
mod moe;

criterion_main!(
    ensemble::benches,
    merge::benches,
    moe::benches,
    gpu_ensemble::benches,
    gpu_moe::benches,
    gpu_experts::benches
);
