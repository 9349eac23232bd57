// permute: topk_ids [T, k] u32 -> expert_offsets [E + 1], row_index [T * k], token_index [T * k].
//
// Self-contained (NVRTC has no system headers). A stable counting sort on the device in three
// launches, with no host round trip, for any T * k and any E:
//
// 1. permute_rank    one block per tile of 1024 pairs: each pair's rank among the earlier pairs
//                    of its tile with the same expert (kept in row_index for now), and the tile's
//                    count per expert, stored bucket-major: counts[bucket * tiles + tile].
// 2. permute_scan    one block: an exclusive scan of counts in that bucket-major order, so
//                    counts[b * tiles + tile] becomes the first row of bucket b's pairs of that
//                    tile (pairs of one expert keep their order: the sort is stable), and
//                    expert_offsets[b] = counts[b * tiles] (the first row of expert b).
// 3. permute_scatter row = counts[b * tiles + tile] + rank; row_index[pair] = row;
//                    token_index[row] = pair / k.
//
// An id >= E goes to an extra bucket E after every expert, so every row stays in bounds and
// expert_offsets[E] counts only the valid pairs; it is flagged in errs[0..3] (flag, largest id,
// E), which the host turns into InvalidArgument at the next synchronize/download.

typedef unsigned int u32;
typedef unsigned long long u64;

#define TILE 1024

struct PermuteParams {
    u32 pairs; // T * k
    u32 e;     // experts
    u32 k;     // experts per token
    u32 tiles; // ceil(pairs / TILE)
    u32 pad[12];
};

__device__ __forceinline__ u32 bucket_of(const PermuteParams& p, const u32* ids, u32 pair, u32* errs, bool flag) {
    u32 id = ids[pair];
    if (id >= p.e) {
        if (flag) {
            atomicOr(&errs[0], 1u);
            atomicMax(&errs[1], id);
            atomicMax(&errs[2], p.e);
        }
        return p.e;
    }
    return id;
}

extern "C" __global__ void __launch_bounds__(TILE)
permute_rank(const PermuteParams p, const u32* __restrict__ ids, u32* __restrict__ row_index,
             u32* __restrict__ counts, u32* __restrict__ errs) {
    __shared__ u32 sid[TILE];
    const u32 tile = blockIdx.x;
    const u32 tid = threadIdx.x;
    if (tile >= p.tiles) {
        return;
    }
    const u32 pair = tile * TILE + tid;
    const bool valid = pair < p.pairs;
    u32 b = p.e + 1u; // no pair
    if (valid) {
        b = bucket_of(p, ids, pair, errs, true);
    }
    sid[tid] = b;
    for (u32 i = tid; i <= p.e; i += TILE) {
        counts[(u64)i * p.tiles + tile] = 0u;
    }
    __syncthreads();
    if (!valid) {
        return;
    }
    u32 before = 0u;
    for (u32 j = 0; j < tid; j++) {
        before += sid[j] == b ? 1u : 0u;
    }
    row_index[pair] = before;
    atomicAdd(&counts[(u64)b * p.tiles + tile], 1u);
}

extern "C" __global__ void __launch_bounds__(TILE)
permute_scan(const PermuteParams p, u32* __restrict__ counts, u32* __restrict__ offsets) {
    __shared__ u32 warp_sums[TILE / 32];
    const u32 tid = threadIdx.x;
    const u32 lane = tid & 31u, warp = tid >> 5;
    const u64 n = (u64)(p.e + 1u) * p.tiles;
    if (n == 0) {
        for (u32 b = tid; b <= p.e; b += TILE) {
            offsets[b] = 0u;
        }
        return;
    }
    const u64 seg = (n + TILE - 1) / TILE;
    const u64 lo = (u64)tid * seg < n ? (u64)tid * seg : n;
    const u64 hi = lo + seg < n ? lo + seg : n;
    u32 s = 0u;
    for (u64 i = lo; i < hi; i++) {
        s += counts[i];
    }
    // Block-wide exclusive scan of the segment sums.
    u32 v = s;
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
    u32 running = v - s + (warp > 0 ? warp_sums[warp - 1] : 0u);
    for (u64 i = lo; i < hi; i++) {
        u32 c = counts[i];
        counts[i] = running;
        running += c;
    }
    __syncthreads();
    for (u32 b = tid; b <= p.e; b += TILE) {
        offsets[b] = counts[(u64)b * p.tiles];
    }
}

extern "C" __global__ void __launch_bounds__(TILE)
permute_scatter(const PermuteParams p, const u32* __restrict__ ids, u32* __restrict__ row_index,
                u32* __restrict__ token_index, const u32* __restrict__ counts, u32* __restrict__ errs) {
    const u32 tile = blockIdx.x;
    const u32 pair = tile * TILE + threadIdx.x;
    if (tile >= p.tiles || pair >= p.pairs) {
        return;
    }
    const u32 b = bucket_of(p, ids, pair, errs, false);
    const u32 row = counts[(u64)b * p.tiles + tile] + row_index[pair];
    row_index[pair] = row;
    if (row < p.pairs) {
        token_index[row] = pair / p.k;
    }
}
