// Thresholding. `threshold`: w -> +0 where |w| < tau; |w| == tau and NaN are
// kept. Compared on bits: for non-negative floats the bit order is the value
// order, so no driver's subnormal or NaN handling can change the mask.
// `zero_rows`: zeroes the rows (or columns) a host-decided mask names.

struct ThresholdParams {
    n: u32,
    tau_bits: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> tp: ThresholdParams;
@group(0) @binding(1) var<storage, read> t_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> t_dst: array<u32>;
// [weights the rule zeroed, zeros in the output]
@group(0) @binding(3) var<storage, read_write> t_counts: array<atomic<u32>>;

var<workgroup> wg_count0: atomic<u32>;
var<workgroup> wg_count1: atomic<u32>;

@compute @workgroup_size(WG)
fn threshold(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let epw = elems_per_word(DTYPE);
    let words = (tp.n + epw - 1u) / epw;
    var pruned = 0u;
    var zeros = 0u;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        let word = t_src[w];
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let raw = lane_raw(word, l, DTYPE);
            let a = raw_to_f32_bits(raw, DTYPE) & 0x7fffffffu;
            let cut = a < tp.tau_bits;
            out |= lane_put(select(raw, 0u, cut), l, DTYPE);
            if (w * epw + l < tp.n) {
                pruned += u32(cut);
                zeros += u32(cut || a == 0u);
            }
        }
        t_dst[w] = out;
    }
    atomicAdd(&wg_count0, pruned);
    atomicAdd(&wg_count1, zeros);
    workgroupBarrier();
    if (lid == 0u) {
        atomicAdd(&t_counts[0], atomicLoad(&wg_count0));
        atomicAdd(&t_counts[1], atomicLoad(&wg_count1));
    }
}

struct RowParams {
    n: u32,
    row_len: u32,
    // Column of the chunk's first element within its row.
    col0: u32,
    // 0: the mask is per row (row 0 = the chunk's first row); 1: per column.
    by_col: u32,
}

@group(0) @binding(0) var<uniform> zp: RowParams;
@group(0) @binding(1) var<storage, read> z_src: array<u32>;
// One bit per line, 1 = zero it: the rows the chunk touches (bit 0 = the
// chunk's first row), or every column.
@group(0) @binding(2) var<storage, read> z_mask: array<u32>;
@group(0) @binding(3) var<storage, read_write> z_dst: array<u32>;
// [zeros in the output]
@group(0) @binding(4) var<storage, read_write> z_counts: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn zero_rows(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let epw = elems_per_word(DTYPE);
    let words = (zp.n + epw - 1u) / epw;
    var zeros = 0u;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        let word = z_src[w];
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let e = w * epw + l;
            let raw = lane_raw(word, l, DTYPE);
            let line = select((zp.col0 + e) / zp.row_len, (zp.col0 + e) % zp.row_len, zp.by_col != 0u);
            let cut = e < zp.n && ((z_mask[line / 32u] >> (line % 32u)) & 1u) != 0u;
            let kept = select(raw, 0u, cut);
            out |= lane_put(kept, l, DTYPE);
            if (e < zp.n) {
                zeros += u32((raw_to_f32_bits(kept, DTYPE) & 0x7fffffffu) == 0u);
            }
        }
        z_dst[w] = out;
    }
    atomicAdd(&wg_count0, zeros);
    workgroupBarrier();
    if (lid == 0u) {
        atomicAdd(&z_counts[0], atomicLoad(&wg_count0));
    }
}
