//! Whole models through the command line: sharded bf16 directories and
//! single files on the GPU and the CPU, and every kind of bad input, each
//! with a clear one-line error, a non-zero exit, unchanged inputs and no
//! output.

mod common;
use common::*;
use modelpress::formats::model::Model;
use modelpress::formats::safetensors::{OutEntry, SafetensorsWriter};
use modelpress::tools::sample::{write_llama_model, LlamaShape};
use modelpress::DType;
use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_modelpress"));
    c.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    c
}

/// Runs the binary; returns (success, stdout, stderr).
fn run(args: &[&str]) -> (bool, String, String) {
    let out = bin().args(args).output().expect("run modelpress");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

fn argv(v: &[String]) -> Vec<&str> {
    v.iter().map(|x| x.as_str()).collect()
}

fn gpu_name() -> Option<String> {
    gpu().map(|_| "gpu".to_string())
}

#[test]
fn every_operation_on_a_sharded_bf16_model_gpu_equals_cpu() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let tuned = tmp.path().join("tuned");
    write_llama_model(&base, SMALL, DType::BF16, 3, seed("models_base")).unwrap();
    write_llama_model(&tuned, SMALL, DType::BF16, 3, 7).unwrap();
    let before = snapshot(&base);
    let mut devices = vec!["cpu".to_string()];
    devices.extend(gpu_name());
    type Case = (&'static str, Vec<String>, bool);
    let b = s(&base).to_string();
    let t = s(&tuned).to_string();
    let cases: Vec<Case> = vec![
        (
            "prune",
            vec![
                "prune".into(),
                b.clone(),
                "--threshold".into(),
                "0.05".into(),
            ],
            true,
        ),
        (
            "prune-rows",
            vec![
                "prune".into(),
                b.clone(),
                "--threshold".into(),
                "0.99".into(),
                "--rows".into(),
            ],
            true,
        ),
        (
            "int8-row",
            vec![
                "quantize".into(),
                b.clone(),
                "--int8".into(),
                "per-row".into(),
            ],
            true,
        ),
        (
            "int8-tensor",
            vec![
                "quantize".into(),
                b.clone(),
                "--int8".into(),
                "per-tensor".into(),
            ],
            true,
        ),
        (
            "round",
            vec!["quantize".into(), b.clone(), "--scale".into(), "64".into()],
            true,
        ),
        (
            "roundtrip",
            vec![
                "quantize".into(),
                b.clone(),
                "--int8".into(),
                "per-row".into(),
                "--dequantize".into(),
            ],
            true,
        ),
        (
            "offset",
            vec![
                "transfer".into(),
                b.clone(),
                "--offset".into(),
                "0.01".into(),
                "--lambda".into(),
                "2".into(),
            ],
            true,
        ),
        ("delta", vec!["delta".into(), t.clone(), b.clone()], false),
        (
            "transfer",
            vec![
                "transfer".into(),
                b.clone(),
                "--delta".into(),
                t.clone(),
                "--lambda".into(),
                "0.5".into(),
            ],
            false,
        ),
        (
            "mix",
            vec![
                "mix".into(),
                b.clone(),
                t.clone(),
                "--weights".into(),
                "0.3,0.7".into(),
            ],
            false,
        ),
    ];
    for (name, args, exact) in &cases {
        let mut outputs = Vec::new();
        for dev in &devices {
            let out = tmp.path().join(format!("{name}-{dev}"));
            let mut a: Vec<&str> = args.iter().map(|x| x.as_str()).collect();
            a.extend(["-o", s(&out), "--device", dev]);
            let report = tmp.path().join(format!("{name}-{dev}.json"));
            a.extend(["--report", s(&report)]);
            let (ok, stdout, stderr) = run(&a);
            assert!(ok, "{name} on {dev}: {stderr}");
            assert!(stdout.contains("wrote"), "{stdout}");
            let rep: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
            assert!(
                rep["totals"]["touched"].as_u64().unwrap() > 0,
                "{name}: report lists touched tensors"
            );
            assert!(
                rep["tensors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|t| t["op"] == "pass-through"),
                "{name}: norms pass through"
            );
            // Same split, index and other files.
            for f in [
                "config.json",
                "generation_config.json",
                "tokenizer_config.json",
                "model.safetensors.index.json",
            ] {
                assert!(out.join(f).is_file(), "{name} {dev}: {f}");
            }
            let m = Model::open(&out).unwrap();
            assert_eq!(m.shards.len(), 3, "{name}");
            // 1-D tensors are untouched: copied from the first model.
            let orig = Model::open(Path::new(&args[1])).unwrap();
            for (f, e) in orig.entries().filter(|(_, e)| e.shape.len() == 1) {
                let (f2, e2) = m.find(&e.name).unwrap();
                assert_eq!(f.data(e), f2.data(e2), "{name}: {} passes through", e.name);
            }
            outputs.push(out);
        }
        if outputs.len() == 2 {
            let (c, g) = (snapshot(&outputs[0]), snapshot(&outputs[1]));
            assert_eq!(c.len(), g.len());
            for ((pc, bc), (_, bg)) in c.iter().zip(&g) {
                if *exact {
                    assert!(
                        bc == bg,
                        "{name}: {} differs between GPU and CPU",
                        pc.display()
                    );
                } else {
                    assert_eq!(bc.len(), bg.len(), "{name}: {}", pc.display());
                }
            }
        }
    }
    // Quantized outputs shrink and come back.
    let int8 = tmp.path().join("int8-row-cpu");
    let size = |p: &Path| snapshot(p).iter().map(|(_, b)| b.len()).sum::<usize>();
    assert!(
        size(&int8) < size(&base) * 6 / 10,
        "int8 is about half of bf16"
    );
    let back = tmp.path().join("int8-back");
    let (ok, _, err) = run(&["dequantize", s(&int8), "-o", s(&back)]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(&["inspect", s(&back), "--json"]);
    assert!(ok, "{err}");
    let m = Model::open(&back).unwrap();
    assert!(
        m.entries().all(|(_, e)| e.dtype == "BF16"),
        "dequantized to the original dtype"
    );
    assert!(
        m.entries().all(|(_, e)| !e.name.ends_with("_scale")),
        "scales consumed"
    );
    let rt = Model::open(&tmp.path().join("roundtrip-cpu")).unwrap();
    for (f, e) in m.entries() {
        let (f2, e2) = rt.find(&e.name).unwrap();
        assert_eq!(
            f.data(e),
            f2.data(e2),
            "dequantize == quantize --dequantize for {}",
            e.name
        );
    }
    assert_eq!(snapshot(&base), before, "the input is unchanged");
}

#[test]
fn single_file_in_single_file_out() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    write_llama_model(&dir, SMALL, DType::F16, 1, 3).unwrap();
    let file = dir.join("model.safetensors");
    let out = tmp.path().join("out.safetensors");
    let (ok, _, err) = run(&[
        "prune",
        s(&file),
        "--threshold",
        "0.1",
        "-o",
        s(&out),
        "--include",
        "mlp",
    ]);
    assert!(ok, "{err}");
    let (a, b) = (Model::open(&file).unwrap(), Model::open(&out).unwrap());
    let names = |m: &Model| m.entries().map(|(_, e)| e.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&a), names(&b), "same tensors, same order");
    assert_eq!(a.shards[0].metadata, b.shards[0].metadata, "metadata kept");
    for (f, e) in a.entries() {
        let (f2, e2) = b.find(&e.name).unwrap();
        if !e.name.contains("mlp") {
            assert_eq!(f.data(e), f2.data(e2), "{} not included", e.name);
        } else {
            assert_ne!(f.data(e), f2.data(e2), "{} pruned", e.name);
        }
    }
    let (ok, _, err) = run(&[
        "prune",
        s(&file),
        "--threshold",
        "0.1",
        "-o",
        s(&tmp.path().join("x")),
        "--include",
        "(",
    ]);
    assert!(!ok && err.contains("regex"), "{err}");

    // --include narrows the default set: a layer prefix prunes that
    // layer's matrices, never its norms; --any-rank reaches the norms.
    for (any_rank, name) in [(false, "layer0"), (true, "layer0-all")] {
        let out = tmp.path().join(format!("{name}.safetensors"));
        let mut args = vec![
            "prune",
            s(&file),
            "--sparsity",
            "0.5",
            "-o",
            s(&out),
            "--include",
            r"^model\.layers\.0\.",
        ];
        if any_rank {
            args.push("--any-rank");
        }
        let (ok, _, err) = run(&args);
        assert!(ok, "{err}");
        let b = Model::open(&out).unwrap();
        for (f, e) in a.entries() {
            let (f2, e2) = b.find(&e.name).unwrap();
            let chosen = e.name.starts_with("model.layers.0.") && (any_rank || e.shape.len() >= 2);
            assert_eq!(f.data(e) != f2.data(e2), chosen, "{name}: {}", e.name);
        }
    }
    // An --include that selects nothing is a mistake, not a copy.
    let (ok, _, err) = run(&[
        "prune",
        s(&file),
        "--threshold",
        "0.1",
        "-o",
        s(&tmp.path().join("y.safetensors")),
        "--include",
        "layernorm",
    ]);
    assert!(
        !ok && err.contains("--include 'layernorm' matches no tensor"),
        "{err}"
    );
    assert!(!tmp.path().join("y.safetensors").exists());
}

/// A safetensors file from raw header text and data.
fn raw_file(path: &Path, header: &str, data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

fn small_file(path: &Path, name: &str, shape: &[usize], values: &[f32]) {
    let mut w = SafetensorsWriter::create(
        path,
        vec![OutEntry {
            name: name.into(),
            dtype: "F32".into(),
            shape: shape.to_vec(),
        }],
        None,
    )
    .unwrap();
    let t = tensor(DType::F32, shape, values);
    w.write(name, &t.data).unwrap();
    w.finish().unwrap();
}

/// Asserts: failure, one line naming `file` (and `tensor`), no output, inputs unchanged.
fn refused(args: &[&str], inputs: &[&Path], out: &Path, file: &str, tensor: Option<&str>) {
    let before: Vec<_> = inputs.iter().map(|p| snapshot(p)).collect();
    let (ok, _, err) = run(args);
    assert!(!ok, "{args:?} must fail");
    let line = err
        .lines()
        .find(|l| l.starts_with("modelpress: error:"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(file), "error names the file {file}: {line}");
    if let Some(t) = tensor {
        assert!(line.contains(t), "error names the tensor {t}: {line}");
    }
    assert!(!out.exists(), "{args:?}: no output may appear");
    let parent = out.parent().unwrap();
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("modelpress-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    let after: Vec<_> = inputs.iter().map(|p| snapshot(p)).collect();
    assert_eq!(before, after, "inputs unchanged");
}

#[test]
fn bad_inputs_are_refused_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let out = d.join("out.safetensors");
    let prune = |input: &Path| {
        vec![
            "prune".to_string(),
            s(input).to_string(),
            "--threshold".into(),
            "0.1".into(),
            "-o".into(),
            s(&out).to_string(),
        ]
    };

    // A missing file.
    let missing = d.join("missing.safetensors");
    refused(
        &argv(&prune(&missing)),
        &[],
        &out,
        "missing.safetensors",
        None,
    );

    // Not safetensors at all.
    let junk = d.join("junk.safetensors");
    std::fs::write(&junk, b"this is not a model, just some text of some length").unwrap();
    refused(
        &argv(&prune(&junk)),
        &[&junk],
        &out,
        "junk.safetensors",
        None,
    );

    // Truncated: a valid file missing its last bytes.
    let good = d.join("good.safetensors");
    small_file(&good, "w", &[4, 4], &[0.5; 16]);
    let bytes = std::fs::read(&good).unwrap();
    let trunc = d.join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() - 10]).unwrap();
    refused(
        &argv(&prune(&trunc)),
        &[&trunc],
        &out,
        "trunc.safetensors",
        None,
    );

    // Headers that lie.
    let lies = [
        (
            "overlap",
            r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]}}"#,
            24,
            Some("b"),
        ),
        (
            "pastend",
            r#"{"a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]},"b":{"dtype":"F32","shape":[2,2],"data_offsets":[16,32]}}"#,
            16,
            None,
        ),
        (
            "absurd",
            r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}"#,
            16,
            None,
        ),
        (
            "baddtype",
            r#"{"a":{"dtype":"F128","shape":[2,2],"data_offsets":[0,16]}}"#,
            16,
            None,
        ),
    ];
    for (name, header, len, tensor) in lies {
        let p = d.join(format!("{name}.safetensors"));
        raw_file(&p, header, &vec![0u8; len]);
        refused(
            &argv(&prune(&p)),
            &[&p],
            &out,
            &format!("{name}.safetensors"),
            tensor,
        );
    }
    // A header length larger than the file.
    let p = d.join("hugeheader.safetensors");
    let mut b = (1u64 << 40).to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, b).unwrap();
    refused(
        &argv(&prune(&p)),
        &[&p],
        &out,
        "hugeheader.safetensors",
        None,
    );

    // An unsupported dtype selected explicitly.
    let p = d.join("ints.safetensors");
    raw_file(
        &p,
        r#"{"ids":{"dtype":"I32","shape":[2,2],"data_offsets":[0,16]}}"#,
        &[0u8; 16],
    );
    let mut a = prune(&p);
    a.extend(["--include".into(), "ids".into()]);
    refused(&argv(&a), &[&p], &out, "ints.safetensors", Some("ids"));

    // Non-finite weights, refused unless allowed.
    let nf = d.join("nonfinite.safetensors");
    small_file(&nf, "layer.weight", &[2, 2], &[1.0, f32::NAN, 0.05, 2.0]);
    refused(
        &argv(&prune(&nf)),
        &[&nf],
        &out,
        "nonfinite.safetensors",
        Some("layer.weight"),
    );
    let mut a = prune(&nf);
    a.push("--allow-nonfinite".into());
    let (ok, _, err) = run(&argv(&a));
    assert!(ok, "{err}");
    let m = Model::open(&out).unwrap();
    let t = m.shards[0]
        .tensor(&m.shards[0].entries[0])
        .unwrap()
        .to_f32_vec();
    assert!(t[1].is_nan() && t[2] == 0.0 && t[3] == 2.0);

    // The output exists: refused unless --force; an input never, even with it.
    let before = snapshot(&out);
    let (ok, _, err) = run(&argv(&prune(&good)));
    assert!(
        !ok && err.contains("already exists") && err.contains("out.safetensors"),
        "{err}"
    );
    assert_eq!(snapshot(&out), before);
    let mut a = prune(&good);
    a.push("--force".into());
    assert!(run(&argv(&a)).0, "--force replaces");
    let self_out = vec![
        "prune",
        s(&good),
        "--threshold",
        "0.1",
        "-o",
        s(&good),
        "--force",
    ];
    let before = snapshot(&good);
    let (ok, _, err) = run(&self_out);
    assert!(!ok && err.contains("is an input"), "{err}");
    assert_eq!(snapshot(&good), before);
    std::fs::remove_file(&out).unwrap();

    // Models that differ: names and shapes.
    let other = d.join("other.safetensors");
    small_file(&other, "v", &[4, 4], &[0.1; 16]);
    refused(
        &[
            "mix",
            s(&good),
            s(&other),
            "--weights",
            "0.5,0.5",
            "-o",
            s(&out),
        ],
        &[&good, &other],
        &out,
        "other.safetensors",
        Some("w"),
    );
    let wide = d.join("wide.safetensors");
    small_file(&wide, "w", &[2, 8], &[0.1; 16]);
    refused(
        &["transfer", s(&good), "--delta", s(&wide), "-o", s(&out)],
        &[&good, &wide],
        &out,
        "wide.safetensors",
        Some("w"),
    );
    refused(
        &["delta", s(&good), s(&wide), "-o", s(&out)],
        &[&good, &wide],
        &out,
        "wide.safetensors",
        Some("w"),
    );
    let (ok, _, err) = run(&["mix", s(&good), s(&good), "--weights", "0.5", "-o", s(&out)]);
    assert!(!ok && err.contains("weights"), "{err}");
    assert!(!out.exists());

    // A sharded directory whose index names a missing tensor.
    let sd = d.join("sharded");
    write_llama_model(&sd, SMALL, DType::BF16, 2, 1).unwrap();
    let idx = sd.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&idx)
        .unwrap()
        .replace("lm_head.weight", "lm_head.missing");
    std::fs::write(&idx, text).unwrap();
    let dout = d.join("dout");
    refused(
        &["prune", s(&sd), "--threshold", "0.1", "-o", s(&dout)],
        &[&sd],
        &dout,
        "model.safetensors.index.json",
        Some("lm_head"),
    );
}

#[test]
fn bad_scores_files_are_refused_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let model = d.join("w.safetensors");
    small_file(
        &model,
        "layer.weight",
        &[2, 4],
        &[0.1, -0.2, 0.3, -0.4, 0.5, 0.6, -0.7, 0.8],
    );
    let out = d.join("out.safetensors");
    // Missing the tensor.
    let missing = d.join("missing-scores.safetensors");
    small_file(&missing, "other.weight", &[4], &[1.0; 4]);
    refused(
        &[
            "prune",
            s(&model),
            "--sparsity",
            "0.5",
            "--scores",
            s(&missing),
            "-o",
            s(&out),
        ],
        &[&model, &missing],
        &out,
        "missing-scores.safetensors",
        Some("layer.weight"),
    );
    // The wrong length.
    let short = d.join("short-scores.safetensors");
    small_file(&short, "layer.weight", &[3], &[1.0; 3]);
    refused(
        &[
            "prune",
            s(&model),
            "--pattern",
            "2:4",
            "--scores",
            s(&short),
            "-o",
            s(&out),
        ],
        &[&model, &short],
        &out,
        "short-scores.safetensors",
        Some("layer.weight"),
    );
    // Scores with a mode that does not use them.
    let good = d.join("scores.safetensors");
    small_file(&good, "layer.weight", &[4], &[1.0, 0.0, 2.0, 0.5]);
    let (ok, _, err) = run(&[
        "prune",
        s(&model),
        "--threshold",
        "0.1",
        "--scores",
        s(&good),
        "-o",
        s(&out),
    ]);
    assert!(!ok && err.contains("--scores"), "{err}");
    // And the good file works: per row, the smallest |w|·x go.
    let (ok, _, err) = run(&[
        "prune",
        s(&model),
        "--sparsity",
        "0.5",
        "--scores",
        s(&good),
        "-o",
        s(&out),
    ]);
    assert!(ok, "{err}");
    let m = Model::open(&out).unwrap();
    let v = m.shards[0]
        .tensor(&m.shards[0].entries[0])
        .unwrap()
        .to_f32_vec();
    // Row 0 scores |w|·x = [0.1, 0, 0.6, 0.2]: columns 1 and 0 go.
    assert_eq!(&v[..4], &[0.0, 0.0, 0.3, -0.4]);
}

#[test]
fn subdirectories_of_a_model_directory_are_copied() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("st");
    write_llama_model(&dir, SMALL, DType::F32, 1, 5).unwrap();
    std::fs::create_dir_all(dir.join("1_Pooling/deeper")).unwrap();
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        b"{\"pooling_mode_mean_tokens\": true}",
    )
    .unwrap();
    std::fs::write(dir.join("1_Pooling/deeper/x.txt"), b"x").unwrap();
    let out = tmp.path().join("out");
    let (ok, _, err) = run(&["prune", s(&dir), "--threshold", "0.01", "-o", s(&out)]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read(out.join("1_Pooling/config.json")).unwrap(),
        std::fs::read(dir.join("1_Pooling/config.json")).unwrap()
    );
    assert_eq!(
        std::fs::read(out.join("1_Pooling/deeper/x.txt")).unwrap(),
        b"x"
    );
}

#[test]
fn bad_gguf_files_get_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("bad.gguf");
    let mut b = b"GGUF".to_vec();
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&u64::MAX.to_le_bytes());
    b.extend_from_slice(&0u64.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let (ok, _, err) = run(&["inspect", s(&p)]);
    assert!(
        !ok && err.contains("bad.gguf") && err.contains("cannot fit"),
        "{err}"
    );
    let out = tmp.path().join("out.gguf");
    let (ok, _, err) = run(&["quantize", s(&p), "--type", "F16", "-o", s(&out)]);
    assert!(!ok && err.contains("bad.gguf"), "{err}");
    assert!(!out.exists());
}

#[test]
fn gguf_requantize_and_tensor_type_overrides() {
    use modelpress::formats::gguf::GgufFile;
    use modelpress::ops::ggml::{dequantize, quantize, BlockType};
    use modelpress::{Device, TensorRef};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    let shape = LlamaShape {
        hidden: 256,
        intermediate: 512,
        layers: 2,
        heads: 2,
        vocab: 64,
    };
    write_llama_model(&dir, shape, DType::F32, 1, 9).unwrap();
    let q8 = tmp.path().join("q8.gguf");
    let (ok, _, err) = run(&[
        "quantize",
        s(&dir),
        "--type",
        "Q8_0",
        "--pure",
        "-o",
        s(&q8),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    // A block-type input is refused unless requantizing is asked for.
    let out = tmp.path().join("q4.gguf");
    let (ok, _, err) = run(&["quantize", s(&q8), "--type", "Q4_K_M", "-o", s(&out)]);
    assert!(
        !ok && err.contains("q8.gguf")
            && err.contains("'model.")
            && err.contains("--allow-requantize"),
        "{err}"
    );
    assert!(!out.exists());
    let (ok, _, err) = run(&[
        "quantize",
        s(&q8),
        "--type",
        "Q4_K_S",
        "--allow-requantize",
        "--tensor-type",
        r"layers\.1\.mlp=q8_0",
        "--tensor-type",
        "MLP=q5_0",
        "-o",
        s(&out),
        "--device",
        "cpu",
    ]);
    assert!(ok, "{err}");
    let (a, b) = (GgufFile::open(&q8).unwrap(), GgufFile::open(&out).unwrap());
    let mut requantized = 0;
    for t in &b.tensors {
        let src = a.tensors.iter().find(|x| x.name == t.name).unwrap();
        // The first pattern found wins; lowercased, "MLP" finds "mlp".
        let want = if t.name.contains("layers.1.mlp") {
            "Q8_0"
        } else if t.name.contains("mlp") {
            "Q5_0"
        } else if src.ty.name() == "Q8_0" {
            "Q4_K"
        } else {
            src.ty.name()
        };
        assert_eq!(t.ty.name(), want, "{}", t.name);
        if want == "Q4_K" {
            // Requantized from the values the Q8_0 blocks hold.
            let n = t.numel() as usize;
            let x = dequantize(BlockType::Q8_0, a.data(src), n).unwrap();
            let shape = [n];
            let tr = TensorRef::new(DType::F32, &shape, bytemuck::cast_slice(&x)).unwrap();
            let q = quantize(&Device::Cpu, BlockType::Q4_K, &tr).unwrap();
            assert!(q.data == b.data(t), "{}", t.name);
            requantized += 1;
        }
    }
    assert!(requantized >= 8, "{requantized}");
    // Overrides that cannot be honoured are errors.
    for (opt, says) in [
        ("mlp=IQ4_XS", "IQ4_XS"),
        ("mlp(=q8_0", "--tensor-type"),
        ("=q8_0", "missing"),
    ] {
        let (ok, _, err) = run(&[
            "quantize",
            s(&dir),
            "--type",
            "Q4_0",
            "--tensor-type",
            opt,
            "-o",
            s(&out),
            "--force",
        ]);
        assert!(!ok && err.contains(says), "{opt}: {err}");
    }
}
