//! The one benchmark entry point: `cargo bench -p medley-benches`
//! (filter with `-- <group>`, e.g. `-- ensemble`).

use criterion::criterion_main;

mod ensemble;
mod moe;

criterion_main!(ensemble::benches, moe::benches);
