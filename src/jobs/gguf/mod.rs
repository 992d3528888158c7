//! GGUF output: `quantize --type T -o OUT.gguf` (a safetensors model or a
//! GGUF file in) and `dequantize FILE.gguf` (GGUF back to floats), tensor
//! by tensor.
//!
//! Which tensors change and to what follows llama-quantize (see
//! gguf_rules): tensors of rank ≥ 2 whose name ends in `weight`, except
//! norms and a few others; the _M/_S mixes and the output tensor's type;
//! the fallback for rows that are not a whole number of blocks. From
//! safetensors the output holds the same tensor names and only
//! `general.file_type` and `general.quantization_version`: no llama.cpp
//! model metadata is invented, so it is a tensor container, not a model
//! llama.cpp can run. From GGUF, every metadata entry is kept and those two
//! are set as llama-quantize sets them.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::gguf::{GgmlType, GgufFile, GgufOut, GgufTensor, GgufWriter, Value};
use crate::formats::model::Model;
use crate::formats::output::{self, Staged};
use crate::formats::plan::{self, OutputKind};
use crate::formats::safetensors::{Entry, OutEntry, SafetensorsFile, SafetensorsWriter};
pub mod rules;

use crate::jobs::report::{Report, Stages, TensorReport};
use crate::ops::ggml::{self, BlockType};
use crate::ops::quantize;
use crate::tensor::{DType, TensorRef};
use rules::{Ftype, Overrides, Plan};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Instant;

/// llama.cpp's LLAMA_FTYPE for a whole-file target type.
fn file_type(t: GgmlType) -> Option<u32> {
    Some(match t.name() {
        "F32" => 0,
        "F16" => 1,
        "BF16" => 32,
        _ => return None,
    })
}

/// The GGML type of a dtype: the names agree (U8 and BOOL have none).
fn ggml_of(d: DType) -> Option<GgmlType> {
    GgmlType::from_name(d.name())
}

/// The float dtype a GGML type converts through, if any.
fn dtype_of(t: GgmlType) -> Option<DType> {
    DType::parse(t.name()).filter(|d| d.is_kernel_float())
}

/// One input tensor, from either kind of file.
struct In<'a> {
    name: String,
    shape: Vec<usize>,
    ty: GgmlType,
    pages: Pages<'a>,
}

/// Where an input tensor's bytes are mapped, to release them once done.
enum Pages<'a> {
    Gguf(&'a GgufFile, &'a GgufTensor),
    Safetensors(&'a SafetensorsFile, &'a Entry),
}

impl<'a> In<'a> {
    /// The tensor's bytes, mapped from its file.
    fn data(&self) -> &'a [u8] {
        match self.pages {
            Pages::Gguf(f, t) => f.data(t),
            Pages::Safetensors(f, e) => f.data(e),
        }
    }

    /// Makes the tensor's pages resident (reading, timed apart).
    fn populate(&self) {
        match self.pages {
            Pages::Gguf(f, t) => f.populate(t),
            Pages::Safetensors(f, e) => f.populate(e),
        }
    }

    /// Drops the tensor's pages from this process once it is written, so
    /// resident memory stays bounded by the largest tensor.
    fn release(&self) {
        match self.pages {
            Pages::Gguf(f, t) => f.release(t),
            Pages::Safetensors(f, e) => f.release(e),
        }
    }
}

/// The inputs of a GGUF or safetensors file (or model directory), and the
/// GGUF metadata (empty for safetensors), kept alive together.
struct Inputs {
    gguf: Option<GgufFile>,
    model: Option<Model>,
}

impl Inputs {
    fn open(input: &Path) -> Result<Inputs> {
        Ok(if GgufFile::sniff(input) {
            Inputs {
                gguf: Some(GgufFile::open(input)?),
                model: None,
            }
        } else {
            Inputs {
                gguf: None,
                model: Some(Model::open(input)?),
            }
        })
    }

    /// Every path read, for `plan::check`.
    fn paths(&self) -> Vec<PathBuf> {
        match (&self.gguf, &self.model) {
            (Some(g), _) => vec![g.path.clone()],
            (_, Some(m)) => m.input_paths(),
            _ => Vec::new(),
        }
    }

    fn metadata(&self) -> Vec<(String, Value)> {
        self.gguf
            .as_ref()
            .map_or_else(Vec::new, |g| g.metadata.clone())
    }

    fn tensors(&self) -> Result<Vec<In<'_>>> {
        if let Some(g) = &self.gguf {
            return Ok(g
                .tensors
                .iter()
                .map(|t| In {
                    name: t.name.clone(),
                    shape: t.shape(),
                    ty: t.ty,
                    pages: Pages::Gguf(g, t),
                })
                .collect());
        }
        let Some(model) = self.model.as_ref() else {
            return Err(Error::input("no input: neither a GGUF file nor a model"));
        };
        model
            .entries()
            .map(|(f, e)| {
                let d = DType::parse(&e.dtype)
                    .and_then(ggml_of)
                    .ok_or_else(|| Error::Format {
                        file: f.path.display().to_string(),
                        tensor: Some(e.name.clone()),
                        why: format!("dtype {} has no GGUF type", e.dtype),
                    })?;
                Ok(In {
                    name: e.name.clone(),
                    shape: e.shape.clone(),
                    ty: d,
                    pages: Pages::Safetensors(f, e),
                })
            })
            .collect()
    }
}

/// Where a GGUF job writes, and what else it reads.
#[derive(Clone, Debug, Default)]
pub struct Destination {
    /// The output file (.gguf, or .safetensors where allowed).
    pub output: PathBuf,
    /// The JSON report, committed with the output.
    pub report: Option<PathBuf>,
    /// Replace existing outputs (never inputs; see `plan::check`).
    pub force: bool,
    /// Files read besides the input (an option file).
    pub extra_inputs: Vec<PathBuf>,
}

impl Destination {
    /// Checks the output and report against the inputs (see
    /// `plan::check`); returns their destinations.
    fn check(&self, inputs: &Inputs, ext: &'static [&'static str]) -> Result<Vec<PathBuf>> {
        let mut all = inputs.paths();
        all.extend(self.extra_inputs.iter().cloned());
        plan::check_job(
            &all,
            &self.output,
            OutputKind::File { extensions: ext },
            self.report.as_deref(),
            self.force,
        )
    }

    /// Commits the written file and the report together.
    fn commit(&self, dests: &[PathBuf], file: Staged, report: &Report) -> Result<()> {
        let mut staged = vec![file];
        if let Some(d) = dests.get(1) {
            staged.push(report.stage(d)?);
        }
        output::commit(staged, self.force)
    }
}

/// What `--type` asks for.
#[derive(Clone, Copy)]
enum Target {
    /// Every eligible tensor in one float type.
    Float(GgmlType),
    /// A llama-quantize file type (its mixes and fallbacks).
    Quant(Ftype),
}

fn parse_target(name: &str) -> Result<Target> {
    if let Some(f) = Ftype::parse(name) {
        return Ok(Target::Quant(f));
    }
    if let Some(t) = GgmlType::from_name(name) {
        if dtype_of(t).is_some() {
            return Ok(Target::Float(t));
        }
    }
    Err(Error::input(format!(
        "--type {name}: expected F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, \
         Q3_K (= Q3_K_M), Q3_K_S, Q3_K_M, Q3_K_L, Q4_K (= Q4_K_M), Q4_K_S, Q4_K_M, \
         Q5_K (= Q5_K_M), Q5_K_S, Q5_K_M or Q6_K"
    )))
}

fn pass_through(t: &In, seconds: f64) -> TensorReport {
    let mut r = TensorReport::pass_through(&t.name, &t.shape, t.ty.name(), t.data().len() as u64);
    r.seconds = seconds;
    r
}

/// A tensor's output on its way to the writer thread, with the input whose
/// pages to release once it is written.
type Out<'a> = (String, Cow<'a, [u8]>, &'a In<'a>);

/// Hands one output to the writer thread (an error there ends the job).
fn send<'a>(tx: &mpsc::SyncSender<Out<'a>>, t: &'a In<'a>, data: Cow<'a, [u8]>) -> Result<()> {
    tx.send((t.name.clone(), data, t))
        .map_err(|_| Error::input("the writer stopped"))
}

/// Runs `produce`, which sends the outputs in file order, while a thread of
/// its own writes them with `write`: the disk works while the next tensor
/// is computed. The channel holds none: one tensor is written while the
/// next is computed, so memory stays within two tensors. Returns the
/// writer, ready to finish, or the first error (the writer's wins).
/// The seconds spent writing go to `stages.write`.
fn write_behind<'a, W: Send>(
    mut w: W,
    write: fn(&mut W, &str, &[u8]) -> Result<()>,
    stages: &mut Stages,
    produce: impl FnOnce(&mpsc::SyncSender<Out<'a>>, &mut Stages) -> Result<()>,
) -> Result<W> {
    std::thread::scope(|scope| {
        let (tx, rx) = mpsc::sync_channel::<Out<'a>>(0);
        let writer = scope.spawn(move || -> Result<(W, f64)> {
            let mut seconds = 0.0;
            for (name, data, t) in rx {
                let t0 = Instant::now();
                write(&mut w, &name, &data)?;
                seconds += t0.elapsed().as_secs_f64();
                drop(data);
                t.release();
            }
            Ok((w, seconds))
        });
        let produced = produce(&tx, stages);
        drop(tx);
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(Error::input("the writer thread panicked")));
        match (written, produced) {
            (Err(e), _) => Err(e),
            (Ok(_), Err(e)) => Err(e),
            (Ok((w, seconds)), Ok(())) => {
                stages.write += seconds;
                Ok(w)
            }
        }
    })
}

/// How `quantize --type` writes a GGUF file.
#[derive(Default)]
pub struct GgufOptions {
    /// The --type name: a llama-quantize file type or F32/F16/BF16.
    pub target: String,
    /// --pure: every quantized tensor gets the file type's own type.
    pub pure: bool,
    /// llama-quantize's --tensor-type, --output-tensor-type and friends.
    pub overrides: Overrides,
    /// --allow-requantize: block-type inputs are dequantized (as ggml
    /// does) and quantized again instead of being an error.
    pub allow_requantize: bool,
}

/// Writes `out` (GGUF) from `input` with the tensors `--type target` asks
/// for, and reports per tensor: type, bytes, and the error of the
/// dequantized values (max abs, RMSE, SNR).
pub fn write_gguf(
    dev: &Device,
    input: &Path,
    dest: &Destination,
    opt: GgufOptions,
) -> Result<Report> {
    let target = parse_target(&opt.target)?;
    let start = Instant::now();
    let src = Inputs::open(input)?;
    let dests = dest.check(&src, &["gguf"])?;
    let out = &dest.output;
    let inputs = src.tensors()?;
    let mut metadata = src.metadata();
    // The output type of every tensor, decided up front (the writer needs
    // all tensor infos before the data).
    let mut types = Vec::with_capacity(inputs.len());
    match target {
        Target::Float(ty) => {
            for t in &inputs {
                let convert =
                    t.shape.len() >= 2 && t.name.ends_with("weight") && dtype_of(t.ty).is_some();
                types.push(if convert { ty } else { t.ty });
            }
        }
        Target::Quant(f) => {
            let names: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
            let mut plan = Plan::new(f, opt.pure, opt.overrides, &metadata, &names);
            for t in &inputs {
                let ty = plan.choose(&t.name, &t.shape, t.ty)?;
                if ty != t.ty && dtype_of(t.ty).is_none() {
                    let refused = if BlockType::from_ggml(t.ty).is_none() {
                        Some(format!(
                            "is {}, which modelpress cannot read to convert",
                            t.ty.name()
                        ))
                    } else if !opt.allow_requantize {
                        Some(format!(
                            "is {}: requantizing is disabled (--allow-requantize enables it; \
                             quality suffers against quantizing from 16 or 32 bits)",
                            t.ty.name()
                        ))
                    } else {
                        None
                    };
                    if let Some(why) = refused {
                        return Err(Error::Format {
                            file: input.display().to_string(),
                            tensor: Some(t.name.clone()),
                            why,
                        });
                    }
                }
                types.push(ty);
            }
        }
    }
    let (ftype, quantized) = match target {
        Target::Float(ty) => (
            file_type(ty).ok_or_else(|| Error::input(format!("{}: no file type", ty.name())))?,
            false,
        ),
        Target::Quant(f) => (f.file_type(), true),
    };
    metadata.retain(|(k, _)| k != "general.file_type" && k != "general.quantization_version");
    metadata.push(("general.file_type".into(), Value::U32(ftype)));
    if quantized || types.iter().any(|t| BlockType::from_ggml(*t).is_some()) {
        // GGML_QNT_VERSION, which llama-quantize writes.
        metadata.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let outs: Vec<GgufOut> = inputs
        .iter()
        .zip(&types)
        .map(|(t, &ty)| GgufOut {
            name: t.name.clone(),
            dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
            ty,
        })
        .collect();
    let w = GgufWriter::create(&dests[0], &metadata, outs)?;
    let mut report = Report {
        command: "quantize".into(),
        device: dev.name(),
        inputs: vec![input.display().to_string()],
        output: out.display().to_string(),
        tensors: Vec::with_capacity(inputs.len()),
        totals: Default::default(),
    };
    let mut stages = Stages::default();
    let w = write_behind(w, GgufWriter::write, &mut stages, |tx, stages| {
        for (t, &ty) in inputs.iter().zip(&types) {
            let t0 = Instant::now();
            if ty == t.ty {
                send(tx, t, Cow::Borrowed(t.data()))?;
                report
                    .tensors
                    .push(pass_through(t, t0.elapsed().as_secs_f64()));
                continue;
            }
            // A block-type input (--allow-requantize) is dequantized first, as
            // llama-quantize does.
            let requant: Vec<f32>;
            let (src_dtype, src) = match dtype_of(t.ty) {
                Some(d) => (d, t.data()),
                None => {
                    let bt = BlockType::from_ggml(t.ty).ok_or_else(|| {
                        Error::input(format!("type {} cannot be dequantized", t.ty.name()))
                            .at(input, &t.name)
                    })?;
                    let n = t.shape.iter().product();
                    requant =
                        ggml::dequantize(bt, t.data(), n).map_err(|e| e.at(input, &t.name))?;
                    (DType::F32, bytemuck::cast_slice(&requant))
                }
            };
            let view =
                TensorRef::new(src_dtype, &t.shape, src).map_err(|e| e.at(input, &t.name))?;
            let tr = Instant::now();
            t.populate();
            stages.read += tr.elapsed().as_secs_f64();
            let tk = Instant::now();
            let (data, stats, note) = if let Some(bt) = BlockType::from_ggml(ty) {
                let q = ggml::quantize(dev, bt, &view).map_err(|e| e.at(input, &t.name))?;
                let note = (q.cpu_blocks > 0)
                    .then(|| format!("{} blocks quantized by the CPU reference", q.cpu_blocks));
                (q.data, q.diff, note)
            } else {
                let d = dtype_of(ty).ok_or_else(|| {
                    Error::input(format!(
                        "type {} is neither a block nor a float type",
                        ty.name()
                    ))
                    .at(input, &t.name)
                })?;
                let (c, d) =
                    quantize::convert_diff(dev, &view, d).map_err(|e| e.at(input, &t.name))?;
                (c.data, d, None)
            };
            stages.kernel += tk.elapsed().as_secs_f64();
            let mut r = pass_through(t, 0.0);
            r.op = ty.name().into();
            r.dtypes_out = vec![ty.name().into()];
            r.bytes_out = data.len() as u64;
            r.max_abs_err = Some(stats.max_abs);
            r.rmse = Some(stats.rmse());
            r.snr_db = Some(stats.snr_db());
            r.note = note;
            r.seconds = t0.elapsed().as_secs_f64();
            report.tensors.push(r);
            let tw = Instant::now();
            send(tx, t, Cow::Owned(data))?;
            stages.wait += tw.elapsed().as_secs_f64();
        }
        Ok(())
    })?;
    let ts = Instant::now();
    let file = w.finish_staged()?;
    stages.sync = ts.elapsed().as_secs_f64();
    report.totals.stages = stages;
    report.finish_totals(start.elapsed().as_secs_f64());
    dest.commit(&dests, file, &report)?;
    Ok(report)
}

/// `dequantize FILE.gguf -o OUT`: every tensor of a GGML block type or a
/// float type becomes `dtype` (others are copied; a safetensors output
/// refuses them). OUT is a .gguf (metadata kept, file type set) or a
/// .safetensors file (same tensor names, row-major shapes).
pub fn dequantize_gguf(
    dev: &Device,
    input: &Path,
    dest: &Destination,
    dtype: DType,
) -> Result<Report> {
    dtype.require_float("dequantize")?;
    let start = Instant::now();
    let src = Inputs {
        gguf: Some(GgufFile::open(input)?),
        model: None,
    };
    let dests = dest.check(&src, &["gguf", "safetensors"])?;
    let out = &dest.output;
    let Some(g) = &src.gguf else {
        return Err(Error::input("a GGUF input"));
    };
    let target = ggml_of(dtype).ok_or_else(|| Error::input(format!("{dtype} has no GGML type")))?;
    let changes = |t: GgmlType| BlockType::from_ggml(t).is_some() || dtype_of(t).is_some();
    let to_gguf = out.extension().is_some_and(|e| e == "gguf");
    let mut report = Report {
        command: "dequantize".into(),
        device: dev.name(),
        inputs: vec![input.display().to_string()],
        output: out.display().to_string(),
        tensors: Vec::with_capacity(g.tensors.len()),
        totals: Default::default(),
    };
    enum Writer {
        Gguf(GgufWriter),
        St(SafetensorsWriter),
    }
    let w = if to_gguf {
        let mut meta = g.metadata.clone();
        meta.retain(|(k, _)| k != "general.file_type" && k != "general.quantization_version");
        meta.push((
            "general.file_type".into(),
            Value::U32(
                file_type(target)
                    .ok_or_else(|| Error::input(format!("{}: no file type", target.name())))?,
            ),
        ));
        let outs = g
            .tensors
            .iter()
            .map(|t| GgufOut {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: if changes(t.ty) { target } else { t.ty },
            })
            .collect();
        Writer::Gguf(GgufWriter::create(&dests[0], &meta, outs)?)
    } else {
        let entries = g
            .tensors
            .iter()
            .map(|t| {
                let ty = if changes(t.ty) { target } else { t.ty };
                match DType::parse(ty.name()) {
                    Some(d) => Ok(OutEntry {
                        name: t.name.clone(),
                        dtype: d.name().into(),
                        shape: t.shape(),
                    }),
                    None => Err(Error::Format {
                        file: input.display().to_string(),
                        tensor: Some(t.name.clone()),
                        why: format!("type {} has no safetensors dtype", ty.name()),
                    }),
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Writer::St(SafetensorsWriter::create(&dests[0], entries, None)?)
    };
    let inputs: Vec<In> = g
        .tensors
        .iter()
        .map(|t| In {
            name: t.name.clone(),
            shape: t.shape(),
            ty: t.ty,
            pages: Pages::Gguf(g, t),
        })
        .collect();
    fn write(w: &mut Writer, name: &str, bytes: &[u8]) -> Result<()> {
        match w {
            Writer::Gguf(w) => w.write(name, bytes),
            Writer::St(w) => w.write(name, bytes),
        }
    }
    let mut stages = Stages::default();
    // The disk writes one tensor while the next is dequantized.
    let w = write_behind(w, write, &mut stages, |tx, stages| {
        for (t, inp) in g.tensors.iter().zip(&inputs) {
            let t0 = Instant::now();
            let data = inp.data();
            let mut r = pass_through(inp, 0.0);
            let tr = Instant::now();
            inp.populate();
            stages.read += tr.elapsed().as_secs_f64();
            let tk = Instant::now();
            let convert = |d: DType, bytes: &[u8]| -> Result<Cow<'_, [u8]>> {
                let view = TensorRef::new(d, &inp.shape, bytes)?;
                let c = quantize::convert(dev, &view, dtype).map_err(|e| e.at(input, &t.name))?;
                Ok(Cow::Owned(c.data))
            };
            let n = t.numel() as usize;
            let bytes: Cow<[u8]> = match (BlockType::from_ggml(t.ty), dtype_of(t.ty)) {
                // On the CPU (or to f32): straight into the target dtype,
                // a few blocks at a time.
                (Some(bt), _) if matches!(dev, Device::Cpu) || dtype == DType::F32 => {
                    let b = ggml::dequantize_into(bt, data, n, dtype);
                    Cow::Owned(b.map_err(|e| e.at(input, &t.name))?)
                }
                // On a GPU: f32 on the CPU (ggml's dequantizers), then the
                // device rounds.
                (Some(bt), _) => {
                    let deq = ggml::dequantize(bt, data, n).map_err(|e| e.at(input, &t.name))?;
                    Cow::Owned(convert(DType::F32, bytemuck::cast_slice(&deq))?.into_owned())
                }
                (None, Some(d)) if d != dtype => Cow::Owned(convert(d, data)?.into_owned()),
                _ => Cow::Borrowed(data),
            };
            stages.kernel += tk.elapsed().as_secs_f64();
            if changes(t.ty) && t.ty != target {
                r.op = format!("{} -> {}", t.ty.name(), target.name());
                r.dtypes_out = vec![target.name().into()];
            }
            r.bytes_out = bytes.len() as u64;
            r.seconds = t0.elapsed().as_secs_f64();
            report.tensors.push(r);
            let tw = Instant::now();
            send(tx, inp, bytes)?;
            stages.wait += tw.elapsed().as_secs_f64();
        }
        Ok(())
    })?;
    let ts = Instant::now();
    let file = match w {
        Writer::Gguf(w) => w.finish_staged()?,
        Writer::St(w) => w.finish_staged()?,
    };
    stages.sync = ts.elapsed().as_secs_f64();
    report.totals.stages = stages;
    report.finish_totals(start.elapsed().as_secs_f64());
    dest.commit(&dests, file, &report)?;
    Ok(report)
}
