//! Every op against `moe-cpu` on random data with shapes off tile boundaries, every dtype, whole
//! layers, split weights, and the data-dependent errors. Runs on whatever adapter `new` finds
//! (lavapipe in CI); without one the tests fail, so a missing driver is not mistaken for a pass.

use moe_cpu::CpuBackend;
use moe_hal::{Backend, BlockScales, DType, Error, HostLayer, HostTensor, Layer, MoeConfig, Routing, Tensor, ops};

use crate::WgpuBackend;
use crate::buffer::{padded, plan};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n).map(|_| self.f32() * scale).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn gpu() -> WgpuBackend {
    WgpuBackend::new().expect("no wgpu adapter: these tests need one (lavapipe: mesa-vulkan-drivers)")
}

/// The adapter without its tensor cores: every product in f32, for the tests that need exactness.
fn scalar() -> WgpuBackend {
    gpu().with_tensor_cores(false)
}

/// Relative L2 error a whole layer or a GEMM may have with weights in `dtype` on `b`: f32
/// products everywhere except grouped GEMMs on tensor cores, which round x to f16 (~2^-11).
fn tolerance(b: &WgpuBackend, dtype: DType, f32_tol: f32) -> f32 {
    if b.tensor_cores().is_some() && dtype != DType::F32 { 2e-3 } else { f32_tol }
}

fn rel_l2(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let num: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    assert!(a.iter().all(|v| v.is_finite()), "non-finite output");
    (num.sqrt() / den.sqrt().max(1e-30)) as f32
}

fn f32s<B: Backend>(b: &B, dtype: DType, shape: &[usize], v: &[f32]) -> Tensor<B> {
    Tensor::from_f32(b, dtype, shape, v).unwrap()
}

fn u32s<B: Backend>(b: &B, shape: &[usize], v: &[u32]) -> Tensor<B> {
    Tensor::from_u32(b, shape, v).unwrap()
}

/// A tensor filled with NaN bytes, so an unwritten element shows.
fn poisoned<B: Backend>(b: &B, dtype: DType, shape: &[usize]) -> Tensor<B> {
    let n: usize = shape.iter().product();
    Tensor::upload(b, dtype, shape, &vec![0xffu8; n * dtype.size()]).unwrap()
}

#[test]
fn tensor_cores_in_use_where_required() {
    // scripts/lavapipe-coop.sh sets this on a lavapipe with cooperative matrices, so that its run
    // cannot pass on the FMA kernels alone: 1 for any size, 8 or 16 for that size.
    if let Ok(v) = std::env::var("MOE_REQUIRE_TENSOR_CORES") {
        let b = gpu();
        let want: u32 = v.trim().parse().expect("MOE_REQUIRE_TENSOR_CORES is 1, 8 or 16");
        let got = b.tensor_cores();
        assert!(
            got.is_some_and(|s| want == 1 || s == want),
            "MOE_REQUIRE_TENSOR_CORES={want} but {} uses {got:?}: {:?}",
            b.info().device,
            b.info().features
        );
    }
}

#[test]
fn buffer_plan_splits_on_expert_then_row_boundaries() {
    assert_eq!(plan(DType::F32, &[4, 3, 5], 1024).unwrap(), vec![(0, 240)]);
    assert_eq!(plan(DType::F32, &[4, 3, 5], 128).unwrap(), vec![(0, 120), (120, 120)]);
    assert_eq!(plan(DType::F32, &[2, 3, 5], 48).unwrap(), vec![(0, 40), (40, 40), (80, 40)]);
    assert_eq!(plan(DType::BF16, &[0, 7], 16).unwrap(), vec![(0, 0)]);
    assert!(plan(DType::F32, &[100], 64).is_err());
    assert_eq!(padded(0), 16);
    assert_eq!(padded(17), 32);
}

/// WebGPU's default limits run every kernel; GL ES 3.1's minimums (4 storage buffers, 128
/// invocations) make the backend unavailable with a sentence, not fail at every op.
#[test]
fn adapters_below_the_kernels_limits_are_refused() {
    crate::device::check_limits("default", &wgpu::Limits::default()).unwrap();
    let gles = wgpu::Limits { max_storage_buffers_per_shader_stage: 4, ..wgpu::Limits::default() };
    let e = crate::device::check_limits("a GL ES adapter", &gles).unwrap_err();
    assert!(e.contains("a GL ES adapter allows 4 storage buffers per kernel; the kernels need 7"), "{e}");
    let small = wgpu::Limits { max_compute_invocations_per_workgroup: 128, ..wgpu::Limits::default() };
    assert!(crate::device::check_limits("x", &small).unwrap_err().contains("128 invocations"));
}

#[test]
fn info_and_round_trip() {
    let b = gpu();
    let i = b.info();
    eprintln!("{i:?}");
    assert_eq!(i.name, "wgpu");
    assert!(i.memory_bytes > 0 && i.max_buffer_bytes > 0);
    if i.device.contains("llvmpipe") {
        assert!(i.features.iter().any(|f| f == "software-adapter"));
        // Its memory is the host's: a layer uploaded to it is counted twice (Layer::upload).
        assert!(i.shares_host_memory);
    }
    if i.device.contains("NVIDIA") {
        assert!(!i.shares_host_memory, "a discrete GPU's memory is its own");
    }
    assert!(crate::available().is_ok());
    // The Vulkan heap query (used for memory_bytes on GPUs) works on this adapter too.
    let (_, adapter) = crate::device::best_adapter().unwrap();
    if adapter.get_info().backend == wgpu::Backend::Vulkan {
        let heap = crate::device::vulkan_device_local_bytes(&adapter);
        eprintln!("largest device-local Vulkan heap: {heap:?}");
        assert!(heap.is_some_and(|h| h > 0));
    }
    for (dtype, n) in [(DType::F16, 7usize), (DType::BF16, 1), (DType::F32, 0), (DType::U32, 5)] {
        let bytes: Vec<u8> = (0..n * dtype.size()).map(|i| i as u8 ^ 0x5a).collect();
        let t = Tensor::upload(&b, dtype, &[n], &bytes).unwrap();
        assert_eq!(t.to_bytes(&b).unwrap(), bytes);
    }
    let t = Tensor::alloc(&b, DType::F32, &[0, 3]).unwrap();
    assert!(t.to_bytes(&b).unwrap().is_empty());
}

#[allow(clippy::too_many_arguments)]
fn check_routing(b: &WgpuBackend, cpu: &CpuBackend, t: usize, e: usize, k: usize, routing: Routing, logits: &[f32], bias: Option<&[f32]>) {
    let g = {
        let l = f32s(b, DType::F32, &[t, e], logits);
        let bi = bias.map(|v| f32s(b, DType::F32, &[e], v));
        let mut ids = poisoned(b, DType::U32, &[t, k]);
        let mut w = poisoned(b, DType::F32, &[t, k]);
        ops::router_topk(b, &l, bi.as_ref(), &routing, &mut ids, &mut w).unwrap();
        (ids.to_u32(b).unwrap(), w.to_f32(b).unwrap())
    };
    let c = {
        let l = f32s(cpu, DType::F32, &[t, e], logits);
        let bi = bias.map(|v| f32s(cpu, DType::F32, &[e], v));
        let mut ids = Tensor::alloc(cpu, DType::U32, &[t, k]).unwrap();
        let mut w = Tensor::alloc(cpu, DType::F32, &[t, k]).unwrap();
        ops::router_topk(cpu, &l, bi.as_ref(), &routing, &mut ids, &mut w).unwrap();
        (ids.to_u32(cpu).unwrap(), w.to_f32(cpu).unwrap())
    };
    assert_eq!(g.0, c.0, "ids differ: t {t} e {e} k {k} {routing:?}");
    for (x, y) in g.1.iter().zip(&c.1) {
        let ok = (x.is_nan() && y.is_nan()) || (x - y).abs() <= 1e-5 * y.abs().max(1e-3);
        assert!(ok, "weights differ: {x} vs {y} (t {t} e {e} k {k} {routing:?})");
    }
}

#[test]
fn router_topk_matches_host() {
    let b = gpu();
    let cpu = CpuBackend::new();
    let mut r = Rng(7);
    let softmax = Routing::Softmax { norm_topk_prob: true };
    for (t, e, k) in [(1, 1, 1), (7, 8, 2), (33, 16, 16), (5, 129, 7), (3, 384, 8), (2, 384, 384)] {
        let l = r.vec(t * e, 4.0);
        check_routing(&b, &cpu, t, e, k, softmax, &l, None);
        check_routing(&b, &cpu, t, e, k, Routing::Softmax { norm_topk_prob: false }, &l, None);
    }
    // DeepSeek-V3-like and Kimi-K2-like grouped sigmoid routing, and odd groupings.
    for (t, e, k, ng, tg) in [(9, 256, 8, 8, 4), (3, 384, 8, 1, 1), (5, 12, 3, 4, 2), (4, 6, 2, 6, 3), (2, 16, 16, 4, 4)] {
        let l = r.vec(t * e, 3.0);
        let bias = r.vec(e, 0.5);
        let routing = Routing::SigmoidGrouped { n_group: ng, topk_group: tg, norm_topk_prob: true, routed_scaling_factor: 2.5 };
        check_routing(&b, &cpu, t, e, k, routing, &l, Some(&bias));
        let routing = Routing::SigmoidGrouped { n_group: ng, topk_group: tg, norm_topk_prob: false, routed_scaling_factor: 1.0 };
        check_routing(&b, &cpu, t, e, k, routing, &l, None);
    }
    // Ties go to the lower index; NaN ranks below everything; -0 equals +0.
    let l = vec![1.0, 3.0, 3.0, f32::NAN, 3.0, -0.0, 0.0, 2.0];
    check_routing(
        &b,
        &cpu,
        1,
        8,
        4,
        Routing::SigmoidGrouped { n_group: 2, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 1.0 },
        &l,
        None,
    );
    check_routing(
        &b,
        &cpu,
        1,
        8,
        8,
        Routing::SigmoidGrouped { n_group: 4, topk_group: 4, norm_topk_prob: false, routed_scaling_factor: 1.0 },
        &l,
        None,
    );
    let l = vec![0.5, 2.0, 2.0, -1.0, 2.0, 0.0, 0.0, 1.0];
    check_routing(&b, &cpu, 1, 8, 5, softmax, &l, None);
    let l = vec![0.5, f32::NAN, 2.0, -1.0];
    check_routing(&b, &cpu, 1, 4, 3, softmax, &l, None);
}

fn permute_on<B: Backend>(b: &B, t: usize, k: usize, e: usize, ids: &[u32]) -> moe_hal::Result<(Vec<u32>, Vec<u32>, Vec<u32>)> {
    let idt = u32s(b, &[t, k], ids);
    let mut off = poisoned(b, DType::U32, &[e + 1]);
    let mut ri = poisoned(b, DType::U32, &[t * k]);
    let mut ti = poisoned(b, DType::U32, &[t * k]);
    ops::permute(b, &idt, &mut off, &mut ri, &mut ti)?;
    b.synchronize()?;
    Ok((off.to_u32(b)?, ri.to_u32(b)?, ti.to_u32(b)?))
}

#[test]
fn permute_matches_host_and_flags_bad_ids() {
    let b = gpu();
    let cpu = CpuBackend::new();
    let mut r = Rng(11);
    for (t, k, e) in [(0, 2, 4), (1, 1, 1), (7, 2, 16), (33, 8, 8), (129, 3, 384), (300, 4, 5), (1000, 8, 256)] {
        // Distinct experts per token (as routing gives), some experts idle.
        let used = (e / 2).max(k);
        let mut ids = Vec::with_capacity(t * k);
        for _ in 0..t {
            let mut row: Vec<u32> = Vec::new();
            while row.len() < k {
                let c = r.below(used) as u32;
                if !row.contains(&c) {
                    row.push(c);
                }
            }
            ids.extend(row);
        }
        assert_eq!(permute_on(&b, t, k, e, &ids).unwrap(), permute_on(&cpu, t, k, e, &ids).unwrap(), "t {t} k {k} e {e}");
    }
    // k = E: every token picks every expert.
    let ids: Vec<u32> = (0..5).flat_map(|_| (0..6u32).rev()).collect();
    assert_eq!(permute_on(&b, 5, 6, 6, &ids).unwrap(), permute_on(&cpu, 5, 6, 6, &ids).unwrap());
    // An id >= E is an InvalidArgument at the next blocking call, and the flag is then cleared.
    let err = permute_on(&b, 2, 2, 16, &[1, 3, 99, 2]).unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(m) if m.contains(">= 16")), "{err}");
    b.synchronize().unwrap();
}

#[allow(clippy::too_many_arguments)]
fn gemm_on<B: Backend>(
    b: &B,
    dtype: DType,
    x: &[f32],
    mx: usize,
    k: usize,
    ti: Option<&[u32]>,
    w: &[f32],
    wshape: &[usize],
    off: Option<&[u32]>,
    m: usize,
    n: usize,
) -> moe_hal::Result<Vec<f32>> {
    let xt = f32s(b, DType::F32, &[mx, k], x);
    let tit = ti.map(|v| u32s(b, &[v.len()], v));
    let wt = f32s(b, dtype, wshape, w);
    let ot = off.map(|v| u32s(b, &[v.len()], v));
    let mut y = poisoned(b, DType::F32, &[m, n]);
    ops::grouped_gemm(b, &xt, tit.as_ref(), &wt, ot.as_ref(), &mut y)?;
    y.to_f32(b)
}

fn random_offsets(r: &mut Rng, g: usize, rows: usize) -> Vec<u32> {
    // Random cumulative offsets over `rows` rows with idle groups.
    let mut cuts: Vec<u32> = (0..g - 1).map(|_| r.below(rows + 1) as u32).collect();
    cuts.sort();
    let mut off = vec![0u32];
    off.extend(cuts);
    off.push(rows as u32);
    if g > 2 {
        off[2] = off[1]; // group 1 idle
    }
    off
}

#[test]
fn grouped_gemm_matches_host() {
    let b = scalar();
    let split = scalar().with_binding_limit(4096);
    let tc = gpu(); // the tensor-core kernel where the adapter has one (else the same as b)
    let cpu = CpuBackend::new();
    let mut r = Rng(3);
    // (M, N, K, G): gemv (M <= 4G) and tiled paths, sizes off 64/16/8/4 boundaries.
    let shapes = [
        (1, 5, 129, 1),
        (3, 8, 64, 1),
        (2, 6, 7, 1),
        (7, 65, 33, 1),
        (33, 64, 128, 1),
        (129, 17, 129, 1),
        (127, 70, 64, 4),
        (129, 33, 7, 3),
        (7, 16, 64, 8),
        (33, 9, 130, 16),
    ];
    for &(m, n, k, g) in &shapes {
        for dtype in DType::WEIGHTS {
            let tol = if dtype == DType::F32 { 1e-5 } else { 1e-5 * 4.0 };
            let tc_tol = tolerance(&tc, dtype, tol);
            let grouped = g > 1 || n % 2 == 1;
            let wshape: Vec<usize> = if grouped { vec![g, n, k] } else { vec![n, k] };
            let w = r.vec(wshape.iter().product(), 1.0);
            // With a gather index (rows read from unsorted x) and without.
            for gather in [false, true] {
                let mx = if gather { m / 2 + 1 } else { m };
                let x = r.vec(mx * k, 1.0);
                let ti: Option<Vec<u32>> = gather.then(|| (0..m).map(|_| r.below(mx) as u32).collect());
                // Offsets ending before M leave zero rows at the end.
                let off = grouped.then(|| random_offsets(&mut r, g, if m > 3 { m - 2 } else { m }));
                let want = gemm_on(&cpu, dtype, &x, mx, k, ti.as_deref(), &w, &wshape, off.as_deref(), m, n).unwrap();
                for (name, be, tol) in [("one binding", &b, tol), ("split", &split, tol), ("tensor cores", &tc, tc_tol)] {
                    let got = gemm_on(be, dtype, &x, mx, k, ti.as_deref(), &w, &wshape, off.as_deref(), m, n).unwrap();
                    let err = rel_l2(&got, &want);
                    assert!(err <= tol, "{name} {dtype} m {m} n {n} k {k} g {g} gather {gather}: rel l2 {err}");
                    if let Some(o) = &off {
                        let end = *o.last().unwrap() as usize;
                        assert!(got[end * n..].iter().all(|v| *v == 0.0), "rows past expert_offsets[G] must be zero");
                    }
                }
            }
        }
    }
    // A plain [N, K] weight split on rows (as a too-large router or shared expert would be), both paths.
    for (m, n, k) in [(2, 37, 24), (70, 37, 21)] {
        for dtype in DType::WEIGHTS {
            let w = r.vec(n * k, 1.0);
            let x = r.vec(m * k, 1.0);
            let want = gemm_on(&cpu, dtype, &x, m, k, None, &w, &[n, k], None, m, n).unwrap();
            // The same bytes (and, for F8E4M3, the same 128x128 block scales) as gemm_on uploads.
            let host = HostTensor::from_f32(dtype, &[n, k], &w).unwrap();
            let wt = Tensor::<WgpuBackend> {
                buf: b.make_buffer_within(dtype, &[n, k], Some(&host.data), 256).unwrap(),
                dtype,
                shape: vec![n, k],
                scales: host.scales.map(|s| Box::new(BlockScales { block: s.block, tensor: Tensor::from_host(&b, &s.tensor).unwrap() })),
            };
            assert!(wt.buf.parts() > 2);
            let mut y = poisoned(&b, DType::F32, &[m, n]);
            ops::grouped_gemm(&b, &f32s(&b, DType::F32, &[m, k], &x), None, &wt, None, &mut y).unwrap();
            let err = rel_l2(&y.to_f32(&b).unwrap(), &want);
            assert!(err < 1e-4, "split [N, K] {dtype} m {m}: rel l2 {err}");
        }
    }
    // The expert cap splits 3-D weights only.
    let wt = f32s(&split, DType::F32, &[4, 70, 64], &vec![0.0; 4 * 70 * 64]);
    assert!(wt.buf.parts() > 4);
    assert_eq!(f32s(&split, DType::F32, &[129, 130], &vec![0.0; 129 * 130]).buf.parts(), 1);
}

/// The vector paths are taken wherever rows are whole vectors: without scales at every
/// multiple of the width (f32, f16 and bf16 never took them while no block was read as a block
/// of one column), and with F8E4M3 blocks of whole 4-element vectors only.
#[test]
fn vector_paths_are_chosen_by_alignment() {
    use crate::ops::vector_path;
    assert!(vector_path(64, 8, None) && vector_path(2048, 4, None) && vector_path(7168, 8, None));
    assert!(!vector_path(60, 8, None) && vector_path(60, 4, None) && !vector_path(63, 4, None));
    assert!(vector_path(7168, 8, Some([128, 128])) && vector_path(64, 8, Some([5, 12])));
    assert!(!vector_path(64, 8, Some([16, 6])) && !vector_path(64, 4, Some([1, 1])));
}

#[test]
fn f16_and_bf16_decode_exactly() {
    // Subnormal, tiny, huge, negative and signed-zero weights; x = one-hot picks each one. (On
    // tensor cores weights become f16: bf16 values outside f16's range do not survive, by design.)
    let b = scalar();
    for (dtype, vals) in [
        (DType::F16, [6.0e-8f32, -6.0e-8, 3.0e-5, -4.0e-6, -2.5, 65504.0, -0.0, 1.0e-3]),
        (DType::BF16, [1.0e-40f32, -6.0e-8, 3.0e-5, 1.0e-30, -2.5, 65504.0, -0.0, 1.5e38]),
    ] {
        let stored = dtype.decode(&dtype.encode(&vals));
        let n = vals.len();
        let mut x = vec![0.0f32; n * n];
        for i in 0..n {
            x[i * n + i] = 1.0;
        }
        // y[i] = x[i] . w[0] = w[0][i].
        let got = gemm_on(&b, dtype, &x, n, n, None, &vals, &[1, n], None, n, 1).unwrap();
        for i in 0..n {
            // An f32 subnormal (bf16 1e-40) may flush to zero in the FMA: devices choose (Mesa
            // 22's lavapipe keeps it, Mesa 26's flushes; WGSL leaves it to them). Every other
            // value, f16 subnormals included (they decode to normal f32), must come out exact.
            let flushed = stored[i].is_subnormal() && got[i] == 0.0;
            assert!(
                flushed || got[i].to_bits() & 0x7fff_ffff == stored[i].to_bits() & 0x7fff_ffff,
                "{dtype} value {} decoded as {}",
                stored[i],
                got[i]
            );
        }
    }
}

#[test]
fn grouped_gemm_flags_bad_offsets_and_indices() {
    let b = gpu();
    let (m, n, k, g) = (6, 4, 8, 3);
    let x = vec![1.0; m * k];
    let w = vec![1.0; g * n * k];
    type Case<'a> = (&'a [u32], Option<&'a [u32]>, &'a str);
    let cases: [Case; 4] = [
        (&[0, 4, 2, 6], None, "cumulative"),
        (&[1, 2, 3, 6], None, "start at 0"),
        (&[0, 2, 4, 9], None, "ends at 9"),
        (&[0, 2, 4, 6], Some(&[0, 1, 2, 3, 4, 77]), "token_index holds 77"),
    ];
    for (off, ti, msg) in cases {
        let err = gemm_on(&b, DType::BF16, &x, m, k, ti, &w, &[g, n, k], Some(off), m, n).unwrap_err();
        assert!(matches!(&err, Error::InvalidArgument(s) if s.contains(msg)), "{msg}: {err}");
    }
    b.synchronize().unwrap();
}

#[test]
fn activation_and_combine_match_host() {
    let b = gpu();
    let cpu = CpuBackend::new();
    let mut r = Rng(5);
    for (m, i) in [(1, 1), (7, 33), (33, 64), (129, 3)] {
        let gu = r.vec(m * 2 * i, 6.0);
        let got = {
            let mut h = poisoned(&b, DType::F32, &[m, i]);
            ops::activation(&b, &f32s(&b, DType::F32, &[m, 2 * i], &gu), &mut h).unwrap();
            h.to_f32(&b).unwrap()
        };
        let mut h = Tensor::alloc(&cpu, DType::F32, &[m, i]).unwrap();
        ops::activation(&cpu, &f32s(&cpu, DType::F32, &[m, 2 * i], &gu), &mut h).unwrap();
        assert!(rel_l2(&got, &h.to_f32(&cpu).unwrap()) < 1e-6, "activation m {m} i {i}");
    }
    for (t, k, h, shared) in [(1, 1, 1, false), (7, 2, 33, true), (33, 8, 64, true), (5, 3, 7, false)] {
        let y = r.vec(t * k * h, 1.0);
        let tw = r.vec(t * k, 1.0);
        let mut ri: Vec<u32> = (0..(t * k) as u32).collect();
        for i in (1..ri.len()).rev() {
            ri.swap(i, r.below(i + 1));
        }
        let sh = r.vec(t * h, 1.0);
        let got = {
            let s = shared.then(|| f32s(&b, DType::F32, &[t, h], &sh));
            let mut out = poisoned(&b, DType::F32, &[t, h]);
            ops::combine(
                &b,
                &f32s(&b, DType::F32, &[t * k, h], &y),
                &u32s(&b, &[t * k], &ri),
                &f32s(&b, DType::F32, &[t, k], &tw),
                s.as_ref(),
                &mut out,
            )
            .unwrap();
            out.to_f32(&b).unwrap()
        };
        let s = shared.then(|| f32s(&cpu, DType::F32, &[t, h], &sh));
        let mut out = Tensor::alloc(&cpu, DType::F32, &[t, h]).unwrap();
        ops::combine(
            &cpu,
            &f32s(&cpu, DType::F32, &[t * k, h], &y),
            &u32s(&cpu, &[t * k], &ri),
            &f32s(&cpu, DType::F32, &[t, k], &tw),
            s.as_ref(),
            &mut out,
        )
        .unwrap();
        assert!(rel_l2(&got, &out.to_f32(&cpu).unwrap()) < 1e-6, "combine t {t} k {k} h {h}");
    }
    // A row_index past the rows of y is flagged, not read.
    let mut out = poisoned(&b, DType::F32, &[1, 4]);
    ops::combine(
        &b,
        &f32s(&b, DType::F32, &[2, 4], &[1.0; 8]),
        &u32s(&b, &[2], &[0, 5]),
        &f32s(&b, DType::F32, &[1, 2], &[1.0, 1.0]),
        None,
        &mut out,
    )
    .unwrap();
    let err = b.synchronize().unwrap_err();
    assert!(matches!(&err, Error::InvalidArgument(s) if s.contains("row_index holds 5")), "{err}");
}

fn random_layer(r: &mut Rng, config: MoeConfig, dtype: DType) -> HostLayer {
    let (h, i, e, s) = (config.hidden, config.intermediate, config.experts, config.shared_intermediate);
    // F8E4M3 in 8x16 blocks, so these small weights hold several (and partial ones).
    let t = |shape: &[usize], scale: f32, r: &mut Rng| {
        let v = r.vec(shape.iter().product(), scale);
        if dtype == DType::F8E4M3 { HostTensor::quantize(shape, &v, [8, 16]) } else { HostTensor::from_f32(dtype, shape, &v) }.unwrap()
    };
    // A router is never F8E4M3 (DeepSeek's FP8 checkpoints keep it in bf16).
    let rd = if dtype == DType::F8E4M3 { DType::BF16 } else { dtype };
    let router = HostTensor::from_f32(rd, &[e, h], &r.vec(e * h, 1.0)).unwrap();
    let gate_up = t(&[e, 2 * i, h], 0.3, r);
    let down = t(&[e, h, i], 0.3, r);
    let bias =
        matches!(config.routing, Routing::SigmoidGrouped { .. }).then(|| HostTensor::from_f32(DType::F32, &[e], &r.vec(e, 0.1)).unwrap());
    let (sgu, sd) = if s > 0 { (Some(t(&[2 * s, h], 0.3, r)), Some(t(&[h, s], 0.3, r))) } else { (None, None) };
    HostLayer { config, dtype, router, bias, gate_up, down, shared_gate_up: sgu, shared_down: sd }
}

fn forward_on<B: Backend>(b: &B, layer: &HostLayer, x: &[f32], t: usize) -> (Vec<f32>, Vec<u32>) {
    let c = &layer.config;
    let l = Layer::upload(b, layer).unwrap();
    let xt = f32s(b, DType::F32, &[t, c.hidden], x);
    let mut out = poisoned(b, DType::F32, &[t, c.hidden]);
    let mut ids = poisoned(b, DType::U32, &[t, c.top_k]);
    let mut w = poisoned(b, DType::F32, &[t, c.top_k]);
    ops::forward(b, &l, &xt, &mut out, &mut ids, &mut w).unwrap();
    (out.to_f32(b).unwrap(), ids.to_u32(b).unwrap())
}

#[test]
fn forward_matches_host() {
    let b = gpu();
    let split = gpu().with_binding_limit(8192);
    let per_op = gpu().with_layer_batching(false);
    let cpu = CpuBackend::new();
    let mut r = Rng(9);
    let deepseek = Routing::SigmoidGrouped { n_group: 4, topk_group: 2, norm_topk_prob: true, routed_scaling_factor: 2.5 };
    let configs = [
        (
            MoeConfig {
                hidden: 64,
                intermediate: 32,
                experts: 8,
                top_k: 2,
                routing: Routing::Softmax { norm_topk_prob: true },
                shared_intermediate: 0,
            },
            7,
        ),
        (MoeConfig { hidden: 72, intermediate: 24, experts: 16, top_k: 4, routing: deepseek, shared_intermediate: 48 }, 33),
        (
            MoeConfig {
                hidden: 33,
                intermediate: 7,
                experts: 6,
                top_k: 6,
                routing: Routing::Softmax { norm_topk_prob: false },
                shared_intermediate: 5,
            },
            3,
        ),
        (MoeConfig { hidden: 64, intermediate: 16, experts: 32, top_k: 8, routing: deepseek, shared_intermediate: 16 }, 1),
    ];
    for (config, t) in configs {
        for dtype in DType::WEIGHTS {
            let layer = random_layer(&mut r, config.clone(), dtype);
            let x = r.vec(t * config.hidden, 1.0);
            let (want, want_ids) = forward_on(&cpu, &layer, &x, t);
            for (name, be) in [("one binding", &b), ("split", &split)] {
                let (got, ids) = forward_on(be, &layer, &x, t);
                assert_eq!(ids, want_ids, "{name} {dtype} {config:?}");
                let err = rel_l2(&got, &want);
                assert!(err < tolerance(be, dtype, 1e-4), "{name} {dtype} t {t} {config:?}: rel l2 {err}");
            }
            // One submit per layer or one per op: the same kernels, so the same bits.
            let batched = forward_on(&b, &layer, &x, t);
            assert_eq!(forward_on(&per_op, &layer, &x, t), batched, "{dtype} {config:?}: batched and per-op submits differ");
        }
    }
}

#[test]
fn forwards_from_several_threads_at_once() {
    // One thread's forward owns the batch; the others' run unbatched meanwhile, and ops of other
    // threads never land in it. Every thread must still get the host's answer.
    let b = gpu();
    let cpu = CpuBackend::new();
    let mut r = Rng(5);
    let config = MoeConfig {
        hidden: 40,
        intermediate: 24,
        experts: 8,
        top_k: 3,
        routing: Routing::Softmax { norm_topk_prob: true },
        shared_intermediate: 8,
    };
    let layer = random_layer(&mut r, config, DType::BF16);
    std::thread::scope(|s| {
        for seed in 1..5u64 {
            let (b, cpu, layer) = (&b, &cpu, &layer);
            s.spawn(move || {
                let mut r = Rng(seed * 31);
                for t in [1, 5, 17] {
                    let x = r.vec(t * 40, 1.0);
                    let (want, want_ids) = forward_on(cpu, layer, &x, t);
                    let (got, ids) = forward_on(b, layer, &x, t);
                    assert_eq!(ids, want_ids);
                    assert!(rel_l2(&got, &want) < tolerance(b, DType::BF16, 1e-4));
                    let mut h = poisoned(b, DType::F32, &[1, 20]);
                    ops::activation(b, &f32s(b, DType::F32, &[1, 40], &x[..40]), &mut h).unwrap();
                    assert!(h.to_f32(b).unwrap().iter().all(|v| v.is_finite()));
                }
            });
        }
    });
}

#[test]
fn one_backend_shared_by_threads() {
    // Read-backs from several threads at once: a map callback may run on another thread's poll.
    let b = gpu();
    std::thread::scope(|s| {
        for seed in 1..5u64 {
            let b = &b;
            s.spawn(move || {
                let mut r = Rng(seed * 77);
                for _ in 0..25 {
                    let v = r.vec(1000, 1.0);
                    let t = f32s(b, DType::F32, &[1, 1000], &v);
                    let mut h = poisoned(b, DType::F32, &[1, 500]);
                    ops::activation(b, &t, &mut h).unwrap();
                    assert_eq!(t.to_f32(b).unwrap(), v);
                    assert!(h.to_f32(b).unwrap().iter().all(|x| x.is_finite()));
                    b.synchronize().unwrap();
                }
            });
        }
    });
}

/// The adapter as if one storage binding held only `bytes`: every larger tensor is split over
/// several native buffers, the caller's `x` and `out` included.
fn tiny_bindings(bytes: u64) -> WgpuBackend {
    let mut b = gpu();
    b.chunk = bytes;
    b.with_binding_limit(bytes)
}

#[test]
fn forward_runs_in_passes_over_split_tensors() {
    // 4 KiB bindings: x [40, 64] f32 is 3 parts; the expert outputs hold 4 tokens a pass.
    let b = tiny_bindings(4096);
    let cpu = CpuBackend::new();
    let mut r = Rng(21);
    let deepseek = Routing::SigmoidGrouped { n_group: 2, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 2.5 };
    let config = MoeConfig { hidden: 64, intermediate: 24, experts: 8, top_k: 4, routing: deepseek, shared_intermediate: 16 };
    let l = Layer::upload(&b, &random_layer(&mut r, config.clone(), DType::BF16)).unwrap();
    assert_eq!(b.tokens_per_pass(&l).unwrap(), 4);
    for (dtype, t) in [(DType::BF16, 40), (DType::F32, 23), (DType::F16, 1)] {
        let layer = random_layer(&mut r, config.clone(), dtype);
        let x = r.vec(t * config.hidden, 1.0);
        let (want, want_ids) = forward_on(&cpu, &layer, &x, t);
        for batching in [true, false] {
            let be = tiny_bindings(4096).with_layer_batching(batching);
            let (got, ids) = forward_on(&be, &layer, &x, t);
            assert_eq!(ids, want_ids, "{dtype} t {t}");
            let err = rel_l2(&got, &want);
            assert!(err < tolerance(&be, dtype, 1e-4), "{dtype} t {t} batching {batching}: rel l2 {err}");
        }
    }
    // An op on its own needs its activations in one binding, and says so.
    let x = f32s(&b, DType::F32, &[40, 64], &r.vec(40 * 64, 1.0));
    assert_eq!(x.buf.parts(), 3);
    let mut h = poisoned(&b, DType::F32, &[40, 32]);
    let err = ops::activation(&b, &x, &mut h).unwrap_err();
    assert!(matches!(&err, Error::Unsupported(s) if s.contains("gate_up") && s.contains("fewer tokens")), "{err}");
    // Not even one token's intermediates fit 512 bytes (its gate/up activations, 4 x 2 x 24 f32:
    // the weights split inside an expert, so SwiGLU is not fused): a sentence, not a fault.
    let b = tiny_bindings(512);
    let l = Layer::upload(&b, &random_layer(&mut r, config.clone(), DType::F32)).unwrap();
    let xt = f32s(&b, DType::F32, &[2, 64], &r.vec(128, 1.0));
    let (mut out, mut ids, mut w) =
        (poisoned(&b, DType::F32, &[2, 64]), poisoned(&b, DType::U32, &[2, 4]), poisoned(&b, DType::F32, &[2, 4]));
    let err = ops::forward(&b, &l, &xt, &mut out, &mut ids, &mut w).unwrap_err();
    assert!(matches!(&err, Error::Unsupported(s) if s.contains("one token's expert activations need 768 bytes")), "{err}");
}

#[test]
fn forward_recycles_its_scratch() {
    // A repeated forward takes every scratch buffer from the one before (none created), and a
    // recycled buffer holding the last layer's data changes nothing: the same bits as the first
    // time, on other data in between.
    let b = gpu();
    let cpu = CpuBackend::new();
    let mut r = Rng(13);
    let deepseek = Routing::SigmoidGrouped { n_group: 4, topk_group: 2, norm_topk_prob: true, routed_scaling_factor: 2.5 };
    let config = MoeConfig { hidden: 72, intermediate: 40, experts: 16, top_k: 4, routing: deepseek, shared_intermediate: 24 };
    for (dtype, t) in [(DType::BF16, 9), (DType::F32, 70), (DType::F16, 1)] {
        let host = random_layer(&mut r, config.clone(), dtype);
        let l = Layer::upload(&b, &host).unwrap();
        let (x1, x2) = (r.vec(t * 72, 1.0), r.vec(t * 72, 2.0));
        let run = |x: &[f32]| {
            let xt = f32s(&b, DType::F32, &[t, 72], x);
            let (mut out, mut ids, mut w) =
                (poisoned(&b, DType::F32, &[t, 72]), poisoned(&b, DType::U32, &[t, 4]), poisoned(&b, DType::F32, &[t, 4]));
            let before = b.buffers_created();
            ops::forward(&b, &l, &xt, &mut out, &mut ids, &mut w).unwrap();
            let created = b.buffers_created() - before;
            ((out.to_f32(&b).unwrap(), ids.to_u32(&b).unwrap(), w.to_f32(&b).unwrap()), created)
        };
        let (first, created) = run(&x1);
        assert!(created > 0, "{dtype} t {t}: a new shape must allocate");
        let (want, want_ids) = forward_on(&cpu, &host, &x1, t);
        assert_eq!(first.1, want_ids);
        assert!(rel_l2(&first.0, &want) < tolerance(&b, dtype, 1e-4));
        let (_, created) = run(&x2);
        assert_eq!(created, 0, "{dtype} t {t}: the second forward of a shape must recycle every scratch buffer");
        let (again, created) = run(&x1);
        assert_eq!(created, 0);
        assert!(again == first, "{dtype} t {t}: recycled scratch changed the result");
        if t > 1 {
            // One token fewer: every buffer is a little larger than needed, and still taken.
            let xt = f32s(&b, DType::F32, &[t - 1, 72], &x1[..(t - 1) * 72]);
            let (mut out, mut ids, mut w) =
                (poisoned(&b, DType::F32, &[t - 1, 72]), poisoned(&b, DType::U32, &[t - 1, 4]), poisoned(&b, DType::F32, &[t - 1, 4]));
            let before = b.buffers_created();
            ops::forward(&b, &l, &xt, &mut out, &mut ids, &mut w).unwrap();
            assert_eq!(b.buffers_created() - before, 0, "{dtype} t {t}: a layer one token shorter must reuse the scratch");
            let (want, want_ids) = forward_on(&cpu, &host, &x1[..(t - 1) * 72], t - 1);
            assert_eq!(ids.to_u32(&b).unwrap(), want_ids);
            assert!(rel_l2(&out.to_f32(&b).unwrap(), &want) < tolerance(&b, dtype, 1e-4));
        }
        b.release_scratch();
        assert!(run(&x1).1 > 0, "release_scratch must drop the kept buffers");
    }
}

#[test]
fn shader_runtime_checks_change_no_bit() {
    // Kernels compile without wgpu's runtime checks by default (index clamps, division guards,
    // loop counters). They only form in-bounds indices, so the checks must change nothing: the
    // same bits with and without them, for decode (gemv: t 1 and 3, and t 12, whose 48 rows over
    // 16 experts give some experts more than 4, the second half of a pass) and prefill (tiled)
    // shapes, split weights, every dtype, and the same error for bad data.
    let (plain, checked) = (gpu(), gpu().with_shader_checks(true));
    let (plain_split, checked_split) = (gpu().with_binding_limit(4096), gpu().with_shader_checks(true).with_binding_limit(4096));
    assert!(checked.info().features.iter().any(|f| f == "shader runtime checks"));
    assert!(!plain.info().features.iter().any(|f| f == "shader runtime checks"));
    let mut r = Rng(17);
    let deepseek = Routing::SigmoidGrouped { n_group: 4, topk_group: 2, norm_topk_prob: true, routed_scaling_factor: 2.5 };
    let config = MoeConfig { hidden: 72, intermediate: 40, experts: 16, top_k: 4, routing: deepseek, shared_intermediate: 24 };
    for dtype in DType::WEIGHTS {
        let layer = random_layer(&mut r, config.clone(), dtype);
        for t in [1, 3, 12, 90] {
            let x = r.vec(t * 72, 1.0);
            assert!(forward_on(&plain, &layer, &x, t) == forward_on(&checked, &layer, &x, t), "{dtype} t {t}");
            assert!(forward_on(&plain_split, &layer, &x, t) == forward_on(&checked_split, &layer, &x, t), "{dtype} t {t} split");
        }
    }
    for b in [gpu(), gpu().with_shader_checks(true)] {
        let x = f32s(&b, DType::F32, &[6, 8], &r.vec(48, 1.0));
        let w = f32s(&b, DType::F32, &[2, 4, 8], &r.vec(64, 1.0));
        let off = u32s(&b, &[3], &[0, 5, 3]);
        let mut y = poisoned(&b, DType::F32, &[6, 4]);
        b.grouped_gemm(&x, None, &w, Some(&off), &mut y).unwrap();
        let err = b.synchronize().unwrap_err();
        assert!(matches!(&err, Error::InvalidArgument(s) if s.contains("expert_offsets")), "{err}");
    }
}
