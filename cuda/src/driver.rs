//! The one place that calls the CUDA driver (cudarc's `result` layer, made
//! small): our own `extern "C"` declarations returning the raw `c_int`
//! status, and thin wrappers returning `Result<_, DriverError>`.
//!
//! Why not cust_raw's declarations: they were generated from CUDA 11.4 with
//! Rust enums as return types, so a newer driver returning a code the enum
//! lacks (for example 912-916) would be undefined behaviour; and cust maps
//! unknown codes to `UnknownError`, losing them. Here the code stays an
//! `i32` end to end. (NOTE: cust 0.3.2 has no `Stream::from_raw` either,
//! Rust-GPU/rust-cuda `src/stream.rs`; launches go through [`crate::Stream`].)

use core::ffi::{c_char, c_int, c_uint, c_void};
use core::fmt;

/// `CUcontext`.
pub type CuContext = *mut c_void;
/// `CUmodule`.
pub type CuModule = *mut c_void;
/// `CUfunction`.
pub type CuFunction = *mut c_void;
/// `CUstream` (0 is the legacy default stream, 2 the per-thread one).
pub type CuStream = *mut c_void;
/// `CUevent`.
pub type CuEvent = *mut c_void;
/// `CUdeviceptr`.
pub type CuDevicePtr = u64;
/// `CUgraph`.
pub type CuGraph = *mut c_void;
/// `CUgraphExec`.
pub type CuGraphExec = *mut c_void;

/// `CUDA_SUCCESS`.
pub const SUCCESS: i32 = 0;
/// `CUDA_ERROR_NO_DEVICE`.
pub const ERROR_NO_DEVICE: i32 = 100;
/// `CUDA_ERROR_STUB_LIBRARY`: the stub `libcuda` answered.
pub const ERROR_STUB_LIBRARY: i32 = 34;

/// `CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`.
pub const ATTR_SM_COUNT: c_int = 16;
/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR`.
pub const ATTR_CC_MAJOR: c_int = 75;
/// `CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR`.
pub const ATTR_CC_MINOR: c_int = 76;
/// `CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`.
pub const ATTR_SMEM_OPTIN: c_int = 97;
/// `CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES` (static shared memory).
pub const FUNC_ATTR_SHARED_SIZE: c_int = 1;
/// `CU_DEVICE_ATTRIBUTE_COOPERATIVE_LAUNCH`.
pub const ATTR_COOPERATIVE_LAUNCH: c_int = 95;
/// `CU_FUNC_ATTRIBUTE_NUM_REGS`.
pub const FUNC_ATTR_NUM_REGS: c_int = 4;
/// `CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES`.
pub const FUNC_ATTR_MAX_DYNAMIC_SMEM: c_int = 8;

#[link(name = "cuda")]
unsafe extern "C" {
    fn cuInit(flags: c_uint) -> c_int;
    fn cuDriverGetVersion(version: *mut c_int) -> c_int;
    fn cuGetErrorName(error: c_int, name: *mut *const c_char) -> c_int;
    fn cuCtxGetCurrent(ctx: *mut CuContext) -> c_int;
    fn cuCtxGetDevice(dev: *mut c_int) -> c_int;
    fn cuDeviceGetAttribute(value: *mut c_int, attr: c_int, dev: c_int) -> c_int;
    fn cuDeviceGetName(name: *mut c_char, len: c_int, dev: c_int) -> c_int;
    fn cuStreamGetCtx(stream: CuStream, ctx: *mut CuContext) -> c_int;
    #[link_name = "cuCtxPushCurrent_v2"]
    fn cuCtxPushCurrent(ctx: CuContext) -> c_int;
    #[link_name = "cuCtxPopCurrent_v2"]
    fn cuCtxPopCurrent(ctx: *mut CuContext) -> c_int;
    fn cuModuleLoadDataEx(
        module: *mut CuModule,
        image: *const c_void,
        n: c_uint,
        options: *mut c_int,
        values: *mut *mut c_void,
    ) -> c_int;
    fn cuModuleUnload(module: CuModule) -> c_int;
    fn cuModuleGetFunction(f: *mut CuFunction, module: CuModule, name: *const c_char) -> c_int;
    fn cuFuncGetAttribute(value: *mut c_int, attr: c_int, f: CuFunction) -> c_int;
    fn cuFuncSetAttribute(f: CuFunction, attr: c_int, value: c_int) -> c_int;
    fn cuOccupancyMaxActiveBlocksPerMultiprocessor(
        blocks: *mut c_int,
        f: CuFunction,
        block_size: c_int,
        dynamic_smem: usize,
    ) -> c_int;
    fn cuLaunchKernel(
        f: CuFunction,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        smem: c_uint,
        stream: CuStream,
        params: *mut *mut c_void,
        extra: *mut *mut c_void,
    ) -> c_int;
    fn cuLaunchCooperativeKernel(
        f: CuFunction,
        gx: c_uint,
        gy: c_uint,
        gz: c_uint,
        bx: c_uint,
        by: c_uint,
        bz: c_uint,
        smem: c_uint,
        stream: CuStream,
        params: *mut *mut c_void,
    ) -> c_int;
    fn cuEventCreate(event: *mut CuEvent, flags: c_uint) -> c_int;
    fn cuEventRecord(event: CuEvent, stream: CuStream) -> c_int;
    fn cuEventSynchronize(event: CuEvent) -> c_int;
    fn cuEventElapsedTime(ms: *mut f32, start: CuEvent, end: CuEvent) -> c_int;
    #[link_name = "cuEventDestroy_v2"]
    fn cuEventDestroy(event: CuEvent) -> c_int;
    fn cuStreamSynchronize(stream: CuStream) -> c_int;
    fn cuCtxSynchronize() -> c_int;
    #[link_name = "cuMemsetD8Async"]
    fn cuMemsetD8Async(ptr: CuDevicePtr, value: u8, n: usize, stream: CuStream) -> c_int;
    #[link_name = "cuMemcpyHtoDAsync_v2"]
    fn cuMemcpyHtoDAsync(dst: CuDevicePtr, src: *const c_void, n: usize, stream: CuStream) -> c_int;
    fn cuTensorMapEncodeTiled(
        map: *mut TensorMap,
        dtype: c_int,
        rank: c_uint,
        addr: *mut c_void,
        dims: *const u64,
        strides: *const u64,
        boxdim: *const u32,
        estrides: *const u32,
        interleave: c_int,
        swizzle: c_int,
        l2: c_int,
        oob: c_int,
    ) -> c_int;
    #[link_name = "cuMemcpyDtoHAsync_v2"]
    fn cuMemcpyDtoHAsync(dst: *mut c_void, src: CuDevicePtr, n: usize, stream: CuStream) -> c_int;
    #[link_name = "cuStreamBeginCapture_v2"]
    fn cuStreamBeginCapture(stream: CuStream, mode: c_int) -> c_int;
    fn cuStreamEndCapture(stream: CuStream, graph: *mut CuGraph) -> c_int;
    fn cuGraphInstantiateWithFlags(exec: *mut CuGraphExec, graph: CuGraph, flags: u64) -> c_int;
    fn cuGraphLaunch(exec: CuGraphExec, stream: CuStream) -> c_int;
    fn cuGraphExecDestroy(exec: CuGraphExec) -> c_int;
    fn cuGraphDestroy(graph: CuGraph) -> c_int;
}

/// A failed driver call: the raw `CUresult` and the entry point that
/// returned it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct DriverError {
    /// The raw `CUresult` (for example 34 = stub library, 222 = PTX version
    /// unsupported by the driver, 700 = illegal address).
    pub code: i32,
    /// The driver entry point, e.g. `"cuLaunchKernel"`.
    pub call: &'static str,
}

impl DriverError {
    /// The driver's name for the code (`"CUDA_ERROR_ILLEGAL_ADDRESS"`), or
    /// `None` when the driver does not know it (or is the stub).
    pub fn name(&self) -> Option<&'static str> {
        error_name(self.code)
    }
}

impl fmt::Debug for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} returned {} ({})",
            self.call,
            self.code,
            self.name().unwrap_or("unknown code")
        )
    }
}

impl fmt::Display for DriverError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

impl std::error::Error for DriverError {}

#[inline]
fn check(code: c_int, call: &'static str) -> Result<(), DriverError> {
    if code == SUCCESS {
        Ok(())
    } else {
        Err(DriverError { code, call })
    }
}

/// The driver's name for `code`, if it knows one.
pub fn error_name(code: i32) -> Option<&'static str> {
    let mut p: *const c_char = core::ptr::null();
    // SAFETY: cuGetErrorName writes a pointer to a static NUL-terminated
    // string (or leaves it null and fails); we read it only on success.
    let rc = unsafe { cuGetErrorName(code, &mut p) };
    if rc != SUCCESS || p.is_null() {
        return None;
    }
    // SAFETY: on success p points to a static C string owned by the driver.
    unsafe { core::ffi::CStr::from_ptr(p) }.to_str().ok()
}

/// `cuInit(0)`: idempotent.
pub fn init() -> Result<(), DriverError> {
    // SAFETY: no pointers; the driver tolerates repeated calls.
    check(unsafe { cuInit(0) }, "cuInit")
}

/// The driver's CUDA version (e.g. 13000).
pub fn driver_version() -> Result<i32, DriverError> {
    let mut v = 0;
    // SAFETY: v is a valid out-pointer for the call's duration.
    check(unsafe { cuDriverGetVersion(&mut v) }, "cuDriverGetVersion")?;
    Ok(v)
}

/// The calling thread's current context (null when none).
pub fn current_context() -> Result<CuContext, DriverError> {
    let mut c = core::ptr::null_mut();
    // SAFETY: c is a valid out-pointer.
    check(unsafe { cuCtxGetCurrent(&mut c) }, "cuCtxGetCurrent")?;
    Ok(c)
}

/// The device of the current context.
pub fn current_device() -> Result<i32, DriverError> {
    let mut d = 0;
    // SAFETY: d is a valid out-pointer.
    check(unsafe { cuCtxGetDevice(&mut d) }, "cuCtxGetDevice")?;
    Ok(d)
}

/// A device attribute.
pub fn device_attribute(dev: i32, attr: c_int) -> Result<i32, DriverError> {
    let mut v = 0;
    // SAFETY: v is a valid out-pointer; attr and dev are plain integers.
    let rc = unsafe { cuDeviceGetAttribute(&mut v, attr, dev) };
    check(rc, "cuDeviceGetAttribute")?;
    Ok(v)
}

/// The device's name as the driver reports it (`cuDeviceGetName`, the name
/// `nvidia-smi` prints, e.g. `NVIDIA H200`).
pub fn device_name(dev: i32) -> Result<String, DriverError> {
    let mut buf = [0 as c_char; 256];
    // SAFETY: buf is 256 writable bytes and len says so; the driver writes
    // a NUL-terminated name that fits (truncating it if needed).
    let rc = unsafe { cuDeviceGetName(buf.as_mut_ptr(), buf.len() as c_int, dev) };
    check(rc, "cuDeviceGetName")?;
    // Bytes up to the first NUL (the last byte stays 0 whatever the driver
    // wrote before it, so there is one).
    buf[buf.len() - 1] = 0;
    let bytes: Vec<u8> = buf.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// The context a stream belongs to.
///
/// # Safety
/// `stream` must be a valid stream handle (or 0 / 2 for the legacy and
/// per-thread default streams, which need a current context).
pub unsafe fn stream_context(stream: CuStream) -> Result<CuContext, DriverError> {
    let mut c = core::ptr::null_mut();
    // SAFETY: the caller guarantees `stream` is valid; c is an out-pointer.
    check(unsafe { cuStreamGetCtx(stream, &mut c) }, "cuStreamGetCtx")?;
    Ok(c)
}

/// Makes `ctx` current for the guard's lifetime (`cuCtxPushCurrent` /
/// `cuCtxPopCurrent`), leaving the thread as it was afterwards.
///
/// The context stack is per thread, so the guard is `!Send` and `!Sync`:
/// it must be dropped on the thread that pushed.
///
/// ```compile_fail
/// fn sendable<T: Send>() {}
/// sendable::<medley_cuda::driver::CtxGuard>();
/// ```
#[derive(Debug)]
pub struct CtxGuard(core::marker::PhantomData<*const ()>);

impl CtxGuard {
    /// Pushes `ctx`.
    ///
    /// # Safety
    /// `ctx` must be a live context.
    pub unsafe fn push(ctx: CuContext) -> Result<Self, DriverError> {
        // SAFETY: the caller guarantees ctx is live.
        check(unsafe { cuCtxPushCurrent(ctx) }, "cuCtxPushCurrent")?;
        Ok(CtxGuard(core::marker::PhantomData))
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        let mut c = core::ptr::null_mut();
        // SAFETY: a push succeeded when this guard was made; popping restores
        // the thread's previous context stack.
        let _ = unsafe { cuCtxPopCurrent(&mut c) };
    }
}

/// Bytes of each JIT log buffer (error and info) a module load passes.
pub const JIT_LOG_BYTES: usize = 4096;

/// The JIT's messages from one module load: what the PTX assembler wrote
/// to its error and info logs (NUL-terminated text in fixed buffers, so a
/// failed load can be reported without allocating).
#[derive(Clone)]
pub struct JitLog {
    error: [u8; JIT_LOG_BYTES],
    info: [u8; JIT_LOG_BYTES],
}

impl Default for JitLog {
    fn default() -> Self {
        JitLog {
            error: [0; JIT_LOG_BYTES],
            info: [0; JIT_LOG_BYTES],
        }
    }
}

impl JitLog {
    fn text(buf: &[u8]) -> &str {
        let n = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        let t = &buf[..n];
        match core::str::from_utf8(t) {
            Ok(s) => s.trim_end(),
            // A log cut inside a multi-byte character: keep the valid part.
            Err(e) => core::str::from_utf8(&t[..e.valid_up_to()])
                .unwrap_or("")
                .trim_end(),
        }
    }

    /// The JIT's error log (empty when it wrote none).
    pub fn error(&self) -> &str {
        Self::text(&self.error)
    }

    /// The JIT's info log (register counts and the like; empty when none).
    pub fn info(&self) -> &str {
        Self::text(&self.info)
    }
}

impl fmt::Debug for JitLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JitLog")
            .field("error", &self.error())
            .field("info", &self.info())
            .finish()
    }
}

/// Loads a module from NUL-terminated PTX into the current context,
/// passing the JIT's error and info log buffers: on failure the error
/// carries the raw code and `log` what the assembler said (for example
/// `ptxas application ptx input, line 12; error : ...`).
pub fn module_load_ptx(ptx: &core::ffi::CStr, log: &mut JitLog) -> Result<CuModule, DriverError> {
    const INFO_LOG_BUFFER: c_int = 3;
    const INFO_LOG_BUFFER_SIZE_BYTES: c_int = 4;
    const ERROR_LOG_BUFFER: c_int = 5;
    const ERROR_LOG_BUFFER_SIZE_BYTES: c_int = 6;
    let mut m = core::ptr::null_mut();
    let mut options = [
        ERROR_LOG_BUFFER,
        ERROR_LOG_BUFFER_SIZE_BYTES,
        INFO_LOG_BUFFER,
        INFO_LOG_BUFFER_SIZE_BYTES,
    ];
    // The size options take their value in the pointer itself (the
    // driver's documented convention for scalar JIT options).
    let mut values: [*mut c_void; 4] = [
        log.error.as_mut_ptr().cast(),
        JIT_LOG_BYTES as *mut c_void,
        log.info.as_mut_ptr().cast(),
        JIT_LOG_BYTES as *mut c_void,
    ];
    // SAFETY: ptx is NUL-terminated and outlives the call; the four options
    // and values pair up (equal lengths passed as `n`); each log buffer is
    // JIT_LOG_BYTES long, as its size option says, and outlives the call
    // (the driver writes NUL-terminated text into it before returning).
    let rc = unsafe {
        cuModuleLoadDataEx(
            &mut m,
            ptx.as_ptr().cast(),
            options.len() as c_uint,
            options.as_mut_ptr(),
            values.as_mut_ptr(),
        )
    };
    check(rc, "cuModuleLoadDataEx")?;
    Ok(m)
}

/// Unloads a module (its context must be current).
///
/// # Safety
/// `m` must be a module loaded in the current context and not used after.
pub unsafe fn module_unload(m: CuModule) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller.
    check(unsafe { cuModuleUnload(m) }, "cuModuleUnload")
}

/// Looks up an entry point (registry construction only, never per launch).
///
/// # Safety
/// `m` must be a live module of the current context.
pub unsafe fn module_function(m: CuModule, name: &core::ffi::CStr) -> Result<CuFunction, DriverError> {
    let mut f = core::ptr::null_mut();
    // SAFETY: m is live (caller); name is NUL-terminated.
    let rc = unsafe { cuModuleGetFunction(&mut f, m, name.as_ptr()) };
    check(rc, "cuModuleGetFunction")?;
    Ok(f)
}

/// A function attribute.
///
/// # Safety
/// `f` must be a live function handle.
pub unsafe fn function_attribute(f: CuFunction, attr: c_int) -> Result<i32, DriverError> {
    let mut v = 0;
    // SAFETY: f is live (caller); v is an out-pointer.
    let rc = unsafe { cuFuncGetAttribute(&mut v, attr, f) };
    check(rc, "cuFuncGetAttribute")?;
    Ok(v)
}

/// Sets a function attribute (e.g. the dynamic shared memory limit).
///
/// # Safety
/// `f` must be a live function handle.
pub unsafe fn set_function_attribute(f: CuFunction, attr: c_int, value: i32) -> Result<(), DriverError> {
    // SAFETY: f is live (caller).
    let rc = unsafe { cuFuncSetAttribute(f, attr, value) };
    check(rc, "cuFuncSetAttribute")
}

/// Resident blocks per multiprocessor for `f` at this block size.
///
/// # Safety
/// `f` must be a live function handle.
pub unsafe fn occupancy(f: CuFunction, block: u32, smem: usize) -> Result<u32, DriverError> {
    let mut n = 0;
    // SAFETY: f is live (caller); n is an out-pointer.
    let rc = unsafe { cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut n, f, block as c_int, smem) };
    check(rc, "cuOccupancyMaxActiveBlocksPerMultiprocessor")?;
    Ok(n as u32)
}

/// Launches `f` (grid and block in x only), ordinary or cooperative.
///
/// # Safety
/// `params` must point to one pointer per kernel parameter, each pointing
/// to a value of exactly the parameter's type and size, valid for the call;
/// every device pointer among them must be valid for what the kernel
/// accesses; `f` and `stream` must belong to the current context.
pub unsafe fn launch(
    f: CuFunction,
    grid: u32,
    block: u32,
    smem: u32,
    stream: CuStream,
    params: &mut [*mut c_void],
    cooperative: bool,
) -> Result<(), DriverError> {
    let p = params.as_mut_ptr();
    if cooperative {
        // SAFETY: the caller upholds the parameter and handle contract.
        let rc = unsafe { cuLaunchCooperativeKernel(f, grid, 1, 1, block, 1, 1, smem, stream, p) };
        check(rc, "cuLaunchCooperativeKernel")
    } else {
        // SAFETY: as above.
        let rc =
            unsafe { cuLaunchKernel(f, grid, 1, 1, block, 1, 1, smem, stream, p, core::ptr::null_mut()) };
        check(rc, "cuLaunchKernel")
    }
}

/// Waits for all work on `stream` (tests and benchmarks only: the library
/// itself never synchronizes).
///
/// # Safety
/// `stream` must be valid in the current context.
pub unsafe fn stream_synchronize(stream: CuStream) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller.
    check(unsafe { cuStreamSynchronize(stream) }, "cuStreamSynchronize")
}

/// Waits for all work of the current context, every stream and pending
/// copies (tests and benchmarks only).
pub fn context_synchronize() -> Result<(), DriverError> {
    // SAFETY: no arguments; fails cleanly without a current context.
    check(unsafe { cuCtxSynchronize() }, "cuCtxSynchronize")
}

/// `cuMemsetD8Async`.
///
/// # Safety
/// `[ptr, ptr + n)` must be device memory of the current context.
pub unsafe fn memset_d8_async(
    ptr: CuDevicePtr,
    value: u8,
    n: usize,
    stream: CuStream,
) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller.
    let rc = unsafe { cuMemsetD8Async(ptr, value, n, stream) };
    check(rc, "cuMemsetD8Async")
}

/// `cuMemcpyHtoDAsync`.
///
/// # Safety
/// `dst` must hold `src.len()` bytes of device memory; `src` must stay alive
/// and unchanged until the copy completes on `stream`.
pub unsafe fn copy_htod_async(dst: CuDevicePtr, src: &[u8], stream: CuStream) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller.
    let rc = unsafe { cuMemcpyHtoDAsync(dst, src.as_ptr().cast(), src.len(), stream) };
    check(rc, "cuMemcpyHtoDAsync")
}

/// `cuMemcpyDtoHAsync`.
///
/// # Safety
/// `src` must hold `dst.len()` bytes of device memory; `dst` must stay
/// alive and unread until the copy completes on `stream`.
pub unsafe fn copy_dtoh_async(dst: &mut [u8], src: CuDevicePtr, stream: CuStream) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller.
    let rc = unsafe { cuMemcpyDtoHAsync(dst.as_mut_ptr().cast(), src, dst.len(), stream) };
    check(rc, "cuMemcpyDtoHAsync")
}

/// A CUDA event for timing (benchmarks and tests).
#[derive(Debug)]
pub struct Event(CuEvent);

impl Event {
    /// A new timing event in the current context.
    pub fn new() -> Result<Self, DriverError> {
        let mut e = core::ptr::null_mut();
        // SAFETY: e is an out-pointer; flags 0 = default (timing enabled).
        check(unsafe { cuEventCreate(&mut e, 0) }, "cuEventCreate")?;
        Ok(Event(e))
    }

    /// Records the event on `stream`.
    ///
    /// # Safety
    /// `stream` must be valid in the event's context.
    pub unsafe fn record(&self, stream: CuStream) -> Result<(), DriverError> {
        // SAFETY: the event is live (owned); the stream is the caller's.
        check(unsafe { cuEventRecord(self.0, stream) }, "cuEventRecord")
    }

    /// Waits for the event.
    pub fn synchronize(&self) -> Result<(), DriverError> {
        // SAFETY: the event is live (owned).
        check(unsafe { cuEventSynchronize(self.0) }, "cuEventSynchronize")
    }

    /// Milliseconds from `start` to `self` (both recorded and complete).
    pub fn elapsed_ms(&self, start: &Event) -> Result<f32, DriverError> {
        let mut ms = 0.0f32;
        // SAFETY: both events are live (owned); ms is an out-pointer.
        let rc = unsafe { cuEventElapsedTime(&mut ms, start.0, self.0) };
        check(rc, "cuEventElapsedTime")?;
        Ok(ms)
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: the event is owned and destroyed once.
        let _ = unsafe { cuEventDestroy(self.0) };
    }
}

/// `CUstreamCaptureMode`: what other threads may do while a stream is
/// being captured (the driver's rules for "potentially unsafe" calls such
/// as `cuMemAlloc` or a synchronous copy).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(i32)]
pub enum CaptureMode {
    /// `CU_STREAM_CAPTURE_MODE_GLOBAL`: an unsafe call on any thread that
    /// has not opted out fails while the capture runs (the strictest).
    Global = 0,
    /// `CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`: only this thread's unsafe
    /// calls fail (the usual choice of inference engines).
    #[default]
    ThreadLocal = 1,
    /// `CU_STREAM_CAPTURE_MODE_RELAXED`: nothing is refused.
    Relaxed = 2,
}

/// `cuStreamBeginCapture`: from now on work enqueued on `stream` is
/// recorded into a graph instead of running.
///
/// # Safety
/// `stream` must be a valid stream of the current context other than the
/// legacy default stream (0).
pub unsafe fn stream_begin_capture(stream: CuStream, mode: CaptureMode) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller; mode is a valid enumerator.
    check(
        unsafe { cuStreamBeginCapture(stream, mode as c_int) },
        "cuStreamBeginCapture",
    )
}

/// `cuStreamEndCapture`: the graph recorded since
/// [`stream_begin_capture`] (owned by the caller: [`graph_destroy`]).
///
/// # Safety
/// `stream` must be valid and capturing.
pub unsafe fn stream_end_capture(stream: CuStream) -> Result<CuGraph, DriverError> {
    let mut g = core::ptr::null_mut();
    // SAFETY: guaranteed by the caller; g is an out-pointer.
    let rc = unsafe { cuStreamEndCapture(stream, &mut g) };
    check(rc, "cuStreamEndCapture")?;
    Ok(g)
}

/// `cuGraphInstantiateWithFlags(graph, 0)`: an executable graph (owned by
/// the caller: [`graph_exec_destroy`]).
///
/// # Safety
/// `graph` must be live; its context must be current.
pub unsafe fn graph_instantiate(graph: CuGraph) -> Result<CuGraphExec, DriverError> {
    let mut e = core::ptr::null_mut();
    // SAFETY: guaranteed by the caller; e is an out-pointer.
    let rc = unsafe { cuGraphInstantiateWithFlags(&mut e, graph, 0) };
    check(rc, "cuGraphInstantiateWithFlags")?;
    Ok(e)
}

/// `cuGraphLaunch`: enqueues one replay of `exec` on `stream`.
///
/// # Safety
/// `exec` must be live; `stream` valid in its context; every device
/// pointer the graph's nodes captured must still be valid.
pub unsafe fn graph_launch(exec: CuGraphExec, stream: CuStream) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller.
    check(unsafe { cuGraphLaunch(exec, stream) }, "cuGraphLaunch")
}

/// `cuGraphExecDestroy`.
///
/// # Safety
/// `exec` must be live and is dead afterwards.
pub unsafe fn graph_exec_destroy(exec: CuGraphExec) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller.
    check(unsafe { cuGraphExecDestroy(exec) }, "cuGraphExecDestroy")
}

/// `cuGraphDestroy`.
///
/// # Safety
/// `graph` must be live and is dead afterwards.
pub unsafe fn graph_destroy(graph: CuGraph) -> Result<(), DriverError> {
    // SAFETY: guaranteed by the caller.
    check(unsafe { cuGraphDestroy(graph) }, "cuGraphDestroy")
}

/// An opaque 128-byte TMA descriptor (`CUtensorMap`), passed to kernels by
/// value.
#[repr(C, align(64))]
#[derive(Debug, Clone, Copy)]
pub struct TensorMap(pub [u64; 16]);

impl TensorMap {
    /// An all-zero map (never valid for a copy; a placeholder).
    pub const ZERO: TensorMap = TensorMap([0; 16]);
}

/// A TMA descriptor for a row-major matrix of 16-bit elements, `rows` rows
/// of `cols` elements `stride` elements apart, copied in boxes of
/// `box_cols x box_rows` into 128-byte swizzled shared memory (elements
/// outside the matrix read as zero).
///
/// The driver checks the rest (`addr` 16-byte aligned, `stride * 2` a
/// multiple of 16, `box_cols * 2 <= 128`, boxes at most 256).
pub fn tensor_map_2d_u16(
    addr: u64,
    rows: u64,
    cols: u64,
    stride: u64,
    box_cols: u32,
    box_rows: u32,
) -> Result<TensorMap, DriverError> {
    const DTYPE_UINT16: c_int = 1;
    const SWIZZLE_128B: c_int = 3;
    const L2_PROMOTION_256B: c_int = 3;
    let mut map = TensorMap::ZERO;
    let dims = [cols, rows];
    let strides = [stride * 2];
    let boxes = [box_cols, box_rows];
    let es = [1u32, 1];
    // SAFETY: every pointer refers to a live local of the documented size
    // (rank 2: two dims, one stride, two box and element-stride entries);
    // the driver only encodes the descriptor, it does not touch `addr`.
    let rc = unsafe {
        cuTensorMapEncodeTiled(
            &mut map,
            DTYPE_UINT16,
            2,
            addr as *mut c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            es.as_ptr(),
            0,
            SWIZZLE_128B,
            L2_PROMOTION_256B,
            0,
        )
    };
    check(rc, "cuTensorMapEncodeTiled")?;
    Ok(map)
}
