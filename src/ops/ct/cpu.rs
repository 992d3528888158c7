//! The CPU path: `reference`'s rules applied a group at a time, each step
//! a loop over the group's values that the compiler can vectorize (the
//! dtype is a type parameter, the roundings branch-free). Tests hold every
//! code equal to `reference::code`.

use super::reference::{self, GroupParams, E4M3_MAX, FP4_MAX};
use super::{Kind, Packing, Spec};
use crate::ops::codec::{round_even_small, Codec};
use crate::ops::diff::Diff;
use crate::tensor::TensorRef;

/// Buffers reused from group to group.
#[derive(Default)]
pub(super) struct Scratch {
    x: Vec<f32>,
    q: Vec<u32>,
    /// Inputs and dequantized values not yet added to the figures.
    fx: Vec<f32>,
    fy: Vec<f32>,
}

/// Values gathered before their figures are added: long runs for the
/// vector loop, flushed at the same points on every path.
const FIGURES_RUN: usize = 4096;

impl Scratch {
    /// Adds what is pending to `diff`; every band ends with this.
    pub(super) fn flush(&mut self, diff: &mut Diff) {
        diff.add_f32s(&self.fx, &self.fy);
        self.fx.clear();
        self.fy.clear();
    }
}

/// f32 rounded to C's dtype and back.
#[inline(always)]
fn rt<C: Codec>(v: f32) -> f32 {
    C::to_f32(C::from_f32(v))
}

/// `reference::e4m3` without branches (|v| ≤ 448, finite).
#[inline(always)]
fn e4m3(v: f32) -> u32 {
    let b = v.to_bits();
    let sign = (b >> 24) & 0x80;
    let a = b & 0x7fff_ffff;
    // Subnormal codes: a·512 rounded to nearest even (exact below 2^-6).
    let sub = round_even_small(f32::from_bits(a) * 512.0) as u32;
    let m = (a & 0x7f_ffff) | 0x80_0000;
    let r = (m + (1 << 19) - 1 + ((m >> 20) & 1)) >> 20;
    // r = 16 carries into the exponent, as adding the fields does.
    let e = (a >> 23).wrapping_sub(120);
    let normal = (e << 3).wrapping_add(r - 8);
    sign | if a < 0x3c80_0000 { sub } else { normal }
}

/// `reference::fp4` without branches.
#[inline(always)]
fn fp4(v: f32) -> u32 {
    let a = v.abs();
    let m = (a > 0.25) as u32
        + (a >= 0.75) as u32
        + (a > 1.25) as u32
        + (a >= 1.75) as u32
        + (a > 2.5) as u32
        + (a >= 3.5) as u32
        + (a > 5.0) as u32;
    ((v.to_bits() >> 28) & 8) | m
}

/// The stored codes of values `x` under `p`.
#[inline(always)]
fn codes<C: Codec>(spec: &Spec, packing: Packing, p: &GroupParams, x: &[f32], q: &mut [u32]) {
    let d = p.div;
    match spec.kind {
        Kind::Int { bits, .. } => {
            let qmin = -((1i32 << (bits - 1)) as f32);
            let (lo, hi, zp) = (qmin, -qmin - 1.0, p.zp as f32);
            let (off, mask) = if packing.offset {
                (1u32 << (bits - 1), u32::MAX)
            } else {
                (0, (1u32 << bits) - 1)
            };
            for (q, &v) in q.iter_mut().zip(x) {
                // Clamped before rounding: |y| ≤ 128 suits the fast round.
                let y = rt::<C>(rt::<C>(v / d) + zp).clamp(lo, hi);
                let i = round_even_small(y) as i32;
                *q = (i as u32).wrapping_add(off) & mask;
            }
        }
        Kind::Fp8 => {
            for (q, &v) in q.iter_mut().zip(x) {
                *q = e4m3((rt::<C>(v / d) + 0.0).clamp(-E4M3_MAX, E4M3_MAX));
            }
        }
        Kind::Nvfp4 => {
            for (q, &v) in q.iter_mut().zip(x) {
                *q = fp4((v / d + 0.0).clamp(-FP4_MAX, FP4_MAX));
            }
        }
        Kind::Mxfp4 => {
            for (q, &v) in q.iter_mut().zip(x) {
                *q = fp4((rt::<C>(v / d) + 0.0).clamp(-FP4_MAX, FP4_MAX));
            }
        }
    }
}

/// Every e4m3 code's value.
fn e4m3_values() -> &'static [f32; 256] {
    static T: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    T.get_or_init(|| std::array::from_fn(|c| reference::e4m3_value(c as u32)))
}

/// Writes `q` (codes of `bits` bits) from bit `bit` on.
#[inline(always)]
fn pack(out: &mut [u8], bit: usize, bits: u32, q: &[u32]) {
    if bits == 8 && bit.is_multiple_of(8) {
        for (o, &c) in out[bit / 8..].iter_mut().zip(q) {
            *o = c as u8;
        }
    } else if bits == 4 && bit.is_multiple_of(8) && q.len().is_multiple_of(2) {
        for (o, c) in out[bit / 8..].iter_mut().zip(q.chunks_exact(2)) {
            *o = (c[0] | (c[1] << 4)) as u8;
        }
    } else {
        for (k, &c) in q.iter().enumerate() {
            super::put(out, bit + k * bits as usize, bits, c);
        }
    }
}

/// Queues the figures of a group: `x` for the inputs, `q` dequantized
/// (as `reference::value`) and rounded to C for the outputs.
#[inline(always)]
fn figures<C: Codec>(
    spec: &Spec,
    packing: Packing,
    p: &GroupParams,
    x: &[f32],
    q: &[u32],
    fx: &mut Vec<f32>,
    fy: &mut Vec<f32>,
) {
    fx.extend_from_slice(x);
    let n0 = fy.len();
    fy.resize(n0 + q.len(), 0.0);
    let y = &mut fy[n0..];
    let d = p.div;
    match spec.kind {
        Kind::Int { bits, .. } => {
            // unstored(), written so the loop vectorizes.
            let zp = p.zp;
            if packing.offset {
                let off = 1i32 << (bits - 1);
                for (y, &u) in y.iter_mut().zip(q) {
                    *y = rt::<C>((u as i32 - off - zp) as f32 * d);
                }
            } else {
                let sh = 32 - bits;
                for (y, &u) in y.iter_mut().zip(q) {
                    *y = rt::<C>((((u << sh) as i32 >> sh) - zp) as f32 * d);
                }
            }
        }
        Kind::Fp8 => {
            let t = e4m3_values();
            for (y, &u) in y.iter_mut().zip(q) {
                *y = rt::<C>(t[u as usize & 0xff] * d);
            }
        }
        Kind::Nvfp4 | Kind::Mxfp4 => {
            let t: [f32; 16] = std::array::from_fn(|c| reference::fp4_value(c as u32));
            // As `reference::value`: an infinite MX scale dequantizes as 1.
            let d = if d.is_infinite() && spec.kind == Kind::Mxfp4 {
                1.0
            } else {
                d
            };
            for (y, &u) in y.iter_mut().zip(q) {
                *y = rt::<C>(t[u as usize & 15] * d);
            }
        }
    }
}

/// The values of group (gi, gj), row segment by row segment, into `s.x`;
/// its rows and columns.
#[inline(always)]
fn gather<C: Codec>(
    t: &TensorRef,
    spec: &Spec,
    (gi, gj): (usize, usize),
    s: &mut Scratch,
) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let (gr, gc) = spec.group_dims(cols);
    let rr = gi * gr..((gi + 1) * gr).min(rows);
    let cr = gj * gc..((gj + 1) * gc).min(cols);
    s.x.clear();
    for r in rr.clone() {
        let seg = &t.data[(r * cols + cr.start) * C::SIZE..(r * cols + cr.end) * C::SIZE];
        s.x.extend(seg.chunks_exact(C::SIZE).map(|b| C::to_f32(C::read(b, 0))));
    }
    (rr, cr)
}

/// Quantizes group (gi, gj) into `out` (whose bit 0 is row `r0`'s first
/// code), adding its figures to `diff`; None for a non-finite value.
// Inlined into the caller's `fast!` block, so that its loops get AVX2.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn quantize_group<C: Codec>(
    spec: &Spec,
    packing: Packing,
    t: &TensorRef,
    gs: f32,
    g: (usize, usize),
    r0: usize,
    out: &mut [u8],
    diff: &mut Diff,
    s: &mut Scratch,
) -> Option<GroupParams> {
    let (rr, cr) = gather::<C>(t, spec, g, s);
    let (mut lo, mut hi, mut bad) = (0f32, 0f32, false);
    for &v in &s.x {
        bad |= !v.is_finite();
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if bad {
        return None;
    }
    let p = reference::group_params(spec, t.dtype, lo, hi, gs);
    s.q.resize(s.x.len(), 0);
    codes::<C>(spec, packing, &p, &s.x, &mut s.q);
    let bits = spec.code_bits();
    let w = cr.len();
    for (k, r) in rr.enumerate() {
        let bit = (r - r0) * packing.row_stride_bits + cr.start * bits as usize;
        pack(out, bit, bits, &s.q[k * w..(k + 1) * w]);
    }
    figures::<C>(spec, packing, &p, &s.x, &s.q, &mut s.fx, &mut s.fy);
    if s.fx.len() >= FIGURES_RUN {
        s.flush(diff);
    }
    Some(p)
}

/// The figures of group (gi, gj) from codes made elsewhere, in the order
/// `quantize_group` takes them.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(super) fn group_diff<C: Codec>(
    spec: &Spec,
    packing: Packing,
    t: &TensorRef,
    p: &GroupParams,
    g: (usize, usize),
    codes: &[u8],
    diff: &mut Diff,
    s: &mut Scratch,
) {
    let (rr, cr) = gather::<C>(t, spec, g, s);
    let bits = spec.code_bits() as usize;
    s.q.clear();
    for r in rr {
        let bit0 = r * packing.row_stride_bits + cr.start * bits;
        s.q.extend((0..cr.len()).map(|c| super::get(codes, bit0 + c * bits, bits as u32)));
    }
    figures::<C>(spec, packing, p, &s.x, &s.q, &mut s.fx, &mut s.fy);
    if s.fx.len() >= FIGURES_RUN {
        s.flush(diff);
    }
}

/// `stored(reference::code(..))` for one value: what `codes` must equal.
#[cfg(test)]
pub(super) fn reference_code(
    spec: &Spec,
    packing: Packing,
    dt: crate::tensor::DType,
    p: &GroupParams,
    x: f32,
) -> u32 {
    super::stored(spec, packing, reference::code(spec, dt, p, x))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::codec::{Bf16c, F16c, F32c};
    use crate::tensor::DType;

    #[test]
    fn fast_codecs_equal_the_reference_on_every_f32_class() {
        // e4m3 over a dense sweep of |v| ≤ 448 and every code's neighbours.
        let mut v = 0f32;
        while v <= 448.0 {
            for x in [v, -v] {
                assert_eq!(e4m3(x), reference::e4m3(x), "{x}");
                assert_eq!(
                    fp4(x.clamp(-6.0, 6.0)),
                    reference::fp4(x.clamp(-6.0, 6.0)),
                    "{x}"
                );
            }
            v = if v == 0.0 {
                1e-12
            } else {
                f32::from_bits(v.to_bits() + 4099)
            };
        }
        for c in 0..0x7fu32 {
            let x = reference::e4m3_value(c);
            for d in [-1i32, 0, 1] {
                let y = f32::from_bits((x.to_bits() as i32 + d).max(0) as u32);
                if y <= 448.0 {
                    assert_eq!(e4m3(y), reference::e4m3(y), "{y}");
                }
            }
        }
    }

    fn check<C: Codec>(dt: DType) {
        let mut rng = crate::tools::sample::Rng::new(5);
        for spec in [
            Spec {
                kind: Kind::Int {
                    bits: 4,
                    symmetric: false,
                },
                strategy: super::super::Strategy::Group(8),
            },
            Spec {
                kind: Kind::Int {
                    bits: 8,
                    symmetric: true,
                },
                strategy: super::super::Strategy::Group(8),
            },
            Spec {
                kind: Kind::Fp8,
                strategy: super::super::Strategy::Group(8),
            },
            Spec {
                kind: Kind::Nvfp4,
                strategy: super::super::Strategy::Group(8),
            },
            Spec {
                kind: Kind::Mxfp4,
                strategy: super::super::Strategy::Group(8),
            },
        ] {
            for offset in [true, false] {
                let packing = Packing {
                    row_stride_bits: 64,
                    offset,
                };
                for _ in 0..2000 {
                    let scale = 10f32.powi(rng.below(12) as i32 - 8);
                    let x: Vec<f32> = (0..8)
                        .map(|_| rt::<C>((rng.normal() as f32) * scale))
                        .collect();
                    let (lo, hi) = x
                        .iter()
                        .fold((0f32, 0f32), |(a, b), &v| (a.min(v), b.max(v)));
                    let p = reference::group_params(&spec, dt, lo, hi, 3.5);
                    let mut q = vec![0u32; 8];
                    codes::<C>(&spec, packing, &p, &x, &mut q);
                    for (k, &v) in x.iter().enumerate() {
                        assert_eq!(
                            q[k],
                            reference_code(&spec, packing, dt, &p, v),
                            "{spec:?} {dt} {v} {p:?}"
                        );
                    }
                    // The figures dequantize as the reference does.
                    let (mut fx, mut y) = (Vec::new(), Vec::new());
                    figures::<C>(&spec, packing, &p, &x, &q, &mut fx, &mut y);
                    for (k, &u) in q.iter().enumerate() {
                        let c = super::super::unstored(&spec, packing, u);
                        let want = rt::<C>(reference::value(&spec, &p, c));
                        assert_eq!(y[k].to_bits(), want.to_bits(), "{spec:?} {dt} code {u}");
                    }
                }
            }
        }
    }

    #[test]
    fn fast_codes_equal_the_reference() {
        check::<F32c>(DType::F32);
        check::<F16c>(DType::F16);
        check::<Bf16c>(DType::BF16);
    }
}
