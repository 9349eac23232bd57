//! One command buffer per layer: while `forward` runs, ops record into one encoder.
//!
//! Outside a batch each op submits its own command buffer (one `queue.submit` per op). Inside
//! [`moe_hal::Backend::forward`] the calling thread owns a batch: every op records its compute
//! pass into the batch's encoder and the layer is submitted once, at the end. A layer is about ten
//! ops, and at decode its GPU time (~0.2 ms for DeepSeek-V3 on an H200) is comparable to the host
//! cost of ten submits, so this is what lets the device, not wgpu's bookkeeping, set the pace.
//!
//! Order stays call order, which is the contract:
//! * nothing in this backend writes through the queue (uploads fill buffers mapped at creation,
//!   kernel parameters get their own buffers), so no queue write can overtake recorded work;
//! * every call that submits its own commands (download, synchronize, copy) first submits the
//!   calling thread's open batch ([`Batches::flush`]).
//!
//! One batch exists at a time. Another thread's ops, or a nested `forward`, simply run unbatched.
//! Buffers an op bound are kept until the batch is submitted (scratch tensors are dropped by the
//! op as soon as it has recorded).

use std::sync::Mutex;
use std::thread::ThreadId;

struct Batch {
    owner: ThreadId,
    enc: wgpu::CommandEncoder,
    keep: Vec<wgpu::Buffer>,
}

/// The open batch, if any.
#[derive(Default)]
pub(crate) struct Batches(Mutex<Option<Batch>>);

/// Ends the batch it opened when dropped (also on an error or a panic inside `forward`):
/// submitted with [`BatchGuard::submit`], discarded otherwise.
pub(crate) struct BatchGuard<'a> {
    batches: &'a Batches,
    queue: &'a wgpu::Queue,
    mine: bool,
}

impl BatchGuard<'_> {
    /// Submits the batch (when this guard opened it).
    pub fn submit(mut self) {
        if std::mem::take(&mut self.mine)
            && let Some(b) = self.batches.take_own()
        {
            self.queue.submit([b.enc.finish()]);
        }
    }
}

impl Drop for BatchGuard<'_> {
    fn drop(&mut self) {
        if self.mine {
            // Not submitted: an op failed. Its outputs are undefined; the work is dropped.
            self.batches.take_own();
        }
    }
}

impl Batches {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Batch>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take_own(&self) -> Option<Batch> {
        let mut slot = self.lock();
        if slot.as_ref().is_some_and(|b| b.owner == std::thread::current().id()) { slot.take() } else { None }
    }

    /// Opens a batch for the calling thread unless one is open already (then ops run as they
    /// would without it, or into the outer batch of the same thread).
    pub fn begin<'a>(&'a self, device: &wgpu::Device, queue: &'a wgpu::Queue) -> BatchGuard<'a> {
        let mut slot = self.lock();
        let mine = slot.is_none();
        if mine {
            let enc = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("moe-wgpu layer") });
            *slot = Some(Batch { owner: std::thread::current().id(), enc, keep: Vec::new() });
        }
        BatchGuard { batches: self, queue, mine }
    }

    /// Records into the calling thread's open batch and keeps the buffers `bufs` yields alive
    /// until it is submitted; false (nothing recorded, `bufs` not called) when this thread has none.
    pub fn record<'b>(&self, bufs: impl FnOnce() -> Vec<&'b wgpu::Buffer>, f: impl FnOnce(&mut wgpu::CommandEncoder)) -> bool {
        let mut slot = self.lock();
        match slot.as_mut() {
            Some(b) if b.owner == std::thread::current().id() => {
                f(&mut b.enc);
                b.keep.extend(bufs().into_iter().cloned());
                true
            }
            _ => false,
        }
    }

    /// Submits what the calling thread's open batch holds so far and keeps the batch open with a
    /// fresh encoder, so that work submitted next runs after it.
    pub fn flush(&self, device: &wgpu::Device, queue: &wgpu::Queue) {
        let mut slot = self.lock();
        if let Some(b) = slot.as_mut().filter(|b| b.owner == std::thread::current().id()) {
            let fresh = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("moe-wgpu layer") });
            let enc = std::mem::replace(&mut b.enc, fresh);
            queue.submit([enc.finish()]);
            b.keep.clear();
        }
    }
}
