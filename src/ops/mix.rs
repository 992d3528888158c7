//! Weighted sums: Σ pᵢ·wᵢ over 2 to 16 tensors of one shape (model merging),
//! and Σᵢ pᵢ·`W[i, :]` over the rows of one matrix.
//!
//! Rules (the CPU reference below is the specification):
//! - f32 arithmetic, left to right, starting from the first term:
//!   ((p₀w₀ + p₁w₁) + p₂w₂) + ... ; the result is rounded to the inputs'
//!   dtype (every input has the same dtype and shape).
//! - Weights must be finite; their count must match. Infinities and NaN as
//!   in transfer (IEEE, canonical NaN).
//! - A GPU may fuse multiply and add and, for rows, adds partial sums of row
//!   tiles: results agree with the reference within a few ulps of Σ|pᵢwᵢ|
//!   (the tests state the bound).

use super::codec::{with_codec, Codec};
use super::diff::Diff;
use super::kernels::Kernel;
use super::{
    chunk_diff, chunk_elems, chunks, f32_at, finish_special, finite_param, matrix_tiles, params,
    same_shape, slots, term_special, tile_input, u32_at, Tile, CPU_BLOCK,
};
use crate::device::{Chunk, Device, Gpu, StreamLayout};
use crate::error::{Error, Result};
use crate::tensor::{Tensor, TensorRef};
use rayon::prelude::*;

/// Most models `mix` combines in one call.
pub const MAX_MIX_INPUTS: usize = 16;

kernel_params!(MixParams {
    n: u32,
    k: u32,
    stride: u32,
    _pad0: u32,
});

kernel_params!(RowMixParams {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
});

/// Σ pᵢ·wᵢ.
pub fn mix(dev: &Device, inputs: &[TensorRef], weights: &[f32]) -> Result<Tensor> {
    mix_diff(dev, inputs, weights).map(|(t, _)| t)
}

/// `mix`, with the result's `Diff` against the first input (and the other
/// inputs' non-finite values) from the same pass.
pub fn mix_diff(dev: &Device, inputs: &[TensorRef], weights: &[f32]) -> Result<(Tensor, Diff)> {
    if !(2..=MAX_MIX_INPUTS).contains(&inputs.len()) {
        return Err(Error::input(format!(
            "mix takes 2 to {MAX_MIX_INPUTS} tensors, got {}",
            inputs.len()
        )));
    }
    if weights.len() != inputs.len() {
        return Err(Error::input(format!(
            "{} mixing weights for {} tensors",
            weights.len(),
            inputs.len()
        )));
    }
    for (i, &p) in weights.iter().enumerate() {
        finite_param(&format!("mixing weight {i}"), p)?;
    }
    let first = &inputs[0];
    first.check_float("mix")?;
    for (i, t) in inputs.iter().enumerate().skip(1) {
        t.check_float(&format!("mix input {i}"))?;
        same_shape(&format!("mix input {i}"), t.shape, first.shape)?;
        if t.dtype != first.dtype {
            return Err(Error::input(format!(
                "mix input {i} is {}, input 0 is {}",
                t.dtype, first.dtype
            )));
        }
    }
    match dev {
        Device::Cpu => Ok(mix_cpu(inputs, weights)),
        Device::Gpu(g) => mix_gpu(g, inputs, weights),
    }
}

/// The reference: per element, terms left to right from the first. Inputs
/// are the outer loop over a block of f32 accumulators, which keeps that
/// order per element and lets each pass vectorize.
fn mix_cpu(inputs: &[TensorRef], weights: &[f32]) -> (Tensor, Diff) {
    let dt = inputs[0].dtype;
    let mut out = Tensor::for_overwrite(dt, inputs[0].shape);
    let parts: Vec<Diff> = with_codec!(dt, C => out.data
    .par_chunks_mut(CPU_BLOCK * C::SIZE)
    .enumerate()
    .map(|(b, ob)| fast!({
        let start = b * CPU_BLOCK;
        let len = ob.len() / C::SIZE;
        let mut acc = vec![0f32; len];
        let mut state = vec![0u32; len];
        let mut d = Diff::default();
        for (i, (t, &p)) in inputs.iter().zip(weights).enumerate() {
            for j in 0..len {
                let xb = C::to_f32(C::read(t.data, start + j)).to_bits();
                let s = term_special(p, xb);
                state[j] |= s;
                let term = p * if s != 0 { 0.0 } else { f32::from_bits(xb) };
                acc[j] = if i == 0 { term } else { acc[j] + term };
                if i > 0 {
                    d.other(f32::from_bits(xb));
                }
            }
        }
        for j in 0..len {
            C::write(ob, j, C::from_f32(f32::from_bits(finish_special(state[j], acc[j]))));
        }
        d.add_block::<C, C>(&inputs[0].data[start * C::SIZE..(start + len) * C::SIZE], ob);
        d
    }))
    .collect());
    (out, Diff::sum(parts))
}

fn mix_gpu(g: &Gpu, inputs: &[TensorRef], weights: &[f32]) -> Result<(Tensor, Diff)> {
    let dt = inputs[0].dtype;
    let es = dt.size();
    let k = inputs.len();
    let n = inputs[0].numel();
    let mut out = Tensor::zeros(dt, inputs[0].shape);
    // All k inputs share one binding, each in a slot of `ce` elements.
    let ce = chunk_elems(g, n, (k * es) as f64, 0)?;
    let stride_words = ce * es / 4;
    let layout = StreamLayout {
        inputs: vec![(k * ce * es) as u64, (k * 4) as u64],
        outputs: vec![((ce * es) as u64, false)],
    };
    let pipeline = g.ctx.pipeline(Kernel::Mix, dt.shader_code(), 0)?;
    let ranges: Vec<_> = chunks(n, ce).collect();
    let jobs = ranges.iter().map(|r| Chunk {
        params: params(&MixParams {
            n: r.len() as u32,
            k: k as u32,
            stride: stride_words as u32,
            ..Default::default()
        }),
        inputs: vec![
            slots(inputs, r.clone(), ce),
            bytemuck::cast_slice(weights).into(),
        ],
        read: vec![(r.len() * es) as u64],
        workgroups: g.ctx.workgroups_for((r.len() * es).div_ceil(4) as u64),
    });
    let refs: Vec<&TensorRef> = inputs.iter().collect();
    let mut d = Diff::default();
    g.ctx.stream(&pipeline, &layout, jobs, |c, outs| {
        let r = &ranges[c];
        let chunk = &mut out.data[r.start * es..r.end * es];
        chunk.copy_from_slice(outs[0]);
        d = d.merge(chunk_diff(&refs, r.clone(), dt, chunk));
        Ok(())
    })?;
    Ok((out, d))
}

/// Σᵢ pᵢ·`W[i, :]` over the rows of a tensor seen as `(shape[0], rest)`; the
/// result has shape `shape[1..]`, in W's dtype.
pub fn mix_rows(dev: &Device, t: &TensorRef, weights: &[f32]) -> Result<Tensor> {
    t.check_float("row mix")?;
    if t.shape.len() < 2 {
        return Err(Error::input(format!(
            "row mix needs a tensor of rank ≥ 2, got shape {:?}",
            t.shape
        )));
    }
    let (rows, cols) = t.rows();
    if weights.len() != rows {
        return Err(Error::input(format!(
            "{} mixing weights for {rows} rows",
            weights.len()
        )));
    }
    for (i, &p) in weights.iter().enumerate() {
        finite_param(&format!("row weight {i}"), p)?;
    }
    let (acc, state) = match dev {
        Device::Cpu => mix_rows_cpu(t, weights),
        Device::Gpu(g) => mix_rows_gpu(g, t, weights)?,
    };
    let dt = t.dtype;
    let mut out = Tensor::zeros(dt, &t.shape[1..]);
    for c in 0..cols {
        let r = finish_special(state[c], acc[c]);
        dt.write_raw(&mut out.data, c, dt.f32_to_raw(f32::from_bits(r)));
    }
    Ok(out)
}

/// Per column: the sum of the finite terms, and the special state.
fn mix_rows_cpu(t: &TensorRef, weights: &[f32]) -> (Vec<f32>, Vec<u32>) {
    let (_, cols) = t.rows();
    with_codec!(t.dtype, C => (0..cols)
        .into_par_iter()
        .map(|c| {
            let mut st = 0;
            let mut acc = 0f32;
            for (i, &p) in weights.iter().enumerate() {
                let xb = C::to_f32(C::read(t.data, i * cols + c)).to_bits();
                let s = term_special(p, xb);
                st |= s;
                let term = p * if s != 0 { 0.0 } else { f32::from_bits(xb) };
                acc = if i == 0 { term } else { acc + term };
            }
            (acc, st)
        })
        .unzip())
}

/// Tiles of (rows × columns) gathered into one binding each; the host adds
/// the tiles' per-column partial sums in row order.
fn mix_rows_gpu(g: &Gpu, t: &TensorRef, weights: &[f32]) -> Result<(Vec<f32>, Vec<u32>)> {
    let (rows, cols) = t.rows();
    let dt = t.dtype;
    let es = dt.size();
    let mut acc = vec![0f32; cols];
    let mut state = vec![0u32; cols];
    if rows == 0 || cols == 0 {
        return Ok((acc, state));
    }
    let ce = chunk_elems(g, rows * cols, es as f64, 0)?;
    let ((tile_rows, tile_cols), tiles) = matrix_tiles(rows, cols, ce);
    let layout = StreamLayout {
        inputs: vec![(tile_rows * tile_cols * es) as u64, (tile_rows * 4) as u64],
        outputs: vec![
            ((tile_cols * 4) as u64, false),
            ((tile_cols * 4) as u64, false),
        ],
    };
    let pipeline = g.ctx.pipeline(Kernel::MixRows, dt.shader_code(), 0)?;
    let jobs = tiles.iter().map(|&tile| {
        let w = tile.c1 - tile.c0;
        Chunk {
            params: params(&RowMixParams {
                rows: (tile.r1 - tile.r0) as u32,
                cols: w as u32,
                ..Default::default()
            }),
            inputs: vec![
                tile_input(t, tile),
                bytemuck::cast_slice(&weights[tile.r0..tile.r1]).into(),
            ],
            read: vec![(w * 4) as u64, (w * 4) as u64],
            workgroups: g.ctx.workgroups_for(w as u64),
        }
    });
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let Tile { r0, c0, c1, .. } = tiles[k];
        for c in c0..c1 {
            let partial = f32_at(outs[0], c - c0);
            acc[c] = if r0 == 0 { partial } else { acc[c] + partial };
            state[c] |= u32_at(outs[1], c - c0);
        }
        Ok(())
    })?;
    Ok((acc, state))
}
