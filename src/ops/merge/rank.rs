//! Exact rank cuts over keys computed on the fly (|δ| of a delta that is
//! never stored): the radix select of `select`, fed by a closure, with the
//! ties before each block counted so that blocks can be decided in
//! parallel and still take ties in flat order.

use crate::error::Result;
use crate::ops::select::{find_cut, Cut, Level};
use crate::ops::CPU_BLOCK;
use rayon::prelude::*;
use std::ops::Range;

const BINS: usize = 1 << 16;

/// Fills `keys` with the keys of elements `r` (in order).
pub(crate) type Keys<'a> = dyn Fn(Range<usize>, &mut Vec<u32>) + Sync + 'a;

/// The k smallest of n keys by (key, flat index).
pub(crate) struct Smallest {
    cut: Cut,
    /// Per block of `CPU_BLOCK` elements: keys equal to the cut before it.
    ties_before: Vec<u64>,
}

impl Smallest {
    /// The k smallest of the `n` keys that `keys` gives.
    pub(crate) fn find(n: usize, k: u64, keys: &Keys) -> Result<Smallest> {
        let blocks = n.div_ceil(CPU_BLOCK);
        let range = |b: usize| b * CPU_BLOCK..((b + 1) * CPU_BLOCK).min(n);
        let hist = |level: Level| -> Result<Vec<u64>> {
            Ok((0..blocks)
                .into_par_iter()
                .fold(
                    || (vec![0u64; BINS], Vec::new()),
                    |(mut h, mut buf), b| {
                        keys(range(b), &mut buf);
                        for &k in &buf {
                            match level {
                                Level::High => h[(k >> 16) as usize] += 1,
                                Level::Low(hb) if k >> 16 == hb => h[(k & 0xffff) as usize] += 1,
                                Level::Low(_) => {}
                            }
                        }
                        (h, buf)
                    },
                )
                .map(|(h, _)| h)
                .reduce(
                    || vec![0u64; BINS],
                    |mut a, b| {
                        a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                        a
                    },
                ))
        };
        let cut = find_cut(k, true, hist)?;
        let equal: Vec<u64> = (0..blocks)
            .into_par_iter()
            .map_init(Vec::new, |buf, b| {
                keys(range(b), buf);
                buf.iter().filter(|&&k| k == cut.key).count() as u64
            })
            .collect();
        let mut ties_before = Vec::with_capacity(blocks);
        let mut seen = 0u64;
        for e in equal {
            ties_before.push(seen);
            seen += e;
        }
        Ok(Smallest { cut, ties_before })
    }

    /// Keys equal to the cut before block `b` (the first tie rank there).
    pub(crate) fn ties_before(&self, b: usize) -> u64 {
        self.ties_before.get(b).copied().unwrap_or(0)
    }

    /// Whether a key is among the k smallest; `tie` counts the keys equal
    /// to the cut met before it in flat order, and is advanced past it.
    #[inline(always)]
    pub(crate) fn contains(&self, key: u32, tie: &mut u64) -> bool {
        if key == self.cut.key {
            *tie += 1;
            *tie <= self.cut.ties
        } else {
            key < self.cut.key
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equals_a_sort_by_key_then_index() {
        let mut rng = crate::tools::sample::Rng::new(5);
        for n in [0usize, 1, 7, CPU_BLOCK + 3, 3 * CPU_BLOCK] {
            // Few distinct keys: ties everywhere, across block boundaries.
            let keys: Vec<u32> = (0..n)
                .map(|i| {
                    if i % 3 == 0 {
                        (rng.uniform() * 5.0) as u32
                    } else {
                        rng.uniform().to_bits() as u32
                    }
                })
                .collect();
            let f = |r: Range<usize>, buf: &mut Vec<u32>| {
                buf.clear();
                buf.extend_from_slice(&keys[r]);
            };
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| (keys[i], i));
            for k in [0, 1, n / 3, n / 2, n].into_iter().filter(|&k| k <= n) {
                let s = Smallest::find(n, k as u64, &f).unwrap();
                let mut want = vec![false; n];
                order[..k].iter().for_each(|&i| want[i] = true);
                let mut got = vec![false; n];
                for b in 0..n.div_ceil(CPU_BLOCK) {
                    let mut tie = s.ties_before(b);
                    for i in b * CPU_BLOCK..((b + 1) * CPU_BLOCK).min(n) {
                        got[i] = s.contains(keys[i], &mut tie);
                    }
                }
                assert_eq!(got, want, "n={n} k={k}");
            }
        }
    }
}
