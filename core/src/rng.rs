//! Counter-based random numbers: Philox4x32-10 (Salmon et al., "Parallel
//! random numbers: as easy as 1, 2, 3", SC 2011).
//!
//! A value depends only on `(seed, stream, index)`, never on how work is
//! chunked or threaded, so a GPU kernel reproduces the core bit for bit. This
//! is the one generator of the crate: DARE's drop masks and noisy top-k
//! gating both draw from it.
//!
//! # Layout (the contract kernels must follow)
//!
//! - key = `[seed as u32, (seed >> 32) as u32]`
//! - counter for element `index` = `[q as u32, (q >> 32) as u32, stream[0], stream[1]]`
//!   with `q = index / 4`; the element takes output word `index % 4`.
//! - `stream` names an independent sequence, e.g. `[model_index, tensor_id]`
//!   for DARE or `[layer, 0]` for gating noise.
//! - [`uniform`]: `(word >> 8) * 2^-24`, in `[0, 1)` with 24 random bits.
//! - [`normal`]: the inverse normal CDF of `((word >> 8) + 0.5) * 2^-24`,
//!   in the open interval `(0, 1)`, so the result is always finite
//!   (`|x| <= 5.4`).

// Published coefficient tables keep their printed digits.
#![allow(clippy::excessive_precision, clippy::inconsistent_digit_grouping)]

const M0: u32 = 0xD251_1F53;
const M1: u32 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

#[inline(always)]
fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = (a as u64) * (b as u64);
    ((p >> 32) as u32, p as u32)
}

/// The Philox4x32-10 block function: 4 random words for one counter.
#[inline]
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let mut c = counter;
    let mut k = key;
    for round in 0..10 {
        if round > 0 {
            k[0] = k[0].wrapping_add(W0);
            k[1] = k[1].wrapping_add(W1);
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// Blocks computed together by [`philox4x32_10_x8`].
pub(crate) const BATCH: usize = 8;

/// [`philox4x32_10`] for the `BATCH` consecutive counters
/// `[q0 + l, stream]` (`l < BATCH`), in structure-of-arrays form so the
/// rounds vectorize: `out[w][l]` is word `w` of block `l`. Bit-identical to
/// the scalar function.
#[inline(always)] // compiled with the SIMD level of its caller (crate::simd)
pub(crate) fn philox4x32_10_x8(q0: u64, stream: [u32; 2], key: [u32; 2]) -> [[u32; BATCH]; 4] {
    // Every word lives in a u64 lane (high half zero): a round's products
    // are then whole-lane multiplies of zero-extended words (`pmuludq` /
    // `vpmuludq`), and hi / lo a shift and a mask. With u32 lanes LLVM
    // left the 32x32->64 products scalar: 3x slower with AVX-512, 1.3x with
    // SSE2 (measured on the development VM).
    const LO: u64 = 0xFFFF_FFFF;
    let mut c0 = [0u64; BATCH];
    let mut c1 = [0u64; BATCH];
    let mut c2 = [stream[0] as u64; BATCH];
    let mut c3 = [stream[1] as u64; BATCH];
    for l in 0..BATCH {
        let q = q0.wrapping_add(l as u64);
        c0[l] = q & LO;
        c1[l] = q >> 32;
    }
    let (mut k0, mut k1) = (key[0] as u64, key[1] as u64);
    for round in 0..10 {
        if round > 0 {
            k0 = (k0 + W0 as u64) & LO;
            k1 = (k1 + W1 as u64) & LO;
        }
        for l in 0..BATCH {
            let p0 = c0[l] * M0 as u64;
            let p1 = c2[l] * M1 as u64;
            let n0 = (p1 >> 32) ^ c1[l] ^ k0;
            let n2 = (p0 >> 32) ^ c3[l] ^ k1;
            c0[l] = n0;
            c1[l] = p1 & LO;
            c2[l] = n2;
            c3[l] = p0 & LO;
        }
    }
    let words = |c: [u64; BATCH]| core::array::from_fn(|l| c[l] as u32);
    [words(c0), words(c1), words(c2), words(c3)]
}

/// The random word for element `index` of stream `stream` under `seed`.
#[inline]
pub fn word(seed: u64, stream: [u32; 2], index: u64) -> u32 {
    let q = index >> 2;
    let out = philox4x32_10(
        [q as u32, (q >> 32) as u32, stream[0], stream[1]],
        [seed as u32, (seed >> 32) as u32],
    );
    out[(index & 3) as usize]
}

/// Uniform in `[0, 1)` (24 random bits) for element `index`.
#[inline]
pub fn uniform(seed: u64, stream: [u32; 2], index: u64) -> f32 {
    (word(seed, stream, index) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Standard normal for element `index` (inverse-CDF transform of one
/// uniform in `(0, 1)`; see the module notes).
#[inline]
pub fn normal(seed: u64, stream: [u32; 2], index: u64) -> f32 {
    let u = ((word(seed, stream, index) >> 8) as f64 + 0.5) * (1.0 / 16_777_216.0);
    inverse_normal_cdf(u) as f32
}

/// Inverse of the standard normal CDF for `p` in `(0, 1)`: Wichura's
/// algorithm AS 241 (PPND16), relative error about 1e-16.
pub fn inverse_normal_cdf(p: f64) -> f64 {
    let q = p - 0.5;
    if q.abs() <= 0.425 {
        let r = 0.180625 - q * q;
        let num = (((((((2509.080_928_730_122_7 * r + 33430.575_583_588_128) * r + 67265.770_927_008_7)
            * r
            + 45921.953_931_549_87)
            * r
            + 13731.693_765_509_461)
            * r
            + 1971.590_950_306_551_3)
            * r
            + 133.141_667_891_784_38)
            * r
            + 3.387_132_872_796_366_5)
            * q;
        let den = ((((((5226.495_278_852_545 * r + 28729.085_735_721_943) * r + 39307.895_800_092_71) * r
            + 21213.794_301_586_597)
            * r
            + 5394.196_021_424_751)
            * r
            + 687.187_007_492_057_9)
            * r
            + 42.313_330_701_600_91)
            * r
            + 1.0;
        return num / den;
    }
    let r0 = if q < 0.0 { p } else { 1.0 - p };
    let r = crate::math::sqrt_f64(-ln_f64(r0));
    let v = if r <= 5.0 {
        let r = r - 1.6;
        let num = ((((((7.745_450_142_783_414e-4 * r + 0.022_723_844_989_269_184) * r
            + 0.241_780_725_177_450_6)
            * r
            + 1.270_458_252_452_368_4)
            * r
            + 3.647_848_324_763_204_5)
            * r
            + 5.769_497_221_460_691)
            * r
            + 4.630_337_846_156_546)
            * r
            + 1.423_437_110_749_683_5;
        let den = ((((((1.050_750_071_644_416_9e-9 * r + 5.475_938_084_995_345e-4) * r
            + 0.015_198_666_563_616_457)
            * r
            + 0.148_103_976_427_480_08)
            * r
            + 0.689_767_334_985_1)
            * r
            + 1.676_384_830_183_803_8)
            * r
            + 2.053_191_626_637_759)
            * r
            + 1.0;
        num / den
    } else {
        let r = r - 5.0;
        let num = ((((((2.010_334_399_292_288_1e-7 * r + 2.711_555_568_743_487_6e-5) * r
            + 1.242_660_947_388_078_4e-3)
            * r
            + 0.026_532_189_526_576_124)
            * r
            + 0.296_560_571_828_504_9)
            * r
            + 1.784_826_539_917_291_3)
            * r
            + 5.463_784_911_164_114)
            * r
            + 6.657_904_643_501_103;
        let den = ((((((2.044_263_103_389_939_7e-15 * r + 1.421_511_758_316_446e-7) * r
            + 1.846_318_317_510_054_8e-5)
            * r
            + 7.868_691_311_456_133e-4)
            * r
            + 0.014_875_361_290_850_615)
            * r
            + 0.136_929_880_922_735_8)
            * r
            + 0.599_832_206_555_888)
            * r
            + 1.0;
        num / den
    };
    if q < 0.0 { -v } else { v }
}

/// Natural log in f64 for the tail of [`inverse_normal_cdf`]: `ln x` for
/// `x` in `(0, 1]` (argument reduction by the exponent, then the atanh
/// series, accurate to about 1e-15).
fn ln_f64(x: f64) -> f64 {
    let bits = x.to_bits();
    let e = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & 0x000f_ffff_ffff_ffff) | 0x3ff0_0000_0000_0000); // [1, 2)
    let mut e = e as f64;
    if m > core::f64::consts::SQRT_2 {
        m *= 0.5;
        e += 1.0;
    }
    // ln m = 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    let mut k = 1.0;
    while k < 40.0 {
        sum += term / k;
        term *= s2;
        k += 2.0;
    }
    2.0 * sum + e * core::f64::consts::LN_2
}

#[cfg(test)]
mod tests {
    #[test]
    #[allow(clippy::needless_range_loop)] // `l` is both the lane and the counter offset
    fn the_batched_block_function_equals_the_scalar_one() {
        for (q0, stream, key) in [
            (0u64, [0u32, 0u32], [0u32, 0u32]),
            (12345, [3, 0xdead_beef], [7, 9]),
            (u64::MAX - 3, [u32::MAX, 1], [u32::MAX, u32::MAX]),
            ((1u64 << 32) - 2, [1, 2], [0x1234_5678, 0x9abc_def0]),
        ] {
            let b = super::philox4x32_10_x8(q0, stream, key);
            for l in 0..super::BATCH {
                let q = q0.wrapping_add(l as u64);
                let w = super::philox4x32_10([q as u32, (q >> 32) as u32, stream[0], stream[1]], key);
                for (k, &x) in w.iter().enumerate() {
                    assert_eq!(b[k][l], x, "q {q} word {k}");
                }
            }
        }
    }

    extern crate std;
    use super::*;

    #[test]
    fn philox_known_answers() {
        // Random123 kat_vectors for philox4x32_10.
        assert_eq!(
            philox4x32_10([0; 4], [0; 2]),
            [0x6627_e8d5, 0xe169_c58d, 0xbc57_ac4c, 0x9b00_dbd8]
        );
        assert_eq!(
            philox4x32_10([u32::MAX; 4], [u32::MAX; 2]),
            [0x408f_276d, 0x41c8_3b0e, 0xa20b_c7c6, 0x6d54_51fd]
        );
        assert_eq!(
            philox4x32_10(
                [0x243f_6a88, 0x85a3_08d3, 0x1319_8a2e, 0x0370_7344],
                [0xa409_3822, 0x299f_31d0]
            ),
            [0xd16c_fe09, 0x94fd_cceb, 0x5001_e420, 0x2412_6ea1]
        );
    }

    #[test]
    fn uniform_and_normal_moments() {
        let n = 200_000u64;
        let (mut su, mut sn, mut sn2) = (0.0f64, 0.0f64, 0.0f64);
        for i in 0..n {
            let u = uniform(42, [1, 2], i);
            assert!((0.0..1.0).contains(&u));
            su += u as f64;
            let z = normal(42, [1, 2], i) as f64;
            assert!(z.is_finite() && z.abs() < 5.5);
            sn += z;
            sn2 += z * z;
        }
        let n = n as f64;
        assert!((su / n - 0.5).abs() < 0.005);
        assert!((sn / n).abs() < 0.01);
        assert!((sn2 / n - 1.0).abs() < 0.02);
    }

    #[test]
    fn inverse_cdf_matches_known_quantiles() {
        assert!((inverse_normal_cdf(0.975) - 1.959_963_984_540_054).abs() < 1e-12);
        assert!((inverse_normal_cdf(1e-10) + 6.361_340_902_404_056).abs() < 1e-9);
        assert_eq!(inverse_normal_cdf(0.5), 0.0);
        for i in 1..1000 {
            let p = i as f64 / 1000.0;
            assert!((inverse_normal_cdf(p) + inverse_normal_cdf(1.0 - p)).abs() < 1e-12);
        }
    }

    #[test]
    fn ln_f64_is_accurate() {
        for i in 1..10_000 {
            let x = i as f64 / 10_000.0;
            assert!((ln_f64(x) - x.ln()).abs() < 1e-14, "{x}");
        }
        assert!((ln_f64(1e-300) - 1e-300f64.ln()).abs() < 1e-12);
    }
}
