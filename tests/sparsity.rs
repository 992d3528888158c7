//! Exact target sparsity: the mask is the k smallest (|w|, flat index)
//! pairs, k = round_ties_even(s·n), identical on GPU and CPU, checked
//! against a brute-force sort on data full of ties.

mod common;
use common::*;
use modelpress::ops::diff::diff;
use modelpress::select::{self, count_for, key};
use modelpress::tools::sample::Rng;
use modelpress::{DType, Device, Error, Tensor};

/// The specification: sort by (key, index) and zero the first k.
fn brute_force(t: &Tensor, k: u64) -> Tensor {
    let v = t.to_f32_vec();
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by_key(|&i| (key(v[i]), i));
    let mut out = t.clone();
    for &i in &order[..k as usize] {
        t.dtype.write_raw_public(&mut out.data, i, 0);
    }
    out
}

trait WriteRaw {
    fn write_raw_public(self, bytes: &mut [u8], i: usize, raw: u32);
}

impl WriteRaw for DType {
    fn write_raw_public(self, bytes: &mut [u8], i: usize, raw: u32) {
        match self.size() {
            4 => bytes[4 * i..4 * i + 4].copy_from_slice(&raw.to_le_bytes()),
            _ => bytes[2 * i..2 * i + 2].copy_from_slice(&(raw as u16).to_le_bytes()),
        }
    }
}

/// Values with many ties: a few levels, zeros, repeats, NaN and inf.
fn tied(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(12) {
            0 => 0.0,
            1 => -0.0,
            2 => 0.25,
            3 => -0.25,
            4 => 0.5,
            5 if rng.below(10) == 0 => f32::NAN,
            6 if rng.below(10) == 0 => f32::INFINITY,
            _ => (rng.normal() * 0.1) as f32,
        })
        .collect()
}

fn devices() -> Vec<(String, Device)> {
    let mut d = vec![("cpu".to_string(), Device::Cpu)];
    d.extend(gpu_variants());
    d
}

#[test]
fn masks_are_the_k_smallest_with_ties_to_the_lower_index() {
    let mut rng = Rng::new(seed("sparsity"));
    for (name, dev) in devices() {
        for dtype in FLOATS {
            for shape in shapes(&mut rng) {
                let n: usize = shape.iter().product();
                let t = tensor(dtype, &shape, &tied(&mut rng, n));
                for s in [0.0, 0.1, 0.25, 0.5, 0.5 + 1e-9, 0.73, 0.999, 1.0] {
                    let ctx = format!("{name} {dtype} {shape:?} s={s}");
                    let (got, st) = select::prune_to_sparsity(&dev, &t.view(), s, false).unwrap();
                    let k = count_for(s, n as u64);
                    let want = brute_force(&t, k);
                    assert_identical(&got, &want, &ctx);
                    let zeros = got.to_f32_vec().iter().filter(|x| **x == 0.0).count() as u64;
                    assert_eq!(st.zeros, zeros, "{ctx}");
                    let z0 = t.to_f32_vec().iter().filter(|x| **x == 0.0).count() as u64;
                    assert_eq!(
                        zeros,
                        k.max(z0),
                        "{ctx}: exactly k zeros (zeros already there count)"
                    );
                }
            }
        }
    }
}

#[test]
fn count_rule_is_pythons_round() {
    assert_eq!(count_for(0.5, 5), 2); // 2.5 -> 2
    assert_eq!(count_for(0.5, 3), 2); // 1.5 -> 2
    assert_eq!(count_for(0.5, 7), 4); // 3.5 -> 4
    assert_eq!(count_for(1.0, 9), 9);
    assert_eq!(count_for(0.0, 9), 0);
}

#[test]
fn pruning_twice_and_of_remaining() {
    let mut rng = Rng::new(seed("twice"));
    for (name, dev) in devices() {
        for dtype in FLOATS {
            let n = 10_000;
            let t = tensor(dtype, &[100, 100], &weights(&mut rng, n, 0.01));
            let (once, a) = select::prune_to_sparsity(&dev, &t.view(), 0.5, false).unwrap();
            let (twice, b) = select::prune_to_sparsity(&dev, &once.view(), 0.5, false).unwrap();
            assert_eq!(a.zeros, 5000, "{name} {dtype}");
            assert_eq!(b.zeros, 5000, "{name} {dtype}: twice at 50% stays at 50%");
            assert_identical(&twice, &once, &format!("{name} {dtype}"));
            let (rem, c) = select::prune_to_sparsity(&dev, &once.view(), 0.5, true).unwrap();
            assert_eq!(c.zeros, 7500, "{name} {dtype}: 50% of the remaining on top");
            let (cpu, _) =
                select::prune_to_sparsity(&Device::Cpu, &once.view(), 0.5, true).unwrap();
            assert_identical(&rem, &cpu, &format!("{name} {dtype} of remaining"));
        }
    }
}

#[test]
fn bad_sparsity_is_an_error() {
    let t = tensor(DType::F32, &[4], &[1.0, 2.0, 3.0, 4.0]);
    for (_, dev) in devices() {
        for s in [-0.1, 1.5, f64::NAN] {
            let e = select::prune_to_sparsity(&dev, &t.view(), s, false).unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{s}: {e}");
        }
    }
}

#[test]
fn global_cut_over_a_model_matches_the_brute_force_over_all_tensors() {
    use modelpress::formats::model::Model;
    use modelpress::jobs::pipeline::{self, JobOptions, Selection, TensorOp};
    use modelpress::jobs::Sparsity;
    use modelpress::tools::sample::{write_llama_model, LlamaShape};
    let shape = LlamaShape {
        hidden: 32,
        intermediate: 48,
        layers: 2,
        heads: 2,
        vocab: 64,
    };
    let tmp = tempfile::tempdir().unwrap();
    for dtype in [DType::BF16, DType::F32] {
        let dir = tmp.path().join(format!("m-{dtype}"));
        write_llama_model(&dir, shape, dtype, 2, seed("global")).unwrap();
        let model = Model::open(&dir).unwrap();
        let sel = Selection::default();
        let probe = Sparsity::per_tensor(0.5, false).unwrap();
        // The specification over the touched tensors in model order.
        let touched: Vec<_> = model
            .entries()
            .filter(|(_, e)| sel.chosen(&probe, e))
            .collect();
        let mut all = Vec::new();
        for (f, e) in &touched {
            all.extend(f.tensor(e).unwrap().to_f32_vec());
        }
        for s in [0.3, 0.5, 0.9] {
            let k = count_for(s, all.len() as u64) as usize;
            let mut order: Vec<usize> = (0..all.len()).collect();
            order.sort_by_key(|&i| (key(all[i]), i));
            let mut pruned = vec![false; all.len()];
            order[..k].iter().for_each(|&i| pruned[i] = true);
            let mut outputs = Vec::new();
            for (name, dev) in devices().into_iter().take(2) {
                let op = Sparsity::global(&dev, &model, &sel, s, false).unwrap();
                assert!(op.passes() <= 2 && op.describe().contains("global"));
                let out = tmp.path().join(format!("{dtype}-{s}-{name}"));
                let opts = JobOptions::new(dev);
                pipeline::run(&op, &[Model::open(&dir).unwrap()], &out, &opts).unwrap();
                let m = Model::open(&out).unwrap();
                let mut pos = 0;
                for (_, e) in &touched {
                    let (f2, e2) = m.find(&e.name).unwrap();
                    let got = f2.tensor(e2).unwrap().to_f32_vec();
                    for (j, v) in got.iter().enumerate() {
                        if pruned[pos + j] {
                            assert_eq!(v.to_bits(), 0, "{name} {dtype} s={s} {} [{j}]", e.name);
                        } else {
                            assert_eq!(
                                v.to_bits(),
                                all[pos + j].to_bits(),
                                "{name} {dtype} s={s} {} [{j}]",
                                e.name
                            );
                        }
                    }
                    pos += got.len();
                }
                outputs.push(out);
            }
            if outputs.len() == 2 {
                assert!(
                    dir_bytes(&outputs[0]) == dir_bytes(&outputs[1]),
                    "{dtype} s={s}: GPU and CPU bytes differ"
                );
            }
        }
    }
}

/// The N:M specification: per row, per run of M, keep the N largest keys
/// (ties to the lower index); a shorter tail run stays dense.
fn nm_brute_force(t: &Tensor, n_keep: usize, m: usize) -> Tensor {
    let v = t.to_f32_vec();
    let rows = if t.shape.len() <= 1 { 1 } else { t.shape[0] };
    let row_len = if rows == 0 { 0 } else { v.len() / rows.max(1) };
    let mut out = t.clone();
    for r in 0..rows {
        let mut g0 = 0;
        while g0 + m <= row_len {
            let idx: Vec<usize> = (r * row_len + g0..r * row_len + g0 + m).collect();
            let mut order = idx.clone();
            order.sort_by_key(|&i| (std::cmp::Reverse(key(v[i])), i));
            for &i in &order[n_keep..] {
                t.dtype.write_raw_public(&mut out.data, i, 0);
            }
            g0 += m;
        }
    }
    out
}

#[test]
fn nm_patterns_keep_the_n_largest_of_every_m() {
    use modelpress::select::Pattern;
    let mut rng = Rng::new(seed("nm"));
    for (name, dev) in devices() {
        for dtype in FLOATS {
            for (nk, m) in [
                (2u32, 4u32),
                (4, 8),
                (1, 2),
                (0, 4),
                (4, 4),
                (3, 5),
                (2, 16),
            ] {
                for &(rows, cols) in &[(1, 16), (7, 40), (33, 80), (3, 2000), (0, 8), (5, 0)] {
                    if cols % m as usize != 0 {
                        continue;
                    }
                    let t = tensor(dtype, &[rows, cols], &tied(&mut rng, rows * cols));
                    let ctx = format!("{name} {dtype} {nk}:{m} [{rows}, {cols}]");
                    let (got, d) =
                        select::prune_pattern(&dev, &t.view(), Pattern { n: nk, m }, false, None)
                            .unwrap();
                    assert_identical(&got, &nm_brute_force(&t, nk as usize, m as usize), &ctx);
                    // The figures from the pruning pass equal a pass of their own.
                    assert_diff_close(&d, &diff(&t.view(), &got.view()), &ctx);
                    // The invariant itself: at most N non-zero in every run of M.
                    let g = got.to_f32_vec();
                    for grp in g.chunks(m as usize) {
                        assert!(
                            grp.iter().filter(|x| **x != 0.0).count() <= nk as usize,
                            "{ctx}"
                        );
                    }
                }
            }
            // Rows not a multiple of M: an error, or a dense tail when asked.
            let t = tensor(dtype, &[6, 10], &tied(&mut rng, 60));
            let e = select::prune_pattern(&dev, &t.view(), Pattern { n: 2, m: 4 }, false, None)
                .unwrap_err();
            assert!(
                matches!(e, Error::Input(ref s) if s.contains("multiple of M")),
                "{e}"
            );
            let (got, _) =
                select::prune_pattern(&dev, &t.view(), Pattern { n: 2, m: 4 }, true, None).unwrap();
            assert_identical(
                &got,
                &nm_brute_force(&t, 2, 4),
                &format!("{name} {dtype} tail"),
            );
            for r in 0..6 {
                assert_eq!(
                    got.raw_bits()[r * 10 + 8..r * 10 + 10],
                    t.raw_bits()[r * 10 + 8..r * 10 + 10],
                    "tail dense"
                );
            }
        }
    }
}

#[test]
fn nm_arguments_are_checked() {
    use modelpress::select::Pattern;
    assert_eq!(Pattern::parse("2:4").unwrap(), Pattern { n: 2, m: 4 });
    for bad in ["5:4", "2:0", "2-4", "a:b", "2:65", ""] {
        assert!(matches!(Pattern::parse(bad), Err(Error::Input(_))), "{bad}");
    }
}

/// Per row: sort (key, column) and zero the first k; key = |w| or the
/// activation-aware score.
fn rows_brute_force(t: &Tensor, s: f64, scores: Option<&[f32]>) -> Tensor {
    let (rows, cols) = (t.shape[0], t.shape[1]);
    let v = t.to_f32_vec();
    let k = count_for(s, cols as u64) as usize;
    let mut out = t.clone();
    for r in 0..rows {
        let mut keyed: Vec<(u32, usize)> = (0..cols)
            .map(|j| {
                let w = v[r * cols + j];
                (scores.map_or(key(w), |x| select::score_key(w, x[j])), j)
            })
            .collect();
        keyed.sort();
        for &(_, j) in &keyed[..k] {
            t.dtype.write_raw_public(&mut out.data, r * cols + j, 0);
        }
    }
    out
}

#[test]
fn per_row_sparsity_and_activation_aware_scores() {
    use modelpress::select::Pattern;
    let mut rng = Rng::new(seed("wanda"));
    for (name, dev) in devices() {
        for dtype in FLOATS {
            for &(rows, cols) in &[(1, 1), (5, 8), (17, 100), (3, 1000), (64, 12)] {
                let t = tensor(dtype, &[rows, cols], &tied(&mut rng, rows * cols));
                // Norms with zeros, repeats and a subnormal.
                let x: Vec<f32> = (0..cols)
                    .map(|j| match j % 5 {
                        0 => 0.0,
                        1 => 1.0,
                        2 => 1e-40,
                        _ => rng.uniform() as f32 * 4.0,
                    })
                    .collect();
                for s in [0.0, 0.3, 0.5, 1.0] {
                    for sc in [None, Some(&x[..])] {
                        let ctx = format!(
                            "{name} {dtype} [{rows}, {cols}] s={s} scores={}",
                            sc.is_some()
                        );
                        let (got, d) = match select::prune_rows_to_sparsity(&dev, &t.view(), s, sc)
                        {
                            Ok(r) => r,
                            // Whole rows (and their norms) must fit one chunk;
                            // the forced tiny chunks cannot hold long rows.
                            Err(Error::Limit { .. })
                                if name.contains("chunks") && cols * 8 > 700 =>
                            {
                                continue
                            }
                            Err(e) => panic!("{ctx}: {e}"),
                        };
                        assert_identical(&got, &rows_brute_force(&t, s, sc), &ctx);
                        assert_diff_close(&d, &diff(&t.view(), &got.view()), &ctx);
                    }
                }
                if cols % 4 == 0 {
                    let (got, d) = select::prune_pattern(
                        &dev,
                        &t.view(),
                        Pattern { n: 2, m: 4 },
                        false,
                        Some(&x),
                    )
                    .unwrap();
                    assert_diff_close(&d, &diff(&t.view(), &got.view()), "2:4 by score");
                    let (cpu, _) = select::prune_pattern(
                        &Device::Cpu,
                        &t.view(),
                        Pattern { n: 2, m: 4 },
                        false,
                        Some(&x),
                    )
                    .unwrap();
                    assert_identical(&got, &cpu, &format!("{name} {dtype} 2:4 by score"));
                    // By hand: in each run, the 2 largest scores survive.
                    let v = t.to_f32_vec();
                    for r in 0..rows {
                        for g in 0..cols / 4 {
                            let mut idx: Vec<usize> = (g * 4..g * 4 + 4).collect();
                            idx.sort_by_key(|&j| {
                                (
                                    std::cmp::Reverse(select::score_key(v[r * cols + j], x[j])),
                                    j,
                                )
                            });
                            for &j in &idx[2..] {
                                assert_eq!(
                                    got.to_f32_vec()[r * cols + j].to_bits(),
                                    0,
                                    "{name} {dtype} r{r} j{j}"
                                );
                            }
                        }
                    }
                }
            }
            // Bad scores: wrong length, negative, NaN.
            let t = tensor(dtype, &[2, 4], &[1.0; 8]);
            for bad in [vec![1.0; 3], vec![1.0, -1.0, 1.0, 1.0], vec![f32::NAN; 4]] {
                assert!(matches!(
                    select::prune_rows_to_sparsity(&dev, &t.view(), 0.5, Some(&bad)),
                    Err(Error::Input(_))
                ));
            }
        }
    }
}
