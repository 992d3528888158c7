#!/usr/bin/env python3
"""Dev benchmark (not CI): `lora merge` and `lora extract` on a
TinyLlama-1.1B-shaped bf16 model against PEFT's merge_and_unload and
torch.linalg.svd / torch.svd_lowrank, same machine, one run.

    HF_HUB_OFFLINE=1 /tmp/mk/bin/python tests/dev/bench_lora.py target/release/modelpress BASE_DIR WORKDIR [--gpu]

--gpu adds an extraction on the GPU adapter (on lavapipe it ran past
12 minutes: its workgroup barriers are slow; not a hardware figure).

BASE_DIR: a transformers LLaMA directory (check_llmcompressor.py --bench
builds one at WORKDIR/tinyllama/base).
"""
import os
import subprocess
import sys
import time

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

BIN, BASE, WORK = (os.path.abspath(a) for a in sys.argv[1:4])
os.makedirs(WORK, exist_ok=True)
R = 16
adapter = os.path.join(WORK, "adapter")
if not os.path.exists(adapter):
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.bfloat16)
    get_peft_model(m, LoraConfig(r=R, lora_alpha=2 * R, init_lora_weights=False,
                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
                   ).save_pretrained(adapter)


def timed(cmd):
    t = time.time()
    p = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{cmd}: {p.stderr[-800:]}")
    return time.time() - t, int(p.stderr.strip().splitlines()[-1]) / 1024


ft = os.path.join(WORK, "ft")
rows = []
rows.append(("modelpress lora merge (cpu)", *timed([BIN, "lora", "merge", BASE, adapter, "-o", ft, "--device", "cpu", "--force"])))
peft_script = os.path.join(WORK, "peft_merge.py")
open(peft_script, "w").write(
    "import sys, torch, transformers\nfrom peft import PeftModel\n"
    "m = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)\n"
    "PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload().save_pretrained(sys.argv[3])\n")
rows.append(("PEFT merge_and_unload + save", *timed([sys.executable, peft_script, BASE, adapter, os.path.join(WORK, "ft-peft")])))
for dev in ("cpu", "gpu") if "--gpu" in sys.argv else ("cpu",):
    rows.append((f"modelpress lora extract --rank {R} ({dev})",
                 *timed([BIN, "lora", "extract", ft, BASE, "-o", os.path.join(WORK, f"ext-{dev}"), "--rank", str(R),
                         "--device", dev, "--force"])))
svd_script = os.path.join(WORK, "svd.py")
open(svd_script, "w").write(
    "import sys, os, torch\nfrom safetensors.torch import load_file\n"
    "torch.set_num_threads(os.cpu_count())\n"
    "a = load_file(os.path.join(sys.argv[1], 'model.safetensors')); b = load_file(os.path.join(sys.argv[2], 'model.safetensors'))\n"
    "for k, v in a.items():\n"
    "    if v.ndim == 2 and 'embed' not in k and 'lm_head' not in k:\n"
    "        d = v.float() - b[k].float()\n"
    "        if sys.argv[3] == 'full':\n"
    "            U, S, Vh = torch.linalg.svd(d, full_matrices=False)\n"
    "        else:\n"
    "            U, S, V = torch.svd_lowrank(d, q=int(sys.argv[4]) + 10, niter=2)\n")
rows.append(("torch.linalg.svd (full, f32)", *timed([sys.executable, svd_script, ft, BASE, "full", str(R)])))
rows.append((f"torch.svd_lowrank (q={R + 10}, niter=2)", *timed([sys.executable, svd_script, ft, BASE, "lowrank", str(R)])))
size = os.path.getsize(os.path.join(BASE, "model.safetensors"))
print(f"TinyLlama-1.1B-shaped, {size / 1e9:.2f} GB bf16, rank-{R} adapter on every Linear layer:")
for name, dt, rss in rows:
    print(f"  {name:42} {dt:7.1f} s  {rss:7.0f} MB peak RSS")
