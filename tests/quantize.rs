//! Rounding: integer outputs bit-identical on GPU and CPU; dequantization
//! and conversion exact (one rounding, done the same way everywhere).

mod common;
use common::*;
use modelpress::quantize::{self, Granularity};
use modelpress::tools::sample::Rng;
use modelpress::{DType, Device, Error, QTensor, Tensor};

fn devices() -> Vec<(String, Device)> {
    let mut d = vec![("cpu".to_string(), Device::Cpu)];
    d.extend(gpu_variants());
    d
}

#[test]
fn round_q_follows_the_rule() {
    let mut rng = Rng::new(seed("round_q"));
    for (name, dev) in devices() {
        for dtype in FLOATS {
            for shape in shapes(&mut rng) {
                let n: usize = shape.iter().product();
                // Halves after scaling (ties), and values past ±128/Q.
                let q = 256.0;
                let mut v = weights(&mut rng, n, 0.5 / 256.0);
                for (i, x) in v.iter_mut().enumerate() {
                    match i % 11 {
                        3 => *x = (rng.below(300) as f32 - 150.0 + 0.5) / q,
                        7 => *x *= 20.0,
                        _ => {}
                    }
                }
                let t = tensor(dtype, &shape, &v);
                let ctx = format!("{name} {dtype} {shape:?}");
                let (got, st) = quantize::quantize_round(&dev, &t.view(), q).unwrap();
                assert_eq!(got.scales, vec![1.0 / q], "{ctx}");
                let mut clipped = 0;
                for (i, x) in t.to_f32_vec().iter().enumerate() {
                    let r = (x * q).round_ties_even();
                    let want = r.clamp(-128.0, 127.0) as i8;
                    clipped += (r != r.clamp(-128.0, 127.0)) as u64;
                    assert_eq!(got.q[i], want, "{ctx} element {i}: {x}·{q}");
                }
                assert_eq!(st.clipped, clipped, "{ctx}");
                if n > 100 {
                    assert!(clipped > 0, "{ctx}: the data saturates some values");
                }
                let (cpu, cst) = quantize::quantize_round(&Device::Cpu, &t.view(), q).unwrap();
                assert_eq!(got, cpu, "{ctx}");
                assert_eq!((st.clipped, st.nan), (cst.clipped, cst.nan), "{ctx}");
                assert_diff_close(&st.diff, &cst.diff, &ctx);
            }
        }
    }
}

#[test]
fn round_q_special_values() {
    let v = [
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e-40,
        -1e-40,
        2.5,
        -2.5,
        3.5,
        127.5,
        -128.5,
        1e30,
    ];
    for (name, dev) in devices() {
        let t = tensor(DType::F32, &[v.len()], &v);
        // 1e-40 is subnormal: treated as zero even with a huge Q.
        let (q, st) = quantize::quantize_round(&dev, &t.view(), 1.0).unwrap();
        assert_eq!(
            q.q,
            [0, 127, -128, 0, 0, 2, -2, 4, 127, -128, 127],
            "{name}"
        );
        // Clipped: ±inf, 127.5 (ties to 128) and 1e30; -128.5 ties to -128, in range.
        assert_eq!((st.nan, st.clipped), (1, 4), "{name}");
        let (q, _) = quantize::quantize_round(&dev, &t.view(), 1e38).unwrap();
        assert_eq!(q.q[3..5], [0, 0], "{name}: subnormals flushed");
    }
}

#[test]
fn absmax_follows_the_rule() {
    let mut rng = Rng::new(seed("absmax"));
    for (name, dev) in devices() {
        for dtype in FLOATS {
            for shape in shapes(&mut rng) {
                let n: usize = shape.iter().product();
                let mut v = weights(&mut rng, n, 0.01);
                // Rows of zeros and rows of one repeated value.
                let (rows, cols) =
                    modelpress::TensorRef::new(dtype, &shape, &vec![0u8; n * dtype.size()])
                        .unwrap()
                        .rows();
                if rows > 2 && cols > 0 {
                    v[..cols].fill(0.0);
                    v[cols..2 * cols].fill(-0.75);
                }
                let t = tensor(dtype, &shape, &v);
                let x = t.to_f32_vec();
                for gran in [Granularity::PerTensor, Granularity::PerRow] {
                    let ctx = format!("{name} {dtype} {shape:?} {gran:?}");
                    let (got, st) = quantize::quantize_absmax(&dev, &t.view(), gran).unwrap();
                    assert_eq!(st.clipped + st.nan, 0, "{ctx}");
                    #[allow(clippy::single_range_in_vec_init)]
                    let groups: Vec<std::ops::Range<usize>> = match gran {
                        Granularity::PerTensor => vec![0..n],
                        Granularity::PerRow => {
                            (0..rows).map(|r| r * cols..(r + 1) * cols).collect()
                        }
                    };
                    assert_eq!(got.scales.len(), groups.len(), "{ctx}");
                    for (gi, g) in groups.iter().enumerate() {
                        let absmax = x[g.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                        let (m, scale) = if absmax == 0.0 {
                            (0.0, 0.0)
                        } else {
                            (127.0 / absmax, absmax / 127.0)
                        };
                        assert_eq!(got.scales[gi], scale, "{ctx} group {gi}");
                        for i in g.clone() {
                            let want = (x[i] * m).round_ties_even() as i8;
                            assert_eq!(got.q[i], want, "{ctx} element {i}");
                            assert!(got.q[i] != -128, "{ctx}: symmetric range");
                        }
                        if absmax > 0.0 {
                            assert!(
                                g.clone().any(|i| got.q[i].unsigned_abs() == 127),
                                "{ctx}: abs-max maps to ±127"
                            );
                        }
                    }
                    let (cpu, _) =
                        quantize::quantize_absmax(&Device::Cpu, &t.view(), gran).unwrap();
                    assert_eq!(got, cpu, "{ctx}");
                }
            }
        }
    }
}

#[test]
fn absmax_refuses_nonfinite() {
    for (name, dev) in devices() {
        for bad in [f32::NAN, f32::INFINITY] {
            let t = tensor(DType::BF16, &[2, 3], &[0.1, 0.2, 0.3, 0.4, bad, 0.6]);
            for gran in [Granularity::PerTensor, Granularity::PerRow] {
                let e = quantize::quantize_absmax(&dev, &t.view(), gran).unwrap_err();
                assert!(
                    matches!(e, Error::Input(ref m) if m.contains("non-finite")),
                    "{name}: {e}"
                );
            }
        }
    }
}

#[test]
fn dequantize_is_exact() {
    let mut rng = Rng::new(seed("dequantize"));
    for (name, dev) in devices() {
        for shape in shapes(&mut rng) {
            let n: usize = shape.iter().product();
            let t = tensor(DType::F32, &shape, &weights(&mut rng, n, 0.02));
            for gran in [Granularity::PerTensor, Granularity::PerRow] {
                let (q, _) = quantize::quantize_absmax(&Device::Cpu, &t.view(), gran).unwrap();
                for dtype in FLOATS {
                    let ctx = format!("{name} {shape:?} {gran:?} -> {dtype}");
                    let got = quantize::dequantize(&dev, &q, dtype).unwrap();
                    let (rows, cols) =
                        (q.scales.len(), if n == 0 { 0 } else { n / q.scales.len() });
                    let _ = rows;
                    let want: Vec<f32> = (0..n)
                        .map(|i| {
                            q.q[i] as f32 * q.scales[if q.is_per_row() { i / cols } else { 0 }]
                        })
                        .collect();
                    assert_identical(&got, &tensor(dtype, &shape, &want), &ctx);
                    // The round trip is within half a step, plus the rounding of
                    // the multiplier 127/absmax and of the scale absmax/127
                    // (relative 2^-24 each, times |q| ≤ 127): 1e-4 of a step.
                    if dtype == DType::F32 {
                        let x = t.to_f32_vec();
                        let y = got.to_f32_vec();
                        for i in 0..n {
                            let step = q.scales[if q.is_per_row() { i / cols } else { 0 }];
                            assert!((x[i] - y[i]).abs() <= step * (0.5 + 1e-4), "{ctx} {i}");
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn dequantize_checks_its_input() {
    let bad = QTensor {
        shape: vec![2, 3],
        q: vec![1, 2, 3],
        scales: vec![1.0],
        granularity: Granularity::PerTensor,
    };
    assert!(matches!(
        quantize::dequantize(&Device::Cpu, &bad, DType::F32),
        Err(Error::Input(_))
    ));
    let bad = QTensor {
        shape: vec![2, 3],
        q: vec![1; 6],
        scales: vec![1.0],
        granularity: Granularity::PerRow,
    };
    for (_, dev) in devices() {
        assert!(matches!(
            quantize::dequantize(&dev, &bad, DType::F32),
            Err(Error::Input(_))
        ));
    }
}

#[test]
fn round_q_rejects_bad_factors() {
    let t = tensor(DType::F32, &[3], &[1.0, 2.0, 3.0]);
    for (_, dev) in devices() {
        for q in [0.0, -0.0, -1.0, f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = quantize::quantize_round(&dev, &t.view(), q).unwrap_err();
            assert!(matches!(e, Error::Input(_)), "Q={q}: {e}");
        }
    }
}

/// f32 bit patterns that stress rounding: ties at every 16-bit boundary,
/// subnormals of both formats, overflow, NaN payloads, zeros.
fn conversion_patterns(rng: &mut Rng) -> Vec<f32> {
    let mut bits: Vec<u32> = vec![
        0,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0xffc0_0001,
        0x7f80_0001,
        0x7fbf_ffff,
        0x0000_0001,
        0x007f_ffff,
        0x0080_0000,
        0x477f_f000, // f16 max + half ulp: ties to inf? (to even)
        0x477f_efff,
        0x7f7f_ffff,
        0x3380_0000, // 2^-24: smallest f16 subnormal
        0x3300_0000, // 2^-25: tie to zero
        0x3300_0001,
        0x3880_0000, // 2^-14: smallest f16 normal
    ];
    for _ in 0..20000 {
        let b = rng.next_u64() as u32;
        bits.push(b);
        // Ties and near-ties for bf16 (low 16 bits) and f16 (low 13 bits).
        bits.push((b & 0xffff_0000) | 0x8000);
        bits.push((b & 0xffff_e000) | 0x1000);
        bits.push((b & 0x3fff_e000) | 0x1000 | 0x3000_0000);
        // Values in f16's subnormal range.
        bits.push(0x3300_0000 + (b & 0x07ff_ffff) % 0x0580_0000);
    }
    bits.into_iter().map(f32::from_bits).collect()
}

#[test]
fn convert_rounds_like_half_on_every_device() {
    let mut rng = Rng::new(seed("convert"));
    let v = conversion_patterns(&mut rng);
    let src = tensor(DType::F32, &[v.len()], &v);
    for (name, dev) in devices() {
        for to in [DType::F16, DType::BF16] {
            let got = quantize::convert(&dev, &src.view(), to).unwrap();
            let want: Vec<u32> = v
                .iter()
                .map(|&x| match to {
                    DType::F16 => half::f16::from_f32(x).to_bits() as u32,
                    _ => half::bf16::from_f32(x).to_bits() as u32,
                })
                .collect();
            assert_eq!(got.raw_bits(), want, "{name} f32 -> {to}");
            // And back: every 16-bit pattern (all 65536) widens exactly.
            let all: Vec<u8> = (0..=u16::MAX).flat_map(|h| h.to_le_bytes()).collect();
            let wide = Tensor {
                dtype: to,
                shape: vec![1 << 16],
                data: all,
            };
            let got = quantize::convert(&dev, &wide.view(), DType::F32).unwrap();
            let want: Vec<u32> = (0..=u16::MAX)
                .map(|h| match to {
                    DType::F16 => half::f16::from_bits(h).to_f32().to_bits(),
                    _ => half::bf16::from_bits(h).to_f32().to_bits(),
                })
                .collect();
            assert_eq!(got.raw_bits(), want, "{name} {to} -> f32");
            let other = if to == DType::F16 {
                DType::BF16
            } else {
                DType::F16
            };
            let cross = quantize::convert(&dev, &wide.view(), other).unwrap();
            let cpu = quantize::convert(&Device::Cpu, &wide.view(), other).unwrap();
            assert_identical(&cross, &cpu, &format!("{name} {to} -> {other}"));
        }
    }
}
