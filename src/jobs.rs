//! The whole-model operations behind the commands: each a `TensorOp` over
//! the kernels in `ops`.
//!
//! int8 storage (`quantize --int8` / `--scale`): a quantized tensor NAME is
//! stored as NAME in I8 with its shape, and NAME_scale in F32 of shape
//! [rows, 1] (per row) or [1] (per tensor), so that w ≈ NAME · NAME_scale
//! (broadcast over each row). The file's `__metadata__` key
//! `modelpress.quantization` holds a JSON string:
//! `{"version": 1, "tensors": {NAME: {"scheme": "absmax-per-row" |
//! "absmax-per-tensor" | "round", "dtype": "BF16", "scale": "NAME_scale"}}}`.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, Metadata, OutEntry};
use crate::ops::quantize::Granularity;
use crate::ops::select::{self, Cut};
use crate::ops::{mix, prune, quantize, transfer};
use crate::pipeline::{Applied, Selection, Src, TensorOp};
use crate::tensor::{matrix_view, DType, QTensor, Tensor};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Mutex;

pub const QUANT_KEY: &str = "modelpress.quantization";

fn float_out(t: Tensor) -> Applied {
    Applied {
        outputs: vec![t.data.clone()],
        approx: Some(t),
        note: None,
    }
}

/// `prune`: |w| < τ, or whole rows whose norm is below τ.
pub enum Prune {
    Threshold(f32),
    Rows(f32, prune::NeuronNorm),
}

impl TensorOp for Prune {
    fn describe(&self) -> String {
        match self {
            Prune::Threshold(t) => format!("prune |w| < {t}"),
            Prune::Rows(t, n) => format!("prune rows with {n:?} norm < {t}"),
        }
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let t = srcs[0].tensor()?;
        Ok(match self {
            Prune::Threshold(tau) => float_out(prune::threshold(dev, &t, *tau)?.0),
            Prune::Rows(tau, norm) => {
                let (out, st) = prune::prune_neurons(dev, &t, *tau, *norm)?;
                let mut a = float_out(out);
                a.note = Some(format!(
                    "{} of {} rows zeroed",
                    st.neurons_zeroed(),
                    st.zeroed.len()
                ));
                a
            }
        })
    }
}

/// Activation norms for activation-aware pruning (Wanda): a safetensors
/// file holding, for each weight tensor NAME to prune, a 1-D tensor NAME
/// (F32, F16 or BF16) of ‖X_j‖₂ — the L2 norm of input feature j over the
/// calibration tokens — one per column of the weight's (shape[0], rest) view.
pub struct ScoresFile {
    file: crate::formats::safetensors::SafetensorsFile,
}

impl ScoresFile {
    pub fn open(path: &std::path::Path) -> Result<ScoresFile> {
        Ok(ScoresFile {
            file: crate::formats::safetensors::SafetensorsFile::open(path)?,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.file.path
    }

    /// The norms for weight tensor `e`, checked; errors name this file.
    pub fn for_tensor(&self, e: &Entry) -> Result<Vec<f32>> {
        let bad = |why: String| Error::Format {
            file: self.file.path.display().to_string(),
            tensor: e.name.clone(),
            why,
        };
        let se = self
            .file
            .find(&e.name)
            .ok_or_else(|| bad("missing from the scores file".into()))?;
        let t = self.file.tensor(se).ok_or_else(|| {
            bad(format!(
                "scores are {}, expected F32, F16 or BF16",
                se.dtype
            ))
        })?;
        let cols = matrix_view(&e.shape).1;
        if se.shape.len() != 1 || se.shape[0] != cols {
            return Err(bad(format!(
                "scores of shape {:?}; the weight {:?} needs [{cols}]",
                se.shape, e.shape
            )));
        }
        let x = t.to_f32_vec();
        select::check_scores(&x, cols).map_err(|err| bad(err.to_string()))
    }
}

/// `prune --sparsity`: exactly round_ties_even(S·n) weights zeroed,
/// smallest |w| first, ties to the lower index — per tensor, or with one
/// cut across every touched tensor (`global`), or with activation norms
/// (`scores`, Wanda) per output row, smallest |w|·‖X_j‖ first.
pub struct Sparsity {
    pub s: f64,
    pub of_remaining: bool,
    global: Option<GlobalCut>,
    scores: Option<ScoresFile>,
}

/// The cut of a global prune and the ties it may still take, spent in the
/// order the pipeline writes tensors (model order).
struct GlobalCut {
    cut: Cut,
    ties_left: Mutex<u64>,
    /// Passes over the model the cut took.
    passes: usize,
}

impl Sparsity {
    pub fn per_tensor(s: f64, of_remaining: bool) -> Result<Sparsity> {
        select::check_sparsity(s)?;
        Ok(Sparsity {
            s,
            of_remaining,
            global: None,
            scores: None,
        })
    }

    /// Per output row, by |w|·‖X_j‖₂ (Wanda).
    pub fn with_scores(s: f64, scores: ScoresFile) -> Result<Sparsity> {
        select::check_sparsity(s)?;
        Ok(Sparsity {
            s,
            of_remaining: false,
            global: None,
            scores: Some(scores),
        })
    }

    /// Streams the tensors `selection` touches in `model` (one or two
    /// histogram passes; a zero-count pass first with `of_remaining`) and
    /// fixes one cut for all of them.
    pub fn global(
        dev: &Device,
        model: &Model,
        selection: &Selection,
        s: f64,
        of_remaining: bool,
    ) -> Result<Sparsity> {
        select::check_sparsity(s)?;
        let probe = Sparsity::per_tensor(s, of_remaining)?;
        let chosen: Vec<_> = model
            .entries()
            .filter(|(_, e)| selection.chosen(&probe, e))
            .collect();
        let tensors = || {
            chosen.iter().map(|(f, e)| {
                let t = f.tensor(e).ok_or_else(|| {
                    Error::Unsupported(format!(
                        "dtype {} (the kernels take F32, F16 and BF16)",
                        e.dtype
                    ))
                    .at(&f.path, &e.name)
                });
                (*f, *e, t)
            })
        };
        let n: u64 = chosen.iter().map(|(_, e)| e.numel() as u64).sum();
        let mut passes = 0;
        let k = if of_remaining {
            passes += 1;
            let mut zeros = 0;
            for (f, e, t) in tensors() {
                zeros += crate::ops::reduce::tensor_stats(dev, &t?)?.zeros;
                f.release(e);
            }
            zeros + select::count_for(s, n - zeros)
        } else {
            select::count_for(s, n)
        };
        let low_needed = chosen
            .iter()
            .any(|(_, e)| e.kernel_dtype().is_some_and(select::needs_low_level));
        // One running histogram: memory does not grow with the number of
        // tensors (a mixture of experts has tens of thousands).
        let cut = select::find_cut(k, low_needed, |level| {
            passes += 1;
            let mut total = vec![0u64; 1 << 16];
            for (f, e, t) in tensors() {
                select::add_key_histogram(dev, &t?, level, &mut total)
                    .map_err(|err| err.at(&f.path, &e.name))?;
                f.release(e);
            }
            Ok(total)
        })?;
        Ok(Sparsity {
            s,
            of_remaining,
            scores: None,
            global: Some(GlobalCut {
                cut,
                ties_left: Mutex::new(cut.ties),
                passes,
            }),
        })
    }

    /// Histogram passes the global cut took (0 per tensor).
    pub fn passes(&self) -> usize {
        self.global.as_ref().map_or(0, |g| g.passes)
    }
}

impl TensorOp for Sparsity {
    fn input_paths(&self) -> Vec<std::path::PathBuf> {
        self.scores.iter().map(|s| s.path().to_path_buf()).collect()
    }

    fn describe(&self) -> String {
        let scope = if self.global.is_some() {
            "global"
        } else {
            "per tensor"
        };
        let of = if self.of_remaining {
            " of remaining"
        } else {
            ""
        };
        format!("prune to sparsity {}{of} ({scope})", self.s)
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let t = srcs[0].tensor()?;
        if let Some(sc) = &self.scores {
            let x = sc.for_tensor(srcs[0].entry)?;
            let (out, zeros) = select::prune_rows_to_sparsity(dev, &t, self.s, Some(&x))?;
            let mut a = float_out(out);
            a.note = Some(format!("{zeros} of {} zero", t.numel()));
            return Ok(a);
        }
        let (out, st) = match &self.global {
            None => select::prune_to_sparsity(dev, &t, self.s, self.of_remaining)?,
            Some(g) => {
                let mut left = g.ties_left.lock().unwrap_or_else(|e| e.into_inner());
                let cut = Cut {
                    ties: *left,
                    ..g.cut
                };
                // No tensor holds more keys equal to the cut than all do.
                let r = select::apply_cut(dev, &t, cut, g.cut.equal)?;
                *left -= r.1.ties_pruned;
                r
            }
        };
        let mut a = float_out(out);
        a.note = Some(format!("{} of {} zero", st.zeros, st.numel));
        Ok(a)
    }
}

/// `prune --rows S` / `--cols S`: exactly round(S·n) rows or columns of
/// smallest norm zeroed.
pub struct Lines {
    pub axis: prune::Axis,
    pub s: f64,
    pub norm: prune::NeuronNorm,
}

impl TensorOp for Lines {
    fn describe(&self) -> String {
        let what = if self.axis == prune::Axis::Rows {
            "rows"
        } else {
            "columns"
        };
        format!("prune {} of {what} by {:?} norm", self.s, self.norm)
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let t = srcs[0].tensor()?;
        let (out, mask, _) = prune::prune_lines(dev, &t, self.axis, self.s, self.norm)?;
        let mut a = float_out(out);
        a.note = Some(format!(
            "{} of {} zeroed",
            mask.iter().filter(|&&m| m).count(),
            mask.len()
        ));
        Ok(a)
    }
}

/// `prune --pattern N:M`, by |w| or, with scores, by |w|·‖X_j‖₂.
pub struct PatternPrune {
    pub pattern: select::Pattern,
    pub keep_tail: bool,
    pub scores: Option<ScoresFile>,
}

impl TensorOp for PatternPrune {
    fn input_paths(&self) -> Vec<std::path::PathBuf> {
        self.scores.iter().map(|s| s.path().to_path_buf()).collect()
    }

    fn describe(&self) -> String {
        let by = if self.scores.is_some() {
            " by |w|·‖X‖"
        } else {
            ""
        };
        format!("prune to {}:{}{by}", self.pattern.n, self.pattern.m)
    }

    fn prepare(&self, e: &Entry) -> Result<()> {
        match &self.scores {
            Some(sc) => sc.for_tensor(e).map(|_| ()),
            None => Ok(()),
        }
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let t = srcs[0].tensor()?;
        let x = self
            .scores
            .as_ref()
            .map(|sc| sc.for_tensor(srcs[0].entry))
            .transpose()?;
        Ok(float_out(select::prune_pattern(
            dev,
            &t,
            self.pattern,
            self.keep_tail,
            x.as_deref(),
        )?))
    }
}

/// How `quantize` rounds.
#[derive(Clone, Copy, Debug)]
pub enum QuantScheme {
    /// q = round(w·Q)
    Round(f32),
    AbsMax(Granularity),
}

impl QuantScheme {
    fn name(self) -> &'static str {
        match self {
            QuantScheme::Round(_) => "round",
            QuantScheme::AbsMax(Granularity::PerRow) => "absmax-per-row",
            QuantScheme::AbsMax(Granularity::PerTensor) => "absmax-per-tensor",
        }
    }
}

pub struct Quantize {
    pub scheme: QuantScheme,
    /// Write the round trip in the input's dtype instead of int8 + scales.
    pub dequantize: bool,
}

fn scale_name(name: &str) -> String {
    format!("{name}_scale")
}

impl Quantize {
    fn quantize(
        &self,
        dev: &Device,
        t: &crate::tensor::TensorRef,
    ) -> Result<(QTensor, quantize::QuantStats)> {
        match self.scheme {
            QuantScheme::Round(q) => quantize::quantize_round(dev, t, q),
            QuantScheme::AbsMax(g) => quantize::quantize_absmax(dev, t, g),
        }
    }
}

impl TensorOp for Quantize {
    fn describe(&self) -> String {
        match self.scheme {
            QuantScheme::Round(q) => format!("int8 round(w·{q})"),
            s => format!("int8 {}", s.name()),
        }
    }

    fn outputs(&self, e: &Entry) -> Result<Vec<OutEntry>> {
        if self.dequantize {
            return Ok(vec![OutEntry {
                name: e.name.clone(),
                dtype: e.dtype.clone(),
                shape: e.shape.clone(),
            }]);
        }
        let scale_shape = match self.scheme {
            QuantScheme::AbsMax(Granularity::PerRow) => vec![matrix_view(&e.shape).0, 1],
            _ => vec![1],
        };
        Ok(vec![
            OutEntry {
                name: e.name.clone(),
                dtype: "I8".into(),
                shape: e.shape.clone(),
            },
            OutEntry {
                name: scale_name(&e.name),
                dtype: "F32".into(),
                shape: scale_shape,
            },
        ])
    }

    fn shard_metadata(&self, input: Option<&Metadata>, touched: &[&Entry]) -> Option<Metadata> {
        if self.dequantize || touched.is_empty() {
            return input.cloned();
        }
        let mut meta = input.cloned().unwrap_or_default();
        let mut tensors = Map::new();
        for e in touched {
            tensors.insert(
                e.name.clone(),
                json!({"scheme": self.scheme.name(), "dtype": e.dtype, "scale": scale_name(&e.name)}),
            );
        }
        let desc = json!({"version": 1, "tensors": tensors});
        meta.insert(QUANT_KEY.into(), Value::String(desc.to_string()));
        Some(meta)
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let t = srcs[0].tensor()?;
        let (q, st) = self.quantize(dev, &t)?;
        let back = quantize::dequantize(dev, &q, t.dtype)?;
        let note =
            (st.clipped + st.nan > 0).then(|| format!("{} clipped, {} NaN", st.clipped, st.nan));
        if self.dequantize {
            let mut a = float_out(back);
            a.note = note;
            return Ok(a);
        }
        Ok(Applied {
            outputs: vec![
                bytemuck::cast_slice(&q.q).to_vec(),
                bytemuck::cast_slice(&q.scales).to_vec(),
            ],
            approx: Some(back),
            note,
        })
    }
}

/// What the metadata says of one quantized tensor.
#[derive(Clone, Debug)]
struct QuantInfo {
    dtype: DType,
    scale: String,
}

/// `dequantize`: int8 tensors written by `quantize` back to their dtype.
pub struct Dequantize {
    quantized: HashMap<String, QuantInfo>,
    scales: HashMap<String, String>,
}

impl Dequantize {
    /// Reads the quantization metadata of every shard of `model`.
    pub fn new(model: &Model) -> Result<Dequantize> {
        let mut quantized = HashMap::new();
        let mut scales = HashMap::new();
        for shard in &model.shards {
            let Some(Value::String(desc)) = shard.metadata.as_ref().and_then(|m| m.get(QUANT_KEY))
            else {
                continue;
            };
            let bad = |why: String| Error::Format {
                file: shard.path.display().to_string(),
                tensor: "-".into(),
                why: format!("{QUANT_KEY}: {why}"),
            };
            let v: Value = serde_json::from_str(desc).map_err(|e| bad(e.to_string()))?;
            let Some(Value::Object(ts)) = v.get("tensors") else {
                return Err(bad("no tensors".into()));
            };
            for (name, info) in ts {
                let dtype = info
                    .get("dtype")
                    .and_then(Value::as_str)
                    .and_then(DType::parse)
                    .filter(|d| d.is_kernel_float())
                    .ok_or_else(|| bad(format!("{name}: no float dtype")))?;
                let scale = info
                    .get("scale")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad(format!("{name}: no scale")))?
                    .to_string();
                scales.insert(scale.clone(), name.clone());
                quantized.insert(name.clone(), QuantInfo { dtype, scale });
            }
        }
        if quantized.is_empty() {
            return Err(Error::input(format!(
                "{}: no tensors quantized by modelpress (no {QUANT_KEY} metadata)",
                model.path.display()
            )));
        }
        Ok(Dequantize { quantized, scales })
    }
}

impl TensorOp for Dequantize {
    fn describe(&self) -> String {
        "dequantize int8".into()
    }

    fn default_select(&self, e: &Entry) -> bool {
        self.quantized.contains_key(&e.name) || self.scales.contains_key(&e.name)
    }

    fn outputs(&self, e: &Entry) -> Result<Vec<OutEntry>> {
        Ok(match self.quantized.get(&e.name) {
            Some(info) => vec![OutEntry {
                name: e.name.clone(),
                dtype: info.dtype.name().into(),
                shape: e.shape.clone(),
            }],
            None => vec![], // a scale: consumed
        })
    }

    fn shard_metadata(&self, input: Option<&Metadata>, _: &[&Entry]) -> Option<Metadata> {
        let mut m = input.cloned()?;
        m.remove(QUANT_KEY);
        Some(m)
    }

    fn apply(&self, dev: &Device, srcs: &[Src], models: &[Model]) -> Result<Applied> {
        let e = srcs[0].entry;
        let Some(info) = self.quantized.get(&e.name) else {
            return Ok(Applied {
                outputs: vec![],
                approx: None,
                note: Some("scale consumed".into()),
            });
        };
        if e.dtype != "I8" {
            return Err(Error::input(format!(
                "quantized tensor is {}, expected I8",
                e.dtype
            )));
        }
        let Some((sf, se)) = models[0].find(&info.scale) else {
            return Err(Error::input(format!(
                "its scale tensor '{}' is missing",
                info.scale
            )));
        };
        if se.dtype != "F32" {
            return Err(Error::input(format!(
                "scale '{}' is {}, expected F32",
                info.scale, se.dtype
            )));
        }
        let scales: Vec<f32> = sf
            .data(se)
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        // Per-row scales are stored as [rows, 1], a per-tensor scale as [1].
        let q = QTensor {
            shape: e.shape.clone(),
            q: bytemuck::cast_slice(srcs[0].data()).to_vec(),
            per_row: se.shape.len() == 2,
            scales,
        };
        q.check()?;
        let out = quantize::dequantize(dev, &q, info.dtype)?;
        Ok(Applied {
            outputs: vec![out.data],
            approx: None,
            note: None,
        })
    }
}

/// `transfer`: w + λ·Δ with Δ the same tensor of a second model, or a
/// scalar offset; `delta` is FINETUNED + (-1)·BASE.
pub struct Transfer {
    pub lambda: f32,
    pub offset: Option<f32>,
}

impl TensorOp for Transfer {
    fn describe(&self) -> String {
        match self.offset {
            Some(x) => format!("w + {}·{x}", self.lambda),
            None => format!("w + {}·Δ", self.lambda),
        }
    }

    fn mixed_dtypes(&self) -> bool {
        true
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let w = srcs[0].tensor()?;
        let delta = match self.offset {
            Some(x) => transfer::Delta::Scalar(x),
            None => transfer::Delta::Tensor(srcs[1].tensor()?),
        };
        let out = transfer::transfer(dev, &w, delta, self.lambda)?;
        let mut a = float_out(out);
        if self.offset.is_none() {
            // The change is the point; report it, not as an error.
            a.note = Some("max_abs_err/rmse measure the change applied".into());
        }
        Ok(a)
    }
}

/// `mix`: Σ pᵢ·wᵢ over the models.
pub struct Mix {
    pub weights: Vec<f32>,
}

impl TensorOp for Mix {
    fn describe(&self) -> String {
        let w: Vec<String> = self.weights.iter().map(|w| w.to_string()).collect();
        format!("mix [{}]", w.join(", "))
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let ts = srcs
            .iter()
            .map(|s| s.tensor())
            .collect::<Result<Vec<_>>>()?;
        let out = mix::mix(dev, &ts, &self.weights)?;
        let mut a = float_out(out);
        a.note = Some("max_abs_err/rmse are against the first model".into());
        Ok(a)
    }
}
