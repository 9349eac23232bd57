// router_topk: logits [T, E] f32 -> topk_ids [T, k] u32 (best first), topk_weights [T, k] f32.
//
// Self-contained (NVRTC has no system headers): no #include, integer types declared below.
//
// One block of 256 threads per token, for any E:
// * The token's scores (softmax probabilities p, or corrected sigmoid scores c) and its group
//   scores live in one float buffer of E + 2 * n_group values: dynamic shared memory when it fits
//   the default 48 KiB (E up to about 12,000), else a global scratch row per token (`global_scratch`).
// * Ranking matches moe_hal::host::ranks_above exactly: a score becomes an order-preserving u32
//   key (numbers above NaN, NaN = 1, an expert of a dropped group = 0, -0.0 equal to +0.0), and a
//   candidate is the 64-bit value (key << 32) | (0xffffffff - index), so one unsigned comparison
//   ranks larger scores first and equal scores by the lower index. The j-th pick is the best
//   candidate ranking strictly below pick j - 1 (no "taken" array), found by a block-wide max.
// * Softmax: the max over non-NaN logits; any NaN logit, or an infinite max, makes every
//   probability NaN (the host propagates NaN through its sum the same way); the sum is a block
//   reduction (f32, a different order from the host's: about 1e-7 relative).
// * Sigmoid-grouped (DeepSeek-V3 E = 256, Kimi K2 E = 384, any E): s = 1 / (1 + exp(-l)),
//   c = s + bias; a group's score is the sum of its best min(2, group size) c; the best
//   topk_group groups are kept (same ranking rules); experts of dropped groups rank below
//   everything (key 0) so a pick never leaves the kept groups; weights use s, not c; the norm adds
//   1e-20; then routed_scaling_factor.
// * Weights are summed in pick order by one thread, as the host does.

typedef unsigned int u32;
typedef unsigned long long u64;

#define RT_THREADS 256
#define RT_WARPS (RT_THREADS / 32)

struct RouterParams {
    u32 t;              // tokens
    u32 e;              // experts
    u32 k;              // experts per token
    u32 mode;           // 0 softmax, 1 sigmoid grouped
    u32 n_group;        // groups (sigmoid); 0 for softmax
    u32 topk_group;     // groups kept (sigmoid)
    u32 norm;           // norm_topk_prob
    u32 has_bias;       // e_score_correction_bias given
    float scale;        // routed_scaling_factor (sigmoid)
    u32 global_scratch; // 1: the per-token buffer is a row of `scratch`, not shared memory
    u32 stride;         // floats per token in the buffer: e + 2 * n_group
    u32 pad0, pad1, pad2, pad3, pad4;
};

__device__ __forceinline__ bool is_nan_f(float v) {
    return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
}

__device__ __forceinline__ bool is_inf_f(float v) {
    return (__float_as_uint(v) & 0x7fffffffu) == 0x7f800000u;
}

// Order-preserving key: larger scores give larger keys; NaN -> 1; 0 is left for "masked".
__device__ __forceinline__ u32 key_of(float v) {
    if (is_nan_f(v)) {
        return 1u;
    }
    u32 b = __float_as_uint(v);
    if (b == 0x80000000u) {
        b = 0u; // -0.0 ranks equal to +0.0
    }
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

// A candidate: larger is better; equal keys go to the lower index. Never 0 for a real candidate.
__device__ __forceinline__ u64 rank_of(u32 key, u32 i) {
    return ((u64)key << 32) | (u64)(0xffffffffu - i);
}

__device__ __forceinline__ u32 index_of(u64 r) {
    return 0xffffffffu - (u32)(r & 0xffffffffull);
}

__device__ __forceinline__ float sigmoid_f(float l) {
    return 1.0f / (1.0f + expf(-l));
}

// Block-wide reductions; every thread gets the result. `red*` are shared scratch of RT_WARPS.
__device__ u64 block_max_u64(u64 v, u64* red) {
    for (int o = 16; o > 0; o >>= 1) {
        u64 w = __shfl_xor_sync(0xffffffffu, v, o);
        v = w > v ? w : v;
    }
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    __syncthreads(); // the previous call's readers are done with red
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    v = red[0];
    for (int w = 1; w < RT_WARPS; w++) {
        u64 x = red[w];
        v = x > v ? x : v;
    }
    return v;
}

__device__ float block_max_f(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    }
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    __syncthreads();
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    v = red[0];
    for (int w = 1; w < RT_WARPS; w++) {
        v = fmaxf(v, red[w]);
    }
    return v;
}

__device__ float block_sum_f(float v, float* red) {
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    __syncthreads();
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    v = red[0];
    for (int w = 1; w < RT_WARPS; w++) {
        v += red[w];
    }
    return v;
}

__device__ u32 block_or_u32(u32 v, u32* red) {
    for (int o = 16; o > 0; o >>= 1) {
        v |= __shfl_xor_sync(0xffffffffu, v, o);
    }
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31u;
    __syncthreads();
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    v = red[0];
    for (int w = 1; w < RT_WARPS; w++) {
        v |= red[w];
    }
    return v;
}

extern "C" __global__ void __launch_bounds__(RT_THREADS)
router_topk(const RouterParams p, const float* __restrict__ logits, const float* __restrict__ bias,
            float* __restrict__ scratch, u32* __restrict__ ids, float* __restrict__ weights) {
    extern __shared__ float dyn[];
    __shared__ u64 red64[RT_WARPS];
    __shared__ float redf[RT_WARPS];
    __shared__ u32 red32[RT_WARPS];

    const u32 tok = blockIdx.x;
    if (tok >= p.t) {
        return;
    }
    const u32 tid = threadIdx.x;
    const u32 e = p.e;
    float* buf = p.global_scratch ? scratch + (u64)tok * p.stride : dyn;
    float* score = buf;              // [e]: p (softmax) or c (sigmoid)
    float* gscore = buf + e;         // [n_group]
    float* kept = gscore + p.n_group; // [n_group]: 1 kept, 0 dropped
    const float* l = logits + (u64)tok * e;
    const float nan_f = __uint_as_float(0x7fffffffu);

    u32 per = e; // experts per group (softmax: one group)
    if (p.mode == 0u) {
        // ---- softmax ----
        float m = __uint_as_float(0xff800000u); // -inf
        u32 bad = 0u;
        for (u32 i = tid; i < e; i += RT_THREADS) {
            float v = l[i];
            if (is_nan_f(v)) {
                bad = 1u;
            } else {
                m = fmaxf(m, v);
            }
        }
        m = block_max_f(m, redf);
        bad = block_or_u32(bad, red32);
        if (is_inf_f(m)) {
            bad = 1u; // +inf: inf - inf is NaN; all -inf: -inf - -inf is NaN (as on the host)
        }
        float s = 0.0f;
        for (u32 i = tid; i < e; i += RT_THREADS) {
            float x = bad ? nan_f : expf(l[i] - m);
            score[i] = x;
            s += x;
        }
        s = block_sum_f(s, redf); // also orders the writes above before the reads below
        for (u32 i = tid; i < e; i += RT_THREADS) {
            score[i] = score[i] / s;
        }
        __syncthreads();
    } else {
        // ---- sigmoid, bias-corrected, group-limited ----
        for (u32 i = tid; i < e; i += RT_THREADS) {
            float c = sigmoid_f(l[i]);
            if (p.has_bias) {
                c = c + bias[i];
            }
            score[i] = c;
        }
        __syncthreads();
        per = e / p.n_group;
        for (u32 g = tid; g < p.n_group; g += RT_THREADS) {
            u64 b1 = 0ull, b2 = 0ull;
            for (u32 i = g * per; i < (g + 1u) * per; i++) {
                u64 r = rank_of(key_of(score[i]), i);
                if (r > b1) {
                    b2 = b1;
                    b1 = r;
                } else if (r > b2) {
                    b2 = r;
                }
            }
            float gs = 0.0f + score[index_of(b1)];
            if (per >= 2u) {
                gs = gs + score[index_of(b2)];
            }
            gscore[g] = gs;
            kept[g] = 0.0f;
        }
        __syncthreads();
        u64 prev = ~0ull;
        for (u32 j = 0; j < p.topk_group; j++) {
            u64 best = 0ull;
            for (u32 g = tid; g < p.n_group; g += RT_THREADS) {
                u64 r = rank_of(key_of(gscore[g]), g);
                if (r < prev && r > best) {
                    best = r;
                }
            }
            best = block_max_u64(best, red64);
            if (tid == 0) {
                u32 gi = index_of(best);
                if (gi < p.n_group) {
                    kept[gi] = 1.0f;
                }
            }
            prev = best;
        }
        __syncthreads();
    }

    // ---- top-k over the experts ----
    u64 prev = ~0ull;
    for (u32 j = 0; j < p.k; j++) {
        u64 best = 0ull;
        for (u32 i = tid; i < e; i += RT_THREADS) {
            u32 key = (p.mode != 0u && kept[i / per] == 0.0f) ? 0u : key_of(score[i]);
            u64 r = rank_of(key, i);
            if (r < prev && r > best) {
                best = r;
            }
        }
        best = block_max_u64(best, red64);
        if (tid == 0) {
            u32 id = index_of(best);
            ids[(u64)tok * p.k + j] = id < e ? id : e - 1u;
        }
        prev = best;
    }

    // ---- weights, summed in pick order by one thread ----
    if (tid == 0) {
        const u64 base = (u64)tok * p.k;
        float total = 0.0f;
        for (u32 j = 0; j < p.k; j++) {
            u32 i = ids[base + j];
            total += p.mode == 0u ? score[i] : sigmoid_f(l[i]);
        }
        if (p.mode != 0u) {
            total += 1e-20f;
        }
        for (u32 j = 0; j < p.k; j++) {
            u32 i = ids[base + j];
            float v = p.mode == 0u ? score[i] : sigmoid_f(l[i]);
            float w = p.norm ? v / total : v;
            if (p.mode != 0u) {
                w = w * p.scale;
            }
            weights[base + j] = w;
        }
    }
}
