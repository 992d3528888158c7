//! Exact rank cuts over keys computed on the fly (|δ| of a delta that is
//! never stored), with the ties before each block counted so that blocks
//! can be decided in parallel and still take ties in flat order. Usually
//! one pass: a sample brackets each cut between two keys, and the pass
//! counts the keys below and tallies those within (`bracketed`); where the
//! sample misses, the radix select of `select`, fed by a closure, in three
//! passes (`radix`). Both give the same cut, exactly.

use crate::error::Result;
use crate::ops::select::{find_cut, locate, Cut, Level};
use crate::ops::CPU_BLOCK;
use rayon::prelude::*;
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    let mut found = bracketed(n, models, requests, keys);
    let missed: Vec<(usize, u64)> = requests
        .iter()
        .zip(&found)
        .filter(|(_, f)| f.is_none())
        .map(|(&r, _)| r)
        .collect();
    let mut rest = if missed.is_empty() {
        Vec::new()
    } else {
        radix(n, models, &missed, keys)?
    }
    .into_iter();
    found
        .iter_mut()
        .map(|f| {
            f.take()
                .or_else(|| rest.next())
                .ok_or_else(|| crate::error::Error::input("merge: a rank cut is missing"))
        })
        .collect()
}

/// Sample ranges `bracketed` reads, and their length.
const SAMPLE_RANGES: usize = 256;
const SAMPLE_LEN: usize = 256;

/// The cuts in one pass where a sample brackets them (the usual case).
/// From evenly spaced sample ranges, a key interval [lo, hi] around each
/// cut's rank ± 5 standard errors (at least ± 1 %); one pass counts, per
/// block, the keys below lo and those within by key (the sample's few
/// distinct keys counted in the same vectorized loop, 16-bit weights'
/// deltas take few values; other keys gathered and sorted). At most n/16
/// (block, key) pairs are held per request, so memory stays a small
/// fraction of the tensor's. The cut is then found among them, exactly
/// whatever the sample: a request whose cut falls outside its interval, or
/// whose interval holds too many keys, gets None (`radix` finds it).
fn bracketed(
    n: usize,
    models: usize,
    requests: &[(usize, u64)],
    keys: &AllKeys,
) -> Vec<Option<Smallest>> {
    let none = || requests.iter().map(|_| None).collect();
    if n < 4 * SAMPLE_RANGES * SAMPLE_LEN || requests.is_empty() {
        return none();
    }
    // The sample: per model, sorted.
    let step = n / SAMPLE_RANGES;
    let mut sample = vec![Vec::with_capacity(SAMPLE_RANGES * SAMPLE_LEN); models];
    let mut buf = vec![Vec::new(); models];
    for i in 0..SAMPLE_RANGES {
        let start = i * step + (step - SAMPLE_LEN) / 2;
        keys(start..start + SAMPLE_LEN, &mut buf);
        for (s, b) in sample.iter_mut().zip(&buf) {
            s.extend_from_slice(b);
        }
    }
    sample.iter_mut().for_each(|s| s.sort_unstable());
    let size = (SAMPLE_RANGES * SAMPLE_LEN) as f64;
    let bounds: Vec<(u32, u32)> = requests
        .iter()
        .map(|&(m, k)| {
            let q = k as f64 / n as f64;
            let spread = (5.0 * (q * (1.0 - q) / size).sqrt()).max(0.01);
            let at = |x: f64| (x * size).floor();
            let lo = at(q - spread);
            let hi = at(q + spread);
            let lo = if lo < 0.0 { 0 } else { sample[m][lo as usize] };
            let hi = if hi >= size {
                u32::MAX
            } else {
                sample[m][hi as usize]
            };
            (lo, hi)
        })
        .collect();
    // The sample's distinct keys within each interval, when few.
    let cands: Vec<Vec<u32>> = requests
        .iter()
        .zip(&bounds)
        .map(|(&(m, _), &(lo, hi))| {
            let mut c: Vec<u32> = sample[m]
                .iter()
                .copied()
                .filter(|&k| k >= lo && k <= hi)
                .collect();
            c.dedup();
            if c.len() > CANDIDATES {
                c.clear();
            }
            c
        })
        .collect();
    // Per block, per request: keys below lo, and the keys within as
    // (key, count) ascending (None once the request's blocks together
    // hold more than n/16 pairs).
    type Held = (u64, Option<Vec<(u32, u64)>>);
    let max_held = n / 16;
    let held_total: Vec<AtomicUsize> = requests.iter().map(|_| AtomicUsize::new(0)).collect();
    let blocks = n.div_ceil(CPU_BLOCK);
    let per_block: Vec<Vec<Held>> = (0..blocks)
        .into_par_iter()
        .map_init(
            || (vec![Vec::new(); models], Vec::new()),
            |(buf, within), b| {
                keys(b * CPU_BLOCK..((b + 1) * CPU_BLOCK).min(n), buf);
                requests
                    .iter()
                    .zip(&bounds)
                    .enumerate()
                    .map(|(r, (&(m, _), &(lo, hi)))| {
                        let ks = &buf[m];
                        let (below, inside, eq) = counts(ks, lo, hi, &cands[r]);
                        let mut pairs: Vec<(u32, u64)> = cands[r]
                            .iter()
                            .zip(eq)
                            .filter(|p| p.1 > 0)
                            .map(|(&c, e)| (c, e))
                            .collect();
                        if pairs.iter().map(|p| p.1).sum::<u64>() != inside {
                            // Other keys too: gather them without branches.
                            within.clear();
                            within.resize(ks.len(), 0);
                            let mut j = 0;
                            for &k in ks {
                                within[j] = k;
                                j += usize::from(k >= lo && k <= hi);
                            }
                            within.truncate(j);
                            pairs = tally(within);
                        }
                        let total = held_total[r].fetch_add(pairs.len(), Ordering::Relaxed);
                        (below, (total + pairs.len() <= max_held).then_some(pairs))
                    })
                    .collect()
            },
        )
        .collect();
    requests
        .iter()
        .enumerate()
        .map(|(r, &(_, k))| {
            let below: u64 = per_block.iter().map(|b| b[r].0).sum();
            let mut all: Vec<(u32, u64)> = Vec::new();
            for b in &per_block {
                all.extend_from_slice(b[r].1.as_deref()?);
            }
            all.sort_unstable_by_key(|p| p.0);
            if k <= below {
                return None;
            }
            // The k-th smallest: walk the keys within in ascending order.
            let mut less = below;
            let mut at = 0;
            let (key, equal) = loop {
                let key = all.get(at)?.0;
                let equal: u64 = all[at..]
                    .iter()
                    .take_while(|p| p.0 == key)
                    .map(|p| p.1)
                    .sum();
                if less + equal >= k {
                    break (key, equal);
                }
                less += equal;
                at += all[at..].iter().take_while(|p| p.0 == key).count();
            };
            let mut seen = 0u64;
            let ties_before = per_block
                .iter()
                .map(|b| {
                    let before = seen;
                    let pairs = b[r].1.as_deref().unwrap_or_default();
                    if let Ok(i) = pairs.binary_search_by_key(&key, |p| p.0) {
                        seen += pairs[i].1;
                    }
                    before
                })
                .collect();
            Some(Smallest {
                cut: Cut {
                    key,
                    ties: k - less,
                    equal,
                },
                ties_before,
            })
        })
        .collect()
}

/// Most candidate keys `counts` counts in its one loop.
const CANDIDATES: usize = 4;

/// Of `keys`: how many are below `lo`, how many within [lo, hi], and how
/// many equal each of `cands` (at most `CANDIDATES`), in one loop that
/// vectorizes.
fn counts(keys: &[u32], lo: u32, hi: u32, cands: &[u32]) -> (u64, u64, [u64; CANDIDATES]) {
    let mut c = [lo; CANDIDATES];
    c[..cands.len()].copy_from_slice(cands);
    let width = hi.wrapping_sub(lo);
    let (mut below, mut inside, mut eq) = (0u64, 0u64, [0u64; CANDIDATES]);
    // u32 lanes, added up per 2¹⁶ keys so that they never overflow.
    for part in keys.chunks(1 << 16) {
        let (b, w, e) = fast!({
            let (mut b, mut w, mut e) = (0u32, 0u32, [0u32; CANDIDATES]);
            for &k in part {
                b += u32::from(k < lo);
                w += u32::from(k.wrapping_sub(lo) <= width);
                for (x, &y) in e.iter_mut().zip(&c) {
                    *x += u32::from(k == y);
                }
            }
            (b, w, e)
        });
        below += b as u64;
        inside += w as u64;
        eq.iter_mut().zip(e).for_each(|(x, y)| *x += y as u64);
    }
    (below, inside, eq)
}

/// The distinct keys of `keys` with their counts, ascending (the keys the
/// sample did not foresee; the few it did are counted in `counts`).
fn tally(keys: &mut [u32]) -> Vec<(u32, u64)> {
    keys.sort_unstable();
    let mut pairs: Vec<(u32, u64)> = Vec::new();
    for &k in keys.iter() {
        match pairs.last_mut() {
            Some((last, c)) if *last == k => *c += 1,
            _ => pairs.push((k, 1)),
        }
    }
    pairs
}

/// `find_many` by the radix select: high histograms, low histograms, and
/// the ties per block, one pass each.
fn radix(
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

    /// The one-pass cuts equal the radix passes' (key, ties, equal and
    /// ties per block), and the sample brackets the usual distributions.
    #[test]
    fn bracketed_cuts_equal_the_radix_passes() {
        let mut rng = crate::tools::sample::Rng::new(11);
        let n = 9 * CPU_BLOCK + 5;
        let sets: Vec<(&str, Vec<u32>)> = vec![
            (
                "continuous",
                (0..n).map(|_| rng.uniform().to_bits() as u32).collect(),
            ),
            (
                "coarse",
                (0..n).map(|_| (rng.uniform() * 5000.0) as u32).collect(),
            ),
            (
                "few",
                (0..n).map(|_| (rng.uniform() * 3.0) as u32).collect(),
            ),
            // Three keys, and rarely one between them the sample may miss.
            (
                "rare",
                (0..n)
                    .map(|i| {
                        if i % 4999 == 7 {
                            15
                        } else {
                            (rng.uniform() * 3.0) as u32 * 10
                        }
                    })
                    .collect(),
            ),
            ("rising", (0..n).map(|i| (i as u32) / 7).collect()),
        ];
        for (label, keys) in &sets {
            let all = |r: Range<usize>, bufs: &mut [Vec<u32>]| {
                bufs[0].clear();
                bufs[0].extend_from_slice(&keys[r]);
            };
            let ks = [
                1,
                1000,
                n as u64 / 10,
                n as u64 / 3,
                n as u64 / 2,
                n as u64 - 7,
                n as u64,
            ];
            let requests: Vec<(usize, u64)> = ks.iter().map(|&k| (0, k)).collect();
            let want = radix(n, 1, &requests, &all).unwrap();
            let got = bracketed(n, 1, &requests, &all);
            let mut hits = 0;
            for ((w, g), k) in want.iter().zip(&got).zip(ks) {
                let Some(g) = g else { continue };
                hits += 1;
                assert_eq!(
                    (g.cut.key, g.cut.ties, g.cut.equal),
                    (w.cut.key, w.cut.ties, w.cut.equal),
                    "{label} k={k}"
                );
                assert_eq!(g.ties_before, w.ties_before, "{label} k={k}");
            }
            assert!(hits >= 5, "{label}: the sample bracketed {hits} of 7 cuts");
            let merged = find_many(n, 1, &requests, &all).unwrap();
            for (w, m) in want.iter().zip(&merged) {
                assert_eq!((w.cut.key, w.cut.ties), (m.cut.key, m.cut.ties), "{label}");
                assert_eq!(w.ties_before, m.ties_before, "{label}");
            }
        }
    }
}
