// combine: out [T, H] f32, out[t] = sum_{j < k} topk_weights[t, j] * y[row_index[t * k + j]]
// summed in order j = 0, 1, .. from zero, then + shared[t] when given (the host's order).
//
// Self-contained (NVRTC has no system headers). A grid-stride loop over the elements of out
// (`combine_vec`: four per step, H % 4 == 0). A row_index >= the rows of y is skipped (no
// out-of-bounds read) and flagged in errs[9..12] (flag, largest index, rows); the host reports it
// as InvalidArgument at the next synchronize/download.

typedef unsigned int u32;
typedef unsigned long long u64;

struct CombineParams {
    u32 t;          // tokens
    u32 h;          // hidden size
    u32 k;          // experts per token
    u32 rows;       // rows of y (T * k)
    u32 has_shared; // shared experts' output given
    u32 pad[11];
};

__device__ __forceinline__ u32 row_at(const CombineParams& p, const u32* __restrict__ row_index, u64 pair, u32* errs) {
    const u32 r = row_index[pair];
    if (r >= p.rows) {
        atomicOr(&errs[9], 1u);
        atomicMax(&errs[10], r);
        atomicMax(&errs[11], p.rows);
    }
    return r;
}

extern "C" __global__ void __launch_bounds__(256)
combine(const CombineParams p, const float* __restrict__ y, const u32* __restrict__ row_index,
        const float* __restrict__ tw, const float* __restrict__ shared_y, float* __restrict__ out,
        u32* __restrict__ errs) {
    const u64 total = (u64)p.t * p.h;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const u64 t = idx / p.h, c = idx - t * p.h;
        float acc = 0.0f;
        for (u32 j = 0; j < p.k; j++) {
            const u64 pair = t * p.k + j;
            const u32 r = row_at(p, row_index, pair, errs);
            if (r < p.rows) {
                acc += tw[pair] * y[(u64)r * p.h + c];
            }
        }
        if (p.has_shared) {
            acc += shared_y[idx];
        }
        out[idx] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(256)
combine_vec(const CombineParams p, const float4* __restrict__ y, const u32* __restrict__ row_index,
            const float* __restrict__ tw, const float4* __restrict__ shared_y, float4* __restrict__ out,
            u32* __restrict__ errs) {
    const u32 hq = p.h / 4u;
    const u64 total = (u64)p.t * hq;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const u64 t = idx / hq, c = idx - t * hq;
        float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        for (u32 j = 0; j < p.k; j++) {
            const u64 pair = t * p.k + j;
            const u32 r = row_at(p, row_index, pair, errs);
            if (r < p.rows) {
                const float w = tw[pair];
                const float4 v = y[(u64)r * hq + c];
                acc.x += w * v.x;
                acc.y += w * v.y;
                acc.z += w * v.z;
                acc.w += w * v.w;
            }
        }
        if (p.has_shared) {
            const float4 s = shared_y[idx];
            acc.x += s.x;
            acc.y += s.y;
            acc.z += s.z;
            acc.w += s.w;
        }
        out[idx] = acc;
    }
}
