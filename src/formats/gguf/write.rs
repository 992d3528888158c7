//! The streaming GGUF writer.

use super::{align, GgmlType, Value, DEFAULT_ALIGNMENT, MAGIC, MAX_NAME};
use crate::error::{Error, Result};
use crate::formats::output::{AtomicFile, Staged};
use std::path::Path;

/// A tensor the writer will receive, in order.
#[derive(Clone, Debug)]
pub struct GgufOut {
    /// The tensor's name.
    pub name: String,
    /// ggml order (innermost first).
    pub dims: Vec<u64>,
    /// Its ggml type.
    pub ty: GgmlType,
}

/// Writes a GGUF v3 file: header, metadata and tensor infos up front (sizes
/// are known from shapes and types), then each tensor's bytes padded to the
/// alignment, into a temporary file renamed into place by `finish`.
pub struct GgufWriter {
    file: AtomicFile,
    tensors: Vec<(GgufOut, u64)>,
    next: usize,
    alignment: u64,
}

pub(super) fn put_string(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

fn put_value(w: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => w.push(*x),
        Value::I8(x) => w.push(*x as u8),
        Value::U16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => w.push(*x as u8),
        Value::String(s) => put_string(w, s),
        Value::Array(t, items) => {
            w.extend_from_slice(&t.to_le_bytes());
            w.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(w, i);
            }
        }
        Value::U64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => w.extend_from_slice(&x.to_le_bytes()),
    }
}

impl GgufWriter {
    /// Starts a GGUF v3 file at `path` (through a temporary) with this
    /// metadata and these tensor infos; `write` each tensor's bytes in order.
    pub fn create(
        path: &Path,
        metadata: &[(String, Value)],
        tensors: Vec<GgufOut>,
    ) -> Result<GgufWriter> {
        let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) if *a != 0 && a.is_power_of_two() => *a as u64,
            Some(_) => return Err(Error::input("general.alignment must be a power-of-two u32")),
            None => DEFAULT_ALIGNMENT,
        };
        let mut head = Vec::new();
        head.extend_from_slice(MAGIC);
        head.extend_from_slice(&3u32.to_le_bytes());
        head.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
        head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
        for (k, v) in metadata {
            put_string(&mut head, k);
            head.extend_from_slice(&v.type_id().to_le_bytes());
            put_value(&mut head, v);
        }
        let mut sized = Vec::with_capacity(tensors.len());
        let mut offset = 0u64;
        for t in tensors {
            if t.name.len() >= MAX_NAME {
                return Err(Error::input(format!(
                    "tensor name '{}' is {} bytes; GGUF readers take under {MAX_NAME}",
                    t.name,
                    t.name.len()
                )));
            }
            let bad = || {
                Error::input(format!(
                    "tensor '{}': dims {:?} do not fit {} blocks of {}",
                    t.name,
                    t.dims,
                    t.ty.name(),
                    t.ty.block()
                ))
            };
            let numel = t
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(bad)?;
            if t.dims.first().is_some_and(|d| d % t.ty.block() != 0) {
                return Err(bad());
            }
            let bytes = t.ty.size_of(numel).ok_or_else(bad)?;
            put_string(&mut head, &t.name);
            head.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                head.extend_from_slice(&d.to_le_bytes());
            }
            head.extend_from_slice(&t.ty.id().to_le_bytes());
            head.extend_from_slice(&offset.to_le_bytes());
            offset = offset
                .checked_add(bytes)
                .and_then(|o| align(o, alignment))
                .ok_or_else(|| Error::input("tensor sizes overflow"))?;
            sized.push((t, bytes));
        }
        let head_len = align(head.len() as u64, alignment)
            .ok_or_else(|| Error::input("GGUF header size overflows"))?;
        head.resize(head_len as usize, 0);
        let mut file = AtomicFile::create(path)?;
        file.write_all(&head)?;
        Ok(GgufWriter {
            file,
            tensors: sized,
            next: 0,
            alignment,
        })
    }

    /// The next tensor's bytes (its declared name and size).
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        let Some((t, bytes)) = self.tensors.get(self.next) else {
            return Err(Error::input(format!(
                "{}: tensor '{name}' was not declared",
                self.file.path().display()
            )));
        };
        if t.name != name || *bytes != data.len() as u64 {
            return Err(Error::input(format!(
                "{}: expected tensor '{}' of {bytes} bytes, got '{name}' of {}",
                self.file.path().display(),
                t.name,
                data.len()
            )));
        }
        let pad = align(*bytes, self.alignment)
            .ok_or_else(|| Error::input("tensor sizes overflow"))?
            - bytes;
        let pad = pad as usize;
        self.file.write_all(data)?;
        self.file.write_all(&vec![0u8; pad])?;
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
        if self.next != self.tensors.len() {
            return Err(Error::input(format!(
                "{}: {} of {} tensors written",
                self.file.path().display(),
                self.next,
                self.tensors.len()
            )));
        }
        self.file.finish()
    }
}
