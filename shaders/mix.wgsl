// Weighted sums. `mix`: out = p0·w0 + p1·w1 + ... (left to right) over k
// inputs laid one after another in one binding, `stride` words apart (so 16
// inputs need one storage binding, not 16). `mix_rows`: per column, the sum
// over a tile of rows of p_i·W[i, c], started at the tile's first row; the
// host adds the tiles' partial sums in order. Specials as in transfer.

struct MixParams {
    n: u32,
    k: u32,
    stride: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> mp: MixParams;
@group(0) @binding(1) var<storage, read> m_src: array<u32>;
@group(0) @binding(2) var<storage, read> m_w: array<f32>;
@group(0) @binding(3) var<storage, read_write> m_dst: array<u32>;

@compute @workgroup_size(WG)
fn mix(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE);
    let words = (mp.n + epw - 1u) / epw;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            var st = 0u;
            var acc = 0.0;
            for (var i = 0u; i < mp.k; i++) {
                let xb = raw_to_f32_bits(lane_raw(m_src[i * mp.stride + w], l, DTYPE), DTYPE);
                let p = m_w[i];
                let s = term_special(p, xb);
                st |= s;
                let t = p * select(bitcast<f32>(xb), 0.0, s != 0u);
                acc = select(acc + t, t, i == 0u);
            }
            out |= lane_put(f32_bits_to_raw(finish_special(st, acc), DTYPE), l, DTYPE);
        }
        m_dst[w] = out;
    }
}

struct RowMixParams {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> rmp: RowMixParams;
@group(0) @binding(1) var<storage, read> rm_src: array<u32>;
@group(0) @binding(2) var<storage, read> rm_w: array<f32>;
@group(0) @binding(3) var<storage, read_write> rm_acc: array<f32>;
@group(0) @binding(4) var<storage, read_write> rm_state: array<u32>;

@compute @workgroup_size(WG)
fn mix_rows(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE);
    for (var c = gid.x; c < rmp.cols; c += nwg.x * WG) {
        var st = 0u;
        var acc = 0.0;
        for (var r = 0u; r < rmp.rows; r++) {
            let e = r * rmp.cols + c;
            let xb = raw_to_f32_bits(lane_raw(rm_src[e / epw], e % epw, DTYPE), DTYPE);
            let p = rm_w[r];
            let s = term_special(p, xb);
            st |= s;
            let t = p * select(bitcast<f32>(xb), 0.0, s != 0u);
            acc = select(acc + t, t, r == 0u);
        }
        rm_acc[c] = acc;
        rm_state[c] = st;
    }
}
