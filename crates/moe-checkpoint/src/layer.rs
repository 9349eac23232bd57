//! Assembling one layer's [`HostLayer`] from the checkpoint's tensors: names per family, shape
//! checks, and the copy (or dtype conversion) from the memory maps into one allocation per tensor.

use std::mem::MaybeUninit;

use half::{bf16, f16};
use moe_hal::{DType, Error, HostLayer, HostTensor, MoeConfig, Result, Routing};
use rayon::prelude::*;

use crate::config::{Family, ModelConfig};
use crate::safetensors_dir::{Found, SafetensorsDir};

/// A layer read from the files, with what the files held.
pub(crate) struct Assembled {
    pub layer: HostLayer,
    pub stored_dtype: DType,
    pub router_stored_dtype: DType,
    pub fused: bool,
}

/// The tensor names of one layer's MoE block.
struct Names {
    /// `model.layers.N.mlp` (or `.block_sparse_moe` for Mixtral).
    block: String,
    /// Per-expert projection names: gate, up, down.
    proj: [&'static str; 3],
}

impl Names {
    fn router(&self) -> String {
        format!("{}.gate.weight", self.block)
    }
    fn bias(&self) -> String {
        format!("{}.gate.e_score_correction_bias", self.block)
    }
    fn expert(&self, e: usize, p: usize) -> String {
        format!("{}.experts.{e}.{}.weight", self.block, self.proj[p])
    }
    fn fused_gate_up(&self) -> String {
        format!("{}.experts.gate_up_proj", self.block)
    }
    fn fused_down(&self) -> String {
        format!("{}.experts.down_proj", self.block)
    }
    fn shared(&self, p: usize) -> String {
        format!("{}.shared_experts.{}.weight", self.block, ["gate_proj", "up_proj", "down_proj"][p])
    }
}

/// Checks a tensor's shape; the error names the tensor, its file and both shapes.
fn check_shape(t: &Found, want: &[usize], what: &str) -> Result<()> {
    if t.shape != want {
        return Err(Error::Checkpoint(format!(
            "tensor {} in {} has shape {:?}, but config.json implies {want:?} ({what})",
            t.name, t.file, t.shape
        )));
    }
    Ok(())
}

/// Reads layer `layer` (already checked to be an MoE layer) from `files`.
pub(crate) fn assemble(files: &mut SafetensorsDir, cfg: &ModelConfig, layer: usize, force: Option<DType>) -> Result<Assembled> {
    let MoeConfig { hidden: h, intermediate: i, experts: e, .. } = cfg.moe;
    let prefix = format!("model.layers.{layer}");

    // Mixtral's files say `block_sparse_moe`; transformers 5 calls the same module `mlp` in memory,
    // so a checkpoint saved from its state dict without conversion would use that.
    let (candidates, proj): (&[&str], _) = match cfg.family {
        Family::Mixtral => (&["block_sparse_moe", "mlp"], ["w1", "w3", "w2"]),
        Family::DeepSeek | Family::Qwen3Moe => (&["mlp"], ["gate_proj", "up_proj", "down_proj"]),
    };
    let mut router = None;
    let mut names = None;
    for block in candidates {
        let n = Names { block: format!("{prefix}.{block}"), proj };
        if let Some(r) = files.find(&n.router())? {
            router = Some(r);
            names = Some(n);
            break;
        }
    }
    let names = names.unwrap_or(Names { block: format!("{prefix}.{}", candidates[0]), proj });
    let router = match router {
        Some(r) => r,
        None => return Err(files.missing(&names.router(), None)),
    };
    check_shape(&router, &[e, h], "[experts, hidden_size]")?;
    let router_stored_dtype = router.float_dtype()?;

    // Routed experts: the per-expert layout of hub checkpoints, or transformers 5's fused one.
    let first = names.expert(0, 0);
    let (experts, fused) = if files.find(&first)?.is_some() {
        let mut list = Vec::with_capacity(3 * e);
        for x in 0..e {
            for p in 0..3 {
                let t = files.require(&names.expert(x, p))?;
                let want = if p == 2 { [h, i] } else { [i, h] };
                check_shape(
                    &t,
                    &want,
                    if p == 2 { "[hidden_size, expert intermediate size]" } else { "[expert intermediate size, hidden_size]" },
                )?;
                list.push(t);
            }
        }
        (list, false)
    } else if let Some(gu) = files.find(&names.fused_gate_up())? {
        check_shape(&gu, &[e, 2 * i, h], "[experts, 2 x expert intermediate size, hidden_size]")?;
        let down = files.require(&names.fused_down())?;
        check_shape(&down, &[e, h, i], "[experts, hidden_size, expert intermediate size]")?;
        (vec![gu, down], true)
    } else {
        let note = format!("nor is the fused {} there", names.fused_gate_up());
        return Err(files.missing(&first, Some(&note)));
    };
    let stored_dtype = experts[0].float_dtype()?;
    for t in &experts {
        t.float_dtype()?;
    }
    let dtype = force.unwrap_or(stored_dtype);
    if !dtype.is_float() {
        return Err(Error::InvalidArgument(format!("layer weights must be f32, f16 or bf16, not {dtype}")));
    }

    let bias = match cfg.moe.routing {
        Routing::SigmoidGrouped { .. } => {
            let b = files.require(&names.bias())?;
            check_shape(&b, &[e], "[experts]")?;
            b.float_dtype()?;
            Some(b)
        }
        Routing::Softmax { .. } => None,
    };

    // Shared experts (DeepSeek): S = n_shared_experts x moe_intermediate_size, read from the
    // tensors when the config does not give n_shared_experts.
    let shared = match (cfg.family, cfg.n_shared_experts) {
        (Family::DeepSeek, Some(0)) | (Family::Qwen3Moe | Family::Mixtral, _) => None,
        (Family::DeepSeek, n) => {
            let gate = match n {
                Some(_) => Some(files.require(&names.shared(0))?),
                None => files.find(&names.shared(0))?,
            };
            match gate {
                None => None,
                Some(gate) => {
                    let s = match n {
                        Some(n) => n * i,
                        None => gate.shape.first().copied().unwrap_or(0),
                    };
                    let what = "[n_shared_experts x moe_intermediate_size, hidden_size]";
                    check_shape(&gate, &[s, h], what)?;
                    let up = files.require(&names.shared(1))?;
                    check_shape(&up, &[s, h], what)?;
                    let down = files.require(&names.shared(2))?;
                    check_shape(&down, &[h, s], "[hidden_size, n_shared_experts x moe_intermediate_size]")?;
                    for t in [&gate, &up, &down] {
                        t.float_dtype()?;
                    }
                    Some((s, gate, up, down))
                }
            }
        }
    };

    // Every tensor is located and checked: now read them.
    for t in experts.iter().chain([&router]).chain(bias.iter()) {
        files.will_need(t);
    }
    if let Some((_, g, u, d)) = &shared {
        [g, u, d].into_iter().for_each(|t| files.will_need(t));
    }
    let files = &*files;
    // The router keeps f32 when it has it (DeepSeek-V3 and Kimi K2 store it so, and compute their
    // logits in f32): rounding it to the experts' dtype can flip near-tied expert choices.
    let router_t = gather(files, "router weight", &[e, h], moe_hal::router_dtype(router_stored_dtype, dtype), &[&router])?;
    let (gate_up, down) = if fused {
        (
            gather(files, "expert gate/up weights", &[e, 2 * i, h], dtype, &[&experts[0]])?,
            gather(files, "expert down weights", &[e, h, i], dtype, &[&experts[1]])?,
        )
    } else {
        let gu: Vec<&Found> = experts.chunks(3).flat_map(|c| [&c[0], &c[1]]).collect();
        let dn: Vec<&Found> = experts.chunks(3).map(|c| &c[2]).collect();
        (
            gather(files, "expert gate/up weights", &[e, 2 * i, h], dtype, &gu)?,
            gather(files, "expert down weights", &[e, h, i], dtype, &dn)?,
        )
    };
    let bias = bias.map(|b| gather(files, "e_score_correction_bias", &[e], DType::F32, &[&b])).transpose()?;
    let (shared_intermediate, shared_gate_up, shared_down) = match &shared {
        None => (0, None, None),
        Some((s, g, u, d)) => (
            *s,
            Some(gather(files, "shared expert gate/up weights", &[2 * s, h], dtype, &[g, u])?),
            Some(gather(files, "shared expert down weights", &[h, *s], dtype, &[d])?),
        ),
    };
    let layer = HostLayer {
        config: MoeConfig { shared_intermediate, ..cfg.moe.clone() },
        dtype,
        router: router_t,
        bias,
        gate_up,
        down,
        shared_gate_up,
        shared_down,
    };
    layer.validate()?;
    Ok(Assembled { layer, stored_dtype, router_stored_dtype, fused })
}

/// Elements converted per parallel job: large enough to amortise scheduling, small enough to
/// spread one fused tensor over every core.
const CHUNK_ELEMS: usize = 1 << 22;

/// Concatenates `parts` (in order) into one tensor of `shape` in `dtype`, converting where the
/// stored dtype differs. One allocation; each part's bytes go straight from the map into it
/// (a `memcpy` when the dtypes match), in parallel.
fn gather(files: &SafetensorsDir, what: &str, shape: &[usize], dtype: DType, parts: &[&Found]) -> Result<HostTensor> {
    let elems: usize = shape.iter().product();
    let total = elems * dtype.size();
    let mut data: Vec<u8> = Vec::new();
    data.try_reserve_exact(total).map_err(|_| {
        Error::OutOfMemory(format!("the host cannot allocate {:.2} GiB for the {what} {shape:?}", total as f64 / (1u64 << 30) as f64))
    })?;
    // (destination bytes, source dtype, source bytes)
    type Job<'a> = (&'a mut [MaybeUninit<u8>], DType, &'a [u8]);
    let mut jobs: Vec<Job<'_>> = Vec::new();
    let mut rest = &mut data.spare_capacity_mut()[..total];
    for part in parts {
        let src_dtype = part.float_dtype()?;
        let bytes = files.bytes(part);
        let ssz = src_dtype.size();
        for chunk in bytes.chunks(CHUNK_ELEMS * ssz) {
            let n = chunk.len() / ssz;
            let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n * dtype.size());
            rest = tail;
            jobs.push((dst, src_dtype, chunk));
        }
    }
    assert!(rest.is_empty(), "the parts of {what} do not fill {shape:?}: shapes were checked before");
    jobs.into_par_iter().for_each(|(dst, src_dtype, src)| convert_into(src_dtype, src, dtype, dst));
    // SAFETY: the jobs partition `data`'s first `total` spare bytes and each wrote all of its
    // slice (`convert_into` writes every byte of `dst`), so those bytes are initialised.
    unsafe { data.set_len(total) };
    HostTensor::new(dtype, shape, data)
}

/// Writes the little-endian elements `src` (of `from`) into `dst` as `to`, rounding to nearest
/// even when narrowing. `dst` must hold exactly as many elements as `src`.
fn convert_into(from: DType, src: &[u8], to: DType, dst: &mut [MaybeUninit<u8>]) {
    debug_assert_eq!(src.len() / from.size() * to.size(), dst.len());
    let f16_of = |c: [u8; 2]| f16::from_le_bytes(c).to_f32();
    let bf16_of = |c: [u8; 2]| f32::from_bits((u16::from_le_bytes(c) as u32) << 16);
    match (from, to) {
        _ if from == to => {
            dst.write_copy_of_slice(src);
        }
        (DType::BF16, DType::F32) => map_into(src, dst, |c| bf16_of(c).to_le_bytes()),
        (DType::F16, DType::F32) => map_into(src, dst, |c| f16_of(c).to_le_bytes()),
        (DType::F32, DType::BF16) => map_into(src, dst, |c| bf16::from_f32(f32::from_le_bytes(c)).to_le_bytes()),
        (DType::F32, DType::F16) => map_into(src, dst, |c| f16::from_f32(f32::from_le_bytes(c)).to_le_bytes()),
        (DType::BF16, DType::F16) => map_into(src, dst, |c| f16::from_f32(bf16_of(c)).to_le_bytes()),
        (DType::F16, DType::BF16) => map_into(src, dst, |c| bf16::from_f32(f16_of(c)).to_le_bytes()),
        _ => unreachable!("only float dtypes reach the conversion ({from} -> {to})"),
    }
}

/// `dst[i] = f(src[i])` over elements of `S` and `D` bytes (sizes known at compile time, so the
/// loop is tight).
#[inline]
fn map_into<const S: usize, const D: usize>(src: &[u8], dst: &mut [MaybeUninit<u8>], f: impl Fn([u8; S]) -> [u8; D]) {
    for (d, s) in dst.chunks_exact_mut(D).zip(src.chunks_exact(S)) {
        let s: [u8; S] = s.try_into().expect("chunks_exact yields S bytes");
        d.write_copy_of_slice(&f(s));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(from: DType, src: &[u8], to: DType) -> Vec<u8> {
        let n = src.len() / from.size() * to.size();
        let mut out = vec![MaybeUninit::new(0xAAu8); n];
        convert_into(from, src, to, &mut out);
        out.into_iter().map(|b| unsafe { b.assume_init() }).collect()
    }

    #[test]
    fn conversions_match_moe_hal_encode() {
        let values = [0.0f32, -1.5, 3.140625, 1e-3, 65504.0, -7.0e-8, f32::INFINITY];
        for from in DType::FLOATS {
            let src = from.encode(&values);
            for to in DType::FLOATS {
                let got = convert(from, &src, to);
                assert_eq!(got, to.encode(&from.decode(&src)), "{from} -> {to}");
            }
        }
    }
}
