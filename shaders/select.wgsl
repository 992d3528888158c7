// Exact-count selection for target sparsity. The key of a weight is the bit
// pattern of |w| as f32 (integer order = value order; NaN sorts last). The
// cut is found by a 16-bit radix select over key histograms; `cut_apply`
// prunes keys below the cut and lists the positions of keys equal to it, of
// which the host prunes the first ones in flat order (ties to the lower
// index), so the mask is exact and identical on every device.

struct HistParams {
    n: u32,
    // 0: bins are the key's high 16 bits; 1: the low 16 bits of keys whose
    // high 16 bits equal `high`.
    level: u32,
    high: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> hp: HistParams;
@group(0) @binding(1) var<storage, read> h_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> h_bins: array<atomic<u32>>;

fn key_of(raw: u32, dt: u32) -> u32 {
    return raw_to_f32_bits(raw, dt) & 0x7fffffffu;
}

@compute @workgroup_size(WG)
fn key_hist(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE);
    let words = (hp.n + epw - 1u) / epw;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        let word = h_src[w];
        for (var l = 0u; l < epw; l++) {
            if (w * epw + l < hp.n) {
                let key = key_of(lane_raw(word, l, DTYPE), DTYPE);
                if (hp.level == 0u) {
                    atomicAdd(&h_bins[key >> 16u], 1u);
                } else if ((key >> 16u) == hp.high) {
                    atomicAdd(&h_bins[key & 0xffffu], 1u);
                }
            }
        }
    }
}

struct CutParams {
    n: u32,
    cut: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> cp: CutParams;
@group(0) @binding(1) var<storage, read> c_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> c_dst: array<u32>;
// Chunk-local positions of keys equal to the cut, in no particular order.
@group(0) @binding(3) var<storage, read_write> c_ties: array<u32>;
// [ties listed, zeros in the output (ties not counted)]
@group(0) @binding(4) var<storage, read_write> c_counts: array<atomic<u32>>;

var<workgroup> wg_zeros: atomic<u32>;

@compute @workgroup_size(WG)
fn cut_apply(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let epw = elems_per_word(DTYPE);
    let words = (cp.n + epw - 1u) / epw;
    var zeros = 0u;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        let word = c_src[w];
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let e = w * epw + l;
            let raw = lane_raw(word, l, DTYPE);
            let key = key_of(raw, DTYPE);
            let cut = key < cp.cut;
            out |= lane_put(select(raw, 0u, cut), l, DTYPE);
            if (e < cp.n) {
                if (key == cp.cut) {
                    c_ties[atomicAdd(&c_counts[0], 1u)] = e;
                } else {
                    zeros += u32(cut || key == 0u);
                }
            }
        }
        c_dst[w] = out;
    }
    atomicAdd(&wg_zeros, zeros);
    workgroupBarrier();
    if (lid == 0u) {
        atomicAdd(&c_counts[1], atomicLoad(&wg_zeros));
    }
}

// N:M patterns: in each run of M consecutive weights along a row (from the
// row's start), at most N stay: the N largest |w| (by key), ties to the lower
// index. Each invocation owns whole output words and ranks each of its
// elements within its group, so nothing races and the mask is exact.
struct NmParams {
    n: u32,
    // Length of the row segments in this chunk (whole rows, or one part of
    // a row that starts on a group boundary).
    seg_len: u32,
    m: u32,
    keep: u32,
    // 1: rank by |w|·x[column] (activation-aware), x indexed from the
    // segment's start.
    use_scores: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> np: NmParams;
@group(0) @binding(1) var<storage, read> nm_src: array<u32>;
@group(0) @binding(2) var<storage, read> nm_x: array<f32>;
@group(0) @binding(3) var<storage, read_write> nm_dst: array<u32>;

// The key of an activation-aware score |w|·x: both flushed of subnormals
// and one correctly rounded product, so every adapter agrees; a
// non-finite weight gets the largest key. x is finite and ≥ 0 (checked).
fn score_key(wbits: u32, x: f32) -> u32 {
    let a = flush_subnormal(wbits & 0x7fffffffu);
    if (a >= 0x7f800000u) {
        return 0x7fffffffu;
    }
    return flush_subnormal(bitcast<u32>(bitcast<f32>(a) * x)) & 0x7fffffffu;
}

fn nm_key_of(raw: u32, e: u32) -> u32 {
    let b = raw_to_f32_bits(raw, DTYPE);
    if (np.use_scores != 0u) {
        return score_key(b, nm_x[e % np.seg_len]);
    }
    return b & 0x7fffffffu;
}

fn nm_key(i: u32) -> u32 {
    let epw = elems_per_word(DTYPE);
    return nm_key_of(lane_raw(nm_src[i / epw], i % epw, DTYPE), i);
}

@compute @workgroup_size(WG)
fn nm_prune(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let epw = elems_per_word(DTYPE);
    let words = (np.n + epw - 1u) / epw;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        let word = nm_src[w];
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let e = w * epw + l;
            let raw = lane_raw(word, l, DTYPE);
            var kept = true;
            if (e < np.n) {
                let col = e % np.seg_len;
                let g0 = e - col + (col / np.m) * np.m;
                let glen = min(np.m, np.seg_len - (col / np.m) * np.m);
                // A short group at a row's end is the tail, kept dense (the
                // host refuses it unless asked).
                if (glen == np.m) {
                    let ke = nm_key_of(raw, e);
                    var rank = 0u;
                    for (var i = g0; i < g0 + glen; i++) {
                        let ki = nm_key(i);
                        rank += u32(ki > ke || (ki == ke && i < e));
                    }
                    kept = rank < np.keep;
                }
            }
            out |= lane_put(select(0u, raw, kept), l, DTYPE);
        }
        nm_dst[w] = out;
    }
}

// Per-row exact selection (activation-aware sparsity): in each row, the k
// smallest keys go, ties to the lower index. `row_cut` finds each row's cut
// with a 4-digit radix select in workgroup memory (one workgroup per row);
// `row_cut_apply` applies it and lists the ties of rows that prune only
// some of theirs, for the host to take in index order.
struct RowCutParams {
    n: u32,
    row_len: u32,
    k: u32,
    use_scores: u32,
}

@group(0) @binding(0) var<uniform> rcp: RowCutParams;
@group(0) @binding(1) var<storage, read> rc_src: array<u32>;
@group(0) @binding(2) var<storage, read> rc_x: array<f32>;
// Per row: [cut key, ties to prune, keys equal to the cut]
@group(0) @binding(3) var<storage, read_write> rc_out: array<u32>;

var<workgroup> rc_hist: array<atomic<u32>, 256>;
var<workgroup> rc_state: array<u32, 3>;

fn rc_key(i: u32) -> u32 {
    let epw = elems_per_word(DTYPE);
    let b = raw_to_f32_bits(lane_raw(rc_src[i / epw], i % epw, DTYPE), DTYPE);
    if (rcp.use_scores != 0u) {
        return score_key(b, rc_x[i % rcp.row_len]);
    }
    return b & 0x7fffffffu;
}

@compute @workgroup_size(WG)
fn row_cut(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let rows = rcp.n / rcp.row_len;
    for (var r = wid.x; r < rows; r += nwg.x) {
        let base = r * rcp.row_len;
        if (lid == 0u) {
            rc_state[0] = 0u;
            rc_state[1] = rcp.k;
            rc_state[2] = 0u;
        }
        workgroupBarrier();
        for (var d = 0u; d < 4u; d++) {
            let shift = 24u - 8u * d;
            atomicStore(&rc_hist[lid], 0u);
            workgroupBarrier();
            let prefix = rc_state[0];
            for (var i = lid; i < rcp.row_len; i += WG) {
                let key = rc_key(base + i);
                if (d == 0u || (key >> (shift + 8u)) == prefix) {
                    atomicAdd(&rc_hist[(key >> shift) & 255u], 1u);
                }
            }
            workgroupBarrier();
            if (lid == 0u) {
                let remaining = rc_state[1];
                var b = 0u;
                var cum = 0u;
                loop {
                    let h = atomicLoad(&rc_hist[b]);
                    if (cum + h >= remaining || b == 255u) {
                        break;
                    }
                    cum += h;
                    b += 1u;
                }
                rc_state[0] = (prefix << 8u) | b;
                rc_state[1] = remaining - cum;
                rc_state[2] = atomicLoad(&rc_hist[b]);
            }
            workgroupBarrier();
        }
        if (lid == 0u) {
            rc_out[3u * r] = rc_state[0];
            rc_out[3u * r + 1u] = rc_state[1];
            rc_out[3u * r + 2u] = rc_state[2];
        }
        workgroupBarrier();
    }
}

struct RowApplyParams {
    n: u32,
    row_len: u32,
    use_scores: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> rap: RowApplyParams;
@group(0) @binding(1) var<storage, read> ra_src: array<u32>;
@group(0) @binding(2) var<storage, read> ra_x: array<f32>;
@group(0) @binding(3) var<storage, read> ra_cuts: array<u32>;
@group(0) @binding(4) var<storage, read_write> ra_dst: array<u32>;
@group(0) @binding(5) var<storage, read_write> ra_ties: array<u32>;
// [ties listed, zeros in the output (listed ties not counted)]
@group(0) @binding(6) var<storage, read_write> ra_counts: array<atomic<u32>>;

@compute @workgroup_size(WG)
fn row_cut_apply(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let epw = elems_per_word(DTYPE);
    let words = (rap.n + epw - 1u) / epw;
    var zeros = 0u;
    for (var w = gid.x; w < words; w += nwg.x * WG) {
        let word = ra_src[w];
        var out = 0u;
        for (var l = 0u; l < epw; l++) {
            let e = w * epw + l;
            let raw = lane_raw(word, l, DTYPE);
            var prune = false;
            if (e < rap.n) {
                let r = e / rap.row_len;
                let b = raw_to_f32_bits(raw, DTYPE);
                var key = b & 0x7fffffffu;
                if (rap.use_scores != 0u) {
                    key = score_key(b, ra_x[e % rap.row_len]);
                }
                let cut = ra_cuts[3u * r];
                let ties = ra_cuts[3u * r + 1u];
                let equal = ra_cuts[3u * r + 2u];
                prune = key < cut || (key == cut && ties == equal && ties > 0u);
                if (key == cut && ties > 0u && ties < equal) {
                    ra_ties[atomicAdd(&ra_counts[0], 1u)] = e;
                } else {
                    zeros += u32(prune || (b & 0x7fffffffu) == 0u);
                }
            }
            out |= lane_put(select(raw, 0u, prune), l, DTYPE);
        }
        ra_dst[w] = out;
    }
    atomicAdd(&wg_zeros, zeros);
    workgroupBarrier();
    if (lid == 0u) {
        atomicAdd(&ra_counts[1], atomicLoad(&wg_zeros));
    }
}
