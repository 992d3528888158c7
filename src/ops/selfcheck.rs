//! Running the exact-arithmetic helpers of common.wgsl on a device, so tests
//! (and users doubting an adapter) can compare them with the CPU.

use super::kernels::Kernel;
use super::params;
use crate::device::{Chunk, Gpu, StreamLayout};
use crate::error::Result;

kernel_params!(CheckParams {
    n: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
});

impl Gpu {
    /// a / b for each pair of f32 bit patterns, by `div_rn` on the device.
    pub fn divide_exactly(&self, pairs: &[(u32, u32)]) -> Result<Vec<u32>> {
        let n = pairs.len();
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return Ok(out);
        }
        let flat: Vec<u32> = pairs.iter().flat_map(|&(a, b)| [a, b]).collect();
        // Each pair reads 8 bytes: chunks of pairs within the binding.
        let per_chunk = ((self.chunk_bytes() / 8) as usize).clamp(1, n);
        let layout = StreamLayout {
            inputs: vec![(per_chunk * 8) as u64],
            outputs: vec![((per_chunk * 4) as u64, false)],
        };
        let pipeline = self.ctx.pipeline(Kernel::DivCheck, 0, 0)?;
        let jobs = flat.chunks(2 * per_chunk).map(|c| Chunk {
            params: params(&CheckParams {
                n: (c.len() / 2) as u32,
                ..Default::default()
            }),
            inputs: vec![bytemuck::cast_slice(c).into()],
            read: vec![(c.len() * 2) as u64],
            workgroups: self.ctx.workgroups_for((c.len() / 2) as u64),
        });
        self.ctx.stream(&pipeline, &layout, jobs, |_, outs| {
            out.extend(
                outs[0]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])),
            );
            Ok(())
        })?;
        Ok(out)
    }
}
