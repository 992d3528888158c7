//! Means on the unit sphere over whole flattened tensors: `karcher` (the
//! Riemannian mean, iterated) and `multislerp` (the weighted mean
//! projected through the tangent space), as mergekit 0.1.5 defines them.
//!
//! Every vector either method forms is a linear combination of the inputs,
//! so both run on coefficients: one pass sums the inputs' Gram matrix in
//! f64, the iterations work on n × n numbers, and a second pass writes
//! Σ cᵢ·xᵢ. Memory stays at the output tensor, and no unit vector, mean or
//! tangent is ever stored or rounded (mergekit rounds each to the inputs'
//! dtype).

use super::geometry::Layout;
use super::gpu_sum::Sum;
use super::{block_range, check_inputs, decode, on_gpu, write_blocks};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::diff::Diff;
use crate::ops::CPU_BLOCK;
use crate::tensor::{DType, Tensor, TensorRef};
use rayon::prelude::*;

/// The Gram matrix G[i][j] = xᵢ·xⱼ of `ts` (less `base` when given),
/// summed in f64 in a fixed order, so it repeats exactly.
fn gram(ts: &[TensorRef], base: Option<&TensorRef>, cast: Option<DType>) -> Vec<Vec<f64>> {
    let m = ts.len();
    let n = ts[0].numel();
    let parts: Vec<Vec<f64>> = (0..n.div_ceil(CPU_BLOCK))
        .into_par_iter()
        .map(|b| {
            let r = block_range(b, n);
            let mut z = Vec::new();
            if let Some(base) = base {
                decode(base, r.clone(), cast, &mut z);
            }
            let xs: Vec<Vec<f32>> = ts
                .iter()
                .map(|t| {
                    let mut x = Vec::new();
                    decode(t, r.clone(), cast, &mut x);
                    x.iter_mut().zip(&z).for_each(|(x, z)| *x -= z);
                    x
                })
                .collect();
            let mut acc = vec![0f64; m * m];
            for i in 0..m {
                for j in i..m {
                    acc[i * m + j] = xs[i]
                        .iter()
                        .zip(&xs[j])
                        .map(|(&a, &b)| a as f64 * b as f64)
                        .sum();
                }
            }
            acc
        })
        .collect();
    // Blocks added in order; the upper triangle mirrored.
    let mut total = vec![0f64; m * m];
    for p in parts {
        total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    (0..m)
        .map(|i| (0..m).map(|j| total[i.min(j) * m + i.max(j)]).collect())
        .collect()
}

/// cᵀ·U·d for the Gram matrix `u` of unit vectors.
fn form(u: &[Vec<f64>], c: &[f64], d: &[f64]) -> f64 {
    let mut s = 0.0;
    for (i, ci) in c.iter().enumerate() {
        for (j, dj) in d.iter().enumerate() {
            s += ci * u[i][j] * dj;
        }
    }
    s
}

/// ‖Σ cᵢ·uᵢ‖ (0 where rounding makes the square negative).
fn norm(u: &[Vec<f64>], c: &[f64]) -> f64 {
    form(u, c, c).max(0.0).sqrt()
}

/// (U·c)ᵢ = uᵢ·Σ cⱼ·uⱼ.
fn dots(u: &[Vec<f64>], c: &[f64]) -> Vec<f64> {
    u.iter()
        .map(|row| row.iter().zip(c).map(|(a, b)| a * b).sum())
        .collect()
}

/// `base` (when given) + Σ cᵢ·(xᵢ − base), each element in f32, rounded
/// once into `out`; the figures are against `first`.
fn combine(
    dev: &Device,
    first: &TensorRef,
    base: Option<&TensorRef>,
    ts: &[TensorRef],
    c: &[f64],
    cast: Option<DType>,
    out: DType,
) -> Result<(Tensor, Diff)> {
    let c: Vec<f32> = c.iter().map(|&v| v as f32).collect();
    // On a GPU: from 0, cᵢ·(xᵢ − base) added in order, then 1·acc + 1·base.
    let s = Sum {
        first,
        base,
        terms: ts,
        delta: base.is_some(),
        init: 0.0,
        divide: None,
        coefs: c.iter().copied().chain([1.0, 1.0]).collect(),
        layout: Layout::Whole,
        blend: base.is_some(),
        nearswap: None,
    };
    if let Some(r) = on_gpu(dev, &s, cast, out)? {
        return Ok(r);
    }
    let (t, d, _) = write_blocks(first, out, |_, r, ys| {
        let (mut x, mut z) = (Vec::new(), Vec::new());
        ys.clear();
        ys.resize(r.len(), 0.0);
        if let Some(base) = base {
            decode(base, r.clone(), cast, &mut z);
        }
        let mut other = 0;
        for (t, &ci) in ts.iter().zip(&c) {
            other += decode(t, r.clone(), cast, &mut x);
            if base.is_some() {
                x.iter_mut().zip(&z).for_each(|(x, z)| *x -= z);
            }
            ys.iter_mut().zip(&x).for_each(|(y, v)| *y += ci * v);
        }
        if base.is_some() {
            ys.iter_mut().zip(&z).for_each(|(y, z)| *y += z);
        }
        ((), other)
    });
    Ok((t, d))
}

/// A lone input `t`, rounded into `out` (both methods return it
/// unchanged); the figures are against `first`.
fn copy(
    dev: &Device,
    first: &TensorRef,
    t: &TensorRef,
    cast: Option<DType>,
    out: DType,
) -> Result<(Tensor, Diff)> {
    let lone = [*t];
    if let Some(r) = on_gpu(dev, &Sum::whole(first, &lone, &[1.0], -0.0), cast, out)? {
        return Ok(r);
    }
    let same = std::ptr::eq(first.data, t.data);
    let (t2, d, _) = write_blocks(first, out, |_, r, ys| {
        let nonfinite = decode(t, r, cast, ys);
        ((), if same { 0 } else { nonfinite })
    });
    Ok((t2, d))
}

/// The Karcher mean of `ts` with equal weights: on the unit sphere, from
/// the normalized mean of the unit vectors (inputs of norm ≤ `tol` left
/// out), at most `max_iter` steps along the mean of the log maps (angles
/// < `tol` skipped; stop when the step is < `tol`), then scaled by the
/// inputs' mean norm. A lone input is returned as it is; all-zero inputs
/// give zeros.
pub fn karcher(
    dev: &Device,
    ts: &[TensorRef],
    max_iter: usize,
    tol: f64,
    cast: Option<DType>,
    out: DType,
) -> Result<(Tensor, Diff)> {
    check_inputs("karcher", ts, out)?;
    if !(tol.is_finite() && tol >= 0.0) {
        return Err(Error::input(format!(
            "karcher: tol is {tol}; it must be finite and ≥ 0"
        )));
    }
    let m = ts.len();
    if m == 1 {
        return copy(dev, &ts[0], &ts[0], cast, out);
    }
    let g = gram(ts, None, cast);
    let norms: Vec<f64> = (0..m).map(|i| g[i][i].sqrt()).collect();
    let inv = |i: usize| if norms[i] == 0.0 { 0.0 } else { 1.0 / norms[i] };
    let u: Vec<Vec<f64>> = (0..m)
        .map(|i| (0..m).map(|j| g[i][j] * inv(i) * inv(j)).collect())
        .collect();
    let valid: Vec<bool> = norms.iter().map(|&n| n > tol).collect();
    let count = valid.iter().filter(|&&v| v).count();
    if count == 0 {
        return combine(dev, &ts[0], None, ts, &vec![0.0; m], cast, out);
    }
    // Equal weights 1/m, renormalized over the valid inputs.
    let a: Vec<f64> = valid
        .iter()
        .map(|&v| if v { 1.0 / count as f64 } else { 0.0 })
        .collect();
    let mut beta = a.clone();
    let mn = norm(&u, &beta);
    if mn < tol {
        beta = vec![0.0; m];
        beta[valid.iter().position(|&v| v).unwrap_or(0)] = 1.0;
    } else {
        beta.iter_mut().for_each(|b| *b /= mn);
    }
    for _ in 0..max_iter {
        let d = dots(&u, &beta);
        let mut tangent = vec![0f64; m];
        for i in (0..m).filter(|&i| valid[i]) {
            let dot = d[i].clamp(-1.0, 1.0);
            let theta = dot.acos();
            if theta < tol {
                continue;
            }
            let s = a[i] * theta / theta.sin();
            tangent[i] += s;
            tangent
                .iter_mut()
                .zip(&beta)
                .for_each(|(t, b)| *t -= s * dot * b);
        }
        let tn = norm(&u, &tangent);
        if tn < tol {
            break;
        }
        for (b, t) in beta.iter_mut().zip(&tangent) {
            *b = tn.cos() * *b + tn.sin() * t / tn;
        }
        let un = norm(&u, &beta);
        if un > tol {
            beta.iter_mut().for_each(|b| *b /= un);
        }
    }
    let scale: f64 = norms.iter().sum::<f64>() / m as f64;
    let c: Vec<f64> = (0..m).map(|i| scale * beta[i] * inv(i)).collect();
    combine(dev, &ts[0], None, ts, &c, cast, out)
}

/// Multi-SLERP of `ts` (less `base` when given) with `weights` (divided by
/// their sum when `normalize`): unit vectors xᵢ/(‖xᵢ‖ + eps), their
/// weighted mean normalized, the weighted tangent vectors mapped back
/// through the exponential map, scaled by the weighted mean norm, plus the
/// base. A lone model is returned as it is; where every model equals the
/// base, the base; a zero mean falls back to the weighted sum for two
/// models and is an error for more.
#[allow(clippy::too_many_arguments)]
pub fn multislerp(
    dev: &Device,
    base: Option<&TensorRef>,
    ts: &[TensorRef],
    weights: &[f32],
    normalize: bool,
    eps: f64,
    cast: Option<DType>,
    out: DType,
) -> Result<(Tensor, Diff)> {
    let mut all = ts.to_vec();
    all.extend(base.copied());
    check_inputs("multislerp", &all, out)?;
    if ts.len() != weights.len() {
        return Err(Error::input(format!(
            "multislerp: {} weights for {} models",
            weights.len(),
            ts.len()
        )));
    }
    if !(eps.is_finite() && eps >= 0.0) {
        return Err(Error::input(format!(
            "multislerp: eps is {eps}; it must be finite and ≥ 0"
        )));
    }
    let first = base.copied().unwrap_or(ts[0]);
    if ts.len() == 1 {
        return copy(dev, &first, &ts[0], cast, out);
    }
    let m = ts.len();
    let mut w: Vec<f64> = weights.iter().map(|&v| v as f64).collect();
    if normalize {
        let s: f64 = w.iter().sum();
        if s == 0.0 {
            return Err(Error::input(
                "multislerp: the weights sum to 0 (set normalize_weights: false to use them as they are)",
            ));
        }
        w.iter_mut().for_each(|v| *v /= s);
    }
    let g = gram(ts, base, cast);
    let norms: Vec<f64> = (0..m).map(|i| g[i][i].sqrt()).collect();
    let u: Vec<Vec<f64>> = (0..m)
        .map(|i| {
            (0..m)
                .map(|j| g[i][j] / ((norms[i] + eps) * (norms[j] + eps)))
                .collect()
        })
        .collect();
    if norms.iter().all(|&n| n == 0.0) {
        // No direction to interpolate: every model is the base (a frozen
        // norm, say). mergekit fails here for three models or more.
        return combine(dev, &first, base, ts, &vec![0.0; m], cast, out);
    }
    let mn = norm(&u, &w);
    if mn < eps {
        if m == 2 {
            return combine(dev, &first, base, ts, &w, cast, out);
        }
        return Err(Error::input(
            "multislerp: the weighted mean of the unit vectors is zero (antipodal models with balancing weights); change the weights",
        ));
    }
    let beta: Vec<f64> = w.iter().map(|v| v / mn).collect();
    let d = dots(&u, &beta);
    let along: f64 = w.iter().zip(&d).map(|(a, b)| a * b).sum();
    let tangent: Vec<f64> = w.iter().zip(&beta).map(|(a, b)| a - along * b).collect();
    let tn = norm(&u, &tangent) + eps;
    let avg: f64 = norms.iter().zip(&w).map(|(n, w)| n * w).sum();
    let c: Vec<f64> = (0..m)
        .map(|i| avg * (tn.cos() * beta[i] + tangent[i] * tn.sin() / tn) / (norms[i] + eps))
        .collect();
    combine(dev, &first, base, ts, &c, cast, out)
}
