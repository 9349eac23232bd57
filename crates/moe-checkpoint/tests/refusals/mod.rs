//! Checkpoints that must be refused with a sentence (not loaded into a silently wrong layer, not
//! hung on, not read to exhaustion), and mixed dtypes that must not lose precision.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{copy_fixture, load, rewrite};
use moe_checkpoint::{Stored, load_layer};
use moe_hal::{DType, Error};
use safetensors::Dtype;

/// Edits a fixture copy's config.json as JSON.
fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) -> PathBuf {
    let path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(cfg.as_object_mut().unwrap());
    std::fs::write(&path, cfg.to_string()).unwrap();
    path
}

/// `load_layer(dir, 1, None)` on another thread: a regression that blocks (a FIFO) fails the test
/// instead of hanging it.
fn load_within(dir: &Path) -> moe_hal::Result<moe_checkpoint::Checkpoint> {
    let (tx, rx) = std::sync::mpsc::channel();
    let dir = dir.to_path_buf();
    std::thread::spawn(move || {
        let _ = tx.send(load_layer(&dir, 1, None));
    });
    rx.recv_timeout(Duration::from_secs(60)).unwrap_or_else(|_| panic!("load_layer did not return within 60 s"))
}

#[test]
fn hidden_act_other_than_silu_is_refused() {
    for case in ["deepseek_v3_f32", "kimi_k2_bf16", "qwen3_moe_f32", "mixtral_f32"] {
        for act in ["gelu", "relu", "gelu_pytorch_tanh", "SiLU"] {
            let tmp = copy_fixture(case);
            let cfg = edit_config(tmp.path(), |c| {
                c.insert("hidden_act".into(), act.into());
            });
            let e = load_layer(tmp.path(), 1, None).unwrap_err();
            assert_eq!(
                e,
                Error::Checkpoint(format!(
                    "{} has \"hidden_act\": \"{act}\", which moe-hal does not compute: its experts apply SiLU (\"silu\", or \"swish\" as transformers also calls it)",
                    cfg.display()
                )),
                "{case}"
            );
        }
        let tmp = copy_fixture(case);
        edit_config(tmp.path(), |c| {
            c.insert("hidden_act".into(), 3.into());
        });
        let e = load_layer(tmp.path(), 1, None).unwrap_err().to_string();
        assert!(e.ends_with("has \"hidden_act\": 3, which is not a string"), "{case}: {e}");
        // "swish" is SiLU, and a missing (or null) hidden_act keeps every family's default, SiLU.
        let want = load(case, None).layer;
        for act in [Some("swish".into()), Some(serde_json::Value::Null), None] {
            let tmp = copy_fixture(case);
            edit_config(tmp.path(), |c| {
                match act.clone() {
                    Some(v) => c.insert("hidden_act".into(), v),
                    None => c.remove("hidden_act"),
                };
            });
            assert_eq!(load_layer(tmp.path(), 1, None).unwrap().layer, want, "{case}: hidden_act {act:?}");
        }
    }
}

/// A copy of `case` with tensor `name` (in the single file) replaced by `edit` of its bytes.
fn with_tensor(case: &str, name: &str, edit: impl Fn(Dtype, &[u8]) -> Vec<u8>) -> tempfile::TempDir {
    let tmp = copy_fixture(case);
    let mut seen = false;
    rewrite(&tmp.path().join("model.safetensors"), |n, d, s, b| {
        let b = if n == name {
            seen = true;
            edit(d, b)
        } else {
            b.to_vec()
        };
        vec![(n.into(), d, s.to_vec(), b)]
    });
    assert!(seen, "{case} has no {name}");
    tmp
}

/// `value` written at element `at` of a float tensor's bytes.
fn poke(d: Dtype, bytes: &[u8], at: usize, value: f32) -> Vec<u8> {
    let dt = match d {
        Dtype::F32 => DType::F32,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        other => panic!("{other:?}"),
    };
    let mut b = bytes.to_vec();
    b[at * dt.size()..(at + 1) * dt.size()].copy_from_slice(&dt.encode(&[value]));
    b
}

#[test]
fn non_finite_router_or_bias_is_refused() {
    let file = "model.safetensors";
    // hidden 64: element 70 is row 1, column 6.
    for (case, name, value, shown) in [
        ("deepseek_v3_f32", "model.layers.1.mlp.gate.weight", f32::NAN, "NaN"),
        ("qwen3_moe_f32", "model.layers.1.mlp.gate.weight", f32::INFINITY, "inf"),
        ("qwen3_moe_bf16", "model.layers.1.mlp.gate.weight", f32::NAN, "NaN"),
        ("mixtral_f32", "model.layers.1.block_sparse_moe.gate.weight", f32::NEG_INFINITY, "-inf"),
    ] {
        let tmp = with_tensor(case, name, |d, b| poke(d, b, 70, value));
        let e = load_layer(tmp.path(), 1, None).unwrap_err();
        assert_eq!(
            e,
            Error::Checkpoint(format!("tensor {name} in {file} holds a non-finite value ({shown}) at element 70 (row 1, column 6)")),
            "{case}"
        );
    }
    let bias = "model.layers.1.mlp.gate.e_score_correction_bias";
    for (value, shown) in [(f32::INFINITY, "inf"), (f32::NAN, "NaN")] {
        let tmp = with_tensor("deepseek_v3_f32", bias, |d, b| poke(d, b, 11, value));
        let e = load_layer(tmp.path(), 1, None).unwrap_err();
        assert_eq!(e, Error::Checkpoint(format!("tensor {bias} in {file} holds a non-finite value ({shown}) at element 11")));
    }
    // The largest finite values still load.
    let tmp = with_tensor("qwen3_moe_bf16", "model.layers.1.mlp.gate.weight", |d, b| poke(d, b, 70, f32::from_bits(0x7F7F_0000)));
    load_layer(tmp.path(), 1, None).unwrap();
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    let ok = std::process::Command::new("mkfifo").arg(path).status().unwrap().success();
    assert!(ok, "mkfifo {}", path.display());
}

#[cfg(unix)]
#[test]
fn files_that_are_not_regular_are_refused() {
    use std::os::unix::fs::symlink;
    let err = |dir: &Path| match load_within(dir) {
        Err(Error::Checkpoint(msg)) => msg,
        other => panic!("{}: {other:?}", dir.display()),
    };

    // config.json: a link to an endless device, a FIFO, a directory.
    let tmp = copy_fixture("mixtral_f32");
    let cfg = tmp.path().join("config.json");
    std::fs::remove_file(&cfg).unwrap();
    symlink("/dev/zero", &cfg).unwrap();
    assert_eq!(
        err(tmp.path()),
        format!("{} is a symbolic link to /dev/zero, which is a character device, not a regular file", cfg.display())
    );
    std::fs::remove_file(&cfg).unwrap();
    mkfifo(&cfg);
    assert_eq!(err(tmp.path()), format!("{} is a FIFO (named pipe), not a regular file", cfg.display()));
    std::fs::remove_file(&cfg).unwrap();
    std::fs::create_dir(&cfg).unwrap();
    assert_eq!(err(tmp.path()), format!("{} is a directory, not a regular file", cfg.display()));
    std::fs::remove_dir(&cfg).unwrap();
    symlink(tmp.path().join("gone.json"), &cfg).unwrap();
    assert_eq!(
        err(tmp.path()),
        format!("{} is a broken symbolic link: its target {} does not exist", cfg.display(), tmp.path().join("gone.json").display())
    );

    // model.safetensors: a FIFO, a directory.
    let tmp = copy_fixture("mixtral_f32");
    let single = tmp.path().join("model.safetensors");
    std::fs::remove_file(&single).unwrap();
    mkfifo(&single);
    assert_eq!(err(tmp.path()), format!("{} is a FIFO (named pipe), not a regular file", single.display()));
    std::fs::remove_file(&single).unwrap();
    std::fs::create_dir(&single).unwrap();
    assert_eq!(err(tmp.path()), format!("{} is a directory, not a regular file", single.display()));

    // The index: a link to /dev/zero, a FIFO.
    let tmp = copy_fixture("deepseek_v3_bf16");
    let index = tmp.path().join("model.safetensors.index.json");
    std::fs::remove_file(&index).unwrap();
    symlink("/dev/zero", &index).unwrap();
    assert_eq!(
        err(tmp.path()),
        format!("{} is a symbolic link to /dev/zero, which is a character device, not a regular file", index.display())
    );
    std::fs::remove_file(&index).unwrap();
    mkfifo(&index);
    assert_eq!(err(tmp.path()), format!("{} is a FIFO (named pipe), not a regular file", index.display()));

    // A shard the index lists: a directory, a FIFO, a link to /dev/zero.
    let tmp = copy_fixture("deepseek_v3_bf16");
    let index = tmp.path().join("model.safetensors.index.json");
    let weight_map: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let router = "model.layers.1.mlp.gate.weight";
    let shard = tmp.path().join(weight_map["weight_map"][router].as_str().unwrap());
    let why = format!(", but {} lists it as the shard holding {router}", index.display());
    std::fs::remove_file(&shard).unwrap();
    std::fs::create_dir(&shard).unwrap();
    assert_eq!(err(tmp.path()), format!("{} is a directory, not a regular file{why}", shard.display()));
    std::fs::remove_dir(&shard).unwrap();
    mkfifo(&shard);
    assert_eq!(err(tmp.path()), format!("{} is a FIFO (named pipe), not a regular file{why}", shard.display()));
    std::fs::remove_file(&shard).unwrap();
    symlink("/dev/zero", &shard).unwrap();
    assert_eq!(
        err(tmp.path()),
        format!("{} is a symbolic link to /dev/zero, which is a character device, not a regular file{why}", shard.display())
    );

    // A symbolic link to a regular file is followed.
    let tmp = copy_fixture("mixtral_f32");
    let real = tmp.path().join("real-config.json");
    std::fs::rename(tmp.path().join("config.json"), &real).unwrap();
    symlink(&real, tmp.path().join("config.json")).unwrap();
    assert_eq!(load_within(tmp.path()).unwrap().layer, load("mixtral_f32", None).layer);
}

/// config.json and the index are read up to 64 MiB, not to their end. The files are sparse: they
/// cost no disk.
#[test]
fn oversized_json_files_are_refused() {
    let big = (64u64 << 20) + 1;
    let tmp = copy_fixture("mixtral_f32");
    let cfg = tmp.path().join("config.json");
    std::fs::OpenOptions::new().write(true).open(&cfg).unwrap().set_len(big).unwrap();
    assert_eq!(
        load_layer(tmp.path(), 1, None).unwrap_err(),
        Error::Checkpoint(format!("{} holds {big} bytes, more than the 64 MiB a checkpoint's JSON file is read up to", cfg.display()))
    );
    let tmp = copy_fixture("deepseek_v3_bf16");
    let index = tmp.path().join("model.safetensors.index.json");
    std::fs::OpenOptions::new().write(true).open(&index).unwrap().set_len(big).unwrap();
    assert_eq!(
        load_layer(tmp.path(), 1, None).unwrap_err(),
        Error::Checkpoint(format!("{} holds {big} bytes, more than the 64 MiB a checkpoint's JSON file is read up to", index.display()))
    );
    // Not UTF-8.
    let tmp = copy_fixture("mixtral_f32");
    std::fs::write(tmp.path().join("config.json"), b"{\"model_type\": \"\xff\"}").unwrap();
    let e = load_layer(tmp.path(), 1, None).unwrap_err().to_string();
    assert!(e.contains("config.json is not valid JSON: it is not UTF-8 text"), "{e}");
}

#[test]
fn index_cannot_name_a_shard_outside_the_directory() {
    let outside = copy_fixture("deepseek_v3_bf16");
    let router = "model.layers.1.mlp.gate.weight";
    let tmp = copy_fixture("deepseek_v3_bf16");
    let index = tmp.path().join("model.safetensors.index.json");
    let original: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    let shard = original["weight_map"][router].as_str().unwrap().to_string();
    // An absolute path to a real shard, and relative paths that leave (or stay in) the directory.
    let absolute = outside.path().join(&shard).display().to_string();
    let up = format!("../{}/{shard}", outside.path().file_name().unwrap().to_str().unwrap());
    for name in [absolute.as_str(), up.as_str(), "./model-00001-of-00002.safetensors", "sub/../model-00001-of-00002.safetensors", ""] {
        let mut edited = original.clone();
        edited["weight_map"][router] = name.into();
        std::fs::write(&index, edited.to_string()).unwrap();
        let e = load_layer(tmp.path(), 1, None).unwrap_err();
        assert_eq!(
            e,
            Error::Checkpoint(format!(
                "{} maps tensor {router} to \"{name}\", which is not a file inside the checkpoint directory: shard names must be relative, without \"..\"",
                index.display()
            )),
            "{name}"
        );
    }
    // A shard in a subdirectory of the checkpoint is inside it.
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    std::fs::rename(tmp.path().join(&shard), tmp.path().join("sub").join(&shard)).unwrap();
    let mut edited = original.clone();
    for (_, v) in edited["weight_map"].as_object_mut().unwrap() {
        if v.as_str() == Some(&shard) {
            *v = format!("sub/{shard}").into();
        }
    }
    std::fs::write(&index, edited.to_string()).unwrap();
    assert_eq!(load_layer(tmp.path(), 1, None).unwrap().layer, load("deepseek_v3_bf16", None).layer);
}

#[test]
fn layer_counts_of_zero_and_one_read_well() {
    for (n, want) in [
        (0, "layer 1 does not exist: this qwen3_moe model has no layers (num_hidden_layers is 0)"),
        (1, "layer 1 does not exist: this qwen3_moe model has 1 layer, numbered 0; choose layer 0"),
    ] {
        let tmp = copy_fixture("qwen3_moe_f32");
        edit_config(tmp.path(), |c| {
            c.insert("num_hidden_layers".into(), n.into());
        });
        assert_eq!(load_layer(tmp.path(), 1, None).unwrap_err(), Error::InvalidArgument(want.into()));
    }
}

#[test]
fn other_dtypes_list_every_accepted_one() {
    let file = "model.safetensors";
    for name in ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.experts.2.down_proj.weight"] {
        let tmp = copy_fixture("qwen3_moe_f32");
        rewrite(&tmp.path().join(file), |n, d, s, b| {
            if n == name {
                vec![(n.into(), Dtype::F8_E5M2, s.to_vec(), b[..b.len() / 4].to_vec())]
            } else {
                vec![(n.into(), d, s.to_vec(), b.to_vec())]
            }
        });
        let e = load_layer(tmp.path(), 1, None).unwrap_err();
        assert_eq!(
            e,
            Error::Checkpoint(format!(
                "tensor {name} in {file} has dtype F8_E5M2; weights must be F32, F16 or BF16, or F8_E4M3 with block scales (expert weights only)"
            ))
        );
    }
}

/// The JSON header of a safetensors file and the rest of its bytes.
fn split_header(path: &Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&bytes[8..8 + n]).unwrap(), bytes[8 + n..].to_vec())
}

fn join_header(path: &Path, header: &serde_json::Value, data: &[u8]) {
    let mut h = header.to_string().into_bytes();
    h.resize(h.len().div_ceil(8) * 8, b' ');
    std::fs::write(path, [&(h.len() as u64).to_le_bytes()[..], &h, data].concat()).unwrap();
}

#[test]
fn inconsistent_header_entries_name_the_tensor_and_file() {
    let name = "model.layers.1.mlp.experts.3.up_proj.weight";
    let cases: [(&str, serde_json::Value, String); 3] = [
        ("shape", serde_json::json!([32, 63]), format!("tensor {name} is F32 [32, 63], which takes 8064 bytes, but its data_offsets [")),
        ("dtype", serde_json::json!("F16"), format!("tensor {name} is F16 [32, 64], which takes 4096 bytes, but its data_offsets [")),
        (
            "shape",
            serde_json::json!([32, 64, 1, 0]),
            format!("tensor {name} is F32 [32, 64, 1, 0], which takes 0 bytes, but its data_offsets ["),
        ),
    ];
    for (key, value, want) in cases {
        let tmp = copy_fixture("qwen3_moe_f32");
        let path = tmp.path().join("model.safetensors");
        let (mut header, data) = split_header(&path);
        header[name][key] = value;
        join_header(&path, &header, &data);
        let e = load_layer(tmp.path(), 1, None).unwrap_err();
        let Error::Checkpoint(msg) = &e else { panic!("{e:?}") };
        assert!(msg.starts_with(&format!("{} is not a valid safetensors file: {want}", path.display())), "{msg}");
        assert!(msg.ends_with("] span 8192 bytes"), "{msg}");
    }
    // Offsets that leave a gap before a tensor.
    let tmp = copy_fixture("qwen3_moe_f32");
    let path = tmp.path().join("model.safetensors");
    let (mut header, data) = split_header(&path);
    let (s, e) = (header[name]["data_offsets"][0].as_u64().unwrap(), header[name]["data_offsets"][1].as_u64().unwrap());
    header[name]["data_offsets"] = serde_json::json!([s + 4, e]);
    join_header(&path, &header, &data);
    let msg = load_layer(tmp.path(), 1, None).unwrap_err().to_string();
    assert!(
        msg.contains(&format!(
            "is not a valid safetensors file: tensor {name} (F32 [32, 64], data_offsets [{}, {e}]) does not start where the data before it ends (byte {s})",
            s + 4
        )),
        "{msg}"
    );
}

/// Converts the tensors `pick` chooses of a single-file fixture copy to `to`.
fn convert(case: &str, to: Dtype, pick: impl Fn(&str) -> bool) -> tempfile::TempDir {
    let tmp = copy_fixture(case);
    rewrite(&tmp.path().join("model.safetensors"), |n, d, s, b| {
        if !pick(n) {
            return vec![(n.into(), d, s.to_vec(), b.to_vec())];
        }
        assert_eq!(d, Dtype::F32, "{n}");
        let values = DType::F32.decode(b);
        let enc = match to {
            Dtype::F16 => DType::F16.encode(&values),
            Dtype::BF16 => DType::BF16.encode(&values),
            other => panic!("{other:?}"),
        };
        vec![(n.into(), to, s.to_vec(), enc)]
    });
    tmp
}

#[test]
fn mixed_expert_dtypes_keep_the_widest() {
    let f32_layer = load("qwen3_moe_f32", None).layer;
    let (h, i) = (64, 32);
    // The first routed tensor in f16, the rest f32: the layer stays f32, that tensor widened exactly.
    let first = "model.layers.1.mlp.experts.0.gate_proj.weight";
    let tmp = convert("qwen3_moe_f32", Dtype::F16, |n| n == first);
    let ck = load_layer(tmp.path(), 1, None).unwrap();
    assert_eq!((ck.layer.dtype, ck.stored), (DType::F32, Stored::Float(DType::F32)));
    let gu = ck.layer.gate_up.to_f32();
    let want = f32_layer.gate_up.to_f32();
    assert_eq!(gu[..i * h], DType::F16.decode(&DType::F16.encode(&want[..i * h]))[..]);
    assert_eq!(gu[i * h..], want[i * h..]);
    assert_eq!(ck.layer.down, f32_layer.down);
    assert!(ck.summary().contains(", weights f32,"), "{}", ck.summary());
    // A forced dtype is honoured.
    assert_eq!(load_layer(tmp.path(), 1, Some(DType::F16)).unwrap().layer.dtype, DType::F16);

    // f16 and bf16 mixed: neither holds the other, so f32.
    let tmp = convert("qwen3_moe_f32", Dtype::BF16, |n| n.contains(".experts.") && n != first);
    rewrite(&tmp.path().join("model.safetensors"), |n, d, s, b| {
        if n == first {
            vec![(n.into(), Dtype::F16, s.to_vec(), DType::F16.encode(&DType::F32.decode(b)))]
        } else {
            vec![(n.into(), d, s.to_vec(), b.to_vec())]
        }
    });
    let ck = load_layer(tmp.path(), 1, None).unwrap();
    assert_eq!((ck.layer.dtype, ck.stored), (DType::F32, Stored::Float(DType::F32)));
    // All bf16: bf16, as before.
    let tmp = convert("qwen3_moe_f32", Dtype::BF16, |n| n.contains(".experts."));
    assert_eq!(load_layer(tmp.path(), 1, None).unwrap().layer.dtype, DType::BF16);

    // Routed experts bf16, the shared expert f32: the layer is f32, so the shared expert is not
    // rounded; the routed experts are reported as stored in bf16.
    let tmp = convert("deepseek_v3_f32", Dtype::BF16, |n| n.contains(".mlp.experts."));
    let ck = load_layer(tmp.path(), 1, None).unwrap();
    let f32_ds = load("deepseek_v3_f32", None).layer;
    assert_eq!((ck.layer.dtype, ck.stored), (DType::F32, Stored::Float(DType::BF16)));
    assert_eq!(ck.layer.shared_gate_up, f32_ds.shared_gate_up);
    assert_eq!(ck.layer.shared_down, f32_ds.shared_down);
    assert!(ck.summary().contains("weights f32 (stored bf16)"), "{}", ck.summary());
}
