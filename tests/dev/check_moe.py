#!/usr/bin/env python3
"""Dev check (not CI: needs transformers and torch): `modelpress moe` builds
a Mixtral from a tiny bf16 LLaMA; transformers loads it as
MixtralForCausalLM with every tensor (router included) taken from the file;
with both experts the base's own MLP its logits equal the base's (f32 run);
with two different experts it loads and runs.

    HF_HUB_OFFLINE=1 /tmp/mk/bin/python tests/dev/check_moe.py target/release/modelpress WORKDIR
"""
import os
import subprocess
import sys

import torch
import transformers
from safetensors.torch import load_file

BIN, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
os.makedirs(WORK, exist_ok=True)
base, other = os.path.join(WORK, "base"), os.path.join(WORK, "other")
for d, seed in ((base, 0), (other, 1)):
    if not os.path.exists(d):
        torch.manual_seed(seed)
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256, rope_theta=50000.0)
        transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(d)
ids = torch.arange(3, 40).reshape(1, -1)
failures = 0
for label, experts in (("same", [base, base]), ("different", [base, other, base])):
    yml = os.path.join(WORK, f"{label}.yml")
    open(yml, "w").write(f"base_model: {base}\ngate_mode: random\nexperts_per_token: 2\nexperts:\n"
                         + "".join(f"  - source_model: {e}\n" for e in experts))
    out = os.path.join(WORK, f"moe-{label}")
    r = subprocess.run([BIN, "moe", yml, "-o", out, "--force"], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"{label}: {r.stderr}")
    m, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    missing = [k for k in info["missing_keys"]] + [k for k in info["unexpected_keys"]]
    sd = load_file(os.path.join(out, "model.safetensors"))
    gate = sd["model.layers.0.block_sparse_moe.gate.weight"].float()
    loaded = m.model.layers[0].mlp.gate.weight.float()
    same_gate = torch.equal(gate, loaded)
    with torch.no_grad():
        y = m(input_ids=ids).logits
    line = (f"{label}: {type(m).__name__}, {len(experts)} experts, rope {getattr(m.config, 'rope_parameters', None)}, "
            f"missing/unexpected keys {missing}, router loaded {same_gate}")
    failures += bool(missing) or not same_gate or type(m).__name__ != "MixtralForCausalLM"
    if label == "same":
        b = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            x = b(input_ids=ids).logits
        rel = float((x - y).norm() / x.norm())
        line += f"; logits vs the base: {rel:.1e} relative (max |Δ| {float((x - y).abs().max()):.1e})"
        failures += rel > 1e-5
    print(line)
print("FAILED" if failures else "ok")
sys.exit(1 if failures else 0)
