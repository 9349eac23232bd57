//! The host GEMM ([`grouped_gemm`]): tasks, the choice of kernel per block of weights, and the
//! portable kernel for any CPU. The AVX2 + FMA and AVX-512 tiles, chosen at run time ([`isa`];
//! `MOE_CPU_ISA=avx2|portable` caps it), are in `x86.rs`.

use super::{Accumulate, Weights, check_offsets};
use crate::{Result, invalid};
use rayon::prelude::*;

// Before any use of its macro (`avx512_rows!`), which macro_use makes visible from here on.
#[cfg(target_arch = "x86_64")]
#[macro_use]
mod x86;
#[cfg(target_arch = "x86_64")]
use x86::*;

/// Most activation rows of one AVX-512 tile.
const AVX512_ROWS: usize = 6;

/// Dot products of one activation row `x` with the `nb` weight rows of `w` (`nb * k` values):
/// four weight rows at a time, so each load of `x` feeds four multiply-adds, with `L` partial sums
/// per row (independent chains the compiler maps onto `L`-lane vectors). `FMA` fuses each
/// multiply-add (one rounding instead of two); without the instruction it must stay off, or every
/// step would be a library call.
#[inline(always)]
fn row_times_block_generic<const L: usize, const FMA: bool>(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
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
        let rows = [&w[j * k..(j + 1) * k], &w[(j + 1) * k..(j + 2) * k], &w[(j + 2) * k..(j + 3) * k], &w[(j + 3) * k..(j + 4) * k]];
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

/// Rows of one group from which, on AVX2 without AVX-512, an E4M3 block is widened to f32 once
/// per task (then the f32 tiles) rather than decoded in registers by every 4-row tile. Measured
/// on the 2-core Zen 4 with `MOE_CPU_ISA=avx2`, f8_e4m3, back to back (widened from 16 rows /
/// direct at every count): Qwen3-30B-A3B at 512 tokens (32 rows per expert) 382 / 481 ms,
/// DeepSeek-V3 with 16 experts at 128 tokens (64 rows) 812 / 1203 ms, at 16 tokens 170 / 180.
/// AVX-512 always decodes directly: its tiles hold six rows and its decode of bytes known not
/// to be NaN is four ops per 16 weights, so with 256 KiB tasks the direct tiles beat widening at
/// every count measured (Qwen3 at 512 tokens 252–264 / 293–318 ms, at 2048 tokens 1060 / 1111;
/// DeepSeek-V3 E16 at 64 tokens 292 / 323, at 128 tokens 564 / 597).
#[cfg(target_arch = "x86_64")]
const AVX2_F8_WIDEN_ROWS: usize = 16;

/// A block of 16-bit or 8-bit weights the tiles read directly, widening in registers (no widened
/// copy).
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum Direct<'a> {
    /// bf16: AVX-512 or AVX2 tiles.
    Bf16(&'a [half::bf16]),
    /// f16: AVX-512 tiles (`vcvtph2ps`).
    F16(&'a [half::f16]),
    /// E4M3 rows that all lie in one row of scale blocks: `scales` is that row of the grid (one
    /// scale per `block_cols` columns). Since `sum_c x[c] * (q[c] * s[c / b]) =
    /// sum_c (x[c] * s[c / b]) * q[c]`, each activation row is scaled once per block of weight
    /// rows and the tiles run on the unscaled bytes (AVX-512 tiles, or the AVX2 4-row tile and
    /// one-row kernel).
    ///
    /// `nan_free` (from [`Weights::F8E4M3`]): no byte of the tensor is NaN, so the tiles take
    /// the four-op decode ([`avx512::e4m3x16_nan_free`]) instead of the nine-op one that maps
    /// NaN bytes to NaN. Qwen3-30B-A3B f8_e4m3 on the 2-core Zen 4: 2.26–2.49 -> 1.40–1.59 ms
    /// at 1 token, 25.5–26.4 -> 14.9–16.2 at 16, 85–90 -> 66–71 at 128.
    E4m3 { q: &'a [u8], scales: &'a [f32], block_cols: usize, nan_free: bool },
}

/// The weights `w[start..start + len]` (whole rows of one group) as a [`Direct`] block, where
/// this CPU has tiles for their dtype (and accumulation is f32). `rows` is the number of
/// activation rows of the group: without AVX-512, from [`AVX2_F8_WIDEN_ROWS`] on an E4M3 block
/// is widened once instead.
#[cfg(target_arch = "x86_64")]
fn direct(w: Weights<'_>, start: usize, len: usize, rows: usize) -> Option<Direct<'_>> {
    match (w, isa()) {
        (_, "portable") => None,
        (Weights::BF16(b), _) => Some(Direct::Bf16(&b[start..start + len])),
        (Weights::F16(h), "avx512") => Some(Direct::F16(&h[start..start + len])),
        (Weights::F8E4M3 { q, scales, rows_cols: [n, k], block: [bn, bk], nan_free }, isa)
            if isa == "avx512" || rows < AVX2_F8_WIDEN_ROWS =>
        {
            // The caller's row blocks never straddle a row of scale blocks (see grouped_gemm).
            let (g, n0) = (start / k / n, start / k % n);
            let grid_cols = k.div_ceil(bk);
            let row = (g * n.div_ceil(bn) + n0 / bn) * grid_cols;
            Some(Direct::E4m3 { q: &q[start..start + len], scales: &scales[row..row + grid_cols], block_cols: bk, nan_free })
        }
        _ => None,
    }
}

/// Weight rows handled together by the widest tile this CPU has (a block of another multiple
/// computes the last pass partly for nothing).
fn tile_cols() -> usize {
    match isa() {
        "avx512" => 4,
        "avx2" => 3,
        _ => 1,
    }
}

/// Activation rows handled together by the widest tile this CPU has.
fn tile_rows() -> usize {
    if isa() == "avx512" { AVX512_ROWS } else { 4 }
}

/// `xs` (1 to [`tile_rows`] rows) times a block read directly ([`direct`]), into `out`
/// (`xs.len() * nb`, row-major).
#[cfg(target_arch = "x86_64")]
fn rows_times_direct(xs: &[&[f32]], w: Direct<'_>, k: usize, out: &mut [f32]) {
    // SAFETY: `direct` made `w` only where isa() found the tile's instructions: AVX-512F for the
    // AVX-512 tiles (and for every f16 block), AVX2 and FMA for the others.
    unsafe {
        match (w, isa(), xs.len()) {
            (Direct::E4m3 { q, scales, block_cols, nan_free }, isa, n) => {
                // The activation rows times their block scales, in a per-thread buffer.
                thread_local! {
                    static SCALED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
                }
                SCALED.with_borrow_mut(|buf| {
                    buf.resize(n * k, 0.0);
                    for (r, x) in xs.iter().enumerate() {
                        for ((o, xc), s) in buf[r * k..(r + 1) * k].chunks_mut(block_cols).zip(x.chunks(block_cols)).zip(scales) {
                            o.iter_mut().zip(xc).for_each(|(o, x)| *o = x * s);
                        }
                    }
                    let rows: [&[f32]; AVX512_ROWS] = std::array::from_fn(|r| &buf[r.min(n - 1) * k..(r.min(n - 1) + 1) * k]);
                    if isa == "avx512" && nan_free {
                        avx512_rows!(rows_times_e4m3_nan_free_avx512, &rows[..n], q, k, out)
                    } else if isa == "avx512" {
                        avx512_rows!(rows_times_e4m3_avx512, &rows[..n], q, k, out)
                    } else if n == 4 {
                        let tile = if nan_free { rows4_times_e4m3_nan_free_avx2 } else { rows4_times_e4m3_avx2 };
                        tile([rows[0], rows[1], rows[2], rows[3]], q, k, out)
                    } else {
                        // Fewer than four rows (decode, or a group's last rows): one at a time.
                        let row = if !nan_free {
                            row_times_e4m3_avx2
                        } else if x86::denormals_are_zero() {
                            row_times_e4m3_nan_free_f16_avx2
                        } else {
                            row_times_e4m3_nan_free_avx2
                        };
                        let nb = out.len() / n;
                        for (r, x) in rows[..n].iter().enumerate() {
                            row(x, q, k, &mut out[r * nb..(r + 1) * nb]);
                        }
                    }
                })
            }
            // One row at a time (decode) takes the 8-lane kernel made for it.
            (Direct::Bf16(w), "avx512", 2..) => avx512_rows!(rows_times_bf16_avx512, xs, w, k, out),
            (Direct::F16(w), _, _) => avx512_rows!(rows_times_f16_avx512, xs, w, k, out),
            (Direct::Bf16(w), _, 4) => rows4_times_bf16_avx2([xs[0], xs[1], xs[2], xs[3]], w, k, out),
            (Direct::Bf16(w), _, _) => {
                let nb = out.len() / xs.len();
                for (r, x) in xs.iter().enumerate() {
                    row_times_bf16_avx2(x, w, k, &mut out[r * nb..(r + 1) * nb]);
                }
            }
        }
    }
}

/// `xs` (1 to [`tile_rows`] rows) times an f32 block, into `out` (`xs.len() * nb`, row-major).
fn rows_times_block(xs: &[&[f32]], w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: isa() found AVX-512F for the first arms, AVX2 and FMA for the last.
    unsafe {
        match (isa(), xs.len()) {
            // One row too: the tile's prefetch makes f32 decode 5–11% faster than the
            // portable row kernel (back to back, Qwen3-30B-A3B f32 at 1 and 16 tokens).
            ("avx512", 1..) => return avx512_rows!(rows_times_block_avx512, xs, w, k, out),
            ("avx2", 4) => return rows4_times_block_avx2([xs[0], xs[1], xs[2], xs[3]], w, k, out),
            _ => {}
        }
    }
    let nb = out.len() / xs.len();
    for (r, x) in xs.iter().enumerate() {
        row_times_block(x, w, k, &mut out[r * nb..(r + 1) * nb]);
    }
}

/// The same code compiled for AVX2 with FMA (8 lanes), chosen at run time; other CPUs run the
/// portable build (SSE2 on x86-64). Measured on the 2-core EPYC of the project: wider builds of
/// this generic code (16 partial sums, AVX-512) compiled to spills and ran 3x slower; the
/// AVX-512 tiles in `x86.rs` are written with intrinsics instead.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn row_times_block_avx2(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    row_times_block_generic::<8, true>(x, w, k, out)
}

/// The instruction set the host GEMM uses: `avx512` (AVX-512F with AVX2, FMA and F16C: tiles of
/// up to six activation rows in 16 lanes, single rows as `avx2`), `avx2` (with FMA and F16C, which
/// every AVX2 CPU has: tiles of four rows), else `portable`. `MOE_CPU_ISA=avx2` or `portable`
/// caps it, to compare or to reproduce a result bit for bit on another machine (the tiles sum in
/// different orders).
pub fn isa() -> &'static str {
    static ISA: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();
    ISA.get_or_init(|| {
        let cap = std::env::var("MOE_CPU_ISA").unwrap_or_default();
        if cap == "portable" {
            return "portable";
        }
        #[cfg(target_arch = "x86_64")]
        if has_avx2_kernels() {
            return if cap != "avx2" && std::arch::is_x86_feature_detected!("avx512f") { "avx512" } else { "avx2" };
        }
        "portable"
    })
}

/// Whether this CPU has what the AVX2 kernels are compiled for: AVX2, FMA and F16C (whatever
/// `MOE_CPU_ISA` says).
#[cfg(target_arch = "x86_64")]
fn has_avx2_kernels() -> bool {
    use std::arch::is_x86_feature_detected as has;
    has!("avx2") && has!("fma") && has!("f16c")
}

fn row_times_block(x: &[f32], w: &[f32], k: usize, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if isa() != "portable" {
        // SAFETY: the CPU has AVX2 and FMA (checked by isa()).
        return unsafe { row_times_block_avx2(x, w, k, out) };
    }
    row_times_block_generic::<8, false>(x, w, k, out)
}

#[inline]
fn dot_f64(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>() as f32
}

/// A raw pointer that tasks use to write disjoint parts of one output.
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: every task writes a disjoint set of elements (see grouped_gemm).
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// One tile of rows times a weight block: `(rows, out)`, `out` being `rows.len() * nb`, row-major.
type RowsTile<'a> = dyn FnMut(&[&[f32]], &mut [f32]) + 'a;

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
    if let Some((r, t)) = token_index.and_then(|ti| ti.iter().enumerate().find(|(_, t)| **t as usize >= mx)) {
        return invalid!("token_index[{r}] = {t} but x has only {mx} rows");
    }
    let end = offsets[offsets.len() - 1] as usize;
    y[end * n..].fill(0.0);
    // Blocks of weight rows of about 64 KiB (f32), so a block stays in L2 while the rows stream.
    // At least four rows, the weight rows of the widest tile: at K = 7168 (DeepSeek-V3's hidden
    // size) 64 KiB would be two, and the tile would compute each of them twice (bf16, back to
    // back on the 2-core VM, DeepSeek-V3 shape with 16 experts: 108 -> 72 ms at 16 tokens and
    // 825 -> 529 ms at 128; Qwen3-30B-A3B, K <= 2048, unchanged).
    // Rounded up to whole passes of the tile's weight rows: Qwen3-30B-A3B's down projection (K =
    // 768) made 21-row blocks, whose last 4-row pass computed three repeated rows (back to back,
    // bf16 at 512 tokens, three pairs: down 101–105 -> 94–99 ms; with MOE_CPU_ISA=avx2, 3-row
    // passes, gate/up 8 -> 9 rows: 210–212 -> 175–190 ms).
    let step = tile_cols();
    let mut block = ((16384 / k.max(1)).max(4).div_ceil(step) * step).clamp(1, n.max(1));
    if let Weights::F8E4M3 { block: [bn, _], .. } = w {
        // E4M3: 256 KiB of bytes (the direct tiles read them as they are), so the activation
        // rows scaled per task (Direct::E4m3: K floats a row, each tile) are reused by more
        // weight rows: at K = 7168, 64 KiB made 8-row tasks, and scaling cost an eighth of the
        // products. Back to back on the 2-core Zen 4 (64 / 256 KiB): Qwen3-30B-A3B 1.61 / 1.40 ms
        // at 1 token, 74.6 / 62.8 at 128, 1148 / 1060 at 2048; DeepSeek-V3 E16 95.8 / 82.4 at
        // 16 tokens, 790 / 564 at 128 (512 KiB: no better). But at least four tasks a thread
        // where the rows allow it, so a many-core machine is not left with a handful of tasks
        // at decode. And blocks that never straddle a row of scale blocks, so one block shares
        // a row of scales: a divisor of the scale block's rows.
        block = (262144 / k.max(1)).clamp(1, n.max(1)).min(bn);
        let groups = offsets.windows(2).filter(|o| o[1] > o[0]).count();
        let want = 4 * rayon::current_num_threads();
        while block > 4 && groups * n.div_ceil(block) < want {
            block /= 2;
        }
        while !bn.is_multiple_of(block) {
            block -= 1;
        }
    }
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
        // The group's rows in tiles of up to `most` (no allocation per tile): `tile` computes
        // each into `dots` (`rows * nb`, row-major), copied to y here.
        let mut dots = vec![0f32; tile_rows() * nb];
        let mut tiles = |most: usize, tile: &mut RowsTile<'_>| {
            let mut r = r0;
            while r < end {
                let take = (end - r).min(most);
                let xs: [&[f32]; AVX512_ROWS] = std::array::from_fn(|q| xrow(r + q.min(take - 1)));
                tile(&xs[..take], &mut dots[..take * nb]);
                for q in 0..take {
                    // SAFETY: row r + q, columns n0..n0+nb of y belong to this task alone: the rows
                    // are this group's, the columns this block's.
                    unsafe { std::ptr::copy_nonoverlapping(dots[q * nb..].as_ptr(), out.0.add((r + q) * n + n0), nb) };
                }
                r += take;
            }
        };
        // 16-bit weights are read directly, widened in registers: no widened copy of the block
        // (at decode that pass would cost as much as the dot products; at prefill ~a third).
        #[cfg(target_arch = "x86_64")]
        if let (Some(block), Accumulate::F32) = (direct(w, (g * n + n0) * k, nb * k, end - r0), accumulate) {
            return tiles(tile_rows(), &mut |xs, d| rows_times_direct(xs, block, k, d));
        }
        SCRATCH.with_borrow_mut(|scratch| {
            if scratch.len() < nb * k {
                scratch.resize(nb * k, 0.0);
            }
            let wf = &mut scratch[..nb * k];
            w.widen((g * n + n0) * k, wf);
            let wf = &*wf;
            match accumulate {
                // A tile's worth of rows at a time.
                Accumulate::F32 => tiles(tile_rows(), &mut |xs, d| rows_times_block(xs, wf, k, d)),
                // One row at a time, each dot product in f64.
                Accumulate::F64 => {
                    tiles(1, &mut |xs, d| d.iter_mut().enumerate().for_each(|(j, v)| *v = dot_f64(xs[0], &wf[j * k..(j + 1) * k])))
                }
            }
        });
    });
    Ok(())
}
