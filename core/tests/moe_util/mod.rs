//! Naive references and generators for the MoE tests: written from the
//! formulas in the module docs, full sorts and f64, no attempt at speed.
#![allow(dead_code, unreachable_pub)]

use medley_core::{bf16, f16};

/// SplitMix64 driven by a proptest-chosen seed.
pub struct Gen(pub u64);

impl Gen {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    /// A router logit: quantized to 1/8 with probability `p_tie` (ties are
    /// common), `-inf` with probability `p_mask`, else uniform in [-s, s].
    pub fn logit(&mut self, s: f64, p_tie: f64, p_mask: f64) -> f32 {
        if self.chance(p_mask) {
            return f32::NEG_INFINITY;
        }
        if self.chance(p_tie) {
            return (self.below(17) as f32 - 8.0) / 8.0;
        }
        self.range(-s, s) as f32
    }
}

/// Values as one of the three element types, and back (exactly).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dt {
    F32,
    F16,
    Bf16,
}

impl Dt {
    pub fn pick(g: &mut Gen) -> Dt {
        [Dt::F32, Dt::F16, Dt::Bf16][g.below(3)]
    }
    /// Rounds `x` through the type (what the core will read).
    pub fn round(self, x: f32) -> f32 {
        match self {
            Dt::F32 => x,
            Dt::F16 => f16::from_f32(x).to_f32(),
            Dt::Bf16 => bf16::from_f32(x).to_f32(),
        }
    }
}

/// Indices of the `k` largest `scores` among `eligible`, descending, ties
/// to the lower index: a full stable sort.
pub fn ref_topk(scores: &[f32], k: usize, eligible: impl Fn(usize) -> bool) -> Vec<u32> {
    let mut idx: Vec<usize> = (0..scores.len()).filter(|&e| eligible(e)).collect();
    idx.sort_by(|&a, &b| scores[b].partial_cmp(&scores[a]).unwrap().then(a.cmp(&b)));
    idx.truncate(k);
    idx.into_iter().map(|e| e as u32).collect()
}

/// Softmax in f64 with the documented edge cases (all -inf: zeros; +inf:
/// uniform over the +inf entries).
pub fn softmax64(x: &[f32]) -> Vec<f64> {
    let n_inf = x.iter().filter(|&&v| v == f32::INFINITY).count();
    if n_inf > 0 {
        return x
            .iter()
            .map(|&v| {
                if v == f32::INFINITY {
                    1.0 / n_inf as f64
                } else {
                    0.0
                }
            })
            .collect();
    }
    let m = x.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
    if m == f64::NEG_INFINITY {
        return vec![0.0; x.len()];
    }
    let e: Vec<f64> = x.iter().map(|&v| (v as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

pub fn logsumexp64(x: &[f32]) -> f64 {
    let m = x.iter().fold(f64::NEG_INFINITY, |a, &v| a.max(v as f64));
    if m.is_infinite() {
        return m;
    }
    m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln()
}

pub fn sigmoid64(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn silu64(x: f64) -> f64 {
    x * sigmoid64(x)
}

pub fn softplus64(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

/// erfc in f64: series below 2, continued fraction above.
pub fn erfc64(x: f64) -> f64 {
    if x < 0.0 {
        return 2.0 - erfc64(-x);
    }
    if x < 2.0 {
        let (mut term, mut sum) = (x, x);
        for n in 1..200 {
            let n = n as f64;
            term *= -x * x / n;
            sum += term / (2.0 * n + 1.0);
        }
        return 1.0 - sum * 2.0 / std::f64::consts::PI.sqrt();
    }
    let mut f = x;
    for n in (1..400).rev() {
        f = x + (n as f64 / 2.0) / f;
    }
    (-x * x).exp() / std::f64::consts::PI.sqrt() / f
}

pub fn phi64(x: f64) -> f64 {
    if x == f64::INFINITY {
        return 1.0;
    }
    if x == f64::NEG_INFINITY {
        return 0.0;
    }
    0.5 * erfc64(-x / std::f64::consts::SQRT_2)
}

/// Asserts `|a - b| <= tol * max(1, |b|)`.
#[track_caller]
pub fn close(a: f64, b: f64, tol: f64, what: &str) {
    if a.is_nan() || b.is_nan() {
        assert!(a.is_nan() && b.is_nan(), "{what}: {a} vs {b}");
        return;
    }
    if a == b {
        return;
    }
    assert!((a - b).abs() <= tol * b.abs().max(1.0), "{what}: {a} vs {b}");
}
