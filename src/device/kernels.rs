//! The WGSL kernels and their compiled pipelines, built once per device and
//! dtype combination and cached.

use super::GpuContext;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Prepended to every kernel file: dtype load/store and special-value rules.
const COMMON: &str = include_str!("../../shaders/common.wgsl");

/// Every entry point of every shader file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Kernel {
    Threshold,
    ZeroRows,
    RowStats,
    TensorStats,
    QuantizeI8,
    DequantizeI8,
    Convert,
    OffsetScalar,
    OffsetTensor,
    Mix,
    MixRows,
    KeyHist,
    CutApply,
    NmPrune,
    ColStats,
    RowCut,
    RowCutApply,
    DivCheck,
    GgmlQuantize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Family {
    SelfCheck,
    Prune,
    Select,
    Reduce,
    Quantize,
    Transfer,
    Mix,
    Ggml,
}

impl Family {
    fn source(self) -> &'static str {
        match self {
            Family::SelfCheck => include_str!("../../shaders/selfcheck.wgsl"),
            Family::Prune => include_str!("../../shaders/prune.wgsl"),
            Family::Select => include_str!("../../shaders/select.wgsl"),
            Family::Reduce => include_str!("../../shaders/reduce.wgsl"),
            Family::Quantize => include_str!("../../shaders/quantize.wgsl"),
            Family::Transfer => include_str!("../../shaders/transfer.wgsl"),
            Family::Mix => include_str!("../../shaders/mix.wgsl"),
            Family::Ggml => include_str!("../../shaders/ggml.wgsl"),
        }
    }
}

impl Kernel {
    fn family(self) -> Family {
        match self {
            Kernel::Threshold | Kernel::ZeroRows => Family::Prune,
            Kernel::RowStats | Kernel::TensorStats | Kernel::ColStats => Family::Reduce,
            Kernel::QuantizeI8 | Kernel::DequantizeI8 | Kernel::Convert => Family::Quantize,
            Kernel::OffsetScalar | Kernel::OffsetTensor => Family::Transfer,
            Kernel::Mix | Kernel::MixRows => Family::Mix,
            Kernel::KeyHist
            | Kernel::CutApply
            | Kernel::NmPrune
            | Kernel::RowCut
            | Kernel::RowCutApply => Family::Select,
            Kernel::DivCheck => Family::SelfCheck,
            Kernel::GgmlQuantize => Family::Ggml,
        }
    }

    pub(crate) fn entry(self) -> &'static str {
        match self {
            Kernel::Threshold => "threshold",
            Kernel::ZeroRows => "zero_rows",
            Kernel::RowStats => "row_stats",
            Kernel::TensorStats => "tensor_stats",
            Kernel::QuantizeI8 => "quantize_i8",
            Kernel::DequantizeI8 => "dequantize_i8",
            Kernel::Convert => "convert",
            Kernel::OffsetScalar => "offset_scalar",
            Kernel::OffsetTensor => "offset_tensor",
            Kernel::Mix => "mix",
            Kernel::MixRows => "mix_rows",
            Kernel::KeyHist => "key_hist",
            Kernel::CutApply => "cut_apply",
            Kernel::NmPrune => "nm_prune",
            Kernel::ColStats => "col_stats",
            Kernel::RowCut => "row_cut",
            Kernel::RowCutApply => "row_cut_apply",
            Kernel::DivCheck => "div_check",
            Kernel::GgmlQuantize => "ggml_quantize",
        }
    }
}

/// Pipelines keyed by kernel and the two dtype codes (`DTYPE`, `DTYPE2`
/// override constants), plus one shader module per family.
#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<Family, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<(Kernel, u32, u32), Arc<wgpu::ComputePipeline>>>,
}

impl GpuContext {
    /// The pipeline for `kernel` reading dtype code `a` (and `b` for a second
    /// operand or the output), compiled on first use.
    pub(crate) fn pipeline(
        &self,
        kernel: Kernel,
        a: u32,
        b: u32,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = (kernel, a, b);
        if let Some(p) = self.pipelines.pipelines.lock().unwrap().get(&key) {
            return Ok(p.clone());
        }
        let module = self.module(kernel.family())?;
        let constants = [("DTYPE", a as f64), ("DTYPE2", b as f64)];
        let pipeline = self
            .scoped(|| {
                Ok(self
                    .device
                    .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                        label: Some(kernel.entry()),
                        layout: None,
                        module: &module,
                        entry_point: Some(kernel.entry()),
                        compilation_options: wgpu::PipelineCompilationOptions {
                            constants: &constants,
                            zero_initialize_workgroup_memory: true,
                        },
                        cache: None,
                    }))
            })
            .map_err(|e| Error::Gpu(format!("compiling kernel {}: {e}", kernel.entry())))?;
        let pipeline = Arc::new(pipeline);
        self.pipelines
            .pipelines
            .lock()
            .unwrap()
            .insert(key, pipeline.clone());
        Ok(pipeline)
    }

    fn module(&self, family: Family) -> Result<Arc<wgpu::ShaderModule>> {
        if let Some(m) = self.pipelines.modules.lock().unwrap().get(&family) {
            return Ok(m.clone());
        }
        let src = format!("{COMMON}\n{}", family.source());
        let module = self
            .scoped(|| {
                Ok(self
                    .device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(&format!("{family:?}")),
                        source: wgpu::ShaderSource::Wgsl(src.into()),
                    }))
            })
            .map_err(|e| Error::Gpu(format!("compiling shaders/{family:?}.wgsl: {e}")))?;
        let module = Arc::new(module);
        self.pipelines
            .modules
            .lock()
            .unwrap()
            .insert(family, module.clone());
        Ok(module)
    }
}
