#!/usr/bin/env bash
# Builds and tests a small crate that depends on medley-core, medley-cuda and
# medley-ffi by path, in a temporary folder outside the workspace (so the
# workspace's .cargo/config.toml does not apply) with every CUDA variable
# unset: what a new user gets on a machine without a CUDA toolkit or driver.
# Usage: .ci/downstream.sh   (exits non-zero on any failure)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dir=$(mktemp -d /tmp/medley-downstream.XXXXXX)
trap 'rm -rf "$dir"' EXIT
mkdir -p "$dir/src" "$dir/tests"
cat > "$dir/Cargo.toml" <<TOML
[package]
name = "medley-downstream"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
medley-core = { path = "$repo/core" }
medley-cuda = { path = "$repo/cuda" }
medley-ffi = { path = "$repo/ffi" }
TOML
cat > "$dir/src/lib.rs" <<'RS'
//! A dependent crate: combines two models on the CPU and asks for a GPU.

/// Linear ensemble of two rows of logits; returns the argmax.
pub fn best_token(a: &[f32], b: &[f32]) -> u32 {
    use medley_core::ensemble::{Config, Model, Output, combine};
    use medley_core::{Rows, RowsMut};
    let models = [
        Model::new(Rows::dense(a, 1, a.len()).unwrap()),
        Model::new(Rows::dense(b, 1, b.len()).unwrap()),
    ];
    let mut lp = vec![0.0f32; a.len()];
    let mut best = [0u32];
    let out = Output {
        log_probs: Some(RowsMut::dense(&mut lp, 1, a.len()).unwrap()),
        argmax: Some(&mut best),
        ..Default::default()
    };
    combine(&models, &Config::linear(&[0.5, 0.5]), out).unwrap();
    best[0]
}
RS
cat > "$dir/tests/uses_medley.rs" <<'RS'
#[test]
fn cpu_works_and_the_gpu_is_reported_missing() {
    assert_eq!(medley_downstream::best_token(&[0.0, 3.0, 1.0], &[0.0, 2.0, 2.5]), 1);
    match medley_cuda::probe() {
        Ok(()) => eprintln!("a CUDA device is present"),
        Err(e) => assert!(e.code == 34 || e.code == 100, "cuInit returned {e}"),
    }
    // The C ABI from Rust: a status name.
    let name = unsafe { std::ffi::CStr::from_ptr(medley_ffi::medley_status_name(0)) };
    assert_eq!(name.to_str().unwrap(), "MEDLEY_STATUS_OK");
}
RS
cd "$dir"
echo "downstream: building $dir against $repo with no CUDA environment"
env -u CUDA_LIBRARY_PATH -u CUDA_PATH -u CUDA_ROOT -u CUDA_HOME -u CUDA_TOOLKIT_ROOT_DIR \
  -u RUSTFLAGS -u CARGO_TARGET_DIR -u CARGO_BUILD_TARGET_DIR \
  cargo test --quiet
echo "downstream: OK"
