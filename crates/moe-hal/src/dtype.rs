//! Element types of tensors.

use half::{bf16, f16};

/// Element type of a tensor.
///
/// `F32`, `F16` and `BF16` are the *storage* dtypes of expert and router weights, and `F8E4M3`
/// (with block scales) of expert weights. Activations (hidden states, logits, intermediate
/// results) are always `F32` on every backend, and every op accumulates in at least f32. `U32`
/// holds expert ids and dispatch indices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DType {
    /// IEEE binary32.
    F32,
    /// IEEE binary16.
    F16,
    /// bfloat16: the top half of an f32.
    BF16,
    /// `float8_e4m3fn`, expert weights only, always with one f32 scale per block (DeepSeek-V3's
    /// and Kimi K2's native format; see [`crate::fp8`] and [`crate::BlockScales`]). Its
    /// [`DType::encode`] and [`DType::decode`] are the raw, unscaled values.
    F8E4M3,
    /// Unsigned 32-bit integers (ids and indices).
    U32,
}

impl DType {
    /// The weight storage dtypes, in the order the conformance suite visits them.
    pub const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

    /// Every dtype expert weights may be stored in: [`DType::FLOATS`], then block-scaled
    /// [`DType::F8E4M3`].
    pub const WEIGHTS: [DType; 4] = [DType::F32, DType::F16, DType::BF16, DType::F8E4M3];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::U32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F8E4M3 => 1,
        }
    }

    /// Bytes of a tensor of this dtype and `shape`: an error, not an overflow, when the count
    /// does not fit `usize` (a hand-made shape, a corrupt header). Backends size their
    /// allocations with it.
    pub fn tensor_bytes(self, shape: &[usize]) -> crate::Result<usize> {
        match shape.iter().try_fold(self.size(), |n, &d| n.checked_mul(d)) {
            Some(n) => Ok(n),
            None => crate::invalid!("a {self} tensor of shape {shape:?} has more bytes than this machine can address"),
        }
    }

    /// The name used on the command line and in reports: `f32`, `f16`, `bf16`, `f8_e4m3`, `u32`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F8E4M3 => "f8_e4m3",
            DType::U32 => "u32",
        }
    }

    /// True for the three plain floating-point dtypes, f32, f16 and bf16 (the dtypes a router,
    /// and any tensor without block scales, may have).
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// True for the dtypes expert weights may be stored in ([`DType::WEIGHTS`]).
    pub fn is_weight(self) -> bool {
        self != DType::U32
    }

    /// True for the block-scaled dtypes (a tensor of one carries [`crate::BlockScales`]).
    pub fn is_block_scaled(self) -> bool {
        self == DType::F8E4M3
    }

    /// Converts f32 values to this (float) dtype's little-endian bytes, rounding to nearest even
    /// (F8E4M3: unscaled, saturating at ±448).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            DType::F32 => bytemuck::cast_slice(values).to_vec(),
            DType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
            DType::BF16 => values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect(),
            DType::F8E4M3 => values.iter().map(|v| crate::fp8::encode(*v)).collect(),
            DType::U32 => panic!("DType::encode is for float dtypes; use bytemuck for u32"),
        }
    }

    /// Decodes this (float) dtype's little-endian bytes to f32 values (exact; F8E4M3: unscaled).
    pub fn decode(self, bytes: &[u8]) -> Vec<f32> {
        let n = self.size();
        bytes
            .chunks_exact(n)
            .map(|c| match self {
                DType::F32 => f32::from_le_bytes([c[0], c[1], c[2], c[3]]),
                DType::F16 => f16::from_le_bytes([c[0], c[1]]).to_f32(),
                DType::BF16 => bf16::from_le_bytes([c[0], c[1]]).to_f32(),
                DType::F8E4M3 => crate::fp8::E4M3[c[0] as usize],
                DType::U32 => u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32,
            })
            .collect()
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for DType {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(DType::F32),
            "f16" | "float16" | "half" => Ok(DType::F16),
            "bf16" | "bfloat16" => Ok(DType::BF16),
            "f8_e4m3" | "fp8" | "f8" | "e4m3" | "float8_e4m3fn" => Ok(DType::F8E4M3),
            "u32" => Ok(DType::U32),
            _ => crate::invalid!("unknown dtype {s:?}; expected f32, f16, bf16 or f8_e4m3"),
        }
    }
}
