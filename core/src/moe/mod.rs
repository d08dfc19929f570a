//! Sparse mixture-of-experts routing: everything around the expert matmuls,
//! allocation-free, plus a CPU reference of the whole layer.
//!
//! - [`gating`]: per-token top-k routing: softmax-then-top-k (vLLM's
//!   `topk_softmax`, optionally renormalized), softmax over the kept top-k
//!   logits (Shazeer et al. 2017, Mixtral), noisy top-k gating, and
//!   DeepSeek-V3 group-limited biased routing.
//! - [`capacity`]: Switch/GShard expert capacity with reported drops.
//! - [`aux`]: training-time auxiliary losses and statistics (Switch
//!   load-balancing loss, importance and load CV², router z-loss, expert
//!   counts, the auxiliary-loss-free bias update).
//! - [`plan`]: routing plans, the inputs of the expert matmuls: the
//!   expert-sorted order with offsets, vLLM's `moe_align_block_size` layout,
//!   and the inverse map; with a local expert range for expert parallelism.
//! - [`layer`]: the CPU reference MoE layer (gather, SwiGLU expert MLPs,
//!   routing weight, deterministic k-way combine).
//!
//! # Notation and layouts (the contract kernels follow)
//!
//! `T` tokens, `E` experts, `k` experts per token, `H` hidden size, `I`
//! expert intermediate size. Every array is flat and row-major:
//!
//! | array | type | shape | meaning |
//! |---|---|---|---|
//! | router logits | `f32`/`f16`/`bf16` | `[T, E]`, any row stride ([`Rows`](crate::Rows)) | one row per token |
//! | `ids` | `u32` | `[T, k]` | expert of assignment (slot) `i = t * k + j`; [`NO_EXPERT`] = routed nowhere |
//! | `weights` | `f32` | `[T, k]` | routing weight of slot `i` |
//! | `sorted` | `u32` | `[T * k]` | slot ids grouped by expert (see [`plan`]) |
//! | `offsets` | `u64` | `[L + 1]` | start of each local expert's run, last = total |
//! | `inverse` | `u32` | `[T * k]` | position of slot `i` in `sorted`, or [`NO_POSITION`] |
//!
//! A *slot* is one (token, choice) pair `i = t * k + j`; `t = i / k`. The
//! picks of a token are ordered by descending selection score (`j = 0` is the
//! best). Slot ids are `u32`, so `T * k <= u32::MAX` (checked; the sentinel
//! slot id `T * k` must fit too); offsets are `u64`, so no offset
//! arithmetic overflows (the int32 overflow behind vLLM issue #5938 and
//! sglang PR #4727 cannot occur).
//!
//! # Determinism
//!
//! - **Ties** in any selection go to the **lower index** (expert or group).
//!   Selection is exact: it compares the `f32` scores themselves, never
//!   rounded probabilities.
//! - **Ordering** in plans is a stable counting sort: within an expert,
//!   slots appear in increasing slot id (token order, then choice order).
//! - **Row reductions** in gating (softmax denominators, log-sum-exp) use the
//!   *warp order*: lane `l` (of 32) accumulates, starting from `0.0`, the
//!   terms of the elements `e = l, l + 32, l + 64, ...` in increasing `e`;
//!   then for `s = 16, 8, 4, 2, 1` lane `l < s` becomes `lane[l] + lane[l + s]`;
//!   the sum is lane 0. This is the result of a 32-lane strided loop followed
//!   by a `shfl.xor` butterfly, so a one-warp-per-row kernel matches it bit
//!   for bit. Sums over the `k` picks are sequential in `j`.
//! - Exponentials are [`crate::math::exp`]; sigmoid, softplus and SiLU are the
//!   formulas of [`crate::math::act`]; nothing is contracted into fused
//!   multiply-adds.
//! - The layer's combine sums a token's `k` contributions in `j` order
//!   (no atomics, no order that depends on the expert schedule).
//!
//! # Limits
//!
//! Gating: `1 <= E <= `[`MAX_EXPERTS`] (any value, no power-of-two rule),
//! `1 <= k <= min(E, `[`MAX_K`]`)`, `n_group <= `[`MAX_GROUPS`]. Plans and
//! capacity take any `E <= u32::MAX` and any `k >= 1`. Bad parameters are
//! errors naming the parameter.

#[path = "aux_loss.rs"] // `aux.rs` is a reserved file name on Windows.
pub mod aux;
pub mod capacity;
pub mod gating;
pub mod layer;
pub mod plan;

use crate::element::Element;
use crate::error::{Error, ensure};
use crate::math::exp;

/// Most experts the gating functions accept (`E`, the router row length).
pub const MAX_EXPERTS: usize = 4096;
/// Most experts per token (`k`) the gating functions accept.
pub const MAX_K: usize = 32;
/// Most expert groups grouped routing accepts (`n_group`).
pub const MAX_GROUPS: usize = 256;
/// The expert id of an assignment routed nowhere (dropped by capacity or
/// mapped off this rank), and the expert id of unused blocks in a padded
/// plan. Read as `i32` it is `-1`, the value vLLM and DeepGEMM use.
pub const NO_EXPERT: u32 = u32::MAX;
/// A position (in a plan or an expert's capacity buffer) that does not exist:
/// the slot is non-local, dropped, or routed nowhere.
pub const NO_POSITION: u32 = u32::MAX;

/// The experts this rank holds: global ids `first..last`. A slot routed to
/// another expert belongs to another rank and contributes zero here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExpertRange {
    /// First local expert (inclusive).
    pub first: u32,
    /// End of the local experts (exclusive).
    pub last: u32,
}

impl ExpertRange {
    /// All experts `0..experts` (no expert parallelism).
    ///
    /// # Panics
    /// If `experts > u32::MAX`.
    pub fn all(experts: usize) -> Self {
        Self {
            first: 0,
            last: u32::try_from(experts).expect("experts fit u32"),
        }
    }

    /// Number of local experts `L = last - first` (0 if `last <= first`).
    pub fn len(&self) -> usize {
        self.last.saturating_sub(self.first) as usize
    }

    /// True if the range holds no expert.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The local index of global expert `e`, if `e` is local.
    #[inline]
    pub fn local(&self, e: u32) -> Option<usize> {
        if e >= self.first && e < self.last {
            Some((e - self.first) as usize)
        } else {
            None
        }
    }

    /// Checks `first <= last <= experts`.
    pub(crate) fn check(&self, experts: usize) -> Result<(), Error> {
        ensure(
            self.first <= self.last && self.last as usize <= experts,
            Error::OutOfRange {
                arg: "range",
                index: 0,
            },
        )
    }
}

/// Checks an expert count for plans and capacity: `1 <= experts <= u32::MAX`.
pub(crate) fn check_experts(experts: usize) -> Result<(), Error> {
    ensure(experts > 0, Error::Empty { arg: "experts" })?;
    ensure(
        experts <= u32::MAX as usize,
        Error::TooLarge {
            arg: "experts",
            index: 0,
            max: u32::MAX as usize,
            got: experts,
        },
    )
}

/// Checks that every id is below `experts` or is [`NO_EXPERT`].
pub(crate) fn check_ids(ids: &[u32], experts: usize) -> Result<(), Error> {
    for &e in ids {
        ensure(
            e == NO_EXPERT || (e as usize) < experts,
            Error::IndexOutOfBounds {
                arg: "ids",
                index: e as usize,
                bound: experts,
            },
        )?;
    }
    Ok(())
}

/// Checks that `slots` (a `T * k` count) fits `u32` slot ids with the
/// sentinel `T * k` itself representable.
pub(crate) fn check_slots(arg: &'static str, slots: usize) -> Result<(), Error> {
    ensure(
        slots <= u32::MAX as usize,
        Error::TooLarge {
            arg,
            index: 0,
            max: u32::MAX as usize,
            got: slots,
        },
    )
}

/// Lanes of the warp-order reduction.
pub(crate) const WARP: usize = 32;

/// The warp-order tree of 32 lane partial sums (see the module docs).
#[inline(always)]
pub(crate) fn warp_tree(mut a: [f32; WARP]) -> f32 {
    let mut s = WARP / 2;
    while s > 0 {
        for l in 0..s {
            a[l] += a[l + s];
        }
        s /= 2;
    }
    a[0]
}

/// `sum_e exp(x_e - m)` over a row in warp order.
#[inline]
pub(crate) fn warp_sum_exp<T: Element>(row: &[T], m: f32) -> f32 {
    let mut lanes = [0.0f32; WARP];
    let mut it = row.chunks_exact(WARP);
    for c in &mut it {
        for l in 0..WARP {
            lanes[l] += exp(c[l].to_f32() - m);
        }
    }
    for (l, v) in it.remainder().iter().enumerate() {
        lanes[l] += exp(v.to_f32() - m);
    }
    warp_tree(lanes)
}

/// A descending list of the best `cap <= N` (score, index) pairs, fed in
/// increasing index order: a later equal score never displaces an earlier
/// one, so ties go to the lower index. Insertion into a sorted buffer:
/// `O(n)` comparisons plus `O(cap)` moves per accepted candidate; no sort
/// of the input, no allocation.
#[derive(Clone, Copy)]
pub(crate) struct TopK<const N: usize> {
    pub(crate) val: [f32; N],
    pub(crate) idx: [u32; N],
    pub(crate) len: usize,
    cap: usize,
}

impl<const N: usize> TopK<N> {
    #[inline]
    pub(crate) fn new(cap: usize) -> Self {
        debug_assert!(cap >= 1 && cap <= N);
        Self {
            val: [0.0; N],
            idx: [0; N],
            len: 0,
            cap,
        }
    }

    /// Offers `(s, e)`; `s` must not be NaN.
    #[inline(always)]
    pub(crate) fn push(&mut self, s: f32, e: u32) {
        if self.len == self.cap {
            if !(s > self.val[self.len - 1]) {
                return;
            }
            self.len -= 1;
        }
        let mut p = self.len;
        while p > 0 && self.val[p - 1] < s {
            self.val[p] = self.val[p - 1];
            self.idx[p] = self.idx[p - 1];
            p -= 1;
        }
        self.val[p] = s;
        self.idx[p] = e;
        self.len += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_keeps_the_best_with_low_index_ties() {
        let xs = [1.0f32, 3.0, 3.0, -1.0, 3.0, 2.0, f32::NEG_INFINITY];
        let mut t = TopK::<4>::new(3);
        for (i, &x) in xs.iter().enumerate() {
            t.push(x, i as u32);
        }
        assert_eq!(&t.idx[..3], &[1, 2, 4]);
        let mut t = TopK::<8>::new(7);
        for (i, &x) in xs.iter().enumerate() {
            t.push(x, i as u32);
        }
        assert_eq!(&t.idx[..7], &[1, 2, 4, 5, 0, 3, 6]);
    }

    #[test]
    fn warp_tree_is_the_butterfly() {
        let mut a = [0.0f32; WARP];
        for (l, v) in a.iter_mut().enumerate() {
            *v = 1.0 + l as f32 * 1e-7;
        }
        // Reference butterfly: every lane ends with the same value.
        let mut b = a;
        for s in [16usize, 8, 4, 2, 1] {
            let c = b;
            for l in 0..WARP {
                b[l] = c[l] + c[l ^ s];
            }
        }
        assert_eq!(warp_tree(a).to_bits(), b[0].to_bits());
    }
}
