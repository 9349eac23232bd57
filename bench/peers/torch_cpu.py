#!/usr/bin/env python3
"""The CPU peer of `moe bench`: the MoE layer in PyTorch on the host CPU, written the way a user
writes it (route with torch, then for each touched expert gather its tokens, x @ gate_up^T,
silu(gate) * up, @ down^T, weighted index_add_; plus the shared expert).

The whole layer is timed: router GEMM, routing (the preset's math), experts, shared expert. Each
timed iteration takes the next batch from a pool of distinct random inputs, so the routing changes
every time, as in `moe bench`. Weights are stored in --dtype and multiplied in it (torch's own CPU
kernels; a slow bf16 path is the peer's honest number). The host copy bandwidth is measured in the
same run with a 256 MiB tensor copy; the peak is `moe bench`'s documented estimate, threads x 2.5 GHz
x 32 FLOP/cycle (64 with AVX-512). Before timing, the loop is checked against an fp32 reference (rel L2 < 2e-2).

    python bench/peers/torch_cpu.py --preset qwen3-30b-a3b --tokens 1,16,128 --json cpu-peers.json
    moe bench --backend cpu --preset qwen3-30b-a3b --tokens 1,16,128 --compare cpu-peers.json
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_common as pc  # noqa: E402

BACKEND = "torch-cpu-loop"
TOLERANCE = 2e-2


def moe_loop(x: torch.Tensor, layer: pc.Layer) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer, per-expert loop. x [T, H] in the storage dtype; returns (out [T, H] f32, ids, weights)."""
    c = layer.config
    i, k = c.intermediate, c.top_k
    ids, w = pc.router(x, layer)
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    tok = order // k
    w_sorted = w.reshape(-1)[order]
    counts = torch.bincount(flat, minlength=c.experts).tolist()
    out = torch.zeros(x.shape[0], c.hidden, dtype=torch.float32)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = tok[start:start + n]
        h = F.linear(x.index_select(0, rows), layer.w13[e])
        y = F.linear(F.silu(h[:, :i]) * h[:, i:], layer.w2[e])
        out.index_add_(0, rows, y.float() * w_sorted[start:start + n, None])
        start += n
    if layer.shared_w13 is not None:
        s = c.shared_intermediate
        h = F.linear(x, layer.shared_w13)
        out += F.linear(F.silu(h[:, :s]) * h[:, s:], layer.shared_w2).float()
    return out, ids, w


def copy_bandwidth(reps: int = 7) -> float:
    """Read + write bytes per second of a 256 MiB host tensor copy (`moe bench`: min(memory / 16,
    256 MiB), 7 samples of `COPIES` copies, median)."""
    n = 256 << 20
    src = torch.full((n // 4,), 7, dtype=torch.int32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(pc.COPIES):
            dst.copy_(src)
        times.append((time.perf_counter() - t) / pc.COPIES)
    return 2 * n / pc.median(times)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def memory_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def load() -> str:
    try:
        with open("/proc/loadavg") as fh:
            return " ".join(fh.read().split()[:3])
    except OSError:
        return "?"


def measure(c: pc.Config, args, dtype: torch.dtype, bandwidth: float, peak: float, peak_source: str,
            device: str) -> pc.Run:
    run = pc.Run(backend=BACKEND, device=device, shape=pc.shape_name(c), dtype=pc.DTYPE_NAMES[dtype],
                 copy_bandwidth_gbs=bandwidth / 1e9, peak_tflops=peak / 1e12, peak_source=peak_source,
                 note="whole layer on the host: router GEMM + routing + per-expert loop + shared expert, "
                      f"torch {torch.__version__}, weights in {pc.DTYPE_NAMES[dtype]}, f32 accumulation of the output")
    wb = pc.weight_bytes(c, dtype)
    avail = memory_available()
    if wb > 0.9 * avail:
        msg = f"skipped: the layer's {wb / 2**30:.1f} GiB of weights do not fit the {avail / 2**30:.1f} GiB of free host memory"
        print(f"{BACKEND}: {msg}")
        run.skipped.append(msg)
        return run
    print(f"{BACKEND}: making the {wb / 2**30:.2f} GiB layer ({pc.shape_name(c)}, {run.dtype}) ...", flush=True)
    layer = pc.make_layer(c, dtype, "cpu", args.seed)
    print("  " + pc.check_routing(c), flush=True)

    # Correctness first: the loop on one small batch against the fp32 reference.
    t_check = 16
    x = pc.random_inputs(c, t_check, dtype, "cpu", args.seed + 12345)
    with torch.inference_mode():
        got, ids, w = moe_loop(x, layer)
        err = pc.rel_l2(got, pc.reference_moe(x, ids, w, layer))
    print(f"  check: {t_check} tokens against the fp32 reference, rel L2 {err:.2e} (limit {TOLERANCE:.0e})", flush=True)
    if not err < TOLERANCE:
        msg = f"failed its correctness check: rel L2 {err:.2e} against the fp32 reference at {t_check} tokens; not timed"
        print(f"{BACKEND}: {msg}")
        run.skipped.append(msg)
        return run

    for t in args.tokens:
        pool = [pc.random_inputs(c, t, dtype, "cpu", args.seed ^ ((p + 1) * 0x9E37) ^ t)
                for p in range(pc.pool_size(c, t, args.warmup + args.iters))]
        times, touched = [], []
        with torch.inference_mode():
            for it in range(args.warmup + args.iters):
                x = pool[it % len(pool)]
                start = time.perf_counter()
                _, ids, _ = moe_loop(x, layer)
                dt = time.perf_counter() - start
                if it >= args.warmup:
                    times.append(dt)
                    touched.append(int(torch.unique(ids).numel()))
        row = pc.make_row(c, dtype, t, times, touched, bandwidth, peak)
        print(pc.format_row(BACKEND, row), flush=True)
        run.rows.append(row)
    return run


def cpu_flops_per_cycle(half: bool) -> tuple[float, str]:
    """`moe bench`'s estimate (`cpu_flops_per_cycle` in crates/moe-cli/src/bench/roofline.rs), so
    both tools divide by one peak: two FMA units per core of 16 f32 lanes where AVX-512 runs on
    512-bit units, of 8 where it does not (AMD before Zen 5: family 0x19 or lower) or where there
    is no AVX-512; twice that for f16/bf16 weights where AVX512_BF16's dot products are there."""
    text = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    flags = text.split()
    if "avx512f" not in flags:
        return 32.0, "f32 FMA, two units of 8 lanes"
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}
    vendor = fields.get("vendor_id", "")
    family = int(fields.get("cpu family", "0") or 0)
    halves = vendor == "AuthenticAMD" and family <= 0x19
    lanes, units = (8.0, "AVX-512 on 256-bit units") if halves else (16.0, "512-bit units")
    if half and "avx512_bf16" in flags:
        return 2 * 2 * 2 * lanes, f"bf16 dot products, {units}"
    return 2 * 2 * lanes, f"f32 FMA, {units}"


def main() -> None:
    p = pc.parser(__doc__)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's own choice)")
    args = p.parse_args()
    cs = pc.configs(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = pc.DTYPES[args.dtype]
    threads = torch.get_num_threads()
    device = f"host CPU ({cpu_name()}), {threads} thread{'' if threads == 1 else 's'}"
    load_before = load()
    if args.bandwidth_gbs:
        bandwidth = args.bandwidth_gbs * 1e9
    else:
        bandwidth = copy_bandwidth()
    if args.peak_tflops:
        peak, peak_source = args.peak_tflops * 1e12, "--peak-tflops"
    else:
        per_cycle, why = cpu_flops_per_cycle(dtype != torch.float32)
        peak = threads * 2.5e9 * per_cycle
        peak_source = f"CPU estimate: {threads} threads x 2.5 GHz x {per_cycle:g} FLOP/cycle ({why})"
    print(f"{BACKEND}: {device}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"copy bandwidth {bandwidth / 1e9:.1f} GB/s ({'given' if args.bandwidth_gbs else 'measured now'}), "
          f"peak {peak / 1e12:.2f} TFLOP/s ({peak_source}); load average {load_before}")
    print(f"tokens {args.tokens}, {args.warmup} warm-up + {args.iters} timed iterations each, "
          "a distinct batch (and its routing) per iteration from a pool of at most 256 MiB of inputs", flush=True)
    runs = [measure(c, args, dtype, bandwidth, peak, peak_source, device) for c in cs]
    load_after = load()
    for run in runs:
        run.note += f"; load average before {load_before}, after {load_after}"
        pc.print_run(run)
    if args.json:
        pc.write_report(args.json, runs)


if __name__ == "__main__":
    main()
