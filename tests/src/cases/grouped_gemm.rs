//! `grouped_gemm` for weights in f32, f16, bf16 and F8E4M3 (block scales of
//! [`crate::check::fp8_test_block`]): the dense router GEMM, grouped expert GEMMs
//! with and without the gather index, empty experts, rows past the last offset (written as zero),
//! M = 0 and 1, sizes one off every tile boundary (15/16/17 .. 127/128/129), K = 7168, NaN in
//! the activations (which must come out NaN, on every path). F8E4M3 also has [`every_byte`]: each
//! of the 256 bytes, NaN and subnormals included, decoded bit for bit on the decode path and the
//! prefill path.
//!
//! `grouped_gemm_swiglu` (the gate/up projection with SwiGLU fused) runs the same layouts, checked
//! against the oracle's `swiglu(grouped_gemm(..))`: dense (the shared expert), decode (one row per
//! expert), prefill off every tile boundary, gathered rows, rows past the last offset.

use crate::check::*;
use crate::oracle;
use crate::rng::Rng;
use crate::runner::Case;
use moe_hal::{Backend, BlockScales, DType, HostTensor, Op, Tensor, ops};

/// How the rows of `y` map onto groups of weights.
#[derive(Debug, Clone)]
pub enum Layout {
    /// One plain GEMM, `w [N, K]`, no offsets: `M = Mx` rows.
    Dense {
        /// Rows.
        m: usize,
    },
    /// `w [G, N, K]` with `sizes[g]` rows per group and `tail` rows past the last offset; with
    /// `gather`, each row reads a random row of `x [mx, K]`, else `x` has `M` rows.
    Grouped {
        /// Rows per group.
        sizes: Vec<usize>,
        /// Rows past the last offset (must come out zero).
        tail: usize,
        /// Rows of `x` to gather from, when gathering.
        gather: Option<usize>,
    },
    /// The gate/up projection of a layer: the plan of `tokens` tokens routed to `top_k` of
    /// `experts` experts, rows gathered by the plan's token_index.
    Planned {
        /// Tokens routed.
        tokens: usize,
        /// Experts (groups).
        experts: usize,
        /// Experts per token.
        top_k: usize,
    },
    /// The inner layout with a NaN in rows 0 and `Mx / 2` of `x`: every row of `y` reading one
    /// must come out NaN throughout (a kernel that clamps or converts activations may lose it).
    NanInX(Box<Layout>),
}

/// Group name of the grouped_gemm cases for `dtype`.
pub fn group(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "grouped_gemm_f16",
        DType::BF16 => "grouped_gemm_bf16",
        DType::F8E4M3 => "grouped_gemm_f8_e4m3",
        _ => "grouped_gemm_f32",
    }
}

/// Group name of the grouped_gemm_swiglu cases for `dtype`.
pub fn swiglu_group(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "grouped_gemm_swiglu_f16",
        DType::BF16 => "grouped_gemm_swiglu_bf16",
        DType::F8E4M3 => "grouped_gemm_swiglu_f8_e4m3",
        _ => "grouped_gemm_swiglu_f32",
    }
}

/// Builds the data for `layout`, runs `op` (`grouped_gemm`, or `grouped_gemm_swiglu` with `n = 2I`
/// weight rows per group and output `h [M, I]`) with weights in `dtype`, compares with the oracle,
/// and checks rows past the last offset are exactly zero.
pub fn check_gemm<B: Backend>(b: &B, op: Op, dtype: DType, layout: &Layout, n: usize, k: usize, seed: &str) -> CaseResult {
    let mut rng = Rng::from_name(seed);
    let (layout, nan_in_x) = match layout {
        Layout::NanInX(inner) => (inner.as_ref(), true),
        l => (l, false),
    };
    // (rows of x, rows of y, groups, offsets, gather index)
    let (mx, m, g, offsets, gather): (usize, usize, usize, Option<Vec<u32>>, Option<Vec<u32>>) = match layout {
        Layout::Dense { m } => (*m, *m, 1, None, None),
        Layout::Grouped { sizes, tail, gather } => {
            let m = sizes.iter().sum::<usize>() + tail;
            let mut off = vec![0u32];
            for s in sizes {
                off.push(off.last().unwrap() + *s as u32);
            }
            let mx = gather.unwrap_or(m);
            let ti = gather.map(|mx| (0..m).map(|_| rng.below(mx) as u32).collect());
            (mx, m, sizes.len(), Some(off), ti)
        }
        Layout::Planned { tokens, experts, top_k } => {
            let ids = super::random_ids(&mut rng, *tokens, *experts, *top_k);
            let plan = oracle::permute(&ids, *top_k, *experts).map_err(Fail::Wrong)?;
            (*tokens, tokens * top_k, *experts, Some(plan.expert_offsets), Some(plan.token_index))
        }
        Layout::NanInX(_) => return wrong!("NanInX wraps another layout, not itself"),
    };
    let mut x = rng.vec_f32(mx * k, 1.0);
    if nan_in_x && mx > 0 {
        x[k / 2] = f32::NAN;
        x[mx / 2 * k + k / 3] = f32::NAN;
    }
    let wv = rng.vec_f32(g * n * k, 1.0 / (k as f64).sqrt());
    let w_shape: Vec<usize> = if offsets.is_some() { vec![g, n, k] } else { vec![n, k] };

    let xt = f32_tensor(b, &[mx, k], &x)?;
    let (wt, w64) = weight_tensor(b, dtype, &w_shape, &wv)?;
    let ot = offsets.as_ref().map(|o| u32_tensor(b, &[g + 1], o)).transpose()?;
    let tt = gather.as_ref().map(|t| u32_tensor(b, &[m], t)).transpose()?;
    let want = oracle::grouped_gemm(&oracle::widen(&x), k, gather.as_deref(), &w64, n, offsets.as_deref(), m).map_err(Fail::Wrong)?;
    let swiglu = op == Op::GroupedGemmSwiglu;
    let (name, width) = if swiglu { ("h", n / 2) } else { ("y", n) };
    let mut y = poisoned_f32(b, &[m, width])?;
    let (got, want) = if swiglu {
        ops::grouped_gemm_swiglu(b, &xt, tt.as_ref(), &wt, ot.as_ref(), &mut y).ctx("grouped_gemm_swiglu")?;
        (read_f32(b, &y)?, oracle::swiglu(&want, width))
    } else {
        ops::grouped_gemm(b, &xt, tt.as_ref(), &wt, ot.as_ref(), &mut y).ctx("grouped_gemm")?;
        (read_f32(b, &y)?, want)
    };
    let err = close(name, &got, &want, op_tolerance(Some(dtype), k))?;
    if let Some(off) = &offsets {
        let end = *off.last().unwrap() as usize * width;
        if let Some(i) = got[end..].iter().position(|&v| v != 0.0) {
            return wrong!(
                "{name}: row {} is past expert_offsets[G] = {} and must be written as zero, element {} is {}",
                (end + i) / width,
                off.last().unwrap(),
                (end + i) % width,
                got[end + i]
            );
        }
    }
    Ok(err)
}

fn case<B: Backend>(dtype: DType, name: &str, layout: Layout, n: usize, k: usize) -> Case<B> {
    op_case(Op::GroupedGemm, dtype, name, layout, n, k)
}

fn op_case<B: Backend>(op: Op, dtype: DType, name: &str, layout: Layout, n: usize, k: usize) -> Case<B> {
    let group = if op == Op::GroupedGemmSwiglu { swiglu_group(dtype) } else { group(dtype) };
    let shape = shape_of(&layout, n, k);
    let seed = format!("{group}/{name}");
    Case::new(group, name, op, Some(dtype), shape, move |b: &B| check_gemm(b, op, dtype, &layout, n, k, &seed))
}

fn shape_of(layout: &Layout, n: usize, k: usize) -> String {
    match layout {
        Layout::Dense { m } => format!("M={m} N={n} K={k} dense"),
        Layout::Grouped { sizes, tail, gather } => {
            let g = if sizes.len() <= 8 { format!("{sizes:?}") } else { format!("{} groups", sizes.len()) };
            format!(
                "M={} N={n} K={k} rows/group {g}{}{}",
                sizes.iter().sum::<usize>() + tail,
                if *tail > 0 { format!(" +{tail} past end") } else { String::new() },
                gather.map_or(String::new(), |mx| format!(" gather from {mx}"))
            )
        }
        Layout::Planned { tokens, experts, top_k } => format!("T={tokens} E={experts} k={top_k} N={n} K={k} gather"),
        Layout::NanInX(inner) => format!("{}, NaN in x", shape_of(inner, n, k)),
    }
}

fn nan_in_x(inner: Layout) -> Layout {
    Layout::NanInX(Box::new(inner))
}

/// Rows per expert averaging under 4 (43 rows over 16 experts, so backends take their decode
/// path), with experts of 5, 6, 8, 9 and 12 rows among ones of 0 to 2.
const DECODE_ROWS_1_TO_12: [usize; 16] = [1, 5, 8, 9, 0, 12, 0, 0, 0, 2, 0, 0, 6, 0, 0, 0];

/// The grouped_gemm cases for one weight dtype.
pub fn cases_for<B: Backend>(dtype: DType) -> Vec<Case<B>> {
    let grouped = |sizes: &[usize], tail: usize, gather: Option<usize>| Layout::Grouped { sizes: sizes.to_vec(), tail, gather };
    let mut sparse = vec![0usize; 64];
    sparse[5] = 2;
    sparse[63] = 1;
    vec![
        case(dtype, "dense_router_m33", Layout::Dense { m: 33 }, 63, 129),
        case(dtype, "dense_m1_n257", Layout::Dense { m: 1 }, 257, 127),
        case(dtype, "dense_m17_n16_k31", Layout::Dense { m: 17 }, 16, 31),
        case(dtype, "dense_m16_n17_k33", Layout::Dense { m: 16 }, 17, 33),
        case(dtype, "dense_m0", Layout::Dense { m: 0 }, 8, 16),
        case(dtype, "grouped_e8_empty_groups", grouped(&[5, 0, 17, 1, 0, 0, 33, 2], 0, None), 33, 65),
        case(dtype, "grouped_down_off_tiles", grouped(&[16, 15, 17, 0], 0, None), 129, 63),
        case(dtype, "grouped_tiles_64_128", grouped(&[64, 1], 0, None), 129, 128),
        case(dtype, "grouped_m65_k127", grouped(&[32, 33], 0, None), 64, 127),
        case(dtype, "grouped_rows_past_end", grouped(&[2, 3, 1], 4, None), 31, 32),
        case(dtype, "grouped_one_group_m100", grouped(&[100], 0, None), 48, 96),
        // Groups of 127, 128 and 129 rows, one of 129, dense 257: the 128-row tensor-core tiles
        // (CUDA takes them when M > 64 G) with more than one row tile in a group, and a last
        // tile of one row.
        case(dtype, "grouped_m127_128_129", grouped(&[127, 128, 129], 0, None), 24, 40),
        case(dtype, "grouped_one_group_m129", grouped(&[129], 0, None), 40, 48),
        case(dtype, "dense_m257", Layout::Dense { m: 257 }, 24, 40),
        // K >= 1024 with N past 256: f8_e4m3 in DeepSeek's 128x128 blocks, three block rows (the
        // last of 44): decode and tiles.
        case(dtype, "decode_n300_k1024", grouped(&[3, 0, 2], 0, None), 300, 1024),
        // N = 7168 (a down projection at DeepSeek's hidden size); K = 15, 16, 17 with N of 127,
        // 65 and 128; a plan over Kimi K2's 384 experts.
        case(dtype, "decode_n7168_k32", grouped(&[1, 0, 2], 0, None), 7168, 32),
        case(dtype, "dense_m5_n127_k15", Layout::Dense { m: 5 }, 127, 15),
        case(dtype, "grouped_n65_k16", grouped(&[9, 0, 8], 0, None), 65, 16),
        case(dtype, "grouped_n128_k17", grouped(&[70, 3], 0, None), 128, 17),
        case(dtype, "gather_t2_e384_k8", Layout::Planned { tokens: 2, experts: 384, top_k: 8 }, 32, 64),
        case(dtype, "prefill_n260_k1024", grouped(&[70], 0, None), 260, 1024),
        case(dtype, "grouped_e64_two_used", grouped(&sparse, 0, None), 32, 64),
        case(dtype, "grouped_m0", grouped(&[0, 0, 0], 0, None), 16, 16),
        case(dtype, "gather_gate_up", Layout::Planned { tokens: 13, experts: 16, top_k: 3 }, 66, 129),
        case(dtype, "gather_t1_e256_k8", Layout::Planned { tokens: 1, experts: 256, top_k: 8 }, 32, 64),
        // Decode with odd N and K % 8 == 0: f8_e4m3 in 5x12 blocks, whose 8-wide vectors straddle
        // two scale blocks.
        case(dtype, "gather_t2_e16_n33_k64", Layout::Planned { tokens: 2, experts: 16, top_k: 4 }, 33, 64),
        case(dtype, "gather_repeated_rows_past_end", grouped(&[3, 0, 4], 2, Some(5)), 17, 33),
        case(dtype, "gather_k7168", grouped(&[2, 0, 3], 0, Some(4)), 17, 7168),
        // Few rows per expert on average (the decode path), but experts of 5 to 12 rows: more
        // than one pass of a decode kernel's token rows, and partial passes.
        case(dtype, "gather_decode_rows_1_to_12", grouped(&DECODE_ROWS_1_TO_12, 0, Some(40)), 33, 64),
        // NaN activations stay NaN on every path: dense (split on tensor cores), decode, prefill.
        case(dtype, "nan_in_x_dense_m70", nan_in_x(Layout::Dense { m: 70 }), 33, 64),
        case(dtype, "nan_in_x_decode", nan_in_x(Layout::Planned { tokens: 3, experts: 16, top_k: 4 }), 32, 64),
        case(dtype, "nan_in_x_prefill", nan_in_x(grouped(&[40, 0, 30], 0, None)), 33, 64),
    ]
    .into_iter()
    .chain((dtype == DType::F8E4M3).then(|| [every_byte_case(1, 64), every_byte_case(64, 4)]).into_iter().flatten())
    .collect()
}

/// Rows and columns of each expert's weight in [`every_byte`]: rows 0..4 hold the 254 numbers,
/// row 4 the NaNs.
const BYTES_N: usize = 5;
const BYTES_K: usize = 64;

/// Byte `(row, col)` of expert `g` in [`every_byte`]. In rows 0..4 each expert holds every
/// number (position `4 * ((col + 2g) % 64) + row`, wrapping past 254), and the diagonal `col = g`
/// of experts 0..64 holds every number too. Row 4 is a NaN (0x7F or 0xFF by `g`'s parity) at
/// `col = g % 64` and numbers elsewhere.
fn every_byte_at(g: usize, row: usize, col: usize) -> u8 {
    let numbers: Vec<u8> = (0..=255u8).filter(|&b| !moe_hal::fp8::is_nan(b)).collect();
    if row == BYTES_N - 1 {
        return if col == g % BYTES_K { [0x7F, 0xFF][g % 2] } else { numbers[(col * 7 + g) % numbers.len()] };
    }
    numbers[(4 * ((col + 2 * g) % BYTES_K) + row) % numbers.len()]
}

/// Every F8E4M3 byte through `grouped_gemm`, compared bit for bit: `experts` experts of
/// `[5, 64]` bytes (`every_byte_at`) in 2x16 blocks scaled by powers of two (2^-3 .. 2^3, so
/// every product is exact in f32, f16 and bf16), `rows` rows per expert, row `j` of expert `g`
/// one-hot at column `(g + j) % 64`. So `y[row, n]` is one weight, times its scale: with one row
/// per expert (the decode path) over 64 experts, the diagonal; with 64 rows per expert (the
/// prefill path), every byte of each expert. Row 4 of each expert holds a NaN, so its column of
/// `y` is NaN throughout (NaN * 0 is NaN), as the oracle's is.
pub fn every_byte<B: Backend>(b: &B, rows: usize, experts: usize) -> CaseResult {
    let (n, k) = (BYTES_N, BYTES_K);
    let block = [2, 16];
    let q: Vec<u8> = (0..experts * n * k).map(|i| every_byte_at(i / (n * k), i / k % n, i % k)).collect();
    let grid = moe_hal::fp8::scale_shape(&[experts, n, k], block);
    let scales: Vec<f32> = (0..grid.iter().product()).map(|i| 2f32.powi((i % 7) as i32 - 3)).collect();
    // A struct literal: HostTensor::fp8 refuses NaN bytes, and NaN weights must still propagate.
    let host = HostTensor {
        dtype: DType::F8E4M3,
        shape: vec![experts, n, k],
        data: q,
        scales: Some(Box::new(BlockScales {
            block,
            tensor: HostTensor::new(DType::F32, &grid, scales.iter().flat_map(|v| v.to_le_bytes()).collect()).ctx("scales")?,
        })),
    };
    let m = rows * experts;
    let mut x = vec![0.0f32; m * k];
    for r in 0..m {
        x[r * k + (r / rows + r % rows) % k] = 1.0;
    }
    let offsets: Vec<u32> = (0..=experts).map(|g| (g * rows) as u32).collect();
    let want =
        oracle::grouped_gemm(&oracle::widen(&x), k, None, &oracle::decode_tensor(&host), n, Some(&offsets), m).map_err(Fail::Wrong)?;
    let wt = Tensor::from_host(b, &host).ctx("uploading weights")?;
    let mut y = poisoned_f32(b, &[m, n])?;
    ops::grouped_gemm(b, &f32_tensor(b, &[m, k], &x)?, None, &wt, Some(&u32_tensor(b, &[experts + 1], &offsets)?), &mut y)
        .ctx("grouped_gemm")?;
    close("y", &read_f32(b, &y)?, &want, 0.0)
}

fn every_byte_case<B: Backend>(rows: usize, experts: usize) -> Case<B> {
    let path = if rows == 1 { "decode" } else { "prefill" };
    let shape = format!("M={} N={BYTES_N} K={BYTES_K} rows/group {rows} x {experts} groups, exact", rows * experts);
    Case::new(group(DType::F8E4M3), &format!("every_byte_{path}"), Op::GroupedGemm, Some(DType::F8E4M3), shape, move |b: &B| {
        every_byte(b, rows, experts)
    })
}

/// The grouped_gemm_swiglu cases for one weight dtype (`N` below is `2I`, the weight rows per
/// expert; a backend pairing gate and up columns must get every boundary right).
pub fn swiglu_cases_for<B: Backend>(dtype: DType) -> Vec<Case<B>> {
    let grouped = |sizes: &[usize], tail: usize, gather: Option<usize>| Layout::Grouped { sizes: sizes.to_vec(), tail, gather };
    let c = |name: &str, layout: Layout, n: usize, k: usize| op_case(Op::GroupedGemmSwiglu, dtype, name, layout, n, k);
    vec![
        c("dense_shared_m33", Layout::Dense { m: 33 }, 2 * 63, 129),
        c("dense_decode_m1", Layout::Dense { m: 1 }, 2 * 129, 64),
        c("dense_m0", Layout::Dense { m: 0 }, 8, 16),
        c("decode_t1_e256_k8", Layout::Planned { tokens: 1, experts: 256, top_k: 8 }, 2 * 24, 64),
        c("decode_t3_e16_k4_odd_k", Layout::Planned { tokens: 3, experts: 16, top_k: 4 }, 2 * 33, 71),
        c("prefill_off_tiles", grouped(&[65, 0, 17, 1, 130], 0, None), 2 * 65, 63),
        c("prefill_gather", Layout::Planned { tokens: 40, experts: 8, top_k: 2 }, 2 * 40, 128),
        c("prefill_m129_one_group", grouped(&[129], 0, None), 2 * 24, 40),
        c("decode_k_eq_e", Layout::Planned { tokens: 3, experts: 4, top_k: 4 }, 2 * 17, 24),
        c("decode_i150_k1024", Layout::Planned { tokens: 2, experts: 8, top_k: 2 }, 2 * 150, 1024),
        c("rows_past_end", grouped(&[2, 3, 1], 4, None), 2 * 7, 32),
        c("gather_rows_past_end", grouped(&[3, 0, 9], 2, Some(5)), 2 * 9, 33),
        c("grouped_m0", grouped(&[0, 0, 0], 0, None), 16, 16),
        c("i1_k7168", grouped(&[2, 0, 7], 0, Some(4)), 2, 7168),
        c("decode_rows_1_to_12_odd_k", grouped(&DECODE_ROWS_1_TO_12, 0, Some(40)), 2 * 33, 71),
        c("nan_in_x_decode", nan_in_x(Layout::Planned { tokens: 3, experts: 16, top_k: 4 }), 2 * 24, 64),
        c("nan_in_x_prefill", nan_in_x(Layout::Planned { tokens: 40, experts: 8, top_k: 2 }), 2 * 40, 128),
    ]
}

/// Every case of this group, for every backend.
pub fn cases<B: Backend>() -> Vec<Case<B>> {
    DType::WEIGHTS.iter().flat_map(|&d| cases_for(d)).collect()
}

/// Every grouped_gemm_swiglu case, for every backend.
pub fn swiglu_cases<B: Backend>() -> Vec<Case<B>> {
    DType::WEIGHTS.iter().flat_map(|&d| swiglu_cases_for(d)).collect()
}
