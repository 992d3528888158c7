//! Streaming chunks through one kernel: upload, dispatch, readback.
//!
//! Two slots of buffers alternate so that while the GPU runs chunk k the host
//! uploads chunk k+1 and copies out chunk k-1. Binding 0 of every kernel is a
//! uniform of parameters, then its inputs (read-only storage), then its
//! outputs (read-write storage), all read back after each chunk.

use super::GpuContext;
use crate::error::{Error, Result};
use std::borrow::Cow;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Bytes of the parameter uniform (every kernel's `Params` fits).
const UNIFORM_BYTES: u64 = 256;
/// Offsets of the outputs within a slot's readback buffer.
const READBACK_ALIGN: u64 = 256;
/// A poll that waits longer than this reports an error instead of hanging.
const POLL_TIMEOUT: Duration = Duration::from_secs(600);

/// Capacities of a kernel's bindings, the same for every chunk of one stream.
pub(crate) struct StreamLayout {
    /// Bytes of each input binding.
    pub inputs: Vec<u64>,
    /// Bytes of each output binding, and whether it is zeroed before each
    /// chunk (atomic counters, accumulators).
    pub outputs: Vec<(u64, bool)>,
}

/// The bytes of one input binding: parts written at byte offsets (multiples
/// of 4), so that several tensors can share one binding without a host copy.
pub(crate) struct Input<'a> {
    pub parts: Vec<(u64, Cow<'a, [u8]>)>,
}

impl<'a> From<&'a [u8]> for Input<'a> {
    fn from(b: &'a [u8]) -> Self {
        Input {
            parts: vec![(0, Cow::Borrowed(b))],
        }
    }
}

impl From<Vec<u8>> for Input<'static> {
    fn from(b: Vec<u8>) -> Self {
        Input {
            parts: vec![(0, Cow::Owned(b))],
        }
    }
}

/// One dispatch: its parameters, its input bytes, how much of each output to
/// read back, and how many workgroups to launch.
pub(crate) struct Chunk<'a> {
    pub params: Vec<u8>,
    pub inputs: Vec<Input<'a>>,
    pub read: Vec<u64>,
    pub workgroups: u32,
}

/// Set by the map callback. The callback runs inside whichever thread's
/// `poll` processes it, possibly after our own `poll(Wait)` returned, so the
/// waiter also waits on the condition variable.
type MapResult = Arc<(
    Mutex<Option<std::result::Result<(), wgpu::BufferAsyncError>>>,
    Condvar,
)>;

struct Pending {
    index: usize,
    /// Bytes of the readback buffer mapped for this chunk.
    mapped_len: u64,
    submission: wgpu::SubmissionIndex,
    read: Vec<u64>,
    mapped: MapResult,
}

struct Slot {
    uniform: wgpu::Buffer,
    inputs: Vec<wgpu::Buffer>,
    outputs: Vec<wgpu::Buffer>,
    readback: wgpu::Buffer,
    offsets: Vec<u64>,
    bind_group: wgpu::BindGroup,
    pending: Option<Pending>,
}

fn padded(bytes: u64) -> u64 {
    // Kernels read whole 16-byte groups at a tensor's tail; never bind 0 bytes.
    bytes.max(16).div_ceil(16) * 16
}

impl GpuContext {
    /// Runs `pipeline` once per chunk and hands each chunk's outputs, in
    /// order, to `sink(chunk_index, outputs)`.
    pub(crate) fn stream<'a>(
        &self,
        pipeline: &wgpu::ComputePipeline,
        layout: &StreamLayout,
        chunks: impl IntoIterator<Item = Chunk<'a>>,
        mut sink: impl FnMut(usize, &[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        self.scoped(|| {
            let mut slots: Vec<Slot> = Vec::new();
            for (i, chunk) in chunks.into_iter().enumerate() {
                if slots.len() < 2 {
                    slots.push(self.make_slot(pipeline, layout)?);
                }
                let s = i % 2;
                if let Some(p) = slots[s].pending.take() {
                    self.finish(&slots[s], p, &mut sink)?;
                }
                self.launch(pipeline, layout, &mut slots[s], i, chunk)?;
            }
            // Drain in chunk order.
            let mut rest: Vec<(usize, usize)> = slots
                .iter()
                .enumerate()
                .filter_map(|(s, slot)| slot.pending.as_ref().map(|p| (p.index, s)))
                .collect();
            rest.sort();
            for (_, s) in rest {
                if let Some(p) = slots[s].pending.take() {
                    self.finish(&slots[s], p, &mut sink)?;
                }
            }
            Ok(())
        })
    }

    fn make_slot(&self, pipeline: &wgpu::ComputePipeline, layout: &StreamLayout) -> Result<Slot> {
        let d = &self.device;
        let buf = |label: &str, size: u64, usage: wgpu::BufferUsages| {
            d.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage,
                mapped_at_creation: false,
            })
        };
        let uniform = buf(
            "params",
            UNIFORM_BYTES,
            wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
        );
        let inputs: Vec<_> = layout
            .inputs
            .iter()
            .map(|&c| {
                buf(
                    "input",
                    padded(c),
                    wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                )
            })
            .collect();
        let outputs: Vec<_> = layout
            .outputs
            .iter()
            .map(|&(c, _)| {
                buf(
                    "output",
                    padded(c),
                    wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_SRC
                        | wgpu::BufferUsages::COPY_DST,
                )
            })
            .collect();
        let mut offsets = Vec::new();
        let mut total = 0;
        for &(c, _) in &layout.outputs {
            offsets.push(total);
            total += padded(c).div_ceil(READBACK_ALIGN) * READBACK_ALIGN;
        }
        let readback = buf(
            "readback",
            total.max(16),
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let mut entries = vec![wgpu::BindGroupEntry {
            binding: 0,
            resource: uniform.as_entire_binding(),
        }];
        for (k, b) in inputs.iter().chain(outputs.iter()).enumerate() {
            entries.push(wgpu::BindGroupEntry {
                binding: k as u32 + 1,
                resource: b.as_entire_binding(),
            });
        }
        let bind_group = d.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Ok(Slot {
            uniform,
            inputs,
            outputs,
            readback,
            offsets,
            bind_group,
            pending: None,
        })
    }

    fn launch(
        &self,
        pipeline: &wgpu::ComputePipeline,
        layout: &StreamLayout,
        slot: &mut Slot,
        index: usize,
        chunk: Chunk<'_>,
    ) -> Result<()> {
        let q = &self.queue;
        if chunk.params.len() as u64 > UNIFORM_BYTES || chunk.inputs.len() != slot.inputs.len() {
            return Err(Error::Gpu(
                "kernel parameters do not match its layout".into(),
            ));
        }
        let mut params = chunk.params.clone();
        params.resize(params.len().div_ceil(16).max(1) * 16, 0);
        q.write_buffer(&slot.uniform, 0, &params);
        for (k, input) in chunk.inputs.iter().enumerate() {
            for (offset, data) in &input.parts {
                let end = offset + data.len() as u64;
                if end > layout.inputs[k] || offset % 4 != 0 {
                    return Err(Error::Gpu(format!(
                        "chunk input {k}: bytes {offset}..{end} do not fit its binding of {}",
                        layout.inputs[k]
                    )));
                }
                // write_buffer takes multiples of 4 bytes: the aligned body as
                // is, the tail padded with zeros.
                let body = data.len() / 4 * 4;
                if body > 0 {
                    q.write_buffer(&slot.inputs[k], *offset, &data[..body]);
                }
                if body < data.len() {
                    let mut tail = [0u8; 4];
                    tail[..data.len() - body].copy_from_slice(&data[body..]);
                    q.write_buffer(&slot.inputs[k], offset + body as u64, &tail);
                }
            }
        }
        let mut enc = self
            .device
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: None });
        for (k, &(_, clear)) in layout.outputs.iter().enumerate() {
            if clear {
                enc.clear_buffer(&slot.outputs[k], 0, None);
            }
        }
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor::default());
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &slot.bind_group, &[]);
            pass.dispatch_workgroups(chunk.workgroups.max(1), 1, 1);
        }
        let mut end = 0;
        for (k, &r) in chunk.read.iter().enumerate() {
            let r4 = r.div_ceil(4) * 4;
            if r4 > 0 {
                enc.copy_buffer_to_buffer(&slot.outputs[k], 0, &slot.readback, slot.offsets[k], r4);
                end = end.max(slot.offsets[k] + r4);
            }
        }
        let mapped: MapResult = Arc::new((Mutex::new(None), Condvar::new()));
        let mapped_len = end.div_ceil(8) * 8;
        if end > 0 {
            let m = mapped.clone();
            enc.map_buffer_on_submit(
                &slot.readback,
                wgpu::MapMode::Read,
                0..mapped_len,
                move |r| {
                    *m.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                    m.1.notify_all();
                },
            );
        }
        let submission = q.submit([enc.finish()]);
        slot.pending = Some(Pending {
            index,
            mapped_len,
            submission,
            read: chunk.read,
            mapped,
        });
        Ok(())
    }

    fn finish(
        &self,
        slot: &Slot,
        p: Pending,
        sink: &mut impl FnMut(usize, &[&[u8]]) -> Result<()>,
    ) -> Result<()> {
        self.device
            .poll(wgpu::PollType::Wait {
                submission_index: Some(p.submission),
                timeout: Some(POLL_TIMEOUT),
            })
            .map_err(|e| Error::Gpu(format!("waiting for the GPU: {e}")))?;
        self.check()?;
        if p.read.iter().all(|&r| r == 0) {
            return sink(p.index, &vec![&[][..]; p.read.len()]);
        }
        let started = std::time::Instant::now();
        let mut done = p.mapped.0.lock().unwrap_or_else(|e| e.into_inner());
        while done.is_none() {
            if started.elapsed() > POLL_TIMEOUT {
                return Err(Error::Gpu("readback never completed".into()));
            }
            // Another thread is running our callback, or nobody polled yet.
            drop(done);
            let _ = self.device.poll(wgpu::PollType::Poll);
            done = p.mapped.0.lock().unwrap_or_else(|e| e.into_inner());
            if done.is_none() {
                done = p
                    .mapped
                    .1
                    .wait_timeout(done, Duration::from_millis(1))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        if let Some(Err(e)) = done.take() {
            return Err(Error::Gpu(format!("reading results back: {e}")));
        }
        drop(done);
        let result = {
            let view = slot
                .readback
                .get_mapped_range(0..p.mapped_len)
                .map_err(|e| Error::Gpu(format!("reading results back: {e}")))?;
            let outs: Vec<&[u8]> = p
                .read
                .iter()
                .enumerate()
                .map(|(k, &r)| &view[slot.offsets[k] as usize..(slot.offsets[k] + r) as usize])
                .collect();
            sink(p.index, &outs)
        };
        slot.readback.unmap();
        result
    }
}
