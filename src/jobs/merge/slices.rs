//! The slices form of a merge configuration (frankenmerges, layer ranges):
//! output layer after output layer taken from the layer ranges of each
//! slice's sources, the input embeddings from the first slice's sources
//! and the final norm and head from the last one's, as mergekit plans it.
//!
//! The output's layout is built here as models that exist only in memory
//! (`Model::layout`): model k holds, under each output tensor's name, that
//! tensor's k-th source, so the ordinary pipeline streams the merge tensor
//! by tensor with no copy. Where a slice has fewer sources than the
//! widest one, its last source fills the rest (and is not read again).

use super::config::{same_path, MergeConfig};
use super::params::{layer_of, with_layer};
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, SafetensorsFile};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Output shards are cut at this size, as mergekit's default
/// `--out-shard-size 5B` (bytes).
const SHARD_BYTES: u64 = 5_000_000_000;

/// Where one output tensor comes from.
#[derive(Clone, Debug)]
pub struct Site {
    /// The slice whose sources and parameters it merges.
    pub slice: usize,
    /// Its position for gradients: i/(n − 1) within a slice of n layers (1
    /// when n = 1); 0 for embeddings, final norm and head.
    pub t: f64,
    /// Per source of the slice: the tensor's name there (for filters).
    pub names: Vec<String>,
}

/// The output's layout.
pub struct Layout {
    /// The pipeline's models (see the module's notes); the first one sets
    /// the output's tensors, shards and other files.
    pub models: Vec<Model>,
    /// Per output tensor: where it comes from.
    pub sites: HashMap<String, Site>,
    /// Per output layer: its slice and the layer of the slice's first
    /// source it comes from.
    pub layers: Vec<(usize, usize)>,
    /// Layers of the model whose other files (config.json, tokenizer) the
    /// output takes: the base model, or the first slice's first source.
    pub template_layers: usize,
}

/// Input embeddings (taken from the first slice); other tensors outside
/// the layers (final norm, head) are taken from the last.
fn is_input_embedding(name: &str) -> bool {
    (name.contains("embed") && !name.contains("embed_out"))
        || name.contains("wte.")
        || name.contains("wpe.")
}

fn layer_count(m: &Model) -> usize {
    m.entries()
        .filter_map(|(_, e)| layer_of(&e.name))
        .max()
        .map_or(0, |l| l + 1)
}

type Found<'m> = (&'m SafetensorsFile, &'m Entry);

/// One output tensor: its name, site and sources.
struct Planned<'m> {
    name: String,
    site: Site,
    srcs: Vec<Found<'m>>,
}

/// Checks that `e2` (source `key`'s tensor in `p2`) can be merged with `e`
/// (in `p`); vocabulary tensors may differ in rows when `truncate`.
fn compatible(key: &str, p2: &Path, e2: &Entry, p: &Path, e: &Entry, truncate: bool) -> Result<()> {
    let float = e.kernel_dtype().is_some() && e2.kernel_dtype().is_some();
    let rows_only = truncate
        && is_vocab(&e.name)
        && e.shape.len() == e2.shape.len()
        && !e.shape.is_empty()
        && e.shape[1..] == e2.shape[1..];
    if e2.shape != e.shape && !rows_only {
        return Err(Error::input(format!(
            "{key}: {} in {} has shape {:?}, but {} in {} has {:?}",
            e2.name,
            p2.display(),
            e2.shape,
            e.name,
            p.display(),
            e.shape
        )));
    }
    if e2.dtype != e.dtype && !float {
        return Err(Error::input(format!(
            "{key}: {} in {} is {}, but {} in {} is {}",
            e2.name,
            p2.display(),
            e2.dtype,
            e.name,
            p.display(),
            e.dtype
        )));
    }
    Ok(())
}

fn is_vocab(name: &str) -> bool {
    ["embed_tokens.weight", "lm_head.weight", "wte.weight"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// Opens every model the slices name and lays the output out; with
/// `truncate`, vocabulary tensors may differ in rows (the merge cuts them).
pub fn build(cfg: &MergeConfig, truncate: bool) -> Result<Layout> {
    let template_path = cfg
        .base_model
        .clone()
        .unwrap_or_else(|| cfg.slices[0].sources[0].path.clone());
    // Each distinct model opened once.
    let mut paths: Vec<PathBuf> = vec![template_path.clone()];
    for s in &cfg.slices {
        for src in &s.sources {
            if !paths.iter().any(|p| same_path(p, &src.path)) {
                paths.push(src.path.clone());
            }
        }
    }
    let opened = paths
        .iter()
        .map(|p| Model::open(p))
        .collect::<Result<Vec<Model>>>()?;
    let index_of = |p: &Path| paths.iter().position(|q| same_path(q, p)).unwrap_or(0);
    let counts: Vec<usize> = opened.iter().map(layer_count).collect();
    // Per model, per layer: its tensors in file order.
    let by_layer: Vec<Vec<Vec<Found>>> = opened
        .iter()
        .zip(&counts)
        .map(|(m, &n)| {
            let mut v: Vec<Vec<Found>> = vec![Vec::new(); n];
            for (f, e) in m.entries() {
                if let Some(l) = layer_of(&e.name) {
                    v[l].push((f, e));
                }
            }
            v
        })
        .collect();
    let mut planned: Vec<Planned> = Vec::new();
    let mut layers = Vec::new();
    let template = &opened[0];
    let outside = |pre: bool| {
        template
            .entries()
            .filter(move |(_, e)| layer_of(&e.name).is_none() && is_input_embedding(&e.name) == pre)
    };
    let whole = |slice: usize, e: &Entry| -> Result<Planned> {
        let s = &cfg.slices[slice];
        let mut srcs = Vec::new();
        for (j, src) in s.sources.iter().enumerate() {
            let key = format!("slices[{slice}].sources[{j}]");
            let m = &opened[index_of(&src.path)];
            let found = m.find(&e.name).ok_or_else(|| {
                Error::input(format!(
                    "{key}: {} has no {} (the output takes it from this slice's sources)",
                    src.path.display(),
                    e.name
                ))
            })?;
            compatible(&key, &src.path, found.1, &template.path, e, truncate)?;
            srcs.push(found);
        }
        Ok(Planned {
            name: e.name.clone(),
            site: Site {
                slice,
                t: 0.0,
                names: vec![e.name.clone(); srcs.len()],
            },
            srcs,
        })
    };
    for (_, e) in outside(true) {
        planned.push(whole(0, e)?);
    }
    for (i, s) in cfg.slices.iter().enumerate() {
        let mut len = None;
        for (j, src) in s.sources.iter().enumerate() {
            let have = counts[index_of(&src.path)];
            let (a, b) = src.layers;
            if b > have {
                return Err(Error::input(format!(
                    "slices[{i}].sources[{j}].layer_range: [{a}, {b}] is past the end of {}, which has {have} layers",
                    src.path.display()
                )));
            }
            match len {
                None => len = Some(b - a),
                Some(n) if n != b - a => {
                    return Err(Error::input(format!(
                        "slices[{i}].sources[{j}].layer_range: [{a}, {b}] holds {} layers, but the slice's first source holds {n} (every source of a slice holds as many)",
                        b - a
                    )));
                }
                _ => {}
            }
        }
        let n = len.unwrap_or(0);
        let first = &s.sources[0];
        let m0 = index_of(&first.path);
        for o in 0..n {
            let out_layer = layers.len();
            let t = if n > 1 {
                o as f64 / (n - 1) as f64
            } else {
                1.0
            };
            let l0 = first.layers.0 + o;
            for (_, e) in &by_layer[m0][l0] {
                let out_name = with_layer(&e.name, out_layer).unwrap_or_else(|| e.name.clone());
                let mut srcs = Vec::new();
                let mut names = Vec::new();
                for (j, src) in s.sources.iter().enumerate() {
                    let key = format!("slices[{i}].sources[{j}]");
                    let lj = src.layers.0 + o;
                    let name = with_layer(&e.name, lj).unwrap_or_else(|| e.name.clone());
                    let mj = index_of(&src.path);
                    let found = opened[mj].find(&name).ok_or_else(|| {
                        Error::input(format!(
                            "{key}: {} has no {name} (its layer {lj} must hold the tensors of layer {l0} of {})",
                            src.path.display(),
                            first.path.display()
                        ))
                    })?;
                    if by_layer[mj][lj].len() != by_layer[m0][l0].len() {
                        return Err(Error::input(format!(
                            "{key}: layer {lj} of {} holds {} tensors, but layer {l0} of {} holds {}",
                            src.path.display(),
                            by_layer[mj][lj].len(),
                            first.path.display(),
                            by_layer[m0][l0].len()
                        )));
                    }
                    compatible(&key, &src.path, found.1, &first.path, e, truncate)?;
                    srcs.push(found);
                    names.push(name);
                }
                planned.push(Planned {
                    name: out_name,
                    site: Site { slice: i, t, names },
                    srcs,
                });
            }
            layers.push((i, l0));
        }
    }
    let last = cfg.slices.len() - 1;
    for (_, e) in outside(false) {
        planned.push(whole(last, e)?);
    }
    // The pipeline's models.
    let width = planned.iter().map(|p| p.srcs.len()).max().unwrap_or(1);
    let mut shards_0: Vec<Vec<usize>> = vec![Vec::new()];
    let mut bytes = 0u64;
    for (k, p) in planned.iter().enumerate() {
        let b = p.srcs[0].1.bytes() as u64;
        if bytes > 0 && bytes + b > SHARD_BYTES {
            shards_0.push(Vec::new());
            bytes = 0;
        }
        bytes += b;
        if let Some(last) = shards_0.last_mut() {
            last.push(k);
        }
    }
    let count = shards_0.len();
    let shard_name = |s: usize| {
        if count == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{count:05}.safetensors", s + 1)
        }
    };
    let parts = |k: usize, which: &[usize]| -> Vec<(String, &SafetensorsFile, &Entry)> {
        which
            .iter()
            .map(|&i| {
                let p = &planned[i];
                let (f, e) = p.srcs[k.min(p.srcs.len() - 1)];
                (p.name.clone(), f, e)
            })
            .collect()
    };
    let sources: Vec<PathBuf> = opened.iter().flat_map(|m| m.input_paths()).collect();
    let mut models = Vec::with_capacity(width);
    let shards = shards_0
        .iter()
        .enumerate()
        .map(|(s, which)| SafetensorsFile::layout(PathBuf::from(shard_name(s)), parts(0, which)))
        .collect();
    models.push(Model::layout(template, shards, count > 1, sources)?);
    let all: Vec<usize> = (0..planned.len()).collect();
    for k in 1..width {
        let shard = SafetensorsFile::layout(PathBuf::from(format!("source {k}")), parts(k, &all));
        models.push(Model::layout(template, vec![shard], false, Vec::new())?);
    }
    Ok(Layout {
        models,
        sites: planned.into_iter().map(|p| (p.name, p.site)).collect(),
        layers,
        template_layers: counts[0],
    })
}
