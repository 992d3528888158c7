//! Where work runs: a wgpu adapter or the CPU backend.
//!
//! `Device::choose` takes the user's words: `auto` (a real GPU, else the CPU
//! backend: a software rasterizer such as lavapipe is slower than native
//! code), `gpu` (any adapter, software ones included), `cpu`, or a substring
//! of an adapter's name.

mod buffers;
mod gpu;
mod kernels;

pub(crate) use buffers::{Chunk, Input, StreamLayout};
pub use gpu::{list_adapters, AdapterSummary, GpuContext};
pub(crate) use kernels::{KernelDef, WG};

use crate::error::{Error, Result};
use std::sync::Arc;

/// Largest chunk a kernel binds at once when the device allows more. Two
/// chunks are in flight, each with host-side staging and readback copies
/// (and, on a software adapter, its device buffers in host memory too):
/// 16 MiB keeps that near 64–128 MB, so a whole-model job stays within
/// twice its largest tensor plus 300 MB, while a submit (about 0.1 ms) is
/// still small against moving 16 MiB each way. MODELPRESS_CHUNK_BYTES or
/// `with_chunk_bytes` raise it where memory is plentiful.
pub const DEFAULT_MAX_CHUNK_BYTES: u64 = 16 << 20;

/// Smallest chunk accepted: 64 elements of 4 bytes.
pub const MIN_CHUNK_BYTES: u64 = 256;

/// A GPU handle: the shared context plus the chunk size this handle uses.
/// Cloning is cheap; `with_chunk_bytes` gives a handle that splits tensors
/// into smaller bindings (tests force many chunks on small data with it).
#[derive(Clone)]
pub struct Gpu {
    pub(crate) ctx: Arc<GpuContext>,
    chunk_bytes: u64,
}

impl Gpu {
    /// The device, queue and pipeline cache kernels dispatch on.
    pub fn context(&self) -> &GpuContext {
        &self.ctx
    }

    /// Bytes of one input binding: what `with_chunk_bytes` set, never above
    /// the device's binding and buffer limits, a multiple of 256.
    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }
}

/// Where operations run: the CPU backend (the specification) or a wgpu
/// adapter. Cheap to clone: clones share one device.
#[derive(Clone)]
pub enum Device {
    /// Native code on every core (rayon).
    Cpu,
    /// A wgpu device.
    Gpu(Gpu),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Device {
    /// Chooses a device from `auto`, `gpu`, `cpu` or an adapter-name substring.
    /// `MODELPRESS_CHUNK_BYTES`, when set, caps the chunk size of GPU devices.
    pub fn choose(spec: &str) -> Result<Device> {
        let spec = spec.trim();
        let ctx = match spec.to_ascii_lowercase().as_str() {
            "cpu" => return Ok(Device::Cpu),
            "auto" => match gpu::open(gpu::Want::RealGpu) {
                Ok(ctx) => ctx,
                Err(Error::NoAdapter(why)) => {
                    log::info!("auto: using the CPU backend ({why})");
                    return Ok(Device::Cpu);
                }
                Err(e) => return Err(e),
            },
            "gpu" => gpu::open(gpu::Want::Any)?,
            _ => gpu::open(gpu::Want::Named(spec.to_string()))?,
        };
        let dev = Device::Gpu(Gpu {
            chunk_bytes: ctx.default_chunk_bytes(),
            ctx: Arc::new(ctx),
        });
        Ok(match std::env::var("MODELPRESS_CHUNK_BYTES") {
            Ok(v) => {
                let bytes: u64 = v.trim().parse().map_err(|_| {
                    Error::input(format!("MODELPRESS_CHUNK_BYTES={v}: not a byte count"))
                })?;
                dev.with_chunk_bytes(bytes)?
            }
            Err(_) => dev,
        })
    }

    /// The same device with tensors split into bindings of at most `bytes`
    /// (rounded down to a multiple of 256, at least 256). No effect on the CPU.
    pub fn with_chunk_bytes(self, bytes: u64) -> Result<Device> {
        match self {
            Device::Cpu => Ok(Device::Cpu),
            Device::Gpu(g) => {
                if bytes < MIN_CHUNK_BYTES {
                    return Err(Error::Limit {
                        what: "chunk bytes",
                        asked: bytes,
                        bound: crate::error::Bound::CrateMin(MIN_CHUNK_BYTES),
                    });
                }
                let cap = g.ctx.max_chunk_bytes();
                let chunk_bytes = bytes.min(cap) / 256 * 256;
                Ok(Device::Gpu(Gpu {
                    ctx: g.ctx,
                    chunk_bytes,
                }))
            }
        }
    }

    /// Whether this is a wgpu device (hardware or software).
    pub fn is_gpu(&self) -> bool {
        matches!(self, Device::Gpu(_))
    }

    /// "cpu" or the adapter's name and backend.
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
            Device::Gpu(g) => g.ctx.describe(),
        }
    }
}
