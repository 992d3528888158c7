//! Matrix multiply: Y = C + α·(A·B), the building block of adapter merges
//! (W + s·B·A) and extraction.
//!
//! Rule (the CPU reference): each element sums its K products in ascending
//! k in f32, one rounding per product and per sum (no fused multiply-add),
//! then y = c + fl(α·sum), rounded once to the output dtype. The GPU kernel
//! (shaders/matmul.wgsl) does the same operations in the same order, so on
//! inputs whose products and partial sums stay normal it gives the same
//! bits; a GPU may flush subnormal intermediates, which changes a result by
//! at most K·2^-126·|α|. Against the exact product both are within
//! (K + 2)·2^-24·|α|·Σₖ|aᵢₖ·bₖⱼ| + 2^-24·|cᵢⱼ| before the final rounding
//! (the classic bound for recursive summation). Non-finite inputs are
//! refused.
//!
//! A streams through the device by rows (any count, chunked by the binding
//! limit); B must fit one binding (adapters' factors and sketches do).

use super::kernels::Kernel;
use super::{f32_at, params, u32_at, values};
use crate::device::{Chunk, Device, Gpu, StreamLayout};
use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor, TensorRef};
use rayon::prelude::*;

/// Side of the square tiles of the GPU kernel (`MM_TILE` in the shader).
pub(crate) const MM_TILE: u32 = 16;

kernel_params!(MatmulParams {
    rows: u32,
    k: u32,
    n: u32,
    tiles_n: u32,
    a_dtype: u32,
    b_dtype: u32,
    c_dtype: u32,
    has_c: u32,
    alpha_bits: u32,
    zero: u32,
    _pad0: u32,
    _pad1: u32,
});

fn dims(what: &str, t: &TensorRef) -> Result<(usize, usize)> {
    t.check_float("matmul")?;
    match t.shape {
        [r, c] => Ok((*r, *c)),
        s => Err(Error::input(format!(
            "matmul: {what} must be a matrix, got shape {s:?}"
        ))),
    }
}

/// Y = C + α·(A·B) in `out` (f32, f16 or bf16): A is M×K, B is K×N, C
/// (if given) M×N; see the module doc for the rule and its error bound.
pub fn matmul(
    dev: &Device,
    a: &TensorRef,
    b: &TensorRef,
    alpha: f32,
    c: Option<&TensorRef>,
    out: DType,
) -> Result<Tensor> {
    let (m, k) = dims("A", a)?;
    let (kb, n) = dims("B", b)?;
    if k != kb {
        return Err(Error::input(format!(
            "matmul: A is {m}×{k} but B is {kb}×{n}"
        )));
    }
    if let Some(c) = c {
        if dims("C", c)? != (m, n) {
            return Err(Error::input(format!(
                "matmul: C is {:?}, the product is {m}×{n}",
                c.shape
            )));
        }
    }
    out.require_float("matmul")?;
    if !alpha.is_finite() {
        return Err(Error::input(format!("matmul: α = {alpha} is not finite")));
    }
    let y = match dev {
        Device::Cpu => matmul_cpu(a, b, alpha, c, (m, k, n))?,
        Device::Gpu(g) => matmul_gpu(g, a, b, alpha, c, (m, k, n))?,
    };
    if y.iter().any(|v| !v.is_finite()) {
        return Err(Error::input("matmul: the result overflows f32".to_string()));
    }
    Tensor::from_f32(out, &[m, n], &y)
}

fn non_finite() -> Error {
    Error::input("matmul: non-finite inputs (NaN or infinity)".to_string())
}

fn matmul_cpu(
    a: &TensorRef,
    b: &TensorRef,
    alpha: f32,
    c: Option<&TensorRef>,
    (m, k, n): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let bv = values(b, 0..b.numel());
    if bv.iter().any(|v| !v.is_finite()) {
        return Err(non_finite());
    }
    let mut y = vec![0f32; m * n];
    let rows_of =
        |i: usize, count: usize, t: &TensorRef, len: usize| values(t, i * len..(i + count) * len);
    // Four rows at a time, each B row read once for the four (the same
    // per-element order: acc += a[i,k]·b[k,j] for k ascending).
    let ok = y
        .par_chunks_mut((4 * n).max(1))
        .enumerate()
        .map(|(blk, out)| {
            fast!({
                let (i0, rows) = (4 * blk, out.len() / n.max(1));
                let ar = rows_of(i0, rows, a, k);
                if ar.iter().any(|v| !v.is_finite()) {
                    return false;
                }
                if rows == 4 {
                    let (r0, rest) = out.split_at_mut(n);
                    let (r1, rest) = rest.split_at_mut(n);
                    let (r2, r3) = rest.split_at_mut(n);
                    for kk in 0..k {
                        let (a0, a1, a2, a3) = (ar[kk], ar[k + kk], ar[2 * k + kk], ar[3 * k + kk]);
                        let brow = &bv[kk * n..(kk + 1) * n];
                        for j in 0..n {
                            let b = brow[j];
                            r0[j] += a0 * b;
                            r1[j] += a1 * b;
                            r2[j] += a2 * b;
                            r3[j] += a3 * b;
                        }
                    }
                } else {
                    for (r, row) in out.chunks_mut(n.max(1)).enumerate() {
                        for kk in 0..k {
                            let av = ar[r * k + kk];
                            for (acc, &b) in row.iter_mut().zip(&bv[kk * n..(kk + 1) * n]) {
                                *acc += av * b;
                            }
                        }
                    }
                }
                for v in out.iter_mut() {
                    *v *= alpha;
                }
                if let Some(c) = c {
                    let cr = rows_of(i0, rows, c, n);
                    if cr.iter().any(|v| !v.is_finite()) {
                        return false;
                    }
                    for (v, &cv) in out.iter_mut().zip(&cr) {
                        *v += cv;
                    }
                }
                true
            })
        })
        .collect::<Vec<bool>>();
    if ok.iter().all(|&o| o) {
        Ok(y)
    } else {
        Err(non_finite())
    }
}

fn matmul_gpu(
    g: &Gpu,
    a: &TensorRef,
    b: &TensorRef,
    alpha: f32,
    c: Option<&TensorRef>,
    (m, k, n): (usize, usize, usize),
) -> Result<Vec<f32>> {
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return Ok(y);
    }
    let (ea, eb) = (a.dtype.size(), b.dtype.size());
    let ec = c.map_or(0, |c| c.dtype.size());
    if (k * n * eb) as u64 > g.context().max_chunk_bytes() {
        return Err(Error::input(format!(
            "matmul: B ({k}×{n}) exceeds this adapter's largest binding"
        )));
    }
    // Rows per chunk: A, C and Y rows within the chunk bytes, an even
    // count (16-bit rows start on a word), and no more workgroups than one
    // dispatch launches.
    let tiles_n = n.div_ceil(MM_TILE as usize);
    let row_bytes = (k * ea + n * ec + n * 4).max(1) as u64;
    let max_wg = g.context().limits().max_compute_workgroups_per_dimension as usize;
    let by_groups = (max_wg / tiles_n).max(1) * MM_TILE as usize;
    let by_bytes = (g.chunk_bytes() / row_bytes) as usize;
    let cr = (by_bytes.min(by_groups) / 2 * 2)
        .max(2)
        .min(m.next_multiple_of(2));
    if max_wg < tiles_n {
        return Err(Error::input(format!(
            "matmul: {n} columns need more workgroups than one dispatch launches"
        )));
    }
    let layout = StreamLayout {
        inputs: vec![
            (cr * k * ea) as u64,
            (k * n * eb) as u64,
            if c.is_some() { (cr * n * ec) as u64 } else { 4 },
        ],
        outputs: vec![((cr * n * 4) as u64, false), (4, true)],
    };
    let pipeline = g.ctx.pipeline(Kernel::Matmul, 0, 0)?;
    let starts: Vec<usize> = (0..m).step_by(cr).collect();
    let jobs = starts.iter().map(|&r0| {
        let r1 = (r0 + cr).min(m);
        let c_in = match c {
            Some(c) => (&c.data[r0 * n * ec..r1 * n * ec]).into(),
            None => vec![0u8; 4].into(),
        };
        Chunk {
            params: params(&MatmulParams {
                rows: (r1 - r0) as u32,
                k: k as u32,
                n: n as u32,
                tiles_n: tiles_n as u32,
                a_dtype: a.dtype.shader_code(),
                b_dtype: b.dtype.shader_code(),
                c_dtype: c.map_or(0, |c| c.dtype.shader_code()),
                has_c: c.is_some() as u32,
                alpha_bits: alpha.to_bits(),
                zero: 0,
                ..Default::default()
            }),
            inputs: vec![
                (&a.data[r0 * k * ea..r1 * k * ea]).into(),
                b.data.into(),
                c_in,
            ],
            read: vec![((r1 - r0) * n * 4) as u64, 4],
            workgroups: ((r1 - r0).div_ceil(MM_TILE as usize) * tiles_n) as u32,
        }
    });
    let mut flags = 0u32;
    g.ctx.stream(&pipeline, &layout, jobs, |i, outs| {
        let r0 = starts[i];
        let r1 = (r0 + cr).min(m);
        let part = &mut y[r0 * n..r1 * n];
        for (j, v) in part.iter_mut().enumerate() {
            *v = f32_at(outs[0], j);
        }
        flags |= u32_at(outs[1], 0);
        Ok(())
    })?;
    if flags & 1 != 0 {
        return Err(non_finite());
    }
    Ok(y)
}
