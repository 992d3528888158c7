// Self-checks of the exact-arithmetic helpers in common.wgsl, run by the
// tests against the CPU (and by anyone doubting an adapter).
struct CheckParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> chk: CheckParams;
// Pairs (a, b) as f32 bits.
@group(0) @binding(1) var<storage, read> chk_src: array<u32>;
@group(0) @binding(2) var<storage, read_write> chk_dst: array<u32>;

@compute @workgroup_size(WG)
fn div_check(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
) {
    for (var i = gid.x; i < chk.n; i += nwg.x * WG) {
        chk_dst[i] = div_rn(chk_src[2u * i], chk_src[2u * i + 1u]);
    }
}
