//! The one benchmark entry point: `cargo bench -p medley-benches`
//! (filter with `-- <group>`, e.g. `-- ensemble`).

use criterion::criterion_main;

mod ensemble;
mod merge;

criterion_main!(ensemble::benches, merge::benches);
