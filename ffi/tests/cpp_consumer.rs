//! Builds the C++ consumer (`tests/cpp/consumer.cpp`) with the system C++
//! compiler against the static library cargo built for this test, runs it,
//! and asserts that it exits with 0. Also checks that the header compiles
//! as strict C99.
//!
//! Where things are found (each can be overridden):
//! - the compilers: `$CXX` / `$CC`, else `c++` / `cc`;
//! - `libmedley_ffi.a`: `$MEDLEY_FFI_STATICLIB`, else the newest of
//!   `<profile>/deps/libmedley_ffi.a` and `<profile>/libmedley_ffi.a`, where
//!   `<profile>` is the directory of this test executable's `deps/` (cargo
//!   builds the lib's staticlib artifact with the lib it tests against);
//! - the directory of the `libcuda.so` to link (medley-cuda links
//!   `-lcuda`): `$MEDLEY_CUDA_LIB_DIR`, else the first `LD_LIBRARY_PATH`
//!   entry holding one (cargo puts medley-cuda's build-script output
//!   there when it runs tests: the generated stub, or a link to the real
//!   driver), else the newest `<profile>/build/medley-cuda-*/out/{stub,
//!   driver-link}`, else the system linker path.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// The target profile directory (`target/debug`) this test runs from.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable directory");
    assert_eq!(
        deps.file_name().and_then(|n| n.to_str()),
        Some("deps"),
        "unexpected layout: {exe:?}"
    );
    deps.parent().expect("profile directory").to_path_buf()
}

fn mtime(p: &Path) -> Option<SystemTime> {
    p.metadata().and_then(|m| m.modified()).ok()
}

fn newest(paths: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    paths
        .into_iter()
        .filter_map(|p| mtime(&p).map(|t| (t, p)))
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
}

fn staticlib() -> PathBuf {
    if let Some(p) = std::env::var_os("MEDLEY_FFI_STATICLIB") {
        return PathBuf::from(p);
    }
    let prof = profile_dir();
    newest([prof.join("deps/libmedley_ffi.a"), prof.join("libmedley_ffi.a")]).unwrap_or_else(|| {
        panic!(
            "libmedley_ffi.a not found under {prof:?}; build it with `cargo build -p medley-ffi` or set \
             MEDLEY_FFI_STATICLIB"
        )
    })
}

fn libcuda_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MEDLEY_CUDA_LIB_DIR") {
        return Some(PathBuf::from(p));
    }
    if let Some(lp) = std::env::var_os("LD_LIBRARY_PATH")
        && let Some(d) = std::env::split_paths(&lp).find(|d| d.join("libcuda.so").exists())
    {
        return Some(d);
    }
    let build = profile_dir().join("build");
    let dirs = std::fs::read_dir(&build).ok()?;
    newest(
        dirs.filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("medley-cuda-"))
            .flat_map(|e| [e.path().join("out/stub"), e.path().join("out/driver-link")])
            .map(|d| d.join("libcuda.so"))
            .filter(|p| p.exists()),
    )
    .map(|p| p.parent().expect("lib dir").to_path_buf())
}

fn tool(var: &str, default: &str) -> OsString {
    std::env::var_os(var).unwrap_or_else(|| default.into())
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is a C/C++ compiler installed?)"));
    println!("$ {cmd:?}");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    out
}

#[test]
fn cpp_consumer_passes() {
    let lib = staticlib();
    let cuda = libcuda_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("medley_cpp_consumer");
    let mut cc = Command::new(tool("CXX", "c++"));
    cc.args(["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(Path::new(MANIFEST).join("include"))
        .arg(Path::new(MANIFEST).join("tests/cpp/consumer.cpp"))
        .arg(&lib);
    if let Some(d) = &cuda {
        cc.arg("-L").arg(d);
    }
    // The static library's native dependencies (rustc --print
    // native-static-libs): the CUDA driver, then the C runtime.
    cc.args([
        "-lcuda",
        "-lgcc_s",
        "-lutil",
        "-lrt",
        "-lpthread",
        "-lm",
        "-ldl",
        "-lc",
        "-o",
    ])
    .arg(&exe);
    let built = run(&mut cc);
    assert!(
        built.status.success(),
        "the C++ consumer did not build against {lib:?}"
    );

    let mut consumer = Command::new(&exe);
    if let Some(d) = &cuda {
        // The stub (or the real driver's unversioned link) must be found
        // at run time as libcuda.so.1; a real driver installed system-wide
        // is found anyway. Prepend, keeping cargo's own path.
        let mut paths = vec![d.clone()];
        if let Some(lp) = std::env::var_os("LD_LIBRARY_PATH") {
            paths.extend(std::env::split_paths(&lp).filter(|p| p != d));
        }
        consumer.env(
            "LD_LIBRARY_PATH",
            std::env::join_paths(paths).expect("join paths"),
        );
    }
    let out = run(&mut consumer);
    assert!(out.status.success(), "the C++ consumer failed: {:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("all ") && stdout.contains("checks passed"),
        "no success line"
    );
    assert!(
        stdout.contains("gpu: "),
        "the GPU part neither ran nor reported a skip"
    );
}

#[test]
fn header_is_strict_c99() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let src = dir.join("medley_header_check.c");
    std::fs::write(
        &src,
        "#include \"medley.h\"\n\
         int main(void) {\n\
           medley_ensemble_config c = medley_ensemble_config_default();\n\
           medley_status s = medley_moe_topk_softmax(NULL, 1, 0, NULL, 0, NULL, 0, NULL);\n\
           return (int)c.mode + (s == MEDLEY_STATUS_NULL_ARGUMENT ? 0 : 1);\n\
         }\n",
    )
    .expect("write C source");
    let out = run(Command::new(tool("CC", "cc"))
        .args([
            "-std=c99",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-pedantic",
            "-fsyntax-only",
            "-I",
        ])
        .arg(Path::new(MANIFEST).join("include"))
        .arg(&src));
    assert!(out.status.success(), "medley.h does not compile as C99");
}
