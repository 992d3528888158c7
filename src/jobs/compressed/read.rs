//! Reading compressed-tensors checkpoints back: which scheme config.json's
//! `quantization_config` describes, which tensors hold each quantized
//! module, and the `dequantize` job that restores `P.weight` in its dtype.

use super::Format;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, OutEntry, SafetensorsFile};
use crate::jobs::op::{Applied, Src, TensorOp};
use crate::ops::ct::{self, reference::GroupParams, Kind, Spec, Strategy};
use crate::tensor::DType;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Tensors a quantized module `P` may hold besides its codes.
const PARTS: [&str; 5] = [
    "weight_scale",
    "weight_shape",
    "weight_zero_point",
    "weight_global_scale",
    "weight_g_idx",
];

/// A compressed-tensors checkpoint, as config.json describes it.
pub struct Checkpoint {
    spec: Spec,
    format: Format,
    /// The dtype of restored weights whose scales do not carry it (FP4):
    /// config.json's `torch_dtype` (or `dtype`), else bfloat16.
    float_dtype: DType,
    /// The quantized layers by module path: the restored weight's dtype
    /// and (rows, cols).
    modules: BTreeMap<String, (DType, (usize, usize))>,
    /// "pack-quantized, int 4-bit group 128 symmetric", for messages.
    pub summary: String,
}

impl Checkpoint {
    /// The checkpoint `model` is, or None when its config.json has no
    /// compressed-tensors `quantization_config`; an error when it has one
    /// modelpress cannot read.
    pub fn open(model: &Model) -> Result<Option<Checkpoint>> {
        let Some(cfg) = model.config().ok().flatten() else {
            return Ok(None);
        };
        let Some(q) = cfg.get("quantization_config") else {
            return Ok(None);
        };
        if q.get("quant_method").and_then(Value::as_str) != Some("compressed-tensors") {
            return Ok(None);
        }
        let bad = |why: String| {
            Error::input(format!(
                "{}: quantization_config: {why}",
                model.path.join("config.json").display()
            ))
        };
        let groups = q
            .get("config_groups")
            .and_then(Value::as_object)
            .filter(|g| !g.is_empty())
            .ok_or_else(|| bad("no config_groups".into()))?;
        let first = groups.values().next().and_then(|g| g.get("weights"));
        if groups.values().any(|g| g.get("weights") != first) {
            return Err(bad(
                "config groups with different weight schemes are not supported".into(),
            ));
        }
        let w = first
            .and_then(Value::as_object)
            .ok_or_else(|| bad("no weights in config_groups".into()))?;
        let format = groups
            .values()
            .next()
            .and_then(|g| g.get("format"))
            .and_then(Value::as_str)
            .or_else(|| q.get("format").and_then(Value::as_str))
            .unwrap_or("");
        let format = match format {
            "pack-quantized" => Format::PackQuantized,
            "int-quantized" | "naive-quantized" => Format::IntQuantized,
            "float-quantized" => Format::FloatQuantized,
            "nvfp4-pack-quantized" => Format::Nvfp4Pack,
            "mxfp4-pack-quantized" => Format::Mxfp4Pack,
            other => return Err(bad(format!("format '{other}' is not supported"))),
        };
        let num = |k: &str| w.get(k).and_then(Value::as_u64);
        let bits = num("num_bits").unwrap_or(0) as u32;
        let symmetric = w.get("symmetric").and_then(Value::as_bool).unwrap_or(true);
        let ty = w.get("type").and_then(Value::as_str).unwrap_or("");
        let strategy_name = w.get("strategy").and_then(Value::as_str).unwrap_or("");
        if !matches!(w.get("actorder"), None | Some(Value::Null))
            && w.get("actorder").and_then(Value::as_str) != Some("static")
        {
            return Err(bad(
                "activation ordering (weight_g_idx) is not supported".into()
            ));
        }
        let kind = match (ty, bits, format) {
            ("int", 4 | 8, Format::PackQuantized) => Kind::Int { bits, symmetric },
            ("int", 8, Format::IntQuantized) if symmetric => Kind::Int { bits, symmetric },
            ("float", 8, Format::FloatQuantized) if symmetric => Kind::Fp8,
            ("float", 4, Format::Nvfp4Pack) => Kind::Nvfp4,
            ("float", 4, Format::Mxfp4Pack) => Kind::Mxfp4,
            _ => {
                return Err(bad(format!(
                    "{ty} {bits}-bit{} weights in {} are not supported",
                    if symmetric { "" } else { " asymmetric" },
                    format.name()
                )))
            }
        };
        let strategy = match strategy_name {
            "channel" => Strategy::Channel,
            "group" | "tensor_group" => Strategy::Group(
                num("group_size")
                    .filter(|&g| g > 0)
                    .ok_or_else(|| bad("group strategy without group_size".into()))?
                    as usize,
            ),
            "block" => match w.get("block_structure").and_then(Value::as_array) {
                Some(b) if b.len() == 2 && b[0] == b[1] && b[0].as_u64().is_some_and(|v| v > 0) => {
                    Strategy::Block(b[0].as_u64().unwrap_or(128) as usize)
                }
                _ => return Err(bad("only square block structures are supported".into())),
            },
            other => return Err(bad(format!("strategy '{other}' is not supported"))),
        };
        let float_dtype = ["torch_dtype", "dtype"]
            .iter()
            .find_map(|k| cfg.get(*k).and_then(Value::as_str))
            .and_then(|s| match s {
                "float32" => Some(DType::F32),
                "float16" => Some(DType::F16),
                "bfloat16" => Some(DType::BF16),
                _ => None,
            })
            .unwrap_or(DType::BF16);
        let names: BTreeSet<String> = model
            .entries()
            .filter_map(|(_, e)| e.name.strip_suffix(".weight_scale"))
            .map(str::to_string)
            .collect();
        if names.is_empty() {
            return Err(bad("no tensor has a weight_scale".into()));
        }
        let mut ck = Checkpoint {
            summary: format!(
                "{}, {ty} {bits}-bit {strategy_name}{}{}",
                format.name(),
                match strategy {
                    Strategy::Group(g) => format!(" {g}"),
                    Strategy::Block(b) => format!(" {b}x{b}"),
                    Strategy::Channel => String::new(),
                },
                if symmetric { "" } else { " asymmetric" }
            ),
            spec: Spec { kind, strategy },
            format,
            float_dtype,
            modules: BTreeMap::new(),
        };
        // Every module checked before anything is written.
        for p in names {
            let l = ck.layout(model, &p)?;
            ck.modules.insert(p, (l.dtype, (l.rows, l.cols)));
        }
        Ok(Some(ck))
    }

    /// Quantized modules: module path -> restored dtype and (rows, cols).
    pub fn modules(&self) -> &BTreeMap<String, (DType, (usize, usize))> {
        &self.modules
    }

    /// The module whose codes tensor `name` is.
    pub fn codes_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        self.part(name).filter(|&(_, codes)| codes).map(|(p, _)| p)
    }

    /// The module a tensor belongs to and whether it holds the codes.
    fn part<'a>(&self, name: &'a str) -> Option<(&'a str, bool)> {
        let (p, suffix) = name.rsplit_once('.')?;
        if !self.modules.contains_key(p) {
            return None;
        }
        match suffix {
            "weight_packed" | "weight" => Some((p, true)),
            s if PARTS.contains(&s) => Some((p, false)),
            _ => None,
        }
    }

    /// Module `p`'s weight restored: its dtype, shape and bytes.
    pub fn dequantize(&self, model: &Model, p: &str) -> Result<(DType, Vec<usize>, Vec<u8>)> {
        let l = self.layout(model, p)?;
        let out = ct::dequantize(
            &self.spec,
            l.packing,
            (l.rows, l.cols),
            l.codes,
            &l.groups,
            l.dtype,
        )?;
        Ok((l.dtype, vec![l.rows, l.cols], out))
    }

    /// Module `p`'s tensors, checked against each other and the scheme.
    fn layout<'m>(&self, model: &'m Model, p: &str) -> Result<Layout<'m>> {
        let get = |suffix: &str| model.find(&format!("{p}.{suffix}"));
        let need = |suffix: &str| {
            get(suffix)
                .ok_or_else(|| Error::input(format!("quantized module '{p}' has no {suffix}")))
        };
        let bad = |what: &str, e: &Entry| {
            Error::input(format!(
                "'{}' is {} {:?}, which does not fit {} ({what})",
                e.name, e.dtype, e.shape, self.summary
            ))
        };
        if get("weight_g_idx").is_some() {
            return Err(Error::input(format!(
                "'{p}.weight_g_idx': activation ordering is not supported"
            )));
        }
        let packed = matches!(
            self.format,
            Format::PackQuantized | Format::Nvfp4Pack | Format::Mxfp4Pack
        );
        let (cf, ce) = need(if packed { "weight_packed" } else { "weight" })?;
        let (rows, cols) = match self.format {
            Format::PackQuantized => {
                let (sf, se) = need("weight_shape")?;
                let d = sf.data(se);
                if se.dtype != "I64" || d.len() != 16 {
                    return Err(bad("expected I64 [2]", se));
                }
                let v =
                    |i: usize| i64::from_le_bytes(d[8 * i..8 * i + 8].try_into().unwrap_or([0; 8]));
                let (r, c) = (v(0), v(1));
                if r < 0 || c < 0 || ce.shape.len() != 2 || ce.shape[0] as i64 != r {
                    return Err(bad("rows disagree with the codes", se));
                }
                (r as usize, c as usize)
            }
            Format::Nvfp4Pack | Format::Mxfp4Pack if ce.shape.len() == 2 => {
                (ce.shape[0], ce.shape[1] * 2)
            }
            _ if ce.shape.len() == 2 => (ce.shape[0], ce.shape[1]),
            _ => return Err(bad("expected a matrix", ce)),
        };
        let want_codes = match self.format {
            Format::PackQuantized => "I32",
            Format::IntQuantized => "I8",
            Format::FloatQuantized => "F8_E4M3",
            _ => "U8",
        };
        let packing = self.format.packing(&self.spec, cols);
        if ce.dtype != want_codes || cf.data(ce).len() * 8 != rows * packing.row_stride_bits {
            return Err(bad(&format!("expected {want_codes} codes"), ce));
        }
        let (sf, se) = need("weight_scale")?;
        let (grid_r, grid_c) = self.spec.group_grid(rows, cols);
        let dtype = match self.spec.kind {
            Kind::Nvfp4 | Kind::Mxfp4 => self.float_dtype,
            _ => DType::parse(&se.dtype)
                .filter(|d| d.is_kernel_float())
                .ok_or_else(|| bad("expected a float scale", se))?,
        };
        let scale_dtype = match self.spec.kind {
            Kind::Nvfp4 => "F8_E4M3",
            Kind::Mxfp4 => "U8",
            _ => se.dtype.as_str(),
        };
        if se.dtype != scale_dtype || se.shape.iter().product::<usize>() != grid_r * grid_c {
            return Err(bad(&format!("expected {grid_r}×{grid_c} scales"), se));
        }
        let scales = sf.data(se);
        let es = if matches!(self.spec.kind, Kind::Nvfp4 | Kind::Mxfp4) {
            1
        } else {
            dtype.size()
        };
        let gs = match self.spec.kind {
            Kind::Nvfp4 => {
                let (gf, ge) = need("weight_global_scale")?;
                let d = gf.data(ge);
                if ge.dtype != "F32" || d.len() != 4 {
                    return Err(bad("expected F32 [1]", ge));
                }
                f32::from_le_bytes([d[0], d[1], d[2], d[3]])
            }
            _ => 1.0,
        };
        let zps = zero_points(&self.spec, get("weight_zero_point"), rows, grid_c, &bad)?;
        let groups: Vec<GroupParams> = (0..grid_r * grid_c)
            .map(|i| {
                let mut raw = [0u8; 4];
                raw[..es].copy_from_slice(&scales[i * es..(i + 1) * es]);
                let mut p = GroupParams {
                    scale_raw: u32::from_le_bytes(raw),
                    zp: zps.as_ref().map_or(0, |z| z[i]),
                    div: 0.0,
                };
                p.div = ct::divisor(&self.spec, dtype, &p, gs);
                p
            })
            .collect();
        Ok(Layout {
            dtype,
            rows,
            cols,
            packing,
            codes: cf.data(ce),
            groups,
        })
    }
}

/// A quantized module's tensors, read.
struct Layout<'m> {
    dtype: DType,
    rows: usize,
    cols: usize,
    packing: ct::Packing,
    codes: &'m [u8],
    groups: Vec<GroupParams>,
}

/// Asymmetric int zero points, unpacked from int32 words along the rows
/// (rows × groups, row-major).
fn zero_points(
    spec: &Spec,
    found: Option<(&SafetensorsFile, &Entry)>,
    rows: usize,
    grid_c: usize,
    bad: &dyn Fn(&str, &Entry) -> Error,
) -> Result<Option<Vec<i32>>> {
    let Kind::Int {
        bits,
        symmetric: false,
    } = spec.kind
    else {
        return Ok(None);
    };
    let Some((f, e)) = found else {
        return Err(Error::input("asymmetric weights without weight_zero_point"));
    };
    let words = (rows * bits as usize).div_ceil(32);
    let d = f.data(e);
    if e.dtype != "I32" || d.len() != words * grid_c * 4 {
        return Err(bad(&format!("expected I32 [{words}, {grid_c}]"), e));
    }
    let mut z = vec![0i32; rows * grid_c];
    for r in 0..rows {
        for g in 0..grid_c {
            let bit = r * bits as usize;
            let w = (bit / 32) * grid_c + g;
            let word = u32::from_le_bytes([d[4 * w], d[4 * w + 1], d[4 * w + 2], d[4 * w + 3]]);
            let u = (word >> (bit % 32)) & ((1 << bits) - 1);
            z[r * grid_c + g] = u as i32 - (1 << (bits - 1));
        }
    }
    Ok(Some(z))
}

/// `dequantize` of a compressed-tensors checkpoint: each quantized module's
/// tensors become `P.weight` in its dtype again, and config.json loses its
/// `quantization_config`.
pub struct CtDequantize(pub Checkpoint);

impl TensorOp for CtDequantize {
    fn describe(&self) -> String {
        format!("dequantize compressed-tensors ({})", self.0.summary)
    }

    fn default_select(&self, e: &Entry) -> bool {
        self.0.part(&e.name).is_some()
    }

    fn outputs(&self, e: &Entry) -> Result<Vec<OutEntry>> {
        Ok(match self.0.part(&e.name) {
            Some((p, true)) => {
                let (dtype, (rows, cols)) = self.0.modules[p];
                vec![OutEntry {
                    name: format!("{p}.weight"),
                    dtype: dtype.name().into(),
                    shape: vec![rows, cols],
                }]
            }
            _ => vec![],
        })
    }

    fn rewrite_file(&self, name: &str, bytes: &[u8]) -> Result<Option<Vec<u8>>> {
        if name != "config.json" {
            return Ok(None);
        }
        crate::jobs::op::edit_config(bytes, |cfg| {
            cfg.remove("quantization_config");
            Ok(())
        })
        .map(Some)
    }

    fn apply(&self, _: &Device, srcs: &[Src], models: &[Model]) -> Result<Applied> {
        match self.0.part(&srcs[0].entry.name) {
            Some((p, true)) => {
                let (_, _, bytes) = self.0.dequantize(&models[0], p)?;
                Ok(Applied {
                    outputs: vec![bytes],
                    approx: None,
                    diff: None,
                    note: None,
                })
            }
            _ => Ok(Applied {
                outputs: vec![],
                approx: None,
                diff: None,
                note: Some("consumed".into()),
            }),
        }
    }
}
