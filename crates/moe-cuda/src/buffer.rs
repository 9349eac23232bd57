//! Device buffers.

use std::sync::Arc;

use crate::driver::Device;

/// A tensor's memory on the device: one allocation from the device's memory pool (or
/// `cuMemAlloc` on a device without pools), at least 16 bytes and a multiple of 16, aligned to at
/// least 256 bytes, so kernels may read it with 16-byte loads. Freed in stream order when dropped:
/// freeing does not wait for the device, except for a buffer allocated inside a graph capture
/// and kept by the caller (plain `cuMemAlloc` memory, whose free waits for the stream) and on a
/// device without memory pools. A buffer a live graph uses stays allocated until the last such
/// graph is dropped (see `crate::graph`).
pub struct CudaBuffer {
    pub(crate) ptr: u64,
    pub(crate) bytes: usize,
    pub(crate) dev: Arc<Device>,
}

impl CudaBuffer {
    pub(crate) fn new(dev: &Arc<Device>, bytes: usize) -> moe_hal::Result<CudaBuffer> {
        let ptr = dev.alloc_raw(bytes)?;
        Ok(CudaBuffer { ptr, bytes, dev: dev.clone() })
    }

    /// Logical size in bytes (without the padding to 16).
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// True when the buffer holds no bytes (it still owns a 16-byte allocation).
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The raw `CUdeviceptr`, for interoperation with other CUDA code on the same context and
    /// stream ordering (call `moe_hal::Backend::synchronize` on the backend before touching it elsewhere).
    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for CudaBuffer {
    fn drop(&mut self) {
        self.dev.free_raw(self.ptr);
    }
}
