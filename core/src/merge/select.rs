//! Exact top-k selection by magnitude in O(n), without allocation and
//! without sorting: a radix select over the bits of `|x|`.
//!
//! # The selection rule
//!
//! Elements are ranked by magnitude, largest first; among equal magnitudes
//! the **lower index ranks higher**. The top `k` of that total order are
//! kept, so exactly `k` elements survive whatever the ties. The magnitude
//! of `x` is compared through its *key* `x.to_bits() & 0x7fff_ffff`
//! ([`magnitude_key`]): for non-NaN values the key order is the order of
//! `|x|` (`-0.0` and `0.0` are equal), and a NaN ranks above `+inf`, so a
//! NaN in a task vector is kept and propagates into the merge rather than
//! vanishing silently.
//!
//! The result is a [`Threshold`] `(key, cutoff)`: element `i` is kept iff
//! `key_i > key`, or `key_i == key` and `i < cutoff`. A threshold is two
//! numbers, so applying it is an element-wise test that any chunk, thread or
//! GPU kernel evaluates on its own.
//!
//! # Passes
//!
//! [`TopK`] is a state machine fed the tensor in chunks, in order, once per
//! pass. A pass histograms one radix digit of the keys of the elements whose
//! higher digits match the prefix found so far; digits are bits 30..20 (2048
//! bins), 19..10 and 9..0 (1024 bins each). After the third pass the k-th
//! key `T` is known exactly, together with how many elements equal to `T`
//! must be kept. If that is all of them the selection is done; otherwise a
//! fourth pass finds the index of the last equal element to keep. So a
//! selection takes **at most 4 passes** (3 when the k-th magnitude is not
//! tied, fewer when a bucket boundary falls exactly at `k`, none when
//! `k == 0` or `k == n`). The histogram lives in a caller buffer of
//! [`HIST_LEN`] `u32`s so that many selections can share one pass; the state
//! itself is a small `Copy` struct.
//!
//! ```
//! use medley_core::merge::select::{top_k, magnitude_key};
//! let x = [0.5f32, -2.0, 1.0, 2.0, -0.25, 1.0];
//! let t = top_k(&x, 3).unwrap();
//! let kept: Vec<usize> = (0..x.len()).filter(|&i| t.keeps(i as u64, x[i])).collect();
//! // |-2.0| and |2.0| first, then the first of the two 1.0s.
//! assert_eq!(kept, [1, 2, 3]);
//! assert!(t.keeps_key(2, magnitude_key(1.0)));
//! ```

use crate::element::Element;
use crate::error::{Error, ensure};

/// Length of the histogram buffer one [`TopK`] needs.
pub const HIST_LEN: usize = 2048;

/// Most elements a selection handles (the histogram counts are `u32`).
pub const MAX_LEN: u64 = u32::MAX as u64;

/// Bit shift and width of each radix digit, most significant first.
const DIGITS: [(u32, u32); 3] = [(20, 11), (10, 10), (0, 10)];
/// Pass number of the tie pass, and of the finished state.
const TIE_PASS: u8 = 3;
const DONE: u8 = 4;

/// The ranking key of `x`: its bits without the sign. Ordered like `|x|`
/// for non-NaN values; NaN keys are above `+inf`'s.
#[inline(always)]
pub fn magnitude_key(x: f32) -> u32 {
    x.to_bits() & 0x7fff_ffff
}

/// The outcome of a selection: element `i` with key `k_i` is kept iff
/// `k_i > key`, or `k_i == key` and `i < cutoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Threshold {
    key: u32,
    cutoff: u64,
}

impl Threshold {
    /// Keeps nothing (`k = 0`).
    pub const NONE: Threshold = Threshold {
        key: u32::MAX,
        cutoff: 0,
    };
    /// Keeps everything (`k = n`).
    pub const ALL: Threshold = Threshold {
        key: 0,
        cutoff: u64::MAX,
    };

    /// The key of the k-th ranked element (`u32::MAX` for [`Threshold::NONE`]).
    pub fn key(&self) -> u32 {
        self.key
    }

    /// Elements whose key equals [`key`](Self::key) are kept iff their
    /// index is below this (`u64::MAX` when all of them are kept).
    pub fn cutoff(&self) -> u64 {
        self.cutoff
    }

    /// Whether the element at global `index` with key `key` is kept.
    #[inline(always)]
    pub fn keeps_key(&self, index: u64, key: u32) -> bool {
        key > self.key || (key == self.key && index < self.cutoff)
    }

    /// Whether the element at global `index` with value `x` is kept.
    #[inline(always)]
    pub fn keeps(&self, index: u64, x: f32) -> bool {
        self.keeps_key(index, magnitude_key(x))
    }
}

/// Radix-select state for keeping the `k` largest magnitudes of `n` values
/// (see the module documentation for the rule and the passes).
///
/// Protocol: while [`is_done`](Self::is_done) is false, feed every element
/// once, in order, through [`feed`](Self::feed) (any chunk sizes), then call
/// [`end_pass`](Self::end_pass). Then [`threshold`](Self::threshold) is the
/// answer. The histogram buffer passed to `feed` and `end_pass` must be the
/// same one throughout a pass and must not be touched in between; it is
/// cleared by the first `feed` of each pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TopK {
    n: u64,
    k: u64,
    pass: u8,
    /// Digits fixed so far, in place.
    prefix: u32,
    /// Elements still to take among those whose key matches `prefix`.
    need: u64,
    /// Elements fed in this pass.
    fed: u64,
    /// Tie pass: equal keys seen so far.
    eq_seen: u64,
    result: Threshold,
}

impl TopK {
    /// A selection of the `k` largest magnitudes among `n` values.
    ///
    /// Errors: [`Error::OutOfRange`] (`k`) if `k > n`; [`Error::TooLarge`]
    /// (`n`) if `n` exceeds [`MAX_LEN`].
    pub fn new(n: u64, k: u64) -> Result<Self, Error> {
        ensure(
            n <= MAX_LEN,
            Error::TooLarge {
                arg: "n",
                index: 0,
                max: MAX_LEN as usize,
                got: n.min(usize::MAX as u64) as usize,
            },
        )?;
        ensure(k <= n, Error::OutOfRange { arg: "k", index: 0 })?;
        let (pass, result) = if k == 0 {
            (DONE, Threshold::NONE)
        } else if k == n {
            (DONE, Threshold::ALL)
        } else {
            (0, Threshold::NONE)
        };
        Ok(Self {
            n,
            k,
            pass,
            prefix: 0,
            need: k,
            fed: 0,
            eq_seen: 0,
            result,
        })
    }

    /// Number of values.
    pub fn n(&self) -> u64 {
        self.n
    }

    /// Number of values kept.
    pub fn k(&self) -> u64 {
        self.k
    }

    /// True once the threshold is known.
    pub fn is_done(&self) -> bool {
        self.pass == DONE
    }

    /// The threshold, once [`is_done`](Self::is_done).
    pub fn threshold(&self) -> Option<Threshold> {
        self.is_done().then_some(self.result)
    }

    /// Values fed so far in the current pass.
    pub fn fed(&self) -> u64 {
        self.fed
    }

    /// Feeds the next `values` of the current pass (their global indices
    /// continue from [`fed`](Self::fed)). Does nothing once done.
    ///
    /// Errors: [`Error::BufferTooShort`] (`hist`) if `hist` is shorter than
    /// [`HIST_LEN`]; [`Error::TooLarge`] (`values`) if the pass would exceed
    /// `n` values. Nothing changes on error.
    pub fn feed(&mut self, values: &[f32], hist: &mut [u32]) -> Result<(), Error> {
        if self.pass == DONE {
            return Ok(());
        }
        let hist = hist_of(hist)?;
        let len = values.len() as u64;
        ensure(
            self.fed + len <= self.n,
            Error::TooLarge {
                arg: "values",
                index: 0,
                max: (self.n - self.fed) as usize,
                got: values.len(),
            },
        )?;
        self.feed_unchecked(values, hist);
        Ok(())
    }

    /// [`feed`](Self::feed) after validation (shared by the merge methods,
    /// which validate once per chunk).
    #[inline]
    pub(crate) fn feed_unchecked(&mut self, values: &[f32], hist: &mut [u32; HIST_LEN]) {
        if self.pass == DONE {
            return;
        }
        if self.fed == 0 && self.pass < TIE_PASS {
            hist.fill(0);
        }
        match self.pass {
            0 => {
                for &v in values {
                    let key = magnitude_key(v);
                    hist[(key >> 20) as usize] += 1;
                }
            }
            1 => {
                let hi = self.prefix >> 20;
                for &v in values {
                    let key = magnitude_key(v);
                    if key >> 20 == hi {
                        hist[((key >> 10) & 0x3ff) as usize] += 1;
                    }
                }
            }
            2 => {
                let hi = self.prefix >> 10;
                for &v in values {
                    let key = magnitude_key(v);
                    if key >> 10 == hi {
                        hist[(key & 0x3ff) as usize] += 1;
                    }
                }
            }
            _ => {
                // Tie pass: find the index of the need-th element equal to
                // the threshold key.
                if self.eq_seen < self.need {
                    let t = self.prefix;
                    for (i, &v) in values.iter().enumerate() {
                        if magnitude_key(v) == t {
                            self.eq_seen += 1;
                            if self.eq_seen == self.need {
                                self.result = Threshold {
                                    key: t,
                                    cutoff: self.fed + i as u64 + 1,
                                };
                                break;
                            }
                        }
                    }
                }
            }
        }
        self.fed += values.len() as u64;
    }

    /// Ends the current pass. Does nothing once done.
    ///
    /// Errors: [`Error::BufferTooShort`] (`hist`); [`Error::LengthMismatch`]
    /// (`values`) if the pass was not fed exactly `n` values (nothing changes
    /// then; the pass can be completed and ended again).
    pub fn end_pass(&mut self, hist: &mut [u32]) -> Result<(), Error> {
        if self.pass == DONE {
            return Ok(());
        }
        let hist = hist_of(hist)?;
        ensure(
            self.fed == self.n,
            Error::LengthMismatch {
                arg: "values",
                index: 0,
                expected: self.n as usize,
                got: self.fed as usize,
            },
        )?;
        self.end_pass_unchecked(hist);
        Ok(())
    }

    pub(crate) fn end_pass_unchecked(&mut self, hist: &mut [u32; HIST_LEN]) {
        if self.pass == DONE {
            return;
        }
        self.fed = 0;
        if self.pass == TIE_PASS {
            // The tie pass always finds its element (need <= equal count).
            self.pass = DONE;
            return;
        }
        let (shift, width) = DIGITS[self.pass as usize];
        let mut above = 0u64;
        let mut bin = 0usize;
        for b in (0..1usize << width).rev() {
            let c = hist[b] as u64;
            if above + c >= self.need {
                bin = b;
                break;
            }
            above += c;
        }
        self.need -= above;
        self.prefix |= (bin as u32) << shift;
        let in_bin = hist[bin] as u64;
        if in_bin == self.need {
            // Every key of this bucket is kept: keep keys >= its lowest key.
            self.result = Threshold {
                key: self.prefix,
                cutoff: u64::MAX,
            };
            self.pass = DONE;
        } else if self.pass == 2 {
            // prefix is the exact k-th key; some of its equals are dropped.
            self.pass = TIE_PASS;
            self.eq_seen = 0;
        } else {
            self.pass += 1;
        }
    }
}

/// Checks the histogram length and views it as an array.
#[inline]
pub(crate) fn hist_of(hist: &mut [u32]) -> Result<&mut [u32; HIST_LEN], Error> {
    let got = hist.len();
    hist.get_mut(..HIST_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(Error::BufferTooShort {
            arg: "hist",
            needed: HIST_LEN,
            got,
        })
}

/// Tile size of the one-shot selection's conversion buffer.
const TILE: usize = 2048;

/// One-shot selection of the `k` largest magnitudes of `values` (exactly
/// `k` kept, ties to the lower index; see the module documentation).
/// Reads `values` at most 4 times; the histogram lives on the stack.
///
/// Errors: as [`TopK::new`] with `n = values.len()`.
pub fn top_k<T: Element>(values: &[T], k: usize) -> Result<Threshold, Error> {
    let mut sel = TopK::new(values.len() as u64, k as u64)?;
    let mut hist = [0u32; HIST_LEN];
    let mut buf = [0.0f32; TILE];
    while !sel.is_done() {
        for c in values.chunks(TILE) {
            let t = crate::merge::as_f32(c, &mut buf);
            sel.feed_unchecked(t, &mut hist);
        }
        sel.end_pass_unchecked(&mut hist);
    }
    Ok(sel.result)
}

/// `floor(fraction * n)` computed in `f64`, as Python's `int(d * n)` does
/// (so `k` agrees with mergekit for the same `fraction`). `fraction` must be
/// finite and in `[0, 1]`.
#[inline]
pub fn count_of(fraction: f64, n: usize) -> usize {
    let v = fraction * n as f64;
    // Truncation toward zero: `as` saturates and truncates.
    (v as u64).min(n as u64) as usize
}

/// Stable ascending ranks by key within one row, ties broken so that the
/// **lower index ranks higher** (consistent with [`TopK`]): writes
/// `rank[j]` in `1..=len` (1 = smallest magnitude). An LSD radix sort of the
/// 31-bit keys in 3 passes (11, 10, 10 bits): O(len), no comparison sort.
///
/// `keys`, `idx`, `keys2`, `idx2` and `rank` all have the row's length;
/// `hist` has [`HIST_LEN`] entries. `keys` is clobbered.
pub(crate) fn ranks_ascending(
    keys: &mut [u32],
    idx: &mut [u32],
    keys2: &mut [u32],
    idx2: &mut [u32],
    rank: &mut [u32],
    hist: &mut [u32; HIST_LEN],
) {
    let len = keys.len();
    // Start from descending index order, so that a stable ascending sort
    // puts equal keys with lower indices later (higher rank).
    for (j, v) in idx.iter_mut().enumerate() {
        *v = (len - 1 - j) as u32;
    }
    // keys is in index order; permute it to descending index order.
    keys.reverse();
    let mut src_is_first = true;
    for &(shift, width) in DIGITS.iter().rev() {
        let mask = (1u32 << width) - 1;
        let bins = 1usize << width;
        let (sk, si, dk, di) = if src_is_first {
            (&*keys, &*idx, &mut *keys2, &mut *idx2)
        } else {
            (&*keys2, &*idx2, &mut *keys, &mut *idx)
        };
        let h = &mut hist[..bins];
        h.fill(0);
        for &k in sk.iter() {
            h[((k >> shift) & mask) as usize] += 1;
        }
        let mut start = 0u32;
        for c in h.iter_mut() {
            let n = *c;
            *c = start;
            start += n;
        }
        for (&k, &i) in sk.iter().zip(si.iter()) {
            let b = ((k >> shift) & mask) as usize;
            let p = h[b] as usize;
            h[b] += 1;
            dk[p] = k;
            di[p] = i;
        }
        src_is_first = !src_is_first;
    }
    // Three passes: the sorted order ends in the second buffers.
    let order = if src_is_first { &*idx } else { &*idx2 };
    for (pos, &i) in order.iter().enumerate() {
        rank[i as usize] = pos as u32 + 1;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    fn naive(values: &[f32], k: usize) -> Vec<bool> {
        let mut order: Vec<usize> = (0..values.len()).collect();
        order.sort_by(|&a, &b| {
            magnitude_key(values[b])
                .cmp(&magnitude_key(values[a]))
                .then(a.cmp(&b))
        });
        let mut keep = std::vec![false; values.len()];
        for &i in &order[..k] {
            keep[i] = true;
        }
        keep
    }

    #[test]
    fn matches_sorted_reference_with_ties() {
        let vals: Vec<f32> = (0..3000).map(|i| ((i * 37) % 23) as f32 * 0.5 - 5.0).collect();
        for k in [0, 1, 2, 5, 130, 1499, 1500, 2999, 3000] {
            let t = top_k(&vals, k).unwrap();
            let want = naive(&vals, k);
            for (i, &w) in want.iter().enumerate() {
                assert_eq!(t.keeps(i as u64, vals[i]), w, "k {k} i {i}");
            }
        }
    }

    #[test]
    fn ranks_are_a_permutation_with_index_tiebreak() {
        let vals: Vec<f32> = (0..777).map(|i| ((i * 13) % 17) as f32 - 8.0).collect();
        let len = vals.len();
        let mut keys: Vec<u32> = vals.iter().map(|&v| magnitude_key(v)).collect();
        let (mut idx, mut k2, mut i2, mut rank) = (
            std::vec![0u32; len],
            std::vec![0u32; len],
            std::vec![0u32; len],
            std::vec![0u32; len],
        );
        let mut hist = [0u32; HIST_LEN];
        ranks_ascending(&mut keys, &mut idx, &mut k2, &mut i2, &mut rank, &mut hist);
        // Descending rank order = top-k order.
        let mut order: Vec<usize> = (0..len).collect();
        order.sort_by(|&a, &b| {
            magnitude_key(vals[b])
                .cmp(&magnitude_key(vals[a]))
                .then(a.cmp(&b))
        });
        for (pos, &i) in order.iter().enumerate() {
            assert_eq!(rank[i] as usize, len - pos);
        }
    }
}
