//! `modelpress demo`, the README's main job: a seeded LLaMA-shaped sample
//! model in a temporary directory, every whole-model operation run on it on
//! the chosen device, and a table of what each did.

use modelpress::device::Device;
use modelpress::error::{Error, Result};
use modelpress::formats::model::Model;
use modelpress::jobs::pipeline::{self, JobOptions, TensorOp};
use modelpress::jobs::{Dequantize, Mix, Prune, QuantScheme, Quantize, Transfer};
use modelpress::ops::prune::NeuronNorm;
use modelpress::ops::quantize::Granularity;
use modelpress::tensor::DType;
use modelpress::tools::sample::{write_llama_model, LlamaShape};
use std::path::{Path, PathBuf};

/// The demo's directory: a fresh one it creates, removed at the end (and on
/// a signal) unless the user keeps it.
struct TempDir(PathBuf, Option<u64>);

impl Drop for TempDir {
    fn drop(&mut self) {
        if let Some(id) = self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
            modelpress::formats::output::forget_temporary(id);
        }
    }
}

pub fn run(dev: &Device, seed: u64, keep: Option<&Path>) -> Result<()> {
    let path = match keep {
        Some(p) => p.to_path_buf(),
        None => std::env::temp_dir().join(format!("modelpress-demo-{}", std::process::id())),
    };
    // Never a directory that exists: --keep must not clear the user's files.
    std::fs::create_dir(&path).map_err(|e| Error::Io {
        path: path.clone(),
        source: e,
    })?;
    let dir = TempDir(
        path.clone(),
        keep.is_none()
            .then(|| modelpress::formats::output::register_temporary(&path)),
    );
    let base = dir.0.join("llama");
    let shape = LlamaShape::DEMO;
    write_llama_model(&base, shape, DType::BF16, 2, seed)?;
    let n: usize = shape
        .tensors()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    modelpress::outln!("modelpress demo on {}", dev.name())?;
    modelpress::outln!(
        "sample: LLaMA-shaped, {} layers, hidden {}, {:.1} M weights in BF16, 2 shards (seed {seed}) in {}",
        shape.layers,
        shape.hidden,
        n as f64 / 1e6,
        base.display()
    )?;
    modelpress::outln!()?;
    modelpress::outln!(
        "{:<34} {:>10} {:>10} {:>9} {:>10} {:>10} {:>8}",
        "operation",
        "bytes in",
        "bytes out",
        "sparsity",
        "max |Δ|",
        "RMSE",
        "GB/s"
    )?;
    let opts = JobOptions {
        command: "modelpress demo".into(),
        ..JobOptions::new(dev.clone())
    };
    let out = |name: &str| dir.0.join(name);
    let row = |label: &str, r: &modelpress::jobs::report::Report| {
        let t = &r.totals;
        let (mx, rmse) = r.worst_error().unwrap_or((0.0, 0.0));
        modelpress::outln!(
            "{:<34} {:>10} {:>10} {:>8.2}% {:>10.3e} {:>10.3e} {:>8.2}",
            label,
            super::format::human_bytes(t.bytes_in),
            super::format::human_bytes(t.bytes_out),
            100.0 * t.zeros_touched as f64 / t.weights_touched.max(1) as f64,
            mx,
            rmse,
            t.gb_per_s
        )
    };
    let step = |label: &str, op: &dyn TensorOp, inputs: &[&Path], output: &Path| -> Result<()> {
        let models = inputs
            .iter()
            .map(|p| Model::open(p))
            .collect::<Result<Vec<_>>>()?;
        row(label, &pipeline::run(op, &models, output, &opts)?)
    };
    step(
        "prune |w| < 0.02",
        &Prune::Threshold(0.02),
        &[&base],
        &out("pruned"),
    )?;
    step(
        "prune to 50% sparsity per tensor",
        &modelpress::jobs::Sparsity::per_tensor(0.5, false)?,
        &[&base],
        &out("sparse"),
    )?;
    step(
        "prune rows, L2 norm < 0.98",
        &Prune::Rows(0.98, NeuronNorm::L2),
        &[&base],
        &out("pruned-rows"),
    )?;
    step(
        "quantize int8 per row",
        &Quantize {
            scheme: QuantScheme::AbsMax(Granularity::PerRow),
            dequantize: false,
        },
        &[&base],
        &out("int8"),
    )?;
    let int8 = Model::open(&out("int8"))?;
    step(
        "dequantize int8 -> BF16",
        &Dequantize::new(&int8)?,
        &[&out("int8")],
        &out("int8-back"),
    )?;
    step(
        "transfer w + 0.001 (\"finetune\")",
        &Transfer {
            lambda: 1.0,
            offset: Some(0.001),
        },
        &[&base],
        &out("tuned"),
    )?;
    step(
        "delta tuned − base",
        &Transfer {
            lambda: -1.0,
            offset: None,
        },
        &[&out("tuned"), &base],
        &out("task-vector"),
    )?;
    step(
        "transfer base + 0.5·task",
        &Transfer {
            lambda: 0.5,
            offset: None,
        },
        &[&base, &out("task-vector")],
        &out("half-tuned"),
    )?;
    step(
        "mix 0.5·base + 0.5·tuned",
        &Mix {
            weights: vec![0.5, 0.5],
        },
        &[&base, &out("tuned")],
        &out("merged"),
    )?;
    // llama.cpp's block quantization, as llama-quantize chooses it (the
    // sample keeps its Hugging Face names: a GGUF tensor container).
    let r = modelpress::jobs::gguf::write_gguf(
        dev,
        &base,
        &modelpress::jobs::gguf::Destination {
            output: out("llama-Q4_K_M.gguf"),
            ..Default::default()
        },
        modelpress::jobs::gguf::GgufOptions {
            target: "Q4_K_M".into(),
            ..Default::default()
        },
    )?;
    row("GGUF Q4_K_M (llama.cpp blocks)", &r)?;
    modelpress::outln!()?;
    modelpress::outln!("max |Δ| and RMSE are against the first input: the error for prune and quantize, the change made for the others.")?;
    if !dev.is_gpu() {
        modelpress::outln!("(no hardware GPU found: this ran on the CPU backend; `--device gpu` uses any adapter, software ones included)")?;
    }
    Ok(())
}
