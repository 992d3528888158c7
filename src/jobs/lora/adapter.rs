//! A PEFT LoRA adapter directory: `adapter_config.json` and
//! `adapter_model.safetensors`, read into what a merge needs per module
//! (../shared/reference/pruning_merging.md §4).

use crate::error::{Error, Result};
use crate::formats::safetensors::{Entry, SafetensorsFile};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The PEFT prefix of every key in adapter_model.safetensors.
const PREFIX: &str = "base_model.model.";

/// How a module's low-rank update is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layer {
    /// Linear: A [r, in], B [out, r], ΔW = B·A (transposed for
    /// `fan_in_fan_out`, GPT-2's Conv1D).
    Linear,
    /// Embedding: A [r, rows], B [dim, r], ΔW = (B·A)ᵀ.
    Embedding,
}

/// One adapted module's tensors (names in the adapter file).
#[derive(Clone, Debug)]
pub struct Module {
    /// Linear or embedding.
    pub layer: Layer,
    /// lora_A (or lora_embedding_A).
    pub a: String,
    /// lora_B (or lora_embedding_B).
    pub b: String,
    /// DoRA's magnitude vector.
    pub magnitude: Option<String>,
    /// lora_B.bias (`lora_bias`).
    pub bias: Option<String>,
    /// The base weight PEFT saves beside embedding adapters
    /// (`base_layer.weight`), loaded into the base before merging.
    pub base_layer: Option<String>,
    /// The scale s = alpha/r (alpha/√r with rsLoRA) after the patterns.
    pub scale: f64,
    /// The rank after the patterns.
    pub rank: usize,
}

/// A PEFT LoRA adapter.
pub struct Adapter {
    /// Its directory.
    pub dir: PathBuf,
    /// adapter_model.safetensors.
    pub file: SafetensorsFile,
    /// Weight-decomposed (DoRA).
    pub dora: bool,
    /// Weights stored [in, out] (Conv1D).
    pub fan_in_fan_out: bool,
    /// Adapted modules by module path (the base's names without `.weight`).
    pub modules: BTreeMap<String, Module>,
    /// `modules_to_save` and other full tensors: base tensor name → adapter
    /// tensor name.
    pub full: BTreeMap<String, String>,
}

fn bad(dir: &Path, why: impl std::fmt::Display) -> Error {
    Error::input(format!("adapter {}: {why}", dir.display()))
}

/// The first key of `pattern` (in stored order) matching module path `m`
/// as PEFT matches it: `re.match(rf"(.*\.)?({key})$", m)`.
fn pattern<'a>(dir: &Path, pattern: Option<&'a Value>, m: &str) -> Result<Option<&'a Value>> {
    let Some(Value::Object(p)) = pattern else {
        return Ok(None);
    };
    for (key, v) in p {
        let re = crate::jobs::op::regex(
            &format!("adapter {} pattern", dir.display()),
            &format!("^(.*\\.)?({key})$"),
        )?;
        if re.is_match(m) {
            return Ok(Some(v));
        }
    }
    Ok(None)
}

impl Adapter {
    /// Reads and checks adapter directory `dir`.
    pub fn open(dir: &Path) -> Result<Adapter> {
        let cfg_path = dir.join("adapter_config.json");
        let bytes = crate::formats::read_input(&cfg_path)
            .map_err(|_| bad(dir, "no adapter_config.json (a PEFT adapter directory?)"))?;
        let cfg: Map<String, Value> = match serde_json::from_slice(&bytes) {
            Ok(Value::Object(m)) => m,
            _ => return Err(bad(dir, "adapter_config.json is not a JSON object")),
        };
        match cfg.get("peft_type").and_then(Value::as_str) {
            Some("LORA") | None => {}
            Some(t) => return Err(bad(dir, format!("peft_type {t}: only LORA adapters merge"))),
        }
        let r = cfg
            .get("r")
            .and_then(Value::as_u64)
            .filter(|&r| r > 0)
            .ok_or_else(|| bad(dir, "adapter_config.json has no rank r"))? as usize;
        let alpha = cfg
            .get("lora_alpha")
            .and_then(Value::as_f64)
            .unwrap_or(r as f64);
        let flag = |k: &str| cfg.get(k).and_then(Value::as_bool).unwrap_or(false);
        let (rslora, dora, fifo) = (flag("use_rslora"), flag("use_dora"), flag("fan_in_fan_out"));
        let file_path = dir.join("adapter_model.safetensors");
        if !file_path.exists() {
            return Err(bad(
                dir,
                "no adapter_model.safetensors (adapter_model.bin is not read: convert it with PEFT)",
            ));
        }
        let file = SafetensorsFile::open(&file_path)?;
        let mut parts: BTreeMap<String, BTreeMap<&'static str, String>> = BTreeMap::new();
        let mut full = BTreeMap::new();
        for e in &file.entries {
            let Some(name) = e.name.strip_prefix(PREFIX) else {
                return Err(bad(
                    dir,
                    format!("tensor '{}' lacks PEFT's prefix '{PREFIX}'", e.name),
                ));
            };
            let part = [
                (".lora_A.weight", "a"),
                (".lora_B.weight", "b"),
                (".lora_embedding_A", "ea"),
                (".lora_embedding_B", "eb"),
                (".lora_magnitude_vector", "m"),
                (".lora_magnitude_vector.weight", "m"),
                (".lora_B.bias", "bias"),
                (".base_layer.weight", "base"),
            ]
            .iter()
            .find_map(|(suffix, k)| name.strip_suffix(suffix).map(|m| (m, *k)));
            match part {
                Some((m, k)) => {
                    parts
                        .entry(m.to_string())
                        .or_default()
                        .insert(k, e.name.clone());
                }
                None => {
                    full.insert(name.to_string(), e.name.clone());
                }
            }
        }
        let mut modules = BTreeMap::new();
        for (m, p) in parts {
            let (layer, a, b) = match (p.get("a"), p.get("b"), p.get("ea"), p.get("eb")) {
                (Some(a), Some(b), None, None) => (Layer::Linear, a, b),
                (None, None, Some(a), Some(b)) => (Layer::Embedding, a, b),
                _ => return Err(bad(dir, format!("module '{m}' lacks a lora_A/lora_B pair"))),
            };
            let rank = match pattern(dir, cfg.get("rank_pattern"), &m)? {
                Some(v) => v
                    .as_u64()
                    .ok_or_else(|| bad(dir, "rank_pattern values must be integers"))?
                    as usize,
                None => r,
            };
            let alpha = match pattern(dir, cfg.get("alpha_pattern"), &m)? {
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| bad(dir, "alpha_pattern values must be numbers"))?,
                None => alpha,
            };
            let scale = if rslora {
                alpha / (rank as f64).sqrt()
            } else {
                alpha / rank as f64
            };
            let module = Module {
                layer,
                a: a.clone(),
                b: b.clone(),
                magnitude: p.get("m").cloned(),
                bias: p.get("bias").cloned(),
                base_layer: p.get("base").cloned(),
                scale,
                rank,
            };
            check_factors(dir, &file, &m, &module)?;
            if module.magnitude.is_some() != dora && layer == Layer::Linear {
                return Err(bad(
                    dir,
                    format!(
                        "module '{m}': use_dora is {dora} but the magnitude vector is {}",
                        if dora { "missing" } else { "present" }
                    ),
                ));
            }
            modules.insert(m, module);
        }
        if modules.is_empty() && full.is_empty() {
            return Err(bad(dir, "adapter_model.safetensors holds no LoRA tensors"));
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            file,
            dora,
            fan_in_fan_out: fifo,
            modules,
            full,
        })
    }

    /// A tensor of this adapter's file by name (checked to exist).
    pub fn entry(&self, name: &str) -> Result<&Entry> {
        self.file
            .find(name)
            .ok_or_else(|| bad(&self.dir, format!("tensor '{name}' is missing")))
    }
}

/// The factors' shapes agree with each other and the rank.
fn check_factors(dir: &Path, file: &SafetensorsFile, m: &str, md: &Module) -> Result<()> {
    let shape = |n: &str| file.find(n).map(|e| e.shape.clone()).unwrap_or_default();
    let (a, b) = (shape(&md.a), shape(&md.b));
    if a.len() != 2 || b.len() != 2 || a[0] != b[1] {
        return Err(bad(
            dir,
            format!("module '{m}': lora_A {a:?} and lora_B {b:?} do not multiply"),
        ));
    }
    if a[0] != md.rank {
        return Err(bad(
            dir,
            format!(
                "module '{m}': rank {} in the factors, {} in adapter_config.json (r / rank_pattern)",
                a[0], md.rank
            ),
        ));
    }
    for n in [&md.a, &md.b] {
        if file.find(n).and_then(|e| e.kernel_dtype()).is_none() {
            return Err(bad(dir, format!("tensor '{n}' is not F32, F16 or BF16")));
        }
    }
    Ok(())
}
