//! Status codes, the per-thread record of the last failure, and the query
//! functions over it (`medley_status_name`, `medley_last_cuda_error`,
//! `medley_last_error_message`).

use core::ffi::{c_char, c_int};
use core::fmt;
use std::cell::Cell;

use medley_core::Error;
#[cfg(feature = "cuda")]
use medley_cuda::CudaError;

/// What a medley call returns. `MEDLEY_STATUS_OK` is 0; every failure has
/// its own number, in blocks that never collide with errno values, 0/1
/// booleans or CUDA codes, and a number is never reused for another
/// meaning (retired codes stay listed as reserved).
///
/// - 7000 block: the call's arguments (and internal panics). Nothing was
///   computed, written or launched.
/// - 7100 block: the CUDA driver or device. The raw `CUresult` of a
///   `MEDLEY_STATUS_DRIVER` failure is `medley_last_cuda_error()`.
///
/// The enum is the same in every build: a CPU-only library (built without
/// the `cuda` feature) keeps the 7100 block, never returning it, so that
/// no number shifts between builds.
///
/// `medley_status_name` names any code; `medley_last_error_message`
/// describes the last failure on the calling thread in words (which
/// argument, which sizes).
///
/// In C the type is `int32_t`; functions taking a status (such as
/// `medley_status_name`) take an `int32_t`, so any value may be passed.
#[repr(i32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum medley_status {
    /// Success.
    Ok = 0,
    /// A required pointer is null (a buffer pointer with a nonzero length,
    /// a required struct, an out-parameter, or the engine handle).
    NullArgument = 7001,
    /// Sizes do not fit together: a buffer shorter than its shape, a row
    /// stride below the row length, a list of the wrong length, an empty
    /// list that must not be, more items than supported.
    BadShape = 7002,
    /// A parameter is outside its domain: a temperature <= 0, a NaN or
    /// infinite weight, a negative linear weight, weights summing to 0, an
    /// index out of range, an unknown enum value.
    BadParameter = 7003,
    /// The combination of options is not supported (for example a
    /// combination with neither log-probabilities nor probabilities
    /// requested).
    Unsupported = 7004,
    /// A size product (rows x stride, elements x element size, an address
    /// plus a byte count) overflows.
    Overflow = 7005,
    /// medley panicked (a bug; please report it). The panic was caught at
    /// the boundary: no unwinding crossed into the caller. Outputs may be
    /// partly written.
    Panic = 7006,
    /// A pointer is not aligned for its element type (host pointers), or
    /// as a kernel requires (device pointers).
    Misaligned = 7007,
    /// An output buffer overlaps another output or an input.
    Overlap = 7008,
    /// A versioned struct's `struct_size` is not a layout this library
    /// knows (below the first published size, between two published sizes,
    /// above 4096 or larger but not a multiple of 8), or a struct from a newer header sets a field this
    /// library does not have (nonzero bytes past its layout). See the ABI
    /// policy in ffi/README.md.
    StructSize = 7009,
    /// A CUDA driver call failed; `medley_last_cuda_error()` gives its raw
    /// `CUresult` (34: the stub driver, 100: no device, 700: illegal
    /// address, ...).
    Driver = 7100,
    /// The device cannot run medley's kernels (compute capability below
    /// 8.0, no cooperative launch where the requested kernel needs it, no
    /// current context to load into).
    DeviceUnsupported = 7101,
    /// The engine's kernels belong to another CUDA context than the one
    /// the call needs.
    WrongContext = 7102,
}

/// Every status, for the name table and tests.
pub(crate) const ALL_STATUSES: [medley_status; 13] = [
    medley_status::Ok,
    medley_status::NullArgument,
    medley_status::BadShape,
    medley_status::BadParameter,
    medley_status::Unsupported,
    medley_status::Overflow,
    medley_status::Panic,
    medley_status::Misaligned,
    medley_status::Overlap,
    medley_status::StructSize,
    medley_status::Driver,
    medley_status::DeviceUnsupported,
    medley_status::WrongContext,
];

impl medley_status {
    /// The C identifier of the status, NUL-terminated.
    pub const fn name(self) -> &'static core::ffi::CStr {
        match self {
            medley_status::Ok => c"MEDLEY_STATUS_OK",
            medley_status::NullArgument => c"MEDLEY_STATUS_NULL_ARGUMENT",
            medley_status::BadShape => c"MEDLEY_STATUS_BAD_SHAPE",
            medley_status::BadParameter => c"MEDLEY_STATUS_BAD_PARAMETER",
            medley_status::Unsupported => c"MEDLEY_STATUS_UNSUPPORTED",
            medley_status::Overflow => c"MEDLEY_STATUS_OVERFLOW",
            medley_status::Panic => c"MEDLEY_STATUS_PANIC",
            medley_status::Misaligned => c"MEDLEY_STATUS_MISALIGNED",
            medley_status::Overlap => c"MEDLEY_STATUS_OVERLAP",
            medley_status::StructSize => c"MEDLEY_STATUS_STRUCT_SIZE",
            medley_status::Driver => c"MEDLEY_STATUS_DRIVER",
            medley_status::DeviceUnsupported => c"MEDLEY_STATUS_DEVICE_UNSUPPORTED",
            medley_status::WrongContext => c"MEDLEY_STATUS_WRONG_CONTEXT",
        }
    }

    /// The status with this numeric value, if there is one (never
    /// transmutes: an unknown value from C is not a `medley_status`).
    pub fn from_raw(v: i32) -> Option<Self> {
        ALL_STATUSES.iter().copied().find(|s| *s as i32 == v)
    }
}

/// Why a call failed, as recorded for `medley_last_error_message`. Small
/// and `Copy`: recording a failure never allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// A required pointer is null.
    Null {
        /// The argument (`models[].logits.data`, ...).
        arg: &'static str,
        /// Its position when it is an element of a list (0 otherwise).
        index: usize,
    },
    /// A host pointer is not aligned for its element type.
    Misaligned {
        /// The argument.
        arg: &'static str,
        /// Its position in a list (0 otherwise).
        index: usize,
        /// The alignment required, in bytes.
        align: usize,
    },
    /// `count x element size` (or the end address) of a buffer overflows.
    Overflow {
        /// The argument.
        arg: &'static str,
        /// Its position in a list (0 otherwise).
        index: usize,
    },
    /// Two buffers overlap where one of them is written.
    Overlap {
        /// The written buffer.
        written: &'static str,
        /// The buffer it overlaps.
        other: &'static str,
    },
    /// A versioned struct's `struct_size` is not a known layout.
    StructSize {
        /// The struct argument.
        arg: &'static str,
        /// The `struct_size` given.
        got: usize,
        /// The first published size.
        min: usize,
        /// This library's size.
        max: usize,
    },
    /// A struct from a newer header sets a field this library lacks.
    StructTail {
        /// The struct argument.
        arg: &'static str,
        /// The first nonzero byte past this library's layout.
        offset: usize,
        /// The `struct_size` given.
        size: usize,
    },
    /// An enum argument holds a value with no meaning.
    BadEnum {
        /// The argument.
        arg: &'static str,
        /// The value given.
        value: u32,
    },
    /// The core rejected the call (shape, parameter, ...).
    Core(Error),
    /// The core rejected one view of the call: `err` is about the view
    /// named `arg` (the core's own names, such as `data` or `stride`, are
    /// relative to it).
    At {
        /// The view (`models[].logits`, `out.log_probs`, ...).
        arg: &'static str,
        /// Its position in a list (0 otherwise).
        index: usize,
        /// What the core reported.
        err: Error,
    },
    /// The CUDA layer rejected the call or the driver failed.
    #[cfg(feature = "cuda")]
    Cuda(CudaError),
    /// Loading the kernels failed (engine creation): the error and the PTX
    /// module being loaded; the JIT's log is kept apart
    /// (`medley_cuda_last_jit_log`).
    #[cfg(feature = "cuda")]
    Load {
        /// What failed.
        error: CudaError,
        /// The module (`"gating.ptx"`), when a module load failed.
        module: Option<&'static str>,
    },
    /// A panic was caught at the boundary.
    Panic,
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Core(e)
    }
}

#[cfg(feature = "cuda")]
impl From<CudaError> for Fail {
    fn from(e: CudaError) -> Self {
        match e {
            CudaError::Invalid(c) => Fail::Core(c),
            other => Fail::Cuda(other),
        }
    }
}

fn core_status(e: &Error) -> medley_status {
    match e {
        Error::BufferTooShort { .. }
        | Error::LengthMismatch { .. }
        | Error::TooLarge { .. }
        | Error::StrideTooSmall { .. }
        | Error::Empty { .. } => medley_status::BadShape,
        Error::SizeOverflow { .. } => medley_status::Overflow,
        Error::Unsupported { .. } => medley_status::Unsupported,
        // NonFinite, OutOfRange, ZeroSum, IndexOutOfBounds and any variant
        // added later: a parameter outside its domain.
        _ => medley_status::BadParameter,
    }
}

impl Fail {
    /// The status this failure is reported as.
    pub fn status(&self) -> medley_status {
        match self {
            Fail::Null { .. } => medley_status::NullArgument,
            Fail::Misaligned { .. } => medley_status::Misaligned,
            Fail::Overflow { .. } => medley_status::Overflow,
            Fail::Overlap { .. } => medley_status::Overlap,
            Fail::BadEnum { .. } => medley_status::BadParameter,
            Fail::StructSize { .. } | Fail::StructTail { .. } => medley_status::StructSize,
            Fail::Core(e) | Fail::At { err: e, .. } => core_status(e),
            #[cfg(feature = "cuda")]
            Fail::Load { error, .. } => Fail::Cuda(*error).status(),
            #[cfg(feature = "cuda")]
            Fail::Cuda(c) => match c {
                CudaError::Driver(_) => medley_status::Driver,
                CudaError::Invalid(e) => core_status(e),
                CudaError::Misaligned { .. } => medley_status::Misaligned,
                CudaError::Null { .. } => medley_status::NullArgument,
                CudaError::WrongContext => medley_status::WrongContext,
                CudaError::Unsupported { .. } => medley_status::DeviceUnsupported,
                _ => medley_status::Unsupported,
            },
            Fail::Panic => medley_status::Panic,
        }
    }

    /// The raw `CUresult` when the failure is a driver error, else 0.
    pub fn cuda_code(&self) -> i32 {
        // Always 0 in a build without the `cuda` feature (no driver calls).
        #[cfg(feature = "cuda")]
        if let Fail::Cuda(CudaError::Driver(d))
        | Fail::Load {
            error: CudaError::Driver(d),
            ..
        } = self
        {
            return d.code;
        }
        0
    }
}

/// Writes `` `arg` `` with a list argument's `[]` filled in with its index
/// (`models[].logits.data` #2 is `models[2].logits.data`).
fn arg(f: &mut fmt::Formatter<'_>, arg: &str, index: usize) -> fmt::Result {
    match arg.split_once("[]") {
        Some((a, b)) => write!(f, "`{a}[{index}]{b}`"),
        None => write!(f, "`{arg}`"),
    }
}

impl fmt::Display for Fail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Fail::Null { arg: a, index } => {
                arg(f, a, index)?;
                write!(f, " is null")
            }
            Fail::Misaligned { arg: a, index, align } => {
                arg(f, a, index)?;
                write!(f, " is not {align}-byte aligned")
            }
            Fail::Overflow { arg: a, index } => {
                write!(f, "the byte size or end address of ")?;
                arg(f, a, index)?;
                write!(f, " overflows")
            }
            Fail::Overlap { written, other } => {
                write!(f, "output `{written}` overlaps `{other}`")
            }
            Fail::BadEnum { arg, value } => write!(f, "`{arg}` = {value} is not a valid value"),
            Fail::StructSize { arg, got, min, max } => write!(
                f,
                "`{arg}.struct_size` = {got} is not a layout this library knows (published sizes from {min} to \
                 {max} bytes, or larger with a zero tail); set it to sizeof the struct, or call its _init function"
            ),
            Fail::StructTail { arg, offset, size } => write!(
                f,
                "`{arg}` (struct_size {size}) sets byte {offset}, a field this library (medley {}) does not have: \
                 link a newer medley or leave the new fields zero",
                env!("CARGO_PKG_VERSION")
            ),
            Fail::Core(e) => write!(f, "{e}"),
            Fail::At { arg: a, index, err } => {
                arg(f, a, index)?;
                write!(f, ": {err}")
            }
            // DriverError's Display is our own (raw code, entry point and
            // cuGetErrorName's answer, or "unknown code"): it cannot fail
            // the way cust's CudaError Display does under the stub driver.
            #[cfg(feature = "cuda")]
            Fail::Cuda(e) => write!(f, "{e}"),
            #[cfg(feature = "cuda")]
            Fail::Load { error, module } => {
                write!(f, "loading medley's kernels failed: {error}")?;
                if let Some(m) = module {
                    write!(f, " (module {m}; medley_cuda_last_jit_log() has the JIT's log)")?;
                }
                Ok(())
            }
            Fail::Panic => write!(
                f,
                "internal panic caught at the C boundary (a medley bug; the message went to stderr)"
            ),
        }
    }
}

thread_local! {
    static LAST: Cell<Option<Fail>> = const { Cell::new(None) };
}

/// Records `fail` as the calling thread's last failure and returns its
/// status. Never allocates, never panics (a thread being torn down simply
/// records nothing).
pub(crate) fn record(fail: Fail) -> medley_status {
    let _ = LAST.try_with(|c| c.set(Some(fail)));
    fail.status()
}

/// The calling thread's last failure.
pub(crate) fn last() -> Option<Fail> {
    LAST.try_with(|c| c.get()).ok().flatten()
}

/// Writes a `Display` value into a caller buffer, truncating on a UTF-8
/// boundary, NUL-terminated; returns the untruncated length.
struct Truncating<'a> {
    buf: &'a mut [u8],
    used: usize,
    total: usize,
}

impl fmt::Write for Truncating<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.total += s.len();
        // Keep one byte for the NUL.
        let room = self.buf.len().saturating_sub(1).saturating_sub(self.used);
        let mut n = s.len().min(room);
        while n > 0 && !s.is_char_boundary(n) {
            n -= 1;
        }
        self.buf[self.used..self.used + n].copy_from_slice(&s.as_bytes()[..n]);
        self.used += n;
        Ok(())
    }
}

/// The name of a status code as a static, NUL-terminated string: its C
/// identifier (`"MEDLEY_STATUS_BAD_SHAPE"`), or `"MEDLEY_STATUS_UNKNOWN"`
/// for a value that is not a medley status. Never null; the string must not
/// be freed.
#[unsafe(no_mangle)]
pub extern "C" fn medley_status_name(status: i32) -> *const c_char {
    ffi_boundary!(default = c"MEDLEY_STATUS_UNKNOWN".as_ptr(), {
        match medley_status::from_raw(status) {
            Some(s) => s.name().as_ptr(),
            None => c"MEDLEY_STATUS_UNKNOWN".as_ptr(),
        }
    })
}

/// The raw CUDA driver code (`CUresult`) behind the calling thread's last
/// failure: when the last medley call on this thread that failed returned
/// `MEDLEY_STATUS_DRIVER`, the code the driver returned (34 = the stub
/// driver, 100 = no device, 700 = illegal address, ...); 0 when that
/// failure was not a driver error, or when no medley call has failed on
/// this thread. Always 0 in a CPU-only build (see `medley_has_cuda`).
///
/// Thread-local, like `errno`: every failing medley call overwrites it,
/// successful calls leave it alone, so read it right after the call that
/// returned `MEDLEY_STATUS_DRIVER`. The query functions
/// (`medley_status_name`, `medley_last_cuda_error`,
/// `medley_last_error_message`, `medley_version`) never change it.
#[unsafe(no_mangle)]
pub extern "C" fn medley_last_cuda_error() -> c_int {
    ffi_boundary!(default = 0, { last().map_or(0, |f| f.cuda_code()) })
}

/// Describes the calling thread's last failure in words (which argument,
/// which sizes, which driver call), like `"`weights` (#0) has size 3,
/// expected 2"`; `"no error"` when no medley call has failed on this
/// thread.
///
/// Writes at most `len` bytes into `buf`, always NUL-terminated when
/// `len > 0` (truncated on a UTF-8 character boundary if the message is
/// longer). `out_len` (nullable) receives the full message length in bytes
/// without the NUL, so a caller can size its buffer. `buf` may be null only
/// when `len` is 0.
///
/// Returns `MEDLEY_STATUS_NULL_ARGUMENT` if `buf` is null and `len > 0`,
/// `MEDLEY_STATUS_MISALIGNED` if `out_len` is misaligned, else
/// `MEDLEY_STATUS_OK`. It does not record a failure of its own, so the
/// description survives a bad call to it.
///
/// # Safety
/// `buf` must be writable for `len` bytes; `out_len`, when not null, must
/// point to a writable `size_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_last_error_message(
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> medley_status {
    ffi_boundary!(default = medley_status::Panic, {
        // SAFETY: the caller's guarantees are write_text's.
        unsafe {
            write_fmt(buf, len, out_len, |w| match last() {
                Some(f) => fmt::Write::write_fmt(w, format_args!("{f}")),
                None => fmt::Write::write_str(w, "no error"),
            })
        }
    })
}

/// Writes `text` as `medley_last_error_message` writes its message.
///
/// # Safety
/// As `medley_last_error_message`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) unsafe fn write_text(
    text: &str,
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
) -> medley_status {
    // SAFETY: the caller's guarantees are write_fmt's.
    unsafe { write_fmt(buf, len, out_len, |w| fmt::Write::write_str(w, text)) }
}

/// The body of the text queries: checks `buf` and `out_len`, writes what
/// `f` formats, truncated and NUL-terminated, and the full length.
///
/// # Safety
/// `buf` must be writable for `len` bytes; `out_len`, when not null, must
/// point to a writable `size_t`.
unsafe fn write_fmt(
    buf: *mut c_char,
    len: usize,
    out_len: *mut usize,
    f: impl FnOnce(&mut Truncating<'_>) -> fmt::Result,
) -> medley_status {
    if buf.is_null() && len > 0 {
        return medley_status::NullArgument;
    }
    if !out_len.is_null() && !out_len.is_aligned() {
        return medley_status::Misaligned;
    }
    let mut empty = [0u8; 0];
    let dst: &mut [u8] = if len == 0 {
        &mut empty
    } else {
        // SAFETY: buf is non-null (checked) and the caller guarantees it
        // is writable for len bytes; c_char and u8 have the same layout;
        // no other reference to that memory exists during the call.
        unsafe { core::slice::from_raw_parts_mut(buf.cast::<u8>(), len) }
    };
    let mut w = Truncating {
        buf: dst,
        used: 0,
        total: 0,
    };
    let _ = f(&mut w);
    if !w.buf.is_empty() {
        w.buf[w.used] = 0;
    }
    if !out_len.is_null() {
        // SAFETY: out_len is non-null and aligned (checked); the caller
        // guarantees it points to a writable size_t.
        unsafe { out_len.write(w.total) };
    }
    medley_status::Ok
}

/// Whether this library was built with the CUDA entry points (the `cuda`
/// feature, on by default): `true` when the `medley_cuda_*` functions are
/// present (they still report `MEDLEY_STATUS_DRIVER` on a machine without a
/// usable driver or device, see `medley_cuda_probe`), `false` for a
/// CPU-only build (`--no-default-features`), which links without libcuda
/// and whose header users compile with `-DMEDLEY_NO_CUDA`. Use it to check
/// at run time that the library matches the header configuration; it is
/// present in both builds.
#[unsafe(no_mangle)]
pub extern "C" fn medley_has_cuda() -> bool {
    cfg!(feature = "cuda")
}

/// The ABI version of the linked library, `MEDLEY_ABI_VERSION_MAJOR << 16 |
/// MEDLEY_ABI_VERSION_MINOR` of the header it was built with. A program
/// compiled against a header of the same major version and a minor version
/// at most the library's gets every function and struct field it was
/// compiled with (ffi/README.md, "ABI policy"); compare with
/// `MEDLEY_ABI_VERSION` at start-up to refuse a mismatched library early.
#[unsafe(no_mangle)]
pub extern "C" fn medley_abi_version() -> u32 {
    crate::MEDLEY_ABI_VERSION
}

/// medley's version, as a static NUL-terminated string (`"0.1.0"`).
#[unsafe(no_mangle)]
pub extern "C" fn medley_version() -> *const c_char {
    ffi_boundary!(default = c"unknown".as_ptr(), {
        const V: &core::ffi::CStr =
            match core::ffi::CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
                Ok(s) => s,
                Err(_) => panic!("NUL in the package version"),
            };
        V.as_ptr()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_distinct_and_named() {
        for (i, a) in ALL_STATUSES.iter().enumerate() {
            assert_eq!(medley_status::from_raw(*a as i32), Some(*a));
            let name = a.name().to_str().unwrap();
            assert!(name.starts_with("MEDLEY_STATUS_"));
            for b in &ALL_STATUSES[i + 1..] {
                assert_ne!(*a as i32, *b as i32);
                assert_ne!(a.name(), b.name());
            }
        }
        assert_eq!(medley_status::from_raw(1), None);
        assert_eq!(medley_status::from_raw(-7001), None);
    }

    #[test]
    fn every_fail_maps_to_its_block() {
        let fails = [
            Fail::Null { arg: "x", index: 0 },
            Fail::Overflow { arg: "x", index: 1 },
            Fail::Core(Error::Empty { arg: "models" }),
            Fail::Core(Error::ZeroSum {
                arg: "weights",
                index: 0,
            }),
            #[cfg(feature = "cuda")]
            Fail::Cuda(CudaError::Driver(medley_cuda::driver::DriverError {
                code: 700,
                call: "cuLaunchKernel",
            })),
            Fail::Panic,
        ];
        for f in fails {
            let s = f.status() as i32;
            assert!((7000..7200).contains(&s), "{f:?} -> {s}");
            assert_eq!(f.cuda_code() != 0, s == medley_status::Driver as i32);
        }
    }
}
