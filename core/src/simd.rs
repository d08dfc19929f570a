//! Runtime SIMD dispatch: the only module of the crate with `unsafe`.
//!
//! The numeric kernels are plain Rust loops written to auto-vectorize. A
//! default build targets the x86-64 baseline (SSE2), so without help those
//! loops use 4-wide vectors even on AVX-512 machines. Each public hot entry
//! point therefore runs its body through `dispatch`-style wrappers: the
//! body is an `#[inline(always)]` closure, and the same body is compiled
//! three times, into a plain function and into two functions carrying
//! `#[target_feature(enable = ...)]` (AVX2 + FMA, and AVX-512 F/BW/VL/DQ).
//! Every helper the bodies reach in their hot loops (row kernels, `exp`,
//! `ln`, element conversion) is `#[inline(always)]`, so it is compiled with
//! the features of the function it lands in. The level is chosen once per
//! call (per row block or chunk), never per element.
//!
//! Detection uses the `cpufeatures` crate (`no_std`; it also checks that the
//! OS saves the wide registers), cached after the first query. On other
//! architectures only [`Level::Portable`] exists.
//!
//! **Results are bit-identical at every level.** Rust never contracts
//! `a * b + c` into a fused multiply-add and never reassociates float
//! arithmetic, and no kernel uses FMA intrinsics; the features only widen
//! the vectors. The crate's tests run the hot functions at every level the
//! machine has and compare bits (see [`force`]).
//!
//! The invariant that makes the `unsafe` calls sound: a `#[target_feature]`
//! wrapper is only called after [`detected`] reported its level, i.e. after
//! the CPU (and OS) were found to support every feature it enables.
#![allow(unsafe_code)]

use core::sync::atomic::{AtomicU8, Ordering};

/// An instruction-set level the kernels can run at, lowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// The compile-time target's features only (SSE2 on a default x86-64
    /// build; whatever `-C target-cpu` enables otherwise).
    Portable,
    /// x86-64 with AVX2 and FMA (x86-64-v3).
    Avx2,
    /// x86-64 with AVX-512 F, BW, VL and DQ (x86-64-v4).
    Avx512,
}

impl Level {
    /// Every level, lowest first.
    pub const ALL: [Level; 3] = [Level::Portable, Level::Avx2, Level::Avx512];

    /// The level's name (`"portable"`, `"avx2"`, `"avx512"`).
    pub const fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
        }
    }

    const fn code(self) -> u8 {
        match self {
            Level::Portable => 0,
            Level::Avx2 => 1,
            Level::Avx512 => 2,
        }
    }

    const fn from_code(c: u8) -> Level {
        match c {
            2 => Level::Avx512,
            1 => Level::Avx2,
            _ => Level::Portable,
        }
    }
}

#[cfg(target_arch = "x86_64")]
cpufeatures::new!(cpuid_avx2, "avx2", "fma");
#[cfg(target_arch = "x86_64")]
cpufeatures::new!(
    cpuid_avx512,
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512dq",
    "avx2",
    "fma"
);

/// The highest level this CPU supports (detected once, then cached).
pub fn detected() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        if cpuid_avx512::get() {
            return Level::Avx512;
        }
        if cpuid_avx2::get() {
            return Level::Avx2;
        }
    }
    Level::Portable
}

/// No cap: the detected level is used.
const UNCAPPED: u8 = u8::MAX;
static CAP: AtomicU8 = AtomicU8::new(UNCAPPED);

/// Caps the level every kernel runs at, process-wide: `Some(level)` runs at
/// most `level` (never above [`detected`]), `None` restores detection.
///
/// For tests and benchmarks (comparing levels, or measuring the portable
/// path). Results do not depend on the level, only speed does.
pub fn force(level: Option<Level>) {
    CAP.store(level.map_or(UNCAPPED, Level::code), Ordering::Relaxed);
}

/// The level the kernels run at now: [`detected`], capped by [`force`].
pub fn active() -> Level {
    let d = detected();
    match CAP.load(Ordering::Relaxed) {
        UNCAPPED => d,
        c => d.min(Level::from_code(c)),
    }
}

/// Runs `f` at the [`active`] level. `f` should be an `#[inline(always)]`
/// closure whose hot loops only reach `#[inline(always)]` helpers, so that
/// it is compiled into each wrapper with that wrapper's features.
#[inline(always)]
pub(crate) fn dispatch<R>(f: impl FnOnce() -> R) -> R {
    match active() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `active()` never exceeds `detected()`, which returned
        // Avx512 only after cpufeatures confirmed avx512f/bw/vl/dq, avx2 and
        // fma on this CPU and OS: every feature `run_avx512` enables.
        Level::Avx512 => unsafe { run_avx512(f) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above; Avx2 is returned only after avx2 and fma were
        // confirmed, the features `run_avx2` enables.
        Level::Avx2 => unsafe { run_avx2(f) },
        _ => f(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Runs `f` once at every level this machine supports, restoring detection
/// afterwards. Tests share one process-wide cap, so they serialize here.
#[cfg(test)]
pub(crate) fn at_every_level(mut f: impl FnMut(Level)) {
    extern crate std;
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    for l in Level::ALL.into_iter().filter(|&l| l <= detected()) {
        force(Some(l));
        assert_eq!(active(), l);
        f(l);
    }
    force(None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn force_caps_and_restores() {
        at_every_level(|l| assert_eq!(active(), l));
        assert_eq!(active(), detected());
        assert_eq!(dispatch(|| 41 + 1), 42);
    }
}
