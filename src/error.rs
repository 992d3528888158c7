//! The one error type of the crate. Every wgpu failure, bad parameter and bad
//! file ends up here, so callers never see a panic from the GPU stack.

use std::path::PathBuf;

/// The crate's `Result`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Every failure modelpress reports: files, parameters, devices.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing `path` failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },

    /// A file that is not what it claims to be.
    #[error("{file}: {}{why}", tensor_part(.tensor))]
    Format {
        /// The file, as the user named it.
        file: String,
        /// The tensor at fault, when the problem is about one.
        tensor: Option<String>,
        /// What is wrong.
        why: String,
    },

    /// An operation failed on one tensor of one file.
    #[error("{file}: {}{source}", tensor_part(.tensor))]
    At {
        /// The file holding the tensor.
        file: String,
        /// The tensor, when the problem is about one.
        tensor: Option<String>,
        /// What failed.
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

    /// A request past a limit: the device's or modelpress's, a maximum or a
    /// minimum.
    #[error("{what}: asked for {asked}, {bound}")]
    Limit {
        /// What was asked for ("row length").
        what: &'static str,
        /// How much.
        asked: u64,
        /// The limit it crossed.
        bound: Bound,
    },
}

/// A limit a request crossed, and whose it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// The adapter allows at most this much.
    DeviceMax(u64),
    /// modelpress itself allows at most this much.
    CrateMax(u64),
    /// modelpress needs at least this much.
    CrateMin(u64),
}

impl std::fmt::Display for Bound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Bound::DeviceMax(n) => write!(f, "the device allows at most {n}"),
            Bound::CrateMax(n) => write!(f, "modelpress allows at most {n}"),
            Bound::CrateMin(n) => write!(f, "modelpress needs at least {n}"),
        }
    }
}

fn tensor_part(tensor: &Option<String>) -> String {
    match tensor {
        Some(t) => format!("tensor '{t}': "),
        None => String::new(),
    }
}

impl Error {
    /// An `Error::Input` with this message.
    pub fn input(msg: impl Into<String>) -> Self {
        Error::Input(msg.into())
    }

    /// An `Error::Format` about `file` (and `tensor`, when the problem is
    /// about one).
    pub fn format(file: &std::path::Path, tensor: Option<&str>, why: impl Into<String>) -> Self {
        Error::Format {
            file: file.display().to_string(),
            tensor: tensor.map(str::to_string),
            why: why.into(),
        }
    }

    /// This error, located at `tensor` of `file` (unless it already names
    /// a file).
    pub fn at(self, file: &std::path::Path, tensor: &str) -> Self {
        self.located(file, Some(tensor))
    }

    /// This error, located in `file` (unless it already names a file).
    pub fn in_file(self, file: &std::path::Path) -> Self {
        self.located(file, None)
    }

    fn located(self, file: &std::path::Path, tensor: Option<&str>) -> Self {
        match self {
            e @ (Error::At { .. } | Error::Format { .. } | Error::Io { .. }) => e,
            e => Error::At {
                file: file.display().to_string(),
                tensor: tensor.map(str::to_string),
                source: Box::new(e),
            },
        }
    }
}
