//! Removing MLP neurons: smaller shapes, consistent bookkeeping between up-
//! and down-projections, the same function on the neurons kept, identical
//! on GPU and CPU.

mod common;
use common::*;
use modelpress::formats::model::Model;
use modelpress::jobs::neurons::{find_blocks, RemoveNeurons};
use modelpress::jobs::pipeline::{self, JobOptions};
use modelpress::tools::sample::{write_bert_model, write_llama_model, BertShape, LlamaShape, Rng};
use modelpress::{DType, Device, Error};
use std::path::Path;

fn matrix(m: &Model, name: &str) -> (Vec<f64>, Vec<usize>) {
    let (f, e) = m.find(name).unwrap_or_else(|| panic!("{name}"));
    (
        f.tensor(e)
            .unwrap()
            .to_f32_vec()
            .iter()
            .map(|&v| v as f64)
            .collect(),
        e.shape.clone(),
    )
}

/// y = W·x for W [out, in].
fn matvec(w: &[f64], shape: &[usize], x: &[f64]) -> Vec<f64> {
    (0..shape[0])
        .map(|r| (0..shape[1]).map(|c| w[r * shape[1] + c] * x[c]).sum())
        .collect()
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

fn gelu(v: f64) -> f64 {
    0.5 * v * (1.0 + (v / 2f64.sqrt()).tanh_approx())
}

trait Erf {
    fn tanh_approx(self) -> f64;
}
impl Erf for f64 {
    // Any fixed activation with act(0) = 0 shows the equivalence; this is
    // GELU's tanh form.
    fn tanh_approx(self) -> f64 {
        (self * (1.0 + 0.044715 * self * self) * 0.7978845608 * 2f64.sqrt()).tanh()
    }
}

/// The MLP of block `p` applied to x: SwiGLU (LLaMA) or GELU with biases
/// (BERT). `zeroed` neurons are masked out of the original.
fn mlp(m: &Model, p: &str, llama: bool, x: &[f64], zeroed: &[bool]) -> Vec<f64> {
    if llama {
        let (g, gs) = matrix(m, &format!("{p}.mlp.gate_proj.weight"));
        let (u, us) = matrix(m, &format!("{p}.mlp.up_proj.weight"));
        let (d, ds) = matrix(m, &format!("{p}.mlp.down_proj.weight"));
        let h: Vec<f64> = matvec(&g, &gs, x)
            .iter()
            .zip(matvec(&u, &us, x))
            .enumerate()
            .map(|(j, (a, b))| {
                if zeroed.get(j) == Some(&true) {
                    0.0
                } else {
                    silu(*a) * b
                }
            })
            .collect();
        matvec(&d, &ds, &h)
    } else {
        let (w, ws) = matrix(m, &format!("{p}.intermediate.dense.weight"));
        let (b, _) = matrix(m, &format!("{p}.intermediate.dense.bias"));
        let (o, os) = matrix(m, &format!("{p}.output.dense.weight"));
        let (ob, _) = matrix(m, &format!("{p}.output.dense.bias"));
        let h: Vec<f64> = matvec(&w, &ws, x)
            .iter()
            .zip(&b)
            .enumerate()
            .map(|(j, (a, bb))| {
                if zeroed.get(j) == Some(&true) {
                    0.0
                } else {
                    gelu(a + bb)
                }
            })
            .collect();
        matvec(&o, &os, &h)
            .iter()
            .zip(&ob)
            .map(|(a, b)| a + b)
            .collect()
    }
}

fn run(dev: &Device, input: &Path, out: &Path, frac: f64) -> RemoveNeurons {
    let m = Model::open(input).unwrap();
    let op = RemoveNeurons::new(dev, &m, frac).unwrap();
    let opts = JobOptions::new(dev.clone());
    pipeline::run(&op, &[m], out, &opts).unwrap();
    op
}

#[test]
fn llama_and_bert_blocks_shrink_and_keep_their_function() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = tmp.path().join("llama");
    let bert = tmp.path().join("bert");
    let s = seed("neurons");
    write_llama_model(
        &llama,
        LlamaShape {
            hidden: 48,
            intermediate: 80,
            layers: 2,
            heads: 2,
            vocab: 64,
        },
        DType::BF16,
        2,
        s,
    )
    .unwrap();
    write_bert_model(
        &bert,
        BertShape {
            hidden: 40,
            intermediate: 96,
            layers: 2,
            heads: 2,
            vocab: 50,
        },
        DType::F32,
        1,
        s,
    )
    .unwrap();
    let mut rng = Rng::new(s);
    for (dir, is_llama) in [(&llama, true), (&bert, false)] {
        let orig = Model::open(dir).unwrap();
        let (blocks, size) = find_blocks(&orig).unwrap();
        assert_eq!(blocks.len(), 2);
        let mut outs = Vec::new();
        let mut devs = vec![("cpu".to_string(), Device::Cpu)];
        devs.extend(gpu_variants().into_iter().take(2));
        for (name, dev) in &devs {
            let out = tmp.path().join(format!(
                "{}-{}",
                dir.file_name().unwrap().to_string_lossy(),
                name.replace('/', "-")
            ));
            let op = run(dev, dir, &out, 0.25);
            let k = (0.25 * size as f64).round_ties_even() as usize;
            assert_eq!(op.new_size, size - k);
            let cfg: serde_json::Value =
                serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
            assert_eq!(cfg["intermediate_size"], op.new_size, "config rewritten");
            let pruned = Model::open(&out).unwrap();
            let size_of = |p: &Path| {
                std::fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().metadata().unwrap().len())
                    .sum::<u64>()
            };
            assert!(size_of(&out) < size_of(dir), "smaller on disk");
            for b in &blocks {
                let p = b
                    .down
                    .trim_end_matches(".mlp.down_proj.weight")
                    .trim_end_matches(".output.dense.weight");
                // Which neurons went: the rows of the up-projection that are
                // missing from the pruned one (bookkeeping check below).
                let (u0, us) = matrix(&orig, &b.rows[0]);
                let (u1, us1) = matrix(&pruned, &b.rows[0]);
                assert_eq!(us1, vec![size - k, us[1]], "{name} {}", b.rows[0]);
                let mut kept = Vec::new();
                let mut j = 0;
                for r in 0..us1[0] {
                    while u0[j * us[1]..(j + 1) * us[1]] != u1[r * us[1]..(r + 1) * us[1]] {
                        j += 1;
                    }
                    kept.push(j);
                    j += 1;
                }
                let zeroed: Vec<bool> = (0..size).map(|j| !kept.contains(&j)).collect();
                // The same columns left the down-projection, and the other row
                // tensors and biases lost the same rows.
                let (d0, ds) = matrix(&orig, &b.down);
                let (d1, ds1) = matrix(&pruned, &b.down);
                assert_eq!(ds1, vec![ds[0], size - k]);
                for r in 0..ds[0] {
                    for (c, &j) in kept.iter().enumerate() {
                        assert_eq!(
                            d1[r * ds1[1] + c],
                            d0[r * ds[1] + j],
                            "{name} down col bookkeeping"
                        );
                    }
                }
                for n in b.rows.iter().chain(&b.biases) {
                    let (a0, s0) = matrix(&orig, n);
                    let (a1, _) = matrix(&pruned, n);
                    let w = if s0.len() == 2 { s0[1] } else { 1 };
                    for (r, &j) in kept.iter().enumerate() {
                        assert_eq!(a1[r * w..(r + 1) * w], a0[j * w..(j + 1) * w], "{name} {n}");
                    }
                }
                // The dropped neurons are those of smallest score.
                let norm_row = |v: &[f64], w: usize, j: usize| {
                    v[j * w..(j + 1) * w]
                        .iter()
                        .map(|a| a * a)
                        .sum::<f64>()
                        .sqrt()
                };
                let score = |j: usize| {
                    let mut sc = (0..ds[0])
                        .map(|r| d0[r * ds[1] + j].powi(2))
                        .sum::<f64>()
                        .sqrt();
                    for n in &b.rows {
                        let (a, s0) = matrix(&orig, n);
                        sc *= norm_row(&a, s0[1], j);
                    }
                    sc
                };
                let mut order: Vec<(f64, usize)> = (0..size).map(|j| (score(j), j)).collect();
                order.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let mut want: Vec<usize> = order[k..].iter().map(|o| o.1).collect();
                want.sort();
                assert_eq!(kept, want, "{name}: the k smallest scores go");
                // Same function on the kept neurons.
                let x: Vec<f64> = (0..us[1]).map(|_| rng.normal()).collect();
                let a = mlp(&orig, p, is_llama, &x, &zeroed);
                let b2 = mlp(&pruned, p, is_llama, &x, &[]);
                for (u, v) in a.iter().zip(&b2) {
                    assert!(
                        (u - v).abs() <= 1e-9 * (1.0 + u.abs()),
                        "{name}: {u} vs {v}"
                    );
                }
            }
            outs.push(out);
        }
        for o in &outs[1..] {
            assert!(
                dir_bytes(&outs[0]) == dir_bytes(o),
                "GPU and CPU remove the same neurons"
            );
        }
    }
}

#[test]
fn unknown_layouts_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("plain.safetensors");
    let t = tensor(DType::F32, &[4, 4], &[0.5; 16]);
    let mut w = modelpress::formats::safetensors::SafetensorsWriter::create(
        &p,
        vec![modelpress::formats::safetensors::OutEntry {
            name: "fc.weight".into(),
            dtype: "F32".into(),
            shape: vec![4, 4],
        }],
        None,
    )
    .unwrap();
    w.write("fc.weight", &t.data).unwrap();
    w.finish().unwrap();
    let m = Model::open(&p).unwrap();
    let e = RemoveNeurons::new(&Device::Cpu, &m, 0.25).err().unwrap();
    assert!(
        matches!(e, Error::Input(ref s) if s.contains("no MLP block")),
        "{e}"
    );
    assert!(matches!(
        RemoveNeurons::new(&Device::Cpu, &m, 1.5).err().unwrap(),
        Error::Input(_)
    ));
}
