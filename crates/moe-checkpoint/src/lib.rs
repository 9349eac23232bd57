//! # moe-checkpoint: one MoE layer of a Hugging Face checkpoint, as a [`HostLayer`]
//!
//! [`load_layer`] reads a checkpoint directory as `save_pretrained` writes it (and as the hub
//! serves it): `config.json` plus either `model.safetensors` or the shards listed in
//! `model.safetensors.index.json`. It memory-maps only the shards that hold the chosen layer's
//! tensors, checks every shape against `config.json`, and copies the bytes straight from the
//! maps into moe-hal's layout (one allocation per tensor, a plain copy when no dtype conversion
//! is needed, all cores in parallel).
//!
//! ```no_run
//! let ckpt = moe_checkpoint::load_layer("/models/DeepSeek-V3-bf16".as_ref(), 3, None)?;
//! println!("{ckpt}");
//! let layer: &moe_hal::HostLayer = &ckpt.layer; // ready for moe_hal::Layer::upload
//! # Ok::<(), moe_hal::Error>(())
//! ```
//!
//! | family | `model_type` | tensors under `model.layers.N.` | routing |
//! |---|---|---|---|
//! | DeepSeek-V3 | `deepseek_v3`, `kimi_k2`, `deepseek_v32`, or any config with `n_routed_experts` | `mlp.gate.weight`, `mlp.gate.e_score_correction_bias`, `mlp.experts.E.{gate,up,down}_proj.weight`, `mlp.shared_experts.{gate,up,down}_proj.weight` | [`Routing::SigmoidGrouped`] |
//! | DeepSeek-V2 | `deepseek_v2` (greedy softmax, `routed_scaling_factor` 1 only) | as DeepSeek-V3, without the bias | [`Routing::Softmax`] |
//! | Qwen3-MoE | `qwen3_moe` | `mlp.gate.weight`, `mlp.experts.E.{gate,up,down}_proj.weight` | [`Routing::Softmax`] |
//! | Mixtral | `mixtral` | `block_sparse_moe.gate.weight`, `block_sparse_moe.experts.E.{w1,w3,w2}.weight` (gate, up, down) | [`Routing::Softmax`], always renormalised |
//!
//! The fused expert layout transformers 5 uses in memory (`…experts.gate_up_proj` `[E, 2I, H]`
//! and `…experts.down_proj` `[E, H, I]`) is read too, should a checkpoint have been saved that way.
//!
//! ## Dtypes
//!
//! Weights may be F32, F16 or BF16, mixed within a file. A [`HostLayer`] has one storage dtype for
//! its experts: by default the widest dtype among the expert weights (routed and shared), so none
//! is rounded: F32 when any is F32, or when F16 and BF16 mix (neither holds the other's values);
//! narrower ones are widened to it, which is exact. A forced dtype converts every weight to it
//! (rounding to nearest even when narrowing). The router keeps F32 when the file stores it so
//! ([`moe_hal::router_dtype`]): DeepSeek-V3 and Kimi K2 store `mlp.gate.weight` in F32 even in BF16
//! checkpoints and compute their logits in F32, and rounding it to BF16 would move the logits by
//! about 1e-2 relative, enough to change an expert choice on a near tie. Widening BF16 or F16 to
//! F32 is exact. The `e_score_correction_bias` is always F32.
//!
//! ### FP8 (DeepSeek-V3's and Kimi K2's released checkpoints)
//!
//! Expert weights (routed and shared) may be `F8_E4M3` with their block scales beside them:
//! `…weight_scale_inv` [`ceil(rows / 128)`, `ceil(columns / 128)`] in F32 (or BF16/F16), the block
//! size from `config.json`'s `quantization_config.weight_block_size` (DeepSeek's `[128, 128]`
//! when absent). By default they stay as stored: [`DType::F8E4M3`] bytes with their scales
//! ([`moe_hal::BlockScales`]), which every backend that supports it computes on directly (half
//! the memory and bandwidth of BF16, and the checkpoint's exact values). Gate and up projections
//! are fused into one `[2I, H]` weight whose scale grid is the two grids stacked, which needs `I`
//! to be a multiple of the block rows (DeepSeek-V3, Kimi K2 and Qwen3's FP8 releases all are;
//! the error otherwise says to dequantize). Asked for a float dtype, they are dequantized on
//! load as `q * scale_inv` in F32, exactly as transformers' fine-grained FP8 quantizer and
//! DeepSeek's `fp8_cast_bf16.py` do (BF16 is what those tools produce; F32 keeps the products
//! exactly). Asked for F8E4M3, a float checkpoint is quantized on load in DeepSeek's 128 x 128
//! blocks ([`moe_hal::HostLayer::to_dtype`]). A missing or ill-shaped scale tensor, a
//! non-finite scale and a NaN weight byte are errors naming the tensor. [`Checkpoint::stored`] says what the files held. The
//! fixtures `tests/fixtures/hf/deepseek_v3_fp8` (f32 scales) and `qwen3_moe_fp8` (bf16 scales),
//! both in 16 x 32 blocks, check this against transformers.
//! Other quantizations (AWQ, GPTQ, compressed-tensors, MXFP4, ..) are not read: the error for
//! their tensors names the config's `quant_method`.
//!
//! ## Errors
//!
//! All errors are [`moe_hal::Error`], one sentence naming the file, tensor, key or shape at fault:
//! [`Error::Checkpoint`] for a missing, truncated or unsupported checkpoint (an activation other
//! than SiLU included; a NaN or infinity in the router weight or `e_score_correction_bias`; a
//! file that is not a regular file, such as a directory, FIFO or device, symbolic links
//! followed; a JSON file over 64 MiB; an index naming a shard outside the checkpoint directory), [`Error::Io`] for an
//! OS failure, [`Error::InvalidArgument`] for a layer number that does not exist or is a dense
//! layer, [`Error::OutOfMemory`] when the host cannot hold the layer.

#![warn(missing_docs)]
mod config;
mod files;
mod fp8;
mod layer;
mod safetensors_dir;

use std::fmt;
use std::path::{Path, PathBuf};

use moe_hal::{DType, Error, HostLayer, Result, Routing};

pub use config::{DEEPSEEK_MODEL_TYPES, Family, ModelConfig, MoeLayers};
pub use fp8::Stored;
pub use safetensors_dir::{INDEX_FILE, SINGLE_FILE};

/// One MoE layer read from a checkpoint directory, with what the checkpoint said about it.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// `model_type` from `config.json`.
    pub model_type: String,
    /// `num_hidden_layers` from `config.json`.
    pub num_hidden_layers: usize,
    /// The layer number that was read.
    pub layer_index: usize,
    /// The layer's weights in moe-hal's layout, validated ([`HostLayer::validate`]).
    pub layer: HostLayer,
    /// How the files store the routed experts' weights: a float dtype (when they mix dtypes, the
    /// widest among them, F32 for F16 with BF16; the layer's dtype unless one was forced or a
    /// wider shared expert widened it), or FP8 with block scales (kept as stored unless a dtype
    /// was forced).
    pub stored: Stored,
    /// The dtype of the router weight in the files (F32 in DeepSeek-V3 and Kimi K2 checkpoints
    /// whatever the expert dtype).
    pub router_stored_dtype: DType,
    /// True when the experts were stored fused (`experts.gate_up_proj`, transformers 5's
    /// in-memory layout) rather than one tensor per expert and projection.
    pub fused_experts: bool,
    /// The safetensors files that were opened, sorted by name.
    pub files: Vec<PathBuf>,
    /// Everything `config.json` said, interpreted.
    pub config: ModelConfig,
}

impl Checkpoint {
    /// One line describing the layer, for logs: model, layer, shape, routing and dtypes.
    pub fn summary(&self) -> String {
        let c = &self.layer.config;
        let routing = match c.routing {
            Routing::Softmax { norm_topk_prob } => {
                format!("softmax routing{}", if norm_topk_prob { ", renormalised" } else { "" })
            }
            Routing::SigmoidGrouped { n_group, topk_group, routed_scaling_factor, .. } => {
                format!("sigmoid routing in {topk_group} of {n_group} groups, scaled by {routed_scaling_factor}")
            }
        };
        let shared = match c.shared_intermediate {
            0 => String::new(),
            s => format!(", shared expert intermediate {s}"),
        };
        let mut dtypes = match (self.stored, &self.layer.gate_up.scales) {
            (Stored::Fp8E4M3 { .. }, Some(_)) => format!("weights {} as stored", self.stored),
            (Stored::Float(d), _) if d == self.layer.dtype => format!("weights {d}"),
            (stored, _) => format!("weights {} (stored {stored})", self.layer.dtype),
        };
        if self.layer.router.dtype != self.layer.dtype {
            dtypes += &format!(", router {}", self.layer.router.dtype);
        }
        format!(
            "{} layer {} of {}: {} experts, top-{}, hidden {}, expert intermediate {}{shared}, {routing}, {dtypes}, read from {} file{}",
            self.model_type,
            self.layer_index,
            self.num_hidden_layers,
            c.experts,
            c.top_k,
            c.hidden,
            c.intermediate,
            self.files.len(),
            if self.files.len() == 1 { "" } else { "s" }
        )
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.summary())
    }
}

/// Reads and interprets `dir/config.json` only (no weights): the model family, the shape of its
/// MoE layers and which layers are MoE ([`ModelConfig::moe_layer_numbers`]).
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    if !dir.is_dir() {
        return Err(Error::Checkpoint(format!("the checkpoint directory {} does not exist or is not a directory", dir.display())));
    }
    ModelConfig::from_file(&dir.join("config.json"))
}

/// Loads MoE layer `layer` of the Hugging Face checkpoint in `dir`.
///
/// `dtype` forces the storage dtype of the returned layer (f32, f16, bf16 or f8_e4m3); `None`
/// keeps the widest float dtype among the expert weights (F32 when F16 and BF16 mix), so no
/// weight is rounded, or F8E4M3 with block scales for FP8 routed experts; an F32 router stays F32
/// (see the crate docs).
///
/// Only the shards holding the layer's tensors are opened. Errors: a layer number at or beyond
/// `num_hidden_layers`, or one that is a dense MLP, is [`Error::InvalidArgument`] naming the valid
/// layers; a missing, ill-shaped or non-float tensor, a truncated file, a file that is not a
/// regular file, an unknown model or activation and a non-finite router weight or bias are
/// [`Error::Checkpoint`], as are FP8 weights without their block scales (or with a scale grid of
/// the wrong shape), a NaN among them and a non-finite scale; a layer larger than 90% of the
/// host memory available ([`moe_hal::host::available_bytes`]) is [`Error::OutOfMemory`] before
/// anything is allocated; OS failures are
/// [`Error::Io`].
pub fn load_layer(dir: &Path, layer: usize, dtype: Option<DType>) -> Result<Checkpoint> {
    let config = read_config(dir)?;
    config.check_moe_layer(layer)?;
    if let Some(d) = dtype
        && !d.is_weight()
    {
        return Err(Error::InvalidArgument(format!("layer weights must be f32, f16, bf16 or f8_e4m3, not {d}")));
    }
    let mut files = safetensors_dir::SafetensorsDir::open(dir)?;
    let assembled = layer::assemble(&mut files, &config, layer, dtype).map_err(|e| match (e, &config.quant_method) {
        // A quantization this loader does not read shows up as missing or non-float tensors
        // (AWQ's qweight, compressed-tensors' weight_packed, ..): say why.
        (Error::Checkpoint(msg), Some(method)) if method != "fp8" => Error::Checkpoint(format!(
            "{msg} ({} declares quantization_config.quant_method \"{method}\", which this loader does not read: it reads F32, F16 and BF16 weights and DeepSeek's block-scaled FP8)",
            config.path.display()
        )),
        (e, _) => e,
    })?;
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        model_type: config.model_type.clone(),
        num_hidden_layers: config.num_hidden_layers,
        layer_index: layer,
        layer: assembled.layer,
        stored: assembled.stored,
        router_stored_dtype: assembled.router_stored_dtype,
        fused_experts: assembled.fused,
        files: files.opened_files(),
        config,
    })
}
