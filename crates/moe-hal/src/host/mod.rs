//! The ops on host slices: what the CPU backend runs and what [`crate::fallback`] runs for a port.
//!
//! Plain, multi-threaded (rayon) Rust. Every function checks the data-dependent contract (ids in
//! range, cumulative offsets) and returns [`crate::Error::InvalidArgument`] rather than indexing out
//! of bounds; shapes were checked by [`crate::ops`]. The GEMM and its register tiles are in
//! `gemm.rs`.

mod gemm;

pub use gemm::{grouped_gemm, isa};

use crate::{Result, Routing, invalid};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// One field of /proc/meminfo, in bytes.
fn meminfo(field: &str) -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.split(':').next() == Some(field))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Total host memory in bytes, from /proc/meminfo; 16 GiB where it cannot be read. The memory
/// figure of the CPU backend and of devices that share host memory (lavapipe, unified memory).
pub fn memory_bytes() -> u64 {
    meminfo("MemTotal").unwrap_or(16 << 30)
}

/// Host memory available to new allocations now, in bytes: /proc/meminfo's MemAvailable (free
/// memory and what the kernel can reclaim without swapping), or [`memory_bytes`] where it does not
/// say. What a large host allocation is checked against before it is made: the kernel overcommits,
/// so an allocation beyond it would succeed and filling it would summon the OOM killer.
pub fn available_bytes() -> u64 {
    meminfo("MemAvailable").unwrap_or_else(memory_bytes)
}

/// A weight tensor's elements in their storage dtype.
#[derive(Clone, Copy)]
pub enum Weights<'a> {
    /// f32 weights.
    F32(&'a [f32]),
    /// f16 weights.
    F16(&'a [f16]),
    /// bf16 weights.
    BF16(&'a [bf16]),
    /// F8E4M3 weights `[.., rows, cols]` with their f32 block scales ([`crate::fp8`]).
    F8E4M3 {
        /// The E4M3 bytes.
        q: &'a [u8],
        /// The scale grid, [`crate::fp8::scale_shape`] of the weight's shape.
        scales: &'a [f32],
        /// Rows of one matrix (`N`) and columns (`K`).
        rows_cols: [usize; 2],
        /// Rows and columns of one block.
        block: [usize; 2],
        /// Whether no byte of `q` is NaN ([`crate::fp8::any_nan`] is false), known beforehand:
        /// the x86 tiles then take a shorter decode. `false` is always correct, only slower; a
        /// backend that caches the answer per buffer (as the CPU backend does) pays for the scan
        /// once instead of once per call.
        nan_free: bool,
    },
}

impl Weights<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::BF16(w) => w.len(),
            Weights::F8E4M3 { q, .. } => q.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens `out.len()` elements starting at `start` into `out` (F8E4M3: whole rows, scaled).
    fn widen(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Weights::F32(w) => out.copy_from_slice(&w[start..start + n]),
            // half's slice conversions use F16C/AVX where the CPU has them (detected at run time).
            Weights::F16(w) => w[start..start + n].convert_to_f32_slice(out),
            Weights::BF16(w) => widen_bf16(&w[start..start + n], out),
            Weights::F8E4M3 { q, scales, rows_cols: [rows, cols], block, .. } => {
                debug_assert!(start.is_multiple_of(*cols) && n.is_multiple_of(*cols), "F8E4M3 widens whole rows");
                crate::fp8::for_each_block(&q[start..start + n], start / cols, *rows, *cols, *block, scales, |at, run, scale| {
                    widen_e4m3(run, scale, &mut out[at..at + run.len()])
                });
            }
        }
    }
}

/// `out[i] = E4M3[q[i]] * scale`, without a table: the byte's sign and 7 exponent-and-mantissa
/// bits placed in an f32 (exponent field = E4M3's, an f32 denormal for E4M3's subnormals) times
/// 2^120 (exact: it rebiases the exponent from 127 to 7), then the scale (the one rounding, as
/// the table's product has). NaN bytes stay NaN. Branch-free, so the compiler vectorises it
/// (AVX2 where the CPU has it): a table lookup per element cost five times as long.
fn widen_e4m3(q: &[u8], scale: f32, out: &mut [f32]) {
    #[inline(always)]
    fn generic(q: &[u8], scale: f32, out: &mut [f32]) {
        for (o, &b) in out.iter_mut().zip(q) {
            let (b, em) = (b as u32, (b & 0x7F) as u32);
            // Exponent and mantissa placed in an f32 whose exponent is rebiased by an integer
            // add (7 to 127): 2^(e-7) (1 + m/8), right for every normal byte. For e = 0 that is
            // 2^-7 + m 2^-10, and the subnormal's m 2^-9 is twice its excess over 2^-7 (exact).
            // No f32 denormal is ever formed, so denormals-are-zero cannot read one as zero.
            let v = f32::from_bits((em << 20) + (120 << 23));
            let v = if em < 8 { (v - 1.0 / 128.0) * 2.0 } else { v };
            let v = f32::from_bits(v.to_bits() | ((b & 0x80) << 24));
            *o = if em == 0x7F { f32::NAN } else { v * scale };
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(q: &[u8], scale: f32, out: &mut [f32]) {
        generic(q, scale, out)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { avx2(q, scale, out) };
    }
    generic(q, scale, out)
}

/// bf16 is the top half of an f32: widening is a 16-bit shift (exact, NaN included), which the
/// compiler vectorises; AVX2 when the CPU has it.
fn widen_bf16(w: &[bf16], out: &mut [f32]) {
    #[inline(always)]
    fn generic(w: &[bf16], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(w) {
            *o = f32::from_bits((v.to_bits() as u32) << 16);
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(w: &[bf16], out: &mut [f32]) {
        generic(w, out)
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked just above).
        return unsafe { avx2(w, out) };
    }
    generic(w, out)
}

/// Accumulator precision of the host GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accumulate {
    /// f32 with eight independent partial sums (vectorises well).
    #[default]
    F32,
    /// f64, for a reference run.
    F64,
}

/// `a` ranks above `b`: larger score first, NaN below every number, ties to the lower index.
#[inline]
pub fn ranks_above(a: f32, ia: usize, b: f32, ib: usize) -> bool {
    match (a.is_nan(), b.is_nan()) {
        (false, true) => true,
        (true, false) => false,
        (true, true) => ia < ib,
        (false, false) => a > b || (a == b && ia < ib),
    }
}

/// The indices of the `k` best `scores` among those where `allowed` holds, best first.
fn top_k(scores: &[f32], k: usize, allowed: impl Fn(usize) -> bool, out: &mut [usize]) {
    let mut taken = vec![false; scores.len()];
    for slot in out.iter_mut().take(k) {
        let mut best = usize::MAX;
        for i in 0..scores.len() {
            if taken[i] || !allowed(i) {
                continue;
            }
            if best == usize::MAX || ranks_above(scores[i], i, scores[best], best) {
                best = i;
            }
        }
        taken[best] = true;
        *slot = best;
    }
}

/// Routing for one token: fills `ids` and `weights` (length k) from `logits` (length E).
pub fn route_token(logits: &[f32], bias: Option<&[f32]>, routing: &Routing, ids: &mut [u32], weights: &mut [f32]) {
    let e = logits.len();
    let k = ids.len();
    let mut chosen = vec![0usize; k];
    match *routing {
        Routing::Softmax { norm_topk_prob } => {
            let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let p: Vec<f32> = exp.iter().map(|v| v / sum).collect();
            top_k(&p, k, |_| true, &mut chosen);
            let total: f32 = chosen.iter().map(|&c| p[c]).sum();
            for j in 0..k {
                ids[j] = chosen[j] as u32;
                weights[j] = if norm_topk_prob { p[chosen[j]] / total } else { p[chosen[j]] };
            }
        }
        Routing::SigmoidGrouped { n_group, topk_group, norm_topk_prob, routed_scaling_factor } => {
            let s: Vec<f32> = logits.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
            let c: Vec<f32> = match bias {
                Some(b) => s.iter().zip(b).map(|(s, b)| s + b).collect(),
                None => s.clone(),
            };
            let per = e / n_group;
            let group_score: Vec<f32> = (0..n_group)
                .map(|g| {
                    let mut best = [0usize; 2];
                    let take = per.min(2);
                    top_k(&c[g * per..(g + 1) * per], take, |_| true, &mut best[..take]);
                    best[..take].iter().map(|&i| c[g * per + i]).sum()
                })
                .collect();
            let mut groups = vec![0usize; topk_group];
            top_k(&group_score, topk_group, |_| true, &mut groups);
            top_k(&c, k, |i| groups.contains(&(i / per)), &mut chosen);
            let total: f32 = chosen.iter().map(|&i| s[i]).sum::<f32>() + 1e-20;
            for j in 0..k {
                ids[j] = chosen[j] as u32;
                let w = if norm_topk_prob { s[chosen[j]] / total } else { s[chosen[j]] };
                weights[j] = w * routed_scaling_factor;
            }
        }
    }
}

/// [`crate::Backend::router_topk`] on the host: `logits [T, E]`, `ids`/`weights [T, k]`.
pub fn router_topk(logits: &[f32], experts: usize, bias: Option<&[f32]>, routing: &Routing, ids: &mut [u32], weights: &mut [f32]) {
    let k = ids.len() / (logits.len() / experts).max(1);
    ids.par_chunks_mut(k)
        .zip(weights.par_chunks_mut(k))
        .zip(logits.par_chunks(experts))
        .for_each(|((i, w), l)| route_token(l, bias, routing, i, w));
}

/// [`crate::Backend::permute`] on the host: a stable counting sort of the pairs by expert.
pub fn permute(
    topk_ids: &[u32],
    experts: usize,
    expert_offsets: &mut [u32],
    row_index: &mut [u32],
    token_index: &mut [u32],
    top_k: usize,
) -> Result<()> {
    let mut counts = vec![0u32; experts];
    for (pair, &id) in topk_ids.iter().enumerate() {
        if id as usize >= experts {
            return invalid!("topk_ids[{}][{}] = {id} is not an expert id (the layer has {experts} experts)", pair / top_k, pair % top_k);
        }
        counts[id as usize] += 1;
    }
    expert_offsets[0] = 0;
    for e in 0..experts {
        expert_offsets[e + 1] = expert_offsets[e] + counts[e];
    }
    let mut cursor = expert_offsets[..experts].to_vec();
    for (pair, &id) in topk_ids.iter().enumerate() {
        let row = cursor[id as usize];
        cursor[id as usize] += 1;
        row_index[pair] = row;
        token_index[row as usize] = (pair / top_k) as u32;
    }
    Ok(())
}

/// Checks `expert_offsets` for [`grouped_gemm`]: starts at 0, never decreases, ends within `rows`.
pub fn check_offsets(expert_offsets: &[u32], rows: usize) -> Result<()> {
    if expert_offsets.first() != Some(&0) {
        return invalid!("expert_offsets must start at 0, got {:?}", expert_offsets.first());
    }
    if let Some(g) = expert_offsets.windows(2).position(|w| w[1] < w[0]) {
        return invalid!("expert_offsets must not decrease, but [{}] = {} > [{}] = {}", g, expert_offsets[g], g + 1, expert_offsets[g + 1]);
    }
    let last = *expert_offsets.last().unwrap() as usize;
    if last > rows {
        return invalid!("expert_offsets ends at {last} but y has only {rows} rows");
    }
    Ok(())
}

/// `silu(g) = g / (1 + exp(-g))`.
#[inline]
pub fn silu(g: f32) -> f32 {
    g / (1.0 + (-g).exp())
}

/// [`crate::Backend::activation`] on the host: `gate_up [M, 2I]` → `h [M, I]`.
pub fn activation(gate_up: &[f32], intermediate: usize, h: &mut [f32]) {
    if intermediate == 0 {
        return;
    }
    h.par_chunks_mut(intermediate).zip(gate_up.par_chunks(2 * intermediate)).for_each(|(h, gu)| {
        let (g, u) = gu.split_at(intermediate);
        for c in 0..intermediate {
            h[c] = silu(g[c]) * u[c];
        }
    });
}

/// [`crate::Backend::combine`] on the host.
pub fn combine(
    y: &[f32],
    hidden: usize,
    row_index: &[u32],
    topk_weights: &[f32],
    top_k: usize,
    shared: Option<&[f32]>,
    out: &mut [f32],
) -> Result<()> {
    let rows = y.len() / hidden;
    if let Some(p) = row_index.iter().position(|&r| r as usize >= rows) {
        return invalid!("row_index[{p}] = {} but y has only {rows} rows", row_index[p]);
    }
    out.par_chunks_mut(hidden).enumerate().for_each(|(t, o)| {
        o.fill(0.0);
        for j in 0..top_k {
            let w = topk_weights[t * top_k + j];
            let r = row_index[t * top_k + j] as usize;
            for (o, v) in o.iter_mut().zip(&y[r * hidden..(r + 1) * hidden]) {
                *o += w * v;
            }
        }
        if let Some(s) = shared {
            for (o, v) in o.iter_mut().zip(&s[t * hidden..(t + 1) * hidden]) {
                *o += v;
            }
        }
    });
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    /// Every byte, subnormals and NaN included, at a few scales (one with a subnormal product),
    /// over lengths that leave a vector tail: bit for bit the table's product; and with
    /// denormals-are-zero set, as a host process may have it, every byte still decodes exactly.
    #[test]
    fn widen_e4m3_is_the_table_times_the_scale() {
        let q: Vec<u8> = (0..=255u8).chain(0..37).collect();
        for scale in [1.0f32, 3.7e-3, -0.5, 1e-38] {
            let mut out = vec![0f32; q.len()];
            super::widen_e4m3(&q, scale, &mut out);
            for (&b, &o) in q.iter().zip(&out) {
                let want = crate::fp8::E4M3[b as usize] * scale;
                assert!(o.to_bits() == want.to_bits() || (o.is_nan() && want.is_nan()), "byte {b:#04x} x {scale}: {o} != {want}");
            }
        }
        with_denormals_off(|| {
            let mut out = vec![0f32; q.len()];
            super::widen_e4m3(&q, 1.0, &mut out);
            for (&b, &o) in q.iter().zip(&out) {
                let want = crate::fp8::E4M3[b as usize];
                assert!(o.to_bits() == want.to_bits() || (o.is_nan() && want.is_nan()), "byte {b:#04x} with DAZ: {o} != {want}");
            }
        });
    }

    /// Runs `f` on this thread with MXCSR's denormals-are-zero and flush-to-zero set (what
    /// `torch.set_flush_denormal(True)` does), then restores MXCSR. Elsewhere than x86_64, just
    /// runs `f`.
    pub(crate) fn with_denormals_off(f: impl FnOnce()) {
        #[cfg(target_arch = "x86_64")]
        #[allow(deprecated)] // (_mm_getcsr/_mm_setcsr: still the way to reach MXCSR)
        // SAFETY: SSE is part of x86_64; MXCSR is restored before returning (a panic in `f`
        // fails the test, whose thread then ends).
        unsafe {
            use std::arch::x86_64::{_mm_getcsr, _mm_setcsr};
            let old = _mm_getcsr();
            _mm_setcsr(old | 0x8040);
            // (Proof that it took: the smallest denormal now reads as zero.)
            assert_eq!(std::hint::black_box(f32::from_bits(1)) * 2.0, 0.0, "MXCSR denormals-are-zero did not take");
            f();
            _mm_setcsr(old);
        }
        #[cfg(not(target_arch = "x86_64"))]
        f();
    }
}
