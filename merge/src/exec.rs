//! The executor: runs a [`Plan`]'s tensor tasks in parallel and writes
//! each merged tensor straight into its byte range of a pre-sized shard.
//!
//! Parallelism is over tensors and, inside a tensor, over chunks: a
//! method's statistics passes (TIES's selection, norms, dot products) read
//! the tensor chunk by chunk in order, then the apply step merges chunks
//! on every thread at once. Each chunk's inputs are borrowed from the
//! memory maps (converted only when the models' dtypes differ), its output
//! is a buffer of `chunk` elements, and the pages of the inputs a chunk
//! read are released from the process's resident set when it is done. So
//! the memory a merge holds is about `threads x chunk x (models + 2)`
//! elements plus the selection scratch of the tensors in flight (about 8%
//! of a tensor's elements, 4 bytes each, per model, for TIES-like methods)
//! — not a tensor, a shard or a model.
//!
//! The core's streaming forms give the same bits for every chunking, and
//! each output element depends on the inputs alone, so the output is
//! identical for any chunk size and any number of threads.

use crate::error::{MergeError, Result, io};
use crate::model::{Model, Shard};
use crate::plan::{Op, Plan, Src, TensorTask};
use crate::safetensors::{Dtype, TensorInfo};
use half::{bf16, f16};
use medley_core::element::Element;
use medley_core::merge::gta::Gta;
use medley_core::merge::linear::linear;
use medley_core::merge::sce::Sce;
use medley_core::merge::sphere::{KarcherStats, MultislerpStats, Nuslerp, SlerpOptions, SlerpStats};
use medley_core::merge::stock::ModelStock;
use rayon::prelude::*;
use std::borrow::Cow;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};

/// Default elements per chunk.
pub const DEFAULT_CHUNK: usize = 1 << 20;

/// Receives progress: bytes of output written and tensors finished.
pub trait Progress: Sync {
    /// `bytes` more output bytes are written.
    fn advance(&self, bytes: u64);
    /// One more tensor is complete.
    fn tensor_done(&self, name: &str);
}

/// A [`Progress`] that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn advance(&self, _: u64) {}
    fn tensor_done(&self, _: &str) {}
}

/// One input tensor: its bytes in the map and its dtype.
#[derive(Clone, Copy)]
struct In<'a> {
    shard: &'a Shard,
    bytes: &'a [u8],
    dtype: Dtype,
}

impl<'a> In<'a> {
    fn of(models: &'a [Model], s: &Src) -> In<'a> {
        let (shard, info): (&Shard, &TensorInfo) =
            models[s.model].get(&s.tensor).expect("planned tensors exist");
        In {
            shard,
            bytes: shard.bytes(info),
            dtype: info.dtype,
        }
    }

    /// Elements `lo..hi` as `T`: borrowed when stored as `T` and aligned,
    /// converted otherwise.
    fn chunk<T: Element>(&self, lo: usize, hi: usize) -> Cow<'a, [T]> {
        let es = self.dtype.size();
        let raw = &self.bytes[lo * es..hi * es];
        self.shard.populate(raw);
        if self.dtype == dtype_of::<T>()
            && let Ok(s) = bytemuck::try_cast_slice::<u8, T>(raw)
        {
            return Cow::Borrowed(s);
        }
        let mut v = Vec::with_capacity(hi - lo);
        match self.dtype {
            Dtype::F32 => v.extend(
                raw.chunks_exact(4)
                    .map(|b| T::from_f32(f32::from_le_bytes(b.try_into().expect("4")))),
            ),
            Dtype::F16 => v.extend(
                raw.chunks_exact(2)
                    .map(|b| T::from_f32(f16::from_le_bytes(b.try_into().expect("2")).to_f32())),
            ),
            Dtype::BF16 => v.extend(
                raw.chunks_exact(2)
                    .map(|b| T::from_f32(bf16::from_le_bytes(b.try_into().expect("2")).to_f32())),
            ),
            _ => unreachable!("only float tensors are converted"),
        }
        Cow::Owned(v)
    }

    fn release(&self, lo: usize, hi: usize) {
        let es = self.dtype.size();
        self.shard.release(&self.bytes[lo * es..hi * es]);
    }
}

fn dtype_of<T: Element>() -> Dtype {
    match T::DTYPE {
        medley_core::element::DType::F32 => Dtype::F32,
        medley_core::element::DType::F16 => Dtype::F16,
        medley_core::element::DType::BF16 => Dtype::BF16,
    }
}

/// Runs every task of `plan`, writing into `files` at `places`
/// (see [`crate::output::Layout`]). Stops at the first error or when
/// `cancel` is set.
pub fn run(
    plan: &Plan,
    files: &[File],
    paths: &[std::path::PathBuf],
    places: &[(usize, u64)],
    chunk: usize,
    cancel: &AtomicBool,
    progress: &dyn Progress,
) -> Result<()> {
    let chunk = chunk.max(1);
    // Largest first, so one huge tensor does not start last.
    let mut order: Vec<usize> = (0..plan.tensors.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(plan.tensors[i].numel()));
    order.into_par_iter().try_for_each(|i| {
        if cancel.load(Ordering::Relaxed) {
            return Err(MergeError::Cancelled);
        }
        let t = &plan.tensors[i];
        let (f, off) = places[i];
        let w = Writer {
            file: &files[f],
            path: &paths[f],
            offset: off,
            elem: t.dtype.size(),
            progress,
            cancel,
        };
        run_task(plan, t, &w, chunk)?;
        progress.tensor_done(&t.name);
        Ok(())
    })
}

struct Writer<'a> {
    file: &'a File,
    path: &'a std::path::Path,
    offset: u64,
    elem: usize,
    progress: &'a dyn Progress,
    cancel: &'a AtomicBool,
}

impl Writer<'_> {
    /// Writes `bytes` as elements starting at element `at`.
    fn put(&self, at: usize, bytes: &[u8]) -> Result<()> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(MergeError::Cancelled);
        }
        self.file
            .write_all_at(bytes, self.offset + (at * self.elem) as u64)
            .map_err(io(self.path, "writing"))?;
        self.progress.advance(bytes.len() as u64);
        Ok(())
    }
}

fn core(t: &TensorTask) -> impl Fn(medley_core::Error) -> MergeError + '_ {
    move |error| MergeError::Core {
        tensor: t.name.clone(),
        error,
    }
}

/// Chunk boundaries: multiples of `unit` (whole rows where a method needs
/// them), about `chunk` elements each.
fn chunks(n: usize, chunk: usize, unit: usize) -> Vec<(usize, usize)> {
    let unit = unit.max(1);
    let step = (chunk / unit).max(1) * unit;
    (0..n)
        .step_by(step.max(1))
        .map(|lo| (lo, (lo + step).min(n)))
        .collect()
}

fn run_task(plan: &Plan, t: &TensorTask, w: &Writer<'_>, chunk: usize) -> Result<()> {
    let inputs: Vec<In<'_>> = t.inputs.iter().map(|s| In::of(&plan.models, s)).collect();
    let base = t.base.as_ref().map(|s| In::of(&plan.models, s));
    let raw_copy = match &t.op {
        Op::Copy => true,
        Op::Passthrough { scale: None } => inputs[0].dtype == t.dtype,
        _ => false,
    };
    if raw_copy {
        return copy_task(t, &inputs, w, chunk);
    }
    let all: Vec<Dtype> = inputs.iter().chain(base.iter()).map(|i| i.dtype).collect();
    let same = all.iter().all(|&d| d == all[0]);
    macro_rules! with_out {
        ($T:ty) => {
            match t.dtype {
                Dtype::F32 => numeric::<$T, f32>(t, &inputs, base.as_ref(), w, chunk),
                Dtype::F16 => numeric::<$T, f16>(t, &inputs, base.as_ref(), w, chunk),
                Dtype::BF16 => numeric::<$T, bf16>(t, &inputs, base.as_ref(), w, chunk),
                d => unreachable!("planned output dtype {d} is a float"),
            }
        };
    }
    let r = match (same, all[0]) {
        (true, Dtype::BF16) => with_out!(bf16),
        (true, Dtype::F16) => with_out!(f16),
        _ => with_out!(f32),
    };
    r?;
    if t.merged < t.numel() {
        let tail = In::of(&plan.models, t.tail.as_ref().expect("a tail source"));
        let r = match t.dtype {
            Dtype::F32 => tail_copy::<f32>(t, &tail, w, chunk),
            Dtype::F16 => tail_copy::<f16>(t, &tail, w, chunk),
            _ => tail_copy::<bf16>(t, &tail, w, chunk),
        };
        r?;
    }
    Ok(())
}

/// Copies bytes through (passthrough without scaling, non-float tensors);
/// for several inputs, checks that they hold the same bytes.
fn copy_task(t: &TensorTask, inputs: &[In<'_>], w: &Writer<'_>, chunk: usize) -> Result<()> {
    let es = inputs[0].dtype.size();
    let n = t.merged;
    chunks(n, chunk, 1).into_par_iter().try_for_each(|(lo, hi)| {
        let a = &inputs[0].bytes[lo * es..hi * es];
        inputs[0].shard.populate(a);
        for (k, other) in inputs.iter().enumerate().skip(1) {
            if other.bytes[lo * es..hi * es] != *a {
                return Err(MergeError::Plan {
                    tensor: t.name.clone(),
                    message: format!(
                        "{} tensors are not merged, only copied, and input {k} differs from input 0 (element {} or later); merge such models with matching {} tensors",
                        inputs[0].dtype, lo, inputs[0].dtype
                    ),
                });
            }
        }
        w.put(lo, a)?;
        for i in inputs {
            i.release(lo, hi);
        }
        Ok(())
    })
}

/// Writes elements `merged..numel` from the tail source, converted.
fn tail_copy<O: Element>(t: &TensorTask, tail: &In<'_>, w: &Writer<'_>, chunk: usize) -> Result<()> {
    let n = t.numel();
    chunks(n - t.merged, chunk, 1)
        .into_par_iter()
        .try_for_each(|(lo, hi)| {
            let (lo, hi) = (lo + t.merged, hi + t.merged);
            let x: Cow<'_, [O]> = tail.chunk(lo, hi);
            w.put(lo, bytemuck::cast_slice(&x))?;
            tail.release(lo, hi);
            Ok(())
        })
}

/// The merged part of a float tensor, inputs read as `T`, output `O`.
/// One chunk of every input, borrowed or converted, and of the base.
type Views<'a, T> = (Vec<Cow<'a, [T]>>, Option<Cow<'a, [T]>>);
/// A statistics step over one chunk: `(models, base)`.
type FeedFn<'f, T> = dyn FnMut(&[&[T]], Option<&[T]>) -> Result<()> + 'f;
/// An apply step over one chunk: `(models, base, offset, out)`.
type ApplyFn<'f, T, O> = dyn Fn(&[&[T]], Option<&[T]>, usize, &mut [O]) -> Result<()> + Sync + 'f;

fn numeric<T: Element, O: Element>(
    t: &TensorTask,
    inputs: &[In<'_>],
    base: Option<&In<'_>>,
    w: &Writer<'_>,
    chunk: usize,
) -> Result<()> {
    let n = t.merged;
    let e = core(t);
    // Views of one chunk.
    let views = |lo: usize, hi: usize| -> Views<'_, T> {
        (
            inputs.iter().map(|i| i.chunk::<T>(lo, hi)).collect(),
            base.map(|b| b.chunk::<T>(lo, hi)),
        )
    };
    let release = |lo: usize, hi: usize| {
        for i in inputs.iter().chain(base) {
            i.release(lo, hi);
        }
    };
    // Runs `f` over chunks in order (a statistics pass).
    let pass = |unit: usize, f: &mut FeedFn<'_, T>| -> Result<()> {
        for (lo, hi) in chunks(n, chunk, unit) {
            let (xs, b) = views(lo, hi);
            let refs: Vec<&[T]> = xs.iter().map(|c| &**c).collect();
            f(&refs, b.as_deref())?;
            release(lo, hi);
        }
        Ok(())
    };
    // Merges chunks in parallel with `f(models, base, offset, out)`.
    let apply = |unit: usize, f: &ApplyFn<'_, T, O>| -> Result<()> {
        chunks(n, chunk, unit).into_par_iter().try_for_each(|(lo, hi)| {
            let (xs, b) = views(lo, hi);
            let refs: Vec<&[T]> = xs.iter().map(|c| &**c).collect();
            let mut out = vec![O::default(); hi - lo];
            f(&refs, b.as_deref(), lo, &mut out)?;
            drop(xs);
            drop(b);
            w.put(lo, bytemuck::cast_slice(&out))?;
            release(lo, hi);
            Ok(())
        })
    };
    match &t.op {
        Op::Linear { weights, normalize } => {
            apply(1, &|x, _, _, out| linear(x, weights, *normalize, out).map_err(&e))
        }
        Op::Passthrough { scale } => {
            let s = [scale.unwrap_or(1.0)];
            apply(1, &|x, _, _, out| linear(x, &s, false, out).map_err(&e))
        }
        Op::Gta { opts, params } => {
            let g = Gta::new(n, params, opts).map_err(&e)?;
            let mut scratch = vec![0u32; g.scratch_len()];
            // DELLA ranks within rows (one row: the whole tensor); chunks
            // must hold whole rows.
            let unit = if opts.sparsify == medley_core::merge::gta::Sparsify::Della {
                opts.row_len.unwrap_or(n.max(1))
            } else {
                1
            };
            let ready = {
                let mut st = g.stats(&mut scratch).map_err(&e)?;
                while st.needs_pass() {
                    pass(unit, &mut |x, b| st.feed(x, b.expect("a base")).map_err(&e))?;
                    st.end_pass().map_err(&e)?;
                }
                st.finish().map_err(&e)?
            };
            drop(scratch);
            let need = g.apply_scratch_len();
            apply(unit, &|x, b, lo, out| {
                let mut s = vec![0u32; need];
                ready.apply(x, b.expect("a base"), lo, &mut s, out).map_err(&e)
            })
        }
        Op::Slerp { t: tt } => {
            let mut st = SlerpStats::new(n, &SlerpOptions::new(*tt)).map_err(&e)?;
            pass(1, &mut |x, _| st.feed(x[0], x[1]).map_err(&e))?;
            let pair = st.finish().map_err(&e)?;
            apply(1, &|x, _, _, out| pair.apply(x[0], x[1], None, out).map_err(&e))
        }
        Op::Nuslerp { weights, opts } => {
            let plan = Nuslerp::new(n, *weights, opts).map_err(&e)?;
            let mut scratch = vec![0f64; plan.scratch_len()];
            let unit = match opts.layout {
                medley_core::merge::sphere::Layout::Rows(r) => r,
                _ => 1,
            };
            let mut st = plan.stats(&mut scratch).map_err(&e)?;
            pass(unit, &mut |x, b| st.feed(x[0], x[1], b).map_err(&e))?;
            let ready = st.finish().map_err(&e)?;
            apply(unit, &|x, b, lo, out| {
                ready.apply(x[0], x[1], b, lo, out).map_err(&e)
            })
        }
        Op::Multislerp { weights, opts } => {
            let mut st = MultislerpStats::new(n, weights, base.is_some(), opts).map_err(&e)?;
            pass(1, &mut |x, b| st.feed(x, b).map_err(&e))?;
            let c = st.finish().map_err(&e)?;
            apply(1, &|x, b, _, out| c.apply(x, b, out).map_err(&e))
        }
        Op::Karcher { opts } => {
            let wts = vec![1.0f32; inputs.len()];
            let mut st = KarcherStats::new(n, &wts, opts).map_err(&e)?;
            pass(1, &mut |x, _| st.feed(x).map_err(&e))?;
            let c = st.finish().map_err(&e)?;
            apply(1, &|x, _, _, out| c.apply(x, None, out).map_err(&e))
        }
        Op::Stock { opts } => {
            let plan = ModelStock::new(n, inputs.len(), opts).map_err(&e)?;
            let unit = opts.rows.unwrap_or(1);
            let mut st = plan.stats();
            if st.needs_pass() {
                pass(unit, &mut |x, b| st.feed(x, b.expect("a base")).map_err(&e))?;
            }
            let ready = st.finish().map_err(&e)?;
            apply(unit, &|x, b, lo, out| {
                ready.apply(x, b.expect("a base"), lo, out).map_err(&e)
            })
        }
        Op::Sce { opts } => {
            let plan = Sce::new(n, inputs.len(), opts).map_err(&e)?;
            let mut scratch = vec![0u32; plan.scratch_len()];
            let ready = {
                let mut st = plan.stats(&mut scratch).map_err(&e)?;
                while st.needs_pass() {
                    pass(1, &mut |x, b| st.feed(x, b.expect("a base")).map_err(&e))?;
                    st.end_pass().map_err(&e)?;
                }
                st.finish().map_err(&e)?
            };
            apply(1, &|x, b, lo, out| {
                ready.apply(x, b.expect("a base"), lo, out).map_err(&e)
            })
        }
        Op::Copy => unreachable!("copied as bytes"),
    }
}

#[cfg(test)]
mod tests {
    use super::chunks;

    #[test]
    fn chunks_cover_in_whole_units() {
        assert_eq!(chunks(10, 4, 1), [(0, 4), (4, 8), (8, 10)]);
        assert_eq!(chunks(12, 5, 3), [(0, 3), (3, 6), (6, 9), (9, 12)]);
        assert_eq!(chunks(12, 1, 6), [(0, 6), (6, 12)]);
        assert!(chunks(0, 4, 1).is_empty());
    }
}
