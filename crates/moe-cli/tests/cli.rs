//! End-to-end tests of the `moe` command: real Hugging Face checkpoints against transformers'
//! own float64 output, and every bad input the command promises a clear error for.

use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn moe(args: &[&str]) -> Output {
    Command::new(moe_bin()).args(args).output().expect("the moe binary runs")
}

/// The `moe` binary cargo built; where the test binary was moved to another machine without it
/// (a staged GPU check: `.device/bin/` holds both), the `moe` beside this test binary.
fn moe_bin() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_moe"));
    let beside = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("moe")));
    if built.exists() { built } else { beside.filter(|b| b.exists()).unwrap_or(built) }
}

/// tests/fixtures/hf of this checkout; on another machine (a staged GPU check runs from a copy of
/// the checkout's root), the one under the working directory.
fn fixtures() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/hf");
    if here.exists() { here } else { PathBuf::from("tests/fixtures/hf") }
}

fn f64s(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f64>) {
    let v = st.tensor(name).unwrap();
    let vals = match v.dtype() {
        Dtype::F64 => v.data().chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect(),
        Dtype::F32 => v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        Dtype::I64 => v.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        Dtype::I32 => v.data().chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
        d => panic!("unexpected dtype {d:?} for {name}"),
    };
    (v.shape().to_vec(), vals)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The backends this binary should be checked on: the CPU always, others when they are available
/// or required (MOE_REQUIRE_BACKENDS), so a required backend can never silently skip.
fn backends() -> Vec<String> {
    let required = std::env::var("MOE_REQUIRE_BACKENDS").unwrap_or_default();
    let devices = String::from_utf8_lossy(&moe(&["devices"]).stdout).into_owned();
    let mut out = vec!["cpu".to_string()];
    for b in ["wgpu", "cuda"] {
        let listed = devices.lines().any(|l| l.starts_with(b) && l.contains(" available:") && !l.contains("not available"));
        if listed || required.split(',').any(|r| r.trim() == b) {
            out.push(b.to_string());
        }
    }
    out
}

/// `moe run` on every fixture and backend matches transformers' float64 output: relative L2
/// under 1e-4 for f32 weights (FP8 ones dequantized to f32 included) and 2e-2 for bf16 and for
/// FP8 kept as stored (the default; exact products, but a tensor-core backend rounds them to
/// f16), with the same expert choices.
#[test]
fn run_matches_transformers() {
    // (fixture, --dtype, tolerance)
    let cases = [
        ("deepseek_v3_f32", None, 1e-4),
        ("deepseek_v3_bf16", None, 2e-2),
        ("deepseek_v3_fp8", None, 2e-2),
        ("deepseek_v3_fp8", Some("f32"), 1e-4),
        ("deepseek_v3_fp8", Some("bf16"), 2e-2),
        ("qwen3_moe_f32", None, 1e-4),
        ("qwen3_moe_bf16", None, 2e-2),
        ("qwen3_moe_fp8", None, 2e-2),
        ("qwen3_moe_fp8", Some("f32"), 1e-4),
        ("mixtral_f32", None, 1e-4),
        ("mixtral_bf16", None, 2e-2),
        ("kimi_k2_bf16", None, 2e-2),
    ];
    let dir = tempfile::tempdir().unwrap();
    for backend in backends() {
        for (case, dtype, tol) in cases {
            let model = fixtures().join(case);
            let out = dir.path().join(format!("{case}-{}-{backend}.safetensors", dtype.unwrap_or("default")));
            let input = model.join("input.safetensors");
            let mut args = run_args(&model, &input, &out);
            args.extend(["--backend", &backend]);
            args.extend(dtype.iter().flat_map(|d| ["--dtype", d]));
            let o = moe(&args);
            let case = format!("{case} ({})", dtype.unwrap_or("default dtype"));
            assert!(o.status.success(), "{case} on {backend}: {}", stderr(&o));
            let got_bytes = std::fs::read(&out).unwrap();
            let got = SafeTensors::deserialize(&got_bytes).unwrap();
            let want_bytes = std::fs::read(model.join("expected.safetensors")).unwrap();
            let want = SafeTensors::deserialize(&want_bytes).unwrap();
            assert_eq!(got.tensor("output").unwrap().dtype(), Dtype::F32);
            assert_eq!(got.tensor("topk_ids").unwrap().dtype(), Dtype::I32);
            assert_eq!(got.tensor("topk_weights").unwrap().dtype(), Dtype::F32);

            let (shape, y) = f64s(&got, "output");
            let (want_shape, y_ref) = f64s(&want, "output");
            assert_eq!(shape, want_shape, "{case}: output shape");
            let num: f64 = y.iter().zip(&y_ref).map(|(a, b)| (a - b).powi(2)).sum();
            let den: f64 = y_ref.iter().map(|b| b * b).sum();
            let rel = (num / den).sqrt();
            assert!(rel < tol, "{case} on {backend}: relative L2 {rel:.3e} >= {tol}");

            // Same expert sets, and the same weight for each chosen expert.
            let (ishape, ids) = f64s(&got, "topk_ids");
            let (_, ws) = f64s(&got, "topk_weights");
            let (_, ids_ref) = f64s(&want, "topk_ids");
            let (_, ws_ref) = f64s(&want, "topk_weights");
            let k = ishape[1];
            for t in 0..ishape[0] {
                let mut mine: Vec<(i64, f64)> = (0..k).map(|j| (ids[t * k + j] as i64, ws[t * k + j])).collect();
                mine.sort_by_key(|p| p.0);
                for (j, (id, w)) in mine.iter().enumerate() {
                    assert_eq!(*id, ids_ref[t * k + j] as i64, "{case} on {backend}: token {t} chose different experts");
                    assert!(
                        (w - ws_ref[t * k + j]).abs() <= 1e-4 * ws_ref[t * k + j].abs().max(1.0),
                        "{case} on {backend}: token {t} expert {id} weight {w} vs {}",
                        ws_ref[t * k + j]
                    );
                }
            }
            eprintln!("{case} on {backend}: relative L2 {rel:.2e}");
        }
    }
}

/// `moe run` on layer 1 of `model`, reading `input` and writing `out`.
fn run_args<'a>(model: &'a Path, input: &'a Path, out: &'a Path) -> Vec<&'a str> {
    let path = |p: &'a Path| p.to_str().unwrap();
    vec!["run", "--model", path(model), "--layer", "1", "--input", path(input), "--output", path(out)]
}

fn write_input(path: &Path, dtype: Dtype, shape: &[usize], data: &[u8]) {
    let v = safetensors::tensor::TensorView::new(dtype, shape.to_vec(), data).unwrap();
    std::fs::write(path, safetensors::serialize([("hidden_states", v)], None).unwrap()).unwrap();
}

/// Runs `moe run` on the mixtral fixture with the given input; returns (success, stderr) and
/// checks that a failure leaves no output file.
fn run_with(dir: &Path, input: &Path, extra: &[&str]) -> (bool, String) {
    let out = dir.join("out.safetensors");
    let _ = std::fs::remove_file(&out);
    let model = fixtures().join("mixtral_f32");
    let mut args = run_args(&model, input, &out);
    args.extend_from_slice(extra);
    let o = moe(&args);
    let err = stderr(&o);
    if !o.status.success() {
        assert!(!out.exists(), "a failed run left {} behind", out.display());
        assert!(!err.contains("panicked") && !err.contains("RUST_BACKTRACE"), "a panic: {err}");
        assert!(err.starts_with("error: "), "error is not one sentence: {err}");
        // Nothing half-written either: no temporary files remain.
        let leftovers: Vec<_> =
            std::fs::read_dir(dir).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().contains(".tmp-")).collect();
        assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
    }
    (o.status.success(), err)
}

#[test]
fn zero_tokens_give_empty_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    write_input(&input, Dtype::F32, &[0, 64], &[]);
    let (ok, err) = run_with(dir.path(), &input, &["--backend", "cpu"]);
    assert!(ok, "{err}");
    let bytes = std::fs::read(dir.path().join("out.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.tensor("output").unwrap().shape(), &[0, 64]);
    assert_eq!(st.tensor("topk_ids").unwrap().shape(), &[0, 2]);
    assert_eq!(st.tensor("topk_weights").unwrap().shape(), &[0, 2]);
}

#[test]
fn bf16_input_and_dtype_override() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let vals: Vec<u8> = (0..3 * 64).flat_map(|i| half::bf16::from_f32(((i * 37) % 17) as f32 / 17.0 - 0.5).to_le_bytes()).collect();
    write_input(&input, Dtype::BF16, &[3, 64], &vals);
    for dtype in ["f32", "f16", "bf16"] {
        let (ok, err) = run_with(dir.path(), &input, &["--backend", "cpu", "--dtype", dtype]);
        assert!(ok, "--dtype {dtype}: {err}");
    }
}

#[test]
fn bad_inputs_give_one_clear_sentence_and_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = fixtures().join("mixtral_f32/input.safetensors");

    // Non-finite input.
    let nan = d.join("nan.safetensors");
    let mut v = vec![0.5f32; 5 * 64];
    v[70] = f32::NAN;
    write_input(&nan, Dtype::F32, &[5, 64], bytemuck::cast_slice(&v));
    let (ok, err) = run_with(d, &nan, &["--backend", "cpu"]);
    assert!(!ok && err.contains("non-finite") && err.contains("token 1"), "{err}");

    // Wrong hidden size.
    let wide = d.join("wide.safetensors");
    write_input(&wide, Dtype::F32, &[2, 65], bytemuck::cast_slice(&vec![0.1f32; 130]));
    let (ok, err) = run_with(d, &wide, &["--backend", "cpu"]);
    assert!(!ok && err.contains("65 columns") && err.contains("hidden size 64"), "{err}");

    // Missing tensor, wrong rank, wrong dtype.
    let other = d.join("other.safetensors");
    let v = safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 64], bytemuck::cast_slice(&[0.1f32; 128])).unwrap();
    std::fs::write(&other, safetensors::serialize([("x", v)], None).unwrap()).unwrap();
    let (ok, err) = run_with(d, &other, &["--backend", "cpu"]);
    assert!(!ok && err.contains("no tensor named hidden_states"), "{err}");
    let rank3 = d.join("rank3.safetensors");
    write_input(&rank3, Dtype::F32, &[1, 2, 64], bytemuck::cast_slice(&[0.1f32; 128]));
    let (ok, err) = run_with(d, &rank3, &["--backend", "cpu"]);
    assert!(!ok && err.contains("[tokens, hidden]"), "{err}");
    let ints = d.join("ints.safetensors");
    write_input(&ints, Dtype::I32, &[2, 64], bytemuck::cast_slice(&[1i32; 128]));
    let (ok, err) = run_with(d, &ints, &["--backend", "cpu"]);
    assert!(!ok && err.contains("I32"), "{err}");

    // Truncated input file.
    let cut = d.join("cut.safetensors");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 10]).unwrap();
    let (ok, err) = run_with(d, &cut, &["--backend", "cpu"]);
    assert!(!ok && err.contains("not a valid safetensors file"), "{err}");

    // Missing input file.
    let (ok, err) = run_with(d, &d.join("nope.safetensors"), &["--backend", "cpu"]);
    assert!(!ok && err.contains("nope.safetensors"), "{err}");

    // The Ascend slot says what it is and writes nothing.
    let (ok, err) = run_with(d, &good, &["--backend", "cann"]);
    assert!(!ok && err.contains("slot"), "{err}");

    // A layer out of range, and the dense first layer of DeepSeek-V3.
    let out = d.join("o.safetensors");
    for (model, layer, needle) in [("mixtral_f32", "7", "layer"), ("deepseek_v3_f32", "0", "dense")] {
        let m = fixtures().join(model);
        let o = moe(&[
            "run",
            "--model",
            m.to_str().unwrap(),
            "--layer",
            layer,
            "--input",
            m.join("input.safetensors").to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--backend",
            "cpu",
        ]);
        let err = stderr(&o);
        assert!(!o.status.success() && err.contains(needle) && !out.exists(), "{model} layer {layer}: {err}");
    }

    // A missing model directory.
    let o = moe(&[
        "run",
        "--model",
        "/nonexistent/model",
        "--layer",
        "1",
        "--input",
        good.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success() && stderr(&o).contains("/nonexistent/model"), "{}", stderr(&o));

    // An output that cannot be written is refused before the layer is loaded or run.
    let m = fixtures().join("mixtral_f32");
    let unwritable = d.join("no-such-dir/o.safetensors");
    let o = moe(&run_args(&m, &good, &unwritable));
    let err = stderr(&o);
    assert!(!o.status.success() && err.contains("--output") && err.contains("does not exist"), "{err}");
    assert!(!err.contains("moe run: "), "the layer ran: {err}");

    // An output that would replace the input or a file of the checkpoint is refused, and they
    // stay as they were.
    let model = d.join("model");
    std::fs::create_dir(&model).unwrap();
    for f in ["config.json", "model.safetensors", "input.safetensors"] {
        std::fs::copy(m.join(f), model.join(f)).unwrap();
    }
    let input = model.join("input.safetensors");
    for (target, needle) in
        [(input.clone(), "--input"), (model.join("model.safetensors"), "checkpoint"), (model.join("config.json"), "checkpoint")]
    {
        let before = std::fs::read(&target).unwrap();
        let o = moe(&run_args(&model, &input, &target));
        let err = stderr(&o);
        assert!(!o.status.success() && err.contains(needle), "{}: {err}", target.display());
        assert_eq!(std::fs::read(&target).unwrap(), before, "{} changed", target.display());
    }
    // An input that is not a regular file is refused, not read until memory runs out.
    let (ok, err) = run_with(d, Path::new("/dev/zero"), &["--backend", "cpu"]);
    assert!(!ok && err.contains("not a regular file"), "{err}");
    // A dtype that is not a weight dtype.
    let o = moe(&[&run_args(&m, &good, &out)[..], &["--dtype", "u32"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("not a weight dtype"), "{}", stderr(&o));
}

#[test]
fn devices_lists_every_backend() {
    let o = moe(&["devices"]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for b in ["cpu", "wgpu", "cuda", "cann"] {
        assert!(s.lines().any(|l| l.starts_with(b)), "{b} missing from:\n{s}");
    }
    assert!(s.lines().any(|l| l.starts_with("cpu") && l.contains(" available:")), "{s}");
}

#[test]
fn demo_runs_and_checks_itself() {
    let o = moe(&[
        "demo",
        "--backend",
        "cpu",
        "--tokens",
        "9",
        "--hidden",
        "129",
        "--intermediate",
        "33",
        "--experts",
        "16",
        "--top-k",
        "4",
        "--iters",
        "2",
    ]);
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{s}{}", stderr(&o));
    for needle in ["routing:", "error:", "time:", "GB/s", "matches the reference"] {
        assert!(s.contains(needle), "{needle} missing from:\n{s}");
    }
}

/// `moe conform` writes a complete support matrix (Markdown and JSON) with every cell passing, for
/// every backend checked here.
#[test]
fn conform_writes_a_complete_passing_matrix() {
    let dir = tempfile::tempdir().unwrap();
    for backend in backends() {
        let base = dir.path().join(format!("matrix-{backend}"));
        let o = moe(&["conform", "--backend", &backend, "--report", base.to_str().unwrap()]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{backend}: {out}{}", stderr(&o));
        let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(base.with_extension("json")).unwrap()).unwrap();
        let cases = json["cases"].as_array().unwrap();
        assert!(cases.len() > 100, "{backend}: only {} cases", cases.len());
        for c in cases {
            assert_eq!(c["result"], "pass", "{backend}: {c}");
        }
        let md = std::fs::read_to_string(base.with_extension("md")).unwrap();
        for op in ["router_topk", "permute", "grouped_gemm", "activation", "combine", "forward"] {
            assert!(md.contains(&format!("| {op} |")), "{backend}: {op} missing from the matrix");
        }
        let passing_rows = md.lines().filter(|l| l.split('|').map(str::trim).nth(5) == Some("pass")).count();
        assert_eq!(passing_rows, cases.len(), "{backend}: every case is a passing row");
    }
    // A filter that matches nothing is an error, not an empty success.
    let o = moe(&["conform", "--backend", "cpu", "--filter", "no-such-case"]);
    assert!(!o.status.success() && stderr(&o).contains("no conformance case"));
}

/// `moe bench` on a tiny shape (hidden 64, 16 experts of 16, top-4) for `backends`, with `more`
/// flags.
fn tiny_bench(backends: &str, more: &[&str]) -> std::process::Output {
    let mut args = vec!["bench", "--backend", backends, "--hidden", "64", "--intermediate", "16", "--experts", "16", "--top-k", "4"];
    args.extend_from_slice(more);
    moe(&args)
}

/// The bench is a tool, not a timed test: this only proves it runs end to end on a tiny shape
/// (table, JSON, plot, comparison).
#[test]
fn bench_runs_end_to_end_on_a_tiny_shape() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("b.json");
    let svg = dir.path().join("b.svg");
    let quick = ["--tokens", "1,3", "--iters", "2", "--warmup", "1"];
    let o = tiny_bench("cpu", &[&quick[..], &["--json", json.to_str().unwrap(), "--plot", svg.to_str().unwrap(), "--breakdown"]].concat());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{out}{}", stderr(&o));
    assert!(out.contains("of floor") && out.contains("GB/s"), "{out}");
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let rows = report["runs"][0]["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for r in rows {
        let (t, f) = (r["time_s"].as_f64().unwrap(), r["floor_s"].as_f64().unwrap());
        assert!(t > 0.0 && f > 0.0 && r["bytes"].as_f64().unwrap() > 0.0, "{r}");
        // --breakdown: every stage, in order, each timed.
        let stages = r["stages"].as_array().unwrap();
        let names: Vec<&str> = stages.iter().map(|s| s["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["router", "top-k", "permute", "gate/up", "down", "shared", "combine"]);
        assert!(stages.iter().all(|s| s["time_s"].as_f64().unwrap() > 0.0), "{r}");
    }
    assert!(out.contains("stages (ms, each alone): router"), "{out}");
    assert!(std::fs::read_to_string(&svg).unwrap().starts_with("<svg"));
    // The same plot as PNG (text drawn with a system TrueType font).
    let png = dir.path().join("b.png");
    let o = tiny_bench("cpu", &[&quick[..], &["--plot", png.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(std::fs::read(&png).unwrap().starts_with(b"\x89PNG"), "not a PNG");
    let o = moe(&["bench", "--backend", "cpu", "--tokens", "1", "--plot", "x.gif"]);
    assert!(!o.status.success() && stderr(&o).contains("SVG or PNG"), "{}", stderr(&o));
    let o = tiny_bench("cpu", &[&quick[..], &["--compare", json.to_str().unwrap()]].concat());
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("ratio"), "{}", stderr(&o));
    // A backend that cannot run (CANN has no device here) fails the command but loses nothing:
    // the CPU's rows are printed and written.
    let o = tiny_bench("cann,cpu", &["--tokens", "1", "--iters", "1", "--warmup", "0", "--json", json.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("cann failed"), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["runs"].as_array().unwrap().len(), 1, "{report}");
    assert_eq!(report["runs"][0]["backend"], "cpu");
    assert_eq!(report["runs"][0]["rows"].as_array().unwrap().len(), 1);
    // An output that cannot be written fails before anything is timed, not after.
    let nowhere = dir.path().join("no-such-dir");
    for flag in ["--json", "--plot"] {
        let o = tiny_bench("cpu", &[&quick[..], &[flag, nowhere.join("b.svg").to_str().unwrap()]].concat());
        let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
        assert!(!o.status.success() && err.contains(flag) && err.contains("does not exist"), "{err}");
        assert!(!out.contains("of floor"), "it ran first: {out}");
    }
    // Bad flags are one sentence.
    for bad in [&["--tokens", "0"][..], &["--bandwidth-gbs", "0"], &["--peak-tflops", "nan"], &["--dtype", "u32"]] {
        let o = moe(&[&["bench", "--backend", "cpu"][..], bad].concat());
        assert!(!o.status.success() && stderr(&o).starts_with("error: "), "{bad:?}: {}", stderr(&o));
    }
    // Nothing measured (every token count skipped, or no backend ran): the command fails and
    // writes no file.
    let empty = dir.path().join("empty.json");
    for (backends, extra) in [("cpu", &["--shared", "1000000000"][..]), ("cann", &[])] {
        let o = tiny_bench(backends, &[&["--tokens", "1", "--iters", "1", "--json", empty.to_str().unwrap()][..], extra].concat());
        assert!(!o.status.success() && !empty.exists(), "{backends} {extra:?}: {}", stderr(&o));
    }
    // A comparison file that is not a regular file, or whose times are not positive.
    let o = tiny_bench("cpu", &[&quick[..], &["--compare", "/dev/zero"]].concat());
    assert!(!o.status.success() && stderr(&o).contains("not a regular file"), "{}", stderr(&o));
    let mut bad: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    bad["runs"][0]["rows"][0]["time_s"] = serde_json::json!(-1.0);
    let bad_json = dir.path().join("bad.json");
    std::fs::write(&bad_json, bad.to_string()).unwrap();
    let o = tiny_bench("cpu", &[&quick[..], &["--compare", bad_json.to_str().unwrap()]].concat());
    assert!(!o.status.success() && stderr(&o).contains("positive seconds"), "{}", stderr(&o));
}
