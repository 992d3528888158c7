//! The kernel cases shared by `modelpress demo`, `modelpress bench` and
//! `benches/throughput.rs`: each runs one operation on a device over seeded
//! sample data, and can be compared with the CPU reference.
//!
//! Timings are end to end as a caller sees them (upload, kernel, readback
//! on a GPU), best of several repetitions; throughput counts the bytes the
//! operation reads and writes.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::ggml::{self, BlockType};
use crate::ops::{mix, moe, prune, quantize, transfer};
use crate::tensor::{max_ulp_diff, DType, Tensor};
use crate::tools::sample::{self, Rng};
use std::time::Instant;

/// Sample inputs: two weight matrices of the same shape and a small row-mix
/// matrix, all in one dtype.
pub struct Sample {
    /// A weight matrix.
    pub a: Tensor,
    /// A second one of the same shape.
    pub b: Tensor,
    /// 64 rows of the same width, for row mixing.
    pub rows: Tensor,
    /// One weight per row of `rows`.
    pub row_weights: Vec<f32>,
    /// `a` quantized per row (on the CPU), for dequantization.
    pub q: crate::tensor::QTensor,
}

impl Sample {
    /// About `elements` weights per matrix, shaped (elements/1024, 1024).
    /// An error for a dtype that is not f32, f16 or bf16.
    pub fn new(dtype: DType, elements: usize, seed: u64) -> Result<Sample> {
        let mut rng = Rng::new(seed);
        let cols = 1024.min(elements.max(1));
        let shape = [elements.div_ceil(cols), cols];
        let row_shape = [64, (elements / 64).max(1)];
        let a = sample::weight(&mut rng, dtype, &shape)?;
        let q =
            quantize::quantize_absmax(&Device::Cpu, &a.view(), quantize::Granularity::PerRow)?.0;
        Ok(Sample {
            a,
            b: sample::weight(&mut rng, dtype, &shape)?,
            rows: sample::weight(&mut rng, dtype, &row_shape)?,
            row_weights: (0..64).map(|_| rng.uniform() as f32).collect(),
            q,
        })
    }
}

/// One result: a float tensor, int8 values with their scales, or GGML
/// blocks.
pub enum Output {
    /// Floats.
    Float(Tensor),
    /// int8 values and scales.
    Int8(crate::tensor::QTensor),
    /// GGML blocks.
    Blocks(Vec<u8>),
}

/// How a device's result compares with the CPU's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agreement {
    /// Bit for bit.
    Identical,
    /// Floats differ by at most this many ulps of the output dtype.
    Ulps(u64),
    /// Beyond any bound.
    Differs,
}

impl std::fmt::Display for Agreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Agreement::Identical => f.write_str("identical"),
            Agreement::Ulps(u) => write!(f, "≤ {u} ulp"),
            Agreement::Differs => f.write_str("DIFFERS"),
        }
    }
}

/// How `y` compares with `x` (the CPU's).
pub fn agreement(x: &Output, y: &Output) -> Agreement {
    match (x, y) {
        (Output::Float(a), Output::Float(b)) => match max_ulp_diff(a, b) {
            Some(0) if a.data == b.data => Agreement::Identical,
            Some(0) => Agreement::Ulps(0),
            Some(u) if u != u64::MAX => Agreement::Ulps(u),
            _ => Agreement::Differs,
        },
        (Output::Int8(a), Output::Int8(b)) => {
            if a == b {
                Agreement::Identical
            } else {
                Agreement::Differs
            }
        }
        (Output::Blocks(a), Output::Blocks(b)) => {
            if a == b {
                Agreement::Identical
            } else {
                Agreement::Differs
            }
        }
        _ => Agreement::Differs,
    }
}

type RunFn = fn(&Device, &Sample) -> Result<Output>;

/// A named operation over a sample, and the bytes it reads and writes.
pub struct Case {
    /// "prune.threshold", ...
    pub name: &'static str,
    /// Runs it on a device.
    pub run: RunFn,
    /// Bytes it reads and writes.
    pub bytes: fn(&Sample) -> u64,
}

fn float_rw(s: &Sample) -> u64 {
    2 * s.a.data.len() as u64
}

fn two_in_one_out(s: &Sample) -> u64 {
    3 * s.a.data.len() as u64
}

fn quant_rw(s: &Sample) -> u64 {
    (s.a.data.len() + s.a.numel()) as u64
}

/// GGML block quantization of `a`, as `modelpress quantize --type` runs
/// it per tensor (of a sample too small for whole super-blocks, the whole
/// ones).
fn ggml_run(ty: BlockType, d: &Device, s: &Sample) -> Result<Output> {
    let n = ggml_values(s);
    let shape = [n];
    let t = crate::tensor::TensorRef::new(s.a.dtype, &shape, &s.a.data[..n * s.a.dtype.size()])?;
    Ok(Output::Blocks(ggml::quantize(d, ty, &t)?.data))
}

fn ggml_values(s: &Sample) -> usize {
    s.a.numel() / 256 * 256
}

fn ggml_bytes(ty: BlockType, s: &Sample) -> u64 {
    let n = ggml_values(s);
    (n * s.a.dtype.size() + n / ty.block_values() * ty.block_bytes()) as u64
}

/// The case "ggml.T" for block type T.
macro_rules! ggml_case {
    ($t:ident) => {
        Case {
            name: concat!("ggml.", stringify!($t)),
            run: |d, s| ggml_run(BlockType::$t, d, s),
            bytes: |s| ggml_bytes(BlockType::$t, s),
        }
    };
}

/// Every kernel, as the demo and the benchmarks run it.
pub fn cases() -> Vec<Case> {
    let mut v = vec![
        Case {
            // The yardstick: a copy of the same bytes (what any kernel over
            // host memory costs at least).
            name: "baseline.copy",
            run: |_, s| Ok(Output::Float(s.a.clone())),
            bytes: float_rw,
        },
        Case {
            name: "prune.threshold",
            run: |d, s| Ok(Output::Float(prune::threshold(d, &s.a.view(), 0.02)?.0)),
            bytes: float_rw,
        },
        Case {
            name: "prune.neurons.l2",
            run: |d, s| {
                let cols = s.a.shape[1] as f32;
                Ok(Output::Float(
                    prune::prune_neurons(
                        d,
                        &s.a.view(),
                        1.0 - 2.0 / cols.sqrt(),
                        prune::NeuronNorm::L2,
                    )?
                    .0,
                ))
            },
            // Statistics pass plus masking pass.
            bytes: |s| 3 * s.a.data.len() as u64,
        },
        Case {
            name: "prune.neurons.max",
            run: |d, s| {
                let cols = s.a.shape[1] as f32;
                Ok(Output::Float(
                    prune::prune_neurons(
                        d,
                        &s.a.view(),
                        3.3 / cols.sqrt(),
                        prune::NeuronNorm::Max,
                    )?
                    .0,
                ))
            },
            bytes: |s| 3 * s.a.data.len() as u64,
        },
        Case {
            // Exact 50% sparsity: key histograms (1 pass for bf16, 2 for
            // f32) and one apply pass.
            name: "prune.sparsity",
            run: |d, s| {
                Ok(Output::Float(
                    crate::ops::select::prune_to_sparsity(d, &s.a.view(), 0.5, false)?.0,
                ))
            },
            bytes: float_rw,
        },
        Case {
            // The yardstick for prune.sparsity: sorting (|w|, index) on the
            // CPU's cores, and zeroing the first half.
            name: "baseline.sort-prune",
            run: |_, s| {
                use rayon::prelude::*;
                let v = s.a.view().to_f32_vec();
                let mut order: Vec<(u32, u32)> = v
                    .iter()
                    .enumerate()
                    .map(|(i, x)| (crate::ops::select::key(*x), i as u32))
                    .collect();
                order.par_sort_unstable();
                let mut out = s.a.clone();
                for &(_, i) in &order[..crate::ops::select::count_for(0.5, v.len() as u64) as usize]
                {
                    s.a.dtype.write_raw(&mut out.data, i as usize, 0);
                }
                Ok(Output::Float(out))
            },
            bytes: float_rw,
        },
        Case {
            name: "quantize.round",
            run: |d, s| {
                Ok(Output::Int8(
                    quantize::quantize_round(d, &s.a.view(), 1000.0)?.0,
                ))
            },
            bytes: quant_rw,
        },
        Case {
            name: "quantize.absmax.tensor",
            run: |d, s| {
                Ok(Output::Int8(
                    quantize::quantize_absmax(d, &s.a.view(), quantize::Granularity::PerTensor)?.0,
                ))
            },
            bytes: |s| quant_rw(s) + s.a.data.len() as u64,
        },
        Case {
            name: "quantize.absmax.row",
            run: |d, s| {
                Ok(Output::Int8(
                    quantize::quantize_absmax(d, &s.a.view(), quantize::Granularity::PerRow)?.0,
                ))
            },
            bytes: |s| quant_rw(s) + s.a.data.len() as u64,
        },
        Case {
            name: "quantize.dequantize",
            run: |d, s| {
                // Quantizing on the CPU keeps this case about dequantization.
                let (q, _) = quantize::quantize_absmax(
                    &Device::Cpu,
                    &s.a.view(),
                    quantize::Granularity::PerRow,
                )?;
                Ok(Output::Float(quantize::dequantize(d, &q, s.a.dtype)?))
            },
            bytes: quant_rw,
        },
        Case {
            name: "quantize.convert",
            run: |d, s| {
                let to = if s.a.dtype == DType::F32 {
                    DType::BF16
                } else {
                    DType::F32
                };
                Ok(Output::Float(quantize::convert(d, &s.a.view(), to)?))
            },
            bytes: |s| {
                let to = if s.a.dtype == DType::F32 { 2 } else { 4 };
                (s.a.data.len() + s.a.numel() * to) as u64
            },
        },
        Case {
            name: "transfer.scalar",
            run: |d, s| {
                Ok(Output::Float(transfer::transfer(
                    d,
                    &s.a.view(),
                    transfer::Delta::Scalar(0.001),
                    0.5,
                )?))
            },
            bytes: float_rw,
        },
        Case {
            name: "transfer.tensor",
            run: |d, s| {
                Ok(Output::Float(transfer::transfer(
                    d,
                    &s.a.view(),
                    transfer::Delta::Tensor(s.b.view()),
                    0.3,
                )?))
            },
            bytes: two_in_one_out,
        },
        Case {
            name: "mix.weighted",
            run: |d, s| {
                Ok(Output::Float(mix::mix(
                    d,
                    &[s.a.view(), s.b.view()],
                    &[0.7, 0.3],
                )?))
            },
            bytes: two_in_one_out,
        },
        Case {
            name: "mix.rows",
            run: |d, s| {
                Ok(Output::Float(mix::mix_rows(
                    d,
                    &s.rows.view(),
                    &s.row_weights,
                )?))
            },
            bytes: |s| (s.rows.data.len() + s.rows.data.len() / 64) as u64,
        },
        Case {
            name: "moe.route",
            // 64 experts, Mixtral's top-2: `a` as tokens × 64 logits.
            run: |d, s| {
                let shape = [s.a.numel() / 64, 64];
                let l = crate::tensor::TensorRef::new(s.a.dtype, &shape, &s.a.data)?;
                let r = moe::route(
                    d,
                    &l,
                    moe::Gating::Softmax {
                        k: 2,
                        renormalize: true,
                    },
                )?;
                Ok(Output::Float(Tensor::from_f32(
                    DType::F32,
                    &[r.weights.len()],
                    &r.weights,
                )?))
            },
            bytes: |s| (s.a.data.len() + s.a.numel() / 64 * 16) as u64,
        },
        Case {
            name: "moe.combine",
            // `a` as tokens × 2 experts' outputs × 512.
            run: |d, s| {
                let tokens = s.a.numel() / 1024;
                let shape = [tokens, 2, 512];
                let x = crate::tensor::TensorRef::new(
                    s.a.dtype,
                    &shape,
                    &s.a.data[..tokens * 1024 * s.a.dtype.size()],
                )?;
                let w: Vec<f32> = (0..tokens * 2)
                    .map(|i| 0.25 + (i % 3) as f32 * 0.25)
                    .collect();
                Ok(Output::Float(moe::combine(d, &x, &w, s.a.dtype)?))
            },
            bytes: |s| s.a.data.len() as u64 * 3 / 2,
        },
    ];
    v.extend([
        ggml_case!(Q8_0),
        ggml_case!(Q4_0),
        ggml_case!(Q2_K),
        ggml_case!(Q3_K),
        ggml_case!(Q4_K),
        ggml_case!(Q5_K),
        ggml_case!(Q6_K),
    ]);
    v
}

/// Best wall time of `reps` runs (after one warm-up run that compiles the
/// pipelines), and the last output.
pub fn time_case(case: &Case, dev: &Device, s: &Sample, reps: usize) -> Result<(f64, Output)> {
    let mut out = (case.run)(dev, s)?;
    let mut best = f64::INFINITY;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        out = (case.run)(dev, s)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok((best, out))
}

/// "16M" -> 16·2^20; "64k" -> 64·2^10; "1000" -> 1000.
pub fn parse_count(s: &str) -> Result<usize> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1usize << 10),
        Some('m' | 'M') => (&s[..s.len() - 1], 1 << 20),
        Some('g' | 'G') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>()
        .map(|n| n * mult)
        .map_err(|_| Error::input(format!("'{s}' is not a count (like 1000, 64k, 16M)")))
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

/// `modelpress check`: every kernel on `dev` against the CPU reference, on a
/// seeded LLaMA-scale bf16 sample.
pub fn check(dev: &Device, elements: usize, seed: u64) -> Result<()> {
    let s = Sample::new(DType::BF16, elements, seed)?;
    crate::outln!("modelpress check: device {}", dev.name())?;
    crate::outln!(
        "sample: seed {seed}, {} weights of {} in shape {:?}; times are best of 3, end to end",
        s.a.numel(),
        s.a.dtype,
        s.a.shape
    )?;
    crate::outln!()?;
    crate::outln!(
        "{:<24} {:>10} {:>10} {:>10} {:>10}  device vs cpu",
        "kernel",
        "device ms",
        "cpu ms",
        "dev GB/s",
        "cpu GB/s"
    )?;
    let mut worst = Agreement::Identical;
    for case in cases() {
        let (td, od) = time_case(&case, dev, &s, 3)?;
        let (tc, oc) = time_case(&case, &Device::Cpu, &s, 3)?;
        let agree = agreement(&od, &oc);
        if agree == Agreement::Differs {
            worst = Agreement::Differs;
        }
        let bytes = (case.bytes)(&s);
        crate::outln!(
            "{:<24} {:>10.2} {:>10.2} {:>10.2} {:>10.2}  {agree}",
            case.name,
            td * 1e3,
            tc * 1e3,
            gbps(bytes, td),
            gbps(bytes, tc)
        )?;
    }
    crate::outln!()?;
    if !dev.is_gpu() {
        crate::outln!("(no hardware GPU: the device is the CPU backend; `--device gpu` uses any adapter, software ones included)")?;
    }
    if worst == Agreement::Differs {
        return Err(Error::Gpu(
            "a kernel disagreed with the CPU reference".into(),
        ));
    }
    Ok(())
}

/// What `bench::run` measures.
pub struct BenchOptions {
    /// Elements per sample tensor.
    pub sizes: Vec<usize>,
    /// Timed repetitions (the best is kept).
    pub reps: usize,
    /// Case names (or prefixes) to run; empty runs all.
    pub kernels: Vec<String>,
}

/// GPU vs CPU throughput per kernel and size, printed as a table.
pub fn run(dev: &Device, opt: &BenchOptions) -> Result<()> {
    crate::outln!("device: {}", dev.name())?;
    crate::outln!("cpu:    {}", Device::Cpu.name())?;
    crate::outln!(
        "{:<24} {:>6} {:>10} {:>10} {:>10} {:>10} {:>8}",
        "kernel",
        "dtype",
        "elements",
        "dev GB/s",
        "cpu GB/s",
        "dev/cpu",
        "agree"
    )?;
    for &n in &opt.sizes {
        for dtype in [DType::F32, DType::BF16] {
            let s = Sample::new(dtype, n, 7)?;
            for case in cases() {
                if !opt.kernels.is_empty()
                    && !opt
                        .kernels
                        .iter()
                        .any(|k| case.name.starts_with(k.as_str()))
                {
                    continue;
                }
                let (td, od) = time_case(&case, dev, &s, opt.reps)?;
                let (tc, oc) = time_case(&case, &Device::Cpu, &s, opt.reps)?;
                let bytes = (case.bytes)(&s);
                crate::outln!(
                    "{:<24} {:>6} {:>10} {:>10.2} {:>10.2} {:>10.2} {:>8}",
                    case.name,
                    dtype.name(),
                    s.a.numel(),
                    gbps(bytes, td),
                    gbps(bytes, tc),
                    tc / td,
                    agreement(&od, &oc).to_string()
                )?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse_with_suffixes() {
        assert_eq!(parse_count("1000").unwrap(), 1000);
        assert_eq!(parse_count("64k").unwrap(), 65536);
        assert_eq!(parse_count(" 16M").unwrap(), 16 << 20);
        assert!(parse_count("16MB").is_err());
        assert!(parse_count("").is_err());
    }

    #[test]
    fn every_case_runs_on_the_cpu_and_agrees_with_itself() {
        let s = Sample::new(DType::F16, 3000, 1).unwrap();
        for case in cases() {
            let a = (case.run)(&Device::Cpu, &s).unwrap();
            let b = (case.run)(&Device::Cpu, &s).unwrap();
            assert_eq!(agreement(&a, &b), Agreement::Identical, "{}", case.name);
            assert!((case.bytes)(&s) > 0);
        }
    }
}
