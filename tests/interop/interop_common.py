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


NP = {"BF16": None, "F16": np.float16, "F32": np.float32}


def to_raw(dt, x):
    """float32 values already in dt -> little-endian bytes of dt."""
    x = np.asarray(x, np.float32)
    if dt == "BF16":
        return (x.view(np.uint32) >> 16).astype("<u2").tobytes()
    return x.astype(NP[dt]).tobytes()


def from_raw(dt, b):
    if dt == "BF16":
        return (np.frombuffer(b, "<u2").astype(np.uint32) << 16).view(np.float32)
    return np.frombuffer(b, NP[dt]).astype(np.float32)


def write_safetensors(path, tensors):
    """{name: (dtype, shape, bytes)} -> a safetensors file."""
    header, off = {}, 0
    for k, (dt, shape, b) in tensors.items():
        header[k] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little") + h)
        for _, _, b in tensors.values():
            f.write(b)


def read_tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if not f.endswith(".safetensors"):
            continue
        full = os.path.join(d, f)
        with safe_open(full, framework="numpy") as so:  # the reader accepts it
            keys = set(so.keys())
        with open(full, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            hdr = json.loads(fh.read(n))
            for k, v in hdr.items():
                if k == "__metadata__":
                    continue
                a, b = v["data_offsets"]
                fh.seek(8 + n + a)
                out[k] = (v["dtype"], tuple(v["shape"]), fh.read(b - a))
        if keys != set(hdr) - {"__metadata__"}:
            fail(f"{full}: safe_open lists other tensors")
    return out
