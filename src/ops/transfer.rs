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
use super::diff::Diff;
use super::kernels::Kernel;
use super::{cpu_map, finish_special, finite_param, gpu_map, same_shape, term_special};
use crate::device::{Device, Gpu};
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
    transfer_diff(dev, w, delta, lambda).map(|(t, _)| t)
}

/// `transfer`, with the result's `Diff` against w (and Δ's non-finite
/// values) from the same pass.
pub fn transfer_diff(
    dev: &Device,
    w: &TensorRef,
    delta: Delta,
    lambda: f32,
) -> Result<(Tensor, Diff)> {
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

fn offset_scalar_cpu(w: &TensorRef, c: f32) -> (Tensor, Diff) {
    let (out, [], d) = with_codec!(w.dtype, C => cpu_map::<C, C, 0>(w, w.dtype, move |_, raw| {
        let xb = C::to_f32(raw).to_bits();
        let st = term_special(1.0, xb);
        let x = if st != 0 { 0.0 } else { f32::from_bits(xb) };
        (C::from_f32(f32::from_bits(finish_special(st, x + c))), [])
    }));
    (out, d)
}

fn offset_tensor_cpu(w: &TensorRef, d: &TensorRef, lambda: f32) -> (Tensor, Diff) {
    let (out, [bad_delta], mut diff) = with_codec!(w.dtype, C => with_codec!(d.dtype, D => cpu_map::<C, C, 1>(w, w.dtype, move |i, raw| {
        let xb = C::to_f32(raw).to_bits();
        let db = D::to_f32(D::read(d.data, i)).to_bits();
        let (sx, sd) = (term_special(1.0, xb), term_special(lambda, db));
        let x = if sx != 0 { 0.0 } else { f32::from_bits(xb) };
        let dv = if sd != 0 { 0.0 } else { f32::from_bits(db) };
        let bad = (db & 0x7fff_ffff >= 0x7f80_0000) as u64;
        (C::from_f32(f32::from_bits(finish_special(sx | sd, x + lambda * dv))), [bad])
    })));
    diff.nonfinite_other = bad_delta;
    (out, diff)
}

kernel_params!(ScalarParams {
    n: u32,
    c: f32,
    _pad0: u32,
    _pad1: u32,
});

kernel_params!(TensorParams {
    n: u32,
    lambda: f32,
    _pad0: u32,
    _pad1: u32,
});

/// `offset_scalar` (delta None, `v` = c) or `offset_tensor` (`v` = λ).
fn offset_gpu(g: &Gpu, w: &TensorRef, delta: Option<&TensorRef>, v: f32) -> Result<(Tensor, Diff)> {
    let code = w.dtype.shader_code();
    let (out, [], d) = match delta {
        None => gpu_map(g, Kernel::OffsetScalar, (code, 0), &[w], w.dtype, |n| {
            ScalarParams {
                n: n as u32,
                c: v,
                ..Default::default()
            }
        })?,
        Some(d) => {
            let codes = (code, d.dtype.shader_code());
            gpu_map(g, Kernel::OffsetTensor, codes, &[w, d], w.dtype, |n| {
                TensorParams {
                    n: n as u32,
                    lambda: v,
                    ..Default::default()
                }
            })?
        }
    };
    Ok((out, d))
}
