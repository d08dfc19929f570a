//! Builds the C++ consumer (`tests/cpp/*.cpp`, `main` in `consumer.cpp`) with the system C++
//! compiler against the static library cargo built for this test, runs it,
//! and asserts that it exits with 0. Also checks that the header compiles
//! as strict C99.
//!
//! Which test runs depends on the features of this test build: with `cuda`
//! (the default) the consumer is linked with `-lcuda` and runs its GPU part
//! where a device is usable; without it (`cargo test -p medley-ffi
//! --no-default-features`) the consumer is compiled with `-DMEDLEY_NO_CUDA`
//! and linked without libcuda, and the library is checked to need no `cu*`
//! symbol. Both builds write the same `libmedley_ffi.a` (cargo gives a
//! staticlib no per-feature file name), so the tests first check (`nm`,
//! or `$NM`) that the library found is the one of this build's features.
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

/// The C runtime libraries the static library needs besides the CUDA
/// driver (`rustc --print native-static-libs`).
const C_RUNTIME: [&str; 7] = ["-lgcc_s", "-lutil", "-lrt", "-lpthread", "-lm", "-ldl", "-lc"];

/// The consumer's translation units: every `tests/cpp/*.cpp`, sorted.
fn consumer_sources() -> Vec<PathBuf> {
    let dir = Path::new(MANIFEST).join("tests/cpp");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("tests/cpp")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "cpp"))
        .collect();
    v.sort();
    assert!(v.len() >= 3, "consumer sources missing in {dir:?}: {v:?}");
    v
}

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

/// The global symbols `lib` defines (`defined`) or needs (`!defined`),
/// from `nm`.
fn symbols(lib: &Path, defined: bool) -> Vec<String> {
    let mut cmd = Command::new(tool("NM", "nm"));
    cmd.arg(if defined {
        "--defined-only"
    } else {
        "--undefined-only"
    })
    .arg("--extern-only")
    .arg(lib);
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (is binutils installed?)"));
    assert!(out.status.success(), "{cmd:?} failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .filter(|s| !s.ends_with(':'))
        .map(str::to_string)
        .collect()
}

/// The static library of this test build, checked to have the GPU entry
/// points exactly when the `cuda` feature is on.
fn staticlib_of_this_build() -> PathBuf {
    let lib = staticlib();
    let has_gpu = symbols(&lib, true).iter().any(|s| s == "medley_cuda_probe");
    assert_eq!(
        has_gpu,
        cfg!(feature = "cuda"),
        "{lib:?} was built {} the `cuda` feature, this test {}: cargo reused a staticlib another feature set \
         overwrote (touch ffi/src/lib.rs, or give each feature set its own --target-dir)",
        if has_gpu { "with" } else { "without" },
        if cfg!(feature = "cuda") {
            "with it"
        } else {
            "without it"
        },
    );
    lib
}

#[cfg(feature = "cuda")]
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

#[cfg(feature = "cuda")]
#[test]
fn cpp_consumer_passes() {
    let lib = staticlib_of_this_build();
    let cuda = libcuda_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("medley_cpp_consumer");
    let mut cc = Command::new(tool("CXX", "c++"));
    cc.args(["-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-pedantic"])
        .arg("-I")
        .arg(Path::new(MANIFEST).join("include"))
        .args(consumer_sources())
        .arg(&lib);
    if let Some(d) = &cuda {
        cc.arg("-L").arg(d);
    }
    // The static library's native dependencies (rustc --print
    // native-static-libs): the CUDA driver, then the C runtime.
    cc.arg("-lcuda").args(C_RUNTIME).arg("-o").arg(&exe);
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

/// The CPU-only library links and runs without libcuda: the consumer
/// compiled with `-DMEDLEY_NO_CUDA` and linked with the C runtime only.
#[cfg(not(feature = "cuda"))]
#[test]
fn cpp_consumer_links_without_libcuda() {
    let lib = staticlib_of_this_build();
    let needs_cuda: Vec<String> = symbols(&lib, false)
        .into_iter()
        .filter(|s| s.starts_with("cu") && s[2..].starts_with(|c: char| c.is_ascii_uppercase()))
        .collect();
    assert!(
        needs_cuda.is_empty(),
        "the CPU-only {lib:?} needs CUDA driver symbols: {needs_cuda:?}"
    );
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("medley_cpp_consumer_cpu");
    let mut cc = Command::new(tool("CXX", "c++"));
    cc.args([
        "-std=c++17",
        "-O1",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-pedantic",
        "-DMEDLEY_NO_CUDA",
    ])
    .arg("-I")
    .arg(Path::new(MANIFEST).join("include"))
    .args(consumer_sources())
    .arg(&lib)
    // The C runtime only: no -lcuda, no -L to a stub.
    .args(C_RUNTIME)
    .arg("-o")
    .arg(&exe);
    let built = run(&mut cc);
    assert!(
        built.status.success(),
        "the C++ consumer did not build against {lib:?} without -lcuda"
    );
    let out = run(&mut Command::new(&exe));
    assert!(out.status.success(), "the C++ consumer failed: {:?}", out.status);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("all ") && stdout.contains("checks passed"),
        "no success line"
    );
    assert!(
        stdout.contains("gpu: not built (MEDLEY_NO_CUDA)"),
        "the consumer was built with its GPU part"
    );
}

#[test]
fn header_is_strict_c99() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let src = dir.join("medley_header_check.c");
    std::fs::write(
        &src,
        "#include \"medley.h\"\n\
         #if defined(MEDLEY_EXPECT_CUDA) != defined(MEDLEY_CUDA)\n\
         #error \"MEDLEY_CUDA is not defined as expected\"\n\
         #endif\n\
         int main(void) {\n\
           medley_ensemble_config c;\n\
           if (medley_ensemble_config_init(&c, sizeof c) != MEDLEY_STATUS_OK) return 2;\n\
           bool gpu = medley_has_cuda();\n\
         #if defined(MEDLEY_CUDA)\n\
           medley_cuda_kernel k = MEDLEY_CUDA_KERNEL_AUTO;\n\
           (void)medley_cuda_probe;\n\
           (void)k;\n\
         #endif\n\
           (void)gpu;\n\
           medley_status s = medley_moe_topk_softmax(NULL, 1, 0, NULL, 0, NULL, 0, NULL);\n\
           return (int)c.mode + (s == MEDLEY_STATUS_NULL_ARGUMENT ? 0 : 1);\n\
         }\n",
    )
    .expect("write C source");
    // Both configurations of the header: the GPU declarations present
    // (default) and hidden (MEDLEY_NO_CUDA, checked by redefining a GPU
    // name, which would clash with its declaration).
    for defs in [
        &["-DMEDLEY_EXPECT_CUDA"][..],
        &["-DMEDLEY_NO_CUDA", "-Dmedley_cuda_probe=1"][..],
    ] {
        let out = run(Command::new(tool("CC", "cc"))
            .args([
                "-std=c99",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pedantic",
                "-fsyntax-only",
            ])
            .args(defs)
            .arg("-I")
            .arg(Path::new(MANIFEST).join("include"))
            .arg(&src));
        assert!(
            out.status.success(),
            "medley.h does not compile as C99 with {defs:?}"
        );
    }
}
