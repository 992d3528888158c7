// Matrix multiply (src/ops/matmul.rs): Y = C + alpha·(A·B) for rows
// [0, rows) of A (rows × K), B (K × N) whole and C (optional, rows × N).
// Each invocation owns one element of Y and adds the K products in
// ascending k, one rounding per product and per sum, as the CPU reference
// does; each product passes through an opaque bit operation (`zero` is 0 at
// run time) so that no driver fuses it into a multiply-add. Tiles of
// MM_TILE² values of A and B are staged in workgroup memory as f32. Y is
// f32 (the host rounds it to the output dtype). Dtypes (0 f32, 1 f16,
// 2 bf16) are parameters: the operands may differ. A non-finite input or
// result sets flags[0] (WGSL lets drivers assume there is none, so the
// host refuses such inputs).

struct MatmulParams {
    rows: u32,
    k: u32,
    n: u32,
    tiles_n: u32,
    a_dtype: u32,
    b_dtype: u32,
    c_dtype: u32,
    has_c: u32,
    alpha_bits: u32,
    zero: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> mp: MatmulParams;
@group(0) @binding(1) var<storage, read> mm_a: array<u32>;
@group(0) @binding(2) var<storage, read> mm_b: array<u32>;
@group(0) @binding(3) var<storage, read> mm_c: array<u32>;
@group(0) @binding(4) var<storage, read_write> mm_y: array<u32>;
@group(0) @binding(5) var<storage, read_write> mm_flags: array<atomic<u32>>;

var<workgroup> tile_a: array<array<f32, MM_TILE>, MM_TILE>;
var<workgroup> tile_b: array<array<f32, MM_TILE>, MM_TILE>;

fn mm_bits(w: u32, i: u32, dt: u32) -> u32 {
    return raw_to_f32_bits(lane_raw(w, i % elems_per_word(dt), dt), dt);
}

fn mm_value(b: u32) -> f32 {
    if (!is_finite_bits(b)) {
        atomicOr(&mm_flags[0], 1u);
        return 0.0;
    }
    return bitcast<f32>(b);
}

@compute @workgroup_size(MM_TILE, MM_TILE)
fn matmul(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let row = (wid.x / mp.tiles_n) * MM_TILE + lid.y;
    let col = (wid.x % mp.tiles_n) * MM_TILE + lid.x;
    var acc = 0.0;
    let tiles = (mp.k + MM_TILE - 1u) / MM_TILE;
    for (var t = 0u; t < tiles; t++) {
        let ka = t * MM_TILE + lid.x;
        let kb = t * MM_TILE + lid.y;
        var va = 0.0;
        if (row < mp.rows && ka < mp.k) {
            let i = row * mp.k + ka;
            va = mm_value(mm_bits(mm_a[i / elems_per_word(mp.a_dtype)], i, mp.a_dtype));
        }
        var vb = 0.0;
        if (kb < mp.k && col < mp.n) {
            let i = kb * mp.n + col;
            vb = mm_value(mm_bits(mm_b[i / elems_per_word(mp.b_dtype)], i, mp.b_dtype));
        }
        tile_a[lid.y][lid.x] = va;
        tile_b[lid.y][lid.x] = vb;
        workgroupBarrier();
        let kmax = min(MM_TILE, mp.k - t * MM_TILE);
        for (var kk = 0u; kk < kmax; kk++) {
            let p = bitcast<f32>(bitcast<u32>(tile_a[lid.y][kk] * tile_b[kk][lid.x]) ^ mp.zero);
            acc = acc + p;
        }
        workgroupBarrier();
    }
    if (row >= mp.rows || col >= mp.n) {
        return;
    }
    var y = bitcast<f32>(bitcast<u32>(bitcast<f32>(mp.alpha_bits) * acc) ^ mp.zero);
    let i = row * mp.n + col;
    if (mp.has_c != 0u) {
        y = mm_value(mm_bits(mm_c[i / elems_per_word(mp.c_dtype)], i, mp.c_dtype)) + y;
    }
    let yb = bitcast<u32>(y);
    if (!is_finite_bits(yb)) {
        atomicOr(&mm_flags[0], 2u);
    }
    mm_y[i] = yb;
}
