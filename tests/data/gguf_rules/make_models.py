"""Synthetic F32 GGUF models for llama-quantize's per-tensor type rules.

Writes three small models whose metadata and tensor names drive every
branch modelpress ports (70B attn_v bump, grouped-query attention, 8-expert
MoE, falcon), with tiny tensors: only names, shapes and metadata matter.
Usage: make_models.py OUTDIR. See README.md for how the fixture is made.
"""
import sys, os
import numpy as np
import gguf

OUT = sys.argv[1]
rng = np.random.default_rng(0)


def w(*shape):
    return (rng.standard_normal(shape) * 0.02).astype(np.float32)


def model(name, arch, n_layer, meta, layer_tensors, top):
    path = os.path.join(OUT, f"{name}.gguf")
    g = gguf.GGUFWriter(path, arch)
    g.add_uint32(f"{arch}.block_count", n_layer)
    g.add_uint32(f"{arch}.context_length", 4096)
    g.add_uint32(f"{arch}.embedding_length", 256)
    g.add_uint32(f"{arch}.feed_forward_length", 512)
    for k, v in meta.items():
        g.add_uint32(f"{arch}.{k}", v)
    g.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    g.add_float32(f"{arch}.attention.layer_norm_epsilon", 1e-5)
    for n, t in top:
        g.add_tensor(n, t)
    for i in range(n_layer):
        for n, t in layer_tensors():
            g.add_tensor(f"blk.{i}.{n}", t)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()


def llama_layer():
    return [("attn_norm.weight", w(256)), ("attn_q.weight", w(4, 256)), ("attn_k.weight", w(4, 256)),
            ("attn_v.weight", w(4, 256)), ("attn_output.weight", w(4, 256)), ("ffn_norm.weight", w(256)),
            ("ffn_gate.weight", w(4, 256)), ("ffn_up.weight", w(4, 256)), ("ffn_down.weight", w(4, 512))]


def moe_layer():
    return [("attn_norm.weight", w(256)), ("attn_q.weight", w(4, 256)), ("attn_k.weight", w(4, 256)),
            ("attn_v.weight", w(4, 256)), ("attn_output.weight", w(4, 256)), ("ffn_norm.weight", w(256)),
            ("ffn_gate_inp.weight", w(8, 256)), ("ffn_gate_exps.weight", w(8, 2, 256)),
            ("ffn_up_exps.weight", w(8, 2, 256)), ("ffn_down_exps.weight", w(8, 2, 512))]


def falcon_layer():
    return [("attn_norm.weight", w(256)), ("attn_norm.bias", w(256)), ("attn_qkv.weight", w(4, 256)),
            ("attn_output.weight", w(4, 256)), ("ffn_up.weight", w(4, 256)), ("ffn_down.weight", w(4, 512))]


top = [("token_embd.weight", w(8, 256)), ("output_norm.weight", w(256)), ("output.weight", w(8, 256))]
# 80 layers, 64 query heads over 8 KV heads: llama.cpp's LLM_TYPE_70B.
model("llama70b", "llama", 80, {"attention.head_count": 64, "attention.head_count_kv": 8}, llama_layer, top)
# 8 experts (Mixtral-like), grouped-query attention of 4.
model("moe8", "llama", 32, {"attention.head_count": 32, "attention.head_count_kv": 8, "expert_count": 8,
                            "expert_used_count": 2}, moe_layer, top)
# Falcon, with tied embeddings (no output.weight).
model("falcon", "falcon", 16, {"attention.head_count": 32, "attention.head_count_kv": 1}, falcon_layer,
      [("token_embd.weight", w(8, 256)), ("output_norm.weight", w(256))])
