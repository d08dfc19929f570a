//! Chunk-invariant sums: a sum over a tensor that is bit-identical however
//! the tensor is cut into chunks (the basis of every two-phase method).
//!
//! Element `p` (its global position in the stream) is added to lane
//! `p % LANES` of the current block; blocks are `BLOCK` elements aligned to
//! global positions. At each block end the 16 lanes are summed as a fixed
//! tree and added to a running total. Every addition therefore happens in an
//! order fixed by global positions alone, so any chunking (and any tile
//! size) gives the same bits, while the inner loop is 16 independent
//! accumulators that vectorize.
//!
//! Everything is `f64`: values are `f32` inputs (exact in `f64`) or products
//! of two `f32`s (also exact in `f64`), so the only rounding is in the
//! additions, about `1e-16` relative to the absolute mass. This accuracy is
//! needed: cosines near `±1` decide SLERP's lerp fallback and NuSLERP's
//! colinear case, and `acos` amplifies their errors near there (exactly
//! parallel one-element rows give exactly `±1`, as mergekit's normalized
//! vectors do).

/// Accumulator lanes.
pub(crate) const LANES: usize = 16;
/// Elements per block (a multiple of [`LANES`]).
pub(crate) const BLOCK: usize = 1024;

/// One chunk-invariant running sum.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sum {
    lanes: [f64; LANES],
    /// Values consumed so far (the global position of the next one).
    n: u64,
    total: f64,
}

#[inline(always)]
fn tree(l: &[f64; LANES]) -> f64 {
    let mut a = [0.0f64; 8];
    for j in 0..8 {
        a[j] = l[j] + l[j + 8];
    }
    let b = [a[0] + a[4], a[1] + a[5], a[2] + a[6], a[3] + a[7]];
    (b[0] + b[2]) + (b[1] + b[3])
}

impl Sum {
    pub(crate) const ZERO: Sum = Sum {
        lanes: [0.0; LANES],
        n: 0,
        total: 0.0,
    };

    /// Adds `f(0), f(1), ..., f(len - 1)`; `f(i)` has global position
    /// `self.n + i`.
    #[inline(always)]
    fn push_by<F: Fn(usize) -> f64>(&mut self, len: usize, f: F) {
        let mut i = 0;
        while i < len {
            let pos = (self.n % BLOCK as u64) as usize;
            let take = (BLOCK - pos).min(len - i);
            let end = i + take;
            let mut lane = pos % LANES;
            // Unaligned start: scalar until the lane index wraps.
            while lane != 0 && i < end {
                self.lanes[lane] += f(i);
                i += 1;
                lane = (lane + 1) % LANES;
            }
            while i + LANES <= end {
                for (j, l) in self.lanes.iter_mut().enumerate() {
                    *l += f(i + j);
                }
                i += LANES;
            }
            let mut j = 0;
            while i < end {
                self.lanes[j] += f(i);
                i += 1;
                j += 1;
            }
            self.n += take as u64;
            if self.n.is_multiple_of(BLOCK as u64) {
                self.total += tree(&self.lanes);
                self.lanes = [0.0; LANES];
            }
        }
    }

    /// Adds `t` (widened to `f64`).
    #[inline]
    pub(crate) fn push(&mut self, t: &[f32]) {
        self.push_by(t.len(), |i| t[i] as f64);
    }

    /// Adds the exact products `a[i] * b[i]` (equal lengths).
    #[inline]
    pub(crate) fn push_prod(&mut self, a: &[f32], b: &[f32]) {
        let n = a.len().min(b.len());
        let (a, b) = (&a[..n], &b[..n]);
        self.push_by(n, |i| a[i] as f64 * b[i] as f64);
    }

    /// The sum so far.
    #[inline]
    pub(crate) fn value(&self) -> f64 {
        self.total + tree(&self.lanes)
    }
}

/// Most models of a Gram-matrix statistic (multi-SLERP, Karcher, Model Stock).
pub(crate) const GRAM_MAX: usize = 16;
const GRAM_LEN: usize = GRAM_MAX * (GRAM_MAX + 1) / 2;
/// Elements per tile of [`Gram::push_rows`].
pub(crate) const GRAM_TILE: usize = 256;

/// Chunk-invariant dot products `G_ij = sum_p v_i[p] v_j[p]` for `i <= j`
/// over `m <= GRAM_MAX` vectors fed tile by tile.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Gram {
    m: usize,
    sums: [Sum; GRAM_LEN],
}

#[inline(always)]
fn pair(i: usize, j: usize) -> usize {
    let (i, j) = if i <= j { (i, j) } else { (j, i) };
    j * (j + 1) / 2 + i
}

impl Gram {
    pub(crate) fn new(m: usize) -> Self {
        debug_assert!(m <= GRAM_MAX);
        Self {
            m,
            sums: [Sum::ZERO; GRAM_LEN],
        }
    }

    /// Adds one tile: `rows[i][..len]` are vector `i`'s next `len` values.
    #[inline]
    pub(crate) fn push_rows(&mut self, rows: &[[f32; GRAM_TILE]], len: usize) {
        for j in 0..self.m {
            for i in 0..=j {
                self.sums[pair(i, j)].push_prod(&rows[i][..len], &rows[j][..len]);
            }
        }
    }

    /// `G_ij` (symmetric).
    #[inline]
    pub(crate) fn get(&self, i: usize, j: usize) -> f64 {
        self.sums[pair(i, j)].value()
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec::Vec;

    #[test]
    fn any_chunking_gives_the_same_bits() {
        let n = 10_007;
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 7919) % 1000) as f32 * 1.37e-3 - 0.6)
            .collect();
        let mut one = Sum::ZERO;
        one.push(&v);
        let want: f64 = v.iter().map(|&x| x as f64).sum();
        assert!((one.value() - want).abs() < 1e-12 * n as f64);
        for step in [1usize, 3, 15, 16, 17, 1000, 1024, 1025, 4099] {
            let mut s = Sum::ZERO;
            for c in v.chunks(step) {
                s.push(c);
            }
            assert_eq!(s.value().to_bits(), one.value().to_bits(), "step {step}");
        }
    }
}
