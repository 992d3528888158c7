//! Whole models: the pipeline that streams tensors from readers through an
//! operation on a device to writers (`pipeline`), the report it keeps, and
//! one module per job family. A job is a [`TensorOp`]; commands build one
//! and hand it to [`run`].

pub mod combine;
pub mod compressed;
pub mod gguf;
pub mod lora;
pub mod merge;
pub mod moe;
pub mod neurons;
pub mod op;
pub mod pipeline;
pub mod prune;
pub mod quantize;
pub mod report;

pub use combine::{Mix, Transfer};
pub use compressed::{Checkpoint, CompressedTensors, CtDequantize, Scheme, SchemeOptions};
pub use neurons::RemoveNeurons;
pub use op::{Applied, Selection, Src, TensorOp};
pub use pipeline::{run, JobOptions, Progress};
pub use prune::{Lines, PatternPrune, Prune, ScoresFile, Sparsity};
pub use quantize::{Dequantize, QuantScheme, Quantize};
pub use report::{Report, TensorReport};
