//! Compiled kernels, built once per device and dtype combination and
//! cached. Which kernels exist is the ops layer's business (`ops::kernels`,
//! one line each); this layer compiles whatever `KernelDef` it is handed.

use super::GpuContext;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Invocations per workgroup of every elementwise kernel: the shaders'
/// `@workgroup_size(WG)`, declared to them from here.
pub(crate) const WG: u32 = 256;

/// Prepended to every kernel file: `WG`, then dtype load/store and
/// special-value rules.
fn common() -> String {
    format!(
        "const WG: u32 = {WG}u;\n{}",
        include_str!("../../shaders/common.wgsl")
    )
}

/// A compute entry point and the WGSL file it lives in.
pub(crate) trait KernelDef: Copy {
    /// The entry point's name.
    fn entry(self) -> &'static str;
    /// The file's name ("prune" for shaders/prune.wgsl): one module each.
    fn file(self) -> &'static str;
    /// The file's WGSL, with anything generated it needs in front.
    fn source(self) -> String;
}

/// An entry point and its two dtype codes (`DTYPE`, `DTYPE2` override
/// constants).
type PipelineKey = (&'static str, u32, u32);

/// Pipelines by key, plus one shader module per file.
#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<&'static str, Arc<wgpu::ShaderModule>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

impl GpuContext {
    /// The pipeline for `kernel` reading dtype code `a` (and `b` for a second
    /// operand or the output), compiled on first use.
    pub(crate) fn pipeline(
        &self,
        kernel: impl KernelDef,
        a: u32,
        b: u32,
    ) -> Result<Arc<wgpu::ComputePipeline>> {
        let key = (kernel.entry(), a, b);
        if let Some(p) = lock(&self.pipelines.pipelines).get(&key) {
            return Ok(p.clone());
        }
        let module = self.module(kernel)?;
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
        lock(&self.pipelines.pipelines).insert(key, pipeline.clone());
        Ok(pipeline)
    }

    fn module(&self, kernel: impl KernelDef) -> Result<Arc<wgpu::ShaderModule>> {
        let file = kernel.file();
        if let Some(m) = lock(&self.pipelines.modules).get(file) {
            return Ok(m.clone());
        }
        let src = format!("{}\n{}", common(), kernel.source());
        let module = self
            .scoped(|| {
                Ok(self
                    .device
                    .create_shader_module(wgpu::ShaderModuleDescriptor {
                        label: Some(file),
                        source: wgpu::ShaderSource::Wgsl(src.into()),
                    }))
            })
            .map_err(|e| Error::Gpu(format!("compiling shaders/{file}.wgsl: {e}")))?;
        let module = Arc::new(module);
        lock(&self.pipelines.modules).insert(file, module.clone());
        Ok(module)
    }
}

/// A cache's lock; a panic elsewhere cannot leave the maps inconsistent
/// (each insert is one call), so a poisoned lock is used as it is.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
