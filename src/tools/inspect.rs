//! `modelpress inspect`: what a model holds, tensor by tensor.

use crate::error::Result;
use crate::formats::model::Model;
use crate::jobs::Checkpoint;
use crate::tensor::TensorRef;
use rayon::prelude::*;
use serde::Serialize;

/// One tensor as `inspect` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct TensorSummary {
    /// Its name.
    pub name: String,
    /// The shard file it is in.
    pub file: String,
    /// Its safetensors dtype.
    pub dtype: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Bytes of its data.
    pub bytes: u64,
    /// Statistics of float tensors (F32, F16, BF16) over their finite values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<Stats>,
    /// For the codes of a compressed-tensors module: the statistics of the
    /// weight they dequantize to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dequantized: Option<Stats>,
}

/// Statistics of a float tensor's finite values.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stats {
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Largest |w|.
    pub abs_max: f64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub std: f64,
    /// Zeros, finite or not.
    pub zeros: u64,
    /// NaN and infinite values.
    pub nonfinite: u64,
    /// Values, finite or not.
    pub count: u64,
}

/// Min, max, abs-max, mean, std (population) over finite values; zeros and
/// non-finite counts. One parallel pass, f64 accumulation.
pub fn stats(t: &TensorRef) -> Stats {
    let n = t.numel();
    let block = 1 << 16;
    #[derive(Clone, Copy)]
    struct Acc {
        min: f64,
        max: f64,
        sum: f64,
        sumsq: f64,
        count: u64,
        zeros: u64,
        nonfinite: u64,
    }
    let empty = Acc {
        min: f64::INFINITY,
        max: f64::NEG_INFINITY,
        sum: 0.0,
        sumsq: 0.0,
        count: 0,
        zeros: 0,
        nonfinite: 0,
    };
    let acc = (0..n.div_ceil(block))
        .into_par_iter()
        .map(|b| {
            let mut a = empty;
            for i in b * block..((b + 1) * block).min(n) {
                let x = t.dtype.raw_to_f32(t.dtype.read_raw(t.data, i)) as f64;
                if !x.is_finite() {
                    a.nonfinite += 1;
                    continue;
                }
                a.min = a.min.min(x);
                a.max = a.max.max(x);
                a.sum += x;
                a.sumsq += x * x;
                a.count += 1;
                a.zeros += (x == 0.0) as u64;
            }
            a
        })
        .reduce(
            || empty,
            |a, b| Acc {
                min: a.min.min(b.min),
                max: a.max.max(b.max),
                sum: a.sum + b.sum,
                sumsq: a.sumsq + b.sumsq,
                count: a.count + b.count,
                zeros: a.zeros + b.zeros,
                nonfinite: a.nonfinite + b.nonfinite,
            },
        );
    let c = acc.count.max(1) as f64;
    let mean = acc.sum / c;
    let (min, max) = if acc.count == 0 {
        (0.0, 0.0)
    } else {
        (acc.min, acc.max)
    };
    Stats {
        min,
        max,
        abs_max: min.abs().max(max.abs()),
        mean,
        std: (acc.sumsq / c - mean * mean).max(0.0).sqrt(),
        zeros: acc.zeros,
        nonfinite: acc.nonfinite,
        count: acc.count + acc.nonfinite,
    }
}

/// Every tensor of `model` with its statistics, shard by shard (each
/// tensor's pages released once read); for a compressed-tensors checkpoint
/// (`ck`), the codes tensors also get their dequantized weight's.
pub fn inspect(model: &Model, ck: Option<&Checkpoint>) -> Result<Vec<TensorSummary>> {
    model
        .entries()
        .map(|(f, e)| {
            let s = f.tensor(e).map(|t| stats(&t));
            let dequantized = match ck.and_then(|c| Some((c, c.codes_of(&e.name)?))) {
                Some((c, p)) => {
                    let (dtype, shape, bytes) = c.dequantize(model, p)?;
                    Some(stats(&TensorRef::new(dtype, &shape, &bytes)?))
                }
                None => None,
            };
            f.release(e);
            Ok(TensorSummary {
                name: e.name.clone(),
                file: f.path.file_name().map_or_else(
                    || f.path.display().to_string(),
                    |n| n.to_string_lossy().into_owned(),
                ),
                dtype: e.dtype.clone(),
                shape: e.shape.clone(),
                bytes: e.bytes() as u64,
                stats: s,
                dequantized,
            })
        })
        .collect()
}
