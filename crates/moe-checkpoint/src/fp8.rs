//! DeepSeek's fine-grained FP8 weights (DeepSeek-V3's and Kimi K2's released checkpoints):
//! `float8_e4m3fn` values with a `float32` `weight_scale_inv` per block of `weight_block_size`
//! (`[128, 128]` there), dequantized on load as `q * scale_inv`, the way DeepSeek's
//! `fp8_cast_bf16.py` and transformers' fine-grained FP8 quantizer do.

use std::fmt;

use moe_hal::DType;

pub use moe_hal::fp8::{DEFAULT_BLOCK, E4M3, first_nan, for_each_block, scale_shape};

/// How a checkpoint stores a weight tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// Plain floats of this dtype (F32, F16 or BF16).
    Float(DType),
    /// `float8_e4m3fn` with one scale per `block` (`[rows, columns]` of the last two dimensions;
    /// blocks at the right and bottom edges may be partial), dequantized on load.
    Fp8E4M3 {
        /// `quantization_config.weight_block_size`.
        block: [usize; 2],
    },
}

impl Stored {
    /// The storage dtype a layer gets when the caller forces none: the same dtype for floats;
    /// F8E4M3 for FP8, kept as stored with its block scales (half the memory of bf16, and the
    /// checkpoint's exact values). `bf16` dequantizes as DeepSeek's own conversion does, `f32`
    /// as transformers computes it.
    pub fn default_dtype(self) -> DType {
        match self {
            Stored::Float(d) => d,
            Stored::Fp8E4M3 { .. } => DType::F8E4M3,
        }
    }
}

impl fmt::Display for Stored {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stored::Float(d) => write!(f, "{d}"),
            Stored::Fp8E4M3 { block: [r, c] } => write!(f, "f8_e4m3 with {r}x{c} block scales"),
        }
    }
}
