//! The four families of operations. Each module holds, side by side, the
//! parameter checks, the CPU reference (the specification) and the GPU
//! dispatch; the public function picks one by `Device`.

/// Declares a kernel's parameter block: a `#[repr(C)]` struct of 4-byte
/// fields, field for field the WGSL struct of the same name the kernel
/// reads at binding 0 (`kernels` tests compare the two). Padding fields
/// (`_pad0`, ...) are zeroed by `Default`: build one with
/// `Name { n, tau_bits, ..Default::default() }`.
macro_rules! kernel_params {
    ($(#[$m:meta])* $name:ident { $($field:ident: $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[repr(C)]
        #[derive(Clone, Copy, Debug, Default, bytemuck::Pod, bytemuck::Zeroable)]
        #[allow(dead_code)] // read by the GPU, through bytemuck
        pub(crate) struct $name {
            $(pub(crate) $field: $ty,)*
        }

        impl $crate::ops::KernelParams for $name {
            const WGSL: &'static str = stringify!($name);
            const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];
        }
    };
}

/// Evaluates `$body` compiled for AVX2 where the CPU has it (the closure
/// is inlined into a function built with that feature, so its loops may
/// vectorize eight floats wide), else as it is. The results are the same
/// bits either way: Rust neither fuses nor reorders float operations, and
/// the lanes of every sum are explicit.
macro_rules! fast {
    ($body:expr) => {
        $crate::ops::simd::run(
            #[inline(always)]
            || $body,
        )
    };
}

pub(crate) mod codec;
pub mod ct;
pub mod diff;
pub mod ggml;
pub(crate) mod kernels;
pub mod linalg;
pub mod matmul;
pub mod merge;
pub mod mix;
pub mod moe;
pub mod prune;
pub mod quantize;
pub mod reduce;
pub mod select;
mod selfcheck;
pub(crate) mod simd;
pub mod transfer;

use crate::device::Gpu;
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorRef};
use codec::Codec;
use rayon::prelude::*;
use std::ops::Range;

/// Elements one CPU task handles: large enough to amortize rayon, small
/// enough to balance across cores.
pub(crate) const CPU_BLOCK: usize = 1 << 15;

/// Longest row the row-aware kernels index with 32-bit arithmetic.
pub(crate) const MAX_ROW_LEN: usize = 1 << 30;

/// Elements per GPU chunk such that no binding exceeds the handle's chunk
/// bytes, given the most bytes any binding spends per element and a few
/// bytes of fixed overhead. A multiple of 64 so that every chunk starts on
/// a word boundary for 16-bit and 8-bit packing.
/// Never more than `n` rounded up to 64, so small tensors get small buffers.
pub(crate) fn chunk_elems(
    gpu: &Gpu,
    n: usize,
    bytes_per_elem: f64,
    overhead: u64,
) -> Result<usize> {
    let room = gpu.chunk_bytes().saturating_sub(overhead) as f64;
    let elems = ((room / bytes_per_elem) as usize) / 64 * 64;
    if elems == 0 {
        return Err(Error::Limit {
            what: "chunk bytes for this kernel",
            asked: gpu.chunk_bytes(),
            bound: crate::error::Bound::CrateMin((64.0 * bytes_per_elem) as u64 + overhead),
        });
    }
    Ok(elems.min(1 << 30).min(n.max(1).next_multiple_of(64)))
}

/// Consecutive ranges of at most `chunk` elements covering 0..n.
pub(crate) fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n.div_ceil(chunk)).map(move |k| k * chunk..((k + 1) * chunk).min(n))
}

/// The rows crossing `range` of flat indices, with the part of the range
/// in each: lets per-row loops look up a row's value once, not per element.
pub(crate) fn row_segments(
    range: Range<usize>,
    row_len: usize,
) -> impl Iterator<Item = (usize, Range<usize>)> {
    let row_len = row_len.max(1);
    let first = range.start / row_len;
    let last = if range.is_empty() {
        first
    } else {
        (range.end - 1) / row_len + 1
    };
    (first..last).map(move |r| {
        (
            r,
            (r * row_len).max(range.start)..((r + 1) * row_len).min(range.end),
        )
    })
}

/// A block of a matrix: rows r0..r1 × columns c0..c1.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tile {
    pub r0: usize,
    pub r1: usize,
    pub c0: usize,
    pub c1: usize,
}

/// Tiles of at most `ce` elements covering a rows × cols matrix, column
/// tiles outer and row tiles inner (so a column's partial results arrive
/// in row order), with the tile size (rows, cols).
pub(crate) fn matrix_tiles(rows: usize, cols: usize, ce: usize) -> ((usize, usize), Vec<Tile>) {
    let tile_cols = cols.clamp(1, ce);
    let tile_rows = (ce / tile_cols).clamp(1, rows.max(1));
    let tiles = (0..cols.div_ceil(tile_cols))
        .flat_map(|ct| {
            (0..rows.div_ceil(tile_rows)).map(move |rt| {
                let (c0, r0) = (ct * tile_cols, rt * tile_rows);
                Tile {
                    r0,
                    r1: (r0 + tile_rows).min(rows),
                    c0,
                    c1: (c0 + tile_cols).min(cols),
                }
            })
        })
        .collect();
    ((tile_rows, tile_cols), tiles)
}

/// A tile's elements, row-major and contiguous: borrowed when it spans
/// whole rows, gathered otherwise.
pub(crate) fn tile_input<'a>(t: &TensorRef<'a>, tile: Tile) -> crate::device::Input<'a> {
    let (_, cols) = t.rows();
    let es = t.dtype.size();
    let Tile { r0, r1, c0, c1 } = tile;
    if c1 - c0 == cols {
        return (&t.data[r0 * cols * es..r1 * cols * es]).into();
    }
    let mut v = Vec::with_capacity((r1 - r0) * (c1 - c0) * es);
    for r in r0..r1 {
        v.extend_from_slice(&t.data[(r * cols + c0) * es..(r * cols + c1) * es]);
    }
    v.into()
}

/// Bytes per element that per-row vectors (one f32 per row) cost a chunk.
pub(crate) fn row_vector_bytes_per_elem(row_len: usize) -> f64 {
    4.0 / row_len.clamp(1, 4) as f64
}

pub(crate) fn check_row_len(row_len: usize) -> Result<()> {
    if row_len > MAX_ROW_LEN {
        return Err(Error::Limit {
            what: "row length",
            asked: row_len as u64,
            bound: crate::error::Bound::CrateMax(MAX_ROW_LEN as u64),
        });
    }
    Ok(())
}

/// The rows a chunk of elements touches, and the column its first element
/// sits at.
pub(crate) struct ChunkRows {
    pub first_row: usize,
    pub rows: usize,
    pub col0: usize,
}

pub(crate) fn chunk_rows(range: &Range<usize>, row_len: usize) -> ChunkRows {
    let first_row = range.start / row_len;
    let last_row = (range.end - 1) / row_len;
    ChunkRows {
        first_row,
        rows: last_row - first_row + 1,
        col0: range.start % row_len,
    }
}

/// Elements `r` of float tensor `t` as f32 (exact for every float dtype).
pub(crate) fn values(t: &TensorRef, r: Range<usize>) -> Vec<f32> {
    let es = t.dtype.size();
    let bytes = &t.data[r.start * es..r.end * es];
    codec::with_codec!(t.dtype, C => bytes.chunks_exact(C::SIZE).map(|x| C::to_f32(C::read(x, 0))).collect())
}

/// One input binding holding elements `r` of each of `ts` (one dtype), the
/// i-th in a slot starting at element i·`slot` (kernels that combine several
/// tensors take them through one binding, not one each).
pub(crate) fn slots<'a>(
    ts: &[TensorRef<'a>],
    r: Range<usize>,
    slot: usize,
) -> crate::device::Input<'a> {
    crate::device::Input {
        parts: ts
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let es = t.dtype.size();
                (
                    (i * slot * es) as u64,
                    std::borrow::Cow::Borrowed(&t.data[r.start * es..r.end * es]),
                )
            })
            .collect(),
    }
}

pub(crate) fn f32_bytes(v: &[f32]) -> &[u8] {
    bytemuck::cast_slice(v)
}

pub(crate) fn u32_at(bytes: &[u8], i: usize) -> u32 {
    let b = &bytes[4 * i..4 * i + 4];
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

pub(crate) fn f32_at(bytes: &[u8], i: usize) -> f32 {
    f32::from_bits(u32_at(bytes, i))
}

/// A kernel's parameter block (see `kernel_params!`).
pub(crate) trait KernelParams: bytemuck::Pod {
    /// The WGSL struct it mirrors.
    const WGSL: &'static str;
    /// Its fields' names, in order.
    const FIELDS: &'static [&'static str];
}

/// The bytes of a parameter block, for `Chunk::params`.
pub(crate) fn params(p: &impl KernelParams) -> Vec<u8> {
    bytemuck::bytes_of(p).to_vec()
}

/// Subnormal f32 -> signed zero (see flush_subnormal in common.wgsl).
#[inline(always)]
pub(crate) fn flush_subnormal(b: u32) -> u32 {
    if b & 0x7f80_0000 == 0 {
        b & 0x8000_0000
    } else {
        b
    }
}

pub(crate) const CANONICAL_NAN: u32 = 0x7fc0_0000;

/// Special-value state of a term p·x: 1 NaN, 2 +inf, 4 -inf (mirrors
/// term_special in common.wgsl).
#[inline(always)]
pub(crate) fn term_special(p: f32, xb: u32) -> u32 {
    let a = xb & 0x7fff_ffff;
    if a < 0x7f80_0000 {
        0
    } else if a > 0x7f80_0000 || p.to_bits() & 0x7fff_ffff == 0 {
        1
    } else if (xb ^ p.to_bits()) & 0x8000_0000 != 0 {
        4
    } else {
        2
    }
}

/// The f32 bits of a sum with finite part `sum` and specials `state`
/// (mirrors finish_special in common.wgsl).
#[inline(always)]
pub(crate) fn finish_special(state: u32, sum: f32) -> u32 {
    if state & 1 != 0 || state & 6 == 6 {
        CANONICAL_NAN
    } else if state == 2 {
        0x7f80_0000
    } else if state == 4 {
        0xff80_0000
    } else if sum.is_nan() {
        CANONICAL_NAN
    } else {
        sum.to_bits()
    }
}

/// The CPU backend's elementwise driver: `f(index, raw_in) -> (raw_out,
/// counts)` over every element in parallel blocks, reading codec `I` and
/// writing codec `O` (both fixed at compile time; see `codec::with_codec`).
/// The output's `Diff` against the input comes out of the same pass.
pub(crate) fn cpu_map<I: Codec, O: Codec, const C: usize>(
    src: &TensorRef,
    out_dtype: DType,
    f: impl Fn(usize, u32) -> (u32, [u64; C]) + Sync,
) -> (Tensor, [u64; C], diff::Diff) {
    let mut out = Tensor::for_overwrite(out_dtype, src.shape);
    let parts: Vec<([u64; C], diff::Diff)> = out
        .data
        .par_chunks_mut(CPU_BLOCK * O::SIZE)
        .zip(src.data.par_chunks(CPU_BLOCK * I::SIZE))
        .enumerate()
        .map(|(b, (ob, ib))| {
            fast!({
                let mut c = [0u64; C];
                // In runs of SUB elements: decode, apply, encode, each a tight
                // loop over a small array that the compiler can vectorize.
                const SUB: usize = 512;
                let (mut xs, mut ys) = ([0u32; SUB], [0u32; SUB]);
                let runs = ib.chunks(SUB * I::SIZE).zip(ob.chunks_mut(SUB * O::SIZE));
                for (r, (xr, yr)) in runs.enumerate() {
                    let m = xr.len() / I::SIZE;
                    for (k, x) in xs[..m].iter_mut().enumerate() {
                        *x = I::read(xr, k);
                    }
                    let base = b * CPU_BLOCK + r * SUB;
                    for (k, (x, y)) in xs[..m].iter().zip(&mut ys[..m]).enumerate() {
                        let (raw, n) = f(base + k, *x);
                        *y = raw;
                        for (a, b) in c.iter_mut().zip(n) {
                            *a += b;
                        }
                    }
                    for (k, y) in ys[..m].iter().enumerate() {
                        O::write(yr, k, *y);
                    }
                }
                // The block is still in cache: the figures cost no pass.
                let mut d = diff::Diff::default();
                d.add_block::<I, O>(ib, ob);
                (c, d)
            })
        })
        .collect();
    // Summed in block order, so that the figures repeat exactly.
    let mut counts = [0u64; C];
    let mut d = diff::Diff::default();
    for (c, dp) in parts {
        counts.iter_mut().zip(c).for_each(|(a, b)| *a += b);
        d = d.merge(dp);
    }
    (out, counts, d)
}

/// The GPU twin of `cpu_map`: streams elementwise kernel `kernel` over
/// `inputs` (tensors of one element count, chunked alike; `codes` are its
/// `DTYPE`/`DTYPE2`), writing one tensor of `out_dtype` and summing the `C`
/// u32 counters the kernel keeps in its last binding. `params` gives a
/// chunk's parameter block from its element count. The output's `Diff`
/// against `inputs[0]` (and the other inputs' non-finite values) is taken
/// on the host as each chunk comes back, while the device computes the
/// next.
pub(crate) fn gpu_map<P: KernelParams, const C: usize>(
    g: &Gpu,
    kernel: kernels::Kernel,
    codes: (u32, u32),
    inputs: &[&TensorRef],
    out_dtype: DType,
    params: impl Fn(usize) -> P,
) -> Result<(Tensor, [u64; C], diff::Diff)> {
    let n = inputs.first().map_or(0, |t| t.numel());
    let sizes: Vec<usize> = inputs.iter().map(|t| t.dtype.size()).collect();
    let eo = out_dtype.size();
    let widest = sizes.iter().copied().fold(eo, usize::max);
    let mut out = Tensor::zeros(out_dtype, inputs.first().map_or(&[][..], |t| t.shape));
    let ce = chunk_elems(g, n, widest as f64, 0)?;
    let mut outputs = vec![((ce * eo) as u64, false)];
    if C > 0 {
        outputs.push(((4 * C) as u64, true));
    }
    let layout = crate::device::StreamLayout {
        inputs: sizes.iter().map(|s| (ce * s) as u64).collect(),
        outputs,
    };
    let pipeline = g.ctx.pipeline(kernel, codes.0, codes.1)?;
    let ranges: Vec<_> = chunks(n, ce).collect();
    let jobs = ranges.iter().map(|r| crate::device::Chunk {
        params: self::params(&params(r.len())),
        inputs: inputs
            .iter()
            .zip(&sizes)
            .map(|(t, &s)| (&t.data[r.start * s..r.end * s]).into())
            .collect(),
        read: std::iter::once((r.len() * eo) as u64)
            .chain((C > 0).then_some((4 * C) as u64))
            .collect(),
        // Enough invocations for a word of the widest operand each; the
        // kernels loop with a grid stride and skip what is past the end.
        workgroups: g.ctx.workgroups_for((r.len() * widest).div_ceil(4) as u64),
    });
    let mut counts = [0u64; C];
    let mut d = diff::Diff::default();
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let r = &ranges[k];
        let chunk = &mut out.data[r.start * eo..r.end * eo];
        chunk.copy_from_slice(outs[0]);
        for (i, c) in counts.iter_mut().enumerate() {
            *c += u32_at(outs[1], i) as u64;
        }
        d = d.merge(chunk_diff(inputs, r.clone(), out_dtype, chunk));
        Ok(())
    })?;
    Ok((out, counts, d))
}

/// The `Diff` of one chunk of an elementwise result (elements `r`,
/// `out` its bytes) against `inputs[0]`, with the other inputs' non-finite
/// values counted.
pub(crate) fn chunk_diff(
    inputs: &[&TensorRef],
    r: Range<usize>,
    out_dtype: DType,
    out: &[u8],
) -> diff::Diff {
    let Some(first) = inputs.first() else {
        return diff::Diff::default();
    };
    let es = first.dtype.size();
    let input = TensorRef {
        dtype: first.dtype,
        shape: &[],
        data: &first.data[r.start * es..r.end * es],
    };
    let output = TensorRef {
        dtype: out_dtype,
        shape: &[],
        data: out,
    };
    let mut d = diff::diff_elements(&input, &output, r.len());
    for t in &inputs[1..] {
        let s = t.dtype.size();
        d.nonfinite_other += diff::count_nonfinite(t.dtype, &t.data[r.start * s..r.end * s]);
    }
    d
}

/// Err naming the operation when two shapes differ.
pub(crate) fn same_shape(what: &str, a: &[usize], b: &[usize]) -> Result<()> {
    if a != b {
        return Err(Error::input(format!(
            "{what}: shape {a:?} differs from {b:?}"
        )));
    }
    Ok(())
}

/// Refuses a NaN or infinite parameter, naming it (`--lambda`).
pub fn finite_param(what: &str, v: f32) -> Result<()> {
    if !v.is_finite() {
        return Err(Error::input(format!("{what} must be finite, got {v}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_range_exactly() {
        for n in [0, 1, 63, 64, 65, 1000] {
            for c in [64, 128, 1024] {
                let v: Vec<_> = chunks(n, c).collect();
                assert_eq!(v.iter().map(|r| r.len()).sum::<usize>(), n);
                assert!(v.windows(2).all(|w| w[0].end == w[1].start));
                assert!(v
                    .iter()
                    .all(|r| !r.is_empty() && r.len() <= c && r.start % c == 0));
            }
        }
    }

    #[test]
    fn chunk_rows_and_segments_agree() {
        for row_len in [1, 3, 64, 1000] {
            for r in [0..1, 5..17, 63..200, 999..2001] {
                let cr = chunk_rows(&r, row_len);
                let segs: Vec<_> = row_segments(r.clone(), row_len).collect();
                assert_eq!(segs.len(), cr.rows);
                assert_eq!(segs[0].0, cr.first_row);
                assert_eq!(segs[0].1.start % row_len, cr.col0);
                assert_eq!(segs.iter().map(|s| s.1.len()).sum::<usize>(), r.len());
                for (row, s) in &segs {
                    assert!(s.clone().all(|i| i / row_len == *row));
                }
            }
        }
        assert_eq!(row_segments(5..5, 3).count(), 0);
        assert_eq!(row_segments(0..10, usize::MAX).count(), 1);
    }

    #[test]
    fn special_terms() {
        assert_eq!(term_special(1.0, 1.0f32.to_bits()), 0);
        assert_eq!(term_special(1.0, f32::NAN.to_bits()), 1);
        assert_eq!(term_special(0.0, f32::INFINITY.to_bits()), 1);
        assert_eq!(term_special(-2.0, f32::INFINITY.to_bits()), 4);
        assert_eq!(term_special(-2.0, f32::NEG_INFINITY.to_bits()), 2);
        assert_eq!(finish_special(6, 1.0), CANONICAL_NAN);
        assert_eq!(finish_special(0, f32::NAN), CANONICAL_NAN);
        assert_eq!(finish_special(0, -0.0), 0x8000_0000);
        assert_eq!(flush_subnormal(0x8000_0001), 0x8000_0000);
        assert_eq!(flush_subnormal(0x0080_0000), 0x0080_0000);
    }
}
