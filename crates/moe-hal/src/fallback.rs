//! Host fallbacks: run any op through the reference on the host, for any backend.
//!
//! Each function downloads the op's inputs, runs [`crate::host`], and uploads the results into the
//! caller's output tensors (replacing their buffers). It is slow (two copies over the bus) but
//! correct, so a new port implements only memory, calls these from every op, passes the
//! conformance suite on day one, and then replaces ops one at a time. Call sites are explicit:
//! `grep -r fallback::` lists what a port still has to write.

use crate::host::{self, Accumulate, Weights};
use crate::{Backend, DType, Result, Routing, Tensor};
use half::{bf16, f16};

fn put<B: Backend + ?Sized>(b: &B, t: &mut Tensor<B>, bytes: &[u8]) -> Result<()> {
    t.buf = b.upload(t.dtype, &t.shape, bytes)?;
    Ok(())
}

/// [`Backend::router_topk`] through the host.
pub fn router_topk<B: Backend + ?Sized>(
    b: &B,
    logits: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    routing: &Routing,
    topk_ids: &mut Tensor<B>,
    topk_weights: &mut Tensor<B>,
) -> Result<()> {
    let l = logits.to_f32(b)?;
    let bias = bias.map(|t| t.to_f32(b)).transpose()?;
    let mut ids = vec![0u32; topk_ids.len()];
    let mut w = vec![0f32; topk_weights.len()];
    host::router_topk(&l, logits.shape[1], bias.as_deref(), routing, &mut ids, &mut w);
    put(b, topk_ids, bytemuck::cast_slice(&ids))?;
    put(b, topk_weights, bytemuck::cast_slice(&w))
}

/// [`Backend::permute`] through the host.
pub fn permute<B: Backend + ?Sized>(
    b: &B,
    topk_ids: &Tensor<B>,
    expert_offsets: &mut Tensor<B>,
    row_index: &mut Tensor<B>,
    token_index: &mut Tensor<B>,
) -> Result<()> {
    let ids = topk_ids.to_u32(b)?;
    let mut off = vec![0u32; expert_offsets.len()];
    let mut ri = vec![0u32; row_index.len()];
    let mut ti = vec![0u32; token_index.len()];
    host::permute(&ids, off.len() - 1, &mut off, &mut ri, &mut ti, topk_ids.shape[1])?;
    put(b, expert_offsets, bytemuck::cast_slice(&off))?;
    put(b, row_index, bytemuck::cast_slice(&ri))?;
    put(b, token_index, bytemuck::cast_slice(&ti))
}

/// [`Backend::grouped_gemm`] through the host.
pub fn grouped_gemm<B: Backend + ?Sized>(
    b: &B,
    x: &Tensor<B>,
    token_index: Option<&Tensor<B>>,
    w: &Tensor<B>,
    expert_offsets: Option<&Tensor<B>>,
    y: &mut Tensor<B>,
) -> Result<()> {
    let xs = x.to_f32(b)?;
    let ti = token_index.map(|t| t.to_u32(b)).transpose()?;
    let off = expert_offsets.map(|t| t.to_u32(b)).transpose()?;
    // Copy into typed vectors: a byte vector carries no alignment guarantee.
    let wb = w.to_bytes(b)?;
    let (w32, w16, wbf): (Vec<f32>, Vec<f16>, Vec<bf16>) = match w.dtype {
        DType::F16 => (vec![], bytemuck::pod_collect_to_vec(&wb), vec![]),
        DType::BF16 => (vec![], vec![], bytemuck::pod_collect_to_vec(&wb)),
        DType::F8E4M3 => (vec![], vec![], vec![]),
        _ => (bytemuck::pod_collect_to_vec(&wb), vec![], vec![]),
    };
    let scales = w.scales.as_ref().map(|s| s.tensor.to_f32(b)).transpose()?.unwrap_or_default();
    let weights = match w.dtype {
        DType::F16 => Weights::F16(&w16),
        DType::BF16 => Weights::BF16(&wbf),
        DType::F8E4M3 => Weights::F8E4M3 {
            q: &wb,
            scales: &scales,
            rows_cols: [w.shape[w.shape.len() - 2], w.shape[w.shape.len() - 1]],
            block: w.scales.as_ref().map_or([1, 1], |s| s.block),
            nan_free: !crate::fp8::any_nan(&wb),
        },
        _ => Weights::F32(&w32),
    };
    let n = y.shape[1];
    let mut ys = vec![0f32; y.len()];
    host::grouped_gemm(&xs, x.shape[1], ti.as_deref(), weights, n, off.as_deref(), &mut ys, Accumulate::F32)?;
    put(b, y, bytemuck::cast_slice(&ys))
}

/// [`Backend::activation`] through the host.
pub fn activation<B: Backend + ?Sized>(b: &B, gate_up: &Tensor<B>, h: &mut Tensor<B>) -> Result<()> {
    let gu = gate_up.to_f32(b)?;
    let mut hs = vec![0f32; h.len()];
    host::activation(&gu, h.shape[1], &mut hs);
    put(b, h, bytemuck::cast_slice(&hs))
}

/// [`Backend::combine`] through the host.
pub fn combine<B: Backend + ?Sized>(
    b: &B,
    y: &Tensor<B>,
    row_index: &Tensor<B>,
    topk_weights: &Tensor<B>,
    shared: Option<&Tensor<B>>,
    out: &mut Tensor<B>,
) -> Result<()> {
    let ys = y.to_f32(b)?;
    let ri = row_index.to_u32(b)?;
    let w = topk_weights.to_f32(b)?;
    let s = shared.map(|t| t.to_f32(b)).transpose()?;
    let mut o = vec![0f32; out.len()];
    host::combine(&ys, y.shape[1], &ri, &w, topk_weights.shape[1], s.as_deref(), &mut o)?;
    put(b, out, bytemuck::cast_slice(&o))
}
