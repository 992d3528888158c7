//! File formats. A format reads and writes bytes; it knows nothing of
//! devices or operations.

pub mod atomic;
pub mod gguf;
pub mod model;
pub mod safetensors;
