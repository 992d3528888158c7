//! Whole-model jobs: tensors flow one at a time from the input files'
//! memory maps through an operation on the device to a writer thread, which
//! streams them into the output shards.
//!
//! Memory: an input tensor's pages are dropped from the process once it is
//! processed, and the next tensor starts while earlier results are still
//! being written only while the bytes in flight stay within twice the
//! largest tensor, so peak memory follows the largest tensor, not the model.
pub use super::op::{Applied, Selection, Src, TensorOp};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::{Model, ModelWriter};
use crate::formats::output::{self, Staged};
use crate::formats::plan;
use crate::formats::safetensors::{Entry, OutEntry, SafetensorsWriter};
use crate::jobs::report::{Report, Stages, TensorReport};
use crate::ops::diff::diff;
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Condvar, Mutex};
use std::time::Instant;
/// How a job runs: device, selection, what it may do to its outputs.
pub struct JobOptions {
    /// Where the kernels run.
    pub device: Device,
    /// Which tensors the job touches.
    pub selection: Selection,
    /// Process NaN and infinite inputs, and write results that overflowed
    /// to ±inf, instead of refusing them.
    pub allow_nonfinite: bool,
    /// Replace existing outputs (never inputs; see `plan::check`).
    pub force: bool,
    /// Where to write the JSON report, committed with the output.
    pub report: Option<PathBuf>,
    /// Files read besides the models and the operation's own (an option
    /// file), which no output may overwrite.
    pub extra_inputs: Vec<PathBuf>,
    /// Told how far the job has come (the command line's progress bar).
    pub progress: Option<std::sync::Arc<dyn Progress>>,
    /// The command line, recorded in the report.
    pub command: String,
}

impl JobOptions {
    /// Options for a library caller: every touched tensor by the default
    /// selection, nothing replaced, no report, no progress bar.
    pub fn new(device: Device) -> JobOptions {
        JobOptions {
            device,
            selection: Selection::default(),
            allow_nonfinite: false,
            force: false,
            report: None,
            extra_inputs: Vec::new(),
            progress: None,
            command: String::new(),
        }
    }
}

/// Told how far a job has come, in input bytes.
pub trait Progress: Send + Sync {
    /// The job will process `total` bytes.
    fn start(&self, total: u64);
    /// `bytes` more were processed.
    fn advance(&self, bytes: u64);
    /// The job ended, either way.
    fn finish(&self);
}

/// Progress that nobody watches.
struct Silent;

impl Progress for Silent {
    fn start(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

/// Bytes allowed in flight between the compute and the writer.
struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
    /// Set by the writer when it fails: the producer stops.
    failed: std::sync::atomic::AtomicBool,
}

impl Budget {
    /// Waits until `bytes` more fit (or nothing is in flight), then takes
    /// them. Returns false when the writer has failed.
    fn take(&self, bytes: u64) -> bool {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used > 0 && *used + bytes > self.limit && !self.failed() {
            used = self.freed.wait(used).unwrap_or_else(|e| e.into_inner());
        }
        *used += bytes;
        !self.failed()
    }

    fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn fail(&self) {
        self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
        let _g = self.used.lock().unwrap_or_else(|e| e.into_inner());
        self.freed.notify_all();
    }

    fn give(&self, bytes: u64) {
        *self.used.lock().unwrap_or_else(|e| e.into_inner()) -= bytes;
        self.freed.notify_all();
    }
}

enum Msg<'a> {
    Shard(SafetensorsWriter),
    Tensor {
        name: String,
        data: Cow<'a, [u8]>,
        /// Input pages to drop once written (pass-through tensors).
        release: Option<Src<'a>>,
        budget: u64,
    },
    EndShard,
}

/// Writes what it receives; after a failure it keeps draining (returning
/// budget) so that the producer never waits on it, and reports the first
/// error.
/// Returns the finished shards and the seconds spent writing and syncing.
fn writer_thread(
    rx: mpsc::Receiver<Msg>,
    budget: &Budget,
    progress: &dyn Progress,
) -> Result<(Vec<Staged>, f64, f64)> {
    let mut current: Option<SafetensorsWriter> = None;
    let mut first_error: Option<Error> = None;
    let mut finished = Vec::new();
    let (mut write_s, mut sync_s) = (0.0, 0.0);
    for msg in rx {
        let r = match msg {
            Msg::Shard(w) => {
                current = Some(w);
                Ok(())
            }
            Msg::Tensor {
                name,
                data,
                release,
                budget: b,
            } => {
                let t = Instant::now();
                let r = match (&first_error, current.as_mut()) {
                    (None, Some(w)) => w.write(&name, &data),
                    _ => Ok(()),
                };
                write_s += t.elapsed().as_secs_f64();
                if let Some(src) = release {
                    src.file.release(src.entry);
                    progress.advance(src.entry.bytes() as u64);
                }
                if let Cow::Owned(v) = data {
                    crate::tensor::recycle(v);
                }
                budget.give(b);
                r
            }
            Msg::EndShard => match (&first_error, current.take()) {
                (None, Some(w)) => {
                    let t = Instant::now();
                    let r = w.finish_staged().map(|s| finished.push(s));
                    sync_s += t.elapsed().as_secs_f64();
                    r
                }
                _ => Ok(()),
            },
        };
        if let Err(e) = r {
            if first_error.is_none() {
                first_error = Some(e);
                budget.fail();
            }
        }
    }
    first_error.map_or(Ok((finished, write_s, sync_s)), Err)
}

fn differ(file: &Path, tensor: &str, why: String) -> Error {
    Error::format(file, Some(tensor), why)
}

/// Checks, before anything is written, that the models agree whole: every
/// model holds exactly model 0's tensor names, each with the same shape and
/// dtype (a touched tensor may differ in float dtype where the operation
/// allows it), and that the operation can run on every touched tensor.
fn check_models(op: &dyn TensorOp, sel: &Selection, models: &[Model]) -> Result<()> {
    let base = &models[0];
    sel.check_includes(op, base)?;
    for (file, e) in base.entries() {
        let touched = sel.chosen(op, e);
        if touched {
            op.prepare(e).map_err(|err| err.at(&file.path, &e.name))?;
        }
        for m in &models[1..] {
            let Some((f2, e2)) = m.find(&e.name) else {
                return Err(differ(
                    &m.path,
                    &e.name,
                    format!("missing (it is in {})", file.path.display()),
                ));
            };
            let rows_only = touched
                && op.rows_may_differ(e)
                && e2.shape.len() == e.shape.len()
                && !e.shape.is_empty()
                && e2.shape[1..] == e.shape[1..];
            if e2.shape != e.shape && !rows_only {
                return Err(differ(
                    &f2.path,
                    &e.name,
                    format!(
                        "shape {:?} differs from {:?} in {}",
                        e2.shape,
                        e.shape,
                        file.path.display()
                    ),
                ));
            }
            let float_pair = e.kernel_dtype().is_some() && e2.kernel_dtype().is_some();
            if e2.dtype != e.dtype && !(touched && op.mixed_dtypes() && float_pair) {
                return Err(differ(
                    &f2.path,
                    &e.name,
                    format!(
                        "dtype {} differs from {} in {}",
                        e2.dtype,
                        e.dtype,
                        file.path.display()
                    ),
                ));
            }
        }
    }
    let n = base.entries().count();
    for m in &models[1..] {
        if m.entries().count() != n {
            if let Some((f2, e2)) = m.entries().find(|(_, e2)| base.find(&e2.name).is_none()) {
                return Err(differ(
                    &f2.path,
                    &e2.name,
                    format!(
                        "not in {}: the models hold different tensors",
                        base.path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Runs `op` over `models` (model 0 sets the names, order and sharding)
/// and writes the result to `out`. Returns the report.
pub fn run(op: &dyn TensorOp, models: &[Model], out: &Path, opts: &JobOptions) -> Result<Report> {
    let started = Instant::now();
    let base = &models[0];
    let mut inputs: Vec<PathBuf> = models.iter().flat_map(|m| m.input_paths()).collect();
    inputs.extend(op.input_paths());
    inputs.extend(opts.extra_inputs.iter().cloned());
    let extra = op.extra_files()?;
    let mut kind = ModelWriter::output_kind(base);
    if let plan::OutputKind::Dir { names } = &mut kind {
        names.extend(extra.iter().map(|(n, _)| n.clone()));
    }
    let dests = plan::check_job(&inputs, out, kind, opts.report.as_deref(), opts.force)?;
    check_models(op, &opts.selection, models)?;
    let largest = models
        .iter()
        .flat_map(|m| m.entries().map(|(_, e)| e.bytes() as u64))
        .max()
        .unwrap_or(0);
    let budget = Budget {
        limit: 2 * largest.max(1),
        used: Mutex::new(0),
        freed: Condvar::new(),
        failed: Default::default(),
    };
    let progress: &dyn Progress = match &opts.progress {
        Some(p) => p.as_ref(),
        None => &Silent,
    };
    progress.start(base.total_bytes());
    let mut report = Report {
        command: opts.command.clone(),
        device: opts.device.name(),
        inputs: models
            .iter()
            .map(|m| m.path.display().to_string())
            .collect(),
        output: out.display().to_string(),
        tensors: Vec::new(),
        totals: Default::default(),
    };
    let mut writer = ModelWriter::new(&dests[0], base.is_dir)?;
    let mut stages = Stages::default();
    let (shards, write_s, sync_s) = std::thread::scope(|scope| -> Result<_> {
        let (tx, rx) = mpsc::sync_channel::<Msg>(4);
        let budget = &budget;
        let handle = scope.spawn(move || writer_thread(rx, budget, progress));
        let produced = (|| -> Result<()> {
            for shard in &base.shards {
                let touched: Vec<&Entry> = shard
                    .entries
                    .iter()
                    .filter(|e| opts.selection.chosen(op, e))
                    .collect();
                let mut outs = Vec::new();
                for e in &shard.entries {
                    if opts.selection.chosen(op, e) {
                        outs.extend(op.outputs(e).map_err(|err| err.at(&shard.path, &e.name))?);
                    } else {
                        outs.push(OutEntry {
                            name: e.name.clone(),
                            dtype: e.dtype.clone(),
                            shape: e.shape.clone(),
                        });
                    }
                }
                let meta = op.shard_metadata(shard.metadata.as_ref(), &touched);
                let file_name = output::file_name(&shard.path)?;
                let w = writer.shard(&file_name, outs, meta.as_ref())?;
                if tx.send(Msg::Shard(w)).is_err() {
                    return Ok(()); // the writer failed; its error is reported below
                }
                for (i, e) in shard.entries.iter().enumerate() {
                    if let Some(next) = shard.entries.get(i + 1) {
                        shard.prefetch(next);
                    }
                    let src = Src {
                        file: shard,
                        entry: e,
                    };
                    if !opts.selection.chosen(op, e) {
                        let b = e.bytes() as u64;
                        if !budget.take(b) {
                            return Ok(());
                        }
                        report
                            .tensors
                            .push(TensorReport::pass_through(&e.name, &e.shape, &e.dtype, b));
                        let msg = Msg::Tensor {
                            name: e.name.clone(),
                            data: Cow::Borrowed(src.data()),
                            release: Some(src),
                            budget: b,
                        };
                        if tx.send(msg).is_err() {
                            return Ok(());
                        }
                        continue;
                    }
                    let flow = Flow {
                        op,
                        opts,
                        models,
                        budget,
                        tx: &tx,
                        progress,
                    };
                    let r = process(&flow, src, &mut stages)
                        .map_err(|err| err.at(&shard.path, &e.name))?;
                    match r {
                        Some(r) => report.tensors.push(r),
                        None => return Ok(()),
                    }
                }
                if tx.send(Msg::EndShard).is_err() {
                    return Ok(());
                }
            }
            Ok(())
        })();
        drop(tx);
        let written = handle
            .join()
            .unwrap_or_else(|_| Err(Error::input("the writer thread panicked")));
        produced?;
        written
    })?;
    progress.finish();
    stages.write = write_s;
    stages.sync = sync_s;
    let t = Instant::now();
    for s in shards {
        writer.shard_done(s)?;
    }
    let rewrite = |name: &str, bytes: &[u8]| op.rewrite_file(name, bytes);
    let mut staged = vec![writer.finish(base, &rewrite, &extra)?];
    stages.commit = t.elapsed().as_secs_f64();
    report.totals.stages = stages;
    report.finish_totals(started.elapsed().as_secs_f64());
    if let Some(dest) = dests.get(1) {
        staged.push(report.stage(dest)?);
    }
    crate::tensor::release_buffers();
    output::commit(staged, opts.force)?;
    Ok(report)
}

/// The job a tensor belongs to, and where its results go.
#[derive(Clone, Copy)]
struct Flow<'a, 'r> {
    op: &'r dyn TensorOp,
    opts: &'r JobOptions,
    models: &'a [Model],
    budget: &'r Budget,
    tx: &'r mpsc::SyncSender<Msg<'a>>,
    progress: &'r dyn Progress,
}

/// One touched tensor: compute, check, report, and hand to the writer.
/// Returns None when the writer has stopped (its error wins).
fn process<'a>(
    f: &Flow<'a, '_>,
    src: Src<'a>,
    stages: &mut Stages,
) -> Result<Option<TensorReport>> {
    let Flow {
        op,
        opts,
        models,
        budget,
        tx,
        progress,
    } = *f;
    let e = src.entry;
    let mut srcs = vec![src];
    for m in &models[1..] {
        let (f, e2) = m.find(&e.name).ok_or_else(|| {
            differ(
                &m.path,
                &e.name,
                "missing (checked before the job started)".into(),
            )
        })?;
        srcs.push(Src { file: f, entry: e2 });
    }
    let outs = op.outputs(e)?;
    let out_bytes: u64 = outs.iter().map(|o| o.bytes().unwrap_or(0) as u64).sum();
    let in_bytes: u64 = srcs.iter().map(|s| s.entry.bytes() as u64).sum();
    let t0 = Instant::now();
    if !budget.take(in_bytes + out_bytes) {
        return Ok(None);
    }
    stages.wait += t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    for s in &srcs {
        s.file.populate(s.entry);
    }
    stages.read += t0.elapsed().as_secs_f64();
    let t0 = Instant::now();
    let applied = op.apply(&opts.device, &srcs, models);
    let seconds = t0.elapsed().as_secs_f64();
    stages.kernel += seconds;
    let applied = match applied {
        Ok(a) if a.outputs.len() == outs.len() => a,
        Ok(a) => {
            budget.give(in_bytes + out_bytes);
            return Err(Error::input(format!(
                "operation produced {} tensors, declared {}",
                a.outputs.len(),
                outs.len()
            )));
        }
        Err(err) => {
            budget.give(in_bytes + out_bytes);
            return Err(err);
        }
    };
    let mut r = TensorReport::pass_through(&e.name, &e.shape, &e.dtype, e.bytes() as u64);
    r.op = op.describe();
    r.dtypes_out = outs.iter().map(|o| o.dtype.clone()).collect();
    r.shape_out = outs
        .first()
        .filter(|o| o.shape != e.shape)
        .map(|o| o.shape.clone());
    r.bytes_out = out_bytes;
    r.seconds = seconds;
    r.note = applied.note.clone();
    let refuse = |err: Error| {
        budget.give(in_bytes + out_bytes);
        Err(err)
    };
    // The figures: from the operation's own pass, or a pass of their own.
    let fused = applied.diff.is_some();
    let mut d = applied.diff;
    if d.is_none() {
        if let (Ok(input), Some(approx)) = (
            src.tensor(),
            applied.approx.as_ref().filter(|a| a.shape == e.shape),
        ) {
            let t = Instant::now();
            d = Some(diff(&input, &approx.view()));
            stages.stats += t.elapsed().as_secs_f64();
        }
    }
    if let Some(d) = &d {
        if d.nonfinite_in > 0 && !opts.allow_nonfinite {
            return refuse(Error::input(format!(
                "{} non-finite weights (NaN or inf); pass --allow-nonfinite to process them anyway",
                d.nonfinite_in
            )));
        }
        r.zeros = Some(d.zeros);
        r.sparsity = Some(if e.numel() > 0 {
            d.zeros as f64 / e.numel() as f64
        } else {
            0.0
        });
        r.max_abs_err = Some(d.max_abs);
        r.rmse = Some(d.rmse());
        r.removed_l2_rel = Some(d.rel_l2());
        r.nonfinite_in = d.nonfinite_in;
    }
    // Inputs the figures do not cover are checked for NaN and inf: the
    // other models' when the operation did not count them, the first's
    // when nothing approximates it.
    let covered = match &d {
        Some(_) if fused => srcs.len(),
        Some(_) => 1,
        None => 0,
    };
    let mut nonfinite_other = d.map_or(0, |d| d.nonfinite_other);
    let t = Instant::now();
    for s in &srcs[covered..] {
        if let Ok(t) = s.tensor() {
            nonfinite_other += crate::ops::reduce::tensor_stats(&Device::Cpu, &t)?.nonfinite;
        }
    }
    stages.stats += t.elapsed().as_secs_f64();
    if nonfinite_other > 0 && !opts.allow_nonfinite {
        let others: Vec<String> = srcs[1.min(srcs.len())..]
            .iter()
            .map(|s| s.file.path.display().to_string())
            .collect();
        return refuse(Error::input(format!(
            "{nonfinite_other} non-finite weights (NaN or inf) in {}; pass --allow-nonfinite to process them anyway",
            if others.is_empty() { "the input".to_string() } else { others.join(", ") }
        )));
    }
    r.nonfinite_in += nonfinite_other;
    // Finite inputs whose result is not: a sum or a conversion overflowed.
    let nonfinite_out = d.map_or(0, |d| d.nonfinite_out);
    r.nonfinite_out = nonfinite_out;
    if nonfinite_out > 0 && !opts.allow_nonfinite {
        return refuse(Error::input(format!(
            "{nonfinite_out} results overflowed to ±inf (or NaN) from finite inputs; \
             pass --allow-nonfinite to write them anyway"
        )));
    }
    for s in &srcs {
        s.file.release(s.entry);
    }
    // The inputs' pages are gone; only the outputs stay in flight, each
    // returned to the budget by the writer as it is written.
    budget.give(in_bytes + out_bytes);
    progress.advance(e.bytes() as u64);
    for (o, data) in outs.into_iter().zip(applied.outputs) {
        let bytes = data.len() as u64;
        let t = Instant::now();
        budget.take(bytes);
        stages.wait += t.elapsed().as_secs_f64();
        let msg = Msg::Tensor {
            name: o.name,
            data: Cow::Owned(data),
            release: None,
            budget: bytes,
        };
        if tx.send(msg).is_err() {
            return Ok(None);
        }
    }
    Ok(Some(r))
}
