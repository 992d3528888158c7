//! What an operation over whole models is: the tensors it is handed
//! (`Src`), what it gives back (`Applied`), the trait every job implements
//! (`TensorOp`) and which tensors it touches (`Selection`).

use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::{Entry, Metadata, OutEntry, SafetensorsFile};
use crate::ops::diff::Diff;
use crate::tensor::{Tensor, TensorRef};
use regex::Regex;
use std::path::PathBuf;

/// One input tensor as an operation sees it: its header entry and bytes.
#[derive(Clone, Copy)]
pub struct Src<'a> {
    /// The file holding it.
    pub file: &'a SafetensorsFile,
    /// Its header entry.
    pub entry: &'a Entry,
}

impl<'a> Src<'a> {
    /// Its bytes, mapped from the file.
    pub fn data(&self) -> &'a [u8] {
        self.file.data(self.entry)
    }

    /// The tensor as the kernels take it.
    pub fn tensor(&self) -> Result<TensorRef<'a>> {
        self.file.tensor(self.entry).ok_or_else(|| {
            Error::Unsupported(format!(
                "dtype {} (the kernels take F32, F16 and BF16)",
                self.entry.dtype
            ))
        })
    }
}

/// What an operation produced for one tensor.
pub struct Applied {
    /// Bytes of each tensor `TensorOp::outputs` declared, in order.
    pub outputs: Vec<Vec<u8>>,
    /// A float tensor meant to approximate the input, for the error
    /// figures (the output itself, or its dequantization).
    pub approx: Option<Tensor>,
    /// The output against `srcs[0]` (and the other inputs' non-finite
    /// values), from the operation's own pass: when given, the pipeline
    /// needs no pass of its own for the report, and ignores `approx`.
    pub diff: Option<Diff>,
    /// A few words for the report ("12 of 24 zero").
    pub note: Option<String>,
}

impl Applied {
    /// A float tensor that is both the output and what approximates the
    /// input; the pipeline compares the two in a pass of its own.
    pub fn float(t: Tensor) -> Applied {
        Applied {
            outputs: vec![t.data.clone()],
            approx: Some(t),
            diff: None,
            note: None,
        }
    }

    /// A float output with the figures its operation computed in passing.
    pub fn with_diff(t: Tensor, diff: Diff) -> Applied {
        Applied {
            outputs: vec![t.data],
            approx: None,
            diff: Some(diff),
            note: None,
        }
    }
}

/// An operation over whole models.
pub trait TensorOp: Sync {
    /// "prune |w| < 0.01", for reports.
    fn describe(&self) -> String;

    /// Whether the operation touches `e` when the user names no --include:
    /// by default float tensors of rank ≥ 2 (norms and biases pass through).
    fn default_select(&self, e: &Entry) -> bool {
        e.kernel_dtype().is_some() && e.shape.len() >= 2
    }

    /// The output tensors written for a touched input tensor.
    fn outputs(&self, e: &Entry) -> Result<Vec<OutEntry>> {
        Ok(vec![OutEntry {
            name: e.name.clone(),
            dtype: e.dtype.clone(),
            shape: e.shape.clone(),
        }])
    }

    /// The output shard's metadata, given the input's and the tensors this
    /// shard has touched.
    fn shard_metadata(&self, input: Option<&Metadata>, _touched: &[&Entry]) -> Option<Metadata> {
        input.cloned()
    }

    /// New contents for a copied file of a model directory (config.json
    /// after neurons were removed), or None to copy it as it is.
    fn rewrite_file(&self, _name: &str, _bytes: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }

    /// Files of the job's own written into an output directory beside the
    /// tensors (a merge's configuration), as (name, contents); they replace
    /// input files of the same name. Ignored for a single-file output.
    fn extra_files(&self) -> Result<Vec<(String, Vec<u8>)>> {
        Ok(Vec::new())
    }

    /// Checks, before anything is written, that the operation can run on
    /// `e` (for example that a scores file has its activation norms).
    fn prepare(&self, _e: &Entry) -> Result<()> {
        Ok(())
    }

    /// Files the operation reads besides the models (a scores file), which
    /// no output may overwrite.
    fn input_paths(&self) -> Vec<PathBuf> {
        Vec::new()
    }

    /// Whether touched tensor `e` may have another first dimension in the
    /// other models (vocabulary rows a merge truncates); other dimensions
    /// must still agree.
    fn rows_may_differ(&self, _e: &Entry) -> bool {
        false
    }

    /// Whether a touched tensor of model k > 0 may have another float dtype
    /// than model 0's (a delta in f32 for a bf16 model).
    fn mixed_dtypes(&self) -> bool {
        false
    }

    /// Computes the outputs of one tensor; `srcs[k]` is the tensor of the
    /// same name in model k.
    fn apply(&self, dev: &Device, srcs: &[Src], models: &[Model]) -> Result<Applied>;
}

/// config.json's bytes after `edit` changes its object, written back as
/// transformers writes it (two-space indent, a final newline).
pub fn edit_config(
    bytes: &[u8],
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>) -> Result<()>,
) -> Result<Vec<u8>> {
    let Ok(serde_json::Value::Object(mut cfg)) = serde_json::from_slice(bytes) else {
        return Err(Error::input("config.json: not a JSON object"));
    };
    edit(&mut cfg)?;
    let mut out = serde_json::to_vec_pretty(&serde_json::Value::Object(cfg))
        .map_err(|e| Error::input(format!("config.json: {e}")))?;
    out.push(b'\n');
    Ok(out)
}

/// Whether tensor `e` is the weight of a Linear layer, as far as names
/// tell: a rank-2 float `*.weight` that is not an embedding (`embed`,
/// `wte`, `wpe`, `shared`). Norms and biases have rank 1.
pub fn is_linear_weight(e: &Entry) -> bool {
    let Some(module) = e.name.strip_suffix(".weight") else {
        return false;
    };
    let leaf = module.rsplit('.').next().unwrap_or(module);
    e.shape.len() == 2
        && e.kernel_dtype().is_some()
        && !(leaf.contains("embed") || matches!(leaf, "wte" | "wpe" | "shared"))
}

/// Compiles `pattern`, given as `what` (a flag), or an error of one line
/// (the regex crate explains over several, with a caret under the spot).
pub fn regex(what: &str, pattern: &str) -> Result<Regex> {
    Regex::new(pattern).map_err(|e| {
        let msg = e.to_string();
        let why = msg
            .lines()
            .last()
            .unwrap_or("")
            .trim_start_matches("error: ");
        Error::input(format!("{what} '{pattern}': bad regex: {why}"))
    })
}

/// Which tensors a job touches. Each operation has a default set (float
/// tensors of rank ≥ 2 for most: norms and biases pass through);
/// `--include` and `--exclude` regexes over names only narrow it, so that
/// `--include '^encoder\.'` never reaches a LayerNorm. `any_rank`
/// (`--any-rank`) widens the default to float tensors of every rank, for
/// users who mean to change norms and biases too.
#[derive(Default)]
pub struct Selection {
    /// A touched tensor's name matches one of these (all when empty).
    pub include: Vec<Regex>,
    /// A touched tensor's name matches none of these.
    pub exclude: Vec<Regex>,
    /// Add float tensors of rank 0 and 1 to the default set.
    pub any_rank: bool,
}

impl Selection {
    /// Compiles the regexes; a bad one is an error naming it.
    pub fn new(include: &[String], exclude: &[String], any_rank: bool) -> Result<Selection> {
        let compile = |v: &[String]| {
            v.iter()
                .map(|p| regex("regex", p))
                .collect::<Result<Vec<_>>>()
        };
        Ok(Selection {
            include: compile(include)?,
            exclude: compile(exclude)?,
            any_rank,
        })
    }

    /// Whether `op` touches `e` under this selection.
    pub fn chosen(&self, op: &dyn TensorOp, e: &Entry) -> bool {
        let default = op.default_select(e) || (self.any_rank && e.kernel_dtype().is_some());
        default
            && (self.include.is_empty() || self.include.iter().any(|r| r.is_match(&e.name)))
            && !self.exclude.iter().any(|r| r.is_match(&e.name))
    }

    /// An `--include` pattern that selects nothing in `model` is a mistake
    /// (a typo, or a tensor outside the default set): an error naming it.
    pub fn check_includes(&self, op: &dyn TensorOp, model: &Model) -> Result<()> {
        for r in &self.include {
            if !model
                .entries()
                .any(|(_, e)| r.is_match(&e.name) && self.chosen(op, e))
            {
                return Err(Error::input(format!(
                    "{}: --include '{r}' matches no tensor this job touches (by default \
                     float tensors of rank ≥ 2; --any-rank adds norms and biases)",
                    model.path.display()
                )));
            }
        }
        Ok(())
    }
}
