//! # moe-hal: one device trait for the Mixture-of-Experts layer
//!
//! moe-hal runs the MoE layer of DeepSeek-class models (DeepSeek-V3, Kimi K2, Qwen3-MoE, Mixtral)
//! on any accelerator. A backend implements one trait, [`Backend`]: memory, a capability query,
//! and five ops, plus the gate/up projection with SwiGLU fused ([`Backend::grouped_gemm_swiglu`],
//! which defaults to two of them). The layer is those ops in sequence ([`forward::composed`]),
//! which a backend may fuse further. The conformance suite (the `moe-conformance` crate) proves a backend computes the same
//! layer as an independent f64 oracle.
//!
//! | concept | host | device |
//! |---|---|---|
//! | a tensor | [`HostTensor`] | [`Tensor`] (`B::Buffer` + dtype + shape) |
//! | FP8 block scales | [`BlockScales<HostTensor>`] | [`BlockScales<Tensor>`] ([`fp8`]) |
//! | one layer's weights | [`HostLayer`] | [`Layer`] ([`Layer::upload`]) |
//! | an op | [`host::grouped_gemm`] .. | [`Backend::grouped_gemm`] .. via [`ops::grouped_gemm`] .. |
//! | a port's first day | | [`fallback::grouped_gemm`] ..: download, host, upload |
//!
//! The pipeline of one layer, for `T` tokens, `E` experts, top-`k`:
//!
//! ```text
//! x [T,H] ─grouped_gemm(router)→ logits [T,E] ─router_topk→ topk_ids, topk_weights [T,k]
//!          ─permute→ expert_offsets [E+1], row_index [T*k], token_index [T*k]
//!          ─grouped_gemm(gate_up, gathered)→ [T*k,2I] ─activation→ [T*k,I]
//!          ─grouped_gemm(down)→ y [T*k,H] ─combine(+ shared expert)→ out [T,H]
//! ```
//!
//! Everything is checked once, in front of the trait, by [`ops`]; backends assume valid shapes.
//! Errors are one enum, [`Error`], each variant a sentence that names what is wrong.

#![warn(missing_docs)]
mod backend;
mod dtype;
mod error;
pub mod fallback;
pub mod flags;
pub mod forward;
pub mod fp8;
pub mod gemv;
pub mod host;
mod layer;
pub mod ops;
mod tensor;

pub use backend::{Backend, BackendInfo, Op};
pub use dtype::DType;
pub use error::{Error, Result, catch_panic, panic_is_caught, panic_message};
pub use layer::{HostLayer, HostTensor, Layer, MoeConfig, Routing, RoutingParams, router_dtype};
pub use tensor::{BlockScales, Tensor};
