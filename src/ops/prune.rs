//! Thresholding: zero weights with |w| < τ, or whole output neurons whose
//! norm is below τ.
//!
//! Rules (the CPU reference below is the specification):
//! - |w| < τ is pruned, |w| == τ is kept; NaN is never pruned (|NaN| < τ is
//!   false). A pruned weight becomes +0. τ must be ≥ 0 and not NaN (+∞
//!   prunes every finite weight).
//! - Neurons are the rows of a tensor seen as `(shape[0], rest)`. A row is
//!   zeroed when its L2 norm √Σw² (computed in f64) or its max |w| is below
//!   τ. A row holding a NaN is never zeroed. A 1-D tensor is an activation
//!   vector: each element is its own neuron, so the rule is elementwise.

use super::codec::{with_codec, Codec};
use super::diff::Diff;
use super::kernels::Kernel;
use super::reduce::{row_figures, row_stats, RowStats};
use super::{
    check_row_len, chunk_diff, chunk_elems, chunk_rows, chunks, cpu_map, gpu_map, params, u32_at,
};
use crate::device::{Chunk, Device, Gpu, StreamLayout};
use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorRef};

/// What a threshold prune did.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PruneStats {
    /// Elements.
    pub numel: u64,
    /// Weights the rule matched (|w| < τ), zeros among them included.
    pub pruned: u64,
    /// Zeros in the output (pruned or already zero).
    pub zeros: u64,
    /// The output against the input, from the same pass.
    pub diff: Diff,
}

impl PruneStats {
    /// Fraction of zeros in the output.
    pub fn sparsity(&self) -> f64 {
        if self.numel == 0 {
            0.0
        } else {
            self.zeros as f64 / self.numel as f64
        }
    }
}

/// How a neuron's magnitude is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NeuronNorm {
    /// Σ |w|
    L1,
    /// √Σ w²
    L2,
    /// max |w|
    Max,
}

/// Rows (output neurons) or columns (input features) of the matrix view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Axis {
    /// Output neurons (dimension 0).
    Rows,
    /// Input features (the rest, flattened).
    Cols,
}

/// What a neuron prune did.
#[derive(Clone, Debug, PartialEq)]
pub struct NeuronPruneStats {
    /// Elements.
    pub numel: u64,
    /// Per neuron (row): whether it was zeroed.
    pub zeroed: Vec<bool>,
    /// Zeros in the output.
    pub zeros: u64,
    /// The output against the input, from the zeroing pass.
    pub diff: Diff,
}

impl NeuronPruneStats {
    /// How many neurons were zeroed.
    pub fn neurons_zeroed(&self) -> usize {
        self.zeroed.iter().filter(|&&z| z).count()
    }
}

fn check_tau(tau: f32) -> Result<u32> {
    if tau.is_nan() || tau < 0.0 {
        return Err(Error::input(format!("threshold τ must be ≥ 0, got {tau}")));
    }
    // -0.0 is 0.0; compare against the magnitude's bits.
    Ok(tau.abs().to_bits())
}

/// w -> 0 where |w| < τ.
pub fn threshold(dev: &Device, t: &TensorRef, tau: f32) -> Result<(Tensor, PruneStats)> {
    t.check_float("threshold prune")?;
    let tau_bits = check_tau(tau)?;
    match dev {
        Device::Cpu => Ok(threshold_cpu(t, tau_bits)),
        Device::Gpu(g) => threshold_gpu(g, t, tau_bits),
    }
}

fn threshold_cpu(t: &TensorRef, tau_bits: u32) -> (Tensor, PruneStats) {
    let (out, [pruned, zeros], diff) = with_codec!(t.dtype, C => cpu_map::<C, C, 2>(t, t.dtype, move |_, raw| {
        let a = C::to_f32(raw).to_bits() & 0x7fff_ffff;
        let cut = a < tau_bits;
        (if cut { 0 } else { raw }, [cut as u64, (cut || a == 0) as u64])
    }));
    let numel = t.numel() as u64;
    (
        out,
        PruneStats {
            numel,
            pruned,
            zeros,
            diff,
        },
    )
}

kernel_params!(ThresholdParams {
    n: u32,
    tau_bits: u32,
    _pad0: u32,
    _pad1: u32,
});

kernel_params!(RowParams {
    n: u32,
    row_len: u32,
    col0: u32,
    by_col: u32,
});

fn threshold_gpu(g: &Gpu, t: &TensorRef, tau_bits: u32) -> Result<(Tensor, PruneStats)> {
    let (out, [pruned, zeros], diff) = gpu_map(
        g,
        Kernel::Threshold,
        (t.dtype.shader_code(), 0),
        &[t],
        t.dtype,
        |n| ThresholdParams {
            n: n as u32,
            tau_bits,
            ..Default::default()
        },
    )?;
    let st = PruneStats {
        numel: t.numel() as u64,
        pruned,
        zeros,
        diff,
    };
    Ok((out, st))
}

/// Zeroes the neurons (rows) whose norm is below τ; a 1-D tensor is
/// thresholded elementwise.
pub fn prune_neurons(
    dev: &Device,
    t: &TensorRef,
    tau: f32,
    norm: NeuronNorm,
) -> Result<(Tensor, NeuronPruneStats)> {
    t.check_float("neuron prune")?;
    let tau_bits = check_tau(tau)?;
    if t.shape.len() <= 1 {
        // Each activation is a neuron of one weight: √(x²) = max|x| = |x|.
        let (out, st) = threshold(dev, t, tau)?;
        let dt = t.dtype;
        let zeroed = (0..t.numel())
            .map(|i| dt.raw_to_f32(dt.read_raw(t.data, i)).to_bits() & 0x7fff_ffff < tau_bits)
            .collect();
        return Ok((
            out,
            NeuronPruneStats {
                numel: st.numel,
                zeroed,
                zeros: st.zeros,
                diff: st.diff,
            },
        ));
    }
    let mask = neuron_mask(dev, t, tau, norm)?;
    let (out, diff) = zero_rows(dev, t, &mask)?;
    Ok((
        out,
        NeuronPruneStats {
            numel: t.numel() as u64,
            zeroed: mask,
            zeros: diff.zeros,
            diff,
        },
    ))
}

/// The reference decision for a row from its figures.
fn row_is_pruned(fig: (f64, f64, u32), tau: f32, tau_bits: u32, norm: NeuronNorm) -> bool {
    match norm {
        NeuronNorm::L1 => fig.1 < tau as f64,
        NeuronNorm::L2 => fig.0.sqrt() < tau as f64,
        NeuronNorm::Max => fig.2 < tau_bits,
    }
}

/// Which rows to zero. Identical on every device: the GPU's approximate
/// sums decide the rows far from τ, the CPU reference the rows too close
/// to call (and any row with a non-finite weight).
pub fn neuron_mask(dev: &Device, t: &TensorRef, tau: f32, norm: NeuronNorm) -> Result<Vec<bool>> {
    let tau_bits = check_tau(tau)?;
    let st = row_stats(dev, t)?;
    // The decision in the measure's own terms: Σw² against τ², Σ|w| against τ.
    let (cut, measure): (f64, fn(&RowStats, usize) -> f64) = match norm {
        NeuronNorm::L2 => ((tau as f64) * (tau as f64), |s, r| s.sumsq[r]),
        NeuronNorm::L1 => (tau as f64, |s, r| s.sumabs[r]),
        NeuronNorm::Max => (0.0, |_, _| 0.0),
    };
    let mut referred = 0usize;
    let mask = (0..st.sumsq.len())
        .map(|r| {
            if norm == NeuronNorm::Max || !st.approximate {
                return row_is_pruned(
                    (st.sumsq[r], st.sumabs[r], st.max_abs_bits[r]),
                    tau,
                    tau_bits,
                    norm,
                );
            }
            let v = measure(&st, r);
            let close = !v.is_finite()
                || st.max_abs_bits[r] >= 0x7f80_0000
                || (v - cut).abs() <= st.bound(v);
            if close {
                referred += 1;
                row_is_pruned(row_figures(t, r), tau, tau_bits, norm)
            } else {
                v < cut
            }
        })
        .collect();
    if referred > 0 {
        log::debug!("neuron mask: {referred} rows within the GPU's error of τ decided on the CPU");
    }
    Ok(mask)
}

/// The lines (rows or columns) to zero so that exactly round_ties_even(s·n)
/// of the n lines go, those with the smallest norm first, ties to the lower
/// index (PyTorch ln_structured's count, with a deterministic choice).
///
/// Identical on every device: each line's GPU norm comes with an error
/// bound; lines whose interval is certainly inside or outside the k
/// smallest are decided by it, and the rest by their exact (CPU reference)
/// values, ranked by (value, index).
pub fn line_mask(
    dev: &Device,
    t: &TensorRef,
    axis: Axis,
    s: f64,
    norm: NeuronNorm,
) -> Result<Vec<bool>> {
    t.check_float("structured prune")?;
    super::select::check_sparsity(s)?;
    if t.shape.len() < 2 {
        return Err(Error::input(format!(
            "structured pruning needs a tensor of rank ≥ 2, got shape {:?}",
            t.shape
        )));
    }
    let st = match axis {
        Axis::Rows => row_stats(dev, t)?,
        Axis::Cols => super::reduce::col_stats(dev, t)?,
    };
    let n = st.sumsq.len();
    let k = super::select::count_for(s, n as u64) as usize;
    // The ranked quantity: Σw² for L2 (same order as its root), Σ|w|, or
    // the bits of max |w| (exact everywhere).
    let value = |fig: (f64, f64, u32)| match norm {
        NeuronNorm::L2 => fig.0,
        NeuronNorm::L1 => fig.1,
        NeuronNorm::Max => fig.2 as f64,
    };
    let exact = |i: usize| {
        value(match axis {
            Axis::Rows => row_figures(t, i),
            Axis::Cols => super::reduce::col_figures(t, i),
        })
    };
    let approx = st.approximate && norm != NeuronNorm::Max;
    let bounds: Vec<(f64, f64)> = (0..n)
        .map(|i| {
            let v = value((st.sumsq[i], st.sumabs[i], st.max_abs_bits[i]));
            if !approx {
                (v, v)
            } else if !v.is_finite() || st.max_abs_bits[i] >= 0x7f80_0000 {
                (f64::NEG_INFINITY, f64::INFINITY)
            } else {
                let b = st.bound(v);
                (v - b, v + b)
            }
        })
        .collect();
    Ok(smallest_k(&bounds, k, approx, exact))
}

/// Which k of n values are the smallest by (exact value, index), where each
/// value is known as an interval [lo, hi] (a point when `approx` is false).
/// Values certainly inside or outside the k smallest are decided by their
/// interval; the rest by `exact(i)`, so the answer equals the reference
/// whatever the intervals' source.
pub(crate) fn smallest_k(
    bounds: &[(f64, f64)],
    k: usize,
    approx: bool,
    exact: impl Fn(usize) -> f64,
) -> Vec<bool> {
    let n = bounds.len();
    let mut lowers: Vec<f64> = bounds.iter().map(|b| b.0).collect();
    let mut uppers: Vec<f64> = bounds.iter().map(|b| b.1).collect();
    lowers.sort_by(f64::total_cmp);
    uppers.sort_by(f64::total_cmp);
    let mut mask = vec![false; n];
    let mut open: Vec<(f64, usize)> = Vec::new();
    let mut certain = 0;
    for (i, &(lo, hi)) in bounds.iter().enumerate() {
        // Values whose lower end is ≤ my upper end: all that may rank at or
        // below me (myself included). Values wholly below me: certainly smaller.
        let may_be_below = lowers.partition_point(|&x| x <= hi);
        let surely_below = uppers.partition_point(|&x| x < lo);
        if approx && may_be_below <= k {
            mask[i] = true;
            certain += 1;
        } else if approx && surely_below >= k {
            // certainly not among them
        } else {
            open.push((if approx { exact(i) } else { lo }, i));
        }
    }
    open.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    for &(_, i) in open.iter().take(k.saturating_sub(certain)) {
        mask[i] = true;
    }
    mask
}

/// Zeroes exactly round_ties_even(s·n) of the n rows or columns, smallest
/// norm first (see `line_mask`). Returns the result, the mask and the
/// result's figures against the input (its zeros among them).
pub fn prune_lines(
    dev: &Device,
    t: &TensorRef,
    axis: Axis,
    s: f64,
    norm: NeuronNorm,
) -> Result<(Tensor, Vec<bool>, Diff)> {
    let mask = line_mask(dev, t, axis, s, norm)?;
    let (out, diff) = match axis {
        Axis::Rows => zero_rows(dev, t, &mask)?,
        Axis::Cols => zero_cols(dev, t, &mask)?,
    };
    Ok((out, mask, diff))
}

/// Zeroes the columns named by `mask` (one entry per column of the matrix
/// view). Returns the result and its figures against the input (its zeros
/// among them), from the same pass.
pub fn zero_cols(dev: &Device, t: &TensorRef, mask: &[bool]) -> Result<(Tensor, Diff)> {
    zero_lines(dev, t, mask, Axis::Cols)
}

/// Zeroes the rows named by `mask` (one entry per row of the matrix view).
/// Returns the result and its figures against the input (its zeros among
/// them), from the same pass.
pub fn zero_rows(dev: &Device, t: &TensorRef, mask: &[bool]) -> Result<(Tensor, Diff)> {
    zero_lines(dev, t, mask, Axis::Rows)
}

fn zero_lines(dev: &Device, t: &TensorRef, mask: &[bool], axis: Axis) -> Result<(Tensor, Diff)> {
    t.check_float("zero rows or columns")?;
    let (rows, row_len) = t.rows();
    let lines = if axis == Axis::Rows { rows } else { row_len };
    if mask.len() != lines {
        return Err(Error::input(format!(
            "mask has {} entries for {lines} {}",
            mask.len(),
            if axis == Axis::Rows {
                "rows"
            } else {
                "columns"
            }
        )));
    }
    let line_of = |i: usize| {
        if axis == Axis::Rows {
            i / row_len
        } else {
            i % row_len
        }
    };
    match dev {
        Device::Cpu => {
            let (out, [], diff) = with_codec!(t.dtype, C => cpu_map::<C, C, 0>(t, t.dtype, |i, raw| {
                (if mask[line_of(i)] { 0 } else { raw }, [])
            }));
            Ok((out, diff))
        }
        Device::Gpu(g) => zero_lines_gpu(g, t, mask, axis),
    }
}

/// One bit per entry, little-endian within each word.
fn pack_bits(mask: &[bool]) -> Vec<u32> {
    let mut w = vec![0u32; mask.len().div_ceil(32).max(1)];
    for (i, &m) in mask.iter().enumerate() {
        w[i / 32] |= (m as u32) << (i % 32);
    }
    w
}

fn zero_lines_gpu(g: &Gpu, t: &TensorRef, mask: &[bool], axis: Axis) -> Result<(Tensor, Diff)> {
    let n = t.numel();
    let es = t.dtype.size();
    let (_, row_len) = t.rows();
    let mut out = Tensor::zeros(t.dtype, t.shape);
    let mut diff = Diff::default();
    if n == 0 {
        return Ok((out, diff));
    }
    check_row_len(row_len)?;
    let by_col = axis == Axis::Cols;
    // One bit per line. Rows: the rows a chunk touches, packed per chunk.
    // Columns: all of them, packed once.
    let col_bits = if by_col { pack_bits(mask) } else { Vec::new() };
    let (ce, mask_words) = if by_col {
        let ce = chunk_elems(g, n, es as f64, (col_bits.len() * 4) as u64)?;
        (ce, col_bits.len())
    } else {
        let ce = chunk_elems(g, n, es as f64, 16)?;
        (ce, (ce / row_len + 2).div_ceil(32))
    };
    let layout = StreamLayout {
        inputs: vec![(ce * es) as u64, (mask_words * 4) as u64],
        outputs: vec![((ce * es) as u64, false), (4, true)],
    };
    let pipeline = g.ctx.pipeline(Kernel::ZeroRows, t.dtype.shader_code(), 0)?;
    let ranges: Vec<_> = chunks(n, ce).collect();
    let jobs = ranges.iter().map(|r| {
        let cr = chunk_rows(r, row_len);
        let lines: crate::device::Input = if by_col {
            bytemuck::cast_slice(&col_bits[..]).into()
        } else {
            bytemuck::cast_slice(&pack_bits(&mask[cr.first_row..cr.first_row + cr.rows]))
                .to_vec()
                .into()
        };
        Chunk {
            params: params(&RowParams {
                n: r.len() as u32,
                row_len: row_len as u32,
                col0: cr.col0 as u32,
                by_col: by_col as u32,
            }),
            inputs: vec![(&t.data[r.start * es..r.end * es]).into(), lines],
            read: vec![(r.len() * es) as u64, 4],
            workgroups: g.ctx.workgroups_for((r.len() * es).div_ceil(4) as u64),
        }
    });
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let r = &ranges[k];
        let chunk = &mut out.data[r.start * es..r.end * es];
        chunk.copy_from_slice(outs[0]);
        // The figures on the host while the device zeroes the next chunk;
        // the kernel's own count of zeros must agree with them.
        let d = chunk_diff(&[t], r.clone(), t.dtype, chunk);
        debug_assert_eq!(d.zeros, u32_at(outs[1], 0) as u64);
        diff = diff.merge(d);
        Ok(())
    })?;
    Ok((out, diff))
}
