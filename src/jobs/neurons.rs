//! `prune --remove-neurons S`: physically removes a fraction of the
//! intermediate neurons of every MLP block, so the model gets smaller and
//! computes the same function on the neurons it keeps.
//!
//! Recognized blocks (by tensor names):
//! - LLaMA-style SwiGLU: `P.mlp.gate_proj.weight` and `P.mlp.up_proj.weight`
//!   ([I, H], rows = neurons) and `P.mlp.down_proj.weight` ([H, I], columns
//!   = neurons), with their biases if present.
//! - BERT-style: `P.intermediate.dense.weight` `[I, H]` and its bias `[I]`, and
//!   `P.output.dense.weight` [H, I].
//!
//! Importance of neuron j: the product of the L2 norms of its rows in the
//! up-projections and of its column in the down-projection,
//! s_j = ‖up_j‖·‖gate_j‖·‖down_·j‖ (‖W_in,j‖·‖W_out,·j‖ for BERT): a neuron
//! whose input or output weights are small contributes little. Each block
//! drops exactly round_ties_even(S·I) neurons of smallest score (ties to the
//! lower index), the same number in every block, so `intermediate_size` in
//! config.json is rewritten to I − k and transformers loads the result.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, OutEntry};
use crate::jobs::pipeline::{Applied, Src, TensorOp};
use crate::ops::prune::smallest_k;
use crate::ops::reduce::{col_figures, col_stats, row_figures, row_stats, RowStats};
use crate::ops::select::{check_sparsity, count_for};
use rayon::prelude::*;
use std::collections::HashMap;

/// One MLP block: the tensors whose rows are its neurons (up-projections
/// and their biases) and the one whose columns are (down-projection).
#[derive(Clone, Debug)]
pub struct MlpBlock {
    /// Tensors whose rows are the block's neurons (gate/up projections).
    pub rows: Vec<String>,
    /// Their biases, one element per neuron.
    pub biases: Vec<String>,
    /// The tensor whose columns are the neurons (down projection).
    pub down: String,
}

/// Finds the MLP blocks of `model`; errors when none is recognized or
/// their shapes disagree.
pub fn find_blocks(model: &Model) -> Result<(Vec<MlpBlock>, usize)> {
    let mut blocks = Vec::new();
    let has = |n: &str| model.find(n).is_some();
    for (_, e) in model.entries() {
        let name = &e.name;
        if let Some(p) = name.strip_suffix(".mlp.up_proj.weight") {
            let mut rows = vec![name.clone()];
            let gate = format!("{p}.mlp.gate_proj.weight");
            if has(&gate) {
                rows.push(gate);
            }
            let biases = [".mlp.up_proj.bias", ".mlp.gate_proj.bias"]
                .iter()
                .map(|s| format!("{p}{s}"))
                .filter(|b| has(b))
                .collect();
            blocks.push(MlpBlock {
                rows,
                biases,
                down: format!("{p}.mlp.down_proj.weight"),
            });
        } else if let Some(p) = name.strip_suffix(".intermediate.dense.weight") {
            let bias = format!("{p}.intermediate.dense.bias");
            blocks.push(MlpBlock {
                rows: vec![name.clone()],
                biases: if has(&bias) { vec![bias] } else { vec![] },
                down: format!("{p}.output.dense.weight"),
            });
        }
    }
    if blocks.is_empty() {
        return Err(Error::input(format!(
            "{}: no MLP block recognized (LLaMA-style mlp.gate_proj/up_proj/down_proj, or BERT-style intermediate.dense/output.dense)",
            model.path.display()
        )));
    }
    let mut size = None;
    for b in &blocks {
        let shape = |n: &str| {
            model
                .find(n)
                .map(|(_, e)| e.shape.clone())
                .ok_or_else(|| Error::input(format!("MLP block of {}: {n} is missing", b.rows[0])))
        };
        let i = shape(&b.rows[0])?;
        let d = shape(&b.down)?;
        if i.len() != 2 || d.len() != 2 || d[1] != i[0] {
            return Err(Error::input(format!(
                "MLP block: {} is {:?} but {} is {:?} (expected [I, H] and [H, I])",
                b.rows[0], i, b.down, d
            )));
        }
        for n in b.rows.iter().chain(&b.biases) {
            let s = shape(n)?;
            if s[0] != i[0] {
                return Err(Error::input(format!(
                    "MLP block: {n} has {} rows, {} has {}",
                    s[0], b.rows[0], i[0]
                )));
            }
        }
        match size {
            None => size = Some(i[0]),
            Some(s) if s != i[0] => {
                return Err(Error::input(format!(
                    "MLP blocks differ in size ({s} and {}): one intermediate_size cannot describe them",
                    i[0]
                )))
            }
            _ => {}
        }
    }
    // `blocks` is not empty, so the loop set the size.
    Ok((blocks, size.unwrap_or(0)))
}

/// How a tensor is cut: rows or columns kept.
#[derive(Clone, Debug)]
enum Cut {
    Rows(std::sync::Arc<Vec<usize>>),
    Cols(std::sync::Arc<Vec<usize>>),
}

/// One factor of a neuron's score: each neuron's norm as an interval, and
/// its exact (CPU reference) value.
type Factor<'a> = (Vec<(f64, f64)>, Box<dyn Fn(usize) -> f64 + 'a>);

/// `prune --remove-neurons S`: drops the fraction S of every MLP block's
/// intermediate neurons with the smallest ‖in rows‖·‖out column‖, shrinking
/// the tensors and `intermediate_size` in config.json.
pub struct RemoveNeurons {
    /// S.
    pub fraction: f64,
    /// intermediate_size before.
    pub old_size: usize,
    /// intermediate_size after.
    pub new_size: usize,
    cuts: HashMap<String, Cut>,
}

/// L2 norms of the lines of a tensor as intervals (the GPU's sums carry an
/// error bound), and the exact (CPU reference) norm of one line.
fn norm_intervals(st: &RowStats) -> Vec<(f64, f64)> {
    st.sumsq
        .iter()
        .map(|&s| {
            let b = st.bound(s);
            if !s.is_finite() {
                (0.0, f64::INFINITY)
            } else {
                ((s - b).max(0.0).sqrt(), (s + b).sqrt())
            }
        })
        .collect()
}

impl RemoveNeurons {
    /// Scores every neuron of every block (norms computed on `dev`) and
    /// decides which to keep.
    pub fn new(dev: &Device, model: &Model, fraction: f64) -> Result<RemoveNeurons> {
        check_sparsity(fraction)?;
        let (blocks, size) = find_blocks(model)?;
        let k = count_for(fraction, size as u64) as usize;
        let mut cuts = HashMap::new();
        for b in &blocks {
            let tensor = |n: &str| {
                let (f, e) = model
                    .find(n)
                    .ok_or_else(|| Error::input(format!("MLP block: {n} is missing")))?;
                f.tensor(e)
                    .ok_or_else(|| Error::Unsupported(format!("dtype {}", e.dtype)).at(&f.path, n))
                    .map(|t| (f, e, t))
            };
            // Interval of each factor's norm; the score is their product.
            let mut factors: Vec<Factor> = Vec::new();
            for n in &b.rows {
                let (f, e, t) = tensor(n)?;
                let st = row_stats(dev, &t).map_err(|err| err.at(&f.path, n))?;
                f.release(e);
                factors.push((
                    norm_intervals(&st),
                    Box::new(move |j| row_figures(&t, j).0.sqrt()),
                ));
            }
            let (f, e, t) = tensor(&b.down)?;
            let st = col_stats(dev, &t).map_err(|err| err.at(&f.path, &b.down))?;
            f.release(e);
            factors.push((
                norm_intervals(&st),
                Box::new(move |j| col_figures(&t, j).0.sqrt()),
            ));
            let approx = st.approximate;
            let bounds: Vec<(f64, f64)> = (0..size)
                .map(|j| {
                    factors
                        .iter()
                        .fold((1.0, 1.0), |(lo, hi), (iv, _)| (lo * iv[j].0, hi * iv[j].1))
                })
                .collect();
            let exact = |j: usize| factors.iter().map(|(_, ex)| ex(j)).product::<f64>();
            let drop = smallest_k(&bounds, k, approx, exact);
            let kept: std::sync::Arc<Vec<usize>> =
                std::sync::Arc::new((0..size).filter(|&j| !drop[j]).collect());
            for n in b.rows.iter().chain(&b.biases) {
                cuts.insert(n.clone(), Cut::Rows(kept.clone()));
            }
            cuts.insert(b.down.clone(), Cut::Cols(kept.clone()));
        }
        Ok(RemoveNeurons {
            fraction,
            old_size: size,
            new_size: size - k,
            cuts,
        })
    }
}

impl TensorOp for RemoveNeurons {
    fn describe(&self) -> String {
        format!(
            "remove {} of MLP neurons ({} -> {})",
            self.fraction, self.old_size, self.new_size
        )
    }

    fn default_select(&self, e: &Entry) -> bool {
        self.cuts.contains_key(&e.name)
    }

    fn outputs(&self, e: &Entry) -> Result<Vec<OutEntry>> {
        let mut shape = e.shape.clone();
        match self.cuts.get(&e.name) {
            Some(Cut::Rows(k)) => shape[0] = k.len(),
            Some(Cut::Cols(k)) => shape[1] = k.len(),
            None => {}
        }
        Ok(vec![OutEntry {
            name: e.name.clone(),
            dtype: e.dtype.clone(),
            shape,
        }])
    }

    fn rewrite_file(&self, name: &str, bytes: &[u8]) -> Result<Option<Vec<u8>>> {
        if name != "config.json" {
            return Ok(None);
        }
        let mut cfg: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(bytes)
            .map_err(|e| Error::input(format!("config.json is not JSON: {e}")))?;
        if !cfg.contains_key("intermediate_size") {
            return Err(Error::input(
                "config.json has no intermediate_size to rewrite",
            ));
        }
        cfg.insert("intermediate_size".into(), self.new_size.into());
        Ok(Some(
            (serde_json::to_string_pretty(&cfg).map_err(|e| Error::input(e.to_string()))? + "\n")
                .into_bytes(),
        ))
    }

    /// Gathers the kept rows or columns: pure data movement, done on the CPU
    /// (the decision was made from norms computed on the device).
    fn apply(&self, _dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let e = srcs[0].entry;
        let data = srcs[0].data();
        let es = data.len() / e.numel().max(1);
        // Elements per neuron-row: a bias has one per neuron.
        let row_len: usize = e.shape[1..].iter().product();
        let out = match self.cuts.get(&e.name) {
            Some(Cut::Rows(kept)) => {
                let mut out = vec![0u8; kept.len() * row_len * es];
                out.par_chunks_mut((row_len * es).max(1))
                    .zip(kept.par_iter())
                    .for_each(|(o, &j)| {
                        o.copy_from_slice(&data[j * row_len * es..(j + 1) * row_len * es])
                    });
                out
            }
            Some(Cut::Cols(kept)) => {
                let rows = e.shape[0];
                let mut out = vec![0u8; rows * kept.len() * es];
                out.par_chunks_mut((kept.len() * es).max(1))
                    .enumerate()
                    .for_each(|(r, o)| {
                        for (c, &j) in kept.iter().enumerate() {
                            let src = (r * row_len + j) * es;
                            o[c * es..(c + 1) * es].copy_from_slice(&data[src..src + es]);
                        }
                    });
                out
            }
            None => data.to_vec(),
        };
        Ok(Applied {
            outputs: vec![out],
            approx: None,
            diff: None,
            note: Some(format!("{:?} -> {:?}", e.shape, self.outputs(e)?[0].shape)),
        })
    }
}
