// The task-arithmetic family's combining pass (ops/merge/gpu.rs, the CPU
// reference `ops::merge::gta`): per element, each model's delta from the
// base, kept by its mask, rescaled and weighted; with consensus only the
// deltas agreeing with the sign of their sum count, each element divided by
// the weights that counted; otherwise divided by Σ weights (normalize); then
// base + λ·sum, written in the output dtype (DTYPE2). Inputs (DTYPE) lie in
// one binding: the base, then the k models, `stride` words apart.
//
// Masks are per-element tests, so every chunking gives the same ones:
// 0 keeps all; 1 keeps u < p with u the counter-based draw of (key, flat
// index) (ops/merge/rng.rs); 2 drops |δ| keys below `key0`, and those equal
// to it up to flat index `last0`; 3 keeps those not dropped by (key0,
// last0) but dropped by (key1, last1) (breadcrumbs); 4 reads a bit per
// element (DELLA's draws, made on the host).

struct GtaParams {
    n: u32,
    k: u32,
    stride: u32,
    start_lo: u32,
    start_hi: u32,
    flags: u32,
    lambda_bits: u32,
    divisor_bits: u32,
    cast_dt: u32,
    bits_row: u32,
    bits_words: u32,
    _pad0: u32,
}

// Per model, 12 words: kind, key0, key1, p, weight, scale (f32 bits),
// last0 (lo, hi), last1 (lo, hi), which lasts are set (bit 0, bit 1), and
// the model's offset into the bits (in u32 words).
struct GtaTerm {
    kind: u32,
    key0: u32,
    key1: u32,
    p_bits: u32,
    weight_bits: u32,
    scale_bits: u32,
    last0_lo: u32,
    last0_hi: u32,
    last1_lo: u32,
    last1_hi: u32,
    has_last: u32,
    bits_offset: u32,
}

@group(0) @binding(0) var<uniform> gp: GtaParams;
@group(0) @binding(1) var<storage, read> g_src: array<u32>;
@group(0) @binding(2) var<storage, read> g_terms: array<GtaTerm>;
@group(0) @binding(3) var<storage, read> g_bits: array<u32>;
@group(0) @binding(4) var<storage, read_write> g_dst: array<u32>;
@group(0) @binding(5) var<storage, read_write> g_kept: array<atomic<u32>>;

const MAX_MODELS: u32 = 16u;

fn mix32(x0: u32) -> u32 {
    var x = x0;
    x ^= x >> 16u;
    x *= 0x7feb352du;
    x ^= x >> 15u;
    x *= 0x846ca68bu;
    x ^= x >> 16u;
    return x;
}

// rng::uniform: 24 bits, exact in f32.
fn draw(key: u32, lo: u32, hi: u32) -> f32 {
    let h = mix32(key ^ mix32(lo ^ mix32(hi ^ 0x85ebca6bu)));
    return f32(h >> 8u) * (1.0 / 16777216.0);
}

// f32 bits `b` rounded through dtype `c` (mergekit's `dtype`); 3: none.
fn through_cast(b: u32, c: u32) -> u32 {
    if (c < 3u) {
        return raw_to_f32_bits(f32_bits_to_raw(b, c), c);
    }
    return b;
}

// Element `e` of input slot `s` as f32 bits, rounded through the cast
// dtype when there is one (mergekit's `dtype`).
fn load(s: u32, e: u32) -> u32 {
    let epw = elems_per_word(DTYPE);
    let b = raw_to_f32_bits(lane_raw(g_src[s * gp.stride + e / epw], e % epw, DTYPE), DTYPE);
    return through_cast(b, gp.cast_dt);
}

// Whether (lo, hi) ≤ (llo, lhi) as 64-bit numbers.
fn le64(lo: u32, hi: u32, llo: u32, lhi: u32) -> bool {
    return hi < lhi || (hi == lhi && lo <= llo);
}

// Whether the element (|δ| key `kk`, flat index lo/hi) is among the
// smallest that (key, last) cuts off.
fn smallest(kk: u32, key: u32, taken: bool, llo: u32, lhi: u32, lo: u32, hi: u32) -> bool {
    return kk < key || (kk == key && taken && le64(lo, hi, llo, lhi));
}

@compute @workgroup_size(WG)
fn gta_combine(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE2);
    let words = (gp.n + epw - 1u) / epw;
    let consensus = (gp.flags & 1u) != 0u;
    let norm_on = (gp.flags & 2u) != 0u;
    let lambda = bitcast<f32>(gp.lambda_bits);
    var kept: array<u32, MAX_MODELS>;
    for (var i = 0u; i < gp.k; i++) {
        kept[i] = 0u;
    }
    var bad = 0u;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let e = w * epw + l;
            if (e >= gp.n) {
                break;
            }
            let lo = gp.start_lo + e;
            let hi = gp.start_hi + select(0u, 1u, lo < e);
            let bb = load(0u, e);
            bad |= select(0u, 1u, !is_finite_bits(bb));
            let b = bitcast<f32>(bb);
            var wd: array<f32, MAX_MODELS>;
            for (var i = 0u; i < gp.k; i++) {
                let t = g_terms[i];
                let xb = load(i + 1u, e);
                bad |= select(0u, 1u, !is_finite_bits(xb));
                let d = bitcast<f32>(xb) - b;
                let kk = bitcast<u32>(d) & 0x7fffffffu;
                var keep = true;
                if (t.kind == 1u) {
                    keep = draw(t.key0, lo, hi) < bitcast<f32>(t.p_bits);
                } else if (t.kind == 2u) {
                    keep = !smallest(kk, t.key0, (t.has_last & 1u) != 0u, t.last0_lo, t.last0_hi, lo, hi);
                } else if (t.kind == 3u) {
                    let below = smallest(kk, t.key0, (t.has_last & 1u) != 0u, t.last0_lo, t.last0_hi, lo, hi);
                    let within = smallest(kk, t.key1, (t.has_last & 2u) != 0u, t.last1_lo, t.last1_hi, lo, hi);
                    keep = !below && within;
                } else if (t.kind == 4u) {
                    let row = e_row(lo);
                    let j = lo - row * gp.bits_row;
                    let word = t.bits_offset + row * gp.bits_words * 2u + j / 32u;
                    keep = ((g_bits[word] >> (j % 32u)) & 1u) == 1u;
                }
                let v = bitcast<f32>(t.weight_bits) * (d * bitcast<f32>(t.scale_bits));
                wd[i] = select(0.0, v, keep);
            }
            var sum = 0.0;
            var div = bitcast<f32>(gp.divisor_bits);
            if (consensus) {
                var total = 0.0;
                for (var i = 0u; i < gp.k; i++) {
                    total += wd[i];
                }
                div = 0.0;
                for (var i = 0u; i < gp.k; i++) {
                    let v = wd[i];
                    let k = v != 0.0 && ((v > 0.0) == (total >= 0.0));
                    sum += select(0.0, v, k);
                    div += select(0.0, bitcast<f32>(g_terms[i].weight_bits), k);
                    kept[i] += select(0u, 1u, k);
                }
                if (div == 0.0) {
                    div = 1.0;
                }
            } else {
                for (var i = 0u; i < gp.k; i++) {
                    sum += wd[i];
                    kept[i] += select(0u, 1u, wd[i] != 0.0);
                }
            }
            if (norm_on) {
                sum = sum / div;
            }
            let y = b + lambda * sum;
            out |= lane_put(f32_bits_to_raw(bitcast<u32>(y), DTYPE2), l, DTYPE2);
        }
        g_dst[w] = out;
    }
    for (var i = 0u; i < gp.k; i++) {
        if (kept[i] != 0u) {
            atomicAdd(&g_kept[i], kept[i]);
        }
    }
    if (bad != 0u) {
        atomicOr(&g_kept[MAX_MODELS], 1u);
    }
}

// The row of the (rows, bits_row) view holding flat index `lo` (bits are
// only used for tensors under 2³² elements).
fn e_row(lo: u32) -> u32 {
    return lo / gp.bits_row;
}

// The last pass of the methods that are a sum of inputs times coefficients
// (ops/merge/gpu_sum.rs; the CPU references `linear`, `slerp`, `nuslerp`,
// `model_stock`, `karcher`, `multislerp`, `nearswap`). Per element e of
// vector v (the whole tensor, a row, or a column: `layout`), in the
// references' order:
//   acc = init (+0 or −0: −0 + x is x, −0 included)
//   acc += c[v][i]·xᵢ (xᵢ − base with DELTA), for the k terms in order
//   acc = acc / div (DIVIDE)
//   y = p[v]·acc + q[v]·base (BLEND), else y = acc
// NEARSWAP instead: w = clamp(t / max(|a − b|, 1e-6), 0, 1), y = w·b +
// (1 − w)·a. Inputs (DTYPE) lie in one binding, `stride` words apart: the
// base first when there is one (HAS_BASE), then the terms. The table holds
// k + 2 numbers per vector: c[v][0..k], p[v], q[v].

struct SumParams {
    n: u32,
    k: u32,
    stride: u32,
    flags: u32,
    init_bits: u32,
    div_bits: u32,
    t_bits: u32,
    cast_dt: u32,
    vectors: u32,
    vlen: u32,
    offset: u32,
    _pad0: u32,
}

const SUM_HAS_BASE: u32 = 1u;
const SUM_DELTA: u32 = 2u;
const SUM_DIVIDE: u32 = 4u;
const SUM_BLEND: u32 = 8u;
const SUM_NEARSWAP: u32 = 16u;

@group(0) @binding(0) var<uniform> sp: SumParams;
@group(0) @binding(1) var<storage, read> s_src: array<u32>;
@group(0) @binding(2) var<storage, read> s_coef: array<f32>;
@group(0) @binding(3) var<storage, read_write> s_dst: array<u32>;
@group(0) @binding(4) var<storage, read_write> s_bad: array<atomic<u32>>;

// Element `e` of slot `s` as f32 bits, through the cast dtype if any.
fn sum_load(s: u32, e: u32) -> u32 {
    let epw = elems_per_word(DTYPE);
    let b = raw_to_f32_bits(lane_raw(s_src[s * sp.stride + e / epw], e % epw, DTYPE), DTYPE);
    return through_cast(b, sp.cast_dt);
}

// The vector of chunk element `e`: 0 (whole), its row counted from the
// chunk's first (offset: where the chunk starts in that row), or its
// column (offset: the chunk's start modulo the stride).
fn sum_vector(e: u32) -> u32 {
    if (sp.vectors == 1u) {
        return (sp.offset + e) / sp.vlen;
    }
    if (sp.vectors == 2u) {
        return (sp.offset + e) % sp.vlen;
    }
    return 0u;
}

@compute @workgroup_size(WG)
fn merge_sum(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE2);
    let words = (sp.n + epw - 1u) / epw;
    let has_base = (sp.flags & SUM_HAS_BASE) != 0u;
    let first = select(0u, 1u, has_base);
    let width = sp.k + 2u;
    var bad = 0u;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let e = w * epw + l;
            if (e >= sp.n) {
                break;
            }
            var b = 0.0;
            if (has_base) {
                let bb = sum_load(0u, e);
                bad |= select(0u, 1u, !is_finite_bits(bb));
                b = bitcast<f32>(bb);
            }
            var y = 0.0;
            if ((sp.flags & SUM_NEARSWAP) != 0u) {
                let xb = sum_load(1u, e);
                bad |= select(0u, 1u, !is_finite_bits(xb));
                let x = bitcast<f32>(xb);
                let wt = clamp(bitcast<f32>(sp.t_bits) / max(abs(b - x), 1e-6), 0.0, 1.0);
                y = wt * x + (1.0 - wt) * b;
            } else {
                let row = sum_vector(e) * width;
                var acc = bitcast<f32>(sp.init_bits);
                for (var i = 0u; i < sp.k; i++) {
                    let xb = sum_load(first + i, e);
                    bad |= select(0u, 1u, !is_finite_bits(xb));
                    var x = bitcast<f32>(xb);
                    if ((sp.flags & SUM_DELTA) != 0u) {
                        x = x - b;
                    }
                    acc += s_coef[row + i] * x;
                }
                if ((sp.flags & SUM_DIVIDE) != 0u) {
                    acc = acc / bitcast<f32>(sp.div_bits);
                }
                y = acc;
                if ((sp.flags & SUM_BLEND) != 0u) {
                    y = s_coef[row + sp.k] * acc + s_coef[row + sp.k + 1u] * b;
                }
            }
            out |= lane_put(f32_bits_to_raw(bitcast<u32>(y), DTYPE2), l, DTYPE2);
        }
        s_dst[w] = out;
    }
    if (bad != 0u) {
        atomicOr(&s_bad[0], 1u);
    }
}

// SCE's last pass (ops/merge/sce.rs, the CPU reference `sce`): per element,
// the k models' deltas from the base; with MASKED, all of them dropped
// where the deltas' variance (f32: the mean, then the mean squared
// deviation) is among the smallest the cut (key, last) takes; then the
// deltas agreeing with the sign of their sum averaged with the weights
// (divisor clamped to ≥ 1e-6) and added to the base.

struct SceParams {
    n: u32,
    k: u32,
    stride: u32,
    start_lo: u32,
    start_hi: u32,
    cast_dt: u32,
    masked: u32,
    key: u32,
    has_last: u32,
    last_lo: u32,
    last_hi: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> cp: SceParams;
@group(0) @binding(1) var<storage, read> c_src: array<u32>;
@group(0) @binding(2) var<storage, read> c_w: array<f32>;
@group(0) @binding(3) var<storage, read_write> c_dst: array<u32>;
@group(0) @binding(4) var<storage, read_write> c_bad: array<atomic<u32>>;

fn sce_load(s: u32, e: u32) -> u32 {
    let epw = elems_per_word(DTYPE);
    let b = raw_to_f32_bits(lane_raw(c_src[s * cp.stride + e / epw], e % epw, DTYPE), DTYPE);
    return through_cast(b, cp.cast_dt);
}

@compute @workgroup_size(WG)
fn sce_combine(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE2);
    let words = (cp.n + epw - 1u) / epw;
    let m = f32(cp.k);
    var bad = 0u;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let e = w * epw + l;
            if (e >= cp.n) {
                break;
            }
            let lo = cp.start_lo + e;
            let hi = cp.start_hi + select(0u, 1u, lo < e);
            let bb = sce_load(0u, e);
            bad |= select(0u, 1u, !is_finite_bits(bb));
            let b = bitcast<f32>(bb);
            var d: array<f32, MAX_MODELS>;
            var sum = 0.0;
            for (var i = 0u; i < cp.k; i++) {
                let xb = sce_load(i + 1u, e);
                bad |= select(0u, 1u, !is_finite_bits(xb));
                d[i] = bitcast<f32>(xb) - b;
                sum += d[i];
            }
            if (cp.masked != 0u) {
                let mean = sum / m;
                var v = 0.0;
                for (var i = 0u; i < cp.k; i++) {
                    let q = d[i] - mean;
                    v += q * q;
                }
                let kk = bitcast<u32>(v / m) & 0x7fffffffu;
                if (smallest(kk, cp.key, cp.has_last != 0u, cp.last_lo, cp.last_hi, lo, hi)) {
                    for (var i = 0u; i < cp.k; i++) {
                        d[i] = 0.0;
                    }
                    sum = 0.0;
                }
            }
            let pos = sum >= 0.0;
            var acc = 0.0;
            var div = 0.0;
            for (var i = 0u; i < cp.k; i++) {
                let v = d[i];
                if (v != 0.0 && (v > 0.0) == pos) {
                    acc += v * c_w[i];
                    div += c_w[i];
                }
            }
            let y = b + acc / max(div, 1e-6);
            out |= lane_put(f32_bits_to_raw(bitcast<u32>(y), DTYPE2), l, DTYPE2);
        }
        c_dst[w] = out;
    }
    if (bad != 0u) {
        atomicOr(&c_bad[0], 1u);
    }
}
