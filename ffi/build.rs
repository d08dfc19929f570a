//! Gives the shared library (`libmedley_ffi.so`, the cdylib) an ELF SONAME
//! that follows the ABI major version, `libmedley_ffi.so.<major>`, so a
//! program linked against it loads a library of the same major ABI only
//! (see "ABI policy" in README.md). `cargo:rustc-cdylib-link-arg` reaches
//! the cdylib's link line alone: the staticlib, the rlib and every other
//! crate build exactly as without this script.

use std::env;
use std::fs;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/lib.rs");
    // The major version is defined once, in src/lib.rs: read it there.
    let src = fs::read_to_string("src/lib.rs").expect("read src/lib.rs");
    let major: u32 = src
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("pub const MEDLEY_ABI_VERSION_MAJOR: u32 = ")
        })
        .and_then(|v| v.trim_end_matches(';').trim().parse().ok())
        .expect("src/lib.rs: `pub const MEDLEY_ABI_VERSION_MAJOR: u32 = N;` not found");
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    // GNU-style ELF linkers only (Linux, the BSDs); elsewhere no SONAME.
    if matches!(
        os.as_str(),
        "linux" | "android" | "freebsd" | "netbsd" | "openbsd" | "dragonfly"
    ) {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmedley_ffi.so.{major}");
    }
}
