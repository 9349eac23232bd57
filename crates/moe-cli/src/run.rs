//! `moe run`: one layer of a real checkpoint on one backend.

use crate::backends::{Choice, Job, dispatch};
use crate::tensor_file::{RunOutput, read_hidden_states, write_output};
use moe_hal::{Backend, DType, HostLayer, Layer, Result, Tensor, ops};
use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Hugging Face model directory (config.json + model.safetensors or shards with an index).
    #[arg(long)]
    pub model: PathBuf,
    /// The decoder layer whose MoE block to run.
    #[arg(long)]
    pub layer: usize,
    /// Safetensors file holding `hidden_states` [tokens, hidden] (f32, f16 or bf16).
    #[arg(long)]
    pub input: PathBuf,
    /// Safetensors file to write: `output` [T, H] f32, `topk_ids` [T, k] i32, `topk_weights` [T, k] f32.
    #[arg(long)]
    pub output: PathBuf,
    /// The backend to run on (`auto`: a hardware GPU when there is one, else the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Choice,
    /// Storage dtype of the weights on the device: f32, f16, bf16 or f8_e4m3 (default: as in the
    /// checkpoint; FP8 checkpoints stay f8_e4m3 with their block scales, bf16 or f32 dequantizes
    /// them on load; f8_e4m3 quantizes a float checkpoint in 128x128 blocks).
    #[arg(long, value_parser = crate::weight_dtype)]
    pub dtype: Option<DType>,
}

struct Forward<'a> {
    layer: &'a HostLayer,
    tokens: usize,
    x: &'a [f32],
}

struct Result3 {
    out: Vec<f32>,
    ids: Vec<u32>,
    weights: Vec<f32>,
    backend: String,
}

impl Job for Forward<'_> {
    type Output = Result3;
    fn run<B: Backend>(self, b: &B) -> Result<Result3> {
        let c = &self.layer.config;
        let layer = Layer::upload(b, self.layer)?;
        let x = Tensor::from_f32(b, DType::F32, &[self.tokens, c.hidden], self.x)?;
        let mut out = Tensor::alloc(b, DType::F32, &[self.tokens, c.hidden])?;
        let mut ids = Tensor::alloc(b, DType::U32, &[self.tokens, c.top_k])?;
        let mut w = Tensor::alloc(b, DType::F32, &[self.tokens, c.top_k])?;
        ops::forward(b, &layer, &x, &mut out, &mut ids, &mut w)?;
        Ok(Result3 { out: out.to_f32(b)?, ids: ids.to_u32(b)?, weights: w.to_f32(b)?, backend: b.info().device.clone() })
    }
}

/// `--output` must not name the input or a file of the checkpoint: the run would replace what it
/// reads (and, for a shard, a model's weights) with its result.
fn refuse_overwriting_inputs(args: &RunArgs) -> Result<()> {
    if crate::out_file::same_file(&args.output, &args.input) {
        return moe_hal::invalid!("--output {} is the --input file; name another file", args.output.display());
    }
    let model_files = std::fs::read_dir(&args.model).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        name == "config.json" || name.ends_with(".safetensors") || name.ends_with(".safetensors.index.json")
    });
    for f in model_files {
        if crate::out_file::same_file(&args.output, &f) {
            return moe_hal::invalid!("--output {} is {}, a file of the checkpoint; name another file", args.output.display(), f.display());
        }
    }
    Ok(())
}

pub fn run(args: &RunArgs) -> Result<()> {
    crate::out_file::check_writable(&args.output, "--output")?;
    refuse_overwriting_inputs(args)?;
    let ckpt = moe_checkpoint::load_layer(&args.model, args.layer, args.dtype)?;
    let layer = &ckpt.layer;
    let (tokens, hidden, x) = read_hidden_states(&args.input)?;
    if hidden != layer.config.hidden {
        return moe_hal::invalid!(
            "hidden_states in {} has {hidden} columns but layer {} of {} has hidden size {}",
            args.input.display(),
            args.layer,
            args.model.display(),
            layer.config.hidden
        );
    }
    let r = dispatch(args.backend, Forward { layer, tokens, x: &x })?;
    // The input was checked finite as it was read: NaN or infinity here comes from the weights.
    if let Some(i) = r.out.iter().position(|v| !v.is_finite()) {
        return moe_hal::invalid!(
            "the layer's output is not finite at token {} though the input is: layer {} of {} holds NaN or infinite \
             weights, or its products overflow f32 (if --backend cpu gives a finite output, report the backend); \
             nothing was written",
            i / hidden,
            args.layer,
            args.model.display()
        );
    }
    write_output(
        &args.output,
        &RunOutput { tokens, hidden, top_k: layer.config.top_k, output: &r.out, topk_ids: &r.ids, topk_weights: &r.weights },
    )?;
    let weights = match ckpt.stored {
        moe_checkpoint::Stored::Float(d) if d == layer.dtype => layer.dtype.to_string(),
        stored @ moe_checkpoint::Stored::Fp8E4M3 { .. } if layer.dtype.is_block_scaled() => stored.to_string(),
        stored => format!("{} from {stored}", layer.dtype),
    };
    eprintln!(
        "moe run: {} layer {} ({weights}, {} experts, top-{}), {tokens} tokens on {} -> {}",
        ckpt.model_type,
        args.layer,
        layer.config.experts,
        layer.config.top_k,
        r.backend,
        args.output.display()
    );
    Ok(())
}
