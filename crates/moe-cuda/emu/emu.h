// A CPU emulator for the kernels of shaders/cuda/*.cu, for testing them without a GPU.
//
// Each .cu file is compiled as ordinary C++ (g++) after this prelude, which supplies what CUDA
// gives a kernel: threadIdx and friends, __syncthreads, warp shuffles, atomics, vector types,
// __ldg, and (through `#ifdef MOE_EMULATOR` in grouped_gemm.cu) f16 conversion and mma.sync with
// the PTX ISA's m16n8k16 fragment layout, exchanged between the 32 lanes of a warp. The threads of
// a block are fibers on one OS thread, switched at every barrier and shuffle; blocks run one after
// another. Deadlocks (a barrier some threads never reach) and shuffles with exited lanes abort with
// a message. Buffers end at a guard page, so a read or write past the end of an allocation faults.
//
// Not emulated: anything about timing, memory ordering between blocks (blocks run one at a time),
// or the hardware's own f32 summation order inside mma.sync.

#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#define MOE_EMULATOR 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct emu_dim3 {
    unsigned x, y, z;
};
extern emu_dim3 emu_threadIdx, emu_blockIdx, emu_blockDim, emu_gridDim;
#define threadIdx emu_threadIdx
#define blockIdx emu_blockIdx
#define blockDim emu_blockDim
#define gridDim emu_gridDim

struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

// A misaligned vector load faults on a GPU; here it would not, so check it.
void emu_misaligned(const void* p, unsigned align);
template <class T>
inline T __ldg(const T* p) {
    if ((unsigned long long)p % alignof(T) != 0) emu_misaligned(p, alignof(T));
    return *p;
}

inline unsigned __float_as_uint(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}

// expf, fmaxf, fmaf: the C library's (<cmath>).

inline unsigned atomicOr(unsigned* p, unsigned v) {
    unsigned o = *p;
    *p = o | v;
    return o;
}
inline unsigned atomicMax(unsigned* p, unsigned v) {
    unsigned o = *p;
    *p = o > v ? o : v;
    return o;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    unsigned o = *p;
    *p = o + v;
    return o;
}

// ---- the scheduler's side (emu.cpp) ----

// Blocks the calling thread until every live thread of its block (kind 1) or warp (kind 2) arrives.
void emu_barrier(int kind);
inline void __syncthreads() { emu_barrier(1); }

// Per-warp exchange slots.
extern unsigned long long emu_slots[32][32];

template <class T>
inline T emu_exchange(T v, unsigned src_lane) {
    static_assert(sizeof(T) <= 8, "shuffle of a value wider than 8 bytes");
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    unsigned long long bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    emu_slots[warp][lane] = bits;
    emu_barrier(2);
    T r;
    bits = emu_slots[warp][src_lane & 31u];
    std::memcpy(&r, &bits, sizeof(T));
    emu_barrier(2);
    return r;
}

template <class T>
inline T __shfl_xor_sync(unsigned, T v, int o) {
    return emu_exchange(v, (threadIdx.x & 31u) ^ (unsigned)o);
}

template <class T>
inline T __shfl_up_sync(unsigned, T v, int o) {
    const unsigned lane = threadIdx.x & 31u;
    T r = emu_exchange(v, lane >= (unsigned)o ? lane - (unsigned)o : lane);
    return lane >= (unsigned)o ? r : v;
}

float emu_f16_to_f32(unsigned short h);
unsigned short emu_f32_to_f16(float x);
void emu_mma16816(bool bf16, float* c, const unsigned* a, const unsigned* b);

// Dynamic shared memory (`extern __shared__ float dyn[]` is rewritten to `extern float dyn[]`).
extern float dyn[];
