"""What the peer scripts share with `moe bench` (crates/moe-cli/src/bench/).

Everything that decides whether a peer's figures can be set beside moe-hal's lives here, written
once: the presets and shape flags (`config`), the shape string `--compare` pairs runs by
(`shape_name`), the bytes and FLOPs a layer must move and compute (`cost`), the routing math of
`moe_hal::Routing` in torch (`route`), the seeded synthetic layer (`make_layer`), the pool of
distinct inputs (`pool_size`), the fp32 reference the peers are checked against
(`reference_moe`), and the report JSON (`Report`).

The report is the schema of `moe bench --json`: {date, commit, runs: [{backend, device, shape,
dtype, copy_bandwidth_gbs, peak_tflops, peak_source, rows: [{tokens, touched, time_s, bytes,
flops, floor_s, gbs, tflops, fraction}], skipped}]}. Each run also carries a `note` (what exactly
was timed); serde ignores the extra field when `moe bench --compare` reads the file.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import subprocess
from dataclasses import dataclass, field, asdict, replace

import torch
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# Shapes: the presets of `moe bench` and the flags that override them.


@dataclass(frozen=True)
class Config:
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    shared_intermediate: int
    # "softmax" (Mixtral, Qwen3-MoE) or "sigmoid-grouped" (DeepSeek-V3, Kimi K2).
    routing: str
    norm_topk_prob: bool = True
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0


def _deepseek(experts: int, n_group: int, topk_group: int, scale: float) -> Config:
    return Config(7168, 2048, experts, 8, 2048, "sigmoid-grouped", True, n_group, topk_group, scale)


PRESETS = {
    "deepseek-v3": _deepseek(256, 8, 4, 2.5),
    "kimi-k2": _deepseek(384, 1, 1, 2.827),
    "qwen3-30b-a3b": Config(2048, 768, 128, 8, 0, "softmax"),
    "mixtral-8x7b": Config(4096, 14336, 8, 2, 0, "softmax"),
}

DTYPES = {"f32": torch.float32, "float32": torch.float32, "f16": torch.float16, "float16": torch.float16,
          "half": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
DTYPE_NAMES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def config(preset: str, hidden=None, intermediate=None, experts=None, top_k=None, shared=None) -> Config:
    """The config the flags describe, as `bench::config` builds it: the preset with any field
    overridden; `shared` counts shared experts of the expert intermediate size; a changed expert
    count keeps DeepSeek's grouping where it divides, else one group (as Kimi K2 does)."""
    c = PRESETS[preset]
    c = replace(c, hidden=c.hidden if hidden is None else hidden,
                intermediate=c.intermediate if intermediate is None else intermediate,
                top_k=c.top_k if top_k is None else top_k)
    if shared is not None:
        c = replace(c, shared_intermediate=shared * c.intermediate)
    elif c.shared_intermediate > 0:
        c = replace(c, shared_intermediate=c.intermediate)
    if experts is not None:
        c = replace(c, experts=experts)
        if c.routing == "sigmoid-grouped":
            if experts % c.n_group != 0 or c.top_k > (experts // c.n_group) * c.topk_group:
                c = replace(c, n_group=1, topk_group=1)
    validate(c)
    return c


def validate(c: Config) -> None:
    """`MoeConfig::validate`."""
    if c.hidden <= 0 or c.intermediate <= 0:
        raise SystemExit(f"hidden and intermediate must be positive (got {c.hidden}, {c.intermediate})")
    if c.experts <= 0:
        raise SystemExit("the layer must have at least one expert")
    if not 1 <= c.top_k <= c.experts:
        raise SystemExit(f"top-k must be between 1 and the expert count {c.experts}, got {c.top_k}")
    if c.routing == "sigmoid-grouped":
        if c.experts % c.n_group != 0:
            raise SystemExit(f"n_group {c.n_group} must divide the expert count {c.experts}")
        if c.top_k > c.topk_group * (c.experts // c.n_group):
            raise SystemExit(f"top-k {c.top_k} is larger than the experts in the kept groups")


def shape_name(c: Config) -> str:
    """`bench::shape_name`: `moe bench --compare` pairs runs by this string and the dtype."""
    return f"H{c.hidden} I{c.intermediate} E{c.experts} k{c.top_k} S{c.shared_intermediate}"


def weight_bytes(c: Config, dtype: torch.dtype) -> int:
    """`MoeConfig::weight_bytes`."""
    elems = c.experts * c.hidden + c.experts * 3 * c.intermediate * c.hidden + 3 * c.shared_intermediate * c.hidden
    return elems * dtype.itemsize + (4 * c.experts if c.routing == "sigmoid-grouped" else 0)


def cost(c: Config, dtype: torch.dtype, tokens: int, touched: int) -> tuple[float, float]:
    """`bench::cost`: the bytes and FLOPs one layer over `tokens` must at least move and compute.
    Weights: the router, every touched expert once, the shared expert, in the storage dtype;
    activations: f32 in and out, plus ids and weights (8 bytes per chosen expert)."""
    h, i, e, k, s, t = c.hidden, c.intermediate, c.experts, c.top_k, c.shared_intermediate, tokens
    weights = (e * h + touched * 3.0 * h * i + 3.0 * h * s) * dtype.itemsize
    activations = 2.0 * t * h * 4.0 + t * k * 8.0
    flops = 2.0 * t * h * e + 2.0 * t * k * 3.0 * h * i + 2.0 * t * 3.0 * h * s
    return weights + activations, flops


# Copies per timed sample of the copy bandwidth, as `moe bench` (roofline.rs, COPIES).
COPIES = 8


def pool_size(c: Config, tokens: int, iterations: int) -> int:
    """How many distinct batches `moe bench` keeps (at most 256 MiB of f32 inputs, at least 2, at
    most one per iteration, warm-up included), so that the routing changes from one iteration to
    the next."""
    return min(max((256 << 20) // max(4 * tokens * c.hidden, 1), 2), max(iterations, 2))


# ----------------------------------------------------------------------------------------------
# The layer: synthetic weights like `synthetic::random_layer`, and the routing of layer.rs.


@dataclass
class Layer:
    config: Config
    router: torch.Tensor            # [E, H]
    bias: torch.Tensor | None       # [E] f32, sigmoid routing only
    w13: torch.Tensor               # [E, 2I, H]: per expert I gate rows, then I up rows
    w2: torch.Tensor                # [E, H, I]
    shared_w13: torch.Tensor | None  # [2S, H]
    shared_w2: torch.Tensor | None   # [H, S]


def _uniform_(t: torch.Tensor, scale: float, gen: torch.Generator, chunk: int = 1 << 26) -> torch.Tensor:
    """Fills `t` with U[-scale, scale) in chunks, so that no full-size f32 copy is ever made."""
    flat = t.view(-1)
    for a in range(0, flat.numel(), chunk):
        b = min(a + chunk, flat.numel())
        r = torch.rand(b - a, generator=gen, device=t.device, dtype=torch.float32)
        flat[a:b] = (r * 2 - 1) * scale
    return t


def make_layer(c: Config, dtype: torch.dtype, device, seed: int = 0) -> Layer:
    """Seeded random weights scaled like a trained model (U[-sqrt(3/fan_in), sqrt(3/fan_in)), the
    scale `random_layer` uses) and, for sigmoid routing, a correction bias U[-0.05, 0.05)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    h, i, e, s = c.hidden, c.intermediate, c.experts, c.shared_intermediate

    def w(shape, fan_in):
        return _uniform_(torch.empty(shape, dtype=dtype, device=device), math.sqrt(3.0 / fan_in), gen)

    bias = None
    if c.routing == "sigmoid-grouped":
        bias = _uniform_(torch.empty(e, dtype=torch.float32, device=device), 0.05, gen)
    return Layer(
        config=c,
        router=w((e, h), h),
        bias=bias,
        w13=w((e, 2 * i, h), h),
        w2=w((e, h, i), i),
        shared_w13=w((2 * s, h), h) if s > 0 else None,
        shared_w2=w((h, s), s) if s > 0 else None,
    )


def random_inputs(c: Config, tokens: int, dtype: torch.dtype, device, seed: int) -> torch.Tensor:
    """One batch U[-1, 1) of shape [tokens, hidden], as `moe bench` draws its inputs."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return (torch.rand(tokens, c.hidden, generator=gen, device=device) * 2 - 1).to(dtype)


def route(logits: torch.Tensor, c: Config, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """`moe_hal::Routing` in torch: logits [T, E] (computed in f32 here) -> ids [T, k] int64 and
    weights [T, k] f32.

    softmax: p = softmax(logits); top-k of p; divided by their sum when norm_topk_prob.
    sigmoid-grouped: s = sigmoid(logits); c = s + bias; groups scored by the sum of their two best
    c (one when a group has one expert); the best topk_group groups kept; top-k of c inside them;
    weights s[chosen], divided by (sum + 1e-20) when norm_topk_prob, times routed_scaling_factor.
    Ties may be broken differently from moe-hal (torch.topk does not promise an order); that never
    changes the cost of a layer, only which of two equal experts runs."""
    logits = logits.float()
    k = c.top_k
    if c.routing == "softmax":
        p = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(p, k, dim=-1)
        if c.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        return ids, w
    s = torch.sigmoid(logits)
    corrected = s + bias if bias is not None else s
    t, e = corrected.shape
    per = e // c.n_group
    group_score = corrected.view(t, c.n_group, per).topk(min(2, per), dim=-1).values.sum(dim=-1)
    groups = group_score.topk(c.topk_group, dim=-1).indices
    keep = torch.zeros(t, c.n_group, dtype=torch.bool, device=logits.device).scatter_(1, groups, True)
    keep = keep.unsqueeze(-1).expand(t, c.n_group, per).reshape(t, e)
    ids = corrected.masked_fill(~keep, float("-inf")).topk(k, dim=-1).indices
    w = s.gather(1, ids)
    if c.norm_topk_prob:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids, w * c.routed_scaling_factor


def router(x: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Router GEMM in the storage dtype, routing math in f32."""
    return route(F.linear(x, layer.router), layer.config, layer.bias)


def _route_token_spec(logits: list[float], bias: list[float] | None, c: Config) -> tuple[list[int], list[float]]:
    """`moe_hal::host::route_token` in plain Python, to check `route` against."""
    def top(scores, k, allowed=lambda i: True):
        order = sorted((i for i in range(len(scores)) if allowed(i)), key=lambda i: (-scores[i], i))
        return order[:k]
    e, k = len(logits), c.top_k
    if c.routing == "softmax":
        m = max(logits)
        ex = [math.exp(v - m) for v in logits]
        p = [v / sum(ex) for v in ex]
        chosen = top(p, k)
        total = sum(p[i] for i in chosen)
        return chosen, [p[i] / total if c.norm_topk_prob else p[i] for i in chosen]
    s = [1 / (1 + math.exp(-v)) for v in logits]
    cc = [a + b for a, b in zip(s, bias)] if bias is not None else s
    per = e // c.n_group
    gscore = [sum(sorted(cc[g * per:(g + 1) * per], reverse=True)[:min(2, per)]) for g in range(c.n_group)]
    groups = top(gscore, c.topk_group)
    chosen = top(cc, k, lambda i: i // per in groups)
    total = sum(s[i] for i in chosen) + 1e-20
    return chosen, [(s[i] / total if c.norm_topk_prob else s[i]) * c.routed_scaling_factor for i in chosen]


def check_routing(c: Config, tokens: int = 32, seed: int = 1) -> str:
    """`route` against the spec on random logits (f32 on the CPU); raises on any difference.
    Returns a one-line summary."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, c.experts, generator=gen)
    bias = (torch.rand(c.experts, generator=gen) * 0.1 - 0.05) if c.routing == "sigmoid-grouped" else None
    ids, w = route(logits, c, bias)
    worst = 0.0
    for t in range(tokens):
        want_ids, want_w = _route_token_spec(logits[t].tolist(), None if bias is None else bias.tolist(), c)
        got = dict(zip(ids[t].tolist(), w[t].tolist()))
        if set(got) != set(want_ids):
            raise AssertionError(f"routing: token {t} chose {sorted(got)}, the spec chooses {sorted(want_ids)}")
        for i, wv in zip(want_ids, want_w):
            worst = max(worst, abs(got[i] - wv) / max(abs(wv), 1e-30))
    if worst > 1e-5:
        raise AssertionError(f"routing weights differ from the spec by {worst:.2e} (relative)")
    return f"routing ({c.routing}, E{c.experts} k{c.top_k}) matches the spec on {tokens} tokens, worst weight rel err {worst:.1e}"


# ----------------------------------------------------------------------------------------------
# The fp32 reference every peer is checked against.


def reference_moe(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The layer's experts in fp32, written as plainly as possible: for every expert, the
    (token, slot) pairs that chose it, down(silu(gate x) * up x) times the routing weight, summed;
    plus the unweighted shared expert. Weights and inputs are upcast from their storage dtype, so
    the only error a peer should show against this is its own rounding. Returns [T, H] f32."""
    c = layer.config
    i = c.intermediate
    xf = x.float()
    out = torch.zeros(x.shape[0], c.hidden, dtype=torch.float32, device=x.device)
    for e in torch.unique(ids).tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        w13 = layer.w13[e].float()
        gate = xf[tok] @ w13[:i].t()
        up = xf[tok] @ w13[i:].t()
        y = (F.silu(gate) * up) @ layer.w2[e].float().t()
        out.index_add_(0, tok, y * w[tok, slot].float()[:, None])
    if layer.shared_w13 is not None:
        s = c.shared_intermediate
        sw13 = layer.shared_w13.float()
        out += (F.silu(xf @ sw13[:s].t()) * (xf @ sw13[s:].t())) @ layer.shared_w2.float().t()
    return out


def reference_per_pair(x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, layer: Layer) -> torch.Tensor:
    """The same layer token by token and slot by slot in f64 (slow; tiny shapes only), to check
    `reference_moe` itself."""
    c = layer.config
    i, s = c.intermediate, c.shared_intermediate
    out = torch.zeros(x.shape[0], c.hidden, dtype=torch.float64)
    for t in range(x.shape[0]):
        xt = x[t].double().cpu()
        for j in range(c.top_k):
            e = int(ids[t, j])
            w13, w2 = layer.w13[e].double().cpu(), layer.w2[e].double().cpu()
            out[t] += float(w[t, j]) * (w2 @ (F.silu(w13[:i] @ xt) * (w13[i:] @ xt)))
        if s > 0:
            sw13, sw2 = layer.shared_w13.double().cpu(), layer.shared_w2.double().cpu()
            out[t] += sw2 @ (F.silu(sw13[:s] @ xt) * (sw13[s:] @ xt))
    return out


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double().cpu(), want.double().cpu()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------
# Rows, runs, the report, and the table moe bench prints.


@dataclass
class Row:
    tokens: int
    touched: float
    time_s: float
    bytes: float
    flops: float
    floor_s: float
    gbs: float
    tflops: float
    fraction: float


@dataclass
class Run:
    backend: str
    device: str
    shape: str
    dtype: str
    copy_bandwidth_gbs: float
    peak_tflops: float | None
    peak_source: str
    rows: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    note: str = ""


def median(v: list[float]) -> float:
    """`moe bench`'s median: the upper middle element."""
    return sorted(v)[len(v) // 2]


def make_row(c: Config, dtype: torch.dtype, tokens: int, times: list[float], touched: list[int],
             bandwidth: float, peak: float | None) -> Row:
    """A row exactly as `moe bench` builds it: per timed iteration its own touched count, bytes and
    floor; medians of time, floor and bytes; the mean touched count."""
    floors, bytes_v, flops = [], [], 0.0
    for n in touched:
        b, flops = cost(c, dtype, tokens, n)
        floors.append(max(b / bandwidth, flops / peak if peak else 0.0))
        bytes_v.append(b)
    time_s, floor_s, b = median(times), median(floors), median(bytes_v)
    return Row(tokens=tokens, touched=sum(touched) / max(len(touched), 1), time_s=time_s, bytes=b,
               flops=flops, floor_s=floor_s, gbs=b / time_s / 1e9, tflops=flops / time_s / 1e12,
               fraction=floor_s / time_s)


def format_row(backend: str, r: Row) -> str:
    """`bench::format_row`."""
    return (f"{backend:>8} {r.tokens:>6} tok  {r.touched:>6.1f} experts  {r.time_s * 1e3:>10.3f} ms  "
            f"floor {r.floor_s * 1e3:>9.3f} ms  {r.fraction:>5.2f} of floor  {r.gbs:>8.1f} GB/s  "
            f"{r.tflops:>7.2f} TFLOP/s")


def print_run(run: Run) -> None:
    peak = "unknown" if run.peak_tflops is None else f"{run.peak_tflops:.1f} TFLOP/s"
    print(f"\n{run.backend} on {run.device} ({run.shape}, {run.dtype}): copy {run.copy_bandwidth_gbs:.1f} GB/s, "
          f"peak {peak} ({run.peak_source})")
    if run.note:
        print(f"  timed: {run.note}")
    for r in run.rows:
        print(format_row(run.backend, r))
    for s in run.skipped:
        print(f"  {s}")


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except Exception:
        return "unknown"


def write_report(path: str, runs: list[Run], quiet: bool = False) -> None:
    """Writes the runs as `moe bench --json` does, atomically (a temporary file renamed over
    `path`): a run killed while writing leaves the last complete report, which `moe bench
    --compare` can still read."""
    import json
    import os
    report = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"), "commit": commit(),
              "runs": [asdict(r) for r in runs]}
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=2)
        fh.write("\n")
    os.replace(tmp, path)
    if not quiet:
        print(f"wrote {path}")


# ----------------------------------------------------------------------------------------------
# Flags: the shape and timing flags of `moe bench`.


def _ints(text: str) -> list[int]:
    try:
        v = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    if not v or any(t <= 0 for t in v):
        raise argparse.ArgumentTypeError("--tokens needs positive token counts")
    return v


def _presets(text: str) -> list[str]:
    v = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in v if t not in PRESETS]
    if bad or not v:
        raise argparse.ArgumentTypeError(f"unknown preset {bad}; expected one of {', '.join(PRESETS)}")
    return v


def parser(description: str, default_dtype: str = "bf16") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", type=_presets, default=["deepseek-v3"],
                   help=f"a real model's shape, or several separated by commas ({', '.join(PRESETS)}); "
                        "default deepseek-v3. The shape flags below override its fields.")
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--experts", type=int)
    p.add_argument("--top-k", type=int)
    p.add_argument("--shared", type=int, help="shared experts, each of the expert intermediate size (0 for none)")
    p.add_argument("--tokens", type=_ints, default=[1, 16, 128, 1024, 4096], help="token counts, comma separated")
    p.add_argument("--dtype", default=default_dtype, choices=sorted(DTYPES), help="weight storage dtype")
    p.add_argument("--iters", type=int, default=20, help="timed iterations per token count (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up iterations per token count")
    p.add_argument("--json", metavar="OUT", help="write the results as JSON (the schema of moe bench --json)")
    p.add_argument("--bandwidth-gbs", type=float, help="use this copy bandwidth (GB/s, read+write) instead of measuring it")
    p.add_argument("--peak-tflops", type=float, help="use this peak (TFLOP/s) instead of the table")
    p.add_argument("--seed", type=int, default=0)
    return p


def configs(args) -> list[Config]:
    if args.iters < 1:
        raise SystemExit("--iters must be at least 1")
    if args.warmup < 0:
        raise SystemExit("--warmup must not be negative")
    return [config(p, args.hidden, args.intermediate, args.experts, args.top_k, args.shared) for p in args.preset]
