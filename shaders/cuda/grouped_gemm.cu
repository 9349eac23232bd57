// grouped_gemm: y [M, N] f32 = x[src(r)] . w[g]^T for the rows r of each group g.
// grouped_gemm_swiglu (p.swiglu = 1): the same GEMM over N = 2I weight rows per group with SwiGLU
// in the epilogue, so only h [M, I] = silu(gate) * up is written. Tile columns walk the 2I rows
// *interleaved* (wcol): column 2j is gate row j, column 2j + 1 up row I + j. Every kernel below
// gives one thread adjacent column pairs (mma's C fragment: columns 2 tig, 2 tig + 1; simt: 4 tx ..
// 4 tx + 3; gemv: a warp's NR rows, NR even), so each thread pairs gate and up in registers.
//
// Self-contained (NVRTC has no system headers): no #include; f16/bf16 weights are read as raw
// 16-bit words and converted with PTX cvt (f16) or a shift (bf16), F8E4M3 bytes with PTX cvt on
// sm_89+ (e4m3x4_to_f32) and arithmetically before (e4m3_to_f32); tensor cores are reached
// through inline PTX (mma.sync), so neither cuda_fp16.h, cuda_bf16.h nor cuda_fp8.h is needed.
//
// * x is f32 [Mx, K]; src(r) = token_index[r] when a gather index is given, else r.
// * w is [G, N, K] (or [N, K] with G = 1 and no offsets), stored f32 (DT 0), f16 (DT 1), bf16
//   (DT 2) or F8E4M3 (DT 3: float8_e4m3fn bytes with f32 block scales, DeepSeek-V3's format):
//   element [g, n, k] is E4M3[q] * scales[g, n / sb_rows, k / sb_cols], the product in f32, as
//   moe_hal::fp8 defines it. Every product accumulates in f32. The scales pointer is every GEMM
//   kernel's argument; only the F8E4M3 kernels read it.
// * With offsets, group g owns rows expert_offsets[g] .. expert_offsets[g + 1] of y; offsets are
//   clamped to M, a decreasing pair is an empty group, a gather index >= Mx reads zeros, so no
//   data can make a kernel read or write out of bounds. gemm_prep flags bad data in errs[3..9].
//
// Kernels (the host picks them from shapes only, never from device data):
//   gemm_prep   validates offsets and the gather index, writes zeros to rows past
//               expert_offsets[G]. Runs when there are offsets or a gather index.
//   gemm_plan   one block: tile_start[g] = the number of BM-row tiles of the groups before g
//               (exclusive scan of ceil(rows_g / BM)), tile_start[G] = all tiles. A row tile never
//               spans two groups, so each tile reads only its own expert's weights.
//   mma_*       tensor cores, f16/bf16/F8E4M3 weights (sm_80+): a BM x 128 tile of y per block of 8
//               warps (2 x 4; a warp owns (BM / 2) x 32), K in slices of 32 staged in shared memory
//               (x converted to the weight dtype on the way in, weights copied with 16-byte loads),
//               the next slice prefetched into registers while the tensor cores work on this one;
//               mma.sync.m16n8k16 with f32 accumulators. BM = 64 or 128. mma_split_*: the same
//               with each activation as two 16-bit parts (hi + lo, two MMAs per product), for dense
//               GEMMs (the router, the shared expert), whose activations must stay f32-accurate.
//               F8E4M3 runs as bf16: each thread loads 16 weight bytes per slice (one 16-byte
//               load), and on their way into shared memory multiplies them by their block scale and
//               rounds to bf16 (bf16, not f16: q * scale may be far below f16's range, where f16
//               would flush it to zero); x is converted to bf16, as for bf16 weights.
//   simt_*      the same schedule on plain f32 FMA: a 64 x 64 tile, 4 x 4 outputs per thread.
//               f32 weights always take it (never TF32: it would break the f32 tolerance), and
//               f16/bf16/F8E4M3 on GPUs older than sm_80.
//   gemv_*      decode: few rows per group. A block owns 8 * NR weight rows of one expert and
//               streams them once with 16-byte loads (a warp reads 512 contiguous bytes of a row per
//               step), applying them to up to 8 token rows at a time; warps reduce with shuffles.
//               Blocks of idle experts exit at once. Slots are groups, or (when M < G: most
//               experts idle) rows of y, where only a group's first row does the work.
// Block order (mma_*, simt_*): super-columns of 8 column tiles, row tiles inside, so the blocks
// running together share one weight slab (in L2) across the row tiles of an expert.
//
// F8E4M3 scales: a thread's weights come in runs of consecutive elements of one row, starting at a
// multiple of the run length (gemv_*_vec: 16 per lane and step, shared by the warp's NR rows;
// simt: 4; mma: 16; gemv_*_any: 1). The scale is looked up once per run (one division) when
// sb_cols is a multiple of the run length, so that the run cannot cross a block; otherwise
// (blocks like 5 x 12; DeepSeek's 128 x 128 never) the run walks its elements, moving to the next
// block's scale where one starts (f8_walk; gemv per word of 4). No scale is read for an element at
// or past K, so the last row's grid is never overrun.

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;
typedef unsigned char u8;

struct GemmParams {
    u32 m;         // rows of y
    u32 n;         // columns of y (rows of one group's weight)
    u32 k;         // reduction length
    u32 mx;        // rows of x
    u32 g;         // groups G (1 without offsets)
    u32 grouped;   // expert_offsets given
    u32 gather;    // token_index given
    u32 tiles_n;   // column tiles (mma, simt) or weight-row blocks (gemv)
    u32 max_tiles; // row tiles the grid covers (mma, simt: shape-only worst case) or slots (gemv)
    u32 by_row;    // gemv: a slot is a row of y (M < G), not a group
    u32 bm;        // gemm_plan: rows per tile
    u32 swiglu;    // SwiGLU epilogue: y is h [M, N / 2], tile columns interleave gate and up
    u32 sb_rows;   // F8E4M3: weight rows per scale block (the host clamps it to N; >= 1)
    u32 sb_cols;   // F8E4M3: weight columns per scale block (clamped to K rounded up to 16; >= 1)
    u32 sg_rows;   // F8E4M3: rows of one group's scale grid, ceil(N / sb_rows)
    u32 sg_cols;   // F8E4M3: columns of the scale grid, ceil(K / sb_cols)
};

// ---- shared helpers ----

// Columns of the output: N, or I = N / 2 with the SwiGLU epilogue.
__device__ __forceinline__ u32 out_cols(const GemmParams& p) {
    return p.swiglu ? p.n >> 1 : p.n;
}

// The weight row (within its group) behind tile column v: v, or interleaved for SwiGLU (gate row
// v / 2 for even v, up row I + v / 2 for odd v).
__device__ __forceinline__ u32 wcol(const GemmParams& p, u32 v) {
    return p.swiglu ? (v & 1u) * (p.n >> 1) + (v >> 1) : v;
}

// silu(g) = g / (1 + exp(-g)), as activation.cu computes it (g = -100: exp overflows, -0).
__device__ __forceinline__ float silu_f(float g) {
    return g / (1.0f + expf(-g));
}

// expert_offsets[g] clamped to M (the whole range without offsets).
__device__ __forceinline__ u32 offset_at(const GemmParams& p, const u32* __restrict__ off, u32 g) {
    if (!p.grouped) {
        return g == 0u ? 0u : p.m;
    }
    u32 v = off[g];
    return v < p.m ? v : p.m;
}

// The group of row r: the largest g < G with offset(g) <= r (0 when none); always < G.
__device__ __forceinline__ u32 group_of_row(const GemmParams& p, const u32* __restrict__ off, u32 r) {
    u32 lo = 1u, hi = p.g;
    while (lo < hi) {
        u32 mid = (lo + hi) >> 1;
        if (offset_at(p, off, mid) > r) {
            hi = mid;
        } else {
            lo = mid + 1u;
        }
    }
    return lo - 1u;
}

// The x row holding row r of y; Mx when out of range (read as zeros).
__device__ __forceinline__ u32 source_row(const GemmParams& p, const u32* __restrict__ ti, u32 r) {
    if (p.gather) {
        u32 s = ti[r];
        return s < p.mx ? s : p.mx;
    }
    return r;
}

__device__ __forceinline__ float f16_to_f32(u16 h) {
#ifdef MOE_EMULATOR
    return emu_f16_to_f32(h); // the CPU emulator (crates/moe-cuda/emu) has no PTX
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#endif
}

__device__ __forceinline__ u16 f32_to_f16(float x) {
#ifdef MOE_EMULATOR
    return emu_f32_to_f16(x);
#else
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#endif
}

__device__ __forceinline__ float bf16_to_f32(u16 h) {
    return __uint_as_float(((u32)h) << 16);
}

// Round to nearest even; NaN stays a (quiet) NaN; overflow becomes infinity.
__device__ __forceinline__ u16 f32_to_bf16(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((b >> 16) | 0x40u);
    }
    b += 0x7fffu + ((b >> 16) & 1u);
    return (u16)(b >> 16);
}

// The 16-bit type the tensor cores see for weights of dtype DT: f16 for f16 (DT 1), bf16 for bf16
// and for F8E4M3 (DT 3, dequantized to bf16).
template <int DT>
__device__ __forceinline__ float half_to_f32(u16 h) {
    return DT == 1 ? f16_to_f32(h) : bf16_to_f32(h);
}

template <int DT>
__device__ __forceinline__ u16 f32_to_half(float x) {
    return DT == 1 ? f32_to_f16(x) : f32_to_bf16(x);
}

// ---- F8E4M3 (DT 3) ----

// One float8_e4m3fn byte as f32, exactly: sign, 4 exponent bits (bias 7), 3 mantissa bits. A
// normal byte moves its fields into place (exponent + 120 rebiases 7 to 127); a subnormal one
// (exponent 0) is m * 2^-9, computed as a product because the shift trick would produce an f32
// denormal, which FTZ code flushes to zero. 0x7F and 0xFF are NaN (the format has no infinity).
__device__ __forceinline__ float e4m3_to_f32(u32 b) {
    const u32 e = (b >> 3) & 15u, m = b & 7u;
    const u32 mag = e == 0u ? __float_as_uint((float)m * 0.001953125f) : ((e + 120u) << 23) | (m << 20);
    const u32 bits = (b & 0x7fu) == 0x7fu ? 0x7fc00000u : mag;
    return __uint_as_float(bits | ((b & 0x80u) << 24));
}

// The block scales of weight row n of group g (one f32 per sb_cols columns).
__device__ __forceinline__ const float* scale_row(const GemmParams& p, const float* __restrict__ scales, u32 g, u32 n) {
    return scales + ((u64)g * p.sg_rows + n / p.sb_rows) * p.sg_cols;
}

// Byte j of NB E4M3 bytes packed little-endian in words.
__device__ __forceinline__ u32 byte_at(const u32* words, int j) {
    return (words[j >> 2] >> (8 * (j & 3))) & 0xffu;
}

// On sm_89 and later, E4M3 bytes are decoded two at a time in hardware: cvt.rn.f16x2.e4m3x2 turns
// two bytes into two f16 (exact: every E4M3 value, subnormals and NaN included, is an f16), then
// each f16 becomes an f32. Why: e4m3_to_f32 is about 15 integer ops a byte, and at decode the gemv
// streams bytes at up to 4.8 TB/s: at that rate the H200's integer lanes (132 SMs x 64 x ~1.9 GHz,
// ~16 T ops/s) would cap it far below the bandwidth. This is 6 conversions per 4 bytes, on the
// conversion pipe, whose rate there is not measured yet (the device check A/Bs the two). Before
// sm_89 (and on the CPU emulator, which has no PTX) the arithmetic decode stays, in its
// per-element form (decoding a word first made sm_80's gemv_f8_e4m3_r2_vec spill). MOE_F8_NO_CVT (the backend defines it under MOE_CUDA_F8_CVT=0)
// keeps the arithmetic decode on sm_89+ too, to compare the two.
#if !defined(MOE_EMULATOR) && !defined(MOE_F8_NO_CVT) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define MOE_F8_CVT 1
#endif

#ifdef MOE_F8_CVT
// The four E4M3 bytes of a word (byte 0 first) as f32.
__device__ __forceinline__ void e4m3x4_to_f32(u32 word, float* out) {
    u32 lo, hi;
    asm("{\n\t.reg .b16 l, h;\n\tmov.b32 {l, h}, %2;\n\tcvt.rn.f16x2.e4m3x2 %0, l;\n\tcvt.rn.f16x2.e4m3x2 %1, h;\n\t}"
        : "=r"(lo), "=r"(hi)
        : "r"(word));
    out[0] = f16_to_f32((u16)(lo & 0xffffu));
    out[1] = f16_to_f32((u16)(lo >> 16));
    out[2] = f16_to_f32((u16)(hi & 0xffffu));
    out[3] = f16_to_f32((u16)(hi >> 16));
}
#endif

// NB E4M3 bytes (packed in words; NB a multiple of 4) times one scale s: a run inside one block.
template <int NB>
__device__ __forceinline__ void f8_scaled(const u32* words, float s, float* out) {
#ifdef MOE_F8_CVT
#pragma unroll
    for (int i = 0; i < NB / 4; i++) e4m3x4_to_f32(words[i], out + 4 * i);
#pragma unroll
    for (int j = 0; j < NB; j++) out[j] *= s;
#else
#pragma unroll
    for (int j = 0; j < NB; j++) out[j] = e4m3_to_f32(byte_at(words, j)) * s;
#endif
}

// NB E4M3 bytes (packed in words) that may cross blocks: element j is column k + j of a weight
// row whose scales are srow. One division finds the first block; the walk then moves to the next
// scale where a block starts. Elements at or past K (zero bytes: their loads were skipped) take
// scale 0, so no scale past the row's grid is read.
template <int NB>
__device__ __forceinline__ void f8_walk(const GemmParams& p, const u32* words, const float* __restrict__ srow, u32 k,
                                        float* out) {
    u32 c = k / p.sb_cols;
    u32 left = p.sb_cols - (k - c * p.sb_cols); // elements of block c from k on
    float s = k < p.k ? srow[c] : 0.0f;
#ifdef MOE_F8_CVT
#pragma unroll
    for (int i = 0; i < NB / 4; i++) e4m3x4_to_f32(words[i], out + 4 * i);
#endif
#pragma unroll
    for (int j = 0; j < NB; j++) {
        if (left == 0u) {
            c++;
            left = p.sb_cols;
            s = k + j < p.k ? srow[c] : 0.0f;
        }
        left--;
#ifdef MOE_F8_CVT
        out[j] *= s;
#else
        out[j] = e4m3_to_f32(byte_at(words, j)) * s;
#endif
    }
}

// The NB-element run at column k (a multiple of NB) of a weight row: one scale when sb_cols is a
// multiple of NB (the run cannot cross a block), else the walk.
template <int NB>
__device__ __forceinline__ void f8_run(const GemmParams& p, const u32* words, const float* __restrict__ srow, u32 k,
                                       float* out) {
    if (p.sb_cols % NB == 0u) {
        f8_scaled<NB>(words, k < p.k ? srow[k / p.sb_cols] : 0.0f, out);
    } else {
        f8_walk<NB>(p, words, srow, k, out);
    }
}

// One weight element as f32 (F8E4M3: unscaled, the caller applies the block scale).
template <int DT>
__device__ __forceinline__ float w_at(const void* __restrict__ w, u64 i) {
    if (DT == 0) {
        return ((const float*)w)[i];
    }
    if (DT == 3) {
        return e4m3_to_f32(((const u8*)w)[i]);
    }
    return half_to_f32<DT>(((const u16*)w)[i]);
}

// Eight weight elements from i (i % 8 == 0, so the load is 16-byte aligned for 16-bit dtypes).
template <int DT>
__device__ __forceinline__ void w_load8(const void* __restrict__ w, u64 i, float* out) {
    if (DT == 0) {
        const float4* p4 = (const float4*)((const float*)w + i);
        float4 a = __ldg(p4);
        float4 b = __ldg(p4 + 1);
        out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
        out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    } else {
        uint4 v = __ldg((const uint4*)((const u16*)w + i));
        u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            out[2 * j] = half_to_f32<DT>((u16)(words[j] & 0xffffu));
            out[2 * j + 1] = half_to_f32<DT>((u16)(words[j] >> 16));
        }
    }
}

// ---- gemm_prep: validation and the zero tail ----

extern "C" __global__ void __launch_bounds__(256)
gemm_prep(const GemmParams p, const u32* __restrict__ ti, const u32* __restrict__ off,
          float* __restrict__ y, u32* __restrict__ errs) {
    const u64 i0 = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    if (p.grouped) {
        if (i0 == 0) {
            if (off[0] != 0u) {
                atomicOr(&errs[3], 1u);
            }
            if (off[p.g] > p.m) {
                atomicOr(&errs[3], 4u);
                atomicMax(&errs[4], off[p.g]);
                atomicMax(&errs[5], p.m);
            }
        }
        for (u64 g = i0; g < p.g; g += stride) {
            if (off[g + 1] < off[g]) {
                atomicOr(&errs[3], 2u);
            }
        }
    }
    if (p.gather) {
        for (u64 r = i0; r < p.m; r += stride) {
            u32 s = ti[r];
            if (s >= p.mx) {
                atomicOr(&errs[6], 1u);
                atomicMax(&errs[7], s);
                atomicMax(&errs[8], p.mx);
            }
        }
    }
    const u64 end = (u64)offset_at(p, off, p.g) * out_cols(p);
    const u64 total = (u64)p.m * out_cols(p);
    for (u64 i = end + i0; i < total; i += stride) {
        y[i] = 0.0f;
    }
}

// ---- gemm_plan: row tiles per group ----

extern "C" __global__ void __launch_bounds__(1024)
gemm_plan(const GemmParams p, const u32* __restrict__ off, u32* __restrict__ tile_start) {
    __shared__ u32 warp_sums[32];
    __shared__ u32 carry_s;
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    if (tid == 0) {
        carry_s = 0u;
    }
    __syncthreads();
    for (u32 base = 0; base < p.g; base += 1024u) {
        const u32 g = base + tid;
        u32 cnt = 0u;
        if (g < p.g) {
            u32 lo = offset_at(p, off, g), hi = offset_at(p, off, g + 1u);
            cnt = hi > lo ? (hi - lo + p.bm - 1u) / p.bm : 0u;
        }
        u32 v = cnt;
        for (int o = 1; o < 32; o <<= 1) {
            u32 t = __shfl_up_sync(0xffffffffu, v, o);
            if (lane >= (u32)o) {
                v += t;
            }
        }
        if (lane == 31u) {
            warp_sums[warp] = v;
        }
        __syncthreads();
        if (warp == 0) {
            u32 w = warp_sums[lane];
            for (int o = 1; o < 32; o <<= 1) {
                u32 t = __shfl_up_sync(0xffffffffu, w, o);
                if (lane >= (u32)o) {
                    w += t;
                }
            }
            warp_sums[lane] = w;
        }
        __syncthreads();
        const u32 incl = v + (warp > 0 ? warp_sums[warp - 1] : 0u);
        const u32 carry = carry_s;
        if (g < p.g) {
            tile_start[g] = carry + incl - cnt;
        }
        __syncthreads();
        if (tid == 1023u) {
            carry_s = carry + incl;
        }
        __syncthreads();
    }
    if (tid == 0) {
        tile_start[p.g] = carry_s;
    }
}

// ---- the row tile and column tile of a block (mma, simt) ----

#define SUPER_N 8u

struct Tile {
    u32 g;     // group
    u32 m0;    // first row
    u32 m_end; // one past the last row
    u32 n0;    // first column
};

// False when this block has no tile (fewer tiles than the worst case the grid was sized for).
template <int BM, int BN>
__device__ __forceinline__ bool find_tile(const GemmParams& p, const u32* __restrict__ off,
                                          const u32* __restrict__ tile_start, Tile& tile) {
    const u32 wid = blockIdx.x;
    const u32 per_sc = SUPER_N * p.max_tiles;
    const u32 sc = wid / per_sc;
    const u32 within = wid - sc * per_sc;
    const u32 left = p.tiles_n - sc * SUPER_N;
    const u32 width = left < SUPER_N ? left : SUPER_N;
    const u32 t = within / width;
    const u32 nt = sc * SUPER_N + within % width;
    if (t >= p.max_tiles || nt >= p.tiles_n) {
        return false;
    }
    tile.n0 = nt * BN;
    if (!p.grouped) {
        tile.g = 0u;
        tile.m0 = t * BM;
        if (tile.m0 >= p.m) {
            return false;
        }
        tile.m_end = tile.m0 + BM < p.m ? tile.m0 + BM : p.m;
        return true;
    }
    if (t >= tile_start[p.g]) {
        return false;
    }
    u32 lo = 0u, hi = p.g; // the largest g < G with tile_start[g] <= t
    while (hi - lo > 1u) {
        u32 mid = (lo + hi) >> 1;
        if (tile_start[mid] <= t) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    tile.g = lo;
    const u32 r_lo = offset_at(p, off, lo), r_hi = offset_at(p, off, lo + 1u);
    tile.m0 = r_lo + (t - tile_start[lo]) * BM;
    tile.m_end = tile.m0 + BM < r_hi ? tile.m0 + BM : r_hi;
    return tile.m0 < tile.m_end;
}

// ---- mma: tensor cores (f16 / bf16 / F8E4M3 weights) ----

#define MMA_BN 128
#define MMA_BK 32
#define MMA_LDS (MMA_BK + 8) // 16-bit elements per shared row: 80 bytes, conflict-free fragment reads

template <int DT>
__device__ __forceinline__ void mma16816(float* c, const u32* a, const u32* b) {
#if defined(MOE_EMULATOR)
    emu_mma16816(DT != 1, c, a, b); // the CPU emulator: the same fragment layout, exchanged per warp
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if (DT != 1) { // bf16, and F8E4M3 dequantized to bf16
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    }
#endif
}

// MT: m16 tiles per warp (BM = 32 * MT: 2 warps along M, 4 along N, a warp owns 16 MT x 32).
// SPLIT: each activation is staged as two 16-bit parts, hi = round(x) and lo = round(x - hi), and
// every product is issued twice (hi . w + lo . w): the activations keep about 16 significant bits
// (relative error ~2^-17 instead of 2^-9 for bf16), for GEMMs whose output must be f32-accurate
// (the router's logits decide the routing). Al holds the lo parts.
// VEC: 16-byte weight loads, K % 8 == 0 for 16-bit weights, K % 16 == 0 for F8E4M3 (x: float4).
template <int DT, int MT, bool VEC, bool SPLIT>
__device__ __forceinline__ void mma_body(const GemmParams& p, const float* __restrict__ x,
                                         const u32* __restrict__ ti, const void* __restrict__ w,
                                         const float* __restrict__ scales, const u32* __restrict__ off,
                                         const u32* __restrict__ tile_start, float* __restrict__ y,
                                         u16* As, u16* Al, u16* Bs) {
    constexpr int BM = 32 * MT;
    Tile tile;
    if (!find_tile<BM, MMA_BN>(p, off, tile_start, tile)) {
        return;
    }
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 wm = warp >> 2, wn = warp & 3u;
    const u32 gid = lane >> 2, tig = lane & 3u;
    const u32 K = p.k, N = p.n;
    const u64 wg = (u64)tile.g * N * K; // the group's first weight element

    // What this thread stages: MT float4 of x (rows), and BL 16-byte loads of weights: 16-bit
    // dtypes 2 x 8 elements (rows idx / 4 of the tile, columns 8 (idx % 4) of the slice, idx = tid,
    // tid + 256), F8E4M3 16 bytes (row tid / 2, columns 16 (tid % 2)) and their scale.
    u32 a_src[MT];
    bool a_ok[MT];
#pragma unroll
    for (int i = 0; i < MT; i++) {
        u32 idx = tid + 256u * i;
        u32 r = tile.m0 + (idx >> 3);
        a_ok[i] = r < tile.m_end;
        a_src[i] = 0u;
        if (a_ok[i]) {
            a_src[i] = source_row(p, ti, r);
            a_ok[i] = a_src[i] < p.mx;
        }
    }
    constexpr int BL = DT == 3 ? 1 : 2;
    auto b_tile_row = [&](int i) { return DT == 3 ? tid >> 1 : (tid + 256u * i) >> 2; };
    auto b_tile_col = [&](int i) { return DT == 3 ? (tid & 1u) * 16u : ((tid + 256u * i) & 3u) * 8u; };
    bool b_ok[BL];
    u64 b_row[BL]; // the weight row's first element
    const float* b_srow = scales; // F8E4M3: the row's block scales
#pragma unroll
    for (int i = 0; i < BL; i++) {
        u32 n = tile.n0 + b_tile_row(i);
        b_ok[i] = n < N;
        b_row[i] = wg + (u64)(b_ok[i] ? wcol(p, n) : 0u) * K;
        if (DT == 3 && b_ok[i]) {
            b_srow = scale_row(p, scales, tile.g, wcol(p, n));
        }
    }
    // F8E4M3: a 16-byte run starts at a multiple of 16, so one scale serves it when sb_cols is a
    // multiple of 16; that scale is prefetched with the bytes (rs), else store() walks the scales.
    const bool one_scale = p.sb_cols % 16u == 0u;

    float4 ra[MT];
    uint4 rb[BL];
    float rs = 0.0f;
    auto load = [&](u32 k0) {
#pragma unroll
        for (int i = 0; i < MT; i++) {
            u32 kk = k0 + ((tid + 256u * i) & 7u) * 4u;
            float4 v = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (a_ok[i]) {
                const float* xr = x + (u64)a_src[i] * K;
                if (VEC) {
                    if (kk < K) {
                        v = __ldg((const float4*)(xr + kk));
                    }
                } else {
                    if (kk < K) v.x = xr[kk];
                    if (kk + 1u < K) v.y = xr[kk + 1u];
                    if (kk + 2u < K) v.z = xr[kk + 2u];
                    if (kk + 3u < K) v.w = xr[kk + 3u];
                }
            }
            ra[i] = v;
        }
#pragma unroll
        for (int i = 0; i < BL; i++) {
            u32 kk = k0 + b_tile_col(i);
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (b_ok[i] && DT == 3) {
                const u8* wr = (const u8*)w + b_row[i];
                if (VEC && kk < K) {
                    v = __ldg((const uint4*)(wr + kk));
                } else if (!VEC) {
                    u32 q[4] = {0u, 0u, 0u, 0u};
#pragma unroll
                    for (int j = 0; j < 16; j++) {
                        if (kk + j < K) q[j >> 2] |= (u32)wr[kk + j] << (8 * (j & 3));
                    }
                    v = make_uint4(q[0], q[1], q[2], q[3]);
                }
                rs = one_scale && kk < K ? b_srow[kk / p.sb_cols] : 0.0f;
            } else if (b_ok[i]) {
                const u16* wr = (const u16*)w + b_row[i];
                if (VEC) {
                    if (kk < K) {
                        v = __ldg((const uint4*)(wr + kk));
                    }
                } else {
                    u32 h[8];
#pragma unroll
                    for (int j = 0; j < 8; j++) {
                        h[j] = kk + j < K ? (u32)wr[kk + j] : 0u;
                    }
                    v = make_uint4(h[0] | (h[1] << 16), h[2] | (h[3] << 16), h[4] | (h[5] << 16), h[6] | (h[7] << 16));
                }
            }
            rb[i] = v;
        }
    };
    auto store = [&](u32 k0) {
#pragma unroll
        for (int i = 0; i < MT; i++) {
            u32 idx = tid + 256u * i;
            u32 row = idx >> 3, c = (idx & 7u) * 4u;
            const float v[4] = {ra[i].x, ra[i].y, ra[i].z, ra[i].w};
            u16 h[4], l[4];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                h[q] = f32_to_half<DT>(v[q]);
                l[q] = SPLIT ? f32_to_half<DT>(v[q] - half_to_f32<DT>(h[q])) : (u16)0;
            }
            *(uint2*)(As + row * MMA_LDS + c) = make_uint2((u32)h[0] | ((u32)h[1] << 16), (u32)h[2] | ((u32)h[3] << 16));
            if (SPLIT) {
                *(uint2*)(Al + row * MMA_LDS + c) = make_uint2((u32)l[0] | ((u32)l[1] << 16), (u32)l[2] | ((u32)l[3] << 16));
            }
        }
#pragma unroll
        for (int i = 0; i < BL; i++) {
            const u32 row = b_tile_row(i), c = b_tile_col(i);
            if (DT == 3) { // dequantize: q * scale in f32 (as moe_hal::fp8), rounded once to bf16
                const u32 q[4] = {rb[i].x, rb[i].y, rb[i].z, rb[i].w};
                float f[16];
                if (one_scale) {
                    f8_scaled<16>(q, rs, f);
                } else {
                    f8_walk<16>(p, q, b_srow, k0 + c, f);
                }
                u32 h[8];
#pragma unroll
                for (int j = 0; j < 8; j++) h[j] = (u32)f32_to_bf16(f[2 * j]) | ((u32)f32_to_bf16(f[2 * j + 1]) << 16);
                *(uint4*)(Bs + row * MMA_LDS + c) = make_uint4(h[0], h[1], h[2], h[3]);
                *(uint4*)(Bs + row * MMA_LDS + c + 8) = make_uint4(h[4], h[5], h[6], h[7]);
            } else {
                *(uint4*)(Bs + row * MMA_LDS + c) = rb[i];
            }
        }
    };

    float acc[MT][4][4];
#pragma unroll
    for (int i = 0; i < MT; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int q = 0; q < 4; q++) acc[i][j][q] = 0.0f;

    load(0u);
    for (u32 k0 = 0; k0 < K; k0 += MMA_BK) {
        store(k0);
        __syncthreads();
        if (k0 + MMA_BK < K) {
            load(k0 + MMA_BK); // in flight while the tensor cores work
        }
#pragma unroll
        for (int kk = 0; kk < MMA_BK; kk += 16) {
            u32 a[MT][4], b[4][2];
            // The A fragments (m16 x k16 per i) of this warp from a staged x slice: the values
            // (As) or, with SPLIT, their lo parts (Al).
            auto load_a = [&](const u16* S) {
#pragma unroll
                for (int i = 0; i < MT; i++) {
                    const u16* base = S + (wm * (16 * MT) + i * 16 + gid) * MMA_LDS + kk + tig * 2;
                    a[i][0] = *(const u32*)(base);
                    a[i][1] = *(const u32*)(base + 8 * MMA_LDS);
                    a[i][2] = *(const u32*)(base + 8);
                    a[i][3] = *(const u32*)(base + 8 * MMA_LDS + 8);
                }
            };
            load_a(As);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const u16* base = Bs + (wn * 32 + j * 8 + gid) * MMA_LDS + kk + tig * 2;
                b[j][0] = *(const u32*)(base);
                b[j][1] = *(const u32*)(base + 8);
            }
#pragma unroll
            for (int i = 0; i < MT; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) mma16816<DT>(acc[i][j], a[i], b[j]);
            if (SPLIT) {
                load_a(Al);
#pragma unroll
                for (int i = 0; i < MT; i++)
#pragma unroll
                    for (int j = 0; j < 4; j++) mma16816<DT>(acc[i][j], a[i], b[j]);
            }
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < MT; i++) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 c0 = tile.n0 + wn * 32 + j * 8 + tig * 2;
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const u32 r = tile.m0 + wm * (16 * MT) + i * 16 + gid + h * 8;
                if (r < tile.m_end && p.swiglu) {
                    if (c0 < N) y[(u64)r * (N >> 1) + (c0 >> 1)] = silu_f(acc[i][j][2 * h]) * acc[i][j][2 * h + 1];
                } else if (r < tile.m_end) {
                    float* yr = y + (u64)r * N;
                    if (c0 < N) yr[c0] = acc[i][j][2 * h];
                    if (c0 + 1u < N) yr[c0 + 1u] = acc[i][j][2 * h + 1];
                }
            }
        }
    }
}

#define MMA_KERNEL(NAME, DT, MT, VEC, SPLIT)                                                            \
    extern "C" __global__ void __launch_bounds__(256)                                                \
    NAME(const GemmParams p, const float* __restrict__ x, const u32* __restrict__ ti,                 \
         const void* __restrict__ w, const float* __restrict__ scales, const u32* __restrict__ off,   \
         const u32* __restrict__ tile_start, float* __restrict__ y) {                                 \
        __shared__ __align__(16) u16 As[32 * MT * MMA_LDS];                                           \
        __shared__ __align__(16) u16 Al[SPLIT ? 32 * MT * MMA_LDS : 8];                               \
        __shared__ __align__(16) u16 Bs[MMA_BN * MMA_LDS];                                            \
        mma_body<DT, MT, VEC, SPLIT>(p, x, ti, w, scales, off, tile_start, y, As, Al, Bs);            \
    }

MMA_KERNEL(mma_f16_m64_vec, 1, 2, true, false)
MMA_KERNEL(mma_f16_m64_any, 1, 2, false, false)
MMA_KERNEL(mma_f16_m128_vec, 1, 4, true, false)
MMA_KERNEL(mma_f16_m128_any, 1, 4, false, false)
MMA_KERNEL(mma_bf16_m64_vec, 2, 2, true, false)
MMA_KERNEL(mma_bf16_m64_any, 2, 2, false, false)
MMA_KERNEL(mma_bf16_m128_vec, 2, 4, true, false)
MMA_KERNEL(mma_bf16_m128_any, 2, 4, false, false)
MMA_KERNEL(mma_f8_e4m3_m64_vec, 3, 2, true, false)
MMA_KERNEL(mma_f8_e4m3_m64_any, 3, 2, false, false)
MMA_KERNEL(mma_f8_e4m3_m128_vec, 3, 4, true, false)
MMA_KERNEL(mma_f8_e4m3_m128_any, 3, 4, false, false)
MMA_KERNEL(mma_split_f16_m64_vec, 1, 2, true, true)
MMA_KERNEL(mma_split_f16_m64_any, 1, 2, false, true)
MMA_KERNEL(mma_split_f16_m128_vec, 1, 4, true, true)
MMA_KERNEL(mma_split_f16_m128_any, 1, 4, false, true)
MMA_KERNEL(mma_split_bf16_m64_vec, 2, 2, true, true)
MMA_KERNEL(mma_split_bf16_m64_any, 2, 2, false, true)
MMA_KERNEL(mma_split_bf16_m128_vec, 2, 4, true, true)
MMA_KERNEL(mma_split_bf16_m128_any, 2, 4, false, true)
MMA_KERNEL(mma_split_f8_e4m3_m64_vec, 3, 2, true, true)
MMA_KERNEL(mma_split_f8_e4m3_m64_any, 3, 2, false, true)
MMA_KERNEL(mma_split_f8_e4m3_m128_vec, 3, 4, true, true)
MMA_KERNEL(mma_split_f8_e4m3_m128_any, 3, 4, false, true)

// ---- simt: plain f32 FMA tiles ----

#define SIMT_BM 64
#define SIMT_BN 64
#define SIMT_BK 16

// VEC: K % 4 == 0 (rows start on 16-byte boundaries for f32 x and f32 w, 8-byte for 16-bit w,
// 4-byte for F8E4M3 w).
template <int DT, bool VEC>
__device__ __forceinline__ void simt_body(const GemmParams& p, const float* __restrict__ x,
                                          const u32* __restrict__ ti, const void* __restrict__ w,
                                          const float* __restrict__ scales, const u32* __restrict__ off,
                                          const u32* __restrict__ tile_start, float* __restrict__ y,
                                          float* xs, float* ws) {
    Tile tile;
    if (!find_tile<SIMT_BM, SIMT_BN>(p, off, tile_start, tile)) {
        return;
    }
    const u32 tid = threadIdx.x;
    const u32 K = p.k, N = p.n;
    const u32 tx = tid & 15u; // output columns n0 + 4 tx ..
    const u32 ty = tid >> 4;  // output rows m0 + 4 ty ..
    const u32 lr = tid >> 2;  // the x row / w row this thread stages
    const u32 lk = (tid & 3u) * 4u;

    const u32 xr_ = tile.m0 + lr;
    bool x_ok = xr_ < tile.m_end;
    u32 src = 0u;
    if (x_ok) {
        src = source_row(p, ti, xr_);
        x_ok = src < p.mx;
    }
    const u32 wn = tile.n0 + lr;
    const bool w_ok = wn < N;
    const u64 wrow = ((u64)tile.g * N + (w_ok ? wcol(p, wn) : 0u)) * K;
    const float* srow = DT == 3 && w_ok ? scale_row(p, scales, tile.g, wcol(p, wn)) : scales;

    float xv[4], wv[4];
    auto load = [&](u32 k0) {
        const u32 kk = k0 + lk;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            xv[j] = 0.0f;
            wv[j] = 0.0f;
        }
        if (x_ok && kk < K) {
            const float* xr = x + (u64)src * K;
            if (VEC) {
                float4 v = __ldg((const float4*)(xr + kk));
                xv[0] = v.x; xv[1] = v.y; xv[2] = v.z; xv[3] = v.w;
            } else {
#pragma unroll
                for (int j = 0; j < 4; j++) xv[j] = kk + j < K ? xr[kk + j] : 0.0f;
            }
        }
        if (w_ok && kk < K && DT == 3) { // 4 bytes from a multiple of 4: f8_run's one-scale case
            u32 q = 0u;
            if (VEC) {
                q = __ldg((const u32*)((const u8*)w + wrow + kk));
            } else {
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    if (kk + j < K) q |= (u32)((const u8*)w)[wrow + kk + j] << (8 * j);
                }
            }
            f8_run<4>(p, &q, srow, kk, wv);
        } else if (w_ok && kk < K) {
            if (VEC && DT == 0) {
                float4 v = __ldg((const float4*)((const float*)w + wrow + kk));
                wv[0] = v.x; wv[1] = v.y; wv[2] = v.z; wv[3] = v.w;
            } else if (VEC) {
                uint2 v = __ldg((const uint2*)((const u16*)w + wrow + kk));
                wv[0] = half_to_f32<DT>((u16)(v.x & 0xffffu));
                wv[1] = half_to_f32<DT>((u16)(v.x >> 16));
                wv[2] = half_to_f32<DT>((u16)(v.y & 0xffffu));
                wv[3] = half_to_f32<DT>((u16)(v.y >> 16));
            } else {
#pragma unroll
                for (int j = 0; j < 4; j++) wv[j] = kk + j < K ? w_at<DT>(w, wrow + kk + j) : 0.0f;
            }
        }
    };

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.0f;

    load(0u);
    for (u32 k0 = 0; k0 < K; k0 += SIMT_BK) {
#pragma unroll
        for (int j = 0; j < 4; j++) {
            xs[(lk + j) * SIMT_BM + lr] = xv[j];
            ws[(lk + j) * SIMT_BN + lr] = wv[j];
        }
        __syncthreads();
        if (k0 + SIMT_BK < K) {
            load(k0 + SIMT_BK);
        }
#pragma unroll
        for (int kk = 0; kk < SIMT_BK; kk++) {
            const float4 a = *(const float4*)(xs + kk * SIMT_BM + ty * 4);
            const float4 b = *(const float4*)(ws + kk * SIMT_BN + tx * 4);
            const float av[4] = {a.x, a.y, a.z, a.w};
            const float bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; i++)
#pragma unroll
                for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
    }

#pragma unroll
    for (int i = 0; i < 4; i++) {
        const u32 r = tile.m0 + ty * 4 + i;
        if (r >= tile.m_end) {
            continue;
        }
        if (p.swiglu) { // columns 4 tx + {0, 1} and {2, 3} are (gate, up) pairs; N is even
#pragma unroll
            for (int j = 0; j < 4; j += 2) {
                const u32 c = tile.n0 + tx * 4 + j;
                if (c < N) {
                    y[(u64)r * (N >> 1) + (c >> 1)] = silu_f(acc[i][j]) * acc[i][j + 1];
                }
            }
            continue;
        }
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const u32 c = tile.n0 + tx * 4 + j;
            if (c < N) {
                y[(u64)r * N + c] = acc[i][j];
            }
        }
    }
}

#define SIMT_KERNEL(NAME, DT, VEC)                                                                      \
    extern "C" __global__ void __launch_bounds__(256, 2)                                                \
    NAME(const GemmParams p, const float* __restrict__ x, const u32* __restrict__ ti,                 \
         const void* __restrict__ w, const float* __restrict__ scales, const u32* __restrict__ off,   \
         const u32* __restrict__ tile_start, float* __restrict__ y) {                                 \
        __shared__ __align__(16) float xs[SIMT_BK * SIMT_BM];                                         \
        __shared__ __align__(16) float ws[SIMT_BK * SIMT_BN];                                         \
        simt_body<DT, VEC>(p, x, ti, w, scales, off, tile_start, y, xs, ws);                         \
    }

SIMT_KERNEL(simt_f32_vec, 0, true)
SIMT_KERNEL(simt_f32_any, 0, false)
SIMT_KERNEL(simt_f16_vec, 1, true)
SIMT_KERNEL(simt_f16_any, 1, false)
SIMT_KERNEL(simt_bf16_vec, 2, true)
SIMT_KERNEL(simt_bf16_any, 2, false)
SIMT_KERNEL(simt_f8_e4m3_vec, 3, true)
SIMT_KERNEL(simt_f8_e4m3_any, 3, false)

// ---- gemv: decode, each touched expert's weights streamed once ----

// A pass takes up to GEMV_RB token rows of its group against the block's weight rows, so an expert
// with at most 8 rows (DeepSeek-V3 at T = 128 averages 4 and often has 5 to 8) reads its weights
// once: a second pass rereads them from memory, not L2 (the blocks in flight between the two
// reads stream far more than L2 holds). The rows a pass lacks cost nothing: `nq` is the same for
// the whole block, so each `q < nq` test is a uniform branch that skips the row's loads, FMAs and
// reduction (decode, one row per expert, does one row of work, not 8).
#ifndef GEMV_RB
#define GEMV_RB 8 // MOE_GEMV_PASS_ROWS=4 compiles with -DGEMV_RB=4, the old pass, to compare
#endif

// GEMV_PREFETCH (bytes; MOE_CUDA_GEMV_PREFETCH=B compiles with -DGEMV_PREFETCH=B, 0 by default):
// at each step of the vector loops one lane per weight row asks L2 for the row's step-sized
// slice B bytes further on, so reads from DRAM are in flight beyond what the loads of this step
// hold in registers (r4 sits at 126 of the 128 registers that keep 16 warps per multiprocessor,
// and a warp's loads of one step are 2 KiB). The CPU backend's decode gained 2x from the same
// idea (host/gemm/x86.rs, PREFETCH_AHEAD); not measured on a GPU yet: the device check A/Bs it.
// Only whole slices inside the row are prefetched, so no address past the weights is named.
#ifndef GEMV_PREFETCH
#define GEMV_PREFETCH 0
#endif

// Asks L2 for the `bytes` (a multiple of 128, 16-byte aligned) at p: a hint, no register holds
// the data. sm_90: one bulk prefetch; sm_80..89: a line at a time; the emulator: nothing.
__device__ __forceinline__ void l2_prefetch(const void* p, u32 bytes) {
#if !defined(MOE_EMULATOR) && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#elif !defined(MOE_EMULATOR) && defined(__CUDA_ARCH__)
    for (u32 o = 0; o < bytes; o += 128u) {
        asm volatile("prefetch.global.L2 [%0];" ::"l"((const char*)p + o));
    }
#else
    (void)p;
    (void)bytes;
#endif
}

// The prefetch of one vector step (see GEMV_PREFETCH): lane i < NR takes weight row i, whose
// step starts at element `base` and covers `step_bytes` bytes; nothing past the row's end.
template <int NR>
__device__ __forceinline__ void gemv_prefetch(const void* w, const u64* wrow, const bool* wok, u32 lane, u32 base, u32 esize,
                                              u32 step_bytes, u32 K) {
#if GEMV_PREFETCH > 0
    const u64 at = (u64)base * esize + GEMV_PREFETCH;
    if (at + step_bytes > (u64)K * esize) {
        return;
    }
#pragma unroll
    for (int i = 0; i < NR; i++) {
        if (lane == (u32)i && wok[i]) {
            l2_prefetch((const u8*)w + wrow[i] * esize + at, step_bytes);
        }
    }
#else
    (void)w, (void)wrow, (void)wok, (void)lane, (void)base, (void)esize, (void)step_bytes, (void)K;
#endif
}

// NR: weight rows per warp (a block owns 8 * NR rows); even for SwiGLU. VEC: 16-byte loads, a lane
// taking 8 elements of a row per step (K % 8 == 0), or 16 for F8E4M3 (K % 16 == 0). Each step
// decodes the NR rows' weights once, then each token row of the pass loads its x and accumulates:
// only one token row's x is live at a time, which holds r4 under 128 registers (2 blocks per
// multiprocessor) without spilling.
template <int DT, int NR, bool VEC>
__device__ __forceinline__ void gemv_body(const GemmParams& p, const float* __restrict__ x,
                                          const u32* __restrict__ ti, const void* __restrict__ w,
                                          const float* __restrict__ scales, const u32* __restrict__ off,
                                          float* __restrict__ y) {
    const u32 tid = threadIdx.x, lane = tid & 31u, warp = tid >> 5;
    const u32 nt = blockIdx.x % p.tiles_n;
    const u32 slot = blockIdx.x / p.tiles_n;
    if (slot >= p.max_tiles) {
        return;
    }
    u32 g = slot;
    if (p.by_row) {
        if (slot >= p.m) {
            return;
        }
        g = group_of_row(p, off, slot);
        if (offset_at(p, off, g) != slot) {
            return; // not the first row of its group: another block has the group
        }
    }
    if (g >= p.g) {
        return;
    }
    const u32 r_lo = offset_at(p, off, g), r_hi = offset_at(p, off, g + 1u);
    if (r_hi <= r_lo) {
        return; // an idle expert costs nothing but this check
    }
    const u32 K = p.k, N = p.n;
    const u32 n_base = nt * (8u * NR) + warp * NR;
    if (n_base >= N) {
        return; // no warp-wide barrier below: a warp may leave on its own
    }
    u64 wrow[NR];
    bool wok[NR];
    const float* srow[NR]; // F8E4M3: the rows' block scales
#pragma unroll
    for (int i = 0; i < NR; i++) {
        wok[i] = n_base + i < N;
        const u32 n = wcol(p, wok[i] ? n_base + i : n_base);
        wrow[i] = ((u64)g * N + n) * K;
        srow[i] = DT == 3 ? scale_row(p, scales, g, n) : scales;
    }
    // F8E4M3, VEC: a lane's 16 bytes start at a multiple of 16, so one scale per row serves them
    // when sb_cols is a multiple of 16 (else f8_walk, per word of 4).
    const bool one_scale = p.sb_cols % 16u == 0u;

    for (u32 rb = r_lo; rb < r_hi; rb += GEMV_RB) {
        const u32 nq = r_hi - rb < GEMV_RB ? r_hi - rb : GEMV_RB; // the pass's rows: uniform in the block
        // Each token row's x row: p.mx (read as zeros) for a row the pass lacks or a bad token
        // index (prep flags those). 32-bit row numbers, not 64-bit element offsets: the 8 rows'
        // addresses would take 16 registers through the loop; a multiply per load is cheaper.
        u32 src[GEMV_RB];
#pragma unroll
        for (int q = 0; q < GEMV_RB; q++) {
            src[q] = (u32)q < nq ? source_row(p, ti, rb + q) : p.mx;
        }
        float acc[NR][GEMV_RB];
#pragma unroll
        for (int i = 0; i < NR; i++)
#pragma unroll
            for (int q = 0; q < GEMV_RB; q++) acc[i][q] = 0.0f;

        if (VEC && DT == 3) {
#pragma unroll 2
            for (u32 kk = lane * 16u; kk < K; kk += 512u) {
                gemv_prefetch<NR>(w, wrow, wok, lane, kk - lane * 16u, 1u, 512u, K);
                // The NR rows' 16 bytes first (the loads in flight together), then four words of 4
                // elements, in a loop kept rolled so only 4 decoded weights per row are live.
                uint4 raw[NR];
                float s[NR];
                const u32 c = one_scale ? kk / p.sb_cols : 0u;
#pragma unroll
                for (int i = 0; i < NR; i++) {
                    raw[i] = make_uint4(0u, 0u, 0u, 0u);
                    s[i] = 0.0f;
                    if (wok[i]) {
                        raw[i] = __ldg((const uint4*)((const u8*)w + wrow[i] + kk));
                        s[i] = one_scale ? srow[i][c] : 0.0f;
                    }
                }
#pragma unroll 1
                for (u32 h = 0; h < 4u; h++) {
                    const u32 k4 = kk + 4u * h;
                    float wv[NR][4];
#pragma unroll
                    for (int i = 0; i < NR; i++) {
                        const u32 q4 = h == 0u ? raw[i].x : h == 1u ? raw[i].y : h == 2u ? raw[i].z : raw[i].w;
                        if (!wok[i]) {
#pragma unroll
                            for (int j = 0; j < 4; j++) wv[i][j] = 0.0f;
                        } else if (one_scale) {
                            f8_scaled<4>(&q4, s[i], wv[i]);
                        } else {
                            f8_walk<4>(p, &q4, srow[i], k4, wv[i]);
                        }
                    }
#pragma unroll
                    for (int q = 0; q < GEMV_RB; q++) {
                        if ((u32)q < nq) {
                            float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                            if (src[q] < p.mx) {
                                a = __ldg((const float4*)(x + (u64)src[q] * K + k4));
                            }
                            const float xv[4] = {a.x, a.y, a.z, a.w};
#pragma unroll
                            for (int i = 0; i < NR; i++)
#pragma unroll
                                for (int j = 0; j < 4; j++) acc[i][q] = fmaf(xv[j], wv[i][j], acc[i][q]);
                        }
                    }
                }
            }
        } else if (VEC) {
#pragma unroll 2
            for (u32 kk = lane * 8u; kk < K; kk += 256u) {
                gemv_prefetch<NR>(w, wrow, wok, lane, kk - lane * 8u, DT == 0 ? 4u : 2u, DT == 0 ? 1024u : 512u, K);
                float wv[NR][8];
#pragma unroll
                for (int i = 0; i < NR; i++) {
                    if (wok[i]) {
                        w_load8<DT>(w, wrow[i] + kk, wv[i]);
                    } else {
#pragma unroll
                        for (int j = 0; j < 8; j++) wv[i][j] = 0.0f;
                    }
                }
#pragma unroll
                for (int q = 0; q < GEMV_RB; q++) {
                    if ((u32)q < nq) {
                        float xv[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
                        if (src[q] < p.mx) {
                            const float4* x4 = (const float4*)(x + (u64)src[q] * K + kk);
                            float4 a = __ldg(x4);
                            float4 b = __ldg(x4 + 1);
                            xv[0] = a.x; xv[1] = a.y; xv[2] = a.z; xv[3] = a.w;
                            xv[4] = b.x; xv[5] = b.y; xv[6] = b.z; xv[7] = b.w;
                        }
#pragma unroll
                        for (int i = 0; i < NR; i++)
#pragma unroll
                            for (int j = 0; j < 8; j++) acc[i][q] = fmaf(xv[j], wv[i][j], acc[i][q]);
                    }
                }
            }
        } else {
            for (u32 kk = lane; kk < K; kk += 32u) {
                const u32 c = DT == 3 ? kk / p.sb_cols : 0u; // the scale column, shared by the rows
                float wv[NR];
#pragma unroll
                for (int i = 0; i < NR; i++) {
                    wv[i] = 0.0f;
                    if (wok[i]) {
                        wv[i] = DT == 3 ? w_at<DT>(w, wrow[i] + kk) * srow[i][c] : w_at<DT>(w, wrow[i] + kk);
                    }
                }
#pragma unroll
                for (int q = 0; q < GEMV_RB; q++) {
                    if ((u32)q < nq) {
                        const float xv = src[q] < p.mx ? x[(u64)src[q] * K + kk] : 0.0f;
#pragma unroll
                        for (int i = 0; i < NR; i++) acc[i][q] = fmaf(xv, wv[i], acc[i][q]);
                    }
                }
            }
        }
#pragma unroll
        for (int q = 0; q < GEMV_RB; q++) {
            if ((u32)q >= nq) {
                continue;
            }
#pragma unroll
            for (int i = 0; i < NR; i++) {
                float v = acc[i][q];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                acc[i][q] = v;
            }
        }
        if (lane == 0 && p.swiglu) { // rows n_base + i, i even, are (gate, up) pairs (NR even)
#pragma unroll
            for (int q = 0; q < GEMV_RB; q++) {
                if ((u32)q >= nq) {
                    continue;
                }
                const u32 r = rb + q;
#pragma unroll
                for (int i = 0; i + 1 < NR; i += 2) {
                    if (wok[i]) {
                        y[(u64)r * (N >> 1) + ((n_base + i) >> 1)] = silu_f(acc[i][q]) * acc[i + 1][q];
                    }
                }
            }
        } else if (lane == 0) {
#pragma unroll
            for (int q = 0; q < GEMV_RB; q++) {
                if ((u32)q >= nq) {
                    continue;
                }
                const u32 r = rb + q;
#pragma unroll
                for (int i = 0; i < NR; i++) {
                    if (wok[i]) {
                        y[(u64)r * N + n_base + i] = acc[i][q];
                    }
                }
            }
        }
    }
}

#define GEMV_KERNEL(NAME, DT, NR, VEC)                                                                  \
    extern "C" __global__ void __launch_bounds__(256)                                                \
    NAME(const GemmParams p, const float* __restrict__ x, const u32* __restrict__ ti,                 \
         const void* __restrict__ w, const float* __restrict__ scales, const u32* __restrict__ off,   \
         float* __restrict__ y) {                                                                     \
        gemv_body<DT, NR, VEC>(p, x, ti, w, scales, off, y);                                          \
    }

GEMV_KERNEL(gemv_f32_r1_vec, 0, 1, true)
GEMV_KERNEL(gemv_f32_r1_any, 0, 1, false)
GEMV_KERNEL(gemv_f32_r2_vec, 0, 2, true)
GEMV_KERNEL(gemv_f32_r2_any, 0, 2, false)
GEMV_KERNEL(gemv_f32_r4_vec, 0, 4, true)
GEMV_KERNEL(gemv_f32_r4_any, 0, 4, false)
GEMV_KERNEL(gemv_f16_r1_vec, 1, 1, true)
GEMV_KERNEL(gemv_f16_r1_any, 1, 1, false)
GEMV_KERNEL(gemv_f16_r2_vec, 1, 2, true)
GEMV_KERNEL(gemv_f16_r2_any, 1, 2, false)
GEMV_KERNEL(gemv_f16_r4_vec, 1, 4, true)
GEMV_KERNEL(gemv_f16_r4_any, 1, 4, false)
GEMV_KERNEL(gemv_bf16_r1_vec, 2, 1, true)
GEMV_KERNEL(gemv_bf16_r1_any, 2, 1, false)
GEMV_KERNEL(gemv_bf16_r2_vec, 2, 2, true)
GEMV_KERNEL(gemv_bf16_r2_any, 2, 2, false)
GEMV_KERNEL(gemv_bf16_r4_vec, 2, 4, true)
GEMV_KERNEL(gemv_bf16_r4_any, 2, 4, false)
GEMV_KERNEL(gemv_f8_e4m3_r1_vec, 3, 1, true)
GEMV_KERNEL(gemv_f8_e4m3_r1_any, 3, 1, false)
GEMV_KERNEL(gemv_f8_e4m3_r2_vec, 3, 2, true)
GEMV_KERNEL(gemv_f8_e4m3_r2_any, 3, 2, false)
GEMV_KERNEL(gemv_f8_e4m3_r4_vec, 3, 4, true)
GEMV_KERNEL(gemv_f8_e4m3_r4_any, 3, 4, false)
