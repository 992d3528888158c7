//! Rounding to int8 and back, and exact dtype conversion.
//!
//! Rules (the CPU reference below is the specification):
//! - `quantize_round(Q)`: q = clamp(round_ties_even(w·Q), -128, 127) for
//!   finite Q > 0; the stored scale is fl(1/Q). NaN -> 0 (counted); ±inf
//!   and |w·Q| beyond the range saturate (counted as clipped).
//! - `quantize_absmax`: symmetric int8, m = 127/absmax (f32 division on the
//!   host), q = clamp(round_ties_even(w·m), -127, 127), scale = absmax/127,
//!   per tensor or per row (rows of the `(shape[0], rest)` view). Refuses
//!   non-finite weights. A tensor or row whose 127/absmax is not finite (all
//!   zeros, or only values below ~4e-37) gets scale 0 and q = 0.
//! - Subnormal weights are treated as zero (drivers may flush them; doing it
//!   on both sides keeps the integers identical on every adapter).
//! - `dequantize`: w = q·scale in f32, then rounded to the dtype asked for.
//!   With the round-mode scale fl(1/Q) this is within 1 ulp of q/Q.

use super::codec::{round_even_small, with_codec, Codec};
use super::diff::Diff;
use super::kernels::Kernel;
use super::reduce::{row_max_abs_bits, tensor_stats};
use super::{
    check_row_len, chunk_elems, chunk_rows, chunks, cpu_map, f32_bytes, flush_subnormal, gpu_map,
    params, row_segments, row_vector_bytes_per_elem, u32_at, CPU_BLOCK,
};
use crate::device::{Chunk, Device, Gpu, StreamLayout};
use crate::error::{Error, Result};
use crate::tensor::{DType, QTensor, Tensor, TensorRef};
use rayon::prelude::*;

/// What a quantization did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct QuantStats {
    /// Values beyond the int8 range (±inf included), saturated.
    pub clipped: u64,
    /// NaN values, written as 0.
    pub nan: u64,
    /// The round trip (q·scale in the input's dtype, as `dequantize`
    /// writes it) against the input: fused into the quantizing pass on the
    /// CPU, one host pass over the input and q after a GPU.
    pub diff: Diff,
}

pub use crate::tensor::Granularity;

kernel_params!(QuantParams {
    n: u32,
    row_len: u32,
    col0: u32,
    per_row: u32,
    qmin: i32,
    qmax: i32,
    _pad0: u32,
    _pad1: u32,
});

kernel_params!(DequantParams {
    n: u32,
    row_len: u32,
    col0: u32,
    per_row: u32,
});

kernel_params!(ConvertParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
});

/// q = round(w·Q) as saturating int8.
pub fn quantize_round(dev: &Device, t: &TensorRef, q: f32) -> Result<(QTensor, QuantStats)> {
    t.check_float("quantize")?;
    if !(q.is_finite() && q > 0.0) {
        return Err(Error::input(format!(
            "quantization factor Q must be finite and > 0, got {q}"
        )));
    }
    let scales = [1.0 / q];
    let (qs, st) = quantize_with(dev, t, &[q], &scales, false, -128, 127)?;
    Ok((
        QTensor {
            shape: t.shape.to_vec(),
            q: qs,
            scales: scales.to_vec(),
            granularity: Granularity::PerTensor,
        },
        st,
    ))
}

/// The multiplier and dequantization scale for an abs-max (see module doc).
fn absmax_scale(max_abs_bits: u32) -> (f32, f32) {
    let absmax = f32::from_bits(flush_subnormal(max_abs_bits));
    let m = 127.0 / absmax;
    if m.is_finite() {
        (m, absmax / 127.0)
    } else {
        (0.0, 0.0)
    }
}

/// Symmetric int8 with scale absmax/127, per tensor or per row.
pub fn quantize_absmax(
    dev: &Device,
    t: &TensorRef,
    gran: Granularity,
) -> Result<(QTensor, QuantStats)> {
    t.check_float("quantize")?;
    let (mults, scales): (Vec<f32>, Vec<f32>) = match gran {
        Granularity::PerTensor => {
            let s = tensor_stats(dev, t)?;
            if s.nonfinite > 0 {
                return Err(Error::input(format!(
                    "{} non-finite weights: abs-max scaling needs finite weights",
                    s.nonfinite
                )));
            }
            let (m, sc) = absmax_scale(s.max_abs_bits);
            (vec![m], vec![sc])
        }
        Granularity::PerRow => {
            let max_abs_bits = row_max_abs_bits(dev, t)?;
            let bad = max_abs_bits.iter().filter(|&&b| b >= 0x7f80_0000).count();
            if bad > 0 {
                return Err(Error::input(format!(
                    "{bad} rows hold non-finite weights: abs-max scaling needs finite weights"
                )));
            }
            max_abs_bits.iter().map(|&b| absmax_scale(b)).unzip()
        }
    };
    let per_row = gran == Granularity::PerRow;
    let (qs, st) = quantize_with(dev, t, &mults, &scales, per_row, -127, 127)?;
    Ok((
        QTensor {
            shape: t.shape.to_vec(),
            q: qs,
            scales,
            granularity: if per_row {
                Granularity::PerRow
            } else {
                Granularity::PerTensor
            },
        },
        st,
    ))
}

/// The rule for one weight, as plainly as it can be said: the CPU path
/// runs it without branches, and a test holds the two equal.
#[cfg(test)]
fn quantize_one(bits: u32, m: f32, qmin: i32, qmax: i32) -> (i8, QuantStats) {
    let xb = flush_subnormal(bits);
    let x = f32::from_bits(xb);
    let mut st = QuantStats::default();
    let q = if x.is_nan() {
        st.nan = 1;
        0
    } else if x.is_infinite() {
        st.clipped = 1;
        if x < 0.0 {
            qmin
        } else {
            qmax
        }
    } else {
        // Clamped first (the range is ±128), so the fast rounding is exact.
        let v = round_even_small((x * m).clamp(-256.0, 256.0));
        if v < qmin as f32 {
            st.clipped = 1;
            qmin
        } else if v > qmax as f32 {
            st.clipped = 1;
            qmax
        } else {
            v as i32
        }
    };
    (q as i8, st)
}

/// `mults` quantize, `scales` dequantize (one each, or one per row).
fn quantize_with(
    dev: &Device,
    t: &TensorRef,
    mults: &[f32],
    scales: &[f32],
    per_row: bool,
    qmin: i32,
    qmax: i32,
) -> Result<(Vec<i8>, QuantStats)> {
    match dev {
        Device::Cpu => Ok(quantize_cpu(t, mults, scales, per_row, qmin, qmax)),
        Device::Gpu(g) => {
            let (q, mut st) = quantize_gpu(g, t, mults, per_row, qmin, qmax)?;
            st.diff = int8_diff(t, &q, scales, per_row);
            Ok((q, st))
        }
    }
}

/// Statistics of blocks, summed in block order (the figures repeat).
fn sum_stats(parts: Vec<QuantStats>) -> QuantStats {
    parts
        .into_iter()
        .fold(QuantStats::default(), |a, b| QuantStats {
            clipped: a.clipped + b.clipped,
            nan: a.nan + b.nan,
            diff: a.diff.merge(b.diff),
        })
}

fn quantize_cpu(
    t: &TensorRef,
    mults: &[f32],
    scales: &[f32],
    per_row: bool,
    qmin: i32,
    qmax: i32,
) -> (Vec<i8>, QuantStats) {
    let (_, row_len) = t.rows();
    let seg_len = if per_row { row_len } else { usize::MAX };
    let mut q = vec![0i8; t.numel()];
    let parts = with_codec!(t.dtype, C => q
    .par_chunks_mut(CPU_BLOCK)
    .enumerate()
    .map(|(b, qb)| fast!({
        let mut st = QuantStats::default();
        let start = b * CPU_BLOCK;
        // Runs of at most SUB elements of one row: decode, quantize with
        // `quantize_one`'s rules without branches, and take the round
        // trip's figures, each a loop the compiler vectorizes.
        const SUB: usize = 512;
        let (mut xs, mut ys) = ([0f32; SUB], [0f32; SUB]);
        for (row, seg) in row_segments(start..start + qb.len(), seg_len) {
            let k = if per_row { row } else { 0 };
            let (m, s) = (mults[k], scales[k]);
            let (lo, hi) = (qmin as f32, qmax as f32);
            let mut i = seg.start;
            while i < seg.end {
                let len = (seg.end - i).min(SUB);
                let src = &t.data[i * C::SIZE..(i + len) * C::SIZE];
                let (xs, ys) = (&mut xs[..len], &mut ys[..len]);
                for (x, raw) in xs.iter_mut().zip(src.chunks_exact(C::SIZE)) {
                    *x = f32::from_bits(flush_subnormal(C::to_f32(C::read(raw, 0)).to_bits()));
                }
                let (mut clipped, mut nans) = (0u32, 0u32);
                let out = &mut qb[i - start..i - start + len];
                for ((x, q), y) in xs.iter().zip(out.iter_mut()).zip(ys.iter_mut()) {
                    let nan = x.is_nan();
                    // ±inf saturates whatever m is (even 0).
                    let xm = if x.is_infinite() { *x } else { x * m };
                    let v = round_even_small(xm.clamp(-256.0, 256.0));
                    let c = v.clamp(lo, hi);
                    clipped += (v != c && !nan) as u32;
                    nans += nan as u32;
                    let c = if nan { 0.0 } else { c };
                    // SAFETY: c is an integer in [qmin, qmax] (NaN became
                    // 0 just above), so the conversion is exact; unlike
                    // `as`, it vectorizes.
                    let qi: i32 = unsafe { c.to_int_unchecked() };
                    *q = qi as i8;
                    *y = C::to_f32(C::from_f32(qi as f32 * s));
                }
                st.clipped += clipped as u64;
                st.nan += nans as u64;
                // Figures against the values as read (subnormals too).
                for (x, raw) in xs.iter_mut().zip(src.chunks_exact(C::SIZE)) {
                    *x = C::to_f32(C::read(raw, 0));
                }
                st.diff.add_f32s(xs, ys);
                i += len;
            }
        }
        st
    }))
    .collect());
    (q, sum_stats(parts))
}

/// The `Diff` of the round trip q·scale (rounded to the input's dtype)
/// against the input: one pass, for quantizers that ran elsewhere.
fn int8_diff(t: &TensorRef, q: &[i8], scales: &[f32], per_row: bool) -> Diff {
    let (_, row_len) = t.rows();
    let seg_len = if per_row { row_len } else { usize::MAX };
    let parts: Vec<Diff> = with_codec!(t.dtype, C => q
    .par_chunks(CPU_BLOCK)
    .enumerate()
    .map(|(b, qb)| fast!({
        let mut d = Diff::default();
        let start = b * CPU_BLOCK;
        for (row, seg) in row_segments(start..start + qb.len(), seg_len) {
            let s = scales[if per_row { row } else { 0 }];
            for i in seg {
                let y = C::to_f32(C::from_f32(qb[i - start] as f32 * s));
                d.add(C::to_f32(C::read(t.data, i)), y);
            }
        }
        d
    }))
    .collect());
    Diff::sum(parts)
}

fn quantize_gpu(
    g: &Gpu,
    t: &TensorRef,
    mults: &[f32],
    per_row: bool,
    qmin: i32,
    qmax: i32,
) -> Result<(Vec<i8>, QuantStats)> {
    let n = t.numel();
    let es = t.dtype.size();
    // Per tensor, every element uses multiplier 0: rows do not matter.
    let row_len = if per_row { t.rows().1 } else { 1 };
    let mut q = vec![0i8; n];
    let mut st = QuantStats::default();
    if n == 0 {
        return Ok((q, st));
    }
    check_row_len(row_len)?;
    let per_elem = if per_row {
        (es as f64).max(row_vector_bytes_per_elem(row_len))
    } else {
        es as f64
    };
    let ce = chunk_elems(g, n, per_elem, 8)?;
    let mult_cap = if per_row { ce / row_len + 2 } else { 1 };
    let layout = StreamLayout {
        inputs: vec![(ce * es) as u64, (mult_cap * 4) as u64],
        outputs: vec![(ce as u64, false), (8, true)],
    };
    let pipeline = g
        .ctx
        .pipeline(Kernel::QuantizeI8, t.dtype.shader_code(), 0)?;
    let ranges: Vec<_> = chunks(n, ce).collect();
    let jobs = ranges.iter().map(|r| {
        let cr = chunk_rows(r, row_len);
        let m = if per_row {
            &mults[cr.first_row..cr.first_row + cr.rows]
        } else {
            mults
        };
        Chunk {
            params: params(&QuantParams {
                n: r.len() as u32,
                row_len: row_len as u32,
                col0: cr.col0 as u32,
                per_row: per_row as u32,
                qmin,
                qmax,
                ..Default::default()
            }),
            inputs: vec![
                (&t.data[r.start * es..r.end * es]).into(),
                f32_bytes(m).into(),
            ],
            read: vec![r.len() as u64, 8],
            workgroups: g.ctx.workgroups_for(r.len().div_ceil(4) as u64),
        }
    });
    g.ctx.stream(&pipeline, &layout, jobs, |k, outs| {
        let r = &ranges[k];
        q[r.clone()].copy_from_slice(bytemuck::cast_slice(outs[0]));
        st.clipped += u32_at(outs[1], 0) as u64;
        st.nan += u32_at(outs[1], 1) as u64;
        Ok(())
    })?;
    Ok((q, st))
}

/// w = q·scale, written in `dtype`.
pub fn dequantize(dev: &Device, q: &QTensor, dtype: DType) -> Result<Tensor> {
    dtype.require_float("dequantize")?;
    q.check()?;
    let (_, row_len) = crate::tensor::matrix_view(&q.shape);
    match dev {
        Device::Cpu => {
            let mut out = Tensor::zeros(dtype, &q.shape);
            let seg_len = if q.is_per_row() { row_len } else { usize::MAX };
            with_codec!(dtype, O => out.data
            .par_chunks_mut(CPU_BLOCK * O::SIZE)
            .zip(q.q.par_chunks(CPU_BLOCK))
            .enumerate()
            .for_each(|(b, (ob, qb))| {
                let start = b * CPU_BLOCK;
                for (row, seg) in row_segments(start..start + qb.len(), seg_len) {
                    let s = q.scales[if q.is_per_row() { row } else { 0 }];
                    for i in seg {
                        O::write(ob, i - start, O::from_f32(qb[i - start] as f32 * s));
                    }
                }
            }));
            Ok(out)
        }
        Device::Gpu(g) => dequantize_gpu(g, q, dtype, if q.is_per_row() { row_len } else { 1 }),
    }
}

fn dequantize_gpu(g: &Gpu, q: &QTensor, dtype: DType, row_len: usize) -> Result<Tensor> {
    let n = q.numel();
    let es = dtype.size();
    let mut out = Tensor::zeros(dtype, &q.shape);
    if n == 0 {
        return Ok(out);
    }
    check_row_len(row_len)?;
    let per_elem = if q.is_per_row() {
        (es as f64).max(row_vector_bytes_per_elem(row_len))
    } else {
        es as f64
    };
    let ce = chunk_elems(g, n, per_elem, 8)?;
    let scale_cap = if q.is_per_row() { ce / row_len + 2 } else { 1 };
    let layout = StreamLayout {
        inputs: vec![ce as u64, (scale_cap * 4) as u64],
        outputs: vec![((ce * es) as u64, false)],
    };
    let pipeline = g
        .ctx
        .pipeline(Kernel::DequantizeI8, dtype.shader_code(), 0)?;
    let ranges: Vec<_> = chunks(n, ce).collect();
    let bytes: &[u8] = bytemuck::cast_slice(&q.q);
    let jobs = ranges.iter().map(|r| {
        let cr = chunk_rows(r, row_len);
        let s = if q.is_per_row() {
            &q.scales[cr.first_row..cr.first_row + cr.rows]
        } else {
            &q.scales[..]
        };
        Chunk {
            params: params(&DequantParams {
                n: r.len() as u32,
                row_len: row_len as u32,
                col0: cr.col0 as u32,
                per_row: q.is_per_row() as u32,
            }),
            inputs: vec![(&bytes[r.clone()]).into(), f32_bytes(s).into()],
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

/// The tensor in another float dtype, rounding to nearest even (exactly as
/// the `half` crate converts).
pub fn convert(dev: &Device, t: &TensorRef, dtype: DType) -> Result<Tensor> {
    convert_diff(dev, t, dtype).map(|(t, _)| t)
}

/// `convert`, with the rounding's `Diff` from the same pass.
pub fn convert_diff(dev: &Device, t: &TensorRef, dtype: DType) -> Result<(Tensor, Diff)> {
    t.check_float("convert")?;
    dtype.require_float("convert")?;
    if dtype == t.dtype {
        return Ok((t.to_owned(), super::diff::diff(t, t)));
    }
    match dev {
        Device::Cpu => Ok(with_codec!(t.dtype, I => with_codec!(dtype, O => {
            let (out, [], d) =
                cpu_map::<I, O, 0>(t, dtype, |_, raw| (O::from_f32(I::to_f32(raw)), []));
            (out, d)
        }))),
        Device::Gpu(g) => {
            let codes = (t.dtype.shader_code(), dtype.shader_code());
            let (out, [], d) =
                gpu_map(g, Kernel::Convert, codes, &[t], dtype, |n| ConvertParams {
                    n: n as u32,
                    ..Default::default()
                })?;
            Ok((out, d))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::DType;

    #[test]
    fn the_branchless_cpu_path_follows_the_plain_rule() {
        let mut v: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            -0.5,
            1.5,
            2.5,
            -2.5,
            126.5,
            127.5,
            -127.5,
            -128.5,
            1e30,
            -1e30,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(1),
            -f32::from_bits(0x7fffff),
            f32::MIN_POSITIVE,
        ];
        let mut rng = crate::tools::sample::Rng::new(7);
        v.extend((0..5000).map(|_| (rng.normal() * 100.0) as f32));
        for &(m, qmin, qmax) in &[(1.0f32, -128, 127), (0.37, -127, 127), (0.0, -127, 127)] {
            let t = crate::tensor::Tensor::from_f32(DType::F32, &[v.len()], &v).unwrap();
            let (q, st) = quantize_cpu(&t.view(), &[m], &[1.0], false, qmin, qmax);
            let mut want = QuantStats::default();
            for (i, &x) in v.iter().enumerate() {
                let (qi, s) = quantize_one(x.to_bits(), m, qmin, qmax);
                assert_eq!(q[i], qi, "{x} · {m}");
                want.clipped += s.clipped;
                want.nan += s.nan;
            }
            assert_eq!((st.clipped, st.nan), (want.clipped, want.nan), "m = {m}");
        }
    }
}
