// activation (SwiGLU): gate_up [M, 2I] f32 -> h [M, I] f32, h = silu(gate) * up with
// silu(g) = g / (1 + exp(-g)), gate the first I columns of a row and up the last I.
//
// Self-contained (NVRTC has no system headers). A grid-stride loop over the elements of h, so any
// size runs with a bounded grid; `activation_vec` moves four elements per step (I % 4 == 0).
// For g = -100, exp(100) overflows to infinity and silu(g) = g / inf = -0: finite, as on the host.

typedef unsigned int u32;
typedef unsigned long long u64;

struct ActParams {
    u32 m; // rows
    u32 i; // intermediate size I (columns of h)
    u32 pad[14];
};

__device__ __forceinline__ float silu_f(float g) {
    return g / (1.0f + expf(-g));
}

extern "C" __global__ void __launch_bounds__(256)
activation(const ActParams p, const float* __restrict__ gu, float* __restrict__ h) {
    const u64 total = (u64)p.m * p.i;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const u64 r = idx / p.i, c = idx - r * p.i;
        const float* row = gu + r * 2u * p.i;
        h[idx] = silu_f(row[c]) * row[p.i + c];
    }
}

extern "C" __global__ void __launch_bounds__(256)
activation_vec(const ActParams p, const float4* __restrict__ gu, float4* __restrict__ h) {
    const u32 iq = p.i / 4u;
    const u64 total = (u64)p.m * iq;
    const u64 stride = (u64)gridDim.x * blockDim.x;
    for (u64 idx = (u64)blockIdx.x * blockDim.x + threadIdx.x; idx < total; idx += stride) {
        const u64 r = idx / iq, c = idx - r * iq;
        const float4 g = gu[r * 2u * iq + c];
        const float4 u = gu[r * 2u * iq + iq + c];
        h[idx] = make_float4(silu_f(g.x) * u.x, silu_f(g.y) * u.y, silu_f(g.z) * u.z, silu_f(g.w) * u.w);
    }
}
