//! compressed-tensors quantization (the checkpoints vLLM and transformers
//! load): int4/int8 with group, channel scales and zero points, FP8 per
//! channel or per 128×128 block, NVFP4 (FP4 with FP8 group scales and a
//! global scale) and MXFP4 (FP4 with power-of-two scales), with
//! llm-compressor's data-free rules byte for byte (`reference`).
//!
//! A weight matrix is cut into groups (a run of columns of one row, a whole
//! row, or a block of rows and columns); each group gets a scale from its
//! min and max, and each value a code, packed at bit r·row_stride + c·bits
//! of the output (the layouts of `Packing`). The GPU kernel
//! (shaders/ct.wgsl) gives one invocation to each group and reproduces the
//! reference exactly: comparisons and roundings on bits, divisions by the
//! correctly rounded integer routine; a group whose few native f32
//! additions or products meet a subnormal (which a GPU may flush) is
//! redone by the CPU reference and counted.

mod cpu;
pub mod reference;

use crate::device::{Chunk, Device, Gpu, StreamLayout};
use crate::error::{Error, Result};
use crate::ops::codec::{with_codec, Codec};
use crate::ops::diff::Diff;
use crate::ops::kernels::Kernel;
use crate::ops::{params, CPU_BLOCK};
use crate::tensor::{DType, TensorRef};
use rayon::prelude::*;
use reference::GroupParams;

/// What a code is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Integers of `bits` bits, symmetric (scale only) or with zero points.
    Int {
        /// 4 or 8.
        bits: u32,
        /// No zero point.
        symmetric: bool,
    },
    /// float8_e4m3fn.
    Fp8,
    /// FP4 (e2m1) with e4m3 group scales and a per-tensor global scale.
    Nvfp4,
    /// FP4 (e2m1) with power-of-two (e8m0) group scales.
    Mxfp4,
}

/// Which values share a scale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Strategy {
    /// A whole row (output channel).
    Channel,
    /// Runs of this many columns of one row.
    Group(usize),
    /// Square blocks of this many rows and columns.
    Block(usize),
}

/// A quantization: the codes and the groups.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    /// The codes.
    pub kind: Kind,
    /// The groups.
    pub strategy: Strategy,
}

/// Where codes go: element (r, c) at bit `r·row_stride_bits + c·bits` of
/// little-endian bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packing {
    /// Bits from one row's first code to the next's.
    pub row_stride_bits: usize,
    /// Int codes stored unsigned (+2^(bits−1), pack-quantized) rather than
    /// as two's complement bytes (int-quantized).
    pub offset: bool,
}

impl Spec {
    /// Bits per code.
    pub fn code_bits(&self) -> u32 {
        match self.kind {
            Kind::Int { bits, .. } => bits,
            Kind::Fp8 => 8,
            Kind::Nvfp4 | Kind::Mxfp4 => 4,
        }
    }

    /// Rows and columns of one group in a matrix of `cols` columns.
    pub fn group_dims(&self, cols: usize) -> (usize, usize) {
        match self.strategy {
            Strategy::Channel => (1, cols.max(1)),
            Strategy::Group(g) => (1, g),
            Strategy::Block(b) => (b, b),
        }
    }

    /// Groups down and across a rows × cols matrix (ragged blocks count).
    pub fn group_grid(&self, rows: usize, cols: usize) -> (usize, usize) {
        let (gr, gc) = self.group_dims(cols);
        (rows.div_ceil(gr), cols.div_ceil(gc))
    }

    /// Err unless a rows × cols matrix divides into this spec's groups
    /// (llm-compressor refuses a group size that does not divide the
    /// columns; blocks may be ragged).
    pub fn check_shape(&self, cols: usize) -> Result<()> {
        if let Strategy::Group(g) = self.strategy {
            if g == 0 || !cols.is_multiple_of(g) {
                return Err(Error::input(format!(
                    "{cols} columns (in-features) are not a multiple of the group size {g}"
                )));
            }
        }
        if self.code_bits() == 4 && !cols.is_multiple_of(2) {
            return Err(Error::input(format!(
                "4-bit codes pack two to a byte: {cols} columns is odd"
            )));
        }
        Ok(())
    }
}

/// A quantized matrix.
#[derive(Debug)]
pub struct Quantized {
    /// The packed codes (`rows · row_stride_bits / 8` bytes).
    pub codes: Vec<u8>,
    /// Each group's parameters, groups row-major over `Spec::group_grid`.
    pub groups: Vec<GroupParams>,
    /// The dequantized values (rounded to the weight's dtype) against the
    /// input.
    pub diff: Diff,
    /// Groups the GPU handed to the CPU reference (see the module doc).
    pub cpu_groups: usize,
}

fn non_finite() -> Error {
    Error::input("non-finite weights (NaN or infinity) cannot be quantized".to_string())
}

/// Quantizes matrix `t` (rank 2, f32/f16/bf16) under `spec`; `gs` is
/// NVFP4's global scale (see `reference::nvfp4_global_scale`), ignored
/// otherwise. Non-finite weights are an error.
pub fn quantize(
    dev: &Device,
    spec: &Spec,
    packing: Packing,
    t: &TensorRef,
    gs: f32,
) -> Result<Quantized> {
    t.check_float("compressed-tensors quantization")?;
    if t.shape.len() != 2 {
        return Err(Error::input(format!(
            "compressed-tensors quantization takes matrices, this tensor has shape {:?}",
            t.shape
        )));
    }
    let cols = t.shape[1];
    spec.check_shape(cols)?;
    if packing.row_stride_bits < cols * spec.code_bits() as usize {
        return Err(Error::input("packed rows overlap".to_string()));
    }
    match dev {
        Device::Cpu => quantize_cpu(spec, packing, t, gs),
        Device::Gpu(g) => quantize_gpu(g, spec, packing, t, gs),
    }
}

/// Writes the low `bits` bits of `v` at bit `bit` (bits is 4 or 8).
#[inline]
fn put(codes: &mut [u8], bit: usize, bits: u32, v: u32) {
    let (i, sh) = (bit / 8, bit % 8);
    let mask = (((1u32 << bits) - 1) << sh) as u8;
    codes[i] = (codes[i] & !mask) | (((v << sh) as u8) & mask);
}

/// Reads the `bits`-bit code at bit `bit`.
#[inline]
fn get(codes: &[u8], bit: usize, bits: u32) -> u32 {
    (codes[bit / 8] as u32 >> (bit % 8)) & ((1 << bits) - 1)
}

/// A code as stored: int codes offset or masked to two's complement (the
/// CPU path computes it in bulk; tests compare with this).
#[cfg(test)]
fn stored(spec: &Spec, packing: Packing, c: i32) -> u32 {
    match spec.kind {
        Kind::Int { bits, .. } if packing.offset => (c + (1 << (bits - 1))) as u32,
        _ => c as u32 & ((1 << spec.code_bits()) - 1),
    }
}

/// A stored code back to what `reference::code` returns.
#[inline]
fn unstored(spec: &Spec, packing: Packing, u: u32) -> i32 {
    match spec.kind {
        Kind::Int { bits, .. } if packing.offset => u as i32 - (1 << (bits - 1)),
        Kind::Int { bits, .. } => ((u << (32 - bits)) as i32) >> (32 - bits),
        _ => u as i32,
    }
}

/// Rows one CPU task or GPU chunk starts on: whole blocks, and 4 rows so
/// that every chunk's codes start on a word.
fn row_align(spec: &Spec) -> usize {
    match spec.strategy {
        Strategy::Block(b) => b.max(4).next_multiple_of(4),
        _ => 4,
    }
}

fn quantize_cpu(spec: &Spec, packing: Packing, t: &TensorRef, gs: f32) -> Result<Quantized> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let (grid_r, grid_c) = spec.group_grid(rows, cols);
    let (gr, _) = spec.group_dims(cols);
    let stride_bytes = packing.row_stride_bits / 8;
    let mut codes = vec![0u8; rows * stride_bytes];
    let band = band_rows(spec, cols);
    // Each group's figures are taken with its codes, in the order
    // `error_stats` takes them (the same bits on every device).
    let parts: Vec<Option<(Vec<GroupParams>, Diff)>> = with_codec!(t.dtype, C => codes
        .par_chunks_mut((band * stride_bytes).max(1))
        .enumerate()
        .map(|(k, out)| fast!({
            let r0 = k * band;
            let r1 = (r0 + band).min(rows);
            let mut diff = Diff::default();
            let mut s = cpu::Scratch::default();
            let mut ps = Vec::new();
            for gi in r0 / gr..r1.div_ceil(gr) {
                for gj in 0..grid_c {
                    ps.push(cpu::quantize_group::<C>(
                        spec, packing, t, gs, (gi, gj), r0, out, &mut diff, &mut s,
                    )?);
                }
            }
            s.flush(&mut diff);
            Some((ps, diff))
        }))
        .collect());
    let mut groups = Vec::with_capacity(grid_r * grid_c);
    let mut diffs = Vec::new();
    for p in parts {
        let (ps, d) = p.ok_or_else(non_finite)?;
        groups.extend(ps);
        diffs.push(d);
    }
    Ok(Quantized {
        codes,
        groups,
        diff: Diff::sum(diffs),
        cpu_groups: 0,
    })
}

/// Rows of one CPU task: whole aligned bands of about `CPU_BLOCK` values.
fn band_rows(spec: &Spec, cols: usize) -> usize {
    (CPU_BLOCK / cols.max(1))
        .max(1)
        .next_multiple_of(row_align(spec))
}

/// The figures of codes made on the GPU: one host pass, banded and
/// ordered as the CPU path's.
fn error_stats(spec: &Spec, packing: Packing, t: &TensorRef, q: &Quantized) -> Diff {
    let rows = t.shape[0];
    let cols = t.shape[1];
    let (gr, _) = spec.group_dims(cols);
    let (_, grid_c) = spec.group_grid(rows, cols);
    let band = band_rows(spec, cols);
    let parts: Vec<Diff> = with_codec!(t.dtype, C => (0..rows.div_ceil(band))
        .into_par_iter()
        .map(|k| fast!({
            let (r0, r1) = (k * band, ((k + 1) * band).min(rows));
            let mut d = Diff::default();
            let mut s = cpu::Scratch::default();
            for gi in r0 / gr..r1.div_ceil(gr) {
                for gj in 0..grid_c {
                    let p = &q.groups[gi * grid_c + gj];
                    cpu::group_diff::<C>(spec, packing, t, p, (gi, gj), &q.codes, &mut d, &mut s);
                }
            }
            s.flush(&mut d);
            d
        }))
        .collect());
    Diff::sum(parts)
}

/// Invocations per workgroup of `ct_quantize` (`WG` in the shader).
pub(crate) const CT_WG: u32 = 64;

kernel_params!(
    /// One chunk of rows: its geometry, the spec and the global scale.
    CtParams {
        rows: u32,
        cols: u32,
        group_rows: u32,
        group_cols: u32,
        groups_c: u32,
        n_groups: u32,
        kind: u32,
        bits: u32,
        symmetric: u32,
        offset: u32,
        row_stride_bits: u32,
        gs_bits: u32,
    }
);

/// Flags in the high half of a group's second word (of four: see
/// shaders/ct.wgsl).
const FLAG_CPU: u32 = 1 << 16;
const FLAG_NON_FINITE: u32 = 2 << 16;

fn kind_code(k: Kind) -> (u32, u32, u32) {
    match k {
        Kind::Int { bits, symmetric } => (0, bits, symmetric as u32),
        Kind::Fp8 => (1, 8, 1),
        Kind::Nvfp4 => (2, 4, 1),
        Kind::Mxfp4 => (3, 4, 1),
    }
}

fn quantize_gpu(
    g: &Gpu,
    spec: &Spec,
    packing: Packing,
    t: &TensorRef,
    gs: f32,
) -> Result<Quantized> {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let es = t.dtype.size();
    let (gr, gc) = spec.group_dims(cols);
    let (grid_r, grid_c) = spec.group_grid(rows, cols);
    let stride_bytes = packing.row_stride_bits / 8;
    let mut codes = vec![0u8; rows * stride_bytes];
    let mut groups = vec![
        GroupParams {
            scale_raw: 0,
            zp: 0,
            div: 0.0
        };
        grid_r * grid_c
    ];
    if rows == 0 || cols == 0 {
        return Ok(Quantized {
            codes,
            groups,
            diff: Diff::default(),
            cpu_groups: 0,
        });
    }
    // Rows per chunk: the input (the largest binding) within the chunk
    // bytes, whole aligned bands, and no more groups than one dispatch
    // launches.
    let align = row_align(spec);
    let row_bytes = (cols * es) as u64;
    let max_wg = g.context().limits().max_compute_workgroups_per_dimension as usize;
    let max_groups = max_wg * CT_WG as usize;
    let by_bytes = (g.chunk_bytes() / row_bytes) as usize;
    let by_groups = max_groups / grid_c * gr;
    let cr = (by_bytes.min(by_groups) / align * align).max(align);
    if (cr * cols * es) as u64 > g.context().max_chunk_bytes() || cr / gr * grid_c > max_groups {
        return Err(Error::input(format!(
            "a band of {cr} rows of {cols} columns exceeds this adapter's buffers"
        )));
    }
    let cr = cr.min(rows.next_multiple_of(align));
    let layout = StreamLayout {
        inputs: vec![cr as u64 * row_bytes],
        outputs: vec![
            ((cr * stride_bytes) as u64, true),
            ((cr.div_ceil(gr) * grid_c * 16) as u64, false),
        ],
    };
    let pipeline = g
        .ctx
        .pipeline(Kernel::CtQuantize, t.dtype.shader_code(), 0)?;
    let (kind, bits, symmetric) = kind_code(spec.kind);
    let starts: Vec<usize> = (0..rows).step_by(cr).collect();
    let jobs = starts.iter().map(|&r0| {
        let r1 = (r0 + cr).min(rows);
        let n_groups = (r1 - r0).div_ceil(gr) * grid_c;
        Chunk {
            params: params(&CtParams {
                rows: (r1 - r0) as u32,
                cols: cols as u32,
                group_rows: gr as u32,
                group_cols: gc as u32,
                groups_c: grid_c as u32,
                n_groups: n_groups as u32,
                kind,
                bits,
                symmetric,
                offset: packing.offset as u32,
                row_stride_bits: packing.row_stride_bits as u32,
                gs_bits: gs.to_bits(),
            }),
            inputs: vec![(&t.data[r0 * cols * es..r1 * cols * es]).into()],
            read: vec![((r1 - r0) * stride_bytes) as u64, (n_groups * 16) as u64],
            workgroups: g.ctx.workgroups_of(n_groups as u64, CT_WG),
        }
    });
    let mut redo: Vec<usize> = Vec::new();
    let mut bad_input = false;
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let r0 = starts[k];
        let r1 = (r0 + cr).min(rows);
        let n = (r1 - r0) * stride_bytes;
        codes[r0 * stride_bytes..r1 * stride_bytes].copy_from_slice(&outs[0][..n]);
        let g0 = r0 / gr * grid_c;
        let n_groups = (r1 - r0).div_ceil(gr) * grid_c;
        for i in 0..n_groups {
            let word = |j: usize| super::u32_at(outs[1], 4 * i + j);
            let (scale_raw, second) = (word(0), word(1));
            if second & FLAG_NON_FINITE != 0 {
                bad_input = true;
            } else if second & FLAG_CPU != 0 {
                redo.push(g0 + i);
            }
            groups[g0 + i] = GroupParams {
                scale_raw,
                zp: (second & 0xffff) as i16 as i32,
                div: f32::from_bits(word(2)),
            };
        }
        Ok(())
    })?;
    if bad_input {
        return Err(non_finite());
    }
    let cpu_groups = redo.len();
    with_codec!(t.dtype, C => {
        let (mut scratch, mut s) = (Diff::default(), cpu::Scratch::default());
        for gi in redo {
            let (i, j) = (gi / grid_c, gi % grid_c);
            groups[gi] = cpu::quantize_group::<C>(
                spec, packing, t, gs, (i, j), 0, &mut codes, &mut scratch, &mut s,
            )
            .ok_or_else(non_finite)?;
        }
    });
    let mut q = Quantized {
        codes,
        groups,
        diff: Diff::default(),
        cpu_groups,
    };
    q.diff = error_stats(spec, packing, t, &q);
    Ok(q)
}

/// What a group's values are multiplied by when read back, from its
/// stored scale (as compressed-tensors' decompression derives it).
pub fn divisor(spec: &Spec, dt: DType, p: &GroupParams, gs: f32) -> f32 {
    match spec.kind {
        Kind::Int { .. } | Kind::Fp8 => reference::from_raw(dt, p.scale_raw),
        Kind::Nvfp4 => reference::e4m3_value(p.scale_raw) / gs,
        Kind::Mxfp4 => {
            let s = reference::rt(dt, 2f32.powi(p.scale_raw as i32 - 127));
            if s == 0.0 {
                1.0
            } else {
                s
            }
        }
    }
}

/// The weights that packed `codes` with group parameters `groups` (from
/// `divisor`) stand for, in `dtype`'s bytes: compressed-tensors'
/// dequantization ((q − zp)·scale, FP4 and FP8 values times their
/// divisor) rounded once to `dtype`. CPU.
pub fn dequantize(
    spec: &Spec,
    packing: Packing,
    (rows, cols): (usize, usize),
    codes: &[u8],
    groups: &[GroupParams],
    dtype: DType,
) -> Result<Vec<u8>> {
    dtype.require_float("dequantize")?;
    let (grid_r, grid_c) = spec.group_grid(rows, cols);
    if codes.len() * 8 < rows * packing.row_stride_bits || groups.len() != grid_r * grid_c {
        return Err(Error::input(format!(
            "{} bytes of codes and {} groups do not describe a {rows}×{cols} matrix",
            codes.len(),
            groups.len()
        )));
    }
    let (gr, gc) = spec.group_dims(cols);
    let bits = spec.code_bits();
    let mut out = vec![0u8; rows * cols * dtype.size()];
    with_codec!(dtype, C => out
    .par_chunks_mut((cols * C::SIZE).max(1))
    .enumerate()
    .for_each(|(r, o)| {
        for c in 0..cols {
            let p = &groups[(r / gr) * grid_c + c / gc];
            let u = get(codes, r * packing.row_stride_bits + c * bits as usize, bits);
            let y = reference::value(spec, p, unstored(spec, packing, u));
            C::write(o, c, C::from_f32(y));
        }
    }));
    Ok(out)
}

#[cfg(test)]
mod tests;
