#!/usr/bin/env python3
"""Dev check (not CI: needs llm-compressor, transformers and torch):
`modelpress quantize --scheme S` against llm-compressor's data-free
`oneshot` (QuantizationModifier, targets Linear, ignore lm_head) on the
same models, tensor by tensor and byte by byte, with the config; then both
outputs loaded in transformers, whose logits must be equal.

    python -m venv /tmp/mk && /tmp/mk/bin/pip install llmcompressor==0.14.0.1 compressed-tensors==0.19.0
    HF_HUB_OFFLINE=1 /tmp/mk/bin/python tests/dev/check_llmcompressor.py target/release/modelpress WORKDIR [--bench]

Models (random weights, built with transformers: the machine that wrote
this has no network):
  llama    LLaMA, bf16, hidden 256, intermediate 512, untied
  llama16  LLaMA, f16, hidden 320, intermediate 704, tied embeddings
           (group-128 schemes refused by both tools; ragged FP8 blocks)
  minilm   BERT shaped as all-MiniLM-L6-v2 (hidden 384, 12 heads,
           intermediate 1536), f32, 2 layers

--bench times both tools (and peak RSS) on a TinyLlama-1.1B-shaped bf16
model (hidden 2048, intermediate 5632, 22 layers, GQA 32/4) for W4A16 and
FP8_DYNAMIC.
"""
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "interop"))
from interop_common import read_tensors as tensors  # noqa: E402

BIN, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
BENCH = "--bench" in sys.argv
SCHEMES = ["W8A16", "W4A16", "W4A16_ASYM", "W8A8", "FP8_DYNAMIC", "FP8_BLOCK", "NVFP4A16", "MXFP4A16"]
os.makedirs(WORK, exist_ok=True)


def build(kind, out):
    if os.path.exists(out):
        return
    torch.manual_seed(0)
    if kind == "minilm":
        cfg = transformers.BertConfig(hidden_size=384, num_hidden_layers=2, num_attention_heads=12,
                                      intermediate_size=1536, vocab_size=2000)
        m = transformers.BertModel(cfg)
    elif kind == "tinyllama":
        cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                       num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                       max_position_embeddings=2048)
        m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    else:
        f16 = kind == "llama16"
        cfg = transformers.LlamaConfig(
            hidden_size=320 if f16 else 256, intermediate_size=704 if f16 else 512, num_hidden_layers=2,
            num_attention_heads=5 if f16 else 4, num_key_value_heads=5 if f16 else 2, vocab_size=1024,
            max_position_embeddings=256, tie_word_embeddings=f16)
        m = transformers.LlamaForCausalLM(cfg).to(torch.float16 if f16 else torch.bfloat16)
    m.save_pretrained(out)


def auto(kind):
    return transformers.AutoModel if kind == "minilm" else transformers.AutoModelForCausalLM


def llmcompressor(kind, base, scheme, out):
    """llm-compressor's output, or the reason it refused."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    if os.path.exists(out):
        return None
    m = auto(kind).from_pretrained(base, dtype="auto")
    try:
        oneshot(model=m, recipe=QuantizationModifier(targets="Linear", scheme=scheme, ignore=["lm_head"]))
    except Exception as e:  # noqa: BLE001 - refusals are compared
        return f"{type(e).__name__}: {str(e)[:200]}"
    m.save_pretrained(out, save_compressed=True)
    return None


def compare(ref, ours):
    """Differences between two output directories (tensors and config)."""
    a, b = tensors(ref), tensors(ours)
    diffs = []
    if set(a) != set(b):
        diffs.append(f"names differ: {sorted(set(a) ^ set(b))[:6]}")
    for k in sorted(set(a) & set(b)):
        if a[k][:2] != b[k][:2]:
            diffs.append(f"{k}: {a[k][:2]} vs {b[k][:2]}")
        elif a[k][2] != b[k][2]:
            x, y = np.frombuffer(a[k][2], np.uint8), np.frombuffer(b[k][2], np.uint8)
            diffs.append(f"{k}: {int((x != y).sum())} of {x.size} bytes differ")
    qa = json.load(open(os.path.join(ref, "config.json")))["quantization_config"]
    qb = json.load(open(os.path.join(ours, "config.json")))["quantization_config"]
    if qa != qb:
        diffs.append(f"quantization_config differs: {json.dumps(qa)} vs {json.dumps(qb)}")
    return diffs


def decompress_matches(ref, deq):
    """Each quantized module of `ref` decompressed by compressed-tensors'
    own compressor against `modelpress dequantize`'s output `deq`: the
    number of modules and of those exactly equal (dtype included)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    g = json.load(open(os.path.join(ref, "config.json")))["quantization_config"]["config_groups"]["group_0"]
    scheme = QuantizationScheme(targets=g["targets"], weights=g["weights"], input_activations=g["input_activations"])
    comp = BaseCompressor.get_value_from_registry(g["format"])
    load = lambda d: {k: v for f in os.listdir(d) if f.endswith(".safetensors")  # noqa: E731
                      for k, v in load_file(os.path.join(d, f)).items()}
    sd, mine = load(ref), load(deq)
    mods = sorted({k.rsplit(".", 1)[0] for k in sd if k.endswith(".weight_scale")})
    same = 0
    for m in mods:
        part = {k.rsplit(".", 1)[1]: v for k, v in sd.items() if k.rsplit(".", 1)[0] == m}
        w, o = comp.decompress(part, scheme)["weight"], mine.get(m + ".weight")
        # FP4 decompresses to bf16 whatever the model's dtype: compare values.
        same += o is not None and torch.equal(w.to(o.dtype), o) and (w.dtype == o.dtype or "fp4" in g["format"])
    return len(mods), same


def logits(kind, d):
    torch.manual_seed(1)
    m = auto(kind).from_pretrained(d, dtype="auto")
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        out = m(input_ids=ids)
    return (out.logits if kind != "minilm" else out.last_hidden_state).float()


def run(*cmd):
    t = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r, time.time() - t


failures = 0
for kind in ("llama", "llama16", "minilm"):
    base = os.path.join(WORK, kind, "base")
    build(kind, base)
    want_base = logits(kind, base)
    for scheme in SCHEMES:
        ref = os.path.join(WORK, kind, scheme)
        refused = llmcompressor(kind, base, scheme, ref)
        for dev in ("cpu", "gpu"):
            ours = os.path.join(WORK, kind, f"mp-{scheme}-{dev}")
            r, _ = run(BIN, "quantize", base, "-o", ours, "--scheme", scheme, "--device", dev, "--force")
            if refused:
                ok = r.returncode != 0
                print(f"{kind:8} {scheme:12} {dev}: llm-compressor refused; modelpress "
                      f"{'refused too: ' + r.stderr.strip()[-120:] if ok else 'did NOT refuse'}")
                failures += not ok
                continue
            if r.returncode != 0:
                print(f"{kind:8} {scheme:12} {dev}: modelpress failed: {r.stderr.strip()}")
                failures += 1
                continue
            diffs = compare(ref, ours)
            r, _ = run(BIN, "dequantize", ours, "-o", ours + "-deq", "--device", dev, "--force")
            n, same = decompress_matches(ref, ours + "-deq") if r.returncode == 0 else (-1, 0)
            head = (f"{kind:8} {scheme:12} {dev}: {len(tensors(ours))} tensors, "
                    f"{'identical' if not diffs else '; '.join(diffs[:3])}; dequantize equals "
                    f"compressed-tensors' decompress() on {same}/{n} modules; ")
            failures += bool(diffs) + (same != n)
            try:
                want = logits(kind, ref)
            except Exception as e:  # noqa: BLE001 - a loader bug of the peer's own output
                try:
                    logits(kind, ours)
                    print(head + "transformers loads ours but not llm-compressor's")
                except Exception as e2:  # noqa: BLE001
                    print(head + f"transformers loads neither llm-compressor's output nor ours "
                          f"({type(e).__name__}: {str(e)[:90]} / {type(e2).__name__})")
                continue
            got = logits(kind, ours)
            same = torch.equal(got, want)
            rel = float((want - want_base).norm() / want_base.norm())
            print(head + f"transformers logits {'equal' if same else 'DIFFER'} "
                  f"(quantized vs float: {rel:.2e} relative)")
            failures += not same

# Extremes: the CI check's models (every finite bf16 / f16 bit pattern in
# down_proj, subnormals and huge values in f32), quantized by modelpress
# there, against llm-compressor here.
ext = os.path.join(WORK, "extremes")
r, _ = run(sys.executable, os.path.join(os.path.dirname(__file__), "..", "interop", "check_compressed.py"),
           BIN, "cpu", ext)
print(r.stdout.strip() or r.stderr.strip())
for dt in ("BF16", "F16", "F32"):
    for scheme in SCHEMES:
        ref = os.path.join(ext, f"llmc-{scheme}-{dt}")
        refused = llmcompressor("llama", os.path.join(ext, f"base-{dt}"), scheme, ref)
        if refused:
            print(f"extremes {dt:4} {scheme:12}: llm-compressor refused: {refused}")
            failures += 1
            continue
        diffs = compare(ref, os.path.join(ext, f"{scheme}-{dt}"))
        print(f"extremes {dt:4} {scheme:12}: {'identical' if not diffs else '; '.join(diffs[:3])}")
        failures += bool(diffs)

if BENCH:
    base = os.path.join(WORK, "tinyllama", "base")
    build("tinyllama", base)
    script = os.path.join(WORK, "oneshot.py")
    with open(script, "w") as f:
        f.write(
            "import sys, transformers\n"
            "from llmcompressor import oneshot\n"
            "from llmcompressor.modifiers.quantization import QuantizationModifier\n"
            "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype='auto')\n"
            "oneshot(model=m, recipe=QuantizationModifier(targets='Linear', scheme=sys.argv[2], ignore=['lm_head']))\n"
            "m.save_pretrained(sys.argv[3], save_compressed=True)\n")
    size = sum(os.path.getsize(os.path.join(base, f)) for f in os.listdir(base))
    for scheme in ("W4A16", "FP8_DYNAMIC"):
        ref = os.path.join(WORK, "tinyllama", scheme)
        rows = []
        for name, cmd in [
            ("llm-compressor", [sys.executable, script, base, scheme, ref]),
            ("modelpress cpu", [BIN, "quantize", base, "-o", ref + "-mp-cpu", "--scheme", scheme, "--device", "cpu", "--force"]),
            ("modelpress gpu", [BIN, "quantize", base, "-o", ref + "-mp-gpu", "--scheme", scheme, "--device", "gpu", "--force"]),
        ]:
            t = time.time()
            p = subprocess.Popen(["/usr/bin/time", "-f", "%M", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            _, err = p.communicate()
            dt = time.time() - t
            rss = int(err.strip().splitlines()[-1]) / 1024
            rows.append((name, dt, rss, p.returncode))
        diffs = compare(ref, ref + "-mp-cpu") + compare(ref, ref + "-mp-gpu")
        print(f"tinyllama {scheme} ({size / 1e9:.2f} GB bf16): "
              + "; ".join(f"{n} {dt:.1f} s, {rss:.0f} MB peak RSS" + ("" if rc == 0 else f" (exit {rc})") for n, dt, rss, rc in rows)
              + f"; outputs {'identical' if not diffs else diffs[:2]}")
        failures += bool(diffs)

print("FAILED" if failures else "all identical")
sys.exit(1 if failures else 0)
