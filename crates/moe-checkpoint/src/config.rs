//! `config.json`: which model family a checkpoint is, the shape of its MoE layers, and which
//! layers are MoE.

use std::path::{Path, PathBuf};

use moe_hal::{Error, MoeConfig, Result, Routing};
use serde_json::{Map, Value};

/// The `model_type`s read with DeepSeek-V3's tensor layout. Any other `model_type` whose config
/// has `n_routed_experts` is read the same way (GLM-4.5's `glm4_moe`, for instance).
pub const DEEPSEEK_MODEL_TYPES: [&str; 4] = ["deepseek_v3", "deepseek_v32", "kimi_k2", "deepseek_v2"];

/// The tensor layout and config keys a checkpoint follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// DeepSeek-V3 and Kimi K2 (and DeepSeek-V2 with plain softmax routing):
    /// `model.layers.N.mlp.{gate, experts.E, shared_experts}`, sigmoid grouped routing with
    /// `e_score_correction_bias`, dense layers before `first_k_dense_replace`.
    DeepSeek,
    /// Qwen3-MoE: `model.layers.N.mlp.{gate, experts.E}`, softmax routing, no shared expert.
    Qwen3Moe,
    /// Mixtral: `model.layers.N.block_sparse_moe.{gate, experts.E.{w1, w3, w2}}`, softmax routing
    /// always renormalised.
    Mixtral,
}

/// Which decoder layers carry an MoE block rather than a dense MLP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MoeLayers {
    /// DeepSeek: layer `N` is MoE iff `N >= first_k_dense_replace && N % moe_layer_freq == 0`.
    DenseFirst {
        /// Layers `0..first_k_dense_replace` are dense.
        first_k_dense_replace: usize,
        /// Every `moe_layer_freq`-th layer is MoE (1 in every released DeepSeek model). DeepSeek's
        /// own modeling code reads it so; transformers ignores it (every layer from
        /// `first_k_dense_replace` on is MoE), which differs only for a value above 1.
        moe_layer_freq: usize,
    },
    /// Qwen3-MoE: layer `N` is MoE iff `N` is not in `mlp_only_layers` and
    /// `(N + 1) % decoder_sparse_step == 0`.
    SparseStep {
        /// Every `decoder_sparse_step`-th layer (counting from 1) is MoE.
        decoder_sparse_step: usize,
        /// Layers forced to be dense.
        mlp_only_layers: Vec<usize>,
    },
    /// Mixtral: every layer is MoE.
    All,
}

/// What `config.json` says about the model and its MoE layers.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The file this was read from.
    pub path: PathBuf,
    /// `model_type` as written (`deepseek_v3`, `kimi_k2`, `qwen3_moe`, `mixtral`, ..).
    pub model_type: String,
    /// The tensor layout the checkpoint is read with.
    pub family: Family,
    /// `num_hidden_layers`: valid layer numbers are `0..num_hidden_layers`.
    pub num_hidden_layers: usize,
    /// The shape and routing of every MoE layer. `shared_intermediate` is
    /// `n_shared_experts * moe_intermediate_size` when the config gives `n_shared_experts`;
    /// when it does not, the loader reads it from the shared expert tensors (0 when absent).
    pub moe: MoeConfig,
    /// `n_shared_experts` (DeepSeek), `None` when the config does not say.
    pub n_shared_experts: Option<usize>,
    /// Which layers are MoE.
    pub moe_layers: MoeLayers,
    /// The checkpoint's declared dtype (`dtype`, or `torch_dtype` in older files), if any. Only
    /// informative: the loader goes by the dtypes in the safetensors headers.
    pub declared_dtype: Option<String>,
    /// `quantization_config.weight_block_size` where the config declares DeepSeek's fine-grained
    /// FP8 (`"quant_method": "fp8"`, `"fmt": "e4m3"`; DeepSeek-V3 and Kimi K2 give `[128, 128]`,
    /// the default when the key is absent): the `[rows, columns]` each `weight_scale_inv` entry
    /// scales. `None` without such a config.
    pub fp8_block: Option<[usize; 2]>,
    /// `quantization_config.quant_method` when the config has one (`fp8`, `compressed-tensors`,
    /// `awq`, `gptq`, `mxfp4`, ..): only `fp8` (DeepSeek's block scales) is read; with any other,
    /// a layer that fails to load says so.
    pub quant_method: Option<String>,
}

impl ModelConfig {
    /// Reads and interprets `path` (a `config.json`).
    ///
    /// A missing file, one that is not a regular file (a directory, FIFO or device, symbolic
    /// links followed) or larger than 64 MiB, invalid JSON, an unknown `model_type`, a missing or
    /// ill-typed key, an unsupported routing or activation are [`Error::Checkpoint`]; other OS
    /// errors are [`Error::Io`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let Some(text) = crate::files::read_json(path)? else {
            let dir = path.parent().unwrap_or(Path::new("."));
            return Err(Error::Checkpoint(format!(
                "{} has no config.json; a Hugging Face checkpoint directory holds config.json next to its safetensors files",
                dir.display()
            )));
        };
        Self::from_json(&text, path)
    }

    /// Interprets the text of a `config.json`; `path` is only used in error messages.
    pub fn from_json(text: &str, path: &Path) -> Result<Self> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| Error::Checkpoint(format!("{} is not valid JSON: {e}", path.display())))?;
        let Some(map) = value.as_object() else {
            return Err(Error::Checkpoint(format!("{} must hold a JSON object, found {}", path.display(), kind(&value))));
        };
        let model_type = match map.get("model_type") {
            Some(Value::String(s)) => s.clone(),
            Some(v) => return Err(Error::Checkpoint(format!("{} has \"model_type\": {v}, expected a string", path.display()))),
            None => return Err(Error::Checkpoint(format!("{} has no \"model_type\", so the model family is unknown", path.display()))),
        };
        let family = if DEEPSEEK_MODEL_TYPES.contains(&model_type.as_str()) || map.contains_key("n_routed_experts") {
            Family::DeepSeek
        } else if model_type == "qwen3_moe" {
            Family::Qwen3Moe
        } else if model_type == "mixtral" {
            Family::Mixtral
        } else {
            return Err(Error::Checkpoint(format!(
                "{} has model_type \"{model_type}\", which this loader does not read; it reads {}, qwen3_moe, mixtral, and any config with n_routed_experts in DeepSeek-V3's layout",
                path.display(),
                DEEPSEEK_MODEL_TYPES.join(", ")
            )));
        };
        let keys = Keys { map, path, model_type: &model_type };
        // Every family names it `hidden_act` and defaults to SiLU; transformers' ACT2FN maps
        // "swish" to the same SiLU.
        match keys.opt_str("hidden_act")?.as_deref() {
            None | Some("silu" | "swish") => {}
            Some(_) => {
                return Err(keys.bad(
                    "hidden_act",
                    "moe-hal does not compute: its experts apply SiLU (\"silu\", or \"swish\" as transformers also calls it)",
                ));
            }
        }
        let declared_dtype = keys.opt_str("dtype")?.or(keys.opt_str("torch_dtype")?);
        let fp8_block = fp8_block(map, path)?;
        let quant_method = map.get("quantization_config").and_then(|q| q.get("quant_method")).and_then(Value::as_str).map(str::to_string);
        let num_hidden_layers = keys.usize("num_hidden_layers")?;
        let hidden = keys.usize("hidden_size")?;
        let top_k = keys.usize("num_experts_per_tok")?;
        let (moe, n_shared_experts, moe_layers) = match family {
            Family::DeepSeek => {
                let intermediate = keys.usize("moe_intermediate_size")?;
                let experts = keys.usize("n_routed_experts")?;
                let n_group = keys.usize("n_group")?;
                let topk_group = keys.usize("topk_group")?;
                let norm_topk_prob = keys.bool("norm_topk_prob")?;
                let routed_scaling_factor = keys.f64("routed_scaling_factor")?;
                let n_shared = keys.opt_usize("n_shared_experts")?;
                let default_scoring = if model_type == "deepseek_v2" { "softmax" } else { "sigmoid" };
                // A model type read only because it has n_routed_experts must say how it routes:
                // the DeepSeek-V3 default (sigmoid) would misread, e.g., Mistral 4's
                // softmax-over-groups router.
                let scoring = match keys.opt_str("scoring_func")? {
                    Some(s) => s,
                    None if DEEPSEEK_MODEL_TYPES.contains(&model_type.as_str()) => default_scoring.to_string(),
                    None => {
                        return Err(Error::Checkpoint(format!(
                            "{} has model_type \"{model_type}\" with n_routed_experts but no scoring_func; a model type other than {} \
                             is read in DeepSeek-V3's layout only when scoring_func says how it routes (\"sigmoid\" with noaux_tc, or \
                             DeepSeek-V2's greedy \"softmax\")",
                            path.display(),
                            DEEPSEEK_MODEL_TYPES.join(", ")
                        )));
                    }
                };
                let topk_method = keys.opt_str("topk_method")?;
                let routing =
                    deepseek_routing(&keys, &scoring, topk_method.as_deref(), n_group, topk_group, norm_topk_prob, routed_scaling_factor)?;
                let first_k_dense_replace = keys.usize("first_k_dense_replace")?;
                let moe_layer_freq = keys.opt_usize("moe_layer_freq")?.unwrap_or(1);
                if moe_layer_freq == 0 {
                    return Err(keys.bad("moe_layer_freq", "must be at least 1"));
                }
                let moe =
                    MoeConfig { hidden, intermediate, experts, top_k, routing, shared_intermediate: n_shared.unwrap_or(0) * intermediate };
                (moe, n_shared, MoeLayers::DenseFirst { first_k_dense_replace, moe_layer_freq })
            }
            Family::Qwen3Moe => {
                let intermediate = keys.usize("moe_intermediate_size")?;
                let experts = match (keys.opt_usize("num_experts")?, keys.opt_usize("num_local_experts")?) {
                    (Some(a), Some(b)) if a != b => {
                        return Err(Error::Checkpoint(format!(
                            "{} gives num_experts = {a} but num_local_experts = {b}; they must agree",
                            path.display()
                        )));
                    }
                    (Some(a), _) | (None, Some(a)) => a,
                    (None, None) => {
                        return Err(Error::Checkpoint(format!(
                            "{} has neither \"num_experts\" nor \"num_local_experts\", which a qwen3_moe model needs",
                            path.display()
                        )));
                    }
                };
                // transformers' Qwen3MoeConfig defaults: norm_topk_prob false, step 1, no dense layers.
                let norm_topk_prob = keys.opt_bool("norm_topk_prob")?.unwrap_or(false);
                let decoder_sparse_step = keys.opt_usize("decoder_sparse_step")?.unwrap_or(1);
                if decoder_sparse_step == 0 {
                    return Err(keys.bad("decoder_sparse_step", "must be at least 1"));
                }
                let mlp_only_layers = keys.opt_usize_list("mlp_only_layers")?.unwrap_or_default();
                let moe = MoeConfig {
                    hidden,
                    intermediate,
                    experts,
                    top_k,
                    routing: Routing::Softmax { norm_topk_prob },
                    shared_intermediate: 0,
                };
                (moe, None, MoeLayers::SparseStep { decoder_sparse_step, mlp_only_layers })
            }
            Family::Mixtral => {
                let intermediate = keys.usize("intermediate_size")?;
                let experts = keys.usize("num_local_experts")?;
                let moe = MoeConfig {
                    hidden,
                    intermediate,
                    experts,
                    top_k,
                    routing: Routing::Softmax { norm_topk_prob: true },
                    shared_intermediate: 0,
                };
                (moe, None, MoeLayers::All)
            }
        };
        moe.validate().map_err(|e| {
            let msg = match e {
                Error::InvalidArgument(m) => m,
                other => other.to_string(),
            };
            Error::Checkpoint(format!("{} describes an MoE layer moe-hal cannot run: {msg}", path.display()))
        })?;
        Ok(ModelConfig {
            path: path.to_path_buf(),
            model_type,
            family,
            num_hidden_layers,
            moe,
            n_shared_experts,
            moe_layers,
            declared_dtype,
            fp8_block,
            quant_method,
        })
    }

    /// True when decoder layer `layer` has an MoE block (whether or not `layer` exists).
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        match &self.moe_layers {
            MoeLayers::DenseFirst { first_k_dense_replace, moe_layer_freq } => {
                layer >= *first_k_dense_replace && layer.is_multiple_of(*moe_layer_freq)
            }
            MoeLayers::SparseStep { decoder_sparse_step, mlp_only_layers } => {
                !mlp_only_layers.contains(&layer) && (layer + 1).is_multiple_of(*decoder_sparse_step)
            }
            MoeLayers::All => true,
        }
    }

    /// The numbers of all MoE layers, ascending.
    pub fn moe_layer_numbers(&self) -> Vec<usize> {
        (0..self.num_hidden_layers).filter(|&n| self.is_moe_layer(n)).collect()
    }

    /// `Ok` when `layer` exists and is an MoE layer; otherwise [`Error::InvalidArgument`] with the
    /// valid choices.
    pub fn check_moe_layer(&self, layer: usize) -> Result<()> {
        let moe = self.moe_layer_numbers();
        let choose = match moe.as_slice() {
            [] => format!("this {} model has no MoE layer", self.model_type),
            _ => format!("choose {}", describe_layers(&moe)),
        };
        if layer >= self.num_hidden_layers {
            let mt = &self.model_type;
            return Err(Error::InvalidArgument(match self.num_hidden_layers {
                0 => format!("layer {layer} does not exist: this {mt} model has no layers (num_hidden_layers is 0)"),
                1 => format!("layer {layer} does not exist: this {mt} model has 1 layer, numbered 0; {choose}"),
                n => format!("layer {layer} does not exist: this {mt} model has {n} layers, numbered 0 to {}; {choose}", n - 1),
            }));
        }
        if self.is_moe_layer(layer) {
            return Ok(());
        }
        let why = match &self.moe_layers {
            MoeLayers::DenseFirst { first_k_dense_replace, moe_layer_freq } => {
                if layer < *first_k_dense_replace {
                    format!("first_k_dense_replace = {first_k_dense_replace}")
                } else {
                    format!("moe_layer_freq = {moe_layer_freq}")
                }
            }
            MoeLayers::SparseStep { decoder_sparse_step, mlp_only_layers } => {
                if mlp_only_layers.contains(&layer) {
                    format!("mlp_only_layers lists {layer}")
                } else {
                    format!("decoder_sparse_step = {decoder_sparse_step}")
                }
            }
            MoeLayers::All => unreachable!("every layer is MoE"),
        };
        Err(Error::InvalidArgument(format!(
            "layer {layer} of this {} model is a dense MLP ({why}), not an MoE layer; {choose}",
            self.model_type
        )))
    }
}

/// "layer 1", "a layer from 1 to 60", "one of the layers 2, 4, 6, .., 60", "one of the layers 1, 3, 4".
fn describe_layers(layers: &[usize]) -> String {
    match layers {
        [] => String::from("no layer"),
        [one] => format!("layer {one}"),
        [first, .., last] if last - first + 1 == layers.len() => format!("a layer from {first} to {last}"),
        [a, b, .., last] if layers.windows(2).all(|w| w[1] - w[0] == b - a) && layers.len() > 4 => {
            format!("one of the layers {a}, {b}, {}, .., {last}", b + (b - a))
        }
        _ if layers.len() <= 12 => format!("one of the layers {}", layers.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")),
        _ => format!(
            "one of the layers {}, .., {}",
            layers[..6].iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", "),
            layers[layers.len() - 1]
        ),
    }
}

/// The block size of a fine-grained FP8 `quantization_config` (see [`ModelConfig::fp8_block`]);
/// `None` without one or for another quantization method (whose weights then fail the dtype
/// check, naming the tensor).
fn fp8_block(map: &Map<String, Value>, path: &Path) -> Result<Option<[usize; 2]>> {
    let Some(q) = map.get("quantization_config").and_then(Value::as_object) else {
        return Ok(None);
    };
    if q.get("quant_method").and_then(Value::as_str) != Some("fp8") {
        return Ok(None);
    }
    let bad =
        |what: String| Error::Checkpoint(format!("{} has a quantization_config with quant_method \"fp8\" and {what}", path.display()));
    match q.get("fmt") {
        None | Some(Value::Null) => {}
        Some(Value::String(f)) if f == "e4m3" => {}
        Some(f) => return Err(bad(format!("\"fmt\": {f}; only e4m3 (float8_e4m3fn, DeepSeek's format) is read"))),
    }
    match q.get("weight_block_size") {
        None | Some(Value::Null) => Ok(Some(crate::fp8::DEFAULT_BLOCK)),
        Some(v) => {
            let dims: Option<Vec<usize>> = v
                .as_array()
                .map(|a| a.iter().filter_map(|d| d.as_u64().and_then(|n| usize::try_from(n).ok())).filter(|&n| n > 0).collect());
            match dims.as_deref() {
                Some(&[r, c]) if v.as_array().is_some_and(|a| a.len() == 2) => Ok(Some([r, c])),
                _ => Err(bad(format!("\"weight_block_size\": {v}, which is not two positive integers [rows, columns]"))),
            }
        }
    }
}

/// DeepSeek's `scoring_func` / `topk_method` pair as a [`Routing`].
fn deepseek_routing(
    keys: &Keys<'_>,
    scoring: &str,
    topk_method: Option<&str>,
    n_group: usize,
    topk_group: usize,
    norm_topk_prob: bool,
    routed_scaling_factor: f64,
) -> Result<Routing> {
    match (scoring, topk_method) {
        ("sigmoid", None | Some("noaux_tc")) => {
            Ok(Routing::SigmoidGrouped { n_group, topk_group, norm_topk_prob, routed_scaling_factor: routed_scaling_factor as f32 })
        }
        ("sigmoid", Some(m)) => Err(Error::Checkpoint(format!(
            "{} has scoring_func \"sigmoid\" with topk_method \"{m}\"; only \"noaux_tc\" (DeepSeek-V3's bias-corrected group-limited routing) is supported",
            keys.path.display()
        ))),
        // DeepSeek-V2(-Lite) greedy softmax routing is plain softmax top-k when nothing is scaled
        // (group-limited greedy with every group kept is the same thing).
        ("softmax", None | Some("greedy")) if routed_scaling_factor == 1.0 => Ok(Routing::Softmax { norm_topk_prob }),
        ("softmax", Some("group_limited_greedy")) if routed_scaling_factor == 1.0 && topk_group == n_group => {
            Ok(Routing::Softmax { norm_topk_prob })
        }
        ("softmax", m) => Err(Error::Checkpoint(format!(
            "{} has DeepSeek-V2 softmax routing (topk_method {}, n_group {n_group}, topk_group {topk_group}, routed_scaling_factor {routed_scaling_factor}), which is not supported; only greedy softmax top-k with routed_scaling_factor 1 maps onto moe-hal's routings",
            keys.path.display(),
            m.map_or("unset".to_string(), |m| format!("\"{m}\""))
        ))),
        (other, _) => Err(Error::Checkpoint(format!(
            "{} has scoring_func \"{other}\"; supported are \"sigmoid\" (DeepSeek-V3, Kimi K2) and \"softmax\" (DeepSeek-V2 greedy)",
            keys.path.display()
        ))),
    }
}

/// Typed access to the keys of a config, with errors that name the file and key.
struct Keys<'a> {
    map: &'a Map<String, Value>,
    path: &'a Path,
    model_type: &'a str,
}

impl Keys<'_> {
    fn bad(&self, key: &str, what: &str) -> Error {
        let v = self.map.get(key).map_or("absent".to_string(), |v| v.to_string());
        Error::Checkpoint(format!("{} has \"{key}\": {v}, which {what}", self.path.display()))
    }

    fn missing(&self, key: &str) -> Error {
        Error::Checkpoint(format!("{} has no \"{key}\", which a {} model needs", self.path.display(), self.model_type))
    }

    /// The value, with JSON `null` read as absent.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => {
                v.as_u64().and_then(|n| usize::try_from(n).ok()).map(Some).ok_or_else(|| self.bad(key, "is not a non-negative integer"))
            }
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.opt_usize(key)?.ok_or_else(|| self.missing(key))
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.bad(key, "is not true or false")),
        }
    }

    fn bool(&self, key: &str) -> Result<bool> {
        self.opt_bool(key)?.ok_or_else(|| self.missing(key))
    }

    fn f64(&self, key: &str) -> Result<f64> {
        match self.get(key) {
            None => Err(self.missing(key)),
            Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| self.bad(key, "is not a finite number")),
        }
    }

    fn opt_str(&self, key: &str) -> Result<Option<String>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.as_str().map(|s| Some(s.to_string())).ok_or_else(|| self.bad(key, "is not a string")),
        }
    }

    fn opt_usize_list(&self, key: &str) -> Result<Option<Vec<usize>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()))
                .collect::<Option<Vec<_>>>()
                .map(Some)
                .ok_or_else(|| self.bad(key, "is not a list of layer numbers")),
            Some(_) => Err(self.bad(key, "is not a list of layer numbers")),
        }
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_layer_sets() {
        assert_eq!(describe_layers(&[1]), "layer 1");
        assert_eq!(describe_layers(&(3..61).collect::<Vec<_>>()), "a layer from 3 to 60");
        assert_eq!(describe_layers(&[2, 4, 6, 8, 10]), "one of the layers 2, 4, 6, .., 10");
        assert_eq!(describe_layers(&[1, 3, 4]), "one of the layers 1, 3, 4");
    }

    fn deepseek(extra: &str) -> String {
        format!(
            r#"{{"model_type": "deepseek_v3", "num_hidden_layers": 61, "hidden_size": 7168, "moe_intermediate_size": 2048,
            "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "n_shared_experts": 1, "first_k_dense_replace": 3 {extra}}}"#
        )
    }

    /// A model type read only for its n_routed_experts must name its scoring function (Mistral 4
    /// has DeepSeek-V3's keys and routes by softmax over groups); with one, it loads.
    #[test]
    fn unknown_model_types_with_n_routed_experts_must_name_their_scoring() {
        let other = deepseek("").replace("deepseek_v3", "mistral4");
        let e = ModelConfig::from_json(&other, Path::new("config.json")).unwrap_err().to_string();
        assert!(e.contains("\"mistral4\" with n_routed_experts but no scoring_func"), "{e}");
        let named = deepseek(r#", "scoring_func": "sigmoid""#).replace("deepseek_v3", "some_v3_clone");
        assert_eq!(ModelConfig::from_json(&named, Path::new("config.json")).unwrap().family, Family::DeepSeek);
    }

    #[test]
    fn deepseek_v3_shape_and_dense_layers() {
        let c = ModelConfig::from_json(&deepseek(""), Path::new("config.json")).unwrap();
        assert_eq!(c.family, Family::DeepSeek);
        assert_eq!(c.moe.shared_intermediate, 2048);
        assert_eq!(c.moe_layer_numbers(), (3..61).collect::<Vec<_>>());
        let e = c.check_moe_layer(0).unwrap_err().to_string();
        assert!(e.contains("layer 0 of this deepseek_v3 model is a dense MLP (first_k_dense_replace = 3), not an MoE layer; choose a layer from 3 to 60"), "{e}");
        let e = c.check_moe_layer(61).unwrap_err();
        assert!(matches!(e, Error::InvalidArgument(_)) && e.to_string().contains("numbered 0 to 60"), "{e}");
        let c = ModelConfig::from_json(&deepseek(r#", "moe_layer_freq": 2"#), Path::new("config.json")).unwrap();
        assert!(c.is_moe_layer(4) && !c.is_moe_layer(5));
        assert!(c.check_moe_layer(5).unwrap_err().to_string().contains("moe_layer_freq = 2"));
    }

    #[test]
    fn deepseek_routing_variants() {
        let bad = ModelConfig::from_json(&deepseek(r#", "scoring_func": "softmax""#), Path::new("config.json")).unwrap_err();
        assert!(bad.to_string().contains("DeepSeek-V2 softmax routing"), "{bad}");
        let v2 = deepseek(r#", "scoring_func": "softmax", "topk_method": "greedy""#).replace("2.5", "1.0");
        let c = ModelConfig::from_json(&v2, Path::new("config.json")).unwrap();
        assert_eq!(c.moe.routing, Routing::Softmax { norm_topk_prob: true });
        let e = ModelConfig::from_json(&deepseek("").replace(r#""n_group": 8"#, r#""n_group": 7"#), Path::new("c.json")).unwrap_err();
        assert!(e.to_string().contains("n_group 7 must divide the expert count 256"), "{e}");
        let e = ModelConfig::from_json(&deepseek("").replace(r#""topk_group": 4,"#, ""), Path::new("c.json")).unwrap_err();
        assert_eq!(e.to_string(), "checkpoint: c.json has no \"topk_group\", which a deepseek_v3 model needs");
        let e = ModelConfig::from_json(&deepseek("").replace(r#""n_group": 8"#, r#""n_group": "8""#), Path::new("c.json")).unwrap_err();
        assert_eq!(e.to_string(), "checkpoint: c.json has \"n_group\": \"8\", which is not a non-negative integer");
    }

    #[test]
    fn fp8_quantization_config() {
        let c = ModelConfig::from_json(&deepseek(""), Path::new("c.json")).unwrap();
        assert_eq!(c.fp8_block, None);
        let q = |body: &str| deepseek(&format!(r#", "quantization_config": {{"quant_method": "fp8", {body}}}"#));
        let c = ModelConfig::from_json(&q(r#""fmt": "e4m3", "weight_block_size": [128, 64]"#), Path::new("c.json")).unwrap();
        assert_eq!(c.fp8_block, Some([128, 64]));
        let c = ModelConfig::from_json(&q(r#""activation_scheme": "dynamic""#), Path::new("c.json")).unwrap();
        assert_eq!(c.fp8_block, Some([128, 128]));
        let e = ModelConfig::from_json(&q(r#""fmt": "e5m2""#), Path::new("c.json")).unwrap_err().to_string();
        assert!(e.contains("\"fmt\": \"e5m2\"; only e4m3"), "{e}");
        for bad in ["[128]", "[128, 0]", "[128, -1]", "\"128\"", "[1, 2, 3]"] {
            let e = ModelConfig::from_json(&q(&format!(r#""weight_block_size": {bad}"#)), Path::new("c.json")).unwrap_err().to_string();
            assert!(e.contains("which is not two positive integers"), "{bad}: {e}");
        }
        // Another method is not FP8 blocks.
        let other = deepseek(r#", "quantization_config": {"quant_method": "awq", "bits": 4}"#);
        let c = ModelConfig::from_json(&other, Path::new("c.json")).unwrap();
        assert_eq!((c.fp8_block, c.quant_method.as_deref()), (None, Some("awq")));
    }

    #[test]
    fn qwen3_sparse_step_and_expert_count_keys() {
        let text = r#"{"model_type": "qwen3_moe", "num_hidden_layers": 6, "hidden_size": 8, "moe_intermediate_size": 4,
            "num_experts": 4, "num_experts_per_tok": 2, "decoder_sparse_step": 2, "mlp_only_layers": [3]}"#;
        let c = ModelConfig::from_json(text, Path::new("config.json")).unwrap();
        assert_eq!(c.moe.routing, Routing::Softmax { norm_topk_prob: false });
        assert_eq!(c.moe_layer_numbers(), vec![1, 5]);
        assert!(c.check_moe_layer(3).unwrap_err().to_string().contains("mlp_only_layers lists 3"));
        assert!(c.check_moe_layer(2).unwrap_err().to_string().contains("decoder_sparse_step = 2"));
        let both = text.replace(r#""num_experts": 4"#, r#""num_experts": 4, "num_local_experts": 5"#);
        assert!(ModelConfig::from_json(&both, Path::new("c")).unwrap_err().to_string().contains("must agree"));
    }
}
