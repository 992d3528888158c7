//! Combining models: `transfer` (w + λΔ, and `delta`) and `mix` (Σ pᵢwᵢ).

use super::pipeline::{Applied, Src, TensorOp};
use crate::device::Device;
use crate::error::Result;
use crate::formats::model::Model;
use crate::ops::{mix, transfer};

/// `transfer`: w + λ·Δ with Δ the same tensor of a second model, or a
/// scalar offset; `delta` is FINETUNED + (-1)·BASE.
pub struct Transfer {
    /// λ.
    pub lambda: f32,
    /// A scalar Δ; None takes Δ from the second model.
    pub offset: Option<f32>,
}

impl TensorOp for Transfer {
    fn describe(&self) -> String {
        match self.offset {
            Some(x) => format!("w + {}·{x}", self.lambda),
            None => format!("w + {}·Δ", self.lambda),
        }
    }

    fn mixed_dtypes(&self) -> bool {
        true
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let w = srcs[0].tensor()?;
        let delta = match self.offset {
            Some(x) => transfer::Delta::Scalar(x),
            None => transfer::Delta::Tensor(srcs[1].tensor()?),
        };
        let (out, diff) = transfer::transfer_diff(dev, &w, delta, self.lambda)?;
        let mut a = Applied::with_diff(out, diff);
        if self.offset.is_none() {
            // The change is the point; report it, not as an error.
            a.note = Some("max_abs_err/rmse measure the change applied".into());
        }
        Ok(a)
    }
}

/// `mix`: Σ pᵢ·wᵢ over the models.
pub struct Mix {
    /// pᵢ, one per model.
    pub weights: Vec<f32>,
}

impl TensorOp for Mix {
    fn describe(&self) -> String {
        let w: Vec<String> = self.weights.iter().map(|w| w.to_string()).collect();
        format!("mix [{}]", w.join(", "))
    }

    fn apply(&self, dev: &Device, srcs: &[Src], _: &[Model]) -> Result<Applied> {
        let ts = srcs
            .iter()
            .map(|s| s.tensor())
            .collect::<Result<Vec<_>>>()?;
        let (out, diff) = mix::mix_diff(dev, &ts, &self.weights)?;
        let mut a = Applied::with_diff(out, diff);
        a.note = Some("max_abs_err/rmse are against the first model".into());
        Ok(a)
    }
}
