//! The description of one MoE layer: its shape, its routing, and its weights on the host or on a
//! device.

use crate::{Backend, BlockScales, DType, Error, Result, Tensor, fp8, invalid};

/// How the router turns logits into the top-k experts and their weights.
///
/// The math is the spec every backend matches (DESIGN.md, "What the layer computes"):
///
/// * [`Routing::Softmax`] (Mixtral, Qwen3-MoE): `p = softmax(logits)`; choose the top-k of `p`;
///   weights are `p[chosen]`, divided by their sum when `norm_topk_prob`.
/// * [`Routing::SigmoidGrouped`] (DeepSeek-V3, Kimi K2): `s = sigmoid(logits)`;
///   `c = s + e_score_correction_bias` (zero when the layer has no bias); `c` is split into
///   `n_group` equal groups, each scored by the sum of its two largest `c` (its one value when a
///   group has a single expert); the best `topk_group` groups are kept; the top-k of `c` inside the
///   kept groups are chosen; weights are `s[chosen]` (not `c`), divided by `sum + 1e-20` when
///   `norm_topk_prob`, then multiplied by `routed_scaling_factor`.
///
/// In both: equal scores go to the lower expert index, NaN ranks below every number (and among
/// NaNs the lower index wins), and an id outside `0..experts` is never produced. Ids come out in
/// rank order (best first). One consequence, the same on every backend: with softmax routing a
/// single NaN logit makes every probability NaN, so that token gets experts `0..k` with NaN
/// weights (the `moe` command rejects non-finite input before it gets here).
///
/// Two documented differences from other implementations:
/// * Transformers 4.x and DeepSeek's own `modeling_deepseek.py` mask the dropped groups with 0.0
///   rather than minus infinity, so they can pick an expert from a dropped group when a corrected
///   score `c` inside a kept group is negative. We never leave the kept groups, as transformers 5,
///   vLLM and SGLang do; with real DeepSeek-V3 and Kimi K2 weights `c` stays positive and all agree.
/// * The router logits are f32 whatever the weights' dtype (the router weight as stored, the
///   products and sums in f32). Transformers computes Qwen3-MoE's and Mixtral's router in the
///   model's dtype, so a bf16 model there routes on bf16-rounded logits (and Qwen3 rounds its
///   routing weights to bf16): near-equal experts can swap (a few percent of tokens chose another
///   top-8 set in a synthetic Qwen3-sized test). Its float64 run, which the fixtures compare
///   against, agrees with ours; DeepSeek-V3's router is f32 in transformers too.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Routing {
    /// Softmax over all experts, then top-k.
    Softmax {
        /// Divide the chosen probabilities by their sum (Mixtral: always true).
        norm_topk_prob: bool,
    },
    /// Sigmoid scores, bias-corrected, group-limited selection.
    SigmoidGrouped {
        /// Number of expert groups (`experts % n_group == 0`). Kimi K2: 1.
        n_group: usize,
        /// Groups kept per token (`1..=n_group`).
        topk_group: usize,
        /// Divide the chosen sigmoid scores by their sum (+1e-20).
        norm_topk_prob: bool,
        /// Multiplies the final weights (DeepSeek-V3: 2.5; Kimi K2: 2.827).
        routed_scaling_factor: f32,
    },
}

/// [`Routing`] as the flat parameters a routing kernel takes (the WGSL and CUDA backends pass
/// these in their uniforms): `mode` 0 is softmax, 1 sigmoid-grouped; group fields are 0 and
/// `scale` is 1 for softmax.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoutingParams {
    /// 0: [`Routing::Softmax`]; 1: [`Routing::SigmoidGrouped`].
    pub mode: u32,
    /// Expert groups (0 for softmax).
    pub n_group: usize,
    /// Groups kept (0 for softmax).
    pub topk_group: usize,
    /// Renormalise the chosen weights.
    pub norm: bool,
    /// `routed_scaling_factor` (1 for softmax).
    pub scale: f32,
}

impl Routing {
    /// The flat kernel parameters of this routing.
    pub fn params(&self) -> RoutingParams {
        match *self {
            Routing::Softmax { norm_topk_prob } => RoutingParams { mode: 0, n_group: 0, topk_group: 0, norm: norm_topk_prob, scale: 1.0 },
            Routing::SigmoidGrouped { n_group, topk_group, norm_topk_prob, routed_scaling_factor } => {
                RoutingParams { mode: 1, n_group, topk_group, norm: norm_topk_prob, scale: routed_scaling_factor }
            }
        }
    }
}

/// The shape of one MoE layer.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    /// Model hidden size `H` (DeepSeek-V3: 7168).
    pub hidden: usize,
    /// Intermediate size `I` of one routed expert (DeepSeek-V3: 2048).
    pub intermediate: usize,
    /// Number of routed experts `E` (DeepSeek-V3: 256; Kimi K2: 384).
    pub experts: usize,
    /// Experts chosen per token `k` (DeepSeek-V3: 8).
    pub top_k: usize,
    /// How experts are chosen and weighted.
    pub routing: Routing,
    /// Intermediate size of the shared expert MLP that every token passes through, unweighted;
    /// 0 when the layer has none. DeepSeek-V3 fuses its `n_shared_experts` into one MLP of
    /// `n_shared_experts * intermediate`.
    pub shared_intermediate: usize,
}

impl MoeConfig {
    /// Checks the shape for consistency; the error names the first field at fault.
    pub fn validate(&self) -> Result<()> {
        if self.hidden == 0 || self.intermediate == 0 {
            return invalid!(
                "hidden size and expert intermediate size must be positive (got hidden {}, intermediate {})",
                self.hidden,
                self.intermediate
            );
        }
        if self.experts == 0 {
            return invalid!("the layer must have at least one expert");
        }
        if self.experts > u32::MAX as usize / 2 {
            return invalid!("{} experts is more than ids can hold", self.experts);
        }
        if self.top_k == 0 || self.top_k > self.experts {
            return invalid!("top-k must be between 1 and the expert count {}, got {}", self.experts, self.top_k);
        }
        if let Routing::SigmoidGrouped { n_group, topk_group, routed_scaling_factor, .. } = self.routing {
            if n_group == 0 || !self.experts.is_multiple_of(n_group) {
                return invalid!("n_group {n_group} must divide the expert count {}", self.experts);
            }
            if topk_group == 0 || topk_group > n_group {
                return invalid!("topk_group {topk_group} must be between 1 and n_group {n_group}");
            }
            let reachable = topk_group * (self.experts / n_group);
            if self.top_k > reachable {
                return invalid!("top-k {} is larger than the {reachable} experts in the {topk_group} kept groups", self.top_k);
            }
            if !routed_scaling_factor.is_finite() {
                return invalid!("routed_scaling_factor must be finite, got {routed_scaling_factor}");
            }
        }
        // Every byte count derived from the shape must be representable, so that no size computed
        // from it later ([`MoeConfig::weight_parts`], a buffer's length) can overflow. 2^50 bytes
        // (1 PiB) of f32 weights is far beyond any device and far below the limit.
        let f32_bytes = 4.0 * self.elements();
        if f32_bytes > (1u64 << 50) as f64 {
            return invalid!(
                "hidden {}, intermediate {}, {} experts and shared intermediate {} make {:.2e} weights ({f32_bytes:.2e} bytes \
                 as f32, the limit being 1 PiB whatever the storage dtype), more than any device holds",
                self.hidden,
                self.intermediate,
                self.experts,
                self.shared_intermediate,
                self.elements()
            );
        }
        Ok(())
    }

    /// Weight elements of the layer (router, every expert, the shared expert), in f64 so that
    /// absurd shapes give a large number instead of an overflow.
    fn elements(&self) -> f64 {
        let (h, i, e, s) = (self.hidden as f64, self.intermediate as f64, self.experts as f64, self.shared_intermediate as f64);
        e * h + e * 3.0 * h * i + 3.0 * h * s
    }

    /// Bytes of f32 intermediates one forward over `tokens` holds at most: router logits, the
    /// gathered rows, gate/up and its activation, the down rows, the shared expert's, and the
    /// input and output. What a caller checks against a device's memory (with
    /// [`MoeConfig::weight_bytes`]) before it runs; saturates instead of overflowing.
    pub fn forward_scratch_bytes(&self, tokens: usize) -> u64 {
        let (t, k) = (tokens as f64, self.top_k as f64);
        let (h, i, e, s) = (self.hidden as f64, self.intermediate as f64, self.experts as f64, self.shared_intermediate as f64);
        let rows = t * k;
        // `as` saturates at u64::MAX.
        (4.0 * (t * e + rows * (3.0 * i + h + 4.0) + t * (3.0 * h + 3.0 * s))) as u64
    }

    /// Bytes of all weights of this layer with experts stored in `dtype` (the bias is always
    /// f32): the router, every expert, the shared expert ([`MoeConfig::weight_parts`]).
    pub fn weight_bytes(&self, dtype: DType) -> u64 {
        let [router, expert, shared] = self.weight_parts(dtype);
        let bias = if matches!(self.routing, Routing::SigmoidGrouped { .. }) { 4 * self.experts as u64 } else { 0 };
        router + self.experts as u64 * expert + shared + bias
    }

    /// Bytes of the router, of one routed expert (gate/up and down) and of the shared expert
    /// (0 without one), with experts stored in `dtype`. F8E4M3 experts count one f32 scale per
    /// [`fp8::DEFAULT_BLOCK`] and a bf16 router (as DeepSeek ships it); other dtypes store the
    /// router in `dtype` too. `moe bench` costs a layer from these.
    pub fn weight_parts(&self, dtype: DType) -> [u64; 3] {
        // In u64: on a 32-bit target a layer's bytes exceed usize long before `validate`'s bound.
        let (h, i, s) = (self.hidden as u64, self.intermediate as u64, self.shared_intermediate as u64);
        let matrix = |rows: u64, cols: u64| -> u64 {
            let blocks =
                || fp8::scale_shape(&[rows as usize, cols as usize], fp8::DEFAULT_BLOCK).iter().map(|&n| n as u64).product::<u64>();
            let scales = if dtype.is_block_scaled() { 4 * blocks() } else { 0 };
            rows * cols * dtype.size() as u64 + scales
        };
        let router_size = if dtype.is_block_scaled() { DType::BF16.size() } else { dtype.size() } as u64;
        let shared = if s > 0 { matrix(2 * s, h) + matrix(h, s) } else { 0 };
        [self.experts as u64 * h * router_size, matrix(2 * i, h) + matrix(h, i), shared]
    }
}

/// A tensor in host memory: little-endian bytes, a dtype and a shape, and the block scales of a
/// [`DType::F8E4M3`] weight.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Element type.
    pub dtype: DType,
    /// Row-major shape.
    pub shape: Vec<usize>,
    /// `shape.product() * dtype.size()` little-endian bytes.
    pub data: Vec<u8>,
    /// The block scales of an F8E4M3 weight (f32); `None` for every other dtype.
    pub scales: Option<Box<BlockScales<HostTensor>>>,
}

impl HostTensor {
    /// Wraps bytes, checking that their length matches the shape. F8E4M3 needs its scales:
    /// [`HostTensor::fp8`].
    pub fn new(dtype: DType, shape: &[usize], data: Vec<u8>) -> Result<Self> {
        let t = HostTensor { dtype, shape: shape.to_vec(), data, scales: None };
        t.check()?;
        Ok(t)
    }

    /// An F8E4M3 weight from its bytes `q` and its f32 scale grid, one scale per `block` of the
    /// last two dimensions ([`crate::fp8`]). NaN bytes and non-finite scales are errors naming
    /// the first.
    pub fn fp8(shape: &[usize], q: Vec<u8>, block: [usize; 2], scales: Vec<f32>) -> Result<Self> {
        let grid = fp8::scale_shape(shape, block);
        let scales = HostTensor::new(DType::F32, &grid, bytemuck::cast_slice(&scales).to_vec()).map_err(|_| {
            Error::InvalidArgument(format!(
                "the block scales of an f8_e4m3 tensor of shape {shape:?} in {}x{} blocks must be {} f32 values (grid {grid:?}), got {}",
                block[0],
                block[1],
                grid.iter().product::<usize>(),
                scales.len()
            ))
        })?;
        let t = HostTensor {
            dtype: DType::F8E4M3,
            shape: shape.to_vec(),
            data: q,
            scales: Some(Box::new(BlockScales { block, tensor: scales })),
        };
        t.check()?;
        if let Some(i) = fp8::first_nan(&t.data) {
            return invalid!("element {i} of an f8_e4m3 tensor of shape {shape:?} is NaN (byte {:#04x})", t.data[i]);
        }
        let s = t.scales.as_ref().map(|s| s.tensor.to_f32()).unwrap_or_default();
        if let Some(i) = s.iter().position(|v| !v.is_finite()) {
            return invalid!("block scale {i} of an f8_e4m3 tensor of shape {shape:?} is {}", s[i]);
        }
        Ok(t)
    }

    /// Encodes f32 values into `dtype`, rounding to nearest even; F8E4M3 is quantized with one
    /// scale per [`fp8::DEFAULT_BLOCK`] ([`HostTensor::quantize`]).
    pub fn from_f32(dtype: DType, shape: &[usize], values: &[f32]) -> Result<Self> {
        if dtype.is_block_scaled() {
            return Self::quantize(shape, values, fp8::DEFAULT_BLOCK);
        }
        Self::new(dtype, shape, dtype.encode(values))
    }

    /// Quantizes finite f32 values to an F8E4M3 weight with one scale per `block`
    /// ([`fp8::quantize`]).
    pub fn quantize(shape: &[usize], values: &[f32], block: [usize; 2]) -> Result<Self> {
        if values.len() != shape.iter().product::<usize>() {
            return invalid!("a tensor of shape {shape:?} needs {} values, got {}", shape.iter().product::<usize>(), values.len());
        }
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return invalid!("value {i} to quantize to f8_e4m3 is {}", values[i]);
        }
        if block[0] == 0 || block[1] == 0 || shape.len() < 2 {
            return invalid!(
                "f8_e4m3 weights are matrices (or [G, N, K]) in blocks of positive size, got shape {shape:?}, block {block:?}"
            );
        }
        let (q, scales) = fp8::quantize(values, shape, block);
        Self::fp8(shape, q, block, scales)
    }

    /// The values as f32 (exact for f32, f16 and bf16; F8E4M3 with its scales applied, each
    /// value `E4M3[q] * scale` rounded once to f32).
    pub fn to_f32(&self) -> Vec<f32> {
        match &self.scales {
            Some(s) => fp8::dequantize(&self.data, &self.shape, s.block, &s.tensor.to_f32()),
            None => self.dtype.decode(&self.data),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held, block scales included (what uploading it needs on a device).
    pub fn stored_bytes(&self) -> u64 {
        self.data.len() as u64 + self.scales.as_ref().map_or(0, |s| s.tensor.stored_bytes())
    }

    /// Checks the byte count against the shape, and the block scales against the dtype.
    pub fn check(&self) -> Result<()> {
        let want = self.len() * self.dtype.size();
        if self.data.len() != want {
            return invalid!("a {} tensor of shape {:?} needs {want} bytes, got {}", self.dtype, self.shape, self.data.len());
        }
        if let Some(s) = &self.scales {
            s.tensor.check()?;
        }
        let scales = self.scales.as_ref().map(|s| (s.block, s.tensor.dtype, &s.tensor.shape[..]));
        fp8::check_scales(&format!("a {} tensor of shape {:?}", self.dtype, self.shape), self.dtype, &self.shape, scales)
    }
}

/// The weights of one MoE layer in host memory, in the layout every backend uses.
///
/// * `router`: `[E, H]` — the gate (`mlp.gate.weight`), in any float dtype: checkpoints often keep
///   it in f32 when the experts are bf16 (DeepSeek-V3 and Kimi K2 do, and compute router logits in
///   f32), and rounding it would move near-tied expert choices.
/// * `bias`: `[E]` f32 — `e_score_correction_bias`, only for [`Routing::SigmoidGrouped`].
/// * `gate_up`: `[E, 2I, H]` — per expert the gate projection's `I` rows, then the up projection's.
/// * `down`: `[E, H, I]`.
/// * `shared_gate_up`: `[2S, H]` and `shared_down`: `[H, S]` when `shared_intermediate = S > 0`.
///
/// All expert weights share one storage dtype, `dtype` (F8E4M3 ones each carry their block
/// scales; the router is never F8E4M3). Row-major, `y = x · W^T` (the PyTorch `Linear` layout).
#[derive(Debug, Clone, PartialEq)]
pub struct HostLayer {
    /// The layer's shape and routing.
    pub config: MoeConfig,
    /// Storage dtype of the expert (and shared expert) weights.
    pub dtype: DType,
    /// `[E, H]`, any float dtype.
    pub router: HostTensor,
    /// `[E]` f32, sigmoid routing only.
    pub bias: Option<HostTensor>,
    /// `[E, 2I, H]`: gate rows, then up rows, per expert.
    pub gate_up: HostTensor,
    /// `[E, H, I]`.
    pub down: HostTensor,
    /// `[2S, H]` when the layer has a shared expert.
    pub shared_gate_up: Option<HostTensor>,
    /// `[H, S]` when the layer has a shared expert.
    pub shared_down: Option<HostTensor>,
}

impl HostLayer {
    /// Every tensor, in the order router, bias, gate/up, down, shared gate/up, shared down;
    /// `None` for an absent optional one.
    pub fn tensors(&self) -> [Option<&HostTensor>; 6] {
        [
            Some(&self.router),
            self.bias.as_ref(),
            Some(&self.gate_up),
            Some(&self.down),
            self.shared_gate_up.as_ref(),
            self.shared_down.as_ref(),
        ]
    }

    /// Checks every tensor against the config; the error names the tensor and both shapes.
    pub fn validate(&self) -> Result<()> {
        for t in self.tensors().into_iter().flatten() {
            t.check()?;
        }
        let m = |t: &HostTensor| Meta {
            dtype: t.dtype,
            shape: t.shape.clone(),
            scales: t.scales.as_ref().map(|s| (s.block, s.tensor.dtype, s.tensor.shape.clone())),
        };
        check_layout(
            &self.config,
            self.dtype,
            [m(&self.router), m(&self.gate_up), m(&self.down)],
            [self.bias.as_ref().map(m), self.shared_gate_up.as_ref().map(m), self.shared_down.as_ref().map(m)],
        )
    }

    /// Converts every weight to another storage dtype (through f32, rounding to nearest even;
    /// F8E4M3 quantized with one scale per [`fp8::DEFAULT_BLOCK`]); the router keeps its
    /// precision where it can (see [`router_dtype`]).
    pub fn to_dtype(&self, dtype: DType) -> Result<HostLayer> {
        self.convert(dtype, fp8::DEFAULT_BLOCK)
    }

    /// Quantizes every expert weight to F8E4M3 with one scale per `block` ([`fp8::quantize`]);
    /// the router keeps its dtype.
    pub fn to_fp8(&self, block: [usize; 2]) -> Result<HostLayer> {
        self.convert(DType::F8E4M3, block)
    }

    fn convert(&self, dtype: DType, block: [usize; 2]) -> Result<HostLayer> {
        if !dtype.is_weight() {
            return invalid!("layer weights must be f32, f16, bf16 or f8_e4m3, not {dtype}");
        }
        let conv = |t: &HostTensor| match dtype {
            DType::F8E4M3 => HostTensor::quantize(&t.shape, &t.to_f32(), block),
            _ => HostTensor::from_f32(dtype, &t.shape, &t.to_f32()),
        };
        let rd = router_dtype(self.router.dtype, dtype);
        Ok(HostLayer {
            config: self.config.clone(),
            dtype,
            router: HostTensor::from_f32(rd, &self.router.shape, &self.router.to_f32())?,
            bias: self.bias.clone(),
            gate_up: conv(&self.gate_up)?,
            down: conv(&self.down)?,
            shared_gate_up: self.shared_gate_up.as_ref().map(conv).transpose()?,
            shared_down: self.shared_down.as_ref().map(conv).transpose()?,
        })
    }
}

/// The dtype a router stored in `stored` keeps when the experts move to `experts`: f32 when either
/// is f32 (never round a router that has the precision), its own dtype when the experts are
/// block-scaled (a router is never quantized: DeepSeek's FP8 checkpoints keep it in bf16), else
/// the experts' dtype.
pub fn router_dtype(stored: DType, experts: DType) -> DType {
    if stored == DType::F32 || experts == DType::F32 {
        DType::F32
    } else if experts.is_block_scaled() {
        stored
    } else {
        experts
    }
}

/// The weights of one MoE layer resident on a backend; made by [`Layer::upload`].
pub struct Layer<B: Backend + ?Sized> {
    /// The layer's shape and routing.
    pub config: MoeConfig,
    /// Storage dtype of the expert (and shared expert) weights.
    pub dtype: DType,
    /// `[E, H]`, any float dtype
    pub router: Tensor<B>,
    /// `[E]` f32
    pub bias: Option<Tensor<B>>,
    /// `[E, 2I, H]`
    pub gate_up: Tensor<B>,
    /// `[E, H, I]`
    pub down: Tensor<B>,
    /// `[2S, H]`
    pub shared_gate_up: Option<Tensor<B>>,
    /// `[H, S]`
    pub shared_down: Option<Tensor<B>>,
}

impl<B: Backend + ?Sized> Layer<B> {
    /// Validates `host` and copies it to the backend.
    ///
    /// A layer larger than the device's memory ([`crate::BackendInfo::memory_bytes`]) is an
    /// [`Error::OutOfMemory`] before any upload starts; where that memory is the host's
    /// ([`crate::BackendInfo::shares_host_memory`]), so is one whose two copies (`host` and the
    /// backend's) would not both fit, or whose copy exceeds the host memory available now
    /// ([`crate::host::available_bytes`]).
    pub fn upload(backend: &B, host: &HostLayer) -> Result<Self> {
        host.validate()?;
        let need: u64 = host.tensors().iter().flatten().map(|t| t.stored_bytes()).sum();
        let info = backend.info();
        let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
        if need > info.memory_bytes {
            return Err(Error::OutOfMemory(format!(
                "the layer's weights need {:.2} GiB but {} has {:.2} GiB",
                gib(need),
                info.device,
                gib(info.memory_bytes)
            )));
        }
        // The host copy is already made: the backend's copy must fit beside it, in what the
        // host has left (/proc/meminfo is read only for such a backend).
        let available = if info.shares_host_memory { crate::host::available_bytes() } else { u64::MAX };
        if info.shares_host_memory && (need.saturating_mul(2) > info.memory_bytes || need > available) {
            return Err(Error::OutOfMemory(format!(
                "the layer's weights need {:.2} GiB, twice while they upload from host memory to {}, whose memory is the \
                 host's ({:.2} GiB, {:.2} GiB available)",
                gib(need),
                info.device,
                gib(info.memory_bytes),
                gib(available)
            )));
        }
        let up = |t: &HostTensor| Tensor::from_host(backend, t);
        Ok(Layer {
            config: host.config.clone(),
            dtype: host.dtype,
            router: up(&host.router)?,
            bias: host.bias.as_ref().map(up).transpose()?,
            gate_up: up(&host.gate_up)?,
            down: up(&host.down)?,
            shared_gate_up: host.shared_gate_up.as_ref().map(up).transpose()?,
            shared_down: host.shared_down.as_ref().map(up).transpose()?,
        })
    }
}

impl<B: Backend + ?Sized> Layer<B> {
    /// Every tensor, in [`HostLayer::tensors`]' order; `None` for an absent optional one.
    pub fn tensors(&self) -> [Option<&Tensor<B>>; 6] {
        [
            Some(&self.router),
            self.bias.as_ref(),
            Some(&self.gate_up),
            Some(&self.down),
            self.shared_gate_up.as_ref(),
            self.shared_down.as_ref(),
        ]
    }

    /// Checks every resident tensor against the config (the fields are public, so a caller may
    /// have assembled a layer by hand).
    pub fn validate(&self) -> Result<()> {
        let m = |t: &Tensor<B>| Meta {
            dtype: t.dtype,
            shape: t.shape.clone(),
            scales: t.scales.as_ref().map(|s| (s.block, s.tensor.dtype, s.tensor.shape.clone())),
        };
        check_layout(
            &self.config,
            self.dtype,
            [m(&self.router), m(&self.gate_up), m(&self.down)],
            [self.bias.as_ref().map(m), self.shared_gate_up.as_ref().map(m), self.shared_down.as_ref().map(m)],
        )
    }
}

/// The dtype and shape of one of a layer's tensors, wherever it lives, and of its block scales
/// (`(block, dtype, shape)`).
struct Meta {
    dtype: DType,
    shape: Vec<usize>,
    scales: Option<([usize; 2], DType, Vec<usize>)>,
}

/// The one check of a layer's tensors against its config, for [`HostLayer`] and [`Layer`]:
/// `[router, gate_up, down]` and the optional `[bias, shared_gate_up, shared_down]`.
fn check_layout(c: &MoeConfig, dtype: DType, required: [Meta; 3], optional: [Option<Meta>; 3]) -> Result<()> {
    c.validate()?;
    if !dtype.is_weight() {
        return invalid!("layer weights must be f32, f16, bf16 or f8_e4m3, not {dtype}");
    }
    let (h, i, e, s) = (c.hidden, c.intermediate, c.experts, c.shared_intermediate);
    let check = |name: &str, t: &Meta, dtype: DType, shape: &[usize]| -> Result<()> {
        if t.dtype != dtype || t.shape != shape {
            return invalid!("{name} must be {dtype} {shape:?}, got {} {:?}", t.dtype, t.shape);
        }
        fp8::check_scales(name, t.dtype, &t.shape, t.scales.as_ref().map(|(b, d, s)| (*b, *d, &s[..])))
    };
    let [router, gate_up, down] = required;
    let [bias, shared_gate_up, shared_down] = optional;
    if !router.dtype.is_float() {
        return invalid!("router weight must be f32, f16 or bf16, not {}", router.dtype);
    }
    check("router weight", &router, router.dtype, &[e, h])?;
    check("expert gate/up weights", &gate_up, dtype, &[e, 2 * i, h])?;
    check("expert down weights", &down, dtype, &[e, h, i])?;
    match (&c.routing, &bias) {
        (Routing::Softmax { .. }, Some(_)) => {
            return invalid!("softmax routing takes no e_score_correction_bias");
        }
        (_, Some(b)) => check("e_score_correction_bias", b, DType::F32, &[e])?,
        _ => {}
    }
    match (s, &shared_gate_up, &shared_down) {
        (0, None, None) => Ok(()),
        (0, _, _) => invalid!("shared expert weights given but shared_intermediate is 0"),
        (_, Some(gu), Some(d)) => {
            check("shared expert gate/up weights", gu, dtype, &[2 * s, h])?;
            check("shared expert down weights", d, dtype, &[h, s])
        }
        _ => invalid!("shared_intermediate is {s} but the shared expert weights are missing"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deepseek_v3() -> MoeConfig {
        MoeConfig {
            hidden: 7168,
            intermediate: 2048,
            experts: 256,
            top_k: 8,
            routing: Routing::SigmoidGrouped { n_group: 8, topk_group: 4, norm_topk_prob: true, routed_scaling_factor: 2.5 },
            shared_intermediate: 2048,
        }
    }

    #[test]
    fn byte_counts_of_a_real_layer() {
        let c = deepseek_v3();
        c.validate().unwrap();
        // bf16: router 256 x 7168, each expert 3 x 7168 x 2048, the shared one as large, the bias f32.
        assert_eq!(c.weight_parts(DType::BF16), [3_670_016, 88_080_384, 88_080_384]);
        assert_eq!(c.weight_bytes(DType::BF16), 3_670_016 + 257 * 88_080_384 + 4 * 256);
        // f8_e4m3: one byte a weight plus an f32 scale per 128 x 128 block ([4096, 7168]: 32 x 56
        // blocks; [7168, 2048]: 56 x 16), a bf16 router.
        let expert = 4096 * 7168 + 4 * 32 * 56 + 7168 * 2048 + 4 * 56 * 16;
        assert_eq!(c.weight_parts(DType::F8E4M3), [3_670_016, expert, expert]);
    }

    #[test]
    fn shapes_too_large_to_count_are_refused_and_scratch_saturates() {
        let c = MoeConfig { hidden: 99_999_999_999, intermediate: 99_999_999, ..deepseek_v3() };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("more than any device holds") && e.contains("hidden 99999999999"), "{e}");
        // Kimi K2's 384 experts at DeepSeek's sizes are 33.8 GB of bf16: nowhere near the bound.
        MoeConfig {
            experts: 384,
            routing: Routing::SigmoidGrouped { n_group: 1, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 2.827 },
            ..deepseek_v3()
        }
        .validate()
        .unwrap();
        assert_eq!(deepseek_v3().forward_scratch_bytes(usize::MAX), u64::MAX);
        assert_eq!(deepseek_v3().forward_scratch_bytes(0), 0);
    }
}
