"""What the interop checks share: reading safetensors outputs exactly
(numpy has no bfloat16) and rounding as the writers do."""
import json
import os
import sys

import numpy as np
from safetensors import deserialize, safe_open


def fail(msg):
    print(f"interop FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def decode(dtype, shape, data):
    if dtype == "BF16":
        u = np.frombuffer(data, np.uint16).astype(np.uint32) << 16
        return u.view(np.float32).reshape(shape)
    kind = {"F32": np.float32, "F16": np.float16, "I8": np.int8}[dtype]
    return np.frombuffer(data, kind).reshape(shape)


def bf16_round(x):
    """float32 -> bfloat16 (round to nearest even), returned as float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint32) << 16
    return r.view(np.float32)


def round_to(dtype, x):
    x = np.asarray(x, np.float32)
    if dtype == "BF16":
        return bf16_round(x)
    if dtype == "F16":
        return x.astype(np.float16).astype(np.float32)
    return x


def load(path):
    """{name: (dtype, array)} from a file or a model directory, checking the
    index of a sharded directory and opening every file with safe_open."""
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        index_path = os.path.join(path, "model.safetensors.index.json")
    else:
        files, index_path = [os.path.basename(path)], None
        path = os.path.dirname(path)
    tensors, where, total, metas = {}, {}, 0, {}
    for f in files:
        full = os.path.join(path, f)
        with safe_open(full, framework="numpy") as so:
            metas[f] = so.metadata() or {}
            keys = list(so.keys())
        with open(full, "rb") as fh:
            raw = fh.read()
        items = deserialize(raw)
        # File order (data offsets), which is model order within a shard.
        header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
        items.sort(key=lambda it: header[it[0]]["data_offsets"][0])
        if sorted(keys) != sorted(n for n, _ in items):
            fail(f"{full}: safe_open and deserialize disagree")
        for name, t in items:
            tensors[name] = (t["dtype"], decode(t["dtype"], t["shape"], bytes(t["data"])))
            where[name] = f
            total += len(t["data"])
    if index_path and os.path.exists(index_path):
        index = json.load(open(index_path))
        if index["weight_map"] != where:
            fail(f"{index_path}: weight_map does not match the shards")
        if index["metadata"]["total_size"] != total:
            fail(f"{index_path}: total_size {index['metadata']['total_size']} != {total}")
    elif len(files) > 1:
        fail(f"{path}: shards without an index")
    return tensors, metas
