//! N:M patterns: in each run of M consecutive weights along a row, the N
//! largest |w| (or |w|·‖X_j‖₂) stay.

use super::{check_scores, key, score_key};
use crate::device::{Chunk, Device, Gpu, StreamLayout};
use crate::error::{Error, Result};
use crate::ops::codec::{with_codec, Codec};
use crate::ops::diff::Diff;
use crate::ops::kernels::Kernel;
use crate::ops::{chunk_diff, chunk_elems, params, CPU_BLOCK};
use crate::tensor::{Tensor, TensorRef};
use rayon::prelude::*;

kernel_params!(NmParams {
    n: u32,
    seg_len: u32,
    m: u32,
    keep: u32,
    use_scores: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
});

/// An N:M pattern: in each run of M consecutive weights along a row, at
/// most N stay non-zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pattern {
    /// Weights kept per run.
    pub n: u32,
    /// Run length.
    pub m: u32,
}

/// Largest M the kernel ranks within (its cost grows with M per weight).
pub const MAX_PATTERN_M: u32 = 64;

impl Pattern {
    /// "2:4" -> Pattern { n: 2, m: 4 }.
    pub fn parse(s: &str) -> Result<Pattern> {
        let bad = || {
            Error::input(format!(
                "pattern '{s}': expected N:M with 0 ≤ N ≤ M ≤ {MAX_PATTERN_M}, like 2:4"
            ))
        };
        let (a, b) = s.split_once(':').ok_or_else(bad)?;
        let p = Pattern {
            n: a.trim().parse().map_err(|_| bad())?,
            m: b.trim().parse().map_err(|_| bad())?,
        };
        p.check()?;
        Ok(p)
    }

    /// Err unless 0 < N ≤ M.
    pub fn check(&self) -> Result<()> {
        if self.m == 0 || self.n > self.m || self.m > MAX_PATTERN_M {
            return Err(Error::input(format!(
                "pattern {}:{}: need 0 ≤ N ≤ M and 1 ≤ M ≤ {MAX_PATTERN_M}",
                self.n, self.m
            )));
        }
        Ok(())
    }
}

/// Keeps, in each run of M consecutive weights along each row (of the
/// `(shape[0], rest)` view), the N largest |w| — or, with `scores` (one
/// activation norm per column, see `check_scores`), the N largest |w|·x —
/// ties to the lower index. A row whose length is not a multiple of M is an
/// error unless `keep_tail`, which leaves its last, shorter run dense.
/// Returns the result and its figures against the input (its zeros among
/// them), from the same pass.
pub fn prune_pattern(
    dev: &Device,
    t: &TensorRef,
    p: Pattern,
    keep_tail: bool,
    scores: Option<&[f32]>,
) -> Result<(Tensor, Diff)> {
    t.check_float("N:M prune")?;
    p.check()?;
    let (_, row_len) = t.rows();
    let scores = scores.map(|x| check_scores(x, row_len)).transpose()?;
    let scores = scores.as_deref();
    if row_len % p.m as usize != 0 && !keep_tail {
        return Err(Error::input(format!(
            "rows of {row_len} weights (shape {:?}) are not a multiple of M = {} (--pattern-tail keep leaves the tail dense)",
            t.shape, p.m
        )));
    }
    crate::ops::check_row_len(row_len)?;
    match dev {
        Device::Cpu => Ok(pattern_cpu(t, p, scores)),
        Device::Gpu(g) => pattern_gpu(g, t, p, scores),
    }
}

/// Whether element `e` of `group` survives (the reference rule).
#[inline(always)]
fn nm_kept(keys: &[u32], e: usize, keep: u32) -> bool {
    let ke = keys[e];
    let rank = keys
        .iter()
        .enumerate()
        .filter(|&(i, &k)| k > ke || (k == ke && i < e))
        .count();
    rank < keep as usize
}

fn pattern_cpu(t: &TensorRef, p: Pattern, scores: Option<&[f32]>) -> (Tensor, Diff) {
    let (_, row_len) = t.rows();
    let mut out = t.to_owned();
    if row_len == 0 {
        return (out, Diff::default());
    }
    let m = p.m as usize;
    // Blocks of whole rows, each with its figures while still in cache.
    let rows_per = (CPU_BLOCK / row_len).max(1);
    let parts: Vec<Diff> = with_codec!(t.dtype, C => out
        .data
        .par_chunks_mut(rows_per * row_len * C::SIZE)
        .zip(t.data.par_chunks(rows_per * row_len * C::SIZE))
        .map(|(ob, ib)| {
            let mut keys = [0u32; MAX_PATTERN_M as usize];
            for (rb, row) in ib.chunks(row_len * C::SIZE).zip(ob.chunks_mut(row_len * C::SIZE)) {
                for g0 in (0..row_len).step_by(m) {
                    if g0 + m > row_len {
                        break; // the tail stays dense
                    }
                    for (j, k) in keys[..m].iter_mut().enumerate() {
                        let w = C::to_f32(C::read(rb, g0 + j));
                        *k = match scores {
                            Some(x) => score_key(w, x[g0 + j]),
                            None => key(w),
                        };
                    }
                    for j in 0..m {
                        if !nm_kept(&keys[..m], j, p.n) {
                            C::write(row, g0 + j, 0);
                        }
                    }
                }
            }
            let mut d = Diff::default();
            d.add_block::<C, C>(ib, ob);
            d
        })
        .collect());
    (out, Diff::sum(parts))
}

fn pattern_gpu(
    g: &Gpu,
    t: &TensorRef,
    p: Pattern,
    scores: Option<&[f32]>,
) -> Result<(Tensor, Diff)> {
    let n = t.numel();
    let es = t.dtype.size();
    let (_, row_len) = t.rows();
    let mut out = Tensor::zeros(t.dtype, t.shape);
    let mut diff = Diff::default();
    if n == 0 {
        return Ok((out, diff));
    }
    let m = p.m as usize;
    let ce = chunk_elems(g, n, es as f64, 0)?.max(m);
    // Chunks never split a group: whole rows, or group-aligned parts of a row.
    let mut plan: Vec<(usize, usize, usize)> = Vec::new(); // (start, len, seg_len)
    if row_len <= ce {
        let rows_per = ce / row_len;
        let rows = n / row_len;
        for r0 in (0..rows).step_by(rows_per) {
            let r1 = (r0 + rows_per).min(rows);
            plan.push((r0 * row_len, (r1 - r0) * row_len, row_len));
        }
    } else {
        let piece = ce / m * m;
        for r in 0..n / row_len {
            for c0 in (0..row_len).step_by(piece) {
                let len = piece.min(row_len - c0);
                plan.push((r * row_len + c0, len, len));
            }
        }
    }
    let cap = plan.iter().map(|c| c.1).max().unwrap_or(0);
    let layout = StreamLayout {
        inputs: vec![(cap * es) as u64, (row_len.min(cap).max(1) * 4) as u64],
        outputs: vec![((cap * es) as u64, false)],
    };
    let pipeline = g.ctx.pipeline(Kernel::NmPrune, t.dtype.shader_code(), 0)?;
    let none = [0f32];
    let jobs = plan.iter().map(|&(start, len, seg)| {
        // The activation norms of the segment's columns.
        let x: &[f32] = match scores {
            Some(x) => {
                let c0 = start % row_len;
                &x[c0..c0 + seg]
            }
            None => &none,
        };
        Chunk {
            params: params(&NmParams {
                n: len as u32,
                seg_len: seg as u32,
                m: p.m,
                keep: p.n,
                use_scores: scores.is_some() as u32,
                ..Default::default()
            }),
            inputs: vec![
                (&t.data[start * es..(start + len) * es]).into(),
                bytemuck::cast_slice(x).into(),
            ],
            read: vec![(len * es) as u64],
            workgroups: g.ctx.workgroups_for((len * es).div_ceil(4) as u64),
        }
    });
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let (start, len, _) = plan[k];
        let chunk = &mut out.data[start * es..(start + len) * es];
        chunk.copy_from_slice(outs[0]);
        diff = diff.merge(chunk_diff(&[t], start..start + len, t.dtype, chunk));
        Ok(())
    })?;
    Ok((out, diff))
}
