//! DELLA's masks: within each row, every element is kept with a
//! probability that rises with the rank of its |δ|. The ranks come from a
//! stable radix sort of the row's keys (`ascending`) over only the bits in
//! which they differ, and the draws from one vectorized run per row.

use super::{delta_keys, lane_sum, rng, Gta, Mask, Term};
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};
use rayon::prelude::*;

/// The rows DELLA ranks in: the `(shape[0], rest)` view's (a 1-D tensor
/// is one row).
fn row_len(base: &TensorRef) -> usize {
    if base.shape.len() < 2 {
        base.numel()
    } else {
        base.rows().1
    }
    .max(1)
}

/// DELLA's draws: in each row of the `(shape[0], rest)` view (a 1-D tensor
/// is one row), the element of rank k by |δ| ascending (ties to the lower
/// index), of n, is kept with probability (density − ε) + k/(n − 1)·2ε.
/// Also returns Σ|δ| and the kept Σ|δ| for the rescaling (see `row_l1`).
pub(super) fn mask(
    base: &TensorRef,
    x: &TensorRef,
    term: &Term,
    g: &Gta,
    name: &str,
    model: u32,
    cast: Option<DType>,
) -> Result<(Mask, (f64, f64))> {
    let row_len = row_len(base);
    if row_len >> 32 != 0 {
        return Err(Error::input(format!(
            "{name}: DELLA ranks within rows; rows of 2³² elements or more are not supported"
        )));
    }
    let n = base.numel();
    let words = row_len.div_ceil(64);
    let mut bits = vec![0u64; (n / row_len) * words];
    let stream = rng::stream_key(g.seed, name, model);
    let low = (term.density - term.epsilon) as f32;
    let spread = (2.0 * term.epsilon) as f32;
    // The probability of each rank, the same in every row.
    let last = (row_len - 1).max(1) as f32;
    let odds: Vec<f32> = (0..row_len)
        .map(|rank| low + (rank as f32 / last) * spread)
        .collect();
    // Per row, the L1 sums the rescaling needs, taken here (rows then
    // added in order) so that no later pass reads the inputs for them.
    let mut l1 = vec![(0f64, 0f64); n / row_len];
    bits.par_chunks_mut(words)
        .zip(l1.par_iter_mut())
        .enumerate()
        .for_each_init(
            || (Vec::new(), Sorter::default(), Vec::new(), Vec::new()),
            |(keys, sorter, draws, odds_at), (row, (w, l1))| {
                let start = row * row_len;
                delta_keys(base, x, start..start + row_len, cast, keys);
                // Each element's probability put in its place, then the
                // draws compared in index order: no branch on a coin flip.
                odds_at.resize(row_len, 0.0);
                for (&o, &p) in sorter.ascending(keys).iter().zip(&odds) {
                    odds_at[o as u32 as usize] = p;
                }
                draws.resize(row_len, 0.0);
                rng::uniforms(stream, start as u64, draws);
                fast!(
                    for ((w, u), p) in w.iter_mut().zip(draws.chunks(64)).zip(odds_at.chunks(64)) {
                        *w = pack(u, p);
                    }
                );
                *l1 = row_l1(keys, draws, odds_at);
            },
        );
    let l1 = l1.iter().fold((0.0, 0.0), |a, r| (a.0 + r.0, a.1 + r.1));
    Ok((
        Mask::Bits {
            row_len,
            words,
            bits,
        },
        l1,
    ))
}

/// Σ|δ| and Σ|δ| over the kept elements (draw below its probability) of
/// one row, from the keys (|δ|'s bits), each in f64 over eight lanes as
/// `l1_sums` adds them (element e of the row into lane e % 8, the lanes
/// then added in order). The kept values are written over the draws
/// first: summed in the same loop as the select, the compiler turns the
/// select into a branch per element.
fn row_l1(keys: &[u32], draws: &mut [f32], odds: &[f32]) -> (f64, f64) {
    fast!({
        for ((u, &p), &k) in draws.iter_mut().zip(odds).zip(keys) {
            *u = f32::from_bits(k & ((*u < p) as u32).wrapping_neg());
        }
    });
    let all = lane_sum(keys.len(), |i| f32::from_bits(keys[i]));
    (all, lane_sum(draws.len(), |i| draws[i]))
}

/// Bit k set where `u[k] < p[k]`, for up to 64 elements: the compares as
/// bytes (a loop that vectorizes), each 8 of them gathered into a byte by
/// one multiply (0/1 byte i lands alone at bit 56 + i).
#[inline(always)]
fn pack(u: &[f32], p: &[f32]) -> u64 {
    let mut m = [0u8; 64];
    for ((m, u), p) in m.iter_mut().zip(u).zip(p) {
        *m = (u < p) as u8;
    }
    m.as_chunks::<8>()
        .0
        .iter()
        .enumerate()
        .fold(0, |acc, (g, c)| {
            acc | (u64::from_le_bytes(*c).wrapping_mul(0x0102_0408_1020_4080) >> 56) << (8 * g)
        })
}

/// Buffers for `ascending`, reused row after row.
#[derive(Default)]
struct Sorter {
    a: Vec<u64>,
    b: Vec<u64>,
    counts: Vec<u32>,
}

/// The widest digit a pass sorts by: 2048 counters stay in L1.
const DIGIT_BITS: u32 = 11;

impl Sorter {
    /// (key, index) pairs packed as `key << 32 | index`, in ascending
    /// order: an LSD radix sort (stable, so equal keys keep index order)
    /// over just the bits in which the keys differ, in as few passes of
    /// at most 11 bits as cover them. Fewer than 2³² keys.
    fn ascending(&mut self, keys: &[u32]) -> &[u64] {
        let Sorter { a, b, counts } = self;
        a.clear();
        a.extend(
            keys.iter()
                .enumerate()
                .map(|(j, &k)| (k as u64) << 32 | j as u64),
        );
        let (or, and) = keys.iter().fold((0u32, !0u32), |(o, n), &k| (o | k, n & k));
        let differ = or ^ and;
        if differ == 0 {
            return a;
        }
        let low = 32 + differ.trailing_zeros();
        let span = 64 - differ.leading_zeros() - low;
        let passes = span.div_ceil(DIGIT_BITS);
        let width = span.div_ceil(passes);
        let (buckets, mask) = (1usize << width, (1u64 << width) - 1);
        // Every pass's counts in one read, even and odd elements apart (two
        // chains of increments where a digit repeats, as it does), then
        // added.
        let size = buckets * passes as usize;
        counts.clear();
        counts.resize(2 * size, 0);
        let (even, odd) = counts.split_at_mut(size);
        let digit =
            |v: u64, p: u32| p as usize * buckets + (v >> (low + p * width) & mask) as usize;
        let (pairs, rest) = a.as_chunks::<2>();
        for &[v0, v1] in pairs {
            for p in 0..passes {
                even[digit(v0, p)] += 1;
                odd[digit(v1, p)] += 1;
            }
        }
        for &v in rest {
            for p in 0..passes {
                even[digit(v, p)] += 1;
            }
        }
        even.iter_mut().zip(odd.iter()).for_each(|(e, o)| *e += o);
        b.resize(a.len(), 0);
        for p in 0..passes {
            let shift = low + p * width;
            if differ as u64 >> (shift - 32) & mask == 0 {
                continue; // one digit throughout: the order stands
            }
            let c = &mut counts[p as usize * buckets..][..buckets];
            let mut at = 0;
            for x in c.iter_mut() {
                (*x, at) = (at, at + *x);
            }
            // Four elements a step: every counter read before any is
            // written, each place past those of the earlier elements with
            // the same digit (the last write to a counter is the largest),
            // so repeated digits cost one chained step, not four.
            let (quads, rest) = a.as_chunks::<4>();
            for v in quads {
                let d = v.map(|v| (v >> shift & mask) as usize);
                let same = |i: usize, j: usize| (d[i] == d[j]) as u32;
                let p = [
                    c[d[0]],
                    c[d[1]] + same(0, 1),
                    c[d[2]] + same(0, 2) + same(1, 2),
                    c[d[3]] + same(0, 3) + same(1, 3) + same(2, 3),
                ];
                for k in 0..4 {
                    c[d[k]] = p[k] + 1;
                    b[p[k] as usize] = v[k];
                }
            }
            for &v in rest {
                let d = (v >> shift & mask) as usize;
                b[c[d] as usize] = v;
                c[d] += 1;
            }
            std::mem::swap(a, b);
        }
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_sets_the_bits_of_the_draws_below() {
        for len in [0, 1, 7, 8, 9, 63, 64] {
            let u: Vec<f32> = (0..len).map(|k| ((k * 37) % 64) as f32).collect();
            let p: Vec<f32> = (0..len).map(|k| ((k * 11) % 64) as f32 + 0.5).collect();
            let want = (0..len).fold(0u64, |w, k| w | ((u[k] < p[k]) as u64) << k);
            assert_eq!(pack(&u, &p), want, "{len}");
        }
        assert_eq!(pack(&[0.0; 64], &[1.0; 64]), !0);
    }

    #[test]
    fn ascending_is_the_sorted_pairs() {
        let mut state = 0x2545_f491u32;
        let mut next = move || {
            state = rng::mix32(state.wrapping_add(0x9e37_79b9));
            state
        };
        let mut sorter = Sorter::default();
        let f = |v: f32| crate::ops::select::key(v);
        let cases: Vec<Vec<u32>> = vec![
            vec![],
            vec![7],
            vec![5; 100],
            (0..3000).map(|_| next()).collect(),
            (0..3000).map(|_| next() % 5).collect(),
            (0..1003).map(|_| (next() % 7) << 9).collect(),
            (0..6).map(|_| next() % 3).collect(),
            (0..2048).map(|_| next() & 0x7fff_0000).collect(),
            (0..2048)
                .map(|_| f((next() as i32 as f32) * 1e-12))
                .collect(),
            (0..5632)
                .map(|i| match i % 7 {
                    0 => f(f32::NAN),
                    1 => f(f32::INFINITY),
                    2 => 0,
                    _ => f((next() % 1000) as f32 * 1e-5),
                })
                .collect(),
            (0..4096)
                .map(|i| 0x3c00_0000 | (i as u32 % 3) << 20)
                .collect(),
        ];
        for keys in cases {
            let mut want: Vec<u64> = keys
                .iter()
                .enumerate()
                .map(|(j, &k)| (k as u64) << 32 | j as u64)
                .collect();
            want.sort_unstable();
            assert_eq!(sorter.ascending(&keys), want, "{} keys", keys.len());
        }
    }
}
