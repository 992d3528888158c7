//! The one error type of the crate. Every wgpu failure, bad parameter and bad
//! file ends up here, so callers never see a panic from the GPU stack.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file that is not what it claims to be (`tensor` is "-" when the
    /// problem is not about one tensor).
    #[error("{file}: {}{why}", tensor_part(.tensor))]
    Format {
        file: String,
        tensor: String,
        why: String,
    },

    /// An operation failed on one tensor of one file.
    #[error("{file}: tensor '{tensor}': {source}")]
    At {
        file: String,
        tensor: String,
        #[source]
        source: Box<Error>,
    },

    /// A parameter or tensor the operation cannot accept (negative threshold,
    /// shape mismatch, wrong number of weights, ...).
    #[error("invalid input: {0}")]
    Input(String),

    /// A dtype the operation does not handle.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// No adapter matched the request.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),

    /// A validation, out-of-memory or internal error reported by wgpu.
    #[error("GPU error: {0}")]
    Gpu(String),

    /// The device is gone; every later call on it fails. Fall back to the CPU.
    #[error("GPU device lost: {0}")]
    DeviceLost(String),

    /// Standard output failed (a closed pipe, a full device).
    #[error("writing to standard output: {0}")]
    Stdout(#[source] std::io::Error),

    /// A request above what the device allows.
    #[error("{what}: asked for {asked}, the device allows at most {max}")]
    Limit {
        what: &'static str,
        asked: u64,
        max: u64,
    },
}

fn tensor_part(tensor: &str) -> String {
    if tensor == "-" {
        String::new()
    } else {
        format!("tensor '{tensor}': ")
    }
}

impl Error {
    /// An `Error::Input` with this message.
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }

    /// This error, located at `tensor` of `file` (unless it already names
    /// a file).
    pub fn at(self, file: &std::path::Path, tensor: &str) -> Self {
        match self {
            e @ (Error::At { .. } | Error::Format { .. } | Error::Io { .. }) => e,
            e => Error::At {
                file: file.display().to_string(),
                tensor: tensor.to_string(),
                source: Box::new(e),
            },
        }
    }
}
