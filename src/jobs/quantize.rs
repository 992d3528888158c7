//! int8 jobs: `quantize --int8` / `--scale` and `dequantize`.
//!
//! int8 storage: a quantized tensor NAME is stored as NAME in I8 with its
//! shape, and NAME_scale in F32 of shape `[rows, 1]` (per row) or `[1]` (per
//! tensor), so that w ≈ NAME · NAME_scale (broadcast over each row). The
//! file's `__metadata__` key `modelpress.quantization` holds a JSON string:
//! `{"version": 1, "tensors": {NAME: {"scheme": "absmax-per-row" |
//! "absmax-per-tensor" | "round", "dtype": "BF16", "scale": "NAME_scale"}}}`.

use super::pipeline::{Applied, Src, TensorOp};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, Metadata, OutEntry};
use crate::ops::quantize::{self, Granularity};
use crate::tensor::{matrix_view, DType, QTensor};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// The `__metadata__` key of int8 storage.
pub const QUANT_KEY: &str = "modelpress.quantization";

/// How `quantize` rounds.
#[derive(Clone, Copy, Debug)]
pub enum QuantScheme {
    /// q = round(w·Q)
    Round(f32),
    /// Symmetric abs-max scales, per tensor or per row.
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

/// `quantize --int8` / `--scale`: int8 values with F32 scales (see the
/// module doc), or with `dequantize` the round trip in the input dtype.
pub struct Quantize {
    /// How values round.
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
        let note =
            (st.clipped + st.nan > 0).then(|| format!("{} clipped, {} NaN", st.clipped, st.nan));
        if self.dequantize {
            let back = quantize::dequantize(dev, &q, t.dtype)?;
            let mut a = Applied::with_diff(back, st.diff);
            a.note = note;
            return Ok(a);
        }
        Ok(Applied {
            outputs: vec![
                bytemuck::cast_slice(&q.q).to_vec(),
                bytemuck::cast_slice(&q.scales).to_vec(),
            ],
            approx: None,
            diff: Some(st.diff),
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
                tensor: None,
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
                diff: None,
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
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        // Per-row scales are stored as [rows, 1], a per-tensor scale as [1].
        let q = QTensor {
            shape: e.shape.clone(),
            q: bytemuck::cast_slice(srcs[0].data()).to_vec(),
            granularity: if se.shape.len() == 2 {
                Granularity::PerRow
            } else {
                Granularity::PerTensor
            },
            scales,
        };
        q.check()?;
        let out = quantize::dequantize(dev, &q, info.dtype)?;
        Ok(Applied {
            outputs: vec![out.data],
            approx: None,
            diff: None,
            note: None,
        })
    }
}
