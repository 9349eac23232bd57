//! `float8_e4m3fn` weights with block scales: DeepSeek-V3's and Kimi K2's native checkpoint
//! format, and the storage of [`crate::DType::F8E4M3`] weights.
//!
//! A weight of shape `[.., N, K]` is one E4M3 byte `q` per element plus an f32 scale per block of
//! `block = [rows, columns]` of its last two dimensions (DeepSeek: `[128, 128]`; blocks at the
//! bottom and right edges may be partial): element `[.., r, c]` is
//! `E4M3[q] * scales[.., r / block[0], c / block[1]]`, the product taken in f32, as DeepSeek's
//! `weight_dequant` and transformers' fine-grained FP8 loader compute it. DeepSeek calls the
//! scales `weight_scale_inv`: they multiply, despite the name.

use crate::{DType, Result, invalid};
use rayon::prelude::*;

/// DeepSeek's block size, and the one [`crate::HostLayer::to_dtype`] quantizes with.
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

/// Whether any byte of `q` is NaN. Folds whole chunks without an early exit inside one, so the
/// compiler vectorises it: the CPU backend runs it over F8E4M3 weights as they are uploaded.
pub fn any_nan(q: &[u8]) -> bool {
    q.chunks(512).any(|c| c.iter().fold(0u8, |a, &b| a | ((b | 0x80) == 0xFF) as u8) != 0)
}

/// The index of the first NaN byte of `q`, if any: [`any_nan`] over 64 KiB chunks in parallel,
/// then a byte at a time in the first chunk that has one. (A parallel `position_first` tests a
/// byte at a time and was most of the time spent making a layer's F8E4M3 tensors.)
pub fn first_nan(q: &[u8]) -> Option<usize> {
    const CHUNK: usize = 1 << 16;
    let c = q.par_chunks(CHUNK).position_first(any_nan)?;
    q[c * CHUNK..].iter().position(|&b| is_nan(b)).map(|i| c * CHUNK + i)
}

/// `x` rounded to the nearest integer, ties to even, for `|x| < 2^22`: adding and subtracting
/// 2^23 rounds in the FPU's default mode (`round_ties_even` is a call to `rintf` on x86-64
/// without SSE4.1, and was a tenth of the time spent quantizing).
#[inline]
fn rint(x: f32) -> f32 {
    (x + 8388608.0) - 8388608.0
}

/// The E4M3 byte nearest to `v` (ties to even), saturating at ±448 (the format has no
/// infinity); NaN becomes `0x7F`. `E4M3[encode(v)] == v` whenever `v` is representable.
pub fn encode(v: f32) -> u8 {
    if v.is_nan() {
        return 0x7F;
    }
    let sign = if v.is_sign_negative() { 0x80u8 } else { 0 };
    let a = v.abs();
    if a >= 448.0 {
        return sign | 0x7E;
    }
    let byte = if a < 0.015625 {
        // Below 2^-6, the subnormal grid m * 2^-9; m = 8 is 2^-6, byte 0x08, the first normal.
        rint(a * 512.0) as u32
    } else {
        // Eight steps per binade: scale the binade to [8, 16) (times 2^(3 - e), built from its
        // exponent bits: e is -6..8) and round once; m = 8 carries into the exponent, as it should.
        let e = ((a.to_bits() >> 23) as i32) - 127;
        let m = rint(a * f32::from_bits(((130 - e) as u32) << 23)) as u32 - 8;
        (e + 7) as u32 * 8 + m
    };
    sign | byte as u8
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
/// leading dimensions too, `rows` per matrix) of `cols` elements each; `scales` is the whole
/// weight's scale grid (row-major, [`scale_shape`]). `each` gets, per run of a row inside one
/// block, the index in `src` of its first element, the run, and its scale.
pub fn for_each_block<T>(
    src: &[T],
    row0: usize,
    rows: usize,
    cols: usize,
    block: [usize; 2],
    scales: &[f32],
    mut each: impl FnMut(usize, &[T], f32),
) {
    if cols == 0 {
        return;
    }
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

/// Checks a weight's block scales against its dtype and shape: a block-scaled dtype
/// ([`crate::DType::F8E4M3`]) needs `scales` = `(block, scale dtype, scale shape)` with a
/// positive block, f32 scales and the shape [`scale_shape`] gives; any other dtype takes none.
/// `what` names the weight in the error.
pub fn check_scales(what: &str, dtype: DType, shape: &[usize], scales: Option<([usize; 2], DType, &[usize])>) -> Result<()> {
    match (dtype.is_block_scaled(), scales) {
        (false, None) => Ok(()),
        (false, Some(_)) => invalid!("{what} is {dtype}, which takes no block scales, but has them"),
        (true, None) => invalid!("{what} is {dtype} but has no block scales (one f32 per block, see moe_hal::fp8)"),
        (true, Some((block, sdt, sshape))) => {
            if shape.len() < 2 {
                return invalid!("{what} is {dtype} with block scales, so it must be a matrix or [G, N, K], got shape {shape:?}");
            }
            if block[0] == 0 || block[1] == 0 {
                return invalid!("{what} has a block of {}x{}; both sides must be positive", block[0], block[1]);
            }
            if sdt != DType::F32 {
                return invalid!("the block scales of {what} must be f32, got {sdt}");
            }
            let want = scale_shape(shape, block);
            if sshape != want {
                return invalid!(
                    "the block scales of {what} (shape {shape:?}, {}x{} blocks) must have shape {want:?}, got {sshape:?}",
                    block[0],
                    block[1]
                );
            }
            Ok(())
        }
    }
}

/// Rows per matrix and columns of a weight of `shape` (the last two dimensions; a vector is one
/// row).
fn rows_cols(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [c] => (1, *c),
        [.., r, c] => (*r, *c),
    }
}

/// Quantizes `values` (a weight of `shape`, row-major) to E4M3 with one scale per `block`, the
/// way DeepSeek quantized its weights: each block's scale is its largest magnitude over 448 (1
/// for an all-zero block), so its largest value lands on ±448, and each value becomes
/// `encode(value / scale)`. Returns the bytes and the scale grid ([`scale_shape`]). Rows of
/// blocks run in parallel (DeepSeek-V3's gate/up weights are 7.5 billion values).
pub fn quantize(values: &[f32], shape: &[usize], block: [usize; 2]) -> (Vec<u8>, Vec<f32>) {
    let (rows, cols) = rows_cols(shape);
    let mut scales = vec![0f32; scale_shape(shape, block).iter().product()];
    let mut q = vec![0u8; values.len()];
    if cols == 0 || rows == 0 {
        return (q, scales);
    }
    let grid_cols = cols.div_ceil(block[1]);
    // One unit per row of blocks of each matrix: its values, its bytes and its scales, all
    // contiguous and in order, so the slices split off one after another.
    let mut units = Vec::new();
    let (mut v, mut qr, mut sr) = (values, &mut q[..], &mut scales[..]);
    while !v.is_empty() {
        for r0 in (0..rows).step_by(block[0]) {
            let n = block[0].min(rows - r0) * cols;
            let (vu, vt) = v.split_at(n);
            let (qu, qt) = std::mem::take(&mut qr).split_at_mut(n);
            let (su, st) = std::mem::take(&mut sr).split_at_mut(grid_cols);
            units.push((vu, qu, su));
            (v, qr, sr) = (vt, qt, st);
        }
    }
    units.into_par_iter().for_each(|(v, q, s)| {
        for row in v.chunks_exact(cols) {
            for (m, run) in s.iter_mut().zip(row.chunks(block[1])) {
                *m = run.iter().fold(*m, |m, x| m.max(x.abs()));
            }
        }
        for m in s.iter_mut() {
            *m = if *m > 0.0 { *m / 448.0 } else { 1.0 };
        }
        for (qrow, row) in q.chunks_exact_mut(cols).zip(v.chunks_exact(cols)) {
            for ((qb, run), scale) in qrow.chunks_mut(block[1]).zip(row.chunks(block[1])).zip(s.iter()) {
                qb.iter_mut().zip(run).for_each(|(o, x)| *o = encode(x / scale));
            }
        }
    });
    (q, scales)
}

/// The f32 values of E4M3 bytes `q` (a weight of `shape`) with their block `scales`.
pub fn dequantize(q: &[u8], shape: &[usize], block: [usize; 2], scales: &[f32]) -> Vec<f32> {
    let (rows, cols) = rows_cols(shape);
    let mut out = vec![0f32; q.len()];
    for_each_block(q, 0, rows, cols, block, scales, |at, run, scale| {
        for (o, &b) in out[at..at + run.len()].iter_mut().zip(run) {
            *o = E4M3[b as usize] * scale;
        }
    });
    out
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

    /// Every byte round-trips; every value between two neighbours goes to the nearer (ties to
    /// the even byte); beyond 448 saturates.
    #[test]
    fn encode_rounds_to_nearest_even_and_saturates() {
        for b in 0..=255u8 {
            if !is_nan(b) && b != 0x80 {
                assert_eq!(encode(E4M3[b as usize]), b, "byte {b:#04x}");
            }
        }
        assert_eq!(encode(-0.0), 0x80);
        for b in 0..0x7Eu8 {
            let (lo, hi) = (E4M3[b as usize], E4M3[b as usize + 1]);
            let mid = (lo + hi) / 2.0;
            assert_eq!(encode(lo + (mid - lo) * 0.5), b);
            assert_eq!(encode(mid + (hi - mid) * 0.5), b + 1);
            assert_eq!(encode(mid), if b % 2 == 0 { b } else { b + 1 }, "tie between {b:#04x} and the next");
            assert_eq!(encode(-mid), 0x80 | if b % 2 == 0 { b } else { b + 1 });
        }
        assert_eq!((encode(460.0), encode(1e9), encode(-1e9), encode(f32::NAN)), (0x7E, 0x7E, 0xFE, 0x7F));
    }

    /// The first NaN wherever it lies: none, the first byte, either side of a chunk boundary,
    /// the last byte, and a later NaN that must not win over an earlier one.
    #[test]
    fn first_nan_finds_the_first() {
        let n = 3 * (1 << 16) + 5;
        assert_eq!(first_nan(&vec![0x7Eu8; n]), None);
        assert_eq!(first_nan(&[]), None);
        for at in [0, 1, (1 << 16) - 1, 1 << 16, 2 * (1 << 16) + 7, n - 1] {
            for nan in [0x7F, 0xFF] {
                let mut q: Vec<u8> = (0..n).map(|i| (i % 251) as u8 & 0xBF).collect();
                q[at] = nan;
                if at + 70000 < n {
                    q[at + 70000] = 0x7F;
                }
                assert_eq!(first_nan(&q), Some(at), "NaN {nan:#04x} at {at}");
            }
        }
    }

    /// Partial edge blocks, a second matrix, and a row range that starts mid-matrix.
    #[test]
    fn for_each_block_picks_each_elements_block() {
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
        assert_eq!(dequantize(&src, &[2, rows, cols], block, &scales)[3 * cols..], want[1..].concat()[..]);
    }

    /// Each block's largest magnitude lands on 448 and comes back exactly; the rest within half
    /// an E4M3 step; an all-zero block gets scale 1.
    #[test]
    fn quantize_scales_each_block_to_448() {
        let shape = [2, 5, 7];
        let mut v: Vec<f32> = (0..70).map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.013 * (1 + i / 35) as f32).collect();
        v[..7].fill(0.0); // row 0 of matrix 0
        v[7..14].fill(0.0); // row 1: block rows 0..2 of matrix 0 are all zero in columns 0..7
        let (q, s) = quantize(&v, &shape, [2, 4]);
        assert_eq!(s.len(), 2 * 3 * 2);
        assert_eq!(s[..2], [1.0, 1.0]);
        let back = dequantize(&q, &shape, [2, 4], &s);
        for (i, (a, b)) in v.iter().zip(&back).enumerate() {
            assert!((a - b).abs() <= a.abs() / 16.0 + 1e-6, "element {i}: {a} came back as {b}");
        }
        let amax = v[14..18].iter().chain(&v[21..25]).fold(0f32, |m, x| m.max(x.abs()));
        assert_eq!(s[2], amax / 448.0);
    }
}
