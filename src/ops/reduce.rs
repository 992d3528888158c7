//! Reductions other operations stand on: per-row norms and abs-max (neuron
//! pruning, per-row int8 scales) and whole-tensor abs-max and counts.
//!
//! Maxima are exact everywhere (taken on bits). Sums on the GPU are f32 in
//! an order of the kernel's choosing, so they are approximate: callers that
//! need a decision identical to the CPU's use `RowStats::sumsq_bound` and ask
//! the CPU reference for the rows that land too close to call.

use super::codec::{with_codec, Codec};
use super::kernels::Kernel;
use super::{
    check_row_len, chunk_elems, chunk_rows, chunks, f32_at, matrix_tiles, params, tile_input,
    u32_at, Tile, CPU_BLOCK,
};
use crate::device::{Chunk, Device, Gpu, StreamLayout};
use crate::error::Result;
use crate::tensor::TensorRef;
use rayon::prelude::*;

/// Elements one workgroup reduces in `row_stats` (a row longer than this is
/// split into pieces the host adds up).
const PIECE_LEN: usize = 4096;

kernel_params!(PieceParams {
    n: u32,
    row_len: u32,
    col0: u32,
    piece_len: u32,
    pieces: u32,
    ppr: u32,
    p0: u32,
    _pad0: u32,
});

kernel_params!(StatParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
});

kernel_params!(ColParams {
    rows: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
});

/// Per-row figures of a tensor seen as (rows, row length).
#[derive(Clone, Debug, PartialEq)]
pub struct RowStats {
    /// Elements per row.
    pub row_len: usize,
    /// Σ w² per row (f64 on the CPU; f32 pieces summed in f64 on the GPU).
    pub sumsq: Vec<f64>,
    /// Σ |w| per row.
    pub sumabs: Vec<f64>,
    /// Bits of max |w| per row: exact; above 0x7f800000 when the row holds a
    /// NaN, equal to it for an infinity.
    pub max_abs_bits: Vec<u32>,
    /// Whether the sums came from the GPU (and so are approximate).
    pub approximate: bool,
    /// Relative error bound of the sums when approximate: each f32 square
    /// and addition rounds once (2^-24) over at most `steps` sequential
    /// additions, with a safety factor of two.
    pub rel_err: f64,
}

impl RowStats {
    /// A bound on |`sumsq[r]` − exact Σ w²| (and on Σ|w|'s error, relative to
    /// sumabs) when the sums are approximate; a driver may also flush
    /// subnormal terms (2^-126 each).
    pub fn sumsq_bound(&self, r: usize) -> f64 {
        self.bound(self.sumsq[r])
    }

    /// The error bound of a figure of size `value` (0 when exact).
    pub fn bound(&self, value: f64) -> f64 {
        if !self.approximate {
            return 0.0;
        }
        let abs = (self.row_len as f64 + 1.0) * 2f64.powi(-125);
        self.rel_err * value.abs() + abs
    }
}

/// The relative error bound of f32 sums of `steps` sequential terms.
fn rel_err_of(steps: usize) -> f64 {
    2.0 * (steps as f64 + 2.0) * 2f64.powi(-24)
}

/// Whole-tensor figures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorStats {
    /// Bits of max |w| (NaN sorts above +inf).
    pub max_abs_bits: u32,
    /// NaN and infinite elements.
    pub nonfinite: u64,
    /// Zeros (+0 and −0).
    pub zeros: u64,
}

impl TensorStats {
    /// max |w| as a float.
    pub fn max_abs(&self) -> f32 {
        f32::from_bits(self.max_abs_bits)
    }
}

/// Per-row Σw², Σ|w| and max |w| on `dev`.
pub fn row_stats(dev: &Device, t: &TensorRef) -> Result<RowStats> {
    t.check_float("row statistics")?;
    match dev {
        Device::Cpu => Ok(row_stats_cpu(t)),
        Device::Gpu(g) => row_stats_gpu(g, t),
    }
}

/// The bits of max |w| of each row (`max_abs_bits` of `row_stats`, without
/// the sums: one integer max per element, which the CPU vectorizes).
pub fn row_max_abs_bits(dev: &Device, t: &TensorRef) -> Result<Vec<u32>> {
    t.check_float("row statistics")?;
    match dev {
        Device::Gpu(g) => Ok(row_stats_gpu(g, t)?.max_abs_bits),
        Device::Cpu => {
            let (rows, row_len) = t.rows();
            let es = t.dtype.size();
            if t.numel() == 0 {
                return Ok(vec![0; rows]);
            }
            Ok(with_codec!(t.dtype, C => t.data
                .par_chunks(row_len * es)
                .map(|row| fast!({
                    row.chunks_exact(C::SIZE)
                        .map(|x| C::to_f32(C::read(x, 0)).to_bits() & 0x7fff_ffff)
                        .fold(0, u32::max)
                }))
                .collect()))
        }
    }
}

/// The CPU reference for one row: sequential f64 sums, exact max.
pub(crate) fn row_figures(t: &TensorRef, r: usize) -> (f64, f64, u32) {
    let (_, row_len) = t.rows();
    let (mut sq, mut ab, mut mx) = (0f64, 0f64, 0u32);
    with_codec!(t.dtype, C => for i in r * row_len..(r + 1) * row_len {
        let b = C::to_f32(C::read(t.data, i)).to_bits();
        let x = f32::from_bits(b) as f64;
        sq += x * x;
        ab += x.abs();
        mx = mx.max(b & 0x7fff_ffff);
    });
    (sq, ab, mx)
}

fn row_stats_cpu(t: &TensorRef) -> RowStats {
    let (rows, row_len) = t.rows();
    let figs: Vec<(f64, f64, u32)> = if t.numel() == 0 {
        vec![(0.0, 0.0, 0); rows]
    } else {
        (0..rows)
            .into_par_iter()
            .map(|r| row_figures(t, r))
            .collect()
    };
    RowStats {
        row_len,
        sumsq: figs.iter().map(|f| f.0).collect(),
        sumabs: figs.iter().map(|f| f.1).collect(),
        max_abs_bits: figs.iter().map(|f| f.2).collect(),
        approximate: false,
        rel_err: 0.0,
    }
}

fn row_stats_gpu(g: &Gpu, t: &TensorRef) -> Result<RowStats> {
    let (rows, row_len) = t.rows();
    let mut st = RowStats {
        row_len,
        sumsq: vec![0.0; rows],
        sumabs: vec![0.0; rows],
        max_abs_bits: vec![0; rows],
        approximate: true,
        // Each thread adds PIECE_LEN/WG terms, then a tree of log2(WG)
        // levels.
        rel_err: rel_err_of(
            PIECE_LEN / crate::device::WG as usize + crate::device::WG.ilog2() as usize,
        ),
    };
    let n = t.numel();
    if n == 0 {
        return Ok(st);
    }
    check_row_len(row_len)?;
    let es = t.dtype.size();
    // A chunk of c elements holds at most c/PIECE_LEN whole pieces plus one
    // partial piece per row it touches (c/row_len + 2 rows): one f32 each.
    let per_elem = (es as f64).max(4.0 / PIECE_LEN as f64 + 4.0 / row_len as f64);
    let ce = chunk_elems(g, n, per_elem, 16)?;
    let piece_cap = ce / PIECE_LEN + ce / row_len + 4;
    let layout = StreamLayout {
        inputs: vec![(ce * es) as u64],
        outputs: vec![((piece_cap * 4) as u64, false); 3],
    };
    let ppr = row_len.div_ceil(PIECE_LEN);
    let pipeline = g.ctx.pipeline(Kernel::RowStats, t.dtype.shader_code(), 0)?;
    let ranges: Vec<_> = chunks(n, ce).collect();
    // (first piece's row, first piece's index within that row) per chunk.
    let firsts: Vec<(usize, usize)> = ranges
        .iter()
        .map(|r| {
            let cr = chunk_rows(r, row_len);
            (cr.first_row, cr.col0 / PIECE_LEN)
        })
        .collect();
    let jobs = ranges.iter().map(|r| {
        let cr = chunk_rows(r, row_len);
        let p0 = cr.col0 / PIECE_LEN;
        let last = cr.col0 + r.len() - 1;
        let last_g = (last / row_len) * ppr + (last % row_len) / PIECE_LEN;
        let pieces = last_g - p0 + 1;
        Chunk {
            params: params(&PieceParams {
                n: r.len() as u32,
                row_len: row_len as u32,
                col0: cr.col0 as u32,
                piece_len: PIECE_LEN as u32,
                pieces: pieces as u32,
                ppr: ppr as u32,
                p0: p0 as u32,
                ..Default::default()
            }),
            inputs: vec![(&t.data[r.start * es..r.end * es]).into()],
            read: vec![(pieces * 4) as u64; 3],
            workgroups: (pieces as u32).min(g.ctx.limits.max_compute_workgroups_per_dimension),
        }
    });
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let (first_row, p0) = firsts[k];
        for p in 0..outs[0].len() / 4 {
            let row = first_row + (p0 + p) / ppr;
            st.sumsq[row] += f32_at(outs[0], p) as f64;
            st.sumabs[row] += f32_at(outs[1], p) as f64;
            st.max_abs_bits[row] = st.max_abs_bits[row].max(u32_at(outs[2], p));
        }
        Ok(())
    })?;
    Ok(st)
}

/// Per-column Σw², Σ|w| and max |w| (columns of the `(shape[0], rest)` view),
/// as `RowStats` whose "rows" are the columns.
pub fn col_stats(dev: &Device, t: &TensorRef) -> Result<RowStats> {
    t.check_float("column statistics")?;
    match dev {
        Device::Cpu => Ok(col_stats_cpu(t)),
        Device::Gpu(g) => col_stats_gpu(g, t),
    }
}

/// The CPU reference for one column: sequential f64 sums down the rows.
pub(crate) fn col_figures(t: &TensorRef, c: usize) -> (f64, f64, u32) {
    let (rows, cols) = t.rows();
    let (mut sq, mut ab, mut mx) = (0f64, 0f64, 0u32);
    with_codec!(t.dtype, C => for r in 0..rows {
        let b = C::to_f32(C::read(t.data, r * cols + c)).to_bits();
        let x = f32::from_bits(b) as f64;
        sq += x * x;
        ab += x.abs();
        mx = mx.max(b & 0x7fff_ffff);
    });
    (sq, ab, mx)
}

fn col_stats_cpu(t: &TensorRef) -> RowStats {
    let (rows, cols) = t.rows();
    // Row-major: walk rows in order, columns in parallel blocks.
    let block = 4096;
    let parts: Vec<Vec<(f64, f64, u32)>> = with_codec!(t.dtype, C => (0..cols.div_ceil(block))
        .into_par_iter()
        .map(|b| fast!({
            let cs = b * block..((b + 1) * block).min(cols);
            let mut acc = vec![(0f64, 0f64, 0u32); cs.len()];
            for r in 0..rows {
                for (j, c) in cs.clone().enumerate() {
                    let bits = C::to_f32(C::read(t.data, r * cols + c)).to_bits();
                    let x = f32::from_bits(bits) as f64;
                    acc[j].0 += x * x;
                    acc[j].1 += x.abs();
                    acc[j].2 = acc[j].2.max(bits & 0x7fff_ffff);
                }
            }
            acc
        }))
        .collect());
    let figs: Vec<_> = parts.into_iter().flatten().collect();
    RowStats {
        row_len: rows,
        sumsq: figs.iter().map(|f| f.0).collect(),
        sumabs: figs.iter().map(|f| f.1).collect(),
        max_abs_bits: figs.iter().map(|f| f.2).collect(),
        approximate: false,
        rel_err: 0.0,
    }
}

fn col_stats_gpu(g: &Gpu, t: &TensorRef) -> Result<RowStats> {
    let (rows, cols) = t.rows();
    let es = t.dtype.size();
    let ce = chunk_elems(g, rows * cols, es as f64, 0)?;
    let ((tile_rows, tile_cols), tiles) = matrix_tiles(rows, cols, ce);
    let mut st = RowStats {
        row_len: rows,
        sumsq: vec![0.0; cols],
        sumabs: vec![0.0; cols],
        max_abs_bits: vec![0; cols],
        approximate: true,
        // Each invocation adds a tile's rows in sequence; tiles add in f64.
        rel_err: rel_err_of(tile_rows),
    };
    if rows == 0 || cols == 0 {
        return Ok(st);
    }
    let layout = StreamLayout {
        inputs: vec![(tile_rows * tile_cols * es) as u64],
        outputs: vec![((tile_cols * 4) as u64, false); 3],
    };
    let pipeline = g.ctx.pipeline(Kernel::ColStats, t.dtype.shader_code(), 0)?;
    let jobs = tiles.iter().map(|&tile| {
        let w = tile.c1 - tile.c0;
        Chunk {
            params: params(&ColParams {
                rows: (tile.r1 - tile.r0) as u32,
                cols: w as u32,
                ..Default::default()
            }),
            inputs: vec![tile_input(t, tile)],
            read: vec![(w * 4) as u64; 3],
            workgroups: g.ctx.workgroups_for(w as u64),
        }
    });
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let Tile { c0, c1, .. } = tiles[k];
        for c in c0..c1 {
            st.sumsq[c] += f32_at(outs[0], c - c0) as f64;
            st.sumabs[c] += f32_at(outs[1], c - c0) as f64;
            st.max_abs_bits[c] = st.max_abs_bits[c].max(u32_at(outs[2], c - c0));
        }
        Ok(())
    })?;
    Ok(st)
}

/// Whole-tensor max |w| (exact), non-finite and zero counts on `dev`.
pub fn tensor_stats(dev: &Device, t: &TensorRef) -> Result<TensorStats> {
    t.check_float("tensor statistics")?;
    match dev {
        Device::Cpu => Ok(tensor_stats_cpu(t)),
        Device::Gpu(g) => tensor_stats_gpu(g, t),
    }
}

fn tensor_stats_cpu(t: &TensorRef) -> TensorStats {
    let n = t.numel();
    let blocks = n.div_ceil(CPU_BLOCK);
    (0..blocks)
        .into_par_iter()
        .map(|b| {
            fast!({
                let mut s = TensorStats {
                    max_abs_bits: 0,
                    nonfinite: 0,
                    zeros: 0,
                };
                with_codec!(t.dtype, C => for i in b * CPU_BLOCK..((b + 1) * CPU_BLOCK).min(n) {
                    let a = C::to_f32(C::read(t.data, i)).to_bits() & 0x7fff_ffff;
                    s.max_abs_bits = s.max_abs_bits.max(a);
                    s.nonfinite += (a >= 0x7f80_0000) as u64;
                    s.zeros += (a == 0) as u64;
                });
                s
            })
        })
        .reduce(
            || TensorStats {
                max_abs_bits: 0,
                nonfinite: 0,
                zeros: 0,
            },
            |a, b| TensorStats {
                max_abs_bits: a.max_abs_bits.max(b.max_abs_bits),
                nonfinite: a.nonfinite + b.nonfinite,
                zeros: a.zeros + b.zeros,
            },
        )
}

fn tensor_stats_gpu(g: &Gpu, t: &TensorRef) -> Result<TensorStats> {
    let mut s = TensorStats {
        max_abs_bits: 0,
        nonfinite: 0,
        zeros: 0,
    };
    let n = t.numel();
    if n == 0 {
        return Ok(s);
    }
    let es = t.dtype.size();
    let ce = chunk_elems(g, n, es as f64, 0)?;
    let layout = StreamLayout {
        inputs: vec![(ce * es) as u64],
        outputs: vec![(12, true)],
    };
    let pipeline = g
        .ctx
        .pipeline(Kernel::TensorStats, t.dtype.shader_code(), 0)?;
    let jobs = chunks(n, ce).map(|r| Chunk {
        params: params(&StatParams {
            n: r.len() as u32,
            ..Default::default()
        }),
        inputs: vec![(&t.data[r.start * es..r.end * es]).into()],
        read: vec![12],
        workgroups: g.ctx.workgroups_for(r.len() as u64),
    });
    g.ctx.stream(&pipeline, &layout, jobs, |_, outs| {
        s.max_abs_bits = s.max_abs_bits.max(u32_at(outs[0], 0));
        s.nonfinite += u32_at(outs[0], 1) as u64;
        s.zeros += u32_at(outs[0], 2) as u64;
        Ok(())
    })?;
    Ok(s)
}
/// Signal-to-noise ratio in dB of an approximation whose error is `rel_l2`
/// (‖error‖₂ / ‖signal‖₂): −20·log10(rel_l2), infinite when exact.
pub fn snr_db(rel_l2: f64) -> f64 {
    if rel_l2 > 0.0 {
        -20.0 * rel_l2.log10()
    } else {
        f64::INFINITY
    }
}
