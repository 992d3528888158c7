#!/usr/bin/env python3
"""Dev check (not CI: needs PEFT, transformers and torch): `modelpress lora
merge` against PEFT's own `merge_and_unload` on adapters PEFT made for a
tiny bf16 LLaMA: plain LoRA, rsLoRA with rank/alpha patterns, DoRA, an
embedding adapter with modules_to_save, two adapters weighted; every
merged tensor compared (in bf16 ulps) and the logits of both models.

    /tmp/mk/bin/pip install peft==0.21.2
    HF_HUB_OFFLINE=1 /tmp/mk/bin/python tests/dev/check_peft.py target/release/modelpress WORKDIR
"""
import json
import os
import subprocess
import sys
import time

import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

BIN, WORK = os.path.abspath(sys.argv[1]), os.path.abspath(sys.argv[2])
os.makedirs(WORK, exist_ok=True)
base = os.path.join(WORK, "base")
torch.manual_seed(0)
if not os.path.exists(base):
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256)
    transformers.LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(base)

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "lora": dict(r=8, lora_alpha=16, target_modules=LINEAR),
    "rslora": dict(r=8, lora_alpha=32, use_rslora=True, target_modules=LINEAR,
                   rank_pattern={"down_proj": 4}, alpha_pattern={"layers.1.self_attn.q_proj": 8}),
    "dora": dict(r=8, lora_alpha=16, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "embed": dict(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"], modules_to_save=["lm_head"]),
}


def make(name, kw):
    d = os.path.join(WORK, name)
    if os.path.exists(d):
        return d
    torch.manual_seed(hash(name) % 1000)
    m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    pm = get_peft_model(m, LoraConfig(init_lora_weights=False, **kw))
    # Non-trivial magnitudes and saved modules, as after training.
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n or "modules_to_save" in n:
                p.mul_(1 + 0.05 * torch.randn_like(p))
    pm.save_pretrained(d)
    return d


def peft_merged(dirs, weights, out):
    m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    if len(dirs) == 1:
        merged = PeftModel.from_pretrained(m, dirs[0]).merge_and_unload()
    else:
        # Exact weighted sum of the deltas: each adapter merged in turn with
        # its scaling multiplied by its weight.
        pm = PeftModel.from_pretrained(m, dirs[0], adapter_name="a0")
        for i, d in enumerate(dirs[1:], 1):
            pm.load_adapter(d, adapter_name=f"a{i}")
        for i, w in enumerate(weights):
            for mod in pm.modules():
                if isinstance(getattr(mod, "scaling", None), dict) and f"a{i}" in mod.scaling:
                    mod.scaling[f"a{i}"] *= w
        # The once-rounded reference: W + Σ wᵢ·ΔWᵢ summed in f32 from PEFT's
        # own get_delta_weight (PEFT's merge rounds after each adapter).
        exact = {}
        for n, mod in pm.named_modules():
            if hasattr(mod, "get_delta_weight") and hasattr(mod, "base_layer"):
                w = mod.base_layer.weight.float().clone()
                for i in range(len(dirs)):
                    if f"a{i}" in mod.lora_A:
                        w += mod.get_delta_weight(f"a{i}").float()
                key = n.replace("base_model.model.", "", 1) + ".weight"
                exact[key] = w.to(torch.bfloat16)
        merged = pm.merge_and_unload(adapter_names=[f"a{i}" for i in range(len(dirs))])
        EXACT[out] = exact
    merged.save_pretrained(out)
    return out


EXACT = {}


def exact_embedding(adapter, k):
    """W + s·(B·A)ᵀ in f32, rounded once to bf16."""
    sd = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    m = k[: -len(".weight")]
    A = sd[f"base_model.model.{m}.lora_embedding_A"].float()
    B = sd[f"base_model.model.{m}.lora_embedding_B"].float()
    import json
    c = json.load(open(os.path.join(adapter, "adapter_config.json")))
    s = c["lora_alpha"] / c["r"]
    W = load_file(os.path.join(base, "model.safetensors"))[k].float()
    return (W + (B @ A).T * s).to(torch.bfloat16)


def logits(d):
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        return m(input_ids=ids).logits.float()


def ulps(a, b):
    """|a − b| in bf16 ulps of max(|a|, |b|)."""
    a, b = a.float(), b.float()
    mag = torch.maximum(a.abs(), b.abs()).clamp(min=2.0**-126)
    ulp = 2.0 ** (torch.floor(torch.log2(mag)) - 7)
    return ((a - b).abs() / ulp)


failures = 0
cases = [(n, [n], [1.0]) for n in ADAPTERS] + [("lora+rslora", ["lora", "rslora"], [0.7, 0.4])]
ref_base = logits(base)
for label, names, weights in cases:
    dirs = [make(n, ADAPTERS[n]) for n in names]
    want = peft_merged(dirs, weights, os.path.join(WORK, f"peft-{label}"))
    wl = logits(want)
    for dev in ("cpu", "gpu"):
        out = os.path.join(WORK, f"mp-{label}-{dev}")
        cmd = [BIN, "lora", "merge", base, *dirs, "-o", out, "--device", dev, "--force"]
        if len(dirs) > 1:
            cmd += ["--weights", ",".join(map(str, weights))]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{label} {dev}: modelpress failed: {r.stderr.strip()}")
            failures += 1
            continue
        a, b = load_file(os.path.join(want, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
        if set(a) != set(b):
            print(f"{label} {dev}: names differ {sorted(set(a) ^ set(b))[:5]}")
            failures += 1
            continue
        worst, differ, total = 0.0, 0, 0
        for k in a:
            ref = a[k]
            if "embed_tokens" in k and label == "embed":
                # PEFT's Embedding.merge rounds ΔW to bf16 before adding;
                # modelpress rounds the f32 sum once: compare with that.
                ref = exact_embedding(dirs[0], k)
                print(f"{label:12} {dev}: {k}: PEFT is {float(ulps(a[k], ref).max()):.0f} bf16 ulp "
                      f"from the once-rounded sum")
            if k in EXACT.get(want, {}):
                ref = EXACT[want][k]
                peft_off = float(ulps(a[k], ref).max())
                if peft_off > 0:
                    print(f"{label:12} {dev}: {k}: PEFT's sequential merge is {peft_off:.0f} bf16 ulp "
                          f"from the once-rounded sum")
            u = ulps(ref, b[k])
            worst = max(worst, float(u.max()))
            differ += int((u > 0).sum())
            total += u.numel()
        gl = logits(out)
        rel = float((gl - wl).norm() / wl.norm())
        moved = float((wl - ref_base).norm() / ref_base.norm())
        ok = worst <= 1
        print(f"{label:12} {dev}: {differ} of {total} weights differ from the reference (PEFT's merge, or the "
              f"once-rounded sum where PEFT rounds twice), at most {worst:.0f} bf16 ulp; "
              f"logits differ by {rel:.1e} relative (the adapter moves them by {moved:.1e})")
        failures += not ok
        # Unmerge (not DoRA, not modules_to_save): back to the base up to the
        # rounding the merge did (large where |ΔW| ≫ |W|, as here).
        if label in ("lora", "rslora"):
            back = out + "-unmerged"
            r = subprocess.run([BIN, "lora", "merge", out, *dirs, "-o", back, "--unmerge",
                                "--device", dev, "--force"], capture_output=True, text=True)
            if r.returncode == 0:
                c, o = load_file(os.path.join(base, "model.safetensors")), load_file(os.path.join(back, "model.safetensors"))
                w = max(float(ulps(c[k], o[k]).max()) for k in c)
                print(f"{label:12} {dev}: unmerged back to the base within {w:.0f} bf16 ulp")
            else:
                print(f"{label} {dev}: unmerge failed: {r.stderr.strip()}")
                failures += 1
# Extraction: the fine-tune made by merging the plain adapter, extracted
# back at ranks 8 (its rank: everything but bf16 rounding) and 4, loaded by
# PEFT; the logits' distance to the fine-tune's should follow the energy.
ft = os.path.join(WORK, "mp-lora-cpu")
ft_logits = logits(ft)
# The floor: PEFT running the original adapter unmerged (bf16 products)
# against the merged model.
with torch.no_grad():
    orig = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16),
                                     os.path.join(WORK, "lora"))(input_ids=torch.arange(3, 40).reshape(1, -1)).logits.float()
floor = float((orig - ft_logits).norm() / ft_logits.norm())
print(f"extract: PEFT's own adapter, unmerged, is {floor:.1e} relative from the merged fine-tune (the floor)")
for rank in (8, 4):
    for dev in ("cpu", "gpu"):
        ext = os.path.join(WORK, f"extract-{rank}-{dev}")
        t = time.time()
        r = subprocess.run([BIN, "lora", "extract", ft, base, "-o", ext, "--rank", str(rank), "--device", dev,
                            "--force", "--report", ext + ".json"], capture_output=True, text=True)
        dt = time.time() - t
        if r.returncode != 0:
            print(f"extract r={rank} {dev}: failed: {r.stderr.strip()}")
            failures += 1
            continue
        rep = json.load(open(ext + ".json"))["modules"]
        kept = min(m["energy_kept"] for m in rep)
        m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
        pm = PeftModel.from_pretrained(m, ext)
        with torch.no_grad():
            got = pm(input_ids=torch.arange(3, 40).reshape(1, -1)).logits.float()
        rel = float((got - ft_logits).norm() / ft_logits.norm())
        print(f"extract r={rank} {dev}: {dt:.1f} s, PEFT loads it; least energy kept {100 * kept:.4f}%; "
              f"logits {rel:.1e} relative from the fine-tune's")
        failures += rank == 8 and rel > 1.5 * floor
print("FAILED" if failures else "all within bounds")
sys.exit(1 if failures else 0)
