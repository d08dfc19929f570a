//! The one benchmark entry point: `cargo bench -p medley-benches`
//! (filter with `-- <group>`, e.g. `-- ensemble`).

use criterion::criterion_main;

mod ensemble;
mod gpu_ensemble;

criterion_main!(ensemble::benches, gpu_ensemble::benches);
