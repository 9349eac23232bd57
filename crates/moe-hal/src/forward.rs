//! The whole layer composed from the ops: the default [`Backend::forward`], and the default
//! [`Backend::grouped_gemm_swiglu`].

use crate::{Backend, DType, Layer, Result, Tensor};

/// Runs one MoE layer as the sequence of trait ops, allocating its scratch tensors on `backend`:
///
/// ```text
/// logits      = grouped_gemm(x, router)                         [T, E]
/// ids, w      = router_topk(logits, bias)                       [T, k]
/// plan        = permute(ids)                                    offsets [E+1], row_index, token_index
/// h           = grouped_gemm_swiglu(x gathered by token_index, gate_up, offsets)   [T*k, I]
///               (= activation(grouped_gemm(..)) [T*k, 2I] -> [T*k, I], fused where the backend can)
/// y           = grouped_gemm(h, down, offsets)                  [T*k, H]
/// shared      = down_s(grouped_gemm_swiglu(x, gate_up_s))       [T, H]  (when the layer has one)
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
    composed_in_stages(b, layer, x, out, topk_ids, topk_weights, &mut |_| Ok(()))
}

/// The stages of [`composed`], in order, as [`composed_in_stages`] names them.
pub const STAGES: [&str; 7] = ["router", "top-k", "permute", "gate/up", "down", "shared", "combine"];

/// [`composed`], calling `stage` with each stage's name ([`STAGES`]) once its ops are enqueued:
/// `moe bench --breakdown` synchronizes there to time each stage (a layer without a shared
/// expert still reports `"shared"`, having enqueued nothing). An error from `stage` stops the
/// layer.
pub fn composed_in_stages<B: Backend>(
    b: &B,
    layer: &Layer<B>,
    x: &Tensor<B>,
    out: &mut Tensor<B>,
    topk_ids: &mut Tensor<B>,
    topk_weights: &mut Tensor<B>,
    stage: &mut dyn FnMut(&'static str) -> Result<()>,
) -> Result<()> {
    let c = &layer.config;
    let (t, e, k, h, i) = (x.shape[0], c.experts, c.top_k, c.hidden, c.intermediate);
    let rows = t * k;

    let mut logits = Tensor::alloc(b, DType::F32, &[t, e])?;
    b.grouped_gemm(x, None, &layer.router, None, &mut logits)?;
    stage(STAGES[0])?;
    b.router_topk(&logits, layer.bias.as_ref(), &c.routing, topk_ids, topk_weights)?;
    stage(STAGES[1])?;

    let mut offsets = Tensor::alloc(b, DType::U32, &[e + 1])?;
    let mut row_index = Tensor::alloc(b, DType::U32, &[rows])?;
    let mut token_index = Tensor::alloc(b, DType::U32, &[rows])?;
    b.permute(topk_ids, &mut offsets, &mut row_index, &mut token_index)?;
    stage(STAGES[2])?;

    let mut act = Tensor::alloc(b, DType::F32, &[rows, i])?;
    b.grouped_gemm_swiglu(x, Some(&token_index), &layer.gate_up, Some(&offsets), &mut act)?;
    stage(STAGES[3])?;
    let mut y = Tensor::alloc(b, DType::F32, &[rows, h])?;
    b.grouped_gemm(&act, None, &layer.down, Some(&offsets), &mut y)?;
    drop(act);
    stage(STAGES[4])?;

    let shared = match (&layer.shared_gate_up, &layer.shared_down) {
        (Some(sgu), Some(sd)) => {
            let s = c.shared_intermediate;
            let mut sh = Tensor::alloc(b, DType::F32, &[t, s])?;
            b.grouped_gemm_swiglu(x, None, sgu, None, &mut sh)?;
            let mut sy = Tensor::alloc(b, DType::F32, &[t, h])?;
            b.grouped_gemm(&sh, None, sd, None, &mut sy)?;
            Some(sy)
        }
        _ => None,
    };
    stage(STAGES[5])?;
    b.combine(&y, &row_index, topk_weights, shared.as_ref(), out)?;
    stage(STAGES[6])
}

/// The default [`Backend::grouped_gemm_swiglu`]: [`Backend::grouped_gemm`] into an `[M, 2I]`
/// scratch tensor, then [`Backend::activation`]. Shapes were validated by
/// [`crate::ops::grouped_gemm_swiglu`]. A backend whose fused kernel cannot take some input
/// (weights split inside an expert, say) calls this for it.
pub fn grouped_gemm_swiglu_composed<B: Backend>(
    b: &B,
    x: &Tensor<B>,
    token_index: Option<&Tensor<B>>,
    w: &Tensor<B>,
    expert_offsets: Option<&Tensor<B>>,
    h: &mut Tensor<B>,
) -> Result<()> {
    let (m, i) = (h.shape[0], h.shape[1]);
    let mut gate_up = Tensor::alloc(b, DType::F32, &[m, 2 * i])?;
    b.grouped_gemm(x, token_index, w, expert_offsets, &mut gate_up)?;
    b.activation(&gate_up, h)
}
