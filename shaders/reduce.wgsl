// Reductions the other kernels need: per-row figures (norms for neuron
// pruning, abs-max for per-row int8 scales) and whole-tensor abs-max and
// counts. Maxima are taken on the bits of |w| (exact on every adapter; NaN
// sorts above +inf). Sums are float and order-dependent: the host treats them
// as approximate and decides close cases with the CPU reference.

struct PieceParams {
    n: u32,
    row_len: u32,
    col0: u32,
    piece_len: u32,
    // Pieces in this chunk; pieces per row; the chunk's first piece within
    // its (first) row.
    pieces: u32,
    ppr: u32,
    p0: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> rp: PieceParams;
@group(0) @binding(1) var<storage, read> r_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> r_sumsq: array<f32>;
@group(0) @binding(3) var<storage, read_write> r_sumabs: array<f32>;
@group(0) @binding(4) var<storage, read_write> r_max: array<u32>;

var<workgroup> ws_sq: array<f32, WG>;
var<workgroup> ws_abs: array<f32, WG>;
var<workgroup> ws_max: array<u32, WG>;

fn r_load(i: u32) -> u32 {
    let epw = elems_per_word(DTYPE);
    return raw_to_f32_bits(lane_raw(r_src[i / epw], i % epw, DTYPE), DTYPE);
}

// One workgroup per piece: the part of one row (at most piece_len long)
// that lies in this chunk.
@compute @workgroup_size(WG)
fn row_stats(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    for (var k = wid.x; k < rp.pieces; k += nwg.x) {
        let g = rp.p0 + k;
        let row_start = (g / rp.ppr) * rp.row_len;
        let c_begin = (g % rp.ppr) * rp.piece_len;
        let c_end = min(c_begin + rp.piece_len, rp.row_len);
        let b = max(row_start + c_begin, rp.col0) - rp.col0;
        let e = min(row_start + c_end - rp.col0, rp.n);
        var sq = 0.0;
        var ab = 0.0;
        var mx = 0u;
        for (var i = b + lid; i < e; i += WG) {
            let xb = r_load(i);
            let x = bitcast<f32>(xb);
            sq += x * x;
            ab += abs(x);
            mx = max(mx, xb & 0x7fffffffu);
        }
        ws_sq[lid] = sq;
        ws_abs[lid] = ab;
        ws_max[lid] = mx;
        workgroupBarrier();
        for (var h = WG / 2u; h > 0u; h >>= 1u) {
            if (lid < h) {
                ws_sq[lid] += ws_sq[lid + h];
                ws_abs[lid] += ws_abs[lid + h];
                ws_max[lid] = max(ws_max[lid], ws_max[lid + h]);
            }
            workgroupBarrier();
        }
        if (lid == 0u) {
            r_sumsq[k] = ws_sq[0];
            r_sumabs[k] = ws_abs[0];
            r_max[k] = ws_max[0];
        }
        workgroupBarrier();
    }
}

struct StatParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> sp: StatParams;
@group(0) @binding(1) var<storage, read> s_src: array<u32>;
// [max of |w| bits (NaN above inf), non-finite count, zero count]
@group(0) @binding(2) var<storage, read_write> s_out: array<atomic<u32>>;

var<workgroup> wg_max: atomic<u32>;
var<workgroup> wg_nonfinite: atomic<u32>;
var<workgroup> wg_zeros: atomic<u32>;

@compute @workgroup_size(WG)
fn tensor_stats(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let epw = elems_per_word(DTYPE);
    let words = (sp.n + epw - 1u) / epw;
    var mx = 0u;
    var nonfinite = 0u;
    var zeros = 0u;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        let word = s_src[w];
        for (var l = 0u; l < epw; l++) {
            if (w * epw + l < sp.n) {
                let a = raw_to_f32_bits(lane_raw(word, l, DTYPE), DTYPE) & 0x7fffffffu;
                mx = max(mx, a);
                nonfinite += u32(a >= 0x7f800000u);
                zeros += u32(a == 0u);
            }
        }
    }
    atomicMax(&wg_max, mx);
    atomicAdd(&wg_nonfinite, nonfinite);
    atomicAdd(&wg_zeros, zeros);
    workgroupBarrier();
    if (lid == 0u) {
        atomicMax(&s_out[0], atomicLoad(&wg_max));
        atomicAdd(&s_out[1], atomicLoad(&wg_nonfinite));
        atomicAdd(&s_out[2], atomicLoad(&wg_zeros));
    }
}

// Per-column figures of a tile of rows (rows × cols, row-major): each
// invocation sums one column down the tile's rows; the host adds tiles.
struct ColParams {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> colp: ColParams;
@group(0) @binding(1) var<storage, read> col_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> col_sumsq: array<f32>;
@group(0) @binding(3) var<storage, read_write> col_sumabs: array<f32>;
@group(0) @binding(4) var<storage, read_write> col_max: array<u32>;

@compute @workgroup_size(WG)
fn col_stats(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE);
    for (var c = gid.x; c < colp.cols; c += nwg.x * WG) {
        var sq = 0.0;
        var ab = 0.0;
        var mx = 0u;
        for (var r = 0u; r < colp.rows; r++) {
            let e = r * colp.cols + c;
            let xb = raw_to_f32_bits(lane_raw(col_src[e / epw], e % epw, DTYPE), DTYPE);
            let x = bitcast<f32>(xb);
            sq += x * x;
            ab += abs(x);
            mx = max(mx, xb & 0x7fffffffu);
        }
        col_sumsq[c] = sq;
        col_sumabs[c] = ab;
        col_max[c] = mx;
    }
}
