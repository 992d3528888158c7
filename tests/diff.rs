//! The report figures operations compute in passing equal those of a
//! separate pass over their input and output, on every device.

mod common;
use common::*;
use modelpress::ops::diff::{diff, Diff};
use modelpress::quantize::{self, Granularity};
use modelpress::select;
use modelpress::tools::sample::Rng;
use modelpress::transfer::{self, Delta};
use modelpress::{mix, prune, DType, Device};

fn devices() -> Vec<(String, Device)> {
    let mut d = vec![("cpu".to_string(), Device::Cpu)];
    d.extend(gpu_variants());
    d
}

#[test]
fn fused_figures_equal_a_separate_pass() {
    let mut rng = Rng::new(seed("fused_diff"));
    for (name, dev) in devices() {
        for dtype in FLOATS {
            for shape in shapes(&mut rng) {
                let n: usize = shape.iter().product();
                let ctx = format!("{name} {dtype} {shape:?}");
                let a = tensor(dtype, &shape, &weights(&mut rng, n, 0.03));
                let b = tensor(dtype, &shape, &weights(&mut rng, n, 0.03));
                let check = |what: &str, out: &modelpress::Tensor, fused: &Diff| {
                    let sep = diff(&a.view(), &out.view());
                    assert_diff_close(fused, &sep, &format!("{ctx} {what}"));
                };
                let (out, st) = prune::threshold(&dev, &a.view(), 0.03).unwrap();
                check("threshold", &out, &st.diff);
                let (out, st) = select::prune_to_sparsity(&dev, &a.view(), 0.5, false).unwrap();
                check("sparsity", &out, &st.diff);
                let (out, d) =
                    transfer::transfer_diff(&dev, &a.view(), Delta::Tensor(b.view()), 0.5).unwrap();
                check("transfer", &out, &d);
                let (out, d) =
                    transfer::transfer_diff(&dev, &a.view(), Delta::Scalar(0.25), 1.0).unwrap();
                check("offset", &out, &d);
                let (out, d) = mix::mix_diff(&dev, &[a.view(), b.view()], &[0.3, 0.7]).unwrap();
                check("mix", &out, &d);
                let other = if dtype == DType::F32 {
                    DType::BF16
                } else {
                    DType::F32
                };
                let (out, d) = quantize::convert_diff(&dev, &a.view(), other).unwrap();
                check("convert", &out, &d);
                for g in [Granularity::PerRow, Granularity::PerTensor] {
                    let (q, st) = quantize::quantize_absmax(&dev, &a.view(), g).unwrap();
                    let back = quantize::dequantize(&Device::Cpu, &q, dtype).unwrap();
                    check("int8", &back, &st.diff);
                }
            }
        }
    }
}

#[test]
fn other_inputs_non_finite_values_are_counted() {
    for (name, dev) in devices() {
        let a = tensor(DType::F32, &[4, 4], &[1.0; 16]);
        let mut v = vec![0.5f32; 16];
        v[3] = f32::NAN;
        v[9] = f32::INFINITY;
        let b = tensor(DType::F32, &[4, 4], &v);
        let (_, d) =
            transfer::transfer_diff(&dev, &a.view(), Delta::Tensor(b.view()), 1.0).unwrap();
        assert_eq!(d.nonfinite_other, 2, "{name} transfer");
        let (_, d) =
            mix::mix_diff(&dev, &[a.view(), b.view(), b.view()], &[1.0, 0.5, 0.5]).unwrap();
        assert_eq!(d.nonfinite_other, 4, "{name} mix");
        assert_eq!(d.nonfinite_in, 0, "{name} mix");
    }
}
