// Shared by every kernel file (prepended by the host).
//
// Tensors live in `array<u32>` words, little-endian: f32 one element a word;
// f16 and bf16 two, element 2k in the low half. Conversions are integer code
// ported from the `half` crate, so every adapter rounds exactly like the CPU
// reference (WGSL leaves pack2x16float rounding and subnormals to the driver).
//
// Floats are tested on their bits, never with `x != x`: WGSL lets drivers
// assume there is no NaN or infinity, and lavapipe folds such tests away.

// Dtype of the primary operand, and of the second operand or the output.
// 0 = f32, 1 = f16, 2 = bf16.
override DTYPE: u32 = 0u;
override DTYPE2: u32 = 0u;

const CANONICAL_NAN: u32 = 0x7fc00000u;

fn elems_per_word(dt: u32) -> u32 {
    return select(2u, 1u, dt == 0u);
}

// Raw bits of lane `l` of `word`.
fn lane_raw(word: u32, l: u32, dt: u32) -> u32 {
    if (dt == 0u) {
        return word;
    }
    return (word >> (16u * l)) & 0xffffu;
}

fn is_nan_bits(b: u32) -> bool {
    return (b & 0x7fffffffu) > 0x7f800000u;
}

fn is_finite_bits(b: u32) -> bool {
    return (b & 0x7fffffffu) < 0x7f800000u;
}

fn f16_to_f32_bits(h: u32) -> u32 {
    if ((h & 0x7fffu) == 0u) {
        return h << 16u;
    }
    let sign = (h & 0x8000u) << 16u;
    let exp = h & 0x7c00u;
    let man = h & 0x03ffu;
    if (exp == 0x7c00u) {
        if (man == 0u) {
            return sign | 0x7f800000u;
        }
        return sign | 0x7fc00000u | (man << 13u);
    }
    if (exp == 0u) {
        // Subnormal: normalize. Leading zeros within 16 bits, minus the 6
        // bits of sign and exponent.
        let e = countLeadingZeros(man) - 22u;
        return sign | ((112u - e) << 23u) | ((man << (14u + e)) & 0x7fffffu);
    }
    return sign | (((exp >> 10u) + 112u) << 23u) | (man << 13u);
}

fn bf16_to_f32_bits(h: u32) -> u32 {
    if ((h & 0x7fffu) > 0x7f80u) {
        return (h | 0x40u) << 16u;
    }
    return h << 16u;
}

fn f32_to_f16_bits(x: u32) -> u32 {
    let sign = x & 0x80000000u;
    let exp = x & 0x7f800000u;
    let man = x & 0x007fffffu;
    if (exp == 0x7f800000u) {
        let nan_bit = select(0x0200u, 0u, man == 0u);
        return (sign >> 16u) | 0x7c00u | nan_bit | (man >> 13u);
    }
    let half_sign = sign >> 16u;
    let half_exp = i32(exp >> 23u) - 112;
    if (half_exp >= 0x1f) {
        return half_sign | 0x7c00u;
    }
    if (half_exp <= 0) {
        if (14 - half_exp > 24) {
            return half_sign;
        }
        let m = man | 0x00800000u;
        let sh = u32(14 - half_exp);
        var half_man = m >> sh;
        let round_bit = 1u << (sh - 1u);
        if ((m & round_bit) != 0u && (m & (3u * round_bit - 1u)) != 0u) {
            half_man += 1u;
        }
        return half_sign | half_man;
    }
    var r = half_sign | (u32(half_exp) << 10u) | (man >> 13u);
    if ((man & 0x1000u) != 0u && (man & 0x2fffu) != 0u) {
        r += 1u;
    }
    return r;
}

fn f32_to_bf16_bits(x: u32) -> u32 {
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return ((x >> 16u) | 0x40u) & 0xffffu;
    }
    if ((x & 0x8000u) != 0u && (x & 0x17fffu) != 0u) {
        return (x >> 16u) + 1u;
    }
    return x >> 16u;
}

// Raw element bits of dtype `dt` -> f32 bits.
fn raw_to_f32_bits(raw: u32, dt: u32) -> u32 {
    switch dt {
        case 1u: {
            return f16_to_f32_bits(raw);
        }
        case 2u: {
            return bf16_to_f32_bits(raw);
        }
        default: {
            return raw;
        }
    }
}

// f32 bits -> raw element bits of dtype `dt` (round to nearest even).
fn f32_bits_to_raw(b: u32, dt: u32) -> u32 {
    switch dt {
        case 1u: {
            return f32_to_f16_bits(b);
        }
        case 2u: {
            return f32_to_bf16_bits(b);
        }
        default: {
            return b;
        }
    }
}

// Packs raw element `raw` into lane `l` of an output word of dtype `dt`.
fn lane_put(raw: u32, l: u32, dt: u32) -> u32 {
    if (dt == 0u) {
        return raw;
    }
    return (raw & 0xffffu) << (16u * l);
}

// Subnormal f32 bits -> signed zero. Drivers may flush subnormals in
// arithmetic; kernels whose integer output must match the CPU flush them
// explicitly first, so no adapter's choice shows.
fn flush_subnormal(b: u32) -> u32 {
    return select(b, b & 0x80000000u, (b & 0x7f800000u) == 0u);
}

// Sums of products p·x (transfer, mix) keep the IEEE special cases on bits:
// 1 = a NaN term (NaN operand, or 0·inf), 2 = a +inf term, 4 = a -inf term.
fn term_special(p: f32, xb: u32) -> u32 {
    let a = xb & 0x7fffffffu;
    if (a < 0x7f800000u) {
        return 0u;
    }
    if (a > 0x7f800000u || (bitcast<u32>(p) & 0x7fffffffu) == 0u) {
        return 1u;
    }
    return select(2u, 4u, ((xb ^ bitcast<u32>(p)) & 0x80000000u) != 0u);
}

// The f32 bits of a sum whose finite part is `sum` and specials `state`:
// NaN (canonical) if any NaN term or both infinities, else the infinity,
// else the sum (a NaN from the driver is canonicalized too).
fn finish_special(state: u32, sum: f32) -> u32 {
    if ((state & 1u) != 0u || (state & 6u) == 6u) {
        return CANONICAL_NAN;
    }
    if (state == 2u) {
        return 0x7f800000u;
    }
    if (state == 4u) {
        return 0xff800000u;
    }
    let b = bitcast<u32>(sum);
    return select(b, CANONICAL_NAN, is_nan_bits(b));
}

// IEEE f32 division rounded to nearest even, on bits, in integer
// arithmetic: WGSL only promises 2.5 ulp for `/`, and reproducing a
// reference quantizer byte for byte needs the correctly rounded quotient.
// NaN results are the canonical quiet NaN. Checked against the CPU's
// division in tests/exact.rs.
fn div_rn(ab: u32, bb: u32) -> u32 {
    let sign = (ab ^ bb) & 0x80000000u;
    var ea = i32((ab >> 23u) & 0xffu);
    var eb = i32((bb >> 23u) & 0xffu);
    var ma = ab & 0x7fffffu;
    var mb = bb & 0x7fffffu;
    if ((ea == 255 && ma != 0u) || (eb == 255 && mb != 0u)) {
        return CANONICAL_NAN;
    }
    let a_inf = ea == 255;
    let b_inf = eb == 255;
    let a_zero = ea == 0 && ma == 0u;
    let b_zero = eb == 0 && mb == 0u;
    if ((a_inf && b_inf) || (a_zero && b_zero)) {
        return CANONICAL_NAN;
    }
    if (a_inf || b_zero) {
        return sign | 0x7f800000u;
    }
    if (b_inf || a_zero) {
        return sign;
    }
    // Mantissas normalized to [2^23, 2^24).
    if (ea == 0) {
        let s = i32(countLeadingZeros(ma)) - 8;
        ma = ma << u32(s);
        ea = 1 - s;
    } else {
        ma = ma | 0x800000u;
    }
    if (eb == 0) {
        let s = i32(countLeadingZeros(mb)) - 8;
        mb = mb << u32(s);
        eb = 1 - s;
    } else {
        mb = mb | 0x800000u;
    }
    // 26 quotient bits by long division; the remainder gives the sticky bit.
    var r = ma;
    var q = 0u;
    for (var i = 0; i < 26; i++) {
        q = q << 1u;
        if (r >= mb) {
            r -= mb;
            q = q | 1u;
        }
        r = r << 1u;
    }
    var sticky = u32(r != 0u);
    var e = ea - eb + 127;
    if (q >= (1u << 25u)) {
        sticky = sticky | (q & 1u);
        q = q >> 1u;
    } else {
        e -= 1;
    }
    // q = 24-bit mantissa << 1 | guard; subnormal results shift further.
    if (e <= 0) {
        let sh = u32(1 - e);
        if (sh > 25u) {
            sticky = sticky | u32(q != 0u);
            q = 0u;
        } else {
            sticky = sticky | u32((q & ((1u << sh) - 1u)) != 0u);
            q = q >> sh;
        }
        e = 0;
    }
    let guard = q & 1u;
    var m = q >> 1u;
    if (guard == 1u && (sticky == 1u || (m & 1u) == 1u)) {
        m += 1u;
    }
    if (e == 0) {
        return sign | m;
    }
    if (m >= (1u << 24u)) {
        m = m >> 1u;
        e += 1;
    }
    if (e >= 255) {
        return sign | 0x7f800000u;
    }
    return sign | (u32(e) << 23u) | (m & 0x7fffffu);
}
