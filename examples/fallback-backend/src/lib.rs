//! # fallback-backend: a port on its first day
//!
//! The worked example of `PORTING.md`: the smallest complete [`Backend`] that passes the whole
//! conformance suite. Its "device memory" is a plain host `Vec<u8>` and every op is one line that
//! calls the host fallback in [`moe_hal::fallback`] (download the inputs, run the reference in
//! [`moe_hal::host`], upload the outputs). A real port starts exactly here, with its own
//! allocation and copies in place of the `Vec`, and then replaces the `fallback::` lines one at a
//! time with native kernels, rerunning the suite after each:
//!
//! ```text
//! grep -n 'fallback::' src/lib.rs     # what is left to port
//! cargo test                          # tests/conformance.rs: the whole suite, one macro line
//! ```
//!
//! It is written the way an out-of-tree crate would be: it depends only on `moe-hal` (and on
//! `moe-conformance` for its tests) and uses nothing private of either.

use moe_hal::{Backend, BackendInfo, DType, Error, Op, Result, Routing, Tensor, fallback};

/// A buffer in host memory standing in for a device allocation: little-endian bytes.
///
/// The fallback replaces an op's output buffers with freshly uploaded ones, so a buffer is never
/// written in place and needs no interior mutability. A native port's buffer is a device pointer
/// (plus its size) instead, freed on drop.
pub struct HostBuffer {
    bytes: Vec<u8>,
}

impl HostBuffer {
    /// An empty buffer with room for `len` bytes; running out of host memory is
    /// [`Error::OutOfMemory`], never an abort.
    fn with_capacity(len: usize) -> Result<Self> {
        let mut bytes = Vec::new();
        bytes.try_reserve_exact(len).map_err(|_| Error::OutOfMemory(format!("the host cannot allocate {len} bytes")))?;
        Ok(HostBuffer { bytes })
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// True for a zero-byte buffer (a tensor with no elements).
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

/// The example backend: memory is host memory, every op runs through [`moe_hal::fallback`].
pub struct FallbackBackend {
    info: BackendInfo,
}

impl Default for FallbackBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl FallbackBackend {
    /// The name on the command line and in reports.
    pub const NAME: &'static str = "fallback";

    /// A new backend. A real port opens its device here and returns
    /// [`Error::Unavailable`] when there is none (the suite then skips it with that sentence).
    pub fn new() -> Self {
        let memory = moe_hal::host::memory_bytes();
        FallbackBackend {
            info: BackendInfo {
                name: Self::NAME.into(),
                device: "host memory; every op through moe_hal::fallback".into(),
                memory_bytes: memory,
                shares_host_memory: true,
                max_buffer_bytes: memory,
                subgroup_size: None,
                features: vec![],
            },
        }
    }
}

impl Backend for FallbackBackend {
    type Buffer = HostBuffer;

    /// Name, device, memory and limits.
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// Every op, for every storage dtype: the fallback runs them all.
    fn supports(&self, _op: Op, dtype: DType) -> bool {
        dtype.is_weight()
    }

    /// Step 1 of a port: allocation (here a zeroed `Vec`; a device may leave it uninitialised).
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<HostBuffer> {
        let len = dtype.tensor_bytes(shape)?;
        let mut b = HostBuffer::with_capacity(len)?;
        b.bytes.resize(len, 0);
        Ok(b)
    }

    /// Step 1 of a port: host-to-device copy. `host` has exactly the tensor's size (the caller,
    /// [`Tensor::upload`], checked it).
    fn upload(&self, _dtype: DType, _shape: &[usize], host: &[u8]) -> Result<HostBuffer> {
        let mut b = HostBuffer::with_capacity(host.len())?;
        b.bytes.extend_from_slice(host);
        Ok(b)
    }

    /// Step 1 of a port: the size a buffer was made for, so `moe_hal::ops` can check each
    /// tensor's shape against its buffer.
    fn buffer_bytes(&self, buf: &HostBuffer) -> Option<usize> {
        Some(buf.bytes.len())
    }

    /// Step 1 of a port: device-to-host copy, after all enqueued work (none here: every op
    /// completes before it returns).
    fn download(&self, buf: &HostBuffer, host: &mut [u8]) -> Result<()> {
        if host.len() != buf.bytes.len() {
            return moe_hal::invalid!("download into {} bytes from a buffer of {} bytes", host.len(), buf.bytes.len());
        }
        host.copy_from_slice(&buf.bytes);
        Ok(())
    }

    /// Step 1 of a port: wait for the device. Nothing is ever in flight here.
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Step 2: through the host.
    fn router_topk(
        &self,
        logits: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        routing: &Routing,
        topk_ids: &mut Tensor<Self>,
        topk_weights: &mut Tensor<Self>,
    ) -> Result<()> {
        fallback::router_topk(self, logits, bias, routing, topk_ids, topk_weights)
    }

    /// Step 2: through the host.
    fn permute(
        &self,
        topk_ids: &Tensor<Self>,
        expert_offsets: &mut Tensor<Self>,
        row_index: &mut Tensor<Self>,
        token_index: &mut Tensor<Self>,
    ) -> Result<()> {
        fallback::permute(self, topk_ids, expert_offsets, row_index, token_index)
    }

    /// Step 2: through the host.
    fn grouped_gemm(
        &self,
        x: &Tensor<Self>,
        token_index: Option<&Tensor<Self>>,
        w: &Tensor<Self>,
        expert_offsets: Option<&Tensor<Self>>,
        y: &mut Tensor<Self>,
    ) -> Result<()> {
        fallback::grouped_gemm(self, x, token_index, w, expert_offsets, y)
    }

    /// Step 2: through the host.
    fn activation(&self, gate_up: &Tensor<Self>, h: &mut Tensor<Self>) -> Result<()> {
        fallback::activation(self, gate_up, h)
    }

    /// Step 2: through the host.
    fn combine(
        &self,
        y: &Tensor<Self>,
        row_index: &Tensor<Self>,
        topk_weights: &Tensor<Self>,
        shared: Option<&Tensor<Self>>,
        out: &mut Tensor<Self>,
    ) -> Result<()> {
        fallback::combine(self, y, row_index, topk_weights, shared, out)
    }

    // `forward` keeps the trait's default, `moe_hal::forward::composed`: the five ops above in
    // sequence. A port overrides it last, to fuse ops, once each op is native.
}
