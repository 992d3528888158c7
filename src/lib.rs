//! modelpress: prune, quantize, patch and merge neural-network weights on
//! any GPU through wgpu (Vulkan, Metal, DX12, GL), with a CPU backend that
//! computes the same results and is their specification.
//!
//! Four families of operations, each a WGSL kernel and a CPU reference:
//! [`prune`] (thresholding), [`quantize`] (rounding), [`transfer`]
//! (offsets) and [`mix`] (weighted sums). Every operation takes a
//! [`Device`], a borrowed tensor and its parameters, and returns an owned
//! result; tensors of any size are split into chunks the device can bind.
//!
//! ```
//! use modelpress::{Device, DType, Tensor, prune};
//!
//! // `auto` picks a hardware GPU when there is one, else the CPU backend.
//! let dev = Device::choose("auto")?;
//! // Values bf16 holds exactly, so the comparison below is exact.
//! let w = Tensor::from_f32(DType::BF16, &[2, 3], &[0.5, -0.0078125, 0.25, -0.75, 0.03125, 0.0])?;
//! let (pruned, stats) = prune::threshold(&dev, &w.view(), 0.1)?;
//! assert_eq!(pruned.to_f32_vec(), [0.5, 0.0, 0.25, -0.75, 0.0, 0.0]);
//! assert_eq!(stats.zeros, 3);
//! # Ok::<(), modelpress::Error>(())
//! ```

#![deny(missing_docs)]

pub mod device;
pub mod error;
pub mod formats;
pub mod jobs;
pub mod ops;
pub mod tensor;
pub mod tools;

// The README's example compiles and runs as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

pub use device::{list_adapters, AdapterSummary, Device, Gpu};
pub use error::{Error, Result};
pub use ops::{mix, prune, quantize, reduce, select, transfer};
pub use tensor::{DType, QTensor, Tensor, TensorRef};
