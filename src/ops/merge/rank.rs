//! Exact rank cuts over keys computed on the fly (|δ| of a delta that is
//! never stored): the radix select of `select`, fed by a closure, with the
//! ties before each block counted so that blocks can be decided in
//! parallel and still take ties in flat order.

use crate::error::Result;
use crate::ops::select::{find_cut, locate, Cut, Level};
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
        let all = |r: Range<usize>, bufs: &mut [Vec<u32>]| keys(r, &mut bufs[0]);
        Ok(find_many(n, 1, &[(0, k)], &all)?.remove(0))
    }

    /// The cut's key.
    pub(crate) fn key(&self) -> u32 {
        self.cut.key
    }

    /// The flat index of the last key equal to the cut that is among the k
    /// smallest (the `ties`-th in flat order), or None when none is: with
    /// it, membership is a test of one element (key below the cut, or equal
    /// to it at that index or before). Reads one block of keys.
    pub(crate) fn last_tie(&self, n: usize, keys: &Keys) -> Option<u64> {
        let ties = self.cut.ties;
        if ties == 0 {
            return None;
        }
        // The block holding it: the last with fewer ties before it.
        let b = self
            .ties_before
            .partition_point(|&t| t < ties)
            .checked_sub(1)?;
        let mut seen = self.ties_before[b];
        let mut buf = Vec::new();
        keys(b * CPU_BLOCK..((b + 1) * CPU_BLOCK).min(n), &mut buf);
        for (j, &k) in buf.iter().enumerate() {
            if k == self.cut.key {
                seen += 1;
                if seen == ties {
                    return Some((b * CPU_BLOCK + j) as u64);
                }
            }
        }
        None
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

/// Fills one key vector per model for elements `r`.
pub(crate) type AllKeys<'a> = dyn Fn(Range<usize>, &mut [Vec<u32>]) + Sync + 'a;

/// `Smallest::find` for several (model, k) requests over the keys of
/// `models` inputs that `keys` computes together: each pass (high
/// histograms, low histograms, ties per block) goes over the elements once
/// for all of them, so inputs the models share (a merge's base) are read
/// once per pass, not once per model.
pub(crate) fn find_many(
    n: usize,
    models: usize,
    requests: &[(usize, u64)],
    keys: &AllKeys,
) -> Result<Vec<Smallest>> {
    let blocks = n.div_ceil(CPU_BLOCK);
    let range = |b: usize| b * CPU_BLOCK..((b + 1) * CPU_BLOCK).min(n);
    // One pass: a histogram per (model, level) in `levels`.
    let hists = |levels: &[(usize, Level)]| -> Vec<Vec<u64>> {
        (0..blocks)
            .into_par_iter()
            .fold(
                || {
                    (
                        vec![vec![0u64; BINS]; levels.len()],
                        vec![Vec::new(); models],
                    )
                },
                |(mut h, mut buf), b| {
                    keys(range(b), &mut buf);
                    for (hist, &(m, level)) in h.iter_mut().zip(levels) {
                        add_to(hist, &buf[m], level);
                    }
                    (h, buf)
                },
            )
            .map(|(h, _)| h)
            .reduce(
                || vec![vec![0u64; BINS]; levels.len()],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(b) {
                        x.iter_mut().zip(y).for_each(|(p, q)| *p += q);
                    }
                    a
                },
            )
    };
    let high = hists(&(0..models).map(|m| (m, Level::High)).collect::<Vec<_>>());
    // The bin each request's cut falls in, where a low level is needed.
    let bins: Vec<Option<u32>> = requests
        .iter()
        .map(|&(m, k)| {
            let total: u64 = high[m].iter().sum();
            (k > 0 && k <= total).then(|| locate(&high[m], k).0)
        })
        .collect();
    let wanted: Vec<(usize, Level)> = requests
        .iter()
        .zip(&bins)
        .filter_map(|(&(m, _), b)| b.map(|hb| (m, Level::Low(hb))))
        .collect();
    let mut lows = hists(&wanted).into_iter();
    let cuts = requests
        .iter()
        .zip(&bins)
        .map(|(&(m, k), b)| {
            // Cannot fail: `wanted` has one low level per request with a bin,
            // in request order.
            let low = b.map(|_| lows.next().expect("one low histogram per bin"));
            find_cut(k, true, |level| match level {
                Level::High => Ok(high[m].clone()),
                Level::Low(_) => Ok(low.clone().unwrap_or_default()),
            })
        })
        .collect::<Result<Vec<Cut>>>()?;
    // One pass: keys equal to each cut, per block.
    let equal: Vec<Vec<u64>> = (0..blocks)
        .into_par_iter()
        .map_init(
            || vec![Vec::new(); models],
            |buf, b| {
                keys(range(b), buf);
                requests
                    .iter()
                    .zip(&cuts)
                    .map(|(&(m, _), c)| buf[m].iter().filter(|&&k| k == c.key).count() as u64)
                    .collect()
            },
        )
        .collect();
    Ok(cuts
        .into_iter()
        .enumerate()
        .map(|(r, cut)| {
            let mut seen = 0u64;
            let ties_before = equal
                .iter()
                .map(|e| {
                    let before = seen;
                    seen += e[r];
                    before
                })
                .collect();
            Smallest { cut, ties_before }
        })
        .collect())
}

fn add_to(h: &mut [u64], keys: &[u32], level: Level) {
    for &k in keys {
        match level {
            Level::High => h[(k >> 16) as usize] += 1,
            Level::Low(hb) if k >> 16 == hb => h[(k & 0xffff) as usize] += 1,
            Level::Low(_) => {}
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

    #[test]
    fn several_requests_over_several_models_share_their_passes() {
        let mut rng = crate::tools::sample::Rng::new(8);
        let n = 2 * CPU_BLOCK + 11;
        let models: Vec<Vec<u32>> = (0..2)
            .map(|_| {
                (0..n)
                    .map(|_| (rng.uniform() * 300.0) as u32 * 977)
                    .collect()
            })
            .collect();
        let all = |r: Range<usize>, bufs: &mut [Vec<u32>]| {
            for (b, m) in bufs.iter_mut().zip(&models) {
                b.clear();
                b.extend_from_slice(&m[r.clone()]);
            }
        };
        let requests = [(0, 5), (1, n as u64 / 2), (0, n as u64 - 3), (1, 0)];
        let cuts = find_many(n, 2, &requests, &all).unwrap();
        for (&(m, k), s) in requests.iter().zip(&cuts) {
            let keys = &models[m];
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by_key(|&i| (keys[i], i));
            let mut want = vec![false; n];
            order[..k as usize].iter().for_each(|&i| want[i] = true);
            let mut got = vec![false; n];
            for b in 0..n.div_ceil(CPU_BLOCK) {
                let mut tie = s.ties_before(b);
                for i in b * CPU_BLOCK..((b + 1) * CPU_BLOCK).min(n) {
                    got[i] = s.contains(keys[i], &mut tie);
                }
            }
            assert_eq!(got, want, "model {m} k={k}");
        }
    }
}
