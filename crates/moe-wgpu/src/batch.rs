//! One command buffer per layer: while `forward` runs, ops record into one encoder, and the
//! layer's scratch buffers are recycled from the previous layer's.
//!
//! Outside a batch each op submits its own command buffer (one `queue.submit` per op). Inside
//! [`moe_hal::Backend::forward`] the calling thread owns a batch: every op records its compute
//! pass into the batch's encoder and the layer is submitted once, at the end. A layer is about ten
//! ops, and at decode its GPU time (~0.2 ms for DeepSeek-V3 on an H200) is comparable to the host
//! cost of ten submits, so this is what lets the device, not wgpu's bookkeeping, set the pace.
//!
//! Order stays call order, which is the contract:
//! * nothing in this backend writes through the queue (uploads fill buffers mapped at creation,
//!   kernel parameters are immediates or get their own buffers), so no queue write can overtake
//!   recorded work;
//! * every call that submits its own commands (download, synchronize, copy) first submits the
//!   calling thread's open batch ([`Batches::flush`]).
//!
//! One batch exists at a time. Another thread's ops, or a nested `forward`, simply run unbatched.
//! Buffers an op bound are kept until the batch is submitted (scratch tensors are dropped by the
//! op as soon as it has recorded).
//!
//! **Scratch recycling.** A layer allocates about ten scratch tensors, and every decode step
//! allocates the same ones again: each a buffer created and destroyed, and (wgpu zero-fills every
//! new buffer before its first use, not knowing a kernel will write it) a fill recorded for each.
//! So the batch owner's scratch is recycled: a buffer it drops goes to the batch's `released`
//! list, and buffers it allocates come from there or from `free`, what the previous batch
//! released, when one of the size (or up to twice it) is there. Only the owner takes or gives,
//! so a recycled buffer is only ever used by commands recorded after those of its last user, in
//! the same command buffer or a later one: queue order keeps them apart. When a batch ends, its
//! released buffers become `free` and the previous `free` ones are dropped: the backend keeps at
//! most one layer's scratch between calls ([`crate::WgpuBackend::release_scratch`] drops that
//! too).

use std::sync::Mutex;
use std::thread::ThreadId;

struct Batch {
    owner: ThreadId,
    enc: wgpu::CommandEncoder,
    keep: Vec<wgpu::Buffer>,
    /// Scratch buffers the owner dropped during this batch, free for its later commands.
    released: Vec<wgpu::Buffer>,
}

/// The open batch, if any, and the scratch buffers the last batch released.
#[derive(Default)]
pub(crate) struct Batches {
    open: Mutex<Option<Batch>>,
    free: Mutex<Vec<wgpu::Buffer>>,
}

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
            *self.batches.free() = b.released;
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
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn free(&self) -> std::sync::MutexGuard<'_, Vec<wgpu::Buffer>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the calling thread owns the open batch (its allocations are then recycled).
    pub fn owned_here(&self) -> bool {
        self.lock().as_ref().is_some_and(|b| b.owner == std::thread::current().id())
    }

    /// A recycled buffer of at least `size` bytes for the batch owner, one its batch released or
    /// one the previous batch did: the smallest there, if it is at most twice `size` (so a layer
    /// called with a few tokens more or less than the last still finds its buffers, and no small
    /// tensor pins a large one). `None` for other threads, or when there is none.
    ///
    /// A larger buffer is harmless: kernels index by their parameters, never by a binding's
    /// length, and only the tensor's own bytes are copied or read back.
    pub fn take(&self, size: u64) -> Option<wgpu::Buffer> {
        let mut slot = self.lock();
        let b = slot.as_mut().filter(|b| b.owner == std::thread::current().id())?;
        let mut free = self.free();
        let fits = |x: &wgpu::Buffer| x.size() >= size && x.size() <= size.saturating_mul(2);
        let best = |list: &[wgpu::Buffer]| {
            list.iter().enumerate().filter(|(_, x)| fits(x)).min_by_key(|(_, x)| x.size()).map(|(i, x)| (i, x.size()))
        };
        match (best(&b.released), best(&free)) {
            (Some((i, s)), f) if f.is_none_or(|(_, fs)| s <= fs) => Some(b.released.swap_remove(i)),
            (_, Some((i, _))) => Some(free.swap_remove(i)),
            _ => None,
        }
    }

    /// Takes back a scratch buffer its owner drops, when the caller owns the open batch; other
    /// buffers are simply dropped (wgpu frees them once the work using them is done).
    pub fn give(&self, buf: wgpu::Buffer) {
        let mut slot = self.lock();
        if let Some(b) = slot.as_mut().filter(|b| b.owner == std::thread::current().id()) {
            b.released.push(buf);
        }
    }

    /// Drops the recycled buffers the last batch left.
    pub fn release_free(&self) {
        self.free().clear();
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
            *slot = Some(Batch { owner: std::thread::current().id(), enc, keep: Vec::new(), released: Vec::new() });
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
