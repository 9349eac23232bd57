//! `permute`: the dispatch plan must match the oracle's stable sort exactly: T = 0 and 1, k = E,
//! E = 1, 256, 384, most experts empty, a few experts crowded, repeated ids within a token.

use super::random_ids;
use crate::check::*;
use crate::oracle;
use crate::rng::Rng;
use crate::runner::Case;
use moe_hal::{Backend, Op, ops};

const GROUP: &str = "permute_u32";

/// Runs `permute` on `ids [T, k]` and compares the whole plan exactly.
pub fn check_permute<B: Backend>(b: &B, t: usize, k: usize, e: usize, ids: &[u32]) -> CaseResult {
    let it = u32_tensor(b, &[t, k], ids)?;
    let mut off = poisoned_u32(b, &[e + 1])?;
    let mut ri = poisoned_u32(b, &[t * k])?;
    let mut ti = poisoned_u32(b, &[t * k])?;
    ops::permute(b, &it, &mut off, &mut ri, &mut ti).ctx("permute")?;
    let want = oracle::permute(ids, k, e).map_err(Fail::Wrong)?;
    same_u32("expert_offsets", &read_u32(b, &off)?, &want.expert_offsets)?;
    same_u32("row_index", &read_u32(b, &ri)?, &want.row_index)?;
    same_u32("token_index", &read_u32(b, &ti)?, &want.token_index)
}

fn random_case<B: Backend>(name: &str, t: usize, e: usize, k: usize) -> Case<B> {
    let seed = format!("{GROUP}/{name}");
    Case::new(GROUP, name, Op::Permute, None, format!("T={t} E={e} k={k}"), move |b: &B| {
        let ids = random_ids(&mut Rng::from_name(&seed), t, e, k);
        check_permute(b, t, k, e, &ids)
    })
}

/// Every case of this group, for every backend.
pub fn cases<B: Backend>() -> Vec<Case<B>> {
    vec![
        random_case("t1_e8_k2", 1, 8, 2),
        random_case("t37_e64_k6", 37, 64, 6),
        random_case("t3_e256_k8_mostly_empty", 3, 256, 8),
        random_case("k_eq_e", 5, 16, 16),
        random_case("e1_k1", 5, 1, 1),
        random_case("t0", 0, 8, 2),
        random_case("t1000_e384_k8", 1000, 384, 8),
        random_case("t129_e33_k3", 129, 33, 3),
        // Every token picks among experts 0..6: a few crowded experts, the rest empty.
        Case::new(GROUP, "crowded", Op::Permute, None, "T=129 E=64 k=4 ids<6", |b: &B| {
            let (t, e, k) = (129, 64, 4);
            let ids = random_ids(&mut Rng::from_name("permute_u32/crowded"), t, 6, k);
            check_permute(b, t, k, e, &ids)
        }),
        // The contract sorts pairs stably and does not require distinct ids within a token.
        Case::new(GROUP, "repeated_ids", Op::Permute, None, "T=7 E=4 k=3 repeats", |b: &B| {
            let (t, e, k) = (7, 4, 3);
            let mut rng = Rng::from_name("permute_u32/repeated_ids");
            let ids: Vec<u32> = (0..t * k).map(|_| rng.below(e) as u32).collect();
            check_permute(b, t, k, e, &ids)
        }),
    ]
}
