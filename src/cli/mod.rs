//! The `modelpress` command line (clap). `main.rs` only calls `cli::main`.

mod demo;

use clap::{Args, Parser, Subcommand, ValueEnum};
use modelpress::device::{list_adapters, Device};
use modelpress::error::{Error, Result};
use modelpress::formats::model::Model;
use modelpress::jobs::pipeline::{self, JobOptions, Selection, TensorOp};
use modelpress::jobs::report::Report;
use modelpress::jobs::{Dequantize, Mix, Prune, QuantScheme, Quantize, Transfer};
use modelpress::ops::prune::NeuronNorm;
use modelpress::ops::quantize::Granularity;
use modelpress::tools::bench::{self, BenchOptions};
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "modelpress",
    version,
    about = "Prune, quantize, patch and merge neural-network weights on any GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options every model operation takes.
#[derive(Args, Clone)]
struct Common {
    /// Output: a .safetensors file for a file input, a directory for a
    /// model directory.
    #[arg(short, long)]
    output: PathBuf,
    /// auto (a hardware GPU, else the CPU), gpu (any adapter), cpu, or an
    /// adapter name substring.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Touch only tensors whose name matches (repeatable), among those the
    /// job touches by default: float tensors of rank ≥ 2.
    #[arg(long)]
    include: Vec<String>,
    /// Touch float tensors of every rank, norms and biases included (which
    /// jobs leave alone by default); --include/--exclude narrow it.
    #[arg(long)]
    any_rank: bool,
    /// Leave tensors whose name matches untouched (repeatable).
    #[arg(long)]
    exclude: Vec<String>,
    /// Write a JSON report: per tensor and in total.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Replace an existing output.
    #[arg(long)]
    force: bool,
    /// Process tensors holding NaN or infinite weights instead of refusing.
    #[arg(long)]
    allow_nonfinite: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum NormArg {
    /// Σ|w|
    #[value(name = "1", alias = "l1")]
    L1,
    /// √Σw²
    #[value(name = "2", alias = "l2")]
    L2,
    /// max |w|
    #[value(name = "inf", alias = "max")]
    Inf,
}

impl NormArg {
    fn norm(self) -> NeuronNorm {
        match self {
            NormArg::L1 => NeuronNorm::L1,
            NormArg::L2 => NeuronNorm::L2,
            NormArg::Inf => NeuronNorm::Max,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum TailArg {
    Error,
    Keep,
}

#[derive(Clone, Copy, ValueEnum)]
enum Int8Arg {
    PerTensor,
    PerRow,
}

#[derive(Subcommand)]
enum Command {
    /// Tensors, dtypes, shapes, bytes and statistics of a model.
    Inspect {
        model: PathBuf,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Zero weights with |w| < T (--threshold), exactly a fraction S of them
    /// (--sparsity), all but N of every M (--pattern), or whole output
    /// neurons (--threshold T --rows).
    #[command(group(clap::ArgGroup::new("mode").required(true).multiple(true).args(["threshold", "sparsity", "pattern", "rows", "cols", "remove_neurons"])))]
    Prune {
        model: PathBuf,
        #[arg(long, allow_negative_numbers = true)]
        threshold: Option<f32>,
        /// N:M, e.g. 2:4: in each run of M consecutive weights along a row,
        /// keep the N largest |w| (ties to the lower index).
        #[arg(long)]
        pattern: Option<String>,
        /// With --pattern, for rows whose length is not a multiple of M:
        /// `error` (default) or `keep` (leave the last, shorter run dense).
        #[arg(long, value_enum, default_value = "error", requires = "pattern")]
        pattern_tail: TailArg,
        /// Zero exactly round(S·n) weights of each tensor, smallest |w| first
        /// (ties to the lower index); weights already zero count.
        #[arg(long, allow_negative_numbers = true)]
        sparsity: Option<f64>,
        /// With --sparsity: one cut across all touched tensors.
        #[arg(long, requires = "sparsity")]
        global: bool,
        /// Activation norms (Wanda): a safetensors file with, for each weight
        /// NAME, a 1-D tensor NAME of ‖X_j‖₂ per input feature. With
        /// --sparsity S, each output row loses exactly round(S·columns)
        /// weights of smallest |w|·‖X_j‖; with --pattern, runs rank by it.
        #[arg(long, value_name = "FILE")]
        scores: Option<PathBuf>,
        /// With --sparsity: S of the weights still non-zero, on top of the zeros
        /// (PyTorch's repeated pruning).
        #[arg(long, requires = "sparsity")]
        of_remaining: bool,
        /// Output neurons: with --threshold T, zero the rows whose norm is
        /// below T; with a value S, zero exactly round(S·rows) rows of
        /// smallest norm (PyTorch ln_structured, dim 0).
        #[arg(long, num_args = 0..=1, value_name = "S")]
        rows: Option<Option<f64>>,
        /// Input features: zero exactly round(S·columns) columns of smallest
        /// norm (ln_structured, dim 1).
        #[arg(long, value_name = "S")]
        cols: Option<f64>,
        /// Norm of a row or column.
        #[arg(long, value_enum, default_value = "2")]
        norm: NormArg,
        /// Physically remove the fraction S of intermediate neurons of every
        /// MLP block (LLaMA gate/up/down_proj, BERT intermediate/output.dense)
        /// with the smallest ‖in rows‖·‖out column‖, and rewrite
        /// intermediate_size in config.json.
        #[arg(long, value_name = "S")]
        remove_neurons: Option<f64>,
        #[command(flatten)]
        common: Common,
    },
    /// int8: q = round(w·Q) (--scale Q) or symmetric abs-max scales (--int8);
    /// or a GGUF file of GGML type T (--type, output ending in .gguf).
    Quantize {
        model: PathBuf,
        /// GGUF output of llama-quantize's file type T: Q4_0, Q4_1, Q5_0,
        /// Q5_1, Q8_0, Q2_K, Q3_K (= Q3_K_M), Q3_K_S, Q3_K_M, Q3_K_L,
        /// Q4_K (= Q4_K_M), Q4_K_S, Q4_K_M, Q5_K (= Q5_K_M),
        /// Q5_K_S, Q5_K_M, Q6_K; or F32, F16, BF16.
        #[arg(long = "type", value_name = "T", conflicts_with_all = ["scale", "int8", "dequantize"])]
        gguf_type: Option<String>,
        /// With --type: every quantized tensor gets T itself (llama-quantize
        /// --pure), without the mixes' per-tensor choices.
        #[arg(long, requires = "gguf_type")]
        pure: bool,
        /// With --type: tensors whose name matches PATTERN (a regex,
        /// lowercased) get TYPE, the first match winning; repeatable
        /// (llama-quantize --tensor-type).
        #[arg(
            long = "tensor-type",
            value_name = "PATTERN=TYPE",
            requires = "gguf_type"
        )]
        tensor_type: Vec<String>,
        /// With --type: more --tensor-type options, read from a file
        /// (separated by spaces or newlines), after those given inline.
        #[arg(long, value_name = "FILE", requires = "gguf_type")]
        tensor_type_file: Option<PathBuf>,
        /// With --type: the type of output.weight (and of tied token
        /// embeddings).
        #[arg(long, value_name = "TYPE", requires = "gguf_type")]
        output_tensor_type: Option<String>,
        /// With --type: the type of the token embeddings.
        #[arg(long, value_name = "TYPE", requires = "gguf_type")]
        token_embedding_type: Option<String>,
        /// With --type: leave output.weight as it is.
        #[arg(long, requires = "gguf_type")]
        leave_output_tensor: bool,
        /// With --type: dequantize tensors already in a GGML block type and
        /// quantize them again (worse than quantizing from 16 or 32 bits).
        #[arg(long, requires = "gguf_type")]
        allow_requantize: bool,
        #[arg(
            long,
            allow_negative_numbers = true,
            conflicts_with = "int8",
            required_unless_present_any = ["int8", "gguf_type"]
        )]
        scale: Option<f32>,
        #[arg(long, value_enum)]
        int8: Option<Int8Arg>,
        /// Write the round trip in the input's float dtype instead.
        #[arg(long)]
        dequantize: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Turn a model quantized by `quantize` back into floats; a GGUF input
    /// becomes a .gguf or .safetensors output of --dtype.
    Dequantize {
        model: PathBuf,
        /// Float type of a GGUF input's dequantized tensors: f32, f16, bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        #[command(flatten)]
        common: Common,
    },
    /// w + L·Δ: Δ a model with the same tensors (--delta) or a scalar (--offset).
    Transfer {
        model: PathBuf,
        #[arg(long, conflicts_with = "offset", required_unless_present = "offset")]
        delta: Option<PathBuf>,
        #[arg(long, allow_negative_numbers = true)]
        offset: Option<f32>,
        #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
        lambda: f32,
        #[command(flatten)]
        common: Common,
    },
    /// The task vector FINETUNED − BASE.
    Delta {
        finetuned: PathBuf,
        base: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Σ Pᵢ·wᵢ over models with the same tensors.
    Mix {
        #[arg(required = true, num_args = 2..)]
        models: Vec<PathBuf>,
        #[arg(
            long,
            allow_hyphen_values = true,
            value_delimiter = ',',
            required = true
        )]
        weights: Vec<f32>,
        /// Divide the weights by their sum.
        #[arg(long)]
        normalize: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Write a seeded LLaMA-shaped sample model directory.
    Sample {
        output: PathBuf,
        /// demo (4 M weights), 100m, or 1g (590 M weights, 1.18 GB in BF16).
        #[arg(long, default_value = "demo")]
        size: String,
        #[arg(long, default_value = "bf16")]
        dtype: String,
        #[arg(long, default_value_t = 2)]
        shards: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// List the GPU adapters wgpu finds, with the limits that matter.
    Devices,
    /// Build a small LLaMA-shaped sample model and run every operation on it.
    Demo {
        #[arg(long, default_value = "auto")]
        device: String,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Keep the sample and outputs in this directory instead of a
        /// temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
    /// Run every kernel on a seeded sample on the device and compare it
    /// with the CPU reference.
    Check {
        #[arg(long, default_value = "gpu")]
        device: String,
        /// Elements per sample tensor.
        #[arg(long, default_value_t = 1 << 20)]
        elements: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Measure device and CPU throughput (GB/s) per kernel and size.
    Bench {
        #[arg(long, default_value = "gpu")]
        device: String,
        /// Sizes in elements, comma-separated (k and M suffixes allowed).
        #[arg(long, default_value = "1M,16M,64M", value_delimiter = ',')]
        sizes: Vec<String>,
        /// Timed repetitions per measurement (the best is kept).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Kernel names to run (default: all).
        #[arg(long, value_delimiter = ',')]
        kernels: Vec<String>,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    // Mesa prints a warning on every adapter scan without it.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,wgpu_hal::gles=off"),
    )
    // Warnings read as the rest of our messages: one line, no timestamp.
    .format(|buf, rec| {
        use std::io::Write;
        let level = rec.level().as_str().to_lowercase();
        if rec.target().starts_with("modelpress") {
            writeln!(buf, "modelpress: {level}: {}", rec.args())
        } else {
            writeln!(
                buf,
                "modelpress: {level} ({}): {}",
                rec.target(),
                rec.args()
            )
        }
    })
    .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help, --version, or a usage error (exit 2), printed by clap.
        Err(e) => {
            return match e.print() {
                Err(p) if p.kind() == std::io::ErrorKind::BrokenPipe => 141,
                Err(_) => 1,
                Ok(()) => e.exit_code(),
            }
        }
    };
    if let Err(e) = modelpress::formats::output::install_signal_cleanup() {
        log::warn!("{e}; an interrupted job may leave temporary files");
    }
    match run(cli) {
        Ok(()) => 0,
        // A reader that went away (`| head`): end quietly, as SIGPIPE would.
        Err(Error::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => 141,
        Err(e) => {
            use std::io::Write;
            // Nothing more can be said if stderr is gone too.
            let _ = writeln!(std::io::stderr(), "modelpress: error: {e}");
            1
        }
    }
}

fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

fn options(c: &Common) -> Result<JobOptions> {
    Ok(JobOptions {
        device: Device::choose(&c.device)?,
        selection: Selection::new(&c.include, &c.exclude, c.any_rank)?,
        allow_nonfinite: c.allow_nonfinite,
        force: c.force,
        report: c.report.clone(),
        extra_inputs: Vec::new(),
        progress: Some(std::sync::Arc::new(Bar::new())),
        command: command_line(),
    })
}

/// The progress bar of a job, drawn on stderr when it is a terminal and
/// cleared when the job ends, either way.
struct Bar(indicatif::ProgressBar);

impl Bar {
    fn new() -> Bar {
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

/// Where a GGUF job writes.
fn destination(c: &Common, extra_inputs: Vec<PathBuf>) -> modelpress::jobs::gguf::Destination {
    modelpress::jobs::gguf::Destination {
        output: c.output.clone(),
        report: c.report.clone(),
        force: c.force,
        extra_inputs,
    }
}

/// Runs one job (output and report committed together) and prints its
/// summary.
fn job(op: &dyn TensorOp, models: &[Model], c: &Common) -> Result<Report> {
    job_with(op, models, c, &options(c)?)
}

fn job_with(op: &dyn TensorOp, models: &[Model], c: &Common, opts: &JobOptions) -> Result<Report> {
    let report = pipeline::run(op, models, &c.output, opts)?;
    print_summary(&report)?;
    Ok(report)
}

fn print_summary(r: &Report) -> Result<()> {
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

fn open(p: &Path) -> Result<Model> {
    Model::open(p)
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect { model, json } => {
            if model.is_file() && modelpress::formats::gguf::GgufFile::sniff(&model) {
                return inspect_gguf(&model, json);
            }
            let m = open(&model)?;
            let rows = modelpress::tools::inspect::inspect(&m)?;
            if json {
                modelpress::outln!("{}", serde_json::to_string_pretty(&rows).expect("json"))?;
                return Ok(());
            }
            modelpress::outln!(
                "{:<48} {:>5} {:>16} {:>10} {:>10} {:>10} {:>10} {:>10} {:>8} {:>5}",
                "tensor",
                "dtype",
                "shape",
                "bytes",
                "min",
                "max",
                "mean",
                "std",
                "zeros%",
                "!fin"
            )?;
            for r in &rows {
                let shape = format!("{:?}", r.shape);
                match r.stats {
                    Some(s) => modelpress::outln!(
                        "{:<48} {:>5} {:>16} {:>10} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>8.2} {:>5}",
                        r.name,
                        r.dtype,
                        shape,
                        human_bytes(r.bytes),
                        s.min,
                        s.max,
                        s.mean,
                        s.std,
                        100.0 * s.zeros as f64 / r.shape.iter().product::<usize>().max(1) as f64,
                        s.nonfinite
                    )?,
                    None => modelpress::outln!("{:<48} {:>5} {:>16} {:>10}", r.name, r.dtype, shape, human_bytes(r.bytes))?,
                }
            }
            let total: u64 = rows.iter().map(|r| r.bytes).sum();
            modelpress::outln!("{} tensors, {}", rows.len(), human_bytes(total))?;
            Ok(())
        }
        Command::Prune {
            model,
            threshold,
            pattern,
            pattern_tail,
            sparsity,
            global,
            scores,
            of_remaining,
            rows,
            cols,
            norm,
            remove_neurons,
            common,
        } => {
            let modes = [
                threshold.is_some(),
                sparsity.is_some(),
                pattern.is_some(),
                matches!(rows, Some(Some(_))),
                cols.is_some(),
                remove_neurons.is_some(),
            ];
            let rows_flag = matches!(rows, Some(None));
            if modes.iter().filter(|&&m| m).count() != 1 || (rows_flag && threshold.is_none()) {
                return Err(Error::input(
                    "choose one of --threshold T [--rows], --sparsity S, --pattern N:M, --rows S, --cols S, --remove-neurons S",
                ));
            }
            let scores = scores
                .as_deref()
                .map(modelpress::jobs::ScoresFile::open)
                .transpose()?;
            if scores.is_some()
                && (threshold.is_some()
                    || global
                    || of_remaining
                    || rows.is_some()
                    || cols.is_some())
            {
                return Err(Error::input(
                    "--scores goes with --sparsity S (per row) or --pattern N:M only",
                ));
            }
            if let Some(frac) = remove_neurons {
                if !common.include.is_empty() || !common.exclude.is_empty() || common.any_rank {
                    return Err(Error::input(
                        "--remove-neurons changes whole MLP blocks: --include/--exclude would leave them inconsistent",
                    ));
                }
                let m = open(&model)?;
                let opts = options(&common)?;
                let op = modelpress::jobs::neurons::RemoveNeurons::new(&opts.device, &m, frac)?;
                return job_with(&op, &[m], &common, &opts).map(|_| ());
            }
            if let Some(p) = pattern {
                let op = modelpress::jobs::PatternPrune {
                    pattern: modelpress::ops::select::Pattern::parse(&p)?,
                    keep_tail: matches!(pattern_tail, TailArg::Keep),
                    scores,
                };
                return job(&op, &[open(&model)?], &common).map(|_| ());
            }
            let structured = match (rows, cols) {
                (Some(Some(s)), _) => Some((modelpress::ops::prune::Axis::Rows, s)),
                (_, Some(s)) => Some((modelpress::ops::prune::Axis::Cols, s)),
                _ => None,
            };
            if let Some((axis, s)) = structured {
                modelpress::ops::select::check_sparsity(s)?;
                let op = modelpress::jobs::Lines {
                    axis,
                    s,
                    norm: norm.norm(),
                };
                return job(&op, &[open(&model)?], &common).map(|_| ());
            }
            if let (Some(s), Some(sc)) = (sparsity, scores) {
                let op = modelpress::jobs::Sparsity::with_scores(s, sc)?;
                return job(&op, &[open(&model)?], &common).map(|_| ());
            }
            if let Some(s) = sparsity {
                let m = open(&model)?;
                let opts = options(&common)?;
                let op = if global {
                    modelpress::jobs::Sparsity::global(
                        &opts.device,
                        &m,
                        &opts.selection,
                        s,
                        of_remaining,
                    )?
                } else {
                    modelpress::jobs::Sparsity::per_tensor(s, of_remaining)?
                };
                return job_with(&op, &[m], &common, &opts).map(|_| ());
            }
            let threshold = threshold.expect("checked above");
            let op = if rows_flag {
                Prune::Rows(threshold, norm.norm())
            } else {
                Prune::Threshold(threshold)
            };
            check_tau(threshold)?;
            job(&op, &[open(&model)?], &common).map(|_| ())
        }
        Command::Quantize {
            model,
            gguf_type,
            pure,
            tensor_type,
            tensor_type_file,
            output_tensor_type,
            token_embedding_type,
            leave_output_tensor,
            allow_requantize,
            scale,
            int8,
            dequantize,
            common,
        } => {
            if let Some(t) = gguf_type {
                use modelpress::jobs::gguf::rules::{writable_type, Overrides};
                let mut overrides = Overrides {
                    output: output_tensor_type
                        .as_deref()
                        .map(writable_type)
                        .transpose()?,
                    token_embd: token_embedding_type
                        .as_deref()
                        .map(writable_type)
                        .transpose()?,
                    leave_output: leave_output_tensor,
                    ..Default::default()
                };
                let mut opts = tensor_type;
                if let Some(f) = &tensor_type_file {
                    let bytes = modelpress::formats::read_input(f)?;
                    let text = String::from_utf8(bytes).map_err(|_| {
                        Error::input(format!(
                            "--tensor-type-file {}: not UTF-8 text",
                            f.display()
                        ))
                    })?;
                    opts.extend(text.split_whitespace().map(String::from));
                }
                for o in &opts {
                    overrides.add_tensor_type(o)?;
                }
                let dev = Device::choose(&common.device)?;
                let r = modelpress::jobs::gguf::write_gguf(
                    &dev,
                    &model,
                    &destination(&common, tensor_type_file.into_iter().collect()),
                    modelpress::jobs::gguf::GgufOptions {
                        target: t,
                        pure,
                        overrides,
                        allow_requantize,
                    },
                )?;
                print_gguf_report(&r)?;
                return Ok(());
            }
            let scheme = match (scale, int8) {
                (Some(q), _) => {
                    if !(q.is_finite() && q > 0.0) {
                        return Err(Error::input(format!(
                            "--scale must be finite and > 0, got {q}"
                        )));
                    }
                    QuantScheme::Round(q)
                }
                (None, Some(Int8Arg::PerRow)) => QuantScheme::AbsMax(Granularity::PerRow),
                (None, Some(Int8Arg::PerTensor)) => QuantScheme::AbsMax(Granularity::PerTensor),
                (None, None) => {
                    return Err(Error::input("give --scale Q or --int8 per-tensor|per-row"))
                }
            };
            job(&Quantize { scheme, dequantize }, &[open(&model)?], &common).map(|_| ())
        }
        Command::Dequantize {
            model,
            dtype,
            common,
        } => {
            if model.is_file() && modelpress::formats::gguf::GgufFile::sniff(&model) {
                let dev = Device::choose(&common.device)?;
                let d = modelpress::DType::parse(&dtype)
                    .filter(|d| d.is_kernel_float())
                    .ok_or_else(|| {
                        Error::input(format!("--dtype {dtype}: expected f32, f16 or bf16"))
                    })?;
                let r = modelpress::jobs::gguf::dequantize_gguf(
                    &dev,
                    &model,
                    &destination(&common, vec![]),
                    d,
                )?;
                print_gguf_report(&r)?;
                return Ok(());
            }
            let m = open(&model)?;
            let op = Dequantize::new(&m)?;
            job(&op, &[m], &common).map(|_| ())
        }
        Command::Transfer {
            model,
            delta,
            offset,
            lambda,
            common,
        } => {
            modelpress::ops::finite_param("--lambda", lambda)?;
            let mut models = vec![open(&model)?];
            if let Some(d) = &delta {
                models.push(open(d)?);
            }
            if let Some(x) = offset {
                modelpress::ops::finite_param("--offset", x)?;
            }
            job(&Transfer { lambda, offset }, &models, &common).map(|_| ())
        }
        Command::Delta {
            finetuned,
            base,
            common,
        } => {
            let models = vec![open(&finetuned)?, open(&base)?];
            job(
                &Transfer {
                    lambda: -1.0,
                    offset: None,
                },
                &models,
                &common,
            )
            .map(|_| ())
        }
        Command::Mix {
            models,
            weights,
            normalize,
            common,
        } => {
            if weights.len() != models.len() {
                return Err(Error::input(format!(
                    "{} weights for {} models",
                    weights.len(),
                    models.len()
                )));
            }
            let mut weights = weights;
            if normalize {
                let sum: f32 = weights.iter().sum();
                if sum == 0.0 || !sum.is_finite() {
                    return Err(Error::input(format!(
                        "--normalize: the weights sum to {sum}"
                    )));
                }
                weights.iter_mut().for_each(|w| *w /= sum);
            }
            let ms = models.iter().map(|p| open(p)).collect::<Result<Vec<_>>>()?;
            job(&Mix { weights }, &ms, &common).map(|_| ())
        }
        Command::Sample {
            output,
            size,
            dtype,
            shards,
            seed,
        } => {
            let shape = modelpress::tools::sample::LlamaShape::preset(&size)
                .ok_or_else(|| Error::input(format!("--size {size}: use demo, 100m or 1g")))?;
            let dtype = modelpress::tensor::DType::parse(&dtype)
                .filter(|d| d.is_kernel_float())
                .ok_or_else(|| Error::input(format!("--dtype {dtype}: use f32, f16 or bf16")))?;
            use modelpress::formats::plan::{check, Output, OutputKind};
            let out = Output {
                path: &output,
                role: "output",
                kind: OutputKind::Dir { names: Vec::new() },
            };
            check(&[], &[out], false)?;
            modelpress::tools::sample::write_llama_model(&output, shape, dtype, shards, seed)?;
            modelpress::outln!("wrote {}", output.display())?;
            Ok(())
        }
        Command::Devices => {
            let all = list_adapters();
            if all.is_empty() {
                modelpress::outln!("no GPU adapter found (the CPU backend is always available)")?;
            }
            for (i, a) in all.iter().enumerate() {
                modelpress::outln!("[{i}] {}", a.name)?;
                modelpress::outln!(
                    "    backend: {}  type: {}  driver: {}",
                    a.backend,
                    a.device_type,
                    a.driver
                )?;
                modelpress::outln!(
                    "    max storage binding: {}  max buffer: {}  workgroups/dim: {}  invocations/workgroup: {}",
                    human_bytes(a.max_storage_binding),
                    human_bytes(a.max_buffer),
                    a.max_workgroups_per_dim,
                    a.max_invocations_per_workgroup
                )?;
            }
            Ok(())
        }
        Command::Demo { device, seed, keep } => {
            demo::run(&Device::choose(&device)?, seed, keep.as_deref())
        }
        Command::Check {
            device,
            elements,
            seed,
        } => bench::check(&Device::choose(&device)?, elements, seed),
        Command::Bench {
            device,
            sizes,
            reps,
            kernels,
        } => {
            let dev = Device::choose(&device)?;
            let sizes = sizes
                .iter()
                .map(|s| bench::parse_count(s))
                .collect::<Result<Vec<_>>>()?;
            bench::run(
                &dev,
                &BenchOptions {
                    sizes,
                    reps,
                    kernels,
                },
            )
        }
    }
}

/// `inspect` on a GGUF file: metadata, then tensors with type and shape.
fn inspect_gguf(path: &Path, json: bool) -> Result<()> {
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
        modelpress::outln!("{}", serde_json::to_string_pretty(&v).expect("json"))?;
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

fn check_tau(t: f32) -> Result<()> {
    if t.is_nan() || t < 0.0 {
        return Err(Error::input(format!("--threshold must be ≥ 0, got {t}")));
    }
    Ok(())
}

/// One line per changed tensor (type, bytes, error) and a total.
fn print_gguf_report(r: &modelpress::jobs::report::Report) -> Result<()> {
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
