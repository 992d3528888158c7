//! Offsets: w_new = w + λ·Δ, with Δ a scalar or a tensor of the same shape.
//!
//! Rules (the CPU reference below is the specification):
//! - f32 arithmetic, left to right: w + (λ·Δ); for a scalar, c = λ·Δ is
//!   rounded to f32 once on the host and the kernel adds w + c (one
//!   correctly rounded addition: identical on every adapter).
//! - The result is rounded to w's dtype; Δ may be any float dtype.
//! - λ and a scalar Δ must be finite. Infinite weights follow IEEE (inf +
//!   finite = inf, inf - inf = NaN, λ = 0 times inf = NaN); every NaN result
//!   is the canonical quiet NaN.

use super::codec::{with_codec, Codec};
use super::{
    chunk_elems, chunks, cpu_map, finish_special, finite_param, params, same_shape, term_special,
};
use crate::device::{Chunk, Device, Gpu, Kernel, StreamLayout};
use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorRef};

/// The offset added to every weight.
#[derive(Clone, Copy, Debug)]
pub enum Delta<'a> {
    /// The same number for every weight.
    Scalar(f32),
    /// A tensor of the weights' shape (any float dtype).
    Tensor(TensorRef<'a>),
}

/// w + λ·Δ.
pub fn transfer(dev: &Device, w: &TensorRef, delta: Delta, lambda: f32) -> Result<Tensor> {
    w.check_float("transfer")?;
    finite_param("λ", lambda)?;
    match delta {
        Delta::Scalar(x) => {
            finite_param("offset", x)?;
            let c = lambda * x;
            if !c.is_finite() {
                return Err(Error::input(format!(
                    "λ·offset = {lambda}·{x} overflows f32"
                )));
            }
            match dev {
                Device::Cpu => Ok(offset_scalar_cpu(w, c)),
                Device::Gpu(g) => offset_gpu(g, w, None, c),
            }
        }
        Delta::Tensor(d) => {
            d.check_float("transfer delta")?;
            same_shape("transfer delta", d.shape, w.shape)?;
            match dev {
                Device::Cpu => Ok(offset_tensor_cpu(w, &d, lambda)),
                Device::Gpu(g) => offset_gpu(g, w, Some(&d), lambda),
            }
        }
    }
}

fn offset_scalar_cpu(w: &TensorRef, c: f32) -> Tensor {
    with_codec!(w.dtype, C => cpu_map::<C, C, 0>(w, w.dtype, |_, raw| {
        let xb = C::to_f32(raw).to_bits();
        let st = term_special(1.0, xb);
        let x = if st != 0 { 0.0 } else { f32::from_bits(xb) };
        (C::from_f32(f32::from_bits(finish_special(st, x + c))), [])
    }))
    .0
}

fn offset_tensor_cpu(w: &TensorRef, d: &TensorRef, lambda: f32) -> Tensor {
    with_codec!(w.dtype, C => with_codec!(d.dtype, D => cpu_map::<C, C, 0>(w, w.dtype, |i, raw| {
        let xb = C::to_f32(raw).to_bits();
        let db = D::to_f32(D::read(d.data, i)).to_bits();
        let (sx, sd) = (term_special(1.0, xb), term_special(lambda, db));
        let x = if sx != 0 { 0.0 } else { f32::from_bits(xb) };
        let dv = if sd != 0 { 0.0 } else { f32::from_bits(db) };
        (C::from_f32(f32::from_bits(finish_special(sx | sd, x + lambda * dv))), [])
    })))
    .0
}

/// `offset_scalar` (delta None, `v` = c) or `offset_tensor` (`v` = λ).
fn offset_gpu(g: &Gpu, w: &TensorRef, delta: Option<&TensorRef>, v: f32) -> Result<Tensor> {
    let n = w.numel();
    let es = w.dtype.size();
    let ds = delta.map_or(0, |d| d.dtype.size());
    let mut out = Tensor::zeros(w.dtype, w.shape);
    let ce = chunk_elems(g, n, es.max(ds) as f64, 0)?;
    let mut inputs = vec![(ce * es) as u64];
    if delta.is_some() {
        inputs.push((ce * ds) as u64);
    }
    let layout = StreamLayout {
        inputs,
        outputs: vec![((ce * es) as u64, false)],
    };
    let pipeline = match delta {
        None => g
            .ctx
            .pipeline(Kernel::OffsetScalar, w.dtype.shader_code(), 0)?,
        Some(d) => g.ctx.pipeline(
            Kernel::OffsetTensor,
            w.dtype.shader_code(),
            d.dtype.shader_code(),
        )?,
    };
    let ranges: Vec<_> = chunks(n, ce).collect();
    let jobs = ranges.iter().map(|r| {
        let mut inputs = vec![(&w.data[r.start * es..r.end * es]).into()];
        if let Some(d) = delta {
            inputs.push((&d.data[r.start * ds..r.end * ds]).into());
        }
        Chunk {
            params: params(&[r.len() as u32, v.to_bits(), 0, 0]),
            inputs,
            read: vec![(r.len() * es) as u64],
            workgroups: g.ctx.workgroups_for((r.len() * es).div_ceil(4) as u64),
        }
    });
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let r = &ranges[k];
        out.data[r.start * es..r.end * es].copy_from_slice(outs[0]);
        Ok(())
    })?;
    Ok(out)
}
