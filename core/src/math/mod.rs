//! Scalar transcendental functions for `no_std`, written to vectorize.
//!
//! `core` has no `exp` or `ln` for floats without `std`, so the crate carries
//! its own. Each function is branch-free (edge cases are selects), so a loop
//! over a slice that calls it compiles to SIMD code. Accuracy is checked
//! against `std` over dense samples of the whole range in the tests.
//!
//! | function | max error (measured, see tests) | edge cases |
//! |---|---|---|
//! | [`exp`] | 2 ulp | `exp(-inf) = 0`, `exp(x) = 0` for `x < -87.33654` (no subnormal results), `+inf` for `x > 88.72`, NaN in, NaN out |
//! | [`ln`] | 2 ulp | `ln(0) = -inf`, `ln(x < 0) = NaN`, `ln(inf) = inf`, subnormal inputs exact |
//! | [`sqrt`], [`sqrt_f64`] | 1 ulp | `sqrt(±0) = ±0`, `sqrt(x < 0) = NaN`, `sqrt(inf) = inf` |

// Published coefficient tables keep their printed digits.
#![allow(clippy::excessive_precision)]

pub mod act;
pub mod trig;

/// log2(e).
pub const LOG2E: f32 = core::f32::consts::LOG2_E;
/// Magic constant 1.5 * 2^23: adding and subtracting it rounds to nearest
/// integer (ties to even) for |v| < 2^22.
const ROUND_MAGIC: f32 = 12_582_912.0;
/// ln(2) split so that `n * LN2_HI` is exact for |n| < 2^9 (Cody and Waite).
const LN2_HI: f32 = 0.693_359_375;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Largest x with finite exp(x).
const EXP_HI: f32 = 88.722_83;
/// The smallest f32 whose exp is a normal f32 (ln of the smallest normal is
/// -87.3365447). Below it the result is flushed to 0; arguments are clamped
/// here first so that no intermediate is subnormal (subnormal arithmetic
/// stalls x86 cores).
const EXP_LO: f32 = -87.336_54;

/// e^x for `f32` (see the module table for accuracy and edge cases).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let xc = x.clamp_fast(EXP_LO, EXP_HI);
    let t = xc * LOG2E + ROUND_MAGIC;
    let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let nf = t - ROUND_MAGIC;
    let r = xc - nf * LN2_HI - nf * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * r2 + r + 1.0;
    // n is in [-126, 128]: split 2^n into two representable factors.
    let h = n >> 1;
    let s1 = f32::from_bits(((h + 127) as u32) << 23);
    let s2 = f32::from_bits(((n - h + 127) as u32) << 23);
    let v = y * s1 * s2;
    let v = if x < EXP_LO { 0.0 } else { v };
    let v = if x > EXP_HI { f32::INFINITY } else { v };
    if x.is_nan() { x } else { v }
}

/// e^x for `x <= 0` or `x = -inf` (NaN and positive inputs are the caller's
/// responsibility): the hot-loop form of [`exp`] without the overflow and NaN
/// selects and with a single scale factor. Same accuracy; results below
/// about 1.2e-38 are 0.
#[inline(always)]
pub(crate) fn exp_nonpos(x: f32) -> f32 {
    let xc = if x > EXP_LO { x } else { EXP_LO };
    let t = xc * LOG2E + ROUND_MAGIC;
    let n = (t.to_bits() as i32).wrapping_sub(0x4B40_0000); // in [-126, 0]
    let nf = t - ROUND_MAGIC;
    let r = xc - nf * LN2_HI - nf * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5.000_000_1e-1;
    let y = p * r2 + r + 1.0;
    let v = y * f32::from_bits(((n + 127) as u32) << 23);
    if x < EXP_LO { 0.0 } else { v }
}

/// Natural logarithm of a positive, normal, finite `x` (no edge handling):
/// the hot-loop form of [`ln`], same accuracy on that domain.
#[inline(always)]
pub(crate) fn ln_pos(x: f32) -> f32 {
    let bits = x.to_bits();
    let e = ((bits >> 23) & 0xff) as i32 - 126;
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let small = m < core::f32::consts::FRAC_1_SQRT_2;
    let e = if small { e - 1 } else { e };
    let m = if small { m + m - 1.0 } else { m - 1.0 };
    ln_poly(m, e as f32)
}

/// `ln((1 + m) * 2^e)` for `m` in `[sqrt(1/2) - 1, sqrt(2) - 1)` (Cephes
/// `logf` polynomial).
#[inline(always)]
fn ln_poly(m: f32, ef: f32) -> f32 {
    let z = m * m;
    let mut p = 7.037_683_6e-2_f32;
    p = p * m - 1.151_461e-1;
    p = p * m + 1.167_699_9e-1;
    p = p * m - 1.242_014_1e-1;
    p = p * m + 1.424_932_3e-1;
    p = p * m - 1.666_805_8e-1;
    p = p * m + 2.000_071_4e-1;
    p = p * m - 2.499_999_4e-1;
    p = p * m + 3.333_333e-1;
    let y = p * m * z + ef * LN2_LO - 0.5 * z;
    m + y + ef * LN2_HI
}

/// Natural logarithm for `f32` (see the module table for accuracy and edge
/// cases).
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    const SQRT_HALF: f32 = core::f32::consts::FRAC_1_SQRT_2;
    // Scale subnormals into the normal range.
    let sub = x < f32::MIN_POSITIVE;
    let xs = if sub { x * 8_388_608.0 } else { x }; // 2^23
    let bits = xs.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 126;
    e = if sub { e - 23 } else { e };
    // Mantissa in [0.5, 1).
    let m = f32::from_bits((bits & 0x007f_ffff) | 0x3f00_0000);
    let small = m < SQRT_HALF;
    let e = if small { e - 1 } else { e };
    let m = if small { m + m - 1.0 } else { m - 1.0 };
    let r = ln_poly(m, e as f32);
    let r = if x == 0.0 { f32::NEG_INFINITY } else { r };
    let r = if x == f32::INFINITY { x } else { r };
    if x < 0.0 || x.is_nan() { f32::NAN } else { r }
}

/// Square root of an `f64` (Newton's iteration; within 1 ulp). See the module
/// table for edge cases.
#[inline]
pub fn sqrt_f64(x: f64) -> f64 {
    if !(x > 0.0) || x == f64::INFINITY {
        // 0 and -0 return themselves, inf returns inf, negatives and NaN NaN.
        return if x == 0.0 || x == f64::INFINITY {
            x
        } else {
            f64::NAN
        };
    }
    // Scale subnormals up by 2^64 (sqrt scales by 2^32).
    let (xs, scale) = if x < f64::MIN_POSITIVE {
        (x * 18_446_744_073_709_551_616.0, 1.0 / 4_294_967_296.0)
    } else {
        (x, 1.0)
    };
    // Halving the exponent gives an estimate within about 6%.
    let mut y = f64::from_bits((xs.to_bits() >> 1) + 0x1ff8_0000_0000_0000);
    for _ in 0..5 {
        y = 0.5 * (y + xs / y);
    }
    y * scale
}

/// Square root of an `f32`, computed in `f64` and rounded once (correctly
/// rounded except in rare double-rounding cases, within 1 ulp always).
#[inline]
pub fn sqrt(x: f32) -> f32 {
    sqrt_f64(x as f64) as f32
}

/// `max`/`min` that compile to single SIMD instructions (no NaN fix-ups);
/// NaN handling is the caller's business.
pub(crate) trait ClampFast {
    fn clamp_fast(self, lo: Self, hi: Self) -> Self;
}

impl ClampFast for f32 {
    #[inline(always)]
    fn clamp_fast(self, lo: f32, hi: f32) -> f32 {
        let v = if self > lo { self } else { lo };
        if v < hi { v } else { hi }
    }
}

/// The larger of two values; if either is NaN the result is `b`. Compiles to
/// one `maxps`: use in reductions where NaN is tracked separately.
#[inline(always)]
pub(crate) fn max_fast(a: f32, b: f32) -> f32 {
    if a > b { a } else { b }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn ulp_diff(a: f32, b: f32) -> u32 {
        if a == b {
            return 0;
        }
        let ia = a.to_bits() as i32;
        let ib = b.to_bits() as i32;
        ia.abs_diff(ib)
    }

    /// Every 257th bit pattern plus the region around the edges.
    fn samples() -> impl Iterator<Item = f32> {
        (0..=u32::MAX / 257).map(|i| f32::from_bits(i * 257))
    }

    #[test]
    fn exp_matches_std_within_2_ulp() {
        let mut worst = 0;
        for x in samples() {
            if x.is_nan() {
                assert!(exp(x).is_nan());
                continue;
            }
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            if want < f32::MIN_POSITIVE {
                // Documented flush: no subnormal results.
                assert!(
                    got == 0.0 || ulp_diff(got, want) <= 2,
                    "exp({x}) = {got}, want {want}"
                );
                continue;
            }
            let d = ulp_diff(got, want);
            worst = worst.max(d);
            assert!(d <= 2, "exp({x}) = {got}, want {want} ({d} ulp)");
        }
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-0.0), 1.0);
        assert_eq!(exp(88.8), f32::INFINITY);
        assert_eq!(exp(-87.4), 0.0);
        std::println!("exp worst {worst} ulp");
    }

    #[test]
    fn sqrt_matches_std() {
        for x in samples() {
            let got = sqrt(x);
            if x.is_nan() || x < 0.0 {
                assert!(got.is_nan(), "sqrt({x}) = {got}");
                continue;
            }
            assert!(
                ulp_diff(got, x.sqrt()) <= 1,
                "sqrt({x}) = {got}, want {}",
                x.sqrt()
            );
        }
        for i in 0..200_000u64 {
            let x = f64::from_bits(i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 1);
            let (got, want) = (sqrt_f64(x), x.sqrt());
            if x.is_nan() {
                continue;
            }
            assert!(
                (got.to_bits() as i64).abs_diff(want.to_bits() as i64) <= 1,
                "sqrt({x}) = {got}, want {want}"
            );
        }
        assert_eq!(sqrt(-0.0).to_bits(), (-0.0f32).to_bits());
        assert_eq!(sqrt(f32::INFINITY), f32::INFINITY);
        assert_eq!(sqrt_f64(4.0), 2.0);
    }

    #[test]
    fn fast_forms_match_std_on_their_domains() {
        for i in 0..=u32::MAX / 97 {
            let x = f32::from_bits(i * 97);
            if x.is_nan() {
                continue;
            }
            if x <= 0.0 {
                let want = (x as f64).exp() as f32;
                let got = exp_nonpos(x);
                if want < f32::MIN_POSITIVE {
                    assert!(got == 0.0 || ulp_diff(got, want) <= 2, "exp_nonpos({x}) = {got}");
                } else {
                    assert!(ulp_diff(got, want) <= 2, "exp_nonpos({x}) = {got}, want {want}");
                }
            } else if x.is_finite() && x >= f32::MIN_POSITIVE {
                let want = (x as f64).ln() as f32;
                assert!(
                    ulp_diff(ln_pos(x), want) <= 2,
                    "ln_pos({x}) = {}, want {want}",
                    ln_pos(x)
                );
            }
        }
        assert_eq!(exp_nonpos(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpos(0.0), 1.0);
    }

    #[test]
    fn ln_matches_std_within_2_ulp() {
        let mut worst = 0;
        for x in samples() {
            let got = ln(x);
            if x.is_nan() || x < 0.0 {
                assert!(got.is_nan(), "ln({x}) = {got}");
                continue;
            }
            let want = (x as f64).ln() as f32;
            let d = ulp_diff(got, want);
            worst = worst.max(d);
            assert!(d <= 2, "ln({x}) = {got}, want {want} ({d} ulp)");
        }
        assert_eq!(ln(0.0), f32::NEG_INFINITY);
        assert_eq!(ln(-0.0), f32::NEG_INFINITY);
        assert_eq!(ln(1.0), 0.0);
        assert_eq!(ln(f32::INFINITY), f32::INFINITY);
        assert!(ln(f32::NEG_INFINITY).is_nan());
        assert_eq!(ln(f32::from_bits(1)), (f32::from_bits(1) as f64).ln() as f32);
        std::println!("ln worst {worst} ulp");
    }
}
