//! Loads the real transformers fixtures in tests/fixtures/hf and damaged copies of them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use moe_checkpoint::{Checkpoint, Family, Stored, load_layer, read_config};
use moe_hal::host::Accumulate;
use moe_hal::{DType, Error, Layer, Routing, Tensor, ops};
use safetensors::{Dtype, SafeTensors};

mod quick_start;
mod refusals;

/// tests/fixtures/hf of this checkout; on another machine (a staged GPU check runs from a copy of
/// the checkout's root), the one under the working directory.
fn fixtures() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf");
    if here.exists() { here } else { PathBuf::from("tests/fixtures/hf") }
}

fn fixture(case: &str) -> PathBuf {
    fixtures().join(case)
}

/// What each fixture's layer 1 must look like (tests/fixtures/hf/README.md).
struct Case {
    name: &'static str,
    model_type: &'static str,
    family: Family,
    /// The layer's dtype when none is forced.
    dtype: DType,
    stored: Stored,
    router_dtype: DType,
    hidden: usize,
    intermediate: usize,
    experts: usize,
    top_k: usize,
    routing: Routing,
    shared: usize,
    shards: usize,
}

fn cases() -> Vec<Case> {
    let ds = Routing::SigmoidGrouped { n_group: 4, topk_group: 2, norm_topk_prob: true, routed_scaling_factor: 2.5 };
    let kimi = Routing::SigmoidGrouped { n_group: 1, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 2.827 };
    let sm = |norm_topk_prob| Routing::Softmax { norm_topk_prob };
    use DType::{BF16, F8E4M3, F32};
    use Family::*;
    let (f32s, bf16s, fp8) = (Stored::Float(F32), Stored::Float(BF16), Stored::Fp8E4M3 { block: [16, 32] });
    #[rustfmt::skip]
    let v = vec![
        Case { name: "deepseek_v3_f32", model_type: "deepseek_v3", family: DeepSeek, dtype: F32, stored: f32s, router_dtype: F32, hidden: 64, intermediate: 32, experts: 16, top_k: 4, routing: ds, shared: 32, shards: 1 },
        Case { name: "deepseek_v3_bf16", model_type: "deepseek_v3", family: DeepSeek, dtype: BF16, stored: bf16s, router_dtype: F32, hidden: 64, intermediate: 32, experts: 16, top_k: 4, routing: ds, shared: 32, shards: 2 },
        Case { name: "deepseek_v3_fp8", model_type: "deepseek_v3", family: DeepSeek, dtype: F8E4M3, stored: fp8, router_dtype: F32, hidden: 64, intermediate: 32, experts: 16, top_k: 4, routing: ds, shared: 32, shards: 1 },
        Case { name: "kimi_k2_bf16", model_type: "kimi_k2", family: DeepSeek, dtype: BF16, stored: bf16s, router_dtype: F32, hidden: 32, intermediate: 16, experts: 384, top_k: 8, routing: kimi, shared: 16, shards: 3 },
        Case { name: "qwen3_moe_f32", model_type: "qwen3_moe", family: Qwen3Moe, dtype: F32, stored: f32s, router_dtype: F32, hidden: 64, intermediate: 32, experts: 16, top_k: 4, routing: sm(true), shared: 0, shards: 1 },
        Case { name: "qwen3_moe_fp8", model_type: "qwen3_moe", family: Qwen3Moe, dtype: F8E4M3, stored: fp8, router_dtype: BF16, hidden: 64, intermediate: 32, experts: 16, top_k: 4, routing: sm(true), shared: 0, shards: 1 },
        Case { name: "qwen3_moe_bf16", model_type: "qwen3_moe", family: Qwen3Moe, dtype: BF16, stored: bf16s, router_dtype: BF16, hidden: 64, intermediate: 32, experts: 16, top_k: 4, routing: sm(false), shared: 0, shards: 1 },
        Case { name: "mixtral_f32", model_type: "mixtral", family: Mixtral, dtype: F32, stored: f32s, router_dtype: F32, hidden: 64, intermediate: 32, experts: 8, top_k: 2, routing: sm(true), shared: 0, shards: 1 },
        Case { name: "mixtral_bf16", model_type: "mixtral", family: Mixtral, dtype: BF16, stored: bf16s, router_dtype: BF16, hidden: 64, intermediate: 32, experts: 8, top_k: 2, routing: sm(true), shared: 0, shards: 2 },
    ];
    v
}

/// A tensor of a fixture file, widened to f64 (floats) or i64 (ints).
struct Read {
    shape: Vec<usize>,
    f: Vec<f64>,
    i: Vec<i64>,
}

fn read(path: &Path, name: &str) -> Read {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    let d = t.data();
    let (f, i) = match t.dtype() {
        Dtype::F64 => (d.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(), vec![]),
        Dtype::F32 => (d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(), vec![]),
        Dtype::I64 => (vec![], d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()),
        other => panic!("{name}: unexpected {other:?}"),
    };
    Read { shape: t.shape().to_vec(), f, i }
}

fn rel_l2(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let num: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    (num / den).sqrt()
}

/// `x · W^T` in f64 from the loaded router.
fn host_logits(ck: &Checkpoint, x: &[f64]) -> Vec<f64> {
    let (e, h) = (ck.layer.config.experts, ck.layer.config.hidden);
    let w = ck.layer.router.to_f32();
    let t = x.len() / h;
    let mut out = vec![0.0; t * e];
    for r in 0..t {
        for j in 0..e {
            out[r * e + j] = (0..h).map(|k| x[r * h + k] * w[j * h + k] as f64).sum();
        }
    }
    out
}

fn load(case: &str, dtype: Option<DType>) -> Checkpoint {
    load_layer(&fixture(case), 1, dtype).unwrap_or_else(|e| panic!("{case}: {e}"))
}

#[test]
fn every_fixture_loads_with_its_config_and_shapes() {
    for c in cases() {
        let ck = load(c.name, None);
        let l = &ck.layer;
        let cfg = &l.config;
        assert_eq!(ck.model_type, c.model_type, "{}", c.name);
        assert_eq!(ck.config.family, c.family, "{}", c.name);
        assert_eq!(ck.num_hidden_layers, 2, "{}", c.name);
        assert_eq!(ck.layer_index, 1);
        assert_eq!((cfg.hidden, cfg.intermediate, cfg.experts, cfg.top_k), (c.hidden, c.intermediate, c.experts, c.top_k), "{}", c.name);
        assert_eq!(cfg.routing, c.routing, "{}", c.name);
        assert_eq!(cfg.shared_intermediate, c.shared, "{}", c.name);
        assert_eq!((l.dtype, ck.stored, ck.router_stored_dtype), (c.dtype, c.stored, c.router_dtype), "{}", c.name);
        assert!(!ck.fused_experts);
        let (h, i, e, s) = (c.hidden, c.intermediate, c.experts, c.shared);
        assert_eq!(l.router.shape, [e, h]);
        assert_eq!(l.gate_up.shape, [e, 2 * i, h]);
        assert_eq!(l.down.shape, [e, h, i]);
        assert_eq!(l.bias.as_ref().map(|b| (b.dtype, b.shape.clone())), (c.family == Family::DeepSeek).then(|| (DType::F32, vec![e])));
        assert_eq!(l.shared_gate_up.as_ref().map(|t| t.shape.clone()), (s > 0).then(|| vec![2 * s, h]));
        assert_eq!(l.shared_down.as_ref().map(|t| t.shape.clone()), (s > 0).then(|| vec![h, s]));
        l.validate().unwrap();
        assert!(ck.summary().starts_with(&format!("{} layer 1 of 2: {e} experts, top-{}", c.model_type, c.top_k)), "{}", ck.summary());
        assert!(!ck.files.is_empty() && ck.files.len() <= c.shards, "{}", c.name);
        if c.shards == 1 {
            assert_eq!(ck.files, [fixture(c.name).join("model.safetensors")]);
        }
    }
}

/// Only the shards holding layer 1's MoE tensors are opened.
#[test]
fn opens_only_the_shards_of_the_layer() {
    for case in ["deepseek_v3_bf16", "kimi_k2_bf16", "mixtral_bf16"] {
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(case).join("model.safetensors.index.json")).unwrap()).unwrap();
        let want: BTreeSet<PathBuf> = index["weight_map"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("model.layers.1.mlp.") || k.starts_with("model.layers.1.block_sparse_moe."))
            .map(|(_, f)| fixture(case).join(f.as_str().unwrap()))
            .collect();
        let ck = load(case, None);
        assert_eq!(ck.files.iter().cloned().collect::<BTreeSet<_>>(), want, "{case}");
    }
}

/// The values land where moe-hal expects them: per expert the gate rows, then the up rows.
#[test]
fn layout_matches_the_files() {
    let dir = fixture("deepseek_v3_bf16");
    let ck = load("deepseek_v3_bf16", None);
    let (h, i) = (64, 32);
    let expert = 5;
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap()).unwrap();
    let raw = |name: &str| -> Vec<u8> {
        let file = index["weight_map"][name].as_str().unwrap();
        let bytes = std::fs::read(dir.join(file)).unwrap();
        SafeTensors::deserialize(&bytes).unwrap().tensor(name).unwrap().data().to_vec()
    };
    let sz = 2;
    let gu = &ck.layer.gate_up.data[expert * 2 * i * h * sz..(expert + 1) * 2 * i * h * sz];
    assert_eq!(&gu[..i * h * sz], raw(&format!("model.layers.1.mlp.experts.{expert}.gate_proj.weight")));
    assert_eq!(&gu[i * h * sz..], raw(&format!("model.layers.1.mlp.experts.{expert}.up_proj.weight")));
    let down = &ck.layer.down.data[expert * h * i * sz..(expert + 1) * h * i * sz];
    assert_eq!(down, raw(&format!("model.layers.1.mlp.experts.{expert}.down_proj.weight")));
    let sgu = ck.layer.shared_gate_up.as_ref().unwrap();
    assert_eq!(&sgu.data[..i * h * sz], raw("model.layers.1.mlp.shared_experts.gate_proj.weight"));
    assert_eq!(&sgu.data[i * h * sz..], raw("model.layers.1.mlp.shared_experts.up_proj.weight"));
    assert_eq!(ck.layer.bias.as_ref().unwrap().data, raw("model.layers.1.mlp.gate.e_score_correction_bias"));
}

/// Router logits from the loaded router weight match transformers' `router_logits`.
#[test]
fn router_logits_match_transformers() {
    for c in cases() {
        let dir = fixture(c.name);
        let x = read(&dir.join("input.safetensors"), "hidden_states");
        let want = read(&dir.join("expected.safetensors"), "router_logits");
        assert_eq!(want.shape, [x.shape[0], c.experts]);
        // Forcing f32 keeps every router exact (bf16 -> f32 is exact).
        let exact = load(c.name, Some(DType::F32));
        let err = rel_l2(&host_logits(&exact, &x.f), &want.f);
        assert!(err < 1e-5, "{} (f32): router logits relative error {err:e}", c.name);
        // Default dtype: exact too, because a router stored in f32 (DeepSeek/Kimi bf16
        // checkpoints) stays f32 instead of being rounded to the experts' bf16.
        let default = load(c.name, None);
        let err = rel_l2(&host_logits(&default, &x.f), &want.f);
        assert!(err < 1e-5, "{}: router logits relative error {err:e}", c.name);
        assert_eq!(default.layer.router.dtype, c.router_dtype, "{}: router dtype", c.name);
    }
}

/// Forcing a dtype: bf16 -> f32 is exact, f32 -> bf16 rounds like `DType::encode`.
#[test]
fn forced_dtypes_convert_every_weight() {
    let bf = load("mixtral_bf16", None);
    let f = load("mixtral_bf16", Some(DType::F32));
    assert_eq!((f.layer.dtype, f.stored), (DType::F32, Stored::Float(DType::BF16)));
    assert_eq!(f.layer.gate_up.to_f32(), bf.layer.gate_up.to_f32());
    assert_eq!(f.layer.down.to_f32(), bf.layer.down.to_f32());
    assert_eq!(f.layer.router.to_f32(), bf.layer.router.to_f32());
    let src = load("qwen3_moe_f32", None);
    let half = load("qwen3_moe_f32", Some(DType::F16));
    assert_eq!(half.layer.gate_up.data, DType::F16.encode(&src.layer.gate_up.to_f32()));
    // An f32 router keeps its precision whatever the experts' dtype.
    assert_eq!(half.layer.router, src.layer.router);
    let ds = load("deepseek_v3_f32", Some(DType::BF16));
    assert_eq!(
        ds.layer.shared_down.as_ref().unwrap().data,
        DType::BF16.encode(&load("deepseek_v3_f32", None).layer.shared_down.unwrap().to_f32())
    );
    assert_eq!(ds.layer.bias.as_ref().unwrap().dtype, DType::F32);
    let e = load_layer(&fixture("mixtral_f32"), 1, Some(DType::U32)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

/// The whole layer on the CPU backend reproduces transformers' output, ids and weights.
#[test]
fn cpu_forward_matches_transformers() {
    let backend = moe_cpu::CpuBackend::new().with_accumulate(Accumulate::F64);
    for c in cases() {
        for dtype in [Some(DType::F32), None] {
            let dir = fixture(c.name);
            let ck = load(c.name, dtype);
            let x = read(&dir.join("input.safetensors"), "hidden_states");
            let out_want = read(&dir.join("expected.safetensors"), "output");
            let ids_want = read(&dir.join("expected.safetensors"), "topk_ids");
            let w_want = read(&dir.join("expected.safetensors"), "topk_weights");
            let (t, h, k) = (x.shape[0], c.hidden, c.top_k);
            let layer = Layer::upload(&backend, &ck.layer).unwrap();
            let xs: Vec<f32> = x.f.iter().map(|v| *v as f32).collect();
            let xt = Tensor::from_f32(&backend, DType::F32, &[t, h], &xs).unwrap();
            let mut out = Tensor::alloc(&backend, DType::F32, &[t, h]).unwrap();
            let mut ids = Tensor::alloc(&backend, DType::U32, &[t, k]).unwrap();
            let mut w = Tensor::alloc(&backend, DType::F32, &[t, k]).unwrap();
            ops::forward(&backend, &layer, &xt, &mut out, &mut ids, &mut w).unwrap();
            let (out, ids, w) = (out.to_f32(&backend).unwrap(), ids.to_u32(&backend).unwrap(), w.to_f32(&backend).unwrap());
            let label = format!("{} loaded as {}", c.name, ck.layer.dtype);
            // transformers' ids are sorted per row: sort ours the same way, weights alongside.
            let mut got_ids = Vec::new();
            let mut got_w = Vec::new();
            for r in 0..t {
                let mut pairs: Vec<(u32, f32)> = (0..k).map(|j| (ids[r * k + j], w[r * k + j])).collect();
                pairs.sort_by_key(|p| p.0);
                got_ids.extend(pairs.iter().map(|p| p.0 as i64));
                got_w.extend(pairs.iter().map(|p| p.1 as f64));
            }
            let same_ids = got_ids == ids_want.i;
            let out_err = rel_l2(&out.iter().map(|v| *v as f64).collect::<Vec<_>>(), &out_want.f);
            // Exact: what transformers computed from (f32 widens bf16 and f16 exactly; FP8 loaded
            // as f32 is transformers' own q * scale_inv, and FP8 kept as stored computes those same
            // products). FP8 loaded as bf16 rounds each product.
            let weights_exact =
                ck.layer.dtype == DType::F32 || ck.layer.dtype == DType::F8E4M3 || ck.stored == Stored::Float(ck.layer.dtype);
            let router_exact = ck.layer.router.dtype == DType::F32 || ck.layer.router.dtype == ck.router_stored_dtype;
            if router_exact {
                assert!(same_ids, "{label}: ids {got_ids:?} != {:?}", ids_want.i);
                let w_err = rel_l2(&got_w, &w_want.f);
                assert!(w_err < 1e-5, "{label}: topk_weights relative error {w_err:e}");
                let tol = if weights_exact { 1e-5 } else { 1e-2 };
                assert!(out_err < tol, "{label}: output relative error {out_err:e}");
                if !weights_exact {
                    eprintln!("{label}: FP8 products rounded to {}: output relative error {out_err:e}", ck.layer.dtype);
                }
            } else {
                // The router was rounded to bf16: report, but only require the output to be close
                // where the same experts were chosen.
                eprintln!("{label}: router rounded to bf16: same ids {same_ids}, output relative error {out_err:e}");
                if same_ids {
                    assert!(out_err < 1e-3, "{label}: output relative error {out_err:e}");
                }
            }
        }
    }
}

/// README.md's library example is this crate's tests/quick_start/mod.rs, verbatim, and it
/// computes what transformers did.
#[test]
fn readme_quick_start_is_this_code_and_matches_transformers() {
    let code: String = include_str!("quick_start/mod.rs").lines().filter(|l| !l.starts_with("//!")).map(|l| format!("{l}\n")).collect();
    let readme = include_str!("../../../README.md");
    assert!(
        readme.contains(&format!("```rust{code}```")),
        "README.md's library example must be crates/moe-checkpoint/tests/quick_start/mod.rs (after its //! lines)"
    );
    let dir = fixture("qwen3_moe_bf16");
    let x = read(&dir.join("input.safetensors"), "hidden_states");
    let xs: Vec<f32> = x.f.iter().map(|v| *v as f32).collect();
    let (out, ids) = quick_start::checkpoint_layer(&dir, 1, &xs).unwrap();
    let want = read(&dir.join("expected.safetensors"), "output");
    let err = rel_l2(&out.iter().map(|v| *v as f64).collect::<Vec<_>>(), &want.f);
    assert!(err < 1e-5, "output relative error {err:e}");
    let k = 4;
    let mut first: Vec<i64> = ids[..k].iter().map(|&i| i as i64).collect();
    first.sort_unstable();
    assert_eq!(first, read(&dir.join("expected.safetensors"), "topk_ids").i[..k]);
    // A wrong input length is an error naming the problem, not a panic.
    let e = quick_start::checkpoint_layer(&dir, 1, &xs[..xs.len() - 1]).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
}

#[test]
fn dense_layer_is_a_clear_error() {
    for case in ["deepseek_v3_f32", "kimi_k2_bf16"] {
        let e = load_layer(&fixture(case), 0, None).unwrap_err();
        let model_type = if case.starts_with("kimi") { "kimi_k2" } else { "deepseek_v3" };
        assert_eq!(
            e,
            Error::InvalidArgument(format!(
                "layer 0 of this {model_type} model is a dense MLP (first_k_dense_replace = 1), not an MoE layer; choose layer 1"
            ))
        );
    }
    // Qwen3 (decoder_sparse_step 1) and Mixtral: layer 0 is MoE too.
    for case in ["qwen3_moe_bf16", "mixtral_bf16"] {
        load_layer(&fixture(case), 0, None).unwrap();
    }
}

#[test]
fn layer_out_of_range_names_the_range() {
    let e = load_layer(&fixture("qwen3_moe_f32"), 2, None).unwrap_err();
    assert_eq!(
        e,
        Error::InvalidArgument(
            "layer 2 does not exist: this qwen3_moe model has 2 layers, numbered 0 to 1; choose a layer from 0 to 1".into()
        )
    );
}

/// Copies a fixture's files into a fresh directory.
fn copy_fixture(case: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(fixture(case)).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, tmp.path().join(p.file_name().unwrap())).unwrap();
    }
    tmp
}

/// Rewrites a safetensors file, keeping the tensors for which `edit` returns Some (possibly renamed
/// or replaced).
fn rewrite(path: &Path, mut edit: impl FnMut(&str, Dtype, &[usize], &[u8]) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)>) {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, t) in st.tensors() {
        kept.extend(edit(&name, t.dtype(), t.shape(), t.data()));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        kept.iter().map(|(n, d, s, b)| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

#[test]
fn missing_tensor_in_single_file_is_named() {
    let tmp = copy_fixture("qwen3_moe_f32");
    let gone = "model.layers.1.mlp.experts.3.up_proj.weight";
    rewrite(
        &tmp.path().join("model.safetensors"),
        |n, d, s, b| if n == gone { vec![] } else { vec![(n.into(), d, s.to_vec(), b.to_vec())] },
    );
    let e = load_layer(tmp.path(), 1, None).unwrap_err();
    assert_eq!(
        e,
        Error::Checkpoint(format!("tensor {gone} is missing: {} does not contain it", tmp.path().join("model.safetensors").display()))
    );
    // Layer 0 does not need it.
    load_layer(tmp.path(), 0, None).unwrap();
}

#[test]
fn missing_tensor_in_index_is_named() {
    let tmp = copy_fixture("deepseek_v3_bf16");
    let index_path = tmp.path().join("model.safetensors.index.json");
    let mut index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let gone = "model.layers.1.mlp.shared_experts.down_proj.weight";
    let file = index["weight_map"].as_object_mut().unwrap().remove(gone).unwrap();
    std::fs::write(&index_path, serde_json::to_string(&index).unwrap()).unwrap();
    let e = load_layer(tmp.path(), 1, None).unwrap_err();
    assert_eq!(e, Error::Checkpoint(format!("tensor {gone} is missing: the weight_map of {} does not list it", index_path.display())));

    // Listed, but not in the shard the index names.
    index["weight_map"][gone] = serde_json::Value::String(
        if file == "model-00001-of-00002.safetensors" { "model-00002-of-00002.safetensors" } else { "model-00001-of-00002.safetensors" }
            .into(),
    );
    std::fs::write(&index_path, serde_json::to_string(&index).unwrap()).unwrap();
    let e = load_layer(tmp.path(), 1, None).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!("checkpoint: tensor {gone} is missing: {} lists it in model-0000", index_path.display()))
            && e.ends_with("does not contain it"),
        "{e}"
    );

    // Listed in a shard that does not exist.
    index["weight_map"][gone] = serde_json::Value::String("model-00009-of-00009.safetensors".into());
    std::fs::write(&index_path, serde_json::to_string(&index).unwrap()).unwrap();
    let e = load_layer(tmp.path(), 1, None).unwrap_err();
    assert_eq!(
        e,
        Error::Checkpoint(format!(
            "{} does not exist, but {} lists it as the shard holding {gone}",
            tmp.path().join("model-00009-of-00009.safetensors").display(),
            index_path.display()
        ))
    );
}

#[test]
fn no_expert_layout_names_the_first_per_expert_tensor() {
    let tmp = copy_fixture("mixtral_f32");
    rewrite(&tmp.path().join("model.safetensors"), |n, d, s, b| {
        if n.contains("layers.1.block_sparse_moe.experts.") { vec![] } else { vec![(n.into(), d, s.to_vec(), b.to_vec())] }
    });
    let e = load_layer(tmp.path(), 1, None).unwrap_err().to_string();
    assert!(
        e.contains("tensor model.layers.1.block_sparse_moe.experts.0.w1.weight is missing")
            && e.ends_with("(nor is the fused model.layers.1.block_sparse_moe.experts.gate_up_proj there)"),
        "{e}"
    );
}

/// transformers 5's in-memory layout: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I].
#[test]
fn fused_expert_layout_loads_the_same_layer() {
    let tmp = copy_fixture("deepseek_v3_f32");
    let per_expert = load("deepseek_v3_f32", None);
    let (e, sz) = (16, 4);
    let mut gate_up: Vec<Vec<u8>> = vec![Vec::new(); e];
    let mut down: Vec<Vec<u8>> = vec![Vec::new(); e];
    let mut dtype = Dtype::F32;
    rewrite(&tmp.path().join("model.safetensors"), |n, d, s, b| {
        let Some(rest) = n.strip_prefix("model.layers.1.mlp.experts.") else { return vec![(n.into(), d, s.to_vec(), b.to_vec())] };
        let (x, proj) = rest.split_once('.').unwrap();
        let x: usize = x.parse().unwrap();
        dtype = d;
        match proj {
            "gate_proj.weight" => gate_up[x].splice(0..0, b.iter().copied()).for_each(drop),
            "up_proj.weight" => gate_up[x].extend_from_slice(b),
            "down_proj.weight" => down[x].extend_from_slice(b),
            other => panic!("{other}"),
        }
        vec![]
    });
    // The closure saw every expert tensor; write the fused pair (gate rows first, then up rows).
    let fused_gu: Vec<u8> = gate_up.concat();
    let fused_down: Vec<u8> = down.concat();
    assert_eq!(fused_gu.len(), e * 2 * 32 * 64 * sz);
    rewrite(&tmp.path().join("model.safetensors"), |n, d, s, b| {
        let mut v = vec![(n.to_string(), d, s.to_vec(), b.to_vec())];
        if n == "model.layers.1.mlp.gate.weight" {
            v.push(("model.layers.1.mlp.experts.gate_up_proj".into(), dtype, vec![e, 64, 64], fused_gu.clone()));
            v.push(("model.layers.1.mlp.experts.down_proj".into(), dtype, vec![e, 64, 32], fused_down.clone()));
        }
        v
    });
    let fused = load_layer(tmp.path(), 1, None).unwrap();
    assert!(fused.fused_experts);
    assert_eq!(fused.layer, per_expert.layer);

    // A fused tensor of the wrong shape names both shapes.
    rewrite(&tmp.path().join("model.safetensors"), |n, d, s, b| {
        if n == "model.layers.1.mlp.experts.down_proj" {
            vec![(n.into(), d, vec![e, 32, 64], b.to_vec())]
        } else {
            vec![(n.into(), d, s.to_vec(), b.to_vec())]
        }
    });
    let e = load_layer(tmp.path(), 1, None).unwrap_err().to_string();
    assert!(
        e.contains(
            "tensor model.layers.1.mlp.experts.down_proj in model.safetensors has shape [16, 32, 64], but config.json implies [16, 64, 32]"
        ),
        "{e}"
    );
}

#[test]
fn wrong_shape_names_tensor_and_both_shapes() {
    let tmp = copy_fixture("qwen3_moe_bf16");
    let cfg_path = tmp.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap().replace("\"moe_intermediate_size\": 32", "\"moe_intermediate_size\": 16");
    std::fs::write(&cfg_path, cfg).unwrap();
    let e = load_layer(tmp.path(), 1, None).unwrap_err();
    assert_eq!(
        e,
        Error::Checkpoint(
            "tensor model.layers.1.mlp.experts.0.gate_proj.weight in model.safetensors has shape [32, 64], but config.json implies [16, 64] ([expert intermediate size, hidden_size])".into()
        )
    );
}

#[test]
fn truncated_shard_is_a_checkpoint_error() {
    let tmp = copy_fixture("deepseek_v3_bf16");
    let shard = tmp.path().join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    for keep in [len - 1000, 100, 4, 0] {
        std::fs::OpenOptions::new().write(true).open(&shard).unwrap().set_len(keep).unwrap();
        let e = load_layer(tmp.path(), 1, None).unwrap_err();
        let Error::Checkpoint(msg) = &e else { panic!("{keep} bytes: {e:?}") };
        assert!(msg.starts_with(&format!("{} is truncated", shard.display())), "{keep} bytes: {msg}");
    }
    // A file of garbage.
    std::fs::write(&shard, [0xFFu8; 64]).unwrap();
    let e = load_layer(tmp.path(), 1, None).unwrap_err();
    assert!(matches!(&e, Error::Checkpoint(m) if m.contains("model-00002-of-00002.safetensors")), "{e:?}");
}

#[test]
fn missing_config_and_directory() {
    let tmp = copy_fixture("mixtral_f32");
    std::fs::remove_file(tmp.path().join("config.json")).unwrap();
    let e = load_layer(tmp.path(), 1, None).unwrap_err();
    assert_eq!(
        e,
        Error::Checkpoint(format!(
            "{} has no config.json; a Hugging Face checkpoint directory holds config.json next to its safetensors files",
            tmp.path().display()
        ))
    );
    let e = load_layer(&tmp.path().join("nope"), 1, None).unwrap_err();
    assert!(matches!(&e, Error::Checkpoint(m) if m.contains("does not exist")), "{e:?}");
    // No weights at all.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(fixture("mixtral_f32").join("config.json"), tmp.path().join("config.json")).unwrap();
    let e = load_layer(tmp.path(), 1, None).unwrap_err().to_string();
    assert!(e.ends_with("has neither model.safetensors nor model.safetensors.index.json; only safetensors checkpoints are read"), "{e}");
}

#[test]
fn unknown_model_type_is_named() {
    let tmp = copy_fixture("mixtral_f32");
    let cfg_path = tmp.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap().replace("\"model_type\": \"mixtral\"", "\"model_type\": \"llama\"");
    std::fs::write(&cfg_path, cfg).unwrap();
    let e = load_layer(tmp.path(), 1, None).unwrap_err().to_string();
    assert!(e.starts_with(&format!("checkpoint: {} has model_type \"llama\", which this loader does not read", cfg_path.display())), "{e}");
}

/// Config variants real checkpoints use: Qwen3's `num_experts` (hub) instead of
/// `num_local_experts` (transformers 5), and an unknown model_type with DeepSeek's keys.
#[test]
fn config_key_variants() {
    let tmp = copy_fixture("qwen3_moe_f32");
    let cfg_path = tmp.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap().replace("\"num_local_experts\"", "\"num_experts\"");
    std::fs::write(&cfg_path, cfg).unwrap();
    assert_eq!(load_layer(tmp.path(), 1, None).unwrap().layer, load("qwen3_moe_f32", None).layer);

    let tmp = copy_fixture("deepseek_v3_f32");
    let cfg_path = tmp.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap().replace("\"model_type\": \"deepseek_v3\"", "\"model_type\": \"glm4_moe\"");
    std::fs::write(&cfg_path, cfg).unwrap();
    let ck = load_layer(tmp.path(), 1, None).unwrap();
    assert_eq!((ck.model_type.as_str(), ck.config.family), ("glm4_moe", Family::DeepSeek));
    assert_eq!(ck.layer, load("deepseek_v3_f32", None).layer);

    let cfg = read_config(&fixture("kimi_k2_bf16")).unwrap();
    assert_eq!(cfg.moe_layer_numbers(), vec![1]);
    assert_eq!(cfg.declared_dtype.as_deref(), Some("bfloat16"));
}

/// The FP8 fixture's weights are `q * scale_inv` exactly (f32), block by block, in moe-hal's
/// layout: checked against the file's bytes with an independent E4M3 decoder in f64.
#[test]
fn fp8_dequantizes_every_block_exactly() {
    let dir = fixture("deepseek_v3_fp8");
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let e4m3 = |b: u8| {
        let (e, m) = (((b >> 3) & 0xF) as i32, (b & 7) as f64);
        let v = if e == 0 { m / 8.0 * 2f64.powi(-6) } else { (1.0 + m / 8.0) * 2f64.powi(e - 7) };
        if b & 0x80 != 0 { -v } else { v }
    };
    // The weight named, dequantized in f64 and rounded once to f32.
    let deq = |name: &str| -> Vec<f32> {
        let q = st.tensor(name).unwrap();
        let s = st.tensor(&format!("{name}_scale_inv")).unwrap();
        assert_eq!((q.dtype(), s.dtype()), (Dtype::F8_E4M3, Dtype::F32));
        let (rows, cols) = (q.shape()[0], q.shape()[1]);
        let sc: Vec<f32> = s.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let grid_cols = s.shape()[1];
        (0..rows * cols).map(|i| (e4m3(q.data()[i]) * sc[(i / cols / 16) * grid_cols + (i % cols) / 32] as f64) as f32).collect()
    };
    let ck = load("deepseek_v3_fp8", Some(DType::F32));
    let (h, i) = (64, 32);
    let gu = ck.layer.gate_up.to_f32();
    let down = ck.layer.down.to_f32();
    for x in 0..16 {
        let p = |proj: &str| format!("model.layers.1.mlp.experts.{x}.{proj}.weight");
        assert_eq!(gu[x * 2 * i * h..][..i * h], deq(&p("gate_proj")), "expert {x} gate");
        assert_eq!(gu[(x * 2 + 1) * i * h..][..i * h], deq(&p("up_proj")), "expert {x} up");
        assert_eq!(down[x * h * i..][..h * i], deq(&p("down_proj")), "expert {x} down");
    }
    let sgu = ck.layer.shared_gate_up.as_ref().unwrap().to_f32();
    assert_eq!(sgu[..i * h], deq("model.layers.1.mlp.shared_experts.gate_proj.weight"));
    assert_eq!(sgu[i * h..], deq("model.layers.1.mlp.shared_experts.up_proj.weight"));
    assert_eq!(ck.layer.shared_down.as_ref().unwrap().to_f32(), deq("model.layers.1.mlp.shared_experts.down_proj.weight"));
    // bf16, as DeepSeek's conversion: those products rounded to nearest even; f16 likewise.
    for d in [DType::BF16, DType::F16] {
        let half = load_layer(&dir, 1, Some(d)).unwrap();
        assert_eq!(half.layer.gate_up.data, d.encode(&gu), "{d}");
        assert_eq!(half.layer.router, ck.layer.router, "{d}: the f32 router stays f32");
        assert!(half.summary().contains(&format!("weights {d} (stored f8_e4m3 with 16x32 block scales), router f32")));
    }
    // The default keeps the bytes and their scales: the same f32 products, half the bytes of bf16.
    let native = load("deepseek_v3_fp8", None);
    let l = &native.layer;
    assert_eq!((l.dtype, l.gate_up.dtype, l.gate_up.scales.as_ref().map(|s| s.block)), (DType::F8E4M3, DType::F8E4M3, Some([16, 32])));
    assert_eq!((l.gate_up.to_f32(), l.down.to_f32()), (gu, down));
    assert_eq!(l.shared_gate_up.as_ref().unwrap().to_f32(), sgu);
    assert_eq!(l.gate_up.data[..i * h], st.tensor("model.layers.1.mlp.experts.0.gate_proj.weight").unwrap().data()[..]);
    assert_eq!(l.gate_up.scales.as_ref().unwrap().tensor.shape, [16, 4, 2]);
    assert_eq!(l.router, ck.layer.router, "the f32 router stays f32");
    assert!(native.summary().contains("weights f8_e4m3 with 16x32 block scales as stored, router f32"), "{}", native.summary());
}

/// A float checkpoint asked for f8_e4m3 is quantized on load in DeepSeek's 128x128 blocks, the
/// router kept as stored.
#[test]
fn float_checkpoint_quantizes_to_fp8_on_request() {
    let bf = load("deepseek_v3_bf16", None);
    let q = load("deepseek_v3_bf16", Some(DType::F8E4M3));
    assert_eq!((q.layer.dtype, q.layer.router.dtype, q.stored), (DType::F8E4M3, bf.layer.router.dtype, bf.stored));
    assert_eq!(q.layer.gate_up, moe_hal::HostTensor::quantize(&bf.layer.gate_up.shape, &bf.layer.gate_up.to_f32(), [128, 128]).unwrap());
    assert!(q.summary().contains("weights f8_e4m3 (stored bf16)"), "{}", q.summary());
}

/// A copy of the FP8 fixture with one tensor's bytes (or dtype and shape) replaced.
fn fp8_with(name: &str, edit: impl Fn(Dtype, &[usize], &[u8]) -> Option<(Dtype, Vec<usize>, Vec<u8>)>) -> tempfile::TempDir {
    let tmp = copy_fixture("deepseek_v3_fp8");
    rewrite(&tmp.path().join("model.safetensors"), |n, d, s, b| {
        if n != name {
            return vec![(n.into(), d, s.to_vec(), b.to_vec())];
        }
        edit(d, s, b).map(|(d, s, b)| vec![(n.into(), d, s, b)]).unwrap_or_default()
    });
    tmp
}

#[test]
fn fp8_problems_are_named() {
    let w = "model.layers.1.mlp.experts.3.up_proj.weight";
    let scale = format!("{w}_scale_inv");
    let file = "model.safetensors";
    let err = |tmp: &tempfile::TempDir| load_layer(tmp.path(), 1, None).unwrap_err();

    let e = err(&fp8_with(&scale, |_, _, _| None));
    assert_eq!(e, Error::Checkpoint(format!("tensor {w} in {file} is F8_E4M3, but its block scales {scale} are not in the checkpoint")));

    // A per-channel scheme's scale under the other name.
    let tmp = copy_fixture("deepseek_v3_fp8");
    rewrite(&tmp.path().join(file), |n, d, s, b| {
        let n = if n == scale { format!("{w}_scale") } else { n.to_string() };
        vec![(n, d, s.to_vec(), b.to_vec())]
    });
    let e = err(&tmp).to_string();
    assert!(
        e.ends_with(&format!(
            "it has {w}_scale instead, another FP8 scheme (as compressed-tensors and fbgemm write), which is not read: only DeepSeek's (weight_scale_inv) is"
        )),
        "{e}"
    );

    let e = err(&fp8_with(&scale, |_, s, b| Some((Dtype::F64, s.to_vec(), [b, b].concat()))));
    assert_eq!(
        e,
        Error::Checkpoint(format!("tensor {scale} in {file} has dtype F64; the block scales of an FP8 weight must be F32, BF16 or F16"))
    );

    let e = err(&fp8_with(&scale, |d, _, b| Some((d, vec![4, 1], b.to_vec()))));
    assert_eq!(
        e,
        Error::Checkpoint(format!(
            "tensor {scale} in {file} has shape [4, 1], but {w} [32, 64] in blocks of 16x32 (quantization_config.weight_block_size) needs [2, 2]"
        ))
    );

    // A NaN byte (0x7F) at element 70 = row 1, column 6.
    let e = err(&fp8_with(w, |d, s, b| {
        let mut b = b.to_vec();
        b[70] = 0x7F;
        Some((d, s.to_vec(), b))
    }));
    assert_eq!(e, Error::Checkpoint(format!("tensor {w} in {file} holds a NaN (F8_E4M3 byte 0x7f) at element 70")));

    let e = err(&fp8_with(&scale, |d, s, b| {
        let mut b = b.to_vec();
        b[8..12].copy_from_slice(&f32::INFINITY.to_le_bytes());
        Some((d, s.to_vec(), b))
    }));
    assert_eq!(e, Error::Checkpoint(format!("tensor {scale} in {file} holds a non-finite scale (inf) at element 2")));

    // The router is never FP8.
    let router = "model.layers.1.mlp.gate.weight";
    let e = err(&fp8_with(router, |_, s, b| Some((Dtype::F8_E4M3, s.to_vec(), b[..b.len() / 4].to_vec()))));
    assert_eq!(
        e,
        Error::Checkpoint(format!(
            "tensor {router} in {file} is F8_E4M3; FP8 (with block scales) is read for expert weights only, and this tensor must be F32, F16 or BF16"
        ))
    );

    // Without its quantization_config the block size is DeepSeek's 128 x 128, which these
    // scale grids do not fit.
    let tmp = copy_fixture("deepseek_v3_fp8");
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("quantization_config");
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = err(&tmp).to_string();
    assert!(e.contains("in blocks of 128x128 (DeepSeek's; config.json gives no fp8 weight_block_size) needs [1, 1]"), "{e}");

    // Kept as stored, gate and up stack into one [2I, H] weight: in 20-row blocks the up
    // projection would start at row 32 % 20 = 12 of a block, so the grids cannot join (the
    // scale shapes still fit: ceil(32 / 20) = 2, ceil(64 / 20) = 4 rows). Dequantized, the
    // same files load.
    let tmp = copy_fixture("deepseek_v3_fp8");
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"]["weight_block_size"] = serde_json::json!([20, 32]);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let e = err(&tmp).to_string();
    assert!(
        e.contains("tensor model.layers.1.mlp.experts.0.up_proj.weight in model.safetensors starts at row 32 of the expert gate/up weights [.., 64, ..], not on a boundary of its 20-row scale blocks")
            && e.ends_with("load the layer dequantized (--dtype bf16)"),
        "{e}"
    );
    assert_eq!(load_layer(tmp.path(), 1, Some(DType::BF16)).unwrap().layer.dtype, DType::BF16);

    // A quantization the loader does not read (here AWQ-like: qweight instead of weight) is named.
    let tmp = copy_fixture("qwen3_moe_f32");
    let cfg_path = tmp.path().join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["quantization_config"] = serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 128});
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    rewrite(&tmp.path().join("model.safetensors"), |n, d, s, b| {
        let n = if n.starts_with("model.layers.1.mlp.experts.") { n.replace(".weight", ".qweight") } else { n.to_string() };
        vec![(n, d, s.to_vec(), b.to_vec())]
    });
    let e = load_layer(tmp.path(), 1, None).unwrap_err().to_string();
    assert!(e.starts_with("checkpoint: tensor model.layers.1.mlp.experts.0.gate_proj.weight is missing"), "{e}");
    assert!(
        e.ends_with(&format!(
            "({} declares quantization_config.quant_method \"awq\", which this loader does not read: it reads F32, F16 and BF16 weights and DeepSeek's block-scaled FP8)",
            cfg_path.display()
        )),
        "{e}"
    );

    // FP8 experts of another checkpoint, without any scales.
    let tmp = copy_fixture("qwen3_moe_f32");
    rewrite(&tmp.path().join("model.safetensors"), |n, d, s, b| {
        if n.starts_with("model.layers.1.mlp.experts.") {
            vec![(n.into(), Dtype::F8_E4M3, s.to_vec(), vec![0u8; b.len() / 4])]
        } else {
            vec![(n.into(), d, s.to_vec(), b.to_vec())]
        }
    });
    let e = load_layer(tmp.path(), 1, None).unwrap_err().to_string();
    assert!(
        e.contains("tensor model.layers.1.mlp.experts.0.gate_proj.weight in model.safetensors is F8_E4M3, but its block scales model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv are not in the checkpoint"),
        "{e}"
    );
}

/// Damaged headers and configs never panic (or abort on a huge allocation): each of a few hundred
/// seeded mutations of a shard's JSON header, the shard index and config.json loads or returns
/// an error. (The targeted tests above check the error messages; this one looks for crashes.)
#[test]
fn mutated_files_never_panic() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    // Bytes that turn a JSON header into other valid-looking JSON: digits grow shapes and
    // offsets, quotes and brackets break the structure.
    let alphabet = b"0123456789\"[]{},:-.eE F8_BUx ";
    for (case, file) in [
        ("deepseek_v3_bf16", "model-00002-of-00002.safetensors"),
        ("deepseek_v3_bf16", "model.safetensors.index.json"),
        ("qwen3_moe_fp8", "model.safetensors"),
        ("qwen3_moe_fp8", "config.json"),
        ("mixtral_f32", "config.json"),
    ] {
        let tmp = copy_fixture(case);
        let path = tmp.path().join(file);
        let original = std::fs::read(&path).unwrap();
        // The part worth damaging: a shard's 8-byte length and JSON header, or the whole JSON file.
        let span = if file.ends_with(".safetensors") {
            8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize
        } else {
            original.len()
        };
        for round in 0..120 {
            let mut bytes = original.clone();
            for _ in 0..1 + round % 3 {
                let at = next(span);
                bytes[at] = alphabet[next(alphabet.len())];
            }
            std::fs::write(&path, &bytes).unwrap();
            let got = std::panic::catch_unwind(|| load_layer(tmp.path(), 1, None).map(|_| ()));
            assert!(got.is_ok(), "{case}/{file}, round {round}: load_layer panicked");
        }
    }
}

/// Damage anywhere in a shard's header or in config.json (seeded random byte changes, hundreds of
/// them) is an error or, where the damage happens to be harmless, a layer: never a panic.
#[test]
fn random_damage_is_an_error_never_a_panic() {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move |n: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n.max(1)
    };
    for case in ["deepseek_v3_fp8", "qwen3_moe_bf16", "mixtral_f32"] {
        let tmp = copy_fixture(case);
        let shard = tmp.path().join("model.safetensors");
        let config = tmp.path().join("config.json");
        let (shard_bytes, config_bytes) = (std::fs::read(&shard).unwrap(), std::fs::read(&config).unwrap());
        let header = 8 + u64::from_le_bytes(shard_bytes[..8].try_into().unwrap()) as usize;
        let printable = b"0123456789,:[]{}\" .-eEabcdefghijklmnopqrstuvwxyzFIBU_";
        for round in 0..150 {
            let (file, original, span) =
                if round % 3 == 0 { (&config, &config_bytes, config_bytes.len()) } else { (&shard, &shard_bytes, header) };
            let mut bytes = original.clone();
            for _ in 0..1 + next(3) {
                let at = next(span);
                bytes[at] = if next(2) == 0 { printable[next(printable.len())] } else { next(256) as u8 };
            }
            std::fs::write(file, &bytes).unwrap();
            let result = std::panic::catch_unwind(|| load_layer(tmp.path(), 1, None));
            assert!(result.is_ok(), "{case}, round {round}: load_layer panicked on damaged {}", file.display());
            std::fs::write(file, original).unwrap();
        }
    }
}

/// A layer larger than the host's memory is an OutOfMemory sentence before anything is
/// allocated or read (overcommit would let the allocation succeed and the OOM killer end the
/// run). The checkpoint is a sparse file: 1.5x the host's memory of bf16 experts, declared in the
/// header and never written, so it costs no disk or memory.
#[test]
fn a_layer_larger_than_host_memory_is_refused_before_reading() {
    let (h, i) = (4096usize, 4096usize);
    let expert_bytes = 3 * h * i * 2;
    let experts = (moe_hal::host::memory_bytes() as usize * 3 / 2).div_ceil(expert_bytes);
    let tmp = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(fixture("qwen3_moe_bf16").join("config.json")).unwrap();
    let config = config
        .replace("\"hidden_size\": 64", &format!("\"hidden_size\": {h}"))
        .replace("\"moe_intermediate_size\": 32", &format!("\"moe_intermediate_size\": {i}"))
        .replace("\"num_local_experts\": 16", &format!("\"num_local_experts\": {experts}"));
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    // The header by hand: the router, then every expert's three projections, back to back.
    let mut entries = vec![];
    let mut at = 0usize;
    let mut add = |name: String, shape: [usize; 2]| {
        let end = at + shape[0] * shape[1] * 2;
        entries.push(format!("\"{name}\":{{\"dtype\":\"BF16\",\"shape\":[{},{}],\"data_offsets\":[{at},{end}]}}", shape[0], shape[1]));
        at = end;
    };
    add("model.layers.1.mlp.gate.weight".into(), [experts, h]);
    for x in 0..experts {
        for (p, shape) in [("gate_proj", [i, h]), ("up_proj", [i, h]), ("down_proj", [h, i])] {
            add(format!("model.layers.1.mlp.experts.{x}.{p}.weight"), shape);
        }
    }
    let mut header = format!("{{{}}}", entries.join(",")).into_bytes();
    header.resize(header.len().div_ceil(8) * 8, b' ');
    let path = tmp.path().join("model.safetensors");
    let mut f = std::fs::File::create(&path).unwrap();
    use std::io::Write;
    f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&header).unwrap();
    f.set_len((8 + header.len() + at) as u64).unwrap();
    drop(f);
    let e = load_layer(tmp.path(), 1, None).unwrap_err();
    let Error::OutOfMemory(msg) = &e else { panic!("{e:?}") };
    assert!(msg.starts_with("layer 1 needs") && msg.contains("GiB of host memory as bf16"), "{msg}");
}
