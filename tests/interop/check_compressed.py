#!/usr/bin/env python3
"""`modelpress quantize --scheme S` against a numpy re-implementation of
compressed-tensors' rules (llm-compressor 0.14 / compressed-tensors 0.19,
data-free: ../shared/reference/quantization.md §3.4), byte for byte: codes
and their packing, scales, zero points, global scales, shapes, names and
the quantization_config.

The models are built here: LLaMA-shaped layers whose down_proj holds every
finite bit pattern of its dtype in order (so groups span every exponent,
subnormals included), in bf16 and f16, and a f32 one with random weights.

    python3 tests/interop/check_compressed.py BIN DEVICE WORKDIR
"""
import json
import os
import subprocess
import sys

import numpy as np
from safetensors import safe_open

from interop_common import fail, from_raw, read_tensors, round_to, to_raw, write_safetensors

BIN, DEV, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(WORK, exist_ok=True)
EPS = {"BF16": 2.0**-7, "F16": 2.0**-10, "F32": 2.0**-23}
TINY = {"BF16": 2.0**-126, "F16": 2.0**-14, "F32": 2.0**-126}


# --- values as the file stores them ---------------------------------------

# --- codes -------------------------------------------------------------------

E4M3 = np.array([((8 + (c & 7)) * 2.0 ** ((c >> 3) - 10)) if c >> 3 else (c & 7) / 512.0
                 for c in range(127)], np.float64)


def e4m3(y):
    """float8_e4m3fn codes of |y| ≤ 448: nearest, ties to the even code."""
    a = np.abs(y.astype(np.float64)).ravel()
    i = np.clip(np.searchsorted(E4M3, a, side="left"), 1, 126)
    lo, hi = E4M3[i - 1], E4M3[i]
    pick = np.where(a - lo < hi - a, i - 1, np.where(a - lo > hi - a, i, np.where((i - 1) % 2 == 0, i - 1, i)))
    pick = np.where(a <= 0, 0, pick)
    return (pick | (np.signbit(y.ravel()).astype(np.int64) << 7)).reshape(y.shape).astype(np.uint8)


def e4m3_value(c):
    v = E4M3[np.minimum(c & 0x7F, 126)]
    return np.where(c & 0x80, -v, v).astype(np.float32)


def fp4(y):
    a = np.abs(y)
    m = np.select([a <= 0.25, a < 0.75, a <= 1.25, a < 1.75, a <= 2.5, a < 3.5, a <= 5.0],
                  [0, 1, 2, 3, 4, 5, 6], 7)
    return (m | (np.signbit(y).astype(np.int64) << 3)).astype(np.uint8)


def nibbles(c):
    """Rows of 4-bit codes -> bytes, element 2j in the low nibble."""
    c = c.astype(np.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


# --- the schemes ---------------------------------------------------------------

SCHEMES = {
    # name: (kind, bits, symmetric, strategy, group, format)
    "W8A16": ("int", 8, True, "group", 128, "pack-quantized"),
    "W4A16": ("int", 4, True, "group", 128, "pack-quantized"),
    "W4A16_ASYM": ("int", 4, False, "group", 128, "pack-quantized"),
    "W8A8": ("int", 8, True, "channel", None, "int-quantized"),
    "FP8_DYNAMIC": ("fp8", 8, True, "channel", None, "float-quantized"),
    "FP8_BLOCK": ("fp8", 8, True, "block", 128, "float-quantized"),
    "NVFP4A16": ("nvfp4", 4, True, "tensor_group", 16, "nvfp4-pack-quantized"),
    "MXFP4A16": ("mxfp4", 4, True, "group", 32, "mxfp4-pack-quantized"),
}


def groups_of(x, strategy, g):
    """(rows, cols) -> (n_groups_down, n_groups_across, values) and back."""
    r, c = x.shape
    if strategy == "channel":
        return x.reshape(r, 1, c), lambda y: y.reshape(r, c)
    if strategy == "block":
        R, C = -(-r // g) * g, -(-c // g) * g
        p = np.zeros((R, C), np.float32)
        p[:r, :c] = x
        b = p.reshape(R // g, g, C // g, g).transpose(0, 2, 1, 3).reshape(R // g, C // g, g * g)
        return b, lambda y: y.reshape(R // g, C // g, g, g).transpose(0, 2, 1, 3).reshape(R, C)[:r, :c]
    return x.reshape(r, c // g, g), lambda y: y.reshape(r, c)


def quantize(dt, x, scheme, gs=None):
    """The tensors llm-compressor writes for one Linear weight x (float32
    values exact in dt): {suffix: (dtype, shape, bytes)}."""
    kind, bits, sym, strategy, g, fmt = SCHEMES[scheme]
    rt = lambda v: round_to(dt, v)  # noqa: E731
    xg, back = groups_of(x, strategy, g)
    with np.errstate(all="ignore"):
        mn = np.minimum(xg.min(-1), 0).astype(np.float32)
        mx = np.maximum(xg.max(-1), 0).astype(np.float32)
        absmax = np.maximum(-mn, mx)
        zp = None
        if kind == "int":
            qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            levels = np.float32(2**bits - 1)
            if sym:
                s = rt(absmax / (levels / np.float32(2)))
                s[s == 0] = EPS[dt]
                z = np.zeros_like(s)
            else:
                s = rt(rt(mx - mn) / levels)
                zf = rt(np.float32(qmin) - rt(mn / s))
                z = np.where(np.isnan(zf), 0, np.rint(np.clip(zf, qmin, qmax))).astype(np.float32)
                s[s == 0] = EPS[dt]
                zp = z.astype(np.int64)
            y = rt(rt(xg / s[..., None]) + z[..., None])
            q = np.rint(np.clip(y, qmin, qmax)).astype(np.int64)
            scale = to_raw(dt, s)
        elif kind == "fp8":
            s = rt(absmax / np.float32(448))
            s[s == 0] = EPS[dt]
            q = e4m3(np.clip(rt(xg / s[..., None]) + np.float32(0), -448, 448))
            scale = to_raw(dt, s)
        elif kind == "nvfp4":
            s2 = np.float32(gs) * rt(absmax / np.float32(6))
            sc = e4m3(np.clip(s2, -448, 448))
            sc[e4m3_value(sc) == 0] = e4m3(np.float32([0.125]))[0]
            d = e4m3_value(sc) / np.float32(gs)
            q = fp4(np.clip(xg / d[..., None] + np.float32(0), -6, 6))
            scale = sc.tobytes()
        else:  # mxfp4
            mant = {"BF16": 7, "F16": 10, "F32": 23}[dt]
            exp = {"BF16": 8, "F16": 5, "F32": 8}[dt]
            if dt == "BF16":
                raw = absmax.view(np.uint32) >> 16
                p = (((raw + (1 << (mant - 2))) & (((1 << (exp + 1)) - 1) << mant)) << 16).astype(np.uint32).view(np.float32)
            elif dt == "F16":
                raw = absmax.astype(np.float16).view(np.uint16).astype(np.uint32)
                p = ((raw + (1 << (mant - 2))) & (((1 << (exp + 1)) - 1) << mant)).astype(np.uint16).view(np.float16).astype(np.float32)
            else:
                raw = absmax.view(np.uint32).astype(np.uint64)
                p = ((raw + (1 << (mant - 2))) & (((1 << (exp + 1)) - 1) << mant)).astype(np.uint32).view(np.float32)
            e = np.clip(127 + np.floor(np.log2(p)) - 2, 0, 255)
            s = rt(np.float32(2.0) ** (e.astype(np.float32) - 127)).astype(np.float32)
            s[s == 0] = 1
            stored = np.where(np.isinf(s), 127, 127 + np.floor(np.log2(s))).astype(np.uint8)  # torch: int32(inf) = INT_MIN
            q = fp4(np.clip(rt(xg / s[..., None]) + np.float32(0), -6, 6))
            scale = stored.tobytes()
    codes = back(q)
    rows, cols = x.shape
    gshape = tuple(xg.shape[:2])
    tdt = "F8_E4M3" if kind == "nvfp4" else "U8" if kind == "mxfp4" else dt
    out = {"weight_scale": (tdt, gshape, scale)}
    if fmt == "pack-quantized":
        u = (codes + 2 ** (bits - 1)).astype(np.uint8)
        packed = nibbles(u) if bits == 4 else u
        words = -(-cols * bits // 32)
        b = np.zeros((rows, words * 4), np.uint8)
        b[:, : packed.shape[1]] = packed
        out["weight_packed"] = ("I32", (rows, words), b.tobytes())
        out["weight_shape"] = ("I64", (2,), np.array([rows, cols], "<i8").tobytes())
        if zp is not None:
            zu = (zp + 2 ** (bits - 1)).astype(np.uint8).T  # (groups, rows)
            zb = nibbles(zu) if bits == 4 else zu
            zw = np.ascontiguousarray(zb).view("<i4").T  # (rows·bits/32, groups)
            out["weight_zero_point"] = ("I32", zw.shape, np.ascontiguousarray(zw).tobytes())
    elif fmt == "int-quantized":
        out["weight"] = ("I8", (rows, cols), codes.astype(np.int8).tobytes())
    elif fmt == "float-quantized":
        out["weight"] = ("F8_E4M3", (rows, cols), codes.astype(np.uint8).tobytes())
    else:
        out["weight_packed"] = ("U8", (rows, cols // 2), nibbles(codes).tobytes())
        if kind == "nvfp4":
            out["weight_global_scale"] = ("F32", (1,), np.float32([gs]).tobytes())
    return out


def global_scale(dt, mats):
    a = np.float32(max(float(np.abs(m).max()) for m in mats))
    a = np.float32(max(a, TINY[dt]))
    with np.errstate(all="ignore"):
        g = round_to(dt, round_to(dt, np.float32(1) / a) * np.float32(2688))
    return np.float32(g) if np.isfinite(g) else np.float32(1)


# --- the models ----------------------------------------------------------------

def build(dt, path):
    """A 1-layer LLaMA-shaped model in dt; down_proj holds every finite bit
    pattern of 16-bit dtypes in order."""
    rng = np.random.default_rng(7)
    h, inter = 256, 512
    w = lambda r, c: round_to(dt, rng.normal(0, 0.05, (r, c)).astype(np.float32))  # noqa: E731
    ts = {
        "model.embed_tokens.weight": w(64, h),
        "model.layers.0.input_layernorm.weight": np.ones(h, np.float32),
        "model.layers.0.self_attn.q_proj.weight": w(h, h),
        "model.layers.0.self_attn.k_proj.weight": w(128, h) * np.float32(4),
        "model.layers.0.self_attn.v_proj.weight": w(128, h),
        "model.layers.0.self_attn.o_proj.weight": w(h, h),
        "model.layers.0.mlp.gate_proj.weight": w(inter, h),
        "model.layers.0.mlp.up_proj.weight": w(inter, h),
        "model.layers.0.post_attention_layernorm.weight": np.ones(h, np.float32),
        "model.norm.weight": np.ones(h, np.float32),
        "lm_head.weight": w(64, h),
    }
    if dt == "F32":
        d = w(h, inter)
        d[3, :64] = 0
        d[5, 128:256] = 1e-42  # subnormal
        d[7, 5] = 1e30
    else:
        if dt == "BF16":
            bits = np.arange(65536, dtype=np.uint32)
            v = (bits << 16).view(np.float32)
        else:
            v = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
        v = v[np.isfinite(v)]
        d = np.zeros(h * inter, np.float32)
        d[: v.size] = v  # the rest stays 0: all-zero groups
        d = d.reshape(h, inter)
    ts["model.layers.0.mlp.down_proj.weight"] = d
    os.makedirs(path, exist_ok=True)
    write_safetensors(os.path.join(path, "model.safetensors"),
                      {k: (dt, v.shape, to_raw(dt, v)) for k, v in ts.items()})
    json.dump({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
               "intermediate_size": inter, "num_hidden_layers": 1, "num_attention_heads": 4,
               "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 128,
               "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
               "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dt]},
              open(os.path.join(path, "config.json"), "w"))
    return ts


FUSED = [("gate_proj", "up_proj"), ("q_proj", "k_proj", "v_proj")]

checked = 0
for dt in ("BF16", "F16", "F32"):
    base = os.path.join(WORK, f"base-{dt}")
    ts = build(dt, base)
    linear = [k for k, v in ts.items() if v.ndim == 2 and "embed" not in k and k != "lm_head.weight"]
    for scheme, (kind, bits, sym, strategy, g, fmt) in SCHEMES.items():
        out = os.path.join(WORK, f"{scheme}-{dt}")
        # The largest values dequantize beyond the dtype (−128·scale):
        # allowed, the bytes are what is checked.
        r = subprocess.run([BIN, "quantize", base, "-o", out, "--scheme", scheme, "--device", DEV, "--force",
                            "--allow-nonfinite"], capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"{scheme} {dt}: {r.stderr.strip()}")
        got = read_tensors(out)
        want = {}
        for k, v in ts.items():
            if k not in linear:
                want[k] = (dt, v.shape, to_raw(dt, v))
                continue
            gs = None
            if kind == "nvfp4":
                leaf = k.split(".")[-2]
                grp = next((f for f in FUSED if leaf in f), (leaf,))
                gs = global_scale(dt, [ts[k.replace(leaf, m)] for m in grp])
            for suffix, t in quantize(dt, v, scheme, gs).items():
                want[k[: -len("weight")] + suffix] = t
        if set(got) != set(want):
            fail(f"{scheme} {dt}: tensors {sorted(set(got) ^ set(want))}")
        for k in sorted(want):
            if got[k][:2] != (want[k][0], tuple(want[k][1])):
                fail(f"{scheme} {dt} {k}: {got[k][:2]} != {want[k][:2]}")
            if got[k][2] != want[k][2]:
                a, b = np.frombuffer(got[k][2], np.uint8), np.frombuffer(want[k][2], np.uint8)
                i = int(np.argmax(a != b))
                fail(f"{scheme} {dt} {k}: {int((a != b).sum())} bytes differ, first at {i}")
            checked += 1
        qc = json.load(open(os.path.join(out, "config.json")))["quantization_config"]
        w = qc["config_groups"]["group_0"]["weights"]
        expect = {"num_bits": bits, "type": "int" if kind == "int" else "float", "symmetric": sym,
                  "strategy": strategy, "group_size": None if strategy in ("channel", "block") else g,
                  "block_structure": [128, 128] if strategy == "block" else None,
                  "observer": "memoryless_minmax", "zp_dtype": None if sym else "torch.int8"}
        bad = {k: (w.get(k), v) for k, v in expect.items() if w.get(k) != v}
        if bad or qc["format"] != fmt or qc["ignore"] != ["lm_head"] or qc["quant_method"] != "compressed-tensors" \
                or qc["quantization_status"] != "compressed" or qc["config_groups"]["group_0"]["targets"] != ["Linear"]:
            fail(f"{scheme} {dt}: quantization_config {json.dumps(qc)} ({bad})")
        if not os.path.exists(os.path.join(out, "recipe.yaml")):
            fail(f"{scheme} {dt}: no recipe.yaml")
print(f"interop ok: compressed-tensors {DEV}: {checked} tensors of 8 schemes x 3 dtypes equal numpy's bytes")
