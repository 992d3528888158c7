//! Per-row exact sparsity: in each row, the round(S·length) smallest |w|
//! (or |w|·‖X_j‖₂, Wanda) become zero.

use super::{check_scores, check_sparsity, count_for, key, score_key};
use crate::device::{Chunk, Device, Gpu, StreamLayout};
use crate::error::{Error, Result};
use crate::ops::codec::{with_codec, Codec};
use crate::ops::diff::Diff;
use crate::ops::kernels::Kernel;
use crate::ops::{chunk_diff, chunk_elems, params, u32_at, CPU_BLOCK};
use crate::tensor::{Tensor, TensorRef};
use rayon::prelude::*;

kernel_params!(RowCutParams {
    n: u32,
    row_len: u32,
    k: u32,
    use_scores: u32,
});

kernel_params!(RowApplyParams {
    n: u32,
    row_len: u32,
    use_scores: u32,
    _pad0: u32,
});

/// Zeroes, in each row (of the `(shape[0], rest)` view), exactly
/// round_ties_even(s·row length) weights: the smallest |w| — or, with
/// `scores`, the smallest |w|·x (Wanda) — ties to the lower index. Returns
/// the result and its figures against the input (its zeros among them),
/// from the same pass.
pub fn prune_rows_to_sparsity(
    dev: &Device,
    t: &TensorRef,
    s: f64,
    scores: Option<&[f32]>,
) -> Result<(Tensor, Diff)> {
    t.check_float("per-row sparsity prune")?;
    check_sparsity(s)?;
    let (_, row_len) = t.rows();
    let scores = scores.map(|x| check_scores(x, row_len)).transpose()?;
    let k = count_for(s, row_len as u64) as usize;
    match dev {
        Device::Cpu => Ok(rows_cpu(t, k, scores.as_deref())),
        Device::Gpu(g) => rows_gpu(g, t, k, scores.as_deref()),
    }
}

fn rows_cpu(t: &TensorRef, k: usize, scores: Option<&[f32]>) -> (Tensor, Diff) {
    let (_, row_len) = t.rows();
    let mut out = t.to_owned();
    if row_len == 0 {
        return (out, Diff::default());
    }
    // Blocks of whole rows, each with its figures while still in cache.
    let rows_per = (CPU_BLOCK / row_len).max(1);
    let parts: Vec<Diff> = with_codec!(t.dtype, C => out
        .data
        .par_chunks_mut(rows_per * row_len * C::SIZE)
        .zip(t.data.par_chunks(rows_per * row_len * C::SIZE))
        .map(|(ob, ib)| {
            let mut keyed: Vec<(u32, usize)> = Vec::with_capacity(row_len);
            for (rb, row) in ib.chunks(row_len * C::SIZE).zip(ob.chunks_mut(row_len * C::SIZE)) {
                keyed.clear();
                keyed.extend((0..row_len).map(|j| {
                    let w = C::to_f32(C::read(rb, j));
                    (match scores { Some(x) => score_key(w, x[j]), None => key(w) }, j)
                }));
                keyed.sort_unstable();
                for &(_, j) in &keyed[..k] {
                    C::write(row, j, 0);
                }
            }
            let mut d = Diff::default();
            d.add_block::<C, C>(ib, ob);
            d
        })
        .collect());
    (out, Diff::sum(parts))
}

fn rows_gpu(g: &Gpu, t: &TensorRef, k: usize, scores: Option<&[f32]>) -> Result<(Tensor, Diff)> {
    let n = t.numel();
    let es = t.dtype.size();
    let (rows, row_len) = t.rows();
    let mut out = Tensor::zeros(t.dtype, t.shape);
    let mut diff = Diff::default();
    if n == 0 {
        return Ok((out, diff));
    }
    // Whole rows per chunk: each row's cut needs the whole row.
    let ce = chunk_elems(g, n, 4.0f64.max(es as f64), (row_len * 4) as u64)?;
    if row_len > ce {
        return Err(Error::Limit {
            what: "row length for per-row selection (elements per chunk)",
            asked: row_len as u64,
            bound: crate::error::Bound::DeviceMax(ce as u64),
        });
    }
    let rows_per = ce / row_len;
    let plan: Vec<(usize, usize)> = (0..rows)
        .step_by(rows_per)
        .map(|r0| (r0, (r0 + rows_per).min(rows)))
        .collect();
    let none = [0f32];
    let x: &[f32] = scores.unwrap_or(&none);
    let use_scores = scores.is_some() as u32;
    // Pass 1: each row's cut.
    let mut cuts = vec![0u32; 3 * rows];
    let layout = StreamLayout {
        inputs: vec![(rows_per * row_len * es) as u64, (x.len() * 4) as u64],
        outputs: vec![((3 * rows_per * 4) as u64, false)],
    };
    let pipeline = g.ctx.pipeline(Kernel::RowCut, t.dtype.shader_code(), 0)?;
    let jobs = plan.iter().map(|&(r0, r1)| Chunk {
        params: params(&RowCutParams {
            n: ((r1 - r0) * row_len) as u32,
            row_len: row_len as u32,
            k: k as u32,
            use_scores,
        }),
        inputs: vec![
            (&t.data[r0 * row_len * es..r1 * row_len * es]).into(),
            bytemuck::cast_slice(x).into(),
        ],
        read: vec![(3 * (r1 - r0) * 4) as u64],
        workgroups: ((r1 - r0) as u32).min(g.ctx.limits.max_compute_workgroups_per_dimension),
    });
    g.ctx.stream(&pipeline, &layout, jobs, |c, outs| {
        let (r0, r1) = plan[c];
        for i in 0..3 * (r1 - r0) {
            cuts[3 * r0 + i] = u32_at(outs[0], i);
        }
        Ok(())
    })?;
    // Pass 2: apply; ties of rows that prune only some of theirs come back
    // listed, and the lowest-index ones are pruned here.
    let layout = StreamLayout {
        inputs: vec![
            (rows_per * row_len * es) as u64,
            (x.len() * 4) as u64,
            (3 * rows_per * 4) as u64,
        ],
        outputs: vec![
            ((rows_per * row_len * es) as u64, false),
            ((rows_per * row_len * 4) as u64, false),
            (8, true),
        ],
    };
    let pipeline = g
        .ctx
        .pipeline(Kernel::RowCutApply, t.dtype.shader_code(), 0)?;
    let listed_max: Vec<u64> = plan
        .iter()
        .map(|&(r0, r1)| {
            (r0..r1)
                .filter(|&r| cuts[3 * r + 1] > 0 && cuts[3 * r + 1] < cuts[3 * r + 2])
                .map(|r| cuts[3 * r + 2] as u64)
                .sum()
        })
        .collect();
    let jobs = plan.iter().enumerate().map(|(c, &(r0, r1))| Chunk {
        params: params(&RowApplyParams {
            n: ((r1 - r0) * row_len) as u32,
            row_len: row_len as u32,
            use_scores,
            ..Default::default()
        }),
        inputs: vec![
            (&t.data[r0 * row_len * es..r1 * row_len * es]).into(),
            bytemuck::cast_slice(x).into(),
            bytemuck::cast_slice(&cuts[3 * r0..3 * r1]).into(),
        ],
        read: vec![((r1 - r0) * row_len * es) as u64, listed_max[c] * 4, 8],
        workgroups: g
            .ctx
            .workgroups_for(((r1 - r0) * row_len * es).div_ceil(4) as u64),
    });
    let dt = t.dtype;
    g.ctx.stream(&pipeline, &layout, jobs, |c, outs| {
        let (r0, r1) = plan[c];
        let o = &mut out.data[r0 * row_len * es..r1 * row_len * es];
        o.copy_from_slice(outs[0]);
        let listed = u32_at(outs[2], 0) as usize;
        let mut ties: Vec<u32> = (0..listed).map(|i| u32_at(outs[1], i)).collect();
        ties.sort_unstable();
        let mut taken_in_row = 0u32;
        let mut row = usize::MAX;
        for &e in &ties {
            let r = e as usize / row_len;
            if r != row {
                row = r;
                taken_in_row = 0;
            }
            if taken_in_row < cuts[3 * (r0 + r) + 1] {
                dt.write_raw(o, e as usize, 0);
                taken_in_row += 1;
            }
        }
        // The figures on the host while the device works on the next rows.
        let elems = r0 * row_len..r1 * row_len;
        diff = diff.merge(chunk_diff(&[t], elems, dt, o));
        Ok(())
    })?;
    Ok((out, diff))
}
