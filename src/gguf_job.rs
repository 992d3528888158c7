//! `quantize --type T` with a GGUF output: a safetensors model or a GGUF
//! file in, a GGUF v3 file out, tensor by tensor.
//!
//! Which tensors change (llama-quantize's rule): those of rank ≥ 2 whose
//! name ends in `weight`; the others (norms, biases, 1-D tensors) keep their
//! type. From safetensors the output holds the same tensor names and only
//! `general.file_type` (and `general.quantization_version` once a block
//! type is written): no llama.cpp model metadata is invented, so it is a
//! tensor container, not a model llama.cpp can run. From GGUF, every
//! metadata entry is kept and those two are set as llama-quantize sets them.
//!
//! This version writes the float types F32, F16 and BF16 (exact
//! conversions on the device); the GGML block types come next.

use crate::device::Device;
use crate::error::{Error, Result};
use crate::formats::gguf::{GgmlType, GgufFile, GgufOut, GgufWriter, Value};
use crate::formats::model::Model;
use crate::ops::quantize;
use crate::tensor::{DType, TensorRef};
use std::path::Path;

/// llama.cpp's LLAMA_FTYPE for a whole-file target type.
fn file_type(t: GgmlType) -> Option<u32> {
    Some(match t.name {
        "F32" => 0,
        "F16" => 1,
        "BF16" => 32,
        _ => return None,
    })
}

/// The GGML type of a dtype: the names agree (U8 and BOOL have none).
fn ggml_of(d: DType) -> Option<GgmlType> {
    GgmlType::from_name(d.name())
}

/// The float dtype a GGML type converts through, if any.
fn dtype_of(t: GgmlType) -> Option<DType> {
    DType::parse(t.name).filter(|d| d.is_kernel_float())
}

/// One input tensor, from either kind of file.
struct In<'a> {
    name: String,
    shape: Vec<usize>,
    ty: GgmlType,
    data: &'a [u8],
}

/// Summary of a GGUF write.
pub struct GgufSummary {
    pub tensors: usize,
    pub converted: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

pub fn write_gguf(
    dev: &Device,
    input: &Path,
    out: &Path,
    target: &str,
    force: bool,
) -> Result<GgufSummary> {
    let ty = GgmlType::from_name(target)
        .ok_or_else(|| Error::input(format!("--type {target}: not a GGML type")))?;
    let Some(target_dtype) = dtype_of(ty) else {
        return Err(Error::Unsupported(format!(
            "--type {}: this version writes F32, F16 and BF16 GGUF; the GGML block types are not implemented yet",
            ty.name
        )));
    };
    if out.extension().is_none_or(|e| e != "gguf") {
        return Err(Error::input(format!(
            "output {} should end in .gguf",
            out.display()
        )));
    }
    if let (Ok(a), Ok(b)) = (out.canonicalize(), input.canonicalize()) {
        if a == b {
            return Err(Error::input(format!(
                "output {} is the input",
                out.display()
            )));
        }
    }
    if out.exists() && !force {
        return Err(Error::input(format!(
            "output {} already exists (use --force to replace it)",
            out.display()
        )));
    }
    // Inputs from either format, in file order.
    let gguf;
    let model;
    let (mut metadata, inputs): (Vec<(String, Value)>, Vec<In>) = if GgufFile::sniff(input) {
        gguf = GgufFile::open(input)?;
        let ins = gguf
            .tensors
            .iter()
            .map(|t| In {
                name: t.name.clone(),
                shape: t.shape(),
                ty: t.ty,
                data: gguf.data(t),
            })
            .collect();
        (gguf.metadata.clone(), ins)
    } else {
        model = Model::open(input)?;
        let ins = model
            .entries()
            .map(|(f, e)| {
                let d = DType::parse(&e.dtype)
                    .and_then(ggml_of)
                    .ok_or_else(|| Error::Format {
                        file: f.path.display().to_string(),
                        tensor: e.name.clone(),
                        why: format!("dtype {} has no GGUF type", e.dtype),
                    })?;
                Ok(In {
                    name: e.name.clone(),
                    shape: e.shape.clone(),
                    ty: d,
                    data: f.data(e),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        (Vec::new(), ins)
    };
    let convert =
        |t: &In| t.shape.len() >= 2 && t.name.ends_with("weight") && dtype_of(t.ty).is_some();
    metadata.retain(|(k, _)| k != "general.file_type" && k != "general.quantization_version");
    metadata.push((
        "general.file_type".into(),
        Value::U32(file_type(ty).expect("float types have one")),
    ));
    let outs: Vec<GgufOut> = inputs
        .iter()
        .map(|t| GgufOut {
            name: t.name.clone(),
            dims: t.shape.iter().rev().map(|&d| d as u64).collect(),
            ty: if convert(t) { ty } else { t.ty },
        })
        .collect();
    let mut w = GgufWriter::create(out, &metadata, outs)?;
    let mut s = GgufSummary {
        tensors: inputs.len(),
        converted: 0,
        bytes_in: 0,
        bytes_out: 0,
    };
    for t in &inputs {
        s.bytes_in += t.data.len() as u64;
        if convert(t) && t.ty != ty {
            let src = TensorRef::new(dtype_of(t.ty).expect("checked"), &t.shape, t.data)?;
            let c = quantize::convert(dev, &src, target_dtype).map_err(|e| e.at(input, &t.name))?;
            w.write(&t.name, &c.data)?;
            s.bytes_out += c.data.len() as u64;
            s.converted += 1;
        } else {
            w.write(&t.name, t.data)?;
            s.bytes_out += t.data.len() as u64;
        }
    }
    w.finish()?;
    Ok(s)
}
