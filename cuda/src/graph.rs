//! CUDA graphs over medley calls: record what a closure enqueues on a
//! stream once ([`Graph::capture`]), then replay all of it with one
//! [`Graph::launch`] (a few hundred nanoseconds of CPU per replay instead
//! of a few microseconds per kernel).
//!
//! Every medley call is capturable: it only enqueues kernels (and, where a
//! call needs one, an async memset) on the stream it is given, and never
//! allocates, synchronizes or reads device memory back. What a replay
//! reads and writes are the device addresses the recorded calls were given:
//! new inputs go into the same buffers, and the buffers must outlive the
//! graph's last replay (hence [`Graph::launch`] is `unsafe`). Validation
//! happens at capture time, so a replay cannot fail on bad arguments.
//! Scalars are fixed at capture too: a sampler's `seed` and `step`, a
//! temperature, the ensemble weights given by value; a decode loop that
//! advances `step` keeps it in a graph per step or recaptures.
//!
//! Capture a non-blocking stream (`CU_STREAM_NON_BLOCKING`): while a
//! blocking stream is being captured, any operation on the legacy default
//! stream of the same context (a synchronous `cuMemcpy` from another
//! thread, say) invalidates the capture (`CUDA_ERROR_STREAM_CAPTURE_IMPLICIT`,
//! 906, then 901 from every later call of the capture). Measured with
//! cuda/tests/graph.rs under compute-sanitizer, where the two tests ran side
//! by side.
//!
//! ```no_run
//! # use medley_cuda::{Launch, Kernels, Stream, CudaError};
//! # use medley_cuda::graph::Graph;
//! # use medley_cuda::driver::CaptureMode;
//! # fn demo(kernels: &Kernels, stream: Stream<'_>, call: impl Fn() -> medley_cuda::gating::Gate<'static>) -> Result<(), CudaError> {
//! let g = Graph::capture(stream, CaptureMode::ThreadLocal, |s| call().launch(kernels, s))?;
//! // ... refill the input buffers, then:
//! // SAFETY: every buffer the captured calls name is still allocated.
//! unsafe { g.launch(stream) }?;
//! # Ok(()) }
//! ```

use crate::driver::{self, CaptureMode, CtxGuard, CuContext, CuGraph, CuGraphExec};
use crate::error::CudaError;
use crate::mem::Stream;

/// An instantiated CUDA graph (`CUgraph` plus its `CUgraphExec`), owned:
/// both are destroyed on drop, which must happen before the captured
/// context is destroyed (as for the [`crate::Kernels`] the calls used).
#[derive(Debug)]
pub struct Graph {
    graph: CuGraph,
    exec: CuGraphExec,
    ctx: CuContext,
    calls: usize,
}

// SAFETY: the driver lets a graph be used from any thread as long as no two
// threads use the same graph at once; `Graph` is not `Sync` and every use
// takes `&self` on the owning thread, so moving it between threads is safe.
unsafe impl Send for Graph {}

/// Makes `ctx` current unless it already is.
fn enter(ctx: CuContext) -> Result<Option<CtxGuard>, CudaError> {
    if driver::current_context()? == ctx {
        return Ok(None);
    }
    // SAFETY: `ctx` came from `cuStreamGetCtx` on a stream the caller
    // guarantees is live, so the context is live too.
    Ok(Some(unsafe { CtxGuard::push(ctx) }?))
}

impl Graph {
    /// Records everything `record` enqueues on `stream` and instantiates it.
    ///
    /// `record` gets the stream back and returns the first error of the
    /// calls it made; the capture is then ended and discarded and that
    /// error returned, so the stream is never left capturing. A driver
    /// refusal (capturing the legacy default stream, an unsafe call on
    /// another thread under [`CaptureMode::Global`]) is a
    /// [`CudaError::Driver`] with the raw code (900-908:
    /// `CUDA_ERROR_STREAM_CAPTURE_*`).
    pub fn capture<F>(stream: Stream<'_>, mode: CaptureMode, record: F) -> Result<Graph, CudaError>
    where
        F: FnOnce(Stream<'_>) -> Result<(), CudaError>,
    {
        Self::capture_counted(stream, mode, 0, record)
    }

    /// [`Graph::capture`], remembering `calls` (the number of calls
    /// `record` makes) for [`Graph::calls`]: benchmarks divide a replay's
    /// time by it.
    pub fn capture_counted<F>(
        stream: Stream<'_>,
        mode: CaptureMode,
        calls: usize,
        record: F,
    ) -> Result<Graph, CudaError>
    where
        F: FnOnce(Stream<'_>) -> Result<(), CudaError>,
    {
        let raw = stream.raw();
        // SAFETY: `Stream::from_raw`'s contract: `raw` is a live stream.
        let ctx = unsafe { driver::stream_context(raw) }?;
        let _g = enter(ctx)?;
        // SAFETY: as above; the driver refuses the legacy stream itself.
        unsafe { driver::stream_begin_capture(raw, mode) }?;
        let recorded = record(stream);
        // SAFETY: the stream is capturing (begin succeeded above) and live.
        let ended = unsafe { driver::stream_end_capture(raw) };
        let graph = match (recorded, ended) {
            (Ok(()), Ok(g)) => g,
            (Err(e), Ok(g)) => {
                // SAFETY: `g` was just returned by the driver and is ours.
                let _ = unsafe { driver::graph_destroy(g) };
                return Err(e);
            }
            // A call that failed validation enqueued nothing; its error
            // explains more than the driver's about the capture.
            (Err(e), Err(_)) => return Err(e),
            (Ok(()), Err(e)) => return Err(e.into()),
        };
        // SAFETY: `graph` is live and its context is current (`_g`).
        match unsafe { driver::graph_instantiate(graph) } {
            Ok(exec) => Ok(Graph {
                graph,
                exec,
                ctx,
                calls,
            }),
            Err(e) => {
                // SAFETY: `graph` is ours and not instantiated.
                let _ = unsafe { driver::graph_destroy(graph) };
                Err(e.into())
            }
        }
    }

    /// The call count given to [`Graph::capture_counted`] (0 from
    /// [`Graph::capture`]).
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Enqueues one replay on `stream` ([`CudaError::WrongContext`] if
    /// `stream` belongs to another context than the captured one).
    ///
    /// # Safety
    /// Every device buffer the captured calls were given must still be
    /// allocated, and no other work may write the graph's outputs or
    /// inputs while the replay runs unless ordered with it by the stream.
    pub unsafe fn launch(&self, stream: Stream<'_>) -> Result<(), CudaError> {
        // SAFETY: `Stream::from_raw`'s contract: the stream is live.
        if unsafe { driver::stream_context(stream.raw()) }? != self.ctx {
            return Err(CudaError::WrongContext);
        }
        let _g = enter(self.ctx)?;
        // SAFETY: `exec` is live (owned); the stream is in its context; the
        // caller keeps the captured buffers alive.
        unsafe { driver::graph_launch(self.exec, stream.raw()) }?;
        Ok(())
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        let _g = enter(self.ctx).ok();
        // SAFETY: both handles are owned, live, and destroyed once here
        // (the executable first).
        unsafe {
            let _ = driver::graph_exec_destroy(self.exec);
            let _ = driver::graph_destroy(self.graph);
        }
    }
}
