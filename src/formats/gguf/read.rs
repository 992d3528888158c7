//! The GGUF header parser: every count, length and offset checked against
//! the file before use.

use super::*;

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

    /// The next N bytes as an array.
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N as u64, what)?);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
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
            2 => Value::U16(u16::from_le_bytes(self.array("u16")?)),
            3 => Value::I16(i16::from_le_bytes(self.array("i16")?)),
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

/// What the header says, checked against the file's length.
pub(super) struct Header {
    pub(super) version: u32,
    pub(super) metadata: Vec<(String, Value)>,
    pub(super) tensors: Vec<GgufTensor>,
    pub(super) alignment: u64,
    pub(super) data_start: u64,
}

pub(super) fn parse(path: &Path, b: &[u8]) -> Result<Header> {
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
