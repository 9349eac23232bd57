//! # moe-conformance: does a backend compute the MoE layer?
//!
//! The conformance suite of moe-hal: generic cases over [`moe_hal::Backend`], an independent f64
//! [`oracle`] of the spec (DESIGN.md, "What the layer computes"), and one macro, [`suite!`], that
//! turns the whole suite into `#[test]`s for a backend.
//!
//! ## Using it from a port
//!
//! In the port's crate, add `moe-conformance` as a dev-dependency and write one test file:
//!
//! ```ignore
//! // tests/conformance.rs
//! moe_conformance::suite!(mybackend, Ok(my_backend::MyBackend::new()));
//! // or, when construction can fail (no driver, no adapter):
//! moe_conformance::suite!(mybackend, my_backend::MyBackend::new()); // -> moe_hal::Result<MyBackend>
//! ```
//!
//! `cargo test` then runs one test per group in [`GROUPS`], e.g. `mybackend::grouped_gemm_bf16`.
//! The backend is built once (a static `OnceLock`) and shared by all tests of the instance, so
//! parallel tests share one device. When the constructor fails, each test prints
//! `skipping mybackend: <reason>` and passes, unless the comma-separated environment variable
//! `MOE_REQUIRE_BACKENDS` names `mybackend`: then it fails with the reason (CI sets `cpu,wgpu`).
//!
//! A day-one port routes every op through [`moe_hal::fallback`] and passes; it then replaces ops
//! one at a time and the suite says which one broke. An op the backend does not do for a dtype
//! ([`moe_hal::Backend::supports`] answers false) is reported as `unsupported`, not failed.
//!
//! Without cargo test (a CLI support matrix, `moe conform`), use the data-driven API:
//! [`run_all`] (or [`cases()`] + [`run_case`]) returns a [`CaseInfo`] and an [`Outcome`] per case
//! and never panics: a panicking case is caught and reported as [`Outcome::Fail`].
//!
//! ## What every case does
//!
//! Build seeded random data (a small [`Rng`]; never zeros), upload it, **poison every output**
//! (`f32::MAX` for f32, not NaN, so it shows where NaN is expected too; 0xFFFFFFFF for u32) so an
//! element the op never writes shows up, run the op
//! through [`moe_hal::ops`] (the validated entry points), download, and compare with the oracle:
//!
//! * floats by relative L2 error, `||got - want|| / ||want||`; NaN or inf where the oracle has a
//!   number never passes, and where the oracle has NaN (routing weights of a NaN token) the
//!   backend must have NaN too; and no single element may be off by more than
//!   [`check::ELEMENT_FACTOR`] times the tolerance times the RMS of the expected values (relative
//!   L2 over many elements would hide one wrong element);
//! * routing ids exactly, in rank order (the spec fixes ties and NaN, so every backend agrees);
//! * the dispatch plan of `permute` exactly.
//!
//! Routing data is generated with a *decision margin* ([`oracle::route_margin`], at least
//! [`cases::margin_threshold`]): no two scores whose order decides the result are closer than
//! 1e-3 (logits) or 2.5e-4 (corrected sigmoid scores), far above f32 rounding. So a backend that
//! follows the spec in f32 must choose exactly what the f64 oracle chooses, and a flaky near-tie
//! can never fail a correct backend. Exact ties are tested on purpose, with equal inputs.
//!
//! ## Tolerances, and why
//!
//! | | per op ([`check::op_tolerance`]) | whole layer ([`check::layer_tolerance`]) |
//! |---|---|---|
//! | f32 weights, and ops without weights | 1e-5 (× `sqrt(K/1024)` for K > 1024) | 1e-4 |
//! | f16 weights | 3e-3 | 5e-3 |
//! | bf16 weights | 1e-2 | 2e-2 |
//!
//! The oracle multiplies by the *stored* weights (decoded exactly from f16/bf16 bits), so the
//! storage rounding is not an error: a backend that keeps activations in f32 and accumulates in
//! f32 lands near 1e-7..1e-6 for every dtype (the CPU backend does). f32 tolerances are ten times
//! that and grow like `sqrt(K)` for long reductions (K = 7168), as f32 rounding of a sum does.
//! f16 and bf16 leave room for a backend that rounds activations to the storage dtype on the way
//! into tensor cores (unit roundoff 2^-11 and 2^-8: ~3e-4 and ~2e-3 relative over a dot product),
//! and the whole layer, three GEMMs in a row, compounds that. Each is still far below what a real
//! mistake gives (a wrong row, a dropped expert, a half-precision accumulator over 7168 terms:
//! all 1e-1 and up). The router must compute its logits in f32 (the spec); the margin above
//! tolerates logits off by ~3e-4, not a bf16 router.
//!
//! ## The suite's own tests
//!
//! This crate's test binary (`tests/conformance.rs`) runs the suite on the CPU backend (f32 and
//! f64 accumulation), property tests of the whole layer on random small shapes, hand-computed
//! checks of the oracle, and a self-test: a host backend built on [`moe_hal::fallback`] must pass
//! every case, and the same backend with one injected fault (an unwritten row, rows past the last
//! offset left unwritten, f16-rounded GEMM output, ties to the higher index, an unstable permute,
//! clamped instead of rejected ids, an overflowing SiLU, a dropped shared expert, a panic, bf16
//! unsupported) must fail exactly the cases meant to catch it, or be reported unsupported.
//!
//! ## The groups ([`GROUPS`], one `#[test]` each)
//!
//! * `router_topk_f32`: softmax with and without renormalisation, DeepSeek-V3 (E = 256, n_group 8,
//!   topk_group 4, bias, scaling 2.5) and Kimi K2 (E = 384, n_group 1, scaling 2.827) routing,
//!   no bias / no renormalisation, one-expert groups, all-negative corrected scores (selection
//!   must stay in the kept groups), T = 0, 1 and 257, E = 1, k = E; ties (equal logits, equal
//!   groups: the lower index wins) and NaN (ranks below every number; a NaN logit makes every
//!   softmax probability NaN, so the token takes experts 0..k with NaN weights, as the spec reads).
//! * `permute_u32`: the stable dispatch plan for T = 0, 1, 37, 129, 1000, E = 1 .. 384, k = E, most
//!   experts empty, a few crowded, repeated ids within a token.
//! * `grouped_gemm_{f32,f16,bf16,f8_e4m3}`: the dense router GEMM, grouped expert GEMMs with and without
//!   the gather index (from a real dispatch plan), empty experts, rows past the last offset
//!   (must be written as zero), M = 0 and 1, sizes one off 16/32/64/128, N = 257, K = 7168.
//!   F8E4M3 weights are quantized in blocks of 16x32, 5x12 (odd N) or 128x128 (K >= 1024), each
//!   block scaled by its own power of two ([`check::fp8_weight`]).
//! * `grouped_gemm_swiglu_{f32,f16,bf16,f8_e4m3}`: the gate/up projection with SwiGLU fused, against the
//!   oracle's `swiglu(grouped_gemm(..))`: dense (the shared expert) for M = 0, 1, 33; decode
//!   (T = 1, E = 256, k = 8 and T = 3, E = 16, k = 4); prefill with groups of 0, 1, 17, 65 and 130
//!   rows and 2I = 130; gathered rows; rows past the last offset (zero); I = 1 with K = 7168.
//! * `activation_f32`: SwiGLU, sizes off tile boundaries, M = 0, gates of ±100 (f32 `exp`
//!   overflows: `silu` must still be finite).
//! * `combine_f32`: with and without the shared expert, T = 0 and 1, k = 1 and k = E, H = 1, 127,
//!   129, 7168.
//! * `forward_{f32,f16,bf16,f8_e4m3}`: the whole layer via [`moe_hal::Layer::upload`] and
//!   [`moe_hal::ops::forward`]: Mixtral-style softmax, softmax without renormalisation plus a
//!   shared expert, DeepSeek-V3 (E = 256) with and without a shared expert, Kimi K2 (E = 384),
//!   decode (T = 1) for both routings, T = 0, k = E for both, 128 experts and 2 tokens (most
//!   experts empty), hidden 7168, and an f32 router beside f16/bf16 experts (as DeepSeek-V3 and
//!   Kimi K2 checkpoints store it); F8E4M3 experts beside a bf16 (or f32) router.
//! * `*_invalid` (one per op): every wrong shape and dtype (and missing or misshapen F8E4M3
//!   block scales) through [`moe_hal::ops`] and
//!   [`moe_hal::Layer::upload`] is `Error::InvalidArgument`; top-k > E, bad group settings;
//!   data-dependent bad input (an expert id >= E or u32::MAX to `permute`, non-cumulative or
//!   overlong offsets and an out-of-range gather index to `grouped_gemm` and its fused form, at
//!   decode and at tiled shapes with f32, f16, bf16 and F8E4M3 weights so every kernel family sees them, an out-of-range
//!   `row_index` to `combine`) is `InvalidArgument` from the op or at the latest from the next
//!   `synchronize`, and the backend then runs a valid op correctly. These cases run alone
//!   ([`Case::exclusive`]) so a deferred error cannot surface in another test.

#![warn(missing_docs)]
pub mod cases;
pub mod check;
pub mod oracle;
mod rng;
mod runner;

pub use moe_hal;
pub use rng::Rng;
pub use runner::{Case, CaseFn, CaseInfo, GROUPS, Outcome, Slot, backend_required, cases, report_line, run_all, run_case, run_group};

#[doc(hidden)]
pub use runner::{check_groups, run_group_test};

/// Instantiates the whole suite for one backend: `suite!(name, ctor)` expands to `mod name`
/// with one `#[test]` per group of [`GROUPS`] (named after the group, e.g. `name::forward_bf16`).
///
/// * `name` names the module and the backend (as `MOE_REQUIRE_BACKENDS` spells it);
/// * `ctor` is an expression of type `moe_hal::Result<B>` for some `B: Backend`, evaluated once,
///   on first use, and shared by every test of the instance.
///
/// ```ignore
/// moe_conformance::suite!(cpu, Ok(moe_cpu::CpuBackend::new()));
/// ```
#[macro_export]
macro_rules! suite {
    ($name:ident, $ctor:expr $(,)?) => {
        $crate::__suite_groups!(
            $name,
            $ctor,
            true;
            router_topk_f32,
            router_topk_f32_invalid,
            permute_u32,
            permute_u32_invalid,
            grouped_gemm_f32,
            grouped_gemm_f16,
            grouped_gemm_bf16,
            grouped_gemm_f8_e4m3,
            grouped_gemm_f32_invalid,
            grouped_gemm_swiglu_f32,
            grouped_gemm_swiglu_f16,
            grouped_gemm_swiglu_bf16,
            grouped_gemm_swiglu_f8_e4m3,
            grouped_gemm_swiglu_f32_invalid,
            activation_f32,
            activation_f32_invalid,
            combine_f32,
            combine_f32_invalid,
            forward_f32,
            forward_f16,
            forward_bf16,
            forward_f8_e4m3,
            forward_f32_invalid
        );
    };
}

/// [`suite!`] with the `forward_*` groups only: for an instance that differs from another only
/// in how its `forward` runs (the CUDA backend's graph mode), so the ops' groups are not run twice.
///
/// ```ignore
/// moe_conformance::suite_forward!(cuda_graphs, moe_cuda::CudaBackend::new().map(|b| b.with_forward_graphs(true)));
/// ```
#[macro_export]
macro_rules! suite_forward {
    ($name:ident, $ctor:expr $(,)?) => {
        $crate::__suite_groups!($name, $ctor, false; forward_f32, forward_f16, forward_bf16, forward_f8_e4m3, forward_f32_invalid);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __suite_groups {
    ($name:ident, $ctor:expr, $every:expr; $($group:ident),+) => {
        #[allow(unused_imports)]
        mod $name {
            use super::*;

            static BACKEND: $crate::Slot = ::std::sync::OnceLock::new();

            fn ctor() -> $crate::moe_hal::Result<impl $crate::moe_hal::Backend> {
                $ctor
            }

            $(
                #[test]
                fn $group() {
                    $crate::run_group_test(&BACKEND, stringify!($name), ctor, stringify!($group));
                }
            )+

            #[test]
            fn suite_lists_every_group() {
                fn check<B: $crate::moe_hal::Backend>(_: fn() -> $crate::moe_hal::Result<B>) {
                    $crate::check_groups::<B>(&[$(stringify!($group)),+], $every);
                }
                check(ctor);
            }
        }
    };
}
