//! The ops on host slices: what the CPU backend runs and what [`crate::fallback`] runs for a port.
//!
//! Plain, multi-threaded (rayon) Rust. Every function checks the data-dependent contract (ids in
//! range, cumulative offsets) and returns [`crate::Error::InvalidArgument`] rather than indexing out
//! of bounds; shapes were checked by [`crate::ops`].

use crate::{Result, Routing, invalid};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Total host memory in bytes, from /proc/meminfo; 16 GiB where it cannot be read. The memory
/// figure of the CPU backend and of devices that share host memory (lavapipe, unified memory).
pub fn memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        })
        .unwrap_or(16 << 30)
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
}

impl Weights<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
            Weights::BF16(w) => w.len(),
        }
    }

    /// True when there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Widens `len` elements starting at `start` into `out`.
    fn widen(&self, start: usize, out: &mut [f32]) {
        let n = out.len();
        match self {
            Weights::F32(w) => out.copy_from_slice(&w[start..start + n]),
            // half's slice conversions use F16C/AVX where the CPU has them (detected at run time).
            Weights::F16(w) => w[start..start + n].convert_to_f32_slice(out),
            Weights::BF16(w) => widen_bf16(&w[start..start + n], out),
        }
    }
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
pub fn route_token(
    logits: &[f32],
    bias: Option<&[f32]>,
    routing: &Routing,
    ids: &mut [u32],
    weights: &mut [f32],
) {
    let e = logits.len();
    let k = ids.len();
    let mut chosen = vec![0usize; k];
    match *routing {
        Routing::Softmax { norm_topk_prob } => {
            let max = logits
                .iter()
                .copied()
                .filter(|v| !v.is_nan())
                .fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|v| (v - max).exp()).collect();
            let sum: f32 = exp.iter().sum();
            let p: Vec<f32> = exp.iter().map(|v| v / sum).collect();
            top_k(&p, k, |_| true, &mut chosen);
            let total: f32 = chosen.iter().map(|&c| p[c]).sum();
            for j in 0..k {
                ids[j] = chosen[j] as u32;
                weights[j] = if norm_topk_prob {
                    p[chosen[j]] / total
                } else {
                    p[chosen[j]]
                };
            }
        }
        Routing::SigmoidGrouped {
            n_group,
            topk_group,
            norm_topk_prob,
            routed_scaling_factor,
        } => {
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
                    top_k(
                        &c[g * per..(g + 1) * per],
                        take,
                        |_| true,
                        &mut best[..take],
                    );
                    best[..take].iter().map(|&i| c[g * per + i]).sum()
                })
                .collect();
            let mut groups = vec![0usize; topk_group];
            top_k(&group_score, topk_group, |_| true, &mut groups);
            top_k(&c, k, |i| groups.contains(&(i / per)), &mut chosen);
            let total: f32 = chosen.iter().map(|&i| s[i]).sum::<f32>() + 1e-20;
            for j in 0..k {
                ids[j] = chosen[j] as u32;
                let w = if norm_topk_prob {
                    s[chosen[j]] / total
                } else {
                    s[chosen[j]]
                };
                weights[j] = w * routed_scaling_factor;
            }
        }
    }
}

/// [`crate::Backend::router_topk`] on the host: `logits [T, E]`, `ids`/`weights [T, k]`.
pub fn router_topk(
    logits: &[f32],
    experts: usize,
    bias: Option<&[f32]>,
    routing: &Routing,
    ids: &mut [u32],
    weights: &mut [f32],
) {
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
            return invalid!(
                "topk_ids[{}][{}] = {id} is not an expert id (the layer has {experts} experts)",
                pair / top_k,
                pair % top_k
            );
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
        return invalid!(
            "expert_offsets must start at 0, got {:?}",
            expert_offsets.first()
        );
    }
    if let Some(g) = expert_offsets.windows(2).position(|w| w[1] < w[0]) {
        return invalid!(
            "expert_offsets must not decrease, but [{}] = {} > [{}] = {}",
            g,
            expert_offsets[g],
            g + 1,
            expert_offsets[g + 1]
        );
    }
    let last = *expert_offsets.last().unwrap() as usize;
    if last > rows {
        return invalid!("expert_offsets ends at {last} but y has only {rows} rows");
    }
    Ok(())
}

/// Dot products of one activation row `x` with the `nb` weight rows of `w` (`nb * k` values):
/// four weight rows at a time, so each load of `x` feeds four multiply-adds, with `L` partial sums
/// per row (independent chains the compiler maps onto `L`-lane vectors). `FMA` fuses each
/// multiply-add (one rounding instead of two); without the instruction it must stay off, or every
/// step would be a library call.
#[inline(always)]
fn row_times_block_generic<const L: usize, const FMA: bool>(
    x: &[f32],
    w: &[f32],
    k: usize,
    out: &mut [f32],
) {
    #[inline(always)]
    fn madd<const FMA: bool>(acc: f32, a: f32, b: f32) -> f32 {
        if FMA { a.mul_add(b, acc) } else { acc + a * b }
    }
    #[inline(always)]
    fn reduce<const L: usize>(a: &[f32; L]) -> f32 {
        let mut v = *a;
        let mut width = L;
        while width > 1 {
            width /= 2;
            for l in 0..width {
                v[l] += v[l + width];
            }
        }
        v[0]
    }
    let nb = out.len();
    let chunks = k / L;
    let mut j = 0;
    while j + 4 <= nb {
        let rows = [
            &w[j * k..(j + 1) * k],
            &w[(j + 1) * k..(j + 2) * k],
            &w[(j + 2) * k..(j + 3) * k],
            &w[(j + 3) * k..(j + 4) * k],
        ];
        let mut acc = [[0f32; L]; 4];
        for c in 0..chunks {
            let xs = &x[c * L..c * L + L];
            for (r, row) in rows.iter().enumerate() {
                let ws = &row[c * L..c * L + L];
                for l in 0..L {
                    acc[r][l] = madd::<FMA>(acc[r][l], xs[l], ws[l]);
                }
            }
        }
        for (r, row) in rows.iter().enumerate() {
            let mut tail = 0f32;
            for i in chunks * L..k {
                tail = madd::<FMA>(tail, x[i], row[i]);
            }
            out[j + r] = reduce(&acc[r]) + tail;
        }
        j += 4;
    }
    for (jj, o) in out.iter_mut().enumerate().skip(j) {
        let row = &w[jj * k..(jj + 1) * k];
        let mut a = [0f32; L];
        for c in 0..chunks {
            for l in 0..L {
                a[l] = madd::<FMA>(a[l], x[c * L + l], row[c * L + l]);
            }
        }
        let mut tail = 0f32;
        for i in chunks * L..k {
            tail = madd::<FMA>(tail, x[i], row[i]);
        }
        *o = reduce(&a) + tail;
    }
}

/// Helpers of the AVX2 tiles below.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// The sum of the 8 lanes of `v`.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// 8 bf16 values from `p` as f32 (a 16-bit shift each: exact).
    ///
    /// # Safety
    /// `p` points at 8 readable bf16 values.
    #[inline]
    #[target_feature(enable = "avx2")]
    pub unsafe fn widen8(p: *const half::bf16) -> __m256 {
        // SAFETY: the caller passes a pointer to 8 readable bf16 values.
        let h = unsafe { _mm_loadu_si128(p as *const __m128i) };
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// Four activation rows times the `nb` weight rows of `w`, into `out` (`4 * nb`, row-major), with
/// AVX2 intrinsics: a register tile of 4 x 2 dot products (eight 8-lane accumulators), so each
/// weight load feeds four rows and each activation load two weight rows. (Written with intrinsics
/// because the compiler spilled every array-based version of this tile to the stack.)
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows4_times_block_avx2(xs: [&[f32]; 4], w: &[f32], k: usize, out: &mut [f32]) {
    use avx2::hsum;
    use std::arch::x86_64::*;
    let tail = |x: &[f32], row: &[f32]| -> f32 { (k / 8 * 8..k).map(|i| x[i] * row[i]).sum() };
    let nb = out.len() / 4;
    let chunks = k / 8;
    for j in 0..nb {
        // Two weight rows per pass; an odd last row pairs with itself (computed twice, kept once).
        if j % 2 == 1 {
            continue;
        }
        let j1 = (j + 1).min(nb - 1);
        let (w0, w1) = (&w[j * k..(j + 1) * k], &w[j1 * k..(j1 + 1) * k]);
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in 0..chunks {
            // SAFETY: c * 8 + 8 <= k, the length of every row and activation here.
            unsafe {
                let a = _mm256_loadu_ps(w0.as_ptr().add(c * 8));
                let b = _mm256_loadu_ps(w1.as_ptr().add(c * 8));
                for r in 0..4 {
                    let xv = _mm256_loadu_ps(xs[r].as_ptr().add(c * 8));
                    acc[2 * r] = _mm256_fmadd_ps(xv, a, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(xv, b, acc[2 * r + 1]);
                }
            }
        }
        for r in 0..4 {
            out[r * nb + j] = hsum(acc[2 * r]) + tail(xs[r], w0);
            if j1 != j {
                out[r * nb + j1] = hsum(acc[2 * r + 1]) + tail(xs[r], w1);
            }
        }
    }
}

/// [`rows4_times_block_avx2`] reading bf16 weights straight from the weights, widened in
/// registers (a shift) as they load: no widened copy of the block. Each weight vector feeds four
/// rows, so the widening costs a quarter of what a separate pass over the block would.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn rows4_times_bf16_avx2(xs: [&[f32]; 4], w: &[half::bf16], k: usize, out: &mut [f32]) {
    use avx2::{hsum, widen8};
    use std::arch::x86_64::*;
    let tail = |x: &[f32], row: &[half::bf16]| -> f32 { (k / 8 * 8..k).map(|i| x[i] * row[i].to_f32()).sum() };
    let nb = out.len() / 4;
    let chunks = k / 8;
    for j in (0..nb).step_by(2) {
        // Two weight rows per pass; an odd last row pairs with itself (computed twice, kept once).
        let j1 = (j + 1).min(nb - 1);
        let (w0, w1) = (&w[j * k..(j + 1) * k], &w[j1 * k..(j1 + 1) * k]);
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in 0..chunks {
            // SAFETY: c * 8 + 8 <= k, the length of every row and activation here.
            unsafe {
                let a = widen8(w0.as_ptr().add(c * 8));
                let b = widen8(w1.as_ptr().add(c * 8));
                for r in 0..4 {
                    let xv = _mm256_loadu_ps(xs[r].as_ptr().add(c * 8));
                    acc[2 * r] = _mm256_fmadd_ps(xv, a, acc[2 * r]);
                    acc[2 * r + 1] = _mm256_fmadd_ps(xv, b, acc[2 * r + 1]);
                }
            }
        }
        for r in 0..4 {
            out[r * nb + j] = hsum(acc[2 * r]) + tail(xs[r], w0);
            if j1 != j {
                out[r * nb + j1] = hsum(acc[2 * r + 1]) + tail(xs[r], w1);
            }
        }
    }
}

/// One activation row times `nb` bf16 weight rows read straight from the weights (no widened
/// copy), four weight rows per pass: for decode, where each weight is used by one or two rows and
/// the widening pass would cost as much as the dot products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_times_bf16_avx2(x: &[f32], w: &[half::bf16], k: usize, out: &mut [f32]) {
    use avx2::{hsum, widen8};
    use std::arch::x86_64::*;
    let nb = out.len();
    let chunks = k / 8;
    let tail = |j: usize| -> f32 { (chunks * 8..k).map(|i| x[i] * w[j * k + i].to_f32()).sum() };
    let mut j = 0;
    while j < nb {
        let rows = (nb - j).min(4);
        // Rows past the block repeat the last one (computed, not stored).
        let p: [*const half::bf16; 4] =
            std::array::from_fn(|q| w[(j + q.min(rows - 1)) * k..].as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        for c in 0..chunks {
            // SAFETY: c * 8 + 8 <= k, within row j + q of `w` and within `x`.
            unsafe {
                let xv = _mm256_loadu_ps(x.as_ptr().add(c * 8));
                for q in 0..4 {
                    acc[q] = _mm256_fmadd_ps(xv, widen8(p[q].add(c * 8)), acc[q]);
                }
            }
        }
        for q in 0..rows {
            out[j + q] = hsum(acc[q]) + tail(j + q);
        }
        j += rows;
    }
}

/// Whether the bf16 tiles ([`rows4_times_bf16_avx2`], [`row_times_bf16_avx2`]) can run here.
fn direct_bf16() -> bool {
    cfg!(target_arch = "x86_64") && isa() == "avx2"
}

/// Four rows at once where the CPU has AVX2 and FMA, else one at a time.
fn rows4_times_block(xs: [&[f32]; 4], w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() == "avx2" {
        // SAFETY: the CPU has AVX2 and FMA (checked by isa()).
        return unsafe { rows4_times_block_avx2(xs, w, k, out) };
    }
    let nb = out.len() / 4;
    for (r, x) in xs.iter().enumerate() {
        row_times_block(x, w, k, &mut out[r * nb..(r + 1) * nb]);
    }
}

/// The same code compiled for AVX2 with FMA (8 lanes), chosen at run time; other CPUs run the
/// portable build (SSE2 on x86-64). Measured on the 2-core EPYC of the project: wider variants
/// (16 partial sums, AVX-512) compiled to spills and ran 3x slower, so they are not here.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_times_block_avx2(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    row_times_block_generic::<8, true>(x, w, k, out)
}

/// The instruction set the host GEMM uses: `avx2` (with FMA) where the CPU has it, else
/// `portable`; `MOE_CPU_ISA=portable` forces the portable build, to compare or to reproduce a
/// result bit for bit on another machine.
fn isa() -> &'static str {
    static ISA: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    ISA.get_or_init(|| {
        if std::env::var("MOE_CPU_ISA").is_ok_and(|v| v == "portable") {
            return "portable";
        }
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2";
        }
        "portable"
    })
}

fn row_times_block(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() == "avx2" {
        // SAFETY: the CPU has AVX2 and FMA (checked by isa()).
        return unsafe { row_times_block_avx2(x, w, k, out) };
    }
    row_times_block_generic::<8, false>(x, w, k, out)
}

#[inline]
fn dot_f64(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| *x as f64 * *y as f64)
        .sum::<f64>() as f32
}

/// A raw pointer that tasks use to write disjoint parts of one output.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes a disjoint set of elements (see grouped_gemm).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// [`crate::Backend::grouped_gemm`] on the host.
///
/// `x [Mx, K]`; `w` is `[G, N, K]` (or `[N, K]` with `G = 1` and no offsets); `y [M, N]`.
/// Each task owns a block of weight rows of one group and multiplies every row of that group by
/// them: each weight is read once, which is what decode needs. bf16 blocks are read as they are
/// and widened in registers (AVX2); other dtypes, and the portable build, widen the block to f32
/// once per task.
#[allow(clippy::too_many_arguments)]
pub fn grouped_gemm(
    x: &[f32],
    k: usize,
    token_index: Option<&[u32]>,
    w: Weights,
    n: usize,
    expert_offsets: Option<&[u32]>,
    y: &mut [f32],
    accumulate: Accumulate,
) -> Result<()> {
    let m = y.len() / n;
    let mx = x.len().checked_div(k).unwrap_or(0);
    let whole = [0u32, m as u32];
    let offsets = expert_offsets.unwrap_or(&whole);
    check_offsets(offsets, m)?;
    if let Some((r, t)) =
        token_index.and_then(|ti| ti.iter().enumerate().find(|(_, t)| **t as usize >= mx))
    {
        return invalid!("token_index[{r}] = {t} but x has only {mx} rows");
    }
    let end = offsets[offsets.len() - 1] as usize;
    y[end * n..].fill(0.0);
    // Blocks of weight rows of about 64 KiB (f32), so a block stays in L2 while the rows stream.
    let block = (16384 / k.max(1)).clamp(1, n.max(1));
    let tasks: Vec<(usize, usize)> = (0..offsets.len() - 1)
        .filter(|&g| offsets[g + 1] > offsets[g])
        .flat_map(|g| (0..n).step_by(block).map(move |n0| (g, n0)))
        .collect();
    let out = Out(y.as_mut_ptr());
    tasks.into_par_iter().for_each(|(g, n0)| {
        // Capture the whole `Out` (which is Sync), not its raw-pointer field (which is not).
        #[allow(clippy::redundant_locals)]
        let out = out;
        let nb = block.min(n - n0);
        // The widened block lives in a per-thread buffer: allocating (and zeroing) 64 KiB per
        // task cost as much as reading the weights at decode sizes.
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let xrow = |r: usize| {
            let src = token_index.map_or(r, |ti| ti[r] as usize);
            &x[src * k..(src + 1) * k]
        };
        let (r0, end) = (offsets[g] as usize, offsets[g + 1] as usize);
        // bf16 weights are read directly, widened in registers: no widened copy of the block
        // (at decode that pass would cost as much as the dot products; at prefill ~a third).
        #[cfg(target_arch = "x86_64")]
        if let (Weights::BF16(wb), Accumulate::F32, true) = (w, accumulate, direct_bf16()) {
            let block = &wb[(g * n + n0) * k..(g * n + n0 + nb) * k];
            let mut dots = vec![0f32; 4 * nb];
            let mut r = r0;
            while r < end {
                let take = if end - r >= 4 { 4 } else { 1 };
                // SAFETY: AVX2 and FMA are present (direct_bf16).
                unsafe {
                    if take == 4 {
                        rows4_times_bf16_avx2([xrow(r), xrow(r + 1), xrow(r + 2), xrow(r + 3)], block, k, &mut dots);
                    } else {
                        row_times_bf16_avx2(xrow(r), block, k, &mut dots[..nb]);
                    }
                }
                for q in 0..take {
                    // SAFETY: as below: row r + q, columns n0..n0+nb belong to this task alone.
                    unsafe { std::ptr::copy_nonoverlapping(dots[q * nb..].as_ptr(), out.0.add((r + q) * n + n0), nb) };
                }
                r += take;
            }
            return;
        }
        SCRATCH.with_borrow_mut(|scratch| {
        if scratch.len() < nb * k {
            scratch.resize(nb * k, 0.0);
        }
        let wf = &mut scratch[..nb * k];
        w.widen((g * n + n0) * k, wf);
        let wf = &*wf;
        let mut dots = vec![0f32; 4 * nb];
        let mut r = r0;
        while r < end {
            // Four rows at a time where there are four (f32 accumulation), else one.
            let take = if accumulate == Accumulate::F32 && end - r >= 4 { 4 } else { 1 };
            match (accumulate, take) {
                (Accumulate::F32, 4) => rows4_times_block([xrow(r), xrow(r + 1), xrow(r + 2), xrow(r + 3)], wf, k, &mut dots),
                (Accumulate::F32, _) => row_times_block(xrow(r), wf, k, &mut dots[..nb]),
                (Accumulate::F64, _) => dots[..nb].iter_mut().enumerate().for_each(|(j, d)| *d = dot_f64(xrow(r), &wf[j * k..(j + 1) * k])),
            }
            for q in 0..take {
                // SAFETY: row r + q, columns n0..n0+nb of y belong to this task alone: the rows
                // are this group's, the columns this block's.
                unsafe { std::ptr::copy_nonoverlapping(dots[q * nb..].as_ptr(), out.0.add((r + q) * n + n0), nb) };
            }
            r += take;
        }
        });
    });
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
    h.par_chunks_mut(intermediate)
        .zip(gate_up.par_chunks(2 * intermediate))
        .for_each(|(h, gu)| {
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
        return invalid!(
            "row_index[{p}] = {} but y has only {rows} rows",
            row_index[p]
        );
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
