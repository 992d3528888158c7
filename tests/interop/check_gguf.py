#!/usr/bin/env python3
"""Interop: GGUF files written by modelpress are read by the `gguf` PyPI
package's GGUFReader with the same tensors and metadata; files written by its
GGUFWriter are read by `modelpress inspect`.

    check_gguf.py MODELPRESS_BINARY DEVICE WORKDIR
"""
import json
import os
import subprocess
import sys

import numpy as np
import gguf
from safetensors import deserialize

BIN, DEVICE, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
checked = 0


def fail(msg):
    print(f"gguf interop FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def run(*args):
    r = subprocess.run([BIN, *args], capture_output=True, text=True)
    if r.returncode:
        fail(f"modelpress {' '.join(args)}: {r.stderr}")
    return r.stdout


def bf16_bits_to_f16(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32).astype(np.float16)


# 1. Ours -> GGUFReader: a sharded BF16 safetensors model to F16 and F32 GGUF.
model = os.path.join(WORK, "model")
run("sample", model, "--size", "demo", "--shards", "2", "--seed", "3")
src = {}
for f in sorted(os.listdir(model)):
    if f.endswith(".safetensors"):
        raw_file = open(os.path.join(model, f), "rb").read()
        header = json.loads(raw_file[8 : 8 + int.from_bytes(raw_file[:8], "little")])
        items = sorted(deserialize(raw_file), key=lambda it: header[it[0]]["data_offsets"][0])
        for n, t in items:
            src[n] = (t["dtype"], t["shape"], np.frombuffer(bytes(t["data"]), np.uint16).reshape(t["shape"]))
for ty, npty, gty in (("F16", np.float16, gguf.GGMLQuantizationType.F16), ("F32", np.float32, gguf.GGMLQuantizationType.F32)):
    out = os.path.join(WORK, f"model-{ty}.gguf")
    run("quantize", model, "--type", ty, "-o", out, "--device", DEVICE, "--force")
    r = gguf.GGUFReader(out)
    if [t.name for t in r.tensors] != list(src):
        fail(f"{ty}: tensor names or order differ")
    ft = r.fields["general.file_type"]
    if int(ft.parts[ft.data[0]][0]) != {"F16": 1, "F32": 0}[ty]:
        fail(f"{ty}: general.file_type")
    for t in r.tensors:
        dt, shape, raw = src[t.name]
        if list(reversed([int(d) for d in t.shape])) != shape:
            fail(f"{ty} {t.name}: shape {list(t.shape)} vs {shape}")
        converted = len(shape) >= 2 and t.name.endswith("weight")
        if converted:
            if t.tensor_type != gty:
                fail(f"{ty} {t.name}: type {t.tensor_type}")
            want = (raw.astype(np.uint32) << 16).view(np.float32).astype(npty)
            got = np.asarray(t.data).reshape(shape).astype(npty)
            if not np.array_equal(got.view(np.uint16 if ty == "F16" else np.uint32), want.view(np.uint16 if ty == "F16" else np.uint32)):
                fail(f"{ty} {t.name}: values differ")
        elif t.tensor_type != gguf.GGMLQuantizationType.BF16 or not np.array_equal(np.asarray(t.data).view(np.uint16).reshape(shape), raw):
            fail(f"{ty} {t.name}: a 1-D tensor must keep its BF16 bytes")
        checked += 1

# 2. GGUFWriter -> ours: every metadata type, F32/F16 tensors and Q8_0.
path = os.path.join(WORK, "py.gguf")
w = gguf.GGUFWriter(path, "llama")
w.add_uint8("t.u8", 200)
w.add_int8("t.i8", -100)
w.add_uint16("t.u16", 60000)
w.add_int16("t.i16", -30000)
w.add_uint32("t.u32", 4000000000)
w.add_int32("t.i32", -2000000000)
w.add_float32("t.f32", 0.25)
w.add_bool("t.bool", True)
w.add_string("t.str", "héllo")
w.add_array("t.arr", [1, 2, 3])
w.add_uint64("t.u64", 1 << 60)
w.add_int64("t.i64", -(1 << 60))
w.add_float64("t.f64", -0.5)
rng = np.random.default_rng(5)
a = rng.standard_normal((3, 64)).astype(np.float32)
w.add_tensor("a.weight", a)
w.add_tensor("b.weight", rng.standard_normal((2, 32)).astype(np.float16))
q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
w.add_tensor("c.weight", q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
info = json.loads(run("inspect", path, "--json"))
md = info["metadata"]
for k, want in (("t.u8", "200"), ("t.i8", "-100"), ("t.u16", "60000"), ("t.i16", "-30000"), ("t.u32", "4000000000"),
                ("t.i32", "-2000000000"), ("t.f32", "0.25"), ("t.bool", "true"), ("t.str", '"héllo"'),
                ("t.u64", str(1 << 60)), ("t.i64", str(-(1 << 60))), ("t.f64", "-0.5"), ("general.architecture", '"llama"')):
    if md.get(k) != want:
        fail(f"metadata {k}: {md.get(k)!r} != {want!r}")
    checked += 1
if not md.get("t.arr", "").startswith("[3 "):
    fail(f"metadata t.arr: {md.get('t.arr')}")
tensors = {t["name"]: t for t in info["tensors"]}
for n, ty, shape, nbytes in (("a.weight", "F32", [3, 64], 768), ("b.weight", "F16", [2, 32], 128), ("c.weight", "Q8_0", [3, 64], 3 * 2 * 34)):
    t = tensors.get(n)
    if not t or t["type"] != ty or t["shape"] != shape or t["bytes"] != nbytes:
        fail(f"tensor {n}: {t}")
    checked += 1

# 3. Block quantization against gguf.quants, on fresh random tensors: ties,
# constant and all-zero blocks, huge, tiny and subnormal magnitudes.
T = gguf.GGMLQuantizationType
rng = np.random.default_rng()
rows = []
for scale in (0.02, 1.0, 3e4, 1e-3, 1e-30):
    rows.append(rng.standard_normal((4, 512)) * scale)
rows.append(rng.integers(-64, 64, (4, 512)) / 16.0)
rows.append(np.full((2, 512), 0.75))
rows.append(np.zeros((2, 512)))
sub = rng.standard_normal((2, 512)) * 1e-40
rows.append(sub)
x = np.concatenate(rows).astype(np.float32)
x[5, rng.integers(0, 512, 20)] *= 1e-35
src_path = os.path.join(WORK, "blocks-f32.gguf")
w = gguf.GGUFWriter(src_path, "llama")
w.add_tensor("blk.0.ffn_up.weight", x)
w.add_tensor("blk.0.ffn_norm.weight", x[0])
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
ftypes = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "Q2_K": 10, "Q3_K": 12}
for name, ft in ftypes.items():
    out = os.path.join(WORK, f"blocks-{name}.gguf")
    run("quantize", src_path, "--type", name, "--pure", "-o", out, "--device", DEVICE, "--force")
    r = gguf.GGUFReader(out)
    f = r.fields["general.file_type"]
    qv = r.fields["general.quantization_version"]
    if int(f.parts[f.data[0]][0]) != ft or int(qv.parts[qv.data[0]][0]) != 2:
        fail(f"{name}: file_type / quantization_version")
    t = {t.name: t for t in r.tensors}
    if t["blk.0.ffn_norm.weight"].tensor_type != T.F32:
        fail(f"{name}: the norm must stay F32")
    q = t["blk.0.ffn_up.weight"]
    if q.tensor_type != getattr(T, name):
        fail(f"{name}: type {q.tensor_type}")
    ours = np.asarray(q.data).tobytes()
    if name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"):
        with np.errstate(all="ignore"):
            want = gguf.quants.quantize(x, getattr(T, name)).tobytes()
        if ours != want:
            i = next(i for i in range(len(ours)) if ours[i] != want[i])
            fail(f"{name}: bytes differ from gguf.quants at byte {i}")
        checked += 1
    # gguf's dequantizer reads our blocks back to the values we compute.
    back = gguf.quants.dequantize(np.frombuffer(ours, np.uint8).reshape(x.shape[0], -1), getattr(T, name))
    deq = os.path.join(WORK, f"blocks-{name}-deq.gguf")
    run("dequantize", out, "-o", deq, "--dtype", "f32", "--device", DEVICE, "--force")
    mine = np.asarray({t.name: t for t in gguf.GGUFReader(deq).tensors}["blk.0.ffn_up.weight"].data).reshape(x.shape)
    ok = np.isfinite(back)
    if not np.array_equal(ok, np.isfinite(mine)) or not np.allclose(mine[ok], back[ok], rtol=1e-6, atol=0):
        fail(f"{name}: gguf dequantizes our blocks to other values (max diff {np.abs(mine[ok] - back[ok]).max()})")
    err = np.abs(back[ok] - x[ok]).max()
    checked += 1
    print(f"  {name}: {'same bytes as gguf.quants, ' if name[-1] != 'K' else ''}gguf reads back our values (max |x - x\u0302| {err:.3g})")

print(f"gguf interop on device {DEVICE}: GGUFReader reads ours, we read GGUFWriter's")
print(f"gguf: {checked} passed, 0 failed")
