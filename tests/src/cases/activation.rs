//! `activation` (SwiGLU): sizes one off tile boundaries, M = 0 and 1, and extreme gates (±100,
//! where `exp` overflows in f32: `silu` must stay finite, e.g. not `exp(g) / (1 + exp(g))`).

use crate::check::*;
use crate::oracle;
use crate::rng::Rng;
use crate::runner::Case;
use moe_hal::{Backend, Op, ops};

const GROUP: &str = "activation_f32";

/// Runs `activation` on `gate_up [M, 2I]` and compares with the oracle.
pub fn check_activation<B: Backend>(b: &B, m: usize, i: usize, gate_up: &[f32]) -> CaseResult {
    let gu = f32_tensor(b, &[m, 2 * i], gate_up)?;
    let mut h = poisoned_f32(b, &[m, i])?;
    ops::activation(b, &gu, &mut h).ctx("activation")?;
    let want = oracle::swiglu(&oracle::widen(gate_up), i);
    close("h", &read_f32(b, &h)?, &want, op_tolerance(None, 1))
}

fn random_case<B: Backend>(name: &str, m: usize, i: usize) -> Case<B> {
    let seed = format!("{GROUP}/{name}");
    Case::new(GROUP, name, Op::Activation, None, format!("M={m} I={i}"), move |b: &B| {
        let gu = Rng::from_name(&seed).vec_f32(m * 2 * i, 6.0);
        check_activation(b, m, i, &gu)
    })
}

/// Every case of this group, for every backend.
pub fn cases<B: Backend>() -> Vec<Case<B>> {
    vec![
        random_case("m1_i1", 1, 1),
        random_case("m7_i33", 7, 33),
        random_case("m64_i63", 64, 63),
        random_case("m3_i129", 3, 129),
        random_case("m129_i16", 129, 16),
        random_case("m257_i128", 257, 128),
        random_case("m0", 0, 32),
        Case::new(GROUP, "extreme_gates", Op::Activation, None, "M=2 I=8 gate in ±100", |b: &B| {
            let gate = [-100.0f32, -30.0, -10.0, -0.5, 0.5, 10.0, 30.0, 100.0];
            let mut rng = Rng::from_name("activation_f32/extreme_gates");
            let mut gu = Vec::new();
            for r in 0..2 {
                gu.extend(gate.iter().map(|g| if r == 0 { *g } else { -*g }));
                gu.extend(rng.vec_f32(8, 2.0));
            }
            check_activation(b, 2, 8, &gu)
        }),
    ]
}
