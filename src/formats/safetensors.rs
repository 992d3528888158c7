//! safetensors files: read through the `safetensors` crate (which validates
//! the header: lengths, offsets that must tile the data exactly, dtypes,
//! overflow) over a memory map, and written by a streaming writer that keeps
//! the input's tensor order (the crate's own writer sorts by dtype and name)
//! and renames its temporary file into place only when complete.

use super::output::{AtomicFile, Staged};
use crate::error::{Error, Result};
use crate::tensor::{DType, TensorRef};
use memmap2::{Advice, Mmap};
use safetensors::tensor::{Dtype, SafeTensorError};
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The file-level metadata (`__metadata__`), in the file's key order.
pub type Metadata = Map<String, Value>;

/// One tensor of a file: name, safetensors dtype name, shape, and its bytes'
/// range within the data section.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The tensor's name.
    pub name: String,
    /// The safetensors dtype name ("BF16", "F8_E4M3", ...).
    pub dtype: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Byte range within the data section.
    pub range: std::ops::Range<usize>,
    /// Which of its file's maps holds the data (0 but in a `layout`).
    map: usize,
}

impl Entry {
    /// Our dtype, when the kernels compute on it.
    pub fn kernel_dtype(&self) -> Option<DType> {
        DType::parse(&self.dtype).filter(|d| d.is_kernel_float())
    }

    /// How many elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Bytes of its data.
    pub fn bytes(&self) -> usize {
        self.range.len()
    }
}

/// An open, validated safetensors file.
pub struct SafetensorsFile {
    /// The file, as opened.
    pub path: PathBuf,
    /// The mapped data: one file's, or several for a `layout`.
    maps: Vec<Arc<Mapped>>,
    /// In file (data offset) order.
    pub entries: Vec<Entry>,
    /// `__metadata__`, in the file's key order.
    pub metadata: Option<Metadata>,
    /// Name -> index into `entries`, so lookups stay O(1) in files of
    /// 100,000 tensors.
    by_name: std::collections::HashMap<String, usize>,
}

/// A mapped safetensors file and where its data section starts.
struct Mapped {
    map: Mmap,
    data_start: usize,
}

impl Mapped {
    fn range(&self, e: &Entry) -> std::ops::Range<usize> {
        self.data_start + e.range.start..self.data_start + e.range.end
    }
}

/// The tensor a header error is about (if one) and what is wrong, in words.
fn describe(e: &SafeTensorError) -> (Option<String>, String) {
    use SafeTensorError::*;
    match e {
        InvalidOffset(t) => (
            Some(t.clone()),
            "data offsets overlap, leave a gap or run backwards".into(),
        ),
        TensorNotFound(t) => (Some(t.clone()), "not found".into()),
        HeaderTooLarge => (None, "header length is absurd (over 100 MB)".into()),
        HeaderTooSmall => (
            None,
            "file too short for a safetensors header (not safetensors?)".into(),
        ),
        InvalidHeaderLength => (
            None,
            "header length points past the end of the file (truncated or not safetensors)".into(),
        ),
        MetadataIncompleteBuffer => (
            None,
            "tensor data does not end where the file ends (truncated, or offsets past the end)"
                .into(),
        ),
        InvalidHeader(_) => (None, "header is not UTF-8 (not safetensors?)".into()),
        InvalidHeaderDeserialization(j) | JsonError(j) => (
            None,
            format!("header is not a valid safetensors header: {j}"),
        ),
        TensorInvalidInfo => (
            None,
            "a tensor's byte range does not match its shape and dtype".into(),
        ),
        ValidationOverflow => (None, "a tensor's shape overflows".into()),
        other => (None, other.to_string()),
    }
}

impl SafetensorsFile {
    /// Maps and validates `path` (through the `safetensors` crate); errors
    /// name the file and, where it applies, the tensor.
    pub fn open(path: &Path) -> Result<SafetensorsFile> {
        let file = super::open_input(path)?;
        // SAFETY: the map is read-only and private to this process; a file
        // truncated under us by another process could fault, which no
        // reader of memory-mapped models can rule out.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
            let (tensor, why) = describe(&e);
            Error::format(path, tensor.as_deref(), why)
        })?;
        let data_start = 8 + header_len;
        let entries: Vec<Entry> = meta
            .offset_keys()
            .into_iter()
            .map(|name| {
                let info = meta
                    .info(&name)
                    .ok_or_else(|| Error::format(path, Some(&name), "listed but not described"))?;
                Ok(Entry {
                    dtype: dtype_name(info.dtype),
                    shape: info.shape.clone(),
                    range: info.data_offsets.0..info.data_offsets.1,
                    map: 0,
                    name,
                })
            })
            .collect::<Result<_>>()?;
        // The crate hands metadata back as a HashMap; re-read the header to
        // keep the file's key order, skipping the tensors (a header of
        // 100,000 tensors parsed whole would take tens of MB).
        #[derive(serde::Deserialize)]
        struct Header {
            #[serde(rename = "__metadata__")]
            metadata: Option<Value>,
        }
        let header: Header = serde_json::from_slice(&map[8..data_start])
            .map_err(|e| Error::format(path, None, e.to_string()))?;
        let metadata = match header.metadata {
            Some(Value::Object(m)) => Some(m),
            _ => None,
        };
        let _ = map.advise(Advice::Sequential);
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e): (usize, &Entry)| (e.name.clone(), i))
            .collect();
        Ok(SafetensorsFile {
            path: path.to_path_buf(),
            maps: vec![Arc::new(Mapped { map, data_start })],
            entries,
            metadata,
            by_name,
        })
    }

    /// A file that exists only in memory: tensors of other open files
    /// under new names (`parts`: (name, file, entry)), in that order, with
    /// no metadata; `path` names it in messages. Its data stays mapped
    /// while it lives. Used for outputs laid out from several models (a
    /// merge's slices).
    pub fn layout(
        path: PathBuf,
        parts: Vec<(String, &SafetensorsFile, &Entry)>,
    ) -> SafetensorsFile {
        let mut maps: Vec<Arc<Mapped>> = Vec::new();
        let mut entries = Vec::with_capacity(parts.len());
        for (name, f, e) in parts {
            let m = &f.maps[e.map];
            let k = match maps.iter().position(|x| Arc::ptr_eq(x, m)) {
                Some(k) => k,
                None => {
                    maps.push(m.clone());
                    maps.len() - 1
                }
            };
            entries.push(Entry {
                name,
                map: k,
                ..e.clone()
            });
        }
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.name.clone(), i))
            .collect();
        SafetensorsFile {
            path,
            maps,
            entries,
            metadata: None,
            by_name,
        }
    }

    /// The bytes of tensor `e` (an entry of this file).
    pub fn data(&self, e: &Entry) -> &[u8] {
        let m = &self.maps[e.map];
        &m.map[m.range(e)]
    }

    /// The tensor as the kernels take it; None for other dtypes.
    pub fn tensor<'a>(&'a self, e: &'a Entry) -> Option<TensorRef<'a>> {
        let dtype = e.kernel_dtype()?;
        Some(TensorRef {
            dtype,
            shape: &e.shape,
            data: self.data(e),
        })
    }

    /// Makes `e`'s pages resident now (MADV_POPULATE_READ, one call for
    /// the whole tensor, where the system has it), so that reading is
    /// measured apart from computing.
    pub fn populate(&self, e: &Entry) {
        let m = &self.maps[e.map];
        super::populate_pages(&m.map, m.range(e).start, e.range.len());
    }

    /// Asks the kernel to read `e`'s pages ahead.
    pub fn prefetch(&self, e: &Entry) {
        let m = &self.maps[e.map];
        let _ = m
            .map
            .advise_range(Advice::WillNeed, m.range(e).start, e.range.len());
    }

    /// Drops `e`'s pages from this process (see `release_pages`).
    pub fn release(&self, e: &Entry) {
        let m = &self.maps[e.map];
        super::release_pages(&m.map, m.range(e).start, e.range.len());
    }

    /// The tensor `name`, found in O(1).
    pub fn find(&self, name: &str) -> Option<&Entry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }
}

fn dtype_name(d: Dtype) -> String {
    // serde names are the on-disk names ("BF16", "F8_E4M3", ...).
    serde_json::to_value(d)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("{d:?}"))
}

/// JSON text of a header part.
fn json<T: serde::Serialize + ?Sized>(v: &T) -> Result<Vec<u8>> {
    serde_json::to_vec(v).map_err(|e| Error::input(e.to_string()))
}

/// A tensor the writer will receive: its header entry.
#[derive(Clone, Debug)]
pub struct OutEntry {
    /// The tensor's name.
    pub name: String,
    /// The safetensors dtype name.
    pub dtype: String,
    /// Row-major shape.
    pub shape: Vec<usize>,
}

impl OutEntry {
    /// Bytes of its data; an error for a dtype the writer does not know or
    /// a shape whose size overflows.
    pub fn bytes(&self) -> Result<usize> {
        let size: usize = match self.dtype.as_str() {
            "F64" | "I64" | "U64" | "C64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" | "F8_E4M3FNUZ"
            | "F8_E5M2FNUZ" => 1,
            other => return Err(Error::Unsupported(format!("writing dtype {other}"))),
        };
        self.shape
            .iter()
            .try_fold(size, |a, &d| a.checked_mul(d))
            .ok_or_else(|| {
                Error::input(format!(
                    "tensor '{}': shape {:?} overflows",
                    self.name, self.shape
                ))
            })
    }
}

/// Writes one safetensors file, tensor by tensor in the declared order, to a
/// temporary file beside `path`; `finish` renames it into place. Dropped
/// unfinished, it removes the temporary file: no partial output appears.
pub struct SafetensorsWriter {
    file: AtomicFile,
    entries: Vec<(OutEntry, usize)>,
    next: usize,
}

impl SafetensorsWriter {
    /// Starts a file at `path` (through a temporary) holding these tensors,
    /// in this order, and `metadata` as `__metadata__`; `write` each
    /// tensor's bytes in order, then `finish`.
    pub fn create(
        path: &Path,
        entries: Vec<OutEntry>,
        metadata: Option<&Metadata>,
    ) -> Result<SafetensorsWriter> {
        // The header is written as text entry by entry: a JSON tree of
        // 100,000 tensors would take tens of MB for a moment.
        let mut text = b"{".to_vec();
        if let Some(m) = metadata {
            text.extend_from_slice(b"\"__metadata__\":");
            text.extend(json(m)?);
        }
        let mut seen = std::collections::HashSet::with_capacity(entries.len());
        let mut sized = Vec::with_capacity(entries.len());
        let mut offset = 0usize;
        for e in entries {
            if !seen.insert(e.name.clone()) || e.name == "__metadata__" {
                return Err(Error::input(format!(
                    "{}: tensor name '{}' twice (or reserved)",
                    path.display(),
                    e.name
                )));
            }
            let len = e.bytes()?;
            let end = offset
                .checked_add(len)
                .ok_or_else(|| Error::input("tensor sizes overflow"))?;
            if text.len() > 1 {
                text.push(b',');
            }
            text.extend(json(&e.name)?);
            text.extend_from_slice(b":{\"dtype\":");
            text.extend(json(&e.dtype)?);
            text.extend_from_slice(b",\"shape\":");
            text.extend(json(&e.shape)?);
            text.extend_from_slice(format!(",\"data_offsets\":[{offset},{end}]}}").as_bytes());
            offset = end;
            sized.push((e, len));
        }
        text.push(b'}');
        // Pad with spaces so that the data starts 8-byte aligned, as the
        // reference writer does.
        while !text.len().is_multiple_of(8) {
            text.push(b' ');
        }
        let mut file = AtomicFile::create(path)?;
        file.write_all(&(text.len() as u64).to_le_bytes())?;
        file.write_all(&text)?;
        Ok(SafetensorsWriter {
            file,
            entries: sized,
            next: 0,
        })
    }

    /// The next tensor's bytes, which must be its declared name and size.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some((e, len)) = self.entries.get(self.next) else {
            return Err(Error::input(format!(
                "{}: tensor '{name}' was not declared",
                self.file.path().display()
            )));
        };
        if e.name != name || *len != data.len() {
            return Err(Error::input(format!(
                "{}: expected tensor '{}' of {} bytes, got '{name}' of {}",
                self.file.path().display(),
                e.name,
                len,
                data.len()
            )));
        }
        self.file.write_all(data)?;
        self.next += 1;
        Ok(())
    }

    /// Checks every tensor was written, flushes and syncs the file, and
    /// moves it into place.
    pub fn finish(self) -> Result<()> {
        self.finish_staged()?.commit(true)
    }

    /// As `finish`, but leaves the file for `output::commit`.
    pub fn finish_staged(self) -> Result<Staged> {
        if self.next != self.entries.len() {
            return Err(Error::input(format!(
                "{}: {} of {} tensors written",
                self.file.path().display(),
                self.next,
                self.entries.len()
            )));
        }
        self.file.finish()
    }
}
