//! What a whole-model job did, per tensor and in total: written as JSON by
//! `--report FILE` and summarized on the terminal.

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
    /// Where the time went (whole-model jobs).
    pub stages: Stages,
}

/// Where a job's time went, in seconds summed over its tensors. The writer
/// runs beside the computation, so the stages overlap and their sum can
/// exceed the wall time.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Stages {
    /// Making the inputs resident (page faults on the memory maps).
    pub read: f64,
    /// The operations themselves, report figures they compute in passing
    /// included.
    pub kernel: f64,
    /// Report figures that cost a pass of their own (operations that do not
    /// compute them in passing, and non-finite checks of inputs they did
    /// not cover).
    pub stats: f64,
    /// The computation waiting for the writer (the in-flight budget full).
    pub wait: f64,
    /// Writing tensors into the output files (the writer thread).
    pub write: f64,
    /// Flushing and syncing the output files.
    pub sync: f64,
    /// Copying other files, the index and the report, and the renames.
    pub commit: f64,
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
