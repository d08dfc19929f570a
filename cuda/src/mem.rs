//! Borrowed views of the caller's device memory and stream.
//!
//! medley-cuda never owns device memory or streams on the production path:
//! the caller's pointers and stream are wrapped in these lifetime-carrying
//! views (cust's `DeviceSlice` has no lifetime and its `DeviceBuffer` frees
//! on drop, so neither fits caller memory).

use crate::driver::{CuFunction, CuStream, DriverError};
use crate::error::CudaError;
use core::ffi::c_void;
use core::marker::PhantomData;
use medley_core::Error;

/// A caller's CUDA stream, borrowed for `'a`.
#[derive(Debug, Clone, Copy)]
pub struct Stream<'a> {
    raw: CuStream,
    _m: PhantomData<&'a ()>,
}

// SAFETY: a CUstream handle is a plain token the driver accepts from any
// thread ("the CUDA API is fully thread-safe except for graph objects").
unsafe impl Send for Stream<'_> {}
// SAFETY: as above; the view never mutates the handle.
unsafe impl Sync for Stream<'_> {}

impl Stream<'_> {
    /// Wraps a raw `CUstream` / `cudaStream_t` (0 = legacy default stream,
    /// 2 = per-thread default stream).
    ///
    /// # Safety
    /// `raw` must be a valid stream of the context the kernels were loaded
    /// in, and stay valid for the view's lifetime.
    pub unsafe fn from_raw(raw: CuStream) -> Self {
        Stream { raw, _m: PhantomData }
    }

    /// The raw handle.
    pub fn raw(&self) -> CuStream {
        self.raw
    }

    /// Launches `f` on this stream (called only by `Kernels::launch`, which
    /// checks the stream's context first). Returns the raw driver code on
    /// failure.
    ///
    /// # Safety
    /// `args` must match `f`'s parameter list exactly (one pointer per
    /// parameter, each to a value of the parameter's type) and every device
    /// pointer among them must be valid for what the kernel accesses.
    pub(crate) unsafe fn launch(
        &self,
        f: &Func,
        grid: u32,
        block: u32,
        smem: u32,
        args: &[*mut c_void],
    ) -> Result<(), DriverError> {
        let mut a: [*mut c_void; 16] = [core::ptr::null_mut(); 16];
        a[..args.len()].copy_from_slice(args);
        // SAFETY: the caller guarantees the argument contract; `a` outlives
        // the call (the driver copies parameters at launch).
        unsafe {
            crate::driver::launch(
                f.raw,
                grid,
                block,
                smem,
                self.raw,
                &mut a[..args.len()],
                f.cooperative,
            )
        }
    }
}

/// A loaded kernel entry point, as the registry keeps it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Func {
    pub(crate) raw: CuFunction,
    pub(crate) cooperative: bool,
}

/// Read-only view of `len` elements of type `T` at a device address.
#[derive(Debug, Clone, Copy)]
pub struct DeviceSlice<'a, T> {
    ptr: u64,
    len: usize,
    _m: PhantomData<&'a [T]>,
}

impl<T> DeviceSlice<'_, T> {
    /// Wraps caller memory.
    ///
    /// # Safety
    /// `[ptr, ptr + len * size_of::<T>())` must be device memory of the
    /// kernels' context, readable and not written by anyone for `'a` while
    /// kernels using this view may run.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        DeviceSlice {
            ptr,
            len,
            _m: PhantomData,
        }
    }

    /// The device address.
    pub fn as_raw(&self) -> u64 {
        self.ptr
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Writable view of `len` elements of type `T` at a device address.
#[derive(Debug)]
pub struct DeviceSliceMut<'a, T> {
    ptr: u64,
    len: usize,
    _m: PhantomData<&'a mut [T]>,
}

impl<T> DeviceSliceMut<'_, T> {
    /// Wraps caller memory.
    ///
    /// # Safety
    /// `[ptr, ptr + len * size_of::<T>())` must be device memory of the
    /// kernels' context, used by nothing else for `'a` while kernels using
    /// this view may run.
    pub unsafe fn from_raw(ptr: u64, len: usize) -> Self {
        DeviceSliceMut {
            ptr,
            len,
            _m: PhantomData,
        }
    }

    /// The device address.
    pub fn as_raw(&self) -> u64 {
        self.ptr
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True if the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// A matrix in device memory in any of the element types the kernels read:
/// the logits of an ensemble member, router logits, token rows or expert
/// outputs ([`crate::ensemble::DeviceLogits`] and
/// [`crate::gating::RouterLogits`] are this type).
#[derive(Debug, Clone, Copy)]
pub enum DeviceMatrix<'a> {
    /// `f32` rows.
    F32(DeviceRows<'a, f32>),
    /// `f16` rows.
    F16(DeviceRows<'a, half::f16>),
    /// `bf16` rows.
    BF16(DeviceRows<'a, half::bf16>),
}

impl DeviceMatrix<'_> {
    /// (device address, rows, row length, row stride, kernel dtype code
    /// 0 f32 / 1 f16 / 2 bf16, element bytes).
    pub(crate) fn parts(&self) -> (u64, usize, usize, usize, u32, usize) {
        match self {
            DeviceMatrix::F32(r) => (r.as_raw(), r.rows(), r.len(), r.stride(), 0, 4),
            DeviceMatrix::F16(r) => (r.as_raw(), r.rows(), r.len(), r.stride(), 1, 2),
            DeviceMatrix::BF16(r) => (r.as_raw(), r.rows(), r.len(), r.stride(), 2, 2),
        }
    }
}

/// `rows x len` elements with a row stride, over a device slice (the device
/// twin of [`medley_core::Rows`]).
#[derive(Debug, Clone, Copy)]
pub struct DeviceRows<'a, T> {
    data: DeviceSlice<'a, T>,
    rows: usize,
    len: usize,
    stride: usize,
}

impl<'a, T> DeviceRows<'a, T> {
    /// A strided view; errors as [`medley_core::Rows::new`].
    pub fn new(data: DeviceSlice<'a, T>, rows: usize, len: usize, stride: usize) -> Result<Self, CudaError> {
        check_span(data.len(), rows, len, stride)?;
        Ok(DeviceRows {
            data,
            rows,
            len,
            stride,
        })
    }

    /// A dense view (stride = len).
    pub fn dense(data: DeviceSlice<'a, T>, rows: usize, len: usize) -> Result<Self, CudaError> {
        Self::new(data, rows, len, len)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Elements per row.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True if the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.rows == 0 || self.len == 0
    }
    /// Row stride in elements.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// Base device address.
    pub fn as_raw(&self) -> u64 {
        self.data.as_raw()
    }
}

/// Writable `rows x len` view with a row stride over device memory.
#[derive(Debug)]
pub struct DeviceRowsMut<'a, T> {
    data: DeviceSliceMut<'a, T>,
    rows: usize,
    len: usize,
    stride: usize,
}

impl<'a, T> DeviceRowsMut<'a, T> {
    /// A strided writable view; errors as [`medley_core::RowsMut::new`].
    pub fn new(
        data: DeviceSliceMut<'a, T>,
        rows: usize,
        len: usize,
        stride: usize,
    ) -> Result<Self, CudaError> {
        check_span(data.len(), rows, len, stride)?;
        Ok(DeviceRowsMut {
            data,
            rows,
            len,
            stride,
        })
    }

    /// A dense writable view.
    pub fn dense(data: DeviceSliceMut<'a, T>, rows: usize, len: usize) -> Result<Self, CudaError> {
        Self::new(data, rows, len, len)
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Elements per row.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True if the view holds no element.
    pub fn is_empty(&self) -> bool {
        self.rows == 0 || self.len == 0
    }
    /// Row stride in elements.
    pub fn stride(&self) -> usize {
        self.stride
    }
    /// Base device address.
    pub fn as_raw(&self) -> u64 {
        self.data.as_raw()
    }
    /// A writable view of the same rows for a shorter borrow (to pass to
    /// a call that takes the view by value and use this one afterwards).
    pub fn reborrow(&mut self) -> DeviceRowsMut<'_, T> {
        DeviceRowsMut {
            data: DeviceSliceMut {
                ptr: self.data.ptr,
                len: self.data.len,
                _m: PhantomData,
            },
            rows: self.rows,
            len: self.len,
            stride: self.stride,
        }
    }
    /// A read-only view of the same rows (for a kernel that reads what an
    /// earlier one wrote), borrowing this one.
    pub fn as_rows(&self) -> DeviceRows<'_, T> {
        DeviceRows {
            data: DeviceSlice {
                ptr: self.data.ptr,
                len: self.data.len,
                _m: PhantomData,
            },
            rows: self.rows,
            len: self.len,
            stride: self.stride,
        }
    }
}

fn check_span(have: usize, rows: usize, len: usize, stride: usize) -> Result<(), CudaError> {
    if stride < len {
        return Err(Error::StrideTooSmall {
            arg: "stride",
            stride,
            len,
        }
        .into());
    }
    let needed =
        medley_core::rows::span(rows, len, stride).ok_or(Error::SizeOverflow { arg: "rows * stride" })?;
    if have < needed {
        return Err(Error::BufferTooShort {
            arg: "data",
            needed,
            got: have,
        }
        .into());
    }
    Ok(())
}

/// A device pointer a kernel will access for `len` elements: not null when
/// `len > 0`, and `align`-byte aligned (shared by every launcher).
pub(crate) fn check_ptr(ptr: u64, len: usize, align: usize, arg: &'static str) -> Result<(), CudaError> {
    if len > 0 && ptr == 0 {
        return Err(CudaError::Null { arg });
    }
    if !ptr.is_multiple_of(align as u64) {
        return Err(CudaError::Misaligned { arg, align });
    }
    Ok(())
}

/// `Error::LengthMismatch` unless `expected == got`.
pub(crate) fn need_len(arg: &'static str, expected: usize, got: usize) -> Result<(), CudaError> {
    if expected != got {
        return Err(Error::LengthMismatch {
            arg,
            index: 0,
            expected,
            got,
        }
        .into());
    }
    Ok(())
}
