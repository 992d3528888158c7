//! Offsets and weighted sums. Bounds (the GPU may fuse multiply-add and
//! adds row tiles' partial sums; each 16-bit output may round to the other
//! neighbour): |gpu - cpu| ≤ (terms + 1) ulps_f32 of Σ|terms| + 1 ulp of
//! the output dtype. A scalar offset is one addition: exact.

mod common;
use common::*;
use modelpress::mix::{self, MAX_MIX_INPUTS};
use modelpress::tools::sample::Rng;
use modelpress::transfer::{self, Delta};
use modelpress::{DType, Device, Error, Tensor};

fn bound(dtype: DType, terms: usize, sum_abs: f64, result: f64) -> f64 {
    (terms as f64 + 1.0) * ulp_f32(sum_abs)
        + if dtype == DType::F32 {
            0.0
        } else {
            ulp_dtype(dtype, result)
        }
}

#[test]
fn scalar_offset_is_exact_and_follows_the_rule() {
    let mut rng = Rng::new(seed("offset_scalar"));
    let mut devs = vec![("cpu".to_string(), Device::Cpu)];
    devs.extend(gpu_variants());
    for (name, dev) in &devs {
        for dtype in FLOATS {
            for shape in shapes(&mut rng) {
                let n: usize = shape.iter().product();
                let t = tensor(dtype, &shape, &weights(&mut rng, n, 0.1));
                let (x, lambda) = (0.0123f32, -0.75f32);
                let got = transfer::transfer(dev, &t.view(), Delta::Scalar(x), lambda).unwrap();
                let c = lambda * x;
                let want: Vec<f32> = t.to_f32_vec().iter().map(|w| w + c).collect();
                assert_identical(
                    &got,
                    &tensor(dtype, &shape, &want),
                    &format!("{name} {dtype} {shape:?}"),
                );
            }
        }
    }
}

#[test]
fn tensor_offset_gpu_within_bound() {
    let mut rng = Rng::new(seed("offset_tensor"));
    for (name, dev) in gpu_variants() {
        for dtype in FLOATS {
            for ddtype in [DType::F32, dtype] {
                for shape in shapes(&mut rng) {
                    let n: usize = shape.iter().product();
                    let w = tensor(dtype, &shape, &weights(&mut rng, n, 0.1));
                    let d = tensor(ddtype, &shape, &weights(&mut rng, n, 0.01));
                    let lambda = 0.37;
                    let ctx = format!("{name} {dtype}+{ddtype} {shape:?}");
                    let got = transfer::transfer(&dev, &w.view(), Delta::Tensor(d.view()), lambda)
                        .unwrap();
                    let cpu = transfer::transfer(
                        &Device::Cpu,
                        &w.view(),
                        Delta::Tensor(d.view()),
                        lambda,
                    )
                    .unwrap();
                    let (wv, dv, cv) = (w.to_f32_vec(), d.to_f32_vec(), cpu.to_f32_vec());
                    // The reference itself: w + λ·Δ in f32, rounded to the dtype.
                    let want: Vec<f32> = (0..n).map(|i| wv[i] + lambda * dv[i]).collect();
                    assert_identical(&cpu, &tensor(dtype, &shape, &want), &format!("cpu {ctx}"));
                    assert_within(
                        &got,
                        &cpu,
                        |i| {
                            bound(
                                dtype,
                                2,
                                wv[i].abs() as f64 + (lambda * dv[i]).abs() as f64,
                                cv[i] as f64,
                            )
                        },
                        &ctx,
                    );
                }
            }
        }
    }
}

#[test]
fn mix_gpu_within_bound() {
    let mut rng = Rng::new(seed("mix"));
    for (name, dev) in gpu_variants() {
        for dtype in FLOATS {
            for k in [2, 3, 5, MAX_MIX_INPUTS] {
                for shape in shapes(&mut rng).into_iter().step_by(2) {
                    let n: usize = shape.iter().product();
                    let inputs: Vec<Tensor> = (0..k)
                        .map(|_| tensor(dtype, &shape, &weights(&mut rng, n, 0.1)))
                        .collect();
                    let p: Vec<f32> = (0..k).map(|_| rng.uniform() as f32 * 2.0 - 0.5).collect();
                    let views: Vec<_> = inputs.iter().map(|t| t.view()).collect();
                    let ctx = format!("{name} {dtype} k={k} {shape:?}");
                    let got = match mix::mix(&dev, &views, &p) {
                        Ok(g) => g,
                        // 16 f32 inputs in 768 B: a binding too small for 64 elements each.
                        Err(Error::Limit { .. })
                            if name.contains("768") && k * dtype.size() * 64 > 768 =>
                        {
                            continue
                        }
                        Err(e) => panic!("{ctx}: {e}"),
                    };
                    let cpu = mix::mix(&Device::Cpu, &views, &p).unwrap();
                    let vals: Vec<Vec<f32>> = inputs.iter().map(|t| t.to_f32_vec()).collect();
                    let want: Vec<f32> = (0..n)
                        .map(|i| {
                            let mut acc = p[0] * vals[0][i];
                            for j in 1..k {
                                acc += p[j] * vals[j][i];
                            }
                            acc
                        })
                        .collect();
                    assert_identical(&cpu, &tensor(dtype, &shape, &want), &format!("cpu {ctx}"));
                    let cv = cpu.to_f32_vec();
                    assert_within(
                        &got,
                        &cpu,
                        |i| {
                            let s: f64 = (0..k).map(|j| (p[j] * vals[j][i]).abs() as f64).sum();
                            bound(dtype, k, s, cv[i] as f64)
                        },
                        &ctx,
                    );
                }
            }
        }
    }
}

#[test]
fn mix_rows_gpu_within_bound() {
    let mut rng = Rng::new(seed("mix_rows"));
    for (name, dev) in gpu_variants() {
        for dtype in FLOATS {
            for shape in [
                vec![1, 1],
                vec![2, 5],
                vec![7, 1],
                vec![64, 33],
                vec![5, 1030],
                vec![300, 7],
                vec![3, 4, 5],
                vec![0, 6],
                vec![4, 0],
                vec![2, 9000],
            ] {
                let (rows, cols) = (shape[0], shape[1..].iter().product::<usize>());
                let t = tensor(dtype, &shape, &weights(&mut rng, rows * cols, 0.1));
                let p: Vec<f32> = (0..rows).map(|_| rng.uniform() as f32 - 0.3).collect();
                let ctx = format!("{name} {dtype} {shape:?}");
                let got = mix::mix_rows(&dev, &t.view(), &p).unwrap();
                let cpu = mix::mix_rows(&Device::Cpu, &t.view(), &p).unwrap();
                assert_eq!(got.shape, shape[1..].to_vec(), "{ctx}");
                let x = t.to_f32_vec();
                let want: Vec<f32> = (0..cols)
                    .map(|c| {
                        if rows == 0 {
                            return 0.0;
                        }
                        let mut acc = p[0] * x[c];
                        for r in 1..rows {
                            acc += p[r] * x[r * cols + c];
                        }
                        acc
                    })
                    .collect();
                assert_identical(
                    &cpu,
                    &tensor(dtype, &shape[1..], &want),
                    &format!("cpu {ctx}"),
                );
                let cv = cpu.to_f32_vec();
                assert_within(
                    &got,
                    &cpu,
                    |c| {
                        let s: f64 = (0..rows)
                            .map(|r| (p[r] * x[r * cols + c]).abs() as f64)
                            .sum();
                        bound(dtype, rows, s, cv[c] as f64)
                    },
                    &ctx,
                );
            }
        }
    }
}

/// IEEE special cases, decided on bits on every device: NaN in, canonical
/// NaN out; inf + finite = inf; inf - inf = NaN; 0·inf = NaN.
#[test]
fn special_values_are_defined() {
    const NAN: u32 = 0x7fc0_0000;
    let inf = f32::INFINITY;
    let w = [1.0, f32::NAN, inf, inf, -inf, 2.0, inf, 3.0];
    let d = [2.0, 1.0, 1.0, -inf, -inf, -f32::NAN, inf, f32::MAX];
    let mut devs = vec![("cpu".to_string(), Device::Cpu)];
    devs.extend(gpu_variants());
    for (name, dev) in &devs {
        for dtype in FLOATS {
            let (wt, dt) = (tensor(dtype, &[8], &w), tensor(dtype, &[8], &d));
            let ctx = format!("{name} {dtype}");
            let nan = tensor(dtype, &[1], &[f32::from_bits(NAN)]).raw_bits()[0];
            let pinf = tensor(dtype, &[1], &[inf]).raw_bits()[0];
            let ninf = tensor(dtype, &[1], &[-inf]).raw_bits()[0];
            // w + 1·Δ
            let got = transfer::transfer(dev, &wt.view(), Delta::Tensor(dt.view()), 1.0)
                .unwrap()
                .raw_bits();
            assert_eq!(&got[1..7], &[nan, pinf, nan, ninf, nan, pinf], "{ctx} w+Δ");
            // λ = 0: 0·inf is NaN; 0·finite leaves w.
            let got = transfer::transfer(dev, &wt.view(), Delta::Tensor(dt.view()), 0.0)
                .unwrap()
                .raw_bits();
            assert_eq!(got[3], nan, "{ctx} 0·inf");
            assert_eq!(got[0], wt.raw_bits()[0], "{ctx} 0·finite");
            // Scalar offsets keep infinities and canonicalize NaN.
            let got = transfer::transfer(dev, &wt.view(), Delta::Scalar(1.0), 1.0)
                .unwrap()
                .raw_bits();
            assert_eq!(&got[1..5], &[nan, pinf, pinf, ninf], "{ctx} w+1");
            // Mixing: the same rules.
            let got = mix::mix(dev, &[wt.view(), dt.view()], &[0.5, 0.5])
                .unwrap()
                .raw_bits();
            assert_eq!(&got[1..7], &[nan, pinf, nan, ninf, nan, pinf], "{ctx} mix");
            let m = tensor(dtype, &[2, 8], &[w, d].concat());
            let got = mix::mix_rows(dev, &m.view(), &[0.5, 0.5])
                .unwrap()
                .raw_bits();
            assert_eq!(
                &got[1..7],
                &[nan, pinf, nan, ninf, nan, pinf],
                "{ctx} mix_rows"
            );
            let got = mix::mix_rows(dev, &m.view(), &[0.0, 1.0])
                .unwrap()
                .raw_bits();
            assert_eq!(got[2], nan, "{ctx} mix_rows 0·inf");
        }
    }
}

#[test]
fn invalid_parameters_are_errors() {
    let a = tensor(DType::F32, &[2, 3], &[1.0; 6]);
    let b = tensor(DType::F32, &[3, 2], &[1.0; 6]);
    let h = tensor(DType::BF16, &[2, 3], &[1.0; 6]);
    let mut devs = vec![Device::Cpu];
    devs.extend(gpu());
    for dev in &devs {
        let input = |r: modelpress::Result<Tensor>| {
            assert!(matches!(r, Err(Error::Input(_))), "{:?}", r.err())
        };
        input(transfer::transfer(
            dev,
            &a.view(),
            Delta::Tensor(b.view()),
            1.0,
        ));
        input(transfer::transfer(
            dev,
            &a.view(),
            Delta::Scalar(1.0),
            f32::NAN,
        ));
        input(transfer::transfer(
            dev,
            &a.view(),
            Delta::Scalar(f32::INFINITY),
            1.0,
        ));
        input(transfer::transfer(
            dev,
            &a.view(),
            Delta::Scalar(f32::MAX),
            2.0,
        ));
        input(mix::mix(dev, &[a.view()], &[1.0]));
        input(mix::mix(dev, &[a.view(), a.view()], &[1.0]));
        input(mix::mix(dev, &[a.view(), a.view()], &[1.0, 0.5, 0.5]));
        input(mix::mix(dev, &[a.view(), b.view()], &[0.5, 0.5]));
        input(mix::mix(dev, &[a.view(), h.view()], &[0.5, 0.5]));
        input(mix::mix(dev, &[a.view(), a.view()], &[0.5, f32::NAN]));
        let many: Vec<_> = (0..MAX_MIX_INPUTS + 1).map(|_| a.view()).collect();
        input(mix::mix(dev, &many, &[0.1; MAX_MIX_INPUTS + 1]));
        input(mix::mix_rows(dev, &a.view(), &[1.0]));
        input(mix::mix_rows(dev, &a.view(), &[1.0, f32::INFINITY]));
        let v = tensor(DType::F32, &[3], &[1.0; 3]);
        input(mix::mix_rows(dev, &v.view(), &[1.0, 1.0, 1.0]));
    }
}
