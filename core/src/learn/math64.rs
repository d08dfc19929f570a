//! `f64` exponential and logarithm for the fitters: `no_std` has none, and
//! the fitters compare log-likelihoods across iterations, so they need more
//! than `f32`'s seven digits. Scalar, not vectorized (fitting is offline);
//! within a few ulp of `std` (see the tests).

// Published coefficient tables keep their printed digits.
#![allow(clippy::excessive_precision)]

/// 1.5 * 2^52: adding and subtracting it rounds to the nearest integer.
const ROUND_MAGIC: f64 = 6_755_399_441_055_744.0;
/// ln(2) split so that `n * LN2_HI` is exact for |n| < 2^11 (fdlibm).
const LN2_HI: f64 = 6.931_471_803_691_238_164_90e-1;
const LN2_LO: f64 = 1.908_214_929_270_587_700_02e-10;
/// Largest x with finite exp(x).
const EXP_HI: f64 = 709.782_712_893_384;
/// ln of the smallest normal f64: below it the result is flushed to 0.
const EXP_LO: f64 = -708.396_418_532_264_1;

/// `1 / k!` for `k = 0..=13`.
const INV_FACT: [f64; 14] = {
    let mut t = [1.0f64; 14];
    let mut k = 1;
    while k < 14 {
        t[k] = t[k - 1] / k as f64;
        k += 1;
    }
    t
};

/// e^x. `exp64(-inf) = 0`, results below the smallest normal are 0, `+inf`
/// beyond 709.78, NaN in, NaN out.
#[inline]
pub(crate) fn exp64(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    if x > EXP_HI {
        return f64::INFINITY;
    }
    if x < EXP_LO {
        return 0.0;
    }
    let nf = (x * core::f64::consts::LOG2_E + ROUND_MAGIC) - ROUND_MAGIC;
    let n = nf as i64; // in [-1022, 1024]
    let r = (x - nf * LN2_HI) - nf * LN2_LO; // |r| <= 0.35
    // Degree-13 Taylor polynomial: the remainder is below 4e-18 for |r| <= 0.35.
    let mut p = INV_FACT[13];
    let mut k = 13;
    while k > 0 {
        k -= 1;
        p = p * r + INV_FACT[k];
    }
    // 2^n as two representable factors (n = 1024 at the top of the range).
    let h = n >> 1;
    let s1 = f64::from_bits(((h + 1023) as u64) << 52);
    let s2 = f64::from_bits(((n - h + 1023) as u64) << 52);
    p * s1 * s2
}

/// Natural logarithm. `ln64(0) = -inf`, `ln64(x < 0) = NaN`,
/// `ln64(inf) = inf`, subnormal inputs handled.
#[inline]
pub(crate) fn ln64(x: f64) -> f64 {
    if !(x > 0.0) {
        return if x == 0.0 { f64::NEG_INFINITY } else { f64::NAN };
    }
    if x == f64::INFINITY {
        return x;
    }
    let (xs, adj) = if x < f64::MIN_POSITIVE {
        (x * 18_014_398_509_481_984.0, -54) // 2^54
    } else {
        (x, 0)
    };
    let bits = xs.to_bits();
    let mut e = ((bits >> 52) & 0x7ff) as i64 - 1023 + adj;
    // Mantissa in [1, 2), then in [sqrt(1/2), sqrt(2)).
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000);
    if m > core::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1;
    }
    // ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716.
    let f = m - 1.0;
    let s = f / (2.0 + f);
    let z = s * s;
    // atanh(s) / s = sum_k z^k / (2k + 1); through k = 11 the remainder is
    // below 1e-17 for z <= 0.0295.
    let mut p = 1.0 / 23.0;
    let mut k = 11;
    while k > 0 {
        k -= 1;
        p = p * z + 1.0 / (2 * k + 1) as f64;
    }
    let ef = e as f64;
    ef * LN2_HI + (2.0 * s * p + ef * LN2_LO)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn ulps(a: f64, b: f64) -> u64 {
        if a == b {
            return 0;
        }
        (a.to_bits() as i64).abs_diff(b.to_bits() as i64)
    }

    fn samples() -> impl Iterator<Item = f64> {
        (0..400_000u64).map(|i| f64::from_bits(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
    }

    #[test]
    fn exp64_matches_std() {
        for x in samples().chain((-7500..7500).map(|i| i as f64 * 0.0947)) {
            let (got, want) = (exp64(x), x.exp());
            if x.is_nan() {
                assert!(got.is_nan());
            } else if want < f64::MIN_POSITIVE {
                assert!(
                    got == 0.0 || ulps(got, want) <= 2,
                    "exp64({x}) = {got}, want {want}"
                );
            } else {
                assert!(ulps(got, want) <= 2, "exp64({x}) = {got}, want {want}");
            }
        }
        assert_eq!(exp64(0.0), 1.0);
        assert_eq!(exp64(f64::NEG_INFINITY), 0.0);
        assert_eq!(exp64(f64::INFINITY), f64::INFINITY);
        assert_eq!(exp64(710.0), f64::INFINITY);
    }

    #[test]
    fn ln64_matches_std() {
        for x in samples().chain((1..20000).map(|i| i as f64 * 1e-4)) {
            let (got, want) = (ln64(x), x.ln());
            if x.is_nan() || x < 0.0 {
                assert!(got.is_nan(), "ln64({x}) = {got}");
            } else if want.abs() < 1e-3 {
                // Near 1: relative error.
                assert!(
                    (got - want).abs() <= 4.0 * f64::EPSILON * want.abs(),
                    "ln64({x}) = {got}, want {want}"
                );
            } else {
                assert!(ulps(got, want) <= 2, "ln64({x}) = {got}, want {want}");
            }
        }
        assert_eq!(ln64(1.0), 0.0);
        assert_eq!(ln64(0.0), f64::NEG_INFINITY);
        assert_eq!(ln64(f64::INFINITY), f64::INFINITY);
        assert!(ln64(-1.0).is_nan());
    }
}
