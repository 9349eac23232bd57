//! The oracle: the spec of DESIGN.md ("What the layer computes") in plain f64, written for reading.
//!
//! Nothing here calls [`moe_hal::host`] or shares its algorithms: ranking is a full sort with an
//! explicit comparator (the host does repeated selection), permute is a stable sort of pair
//! indices (the host does a counting sort), the layer is computed token by token, expert by
//! expert (the host runs the permuted, grouped pipeline), and f16/bf16 are decoded from their
//! bits here (and F8E4M3 with its block scales). Only the plain types of `moe_hal` ([`Routing`], [`HostLayer`], [`DType`]) are used.
//!
//! Every matrix is a row-major `Vec<f64>` / `&[f64]`; `W` of a linear layer is `[out, in]`
//! (PyTorch layout), so `y = x · W^T`.

use moe_hal::{DType, HostLayer, HostTensor, Routing};
use std::cmp::Ordering;

// ---------------------------------------------------------------------------------------------
// Storage dtypes
// ---------------------------------------------------------------------------------------------

/// IEEE 754 binary16 bits to f64 (exact).
pub fn f16_to_f64(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((bits >> 10) & 0x1f) as i32;
    let man = (bits & 0x3ff) as f64;
    match exp {
        0 => sign * man * 2f64.powi(-24), // zero and subnormals: man * 2^-14 * 2^-10
        31 if man == 0.0 => sign * f64::INFINITY,
        31 => f64::NAN,
        _ => sign * (1.0 + man / 1024.0) * 2f64.powi(exp - 15),
    }
}

/// bfloat16 bits to f64 (exact): the upper half of an f32.
pub fn bf16_to_f64(bits: u16) -> f64 {
    f32::from_bits((bits as u32) << 16) as f64
}

/// `float8_e4m3fn` bits to f64 (exact): 1 sign, 4 exponent (bias 7), 3 mantissa bits; exponent
/// 0 is subnormal; `S.1111.111` is NaN; no infinities.
pub fn e4m3_to_f64(bits: u8) -> f64 {
    let sign = if bits & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((bits >> 3) & 0xf) as i32;
    let man = (bits & 7) as f64;
    match exp {
        0 => sign * man / 8.0 * 2f64.powi(-6),
        15 if man == 7.0 => f64::NAN,
        _ => sign * (1.0 + man / 8.0) * 2f64.powi(exp - 7),
    }
}

/// Little-endian bytes of a float storage dtype to f64 values (exact; F8E4M3 unscaled).
pub fn decode(dtype: DType, bytes: &[u8]) -> Vec<f64> {
    match dtype {
        DType::F8E4M3 => bytes.iter().map(|&b| e4m3_to_f64(b)).collect(),
        DType::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
        DType::F16 => bytes.chunks_exact(2).map(|c| f16_to_f64(u16::from_le_bytes([c[0], c[1]]))).collect(),
        DType::BF16 => bytes.chunks_exact(2).map(|c| bf16_to_f64(u16::from_le_bytes([c[0], c[1]]))).collect(),
        DType::U32 => bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect(),
    }
}

/// A host tensor's values as f64; a block-scaled one times the scale of each element's block
/// (element `[.., r, c]` times `scales[.., r / block[0], c / block[1]]`), the product exact.
pub fn decode_tensor(t: &HostTensor) -> Vec<f64> {
    let raw = decode(t.dtype, &t.data);
    let Some(s) = &t.scales else { return raw };
    let scales = decode_tensor(&s.tensor);
    let (rows, cols) = (t.shape[t.shape.len() - 2], t.shape[t.shape.len() - 1]);
    let (grid_rows, grid_cols) = (rows.div_ceil(s.block[0]), cols.div_ceil(s.block[1]));
    raw.iter()
        .enumerate()
        .map(|(i, v)| {
            let (matrix, r, c) = (i / (rows * cols), i / cols % rows, i % cols);
            v * scales[(matrix * grid_rows + r / s.block[0]) * grid_cols + c / s.block[1]]
        })
        .collect()
}

/// f32 values widened to f64.
pub fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

// ---------------------------------------------------------------------------------------------
// Ranking: larger first, NaN last, ties to the lower index
// ---------------------------------------------------------------------------------------------

/// The order of the spec: `Less` means expert `a` (score `sa`) ranks above expert `b`.
pub fn rank_cmp(sa: f64, a: usize, sb: f64, b: usize) -> Ordering {
    match (sa.is_nan(), sb.is_nan()) {
        (false, true) => Ordering::Less,
        (true, false) => Ordering::Greater,
        (true, true) => a.cmp(&b),
        (false, false) => sb.partial_cmp(&sa).unwrap().then(a.cmp(&b)),
    }
}

/// The indices of `candidates` sorted best first by `scores`.
pub fn ranked(scores: &[f64], candidates: impl IntoIterator<Item = usize>) -> Vec<usize> {
    let mut idx: Vec<usize> = candidates.into_iter().collect();
    idx.sort_by(|&a, &b| rank_cmp(scores[a], a, scores[b], b));
    idx
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

/// `1 / (1 + e^-x)`.
pub fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `softmax(logits)`. A NaN logit makes the sum NaN, hence every probability NaN: the spec takes
/// the top-k of `p`, so such a token ranks all-NaN scores and picks experts `0..k` in order.
pub fn softmax(logits: &[f64]) -> Vec<f64> {
    let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f64::NEG_INFINITY, f64::max);
    let exp: Vec<f64> = logits.iter().map(|&l| (l - max).exp()).collect();
    let sum: f64 = exp.iter().sum();
    exp.iter().map(|&v| v / sum).collect()
}

/// The group-limited stage of sigmoid routing: each group's score (sum of its two best corrected
/// scores, or its one score when a group has one expert) and the kept groups, best first.
pub fn group_scores(c: &[f64], n_group: usize) -> Vec<f64> {
    let per = c.len() / n_group;
    (0..n_group)
        .map(|g| {
            let best = ranked(c, g * per..(g + 1) * per);
            best.iter().take(2).map(|&i| c[i]).sum()
        })
        .collect()
}

/// One token's routing: `(ids best first, weights)` for `logits [E]` and `bias [E]`.
pub fn route(logits: &[f64], bias: Option<&[f64]>, routing: &Routing, k: usize) -> (Vec<usize>, Vec<f64>) {
    let e = logits.len();
    match *routing {
        Routing::Softmax { norm_topk_prob } => {
            let p = softmax(logits);
            let ids: Vec<usize> = ranked(&p, 0..e).into_iter().take(k).collect();
            let mut w: Vec<f64> = ids.iter().map(|&i| p[i]).collect();
            if norm_topk_prob {
                let sum: f64 = w.iter().sum();
                w.iter_mut().for_each(|v| *v /= sum);
            }
            (ids, w)
        }
        Routing::SigmoidGrouped { n_group, topk_group, norm_topk_prob, routed_scaling_factor } => {
            let s: Vec<f64> = logits.iter().map(|&l| sigmoid(l)).collect();
            let c: Vec<f64> = (0..e).map(|i| s[i] + bias.map_or(0.0, |b| b[i])).collect();
            let per = e / n_group;
            let gs = group_scores(&c, n_group);
            let kept: Vec<usize> = ranked(&gs, 0..n_group).into_iter().take(topk_group).collect();
            let allowed = (0..e).filter(|i| kept.contains(&(i / per)));
            let ids: Vec<usize> = ranked(&c, allowed).into_iter().take(k).collect();
            let mut w: Vec<f64> = ids.iter().map(|&i| s[i]).collect();
            if norm_topk_prob {
                let sum: f64 = w.iter().sum::<f64>() + 1e-20;
                w.iter_mut().for_each(|v| *v /= sum);
            }
            w.iter_mut().for_each(|v| *v *= routed_scaling_factor as f64);
            (ids, w)
        }
    }
}

/// Routing of `T` tokens: `logits [T, E]` → `(ids [T, k] u32, weights [T, k])`.
pub fn router_topk(logits: &[f64], experts: usize, bias: Option<&[f64]>, routing: &Routing, k: usize) -> (Vec<u32>, Vec<f64>) {
    let mut ids = Vec::new();
    let mut weights = Vec::new();
    for row in logits.chunks(experts) {
        let (i, w) = route(row, bias, routing, k);
        ids.extend(i.iter().map(|&v| v as u32));
        weights.extend(w);
    }
    (ids, weights)
}

/// How far one token's routing is from changing: the smallest gap between two scores whose order
/// decides the result (consecutive chosen experts, the last chosen against the best unchosen one,
/// and for grouped routing the last kept group against the best dropped one). Softmax gaps are
/// measured on the logits (softmax is monotone), sigmoid gaps on the corrected scores `c` and the
/// group scores. The suite builds data whose margin is far above f32 rounding, so a backend
/// computing in f32 must choose exactly what this f64 oracle chooses.
pub fn route_margin(logits: &[f64], bias: Option<&[f64]>, routing: &Routing, k: usize) -> f64 {
    let e = logits.len();
    let chain_gap = |scores: &[f64], order: &[usize]| -> f64 {
        order.windows(2).take(k).map(|w| (scores[w[0]] - scores[w[1]]).abs()).fold(f64::INFINITY, f64::min)
    };
    match *routing {
        Routing::Softmax { .. } => chain_gap(logits, &ranked(logits, 0..e)),
        Routing::SigmoidGrouped { n_group, topk_group, .. } => {
            let c: Vec<f64> = (0..e).map(|i| sigmoid(logits[i]) + bias.map_or(0.0, |b| b[i])).collect();
            let per = e / n_group;
            let gs = group_scores(&c, n_group);
            let groups = ranked(&gs, 0..n_group);
            let group_gap = if topk_group < n_group { (gs[groups[topk_group - 1]] - gs[groups[topk_group]]).abs() } else { f64::INFINITY };
            let kept = &groups[..topk_group];
            let order = ranked(&c, (0..e).filter(|i| kept.contains(&(i / per))));
            chain_gap(&c, &order).min(group_gap)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Dispatch, GEMM, activation, combine
// ---------------------------------------------------------------------------------------------

/// The dispatch plan of [`moe_hal::Backend::permute`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `[E + 1]`: expert `e` owns rows `expert_offsets[e]..expert_offsets[e + 1]`.
    pub expert_offsets: Vec<u32>,
    /// `[T * k]`: the row pair `t * k + j` went to.
    pub row_index: Vec<u32>,
    /// `[T * k]`: the token whose hidden state row `r` holds.
    pub token_index: Vec<u32>,
}

/// Sorts the pairs `(t, j)` by expert, stably. `Err` names the first id out of range.
pub fn permute(topk_ids: &[u32], top_k: usize, experts: usize) -> Result<Plan, String> {
    if let Some(p) = topk_ids.iter().position(|&id| id as usize >= experts) {
        return Err(format!("pair {p} has expert id {} but there are {experts} experts", topk_ids[p]));
    }
    let mut pairs: Vec<usize> = (0..topk_ids.len()).collect();
    pairs.sort_by_key(|&p| topk_ids[p]); // `sort_by_key` is stable: ties keep pair order
    let mut row_index = vec![0u32; pairs.len()];
    let mut token_index = vec![0u32; pairs.len()];
    for (row, &pair) in pairs.iter().enumerate() {
        row_index[pair] = row as u32;
        token_index[row] = (pair / top_k) as u32;
    }
    let expert_offsets = (0..=experts).map(|e| topk_ids.iter().filter(|&&id| (id as usize) < e).count() as u32).collect();
    Ok(Plan { expert_offsets, row_index, token_index })
}

/// `y [M, N] = x[src(r)] · w[g]^T` for the rows `r` of each group `g`; rows past the last offset
/// are zero. `x [Mx, K]`; `w [G, N, K]` (G = 1 and the whole of `0..M` without offsets);
/// `src(r) = token_index[r]` when given. `Err` for offsets that are not cumulative from 0 or end
/// past `M`, and for a gather index `>= Mx`.
pub fn grouped_gemm(
    x: &[f64],
    kdim: usize,
    token_index: Option<&[u32]>,
    w: &[f64],
    n: usize,
    expert_offsets: Option<&[u32]>,
    m: usize,
) -> Result<Vec<f64>, String> {
    let mx = x.len().checked_div(kdim).unwrap_or(0);
    let whole = [0, m as u32];
    let off = expert_offsets.unwrap_or(&whole);
    if off[0] != 0 || off.windows(2).any(|p| p[1] < p[0]) || *off.last().unwrap() as usize > m {
        return Err(format!("expert_offsets {off:?} are not cumulative within {m} rows"));
    }
    let mut y = vec![0.0; m * n];
    for g in 0..off.len() - 1 {
        for r in off[g] as usize..off[g + 1] as usize {
            let src = token_index.map_or(r, |ti| ti[r] as usize);
            if src >= mx {
                return Err(format!("row {r} gathers token {src} but x has {mx} rows"));
            }
            for col in 0..n {
                let wr = &w[(g * n + col) * kdim..(g * n + col + 1) * kdim];
                y[r * n + col] = (0..kdim).map(|i| x[src * kdim + i] * wr[i]).sum();
            }
        }
    }
    Ok(y)
}

/// `silu(g) = g / (1 + e^-g)`.
pub fn silu(g: f64) -> f64 {
    g / (1.0 + (-g).exp())
}

/// SwiGLU: `gate_up [M, 2I]` → `h [M, I]`, `h = silu(gate) * up`, gate = first `I` columns.
pub fn swiglu(gate_up: &[f64], intermediate: usize) -> Vec<f64> {
    let mut h = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks(2 * intermediate) {
        for c in 0..intermediate {
            h.push(silu(row[c]) * row[intermediate + c]);
        }
    }
    h
}

/// `out[t] = sum_j topk_weights[t, j] * y[row_index[t * k + j]] (+ shared[t])`.
pub fn combine(y: &[f64], hidden: usize, row_index: &[u32], topk_weights: &[f64], top_k: usize, shared: Option<&[f64]>) -> Vec<f64> {
    let t = topk_weights.len() / top_k;
    let mut out = vec![0.0; t * hidden];
    for tok in 0..t {
        for j in 0..top_k {
            let r = row_index[tok * top_k + j] as usize;
            let w = topk_weights[tok * top_k + j];
            for c in 0..hidden {
                out[tok * hidden + c] += w * y[r * hidden + c];
            }
        }
        if let Some(s) = shared {
            for c in 0..hidden {
                out[tok * hidden + c] += s[tok * hidden + c];
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The whole layer
// ---------------------------------------------------------------------------------------------

/// `W [rows, cols] · v [cols]`.
fn matvec(w: &[f64], cols: usize, v: &[f64]) -> Vec<f64> {
    w.chunks(cols).map(|row| row.iter().zip(v).map(|(a, b)| a * b).sum()).collect()
}

/// One SwiGLU MLP: `down · (silu(gate · x) * (up · x))` with `gate_up [2I, H]`, `down [H, I]`.
pub fn mlp(gate_up: &[f64], down: &[f64], intermediate: usize, x: &[f64]) -> Vec<f64> {
    let gu = matvec(gate_up, x.len(), x);
    let h = swiglu(&gu, intermediate);
    matvec(down, intermediate, &h)
}

/// A layer's weights decoded to f64.
#[derive(Debug, Clone)]
pub struct Weights64 {
    /// `[E, H]`
    pub router: Vec<f64>,
    /// `[E]`
    pub bias: Option<Vec<f64>>,
    /// `[E, 2I, H]`
    pub gate_up: Vec<f64>,
    /// `[E, H, I]`
    pub down: Vec<f64>,
    /// `[2S, H]`
    pub shared_gate_up: Option<Vec<f64>>,
    /// `[H, S]`
    pub shared_down: Option<Vec<f64>>,
}

impl Weights64 {
    /// Decodes every weight of `layer` from its storage dtype.
    pub fn decode(layer: &HostLayer) -> Self {
        Weights64 {
            router: decode_tensor(&layer.router),
            bias: layer.bias.as_ref().map(decode_tensor),
            gate_up: decode_tensor(&layer.gate_up),
            down: decode_tensor(&layer.down),
            shared_gate_up: layer.shared_gate_up.as_ref().map(decode_tensor),
            shared_down: layer.shared_down.as_ref().map(decode_tensor),
        }
    }
}

/// What the layer computes for `T` tokens.
#[derive(Debug, Clone)]
pub struct LayerOut {
    /// `[T, E]`
    pub logits: Vec<f64>,
    /// `[T, k]`, best first.
    pub topk_ids: Vec<u32>,
    /// `[T, k]`
    pub topk_weights: Vec<f64>,
    /// `[T, H]`
    pub out: Vec<f64>,
}

/// Router logits `x [T, H] · router [E, H]^T`.
pub fn router_logits(layer: &HostLayer, w: &Weights64, x: &[f64]) -> Vec<f64> {
    let h = layer.config.hidden;
    x.chunks(h).flat_map(|xt| matvec(&w.router, h, xt)).collect()
}

/// The MoE layer on `x [T, H]`, token by token: route, run each chosen expert's MLP on the
/// token, weight and sum, add the shared expert.
pub fn layer(layer: &HostLayer, x: &[f64]) -> LayerOut {
    let w = Weights64::decode(layer);
    layer_with(layer, &w, x)
}

/// [`layer`] with weights already decoded.
pub fn layer_with(layer: &HostLayer, w: &Weights64, x: &[f64]) -> LayerOut {
    let c = &layer.config;
    let (h, i, e, k, s) = (c.hidden, c.intermediate, c.experts, c.top_k, c.shared_intermediate);
    let logits = router_logits(layer, w, x);
    let mut res = LayerOut { logits: logits.clone(), topk_ids: vec![], topk_weights: vec![], out: vec![] };
    for (xt, lt) in x.chunks(h).zip(logits.chunks(e)) {
        let (ids, weights) = route(lt, w.bias.as_deref(), &c.routing, k);
        let mut out = vec![0.0; h];
        for (&id, &wt) in ids.iter().zip(&weights) {
            let gu = &w.gate_up[id * 2 * i * h..(id + 1) * 2 * i * h];
            let dn = &w.down[id * h * i..(id + 1) * h * i];
            for (o, v) in out.iter_mut().zip(mlp(gu, dn, i, xt)) {
                *o += wt * v;
            }
        }
        if let (Some(sgu), Some(sd)) = (&w.shared_gate_up, &w.shared_down) {
            for (o, v) in out.iter_mut().zip(mlp(sgu, sd, s, xt)) {
                *o += v;
            }
        }
        res.topk_ids.extend(ids.iter().map(|&v| v as u32));
        res.topk_weights.extend(weights);
        res.out.extend(out);
    }
    res
}
