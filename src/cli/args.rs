//! The command line's clap types: the top-level parser, the options every
//! model operation takes, and one `Args` struct per subcommand.

use clap::{Args, Parser, Subcommand, ValueEnum};
use modelpress::ops::prune::NeuronNorm;
use std::path::PathBuf;

/// The whole command line.
#[derive(Parser)]
#[command(
    name = "modelpress",
    version,
    about = "Prune, quantize, patch and merge neural-network weights on any GPU"
)]
pub(super) struct Cli {
    #[command(subcommand)]
    pub(super) command: Command,
}

/// Options every model operation takes.
#[derive(Args, Clone)]
pub(super) struct Common {
    /// Output: a .safetensors file for a file input, a directory for a
    /// model directory.
    #[arg(short, long)]
    pub(super) output: PathBuf,
    /// auto (a hardware GPU, else the CPU), gpu (any adapter), cpu, or an
    /// adapter name substring.
    #[arg(long, default_value = "auto")]
    pub(super) device: String,
    /// Touch only tensors whose name matches (repeatable), among those the
    /// job touches by default: float tensors of rank ≥ 2.
    #[arg(long)]
    pub(super) include: Vec<String>,
    /// Touch float tensors of every rank, norms and biases included (which
    /// jobs leave alone by default); --include/--exclude narrow it.
    #[arg(long)]
    pub(super) any_rank: bool,
    /// Leave tensors whose name matches untouched (repeatable).
    #[arg(long)]
    pub(super) exclude: Vec<String>,
    /// Write a JSON report: per tensor and in total.
    #[arg(long)]
    pub(super) report: Option<PathBuf>,
    /// Replace an existing output.
    #[arg(long)]
    pub(super) force: bool,
    /// Process tensors holding NaN or infinite weights instead of refusing.
    #[arg(long)]
    pub(super) allow_nonfinite: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum NormArg {
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
    pub(super) fn norm(self) -> NeuronNorm {
        match self {
            NormArg::L1 => NeuronNorm::L1,
            NormArg::L2 => NeuronNorm::L2,
            NormArg::Inf => NeuronNorm::Max,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum TailArg {
    Error,
    Keep,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum Int8Arg {
    PerTensor,
    PerRow,
}

#[derive(Subcommand)]
pub(super) enum Command {
    /// Tensors, dtypes, shapes, bytes and statistics of a model.
    Inspect(InspectArgs),
    /// Zero weights with |w| < T (--threshold), exactly a fraction S of them
    /// (--sparsity), all but N of every M (--pattern), or whole output
    /// neurons (--threshold T --rows).
    Prune(PruneArgs),
    /// int8: q = round(w·Q) (--scale Q) or symmetric abs-max scales (--int8);
    /// or a GGUF file of GGML type T (--type, output ending in .gguf).
    Quantize(QuantizeArgs),
    /// Turn a model quantized by `quantize` back into floats; a GGUF input
    /// becomes a .gguf or .safetensors output of --dtype.
    Dequantize(DequantizeArgs),
    /// w + L·Δ: Δ a model with the same tensors (--delta) or a scalar (--offset).
    Transfer(TransferArgs),
    /// The task vector FINETUNED − BASE.
    Delta(DeltaArgs),
    /// Σ Pᵢ·wᵢ over models with the same tensors.
    Mix(MixArgs),
    /// Merge models as a mergekit YAML configuration says (linear,
    /// task_arithmetic, ties, dare_*, breadcrumbs*, della*, slerp, nearswap,
    /// nuslerp, model_stock, sce, passthrough).
    Merge(MergeArgs),
    /// PEFT LoRA adapters: `lora merge BASE ADAPTER_DIR... -o OUT` folds
    /// them into the base (W + s·B·A), `--unmerge` takes them out.
    #[command(subcommand)]
    Lora(LoraCommand),
    /// Build a Mixtral-style mixture of experts from dense models
    /// (mergekit-moe's configuration: base_model, experts, gate_mode random).
    Moe(MoeArgs),
    /// Write a seeded LLaMA-shaped sample model directory.
    Sample(SampleArgs),
    /// List the GPU adapters wgpu finds, with the limits that matter.
    Devices,
    /// Build a small LLaMA-shaped sample model and run every operation on it.
    Demo(DemoArgs),
    /// Run every kernel on a seeded sample on the device and compare it
    /// with the CPU reference.
    Check(CheckArgs),
    /// Measure device and CPU throughput (GB/s) per kernel and size.
    Bench(BenchArgs),
}

/// `modelpress inspect`.
#[derive(Args)]
pub(super) struct InspectArgs {
    pub(super) model: PathBuf,
    /// JSON instead of a table.
    #[arg(long)]
    pub(super) json: bool,
}

/// `modelpress prune`.
#[derive(Args)]
#[command(group(clap::ArgGroup::new("mode").required(true).multiple(true).args(["threshold", "sparsity", "pattern", "rows", "cols", "remove_neurons"])))]
pub(super) struct PruneArgs {
    pub(super) model: PathBuf,
    #[arg(long, allow_negative_numbers = true)]
    pub(super) threshold: Option<f32>,
    /// N:M, e.g. 2:4: in each run of M consecutive weights along a row,
    /// keep the N largest |w| (ties to the lower index).
    #[arg(long)]
    pub(super) pattern: Option<String>,
    /// With --pattern, for rows whose length is not a multiple of M:
    /// `error` (default) or `keep` (leave the last, shorter run dense).
    #[arg(long, value_enum, default_value = "error", requires = "pattern")]
    pub(super) pattern_tail: TailArg,
    /// Zero exactly round(S·n) weights of each tensor, smallest |w| first
    /// (ties to the lower index); weights already zero count.
    #[arg(long, allow_negative_numbers = true)]
    pub(super) sparsity: Option<f64>,
    /// With --sparsity: one cut across all touched tensors.
    #[arg(long, requires = "sparsity")]
    pub(super) global: bool,
    /// Activation norms (Wanda): a safetensors file with, for each weight
    /// NAME, a 1-D tensor NAME of ‖X_j‖₂ per input feature. With
    /// --sparsity S, each output row loses exactly round(S·columns)
    /// weights of smallest |w|·‖X_j‖; with --pattern, runs rank by it.
    #[arg(long, value_name = "FILE")]
    pub(super) scores: Option<PathBuf>,
    /// With --sparsity: S of the weights still non-zero, on top of the zeros
    /// (PyTorch's repeated pruning).
    #[arg(long, requires = "sparsity")]
    pub(super) of_remaining: bool,
    /// Output neurons: with --threshold T, zero the rows whose norm is
    /// below T; with a value S, zero exactly round(S·rows) rows of
    /// smallest norm (PyTorch ln_structured, dim 0).
    #[arg(long, num_args = 0..=1, value_name = "S")]
    pub(super) rows: Option<Option<f64>>,
    /// Input features: zero exactly round(S·columns) columns of smallest
    /// norm (ln_structured, dim 1).
    #[arg(long, value_name = "S")]
    pub(super) cols: Option<f64>,
    /// Norm of a row or column.
    #[arg(long, value_enum, default_value = "2")]
    pub(super) norm: NormArg,
    /// Physically remove the fraction S of intermediate neurons of every
    /// MLP block (LLaMA gate/up/down_proj, BERT intermediate/output.dense)
    /// with the smallest ‖in rows‖·‖out column‖, and rewrite
    /// intermediate_size in config.json.
    #[arg(long, value_name = "S")]
    pub(super) remove_neurons: Option<f64>,
    #[command(flatten)]
    pub(super) common: Common,
}

/// `modelpress quantize`.
#[derive(Args)]
pub(super) struct QuantizeArgs {
    pub(super) model: PathBuf,
    /// GGUF output of llama-quantize's file type T: Q4_0, Q4_1, Q5_0,
    /// Q5_1, Q8_0, Q2_K, Q3_K (= Q3_K_M), Q3_K_S, Q3_K_M, Q3_K_L,
    /// Q4_K (= Q4_K_M), Q4_K_S, Q4_K_M, Q5_K (= Q5_K_M),
    /// Q5_K_S, Q5_K_M, Q6_K; or F32, F16, BF16.
    #[arg(long = "type", value_name = "T", conflicts_with_all = ["scale", "int8", "dequantize", "scheme"])]
    pub(super) gguf_type: Option<String>,
    /// compressed-tensors output (vLLM, transformers) of llm-compressor's
    /// preset S: W8A16, W4A16, W4A16_ASYM, W8A8, FP8_DYNAMIC, FP8_BLOCK,
    /// NVFP4A16, MXFP4A16. Quantizes the Linear layers' weights.
    #[arg(long, value_name = "S", conflicts_with_all = ["scale", "int8", "dequantize"])]
    pub(super) scheme: Option<String>,
    /// With --scheme (W8A16, W4A16, W4A16_ASYM): columns per scale group.
    #[arg(long, value_name = "N", requires = "scheme")]
    pub(super) group_size: Option<usize>,
    /// With --scheme: symmetric int weights (no zero points).
    #[arg(long, requires = "scheme", conflicts_with = "asymmetric")]
    pub(super) symmetric: bool,
    /// With --scheme W8A16 or W4A16: int weights with zero points.
    #[arg(long, requires = "scheme")]
    pub(super) asymmetric: bool,
    /// With --scheme: leave the Linear layers whose module path matches
    /// REGEX as they are; repeatable (default: lm_head).
    #[arg(long, value_name = "REGEX", requires = "scheme")]
    pub(super) ignore: Vec<String>,
    /// With --type: every quantized tensor gets T itself (llama-quantize
    /// --pure), without the mixes' per-tensor choices.
    #[arg(long, requires = "gguf_type")]
    pub(super) pure: bool,
    /// With --type: tensors whose name matches PATTERN (a regex,
    /// lowercased) get TYPE, the first match winning; repeatable
    /// (llama-quantize --tensor-type).
    #[arg(
        long = "tensor-type",
        value_name = "PATTERN=TYPE",
        requires = "gguf_type"
    )]
    pub(super) tensor_type: Vec<String>,
    /// With --type: more --tensor-type options, read from a file
    /// (separated by spaces or newlines), after those given inline.
    #[arg(long, value_name = "FILE", requires = "gguf_type")]
    pub(super) tensor_type_file: Option<PathBuf>,
    /// With --type: the type of output.weight (and of tied token
    /// embeddings).
    #[arg(long, value_name = "TYPE", requires = "gguf_type")]
    pub(super) output_tensor_type: Option<String>,
    /// With --type: the type of the token embeddings.
    #[arg(long, value_name = "TYPE", requires = "gguf_type")]
    pub(super) token_embedding_type: Option<String>,
    /// With --type: leave output.weight as it is.
    #[arg(long, requires = "gguf_type")]
    pub(super) leave_output_tensor: bool,
    /// With --type: dequantize tensors already in a GGML block type and
    /// quantize them again (worse than quantizing from 16 or 32 bits).
    #[arg(long, requires = "gguf_type")]
    pub(super) allow_requantize: bool,
    #[arg(
        long,
        allow_negative_numbers = true,
        conflicts_with = "int8",
        required_unless_present_any = ["int8", "gguf_type", "scheme"]
    )]
    pub(super) scale: Option<f32>,
    #[arg(long, value_enum)]
    pub(super) int8: Option<Int8Arg>,
    /// Write the round trip in the input's float dtype instead.
    #[arg(long)]
    pub(super) dequantize: bool,
    #[command(flatten)]
    pub(super) common: Common,
}

/// `modelpress dequantize`.
#[derive(Args)]
pub(super) struct DequantizeArgs {
    pub(super) model: PathBuf,
    /// Float type of a GGUF input's dequantized tensors: f32, f16, bf16.
    #[arg(long, default_value = "f32")]
    pub(super) dtype: String,
    #[command(flatten)]
    pub(super) common: Common,
}

/// `modelpress transfer`.
#[derive(Args)]
pub(super) struct TransferArgs {
    pub(super) model: PathBuf,
    #[arg(long, conflicts_with = "offset", required_unless_present = "offset")]
    pub(super) delta: Option<PathBuf>,
    #[arg(long, allow_negative_numbers = true)]
    pub(super) offset: Option<f32>,
    #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
    pub(super) lambda: f32,
    #[command(flatten)]
    pub(super) common: Common,
}

/// `modelpress delta`.
#[derive(Args)]
pub(super) struct DeltaArgs {
    pub(super) finetuned: PathBuf,
    pub(super) base: PathBuf,
    #[command(flatten)]
    pub(super) common: Common,
}

/// `modelpress mix`.
#[derive(Args)]
pub(super) struct MixArgs {
    #[arg(required = true, num_args = 2..)]
    pub(super) models: Vec<PathBuf>,
    #[arg(
        long,
        allow_hyphen_values = true,
        value_delimiter = ',',
        required = true
    )]
    pub(super) weights: Vec<f32>,
    /// Divide the weights by their sum.
    #[arg(long)]
    pub(super) normalize: bool,
    #[command(flatten)]
    pub(super) common: Common,
}

/// `modelpress lora ...`.
#[derive(Subcommand)]
pub(super) enum LoraCommand {
    /// Fold PEFT LoRA adapters (directories with adapter_config.json and
    /// adapter_model.safetensors) into BASE: W + Σ wᵢ·sᵢ·Bᵢ·Aᵢ, rounded once.
    Merge(LoraMergeArgs),
    /// Turn FINETUNED − BASE back into a PEFT LoRA adapter of rank R
    /// (a truncated SVD of each Linear layer's delta).
    Extract(LoraExtractArgs),
}

/// `modelpress lora extract`.
#[derive(Args)]
pub(super) struct LoraExtractArgs {
    pub(super) finetuned: PathBuf,
    pub(super) base: PathBuf,
    /// The adapter directory to write.
    #[arg(short, long)]
    pub(super) output: PathBuf,
    /// Rank R of every module (lower where the delta's rank is).
    #[arg(long)]
    pub(super) rank: usize,
    /// Drop singular values at or below E.
    #[arg(long, value_name = "E", default_value_t = 0.0)]
    pub(super) sv_epsilon: f64,
    /// auto (a hardware GPU, else the CPU), gpu, cpu, or an adapter name
    /// substring.
    #[arg(long, default_value = "auto")]
    pub(super) device: String,
    /// Write a JSON report: per module, the rank and the energy kept.
    #[arg(long)]
    pub(super) report: Option<PathBuf>,
    /// Replace an existing output.
    #[arg(long)]
    pub(super) force: bool,
}

/// `modelpress lora merge`.
#[derive(Args)]
pub(super) struct LoraMergeArgs {
    pub(super) base: PathBuf,
    #[arg(required = true, num_args = 1..)]
    pub(super) adapters: Vec<PathBuf>,
    /// One weight per adapter (default 1 each).
    #[arg(long, allow_hyphen_values = true, value_delimiter = ',')]
    pub(super) weights: Vec<f32>,
    /// Subtract the adapters instead (W − s·B·A); DoRA cannot be unmerged.
    #[arg(long)]
    pub(super) unmerge: bool,
    #[command(flatten)]
    pub(super) common: Common,
}

/// `modelpress moe`.
#[derive(Args)]
pub(super) struct MoeArgs {
    /// mergekit-moe's YAML: base_model, experts (source_model), gate_mode,
    /// experts_per_token.
    pub(super) config: PathBuf,
    /// Seed of the random routers.
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    #[command(flatten)]
    pub(super) common: Common,
}

/// `modelpress merge`.
#[derive(Args)]
pub(super) struct MergeArgs {
    /// mergekit's YAML: merge_method, base_model, models, parameters, dtype,
    /// out_dtype, tokenizer_source.
    pub(super) config: PathBuf,
    /// Seed of DARE's random drops (the same masks on every device and run).
    #[arg(long, default_value_t = 0)]
    pub(super) seed: u64,
    /// Merge models whose vocabularies differ in size by cutting the
    /// embeddings and head to the fewest rows (config.json's vocab_size
    /// follows; the tokenizer files do not).
    #[arg(long)]
    pub(super) unsafe_truncate_embeddings: bool,
    #[command(flatten)]
    pub(super) common: Common,
}

/// `modelpress sample`.
#[derive(Args)]
pub(super) struct SampleArgs {
    pub(super) output: PathBuf,
    /// demo (4 M weights), 100m, or 1g (590 M weights, 1.18 GB in BF16).
    #[arg(long, default_value = "demo")]
    pub(super) size: String,
    #[arg(long, default_value = "bf16")]
    pub(super) dtype: String,
    #[arg(long, default_value_t = 2)]
    pub(super) shards: usize,
    #[arg(long, default_value_t = 42)]
    pub(super) seed: u64,
}

/// `modelpress demo`.
#[derive(Args)]
pub(super) struct DemoArgs {
    #[arg(long, default_value = "auto")]
    pub(super) device: String,
    #[arg(long, default_value_t = 42)]
    pub(super) seed: u64,
    /// Keep the sample and outputs in this directory instead of a
    /// temporary one.
    #[arg(long)]
    pub(super) keep: Option<PathBuf>,
}

/// `modelpress check`.
#[derive(Args)]
pub(super) struct CheckArgs {
    #[arg(long, default_value = "gpu")]
    pub(super) device: String,
    /// Elements per sample tensor.
    #[arg(long, default_value_t = 1 << 20)]
    pub(super) elements: usize,
    #[arg(long, default_value_t = 42)]
    pub(super) seed: u64,
}

/// `modelpress bench`.
#[derive(Args)]
pub(super) struct BenchArgs {
    #[arg(long, default_value = "gpu")]
    pub(super) device: String,
    /// Sizes in elements, comma-separated (k and M suffixes allowed).
    #[arg(long, default_value = "1M,16M,64M", value_delimiter = ',')]
    pub(super) sizes: Vec<String>,
    /// Timed repetitions per measurement (the best is kept).
    #[arg(long, default_value_t = 3)]
    pub(super) reps: usize,
    /// Kernel names to run (default: all).
    #[arg(long, value_delimiter = ',')]
    pub(super) kernels: Vec<String>,
}
