//! `forward` (the whole layer, [`moe_hal::ops::forward`] on a [`moe_hal::Layer::upload`]ed
//! [`HostLayer`]) per weight dtype (F8E4M3 with a bf16 router): softmax with and without renormalisation, DeepSeek-V3 and
//! Kimi K2 grouped sigmoid routing, with and without a shared expert; T = 0 and 1, k = E, experts
//! with no tokens, E = 256 and 384, hidden 7168, a token with a NaN among good ones.

use super::{DEEPSEEK, KIMI, MIXTRAL, SOFTMAX_RAW, margin_threshold, routing_name};
use crate::check::*;
use crate::oracle;
use crate::rng::Rng;
use crate::runner::Case;
use moe_hal::{Backend, DType, HostLayer, HostTensor, Layer, MoeConfig, Op, Routing, ops};

/// One whole-layer problem: the layer's shape, whether it has an `e_score_correction_bias`
/// (sigmoid routing only), whether the router stays f32 while the experts are f16/bf16 (as
/// DeepSeek-V3 and Kimi K2 checkpoints store it), and the number of tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    /// The layer shape and routing.
    pub config: MoeConfig,
    /// Whether sigmoid routing gets a random e_score_correction_bias.
    pub bias: bool,
    /// Keep the router in f32 beside narrower expert weights.
    pub router_f32: bool,
    /// Tokens in the batch.
    pub tokens: usize,
    /// A token whose activations hold a NaN: its routing weights and output row must come out
    /// NaN, and every other token exactly as without it.
    pub nan_token: Option<usize>,
}

impl LayerSpec {
    /// A spec from its parts (`shared` = shared expert intermediate size, 0 for none).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tokens: usize,
        hidden: usize,
        intermediate: usize,
        experts: usize,
        top_k: usize,
        routing: Routing,
        bias: bool,
        shared: usize,
    ) -> Self {
        LayerSpec {
            config: MoeConfig { hidden, intermediate, experts, top_k, routing, shared_intermediate: shared },
            bias,
            router_f32: false,
            tokens,
            nan_token: None,
        }
    }

    /// The same layer with a NaN in token `t`'s activations.
    pub fn with_nan_token(mut self, t: usize) -> Self {
        self.nan_token = Some(t);
        self
    }

    /// The same layer with its router stored in f32 whatever the experts' dtype.
    pub fn with_f32_router(mut self) -> Self {
        self.router_f32 = true;
        self
    }

    /// The shape in words.
    pub fn describe(&self) -> String {
        let c = &self.config;
        format!(
            "T={} H={} I={} E={} k={} {}{}{}{}{}",
            self.tokens,
            c.hidden,
            c.intermediate,
            c.experts,
            c.top_k,
            routing_name(&c.routing),
            if self.bias { " +bias" } else { "" },
            if c.shared_intermediate > 0 { format!(" shared={}", c.shared_intermediate) } else { String::new() },
            if self.router_f32 { " router=f32" } else { "" },
            self.nan_token.map_or(String::new(), |t| format!(" NaN in token {t}"))
        )
    }
}

/// Random weights for `config` stored in `dtype` (the router in `router_dtype`), scaled so every
/// activation is O(1): router logits have a standard deviation near 1, expert outputs near 0.3
/// (F8E4M3: in [`crate::check::fp8_weight`]'s blocks of different scales).
pub fn random_layer(config: &MoeConfig, bias: bool, dtype: DType, router_dtype: DType, rng: &mut Rng) -> HostLayer {
    let (h, i, e, s) = (config.hidden, config.intermediate, config.experts, config.shared_intermediate);
    let mut t = |dtype: DType, shape: &[usize], fan_in: usize, gain: f64| {
        let n = shape.iter().product();
        let v = rng.vec_f32(n, gain * (3.0 / fan_in as f64).sqrt());
        match dtype {
            DType::F8E4M3 => crate::check::fp8_weight(shape, &v, crate::check::fp8_test_block(shape)).expect("shape matches"),
            _ => HostTensor::from_f32(dtype, shape, &v).expect("shape matches"),
        }
    };
    let router = t(router_dtype, &[e, h], h, 2.0);
    let gate_up = t(dtype, &[e, 2 * i, h], h, 1.0);
    let down = t(dtype, &[e, h, i], i, 1.0);
    let (shared_gate_up, shared_down) =
        if s > 0 { (Some(t(dtype, &[2 * s, h], h, 1.0)), Some(t(dtype, &[h, s], s, 1.0))) } else { (None, None) };
    let bias = (bias && matches!(config.routing, Routing::SigmoidGrouped { .. }))
        .then(|| HostTensor::from_f32(DType::F32, &[e], &rng.vec_f32(e, 0.1)).expect("shape matches"));
    HostLayer { config: config.clone(), dtype, router, bias, gate_up, down, shared_gate_up, shared_down }
}

/// A random layer and `x [T, H]` whose routing decisions all have a safe margin
/// ([`super::margin_threshold`]), so a backend computing logits in f32 must route exactly as the
/// oracle does. Deterministic in `seed`. With [`LayerSpec::nan_token`], that token's row then gets
/// a NaN (its routing has no margin to keep: NaN logits rank last, ties to the lower id).
pub fn random_problem(spec: &LayerSpec, dtype: DType, seed: &str) -> (HostLayer, Vec<f32>) {
    let mut rng = Rng::from_name(seed);
    let c = &spec.config;
    let threshold = margin_threshold(&c.routing);
    'layer: for _ in 0..20 {
        // A router is never F8E4M3: DeepSeek's FP8 checkpoints keep it in bf16.
        let router_dtype = match dtype {
            _ if spec.router_f32 => DType::F32,
            DType::F8E4M3 => DType::BF16,
            d => d,
        };
        let layer = random_layer(c, spec.bias, dtype, router_dtype, &mut rng);
        let router = oracle::decode_tensor(&layer.router);
        let bias = layer.bias.as_ref().map(oracle::decode_tensor);
        let mut x = Vec::with_capacity(spec.tokens * c.hidden);
        for _ in 0..spec.tokens {
            let mut tries = 0;
            loop {
                let row = rng.vec_f32(c.hidden, 1.0);
                let logits: Vec<f64> = router.chunks(c.hidden).map(|w| w.iter().zip(&row).map(|(a, b)| a * *b as f64).sum()).collect();
                if oracle::route_margin(&logits, bias.as_deref(), &c.routing, c.top_k) >= threshold {
                    x.extend(row);
                    break;
                }
                tries += 1;
                if tries == 200 {
                    continue 'layer;
                }
            }
        }
        if let Some(t) = spec.nan_token {
            x[t * c.hidden + c.hidden / 2] = f32::NAN;
        }
        return (layer, x);
    }
    panic!("could not generate well-separated routing for {}", spec.describe())
}

/// Runs the whole layer of `spec` with weights in `dtype` and compares routing (exactly) and
/// routing weights and output (at [`layer_tolerance`]) with the oracle.
pub fn check_forward<B: Backend>(b: &B, spec: &LayerSpec, dtype: DType, seed: &str) -> CaseResult {
    let (layer, x) = random_problem(spec, dtype, seed);
    let c = &spec.config;
    let (t, h, k) = (spec.tokens, c.hidden, c.top_k);
    let dl = Layer::upload(b, &layer).ctx("Layer::upload")?;
    let xt = f32_tensor(b, &[t, h], &x)?;
    let mut out = poisoned_f32(b, &[t, h])?;
    let mut ids = poisoned_u32(b, &[t, k])?;
    let mut w = poisoned_f32(b, &[t, k])?;
    ops::forward(b, &dl, &xt, &mut out, &mut ids, &mut w).ctx("forward")?;
    let (got_out, got_ids, got_w) = (read_f32(b, &out)?, read_u32(b, &ids)?, read_f32(b, &w)?);
    let want = oracle::layer(&layer, &oracle::widen(&x));
    same_routing("topk_ids", &got_ids, &want.topk_ids, k)?;
    let tol = layer_tolerance(dtype);
    // The router runs in f32 whatever the weights' dtype, so its weights are held to f32
    // accuracy, not the layer's (a router on bf16-rounded activations would pass 2e-2).
    let ew = close("topk_weights", &got_w, &want.topk_weights, ROUTER_WEIGHTS_TOLERANCE)?;
    let eo = close("output", &got_out, &want.out, tol)?;
    Ok(ew.max(eo))
}

/// Group name of the forward cases for `dtype`.
pub fn group(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "forward_f16",
        DType::BF16 => "forward_bf16",
        DType::F8E4M3 => "forward_f8_e4m3",
        _ => "forward_f32",
    }
}

fn case<B: Backend>(dtype: DType, name: &str, spec: LayerSpec) -> Case<B> {
    let group = group(dtype);
    let seed = format!("{group}/{name}");
    Case::new(group, name, Op::Forward, Some(dtype), spec.describe(), move |b: &B| check_forward(b, &spec, dtype, &seed))
}

/// The whole-layer cases for one weight dtype.
pub fn cases_for<B: Backend>(dtype: DType) -> Vec<Case<B>> {
    let grouped = |n_group, topk_group, norm, scale| Routing::SigmoidGrouped {
        n_group,
        topk_group,
        norm_topk_prob: norm,
        routed_scaling_factor: scale,
    };
    vec![
        case(dtype, "mixtral_softmax_norm", LayerSpec::new(9, 65, 33, 8, 2, MIXTRAL, false, 0)),
        case(dtype, "softmax_raw_shared", LayerSpec::new(17, 127, 31, 64, 8, SOFTMAX_RAW, false, 63)),
        case(dtype, "deepseek_e256_shared", LayerSpec::new(5, 64, 16, 256, 8, DEEPSEEK, true, 32)),
        case(dtype, "deepseek_e256_no_shared", LayerSpec::new(3, 33, 17, 256, 8, DEEPSEEK, true, 0)),
        case(dtype, "kimi_e384_shared", LayerSpec::new(3, 32, 16, 384, 8, KIMI, true, 16)),
        case(dtype, "decode_t1_softmax_shared", LayerSpec::new(1, 129, 63, 16, 4, MIXTRAL, false, 33)),
        case(dtype, "decode_t1_sigmoid", LayerSpec::new(1, 63, 32, 32, 4, grouped(4, 2, true, 2.5), true, 0)),
        case(dtype, "t0", LayerSpec::new(0, 32, 16, 8, 2, MIXTRAL, false, 16)),
        case(dtype, "k_eq_e", LayerSpec::new(4, 33, 17, 4, 4, MIXTRAL, false, 0)),
        case(dtype, "k_eq_e_sigmoid", LayerSpec::new(3, 31, 15, 8, 8, grouped(2, 2, true, 1.0), true, 8)),
        case(dtype, "empty_experts_e128_t2", LayerSpec::new(2, 32, 16, 128, 2, grouped(8, 2, false, 1.0), false, 0)),
        case(dtype, "hidden7168", LayerSpec::new(2, 7168, 16, 8, 2, grouped(2, 1, true, 2.5), true, 16)),
        // Expert counts off every lane and tile width.
        case(dtype, "softmax_e60", LayerSpec::new(6, 40, 24, 60, 4, MIXTRAL, false, 24)),
        case(dtype, "sigmoid_e257_one_group", LayerSpec::new(3, 32, 16, 257, 8, grouped(1, 1, true, 2.5), true, 0)),
        case(dtype, "deepseek_e256_router_f32", LayerSpec::new(4, 64, 16, 256, 8, DEEPSEEK, true, 32).with_f32_router()),
        case(dtype, "softmax_router_f32", LayerSpec::new(7, 33, 17, 16, 4, MIXTRAL, false, 0).with_f32_router()),
        // One bad token must not poison its batch (prefill: tiles shared with other tokens).
        case(dtype, "nan_token_prefill", LayerSpec::new(70, 64, 32, 8, 2, MIXTRAL, false, 16).with_nan_token(33)),
        case(dtype, "nan_token_decode_sigmoid", LayerSpec::new(3, 64, 16, 256, 8, DEEPSEEK, true, 32).with_nan_token(1)),
    ]
}

/// Every case of this group, for every backend.
pub fn cases<B: Backend>() -> Vec<Case<B>> {
    DType::WEIGHTS.iter().flat_map(|&d| cases_for(d)).collect()
}
