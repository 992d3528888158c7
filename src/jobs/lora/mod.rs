//! `lora merge`: PEFT LoRA adapters folded into their base model,
//! W ← W + Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ on the device (`ops::matmul`), summed in f32 and
//! rounded once into the model's dtype (PEFT's Linear merge; its embedding
//! merge rounds ΔW first, which we do not copy). rsLoRA, rank and alpha
//! patterns, `fan_in_fan_out`, embeddings, `lora_bias`, DoRA and
//! `modules_to_save` follow PEFT (../shared/reference/pruning_merging.md §4);
//! `--unmerge` subtracts (DoRA and replaced modules cannot be undone).

mod adapter;
mod extract;

pub use adapter::{Adapter, Layer};
pub use extract::{extract, ExtractOptions, ModuleExtract};

use super::op::{Applied, Src, TensorOp};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::Entry;
use crate::ops::matmul::matmul;
use crate::ops::quantize::convert;
use crate::tensor::{DType, Tensor, TensorRef};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// What an adapter does to one base tensor.
#[derive(Clone, Debug)]
enum Change {
    /// W ± w·s·ΔW of module (path).
    Delta(String),
    /// b ± w·s·lora_B.bias of module (path).
    Bias(String),
    /// Replaced by the adapter's tensor (`modules_to_save`).
    Full(String),
}

/// The `lora merge` job.
pub struct LoraMerge {
    adapters: Vec<Adapter>,
    weights: Vec<f32>,
    unmerge: bool,
    /// Base tensor → (adapter, change), in adapter order.
    plan: BTreeMap<String, Vec<(usize, Change)>>,
}

impl LoraMerge {
    /// Plans merging `adapters` (with `weights`, 1 each when empty) into
    /// `model`, or subtracting them with `unmerge`; every module is checked
    /// against the base before anything is written.
    pub fn new(
        model: &Model,
        adapters: Vec<Adapter>,
        weights: Vec<f32>,
        unmerge: bool,
    ) -> Result<LoraMerge> {
        let weights = if weights.is_empty() {
            vec![1.0; adapters.len()]
        } else {
            weights
        };
        if weights.len() != adapters.len() {
            return Err(Error::input(format!(
                "{} weights for {} adapters",
                weights.len(),
                adapters.len()
            )));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(Error::input(format!("--weights: {w} is not finite")));
        }
        let mut plan: BTreeMap<String, Vec<(usize, Change)>> = BTreeMap::new();
        for (i, ad) in adapters.iter().enumerate() {
            let bad = |why: String| Error::input(format!("adapter {}: {why}", ad.dir.display()));
            if ad.dora && unmerge {
                return Err(bad(
                    "DoRA cannot be unmerged: merged weights no longer hold the norms it divided by"
                        .into(),
                ));
            }
            if ad.dora && weights[i] != 1.0 {
                return Err(bad("DoRA adapters merge with weight 1 only".into()));
            }
            for (m, md) in &ad.modules {
                let name = format!("{m}.weight");
                let Some((_, e)) = model.find(&name) else {
                    return Err(bad(format!("module '{m}' is not in the base model")));
                };
                check_shapes(ad, m, md, e).map_err(bad)?;
                plan.entry(name)
                    .or_default()
                    .push((i, Change::Delta(m.clone())));
                if md.bias.is_some() {
                    let bias = format!("{m}.bias");
                    if model.find(&bias).is_none() {
                        return Err(bad(format!(
                            "module '{m}' has lora_B.bias but the base has no bias"
                        )));
                    }
                    plan.entry(bias)
                        .or_default()
                        .push((i, Change::Bias(m.clone())));
                }
            }
            for (base, t) in &ad.full {
                if unmerge {
                    return Err(bad(format!(
                        "'{base}' is replaced whole (modules_to_save): it cannot be unmerged"
                    )));
                }
                let Some((_, e)) = model.find(base) else {
                    return Err(bad(format!(
                        "tensor '{base}' (modules_to_save) is not in the base model"
                    )));
                };
                let te = ad.entry(t)?;
                if te.shape != e.shape || te.kernel_dtype().is_none() {
                    return Err(bad(format!(
                        "'{base}' is {} {:?} in the adapter, {} {:?} in the base",
                        te.dtype, te.shape, e.dtype, e.shape
                    )));
                }
                plan.entry(base.clone())
                    .or_default()
                    .push((i, Change::Full(t.clone())));
            }
        }
        Ok(LoraMerge {
            adapters,
            weights,
            unmerge,
            plan,
        })
    }

    fn factor(&self, i: usize, name: &str) -> Result<TensorRef<'_>> {
        let ad = &self.adapters[i];
        let e = ad.entry(name)?;
        ad.file
            .tensor(e)
            .ok_or_else(|| Error::input(format!("adapter tensor '{name}' is not a float tensor")))
    }
}

fn check_shapes(
    ad: &Adapter,
    m: &str,
    md: &adapter::Module,
    e: &Entry,
) -> std::result::Result<(), String> {
    let shape = |n: &str| ad.file.find(n).map(|e| e.shape.clone()).unwrap_or_default();
    let (a, b) = (shape(&md.a), shape(&md.b));
    let w = &e.shape;
    if w.len() != 2 || e.kernel_dtype().is_none() {
        return Err(format!(
            "module '{m}': the base weight is {} {w:?}, not a float matrix",
            e.dtype
        ));
    }
    let (rows, cols) = match (md.layer, ad.fan_in_fan_out) {
        // ΔW = B·A is [B rows, A cols]; transposed for Conv1D and embeddings.
        (Layer::Linear, false) => (b[0], a[1]),
        _ => (a[1], b[0]),
    };
    if (rows, cols) != (w[0], w[1]) {
        return Err(format!(
            "module '{m}': lora_B {b:?} · lora_A {a:?} does not fit the base weight {w:?}"
        ));
    }
    if let Some(mag) = &md.magnitude {
        if md.layer != Layer::Linear || ad.fan_in_fan_out {
            return Err(format!(
                "module '{m}': DoRA is merged for Linear layers only"
            ));
        }
        if shape(mag) != [w[0]] {
            return Err(format!(
                "module '{m}': magnitude {:?}, expected [{}]",
                shape(mag),
                w[0]
            ));
        }
    }
    if let Some(base) = &md.base_layer {
        if &shape(base) != w {
            return Err(format!(
                "module '{m}': base_layer.weight {:?}, the base has {w:?}",
                shape(base)
            ));
        }
    }
    Ok(())
}

/// `t` transposed, in f32 (adapter factors: small).
fn transposed(t: &TensorRef) -> Result<Tensor> {
    let (r, c) = (t.shape[0], t.shape[1]);
    let v = t.to_f32_vec();
    let mut out = vec![0f32; r * c];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = v[i * c + j];
        }
    }
    Tensor::from_f32(DType::F32, &[c, r], &out)
}

impl TensorOp for LoraMerge {
    fn describe(&self) -> String {
        format!(
            "lora {} of {} adapter{}",
            if self.unmerge { "unmerge" } else { "merge" },
            self.adapters.len(),
            if self.adapters.len() == 1 { "" } else { "s" }
        )
    }

    fn default_select(&self, e: &Entry) -> bool {
        self.plan.contains_key(&e.name)
    }

    fn input_paths(&self) -> Vec<PathBuf> {
        self.adapters
            .iter()
            .flat_map(|a| {
                [
                    a.dir.join("adapter_model.safetensors"),
                    a.dir.join("adapter_config.json"),
                ]
            })
            .collect()
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let e = srcs[0].entry;
        let base = srcs[0].tensor()?;
        let out_dtype = base.dtype;
        let changes = &self.plan[&e.name];
        let sign = if self.unmerge { -1.0 } else { 1.0 };
        // The running value: the base (or what replaced it), then f32 sums.
        let mut cur: Option<Tensor> = None;
        for (k, (i, change)) in changes.iter().enumerate() {
            let last = k + 1 == changes.len();
            let ad = &self.adapters[*i];
            let w = sign * self.weights[*i] as f64;
            let next = match change {
                Change::Full(t) => {
                    let t = self.factor(*i, t)?;
                    convert(dev, &t, if last { out_dtype } else { DType::F32 })?
                }
                Change::Bias(m) => {
                    let md = &ad.modules[m];
                    let lb = self.factor(*i, md.bias.as_deref().unwrap_or_default())?;
                    let c = cur.as_ref().map_or(base, |t| t.view());
                    let (x, d) = (c.to_f32_vec(), lb.to_f32_vec());
                    let s = (w * md.scale) as f32;
                    let y: Vec<f32> = x.iter().zip(&d).map(|(x, d)| x + s * d).collect();
                    Tensor::from_f32(if last { out_dtype } else { DType::F32 }, &[y.len()], &y)?
                }
                Change::Delta(m) => {
                    let md = &ad.modules[m];
                    let (a, b) = (self.factor(*i, &md.a)?, self.factor(*i, &md.b)?);
                    let (p, q) = match (md.layer, ad.fan_in_fan_out) {
                        (Layer::Linear, false) => (None, None),
                        _ => (Some(transposed(&a)?), Some(transposed(&b)?)),
                    };
                    let (p, q) = match (&p, &q) {
                        (Some(at), Some(bt)) => (at.view(), bt.view()),
                        _ => (b, a),
                    };
                    let base_layer = match &md.base_layer {
                        Some(n) if cur.is_none() => Some(self.factor(*i, n)?),
                        _ => None,
                    };
                    let c = match (&cur, base_layer) {
                        (Some(t), _) => t.view(),
                        (None, Some(b)) => b,
                        (None, None) => base,
                    };
                    let alpha = (w * md.scale) as f32;
                    match &md.magnitude {
                        None => matmul(
                            dev,
                            &p,
                            &q,
                            alpha,
                            Some(&c),
                            if last { out_dtype } else { DType::F32 },
                        )?,
                        Some(mag) => {
                            let v = matmul(dev, &p, &q, alpha, Some(&c), DType::F32)?;
                            dora(
                                &v,
                                &self.factor(*i, mag)?,
                                if last { out_dtype } else { DType::F32 },
                            )?
                        }
                    }
                }
            };
            cur = Some(next);
        }
        let Some(out) = cur else {
            return Err(Error::input(format!("no change planned for '{}'", e.name)));
        };
        Ok(Applied::float(out))
    }
}

/// DoRA: each row of V = W + s·B·A scaled to its magnitude m / ‖row‖₂
/// (norms summed in f64 from the f32 values), rounded to `out`.
fn dora(v: &Tensor, magnitude: &TensorRef, out: DType) -> Result<Tensor> {
    let (rows, cols) = (v.shape[0], v.shape[1]);
    let m = magnitude.to_f32_vec();
    let mut y = v.to_f32_vec();
    for (r, row) in y.chunks_mut(cols.max(1)).enumerate().take(rows) {
        let norm = row.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt() as f32;
        let f = m[r] / norm;
        for x in row.iter_mut() {
            *x *= f;
        }
    }
    Tensor::from_f32(out, &[rows, cols], &y)
}
