// GGML block quantizers, byte-identical to ggml's quantize_row_*_ref (the
// CPU port in src/ops/ggml/reference.rs is the specification).
//
// One invocation quantizes a group of blocks whose bytes fill whole u32
// words (two blocks for the 18-, 22-, 34-, 110- and 210-byte types), so no two
// invocations write the same word. Every float operation of the reference
// runs in its order through the helpers below:
// - fmul and fadd hide each result behind an XOR with a uniform that is
//   always 0, so no compiler can fuse a product into a multiply-add (WGSL
//   allows fusion, and it changes the bytes) or re-associate a sum;
// - fdiv and sqrt_rn are correctly rounded in integer arithmetic (WGSL
//   allows 2.5 ulp for `/` and more for sqrt);
// - every result is checked: a subnormal one (which a GPU may flush to
//   zero) or an infinite one marks the group, and the host quantizes that
//   group with the CPU reference instead.
// DTYPE is the input dtype; DTYPE2 the block type's ggml id. The T_* constants
// naming those ids are generated from the type table (formats/ggml_types.rs).

// The block geometry comes from the host (BlockType), so it is stated once.
struct GgmlParams {
    n_groups: u32,
    // Always 0: the opaque operand of fmul.
    zero: u32,
    block_values: u32,
    block_bytes: u32,
    blocks_per_group: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> gp: GgmlParams;
@group(0) @binding(1) var<storage, read> g_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> g_dst: array<u32>;
// Per group: 0, or 1 = quantize on the CPU, 2 = a non-finite input.
@group(0) @binding(3) var<storage, read_write> g_flags: array<u32>;


// Constants that are not exact in decimal, as the C compiler rounds them.
const RDELTA: u32 = 0x3dcccccdu; // 0.1f
const GROUP_MAX_EPS: u32 = 0x26901d7du; // 1e-15f

var<private> bad: bool;
var<private> non_finite: bool;
var<private> xs: array<f32, 256>;
var<private> lv: array<u32, 256>;
var<private> laux: array<u32, 32>;
var<private> wts: array<f32, 32>;
var<private> scl: array<f32, 16>;
var<private> mns: array<f32, 16>;
// Scale bytes: 12 for Q4_K/Q5_K/Q3_K, 16 for Q2_K.
var<private> scb: array<u32, 16>;
var<private> ow: array<u32, 105>;

// ---- exact arithmetic ---------------------------------------------------

fn note(r: f32) -> f32 {
    let b = bitcast<u32>(r);
    let e = b & 0x7f800000u;
    if (e == 0x7f800000u || (e == 0u && (b & 0x7fffffu) != 0u)) {
        bad = true;
    }
    return r;
}

fn is_zero(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7fffffffu) == 0u;
}

fn fmul(a: f32, b: f32) -> f32 {
    let r = opaque(a * b);
    // A product of non-zeros that comes out zero was flushed.
    if (is_zero(r) && !is_zero(a) && !is_zero(b)) {
        bad = true;
    }
    return note(r);
}

fn opaque(x: f32) -> f32 {
    return bitcast<f32>(bitcast<u32>(x) ^ gp.zero);
}

fn fadd(a: f32, b: f32) -> f32 {
    // Opaque too: optimizers re-associate sums with constants otherwise
    // (Mesa's NIR does for (a + c1) + c2).
    let r = opaque(a + b);
    if (is_zero(r) && a != -b) {
        bad = true;
    }
    return note(r);
}

fn fsub(a: f32, b: f32) -> f32 {
    return fadd(a, -b);
}

fn fdiv(a: f32, b: f32) -> f32 {
    return note(bitcast<f32>(div_rn(bitcast<u32>(a), bitcast<u32>(b))));
}

// (hi, lo) of a·b for a, b < 2^27.
fn mul_wide(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let low = a0 * b0;
    let mid = a1 * b0 + a0 * b1;
    let lo = low + (mid << 16u);
    let carry = u32(lo < low);
    return vec2<u32>(a1 * b1 + (mid >> 16u) + carry, lo);
}

fn cmp64(a: vec2<u32>, b: vec2<u32>) -> i32 {
    if (a.x != b.x) {
        return select(-1, 1, a.x > b.x);
    }
    if (a.y != b.y) {
        return select(-1, 1, a.y > b.y);
    }
    return 0;
}

fn shl64(v: vec2<u32>, s: u32) -> vec2<u32> {
    if (s == 0u) {
        return v;
    }
    if (s >= 32u) {
        return vec2<u32>(v.y << (s - 32u), 0u);
    }
    return vec2<u32>((v.x << s) | (v.y >> (32u - s)), v.y << s);
}

// Sign of X·2^ex − M²·2^(2·em), for X < 2^24 and 2^23 ≤ M < 2^26.
fn sq_cmp(x: u32, ex: i32, m: u32, em: i32) -> i32 {
    let m2 = mul_wide(m, m);
    let k = ex - 2 * em;
    if (k >= 0) {
        if (k > 40) {
            return 1;
        }
        return cmp64(shl64(vec2<u32>(0u, x), u32(k)), m2);
    }
    if (-k > 12) {
        return -1;
    }
    return cmp64(vec2<u32>(0u, x), shl64(m2, u32(-k)));
}

// Correctly rounded sqrt of a positive normal x (or 0): the builtin's
// estimate, moved by ulps until x lies between the squares of the two
// midpoints around it (a square root is never exactly a midpoint).
fn sqrt_rn(x: f32) -> f32 {
    if (is_zero(x)) {
        return x;
    }
    let xb = bitcast<u32>(x);
    let mx = (xb & 0x7fffffu) | 0x800000u;
    let ex = i32((xb >> 23u) & 0xffu) - 150;
    var r = sqrt(x);
    for (var i = 0; i < 8; i++) {
        let rb = bitcast<u32>(r);
        let mr = (rb & 0x7fffffu) | 0x800000u;
        let er = i32((rb >> 23u) & 0xffu) - 150;
        if (sq_cmp(mx, ex, 2u * mr + 1u, er - 1) > 0) {
            r = bitcast<f32>(rb + 1u);
            continue;
        }
        var below: i32;
        if (mr == 0x800000u) {
            below = sq_cmp(mx, ex, 4u * mr - 1u, er - 2);
        } else {
            below = sq_cmp(mx, ex, 2u * mr - 1u, er - 1);
        }
        if (below < 0) {
            r = bitcast<f32>(rb - 1u);
            continue;
        }
        return note(r);
    }
    bad = true;
    return r;
}

// ggml's nearest_int: the magic-number trick (round half to even).
fn nearest_int(f: f32) -> i32 {
    let v = fadd(f, 12582912.0);
    return i32(bitcast<u32>(v) & 0x7fffffu) - 0x400000;
}

// fp16(x) bits, rounded to nearest even like GGML_FP32_TO_FP16.
fn half_bits(x: f32) -> u32 {
    return f32_to_f16_bits(bitcast<u32>(x));
}

fn half_value(h: u32) -> f32 {
    return bitcast<f32>(f16_to_f32_bits(h));
}

// ---- input and output -----------------------------------------------------

fn load_block(first: u32, n: u32) {
    let epw = elems_per_word(DTYPE);
    for (var j = 0u; j < n; j++) {
        let i = first + j;
        let b = raw_to_f32_bits(lane_raw(g_src[i / epw], i % epw, DTYPE), DTYPE);
        let e = b & 0x7f800000u;
        if (e == 0x7f800000u) {
            non_finite = true;
        } else if (e == 0u && (b & 0x7fffffu) != 0u) {
            bad = true;
        }
        xs[j] = bitcast<f32>(b);
    }
}

fn put8(pos: u32, v: u32) {
    ow[pos / 4u] |= (v & 0xffu) << (8u * (pos % 4u));
}

fn put16(pos: u32, v: u32) {
    put8(pos, v);
    put8(pos + 1u, v >> 8u);
}

// ---- 32-value blocks ------------------------------------------------------

// The signed value of largest magnitude in xs[off..off+n] (the first on
// ties), as every symmetric quantizer of ggml picks its extreme.
fn signed_absmax(off: u32, n: u32) -> f32 {
    var amax = 0.0;
    var mx = 0.0;
    for (var j = off; j < off + n; j++) {
        if (amax < abs(xs[j])) {
            amax = abs(xs[j]);
            mx = xs[j];
        }
    }
    return mx;
}

// The same over the sixteen sub-block scales in scl.
fn signed_absmax_scl() -> f32 {
    var amax = 0.0;
    var mx = 0.0;
    for (var j = 0u; j < 16u; j++) {
        if (amax < abs(scl[j])) {
            amax = abs(scl[j]);
            mx = scl[j];
        }
    }
    return mx;
}

fn inverse(d: f32) -> f32 {
    if (is_zero(d)) {
        return 0.0;
    }
    return fdiv(1.0, d);
}

// Q4_0 (nmax 15, offset 8.5) and Q5_0 (31, 16.5): symmetric, d = max/-(half).
// The legacy types' packing of 32 levels (in lv): element j in the low
// nibble of byte qs + j, element j + 16 in the high one; for the 5-bit
// types, bit 4 of element j in bit j of the little-endian u32 at qh.
fn pack_levels(qs: u32, qh: u32, five: bool) {
    var h = 0u;
    for (var j = 0u; j < 16u; j++) {
        put8(qs + j, (lv[j] & 0xfu) | ((lv[j + 16u] & 0xfu) << 4u));
        h |= ((lv[j] >> 4u) & 1u) << j;
        h |= ((lv[j + 16u] >> 4u) & 1u) << (j + 16u);
    }
    if (five) {
        put16(qh, h);
        put16(qh + 2u, h >> 16u);
    }
}

fn q_sym(o: u32, five: bool) {
    let hq = select(8.0, 16.0, five);
    let top = select(15, 31, five);
    let d = fdiv(signed_absmax(0u, 32u), -hq);
    let id = inverse(d);
    put16(o, half_bits(d));
    for (var j = 0u; j < 32u; j++) {
        lv[j] = u32(min(top, i32(fadd(fmul(xs[j], id), hq + 0.5))));
    }
    pack_levels(select(o + 2u, o + 6u, five), o + 2u, five);
}

// Q4_1 and Q5_1: affine, d = (max − min)/nmax, m = min.
fn q_affine(o: u32, five: bool) {
    var mn = bitcast<f32>(0x7f7fffffu);
    var mx = -mn;
    for (var j = 0u; j < 32u; j++) {
        if (xs[j] < mn) {
            mn = xs[j];
        }
        if (xs[j] > mx) {
            mx = xs[j];
        }
    }
    let d = fdiv(fsub(mx, mn), select(15.0, 31.0, five));
    let id = inverse(d);
    put16(o, half_bits(d));
    put16(o + 2u, half_bits(mn));
    for (var j = 0u; j < 32u; j++) {
        let q = u32(fadd(fmul(fsub(xs[j], mn), id), 0.5));
        // Q5_1: (uint8_t) with no clamp, as in the reference.
        lv[j] = select(min(15u, q), q & 0xffu, five);
    }
    pack_levels(select(o + 4u, o + 8u, five), o + 4u, five);
}

// C roundf: half away from zero (WGSL's round is half to even).
fn roundf(v: f32) -> f32 {
    let t = trunc(v);
    if (abs(v - t) >= 0.5) {
        return t + sign(v);
    }
    return t;
}

fn q8_0(o: u32) {
    var amax = 0.0;
    for (var j = 0u; j < 32u; j++) {
        amax = max(amax, abs(xs[j]));
    }
    let d = fdiv(amax, 127.0);
    let id = inverse(d);
    put16(o, half_bits(d));
    for (var j = 0u; j < 32u; j++) {
        put8(o + 2u + j, u32(i32(roundf(fmul(xs[j], id)))));
    }
}

// ---- K-quants ---------------------------------------------------------------

// The error of one value in make_qkx2: absolute (mad) or squared.
fn fit_err(diff: f32, mad: bool) -> f32 {
    if (mad) {
        return abs(diff);
    }
    return fmul(diff, diff);
}

// make_qkx2_quants on xs[off..off+n] with weights wts: levels into lv,
// returns (scale, −min).
fn make_qkx2(off: u32, n: u32, nmax: i32, rmin: f32, nstep: i32, mad: bool) -> vec2<f32> {
    var mn = xs[off];
    var mx = xs[off];
    var sum_w = wts[0];
    var sum_x = fmul(sum_w, xs[off]);
    for (var i = 1u; i < n; i++) {
        let x = xs[off + i];
        if (x < mn) {
            mn = x;
        }
        if (x > mx) {
            mx = x;
        }
        sum_w = fadd(sum_w, wts[i]);
        sum_x = fadd(sum_x, fmul(wts[i], x));
    }
    if (mn > 0.0) {
        mn = 0.0;
    }
    if (mx == mn) {
        for (var i = 0u; i < n; i++) {
            lv[off + i] = 0u;
        }
        return vec2<f32>(0.0, -mn);
    }
    let nmaxf = f32(nmax);
    var iscale = fdiv(nmaxf, fsub(mx, mn));
    var scale = fdiv(1.0, iscale);
    var best_error = 0.0;
    for (var i = 0u; i < n; i++) {
        let x = xs[off + i];
        let l = clamp(nearest_int(fmul(iscale, fsub(x, mn))), 0, nmax);
        lv[off + i] = u32(l);
        let diff = fsub(fadd(fmul(scale, f32(l)), mn), x);
        best_error = fadd(best_error, fmul(wts[i], fit_err(diff, mad)));
    }
    // As in the reference, a better fit's min applies to the later steps.
    for (var st = 0; st <= nstep; st++) {
        iscale = fdiv(fadd(fadd(rmin, fmul(bitcast<f32>(RDELTA), f32(st))), nmaxf), fsub(mx, mn));
        var sum_l = 0.0;
        var sum_l2 = 0.0;
        var sum_xl = 0.0;
        for (var i = 0u; i < n; i++) {
            let x = xs[off + i];
            let l = clamp(nearest_int(fmul(iscale, fsub(x, mn))), 0, nmax);
            laux[i] = u32(l);
            let w = wts[i];
            let lf = f32(l);
            let wl = fmul(w, lf);
            sum_l = fadd(sum_l, wl);
            sum_l2 = fadd(sum_l2, fmul(wl, lf));
            sum_xl = fadd(sum_xl, fmul(wl, x));
        }
        let dd = fsub(fmul(sum_w, sum_l2), fmul(sum_l, sum_l));
        if (dd > 0.0) {
            var this_scale = fdiv(fsub(fmul(sum_w, sum_xl), fmul(sum_x, sum_l)), dd);
            var this_min = fdiv(fsub(fmul(sum_l2, sum_x), fmul(sum_l, sum_xl)), dd);
            if (this_min > 0.0) {
                this_min = 0.0;
                this_scale = fdiv(sum_xl, sum_l2);
            }
            var cur_error = 0.0;
            for (var i = 0u; i < n; i++) {
                let diff = fsub(fadd(fmul(this_scale, f32(laux[i])), this_min), xs[off + i]);
                cur_error = fadd(cur_error, fmul(wts[i], fit_err(diff, mad)));
            }
            if (cur_error < best_error) {
                for (var i = 0u; i < n; i++) {
                    lv[off + i] = laux[i];
                }
                best_error = cur_error;
                scale = this_scale;
                mn = this_min;
            }
        }
    }
    return vec2<f32>(scale, -mn);
}

// A K-quant sub-block's final levels (xs[off..off+n] into lv) against its
// quantized scale d and min dm: nearest_int((x + dm)/d) in [0, nmax]. A
// zero d keeps the fit's levels, as in the reference.
fn relevel_affine(off: u32, n: u32, d: f32, dm: f32, nmax: i32) {
    if (!is_zero(d)) {
        for (var k = off; k < off + n; k++) {
            lv[k] = u32(clamp(nearest_int(fdiv(fadd(xs[k], dm), d)), 0, nmax));
        }
    }
}

// The same for a symmetric sub-block: nearest_int(x/d) in [−nmax, nmax−1],
// stored offset by nmax.
fn relevel_sym(off: u32, n: u32, d: f32, nmax: i32) {
    if (!is_zero(d)) {
        for (var k = off; k < off + n; k++) {
            lv[k] = u32(clamp(nearest_int(fdiv(xs[k], d)), -nmax, nmax - 1) + nmax);
        }
    }
}

fn scale_min_k4(j: u32) -> vec2<u32> {
    if (j < 4u) {
        return vec2<u32>(scb[j] & 63u, scb[j + 4u] & 63u);
    }
    return vec2<u32>(
        (scb[j + 4u] & 0xfu) | ((scb[j - 4u] >> 6u) << 4u),
        (scb[j + 4u] >> 4u) | ((scb[j] >> 6u) << 4u),
    );
}

// Q4_K (nmax 15) and Q5_K (31): levels in lv, scale bytes and d/dmin out.
fn qk_affine(o: u32, five: bool) {
    let nmax = select(15, 31, five);
    let rmin = select(-1.0, -0.5, five);
    let nstep = select(20, 15, five);
    var max_scale = 0.0;
    var max_min = 0.0;
    for (var j = 0u; j < 8u; j++) {
        var sum_x2 = 0.0;
        for (var l = 0u; l < 32u; l++) {
            let x = xs[32u * j + l];
            sum_x2 = fadd(sum_x2, fmul(x, x));
        }
        let av_x = sqrt_rn(fdiv(sum_x2, 32.0));
        for (var l = 0u; l < 32u; l++) {
            wts[l] = fadd(av_x, abs(xs[32u * j + l]));
        }
        let sm = make_qkx2(32u * j, 32u, nmax, rmin, nstep, false);
        scl[j] = sm.x;
        mns[j] = sm.y;
        if (sm.x > max_scale) {
            max_scale = sm.x;
        }
        if (sm.y > max_min) {
            max_min = sm.y;
        }
    }
    var inv_scale = 0.0;
    if (max_scale > 0.0) {
        inv_scale = fdiv(63.0, max_scale);
    }
    var inv_min = 0.0;
    if (max_min > 0.0) {
        inv_min = fdiv(63.0, max_min);
    }
    for (var j = 0u; j < 12u; j++) {
        scb[j] = 0u;
    }
    for (var j = 0u; j < 8u; j++) {
        let ls = min(63u, u32(nearest_int(fmul(inv_scale, scl[j]))) & 0xffu);
        let lm = min(63u, u32(nearest_int(fmul(inv_min, mns[j]))) & 0xffu);
        if (j < 4u) {
            scb[j] = ls;
            scb[j + 4u] = lm;
        } else {
            scb[j + 4u] = (ls & 0xfu) | ((lm & 0xfu) << 4u);
            scb[j - 4u] |= (ls >> 4u) << 6u;
            scb[j] |= (lm >> 4u) << 6u;
        }
    }
    let dh = half_bits(fdiv(max_scale, 63.0));
    let mh = half_bits(fdiv(max_min, 63.0));
    let df = half_value(dh);
    let mf = half_value(mh);
    for (var j = 0u; j < 8u; j++) {
        let sm = scale_min_k4(j);
        relevel_affine(32u * j, 32u, fmul(df, f32(sm.x)), fmul(mf, f32(sm.y)), nmax);
    }
    put16(o, dh);
    put16(o + 2u, mh);
    for (var j = 0u; j < 12u; j++) {
        put8(o + 4u + j, scb[j]);
    }
    if (!five) {
        for (var c = 0u; c < 4u; c++) {
            for (var k = 0u; k < 32u; k++) {
                put8(o + 16u + 32u * c + k, lv[64u * c + k] | (lv[64u * c + 32u + k] << 4u));
            }
        }
        return;
    }
    // Q5_K: qh[32] at 16, then the low nibbles at 48.
    for (var k = 0u; k < 32u; k++) {
        var h = 0u;
        for (var c = 0u; c < 4u; c++) {
            h |= ((lv[64u * c + k] >> 4u) & 1u) << (2u * c);
            h |= ((lv[64u * c + 32u + k] >> 4u) & 1u) << (2u * c + 1u);
        }
        put8(o + 16u + k, h);
    }
    for (var c = 0u; c < 4u; c++) {
        for (var k = 0u; k < 32u; k++) {
            put8(
                o + 48u + 32u * c + k,
                (lv[64u * c + k] & 0xfu) | ((lv[64u * c + 32u + k] & 0xfu) << 4u),
            );
        }
    }
}

// make_qx_quants(16, 32, rmse_type 1) on xs[off..off+16]: levels + 32 in lv.
fn make_qx(off: u32) -> f32 {
    let mx = signed_absmax(off, 16u);
    var scale = 0.0;
    if (abs(mx) < bitcast<f32>(GROUP_MAX_EPS)) {
        for (var i = 0u; i < 16u; i++) {
            lv[off + i] = 0u;
        }
    } else {
        var iscale = fdiv(-32.0, mx);
        var sumlx = 0.0;
        var suml2 = 0.0;
        for (var i = 0u; i < 16u; i++) {
            let x = xs[off + i];
            let l = clamp(nearest_int(fmul(iscale, x)), -32, 31);
            lv[off + i] = u32(l + 32);
            let w = fmul(x, x);
            let lf = f32(l);
            sumlx = fadd(sumlx, fmul(fmul(w, x), lf));
            suml2 = fadd(suml2, fmul(fmul(w, lf), lf));
        }
        if (!is_zero(suml2)) {
            scale = fdiv(sumlx, suml2);
        }
        var best = fmul(scale, sumlx);
        for (var st = -9; st <= 9; st++) {
            // (st == 0 is the first pass above.)
            if (st != 0) {
            iscale = fdiv(-fadd(32.0, fmul(bitcast<f32>(RDELTA), f32(st))), mx);
            sumlx = 0.0;
            suml2 = 0.0;
            for (var i = 0u; i < 16u; i++) {
                let x = xs[off + i];
                let lf = f32(clamp(nearest_int(fmul(iscale, x)), -32, 31));
                let w = fmul(x, x);
                sumlx = fadd(sumlx, fmul(fmul(w, x), lf));
                suml2 = fadd(suml2, fmul(fmul(w, lf), lf));
            }
            if (suml2 > 0.0 && fmul(sumlx, sumlx) > fmul(best, suml2)) {
                for (var i = 0u; i < 16u; i++) {
                    let l = clamp(nearest_int(fmul(iscale, xs[off + i])), -32, 31);
                    lv[off + i] = u32(l + 32);
                }
                scale = fdiv(sumlx, suml2);
                best = fmul(scale, sumlx);
            }
            }
        }
    }
    return scale;
}

fn q6_k(o: u32) {
    for (var ib = 0u; ib < 16u; ib++) {
        scl[ib] = make_qx(16u * ib);
    }
    let max_scale = signed_absmax_scl();
    // An all-zero block stays zero (ow is already zero).
    if (abs(max_scale) >= bitcast<f32>(GROUP_MAX_EPS)) {
        q6_k_pack(o, max_scale);
    }
}

fn q6_k_pack(o: u32, max_scale: f32) {
    let iscale = fdiv(-128.0, max_scale);
    let dh = half_bits(fdiv(1.0, iscale));
    let df = half_value(dh);
    put16(o + 208u, dh);
    for (var ib = 0u; ib < 16u; ib++) {
        let s = min(127, nearest_int(fmul(iscale, scl[ib])));
        put8(o + 192u + ib, u32(s));
        relevel_sym(16u * ib, 16u, fmul(df, f32(s)), 32);
    }
    for (var h = 0u; h < 2u; h++) {
        for (var k = 0u; k < 32u; k++) {
            let b = 128u * h + k;
            let l0 = lv[b];
            let l1 = lv[b + 32u];
            let l2 = lv[b + 64u];
            let l3 = lv[b + 96u];
            put8(o + 64u * h + k, (l0 & 0xfu) | ((l2 & 0xfu) << 4u));
            put8(o + 64u * h + 32u + k, (l1 & 0xfu) | ((l3 & 0xfu) << 4u));
            put8(
                o + 128u + 32u * h + k,
                (l0 >> 4u) | ((l1 >> 4u) << 2u) | ((l2 >> 4u) << 4u) | ((l3 >> 4u) << 6u),
            );
        }
    }
}

// ---- 2- and 3-bit K-quants -------------------------------------------------

// Q2_K and Q3_K's packing of 256 2-bit levels (lv & 3): byte qs + 32·h + k
// holds levels 128·h + 32·s + k at bits 2·s.
fn pack_2bit(qs: u32) {
    for (var h = 0u; h < 2u; h++) {
        for (var k = 0u; k < 32u; k++) {
            let b = 128u * h + k;
            put8(
                qs + 32u * h + k,
                (lv[b] & 3u) | ((lv[b + 32u] & 3u) << 2u) | ((lv[b + 64u] & 3u) << 4u)
                    | ((lv[b + 96u] & 3u) << 6u),
            );
        }
    }
}

// Q2_K: sixteen affine sub-blocks of 16 at 2 bits; scales[16] (4-bit
// scale, min in the high nibble), qs[64], d, dmin.
fn q2_k(o: u32) {
    var max_scale = 0.0;
    var max_min = 0.0;
    for (var j = 0u; j < 16u; j++) {
        for (var l = 0u; l < 16u; l++) {
            wts[l] = abs(xs[16u * j + l]);
        }
        let sm = make_qkx2(16u * j, 16u, 3, -0.5, 15, true);
        scl[j] = sm.x;
        mns[j] = sm.y;
        if (sm.x > max_scale) {
            max_scale = sm.x;
        }
        if (sm.y > max_min) {
            max_min = sm.y;
        }
    }
    for (var j = 0u; j < 16u; j++) {
        scb[j] = 0u;
    }
    var dh = 0u;
    if (max_scale > 0.0) {
        let iscale = fdiv(15.0, max_scale);
        for (var j = 0u; j < 16u; j++) {
            scb[j] = u32(nearest_int(fmul(iscale, scl[j]))) & 0xffu;
        }
        dh = half_bits(fdiv(max_scale, 15.0));
    }
    var mh = 0u;
    if (max_min > 0.0) {
        let iscale = fdiv(15.0, max_min);
        for (var j = 0u; j < 16u; j++) {
            scb[j] |= (u32(nearest_int(fmul(iscale, mns[j]))) << 4u) & 0xffu;
        }
        mh = half_bits(fdiv(max_min, 15.0));
    }
    let df = half_value(dh);
    let mf = half_value(mh);
    for (var j = 0u; j < 16u; j++) {
        relevel_affine(16u * j, 16u, fmul(df, f32(scb[j] & 0xfu)), fmul(mf, f32(scb[j] >> 4u)), 3);
        put8(o + j, scb[j]);
    }
    pack_2bit(o + 16u);
    put16(o + 80u, dh);
    put16(o + 82u, mh);
}

// make_q3_quants(16, 4, do_rmse) on xs[off..off+16]: levels + 4 in lv
// (0 for a zero sub-block), returns the scale.
fn make_q3(off: u32) -> f32 {
    let mx = signed_absmax(off, 16u);
    if (abs(mx) < bitcast<f32>(GROUP_MAX_EPS)) {
        for (var i = 0u; i < 16u; i++) {
            lv[off + i] = 0u;
        }
        return 0.0;
    }
    let iscale = fdiv(-4.0, mx);
    var sumlx = 0.0;
    var suml2 = 0.0;
    // Signed levels (as u32 bits) while the fit improves.
    for (var i = 0u; i < 16u; i++) {
        let x = xs[off + i];
        let l = clamp(nearest_int(fmul(iscale, x)), -4, 3);
        lv[off + i] = u32(l);
        let w = fmul(x, x);
        let lf = f32(l);
        sumlx = fadd(sumlx, fmul(fmul(w, x), lf));
        suml2 = fadd(suml2, fmul(fmul(w, lf), lf));
    }
    for (var t = 0; t < 5; t++) {
        var changed = 0;
        for (var i = 0u; i < 16u; i++) {
            let x = xs[off + i];
            let w = fmul(x, x);
            let li = f32(i32(lv[off + i]));
            var slx = fsub(sumlx, fmul(fmul(w, x), li));
            if (slx > 0.0) {
                var sl2 = fsub(suml2, fmul(fmul(w, li), li));
                let nl = clamp(nearest_int(fdiv(fmul(x, sl2), slx)), -4, 3);
                if (nl != i32(lv[off + i])) {
                    let nlf = f32(nl);
                    slx = fadd(slx, fmul(fmul(w, x), nlf));
                    sl2 = fadd(sl2, fmul(fmul(w, nlf), nlf));
                    if (sl2 > 0.0 && fmul(fmul(slx, slx), suml2) > fmul(fmul(sumlx, sumlx), sl2)) {
                        lv[off + i] = u32(nl);
                        sumlx = slx;
                        suml2 = sl2;
                        changed++;
                    }
                }
            }
        }
        if (changed == 0) {
            break;
        }
    }
    for (var i = 0u; i < 16u; i++) {
        lv[off + i] = u32(i32(lv[off + i]) + 4);
    }
    if (suml2 > 0.0) {
        return fdiv(sumlx, suml2);
    }
    return 0.0;
}

// Sub-block j's biased 6-bit Q3_K scale from scb.
fn q3_scale(j: u32) -> u32 {
    var lo = scb[j] & 0xfu;
    if (j >= 8u) {
        lo = scb[j - 8u] >> 4u;
    }
    return lo | (((scb[8u + j % 4u] >> (2u * (j / 4u))) & 3u) << 4u);
}

// Q3_K: sixteen symmetric sub-blocks of 16 at 3 bits; hmask[32] (bit 2 of
// each level), qs[64], scales[12] (6-bit, biased by 32), d.
fn q3_k(o: u32) {
    for (var j = 0u; j < 16u; j++) {
        scl[j] = make_q3(16u * j);
    }
    let max_scale = signed_absmax_scl();
    for (var j = 0u; j < 12u; j++) {
        scb[j] = 0u;
    }
    var dh = 0u;
    if (!is_zero(max_scale)) {
        let iscale = fdiv(-32.0, max_scale);
        for (var j = 0u; j < 16u; j++) {
            // (int8_t) of the int: sign-extend its low byte.
            let v = (nearest_int(fmul(iscale, scl[j])) << 24u) >> 24u;
            let l = u32(clamp(v, -32, 31) + 32);
            if (j < 8u) {
                scb[j] = l & 0xfu;
            } else {
                scb[j - 8u] |= (l & 0xfu) << 4u;
            }
            scb[j % 4u + 8u] |= (l >> 4u) << (2u * (j / 4u));
        }
        dh = half_bits(fdiv(1.0, iscale));
    }
    let df = half_value(dh);
    for (var j = 0u; j < 16u; j++) {
        relevel_sym(16u * j, 16u, fmul(df, f32(i32(q3_scale(j)) - 32)), 4);
    }
    for (var k = 0u; k < 32u; k++) {
        var h = 0u;
        for (var b = 0u; b < 8u; b++) {
            if (lv[32u * b + k] > 3u) {
                h |= 1u << b;
            }
        }
        put8(o + k, h);
    }
    pack_2bit(o + 32u);
    for (var j = 0u; j < 12u; j++) {
        put8(o + 96u + j, scb[j]);
    }
    put16(o + 108u, dh);
}

// ---- entry point --------------------------------------------------------------

@compute @workgroup_size(GGML_WG)
fn ggml_quantize(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let bv = gp.block_values;
    let bb = gp.block_bytes;
    let per = gp.blocks_per_group;
    let words = per * bb / 4u;
    for (var g = gid.x; g < gp.n_groups; g += nwg.x * 64u) {
        bad = false;
        non_finite = false;
        for (var w = 0u; w < words; w++) {
            ow[w] = 0u;
        }
        for (var b = 0u; b < per; b++) {
            load_block((g * per + b) * bv, bv);
            let o = b * bb;
            switch DTYPE2 {
                case T_Q4_0: { q_sym(o, false); }
                case T_Q4_1: { q_affine(o, false); }
                case T_Q5_0: { q_sym(o, true); }
                case T_Q5_1: { q_affine(o, true); }
                case T_Q8_0: { q8_0(o); }
                case T_Q4_K: { qk_affine(o, false); }
                case T_Q5_K: { qk_affine(o, true); }
                case T_Q6_K: { q6_k(o); }
                case T_Q2_K: { q2_k(o); }
                case T_Q3_K: { q3_k(o); }
                default: {}
            }
        }
        for (var w = 0u; w < words; w++) {
            g_dst[g * words + w] = ow[w];
        }
        g_flags[g] = select(select(0u, 1u, bad), 2u, non_finite);
    }
}
