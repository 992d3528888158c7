//! `lora merge` through the command line: GPU and CPU outputs identical,
//! and every bad adapter refused with one line, nothing written and the
//! inputs unchanged. (Values against numpy: tests/interop/check_lora.py;
//! against PEFT: tests/dev/check_peft.py.)

mod common;

use common::{run_bin, s, snapshot};
use modelpress::formats::safetensors::{OutEntry, SafetensorsWriter};
use modelpress::tools::sample::write_llama_model;
use modelpress::{DType, Tensor};
use std::path::Path;

/// An adapter directory: `config` as adapter_config.json, and f32 tensors
/// (name without PEFT's prefix, shape) filled with small seeded values.
fn adapter(dir: &Path, config: serde_json::Value, tensors: &[(&str, Vec<usize>)]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let entries: Vec<OutEntry> = tensors
        .iter()
        .map(|(n, shape)| OutEntry {
            name: format!("base_model.model.{n}"),
            dtype: "F32".into(),
            shape: shape.clone(),
        })
        .collect();
    let mut w =
        SafetensorsWriter::create(&dir.join("adapter_model.safetensors"), entries, None).unwrap();
    for (k, (n, shape)) in tensors.iter().enumerate() {
        let len: usize = shape.iter().product();
        let v: Vec<f32> = (0..len)
            .map(|i| ((i * 7 + k * 3) % 13) as f32 * 0.01 - 0.06)
            .collect();
        let t = Tensor::from_f32(DType::F32, shape, &v).unwrap();
        w.write(&format!("base_model.model.{n}"), &t.data).unwrap();
    }
    w.finish().unwrap();
}

const Q: &str = "model.layers.0.self_attn.q_proj";

#[test]
fn gpu_equals_cpu_and_bad_adapters_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    write_llama_model(&base, common::SMALL, DType::BF16, 2, 5).unwrap();
    let h = common::SMALL.hidden;
    let cfg = serde_json::json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8});
    let good = tmp.path().join("good");
    adapter(
        &good,
        cfg.clone(),
        &[
            (&format!("{Q}.lora_A.weight"), vec![4, h]),
            (&format!("{Q}.lora_B.weight"), vec![h, 4]),
        ],
    );
    if common::gpu().is_some() {
        let (c, g) = (tmp.path().join("c"), tmp.path().join("g"));
        assert!(
            run_bin(&[
                "lora",
                "merge",
                s(&base),
                s(&good),
                "-o",
                s(&c),
                "--device",
                "cpu"
            ])
            .0
        );
        assert!(
            run_bin(&[
                "lora",
                "merge",
                s(&base),
                s(&good),
                "-o",
                s(&g),
                "--device",
                "gpu"
            ])
            .0
        );
        let bytes = |d: &Path| snapshot(d).into_iter().map(|f| f.1).collect::<Vec<_>>();
        assert_eq!(bytes(&c), bytes(&g), "GPU and CPU merges differ");
        std::fs::remove_dir_all(&c).unwrap();
        std::fs::remove_dir_all(&g).unwrap();
    }
    let no_config = tmp.path().join("no_config");
    adapter(
        &no_config,
        cfg.clone(),
        &[
            (&format!("{Q}.lora_A.weight"), vec![4, h]),
            (&format!("{Q}.lora_B.weight"), vec![h, 4]),
        ],
    );
    std::fs::remove_file(no_config.join("adapter_config.json")).unwrap();
    let rank = tmp.path().join("rank");
    adapter(
        &rank,
        cfg.clone(),
        &[
            (&format!("{Q}.lora_A.weight"), vec![8, h]),
            (&format!("{Q}.lora_B.weight"), vec![h, 8]),
        ],
    );
    let unknown = tmp.path().join("unknown");
    adapter(
        &unknown,
        cfg.clone(),
        &[
            ("model.layers.0.nope.lora_A.weight", vec![4, h]),
            ("model.layers.0.nope.lora_B.weight", vec![h, 4]),
        ],
    );
    let shape = tmp.path().join("shape");
    adapter(
        &shape,
        cfg.clone(),
        &[
            (&format!("{Q}.lora_A.weight"), vec![4, h + 1]),
            (&format!("{Q}.lora_B.weight"), vec![h, 4]),
        ],
    );
    let half = tmp.path().join("half");
    adapter(
        &half,
        cfg.clone(),
        &[(&format!("{Q}.lora_A.weight"), vec![4, h])],
    );
    let dora = tmp.path().join("dora");
    adapter(
        &dora,
        serde_json::json!({"r": 4, "lora_alpha": 8, "use_dora": true}),
        &[
            (&format!("{Q}.lora_A.weight"), vec![4, h]),
            (&format!("{Q}.lora_B.weight"), vec![h, 4]),
            (&format!("{Q}.lora_magnitude_vector"), vec![h]),
        ],
    );
    let ia3 = tmp.path().join("ia3");
    adapter(
        &ia3,
        serde_json::json!({"peft_type": "IA3"}),
        &[(&format!("{Q}.ia3_l"), vec![h])],
    );
    let before = snapshot(tmp.path());
    let out = tmp.path().join("out");
    let o = s(&out);
    for (args, want) in [
        (
            vec!["lora", "merge", s(&base), s(&no_config), "-o", o],
            "no adapter_config.json",
        ),
        (
            vec!["lora", "merge", s(&base), s(&rank), "-o", o],
            "rank 8 in the factors, 4 in adapter_config.json",
        ),
        (
            vec!["lora", "merge", s(&base), s(&unknown), "-o", o],
            "module 'model.layers.0.nope' is not in the base model",
        ),
        (
            vec!["lora", "merge", s(&base), s(&shape), "-o", o],
            "does not fit the base weight",
        ),
        (
            vec!["lora", "merge", s(&base), s(&half), "-o", o],
            "lacks a lora_A/lora_B pair",
        ),
        (
            vec!["lora", "merge", s(&base), s(&dora), "-o", o, "--unmerge"],
            "DoRA cannot be unmerged",
        ),
        (
            vec!["lora", "merge", s(&base), s(&ia3), "-o", o],
            "only LORA adapters merge",
        ),
        (
            vec![
                "lora",
                "merge",
                s(&base),
                s(&good),
                "-o",
                o,
                "--weights",
                "1,2",
            ],
            "2 weights for 1 adapters",
        ),
        (
            vec!["lora", "merge", s(&base), s(&good), "-o", s(&good)],
            "good",
        ),
    ] {
        let (ok, err) = run_bin(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(!out.exists(), "{args:?} wrote an output");
    }
    assert_eq!(snapshot(tmp.path()), before, "inputs changed");
}

#[test]
fn extract_refusals_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, other, wide) = (
        tmp.path().join("base"),
        tmp.path().join("other"),
        tmp.path().join("wide"),
    );
    write_llama_model(&base, common::SMALL, DType::BF16, 1, 5).unwrap();
    write_llama_model(&other, common::SMALL, DType::BF16, 1, 6).unwrap();
    let mut shape = common::SMALL;
    shape.intermediate += 16;
    write_llama_model(&wide, shape, DType::BF16, 1, 6).unwrap();
    let before = snapshot(tmp.path());
    let out = tmp.path().join("ad");
    let o = s(&out);
    for (args, want) in [
        (
            vec![
                "lora",
                "extract",
                s(&other),
                s(&base),
                "-o",
                o,
                "--rank",
                "0",
            ],
            "--rank must be at least 1",
        ),
        (
            vec![
                "lora",
                "extract",
                s(&base),
                s(&base),
                "-o",
                o,
                "--rank",
                "4",
            ],
            "nothing to extract",
        ),
        (
            vec![
                "lora",
                "extract",
                s(&wide),
                s(&base),
                "-o",
                o,
                "--rank",
                "4",
            ],
            "in the fine-tune",
        ),
        (
            vec![
                "lora",
                "extract",
                s(&other),
                s(&base),
                "-o",
                s(&base),
                "--rank",
                "4",
                "--force",
            ],
            "base",
        ),
    ] {
        let (ok, err) = run_bin(&args);
        assert!(!ok, "{args:?} succeeded");
        assert!(err.contains(want), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(!out.exists(), "{args:?} wrote an output");
    }
    assert_eq!(snapshot(tmp.path()), before, "inputs changed");
    let (ok, err) = run_bin(&[
        "lora",
        "extract",
        s(&other),
        s(&base),
        "-o",
        o,
        "--rank",
        "4",
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.join("adapter_config.json").exists() && out.join("adapter_model.safetensors").exists()
    );
}
