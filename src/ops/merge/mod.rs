//! Merging models tensor by tensor with mergekit's methods: the generalized
//! task arithmetic family (`task_arithmetic`, `ties`, `dare_*`,
//! `breadcrumbs*`, `della*`), `linear` and `slerp` here; `nearswap`,
//! `model_stock` and `nuslerp` in `geometry`, `karcher` and `multislerp`
//! in `sphere`, `sce` in `sce`; DELLA's rank-driven masks in `della`.
//! The exact math is in ../shared/reference/pruning_merging.md §3.
//!
//! On a GPU device each method's last, per-element pass runs on the GPU:
//! the chain's and SCE's in `gpu` (masks and factors found here first),
//! the others' in `gpu_sum` (coefficients found here first). This is the
//! CPU reference: every step in f32, rounded once into the
//! output dtype (mergekit 0.1.5 rounds several methods' intermediate steps
//! to the inputs' dtype). Deltas are never stored: each pass recomputes
//! them from the inputs, block by block, so memory stays at the output
//! tensor whatever the number of models.
//!
//! Rules where mergekit leaves a choice open:
//! - magnitude top-k keeps k = max(1, ⌊d·N⌋) of the N elements, the largest
//!   |δ| first, ties to the lower flat index (mergekit: argsort's order);
//! - DARE draws from `rng::uniform`, keyed by (seed, tensor name, model,
//!   element index): the same mask on every device and chunking.

mod della;
mod geometry;
mod gpu;
mod gpu_sum;
mod rank;
pub mod rng;
mod sce;
mod sphere;

pub use geometry::{model_stock, nearswap, nuslerp, Vectors};
pub(crate) use gpu::{GtaParams, SceParams};
pub(crate) use gpu_sum::SumParams;
pub use sce::sce;
pub use sphere::{karcher, multislerp};

use super::codec::{with_codec, Codec};
use super::diff::Diff;
use super::CPU_BLOCK;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::select::key;
use crate::tensor::{DType, Tensor, TensorRef};
use rank::Smallest;
use rayon::prelude::*;
use std::ops::Range;

/// How each model's delta is thinned before it is weighted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sparsify {
    /// Every element kept (`task_arithmetic`).
    None,
    /// The ⌈density⌉ share of largest |δ| kept (`ties`).
    Magnitude,
    /// Each element kept with probability density (DARE).
    Random,
    /// The largest γ share and the smallest dropped, density kept in
    /// between (`breadcrumbs`).
    Breadcrumbs,
    /// Each element kept with a probability rising with its |δ|'s rank in
    /// its row, from density − ε to density + ε (DELLA).
    Della,
}

/// One model's parameters for one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Term {
    /// wᵢ.
    pub weight: f32,
    /// Share of the delta kept, in (0, 1].
    pub density: f64,
    /// Breadcrumbs: share of the largest |δ| dropped.
    pub gamma: f64,
    /// DELLA: half the spread of the keep probabilities.
    pub epsilon: f64,
}

/// The settings of the task-arithmetic chain for one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Gta {
    /// How deltas are thinned.
    pub sparsify: Sparsify,
    /// TIES sign election: per element, only the deltas agreeing with the
    /// sign of their weighted sum count.
    pub consensus: bool,
    /// Divide by the sum of the (counted) weights.
    pub normalize: bool,
    /// Scale each thinned delta back to its original L1 norm.
    pub rescale: bool,
    /// λ: the merged delta's scale.
    pub lambda: f32,
    /// The random stream's seed (DARE).
    pub seed: u64,
}

/// A merged tensor and what the merge did.
#[derive(Clone, Debug)]
pub struct Merged {
    /// The result, in the output dtype.
    pub tensor: Tensor,
    /// The result against the base (model 0).
    pub diff: Diff,
    /// Per model (1..): the share of elements whose delta reached the sum.
    pub kept: Vec<f64>,
}

fn check_inputs(what: &str, ts: &[TensorRef], out: DType) -> Result<()> {
    out.require_float(what)?;
    for t in ts {
        t.check_float(what)?;
        super::same_shape(what, ts[0].shape, t.shape)?;
    }
    Ok(())
}

/// Elements `r` of `t` as f32, rounded through `cast` when given (mergekit's
/// `dtype`: the inputs are cast before merging). Returns how many were NaN
/// or infinite as read.
fn decode(t: &TensorRef, r: Range<usize>, cast: Option<DType>, buf: &mut Vec<f32>) -> u64 {
    buf.clear();
    buf.resize(r.len(), 0.0);
    // Exact-size slices zipped: no bounds checks, so the loop vectorizes.
    // The NaN/inf count as an integer test on the bits, in the same
    // vectorized code.
    let nonfinite = with_codec!(t.dtype, C => fast!({
        let bytes = &t.data[r.start * C::SIZE..r.end * C::SIZE];
        for (y, x) in buf.iter_mut().zip(bytes.chunks_exact(C::SIZE)) {
            *y = C::to_f32(C::read(x, 0));
        }
        buf.iter()
            .map(|v| (v.to_bits() & 0x7f80_0000 == 0x7f80_0000) as u64)
            .sum::<u64>()
    }));
    if let Some(c) = cast.filter(|&c| c != t.dtype && c != DType::F32) {
        with_codec!(c, K => buf.iter_mut().for_each(|v| *v = K::to_f32(K::from_f32(*v))));
    }
    nonfinite
}

fn block_range(b: usize, n: usize) -> Range<usize> {
    b * CPU_BLOCK..((b + 1) * CPU_BLOCK).min(n)
}

/// Writes a tensor of `out` shaped like `base` block by block: `f(b, r,
/// ys)` fills `ys` with the f32 results of elements `r` (block `b`) and
/// returns what it counted and the other inputs' NaN and infinite values
/// it met. Each value is rounded once; the figures are against `base`.
fn write_blocks<S: Send>(
    base: &TensorRef,
    out: DType,
    f: impl Fn(usize, Range<usize>, &mut Vec<f32>) -> (S, u64) + Sync,
) -> (Tensor, Diff, Vec<S>) {
    let n = base.numel();
    let mut t = Tensor::for_overwrite(out, base.shape);
    let parts: Vec<(Diff, S)> = with_codec!(out, O => t
        .data
        .par_chunks_mut(CPU_BLOCK * O::SIZE)
        .enumerate()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(ys, xs), (b, ob)| {
                let r = block_range(b, n);
                let (s, other) = f(b, r.clone(), ys);
                // Exact-size chunks zipped: the rounding loop vectorizes.
                fast!(for (y, o) in ys.iter_mut().zip(ob.chunks_exact_mut(O::SIZE)) {
                    let raw = O::from_f32(*y);
                    O::write(o, 0, raw);
                    *y = O::to_f32(raw);
                });
                decode(base, r, None, xs);
                let mut d = Diff::default();
                d.add_f32s(xs, ys);
                d.nonfinite_other = other;
                (d, s)
            },
        )
        .collect());
    let mut d = Diff::default();
    let mut counts = Vec::with_capacity(parts.len());
    for (dp, s) in parts {
        d = d.merge(dp);
        counts.push(s);
    }
    (t, d, counts)
}

/// Which elements of one model's delta survive thinning.
pub(crate) enum Mask {
    All,
    Random {
        key: u32,
        p: f32,
    },
    /// Not among the k smallest |δ|.
    Above(Smallest),
    /// Not among the `lower` smallest, but among the `upper` smallest.
    Between(Smallest, Smallest),
    /// One bit per element, rows of `row_len` each starting a word.
    Bits {
        row_len: usize,
        words: usize,
        bits: Vec<u64>,
    },
}

impl Mask {
    /// Keep flags for elements `r` (block `b`) with deltas `d`.
    pub(crate) fn block(&self, b: usize, r: Range<usize>, d: &[f32], keep: &mut Vec<bool>) {
        keep.clear();
        match self {
            Mask::All => keep.resize(d.len(), true),
            Mask::Random { key, p } => {
                keep.resize(r.len(), false);
                rng::below(*key, r.start as u64, *p, keep);
            }
            Mask::Above(s) => {
                let mut tie = s.ties_before(b);
                keep.extend(d.iter().map(|&v| !s.contains(key(v), &mut tie)));
            }
            Mask::Between(lo, hi) => {
                let (mut t0, mut t1) = (lo.ties_before(b), hi.ties_before(b));
                keep.extend(d.iter().map(|&v| {
                    let k = key(v);
                    let below = lo.contains(k, &mut t0);
                    let within = hi.contains(k, &mut t1);
                    !below && within
                }));
            }
            Mask::Bits {
                row_len,
                words,
                bits,
            } => {
                // Row by row: no division per element.
                for (row, seg) in super::row_segments(r, *row_len) {
                    let w = &bits[row * words..(row + 1) * words];
                    let first = row * row_len;
                    keep.extend(seg.map(|i| {
                        let j = i - first;
                        w[j / 64] >> (j % 64) & 1 == 1
                    }));
                }
            }
        }
    }
}

/// Σ|d| and Σ|d| where `keep`, each in f64 over eight lanes (`lane_sum`);
/// `d` is left holding the kept |d|, 0 elsewhere. The select is stored
/// before it is summed: summed in the same loop, the compiler turns it
/// into a branch per element, a coin flip for DARE.
fn l1_sums(d: &mut [f32], keep: &[bool]) -> (f64, f64) {
    let all = lane_sum(d.len(), |i| d[i].abs());
    fast!({
        for (x, &k) in d.iter_mut().zip(keep) {
            *x = if k { x.abs() } else { 0.0 };
        }
    });
    (all, lane_sum(d.len(), |i| d[i]))
}

/// Σ f(i) for i < n in f64 over eight lanes (i into lane i % 8, the lanes
/// then added in order), so that the loop vectorizes and the sum still
/// repeats exactly.
#[inline(always)]
fn lane_sum(n: usize, f: impl Fn(usize) -> f32) -> f64 {
    fast!({
        let mut l = [0f64; 8];
        let whole = n / 8 * 8;
        for c in (0..whole).step_by(8) {
            for (j, l) in l.iter_mut().enumerate() {
                *l += f(c + j) as f64;
            }
        }
        for i in whole..n {
            l[i % 8] += f(i) as f64;
        }
        l.iter().fold(0.0, |s, x| s + x)
    })
}

/// Σu², Σv², Σuv in f64 over eight lanes, as `l1_sums` adds (element e
/// into lane e % 8, the lanes then added in order): a loop that vectorizes.
fn gram_lanes(x: &[f32], y: &[f32]) -> [f64; 3] {
    fast!({
        let mut l = [[0f64; 8]; 3];
        let (xc, xr) = x.as_chunks::<8>();
        let (yc, yr) = y.as_chunks::<8>();
        let mut add = |j: usize, u: f32, v: f32| {
            let (u, v) = (u as f64, v as f64);
            l[0][j] += u * u;
            l[1][j] += v * v;
            l[2][j] += u * v;
        };
        for (u, v) in xc.iter().zip(yc) {
            for j in 0..8 {
                add(j, u[j], v[j]);
            }
        }
        for (j, (&u, &v)) in xr.iter().zip(yr).enumerate() {
            add(j, u, v);
        }
        l.map(|lanes| lanes.iter().fold(0.0, |s, x| s + x))
    })
}

/// δ = x − base for elements `r`; returns x's NaN and infinite values.
fn deltas(
    base: &TensorRef,
    x: &TensorRef,
    r: Range<usize>,
    cast: Option<DType>,
    bufs: &mut (Vec<f32>, Vec<f32>),
) -> u64 {
    decode(base, r.clone(), cast, &mut bufs.0);
    let nonfinite = decode(x, r, cast, &mut bufs.1);
    for (d, b) in bufs.1.iter_mut().zip(&bufs.0) {
        *d -= b;
    }
    nonfinite
}

/// |δ|'s sort keys for elements `r`: one fused, vectorizable loop when
/// both tensors have one dtype and no cast changes them (the rank passes
/// run it several times per model).
fn delta_keys(
    base: &TensorRef,
    x: &TensorRef,
    r: Range<usize>,
    cast: Option<DType>,
    out: &mut Vec<u32>,
) {
    out.clear();
    let plain = base.dtype == x.dtype && cast.is_none_or(|c| c == base.dtype || c == DType::F32);
    if !plain {
        let mut bufs = (Vec::new(), Vec::new());
        deltas(base, x, r, cast, &mut bufs);
        out.extend(bufs.1.iter().map(|&v| key(v)));
        return;
    }
    out.resize(r.len(), 0);
    with_codec!(base.dtype, C => fast!({
        let bs = &base.data[r.start * C::SIZE..r.end * C::SIZE];
        let xs = &x.data[r.start * C::SIZE..r.end * C::SIZE];
        for ((o, b), v) in out.iter_mut().zip(bs.chunks_exact(C::SIZE)).zip(xs.chunks_exact(C::SIZE)) {
            *o = key(C::to_f32(C::read(v, 0)) - C::to_f32(C::read(b, 0)));
        }
    }))
}

/// The rank cuts a model's thinning needs, as counts of smallest |δ|:
/// magnitude drops the n − k smallest; breadcrumbs keeps ranks between two.
fn cut_counts(n: usize, term: &Term, sparsify: Sparsify) -> Vec<u64> {
    let floor = |share: f64| (share * n as f64).floor() as u64;
    match sparsify {
        Sparsify::Magnitude => {
            let keep = if term.density >= 1.0 {
                n as u64
            } else {
                floor(term.density).max(1).min(n as u64)
            };
            vec![n as u64 - keep]
        }
        Sparsify::Breadcrumbs => {
            // Ascending by |δ|: drop the `bottom` smallest, keep the next
            // `keep`, drop the rest (the γ share of largest); when the two
            // shares overlap, the top gives way.
            let keep = floor(term.density);
            let bottom = (n as u64).saturating_sub(keep + floor(term.gamma));
            vec![bottom, bottom + keep]
        }
        _ => Vec::new(),
    }
}

/// A model's mask, and its L1 sums (Σ|δ|, kept Σ|δ|) where making it took
/// them; `cuts` yields the rank cuts `cut_counts` asked for.
#[allow(clippy::too_many_arguments)]
fn mask_for(
    base: &TensorRef,
    x: &TensorRef,
    term: &Term,
    g: &Gta,
    name: &str,
    model: u32,
    cast: Option<DType>,
    cuts: &mut impl Iterator<Item = Smallest>,
) -> Result<(Mask, Option<(f64, f64)>)> {
    let mut cut = || {
        cuts.next()
            .ok_or_else(|| Error::input("merge: a rank cut is missing"))
    };
    if g.sparsify == Sparsify::Della && term.density < 1.0 {
        let (mask, l1) = della::mask(base, x, term, g, name, model, cast)?;
        return Ok((mask, Some(l1)));
    }
    let mask = match g.sparsify {
        Sparsify::None => Mask::All,
        Sparsify::Random => Mask::Random {
            key: rng::stream_key(g.seed, name, model),
            p: term.density as f32,
        },
        Sparsify::Magnitude => Mask::Above(cut()?),
        Sparsify::Breadcrumbs => {
            let lo = cut()?;
            Mask::Between(lo, cut()?)
        }
        Sparsify::Della => Mask::All, // density ≥ 1
    };
    Ok((mask, None))
}

/// The generalized task-arithmetic chain over `ts[0]` (the base) and the
/// models `ts[1..]` with their `terms`: per model δᵢ = xᵢ − base, thinned
/// (and rescaled), weighted; with consensus only the deltas agreeing with
/// the sign of Σ wᵢδᵢ count, each element divided by the weights that
/// counted there; then base + λ·Δ. `name` keys the random stream.
pub fn gta(
    dev: &Device,
    ts: &[TensorRef],
    terms: &[Term],
    g: &Gta,
    name: &str,
    cast: Option<DType>,
    out: DType,
) -> Result<Merged> {
    check_inputs("merge", ts, out)?;
    if ts.len() != terms.len() + 1 || terms.is_empty() {
        return Err(Error::input(format!(
            "merge: {} tensors for {} weighted models and a base",
            ts.len(),
            terms.len()
        )));
    }
    let base = &ts[0];
    let n = base.numel();
    // Every model's rank cuts in shared passes (the base read once each).
    let requests: Vec<(usize, u64)> = terms
        .iter()
        .enumerate()
        .flat_map(|(i, t)| {
            cut_counts(n, t, g.sparsify)
                .into_iter()
                .map(move |k| (i, k))
        })
        .collect();
    let cuts = if requests.is_empty() {
        Vec::new()
    } else {
        rank::find_many(n, terms.len(), &requests, &|r, bufs: &mut [Vec<u32>]| {
            for (i, out) in bufs.iter_mut().enumerate() {
                delta_keys(base, &ts[i + 1], r.clone(), cast, out);
            }
        })?
    };
    let mut cuts = cuts.into_iter();
    let (masks, known): (Vec<Mask>, Vec<Option<(f64, f64)>>) = terms
        .iter()
        .enumerate()
        .map(|(i, t)| mask_for(base, &ts[i + 1], t, g, name, i as u32 + 1, cast, &mut cuts))
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    // Rescale: each thinned delta back to its L1 norm (sums in f64, in
    // block order — DELLA's in row order, taken with its mask — so that
    // they repeat exactly).
    let scale: Vec<f32> = if g.rescale && g.sparsify != Sparsify::None {
        // Every model whose mask did not bring them in one pass (the base
        // decoded once per block).
        let pending: Vec<usize> = (0..masks.len()).filter(|&i| known[i].is_none()).collect();
        let parts: Vec<Vec<(f64, f64)>> = if pending.is_empty() {
            Vec::new()
        } else {
            (0..n.div_ceil(CPU_BLOCK))
                .into_par_iter()
                .map_init(
                    || (Vec::new(), Vec::new(), Vec::new()),
                    |(b0, d, keep), b| {
                        let r = block_range(b, n);
                        decode(base, r.clone(), cast, b0);
                        pending
                            .iter()
                            .map(|&i| {
                                decode(&ts[i + 1], r.clone(), cast, d);
                                fast!(d.iter_mut().zip(b0.iter()).for_each(|(x, b)| *x -= b));
                                masks[i].block(b, r.clone(), d, keep);
                                l1_sums(d, keep)
                            })
                            .collect()
                    },
                )
                .collect()
        };
        let mut l1: Vec<(f64, f64)> = known.iter().map(|k| k.unwrap_or_default()).collect();
        for (at, &i) in pending.iter().enumerate() {
            l1[i] = parts
                .iter()
                .fold((0.0, 0.0), |a, p| (a.0 + p[at].0, a.1 + p[at].1));
        }
        l1.into_iter()
            .map(|(all, kept)| {
                if all < 1e-7 || kept < 1e-7 {
                    1.0
                } else {
                    (all / kept) as f32
                }
            })
            .collect()
    } else {
        vec![1.0; terms.len()]
    };
    let wsum: f32 = terms.iter().map(|t| t.weight).sum();
    let divisor = if wsum.abs() < 1e-8 { 1.0 } else { wsum };
    let models = terms.len();
    let kept_share = |counts: Vec<u64>| -> Vec<f64> {
        counts
            .iter()
            .map(|&c| if n == 0 { 0.0 } else { c as f64 / n as f64 })
            .collect()
    };
    if let Device::Gpu(gpu) = dev {
        if let Some((tensor, diff, counts)) =
            gpu::combine(gpu, ts, terms, &masks, &scale, g, divisor, cast, out)?
        {
            return Ok(Merged {
                tensor,
                diff,
                kept: kept_share(counts),
            });
        }
    }
    // Model by model over the block's arrays (loops the compiler can
    // vectorize), each element's sums still taken in model order.
    let (tensor, diff, counts) = write_blocks(base, out, |b, r, ys| {
        fast!({
            let len = r.len();
            let mut b0 = Vec::new();
            decode(base, r.clone(), cast, &mut b0);
            let (mut d, mut keep) = (Vec::new(), Vec::new());
            // wδ of every model for this block, model-major.
            let mut wd = vec![0f32; models * len];
            let mut other = 0;
            for (i, m) in masks.iter().enumerate() {
                other += decode(&ts[i + 1], r.clone(), cast, &mut d);
                d.iter_mut().zip(&b0).for_each(|(x, b)| *x -= b);
                m.block(b, r.clone(), &d, &mut keep);
                let (w, s) = (terms[i].weight, scale[i]);
                for ((o, &x), &k) in wd[i * len..(i + 1) * len].iter_mut().zip(&d).zip(&keep) {
                    *o = if k { w * (x * s) } else { 0.0 };
                }
            }
            let mut counted = vec![0u64; models];
            let mut sum = vec![0f32; len];
            let mut div = vec![divisor; len];
            if g.consensus {
                // Σ wδ decides the sign; only deltas that agree count, and
                // only their weights divide. (A sum of non-zero terms is
                // never −0, so adding 0 for the others changes no bit.)
                let mut total = vec![0f32; len];
                for row in wd.chunks_exact(len.max(1)) {
                    total.iter_mut().zip(row).for_each(|(t, v)| *t += v);
                }
                div.iter_mut().for_each(|x| *x = 0.0);
                for (i, row) in wd.chunks_exact(len.max(1)).enumerate() {
                    let w = terms[i].weight;
                    let mut c = 0u64;
                    for (((s, dv), &v), &t) in
                        sum.iter_mut().zip(div.iter_mut()).zip(row).zip(&total)
                    {
                        let k = (v != 0.0) & ((v > 0.0) == (t >= 0.0));
                        *s += if k { v } else { 0.0 };
                        *dv += if k { w } else { 0.0 };
                        c += k as u64;
                    }
                    counted[i] = c;
                }
                div.iter_mut().filter(|x| **x == 0.0).for_each(|x| *x = 1.0);
            } else {
                for (i, row) in wd.chunks_exact(len.max(1)).enumerate() {
                    sum.iter_mut().zip(row).for_each(|(s, v)| *s += v);
                    counted[i] = row.iter().filter(|v| **v != 0.0).count() as u64;
                }
            }
            if g.normalize {
                sum.iter_mut().zip(&div).for_each(|(s, d)| *s /= d);
            }
            ys.clear();
            ys.extend(b0.iter().zip(&sum).map(|(b, s)| b + g.lambda * s));
            (counted, other)
        })
    });
    let totals = (0..models)
        .map(|i| counts.iter().map(|c| c[i]).sum())
        .collect();
    Ok(Merged {
        tensor,
        diff,
        kept: kept_share(totals),
    })
}

/// The last pass `s` on the GPU when `dev` is one and the pass can run
/// there (None: run the CPU reference).
fn on_gpu(
    dev: &Device,
    s: &gpu_sum::Sum,
    cast: Option<DType>,
    out: DType,
) -> Result<Option<(Tensor, Diff)>> {
    match dev {
        Device::Gpu(g) => gpu_sum::sum(g, s, cast, out),
        Device::Cpu => Ok(None),
    }
}

/// Σ wᵢ·xᵢ, divided by Σ wᵢ when `normalize` (an error if that sum is 0).
/// The figures are against `ts[0]`.
pub fn linear(
    dev: &Device,
    ts: &[TensorRef],
    weights: &[f32],
    normalize: bool,
    cast: Option<DType>,
    out: DType,
) -> Result<(Tensor, Diff)> {
    check_inputs("linear merge", ts, out)?;
    if ts.is_empty() || ts.len() != weights.len() {
        return Err(Error::input(format!(
            "linear merge: {} weights for {} models",
            weights.len(),
            ts.len()
        )));
    }
    let wsum: f32 = weights.iter().sum();
    if normalize && wsum == 0.0 {
        return Err(Error::input(
            "linear merge: the weights sum to 0 (set normalize: false to add them as they are)",
        ));
    }
    let mut s = gpu_sum::Sum::whole(&ts[0], ts, weights, -0.0);
    s.divide = normalize.then_some(wsum);
    if let Some(r) = on_gpu(dev, &s, cast, out)? {
        return Ok(r);
    }
    let (t, d, _) = write_blocks(&ts[0], out, |_, r, ys| {
        let mut x = Vec::new();
        // The first term as it is (a lone model scaled by 1 is copied
        // exactly, −0 included), then the others added in order.
        decode(&ts[0], r.clone(), cast, ys);
        ys.iter_mut().for_each(|y| *y *= weights[0]);
        let mut other = 0;
        for (t, &w) in ts.iter().zip(weights).skip(1) {
            other += decode(t, r.clone(), cast, &mut x);
            ys.iter_mut().zip(&x).for_each(|(y, v)| *y += w * v);
        }
        if normalize {
            ys.iter_mut().for_each(|y| *y /= wsum);
        }
        ((), other)
    });
    Ok((t, d))
}

/// Spherical interpolation from `a` (t = 0) to `b` (t = 1) over the whole
/// flattened tensor, as mergekit's `slerp`: unit vectors when the norm
/// exceeds 1e-8; when |cos| > 0.9995, the plain lerp (1 − t)·a + t·b.
/// Norms and the dot product are summed in f64.
pub fn slerp(
    dev: &Device,
    a: &TensorRef,
    b: &TensorRef,
    t: f32,
    cast: Option<DType>,
    out: DType,
) -> Result<(Tensor, Diff)> {
    check_inputs("slerp", &[*a, *b], out)?;
    super::finite_param("slerp t", t)?;
    let n = a.numel();
    let parts: Vec<[f64; 3]> = (0..n.div_ceil(CPU_BLOCK))
        .into_par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(x, y), blk| {
                let r = block_range(blk, n);
                decode(a, r.clone(), cast, x);
                decode(b, r, cast, y);
                gram_lanes(x, y)
            },
        )
        .collect();
    let s = parts
        .iter()
        .fold([0f64; 3], |a, p| [a[0] + p[0], a[1] + p[1], a[2] + p[2]]);
    let (na, nb) = (s[0].sqrt(), s[1].sqrt());
    let unit = |x: f64| if x > 1e-8 { x } else { 1.0 };
    let dot = s[2] / (unit(na) * unit(nb));
    let (ca, cb) = if dot.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta0 = dot.acos();
        let sin0 = theta0.sin();
        let theta_t = theta0 * t as f64;
        (
            ((theta0 - theta_t).sin() / sin0) as f32,
            (theta_t.sin() / sin0) as f32,
        )
    };
    let pair = [*a, *b];
    if let Some(r) = on_gpu(
        dev,
        &gpu_sum::Sum::whole(a, &pair, &[ca, cb], -0.0),
        cast,
        out,
    )? {
        return Ok(r);
    }
    let (tensor, diff, _) = write_blocks(a, out, |_, r, ys| {
        let mut y = Vec::new();
        decode(a, r.clone(), cast, ys);
        let other = decode(b, r, cast, &mut y);
        ys.iter_mut()
            .zip(&y)
            .for_each(|(x, v)| *x = ca * *x + cb * v);
        ((), other)
    });
    Ok((tensor, diff))
}

#[cfg(test)]
mod tests;
