#!/usr/bin/env python3
"""`modelpress lora merge` against numpy: adapters written here in PEFT's
layout (adapter_config.json + adapter_model.safetensors, f32 factors) for a
bf16 base, merged, and every tensor compared with W + Σ wᵢ·sᵢ·ΔWᵢ computed
in float64 and rounded to bf16 (at most 1 ulp apart: modelpress sums in
f32). Covers rsLoRA, rank and alpha patterns (first stored key wins),
lora_bias, fan_in_fan_out, embeddings with base_layer, modules_to_save,
DoRA, weighted adapters and --unmerge.

    python3 tests/interop/check_lora.py BIN DEVICE WORKDIR
"""
import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from interop_common import bf16_round, fail, from_raw, read_tensors, to_raw, write_safetensors

BIN, DEV, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(WORK, exist_ok=True)
rng = np.random.default_rng(11)
H, I, V = 64, 96, 128


def bf16(shape, std):
    return bf16_round(rng.normal(0, std, shape).astype(np.float32))


BASE = {
    "model.embed_tokens.weight": bf16((V, H), 0.5),
    "model.layers.0.self_attn.q_proj.weight": bf16((H, H), 0.05),
    "model.layers.0.self_attn.q_proj.bias": bf16((H,), 0.05),
    "model.layers.0.self_attn.o_proj.weight": bf16((H, H), 0.05),
    "model.layers.1.self_attn.q_proj.weight": bf16((H, H), 0.05),
    "model.layers.0.mlp.c_fc.weight": bf16((H, I), 0.05),  # Conv1D: [in, out]
    "model.norm.weight": np.ones(H, np.float32),
    "lm_head.weight": bf16((V, H), 0.05),
}
base = os.path.join(WORK, "base")
os.makedirs(base, exist_ok=True)
write_safetensors(os.path.join(base, "model.safetensors"),
                  {k: ("BF16", v.shape, to_raw("BF16", v)) for k, v in BASE.items()})
json.dump({"model_type": "llama", "hidden_size": H}, open(os.path.join(base, "config.json"), "w"))


def adapter(name, config, modules, full=None):
    """modules: {path: dict(a=..., b=..., kind="linear"|"embedding", m=..., bias=..., base=...)}."""
    d = os.path.join(WORK, name)
    os.makedirs(d, exist_ok=True)
    t = {}
    for path, p in modules.items():
        pre = f"base_model.model.{path}"
        if p.get("kind") == "embedding":
            t[f"{pre}.lora_embedding_A"], t[f"{pre}.lora_embedding_B"] = p["a"], p["b"]
        else:
            t[f"{pre}.lora_A.weight"], t[f"{pre}.lora_B.weight"] = p["a"], p["b"]
        if "m" in p:
            t[f"{pre}.lora_magnitude_vector"] = p["m"]
        if "bias" in p:
            t[f"{pre}.lora_B.bias"] = p["bias"]
        if "base" in p:
            t[f"{pre}.base_layer.weight"] = p["base"]
    for k, v in (full or {}).items():
        t[f"base_model.model.{k}"] = v
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in t.items()}, os.path.join(d, "adapter_model.safetensors"))
    json.dump({"peft_type": "LORA", **config}, open(os.path.join(d, "adapter_config.json"), "w"))
    return d


f32 = lambda *s: rng.normal(0, 0.3, s).astype(np.float32)  # noqa: E731
q0, o0, q1 = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj"
A1 = dict(config={"r": 8, "lora_alpha": 16, "use_rslora": True, "lora_bias": True,
                  # Stored order: the first key matching wins, as in PEFT.
                  "rank_pattern": {"o_proj": 4, "layers.0.self_attn.o_proj": 2},
                  "alpha_pattern": {"layers.0.self_attn.q_proj": 12}},
          modules={q0: dict(a=f32(8, H), b=f32(H, 8), bias=f32(H)), o0: dict(a=f32(4, H), b=f32(H, 4)),
                   q1: dict(a=f32(8, H), b=f32(H, 8))})
A2 = dict(config={"r": 4, "lora_alpha": 4, "fan_in_fan_out": True},
          modules={"model.layers.0.mlp.c_fc": dict(a=f32(4, H), b=f32(I, 4))})
A3 = dict(config={"r": 4, "lora_alpha": 8, "modules_to_save": ["lm_head"]},
          modules={"model.embed_tokens": dict(kind="embedding", a=f32(4, V), b=f32(H, 4),
                                              base=BASE["model.embed_tokens.weight"])},
          full={"lm_head.weight": f32(V, H)})
A4 = dict(config={"r": 4, "lora_alpha": 8, "use_dora": True},
          modules={o0: dict(a=f32(4, H), b=f32(H, 4), m=np.abs(f32(H)) + 0.5)})
dirs = {n: adapter(n, **a) for n, a in (("a1", A1), ("a2", A2), ("a3", A3), ("a4", A4))}


def expected(specs, unmerge=False):
    """{name: float64 array} after merging [(adapter spec, weight)]."""
    out = {k: v.astype(np.float64) for k, v in BASE.items()}
    sign = -1.0 if unmerge else 1.0
    for spec, w in specs:
        c = spec["config"]
        for path, p in spec["modules"].items():
            r, alpha = c["r"], c["lora_alpha"]
            for key, v in c.get("rank_pattern", {}).items():
                if path == key or path.endswith("." + key):
                    r = v
                    break
            for key, v in c.get("alpha_pattern", {}).items():
                if path == key or path.endswith("." + key):
                    alpha = v
                    break
            s = alpha / (np.sqrt(r) if c.get("use_rslora") else r)
            a, b = p["a"].astype(np.float64), p["b"].astype(np.float64)
            delta = b @ a
            if p.get("kind") == "embedding" or c.get("fan_in_fan_out"):
                delta = delta.T
            k = path + ".weight"
            if "base" in p:
                out[k] = p["base"].astype(np.float64)
            v = out[k] + sign * w * s * delta
            if "m" in p:
                v = (p["m"].astype(np.float64) / np.linalg.norm(v, axis=1))[:, None] * v
            out[k] = v
            if "bias" in p:
                out[path + ".bias"] = out[path + ".bias"] + sign * w * s * p["bias"]
        for k, v in spec.get("full", {}).items():
            out[k] = v.astype(np.float64)
    return out


def ulps(got, want):
    want = bf16_round(want.astype(np.float32))
    mag = np.maximum(np.abs(got), np.abs(want)).astype(np.float64)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(mag, 2.0**-126))) - 7)
    return np.abs(got.astype(np.float64) - want) / ulp


def run(name, args, specs, unmerge=False):
    out = os.path.join(WORK, f"out-{name}")
    r = subprocess.run([BIN, "lora", "merge", *args, "-o", out, "--device", DEV, "--force"], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"lora {name}: {r.stderr.strip()}")
    got = read_tensors(out)
    want = expected(specs, unmerge)
    if set(got) != set(want):
        fail(f"lora {name}: tensors {sorted(set(got) ^ set(want))}")
    worst = 0.0
    for k, v in want.items():
        dt, shape, raw = got[k]
        if dt != "BF16" or list(shape) != list(v.shape):
            fail(f"lora {name} {k}: {dt} {shape}, expected BF16 {list(v.shape)}")
        u = ulps(from_raw("BF16", raw).reshape(v.shape), v)
        worst = max(worst, float(u.max()))
        if u.max() > 1:
            fail(f"lora {name} {k}: {float(u.max()):.0f} bf16 ulp from the float64 merge")
    return out, worst


results = [
    run("rslora-patterns-bias", [base, dirs["a1"]], [(A1, 1.0)]),
    run("fan-in-fan-out", [base, dirs["a2"]], [(A2, 1.0)]),
    run("embedding-modules-to-save", [base, dirs["a3"]], [(A3, 1.0)]),
    run("dora", [base, dirs["a4"]], [(A4, 1.0)]),
    run("weighted", [base, dirs["a1"], dirs["a2"], "--weights", "0.5,-1.5"], [(A1, 0.5), (A2, -1.5)]),
    run("unmerge", [base, dirs["a1"], "--unmerge"], [(A1, 1.0)], unmerge=True),
]
# Extraction: an f32 fine-tune whose deltas have known singular values;
# rank 4 keeps exactly the top four (energy and residual as the SVD says),
# rank 8 stops at the delta's rank 6 (--sv-epsilon drops the f32 noise;
# rank_pattern records it).
fbase = {k: v for k, v in BASE.items() if k.endswith("proj.weight")}
sig = np.array([5.0, 3.0, 2.0, 1.0, 0.5, 0.25])
ft, deltas = {}, {}
for k, v in fbase.items():
    m, n = v.shape
    u, _ = np.linalg.qr(rng.normal(size=(m, 6)))
    w, _ = np.linalg.qr(rng.normal(size=(n, 6)))
    deltas[k] = (u * sig) @ w.T
    ft[k] = (v.astype(np.float64) + deltas[k]).astype(np.float32)
for name, tensors in (("fbase", fbase), ("ft", ft)):
    d = os.path.join(WORK, name)
    os.makedirs(d, exist_ok=True)
    write_safetensors(os.path.join(d, "model.safetensors"),
                      {k: ("F32", v.shape, to_raw("F32", v)) for k, v in tensors.items()})
    json.dump({"architectures": ["LlamaForCausalLM"]}, open(os.path.join(d, "config.json"), "w"))
exact = (sig[:4] ** 2).sum() / (sig ** 2).sum()
for rank in (4, 8):
    ext = os.path.join(WORK, f"extract-{rank}")
    r = subprocess.run([BIN, "lora", "extract", os.path.join(WORK, "ft"), os.path.join(WORK, "fbase"), "-o", ext,
                        "--rank", str(rank), "--sv-epsilon", "1e-3", "--device", DEV, "--force",
                        "--report", ext + ".json"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"lora extract r={rank}: {r.stderr.strip()}")
    cfg = json.load(open(os.path.join(ext, "adapter_config.json")))
    rep = {m["module"]: m for m in json.load(open(ext + ".json"))["modules"]}
    got = read_tensors(ext)
    if cfg["r"] != rank or cfg["lora_alpha"] != rank or sorted(cfg["target_modules"]) != sorted(k[:-7] for k in fbase):
        fail(f"lora extract r={rank}: adapter_config {cfg}")
    for k, dlt in deltas.items():
        mod = k[: -len(".weight")]
        want_rank = min(rank, 6)
        if rep[mod]["rank"] != want_rank or (rank > 6 and cfg["rank_pattern"].get(mod) != 6):
            fail(f"lora extract r={rank} {mod}: rank {rep[mod]['rank']}, rank_pattern {cfg['rank_pattern']}")
        a = np.frombuffer(got[f"base_model.model.{mod}.lora_A.weight"][2], np.float32).reshape(want_rank, -1)
        b = np.frombuffer(got[f"base_model.model.{mod}.lora_B.weight"][2], np.float32).reshape(-1, want_rank)
        resid = ((dlt - b.astype(np.float64) @ a) ** 2).sum()
        dropped = (sig[want_rank:] ** 2).sum()
        kept = (sig[:want_rank] ** 2).sum() / (sig ** 2).sum()
        if abs(rep[mod]["energy_kept"] - kept) > 1e-5 or abs(resid - dropped) > 1e-3 * (sig ** 2).sum():
            fail(f"lora extract r={rank} {mod}: energy {rep[mod]['energy_kept']} vs {kept}, "
                 f"residual {resid} vs dropped {dropped}")
print(f"interop ok: lora merge {DEV}: 6 merges within {max(w for _, w in results):.0f} bf16 ulp of float64; "
      f"extract keeps the SVD's energy ({100 * exact:.2f}% at rank 4) and leaves its residual")
