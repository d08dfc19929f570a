//! Element types the core reads: `f32`, [`f16`](struct@f16) and [`bf16`].
//!
//! Inputs may be any [`Element`]; every computation upconverts to `f32` and
//! accumulates there. The conversions here are branch-free so that loops
//! calling them vectorize: `bf16` is a shift, `f16` uses the exponent-rebias
//! multiply (exact for every value, subnormals, infinities and NaN included;
//! tested exhaustively against `half`).

use half::{bf16, f16};

/// The element type of a buffer, as a value (for reports, FFI and kernels).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16 (the top half of a binary32).
    BF16,
}

impl DType {
    /// Bytes per element.
    pub const fn size_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }

    /// Lower-case name: `"f32"`, `"f16"`, `"bf16"`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        }
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
}

/// A floating-point element the core accepts as input. Sealed: implemented
/// for `f32`, [`f16`](struct@f16) and [`bf16`] only.
pub trait Element:
    Copy + bytemuck::Pod + Default + PartialEq + core::fmt::Debug + Send + Sync + 'static + sealed::Sealed
{
    /// The runtime tag of this type.
    const DTYPE: DType;
    /// Exact widening to `f32`.
    fn to_f32(self) -> f32;
    /// Rounding (to nearest, ties to even) narrowing from `f32`.
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16_bits_to_f32(self.to_bits())
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

/// Branch-free binary16 to binary32: move exponent and mantissa into place and
/// multiply by 2^112 to rebias (exact for normals and subnormals alike); an
/// all-ones exponent (inf/NaN) is patched to the binary32 all-ones exponent.
#[inline(always)]
pub(crate) fn f16_bits_to_f32(h: u16) -> f32 {
    let h = h as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let shifted = em << 13;
    let finite = f32::from_bits(shifted) * f32::from_bits(0x7780_0000); // 2^112
    let bits = if em >= 0x7c00 {
        shifted | 0x7f80_0000
    } else {
        finite.to_bits()
    };
    f32::from_bits(bits | sign)
}

/// Widens `src` into `dst` (same length) as `f32`.
#[inline(always)]
pub(crate) fn widen<T: Element>(src: &[T], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s.to_f32();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_conversion_is_exact_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let want = f16::from_bits(bits).to_f32();
            let got = f16_bits_to_f32(bits);
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
                assert_eq!(got.to_bits() & 0x8000_0000, want.to_bits() & 0x8000_0000);
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }

    #[test]
    fn bf16_conversion_is_exact_for_every_bit_pattern() {
        for bits in 0..=u16::MAX {
            let want = bf16::from_bits(bits).to_f32(); // half's own conversion
            let got = <bf16 as Element>::to_f32(bf16::from_bits(bits));
            if want.is_nan() {
                assert!(got.is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(got.to_bits(), want.to_bits(), "{bits:#06x}");
            }
        }
    }
}
