//! GGML block quantization (llama.cpp's Q4_0 … Q8_0 and the K-quants),
//! byte-identical to ggml's reference quantizers on every device.
//!
//! `reference` is the CPU port of ggml-quants.c and the specification.
//! The GPU kernel (shaders/ggml.wgsl) reproduces it exactly: every float
//! operation of the reference is done in the same order with the same
//! rounding; division and square root are correctly rounded integer
//! routines (WGSL allows 2.5 ulp for `/`); every product passes through an
//! opaque bit operation so no driver can fuse it into a multiply-add; and
//! an operation whose result would be subnormal (which a GPU may flush to
//! zero) or infinite marks its block, which is then quantized by the CPU
//! reference instead. The number of such blocks is reported; on real
//! weights it is zero.

mod layout;
pub mod reference;

use crate::device::{Chunk, Device, Gpu, StreamLayout};
use crate::error::{Error, Result};
use crate::ops::codec::{with_codec, Codec};
use crate::ops::diff::Diff;
use crate::ops::kernels::Kernel;
use crate::ops::{chunks, params, values};
use crate::tensor::TensorRef;
use rayon::prelude::*;

pub use crate::formats::ggml_types::BlockType;

/// What the GPU kernel needs of a block type besides the table.
trait GpuBlock {
    /// Code of the type in the kernel (`DTYPE2`): its ggml id, which the
    /// generated `T_*` constants name.
    fn code(self) -> u32;
    /// Blocks one GPU invocation writes.
    fn blocks_per_group(self) -> usize;
}

impl GpuBlock for BlockType {
    fn code(self) -> u32 {
        self.ggml().id()
    }

    /// Blocks one GPU invocation writes: enough that they fill whole u32
    /// words, so no two invocations share a word.
    fn blocks_per_group(self) -> usize {
        if self.block_bytes().is_multiple_of(4) {
            1
        } else {
            2
        }
    }
}

/// A quantized tensor's bytes, and how many of its blocks the GPU handed to
/// the CPU reference (see the module comment).
pub struct Quantized {
    /// The blocks, as ggml lays them out.
    pub data: Vec<u8>,
    /// Blocks the GPU handed to the CPU reference.
    pub cpu_blocks: usize,
    /// The dequantized blocks against the input (the quantization error).
    pub diff: Diff,
}

/// Blocks one CPU task quantizes.
const CPU_TASK_BLOCKS: usize = 64;

fn check(ty: BlockType, t: &TensorRef) -> Result<usize> {
    t.check_float("GGML quantization")?;
    let n = t.numel();
    let bv = ty.block_values();
    if !n.is_multiple_of(bv) {
        return Err(Error::input(format!(
            "{} needs a multiple of {bv} values, the tensor has {n}",
            ty.name()
        )));
    }
    Ok(n / bv)
}

fn non_finite(ty: BlockType) -> Error {
    Error::input(format!(
        "non-finite weights (NaN or infinity) cannot be quantized to {}",
        ty.name()
    ))
}

/// Quantizes `t` (f32, f16 or bf16, values in row-major order) to blocks of
/// `ty`, exactly as ggml's reference does. Non-finite weights are an error.
pub fn quantize(dev: &Device, ty: BlockType, t: &TensorRef) -> Result<Quantized> {
    let blocks = check(ty, t)?;
    match dev {
        Device::Cpu => quantize_cpu(ty, t, blocks),
        Device::Gpu(g) => quantize_gpu(g, ty, t, blocks),
    }
}

fn quantize_cpu(ty: BlockType, t: &TensorRef, blocks: usize) -> Result<Quantized> {
    let (bv, bb) = (ty.block_values(), ty.block_bytes());
    let mut data = vec![0u8; blocks * bb];
    // Each task's blocks are dequantized again while in cache, for the
    // error figures.
    let parts: Vec<Option<Diff>> = data
        .par_chunks_mut(CPU_TASK_BLOCKS * bb)
        .enumerate()
        .map(|(k, out)| {
            fast!({
                let first = k * CPU_TASK_BLOCKS * bv;
                let x = values(t, first..first + out.len() / bb * bv);
                if !x.iter().all(|v| v.is_finite()) {
                    return None;
                }
                reference::quantize_blocks(ty, &x, out);
                let mut y = vec![0f32; x.len()];
                reference::dequantize_blocks(ty, out, &mut y);
                let mut d = Diff::default();
                d.add_f32s(&x, &y);
                Some(d)
            })
        })
        .collect();
    let parts: Option<Vec<Diff>> = parts.into_iter().collect();
    let diff = Diff::sum(parts.ok_or_else(|| non_finite(ty))?);
    Ok(Quantized {
        data,
        cpu_blocks: 0,
        diff,
    })
}

/// Invocations per workgroup of the GGML kernel (`GGML_WG` in the shader).
const GGML_WG: u32 = 64;

kernel_params!(
    /// The block geometry comes from the host, so it is stated once.
    GgmlParams {
        n_groups: u32,
        // Always 0: the opaque operand of fmul.
        zero: u32,
        block_values: u32,
        block_bytes: u32,
        blocks_per_group: u32,
        _pad0: u32,
        _pad1: u32,
        _pad2: u32,
    }
);

/// What the GGML shader needs generated in front of it: its workgroup
/// size and the `T_*` constants of the block types (ggml ids).
pub(crate) fn wgsl_prelude() -> String {
    format!(
        "const GGML_WG: u32 = {GGML_WG}u;\n{}",
        crate::formats::ggml_types::wgsl_constants()
    )
}

/// Per-group flags the kernel writes.
const FLAG_CPU: u32 = 1;
const FLAG_NON_FINITE: u32 = 2;

fn quantize_gpu(g: &Gpu, ty: BlockType, t: &TensorRef, blocks: usize) -> Result<Quantized> {
    let (bv, bb) = (ty.block_values(), ty.block_bytes());
    let gb = ty.blocks_per_group();
    let (gv, gbytes) = (gb * bv, gb * bb);
    let es = t.dtype.size();
    let mut data = vec![0u8; blocks * bb];
    if blocks == 0 {
        return Ok(Quantized {
            data,
            cpu_blocks: 0,
            diff: Diff::default(),
        });
    }
    // Groups per chunk: the input binding (the largest) within the chunk
    // bytes, and a multiple of 64 values for 16-bit word alignment.
    let per_group_in = (gv * es) as u64;
    let groups_total = blocks.div_ceil(gb);
    let max_wg = g.context().limits().max_compute_workgroups_per_dimension as usize;
    let cg = ((g.chunk_bytes() / per_group_in) as usize)
        .min(max_wg * GGML_WG as usize)
        .clamp(1, groups_total);
    let layout = StreamLayout {
        inputs: vec![cg as u64 * per_group_in],
        outputs: vec![((cg * gbytes) as u64, false), ((cg * 4) as u64, false)],
    };
    let pipeline = g
        .ctx
        .pipeline(Kernel::GgmlQuantize, t.dtype.shader_code(), ty.code())?;
    let n = t.numel();
    let ranges: Vec<_> = chunks(groups_total, cg).collect();
    // The last group may hold one block: pad its input with zeros.
    let padded_tail: Option<Vec<u8>> =
        ranges
            .last()
            .filter(|_| !blocks.is_multiple_of(gb))
            .map(|r| {
                let mut v = t.data[r.start * gv * es..n * es].to_vec();
                v.resize(r.len() * gv * es, 0);
                v
            });
    let jobs = ranges.iter().enumerate().map(|(k, r)| {
        let input = match &padded_tail {
            Some(tail) if k + 1 == ranges.len() => tail.as_slice().into(),
            _ => (&t.data[r.start * gv * es..r.end * gv * es]).into(),
        };
        Chunk {
            params: params(&GgmlParams {
                n_groups: r.len() as u32,
                zero: 0,
                block_values: bv as u32,
                block_bytes: bb as u32,
                blocks_per_group: gb as u32,
                ..Default::default()
            }),
            inputs: vec![input],
            read: vec![(r.len() * gbytes) as u64, (r.len() * 4) as u64],
            // One group per invocation: on lavapipe, invocations that
            // looped over several groups wrote wrong bytes for some of
            // their later groups (unexplained; every group once is both
            // faster and correct).
            workgroups: g.ctx.workgroups_of(r.len() as u64, GGML_WG),
        }
    });
    let mut redo: Vec<usize> = Vec::new();
    let mut bad_input = false;
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let r = &ranges[k];
        let start = r.start * gbytes;
        let end = (r.end * gbytes).min(data.len());
        data[start..end].copy_from_slice(&outs[0][..end - start]);
        for i in 0..outs[1].len() / 4 {
            let f = crate::ops::u32_at(outs[1], i);
            if f & FLAG_NON_FINITE != 0 {
                bad_input = true;
            } else if f & FLAG_CPU != 0 {
                redo.push(r.start + i);
            }
        }
        Ok(())
    })?;
    if bad_input {
        return Err(non_finite(ty));
    }
    let mut cpu_blocks = 0;
    for grp in redo {
        let b0 = grp * gb;
        let b1 = (b0 + gb).min(blocks);
        let x = values(t, b0 * bv..b1 * bv);
        reference::quantize_blocks(ty, &x, &mut data[b0 * bb..b1 * bb]);
        cpu_blocks += b1 - b0;
    }
    // The figures: one host pass over the input and the blocks.
    let diff = error_stats(ty, &data, t)?;
    Ok(Quantized {
        data,
        cpu_blocks,
        diff,
    })
}

/// Err unless `q` holds exactly `n` values of `ty` blocks; the values and
/// bytes per block.
fn check_blocks(ty: BlockType, q: &[u8], n: usize) -> Result<(usize, usize)> {
    let (bv, bb) = (ty.block_values(), ty.block_bytes());
    if !n.is_multiple_of(bv) || q.len() != n / bv * bb {
        return Err(Error::input(format!(
            "{} data of {} bytes does not hold {n} values",
            ty.name(),
            q.len()
        )));
    }
    Ok((bv, bb))
}

/// Dequantizes `n` values of `ty` blocks to f32 (ggml's dequantize_row_*).
pub fn dequantize(ty: BlockType, q: &[u8], n: usize) -> Result<Vec<f32>> {
    let (bv, bb) = check_blocks(ty, q, n)?;
    let mut y = vec![0f32; n];
    y.par_chunks_mut(CPU_TASK_BLOCKS * bv)
        .zip(q.par_chunks(CPU_TASK_BLOCKS * bb))
        .for_each(|(y, q)| reference::dequantize_blocks(ty, q, y));
    Ok(y)
}

/// `dequantize` straight into `dtype`'s bytes (rounded to nearest even, as
/// `quantize::convert`), a few blocks at a time: no full-size f32 copy.
/// CPU.
pub fn dequantize_into(
    ty: BlockType,
    q: &[u8],
    n: usize,
    dtype: crate::tensor::DType,
) -> Result<Vec<u8>> {
    dtype.require_float("dequantize")?;
    let (bv, bb) = check_blocks(ty, q, n)?;
    let mut out = vec![0u8; n * dtype.size()];
    with_codec!(dtype, C => out
    .par_chunks_mut(CPU_TASK_BLOCKS * bv * C::SIZE)
    .zip(q.par_chunks(CPU_TASK_BLOCKS * bb))
    .for_each_init(Vec::new, |y: &mut Vec<f32>, (o, q)| {
        y.clear();
        y.resize(o.len() / C::SIZE, 0.0);
        reference::dequantize_blocks(ty, q, y);
        for (k, &v) in y.iter().enumerate() {
            C::write(o, k, C::from_f32(v));
        }
    }));
    Ok(out)
}

/// The error of blocks `q` of `ty` against the tensor they quantize,
/// dequantized a few blocks at a time (no full-size copy): for blocks made
/// elsewhere (`quantize` gives its own in passing).
pub fn error_stats(ty: BlockType, q: &[u8], t: &TensorRef) -> Result<Diff> {
    let (bv, bb) = (ty.block_values(), ty.block_bytes());
    let n = t.numel();
    if q.len() != n / bv * bb || !n.is_multiple_of(bv) {
        return Err(Error::input(format!(
            "{} bytes of {} do not hold {n} values",
            q.len(),
            ty.name()
        )));
    }
    let parts: Vec<Diff> = q
        .par_chunks(CPU_TASK_BLOCKS * bb)
        .enumerate()
        .map(|(k, qc)| {
            fast!({
                let first = k * CPU_TASK_BLOCKS * bv;
                let x = values(t, first..first + qc.len() / bb * bv);
                let mut y = vec![0f32; x.len()];
                reference::dequantize_blocks(ty, qc, &mut y);
                let mut d = Diff::default();
                d.add_f32s(&x, &y);
                d
            })
        })
        .collect();
    Ok(Diff::sum(parts))
}
