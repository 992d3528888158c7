//! What a whole-model job did, per tensor and in total: written as JSON by
//! `--report FILE` and summarized on the terminal.

use crate::tensor::TensorRef;
use rayon::prelude::*;
use serde::Serialize;

/// What a job did to one tensor.
#[derive(Clone, Debug, Serialize)]
pub struct TensorReport {
    /// The tensor's name.
    pub name: String,
    /// The operation, or "pass-through".
    pub op: String,
    /// Its shape in the input.
    pub shape: Vec<usize>,
    /// Its dtype in the input.
    pub dtype_in: String,
    /// Output tensors written for this one (quantization adds scales).
    pub dtypes_out: Vec<String>,
    /// The output's shape when the operation changed it (removed neurons).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shape_out: Option<Vec<usize>>,
    /// ‖out − in‖₂ / ‖in‖₂: how much of the tensor an operation removed or
    /// changed (for prune, the norm of what was removed, relative).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub removed_l2_rel: Option<f64>,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written (all its output tensors).
    pub bytes_out: u64,
    /// Zeros in the result (touched tensors).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub zeros: Option<u64>,
    /// zeros / elements of the result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sparsity: Option<f64>,
    /// Against the input: max |out - in| and √mean((out - in)²), where the
    /// output is meant to approximate the input.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_abs_err: Option<f64>,
    /// Root mean square of out − in.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rmse: Option<f64>,
    /// 10·log10(Σin² / Σ(out − in)²), in dB (GGUF quantization).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snr_db: Option<f64>,
    /// NaN and infinite weights in the input.
    pub nonfinite_in: u64,
    /// NaN and infinite values in the result (with finite inputs: sums or
    /// conversions that overflowed, refused without --allow-nonfinite).
    pub nonfinite_out: u64,
    /// Seconds the operation took (the kernel and its checks).
    pub seconds: f64,
    /// A few words from the operation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

impl TensorReport {
    /// A tensor copied unchanged; operations fill in what they did.
    pub fn pass_through(name: &str, shape: &[usize], dtype: &str, bytes: u64) -> TensorReport {
        TensorReport {
            name: name.into(),
            op: "pass-through".into(),
            shape: shape.to_vec(),
            dtype_in: dtype.into(),
            dtypes_out: vec![dtype.into()],
            shape_out: None,
            removed_l2_rel: None,
            bytes_in: bytes,
            bytes_out: bytes,
            zeros: None,
            sparsity: None,
            max_abs_err: None,
            rmse: None,
            snr_db: None,
            nonfinite_in: 0,
            nonfinite_out: 0,
            seconds: 0.0,
            note: None,
        }
    }
}

/// Sums over the tensors of a job.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    /// Tensors in the output.
    pub tensors: usize,
    /// Tensors the operation changed.
    pub touched: usize,
    /// Bytes read.
    pub bytes_in: u64,
    /// Bytes written.
    pub bytes_out: u64,
    /// Elements of the touched tensors.
    pub weights_touched: u64,
    /// Zeros among them after the job.
    pub zeros_touched: u64,
    /// Wall-clock seconds of the whole job.
    pub seconds: f64,
    /// (bytes in + bytes out) / seconds, in GB/s.
    pub gb_per_s: f64,
}

/// What a whole-model job did: `--report FILE` writes it as JSON.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The command line.
    pub command: String,
    /// The device it ran on.
    pub device: String,
    /// The input paths.
    pub inputs: Vec<String>,
    /// The output path.
    pub output: String,
    /// Per tensor, in output order.
    pub tensors: Vec<TensorReport>,
    /// Sums.
    pub totals: Totals,
}

impl Report {
    /// Fills `totals` from the tensors; `seconds` is the whole job's time.
    pub fn finish_totals(&mut self, seconds: f64) {
        let t = &mut self.totals;
        t.tensors = self.tensors.len();
        t.touched = self
            .tensors
            .iter()
            .filter(|r| r.op != "pass-through")
            .count();
        t.bytes_in = self.tensors.iter().map(|r| r.bytes_in).sum();
        t.bytes_out = self.tensors.iter().map(|r| r.bytes_out).sum();
        let touched = self.tensors.iter().filter(|r| r.op != "pass-through");
        t.weights_touched = touched
            .clone()
            .map(|r| r.shape.iter().product::<usize>() as u64)
            .sum();
        t.zeros_touched = touched.filter_map(|r| r.zeros).sum();
        t.seconds = seconds;
        t.gb_per_s = if seconds > 0.0 {
            (t.bytes_in + t.bytes_out) as f64 / seconds / 1e9
        } else {
            0.0
        };
    }

    /// The report as pretty JSON, staged beside `dest` for
    /// `output::commit` (a job's report lands with its output or not at
    /// all).
    pub fn stage(&self, dest: &std::path::Path) -> crate::Result<crate::formats::output::Staged> {
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| crate::Error::input(format!("report: {e}")))?;
        crate::formats::output::stage_bytes(dest, (text + "\n").as_bytes())
    }

    /// Largest error over the touched tensors (for one-line summaries).
    pub fn worst_error(&self) -> Option<(f64, f64)> {
        let errs: Vec<_> = self
            .tensors
            .iter()
            .filter_map(|r| Some((r.max_abs_err?, r.rmse?)))
            .collect();
        if errs.is_empty() {
            return None;
        }
        Some(
            errs.iter()
                .fold((0f64, 0f64), |a, b| (a.0.max(b.0), a.1.max(b.1))),
        )
    }
}

/// Figures of `approx` against `input` (same shape): max |diff|, RMSE,
/// zeros in `approx`, non-finite values in `input`. Non-finite positions
/// are left out of the error.
pub struct Diff {
    /// Largest |approx − input|.
    pub max_abs: f64,
    /// √mean((approx − input)²).
    pub rmse: f64,
    /// ‖approx − input‖₂ / ‖input‖₂ (0 for an all-zero input).
    pub rel_l2: f64,
    /// Zeros in `approx`.
    pub zeros: u64,
    /// Non-finite values in `input`.
    pub nonfinite_in: u64,
    /// Non-finite values in `approx`.
    pub nonfinite_out: u64,
}

impl Diff {
    /// The signal-to-noise ratio in dB.
    pub fn snr_db(&self) -> f64 {
        crate::ops::reduce::snr_db(self.rel_l2)
    }
}

/// Compares `approx` with `input` (same shape) in one parallel pass.
pub fn diff(input: &TensorRef, approx: &TensorRef) -> Diff {
    let n = input.numel();
    let block = 1 << 16;
    let parts: Vec<(f64, f64, u64, u64, f64, u64)> = (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let (mut mx, mut sq, mut z, mut nf, mut norm) = (0f64, 0f64, 0u64, 0u64, 0f64);
            let mut nf_out = 0u64;
            for i in b * block..((b + 1) * block).min(n) {
                let x = input.dtype.raw_to_f32(input.dtype.read_raw(input.data, i));
                let y = approx
                    .dtype
                    .raw_to_f32(approx.dtype.read_raw(approx.data, i));
                z += (y == 0.0) as u64;
                nf_out += !y.is_finite() as u64;
                if !x.is_finite() {
                    nf += 1;
                    continue;
                }
                let d = (y as f64 - x as f64).abs();
                norm += (x as f64) * (x as f64);
                if d.is_finite() {
                    mx = mx.max(d);
                    sq += d * d;
                }
            }
            (mx, sq, z, nf, norm, nf_out)
        })
        .collect();
    let (mx, sq, z, nf, norm, nf_out) =
        parts
            .into_iter()
            .fold((0f64, 0f64, 0u64, 0u64, 0f64, 0u64), |a, b| {
                (
                    a.0.max(b.0),
                    a.1 + b.1,
                    a.2 + b.2,
                    a.3 + b.3,
                    a.4 + b.4,
                    a.5 + b.5,
                )
            });
    Diff {
        max_abs: mx,
        rmse: if n > 0 { (sq / n as f64).sqrt() } else { 0.0 },
        rel_l2: if norm > 0.0 { (sq / norm).sqrt() } else { 0.0 },
        zeros: z,
        nonfinite_in: nf,
        nonfinite_out: nf_out,
    }
}
