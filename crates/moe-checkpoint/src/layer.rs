//! Assembling one layer's [`HostLayer`] from the checkpoint's tensors: names per family, shape
//! checks, and the copy (or dtype conversion) from the memory maps into one allocation per tensor.

use std::mem::MaybeUninit;

use half::{bf16, f16};
use moe_hal::{BlockScales, DType, Error, HostLayer, HostTensor, MoeConfig, Result, Routing};
use rayon::prelude::*;

use crate::config::{Family, ModelConfig};
use crate::fp8::{self, Stored};
use crate::safetensors_dir::{Found, SafetensorsDir};

/// A layer read from the files, with what the files held.
pub(crate) struct Assembled {
    pub layer: HostLayer,
    pub stored: Stored,
    pub router_stored_dtype: DType,
    pub fused: bool,
}

/// A weight as the files hold it: its tensor, and how to read its elements.
struct Part {
    t: Found,
    src: Src,
}

enum Src {
    /// Plain floats of this dtype.
    Float(DType),
    /// E4M3 bytes scaled per block by `scales` (its `weight_scale_inv` tensor).
    Fp8 { scales: Found, block: [usize; 2] },
}

impl Part {
    fn stored(&self) -> Stored {
        match self.src {
            Src::Float(d) => Stored::Float(d),
            Src::Fp8 { block, .. } => Stored::Fp8E4M3 { block },
        }
    }
}

/// A float tensor (the router, the bias) as a [`Part`]; FP8 is an error here.
fn float_part(t: Found) -> Result<Part> {
    Ok(Part { src: Src::Float(t.float_dtype()?), t })
}

/// An expert weight as a [`Part`]: a float tensor, or an F8_E4M3 one with its
/// `<name>_scale_inv` beside it (`…weight_scale_inv` for a `…weight`) in a grid of
/// `fp8_block` blocks (config.json's, else DeepSeek's 128 x 128), checked here.
fn weight_part(files: &mut SafetensorsDir, t: Found, fp8_block: Option<[usize; 2]>) -> Result<Part> {
    if t.dtype != safetensors::Dtype::F8_E4M3 {
        return float_part(t);
    }
    let (block, from) = match fp8_block {
        Some(b) => (b, "quantization_config.weight_block_size"),
        None => (fp8::DEFAULT_BLOCK, "DeepSeek's; config.json gives no fp8 weight_block_size"),
    };
    let scale_name = format!("{}_scale_inv", t.name);
    let Some(scales) = files.find(&scale_name)? else {
        // compressed-tensors and fbgemm write their scales (per tensor, channel or block) to
        // `…weight_scale`: a different scheme, named as such.
        let other = format!("{}_scale", t.name);
        let scheme = match files.find(&other)? {
            Some(_) => format!(
                "; it has {other} instead, another FP8 scheme (as compressed-tensors and fbgemm write), which is not read: only DeepSeek's (weight_scale_inv) is"
            ),
            None => String::new(),
        };
        return Err(Error::Checkpoint(format!(
            "tensor {} in {} is F8_E4M3, but its block scales {scale_name} are not in the checkpoint{scheme}",
            t.name, t.file
        )));
    };
    let want = fp8::scale_shape(&t.shape, block);
    if t.shape.len() < 2 || scales.shape != want {
        return Err(Error::Checkpoint(format!(
            "tensor {} in {} has shape {:?}, but {} {:?} in blocks of {}x{} ({from}) needs {want:?}",
            scales.name, scales.file, scales.shape, t.name, t.shape, block[0], block[1]
        )));
    }
    if !matches!(scales.dtype, safetensors::Dtype::F32 | safetensors::Dtype::BF16 | safetensors::Dtype::F16) {
        return Err(Error::Checkpoint(format!(
            "tensor {} in {} has dtype {:?}; the block scales of an FP8 weight must be F32, BF16 or F16",
            scales.name, scales.file, scales.dtype
        )));
    }
    Ok(Part { t, src: Src::Fp8 { scales, block } })
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

/// The widest float dtype among `parts` (FP8 ones aside): F32 when any is F32 or when F16 and
/// BF16 mix (each has values the other cannot hold, F32 holds both exactly); `None` when none is
/// float.
fn widest<'a>(parts: impl IntoIterator<Item = &'a Part>) -> Option<DType> {
    parts.into_iter().fold(None, |acc, p| match (acc, &p.src) {
        (_, Src::Fp8 { .. }) => acc,
        (None, Src::Float(d)) => Some(*d),
        (Some(a), Src::Float(d)) => Some(if a == *d { a } else { DType::F32 }),
    })
}

/// Refuses a NaN or infinity in a small float tensor read whole (the router weight, the
/// `e_score_correction_bias`): the router would silently route around it, where transformers
/// would give NaN. The error names the tensor, its file, the value and the first bad index.
fn check_finite(files: &SafetensorsDir, t: &Found, d: DType) -> Result<()> {
    let bytes = files.bytes(t);
    let half = |mask: u16| bytes.chunks_exact(2).position(|c| u16::from_le_bytes([c[0], c[1]]) & mask == mask);
    let bad = match d {
        DType::F32 => bytes.chunks_exact(4).position(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) & 0x7F80_0000 == 0x7F80_0000),
        DType::BF16 => half(0x7F80),
        DType::F16 => half(0x7C00),
        _ => None,
    };
    let Some(i) = bad else { return Ok(()) };
    let value = d.decode(&bytes[i * d.size()..(i + 1) * d.size()])[0];
    let at = match t.shape.as_slice() {
        [_, cols] => format!("element {i} (row {}, column {})", i / cols, i % cols),
        _ => format!("element {i}"),
    };
    Err(Error::Checkpoint(format!("tensor {} in {} holds a non-finite value ({value}) at {at}", t.name, t.file)))
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
    check_finite(files, &router, router_stored_dtype)?;

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
    let experts = experts.into_iter().map(|t| weight_part(files, t, cfg.fp8_block)).collect::<Result<Vec<_>>>()?;
    let bias = match cfg.moe.routing {
        Routing::SigmoidGrouped { .. } => {
            let b = files.require(&names.bias())?;
            check_shape(&b, &[e], "[experts]")?;
            let b = float_part(b)?;
            if let Src::Float(d) = b.src {
                check_finite(files, &b.t, d)?;
            }
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
                    let [gate, up, down] = [gate, up, down].map(|t| weight_part(files, t, cfg.fp8_block));
                    Some((s, gate?, up?, down?))
                }
            }
        }
    };

    // Without a forced dtype, no weight is rounded: FP8 routed experts stay FP8; float ones take
    // the widest float dtype among all the expert weights (a mixed checkpoint widens the rest).
    let shared_parts = shared.iter().flat_map(|(_, g, u, d)| [g, u, d]);
    let stored = match experts[0].stored() {
        Stored::Float(d) => Stored::Float(widest(&experts).unwrap_or(d)),
        fp8 => fp8,
    };
    let default = match stored {
        Stored::Float(d) => Stored::Float(widest(experts.iter().chain(shared_parts)).unwrap_or(d)),
        fp8 => fp8,
    };
    let dtype = force.unwrap_or(default.default_dtype());
    if !dtype.is_weight() {
        return Err(Error::InvalidArgument(format!("layer weights must be f32, f16, bf16 or f8_e4m3, not {dtype}")));
    }
    // f8_e4m3 asked of a float checkpoint: read the floats, quantize once assembled.
    let quantize = dtype.is_block_scaled() && !matches!(stored, Stored::Fp8E4M3 { .. });
    let dtype_read = if quantize { default.default_dtype() } else { dtype };
    // The layer is copied into host memory: refuse one that cannot fit before allocating it (the
    // kernel overcommits, so a reservation would succeed and filling it would end in the OOM
    // killer, not in an error).
    let need = cfg.moe.weight_bytes(dtype_read) + if quantize { cfg.moe.weight_bytes(dtype) } else { 0 };
    let have = moe_hal::host::available_bytes();
    if need as f64 > 0.9 * have as f64 {
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        return Err(Error::OutOfMemory(format!(
            "layer {layer} needs {:.2} GiB of host memory as {dtype_read}{} and {:.2} GiB are available",
            gib(need),
            if quantize { " (then quantized to f8_e4m3)" } else { "" },
            gib(have)
        )));
    }

    let router = float_part(router)?;
    // Every tensor is located and checked: now read them.
    let shared_parts = shared.iter().flat_map(|(_, g, u, d)| [g, u, d]);
    for p in experts.iter().chain([&router]).chain(bias.iter()).chain(shared_parts) {
        files.will_need(&p.t);
        if let Src::Fp8 { scales, .. } = &p.src {
            files.will_need(scales);
        }
    }
    let files = &*files;
    // The router keeps f32 when it has it (DeepSeek-V3 and Kimi K2 store it so, and compute their
    // logits in f32): rounding it to the experts' dtype can flip near-tied expert choices.
    let router_t = gather(files, "router weight", &[e, h], moe_hal::router_dtype(router_stored_dtype, dtype), &[&router])?;
    let (gate_up, down) = if fused {
        (
            gather(files, "expert gate/up weights", &[e, 2 * i, h], dtype_read, &[&experts[0]])?,
            gather(files, "expert down weights", &[e, h, i], dtype_read, &[&experts[1]])?,
        )
    } else {
        let gu: Vec<&Part> = experts.chunks(3).flat_map(|c| [&c[0], &c[1]]).collect();
        let dn: Vec<&Part> = experts.chunks(3).map(|c| &c[2]).collect();
        (
            gather(files, "expert gate/up weights", &[e, 2 * i, h], dtype_read, &gu)?,
            gather(files, "expert down weights", &[e, h, i], dtype_read, &dn)?,
        )
    };
    let bias = bias.map(|b| gather(files, "e_score_correction_bias", &[e], DType::F32, &[&b])).transpose()?;
    let (shared_intermediate, shared_gate_up, shared_down) = match &shared {
        None => (0, None, None),
        Some((s, g, u, d)) => (
            *s,
            Some(gather(files, "shared expert gate/up weights", &[2 * s, h], dtype_read, &[g, u])?),
            Some(gather(files, "shared expert down weights", &[h, *s], dtype_read, &[d])?),
        ),
    };
    let layer = HostLayer {
        config: MoeConfig { shared_intermediate, ..cfg.moe.clone() },
        dtype: dtype_read,
        router: router_t,
        bias,
        gate_up,
        down,
        shared_gate_up,
        shared_down,
    };
    let layer = if quantize { layer.to_dtype(dtype)? } else { layer };
    layer.validate()?;
    Ok(Assembled { layer, stored, router_stored_dtype, fused })
}

/// Elements converted per parallel job: large enough to amortise scheduling, small enough to
/// spread one fused tensor over every core.
const CHUNK_ELEMS: usize = 1 << 22;

/// Concatenates `parts` (in order) into one tensor of `shape` in `dtype`, converting where the
/// stored dtype differs and dequantizing FP8. One allocation; each part's bytes go straight from
/// the map into it (a `memcpy` when the dtypes match), in parallel.
fn gather(files: &SafetensorsDir, what: &str, shape: &[usize], dtype: DType, parts: &[&Part]) -> Result<HostTensor> {
    if dtype.is_block_scaled() {
        return gather_fp8(files, what, shape, parts);
    }
    let elems: usize = shape.iter().product();
    let total = elems * dtype.size();
    let mut data: Vec<u8> = Vec::new();
    data.try_reserve_exact(total).map_err(|_| {
        Error::OutOfMemory(format!("the host cannot allocate {:.2} GiB for the {what} {shape:?}", total as f64 / (1u64 << 30) as f64))
    })?;
    // Each FP8 part's scale grid, decoded once and checked finite.
    let scales: Vec<Option<Vec<f32>>> = parts
        .iter()
        .map(|p| match &p.src {
            Src::Float(_) => Ok(None),
            Src::Fp8 { scales, .. } => read_scales(files, scales).map(Some),
        })
        .collect::<Result<_>>()?;
    let mut jobs: Vec<Job<'_>> = Vec::new();
    let mut rest = &mut data.spare_capacity_mut()[..total];
    let mut take = |n: usize| {
        let (dst, tail) = std::mem::take(&mut rest).split_at_mut(n * dtype.size());
        rest = tail;
        dst
    };
    for (part, scales) in parts.iter().zip(&scales) {
        let bytes = files.bytes(&part.t);
        match (&part.src, scales) {
            (Src::Float(from), _) => {
                for chunk in bytes.chunks(CHUNK_ELEMS * from.size()) {
                    jobs.push(Job::Float { dst: take(chunk.len() / from.size()), from: *from, src: chunk });
                }
            }
            (Src::Fp8 { block, .. }, Some(scales)) => {
                let (rows, cols) = (part.t.shape[part.t.shape.len() - 2], part.t.shape[part.t.shape.len() - 1]);
                let per_job = (CHUNK_ELEMS / cols.max(1)).max(1);
                for (j, chunk) in bytes.chunks(per_job * cols.max(1)).enumerate() {
                    let grid = Grid { row0: j * per_job, rows, cols, block: *block, scales };
                    jobs.push(Job::Fp8 { dst: take(chunk.len()), src: chunk, grid, tensor: &part.t });
                }
            }
            (Src::Fp8 { .. }, None) => unreachable!("every FP8 part has its scales decoded"),
        }
    }
    assert!(rest.is_empty(), "the parts of {what} do not fill {shape:?}: shapes were checked before");
    jobs.into_par_iter().try_for_each(|job| match job {
        Job::Float { dst, from, src } => {
            convert_into(from, src, dtype, dst);
            Ok(())
        }
        Job::Fp8 { dst, src, grid, tensor } => dequantize_into(src, &grid, dtype, dst).map_err(|i| {
            Error::Checkpoint(format!(
                "tensor {} in {} holds a NaN (F8_E4M3 byte {:#04x}) at element {}",
                tensor.name,
                tensor.file,
                src[i],
                grid.row0 * grid.cols + i
            ))
        }),
    })?;
    // SAFETY: the jobs partition `data`'s first `total` spare bytes and each wrote all of its
    // slice (`convert_into` and a successful `dequantize_into` write every byte of `dst`), so
    // those bytes are initialised.
    unsafe { data.set_len(total) };
    HostTensor::new(dtype, shape, data)
}

/// An FP8 weight's scale grid as f32, checked finite.
fn read_scales(files: &SafetensorsDir, scales: &Found) -> Result<Vec<f32>> {
    let v = scales.float_dtype()?.decode(files.bytes(scales));
    match v.iter().position(|s| !s.is_finite()) {
        Some(i) => {
            Err(Error::Checkpoint(format!("tensor {} in {} holds a non-finite scale ({}) at element {i}", scales.name, scales.file, v[i])))
        }
        None => Ok(v),
    }
}

/// [`gather`] into F8E4M3, kept as stored: the parts' bytes concatenated, and their scale grids
/// concatenated into the grid of `shape`. That is one grid only when every part starts on a
/// block row of its matrix: gate and up fused into `[2I, H]` need `I` to be a multiple of the
/// block rows (DeepSeek-V3 and Kimi K2: 2048 and 128), else the error says to dequantize instead.
fn gather_fp8(files: &SafetensorsDir, what: &str, shape: &[usize], parts: &[&Part]) -> Result<HostTensor> {
    let rows = shape[shape.len() - 2];
    let mut block = None;
    let mut scales = Vec::new();
    let mut data = Vec::new();
    let mut row = 0;
    for p in parts {
        let (t, b, s) = match &p.src {
            Src::Fp8 { scales, block } => (&p.t, *block, scales),
            Src::Float(d) => {
                return Err(Error::Checkpoint(format!(
                    "the {what} cannot stay f8_e4m3: tensor {} in {} is stored as {d}; load them dequantized (--dtype bf16)",
                    p.t.name, p.t.file
                )));
            }
        };
        if block.is_some_and(|x| x != b) {
            return Err(Error::Checkpoint(format!(
                "the {what} mix FP8 block sizes ({:?} and {b:?}); load them dequantized (--dtype bf16)",
                block.unwrap()
            )));
        }
        block = Some(b);
        let start = row % rows;
        if !start.is_multiple_of(b[0]) {
            return Err(Error::Checkpoint(format!(
                "tensor {} in {} starts at row {start} of the {what} [.., {rows}, ..], not on a boundary of its {}-row scale blocks, so its scales cannot join one grid; load the layer dequantized (--dtype bf16)",
                t.name, t.file, b[0]
            )));
        }
        let bytes = files.bytes(t);
        if let Some(i) = fp8::first_nan(bytes) {
            return Err(Error::Checkpoint(format!(
                "tensor {} in {} holds a NaN (F8_E4M3 byte {:#04x}) at element {i}",
                t.name, t.file, bytes[i]
            )));
        }
        scales.extend(read_scales(files, s)?);
        data.try_reserve_exact(bytes.len()).map_err(|_| {
            Error::OutOfMemory(format!(
                "the host cannot allocate {:.2} GiB for the {what} {shape:?}",
                bytes.len() as f64 / (1u64 << 30) as f64
            ))
        })?;
        data.extend_from_slice(bytes);
        row += t.shape[..t.shape.len() - 1].iter().product::<usize>();
    }
    let block = block.expect("a weight has at least one part");
    // Every part's bytes were checked for NaN and its scales for finiteness above, with the
    // tensor named: assemble directly rather than through HostTensor::fp8, which would scan the
    // bytes (11 GB for DeepSeek-V3's gate/up) a second time.
    let grid = fp8::scale_shape(shape, block);
    let scales = HostTensor::new(DType::F32, &grid, scales.iter().flat_map(|v| v.to_le_bytes()).collect())?;
    let t = HostTensor { dtype: DType::F8E4M3, shape: shape.to_vec(), data, scales: Some(Box::new(BlockScales { block, tensor: scales })) };
    t.check()?;
    Ok(t)
}

/// One slice of a [`gather`]: destination bytes and the source bytes that fill them.
enum Job<'a> {
    Float { dst: &'a mut [MaybeUninit<u8>], from: DType, src: &'a [u8] },
    Fp8 { dst: &'a mut [MaybeUninit<u8>], src: &'a [u8], grid: Grid<'a>, tensor: &'a Found },
}

/// Where an FP8 slice sits in its weight, and the weight's scale grid.
struct Grid<'a> {
    /// The slice's first row, counted over the leading dimensions too.
    row0: usize,
    rows: usize,
    cols: usize,
    block: [usize; 2],
    scales: &'a [f32],
}

/// Dequantizes E4M3 rows into `dst` as `to` (rounding to nearest even when narrowing), or
/// returns the index of the first NaN byte.
fn dequantize_into(src: &[u8], g: &Grid<'_>, to: DType, dst: &mut [MaybeUninit<u8>]) -> std::result::Result<(), usize> {
    if let Some(i) = fp8::first_nan(src) {
        return Err(i);
    }
    fn write<const D: usize>(src: &[u8], g: &Grid<'_>, dst: &mut [MaybeUninit<u8>], enc: impl Fn(f32) -> [u8; D]) {
        fp8::for_each_block(src, g.row0, g.rows, g.cols, g.block, g.scales, |at, run, scale| {
            for (d, &q) in dst[at * D..(at + run.len()) * D].chunks_exact_mut(D).zip(run) {
                d.write_copy_of_slice(&enc(fp8::E4M3[q as usize] * scale));
            }
        });
    }
    match to {
        DType::F32 => write(src, g, dst, f32::to_le_bytes),
        DType::BF16 => write(src, g, dst, |v| bf16::from_f32(v).to_le_bytes()),
        DType::F16 => write(src, g, dst, |v| f16::from_f32(v).to_le_bytes()),
        _ => unreachable!("only float dtypes reach the conversion (f8_e4m3 -> {to})"),
    }
    Ok(())
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
