//! Reading the input and writing the output of `moe run` (safetensors files).

use moe_hal::{DType, Error, Result};
use safetensors::{Dtype, SafeTensors};
use std::path::Path;

/// Reads `hidden_states [T, H]` (f32, f16 or bf16) from a safetensors file as f32, rejecting
/// non-finite values.
pub fn read_hidden_states(path: &Path) -> Result<(usize, usize, Vec<f32>)> {
    let what = path.display();
    let bytes = crate::in_file::read_regular(path, "--input", None)?;
    let st =
        SafeTensors::deserialize(&bytes).map_err(|e| Error::InvalidArgument(format!("{what} is not a valid safetensors file: {e}")))?;
    let view = st.tensor("hidden_states").map_err(|_| {
        let names = st.names().join(", ");
        Error::InvalidArgument(format!("{what} has no tensor named hidden_states (it holds: {names})"))
    })?;
    let (t, h) = match view.shape() {
        [t, h] => (*t, *h),
        s => return moe_hal::invalid!("hidden_states in {what} must be [tokens, hidden], got shape {s:?}"),
    };
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        d => return moe_hal::invalid!("hidden_states in {what} is {d:?}; expected F32, F16 or BF16"),
    };
    let values = dtype.decode(view.data());
    if let Some(i) = values.iter().position(|v| !v.is_finite()) {
        return moe_hal::invalid!(
            "hidden_states in {what} holds a non-finite value ({}) at token {}, column {}",
            values[i],
            i / h.max(1),
            i % h.max(1)
        );
    }
    Ok((t, h, values))
}

/// What `moe run` writes.
pub struct RunOutput<'a> {
    pub tokens: usize,
    pub hidden: usize,
    pub top_k: usize,
    pub output: &'a [f32],
    pub topk_ids: &'a [u32],
    pub topk_weights: &'a [f32],
}

/// Writes `output [T, H]` f32, `topk_ids [T, k]` i32 and `topk_weights [T, k]` f32 atomically
/// ([`crate::out_file::write_atomic`]): a failure leaves no (partial) output behind.
pub fn write_output(path: &Path, out: &RunOutput) -> Result<()> {
    let ids: Vec<i32> = out.topk_ids.iter().map(|&i| i as i32).collect();
    let tensors = [
        ("output", Dtype::F32, vec![out.tokens, out.hidden], bytemuck::cast_slice::<f32, u8>(out.output)),
        ("topk_ids", Dtype::I32, vec![out.tokens, out.top_k], bytemuck::cast_slice::<i32, u8>(&ids)),
        ("topk_weights", Dtype::F32, vec![out.tokens, out.top_k], bytemuck::cast_slice::<f32, u8>(out.topk_weights)),
    ];
    let views = tensors
        .into_iter()
        .map(|(n, d, s, b)| safetensors::tensor::TensorView::new(d, s, b).map(|v| (n, v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Io(format!("cannot encode the output: {e}")))?;
    let bytes = safetensors::serialize(views, None).map_err(|e| Error::Io(format!("cannot encode the output: {e}")))?;

    crate::out_file::write_bytes(path, &bytes)
}
