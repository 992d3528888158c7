//! `moe CONFIG.yml`: a Mixtral-style mixture of experts from dense LLaMA /
//! Mistral models, in mergekit-moe's configuration form: attention,
//! embeddings and norms from `base_model`; expert e's MLP (gate, up, down
//! projections) becomes `block_sparse_moe.experts.e.{w1, w3, w2}`; each
//! layer gets a router `block_sparse_moe.gate.weight` (experts × hidden).
//! `gate_mode: random` draws the router from a seeded normal distribution
//! (rows scaled to unit length); `cheap_embed` makes each expert's router
//! row the normalized sum of the base's input embeddings of its
//! `positive_prompts` (less that of its `negative_prompts`), tokenized with
//! the base's `tokenizer.json` after its BOS token as mergekit-moe does;
//! `hidden` (needs a forward pass) is refused. config.json becomes
//! `MixtralForCausalLM` with the base's hyperparameters.

use super::op::{Applied, Src, TensorOp};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, OutEntry};
use crate::tensor::{DType, Tensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

/// How the routers are initialized (`gate_mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateMode {
    /// Seeded normal rows of unit length.
    Random,
    /// Normalized sums of the prompts' input embeddings.
    CheapEmbed,
}

/// One expert of the configuration.
#[derive(Clone, Debug)]
pub struct Expert {
    /// `source_model`: its MLPs become the expert.
    pub path: PathBuf,
    /// `positive_prompts`.
    pub positive: Vec<String>,
    /// `negative_prompts`.
    pub negative: Vec<String>,
}

/// A mergekit-moe configuration.
#[derive(Clone, Debug)]
pub struct MoeConfig {
    /// Attention, embeddings and norms come from here.
    pub base_model: PathBuf,
    /// The experts, in order.
    pub experts: Vec<Expert>,
    /// `gate_mode`.
    pub gate_mode: GateMode,
    /// Experts per token.
    pub experts_per_token: usize,
    /// Router seed (`--seed`).
    pub seed: u64,
}

fn bad(what: impl std::fmt::Display) -> Error {
    Error::input(format!("moe configuration: {what}"))
}

impl MoeConfig {
    /// Reads `file` (paths relative to it resolve against its directory).
    pub fn load(file: &Path, seed: u64) -> Result<MoeConfig> {
        let bytes = crate::formats::read_input(file)?;
        let text = String::from_utf8(bytes).map_err(|_| bad("not UTF-8 text"))?;
        let docs = YamlLoader::load_from_str(&text).map_err(|e| bad(e.to_string()))?;
        let Some(Yaml::Hash(h)) = docs.first() else {
            return Err(bad("expected a mapping"));
        };
        let dir = file.parent().unwrap_or(Path::new("."));
        let path = |s: &str| {
            let p = Path::new(s);
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                dir.join(p)
            }
        };
        let mut base = None;
        let mut experts = Vec::new();
        let mut k = 2usize;
        let mut gate_mode = GateMode::Random;
        for (key, v) in h {
            let key = key.as_str().unwrap_or("");
            match key {
                "base_model" => base = Some(path(v.as_str().ok_or_else(|| bad("base_model: expected a path"))?)),
                "gate_mode" => match v.as_str() {
                    Some("random") => gate_mode = GateMode::Random,
                    Some("cheap_embed") => gate_mode = GateMode::CheapEmbed,
                    Some("hidden") => {
                        return Err(bad(
                            "gate_mode hidden needs a forward pass of the base model: use cheap_embed or random",
                        ))
                    }
                    _ => return Err(bad("gate_mode: expected random, cheap_embed or hidden")),
                },
                "experts_per_token" => {
                    k = v
                        .as_i64()
                        .filter(|&k| k > 0)
                        .ok_or_else(|| bad("experts_per_token: expected a positive integer"))?
                        as usize
                }
                "dtype" | "architecture" | "tokenizer_source" => {}
                "experts" => {
                    let Yaml::Array(a) = v else {
                        return Err(bad("experts: expected a list"));
                    };
                    for (i, e) in a.iter().enumerate() {
                        let Yaml::Hash(eh) = e else {
                            return Err(bad(format!("experts[{i}]: expected a mapping")));
                        };
                        let mut src = None;
                        let (mut positive, mut negative) = (Vec::new(), Vec::new());
                        for (ek, ev) in eh {
                            let ek = ek.as_str().unwrap_or("");
                            match ek {
                                "source_model" => src = ev.as_str().map(path),
                                "positive_prompts" => positive = prompts(ev, &format!("experts[{i}].{ek}"))?,
                                "negative_prompts" => negative = prompts(ev, &format!("experts[{i}].{ek}"))?,
                                "noise_scale" | "residual_scale" => {}
                                other => return Err(bad(format!("experts[{i}].{other}: unknown key"))),
                            }
                        }
                        let path = src.ok_or_else(|| bad(format!("experts[{i}]: no source_model")))?;
                        experts.push(Expert { path, positive, negative });
                    }
                }
                "shared_experts" => return Err(bad("shared_experts (Qwen2-MoE) are not supported yet")),
                other => return Err(bad(format!("{other}: unknown key"))),
            }
        }
        let base_model = base.ok_or_else(|| bad("no base_model"))?;
        if experts.len() < 2 {
            return Err(bad("at least two experts"));
        }
        if k > experts.len() {
            return Err(bad(format!(
                "experts_per_token {k} exceeds the {} experts",
                experts.len()
            )));
        }
        if gate_mode == GateMode::CheapEmbed {
            if let Some(i) = experts.iter().position(|e| e.positive.is_empty()) {
                return Err(bad(format!(
                    "experts[{i}]: gate_mode cheap_embed needs positive_prompts"
                )));
            }
        }
        Ok(MoeConfig {
            base_model,
            experts,
            gate_mode,
            experts_per_token: k,
            seed,
        })
    }
}

/// A list of prompts (a single string counts as one).
fn prompts(y: &Yaml, key: &str) -> Result<Vec<String>> {
    match y {
        Yaml::String(s) => Ok(vec![s.clone()]),
        Yaml::Array(a) => a
            .iter()
            .map(|p| {
                p.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad(format!("{key}: expected a list of strings")))
            })
            .collect(),
        _ => Err(bad(format!("{key}: expected a list of strings"))),
    }
}

/// The MLP projections and their Mixtral names.
const PROJ: [(&str, &str); 3] = [("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")];

/// The `moe` job over models [base, expert₀, expert₁, …].
pub struct BuildMoe {
    cfg: MoeConfig,
    hidden: usize,
    /// cheap_embed's router rows (experts × hidden), the same in every layer.
    embedded: Option<Vec<f32>>,
}

impl BuildMoe {
    /// Checks the base is LLaMA/Mistral-shaped and every expert has its MLP
    /// tensors with the base's shapes.
    pub fn new(cfg: MoeConfig, models: &[Model]) -> Result<BuildMoe> {
        let base = &models[0];
        let config = base_config(base)?;
        let mt = config
            .get("model_type")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !matches!(mt, "llama" | "mistral") {
            return Err(bad(format!(
                "the base is model_type '{mt}': Mixtral experts are built from llama or mistral models"
            )));
        }
        let hidden = config
            .get("hidden_size")
            .and_then(Value::as_u64)
            .ok_or_else(|| bad("the base's config.json has no hidden_size"))?
            as usize;
        let mut any = false;
        for (_, e) in base.entries() {
            if let Some((_, p)) = split(&e.name) {
                any = true;
                for (i, m) in models[1..].iter().enumerate() {
                    match m.find(&e.name) {
                        Some((_, me)) if me.shape == e.shape && me.dtype == e.dtype => {}
                        _ => {
                            return Err(bad(format!(
                            "expert {i} ({}): '{}' ({p}) is missing or differs in shape or dtype",
                            m.path.display(),
                            e.name
                        )))
                        }
                    }
                }
            }
        }
        if !any {
            return Err(bad(
                "the base has no model.layers.N.mlp.{gate,up,down}_proj.weight",
            ));
        }
        let embedded = match cfg.gate_mode {
            GateMode::Random => None,
            GateMode::CheapEmbed => Some(cheap_embed(base, &cfg.experts, hidden)?),
        };
        Ok(BuildMoe {
            cfg,
            hidden,
            embedded,
        })
    }
}

/// cheap_embed's router rows: per expert, the sum of the base's input
/// embeddings of every token of its positive prompts (each tokenized as the
/// BOS token's text + the prompt, with no other special tokens), scaled to
/// unit length (norm clamped at 1e-8); less the same of its negative
/// prompts, and scaled again. Sums in f64.
fn cheap_embed(base: &Model, experts: &[Expert], hidden: usize) -> Result<Vec<f32>> {
    let tk_path = base.path.join("tokenizer.json");
    if !tk_path.is_file() {
        return Err(bad(format!(
            "gate_mode cheap_embed needs the base's tokenizer.json ({} has none)",
            base.path.display()
        )));
    }
    let bytes = crate::formats::read_input(&tk_path)?;
    let tokenizer = tokenizers::Tokenizer::from_bytes(&bytes)
        .map_err(|e| bad(format!("{}: {e}", tk_path.display())))?;
    let bos = bos_token(base)?;
    let name = "model.embed_tokens.weight";
    let (f, e) = base
        .find(name)
        .ok_or_else(|| bad(format!("the base has no {name}")))?;
    let embed = f
        .tensor(e)
        .ok_or_else(|| bad(format!("{name} is not a float tensor")))?;
    let vocab = e.shape.first().copied().unwrap_or(0);
    if e.shape.len() != 2 || e.shape[1] != hidden {
        return Err(bad(format!(
            "{name} has shape {:?}; expected [vocab, {hidden}]",
            e.shape
        )));
    }
    let unit = |v: &mut [f64]| {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-8);
        v.iter_mut().for_each(|x| *x /= n);
    };
    let embedded = |prompts: &[String], which: &str| -> Result<Vec<f64>> {
        let mut sum = vec![0f64; hidden];
        for p in prompts {
            let enc = tokenizer
                .encode(format!("{bos}{p}"), false)
                .map_err(|e| bad(format!("{which}: cannot tokenize {p:?}: {e}")))?;
            for &id in enc.get_ids() {
                let id = id as usize;
                if id >= vocab {
                    return Err(bad(format!(
                        "{which}: token {id} of {p:?} is past the embeddings' {vocab} rows"
                    )));
                }
                let row = crate::ops::values(&embed, id * hidden..(id + 1) * hidden);
                sum.iter_mut().zip(&row).for_each(|(s, &x)| *s += x as f64);
            }
        }
        unit(&mut sum);
        Ok(sum)
    };
    let mut out = Vec::with_capacity(experts.len() * hidden);
    for (i, x) in experts.iter().enumerate() {
        let mut v = embedded(&x.positive, &format!("experts[{i}].positive_prompts"))?;
        if !x.negative.is_empty() {
            let n = embedded(&x.negative, &format!("experts[{i}].negative_prompts"))?;
            v.iter_mut().zip(&n).for_each(|(a, b)| *a -= b);
            unit(&mut v);
        }
        out.extend(v.iter().map(|&x| x as f32));
    }
    Ok(out)
}

/// The BOS token's text as the base's tokenizer_config.json (or
/// special_tokens_map.json) names it; empty when there is none.
fn bos_token(base: &Model) -> Result<String> {
    for file in ["tokenizer_config.json", "special_tokens_map.json"] {
        let p = base.path.join(file);
        if !p.is_file() {
            continue;
        }
        let v: Value = serde_json::from_slice(&crate::formats::read_input(&p)?)
            .map_err(|e| bad(format!("{}: {e}", p.display())))?;
        match v.get("bos_token") {
            Some(Value::String(s)) => return Ok(s.clone()),
            Some(Value::Object(o)) => {
                if let Some(Value::String(s)) = o.get("content") {
                    return Ok(s.clone());
                }
            }
            _ => {}
        }
    }
    Ok(String::new())
}

fn base_config(base: &Model) -> Result<serde_json::Map<String, Value>> {
    let bytes = crate::formats::read_input(&base.path.join("config.json")).map_err(|_| {
        bad(format!(
            "{}: no config.json (a model directory?)",
            base.path.display()
        ))
    })?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(bad("the base's config.json is not a JSON object")),
    }
}

/// (layer prefix `model.layers.N`, projection) of an MLP weight.
fn split(name: &str) -> Option<(&str, &str)> {
    let rest = name.strip_suffix(".weight")?;
    let (prefix, proj) = rest.rsplit_once(".mlp.")?;
    PROJ.iter()
        .any(|(p, _)| *p == proj)
        .then_some((prefix, proj))
}

impl TensorOp for BuildMoe {
    fn describe(&self) -> String {
        format!(
            "mixture of {} experts, {} per token",
            self.cfg.experts.len(),
            self.cfg.experts_per_token
        )
    }

    fn default_select(&self, e: &Entry) -> bool {
        split(&e.name).is_some()
    }

    fn outputs(&self, e: &Entry) -> Result<Vec<OutEntry>> {
        let Some((prefix, proj)) = split(&e.name) else {
            return Ok(vec![]);
        };
        let w = PROJ.iter().find(|(p, _)| *p == proj).map_or("", |(_, w)| w);
        let mut v: Vec<OutEntry> = (0..self.cfg.experts.len())
            .map(|x| OutEntry {
                name: format!("{prefix}.block_sparse_moe.experts.{x}.{w}.weight"),
                dtype: e.dtype.clone(),
                shape: e.shape.clone(),
            })
            .collect();
        if proj == "gate_proj" {
            v.push(OutEntry {
                name: format!("{prefix}.block_sparse_moe.gate.weight"),
                dtype: e.dtype.clone(),
                shape: vec![self.cfg.experts.len(), self.hidden],
            });
        }
        Ok(v)
    }

    fn rewrite_file(&self, name: &str, bytes: &[u8]) -> Result<Option<Vec<u8>>> {
        if name != "config.json" {
            return Ok(None);
        }
        let Ok(Value::Object(mut c)) = serde_json::from_slice::<Value>(bytes) else {
            return Err(bad("config.json is not a JSON object"));
        };
        c.insert("architectures".into(), json!(["MixtralForCausalLM"]));
        c.insert("model_type".into(), json!("mixtral"));
        c.insert("num_local_experts".into(), json!(self.cfg.experts.len()));
        c.insert(
            "num_experts_per_tok".into(),
            json!(self.cfg.experts_per_token),
        );
        c.entry("router_aux_loss_coef").or_insert(json!(0.02));
        c.entry("output_router_logits").or_insert(json!(false));
        c.entry("sliding_window").or_insert(Value::Null);
        let mut out =
            serde_json::to_vec_pretty(&Value::Object(c)).map_err(|e| bad(e.to_string()))?;
        out.push(b'\n');
        Ok(Some(out))
    }

    fn apply(&self, _: &Device, srcs: &[Src], models: &[Model]) -> Result<Applied> {
        let e = srcs[0].entry;
        let mut outputs = Vec::new();
        for m in &models[1..] {
            let (f, me) = m
                .find(&e.name)
                .ok_or_else(|| bad(format!("'{}' vanished from an expert", e.name)))?;
            outputs.push(f.data(me).to_vec());
        }
        if split(&e.name).is_some_and(|(_, p)| p == "gate_proj") {
            outputs.push(self.router(&e.name, srcs[0].tensor()?.dtype)?);
        }
        Ok(Applied {
            outputs,
            approx: None,
            diff: None,
            note: Some(format!("{} experts", self.cfg.experts.len())),
        })
    }
}

impl BuildMoe {
    /// A router for the layer of `name`: cheap_embed's rows, or normal rows
    /// of unit length drawn from the seed and the layer's name (the same on
    /// every run).
    fn router(&self, name: &str, dtype: DType) -> Result<Vec<u8>> {
        let n = self.cfg.experts.len();
        if let Some(v) = &self.embedded {
            return Ok(Tensor::from_f32(dtype, &[n, self.hidden], v)?.data);
        }
        let h = name
            .bytes()
            .fold(self.cfg.seed ^ 0x9e37_79b9_7f4a_7c15, |a, b| {
                (a ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let mut rng = crate::tools::sample::Rng::new(h);
        let mut v = vec![0f32; n * self.hidden];
        for row in v.chunks_mut(self.hidden.max(1)) {
            for x in row.iter_mut() {
                *x = rng.normal() as f32;
            }
            let norm = row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt() as f32;
            row.iter_mut().for_each(|x| *x /= norm);
        }
        Ok(Tensor::from_f32(dtype, &[n, self.hidden], &v)?.data)
    }
}
