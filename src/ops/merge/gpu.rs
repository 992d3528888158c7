//! The task-arithmetic chain's combining pass on the GPU
//! (`shaders/merge.wgsl`): the host finds the rank cuts and the rescaling
//! factors as the CPU reference does (so every mask is the same), and each
//! mask becomes a per-element test the kernel can make in any chunk: a
//! draw of the counter-based generator, a |δ| key below a cut (or equal to
//! it up to the flat index of the cut's last tie), or DELLA's bits.
//!
//! The kernel's arithmetic is the reference's, in the same order; a GPU may
//! fuse the final multiply-add, so values agree within a few ulps of the
//! operands (tests/merge_gpu.rs states the bound) and the kept counts
//! exactly. A chunk that meets a NaN or an infinity (which WGSL does not
//! promise to handle) makes the caller run the CPU pass instead.

use super::rank::{Keys, Smallest};
use super::{delta_keys, Gta, Mask, Term};
use crate::device::{Chunk, Gpu, StreamLayout};
use crate::error::Result;
use crate::ops::diff::Diff;
use crate::ops::kernels::Kernel;
use crate::ops::{chunk_diff, chunk_elems, params, slots, u32_at};
use crate::tensor::{DType, Tensor, TensorRef};

/// Most models one dispatch combines (the kernel's per-element arrays).
pub(crate) const MAX_GPU_MODELS: usize = 16;

/// Words of one `GtaTerm` in the WGSL.
const TERM_WORDS: usize = 12;

kernel_params!(SceParams {
    n: u32,
    k: u32,
    stride: u32,
    start_lo: u32,
    start_hi: u32,
    cast_dt: u32,
    masked: u32,
    key: u32,
    has_last: u32,
    last_lo: u32,
    last_hi: u32,
    _pad0: u32,
});

kernel_params!(GtaParams {
    n: u32,
    k: u32,
    stride: u32,
    start_lo: u32,
    start_hi: u32,
    flags: u32,
    lambda_bits: u32,
    divisor_bits: u32,
    cast_dt: u32,
    bits_row: u32,
    bits_words: u32,
    _pad0: u32,
});

/// A rank cut as the kernel tests it: the key, and the flat index of the
/// last tie it takes (None when it takes none).
fn cut_of(
    s: &Smallest,
    n: usize,
    base: &TensorRef,
    x: &TensorRef,
    cast: Option<DType>,
) -> (u32, Option<u64>) {
    let last = s.last_tie(n, &|r, out: &mut Vec<u32>| {
        delta_keys(base, x, r, cast, out)
    });
    (s.key(), last)
}

/// What the combining pass returns: the output, its figures against the
/// base, and per model how many elements' deltas reached the sum.
pub(crate) type Combined = (Tensor, Diff, Vec<u64>);

/// Runs the combining pass on `g`; None when the inputs hold a NaN or an
/// infinity, or the masks cannot be laid out in chunks (then the CPU pass
/// runs).
#[allow(clippy::too_many_arguments)]
pub(crate) fn combine(
    g: &Gpu,
    ts: &[TensorRef],
    terms: &[Term],
    masks: &[Mask],
    scale: &[f32],
    gta: &Gta,
    divisor: f32,
    cast: Option<DType>,
    out: DType,
) -> Result<Option<Combined>> {
    let base = &ts[0];
    let k = terms.len();
    let n = base.numel();
    let dt = base.dtype;
    if k > MAX_GPU_MODELS || ts.iter().any(|t| t.dtype != dt) || n == 0 {
        return Ok(None);
    }
    // DELLA's bits: whole rows per chunk, so that chunks start on a row.
    let bit_rows = masks.iter().find_map(|m| match m {
        Mask::Bits { row_len, words, .. } => Some((*row_len, *words)),
        _ => None,
    });
    if bit_rows.is_some() && n >= 1 << 32 {
        return Ok(None);
    }
    let (es, eo) = (dt.size(), out.size());
    let bits_per_elem = if bit_rows.is_some() {
        k as f64 / 8.0 + 1.0
    } else {
        0.0
    };
    // Chunks too small for 64 elements of every input: the CPU pass.
    let Ok(mut ce) = chunk_elems(
        g,
        n,
        ((k + 1) * es + eo) as f64 + bits_per_elem,
        (TERM_WORDS * 4 * k + 256) as u64,
    ) else {
        return Ok(None);
    };
    if let Some((row_len, _)) = bit_rows {
        let align = row_len * 64 / gcd(row_len, 64);
        ce = ce / align * align;
        if ce == 0 {
            return Ok(None);
        }
    }
    // The cuts' keys and last ties, found once for the whole tensor.
    let mut cut_terms: Vec<[u32; TERM_WORDS]> = Vec::with_capacity(k);
    for (i, m) in masks.iter().enumerate() {
        let x = &ts[i + 1];
        let mut w = [0u32; TERM_WORDS];
        w[4] = terms[i].weight.to_bits();
        w[5] = scale[i].to_bits();
        let set_last = |w: &mut [u32; TERM_WORDS], slot: usize, last: Option<u64>| {
            if let Some(l) = last {
                w[6 + 2 * slot] = l as u32;
                w[7 + 2 * slot] = (l >> 32) as u32;
                w[10] |= 1 << slot;
            }
        };
        match m {
            Mask::All => {}
            Mask::Random { key, p } => {
                w[0] = 1;
                w[1] = *key;
                w[3] = p.to_bits();
            }
            Mask::Above(s) => {
                w[0] = 2;
                let (key, last) = cut_of(s, n, base, x, cast);
                w[1] = key;
                set_last(&mut w, 0, last);
            }
            Mask::Between(lo, hi) => {
                w[0] = 3;
                let (k0, l0) = cut_of(lo, n, base, x, cast);
                let (k1, l1) = cut_of(hi, n, base, x, cast);
                w[1] = k0;
                w[2] = k1;
                set_last(&mut w, 0, l0);
                set_last(&mut w, 1, l1);
            }
            Mask::Bits { .. } => w[0] = 4,
        }
        cut_terms.push(w);
    }
    let stride = ce * es / 4;
    let bit_words_per_model = bit_rows.map_or(1, |(row_len, words)| ce / row_len * words * 2);
    let layout = StreamLayout {
        inputs: vec![
            ((k + 1) * ce * es) as u64,
            (TERM_WORDS * 4 * k) as u64,
            (bit_words_per_model * 4 * k.max(1)) as u64,
        ],
        outputs: vec![
            ((ce * eo).next_multiple_of(4) as u64, false),
            (((MAX_GPU_MODELS + 1) * 4) as u64, true),
        ],
    };
    let pipeline = g
        .ctx
        .pipeline(Kernel::GtaCombine, dt.shader_code(), out.shader_code())?;
    let ranges: Vec<_> = crate::ops::chunks(n, ce).collect();
    let flags = u32::from(gta.consensus) | (u32::from(gta.normalize) << 1);
    let jobs = ranges.iter().map(|r| {
        let mut term_words: Vec<u32> = Vec::with_capacity(TERM_WORDS * k);
        let mut bits: Vec<u8> = Vec::new();
        for (i, m) in masks.iter().enumerate() {
            let mut w = cut_terms[i];
            if let Mask::Bits {
                row_len,
                words,
                bits: b,
            } = m
            {
                // This chunk's rows of this model's bits, as u32 words.
                let (r0, r1) = (r.start / row_len, r.end.div_ceil(*row_len));
                w[11] = (bits.len() / 4) as u32;
                for q in &b[r0 * words..r1 * words] {
                    bits.extend_from_slice(&q.to_le_bytes());
                }
            }
            term_words.extend_from_slice(&w);
        }
        if bits.is_empty() {
            bits.resize(4, 0);
        }
        Chunk {
            params: params(&GtaParams {
                n: r.len() as u32,
                k: k as u32,
                stride: stride as u32,
                start_lo: r.start as u32,
                start_hi: (r.start as u64 >> 32) as u32,
                flags,
                lambda_bits: gta.lambda.to_bits(),
                divisor_bits: divisor.to_bits(),
                cast_dt: cast.map_or(3, |c| c.shader_code()),
                bits_row: bit_rows.map_or(1, |b| b.0) as u32,
                bits_words: bit_rows.map_or(0, |b| b.1) as u32,
                ..Default::default()
            }),
            inputs: vec![
                slots(ts, r.clone(), ce),
                bytemuck::cast_slice(&term_words).to_vec().into(),
                bits.into(),
            ],
            read: vec![
                (r.len() * eo).next_multiple_of(4) as u64,
                ((MAX_GPU_MODELS + 1) * 4) as u64,
            ],
            workgroups: g.ctx.workgroups_for((r.len() * eo).div_ceil(4) as u64),
        }
    });
    let mut t = Tensor::for_overwrite(out, base.shape);
    let mut d = Diff::default();
    let mut kept = vec![0u64; k];
    let mut clean = true;
    g.ctx.stream(&pipeline, &layout, jobs, |c, outs| {
        let r = &ranges[c];
        if u32_at(outs[1], MAX_GPU_MODELS) != 0 {
            clean = false;
            return Ok(());
        }
        let chunk = &mut t.data[r.start * eo..r.end * eo];
        chunk.copy_from_slice(&outs[0][..chunk.len()]);
        d = d.merge(chunk_diff(&[base], r.clone(), out, chunk));
        for (i, c) in kept.iter_mut().enumerate() {
            *c += u32_at(outs[1], i) as u64;
        }
        Ok(())
    })?;
    Ok(clean.then_some((t, d, kept)))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// SCE's last pass on `g` (`sce_combine`): `cut` drops the elements whose
/// deltas' variance (`keys`) is among the smallest; the models' `weights`
/// found on the host. None as `combine`.
pub(crate) fn sce_combine(
    g: &Gpu,
    ts: &[TensorRef],
    cut: Option<(&Smallest, &Keys)>,
    weights: &[f32],
    cast: Option<DType>,
    out: DType,
) -> Result<Option<(Tensor, Diff)>> {
    let base = &ts[0];
    let k = ts.len() - 1;
    let n = base.numel();
    let dt = base.dtype;
    if k == 0
        || k > MAX_GPU_MODELS
        || n == 0
        || ts.iter().any(|t| t.dtype != dt)
        || weights.iter().any(|w| !w.is_finite())
    {
        return Ok(None);
    }
    let (es, eo) = (dt.size(), out.size());
    let Ok(ce) = chunk_elems(g, n, ((k + 1) * es + eo) as f64, 4 * k as u64 + 256) else {
        return Ok(None);
    };
    let (key, last) = match cut {
        Some((s, keys)) => (s.key(), s.last_tie(n, keys)),
        None => (0, None),
    };
    let layout = StreamLayout {
        inputs: vec![((k + 1) * ce * es) as u64, 4 * k as u64],
        outputs: vec![((ce * eo).next_multiple_of(4) as u64, false), (4, true)],
    };
    let pipeline = g
        .ctx
        .pipeline(Kernel::SceCombine, dt.shader_code(), out.shader_code())?;
    let ranges: Vec<_> = crate::ops::chunks(n, ce).collect();
    let (has_last, last) = (u32::from(last.is_some()), last.unwrap_or(0));
    let jobs = ranges.iter().map(|r| Chunk {
        params: params(&SceParams {
            n: r.len() as u32,
            k: k as u32,
            stride: (ce * es / 4) as u32,
            start_lo: r.start as u32,
            start_hi: (r.start as u64 >> 32) as u32,
            cast_dt: cast.map_or(3, |c| c.shader_code()),
            masked: u32::from(cut.is_some()),
            key,
            has_last,
            last_lo: last as u32,
            last_hi: (last >> 32) as u32,
            ..Default::default()
        }),
        inputs: vec![
            slots(ts, r.clone(), ce),
            bytemuck::cast_slice(weights).to_vec().into(),
        ],
        read: vec![(r.len() * eo).next_multiple_of(4) as u64, 4],
        workgroups: g.ctx.workgroups_for((r.len() * eo).div_ceil(4) as u64),
    });
    super::gpu_sum::gather(g, &pipeline, &layout, jobs, &ranges, base, out)
}
