//! The task-arithmetic family's combining pass on the GPU against the CPU
//! reference (`ops::merge::gta`), at every chunking: the same masks (kept
//! shares equal exactly; DARE's draws, the rank cuts with ties across chunk
//! boundaries, DELLA's bits by rows) and the same values. lavapipe gives
//! identical bits; a GPU may fuse the last multiply-add, so the bound is
//! 2 ulps of the output dtype at max(|base|, λ·Σ|wᵢδᵢ|) (and the values as
//! rounded once).

mod common;

use common::{gpu_variants, seed};
use modelpress::device::Device;
use modelpress::ops::merge::{gta, Gta, Sparsify, Term};
use modelpress::tools::sample::Rng;
use modelpress::{DType, Tensor};

/// Deltas on a coarse grid (many exact ties in |δ|), some zero.
fn model(rng: &mut Rng, base: &[f32]) -> Vec<f32> {
    base.iter()
        .enumerate()
        .map(|(i, b)| {
            b + match i % 5 {
                0 => 0.0,
                1 | 2 => ((rng.uniform() * 16.0).floor() as f32 - 8.0) / 64.0,
                _ => rng.normal() as f32 * 0.1,
            }
        })
        .collect()
}

#[test]
fn gpu_combines_as_the_cpu_with_the_same_masks() {
    let variants = gpu_variants();
    if variants.is_empty() {
        return;
    }
    let mut rng = Rng::new(seed("merge gpu"));
    let shape = [37usize, 61];
    let n = shape[0] * shape[1];
    let base: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let xs: Vec<Vec<f32>> = (0..3).map(|_| model(&mut rng, &base)).collect();
    let term = |w: f32, d: f64| Term {
        weight: w,
        density: d,
        gamma: 0.05,
        epsilon: 0.1,
    };
    let terms = [term(1.0, 0.5), term(-0.4, 0.3), term(0.7, 0.8)];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let tb = Tensor::from_f32(dtype, &shape, &base).unwrap();
        let txs: Vec<Tensor> = xs
            .iter()
            .map(|x| Tensor::from_f32(dtype, &shape, x).unwrap())
            .collect();
        let mut refs = vec![tb.view()];
        refs.extend(txs.iter().map(|t| t.view()));
        for sparsify in [
            Sparsify::None,
            Sparsify::Magnitude,
            Sparsify::Random,
            Sparsify::Breadcrumbs,
            Sparsify::Della,
        ] {
            for (consensus, normalize, rescale) in [
                (false, false, false),
                (true, true, true),
                (false, true, true),
            ] {
                let g = Gta {
                    sparsify,
                    consensus,
                    normalize,
                    rescale,
                    lambda: 0.9,
                    seed: 77,
                };
                for (cast, out) in [(None, dtype), (Some(DType::BF16), DType::F32)] {
                    let ctx = format!("{dtype:?} {sparsify:?} consensus {consensus} normalize {normalize} cast {cast:?} out {out:?}");
                    let want = gta(&Device::Cpu, &refs, &terms, &g, "t", cast, out).unwrap();
                    let w = want.tensor.to_f32_vec();
                    for (label, dev) in &variants {
                        let got = gta(dev, &refs, &terms, &g, "t", cast, out).unwrap();
                        assert_eq!(got.kept, want.kept, "{ctx} {label}: kept shares");
                        for (i, (a, b)) in got.tensor.to_f32_vec().iter().zip(&w).enumerate() {
                            let scale = base[i].abs().max(w[i].abs()) as f64 + 1.0;
                            let bound = 2.0 * common::ulp_dtype(out, scale);
                            assert!(
                                ((a - b) as f64).abs() <= bound,
                                "{ctx} {label}: element {i}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// Every other method's last pass (`merge_sum`, `sce_combine`) against the
/// CPU reference, at every chunking: whole-tensor, per-row (rows cut by
/// chunks) and per-column coefficients, with and without a base, cast to
/// bf16 first. lavapipe gives identical bits (check_merge.py requires them
/// against numpy); a GPU may fuse a multiply-add or divide within 2.5
/// ulps, so the bound is 4 ulps of the output dtype at the largest operand.
#[test]
fn gpu_runs_every_other_method_as_the_cpu() {
    use modelpress::ops::merge::{
        karcher, linear, model_stock, multislerp, nearswap, nuslerp, sce, slerp, Vectors,
    };
    let variants = gpu_variants();
    if variants.is_empty() {
        return;
    }
    let mut rng = Rng::new(seed("merge gpu sums"));
    let shape = [29usize, 43];
    let n = shape[0] * shape[1];
    let base: Vec<f32> = (0..n).map(|_| rng.normal() as f32).collect();
    let xs: Vec<Vec<f32>> = (0..3).map(|_| model(&mut rng, &base)).collect();
    type Run<'a> =
        Box<dyn Fn(&Device, &[modelpress::TensorRef], Option<DType>, DType) -> Tensor + 'a>;
    let methods: Vec<(&str, Run)> = vec![
        (
            "linear",
            Box::new(|d, ts, c, o| {
                linear(d, &ts[1..], &[0.5, -0.25, 1.5], true, c, o)
                    .unwrap()
                    .0
            }),
        ),
        (
            "passthrough",
            Box::new(|d, ts, c, o| linear(d, &ts[1..2], &[0.7], false, c, o).unwrap().0),
        ),
        (
            "slerp",
            Box::new(|d, ts, c, o| slerp(d, &ts[0], &ts[1], 0.3, c, o).unwrap().0),
        ),
        (
            "nearswap",
            Box::new(|d, ts, c, o| nearswap(d, &ts[0], &ts[1], 0.05, c, o).unwrap().0),
        ),
        (
            "model_stock",
            Box::new(|d, ts, c, o| model_stock(d, ts, Vectors::Whole, c, o).unwrap().0),
        ),
        (
            "model_stock rows",
            Box::new(|d, ts, c, o| model_stock(d, ts, Vectors::Rows, c, o).unwrap().0),
        ),
        (
            "nuslerp",
            Box::new(|d, ts, c, o| {
                nuslerp(d, None, &ts[1], &ts[2], 0.4, Vectors::Whole, c, o)
                    .unwrap()
                    .0
            }),
        ),
        (
            "nuslerp base rows",
            Box::new(|d, ts, c, o| {
                nuslerp(d, Some(&ts[0]), &ts[1], &ts[2], 0.6, Vectors::Rows, c, o)
                    .unwrap()
                    .0
            }),
        ),
        (
            "nuslerp columns",
            Box::new(|d, ts, c, o| {
                nuslerp(d, Some(&ts[0]), &ts[1], &ts[2], 0.6, Vectors::Columns, c, o)
                    .unwrap()
                    .0
            }),
        ),
        (
            "karcher",
            Box::new(|d, ts, c, o| karcher(d, ts, 10, 1e-5, c, o).unwrap().0),
        ),
        (
            "multislerp",
            Box::new(|d, ts, c, o| {
                multislerp(d, None, &ts[1..], &[1.0, 0.5, 0.25], true, 1e-8, c, o)
                    .unwrap()
                    .0
            }),
        ),
        (
            "multislerp base",
            Box::new(|d, ts, c, o| {
                multislerp(
                    d,
                    Some(&ts[0]),
                    &ts[1..],
                    &[1.0, 0.5, 0.25],
                    true,
                    1e-8,
                    c,
                    o,
                )
                .unwrap()
                .0
            }),
        ),
        (
            "sce",
            Box::new(|d, ts, c, o| sce(d, ts, 1.0, c, o).unwrap().0),
        ),
        (
            "sce topk",
            Box::new(|d, ts, c, o| sce(d, ts, 0.3, c, o).unwrap().0),
        ),
    ];
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let all: Vec<Tensor> = std::iter::once(&base)
            .chain(&xs)
            .map(|x| Tensor::from_f32(dtype, &shape, x).unwrap())
            .collect();
        let refs: Vec<_> = all.iter().map(|t| t.view()).collect();
        // The largest operand at each element.
        let big: Vec<f64> = (0..n)
            .map(|i| {
                std::iter::once(&base)
                    .chain(&xs)
                    .map(|x| x[i].abs() as f64)
                    .fold(0.0, f64::max)
            })
            .collect();
        for (name, run) in &methods {
            for (cast, out) in [(None, dtype), (Some(DType::BF16), DType::F32)] {
                let ctx = format!("{name} {dtype:?} cast {cast:?} out {out:?}");
                let want = run(&Device::Cpu, &refs, cast, out).to_f32_vec();
                for (label, dev) in &variants {
                    let got = run(dev, &refs, cast, out).to_f32_vec();
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        let scale = big[i].max(b.abs() as f64);
                        let bound = 4.0 * common::ulp_dtype(out, scale);
                        assert!(
                            ((a - b) as f64).abs() <= bound,
                            "{ctx} {label}: element {i}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
