//! `modelpress merge CONFIG.yml -o OUT`: models merged tensor by tensor as
//! a mergekit configuration says (`config`), each tensor's parameters
//! resolved from its name and layer (`params`), the arithmetic in
//! `ops::merge`.
//!
//! The job's models are the base (or, without one, the first model) and
//! then every other model the configuration names; the output has the
//! base's layout, files and non-float tensors, `config.json`'s dtype set to
//! `out_dtype`, the tokenizer files of `tokenizer_source`, and the
//! configuration itself as `mergekit_config.yml`.

pub mod config;
pub mod params;

use super::op::{Applied, Src, TensorOp};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, OutEntry};
use crate::ops::merge::{self, Gta, Sparsify, Term};
use crate::tensor::{DType, TensorRef};
use config::{MergeConfig, Method, TokenizerSource};
use params::{lookup, position, Params, Resolved};
use std::path::PathBuf;

/// The file the configuration is saved as, beside the merged weights.
pub const CONFIG_NAME: &str = "mergekit_config.yml";

/// Tokenizer files taken from `tokenizer_source`.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "vocab.txt",
];

/// A merge job.
pub struct Merge {
    cfg: MergeConfig,
    /// Per weighted model: its index among the job's models.
    weighted: Vec<usize>,
    /// `models[i]` of the configuration for each weighted model, for errors.
    entry_index: Vec<usize>,
    /// Transformer layers of the base, for gradients.
    layers: usize,
    /// The random stream's seed (DARE).
    seed: u64,
    /// `--unsafe-truncate-embeddings`: vocabulary tensors whose row counts
    /// differ are cut to the fewest rows, by name.
    vocab_rows: std::collections::HashMap<String, usize>,
}

/// Tensors with one row per vocabulary entry (input and output embeddings
/// of the common architectures).
fn is_vocab_tensor(name: &str) -> bool {
    [
        "embed_tokens.weight",
        "lm_head.weight",
        "wte.weight",
        "word_embeddings.weight",
        "embed_in.weight",
        "embed_out.weight",
    ]
    .iter()
    .any(|s| name == *s || name.ends_with(&format!(".{s}")))
}

/// Everything one tensor's merge needs, resolved.
#[derive(Clone, Debug, PartialEq)]
struct TensorPlan {
    terms: Vec<Term>,
    select_topk: f64,
    filter_wise: bool,
    flatten: bool,
    normalize: bool,
    rescale: bool,
    lambda: f32,
    t: f32,
}

impl Merge {
    /// Opens the models `cfg` names; returns the job and its models (the
    /// base first). With `truncate_embeddings`, vocabulary tensors whose
    /// row counts differ between the models are cut to the fewest rows (as
    /// mergekit's `--unsafe-truncate-embeddings`); otherwise they are refused.
    pub fn open(
        cfg: MergeConfig,
        seed: u64,
        truncate_embeddings: bool,
    ) -> Result<(Merge, Vec<Model>)> {
        let mut models = Vec::new();
        let mut paths: Vec<PathBuf> = Vec::new();
        if let Some(b) = &cfg.base_model {
            models.push(Model::open(b)?);
            paths.push(b.clone());
        }
        let (mut weighted, mut entry_index) = (Vec::new(), Vec::new());
        for (i, e) in cfg.models.iter().enumerate() {
            if cfg.method.uses_base() && cfg.is_base(&e.path) {
                continue;
            }
            let k = if cfg.is_base(&e.path) {
                0
            } else {
                models.push(Model::open(&e.path)?);
                paths.push(e.path.clone());
                models.len() - 1
            };
            weighted.push(k);
            entry_index.push(i);
        }
        if let TokenizerSource::Model(p) = &cfg.tokenizer {
            if !p.is_dir() {
                return Err(Error::input(format!(
                    "tokenizer_source: {} is not a model directory",
                    p.display()
                )));
            }
        }
        let layers = models[0]
            .entries()
            .filter_map(|(_, e)| params::layer_of(&e.name))
            .max()
            .map_or(0, |m| m + 1);
        let mut vocab_rows = std::collections::HashMap::new();
        if truncate_embeddings {
            for (_, e) in models[0]
                .entries()
                .filter(|(_, e)| is_vocab_tensor(&e.name))
            {
                let rows: Vec<usize> = models
                    .iter()
                    .filter_map(|m| {
                        m.find(&e.name)
                            .and_then(|(_, e2)| e2.shape.first().copied())
                    })
                    .collect();
                let differ = rows.windows(2).any(|w| w[0] != w[1]);
                if let Some(&r) = rows.iter().min().filter(|_| differ) {
                    vocab_rows.insert(e.name.clone(), r);
                }
            }
        }
        Ok((
            Merge {
                cfg,
                weighted,
                entry_index,
                layers,
                seed,
                vocab_rows,
            },
            models,
        ))
    }

    /// The configuration.
    pub fn config(&self) -> &MergeConfig {
        &self.cfg
    }

    /// A Hugging Face model card for the output (as mergekit writes one in
    /// place of the base's): the inputs in its metadata, the method and the
    /// configuration.
    fn model_card(&self) -> String {
        let name = |p: &std::path::Path| p.display().to_string();
        let mut inputs: Vec<String> = self.cfg.base_model.iter().map(|p| name(p)).collect();
        for e in &self.cfg.models {
            let n = name(&e.path);
            if !inputs.contains(&n) {
                inputs.push(n);
            }
        }
        let yaml_list: String = inputs.iter().map(|m| format!("- {m:?}\n")).collect();
        let md_list: String = inputs.iter().map(|m| format!("* `{m}`\n")).collect();
        format!(
            "---\nbase_model:\n{yaml_list}library_name: transformers\ntags:\n- mergekit\n- merge\n- modelpress\n---\n\
             # Merged model\n\n\
             Made with modelpress (`modelpress merge`) from a mergekit configuration.\n\n\
             ## Method\n\n`{}`{}, seed {}.\n\n\
             ## Models\n\n{md_list}\n\
             ## Configuration\n\n```yaml\n{}\n```\n",
            self.cfg.method.name(),
            self.cfg
                .base_model
                .as_ref()
                .map_or(String::new(), |b| format!(" on `{}`", name(b))),
            self.seed,
            self.cfg.text.trim_end()
        )
    }

    fn model_params(&self, w: usize) -> &Params {
        &self.cfg.models[self.entry_index[w]].parameters
    }

    /// A parameter for weighted model `w` (or, with None, a merge-wide one).
    fn param(&self, w: Option<usize>, key: &str, name: &str) -> Option<Resolved> {
        let t = position(name, self.layers);
        match w {
            Some(w) => lookup(&[self.model_params(w), &self.cfg.parameters], key, name, t),
            None => lookup(&[&self.cfg.parameters], key, name, t),
        }
    }

    fn num(&self, w: Option<usize>, key: &str, name: &str, default: Option<f64>) -> Result<f64> {
        let whose = match w {
            Some(w) => format!(
                "models[{}] ({})",
                self.entry_index[w],
                self.cfg.models[self.entry_index[w]].path.display()
            ),
            None => "parameters".into(),
        };
        match self.param(w, key, name) {
            Some(Resolved::Num(v)) => Ok(v),
            Some(Resolved::Bool(_)) => Err(Error::input(format!(
                "{whose}: {key} for {name} is true/false; expected a number"
            ))),
            None => default.ok_or_else(|| {
                Error::input(format!(
                    "{whose}: no {key} for tensor {name} (set it in the model's or the top-level parameters)"
                ))
            }),
        }
    }

    fn flag(&self, key: &str, name: &str, default: bool) -> Result<bool> {
        match self.param(None, key, name) {
            Some(Resolved::Bool(b)) => Ok(b),
            Some(Resolved::Num(_)) => Err(Error::input(format!(
                "parameters.{key} for {name}: expected true or false"
            ))),
            None => Ok(default),
        }
    }

    /// Resolves and checks every parameter of tensor `name`.
    fn plan(&self, name: &str) -> Result<TensorPlan> {
        let m = self.cfg.method;
        let takes = |k: &str| m.per_model().contains(&k);
        let mut terms = Vec::new();
        for w in 0..self.weighted.len() {
            let weight = if takes("weight") {
                self.num(Some(w), "weight", name, None)?
            } else {
                self.num(Some(w), "scale", name, Some(1.0))?
            };
            let density = self.num(Some(w), "density", name, Some(1.0))?;
            let gamma = self.num(Some(w), "gamma", name, Some(0.01))?;
            let epsilon = self.num(Some(w), "epsilon", name, Some(0.15))?;
            let i = self.entry_index[w];
            let della = matches!(m, Method::Della | Method::DellaLinear);
            if della && density < 1.0 && !(density - epsilon > 0.0 && density + epsilon < 1.0) {
                return Err(Error::input(format!(
                    "models[{i}]: for {name}, density ± epsilon ({density} ± {epsilon}) must lie inside (0, 1)"
                )));
            }
            if !(density > 0.0 && density <= 1.0) {
                return Err(Error::input(format!(
                    "models[{i}]: density for {name} is {density}; it must be in (0, 1] (mergekit accepts more and trims nothing)"
                )));
            }
            if !(0.0..1.0).contains(&gamma) {
                return Err(Error::input(format!(
                    "models[{i}]: gamma for {name} is {gamma}; it must be in [0, 1)"
                )));
            }
            terms.push(Term {
                weight: weight as f32,
                density,
                gamma,
                epsilon,
            });
        }
        let normalize_default = matches!(m, Method::Linear | Method::Ties | Method::Della);
        let rescale_default = matches!(
            m,
            Method::DareLinear | Method::DareTies | Method::Della | Method::DellaLinear
        );
        let select_topk = self.num(None, "select_topk", name, Some(1.0))?;
        if !(select_topk > 0.0 && select_topk <= 1.0) {
            return Err(Error::input(format!(
                "parameters.select_topk for {name} is {select_topk}; it must be in (0, 1]"
            )));
        }
        let t = if matches!(m, Method::Slerp | Method::Nearswap) {
            self.num(None, "t", name, None)?
        } else {
            0.0
        };
        Ok(TensorPlan {
            terms,
            select_topk,
            filter_wise: self.flag("filter_wise", name, false)?,
            flatten: self.flag("nuslerp_flatten", name, true)?,
            normalize: self.flag("normalize", name, normalize_default)?,
            rescale: self.flag("rescale", name, rescale_default)?,
            lambda: self.num(None, "lambda", name, Some(1.0))? as f32,
            t: t as f32,
        })
    }

    fn out_dtype(&self, e: &Entry) -> Option<DType> {
        self.cfg
            .out_dtype
            .or(self.cfg.dtype)
            .filter(|_| e.kernel_dtype().is_some())
    }
}

impl TensorOp for Merge {
    fn describe(&self) -> String {
        format!(
            "merge ({}) of {} model(s) into {}, seed {}",
            self.cfg.method.name(),
            self.weighted.len(),
            self.cfg
                .base_model
                .as_ref()
                .map_or("the first model".into(), |b| b.display().to_string()),
            self.seed
        )
    }

    /// Every float tensor: norms and biases are merged too.
    fn default_select(&self, e: &Entry) -> bool {
        e.kernel_dtype().is_some()
    }

    fn outputs(&self, e: &Entry) -> Result<Vec<OutEntry>> {
        let mut shape = e.shape.clone();
        if let Some(&rows) = self.vocab_rows.get(&e.name) {
            shape[0] = rows;
        }
        Ok(vec![OutEntry {
            name: e.name.clone(),
            dtype: self
                .out_dtype(e)
                .map_or(e.dtype.clone(), |d| d.name().to_string()),
            shape,
        }])
    }

    fn rows_may_differ(&self, e: &Entry) -> bool {
        // Only what --unsafe-truncate-embeddings allows; the rows are
        // checked again here against what `open` measured.
        is_vocab_tensor(&e.name) && self.vocab_rows.contains_key(&e.name)
    }

    fn prepare(&self, e: &Entry) -> Result<()> {
        self.plan(&e.name).map(|_| ())
    }

    fn mixed_dtypes(&self) -> bool {
        true
    }

    fn input_paths(&self) -> Vec<PathBuf> {
        match &self.cfg.tokenizer {
            TokenizerSource::Model(p) => TOKENIZER_FILES
                .iter()
                .map(|f| p.join(f))
                .filter(|f| f.exists())
                .collect(),
            TokenizerSource::Base => Vec::new(),
        }
    }

    fn extra_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        let mut v = vec![
            (CONFIG_NAME.to_string(), self.cfg.text.clone().into_bytes()),
            ("README.md".to_string(), self.model_card().into_bytes()),
        ];
        for f in self.input_paths() {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned());
            v.push((name.unwrap_or_default(), crate::formats::read_input(&f)?));
        }
        Ok(v)
    }

    fn rewrite_file(&self, name: &str, bytes: &[u8]) -> Result<Option<Vec<u8>>> {
        let d = self.cfg.out_dtype.or(self.cfg.dtype);
        let rows = self.vocab_rows.values().min().copied();
        if name != "config.json" || (d.is_none() && rows.is_none()) {
            return Ok(None);
        }
        let mut cfg: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)
            .map_err(|e| Error::input(format!("config.json is not JSON: {e}")))?;
        // transformers 5 writes `dtype`, earlier versions `torch_dtype`.
        if let Some(d) = d {
            let key = if cfg.contains_key("dtype") {
                "dtype"
            } else {
                "torch_dtype"
            };
            cfg.insert(key.into(), d.torch_name().into());
        }
        if let Some(r) = rows.filter(|_| cfg.contains_key("vocab_size")) {
            cfg.insert("vocab_size".into(), r.into());
        }
        Ok(Some(
            (serde_json::to_string_pretty(&cfg).map_err(|e| Error::input(e.to_string()))? + "\n")
                .into_bytes(),
        ))
    }

    fn apply(&self, _dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let e = srcs[0].entry;
        let name = &e.name;
        let plan = self.plan(name)?;
        let mut ts = srcs
            .iter()
            .map(|s| s.tensor())
            .collect::<Result<Vec<TensorRef>>>()?;
        // Truncated vocabularies: every model's first `rows` rows (the
        // top-left submatrix; the other dimensions agree).
        let cut_shape: Vec<usize>;
        if let Some(&rows) = self.vocab_rows.get(name) {
            cut_shape = std::iter::once(rows)
                .chain(e.shape[1..].iter().copied())
                .collect();
            let row_bytes = |t: &TensorRef| t.data().len() / t.shape()[0].max(1);
            ts = ts
                .iter()
                .map(|t| TensorRef::new(t.dtype(), &cut_shape, &t.data()[..rows * row_bytes(t)]))
                .collect::<Result<_>>()?;
        }
        let out = self.out_dtype(e).unwrap_or(ts[0].dtype());
        let cast = self.cfg.dtype;
        let pick: Vec<TensorRef> = self.weighted.iter().map(|&k| ts[k]).collect();
        let weights: Vec<f32> = plan.terms.iter().map(|t| t.weight).collect();
        let m = self.cfg.method;
        let gta = |sparsify, consensus| Gta {
            sparsify,
            consensus,
            normalize: plan.normalize,
            rescale: plan.rescale,
            lambda: plan.lambda,
            seed: self.seed,
        };
        let chain = match m {
            Method::TaskArithmetic => Some(gta(Sparsify::None, false)),
            Method::Ties => Some(gta(Sparsify::Magnitude, true)),
            Method::DareLinear => Some(gta(Sparsify::Random, false)),
            Method::DareTies => Some(gta(Sparsify::Random, true)),
            Method::Breadcrumbs => Some(gta(Sparsify::Breadcrumbs, false)),
            Method::BreadcrumbsTies => Some(gta(Sparsify::Breadcrumbs, true)),
            Method::Della => Some(gta(Sparsify::Della, true)),
            Method::DellaLinear => Some(gta(Sparsify::Della, false)),
            _ => None,
        };
        let by = |row: bool| {
            if row {
                merge::Vectors::Rows
            } else {
                merge::Vectors::Whole
            }
        };
        let (tensor, diff, kept) = if let Some(g) = chain {
            let mut all = vec![ts[0]];
            all.extend(&pick);
            let r = merge::gta(&all, &plan.terms, &g, name, cast, out)?;
            (r.tensor, r.diff, Some(r.kept))
        } else {
            let (t, d) = match m {
                Method::Slerp => merge::slerp(&ts[0], &pick[0], plan.t, cast, out)?,
                Method::Nearswap => merge::nearswap(&ts[0], &pick[0], plan.t, cast, out)?,
                Method::ModelStock => {
                    let mut all = vec![ts[0]];
                    all.extend(&pick);
                    merge::model_stock(&all, by(plan.filter_wise), cast, out)?
                }
                Method::Sce => {
                    let mut all = vec![ts[0]];
                    all.extend(&pick);
                    merge::sce(&all, plan.select_topk, cast, out)?
                }
                Method::Nuslerp => {
                    let total = weights[0] + weights[1];
                    let t = if total.abs() < 1e-6 {
                        0.5
                    } else {
                        weights[1] / total
                    };
                    let base = self.cfg.base_model.as_ref().map(|_| &ts[0]);
                    merge::nuslerp(base, &pick[0], &pick[1], t, by(!plan.flatten), cast, out)?
                }
                Method::Linear => merge::linear(&pick, &weights, plan.normalize, cast, out)?,
                _ => merge::linear(&pick, &weights, false, cast, out)?,
            };
            (t, d, None)
        };
        let mut a = Applied::with_diff(tensor, diff);
        let fmt = |v: &[f64]| {
            v.iter()
                .map(|x| format!("{x:.4}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let ws: Vec<f64> = weights.iter().map(|&w| w as f64).collect();
        a.note = Some(match (m, kept) {
            (Method::Slerp | Method::Nearswap, _) => format!("{} t={}", m.name(), plan.t),
            (Method::ModelStock, _) => format!("model_stock filter_wise {}", plan.filter_wise),
            (Method::Sce, _) => format!("sce select_topk {}", plan.select_topk),
            (Method::Passthrough, _) => format!("passthrough scale {}", fmt(&ws)),
            (Method::Nuslerp, _) => {
                format!("nuslerp weight [{}] flatten {}", fmt(&ws), plan.flatten)
            }
            (_, Some(k)) => format!(
                "{} weight [{}] density [{}] lambda {} normalize {} rescale {}; kept [{}]",
                m.name(),
                fmt(&ws),
                fmt(&plan.terms.iter().map(|t| t.density).collect::<Vec<_>>()),
                plan.lambda,
                plan.normalize,
                plan.rescale,
                fmt(&k)
            ),
            _ => format!(
                "{} weight [{}] normalize {}",
                m.name(),
                fmt(&ws),
                plan.normalize
            ),
        });
        Ok(a)
    }
}
