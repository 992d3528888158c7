// compressed-tensors quantization (src/ops/ct): one invocation per group of
// values sharing a scale. It finds the group's min and max on bits, derives
// the scale (and zero point) as reference.rs does, and ORs each value's code
// into the packed output at bit r·row_stride_bits + c·bits.
//
// Exactness: values are compared as ordered integers; divisions are div_rn
// (correctly rounded); rounding to the weight's dtype T is integer code;
// the few native f32 additions and products (asymmetric zero points,
// NVFP4's scale times the global scale) are only trusted on normal
// operands and results: otherwise the group is flagged and the host redoes
// it with the reference. Infinities never reach float arithmetic (WGSL
// lets drivers assume there are none).
//
// kind: 0 int, 1 float8_e4m3fn, 2 NVFP4, 3 MXFP4. The group's four output
// words: the stored scale (T's bits, the e4m3 code, or the e8m0 exponent),
// the zero point in the low 16 bits and flags above (1 = redo on the CPU,
// 2 = a non-finite value), the divisor's f32 bits, and 0.

struct CtParams {
    rows: u32,
    cols: u32,
    group_rows: u32,
    group_cols: u32,
    groups_c: u32,
    n_groups: u32,
    kind: u32,
    bits: u32,
    symmetric: u32,
    offset: u32,
    row_stride_bits: u32,
    gs_bits: u32,
}

@group(0) @binding(0) var<uniform> ct: CtParams;
@group(0) @binding(1) var<storage, read> ct_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> ct_codes: array<atomic<u32>>;
@group(0) @binding(3) var<storage, read_write> ct_groups: array<u32>;

const CT_FLAG_CPU: u32 = 0x10000u;
const CT_FLAG_NON_FINITE: u32 = 0x20000u;

fn ct_load(i: u32) -> u32 {
    let epw = elems_per_word(DTYPE);
    return raw_to_f32_bits(lane_raw(ct_src[i / epw], i % epw, DTYPE), DTYPE);
}

// f32 bits rounded to T (nearest even) and widened back.
fn ct_rt(b: u32) -> u32 {
    return raw_to_f32_bits(f32_bits_to_raw(b, DTYPE), DTYPE);
}

// torch.finfo(T).eps as f32 bits.
fn ct_eps() -> u32 {
    switch DTYPE {
        case 1u: {
            return 0x3a800000u;
        }
        case 2u: {
            return 0x3c000000u;
        }
        default: {
            return 0x34000000u;
        }
    }
}

// Unsigned order of f32 bits (no NaN).
fn ct_key(b: u32) -> u32 {
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn ct_subnormal(b: u32) -> bool {
    return (b & 0x7f800000u) == 0u && (b & 0x7fffffu) != 0u;
}

// b + 0.0 (the symmetric zero point is still added: −0.0 becomes +0.0).
fn ct_plus_zero(b: u32) -> u32 {
    return select(b, 0u, b == 0x80000000u);
}

fn ct_is_zero(b: u32) -> bool {
    return (b & 0x7fffffffu) == 0u;
}

// b clamped to ±m (m a positive normal), infinities included, as f32.
fn ct_clamp(b: u32, m: f32) -> f32 {
    if (!is_finite_bits(b)) {
        return select(m, -m, (b & 0x80000000u) != 0u);
    }
    if ((b & 0x7fffffffu) >= bitcast<u32>(m)) {
        return select(m, -m, (b & 0x80000000u) != 0u);
    }
    return bitcast<f32>(b);
}

// float8_e4m3fn code of |v| ≤ 448 (f32 bits), nearest even.
fn ct_e4m3(b: u32) -> u32 {
    let sign = (b >> 24u) & 0x80u;
    let a = b & 0x7fffffffu;
    if (a < 0x3c800000u) {
        // Below 2^-6: steps of 2^-9 (a·512 exactly, then ties to even).
        let e = i32(a >> 23u);
        if (e < 117) {
            // Below 2^-10, a quarter step: rounds to 0.
            return sign;
        }
        let m = (a & 0x7fffffu) | 0x800000u;
        // a·512 = m · 2^(e−127+9−23); shift right by 141 − e.
        let sh = u32(141 - e);
        var q = m >> sh;
        let rem = m & ((1u << sh) - 1u);
        let half = 1u << (sh - 1u);
        if (rem > half || (rem == half && (q & 1u) == 1u)) {
            q += 1u;
        }
        return sign | q;
    }
    var e = i32(a >> 23u) - 127;
    let m = (a & 0x7fffffu) | 0x800000u;
    var r = (m + (1u << 19u) - 1u + ((m >> 20u) & 1u)) >> 20u;
    if (r == 16u) {
        e += 1;
        r = 8u;
    }
    return sign | (u32(e + 7) << 3u) | (r - 8u);
}

// The f32 bits of an e4m3 code (no NaN codes reach here).
fn ct_e4m3_value(c: u32) -> u32 {
    let e = (c >> 3u) & 15u;
    let m = c & 7u;
    var a = 0u;
    if (e == 0u) {
        if (m != 0u) {
            // m · 2^-9: normalize the 3-bit mantissa.
            let lz = countLeadingZeros(m) - 29u;
            a = ((120u - lz) << 23u) | ((m << (21u + lz)) & 0x7fffffu);
        }
    } else {
        a = ((e + 120u) << 23u) | (m << 20u);
    }
    return a | ((c & 0x80u) << 24u);
}

// FP4 (e2m1) code of v clamped to ±6: nearest, ties to even, v's sign bit.
fn ct_fp4(v: f32, b: u32) -> u32 {
    let a = abs(v);
    var m = 7u;
    if (a <= 0.25) {
        m = 0u;
    } else if (a < 0.75) {
        m = 1u;
    } else if (a <= 1.25) {
        m = 2u;
    } else if (a < 1.75) {
        m = 3u;
    } else if (a <= 2.5) {
        m = 4u;
    } else if (a < 3.5) {
        m = 5u;
    } else if (a <= 5.0) {
        m = 6u;
    }
    return ((b >> 28u) & 8u) | m;
}

// floor(log2 p) of a positive power of two p (f32 bits, subnormal too).
fn ct_log2_pow2(p: u32) -> i32 {
    let e = i32(p >> 23u);
    if (e > 0) {
        return e - 127;
    }
    return -118 - i32(countLeadingZeros(p));
}

@compute @workgroup_size(CT_WG)
fn ct_quantize(
    @builtin(global_invocation_id) gid3: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let gid = gid3.x + gid3.y * nwg.x * CT_WG;
    if (gid >= ct.n_groups) {
        return;
    }
    let gi = gid / ct.groups_c;
    let gj = gid % ct.groups_c;
    let r0 = gi * ct.group_rows;
    let r1 = min(r0 + ct.group_rows, ct.rows);
    let c0 = gj * ct.group_cols;
    let c1 = min(c0 + ct.group_cols, ct.cols);

    // Min and max, clamped to include 0.
    var lo = 0u;
    var hi = 0u;
    for (var r = r0; r < r1; r++) {
        for (var c = c0; c < c1; c++) {
            let b = ct_load(r * ct.cols + c);
            if (!is_finite_bits(b)) {
                ct_groups[4u * gid + 1u] = CT_FLAG_NON_FINITE;
                return;
            }
            let k = ct_key(b);
            if (k < ct_key(lo)) {
                lo = b;
            }
            if (k > ct_key(hi)) {
                hi = b;
            }
        }
    }
    let absmax = max(lo & 0x7fffffffu, hi & 0x7fffffffu);
    var flags = 0u;
    var scale_raw = 0u;
    var zp = 0;
    // What values are divided by (f32 bits).
    var div = 0u;
    let qmin = -(1 << (ct.bits - 1u));
    let qmax = -qmin - 1;
    switch ct.kind {
        case 0u: {
            let levels = f32((1u << ct.bits) - 1u);
            if (ct.symmetric != 0u) {
                div = ct_rt(div_rn(absmax, bitcast<u32>(levels * 0.5)));
            } else {
                let d = bitcast<f32>(hi) - bitcast<f32>(lo);
                let db = bitcast<u32>(d);
                if (ct_subnormal(hi) || ct_subnormal(lo) || ct_subnormal(db)) {
                    flags = CT_FLAG_CPU;
                }
                div = ct_rt(div_rn(ct_rt(db), bitcast<u32>(levels)));
                if (ct_is_zero(div)) {
                    // 0/0 gives a NaN zero point, which becomes 0; a
                    // scale that underflowed is left to the reference.
                    if (!ct_is_zero(lo)) {
                        flags = CT_FLAG_CPU;
                    }
                } else {
                    let t = ct_rt(div_rn(lo, div));
                    let z = f32(qmin) - bitcast<f32>(t);
                    if (ct_subnormal(t) || ct_subnormal(bitcast<u32>(z)) || !is_finite_bits(t)) {
                        flags = CT_FLAG_CPU;
                    }
                    let zr = ct_rt(bitcast<u32>(z));
                    zp = i32(round(clamp(bitcast<f32>(zr), f32(qmin), f32(qmax))));
                }
            }
            if (ct_is_zero(div)) {
                div = ct_eps();
            }
            scale_raw = f32_bits_to_raw(div, DTYPE);
        }
        case 1u: {
            div = ct_rt(div_rn(absmax, 0x43e00000u));
            if (ct_is_zero(div)) {
                div = ct_eps();
            }
            scale_raw = f32_bits_to_raw(div, DTYPE);
        }
        case 2u: {
            let s1 = ct_rt(div_rn(absmax, 0x40c00000u));
            let s2 = bitcast<f32>(ct.gs_bits) * bitcast<f32>(s1);
            let s2b = bitcast<u32>(s2);
            if (ct_subnormal(s1) || ct_subnormal(s2b) || !is_finite_bits(s2b)) {
                flags = CT_FLAG_CPU;
            }
            var code = ct_e4m3(bitcast<u32>(ct_clamp(s2b, 448.0)));
            if ((code & 0x7fu) == 0u) {
                code = 0x20u;
            }
            scale_raw = code;
            div = div_rn(ct_e4m3_value(code), ct.gs_bits);
            if (ct_subnormal(div) || ct_is_zero(div) || !is_finite_bits(div)) {
                flags = CT_FLAG_CPU;
            }
        }
        default: {
            // MXFP4: the abs-max rounded to a power of two on T's bits.
            var mant = 23u;
            var mask = 0xff800000u;
            if (DTYPE == 2u) {
                mant = 7u;
                mask = 0xff80u;
            } else if (DTYPE == 1u) {
                mant = 10u;
                mask = 0xfc00u;
            }
            let p = raw_to_f32_bits((f32_bits_to_raw(absmax, DTYPE) + (1u << (mant - 2u))) & mask, DTYPE);
            var e = 0;
            if (!is_finite_bits(p)) {
                e = 255;
            } else if (!ct_is_zero(p)) {
                e = clamp(127 + ct_log2_pow2(p) - 2, 0, 255);
            }
            var s = 0x00400000u;
            if (e > 0) {
                s = u32(e) << 23u;
            }
            s = ct_rt(s);
            if (ct_is_zero(s)) {
                s = 0x3f800000u;
            }
            if (is_finite_bits(s)) {
                scale_raw = u32(127 + ct_log2_pow2(s)) & 0xffu;
            } else {
                // As reference.rs stores an infinite scale.
                scale_raw = 127u;
            }
            div = s;
        }
    }

    // The codes, ORed in a word at a time.
    var cur = 0xffffffffu;
    var acc = 0u;
    let code_mask = (1u << ct.bits) - 1u;
    for (var r = r0; r < r1; r++) {
        for (var c = c0; c < c1; c++) {
            let x = ct_load(r * ct.cols + c);
            var u = 0u;
            switch ct.kind {
                case 0u: {
                    let y = ct_rt(div_rn(x, div));
                    // Beyond ±1024 every value saturates (|zp| ≤ 128).
                    var v = ct_clamp(y, 1024.0);
                    if (zp != 0) {
                        if (ct_subnormal(y)) {
                            flags = CT_FLAG_CPU;
                        }
                        v = bitcast<f32>(ct_rt(bitcast<u32>(v + f32(zp))));
                    }
                    let q = i32(round(clamp(v, f32(qmin), f32(qmax))));
                    if (ct.offset != 0u) {
                        u = u32(q - qmin);
                    } else {
                        u = u32(q) & code_mask;
                    }
                }
                case 1u: {
                    let y = ct_plus_zero(ct_rt(div_rn(x, div)));
                    u = ct_e4m3(bitcast<u32>(ct_clamp(y, 448.0)));
                }
                case 2u: {
                    let y = ct_plus_zero(div_rn(x, div));
                    u = ct_fp4(ct_clamp(y, 6.0), y);
                }
                default: {
                    let y = ct_plus_zero(ct_rt(div_rn(x, div)));
                    u = ct_fp4(ct_clamp(y, 6.0), y);
                }
            }
            let bit = r * ct.row_stride_bits + c * ct.bits;
            let w = bit / 32u;
            if (w != cur) {
                if (cur != 0xffffffffu) {
                    atomicOr(&ct_codes[cur], acc);
                }
                cur = w;
                acc = 0u;
            }
            acc |= u << (bit % 32u);
        }
    }
    if (cur != 0xffffffffu) {
        atomicOr(&ct_codes[cur], acc);
    }
    ct_groups[4u * gid] = scale_raw;
    ct_groups[4u * gid + 1u] = (u32(zp) & 0xffffu) | flags;
    ct_groups[4u * gid + 2u] = div;
    ct_groups[4u * gid + 3u] = 0u;
}
