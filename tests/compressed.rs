//! compressed-tensors quantization: the GPU kernel against the CPU
//! reference (bytes of codes, scales and zero points) on every scheme, float
//! dtype and chunking, on weights with the values that break GPU
//! arithmetic (subnormals, zeros, groups of one sign, huge values).

mod common;

use common::{gpu_variants, run_bin, s, seed, snapshot, FLOATS};
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

// --- through the command line ------------------------------------------------

use modelpress::formats::model::Model;
use modelpress::tools::sample::write_llama_model;

/// Every scheme on a sharded model (hidden 64, intermediate 96: int groups
/// of 32), GPU and CPU outputs byte-identical, and `dequantize` restoring
/// each weight's name, dtype and shape within the scheme's error.
#[test]
fn schemes_through_the_command_line_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    write_llama_model(&base, common::SMALL, DType::BF16, 2, 11).unwrap();
    let before = snapshot(&base);
    let original = Model::open(&base).unwrap();
    for (scheme, extra, bound) in [
        ("W4A16", &["--group-size", "32"][..], 0.2),
        ("W4A16", &["--group-size", "32", "--asymmetric"][..], 0.2),
        ("W8A16", &["--group-size", "32"][..], 0.02),
        ("W8A8", &[][..], 0.02),
        ("FP8_DYNAMIC", &[][..], 0.05),
        ("FP8_BLOCK", &[][..], 0.05),
        ("NVFP4A16", &[][..], 0.2),
        ("MXFP4A16", &[][..], 0.3),
    ] {
        let mut outs = Vec::new();
        let devices: &[&str] = if common::gpu().is_some() {
            &["cpu", "gpu"]
        } else {
            &["cpu"]
        };
        for dev in devices {
            let out = tmp.path().join(format!("{scheme}-{}-{dev}", extra.len()));
            let mut args = vec!["quantize", s(&base), "-o", s(&out), "--scheme", scheme];
            args.extend_from_slice(extra);
            args.extend_from_slice(&["--device", dev]);
            let (ok, err) = run_bin(&args);
            assert!(ok, "{scheme} {extra:?} on {dev}: {err}");
            outs.push(out);
        }
        let out = &outs[0];
        if outs.len() == 2 {
            assert_eq!(
                snapshot(&outs[0])
                    .into_iter()
                    .map(|f| f.1)
                    .collect::<Vec<_>>(),
                snapshot(&outs[1])
                    .into_iter()
                    .map(|f| f.1)
                    .collect::<Vec<_>>(),
                "{scheme} {extra:?}: GPU and CPU outputs differ"
            );
        }
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        let q = &cfg["quantization_config"];
        assert_eq!(q["quant_method"], "compressed-tensors", "{scheme}");
        assert_eq!(q["ignore"], serde_json::json!(["lm_head"]), "{scheme}");
        assert!(out.join("recipe.yaml").exists());
        assert!(
            out.join("model.safetensors.index.json").exists(),
            "{scheme}: index kept"
        );
        let back = tmp.path().join(format!("{scheme}-{}-back", extra.len()));
        let (ok, err) = run_bin(&["dequantize", s(out), "-o", s(&back)]);
        assert!(ok, "dequantize {scheme}: {err}");
        let restored = Model::open(&back).unwrap();
        for (f, e) in original.entries() {
            let (rf, re) = restored
                .find(&e.name)
                .unwrap_or_else(|| panic!("{scheme}: {} lost", e.name));
            assert_eq!(
                (&re.dtype, &re.shape),
                (&e.dtype, &e.shape),
                "{scheme} {}",
                e.name
            );
            let (x, y) = (
                f.tensor(e).unwrap().to_f32_vec(),
                rf.tensor(re).unwrap().to_f32_vec(),
            );
            let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            let err = x
                .iter()
                .zip(&y)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt();
            assert!(
                err <= bound * norm,
                "{scheme} {}: relative error {}",
                e.name,
                err / norm
            );
        }
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(back.join("config.json")).unwrap()).unwrap();
        assert!(cfg.get("quantization_config").is_none());
    }
    assert_eq!(snapshot(&base), before, "input changed");
}

#[test]
fn bad_schemes_and_inputs_fail_with_one_line_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    write_llama_model(&base, common::SMALL, DType::BF16, 1, 3).unwrap();
    let nan = tmp.path().join("nan");
    write_llama_model(&nan, common::SMALL, DType::F32, 1, 3).unwrap();
    {
        // A NaN in one weight, written in place (the file is ours).
        let m = Model::open(&nan).unwrap();
        let (f, e) = m.find("model.layers.1.mlp.up_proj.weight").unwrap();
        let (path, start) = (f.path.clone(), e.range.start);
        drop(m);
        let mut bytes = std::fs::read(&path).unwrap();
        let data = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let at = data + start + 4 * 7;
        bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
        std::fs::write(&path, bytes).unwrap();
    }
    let file = base.join("model.safetensors");
    let before = snapshot(tmp.path());
    let out = tmp.path().join("out");
    let o = s(&out);
    for (args, want) in [
        (
            vec!["quantize", s(&base), "-o", o, "--scheme", "W3A16"],
            "unknown scheme 'W3A16'",
        ),
        (
            vec!["quantize", s(&base), "-o", o, "--scheme", "W4A16"],
            "96 columns (in-features) are not a multiple of the group size 128",
        ),
        (
            vec!["quantize", s(&nan), "-o", o, "--scheme", "FP8_DYNAMIC"],
            "non-finite",
        ),
        (
            vec![
                "quantize",
                s(&base),
                "-o",
                o,
                "--scheme",
                "W8A8",
                "--ignore",
                "no_such_layer",
            ],
            "--ignore 'no_such_layer' matches no Linear layer",
        ),
        (
            vec![
                "quantize",
                s(&base),
                "-o",
                o,
                "--scheme",
                "W8A8",
                "--ignore",
                "(",
            ],
            "--ignore '('",
        ),
        (
            vec!["quantize", s(&file), "-o", o, "--scheme", "W8A8"],
            "needs a model directory with config.json",
        ),
        (
            vec![
                "quantize",
                s(&base),
                "-o",
                o,
                "--scheme",
                "NVFP4A16",
                "--ignore",
                "k_proj",
            ],
            "ignore all of them or none",
        ),
        (
            vec![
                "quantize",
                s(&base),
                "-o",
                o,
                "--scheme",
                "FP8_BLOCK",
                "--group-size",
                "64",
            ],
            "FP8_BLOCK fixes its groups",
        ),
        (
            vec![
                "quantize",
                s(&base),
                "-o",
                o,
                "--scheme",
                "FP8_DYNAMIC",
                "--asymmetric",
            ],
            "FP8_DYNAMIC is symmetric",
        ),
        (
            vec![
                "quantize",
                s(&base),
                "-o",
                o,
                "--scheme",
                "W8A8",
                "--include",
                "q_proj",
            ],
            "leave layers out with --ignore",
        ),
        (
            vec![
                "quantize",
                s(&base),
                "-o",
                o,
                "--scheme",
                "W4A16",
                "--ignore",
                ".",
            ],
            "no Linear layer to quantize",
        ),
    ] {
        let (ok, err) = run_bin(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(!out.exists(), "{args:?} wrote an output");
    }
    // A quantized model is not quantized again.
    let q = tmp.path().join("q");
    assert!(run_bin(&["quantize", s(&base), "-o", s(&q), "--scheme", "W8A8"]).0);
    let (ok, err) = run_bin(&["quantize", s(&q), "-o", o, "--scheme", "W8A8"]);
    assert!(
        !ok && err.contains("already has a quantization_config"),
        "{err}"
    );
    std::fs::remove_dir_all(&q).unwrap();
    assert_eq!(snapshot(tmp.path()), before, "inputs changed");
}
