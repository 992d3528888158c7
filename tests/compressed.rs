//! compressed-tensors quantization: the GPU kernel against the CPU
//! reference (bytes of codes, scales and zero points) on every scheme, float
//! dtype and chunking, on weights with the values that break GPU
//! arithmetic (subnormals, zeros, groups of one sign, huge values).

mod common;

use common::{gpu_variants, seed, FLOATS};
use modelpress::ops::ct::{quantize, reference, Kind, Packing, Spec, Strategy};
use modelpress::tools::sample::Rng;
use modelpress::{DType, Device, Tensor};

fn specs() -> Vec<Spec> {
    let int = |bits, symmetric, g| Spec {
        kind: Kind::Int { bits, symmetric },
        strategy: g,
    };
    vec![
        int(4, true, Strategy::Group(16)),
        int(4, false, Strategy::Group(16)),
        int(8, true, Strategy::Group(32)),
        int(8, false, Strategy::Group(32)),
        int(8, true, Strategy::Channel),
        Spec {
            kind: Kind::Fp8,
            strategy: Strategy::Channel,
        },
        Spec {
            kind: Kind::Fp8,
            strategy: Strategy::Block(8),
        },
        Spec {
            kind: Kind::Nvfp4,
            strategy: Strategy::Group(16),
        },
        Spec {
            kind: Kind::Mxfp4,
            strategy: Strategy::Group(32),
        },
    ]
}

/// Weights with the hard cases: zero groups, one-signed groups, tiny
/// (subnormal in the dtype) groups, a huge value, exact ties.
fn hard_weights(rng: &mut Rng, dtype: DType, rows: usize, cols: usize) -> Vec<f32> {
    let tiny = match dtype {
        DType::F16 => 3e-7,
        _ => 2e-39,
    };
    let mut v = vec![0f32; rows * cols];
    for r in 0..rows {
        let mode = rng.below(8);
        for c in 0..cols {
            let x = (rng.normal() * 0.05) as f32;
            v[r * cols + c] = match mode {
                0 => 0.0,
                1 => x.abs(),
                2 => -x.abs(),
                3 => x.signum() * tiny * (1 + rng.below(4)) as f32,
                4 if c % 7 == 0 => 0.0,
                5 if c == 3 => 3000.0,
                _ => x,
            };
        }
    }
    v
}

#[test]
fn gpu_codes_and_scales_equal_the_reference() {
    let gpus = gpu_variants();
    if gpus.is_empty() {
        return;
    }
    let mut rng = Rng::new(seed("ct gpu = cpu"));
    // Groups the GPU handed back to the reference: the tiny rows must
    // reach that path, or it goes untested.
    let mut redone = 0;
    for spec in specs() {
        for dtype in FLOATS {
            for (rows, cols) in [(1, 32), (5, 64), (19, 96), (33, 160)] {
                let v = hard_weights(&mut rng, dtype, rows, cols);
                let t = Tensor::from_f32(dtype, &[rows, cols], &v).unwrap();
                let bits = cols * spec.code_bits() as usize;
                for packing in [
                    Packing {
                        row_stride_bits: bits.next_multiple_of(32),
                        offset: true,
                    },
                    Packing {
                        row_stride_bits: bits,
                        offset: false,
                    },
                ] {
                    let amax = v.iter().fold(0f32, |a, x| a.max(x.abs()));
                    let gs = reference::nvfp4_global_scale(dtype, amax);
                    let want = quantize(&Device::Cpu, &spec, packing, &t.view(), gs).unwrap();
                    for (name, dev) in &gpus {
                        let got = quantize(dev, &spec, packing, &t.view(), gs).unwrap();
                        let ctx = format!("{spec:?} {dtype} {rows}x{cols} {packing:?} on {name}");
                        assert_eq!(got.groups, want.groups, "{ctx}: groups");
                        if let Some(i) = got.codes.iter().zip(&want.codes).position(|(a, b)| a != b)
                        {
                            panic!(
                                "{ctx}: codes differ from byte {i} (row {})",
                                i * 8 / packing.row_stride_bits
                            );
                        }
                        assert_eq!(got.diff, want.diff, "{ctx}: figures");
                        redone += got.cpu_groups;
                    }
                }
            }
        }
    }
    assert!(redone > 0, "no group went back to the CPU reference");
}

#[test]
fn non_finite_weights_are_refused_on_every_device() {
    let spec = Spec {
        kind: Kind::Int {
            bits: 4,
            symmetric: true,
        },
        strategy: Strategy::Group(16),
    };
    let mut devs = vec![("cpu".to_string(), Device::Cpu)];
    devs.extend(gpu_variants());
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut v = vec![0.01f32; 64];
        v[41] = bad;
        let t = Tensor::from_f32(DType::BF16, &[2, 32], &v).unwrap();
        let p = Packing {
            row_stride_bits: 128,
            offset: true,
        };
        for (name, dev) in &devs {
            let e = quantize(dev, &spec, p, &t.view(), 1.0).unwrap_err();
            assert!(e.to_string().contains("non-finite"), "{name}: {e}");
        }
    }
}
