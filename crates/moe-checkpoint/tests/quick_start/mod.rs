//! README.md's "Use it as a library", verbatim below this header (load.rs checks that the two
//! match, and runs it on a fixture against transformers' output).

use moe_hal::{Backend, DType, Layer, Result, Tensor};
use std::path::Path;

/// One MoE layer on any backend: `x` is [tokens, hidden] f32, row-major; returns the output
/// [tokens, hidden] and each token's chosen experts [tokens, top_k].
pub fn moe_layer<B: Backend>(backend: &B, layer: &Layer<B>, x: &[f32]) -> Result<(Vec<f32>, Vec<u32>)> {
    let (h, k) = (layer.config.hidden, layer.config.top_k);
    let t = x.len() / h;
    let x = Tensor::from_f32(backend, DType::F32, &[t, h], x)?;
    let mut out = Tensor::alloc(backend, DType::F32, &[t, h])?;
    let mut topk_ids = Tensor::alloc(backend, DType::U32, &[t, k])?;
    let mut topk_weights = Tensor::alloc(backend, DType::F32, &[t, k])?;
    // Checks every shape (an error names what is wrong), then runs the whole layer on the device.
    moe_hal::ops::forward(backend, layer, &x, &mut out, &mut topk_ids, &mut topk_weights)?;
    Ok((out.to_f32(backend)?, topk_ids.to_u32(backend)?))
}

/// Layer `n` of a Hugging Face checkpoint, on the CPU.
pub fn checkpoint_layer(model_dir: &Path, n: usize, x: &[f32]) -> Result<(Vec<f32>, Vec<u32>)> {
    // Memory-maps the checkpoint and reads only layer n's tensors, kept in their stored dtype.
    let ckpt = moe_checkpoint::load_layer(model_dir, n, None)?;
    // Or moe_wgpu::WgpuBackend::new()? or moe_cuda::CudaBackend::new()?: the rest is the same.
    let backend = moe_cpu::CpuBackend::new();
    // Upload once; every forward reuses it.
    let layer = Layer::upload(&backend, &ckpt.layer)?;
    moe_layer(&backend, &layer, x)
}
