//! # moe-wgpu: the WGSL backend of moe-hal
//!
//! [`WgpuBackend`] implements [`moe_hal::Backend`] with one compute shader file per op
//! (`shaders/wgsl/<op>.wgsl`, embedded with `include_str!`, so the binary carries its kernels) on
//! [wgpu](https://wgpu.rs): Vulkan, Metal, DX12 (and GL where it has compute shaders). It runs on
//! Mesa's software Vulkan driver (lavapipe) in CI and on real GPUs through the same code.
//!
//! | concept | host (`moe-cpu`) | this backend |
//! |---|---|---|
//! | a buffer | `Vec<u32>` | [`WgpuBuffer`]: one `wgpu::Buffer`, or several for a large weight |
//! | an op | a rayon loop | one or more compute dispatches recorded and submitted, never waited on |
//! | a layer (`forward`) | the ops in turn | the same dispatches recorded into one command buffer, one submit |
//! | a bad expert id | `Err` at once | a device flag, `Err` at the next `synchronize`/`download` |
//! | blocking | never | only [`moe_hal::Backend::download`] and [`moe_hal::Backend::synchronize`] |
//!
//! ## Device and limits
//!
//! [`WgpuBackend::new`] takes the highest-performance adapter (discrete, then integrated, then
//! virtual, then CPU; a native API before GL; `WGPU_BACKEND` narrows the APIs) and requests the
//! adapter's **own** limits, so a binding may be as large as the adapter allows (lavapipe: 128 MiB;
//! an H200 through Vulkan: 2 GiB per binding, 4 GiB per buffer). No subgroup size is assumed: the
//! kernels use workgroup memory for every reduction, and [`moe_hal::BackendInfo::subgroup_size`]
//! only reports what the adapter says. [`available`] is a cheap probe (no device is created) for a
//! `moe devices` listing.
//!
//! Where the adapter has `SHADER_F16`, `SUBGROUP` and wgpu's `EXPERIMENTAL_COOPERATIVE_MATRIX`
//! with a square f16 x f16 -> f32 configuration of 8 or 16, the device is opened with them and
//! grouped GEMMs on f16/bf16/f8_e4m3 weights run on tensor cores (`tiled_coop` below); `features` then
//! lists `tensor cores: ...`. (A driver may list them and still refuse a device with them:
//! the device then opens without them, `features` says `tensor cores: not used: ..` and why.) `MOE_WGPU_COOP=0` opens the device without them;
//! `MOE_WGPU_COOP_SIZE=16` (tests only; honoured on a CPU adapter only) uses 16x16 even where the
//! adapter offers 8x8, which lavapipe executes, so CI runs the size an NVIDIA GPU will;
//! [`WgpuBackend::with_tensor_cores`]`(false)` keeps the f32 FMA kernels on a device that has them.
//!
//! Kernels are compiled without wgpu's shader runtime checks (clamps on array indices, guards on
//! integer divisions, loop counters; `MOE_WGPU_CHECKED=1` or [`WgpuBackend::with_shader_checks`]
//! puts them back): every index they form is in bounds by construction, and a test checks that
//! the checks change no bit, and [`moe_hal::ops`] refuses a tensor whose shape is larger than its
//! buffer ([`moe_hal::Backend::buffer_bytes`]). A robust driver (Vulkan's robust buffer access)
//! bounds storage buffers besides; Metal has no such guard.
//!
//! Every kernel reads its parameters (64 bytes) as immediates (push constants) where the adapter
//! has `IMMEDIATES` (Vulkan does), so a dispatch creates no buffer, only its bind group; elsewhere
//! (or with `MOE_WGPU_IMMEDIATES=0`) from a small uniform buffer at binding 0, as the shader files
//! declare them (the host rewrites that one line).
//!
//! `features` names `software-adapter` for a CPU adapter (lavapipe), so a caller choosing the
//! fastest device can skip it. `memory_bytes` is host memory for a CPU adapter (lavapipe), the
//! largest device-local heap on Vulkan (read through wgpu-hal), and host memory elsewhere (wgpu has
//! no portable query: right for Apple's unified memory, an overestimate for a discrete DX12 GPU).
//!
//! ## Buffers and splitting
//!
//! Every native buffer is a multiple of 16 bytes and never empty (kernels read tensors as
//! `array<vec4<..>>`; an odd number of f16/bf16 elements still fills whole words; no binding is ever
//! zero-sized). A tensor larger than `min(max_storage_buffer_binding_size, max_buffer_size)` is
//! split over several native buffers: on expert boundaries for `[E, N, K]` weights, on row
//! boundaries when one expert is itself too large (and for `[N, K]` weights). `grouped_gemm` then
//! runs once per part, each part knowing the rows `[row0, row1)` of the `[E * N, K]` view it holds,
//! so DeepSeek-V3's 22.5 GB of bf16 experts per layer run with 128 MiB bindings. A tensor of two
//! dimensions (hidden states, logits) is split on rows when it exceeds a binding.
//!
//! `forward` takes any number of tokens: when the intermediates of all of them exceed one
//! binding (DeepSeek-V3's `[T * 8, 7168]` f32 expert outputs pass 2 GiB at 9363 tokens, lavapipe's
//! 128 MiB at 586), it runs the layer in passes of fewer tokens, copying each pass's rows in and
//! out (`forward.rs`); `x`, `out` and the routing outputs may then be split tensors themselves.
//! A layer's scratch tensors are recycled: the next `forward` reuses the buffers of the last
//! one rather than creating (and zero-filling) ten new ones (`batch.rs`;
//! [`WgpuBackend::release_scratch`] frees them). An op called on its own needs each activation
//! in one binding; handed a split one it returns [`moe_hal::Error::Unsupported`] ("run fewer
//! tokens per call"). [`WgpuBackend::with_binding_limit`] lowers the limit the backend splits
//! weights and plans passes by, to test both on small data.
//!
//! ## Errors
//!
//! * Allocation runs inside wgpu error scopes: out of memory becomes
//!   [`moe_hal::Error::OutOfMemory`], anything else [`moe_hal::Error::Driver`].
//! * An uncaptured-error handler records every other wgpu error (never a panic); a device-lost
//!   callback records the loss. The next op, `synchronize` or `download` returns it
//!   ([`moe_hal::Error::Driver`], [`moe_hal::Error::OutOfMemory`], [`moe_hal::Error::DeviceLost`]).
//! * Data-dependent errors the contract requires are found by the kernels: an expert id `>= E`
//!   (permute), offsets that do not start at 0, decrease, or end past `M`, a `token_index >= Mx`
//!   (grouped_gemm), a `row_index` past the rows of `y` (combine). Kernels clamp or skip so nothing
//!   is ever accessed out of bounds, and set flags (`atomicOr`/`atomicMax`) in a 64-byte device
//!   error buffer. `synchronize` and `download` read it back (they block anyway) and clear it, and
//!   return [`moe_hal::Error::InvalidArgument`] with a sentence such as
//!   "topk_ids holds an expert id >= 16 (largest: 99); ...".
//!
//! ## Kernels, and which runs for which shape
//!
//! No op reads device data on the host: every dispatch size comes from shapes (worst cases), and
//! ops only record and submit. So the composed `forward` ([`moe_hal::forward::composed`]) runs a
//! whole layer without a host round trip. Inside `forward` the ops record into one command buffer
//! that is submitted once at the end (about ten submits become one; `batch.rs` says why order is
//! kept); [`WgpuBackend::with_layer_batching`] or `MOE_WGPU_BATCH=0` turns that off, to measure
//! it. Ops called on their own submit as they go.
//!
//! | op | kernel(s) | shape |
//! |---|---|---|
//! | `router_topk` | one workgroup (64) per token; keys in a scratch buffer, so any `E` (384 and beyond) | all |
//! | `permute` | `rank` (tile of 256 pairs: stable in-tile rank + per-tile counts), `scan_counts` (one workgroup), `scatter` | all |
//! | `grouped_gemm` | `prep`: validates offsets and gather indices, zeros rows past `expert_offsets[G]` | with offsets or a gather index |
//! | | `gemv`: a workgroup streams 16 weight rows of one expert once (vec4 loads), up to 8 token rows per pass (an expert of 5 to 8 rows, common at `T` = 128, reads its weights once; absent rows cost no FMAs, and one row has a loop of its own); one grid slot per expert, or per row of `y` when `M < G` so idle experts launch nothing | `M <= 4 G` (decode; `G = 1` without offsets) |
//! | | `tiled`: 64x64 output tile, 16-deep K slices of x and w in workgroup memory, 4x4 outputs per invocation, groups found by binary search in `expert_offsets` | `M > 4 G` (prefill), f32 weights or no tensor cores |
//! | | `tiled_coop` (`grouped_gemm_coop.wgsl`): the same tiles and group search, K slices of 32 staged as f16 (x rounded, clamped to ±65504, NaN kept; weights f16, bf16 and scaled f8_e4m3 converted), products on `CS`x`CS` cooperative matrices with f32 accumulators, 128 invocations dealing the coop tiles to their subgroups; dense GEMMs (router, shared expert) stage x as hi + lo f16 parts and multiply both, so their outputs stay f32-accurate | `M > 4 G`, f16/bf16/f8_e4m3 weights, tensor cores |
//! | `grouped_gemm_swiglu` | `prep`, `gemv`, `tiled`/`tiled_coop` with `swiglu = 1`: tile columns walk the `2I` weight rows interleaved (column `2j` = gate row `j`, `2j + 1` = up row `I + j`), so an invocation holds each gate accumulator beside its up partner and writes only `silu(gate) * up` | every weight part holds whole experts (else `grouped_gemm` + `activation`) |
//! | `activation` | grid-stride SwiGLU (vec4 when `I % 4 == 0`) | all |
//! | `combine` | grid-stride weighted sum in slot order (vec4 when `H % 4 == 0`) | all |
//!
//! Weights are read from u32 words in the shader: f16 with `unpack2x16float` (core WGSL, no
//! `SHADER_F16` needed; f16 subnormals decode exactly on lavapipe, which the tests check), bf16 as
//! the high half of an f32; F8E4M3 bytes (four per word) moved into the bits of two f16 pairs
//! (E4M3 under f16's exponent bias, so 2^-8 of the value, exact, subnormals included) and widened
//! with `unpack2x16float`: about 4 operations per byte where integer arithmetic took ~19, which a
//! GPU's integer lanes could not sustain at decode bandwidth. A word with a NaN byte takes the
//! integer decode instead. The 2^8 goes on each finished sum (`gemv`) or value (`tiled`), and
//! each block's f32 scale is read from one more binding
//! (the block size is a shader constant, so DeepSeek's 128x128 index is two shifts). Every product
//! accumulates in f32; `tiled_coop` converts the scaled F8E4M3 weights to f16 like bf16 ones. The
//! vector paths need `K % 4 == 0` (tiled) or `K % 8 == 0` (gemv), which every real model has
//! (F8E4M3 also a block width that is a multiple of 4); other `K` take element loads with bounds
//! checks.
//!
//! ## Measured and not measured
//!
//! Correctness is tested here on lavapipe (Vulkan on the CPU) against `moe-cpu`, for every op,
//! dtype and awkward shape, and for whole layers, including weights split over several bindings:
//! on Debian 12's Mesa 22 (no cooperative matrices: the f32 FMA kernels) and, through
//! `scripts/lavapipe-coop.sh`, on Mesa 26 (8x8x8 cooperative matrices: `tiled_coop`, with the
//! `wgpu_scalar` instance covering the FMA kernels of the same device). Both run in CI.
//! **No speed has been measured on a real GPU**, and the 16x16x16 configuration an NVIDIA GPU
//! offers has not run anywhere yet. Subgroup reductions in `gemv` and tile sizes tuned per device
//! are future work.

#![warn(missing_docs)]

mod batch;
mod buffer;
mod device;
mod forward;
mod kernels;
mod memory;
mod ops;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

pub use buffer::WgpuBuffer;
use buffer::padded;
use moe_hal::{Backend, BackendInfo, DType, Error, Op, Result, Routing, Tensor};

/// Probes for an adapter without creating a device: `Ok(description)` (e.g.
/// `"llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan)"`) or `Err(why not)`, for a device listing.
pub fn available() -> std::result::Result<String, String> {
    let probe = || {
        let (_, adapter) = device::best_adapter()?;
        device::check_limits(&device::describe(&adapter.get_info()), &adapter.limits())?;
        Ok(device::describe(&adapter.get_info()))
    };
    moe_hal::catch_panic(probe).unwrap_or_else(|p| Err(format!("the wgpu driver panicked while listing adapters: {p}")))
}

/// An on/off environment switch: `0` is off and `1` on; unset (or anything else) is `default`.
fn env_switch(name: &str, default: bool) -> bool {
    match std::env::var(name).as_deref().map(str::trim) {
        Ok("0") => false,
        Ok("1") => true,
        _ => default,
    }
}

/// How `features` names kernels compiled with wgpu's shader runtime checks.
const SHADER_CHECKS: &str = "shader runtime checks";

/// The WGSL backend: one wgpu device and queue, its kernels, and its error state. See the crate
/// docs for buffers, errors and the kernel chosen per shape.
pub struct WgpuBackend {
    info: BackendInfo,
    device: wgpu::Device,
    queue: wgpu::Queue,
    limits: wgpu::Limits,
    /// Largest native buffer this backend creates (a multiple of 16).
    chunk: u64,
    /// Largest part of a tensor of 3 or more dimensions (expert weights), at most `chunk`.
    expert_chunk: u64,
    /// Largest intermediate tensor one pass of `forward` allocates, at most `chunk`.
    pass_limit: u64,
    pipelines: kernels::Pipelines,
    faults: Arc<device::Faults>,
    /// The device error flags ([`device::ERR_WORDS`] u32).
    errs: wgpu::Buffer,
    /// Bound where an optional input is absent.
    dummy: wgpu::Buffer,
    /// Serialises reading and clearing the error flags.
    flag_lock: Mutex<()>,
    /// The command buffer a `forward` records its ops into, and its recycled scratch.
    batches: Arc<batch::Batches>,
    /// Native buffers created so far ([`WgpuBackend::buffers_created`]).
    created: std::sync::atomic::AtomicU64,
    /// The cooperative-matrix size `grouped_gemm`'s tensor-core kernel uses (`None`: not used).
    coop: Option<u32>,
    /// Whether `forward` records into one command buffer (see `batch.rs`); `MOE_WGPU_BATCH=0`
    /// turns it off, to measure the difference.
    batch_layers: bool,
}

impl WgpuBackend {
    /// Opens the highest-performance adapter (see the crate docs) with its own limits.
    ///
    /// No adapter is [`Error::Unavailable`] with a sentence; a device that cannot be created is
    /// [`Error::Driver`]; a panic inside wgpu or the driver while opening it is caught and
    /// reported as [`Error::Unavailable`]. Where the device fails to open (or panics) with
    /// cooperative matrices, it is opened again without them, and `features` says why.
    pub fn new() -> Result<WgpuBackend> {
        Self::open_catching(true)
    }

    /// [`WgpuBackend::new`], but kernel parameters always go in a uniform buffer per dispatch, as
    /// on an adapter without `IMMEDIATES` (the same as `MOE_WGPU_IMMEDIATES=0`): so that path is
    /// tested, and can be compared, on adapters that have them.
    pub fn new_without_immediates() -> Result<WgpuBackend> {
        Self::open_catching(false)
    }

    fn open_catching(allow_immediates: bool) -> Result<WgpuBackend> {
        let tried_coop = std::cell::Cell::new(false);
        let attempt = |allow_coop: bool| {
            moe_hal::catch_panic(|| Self::open(allow_immediates, allow_coop, &tried_coop))
                .unwrap_or_else(|p| Err(Error::Unavailable(format!("the wgpu driver panicked while opening the adapter: {p}"))))
        };
        match attempt(true) {
            // Cooperative matrices are experimental in wgpu: an adapter that lists them can still
            // refuse, or panic on, a device opened with them (Mesa 26's lavapipe does at 128-bit
            // vectors). The device then opens without them, on the FMA kernels, and says why.
            Err(first) if tried_coop.get() => {
                let mut backend = attempt(false)?;
                backend.info.features.push(format!("tensor cores: not used: the device did not open with cooperative matrices ({first})"));
                Ok(backend)
            }
            r => r,
        }
    }

    /// Opens the device; with `allow_coop`, with cooperative matrices where the adapter has them
    /// (setting `tried_coop` when it asks for them).
    fn open(allow_immediates: bool, allow_coop: bool, tried_coop: &std::cell::Cell<bool>) -> Result<WgpuBackend> {
        let (_instance, adapter) = device::best_adapter().map_err(Error::Unavailable)?;
        let limits = adapter.limits();
        device::check_limits(&device::describe(&adapter.get_info()), &limits).map_err(Error::Unavailable)?;
        // Tensor cores where the adapter has cooperative matrices, unless MOE_WGPU_COOP=0.
        let coop = device::coop_size(&adapter).filter(|_| allow_coop && env_switch("MOE_WGPU_COOP", true));
        // Tests only: run another size than the adapter offers (lavapipe lowers any size, so CI
        // runs NVIDIA's 16x16 code path there). Honoured on a CPU adapter only: a GPU offers the
        // sizes it has, and 8x8 tiles with 32-wide subgroups would leave most of a tile unwritten.
        let software = adapter.get_info().device_type == wgpu::DeviceType::Cpu;
        let coop = match std::env::var("MOE_WGPU_COOP_SIZE").ok().and_then(|v| v.trim().parse::<u32>().ok()) {
            Some(s @ (8 | 16)) if software => coop.map(|_| s),
            _ => coop,
        };
        tried_coop.set(coop.is_some());
        let (mut required_features, experimental_features) = match coop {
            // SAFETY: wgpu's token for its experimental features ("there may be UB-containing bugs
            // in these APIs"). The one kernel using them, `tiled_coop`, passes the conformance
            // suite on every adapter it has met (see the crate docs); MOE_WGPU_COOP=0 avoids it.
            Some(_) => (device::COOP_FEATURES, unsafe { wgpu::ExperimentalFeatures::enabled() }),
            None => (wgpu::Features::empty(), wgpu::ExperimentalFeatures::disabled()),
        };
        // Kernel parameters as immediates (push constants) where the adapter has them: no buffer
        // is created per dispatch. MOE_WGPU_IMMEDIATES=0 keeps the uniform buffers.
        let immediates = allow_immediates
            && adapter.features().contains(wgpu::Features::IMMEDIATES)
            && limits.max_immediate_size >= kernels::PARAMS_BYTES
            && env_switch("MOE_WGPU_IMMEDIATES", true);
        if immediates {
            required_features |= wgpu::Features::IMMEDIATES;
        }
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("moe-wgpu"),
            required_features,
            required_limits: limits.clone(),
            experimental_features,
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        }))
        .map_err(|e| Error::Driver(format!("cannot open {}: {e}", device::describe(&adapter.get_info()))))?;
        let faults = Arc::new(device::Faults::default());
        faults.install(&device);
        let mut info = device::backend_info(&adapter, &limits);
        if let Some(s) = coop {
            info.features.push(format!("tensor cores: grouped_gemm on {s}x{s}x{s} f16->f32 cooperative matrices"));
        }
        if immediates {
            info.features.push("immediates: kernel parameters without a buffer per dispatch".into());
        }
        let checked = env_switch("MOE_WGPU_CHECKED", false);
        if checked {
            info.features.push(SHADER_CHECKS.into());
        }
        let gemv_rows = moe_hal::gemv::pass_rows();
        info.features.extend(moe_hal::gemv::feature());
        let chunk = limits.max_storage_buffer_binding_size.min(limits.max_buffer_size).min(u32::MAX as u64) / 16 * 16;
        let usage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
        let errs = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("moe-wgpu error flags"),
            size: (device::ERR_WORDS * 4) as u64,
            usage,
            mapped_at_creation: false,
        });
        let dummy =
            device.create_buffer(&wgpu::BufferDescriptor { label: Some("moe-wgpu dummy"), size: 16, usage, mapped_at_creation: false });
        let backend = WgpuBackend {
            info,
            device,
            queue,
            limits,
            chunk,
            expert_chunk: chunk,
            pass_limit: chunk,
            coop,
            pipelines: kernels::Pipelines::new(immediates, checked, gemv_rows),
            faults,
            errs,
            dummy,
            flag_lock: Mutex::new(()),
            batches: Default::default(),
            created: Default::default(),
            batch_layers: env_switch("MOE_WGPU_BATCH", true),
        };
        backend.faults.take()?;
        Ok(backend)
    }

    /// Behaves, wherever the backend itself divides work to fit bindings, as if one binding held
    /// at most `bytes` (rounded down to a multiple of 16, at least 16, never above the adapter's
    /// own limit): each native buffer of an `[E, N, K]` expert weight (any tensor of 3 or more
    /// dimensions) created from now on is at most that large, and `forward` runs in passes of
    /// as many tokens as have intermediates that fit. So tests exercise both on small data.
    /// Other tensors, and ops called on their own, keep the adapter's limit.
    pub fn with_binding_limit(mut self, bytes: u64) -> Self {
        self.expert_chunk = (bytes / 16 * 16).clamp(16, self.chunk);
        self.pass_limit = self.expert_chunk;
        self
    }

    /// The square size of the cooperative matrices `grouped_gemm` runs on (16 on NVIDIA through
    /// Vulkan, 8 on Mesa 25.1+ lavapipe), or `None` when it uses no tensor cores: the adapter has
    /// none, `MOE_WGPU_COOP=0` was set, or [`Self::with_tensor_cores`] turned them off.
    pub fn tensor_cores(&self) -> Option<u32> {
        self.coop
    }

    /// With `false`, `grouped_gemm` uses the f32 FMA kernels even where the adapter has
    /// cooperative matrices (the device keeps the features; nothing else changes). Results then
    /// carry f32 products exactly like an adapter without them, which tests of the scalar path
    /// rely on; `true` cannot add tensor cores a device was opened without.
    pub fn with_tensor_cores(mut self, on: bool) -> Self {
        if !on {
            self.coop = None;
            self.info.features.retain(|f| !f.starts_with("tensor cores"));
        }
        self
    }

    /// Whether [`Backend::forward`] records the whole layer into one command buffer and submits
    /// it once, recycling its scratch buffers (the default), or submits each op as it comes and
    /// allocates afresh (as every op outside `forward` does). Both compute the same thing; the
    /// environment variable `MOE_WGPU_BATCH=0` sets `false` for a whole run, so `moe bench` can
    /// measure the difference.
    pub fn with_layer_batching(mut self, on: bool) -> Self {
        self.batch_layers = on;
        self
    }

    /// With `true`, compiles the kernels with wgpu's shader runtime checks, as wgpu does for
    /// shaders it does not trust (the same as `MOE_WGPU_CHECKED=1`): every workgroup- and
    /// private-array index clamped, every integer division guarded, every loop given a counter.
    /// Off by default: these kernels form only in-bounds indices (data-dependent ones are clamped
    /// in the WGSL itself), bound every loop and never divide by zero, and the checks cost
    /// instructions in their inner loops (on lavapipe, 14% of a decode layer). Storage buffer
    /// accesses are bounds-checked by the driver either way where it is robust (Vulkan). Call it
    /// before the first op (kernels compile on first use).
    pub fn with_shader_checks(mut self, on: bool) -> Self {
        self.pipelines = kernels::Pipelines::new(self.pipelines.immediates(), on, self.pipelines.gemv_rows());
        self.info.features.retain(|f| f != SHADER_CHECKS);
        if on {
            self.info.features.push(SHADER_CHECKS.into());
        }
        self
    }

    /// Frees the scratch buffers kept from the last `forward` for the next one to reuse (at
    /// most one layer's intermediates: after a long prefill, that can be gigabytes; see
    /// `batch.rs`). The next `forward` then allocates afresh.
    pub fn release_scratch(&self) {
        self.batches.release_free();
    }

    /// How many native buffers this backend has created (tensors and scratch, not read-back
    /// staging): a diagnostic, which shows that a repeated `forward` recycles its scratch.
    pub fn buffers_created(&self) -> u64 {
        self.created.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The limits the device was opened with (the adapter's own).
    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Largest workgroup count per dispatch dimension.
    pub(crate) fn max_dim(&self) -> u32 {
        self.limits.max_compute_workgroups_per_dimension
    }
}

impl Backend for WgpuBackend {
    type Buffer = WgpuBuffer;

    fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// Every op runs natively for f32, f16, bf16 and F8E4M3 (block-scaled) weights.
    fn supports(&self, _op: Op, dtype: DType) -> bool {
        dtype.is_weight()
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<WgpuBuffer> {
        self.make_buffer(dtype, shape, None)
    }

    fn buffer_bytes(&self, buf: &WgpuBuffer) -> Option<usize> {
        Some(buf.bytes)
    }

    fn upload(&self, dtype: DType, shape: &[usize], host: &[u8]) -> Result<WgpuBuffer> {
        let want = dtype.tensor_bytes(shape)?;
        if host.len() != want {
            return moe_hal::invalid!("a {dtype} tensor of shape {shape:?} needs {want} bytes, got {}", host.len());
        }
        self.make_buffer(dtype, shape, Some(host))
    }

    fn download(&self, buf: &WgpuBuffer, host: &mut [u8]) -> Result<()> {
        if host.len() != buf.bytes {
            return moe_hal::invalid!("download into {} bytes from a buffer of {} bytes", host.len(), buf.bytes);
        }
        self.check_flags()?;
        for part in &buf.parts {
            if part.bytes == 0 {
                continue;
            }
            let size = padded(part.bytes as u64);
            let staging = self.staging(size)?;
            let mut enc = self.device.create_command_encoder(&Default::default());
            enc.copy_buffer_to_buffer(&part.buf, 0, &staging, 0, size);
            self.read_back(enc, &staging, &mut host[part.start..part.start + part.bytes])?;
        }
        Ok(())
    }

    fn synchronize(&self) -> Result<()> {
        self.check_flags()
    }

    /// One `copy_buffer_to_buffer` per native part (both buffers have the same layout when they
    /// have the same size).
    fn copy(&self, src: &WgpuBuffer, dst: &mut WgpuBuffer) -> Result<()> {
        let same = src.bytes == dst.bytes
            && src.parts.len() == dst.parts.len()
            && src.parts.iter().zip(&dst.parts).all(|(a, b)| a.start == b.start && a.bytes == b.bytes);
        if !same {
            return moe_hal::invalid!("copy needs buffers of the same size and layout ({} and {} bytes)", src.bytes, dst.bytes);
        }
        self.faults.take()?;
        self.batches.flush(&self.device, &self.queue);
        let mut enc = self.device.create_command_encoder(&Default::default());
        for (a, b) in src.parts.iter().zip(&dst.parts) {
            enc.copy_buffer_to_buffer(&a.buf, 0, &b.buf, 0, padded(a.bytes as u64));
        }
        self.queue.submit([enc.finish()]);
        self.faults.take()
    }

    fn router_topk(
        &self,
        logits: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        routing: &Routing,
        topk_ids: &mut Tensor<Self>,
        topk_weights: &mut Tensor<Self>,
    ) -> Result<()> {
        self.op_router_topk(logits, bias, routing, topk_ids, topk_weights)
    }

    fn permute(
        &self,
        topk_ids: &Tensor<Self>,
        expert_offsets: &mut Tensor<Self>,
        row_index: &mut Tensor<Self>,
        token_index: &mut Tensor<Self>,
    ) -> Result<()> {
        self.op_permute(topk_ids, expert_offsets, row_index, token_index)
    }

    fn grouped_gemm(
        &self,
        x: &Tensor<Self>,
        token_index: Option<&Tensor<Self>>,
        w: &Tensor<Self>,
        expert_offsets: Option<&Tensor<Self>>,
        y: &mut Tensor<Self>,
    ) -> Result<()> {
        self.op_grouped_gemm(x, token_index, w, expert_offsets, y, false)
    }

    /// Fused: the grouped_gemm kernels with the SwiGLU epilogue, unless a weight part splits an
    /// expert (one expert larger than a binding), which takes the composed default.
    fn grouped_gemm_swiglu(
        &self,
        x: &Tensor<Self>,
        token_index: Option<&Tensor<Self>>,
        w: &Tensor<Self>,
        expert_offsets: Option<&Tensor<Self>>,
        h: &mut Tensor<Self>,
    ) -> Result<()> {
        if self.can_fuse_swiglu(w) {
            self.op_grouped_gemm(x, token_index, w, expert_offsets, h, true)
        } else {
            moe_hal::forward::grouped_gemm_swiglu_composed(self, x, token_index, w, expert_offsets, h)
        }
    }

    /// The composed layer ([`moe_hal::forward::composed`]) recorded into one command buffer and
    /// submitted once (see `batch.rs`): about ten ops, one submit; in passes of fewer tokens when
    /// the intermediates of all of them exceed one binding (see `forward.rs`).
    fn forward(
        &self,
        layer: &moe_hal::Layer<Self>,
        x: &Tensor<Self>,
        out: &mut Tensor<Self>,
        topk_ids: &mut Tensor<Self>,
        topk_weights: &mut Tensor<Self>,
    ) -> Result<()> {
        self.op_forward(layer, x, out, topk_ids, topk_weights)
    }

    fn activation(&self, gate_up: &Tensor<Self>, h: &mut Tensor<Self>) -> Result<()> {
        self.op_activation(gate_up, h)
    }

    fn combine(
        &self,
        y: &Tensor<Self>,
        row_index: &Tensor<Self>,
        topk_weights: &Tensor<Self>,
        shared: Option<&Tensor<Self>>,
        out: &mut Tensor<Self>,
    ) -> Result<()> {
        self.op_combine(y, row_index, topk_weights, shared, out)
    }
}
