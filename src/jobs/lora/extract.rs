//! `lora extract`: a fine-tune turned back into a PEFT LoRA adapter. Each
//! Linear layer's delta Δ = FINETUNED − BASE gets a truncated SVD by a
//! randomized range finder (Halko, Martinsson and Tropp: a Gaussian sketch
//! of R + 10 columns, two power iterations with re-orthonormalization), its
//! large products on the device (`ops::matmul`), the small factorizations
//! in f64 on the CPU (`ops::linalg`). The adapter keeps
//! lora_B = U_r·Σ_r and lora_A = V_rᵀ with lora_alpha = r (scale 1), so
//! B·A is the best rank-r approximation of Δ the sketch finds; ranks below
//! R (a delta of lower rank, or `--sv-epsilon`) go to `rank_pattern`.

use super::super::op::is_linear_weight;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::output::{self, Staged};
use crate::formats::plan::{self, OutputKind};
use crate::formats::safetensors::{OutEntry, SafetensorsWriter};
use crate::ops::linalg::{orth, sym_eig, Mat};
use crate::ops::matmul::matmul;
use crate::tensor::{DType, Tensor};
use serde::Serialize;
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// Oversampling of the sketch beyond the rank asked for.
const OVERSAMPLE: usize = 10;
/// Power iterations (each one a pass over Δ and Δᵀ).
const POWER_ITERATIONS: usize = 2;

/// What `lora extract` kept of one module.
#[derive(Clone, Debug, Serialize)]
pub struct ModuleExtract {
    /// Module path.
    pub module: String,
    /// Rank written.
    pub rank: usize,
    /// ‖B·A‖²_F / ‖Δ‖²_F: Σ of the kept σᵢ² over the delta's energy.
    pub energy_kept: f64,
    /// The largest singular value.
    pub sigma_max: f64,
    /// The first singular value dropped (0 when none).
    pub sigma_next: f64,
}

/// `lora extract`'s options.
pub struct ExtractOptions<'a> {
    /// Rank R.
    pub rank: usize,
    /// Singular values at or below this are dropped.
    pub sv_epsilon: f64,
    /// The adapter directory.
    pub output: &'a Path,
    /// JSON report path.
    pub report: Option<&'a Path>,
    /// Replace existing outputs.
    pub force: bool,
}

/// Extracts the adapter of `ft` over `base` (see the module doc).
pub fn extract(
    dev: &Device,
    ft: &Model,
    base: &Model,
    o: &ExtractOptions,
) -> Result<Vec<ModuleExtract>> {
    if o.rank == 0 {
        return Err(Error::input("--rank must be at least 1"));
    }
    if o.sv_epsilon.is_nan() || o.sv_epsilon < 0.0 {
        return Err(Error::input("--sv-epsilon must be ≥ 0"));
    }
    let mut inputs = ft.input_paths();
    inputs.extend(base.input_paths());
    let names = ["adapter_config.json", "README.md"]
        .map(String::from)
        .to_vec();
    let dests = plan::check_job(
        &inputs,
        o.output,
        OutputKind::Dir { names },
        o.report,
        o.force,
    )?;
    // The pairs, checked whole before any work.
    let mut work = Vec::new();
    for (_, e) in ft.entries().filter(|(_, e)| is_linear_weight(e)) {
        let Some((_, be)) = base.find(&e.name) else {
            return Err(Error::input(format!(
                "{}: '{}' is not in the base model",
                base.path.display(),
                e.name
            )));
        };
        if be.shape != e.shape {
            return Err(Error::input(format!(
                "'{}' is {:?} in the fine-tune, {:?} in the base",
                e.name, e.shape, be.shape
            )));
        }
        work.push(e.name.clone());
    }
    if work.is_empty() {
        return Err(Error::input(format!(
            "{}: no Linear layer (2-D `*.weight` other than embeddings)",
            ft.path.display()
        )));
    }
    let mut factors: Vec<(String, Tensor, Tensor)> = Vec::new();
    let mut report = Vec::new();
    for (k, name) in work.iter().enumerate() {
        let (ff, fe) = ft.find(name).ok_or_else(|| Error::input("vanished"))?;
        let (bf, be) = base.find(name).ok_or_else(|| Error::input("vanished"))?;
        let (x, y) = (
            ff.tensor(fe)
                .ok_or_else(|| Error::input(format!("'{name}' is not a float tensor")))?,
            bf.tensor(be)
                .ok_or_else(|| Error::input(format!("'{name}' is not a float tensor")))?,
        );
        let (xv, yv) = (x.to_f32_vec(), y.to_f32_vec());
        ff.release(fe);
        bf.release(be);
        if let Some(i) = xv.iter().zip(&yv).position(|(a, b)| !(a - b).is_finite()) {
            return Err(Error::input(format!(
                "'{name}': a non-finite difference at element {i}"
            )));
        }
        let delta: Vec<f32> = xv.iter().zip(&yv).map(|(a, b)| a - b).collect();
        let (m, n) = (x.shape[0], x.shape[1]);
        let module = name[..name.len() - ".weight".len()].to_string();
        let energy: f64 = delta.iter().map(|&d| d as f64 * d as f64).sum();
        if energy == 0.0 {
            report.push(ModuleExtract {
                module,
                rank: 0,
                energy_kept: 1.0,
                sigma_max: 0.0,
                sigma_next: 0.0,
            });
            continue;
        }
        let d = Tensor::from_f32(DType::F32, &[m, n], &delta)?;
        let svd = rsvd(dev, &d, o.rank, k as u64)?;
        let keep = svd
            .sigma
            .iter()
            .take(o.rank)
            .take_while(|&&s| s > o.sv_epsilon && s > 0.0)
            .count();
        let kept: f64 = svd.sigma[..keep].iter().map(|s| s * s).sum();
        report.push(ModuleExtract {
            module: module.clone(),
            rank: keep,
            energy_kept: (kept / energy).min(1.0),
            sigma_max: svd.sigma.first().copied().unwrap_or(0.0),
            sigma_next: svd.sigma.get(keep).copied().unwrap_or(0.0),
        });
        if keep == 0 {
            continue;
        }
        // lora_B = U_r·Σ_r (m × r), lora_A = V_rᵀ (r × n).
        let mut b = vec![0f32; m * keep];
        for i in 0..m {
            for j in 0..keep {
                b[i * keep + j] = (svd.u.at(i, j) * svd.sigma[j]) as f32;
            }
        }
        let a: Vec<f32> = (0..keep)
            .flat_map(|j| (0..n).map(move |c| (j, c)))
            .map(|(j, c)| svd.vt.at(j, c) as f32)
            .collect();
        factors.push((
            module,
            Tensor::from_f32(DType::F32, &[keep, n], &a)?,
            Tensor::from_f32(DType::F32, &[m, keep], &b)?,
        ));
    }
    if factors.is_empty() {
        return Err(Error::input(
            "the fine-tune's Linear layers equal the base's: nothing to extract",
        ));
    }
    let staged = Staged::dir(&dests[0])?;
    write_adapter(staged.path(), base, o.rank, &factors)?;
    let mut items = vec![staged];
    if let (Some(dest), Some(_)) = (dests.get(1), o.report) {
        let json = serde_json::to_vec_pretty(
            &json!({"rank": o.rank, "sv_epsilon": o.sv_epsilon, "modules": report}),
        )
        .map_err(|e| Error::input(e.to_string()))?;
        items.push(output::stage_bytes(dest, &json)?);
    }
    output::commit(items, o.force)?;
    Ok(report)
}

/// A truncated SVD: Δ ≈ U·diag(σ)·Vᵀ, σ descending.
struct Svd {
    u: Mat,
    sigma: Vec<f64>,
    vt: Mat,
}

fn to_tensor(m: &Mat) -> Result<Tensor> {
    let v: Vec<f32> = m.v.iter().map(|&x| x as f32).collect();
    Tensor::from_f32(DType::F32, &[m.rows, m.cols], &v)
}

fn to_mat(t: &Tensor) -> Mat {
    Mat {
        rows: t.shape[0],
        cols: t.shape[1],
        v: t.to_f32_vec().into_iter().map(f64::from).collect(),
    }
}

/// The randomized range finder and the small SVD (module doc); `seed`
/// makes the sketch reproducible.
fn rsvd(dev: &Device, d: &Tensor, rank: usize, seed: u64) -> Result<Svd> {
    let (m, n) = (d.shape[0], d.shape[1]);
    let l = (rank + OVERSAMPLE).min(m).min(n);
    let mut rng = crate::tools::sample::Rng::new(0x5eed ^ seed);
    let omega = Mat {
        rows: n,
        cols: l,
        v: (0..n * l).map(|_| rng.normal()).collect(),
    };
    // Δᵀ·Q as (Qᵀ·Δ)ᵀ: Δ is the whole second operand, which must fit one
    // binding; otherwise that product runs on the CPU.
    let dt_q = |q: &Mat| -> Result<Mat> {
        let qt = to_tensor(&q.t())?;
        let r = match matmul(dev, &qt.view(), &d.view(), 1.0, None, DType::F32) {
            Ok(t) => t,
            Err(_) => matmul(&Device::Cpu, &qt.view(), &d.view(), 1.0, None, DType::F32)?,
        };
        Ok(to_mat(&r))
    };
    let d_x = |x: &Mat| -> Result<Mat> {
        let xt = to_tensor(x)?;
        Ok(to_mat(&matmul(
            dev,
            &d.view(),
            &xt.view(),
            1.0,
            None,
            DType::F32,
        )?))
    };
    let mut q = orth(&d_x(&omega)?);
    for _ in 0..POWER_ITERATIONS {
        let z = orth(&dt_q(&q)?.t());
        q = orth(&d_x(&z)?);
    }
    // Bt = Qᵀ·Δ (l × n); its Gram matrix Bt·Btᵀ = W·diag(σ²)·Wᵀ.
    let bt = dt_q(&q)?;
    let (vals, w) = sym_eig(&bt.mul(&bt.t()));
    let sigma: Vec<f64> = vals.iter().map(|&v| v.max(0.0).sqrt()).collect();
    let u = q.mul(&w);
    // Vᵀ rows: wᵢᵀ·Bt / σᵢ.
    let wt_bt = w.t().mul(&bt);
    let mut vt = Mat::zeros(l, n);
    for (i, &s) in sigma.iter().enumerate() {
        if s > 0.0 {
            for c in 0..n {
                vt.v[i * n + c] = wt_bt.at(i, c) / s;
            }
        }
    }
    Ok(Svd { u, sigma, vt })
}

/// adapter_config.json and adapter_model.safetensors in `dir`.
fn write_adapter(
    dir: &Path,
    base: &Model,
    rank: usize,
    factors: &[(String, Tensor, Tensor)],
) -> Result<()> {
    let key = |m: &str, ab: &str| format!("base_model.model.{m}.lora_{ab}.weight");
    let mut entries = Vec::new();
    for (m, a, b) in factors {
        entries.push(OutEntry {
            name: key(m, "A"),
            dtype: "F32".into(),
            shape: a.shape.clone(),
        });
        entries.push(OutEntry {
            name: key(m, "B"),
            dtype: "F32".into(),
            shape: b.shape.clone(),
        });
    }
    let mut meta = Map::new();
    meta.insert("format".to_string(), Value::String("pt".into()));
    let path: PathBuf = dir.join("adapter_model.safetensors");
    let mut w = SafetensorsWriter::create(&path, entries, Some(&meta))?;
    for (m, a, b) in factors {
        w.write(&key(m, "A"), &a.data)?;
        w.write(&key(m, "B"), &b.data)?;
    }
    w.finish()?;
    let mut rank_pattern = Map::new();
    let mut alpha_pattern = Map::new();
    for (m, a, _) in factors {
        let r = a.shape[0];
        if r != rank {
            rank_pattern.insert(m.clone(), json!(r));
            alpha_pattern.insert(m.clone(), json!(r));
        }
    }
    let causal = base
        .config()
        .ok()
        .flatten()
        .and_then(|c| c.get("architectures").cloned())
        .is_some_and(|a| a.to_string().contains("ForCausalLM"));
    let cfg = json!({
        "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base.path.display().to_string(),
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": rank,
        "rank_pattern": rank_pattern,
        "target_modules": factors.iter().map(|(m, _, _)| m.clone()).collect::<Vec<_>>(),
        "task_type": if causal { json!("CAUSAL_LM") } else { Value::Null },
        "use_dora": false,
        "use_rslora": false,
    });
    let mut bytes = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::input(e.to_string()))?;
    bytes.push(b'\n');
    // Synced like the tensors, before the directory is committed.
    let cfg_path = dir.join("adapter_config.json");
    let io = |e| Error::Io {
        path: cfg_path.clone(),
        source: e,
    };
    let mut f = std::fs::File::create(&cfg_path).map_err(io)?;
    std::io::Write::write_all(&mut f, &bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    Ok(())
}
