//! Scalar `f64` trigonometry for `no_std`: [`sin`], [`cos`], [`acos`].
//!
//! The merge methods need these once per tensor (or per row) to turn an
//! angle into interpolation coefficients, never per element, so they are
//! plain scalar `f64` functions tuned for accuracy rather than throughput.
//!
//! | function | max error (measured, see tests) | domain and edge cases |
//! |---|---|---|
//! | [`sin`], [`cos`] | 2 ulp for `|x| < 2^20 * pi/2`; beyond, the absolute error grows like `|x| * 2^-53` | NaN, `±inf` and `|x| >= 2^51` give NaN |
//! | [`acos`] | 2 ulp | `acos(x)` for `x` in `[-1, 1]`; NaN outside (and for NaN) |
//!
//! Argument reduction is Cody and Waite's with pi/2 split in three parts of
//! 33, 33 and 53 bits (the split used by fdlibm), exact while the quadrant
//! count fits 20 bits. The kernels are fdlibm's minimax polynomials on
//! `[-pi/4, pi/4]`; `acos` uses fdlibm's rational approximation of `asin`.
//! The constants are written with fdlibm's published digits (more than an
//! `f64` holds; each rounds to the intended double).
#![allow(clippy::excessive_precision)]

/// 1.5 * 2^52: adding and subtracting it rounds an `f64` to the nearest
/// integer (ties to even) for `|v| < 2^51`.
const ROUND_MAGIC: f64 = 6_755_399_441_055_744.0;
const FRAC_2_PI: f64 = core::f64::consts::FRAC_2_PI;
/// pi/2 = PIO2_1 + PIO2_2 + PIO2_3 (33 + 33 + 53 bits).
const PIO2_1: f64 = 1.570_796_326_734_125_614_17;
const PIO2_2: f64 = 6.077_100_506_303_965_976_60e-11;
const PIO2_3: f64 = 2.022_266_248_711_166_455_80e-21;
/// 2^51: from here on the quadrant count has no integer resolution; the
/// merge methods never get near it, so such arguments return NaN.
const HUGE: f64 = 2_251_799_813_685_248.0;

/// sin on [-pi/4, pi/4] (fdlibm `__kernel_sin` coefficients).
#[inline]
fn kernel_sin(x: f64) -> f64 {
    const S1: f64 = -1.666_666_666_666_663_243_48e-01;
    const S2: f64 = 8.333_333_333_322_489_461_24e-03;
    const S3: f64 = -1.984_126_982_985_794_931_34e-04;
    const S4: f64 = 2.755_731_370_707_006_767_89e-06;
    const S5: f64 = -2.505_076_025_340_686_341_95e-08;
    const S6: f64 = 1.589_690_995_211_550_102_21e-10;
    let z = x * x;
    let r = S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)));
    // Keeps the sign of a zero argument.
    if z == 0.0 { x } else { x + x * z * (S1 + z * r) }
}

/// cos on [-pi/4, pi/4] (fdlibm `__kernel_cos` coefficients, with its
/// correction that keeps `1 - z/2` exact-ish).
#[inline]
fn kernel_cos(x: f64) -> f64 {
    const C1: f64 = 4.166_666_666_666_660_190_37e-02;
    const C2: f64 = -1.388_888_888_887_410_957_49e-03;
    const C3: f64 = 2.480_158_728_947_672_941_78e-05;
    const C4: f64 = -2.755_731_435_139_066_330_35e-07;
    const C5: f64 = 2.087_572_321_298_174_827_90e-09;
    const C6: f64 = -1.135_964_755_778_819_482_65e-11;
    let z = x * x;
    let r = z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
    let hz = 0.5 * z;
    let w = 1.0 - hz;
    // w + (((1 - w) - hz) + z * r): recovers the bits lost in 1 - hz.
    w + (((1.0 - w) - hz) + z * r)
}

/// `x = n * pi/2 + r` with `|r| <= pi/4` (about); returns `(n mod 4, r)`.
#[inline]
fn reduce(x: f64) -> (u32, f64) {
    if x.abs() <= core::f64::consts::FRAC_PI_4 {
        return (0, x);
    }
    let nf = (x * FRAC_2_PI + ROUND_MAGIC) - ROUND_MAGIC;
    let r = ((x - nf * PIO2_1) - nf * PIO2_2) - nf * PIO2_3;
    // nf is an integer with |nf| < 2^51 here (|x| < 2^51 checked by callers).
    let q = (nf as i64 & 3) as u32;
    (q, r)
}

/// Sine of `x` (radians). See the module table for accuracy.
#[inline]
pub fn sin(x: f64) -> f64 {
    if !x.is_finite() {
        return f64::NAN;
    }
    if x.abs() >= HUGE {
        return f64::NAN;
    }
    let (q, r) = reduce(x);
    match q {
        0 => kernel_sin(r),
        1 => kernel_cos(r),
        2 => -kernel_sin(r),
        _ => -kernel_cos(r),
    }
}

/// Cosine of `x` (radians). See the module table for accuracy.
#[inline]
pub fn cos(x: f64) -> f64 {
    if !x.is_finite() {
        return f64::NAN;
    }
    if x.abs() >= HUGE {
        return f64::NAN;
    }
    let (q, r) = reduce(x);
    match q {
        0 => kernel_cos(r),
        1 => -kernel_sin(r),
        2 => -kernel_cos(r),
        _ => kernel_sin(r),
    }
}

/// `asin(x) - x` as `x * R(x^2)` for `|x| <= 0.5` (fdlibm's rational
/// approximation), given `z = x^2`: returns `R(z)`.
#[inline]
fn asin_r(z: f64) -> f64 {
    const PS0: f64 = 1.666_666_666_666_666_574_15e-01;
    const PS1: f64 = -3.255_658_186_224_009_154_05e-01;
    const PS2: f64 = 2.012_125_321_348_629_258_81e-01;
    const PS3: f64 = -4.005_553_450_067_941_140_27e-02;
    const PS4: f64 = 7.915_349_942_898_145_321_76e-04;
    const PS5: f64 = 3.479_331_075_960_211_675_70e-05;
    const QS1: f64 = -2.403_394_911_734_414_218_78e+00;
    const QS2: f64 = 2.020_945_760_233_505_694_71e+00;
    const QS3: f64 = -6.882_839_716_054_532_930_30e-01;
    const QS4: f64 = 7.703_815_055_590_193_527_91e-02;
    let p = z * (PS0 + z * (PS1 + z * (PS2 + z * (PS3 + z * (PS4 + z * PS5)))));
    let q = 1.0 + z * (QS1 + z * (QS2 + z * (QS3 + z * QS4)));
    p / q
}

/// Arc cosine of `x` in `[0, pi]`. NaN for `|x| > 1` and for NaN; callers
/// that compute a cosine by a dot product clamp it to `[-1, 1]` first.
#[inline]
pub fn acos(x: f64) -> f64 {
    use core::f64::consts::{FRAC_PI_2, PI};
    if x.is_nan() || x.abs() > 1.0 {
        return f64::NAN;
    }
    if x.abs() <= 0.5 {
        return FRAC_PI_2 - (x + x * asin_r(x * x));
    }
    let z = (1.0 - x.abs()) * 0.5;
    let s = super::sqrt_f64(z);
    // asin(s) for s <= 0.5; acos(|x|) = 2 asin(sqrt((1 - |x|) / 2)).
    let a = 2.0 * (s + s * asin_r(z));
    if x > 0.0 { a } else { PI - a }
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

    /// Deterministic samples: a dense grid on [-lim, lim] plus scrambled
    /// magnitudes.
    fn samples(lim: f64) -> impl Iterator<Item = f64> {
        let grid = (-200_000..=200_000).map(move |i| i as f64 / 200_000.0 * lim);
        let scr = (0..200_000u64).map(move |i| {
            let u = (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 11) as f64 / (1u64 << 53) as f64;
            (u * 2.0 - 1.0) * lim
        });
        grid.chain(scr)
    }

    #[test]
    fn sin_cos_match_std() {
        for lim in [1.0, 4.0, 100.0, 1.0e5, 1.6e6] {
            for x in samples(lim) {
                let (s, c) = (sin(x), cos(x));
                let (ws, wc) = (x.sin(), x.cos());
                // Relative within 2 ulp, or absolute 2^-60 near zeros.
                assert!(
                    ulps(s, ws) <= 2 || (s - ws).abs() < 1e-18 * (1.0 + x.abs()),
                    "sin({x}) = {s}, std {ws}"
                );
                assert!(
                    ulps(c, wc) <= 2 || (c - wc).abs() < 1e-18 * (1.0 + x.abs()),
                    "cos({x}) = {c}, std {wc}"
                );
            }
        }
        assert_eq!(sin(0.0), 0.0);
        assert_eq!(sin(-0.0).to_bits(), (-0.0f64).to_bits());
        assert_eq!(cos(0.0), 1.0);
        assert!(sin(f64::NAN).is_nan() && sin(f64::INFINITY).is_nan());
        assert!(cos(f64::NEG_INFINITY).is_nan());
        // Documented domain limit.
        assert!(sin(1e300).is_nan() && cos(-4e15).is_nan());
        assert!(sin(1e15).abs() <= 1.0);
    }

    #[test]
    fn acos_matches_std() {
        let mut worst = 0;
        for i in -1_000_000..=1_000_000 {
            let x = i as f64 / 1_000_000.0;
            let (g, w) = (acos(x), x.acos());
            let d = ulps(g, w);
            worst = worst.max(d);
            assert!(d <= 2, "acos({x}) = {g}, std {w}");
        }
        for x in [1.0 - 1e-16, 1.0 - 1e-12, -1.0 + 1e-16, 1e-300, -1e-300] {
            assert!(ulps(acos(x), x.acos()) <= 2, "acos({x})");
        }
        assert_eq!(acos(1.0), 0.0);
        assert_eq!(acos(-1.0), core::f64::consts::PI);
        assert!(acos(1.0 + 1e-15).is_nan() && acos(f64::NAN).is_nan() && acos(-2.0).is_nan());
        std::println!("acos worst {worst} ulp");
    }
}
