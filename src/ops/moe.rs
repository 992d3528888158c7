//! The gated mixing f(x) = Σ pᵢ(x)·fᵢ(x) of mixtures of experts: routing
//! (which k experts a token goes to, with which weights) and combination
//! (the weighted sum of the chosen experts' outputs).
//!
//! Rules (the CPU reference):
//! - Selection: the k largest logits, ties to the lower expert index
//!   (compared as ordered integers: every device picks the same experts).
//! - `Gating::Softmax`: p = softmax over all experts in f32 (max logit
//!   subtracted, the sum in ascending expert order), the k chosen, divided
//!   by their sum when `renormalize` (Mixtral; Qwen-MoE with
//!   `norm_topk_prob`), else as they are (Qwen without it).
//! - `Gating::Sigmoid`: s = 1/(1 + e^(−logit)) of the chosen, divided by
//!   their sum when `renormalize`, times `scale` (DeepSeek-V3's
//!   `routed_scaling_factor`; its selection bias and group limits are not
//!   modelled).
//! - `Gating::Switch`: top-1 and its softmax probability, no
//!   renormalization.
//! - Combination: `y[t] = Σⱼ wⱼ·x[t, j]` in ascending j, f32, rounded once.
//!
//! GPU and CPU choose the same experts and combine to the same bits; the
//! routing weights differ only through `exp`, which WGSL computes within
//! 3 + 2·|x| ulp: each weight is within (8 + 4·R)·2⁻²⁴ relative of the
//! CPU's, R the largest |logit − max logit| of the token. Non-finite
//! logits or expert outputs are refused.

use super::codec::{with_codec, Codec};
use super::kernels::Kernel;
use super::{f32_at, f32_bytes, params, u32_at};
use crate::device::{Chunk, Device, StreamLayout};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorRef};
use rayon::prelude::*;

/// The most experts a token may be routed to.
pub const K_MAX: usize = 16;

/// How routing weights come from logits.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Gating {
    /// Softmax over all experts, top-k, optionally renormalized.
    Softmax {
        /// Experts per token.
        k: usize,
        /// Divide the k weights by their sum.
        renormalize: bool,
    },
    /// Sigmoid scores, top-k, optionally renormalized, scaled.
    Sigmoid {
        /// Experts per token.
        k: usize,
        /// Divide the k weights by their sum.
        renormalize: bool,
        /// Multiplies every weight.
        scale: f32,
    },
    /// Switch Transformer: top-1 with its softmax probability.
    Switch,
}

impl Gating {
    fn k(self) -> usize {
        match self {
            Gating::Softmax { k, .. } | Gating::Sigmoid { k, .. } => k,
            Gating::Switch => 1,
        }
    }

    /// (mode, renorm, scale) as the shader takes them.
    fn code(self) -> (u32, u32, f32) {
        match self {
            Gating::Softmax { renormalize, .. } => (0, renormalize as u32, 1.0),
            Gating::Sigmoid {
                renormalize, scale, ..
            } => (1, renormalize as u32, scale),
            Gating::Switch => (2, 0, 1.0),
        }
    }
}

/// Each token's experts and weights, `k` per token.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    /// Experts per token.
    pub k: usize,
    /// tokens × k expert indices, by descending logit.
    pub experts: Vec<u32>,
    /// tokens × k weights.
    pub weights: Vec<f32>,
}

kernel_params!(RouteParams {
    tokens: u32,
    experts: u32,
    k: u32,
    mode: u32,
    renorm: u32,
    scale_bits: u32,
    _pad0: u32,
    _pad1: u32,
});

kernel_params!(CombineParams {
    tokens: u32,
    k: u32,
    dim: u32,
    zero: u32,
});

fn non_finite(what: &str) -> Error {
    Error::input(format!("non-finite {what} (NaN or infinity)"))
}

/// Ordered-integer key of f32 bits (no NaN).
fn key(b: u32) -> u32 {
    if b & 0x8000_0000 != 0 {
        !b
    } else {
        b | 0x8000_0000
    }
}

/// Tokens per GPU chunk: `per_token` bytes each within the handle's chunk
/// bytes, an even count (16-bit rows then start on a word); None when two
/// tokens do not fit (a chunk set below any real model's width), where the
/// CPU reference runs instead.
fn token_chunk(gpu: &crate::device::Gpu, per_token: u64, tokens: usize) -> Option<usize> {
    let ct = (gpu.chunk_bytes() / per_token.max(1)) as usize / 2 * 2;
    (ct > 0).then(|| ct.min(tokens.next_multiple_of(2)))
}

/// Routes every token of `logits` (tokens × experts, f32/f16/bf16).
pub fn route(dev: &Device, logits: &TensorRef, g: Gating) -> Result<Routing> {
    logits.check_float("route")?;
    let [tokens, experts] = logits.shape else {
        return Err(Error::input(format!(
            "route: logits must be tokens × experts, got {:?}",
            logits.shape
        )));
    };
    let (tokens, experts) = (*tokens, *experts);
    let k = g.k();
    if k == 0 || k > K_MAX || k > experts {
        return Err(Error::input(format!(
            "route: k = {k} for {experts} experts (1 ≤ k ≤ min(experts, {K_MAX}))"
        )));
    }
    if let Gating::Sigmoid { scale, .. } = g {
        if !scale.is_finite() {
            return Err(Error::input("route: the scale is not finite"));
        }
    }
    match dev {
        Device::Cpu => route_cpu(logits, g, tokens, experts),
        Device::Gpu(gpu) => {
            if tokens == 0 {
                return Ok(Routing {
                    k,
                    experts: vec![],
                    weights: vec![],
                });
            }
            let (mode, renorm, scale) = g.code();
            // Tokens per chunk: logits and results within the chunk bytes,
            // an even count (16-bit rows start on a word).
            let es = logits.dtype.size();
            let per_token = (experts * es + k * 8) as u64;
            let Some(ct) = token_chunk(gpu, per_token, tokens) else {
                return route_cpu(logits, g, tokens, experts);
            };
            let layout = StreamLayout {
                inputs: vec![(ct * experts * es) as u64],
                outputs: vec![
                    ((ct * k * 4) as u64, false),
                    ((ct * k * 4) as u64, false),
                    (4, true),
                ],
            };
            let pipeline = gpu
                .ctx
                .pipeline(Kernel::MoeRoute, logits.dtype.shader_code(), 0)?;
            let starts: Vec<usize> = (0..tokens).step_by(ct).collect();
            let jobs = starts.iter().map(|&t0| {
                let t1 = (t0 + ct).min(tokens);
                Chunk {
                    params: params(&RouteParams {
                        tokens: (t1 - t0) as u32,
                        experts: experts as u32,
                        k: k as u32,
                        mode,
                        renorm,
                        scale_bits: scale.to_bits(),
                        ..Default::default()
                    }),
                    inputs: vec![(&logits.data[t0 * experts * es..t1 * experts * es]).into()],
                    read: vec![((t1 - t0) * k * 4) as u64, ((t1 - t0) * k * 4) as u64, 4],
                    workgroups: gpu.ctx.workgroups_for((t1 - t0) as u64),
                }
            });
            let (mut e, mut w, mut flags) = (
                Vec::with_capacity(tokens * k),
                Vec::with_capacity(tokens * k),
                0u32,
            );
            gpu.ctx.stream(&pipeline, &layout, jobs, |i, outs| {
                let n = (starts[i] + ct).min(tokens) - starts[i];
                e.extend((0..n * k).map(|j| u32_at(outs[0], j)));
                w.extend((0..n * k).map(|j| u32_at(outs[1], j)));
                flags |= u32_at(outs[2], 0);
                Ok(())
            })?;
            if flags != 0 {
                return Err(non_finite("logits"));
            }
            Ok(Routing {
                k,
                experts: e,
                weights: w.into_iter().map(f32::from_bits).collect(),
            })
        }
    }
}

fn route_cpu(logits: &TensorRef, g: Gating, tokens: usize, experts: usize) -> Result<Routing> {
    let k = g.k();
    let (mode, renorm, scale) = g.code();
    let rows: Vec<Option<(Vec<u32>, Vec<f32>)>> = with_codec!(logits.dtype, C => (0..tokens)
        .into_par_iter()
        .map(|t| {
            let l: Vec<f32> = (0..experts).map(|e| C::to_f32(C::read(logits.data, t * experts + e))).collect();
            if l.iter().any(|v| !v.is_finite()) {
                return None;
            }
            // Stable sort by descending key: ties keep the lower index first.
            let mut order: Vec<u32> = (0..experts as u32).collect();
            order.sort_by(|&a, &b| key(l[b as usize].to_bits()).cmp(&key(l[a as usize].to_bits())));
            order.truncate(k);
            let top = l[order[0] as usize];
            let mut w: Vec<f32> = Vec::with_capacity(k);
            if mode == 1 {
                let mut sum = 0f32;
                for &e in &order {
                    let s = 1.0 / (1.0 + (-l[e as usize]).exp());
                    w.push(s);
                    sum += s;
                }
                for x in w.iter_mut() {
                    if renorm != 0 {
                        *x /= sum;
                    }
                    *x *= scale;
                }
            } else {
                let mut denom = 0f32;
                for &v in &l {
                    denom += (v - top).exp();
                }
                let mut sum = 0f32;
                for &e in &order {
                    let p = (l[e as usize] - top).exp() / denom;
                    w.push(p);
                    sum += p;
                }
                if mode == 0 && renorm != 0 {
                    for x in w.iter_mut() {
                        *x /= sum;
                    }
                }
            }
            Some((order, w))
        })
        .collect());
    let mut out = Routing {
        k,
        experts: Vec::with_capacity(tokens * k),
        weights: Vec::with_capacity(tokens * k),
    };
    for r in rows {
        let (e, w) = r.ok_or_else(|| non_finite("logits"))?;
        out.experts.extend(e);
        out.weights.extend(w);
    }
    Ok(out)
}

/// `y[t, :] = Σⱼ weights[t, j]·outputs[t, j, :]` (outputs tokens × k × dim,
/// weights tokens × k as `Routing` gives them), in `out`.
pub fn combine(dev: &Device, outputs: &TensorRef, weights: &[f32], out: DType) -> Result<Tensor> {
    outputs.check_float("combine")?;
    out.require_float("combine")?;
    let [tokens, k, dim] = outputs.shape else {
        return Err(Error::input(format!(
            "combine: expert outputs must be tokens × k × dim, got {:?}",
            outputs.shape
        )));
    };
    let (tokens, k, dim) = (*tokens, *k, *dim);
    if weights.len() != tokens * k {
        return Err(Error::input(format!(
            "combine: {} weights for {tokens} tokens × {k} experts",
            weights.len()
        )));
    }
    let x = outputs.to_f32_vec();
    if x.iter().chain(weights).any(|v| !v.is_finite()) {
        return Err(non_finite("expert outputs or weights"));
    }
    let y: Vec<f32> = match dev {
        Device::Cpu => {
            let mut y = vec![0f32; tokens * dim];
            y.par_chunks_mut(dim.max(1))
                .enumerate()
                .for_each(|(t, row)| {
                    for j in 0..k {
                        let w = weights[t * k + j];
                        for (acc, &v) in row
                            .iter_mut()
                            .zip(&x[(t * k + j) * dim..(t * k + j + 1) * dim])
                        {
                            *acc += w * v;
                        }
                    }
                });
            y
        }
        Device::Gpu(gpu) => {
            let n = tokens * dim;
            if n == 0 {
                return Tensor::from_f32(out, &[tokens, dim], &[]);
            }
            let es = outputs.dtype.size();
            let per_token = (k * dim * es + k * 4 + dim * 4) as u64;
            let Some(ct) = token_chunk(gpu, per_token, tokens) else {
                return combine(&Device::Cpu, outputs, weights, out);
            };
            let layout = StreamLayout {
                inputs: vec![(ct * k * dim * es) as u64, (ct * k * 4) as u64],
                outputs: vec![((ct * dim * 4) as u64, false)],
            };
            let pipeline = gpu
                .ctx
                .pipeline(Kernel::MoeCombine, outputs.dtype.shader_code(), 0)?;
            let starts: Vec<usize> = (0..tokens).step_by(ct).collect();
            let jobs = starts.iter().map(|&t0| {
                let t1 = (t0 + ct).min(tokens);
                Chunk {
                    params: params(&CombineParams {
                        tokens: (t1 - t0) as u32,
                        k: k as u32,
                        dim: dim as u32,
                        zero: 0,
                    }),
                    inputs: vec![
                        (&outputs.data[t0 * k * dim * es..t1 * k * dim * es]).into(),
                        f32_bytes(&weights[t0 * k..t1 * k]).into(),
                    ],
                    read: vec![((t1 - t0) * dim * 4) as u64],
                    workgroups: gpu.ctx.workgroups_for(((t1 - t0) * dim) as u64),
                }
            });
            let mut y = vec![0f32; n];
            gpu.ctx.stream(&pipeline, &layout, jobs, |i, outs| {
                let t0 = starts[i];
                let t1 = (t0 + ct).min(tokens);
                for (j, d) in y[t0 * dim..t1 * dim].iter_mut().enumerate() {
                    *d = f32_at(outs[0], j);
                }
                Ok(())
            })?;
            y
        }
    };
    Tensor::from_f32(out, &[tokens, dim], &y)
}
