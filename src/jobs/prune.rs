//! Pruning jobs: thresholds and neurons (`Prune`), exact target sparsity
//! per tensor, global or activation-aware (`Sparsity`, `ScoresFile`),
//! structured rows and columns (`Lines`) and N:M patterns (`PatternPrune`).

use super::pipeline::{Applied, Selection, Src, TensorOp};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::model::Model;
use crate::formats::safetensors::Entry;
use crate::ops::prune;
use crate::ops::select::{self, Cut};
use crate::tensor::matrix_view;
use std::sync::Mutex;

/// `prune`: |w| < τ, or whole rows whose norm is below τ.
pub enum Prune {
    /// |w| < τ becomes +0.
    Threshold(f32),
    /// Rows whose norm is below τ become zero.
    Rows(f32, prune::NeuronNorm),
}

impl TensorOp for Prune {
    fn describe(&self) -> String {
        match self {
            Prune::Threshold(t) => format!("prune |w| < {t}"),
            Prune::Rows(t, n) => format!("prune rows with {n:?} norm < {t}"),
        }
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let t = srcs[0].tensor()?;
        Ok(match self {
            Prune::Threshold(tau) => {
                let (out, st) = prune::threshold(dev, &t, *tau)?;
                Applied::with_diff(out, st.diff)
            }
            Prune::Rows(tau, norm) => {
                let (out, st) = prune::prune_neurons(dev, &t, *tau, *norm)?;
                let mut a = Applied::with_diff(out, st.diff);
                a.note = Some(format!(
                    "{} of {} rows zeroed",
                    st.neurons_zeroed(),
                    st.zeroed.len()
                ));
                a
            }
        })
    }
}

/// Activation norms for activation-aware pruning (Wanda): a safetensors
/// file holding, for each weight tensor NAME to prune, a 1-D tensor NAME
/// (F32, F16 or BF16) of ‖X_j‖₂ — the L2 norm of input feature j over the
/// calibration tokens — one per column of the weight's `(shape[0], rest)` view.
pub struct ScoresFile {
    file: crate::formats::safetensors::SafetensorsFile,
}

impl ScoresFile {
    /// Opens and validates the scores file's header.
    pub fn open(path: &std::path::Path) -> Result<ScoresFile> {
        Ok(ScoresFile {
            file: crate::formats::safetensors::SafetensorsFile::open(path)?,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &std::path::Path {
        &self.file.path
    }

    /// The norms for weight tensor `e`, checked; errors name this file.
    pub fn for_tensor(&self, e: &Entry) -> Result<Vec<f32>> {
        let bad = |why: String| Error::Format {
            file: self.file.path.display().to_string(),
            tensor: Some(e.name.clone()),
            why,
        };
        let se = self
            .file
            .find(&e.name)
            .ok_or_else(|| bad("missing from the scores file".into()))?;
        let t = self.file.tensor(se).ok_or_else(|| {
            bad(format!(
                "scores are {}, expected F32, F16 or BF16",
                se.dtype
            ))
        })?;
        let cols = matrix_view(&e.shape).1;
        if se.shape.len() != 1 || se.shape[0] != cols {
            return Err(bad(format!(
                "scores of shape {:?}; the weight {:?} needs [{cols}]",
                se.shape, e.shape
            )));
        }
        let x = t.to_f32_vec();
        select::check_scores(&x, cols).map_err(|err| bad(err.to_string()))
    }
}

/// `prune --sparsity`: exactly round_ties_even(S·n) weights zeroed,
/// smallest |w| first, ties to the lower index — per tensor, or with one
/// cut across every touched tensor (`global`), or with activation norms
/// (`scores`, Wanda) per output row, smallest |w|·‖X_j‖ first.
pub struct Sparsity {
    /// Target sparsity in [0, 1].
    pub s: f64,
    /// S of the weights still non-zero, on top of the zeros.
    pub of_remaining: bool,
    global: Option<GlobalCut>,
    scores: Option<ScoresFile>,
}

/// The cut of a global prune and the ties it may still take, spent in the
/// order the pipeline writes tensors (model order).
struct GlobalCut {
    cut: Cut,
    ties_left: Mutex<u64>,
    /// Passes over the model the cut took.
    passes: usize,
}

impl Sparsity {
    /// Exactly round(S·n) zeros in each tensor.
    pub fn per_tensor(s: f64, of_remaining: bool) -> Result<Sparsity> {
        select::check_sparsity(s)?;
        Ok(Sparsity {
            s,
            of_remaining,
            global: None,
            scores: None,
        })
    }

    /// Per output row, by |w|·‖X_j‖₂ (Wanda).
    pub fn with_scores(s: f64, scores: ScoresFile) -> Result<Sparsity> {
        select::check_sparsity(s)?;
        Ok(Sparsity {
            s,
            of_remaining: false,
            global: None,
            scores: Some(scores),
        })
    }

    /// Streams the tensors `selection` touches in `model` (one or two
    /// histogram passes; a zero-count pass first with `of_remaining`) and
    /// fixes one cut for all of them.
    pub fn global(
        dev: &Device,
        model: &Model,
        selection: &Selection,
        s: f64,
        of_remaining: bool,
    ) -> Result<Sparsity> {
        select::check_sparsity(s)?;
        let probe = Sparsity::per_tensor(s, of_remaining)?;
        let chosen: Vec<_> = model
            .entries()
            .filter(|(_, e)| selection.chosen(&probe, e))
            .collect();
        let tensors = || {
            chosen.iter().map(|(f, e)| {
                let t = f.tensor(e).ok_or_else(|| {
                    Error::Unsupported(format!(
                        "dtype {} (the kernels take F32, F16 and BF16)",
                        e.dtype
                    ))
                    .at(&f.path, &e.name)
                });
                (*f, *e, t)
            })
        };
        let n: u64 = chosen.iter().map(|(_, e)| e.numel() as u64).sum();
        let mut passes = 0;
        let k = if of_remaining {
            passes += 1;
            let mut zeros = 0;
            for (f, e, t) in tensors() {
                zeros += crate::ops::reduce::tensor_stats(dev, &t?)?.zeros;
                f.release(e);
            }
            zeros + select::count_for(s, n - zeros)
        } else {
            select::count_for(s, n)
        };
        let low_needed = chosen
            .iter()
            .any(|(_, e)| e.kernel_dtype().is_some_and(select::needs_low_level));
        // One running histogram: memory does not grow with the number of
        // tensors (a mixture of experts has tens of thousands).
        let cut = select::find_cut(k, low_needed, |level| {
            passes += 1;
            let mut total = vec![0u64; 1 << 16];
            for (f, e, t) in tensors() {
                select::add_key_histogram(dev, &t?, level, &mut total)
                    .map_err(|err| err.at(&f.path, &e.name))?;
                f.release(e);
            }
            Ok(total)
        })?;
        Ok(Sparsity {
            s,
            of_remaining,
            scores: None,
            global: Some(GlobalCut {
                cut,
                ties_left: Mutex::new(cut.ties),
                passes,
            }),
        })
    }

    /// Histogram passes the global cut took (0 per tensor).
    pub fn passes(&self) -> usize {
        self.global.as_ref().map_or(0, |g| g.passes)
    }
}

impl TensorOp for Sparsity {
    fn input_paths(&self) -> Vec<std::path::PathBuf> {
        self.scores.iter().map(|s| s.path().to_path_buf()).collect()
    }

    fn describe(&self) -> String {
        let scope = if self.global.is_some() {
            "global"
        } else {
            "per tensor"
        };
        let of = if self.of_remaining {
            " of remaining"
        } else {
            ""
        };
        format!("prune to sparsity {}{of} ({scope})", self.s)
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let t = srcs[0].tensor()?;
        if let Some(sc) = &self.scores {
            let x = sc.for_tensor(srcs[0].entry)?;
            let (out, diff) = select::prune_rows_to_sparsity(dev, &t, self.s, Some(&x))?;
            let mut a = Applied::with_diff(out, diff);
            a.note = Some(format!("{} of {} zero", diff.zeros, t.numel()));
            return Ok(a);
        }
        let (out, st) = match &self.global {
            None => select::prune_to_sparsity(dev, &t, self.s, self.of_remaining)?,
            Some(g) => {
                let mut left = g.ties_left.lock().unwrap_or_else(|e| e.into_inner());
                let cut = Cut {
                    ties: *left,
                    ..g.cut
                };
                // No tensor holds more keys equal to the cut than all do.
                let r = select::apply_cut(dev, &t, cut, g.cut.equal)?;
                *left -= r.1.ties_pruned;
                r
            }
        };
        let mut a = Applied::with_diff(out, st.diff);
        a.note = Some(format!("{} of {} zero", st.zeros, st.numel));
        Ok(a)
    }
}

/// `prune --rows S` / `--cols S`: exactly round(S·n) rows or columns of
/// smallest norm zeroed.
pub struct Lines {
    /// Rows (output neurons) or columns (input features).
    pub axis: prune::Axis,
    /// Fraction of lines to zero.
    pub s: f64,
    /// How a line's size is measured.
    pub norm: prune::NeuronNorm,
}

impl TensorOp for Lines {
    fn describe(&self) -> String {
        let what = if self.axis == prune::Axis::Rows {
            "rows"
        } else {
            "columns"
        };
        format!("prune {} of {what} by {:?} norm", self.s, self.norm)
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let t = srcs[0].tensor()?;
        let (out, mask, diff) = prune::prune_lines(dev, &t, self.axis, self.s, self.norm)?;
        let mut a = Applied::with_diff(out, diff);
        a.note = Some(format!(
            "{} of {} zeroed",
            mask.iter().filter(|&&m| m).count(),
            mask.len()
        ));
        Ok(a)
    }
}

/// `prune --pattern N:M`, by |w| or, with scores, by |w|·‖X_j‖₂.
pub struct PatternPrune {
    /// N:M.
    pub pattern: select::Pattern,
    /// Leave a row's shorter last run dense instead of refusing it.
    pub keep_tail: bool,
    /// Rank by |w|·‖X_j‖₂ (Wanda) instead of |w|.
    pub scores: Option<ScoresFile>,
}

impl TensorOp for PatternPrune {
    fn input_paths(&self) -> Vec<std::path::PathBuf> {
        self.scores.iter().map(|s| s.path().to_path_buf()).collect()
    }

    fn describe(&self) -> String {
        let by = if self.scores.is_some() {
            " by |w|·‖X‖"
        } else {
            ""
        };
        format!("prune to {}:{}{by}", self.pattern.n, self.pattern.m)
    }

    fn prepare(&self, e: &Entry) -> Result<()> {
        match &self.scores {
            Some(sc) => sc.for_tensor(e).map(|_| ()),
            None => Ok(()),
        }
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let t = srcs[0].tensor()?;
        let x = self
            .scores
            .as_ref()
            .map(|sc| sc.for_tensor(srcs[0].entry))
            .transpose()?;
        let (out, diff) =
            select::prune_pattern(dev, &t, self.pattern, self.keep_tail, x.as_deref())?;
        Ok(Applied::with_diff(out, diff))
    }
}
