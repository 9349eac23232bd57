//! The CPU backend: the default that works on every machine, and the reference the suite trusts
//! after the f64 oracle.
//!
//! Buffers are host memory; every op runs [`moe_hal::host`] on rayon's thread pool and completes
//! before it returns (so `synchronize` has nothing to wait for). Every storage dtype (f32, f16,
//! bf16, and F8E4M3 with block scales, decoded in the x86 register tiles), f32
//! accumulation by default, f64 with [`CpuBackend::with_accumulate`].

#![warn(missing_docs)]
use moe_hal::host::{self, Accumulate, Weights};
use moe_hal::{Backend, BackendInfo, DType, Error, Op, Result, Routing, Tensor};

/// A host allocation, 4-byte aligned so it can be viewed as f32, u32, f16 or bf16.
pub struct CpuBuffer {
    words: Vec<u32>,
    bytes: usize,
    /// Whether no byte is an E4M3 NaN, found by `upload` for F8E4M3 tensors (else on the first
    /// use as F8E4M3 weights) and kept until the buffer is next written (every `&mut` accessor
    /// and `copy` forget it). Lets the tiles take their
    /// short decode without scanning the weights on every call.
    nan_free: std::sync::OnceLock<bool>,
}

impl CpuBuffer {
    fn new(bytes: usize) -> Result<Self> {
        let n = bytes.div_ceil(4);
        let mut words = Vec::new();
        words.try_reserve_exact(n).map_err(|_| Error::OutOfMemory(format!("the host cannot allocate {bytes} bytes")))?;
        words.resize(n, 0);
        Ok(CpuBuffer { words, bytes, nan_free: std::sync::OnceLock::new() })
    }

    fn as_bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.words)[..self.bytes]
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        self.nan_free.take();
        &mut bytemuck::cast_slice_mut(&mut self.words)[..self.bytes]
    }

    fn f32(&self) -> &[f32] {
        bytemuck::cast_slice(&self.words[..self.bytes / 4])
    }

    fn f32_mut(&mut self) -> &mut [f32] {
        self.nan_free.take();
        bytemuck::cast_slice_mut(&mut self.words[..self.bytes / 4])
    }

    fn u32(&self) -> &[u32] {
        &self.words[..self.bytes / 4]
    }

    fn u32_mut(&mut self) -> &mut [u32] {
        self.nan_free.take();
        &mut self.words[..self.bytes / 4]
    }

    /// Whether no byte is an E4M3 NaN (a parallel scan the first time, then cached).
    fn nan_free(&self) -> bool {
        use rayon::prelude::*;
        if let Some(&known) = self.nan_free.get() {
            return known;
        }
        // Scanned outside `get_or_init`: the scan is a rayon job, and a rayon thread waiting in
        // it may steal another forward on the same weights, whose `get_or_init` would re-enter
        // this one's (a deadlock). Two threads may both scan; both find the same answer.
        let known = !self.as_bytes().par_chunks(1 << 16).any(moe_hal::fp8::any_nan);
        let _ = self.nan_free.set(known);
        known
    }

    fn weights(&self, dtype: DType) -> Weights<'_> {
        match dtype {
            DType::F16 => Weights::F16(bytemuck::cast_slice(self.as_bytes())),
            DType::BF16 => Weights::BF16(bytemuck::cast_slice(self.as_bytes())),
            _ => Weights::F32(self.f32()),
        }
    }
}

/// Copies `src` into `dst` (same length) without reading `dst` first. A plain store to memory
/// that is not cached reads its line before writing it (a "read for ownership"), so a copy of
/// `n` bytes moves `3n` through DRAM; non-temporal stores (x86, SSE2: every x86_64) write
/// whole lines and move `2n`. `moe bench` counts a copy as `2n` to find the bandwidth its
/// roofline floor uses, so with plain stores it understated this machine's bandwidth (and made
/// floors too slow: fractions of the floor above 1 at decode).
fn stream_copy(src: &[u32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        // Plain copies up to the first 16-byte aligned word of dst, and after the last whole
        // 16 bytes.
        let head = dst.as_ptr().align_offset(16).min(dst.len());
        let body = (dst.len() - head) / 4 * 4;
        dst[..head].copy_from_slice(&src[..head]);
        for i in (head..head + body).step_by(4) {
            // SAFETY: i + 4 <= head + body <= len for both slices; dst[i..] is 16-byte aligned
            // (head aligned it, and i advances by 16 bytes); SSE2 is part of x86_64.
            unsafe {
                let v = _mm_loadu_si128(src.as_ptr().add(i) as *const __m128i);
                _mm_stream_si128(dst.as_mut_ptr().add(i) as *mut __m128i, v);
            }
        }
        dst[head + body..].copy_from_slice(&src[head + body..]);
        // Order the streaming stores before anything after the copy.
        // SAFETY: SSE2, part of x86_64.
        unsafe { _mm_sfence() };
    }
    #[cfg(not(target_arch = "x86_64"))]
    dst.copy_from_slice(src);
}

/// The host view of a weight tensor: its elements, with the block scales of F8E4M3.
fn weights(w: &Tensor<CpuBackend>) -> Weights<'_> {
    match &w.scales {
        Some(s) => Weights::F8E4M3 {
            q: w.buf.as_bytes(),
            scales: s.tensor.buf.f32(),
            rows_cols: [w.shape[w.shape.len() - 2], w.shape[w.shape.len() - 1]],
            block: s.block,
            nan_free: w.buf.nan_free(),
        },
        None => w.buf.weights(w.dtype),
    }
}

/// The CPU backend.
pub struct CpuBackend {
    info: BackendInfo,
    accumulate: Accumulate,
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl CpuBackend {
    /// A backend on all of rayon's threads, accumulating in f32.
    pub fn new() -> Self {
        let threads = rayon::current_num_threads();
        let memory = moe_hal::host::memory_bytes();
        CpuBackend {
            info: BackendInfo {
                name: "cpu".into(),
                device: format!("host CPU, {threads} thread{}", if threads == 1 { "" } else { "s" }),
                memory_bytes: memory,
                shares_host_memory: true,
                max_buffer_bytes: memory,
                subgroup_size: None,
                features: vec![
                    "f32".into(),
                    "f16".into(),
                    "bf16".into(),
                    "f8_e4m3 (block scales)".into(),
                    "f64-accumulate".into(),
                    format!("gemm kernels: {}", moe_hal::host::isa()),
                ],
            },
            accumulate: Accumulate::F32,
        }
    }

    /// Chooses the GEMM accumulator (f64 for a reference run).
    pub fn with_accumulate(mut self, accumulate: Accumulate) -> Self {
        self.accumulate = accumulate;
        self
    }
}

impl Backend for CpuBackend {
    type Buffer = CpuBuffer;

    fn info(&self) -> &BackendInfo {
        &self.info
    }

    fn supports(&self, _op: Op, dtype: DType) -> bool {
        dtype.is_weight()
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<CpuBuffer> {
        CpuBuffer::new(dtype.tensor_bytes(shape)?)
    }

    fn buffer_bytes(&self, buf: &CpuBuffer) -> Option<usize> {
        Some(buf.bytes)
    }

    fn upload(&self, dtype: DType, shape: &[usize], host: &[u8]) -> Result<CpuBuffer> {
        let mut b = self.alloc(dtype, shape)?;
        if host.len() != b.bytes {
            return moe_hal::invalid!("upload of {} bytes into a {dtype} tensor of shape {shape:?} ({} bytes)", host.len(), b.bytes);
        }
        // In parallel chunks; F8E4M3 weights are scanned for NaN bytes as each chunk is copied
        // (while it is in cache), so the first layer call does not pay a pass over them.
        use rayon::prelude::*;
        let f8 = dtype == DType::F8E4M3;
        // (map + reduce, never `any`: it would stop copying at the first NaN.)
        let nan = b
            .as_bytes_mut()
            .par_chunks_mut(1 << 16)
            .zip(host.par_chunks(1 << 16))
            .map(|(d, h)| {
                d.copy_from_slice(h);
                f8 && moe_hal::fp8::any_nan(h)
            })
            .reduce(|| false, |a, b| a || b);
        if f8 {
            let _ = b.nan_free.set(!nan);
        }
        Ok(b)
    }

    fn download(&self, buf: &CpuBuffer, host: &mut [u8]) -> Result<()> {
        if host.len() != buf.bytes {
            return moe_hal::invalid!("download into {} bytes from a buffer of {} bytes", host.len(), buf.bytes);
        }
        host.copy_from_slice(buf.as_bytes());
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    fn copy(&self, src: &CpuBuffer, dst: &mut CpuBuffer) -> Result<()> {
        if src.bytes != dst.bytes {
            return moe_hal::invalid!("copy from {} bytes into {} bytes", src.bytes, dst.bytes);
        }
        // Parallel, so the measured bandwidth is the machine's, not one core's.
        use rayon::prelude::*;
        dst.nan_free.take();
        dst.words.par_chunks_mut(1 << 16).zip(src.words.par_chunks(1 << 16)).for_each(|(d, s)| stream_copy(s, d));
        Ok(())
    }

    fn router_topk(
        &self,
        logits: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        routing: &Routing,
        topk_ids: &mut Tensor<Self>,
        topk_weights: &mut Tensor<Self>,
    ) -> Result<()> {
        host::router_topk(
            logits.buf.f32(),
            logits.shape[1],
            bias.map(|b| b.buf.f32()),
            routing,
            topk_ids.buf.u32_mut(),
            topk_weights.buf.f32_mut(),
        );
        Ok(())
    }

    fn permute(
        &self,
        topk_ids: &Tensor<Self>,
        expert_offsets: &mut Tensor<Self>,
        row_index: &mut Tensor<Self>,
        token_index: &mut Tensor<Self>,
    ) -> Result<()> {
        let experts = expert_offsets.len() - 1;
        host::permute(
            topk_ids.buf.u32(),
            experts,
            expert_offsets.buf.u32_mut(),
            row_index.buf.u32_mut(),
            token_index.buf.u32_mut(),
            topk_ids.shape[1],
        )
    }

    fn grouped_gemm(
        &self,
        x: &Tensor<Self>,
        token_index: Option<&Tensor<Self>>,
        w: &Tensor<Self>,
        expert_offsets: Option<&Tensor<Self>>,
        y: &mut Tensor<Self>,
    ) -> Result<()> {
        let n = y.shape[1];
        host::grouped_gemm(
            x.buf.f32(),
            x.shape[1],
            token_index.map(|t| t.buf.u32()),
            weights(w),
            n,
            expert_offsets.map(|t| t.buf.u32()),
            y.buf.f32_mut(),
            self.accumulate,
        )
    }

    fn activation(&self, gate_up: &Tensor<Self>, h: &mut Tensor<Self>) -> Result<()> {
        let i = h.shape[1];
        host::activation(gate_up.buf.f32(), i, h.buf.f32_mut());
        Ok(())
    }

    fn combine(
        &self,
        y: &Tensor<Self>,
        row_index: &Tensor<Self>,
        topk_weights: &Tensor<Self>,
        shared: Option<&Tensor<Self>>,
        out: &mut Tensor<Self>,
    ) -> Result<()> {
        host::combine(
            y.buf.f32(),
            y.shape[1],
            row_index.buf.u32(),
            topk_weights.buf.f32(),
            topk_weights.shape[1],
            shared.map(|s| s.buf.f32()),
            out.buf.f32_mut(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_hal::HostTensor;

    /// An upload of more than one chunk with a NaN byte in its first chunk still copies every
    /// byte (the parallel NaN scan runs beside the copy and must not cut it short).
    #[test]
    fn upload_copies_everything_past_a_nan() {
        let b = CpuBackend::new();
        let n = 3 << 16;
        let mut q: Vec<u8> = (0..n).map(|i| (i % 0x7E) as u8).collect();
        q[1] = 0xFF;
        let buf = b.upload(DType::F8E4M3, &[3, 1 << 16], &q).unwrap();
        assert_eq!(buf.as_bytes(), &q[..]);
        assert_eq!(buf.nan_free.get(), Some(&false));
        q[1] = 0;
        let buf = b.upload(DType::F8E4M3, &[3, 1 << 16], &q).unwrap();
        assert_eq!(buf.nan_free.get(), Some(&true));
        assert!(b.upload(DType::U32, &[4], &[0xFF; 16]).unwrap().nan_free.get().is_none(), "only F8E4M3 is scanned");
    }

    /// The streaming copy at every alignment of the destination and lengths around its 16-byte
    /// steps: every word lands, nothing past the end is touched.
    #[test]
    fn stream_copy_copies_every_word() {
        let src: Vec<u32> = (0..64).map(|i: u32| i.wrapping_mul(2654435761) ^ 0x5bd1e995).collect();
        for offset in 0..4 {
            for len in 0..40 {
                let mut dst = [0xDEAD_BEEFu32; 48];
                stream_copy(&src[..len], &mut dst[offset..offset + len]);
                assert_eq!(&dst[offset..offset + len], &src[..len], "offset {offset} len {len}");
                assert!(dst[..offset].iter().chain(&dst[offset + len..]).all(|&w| w == 0xDEAD_BEEF), "offset {offset} len {len}");
            }
        }
    }

    /// The NaN-free answer cached on an F8E4M3 buffer (which picks the tiles' short decode)
    /// is forgotten when the buffer is written: a NaN byte copied in afterwards makes its weight
    /// row's outputs NaN, as the format says, instead of reading as 480.
    #[test]
    fn a_nan_written_into_cached_weights_is_seen() {
        let b = CpuBackend::new();
        let (n, k) = (4, 48);
        let values: Vec<f32> = (0..n * k).map(|i| ((i * 7 % 13) as f32 - 6.0) / 8.0).collect();
        let host = HostTensor::quantize(&[n, k], &values, [2, 16]).unwrap();
        let mut w = Tensor::from_host(&b, &host).unwrap();
        let x = Tensor::from_f32(&b, DType::F32, &[2, k], &vec![1.0; 2 * k]).unwrap();
        let mut y = Tensor::alloc(&b, DType::F32, &[2, n]).unwrap();
        b.grouped_gemm(&x, None, &w, None, &mut y).unwrap();
        assert!(y.to_f32(&b).unwrap().iter().all(|v| v.is_finite()));
        assert!(w.buf.nan_free.get() == Some(&true), "upload (or the first call) caches the answer");

        let mut q = host.data.clone();
        q[2 * k + 5] = 0x7F;
        let src = b.upload(DType::F8E4M3, &[n, k], &q).unwrap();
        assert_eq!(src.nan_free.get(), Some(&false), "upload scans F8E4M3 bytes");
        assert_eq!(src.as_bytes(), &q[..]);
        b.copy(&src, &mut w.buf).unwrap();
        b.grouped_gemm(&x, None, &w, None, &mut y).unwrap();
        let got = y.to_f32(&b).unwrap();
        for (i, v) in got.iter().enumerate() {
            assert_eq!(v.is_nan(), i % n == 2, "y[{i}] = {v}");
        }
    }

    /// The CPU's memory is the host's: a layer is refused before upload when its host copy and
    /// the backend's would not both fit, not left to exhaust the machine.
    #[test]
    fn upload_counts_the_host_copy() {
        use moe_hal::{HostLayer, Layer, MoeConfig, Routing};
        let config = MoeConfig {
            hidden: 64,
            intermediate: 32,
            experts: 4,
            top_k: 2,
            routing: Routing::Softmax { norm_topk_prob: true },
            shared_intermediate: 0,
        };
        let t = |shape: &[usize]| HostTensor::from_f32(DType::BF16, shape, &vec![0.5; shape.iter().product()]).unwrap();
        let host = HostLayer {
            config: config.clone(),
            dtype: DType::BF16,
            router: t(&[4, 64]),
            bias: None,
            gate_up: t(&[4, 64, 64]),
            down: t(&[4, 64, 32]),
            shared_gate_up: None,
            shared_down: None,
        };
        let need = config.weight_bytes(DType::BF16);
        let mut b = CpuBackend::new();
        assert!(b.info.shares_host_memory);
        b.info.memory_bytes = need * 3 / 2;
        let e = Layer::upload(&b, &host).err().expect("two copies do not fit 1.5x").to_string();
        assert!(e.contains("twice while they upload"), "{e}");
        b.info.memory_bytes = need * 2;
        Layer::upload(&b, &host).unwrap();
    }
}
