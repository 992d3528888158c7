//! Quantizes raw little-endian f32 values from stdin to GGML blocks on
//! stdout: `ggml_blocks TYPE [DEVICE] < in.f32 > out.bin`. For comparing
//! modelpress with ggml's own quantizer (ggml_quantize_chunk) byte for byte.

use modelpress::ops::ggml::{quantize, BlockType};
use modelpress::{DType, Device, TensorRef};
use std::io::{Read, Write};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let ty = BlockType::from_name(args.get(1).ok_or("usage: ggml_blocks TYPE [DEVICE]")?)
        .ok_or("unknown block type")?;
    let dev = Device::choose(args.get(2).map_or("auto", |s| s.as_str()))?;
    let mut bytes = Vec::new();
    std::io::stdin().read_to_end(&mut bytes)?;
    let shape = [bytes.len() / 4];
    let q = quantize(&dev, ty, &TensorRef::new(DType::F32, &shape, &bytes)?)?;
    eprintln!(
        "{} on {dev:?}: {} blocks by the CPU reference",
        ty.name(),
        q.cpu_blocks
    );
    std::io::stdout().write_all(&q.data)?;
    Ok(())
}
