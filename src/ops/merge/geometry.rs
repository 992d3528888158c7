//! The methods that look at whole vectors: `nearswap` (elementwise, but
//! measured against the distance between the two models), `model_stock`
//! (the angle between the fine-tunes' offsets) and `nuslerp` (spherical
//! interpolation of two models or of their deltas from a base), over the
//! whole flattened tensor or row by row (the last dimension).

use super::gpu_sum::Sum;
use super::{block_range, check_inputs, decode, on_gpu, write_blocks};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::diff::Diff;
use crate::ops::CPU_BLOCK;
use crate::tensor::{DType, Tensor, TensorRef};
use rayon::prelude::*;
use std::ops::Range;

/// Which vectors a method measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vectors {
    /// The whole tensor, flattened.
    Whole,
    /// Each row of the last dimension (a 1-D tensor is one row).
    Rows,
    /// Each vector along the first dimension (mergekit's
    /// `nuslerp_row_wise`, which interpolates `dim=0`: the columns of a
    /// matrix; a 1-D tensor is one vector).
    Columns,
}

/// How a tensor's elements fall into vectors.
#[derive(Clone, Copy)]
pub(super) enum Layout {
    Whole,
    /// Contiguous vectors of this length.
    Rows(usize),
    /// Vectors along dimension 0: element i belongs to vector i % stride.
    Strided(usize),
}

impl Layout {
    /// The vector element `i` belongs to.
    pub(super) fn of(self, i: usize) -> usize {
        match self {
            Layout::Whole => 0,
            Layout::Rows(l) => i / l,
            Layout::Strided(s) => i % s,
        }
    }
}

impl Vectors {
    pub(super) fn layout(self, t: &TensorRef) -> Layout {
        match self {
            Vectors::Whole => Layout::Whole,
            Vectors::Rows => Layout::Rows(t.shape.last().copied().unwrap_or(1).max(1)),
            Vectors::Columns if t.shape.len() < 2 => Layout::Whole,
            Vectors::Columns => Layout::Strided(t.shape[1..].iter().product::<usize>().max(1)),
        }
    }
}

/// Per vector, the sums of `k` terms of its elements, in f64, each added in
/// element order and blocks in block order, so they repeat exactly. `f(r,
/// s, acc)` adds the terms of elements `r` into `acc`, element e (counted
/// from r.start) into `acc[(e % s)·k ..][..k]`: s is 1 for a whole tensor or
/// a row, the stride for vectors along dimension 0 (blocks of whole rows).
fn sums(
    n: usize,
    layout: Layout,
    k: usize,
    f: impl Fn(Range<usize>, usize, &mut [f64]) + Sync,
) -> Vec<Vec<f64>> {
    match layout {
        Layout::Whole => {
            let parts: Vec<Vec<f64>> = (0..n.div_ceil(CPU_BLOCK))
                .into_par_iter()
                .map(|b| {
                    let mut acc = vec![0f64; k];
                    f(block_range(b, n), 1, &mut acc);
                    acc
                })
                .collect();
            let mut total = vec![0f64; k];
            for p in parts {
                total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
            vec![total]
        }
        Layout::Rows(l) => (0..n / l)
            .into_par_iter()
            .with_min_len((CPU_BLOCK / l).max(1))
            .map(|r| {
                let mut acc = vec![0f64; k];
                f(r * l..(r + 1) * l, 1, &mut acc);
                acc
            })
            .collect(),
        Layout::Strided(stride) => {
            let rows = n / stride;
            let per_block = (CPU_BLOCK / stride).max(1);
            let parts: Vec<Vec<f64>> = (0..rows.div_ceil(per_block))
                .into_par_iter()
                .map(|b| {
                    let (r0, r1) = (b * per_block, ((b + 1) * per_block).min(rows));
                    let mut acc = vec![0f64; stride * k];
                    f(r0 * stride..r1 * stride, stride, &mut acc);
                    acc
                })
                .collect();
            let mut total = vec![0f64; stride * k];
            for p in parts {
                total.iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
            total.chunks_exact(k).map(|c| c.to_vec()).collect()
        }
    }
}

/// `f(e, acc[(e % stride)·k ..][..k])` for e in 0..len, in order, without
/// a division per element (one slice for the common stride of 1).
#[inline(always)]
fn each_vector(
    len: usize,
    stride: usize,
    k: usize,
    acc: &mut [f64],
    mut f: impl FnMut(usize, &mut [f64]),
) {
    if stride == 1 {
        let a = &mut acc[..k];
        (0..len).for_each(|e| f(e, a));
        return;
    }
    let mut c = 0;
    for e in 0..len {
        f(e, &mut acc[c * k..][..k]);
        c += 1;
        if c == stride {
            c = 0;
        }
    }
}

/// Model Stock's sums for M ≤ 4 models and one vector: ‖δᵢ‖² into
/// `acc[i]`, then δᵢ·δⱼ for i < j, each added in element order as the
/// generic loop adds them (the same bits), with the sums held in registers
/// rather than in memory. Returns true.
#[inline(always)]
#[allow(clippy::needless_range_loop)] // indices into M arrays at once, unrolled
fn gram<const M: usize>(d: [&[f32]; M], acc: &mut [f64]) -> bool {
    let k = M + M * (M - 1) / 2;
    let mut a = [0f64; 10];
    a[..k].copy_from_slice(&acc[..k]);
    for e in 0..d[0].len() {
        let x: [f64; M] = std::array::from_fn(|i| d[i][e] as f64);
        for i in 0..M {
            a[i] += x[i] * x[i];
        }
        let mut p = M;
        for i in 0..M {
            for j in i + 1..M {
                a[p] += x[i] * x[j];
                p += 1;
            }
        }
    }
    acc[..k].copy_from_slice(&a[..k]);
    true
}

/// NearSwap: w = clamp(t / max(|a − b|, 1e-6), 0, 1), then w·b + (1 − w)·a,
/// element by element (`a` is the base).
pub fn nearswap(
    dev: &Device,
    a: &TensorRef,
    b: &TensorRef,
    t: f32,
    cast: Option<DType>,
    out: DType,
) -> Result<(Tensor, Diff)> {
    check_inputs("nearswap", &[*a, *b], out)?;
    crate::ops::finite_param("nearswap t", t)?;
    if let Some(r) = on_gpu(dev, &Sum::nearswap(a, b, t), cast, out)? {
        return Ok(r);
    }
    let (tensor, diff, _) = write_blocks(a, out, |_, r, ys| {
        let mut y = Vec::new();
        decode(a, r.clone(), cast, ys);
        let other = decode(b, r, cast, &mut y);
        for (x, &v) in ys.iter_mut().zip(&y) {
            let w = (t / (*x - v).abs().max(1e-6)).clamp(0.0, 1.0);
            *x = w * v + (1.0 - w) * *x;
        }
        ((), other)
    });
    Ok((tensor, diff))
}

/// Model Stock: with offsets δᵢ = wᵢ − w₀ of N ≥ 2 models, cos θ the mean
/// of their pairwise cosines (norm products clamped to ≥ 1e-6, cosines to
/// [−1, 1]) and t = N·cos θ / (1 + (N − 1)·cos θ) — 0 where the
/// denominator is within 1e-6 of 0 — the result t·mean(wᵢ) + (1 − t)·w₀, per
/// tensor or per row. `ts[0]` is the base.
pub fn model_stock(
    dev: &Device,
    ts: &[TensorRef],
    by: Vectors,
    cast: Option<DType>,
    out: DType,
) -> Result<(Tensor, Diff)> {
    check_inputs("model_stock", ts, out)?;
    let m = ts.len() - 1;
    if m < 2 {
        return Err(Error::input(format!(
            "model_stock needs a base and at least two models, got {m}"
        )));
    }
    let base = &ts[0];
    let n = base.numel();
    let layout = by.layout(base);
    // Per vector: ‖δᵢ‖² for each i, then δᵢ·δⱼ for each pair i < j.
    let pairs: Vec<(usize, usize)> = (0..m)
        .flat_map(|i| (i + 1..m).map(move |j| (i, j)))
        .collect();
    let k = m + pairs.len();
    let s = sums(n, layout, k, |r, stride, acc| {
        let mut b0 = Vec::new();
        decode(base, r.clone(), cast, &mut b0);
        let ds: Vec<Vec<f32>> = ts[1..]
            .iter()
            .map(|t| {
                let mut x = Vec::new();
                decode(t, r.clone(), cast, &mut x);
                x.iter_mut().zip(&b0).for_each(|(x, b)| *x -= b);
                x
            })
            .collect();
        let unrolled = stride == 1
            && match m {
                2 => gram::<2>(std::array::from_fn(|i| &ds[i][..]), acc),
                3 => gram::<3>(std::array::from_fn(|i| &ds[i][..]), acc),
                4 => gram::<4>(std::array::from_fn(|i| &ds[i][..]), acc),
                _ => false,
            };
        if !unrolled {
            each_vector(r.len(), stride, k, acc, |e, a| {
                for (i, d) in ds.iter().enumerate() {
                    a[i] += d[e] as f64 * d[e] as f64;
                }
                for (p, &(i, j)) in pairs.iter().enumerate() {
                    a[m + p] += ds[i][e] as f64 * ds[j][e] as f64;
                }
            });
        }
    });
    let t: Vec<f32> = s
        .iter()
        .map(|v| {
            let cos: f64 = pairs
                .iter()
                .enumerate()
                .map(|(p, &(i, j))| {
                    (v[m + p] / (v[i].sqrt() * v[j].sqrt()).max(1e-6)).clamp(-1.0, 1.0)
                })
                .sum::<f64>()
                / pairs.len() as f64;
            let den = 1.0 + (m as f64 - 1.0) * cos;
            if den.abs() < 1e-6 {
                0.0
            } else {
                (m as f64 * cos / den) as f32
            }
        })
        .collect();
    // On a GPU: the models summed from 0, divided by m, then tk·avg +
    // (1 − tk)·base.
    let s = Sum {
        first: base,
        base: Some(base),
        terms: &ts[1..],
        delta: false,
        init: 0.0,
        divide: Some(m as f32),
        coefs: t
            .iter()
            .flat_map(|&tk| std::iter::repeat_n(1.0, m).chain([tk, 1.0 - tk]))
            .collect(),
        layout,
        blend: true,
        nearswap: None,
    };
    if let Some(r) = on_gpu(dev, &s, cast, out)? {
        return Ok(r);
    }
    let (tensor, diff, _) = write_blocks(base, out, |_, r, ys| {
        let mut x = Vec::new();
        decode(base, r.clone(), cast, ys);
        let mut avg = vec![0f32; r.len()];
        let mut other = 0;
        for t in &ts[1..] {
            other += decode(t, r.clone(), cast, &mut x);
            avg.iter_mut().zip(&x).for_each(|(a, v)| *a += v);
        }
        for (k, (y, a)) in ys.iter_mut().zip(&avg).enumerate() {
            let tk = t[layout.of(r.start + k)];
            *y = tk * (a / m as f32) + (1.0 - tk) * *y;
        }
        ((), other)
    });
    Ok((tensor, diff))
}

/// NuSLERP: spherical interpolation at t between `v0` and `v1` — or, with
/// a base, base + the interpolation of their deltas — per tensor, per row
/// or per column: unit vectors (norms clamped to ≥ 1e-7), cos θ clamped to [−1, 1],
/// and the plain lerp where 1 − cos² θ ≤ 1e-16.
#[allow(clippy::too_many_arguments)]
pub fn nuslerp(
    dev: &Device,
    base: Option<&TensorRef>,
    v0: &TensorRef,
    v1: &TensorRef,
    t: f32,
    by: Vectors,
    cast: Option<DType>,
    out: DType,
) -> Result<(Tensor, Diff)> {
    let mut all = vec![*v0, *v1];
    all.extend(base.copied());
    check_inputs("nuslerp", &all, out)?;
    crate::ops::finite_param("nuslerp t", t)?;
    let n = v0.numel();
    let layout = by.layout(v0);
    // The two vectors of elements r: the models, or their deltas.
    // Returns the NaN and infinite values of the inputs other than the
    // first (the base, or v0).
    let vecs = |r: Range<usize>, a: &mut Vec<f32>, b: &mut Vec<f32>| -> u64 {
        let first = decode(v0, r.clone(), cast, a);
        let bad = decode(v1, r.clone(), cast, b) + if base.is_some() { first } else { 0 };
        if let Some(base) = base {
            let mut z = Vec::new();
            decode(base, r, cast, &mut z);
            a.iter_mut().zip(&z).for_each(|(x, z)| *x -= z);
            b.iter_mut().zip(&z).for_each(|(x, z)| *x -= z);
        }
        bad
    };
    let s = sums(n, layout, 3, |r, stride, acc| {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        vecs(r, &mut a, &mut b);
        each_vector(a.len(), stride, 3, acc, |e, v| {
            let (x, y) = (a[e] as f64, b[e] as f64);
            v[0] += x * x;
            v[1] += y * y;
            v[2] += x * y;
        });
    });
    let coef: Vec<(f32, f32)> = s
        .iter()
        .map(|v| {
            let (na, nb) = (v[0].sqrt().max(1e-7), v[1].sqrt().max(1e-7));
            let cos = (v[2] / (na * nb)).clamp(-1.0, 1.0);
            if 1.0 - cos * cos <= 1e-16 {
                (1.0 - t, t)
            } else {
                let th = cos.acos();
                let sin = th.sin();
                (
                    (((1.0 - t as f64) * th).sin() / sin) as f32,
                    ((t as f64 * th).sin() / sin) as f32,
                )
            }
        })
        .collect();
    let first = base.copied().unwrap_or(*v0);
    // On a GPU: (0 + ca·a) + cb·b equals 0 + (ca·a + cb·b) bit for bit
    // (zeros' signs included), then + base.
    let pair = [*v0, *v1];
    let s = Sum {
        first: &first,
        base,
        terms: &pair,
        delta: base.is_some(),
        init: 0.0,
        divide: None,
        coefs: coef.iter().flat_map(|&(a, b)| [a, b, 1.0, 1.0]).collect(),
        layout,
        blend: base.is_some(),
        nearswap: None,
    };
    if let Some(r) = on_gpu(dev, &s, cast, out)? {
        return Ok(r);
    }
    let (tensor, diff, _) = write_blocks(&first, out, |_, r, ys| {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let bad = vecs(r.clone(), &mut a, &mut b);
        ys.clear();
        if let Some(base) = base {
            decode(base, r.clone(), cast, ys);
        } else {
            ys.resize(r.len(), 0.0);
        }
        for (k, y) in ys.iter_mut().enumerate() {
            let (ca, cb) = coef[layout.of(r.start + k)];
            *y += ca * a[k] + cb * b[k];
        }
        ((), bad)
    });
    Ok((tensor, diff))
}
