//! The CPU reference: ports of ggml's `quantize_row_*_ref` and
//! `dequantize_row_*` (ggml-quants.c), which llama-quantize runs when no
//! importance matrix is given. They are the specification the GPU kernels
//! are held to, byte for byte.
//!
//! Every expression keeps the C source's operation order and types: Rust
//! neither contracts `a*b+c` into a fused multiply-add nor reorders float
//! arithmetic, `f32::sqrt` and `/` are correctly rounded like `sqrtf` and
//! C's `/`, and `half` converts to fp16 rounding to nearest even like
//! `GGML_FP32_TO_FP16`. Casts follow C: `(int8_t)v` of an in-range float
//! truncates, `(uint8_t)` of an int wraps.

use super::BlockType;
use std::ops::Range;

use super::layout::*;

/// Disjoint mutable views of a block's fields, given in ascending order.
#[inline(always)]
fn fields<const N: usize>(y: &mut [u8], ranges: [Range<usize>; N]) -> [&mut [u8]; N] {
    let mut rest = y;
    let mut at = 0;
    ranges.map(|r| {
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(r.start - at);
        let (field, tail) = tail.split_at_mut(r.len());
        rest = tail;
        at = r.end;
        field
    })
}

/// The f16 at the start of `field`.
#[inline(always)]
fn f16_of(field: &[u8]) -> f32 {
    f16_at(field, 0)
}

/// Values per K-quant super-block.
pub const QK_K: usize = 256;
/// Values per block of the legacy types.
pub const QK: usize = 32;
/// ggml's GROUP_MAX_EPS: a (sub-)block whose largest |x| is below is zero.
const GROUP_MAX_EPS: f32 = 1e-15;

pub(crate) fn fp16(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

#[inline(always)]
fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_bits(u16::from_le_bytes([b[at], b[at + 1]])).to_f32()
}

/// ggml's `nearest_int`: the magic-number trick, bit for bit (rounds half
/// to even; beyond ±4194303, where C asserts in debug builds, it returns
/// what release builds return).
#[inline]
pub fn nearest_int(f: f32) -> i32 {
    let val = f + 12582912.0;
    (val.to_bits() as i32 & 0x007f_ffff) - 0x0040_0000
}

/// C's float → int conversion as x86-64 compiles it (cvttss2si): truncation,
/// and 0x80000000 for NaN and out-of-range values, which the legacy
/// quantizers meet when 1/d overflows (blocks of subnormal weights).
#[inline(always)]
fn c_int(v: f32) -> i32 {
    if v.is_nan() || !(-2147483648.0..2147483648.0).contains(&v) {
        i32::MIN
    } else {
        v as i32
    }
}

/// C's `roundf` (halves away from zero). Below 2^22 in magnitude, by the
/// integer part and the fraction (both exact), which needs no libm call and
/// vectorizes; beyond, `f32::round`.
#[inline(always)]
fn roundf(v: f32) -> f32 {
    if v.abs() < 4194304.0 {
        let t = v as i32 as f32;
        let f = v - t;
        t + if f >= 0.5 {
            1.0
        } else if f <= -0.5 {
            -1.0
        } else {
            0.0
        }
    } else {
        v.round()
    }
}

/// Quantizes whole blocks of `x` into `out` (`out.len()` = blocks × bytes).
#[inline(always)]
pub fn quantize_blocks(ty: BlockType, x: &[f32], out: &mut [u8]) {
    let (n, b) = (ty.block_values(), ty.block_bytes());
    debug_assert_eq!(x.len() / n * b, out.len());
    for (xb, yb) in x.chunks_exact(n).zip(out.chunks_exact_mut(b)) {
        match ty {
            BlockType::Q4_0 => q_sym(xb, yb, false),
            BlockType::Q4_1 => q_affine(xb, yb, false),
            BlockType::Q5_0 => q_sym(xb, yb, true),
            BlockType::Q5_1 => q_affine(xb, yb, true),
            BlockType::Q8_0 => q8_0(xb, yb),
            BlockType::Q4_K => q4_k(xb, yb),
            BlockType::Q5_K => q5_k(xb, yb),
            BlockType::Q6_K => q6_k(xb, yb),
            BlockType::Q2_K => q2_k(xb, yb),
            BlockType::Q3_K => q3_k(xb, yb),
        }
    }
}

/// Dequantizes whole blocks of `q` into `y`.
#[inline(always)]
pub fn dequantize_blocks(ty: BlockType, q: &[u8], y: &mut [f32]) {
    let (n, b) = (ty.block_values(), ty.block_bytes());
    for (qb, yb) in q.chunks_exact(b).zip(y.chunks_exact_mut(n)) {
        match ty {
            BlockType::Q4_0 => dq4_0(qb, yb),
            BlockType::Q4_1 => dq4_1(qb, yb),
            BlockType::Q5_0 => dq5_0(qb, yb),
            BlockType::Q5_1 => dq5_1(qb, yb),
            BlockType::Q8_0 => dq8_0(qb, yb),
            BlockType::Q4_K => dq4_k(qb, yb),
            BlockType::Q5_K => dq5_k(qb, yb),
            BlockType::Q6_K => dq6_k(qb, yb),
            BlockType::Q2_K => dq2_k(qb, yb),
            BlockType::Q3_K => dq3_k(qb, yb),
        }
    }
}

/// The signed value of largest magnitude, the first one on ties (how every
/// symmetric quantizer of ggml picks its block's or sub-block's extreme).
#[inline(always)]
fn signed_absmax(x: &[f32]) -> f32 {
    let (mut amax, mut max) = (0.0f32, 0.0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

// ---- legacy 32-value blocks -------------------------------------------------

#[inline(always)]
fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut min, mut max) = (f32::MAX, -f32::MAX);
    for &v in x {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
    }
    (min, max)
}

/// Packs 32 levels as the legacy types store them: element j in the low
/// nibble of byte j, element j+16 in the high one; for the 5-bit types,
/// bit 4 of element j in bit j of the little-endian u32 `qh`.
#[inline(always)]
fn pack_levels(l: &[u8; QK], qs: &mut [u8], qh: Option<&mut [u8]>) {
    let mut h = 0u32;
    for j in 0..QK / 2 {
        qs[j] = (l[j] & 0x0f) | ((l[j + QK / 2] & 0x0f) << 4);
        h |= (((l[j] >> 4) & 1) as u32) << j;
        h |= (((l[j + QK / 2] >> 4) & 1) as u32) << (j + QK / 2);
    }
    if let Some(qh) = qh {
        qh.copy_from_slice(&h.to_le_bytes());
    }
}

/// Q4_0 and Q5_0: d = max / −8 (−16), level = MIN(15 (31), (int8_t)(x/d + 8.5 (16.5))).
#[inline(always)]
fn q_sym(x: &[f32], y: &mut [u8], five: bool) {
    let (half, top) = if five { (16.0f32, 31) } else { (8.0, 15) };
    let d = signed_absmax(x) / -half;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut l = [0u8; QK];
    for (l, &v) in l.iter_mut().zip(x) {
        *l = (c_int(v * id + (half + 0.5)) as i8).min(top) as u8;
    }
    if five {
        let [dy, qh, qs] = fields(y, [q5_0::D, q5_0::QH, q5_0::QS]);
        dy.copy_from_slice(&fp16(d));
        pack_levels(&l, qs, Some(qh));
    } else {
        let [dy, qs] = fields(y, [q4_0::D, q4_0::QS]);
        dy.copy_from_slice(&fp16(d));
        pack_levels(&l, qs, None);
    }
}

/// Q4_1 and Q5_1: d = (max − min)/15 (31), m = min, level =
/// (int8_t)((x − min)/d + 0.5) clamped to 15 for Q4_1 (Q5_1: (uint8_t), no clamp).
#[inline(always)]
fn q_affine(x: &[f32], y: &mut [u8], five: bool) {
    let (min, max) = min_max(x);
    let d = (max - min) / if five { 31.0 } else { 15.0 };
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut l = [0u8; QK];
    for (l, &v) in l.iter_mut().zip(x) {
        let q = c_int((v - min) * id + 0.5);
        *l = if five {
            q as u8
        } else {
            (q as i8).min(15) as u8
        };
    }
    if five {
        let [dy, my, qh, qs] = fields(y, [q5_1::D, q5_1::M, q5_1::QH, q5_1::QS]);
        dy.copy_from_slice(&fp16(d));
        my.copy_from_slice(&fp16(min));
        pack_levels(&l, qs, Some(qh));
    } else {
        let [dy, my, qs] = fields(y, [q4_1::D, q4_1::M, q4_1::QS]);
        dy.copy_from_slice(&fp16(d));
        my.copy_from_slice(&fp16(min));
        pack_levels(&l, qs, None);
    }
}

#[inline(always)]
fn q8_0(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0.0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let [dy, qs] = fields(y, [q8_0::D, q8_0::QS]);
    dy.copy_from_slice(&fp16(d));
    if id.is_finite() {
        // |x·id| ≤ 127 (plus rounding): roundf's integer path, without
        // range checks, which vectorizes; the same bytes as below.
        for (q, &v) in qs.iter_mut().zip(x) {
            let v = v * id;
            // SAFETY: |v| < 2^22, so the conversion is exact.
            let t = unsafe { v.to_int_unchecked::<i32>() } as f32;
            let f = v - t;
            let r = t + if f >= 0.5 {
                1.0
            } else if f <= -0.5 {
                -1.0
            } else {
                0.0
            };
            // SAFETY: as above.
            *q = unsafe { r.to_int_unchecked::<i32>() } as u8;
        }
    } else {
        for j in 0..QK {
            qs[j] = c_int(roundf(x[j] * id)) as u8;
        }
    }
}

#[inline(always)]
fn dq4_0(q: &[u8], y: &mut [f32]) {
    let (d, qs) = (f16_of(&q[q4_0::D]), &q[q4_0::QS]);
    for j in 0..QK / 2 {
        y[j] = ((qs[j] & 0x0f) as i32 - 8) as f32 * d;
        y[j + QK / 2] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
    }
}

#[inline(always)]
fn dq4_1(q: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_of(&q[q4_1::D]), f16_of(&q[q4_1::M]));
    let qs = &q[q4_1::QS];
    for j in 0..QK / 2 {
        y[j] = (qs[j] & 0x0f) as f32 * d + m;
        y[j + QK / 2] = (qs[j] >> 4) as f32 * d + m;
    }
}

/// Bit 4 of levels j and j + 16 from a Q5 block's `qh` field.
#[inline(always)]
fn high_bits(qh: &[u8], j: usize) -> (u8, u8) {
    let qh = u32::from_le_bytes([qh[0], qh[1], qh[2], qh[3]]);
    (
        (((qh >> j) << 4) & 0x10) as u8,
        ((qh >> (j + 12)) & 0x10) as u8,
    )
}

#[inline(always)]
fn dq5_0(q: &[u8], y: &mut [f32]) {
    let d = f16_of(&q[q5_0::D]);
    let qs = &q[q5_0::QS];
    for j in 0..QK / 2 {
        let (h0, h1) = high_bits(&q[q5_0::QH], j);
        y[j] = (((qs[j] & 0x0f) | h0) as i32 - 16) as f32 * d;
        y[j + QK / 2] = (((qs[j] >> 4) | h1) as i32 - 16) as f32 * d;
    }
}

#[inline(always)]
fn dq5_1(q: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_of(&q[q5_1::D]), f16_of(&q[q5_1::M]));
    let qs = &q[q5_1::QS];
    for j in 0..QK / 2 {
        let (h0, h1) = high_bits(&q[q5_1::QH], j);
        y[j] = ((qs[j] & 0x0f) | h0) as f32 * d + m;
        y[j + QK / 2] = ((qs[j] >> 4) | h1) as f32 * d + m;
    }
}

#[inline(always)]
fn dq8_0(q: &[u8], y: &mut [f32]) {
    let (d, qs) = (f16_of(&q[q8_0::D]), &q[q8_0::QS]);
    for j in 0..QK {
        y[j] = (qs[j] as i8) as f32 * d;
    }
}

// ---- K-quants ---------------------------------------------------------------

/// ggml's `make_qkx2_quants` (no imatrix): an affine fit of `x` to
/// `nmax + 1` levels, searching `nstep + 1` scales around nmax/(max − min),
/// minimising the weighted squared error (or absolute error with
/// `use_mad`). Returns (scale, −min) and the levels in `l`.
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
    use_mad: bool,
) -> (f32, f32) {
    let err = |diff: f32| if use_mad { diff.abs() } else { diff * diff };
    let n = x.len();
    let mut min = x[0];
    let mut max = x[0];
    let sum_w0 = weights[0];
    let mut sum_w = sum_w0;
    let mut sum_x = sum_w0 * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let nmaxf = nmax as f32;
    let mut iscale = nmaxf / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0.0f32;
    for i in 0..n {
        let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = li as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * err(diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmaxf) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0.0f32, 0.0f32, 0.0f32);
        for i in 0..n {
            let li = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = li as u8;
            let (w, lf) = (weights[i], li as f32);
            sum_l += w * lf;
            sum_l2 += w * lf * lf;
            sum_xl += w * lf * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0.0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * err(diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// A K-quant sub-block's final levels against its quantized scale `d` and
/// min `dm`: nearest_int((x + dm)/d) in [0, nmax]. A zero `d` keeps the
/// fit's levels, as in the reference.
fn relevel_affine(x: &[f32], l: &mut [u8], d: f32, dm: f32, nmax: i32) {
    if d != 0.0 {
        for (l, &v) in l.iter_mut().zip(x) {
            *l = nearest_int((v + dm) / d).clamp(0, nmax) as u8;
        }
    }
}

/// The same for a symmetric sub-block: nearest_int(x/d) in
/// [−nmax, nmax−1], stored offset by nmax.
fn relevel_sym(x: &[f32], l: &mut [i8], d: f32, nmax: i32) {
    if d != 0.0 {
        for (l, &v) in l.iter_mut().zip(x) {
            *l = (nearest_int(v / d).clamp(-nmax, nmax - 1) + nmax) as i8;
        }
    }
}

/// ggml's `get_scale_min_k4`: sub-block j's 6-bit scale and min.
pub(crate) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q4_K and Q5_K: eight sub-blocks of 32, each an affine fit with 6-bit
/// scale and min; returns the levels, the scale bytes and d, dmin.
fn qk_affine(x: &[f32], nmax: i32, rmin: f32, nstep: i32) -> ([u8; QK_K], [u8; 12], [[u8; 2]; 2]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 32];
    let mut weights = [0f32; 32];
    let mut mins = [0f32; 8];
    let mut scales = [0f32; 8];
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..QK_K / 32 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0.0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (s, m) = make_qkx2_quants(
            nmax,
            xs,
            &weights,
            &mut l[32 * j..32 * j + 32],
            &mut laux,
            rmin,
            0.1,
            nstep,
            false,
        );
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let mut sc = [0u8; 12];
    for j in 0..QK_K / 32 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            sc[j] = ls;
            sc[j + 4] = lm;
        } else {
            sc[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
            sc[j - 4] |= (ls >> 4) << 6;
            sc[j] |= (lm >> 4) << 6;
        }
    }
    let (dh, mh) = (fp16(max_scale / 63.0), fp16(max_min / 63.0));
    let (df, mf) = (f16_at(&dh, 0), f16_at(&mh, 0));
    for (j, (xs, ls)) in x.chunks_exact(32).zip(l.chunks_exact_mut(32)).enumerate() {
        let (s, m) = scale_min_k4(j, &sc);
        relevel_affine(xs, ls, df * s as f32, mf * m as f32, nmax);
    }
    (l, sc, [dh, mh])
}

fn q4_k(x: &[f32], y: &mut [u8]) {
    let (l, sc, [dh, mh]) = qk_affine(x, 15, -1.0, 20);
    let [d, dmin, scales, qs] = fields(y, [q4_k::D, q4_k::DMIN, q4_k::SCALES, q4_k::QS]);
    d.copy_from_slice(&dh);
    dmin.copy_from_slice(&mh);
    scales.copy_from_slice(&sc);
    for c in 0..QK_K / 64 {
        for k in 0..32 {
            qs[32 * c + k] = l[64 * c + k] | (l[64 * c + 32 + k] << 4);
        }
    }
}

fn q5_k(x: &[f32], y: &mut [u8]) {
    let (l, sc, [dh, mh]) = qk_affine(x, 31, -0.5, 15);
    let [d, dmin, scales, qh, ql] =
        fields(y, [q5_k::D, q5_k::DMIN, q5_k::SCALES, q5_k::QH, q5_k::QS]);
    d.copy_from_slice(&dh);
    dmin.copy_from_slice(&mh);
    scales.copy_from_slice(&sc);
    qh.fill(0);
    for c in 0..QK_K / 64 {
        let (m1, m2) = (1u8 << (2 * c), 2u8 << (2 * c));
        for k in 0..32 {
            let mut l1 = l[64 * c + k];
            if l1 > 15 {
                l1 -= 16;
                qh[k] |= m1;
            }
            let mut l2 = l[64 * c + 32 + k];
            if l2 > 15 {
                l2 -= 16;
                qh[k] |= m2;
            }
            ql[32 * c + k] = l1 | (l2 << 4);
        }
    }
}

/// ggml's `make_qx_quants` with rmse_type 1 and no imatrix (Q6_K): a
/// symmetric fit to [−nmax, nmax−1] weighted by x², searching 18 scales
/// around −nmax/max. Levels come back offset by nmax.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let nmaxf = nmax as f32;
    let mut iscale = -nmaxf / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..x.len() {
        let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = (li + nmax) as i8;
        let w = x[i] * x[i];
        let lf = li as f32;
        sumlx += w * x[i] * lf;
        suml2 += w * lf * lf;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmaxf + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let lf = nearest_int(iscale * v).clamp(-nmax, nmax - 1) as f32;
            let w = v * v;
            sumlx += w * v * lf;
            suml2 += w * lf * lf;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for i in 0..x.len() {
                let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
                l[i] = (li + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

fn q6_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    for ib in 0..QK_K / 16 {
        scales[ib] = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
    }
    let max_scale = signed_absmax(&scales);
    if max_scale.abs() < GROUP_MAX_EPS {
        y.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    let dh = fp16(1.0 / iscale);
    let [ql, qh, scales_y, d] = fields(y, [q6_k::QL, q6_k::QH, q6_k::SCALES, q6_k::D]);
    d.copy_from_slice(&dh);
    let df = f16_at(&dh, 0);
    let mut sc = [0i8; 16];
    for ib in 0..QK_K / 16 {
        sc[ib] = nearest_int(iscale * scales[ib]).min(127) as i8;
        scales_y[ib] = sc[ib] as u8;
    }
    for ((xs, ls), &s) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).zip(&sc) {
        relevel_sym(xs, ls, df * s as f32, 32);
    }
    for h in 0..2 {
        let (lh, qlh, qhh) = (&l[128 * h..], &mut ql[64 * h..], &mut qh[32 * h..]);
        for k in 0..32 {
            let q = |o: usize| lh[k + o] as u8;
            qlh[k] = (q(0) & 0xf) | ((q(64) & 0xf) << 4);
            qlh[k + 32] = (q(32) & 0xf) | ((q(96) & 0xf) << 4);
            qhh[k] = (q(0) >> 4) | ((q(32) >> 4) << 2) | ((q(64) >> 4) << 4) | ((q(96) >> 4) << 6);
        }
    }
}

/// Packs 256 2-bit levels as Q2_K and Q3_K store them: byte 32·h + k holds
/// levels 128·h + 32·s + k at bits 2·s (s = 0..3).
fn pack_2bit(l: &[u8; QK_K], qs: &mut [u8]) {
    for h in 0..2 {
        for k in 0..32 {
            let b = 128 * h + k;
            qs[32 * h + k] = l[b] | (l[b + 32] << 2) | (l[b + 64] << 4) | (l[b + 96] << 6);
        }
    }
}

/// Q2_K: sixteen sub-blocks of 16, each an affine fit to 4 levels weighted
/// by |x| (absolute error), with 4-bit scale and min. Layout: scales[16]
/// (min in the high nibble), qs[64], d, dmin.
fn q2_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0u8; QK_K];
    let mut laux = [0u8; 16];
    let mut weights = [0f32; 16];
    let mut mins = [0f32; 16];
    let mut scales = [0f32; 16];
    let q4scale = 15.0f32;
    let (mut max_scale, mut max_min) = (0.0f32, 0.0f32);
    for j in 0..QK_K / 16 {
        let xs = &x[16 * j..16 * j + 16];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let lj = &mut l[16 * j..16 * j + 16];
        let (s, m) = make_qkx2_quants(3, xs, &weights, lj, &mut laux, -0.5, 0.1, 15, true);
        scales[j] = s;
        mins[j] = m;
        if s > max_scale {
            max_scale = s;
        }
        if m > max_min {
            max_min = m;
        }
    }
    let [sc, qs, d, dmin] = fields(y, [q2_k::SCALES, q2_k::QS, q2_k::D, q2_k::DMIN]);
    sc.fill(0);
    let mut dh = fp16(0.0);
    if max_scale > 0.0 {
        let iscale = q4scale / max_scale;
        for j in 0..QK_K / 16 {
            sc[j] = nearest_int(iscale * scales[j]) as u8;
        }
        dh = fp16(max_scale / q4scale);
    }
    let mut mh = fp16(0.0);
    if max_min > 0.0 {
        let iscale = q4scale / max_min;
        for j in 0..QK_K / 16 {
            sc[j] |= (nearest_int(iscale * mins[j]) << 4) as u8;
        }
        mh = fp16(max_min / q4scale);
    }
    let (df, mf) = (f16_at(&dh, 0), f16_at(&mh, 0));
    for ((xs, ls), &s) in x
        .chunks_exact(16)
        .zip(l.chunks_exact_mut(16))
        .zip(sc.iter())
    {
        relevel_affine(xs, ls, df * (s & 0xf) as f32, mf * (s >> 4) as f32, 3);
    }
    pack_2bit(&l, qs);
    d.copy_from_slice(&dh);
    dmin.copy_from_slice(&mh);
}

/// ggml's `make_q3_quants` with do_rmse: a symmetric fit of 16 values to
/// [−nmax, nmax−1] weighted by x², improved one level at a time (at most
/// five sweeps). Levels come back offset by nmax (all zero for a zero
/// sub-block).
fn make_q3_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let max = signed_absmax(x);
    if max.abs() < GROUP_MAX_EPS {
        l.fill(0);
        return 0.0;
    }
    let iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0.0f32, 0.0f32);
    for i in 0..x.len() {
        let li = nearest_int(iscale * x[i]).clamp(-nmax, nmax - 1);
        l[i] = li as i8;
        let w = x[i] * x[i];
        sumlx += w * x[i] * li as f32;
        suml2 += w * li as f32 * li as f32;
    }
    for _ in 0..5 {
        let mut n_changed = 0;
        for i in 0..x.len() {
            let w = x[i] * x[i];
            let li = l[i] as f32;
            let mut slx = sumlx - w * x[i] * li;
            if slx > 0.0 {
                let mut sl2 = suml2 - w * li * li;
                let new_l = nearest_int(x[i] * sl2 / slx).clamp(-nmax, nmax - 1);
                if new_l != l[i] as i32 {
                    let nl = new_l as f32;
                    slx += w * x[i] * nl;
                    sl2 += w * nl * nl;
                    if sl2 > 0.0 && slx * slx * suml2 > sumlx * sumlx * sl2 {
                        l[i] = new_l as i8;
                        sumlx = slx;
                        suml2 = sl2;
                        n_changed += 1;
                    }
                }
            }
        }
        if n_changed == 0 {
            break;
        }
    }
    for v in l.iter_mut() {
        *v += nmax as i8;
    }
    if suml2 > 0.0 {
        sumlx / suml2
    } else {
        0.0
    }
}

/// Sub-block j's 6-bit Q3_K scale (biased by 32): low nibbles in bytes
/// 0..8, high bit pairs in bytes 8..12.
fn q3_scale(sc: &[u8], j: usize) -> u8 {
    let lo = if j < 8 { sc[j] & 0xf } else { sc[j - 8] >> 4 };
    lo | (((sc[8 + j % 4] >> (2 * (j / 4))) & 3) << 4)
}

/// Q3_K: sixteen symmetric sub-blocks of 16 at 3 bits, 6-bit signed
/// scales. Layout: hmask[32] (bit 2 of the level), qs[64], scales[12], d.
fn q3_k(x: &[f32], y: &mut [u8]) {
    let mut l = [0i8; QK_K];
    let mut scales = [0f32; 16];
    for j in 0..QK_K / 16 {
        scales[j] = make_q3_quants(4, &x[16 * j..16 * j + 16], &mut l[16 * j..16 * j + 16]);
    }
    let max_scale = signed_absmax(&scales);
    let mut sc = [0u8; 12];
    let mut dh = fp16(0.0);
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for j in 0..QK_K / 16 {
            // (int8_t) of the int, then clamped and biased.
            let lj = ((nearest_int(iscale * scales[j]) as i8).clamp(-32, 31) + 32) as u8;
            if j < 8 {
                sc[j] = lj & 0xf;
            } else {
                sc[j - 8] |= (lj & 0xf) << 4;
            }
            sc[j % 4 + 8] |= (lj >> 4) << (2 * (j / 4));
        }
        dh = fp16(1.0 / iscale);
    }
    let df = f16_at(&dh, 0);
    for (j, (xs, ls)) in x.chunks_exact(16).zip(l.chunks_exact_mut(16)).enumerate() {
        relevel_sym(xs, ls, df * (q3_scale(&sc, j) as i8 - 32) as f32, 4);
    }
    let [hmask, qs, scales_y, d] = fields(y, [q3_k::HMASK, q3_k::QS, q3_k::SCALES, q3_k::D]);
    hmask.fill(0);
    let mut low = [0u8; QK_K];
    for (j, (&v, lo)) in l.iter().zip(low.iter_mut()).enumerate() {
        let v = v as u8;
        *lo = v & 3;
        if v > 3 {
            hmask[j % 32] |= 1 << (j / 32);
            *lo = v - 4;
        }
    }
    pack_2bit(&low, qs);
    scales_y.copy_from_slice(&sc);
    d.copy_from_slice(&dh);
}

fn dq2_k(q: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_of(&q[q2_k::D]), f16_of(&q[q2_k::DMIN]));
    let scales = &q[q2_k::SCALES];
    for h in 0..2 {
        let qs = &q[q2_k::QS][32 * h..32 * h + 32];
        for s in 0..4 {
            for half in 0..2 {
                let sc = scales[8 * h + 2 * s + half];
                let (dl, ml) = (d * (sc & 0xf) as f32, min * (sc >> 4) as f32);
                for k in 0..16 {
                    let v = (qs[16 * half + k] >> (2 * s)) & 3;
                    y[128 * h + 32 * s + 16 * half + k] = dl * v as f32 - ml;
                }
            }
        }
    }
}

fn dq3_k(q: &[u8], y: &mut [f32]) {
    let d_all = f16_of(&q[q3_k::D]);
    let hm = &q[q3_k::HMASK];
    let sc = &q[q3_k::SCALES];
    for h in 0..2 {
        let qs = &q[q3_k::QS][32 * h..32 * h + 32];
        for s in 0..4 {
            let bit = 1u8 << (4 * h + s);
            for half in 0..2 {
                let dl = d_all * (q3_scale(sc, 8 * h + 2 * s + half) as i32 - 32) as f32;
                for k in 0..16 {
                    let i = 16 * half + k;
                    let lo = ((qs[i] >> (2 * s)) & 3) as i32;
                    let v = lo - if hm[i] & bit != 0 { 0 } else { 4 };
                    y[128 * h + 32 * s + i] = dl * v as f32;
                }
            }
        }
    }
}

fn dq4_k(q: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_of(&q[q4_k::D]), f16_of(&q[q4_k::DMIN]));
    let sc = &q[q4_k::SCALES];
    for c in 0..QK_K / 64 {
        let (s1, m1) = scale_min_k4(2 * c, sc);
        let (s2, m2) = scale_min_k4(2 * c + 1, sc);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let qs = &q[q4_k::QS][32 * c..32 * c + 32];
        for k in 0..32 {
            y[64 * c + k] = d1 * (qs[k] & 0xf) as f32 - m1;
            y[64 * c + 32 + k] = d2 * (qs[k] >> 4) as f32 - m2;
        }
    }
}

fn dq5_k(q: &[u8], y: &mut [f32]) {
    let (d, min) = (f16_of(&q[q5_k::D]), f16_of(&q[q5_k::DMIN]));
    let sc = &q[q5_k::SCALES];
    let qh = &q[q5_k::QH];
    for c in 0..QK_K / 64 {
        let (s1, m1) = scale_min_k4(2 * c, sc);
        let (s2, m2) = scale_min_k4(2 * c + 1, sc);
        let (d1, m1) = (d * s1 as f32, min * m1 as f32);
        let (d2, m2) = (d * s2 as f32, min * m2 as f32);
        let (u1, u2) = (1u8 << (2 * c), 2u8 << (2 * c));
        let ql = &q[q5_k::QS][32 * c..32 * c + 32];
        for k in 0..32 {
            let h1 = if qh[k] & u1 != 0 { 16 } else { 0 };
            let h2 = if qh[k] & u2 != 0 { 16 } else { 0 };
            y[64 * c + k] = d1 * ((ql[k] & 0xf) + h1) as f32 - m1;
            y[64 * c + 32 + k] = d2 * ((ql[k] >> 4) + h2) as f32 - m2;
        }
    }
}

fn dq6_k(q: &[u8], y: &mut [f32]) {
    let d = f16_of(&q[q6_k::D]);
    for h in 0..2 {
        let ql = &q[q6_k::QL][64 * h..64 * h + 64];
        let qh = &q[q6_k::QH][32 * h..32 * h + 32];
        let sc = &q[q6_k::SCALES][8 * h..8 * h + 8];
        let yh = &mut y[128 * h..128 * h + 128];
        for k in 0..32 {
            let is = k / 16;
            let v = |lo: u8, sh: u32| ((lo | (((qh[k] >> sh) & 3) << 4)) as i32 - 32) as f32;
            let q1 = v(ql[k] & 0xf, 0);
            let q2 = v(ql[k + 32] & 0xf, 2);
            let q3 = v(ql[k] >> 4, 4);
            let q4 = v(ql[k + 32] >> 4, 6);
            yh[k] = d * (sc[is] as i8) as f32 * q1;
            yh[k + 32] = d * (sc[is + 2] as i8) as f32 * q2;
            yh[k + 64] = d * (sc[is + 4] as i8) as f32 * q3;
            yh[k + 96] = d * (sc[is + 6] as i8) as f32 * q4;
        }
    }
}
