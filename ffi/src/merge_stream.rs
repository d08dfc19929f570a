//! The streaming form of the merges that need whole-tensor statistics
//! (the task-vector family, SCE, Model Stock, SLERP, NuSLERP, multi-SLERP,
//! Karcher): one opaque handle, `medley_merge_stream`, created by a
//! `medley_merge_stream_new_*` function per method, fed the tensor in
//! chunks pass after pass, then applied to chunks in any order.
//!
//! The handle owns its scratch (allocated at creation, sized by the same
//! queries as the one-shot calls); results are bit-identical to the
//! one-shot functions for any chunking.

use crate::args::{Region, Regions, req_out_ptr, versioned};
use crate::merge_methods::{
    gta_list, gta_options, gta_params, karcher_options, medley_gta_model, medley_gta_options,
    medley_karcher_options, medley_merge_tensor, medley_multislerp_options, medley_nuslerp_options,
    medley_sce_options, medley_slerp_options, medley_stock_options, multislerp_options, nuslerp_options,
    opt_input, out_region, output, sce_options, slerp_options, stock_options, tensor_list, tensors,
    with_type, with_types,
};
use crate::status::{Fail, medley_status};
use core::ffi::c_void;
use medley_core::merge::gta::{Gta, GtaApply, GtaStats};
use medley_core::merge::sce::{Sce, SceApply, SceStats};
use medley_core::merge::sphere::{
    Combination, KarcherStats, Layout, MultislerpStats, Nuslerp, NuslerpApply, NuslerpStats, Pair, SlerpStats,
};
use medley_core::merge::stock::{ModelStock, StockApply, StockStats};
use medley_core::{DType, Error, bf16, f16};

/// Marks a live handle (a cheap guard against passing something else).
const MAGIC: u64 = 0x6d65_646c_6579_5354;

// Lives inside the boxed handle only: the variants' sizes cost nothing.
#[allow(clippy::large_enum_variant)]
enum Stats {
    Gta(GtaStats<'static>),
    Sce(SceStats<'static>),
    Stock(StockStats),
    Slerp(SlerpStats),
    Nuslerp(NuslerpStats<'static>),
    Multi(MultislerpStats),
    Karcher(KarcherStats),
}

// Lives inside the boxed handle only: the variants' sizes cost nothing.
#[allow(clippy::large_enum_variant)]
enum Ready {
    Gta(GtaApply),
    Sce(SceApply),
    Stock(StockApply),
    Pair(Pair),
    Nuslerp(NuslerpApply<'static>),
    Comb(Combination),
}

// Lives inside the boxed handle only: the variants' sizes cost nothing.
#[allow(clippy::large_enum_variant)]
enum State {
    Stats(Stats),
    Ready(Ready),
    /// Only while a transition is in progress (never seen by a caller).
    Empty,
}

/// A streamed merge of one tensor (opaque). Created by a
/// `medley_merge_stream_new_*` function, freed by
/// `medley_merge_stream_destroy`. Not thread-safe: one call at a time per
/// handle.
#[allow(non_camel_case_types)]
pub struct medley_merge_stream {
    magic: u64,
    /// Tensor length.
    n: usize,
    /// Models per chunk.
    m: usize,
    /// Whether chunks come with a base.
    with_base: bool,
    /// Elements fed in the current pass (single-pass methods).
    fed: usize,
    /// Ready without a pass (NuSLERP's row layout).
    no_pass: bool,
    state: State,
    scratch: *mut [u32],
    scratch64: *mut [f64],
}

impl core::fmt::Debug for medley_merge_stream {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("medley_merge_stream")
            .field("n", &self.n)
            .field("m", &self.m)
            .field("with_base", &self.with_base)
            .field("ready", &matches!(self.state, State::Ready(_)))
            .finish_non_exhaustive()
    }
}

impl Drop for medley_merge_stream {
    fn drop(&mut self) {
        // The state borrows the scratch: drop it first.
        self.state = State::Empty;
        // SAFETY: both came from Box::into_raw in `make` and are freed once.
        unsafe {
            drop(Box::from_raw(self.scratch));
            drop(Box::from_raw(self.scratch64));
        }
    }
}

fn misuse(what: &'static str) -> Fail {
    Error::Unsupported { what }.into()
}

/// A zeroed scratch buffer to be owned by a handle; `Overflow` when it
/// cannot be allocated.
fn alloc<T: Copy + Default>(len: usize) -> Result<Box<[T]>, Fail> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| Fail::Overflow {
        arg: "scratch",
        index: 0,
    })?;
    v.resize(len, T::default());
    Ok(v.into_boxed_slice())
}

/// Builds the handle: `init` makes the state from the handle's scratch.
///
/// # Safety
/// `out` passed `req_out_ptr` and is writable (the caller).
#[allow(clippy::too_many_arguments)]
unsafe fn make(
    out: *mut *mut medley_merge_stream,
    n: usize,
    m: usize,
    with_base: bool,
    no_pass: bool,
    scratch_len: usize,
    scratch64_len: usize,
    init: impl FnOnce(&'static mut [u32], &'static mut [f64]) -> Result<State, Fail>,
) -> Result<(), Fail> {
    let (s32, s64) = (alloc::<u32>(scratch_len)?, alloc::<f64>(scratch64_len)?);
    let mut h = Box::new(medley_merge_stream {
        magic: MAGIC,
        n,
        m,
        with_base,
        fed: 0,
        no_pass,
        state: State::Empty,
        scratch: Box::into_raw(s32),
        scratch64: Box::into_raw(s64),
    });
    // SAFETY: the buffers live as long as the handle, which drops the
    // state (the only borrower) before freeing them; nothing else touches
    // them while the state holds them.
    let (s, s64) = unsafe { (&mut *h.scratch, &mut *h.scratch64) };
    h.state = init(s, s64)?;
    h.settle()?;
    // SAFETY: out checked by req_out_ptr, writable (the caller).
    unsafe { out.write(Box::into_raw(h)) };
    Ok(())
}

impl medley_merge_stream {
    fn needs_pass(&self) -> bool {
        match &self.state {
            State::Stats(Stats::Gta(s)) => s.needs_pass(),
            State::Stats(Stats::Sce(s)) => s.needs_pass(),
            State::Stats(Stats::Stock(s)) => s.needs_pass(),
            State::Stats(_) => true,
            _ => false,
        }
    }

    /// Turns finished statistics into a ready state (when no pass is
    /// needed).
    fn settle(&mut self) -> Result<(), Fail> {
        let done = match &self.state {
            State::Stats(Stats::Gta(s)) => !s.needs_pass(),
            State::Stats(Stats::Sce(s)) => !s.needs_pass(),
            State::Stats(Stats::Stock(s)) => !s.needs_pass(),
            // Single-pass statistics: nothing to feed for an empty tensor
            // (or for NuSLERP's row layout, which takes its statistics in
            // the apply).
            State::Stats(Stats::Nuslerp(_)) => self.n == 0 || self.no_pass,
            State::Stats(_) => self.n == 0,
            _ => false,
        };
        if done {
            self.finish()?;
        }
        Ok(())
    }

    /// Computes the ready state from statistics that are complete (the
    /// caller checked: nothing here can fail for a consuming `finish`).
    fn finish(&mut self) -> Result<(), Fail> {
        // Non-consuming finishes first: on error the state is unchanged.
        let r = match &self.state {
            State::Stats(Stats::Stock(s)) => Some(Ready::Stock(s.finish()?)),
            State::Stats(Stats::Slerp(s)) => Some(Ready::Pair(s.finish()?)),
            State::Stats(Stats::Multi(s)) => Some(Ready::Comb(s.finish()?)),
            State::Stats(Stats::Karcher(s)) => Some(Ready::Comb(s.finish()?)),
            _ => None,
        };
        if let Some(r) = r {
            self.state = State::Ready(r);
            return Ok(());
        }
        match core::mem::replace(&mut self.state, State::Empty) {
            State::Stats(Stats::Gta(s)) => {
                self.state = State::Ready(Ready::Gta(s.finish()?));
            }
            State::Stats(Stats::Sce(s)) => {
                self.state = State::Ready(Ready::Sce(s.finish()?));
            }
            State::Stats(Stats::Nuslerp(s)) => {
                self.state = State::Ready(Ready::Nuslerp(s.finish()?));
            }
            other => self.state = other,
        }
        Ok(())
    }
}

/// The live handle behind `h`.
///
/// # Safety
/// `h` is null or a handle from `medley_merge_stream_new_*` not yet
/// destroyed, used by no other call (the caller).
unsafe fn handle<'a>(h: *mut medley_merge_stream) -> Result<&'a mut medley_merge_stream, Fail> {
    if h.is_null() {
        return Err(Fail::Null {
            arg: "stream",
            index: 0,
        });
    }
    if !h.is_aligned() {
        return Err(Fail::Misaligned {
            arg: "stream",
            index: 0,
            align: align_of::<medley_merge_stream>(),
        });
    }
    // SAFETY: a live handle (the caller).
    let h = unsafe { &mut *h };
    if h.magic != MAGIC {
        return Err(misuse("not a live medley_merge_stream handle"));
    }
    Ok(h)
}

/// A chunk's model count and lengths (the core's own check, before any
/// state changes).
fn check_chunk<T>(ms: &[&[T]], m: usize, len: usize) -> Result<(), Fail> {
    if ms.len() != m {
        return Err(Error::LengthMismatch {
            arg: "chunks.count",
            index: 0,
            expected: m,
            got: ms.len(),
        }
        .into());
    }
    for (index, x) in ms.iter().enumerate() {
        if x.len() != len {
            return Err(Error::LengthMismatch {
                arg: "chunks",
                index,
                expected: len,
                got: x.len(),
            }
            .into());
        }
    }
    Ok(())
}

/// Starts a streamed task-vector merge (any method of `medley_merge_gta`)
/// of `n_models` models over tensors of `n` elements. Only the parameters
/// of `models` are read (weights, densities, gammas, epsilons), not their
/// tensors. On success `*stream` receives the handle (the scratch of
/// `medley_merge_gta_scratch_len` is allocated in it); on failure
/// `*stream` is untouched.
///
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW` (also: the scratch
/// cannot be allocated), `MEDLEY_STATUS_STRUCT_SIZE`, or the parameter
/// errors of `medley_merge_gta`.
///
/// # Safety
/// `models` must hold `n_models` structs, `options` one; `stream` must
/// point to a writable pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_new_gta(
    models: *const medley_gta_model,
    n_models: usize,
    n: usize,
    options: *const medley_gta_options,
    stream: *mut *mut medley_merge_stream,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointers.
        let opts = gta_options(&unsafe { versioned(options, "options") }?)?;
        let out = req_out_ptr(stream, "stream")?;
        // SAFETY: the caller guarantees `models` holds n_models structs.
        let (list, k) = unsafe { gta_list(models, n_models) }?;
        let p = gta_params(&list[..k]);
        let plan = Gta::new(n, &p[..k], &opts)?;
        // SAFETY: out checked above.
        unsafe {
            make(out, n, k, true, false, plan.scratch_len(), 0, |s, _| {
                Ok(State::Stats(Stats::Gta(plan.stats(s)?)))
            })
        }
    })
}

/// Starts a streamed SCE (`medley_merge_sce`) of `n_models` models over
/// tensors of `n` elements into `*stream`. Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED`,
/// `MEDLEY_STATUS_OVERFLOW` (the scratch cannot be allocated),
/// `MEDLEY_STATUS_STRUCT_SIZE` or the parameter errors of
/// `medley_merge_sce`; on failure `*stream` is untouched.
///
/// # Safety
/// `options` must hold one struct; `stream` must point to a writable
/// pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_new_sce(
    n_models: usize,
    n: usize,
    options: *const medley_sce_options,
    stream: *mut *mut medley_merge_stream,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = sce_options(&unsafe { versioned(options, "options") }?);
        let out = req_out_ptr(stream, "stream")?;
        let plan = Sce::new(n, n_models, &opts)?;
        // SAFETY: out checked above.
        unsafe {
            make(out, n, n_models, true, false, plan.scratch_len(), 0, |s, _| {
                Ok(State::Stats(Stats::Sce(plan.stats(s)?)))
            })
        }
    })
}

/// Starts a streamed Model Stock (`medley_merge_model_stock`) of
/// `n_models` models over tensors of `n` elements into `*stream` (the
/// row-wise form needs no pass: it is ready to apply at once). Returns as
/// `medley_merge_stream_new_sce`, plus `MEDLEY_STATUS_UNSUPPORTED` (fewer
/// than 2 models).
///
/// # Safety
/// As `medley_merge_stream_new_sce`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_new_model_stock(
    n_models: usize,
    n: usize,
    options: *const medley_stock_options,
    stream: *mut *mut medley_merge_stream,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = stock_options(&unsafe { versioned(options, "options") }?);
        let out = req_out_ptr(stream, "stream")?;
        let plan = ModelStock::new(n, n_models, &opts)?;
        // SAFETY: out checked above.
        unsafe {
            make(out, n, n_models, true, false, 0, 0, |_, _| {
                Ok(State::Stats(Stats::Stock(plan.stats())))
            })
        }
    })
}

/// Starts a streamed SLERP (`medley_merge_slerp`) of two tensors of `n`
/// elements into `*stream`: chunks are 2 tensors (`v0`, `v1`) and no base.
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_STRUCT_SIZE` or
/// `MEDLEY_STATUS_BAD_PARAMETER` (options); on failure `*stream` is
/// untouched.
///
/// # Safety
/// As `medley_merge_stream_new_sce`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_new_slerp(
    n: usize,
    options: *const medley_slerp_options,
    stream: *mut *mut medley_merge_stream,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = slerp_options(&unsafe { versioned(options, "options") }?);
        let out = req_out_ptr(stream, "stream")?;
        let st = SlerpStats::new(n, &opts)?;
        // SAFETY: out checked above.
        unsafe {
            make(out, n, 2, false, false, 0, 0, |_, _| {
                Ok(State::Stats(Stats::Slerp(st)))
            })
        }
    })
}

/// Starts a streamed NuSLERP (`medley_merge_nuslerp`) of two models with
/// weights `weights[0..2]` over tensors of `n` elements, on task vectors
/// over a base iff `with_base` is nonzero (then every chunk comes with its
/// base chunk), into `*stream`. Chunks are 2 tensors. Returns as
/// `medley_merge_stream_new_slerp`, plus `MEDLEY_STATUS_BAD_SHAPE`
/// (`weights_len` not 2) and `MEDLEY_STATUS_OVERFLOW` (the scratch of the
/// `COLUMNS` layout cannot be allocated).
///
/// # Safety
/// `weights` must hold `weights_len` floats; otherwise as
/// `medley_merge_stream_new_sce`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_new_nuslerp(
    weights: *const f32,
    weights_len: usize,
    with_base: u32,
    n: usize,
    options: *const medley_nuslerp_options,
    stream: *mut *mut medley_merge_stream,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = nuslerp_options(&unsafe { versioned(options, "options") }?)?;
        let out = req_out_ptr(stream, "stream")?;
        let w = weight_list(weights, weights_len)?;
        if w.len() != 2 {
            return Err(Error::LengthMismatch {
                arg: "weights",
                index: 0,
                expected: 2,
                got: w.len(),
            }
            .into());
        }
        let plan = Nuslerp::new(n, [w[0], w[1]], &opts)?;
        let rows = matches!(opts.layout, Layout::Rows(_));
        // SAFETY: out checked above.
        unsafe {
            make(out, n, 2, with_base != 0, rows, 0, plan.scratch_len(), |_, s| {
                Ok(State::Stats(Stats::Nuslerp(plan.stats(s)?)))
            })
        }
    })
}

fn weight_list<'a>(weights: *const f32, len: usize) -> Result<&'a [f32], Fail> {
    Region::host(weights, len, "weights", 0)?;
    // SAFETY: checked; readable (the caller of the entry point).
    Ok(unsafe { crate::args::slice(weights, len) })
}

/// Starts a streamed multi-SLERP (`medley_merge_multislerp`) of
/// `weights_len` models with those weights over tensors of `n` elements,
/// with a base iff `with_base` is nonzero, into `*stream`. Returns as
/// `medley_merge_stream_new_slerp`, plus `MEDLEY_STATUS_BAD_SHAPE` (no or
/// too many weights).
///
/// # Safety
/// As `medley_merge_stream_new_nuslerp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_new_multislerp(
    weights: *const f32,
    weights_len: usize,
    with_base: u32,
    n: usize,
    options: *const medley_multislerp_options,
    stream: *mut *mut medley_merge_stream,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = multislerp_options(&unsafe { versioned(options, "options") }?);
        let out = req_out_ptr(stream, "stream")?;
        let w = weight_list(weights, weights_len)?;
        let st = MultislerpStats::new(n, w, with_base != 0, &opts)?;
        // SAFETY: out checked above.
        unsafe {
            make(out, n, w.len(), with_base != 0, false, 0, 0, |_, _| {
                Ok(State::Stats(Stats::Multi(st)))
            })
        }
    })
}

/// Starts a streamed Karcher mean (`medley_merge_karcher`) of
/// `weights_len` models with those weights over tensors of `n` elements
/// (no base) into `*stream`. Returns as
/// `medley_merge_stream_new_multislerp`.
///
/// # Safety
/// As `medley_merge_stream_new_nuslerp`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_new_karcher(
    weights: *const f32,
    weights_len: usize,
    n: usize,
    options: *const medley_karcher_options,
    stream: *mut *mut medley_merge_stream,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the struct pointer.
        let opts = karcher_options(&unsafe { versioned(options, "options") }?);
        let out = req_out_ptr(stream, "stream")?;
        let w = weight_list(weights, weights_len)?;
        let st = KarcherStats::new(n, w, &opts)?;
        // SAFETY: out checked above.
        unsafe {
            make(out, n, w.len(), false, false, 0, 0, |_, _| {
                Ok(State::Stats(Stats::Karcher(st)))
            })
        }
    })
}

/// `*needs_pass` = 1 while the stream wants another statistics pass (feed
/// the whole tensor in order, then `medley_merge_stream_end_pass`), 0 once
/// it is ready to apply. Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT`, `MEDLEY_STATUS_MISALIGNED` or
/// `MEDLEY_STATUS_UNSUPPORTED` (not a live handle).
///
/// # Safety
/// `stream` must be a live handle used by no other call; `needs_pass` a
/// writable `uint32_t`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_needs_pass(
    stream: *mut medley_merge_stream,
    needs_pass: *mut u32,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the handle.
        let h = unsafe { handle(stream) }?;
        let out = req_out_ptr(needs_pass, "needs_pass")?;
        // SAFETY: checked; writable (the caller).
        unsafe { out.write(h.needs_pass() as u32) };
        Ok(())
    })
}

/// The chunk length of a call: the base's, or the first model chunk's for
/// a stream without a base (which must then get a null base).
fn chunk_len(
    h: &medley_merge_stream,
    chunks: &[medley_merge_tensor],
    base: *const c_void,
    base_len: usize,
) -> Result<usize, Fail> {
    if h.with_base {
        Ok(base_len)
    } else {
        if !base.is_null() || base_len != 0 {
            return Err(misuse("a base chunk for a stream without a base"));
        }
        Ok(chunks.first().map_or(0, |c| c.data_len))
    }
}

/// Feeds the next chunk of the current statistics pass: `chunks[i]` holds
/// the next elements of model `i` (as many as the base chunk, or as the
/// first chunk without a base), `base` those of the base (null with 0 for
/// the streams without one). Chunks of a pass come in order and cover the
/// tensor exactly; row-wise methods take whole rows. Once the statistics
/// are finished (`medley_merge_stream_needs_pass` gives 0) feeding is
/// refused. A failed call changes nothing (the chunk can be fed again).
///
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_BAD_SHAPE` (model count, lengths, past the tensor's end),
/// `MEDLEY_STATUS_BAD_PARAMETER` (`dtype`, not whole rows) or
/// `MEDLEY_STATUS_UNSUPPORTED` (not a live handle, statistics already
/// finished, a base given to a stream without one or missing).
///
/// # Safety
/// `stream` must be a live handle used by no other call; every non-null
/// pointer valid for its length.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_feed(
    stream: *mut medley_merge_stream,
    chunks: *const medley_merge_tensor,
    n_chunks: usize,
    base: *const c_void,
    base_len: usize,
    dtype: u32,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the handle.
        let h = unsafe { handle(stream) }?;
        // SAFETY: the caller guarantees `chunks` holds n_chunks structs.
        let (list, k) = unsafe { tensor_list(chunks, n_chunks, "chunks") }?;
        let t = crate::args::dtype("dtype", dtype)?;
        let l = &list[..k];
        let len = chunk_len(h, l, base, base_len)?;
        if !matches!(h.state, State::Stats(_)) {
            return Err(misuse("statistics already finished (apply, or destroy)"));
        }
        with_type!(t, |T| {
            let mut regions = Regions::new();
            // SAFETY: the caller guarantees every buffer.
            let (ms, _) = unsafe {
                tensors::<T>(
                    l.iter().map(|m| (m.data, m.data_len)),
                    "chunks[].data",
                    &mut regions,
                )
            }?;
            // SAFETY: as above.
            let b = unsafe { opt_input::<T>(base, base_len, "base", &mut regions) }?;
            if h.with_base && b.is_none() && len != 0 {
                return Err(misuse("a stream with a base fed no base chunk"));
            }
            let bb: &[T] = b.unwrap_or(&[]);
            let ms = &ms[..k];
            check_chunk(ms, h.m, len)?;
            if len > h.n - h.fed.min(h.n) {
                return Err(Error::TooLarge {
                    arg: "base",
                    index: 0,
                    max: h.n - h.fed.min(h.n),
                    got: len,
                }
                .into());
            }
            let single = match &mut h.state {
                State::Stats(Stats::Gta(s)) => {
                    s.feed(ms, bb)?;
                    false
                }
                State::Stats(Stats::Sce(s)) => {
                    s.feed(ms, bb)?;
                    false
                }
                State::Stats(Stats::Stock(s)) => {
                    s.feed(ms, bb)?;
                    true
                }
                State::Stats(Stats::Slerp(s)) => {
                    s.feed(ms[0], ms[1])?;
                    true
                }
                State::Stats(Stats::Nuslerp(s)) => {
                    s.feed(ms[0], ms[1], b)?;
                    true
                }
                State::Stats(Stats::Multi(s)) => {
                    s.feed(ms, b)?;
                    true
                }
                State::Stats(Stats::Karcher(s)) => {
                    s.feed(ms)?;
                    true
                }
                _ => false,
            };
            if single {
                h.fed += len;
            }
        });
        Ok(())
    })
}

/// Ends the current statistics pass (every element fed, in order); after
/// the last pass the stream computes its finished statistics and is ready
/// to apply (`medley_merge_stream_needs_pass` then gives 0). Failure
/// changes nothing: complete the pass and call again.
///
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_BAD_SHAPE` (the pass was not
/// fed the whole tensor), `MEDLEY_STATUS_BAD_PARAMETER` (a degenerate
/// multi-SLERP mean) or `MEDLEY_STATUS_UNSUPPORTED` (not a live handle, no
/// pass in progress).
///
/// # Safety
/// `stream` must be a live handle used by no other call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_end_pass(stream: *mut medley_merge_stream) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the handle.
        let h = unsafe { handle(stream) }?;
        match &mut h.state {
            State::Stats(Stats::Gta(s)) => s.end_pass()?,
            State::Stats(Stats::Sce(s)) => s.end_pass()?,
            State::Stats(_) => {
                if h.fed != h.n {
                    return Err(Error::LengthMismatch {
                        arg: "base",
                        index: 0,
                        expected: h.n,
                        got: h.fed,
                    }
                    .into());
                }
                h.finish()?;
                return Ok(());
            }
            _ => {
                return Err(misuse(
                    "no statistics pass in progress (the stream is ready to apply)",
                ));
            }
        }
        h.settle()
    })
}

/// Merges one chunk: `chunks[i]` and `base` hold elements `offset ..
/// offset + len` of model `i` and of the base (null with 0 for the streams
/// without one; `len` the base's length, or the first chunk's without a
/// base); `out` receives the merged elements (`out_dtype`, `len` of
/// them). Chunks may come in any order, any number of times (row-wise
/// methods: whole rows). Uses the handle's scratch: one call at a time.
///
/// Checked before anything is written: on failure `out` is untouched.
/// Returns `MEDLEY_STATUS_OK`, `MEDLEY_STATUS_NULL_ARGUMENT`,
/// `MEDLEY_STATUS_MISALIGNED`, `MEDLEY_STATUS_OVERFLOW`,
/// `MEDLEY_STATUS_OVERLAP`, `MEDLEY_STATUS_BAD_SHAPE` (model count,
/// lengths, past the tensor's end), `MEDLEY_STATUS_BAD_PARAMETER`
/// (dtypes, not whole rows) or `MEDLEY_STATUS_UNSUPPORTED` (not a live
/// handle, statistics passes remain, a base given or missing).
///
/// # Safety
/// `stream` must be a live handle used by no other call; every non-null
/// pointer valid for its length; no buffer modified by another thread
/// during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_apply(
    stream: *mut medley_merge_stream,
    chunks: *const medley_merge_tensor,
    n_chunks: usize,
    base: *const c_void,
    base_len: usize,
    dtype: u32,
    offset: usize,
    out: *mut c_void,
    out_len: usize,
    out_dtype: u32,
) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the handle.
        let h = unsafe { handle(stream) }?;
        // SAFETY: the caller guarantees `chunks` holds n_chunks structs.
        let (list, k) = unsafe { tensor_list(chunks, n_chunks, "chunks") }?;
        let t = crate::args::dtype("dtype", dtype)?;
        let o = crate::args::dtype("out_dtype", out_dtype)?;
        let l = &list[..k];
        let len = chunk_len(h, l, base, base_len)?;
        if !matches!(h.state, State::Ready(_)) {
            return Err(misuse(
                "statistics passes remain (feed and end_pass until needs_pass is 0)",
            ));
        }
        with_types!(t, o, |T, O| {
            let mut regions = Regions::new();
            // SAFETY: the caller guarantees every buffer.
            let (ms, _) = unsafe {
                tensors::<T>(
                    l.iter().map(|m| (m.data, m.data_len)),
                    "chunks[].data",
                    &mut regions,
                )
            }?;
            // SAFETY: as above.
            let b = unsafe { opt_input::<T>(base, base_len, "base", &mut regions) }?;
            if h.with_base && b.is_none() && len != 0 {
                return Err(misuse("a stream with a base applied without a base chunk"));
            }
            out_region::<O>(out, out_len, "out", &mut regions)?;
            regions.check()?;
            let bb: &[T] = b.unwrap_or(&[]);
            let ms = &ms[..k];
            check_chunk(ms, h.m, len)?;
            if out_len != len {
                return Err(Error::LengthMismatch {
                    arg: "out",
                    index: 0,
                    expected: len,
                    got: out_len,
                }
                .into());
            }
            if offset > h.n || len > h.n - offset {
                return Err(Error::TooLarge {
                    arg: "offset",
                    index: 0,
                    max: h.n,
                    got: offset.saturating_add(len),
                }
                .into());
            }
            // SAFETY: registered and checked above.
            let out = unsafe { output::<O>(out, out_len) };
            let scratch = h.scratch;
            match &h.state {
                State::Ready(Ready::Gta(a)) => {
                    // SAFETY: the statistics (the only other borrower) are
                    // gone once ready; one call at a time (the caller).
                    let s = unsafe { &mut *scratch };
                    a.apply(ms, bb, offset, s, out)?
                }
                State::Ready(Ready::Sce(a)) => a.apply(ms, bb, offset, out)?,
                State::Ready(Ready::Stock(a)) => a.apply(ms, bb, offset, out)?,
                State::Ready(Ready::Pair(p)) => p.apply(ms[0], ms[1], None, out)?,
                State::Ready(Ready::Nuslerp(a)) => a.apply(ms[0], ms[1], b, offset, out)?,
                State::Ready(Ready::Comb(c)) => c.apply(ms, b, out)?,
                _ => {}
            }
        });
        Ok(())
    })
}

/// Frees a stream (at any stage). Returns `MEDLEY_STATUS_OK`,
/// `MEDLEY_STATUS_NULL_ARGUMENT` (a null handle: nothing to do),
/// `MEDLEY_STATUS_MISALIGNED` or `MEDLEY_STATUS_UNSUPPORTED` (not a live
/// handle: nothing freed). The handle is invalid after a successful call.
///
/// # Safety
/// `stream` must be null or a live handle used by no other call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn medley_merge_stream_destroy(stream: *mut medley_merge_stream) -> medley_status {
    ffi_boundary!({
        // SAFETY: the caller guarantees the handle.
        let h = unsafe { handle(stream) }?;
        h.magic = 0;
        // SAFETY: a live handle from Box::into_raw, freed once.
        drop(unsafe { Box::from_raw(stream) });
        Ok(())
    })
}
