//! `combine`: weighted sum of each token's expert rows (through a real dispatch plan) plus the
//! shared expert; T = 0 and 1, k = 1 and k = E, H off tile boundaries and H = 7168.

use super::random_ids;
use crate::check::*;
use crate::oracle;
use crate::rng::Rng;
use crate::runner::Case;
use moe_hal::{Backend, Op, ops};

const GROUP: &str = "combine_f32";

/// Runs `combine` for `t` tokens routed to `k` of `e` experts, rows of width `h`, with or without
/// a shared expert's output, and compares with the oracle.
pub fn check_combine<B: Backend>(b: &B, t: usize, e: usize, k: usize, h: usize, shared: bool, seed: &str) -> CaseResult {
    let mut rng = Rng::from_name(seed);
    let ids = random_ids(&mut rng, t, e, k);
    let plan = oracle::permute(&ids, k, e).map_err(Fail::Wrong)?;
    let y = rng.vec_f32(t * k * h, 1.0);
    let w: Vec<f32> = (0..t * k).map(|_| rng.uniform(0.05, 1.0) as f32).collect();
    let s = shared.then(|| rng.vec_f32(t * h, 1.0));

    let yt = f32_tensor(b, &[t * k, h], &y)?;
    let rt = u32_tensor(b, &[t * k], &plan.row_index)?;
    let wt = f32_tensor(b, &[t, k], &w)?;
    let st = s.as_ref().map(|s| f32_tensor(b, &[t, h], s)).transpose()?;
    let mut out = poisoned_f32(b, &[t, h])?;
    ops::combine(b, &yt, &rt, &wt, st.as_ref(), &mut out).ctx("combine")?;
    let s64 = s.as_deref().map(oracle::widen);
    let want = oracle::combine(&oracle::widen(&y), h, &plan.row_index, &oracle::widen(&w), k, s64.as_deref());
    close("out", &read_f32(b, &out)?, &want, op_tolerance(None, k))
}

fn case<B: Backend>(name: &str, t: usize, e: usize, k: usize, h: usize, shared: bool) -> Case<B> {
    let seed = format!("{GROUP}/{name}");
    let shape = format!("T={t} E={e} k={k} H={h}{}", if shared { " +shared" } else { "" });
    Case::new(GROUP, name, Op::Combine, None, shape, move |b: &B| check_combine(b, t, e, k, h, shared, &seed))
}

/// Every case of this group, for every backend.
pub fn cases<B: Backend>() -> Vec<Case<B>> {
    vec![
        case("t1_k1_h1", 1, 4, 1, 1, false),
        case("t1_k1_h1_shared", 1, 4, 1, 1, true),
        case("t33_k6_h129_shared", 33, 64, 6, 129, true),
        case("t33_k6_h127", 33, 64, 6, 127, false),
        case("k_eq_e_shared", 5, 16, 16, 64, true),
        case("t0", 0, 8, 2, 16, true),
        case("t2_k2_h7168_shared", 2, 8, 2, 7168, true),
        case("t257_e256_k8_h32", 257, 256, 8, 32, false),
    ]
}
