//! `moe CONFIG.yml`: a Mixtral-style mixture of experts from dense LLaMA /
//! Mistral models, in mergekit-moe's configuration form: attention,
//! embeddings and norms from `base_model`; expert e's MLP (gate, up, down
//! projections) becomes `block_sparse_moe.experts.e.{w1, w3, w2}`; each
//! layer gets a router `block_sparse_moe.gate.weight` (experts × hidden).
//! `gate_mode: random` draws the router from a seeded normal distribution
//! (rows scaled to unit length, as mergekit-moe's routers are);
//! `cheap_embed` (needs a tokenizer) and `hidden` (needs a forward pass)
//! are refused. config.json becomes `MixtralForCausalLM` with the base's
//! hyperparameters.

use super::op::{Applied, Src, TensorOp};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, OutEntry};
use crate::tensor::{DType, Tensor};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

/// A mergekit-moe configuration.
#[derive(Clone, Debug)]
pub struct MoeConfig {
    /// Attention, embeddings and norms come from here.
    pub base_model: PathBuf,
    /// Each expert's model.
    pub experts: Vec<PathBuf>,
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
        for (key, v) in h {
            let key = key.as_str().unwrap_or("");
            match key {
                "base_model" => base = Some(path(v.as_str().ok_or_else(|| bad("base_model: expected a path"))?)),
                "gate_mode" => match v.as_str() {
                    Some("random") => {}
                    Some("cheap_embed") => {
                        return Err(bad(
                            "gate_mode cheap_embed needs the base's tokenizer, which this version does not run: use random",
                        ))
                    }
                    Some("hidden") => {
                        return Err(bad(
                            "gate_mode hidden needs a forward pass of the base model: use random",
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
                        for (ek, ev) in eh {
                            match ek.as_str().unwrap_or("") {
                                "source_model" => src = ev.as_str().map(path),
                                "positive_prompts" | "negative_prompts" | "noise_scale" | "residual_scale" => {}
                                other => return Err(bad(format!("experts[{i}].{other}: unknown key"))),
                            }
                        }
                        experts.push(src.ok_or_else(|| bad(format!("experts[{i}]: no source_model")))?);
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
        Ok(MoeConfig {
            base_model,
            experts,
            experts_per_token: k,
            seed,
        })
    }
}

/// The MLP projections and their Mixtral names.
const PROJ: [(&str, &str); 3] = [("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")];

/// The `moe` job over models [base, expert₀, expert₁, …].
pub struct BuildMoe {
    cfg: MoeConfig,
    hidden: usize,
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
        Ok(BuildMoe { cfg, hidden })
    }
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
    /// A router for the layer of `name`: normal rows of unit length, drawn
    /// from the seed and the layer's name (the same on every run).
    fn router(&self, name: &str, dtype: DType) -> Result<Vec<u8>> {
        let h = name
            .bytes()
            .fold(self.cfg.seed ^ 0x9e37_79b9_7f4a_7c15, |a, b| {
                (a ^ b as u64).wrapping_mul(0x100_0000_01b3)
            });
        let mut rng = crate::tools::sample::Rng::new(h);
        let n = self.cfg.experts.len();
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
