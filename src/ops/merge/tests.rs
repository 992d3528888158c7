//! The merge methods against plain, whole-tensor statements of their rules
//! (sorts instead of radix cuts, one element at a time).

use super::*;
use crate::tools::sample::Rng;

fn tensor(dtype: DType, shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_f32(dtype, shape, v).unwrap()
}

/// Values with many exact ties in |δ| (a coarse grid) and a few zeros.
fn values(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| match i % 7 {
            0 => 0.0,
            1 | 2 => ((rng.uniform() * 8.0).floor() as f32 - 4.0) / 8.0,
            _ => rng.normal() as f32,
        })
        .collect()
}

/// Which elements the rule keeps, by sorting (|δ|, index) ascending.
fn keep_by_sort(d: &[f32], drop_low: usize, keep: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..d.len()).collect();
    order.sort_by_key(|&i| (key(d[i]), i));
    let mut k = vec![false; d.len()];
    for &i in &order[drop_low..(drop_low + keep).min(d.len())] {
        k[i] = true;
    }
    k
}

/// The chain, element by element, from whole-tensor masks.
fn reference(
    base: &[f32],
    xs: &[Vec<f32>],
    terms: &[Term],
    g: &Gta,
    masks: &[Vec<bool>],
) -> Vec<f32> {
    let n = base.len();
    let scale: Vec<f32> = (0..xs.len())
        .map(|i| {
            let d: Vec<f32> = (0..n).map(|e| xs[i][e] - base[e]).collect();
            let all: f64 = d.iter().map(|v| v.abs() as f64).sum();
            let kept: f64 = d
                .iter()
                .zip(&masks[i])
                .map(|(v, &k)| if k { v.abs() as f64 } else { 0.0 })
                .sum();
            if !g.rescale || g.sparsify == Sparsify::None || all < 1e-7 || kept < 1e-7 {
                1.0
            } else {
                (all / kept) as f32
            }
        })
        .collect();
    let wsum: f32 = terms.iter().map(|t| t.weight).sum();
    (0..n)
        .map(|e| {
            let wd: Vec<f32> = (0..xs.len())
                .map(|i| {
                    if masks[i][e] {
                        terms[i].weight * ((xs[i][e] - base[e]) * scale[i])
                    } else {
                        0.0
                    }
                })
                .collect();
            let (sum, div) = if g.consensus {
                let pos = wd.iter().sum::<f32>() >= 0.0;
                let mut s = 0f32;
                let mut d = 0f32;
                for (i, &v) in wd.iter().enumerate() {
                    if v != 0.0 && (v > 0.0) == pos {
                        s += v;
                        d += terms[i].weight;
                    }
                }
                (s, if d == 0.0 { 1.0 } else { d })
            } else {
                (
                    wd.iter().sum::<f32>(),
                    if wsum.abs() < 1e-8 { 1.0 } else { wsum },
                )
            };
            base[e] + g.lambda * if g.normalize { sum / div } else { sum }
        })
        .collect()
}

#[test]
fn the_task_arithmetic_family_follows_its_rules() {
    let mut rng = Rng::new(3);
    for n in [1usize, 5, 100, CPU_BLOCK + 77] {
        let shape = [n];
        let base = values(&mut rng, n);
        let xs: Vec<Vec<f32>> = (0..3)
            .map(|_| {
                base.iter()
                    .zip(values(&mut rng, n))
                    .map(|(b, v)| b + v)
                    .collect()
            })
            .collect();
        let terms = [
            Term {
                weight: 1.0,
                density: 0.5,
                gamma: 0.1,
                epsilon: 0.1,
            },
            Term {
                weight: 0.3,
                density: 0.2,
                gamma: 0.0,
                epsilon: 0.1,
            },
            Term {
                weight: -0.7,
                density: 1.0,
                gamma: 0.3,
                epsilon: 0.1,
            },
        ];
        for (sparsify, consensus, normalize, rescale) in [
            (Sparsify::None, false, false, false),
            (Sparsify::Magnitude, true, true, false),
            (Sparsify::Magnitude, false, false, true),
            (Sparsify::Breadcrumbs, false, false, false),
            (Sparsify::Breadcrumbs, true, true, true),
        ] {
            let g = Gta {
                sparsify,
                consensus,
                normalize,
                rescale,
                lambda: 0.9,
                seed: 1,
            };
            let masks: Vec<Vec<bool>> = xs
                .iter()
                .zip(&terms)
                .map(|(x, t)| {
                    let d: Vec<f32> = x.iter().zip(&base).map(|(a, b)| a - b).collect();
                    let floor = |s: f64| (s * n as f64).floor() as usize;
                    match sparsify {
                        Sparsify::None => vec![true; n],
                        Sparsify::Magnitude => {
                            let keep = if t.density >= 1.0 {
                                n
                            } else {
                                floor(t.density).max(1)
                            };
                            keep_by_sort(&d, n - keep, keep)
                        }
                        Sparsify::Breadcrumbs => {
                            let keep = floor(t.density);
                            let bottom = n.saturating_sub(keep + floor(t.gamma));
                            keep_by_sort(&d, bottom, keep)
                        }
                        Sparsify::Random | Sparsify::Della => unreachable!(),
                    }
                })
                .collect();
            let want = reference(&base, &xs, &terms, &g, &masks);
            for dtype in [DType::F32, DType::BF16] {
                let tb = tensor(DType::F32, &shape, &base);
                let tx: Vec<Tensor> = xs.iter().map(|x| tensor(DType::F32, &shape, x)).collect();
                let mut refs = vec![tb.view()];
                refs.extend(tx.iter().map(|t| t.view()));
                let m = gta(&Device::Cpu, &refs, &terms, &g, "w", None, dtype).unwrap();
                let got = m.tensor.to_f32_vec();
                let ctx = format!("n={n} {sparsify:?} consensus={consensus} {dtype}");
                for (e, (&a, &b)) in got.iter().zip(&want).enumerate() {
                    let b = tensor(dtype, &[1], &[b]).to_f32_vec()[0];
                    assert_eq!(a.to_bits(), b.to_bits(), "{ctx} element {e}");
                }
                assert_eq!(m.kept.len(), 3);
                if !consensus {
                    let share = masks[1]
                        .iter()
                        .zip(&xs[1])
                        .zip(&base)
                        .filter(|((&k, x), b)| k && *x != *b)
                        .count() as f64
                        / n as f64;
                    assert_eq!(m.kept[1], share, "{ctx}");
                }
            }
        }
    }
}

#[test]
fn dare_keeps_each_element_with_the_density_and_repeats() {
    let n = 200_000;
    let base = vec![0.0f32; n];
    let x: Vec<f32> = (0..n).map(|i| 1.0 + (i % 13) as f32).collect();
    let (tb, tx) = (
        tensor(DType::F32, &[n], &base),
        tensor(DType::F32, &[n], &x),
    );
    let terms = [Term {
        weight: 1.0,
        density: 0.3,
        gamma: 0.0,
        epsilon: 0.1,
    }];
    let g = Gta {
        sparsify: Sparsify::Random,
        consensus: false,
        normalize: false,
        rescale: false,
        lambda: 1.0,
        seed: 7,
    };
    let m = gta(
        &Device::Cpu,
        &[tb.view(), tx.view()],
        &terms,
        &g,
        "w",
        None,
        DType::F32,
    )
    .unwrap();
    // Bernoulli(0.3) over n: the share within 5 standard deviations.
    let sd = (0.3f64 * 0.7 / n as f64).sqrt();
    assert!((m.kept[0] - 0.3).abs() < 5.0 * sd, "{}", m.kept[0]);
    let again = gta(
        &Device::Cpu,
        &[tb.view(), tx.view()],
        &terms,
        &g,
        "w",
        None,
        DType::F32,
    )
    .unwrap();
    assert_eq!(m.tensor.data, again.tensor.data);
    let other = gta(
        &Device::Cpu,
        &[tb.view(), tx.view()],
        &terms,
        &Gta { seed: 8, ..g },
        "w",
        None,
        DType::F32,
    )
    .unwrap();
    assert_ne!(m.tensor.data, other.tensor.data);
    // Every kept element is the delta itself, every other one the base.
    let got = m.tensor.to_f32_vec();
    assert!(got.iter().zip(&x).all(|(g, x)| *g == 0.0 || g == x));
    // Rescaled, the L1 norm of the delta comes back.
    let r = gta(
        &Device::Cpu,
        &[tb.view(), tx.view()],
        &terms,
        &Gta { rescale: true, ..g },
        "w",
        None,
        DType::F32,
    )
    .unwrap();
    let l1 = |v: &[f32]| v.iter().map(|x| x.abs() as f64).sum::<f64>();
    let (a, b) = (l1(&r.tensor.to_f32_vec()), l1(&x));
    assert!((a - b).abs() <= 1e-5 * b, "{a} vs {b}");
}

#[test]
fn linear_and_slerp() {
    let mut rng = Rng::new(9);
    let n = 1000;
    let a: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let b: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let (ta, tb) = (tensor(DType::F32, &[n], &a), tensor(DType::F32, &[n], &b));
    let (l, _) = linear(
        &Device::Cpu,
        &[ta.view(), tb.view()],
        &[1.0, 3.0],
        true,
        None,
        DType::F32,
    )
    .unwrap();
    let got = l.to_f32_vec();
    for i in 0..n {
        assert_eq!(got[i], (1.0 * a[i] + 3.0 * b[i]) / 4.0);
    }
    assert!(linear(
        &Device::Cpu,
        &[ta.view(), tb.view()],
        &[1.0, -1.0],
        true,
        None,
        DType::F32
    )
    .is_err());
    // slerp: t = 0 is `a`, t = 1 is `b` (to rounding), and in between the
    // norm follows the great circle: for orthogonal-ish unit vectors the
    // midpoint has the same norm, where a lerp would shrink it.
    let (s0, _) = slerp(&Device::Cpu, &ta.view(), &tb.view(), 0.0, None, DType::F32).unwrap();
    assert_eq!(s0.to_f32_vec(), a);
    let (s1, _) = slerp(&Device::Cpu, &ta.view(), &tb.view(), 1.0, None, DType::F32).unwrap();
    for (x, y) in s1.to_f32_vec().iter().zip(&b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()));
    }
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let (na, nb) = (norm(&a), norm(&b));
    let ua: Vec<f32> = a.iter().map(|x| (*x as f64 / na) as f32).collect();
    let ub: Vec<f32> = b.iter().map(|x| (*x as f64 / nb) as f32).collect();
    let (tua, tub) = (tensor(DType::F32, &[n], &ua), tensor(DType::F32, &[n], &ub));
    let (m, _) = slerp(
        &Device::Cpu,
        &tua.view(),
        &tub.view(),
        0.5,
        None,
        DType::F32,
    )
    .unwrap();
    assert!((norm(&m.to_f32_vec()) - 1.0).abs() < 1e-4);
    // Nearly parallel: the lerp.
    let (p, _) = slerp(&Device::Cpu, &ta.view(), &ta.view(), 0.3, None, DType::F32).unwrap();
    for (x, y) in p.to_f32_vec().iter().zip(&a) {
        assert_eq!(*x, 0.7 * y + 0.3 * y);
    }
}

#[test]
fn della_keeps_large_deltas_more_often() {
    // One row of 100,000 deltas 1..=n: rank = index, so the keep rate rises
    // from density − ε at the smallest to density + ε at the largest.
    let n = 100_000;
    let base = vec![0.0f32; n];
    let x: Vec<f32> = (1..=n).map(|i| i as f32).collect();
    let (tb, tx) = (
        tensor(DType::F32, &[n], &base),
        tensor(DType::F32, &[n], &x),
    );
    let terms = [Term {
        weight: 1.0,
        density: 0.5,
        gamma: 0.0,
        epsilon: 0.2,
    }];
    let g = Gta {
        sparsify: Sparsify::Della,
        consensus: false,
        normalize: false,
        rescale: false,
        lambda: 1.0,
        seed: 3,
    };
    let m = gta(
        &Device::Cpu,
        &[tb.view(), tx.view()],
        &terms,
        &g,
        "w",
        None,
        DType::F32,
    )
    .unwrap();
    let got = m.tensor.to_f32_vec();
    let share = |r: std::ops::Range<usize>| {
        got[r.clone()].iter().filter(|v| **v != 0.0).count() as f64 / r.len() as f64
    };
    // 10,000 draws each: ±5 standard deviations (0.005).
    assert!(
        (share(0..10_000) - 0.32).abs() < 0.025,
        "{}",
        share(0..10_000)
    );
    assert!(
        (share(90_000..n) - 0.68).abs() < 0.025,
        "{}",
        share(90_000..n)
    );
    assert!((m.kept[0] - 0.5).abs() < 0.01, "{}", m.kept[0]);
}

#[test]
fn model_stock_keeps_the_base_when_offsets_cancel() {
    let mut rng = Rng::new(4);
    let n = 500;
    let base: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let d: Vec<f32> = (0..n).map(|_| rng.normal() as f32 * 0.1).collect();
    let a: Vec<f32> = base.iter().zip(&d).map(|(b, d)| b + d).collect();
    let b: Vec<f32> = base.iter().zip(&d).map(|(b, d)| b - d).collect();
    let t = |v: &[f32]| tensor(DType::F32, &[n], v);
    let (tb, ta, tm) = (t(&base), t(&a), t(&b));
    // cos θ ≈ −1 between the offsets: 1 + (N − 1)·cos θ ≈ 0, t = 0.
    let (out, _) = model_stock(
        &Device::Cpu,
        &[tb.view(), ta.view(), tm.view()],
        Vectors::Whole,
        None,
        DType::F32,
    )
    .unwrap();
    let got = out.to_f32_vec();
    for (g, b) in got.iter().zip(&base) {
        assert!((g - b).abs() <= 1e-6 * (1.0 + b.abs()), "{g} vs {b}");
    }
    // Equal offsets: cos θ = 1, t = 1, the models' mean.
    let (out, _) = model_stock(
        &Device::Cpu,
        &[tb.view(), ta.view(), ta.view()],
        Vectors::Whole,
        None,
        DType::F32,
    )
    .unwrap();
    for (g, x) in out.to_f32_vec().iter().zip(&a) {
        assert!((g - x).abs() <= 1e-6 * (1.0 + x.abs()), "{g} vs {x}");
    }
}

fn close(got: &[f32], want: &[f32], tol: f32) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{i}: {g} vs {w}");
    }
}

#[test]
fn karcher_and_multislerp_on_simple_geometry() {
    let mut rng = Rng::new(5);
    let n = 70_000; // past one block: the Gram matrix sums blocks
    let x: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let y: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let scaled = |v: &[f32], s: f32| {
        tensor(
            DType::F32,
            &[n],
            &v.iter().map(|a| a * s).collect::<Vec<_>>(),
        )
    };
    let (x1, x2, y1) = (scaled(&x, 1.0), scaled(&x, 2.0), scaled(&y, 1.0));
    // One direction: the mean of the norms along it.
    let (k, _) = karcher(
        &Device::Cpu,
        &[x1.view(), x2.view()],
        10,
        1e-5,
        None,
        DType::F32,
    )
    .unwrap();
    close(&k.to_f32_vec(), &scaled(&x, 1.5).to_f32_vec(), 1e-5);
    // Two orthogonal unit-norm directions: the midpoint of the arc, at the
    // mean norm (x and y are nearly orthogonal and of norm ≈ √n).
    let (k, _) = karcher(
        &Device::Cpu,
        &[x1.view(), y1.view()],
        10,
        1e-7,
        None,
        DType::F32,
    )
    .unwrap();
    let (nx, ny) = (norm(&x), norm(&y));
    let mid: Vec<f32> = x.iter().zip(&y).map(|(a, b)| a / nx + b / ny).collect();
    let want: Vec<f32> = mid
        .iter()
        .map(|v| v / norm(&mid) * (nx + ny) / 2.0)
        .collect();
    close(&k.to_f32_vec(), &want, 1e-4);
    let (m, _) = multislerp(
        &Device::Cpu,
        None,
        &[x1.view(), x2.view()],
        &[0.5, 0.5],
        true,
        1e-8,
        None,
        DType::F32,
    )
    .unwrap();
    close(&m.to_f32_vec(), &scaled(&x, 1.5).to_f32_vec(), 1e-5);
    // Every model equal to the base: the base.
    let (m, _) = multislerp(
        &Device::Cpu,
        Some(&y1.view()),
        &[y1.view(), y1.view(), y1.view()],
        &[1.0, 1.0, 1.0],
        true,
        1e-8,
        None,
        DType::F32,
    )
    .unwrap();
    assert_eq!(m.to_f32_vec(), y);
    // Antipodal deltas with balancing weights: the lerp for two, an error
    // for three.
    let neg = scaled(&x, -1.0);
    let (m, _) = multislerp(
        &Device::Cpu,
        None,
        &[x1.view(), neg.view()],
        &[1.0, 1.0],
        true,
        1e-8,
        None,
        DType::F32,
    )
    .unwrap();
    assert!(m.to_f32_vec().iter().all(|v| v.abs() < 1e-6));
    assert!(multislerp(
        &Device::Cpu,
        None,
        &[x1.view(), neg.view(), x1.view(), neg.view()],
        &[1.0; 4],
        true,
        1e-8,
        None,
        DType::F32
    )
    .is_err());
    assert!(multislerp(
        &Device::Cpu,
        None,
        &[x1.view(), y1.view()],
        &[1.0, -1.0],
        true,
        1e-8,
        None,
        DType::F32
    )
    .is_err());
}

fn norm(v: &[f32]) -> f32 {
    v.iter()
        .map(|a| (*a as f64) * (*a as f64))
        .sum::<f64>()
        .sqrt() as f32
}

#[test]
fn nuslerp_by_columns_is_by_rows_of_the_transpose() {
    let mut rng = Rng::new(6);
    // 300 × 200: the column sums span several blocks of rows.
    let (r, c) = (300, 200);
    let a: Vec<f32> = (0..r * c).map(|_| rng.normal() as f32).collect();
    let b: Vec<f32> = (0..r * c).map(|_| rng.normal() as f32).collect();
    let tr = |v: &[f32]| -> Vec<f32> { (0..r * c).map(|k| v[(k % r) * c + k / r]).collect() };
    let (ta, tb) = (
        tensor(DType::F32, &[r, c], &a),
        tensor(DType::F32, &[r, c], &b),
    );
    let (sa, sb) = (
        tensor(DType::F32, &[c, r], &tr(&a)),
        tensor(DType::F32, &[c, r], &tr(&b)),
    );
    let (cols, _) = nuslerp(
        &Device::Cpu,
        None,
        &ta.view(),
        &tb.view(),
        0.3,
        Vectors::Columns,
        None,
        DType::F32,
    )
    .unwrap();
    let (rows, _) = nuslerp(
        &Device::Cpu,
        None,
        &sa.view(),
        &sb.view(),
        0.3,
        Vectors::Rows,
        None,
        DType::F32,
    )
    .unwrap();
    close(&tr(&cols.to_f32_vec()), &rows.to_f32_vec(), 1e-6);
    // A 1-D tensor is one vector either way.
    let (v0, v1) = (
        tensor(DType::F32, &[c], &a[..c]),
        tensor(DType::F32, &[c], &b[..c]),
    );
    let (x, _) = nuslerp(
        &Device::Cpu,
        None,
        &v0.view(),
        &v1.view(),
        0.3,
        Vectors::Columns,
        None,
        DType::F32,
    )
    .unwrap();
    let (w, _) = nuslerp(
        &Device::Cpu,
        None,
        &v0.view(),
        &v1.view(),
        0.3,
        Vectors::Whole,
        None,
        DType::F32,
    )
    .unwrap();
    assert_eq!(x.to_f32_vec(), w.to_f32_vec());
}
