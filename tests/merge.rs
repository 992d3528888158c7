//! `modelpress merge` through the binary: configurations a user gets wrong
//! give one line naming the key and write nothing; what a merge writes
//! beside the weights. (The arithmetic of every method is held to numpy by
//! tests/interop/check_merge.py, and to the rules in src/ops/merge/tests.rs.)

use modelpress::tools::sample::{write_llama_model, LlamaShape};
use modelpress::DType;
use std::path::Path;
use std::process::Command;

const TINY: LlamaShape = LlamaShape {
    hidden: 64,
    intermediate: 128,
    layers: 3,
    heads: 2,
    vocab: 256,
};

fn run(cwd: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .current_dir(cwd)
        .args(args)
        .args(["--device", "cpu"])
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A base, two fine-tunes of its shape and one of another vocabulary.
fn sandbox() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for (name, seed) in [("base", 1), ("a", 2), ("b", 3)] {
        write_llama_model(&d.join(name), TINY, DType::BF16, 1, seed).unwrap();
    }
    let wide = LlamaShape { vocab: 300, ..TINY };
    write_llama_model(&d.join("wide"), wide, DType::BF16, 1, 4).unwrap();
    tmp
}

fn merge(d: &Path, yaml: &str) -> (i32, String) {
    std::fs::write(d.join("m.yml"), yaml).unwrap();
    let _ = std::fs::remove_dir_all(d.join("out"));
    run(d, &["merge", "m.yml", "-o", "out"])
}

#[test]
fn bad_configurations_name_the_key_and_write_nothing() {
    let tmp = sandbox();
    let d = tmp.path();
    let two = "models:\n  - model: a\n    parameters: {weight: 1.0}\n  - model: b\n    parameters: {weight: 0.5}\n";
    let cases: Vec<(String, &str)> = vec![
        (format!("merge_method: frobnicate\nbase_model: base\n{two}"), "merge_method: 'frobnicate' is not a merge method"),
        (format!("merge_method: ram\nbase_model: base\n{two}"), "does not run yet"),
        (format!("merge_method: karcher\n{two}"), "karcher takes no parameter weight per model"),
        ("merge_method: karcher\nmodels:\n  - model: a\n  - model: b\nparameters: {max_iter: 2.5}\n".into(), "max_iter"),
        ("merge_method: multislerp\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: -1}\n".into(), "weights sum to 0"),
        (format!("merge_method: della\nbase_model: base\n{two}parameters: {{density: 0.1, epsilon: 0.2}}\n"), "density ± epsilon"),
        ("merge_method: model_stock\nbase_model: base\nmodels:\n  - model: a\n".into(), "at least two models besides the base"),
        (format!("merge_method: nuslerp\n{two}parameters: {{nuslerp_row_wise: 1}}\n"), "nuslerp_row_wise"),
        ("merge_method: sce\nbase_model: base\nmodels:\n  - model: a\nparameters: {select_topk: 0}\n".into(), "select_topk"),
        (format!("merge_method: ties\nbase_model: base\nmodles: []\n{two}"), "modles: unknown key"),
        (format!("merge_method: ties\n{two}"), "base_model: ties needs a base model"),
        (format!("merge_method: ties\nbase_model: base\n{two}parameters: {{density: 1.5}}\n"), "density for"),
        (format!("merge_method: ties\nbase_model: base\n{two}parameters: {{density: 0}}\n"), "must be in (0, 1]"),
        (format!("merge_method: ties\nbase_model: base\n{two}parameters: {{t: 0.5}}\n"), "parameters.t: ties takes no parameter t"),
        ("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1.0, lambda: 2}\n".into(), "models[0].parameters.lambda: lambda applies to the whole merge"),
        ("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {wieght: 1.0}\n".into(), "models[0].parameters.wieght"),
        ("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n".into(), "no weight for tensor"),
        ("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: [{filter: mlp, value: 1}]}\n".into(), "no weight for tensor model.embed_tokens.weight"),
        ("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1, density: [1, {x: 2}]}\n".into(), "models[0].parameters.density: a list that mixes"),
        ("merge_method: ties\nbase_model: base\nmodels:\n  - model: a\n    parameters: {weight: 1, density: [{value: 1}, {x: 2}]}\n".into(), "models[0].parameters.density[1]: unknown key"),
        ("merge_method: slerp\nbase_model: base\nparameters: {t: 0.5}\nmodels:\n  - model: a\n  - model: b\n".into(), "exactly one other model"),
        (format!("merge_method: slerp\nbase_model: base\nparameters: {{t: 0.5}}\n{two}"), "slerp takes no parameter weight per model"),
        ("merge_method: slerp\nbase_model: base\nmodels:\n  - model: a\n".into(), "slerp needs t"),
        (format!("merge_method: linear\n{two}parameters: {{weight: 1}}\nslices: [{{sources: [{{model: a, layer_range: [0, 1]}}]}}]\n"), "slices: give models or slices, not both"),
        ("merge_method: passthrough\nslices: []\n".into(), "slices: an empty list"),
        ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 4]}]\n".into(), "slices[0].sources[0].layer_range: [0, 4] is past the end of a, which has 3 layers"),
        ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [2, 2]}]\n".into(), "slices[0].sources[0].layer_range: [2, 2] holds no layer"),
        ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0]}]\n".into(), "slices[0].sources[0].layer_range: expected [START, END]"),
        ("merge_method: passthrough\nslices:\n  - sources: [{model: a}]\n".into(), "slices[0].sources[0]: no layer_range"),
        ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 1], layers: 2}]\n".into(), "slices[0].sources[0].layers: unknown key"),
        ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 1]}]\n    residual_weight: 0.5\n".into(), "slices[0].residual_weight: not supported"),
        ("merge_method: passthrough\nslices:\n  - sources: [{model: a, layer_range: [0, 1]}, {model: b, layer_range: [0, 1]}]\n".into(), "slices[0].sources: passthrough takes exactly one model; found 2"),
        ("merge_method: linear\nslices:\n  - sources: [{model: a, layer_range: [0, 2], parameters: {weight: 1}}, {model: b, layer_range: [0, 1], parameters: {weight: 1}}]\n".into(), "slices[0].sources[1].layer_range: [0, 1] holds 1 layers, but the slice's first source holds 2"),
        ("merge_method: ties\nbase_model: base\nslices:\n  - sources: [{model: a, layer_range: [0, 2], parameters: {weight: 1}}]\n".into(), "slices[0].sources: the base model base is not among this slice's sources"),
        ("merge_method: slerp\nbase_model: base\nslices:\n  - sources: [{model: base, layer_range: [0, 2]}, {model: a, layer_range: [0, 2]}]\n".into(), "slices[0].parameters.t: slerp needs t"),
        ("merge_method: linear\nslices:\n  - sources: [{model: a, layer_range: [0, 2], parameters: {weight: 1}}, {model: wide, layer_range: [1, 3], parameters: {weight: 1}}]\n".into(), "slices[0].sources[1]: model.embed_tokens.weight in wide has shape [300, 64]"),
        ("merge_method: linear\nslices:\n  - sources: [{model: a, layer_range: [0, 2]}]\n    parameters: {weight: 1, lambda: 2}\n".into(), "slices[0].parameters.lambda: linear takes no parameter lambda"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: wide\n    parameters: {weight: 1}\n".into(), "model.embed_tokens.weight"),
        ("merge_method: linear\nmodels:\n  - model: org/some-model\n    parameters: {weight: 1}\n".into(), "not a local path (a Hugging Face hub id?)"),
        ("merge_method: linear\nmodels:\n  - model: a@main\n    parameters: {weight: 1}\n".into(), "revisions (@main) are not supported"),
        (format!("merge_method: linear\ntokenizer_source: union\n{two}"), "tokenizer_source: 'union'"),
        (format!("merge_method: linear\ndtype: int8\n{two}"), "dtype: 'int8'"),
        ("merge_method: linear\nmodels: [\n".into(), "not valid YAML"),
        (format!("merge_method: linear\nmerge_method: ties\n{two}"), "not valid YAML"),
        (format!("merge_method: linear\n{two}parameters: {{weight: 1, normalize: 3}}\n"), "normalize"),
        (format!("merge_method: linear\n{two}parameters: {{weight: .nan}}\n"), "finite"),
        ("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\n  - model: b\n    parameters: {weight: -1}\n".into(), "weights sum to 0"),
    ];
    for (yaml, want) in cases {
        let (code, err) = merge(d, &yaml);
        assert_eq!(code, 1, "{yaml}\n{err}");
        assert!(err.contains(want), "{yaml}\nwanted '{want}' in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{yaml}\none line: {err}");
        assert!(!d.join("out").exists(), "{yaml}: output written");
        let leftovers: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().contains(".modelpress-"))
            .collect();
        assert!(leftovers.is_empty(), "{yaml}: {leftovers:?}");
    }
}

#[test]
fn a_configuration_that_is_not_a_regular_file_is_refused() {
    let tmp = sandbox();
    let d = tmp.path();
    let fifo = d.join("m.fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    // Nothing ever writes to it: reading it would block forever.
    let (code, err) = run(d, &["merge", "m.fifo", "-o", "out"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("m.fifo"), "{err}");
    let (code, err) = run(d, &["merge", "/dev/zero", "-o", "out"]);
    assert_eq!(code, 1, "{err}");
    std::fs::write(d.join("bin.yml"), [0xff, 0xfe, 0x00]).unwrap();
    let (code, err) = run(d, &["merge", "bin.yml", "-o", "out"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not UTF-8"), "{err}");
    assert!(!d.join("out").exists());
}

#[test]
fn unsafe_truncate_embeddings_cuts_the_vocabulary_to_the_fewest_rows() {
    let tmp = sandbox();
    let d = tmp.path();
    for first in ["wide", "a"] {
        let second = if first == "a" { "wide" } else { "a" };
        let yaml = format!(
            "merge_method: linear\nmodels:\n  - model: {first}\n    parameters: {{weight: 1}}\n  - model: {second}\n    parameters: {{weight: 1}}\n"
        );
        let (code, err) = merge(d, &yaml);
        assert_eq!(code, 1, "refused without the flag: {err}");
        let (code, err) = run(
            d,
            &[
                "merge",
                "m.yml",
                "-o",
                "out",
                "--unsafe-truncate-embeddings",
            ],
        );
        assert_eq!(code, 0, "{err}");
        let open = |p: &str| modelpress::formats::model::Model::open(&d.join(p)).unwrap();
        let (out, w, a) = (open("out"), open("wide"), open("a"));
        for name in ["model.embed_tokens.weight", "lm_head.weight"] {
            let (f, e) = out.find(name).unwrap();
            assert_eq!(e.shape, vec![256, TINY.hidden], "{name}");
            // The mean of the two models' first 256 rows (bf16: 1/128).
            let got = f.tensor(e).unwrap().to_f32_vec();
            let vals = |m: &modelpress::formats::model::Model| {
                let (f, e) = m.find(name).unwrap();
                f.tensor(e).unwrap().to_f32_vec()
            };
            let (wv, av) = (vals(&w), vals(&a));
            for i in 0..got.len() {
                let want = (wv[i] + av[i]) / 2.0;
                assert!((got[i] - want).abs() <= want.abs() / 128.0, "{name} {i}");
            }
        }
        let cfg: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("out/config.json")).unwrap()).unwrap();
        assert_eq!(cfg["vocab_size"], 256);
    }
}

#[test]
fn a_merge_writes_its_configuration_dtype_and_tokenizer() {
    let tmp = sandbox();
    let d = tmp.path();
    std::fs::write(d.join("a/tokenizer.json"), b"{\"from\": \"a\"}").unwrap();
    let yaml = "merge_method: ties\nbase_model: base\nmodels:\n  - model: base\n  - model: a\n    parameters: {weight: 1.0, density: 0.5}\n  - model: b\n    parameters: {weight: 0.5, density: 0.5}\ndtype: bfloat16\nout_dtype: float16\ntokenizer_source: a\n";
    let (code, err) = merge(d, yaml);
    assert_eq!(code, 0, "{err}");
    let out = d.join("out");
    assert_eq!(
        std::fs::read_to_string(out.join("mergekit_config.yml")).unwrap(),
        yaml
    );
    // A model card naming the inputs in its metadata and quoting the config.
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.starts_with("---\nbase_model:\n- \"base\"\n- \"a\"\n- \"b\"\n"),
        "{card}"
    );
    assert!(
        card.contains("`ties` on `base`") && card.contains(yaml.trim_end()),
        "{card}"
    );
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        b"{\"from\": \"a\"}"
    );
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "float16");
    let m = modelpress::formats::model::Model::open(&out).unwrap();
    assert!(m.entries().all(|(_, e)| e.dtype == "F16"));
    // The same again is refused without --force, and --force replaces it.
    let (code, err) = run(d, &["merge", "m.yml", "-o", "out"]);
    assert_eq!(code, 1, "{err}");
    let (code, err) = run(d, &["merge", "m.yml", "-o", "out", "--force"]);
    assert_eq!(code, 0, "{err}");
    // The configuration is an input: no output may replace it.
    let (code, err) = run(d, &["merge", "m.yml", "-o", "m.yml", "--force"]);
    assert_eq!(code, 1, "{err}");
    assert_eq!(std::fs::read_to_string(d.join("m.yml")).unwrap(), yaml);
}
