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
pub mod slices;

use super::op::{Applied, Src, TensorOp};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, OutEntry};
use crate::ops::merge::{self, Gta, Sparsify, Term};
use crate::tensor::{DType, TensorRef};
use config::{same_path, MergeConfig, Method, TokenizerSource};
use params::{lookup, position, Params, Resolved};
use std::collections::HashMap;
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
    /// The inputs merged together: one group in the models form, one per
    /// slice in the slices form.
    groups: Vec<Group>,
    /// The slices form's layout: where each output tensor comes from.
    sites: Option<HashMap<String, slices::Site>>,
    /// Per output layer of the slices form: its slice and first source's
    /// layer; the template's layer count.
    out_layers: Option<(Vec<(usize, usize)>, usize)>,
    /// Transformer layers of the base, for gradients (models form).
    layers: usize,
    /// The random stream's seed (DARE).
    seed: u64,
    /// `--unsafe-truncate-embeddings`: vocabulary tensors whose row counts
    /// differ are cut to the fewest rows, by name.
    vocab_rows: HashMap<String, usize>,
}

/// The inputs merged together for some tensors: the job's models, or one
/// output slice's sources (each a position in the tensor's sources).
struct Group {
    /// Per input: its own parameters (`models[i]` or
    /// `slices[s].sources[j]`; none for a base not listed there) and how
    /// messages name it.
    inputs: Vec<(Params, String)>,
    /// The slice's parameters (empty in the models form).
    params: Params,
    /// The input the others are measured from, for methods that use one.
    base: Option<usize>,
    /// The merged inputs, in order.
    weighted: Vec<usize>,
}

/// One tensor's place in the merge: its group, gradient position and its
/// name in each input (filters match it).
struct At<'a> {
    group: &'a Group,
    t: f64,
    names: Vec<&'a str>,
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
    /// nuslerp: whole tensors, rows or columns.
    vectors: merge::Vectors,
    normalize: bool,
    normalize_weights: bool,
    rescale: bool,
    lambda: f32,
    t: f32,
    max_iter: usize,
    tol: f64,
    eps: f64,
}

impl Merge {
    /// Opens the models `cfg` names; returns the job and the models the
    /// pipeline runs over (the base first; in the slices form, the output's
    /// layout). With `truncate_embeddings`, vocabulary tensors whose
    /// row counts differ between the models are cut to the fewest rows (as
    /// mergekit's `--unsafe-truncate-embeddings`); otherwise they are refused.
    pub fn open(
        cfg: MergeConfig,
        seed: u64,
        truncate_embeddings: bool,
    ) -> Result<(Merge, Vec<Model>)> {
        if let TokenizerSource::Model(p) = &cfg.tokenizer {
            if !p.is_dir() {
                return Err(Error::input(format!(
                    "tokenizer_source: {} is not a model directory",
                    p.display()
                )));
            }
        }
        let m = cfg.method;
        let (groups, models, sites, out_layers) = if cfg.slices.is_empty() {
            let (g, models) = Merge::models_form(&cfg)?;
            (vec![g], models, None, None)
        } else {
            let layout = slices::build(&cfg, truncate_embeddings)?;
            let groups = cfg
                .slices
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let base_path = s.base_model.as_ref().or(cfg.base_model.as_ref());
                    let base = base_path
                        .filter(|_| m.uses_base() || m.needs_base())
                        .and_then(|b| s.sources.iter().position(|e| same_path(&e.path, b)));
                    Group {
                        inputs: s
                            .sources
                            .iter()
                            .enumerate()
                            .map(|(j, e)| {
                                let label =
                                    format!("slices[{i}].sources[{j}] ({})", e.path.display());
                                (e.parameters.clone(), label)
                            })
                            .collect(),
                        params: s.parameters.clone(),
                        base,
                        weighted: (0..s.sources.len()).filter(|&j| Some(j) != base).collect(),
                    }
                })
                .collect();
            let layers = (layout.layers, layout.template_layers);
            (groups, layout.models, Some(layout.sites), Some(layers))
        };
        let layers = models[0]
            .entries()
            .filter_map(|(_, e)| params::layer_of(&e.name))
            .max()
            .map_or(0, |m| m + 1);
        let mut vocab_rows = HashMap::new();
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
                groups,
                sites,
                out_layers,
                layers,
                seed,
                vocab_rows,
            },
            models,
        ))
    }

    /// The models form: the base (or the first model) and then every other
    /// model named, each opened once; karcher also averages a base that
    /// `models` does not list, as mergekit does.
    fn models_form(cfg: &MergeConfig) -> Result<(Group, Vec<Model>)> {
        let m = cfg.method;
        let mut models = Vec::new();
        let mut inputs = Vec::new();
        if let Some(b) = &cfg.base_model {
            models.push(Model::open(b)?);
            let listed = cfg.models.iter().position(|e| cfg.is_base(&e.path));
            inputs.push(match listed {
                Some(i) => (
                    cfg.models[i].parameters.clone(),
                    format!("models[{i}] ({})", b.display()),
                ),
                None => (Params::default(), format!("base_model ({})", b.display())),
            });
        }
        let mut weighted = Vec::new();
        for (i, e) in cfg.models.iter().enumerate() {
            if m.uses_base() && cfg.is_base(&e.path) {
                continue;
            }
            let k = if cfg.is_base(&e.path) {
                0
            } else {
                models.push(Model::open(&e.path)?);
                inputs.push((
                    e.parameters.clone(),
                    format!("models[{i}] ({})", e.path.display()),
                ));
                models.len() - 1
            };
            weighted.push(k);
        }
        if m == Method::Karcher && cfg.base_model.is_some() && !weighted.contains(&0) {
            weighted.push(0);
        }
        let base = cfg.base_model.as_ref().filter(|_| m.uses_base()).map(|_| 0);
        Ok((
            Group {
                inputs,
                params: Params::default(),
                base,
                weighted,
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
        let paths = self.cfg.models.iter().map(|e| &e.path).chain(
            self.cfg
                .slices
                .iter()
                .flat_map(|s| s.sources.iter().map(|e| &e.path)),
        );
        for p in paths {
            let n = name(p);
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

    /// Where output tensor `name` sits in the merge.
    fn at<'a>(&'a self, name: &'a str) -> Result<At<'a>> {
        match &self.sites {
            None => {
                let g = &self.groups[0];
                Ok(At {
                    group: g,
                    t: position(name, self.layers),
                    names: vec![name; g.inputs.len()],
                })
            }
            Some(sites) => {
                let s = sites
                    .get(name)
                    .ok_or_else(|| Error::input(format!("{name} is not in the merge's layout")))?;
                Ok(At {
                    group: &self.groups[s.slice],
                    t: s.t,
                    names: s.names.iter().map(String::as_str).collect(),
                })
            }
        }
    }

    /// A parameter for input `i` (or, with None, a merge-wide one): the
    /// input's own, then its slice's, then the top-level parameters; an
    /// input's filters match its tensor's name there.
    fn param(&self, at: &At, i: Option<usize>, key: &str, name: &str) -> Option<Resolved> {
        let g = at.group;
        match i {
            Some(i) => lookup(
                &[&g.inputs[i].0, &g.params, &self.cfg.parameters],
                key,
                at.names[i],
                at.t,
            ),
            None => lookup(&[&g.params, &self.cfg.parameters], key, name, at.t),
        }
    }

    fn num(
        &self,
        at: &At,
        i: Option<usize>,
        key: &str,
        name: &str,
        default: Option<f64>,
    ) -> Result<f64> {
        let whose = match i {
            Some(i) => at.group.inputs[i].1.clone(),
            None => "parameters".into(),
        };
        match self.param(at, i, key, name) {
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

    fn flag(&self, at: &At, key: &str, name: &str, default: bool) -> Result<bool> {
        match self.param(at, None, key, name) {
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
        let at = self.at(name)?;
        let takes = |k: &str| m.per_model().contains(&k);
        let mut terms = Vec::new();
        for &w in &at.group.weighted {
            let num = |key, default| self.num(&at, Some(w), key, name, default);
            let weight = if takes("weight") {
                num("weight", None)?
            } else {
                num("scale", Some(1.0))?
            };
            let density = num("density", Some(1.0))?;
            let gamma = num("gamma", Some(0.01))?;
            let epsilon = num("epsilon", Some(0.15))?;
            let who = &at.group.inputs[w].1;
            let della = matches!(m, Method::Della | Method::DellaLinear);
            if della && density < 1.0 && !(density - epsilon > 0.0 && density + epsilon < 1.0) {
                return Err(Error::input(format!(
                    "{who}: for {name}, density ± epsilon ({density} ± {epsilon}) must lie inside (0, 1)"
                )));
            }
            if !(density > 0.0 && density <= 1.0) {
                return Err(Error::input(format!(
                    "{who}: density for {name} is {density}; it must be in (0, 1] (mergekit accepts more and trims nothing)"
                )));
            }
            if !(0.0..1.0).contains(&gamma) {
                return Err(Error::input(format!(
                    "{who}: gamma for {name} is {gamma}; it must be in [0, 1)"
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
        let shared = |key, default| self.num(&at, None, key, name, Some(default));
        let select_topk = shared("select_topk", 1.0)?;
        if !(select_topk > 0.0 && select_topk <= 1.0) {
            return Err(Error::input(format!(
                "parameters.select_topk for {name} is {select_topk}; it must be in (0, 1]"
            )));
        }
        let t = if matches!(m, Method::Slerp | Method::Nearswap) {
            self.num(&at, None, "t", name, None)?
        } else {
            0.0
        };
        let max_iter = shared("max_iter", 10.0)?;
        if !(max_iter >= 0.0 && max_iter.fract() == 0.0 && max_iter <= 1e6) {
            return Err(Error::input(format!(
                "parameters.max_iter for {name} is {max_iter}; it must be a whole number from 0 to 1000000"
            )));
        }
        let (tol, eps) = (shared("tol", 1e-5)?, shared("eps", 1e-8)?);
        for (k, v) in [("tol", tol), ("eps", eps)] {
            if v < 0.0 {
                return Err(Error::input(format!(
                    "parameters.{k} for {name} is {v}; it must be ≥ 0"
                )));
            }
        }
        let flatten = self.flag(&at, "nuslerp_flatten", name, true)?;
        let row_wise = self.flag(&at, "nuslerp_row_wise", name, false)?;
        Ok(TensorPlan {
            terms,
            select_topk,
            filter_wise: self.flag(&at, "filter_wise", name, false)?,
            vectors: match (flatten, row_wise) {
                (true, _) => merge::Vectors::Whole,
                (false, false) => merge::Vectors::Rows,
                (false, true) => merge::Vectors::Columns,
            },
            normalize: self.flag(&at, "normalize", name, normalize_default)?,
            normalize_weights: self.flag(&at, "normalize_weights", name, true)?,
            rescale: self.flag(&at, "rescale", name, rescale_default)?,
            lambda: shared("lambda", 1.0)? as f32,
            t: t as f32,
            max_iter: max_iter as usize,
            tol,
            eps,
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
            "merge ({}) of {} model(s){} into {}, seed {}",
            self.cfg.method.name(),
            self.groups
                .iter()
                .map(|g| g.weighted.len())
                .max()
                .unwrap_or(0),
            if self.sites.is_some() {
                format!(" in {} slices", self.groups.len())
            } else {
                String::new()
            },
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
        if name != "config.json" || (d.is_none() && rows.is_none() && self.out_layers.is_none()) {
            return Ok(None);
        }
        super::op::edit_config(bytes, |cfg| {
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
            if let Some((layers, template)) = &self.out_layers {
                for key in ["num_hidden_layers", "n_layer", "num_layers"] {
                    if cfg.contains_key(key) {
                        cfg.insert(key.into(), layers.len().into());
                    }
                }
                // Per-layer settings (sliding or full attention) follow
                // their layers, read from the template's list.
                if let Some(serde_json::Value::Array(types)) = cfg.get("layer_types") {
                    if types.len() == *template {
                        let new: Vec<serde_json::Value> =
                            layers.iter().map(|&(_, l)| types[l].clone()).collect();
                        cfg.insert("layer_types".into(), new.into());
                    }
                }
            }
            Ok(())
        })
        .map(Some)
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
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
        let group = self.at(name)?.group;
        let pick: Vec<TensorRef> = group.weighted.iter().map(|&k| ts[k]).collect();
        // The base, then the merged models (methods measured from a base).
        let base = group.base.map(|b| ts[b]);
        let with_base = || -> Result<Vec<TensorRef>> {
            let b = base.ok_or_else(|| Error::input(format!("{name}: no base model")))?;
            Ok(std::iter::once(b).chain(pick.iter().copied()).collect())
        };
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
        let (tensor, diff, kept) = if let Some(g) = chain {
            let r = merge::gta(dev, &with_base()?, &plan.terms, &g, name, cast, out)?;
            (r.tensor, r.diff, Some(r.kept))
        } else {
            let (t, d) = match m {
                Method::Slerp => merge::slerp(dev, &with_base()?[0], &pick[0], plan.t, cast, out)?,
                Method::Nearswap => {
                    merge::nearswap(dev, &with_base()?[0], &pick[0], plan.t, cast, out)?
                }
                Method::ModelStock => {
                    let by = if plan.filter_wise {
                        merge::Vectors::Rows
                    } else {
                        merge::Vectors::Whole
                    };
                    merge::model_stock(dev, &with_base()?, by, cast, out)?
                }
                Method::Sce => merge::sce(dev, &with_base()?, plan.select_topk, cast, out)?,
                Method::Nuslerp => {
                    let total = weights[0] + weights[1];
                    let t = if total.abs() < 1e-6 {
                        0.5
                    } else {
                        weights[1] / total
                    };
                    let b = base.as_ref();
                    merge::nuslerp(dev, b, &pick[0], &pick[1], t, plan.vectors, cast, out)?
                }
                Method::Karcher => merge::karcher(dev, &pick, plan.max_iter, plan.tol, cast, out)?,
                Method::Multislerp => merge::multislerp(
                    dev,
                    base.as_ref(),
                    &pick,
                    &weights,
                    plan.normalize_weights,
                    plan.eps,
                    cast,
                    out,
                )?,
                Method::Linear => merge::linear(dev, &pick, &weights, plan.normalize, cast, out)?,
                _ => merge::linear(dev, &pick, &weights, false, cast, out)?,
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
                format!("nuslerp weight [{}] vectors {:?}", fmt(&ws), plan.vectors)
            }
            (Method::Karcher, _) => {
                format!("karcher max_iter {} tol {}", plan.max_iter, plan.tol)
            }
            (Method::Multislerp, _) => format!(
                "multislerp weight [{}] normalize_weights {} eps {}",
                fmt(&ws),
                plan.normalize_weights,
                plan.eps
            ),
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
