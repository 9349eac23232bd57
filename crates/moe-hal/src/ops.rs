//! The validated entry points: check every shape and dtype once, then call the backend.
//!
//! Each function has the name of the [`Backend`] method it guards. Errors are
//! [`crate::Error::InvalidArgument`] with a sentence naming the argument and both shapes.

use crate::{Backend, DType, Layer, Op, Result, Routing, Tensor, invalid};

fn expect<B: Backend + ?Sized>(backend: &B, name: &str, t: &Tensor<B>, dtype: DType, shape: &[usize]) -> Result<()> {
    if t.dtype != dtype {
        return invalid!("{name} must be {dtype}, got {}", t.dtype);
    }
    if t.shape != shape {
        return invalid!("{name} must have shape {shape:?}, got {:?}", t.shape);
    }
    fits(backend, name, t)
}

/// The tensor's buffer is the size of its shape (where the backend knows the buffer's size), and
/// so are its block scales' (see [`Backend::buffer_bytes`]). Called before any product of the tensor's
/// dimensions is formed, so none of those can overflow.
fn fits<B: Backend + ?Sized>(backend: &B, name: &str, t: &Tensor<B>) -> Result<()> {
    let want = t
        .dtype
        .tensor_bytes(&t.shape)
        .map_err(|_| crate::Error::InvalidArgument(format!("{name} has shape {:?}: more bytes than this machine can address", t.shape)))?;
    // Exactly: a backend may size its work from the buffer (the CPU backend's kernels take whole
    // buffers as slices), so a larger buffer than the shape says is as wrong as a smaller one.
    if let Some(have) = backend.buffer_bytes(&t.buf)
        && have != want
    {
        return invalid!(
            "{name} has shape {:?} of {} ({want} bytes) but its buffer holds {have} bytes: a Tensor's shape must match \
             the buffer it was allocated with",
            t.shape,
            t.dtype
        );
    }
    match &t.scales {
        Some(s) => fits(backend, &format!("the block scales of {name}"), &s.tensor),
        None => Ok(()),
    }
}

fn matrix<B: Backend + ?Sized>(name: &str, t: &Tensor<B>) -> Result<(usize, usize)> {
    match t.shape[..] {
        [a, b] => Ok((a, b)),
        _ => invalid!("{name} must be a matrix, got shape {:?}", t.shape),
    }
}

/// Block-scaled weights are the one storage a backend may not have (an older port, or one whose
/// kernels are not written yet): ask it first, so such weights become a sentence rather than
/// bytes read as some other dtype. (For the other dtypes `supports` only informs the suite.)
fn supported<B: Backend + ?Sized>(backend: &B, op: Op, dtype: DType) -> Result<()> {
    if dtype.is_block_scaled() && !backend.supports(op, dtype) {
        return Err(crate::Error::Unsupported(format!(
            "{} does not run {op} on {dtype} weights; load them dequantized (bf16 or f32) for this backend",
            backend.info().name
        )));
    }
    Ok(())
}

/// Validates, then [`Backend::router_topk`].
pub fn router_topk<B: Backend + ?Sized>(
    backend: &B,
    logits: &Tensor<B>,
    bias: Option<&Tensor<B>>,
    routing: &Routing,
    topk_ids: &mut Tensor<B>,
    topk_weights: &mut Tensor<B>,
) -> Result<()> {
    let (t, e) = matrix("logits", logits)?;
    expect(backend, "logits", logits, DType::F32, &[t, e])?;
    let (_, k) = matrix("topk_ids", topk_ids)?;
    let config = crate::MoeConfig { hidden: 1, intermediate: 1, experts: e, top_k: k, routing: *routing, shared_intermediate: 0 };
    config.validate()?;
    expect(backend, "topk_ids", topk_ids, DType::U32, &[t, k])?;
    expect(backend, "topk_weights", topk_weights, DType::F32, &[t, k])?;
    if let Some(b) = bias {
        if matches!(routing, Routing::Softmax { .. }) {
            return invalid!("softmax routing takes no e_score_correction_bias");
        }
        expect(backend, "e_score_correction_bias", b, DType::F32, &[e])?;
    }
    if t == 0 {
        return Ok(());
    }
    backend.router_topk(logits, bias, routing, topk_ids, topk_weights)
}

/// Validates, then [`Backend::permute`].
pub fn permute<B: Backend + ?Sized>(
    backend: &B,
    topk_ids: &Tensor<B>,
    expert_offsets: &mut Tensor<B>,
    row_index: &mut Tensor<B>,
    token_index: &mut Tensor<B>,
) -> Result<()> {
    let (t, k) = matrix("topk_ids", topk_ids)?;
    expect(backend, "topk_ids", topk_ids, DType::U32, &[t, k])?;
    let e = match expert_offsets.shape[..] {
        [n] if n >= 2 => n - 1,
        _ => {
            return invalid!("expert_offsets must be [E + 1] with E >= 1, got shape {:?}", expert_offsets.shape);
        }
    };
    expect(backend, "expert_offsets", expert_offsets, DType::U32, &[e + 1])?;
    if k == 0 || k > e {
        return invalid!("top-k must be between 1 and the expert count {e}, got {k}");
    }
    expect(backend, "row_index", row_index, DType::U32, &[t * k])?;
    expect(backend, "token_index", token_index, DType::U32, &[t * k])?;
    backend.permute(topk_ids, expert_offsets, row_index, token_index)
}

/// Validates, then [`Backend::grouped_gemm`].
pub fn grouped_gemm<B: Backend + ?Sized>(
    backend: &B,
    x: &Tensor<B>,
    token_index: Option<&Tensor<B>>,
    w: &Tensor<B>,
    expert_offsets: Option<&Tensor<B>>,
    y: &mut Tensor<B>,
) -> Result<()> {
    let (m, n) = gemm_shape(backend, x, token_index, w, expert_offsets)?;
    supported(backend, Op::GroupedGemm, w.dtype)?;
    expect(backend, "y", y, DType::F32, &[m, n])?;
    if y.is_empty() {
        return Ok(());
    }
    backend.grouped_gemm(x, token_index, w, expert_offsets, y)
}

/// Validates, then [`Backend::grouped_gemm_swiglu`]: the shapes of [`grouped_gemm`], with `w`
/// holding an even number `2I` of rows per group and `h [M, I]` in place of `y`.
pub fn grouped_gemm_swiglu<B: Backend>(
    backend: &B,
    x: &Tensor<B>,
    token_index: Option<&Tensor<B>>,
    w: &Tensor<B>,
    expert_offsets: Option<&Tensor<B>>,
    h: &mut Tensor<B>,
) -> Result<()> {
    let (m, two_i) = gemm_shape(backend, x, token_index, w, expert_offsets)?;
    supported(backend, Op::GroupedGemmSwiglu, w.dtype)?;
    if two_i % 2 != 0 {
        return invalid!("gate/up weights must have an even number of rows per expert (gate then up), got {two_i}");
    }
    expect(backend, "h", h, DType::F32, &[m, two_i / 2])?;
    if h.is_empty() {
        return Ok(());
    }
    backend.grouped_gemm_swiglu(x, token_index, w, expert_offsets, h)
}

/// The checks [`grouped_gemm`] and [`grouped_gemm_swiglu`] share: `(M, N)`, the rows of the
/// output and the weight rows per group.
fn gemm_shape<B: Backend + ?Sized>(
    backend: &B,
    x: &Tensor<B>,
    token_index: Option<&Tensor<B>>,
    w: &Tensor<B>,
    expert_offsets: Option<&Tensor<B>>,
) -> Result<(usize, usize)> {
    let (mx, kx) = matrix("x", x)?;
    expect(backend, "x", x, DType::F32, &[mx, kx])?;
    if !w.dtype.is_weight() {
        return invalid!("weights must be f32, f16, bf16 or f8_e4m3, got {}", w.dtype);
    }
    let (n, kw) = match (expert_offsets, &w.shape[..]) {
        (Some(off), &[g, n, kw]) => {
            expect(backend, "expert_offsets", off, DType::U32, &[g + 1])?;
            (n, kw)
        }
        (None, &[n, kw]) => (n, kw),
        (Some(_), s) => return invalid!("grouped weights must be [G, N, K], got shape {s:?}"),
        (None, s) => {
            return invalid!("weights without expert_offsets must be [N, K], got shape {s:?}");
        }
    };
    w.check_scales("the weights")?;
    fits(backend, "the weights", w)?;
    if kw != kx {
        return invalid!("x has {kx} columns but the weights have K = {kw}");
    }
    if kx == 0 {
        return invalid!("x and the weights must have at least one column (K = 0)");
    }
    let m = match token_index {
        Some(ti) => {
            let (m,) = match ti.shape[..] {
                [m] => (m,),
                _ => return invalid!("token_index must be a vector, got shape {:?}", ti.shape),
            };
            expect(backend, "token_index", ti, DType::U32, &[m])?;
            m
        }
        None => mx,
    };
    Ok((m, n))
}

/// Validates, then [`Backend::activation`].
pub fn activation<B: Backend + ?Sized>(backend: &B, gate_up: &Tensor<B>, h: &mut Tensor<B>) -> Result<()> {
    let (m, two_i) = matrix("gate_up", gate_up)?;
    expect(backend, "gate_up", gate_up, DType::F32, &[m, two_i])?;
    if two_i % 2 != 0 {
        return invalid!("gate_up must have an even number of columns (gate then up), got {two_i}");
    }
    expect(backend, "h", h, DType::F32, &[m, two_i / 2])?;
    if h.is_empty() {
        return Ok(());
    }
    backend.activation(gate_up, h)
}

/// Validates, then [`Backend::combine`].
pub fn combine<B: Backend + ?Sized>(
    backend: &B,
    y: &Tensor<B>,
    row_index: &Tensor<B>,
    topk_weights: &Tensor<B>,
    shared: Option<&Tensor<B>>,
    out: &mut Tensor<B>,
) -> Result<()> {
    let (t, k) = matrix("topk_weights", topk_weights)?;
    expect(backend, "topk_weights", topk_weights, DType::F32, &[t, k])?;
    let (rows, h) = matrix("y", y)?;
    expect(backend, "y", y, DType::F32, &[rows, h])?;
    if rows != t * k {
        return invalid!("y must have T * k = {} rows, got {rows}", t * k);
    }
    expect(backend, "row_index", row_index, DType::U32, &[t * k])?;
    if let Some(s) = shared {
        expect(backend, "shared", s, DType::F32, &[t, h])?;
    }
    expect(backend, "out", out, DType::F32, &[t, h])?;
    if out.is_empty() {
        return Ok(());
    }
    backend.combine(y, row_index, topk_weights, shared, out)
}

/// Validates, then [`Backend::forward`] (the whole layer).
pub fn forward<B: Backend>(
    backend: &B,
    layer: &Layer<B>,
    x: &Tensor<B>,
    out: &mut Tensor<B>,
    topk_ids: &mut Tensor<B>,
    topk_weights: &mut Tensor<B>,
) -> Result<()> {
    layer.validate()?;
    let names = ["the router weights", "e_score_correction_bias", "gate_up", "down", "shared_gate_up", "shared_down"];
    for (name, t) in names.into_iter().zip(layer.tensors()) {
        if let Some(t) = t {
            fits(backend, name, t)?;
        }
    }
    supported(backend, Op::Forward, layer.dtype)?;
    let c = &layer.config;
    let (t, h) = matrix("hidden_states", x)?;
    if h != c.hidden {
        return invalid!("hidden_states has {h} columns but the layer's hidden size is {}", c.hidden);
    }
    expect(backend, "hidden_states", x, DType::F32, &[t, h])?;
    expect(backend, "output", out, DType::F32, &[t, h])?;
    expect(backend, "topk_ids", topk_ids, DType::U32, &[t, c.top_k])?;
    expect(backend, "topk_weights", topk_weights, DType::F32, &[t, c.top_k])?;
    if t == 0 {
        return Ok(());
    }
    backend.forward(layer, x, out, topk_ids, topk_weights)
}
