//! The device trait: the contract a backend implements.

use crate::{DType, Layer, Result, Routing, Tensor};

/// The ops of the trait, for [`Backend::supports`] and for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// [`Backend::router_topk`]
    RouterTopk,
    /// [`Backend::permute`]
    Permute,
    /// [`Backend::grouped_gemm`]
    GroupedGemm,
    /// [`Backend::grouped_gemm_swiglu`]
    GroupedGemmSwiglu,
    /// [`Backend::activation`]
    Activation,
    /// [`Backend::combine`]
    Combine,
    /// [`Backend::forward`]
    Forward,
}

impl Op {
    /// Every op, in pipeline order.
    pub const ALL: [Op; 7] =
        [Op::RouterTopk, Op::Permute, Op::GroupedGemm, Op::GroupedGemmSwiglu, Op::Activation, Op::Combine, Op::Forward];

    /// The one name of this op: the trait method, the shader files, the conformance case.
    pub fn name(self) -> &'static str {
        match self {
            Op::RouterTopk => "router_topk",
            Op::Permute => "permute",
            Op::GroupedGemm => "grouped_gemm",
            Op::GroupedGemmSwiglu => "grouped_gemm_swiglu",
            Op::Activation => "activation",
            Op::Combine => "combine",
            Op::Forward => "forward",
        }
    }
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a backend tells about itself and its device.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendInfo {
    /// Short name used on the command line: `cpu`, `wgpu`, `cuda`, `cann`.
    pub name: String,
    /// The device in words, e.g. `"NVIDIA H200 (Vulkan)"` or `"host CPU, 2 threads"`.
    pub device: String,
    /// Memory the backend may allocate in total, in bytes.
    pub memory_bytes: u64,
    /// Whether that memory is the host's (the CPU backend, a software adapter such as lavapipe,
    /// unified memory counted as the host's):
    /// a layer uploaded from host memory then needs room for two copies while it uploads, which
    /// [`crate::Layer::upload`] checks.
    pub shares_host_memory: bool,
    /// Largest single buffer, in bytes (a backend may split larger tensors internally).
    pub max_buffer_bytes: u64,
    /// Subgroup (warp) size when the device has one.
    pub subgroup_size: Option<u32>,
    /// Notable features found, e.g. `"shader-f16"`, `"cooperative-matrix 16x16x16"`.
    pub features: Vec<String>,
}

/// One accelerator: memory, a capability query, and the five ops of an MoE layer, plus two with
/// defaults: the gate/up projection with SwiGLU fused, and the whole layer composed from the ops.
///
/// # The contract
///
/// * **Call it through [`crate::ops`].** Those functions validate every shape and dtype once, in
///   front of the trait, and then call the method of the same name. A backend may therefore assume
///   every documented shape and dtype holds and never re-checks them. They also return early when
///   an output is empty (zero tokens), so a backend never sees a zero-sized launch.
/// * **Ordering.** Ops are enqueued and run in call order. Only [`Backend::download`] and
///   [`Backend::synchronize`] block; errors an op can only find on the device (an expert id out of
///   range inside a device buffer) surface no later than the next blocking call. A backend is
///   `Sync` and may be shared by threads, but it keeps one queue and one set of device error
///   flags: such an error surfaces at the next blocking call of *whichever* thread makes it, and
///   that call waits for every thread's work. Threads that need their own ordering and their own
///   errors open one backend each.
/// * **Memory.** Outputs are allocated by the caller ([`Backend::alloc`]) and passed as `&mut`;
///   an op writes every element of its outputs (the suite poisons outputs to prove it).
/// * **Activations are f32.** Weights are stored as f32, f16 or bf16, expert weights also as
///   F8E4M3 with f32 block scales ([`crate::fp8`]; the one dtype a backend may answer `false`
///   for, which [`crate::ops`] then refuses with [`crate::Error::Unsupported`]); hidden states,
///   logits and intermediate results are f32; every reduction accumulates in at least f32.
/// * **Failures.** Native failures become [`crate::Error::OutOfMemory`],
///   [`crate::Error::DeviceLost`] or [`crate::Error::Driver`], never a panic. Data-dependent bad
///   input a kernel can see (an id `>= E`, offsets that are not cumulative) is an
///   [`crate::Error::InvalidArgument`], never an out-of-bounds access.
/// * **Porting.** Every op has a host fallback in [`crate::fallback`] (download, run the reference
///   in [`crate::host`], upload), so a new backend can implement memory first, route every op
///   through the fallback, pass the conformance suite, and then replace ops one at a time.
///
/// Index conventions (prior art: CANN, candle, ggml): `T` tokens, `E` experts, `k` experts per
/// token, `H` hidden size, `I` expert intermediate size. A *pair* is one (token `t`, slot `j`),
/// flattened as `t * k + j`. Sorting pairs by expert gives *rows*; `expert_offsets` (CANN's
/// cumulative `groupList`) delimits each expert's rows.
pub trait Backend: Send + Sync + 'static {
    /// A device allocation. It knows its own size; dtype and shape travel beside it in [`Tensor`].
    type Buffer: Send + Sync + 'static;

    /// Name, device, memory and limits.
    fn info(&self) -> &BackendInfo;

    /// Whether `op` runs natively (or through the fallback) for weights stored in `dtype`.
    /// Ops without weights (`router_topk`, `permute`, `activation`, `combine`) answer for the
    /// layer dtype they are part of. The suite reports `false` as "unsupported", not as a failure;
    /// for block-scaled weights ([`DType::F8E4M3`]) [`crate::ops`] asks first and refuses them.
    fn supports(&self, op: Op, dtype: DType) -> bool;

    /// Allocates an uninitialised buffer for a tensor of `dtype` and `shape` (possibly empty).
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<Self::Buffer>;

    /// Allocates a buffer and copies `host` (exactly `shape.product() * dtype.size()` bytes,
    /// little-endian) into it. Knowing the shape lets a backend split a large `[E, N, K]` weight
    /// over several native buffers on expert boundaries.
    fn upload(&self, dtype: DType, shape: &[usize], host: &[u8]) -> Result<Self::Buffer>;

    /// The size of `buf` in bytes, where the backend keeps it (the default: `None`, unknown).
    /// [`crate::ops`] checks every tensor's buffer against its dtype and shape with it (they
    /// must agree exactly): the fields of [`Tensor`] are public, and a shape larger than its
    /// buffer would otherwise send a kernel past the end of the allocation. Return the size the
    /// buffer was made for.
    fn buffer_bytes(&self, buf: &Self::Buffer) -> Option<usize> {
        let _ = buf;
        None
    }

    /// Waits for all enqueued work, then copies the whole buffer into `host` (exactly its size).
    fn download(&self, buf: &Self::Buffer, host: &mut [u8]) -> Result<()>;

    /// Waits for all enqueued work and reports any error it raised.
    fn synchronize(&self) -> Result<()>;

    /// Enqueues a device-to-device copy of all of `src` into `dst` (same size). `moe bench`
    /// times it to measure the copy bandwidth that the roofline floor is computed from, in the
    /// same run as the layer. The default answers [`crate::Error::Unsupported`]; the bench then
    /// needs the bandwidth as a flag.
    fn copy(&self, src: &Self::Buffer, dst: &mut Self::Buffer) -> Result<()> {
        let _ = (src, dst);
        Err(crate::Error::Unsupported(format!("{} has no device copy", self.info().name)))
    }

    /// Routing: `logits [T, E]` f32 → `topk_ids [T, k]` u32 (best first) and `topk_weights [T, k]`
    /// f32, exactly as [`Routing`] specifies. `bias [E]` f32 is `e_score_correction_bias` (only with
    /// [`Routing::SigmoidGrouped`]; absent means zero).
    fn router_topk(
        &self,
        logits: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        routing: &Routing,
        topk_ids: &mut Tensor<Self>,
        topk_weights: &mut Tensor<Self>,
    ) -> Result<()>;

    /// The dispatch plan: `topk_ids [T, k]` u32 → `expert_offsets [E + 1]` u32, `row_index [T * k]`
    /// u32 and `token_index [T * k]` u32.
    ///
    /// Pairs are sorted by expert, stably (within one expert, by ascending pair index), so the
    /// plan is unique and every backend produces the same one:
    /// * `expert_offsets[e]` is the first row of expert `e`; `expert_offsets[E] = T * k`.
    /// * `row_index[t * k + j]` is the row that pair `(t, j)` went to (CANN's `expandedRowIdx`).
    /// * `token_index[r]` is the token whose hidden state row `r` holds (the gather index).
    ///
    /// An id `>= E` is an [`crate::Error::InvalidArgument`].
    fn permute(
        &self,
        topk_ids: &Tensor<Self>,
        expert_offsets: &mut Tensor<Self>,
        row_index: &mut Tensor<Self>,
        token_index: &mut Tensor<Self>,
    ) -> Result<()>;

    /// Grouped matrix multiply, `y [M, N]` f32 from `x [Mx, K]` f32 and weights `w`:
    ///
    /// * with `expert_offsets [G + 1]`: `w` is `[G, N, K]` and for each group `g`, each row
    ///   `r` in `expert_offsets[g]..expert_offsets[g + 1]`: `y[r] = x[src(r)] · w[g]^T`;
    /// * without: `w` is `[N, K]`, one plain GEMM over all `M` rows.
    ///
    /// `src(r)` is `token_index[r]` when a gather index `[M]` is given (rows are read straight from
    /// the unsorted hidden states), else `r`. Weights are f32, f16, bf16, or F8E4M3 with block
    /// scales in `w.scales` (each weight `E4M3[q] * scale`, see [`crate::fp8`]; a backend
    /// that does not support it answers `false` from [`Backend::supports`]); accumulation in f32.
    /// Offsets that are not cumulative or end past `M`, and a gather index `>= Mx`, are an
    /// [`crate::Error::InvalidArgument`]; rows past `expert_offsets[G]` are written as zero.
    fn grouped_gemm(
        &self,
        x: &Tensor<Self>,
        token_index: Option<&Tensor<Self>>,
        w: &Tensor<Self>,
        expert_offsets: Option<&Tensor<Self>>,
        y: &mut Tensor<Self>,
    ) -> Result<()>;

    /// The gate/up projection with SwiGLU fused into its epilogue: `h [M, I]` f32 from `x`,
    /// `w` (`[G, 2I, K]` with `expert_offsets`, else `[2I, K]`: gate rows first, then up rows)
    /// and the same `token_index` and `expert_offsets` as [`Backend::grouped_gemm`]:
    ///
    /// `h = activation(grouped_gemm(x, token_index, w, expert_offsets))`, computed without the
    /// `[M, 2I]` intermediate ever reaching memory. Rows past `expert_offsets[G]` are zero, and
    /// bad offsets or gather indices are errors exactly as in [`Backend::grouped_gemm`].
    ///
    /// Optional: the default runs the two ops through an `[M, 2I]` scratch tensor
    /// ([`crate::forward::grouped_gemm_swiglu_composed`]); a backend overrides it when its GEMM
    /// can pair each gate column with its up column in one tile (the suite checks it against the
    /// oracle like any op). [`crate::forward::composed`] calls it for every gate/up projection.
    fn grouped_gemm_swiglu(
        &self,
        x: &Tensor<Self>,
        token_index: Option<&Tensor<Self>>,
        w: &Tensor<Self>,
        expert_offsets: Option<&Tensor<Self>>,
        h: &mut Tensor<Self>,
    ) -> Result<()>
    where
        Self: Sized,
    {
        crate::forward::grouped_gemm_swiglu_composed(self, x, token_index, w, expert_offsets, h)
    }

    /// SwiGLU: `gate_up [M, 2I]` f32 → `h [M, I]` f32, `h = silu(gate) * up` where `gate` is the
    /// first `I` columns and `up` the last `I`; `silu(g) = g / (1 + exp(-g))`.
    fn activation(&self, gate_up: &Tensor<Self>, h: &mut Tensor<Self>) -> Result<()>;

    /// Combine: `out [T, H]` f32 with
    /// `out[t] = sum_{j < k} topk_weights[t, j] * y[row_index[t * k + j]]` (summed in order
    /// `j = 0, 1, ..`), plus `shared [T, H]` (the shared experts' output) when given.
    fn combine(
        &self,
        y: &Tensor<Self>,
        row_index: &Tensor<Self>,
        topk_weights: &Tensor<Self>,
        shared: Option<&Tensor<Self>>,
        out: &mut Tensor<Self>,
    ) -> Result<()>;

    /// The whole layer: `x [T, H]` f32 → `out [T, H]` f32, plus the routing it chose
    /// (`topk_ids [T, k]` u32, `topk_weights [T, k]` f32).
    ///
    /// The default composes the ops above ([`crate::forward::composed`]); a backend overrides it
    /// to fuse ops, but must compute the same thing (the suite checks both against the oracle).
    fn forward(
        &self,
        layer: &Layer<Self>,
        x: &Tensor<Self>,
        out: &mut Tensor<Self>,
        topk_ids: &mut Tensor<Self>,
        topk_weights: &mut Tensor<Self>,
    ) -> Result<()>
    where
        Self: Sized,
    {
        crate::forward::composed(self, layer, x, out, topk_ids, topk_weights)
    }
}
