//! Mixture-of-experts gating: routing and combination against plain
//! re-derivations of Mixtral's, Qwen's, DeepSeek-V3's and Switch's rules,
//! and the GPU against the CPU (the same experts; weights within the bound
//! moe.rs states; combination bit for bit).

mod common;

use common::{gpu_variants, seed, FLOATS};
use modelpress::ops::moe::{combine, route, Gating};
use modelpress::tools::sample::Rng;
use modelpress::{DType, Device, Tensor};

fn gatings() -> Vec<Gating> {
    vec![
        Gating::Softmax {
            k: 2,
            renormalize: true,
        },
        Gating::Softmax {
            k: 4,
            renormalize: false,
        },
        Gating::Sigmoid {
            k: 3,
            renormalize: true,
            scale: 2.5,
        },
        Gating::Sigmoid {
            k: 8,
            renormalize: false,
            scale: 1.0,
        },
        Gating::Switch,
    ]
}

/// Logits in [−10, 10] with exact ties (copied values) to test the
/// lower-index rule.
fn logits(rng: &mut Rng, dtype: DType, tokens: usize, experts: usize) -> Tensor {
    let mut v: Vec<f32> = (0..tokens * experts)
        .map(|_| (rng.uniform() * 20.0 - 10.0) as f32)
        .collect();
    for t in 0..tokens {
        if t % 3 == 0 {
            let row = &mut v[t * experts..(t + 1) * experts];
            let m = row.iter().cloned().fold(f32::MIN, f32::max);
            row[experts - 1] = m; // ties the maximum at the last index
            row[1] = m;
        }
    }
    Tensor::from_f32(dtype, &[tokens, experts], &v).unwrap()
}

#[test]
fn routing_follows_the_rules_and_gpu_picks_the_same_experts() {
    let mut rng = Rng::new(seed("moe route"));
    let gpus = gpu_variants();
    for dtype in FLOATS {
        for &experts in &[8usize, 16, 64] {
            let l = logits(&mut rng, dtype, 37, experts);
            let lv = l.to_f32_vec();
            for g in gatings() {
                let r = route(&Device::Cpu, &l.view(), g).unwrap();
                for t in 0..37 {
                    let row = &lv[t * experts..(t + 1) * experts];
                    // Expected choice: descending logit, ties to the lower index.
                    let mut order: Vec<usize> = (0..experts).collect();
                    order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
                    let k = r.k;
                    let chosen: Vec<usize> = r.experts[t * k..(t + 1) * k]
                        .iter()
                        .map(|&e| e as usize)
                        .collect();
                    assert_eq!(chosen, order[..k].to_vec(), "{g:?} token {t}");
                    // Expected weights, in f64.
                    let m = row[order[0]] as f64;
                    let soft: Vec<f64> = row.iter().map(|&x| (x as f64 - m).exp()).collect();
                    let z: f64 = soft.iter().sum();
                    let mut want: Vec<f64> = match g {
                        Gating::Sigmoid { .. } => chosen
                            .iter()
                            .map(|&e| 1.0 / (1.0 + (-(row[e] as f64)).exp()))
                            .collect(),
                        _ => chosen.iter().map(|&e| soft[e] / z).collect(),
                    };
                    let sum: f64 = want.iter().sum();
                    match g {
                        Gating::Softmax {
                            renormalize: true, ..
                        }
                        | Gating::Sigmoid {
                            renormalize: true, ..
                        } => want.iter_mut().for_each(|w| *w /= sum),
                        _ => {}
                    }
                    if let Gating::Sigmoid { scale, .. } = g {
                        want.iter_mut().for_each(|w| *w *= scale as f64);
                    }
                    for (j, &w) in want.iter().enumerate() {
                        let got = r.weights[t * k + j] as f64;
                        assert!(
                            (got - w).abs() <= 1e-5 * w.abs().max(1e-30) + 1e-30,
                            "{g:?} token {t}: {got} vs {w}"
                        );
                    }
                }
                for (name, dev) in &gpus {
                    let rg = route(dev, &l.view(), g).unwrap();
                    assert_eq!(
                        rg.experts, r.experts,
                        "{g:?} {dtype} {experts} on {name}: experts"
                    );
                    // The stated bound: (8 + 4·R)·2^-24 relative, R ≤ 20 here.
                    let bound = (8.0 + 4.0 * 20.0) * 2f64.powi(-24);
                    for (a, b) in rg.weights.iter().zip(&r.weights) {
                        let (a, b) = (*a as f64, *b as f64);
                        assert!(
                            (a - b).abs() <= bound * b.abs() * 4.0,
                            "{g:?} on {name}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn combination_is_the_weighted_sum_and_gpu_equals_cpu() {
    let mut rng = Rng::new(seed("moe combine"));
    let gpus = gpu_variants();
    for dtype in FLOATS {
        let (tokens, k, dim) = (19, 3, 70);
        let x: Vec<f32> = (0..tokens * k * dim).map(|_| rng.normal() as f32).collect();
        let xs = Tensor::from_f32(dtype, &[tokens, k, dim], &x).unwrap();
        let xv = xs.to_f32_vec();
        let w: Vec<f32> = (0..tokens * k).map(|_| rng.uniform() as f32).collect();
        let want = combine(&Device::Cpu, &xs.view(), &w, DType::F32)
            .unwrap()
            .to_f32_vec();
        for t in 0..tokens {
            for d in 0..dim {
                let mut acc = 0f32;
                for j in 0..k {
                    acc += w[t * k + j] * xv[(t * k + j) * dim + d];
                }
                assert_eq!(want[t * dim + d].to_bits(), acc.to_bits());
            }
        }
        for out in FLOATS {
            let c = combine(&Device::Cpu, &xs.view(), &w, out).unwrap();
            for (name, dev) in &gpus {
                let g = combine(dev, &xs.view(), &w, out).unwrap();
                assert_eq!(g.data, c.data, "{dtype} -> {out} on {name}");
            }
        }
    }
}

#[test]
fn bad_inputs_are_refused() {
    let mut devs = vec![("cpu".to_string(), Device::Cpu)];
    devs.extend(gpu_variants());
    let l = Tensor::from_f32(
        DType::F32,
        &[2, 4],
        &[0.0, 1.0, f32::NAN, 2.0, 0.0, 0.0, 0.0, 0.0],
    )
    .unwrap();
    for (name, dev) in &devs {
        let e = route(dev, &l.view(), Gating::Switch).unwrap_err();
        assert!(e.to_string().contains("non-finite"), "{name}: {e}");
        let e = route(
            dev,
            &l.view(),
            Gating::Softmax {
                k: 5,
                renormalize: true,
            },
        )
        .unwrap_err();
        assert!(e.to_string().contains("k = 5 for 4 experts"), "{name}: {e}");
    }
}

// --- `modelpress moe` through the command line ----------------------------------

use common::{run_bin, s, snapshot};
use modelpress::formats::model::Model;
use modelpress::tools::sample::write_llama_model;

#[test]
fn moe_builds_mixtral_tensors_and_refuses_what_it_cannot_build() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, ft) = (tmp.path().join("base"), tmp.path().join("ft"));
    write_llama_model(&base, common::SMALL, DType::BF16, 2, 3).unwrap();
    write_llama_model(&ft, common::SMALL, DType::BF16, 1, 4).unwrap();
    let yml = |name: &str, body: &str| {
        let p = tmp.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let good = yml(
        "good.yml",
        &format!(
            "base_model: {}\ngate_mode: random\nexperts_per_token: 2\nexperts:\n  - source_model: {}\n    positive_prompts: [a]\n  - source_model: {}\n",
            s(&base),
            s(&ft),
            s(&base)
        ),
    );
    let out = tmp.path().join("moe");
    let (ok, err) = run_bin(&["moe", s(&good), "-o", s(&out), "--device", "cpu"]);
    assert!(ok, "{err}");
    let (m, b, f) = (
        Model::open(&out).unwrap(),
        Model::open(&base).unwrap(),
        Model::open(&ft).unwrap(),
    );
    for (src, e) in b.entries() {
        let data = src.data(e);
        if let Some(p) = e.name.strip_suffix(".mlp.gate_proj.weight") {
            for (x, model) in [(0, &f), (1, &b)] {
                let (ef, ee) = m
                    .find(&format!("{p}.block_sparse_moe.experts.{x}.w1.weight"))
                    .unwrap();
                let (sf, se) = model.find(&e.name).unwrap();
                assert_eq!(ef.data(ee), sf.data(se), "{p} expert {x}");
            }
            let (gf, ge) = m
                .find(&format!("{p}.block_sparse_moe.gate.weight"))
                .unwrap();
            assert_eq!(ge.shape, vec![2, common::SMALL.hidden]);
            let g = gf.tensor(ge).unwrap().to_f32_vec();
            for row in g.chunks(common::SMALL.hidden) {
                let n: f32 = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((n - 1.0).abs() < 0.01, "router rows have unit length: {n}");
            }
        } else if e.name.contains(".mlp.") {
            assert!(m.find(&e.name).is_none(), "{} left in", e.name);
        } else {
            let (of, oe) = m.find(&e.name).unwrap();
            assert_eq!(of.data(oe), data, "{} from the base", e.name);
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        cfg["architectures"],
        serde_json::json!(["MixtralForCausalLM"])
    );
    assert_eq!(
        (
            cfg["num_local_experts"].as_u64(),
            cfg["num_experts_per_tok"].as_u64()
        ),
        (Some(2), Some(2))
    );
    assert_eq!(
        cfg["hidden_size"].as_u64(),
        Some(common::SMALL.hidden as u64)
    );

    let before = snapshot(tmp.path());
    let out2 = tmp.path().join("out2");
    let two = format!(
        "  - source_model: {}\n  - source_model: {}\n",
        s(&ft),
        s(&base)
    );
    for (body, want) in [
        (
            format!(
                "base_model: {}\ngate_mode: cheap_embed\nexperts:\n{two}",
                s(&base)
            ),
            "experts[0]: gate_mode cheap_embed needs positive_prompts",
        ),
        (
            format!(
                "base_model: {}\ngate_mode: cheap_embed\nexperts:\n  - source_model: {}\n    positive_prompts: [a]\n  - source_model: {}\n    positive_prompts: 3\n",
                s(&ft),
                s(&ft),
                s(&base)
            ),
            "experts[1].positive_prompts: expected a list of strings",
        ),
        (
            format!(
                "base_model: {}\ngate_mode: cheap_embed\nexperts:\n  - source_model: {}\n    positive_prompts: [a]\n  - source_model: {}\n    positive_prompts: [b]\n",
                s(&ft),
                s(&ft),
                s(&base)
            ),
            "gate_mode cheap_embed needs the base's tokenizer.json",
        ),
        (
            format!(
                "base_model: {}\ngate_mode: hidden\nexperts:\n{two}",
                s(&base)
            ),
            "gate_mode hidden needs a forward pass",
        ),
        (
            format!(
                "base_model: {}\nexperts:\n  - source_model: {}\n",
                s(&base),
                s(&ft)
            ),
            "at least two experts",
        ),
        (format!("experts:\n{two}"), "no base_model"),
        (
            format!(
                "base_model: {}\nexperts_per_token: 3\nexperts:\n{two}",
                s(&base)
            ),
            "experts_per_token 3 exceeds the 2 experts",
        ),
        (
            format!("base_model: {}\nbogus: 1\nexperts:\n{two}", s(&base)),
            "bogus: unknown key",
        ),
    ] {
        let p = tmp.path().join("bad.yml");
        std::fs::write(&p, &body).unwrap();
        let (ok, err) = run_bin(&["moe", s(&p), "-o", s(&out2)]);
        assert!(!ok && err.contains(want), "{body}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(!out2.exists());
        std::fs::remove_file(&p).unwrap();
    }
    assert_eq!(snapshot(tmp.path()), before, "inputs changed");
}

/// A word-level tokenizer.json with a BOS token: enough for cheap_embed.
const TOKENIZER: &str = r#"{"version":"1.0","truncation":null,"padding":null,
"added_tokens":[{"id":1,"content":"<s>","single_word":false,"lstrip":false,"rstrip":false,"normalized":false,"special":true}],
"normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,"decoder":null,
"model":{"type":"WordLevel","vocab":{"<unk>":0,"<s>":1,"code":2,"math":3,"poem":4},"unk_token":"<unk>"}}"#;

#[test]
fn cheap_embed_routers_are_the_prompts_normalized_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, ft) = (tmp.path().join("base"), tmp.path().join("ft"));
    write_llama_model(&base, common::SMALL, DType::F32, 1, 3).unwrap();
    write_llama_model(&ft, common::SMALL, DType::F32, 1, 4).unwrap();
    std::fs::write(base.join("tokenizer.json"), TOKENIZER).unwrap();
    std::fs::write(
        base.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>"}"#,
    )
    .unwrap();
    let cfg = tmp.path().join("moe.yml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: {}\ngate_mode: cheap_embed\nexperts:\n  - source_model: {}\n    positive_prompts: [\"code math\", \"math\"]\n  - source_model: {}\n    positive_prompts: [poem]\n    negative_prompts: [code]\n",
            s(&base),
            s(&ft),
            s(&base)
        ),
    )
    .unwrap();
    let out = tmp.path().join("moe");
    let (ok, err) = run_bin(&["moe", s(&cfg), "-o", s(&out), "--device", "cpu"]);
    assert!(ok, "{err}");
    let b = Model::open(&base).unwrap();
    let (ef, ee) = b.find("model.embed_tokens.weight").unwrap();
    let emb = ef.tensor(ee).unwrap().to_f32_vec();
    let h = common::SMALL.hidden;
    let sum = |ids: &[usize]| -> Vec<f64> {
        let mut v = vec![0f64; h];
        for &i in ids {
            v.iter_mut()
                .zip(&emb[i * h..(i + 1) * h])
                .for_each(|(a, &x)| *a += x as f64);
        }
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect()
    };
    // "<s>code math" and "<s>math": ids 1 2 3 and 1 3.
    let e0 = sum(&[1, 2, 3, 1, 3]);
    let (p, q) = (sum(&[1, 4]), sum(&[1, 2]));
    let d: Vec<f64> = p.iter().zip(&q).map(|(a, b)| a - b).collect();
    let n = d.iter().map(|x| x * x).sum::<f64>().sqrt();
    let e1: Vec<f64> = d.iter().map(|x| x / n).collect();
    let m = Model::open(&out).unwrap();
    let (gf, ge) = m
        .find("model.layers.0.block_sparse_moe.gate.weight")
        .unwrap();
    let g = gf.tensor(ge).unwrap().to_f32_vec();
    for (k, want) in e0.iter().chain(&e1).enumerate() {
        assert!(
            (g[k] as f64 - want).abs() < 1e-6,
            "router element {k}: {} vs {want}",
            g[k]
        );
    }
}
