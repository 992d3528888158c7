//! Instance, adapter choice and a device requested with the adapter's own
//! limits. wgpu's default error handler panics; here every error reaches the
//! caller as an `Err` (error scopes around each unit of work, and an
//! uncaptured-error handler and device-lost callback that record instead of
//! aborting).

use super::kernels::PipelineCache;
use super::DEFAULT_MAX_CHUNK_BYTES;
use crate::error::{Error, Result};
use std::sync::{Arc, Mutex};

/// What `modelpress devices` prints of one adapter.
#[derive(Clone, Debug)]
pub struct AdapterSummary {
    /// The adapter's name ("NVIDIA H200", "llvmpipe (LLVM 15.0.6, 256 bits)").
    pub name: String,
    /// Vulkan, Metal, Dx12 or Gl.
    pub backend: String,
    /// Discrete, integrated, virtual GPU, CPU (a software rasterizer) or other.
    pub device_type: String,
    /// The driver's name and version.
    pub driver: String,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer, in bytes.
    pub max_buffer: u64,
    /// Most workgroups a dispatch may have along one dimension.
    pub max_workgroups_per_dim: u32,
    /// Most invocations one workgroup may have.
    pub max_invocations_per_workgroup: u32,
}

fn instance() -> wgpu::Instance {
    wgpu::Instance::new(wgpu::InstanceDescriptor::new_without_display_handle_from_env())
}

fn adapters() -> Vec<wgpu::Adapter> {
    pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()))
}

fn summarize(a: &wgpu::Adapter) -> AdapterSummary {
    let info = a.get_info();
    let l = a.limits();
    AdapterSummary {
        name: info.name.clone(),
        backend: format!("{:?}", info.backend),
        device_type: format!("{:?}", info.device_type),
        driver: format!("{} {}", info.driver, info.driver_info)
            .trim()
            .to_string(),
        max_storage_binding: l.max_storage_buffer_binding_size,
        max_buffer: l.max_buffer_size,
        max_workgroups_per_dim: l.max_compute_workgroups_per_dimension,
        max_invocations_per_workgroup: l.max_compute_invocations_per_workgroup,
    }
}

/// Every adapter wgpu finds, best first.
pub fn list_adapters() -> Vec<AdapterSummary> {
    let mut all = adapters();
    all.sort_by_key(rank);
    all.iter().map(summarize).collect()
}

/// Lower is better: real GPUs before software ones, Vulkan/Metal/DX12 before GL.
fn rank(a: &wgpu::Adapter) -> (u8, u8) {
    let info = a.get_info();
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let backend = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (ty, backend)
}

fn is_real_gpu(a: &wgpu::Adapter) -> bool {
    matches!(
        a.get_info().device_type,
        wgpu::DeviceType::DiscreteGpu
            | wgpu::DeviceType::IntegratedGpu
            | wgpu::DeviceType::VirtualGpu
    )
}

pub(crate) enum Want {
    RealGpu,
    Any,
    Named(String),
}

pub(crate) fn open(want: Want) -> Result<GpuContext> {
    let mut all = adapters();
    all.sort_by_key(rank);
    let names: Vec<String> = all
        .iter()
        .map(|a| {
            let i = a.get_info();
            format!("{} ({:?}, {:?})", i.name, i.backend, i.device_type)
        })
        .collect();
    let found = match &want {
        Want::RealGpu => all.into_iter().find(is_real_gpu),
        Want::Any => all.into_iter().next(),
        Want::Named(n) => {
            let n = n.to_lowercase();
            all.into_iter()
                .find(|a| a.get_info().name.to_lowercase().contains(&n))
        }
    };
    let adapter = found.ok_or_else(|| {
        let what = match &want {
            Want::RealGpu => "no hardware GPU".to_string(),
            Want::Any => "no adapter at all".to_string(),
            Want::Named(n) => format!("no adapter named like '{n}'"),
        };
        if names.is_empty() {
            Error::NoAdapter(format!(
                "{what}; wgpu found none (on Linux without a GPU install the software Vulkan driver: apt-get install mesa-vulkan-drivers)"
            ))
        } else {
            Error::NoAdapter(format!("{what}; adapters: {}", names.join("; ")))
        }
    })?;
    GpuContext::new(adapter)
}

/// Errors reported outside any error scope, and device loss; drained by
/// `GpuContext::check`.
#[derive(Default)]
struct Trouble {
    uncaptured: Vec<String>,
    lost: Option<String>,
}

/// One device and queue, the adapter it came from, and its compiled pipelines.
/// Shared (`Arc`) by every `Gpu` handle made from it.
pub struct GpuContext {
    pub(crate) device: wgpu::Device,
    pub(crate) queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    pub(crate) limits: wgpu::Limits,
    trouble: Arc<Mutex<Trouble>>,
    pub(crate) pipelines: PipelineCache,
}

impl GpuContext {
    fn new(adapter: wgpu::Adapter) -> Result<GpuContext> {
        let info = adapter.get_info();
        // The adapter's own limits, not wgpu's defaults (which cap bindings at
        // 128 MiB and buffers at 256 MiB even on 141 GB GPUs).
        let limits = adapter.limits();
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("modelpress"),
            required_features: wgpu::Features::empty(),
            required_limits: limits.clone(),
            memory_hints: wgpu::MemoryHints::Performance,
            ..Default::default()
        }))
        .map_err(|e| Error::Gpu(format!("{}: request_device: {e}", info.name)))?;

        let trouble = Arc::new(Mutex::new(Trouble::default()));
        let t = trouble.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            log::error!("wgpu: {e}");
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .uncaptured
                .push(e.to_string());
        }));
        let t = trouble.clone();
        device.set_device_lost_callback(move |reason, msg| {
            // Dropping the device at exit reports `Destroyed`: not a failure.
            if reason != wgpu::DeviceLostReason::Destroyed {
                log::error!("wgpu device lost ({reason:?}): {msg}");
                t.lock().unwrap_or_else(|e| e.into_inner()).lost =
                    Some(format!("{reason:?}: {msg}"));
            }
        });
        log::info!(
            "GPU: {} ({:?}, {:?}); binding {} B, buffer {} B",
            info.name,
            info.backend,
            info.device_type,
            limits.max_storage_buffer_binding_size,
            limits.max_buffer_size
        );
        Ok(GpuContext {
            device,
            queue,
            info,
            limits,
            trouble,
            pipelines: PipelineCache::default(),
        })
    }

    /// What wgpu says of the adapter.
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }

    /// The limits the device was requested with (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// "NAME (Backend, Type)".
    pub fn describe(&self) -> String {
        format!(
            "{} ({:?}, {:?})",
            self.info.name, self.info.backend, self.info.device_type
        )
    }

    /// Largest binding a kernel may use: the binding and buffer limits.
    pub(crate) fn max_chunk_bytes(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(self.limits.max_buffer_size)
            / 256
            * 256
    }

    pub(crate) fn default_chunk_bytes(&self) -> u64 {
        self.max_chunk_bytes().min(DEFAULT_MAX_CHUNK_BYTES)
    }

    /// Workgroups to dispatch for `units` invocations of `WG` (kernels loop
    /// with a grid stride, so any count up to the device limit is correct).
    pub(crate) fn workgroups_for(&self, units: u64) -> u32 {
        self.workgroups_of(units, super::WG)
    }

    /// Workgroups to dispatch for `units` invocations of `size` each.
    pub(crate) fn workgroups_of(&self, units: u64, size: u32) -> u32 {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1) as u64;
        units.div_ceil(size as u64).clamp(1, max) as u32
    }

    /// Releases the device's memory now. Every later call on it returns
    /// `Err` (a long-running host can drop to the CPU backend this way).
    pub fn destroy(&self) {
        self.device.destroy();
        self.trouble.lock().unwrap_or_else(|e| e.into_inner()).lost =
            Some("destroyed by the caller".into());
    }

    /// Err if the device was lost or reported an error outside a scope.
    pub(crate) fn check(&self) -> Result<()> {
        let mut t = self.trouble.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(l) = &t.lost {
            return Err(Error::DeviceLost(format!("{}: {l}", self.info.name)));
        }
        if !t.uncaptured.is_empty() {
            let all = std::mem::take(&mut t.uncaptured);
            return Err(Error::Gpu(all.join("; ")));
        }
        Ok(())
    }

    /// Runs `f` inside validation, out-of-memory and internal error scopes
    /// (thread-local, so pushed and popped here on one thread) and turns
    /// whatever they caught into `Err`.
    pub(crate) fn scoped<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        self.check()?;
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let out = f();
        let errs = [
            pollster::block_on(validation.pop()),
            pollster::block_on(oom.pop()),
            pollster::block_on(internal.pop()),
        ];
        if let Some(e) = errs.into_iter().flatten().next() {
            return Err(match e {
                wgpu::Error::OutOfMemory { .. } => {
                    Error::Gpu(format!("{}: out of memory: {e}", self.info.name))
                }
                _ => Error::Gpu(format!("{}: {e}", self.info.name)),
            });
        }
        self.check()?;
        out
    }
}
