//! Device memory: native buffers inside error scopes, tensors split over them, scratch space, and
//! read-backs (which is where the device error flags are collected).

use moe_hal::{DType, Error, Result};

use crate::buffer::{self, Part, padded};
use crate::{WgpuBackend, WgpuBuffer, device};

impl WgpuBackend {
    /// Creates one native buffer inside error scopes: out of memory and validation failures come
    /// back as errors here rather than through the uncaptured handler.
    pub(crate) fn create(&self, size: u64, mapped: bool) -> Result<wgpu::Buffer> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let val = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        self.created.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-wgpu tensor"),
            size,
            usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: mapped,
        });
        let v = pollster::block_on(val.pop());
        let o = pollster::block_on(oom.pop());
        if let Some(e) = o {
            let _ = e;
            return Err(Error::OutOfMemory(format!("{} cannot allocate a buffer of {size} bytes", self.info.device)));
        }
        if let Some(e) = v {
            return Err(device::map_error(e));
        }
        Ok(buf)
    }

    /// A scratch buffer of at least `bytes`, for one op's intermediate data (recycled inside
    /// `forward`, as its tensors are).
    pub(crate) fn scratch(&self, bytes: u64) -> Result<WgpuBuffer> {
        if padded(bytes) > self.chunk {
            return Err(Error::Unsupported(format!(
                "a scratch buffer of {} MiB exceeds one storage binding of this adapter ({} MiB); run fewer tokens per call",
                bytes >> 20,
                self.chunk >> 20
            )));
        }
        self.make_buffer_within(DType::U32, &[bytes.div_ceil(4) as usize], None, self.chunk)
    }

    pub(crate) fn make_buffer(&self, dtype: DType, shape: &[usize], host: Option<&[u8]>) -> Result<WgpuBuffer> {
        let limit = if shape.len() >= 3 { self.expert_chunk } else { self.chunk };
        self.make_buffer_within(dtype, shape, host, limit)
    }

    /// [`Self::make_buffer`] with parts of at most `limit` bytes.
    pub(crate) fn make_buffer_within(&self, dtype: DType, shape: &[usize], host: Option<&[u8]>, limit: u64) -> Result<WgpuBuffer> {
        self.faults.take()?;
        // Checked first: the plan's products of dimensions are then bounded by it.
        let bytes = dtype.tensor_bytes(shape)?;
        let plan = buffer::plan(dtype, shape, limit)?;
        // Scratch inside the calling thread's `forward` is recycled (see `batch.rs`).
        let recycle = host.is_none() && self.batches.owned_here();
        let mut parts = Vec::with_capacity(plan.len());
        for (start, bytes) in plan {
            let recycled = if recycle { self.batches.take(padded(bytes as u64)) } else { None };
            let buf = match recycled {
                Some(b) => b,
                None => self.create(padded(bytes as u64), host.is_some())?,
            };
            if let Some(h) = host {
                let mut view = buf.get_mapped_range_mut(..).map_err(|e| Error::Driver(format!("cannot map a new buffer: {e}")))?;
                view.slice(..bytes).copy_from_slice(&h[start..start + bytes]);
                drop(view);
                buf.unmap();
            }
            parts.push(Part { buf, start, bytes });
        }
        Ok(WgpuBuffer { parts, bytes, recycle: recycle.then(|| self.batches.clone()) })
    }

    /// Submits `encoder` (which copies into `staging`), waits for it, and copies the first
    /// `dst.len()` bytes of `staging` into `dst`.
    ///
    /// The map callback may be run by another thread's `poll` (tests and callers share one
    /// backend across threads), possibly just after this thread's `poll` returned, so the result
    /// comes through a channel and this thread polls again until it arrives.
    pub(crate) fn read_back(&self, encoder: wgpu::CommandEncoder, staging: &wgpu::Buffer, dst: &mut [u8]) -> Result<()> {
        use std::sync::mpsc;
        use std::time::{Duration, Instant};
        let index = self.queue.submit([encoder.finish()]);
        let (tx, rx) = mpsc::channel();
        staging.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        let start = Instant::now();
        let mapped = loop {
            let polled = self.device.poll(wgpu::PollType::Wait { submission_index: Some(index.clone()), timeout: None });
            self.faults.take()?;
            polled.map_err(|e| Error::Driver(format!("waiting for the device failed: {e}")))?;
            match rx.recv_timeout(Duration::from_millis(5)) {
                Ok(r) => break r,
                Err(mpsc::RecvTimeoutError::Timeout) if start.elapsed() < Duration::from_secs(60) => continue,
                Err(_) => return Err(Error::Driver("the device finished its work but a read-back never completed".into())),
            }
        };
        mapped.map_err(|e| Error::Driver(format!("cannot map a read-back buffer: {e}")))?;
        {
            let view = staging.get_mapped_range(..).map_err(|e| Error::Driver(format!("cannot read a mapped buffer: {e}")))?;
            dst.copy_from_slice(&view[..dst.len()]);
        }
        staging.unmap();
        Ok(())
    }

    pub(crate) fn staging(&self, size: u64) -> Result<wgpu::Buffer> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buf = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-wgpu read-back"),
            size,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        if pollster::block_on(oom.pop()).is_some() {
            return Err(Error::OutOfMemory(format!("{} cannot allocate a read-back buffer of {size} bytes", self.info.device)));
        }
        Ok(buf)
    }

    /// Waits for everything submitted, reads and clears the device error flags, and returns the
    /// first failure: device lost, a recorded wgpu error, or a flag raised by a kernel.
    pub(crate) fn check_flags(&self) -> Result<()> {
        self.batches.flush(&self.device, &self.queue);
        let _guard = self.flag_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.faults.take()?;
        let size = (device::ERR_WORDS * 4) as u64;
        let staging = self.staging(size)?;
        let mut enc = self.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&self.errs, 0, &staging, 0, size);
        enc.clear_buffer(&self.errs, 0, None);
        let mut words = [0u8; device::ERR_WORDS * 4];
        self.read_back(enc, &staging, &mut words)?;
        let words: [u32; device::ERR_WORDS] = bytemuck::cast(words);
        moe_hal::flags::decode(&words)
    }
}
