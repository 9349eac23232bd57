//! The host GEMM ([`grouped_gemm`]) and its register tiles: portable code for any CPU, AVX2 + FMA
//! and AVX-512 intrinsics chosen at run time ([`isa`]; `MOE_CPU_ISA=avx2|portable` caps it).

use super::{Accumulate, Weights, check_offsets};
use crate::{Result, invalid};
use rayon::prelude::*;

/// Dot products of one activation row `x` with the `nb` weight rows of `w` (`nb * k` values):
/// four weight rows at a time, so each load of `x` feeds four multiply-adds, with `L` partial sums
/// per row (independent chains the compiler maps onto `L`-lane vectors). `FMA` fuses each
/// multiply-add (one rounding instead of two); without the instruction it must stay off, or every
/// step would be a library call.
#[inline(always)]
fn row_times_block_generic<const L: usize, const FMA: bool>(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    #[inline(always)]
    fn madd<const FMA: bool>(acc: f32, a: f32, b: f32) -> f32 {
        if FMA { a.mul_add(b, acc) } else { acc + a * b }
    }
    #[inline(always)]
    fn reduce<const L: usize>(a: &[f32; L]) -> f32 {
        let mut v = *a;
        let mut width = L;
        while width > 1 {
            width /= 2;
            for l in 0..width {
                v[l] += v[l + width];
            }
        }
        v[0]
    }
    let nb = out.len();
    let chunks = k / L;
    let mut j = 0;
    while j + 4 <= nb {
        let rows = [&w[j * k..(j + 1) * k], &w[(j + 1) * k..(j + 2) * k], &w[(j + 2) * k..(j + 3) * k], &w[(j + 3) * k..(j + 4) * k]];
        let mut acc = [[0f32; L]; 4];
        for c in 0..chunks {
            let xs = &x[c * L..c * L + L];
            for (r, row) in rows.iter().enumerate() {
                let ws = &row[c * L..c * L + L];
                for l in 0..L {
                    acc[r][l] = madd::<FMA>(acc[r][l], xs[l], ws[l]);
                }
            }
        }
        for (r, row) in rows.iter().enumerate() {
            let mut tail = 0f32;
            for i in chunks * L..k {
                tail = madd::<FMA>(tail, x[i], row[i]);
            }
            out[j + r] = reduce(&acc[r]) + tail;
        }
        j += 4;
    }
    for (jj, o) in out.iter_mut().enumerate().skip(j) {
        let row = &w[jj * k..(jj + 1) * k];
        let mut a = [0f32; L];
        for c in 0..chunks {
            for l in 0..L {
                a[l] = madd::<FMA>(a[l], x[c * L + l], row[c * L + l]);
            }
        }
        let mut tail = 0f32;
        for i in chunks * L..k {
            tail = madd::<FMA>(tail, x[i], row[i]);
        }
        *o = reduce(&a) + tail;
    }
}

/// Helpers of the AVX2 tiles below.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The sum of the 8 lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// 8 bf16 values from `p` as f32 (a 16-bit shift each: exact).
    ///
    /// # Safety
    /// `p` points at 8 readable bf16 values.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn widen8(p: *const half::bf16) -> __m256 {
        // SAFETY: the caller passes a pointer to 8 readable bf16 values.
        let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }

    /// 8 E4M3 bytes from `p` as f32, unscaled (exact; see `widen_e4m3` in `host`: the bits placed
    /// in an f32, times 2^120; NaN bytes become NaN).
    ///
    /// # Safety
    /// `p` points at 8 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn e4m3x8(p: *const u8) -> __m256 {
        // SAFETY: the caller passes a pointer to 8 readable bytes.
        let b = _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(p as *const __m128i) });
        let em = _mm256_and_si256(b, _mm256_set1_epi32(0x7F));
        let bits = _mm256_or_si256(_mm256_slli_epi32::<24>(_mm256_and_si256(b, _mm256_set1_epi32(0x80))), _mm256_slli_epi32::<20>(em));
        let v = _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(f32::from_bits((120 + 127) << 23)));
        let nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(em, _mm256_set1_epi32(0x7F)));
        _mm256_blendv_ps(v, _mm256_set1_ps(f32::NAN), nan)
    }

    /// [`e4m3x8`] for bytes known not to be NaN (see [`super::Direct::E4m3`]): four ops instead
    /// of nine. Sign-extending puts the sign in bit 31 and, shifted by 20, exponent and mantissa
    /// in bits 20..27, with copies of the sign in bits 27..31 that the mask clears; then 2^120
    /// rebiases the exponent (exact, subnormals included). A NaN byte would read as ±480.
    ///
    /// # Safety
    /// `p` points at 8 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn e4m3x8_nan_free(p: *const u8) -> __m256 {
        // SAFETY: the caller passes a pointer to 8 readable bytes.
        let s = _mm256_cvtepi8_epi32(unsafe { _mm_loadl_epi64(p as *const __m128i) });
        let bits = _mm256_and_si256(_mm256_slli_epi32::<20>(s), _mm256_set1_epi32(0x87F0_0000u32 as i32));
        _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(f32::from_bits((120 + 127) << 23)))
    }
}

/// The 4 x 3 register tile of [`rows4_times_block_avx2`] and [`rows4_times_bf16_avx2`], written
/// once: `$w` is the weight element type, `$load` turns a pointer to 8 of them into 8 f32 lanes,
/// `$get` one of them into an f32 (for the tail past the last multiple of 8).
macro_rules! rows4_tile_avx2 {
    ($(#[$doc:meta])* $name:ident, $w:ty, $load:expr, $get:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $name(xs: [&[f32]; 4], w: &[$w], k: usize, out: &mut [f32]) {
            use avx2::hsum;
            use std::arch::x86_64::*;
            let tail = |x: &[f32], row: &[$w]| -> f32 { (k / 8 * 8..k).map(|i| x[i] * $get(row[i])).sum() };
            let nb = out.len() / 4;
            let chunks = k / 8;
            for j in (0..nb).step_by(3) {
                // Three weight rows per pass; past the last row, the last one repeats (computed,
                // kept once).
                let (j1, j2) = ((j + 1).min(nb - 1), (j + 2).min(nb - 1));
                let (w0, w1, w2) = (&w[j * k..(j + 1) * k], &w[j1 * k..(j1 + 1) * k], &w[j2 * k..(j2 + 1) * k]);
                let mut acc = [_mm256_setzero_ps(); 12];
                for c in 0..chunks {
                    // SAFETY: c * 8 + 8 <= k, the length of every row and activation here.
                    unsafe {
                        // Prefetch as the one-row kernel does (see PREFETCH_AHEAD), once per
                        // 64-byte line of each weight stream (with MOE_CPU_ISA=avx2, Qwen3 bf16
                        // back to back: 83–91 against 108–114 ms at 128 tokens, 295–306
                        // against 327–338 at 512).
                        if (c * 8 * std::mem::size_of::<$w>()) % 64 == 0 {
                            for row in [w0, w1, w2] {
                                _mm_prefetch::<_MM_HINT_T1>(row.as_ptr().wrapping_add(c * 8 + PREFETCH_AHEAD) as *const i8);
                            }
                        }
                        let a = $load(w0.as_ptr().add(c * 8));
                        let b = $load(w1.as_ptr().add(c * 8));
                        let d = $load(w2.as_ptr().add(c * 8));
                        for r in 0..4 {
                            let xv = _mm256_loadu_ps(xs[r].as_ptr().add(c * 8));
                            acc[3 * r] = _mm256_fmadd_ps(xv, a, acc[3 * r]);
                            acc[3 * r + 1] = _mm256_fmadd_ps(xv, b, acc[3 * r + 1]);
                            acc[3 * r + 2] = _mm256_fmadd_ps(xv, d, acc[3 * r + 2]);
                        }
                    }
                }
                for r in 0..4 {
                    out[r * nb + j] = hsum(acc[3 * r]) + tail(xs[r], w0);
                    if j1 != j {
                        out[r * nb + j1] = hsum(acc[3 * r + 1]) + tail(xs[r], w1);
                    }
                    if j2 != j1 {
                        out[r * nb + j2] = hsum(acc[3 * r + 2]) + tail(xs[r], w2);
                    }
                }
            }
        }
    };
}

rows4_tile_avx2!(
    /// Four activation rows times the `nb` weight rows of `w`, into `out` (`4 * nb`, row-major),
    /// with AVX2 intrinsics: a register tile of 4 x 3 dot products (twelve 8-lane accumulators,
    /// three weight vectors and one activation vector: all 16 registers), so each weight load
    /// feeds four rows and each activation load three weight rows; twelve independent FMA chains
    /// cover the FMA latency (4 x 2 had eight: 10% slower at prefill). (Written with intrinsics
    /// because the compiler spilled every array-based version of this tile.)
    rows4_times_block_avx2,
    f32,
    |p: *const f32| _mm256_loadu_ps(p),
    |v: f32| v
);

rows4_tile_avx2!(
    /// [`rows4_times_block_avx2`] on unscaled E4M3 bytes, decoded in registers (the block scales
    /// are folded into the activations: see [`Direct::E4m3`]).
    rows4_times_e4m3_avx2,
    u8,
    |p: *const u8| avx2::e4m3x8(p),
    |v: u8| crate::fp8::E4M3[v as usize]
);

rows4_tile_avx2!(
    /// [`rows4_times_e4m3_avx2`] on bytes known not to be NaN (see [`Direct::E4m3`]).
    rows4_times_e4m3_nan_free_avx2,
    u8,
    |p: *const u8| avx2::e4m3x8_nan_free(p),
    |v: u8| crate::fp8::E4M3[v as usize]
);

rows4_tile_avx2!(
    /// [`rows4_times_block_avx2`] reading bf16 weights straight from the weights, widened in
    /// registers (a shift) as they load: no widened copy of the block. Each weight vector feeds
    /// four rows, so the widening costs a quarter of what a separate pass over the block would.
    rows4_times_bf16_avx2,
    half::bf16,
    |p: *const half::bf16| avx2::widen8(p),
    |v: half::bf16| v.to_f32()
);

/// Helpers of the AVX-512 tiles below.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// 16 bf16 values from `p` as f32 (a 16-bit shift each: exact).
    ///
    /// # Safety
    /// `p` points at 16 readable bf16 values.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen16(p: *const half::bf16) -> __m512 {
        // SAFETY: the caller passes a pointer to 16 readable bf16 values.
        let h = unsafe { _mm256_loadu_si256(p as *const __m256i) };
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }

    /// 16 E4M3 bytes from `p` as f32, unscaled (as [`super::avx2::e4m3x8`]).
    ///
    /// # Safety
    /// `p` points at 16 readable bytes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn e4m3x16(p: *const u8) -> __m512 {
        // SAFETY: the caller passes a pointer to 16 readable bytes.
        let b = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p as *const __m128i) });
        let em = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
        let bits = _mm512_or_si512(_mm512_slli_epi32::<24>(_mm512_and_si512(b, _mm512_set1_epi32(0x80))), _mm512_slli_epi32::<20>(em));
        let v = _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(f32::from_bits((120 + 127) << 23)));
        _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(em, _mm512_set1_epi32(0x7F)), _mm512_set1_ps(f32::NAN))
    }

    /// 16 E4M3 bytes known not to be NaN, as f32 times 2^-8, through f16: the 256-bit ops of
    /// [`super::avx2::e4m3x8_nan_free`]'s trick (sign-extend, shift by 7, clear the copy of the
    /// sign in bit 14) make an f16 with E4M3's exponent and mantissa under f16's bias 15
    /// instead of 7 (exact, subnormals included: f16 has E4M3's subnormals), and `vcvtph2ps`
    /// widens it. Three of its four ops are 256-bit, half the cost of 512-bit ones on Zen 4:
    /// Qwen3-30B-A3B at 128 tokens (8 rows per expert) ran 66.5–71.3 ms against 73.4–75.8 with
    /// the 512-bit f32 form, and the same at one token (back to back, three pairs).
    ///
    /// # Safety
    /// `p` points at 16 readable bytes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn e4m3x16_nan_free(p: *const u8) -> __m512 {
        // SAFETY: the caller passes a pointer to 16 readable bytes.
        let s = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(p as *const __m128i) });
        let h = _mm256_and_si256(_mm256_slli_epi16::<7>(s), _mm256_set1_epi16(0xBFFFu16 as i16));
        _mm512_cvtph_ps(h)
    }
}

/// The `R` x 4 register tile of [`rows_times_block_avx512`] and [`rows_times_bf16_avx512`]: as
/// [`rows4_tile_avx2`], with 16-lane vectors and 32 registers, so four weight rows per pass and
/// up to [`AVX512_ROWS`] activation rows (`4 R` accumulators, four weight vectors, one activation
/// vector): each activation load feeds four products, each weight load `R`. `R` below the most
/// takes an expert's last rows, so no row falls back to the one-row kernel.
macro_rules! rows_tile_avx512 {
    ($(#[$doc:meta])* $name:ident, $w:ty, $load:expr, $get:expr) => {
        rows_tile_avx512!($(#[$doc])* $name, $w, $load, $get, 1.0);
    };
    ($(#[$doc:meta])* $name:ident, $w:ty, $load:expr, $get:expr, $post:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $name<const R: usize>(xs: &[&[f32]], w: &[$w], k: usize, out: &mut [f32]) {
            use std::arch::x86_64::*;
            let xs: [&[f32]; R] = std::array::from_fn(|r| xs[r]);
            let tail = |x: &[f32], row: &[$w]| -> f32 { (k / 16 * 16..k).map(|i| x[i] * $get(row[i])).sum() };
            let nb = out.len() / R;
            let chunks = k / 16;
            for j in (0..nb).step_by(4) {
                // Past the last weight row, the last one repeats (computed, kept once).
                let js: [usize; 4] = std::array::from_fn(|q| (j + q).min(nb - 1));
                let ws: [&[$w]; 4] = std::array::from_fn(|q| &w[js[q] * k..(js[q] + 1) * k]);
                let mut acc = [[_mm512_setzero_ps(); 4]; R];
                for c in 0..chunks {
                    // SAFETY: c * 16 + 16 <= k, the length of every row and activation here.
                    unsafe {
                        // Prefetch as the one-row kernel does (see PREFETCH_AHEAD), once per
                        // 64-byte line of each weight stream.
                        if (c * 16 * std::mem::size_of::<$w>()) % 64 == 0 {
                            for row in &ws {
                                _mm_prefetch::<_MM_HINT_T1>(row.as_ptr().wrapping_add(c * 16 + PREFETCH_AHEAD) as *const i8);
                            }
                        }
                        let wv: [__m512; 4] = std::array::from_fn(|q| $load(ws[q].as_ptr().add(c * 16)));
                        for r in 0..R {
                            let xv = _mm512_loadu_ps(xs[r].as_ptr().add(c * 16));
                            for q in 0..4 {
                                acc[r][q] = _mm512_fmadd_ps(xv, wv[q], acc[r][q]);
                            }
                        }
                    }
                }
                for r in 0..R {
                    for q in 0..4 {
                        if q == 0 || js[q] != js[q - 1] {
                            out[r * nb + js[q]] = _mm512_reduce_add_ps(acc[r][q]) * $post + tail(xs[r], ws[q]);
                        }
                    }
                }
            }
        }
    };
}

/// Rows of one group from which, on AVX2 without AVX-512, an E4M3 block is widened to f32 once
/// per task (then the f32 tiles) rather than decoded in registers by every 4-row tile. Measured
/// on the 2-core Zen 4 with `MOE_CPU_ISA=avx2`, f8_e4m3, back to back (widened from 16 rows /
/// direct at every count): Qwen3-30B-A3B at 512 tokens (32 rows per expert) 382 / 481 ms,
/// DeepSeek-V3 with 16 experts at 128 tokens (64 rows) 812 / 1203 ms, at 16 tokens 170 / 180.
/// AVX-512 always decodes directly: its tiles hold six rows and its decode of bytes known not
/// to be NaN is four ops per 16 weights, so with 256 KiB tasks the direct tiles beat widening at
/// every count measured (Qwen3 at 512 tokens 252–264 / 293–318 ms, at 2048 tokens 1060 / 1111;
/// DeepSeek-V3 E16 at 64 tokens 292 / 323, at 128 tokens 564 / 597).
#[cfg(target_arch = "x86_64")]
const AVX2_F8_WIDEN_ROWS: usize = 16;

/// Most activation rows of one AVX-512 tile.
const AVX512_ROWS: usize = 6;

rows_tile_avx512!(
    /// [`rows4_times_block_avx2`] with AVX-512: an `R` x 4 tile of dot products.
    rows_times_block_avx512,
    f32,
    |p: *const f32| _mm512_loadu_ps(p),
    |v: f32| v
);

rows_tile_avx512!(
    /// [`rows4_times_bf16_avx2`] with AVX-512: bf16 weights widened in registers as they load.
    rows_times_bf16_avx512,
    half::bf16,
    |p: *const half::bf16| avx512::widen16(p),
    |v: half::bf16| v.to_f32()
);

rows_tile_avx512!(
    /// The same for unscaled E4M3 bytes (the block scales folded into the activations: see
    /// [`Direct::E4m3`]).
    rows_times_e4m3_avx512,
    u8,
    |p: *const u8| avx512::e4m3x16(p),
    |v: u8| crate::fp8::E4M3[v as usize]
);

rows_tile_avx512!(
    /// [`rows_times_e4m3_avx512`] on bytes known not to be NaN (see [`Direct::E4m3`]): the
    /// vectors decode to 2^-8 times the weights, so each dot product's vector part is scaled by
    /// 2^8 at the end (exact; scaling the activations instead could overflow them).
    rows_times_e4m3_nan_free_avx512,
    u8,
    |p: *const u8| avx512::e4m3x16_nan_free(p),
    |v: u8| crate::fp8::E4M3[v as usize],
    256.0
);

rows_tile_avx512!(
    /// The same for f16 weights (`vcvtph2ps`, part of AVX-512F).
    rows_times_f16_avx512,
    half::f16,
    |p: *const half::f16| _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)),
    |v: half::f16| v.to_f32()
);

/// Calls the AVX-512 tile `$f` for `$xs.len()` rows (1 to [`AVX512_ROWS`]); unsafe: the CPU must
/// have AVX-512F.
#[cfg(target_arch = "x86_64")]
macro_rules! avx512_rows {
    ($f:ident, $xs:expr, $($arg:expr),*) => {
        match $xs.len() {
            6 => $f::<6>($xs, $($arg),*),
            5 => $f::<5>($xs, $($arg),*),
            4 => $f::<4>($xs, $($arg),*),
            3 => $f::<3>($xs, $($arg),*),
            2 => $f::<2>($xs, $($arg),*),
            _ => $f::<1>($xs, $($arg),*),
        }
    };
}

/// How far ahead of their weight streams [`row_times_bf16_avx2`] and the AVX-512 tiles prefetch,
/// in elements (16 KiB of bf16; past a row's end that is the rows after it, which the block reads
/// next), into L2 (`_MM_HINT_T1`). Decode reads each weight once, so the loop waits on memory,
/// and one core keeps only so many L1 misses in flight; prefetching into L2, which tracks more,
/// from far enough ahead is what lifts it. History on the project's 2-core Zen 4, Qwen3-30B-A3B
/// bf16, back to back: no prefetch, 3.7–5.5 ms at 1 token; 4 KiB ahead into L1, 3.5–3.9 (and
/// 8–16 KiB into L1 no better); 4 KiB into L2, down stage 1.28–1.41 -> 1.10–1.15 ms; 16 KiB
/// into L2 (this), 2.1–2.5 ms at 1 token against 3.2–3.4 with the L1 hint in the same session,
/// 20.4–21.5 against 33–42 at 16 tokens, 68 against 86–90 at 128 and 249–252 against 267–268 at
/// 512 (three pairs; 32 and 64 KiB ahead were no better). The reads then pass 30 GB/s, more
/// than a plain streaming loop without prefetch gets from this VM.
#[cfg(target_arch = "x86_64")]
const PREFETCH_AHEAD: usize = 8192;

/// One activation row times `nb` weight rows read straight from the weights (no widened copy),
/// four weight rows per pass, AVX2: for decode, where each weight is used by one or two rows and
/// a widening pass would cost as much as the dot products. `$load` and `$get` as in
/// [`rows4_tile_avx2`].
macro_rules! row_avx2 {
    ($(#[$doc:meta])* $name:ident, $w:ty, $load:expr, $get:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn $name(x: &[f32], w: &[$w], k: usize, out: &mut [f32]) {
            use avx2::hsum;
            use std::arch::x86_64::*;
            let nb = out.len();
            let chunks = k / 8;
            let tail = |j: usize| -> f32 { (chunks * 8..k).map(|i| x[i] * $get(w[j * k + i])).sum() };
            let mut j = 0;
            while j < nb {
                let rows = (nb - j).min(4);
                // Rows past the block repeat the last one (computed, not stored).
                let p: [*const $w; 4] = std::array::from_fn(|q| w[(j + q.min(rows - 1)) * k..].as_ptr());
                let mut acc = [_mm256_setzero_ps(); 4];
                for c in 0..chunks {
                    // SAFETY: c * 8 + 8 <= k, within row j + q of `w` and within `x`.
                    unsafe {
                        // One prefetch per 64-byte line of each stream (a hint: never faults,
                        // even past the end of the weights).
                        if (c * 8 * std::mem::size_of::<$w>()) % 64 == 0 {
                            for row in &p {
                                _mm_prefetch::<_MM_HINT_T1>(row.wrapping_add(c * 8 + PREFETCH_AHEAD) as *const i8);
                            }
                        }
                        let xv = _mm256_loadu_ps(x.as_ptr().add(c * 8));
                        for q in 0..4 {
                            acc[q] = _mm256_fmadd_ps(xv, $load(p[q].add(c * 8)), acc[q]);
                        }
                    }
                }
                for q in 0..rows {
                    out[j + q] = hsum(acc[q]) + tail(j + q);
                }
                j += rows;
            }
        }
    };
}

row_avx2!(
    /// bf16 weights, widened in registers (a shift).
    row_times_bf16_avx2,
    half::bf16,
    |p: *const half::bf16| avx2::widen8(p),
    |v: half::bf16| v.to_f32()
);

row_avx2!(
    /// Unscaled E4M3 bytes (the block scales folded into the activation: see [`Direct::E4m3`]).
    row_times_e4m3_avx2,
    u8,
    |p: *const u8| avx2::e4m3x8(p),
    |v: u8| crate::fp8::E4M3[v as usize]
);

row_avx2!(
    /// Unscaled E4M3 bytes known not to be NaN.
    row_times_e4m3_nan_free_avx2,
    u8,
    |p: *const u8| avx2::e4m3x8_nan_free(p),
    |v: u8| crate::fp8::E4M3[v as usize]
);

/// A block of 16-bit or 8-bit weights the tiles read directly, widening in registers (no widened
/// copy).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Direct<'a> {
    /// bf16: AVX-512 or AVX2 tiles.
    Bf16(&'a [half::bf16]),
    /// f16: AVX-512 tiles (`vcvtph2ps`).
    F16(&'a [half::f16]),
    /// E4M3 rows that all lie in one row of scale blocks: `scales` is that row of the grid (one
    /// scale per `block_cols` columns). Since `sum_c x[c] * (q[c] * s[c / b]) =
    /// sum_c (x[c] * s[c / b]) * q[c]`, each activation row is scaled once per block of weight
    /// rows and the tiles run on the unscaled bytes (AVX-512 tiles, or the AVX2 4-row tile and
    /// one-row kernel).
    ///
    /// `nan_free` (from [`Weights::F8E4M3`]): no byte of the tensor is NaN, so the tiles take
    /// the four-op decode ([`avx512::e4m3x16_nan_free`]) instead of the nine-op one that maps
    /// NaN bytes to NaN. Qwen3-30B-A3B f8_e4m3 on the 2-core Zen 4: 2.26–2.49 -> 1.40–1.59 ms
    /// at 1 token, 25.5–26.4 -> 14.9–16.2 at 16, 85–90 -> 66–71 at 128.
    E4m3 { q: &'a [u8], scales: &'a [f32], block_cols: usize, nan_free: bool },
}

/// The weights `w[start..start + len]` (whole rows of one group) as a [`Direct`] block, where
/// this CPU has tiles for their dtype (and accumulation is f32). `rows` is the number of
/// activation rows of the group: without AVX-512, from [`AVX2_F8_WIDEN_ROWS`] on an E4M3 block
/// is widened once instead.
#[cfg(target_arch = "x86_64")]
fn direct(w: Weights<'_>, start: usize, len: usize, rows: usize) -> Option<Direct<'_>> {
    match (w, isa()) {
        (_, "portable") => None,
        (Weights::BF16(b), _) => Some(Direct::Bf16(&b[start..start + len])),
        (Weights::F16(h), "avx512") => Some(Direct::F16(&h[start..start + len])),
        (Weights::F8E4M3 { q, scales, rows_cols: [n, k], block: [bn, bk], nan_free }, isa)
            if isa == "avx512" || rows < AVX2_F8_WIDEN_ROWS =>
        {
            // The caller's row blocks never straddle a row of scale blocks (see grouped_gemm).
            let (g, n0) = (start / k / n, start / k % n);
            let grid_cols = k.div_ceil(bk);
            let row = (g * n.div_ceil(bn) + n0 / bn) * grid_cols;
            Some(Direct::E4m3 { q: &q[start..start + len], scales: &scales[row..row + grid_cols], block_cols: bk, nan_free })
        }
        _ => None,
    }
}

/// Activation rows handled together by the widest tile this CPU has.
fn tile_rows() -> usize {
    if isa() == "avx512" { AVX512_ROWS } else { 4 }
}

/// `xs` (1 to [`tile_rows`] rows) times a block read directly ([`direct`]), into `out`
/// (`xs.len() * nb`, row-major).
#[cfg(target_arch = "x86_64")]
fn rows_times_direct(xs: &[&[f32]], w: Direct<'_>, k: usize, out: &mut [f32]) {
    // SAFETY: `direct` made `w` only where isa() found the tile's instructions: AVX-512F for the
    // AVX-512 tiles (and for every f16 block), AVX2 and FMA for the others.
    unsafe {
        match (w, isa(), xs.len()) {
            (Direct::E4m3 { q, scales, block_cols, nan_free }, isa, n) => {
                // The activation rows times their block scales, in a per-thread buffer.
                thread_local! {
                    static SCALED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                SCALED.with_borrow_mut(|buf| {
                    buf.resize(n * k, 0.0);
                    for (r, x) in xs.iter().enumerate() {
                        for ((o, xc), s) in buf[r * k..(r + 1) * k].chunks_mut(block_cols).zip(x.chunks(block_cols)).zip(scales) {
                            o.iter_mut().zip(xc).for_each(|(o, x)| *o = x * s);
                        }
                    }
                    let rows: [&[f32]; AVX512_ROWS] = std::array::from_fn(|r| &buf[r.min(n - 1) * k..(r.min(n - 1) + 1) * k]);
                    if isa == "avx512" && nan_free {
                        avx512_rows!(rows_times_e4m3_nan_free_avx512, &rows[..n], q, k, out)
                    } else if isa == "avx512" {
                        avx512_rows!(rows_times_e4m3_avx512, &rows[..n], q, k, out)
                    } else if n == 4 {
                        let tile = if nan_free { rows4_times_e4m3_nan_free_avx2 } else { rows4_times_e4m3_avx2 };
                        tile([rows[0], rows[1], rows[2], rows[3]], q, k, out)
                    } else {
                        // Fewer than four rows (decode, or a group's last rows): one at a time.
                        let row = if nan_free { row_times_e4m3_nan_free_avx2 } else { row_times_e4m3_avx2 };
                        let nb = out.len() / n;
                        for (r, x) in rows[..n].iter().enumerate() {
                            row(x, q, k, &mut out[r * nb..(r + 1) * nb]);
                        }
                    }
                })
            }
            // One row at a time (decode) takes the 8-lane kernel made for it.
            (Direct::Bf16(w), "avx512", 2..) => avx512_rows!(rows_times_bf16_avx512, xs, w, k, out),
            (Direct::F16(w), _, _) => avx512_rows!(rows_times_f16_avx512, xs, w, k, out),
            (Direct::Bf16(w), _, 4) => rows4_times_bf16_avx2([xs[0], xs[1], xs[2], xs[3]], w, k, out),
            (Direct::Bf16(w), _, _) => {
                let nb = out.len() / xs.len();
                for (r, x) in xs.iter().enumerate() {
                    row_times_bf16_avx2(x, w, k, &mut out[r * nb..(r + 1) * nb]);
                }
            }
        }
    }
}

/// `xs` (1 to [`tile_rows`] rows) times an f32 block, into `out` (`xs.len() * nb`, row-major).
fn rows_times_block(xs: &[&[f32]], w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: isa() found AVX-512F for the first arms, AVX2 and FMA for the last.
    unsafe {
        match (isa(), xs.len()) {
            // One row too: the tile's prefetch makes f32 decode 5–11% faster than the
            // portable row kernel (back to back, Qwen3-30B-A3B f32 at 1 and 16 tokens).
            ("avx512", 1..) => return avx512_rows!(rows_times_block_avx512, xs, w, k, out),
            ("avx2", 4) => return rows4_times_block_avx2([xs[0], xs[1], xs[2], xs[3]], w, k, out),
            _ => {}
        }
    }
    let nb = out.len() / xs.len();
    for (r, x) in xs.iter().enumerate() {
        row_times_block(x, w, k, &mut out[r * nb..(r + 1) * nb]);
    }
}

/// The same code compiled for AVX2 with FMA (8 lanes), chosen at run time; other CPUs run the
/// portable build (SSE2 on x86-64). Measured on the 2-core EPYC of the project: wider builds of
/// this generic code (16 partial sums, AVX-512) compiled to spills and ran 3x slower; the 4-row
/// AVX-512 tile above is written with intrinsics instead.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_times_block_avx2(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    row_times_block_generic::<8, true>(x, w, k, out)
}

/// The instruction set the host GEMM uses: `avx512` (AVX-512F with AVX2 and FMA: tiles of up to
/// six activation rows in 16 lanes, single rows as `avx2`), `avx2` (with FMA: tiles of four
/// rows), else `portable`. `MOE_CPU_ISA=avx2` or `portable` caps it, to compare or to reproduce
/// a result bit for bit on another machine (the tiles sum in different orders).
pub fn isa() -> &'static str {
    static ISA: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    ISA.get_or_init(|| {
        let cap = std::env::var("MOE_CPU_ISA").unwrap_or_default();
        if cap == "portable" {
            return "portable";
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            return if cap != "avx2" && std::arch::is_x86_feature_detected!("avx512f") { "avx512" } else { "avx2" };
        }
        "portable"
    })
}

fn row_times_block(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != "portable" {
        // SAFETY: the CPU has AVX2 and FMA (checked by isa()).
        return unsafe { row_times_block_avx2(x, w, k, out) };
    }
    row_times_block_generic::<8, false>(x, w, k, out)
}

#[inline]
fn dot_f64(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>() as f32
}

/// A raw pointer that tasks use to write disjoint parts of one output.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes a disjoint set of elements (see grouped_gemm).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// One tile of rows times a weight block: `(rows, out)`, `out` being `rows.len() * nb`, row-major.
type RowsTile<'a> = dyn FnMut(&[&[f32]], &mut [f32]) + 'a;

/// [`crate::Backend::grouped_gemm`] on the host.
///
/// `x [Mx, K]`; `w` is `[G, N, K]` (or `[N, K]` with `G = 1` and no offsets); `y [M, N]`.
/// Each task owns a block of weight rows of one group and multiplies every row of that group by
/// them: each weight is read once, which is what decode needs. bf16 blocks are read as they are
/// and widened in registers (AVX2); other dtypes, and the portable build, widen the block to f32
/// once per task.
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm(
    x: &[f32],
    k: usize,
    token_index: Option<&[u32]>,
    w: Weights,
    n: usize,
    expert_offsets: Option<&[u32]>,
    y: &mut [f32],
    accumulate: Accumulate,
) -> Result<()> {
    let m = y.len() / n;
    let mx = x.len().checked_div(k).unwrap_or(0);
    let whole = [0u32, m as u32];
    let offsets = expert_offsets.unwrap_or(&whole);
    check_offsets(offsets, m)?;
    if let Some((r, t)) = token_index.and_then(|ti| ti.iter().enumerate().find(|(_, t)| **t as usize >= mx)) {
        return invalid!("token_index[{r}] = {t} but x has only {mx} rows");
    }
    let end = offsets[offsets.len() - 1] as usize;
    y[end * n..].fill(0.0);
    // Blocks of weight rows of about 64 KiB (f32), so a block stays in L2 while the rows stream.
    // At least four rows, the weight rows of the widest tile: at K = 7168 (DeepSeek-V3's hidden
    // size) 64 KiB would be two, and the tile would compute each of them twice (bf16, back to
    // back on the 2-core VM, DeepSeek-V3 shape with 16 experts: 108 -> 72 ms at 16 tokens and
    // 825 -> 529 ms at 128; Qwen3-30B-A3B, K <= 2048, unchanged).
    let mut block = (16384 / k.max(1)).max(4).clamp(1, n.max(1));
    if let Weights::F8E4M3 { block: [bn, _], .. } = w {
        // E4M3: 256 KiB of bytes (the direct tiles read them as they are), so the activation
        // rows scaled per task (Direct::E4m3: K floats a row, each tile) are reused by more
        // weight rows: at K = 7168, 64 KiB made 8-row tasks, and scaling cost an eighth of the
        // products. Back to back on the 2-core Zen 4 (64 / 256 KiB): Qwen3-30B-A3B 1.61 / 1.40 ms
        // at 1 token, 74.6 / 62.8 at 128, 1148 / 1060 at 2048; DeepSeek-V3 E16 95.8 / 82.4 at
        // 16 tokens, 790 / 564 at 128 (512 KiB: no better). But at least four tasks a thread
        // where the rows allow it, so a many-core machine is not left with a handful of tasks
        // at decode. And blocks that never straddle a row of scale blocks, so one block shares
        // a row of scales: a divisor of the scale block's rows.
        block = (262144 / k.max(1)).clamp(1, n.max(1)).min(bn);
        let groups = offsets.windows(2).filter(|o| o[1] > o[0]).count();
        let want = 4 * rayon::current_num_threads();
        while block > 4 && groups * n.div_ceil(block) < want {
            block /= 2;
        }
        while !bn.is_multiple_of(block) {
            block -= 1;
        }
    }
    let tasks: Vec<(usize, usize)> = (0..offsets.len() - 1)
        .filter(|&g| offsets[g + 1] > offsets[g])
        .flat_map(|g| (0..n).step_by(block).map(move |n0| (g, n0)))
        .collect();
    let out = Out(y.as_mut_ptr());
    tasks.into_par_iter().for_each(|(g, n0)| {
        // Capture the whole `Out` (which is Sync), not its raw-pointer field (which is not).
        #[allow(clippy::redundant_locals)]
        let out = out;
        let nb = block.min(n - n0);
        // The widened block lives in a per-thread buffer: allocating (and zeroing) 64 KiB per
        // task cost as much as reading the weights at decode sizes.
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let xrow = |r: usize| {
            let src = token_index.map_or(r, |ti| ti[r] as usize);
            &x[src * k..(src + 1) * k]
        };
        let (r0, end) = (offsets[g] as usize, offsets[g + 1] as usize);
        // The group's rows in tiles of up to `most` (no allocation per tile): `tile` computes
        // each into `dots` (`rows * nb`, row-major), copied to y here.
        let mut dots = vec![0f32; tile_rows() * nb];
        let mut tiles = |most: usize, tile: &mut RowsTile<'_>| {
            let mut r = r0;
            while r < end {
                let take = (end - r).min(most);
                let xs: [&[f32]; AVX512_ROWS] = std::array::from_fn(|q| xrow(r + q.min(take - 1)));
                tile(&xs[..take], &mut dots[..take * nb]);
                for q in 0..take {
                    // SAFETY: row r + q, columns n0..n0+nb of y belong to this task alone: the rows
                    // are this group's, the columns this block's.
                    unsafe { std::ptr::copy_nonoverlapping(dots[q * nb..].as_ptr(), out.0.add((r + q) * n + n0), nb) };
                }
                r += take;
            }
        };
        // 16-bit weights are read directly, widened in registers: no widened copy of the block
        // (at decode that pass would cost as much as the dot products; at prefill ~a third).
        #[cfg(target_arch = "x86_64")]
        if let (Some(block), Accumulate::F32) = (direct(w, (g * n + n0) * k, nb * k, end - r0), accumulate) {
            return tiles(tile_rows(), &mut |xs, d| rows_times_direct(xs, block, k, d));
        }
        SCRATCH.with_borrow_mut(|scratch| {
            if scratch.len() < nb * k {
                scratch.resize(nb * k, 0.0);
            }
            let wf = &mut scratch[..nb * k];
            w.widen((g * n + n0) * k, wf);
            let wf = &*wf;
            match accumulate {
                // A tile's worth of rows at a time.
                Accumulate::F32 => tiles(tile_rows(), &mut |xs, d| rows_times_block(xs, wf, k, d)),
                // One row at a time, each dot product in f64.
                Accumulate::F64 => {
                    tiles(1, &mut |xs, d| d.iter_mut().enumerate().for_each(|(j, v)| *v = dot_f64(xs[0], &wf[j * k..(j + 1) * k])))
                }
            }
        });
    });
    Ok(())
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use half::bf16;

    /// Every register tile this CPU can run, against f64 dot products: row counts and K around
    /// the tiles' widths (the repeated last weight row, the scalar tail past the last vector).
    #[test]
    fn tiles_match_f64_dot_products() {
        let avx2 = std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma");
        let avx512 = avx2 && std::arch::is_x86_feature_detected!("avx512f");
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        };
        for k in [1, 7, 8, 15, 16, 17, 33, 69] {
            for nb in [1, 2, 3, 4, 5, 7, 9, 13] {
                let xs: Vec<Vec<f32>> = (0..6).map(|_| (0..k).map(|_| next()).collect()).collect();
                let wb: Vec<bf16> = (0..nb * k).map(|_| bf16::from_f32(next())).collect();
                let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
                let want: Vec<f32> =
                    (0..6 * nb).map(|i| (0..k).map(|c| xs[i / nb][c] as f64 * wf[(i % nb) * k + c] as f64).sum::<f64>() as f32).collect();
                let rows: Vec<&[f32]> = xs.iter().map(|x| &x[..]).collect();
                let rows4 = [rows[0], rows[1], rows[2], rows[3]];
                // `got` holds the first got.len() / nb rows.
                let check = |name: &str, got: &[f32]| {
                    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                        assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{name} k {k} nb {nb} [{i}]: {g} vs {w}");
                    }
                };
                let mut out = vec![f32::NAN; 4 * nb];
                for r in 0..4 {
                    row_times_block_generic::<8, false>(rows[r], &wf, k, &mut out[r * nb..(r + 1) * nb]);
                }
                check("portable", &out);
                if avx2 {
                    // SAFETY: AVX2 and FMA detected above.
                    unsafe {
                        out.fill(f32::NAN);
                        rows4_times_block_avx2(rows4, &wf, k, &mut out);
                        check("f32 avx2", &out);
                        out.fill(f32::NAN);
                        rows4_times_bf16_avx2(rows4, &wb, k, &mut out);
                        check("bf16 avx2", &out);
                        out.fill(f32::NAN);
                        for r in 0..4 {
                            row_times_bf16_avx2(rows[r], &wb, k, &mut out[r * nb..(r + 1) * nb]);
                        }
                        check("bf16 row avx2", &out);
                    }
                }
                if avx512 {
                    // SAFETY: AVX-512F detected above.
                    unsafe {
                        let mut out = vec![f32::NAN; 6 * nb];
                        rows_times_block_avx512::<6>(&rows, &wf, k, &mut out);
                        check("f32 avx512 6 rows", &out);
                        out.fill(f32::NAN);
                        rows_times_bf16_avx512::<6>(&rows, &wb, k, &mut out);
                        check("bf16 avx512 6 rows", &out);
                        out.fill(f32::NAN);
                        rows_times_bf16_avx512::<5>(&rows[..5], &wb, k, &mut out[..5 * nb]);
                        rows_times_block_avx512::<1>(&rows[5..], &wf, k, &mut out[5 * nb..]);
                        check("5 + 1 rows avx512", &out);
                        out.fill(f32::NAN);
                        rows_times_block_avx512::<3>(&rows[..3], &wf, k, &mut out[..3 * nb]);
                        rows_times_bf16_avx512::<2>(&rows[3..5], &wb, k, &mut out[3 * nb..5 * nb]);
                        check("3 + 2 rows avx512", &out[..5 * nb]);
                        // f16 weights holding the same values (bf16 values with small exponents
                        // are exact in f16): the same dots.
                        let wh: Vec<half::f16> = wf.iter().map(|v| half::f16::from_f32(*v)).collect();
                        assert!(wh.iter().zip(&wf).all(|(h, f)| h.to_f32() == *f));
                        out.fill(f32::NAN);
                        rows_times_f16_avx512::<6>(&rows, &wh, k, &mut out);
                        check("f16 avx512 6 rows", &out);
                        out.fill(f32::NAN);
                        rows_times_f16_avx512::<1>(&rows[..1], &wh, k, &mut out[..nb]);
                        check("f16 avx512 1 row", &out[..nb]);
                    }
                }
            }
        }
    }

    /// Each E4M3 decode against the table, bit for bit, for every byte it is made for: the full
    /// decodes for all 256 (NaN to NaN), the NaN-free ones for the 254 others (the f16 one gives
    /// 2^-8 times the value).
    #[test]
    fn e4m3_decodes_match_the_table() {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            return;
        }
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let bytes: Vec<u8> = (0..=255u8).collect();
        for chunk in bytes.chunks(16) {
            let mut got = [[0f32; 16]; 4];
            // SAFETY: AVX2 (and AVX-512F for the 16-lane decodes) detected above; 16 bytes each.
            unsafe {
                use std::arch::x86_64::*;
                for h in 0..2 {
                    _mm256_storeu_ps(got[0][8 * h..].as_mut_ptr(), avx2::e4m3x8(chunk[8 * h..].as_ptr()));
                    _mm256_storeu_ps(got[1][8 * h..].as_mut_ptr(), avx2::e4m3x8_nan_free(chunk[8 * h..].as_ptr()));
                }
                if avx512 {
                    _mm512_storeu_ps(got[2].as_mut_ptr(), avx512::e4m3x16(chunk.as_ptr()));
                    _mm512_storeu_ps(got[3].as_mut_ptr(), avx512::e4m3x16_nan_free(chunk.as_ptr()));
                }
            }
            for (i, &b) in chunk.iter().enumerate() {
                let want = crate::fp8::E4M3[b as usize];
                let same = |v: f32| v.to_bits() == want.to_bits() || (v.is_nan() && want.is_nan());
                assert!(same(got[0][i]), "e4m3x8 {b:#04x}: {}", got[0][i]);
                assert!(crate::fp8::is_nan(b) || same(got[1][i]), "e4m3x8_nan_free {b:#04x}: {}", got[1][i]);
                if avx512 {
                    assert!(same(got[2][i]), "e4m3x16 {b:#04x}: {}", got[2][i]);
                    assert!(crate::fp8::is_nan(b) || same(got[3][i] * 256.0), "e4m3x16_nan_free {b:#04x}: {}", got[3][i]);
                }
            }
        }
    }

    /// The E4M3 tiles and row kernels (NaN-free and full decodes) against f64 dot products on
    /// the table's values, every row count and K around the vector widths; and a NaN byte in a
    /// weight row makes exactly that row's dot products NaN in the full decodes.
    #[test]
    fn e4m3_tiles_match_f64_dot_products() {
        if !(std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")) {
            return;
        }
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for k in [1, 7, 8, 15, 16, 17, 33, 70] {
            for nb in [1, 3, 4, 5, 9] {
                let xs: Vec<Vec<f32>> =
                    (0..6).map(|_| (0..k).map(|_| (next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0).collect()).collect();
                // Every byte but NaN, subnormals included.
                let mut q: Vec<u8> = (0..nb * k).map(|_| next() as u8).map(|b| if crate::fp8::is_nan(b) { b ^ 1 } else { b }).collect();
                let rows: Vec<&[f32]> = xs.iter().map(|x| &x[..]).collect();
                // Each dot product, and the sum of its products' magnitudes (what f32 rounding
                // error scales with: the values reach 448, so sums cancel).
                let dots = |q: &[u8]| -> Vec<(f32, f64)> {
                    (0..6 * nb)
                        .map(|i| {
                            let p = (0..k).map(|c| xs[i / nb][c] as f64 * crate::fp8::E4M3[q[(i % nb) * k + c] as usize] as f64);
                            (p.clone().sum::<f64>() as f32, p.map(f64::abs).sum::<f64>())
                        })
                        .collect()
                };
                let check = |name: &str, got: &[f32], want: &[(f32, f64)]| {
                    for (i, (g, (w, mag))) in got.iter().zip(want).enumerate() {
                        let ok = if w.is_nan() { g.is_nan() } else { ((g - w).abs() as f64) <= 1e-6 * mag + 1e-30 };
                        assert!(ok, "{name} k {k} nb {nb} [{i}]: {g} vs {w}");
                    }
                };
                let run = |q: &[u8], nan_free: bool| -> Vec<Vec<f32>> {
                    let mut outs = Vec::new();
                    // SAFETY: AVX2 and FMA (and AVX-512F for its tiles) detected above.
                    unsafe {
                        let mut out = vec![f32::NAN; 4 * nb];
                        let tile = if nan_free { rows4_times_e4m3_nan_free_avx2 } else { rows4_times_e4m3_avx2 };
                        tile([rows[0], rows[1], rows[2], rows[3]], q, k, &mut out);
                        outs.push(out);
                        let mut out = vec![f32::NAN; 4 * nb];
                        let row = if nan_free { row_times_e4m3_nan_free_avx2 } else { row_times_e4m3_avx2 };
                        for r in 0..4 {
                            row(rows[r], q, k, &mut out[r * nb..(r + 1) * nb]);
                        }
                        outs.push(out);
                        if avx512 {
                            let mut out = vec![f32::NAN; 6 * nb];
                            if nan_free {
                                rows_times_e4m3_nan_free_avx512::<6>(&rows, q, k, &mut out);
                            } else {
                                rows_times_e4m3_avx512::<6>(&rows, q, k, &mut out);
                            }
                            outs.push(out);
                            let mut out = vec![f32::NAN; nb];
                            if nan_free {
                                rows_times_e4m3_nan_free_avx512::<1>(&rows[..1], q, k, &mut out);
                            } else {
                                rows_times_e4m3_avx512::<1>(&rows[..1], q, k, &mut out);
                            }
                            outs.push(out);
                        }
                    }
                    outs
                };
                let want = dots(&q);
                for nan_free in [true, false] {
                    for (i, got) in run(&q, nan_free).iter().enumerate() {
                        check(&format!("nan_free {nan_free} kernel {i}"), got, &want[..got.len()]);
                    }
                }
                // A NaN byte (the sign varies) in the last weight row: that row's products are NaN.
                let at = (nb - 1) * k + (next() as usize % k);
                q[at] = if next() % 2 == 0 { 0x7F } else { 0xFF };
                let want = dots(&q);
                assert!(want[nb - 1].0.is_nan());
                for (i, got) in run(&q, false).iter().enumerate() {
                    check(&format!("NaN byte, kernel {i}"), got, &want[..got.len()]);
                }
            }
        }
    }
}
