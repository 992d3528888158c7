//! The last pass of the methods whose result is a sum of inputs times
//! coefficients (`linear`, `passthrough`, `slerp`, `nuslerp`,
//! `model_stock`, `karcher`, `multislerp`) and of `nearswap`, on the GPU
//! (`merge_sum` in shaders/merge.wgsl). The host finds the coefficients as
//! the CPU reference does (the norms and dot products summed in f64, which
//! WGSL lacks, so the coefficients are the same bits); the kernel repeats
//! the reference's f32 arithmetic in its order. A chunk that meets a NaN or
//! an infinity makes the caller run the CPU pass.

use super::geometry::Layout;
use crate::device::{Chunk, Gpu, StreamLayout};
use crate::error::Result;
use crate::ops::diff::Diff;
use crate::ops::kernels::Kernel;
use crate::ops::{chunk_diff, chunk_elems, params, slots, u32_at};
use crate::tensor::{DType, Tensor, TensorRef};

kernel_params!(SumParams {
    n: u32,
    k: u32,
    stride: u32,
    flags: u32,
    init_bits: u32,
    div_bits: u32,
    t_bits: u32,
    cast_dt: u32,
    vectors: u32,
    vlen: u32,
    offset: u32,
    _pad0: u32,
});

const HAS_BASE: u32 = 1;
const DELTA: u32 = 2;
const DIVIDE: u32 = 4;
const BLEND: u32 = 8;
const NEARSWAP: u32 = 16;

/// Most terms one dispatch sums (the host's coefficient table stays small).
const MAX_TERMS: usize = 64;

/// What a method's last pass computes, per element e of vector v:
/// acc = `init`; acc += c[v][i]·xᵢ over `terms` (xᵢ − base when `delta`);
/// acc /= `divide`; y = p[v]·acc + q[v]·base when `blend`, else acc. With
/// `nearswap` (t), NearSwap of the base towards the one term instead.
pub(crate) struct Sum<'t, 'a> {
    /// The figures (`Diff`) are against this input.
    pub first: &'t TensorRef<'a>,
    pub base: Option<&'t TensorRef<'a>>,
    pub terms: &'t [TensorRef<'a>],
    /// Terms are xᵢ − base.
    pub delta: bool,
    /// 0.0 or −0.0 (−0 + x is x exactly, −0 included).
    pub init: f32,
    pub divide: Option<f32>,
    /// Per vector: k coefficients, then p and q (read when `blend`).
    pub coefs: Vec<f32>,
    pub layout: Layout,
    pub blend: bool,
    pub nearswap: Option<f32>,
}

impl<'t, 'a> Sum<'t, 'a> {
    /// Σ cᵢ·xᵢ with one set of coefficients for the whole tensor.
    /// Sums from `init`, without a base.
    pub(crate) fn whole(
        first: &'t TensorRef<'a>,
        terms: &'t [TensorRef<'a>],
        c: &[f32],
        init: f32,
    ) -> Self {
        let mut coefs = c.to_vec();
        coefs.extend([1.0, 1.0]);
        Sum {
            first,
            base: None,
            terms,
            delta: false,
            init,
            divide: None,
            coefs,
            layout: Layout::Whole,
            blend: false,
            nearswap: None,
        }
    }

    /// NearSwap of `base` towards `b` at `t`.
    pub(crate) fn nearswap(base: &'t TensorRef<'a>, b: &'t TensorRef<'a>, t: f32) -> Self {
        Sum {
            base: Some(base),
            nearswap: Some(t),
            ..Sum::whole(base, std::slice::from_ref(b), &[0.0], 0.0)
        }
    }
}

/// Runs `s` on `g`; None when an input or coefficient is NaN or infinite,
/// or the table does not fit a chunk (then the CPU pass runs).
pub(crate) fn sum(
    g: &Gpu,
    s: &Sum,
    cast: Option<DType>,
    out: DType,
) -> Result<Option<(Tensor, Diff)>> {
    let mut ts: Vec<TensorRef> = s.base.into_iter().copied().collect();
    ts.extend(s.terms.iter().copied());
    let flag = |on: bool, bit: u32| if on { bit } else { 0 };
    let flags = flag(s.base.is_some(), HAS_BASE)
        | flag(s.delta, DELTA)
        | flag(s.divide.is_some(), DIVIDE)
        | flag(s.blend, BLEND)
        | flag(s.nearswap.is_some(), NEARSWAP);
    let (first, k, t) = (s.first, s.terms.len(), s.nearswap.unwrap_or(0.0));
    let n = first.numel();
    let dt = first.dtype;
    let width = k + 2;
    if n == 0
        || k > MAX_TERMS
        || ts.iter().any(|x| x.dtype != dt)
        || s.coefs.iter().any(|c| !c.is_finite())
        || !t.is_finite()
        || matches!(s.layout, Layout::Rows(v) | Layout::Strided(v) if v >= 1 << 31)
    {
        return Ok(None);
    }
    let (es, eo) = (dt.size(), out.size());
    let table = (width * 4) as f64;
    // Bytes of coefficients per element, and the table's fixed part.
    let (per_elem, fixed) = match s.layout {
        Layout::Whole => (0.0, table),
        Layout::Rows(l) => (table / l as f64, 2.0 * table),
        Layout::Strided(st) => (0.0, st as f64 * table),
    };
    let Ok(ce) = chunk_elems(
        g,
        n,
        (ts.len() * es + eo) as f64 + per_elem,
        fixed as u64 + 256,
    ) else {
        return Ok(None);
    };
    let (code, vlen) = match s.layout {
        Layout::Whole => (0u32, 1usize),
        Layout::Rows(l) => (1, l),
        Layout::Strided(st) => (2, st),
    };
    let table_words = match s.layout {
        Layout::Whole => width,
        Layout::Rows(l) => (ce / l + 2) * width,
        Layout::Strided(st) => st * width,
    };
    let layout = StreamLayout {
        inputs: vec![(ts.len() * ce * es) as u64, (table_words * 4) as u64],
        outputs: vec![((ce * eo).next_multiple_of(4) as u64, false), (4, true)],
    };
    let pipeline = g
        .ctx
        .pipeline(Kernel::MergeSum, dt.shader_code(), out.shader_code())?;
    let ranges: Vec<_> = crate::ops::chunks(n, ce).collect();
    let stride = ce * es / 4;
    let jobs = ranges.iter().map(|r| {
        // This chunk's part of the table, and where the chunk starts in it.
        let (rows, offset) = match s.layout {
            Layout::Whole => (0..1, 0),
            Layout::Rows(l) => (r.start / l..(r.end - 1) / l + 1, r.start % l),
            Layout::Strided(st) => (0..st, r.start % st),
        };
        let coefs = &s.coefs[rows.start * width..rows.end * width];
        Chunk {
            params: params(&SumParams {
                n: r.len() as u32,
                k: k as u32,
                stride: stride as u32,
                flags,
                init_bits: s.init.to_bits(),
                div_bits: s.divide.unwrap_or(1.0).to_bits(),
                t_bits: t.to_bits(),
                cast_dt: cast.map_or(3, |c| c.shader_code()),
                vectors: code,
                vlen: vlen as u32,
                offset: offset as u32,
                ..Default::default()
            }),
            inputs: vec![
                slots(&ts, r.clone(), ce),
                bytemuck::cast_slice(coefs).to_vec().into(),
            ],
            read: vec![(r.len() * eo).next_multiple_of(4) as u64, 4],
            workgroups: g.ctx.workgroups_for((r.len() * eo).div_ceil(4) as u64),
        }
    });
    gather(g, &pipeline, &layout, jobs, &ranges, first, out)
}

/// Streams `jobs` (chunks `ranges` of a tensor shaped like `first`) whose
/// outputs are the result in `out` and a flag word set where an input was
/// NaN or infinite: the tensor and its figures against `first`, or None
/// when any chunk raised the flag.
pub(super) fn gather<'a>(
    g: &Gpu,
    pipeline: &wgpu::ComputePipeline,
    layout: &StreamLayout,
    jobs: impl IntoIterator<Item = Chunk<'a>>,
    ranges: &[std::ops::Range<usize>],
    first: &TensorRef,
    out: DType,
) -> Result<Option<(Tensor, Diff)>> {
    let eo = out.size();
    let mut tensor = Tensor::for_overwrite(out, first.shape);
    let mut d = Diff::default();
    let mut clean = true;
    g.ctx.stream(pipeline, layout, jobs, |c, outs| {
        let r = &ranges[c];
        if u32_at(outs[1], 0) != 0 {
            clean = false;
            return Ok(());
        }
        let chunk = &mut tensor.data[r.start * eo..r.end * eo];
        chunk.copy_from_slice(&outs[0][..chunk.len()]);
        d = d.merge(chunk_diff(&[first], r.clone(), out, chunk));
        Ok(())
    })?;
    Ok(clean.then_some((tensor, d)))
}
