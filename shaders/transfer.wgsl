// Offsets: w + c (c = λ·x computed once on the host) and w + λ·Δ (Δ in
// DTYPE2, output in DTYPE). Infinities and NaN follow IEEE, decided on bits
// (see term_special in common.wgsl); NaN results are canonical.

struct ScalarParams {
    n: u32,
    c: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> op: ScalarParams;
@group(0) @binding(1) var<storage, read> o_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> o_dst: array<u32>;

@compute @workgroup_size(WG)
fn offset_scalar(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE);
    let words = (op.n + epw - 1u) / epw;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        let word = o_src[w];
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let xb = raw_to_f32_bits(lane_raw(word, l, DTYPE), DTYPE);
            let st = term_special(1.0, xb);
            let x = select(bitcast<f32>(xb), 0.0, st != 0u);
            let b = finish_special(st, x + op.c);
            out |= lane_put(f32_bits_to_raw(b, DTYPE), l, DTYPE);
        }
        o_dst[w] = out;
    }
}

struct TensorParams {
    n: u32,
    lambda: f32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> tdp: TensorParams;
@group(0) @binding(1) var<storage, read> td_src: array<u32>;
@group(0) @binding(2) var<storage, read> td_delta: array<u32>;
@group(0) @binding(3) var<storage, read_write> td_dst: array<u32>;

@compute @workgroup_size(WG)
fn offset_tensor(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE);
    let epw2 = elems_per_word(DTYPE2);
    let words = (tdp.n + epw - 1u) / epw;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        let word = td_src[w];
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let e = w * epw + l;
            let xb = raw_to_f32_bits(lane_raw(word, l, DTYPE), DTYPE);
            let db = raw_to_f32_bits(lane_raw(td_delta[e / epw2], e % epw2, DTYPE2), DTYPE2);
            let sx = term_special(1.0, xb);
            let sd = term_special(tdp.lambda, db);
            let x = select(bitcast<f32>(xb), 0.0, sx != 0u);
            let d = select(bitcast<f32>(db), 0.0, sd != 0u);
            let b = finish_special(sx | sd, x + tdp.lambda * d);
            out |= lane_put(f32_bits_to_raw(b, DTYPE), l, DTYPE);
        }
        td_dst[w] = out;
    }
}
