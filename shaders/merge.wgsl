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

// Element `e` of input slot `s` as f32 bits, rounded through the cast
// dtype when there is one (mergekit's `dtype`).
fn load(s: u32, e: u32) -> u32 {
    let epw = elems_per_word(DTYPE);
    let b = raw_to_f32_bits(lane_raw(g_src[s * gp.stride + e / epw], e % epw, DTYPE), DTYPE);
    if (gp.cast_dt < 3u) {
        return raw_to_f32_bits(f32_bits_to_raw(b, gp.cast_dt), gp.cast_dt);
    }
    return b;
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
