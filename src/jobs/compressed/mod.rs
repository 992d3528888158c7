//! `quantize --scheme`: compressed-tensors checkpoints, as llm-compressor's
//! data-free `oneshot` writes them (QuantizationModifier with
//! `targets: ["Linear"]`), for vLLM, transformers and SGLang.
//!
//! Each quantized Linear weight `P.weight` becomes the tensors of its
//! format (`P.weight_packed`, `P.weight_scale`, ...), config.json gains
//! `quantization_config`, and recipe.yaml records the recipe. Which 2-D
//! weights are Linear layers is read from names: every `*.weight` of rank 2
//! but embeddings (`embed`, `wte`, `wpe`, `shared`).

mod read;

pub use read::{Checkpoint, CtDequantize};

use super::op::{is_linear_weight, Applied, Src, TensorOp};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, OutEntry};
use crate::ops::ct::{self, reference, Kind, Packing, Spec, Strategy};
use crate::ops::reduce::tensor_stats;
use serde_json::{json, Map, Value};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// compressed-tensors' version whose output this reproduces.
pub const CT_VERSION: &str = "0.19.0";

/// llm-compressor's preset schemes (`quantization/quant_scheme.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    /// int8 weights, group 128, symmetric.
    W8A16,
    /// int4 weights, group 128, symmetric.
    W4A16,
    /// int4 weights, group 128, with zero points.
    W4A16Asym,
    /// int8 weights per channel; int8 activations, dynamic per token.
    W8A8,
    /// float8_e4m3fn weights per channel; FP8 activations, dynamic per token.
    Fp8Dynamic,
    /// float8_e4m3fn weights in 128×128 blocks; activations per group of 128.
    Fp8Block,
    /// FP4 weights, group 16, e4m3 scales and a global scale.
    Nvfp4A16,
    /// FP4 weights, group 32, e8m0 scales.
    Mxfp4A16,
}

impl Scheme {
    /// Every scheme, by name, in declaration order (`name` indexes it).
    pub const ALL: [(&'static str, Scheme); 8] = [
        ("W8A16", Scheme::W8A16),
        ("W4A16", Scheme::W4A16),
        ("W4A16_ASYM", Scheme::W4A16Asym),
        ("W8A8", Scheme::W8A8),
        ("FP8_DYNAMIC", Scheme::Fp8Dynamic),
        ("FP8_BLOCK", Scheme::Fp8Block),
        ("NVFP4A16", Scheme::Nvfp4A16),
        ("MXFP4A16", Scheme::Mxfp4A16),
    ];

    /// The scheme named `s` (any case); an error listing them otherwise.
    pub fn parse(s: &str) -> Result<Scheme> {
        Self::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(s))
            .map(|&(_, k)| k)
            .ok_or_else(|| {
                let names: Vec<&str> = Self::ALL.iter().map(|(n, _)| *n).collect();
                Error::input(format!(
                    "unknown scheme '{s}' (expected one of {})",
                    names.join(", ")
                ))
            })
    }

    /// llm-compressor's name.
    pub fn name(self) -> &'static str {
        Self::ALL[self as usize].0
    }

    fn default_spec(self) -> Spec {
        let int = |bits, symmetric| Kind::Int { bits, symmetric };
        let (kind, strategy) = match self {
            Scheme::W8A16 => (int(8, true), Strategy::Group(128)),
            Scheme::W4A16 => (int(4, true), Strategy::Group(128)),
            Scheme::W4A16Asym => (int(4, false), Strategy::Group(128)),
            Scheme::W8A8 => (int(8, true), Strategy::Channel),
            Scheme::Fp8Dynamic => (Kind::Fp8, Strategy::Channel),
            Scheme::Fp8Block => (Kind::Fp8, Strategy::Block(128)),
            Scheme::Nvfp4A16 => (Kind::Nvfp4, Strategy::Group(16)),
            Scheme::Mxfp4A16 => (Kind::Mxfp4, Strategy::Group(32)),
        };
        Spec { kind, strategy }
    }
}

/// How a scheme's codes are stored (compressed-tensors' `format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    PackQuantized,
    IntQuantized,
    FloatQuantized,
    Nvfp4Pack,
    Mxfp4Pack,
}

impl Format {
    fn of(spec: &Spec, scheme: Scheme) -> Format {
        match spec.kind {
            Kind::Int { .. } if scheme == Scheme::W8A8 => Format::IntQuantized,
            Kind::Int { .. } => Format::PackQuantized,
            Kind::Fp8 => Format::FloatQuantized,
            Kind::Nvfp4 => Format::Nvfp4Pack,
            Kind::Mxfp4 => Format::Mxfp4Pack,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Format::PackQuantized => "pack-quantized",
            Format::IntQuantized => "int-quantized",
            Format::FloatQuantized => "float-quantized",
            Format::Nvfp4Pack => "nvfp4-pack-quantized",
            Format::Mxfp4Pack => "mxfp4-pack-quantized",
        }
    }

    fn packing(self, spec: &Spec, cols: usize) -> Packing {
        let bits = cols * spec.code_bits() as usize;
        match self {
            Format::PackQuantized => Packing {
                row_stride_bits: bits.next_multiple_of(32),
                offset: true,
            },
            _ => Packing {
                row_stride_bits: bits,
                offset: false,
            },
        }
    }
}

/// Layer names whose NVFP4 global scale is shared (llm-compressor's
/// `FUSED_LAYER_NAMES`: vLLM runs them as one fused matmul).
const FUSED: [&[&str]; 4] = [
    &["gate_proj", "up_proj"],
    &["q_proj", "k_proj", "v_proj"],
    &["q_a_proj", "kv_a_proj_with_mqa"],
    &["w1", "w3"],
];

/// Options of `quantize --scheme`.
pub struct SchemeOptions {
    /// The preset.
    pub scheme: Scheme,
    /// `--group-size`: replaces the preset's group (group schemes only).
    pub group_size: Option<usize>,
    /// `--symmetric` (true) / `--asymmetric` (false), for int schemes.
    pub symmetric: Option<bool>,
    /// `--ignore`: Linear layers (module paths, regex search) left as they
    /// are; None means llm-compressor's example default, `lm_head`.
    pub ignore: Option<Vec<String>>,
}

/// The `quantize --scheme` job.
pub struct CompressedTensors {
    scheme: Scheme,
    spec: Spec,
    format: Format,
    /// Weights of the Linear layers quantized.
    targets: BTreeSet<String>,
    /// Linear layers left as they are (config's `ignore`).
    ignored: Vec<String>,
    /// The patterns, as given, for the recipe.
    ignore_patterns: Vec<String>,
    /// NVFP4: a weight's fused group (its own name alone when none).
    fused: HashMap<String, Vec<String>>,
    /// NVFP4 global scales by the first weight of their group.
    global: Mutex<HashMap<String, f32>>,
}

impl CompressedTensors {
    /// Plans the job over `model` (a directory with config.json).
    pub fn new(model: &Model, opts: SchemeOptions) -> Result<CompressedTensors> {
        let scheme = opts.scheme;
        let mut spec = scheme.default_spec();
        if let Some(g) = opts.group_size {
            match (spec.kind, spec.strategy) {
                (Kind::Int { .. }, Strategy::Group(_)) if g > 0 => {
                    spec.strategy = Strategy::Group(g)
                }
                (Kind::Int { .. }, Strategy::Group(_)) => {
                    return Err(Error::input("--group-size must be > 0"))
                }
                _ => {
                    return Err(Error::input(format!(
                        "--group-size: {} fixes its groups",
                        scheme.name()
                    )))
                }
            }
        }
        if let Some(sym) = opts.symmetric {
            match (&mut spec.kind, scheme) {
                (
                    Kind::Int { symmetric, .. },
                    Scheme::W8A16 | Scheme::W4A16 | Scheme::W4A16Asym,
                ) => *symmetric = sym,
                _ if sym => {}
                _ => {
                    return Err(Error::input(format!(
                        "--asymmetric: {} is symmetric (zero points only for W8A16, W4A16)",
                        scheme.name()
                    )))
                }
            }
        }
        let config = model_config(model)?;
        if config.contains_key("quantization_config") {
            return Err(Error::input(format!(
                "{}: config.json already has a quantization_config (the model is quantized)",
                model.path.display()
            )));
        }
        let (patterns, given) = match opts.ignore {
            Some(p) => (p, true),
            None => (vec!["lm_head".to_string()], false),
        };
        let regexes = patterns
            .iter()
            .map(|p| super::op::regex("--ignore", p))
            .collect::<Result<Vec<_>>>()?;
        // The Linear layers, in module order (numbers compared as numbers,
        // lm_head last as in every transformers causal LM).
        let mut linear: Vec<String> = model
            .entries()
            .filter(|(_, e)| is_linear_weight(e))
            .map(|(_, e)| e.name[..e.name.len() - ".weight".len()].to_string())
            .collect();
        // A tied lm_head is a Linear layer without a tensor of its own.
        let tied = config.get("tie_word_embeddings").and_then(Value::as_bool) == Some(true)
            && !linear.iter().any(|m| m == "lm_head")
            && model
                .entries()
                .any(|(_, e)| e.name.ends_with("embed_tokens.weight"));
        if tied {
            linear.push("lm_head".into());
        }
        linear.sort_by_key(|m| module_order(m));
        let mut ignored = Vec::new();
        let mut targets = BTreeSet::new();
        let mut matched = vec![false; regexes.len()];
        for m in &linear {
            let hits: Vec<usize> = (0..regexes.len())
                .filter(|&i| regexes[i].is_match(m))
                .collect();
            for &i in &hits {
                matched[i] = true;
            }
            if hits.is_empty() {
                targets.insert(format!("{m}.weight"));
            } else {
                ignored.push(m.clone());
            }
        }
        if given {
            if let Some(i) = matched.iter().position(|&m| !m) {
                return Err(Error::input(format!(
                    "{}: --ignore '{}' matches no Linear layer",
                    model.path.display(),
                    patterns[i]
                )));
            }
        }
        if targets.is_empty() {
            return Err(Error::input(format!(
                "{}: no Linear layer to quantize (2-D `*.weight` tensors other than \
                 embeddings{})",
                model.path.display(),
                if ignored.is_empty() {
                    ""
                } else {
                    ", not ignored"
                }
            )));
        }
        let mut fused = HashMap::new();
        if spec.kind == Kind::Nvfp4 {
            for t in &targets {
                fused.insert(t.clone(), fused_group(model, &targets, t)?);
            }
        }
        Ok(CompressedTensors {
            scheme,
            format: Format::of(&spec, scheme),
            spec,
            targets,
            ignored,
            ignore_patterns: patterns,
            fused,
            global: Mutex::new(HashMap::new()),
        })
    }

    /// The `quantization_config` block of config.json.
    pub fn quantization_config(&self) -> Value {
        let weights = self.weights_args();
        let input = match self.scheme {
            Scheme::W8A8 | Scheme::Fp8Dynamic | Scheme::Fp8Block => {
                let block = self.scheme == Scheme::Fp8Block;
                json!({
                    "actorder": null, "block_structure": null, "dynamic": true,
                    "group_size": if block { json!(128) } else { Value::Null },
                    "num_bits": 8, "observer": null, "observer_kwargs": {},
                    "scale_dtype": null,
                    "strategy": if block { "group" } else { "token" },
                    "symmetric": true,
                    "type": if self.scheme == Scheme::W8A8 { "int" } else { "float" },
                    "zp_dtype": null,
                })
            }
            _ => Value::Null,
        };
        let format = self.format.name();
        json!({
            "config_groups": {"group_0": {
                "format": format,
                "input_activations": input,
                "output_activations": null,
                "targets": ["Linear"],
                "weights": weights,
            }},
            "format": format,
            "global_compression_ratio": null,
            "ignore": self.ignored,
            "kv_cache_scheme": null,
            "quant_method": "compressed-tensors",
            "quantization_status": "compressed",
            "sparsity_config": {},
            "transform_config": {},
            "version": CT_VERSION,
        })
    }

    fn weights_args(&self) -> Value {
        let (kind, bits, symmetric) = match self.spec.kind {
            Kind::Int { bits, symmetric } => ("int", bits, symmetric),
            Kind::Fp8 => ("float", 8, true),
            Kind::Nvfp4 | Kind::Mxfp4 => ("float", 4, true),
        };
        let (strategy, group, block) = match self.spec.strategy {
            Strategy::Channel => ("channel", Value::Null, Value::Null),
            Strategy::Group(g) if self.spec.kind == Kind::Nvfp4 => {
                ("tensor_group", json!(g), Value::Null)
            }
            Strategy::Group(g) => ("group", json!(g), Value::Null),
            Strategy::Block(b) => ("block", Value::Null, json!([b, b])),
        };
        let scale_dtype = match self.spec.kind {
            Kind::Nvfp4 => json!("torch.float8_e4m3fn"),
            Kind::Mxfp4 => json!("torch.uint8"),
            _ => Value::Null,
        };
        json!({
            "actorder": null,
            "block_structure": block,
            "dynamic": false,
            "group_size": group,
            "num_bits": bits,
            "observer": "memoryless_minmax",
            "observer_kwargs": {},
            "scale_dtype": scale_dtype,
            "strategy": strategy,
            "symmetric": symmetric,
            "type": kind,
            "zp_dtype": if symmetric { Value::Null } else { json!("torch.int8") },
        })
    }

    /// The recipe llm-compressor saves beside the model.
    fn recipe(&self) -> String {
        let list = |v: &[String]| {
            v.iter()
                .map(|s| serde_json::to_string(s).unwrap_or_default())
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "default_stage:\n  default_modifiers:\n    QuantizationModifier:\n      \
             targets: [Linear]\n      ignore: [{}]\n      scheme: {}\n      \
             bypass_divisibility_checks: false\n      requires_calibration_data: false\n",
            list(&self.ignore_patterns),
            self.scheme.name()
        )
    }

    /// NVFP4's global scale of the group `name` belongs to.
    fn global_scale(&self, dev: &Device, model: &Model, name: &str) -> Result<f32> {
        let group = &self.fused[name];
        if let Some(&g) = lock(&self.global).get(&group[0]) {
            return Ok(g);
        }
        let mut absmax = 0f32;
        let mut dtype = None;
        for member in group {
            let Some((f, e)) = model.find(member) else {
                return Err(Error::input(format!("fused layer '{member}' is missing")));
            };
            let t = f.tensor(e).ok_or_else(|| {
                Error::input(format!("fused layer '{member}' is not a float tensor"))
            })?;
            let s = tensor_stats(dev, &t)?;
            if s.nonfinite > 0 {
                return Err(Error::input(format!(
                    "fused layer '{member}' holds {} non-finite weights",
                    s.nonfinite
                )));
            }
            absmax = absmax.max(f32::from_bits(s.max_abs_bits));
            dtype.get_or_insert(t.dtype);
        }
        let dt = dtype.unwrap_or(crate::tensor::DType::F32);
        let g = reference::nvfp4_global_scale(dt, absmax);
        lock(&self.global).insert(group[0].clone(), g);
        Ok(g)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Sort key of a module path: dotted parts, numbers as numbers, and
/// `lm_head` after everything.
fn module_order(m: &str) -> (bool, Vec<(u64, String)>) {
    let parts = m
        .split('.')
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (u64::MAX, p.to_string()),
        })
        .collect();
    (m == "lm_head", parts)
}

/// config.json of a model directory, as an object.
fn model_config(model: &Model) -> Result<Map<String, Value>> {
    model.config()?.ok_or_else(|| {
        Error::input(format!(
            "{}: --scheme needs a model directory with config.json (serving engines read \
             quantization_config from it)",
            model.path.display()
        ))
    })
}

/// The weights whose NVFP4 global scale `name`'s is shared with: its
/// fused siblings when the parent module has them all, else itself.
fn fused_group(model: &Model, targets: &BTreeSet<String>, name: &str) -> Result<Vec<String>> {
    let module = &name[..name.len() - ".weight".len()];
    let (parent, leaf) = module.rsplit_once('.').unwrap_or(("", module));
    let path = |l: &str| {
        if parent.is_empty() {
            format!("{l}.weight")
        } else {
            format!("{parent}.{l}.weight")
        }
    };
    for names in FUSED {
        if !names.contains(&leaf) || !names.iter().all(|l| model.find(&path(l)).is_some()) {
            continue;
        }
        let members: Vec<String> = names.iter().map(|l| path(l)).collect();
        if let Some(m) = members.iter().find(|m| !targets.contains(*m)) {
            return Err(Error::input(format!(
                "{module}: NVFP4 gives the fused layers {} one global scale, but '{}' is \
                 ignored: ignore all of them or none",
                names.join("/"),
                &m[..m.len() - ".weight".len()]
            )));
        }
        return Ok(members);
    }
    Ok(vec![name.to_string()])
}

impl TensorOp for CompressedTensors {
    fn describe(&self) -> String {
        format!("compressed-tensors {}", self.scheme.name())
    }

    fn default_select(&self, e: &Entry) -> bool {
        self.targets.contains(&e.name)
    }

    fn outputs(&self, e: &Entry) -> Result<Vec<OutEntry>> {
        let p = &e.name[..e.name.len() - ".weight".len()];
        let (rows, cols) = (e.shape[0], e.shape[1]);
        let (gr, gc) = self.spec.group_grid(rows, cols);
        let out = |suffix: &str, dtype: &str, shape: Vec<usize>| OutEntry {
            name: format!("{p}.{suffix}"),
            dtype: dtype.into(),
            shape,
        };
        let t = e.dtype.as_str();
        let bits = self.spec.code_bits() as usize;
        Ok(match self.format {
            Format::PackQuantized => {
                let mut v = vec![
                    out(
                        "weight_packed",
                        "I32",
                        vec![rows, (cols * bits).div_ceil(32)],
                    ),
                    out("weight_scale", t, vec![gr, gc]),
                    out("weight_shape", "I64", vec![2]),
                ];
                if matches!(
                    self.spec.kind,
                    Kind::Int {
                        symmetric: false,
                        ..
                    }
                ) {
                    v.push(out(
                        "weight_zero_point",
                        "I32",
                        vec![(rows * bits).div_ceil(32), gc],
                    ));
                }
                v
            }
            Format::IntQuantized => vec![
                out("weight", "I8", vec![rows, cols]),
                out("weight_scale", t, vec![gr, gc]),
            ],
            Format::FloatQuantized => vec![
                out("weight", "F8_E4M3", vec![rows, cols]),
                out("weight_scale", t, vec![gr, gc]),
            ],
            Format::Nvfp4Pack => vec![
                out("weight_global_scale", "F32", vec![1]),
                out("weight_packed", "U8", vec![rows, cols / 2]),
                out("weight_scale", "F8_E4M3", vec![gr, gc]),
            ],
            Format::Mxfp4Pack => vec![
                out("weight_packed", "U8", vec![rows, cols / 2]),
                out("weight_scale", "U8", vec![gr, gc]),
            ],
        })
    }

    fn prepare(&self, e: &Entry) -> Result<()> {
        self.spec.check_shape(e.shape[1]).map_err(|err| match err {
            Error::Input(why) => {
                let hint = if matches!(self.spec.kind, Kind::Int { .. }) {
                    "--ignore the layer, or give a --group-size that divides it"
                } else {
                    "--ignore the layer"
                };
                Error::input(format!("{why} ({hint})"))
            }
            other => other,
        })
    }

    fn rewrite_file(&self, name: &str, bytes: &[u8]) -> Result<Option<Vec<u8>>> {
        if name != "config.json" {
            return Ok(None);
        }
        super::op::edit_config(bytes, |cfg| {
            cfg.insert("quantization_config".into(), self.quantization_config());
            Ok(())
        })
        .map(Some)
    }

    fn extra_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(vec![("recipe.yaml".into(), self.recipe().into_bytes())])
    }

    fn apply(&self, dev: &Device, srcs: &[Src], models: &[Model]) -> Result<Applied> {
        let e = srcs[0].entry;
        let t = srcs[0].tensor()?;
        let gs = if self.spec.kind == Kind::Nvfp4 {
            self.global_scale(dev, &models[0], &e.name)?
        } else {
            1.0
        };
        let (rows, cols) = (e.shape[0], e.shape[1]);
        let packing = self.format.packing(&self.spec, cols);
        let q = ct::quantize(dev, &self.spec, packing, &t, gs)?;
        let scales: Vec<u8> = match self.spec.kind {
            Kind::Nvfp4 | Kind::Mxfp4 => q.groups.iter().map(|g| g.scale_raw as u8).collect(),
            _ => q
                .groups
                .iter()
                .flat_map(|g| g.scale_raw.to_le_bytes()[..t.dtype.size()].to_vec())
                .collect(),
        };
        let mut outputs = Vec::new();
        match self.format {
            Format::PackQuantized => {
                outputs.push(q.codes);
                outputs.push(scales);
                let shape: Vec<u8> = [rows as i64, cols as i64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                outputs.push(shape);
                if let Kind::Int {
                    bits,
                    symmetric: false,
                } = self.spec.kind
                {
                    outputs.push(pack_zero_points(&q.groups, rows, cols, &self.spec, bits));
                }
            }
            Format::IntQuantized | Format::FloatQuantized | Format::Mxfp4Pack => {
                outputs.push(q.codes);
                outputs.push(scales);
            }
            Format::Nvfp4Pack => {
                outputs.push(gs.to_le_bytes().to_vec());
                outputs.push(q.codes);
                outputs.push(scales);
            }
        }
        Ok(Applied {
            outputs,
            approx: None,
            diff: Some(q.diff),
            note: (q.cpu_groups > 0).then(|| format!("{} groups on the CPU", q.cpu_groups)),
        })
    }
}

/// Zero points (rows × groups) + 2^(bits−1), packed along the rows into
/// int32 words: shape (⌈rows·bits/32⌉, groups), as compressed-tensors'
/// `pack_to_int32(…, packed_dim=0)`.
fn pack_zero_points(
    groups: &[reference::GroupParams],
    rows: usize,
    cols: usize,
    spec: &Spec,
    bits: u32,
) -> Vec<u8> {
    let (_, gc) = spec.group_grid(rows, cols);
    let words = (rows * bits as usize).div_ceil(32);
    let mut out = vec![0u32; words * gc];
    for r in 0..rows {
        for g in 0..gc {
            let u = (groups[r * gc + g].zp + (1 << (bits - 1))) as u32;
            let bit = r * bits as usize;
            out[(bit / 32) * gc + g] |= u << (bit % 32);
        }
    }
    out.iter().flat_map(|w| w.to_le_bytes()).collect()
}
