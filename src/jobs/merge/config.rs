//! mergekit's YAML merge configuration, read strictly: an unknown key, a
//! value of the wrong kind or a parameter the method does not take is an
//! error that quotes its key path (`models[1].parameters.density`), where
//! mergekit ignores or fails late.

use super::params::{ParamValue, Params};
use crate::error::{Error, Result};
use crate::tensor::DType;
use std::path::{Path, PathBuf};
use yaml_rust2::{Yaml, YamlLoader};

/// A merge method this version runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// Σ wᵢθᵢ (/ Σ wᵢ).
    Linear,
    /// base + λ·Σ wᵢδᵢ.
    TaskArithmetic,
    /// Magnitude top-k, sign election, disjoint mean.
    Ties,
    /// DARE's random drop, rescaled, summed.
    DareLinear,
    /// DARE's random drop with TIES's sign election.
    DareTies,
    /// Drop the largest γ and the smallest deltas.
    Breadcrumbs,
    /// Breadcrumbs with TIES's sign election.
    BreadcrumbsTies,
    /// Spherical interpolation between the base and one model.
    Slerp,
    /// DELLA: rank-dependent random drops, rescaled, with sign election.
    Della,
    /// DELLA's drops without sign election.
    DellaLinear,
    /// Per element, the other model where it is within t of the base.
    Nearswap,
    /// Model Stock: toward the fine-tunes' mean by their offsets' angle.
    ModelStock,
    /// Spherical interpolation of two models (or of their deltas).
    Nuslerp,
    /// SCE: variance-selected, mean-square-weighted, sign-erased deltas.
    Sce,
    /// One model's tensors, optionally scaled.
    Passthrough,
    /// The Riemannian (Karcher) mean of all inputs on the unit sphere.
    Karcher,
    /// Weighted spherical mean of several models (or of their deltas).
    Multislerp,
}

/// What a method reads: its name, per-model and merge-wide parameters,
/// and whether it needs `base_model`.
struct Spec {
    method: Method,
    name: &'static str,
    per_model: &'static [&'static str],
    shared: &'static [&'static str],
    needs_base: bool,
    /// Whether a base, when given, is the reference the others move from
    /// (not merged as one of them).
    uses_base: bool,
}

const GTA_SHARED: &[&str] = &["normalize", "rescale", "lambda", "int8_mask"];

const DELLA_MODEL: &[&str] = &["weight", "density", "epsilon"];

const SPECS: &[Spec] = &[
    Spec {
        method: Method::Linear,
        name: "linear",
        per_model: &["weight"],
        shared: &["normalize"],
        needs_base: false,
        uses_base: false,
    },
    Spec {
        method: Method::TaskArithmetic,
        name: "task_arithmetic",
        per_model: &["weight"],
        shared: GTA_SHARED,
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::Ties,
        name: "ties",
        per_model: &["weight", "density"],
        shared: GTA_SHARED,
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::DareLinear,
        name: "dare_linear",
        per_model: &["weight", "density"],
        shared: GTA_SHARED,
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::DareTies,
        name: "dare_ties",
        per_model: &["weight", "density"],
        shared: GTA_SHARED,
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::Breadcrumbs,
        name: "breadcrumbs",
        per_model: &["weight", "density", "gamma"],
        shared: GTA_SHARED,
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::BreadcrumbsTies,
        name: "breadcrumbs_ties",
        per_model: &["weight", "density", "gamma"],
        shared: GTA_SHARED,
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::Della,
        name: "della",
        per_model: DELLA_MODEL,
        shared: GTA_SHARED,
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::DellaLinear,
        name: "della_linear",
        per_model: DELLA_MODEL,
        shared: GTA_SHARED,
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::Slerp,
        name: "slerp",
        per_model: &[],
        shared: &["t"],
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::Nearswap,
        name: "nearswap",
        per_model: &[],
        shared: &["t"],
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::ModelStock,
        name: "model_stock",
        per_model: &[],
        shared: &["filter_wise"],
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::Nuslerp,
        name: "nuslerp",
        per_model: &["weight"],
        shared: &["nuslerp_flatten", "nuslerp_row_wise"],
        needs_base: false,
        uses_base: true,
    },
    Spec {
        method: Method::Sce,
        name: "sce",
        per_model: &[],
        shared: &["select_topk", "int8_mask"],
        needs_base: true,
        uses_base: true,
    },
    Spec {
        method: Method::Passthrough,
        name: "passthrough",
        per_model: &["scale"],
        shared: &[],
        needs_base: false,
        uses_base: false,
    },
    Spec {
        method: Method::Karcher,
        name: "karcher",
        per_model: &[],
        shared: &["max_iter", "tol"],
        needs_base: false,
        uses_base: false,
    },
    Spec {
        method: Method::Multislerp,
        name: "multislerp",
        per_model: &["weight"],
        shared: &["normalize_weights", "eps"],
        needs_base: false,
        uses_base: true,
    },
];

/// mergekit methods this version does not run yet (a clear error, not
/// "unknown method").
const NOT_YET: &[&str] = &["arcee_fusion", "ram", "ramplus_tl"];

impl Method {
    fn spec(self) -> &'static Spec {
        SPECS
            .iter()
            .find(|s| s.method == self)
            // Cannot fail: SPECS has one entry per variant (each is parsed
            // back from its name in the tests).
            .expect("every method has a spec")
    }

    /// mergekit's name for it.
    pub fn name(self) -> &'static str {
        self.spec().name
    }

    /// Parameters each model may set (per tensor).
    pub fn per_model(self) -> &'static [&'static str] {
        self.spec().per_model
    }

    /// Whether the method needs `base_model`.
    pub fn needs_base(self) -> bool {
        self.spec().needs_base
    }

    /// Whether a given base is the reference the other models move from
    /// (and not merged as one of them).
    pub fn uses_base(self) -> bool {
        self.spec().uses_base
    }
}

/// Where the output's tokenizer files come from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerSource {
    /// The base model's (mergekit's default).
    Base,
    /// Another model directory's.
    Model(PathBuf),
}

/// One entry of `models:`.
#[derive(Clone, Debug)]
pub struct ModelEntry {
    /// The local path.
    pub path: PathBuf,
    /// `models[i].parameters`.
    pub parameters: Params,
}

/// One source of an output slice: layers `layers` of a model.
#[derive(Clone, Debug)]
pub struct SliceSource {
    /// The local path.
    pub path: PathBuf,
    /// `layer_range`: [start, end).
    pub layers: (usize, usize),
    /// `slices[i].sources[j].parameters`.
    pub parameters: Params,
}

/// One entry of `slices:`: output layers merged from its sources' layers.
#[derive(Clone, Debug)]
pub struct Slice {
    /// `sources`, in order.
    pub sources: Vec<SliceSource>,
    /// `parameters` of the slice (between its sources' and the top level).
    pub parameters: Params,
    /// `base_model` of the slice, which overrides the top-level one.
    pub base_model: Option<PathBuf>,
}

/// A parsed, checked merge configuration.
#[derive(Clone, Debug)]
pub struct MergeConfig {
    /// `merge_method`.
    pub method: Method,
    /// `base_model`.
    pub base_model: Option<PathBuf>,
    /// `models`, in order (empty in the slices form).
    pub models: Vec<ModelEntry>,
    /// `slices`, in order (empty in the models form).
    pub slices: Vec<Slice>,
    /// Top-level `parameters`.
    pub parameters: Params,
    /// `dtype`: inputs are rounded to it before merging.
    pub dtype: Option<DType>,
    /// `out_dtype`: the output's dtype (default: `dtype`, else the input's).
    pub out_dtype: Option<DType>,
    /// `tokenizer_source` (or `tokenizer.source`).
    pub tokenizer: TokenizerSource,
    /// The configuration as written, saved beside the output.
    pub text: String,
}

fn bad(path: &str, why: impl std::fmt::Display) -> Error {
    Error::input(format!("{path}: {why}"))
}

/// A mapping's entries, each key a string; other kinds are errors.
fn mapping<'y>(y: &'y Yaml, path: &str) -> Result<Vec<(&'y str, &'y Yaml)>> {
    let Yaml::Hash(h) = y else {
        return Err(bad(path, "expected a mapping of keys to values"));
    };
    h.iter()
        .map(|(k, v)| match k {
            Yaml::String(s) => Ok((s.as_str(), v)),
            other => Err(bad(path, format!("key {other:?} is not a string"))),
        })
        .collect()
}

fn string<'y>(y: &'y Yaml, path: &str) -> Result<&'y str> {
    match y {
        Yaml::String(s) => Ok(s),
        _ => Err(bad(path, "expected a string")),
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A dtype name as mergekit (torch) spells it, or ours.
fn dtype(y: &Yaml, path: &str) -> Result<DType> {
    let s = string(y, path)?;
    Ok(match s.to_ascii_lowercase().as_str() {
        "float32" | "fp32" | "f32" | "float" => DType::F32,
        "float16" | "fp16" | "f16" | "half" => DType::F16,
        "bfloat16" | "bf16" => DType::BF16,
        _ => {
            return Err(bad(
                path,
                format!("'{s}': expected float32, float16 or bfloat16"),
            ))
        }
    })
}

/// A model reference: a local path. Hub ids, revisions and LoRA suffixes
/// are refused with the reason.
fn model_path(y: &Yaml, path: &str) -> Result<PathBuf> {
    let s = string(y, path)?;
    let p = PathBuf::from(s);
    if p.exists() {
        return Ok(p);
    }
    if let Some((m, rev)) = s.rsplit_once('@') {
        if Path::new(m).exists() {
            return Err(bad(
                path,
                format!("'{s}': revisions (@{rev}) are not supported; give a local directory"),
            ));
        }
    }
    if let Some((m, _)) = s.split_once('+') {
        if Path::new(m).exists() {
            return Err(bad(
                path,
                format!("'{s}': model+LoRA references are not supported; merge the adapter first"),
            ));
        }
    }
    let hub_like = s.split('/').count() == 2 && !s.starts_with('.') && !s.starts_with('/');
    if hub_like {
        return Err(bad(
            path,
            format!("'{s}' is not a local path (a Hugging Face hub id?); modelpress does not download models: download it first and give the directory"),
        ));
    }
    Err(bad(path, format!("'{s}': no such file or directory")))
}

/// `slices:`: [{sources: [{model, layer_range: [a, b], parameters}],
/// parameters, base_model}].
fn parse_slices(y: &Yaml) -> Result<Vec<Slice>> {
    let Yaml::Array(list) = y else {
        return Err(bad(
            "slices",
            "expected a list of {sources: [{model: PATH, layer_range: [START, END]}]}",
        ));
    };
    if list.is_empty() {
        return Err(bad("slices", "an empty list"));
    }
    let mut out = Vec::new();
    for (i, sl) in list.iter().enumerate() {
        let path = format!("slices[{i}]");
        let mut slice = Slice {
            sources: Vec::new(),
            parameters: Params::default(),
            base_model: None,
        };
        let mut sources = None;
        for (k, v) in mapping(sl, &path)? {
            let kp = join(&path, k);
            match k {
                "sources" => {
                    let Yaml::Array(srcs) = v else {
                        return Err(bad(
                            &kp,
                            "expected a list of {model: PATH, layer_range: [START, END]}",
                        ));
                    };
                    let mut list = Vec::new();
                    for (j, src) in srcs.iter().enumerate() {
                        list.push(parse_source(src, &format!("{kp}[{j}]"))?);
                    }
                    if list.is_empty() {
                        return Err(bad(&kp, "an empty list"));
                    }
                    sources = Some(list);
                }
                "parameters" => slice.parameters = params(v, &kp)?,
                "base_model" => slice.base_model = Some(model_path(v, &kp)?),
                "residual_weight" => return Err(bad(&kp, "not supported")),
                _ => {
                    return Err(bad(
                        &kp,
                        "unknown key (expected sources, parameters, base_model)",
                    ))
                }
            }
        }
        slice.sources = sources.ok_or_else(|| bad(&path, "no sources"))?;
        out.push(slice);
    }
    Ok(out)
}

fn parse_source(y: &Yaml, path: &str) -> Result<SliceSource> {
    let (mut model, mut layers, mut parameters) = (None, None, Params::default());
    for (k, v) in mapping(y, path)? {
        let kp = join(path, k);
        match k {
            "model" => model = Some(model_path(v, &kp)?),
            "layer_range" => {
                let pair = match v {
                    Yaml::Array(a) if a.len() == 2 => match (&a[0], &a[1]) {
                        (Yaml::Integer(s), Yaml::Integer(e)) if *s >= 0 && *e >= 0 => {
                            Some((*s as usize, *e as usize))
                        }
                        _ => None,
                    },
                    _ => None,
                };
                let (s, e) =
                    pair.ok_or_else(|| bad(&kp, "expected [START, END]: two layer numbers ≥ 0"))?;
                if s >= e {
                    return Err(bad(
                        &kp,
                        format!(
                            "[{s}, {e}] holds no layer (END is exclusive and must exceed START)"
                        ),
                    ));
                }
                layers = Some((s, e));
            }
            "parameters" => parameters = params(v, &kp)?,
            _ => {
                return Err(bad(
                    &kp,
                    "unknown key (expected model, layer_range, parameters)",
                ))
            }
        }
    }
    Ok(SliceSource {
        path: model.ok_or_else(|| bad(path, "no model"))?,
        layers: layers.ok_or_else(|| bad(path, "no layer_range"))?,
        parameters,
    })
}

fn params(y: &Yaml, path: &str) -> Result<Params> {
    let mut p = Params::default();
    for (k, v) in mapping(y, path)? {
        p.insert(k, ParamValue::parse(v, &join(path, k))?);
    }
    Ok(p)
}

impl MergeConfig {
    /// Reads and checks a configuration file.
    pub fn load(file: &Path) -> Result<MergeConfig> {
        // As every input: a regular file (a FIFO would block, a device never end).
        let bytes = crate::formats::read_input(file)?;
        let text =
            String::from_utf8(bytes).map_err(|_| Error::input("not UTF-8 text").in_file(file))?;
        MergeConfig::parse(&text).map_err(|e| e.in_file(file))
    }

    /// Parses and checks a configuration's text.
    pub fn parse(text: &str) -> Result<MergeConfig> {
        let docs = YamlLoader::load_from_str(text)
            .map_err(|e| Error::input(format!("not valid YAML: {e}")))?;
        let [doc] = docs.as_slice() else {
            return Err(Error::input(format!(
                "expected one YAML document, found {}",
                docs.len()
            )));
        };
        let mut method = None;
        let mut base_model = None;
        let mut models = None;
        let mut slices = None;
        let mut parameters = Params::default();
        let (mut dt, mut out_dtype) = (None, None);
        let mut tokenizer = TokenizerSource::Base;
        let mut seen_tokenizer = None;
        for (k, v) in mapping(doc, "the configuration")? {
            match k {
                "merge_method" => {
                    let s = string(v, k)?;
                    method = Some(match SPECS.iter().find(|sp| sp.name == s) {
                        Some(sp) => sp.method,
                        None if NOT_YET.contains(&s) => {
                            return Err(bad(k, format!("'{s}' is a mergekit method this version of modelpress does not run yet")));
                        }
                        None => {
                            let known: Vec<&str> = SPECS.iter().map(|s| s.name).collect();
                            return Err(bad(k, format!("'{s}' is not a merge method (known: {})", known.join(", "))));
                        }
                    });
                }
                "base_model" => base_model = Some(model_path(v, k)?),
                "models" => {
                    let Yaml::Array(list) = v else {
                        return Err(bad(k, "expected a list of {model: PATH, parameters: {...}}"));
                    };
                    let mut out = Vec::new();
                    for (i, m) in list.iter().enumerate() {
                        let path = format!("models[{i}]");
                        let (mut p, mut params_) = (None, Params::default());
                        for (mk, mv) in mapping(m, &path)? {
                            match mk {
                                "model" => p = Some(model_path(mv, &join(&path, mk))?),
                                "parameters" => params_ = params(mv, &join(&path, mk))?,
                                _ => return Err(bad(&join(&path, mk), "unknown key (expected model, parameters)")),
                            }
                        }
                        let path_ = p.ok_or_else(|| bad(&path, "no model"))?;
                        out.push(ModelEntry { path: path_, parameters: params_ });
                    }
                    models = Some(out);
                }
                "parameters" => parameters = params(v, k)?,
                "dtype" => dt = Some(dtype(v, k)?),
                "out_dtype" => out_dtype = Some(dtype(v, k)?),
                "tokenizer_source" | "tokenizer" => {
                    if let Some(prev) = seen_tokenizer.replace(k) {
                        return Err(bad(k, format!("given twice (also as {prev})")));
                    }
                    let (src, path) = if k == "tokenizer" {
                        let mut src = None;
                        for (tk, tv) in mapping(v, k)? {
                            match tk {
                                "source" => src = Some(tv),
                                _ => return Err(bad(&join(k, tk), "not supported (only tokenizer.source)")),
                            }
                        }
                        (src.ok_or_else(|| bad(k, "no source"))?, "tokenizer.source")
                    } else {
                        (v, k)
                    };
                    tokenizer = match string(src, path)? {
                        "base" => TokenizerSource::Base,
                        "union" => return Err(bad(path, "'union' (a merged vocabulary) is not supported; use base or a model")),
                        _ => TokenizerSource::Model(model_path(src, path)?),
                    };
                }
                "slices" => slices = Some(parse_slices(v)?),
                "modules" => return Err(bad(k, "the modules form is not supported; use models")),
                "chat_template" => return Err(bad(k, "not supported: the tokenizer files are copied as they are")),
                _ => return Err(bad(k, "unknown key (expected merge_method, base_model, models or slices, parameters, dtype, out_dtype, tokenizer_source)")),
            }
        }
        let method = method.ok_or_else(|| Error::input("merge_method is missing"))?;
        let (models, slices) = match (models, slices) {
            (Some(m), None) => (m, Vec::new()),
            (None, Some(s)) => (Vec::new(), s),
            (Some(_), Some(_)) => {
                return Err(bad("slices", "give models or slices, not both"));
            }
            (None, None) => {
                return Err(Error::input(
                    "models is missing (a list of {model: PATH, parameters: {...}}, or slices)",
                ))
            }
        };
        let cfg = MergeConfig {
            method,
            base_model,
            models,
            slices,
            parameters,
            dtype: dt,
            out_dtype,
            tokenizer,
            text: text.to_string(),
        };
        cfg.check()?;
        Ok(cfg)
    }

    /// The method's rules that need the whole configuration.
    fn check(&self) -> Result<()> {
        let spec = self.method.spec();
        let m = spec.name;
        let slice_bases = self.slices.iter().all(|s| s.base_model.is_some());
        if spec.needs_base && self.base_model.is_none() && (self.slices.is_empty() || !slice_bases)
        {
            return Err(bad("base_model", format!("{m} needs a base model")));
        }
        let per_input = self
            .models
            .iter()
            .enumerate()
            .map(|(i, e)| (format!("models[{i}]"), &e.parameters))
            .chain(self.slices.iter().enumerate().flat_map(|(i, s)| {
                s.sources
                    .iter()
                    .enumerate()
                    .map(move |(j, e)| (format!("slices[{i}].sources[{j}]"), &e.parameters))
            }));
        for (path, params) in per_input {
            for k in params.keys() {
                let path = format!("{path}.parameters.{k}");
                if spec.shared.contains(&k) {
                    return Err(bad(
                        &path,
                        format!(
                            "{k} applies to the whole merge: set it in the top-level parameters"
                        ),
                    ));
                }
                if !spec.per_model.contains(&k) {
                    return Err(bad(
                        &path,
                        format!(
                            "{m} takes no parameter {k} per model (it takes: {})",
                            list(spec.per_model)
                        ),
                    ));
                }
            }
        }
        let scopes = std::iter::once(("parameters".to_string(), &self.parameters)).chain(
            self.slices
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("slices[{i}].parameters"), &s.parameters)),
        );
        for (path, params) in scopes {
            for k in params.keys() {
                if !spec.shared.contains(&k) && !spec.per_model.contains(&k) {
                    let all: Vec<&str> =
                        spec.shared.iter().chain(spec.per_model).copied().collect();
                    return Err(bad(
                        &format!("{path}.{k}"),
                        format!("{m} takes no parameter {k} (it takes: {})", list(&all)),
                    ));
                }
            }
        }
        if self.slices.is_empty() {
            self.check_arity("models", self.weighted().len(), self.models.len())?;
        }
        for (i, s) in self.slices.iter().enumerate() {
            let key = format!("slices[{i}].sources");
            let base = s.base_model.as_ref().or(self.base_model.as_ref());
            let base_at = base.and_then(|b| s.sources.iter().position(|e| same_path(&e.path, b)));
            let uses = spec.uses_base || spec.needs_base;
            if let (true, Some(b), None) = (uses, base, base_at) {
                return Err(bad(
                    &key,
                    format!(
                        "the base model {} is not among this slice's sources ({m} measures from it: list it with a layer_range like the others)",
                        b.display()
                    ),
                ));
            }
            let others = s.sources.len() - usize::from(uses && base_at.is_some());
            self.check_arity(&key, others, s.sources.len())?;
            if matches!(self.method, Method::Slerp | Method::Nearswap)
                && self.parameters.get("t").is_none()
                && s.parameters.get("t").is_none()
            {
                return Err(bad(
                    &format!("slices[{i}].parameters.t"),
                    format!("{m} needs t (in this slice's or the top-level parameters)"),
                ));
            }
        }
        if self.slices.is_empty()
            && matches!(self.method, Method::Slerp | Method::Nearswap)
            && self.parameters.get("t").is_none()
        {
            return Err(bad("parameters.t", format!("{m} needs t")));
        }
        Ok(())
    }

    /// How many inputs the method takes: `others` besides the base, `total`
    /// in all (the models, or one slice's sources, at key `key`).
    fn check_arity(&self, key: &str, others: usize, total: usize) -> Result<()> {
        let m = self.method.name();
        let why = match self.method {
            Method::Slerp | Method::Nearswap if others != 1 => {
                format!(
                    "{m} works between the base model and exactly one other model; found {others}"
                )
            }
            Method::Nuslerp if others != 2 => {
                format!("nuslerp interpolates between exactly two models besides the base; found {others}")
            }
            Method::ModelStock if others < 2 => {
                format!("model_stock needs at least two models besides the base; found {others}")
            }
            Method::Passthrough if total != 1 => {
                format!("passthrough takes exactly one model; found {total}")
            }
            _ if others == 0 => format!("{m} needs at least one model besides the base"),
            _ => return Ok(()),
        };
        Err(bad(key, why))
    }

    /// The models that are merged into the base: `models` without the base
    /// itself (GTA methods and slerp), or all of them (linear, passthrough).
    pub fn weighted(&self) -> Vec<&ModelEntry> {
        let skip_base = self.method.uses_base();
        self.models
            .iter()
            .filter(|e| !(skip_base && self.is_base(&e.path)))
            .collect()
    }

    /// Whether `p` names the base model (the same directory).
    pub fn is_base(&self, p: &Path) -> bool {
        self.base_model.as_deref().is_some_and(|b| same_path(b, p))
    }
}

/// Whether two paths name the same file or directory.
pub fn same_path(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    canon(a) == canon(b)
}

fn list(v: &[&str]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
