// Mixture-of-experts gating (src/ops/moe.rs). `moe_route`: one invocation
// per token picks the k experts with the largest logits (compared as
// ordered integers, ties to the lower index: the same choice on every
// device) and their weights: softmax over all experts (mode 0, renormalized
// over the k when `renorm`), sigmoid (mode 1, renormalized when `renorm`,
// times `scale`), or Switch's top-1 softmax probability (mode 2). Sums run
// in ascending expert order; WGSL's exp is not correctly rounded, so the
// weights are within the bound stated in moe.rs of the CPU's. A non-finite
// logit sets flags[0].
// `moe_combine`: y[t, :] = Σⱼ w[t, j]·x[t, j, :] in ascending j, each
// product through an opaque bit operation (no fused multiply-add): the same
// bits as the CPU.

struct RouteParams {
    tokens: u32,
    experts: u32,
    k: u32,
    mode: u32,
    renorm: u32,
    scale_bits: u32,
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> rp: RouteParams;
@group(0) @binding(1) var<storage, read> r_logits: array<u32>;
@group(0) @binding(2) var<storage, read_write> r_experts: array<u32>;
@group(0) @binding(3) var<storage, read_write> r_weights: array<u32>;
@group(0) @binding(4) var<storage, read_write> r_flags: array<atomic<u32>>;

const MOE_K_MAX: u32 = 16u;

fn r_logit(t: u32, e: u32) -> u32 {
    let i = t * rp.experts + e;
    let epw = elems_per_word(DTYPE);
    return raw_to_f32_bits(lane_raw(r_logits[i / epw], i % epw, DTYPE), DTYPE);
}

fn r_key(b: u32) -> u32 {
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

@compute @workgroup_size(WG)
fn moe_route(@builtin(global_invocation_id) gid: vec3<u32>) {
    let t = gid.x;
    if (t >= rp.tokens) {
        return;
    }
    var sel: array<u32, 16>;
    var key: array<u32, 16>;
    var n = 0u;
    for (var e = 0u; e < rp.experts; e++) {
        let b = r_logit(t, e);
        if (!is_finite_bits(b)) {
            atomicOr(&r_flags[0], 1u);
            return;
        }
        let kb = r_key(b);
        // Insert if it beats the k-th (strictly: a tie keeps the lower index).
        if (n < rp.k || kb > key[n - 1u]) {
            var j = min(n, rp.k - 1u);
            while (j > 0u && kb > key[j - 1u]) {
                key[j] = key[j - 1u];
                sel[j] = sel[j - 1u];
                j -= 1u;
            }
            key[j] = kb;
            sel[j] = e;
            n = min(n + 1u, rp.k);
        }
    }
    var w: array<f32, 16>;
    let top = bitcast<f32>(r_logit(t, sel[0]));
    if (rp.mode == 1u) {
        var sum = 0.0;
        for (var j = 0u; j < rp.k; j++) {
            w[j] = 1.0 / (1.0 + exp(-bitcast<f32>(r_logit(t, sel[j]))));
            sum += w[j];
        }
        for (var j = 0u; j < rp.k; j++) {
            if (rp.renorm != 0u) {
                w[j] = w[j] / sum;
            }
            w[j] = w[j] * bitcast<f32>(rp.scale_bits);
        }
    } else {
        var denom = 0.0;
        for (var e = 0u; e < rp.experts; e++) {
            denom += exp(bitcast<f32>(r_logit(t, e)) - top);
        }
        var sum = 0.0;
        for (var j = 0u; j < rp.k; j++) {
            w[j] = exp(bitcast<f32>(r_logit(t, sel[j])) - top) / denom;
            sum += w[j];
        }
        if (rp.mode == 0u && rp.renorm != 0u) {
            for (var j = 0u; j < rp.k; j++) {
                w[j] = w[j] / sum;
            }
        }
    }
    for (var j = 0u; j < rp.k; j++) {
        r_experts[t * rp.k + j] = sel[j];
        r_weights[t * rp.k + j] = bitcast<u32>(w[j]);
    }
}

struct CombineParams {
    tokens: u32,
    k: u32,
    dim: u32,
    zero: u32,
}

@group(0) @binding(0) var<uniform> cbp: CombineParams;
@group(0) @binding(1) var<storage, read> c_x: array<u32>;
@group(0) @binding(2) var<storage, read> c_w: array<f32>;
@group(0) @binding(3) var<storage, read_write> c_y: array<u32>;

@compute @workgroup_size(WG)
fn moe_combine(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    let n = cbp.tokens * cbp.dim;
    let epw = elems_per_word(DTYPE);
    for (var i = gid.x; i < n; i += nwg.x * WG) {
        let t = i / cbp.dim;
        let d = i % cbp.dim;
        var acc = 0.0;
        for (var j = 0u; j < cbp.k; j++) {
            let xi = (t * cbp.k + j) * cbp.dim + d;
            let x = bitcast<f32>(raw_to_f32_bits(lane_raw(c_x[xi / epw], xi % epw, DTYPE), DTYPE));
            acc = acc + bitcast<f32>(bitcast<u32>(c_w[t * cbp.k + j] * x) ^ cbp.zero);
        }
        c_y[i] = bitcast<u32>(acc);
    }
}
