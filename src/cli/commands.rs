//! One function per subcommand, and what they share (job options, opening
//! models, running a job and printing its summary).

use super::args::*;
use super::format::*;
use modelpress::device::{list_adapters, Device};
use modelpress::error::{Error, Result};
use modelpress::formats::model::Model;
use modelpress::jobs::pipeline::{self, JobOptions, Selection, TensorOp};
use modelpress::jobs::report::Report;
use modelpress::jobs::{Dequantize, Mix, Prune, QuantScheme, Quantize, Transfer};
use modelpress::ops::quantize::Granularity;
use modelpress::tools::bench::{self, BenchOptions};
use std::path::{Path, PathBuf};

pub(super) fn command_line() -> String {
    std::env::args().collect::<Vec<_>>().join(" ")
}

pub(super) fn options(c: &Common) -> Result<JobOptions> {
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

/// Where a GGUF job writes.
pub(super) fn destination(
    c: &Common,
    extra_inputs: Vec<PathBuf>,
) -> modelpress::jobs::gguf::Destination {
    modelpress::jobs::gguf::Destination {
        output: c.output.clone(),
        report: c.report.clone(),
        force: c.force,
        extra_inputs,
    }
}

/// Runs one job (output and report committed together) and prints its
/// summary.
pub(super) fn job(op: &dyn TensorOp, models: &[Model], c: &Common) -> Result<Report> {
    job_with(op, models, c, &options(c)?)
}

pub(super) fn job_with(
    op: &dyn TensorOp,
    models: &[Model],
    c: &Common,
    opts: &JobOptions,
) -> Result<Report> {
    let report = pipeline::run(op, models, &c.output, opts)?;
    print_summary(&report)?;
    Ok(report)
}

pub(super) fn open(p: &Path) -> Result<Model> {
    Model::open(p)
}

/// `modelpress inspect`.
pub(super) fn inspect(a: InspectArgs) -> Result<()> {
    let InspectArgs { model, json } = a;
    if model.is_file() && modelpress::formats::gguf::GgufFile::sniff(&model) {
        return inspect_gguf(&model, json);
    }
    let m = open(&model)?;
    let ck = modelpress::jobs::Checkpoint::open(&m)?;
    let rows = modelpress::tools::inspect::inspect(&m, ck.as_ref())?;
    if json {
        modelpress::outln!(
            "{}",
            serde_json::to_string_pretty(&rows).map_err(|e| Error::input(e.to_string()))?
        )?;
        return Ok(());
    }
    if let Some(c) = &ck {
        modelpress::outln!(
            "compressed-tensors checkpoint ({}): {} quantized layers; * = statistics of the \
             dequantized weight",
            c.summary,
            c.modules().len()
        )?;
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
        let mut dtype = r.dtype.clone();
        if r.dequantized.is_some() {
            dtype.push('*');
        }
        match r.dequantized.or(r.stats) {
            Some(s) => modelpress::outln!(
                "{:<48} {:>5} {:>16} {:>10} {:>10.4} {:>10.4} {:>10.4} {:>10.4} {:>8.2} {:>5}",
                r.name,
                dtype,
                shape,
                human_bytes(r.bytes),
                s.min,
                s.max,
                s.mean,
                s.std,
                100.0 * s.zeros as f64 / s.count.max(1) as f64,
                s.nonfinite
            )?,
            None => modelpress::outln!(
                "{:<48} {:>5} {:>16} {:>10}",
                r.name,
                r.dtype,
                shape,
                human_bytes(r.bytes)
            )?,
        }
    }
    let total: u64 = rows.iter().map(|r| r.bytes).sum();
    modelpress::outln!("{} tensors, {}", rows.len(), human_bytes(total))?;
    Ok(())
}

/// `modelpress prune`.
pub(super) fn prune(a: PruneArgs) -> Result<()> {
    let PruneArgs {
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
    } = a;
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
        && (threshold.is_some() || global || of_remaining || rows.is_some() || cols.is_some())
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
            modelpress::jobs::Sparsity::global(&opts.device, &m, &opts.selection, s, of_remaining)?
        } else {
            modelpress::jobs::Sparsity::per_tensor(s, of_remaining)?
        };
        return job_with(&op, &[m], &common, &opts).map(|_| ());
    }
    let Some(threshold) = threshold else {
        return Err(Error::input(
            "give --threshold, --sparsity, --pattern, --rows, --cols or --remove-neurons",
        ));
    };
    let op = if rows_flag {
        Prune::Rows(threshold, norm.norm())
    } else {
        Prune::Threshold(threshold)
    };
    check_tau(threshold)?;
    job(&op, &[open(&model)?], &common).map(|_| ())
}

/// `modelpress quantize`.
pub(super) fn quantize(a: QuantizeArgs) -> Result<()> {
    let QuantizeArgs {
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
        scheme,
        group_size,
        symmetric,
        asymmetric,
        ignore,
        common,
    } = a;
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
    if let Some(s) = scheme {
        if !common.include.is_empty() || !common.exclude.is_empty() || common.any_rank {
            return Err(Error::input(
                "--scheme quantizes the Linear layers: leave layers out with --ignore \
                 (not --include, --exclude or --any-rank)",
            ));
        }
        let m = open(&model)?;
        let op = modelpress::jobs::CompressedTensors::new(
            &m,
            modelpress::jobs::SchemeOptions {
                scheme: modelpress::jobs::Scheme::parse(&s)?,
                group_size,
                symmetric: (symmetric || asymmetric).then_some(symmetric),
                ignore: (!ignore.is_empty()).then_some(ignore),
            },
        )?;
        return job(&op, &[m], &common).map(|_| ());
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
        (None, None) => return Err(Error::input("give --scale Q or --int8 per-tensor|per-row")),
    };
    job(&Quantize { scheme, dequantize }, &[open(&model)?], &common).map(|_| ())
}

/// `modelpress dequantize`.
pub(super) fn dequantize(a: DequantizeArgs) -> Result<()> {
    let DequantizeArgs {
        model,
        dtype,
        common,
    } = a;
    if model.is_file() && modelpress::formats::gguf::GgufFile::sniff(&model) {
        let dev = Device::choose(&common.device)?;
        let d = modelpress::DType::parse(&dtype)
            .filter(|d| d.is_kernel_float())
            .ok_or_else(|| Error::input(format!("--dtype {dtype}: expected f32, f16 or bf16")))?;
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
    if let Some(ck) = modelpress::jobs::Checkpoint::open(&m)? {
        return job(&modelpress::jobs::CtDequantize(ck), &[m], &common).map(|_| ());
    }
    let op = Dequantize::new(&m)?;
    job(&op, &[m], &common).map(|_| ())
}

/// `modelpress transfer`.
pub(super) fn transfer(a: TransferArgs) -> Result<()> {
    let TransferArgs {
        model,
        delta,
        offset,
        lambda,
        common,
    } = a;
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

/// `modelpress delta`.
pub(super) fn delta(a: DeltaArgs) -> Result<()> {
    let DeltaArgs {
        finetuned,
        base,
        common,
    } = a;
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

/// `modelpress mix`.
pub(super) fn mix(a: MixArgs) -> Result<()> {
    let MixArgs {
        models,
        weights,
        normalize,
        common,
    } = a;
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

/// `modelpress lora merge`.
pub(super) fn lora_merge(a: LoraMergeArgs) -> Result<()> {
    let LoraMergeArgs {
        base,
        adapters,
        weights,
        unmerge,
        common,
    } = a;
    if !common.include.is_empty() || !common.exclude.is_empty() || common.any_rank {
        return Err(Error::input(
            "lora merge changes the adapted modules: --include, --exclude and --any-rank do not apply",
        ));
    }
    let m = open(&base)?;
    let ads = adapters
        .iter()
        .map(|d| modelpress::jobs::lora::Adapter::open(d))
        .collect::<Result<Vec<_>>>()?;
    let op = modelpress::jobs::lora::LoraMerge::new(&m, ads, weights, unmerge)?;
    job(&op, &[m], &common).map(|_| ())
}

/// `modelpress lora extract`.
pub(super) fn lora_extract(a: LoraExtractArgs) -> Result<()> {
    let dev = Device::choose(&a.device)?;
    let (ft, base) = (open(&a.finetuned)?, open(&a.base)?);
    let rows = modelpress::jobs::lora::extract(
        &dev,
        &ft,
        &base,
        &modelpress::jobs::lora::ExtractOptions {
            rank: a.rank,
            sv_epsilon: a.sv_epsilon,
            output: &a.output,
            report: a.report.as_deref(),
            force: a.force,
        },
    )?;
    modelpress::outln!(
        "{:<56} {:>5} {:>12} {:>12} {:>12}",
        "module",
        "rank",
        "energy kept",
        "σ max",
        "σ next"
    )?;
    for r in &rows {
        modelpress::outln!(
            "{:<56} {:>5} {:>11.4}% {:>12.4e} {:>12.4e}",
            r.module,
            r.rank,
            100.0 * r.energy_kept,
            r.sigma_max,
            r.sigma_next
        )?;
    }
    let worst = rows.iter().map(|r| r.energy_kept).fold(1.0, f64::min);
    modelpress::outln!(
        "wrote {}: {} modules, rank ≤ {}, least energy kept {:.4}% on {}",
        a.output.display(),
        rows.iter().filter(|r| r.rank > 0).count(),
        a.rank,
        100.0 * worst,
        dev.name()
    )?;
    Ok(())
}

/// `modelpress moe`.
pub(super) fn moe(a: MoeArgs) -> Result<()> {
    let MoeArgs {
        config,
        seed,
        common,
    } = a;
    if !common.include.is_empty() || !common.exclude.is_empty() || common.any_rank {
        return Err(Error::input(
            "moe rebuilds every MLP: --include, --exclude and --any-rank do not apply",
        ));
    }
    let cfg = modelpress::jobs::moe::MoeConfig::load(&config, seed)?;
    let mut models = vec![open(&cfg.base_model)?];
    for e in &cfg.experts {
        models.push(open(&e.path)?);
    }
    let op = modelpress::jobs::moe::BuildMoe::new(cfg, &models)?;
    let mut opts = options(&common)?;
    opts.extra_inputs.push(config);
    job_with(&op, &models, &common, &opts).map(|_| ())
}

/// `modelpress merge`.
pub(super) fn merge(a: MergeArgs) -> Result<()> {
    let MergeArgs {
        config,
        seed,
        unsafe_truncate_embeddings,
        common,
    } = a;
    let cfg = modelpress::jobs::merge::config::MergeConfig::load(&config)?;
    let (op, models) = modelpress::jobs::merge::Merge::open(cfg, seed, unsafe_truncate_embeddings)?;
    let mut opts = options(&common)?;
    opts.extra_inputs.push(config);
    job_with(&op, &models, &common, &opts).map(|_| ())
}

/// `modelpress sample`.
pub(super) fn sample(a: SampleArgs) -> Result<()> {
    let SampleArgs {
        output,
        size,
        dtype,
        shards,
        seed,
    } = a;
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

/// `modelpress devices`.
pub(super) fn devices() -> Result<()> {
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

/// `modelpress check`.
pub(super) fn check(a: CheckArgs) -> Result<()> {
    let CheckArgs {
        device,
        elements,
        seed,
    } = a;
    bench::check(&Device::choose(&device)?, elements, seed)
}

/// `modelpress bench`.
pub(super) fn bench(a: BenchArgs) -> Result<()> {
    let BenchArgs {
        device,
        sizes,
        reps,
        kernels,
    } = a;
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

pub(super) fn check_tau(t: f32) -> Result<()> {
    if t.is_nan() || t < 0.0 {
        return Err(Error::input(format!("--threshold must be ≥ 0, got {t}")));
    }
    Ok(())
}

/// `modelpress demo`.
pub(super) fn demo(a: DemoArgs) -> Result<()> {
    let DemoArgs { device, seed, keep } = a;
    super::demo::run(&Device::choose(&device)?, seed, keep.as_deref())
}
