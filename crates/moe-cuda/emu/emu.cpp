// The emulator's runtime: fibers, the block scheduler, guarded allocations, mma.sync, and the C
// entry points the Rust backend calls (emu_launch, emu_alloc, emu_free). See emu.h.

#include "emu.h"

#include <csetjmp>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <sys/mman.h>
#include <unistd.h>

emu_dim3 emu_threadIdx, emu_blockIdx, emu_blockDim, emu_gridDim;
unsigned long long emu_slots[32][32];
alignas(16) float dyn[(227 << 10) / 4];

namespace {

enum State { RUN = 0, WAIT_BLOCK = 1, WAIT_WARP = 2, DONE = 3 };

struct Fiber {
    jmp_buf jb;
    int state;
    bool started;
    char* stack_top;
};

constexpr size_t STACK = 256 << 10;
constexpr unsigned MAX_THREADS = 1024;

Fiber fibers[MAX_THREADS];
char* stacks = nullptr;
jmp_buf sched_jb;
unsigned cur = 0;
unsigned nthreads = 0;

typedef void (*Thunk)();
struct Launch {
    const char* name;
    void* fn;
    const unsigned* params;
    const unsigned long long* ptrs;
    int nptrs;
} launch;

struct P16 {
    unsigned w[16];
};
typedef unsigned long long U;

void run_kernel() {
    P16 p;
    std::memcpy(&p, launch.params, sizeof p);
    const U* a = launch.ptrs;
    switch (launch.nptrs) {
        case 2: ((void (*)(P16, U, U))launch.fn)(p, a[0], a[1]); break;
        case 3: ((void (*)(P16, U, U, U))launch.fn)(p, a[0], a[1], a[2]); break;
        case 4: ((void (*)(P16, U, U, U, U))launch.fn)(p, a[0], a[1], a[2], a[3]); break;
        case 5: ((void (*)(P16, U, U, U, U, U))launch.fn)(p, a[0], a[1], a[2], a[3], a[4]); break;
        case 6: ((void (*)(P16, U, U, U, U, U, U))launch.fn)(p, a[0], a[1], a[2], a[3], a[4], a[5]); break;
        case 7: ((void (*)(P16, U, U, U, U, U, U, U))launch.fn)(p, a[0], a[1], a[2], a[3], a[4], a[5], a[6]); break;
        default:
            std::fprintf(stderr, "emu: %s launched with %d pointers\n", launch.name, launch.nptrs);
            std::abort();
    }
}

[[noreturn]] void trampoline() {
    run_kernel();
    fibers[cur].state = DONE;
    _longjmp(sched_jb, 1);
    __builtin_unreachable();
}

// Switches to a fresh stack and runs the trampoline there (never returns).
[[noreturn]] __attribute__((noinline)) void start_on(char* top) {
    asm volatile("mov %0, %%rsp\n\tcall *%1\n\t" : : "r"(top), "r"(&trampoline) : "memory");
    __builtin_unreachable();
}

void set_thread(unsigned t) {
    cur = t;
    emu_threadIdx = emu_dim3{t % emu_blockDim.x, 0, 0};
}

// Runs one block to completion.
void run_block() {
    for (unsigned t = 0; t < nthreads; t++) {
        fibers[t].state = RUN;
        fibers[t].started = false;
        fibers[t].stack_top = stacks + (size_t)(t + 1) * STACK - 64;
    }
    for (;;) {
        bool ran = false;
        for (unsigned t = 0; t < nthreads; t++) {
            if (fibers[t].state != RUN) {
                continue;
            }
            ran = true;
            set_thread(t);
            if (!_setjmp(sched_jb)) {
                if (!fibers[t].started) {
                    fibers[t].started = true;
                    start_on(fibers[t].stack_top);
                }
                _longjmp(fibers[t].jb, 1);
            }
        }
        (void)ran;
        // Nobody can run: release a barrier, finish, or report a deadlock.
        bool all_done = true, released = false;
        for (unsigned t = 0; t < nthreads; t++) {
            all_done &= fibers[t].state == DONE;
        }
        if (all_done) {
            return;
        }
        for (unsigned w0 = 0; w0 < nthreads; w0 += 32) {
            unsigned w1 = w0 + 32 < nthreads ? w0 + 32 : nthreads;
            bool any_wait = false, all_wait = true, any_done = false;
            for (unsigned t = w0; t < w1; t++) {
                any_wait |= fibers[t].state == WAIT_WARP;
                any_done |= fibers[t].state == DONE;
                all_wait &= fibers[t].state == WAIT_WARP || fibers[t].state == DONE;
            }
            if (any_wait && all_wait) {
                if (any_done || w1 - w0 != 32) {
                    std::fprintf(stderr, "emu: %s block %u: a warp shuffle or mma with exited or missing lanes (warp %u)\n", launch.name, emu_blockIdx.x, w0 / 32);
                    std::abort();
                }
                for (unsigned t = w0; t < w1; t++) fibers[t].state = RUN;
                released = true;
            }
        }
        if (released) {
            continue;
        }
        bool all_block = true;
        for (unsigned t = 0; t < nthreads; t++) {
            all_block &= fibers[t].state == WAIT_BLOCK || fibers[t].state == DONE;
        }
        if (all_block) {
            for (unsigned t = 0; t < nthreads; t++) {
                if (fibers[t].state == WAIT_BLOCK) fibers[t].state = RUN;
            }
            continue;
        }
        std::fprintf(stderr, "emu: %s block %u: deadlock (threads wait at different barriers)\n", launch.name, emu_blockIdx.x);
        std::abort();
    }
}

// ---- guarded allocations ----

std::mutex alloc_lock;
std::map<unsigned long long, std::pair<char*, size_t>> mappings;

const char* current_kernel = "(none)";

void on_segv(int) {
    const char msg[] = "emu: segmentation fault (out-of-bounds access?) in kernel ";
    (void)!write(2, msg, sizeof msg - 1);
    (void)!write(2, current_kernel, std::strlen(current_kernel));
    (void)!write(2, "\n", 1);
    std::_Exit(139);
}

float half_bits_to_f32(bool bf16, unsigned short h) {
    return bf16 ? __uint_as_float((unsigned)h << 16) : emu_f16_to_f32(h);
}

}  // namespace

// ---- f16 ----

float emu_f16_to_f32(unsigned short h) {
    _Float16 f;
    std::memcpy(&f, &h, 2);
    return (float)f;
}

unsigned short emu_f32_to_f16(float x) {
    _Float16 f = (_Float16)x; // round to nearest even
    unsigned short h;
    std::memcpy(&h, &f, 2);
    return h;
}

// ---- mma.sync.m16n8k16.row.col.f32.{f16,bf16}: the PTX ISA fragment layout (F8E4M3 weights reach
// it as bf16) ----
// groupID = lane / 4, tig = lane % 4.
// A (16 x 16): a[0] = A[g][2t..2t+1], a[1] = A[g+8][2t..], a[2] = A[g][2t+8..], a[3] = A[g+8][2t+8..]
// B (16 x 8):  b[0] = B[2t..2t+1][g], b[1] = B[2t+8..2t+9][g]
// C (16 x 8):  c[0..1] = C[g][2t..2t+1], c[2..3] = C[g+8][2t..2t+1]
// (lower 16 bits hold the lower column / k index).
static unsigned mma_a[32][32][4], mma_b[32][32][2];

void emu_mma16816(bool bf16, float* c, const unsigned* a, const unsigned* b) {
    const unsigned lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
    for (int i = 0; i < 4; i++) mma_a[warp][lane][i] = a[i];
    for (int i = 0; i < 2; i++) mma_b[warp][lane][i] = b[i];
    emu_barrier(2);
    auto A = [&](unsigned row, unsigned k) {
        unsigned l = (row % 8) * 4 + (k % 8) / 2;
        unsigned reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        unsigned word = mma_a[warp][l][reg];
        return half_bits_to_f32(bf16, (unsigned short)(k % 2 ? word >> 16 : word & 0xffff));
    };
    auto B = [&](unsigned k, unsigned n) {
        unsigned l = n * 4 + (k % 8) / 2;
        unsigned reg = k >= 8 ? 1 : 0;
        unsigned word = mma_b[warp][l][reg];
        return half_bits_to_f32(bf16, (unsigned short)(k % 2 ? word >> 16 : word & 0xffff));
    };
    const unsigned g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; i++) {
        unsigned row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i % 2);
        float s = c[i];
        for (unsigned k = 0; k < 16; k++) s += A(row, k) * B(k, col);
        c[i] = s;
    }
    emu_barrier(2);
}

void emu_misaligned(const void* p, unsigned align) {
    std::fprintf(stderr, "emu: %s: a %u-byte load from %p is misaligned\n", current_kernel, align, p);
    std::abort();
}

void emu_barrier(int kind) {
    fibers[cur].state = kind == 1 ? WAIT_BLOCK : WAIT_WARP;
    if (!_setjmp(fibers[cur].jb)) {
        _longjmp(sched_jb, 1);
    }
}

// ---- the C entry points ----

extern "C" {
void router_topk();
void permute_rank();
void permute_scan();
void permute_scatter();
void gemm_prep();
void gemm_plan();
void mma_f16_m64_vec();
void mma_f16_m64_any();
void mma_f16_m128_vec();
void mma_f16_m128_any();
void mma_bf16_m64_vec();
void mma_bf16_m64_any();
void mma_bf16_m128_vec();
void mma_bf16_m128_any();
void mma_split_f16_m64_vec();
void mma_split_f16_m64_any();
void mma_split_f16_m128_vec();
void mma_split_f16_m128_any();
void mma_split_bf16_m64_vec();
void mma_split_bf16_m64_any();
void mma_split_bf16_m128_vec();
void mma_split_bf16_m128_any();
void simt_f32_vec();
void simt_f32_any();
void simt_f16_vec();
void simt_f16_any();
void simt_bf16_vec();
void simt_bf16_any();
void gemv_f32_r1_vec();
void gemv_f32_r1_any();
void gemv_f32_r2_vec();
void gemv_f32_r2_any();
void gemv_f32_r4_vec();
void gemv_f32_r4_any();
void gemv_f16_r1_vec();
void gemv_f16_r1_any();
void gemv_f16_r2_vec();
void gemv_f16_r2_any();
void gemv_f16_r4_vec();
void gemv_f16_r4_any();
void gemv_bf16_r1_vec();
void gemv_bf16_r1_any();
void gemv_bf16_r2_vec();
void gemv_bf16_r2_any();
void gemv_bf16_r4_vec();
void gemv_bf16_r4_any();
void mma_f8_e4m3_m64_vec();
void mma_f8_e4m3_m64_any();
void mma_f8_e4m3_m128_vec();
void mma_f8_e4m3_m128_any();
void mma_split_f8_e4m3_m64_vec();
void mma_split_f8_e4m3_m64_any();
void mma_split_f8_e4m3_m128_vec();
void mma_split_f8_e4m3_m128_any();
void simt_f8_e4m3_vec();
void simt_f8_e4m3_any();
void gemv_f8_e4m3_r1_vec();
void gemv_f8_e4m3_r1_any();
void gemv_f8_e4m3_r2_vec();
void gemv_f8_e4m3_r2_any();
void gemv_f8_e4m3_r4_vec();
void gemv_f8_e4m3_r4_any();
void activation();
void activation_vec();
void combine();
void combine_vec();
}

#define K(name) {#name, (void*)&name}
static const struct {
    const char* name;
    void* fn;
} TABLE[] = {
    K(router_topk), K(permute_rank), K(permute_scan), K(permute_scatter), K(gemm_prep), K(gemm_plan),
    K(mma_f16_m64_vec), K(mma_f16_m64_any), K(mma_f16_m128_vec), K(mma_f16_m128_any),
    K(mma_bf16_m64_vec), K(mma_bf16_m64_any), K(mma_bf16_m128_vec), K(mma_bf16_m128_any),
    K(mma_split_f16_m64_vec), K(mma_split_f16_m64_any), K(mma_split_f16_m128_vec), K(mma_split_f16_m128_any),
    K(mma_split_bf16_m64_vec), K(mma_split_bf16_m64_any), K(mma_split_bf16_m128_vec), K(mma_split_bf16_m128_any),
    K(simt_f32_vec), K(simt_f32_any), K(simt_f16_vec), K(simt_f16_any), K(simt_bf16_vec), K(simt_bf16_any),
    K(gemv_f32_r1_vec), K(gemv_f32_r1_any), K(gemv_f32_r2_vec), K(gemv_f32_r2_any), K(gemv_f32_r4_vec), K(gemv_f32_r4_any),
    K(gemv_f16_r1_vec), K(gemv_f16_r1_any), K(gemv_f16_r2_vec), K(gemv_f16_r2_any), K(gemv_f16_r4_vec), K(gemv_f16_r4_any),
    K(gemv_bf16_r1_vec), K(gemv_bf16_r1_any), K(gemv_bf16_r2_vec), K(gemv_bf16_r2_any), K(gemv_bf16_r4_vec), K(gemv_bf16_r4_any),
    K(mma_f8_e4m3_m64_vec), K(mma_f8_e4m3_m64_any), K(mma_f8_e4m3_m128_vec), K(mma_f8_e4m3_m128_any),
    K(mma_split_f8_e4m3_m64_vec), K(mma_split_f8_e4m3_m64_any), K(mma_split_f8_e4m3_m128_vec), K(mma_split_f8_e4m3_m128_any),
    K(simt_f8_e4m3_vec), K(simt_f8_e4m3_any),
    K(gemv_f8_e4m3_r1_vec), K(gemv_f8_e4m3_r1_any), K(gemv_f8_e4m3_r2_vec), K(gemv_f8_e4m3_r2_any), K(gemv_f8_e4m3_r4_vec), K(gemv_f8_e4m3_r4_any),
    K(activation), K(activation_vec), K(combine), K(combine_vec),
};

static std::mutex launch_lock;

extern "C" int emu_launch(const char* name, unsigned grid, unsigned block, unsigned smem, const unsigned* params, const unsigned long long* ptrs, int nptrs) {
    std::lock_guard<std::mutex> guard(launch_lock);
    void* fn = nullptr;
    for (auto& e : TABLE) {
        if (std::strcmp(e.name, name) == 0) fn = e.fn;
    }
    if (!fn) return 1;
    if (block == 0 || block > MAX_THREADS || smem > sizeof(dyn)) return 2;
    if (!stacks) {
        stacks = (char*)mmap(nullptr, STACK * MAX_THREADS, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (stacks == MAP_FAILED) return 3;
        std::signal(SIGSEGV, on_segv);
        std::signal(SIGBUS, on_segv);
    }
    current_kernel = name;
    if (std::getenv("MOE_CUDA_EMU_TRACE")) std::fprintf(stderr, "emu: launch %s grid %u block %u smem %u\n", name, grid, block, smem);
    launch = Launch{name, fn, params, ptrs, nptrs};
    nthreads = block;
    emu_blockDim = emu_dim3{block, 1, 1};
    emu_gridDim = emu_dim3{grid, 1, 1};
    // Dynamic shared memory starts as garbage, as on a GPU.
    std::memset(dyn, 0xA5, smem);
    for (unsigned b = 0; b < grid; b++) {
        emu_blockIdx = emu_dim3{b, 0, 0};
        run_block();
    }
    current_kernel = "(none)";
    return 0;
}

// An allocation of `bytes` (rounded up to 16, at least 16) whose end is followed by an
// inaccessible page, so reading one vector past it faults. The start is only 16-byte aligned (a GPU
// allocation is 256-byte aligned): the kernels must not rely on more than their vector width.
// Returns 0 when out of memory.
extern "C" unsigned long long emu_alloc(size_t bytes) {
    const size_t page = 4096;
    size_t n = (bytes + 15) / 16 * 16;
    if (n == 0) n = 16;
    size_t data_pages = (n + page - 1) / page;
    size_t len = (data_pages + 1) * page;
    char* base = (char*)mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (base == MAP_FAILED) return 0;
    mprotect(base + data_pages * page, page, PROT_NONE);
    char* start = base + data_pages * page - n;
    std::memset(start, 0xA5, n); // uninitialised memory is garbage, not zeros
    std::lock_guard<std::mutex> guard(alloc_lock);
    mappings[(unsigned long long)start] = {base, len};
    return (unsigned long long)start;
}

extern "C" void emu_free(unsigned long long ptr) {
    std::lock_guard<std::mutex> guard(alloc_lock);
    auto it = mappings.find(ptr);
    if (it == mappings.end()) return;
    munmap(it->second.first, it->second.second);
    mappings.erase(it);
}
