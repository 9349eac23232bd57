//! The cases, one file per op (bad input for every op in [`invalid`]).
//!
//! Each case is a generic function over `B: Backend`: it builds seeded random data (never zeros),
//! uploads it, poisons every output (`f32::MAX` for f32, 0xFFFFFFFF for u32), runs the op through
//! [`moe_hal::ops`], downloads, and compares with [`crate::oracle`].

pub mod activation;
pub mod combine;
pub mod forward;
pub mod grouped_gemm;
pub mod invalid;
pub mod permute;
pub mod router_topk;

pub use forward::{LayerSpec, check_forward, random_layer};

use crate::oracle;
use crate::rng::Rng;
use crate::runner::{Case, GROUPS};
use moe_hal::{Backend, Routing};

/// Every case, in [`GROUPS`] order.
pub fn all<B: Backend>() -> Vec<Case<B>> {
    let mut v = Vec::new();
    v.extend(router_topk::cases());
    v.extend(invalid::router_topk());
    v.extend(permute::cases());
    v.extend(invalid::permute());
    v.extend(grouped_gemm::cases());
    v.extend(invalid::grouped_gemm());
    v.extend(grouped_gemm::swiglu_cases());
    v.extend(invalid::grouped_gemm_swiglu());
    v.extend(activation::cases());
    v.extend(invalid::activation());
    v.extend(combine::cases());
    v.extend(invalid::combine());
    v.extend(forward::cases());
    v.extend(invalid::forward());
    v.sort_by_key(|c| GROUPS.iter().position(|g| *g == c.info.group));
    v
}

/// Smallest decision margin of generated routing data, in the score space of
/// [`oracle::route_margin`]: logits for softmax; corrected sigmoid scores for grouped routing
/// (sigmoid's slope is at most 1/4). Far above f32 rounding (~1e-7) and above what rounding the
/// router's activations to f16 would move (~3e-4 of a logit), so every conforming backend must
/// choose exactly the oracle's experts.
pub fn margin_threshold(routing: &Routing) -> f64 {
    match routing {
        Routing::Softmax { .. } => 1e-3,
        Routing::SigmoidGrouped { .. } => 2.5e-4,
    }
}

/// Router logits for one token with a safe decision margin: a shuffled grid of scores plus jitter.
///
/// Softmax: the logits are the grid. Sigmoid: the *corrected scores* `c` are the grid, and the
/// logits are solved from `c - bias`, so `c` is well separated whatever the bias.
pub fn separated_logits(rng: &mut Rng, experts: usize, k: usize, routing: &Routing, bias: Option<&[f32]>) -> Vec<f32> {
    for _ in 0..1000 {
        let mut grid: Vec<usize> = (0..experts).collect();
        rng.shuffle(&mut grid);
        let logits: Vec<f32> = match routing {
            Routing::Softmax { .. } => {
                let step = (8.0 / experts as f64).min(0.5);
                grid.iter().map(|&g| ((g as f64 - experts as f64 / 2.0 + rng.uniform(-0.3, 0.3)) * step) as f32).collect()
            }
            Routing::SigmoidGrouped { .. } => {
                let step = 0.7 / experts as f64;
                let mean_bias = bias.map_or(0.0, |b| b.iter().map(|&v| v as f64).sum::<f64>() / experts as f64);
                grid.iter()
                    .enumerate()
                    .map(|(e, &g)| {
                        let c = mean_bias + 0.15 + (g as f64 + rng.uniform(-0.3, 0.3)) * step;
                        let s = (c - bias.map_or(0.0, |b| b[e] as f64)).clamp(0.01, 0.99);
                        (s / (1.0 - s)).ln() as f32
                    })
                    .collect()
            }
        };
        let bias64 = bias.map(oracle::widen);
        if oracle::route_margin(&oracle::widen(&logits), bias64.as_deref(), routing, k) >= margin_threshold(routing) {
            return logits;
        }
    }
    panic!("could not generate well-separated router logits for E={experts} k={k} {routing:?}")
}

/// `T * E` logits, each token from [`separated_logits`].
pub fn separated_logits_rows(rng: &mut Rng, tokens: usize, experts: usize, k: usize, routing: &Routing, bias: Option<&[f32]>) -> Vec<f32> {
    (0..tokens).flat_map(|_| separated_logits(rng, experts, k, routing, bias)).collect()
}

/// Distinct expert ids for each of `tokens` tokens, as a router would produce them.
pub fn random_ids(rng: &mut Rng, tokens: usize, experts: usize, k: usize) -> Vec<u32> {
    (0..tokens).flat_map(|_| rng.distinct(experts, k)).map(|e| e as u32).collect()
}

/// Short routing description for case shapes.
pub fn routing_name(r: &Routing) -> String {
    match *r {
        Routing::Softmax { norm_topk_prob } => format!("softmax{}", if norm_topk_prob { "+norm" } else { "" }),
        Routing::SigmoidGrouped { n_group, topk_group, norm_topk_prob, routed_scaling_factor } => {
            format!("sigmoid g{n_group}/{topk_group}{} x{routed_scaling_factor}", if norm_topk_prob { "+norm" } else { "" })
        }
    }
}

/// DeepSeek-V3's routing (n_group 8, topk_group 4, scaling 2.5).
pub const DEEPSEEK: Routing = Routing::SigmoidGrouped { n_group: 8, topk_group: 4, norm_topk_prob: true, routed_scaling_factor: 2.5 };
/// Kimi K2's routing (one group, scaling 2.827).
pub const KIMI: Routing = Routing::SigmoidGrouped { n_group: 1, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 2.827 };
/// Mixtral's routing.
pub const MIXTRAL: Routing = Routing::Softmax { norm_topk_prob: true };
/// Softmax without renormalisation (Qwen3-MoE with `norm_topk_prob = false`).
pub const SOFTMAX_RAW: Routing = Routing::Softmax { norm_topk_prob: false };
