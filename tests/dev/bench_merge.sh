#!/usr/bin/env bash
# Dev benchmark (not CI): TIES (density 0.5) of three 2.2 GB bf16 TinyLlama-shaped
# "fine-tunes" onto their base, modelpress against mergekit 0.1.5 and cp + sync of
# the bytes read; one run each, warm cache (BENCHMARKS.md, 2026-12-01).
#   tests/dev/bench_merge.sh target/release/modelpress /tmp/mkvenv /tmp/b22
set -euo pipefail
B=$(realpath "${1:?usage: bench_merge.sh MODELPRESS VENV_DIR WORKDIR}")
V=${2:?venv dir (mergekit 0.1.5, transformers)}
D=${3:?work dir (about 20 GB free)}

mkdir -p "$D" && D=$(realpath "$D") && cd "$D"
if [ ! -e ft3/model.safetensors ]; then
HF_HUB_OFFLINE=1 D=$D "$V/bin/python" - <<'PY'
import torch, transformers, os, shutil
D = os.environ["D"]
from safetensors.torch import load_file, save_file
torch.manual_seed(0)
cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
    tie_word_embeddings=False)
if not os.path.exists(D + "/base/model.safetensors"):
    m = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(D + "/base", max_shard_size="10GB")
    del m
sd = load_file(D + "/base/model.safetensors")
for i in (1, 2, 3):
    g = torch.Generator().manual_seed(i)
    ft = {k: (v.float() + 0.02 * v.float().std() * torch.randn(v.shape, generator=g)).to(torch.bfloat16).contiguous() for k, v in sd.items()}
    os.makedirs(f"{D}/ft{i}", exist_ok=True)
    save_file(ft, f"{D}/ft{i}/model.safetensors", metadata={"format": "pt"})
    shutil.copy(D + "/base/config.json", f"{D}/ft{i}/config.json")
    del ft
PY
fi
cat > ties.yml <<Y
merge_method: ties
base_model: $D/base
models:
  - {model: $D/ft1, parameters: {weight: 1.0, density: 0.5}}
  - {model: $D/ft2, parameters: {weight: 0.5, density: 0.5}}
  - {model: $D/ft3, parameters: {weight: 0.3, density: 0.5}}
dtype: bfloat16
Y
bytes=$(cat base/model.safetensors ft*/model.safetensors | wc -c)
echo "bytes read: $bytes"
cat base/model.safetensors ft*/model.safetensors > /dev/null
t() { /usr/bin/time -f "%e s, %M KB" "$@" 2>&1 >/dev/null | tail -1; }
rm -rf cpy; mkdir cpy
echo "cp+sync: $( { /usr/bin/time -f '%e s' sh -c 'for f in base ft1 ft2 ft3; do cp $f/model.safetensors cpy/$f.st; done; sync' ; } 2>&1 | tail -1)"
rm -rf cpy
rm -rf mp; echo "modelpress: $(t $B merge ties.yml -o mp --device cpu)"
rm -rf mp; echo "modelpress again: $(t $B merge ties.yml -o mp --device cpu)"
mkdir -p cpy; echo "cp+sync again: $( { /usr/bin/time -f '%e s' sh -c 'for f in base ft1 ft2 ft3; do cp $f/model.safetensors cpy/$f.st; done; sync' ; } 2>&1 | tail -1)"; rm -rf cpy
rm -rf mk; echo "mergekit: $(HF_HUB_OFFLINE=1 t "$V/bin/mergekit-yaml" ties.yml mk --no-copy-tokenizer)"
