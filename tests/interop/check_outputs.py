#!/usr/bin/env python3
"""Interop: modelpress outputs opened by Python's `safetensors` and checked
against numpy computing the same operations.

    check_outputs.py MODELPRESS_BINARY DEVICE WORKDIR

Runs `modelpress demo --keep WORKDIR/demo` (a sharded BF16 LLaMA-shaped
model and every operation on it) and single-file jobs on an F16 file that
numpy's safetensors writer made, then reads every output with
`safetensors.safe_open` (metadata, names) and `safetensors.deserialize`
(bytes: numpy has no bfloat16, so BF16 is decoded here exactly), and
compares with numpy. With the demo's parameters every operation is exact
in float32, so the comparison is bit for bit.
"""
import json
import os
import subprocess
import sys

import numpy as np
from safetensors.numpy import save_file

from interop_common import bf16_round, decode, fail, load, round_to

BIN, DEVICE, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
checked = 0


def same(name, got, want):
    global checked
    g, w = np.asarray(got, np.float32), np.asarray(want, np.float32)
    if g.shape != w.shape:
        fail(f"{name}: shape {g.shape} != {w.shape}")
    if not np.array_equal(g.view(np.uint32), w.view(np.uint32)):
        i = np.flatnonzero(g.view(np.uint32) != w.view(np.uint32))[0]
        fail(f"{name}: element {i}: {g.flat[i]!r} != {w.flat[i]!r}")
    checked += 1


def run(*args):
    r = subprocess.run([BIN, *args, "--device", DEVICE], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"modelpress {' '.join(args)}: {r.stderr}")


def matrices(model):
    return {n: v for n, v in model.items() if v[1].ndim >= 2}


rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
demo = os.path.join(WORK, "demo")
run("demo", "--keep", demo)
base, _ = load(os.path.join(demo, "llama"))
for other in ("config.json", "generation_config.json", "tokenizer_config.json"):
    for out in ("pruned", "int8", "merged"):
        if open(os.path.join(demo, "llama", other)).read() != open(os.path.join(demo, out, other)).read():
            fail(f"{out}/{other} is not a copy")

# prune |w| < 0.02; 1-D tensors pass through.
pruned, _ = load(os.path.join(demo, "pruned"))
for n, (dt, w) in base.items():
    want = np.where(np.abs(w) < np.float32(0.02), np.float32(0), w) if w.ndim >= 2 else w
    same(f"pruned/{n}", pruned[n][1], want)

# prune rows whose L2 norm < 0.98.
rows, _ = load(os.path.join(demo, "pruned-rows"))
for n, (dt, w) in matrices(base).items():
    norms = np.sqrt((w.astype(np.float64) ** 2).sum(axis=1))
    same(f"pruned-rows/{n}", rows[n][1], np.where((norms < 0.98)[:, None], np.float32(0), w))

# int8 per row: q = round_half_even(w · 127/absmax), scale = absmax/127.
int8, metas = load(os.path.join(demo, "int8"))
for n, (dt, w) in matrices(base).items():
    absmax = np.abs(w).max(axis=1).astype(np.float32)
    m = np.float32(127) / absmax
    q = np.clip(np.round(w * m[:, None]), -127, 127).astype(np.int8)
    if int8[n][0] != "I8" or not np.array_equal(int8[n][1], q):
        fail(f"int8/{n}: int8 values differ")
    scale = int8[n + "_scale"][1]
    same(f"int8/{n}_scale", scale, (absmax / np.float32(127))[:, None])
    checked += 1
desc = [json.loads(m["modelpress.quantization"]) for m in metas.values() if "modelpress.quantization" in m]
listed = {k for d in desc for k in d["tensors"]}
if listed != set(matrices(base)):
    fail("int8 metadata does not list exactly the quantized tensors")

# dequantized: q · scale rounded to BF16.
back, _ = load(os.path.join(demo, "int8-back"))
for n in matrices(base):
    q, s = int8[n][1].astype(np.float32), int8[n + "_scale"][1]
    same(f"int8-back/{n}", back[n][1], bf16_round(q * s))

# offsets, task vector, transfer and mix: float32 arithmetic, rounded to BF16.
tuned, _ = load(os.path.join(demo, "tuned"))
task, _ = load(os.path.join(demo, "task-vector"))
half, _ = load(os.path.join(demo, "half-tuned"))
merged, _ = load(os.path.join(demo, "merged"))
for n, (dt, w) in matrices(base).items():
    t = tuned[n][1]
    same(f"tuned/{n}", t, bf16_round(w + np.float32(0.001)))
    same(f"task-vector/{n}", task[n][1], bf16_round(t + np.float32(-1) * w))
    same(f"half-tuned/{n}", half[n][1], bf16_round(w + np.float32(0.5) * task[n][1]))
    same(f"merged/{n}", merged[n][1], bf16_round(np.float32(0.5) * w + np.float32(0.5) * t))

# prune --sparsity: exactly round_half_even(S·n) smallest |w| zeroed, ties
# to the lower flat index; per tensor and with one global cut.
def smallest_k_mask(values, k):
    keys = values.view(np.uint32) & np.uint32(0x7FFFFFFF)
    order = np.lexsort((np.arange(values.size), keys))
    mask = np.zeros(values.size, bool)
    mask[order[:k]] = True
    return mask


sp = os.path.join(WORK, "sparsity")
run("prune", os.path.join(demo, "llama"), "--sparsity", "0.5", "-o", sp)
got, _ = load(sp)
for n, (dt, w) in matrices(base).items():
    flat = w.ravel()
    k = round(0.5 * flat.size)
    same(f"sparsity/{n}", got[n][1].ravel(), np.where(smallest_k_mask(flat, k), np.float32(0), flat))
gp = os.path.join(WORK, "sparsity-global")
run("prune", os.path.join(demo, "llama"), "--sparsity", "0.6", "--global", "-o", gp)
got, _ = load(gp)
# Model order: shards in order, tensors in file order (as written by the demo).
order_in_model = [n for n in base if n in matrices(base)]
flat = np.concatenate([base[n][1].ravel() for n in order_in_model])
mask = smallest_k_mask(flat, round(0.6 * flat.size))
pos = 0
for n in order_in_model:
    w = base[n][1].ravel()
    same(f"sparsity-global/{n}", got[n][1].ravel(), np.where(mask[pos:pos + w.size], np.float32(0), w))
    pos += w.size

# prune --pattern 2:4: per row, per run of 4, keep the 2 largest |w| (ties
# to the lower index).
nm = os.path.join(WORK, "pattern")
run("prune", os.path.join(demo, "llama"), "--pattern", "2:4", "-o", nm)
got, _ = load(nm)
for n, (dt, w) in matrices(base).items():
    keys = (w.view(np.uint32) & np.uint32(0x7FFFFFFF)).reshape(w.shape[0], -1, 4).astype(np.int64)
    pos = np.arange(4)[None, None, :]
    # rank = how many in the run beat this one (larger key, or equal and earlier)
    beats = (keys[..., :, None] > keys[..., None, :]) | (
        (keys[..., :, None] == keys[..., None, :]) & (pos[..., :, None] < pos[..., None, :])
    )
    rank = beats.sum(axis=-2)
    keep = (rank < 2).reshape(w.shape)
    same(f"pattern/{n}", got[n][1], np.where(keep, w, np.float32(0)))

# prune --rows S / --cols S: exactly round(S·n) rows or columns of smallest
# norm (float64), ties to the lower index.
for flag, s_, norm_arg, axis in (("--rows", 0.25, "2", 1), ("--cols", 0.5, "1", 0)):
    out = os.path.join(WORK, f"structured{flag}")
    run("prune", os.path.join(demo, "llama"), flag, str(s_), "--norm", norm_arg, "-o", out)
    got, _ = load(out)
    for n, (dt, w) in matrices(base).items():
        w64 = w.astype(np.float64)
        norms = (w64 ** 2).sum(axis=axis) if norm_arg == "2" else np.abs(w64).sum(axis=axis)
        order = np.lexsort((np.arange(norms.size), norms))
        drop = np.zeros(norms.size, bool)
        drop[order[: round(s_ * norms.size)]] = True
        mask = drop[:, None] if flag == "--rows" else drop[None, :]
        same(f"structured{flag}/{n}", got[n][1], np.where(mask, np.float32(0), w))

# Activation-aware (Wanda): a scores file from numpy; per row, exactly
# round(S·columns) smallest |w|·x go; with --pattern 2:4 runs rank by it.
def flush(a):
    a = np.asarray(a, np.float32)
    return np.where(np.abs(a) < np.float32(2.0**-126), np.float32(0), a)


def score_keys(w, x):
    a = flush(np.abs(w))
    prod = flush(a * x[None, :].astype(np.float32))
    keys = prod.view(np.uint32) & np.uint32(0x7FFFFFFF)
    return np.where(np.isfinite(w), keys, np.uint32(0x7FFFFFFF))


norms = {n: (np.abs(rng.standard_normal(w.shape[1])) * 3).astype(np.float32) for n, (dt, w) in matrices(base).items()}
scores_path = os.path.join(WORK, "scores.safetensors")
save_file(norms, scores_path)
wanda = os.path.join(WORK, "wanda")
run("prune", os.path.join(demo, "llama"), "--sparsity", "0.5", "--scores", scores_path, "-o", wanda)
got, _ = load(wanda)
for n, (dt, w) in matrices(base).items():
    keys = score_keys(w, norms[n]).astype(np.int64)
    k = round(0.5 * w.shape[1])
    cols = np.arange(w.shape[1])
    want = w.copy()
    for r in range(w.shape[0]):
        order = np.lexsort((cols, keys[r]))
        want[r, order[:k]] = 0
    same(f"wanda/{n}", got[n][1], want)
wanda24 = os.path.join(WORK, "wanda-2-4")
run("prune", os.path.join(demo, "llama"), "--pattern", "2:4", "--scores", scores_path, "-o", wanda24)
got, _ = load(wanda24)
for n, (dt, w) in matrices(base).items():
    keys = score_keys(w, norms[n]).astype(np.int64).reshape(w.shape[0], -1, 4)
    pos = np.arange(4)[None, None, :]
    beats = (keys[..., :, None] > keys[..., None, :]) | (
        (keys[..., :, None] == keys[..., None, :]) & (pos[..., :, None] < pos[..., None, :])
    )
    keep = (beats.sum(axis=-2) < 2).reshape(w.shape)
    same(f"wanda-2-4/{n}", got[n][1], np.where(keep, w, np.float32(0)))

# --remove-neurons 0.25: per MLP block, the round(0.25·I) neurons of
# smallest ‖gate_j‖·‖up_j‖·‖down_·j‖ (float64) leave; the rest are gathered.
rn = os.path.join(WORK, "removed")
run("prune", os.path.join(demo, "llama"), "--remove-neurons", "0.25", "-o", rn)
got, _ = load(rn)
cfg = json.load(open(os.path.join(rn, "config.json")))
for n in [n for n in base if n.endswith(".mlp.down_proj.weight")]:
    p = n[: -len(".mlp.down_proj.weight")]
    up, gate, down = (base[f"{p}.mlp.{x}_proj.weight"][1].astype(np.float64) for x in ("up", "gate", "down"))
    score = np.sqrt((up**2).sum(1)) * np.sqrt((gate**2).sum(1)) * np.sqrt((down**2).sum(0))
    order = np.lexsort((np.arange(score.size), score))
    kept = np.sort(order[round(0.25 * score.size):])
    if cfg["intermediate_size"] != kept.size:
        fail(f"removed: intermediate_size {cfg['intermediate_size']} != {kept.size}")
    for x in ("up", "gate"):
        same(f"removed/{p}.{x}", got[f"{p}.mlp.{x}_proj.weight"][1], base[f"{p}.mlp.{x}_proj.weight"][1][kept])
    same(f"removed/{p}.down", got[n][1], base[n][1][:, kept])

# A single F16 file written by numpy's safetensors: quantize --scale and prune.
single = os.path.join(WORK, "single.safetensors")
w = (rng.standard_normal((37, 129)) * 0.1).astype(np.float16)
bias = rng.standard_normal(37).astype(np.float16)
save_file({"layer.weight": w, "layer.bias": bias}, single, metadata={"k": "v"})
qout = os.path.join(WORK, "single-q.safetensors")
run("quantize", single, "--scale", "100", "-o", qout, "--force")
got, metas = load(qout)
wf = w.astype(np.float32)
q = np.clip(np.round(wf * np.float32(100)), -128, 127).astype(np.int8)
if not np.array_equal(got["layer.weight"][1], q):
    fail("single-q: round(w·100) differs")
same("single-q/scale", got["layer.weight_scale"][1], np.array([np.float32(1) / np.float32(100)]))
if list(metas.values())[0].get("k") != "v":
    fail("single-q: input metadata lost")
pout = os.path.join(WORK, "single-p.safetensors")
run("prune", single, "--threshold", "0.05", "-o", pout, "--force")
got, _ = load(pout)
same("single-p/layer.weight", got["layer.weight"][1], np.where(np.abs(wf) < np.float32(0.05), np.float32(0), wf))
same("single-p/layer.bias", got["layer.bias"][1], bias.astype(np.float32))  # 1-D: passes through

print(f"interop on device {DEVICE}: every output read by safetensors, {checked} tensors equal to numpy")
print(f"interop: {checked} passed, 0 failed")
