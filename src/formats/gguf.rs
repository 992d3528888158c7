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

use super::output::{AtomicFile, Staged};
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

/// Reads little-endian values from a byte slice, every read bounds-checked.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn bad(&self, why: impl Into<String>) -> Error {
        Error::Format {
            file: self.path.display().to_string(),
            tensor: None,
            why: format!("{} (at byte {})", why.into(), self.pos),
        }
    }

    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8]> {
        let end = (self.pos as u64)
            .checked_add(n)
            .filter(|&e| e <= self.b.len() as u64);
        match end {
            Some(e) => {
                let s = &self.b[self.pos..e as usize];
                self.pos = e as usize;
                Ok(s)
            }
            None => Err(self.bad(format!(
                "truncated: {what} needs {n} bytes, the file ends first"
            ))),
        }
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().unwrap()))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().unwrap()))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.bad(format!("{what} is not UTF-8")))
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value> {
        Ok(match ty {
            0 => Value::U8(self.take(1, "u8")?[0]),
            1 => Value::I8(self.take(1, "i8")?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.take(2, "u16")?.try_into().unwrap())),
            3 => Value::I16(i16::from_le_bytes(self.take(2, "i16")?.try_into().unwrap())),
            4 => Value::U32(self.u32("u32")?),
            5 => Value::I32(self.u32("i32")? as i32),
            6 => Value::F32(f32::from_bits(self.u32("f32")?)),
            7 => match self.take(1, "bool")?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(self.bad(format!("bool value {b}"))),
            },
            8 => Value::String(self.string("string value")?),
            9 => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.bad("arrays nested too deep"));
                }
                let elem = self.u32("array type")?;
                let n = self.u64("array length")?;
                // Each element takes at least one byte: a count larger than
                // what is left is a lie, refused before allocating.
                if n > (self.b.len() - self.pos) as u64 {
                    return Err(self.bad(format!("array of {n} elements is longer than the file")));
                }
                let mut v = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    v.push(self.value(elem, depth + 1)?);
                }
                Value::Array(elem, v)
            }
            10 => Value::U64(self.u64("u64")?),
            11 => Value::I64(self.u64("i64")? as i64),
            12 => Value::F64(f64::from_bits(self.u64("f64")?)),
            t => return Err(self.bad(format!("unknown metadata value type {t}"))),
        })
    }
}

fn align(x: u64, a: u64) -> Option<u64> {
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

/// What the header says, checked against the file's length.
struct Header {
    version: u32,
    metadata: Vec<(String, Value)>,
    tensors: Vec<GgufTensor>,
    alignment: u64,
    data_start: u64,
}

fn parse(path: &Path, b: &[u8]) -> Result<Header> {
    let mut c = Cursor { b, pos: 0, path };
    if c.take(4, "magic")? != MAGIC {
        return Err(c.bad("not a GGUF file (no GGUF magic)"));
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(c.bad(format!(
            "GGUF version {version} (this reader takes 2 and 3)"
        )));
    }
    let n_tensors = c.u64("tensor count")?;
    let n_kv = c.u64("metadata count")?;
    // A key/value pair takes at least 13 bytes, a tensor info at least 24.
    let left = (b.len() - c.pos) as u64;
    if n_kv > left / 13 || n_tensors > left / 24 {
        return Err(c.bad(format!(
            "{n_tensors} tensors and {n_kv} metadata entries cannot fit in the file"
        )));
    }
    let mut metadata = Vec::with_capacity(n_kv as usize);
    let mut keys = std::collections::HashSet::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32("metadata type")?;
        let v = c.value(ty, 0).map_err(|e| match e {
            Error::Format { file, why, .. } => Error::Format {
                file,
                tensor: None,
                why: format!("metadata '{key}': {why}"),
            },
            e => e,
        })?;
        // Sets keep files of 100,000 entries linear.
        if !keys.insert(key.clone()) {
            return Err(c.bad(format!("metadata key '{key}' appears twice")));
        }
        metadata.push((key, v));
    }
    let alignment = match metadata.iter().find(|(k, _)| k == "general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some((_, Value::U32(a))) if *a != 0 && a.is_power_of_two() => *a as u64,
        Some((_, v)) => {
            return Err(c.bad(format!(
                "general.alignment must be a power-of-two u32, got {v:?}"
            )))
        }
    };
    let mut tensors: Vec<GgufTensor> = Vec::with_capacity(n_tensors as usize);
    let mut names = std::collections::HashSet::new();
    let mut expected = 0u64;
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let at = |why: String| Error::Format {
            file: path.display().to_string(),
            tensor: Some(name.clone()),
            why,
        };
        if name.len() >= MAX_NAME {
            return Err(at(format!(
                "name of {} bytes (llama.cpp takes under {MAX_NAME})",
                name.len()
            )));
        }
        if !names.insert(name.clone()) {
            return Err(at("name appears twice".into()));
        }
        let n_dims = c.u32("dimension count")?;
        if n_dims > MAX_DIMS {
            return Err(at(format!("{n_dims} dimensions (at most {MAX_DIMS})")));
        }
        let dims = (0..n_dims)
            .map(|_| c.u64("dimension"))
            .collect::<Result<Vec<_>>>()?;
        let ty_id = c.u32("tensor type")?;
        let ty =
            GgmlType::from_id(ty_id).ok_or_else(|| at(format!("unknown ggml type {ty_id}")))?;
        let offset = c.u64("tensor offset")?;
        let numel = dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| at("dimensions overflow".into()))?;
        if dims.first().is_some_and(|&d0| d0 % ty.block() != 0) {
            return Err(at(format!(
                "innermost dimension {} is not a multiple of {}'s block of {}",
                dims[0],
                ty.name(),
                ty.block()
            )));
        }
        let bytes = ty
            .size_of(numel)
            .ok_or_else(|| at("size overflows".into()))?;
        if offset != expected {
            return Err(at(format!("offset {offset}, expected {expected} (tensors must follow each other, padded to {alignment})")));
        }
        expected = align(
            offset
                .checked_add(bytes)
                .ok_or_else(|| at("size overflows".into()))?,
            alignment,
        )
        .ok_or_else(|| at("size overflows".into()))?;
        tensors.push(GgufTensor {
            name,
            dims,
            ty,
            offset,
            bytes,
        });
    }
    let data_start = align(c.pos as u64, alignment).ok_or_else(|| c.bad("header too large"))?;
    if let Some(t) = tensors.last() {
        let end = data_start + t.offset + t.bytes;
        if end > b.len() as u64 {
            return Err(Error::Format {
                file: path.display().to_string(),
                tensor: Some(t.name.clone()),
                why: format!(
                    "data ends at byte {end}, past the end of the file ({} bytes): truncated",
                    b.len()
                ),
            });
        }
    }
    Ok(Header {
        version,
        metadata,
        tensors,
        alignment,
        data_start,
    })
}

impl GgufFile {
    /// The bytes of tensor `t`.
    pub fn data(&self, t: &GgufTensor) -> &[u8] {
        let s = (self.data_start + t.offset) as usize;
        &self.map[s..s + t.bytes as usize]
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

fn put_string(w: &mut Vec<u8>, s: &str) {
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
        head.resize(align(head.len() as u64, alignment).unwrap() as usize, 0);
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
        let pad = (align(*bytes, self.alignment).unwrap() - bytes) as usize;
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

/// Parses GGUF bytes in memory (tests, fuzzing): the same checks as `open`.
pub fn parse_bytes(bytes: &[u8]) -> Result<(Metadata, Vec<GgufTensor>)> {
    let h = parse(Path::new("<memory>"), bytes)?;
    Ok((h.metadata, h.tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_meta() -> Vec<(String, Value)> {
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("general.alignment".into(), Value::U32(64)),
            ("a.u8".into(), Value::U8(7)),
            ("a.i8".into(), Value::I8(-7)),
            ("a.u16".into(), Value::U16(65535)),
            ("a.i16".into(), Value::I16(-300)),
            ("a.i32".into(), Value::I32(-70000)),
            ("a.f32".into(), Value::F32(1.5)),
            ("a.bool".into(), Value::Bool(true)),
            ("a.u64".into(), Value::U64(1 << 40)),
            ("a.i64".into(), Value::I64(-(1 << 40))),
            ("a.f64".into(), Value::F64(-2.25)),
            ("a.empty".into(), Value::Array(8, vec![])),
            (
                "a.nested".into(),
                Value::Array(
                    9,
                    vec![
                        Value::Array(4, vec![Value::U32(1), Value::U32(2)]),
                        Value::Array(4, vec![]),
                    ],
                ),
            ),
            (
                "tokenizer.ggml.tokens".into(),
                Value::Array(
                    8,
                    vec![Value::String("<s>".into()), Value::String("é".into())],
                ),
            ),
        ]
    }

    /// A small valid file: an F32 [2, 3] tensor and a Q8_0 [2, 64] one.
    fn sample_file(path: &Path) -> Vec<u8> {
        let q8 = GgmlType::from_name("Q8_0").unwrap();
        let f32t = GgmlType::from_name("F32").unwrap();
        let mut w = GgufWriter::create(
            path,
            &sample_meta(),
            vec![
                GgufOut {
                    name: "a.weight".into(),
                    dims: vec![3, 2],
                    ty: f32t,
                },
                GgufOut {
                    name: "b.weight".into(),
                    dims: vec![64, 2],
                    ty: q8,
                },
            ],
        )
        .unwrap();
        let a: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.write("a.weight", &a).unwrap();
        w.write("b.weight", &(0..136).map(|i| i as u8).collect::<Vec<_>>())
            .unwrap();
        w.finish().unwrap();
        std::fs::read(path).unwrap()
    }

    #[test]
    fn round_trip_keeps_every_value_and_tensor() {
        let dir = tempfile_dir();
        let p = dir.path().join("x.gguf");
        let bytes = sample_file(&p);
        let f = GgufFile::open(&p).unwrap();
        assert_eq!(f.version, 3);
        assert_eq!(f.metadata, sample_meta());
        assert_eq!(f.alignment, 64);
        assert_eq!(f.tensors.len(), 2);
        assert_eq!(f.tensors[0].shape(), vec![2, 3]);
        assert_eq!(f.tensors[1].bytes, 136);
        assert_eq!(f.tensors[1].offset, 64, "offsets padded to the alignment");
        assert_eq!(f.data(&f.tensors[0])[4..8], 1f32.to_le_bytes());
        assert_eq!(f.data(&f.tensors[1])[135], 135);
        assert_eq!(bytes.len() as u64 % 64, 0, "data padded to the alignment");
        assert!(GgufFile::sniff(&p));
    }

    /// A directory removed when the test ends.
    fn tempfile_dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    fn err(bytes: &[u8]) -> String {
        match parse_bytes(bytes) {
            Ok(_) => panic!("accepted a bad file"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_files_are_errors_never_panics() {
        let good = sample_file(&tempfile_dir().path().join("g.gguf"));
        assert!(parse_bytes(&good).is_ok());
        // Wrong magic, wrong version.
        let mut b = good.clone();
        b[0] = b'X';
        assert!(err(&b).contains("magic"));
        let mut b = good.clone();
        b[4] = 9;
        assert!(err(&b).contains("version"));
        // Truncated anywhere before the last tensor's data ends (only the
        // trailing padding may go missing).
        let h = parse(Path::new("g"), &good).unwrap();
        let t = h.tensors.last().unwrap();
        let end = (h.data_start + t.offset + t.bytes) as usize;
        for n in 0..good.len() {
            assert_eq!(
                parse_bytes(&good[..n]).is_ok(),
                n >= end,
                "prefix of {n} bytes (data ends at {end})"
            );
        }
        // Counts that lie.
        let mut b = good.clone();
        b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(err(&b).contains("cannot fit"));
        let mut b = good.clone();
        b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(err(&b).contains("cannot fit"));
        // A string length that lies.
        let mut b = good.clone();
        b[24..32].copy_from_slice(&(1u64 << 50).to_le_bytes());
        assert!(err(&b).contains("truncated"));
    }

    /// Builds a header by hand with one tensor whose fields we choose.
    fn one_tensor(name: &str, dims: &[u64], ty: u32, offset: u64, data: usize) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        put_string(&mut b, name);
        b.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            b.extend_from_slice(&d.to_le_bytes());
        }
        b.extend_from_slice(&ty.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        b.resize(align(b.len() as u64, 32).unwrap() as usize + data, 0);
        b
    }

    #[test]
    fn tensor_infos_that_lie_are_errors() {
        assert!(parse_bytes(&one_tensor("w", &[4, 2], 0, 0, 32)).is_ok());
        assert!(err(&one_tensor("w", &[4, 2], 0, 0, 31)).contains("truncated"));
        assert!(err(&one_tensor("w", &[4, 2], 99, 0, 32)).contains("unknown ggml type 99"));
        assert!(err(&one_tensor("w", &[4, 2], 0, 32, 64)).contains("offset 32, expected 0"));
        assert!(err(&one_tensor("w", &[33, 1], 8, 0, 64)).contains("not a multiple"));
        assert!(err(&one_tensor("w", &[1, 1, 1, 1, 1], 0, 0, 4)).contains("dimensions"));
        assert!(err(&one_tensor("w", &[u64::MAX, 4], 0, 0, 4)).contains("overflow"));
        assert!(err(&one_tensor(&"n".repeat(64), &[1], 0, 0, 4)).contains("name"));
        // A bool that is neither 0 nor 1, and arrays nested too deep.
        let mut b = Vec::new();
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&3u32.to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        b.extend_from_slice(&1u64.to_le_bytes());
        put_string(&mut b, "k");
        let mut bad_bool = b.clone();
        bad_bool.extend_from_slice(&7u32.to_le_bytes());
        bad_bool.push(2);
        bad_bool.resize(64, 0);
        assert!(err(&bad_bool).contains("bool"));
        let mut deep = b.clone();
        deep.extend_from_slice(&9u32.to_le_bytes());
        for _ in 0..20 {
            deep.extend_from_slice(&9u32.to_le_bytes());
            deep.extend_from_slice(&1u64.to_le_bytes());
        }
        deep.resize(deep.len() + 64, 0);
        assert!(err(&deep).contains("deep"));
    }

    #[test]
    fn random_mutations_never_panic() {
        let good = sample_file(&tempfile_dir().path().join("m.gguf"));
        let mut rng = crate::tools::sample::Rng::new(12345);
        for _ in 0..20_000 {
            let mut b = good.clone();
            for _ in 0..1 + rng.below(4) {
                let i = rng.below(b.len());
                b[i] = rng.next_u64() as u8;
            }
            if rng.below(4) == 0 {
                b.truncate(rng.below(b.len()));
            }
            let _ = parse_bytes(&b);
        }
    }

    #[test]
    fn writer_refuses_what_readers_would() {
        let dir = tempfile_dir();
        let p = dir.path().join("w.gguf");
        let q8 = GgmlType::from_name("Q8_0").unwrap();
        assert!(GgufWriter::create(
            &p,
            &[],
            vec![GgufOut {
                name: "x".into(),
                dims: vec![33],
                ty: q8
            }]
        )
        .is_err());
        assert!(GgufWriter::create(
            &p,
            &[],
            vec![GgufOut {
                name: "n".repeat(64),
                dims: vec![32],
                ty: q8
            }]
        )
        .is_err());
        let mut w = GgufWriter::create(
            &p,
            &[],
            vec![GgufOut {
                name: "x".into(),
                dims: vec![32],
                ty: q8,
            }],
        )
        .unwrap();
        assert!(w.write("x", &[0; 33]).is_err());
        drop(w);
        assert!(!p.exists(), "an unfinished writer leaves nothing");
    }
}
