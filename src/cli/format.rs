//! What the command line prints: the progress bar, one-line summaries,
//! tables, byte counts.

use modelpress::error::Result;
use modelpress::jobs::report::Report;
use std::path::Path;

/// The progress bar of a job, drawn on stderr when it is a terminal and
/// cleared when the job ends, either way.
pub(super) struct Bar(indicatif::ProgressBar);

impl Bar {
    pub(super) fn new() -> Bar {
        use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
        use std::io::IsTerminal;
        if !std::io::stderr().is_terminal() {
            return Bar(ProgressBar::hidden());
        }
        let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
        if let Ok(style) = ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
        ) {
            pb.set_style(style.progress_chars("=> "));
        }
        Bar(pb)
    }
}

impl modelpress::jobs::pipeline::Progress for Bar {
    fn start(&self, total: u64) {
        self.0.set_length(total);
    }

    fn advance(&self, bytes: u64) {
        self.0.inc(bytes);
    }

    fn finish(&self) {
        self.0.finish_and_clear();
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        self.0.finish_and_clear();
    }
}

pub(super) fn print_summary(r: &Report) -> Result<()> {
    let t = &r.totals;
    let mut line = format!(
        "wrote {}: {} tensors ({} touched), {} in, {} out, {:.2} s ({:.2} GB/s) on {}",
        r.output,
        t.tensors,
        t.touched,
        human_bytes(t.bytes_in),
        human_bytes(t.bytes_out),
        t.seconds,
        t.gb_per_s,
        r.device
    );
    if t.weights_touched > 0 {
        line += &format!(
            "; sparsity of touched {:.2}%",
            100.0 * t.zeros_touched as f64 / t.weights_touched as f64
        );
    }
    if let Some((mx, rmse)) = r.worst_error() {
        line += &format!("; worst max |Δ| {mx:.3e}, worst RMSE {rmse:.3e}");
    }
    modelpress::outln!("{line}")
}

/// `inspect` on a GGUF file: metadata, then tensors with type and shape.
pub(super) fn inspect_gguf(path: &Path, json: bool) -> Result<()> {
    use modelpress::formats::gguf::GgufFile;
    let f = GgufFile::open(path)?;
    if json {
        let v = serde_json::json!({
            "version": f.version,
            "alignment": f.alignment,
            "metadata": f.metadata.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.show()))).collect::<serde_json::Map<_, _>>(),
            "tensors": f.tensors.iter().map(|t| serde_json::json!({
                "name": t.name, "type": t.ty.name(), "shape": t.shape(), "bytes": t.bytes, "offset": t.offset,
            })).collect::<Vec<_>>(),
        });
        modelpress::outln!(
            "{}",
            serde_json::to_string_pretty(&v)
                .map_err(|e| modelpress::Error::input(e.to_string()))?
        )?;
        return Ok(());
    }
    modelpress::outln!(
        "GGUF v{}, alignment {}, {} metadata entries, {} tensors",
        f.version,
        f.alignment,
        f.metadata.len(),
        f.tensors.len()
    )?;
    for (k, v) in &f.metadata {
        modelpress::outln!("  {k} = {}", v.show())?;
    }
    modelpress::outln!(
        "{:<48} {:>8} {:>20} {:>10}",
        "tensor",
        "type",
        "shape",
        "bytes"
    )?;
    for t in &f.tensors {
        modelpress::outln!(
            "{:<48} {:>8} {:>20} {:>10}",
            t.name,
            t.ty.name(),
            format!("{:?}", t.shape()),
            human_bytes(t.bytes)
        )?;
    }
    modelpress::outln!(
        "{} tensors, {}",
        f.tensors.len(),
        human_bytes(f.tensors.iter().map(|t| t.bytes).sum())
    )?;
    Ok(())
}

/// One line per changed tensor (type, bytes, error) and a total.
pub(super) fn print_gguf_report(r: &modelpress::jobs::report::Report) -> Result<()> {
    for t in r.tensors.iter().filter(|t| t.op != "pass-through") {
        let err = match (t.rmse, t.max_abs_err, t.snr_db) {
            (Some(rmse), Some(mx), Some(snr)) => {
                format!("  rmse {rmse:.3e}  max|Δ| {mx:.3e}  SNR {snr:.1} dB")
            }
            _ => String::new(),
        };
        modelpress::outln!(
            "{:<40} {:>6} -> {:<8} {:>10} -> {:>10}{err}{}",
            t.name,
            t.dtype_in,
            t.dtypes_out.join(","),
            human_bytes(t.bytes_in),
            human_bytes(t.bytes_out),
            t.note
                .as_ref()
                .map_or(String::new(), |n| format!("  ({n})"))
        )?;
    }
    let tt = &r.totals;
    modelpress::outln!(
        "wrote {}: {} tensors ({} changed), {} -> {}, {:.1} s on {}",
        r.output,
        tt.tensors,
        tt.touched,
        human_bytes(tt.bytes_in),
        human_bytes(tt.bytes_out),
        tt.seconds,
        r.device
    )
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
