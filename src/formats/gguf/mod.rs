//! GGUF v3 (llama.cpp's model format): a strict reader over a memory map
//! and a streaming writer.
//!
//! Layout: magic "GGUF", version u32 (2 or 3), tensor count u64, metadata
//! count u64, metadata key/value pairs, tensor infos (name, n_dims ≤ 4,
//! dims u64 with the innermost first — the reverse of a row-major shape —,
//! ggml type u32, offset u64 into the data section), zero padding to
//! `general.alignment` (u32, a power of two, default 32), then the tensors,
//! each padded to the alignment. The reader enforces what llama.cpp's does:
//! each offset equals the running sum of the padded sizes before it, the
//! innermost dimension is a multiple of the block size, names are unique
//! and shorter than 64 bytes. Every count, length and offset is checked
//! against the file before use, so no input makes it panic or allocate
//! without bound.

mod read;
#[cfg(test)]
mod tests;
mod write;

use read::parse;
pub use write::{GgufOut, GgufWriter};

use crate::error::{Error, Result};
use memmap2::Mmap;
use std::path::{Path, PathBuf};

/// The first four bytes of every GGUF file.
pub const MAGIC: &[u8; 4] = b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// llama.cpp's GGML_MAX_NAME: names are shorter than this.
pub const MAX_NAME: usize = 64;
const MAX_DIMS: u32 = 4;
const MAX_ARRAY_DEPTH: usize = 8;

pub use super::ggml_types::GgmlType;

/// Key/value metadata in file order.
pub type Metadata = Vec<(String, Value)>;

/// A metadata value. Arrays keep their element type (even when empty).
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// GGUF type 0.
    U8(u8),
    /// GGUF type 1.
    I8(i8),
    /// GGUF type 2.
    U16(u16),
    /// GGUF type 3.
    I16(i16),
    /// GGUF type 4.
    U32(u32),
    /// GGUF type 5.
    I32(i32),
    /// GGUF type 6.
    F32(f32),
    /// GGUF type 7.
    Bool(bool),
    /// GGUF type 8: UTF-8 text.
    String(String),
    /// GGUF type 9: the element type id and the elements.
    Array(u32, Vec<Value>),
    /// GGUF type 10.
    U64(u64),
    /// GGUF type 11.
    I64(i64),
    /// GGUF type 12.
    F64(f64),
}

impl Value {
    /// The GGUF value type id.
    pub fn type_id(&self) -> u32 {
        match self {
            Value::U8(_) => 0,
            Value::I8(_) => 1,
            Value::U16(_) => 2,
            Value::I16(_) => 3,
            Value::U32(_) => 4,
            Value::I32(_) => 5,
            Value::F32(_) => 6,
            Value::Bool(_) => 7,
            Value::String(_) => 8,
            Value::Array(..) => 9,
            Value::U64(_) => 10,
            Value::I64(_) => 11,
            Value::F64(_) => 12,
        }
    }

    /// A short rendering for `inspect`.
    pub fn show(&self) -> String {
        match self {
            Value::String(s) if s.len() > 60 => format!(
                "{:?}…",
                &s[..s.char_indices().nth(60).map_or(s.len(), |c| c.0)]
            ),
            Value::String(s) => format!("{s:?}"),
            Value::Array(t, v) => format!("[{} × type {t}]", v.len()),
            Value::U8(x) => x.to_string(),
            Value::I8(x) => x.to_string(),
            Value::U16(x) => x.to_string(),
            Value::I16(x) => x.to_string(),
            Value::U32(x) => x.to_string(),
            Value::I32(x) => x.to_string(),
            Value::F32(x) => x.to_string(),
            Value::Bool(x) => x.to_string(),
            Value::U64(x) => x.to_string(),
            Value::I64(x) => x.to_string(),
            Value::F64(x) => x.to_string(),
        }
    }
}

/// One tensor of a GGUF file.
#[derive(Clone, Debug, PartialEq)]
pub struct GgufTensor {
    /// The tensor's name.
    pub name: String,
    /// ggml order: `dims[0]` is the innermost (contiguous) dimension.
    pub dims: Vec<u64>,
    /// Its ggml type.
    pub ty: GgmlType,
    /// Offset in the data section.
    pub offset: u64,
    /// Bytes of its data.
    pub bytes: u64,
}

impl GgufTensor {
    /// The row-major shape (dims reversed).
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// How many values.
    pub fn numel(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open, validated GGUF file.
pub struct GgufFile {
    /// The file, as opened.
    pub path: PathBuf,
    map: Mmap,
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Key/value metadata in file order.
    pub metadata: Vec<(String, Value)>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensor>,
    /// Data alignment in bytes.
    pub alignment: u64,
    data_start: u64,
}

pub(super) fn align(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| v / a * a)
}

impl GgufFile {
    /// Maps and validates `path` as llama.cpp's reader would; errors name the
    /// file and, where it applies, the tensor or key.
    pub fn open(path: &Path) -> Result<GgufFile> {
        let io = |e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let file = super::open_input(path)?;
        // SAFETY: read-only private map (see SafetensorsFile::open).
        let map = unsafe { Mmap::map(&file) }.map_err(io)?;
        let h = parse(path, &map)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: h.version,
            metadata: h.metadata,
            tensors: h.tensors,
            alignment: h.alignment,
            data_start: h.data_start,
        })
    }
}

impl GgufFile {
    /// The bytes of tensor `t`.
    pub fn data(&self, t: &GgufTensor) -> &[u8] {
        let s = (self.data_start + t.offset) as usize;
        &self.map[s..s + t.bytes as usize]
    }

    /// Makes `t`'s pages resident now (see `populate_pages`).
    pub fn populate(&self, t: &GgufTensor) {
        super::populate_pages(
            &self.map,
            (self.data_start + t.offset) as usize,
            t.bytes as usize,
        );
    }

    /// Drops `t`'s pages from this process (see `release_pages`).
    pub fn release(&self, t: &GgufTensor) {
        super::release_pages(
            &self.map,
            (self.data_start + t.offset) as usize,
            t.bytes as usize,
        );
    }

    /// The metadata value of `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Whether `path` starts with the GGUF magic.
    pub fn sniff(path: &Path) -> bool {
        let mut buf = [0u8; 4];
        super::open_input(path)
            .is_ok_and(|mut f| std::io::Read::read_exact(&mut f, &mut buf).is_ok())
            && &buf == MAGIC
    }
}

/// Parses GGUF bytes in memory (tests, fuzzing): the same checks as `open`.
pub fn parse_bytes(bytes: &[u8]) -> Result<(Metadata, Vec<GgufTensor>)> {
    let h = parse(Path::new("<memory>"), bytes)?;
    Ok((h.metadata, h.tensors))
}
