//! Which GGML type each tensor gets: llama-quantize's rules
//! (llama.cpp src/llama-quant.cpp: tensor_allows_quantization,
//! llama_tensor_get_type_impl, tensor_type_fallback), for the file types
//! modelpress writes. Kept in one place so the per-tensor choice matches
//! llama-quantize's and can be compared line by line with it.

use crate::error::{Error, Result};
use crate::formats::gguf::{GgmlType, Value};
use crate::ops::ggml::BlockType;
use regex::Regex;

macro_rules! ftypes {
    ($($name:ident = $id:literal, $default:ident $(| $alias:literal)*, $doc:literal;)*) => {
        /// A llama-quantize file type (LLAMA_FTYPE_*) that modelpress writes.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub enum Ftype {
            $(#[doc = $doc] $name,)*
        }

        impl Ftype {
            /// Parses a `--type` name as llama-quantize does (Q3_K, Q4_K and
            /// Q5_K are its aliases of Q3_K_M, Q4_K_M and Q5_K_M). Q2_K_S is
            /// not here: llama-quantize refuses it without an importance
            /// matrix.
            pub fn parse(name: &str) -> Option<Ftype> {
                match name.to_ascii_uppercase().as_str() {
                    $(stringify!($name) $(| $alias)* => Some(Ftype::$name),)*
                    _ => None,
                }
            }

            /// The LLAMA_FTYPE value written as `general.file_type`.
            pub fn file_type(self) -> u32 {
                match self { $(Ftype::$name => $id,)* }
            }

            /// The type most tensors get.
            pub fn default_type(self) -> BlockType {
                match self { $(Ftype::$name => BlockType::$default,)* }
            }
        }
    };
}

// name = LLAMA_FTYPE id, the type most tensors get | aliases, what it is.
ftypes! {
    Q4_0 = 2, Q4_0, "Q4_0 everywhere (LLAMA_FTYPE_MOSTLY_Q4_0).";
    Q4_1 = 3, Q4_1, "Q4_1 everywhere.";
    Q8_0 = 7, Q8_0, "Q8_0 everywhere.";
    Q5_0 = 8, Q5_0, "Q5_0 everywhere.";
    Q5_1 = 9, Q5_1, "Q5_1 everywhere.";
    Q2_K = 10, Q2_K, "Q2_K with llama-quantize's mix.";
    Q3_K_S = 11, Q3_K, "Q3_K, small mix.";
    Q3_K_M = 12, Q3_K | "Q3_K", "Q3_K, medium mix (also `Q3_K`).";
    Q3_K_L = 13, Q3_K, "Q3_K, large mix.";
    Q4_K_S = 14, Q4_K, "Q4_K, small mix.";
    Q4_K_M = 15, Q4_K | "Q4_K", "Q4_K, medium mix (also `Q4_K`).";
    Q5_K_S = 16, Q5_K, "Q5_K, small mix.";
    Q5_K_M = 17, Q5_K | "Q5_K", "Q5_K, medium mix (also `Q5_K`).";
    Q6_K = 18, Q6_K, "Q6_K everywhere.";
}

/// llama-quantize's tensor_allows_quantization (its architecture-specific
/// names included, except GLM5-next's).
pub fn allows_quantization(name: &str, n_dims: usize) -> bool {
    if n_dims < 2 || !name.ends_with("weight") {
        return false;
    }
    const NEVER: &[&str] = &[
        "_norm.weight",
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
        "attn_rel_b.weight",
        ".position_embd",
        "sam.pos_embd",
        "sam.neck.",
        "sam.net_",
        ".rel_pos",
        ".patch_embd",
        ".patch_merger",
        "a.rvq.codebook",
        "mm.a.code_embd",
    ];
    // LLM_TN's POS_EMBD and TOKEN_TYPES names, the same for every arch.
    name != "position_embd.weight"
        && name != "token_types.weight"
        && !NEVER.iter().any(|p| name.contains(p))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Category {
    Output,
    TokenEmbd,
    AttnQkv,
    AttnKvB,
    AttnV,
    AttnK,
    AttnOutput,
    FfnDown,
    Other,
}

fn category(name: &str) -> Category {
    if name == "output.weight" {
        Category::Output
    } else if name == "token_embd.weight" || name == "per_layer_token_embd.weight" {
        Category::TokenEmbd
    } else if name.contains("attn_qkv.weight") {
        Category::AttnQkv
    } else if name.contains("attn_kv_b.weight") {
        Category::AttnKvB
    } else if name.contains("attn_v.weight") {
        Category::AttnV
    } else if name.contains("attn_k.weight") {
        Category::AttnK
    } else if name.contains("attn_q.weight") {
        Category::Other
    } else if name.contains("attn_output.weight") {
        Category::AttnOutput
    } else if name.contains("ffn_up") || name.contains("ffn_gate") {
        Category::Other
    } else if name.contains("ffn_down") {
        Category::FfnDown
    } else {
        Category::Other
    }
}

fn is_attn_v(c: Category) -> bool {
    matches!(c, Category::AttnV | Category::AttnQkv | Category::AttnKvB)
}

fn use_more_bits(i: i64, n: i64) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

/// A GGML type modelpress writes: F32, F16, BF16 or a block type.
pub fn writable_type(name: &str) -> Result<GgmlType> {
    GgmlType::from_name(name)
        .filter(|t| {
            BlockType::from_ggml(*t).is_some() || matches!(t.name(), "F32" | "F16" | "BF16")
        })
        .ok_or_else(|| {
            Error::input(format!(
                "type {name}: modelpress writes F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, \
                 Q2_K, Q3_K, Q4_K, Q5_K and Q6_K"
            ))
        })
}

/// llama-quantize's per-tensor overrides of the file type's choices.
#[derive(Default)]
pub struct Overrides {
    /// --output-tensor-type: output.weight (and tied token embeddings).
    pub output: Option<GgmlType>,
    /// --token-embedding-type.
    pub token_embd: Option<GgmlType>,
    /// --tensor-type PATTERN=TYPE, in order: the first pattern found in a
    /// tensor's name gives its type (then the row-length fallback).
    pub patterns: Vec<(Regex, GgmlType)>,
    /// --leave-output-tensor: output.weight keeps its type.
    pub leave_output: bool,
}

impl Overrides {
    /// Adds one `--tensor-type PATTERN=TYPE`. As in llama-quantize the
    /// pattern is lowercased and searched for anywhere in the name (Rust
    /// `regex` syntax, which agrees with std::regex's ECMAScript on the
    /// usual patterns; it has no look-around or back-references).
    pub fn add_tensor_type(&mut self, opt: &str) -> Result<()> {
        let bad = |why: &str| Error::input(format!("--tensor-type {opt}: {why}"));
        let (pattern, ty) = opt
            .split_once('=')
            .ok_or_else(|| bad("expected PATTERN=TYPE"))?;
        if pattern.is_empty() {
            return Err(bad("missing tensor name"));
        }
        if ty.is_empty() {
            return Err(bad("missing quantization type"));
        }
        let re = crate::jobs::op::regex("--tensor-type", &pattern.to_lowercase())?;
        self.patterns.push((re, writable_type(ty)?));
        Ok(())
    }

    fn manual(&self, name: &str) -> Option<GgmlType> {
        self.patterns
            .iter()
            .find(|(re, _)| re.is_match(name))
            .map(|(_, t)| *t)
    }
}

/// The per-model state llama-quantize keeps while choosing types.
pub struct Plan {
    /// The file type being written.
    pub ftype: Ftype,
    pure: bool,
    overrides: Overrides,
    falcon: bool,
    n_layer: i64,
    n_expert: i64,
    /// Query heads per key/value head (llama.cpp's n_gqa of layer 0).
    n_gqa: i64,
    /// llama.cpp's LLM_TYPE_70B, which gives attn_v more bits.
    is_70b: bool,
    n_attention_wv: i64,
    tied_embeddings: bool,
    i_attention_wv: i64,
    i_ffn_down: i64,
}

/// An integer metadata value; for a per-layer array, layer 0's.
fn metadata_int(meta: &[(String, Value)], key: &str) -> Option<i64> {
    meta.iter()
        .find(|(k, _)| k == key)
        .and_then(|(_, v)| int_value(v))
}

fn int_value(v: &Value) -> Option<i64> {
    match v {
        Value::U32(x) => Some(*x as i64),
        Value::I32(x) => Some(*x as i64),
        Value::U64(x) => Some(*x as i64),
        Value::I64(x) => Some(*x),
        Value::U16(x) => Some(*x as i64),
        Value::U8(x) => Some(*x as i64),
        Value::Array(_, items) => items.first().and_then(int_value),
        _ => None,
    }
}

impl Plan {
    /// `names`: every tensor of the model, in file order. The layer count is
    /// `{arch}.block_count` when the metadata has it, else one more than the
    /// highest `blk.N.` (a safetensors input has no llama.cpp metadata).
    pub fn new(
        ftype: Ftype,
        pure: bool,
        overrides: Overrides,
        meta: &[(String, Value)],
        names: &[&str],
    ) -> Plan {
        let arch = meta
            .iter()
            .find(|(k, _)| k == "general.architecture")
            .and_then(|(_, v)| match v {
                Value::String(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        let blocks = names
            .iter()
            .filter_map(|n| {
                n.strip_prefix("blk.")?
                    .split('.')
                    .next()?
                    .parse::<i64>()
                    .ok()
            })
            .max()
            .map_or(0, |m| m + 1);
        let n_layer = metadata_int(meta, &format!("{arch}.block_count")).unwrap_or(blocks);
        let n_expert = metadata_int(meta, &format!("{arch}.expert_count")).unwrap_or(0);
        let n_head = metadata_int(meta, &format!("{arch}.attention.head_count")).unwrap_or(0);
        let n_head_kv =
            metadata_int(meta, &format!("{arch}.attention.head_count_kv")).unwrap_or(n_head);
        // The architectures whose loaders call an 80-layer (jais2: 68)
        // model LLM_TYPE_70B.
        let is_70b = match arch.as_str() {
            "llama" => n_expert != 8 && n_layer == 80 && n_head != n_head_kv,
            "qwen2" | "deci" | "olmo" => n_layer == 80,
            "jais2" => n_layer == 68,
            _ => false,
        };
        Plan {
            ftype,
            pure,
            overrides,
            falcon: arch == "falcon",
            n_layer,
            n_expert,
            n_gqa: if n_head_kv == 0 {
                0
            } else {
                n_head / n_head_kv
            },
            is_70b,
            n_attention_wv: names.iter().filter(|n| is_attn_v(category(n))).count() as i64,
            tied_embeddings: !names.contains(&"output.weight"),
            i_attention_wv: 0,
            i_ffn_down: 0,
        }
    }

    /// The type of tensor `name` (row-major `shape`) in the output, given
    /// its type in the input. Call once per tensor, in file order.
    pub fn choose(&mut self, name: &str, shape: &[usize], input: GgmlType) -> Result<GgmlType> {
        let ov = &self.overrides;
        if !allows_quantization(name, shape.len()) || (ov.leave_output && name == "output.weight") {
            return Ok(input);
        }
        let c = category(name);
        if let (Some(t), Category::TokenEmbd) = (ov.token_embd, c) {
            // A --tensor-type pattern may still name the per-layer table.
            if name != "per_layer_token_embd.weight" || ov.manual(name).is_none() {
                return Ok(t);
            }
        }
        if let (Some(t), Category::Output) = (ov.output, c) {
            return Ok(t);
        }
        let t = match ov.manual(name) {
            Some(t) => t,
            None if self.pure => self.ftype.default_type().ggml(),
            None => self.mix(name, shape, self.ftype.default_type())?,
        };
        Ok(fallback(shape.last().copied().unwrap_or(0), t))
    }

    fn mix(&mut self, name: &str, shape: &[usize], t: BlockType) -> Result<GgmlType> {
        let f = self.ftype;
        let c = category(name);
        let nx = shape.last().copied().unwrap_or(0);
        let mut t = t;
        if c == Category::Output || (self.tied_embeddings && c == Category::TokenEmbd) {
            if let Some(o) = self.overrides.output {
                return Ok(o);
            }
            if self.falcon || nx % t.block_values() != 0 {
                t = BlockType::Q8_0;
            } else if t != BlockType::Q8_0 {
                t = BlockType::Q6_K;
            }
        } else if c == Category::TokenEmbd {
            // Kept at the default type for these file types.
        } else if is_attn_v(c) {
            let (i, n) = (self.i_attention_wv, self.n_attention_wv);
            match f {
                Ftype::Q2_K if self.n_gqa >= 4 => t = BlockType::Q4_K,
                Ftype::Q2_K => t = BlockType::Q3_K,
                Ftype::Q3_K_M if i < 2 => t = BlockType::Q5_K,
                Ftype::Q3_K_M => t = BlockType::Q4_K,
                Ftype::Q3_K_L => t = BlockType::Q5_K,
                Ftype::Q4_K_M | Ftype::Q5_K_M if use_more_bits(i, n) => t = BlockType::Q6_K,
                Ftype::Q4_K_S if i < 4 => t = BlockType::Q5_K,
                _ => {}
            }
            // 70B models share attn_v across 8 heads: it is small, so it
            // gets more bits.
            if self.is_70b && matches!(t, BlockType::Q3_K | BlockType::Q4_K) {
                t = BlockType::Q5_K;
            }
            if self.n_expert == 8 {
                t = BlockType::Q8_0;
            }
            self.i_attention_wv += 1;
        } else if c == Category::AttnK {
            if self.n_expert == 8 {
                t = BlockType::Q8_0;
            }
        } else if c == Category::FfnDown {
            let (i, n) = self.layer(name, self.i_ffn_down)?;
            match f {
                Ftype::Q2_K => t = BlockType::Q3_K,
                Ftype::Q3_K_M => {
                    t = if i < n / 16 {
                        BlockType::Q5_K
                    } else if !self.falcon || use_more_bits(i, n) {
                        BlockType::Q4_K
                    } else {
                        BlockType::Q3_K
                    }
                }
                Ftype::Q3_K_L if self.falcon => t = BlockType::Q4_K,
                Ftype::Q3_K_L => t = BlockType::Q5_K,
                Ftype::Q4_K_M if self.falcon => {
                    t = if i < n / 16 {
                        BlockType::Q6_K
                    } else if use_more_bits(i, n) {
                        BlockType::Q5_K
                    } else {
                        BlockType::Q4_K
                    }
                }
                Ftype::Q4_K_M | Ftype::Q5_K_M if use_more_bits(i, n) => t = BlockType::Q6_K,
                Ftype::Q4_K_S if !self.falcon && i < n / 8 => t = BlockType::Q5_K,
                _ => {}
            }
            self.i_ffn_down += 1;
        } else if c == Category::AttnOutput {
            use Ftype::*;
            if self.falcon {
                if f == Q3_K_L {
                    t = BlockType::Q4_K;
                }
            } else if self.n_expert == 8 {
                if matches!(f, Q2_K | Q3_K_S | Q3_K_M | Q4_K_S | Q4_K_M) {
                    t = BlockType::Q5_K;
                }
            } else {
                match f {
                    Q2_K => t = BlockType::Q3_K,
                    Q3_K_M => t = BlockType::Q4_K,
                    Q3_K_L => t = BlockType::Q5_K,
                    _ => {}
                }
            }
        }
        // llama-quantize's later attn_qkv branch (Q4_K_M → Q5_K) is
        // unreachable there: attn_qkv is attn_v-like and matched above.
        Ok(t.ggml())
    }

    /// (layer, layers) for an ffn_down tensor: its counter, or for MoE
    /// models the N of `blk.N.` as llama-quantize parses it.
    fn layer(&self, name: &str, counter: i64) -> Result<(i64, i64)> {
        if self.n_expert > 1 {
            let i = name
                .strip_prefix("blk.")
                .and_then(|r| r.split('.').next())
                .and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| Error::input(format!("tensor {name}: no layer number (blk.N.)")))?;
            if i >= self.n_layer {
                return Err(Error::input(format!(
                    "tensor {name}: layer {i} of {} layers",
                    self.n_layer
                )));
            }
            return Ok((i, self.n_layer));
        }
        Ok((counter, self.n_layer))
    }
}

/// The type llama-quantize falls back to when a row of `ncols` values is
/// not a whole number of `t` blocks (F16 when the fallback does not fit
/// either).
pub fn fallback(ncols: usize, t: GgmlType) -> GgmlType {
    if ncols.is_multiple_of(t.block() as usize) {
        return t;
    }
    let f = match BlockType::from_ggml(t) {
        Some(BlockType::Q2_K | BlockType::Q3_K) => BlockType::Q4_0.ggml(),
        Some(BlockType::Q4_K) => BlockType::Q5_0.ggml(),
        Some(BlockType::Q5_K) => BlockType::Q5_1.ggml(),
        Some(BlockType::Q6_K) => BlockType::Q8_0.ggml(),
        _ => t,
    };
    if ncols.is_multiple_of(f.block() as usize) {
        f
    } else {
        GgmlType::F16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n_layer: usize) -> Vec<String> {
        let mut v = vec!["token_embd.weight".to_string()];
        for i in 0..n_layer {
            for t in [
                "attn_norm",
                "attn_q",
                "attn_k",
                "attn_v",
                "attn_output",
                "ffn_gate",
                "ffn_up",
                "ffn_down",
                "ffn_norm",
            ] {
                v.push(format!("blk.{i}.{t}.weight"));
            }
        }
        v.push("output_norm.weight".into());
        v.push("output.weight".into());
        v
    }

    fn plan_types(f: Ftype, n_layer: usize, ncols: usize) -> Vec<(String, &'static str)> {
        let all = names(n_layer);
        let refs: Vec<&str> = all.iter().map(|s| s.as_str()).collect();
        let mut p = Plan::new(f, false, Overrides::default(), &[], &refs);
        let f32t = GgmlType::from_name("F32").unwrap();
        all.iter()
            .map(|n| {
                let shape: Vec<usize> = if n.contains("norm") {
                    vec![ncols]
                } else {
                    vec![64, ncols]
                };
                (n.clone(), p.choose(n, &shape, f32t).unwrap().name())
            })
            .collect()
    }

    fn ty(v: &[(String, &'static str)], name: &str) -> &'static str {
        v.iter().find(|(n, _)| n == name).unwrap().1
    }

    #[test]
    fn q4_k_m_mix_follows_use_more_bits() {
        let v = plan_types(Ftype::Q4_K_M, 32, 4096);
        assert_eq!(ty(&v, "output.weight"), "Q6_K");
        assert_eq!(ty(&v, "token_embd.weight"), "Q4_K");
        assert_eq!(ty(&v, "blk.0.attn_norm.weight"), "F32");
        for i in 0..32 {
            let more = use_more_bits(i, 32);
            let want = if more { "Q6_K" } else { "Q4_K" };
            assert_eq!(ty(&v, &format!("blk.{i}.attn_v.weight")), want);
            assert_eq!(ty(&v, &format!("blk.{i}.ffn_down.weight")), want);
            assert_eq!(ty(&v, &format!("blk.{i}.attn_q.weight")), "Q4_K");
        }
        // Layers 0-3, 29-31 and every third from 6: 16 of 32.
        assert_eq!((0..32).filter(|&i| use_more_bits(i, 32)).count(), 16);
    }

    /// Every tensor's type in llama-quantize's output for three synthetic
    /// models (70B attn_v bump, GQA, 8 experts, falcon) under every file
    /// type: see tests/data/gguf_rules/README.md.
    #[test]
    fn choices_match_llama_quantize_on_synthetic_models() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/gguf_rules/expected.json"
        );
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut checked = 0;
        for (model, m) in fixture.as_object().unwrap() {
            if model == "runs" {
                continue;
            }
            for (ft, want) in m["types"].as_object().unwrap() {
                checked += replay(m, ft, Overrides::default(), want, model);
            }
        }
        assert_eq!(checked, 14 * (723 + 323 + 98));
        // The same models with llama-quantize's overrides.
        for run in fixture["runs"].as_array().unwrap() {
            let args: Vec<&str> = run["args"]
                .as_array()
                .unwrap()
                .iter()
                .map(|a| a.as_str().unwrap())
                .collect();
            let mut ov = Overrides::default();
            let mut it = args.iter();
            while let Some(&flag) = it.next() {
                match flag {
                    "--leave-output-tensor" => ov.leave_output = true,
                    "--tensor-type" => ov.add_tensor_type(it.next().unwrap()).unwrap(),
                    "--output-tensor-type" => {
                        ov.output = Some(writable_type(it.next().unwrap()).unwrap())
                    }
                    "--token-embedding-type" => {
                        ov.token_embd = Some(writable_type(it.next().unwrap()).unwrap())
                    }
                    other => panic!("flag {other}"),
                }
            }
            let m = &fixture[run["model"].as_str().unwrap()];
            let ft = run["ftype"].as_str().unwrap();
            replay(m, ft, ov, &run["types"], &format!("{args:?}"));
        }
    }

    /// Runs fixture model `m` through a `Plan` of file type `ft` and checks
    /// every tensor's type against `want`; returns how many it checked.
    fn replay(
        m: &serde_json::Value,
        ft: &str,
        ov: Overrides,
        want: &serde_json::Value,
        ctx: &str,
    ) -> usize {
        let (meta, tensors) = model_of(m);
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        let mut plan = Plan::new(Ftype::parse(ft).unwrap(), false, ov, &meta, &names);
        let f32t = GgmlType::from_name("F32").unwrap();
        let want = want.as_array().unwrap();
        assert_eq!(want.len(), tensors.len(), "{ctx} {ft}");
        for ((name, shape), want) in tensors.iter().zip(want) {
            let got = plan.choose(name, shape, f32t).unwrap().name();
            assert_eq!(got, want.as_str().unwrap(), "{ctx} {ft}: {name}");
        }
        tensors.len()
    }

    type Metadata = Vec<(String, Value)>;
    type Shapes = Vec<(String, Vec<usize>)>;

    /// A fixture model's metadata and (name, shape) list.
    fn model_of(m: &serde_json::Value) -> (Metadata, Shapes) {
        let meta = m["metadata"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| {
                let v = match v.as_str() {
                    Some(s) => Value::String(s.into()),
                    None => Value::U32(v.as_u64().unwrap() as u32),
                };
                (k.clone(), v)
            })
            .collect();
        (meta, serde_json::from_value(m["tensors"].clone()).unwrap())
    }

    #[test]
    fn q2_k_and_q3_k_mixes() {
        let v = plan_types(Ftype::Q2_K, 8, 4096);
        assert_eq!(ty(&v, "blk.0.attn_q.weight"), "Q2_K");
        assert_eq!(ty(&v, "blk.0.attn_v.weight"), "Q3_K");
        assert_eq!(ty(&v, "blk.0.attn_output.weight"), "Q3_K");
        assert_eq!(ty(&v, "blk.5.ffn_down.weight"), "Q3_K");
        let v = plan_types(Ftype::Q3_K_M, 32, 4096);
        assert_eq!(ty(&v, "blk.1.attn_v.weight"), "Q5_K");
        assert_eq!(ty(&v, "blk.2.attn_v.weight"), "Q4_K");
        assert_eq!(ty(&v, "blk.1.ffn_down.weight"), "Q5_K");
        assert_eq!(ty(&v, "blk.2.ffn_down.weight"), "Q4_K");
        assert_eq!(ty(&v, "blk.2.attn_output.weight"), "Q4_K");
        assert_eq!(ty(&v, "blk.2.ffn_up.weight"), "Q3_K");
        // Q2_K and Q3_K fall back to Q4_0 on 384-wide rows.
        let v = plan_types(Ftype::Q3_K_S, 4, 384);
        assert_eq!(ty(&v, "blk.0.attn_q.weight"), "Q4_0");
    }

    #[test]
    fn q4_k_s_and_legacy_and_fallbacks() {
        let v = plan_types(Ftype::Q4_K_S, 16, 4096);
        assert_eq!(ty(&v, "blk.3.attn_v.weight"), "Q5_K");
        assert_eq!(ty(&v, "blk.4.attn_v.weight"), "Q4_K");
        assert_eq!(ty(&v, "blk.1.ffn_down.weight"), "Q5_K");
        assert_eq!(ty(&v, "blk.2.ffn_down.weight"), "Q4_K");
        let v = plan_types(Ftype::Q4_0, 4, 4096);
        assert_eq!(ty(&v, "output.weight"), "Q6_K");
        assert_eq!(ty(&v, "blk.0.ffn_down.weight"), "Q4_0");
        let v = plan_types(Ftype::Q8_0, 4, 4096);
        assert_eq!(ty(&v, "output.weight"), "Q8_0");
        // Rows of 384 values: not a multiple of 256.
        let v = plan_types(Ftype::Q4_K_M, 4, 384);
        assert_eq!(ty(&v, "blk.0.attn_q.weight"), "Q5_0");
        // Layer 3 of 4 gets more bits: Q6_K, which falls back to Q8_0.
        assert_eq!(ty(&v, "blk.3.attn_v.weight"), "Q8_0");
        assert_eq!(ty(&v, "blk.0.attn_v.weight"), "Q5_0");
        assert_eq!(ty(&v, "output.weight"), "Q8_0");
        let v = plan_types(Ftype::Q5_K_M, 4, 384);
        assert_eq!(ty(&v, "blk.1.attn_q.weight"), "Q5_1");
        // Rows of 40: not even a multiple of 32.
        let v = plan_types(Ftype::Q4_K_M, 4, 40);
        assert_eq!(ty(&v, "blk.1.attn_q.weight"), "F16");
    }
}
