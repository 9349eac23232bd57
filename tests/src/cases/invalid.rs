//! Bad input for every op: wrong shapes and dtypes must be [`moe_hal::Error::InvalidArgument`]
//! from [`moe_hal::ops`]; data-dependent bad input a kernel can only see on the device (an expert
//! id out of range, offsets that are not cumulative, a gather or row index out of range) must be
//! `InvalidArgument` from the op or, at the latest, from the next [`Backend::synchronize`] — and
//! the backend must work normally afterwards (each such case then runs a valid op and checks it).

use super::forward::random_layer;
use super::grouped_gemm::{Layout, check_gemm};
use crate::check::*;
use crate::rng::Rng;
use crate::runner::Case;
use moe_hal::{Backend, DType, Layer, MoeConfig, Op, Routing, Tensor, ops};

/// A tensor of `dtype` and `shape` holding harmless valid-looking data (0.5 for floats, 0 for u32;
/// F8E4M3 with valid 128x128 block scales).
fn filled<B: Backend>(b: &B, dtype: DType, shape: &[usize]) -> Result<Tensor<B>, Fail> {
    let n: usize = shape.iter().product();
    match dtype {
        DType::U32 => Tensor::upload(b, dtype, shape, &vec![0u8; n * 4]),
        d => Tensor::from_f32(b, d, shape, &vec![0.5; n]),
    }
    .ctx("uploading an input")
}

type Spec = (DType, &'static [usize]);

/// A tensor allocated for `real` whose (public) shape was then set to the larger `claimed`: a
/// hand-made `Tensor` whose shape its buffer cannot hold. Fails when the backend does not say
/// how large its buffers are ([`Backend::buffer_bytes`]), since then `moe_hal::ops` cannot refuse
/// such a tensor and the kernel would run past the end of the buffer.
fn outgrown<B: Backend>(b: &B, dtype: DType, real: &[usize], claimed: &[usize]) -> Result<Tensor<B>, Fail> {
    let mut t = filled(b, dtype, real)?;
    if b.buffer_bytes(&t.buf).is_none() {
        return wrong!(
            "Backend::buffer_bytes returns None, so moe_hal::ops cannot refuse a tensor whose shape is larger than its \
             buffer: implement it (PORTING.md, step 1)"
        );
    }
    t.shape = claimed.to_vec();
    Ok(t)
}

// ---------------------------------------------------------------------------------------------
// router_topk
// ---------------------------------------------------------------------------------------------

fn router_bad<B: Backend>(name: &str, routing: Routing, logits: Spec, bias: Option<Spec>, ids: Spec, w: Spec) -> Case<B> {
    let shape =
        format!("logits {:?} ids {:?} weights {:?}{}", logits.1, ids.1, w.1, bias.map_or(String::new(), |b| format!(" bias {:?}", b.1)));
    Case::new("router_topk_f32_invalid", name, Op::RouterTopk, None, shape, move |b: &B| {
        let l = filled(b, logits.0, logits.1)?;
        let bt = bias.map(|s| filled(b, s.0, s.1)).transpose()?;
        let mut i = filled(b, ids.0, ids.1)?;
        let mut wt = filled(b, w.0, w.1)?;
        expect_invalid("router_topk", ops::router_topk(b, &l, bt.as_ref(), &routing, &mut i, &mut wt))
    })
}

/// The bad-input cases of `router_topk`: each must be an `InvalidArgument`, never a panic.
pub fn router_topk<B: Backend>() -> Vec<Case<B>> {
    use DType::*;
    let sm = Routing::Softmax { norm_topk_prob: true };
    let grouped =
        |n_group, topk_group, scale| Routing::SigmoidGrouped { n_group, topk_group, norm_topk_prob: true, routed_scaling_factor: scale };
    vec![
        router_bad("k_gt_e", sm, (F32, &[2, 4]), None, (U32, &[2, 5]), (F32, &[2, 5])),
        router_bad("k_zero", sm, (F32, &[2, 4]), None, (U32, &[2, 0]), (F32, &[2, 0])),
        router_bad("logits_f16", sm, (F16, &[2, 4]), None, (U32, &[2, 2]), (F32, &[2, 2])),
        router_bad("logits_vector", sm, (F32, &[8]), None, (U32, &[2, 2]), (F32, &[2, 2])),
        router_bad("ids_f32", sm, (F32, &[2, 4]), None, (F32, &[2, 2]), (F32, &[2, 2])),
        router_bad("ids_rows", sm, (F32, &[2, 4]), None, (U32, &[3, 2]), (F32, &[2, 2])),
        router_bad("weights_shape", sm, (F32, &[2, 4]), None, (U32, &[2, 2]), (F32, &[2, 3])),
        router_bad("weights_u32", sm, (F32, &[2, 4]), None, (U32, &[2, 2]), (U32, &[2, 2])),
        router_bad("softmax_with_bias", sm, (F32, &[2, 4]), Some((F32, &[4])), (U32, &[2, 2]), (F32, &[2, 2])),
        router_bad("bias_length", grouped(2, 1, 1.0), (F32, &[2, 4]), Some((F32, &[3])), (U32, &[2, 2]), (F32, &[2, 2])),
        router_bad("bias_f16", grouped(2, 1, 1.0), (F32, &[2, 4]), Some((F16, &[4])), (U32, &[2, 2]), (F32, &[2, 2])),
        router_bad("n_group_not_dividing_e", grouped(4, 2, 1.0), (F32, &[2, 10]), None, (U32, &[2, 2]), (F32, &[2, 2])),
        router_bad("n_group_zero", grouped(0, 0, 1.0), (F32, &[2, 8]), None, (U32, &[2, 2]), (F32, &[2, 2])),
        router_bad("topk_group_gt_n_group", grouped(2, 3, 1.0), (F32, &[2, 8]), None, (U32, &[2, 2]), (F32, &[2, 2])),
        router_bad("k_gt_kept_groups", grouped(4, 1, 1.0), (F32, &[2, 16]), None, (U32, &[2, 5]), (F32, &[2, 5])),
        router_bad("scaling_nan", grouped(1, 1, f32::NAN), (F32, &[2, 8]), None, (U32, &[2, 2]), (F32, &[2, 2])),
    ]
}

// ---------------------------------------------------------------------------------------------
// permute
// ---------------------------------------------------------------------------------------------

fn permute_bad<B: Backend>(name: &str, ids: Spec, offsets: Spec, rows: Spec, tokens: Spec) -> Case<B> {
    let shape = format!("ids {:?} offsets {:?} row_index {:?} token_index {:?}", ids.1, offsets.1, rows.1, tokens.1);
    Case::new("permute_u32_invalid", name, Op::Permute, None, shape, move |b: &B| {
        let i = filled(b, ids.0, ids.1)?;
        let mut o = filled(b, offsets.0, offsets.1)?;
        let mut r = filled(b, rows.0, rows.1)?;
        let mut t = filled(b, tokens.0, tokens.1)?;
        expect_invalid("permute", ops::permute(b, &i, &mut o, &mut r, &mut t))
    })
}

/// An id `>= E` in device data: InvalidArgument now or at the next synchronize, then recovery.
fn permute_bad_id<B: Backend>(name: &str, bad: u32) -> Case<B> {
    Case::new("permute_u32_invalid", name, Op::Permute, None, format!("T=4 E=8 k=2 one id = {bad:#x}"), move |b: &B| {
        let (t, e, k) = (4, 8, 2);
        let mut ids = super::random_ids(&mut Rng::from_name("permute_u32_invalid"), t, e, k);
        ids[5] = bad;
        let it = u32_tensor(b, &[t, k], &ids)?;
        let mut off = poisoned_u32(b, &[e + 1])?;
        let mut ri = poisoned_u32(b, &[t * k])?;
        let mut ti = poisoned_u32(b, &[t * k])?;
        let r = ops::permute(b, &it, &mut off, &mut ri, &mut ti);
        expect_invalid_deferred("permute with an id out of range", b, r)?;
        b.synchronize().ctx("synchronize after the reported error")?;
        let ids = super::random_ids(&mut Rng::from_name("permute_u32_invalid/recover"), t, e, k);
        super::permute::check_permute(b, t, k, e, &ids).map_err(|f| match f {
            Fail::Wrong(m) => Fail::Wrong(format!("a valid permute after the error: {m}")),
            f => f,
        })
    })
    .exclusive()
}

/// The bad-input cases of `permute`: each must be an `InvalidArgument`, never a panic.
pub fn permute<B: Backend>() -> Vec<Case<B>> {
    use DType::*;
    vec![
        permute_bad_id("id_eq_e", 8),
        permute_bad_id("id_u32_max", u32::MAX),
        permute_bad("k_gt_e", (U32, &[2, 5]), (U32, &[5]), (U32, &[10]), (U32, &[10])),
        permute_bad("no_experts", (U32, &[2, 1]), (U32, &[1]), (U32, &[2]), (U32, &[2])),
        permute_bad("ids_f32", (F32, &[2, 2]), (U32, &[5]), (U32, &[4]), (U32, &[4])),
        permute_bad("ids_vector", (U32, &[4]), (U32, &[5]), (U32, &[4]), (U32, &[4])),
        permute_bad("offsets_f32", (U32, &[2, 2]), (F32, &[5]), (U32, &[4]), (U32, &[4])),
        permute_bad("row_index_length", (U32, &[2, 2]), (U32, &[5]), (U32, &[5]), (U32, &[4])),
        permute_bad("token_index_f32", (U32, &[2, 2]), (U32, &[5]), (U32, &[4]), (F32, &[4])),
    ]
}

// ---------------------------------------------------------------------------------------------
// grouped_gemm
// ---------------------------------------------------------------------------------------------

const GEMM: &str = "grouped_gemm_f32_invalid";

fn gemm_bad<B: Backend>(name: &str, x: Spec, gather: Option<Spec>, w: Spec, offsets: Option<Spec>, y: Spec) -> Case<B> {
    let shape = format!(
        "x {:?} w {} {:?} y {:?}{}{}",
        x.1,
        w.0,
        w.1,
        y.1,
        offsets.map_or(String::new(), |o| format!(" offsets {:?}", o.1)),
        gather.map_or(String::new(), |g| format!(" gather {:?}", g.1))
    );
    Case::new(GEMM, name, Op::GroupedGemm, Some(DType::F32), shape, move |b: &B| {
        let xt = filled(b, x.0, x.1)?;
        let gt = gather.map(|s| filled(b, s.0, s.1)).transpose()?;
        let wt = filled(b, w.0, w.1)?;
        let ot = offsets.map(|s| filled(b, s.0, s.1)).transpose()?;
        let mut yt = filled(b, y.0, y.1)?;
        expect_invalid("grouped_gemm", ops::grouped_gemm(b, &xt, gt.as_ref(), &wt, ot.as_ref(), &mut yt))
    })
}

/// Bad offsets or gather index in device data, to `op` (`grouped_gemm` or its fused form) with
/// `m` rows and weights in `dtype`: InvalidArgument now or at the next synchronize, then a valid
/// call of the same op must work. `m = 8` over 2 or 3 groups reaches the decode kernels, `m = 40`
/// the tiled ones (tensor cores for f16/bf16 where a backend has them): every kernel family must
/// survive bad data without an out-of-bounds access. With `bad_gather`, the last row's gather
/// index is past the rows of x.
fn gemm_bad_data<B: Backend>(op: Op, name: &str, dtype: DType, m: usize, offsets: &'static [u32], bad_gather: bool) -> Case<B> {
    let swiglu = op == Op::GroupedGemmSwiglu;
    let group = if swiglu { SWIGLU } else { GEMM };
    // n: weight rows per group (2I when fused); the output has n or n / 2 columns.
    let (g, n, k) = (offsets.len() - 1, if swiglu { 8 } else { 4 }, 16);
    let mx = if bad_gather { m / 2 } else { m };
    let gather: Option<Vec<u32>> = bad_gather.then(|| (0..m).map(|r| if r + 1 == m { (mx + 7) as u32 } else { (r % mx) as u32 }).collect());
    let shape = format!(
        "M={m} N={n} K={k} offsets {offsets:?}{}",
        if bad_gather { format!(" gather from {mx}, last index {}", mx + 7) } else { String::new() }
    );
    Case::new(group, name, op, Some(dtype), shape, move |b: &B| {
        let mut rng = Rng::from_name(&format!("{group}/data"));
        let xt = f32_tensor(b, &[mx, k], &rng.vec_f32(mx * k, 1.0))?;
        let (wt, _) = weight_tensor(b, dtype, &[g, n, k], &rng.vec_f32(g * n * k, 0.25))?;
        let ot = u32_tensor(b, &[g + 1], offsets)?;
        let tt = gather.as_ref().map(|t| u32_tensor(b, &[m], t)).transpose()?;
        let mut y = poisoned_f32(b, &[m, if swiglu { n / 2 } else { n }])?;
        let r = if swiglu {
            ops::grouped_gemm_swiglu(b, &xt, tt.as_ref(), &wt, Some(&ot), &mut y)
        } else {
            ops::grouped_gemm(b, &xt, tt.as_ref(), &wt, Some(&ot), &mut y)
        };
        expect_invalid_deferred(&format!("{op} with bad offsets or gather index"), b, r)?;
        b.synchronize().ctx("synchronize after the reported error")?;
        let valid = Layout::Grouped { sizes: vec![3, 0, 5], tail: 0, gather: Some(4) };
        let seed = format!("{group}/recover");
        check_gemm(b, op, DType::F32, &valid, n, k, &seed).map_err(|f| match f {
            Fail::Wrong(m) => Fail::Wrong(format!("a valid {op} after the error: {m}")),
            f => f,
        })
    })
    .exclusive()
}

/// The bad-input cases of `grouped_gemm`: each must be an `InvalidArgument`, never a panic.
pub fn grouped_gemm<B: Backend>() -> Vec<Case<B>> {
    use DType::*;
    vec![
        gemm_bad_data(Op::GroupedGemm, "offsets_decreasing", F32, 8, &[0, 5, 3, 8], false),
        gemm_bad_data(Op::GroupedGemm, "offsets_past_m", F32, 8, &[0, 4, 9], false),
        gemm_bad_data(Op::GroupedGemm, "offsets_not_from_zero", F32, 8, &[2, 4, 8], false),
        gemm_bad_data(Op::GroupedGemm, "gather_index_out_of_range", F32, 8, &[0, 3, 8], true),
        gemm_bad_data(Op::GroupedGemm, "tiled_offsets_decreasing_bf16", BF16, 40, &[0, 25, 13, 40], false),
        gemm_bad_data(Op::GroupedGemm, "tiled_offsets_past_m_bf16", BF16, 40, &[0, 20, 45], false),
        gemm_bad_data(Op::GroupedGemm, "tiled_offsets_not_from_zero_f16", F16, 40, &[3, 20, 40], false),
        gemm_bad_data(Op::GroupedGemm, "tiled_gather_index_out_of_range_bf16", BF16, 40, &[0, 15, 40], true),
        gemm_bad_data(Op::GroupedGemm, "tiled_gather_index_out_of_range_f32", F32, 40, &[0, 15, 40], true),
        gemm_bad("k_mismatch", (F32, &[4, 8]), None, (F32, &[2, 16, 9]), Some((U32, &[3])), (F32, &[4, 16])),
        gemm_bad("y_columns", (F32, &[4, 8]), None, (F32, &[2, 16, 8]), Some((U32, &[3])), (F32, &[4, 17])),
        gemm_bad("y_rows", (F32, &[4, 8]), None, (F32, &[16, 8]), None, (F32, &[5, 16])),
        gemm_bad("y_rows_with_gather", (F32, &[4, 8]), Some((U32, &[6])), (F32, &[2, 16, 8]), Some((U32, &[3])), (F32, &[4, 16])),
        gemm_bad("w_u32", (F32, &[4, 8]), None, (U32, &[16, 8]), None, (F32, &[4, 16])),
        gemm_bad("x_f16", (F16, &[4, 8]), None, (F16, &[16, 8]), None, (F32, &[4, 16])),
        gemm_bad("y_bf16", (F32, &[4, 8]), None, (BF16, &[16, 8]), None, (BF16, &[4, 16])),
        gemm_bad("offsets_length", (F32, &[4, 8]), None, (F32, &[2, 16, 8]), Some((U32, &[2])), (F32, &[4, 16])),
        gemm_bad("offsets_f32", (F32, &[4, 8]), None, (F32, &[2, 16, 8]), Some((F32, &[3])), (F32, &[4, 16])),
        gemm_bad("grouped_w_without_offsets", (F32, &[4, 8]), None, (F32, &[2, 16, 8]), None, (F32, &[4, 16])),
        gemm_bad("dense_w_with_offsets", (F32, &[4, 8]), None, (F32, &[16, 8]), Some((U32, &[2])), (F32, &[4, 16])),
        gemm_bad("gather_f32", (F32, &[4, 8]), Some((F32, &[4])), (F32, &[2, 16, 8]), Some((U32, &[3])), (F32, &[4, 16])),
        gemm_bad("x_vector", (F32, &[32]), None, (F32, &[16, 8]), None, (F32, &[4, 16])),
        Case::new(GEMM, "w_larger_than_its_buffer", Op::GroupedGemm, Some(F32), "w [2, 16, 8] claiming [2, 16, 800]", |b: &B| {
            let xt = filled(b, F32, &[4, 800])?;
            let wt = outgrown(b, F32, &[2, 16, 8], &[2, 16, 800])?;
            let ot = Tensor::from_u32(b, &[3], &[0, 2, 4]).ctx("uploading an input")?;
            let mut yt = filled(b, F32, &[4, 16])?;
            expect_invalid("grouped_gemm", ops::grouped_gemm(b, &xt, None, &wt, Some(&ot), &mut yt))
        }),
        gemm_bad_data(Op::GroupedGemm, "offsets_past_m_f8", F8E4M3, 8, &[0, 4, 9], false),
        gemm_bad_data(Op::GroupedGemm, "tiled_gather_index_out_of_range_f8", F8E4M3, 40, &[0, 15, 40], true),
        scales_bad("f8_without_scales", "f8_e4m3 w [2, 16, 8] with its scales removed", |b, w| {
            w.scales = None;
            let _ = b;
            Ok(())
        }),
        scales_bad("f8_scales_shape", "f8_e4m3 w [2, 16, 8] in 8x8 blocks, scales [2, 2, 2]", |b, w| {
            let s = w.scales.as_mut().expect("f8 weights have scales");
            s.block = [8, 8];
            s.tensor = filled(b, F32, &[2, 2, 2])?;
            Ok(())
        }),
        scales_bad("f8_scales_f16", "f8_e4m3 w [2, 16, 8] with f16 scales", |b, w| {
            let s = w.scales.as_mut().expect("f8 weights have scales");
            s.tensor = filled(b, F16, &[2, 1, 1])?;
            Ok(())
        }),
        scales_bad("f8_zero_block", "f8_e4m3 w [2, 16, 8] in 0x128 blocks", |_, w| {
            w.scales.as_mut().expect("f8 weights have scales").block = [0, 128];
            Ok(())
        }),
        scales_bad("bf16_with_scales", "bf16 w [2, 16, 8] carrying block scales", |b, w| {
            let scales = w.scales.take();
            *w = filled(b, BF16, &[2, 16, 8])?;
            w.scales = scales;
            Ok(())
        }),
    ]
}

/// `grouped_gemm` on f8_e4m3 weights `[2, 16, 8]` whose block scales `edit` broke.
fn scales_bad<B: Backend>(name: &str, what: &str, edit: fn(&B, &mut Tensor<B>) -> Result<(), Fail>) -> Case<B> {
    Case::new(GEMM, name, Op::GroupedGemm, Some(DType::F32), what.to_string(), move |b: &B| {
        let xt = filled(b, DType::F32, &[4, 8])?;
        let mut wt = filled(b, DType::F8E4M3, &[2, 16, 8])?;
        edit(b, &mut wt)?;
        let ot = Tensor::from_u32(b, &[3], &[0, 2, 4]).ctx("uploading an input")?;
        let mut yt = filled(b, DType::F32, &[4, 16])?;
        expect_invalid("grouped_gemm", ops::grouped_gemm(b, &xt, None, &wt, Some(&ot), &mut yt))
    })
}

// ---------------------------------------------------------------------------------------------
// grouped_gemm_swiglu
// ---------------------------------------------------------------------------------------------

const SWIGLU: &str = "grouped_gemm_swiglu_f32_invalid";

fn swiglu_bad<B: Backend>(name: &str, x: Spec, w: Spec, offsets: Option<Spec>, h: Spec) -> Case<B> {
    let shape = format!("x {:?} w {:?} h {:?}{}", x.1, w.1, h.1, offsets.map_or(String::new(), |o| format!(" offsets {:?}", o.1)));
    Case::new(SWIGLU, name, Op::GroupedGemmSwiglu, Some(DType::F32), shape, move |b: &B| {
        let xt = filled(b, x.0, x.1)?;
        let wt = filled(b, w.0, w.1)?;
        let ot = offsets.map(|s| filled(b, s.0, s.1)).transpose()?;
        let mut ht = filled(b, h.0, h.1)?;
        expect_invalid("grouped_gemm_swiglu", ops::grouped_gemm_swiglu(b, &xt, None, &wt, ot.as_ref(), &mut ht))
    })
}

/// The bad-input cases of `grouped_gemm_swiglu`: each must be an `InvalidArgument`, never a panic.
pub fn grouped_gemm_swiglu<B: Backend>() -> Vec<Case<B>> {
    use DType::*;
    vec![
        gemm_bad_data(Op::GroupedGemmSwiglu, "offsets_past_m", F32, 8, &[0, 4, 9], false),
        gemm_bad_data(Op::GroupedGemmSwiglu, "gather_index_out_of_range", F32, 8, &[0, 3, 8], true),
        gemm_bad_data(Op::GroupedGemmSwiglu, "tiled_offsets_past_m_bf16", BF16, 40, &[0, 20, 45], false),
        gemm_bad_data(Op::GroupedGemmSwiglu, "tiled_gather_index_out_of_range_bf16", BF16, 40, &[0, 15, 40], true),
        gemm_bad_data(Op::GroupedGemmSwiglu, "gather_index_out_of_range_f8", F8E4M3, 8, &[0, 3, 8], true),
        swiglu_bad("odd_weight_rows", (F32, &[4, 8]), (F32, &[2, 15, 8]), Some((U32, &[3])), (F32, &[4, 7])),
        swiglu_bad("h_is_2i_wide", (F32, &[4, 8]), (F32, &[2, 16, 8]), Some((U32, &[3])), (F32, &[4, 16])),
        swiglu_bad("h_rows", (F32, &[4, 8]), (F32, &[16, 8]), None, (F32, &[5, 8])),
        swiglu_bad("k_mismatch", (F32, &[4, 8]), (F32, &[16, 9]), None, (F32, &[4, 8])),
        swiglu_bad("h_bf16", (F32, &[4, 8]), (BF16, &[16, 8]), None, (BF16, &[4, 8])),
    ]
}

// ---------------------------------------------------------------------------------------------
// activation
// ---------------------------------------------------------------------------------------------

fn activation_bad<B: Backend>(name: &str, gate_up: Spec, h: Spec) -> Case<B> {
    Case::new(
        "activation_f32_invalid",
        name,
        Op::Activation,
        None,
        format!("gate_up {} {:?} h {} {:?}", gate_up.0, gate_up.1, h.0, h.1),
        move |b: &B| {
            let gu = filled(b, gate_up.0, gate_up.1)?;
            let mut ht = filled(b, h.0, h.1)?;
            expect_invalid("activation", ops::activation(b, &gu, &mut ht))
        },
    )
}

/// The bad-input cases of `activation`: each must be an `InvalidArgument`, never a panic.
pub fn activation<B: Backend>() -> Vec<Case<B>> {
    use DType::*;
    vec![
        activation_bad("odd_columns", (F32, &[4, 7]), (F32, &[4, 3])),
        activation_bad("h_columns", (F32, &[4, 8]), (F32, &[4, 5])),
        activation_bad("h_rows", (F32, &[4, 8]), (F32, &[3, 4])),
        activation_bad("gate_up_u32", (U32, &[4, 8]), (F32, &[4, 4])),
        activation_bad("h_f16", (F32, &[4, 8]), (F16, &[4, 4])),
        activation_bad("gate_up_3d", (F32, &[2, 2, 8]), (F32, &[4, 4])),
        Case::new(
            "activation_f32_invalid",
            "gate_up_larger_than_its_buffer",
            Op::Activation,
            None,
            "gate_up [4, 8] claiming [4096, 8]",
            |b: &B| {
                let gu = outgrown(b, DType::F32, &[4, 8], &[4096, 8])?;
                let mut h = filled(b, DType::F32, &[4096, 4])?;
                expect_invalid("activation", ops::activation(b, &gu, &mut h))
            },
        ),
        Case::new("activation_f32_invalid", "h_larger_than_its_buffer", Op::Activation, None, "h [1, 4] claiming [4096, 4]", |b: &B| {
            let gu = filled(b, DType::F32, &[4096, 8])?;
            let mut h = outgrown(b, DType::F32, &[1, 4], &[4096, 4])?;
            expect_invalid("activation", ops::activation(b, &gu, &mut h))
        }),
        Case::new("activation_f32_invalid", "h_smaller_than_its_buffer", Op::Activation, None, "h [6, 4] claiming [3, 4]", |b: &B| {
            let gu = filled(b, DType::F32, &[3, 8])?;
            let mut h = filled(b, DType::F32, &[6, 4])?;
            h.shape = vec![3, 4];
            expect_invalid("activation", ops::activation(b, &gu, &mut h))
        }),
        Case::new(
            "activation_f32_invalid",
            "shape_overflowing_usize",
            Op::Activation,
            None,
            "Tensor::alloc of [usize::MAX / 2, 8]",
            |b: &B| expect_invalid("Tensor::alloc", Tensor::alloc(b, DType::F32, &[usize::MAX / 2, 8]).map(|_| ())),
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// combine
// ---------------------------------------------------------------------------------------------

fn combine_bad<B: Backend>(name: &str, y: Spec, rows: Spec, w: Spec, shared: Option<Spec>, out: Spec) -> Case<B> {
    let shape = format!(
        "y {:?} row_index {:?} weights {:?} out {:?}{}",
        y.1,
        rows.1,
        w.1,
        out.1,
        shared.map_or(String::new(), |s| format!(" shared {:?}", s.1))
    );
    Case::new("combine_f32_invalid", name, Op::Combine, None, shape, move |b: &B| {
        let yt = filled(b, y.0, y.1)?;
        let rt = filled(b, rows.0, rows.1)?;
        let wt = filled(b, w.0, w.1)?;
        let st = shared.map(|s| filled(b, s.0, s.1)).transpose()?;
        let mut ot = filled(b, out.0, out.1)?;
        expect_invalid("combine", ops::combine(b, &yt, &rt, &wt, st.as_ref(), &mut ot))
    })
}

/// The bad-input cases of `combine`: each must be an `InvalidArgument`, never a panic.
pub fn combine<B: Backend>() -> Vec<Case<B>> {
    use DType::*;
    let bad_row =
        Case::new("combine_f32_invalid", "row_index_out_of_range", Op::Combine, None, "T=3 k=2 H=8 one row index = 6", |b: &B| {
            let (t, k, h) = (3, 2, 8);
            let mut rng = Rng::from_name("combine_f32_invalid/data");
            let yt = f32_tensor(b, &[t * k, h], &rng.vec_f32(t * k * h, 1.0))?;
            let rt = u32_tensor(b, &[t * k], &[0, 1, 2, 6, 4, 5])?;
            let wt = f32_tensor(b, &[t, k], &rng.vec_f32(t * k, 1.0))?;
            let mut out = poisoned_f32(b, &[t, h])?;
            let r = ops::combine(b, &yt, &rt, &wt, None, &mut out);
            expect_invalid_deferred("combine with a row index out of range", b, r)?;
            b.synchronize().ctx("synchronize after the reported error")?;
            super::combine::check_combine(b, t, 4, k, h, true, "combine_f32_invalid/recover").map_err(|f| match f {
                Fail::Wrong(m) => Fail::Wrong(format!("a valid combine after the error: {m}")),
                f => f,
            })
        })
        .exclusive();
    vec![
        bad_row,
        combine_bad("y_rows", (F32, &[7, 8]), (U32, &[6]), (F32, &[3, 2]), None, (F32, &[3, 8])),
        combine_bad("row_index_length", (F32, &[6, 8]), (U32, &[5]), (F32, &[3, 2]), None, (F32, &[3, 8])),
        combine_bad("row_index_f32", (F32, &[6, 8]), (F32, &[6]), (F32, &[3, 2]), None, (F32, &[3, 8])),
        combine_bad("weights_u32", (F32, &[6, 8]), (U32, &[6]), (U32, &[3, 2]), None, (F32, &[3, 8])),
        combine_bad("shared_shape", (F32, &[6, 8]), (U32, &[6]), (F32, &[3, 2]), Some((F32, &[3, 9])), (F32, &[3, 8])),
        combine_bad("out_shape", (F32, &[6, 8]), (U32, &[6]), (F32, &[3, 2]), None, (F32, &[3, 9])),
        combine_bad("out_bf16", (F32, &[6, 8]), (U32, &[6]), (F32, &[3, 2]), None, (BF16, &[3, 8])),
    ]
}

// ---------------------------------------------------------------------------------------------
// forward and Layer::upload
// ---------------------------------------------------------------------------------------------

const FWD: &str = "forward_f32_invalid";

fn small_config() -> MoeConfig {
    MoeConfig {
        hidden: 16,
        intermediate: 8,
        experts: 4,
        top_k: 2,
        routing: Routing::Softmax { norm_topk_prob: true },
        shared_intermediate: 8,
    }
}

/// `ops::forward` with one argument's dtype or shape wrong.
fn forward_bad<B: Backend>(name: &str, x: Spec, out: Spec, ids: Spec, w: Spec) -> Case<B> {
    let shape = format!("H=16 E=4 k=2; x {:?} out {:?} ids {} {:?} weights {} {:?}", x.1, out.1, ids.0, ids.1, w.0, w.1);
    Case::new(FWD, name, Op::Forward, Some(DType::F32), shape, move |b: &B| {
        let host = random_layer(&small_config(), false, DType::F32, DType::F32, &mut Rng::from_name(FWD));
        let layer = Layer::upload(b, &host).ctx("Layer::upload of a valid layer")?;
        let xt = filled(b, x.0, x.1)?;
        let mut ot = filled(b, out.0, out.1)?;
        let mut it = filled(b, ids.0, ids.1)?;
        let mut wt = filled(b, w.0, w.1)?;
        expect_invalid("forward", ops::forward(b, &layer, &xt, &mut ot, &mut it, &mut wt))
    })
}

/// `Layer::upload` of a host layer that `edit` broke.
fn upload_bad<B: Backend>(name: &str, what: &str, edit: fn(&mut moe_hal::HostLayer)) -> Case<B> {
    Case::new(FWD, name, Op::Forward, Some(DType::F32), what.to_string(), move |b: &B| {
        let mut host = random_layer(&small_config(), false, DType::F32, DType::F32, &mut Rng::from_name(FWD));
        edit(&mut host);
        expect_invalid("Layer::upload", Layer::upload(b, &host).map(|_| ()))
    })
}

/// The bad-input cases of `forward`: each must be an `InvalidArgument`, never a panic.
pub fn forward<B: Backend>() -> Vec<Case<B>> {
    use DType::*;
    let hand_assembled = Case::new(FWD, "hand_assembled_bad_down", Op::Forward, Some(F32), "Layer with down [E, H, I+1]", |b: &B| {
        let host = random_layer(&small_config(), false, F32, F32, &mut Rng::from_name(FWD));
        let mut layer = Layer::upload(b, &host).ctx("Layer::upload of a valid layer")?;
        layer.down = filled(b, F32, &[4, 16, 9])?;
        let xt = filled(b, F32, &[3, 16])?;
        let (mut o, mut i, mut w) = (filled(b, F32, &[3, 16])?, filled(b, U32, &[3, 2])?, filled(b, F32, &[3, 2])?);
        expect_invalid("forward", ops::forward(b, &layer, &xt, &mut o, &mut i, &mut w))
    });
    let hand_assembled_dtype =
        Case::new(FWD, "hand_assembled_mixed_dtype", Op::Forward, Some(F32), "Layer f32 with gate_up in bf16", |b: &B| {
            let host = random_layer(&small_config(), false, F32, F32, &mut Rng::from_name(FWD));
            let mut layer = Layer::upload(b, &host).ctx("Layer::upload of a valid layer")?;
            layer.gate_up = filled(b, BF16, &[4, 16, 16])?;
            let xt = filled(b, F32, &[3, 16])?;
            let (mut o, mut i, mut w) = (filled(b, F32, &[3, 16])?, filled(b, U32, &[3, 2])?, filled(b, F32, &[3, 2])?);
            expect_invalid("forward", ops::forward(b, &layer, &xt, &mut o, &mut i, &mut w))
        });
    let down_outgrown = Case::new(
        FWD,
        "hand_assembled_down_larger_than_its_buffer",
        Op::Forward,
        Some(F32),
        "down [1, 16, 8] claiming [4, 16, 8]",
        |b: &B| {
            let host = random_layer(&small_config(), false, F32, F32, &mut Rng::from_name(FWD));
            let mut layer = Layer::upload(b, &host).ctx("Layer::upload of a valid layer")?;
            layer.down = outgrown(b, F32, &[1, 16, 8], &[4, 16, 8])?;
            let xt = filled(b, F32, &[3, 16])?;
            let (mut o, mut i, mut w) = (filled(b, F32, &[3, 16])?, filled(b, U32, &[3, 2])?, filled(b, F32, &[3, 2])?);
            expect_invalid("forward", ops::forward(b, &layer, &xt, &mut o, &mut i, &mut w))
        },
    );
    let out_outgrown = Case::new(FWD, "output_larger_than_its_buffer", Op::Forward, Some(F32), "out [1, 16] claiming [3, 16]", |b: &B| {
        let host = random_layer(&small_config(), false, F32, F32, &mut Rng::from_name(FWD));
        let layer = Layer::upload(b, &host).ctx("Layer::upload of a valid layer")?;
        let xt = filled(b, F32, &[3, 16])?;
        let mut o = outgrown(b, F32, &[1, 16], &[3, 16])?;
        let (mut i, mut w) = (filled(b, U32, &[3, 2])?, filled(b, F32, &[3, 2])?);
        expect_invalid("forward", ops::forward(b, &layer, &xt, &mut o, &mut i, &mut w))
    });
    vec![
        down_outgrown,
        out_outgrown,
        forward_bad("x_hidden", (F32, &[3, 17]), (F32, &[3, 16]), (U32, &[3, 2]), (F32, &[3, 2])),
        forward_bad("x_f16", (F16, &[3, 16]), (F32, &[3, 16]), (U32, &[3, 2]), (F32, &[3, 2])),
        forward_bad("out_shape", (F32, &[3, 16]), (F32, &[2, 16]), (U32, &[3, 2]), (F32, &[3, 2])),
        forward_bad("ids_k", (F32, &[3, 16]), (F32, &[3, 16]), (U32, &[3, 3]), (F32, &[3, 2])),
        forward_bad("ids_f32", (F32, &[3, 16]), (F32, &[3, 16]), (F32, &[3, 2]), (F32, &[3, 2])),
        forward_bad("weights_u32", (F32, &[3, 16]), (F32, &[3, 16]), (U32, &[3, 2]), (U32, &[3, 2])),
        hand_assembled,
        hand_assembled_dtype,
        upload_bad("upload_gate_up_shape", "gate_up [E, 2I+1, H]", |l| {
            l.gate_up = moe_hal::HostTensor::from_f32(F32, &[4, 17, 16], &vec![0.5; 4 * 17 * 16]).unwrap();
        }),
        upload_bad("upload_k_gt_e", "top_k = E + 1", |l| l.config.top_k = 5),
        upload_bad("upload_softmax_with_bias", "softmax routing + bias", |l| {
            l.bias = Some(moe_hal::HostTensor::from_f32(F32, &[4], &[0.1; 4]).unwrap());
        }),
        upload_bad("upload_missing_shared", "shared_intermediate 8 without weights", |l| l.shared_down = None),
        upload_bad("upload_router_u32", "router stored as u32", |l| {
            l.router = moe_hal::HostTensor::new(U32, &[4, 16], vec![0; 256]).unwrap();
        }),
        upload_bad("upload_router_shape", "router [E, H + 1]", |l| {
            l.router = moe_hal::HostTensor::from_f32(F32, &[4, 17], &vec![0.5; 68]).unwrap();
        }),
        upload_bad("upload_truncated_bytes", "down holds one byte too few", |l| {
            l.down.data.pop();
        }),
        upload_bad("upload_f8_router", "router quantized to f8_e4m3", |l| {
            l.router = moe_hal::HostTensor::from_f32(F8E4M3, &[4, 16], &vec![0.5; 64]).unwrap();
        }),
        upload_bad("upload_f8_without_scales", "f8_e4m3 layer whose down weights lost their scales", |l| {
            *l = l.to_fp8([4, 8]).unwrap();
            l.down.scales = None;
        }),
        upload_bad("upload_k_gt_kept_groups", "sigmoid g4/1 with E=4 k=2", |l| {
            l.config.routing = Routing::SigmoidGrouped { n_group: 4, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 1.0 };
        }),
    ]
}
