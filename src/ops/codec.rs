//! Per-dtype element access for the CPU backend, resolved at compile time so
//! that each loop is specialized for its dtypes (no per-element dispatch; the
//! compiler can vectorize the f32 and bf16 paths).

#[cfg(test)]
use half::bf16;
use half::f16;

/// Reading and writing one float dtype in little-endian bytes, and its
/// exact widening to / rounding from f32 (the `half` crate's rules, which
/// the shaders reproduce).
pub(crate) trait Codec: Send + Sync + 'static {
    const SIZE: usize;
    fn read(bytes: &[u8], i: usize) -> u32;
    fn write(bytes: &mut [u8], i: usize, raw: u32);
    fn to_f32(raw: u32) -> f32;
    fn from_f32(v: f32) -> u32;
}

pub(crate) struct F32c;
pub(crate) struct F16c;
pub(crate) struct Bf16c;

impl Codec for F32c {
    const SIZE: usize = 4;
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> u32 {
        super::u32_at(b, i)
    }
    #[inline(always)]
    fn write(b: &mut [u8], i: usize, raw: u32) {
        b[4 * i..4 * i + 4].copy_from_slice(&raw.to_le_bytes());
    }
    #[inline(always)]
    fn to_f32(raw: u32) -> f32 {
        f32::from_bits(raw)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> u32 {
        v.to_bits()
    }
}

#[inline(always)]
fn read16(b: &[u8], i: usize) -> u32 {
    u16::from_le_bytes([b[2 * i], b[2 * i + 1]]) as u32
}

#[inline(always)]
fn write16(b: &mut [u8], i: usize, raw: u32) {
    b[2 * i..2 * i + 2].copy_from_slice(&(raw as u16).to_le_bytes());
}

impl Codec for F16c {
    const SIZE: usize = 2;
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> u32 {
        read16(b, i)
    }
    #[inline(always)]
    fn write(b: &mut [u8], i: usize, raw: u32) {
        write16(b, i, raw)
    }
    #[inline(always)]
    fn to_f32(raw: u32) -> f32 {
        f16::from_bits(raw as u16).to_f32()
    }
    #[inline(always)]
    fn from_f32(v: f32) -> u32 {
        f16::from_f32(v).to_bits() as u32
    }
}

impl Codec for Bf16c {
    const SIZE: usize = 2;
    #[inline(always)]
    fn read(b: &[u8], i: usize) -> u32 {
        read16(b, i)
    }
    #[inline(always)]
    fn write(b: &mut [u8], i: usize, raw: u32) {
        write16(b, i, raw)
    }
    #[inline(always)]
    fn to_f32(raw: u32) -> f32 {
        // Branch-free form of half's bf16_to_f32 (NaN gets the quiet bit).
        let q = if raw & 0x7fff > 0x7f80 { 0x40 } else { 0 };
        f32::from_bits((raw | q) << 16)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> u32 {
        // Branch-free form of half's f32_to_bf16: round to nearest even by
        // adding 0x7fff plus the kept lsb; NaN keeps its top bits, quieted.
        let x = v.to_bits();
        let rounded = x.wrapping_add(0x7fff + ((x >> 16) & 1)) >> 16;
        if x & 0x7fff_ffff > 0x7f80_0000 {
            (x >> 16) | 0x40
        } else {
            rounded
        }
    }
}

/// Runs `$body` with `$C` bound to the codec of float dtype `$dt`.
macro_rules! with_codec {
    ($dt:expr, $C:ident => $body:expr) => {
        match $dt {
            $crate::tensor::DType::F32 => {
                type $C = $crate::ops::codec::F32c;
                $body
            }
            $crate::tensor::DType::F16 => {
                type $C = $crate::ops::codec::F16c;
                $body
            }
            $crate::tensor::DType::BF16 => {
                type $C = $crate::ops::codec::Bf16c;
                $body
            }
            other => unreachable!("{other} reached a float kernel"),
        }
    };
}
pub(crate) use with_codec;

/// round_ties_even for |v| ≤ 2^22 without a libm call: adding and removing
/// 1.5·2^23 leaves the value rounded to an integer by the FPU's default
/// (nearest-even) mode. Callers clamp first.
#[inline(always)]
pub(crate) fn round_even_small(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn codecs_match_half_on_every_16_bit_pattern() {
        for h in 0..=u16::MAX {
            let r = h as u32;
            assert_eq!(
                Bf16c::to_f32(r).to_bits(),
                bf16::from_bits(h).to_f32().to_bits(),
                "{h:#x}"
            );
            assert_eq!(
                F16c::to_f32(r).to_bits(),
                f16::from_bits(h).to_f32().to_bits(),
                "{h:#x}"
            );
            assert_eq!(
                DType::BF16.raw_to_f32(r).to_bits(),
                Bf16c::to_f32(r).to_bits()
            );
        }
    }

    #[test]
    fn bf16_encoder_matches_half() {
        let mut rng = crate::tools::sample::Rng::new(1);
        let specials = [
            0u32,
            0x8000_0000,
            0x7f7f_ffff,
            0xff7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0000,
            0xffff_ffff,
            0x7f80_0001,
            0x0000_8000,
            0x0001_8000,
            0x3f80_8000,
            0x3f81_8000,
        ];
        let randoms = (0..1_000_000).map(|_| rng.next_u64() as u32);
        for x in specials.into_iter().chain(randoms) {
            for b in [x, (x & 0xffff_0000) | 0x8000, (x & 0xffff_0000) | 0x7fff] {
                let v = f32::from_bits(b);
                assert_eq!(
                    Bf16c::from_f32(v),
                    bf16::from_f32(v).to_bits() as u32,
                    "{b:#x}"
                );
            }
        }
    }

    #[test]
    fn round_even_small_is_round_ties_even() {
        let mut x = -300.0f32;
        while x <= 300.0 {
            // Values, not bits: -0.25 gives +0 here, -0 there (both integer 0).
            assert_eq!(round_even_small(x), x.round_ties_even(), "{x}");
            x += 0.125;
        }
        for v in [
            0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 4194303.5, -4194303.5, 1e-30, -1e-30, 0.49999997,
        ] {
            assert_eq!(round_even_small(v), v.round_ties_even(), "{v}");
        }
    }
}
