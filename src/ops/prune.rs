//! Thresholding: zero weights with |w| < τ, or whole output neurons whose
//! norm is below τ.
//!
//! Rules (the CPU reference below is the specification):
//! - |w| < τ is pruned, |w| == τ is kept; NaN is never pruned (|NaN| < τ is
//!   false). A pruned weight becomes +0. τ must be ≥ 0 and not NaN (+∞
//!   prunes every finite weight).
//! - Neurons are the rows of a tensor seen as (shape[0], rest). A row is
//!   zeroed when its L2 norm √Σw² (computed in f64) or its max |w| is below
//!   τ. A row holding a NaN is never zeroed. A 1-D tensor is an activation
//!   vector: each element is its own neuron, so the rule is elementwise.

use super::codec::{with_codec, Codec};
use super::reduce::{row_figures, row_stats};
use super::{
    check_row_len, chunk_elems, chunk_rows, chunks, cpu_map, params, row_vector_bytes_per_elem,
    u32_at,
};
use crate::device::{Chunk, Device, Gpu, Kernel, StreamLayout};
use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorRef};

/// What a threshold prune did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PruneStats {
    pub numel: u64,
    /// Weights the rule matched (|w| < τ), zeros among them included.
    pub pruned: u64,
    /// Zeros in the output (pruned or already zero).
    pub zeros: u64,
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
    /// √Σ w²
    L2,
    /// max |w|
    Max,
}

/// What a neuron prune did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NeuronPruneStats {
    pub numel: u64,
    /// Per neuron (row): whether it was zeroed.
    pub zeroed: Vec<bool>,
    pub zeros: u64,
}

impl NeuronPruneStats {
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
    let (out, [pruned, zeros]) = with_codec!(t.dtype, C => cpu_map::<C, C, 2>(t, t.dtype, |_, raw| {
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
        },
    )
}

fn threshold_gpu(g: &Gpu, t: &TensorRef, tau_bits: u32) -> Result<(Tensor, PruneStats)> {
    let n = t.numel();
    let es = t.dtype.size();
    let mut out = Tensor::zeros(t.dtype, t.shape);
    let mut st = PruneStats {
        numel: n as u64,
        pruned: 0,
        zeros: 0,
    };
    let ce = chunk_elems(g, n, es as f64, 0)?;
    let layout = StreamLayout {
        inputs: vec![(ce * es) as u64],
        outputs: vec![((ce * es) as u64, false), (8, true)],
    };
    let pipeline = g
        .ctx
        .pipeline(Kernel::Threshold, t.dtype.shader_code(), 0)?;
    let ranges: Vec<_> = chunks(n, ce).collect();
    let jobs = ranges.iter().map(|r| Chunk {
        params: params(&[r.len() as u32, tau_bits, 0, 0]),
        inputs: vec![(&t.data[r.start * es..r.end * es]).into()],
        read: vec![(r.len() * es) as u64, 8],
        workgroups: g.ctx.workgroups_for((r.len() * es).div_ceil(4) as u64),
    });
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let r = &ranges[k];
        out.data[r.start * es..r.end * es].copy_from_slice(outs[0]);
        st.pruned += u32_at(outs[1], 0) as u64;
        st.zeros += u32_at(outs[1], 1) as u64;
        Ok(())
    })?;
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
            },
        ));
    }
    let mask = neuron_mask(dev, t, tau, norm)?;
    let (out, zeros) = zero_rows(dev, t, &mask)?;
    Ok((
        out,
        NeuronPruneStats {
            numel: t.numel() as u64,
            zeroed: mask,
            zeros,
        },
    ))
}

/// The reference decision for a row from its figures.
fn row_is_pruned(sumsq: f64, max_bits: u32, tau: f32, tau_bits: u32, norm: NeuronNorm) -> bool {
    match norm {
        NeuronNorm::L2 => sumsq.sqrt() < tau as f64,
        NeuronNorm::Max => max_bits < tau_bits,
    }
}

/// Which rows to zero. Identical on every device: the GPU's approximate
/// sums decide the rows far from τ, the CPU reference the rows too close
/// to call (and any row with a non-finite weight).
pub fn neuron_mask(dev: &Device, t: &TensorRef, tau: f32, norm: NeuronNorm) -> Result<Vec<bool>> {
    let tau_bits = check_tau(tau)?;
    let st = row_stats(dev, t)?;
    let t2 = (tau as f64) * (tau as f64);
    let mut referred = 0usize;
    let mask = (0..st.sumsq.len())
        .map(|r| {
            let (s, mx) = (st.sumsq[r], st.max_abs_bits[r]);
            let close = norm == NeuronNorm::L2
                && st.approximate
                && (!s.is_finite() || mx >= 0x7f80_0000 || (s - t2).abs() <= st.sumsq_bound(r));
            if close {
                referred += 1;
                let (s, _, mx) = row_figures(t, r);
                row_is_pruned(s, mx, tau, tau_bits, norm)
            } else if st.approximate && norm == NeuronNorm::L2 {
                s < t2
            } else {
                row_is_pruned(s, mx, tau, tau_bits, norm)
            }
        })
        .collect();
    if referred > 0 {
        log::debug!("neuron mask: {referred} rows within the GPU's error of τ decided on the CPU");
    }
    Ok(mask)
}

/// Zeroes the rows named by `mask` (one entry per row of the matrix view).
/// Returns the result and its count of zeros.
pub fn zero_rows(dev: &Device, t: &TensorRef, mask: &[bool]) -> Result<(Tensor, u64)> {
    t.check_float("zero rows")?;
    let (rows, row_len) = t.rows();
    if mask.len() != rows {
        return Err(Error::input(format!(
            "row mask has {} entries for {rows} rows",
            mask.len()
        )));
    }
    match dev {
        Device::Cpu => {
            let (out, [zeros]) = with_codec!(t.dtype, C => cpu_map::<C, C, 1>(t, t.dtype, |i, raw| {
                let kept = if mask[i / row_len] { 0 } else { raw };
                (kept, [(C::to_f32(kept).to_bits() & 0x7fff_ffff == 0) as u64])
            }));
            Ok((out, zeros))
        }
        Device::Gpu(g) => zero_rows_gpu(g, t, mask),
    }
}

fn zero_rows_gpu(g: &Gpu, t: &TensorRef, mask: &[bool]) -> Result<(Tensor, u64)> {
    let n = t.numel();
    let es = t.dtype.size();
    let (_, row_len) = t.rows();
    let mut out = Tensor::zeros(t.dtype, t.shape);
    let mut zeros = 0u64;
    if n == 0 {
        return Ok((out, 0));
    }
    check_row_len(row_len)?;
    let words: Vec<u32> = mask.iter().map(|&m| m as u32).collect();
    let ce = chunk_elems(g, n, (es as f64).max(row_vector_bytes_per_elem(row_len)), 8)?;
    let layout = StreamLayout {
        inputs: vec![(ce * es) as u64, ((ce / row_len + 2) * 4) as u64],
        outputs: vec![((ce * es) as u64, false), (4, true)],
    };
    let pipeline = g.ctx.pipeline(Kernel::ZeroRows, t.dtype.shader_code(), 0)?;
    let ranges: Vec<_> = chunks(n, ce).collect();
    let jobs = ranges.iter().map(|r| {
        let cr = chunk_rows(r, row_len);
        Chunk {
            params: params(&[r.len() as u32, row_len as u32, cr.col0 as u32, 0]),
            inputs: vec![
                (&t.data[r.start * es..r.end * es]).into(),
                bytemuck::cast_slice(&words[cr.first_row..cr.first_row + cr.rows]).into(),
            ],
            read: vec![(r.len() * es) as u64, 4],
            workgroups: g.ctx.workgroups_for((r.len() * es).div_ceil(4) as u64),
        }
    });
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let r = &ranges[k];
        out.data[r.start * es..r.end * es].copy_from_slice(outs[0]);
        zeros += u32_at(outs[1], 0) as u64;
        Ok(())
    })?;
    Ok((out, zeros))
}
