//! SCE (select, calculate, erase): the elements where the fine-tunes'
//! deltas vary most are kept (`select_topk`), each model weighted by the
//! mean square of its kept delta, and only deltas agreeing with the sign of
//! their sum counted, element by element.

use super::rank::{Keys, Smallest};
use super::{block_range, check_inputs, decode, write_blocks, Mask};
use crate::device::Device;
use crate::error::Result;
use crate::ops::diff::Diff;
use crate::ops::select::key;
use crate::ops::CPU_BLOCK;
use crate::tensor::{DType, Tensor, TensorRef};
use rayon::prelude::*;
use std::ops::Range;

/// The deltas of elements `r`, model-major (`len` each), and the models'
/// NaN and infinite values.
fn deltas(ts: &[TensorRef], r: Range<usize>, cast: Option<DType>, out: &mut Vec<f32>) -> u64 {
    let mut b0 = Vec::new();
    let mut x = Vec::new();
    decode(&ts[0], r.clone(), cast, &mut b0);
    out.clear();
    let mut bad = 0;
    for t in &ts[1..] {
        bad += decode(t, r.clone(), cast, &mut x);
        out.extend(x.iter().zip(&b0).map(|(x, b)| x - b));
    }
    bad
}

/// The population variance of the m deltas of each element (f32: the
/// mean first, then the mean squared deviation).
fn variances(d: &[f32], m: usize, len: usize, out: &mut Vec<f32>) {
    out.clear();
    out.extend((0..len).map(|e| {
        let mean = (0..m).map(|i| d[i * len + e]).sum::<f32>() / m as f32;
        (0..m).map(|i| (d[i * len + e] - mean).powi(2)).sum::<f32>() / m as f32
    }));
}

/// SCE over `ts[0]` (the base) and the models `ts[1..]`: with `select_topk`
/// < 1, only the ⌊topk·(elements of non-zero variance)⌋ elements of largest
/// variance across the deltas keep them (ties to the higher index);
/// wᵢ = mean(δᵢ²) / Σⱼ mean(δⱼ²) (1/m when that sum is below 1e-6); per
/// element, the deltas agreeing with the sign of Σδᵢ are averaged with
/// those weights (divisor clamped to ≥ 1e-6) and added to the base.
pub fn sce(
    dev: &Device,
    ts: &[TensorRef],
    select_topk: f64,
    cast: Option<DType>,
    out: DType,
) -> Result<(Tensor, Diff)> {
    check_inputs("sce", ts, out)?;
    let m = ts.len() - 1;
    let n = ts[0].numel();
    let blocks = n.div_ceil(CPU_BLOCK);
    // The variances' sort keys: what the mask ranks.
    let var_keys = |r: Range<usize>, keys: &mut Vec<u32>| {
        let (mut d, mut v) = (Vec::new(), Vec::new());
        let len = r.len();
        deltas(ts, r, cast, &mut d);
        variances(&d, m, len, &mut v);
        keys.clear();
        keys.extend(v.iter().map(|&x| key(x)));
    };
    let mask = if select_topk >= 1.0 || m == 0 {
        Mask::All
    } else {
        let nonzero: u64 = (0..blocks)
            .into_par_iter()
            .map(|b| {
                let mut k = Vec::new();
                var_keys(block_range(b, n), &mut k);
                k.iter().filter(|&&k| k != 0).count() as u64
            })
            .sum();
        let keep = (nonzero as f64 * select_topk.max(0.0)).floor() as u64;
        Mask::Above(Smallest::find(n, n as u64 - keep, &var_keys)?)
    };
    let kept = |b: usize, r: Range<usize>, d: &mut Vec<f32>| -> u64 {
        let len = r.len();
        let bad = deltas(ts, r.clone(), cast, d);
        if let Mask::All = mask {
            return bad;
        }
        // The mask ranks variances: hand it those as its keys.
        let (mut v, mut keep) = (Vec::new(), Vec::new());
        variances(d, m, len, &mut v);
        mask.block(b, r, &v, &mut keep);
        for i in 0..m {
            for (v, &k) in d[i * len..(i + 1) * len].iter_mut().zip(&keep) {
                if !k {
                    *v = 0.0;
                }
            }
        }
        bad
    };
    // Mean squares of the kept deltas, summed in block order.
    let parts: Vec<Vec<f64>> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let r = block_range(b, n);
            let len = r.len();
            let mut d = Vec::new();
            kept(b, r, &mut d);
            (0..m)
                .map(|i| {
                    d[i * len..(i + 1) * len]
                        .iter()
                        .map(|&v| v as f64 * v as f64)
                        .sum()
                })
                .collect()
        })
        .collect();
    let mut sq = vec![0f64; m];
    for p in parts {
        sq.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    let means: Vec<f64> = sq.iter().map(|s| s / n.max(1) as f64).collect();
    let total: f64 = means.iter().sum();
    let w: Vec<f32> = if total.abs() < 1e-6 {
        vec![1.0 / m.max(1) as f32; m]
    } else {
        means.iter().map(|v| (v / total) as f32).collect()
    };
    if let Device::Gpu(g) = dev {
        let cut = match &mask {
            Mask::Above(s) => Some((s, &var_keys as &Keys)),
            _ => None,
        };
        if let Some(r) = super::gpu::sce_combine(g, ts, cut, &w, cast, out)? {
            return Ok(r);
        }
    }
    let (tensor, diff, _) = write_blocks(&ts[0], out, |b, r, ys| {
        let len = r.len();
        let mut d = Vec::new();
        let bad = kept(b, r.clone(), &mut d);
        decode(&ts[0], r, cast, ys);
        for (e, y) in ys.iter_mut().enumerate() {
            let sum: f32 = (0..m).map(|i| d[i * len + e]).sum();
            let pos = sum >= 0.0;
            let (mut acc, mut div) = (0f32, 0f32);
            for (i, &wi) in w.iter().enumerate() {
                let v = d[i * len + e];
                if v != 0.0 && (v > 0.0) == pos {
                    acc += v * wi;
                    div += wi;
                }
            }
            *y += acc / div.max(1e-6);
        }
        ((), bad)
    });
    Ok((tensor, diff))
}
