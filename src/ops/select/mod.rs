//! Exact target sparsity: zero exactly k weights, the smallest |w| first,
//! ties broken by lower flat index (PyTorch l1_unstructured's count with a
//! deterministic mask).
//!
//! The key of a weight is the bit pattern of |w| as f32: for non-negative
//! floats integer order is value order, and NaN sorts above +inf. The cut
//! (the k-th smallest key) is found by a radix select over 16-bit key
//! histograms computed on the device — one pass over the tensor for bf16
//! (whose keys have zero low bits), two for f16 and f32 — and a final pass
//! zeroes keys below the cut and lists the positions of keys equal to it,
//! of which the host zeroes the first ones in flat order. The CPU computes
//! the same histograms, so both find the same cut and the same mask.

mod pattern;
mod rows;

pub(crate) use pattern::NmParams;
pub use pattern::{prune_pattern, Pattern, MAX_PATTERN_M};
pub use rows::prune_rows_to_sparsity;
pub(crate) use rows::{RowApplyParams, RowCutParams};

use super::codec::{with_codec, Codec};
use super::kernels::Kernel;
use super::{chunk_elems, chunks, params, u32_at, CPU_BLOCK};
use crate::device::{Chunk, Device, Gpu, StreamLayout};
use crate::error::{Error, Result};
use crate::ops::diff::Diff;
use crate::tensor::{DType, Tensor, TensorRef};
use rayon::prelude::*;

const BINS: usize = 1 << 16;

kernel_params!(HistParams {
    n: u32,
    level: u32,
    high: u32,
    _pad0: u32,
});

kernel_params!(CutParams {
    n: u32,
    cut: u32,
    _pad0: u32,
    _pad1: u32,
});

/// Which 16 bits of the key a histogram counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    /// Bins are the keys' high 16 bits.
    High,
    /// Bins are the low 16 bits of keys whose high 16 bits equal this.
    Low(u32),
}

/// The k-th smallest key, and how many of the weights equal to it are
/// pruned (the first ones in flat order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cut {
    /// The k-th smallest key (|w|'s bits).
    pub key: u32,
    /// How many keys equal to it are pruned.
    pub ties: u64,
    /// Keys equal to `key` among those the histograms counted.
    pub equal: u64,
}

/// The sort key of a weight (see the module doc).
#[inline(always)]
pub fn key(v: f32) -> u32 {
    v.to_bits() & 0x7fff_ffff
}

/// k = round_ties_even(s·n) (Python's `round`, as PyTorch counts).
pub fn count_for(s: f64, n: u64) -> u64 {
    (s * n as f64).round_ties_even() as u64
}

/// Err unless s is in [0, 1].
pub fn check_sparsity(s: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&s) {
        return Err(Error::input(format!("sparsity must be in [0, 1], got {s}")));
    }
    Ok(())
}

/// Whether the low 16 bits of a dtype's keys can be non-zero (bf16's cannot,
/// so one histogram level decides its cut).
pub fn needs_low_level(dtype: DType) -> bool {
    dtype != DType::BF16
}

/// A key histogram of `t` on `dev`.
pub fn key_histogram(dev: &Device, t: &TensorRef, level: Level) -> Result<Vec<u64>> {
    t.check_float("key histogram")?;
    match dev {
        Device::Cpu => Ok(hist_cpu(t, level)),
        Device::Gpu(g) => hist_gpu(g, t, level),
    }
}

/// Tensors below this many elements are histogrammed serially on the CPU,
/// whatever the device: a dispatch (or a parallel split with its own
/// 65,536 bins per thread) costs more than counting them.
const SMALL_HIST: usize = 1 << 16;

/// Adds the key histogram of `t` to `hist` (65,536 bins): for sums over
/// many tensors (a global cut) in memory that does not grow with their
/// number. The counts are the same on every device.
pub fn add_key_histogram(
    dev: &Device,
    t: &TensorRef,
    level: Level,
    hist: &mut [u64],
) -> Result<()> {
    t.check_float("key histogram")?;
    if hist.len() != BINS {
        return Err(Error::input(format!(
            "a key histogram has {BINS} bins, got {}",
            hist.len()
        )));
    }
    if t.numel() >= SMALL_HIST {
        let h = key_histogram(dev, t, level)?;
        hist.iter_mut().zip(h).for_each(|(a, b)| *a += b);
        return Ok(());
    }
    with_codec!(t.dtype, C => {
        for i in 0..t.numel() {
            let k = key(C::to_f32(C::read(t.data, i)));
            match level {
                Level::High => hist[(k >> 16) as usize] += 1,
                Level::Low(high) if k >> 16 == high => hist[(k & 0xffff) as usize] += 1,
                _ => {}
            }
        }
    });
    Ok(())
}

fn hist_cpu(t: &TensorRef, level: Level) -> Vec<u64> {
    let n = t.numel();
    with_codec!(t.dtype, C => (0..n.div_ceil(CPU_BLOCK))
    .into_par_iter()
    .fold(
        || vec![0u64; BINS],
        |mut h, b| fast!({
            for i in b * CPU_BLOCK..((b + 1) * CPU_BLOCK).min(n) {
                let k = key(C::to_f32(C::read(t.data, i)));
                match level {
                    Level::High => h[(k >> 16) as usize] += 1,
                    Level::Low(high) if k >> 16 == high => h[(k & 0xffff) as usize] += 1,
                    _ => {}
                }
            }
            h
        }),
    )
    .reduce(
        || vec![0u64; BINS],
        |mut a, b| {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
            a
        },
    ))
}

fn hist_gpu(g: &Gpu, t: &TensorRef, level: Level) -> Result<Vec<u64>> {
    let n = t.numel();
    let es = t.dtype.size();
    let mut hist = vec![0u64; BINS];
    let ce = chunk_elems(g, n, es as f64, 0)?;
    let layout = StreamLayout {
        inputs: vec![(ce * es) as u64],
        outputs: vec![((BINS * 4) as u64, true)],
    };
    let pipeline = g.ctx.pipeline(Kernel::KeyHist, t.dtype.shader_code(), 0)?;
    let (lv, high) = match level {
        Level::High => (0, 0),
        Level::Low(h) => (1, h),
    };
    let jobs = chunks(n, ce).map(|r| Chunk {
        params: params(&HistParams {
            n: r.len() as u32,
            level: lv,
            high,
            ..Default::default()
        }),
        inputs: vec![(&t.data[r.start * es..r.end * es]).into()],
        read: vec![(BINS * 4) as u64],
        workgroups: g.ctx.workgroups_for((r.len() * es).div_ceil(4) as u64),
    });
    g.ctx.stream(&pipeline, &layout, jobs, |_, outs| {
        for (b, h) in hist.iter_mut().enumerate() {
            *h += u32_at(outs[0], b) as u64;
        }
        Ok(())
    })?;
    Ok(hist)
}

/// The bin holding the k-th smallest key (1-based k ≥ 1) and the count of
/// keys in lower bins.
pub(crate) fn locate(hist: &[u64], k: u64) -> (u32, u64) {
    let mut below = 0u64;
    for (b, &h) in hist.iter().enumerate() {
        if below + h >= k {
            return (b as u32, below);
        }
        below += h;
    }
    unreachable!("k is at most the histogram's total")
}

/// Finds the cut for the k smallest keys from histograms that `hist`
/// computes (over one tensor or, summed, over many). `low_needed`: whether
/// any key can have non-zero low bits.
pub fn find_cut(
    k: u64,
    low_needed: bool,
    mut hist: impl FnMut(Level) -> Result<Vec<u64>>,
) -> Result<Cut> {
    if k == 0 {
        // Nothing below key 0, and no ties taken.
        return Ok(Cut {
            key: 0,
            ties: 0,
            equal: u64::MAX,
        });
    }
    let high = hist(Level::High)?;
    let total: u64 = high.iter().sum();
    if k > total {
        return Err(Error::input(format!("cannot prune {k} of {total} weights")));
    }
    let (hb, below) = locate(&high, k);
    if !low_needed {
        return Ok(Cut {
            key: hb << 16,
            ties: k - below,
            equal: high[hb as usize],
        });
    }
    let low = hist(Level::Low(hb))?;
    let (lb, below2) = locate(&low, k - below);
    Ok(Cut {
        key: (hb << 16) | lb,
        ties: k - below - below2,
        equal: low[lb as usize],
    })
}

/// What applying a cut did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CutStats {
    /// Elements.
    pub numel: u64,
    /// Zeros in the output.
    pub zeros: u64,
    /// Weights equal to the cut that were pruned (taken from the budget).
    pub ties_pruned: u64,
    /// The output against the input: from the pruning pass on the CPU, from
    /// each chunk as it comes back from a GPU.
    pub diff: Diff,
}

/// Zeroes keys below `cut.key` and the first `cut.ties` keys equal to it in
/// flat order (fewer if the tensor holds fewer: the rest of the budget goes
/// to the next tensor of a global cut). `equal_here` bounds how many keys
/// of `t` equal the cut (from its histogram; it sizes the GPU's readback).
pub fn apply_cut(
    dev: &Device,
    t: &TensorRef,
    cut: Cut,
    equal_here: u64,
) -> Result<(Tensor, CutStats)> {
    t.check_float("sparsity prune")?;
    match dev {
        Device::Cpu => Ok(apply_cpu(t, cut)),
        Device::Gpu(g) => apply_gpu(g, t, cut, equal_here),
    }
}

fn apply_cpu(t: &TensorRef, cut: Cut) -> (Tensor, CutStats) {
    let n = t.numel();
    // Pass 1, parallel and branch-free: keys below the cut become zero,
    // keys equal to it are kept and counted per block.
    type Part = (u64, u64, Diff);
    let es = t.dtype.size();
    let (mut out, parts): (Tensor, Vec<Part>) = with_codec!(t.dtype, C => {
        let mut out = Tensor::for_overwrite(t.dtype, t.shape);
        let parts = out
            .data
            .par_chunks_mut(CPU_BLOCK * C::SIZE)
            .zip(t.data.par_chunks(CPU_BLOCK * C::SIZE))
            .map(|(ob, ib)| fast!({
                let (mut z, mut ties) = (0u64, 0u64);
                for (x, y) in ib.chunks_exact(C::SIZE).zip(ob.chunks_exact_mut(C::SIZE)) {
                    let raw = C::read(x, 0);
                    let k = key(C::to_f32(raw));
                    let prune = k < cut.key;
                    ties += (k == cut.key) as u64;
                    C::write(y, 0, if prune { 0 } else { raw });
                    z += (prune || k == 0) as u64;
                }
                let mut d = Diff::default();
                d.add_block::<C, C>(ib, ob);
                (z, ties, d)
            }))
            .collect();
        (out, parts)
    });
    // The first `cut.ties` ties in flat order: each block's share.
    let mut left = cut.ties;
    let (mut zeros, mut d) = (0u64, Diff::default());
    let mut share = Vec::with_capacity(parts.len());
    for (z, ties, dp) in parts {
        zeros += z;
        d = d.merge(dp);
        let take = ties.min(left);
        share.push((take, ties));
        left -= take;
    }
    // Pass 2, parallel, over the blocks with ties to prune: all of them
    // (branch-free) or the first ones (the one block where the budget ends).
    with_codec!(t.dtype, C => out
    .data
    .par_chunks_mut(CPU_BLOCK * es)
    .zip(&share)
    .filter(|(_, &(take, _))| take > 0)
    .for_each(|(ob, &(take, ties))| fast!({
        if take == ties {
            for y in ob.chunks_exact_mut(C::SIZE) {
                let raw = C::read(y, 0);
                let tie = key(C::to_f32(raw)) == cut.key;
                C::write(y, 0, if tie { 0 } else { raw });
            }
        } else {
            let mut left = take;
            for y in ob.chunks_exact_mut(C::SIZE) {
                if left == 0 {
                    break;
                }
                if key(C::to_f32(C::read(y, 0))) == cut.key {
                    C::write(y, 0, 0);
                    left -= 1;
                }
            }
        }
    })));
    let pruned = cut.ties - left;
    cut_taken(&mut d, &mut zeros, cut, pruned);
    (
        out,
        CutStats {
            numel: n as u64,
            zeros,
            ties_pruned: pruned,
            diff: d,
        },
    )
}

/// Accounts for `pruned` weights equal to the cut that became zero after
/// the figures counted them as kept.
fn cut_taken(d: &mut Diff, zeros: &mut u64, cut: Cut, pruned: u64) {
    if cut.key == 0 || pruned == 0 {
        return;
    }
    let v = f32::from_bits(cut.key) as f64;
    *zeros += pruned;
    d.zeros += pruned;
    d.max_abs = d.max_abs.max(v);
    d.sum_sq += pruned as f64 * v * v;
}

fn apply_gpu(g: &Gpu, t: &TensorRef, cut: Cut, equal_here: u64) -> Result<(Tensor, CutStats)> {
    let n = t.numel();
    let es = t.dtype.size();
    let mut out = Tensor::zeros(t.dtype, t.shape);
    let mut st = CutStats {
        numel: n as u64,
        zeros: 0,
        ties_pruned: 0,
        diff: Diff::default(),
    };
    // Input, output, and a tie list that may hold every element.
    let ce = chunk_elems(g, n, 4.0f64.max(es as f64), 0)?;
    let layout = StreamLayout {
        inputs: vec![(ce * es) as u64],
        outputs: vec![
            ((ce * es) as u64, false),
            ((ce * 4) as u64, false),
            (8, true),
        ],
    };
    let pipeline = g.ctx.pipeline(Kernel::CutApply, t.dtype.shader_code(), 0)?;
    let ranges: Vec<_> = chunks(n, ce).collect();
    let mut left = cut.ties;
    let dt = t.dtype;
    let jobs = ranges.iter().map(|r| Chunk {
        params: params(&CutParams {
            n: r.len() as u32,
            cut: cut.key,
            ..Default::default()
        }),
        inputs: vec![(&t.data[r.start * es..r.end * es]).into()],
        // At most `equal_here` ties are listed; the count says how many are.
        read: vec![
            (r.len() * es) as u64,
            (r.len() as u64).min(equal_here) * 4,
            8,
        ],
        workgroups: g.ctx.workgroups_for((r.len() * es).div_ceil(4) as u64),
    });
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let r = &ranges[k];
        let o = &mut out.data[r.start * es..r.end * es];
        o.copy_from_slice(outs[0]);
        let listed = u32_at(outs[2], 0) as usize;
        st.zeros += u32_at(outs[2], 1) as u64;
        let mut ties: Vec<u32> = (0..listed).map(|i| u32_at(outs[1], i)).collect();
        ties.sort_unstable();
        for (j, &e) in ties.iter().enumerate() {
            if (j as u64) < left {
                dt.write_raw(o, e as usize, 0);
                st.zeros += 1;
            } else {
                // A tie kept: zero only if it is ±0 itself.
                st.zeros += (cut.key == 0) as u64;
            }
        }
        let taken = (ties.len() as u64).min(left);
        left -= taken;
        st.ties_pruned += taken;
        let input = TensorRef {
            dtype: dt,
            shape: &[],
            data: &t.data[r.start * es..r.end * es],
        };
        let output = TensorRef {
            dtype: dt,
            shape: &[],
            data: o,
        };
        st.diff = st
            .diff
            .merge(crate::ops::diff::diff_elements(&input, &output, r.len()));
        Ok(())
    })?;
    Ok((out, st))
}

/// Zeroes exactly round_ties_even(s·n) weights of `t` — or, with
/// `of_remaining`, that fraction of its non-zero weights on top of its
/// zeros — smallest |w| first, ties to the lower index.
pub fn prune_to_sparsity(
    dev: &Device,
    t: &TensorRef,
    s: f64,
    of_remaining: bool,
) -> Result<(Tensor, CutStats)> {
    t.check_float("sparsity prune")?;
    check_sparsity(s)?;
    let n = t.numel() as u64;
    let k = if of_remaining {
        let zeros = super::reduce::tensor_stats(dev, t)?.zeros;
        zeros + count_for(s, n - zeros)
    } else {
        count_for(s, n)
    };
    let cut = find_cut(k, needs_low_level(t.dtype), |lv| key_histogram(dev, t, lv))?;
    apply_cut(dev, t, cut, cut.equal)
}

/// Activation-aware scores (Wanda): one ‖X_j‖₂ per input feature j (column
/// of the `(shape[0], rest)` view). Checked (finite, ≥ 0, one per column) and
/// flushed of subnormals, as the kernels read them.
pub fn check_scores(x: &[f32], row_len: usize) -> Result<Vec<f32>> {
    if x.len() != row_len {
        return Err(Error::input(format!(
            "{} activation norms for rows of {row_len} weights",
            x.len()
        )));
    }
    if let Some((j, v)) = x
        .iter()
        .enumerate()
        .find(|(_, v)| !(v.is_finite() && **v >= 0.0))
    {
        return Err(Error::input(format!(
            "activation norm {j} is {v}: norms must be finite and ≥ 0"
        )));
    }
    Ok(x.iter()
        .map(|v| f32::from_bits(super::flush_subnormal(v.to_bits())))
        .collect())
}

/// The key of an activation-aware score |w|·x (mirrors score_key in
/// select.wgsl): subnormals flushed, one product; a non-finite weight gets
/// the largest key.
#[inline(always)]
pub fn score_key(w: f32, x: f32) -> u32 {
    let a = super::flush_subnormal(w.to_bits() & 0x7fff_ffff);
    if a >= 0x7f80_0000 {
        return 0x7fff_ffff;
    }
    super::flush_subnormal((f32::from_bits(a) * x).to_bits()) & 0x7fff_ffff
}
