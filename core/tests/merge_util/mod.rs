//! Shared helpers of the merge test suites: deterministic data, random chunk
//! boundaries, f64 references of the shared pieces, tolerance checks.
#![allow(dead_code, unreachable_pub)]

use medley_core::merge::select::magnitude_key;

/// SplitMix64 stream.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// `n` values in [-scale, scale).
pub fn vec(seed: u64, n: usize, scale: f32) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n).map(|_| r.unit() * scale).collect()
}

/// A fine-tune-like model: base plus a small perturbation.
pub fn near(base: &[f32], seed: u64, scale: f32) -> Vec<f32> {
    let mut r = Rng(seed);
    base.iter().map(|&b| b + r.unit() * scale).collect()
}

/// Values on a coarse grid (many exact ties in magnitude).
pub fn grid(seed: u64, n: usize, levels: u32) -> Vec<f32> {
    let mut r = Rng(seed);
    (0..n)
        .map(|_| (r.below(2 * levels as usize + 1) as i64 - levels as i64) as f32 * 0.25)
        .collect()
}

/// Random increasing chunk boundaries covering `0..n` (first 0, last n),
/// with `parts` interior cuts (duplicates allowed: empty chunks).
pub fn cuts(seed: u64, n: usize, parts: usize) -> Vec<usize> {
    let mut r = Rng(seed);
    let mut c: Vec<usize> = (0..parts).map(|_| r.below(n + 1)).collect();
    c.push(0);
    c.push(n);
    c.sort();
    c
}

/// Boundaries aligned to multiples of `unit` (whole rows).
pub fn row_cuts(seed: u64, n: usize, unit: usize, parts: usize) -> Vec<usize> {
    let rows = n / unit;
    cuts(seed, rows, parts).into_iter().map(|c| c * unit).collect()
}

/// Reference top-k mask: the k largest keys, ties to the lower index.
pub fn topk_mask(v: &[f32], k: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| magnitude_key(v[b]).cmp(&magnitude_key(v[a])).then(a.cmp(&b)));
    let mut keep = vec![false; v.len()];
    for &i in &order[..k] {
        keep[i] = true;
    }
    keep
}

/// Reference ascending ranks (1 = smallest), equal magnitudes: lower index
/// ranks higher.
pub fn ranks(v: &[f32]) -> Vec<u32> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| magnitude_key(v[b]).cmp(&magnitude_key(v[a])).then(a.cmp(&b)));
    let mut r = vec![0u32; v.len()];
    for (pos, &i) in order.iter().enumerate() {
        r[i] = (v.len() - pos) as u32;
    }
    r
}

/// `floor(d * n)` as Python's `int(d * n)`.
pub fn count(d: f64, n: usize) -> usize {
    (d * n as f64) as usize
}

/// Asserts `got` is within `rtol * scale + atol` of `want` (per element),
/// with a message naming the element.
#[track_caller]
pub fn assert_close(got: &[f32], want: &[f64], scale: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len());
    for i in 0..got.len() {
        let (g, w) = (got[i] as f64, want[i]);
        if w.is_nan() {
            assert!(g.is_nan(), "element {i}: got {g}, want NaN");
            continue;
        }
        let tol = rtol * scale[i].abs().max(w.abs()) + atol;
        assert!((g - w).abs() <= tol, "element {i}: got {g}, want {w} (tol {tol})");
    }
}

/// Bitwise equality of two f32 slices (NaN == NaN by bits).
#[track_caller]
pub fn assert_bits(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for i in 0..a.len() {
        assert_eq!(
            a[i].to_bits(),
            b[i].to_bits(),
            "element {i}: {} vs {}",
            a[i],
            b[i]
        );
    }
}

pub const SENTINEL: f32 = 12345.0;
