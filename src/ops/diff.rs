//! How an operation's output differs from its input: the figures a job's
//! report gives (max |Δ|, RMSE, relative L2, zeros, non-finite values),
//! accumulated element by element inside the operation's own pass, so that
//! the report costs no pass over the tensors of its own. `diff` is the
//! standalone pass for operations that cannot fuse it.

use super::codec::{with_codec, Codec};
use super::CPU_BLOCK;
use crate::tensor::TensorRef;
use rayon::prelude::*;

/// Figures of an output `y` against its input `x` (same shape).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Diff {
    /// Elements compared.
    pub elements: u64,
    /// max |y − x| over the pairs with a finite x and a finite difference.
    pub max_abs: f64,
    /// Σ (y − x)² over the same pairs.
    pub sum_sq: f64,
    /// Σ x² over the finite x.
    pub sum_x2: f64,
    /// Zeros in y.
    pub zeros: u64,
    /// NaN and infinite values in x.
    pub nonfinite_in: u64,
    /// NaN and infinite values in y.
    pub nonfinite_out: u64,
    /// NaN and infinite values in the operation's other inputs (a delta, the
    /// other models of a mix).
    pub nonfinite_other: u64,
}

impl Diff {
    /// Adds the pair (x, y): f64 arithmetic, non-finite x left out of the
    /// error.
    #[inline(always)]
    pub fn add(&mut self, x: f32, y: f32) {
        self.elements += 1;
        self.zeros += (y == 0.0) as u64;
        self.nonfinite_out += !y.is_finite() as u64;
        if !x.is_finite() {
            self.nonfinite_in += 1;
            return;
        }
        let x = x as f64;
        let d = (y as f64 - x).abs();
        self.sum_x2 += x * x;
        if d.is_finite() {
            self.max_abs = self.max_abs.max(d);
            self.sum_sq += d * d;
        }
    }

    /// Adds a block of pairs: `x` and `y` hold the same number of elements
    /// in codecs `I` and `O`. Eight f32 lanes keep the loop vectorizable;
    /// the block's sums join the f64 totals once (a block is at most
    /// `CPU_BLOCK` elements, so each lane sums a few thousand terms).
    /// Compiled apart (small enough for the vectorizer) and for AVX2 where
    /// the CPU has it.
    #[inline(never)]
    pub(crate) fn add_block<I: Codec, O: Codec>(&mut self, x: &[u8], y: &[u8]) {
        super::simd::run(
            #[inline(always)]
            || self.add_block_here::<I, O>(x, y),
        )
    }

    #[inline(always)]
    fn add_block_here<I: Codec, O: Codec>(&mut self, x: &[u8], y: &[u8]) {
        let n = (x.len() / I::SIZE).min(y.len() / O::SIZE);
        let whole = n / LANES * LANES;
        let mut lanes = Lanes::default();
        for (xc, yc) in x[..whole * I::SIZE]
            .chunks_exact(I::SIZE * LANES)
            .zip(y[..whole * O::SIZE].chunks_exact(O::SIZE * LANES))
        {
            for l in 0..LANES {
                lanes.add(l, I::to_f32(I::read(xc, l)), O::to_f32(O::read(yc, l)));
            }
        }
        lanes.into_diff(self, whole);
        for i in whole..n {
            self.add(I::to_f32(I::read(x, i)), O::to_f32(O::read(y, i)));
        }
    }

    /// `add_block` over decoded values.
    #[inline(never)]
    pub(crate) fn add_f32s(&mut self, x: &[f32], y: &[f32]) {
        super::simd::run(
            #[inline(always)]
            || self.add_f32s_here(x, y),
        )
    }

    #[inline(always)]
    fn add_f32s_here(&mut self, x: &[f32], y: &[f32]) {
        let n = x.len().min(y.len());
        let whole = n / LANES * LANES;
        let mut lanes = Lanes::default();
        for (xc, yc) in x[..whole]
            .chunks_exact(LANES)
            .zip(y[..whole].chunks_exact(LANES))
        {
            for l in 0..LANES {
                lanes.add(l, xc[l], yc[l]);
            }
        }
        lanes.into_diff(self, whole);
        for i in whole..n {
            self.add(x[i], y[i]);
        }
    }

    /// Counts a value of another input.
    #[inline(always)]
    pub fn other(&mut self, v: f32) {
        self.nonfinite_other += !v.is_finite() as u64;
    }

    /// Both sets of figures together (for parts of one tensor, in order).
    pub fn merge(self, o: Diff) -> Diff {
        Diff {
            elements: self.elements + o.elements,
            max_abs: self.max_abs.max(o.max_abs),
            sum_sq: self.sum_sq + o.sum_sq,
            sum_x2: self.sum_x2 + o.sum_x2,
            zeros: self.zeros + o.zeros,
            nonfinite_in: self.nonfinite_in + o.nonfinite_in,
            nonfinite_out: self.nonfinite_out + o.nonfinite_out,
            nonfinite_other: self.nonfinite_other + o.nonfinite_other,
        }
    }

    /// Figures of parts in order (deterministic sums).
    pub fn sum(parts: impl IntoIterator<Item = Diff>) -> Diff {
        parts.into_iter().fold(Diff::default(), Diff::merge)
    }

    /// √mean((y − x)²) over every element.
    pub fn rmse(&self) -> f64 {
        if self.elements > 0 {
            (self.sum_sq / self.elements as f64).sqrt()
        } else {
            0.0
        }
    }

    /// ‖y − x‖₂ / ‖x‖₂ (0 for an all-zero input).
    pub fn rel_l2(&self) -> f64 {
        if self.sum_x2 > 0.0 {
            (self.sum_sq / self.sum_x2).sqrt()
        } else {
            0.0
        }
    }

    /// The signal-to-noise ratio in dB.
    pub fn snr_db(&self) -> f64 {
        super::reduce::snr_db(self.rel_l2())
    }
}

/// Lanes of the block accumulator.
const LANES: usize = 8;

/// Per-lane f32 sums of a block (see `Diff::add_block`).
#[derive(Default)]
struct Lanes {
    sq: [f32; LANES],
    x2: [f32; LANES],
    mx: [f32; LANES],
    zeros: [u32; LANES],
    nonfinite_in: [u32; LANES],
    nonfinite_out: [u32; LANES],
}

impl Lanes {
    /// The pair (x, y) in lane `l`: `Diff::add`'s rules, in f32 and without
    /// branches.
    #[inline(always)]
    fn add(&mut self, l: usize, x: f32, y: f32) {
        // Masks instead of branches, so that the lanes vectorize.
        let finite = |v: f32| ((v.to_bits() & 0x7fff_ffff) < 0x7f80_0000) as u32;
        let keep = |v: f32, ok: u32| f32::from_bits(v.to_bits() & 0u32.wrapping_sub(ok));
        let (xfin, yfin) = (finite(x), finite(y));
        let d = (y - x).abs();
        let dd = keep(d, xfin & finite(d));
        self.mx[l] = if dd > self.mx[l] { dd } else { self.mx[l] };
        self.sq[l] += dd * dd;
        self.x2[l] += keep(x * x, xfin);
        self.zeros[l] += (y == 0.0) as u32;
        self.nonfinite_in[l] += 1 - xfin;
        self.nonfinite_out[l] += 1 - yfin;
    }

    /// Adds the lanes' sums over `n` pairs to `d`.
    fn into_diff(self, d: &mut Diff, n: usize) {
        for l in 0..LANES {
            d.max_abs = d.max_abs.max(self.mx[l] as f64);
            d.sum_sq += self.sq[l] as f64;
            d.sum_x2 += self.x2[l] as f64;
            d.zeros += self.zeros[l] as u64;
            d.nonfinite_in += self.nonfinite_in[l] as u64;
            d.nonfinite_out += self.nonfinite_out[l] as u64;
        }
        d.elements += n as u64;
    }
}

/// `approx` against `input` (same shape, float dtypes) in one parallel pass
/// on the CPU: for operations whose own pass cannot give the figures.
/// Other dtypes give empty figures.
pub fn diff(input: &TensorRef, approx: &TensorRef) -> Diff {
    diff_elements(input, approx, input.numel().min(approx.numel()))
}

/// `diff` over the first `n` elements of the two byte buffers.
pub(crate) fn diff_elements(input: &TensorRef, approx: &TensorRef, n: usize) -> Diff {
    if !(input.dtype.is_kernel_float() && approx.dtype.is_kernel_float()) {
        return Diff::default();
    }
    with_codec!(input.dtype, I => with_codec!(approx.dtype, A => {
        let parts: Vec<Diff> = (0..n.div_ceil(CPU_BLOCK))
            .into_par_iter()
            .map(|b| fast!({
                let r = b * CPU_BLOCK..((b + 1) * CPU_BLOCK).min(n);
                let mut d = Diff::default();
                d.add_block::<I, A>(
                    &input.data[r.start * I::SIZE..r.end * I::SIZE],
                    &approx.data[r.start * A::SIZE..r.end * A::SIZE],
                );
                d
            }))
            .collect();
        Diff::sum(parts)
    }))
}

/// NaN and infinite values among the elements of `bytes` (a float dtype;
/// others have none).
pub(crate) fn count_nonfinite(dtype: crate::tensor::DType, bytes: &[u8]) -> u64 {
    if !dtype.is_kernel_float() {
        return 0;
    }
    let n = bytes.len() / dtype.size();
    with_codec!(dtype, C => (0..n)
        .map(|i| !C::to_f32(C::read(bytes, i)).is_finite() as u64)
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::codec::{Bf16c, F32c};

    #[test]
    fn the_vector_path_gives_the_same_bits_as_the_plain_one() {
        let mut rng = crate::tools::sample::Rng::new(11);
        let x: Vec<f32> = (0..10_007)
            .map(|i| match i % 97 {
                0 => f32::NAN,
                1 => f32::INFINITY,
                2 => 0.0,
                _ => rng.normal() as f32,
            })
            .collect();
        let y: Vec<f32> = x
            .iter()
            .map(|v| if v.abs() < 0.5 { 0.0 } else { v * 1.01 })
            .collect();
        let (xb, yb): (&[u8], &[u8]) = (bytemuck::cast_slice(&x), bytemuck::cast_slice(&y));
        let (mut fast, mut plain) = (Diff::default(), Diff::default());
        fast.add_block::<F32c, F32c>(xb, yb);
        plain.add_block_here::<F32c, F32c>(xb, yb);
        assert_eq!(fast, plain);
        let (mut fast, mut plain) = (Diff::default(), Diff::default());
        fast.add_f32s(&x, &y);
        plain.add_f32s_here(&x, &y);
        assert_eq!(fast, plain);
        // And the lanes agree with the element-by-element rule.
        let mut one = Diff::default();
        for (&a, &b) in x.iter().zip(&y) {
            one.add(a, b);
        }
        assert_eq!(
            (one.zeros, one.nonfinite_in, one.nonfinite_out, one.elements),
            (
                fast.zeros,
                fast.nonfinite_in,
                fast.nonfinite_out,
                fast.elements
            )
        );
        assert!((one.sum_sq - fast.sum_sq).abs() <= 1e-5 * one.sum_sq);
        let b16: Vec<u8> = x
            .iter()
            .flat_map(|&v| (Bf16c::from_f32(v) as u16).to_le_bytes())
            .collect();
        let mut d = Diff::default();
        d.add_block::<Bf16c, Bf16c>(&b16, &b16);
        assert_eq!(d.sum_sq, 0.0);
    }
}
