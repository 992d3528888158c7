//! GGML block quantization: the CPU reference and the GPU kernel against
//! bytes written by ggml itself (tests/data/ggml), and against each other on
//! fresh data in every input dtype and chunking.

mod common;

use common::{gpu, gpu_variants, seed, FLOATS};
use modelpress::ops::ggml::{dequantize, quantize, BlockType};
use modelpress::tools::sample::Rng;
use modelpress::{DType, Device, Tensor};

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/ggml");

fn fixed_input() -> Vec<u8> {
    std::fs::read(format!("{DATA}/input.f32")).unwrap()
}

fn devices() -> Vec<(String, Device)> {
    let mut d = vec![("cpu".to_string(), Device::Cpu)];
    d.extend(gpu_variants());
    d
}

fn first_diff(a: &[u8], b: &[u8], block: usize) -> String {
    match a.iter().zip(b).position(|(x, y)| x != y) {
        Some(i) => format!("first difference at byte {i} (block {})", i / block),
        None => format!("lengths {} and {}", a.len(), b.len()),
    }
}

#[test]
fn every_type_matches_ggml_bytes_on_every_device() {
    let input = fixed_input();
    let shape = [input.len() / 4];
    let t = modelpress::TensorRef::new(DType::F32, &shape, &input).unwrap();
    for &ty in BlockType::ALL {
        let want = std::fs::read(format!("{DATA}/{}.bin", ty.name())).unwrap();
        for (name, dev) in devices() {
            let q = quantize(&dev, ty, &t).unwrap();
            assert!(
                q.data == want,
                "{} on {name}: {}",
                ty.name(),
                first_diff(&q.data, &want, ty.block_bytes())
            );
            if name == "cpu" {
                assert_eq!(q.cpu_blocks, 0);
            } else {
                // The subnormal blocks of the fixed input are the CPU's.
                assert!(q.cpu_blocks > 0 && q.cpu_blocks < 40, "{}", q.cpu_blocks);
            }
        }
    }
}

/// Weights like a model's: Gaussian rows at varied scales, some with outliers,
/// ties and zero runs.
fn model_like(rng: &mut Rng, n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    while v.len() < n {
        let scale = [0.02f32, 0.5, 3.0, 1e-3][rng.below(4)];
        let kind = rng.below(6);
        for _ in 0..256.min(n - v.len()) {
            v.push(match kind {
                0 => (rng.below(33) as f32 - 16.0) / 16.0,
                1 => 0.0,
                2 if rng.below(40) == 0 => rng.normal() as f32 * 40.0,
                _ => rng.normal() as f32 * scale,
            });
        }
    }
    v
}

#[test]
fn gpu_equals_cpu_for_every_type_dtype_and_chunking() {
    if gpu().is_none() {
        return;
    }
    let mut rng = Rng::new(seed("ggml_gpu_cpu"));
    for &ty in BlockType::ALL {
        // Odd block counts too, for the types done two blocks at a time.
        for blocks in [1usize, 3, 8, 37] {
            let n = blocks * ty.block_values();
            let values = model_like(&mut rng, n);
            for dtype in FLOATS {
                let t = Tensor::from_f32(dtype, &[n], &values).unwrap();
                let want = quantize(&Device::Cpu, ty, &t.view()).unwrap();
                for (name, dev) in gpu_variants() {
                    let got = quantize(&dev, ty, &t.view()).unwrap();
                    assert!(
                        got.data == want.data,
                        "{} {dtype} {blocks} blocks on {name}: {}",
                        ty.name(),
                        first_diff(&got.data, &want.data, ty.block_bytes())
                    );
                    assert_eq!(got.cpu_blocks, 0, "{} {dtype} on {name}", ty.name());
                }
            }
        }
    }
}

#[test]
fn dequantized_values_are_within_the_block_step() {
    let mut rng = Rng::new(seed("ggml_dequant"));
    let n = 16 * 256;
    let x = model_like(&mut rng, n);
    let t = Tensor::from_f32(DType::F32, &[n], &x).unwrap();
    for &ty in BlockType::ALL {
        let q = quantize(&Device::Cpu, ty, &t.view()).unwrap();
        let y = dequantize(ty, &q.data, n).unwrap();
        // Levels per block: 2^bits; the error is at most about one step of
        // the block's range.
        let levels = match ty {
            BlockType::Q4_0 | BlockType::Q4_1 | BlockType::Q4_K => 15.0,
            BlockType::Q5_0 | BlockType::Q5_1 | BlockType::Q5_K => 31.0,
            BlockType::Q6_K => 63.0,
            BlockType::Q8_0 => 254.0,
            BlockType::Q2_K => 3.0,
            BlockType::Q3_K => 7.0,
        };
        // K-quant sub-block scales are 6-bit fractions of the super-block's
        // largest: the step is that of the whole 256 values.
        let bv = ty.block_values();
        for (b, (xb, yb)) in x.chunks(bv).zip(y.chunks(bv)).enumerate() {
            let lo = xb.iter().cloned().fold(0f32, f32::min);
            let hi = xb.iter().cloned().fold(0f32, f32::max);
            let step = (hi - lo) / levels;
            for (a, c) in xb.iter().zip(yb) {
                assert!(
                    (a - c).abs() <= 2.0 * step + 1e-6,
                    "{} block {b}: {a} came back as {c} (step {step})",
                    ty.name()
                );
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    for (name, dev) in devices() {
        let t = Tensor::from_f32(DType::F32, &[40], &[0.5; 40]).unwrap();
        let e = quantize(&dev, BlockType::Q8_0, &t.view()).err().unwrap();
        assert!(e.to_string().contains("multiple of 32"), "{name}: {e}");
        for ty in [BlockType::Q4_0, BlockType::Q6_K] {
            let mut v = vec![0.25f32; 512];
            v[300] = f32::NAN;
            let t = Tensor::from_f32(DType::F32, &[512], &v).unwrap();
            let e = quantize(&dev, ty, &t.view()).err().unwrap();
            assert!(e.to_string().contains("non-finite"), "{name}: {e}");
            v[300] = f32::INFINITY;
            let t = Tensor::from_f32(DType::F32, &[512], &v).unwrap();
            assert!(quantize(&dev, ty, &t.view()).is_err(), "{name}");
        }
    }
    assert!(dequantize(BlockType::Q4_K, &[0u8; 100], 256).is_err());
}

/// Half-zero (pruned) weights over many GPU workgroups in one chunk: the
/// shape of the case where invocations that looped over several groups
/// wrote wrong bytes on lavapipe (now one group per invocation).
#[test]
fn pruned_tensor_over_many_workgroups() {
    let Some(dev) = gpu() else { return };
    let mut rng = Rng::new(seed("ggml_pruned"));
    let n = 1200 * 256;
    let x: Vec<f32> = (0..n)
        .map(|_| {
            if rng.below(2) == 0 {
                0.0
            } else {
                rng.normal() as f32 * 0.05
            }
        })
        .collect();
    let t = Tensor::from_f32(DType::F32, &[n], &x).unwrap();
    for ty in [BlockType::Q6_K, BlockType::Q4_0] {
        let want = quantize(&Device::Cpu, ty, &t.view()).unwrap();
        let got = quantize(&dev, ty, &t.view()).unwrap();
        assert!(
            got.data == want.data,
            "{}: {}",
            ty.name(),
            first_diff(&got.data, &want.data, ty.block_bytes())
        );
    }
}

#[test]
fn dequantizing_into_a_16_bit_dtype_rounds_like_convert() {
    // The fused path (blocks straight to bf16/f16) against dequantizing to
    // f32 and converting: the same bits, for every type.
    let input = fixed_input();
    let shape = [input.len() / 4];
    let t = modelpress::TensorRef::new(DType::F32, &shape, &input).unwrap();
    for &ty in BlockType::ALL {
        let q = quantize(&Device::Cpu, ty, &t).unwrap();
        let f = dequantize(ty, &q.data, shape[0]).unwrap();
        let fv = Tensor::from_f32(DType::F32, &shape, &f).unwrap();
        for dtype in FLOATS {
            let want = modelpress::quantize::convert(&Device::Cpu, &fv.view(), dtype).unwrap();
            let got = modelpress::ops::ggml::dequantize_into(ty, &q.data, shape[0], dtype).unwrap();
            assert!(got == want.data, "{} -> {dtype}", ty.name());
        }
    }
}
