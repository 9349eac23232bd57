//! The whole layer composed from the five ops: the default [`Backend::forward`].

use crate::{Backend, DType, Layer, Result, Tensor};

/// Runs one MoE layer as the sequence of trait ops, allocating its scratch tensors on `backend`:
///
/// ```text
/// logits      = grouped_gemm(x, router)                         [T, E]
/// ids, w      = router_topk(logits, bias)                       [T, k]
/// plan        = permute(ids)                                    offsets [E+1], row_index, token_index
/// gate_up     = grouped_gemm(x gathered by token_index, gate_up, offsets)   [T*k, 2I]
/// h           = activation(gate_up)                             [T*k, I]
/// y           = grouped_gemm(h, down, offsets)                  [T*k, H]
/// shared      = down_s(activation(gate_up_s(x)))                [T, H]  (when the layer has one)
/// out         = combine(y, row_index, w, shared)                [T, H]
/// ```
///
/// Shapes were validated by [`crate::ops::forward`]; nothing here reads device data back, so a
/// backend whose ops enqueue without blocking runs the whole layer without a host round trip.
pub fn composed<B: Backend>(
    b: &B,
    layer: &Layer<B>,
    x: &Tensor<B>,
    out: &mut Tensor<B>,
    topk_ids: &mut Tensor<B>,
    topk_weights: &mut Tensor<B>,
) -> Result<()> {
    let c = &layer.config;
    let (t, e, k, h, i) = (x.shape[0], c.experts, c.top_k, c.hidden, c.intermediate);
    let rows = t * k;

    let mut logits = Tensor::alloc(b, DType::F32, &[t, e])?;
    b.grouped_gemm(x, None, &layer.router, None, &mut logits)?;
    b.router_topk(
        &logits,
        layer.bias.as_ref(),
        &c.routing,
        topk_ids,
        topk_weights,
    )?;

    let mut offsets = Tensor::alloc(b, DType::U32, &[e + 1])?;
    let mut row_index = Tensor::alloc(b, DType::U32, &[rows])?;
    let mut token_index = Tensor::alloc(b, DType::U32, &[rows])?;
    b.permute(topk_ids, &mut offsets, &mut row_index, &mut token_index)?;

    let mut gate_up = Tensor::alloc(b, DType::F32, &[rows, 2 * i])?;
    b.grouped_gemm(
        x,
        Some(&token_index),
        &layer.gate_up,
        Some(&offsets),
        &mut gate_up,
    )?;
    let mut act = Tensor::alloc(b, DType::F32, &[rows, i])?;
    b.activation(&gate_up, &mut act)?;
    drop(gate_up);
    let mut y = Tensor::alloc(b, DType::F32, &[rows, h])?;
    b.grouped_gemm(&act, None, &layer.down, Some(&offsets), &mut y)?;
    drop(act);

    let shared = match (&layer.shared_gate_up, &layer.shared_down) {
        (Some(sgu), Some(sd)) => {
            let s = c.shared_intermediate;
            let mut gu = Tensor::alloc(b, DType::F32, &[t, 2 * s])?;
            b.grouped_gemm(x, None, sgu, None, &mut gu)?;
            let mut sh = Tensor::alloc(b, DType::F32, &[t, s])?;
            b.activation(&gu, &mut sh)?;
            let mut sy = Tensor::alloc(b, DType::F32, &[t, h])?;
            b.grouped_gemm(&sh, None, sd, None, &mut sy)?;
            Some(sy)
        }
        _ => None,
    };
    b.combine(&y, &row_index, topk_weights, shared.as_ref(), out)
}
