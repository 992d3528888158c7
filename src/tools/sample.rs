//! Seeded random weights: the built-in sample of `modelpress demo`, the
//! benchmarks and the tests. SplitMix64, so that a seed printed by a failing
//! test reproduces the same data on any machine.

use crate::tensor::{DType, Tensor};

/// A small, fast, seedable generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(f64::MIN_POSITIVE);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// `n` weights ~ N(0, std²), as trained layers roughly are.
pub fn normal_f32(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() as f32) * std).collect()
}

/// A weight matrix ~ N(0, 1/cols) in `dtype` (Kaiming-like scale).
pub fn weight(rng: &mut Rng, dtype: DType, shape: &[usize]) -> crate::Result<Tensor> {
    let n: usize = shape.iter().product();
    let cols = crate::tensor::matrix_view(shape).1.max(1);
    let v = normal_f32(rng, n, 1.0 / (cols as f32).sqrt());
    Tensor::from_f32(dtype, shape, &v)
}

/// The shape of a LLaMA-style sample model.
#[derive(Clone, Copy, Debug)]
pub struct LlamaShape {
    /// Model width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl LlamaShape {
    /// About 4 M weights: large enough to stream, small enough for a demo.
    pub const DEMO: LlamaShape = LlamaShape {
        hidden: 256,
        intermediate: 688,
        layers: 4,
        heads: 4,
        vocab: 2048,
    };

    /// About 100 M weights.
    pub const M100: LlamaShape = LlamaShape {
        hidden: 768,
        intermediate: 2048,
        layers: 12,
        heads: 12,
        vocab: 16000,
    };

    /// About 590 M weights: 1.18 GB (1.1 GiB) in BF16, largest tensor 131 MB.
    pub const G1: LlamaShape = LlamaShape {
        hidden: 2048,
        intermediate: 5504,
        layers: 9,
        heads: 16,
        vocab: 32000,
    };

    /// A named size: demo, 100m or 1g.
    pub fn preset(name: &str) -> Option<LlamaShape> {
        match name {
            "demo" => Some(Self::DEMO),
            "100m" => Some(Self::M100),
            "1g" => Some(Self::G1),
            _ => None,
        }
    }

    /// Tensor names and shapes in the order Hugging Face writes them.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
        for l in 0..self.layers {
            let p = format!("model.layers.{l}");
            t.push((format!("{p}.input_layernorm.weight"), vec![h]));
            t.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
            t.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            t.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            t.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            for x in ["k", "o", "q", "v"] {
                t.push((format!("{p}.self_attn.{x}_proj.weight"), vec![h, h]));
            }
        }
        t.push(("model.norm.weight".to_string(), vec![h]));
        t.push(("lm_head.weight".to_string(), vec![v, h]));
        t
    }
}

/// The shape of a BERT-style sample model (encoder with a pooler).
#[derive(Clone, Copy, Debug)]
pub struct BertShape {
    /// Model width.
    pub hidden: usize,
    /// MLP width.
    pub intermediate: usize,
    /// Encoder layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

impl BertShape {
    /// A small one for tests and the demo.
    pub const DEMO: BertShape = BertShape {
        hidden: 128,
        intermediate: 512,
        layers: 2,
        heads: 2,
        vocab: 1000,
    };

    /// Tensor names and shapes as `BertModel` names them.
    pub fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, v) = (self.hidden, self.intermediate, self.vocab);
        let e = "bert.embeddings";
        let mut t = vec![
            (format!("{e}.word_embeddings.weight"), vec![v, h]),
            (format!("{e}.position_embeddings.weight"), vec![512, h]),
            (format!("{e}.token_type_embeddings.weight"), vec![2, h]),
            (format!("{e}.LayerNorm.weight"), vec![h]),
            (format!("{e}.LayerNorm.bias"), vec![h]),
        ];
        for l in 0..self.layers {
            let p = format!("bert.encoder.layer.{l}");
            for x in ["query", "key", "value"] {
                t.push((format!("{p}.attention.self.{x}.weight"), vec![h, h]));
                t.push((format!("{p}.attention.self.{x}.bias"), vec![h]));
            }
            t.push((format!("{p}.attention.output.dense.weight"), vec![h, h]));
            t.push((format!("{p}.attention.output.dense.bias"), vec![h]));
            t.push((format!("{p}.attention.output.LayerNorm.weight"), vec![h]));
            t.push((format!("{p}.attention.output.LayerNorm.bias"), vec![h]));
            t.push((format!("{p}.intermediate.dense.weight"), vec![i, h]));
            t.push((format!("{p}.intermediate.dense.bias"), vec![i]));
            t.push((format!("{p}.output.dense.weight"), vec![h, i]));
            t.push((format!("{p}.output.dense.bias"), vec![h]));
            t.push((format!("{p}.output.LayerNorm.weight"), vec![h]));
            t.push((format!("{p}.output.LayerNorm.bias"), vec![h]));
        }
        t.push(("bert.pooler.dense.weight".into(), vec![h, h]));
        t.push(("bert.pooler.dense.bias".into(), vec![h]));
        t
    }
}

/// Writes a seeded BERT-shaped model directory (config.json and
/// `shards` safetensors files, with an index when more than one).
pub fn write_bert_model(
    dir: &std::path::Path,
    shape: BertShape,
    dtype: DType,
    shards: usize,
    seed: u64,
) -> crate::Result<()> {
    let config = serde_json::json!({
        "architectures": ["BertModel"],
        "model_type": "bert",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,
        "torch_dtype": dtype.torch_name()
    });
    write_sample(dir, &shape.tensors(), config, dtype, shards, seed)
}

/// Writes a seeded LLaMA-shaped model directory: config.json,
/// generation_config.json, tokenizer_config.json and `shards` safetensors
/// files (with model.safetensors.index.json when more than one).
pub fn write_llama_model(
    dir: &std::path::Path,
    shape: LlamaShape,
    dtype: DType,
    shards: usize,
    seed: u64,
) -> crate::Result<()> {
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": false,
        "torch_dtype": dtype.torch_name(),
        "bos_token_id": 1,
        "eos_token_id": 2
    });
    write_sample(dir, &shape.tensors(), config, dtype, shards, seed)
}

/// Writes config.json, generation_config.json, tokenizer_config.json and
/// the tensors (norm weights around 1, other 1-D tensors small, matrices
/// N(0, 1/columns)) in `shards` files.
fn write_sample(
    dir: &std::path::Path,
    tensors: &[(String, Vec<usize>)],
    config: serde_json::Value,
    dtype: DType,
    shards: usize,
    seed: u64,
) -> crate::Result<()> {
    use crate::formats::safetensors::{OutEntry, SafetensorsWriter};
    let io = |p: &std::path::Path| {
        let p = p.to_path_buf();
        move |e| crate::Error::Io { path: p, source: e }
    };
    // Written whole into a staging directory, then moved into place: an
    // interrupted run leaves nothing, and an existing directory is never
    // replaced.
    let parent = crate::formats::output::parent_dir(dir);
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let staged = crate::formats::output::Staged::dir(dir)?;
    let out = staged.path().to_path_buf();
    let json = |v: &serde_json::Value| {
        serde_json::to_string_pretty(v).map_err(|e| crate::Error::input(e.to_string()))
    };
    let files = [
        ("config.json", config),
        (
            "generation_config.json",
            serde_json::json!({"bos_token_id": 1, "eos_token_id": 2}),
        ),
        (
            "tokenizer_config.json",
            serde_json::json!({"model_max_length": 512}),
        ),
    ];
    for (name, v) in files {
        let p = out.join(name);
        std::fs::write(&p, json(&v)?).map_err(io(&p))?;
    }
    let mut rng = Rng::new(seed);
    let per_shard = tensors.len().div_ceil(shards.max(1));
    let names: Vec<String> = (0..shards.max(1))
        .map(|k| {
            if shards <= 1 {
                "model.safetensors".to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, shards)
            }
        })
        .collect();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    let mut meta = serde_json::Map::new();
    meta.insert("format".into(), "pt".into());
    for (k, group) in tensors.chunks(per_shard).enumerate() {
        let entries: Vec<OutEntry> = group
            .iter()
            .map(|(n, s)| OutEntry {
                name: n.clone(),
                dtype: dtype.name().into(),
                shape: s.clone(),
            })
            .collect();
        let mut w = SafetensorsWriter::create(&out.join(&names[k]), entries, Some(&meta))?;
        for (n, s) in group {
            let t = if s.len() == 1 {
                // Norm weights: around 1.
                let v: Vec<f32> = (0..s[0])
                    .map(|_| 1.0 + 0.05 * rng.normal() as f32)
                    .collect();
                Tensor::from_f32(dtype, s, &v)?
            } else {
                weight(&mut rng, dtype, s)?
            };
            total += t.data.len();
            w.write(n, &t.data)?;
            weight_map.insert(n.clone(), names[k].clone().into());
        }
        w.finish()?;
    }
    if shards > 1 {
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let p = out.join(crate::formats::model::INDEX_NAME);
        std::fs::write(&p, json(&index)?).map_err(io(&p))?;
    }
    staged.commit(false)
}
