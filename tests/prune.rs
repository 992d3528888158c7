//! Thresholding: GPU and CPU bit-identical on every dtype, shape and chunk
//! size; the CPU reference checked against the rule itself.

mod common;
use common::*;
use modelpress::ops::diff::diff;
use modelpress::prune::{self, NeuronNorm};
use modelpress::tools::sample::Rng;
use modelpress::{DType, Device, Error};

#[test]
fn threshold_follows_the_rule_on_cpu() {
    let mut rng = Rng::new(seed("threshold_rule"));
    for dtype in FLOATS {
        let tau = dtype_round(dtype, 0.04);
        let v = weights(&mut rng, 5000, tau);
        let t = tensor(dtype, &[5000], &v);
        let (out, st) = prune::threshold(&Device::Cpu, &t.view(), tau).unwrap();
        let (inp, got) = (t.to_f32_vec(), out.to_f32_vec());
        let mut pruned = 0;
        for i in 0..inp.len() {
            if inp[i].abs() < tau {
                assert_eq!(
                    got[i].to_bits(),
                    0,
                    "{dtype} {i}: {} must become +0",
                    inp[i]
                );
                pruned += 1;
            } else {
                assert_eq!(
                    got[i].to_bits(),
                    inp[i].to_bits(),
                    "{dtype} {i}: {} kept",
                    inp[i]
                );
            }
        }
        assert!(
            inp.iter().any(|x| x.abs() == tau),
            "data holds values exactly at τ"
        );
        assert_eq!(st.pruned, pruned);
        assert_eq!(st.zeros as usize, got.iter().filter(|x| **x == 0.0).count());
        assert!(
            st.sparsity() > 0.3 && st.sparsity() < 0.9,
            "{}",
            st.sparsity()
        );
    }
}

/// τ as the dtype stores it, so that values exactly at τ exist in the data.
fn dtype_round(dtype: DType, x: f32) -> f32 {
    tensor(dtype, &[1], &[x]).to_f32_vec()[0]
}

#[test]
fn threshold_gpu_matches_cpu() {
    let mut rng = Rng::new(seed("threshold_gpu"));
    for (name, dev) in gpu_variants() {
        for dtype in FLOATS {
            for shape in shapes(&mut rng) {
                let n: usize = shape.iter().product();
                let tau = dtype_round(dtype, 0.03);
                let t = tensor(dtype, &shape, &weights(&mut rng, n, tau));
                let ctx = format!("{name} {dtype} {shape:?}");
                let (g, gs) = prune::threshold(&dev, &t.view(), tau).unwrap();
                let (c, cs) = prune::threshold(&Device::Cpu, &t.view(), tau).unwrap();
                assert_identical(&g, &c, &ctx);
                assert_eq!(
                    (gs.numel, gs.pruned, gs.zeros),
                    (cs.numel, cs.pruned, cs.zeros),
                    "{ctx}"
                );
                assert_diff_close(&gs.diff, &cs.diff, &ctx);
            }
        }
    }
}

#[test]
fn threshold_special_values() {
    let v = [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        0.0,
        -0.0,
        1e-40,
        -1e-40,
        f32::MIN_POSITIVE,
        0.5,
        -0.5,
        0.49999997,
    ];
    let mut devs = vec![("cpu".to_string(), Device::Cpu)];
    devs.extend(gpu_variants());
    for (name, dev) in &devs {
        for dtype in FLOATS {
            let t = tensor(dtype, &[v.len()], &v);
            let inp = t.to_f32_vec();
            for tau in [0.0, 0.5, f32::INFINITY, -0.0] {
                let (out, st) = prune::threshold(dev, &t.view(), tau).unwrap();
                let got = out.to_f32_vec();
                let ctx = format!("{name} {dtype} τ={tau}");
                for i in 0..v.len() {
                    if inp[i].is_nan() || inp[i].is_infinite() {
                        // Never pruned: |NaN| < τ is false, |inf| < inf too.
                        assert_eq!(out.raw_bits()[i], t.raw_bits()[i], "{ctx} {i}");
                    } else if inp[i].abs() < tau {
                        assert_eq!(got[i].to_bits(), 0, "{ctx} {i}");
                    } else {
                        assert_eq!(out.raw_bits()[i], t.raw_bits()[i], "{ctx} {i}");
                    }
                }
                let (c, cs) = prune::threshold(&Device::Cpu, &t.view(), tau).unwrap();
                assert_identical(&out, &c, &ctx);
                assert_eq!(st, cs, "{ctx}");
            }
        }
    }
}

#[test]
fn threshold_rejects_bad_tau() {
    let t = tensor(DType::F32, &[4], &[1.0, 2.0, 3.0, 4.0]);
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in devs {
        for tau in [-0.1, f32::NAN, f32::NEG_INFINITY] {
            let e = prune::threshold(&dev, &t.view(), tau).unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{e}");
            let e = prune::prune_neurons(&dev, &t.view(), tau, NeuronNorm::L2).unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{e}");
        }
    }
}

/// Rows with norms spread around τ, some exactly at it, some within a few
/// ulps: the GPU must hand close calls to the reference.
fn rows_near_tau(rng: &mut Rng, rows: usize, cols: usize, tau: f32, norm: NeuronNorm) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let row: Vec<f32> = (0..cols).map(|_| rng.normal() as f32).collect();
        let norm = match norm {
            NeuronNorm::L1 => row.iter().map(|x| x.abs() as f64).sum::<f64>(),
            NeuronNorm::L2 => row.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt(),
            NeuronNorm::Max => row.iter().fold(0f64, |m, x| m.max(x.abs() as f64)),
        };
        let target = match r % 4 {
            0 => tau as f64,
            1 => tau as f64 * (1.0 + 1e-7 * (rng.uniform() - 0.5)),
            2 => tau as f64 * (0.5 + 0.4 * rng.uniform()),
            _ => tau as f64 * (1.1 + 0.4 * rng.uniform()),
        };
        let s = (target / norm.max(1e-30)) as f32;
        v.extend(row.iter().map(|x| x * s));
    }
    v
}

#[test]
fn neurons_match_reference_and_gpu() {
    let mut rng = Rng::new(seed("neurons"));
    let mut devs = gpu_variants();
    devs.insert(0, ("cpu".into(), Device::Cpu));
    for (name, dev) in &devs {
        for dtype in FLOATS {
            for &(rows, cols) in &[
                (1, 1),
                (7, 1),
                (13, 3),
                (33, 257),
                (5, 5000),
                (300, 17),
                (2, 9000),
                (0, 4),
            ] {
                let tau = 1.0;
                for norm in [NeuronNorm::L1, NeuronNorm::L2, NeuronNorm::Max] {
                    let t = tensor(
                        dtype,
                        &[rows, cols],
                        &rows_near_tau(&mut rng, rows, cols, tau, norm),
                    );
                    let ctx = format!("{name} {dtype} [{rows}, {cols}] {norm:?}");
                    let (out, st) = prune::prune_neurons(dev, &t.view(), tau, norm).unwrap();
                    // The reference rule, row by row, in f64.
                    let x = t.to_f32_vec();
                    for r in 0..rows {
                        let row = &x[r * cols..(r + 1) * cols];
                        let measure = match norm {
                            NeuronNorm::L1 => row.iter().map(|v| v.abs() as f64).sum::<f64>(),
                            NeuronNorm::L2 => {
                                row.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()
                            }
                            NeuronNorm::Max => row.iter().fold(0f64, |m, v| m.max(v.abs() as f64)),
                        };
                        assert_eq!(
                            st.zeroed[r],
                            measure < tau as f64,
                            "{ctx} row {r}: measure {measure}"
                        );
                        let got = &out.raw_bits()[r * cols..(r + 1) * cols];
                        if st.zeroed[r] {
                            assert!(got.iter().all(|&b| b == 0), "{ctx} row {r} zeroed");
                        } else {
                            assert_eq!(
                                got,
                                &t.raw_bits()[r * cols..(r + 1) * cols],
                                "{ctx} row {r} kept"
                            );
                        }
                    }
                    if rows > 3 {
                        assert!(
                            st.neurons_zeroed() > 0 && st.neurons_zeroed() < rows,
                            "{ctx}: a mix of rows"
                        );
                    }
                    let (c, cs) = prune::prune_neurons(&Device::Cpu, &t.view(), tau, norm).unwrap();
                    assert_identical(&out, &c, &ctx);
                    assert_eq!(
                        (st.numel, &st.zeroed, st.zeros),
                        (cs.numel, &cs.zeroed, cs.zeros),
                        "{ctx}"
                    );
                    // Figures from the zeroing pass: as a pass of their own.
                    assert_diff_close(&st.diff, &diff(&t.view(), &out.view()), &ctx);
                    assert_eq!(st.zeros, st.diff.zeros, "{ctx}");
                }
            }
        }
    }
}

#[test]
fn neurons_special_values_and_activations() {
    let nan_row = [0.001, f32::NAN, 0.0];
    let inf_row = [f32::INFINITY, 0.0, 0.0];
    let small = [0.001, -0.002, 0.0];
    let v: Vec<f32> = [nan_row, inf_row, small].concat();
    let mut devs = vec![("cpu".to_string(), Device::Cpu)];
    devs.extend(gpu_variants());
    for (name, dev) in &devs {
        for dtype in FLOATS {
            let t = tensor(dtype, &[3, 3], &v);
            for norm in [NeuronNorm::L2, NeuronNorm::Max] {
                for tau in [0.5, f32::INFINITY] {
                    let (out, st) = prune::prune_neurons(dev, &t.view(), tau, norm).unwrap();
                    // A NaN row is never zeroed; an infinite row only stays
                    // when τ is finite... or infinite too (inf < inf is false).
                    assert_eq!(
                        st.zeroed,
                        vec![false, false, true],
                        "{name} {dtype} {norm:?} τ={tau}"
                    );
                    let (c, _) = prune::prune_neurons(&Device::Cpu, &t.view(), tau, norm).unwrap();
                    assert_identical(&out, &c, name);
                }
            }
            // 1-D: activations thresholded one by one.
            let a = tensor(dtype, &[5], &[0.1, -2.0, 0.6, f32::NAN, -0.3]);
            let (out, st) = prune::prune_neurons(dev, &a.view(), 0.5, NeuronNorm::L2).unwrap();
            assert_eq!(
                st.zeroed,
                vec![true, false, false, false, true],
                "{name} {dtype}"
            );
            assert_eq!(
                out.to_f32_vec()[..3],
                [0.0, -2.0, tensor(dtype, &[1], &[0.6]).to_f32_vec()[0]]
            );
        }
    }
}

/// The structured reference: f64 norms per line, the k smallest by
/// (norm, index).
fn lines_brute_force(
    t: &modelpress::Tensor,
    axis: prune::Axis,
    s: f64,
    norm: NeuronNorm,
) -> Vec<bool> {
    let (rows, cols) = (t.shape[0], t.shape[1..].iter().product::<usize>());
    let x = t.to_f32_vec();
    let n = if axis == prune::Axis::Rows {
        rows
    } else {
        cols
    };
    let line = |i: usize| -> Vec<f64> {
        if axis == prune::Axis::Rows {
            (0..cols).map(|c| x[i * cols + c] as f64).collect()
        } else {
            (0..rows).map(|r| x[r * cols + i] as f64).collect()
        }
    };
    let measure = |v: Vec<f64>| match norm {
        NeuronNorm::L1 => v.iter().map(|a| a.abs()).sum::<f64>(),
        NeuronNorm::L2 => v.iter().map(|a| a * a).sum::<f64>(),
        NeuronNorm::Max => v.iter().fold(0f64, |m, a| m.max(a.abs())),
    };
    let mut order: Vec<(f64, usize)> = (0..n).map(|i| (measure(line(i)), i)).collect();
    order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let k = modelpress::select::count_for(s, n as u64) as usize;
    let mut mask = vec![false; n];
    order[..k].iter().for_each(|&(_, i)| mask[i] = true);
    mask
}

#[test]
fn structured_fractions_match_the_reference_on_every_device() {
    let mut rng = Rng::new(seed("structured"));
    let mut devs = vec![("cpu".to_string(), Device::Cpu)];
    devs.extend(gpu_variants());
    for (name, dev) in &devs {
        for dtype in FLOATS {
            for &(rows, cols) in &[(1, 1), (6, 5), (40, 33), (13, 700), (300, 9), (3, 3000)] {
                // Lines of near-equal norm: one base row repeated with tiny
                // changes, plus exact duplicates.
                let base: Vec<f32> = (0..cols).map(|_| rng.normal() as f32).collect();
                let mut v = Vec::with_capacity(rows * cols);
                for r in 0..rows {
                    for (c, b) in base.iter().enumerate() {
                        let bump = if r % 3 == 0 {
                            0.0
                        } else {
                            (rng.normal() * 1e-3) as f32
                        };
                        v.push(b * (1.0 + bump) + if (r + c) % 7 == 0 { 1e-4 } else { 0.0 });
                    }
                }
                let t = tensor(dtype, &[rows, cols], &v);
                for axis in [prune::Axis::Rows, prune::Axis::Cols] {
                    for norm in [NeuronNorm::L1, NeuronNorm::L2, NeuronNorm::Max] {
                        for s in [0.0, 0.25, 0.5, 1.0] {
                            let ctx =
                                format!("{name} {dtype} [{rows}, {cols}] {axis:?} {norm:?} s={s}");
                            let (out, mask, d) =
                                prune::prune_lines(dev, &t.view(), axis, s, norm).unwrap();
                            assert_eq!(mask, lines_brute_force(&t, axis, s, norm), "{ctx}");
                            let o = out.raw_bits();
                            let i = t.raw_bits();
                            for (e, (&a, &b)) in o.iter().zip(&i).enumerate() {
                                let l = if axis == prune::Axis::Rows {
                                    e / cols
                                } else {
                                    e % cols
                                };
                                assert_eq!(a, if mask[l] { 0 } else { b }, "{ctx} element {e}");
                            }
                            assert_diff_close(&d, &diff(&t.view(), &out.view()), &ctx);
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn structured_needs_a_matrix_and_a_fraction() {
    let v = tensor(DType::F32, &[4], &[1.0; 4]);
    let m = tensor(DType::F32, &[2, 2], &[1.0; 4]);
    assert!(matches!(
        prune::prune_lines(
            &Device::Cpu,
            &v.view(),
            prune::Axis::Rows,
            0.5,
            NeuronNorm::L2
        ),
        Err(Error::Input(_))
    ));
    for s in [-0.5, 1.01, f64::NAN] {
        assert!(matches!(
            prune::prune_lines(
                &Device::Cpu,
                &m.view(),
                prune::Axis::Cols,
                s,
                NeuronNorm::L2
            ),
            Err(Error::Input(_))
        ));
    }
}
