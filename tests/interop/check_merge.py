#!/usr/bin/env python3
"""Interop: `modelpress merge` against numpy computing every method from its
rules (../shared/reference/pruning_merging.md §3), bit for bit.

    check_merge.py MODELPRESS_BINARY DEVICE WORKDIR

Makes a small LLaMA-shaped base and three fine-tunes of it with modelpress
itself (`sample`, then `mix` of the base with a little of other samples),
merges them under one mergekit configuration per method, and recomputes
every tensor here in float32 in the same order of operations: magnitude
and breadcrumbs cuts by sorting (|δ|, index), DARE's masks from the same
counter-based hash, gradients and filters resolved per tensor, f64 sums in
the same order. Every method must give the same bits.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np

from interop_common import fail, load, round_to
from merge_rules import gta, karcher, linear, model_stock, multislerp, nearswap, nuslerp, param, position, sce, slerp

BIN, DEVICE, WORK = os.path.abspath(sys.argv[1]), sys.argv[2], sys.argv[3]
checked = 0


def run(*args, device=True):
    cmd = [BIN, *args] + (["--device", DEVICE] if device else [])
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"modelpress {' '.join(args)}: {r.stderr}")
    return r


GTA = {
    "task_arithmetic": ("none", False, False, False),
    "ties": ("magnitude", True, True, False),
    "dare_linear": ("random", False, False, True),
    "dare_ties": ("random", True, False, True),
    "breadcrumbs": ("breadcrumbs", False, False, False),
    "breadcrumbs_ties": ("breadcrumbs", True, False, False),
    "della": ("della", True, True, True),
    "della_linear": ("della", False, False, True),
}


USES_BASE = set(GTA) | {"slerp", "nearswap", "model_stock", "nuslerp", "sce", "multislerp"}


def layer_of(name):
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "layer", "blocks") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    return None


def with_layer(name, l):
    parts = name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p in ("layers", "h", "layer", "blocks") and parts[i + 1].isdigit():
            parts[i + 1] = str(l)
            return ".".join(parts)
    return name


def sites(cfg, models, layers):
    """Per output tensor name: (t, shared scopes, the base as (model, name)
    or None, the merged inputs as [(model, name, scopes)]), as
    jobs/merge resolves them in the models form and the slices form."""
    method, top, base_path = cfg["merge_method"], cfg.get("parameters", {}), cfg.get("base_model")
    out = {}
    if "models" in cfg:
        uses = method in USES_BASE
        entries = [m for m in cfg["models"] if not (uses and m["model"] == base_path)]
        if method == "karcher" and base_path and all(m["model"] != base_path for m in entries):
            entries = entries + [{"model": base_path}]
        for name in models[base_path or cfg["models"][0]["model"]]:
            ins = [(m["model"], name, [m.get("parameters", {}), top]) for m in entries]
            out[name] = (position(name, layers), [top], (base_path, name) if uses and base_path else None, ins)
        return out
    slices = cfg["slices"]

    def group(i, names, t):
        sl = slices[i]
        sp = sl.get("parameters", {})
        b = sl.get("base_model", base_path)
        srcs = sl["sources"]
        at = next((j for j, s in enumerate(srcs) if s["model"] == b), None) if method in USES_BASE else None
        ins = [(s["model"], names[j], [s.get("parameters", {}), sp, top]) for j, s in enumerate(srcs) if j != at]
        return (t, [sp, top], (srcs[at]["model"], names[at]) if at is not None else None, ins)

    tpl = models[base_path or slices[0]["sources"][0]["model"]]
    outside = [n for n in tpl if layer_of(n) is None]
    pre = [n for n in outside if "embed" in n and "embed_out" not in n]
    for n in pre:
        out[n] = group(0, [n] * len(slices[0]["sources"]), 0.0)
    layer = 0
    for i, sl in enumerate(slices):
        first = sl["sources"][0]
        count = first["layer_range"][1] - first["layer_range"][0]
        for o in range(count):
            l0 = first["layer_range"][0] + o
            for n in [n for n in models[first["model"]] if layer_of(n) == l0]:
                names = [with_layer(n, s["layer_range"][0] + o) for s in sl["sources"]]
                out[with_layer(n, layer)] = group(i, names, o / (count - 1) if count > 1 else 1.0)
            layer += 1
    for n in outside:
        if n not in pre:
            out[n] = group(len(slices) - 1, [n] * len(slices[-1]["sources"]), 0.0)
    return out


def expect(cfg, models, seed, name, site):
    """The merged tensor `name` as float32 (before rounding to out_dtype)."""
    method = cfg["merge_method"]
    t, top, base_at, ins = site
    arr = lambda m, n: models[m][n][1].astype(np.float32).ravel()
    shape = models[ins[0][0]][ins[0][1]][1].shape
    xs = [arr(m, n) for m, n, _ in ins]
    scopes = [s for _, _, s in ins]
    base = arr(*base_at) if base_at else None
    last = shape[-1] if len(shape) else 1
    if method in GTA:
        sp, cons, norm_d, resc_d = GTA[method]
        terms = [
            (param(s, "weight", n, t), param(s, "density", n, t, 1.0),
             param(s, "gamma", n, t, 0.01), param(s, "epsilon", n, t, 0.15))
            for (_, n, s) in ins
        ]
        row_len = int(np.prod(shape[1:])) if len(shape) >= 2 else base.size
        return gta(
            base, xs, terms, sp, cons,
            param(top, "normalize", name, t, norm_d),
            param(top, "rescale", name, t, resc_d),
            param(top, "lambda", name, t, 1.0), seed, name, row_len,
        )
    w = [param(s, "weight", n, t) for (_, n, s) in ins] if method in ("linear", "nuslerp", "multislerp") else None
    if method == "linear":
        return linear(xs, w, param(top, "normalize", name, t, True))
    if method == "slerp":
        return slerp(base, xs[0], param(top, "t", name, t))
    if method == "nearswap":
        return nearswap(base, xs[0], param(top, "t", name, t))
    if method == "model_stock":
        return model_stock(base, xs, last if param(top, "filter_wise", name, t, False) else None)
    if method == "nuslerp":
        w = [np.float32(v) for v in w]
        total = np.float32(w[0] + w[1])
        tt = np.float32(0.5) if abs(total) < 1e-6 else np.float32(w[1] / total)
        if param(top, "nuslerp_flatten", name, t, True):
            return nuslerp(base, xs[0], xs[1], tt, None)
        if param(top, "nuslerp_row_wise", name, t, False):
            stride = int(np.prod(shape[1:])) if len(shape) >= 2 else None
            return nuslerp(base, xs[0], xs[1], tt, None, stride)
        return nuslerp(base, xs[0], xs[1], tt, last)
    if method == "sce":
        return sce(base, xs, param(top, "select_topk", name, t, 1.0))
    if method == "karcher":
        return karcher(xs, int(param(top, "max_iter", name, t, 10)), param(top, "tol", name, t, 1e-5))
    if method == "multislerp":
        return multislerp(base, xs, w, param(top, "normalize_weights", name, t, True), param(top, "eps", name, t, 1e-8))
    if method == "passthrough":
        return np.float32(param(scopes[0], "scale", ins[0][1], t, 1.0)) * xs[0]
    fail(f"no reference for {method}")


def to_yaml(v, indent=0):
    """Just enough YAML for these configs (JSON is YAML)."""
    return json.dumps(v, indent=1)


# --- the models
os.makedirs(WORK, exist_ok=True)
os.chdir(WORK)
run("sample", "base", "--seed", "1", device=False)
for i in (2, 3, 4):
    run("sample", f"noise{i}", "--seed", str(i), device=False)
    run("mix", "base", f"noise{i}", "--weights", f"1,{0.01 * i}", "-o", f"ft{i}")
models = {p: load(p)[0] for p in ("base", "ft2", "ft3", "ft4", "noise2", "noise3")}
layers = json.load(open("base/config.json"))["num_hidden_layers"]
names = list(models["base"].keys())

m3 = lambda params: [{"model": f"ft{i}", "parameters": p} for i, p in zip((2, 3, 4), params)]
filt = [{"filter": "mlp", "value": 0.5}, {"filter": "self_attn", "value": [0.2, 1.0]}, {"value": 0.8}]
configs = {
    "linear": {"merge_method": "linear", "models": m3([{"weight": 1.0}, {"weight": filt}, {"weight": 0.3}])},
    "task_arithmetic": {
        "merge_method": "task_arithmetic", "base_model": "base",
        "models": m3([{"weight": 1.0}, {"weight": [0.1, 0.9]}, {"weight": -0.4}]),
        "parameters": {"lambda": 0.7},
    },
    "ties": {
        "merge_method": "ties", "base_model": "base",
        "models": m3([{"weight": 1.0, "density": [1.0, 0.5]}, {"weight": filt, "density": 0.5}, {"weight": 0.3, "density": 0.3}]),
        "parameters": {"normalize": True, "int8_mask": True},
    },
    "ties_bf16": {
        "merge_method": "ties", "base_model": "base",
        "models": m3([{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.3}]),
        "parameters": {"density": 0.4}, "dtype": "bfloat16",
    },
    "dare_linear": {
        "merge_method": "dare_linear", "base_model": "base",
        "models": m3([{"weight": 0.6, "density": 0.4}, {"weight": 0.5, "density": [0.2, 0.9]}, {"weight": 0.3, "density": 0.7}]),
    },
    "dare_ties": {
        "merge_method": "dare_ties", "base_model": "base",
        "models": m3([{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.3}]),
        "parameters": {"density": 0.5, "normalize": True},
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs", "base_model": "base",
        "models": m3([{"weight": 1.0, "density": 0.6, "gamma": 0.05}, {"weight": 0.5, "density": 0.9, "gamma": 0.2}, {"weight": 0.3, "density": 0.5, "gamma": 0.0}]),
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties", "base_model": "base",
        "models": m3([{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.3}]),
        "parameters": {"density": 0.7, "gamma": 0.1, "rescale": True},
    },
    "slerp": {
        "merge_method": "slerp", "base_model": "base", "models": [{"model": "base"}, {"model": "ft3"}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 1]}, {"filter": "mlp", "value": [1, 0.5, 0]}, {"value": 0.5}]},
    },
    "passthrough": {"merge_method": "passthrough", "models": [{"model": "ft2", "parameters": {"scale": 0.5}}]},
    "della": {
        "merge_method": "della", "base_model": "base",
        "models": m3([{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": [0.3, 0.7], "epsilon": 0.1}, {"weight": 0.3, "density": 0.6}]),
        "parameters": {"epsilon": 0.2},
    },
    "della_linear": {
        "merge_method": "della_linear", "base_model": "base",
        "models": m3([{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.3}]),
        "parameters": {"density": 0.5, "epsilon": 0.15, "lambda": 0.9},
    },
    "nearswap": {"merge_method": "nearswap", "base_model": "base", "models": [{"model": "ft2"}], "parameters": {"t": 0.001}},
    "model_stock": {"merge_method": "model_stock", "base_model": "base", "models": m3([{}, {}, {}])},
    "model_stock_rows": {"merge_method": "model_stock", "base_model": "base", "models": m3([{}, {}, {}]), "parameters": {"filter_wise": True}},
    # Two and four models: the sums' unrolled loops (three is above, five the general loop).
    "model_stock_2": {"merge_method": "model_stock", "base_model": "base", "models": [{"model": "ft2"}, {"model": "ft4"}]},
    "model_stock_4_rows": {
        "merge_method": "model_stock", "base_model": "base", "parameters": {"filter_wise": True},
        "models": [{"model": m} for m in ("ft2", "ft3", "ft4", "noise2")],
    },
    "model_stock_5": {"merge_method": "model_stock", "base_model": "base", "models": [{"model": m} for m in ("ft2", "ft3", "ft4", "noise2", "noise3")]},
    "nuslerp": {"merge_method": "nuslerp", "models": [{"model": "ft2", "parameters": {"weight": 1.0}}, {"model": "ft3", "parameters": {"weight": [0.2, 3.0]}}]},
    "nuslerp_base_rows": {
        "merge_method": "nuslerp", "base_model": "base",
        "models": [{"model": "ft2", "parameters": {"weight": 0.4}}, {"model": "ft4", "parameters": {"weight": 0.6}}],
        "parameters": {"nuslerp_flatten": False},
    },
    "sce": {"merge_method": "sce", "base_model": "base", "models": m3([{}, {}, {}])},
    "sce_topk": {"merge_method": "sce", "base_model": "base", "models": m3([{}, {}, {}]), "parameters": {"select_topk": 0.3}},
    "nuslerp_columns": {
        "merge_method": "nuslerp", "base_model": "base",
        "models": [{"model": "ft2", "parameters": {"weight": 0.4}}, {"model": "ft4", "parameters": {"weight": 0.6}}],
        "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
    },
    "karcher": {"merge_method": "karcher", "base_model": "base", "models": m3([{}, {}, {}])},
    "karcher_tol": {"merge_method": "karcher", "models": m3([{}, {}, {}]), "parameters": {"max_iter": 3, "tol": 1e-9}},
    "multislerp": {"merge_method": "multislerp", "models": m3([{"weight": 1.0}, {"weight": [0.2, 2.0]}, {"weight": 0.3}])},
    "multislerp_base": {
        "merge_method": "multislerp", "base_model": "base",
        "models": m3([{"weight": 0.2}, {"weight": 0.5}, {"weight": 0.3}]), "parameters": {"normalize_weights": False},
    },
    "slices_passthrough": {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "ft2", "layer_range": [0, 3], "parameters": {"scale": [{"filter": "mlp", "value": 0.5}, {"value": 1.0}]}}]},
        {"sources": [{"model": "ft3", "layer_range": [1, 4]}]},
        {"sources": [{"model": "ft4", "layer_range": [3, 4]}]}]},
    "slices_slerp": {"merge_method": "slerp", "base_model": "base", "parameters": {"t": [{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}]}, "slices": [
        {"sources": [{"model": "base", "layer_range": [0, 2]}, {"model": "ft2", "layer_range": [0, 2]}]},
        {"sources": [{"model": "base", "layer_range": [2, 4]}, {"model": "ft3", "layer_range": [1, 3]}], "parameters": {"t": 0.8}}]},
    "slices_dare_ties": {"merge_method": "dare_ties", "base_model": "base", "parameters": {"density": 0.5}, "slices": [
        {"sources": [{"model": "ft2", "layer_range": [0, 4], "parameters": {"weight": [0.2, 1.0]}}, {"model": "base", "layer_range": [0, 4]},
                     {"model": "ft3", "layer_range": [0, 4], "parameters": {"weight": 0.5, "density": 0.7}}]},
        {"sources": [{"model": "base", "layer_range": [1, 3]}, {"model": "ft4", "layer_range": [1, 3], "parameters": {"weight": 1.0}}],
         "parameters": {"lambda": 0.5}}]},
}
for label, cfg in configs.items():
    out_dtype = "float32"
    cfg = dict(cfg, out_dtype=out_dtype)
    path = f"{label}.yml"
    with open(path, "w") as f:
        f.write(to_yaml(cfg))
    seed = 1234567890123 if "dare" in label or "della" in label else 0
    run("merge", path, "-o", f"out_{label}", "--seed", str(seed), "--report", f"{label}.json")
    got, _ = load(f"out_{label}")
    where = sites(cfg, models, layers)
    if sorted(got) != sorted(where):
        fail(f"{label}: tensor names {sorted(set(got) ^ set(where))[:4]} differ from the layout's")
    cast = "BF16" if cfg.get("dtype") == "bfloat16" else None
    for name in got:
        dt, g = got[name]
        if dt != "F32":
            fail(f"{label} {name}: dtype {dt}, out_dtype says F32")
        src = models
        if cast:  # inputs are rounded to `dtype` first (a no-op for BF16 inputs)
            src = {p: {n: (d, round_to(cast, v)) for n, (d, v) in m.items()} for p, m in models.items()}
        want = expect(cfg, src, seed, name, where[name]).reshape(g.shape)
        if not np.array_equal(g.view(np.uint32), want.astype(np.float32).view(np.uint32)):
            i = int(np.flatnonzero(g.view(np.uint32) != want.astype(np.float32).view(np.uint32))[0])
            fail(f"{label} {name}: element {i}: {g.flat[i]!r} != {want.flat[i]!r}")
        checked += 1
    saved = open(f"out_{label}/mergekit_config.yml").read()
    if saved != to_yaml(cfg):
        fail(f"{label}: mergekit_config.yml is not the configuration given")
    if json.load(open(f"out_{label}/config.json")).get("torch_dtype") != out_dtype:
        fail(f"{label}: config.json's torch_dtype is not {out_dtype}")
    report = json.load(open(f"{label}.json"))
    if len(report["tensors"]) != len(got):
        fail(f"{label}: the report lists {len(report['tensors'])} tensors")
    if "slices" in cfg:
        want_layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in cfg["slices"])
        if json.load(open(f"out_{label}/config.json"))["num_hidden_layers"] != want_layers:
            fail(f"{label}: config.json's num_hidden_layers is not {want_layers}")
    print(f"merge interop on device {DEVICE}: {label} equals numpy on {len(got)} tensors")

# DARE's masks depend on the seed alone: a second run is byte-identical.
run("merge", "dare_ties.yml", "-o", "again", "--seed", "1234567890123")
for name in names:
    if not np.array_equal(load("again")[0][name][1], load("out_dare_ties")[0][name][1]):
        fail(f"dare_ties: a second run differs at {name}")
    break
print(f"merge: {checked} tensors checked, 0 failed")
