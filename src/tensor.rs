//! Host tensors: a dtype, a row-major shape and little-endian bytes.
//!
//! `TensorRef` borrows its bytes (a memory map, a slice of a file) so that
//! large inputs are never copied before they reach a kernel; `Tensor` owns
//! them (results). Byte slices may be unaligned: every reader here decodes
//! with `from_le_bytes`, never by casting.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// Element types as safetensors names them. The kernels compute on the three
/// float types; the others pass through whole-model jobs untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16.
    BF16,
    /// IEEE binary64.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Signed 32-bit integer.
    I32,
    /// Signed 16-bit integer.
    I16,
    /// Signed 8-bit integer.
    I8,
    /// Unsigned 8-bit integer.
    U8,
    /// Boolean, one byte.
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 | DType::I16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    /// The name config.json's `torch_dtype` uses ("bfloat16"); anything
    /// but f16 and bf16 is "float32".
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            _ => "float32",
        }
    }

    /// The safetensors name ("BF16").
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "F32",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::I32 => "I32",
            DType::I16 => "I16",
            DType::I8 => "I8",
            DType::U8 => "U8",
            DType::Bool => "BOOL",
        }
    }

    /// The dtype named `s` (any case).
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s.to_ascii_uppercase().as_str() {
            "F32" => DType::F32,
            "F16" => DType::F16,
            "BF16" => DType::BF16,
            "F64" => DType::F64,
            "I64" => DType::I64,
            "I32" => DType::I32,
            "I16" => DType::I16,
            "I8" => DType::I8,
            "U8" => DType::U8,
            "BOOL" => DType::Bool,
            _ => return None,
        })
    }

    /// The float types every kernel reads and writes.
    pub fn is_kernel_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The code the shaders use for this dtype (`DTYPE` override constant).
    pub(crate) fn shader_code(self) -> u32 {
        match self {
            DType::F32 => 0,
            DType::F16 => 1,
            DType::BF16 => 2,
            _ => unreachable!("checked by require_float"),
        }
    }

    /// Err unless the kernels can compute on this dtype.
    pub(crate) fn require_float(self, what: &str) -> Result<()> {
        if self.is_kernel_float() {
            Ok(())
        } else {
            Err(Error::Unsupported(format!(
                "{what}: dtype {} (the kernels take F32, F16 and BF16)",
                self.name()
            )))
        }
    }

    /// Decodes element `raw` (the dtype's own bits, zero-extended) to f32.
    #[inline(always)]
    pub(crate) fn raw_to_f32(self, raw: u32) -> f32 {
        match self {
            DType::F32 => f32::from_bits(raw),
            DType::F16 => f16::from_bits(raw as u16).to_f32(),
            _ => bf16::from_bits(raw as u16).to_f32(),
        }
    }

    /// Encodes `v` in this dtype, rounding to nearest even (the `half` crate's
    /// rules, which the shaders reproduce bit for bit).
    #[inline(always)]
    pub(crate) fn f32_to_raw(self, v: f32) -> u32 {
        match self {
            DType::F32 => v.to_bits(),
            DType::F16 => f16::from_f32(v).to_bits() as u32,
            _ => bf16::from_f32(v).to_bits() as u32,
        }
    }

    /// Reads element `i` of little-endian `bytes` as raw bits.
    #[inline(always)]
    pub(crate) fn read_raw(self, bytes: &[u8], i: usize) -> u32 {
        match self.size() {
            4 => crate::ops::u32_at(bytes, i),
            _ => u16::from_le_bytes([bytes[2 * i], bytes[2 * i + 1]]) as u32,
        }
    }

    #[inline(always)]
    pub(crate) fn write_raw(self, bytes: &mut [u8], i: usize, raw: u32) {
        match self.size() {
            4 => bytes[4 * i..4 * i + 4].copy_from_slice(&raw.to_le_bytes()),
            _ => bytes[2 * i..2 * i + 2].copy_from_slice(&(raw as u16).to_le_bytes()),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// Bytes a shape of `dtype` needs, or None when that overflows.
fn checked_bytes(dtype: DType, shape: &[usize]) -> Option<usize> {
    shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
}

/// A borrowed tensor: what every operation reads. Valid by construction:
/// its bytes are exactly what its shape and dtype need (`new` checks).
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub(crate) dtype: DType,
    pub(crate) shape: &'a [usize],
    pub(crate) data: &'a [u8],
}

impl<'a> TensorRef<'a> {
    /// A view of `data` as a tensor of `dtype` and `shape` (row-major,
    /// little-endian); an error unless the byte count matches.
    pub fn new(dtype: DType, shape: &'a [usize], data: &'a [u8]) -> Result<Self> {
        let want = checked_bytes(dtype, shape)
            .ok_or_else(|| Error::input(format!("shape {shape:?} overflows")))?;
        if want != data.len() {
            return Err(Error::input(format!(
                "shape {shape:?} of {dtype} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(TensorRef { dtype, shape, data })
    }

    /// The element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The row-major shape.
    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }

    /// The little-endian bytes.
    pub fn data(&self) -> &'a [u8] {
        self.data
    }

    /// How many elements.
    pub fn numel(&self) -> usize {
        numel(self.shape)
    }

    /// Err unless the kernels compute on this dtype and the bytes match the
    /// shape (a view of a `Tensor` whose public fields were changed can
    /// disagree; every operation checks before it touches the bytes).
    pub fn check_float(&self, what: &str) -> Result<()> {
        self.dtype.require_float(what)?;
        if checked_bytes(self.dtype, self.shape) != Some(self.data.len()) {
            return Err(Error::input(format!(
                "{what}: shape {:?} of {} does not match {} bytes",
                self.shape,
                self.dtype,
                self.data.len()
            )));
        }
        Ok(())
    }

    /// (rows, row length) of the tensor seen as a matrix: the first dimension
    /// is the output neuron, the rest is flattened. A 1-D or 0-D tensor is one
    /// row.
    pub fn rows(&self) -> (usize, usize) {
        matrix_view(self.shape)
    }

    /// Decodes every element to f32 (tests, small tensors).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        (0..self.numel())
            .map(|i| self.dtype.raw_to_f32(self.dtype.read_raw(self.data, i)))
            .collect()
    }

    /// The values as an ndarray of f32 (decoded exactly), for inspection and
    /// for callers that compute with ndarray.
    pub fn to_ndarray(&self) -> ndarray::ArrayD<f32> {
        // Cannot fail: a TensorRef's bytes match its shape (checked by `new`),
        // so the vector has exactly the shape's element count.
        ndarray::ArrayD::from_shape_vec(ndarray::IxDyn(self.shape), self.to_f32_vec())
            .expect("shape matches the element count")
    }

    /// A copy that owns its bytes.
    pub fn to_owned(&self) -> Tensor {
        Tensor {
            dtype: self.dtype,
            shape: self.shape.to_vec(),
            data: self.data.to_vec(),
        }
    }
}

/// (rows, row length) of a shape seen as a matrix; see `TensorRef::rows`.
pub(crate) fn matrix_view(shape: &[usize]) -> (usize, usize) {
    match shape.len() {
        0 => (1, 1),
        1 => (1, shape[0]),
        _ => (shape[0], shape[1..].iter().product()),
    }
}

/// Large byte buffers kept for reuse. Writing a large tensor into a fresh
/// allocation faults in (and zeroes) every page; a buffer that was written
/// before is already mapped. Whole-model jobs give their outputs back
/// (`recycle`) once written, and the next output takes one.
static POOL: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
/// Smaller buffers are not worth keeping.
const POOL_MIN: usize = 1 << 20;
/// At most this many are kept (they stay within what a job had in flight).
const POOL_BUFFERS: usize = 2;

/// A buffer of `len` bytes whose contents are unspecified (recycled bytes
/// or zeros): for outputs of which every byte is written.
pub(crate) fn buffer_for_overwrite(len: usize) -> Vec<u8> {
    if len >= POOL_MIN {
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        let best = (0..pool.len())
            .filter(|&i| pool[i].capacity() >= len)
            .min_by_key(|&i| pool[i].capacity());
        if let Some(i) = best {
            let mut v = pool.swap_remove(i);
            drop(pool);
            v.truncate(len);
            v.resize(len, 0);
            return v;
        }
    }
    vec![0; len]
}

/// Gives a buffer back for reuse by later outputs (large ones only; the
/// rest are freed).
pub fn recycle(buf: Vec<u8>) {
    if buf.capacity() < POOL_MIN {
        return;
    }
    let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if pool.len() < POOL_BUFFERS {
        pool.push(buf);
    } else if let Some(small) = pool.iter_mut().min_by_key(|b| b.capacity()) {
        if small.capacity() < buf.capacity() {
            *small = buf;
        }
    }
}

/// Frees the buffers kept for reuse (a job calls it when it ends).
pub fn release_buffers() {
    POOL.lock().unwrap_or_else(|e| e.into_inner()).clear();
}

/// An owned tensor: what operations return.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    /// Element type.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// Little-endian bytes.
    pub data: Vec<u8>,
}

impl Tensor {
    /// A tensor whose bytes are unspecified, for an output of which every
    /// byte is written (it may reuse a recycled buffer).
    pub(crate) fn for_overwrite(dtype: DType, shape: &[usize]) -> Tensor {
        Tensor {
            dtype,
            shape: shape.to_vec(),
            data: buffer_for_overwrite(numel(shape) * dtype.size()),
        }
    }

    /// Zero-filled tensor (in a recycled buffer when there is one: zeroing
    /// mapped memory costs less than faulting in fresh pages).
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        let mut t = Tensor::for_overwrite(dtype, shape);
        t.data.fill(0);
        t
    }

    /// Encodes f32 values in `dtype` (rounding to nearest even).
    pub fn from_f32(dtype: DType, shape: &[usize], values: &[f32]) -> Result<Tensor> {
        dtype.require_float("Tensor::from_f32")?;
        if checked_bytes(dtype, shape) != values.len().checked_mul(dtype.size()) {
            return Err(Error::input(format!(
                "shape {shape:?} does not hold {} values",
                values.len()
            )));
        }
        let mut t = Tensor::zeros(dtype, shape);
        for (i, &v) in values.iter().enumerate() {
            dtype.write_raw(&mut t.data, i, dtype.f32_to_raw(v));
        }
        Ok(t)
    }

    /// An ndarray's values in `dtype` (rounding to nearest even), in its
    /// logical (row-major) order whatever its memory layout.
    pub fn from_ndarray<S, D>(dtype: DType, a: &ndarray::ArrayBase<S, D>) -> Result<Tensor>
    where
        S: ndarray::Data<Elem = f32>,
        D: ndarray::Dimension,
    {
        let values: Vec<f32> = a.iter().copied().collect();
        Tensor::from_f32(dtype, a.shape(), &values)
    }

    /// A borrowed view.
    pub fn view(&self) -> TensorRef<'_> {
        TensorRef {
            dtype: self.dtype,
            shape: &self.shape,
            data: &self.data,
        }
    }

    /// How many elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Every element decoded to f32.
    pub fn to_f32_vec(&self) -> Vec<f32> {
        self.view().to_f32_vec()
    }

    /// The raw bits of each element (exact comparisons in tests).
    pub fn raw_bits(&self) -> Vec<u32> {
        (0..self.numel())
            .map(|i| self.dtype.read_raw(&self.data, i))
            .collect()
    }
}

/// How many scales a quantized tensor has: one, or one per row (output
/// neuron) of its `(shape[0], rest)` matrix view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// One scale for the whole tensor.
    PerTensor,
    /// One scale per row.
    PerRow,
}

/// An int8 tensor with its dequantization scales: w ≈ q · scale.
#[derive(Clone, Debug, PartialEq)]
pub struct QTensor {
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// The integers, row-major.
    pub q: Vec<i8>,
    /// `[scale]` for the whole tensor, or one per row (`rows()` of them).
    pub scales: Vec<f32>,
    /// Which of the two `scales` holds.
    pub granularity: Granularity,
}

impl QTensor {
    /// How many elements.
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }

    /// Whether there is one scale per row.
    pub fn is_per_row(&self) -> bool {
        self.granularity == Granularity::PerRow
    }

    /// Err unless the values and scales match the shape.
    pub fn check(&self) -> Result<()> {
        if checked_bytes(DType::I8, &self.shape) != Some(self.q.len()) {
            return Err(Error::input(format!(
                "quantized tensor of shape {:?} holds {} values",
                self.shape,
                self.q.len()
            )));
        }
        let want = if self.is_per_row() {
            matrix_view(&self.shape).0
        } else {
            1
        };
        if self.scales.len() != want {
            return Err(Error::input(format!(
                "quantized tensor of shape {:?} needs {want} scales, has {}",
                self.shape,
                self.scales.len()
            )));
        }
        Ok(())
    }
}

/// Distance in units in the last place of `dtype` between two raw values:
/// 0 for identical bits and for +0 vs -0; `u64::MAX` when exactly one is NaN.
pub fn ulp_distance(dtype: DType, a: u32, b: u32) -> u64 {
    let (sign, nan_above) = match dtype.size() {
        4 => (0x8000_0000u32, 0x7f80_0000u32),
        _ => (0x8000, if dtype == DType::F16 { 0x7c00 } else { 0x7f80 }),
    };
    let mag = |x: u32| x & (sign - 1);
    let (na, nb) = (mag(a) > nan_above, mag(b) > nan_above);
    if na || nb {
        return if na && nb { 0 } else { u64::MAX };
    }
    let ord = |x: u32| {
        if x & sign != 0 {
            -(mag(x) as i64)
        } else {
            mag(x) as i64
        }
    };
    (ord(a) - ord(b)).unsigned_abs()
}

/// The largest `ulp_distance` between two tensors' elements, or None when
/// their dtypes or shapes differ.
pub fn max_ulp_diff(a: &Tensor, b: &Tensor) -> Option<u64> {
    if a.dtype != b.dtype || a.shape != b.shape {
        return None;
    }
    Some(
        a.raw_bits()
            .iter()
            .zip(b.raw_bits())
            .map(|(&x, y)| ulp_distance(a.dtype, x, y))
            .max()
            .unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ulp_distance_counts_representable_steps() {
        let d = |a: f32, b: f32| ulp_distance(DType::F32, a.to_bits(), b.to_bits());
        assert_eq!(d(1.0, 1.0), 0);
        assert_eq!(d(0.0, -0.0), 0);
        assert_eq!(d(1.0, f32::from_bits(1.0f32.to_bits() + 3)), 3);
        assert_eq!(d(f32::from_bits(1), -f32::from_bits(1)), 2);
        assert_eq!(d(f32::NAN, 1.0), u64::MAX);
        assert_eq!(d(f32::NAN, -f32::NAN), 0);
        assert_eq!(ulp_distance(DType::BF16, 0x3f80, 0x3f81), 1);
        assert_eq!(ulp_distance(DType::F16, 0x7c00, 0x7bff), 1);
        assert_eq!(ulp_distance(DType::F16, 0x7c01, 0x7c00), u64::MAX);
    }

    #[test]
    fn views_check_their_bytes() {
        assert!(TensorRef::new(DType::F32, &[2, 2], &[0; 16]).is_ok());
        assert!(TensorRef::new(DType::F32, &[2, 2], &[0; 15]).is_err());
        assert!(TensorRef::new(DType::BF16, &[usize::MAX, 4], &[]).is_err());
        assert_eq!(matrix_view(&[]), (1, 1));
        assert_eq!(matrix_view(&[7]), (1, 7));
        assert_eq!(matrix_view(&[2, 3, 4]), (2, 12));
        assert!(Tensor::from_f32(DType::F16, &[3], &[1.0, 2.0]).is_err());
        assert!(Tensor::from_f32(DType::I8, &[1], &[1.0]).is_err());
    }

    #[test]
    fn ndarray_round_trip_keeps_logical_order() {
        let a = ndarray::Array2::from_shape_fn((3, 4), |(i, j)| (i * 4 + j) as f32);
        let t = Tensor::from_ndarray(DType::BF16, &a.t().to_owned()).unwrap();
        assert_eq!(t.shape, [4, 3]);
        assert_eq!(t.view().to_ndarray(), a.t().into_dyn());
        let f = Tensor::from_ndarray(DType::F32, &a.t()).unwrap();
        assert_eq!(f.to_f32_vec()[..4], [0.0, 4.0, 8.0, 1.0]);
    }
}
