//! DeepSeek's fine-grained FP8 weights (DeepSeek-V3's and Kimi K2's released checkpoints):
//! `float8_e4m3fn` values with a `float32` `weight_scale_inv` per block of `weight_block_size`
//! (`[128, 128]` there), dequantized on load as `q * scale_inv`, the way DeepSeek's
//! `fp8_cast_bf16.py` and transformers' fine-grained FP8 quantizer do.

use std::fmt;

use moe_hal::DType;

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
    /// BF16 for FP8, as DeepSeek's own conversion and transformers' CPU fallback produce (F32,
    /// asked for, keeps `q * scale_inv` exactly as transformers computes it).
    pub fn default_dtype(self) -> DType {
        match self {
            Stored::Float(d) => d,
            Stored::Fp8E4M3 { .. } => DType::BF16,
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

/// DeepSeek's block size, when a checkpoint has FP8 weights but its config does not say.
pub const DEFAULT_BLOCK: [usize; 2] = [128, 128];

/// Every `float8_e4m3fn` byte as f32: sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent
/// 0 is subnormal (`m * 2^-9`); `S.1111.111` is NaN; there is no infinity (the largest finite
/// value is 448).
pub const E4M3: [f32; 256] = {
    let mut t = [0f32; 256];
    let mut b = 0;
    while b < 256 {
        let (e, m) = ((b >> 3) & 0xF, b & 7);
        let v = if e == 0xF && m == 7 {
            f32::NAN
        } else if e == 0 {
            m as f32 / 512.0
        } else {
            f32::from_bits(((e as u32 + 120) << 23) | ((m as u32) << 20))
        };
        t[b] = if b & 0x80 != 0 { -v } else { v };
        b += 1;
    }
    t
};

/// Whether an E4M3 byte is NaN (`0x7F`, `0xFF`).
#[inline]
pub fn is_nan(b: u8) -> bool {
    b & 0x7F == 0x7F
}

/// The shape of the scale grid for a weight of `shape` in blocks of `block`: the leading
/// dimensions, then `ceil(rows / block[0])` and `ceil(columns / block[1])`.
pub fn scale_shape(shape: &[usize], block: [usize; 2]) -> Vec<usize> {
    let n = shape.len();
    let mut s = shape.to_vec();
    if n >= 2 {
        s[n - 2] = shape[n - 2].div_ceil(block[0]);
        s[n - 1] = shape[n - 1].div_ceil(block[1]);
    }
    s
}

/// Walks whole rows of one weight block by block: `src` holds rows `row0..` (counted over the
/// leading dimensions too, `rows` per matrix) of `cols` E4M3 bytes each; `scales` is the whole
/// weight's scale grid (row-major, [`scale_shape`]). `each` gets, per run of a row inside one
/// block, the index in `src` of its first byte, its bytes, and their scale: each value is
/// `E4M3[q] * scale` in f32, as transformers computes it.
pub fn for_each_block(
    src: &[u8],
    row0: usize,
    rows: usize,
    cols: usize,
    block: [usize; 2],
    scales: &[f32],
    mut each: impl FnMut(usize, &[u8], f32),
) {
    let (grid_rows, grid_cols) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
    for (i, row) in src.chunks_exact(cols).enumerate() {
        let g = row0 + i;
        let (matrix, r) = (g / rows, g % rows);
        let grid_row = &scales[(matrix * grid_rows + r / block[0]) * grid_cols..][..grid_cols];
        for ((c, run), &scale) in row.chunks(block[1]).enumerate().zip(grid_row) {
            each(i * cols + c * block[1], run, scale);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table against the format's definition evaluated in f64.
    #[test]
    fn e4m3_table_matches_the_definition() {
        for b in 0..=255u8 {
            let (s, e, m) = (b >> 7, ((b >> 3) & 0xF) as i32, (b & 7) as f64);
            let want = if e == 15 && m == 7.0 {
                f64::NAN
            } else if e == 0 {
                m / 8.0 * 2f64.powi(-6)
            } else {
                (1.0 + m / 8.0) * 2f64.powi(e - 7)
            };
            let want = if s == 1 { -want } else { want };
            let got = E4M3[b as usize] as f64;
            assert!(got == want || (got.is_nan() && want.is_nan()), "byte {b:#04x}: {got} != {want}");
            assert_eq!(is_nan(b), want.is_nan(), "byte {b:#04x}");
        }
        assert_eq!((E4M3[0x7E], E4M3[0x38], E4M3[0x01], E4M3[0x80].to_bits()), (448.0, 1.0, 2f32.powi(-9), (-0f32).to_bits()));
    }

    /// Partial edge blocks, a second matrix, and a row range that starts mid-matrix.
    #[test]
    fn dequantize_picks_each_elements_block() {
        let (rows, cols, block) = (3, 5, [2, 2]);
        assert_eq!(scale_shape(&[2, rows, cols], block), [2, 2, 3]);
        let scales: Vec<f32> = (0..12).map(|i| (i + 1) as f32).collect();
        let src = vec![0x38u8; 2 * rows * cols]; // every value 1.0
        let mut got = vec![0f32; 4 * cols];
        // Rows 2..6 of the 6: matrix 0 row 2, then matrix 1 rows 0..3.
        for_each_block(&src[2 * cols..], 2, rows, cols, block, &scales, |at, run, scale| {
            for (j, &q) in run.iter().enumerate() {
                got[at + j] = E4M3[q as usize] * scale;
            }
        });
        let want = [
            [4., 4., 5., 5., 6.],      // matrix 0, row 2: grid row 1
            [7., 7., 8., 8., 9.],      // matrix 1, row 0: grid row 0
            [7., 7., 8., 8., 9.],      // row 1
            [10., 10., 11., 11., 12.], // row 2: grid row 1
        ];
        assert_eq!(got, want.concat());
    }
}
