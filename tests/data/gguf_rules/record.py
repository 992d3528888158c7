"""Records llama-quantize's per-tensor type choices on the synthetic models.

Usage: record.py LLAMA_QUANTIZE MODELDIR > expected.json
For each model and file type: the metadata the rules read, every tensor's
name and row-major shape in file order, and the GGML type llama-quantize
gave it.
"""
import json, os, subprocess, sys
import gguf

Q, DIR = sys.argv[1], sys.argv[2]
FTYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L",
          "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K"]
out = {}
for m in ("llama70b", "moe8", "falcon"):
    src = os.path.join(DIR, f"{m}.gguf")
    r = gguf.GGUFReader(src)
    meta = {}
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or not f.types:
            continue
        t = f.types[0]
        if t == gguf.GGUFValueType.STRING and f.name == "general.architecture":
            meta[f.name] = bytes(f.parts[f.data[0]]).decode()
        elif t in (gguf.GGUFValueType.UINT32, gguf.GGUFValueType.INT32, gguf.GGUFValueType.UINT64):
            meta[f.name] = int(f.parts[f.data[0]][0])
    tensors = [[t.name, [int(d) for d in reversed(t.shape)]] for t in r.tensors]
    types = {}
    for ft in FTYPES:
        dst = os.path.join(DIR, f"out-{m}-{ft}.gguf")
        subprocess.run([Q, src, dst, ft, "2"], check=True, capture_output=True)
        got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(dst).tensors}
        types[ft] = [got[n] for n, _ in tensors]
        os.remove(dst)
    out[m] = {"metadata": meta, "tensors": tensors, "types": types}
# llama-quantize's overrides: --tensor-type (lowercased patterns, the first
# match winning), --output-tensor-type (tied embeddings too),
# --token-embedding-type and --leave-output-tensor.
RUNS = [
    ("llama70b", "Q4_K_M", ["--tensor-type", "attn_q=q8_0", "--tensor-type", r"blk\.1[0-9]\.ffn_down=q5_k",
                            "--output-tensor-type", "q8_0", "--token-embedding-type", "q4_0"]),
    ("llama70b", "Q3_K_M", ["--leave-output-tensor", "--tensor-type", "ffn_up=f16",
                            "--tensor-type", r"BLK\.7[0-9]\.attn_v=q2_k"]),
    ("falcon", "Q4_K_M", ["--output-tensor-type", "q5_0"]),
    ("falcon", "Q2_K", ["--token-embedding-type", "bf16", "--tensor-type", "attn_qkv=q6_k"]),
    ("moe8", "Q4_K_S", ["--tensor-type", "ffn_down_exps=q8_0", "--tensor-type", "ffn_.*_exps=q3_k"]),
]
runs = []
for m, ft, args in RUNS:
    src = os.path.join(DIR, f"{m}.gguf")
    dst = os.path.join(DIR, f"out-{m}-{ft}-opts.gguf")
    subprocess.run([Q, *args, src, dst, ft, "2"], check=True, capture_output=True)
    got = {t.name: t.tensor_type.name for t in gguf.GGUFReader(dst).tensors}
    runs.append({"model": m, "ftype": ft, "args": args, "types": [got[n] for n, _ in out[m]["tensors"]]})
    os.remove(dst)
out["runs"] = runs
json.dump(out, sys.stdout, separators=(",", ":"))
