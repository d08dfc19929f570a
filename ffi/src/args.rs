//! Argument checking shared by every entry point: required structs,
//! (pointer, length) buffers, enum values, and overlaps between written
//! buffers and everything else. Every check runs before any output is
//! touched.
//!
//! The rules (documented in the header):
//! - a buffer is a pointer and a length in elements; the pointer may be
//!   null only when the length is 0 (a zero-length buffer's pointer is never
//!   read);
//! - host pointers must be aligned for their element type;
//! - `length x element size` must fit `isize` and the buffer must not wrap
//!   the address space;
//! - no written buffer may overlap another buffer of the call (Rust would
//!   otherwise hold a `&mut` and a `&` to the same memory).

use crate::status::Fail;
use medley_core::{DType, Error};

/// The element types of medley's buffers (`dtype` fields and arguments).
#[repr(u32)]
#[allow(non_camel_case_types)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum medley_dtype {
    /// IEEE binary32 (`float`).
    F32 = 0,
    /// IEEE binary16, as its 16 bits (`uint16_t`, `_Float16`, `__half`).
    F16 = 1,
    /// bfloat16, as its 16 bits (`uint16_t`, `__nv_bfloat16`): the top half
    /// of a binary32.
    Bf16 = 2,
}

/// Parses a `medley_dtype` value given as an integer.
pub(crate) fn dtype(arg: &'static str, v: u32) -> Result<DType, Fail> {
    match v {
        0 => Ok(DType::F32),
        1 => Ok(DType::F16),
        2 => Ok(DType::BF16),
        _ => Err(Fail::BadEnum { arg, value: v }),
    }
}

/// A struct pointer the call reads or writes: non-null and aligned for `T`.
fn struct_ptr<T>(p: *const T, arg: &'static str) -> Result<(), Fail> {
    if p.is_null() {
        return Err(Fail::Null { arg, index: 0 });
    }
    if !p.is_aligned() {
        return Err(Fail::Misaligned {
            arg,
            index: 0,
            align: align_of::<T>(),
        });
    }
    Ok(())
}

/// A required C struct passed by pointer: non-null and aligned.
///
/// # Safety
/// When non-null and aligned, `p` must point to a readable, initialized `T`
/// that nothing writes during `'a`.
pub(crate) unsafe fn get<'a, T>(p: *const T, arg: &'static str) -> Result<&'a T, Fail> {
    struct_ptr(p, arg)?;
    // SAFETY: non-null and aligned (checked); the caller guarantees the
    // pointee is a valid T for 'a.
    Ok(unsafe { &*p })
}

/// An optional out-pointer (nullable): `None` when null, an error when
/// misaligned.
pub(crate) fn out_ptr<T>(p: *mut T, arg: &'static str) -> Result<Option<*mut T>, Fail> {
    if p.is_null() {
        return Ok(None);
    }
    if !p.is_aligned() {
        return Err(Fail::Misaligned {
            arg,
            index: 0,
            align: align_of::<T>(),
        });
    }
    Ok(Some(p))
}

/// A required out-pointer: non-null and aligned.
pub(crate) fn req_out_ptr<T>(p: *mut T, arg: &'static str) -> Result<*mut T, Fail> {
    out_ptr(p, arg)?.ok_or(Fail::Null { arg, index: 0 })
}

/// The address range `[start, end)` of a buffer (host or device), for
/// overlap checks. Empty for zero-length buffers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Region {
    start: u64,
    end: u64,
    arg: &'static str,
}

impl Region {
    pub(crate) const EMPTY: Region = Region {
        start: 0,
        end: 0,
        arg: "",
    };

    /// Checks a buffer of `len` elements of `size` bytes at address `addr`
    /// (aligned to `align`): null only when empty, aligned, no overflow of
    /// the byte count or the end address (`limit`: `isize::MAX` for host
    /// memory, `u64::MAX` for device memory).
    fn new(
        addr: u64,
        len: usize,
        size: usize,
        align: usize,
        limit: u64,
        arg: &'static str,
        index: usize,
    ) -> Result<Region, Fail> {
        if len == 0 {
            return Ok(Region::EMPTY);
        }
        if addr == 0 {
            return Err(Fail::Null { arg, index });
        }
        if !addr.is_multiple_of(align as u64) {
            return Err(Fail::Misaligned { arg, index, align });
        }
        let bytes = (len as u64)
            .checked_mul(size as u64)
            .filter(|&b| b <= limit)
            .ok_or(Fail::Overflow { arg, index })?;
        let end = addr.checked_add(bytes).ok_or(Fail::Overflow { arg, index })?;
        Ok(Region {
            start: addr,
            end,
            arg,
        })
    }

    /// A host buffer of `len` elements of `T`.
    pub(crate) fn host<T>(
        ptr: *const T,
        len: usize,
        arg: &'static str,
        index: usize,
    ) -> Result<Region, Fail> {
        Region::new(
            ptr as usize as u64,
            len,
            size_of::<T>(),
            align_of::<T>(),
            isize::MAX as u64,
            arg,
            index,
        )
    }

    /// A device buffer of `len` elements of `size` bytes (aligned to
    /// `size`) at device address `addr`.
    #[cfg(any(feature = "cuda", test))]
    pub(crate) fn device(
        addr: u64,
        len: usize,
        size: usize,
        arg: &'static str,
        index: usize,
    ) -> Result<Region, Fail> {
        Region::new(addr, len, size, size, u64::MAX, arg, index)
    }

    fn overlaps(&self, o: &Region) -> bool {
        self.start < self.end && o.start < o.end && self.start < o.end && o.start < self.end
    }
}

/// Most regions one call checks (64 models, weights, base, four outputs,
/// scratch).
const MAX_REGIONS: usize = 72;

/// The buffers of one call: read ones and written ones.
#[derive(Debug)]
pub(crate) struct Regions {
    r: [(Region, bool); MAX_REGIONS],
    n: usize,
}

impl Regions {
    pub(crate) fn new() -> Self {
        Regions {
            r: [(Region::EMPTY, false); MAX_REGIONS],
            n: 0,
        }
    }

    /// Adds a buffer the call reads.
    pub(crate) fn read(&mut self, r: Region) {
        self.push(r, false);
    }

    /// Adds a buffer the call writes.
    pub(crate) fn written(&mut self, r: Region) {
        self.push(r, true);
    }

    fn push(&mut self, r: Region, w: bool) {
        if r.start < r.end {
            assert!(self.n < MAX_REGIONS, "more regions than MAX_REGIONS");
            self.r[self.n] = (r, w);
            self.n += 1;
        }
    }

    /// Fails if a written buffer overlaps any other buffer.
    pub(crate) fn check(&self) -> Result<(), Fail> {
        let r = &self.r[..self.n];
        for (i, (a, wa)) in r.iter().enumerate() {
            for (b, wb) in &r[i + 1..] {
                if (*wa || *wb) && a.overlaps(b) {
                    let (written, other) = if *wa { (a.arg, b.arg) } else { (b.arg, a.arg) };
                    return Err(Fail::Overlap { written, other });
                }
            }
        }
        Ok(())
    }
}

/// The read-only slice of a host buffer already checked by
/// [`Region::host`].
///
/// # Safety
/// `(ptr, len)` passed `Region::host`; the caller guarantees `len` elements
/// are readable at `ptr` and not written by anyone during `'a`.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> &'a [T] {
    if len == 0 {
        return &[];
    }
    // SAFETY: non-null, aligned, byte size within isize (Region::host), and
    // readable and unaliased by writes for 'a (the caller).
    unsafe { core::slice::from_raw_parts(ptr, len) }
}

/// The writable slice of a host buffer already checked by [`Region::host`]
/// and by [`Regions::check`].
///
/// # Safety
/// As [`slice`], and nothing else accesses the memory during `'a` (checked
/// against the call's other buffers by `Regions::check`).
pub(crate) unsafe fn slice_mut<'a, T>(ptr: *mut T, len: usize) -> &'a mut [T] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: as `slice`, plus exclusivity (the caller).
    unsafe { core::slice::from_raw_parts_mut(ptr, len) }
}

/// `stride`, or `len` when `stride` is 0 (the header's "0 means dense").
pub(crate) fn stride_or(stride: usize, len: usize) -> usize {
    if stride == 0 { len } else { stride }
}

/// `TooLarge` for a list longer than `max`.
pub(crate) fn at_most(arg: &'static str, got: usize, max: usize) -> Result<(), Fail> {
    if got > max {
        return Err(Error::TooLarge {
            arg,
            index: 0,
            max,
            got,
        }
        .into());
    }
    Ok(())
}

/// Most bytes a caller's struct may declare (`struct_size`): a bound on
/// how far past the library's own layout the zero-tail check reads.
pub(crate) const MAX_STRUCT_SIZE: usize = 4096;

/// A struct that can grow (an options or output struct of the ABI policy):
/// its first field is `struct_size` (a `size_t`), which the caller sets to
/// `sizeof` the struct in the header it was compiled with.
///
/// # Safety
/// Implementors are `#[repr(C)]`, start with a `usize` field `struct_size`,
/// and every field accepts any bit pattern (integers, floats, raw
/// pointers; enums are passed as `u32`), so that a byte copy of a prefix
/// over [`Versioned::DEFAULT`] is a valid value.
pub(crate) unsafe trait Versioned: Copy {
    /// The library's defaults, `struct_size` = `size_of::<Self>()`.
    const DEFAULT: Self;
    /// The sizes of every published layout, ascending; the last is
    /// `size_of::<Self>()`.
    const SIZES: &'static [usize];
}

/// Checks a caller's `struct_size` against the published layouts of `T`:
/// one of [`Versioned::SIZES`] (an older or the current header), or larger
/// than the current layout (a newer header) up to [`MAX_STRUCT_SIZE`] and a
/// multiple of the struct's alignment (as every C struct's size is).
fn check_size<T: Versioned>(size: usize, arg: &'static str) -> Result<(), Fail> {
    let cur = size_of::<T>();
    let newer = size > cur && size <= MAX_STRUCT_SIZE && size.is_multiple_of(align_of::<T>());
    if T::SIZES.contains(&size) || newer {
        return Ok(());
    }
    Err(Fail::StructSize {
        arg,
        got: size,
        min: T::SIZES[0],
        max: cur,
    })
}

/// Reads a versioned struct (see [`Versioned`] and the ABI policy in
/// ffi/README.md): `struct_size` names the layout the caller was compiled
/// with. An older layout is accepted and the fields it lacks take their
/// defaults; a newer, larger one is accepted when every byte the library
/// does not know is zero (the caller asked for nothing this library
/// lacks); any other size is `Fail::StructSize`. Returns a copy, so no
/// reference into caller memory outlives the call's checks.
///
/// # Safety
/// When non-null and aligned, `p` must be readable for `struct_size` bytes
/// (the value of its first `size_t`).
pub(crate) unsafe fn versioned<T: Versioned>(p: *const T, arg: &'static str) -> Result<T, Fail> {
    struct_ptr(p, arg)?;
    // SAFETY: non-null and aligned for T, whose first field is a usize at
    // offset 0 (Versioned's contract); every layout holds it.
    let size = unsafe { p.cast::<usize>().read() };
    check_size::<T>(size, arg)?;
    let cur = size_of::<T>();
    let base = p.cast::<u8>();
    if size > cur {
        // SAFETY: the caller guarantees `size` readable bytes at p.
        let tail = unsafe { core::slice::from_raw_parts(base.add(cur), size - cur) };
        if let Some(at) = tail.iter().position(|&b| b != 0) {
            return Err(Fail::StructTail {
                arg,
                offset: cur + at,
                size,
            });
        }
    }
    let mut out = T::DEFAULT;
    // SAFETY: min(size, cur) bytes are readable at p (the caller) and
    // writable in `out` (a T of `cur` bytes); the regions are distinct
    // (a local and caller memory); any bytes form a valid T (Versioned).
    unsafe {
        core::ptr::copy_nonoverlapping(base, (&raw mut out).cast::<u8>(), size.min(cur));
    }
    Ok(out)
}

/// Writes a versioned output struct (`medley_report`) into caller memory
/// whose `struct_size` the caller set: the bytes of `value` that the
/// caller's layout has (its first `min(struct_size, size_of::<T>())`
/// bytes), leaving `struct_size` and any newer tail as they are. Returns
/// the caller's size after checking it as [`versioned`] does.
///
/// # Safety
/// When non-null and aligned, `p` must be writable for `struct_size` bytes
/// and not accessed by anyone else during the call.
pub(crate) unsafe fn versioned_out_size<T: Versioned>(p: *mut T, arg: &'static str) -> Result<usize, Fail> {
    if !p.is_aligned() {
        return Err(Fail::Misaligned {
            arg,
            index: 0,
            align: align_of::<T>(),
        });
    }
    // SAFETY: non-null (the callers check) and aligned; see `versioned`.
    let size = unsafe { p.cast::<usize>().read() };
    check_size::<T>(size, arg)?;
    Ok(size)
}

/// Completes [`versioned_out_size`]: writes `value` after the
/// `struct_size` field, up to the caller's `size`.
///
/// # Safety
/// `p` and `size` passed `versioned_out_size`; writable (the caller).
pub(crate) unsafe fn write_versioned<T: Versioned>(p: *mut T, size: usize, value: &T) {
    let n = size.min(size_of::<T>());
    let skip = size_of::<usize>();
    if n > skip {
        // SAFETY: bytes [skip, n) lie in the caller's struct (n <= size)
        // and in `value`; distinct memory (a local and caller memory).
        unsafe {
            core::ptr::copy_nonoverlapping(
                (value as *const T).cast::<u8>().add(skip),
                p.cast::<u8>().add(skip),
                n - skip,
            );
        }
    }
}

/// The body of every `medley_*_init(p, struct_size)`: writes the library's
/// defaults into the caller's struct of `struct_size` bytes (one of the
/// published sizes, or larger, the tail beyond the library's layout then
/// zeroed) and sets `struct_size`.
///
/// # Safety
/// When non-null and aligned, `p` must be writable for `struct_size` bytes.
pub(crate) unsafe fn init_versioned<T: Versioned>(
    p: *mut T,
    size: usize,
    arg: &'static str,
) -> Result<(), Fail> {
    struct_ptr(p.cast_const(), arg)?;
    check_size::<T>(size, arg)?;
    let cur = size_of::<T>();
    let d = T::DEFAULT;
    let base = p.cast::<u8>();
    // SAFETY: `size` writable bytes at p (the caller); the first
    // min(size, cur) come from the defaults, the rest are zeroed; then the
    // size field (a usize at offset 0, aligned) is set.
    unsafe {
        core::ptr::copy_nonoverlapping((&raw const d).cast::<u8>(), base, size.min(cur));
        if size > cur {
            core::ptr::write_bytes(base.add(cur), 0, size - cur);
        }
        p.cast::<usize>().write(size);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_catch_null_overflow_and_overlap() {
        let buf = [0.0f32; 8];
        let p = buf.as_ptr();
        assert_eq!(Region::host(p, 8, "a", 0).map(|r| r.end - r.start), Ok(32));
        assert_eq!(
            Region::host(core::ptr::null::<f32>(), 1, "a", 2),
            Err(Fail::Null { arg: "a", index: 2 })
        );
        assert_eq!(
            Region::host(core::ptr::null::<f32>(), 0, "a", 0),
            Ok(Region::EMPTY)
        );
        assert_eq!(
            Region::host(p, usize::MAX / 2, "a", 0),
            Err(Fail::Overflow { arg: "a", index: 0 })
        );
        assert_eq!(
            Region::host(p.cast::<u8>().wrapping_add(1).cast::<f32>(), 1, "a", 0),
            Err(Fail::Misaligned {
                arg: "a",
                index: 0,
                align: 4
            })
        );
        assert_eq!(
            Region::device(u64::MAX - 2, 2, 4, "d", 0),
            Err(Fail::Misaligned {
                arg: "d",
                index: 0,
                align: 4
            })
        );
        assert_eq!(
            Region::device(u64::MAX - 7, 4, 4, "d", 0),
            Err(Fail::Overflow { arg: "d", index: 0 })
        );
        let mut rs = Regions::new();
        rs.read(Region::host(p, 4, "in", 0).unwrap());
        rs.read(Region::host(p, 8, "in2", 0).unwrap());
        assert_eq!(rs.check(), Ok(()));
        rs.written(Region::host(p.wrapping_add(4), 4, "out", 0).unwrap());
        assert_eq!(
            rs.check(),
            Err(Fail::Overlap {
                written: "out",
                other: "in2"
            })
        );
        let mut rs = Regions::new();
        rs.read(Region::host(p, 4, "in", 0).unwrap());
        rs.written(Region::host(p.wrapping_add(4), 4, "out", 0).unwrap());
        assert_eq!(rs.check(), Ok(()));
    }
}
