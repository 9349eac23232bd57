//! Every kernel family against `moe-cpu`, on each backend that can be opened here: the GPU
//! (`CudaBackend::new`), and the CPU emulator of the kernels (`MOE_CUDA_EMULATOR`, or built by
//! `emu/build.sh` on the spot where g++ 12+ is installed). With neither, each test prints why and
//! passes, unless `MOE_REQUIRE_BACKENDS` names `cuda` (then a missing GPU fails).
//!
//! The conformance suite covers the ops through the automatic kernel choice; these tests force
//! each `grouped_gemm` family ([`GemmPath`]) on shapes that reach every variant (tensor cores with
//! 64- and 128-row tiles, split and not, vector and element loads; FMA tiles for every dtype;
//! streaming with one, two and four rows per warp), each plain and with the fused SwiGLU epilogue
//! (`grouped_gemm_swiglu`), for every weight dtype (F8E4M3 in scale blocks that make each kernel
//! take one scale per run and walk the scales, see [`FP8_BLOCKS`]), and the router's global-scratch
//! path (E = 20000).

use crate::{CudaBackend, GemmPath};
use moe_cpu::CpuBackend;
use moe_hal::{Backend, DType, HostTensor, Routing, Tensor, ops};

fn required() -> bool {
    std::env::var("MOE_REQUIRE_BACKENDS").is_ok_and(|v| v.split(',').any(|n| n.trim() == "cuda"))
}

/// The backends to test: the GPU where there is one, and the emulator where it can be built.
pub(super) fn backends() -> Vec<(&'static str, CudaBackend)> {
    let mut out = Vec::new();
    match CudaBackend::new() {
        Ok(b) => out.push(("gpu", b)),
        Err(e) if required() => panic!("MOE_REQUIRE_BACKENDS names cuda but it is unavailable: {e}"),
        Err(e) => println!("no GPU: {e}"),
    }
    match CudaBackend::emulator() {
        Ok(b) => out.push(("emulator", b)),
        Err(e) => println!("{e}"),
    }
    if out.is_empty() {
        println!("skipping: no CUDA device and no emulator");
    }
    out
}

/// A small deterministic generator (no dependency): values in [-1, 1).
pub(super) struct Lcg(pub(super) u64);

impl Lcg {
    fn f32(&mut self) -> f32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub(super) fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.f32()).collect()
    }
    fn below(&mut self, n: u32) -> u32 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((self.0 >> 33) % n as u64) as u32
    }
}

fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

/// One grouped_gemm problem.
struct Gemm {
    name: &'static str,
    /// Rows per group (`None`: a dense GEMM of `dense_rows` rows).
    sizes: Option<Vec<usize>>,
    dense_rows: usize,
    /// Rows of y past the last offset (written as zero).
    tail: usize,
    /// Gather from this many x rows.
    gather: Option<usize>,
    n: usize,
    k: usize,
}

/// F8E4M3 scale blocks: 16 x 32 (every run of 16, 8 or 4 inside one block), 5 x 12 (gemv's and
/// mma's 16-byte runs cross blocks: the walk; simt's runs of 4 do not), 3 x 7 (every run walks),
/// 128 x 128 (wider and taller than the small cases: one block per matrix, clamped).
const FP8_BLOCKS: [[usize; 2]; 4] = [[16, 32], [5, 12], [3, 7], [128, 128]];

/// Runs `case` on `b` and on the CPU backend with the same inputs (with `swiglu`, as
/// `grouped_gemm_swiglu` over `2 ceil(n / 2)` weight rows; F8E4M3 weights quantized in `block`s);
/// returns the relative L2 error.
fn run_gemm(b: &CudaBackend, case: &Gemm, dtype: DType, block: [usize; 2], seed: u64, swiglu: bool) -> f64 {
    let n = if swiglu { case.n.div_ceil(2) * 2 } else { case.n };
    let width = if swiglu { n / 2 } else { n };
    let cpu = CpuBackend::new();
    let mut rng = Lcg(seed);
    let (g, offsets, m) = match &case.sizes {
        Some(sizes) => {
            let mut off = vec![0u32];
            for s in sizes {
                off.push(off.last().unwrap() + *s as u32);
            }
            let m = *off.last().unwrap() as usize + case.tail;
            (sizes.len(), Some(off), m)
        }
        None => (1, None, case.dense_rows),
    };
    let mx = case.gather.unwrap_or(m);
    let x = rng.vec(mx * case.k);
    let w_shape: Vec<usize> = if offsets.is_some() { vec![g, n, case.k] } else { vec![n, case.k] };
    let w = rng.vec(w_shape.iter().product());
    let ti: Option<Vec<u32>> = case.gather.map(|mx| (0..m).map(|_| rng.below(mx as u32)).collect());

    #[allow(clippy::too_many_arguments)]
    fn run<B: Backend>(
        be: &B,
        x: &[f32],
        xs: [usize; 2],
        w: &[f32],
        ws: &[usize],
        dtype: DType,
        block: [usize; 2],
        off: Option<&[u32]>,
        ti: Option<&[u32]>,
        y: [usize; 2],
        swiglu: bool,
    ) -> Vec<f32> {
        let xt = Tensor::from_f32(be, DType::F32, &xs, x).unwrap();
        let wt = match dtype {
            DType::F8E4M3 => Tensor::from_host(be, &HostTensor::quantize(ws, w, block).unwrap()).unwrap(),
            _ => Tensor::from_f32(be, dtype, ws, w).unwrap(),
        };
        let ot = off.map(|o| Tensor::from_u32(be, &[o.len()], o).unwrap());
        let tt = ti.map(|t| Tensor::from_u32(be, &[t.len()], t).unwrap());
        let mut yt = Tensor::from_f32(be, DType::F32, &y, &vec![f32::NAN; y[0] * y[1]]).unwrap();
        if swiglu {
            ops::grouped_gemm_swiglu(be, &xt, tt.as_ref(), &wt, ot.as_ref(), &mut yt).unwrap();
        } else {
            ops::grouped_gemm(be, &xt, tt.as_ref(), &wt, ot.as_ref(), &mut yt).unwrap();
        }
        yt.to_f32(be).unwrap()
    }
    let got = run(b, &x, [mx, case.k], &w, &w_shape, dtype, block, offsets.as_deref(), ti.as_deref(), [m, width], swiglu);
    let want = run(&cpu, &x, [mx, case.k], &w, &w_shape, dtype, block, offsets.as_deref(), ti.as_deref(), [m, width], swiglu);
    if let Some(off) = &offsets {
        let end = *off.last().unwrap() as usize * width;
        assert!(got[end..].iter().all(|v| *v == 0.0), "{}: rows past the last offset are not zero", case.name);
    }
    rel_l2(&got, &want)
}

fn gemm_cases() -> Vec<Gemm> {
    vec![
        // Three experts (one empty), a gather, a tail, N off the 128-column tile, K % 8 == 0.
        Gemm { name: "grouped_gather_tail", sizes: Some(vec![5, 0, 70]), dense_rows: 0, tail: 3, gather: Some(20), n: 130, k: 40 },
        // More than 64 rows per expert (128-row tiles), K % 8 != 0 (element loads).
        Gemm { name: "grouped_m128_k37", sizes: Some(vec![100, 60]), dense_rows: 0, tail: 0, gather: None, n: 70, k: 37 },
        // Dense (the router, the shared expert): split activations on the tensor cores.
        Gemm { name: "dense_m150", sizes: None, dense_rows: 150, tail: 0, gather: None, n: 33, k: 40 },
        Gemm { name: "dense_m20_k37", sizes: None, dense_rows: 20, tail: 0, gather: None, n: 33, k: 37 },
        // Dense, 128-row tiles with element loads (mma_split_*_m128_any).
        Gemm { name: "dense_m150_k37", sizes: None, dense_rows: 150, tail: 0, gather: None, n: 33, k: 37 },
        // Decode-like: one row in most experts.
        Gemm { name: "decode", sizes: Some(vec![1, 0, 1, 2, 0, 1]), dense_rows: 0, tail: 1, gather: Some(3), n: 70, k: 64 },
        // K % 16 == 0 on the tensor cores (F8E4M3's 16-byte loads), with a gather and a tail.
        Gemm { name: "grouped_k48", sizes: Some(vec![70, 3]), dense_rows: 0, tail: 2, gather: Some(50), n: 130, k: 48 },
    ]
}

#[test]
fn grouped_gemm_every_kernel_family_matches_the_cpu() {
    let mut failures = Vec::new();
    for (where_, b) in backends() {
        for (pi, path) in [GemmPath::Auto, GemmPath::Gemv, GemmPath::Tiled, GemmPath::Simt].into_iter().enumerate() {
            let b = CudaBackend { gemm_path: path, info: b.info.clone(), dev: b.dev.clone(), forward_graphs: None };
            for (dtype, swiglu) in DType::WEIGHTS.into_iter().flat_map(|d| [(d, false), (d, true)]) {
                for (i, case) in gemm_cases().iter().enumerate() {
                    // Each path sees every F8E4M3 block over the cases.
                    let block = FP8_BLOCKS[(i + pi) % FP8_BLOCKS.len()];
                    let err = run_gemm(&b, case, dtype, block, 1000 + i as u64, swiglu);
                    // The conformance tolerances per op; f32-accurate paths must do far better.
                    // F8E4M3 weights are exact on the FMA paths (gemv, simt: q * scale in f32, as
                    // the CPU), and rounded to bf16 on the tensor cores, split or not.
                    let fma = path == GemmPath::Simt || path == GemmPath::Gemv;
                    let split_or_f32 = dtype == DType::F32 || (case.sizes.is_none() && dtype != DType::F8E4M3) || fma;
                    let tol = if split_or_f32 {
                        2e-5
                    } else if dtype == DType::F16 {
                        3e-3
                    } else {
                        1e-2
                    };
                    let op = if swiglu { "grouped_gemm_swiglu" } else { "grouped_gemm" };
                    let blk = if dtype == DType::F8E4M3 { format!(" {}x{} blocks", block[0], block[1]) } else { String::new() };
                    let line = format!("{where_} {path:?} {op} {dtype} {}{blk}: rel err {err:.2e} (tolerance {tol:.0e})", case.name);
                    println!("{line}");
                    if err.is_nan() || err > tol {
                        failures.push(line);
                    }
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn route_on<B: Backend>(
    be: &B,
    logits: &[f32],
    bias: Option<&Vec<f32>>,
    routing: &Routing,
    t: usize,
    e: usize,
    k: usize,
) -> (Vec<u32>, Vec<f32>) {
    let l = Tensor::from_f32(be, DType::F32, &[t, e], logits).unwrap();
    let bt = bias.map(|v| Tensor::from_f32(be, DType::F32, &[e], v).unwrap());
    let mut ids = Tensor::from_u32(be, &[t, k], &vec![u32::MAX; t * k]).unwrap();
    let mut w = Tensor::from_f32(be, DType::F32, &[t, k], &vec![f32::NAN; t * k]).unwrap();
    ops::router_topk(be, &l, bt.as_ref(), routing, &mut ids, &mut w).unwrap();
    (ids.to_u32(be).unwrap(), w.to_f32(be).unwrap())
}

#[test]
fn router_with_many_experts_uses_global_scratch_and_matches_the_cpu() {
    for (where_, b) in backends() {
        let cpu = CpuBackend::new();
        for (e, routing, k, t) in [
            (
                20000usize,
                Routing::SigmoidGrouped { n_group: 4, topk_group: 2, norm_topk_prob: true, routed_scaling_factor: 2.5 },
                8usize,
                3usize,
            ),
            (384, Routing::SigmoidGrouped { n_group: 1, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 2.827 }, 8, 5),
            (384, Routing::Softmax { norm_topk_prob: true }, 8, 5),
        ] {
            let mut rng = Lcg(7 + e as u64);
            let logits: Vec<f32> = rng.vec(t * e).iter().map(|v| v * 4.0).collect();
            let bias = matches!(routing, Routing::SigmoidGrouped { .. }).then(|| rng.vec(e).iter().map(|v| v * 0.1).collect::<Vec<f32>>());
            let gpu = route_on(&b, &logits, bias.as_ref(), &routing, t, e, k);
            let host = route_on(&cpu, &logits, bias.as_ref(), &routing, t, e, k);
            assert_eq!(gpu.0, host.0, "{where_} E={e} {routing:?}: ids");
            let err = rel_l2(&gpu.1, &host.1);
            println!("{where_} router E={e} {routing:?}: ids equal, weights rel err {err:.2e}");
            assert!(err < 1e-5, "{where_} E={e}: weights rel err {err}");
        }
    }
}

fn permute_on<B: Backend>(be: &B, ids: &[u32], t: usize, k: usize, e: usize) -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let it = Tensor::from_u32(be, &[t, k], ids).unwrap();
    let mut off = Tensor::from_u32(be, &[e + 1], &vec![u32::MAX; e + 1]).unwrap();
    let mut ri = Tensor::from_u32(be, &[t * k], &vec![u32::MAX; t * k]).unwrap();
    let mut ti = Tensor::from_u32(be, &[t * k], &vec![u32::MAX; t * k]).unwrap();
    ops::permute(be, &it, &mut off, &mut ri, &mut ti).unwrap();
    (off.to_u32(be).unwrap(), ri.to_u32(be).unwrap(), ti.to_u32(be).unwrap())
}

#[test]
fn permute_over_many_tiles_matches_the_cpu_and_copy_copies() {
    for (where_, b) in backends() {
        let cpu = CpuBackend::new();
        let (t, k, e) = (3000usize, 8usize, 256usize);
        let mut rng = Lcg(99);
        // Skewed: most pairs in a few experts, many experts empty.
        let ids: Vec<u32> = (0..t * k).map(|_| if rng.below(4) == 0 { rng.below(e as u32) } else { rng.below(7) * 3 }).collect();
        assert!(
            permute_on(&b, &ids, t, k, e) == permute_on(&cpu, &ids, t, k, e),
            "{where_}: permute over {} tiles differs from the CPU",
            (t * k).div_ceil(1024)
        );
        let src = Tensor::from_u32(&b, &[t * k], &ids).unwrap();
        let mut dst = Tensor::from_u32(&b, &[t * k], &vec![0; t * k]).unwrap();
        b.copy(&src.buf, &mut dst.buf).unwrap();
        assert_eq!(dst.to_u32(&b).unwrap(), ids, "{where_}: copy");
        println!("{where_}: permute of {} pairs and copy match the CPU", t * k);
    }
}

/// An upload from page-locked host memory (which the driver copies while the call's caller
/// goes on, where pageable memory is staged first) is complete when `upload` returns: the
/// host memory is overwritten at once and the device still holds what was uploaded. GPU only
/// (the emulator copies synchronously).
#[test]
fn an_upload_from_page_locked_memory_is_complete_when_it_returns() {
    use cudarc::driver::sys;
    for (where_, b) in backends().into_iter().filter(|(w, _)| *w == "gpu") {
        let n = 64 << 20; // 256 MiB of f32: a copy that takes milliseconds
        // Raw bytes, uploaded as they are (Tensor::from_f32 would copy them first).
        let mut host: Vec<u8> = (0..n as u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        // SAFETY: `host` outlives the registration, undone below.
        let r = unsafe { sys::cuMemHostRegister_v2(host.as_mut_ptr() as *mut std::ffi::c_void, host.len(), 0) };
        assert_eq!(r, sys::CUresult::CUDA_SUCCESS, "{where_}: cuMemHostRegister");
        let t = Tensor::upload(&b, DType::F32, &[n], &host).unwrap();
        host.iter_mut().for_each(|v| *v = 0xFF);
        // SAFETY: registered above.
        unsafe { sys::cuMemHostUnregister(host.as_mut_ptr() as *mut std::ffi::c_void) };
        let back = t.to_f32(&b).unwrap();
        assert!(back.iter().enumerate().all(|(i, v)| *v == i as f32), "{where_}: the upload saw host memory changed after it returned");
    }
}
