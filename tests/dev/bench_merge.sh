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
if [ -z "${SKIP_MERGEKIT:-}" ]; then
rm -rf mk; echo "mergekit: $(HF_HUB_OFFLINE=1 t "$V/bin/mergekit-yaml" ties.yml mk --no-copy-tokenizer)"
fi

# Other methods on the same models, each beside cp + sync of the files it reads
# (before and after), as issue 11 measures.
m() { # name, yaml body
    printf '%s\ndtype: bfloat16\n' "$2" > "$1.yml"
}
models() { # the three fine-tunes with weights 1, 0.5, 0.3 and extra parameters $1
    printf 'models:\n'
    for i in 1 2 3; do
        w=$(echo "1.0 0.5 0.3" | cut -d' ' -f$i)
        printf '  - {model: %s/ft%s, parameters: {weight: %s%s}}\n' "$D" $i $w "$1"
    done
}
m linear "merge_method: linear
$(models '')"
m slerp "merge_method: slerp
base_model: $D/base
models: [{model: $D/base}, {model: $D/ft1}]
parameters: {t: [0, 0.5, 1]}"
m task_arithmetic "merge_method: task_arithmetic
base_model: $D/base
$(models '')"
m dare_ties "merge_method: dare_ties
base_model: $D/base
$(models ', density: 0.5')"
m della "merge_method: della
base_model: $D/base
$(models ', density: 0.5, epsilon: 0.1')"
for x in model_stock karcher; do
    m $x "merge_method: $x
base_model: $D/base
models: [{model: $D/ft1}, {model: $D/ft2}, {model: $D/ft3}]"
done
cs() { rm -rf cpy; mkdir cpy; /usr/bin/time -f '%e' sh -c "for f in $*; do cp \$f/model.safetensors cpy/\$f.st; done; sync" 2>&1 | tail -1; rm -rf cpy; }
for x in task_arithmetic ties linear slerp dare_ties model_stock karcher della; do
    case $x in linear) ins="ft1 ft2 ft3";; slerp) ins="base ft1";; *) ins="base ft1 ft2 ft3";; esac
    c1=$(cs $ins); rm -rf mp; r=$(t $B merge $x.yml -o mp --device cpu); c2=$(cs $ins)
    echo "$x: modelpress $r | cp+sync $c1 s, $c2 s"
done
