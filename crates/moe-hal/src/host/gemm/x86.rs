//! The x86 register tiles of the host GEMM: AVX2 + FMA and AVX-512 kernels, and the in-register
//! decoders of bf16, f16 and E4M3 weights they read directly. [`super`] picks one per block of
//! weights at run time ([`super::isa`]); everything here is `unsafe` to call without the
//! instructions it is compiled for.

/// Helpers of the AVX2 tiles below.
pub(super) mod avx2 {
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

    /// 8 E4M3 bytes from `p` as f32, unscaled (exact; NaN bytes become NaN): [`e4m3x8_nan_free_f16`]
    /// times 2^8, with NaN where the byte is one.
    ///
    /// # Safety
    /// `p` points at 8 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn e4m3x8(p: *const u8) -> __m256 {
        // SAFETY: the caller passes a pointer to 8 readable bytes (both loads read those 8).
        let (v, b) = unsafe { (e4m3x8_nan_free_f16(p), _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i))) };
        let v = _mm256_mul_ps(v, _mm256_set1_ps(256.0));
        let nan = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x7F)), _mm256_set1_epi32(0x7F)));
        _mm256_blendv_ps(v, _mm256_set1_ps(f32::NAN), nan)
    }

    /// [`e4m3x8_nan_free_f16`] without the 2^-8, for the one-row kernel where denormals are kept
    /// (see [`super::denormals_are_zero`]): four ops. Sign-extending puts the sign in bit 31 and,
    /// shifted by 20, exponent and mantissa in bits 20..27, with copies of the sign in bits
    /// 27..31 that the mask clears; then 2^120 rebiases the exponent (exact, subnormals included,
    /// as long as the f32 denormal a subnormal byte makes is not read as zero). A NaN byte would
    /// read as ±480.
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

    /// 8 E4M3 bytes known not to be NaN (see [`super::super::Direct::E4m3`]) as f32 times 2^-8,
    /// through f16 (F16C): sign-extending each byte to 16 bits puts its sign in bits 7..15;
    /// shifted by 7, exponent and mantissa sit in bits 7..13 with the sign in 15 and a copy in 14,
    /// which the mask clears. That is an f16 with E4M3's exponent and mantissa under f16's bias 15
    /// instead of 7 (exact, subnormals included: f16 has E4M3's subnormals), and `vcvtph2ps`
    /// widens it; the kernels put the 2^8 on each finished dot product. No multiply, so the
    /// tile's FMA ports do only FMAs. `vcvtph2ps` widens f16 subnormals whatever MXCSR says,
    /// where the f32 form ([`e4m3x8_nan_free`]: an f32 denormal times 2^120) reads subnormal
    /// bytes as zero on a thread with denormals-are-zero set (`torch.set_flush_denormal(True)`,
    /// a `-ffast-math` library; rayon's threads inherit it from the thread that made the pool).
    /// With `MOE_CPU_ISA=avx2`, Qwen3-30B-A3B f8_e4m3 at 128 tokens ran 103–105 ms against
    /// 122–125 with the f32 form (back to back, two pairs); the one-row kernel is faster on the
    /// f32 form (1.4–1.5 against 1.6–1.9 ms at one token, 19–20 against 23–26 at 16, three pairs
    /// back to back) and keeps it where denormals are kept.
    ///
    /// # Safety
    /// `p` points at 8 readable bytes.
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    pub unsafe fn e4m3x8_nan_free_f16(p: *const u8) -> __m256 {
        // SAFETY: the caller passes a pointer to 8 readable bytes.
        let s = _mm_cvtepi8_epi16(unsafe { _mm_loadl_epi64(p as *const __m128i) });
        _mm256_cvtph_ps(_mm_and_si128(_mm_slli_epi16::<7>(s), _mm_set1_epi16(0xBFFFu16 as i16)))
    }
}

/// The 4 x 3 register tile of [`rows4_times_block_avx2`] and [`rows4_times_bf16_avx2`], written
/// once: `$w` is the weight element type, `$load` turns a pointer to 8 of them into 8 f32 lanes,
/// `$get` one of them into an f32 (for the tail past the last multiple of 8).
macro_rules! rows4_tile_avx2 {
    ($(#[$doc:meta])* $name:ident, $w:ty, $load:expr, $get:expr) => {
        rows4_tile_avx2!($(#[$doc])* $name, $w, $load, $get, 1.0);
    };
    ($(#[$doc:meta])* $name:ident, $w:ty, $load:expr, $get:expr, $post:expr) => {
        $(#[$doc])*
                #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn $name(xs: [&[f32]; 4], w: &[$w], k: usize, out: &mut [f32]) {
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
                    out[r * nb + j] = hsum(acc[3 * r]) * $post + tail(xs[r], w0);
                    if j1 != j {
                        out[r * nb + j1] = hsum(acc[3 * r + 1]) * $post + tail(xs[r], w1);
                    }
                    if j2 != j1 {
                        out[r * nb + j2] = hsum(acc[3 * r + 2]) * $post + tail(xs[r], w2);
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
    /// are folded into the activations: see [`super::Direct::E4m3`]).
    rows4_times_e4m3_avx2,
    u8,
    |p: *const u8| avx2::e4m3x8(p),
    |v: u8| crate::fp8::E4M3[v as usize]
);

rows4_tile_avx2!(
    /// [`rows4_times_e4m3_avx2`] on bytes known not to be NaN (see [`super::Direct::E4m3`]): the
    /// vectors decode to 2^-8 times the weights, so each dot product's vector part is scaled by
    /// 2^8 at the end.
    rows4_times_e4m3_nan_free_avx2,
    u8,
    |p: *const u8| avx2::e4m3x8_nan_free_f16(p),
    |v: u8| crate::fp8::E4M3[v as usize],
    256.0
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
pub(super) mod avx512 {
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

    /// 16 E4M3 bytes from `p` as f32, unscaled (as [`super::avx2::e4m3x8`]): [`e4m3x16_nan_free`]
    /// times 2^8, with NaN where the byte is one.
    ///
    /// # Safety
    /// `p` points at 16 readable bytes.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub unsafe fn e4m3x16(p: *const u8) -> __m512 {
        // SAFETY: the caller passes a pointer to 16 readable bytes (both loads read those 16).
        let (v, b) = unsafe { (e4m3x16_nan_free(p), _mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i))) };
        let v = _mm512_mul_ps(v, _mm512_set1_ps(256.0));
        let em = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
        _mm512_mask_mov_ps(v, _mm512_cmpeq_epi32_mask(em, _mm512_set1_epi32(0x7F)), _mm512_set1_ps(f32::NAN))
    }

    /// 16 E4M3 bytes known not to be NaN, as f32 times 2^-8, through f16: the 256-bit ops of
    /// [`super::avx2::e4m3x8_nan_free_f16`] (sign-extend, shift by 7, clear the copy of the sign in
    /// bit 14) make an f16 with E4M3's exponent and mantissa under f16's bias 15 instead of 7
    /// (exact, subnormals included: f16 has E4M3's subnormals), and `vcvtph2ps` widens it. Three
    /// of its four ops are 256-bit, half the cost of 512-bit ones on Zen 4: Qwen3-30B-A3B at 128
    /// tokens (8 rows per expert) ran 66.5–71.3 ms against 73.4–75.8 with the 512-bit f32 form,
    /// and the same at one token (back to back, three pairs).
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
/// up to [`super::AVX512_ROWS`] activation rows (`4 R` accumulators, four weight vectors, one
/// activation vector): each activation load feeds four products, each weight load `R`. `R` below
/// the most takes an expert's last rows, so no row falls back to the one-row kernel.
macro_rules! rows_tile_avx512 {
    ($(#[$doc:meta])* $name:ident, $w:ty, $load:expr, $get:expr) => {
        rows_tile_avx512!($(#[$doc])* $name, $w, $load, $get, 1.0);
    };
    ($(#[$doc:meta])* $name:ident, $w:ty, $load:expr, $get:expr, $post:expr) => {
        $(#[$doc])*
                #[target_feature(enable = "avx512f")]
        pub(super) unsafe fn $name<const R: usize>(xs: &[&[f32]], w: &[$w], k: usize, out: &mut [f32]) {
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
    /// [`super::Direct::E4m3`]).
    rows_times_e4m3_avx512,
    u8,
    |p: *const u8| avx512::e4m3x16(p),
    |v: u8| crate::fp8::E4M3[v as usize]
);

rows_tile_avx512!(
    /// [`rows_times_e4m3_avx512`] on bytes known not to be NaN (see [`super::Direct::E4m3`]): the
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

/// Calls the AVX-512 tile `$f` for `$xs.len()` rows (1 to [`super::AVX512_ROWS`]); unsafe: the
/// CPU must have AVX-512F.
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
pub(super) const PREFETCH_AHEAD: usize = 8192;

/// One activation row times `nb` weight rows read straight from the weights (no widened copy),
/// four weight rows per pass, AVX2: for decode, where each weight is used by one or two rows and
/// a widening pass would cost as much as the dot products. `$load` and `$get` as in
/// [`rows4_tile_avx2`].
macro_rules! row_avx2 {
    ($(#[$doc:meta])* $name:ident, $w:ty, $load:expr, $get:expr) => {
        row_avx2!($(#[$doc])* $name, $w, $load, $get, 1.0);
    };
    ($(#[$doc:meta])* $name:ident, $w:ty, $load:expr, $get:expr, $post:expr) => {
        $(#[$doc])*
                #[target_feature(enable = "avx2,fma,f16c")]
        pub(super) unsafe fn $name(x: &[f32], w: &[$w], k: usize, out: &mut [f32]) {
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
                    out[j + q] = hsum(acc[q]) * $post + tail(j + q);
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
    /// Unscaled E4M3 bytes (the block scales folded into the activation: see [`super::Direct::E4m3`]).
    row_times_e4m3_avx2,
    u8,
    |p: *const u8| avx2::e4m3x8(p),
    |v: u8| crate::fp8::E4M3[v as usize]
);

row_avx2!(
    /// Unscaled E4M3 bytes known not to be NaN, on a thread that keeps denormals (see
    /// [`denormals_are_zero`]).
    row_times_e4m3_nan_free_avx2,
    u8,
    |p: *const u8| avx2::e4m3x8_nan_free(p),
    |v: u8| crate::fp8::E4M3[v as usize]
);

row_avx2!(
    /// [`row_times_e4m3_nan_free_avx2`] where denormals are read as zero: the vectors decode
    /// through f16 to 2^-8 times the weights, so each dot product's vector part is scaled by
    /// 2^8 at the end.
    row_times_e4m3_nan_free_f16_avx2,
    u8,
    |p: *const u8| avx2::e4m3x8_nan_free_f16(p),
    |v: u8| crate::fp8::E4M3[v as usize],
    256.0
);

/// Whether this thread reads f32 denormals as zero (MXCSR's DAZ bit): a host process may set it,
/// and rayon's threads inherit it from the thread that made the pool. One instruction; asked
/// once per call of a kernel that depends on it.
pub(super) fn denormals_are_zero() -> bool {
    // SAFETY: SSE is part of x86_64; reading MXCSR has no effect.
    #[allow(deprecated)] // (_mm_getcsr: still the way to read MXCSR)
    unsafe {
        std::arch::x86_64::_mm_getcsr() & 0x0040 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::super::row_times_block_generic;
    use super::*;
    use half::bf16;

    /// Every register tile this CPU can run, against f64 dot products: row counts and K around
    /// the tiles' widths (the repeated last weight row, the scalar tail past the last vector).
    #[test]
    fn tiles_match_f64_dot_products() {
        let avx2 = super::super::has_avx2_kernels();
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
    /// decodes for all 256 (NaN to NaN), the NaN-free ones for the 254 others (the f16 ones give
    /// 2^-8 times the value); and the same with denormals-are-zero and flush-to-zero set, as a
    /// host process may have them (subnormal bytes must not read as zero).
    #[test]
    fn e4m3_decodes_match_the_table() {
        if !super::super::has_avx2_kernels() {
            return;
        }
        decodes_match_the_table();
        crate::host::tests::with_denormals_off(decodes_match_the_table);
    }

    fn decodes_match_the_table() {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let bytes: Vec<u8> = (0..=255u8).collect();
        for chunk in bytes.chunks(16) {
            let mut got = [[0f32; 16]; 5];
            // SAFETY: AVX2 (and AVX-512F for the 16-lane decodes) detected above; 16 bytes each.
            unsafe {
                use std::arch::x86_64::*;
                for h in 0..2 {
                    _mm256_storeu_ps(got[0][8 * h..].as_mut_ptr(), avx2::e4m3x8(chunk[8 * h..].as_ptr()));
                    _mm256_storeu_ps(got[1][8 * h..].as_mut_ptr(), avx2::e4m3x8_nan_free(chunk[8 * h..].as_ptr()));
                    _mm256_storeu_ps(got[4][8 * h..].as_mut_ptr(), avx2::e4m3x8_nan_free_f16(chunk[8 * h..].as_ptr()));
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
                assert!(crate::fp8::is_nan(b) || same(got[4][i] * 256.0), "e4m3x8_nan_free_f16 {b:#04x}: {}", got[4][i]);
                // (The f32 form is made for threads that keep denormals, and only used there.)
                let f32_form_ok = same(got[1][i]) || super::denormals_are_zero();
                assert!(crate::fp8::is_nan(b) || f32_form_ok, "e4m3x8_nan_free {b:#04x}: {}", got[1][i]);
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
        if !super::super::has_avx2_kernels() {
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
                        if nan_free {
                            let mut out = vec![f32::NAN; 4 * nb];
                            for r in 0..4 {
                                row_times_e4m3_nan_free_f16_avx2(rows[r], q, k, &mut out[r * nb..(r + 1) * nb]);
                            }
                            outs.push(out);
                        }
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
