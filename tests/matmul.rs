//! The matmul kernel family: the CPU reference within its stated bound of
//! the exact product, and the GPU equal to it bit for bit (normal values),
//! in every dtype mix, odd shape and chunking.

mod common;

use common::{gpu_variants, seed, FLOATS};
use modelpress::ops::matmul::matmul;
use modelpress::tools::sample::Rng;
use modelpress::{DType, Device, Tensor};

fn random(rng: &mut Rng, dtype: DType, r: usize, c: usize, scale: f64) -> Tensor {
    let v: Vec<f32> = (0..r * c).map(|_| (rng.normal() * scale) as f32).collect();
    Tensor::from_f32(dtype, &[r, c], &v).unwrap()
}

#[test]
fn cpu_within_the_bound_and_gpu_bit_for_bit() {
    let mut rng = Rng::new(seed("matmul"));
    let gpus = gpu_variants();
    let shapes = [
        (1, 1, 1),
        (3, 5, 7),
        (17, 16, 33),
        (64, 8, 130),
        (40, 300, 24),
        (2, 1000, 3),
    ];
    for (m, k, n) in shapes {
        for (i, &da) in FLOATS.iter().enumerate() {
            let db = FLOATS[(i + 1) % 3];
            let dc = FLOATS[(i + 2) % 3];
            let a = random(&mut rng, da, m, k, 1.0);
            let b = random(&mut rng, db, k, n, 0.1);
            let c = random(&mut rng, dc, m, n, 1.0);
            let alpha = 0.37f32;
            for with_c in [false, true] {
                let cref = with_c.then(|| c.view());
                let want = matmul(
                    &Device::Cpu,
                    &a.view(),
                    &b.view(),
                    alpha,
                    cref.as_ref(),
                    DType::F32,
                )
                .unwrap();
                let (av, bv, cv, y) = (
                    a.to_f32_vec(),
                    b.to_f32_vec(),
                    c.to_f32_vec(),
                    want.to_f32_vec(),
                );
                for r in 0..m {
                    for j in 0..n {
                        let (mut exact, mut mag) = (0f64, 0f64);
                        for kk in 0..k {
                            let p = av[r * k + kk] as f64 * bv[kk * n + j] as f64;
                            exact += p;
                            mag += p.abs();
                        }
                        let cx = if with_c { cv[r * n + j] as f64 } else { 0.0 };
                        let exact = cx + alpha as f64 * exact;
                        let bound = (k as f64 + 2.0) * 2f64.powi(-24) * alpha as f64 * mag
                            + 2f64.powi(-24) * (cx.abs() + exact.abs());
                        let got = y[r * n + j] as f64;
                        assert!(
                            (got - exact).abs() <= bound,
                            "{m}x{k}x{n} ({r},{j}): {got} vs {exact}, bound {bound}"
                        );
                    }
                }
                for out in FLOATS {
                    let want_t = matmul(
                        &Device::Cpu,
                        &a.view(),
                        &b.view(),
                        alpha,
                        cref.as_ref(),
                        out,
                    )
                    .unwrap();
                    for (name, dev) in &gpus {
                        let got =
                            matmul(dev, &a.view(), &b.view(), alpha, cref.as_ref(), out).unwrap();
                        assert_eq!(
                            got.data, want_t.data,
                            "{m}x{k}x{n} {da}/{db}/{dc} -> {out}, C {with_c}, on {name}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bad_inputs_are_refused() {
    let mut devs = vec![("cpu".to_string(), Device::Cpu)];
    devs.extend(gpu_variants());
    let a = Tensor::from_f32(DType::F32, &[2, 3], &[1.0, 2.0, f32::NAN, 0.0, 1.0, 2.0]).unwrap();
    let b = Tensor::from_f32(DType::F32, &[3, 2], &[1.0; 6]).unwrap();
    let b2 = Tensor::from_f32(DType::F32, &[2, 2], &[1.0; 4]).unwrap();
    for (name, dev) in &devs {
        let e = matmul(dev, &a.view(), &b.view(), 1.0, None, DType::F32).unwrap_err();
        assert!(e.to_string().contains("non-finite"), "{name}: {e}");
        let e = matmul(dev, &a.view(), &b2.view(), 1.0, None, DType::F32).unwrap_err();
        assert!(
            e.to_string().contains("A is 2×3 but B is 2×2"),
            "{name}: {e}"
        );
    }
}
