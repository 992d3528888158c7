//! The CPU reference of compressed-tensors quantization: llm-compressor's
//! data-free rules (compressed-tensors 0.19 `calculate_qparams`, `_quantize`,
//! `generate_gparam`, the MX and FP4 helpers), one group at a time. Every
//! step computes in f32 and rounds to the weight's dtype T where torch
//! computes in T (`rt`), so the bytes match torch's on the CPU.

use super::{Kind, Spec};
use crate::ops::codec::{Bf16c, Codec, F16c};
use crate::tensor::DType;

/// f32 rounded to T (nearest even) and widened back: what a torch op on T
/// tensors returns.
#[inline]
pub fn rt(dt: DType, v: f32) -> f32 {
    match dt {
        DType::BF16 => Bf16c::to_f32(Bf16c::from_f32(v)),
        DType::F16 => F16c::to_f32(F16c::from_f32(v)),
        _ => v,
    }
}

/// T's raw bits of a value already in T.
pub fn raw(dt: DType, v: f32) -> u32 {
    match dt {
        DType::BF16 => Bf16c::from_f32(v),
        DType::F16 => F16c::from_f32(v),
        _ => v.to_bits(),
    }
}

/// The value of T's raw bits.
pub fn from_raw(dt: DType, r: u32) -> f32 {
    match dt {
        DType::BF16 => Bf16c::to_f32(r),
        DType::F16 => F16c::to_f32(r),
        _ => f32::from_bits(r),
    }
}

/// `torch.finfo(T).eps`: a zero scale becomes this.
pub fn eps(dt: DType) -> f32 {
    match dt {
        DType::BF16 => 2f32.powi(-7),
        DType::F16 => 2f32.powi(-10),
        _ => f32::EPSILON,
    }
}

/// `torch.finfo(T).tiny`: the smallest normal value.
pub fn tiny(dt: DType) -> f32 {
    match dt {
        DType::F16 => 2f32.powi(-14),
        _ => f32::MIN_POSITIVE,
    }
}

/// Largest float8_e4m3fn value.
pub const E4M3_MAX: f32 = 448.0;
/// Largest FP4 (e2m1) value.
pub const FP4_MAX: f32 = 6.0;

/// float8_e4m3fn code of a finite |v| ≤ 448, rounded to nearest even as
/// torch's cast (the sign of −0.0 kept).
pub fn e4m3(v: f32) -> u32 {
    let b = v.to_bits();
    let sign = (b >> 24) & 0x80;
    let a = v.abs();
    if a < 2f32.powi(-6) {
        // Subnormal codes count 2^-9 steps; 8 steps is the first normal code.
        return sign | (a * 512.0).round_ties_even() as u32;
    }
    let mut e = ((b >> 23) & 0xff) as i32 - 127;
    let m = (b & 0x7f_ffff) | 0x80_0000;
    let mut r = (m + (1 << 19) - 1 + ((m >> 20) & 1)) >> 20;
    if r == 16 {
        e += 1;
        r = 8;
    }
    sign | (((e + 7) as u32) << 3) | (r - 8)
}

/// The value of a float8_e4m3fn code (0x7f and 0xff are NaN).
pub fn e4m3_value(c: u32) -> f32 {
    let (e, m) = ((c >> 3) & 15, c & 7);
    let a = if e == 15 && m == 7 {
        f32::NAN
    } else if e == 0 {
        m as f32 / 512.0
    } else {
        // (8 + m)·2^(e−10), the power of two built from its bits.
        (8 + m) as f32 * f32::from_bits((e + 117) << 23)
    };
    if c & 0x80 != 0 {
        -a
    } else {
        a
    }
}

/// FP4 (e2m1) code of v clamped to ±6: nearest value, ties to even, as
/// compressed-tensors' `cast_to_fp4` then `pack_fp4_to_uint8`: the sign
/// bit is v's (−0.0 and negatives that round to 0 included).
pub fn fp4(v: f32) -> u32 {
    let a = v.abs();
    let m = if a <= 0.25 {
        0
    } else if a < 0.75 {
        1
    } else if a <= 1.25 {
        2
    } else if a < 1.75 {
        3
    } else if a <= 2.5 {
        4
    } else if a < 3.5 {
        5
    } else if a <= 5.0 {
        6
    } else {
        7
    };
    (((v.to_bits() >> 31) & 1) << 3) | m
}

/// The value of an FP4 code.
pub fn fp4_value(c: u32) -> f32 {
    const V: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
    let a = V[(c & 7) as usize];
    if c & 8 != 0 {
        -a
    } else {
        a
    }
}

/// NVFP4's per-tensor global scale from the abs-max A of the tensor (or of
/// the layers fused with it): (1/A in T)·2688 in T, stored as f32; A is
/// clamped to T's tiny, a non-finite result becomes 1
/// (`generate_gparam`; torch divides a scalar by a tensor as reciprocal
/// then multiply).
pub fn nvfp4_global_scale(dt: DType, absmax: f32) -> f32 {
    let a = if absmax.is_nan() {
        absmax
    } else {
        absmax.max(tiny(dt))
    };
    let g = rt(dt, rt(dt, 1.0 / a) * (E4M3_MAX * FP4_MAX));
    if g.is_finite() {
        g
    } else {
        1.0
    }
}

/// One group's quantization parameters: what is stored (`scale_raw`: T's
/// bits for int and FP8, the e4m3 code for NVFP4, the biased exponent for
/// MXFP4; `zp` for asymmetric int) and the divisor its values use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupParams {
    /// The stored scale.
    pub scale_raw: u32,
    /// The zero point (0 when symmetric).
    pub zp: i32,
    /// What each value is divided by.
    pub div: f32,
}

/// `calculate_qparams` for a group whose min and max (as read, in T) are
/// `lo` and `hi`; `gs` is NVFP4's global scale (1 otherwise).
pub fn group_params(spec: &Spec, dt: DType, lo: f32, hi: f32, gs: f32) -> GroupParams {
    let (mn, mx) = (lo.min(0.0), hi.max(0.0));
    let absmax = (-mn).max(mx);
    let nonzero = |s: f32, e: f32| if s == 0.0 { e } else { s };
    match spec.kind {
        Kind::Int { bits, symmetric } => {
            let levels = ((1u32 << bits) - 1) as f32;
            if symmetric {
                let s = nonzero(rt(dt, absmax / (levels / 2.0)), eps(dt));
                GroupParams {
                    scale_raw: raw(dt, s),
                    zp: 0,
                    div: s,
                }
            } else {
                let qmin = -((1i32 << (bits - 1)) as f32);
                let qmax = -qmin - 1.0;
                let s = rt(dt, rt(dt, mx - mn) / levels);
                let z = rt(dt, qmin - rt(dt, mn / s));
                // NaN (an all-zero group: 0/0) converts to 0.
                let zp = if z.is_nan() {
                    0
                } else {
                    z.clamp(qmin, qmax).round_ties_even() as i32
                };
                let s = nonzero(s, eps(dt));
                GroupParams {
                    scale_raw: raw(dt, s),
                    zp,
                    div: s,
                }
            }
        }
        Kind::Fp8 => {
            let s = nonzero(rt(dt, absmax / E4M3_MAX), eps(dt));
            GroupParams {
                scale_raw: raw(dt, s),
                zp: 0,
                div: s,
            }
        }
        Kind::Nvfp4 => {
            let s = gs * rt(dt, absmax / FP4_MAX);
            let mut code = e4m3(s.clamp(-E4M3_MAX, E4M3_MAX));
            if e4m3_value(code) == 0.0 {
                code = e4m3(0.125);
            }
            GroupParams {
                scale_raw: code,
                zp: 0,
                div: e4m3_value(code) / gs,
            }
        }
        Kind::Mxfp4 => {
            let (s, e) = mx_scale(dt, absmax);
            GroupParams {
                scale_raw: e,
                zp: 0,
                div: s,
            }
        }
    }
}

/// MXFP4's scale of a group with abs-max `absmax` (in T): the abs-max
/// rounded to a power of two on T's bits (up when the significand's top
/// bit below the FP4 mantissa is set), its biased exponent minus 2 clamped
/// to 0..=255, that power of two in T (1 if it underflows), and the
/// stored exponent of the scale actually used.
pub fn mx_scale(dt: DType, absmax: f32) -> (f32, u32) {
    let (mant, exp) = match dt {
        DType::BF16 => (7u32, 8u32),
        DType::F16 => (10, 5),
        _ => (23, 8),
    };
    let bits = raw(dt, absmax);
    let mask = ((1u32 << (exp + 1)) - 1) << mant;
    let p = from_raw(dt, (bits + (1 << (mant - 2))) & mask);
    // 127 + floor(log2 p) − 2 in T is exact (small integers), ±inf at the
    // ends; then clamped to 0..=255 and rounded as a uint8.
    let e = if p == 0.0 {
        0
    } else if p.is_infinite() {
        255
    } else {
        (127 + p.log2().floor() as i32 - 2).clamp(0, 255) as u32
    };
    let mut s = rt(dt, 2f32.powi(e as i32 - 127));
    if s == 0.0 {
        s = 1.0;
    }
    // An infinite scale (the abs-max rounded past T's range) is stored as
    // llm-compressor's torch stores it: floor(log2 inf) converted to int32
    // is INT_MIN on x86, plus 127, low byte 0x7f.
    let stored = if s.is_infinite() {
        127
    } else {
        (127 + s.log2().floor() as i32) as u32 & 0xff
    };
    (s, stored)
}

/// The code of value `x` (in T, finite) under `p`: the integer for int
/// schemes (signed), the e4m3 or FP4 code otherwise.
#[inline]
pub fn code(spec: &Spec, dt: DType, p: &GroupParams, x: f32) -> i32 {
    match spec.kind {
        Kind::Int { bits, .. } => {
            let qmin = -((1i32 << (bits - 1)) as f32);
            // The zero point is added even when symmetric (−0.0 becomes
            // +0.0, which rounds the same).
            let y = rt(dt, rt(dt, x / p.div) + p.zp as f32);
            y.clamp(qmin, -qmin - 1.0).round_ties_even() as i32
        }
        // `+ 0.0`: the zero point (0) is added here too, which turns a
        // quotient of −0.0 into +0.0 and so clears its code's sign bit.
        Kind::Fp8 => e4m3((rt(dt, x / p.div) + 0.0).clamp(-E4M3_MAX, E4M3_MAX)) as i32,
        Kind::Nvfp4 => fp4((x / p.div + 0.0).clamp(-FP4_MAX, FP4_MAX)) as i32,
        Kind::Mxfp4 => fp4((rt(dt, x / p.div) + 0.0).clamp(-FP4_MAX, FP4_MAX)) as i32,
    }
}

/// The value a code stands for (compressed-tensors' dequantization, in
/// f32, before rounding to T).
#[inline]
pub fn value(spec: &Spec, p: &GroupParams, c: i32) -> f32 {
    match spec.kind {
        Kind::Int { .. } => (c - p.zp) as f32 * p.div,
        Kind::Fp8 => e4m3_value(c as u32) * p.div,
        Kind::Nvfp4 => fp4_value(c as u32) * p.div,
        // An infinite MX scale is stored as exponent 127 (see `mx_scale`):
        // what a loader multiplies by is 1.
        Kind::Mxfp4 if p.div.is_infinite() => fp4_value(c as u32),
        Kind::Mxfp4 => fp4_value(c as u32) * p.div,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_round_trips_every_code_and_rounds_half_to_even() {
        for c in 0..256u32 {
            if c & 0x7f == 0x7f {
                continue;
            }
            let v = e4m3_value(c);
            assert_eq!(e4m3(v), c, "code {c:#x} = {v}");
        }
        // Midpoints go to the even code; just above goes up.
        for c in 0..0x7eu32 {
            let (a, b) = (e4m3_value(c), e4m3_value(c + 1));
            let mid = (a + b) / 2.0;
            let even = if c % 2 == 0 { c } else { c + 1 };
            assert_eq!(e4m3(mid), even, "between {a} and {b}");
            let above = f32::from_bits(mid.to_bits() + 1);
            assert_eq!(e4m3(above), c + 1);
        }
        assert_eq!(e4m3(-0.0), 0x80);
        assert_eq!(e4m3(448.0), 0x7e);
    }

    #[test]
    fn fp4_codes() {
        for c in 0..16u32 {
            if c == 8 {
                continue;
            }
            assert_eq!(fp4(fp4_value(c)), c);
        }
        assert_eq!(fp4(-0.0), 8);
        assert_eq!(fp4(-0.1), 8);
        assert_eq!(fp4(0.25), 0);
        assert_eq!(fp4(0.75), 2);
        assert_eq!(fp4(1.25), 2);
        assert_eq!(fp4(2.5), 4);
        assert_eq!(fp4(5.0), 6);
        assert_eq!(fp4(5.01), 7);
    }

    #[test]
    fn mx_scale_rounds_up_from_1_75() {
        let dt = DType::BF16;
        // 1.75·2^-3 rounds up to 2^-2: exponent 127 − 2 − 2.
        assert_eq!(mx_scale(dt, 1.75 / 8.0).1, 123);
        assert_eq!(mx_scale(dt, 1.5 / 8.0).1, 122);
        assert_eq!(mx_scale(dt, 0.0), (2f32.powi(-127), 0));
        // In f16 2^-127 underflows: the scale becomes 1 (exponent 127).
        assert_eq!(mx_scale(DType::F16, 0.0), (1.0, 127));
    }
}
