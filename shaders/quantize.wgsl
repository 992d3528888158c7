// Rounding. `quantize_i8`: q = clamp(round(w·m), qmin, qmax) with m per tensor
// or per row (Q for q = round(w·Q); 127/absmax for symmetric int8), packed
// four to a word. WGSL `round` is ties-to-even like the CPU reference's
// round_ties_even; the product is one correctly rounded multiply, and
// subnormal inputs are flushed on both sides, so the integers are exact.
// NaN -> 0 (counted), ±inf -> the saturated end (counted as clipped).
// `dequantize_i8`: w = q·scale, written in DTYPE. `convert`: DTYPE -> DTYPE2.

struct QuantParams {
    n: u32,
    row_len: u32,
    col0: u32,
    per_row: u32,
    qmin: i32,
    qmax: i32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> qp: QuantParams;
@group(0) @binding(1) var<storage, read> q_src: array<u32>;
@group(0) @binding(2) var<storage, read> q_mult: array<f32>;
@group(0) @binding(3) var<storage, read_write> q_dst: array<u32>;
// [clipped, NaN]
@group(0) @binding(4) var<storage, read_write> q_counts: array<atomic<u32>>;

var<workgroup> wg_clipped: atomic<u32>;
var<workgroup> wg_nan: atomic<u32>;

fn q_load(i: u32) -> u32 {
    let epw = elems_per_word(DTYPE);
    return raw_to_f32_bits(lane_raw(q_src[i / epw], i % epw, DTYPE), DTYPE);
}

@compute @workgroup_size(WG)
fn quantize_i8(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let words = (qp.n + 3u) / 4u;
    var clipped = 0u;
    var nans = 0u;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        var out = 0u;
        for (var l = 0u; l < 4u; l++) {
            let e = w * 4u + l;
            if (e >= qp.n) {
                break;
            }
            let xb = flush_subnormal(q_load(e));
            var q = 0;
            if (is_nan_bits(xb)) {
                nans += 1u;
            } else if (!is_finite_bits(xb)) {
                q = select(qp.qmax, qp.qmin, (xb & 0x80000000u) != 0u);
                clipped += 1u;
            } else {
                let r = select(0u, (qp.col0 + e) / qp.row_len, qp.per_row != 0u);
                let v = round(bitcast<f32>(xb) * q_mult[r]);
                if (v < f32(qp.qmin)) {
                    q = qp.qmin;
                    clipped += 1u;
                } else if (v > f32(qp.qmax)) {
                    q = qp.qmax;
                    clipped += 1u;
                } else {
                    q = i32(v);
                }
            }
            out |= (u32(q) & 0xffu) << (8u * l);
        }
        q_dst[w] = out;
    }
    atomicAdd(&wg_clipped, clipped);
    atomicAdd(&wg_nan, nans);
    workgroupBarrier();
    if (lid == 0u) {
        atomicAdd(&q_counts[0], atomicLoad(&wg_clipped));
        atomicAdd(&q_counts[1], atomicLoad(&wg_nan));
    }
}

struct DequantParams {
    n: u32,
    row_len: u32,
    col0: u32,
    per_row: u32,
}

@group(0) @binding(0) var<uniform> dp: DequantParams;
@group(0) @binding(1) var<storage, read> d_src: array<u32>;
@group(0) @binding(2) var<storage, read> d_scale: array<f32>;
@group(0) @binding(3) var<storage, read_write> d_dst: array<u32>;

@compute @workgroup_size(WG)
fn dequantize_i8(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE);
    let words = (dp.n + epw - 1u) / epw;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let e = w * epw + l;
            if (e < dp.n) {
                let q = i32(d_src[e / 4u] << (24u - 8u * (e % 4u))) >> 24u;
                let r = select(0u, (dp.col0 + e) / dp.row_len, dp.per_row != 0u);
                let v = f32(q) * d_scale[r];
                out |= lane_put(f32_bits_to_raw(bitcast<u32>(v), DTYPE), l, DTYPE);
            }
        }
        d_dst[w] = out;
    }
}

struct ConvertParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> cp: ConvertParams;
@group(0) @binding(1) var<storage, read> c_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> c_dst: array<u32>;

@compute @workgroup_size(WG)
fn convert(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw_in = elems_per_word(DTYPE);
    let epw = elems_per_word(DTYPE2);
    let words = (cp.n + epw - 1u) / epw;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let e = w * epw + l;
            if (e < cp.n) {
                let b = raw_to_f32_bits(lane_raw(c_src[e / epw_in], e % epw_in, DTYPE), DTYPE);
                out |= lane_put(f32_bits_to_raw(b, DTYPE2), l, DTYPE2);
            }
        }
        c_dst[w] = out;
    }
}
