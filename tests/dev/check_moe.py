#!/usr/bin/env python3
"""Dev check (not CI: needs transformers and torch): `modelpress moe` builds
a Mixtral from a tiny bf16 LLaMA; transformers loads it as
MixtralForCausalLM with every tensor (router included) taken from the file;
with both experts the base's own MLP its logits equal the base's (f32 run);
with two different experts it loads and runs. With `gate_mode:
cheap_embed` (a BPE tokenizer trained here, saved beside the base), the
routers equal mergekit-moe's on the same configuration.

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
# cheap_embed against mergekit-moe: the base needs a tokenizer.
from tokenizers import Tokenizer, models, pre_tokenizers, trainers  # noqa: E402

tk_dir = os.path.join(WORK, "base")
if not os.path.exists(os.path.join(tk_dir, "tokenizer.json")):
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = ["write python code for sorting a list", "solve the math problem step by step",
              "compose a poem about the sea", "translate this sentence into french"] * 50
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(tk_dir)
yml = os.path.join(WORK, "cheap.yml")
open(yml, "w").write(
    f"base_model: {base}\ngate_mode: cheap_embed\ndtype: float32\nexperts_per_token: 2\nexperts:\n"
    f"  - source_model: {base}\n    positive_prompts: [\"write python code\", \"sorting a list\"]\n"
    f"  - source_model: {other}\n    positive_prompts: [\"compose a poem\"]\n    negative_prompts: [\"math problem\"]\n")
ours, theirs = os.path.join(WORK, "moe-cheap"), os.path.join(WORK, "mk-cheap")
r = subprocess.run([BIN, "moe", yml, "-o", ours, "--force"], capture_output=True, text=True)
if r.returncode != 0:
    sys.exit(f"cheap_embed: {r.stderr}")
mk = os.path.join(os.path.dirname(sys.executable), "mergekit-moe")
subprocess.run(["rm", "-rf", theirs])
r = subprocess.run([mk, yml, theirs, "--device", "cpu"], capture_output=True, text=True)
if r.returncode != 0:
    sys.exit(f"mergekit-moe: {r.stderr[-2000:]}")
a, b = load_file(os.path.join(ours, "model.safetensors")), {}
for f in os.listdir(theirs):
    if f.endswith(".safetensors"):
        b.update(load_file(os.path.join(theirs, f)))
worst = 0.0
for layer in range(2):
    # mergekit-moe 0.1.5 writes transformers 5's fused layout (mlp.gate).
    x = a[f"model.layers.{layer}.block_sparse_moe.gate.weight"].float()
    y = b[f"model.layers.{layer}.mlp.gate.weight"].float()  # f32 (dtype: float32)
    # Ours are in the model's bf16: compare with theirs rounded once.
    ulp = torch.exp2(torch.floor(torch.log2(y.abs().clamp(min=1e-30))) - 7)
    worst = max(worst, float(((x - y.bfloat16().float()).abs() / ulp).max()))
print(f"cheap_embed routers vs mergekit-moe's rounded to bf16: {worst:.1f} bf16 ulps at most")
failures += worst > 1
print("FAILED" if failures else "ok")
sys.exit(1 if failures else 0)
