//! Owned device resources for tests, benchmarks and examples.
//!
//! The production path never uses this module: library calls borrow the
//! caller's context, stream and memory. Tests and benchmarks have no caller,
//! so they own a context ([`Gpu`]) and buffers ([`Buffer`]) here, built on
//! cust's owning types. This keeps every use of cust inside medley-cuda.

use crate::driver::{self, DriverError};
use crate::mem::{DeviceSlice, DeviceSliceMut, Stream};
use crate::registry::Kernels;
use cust::memory::{CopyDestination, DeviceBuffer};

/// A device with its own context, two streams and the loaded kernels.
#[derive(Debug)]
pub struct Gpu {
    kernels: Kernels,
    load_ms: f64,
    stream: cust::stream::Stream,
    graph_stream: cust::stream::Stream,
    _ctx: cust::context::Context,
}

/// Why [`Gpu::open`] gave no GPU.
#[derive(Debug)]
pub enum OpenError {
    /// There is no GPU to test on: `cuInit` returned 34
    /// (`CUDA_ERROR_STUB_LIBRARY`, the stub driver of a CPU-only build) or
    /// 100 (`CUDA_ERROR_NO_DEVICE`). The only reason a test may skip.
    NoGpu(DriverError),
    /// A driver and a device are there but something failed (context or
    /// stream creation, a kernel load or JIT error): a test failure.
    Failed(String),
}

impl core::fmt::Display for OpenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            OpenError::NoGpu(e) => write!(f, "no usable CUDA driver or device ({e})"),
            OpenError::Failed(why) => f.write_str(why),
        }
    }
}

/// Whether `MEDLEY_REQUIRE_GPU=1` is set: every GPU skip becomes a failure
/// (the GPU machine's scripts set it).
pub fn gpu_required() -> bool {
    std::env::var_os("MEDLEY_REQUIRE_GPU").is_some_and(|v| v == "1")
}

impl Gpu {
    /// Opens device 0: primary context, a stream, every kernel loaded.
    pub fn open() -> Result<Gpu, OpenError> {
        if let Err(e) = driver::init() {
            return Err(
                if e.code == driver::ERROR_STUB_LIBRARY || e.code == driver::ERROR_NO_DEVICE {
                    OpenError::NoGpu(e)
                } else {
                    OpenError::Failed(format!("cuInit failed: {e}"))
                },
            );
        }
        let ctx = cust::quick_init()
            .map_err(|e| OpenError::Failed(format!("creating a CUDA context failed ({e:?})")))?;
        let t0 = std::time::Instant::now();
        let kernels = Kernels::load().map_err(|e| OpenError::Failed(e.to_string()))?;
        let load_ms = t0.elapsed().as_secs_f64() * 1e3;
        let stream = cust::stream::Stream::new(cust::stream::StreamFlags::DEFAULT, None)
            .map_err(|e| OpenError::Failed(format!("stream creation failed ({e:?})")))?;
        let graph_stream = cust::stream::Stream::new(cust::stream::StreamFlags::NON_BLOCKING, None)
            .map_err(|e| OpenError::Failed(format!("stream creation failed ({e:?})")))?;
        Ok(Gpu {
            kernels,
            load_ms,
            stream,
            graph_stream,
            _ctx: ctx,
        })
    }

    /// For tests: the GPU, or `None` (after printing why) when there is no
    /// driver or no device and [`gpu_required`] is false. Panics on every
    /// other failure (a kernel that does not load, a JIT error, any other
    /// driver error) and on a skip when `MEDLEY_REQUIRE_GPU=1`.
    pub fn open_or_skip(what: &str) -> Option<Gpu> {
        match Gpu::open() {
            Ok(g) => Some(g),
            Err(OpenError::NoGpu(e)) if !gpu_required() => {
                eprintln!("{what}: GPU half skipped: no usable CUDA driver or device ({e})");
                None
            }
            Err(OpenError::NoGpu(e)) => {
                panic!("{what}: MEDLEY_REQUIRE_GPU=1 but there is no usable CUDA driver or device ({e})")
            }
            Err(OpenError::Failed(why)) => panic!("{what}: {why}"),
        }
    }

    /// Milliseconds [`Kernels::load`] took in [`Gpu::open`].
    pub fn load_ms(&self) -> f64 {
        self.load_ms
    }

    /// The loaded kernels.
    pub fn kernels(&self) -> &Kernels {
        &self.kernels
    }

    /// The stream, as the borrowed view library calls take.
    pub fn stream(&self) -> Stream<'_> {
        // SAFETY: the stream is owned by self and outlives the view.
        unsafe { Stream::from_raw(self.stream.as_inner().cast()) }
    }

    /// A second stream, non-blocking, for capturing CUDA graphs
    /// ([`crate::graph::Graph`]) and replaying them. Capturing the blocking
    /// [`Gpu::stream`] would be invalidated by any legacy-default-stream
    /// operation in the context while the capture runs (a synchronous copy
    /// on another test thread: `CUDA_ERROR_STREAM_CAPTURE_IMPLICIT`, 906).
    /// Not ordered with the legacy stream: synchronize before and after.
    pub fn graph_stream(&self) -> Stream<'_> {
        // SAFETY: the stream is owned by self and outlives the view.
        unsafe { Stream::from_raw(self.graph_stream.as_inner().cast()) }
    }

    /// Waits for everything queued on both streams.
    pub fn synchronize(&self) -> Result<(), DriverError> {
        // SAFETY: the streams are live; their context was made current by
        // open.
        unsafe {
            driver::stream_synchronize(self.stream.as_inner().cast())?;
            driver::stream_synchronize(self.graph_stream.as_inner().cast())
        }
    }
}

/// Device memory of `len` bytes, viewed as any plain element type.
#[derive(Debug)]
pub struct Buffer {
    buf: DeviceBuffer<u8>,
}

impl Buffer {
    /// A buffer holding a copy of `data`.
    pub fn from_slice<T: bytemuck::Pod>(data: &[T]) -> Result<Buffer, String> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let buf = if bytes.is_empty() {
            DeviceBuffer::from_slice(&[0u8; 16])
        } else {
            DeviceBuffer::from_slice(bytes)
        }
        .map_err(|e| format!("device allocation failed ({e:?})"))?;
        Ok(Buffer { buf })
    }

    /// `n` zero bytes.
    pub fn zeroed(n: usize) -> Result<Buffer, String> {
        Self::from_slice(&vec![0u8; n.max(16)])
    }

    /// `n` elements all equal to `value`.
    pub fn filled<T: bytemuck::Pod>(n: usize, value: T) -> Result<Buffer, String> {
        Self::from_slice(&vec![value; n.max(1)])
    }

    /// Bytes held.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// True if the buffer holds no byte.
    pub fn is_empty(&self) -> bool {
        self.buf.len() == 0
    }

    /// The device address.
    pub fn as_raw(&self) -> u64 {
        self.buf.as_device_ptr().as_raw()
    }

    /// A read-only view of the buffer as `n` elements of `T`.
    pub fn view<T>(&self, n: usize) -> DeviceSlice<'_, T> {
        assert!(
            n * core::mem::size_of::<T>() <= self.len(),
            "view beyond the buffer"
        );
        // SAFETY: the view borrows self, so the memory stays allocated while
        // it lives, and it spans no more than the allocation (asserted).
        unsafe { DeviceSlice::from_raw(self.as_raw(), n) }
    }

    /// A writable view of the buffer as `n` elements of `T`.
    pub fn view_mut<T>(&self, n: usize) -> DeviceSliceMut<'_, T> {
        assert!(
            n * core::mem::size_of::<T>() <= self.len(),
            "view beyond the buffer"
        );
        // SAFETY: as `view`; tests use each output view for one launch at a
        // time and synchronize before reading the buffer back.
        unsafe { DeviceSliceMut::from_raw(self.as_raw(), n) }
    }

    /// Overwrites the buffer's first bytes with `data` and waits until they
    /// are in device memory (a context-wide synchronize, so work on any
    /// stream enqueued afterwards sees them, non-blocking streams
    /// included). The device address stays, so a captured graph reads the
    /// new values.
    pub fn upload<T: bytemuck::Pod>(&mut self, data: &[T]) -> Result<(), String> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        if bytes.len() > self.len() {
            return Err(format!(
                "upload of {} bytes into a buffer of {}",
                bytes.len(),
                self.len()
            ));
        }
        let mut head = self.buf.index(..bytes.len());
        head.copy_from(bytes)
            .map_err(|e| format!("copy to device failed ({e:?})"))?;
        driver::context_synchronize().map_err(|e| e.to_string())
    }

    /// Copies the first `n` elements of type `T` back to the host
    /// (synchronous; synchronize the stream that wrote them first).
    pub fn to_vec<T: bytemuck::Pod>(&self, n: usize) -> Result<Vec<T>, String> {
        let mut bytes = vec![0u8; self.len()];
        self.buf
            .copy_to(&mut bytes[..])
            .map_err(|e| format!("copy to host failed ({e:?})"))?;
        let size = core::mem::size_of::<T>();
        Ok(bytes[..n * size]
            .chunks_exact(size)
            .map(bytemuck::pod_read_unaligned)
            .collect())
    }
}
