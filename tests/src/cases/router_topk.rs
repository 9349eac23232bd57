//! `router_topk`: softmax and sigmoid-grouped routing, with and without bias, renormalisation and
//! scaling; T = 0 and 1; k = E; E = 1, 256, 384; ties to the lower index; NaN ranks lowest.

use super::{DEEPSEEK, KIMI, MIXTRAL, SOFTMAX_RAW, routing_name, separated_logits_rows};
use crate::check::*;
use crate::oracle;
use crate::rng::Rng;
use crate::runner::Case;
use moe_hal::{Backend, Op, Routing, ops};

const GROUP: &str = "router_topk_f32";

/// Runs `router_topk` on `logits [T, E]` and compares ids exactly and weights at f32 tolerance.
pub fn check_router<B: Backend>(
    b: &B,
    t: usize,
    e: usize,
    k: usize,
    routing: &Routing,
    logits: &[f32],
    bias: Option<&[f32]>,
) -> CaseResult {
    let lt = f32_tensor(b, &[t, e], logits)?;
    let bt = bias.map(|v| f32_tensor(b, &[e], v)).transpose()?;
    let mut ids = poisoned_u32(b, &[t, k])?;
    let mut w = poisoned_f32(b, &[t, k])?;
    ops::router_topk(b, &lt, bt.as_ref(), routing, &mut ids, &mut w).ctx("router_topk")?;
    let (got_ids, got_w) = (read_u32(b, &ids)?, read_f32(b, &w)?);
    let bias64 = bias.map(oracle::widen);
    let (want_ids, want_w) = oracle::router_topk(&oracle::widen(logits), e, bias64.as_deref(), routing, k);
    same_routing("topk_ids", &got_ids, &want_ids, k)?;
    close("topk_weights", &got_w, &want_w, op_tolerance(None, e))
}

fn random_bias(rng: &mut Rng, e: usize) -> Vec<f32> {
    rng.vec_f32(e, 0.1)
}

/// A case on seeded, well-separated logits.
fn random_case<B: Backend>(name: &str, t: usize, e: usize, k: usize, routing: Routing, bias: bool) -> Case<B> {
    let shape = format!("T={t} E={e} k={k} {}{}", routing_name(&routing), if bias { " +bias" } else { "" });
    let seed = format!("{GROUP}/{name}");
    Case::new(GROUP, name, Op::RouterTopk, None, shape, move |b: &B| {
        let mut rng = Rng::from_name(&seed);
        let bias = bias.then(|| random_bias(&mut rng, e));
        let logits = separated_logits_rows(&mut rng, t, e, k, &routing, bias.as_deref());
        check_router(b, t, e, k, &routing, &logits, bias.as_deref())
    })
}

/// A case on hand-written logits (ties, NaN).
fn fixed_case<B: Backend>(name: &str, e: usize, k: usize, routing: Routing, logits: Vec<f32>, bias: Option<Vec<f32>>) -> Case<B> {
    let t = logits.len() / e;
    let shape = format!("T={t} E={e} k={k} {}", routing_name(&routing));
    Case::new(GROUP, name, Op::RouterTopk, None, shape, move |b: &B| check_router(b, t, e, k, &routing, &logits, bias.as_deref()))
}

/// Every case of this group, for every backend.
pub fn cases<B: Backend>() -> Vec<Case<B>> {
    let grouped = |n_group, topk_group, norm, scale| Routing::SigmoidGrouped {
        n_group,
        topk_group,
        norm_topk_prob: norm,
        routed_scaling_factor: scale,
    };
    let nan = f32::NAN;
    vec![
        random_case("softmax_norm_t1", 1, 8, 2, MIXTRAL, false),
        random_case("softmax_raw_t37_e64_k6", 37, 64, 6, SOFTMAX_RAW, false),
        random_case("softmax_norm_k_eq_e", 5, 16, 16, MIXTRAL, false),
        random_case("softmax_raw_k_eq_e", 3, 16, 16, SOFTMAX_RAW, false),
        random_case("softmax_e1_k1", 3, 1, 1, MIXTRAL, false),
        random_case("softmax_t0", 0, 8, 2, MIXTRAL, false),
        random_case("softmax_t257_e384_k8", 257, 384, 8, MIXTRAL, false),
        random_case("sigmoid_deepseek_e256", 33, 256, 8, DEEPSEEK, true),
        random_case("sigmoid_kimi_e384", 17, 384, 8, KIMI, true),
        random_case("sigmoid_no_bias_no_norm", 9, 32, 4, grouped(4, 2, false, 1.0), false),
        random_case("sigmoid_k_eq_e", 4, 16, 16, grouped(4, 4, true, 1.5), true),
        random_case("sigmoid_one_expert_groups", 6, 8, 3, grouped(8, 3, true, 1.0), true),
        random_case("sigmoid_t0", 0, 256, 8, DEEPSEEK, true),
        random_case("sigmoid_t1_e256", 1, 256, 8, DEEPSEEK, true),
        // Expert counts off every lane and tile width (Qwen1.5-MoE has 60).
        random_case("softmax_e60_k4", 11, 60, 4, MIXTRAL, false),
        random_case("softmax_e257_k8", 5, 257, 8, SOFTMAX_RAW, false),
        random_case("sigmoid_e60_g6", 7, 60, 6, grouped(6, 3, true, 2.5), true),
        // Corrected scores all negative: selection must stay inside the kept groups (masking the
        // dropped groups with 0.0, as transformers does, would pick from them).
        Case::new(GROUP, "sigmoid_negative_corrected", Op::RouterTopk, None, "T=7 E=16 k=4 sigmoid g4/2 bias=-2", move |b: &B| {
            let (t, e, k, routing) = (7, 16, 4, grouped(4, 2, true, 1.0));
            let mut rng = Rng::from_name("router_topk_f32/sigmoid_negative_corrected");
            let bias: Vec<f32> = (0..e).map(|_| -2.0 + rng.uniform(-0.01, 0.01) as f32).collect();
            let logits = separated_logits_rows(&mut rng, t, e, k, &routing, Some(&bias));
            check_router(b, t, e, k, &routing, &logits, Some(&bias))
        }),
        // Ties go to the lower index: all equal; equal values straddling the top-k boundary.
        fixed_case(
            "ties_softmax",
            8,
            3,
            MIXTRAL,
            vec![
                0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, // all equal -> 0, 1, 2
                1.0, 3.0, 3.0, 2.0, 3.0, 0.0, 0.0, 0.0, // three-way tie on top -> 1, 2, 4
                5.0, 1.0, -1.0, 1.0, 1.0, 1.0, 0.0, 1.0, // tie across the boundary -> 0, 1, 3
                -2.0, -2.0, -2.0, -2.0, -2.0, -2.0, 4.0, 4.0, // 6, 7, then 0
            ],
            None,
        ),
        fixed_case(
            "ties_sigmoid_grouped",
            16,
            4,
            grouped(4, 2, true, 1.0),
            vec![
                0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, // groups 0, 1; experts 0..4
                -1.0, -1.0, -1.0, -1.0, 2.0, 2.0, -3.0, -3.0, -1.0, -1.0, -1.0, -1.0, 2.0, 2.0, -3.0,
                -3.0, // groups 1, 3 -> 4, 5, 12, 13
                1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, -1.0, -1.0, -1.0,
                -1.0, // three equal groups: keep 0, 1 -> 0, 1, 4, 5
                0.0, 3.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
                0.0, // group 1 best, groups 0 and 2 tie -> keep 0: 1, 4, 5, 6
            ],
            Some(vec![0.0; 16]),
        ),
        // NaN ranks below every number. Softmax: one NaN logit makes the sum and so every
        // probability NaN; the spec ranks those, so the token takes experts 0..k with NaN weights.
        fixed_case(
            "nan_softmax",
            8,
            2,
            MIXTRAL,
            vec![
                0.1, 0.9, -0.3, 0.4, 0.2, nan, 0.7, -1.0, // one NaN -> 0, 1, NaN weights
                nan, nan, nan, nan, nan, nan, nan, nan, // all NaN -> 0, 1
                0.1, 0.9, -0.3, 0.4, 0.2, 1.5, 0.7, -1.0, // no NaN -> 5, 1
            ],
            None,
        ),
        fixed_case(
            "nan_sigmoid_grouped",
            16,
            4,
            grouped(4, 2, true, 2.0),
            vec![
                nan, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0, nan, 0.5, 0.25, nan, nan, 1.5, -0.5, 0.75, -0.25, // NaN experts lose
                nan, nan, nan, 3.0, 1.0, 1.0, -1.0, 0.0, -2.0, -2.5, -1.5, -3.0, 0.5, nan, 0.25,
                -0.75, // a group with one number scores NaN
                nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, // all NaN -> 0..4
                nan, nan, 2.0, 1.0, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan, nan,
                0.0, // too few numbers in the kept groups: NaN ids fill, weights NaN
            ],
            None,
        ),
        fixed_case(
            "nan_sigmoid_no_norm",
            8,
            4,
            grouped(1, 1, false, 1.0),
            vec![
                nan, 2.0, 1.0, nan, -1.0, -2.0, -3.0, nan, // 1, 2, 4, 5
                nan, 2.0, nan, nan, nan, nan, 1.0, nan, // 1, 6, then NaN 0, 2 with NaN weights only there
            ],
            None,
        ),
    ]
}
