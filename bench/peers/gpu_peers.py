#!/usr/bin/env python3
"""The GPU peers of `moe bench`, measured side by side in one run on one CUDA device:

  torch-grouped-mm  tokens sorted by expert, offsets the cumulative int32 counts, one
                    torch._grouped_mm per projection (CUTLASS grouped GEMM on sm90), silu * up
                    between them, routing weights applied, slots summed back per token.
  triton-fused-moe  a fused-MoE Triton kernel in the style vLLM and SGLang use: each expert's
                    (token, slot) pairs padded to the block size, ONE gathered GEMM launch per
                    projection (the gate_up launch reads token rows straight from x), silu * up in
                    between, the routing weight applied in the down projection's epilogue, slots
                    summed back per token.

Both add the shared expert (plain torch matmuls) and return [T, H] f32. By default both are timed
WITHOUT the router: the ids and weights of every batch are computed beforehand by the preset's
routing (with --with-router the router GEMM and routing are timed too). Each timed iteration takes
the next batch from a pool of distinct random inputs, so the routing changes every time (`moe bench`'s
method); each iteration timed as `moe bench` times its own (the wall clock from a synchronize to
the end of the next), warm-up, medians. The copy bandwidth is measured in
the same run with a 256 MiB device-to-device copy; the peak comes from the table (H200 bf16:
791 TFLOP/s, measured dense). Before a token count is timed, each peer's output on one batch of
that size is checked against a plain fp32 torch loop (reference_moe); a peer off by rel L2 >= 2e-2
is not timed, and the script exits 1.

    python bench/peers/gpu_peers.py --preset deepseek-v3 --json gpu-peers.json
    moe bench --backend wgpu --preset deepseek-v3 --compare gpu-peers.json

--tune picks the Triton block config per token count by timing 8 candidates; --cuda-graphs also
times each peer replaying one captured CUDA graph per batch (runs named <peer>+cudagraph).

--dry-run runs what can run without a GPU: the routing against its spec, the reference against a
per-pair f64 loop, the block alignment's invariants, the grouped_mm peer on the CPU, the Triton
kernel under TRITON_INTERPRET=1 (f32 and f16; the interpreter cannot do bf16 dots), an
ahead-of-time compile of the kernel for sm90, then the whole benchmark path on the CPU at a tiny
shape.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

DRY_RUN = "--dry-run" in sys.argv
if DRY_RUN:
    os.environ["TRITON_INTERPRET"] = "1"  # must be set before triton is imported

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

try:
    import triton  # noqa: E402
    import triton.language as tl  # noqa: E402
    TRITON_ERROR = None
except Exception as ex:  # a torch build without triton: the grouped_mm peer still runs
    triton = tl = None
    TRITON_ERROR = f"{type(ex).__name__}: {ex}"

TOLERANCE = 2e-2


# ----------------------------------------------------------------------------------------------
# Shared expert (both peers): dense, unweighted.


def shared_expert(x: torch.Tensor, layer: pc.Layer) -> torch.Tensor | None:
    if layer.shared_w13 is None:
        return None
    s = layer.config.shared_intermediate
    h = F.linear(x, layer.shared_w13)
    return F.linear(F.silu(h[:, :s]) * h[:, s:], layer.shared_w2)


def finish(y: torch.Tensor, x: torch.Tensor, layer: pc.Layer) -> torch.Tensor:
    """y [T*k, H] in (token, slot) order, already weighted -> [T, H] f32 plus the shared expert."""
    c = layer.config
    out = y.view(x.shape[0], c.top_k, c.hidden).sum(dim=1, dtype=torch.float32)
    sh = shared_expert(x, layer)
    if sh is not None:
        out += sh
    return out


# ----------------------------------------------------------------------------------------------
# Peer 1: torch._grouped_mm.


def grouped_mm_moe(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, layer: pc.Layer) -> torch.Tensor:
    """x [T, H] (storage dtype), ids [T, k] int64, w [T, k] f32 -> [T, H] f32. No host sync."""
    c = layer.config
    i, k = c.intermediate, c.top_k
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)              # (token, slot) pairs sorted by expert
    counts = torch.zeros(c.experts, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    offs = torch.cumsum(counts, 0, dtype=torch.int32)     # end of each expert's rows
    xs = x.index_select(0, order // k)
    # mat_b is (E, K, N): the (E, N, K) Linear-layout weights transposed (a view, no copy).
    h = torch._grouped_mm(xs, layer.w13.transpose(1, 2), offs=offs)
    y = torch._grouped_mm(F.silu(h[:, :i]) * h[:, i:], layer.w2.transpose(1, 2), offs=offs)
    y = y * w.reshape(-1)[order].to(y.dtype)[:, None]
    unsorted = torch.empty_like(y)
    unsorted[order] = y
    return finish(unsorted, x, layer)


# ----------------------------------------------------------------------------------------------
# Peer 2: a fused-MoE Triton kernel.


def align_blocks(ids: torch.Tensor, experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lays the T*k (token, slot) pairs out by expert, each expert's run padded to a multiple of
    block_m, without a host sync (the padded length is bounded, not measured):

      sorted_ids  [n_blocks * block_m] int32: pair index (token * k + slot), or T*k for padding;
      block_expert [n_blocks] int32: the expert of each block, or `experts` for the unused blocks
                  past the end (the kernel returns at once for those).
    """
    flat = ids.reshape(-1)
    pairs = flat.numel()
    dev = ids.device
    counts = torch.zeros(experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    padded_start = padded_end - padded
    start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(pairs, device=dev) - start[expert_of]
    # At most min(E, pairs) experts are touched, each adding at most block_m - 1 rows of padding.
    max_rows = pairs + min(experts, pairs) * (block_m - 1)
    n_blocks = (max_rows + block_m - 1) // block_m
    sorted_ids = torch.full((n_blocks * block_m,), pairs, dtype=torch.int32, device=dev)
    sorted_ids[padded_start[expert_of] + rank] = order.to(torch.int32)
    blocks = torch.arange(n_blocks, device=dev)
    block_expert = torch.searchsorted(padded_end // block_m, blocks, right=True).to(torch.int32)
    return sorted_ids, block_expert


if triton is not None:

    @triton.jit
    def _moe_gemm_kernel(
        a_ptr, b_ptr, c_ptr, topk_w_ptr, sorted_ids_ptr, block_expert_ptr,
        N, K, num_pairs, num_experts, num_blocks_m,
        stride_am, stride_ak, stride_be, stride_bn, stride_bk, stride_cm, stride_cn,
        A_ROW_DIV: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ):
        """C[pair] = A[pair // A_ROW_DIV] @ B[expert]^T (times the pair's routing weight when
        MUL_ROUTED_WEIGHT), for the BLOCK_M pairs of one block, all of one expert. A [rows, K],
        B [E, N, K], C [pairs, N]."""
        pid = tl.program_id(0)
        # Grouped launch order: GROUP_M consecutive row blocks (mostly one expert) walk the N tiles
        # together, so each weight tile is read from DRAM about once and then hit in L2.
        num_pid_n = tl.cdiv(N, BLOCK_N)
        in_group = GROUP_M * num_pid_n
        first_m = (pid // in_group) * GROUP_M
        group_size = min(num_blocks_m - first_m, GROUP_M)
        pid_m = first_m + (pid % in_group) % group_size
        pid_n = (pid % in_group) // group_size

        expert = tl.load(block_expert_ptr + pid_m)
        if expert >= num_experts:  # a block past the last expert's padded run
            return
        expert = expert.to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_ids_ptr + offs_m)
        row_ok = pair < num_pairs
        a_row = (pair // A_ROW_DIV).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak
        b_ptrs = b_ptr + expert * stride_be + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None] * stride_bk

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K * stride_ak
            b_ptrs += BLOCK_K * stride_bk

        if MUL_ROUTED_WEIGHT:
            wt = tl.load(topk_w_ptr + pair, mask=row_ok, other=0.0)
            acc = acc * wt[:, None]
        c_ptrs = c_ptr + pair[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


def _launch(a, b, c, topk_w, sorted_ids, block_expert, num_pairs, row_div, mul_weight, cfg):
    e, n, k = b.shape
    n_blocks = block_expert.numel()
    grid = (n_blocks * triton.cdiv(n, cfg["BLOCK_N"]),)
    _moe_gemm_kernel[grid](
        a, b, c, topk_w, sorted_ids, block_expert,
        n, k, num_pairs, e, n_blocks,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), b.stride(2), c.stride(0), c.stride(1),
        A_ROW_DIV=row_div, MUL_ROUTED_WEIGHT=mul_weight,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def triton_moe(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, layer: pc.Layer, cfg: dict) -> torch.Tensor:
    """x [T, H] (storage dtype), ids [T, k] int64, w [T, k] f32 -> [T, H] f32. No host sync."""
    c = layer.config
    t, k, i = x.shape[0], c.top_k, c.intermediate
    pairs = t * k
    sorted_ids, block_expert = align_blocks(ids, c.experts, cfg["BLOCK_M"])
    topk_w = w.reshape(-1).float().contiguous()
    h = torch.empty(pairs, 2 * i, dtype=x.dtype, device=x.device)
    _launch(x, layer.w13, h, topk_w, sorted_ids, block_expert, pairs, k, False, cfg)
    act = F.silu(h[:, :i]) * h[:, i:]
    y = torch.empty(pairs, c.hidden, dtype=x.dtype, device=x.device)
    _launch(act, layer.w2, y, topk_w, sorted_ids, block_expert, pairs, 1, True, cfg)
    return finish(y, x, layer)


def _cfg(bm, bn, bk, gm, warps, stages):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)


# What --tune tries; shared memory per stage at most (128*64 + 64*256) * 2 B, within sm90's 227 KiB.
CANDIDATES = [
    _cfg(16, 64, 128, 1, 4, 4),
    _cfg(16, 128, 128, 1, 4, 3),
    _cfg(32, 64, 128, 4, 4, 4),
    _cfg(32, 128, 64, 4, 4, 4),
    _cfg(64, 64, 64, 8, 4, 4),
    _cfg(64, 128, 64, 8, 4, 4),
    _cfg(128, 128, 64, 8, 8, 3),
    _cfg(128, 256, 64, 8, 8, 3),
]


def heuristic_config(c: pc.Config, tokens: int) -> dict:
    """Block shape by the expected rows per expert (vLLM's rule of thumb: small blocks with a long
    K step when each expert sees a few tokens, square-ish tiles once the GEMMs are real)."""
    per_expert = tokens * c.top_k / c.experts
    if per_expert < 12:
        return _cfg(16, 64, 128, 1, 4, 4)
    if per_expert < 48:
        return _cfg(32, 128, 64, 4, 4, 4)
    if per_expert < 192:
        return _cfg(64, 128, 64, 8, 4, 4)
    return _cfg(128, 128, 64, 8, 8, 3)


def cfg_name(cfg: dict) -> str:
    return "BM{BLOCK_M} BN{BLOCK_N} BK{BLOCK_K} G{GROUP_M} w{num_warps} s{num_stages}".format(**cfg)


# ----------------------------------------------------------------------------------------------
# Timing.


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_once(fn, dev: torch.device) -> float:
    """Seconds of one call, timed as `moe bench` times its backends: the wall clock from a
    synchronize to the end of the next, so both sides pay the host's launch work and one
    synchronize (CUDA events would leave those out for the peers only, and a copy timed with
    events would give the peers a faster floor than the one `moe bench` divides by)."""
    sync(dev)
    t = time.perf_counter()
    fn()
    sync(dev)
    return time.perf_counter() - t


def copy_bandwidth(dev: torch.device, reps: int = 7) -> float:
    """Read + write bytes per second of a 256 MiB device-to-device copy (`moe bench`'s size and
    count: min(memory / 16, 256 MiB), 7 samples of `COPIES` copies between synchronizes, median)."""
    n = 256 << 20
    src = torch.full((n // 4,), 7, dtype=torch.int32, device=dev)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)

    def copies():
        for _ in range(pc.COPIES):
            dst.copy_(src)

    times = [time_once(copies, dev) / pc.COPIES for _ in range(reps)]
    del src, dst
    return 2 * n / pc.median(times)


def peak_flops(device_name: str, dtype: torch.dtype) -> tuple[float | None, str]:
    """`moe bench`'s `peak_flops` table, dense, per storage dtype."""
    d = device_name.upper()
    half = dtype != torch.float32
    if "H200" in d:
        return (791e12 if half else 67e12), "H200 table (bf16 measured, f32 spec)"
    if "H100" in d:
        return (989e12 if half else 67e12), "H100 spec"
    return None, "unknown: floor is bandwidth-only"


# ----------------------------------------------------------------------------------------------
# The benchmark.


PEERS = {"grouped": "torch-grouped-mm", "triton": "triton-fused-moe"}
GRAPH = "+cudagraph"


def tune(layer: pc.Layer, x, ids, w, dev) -> tuple[dict, str]:
    """The fastest of CANDIDATES on one batch (3 warm-up + 5 timed calls each, median)."""
    results = []
    for cfg in CANDIDATES:
        try:
            for _ in range(3):
                triton_moe(x, ids, w, layer, cfg)
            results.append((pc.median([time_once(lambda: triton_moe(x, ids, w, layer, cfg), dev) for _ in range(5)]), cfg))
        except Exception as ex:  # e.g. out of shared memory for this tile on this device
            print(f"    tune: {cfg_name(cfg)} failed: {type(ex).__name__}: {str(ex)[:120]}")
    if not results:
        raise RuntimeError("no Triton config compiled")
    best = min(results, key=lambda r: r[0])
    return best[1], " ".join(f"{cfg_name(c)}={t * 1e6:.0f}us" for t, c in sorted(results, key=lambda r: r[0])[:3])


def capture_graphs(call, pool_n: int):
    """One CUDA graph per pool batch (all sharing one memory pool; they are replayed one at a time,
    in capture order, cyclically). Returns (graphs, outputs)."""
    mempool = torch.cuda.graph_pool_handle()
    graphs, outs = [], []
    for p in range(pool_n):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                call(p)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=mempool):
            outs.append(call(p))
        graphs.append(g)
    return graphs, outs


def measure(c: pc.Config, args, dev: torch.device, dtype: torch.dtype, bandwidth: float, peak, peak_source,
            device_name: str, failures: list, save) -> list[pc.Run]:
    """The peers' runs on shape `c`; `save(runs)` is called after each token count with the runs
    so far, so a run cut short by a timeout keeps the rows it measured."""
    router_note = ("router GEMM + routing + " if args.with_router else
                   "WITHOUT the router (ids and weights precomputed per batch by the preset's routing); ")
    notes = {
        "torch-grouped-mm": "argsort by expert, int32 cumulative offsets, torch._grouped_mm per projection, silu*up, "
                            "weights applied, slots summed in f32, shared expert as dense torch matmuls",
        "triton-fused-moe": "block-aligned sort in torch, one gathered Triton GEMM per projection, silu*up in torch, "
                            "routing weight in the down GEMM's epilogue, slots summed in f32, shared expert as dense torch matmuls",
    }
    names = [PEERS[p] for p in args.peers]
    if args.cuda_graphs:
        names += [n + GRAPH for n in names]
    runs = {}
    for n in names:
        base = n.removesuffix(GRAPH)
        how = "; each batch's layer captured once as a CUDA graph, graphs replayed" if n.endswith(GRAPH) else "; eager"
        runs[n] = pc.Run(backend=n, device=device_name, shape=pc.shape_name(c), dtype=pc.DTYPE_NAMES[dtype],
                         copy_bandwidth_gbs=bandwidth / 1e9, peak_tflops=None if peak is None else peak / 1e12,
                         peak_source=peak_source,
                         note=router_note + notes[base] + how + f"; torch {torch.__version__}"
                              + (f", triton {triton.__version__}" if base == "triton-fused-moe" and triton else ""))
    active = list(args.peers)
    if "triton" in active and triton is None:
        for n in names:
            if n.startswith("triton"):
                runs[n].skipped.append(f"skipped: triton is not importable ({TRITON_ERROR})")
        active.remove("triton")

    wb = pc.weight_bytes(c, dtype)
    total = torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else 64 << 30
    if wb > 0.9 * total:
        msg = f"skipped: the layer's {wb / 2**30:.1f} GiB of weights do not fit the {total / 2**30:.1f} GiB of {device_name}"
        print(msg)
        for r in runs.values():
            r.skipped.append(msg)
        return list(runs.values())

    print(f"\n{pc.shape_name(c)} {pc.DTYPE_NAMES[dtype]}: making the {wb / 2**30:.2f} GiB layer ...", flush=True)
    layer = pc.make_layer(c, dtype, dev, args.seed)
    print("  " + pc.check_routing(c), flush=True)

    def timed(run: pc.Run, t: int, fn_of, pool_n: int, touched_of: list, ref, label: str) -> None:
        """Checks fn_of(0) against the reference, then times fn_of(p) cyclically over the pool."""
        err = pc.rel_l2(fn_of(0)(), ref)
        if not err < TOLERANCE:
            msg = (f"{t} tokens: failed its correctness check (rel L2 {err:.2e} against the fp32 reference, "
                   f"limit {TOLERANCE:.0e}){label}; not timed")
            print(f"  {run.backend}: {msg}", flush=True)
            run.skipped.append(msg)
            failures.append(f"{run.backend} {run.shape} {t} tok: rel L2 {err:.2e}")
            return
        times, touched = [], []
        for it in range(args.warmup + args.iters):
            p = it % pool_n
            dt = time_once(fn_of(p), dev)
            if it >= args.warmup:
                times.append(dt)
                touched.append(touched_of[p])
        row = pc.make_row(c, dtype, t, times, touched, bandwidth, peak)
        print(pc.format_row(run.backend, row) + f"  (check rel L2 {err:.1e}){label}", flush=True)
        run.rows.append(row)

    def failed(run: pc.Run, t: int, ex: Exception) -> None:
        text = str(ex).strip().splitlines()
        msg = f"{t} tokens: error {type(ex).__name__}: {text[0][:300] if text else ''}"
        print(f"  {run.backend}: {msg}", flush=True)
        traceback.print_exc(limit=4)
        run.skipped.append(msg)

    with torch.inference_mode():
        for t in args.tokens:
            pool_n = pc.pool_size(c, t, args.warmup + args.iters)
            xs = [pc.random_inputs(c, t, dtype, dev, args.seed ^ ((p + 1) * 0x9E37) ^ t) for p in range(pool_n)]
            routed = [pc.router(x, layer) for x in xs]
            touched_of = [int(torch.unique(ids).numel()) for ids, _ in routed]
            ref = pc.reference_moe(xs[0], routed[0][0], routed[0][1], layer)
            for key in active:
                name = PEERS[key]
                run = runs[name]
                try:
                    if key == "triton":
                        if args.tune:
                            cfg, summary = tune(layer, xs[0], *routed[0], dev)
                            print(f"  {name} {t} tok: tuned, fastest {summary}", flush=True)
                        else:
                            cfg = heuristic_config(c, t)
                        label = f" [{cfg_name(cfg)}]"

                        def experts(x, ids, w, cfg=cfg):
                            return triton_moe(x, ids, w, layer, cfg)
                    else:
                        label = ""

                        def experts(x, ids, w):
                            return grouped_mm_moe(x, ids, w, layer)

                    if args.with_router:
                        def call(p, experts=experts):
                            return experts(xs[p], *pc.router(xs[p], layer))
                    else:
                        def call(p, experts=experts):
                            return experts(xs[p], *routed[p])
                    timed(run, t, lambda p, call=call: (lambda: call(p)), pool_n, touched_of, ref, label)
                except Exception as ex:
                    failed(run, t, ex)
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    continue
                if args.cuda_graphs and run.rows and run.rows[-1].tokens == t:
                    grun = runs[name + GRAPH]
                    graphs = outs = None
                    try:
                        graphs, outs = capture_graphs(call, pool_n)

                        def replay(p, graphs=graphs, outs=outs):
                            def go():
                                graphs[p].replay()
                                return outs[p]
                            return go
                        timed(grun, t, replay, pool_n, touched_of, ref, label)
                    except Exception as ex:
                        failed(grun, t, ex)
                    del graphs, outs
                    torch.cuda.synchronize(dev)
                    torch.cuda.empty_cache()
            del xs, routed, ref
            save(list(runs.values()))
    del layer
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return list(runs.values())


# ----------------------------------------------------------------------------------------------
# Compile-only check for sm90 (no GPU needed: Triton ships ptxas).

SM90_SHARED_LIMIT = 232448  # bytes of shared memory one block may use on sm90 (227 KiB)


def aot_check() -> int:
    """Compiles the kernel ahead of time for sm90 in bf16, every candidate config, both
    projections, with the alignment hints the launcher gives at DeepSeek-V3 shapes (pointers, N, K
    and the row strides divisible by 16; unit strides specialised), and checks that each fits in
    shared memory. Runs in its own process: it cannot run under TRITON_INTERPRET."""
    if triton is None:
        print(f"  sm90 compile: NOT CHECKED, triton is not importable ({TRITON_ERROR})")
        return 0
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as ex:
        print(f"  sm90 compile: NOT CHECKED, this triton has no ahead-of-time API ({ex})")
        return 0
    names = list(_moe_gemm_kernel.arg_names)
    consts_names = ("A_ROW_DIV", "MUL_ROUTED_WEIGHT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    unit = ("stride_ak", "stride_bk", "stride_cn")
    aligned = ("a_ptr", "b_ptr", "c_ptr", "topk_w_ptr", "sorted_ids_ptr", "block_expert_ptr", "N", "K",
               "stride_am", "stride_be", "stride_bn", "stride_cm")
    ptr_types = {"topk_w_ptr": "*fp32", "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32"}
    target = GPUTarget("cuda", 90, 32)
    worst = 0
    for cfg in CANDIDATES:
        for row_div, mul in ((8, False), (1, True)):
            sig = {n: "constexpr" if n in consts_names or n in unit else
                   ptr_types.get(n, "*bf16") if n.endswith("_ptr") else "i32" for n in names}
            consts = dict(A_ROW_DIV=row_div, MUL_ROUTED_WEIGHT=mul, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                          BLOCK_K=cfg["BLOCK_K"], GROUP_M=cfg["GROUP_M"], **{n: 1 for n in unit})
            attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
            kernel = triton.compile(ASTSource(fn=_moe_gemm_kernel, signature=sig, constexprs=consts, attrs=attrs),
                                    target=target, options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
            shared = kernel.metadata.shared
            mma = "wgmma" if "wgmma" in kernel.asm["ptx"] else "mma.sync"
            if shared > SM90_SHARED_LIMIT:
                print(f"  sm90 compile: {cfg_name(cfg)} needs {shared} B of shared memory, more than {SM90_SHARED_LIMIT}")
                return 1
            worst = max(worst, shared)
            if mul:
                print(f"  sm90 compile: {cfg_name(cfg)}: {shared // 1024} KiB shared, {mma}")
    print(f"  sm90 compile: all {len(CANDIDATES)} configs x 2 projections compile for sm90 in bf16, "
          f"at most {worst // 1024} KiB of shared memory (limit 227 KiB)")
    return 0


# ----------------------------------------------------------------------------------------------
# Dry run: everything that can be checked without a GPU.


def self_test() -> None:
    print("self-test (CPU):", flush=True)
    tiny = pc.config("deepseek-v3", 256, 64, 16, 4, 1)     # 8 groups keep 4, shared expert
    for c in (tiny, pc.PRESETS["deepseek-v3"], pc.PRESETS["kimi-k2"], pc.PRESETS["qwen3-30b-a3b"],
              pc.PRESETS["mixtral-8x7b"], pc.config("qwen3-30b-a3b", 256, 64, 16, 4, 0)):
        print("  " + pc.check_routing(c))

    # The reference itself, against a per-pair f64 loop.
    for c in (tiny, pc.config("qwen3-30b-a3b", 128, 48, 8, 2, 0)):
        layer = pc.make_layer(c, torch.float32, "cpu", 3)
        x = pc.random_inputs(c, 5, torch.float32, "cpu", 4)
        ids, w = pc.router(x, layer)
        err = pc.rel_l2(pc.reference_moe(x, ids, w, layer), pc.reference_per_pair(x, ids, w, layer))
        assert err < 1e-5, f"reference_moe disagrees with the per-pair loop: {err:.2e}"
        print(f"  reference_moe = per-pair f64 loop at {pc.shape_name(c)}: rel L2 {err:.1e}")

    # The block alignment.
    gen = torch.Generator().manual_seed(5)
    cases = 0
    for experts, k, tokens, bm in [(8, 2, 1, 16), (8, 2, 300, 16), (16, 4, 16, 16), (16, 4, 16, 128), (256, 8, 1, 16),
                                   (256, 8, 64, 32), (256, 8, 1024, 64), (384, 8, 33, 128), (128, 8, 4096, 128)]:
        ids = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
        if tokens == 300:  # skewed: most pairs on one expert
            ids[:, 0] = 3
            ids[:, 1] = torch.where(ids[:, 1] == 3, torch.zeros_like(ids[:, 1]), ids[:, 1])
        sorted_ids, block_expert = align_blocks(ids, experts, bm)
        pairs = tokens * k
        flat = ids.reshape(-1)
        valid = sorted_ids < pairs
        assert sorted(sorted_ids[valid].tolist()) == list(range(pairs)), "every pair exactly once"
        assert sorted_ids.numel() == block_expert.numel() * bm
        per_block = sorted_ids.view(-1, bm)
        for b in range(block_expert.numel()):
            e = int(block_expert[b])
            row = per_block[b][per_block[b] < pairs]
            if e >= experts:
                assert row.numel() == 0, "blocks past the end hold no pairs"
            else:
                assert row.numel() > 0 and bool((flat[row.long()] == e).all()), f"block {b} mixes experts"
        assert bool((block_expert[1:] >= block_expert[:-1]).all()), "blocks in expert order"
        cases += 1
    print(f"  align_blocks: {cases} cases (up to 4096 tokens x 8 of 128 experts, skewed), every pair once, one expert per block")

    # The grouped_mm peer on the CPU (torch has a CPU _grouped_mm).
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        layer = pc.make_layer(tiny, dtype, "cpu", 7)
        for t in (1, 16, 64):
            x = pc.random_inputs(tiny, t, dtype, "cpu", 8 + t)
            ids, w = pc.router(x, layer)
            err = pc.rel_l2(grouped_mm_moe(x, ids, w, layer), pc.reference_moe(x, ids, w, layer))
            assert err < TOLERANCE, f"grouped_mm peer {dtype} {t} tok: rel L2 {err:.2e}"
        print(f"  torch-grouped-mm on CPU, {pc.DTYPE_NAMES[dtype]}, 1/16/64 tokens: last rel L2 {err:.1e}")

    # The Triton kernel under the interpreter, every candidate config.
    if triton is None:
        print(f"  triton-fused-moe: NOT TESTED, triton is not importable ({TRITON_ERROR})")
        return
    shapes = [tiny, pc.config("qwen3-30b-a3b", 96, 40, 8, 2, 0)]  # K and N not multiples of the blocks
    for c in shapes:
        for dtype in (torch.float32, torch.float16):
            layer = pc.make_layer(c, dtype, "cpu", 9)
            worst = 0.0
            for t in (1, 16, 64):
                x = pc.random_inputs(c, t, dtype, "cpu", 10 + t)
                ids, w = pc.router(x, layer)
                ref = pc.reference_moe(x, ids, w, layer)
                for cfg in CANDIDATES + [heuristic_config(c, t)]:
                    err = pc.rel_l2(triton_moe(x, ids, w, layer, cfg), ref)
                    assert err < TOLERANCE, f"triton peer {pc.shape_name(c)} {dtype} {t} tok {cfg_name(cfg)}: rel L2 {err:.2e}"
                    worst = max(worst, err)
            print(f"  triton-fused-moe under TRITON_INTERPRET=1 at {pc.shape_name(c)}, {pc.DTYPE_NAMES[dtype]}, "
                  f"1/16/64 tokens x {len(CANDIDATES)} configs: worst rel L2 {worst:.1e}")
    print("  (bf16 Triton dots are not checked here: the interpreter computes them wrongly; on the GPU every timed "
          "token count is checked before it is timed)")

    # Compile for sm90 in a process of its own (the interpreter is on in this one).
    import subprocess
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.abspath(__file__), "--aot-check"], env=env,
                          capture_output=True, text=True, timeout=900)
    print(done.stdout.rstrip())
    if done.returncode != 0:
        print(done.stderr[-3000:])
        raise AssertionError("the Triton kernel does not compile for sm90")


# ----------------------------------------------------------------------------------------------


def main() -> None:
    if sys.argv[1:] == ["--aot-check"]:
        sys.exit(aot_check())
    p = pc.parser(__doc__)
    p.set_defaults(preset=None, tokens=None, iters=None, warmup=None)
    p.add_argument("--peers", default="grouped,triton", help="which peers: grouped, triton (comma separated)")
    p.add_argument("--with-router", action="store_true", help="time the router GEMM and routing too")
    p.add_argument("--tune", action="store_true", help="pick the Triton block config per token count by timing the candidates")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="also time each peer replaying one captured CUDA graph per batch (runs named <peer>+cudagraph)")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: self-test on the CPU (Triton interpreter), then the benchmark path on the CPU at a tiny shape")
    args = p.parse_args()
    args.peers = [s.strip() for s in args.peers.split(",") if s.strip()]
    if not args.peers or any(s not in PEERS for s in args.peers):
        raise SystemExit("--peers takes grouped and/or triton")
    shape_given = any(v is not None for v in (args.hidden, args.intermediate, args.experts, args.top_k, args.shared))
    if args.dry_run:
        if args.preset is None and not shape_given:
            args.hidden, args.intermediate, args.experts, args.top_k, args.shared = 256, 64, 16, 4, 1
        args.tokens = args.tokens or [1, 16]
        args.iters = args.iters or 2
        args.warmup = 1 if args.warmup is None else args.warmup
        if args.dtype == "bf16" and "--dtype" not in sys.argv:
            args.dtype = "f16"  # the interpreter cannot do bf16 dots
    args.preset = args.preset or ["deepseek-v3"]
    args.tokens = args.tokens or [1, 16, 128, 1024, 4096]
    args.iters = 20 if args.iters is None else args.iters
    args.warmup = 3 if args.warmup is None else args.warmup
    cs = pc.configs(args)
    dtype = pc.DTYPES[args.dtype]

    if args.dry_run:
        dev = torch.device("cpu")
        device_name = "host CPU, DRY RUN (Triton interpreter; not a GPU figure)"
        if args.cuda_graphs:
            print("--cuda-graphs needs a GPU; ignored in the dry run")
            args.cuda_graphs = False
        self_test()
        print("self-test passed\n")
    else:
        if not torch.cuda.is_available():
            raise SystemExit("no CUDA device (torch.cuda.is_available() is False); --dry-run runs the CPU self-test")
        dev = torch.device("cuda", torch.cuda.current_device())
        device_name = torch.cuda.get_device_name(dev)
        cap = torch.cuda.get_device_capability(dev)
        print(f"{device_name} (sm{cap[0]}{cap[1]}, {torch.cuda.get_device_properties(dev).total_memory / 2**30:.0f} GiB), "
              f"torch {torch.__version__}, triton {getattr(triton, '__version__', 'missing')}")

    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else copy_bandwidth(dev)
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    else:
        peak, peak_source = peak_flops(device_name, dtype)
    print(f"copy bandwidth {bandwidth / 1e9:.1f} GB/s ({'given' if args.bandwidth_gbs else 'measured now, 256 MiB device copy'}), "
          f"peak {'unknown' if peak is None else f'{peak / 1e12:.1f} TFLOP/s'} ({peak_source})")
    print(f"tokens {args.tokens}, {args.warmup} warm-up + {args.iters} timed iterations each, a distinct batch (and its "
          f"routing) per iteration from a pool of at most 256 MiB of inputs, "
          f"{'router timed' if args.with_router else 'router NOT timed'}", flush=True)

    failures: list = []
    runs = []

    def save(current: list) -> None:
        if args.json:
            pc.write_report(args.json, runs + current, quiet=True)

    for c in cs:
        runs += measure(c, args, dev, dtype, bandwidth, peak, peak_source, device_name, failures, save)
    for run in runs:
        pc.print_run(run)
    if args.json:
        pc.write_report(args.json, runs)
    if failures:
        print("\nFAILED correctness checks (these rows were not timed):\n  " + "\n  ".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    main()
