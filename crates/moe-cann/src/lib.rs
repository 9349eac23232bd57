//! # moe-cann: the Ascend (CANN) slot
//!
//! A place in moe-hal for Huawei Ascend NPUs, driven through CANN (the AscendCL runtime and the
//! `aclnn` operator library). No Ascend toolkit or hardware existed where this crate was written,
//! so it is a **slot**: it compiles on every machine, links nothing by default, is never chosen
//! by `--backend auto`, and [`CannBackend::new`] returns [`Error::Unavailable`] with a sentence
//! that says so (`moe run --backend cann` prints it; `moe devices` lists it). What it does carry
//! is the port's map: every [`Backend`] method below names the CANN operator that implements it,
//! how moe-hal's arguments become that operator's arguments, and what the operator does not
//! cover. Each method, if reached, returns an error naming its operator; none panics.
//!
//! | moe-hal | CANN |
//! |---|---|
//! | [`Backend::alloc`] / [`Backend::upload`] / [`Backend::download`] | `aclrtMalloc` / `aclrtMemcpy(.., ACL_MEMCPY_HOST_TO_DEVICE)` / `aclrtSynchronizeStream` + `aclrtMemcpy(.., ACL_MEMCPY_DEVICE_TO_HOST)`; `aclrtFree` on drop |
//! | [`Backend::synchronize`], "ops run in call order" | one `aclrtStream` (`aclrtCreateStream`) per backend, `aclrtSynchronizeStream` |
//! | a [`Tensor`] (buffer + dtype + shape) | an `aclTensor` descriptor over the device pointer (`aclCreateTensor`), made per call |
//! | [`Backend::router_topk`] | `aclnnMoeGatingTopKSoftmax` / `aclnnMoeGatingTopKSoftmaxV2` (softmax), `aclnnMoeGatingTopK` (sigmoid, bias, groups) |
//! | [`Backend::permute`] | `aclnnMoeInitRoutingV2`: `expandedRowIdxOut` = `row_index`, `expertTokensCountOrCumsumOut` = `expert_offsets[1..]` |
//! | [`Backend::grouped_gemm`] | `aclnnGroupedMatmulV4` with `expert_offsets[1..]` (int64) as its cumulative `groupListOptional` (`groupListType = 0`); `aclnnMatmul` without offsets |
//! | [`Backend::activation`] | `aclnnSwiGlu` (`dim = -1`) |
//! | [`Backend::combine`] | `aclnnMoeFinalizeRoutingV2` (`dropPadMode = 2`; shared expert as `x1Optional`, which it adds before the routed terms where moe-hal adds it after: the last bit may differ), or `aclnnMoeFinalizeRouting` |
//! | custom kernels (`shaders/wgsl`, `shaders/cuda`) | Ascend C kernels in `shaders/cann/<op>.cpp` (none yet; see `shaders/cann/README.md`) |
//!
//! ## Building against a toolkit
//!
//! The cargo feature `ascend` asks for the real thing. `build.rs` then looks at
//! `ASCEND_TOOLKIT_HOME` (set by the toolkit's `set_env.sh`, usually
//! `/usr/local/Ascend/ascend-toolkit/latest`):
//!
//! * when `$ASCEND_TOOLKIT_HOME/lib64/libascendcl.so` exists, it emits
//!   `cargo:rustc-link-search=native=$ASCEND_TOOLKIT_HOME/lib64`, links `ascendcl` and, where
//!   present, `nnopbase` and `opapi` (the libraries ggml's CANN backend links) and
//!   `opapi_transformer` (where releases after 8.x put the MoE operators), and sets
//!   `--cfg moe_cann_toolkit`, which compiles the `sys` module (`src/sys.rs`: raw `extern "C"`
//!   declarations of the runtime and of the operators above). The binary then needs the same
//!   directory on `LD_LIBRARY_PATH` at run time (`set_env.sh` does it);
//! * otherwise it prints a `cargo:warning` naming what is missing and the crate stays the stub.
//!
//! ```text
//! source /usr/local/Ascend/ascend-toolkit/set_env.sh
//! cargo build --release -p moe-cli --features moe-cann/ascend
//! ```
//!
//! With the toolkit linked, [`CannBackend::new`] initialises AscendCL (`aclInit`), counts devices
//! (`aclrtGetDeviceCount`) and still returns [`Error::Unavailable`], now saying how many NPUs it
//! found and that the ops are not ported: a backend whose every op fails is not handed out. The
//! toolkit path is **unverified**: it was compiled, linked and run here only against a stand-in
//! `libascendcl.so` (three stub functions built for the purpose), never against a real toolkit.
//!
//! ## Conventions every op follows on Ascend
//!
//! * **Two-phase operators.** Each `aclnnXxx` is called as
//!   `aclnnXxxGetWorkspaceSize(args.., &workspaceSize, &executor)` (checks shapes and dtypes, plans
//!   the kernel, returns the scratch size) and then `aclnnXxx(workspace, workspaceSize, executor,
//!   stream)` (enqueues it). Keep one growing device workspace per backend: kernels on one stream
//!   run in order, so the next op may reuse it without a sync (ggml's CANN backend relies on the
//!   same ordering with its pool).
//! * **Memory.** `aclrtMalloc(&ptr, bytes, ACL_MEM_MALLOC_HUGE_FIRST)`, `aclrtFree(ptr)`;
//!   `aclrtMemcpy(dst, destMax, src, count, kind)` is synchronous; `download` must first
//!   `aclrtSynchronizeStream` so the copy sees every enqueued op. Device memory for
//!   [`moe_hal::BackendInfo::memory_bytes`] comes from `aclrtGetMemInfo(ACL_HBM_MEM, &free, &total)`.
//!   An allocation failure maps to [`Error::OutOfMemory`]; other status codes to
//!   [`Error::Driver`] with `aclGetRecentErrMsg()`'s text.
//! * **Threads.** AscendCL binds a device/context to the calling thread (`aclrtSetDevice`, or
//!   `aclrtSetCurrentContext` with a context kept in the backend); [`Backend`] is `Send + Sync`,
//!   so every entry point must bind it first.
//! * **Indices.** CANN's expert ids and row indices are `INT32`; moe-hal's are `u32` below 2^31
//!   (ids are `< E`, rows `< T * k`), so the same buffers are passed as `ACL_INT32` tensors
//!   without a copy. `groupList` is `INT64`: one `aclnnCast` of `expert_offsets[1..]`.
//! * **Views, not copies.** `aclCreateTensor` takes strides and an element offset, so
//!   `expert_offsets[1..]` is a view at offset 1 and an `[N, K]` weight is passed to an operator
//!   that wants `[K, N]` as the transposed view (strides `[1, K]`), as ggml does for `mul_mat_id`.
//! * **Dtypes.** Every operator here accepts FLOAT32, FLOAT16 and BFLOAT16 on Atlas A2/A3
//!   (910B/910C) for its float arguments. The catch is grouped matmul: its non-quantised path
//!   wants `x` and `weight` of one dtype (f16·f16 → f16, bf16·bf16 → bf16, f32·f32 → f32, f32
//!   only with single tensors), while moe-hal's activations are f32. For f16/bf16 weights either
//!   cast the activations to the weight dtype (`aclnnCast`; rounds `x` to 8 or 11 bits, inside
//!   the suite's bf16 tolerance of 1e-2 but not its f32 one) and the output back to f32, or keep
//!   an f32 copy of the weights (ggml casts f16 experts to f32 per call; twice the bytes).
//! * **Weight layouts.** moe-hal stores `[E, N, K]` row-major (ND). The cube unit prefers
//!   FRACTAL_NZ (`ACL_FORMAT_FRACTAL_NZ`, 16-row tiles of 32 bytes, 16x16 for f16/bf16);
//!   `aclnnTransMatmulWeight` rewrites an ND weight to NZ in place once at upload, into a buffer
//!   sized by `aclnnCalculateMatmulWeightSizeV2`. `aclnnGroupedMatmulV4` takes ND or NZ f16/bf16
//!   weights on A2/A3 (f32 weights ND only: `aclnnTransMatmulWeight` converts f16, bf16 and int8
//!   only), only ND on Ascend 950, and only NZ on the Atlas inference series (310P, f16 only).
//!   `aclnnTransMatmulWeight` accepts a 3-D `[E, N, K]` grouped f16/bf16 weight on 910B/910_93
//!   ("Only support matmul operations with dimSize is 2 or 3"), 2-D only on other chips.
//! * **`aclnnMatmul`** (dense GEMMs without offsets) takes `cubeMathType` with no default: pass 0
//!   (`KEEP_DTYPE`); 1 (`ALLOW_FP32_DOWN_PRECISION`) turns f32 into HF32 on A2/A3, outside the
//!   suite's f32 tolerance.
//! * **Custom kernels.** Whatever the operator library does not cover (exact tie and NaN rules of
//!   the router, `token_index`, a fused layer) is written in Ascend C under `shaders/cann/`, one
//!   file per op with the trait method's name, as for WGSL and CUDA.
//!
//! ## f8_e4m3 weights (DeepSeek's FP8) on Ascend
//!
//! moe-hal's FP8 is block-scaled: each weight is `E4M3[q] * scale[n / 128, k / 128]`, f32
//! activations, f32 accumulation (the suite holds it to bf16's tolerance). What
//! `aclnnGroupedMatmulV4`'s page (ops-transformer, `gmm/grouped_matmul`) offers:
//!
//! * **Atlas A2 / A3 (910B, 910C):** no FP8 input at all (weights f16, bf16, f32, int8, int4).
//!   The port answers `supports(_, F8E4M3) = false`; `moe run` then refuses the stored FP8 layer
//!   and `--dtype bf16` dequantizes it on load (twice the memory, bf16 speed). Re-quantizing to
//!   the operator's int8 weight-only mode (per-channel or per-group `antiquantScale`) would
//!   change the numbers, not carry DeepSeek's.
//! * **Ascend 950 (910_95):** FLOAT8_E4M3FN weights, two ways, neither exactly moe-hal's:
//!   - "伪量化" (weight-only, activations f16/bf16): **per-channel scales only**, one per output
//!     column, so 128 x 128 block scales do not map;
//!   - dynamic quantization mode **G-B** (per-group activations x per-block weights):
//!     `y[m, n] = sum_j (sum_k x * w) * per_token_scale[m / gsM, j] * scale[j, n / gsN]`, which
//!     is DeepSeek's own inference recipe, but the activations are quantized to E4M3 too (about
//!     2^-4 relative each): far outside the suite's bar, so at most an opt-in fast mode
//!     documented as such, never the default.
//!
//! So the conformant FP8 path on Ascend is a kernel of our own, `shaders/cann/grouped_gemm.cpp`
//! in Ascend C, doing what the CUDA `mma_*` kernels do: dequantize each 128 x 128 block into
//! bf16 on its way to the cube unit, accumulate in f32. Until it exists, answer `false`.
//! `aclnnGroupedMatmulV5` (CANN 8.5+, V1-V4's successor) does not change this: it only adds
//! `tuningConfigOptional`; its FP8 weight-only mode on Ascend 950 is per-channel too (per-group
//! only for int4). The fused `aclnnGroupedMatmulSwigluQuant` is quantized-only (A8W8; MXFP8/MXFP4
//! on 950).
//!
//! ## Porting route
//!
//! Follow `PORTING.md`: memory and capability methods first; every op through
//! [`moe_hal::fallback`]; the conformance suite
//! (`moe_conformance::suite!(cann, moe_cann::CannBackend::new());`); then replace ops one at a
//! time with the operators named here; profile with `moe bench`.
//!
//! ## Sources, and what is unconfirmed
//!
//! The mapping was read from Ascend's public operator pages (the `ops-transformer` docs of
//! `aclnnMoeGatingTopKSoftmax`, `..V2`, `aclnnMoeGatingTopK`, `aclnnMoeInitRouting`, `..V2`,
//! `aclnnGroupedMatmulV4`, `..V5` (their 910_95 FP8 modes included), `aclnnMoeFinalizeRouting`,
//! `..V2`, `aclnnSwiGlu`; ops-nn's `aclnnMatmul` and `aclnnTransMatmulWeight`), the operators'
//! kernels and test references in `hicann/ops-transformer` and `ops-nn`, the CANN 8.x headers
//! (`acl_rt.h`, `acl_meta.h`), Ascend's `op-plugin` and ggml's `ggml-cann` (`aclnn_ops.cpp`,
//! `CMakeLists.txt`). Nothing was run on an NPU. What the sources settle (2026-11-29):
//!
//! * `aclnnMoeGatingTopK` (parameters `x, biasOptional, k, kGroup, groupCount, groupSelectMode,
//!   renorm, normType, outFlag, routedScalingFactor, eps`; `groupSelectMode` 1 scores a group by
//!   its top two, `normType` 1 is sigmoid) sorts the bias-corrected `c` but **gathers the sigmoid
//!   scores `s`** as weights, as DeepSeek-V3 does (its kernel, `moe_gating_top_k_e_k_fullload.h`,
//!   gathers `xSigmoidTensor`; its test reference gathers the unbiased scores); with sigmoid the
//!   weights are always divided by `sum + eps` (`renorm` is ignored). It requires
//!   `E / groupCount > groupSelectMode`. (An older page wrote the bias into `normOut`, which read
//!   as weights by `c`.)
//! * `aclnnMoeInitRoutingV2`'s sort is stable inside one expert on A2/A3 (`moe_v2_sort_one_core.h`
//!   sorts the key `-expert` with the pair index as value through Ascend C's `Sort` and
//!   `MrgSort`, which keep input order among equal keys), as moe-hal's plan orders an expert's rows
//!   by pair index. Its `expertTokensCountOrCumsumFlag` 1 gives the cumulative counts. Ascend
//!   950's (`arch35`) path was not read.
//! * `aclnnGroupedMatmulV4`'s `groupListType` 0 is the cumulative sum, 1 the counts; one
//!   single-tensor call takes at most 1024 groups.
//! * `aclnnMoeGatingTopKSoftmax` limits k to 1024 (E to 2048 on 950, 256 on 310P; no E limit on
//!   A2/A3). Do not pass its `finishedOptional`: finished rows get id E, out of range.
//! * `aclnnSwiGlu` is `silu(first half) * second half` along `dim` (its test reference: `F.silu`),
//!   moe-hal's gate-then-up layout.
//!
//! Still unconfirmed:
//!
//! * unconfirmed: how the gating operators break ties and order NaN (moe-hal: equal scores go to
//!   the lower expert index, NaN ranks below every number). Ascend C's `Sort32` keeps the lower
//!   index first on ties, but the operator's own tests call the tie choice implementation-
//!   defined, and Ascend C's `TopK` puts NaN first, the opposite of moe-hal: expect the
//!   conformance suite's tie and NaN cases to need a router of our own (`shaders/cann/`);
//! * unconfirmed: the accumulator precision of `aclnnGroupedMatmulV4` for f16/bf16 inputs (no page
//!   says; f32 accumulation is the usual assumption);
//! * unconfirmed: what the routing operators do with an expert id `>= E` (with the count output on
//!   the pages require ids in `[0, E - 1]`, and say nothing of others).

#![warn(missing_docs)]

#[cfg(moe_cann_toolkit)]
pub mod sys;

use moe_hal::{Backend, BackendInfo, DType, Error, Layer, Op, Result, Routing, Tensor};

/// The backend's name on the command line and in reports.
pub const NAME: &str = "cann";

/// True when this build linked an Ascend toolkit (the `ascend` feature found one at build time).
pub fn toolkit_linked() -> bool {
    cfg!(moe_cann_toolkit)
}

/// The Ascend operator(s) that implement `op`, for reports and error messages.
pub fn operator(op: Op) -> &'static str {
    match op {
        Op::RouterTopk => {
            "aclnnMoeGatingTopKSoftmax / aclnnMoeGatingTopKSoftmaxV2 (softmax routing), aclnnMoeGatingTopK (sigmoid, bias-corrected, group-limited routing)"
        }
        Op::Permute => "aclnnMoeInitRoutingV2",
        Op::GroupedGemm => {
            "aclnnGroupedMatmulV4 (expert_offsets as its cumulative group list, groupListType 0); aclnnMatmul without offsets"
        }
        Op::GroupedGemmSwiglu => {
            "aclnnGroupedMatmulV4 then aclnnSwiGlu (the trait's default composes them; the fused aclnnGroupedMatmulSwigluQuant takes quantized weights only)"
        }
        Op::Activation => "aclnnSwiGlu",
        Op::Combine => "aclnnMoeFinalizeRoutingV2 (or aclnnMoeFinalizeRouting)",
        Op::Forward => {
            "aclnnMatmul -> aclnnMoeGatingTopK(Softmax) -> aclnnMoeInitRoutingV2 -> aclnnGroupedMatmulV4 -> aclnnSwiGlu -> aclnnGroupedMatmulV4 -> aclnnMoeFinalizeRoutingV2"
        }
    }
}

/// The sentence [`CannBackend::new`] fails with when no toolkit is linked.
#[cfg(not(moe_cann_toolkit))]
fn stub_sentence() -> String {
    let how = if cfg!(feature = "ascend") {
        "the `ascend` feature is on, but at build time ASCEND_TOOLKIT_HOME was unset or held no \
         lib64/libascendcl.so, so nothing was linked; source the toolkit's set_env.sh and rebuild"
    } else {
        "this build links no CANN library; rebuild with `--features moe-cann/ascend` and \
         ASCEND_TOOLKIT_HOME pointing at a CANN toolkit (one with lib64/libascendcl.so)"
    };
    format!(
        "{NAME} is a slot without the Ascend toolkit: {how}. Even then its ops are not ported yet; \
         the moe-cann crate docs map each op onto its CANN operator and PORTING.md gives the steps"
    )
}

/// One line for `moe devices`: what this slot is in this build.
pub fn status() -> String {
    match CannBackend::new() {
        Ok(b) => format!("{}: {}", NAME, b.info.device),
        Err(Error::Unavailable(s)) => format!("slot, unavailable: {s}"),
        Err(e) => format!("slot, unavailable: {e}"),
    }
}

/// A device allocation of the Ascend slot.
///
/// Once ported it holds an `aclrtMalloc` pointer and its size and frees it with `aclrtFree` on
/// drop. The slot never allocates, so no value of it is ever made outside this crate's tests.
pub struct CannBuffer {
    bytes: usize,
}

impl CannBuffer {
    /// Size of the allocation in bytes.
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The Ascend backend slot. [`CannBackend::new`] always fails in this version (see the crate
/// docs); every [`Backend`] method returns an error naming the CANN API that implements it.
pub struct CannBackend {
    info: BackendInfo,
}

impl CannBackend {
    /// Opens the first Ascend NPU.
    ///
    /// Without a linked toolkit (the default build) this is [`Error::Unavailable`] with a sentence
    /// that starts "cann is a slot without the Ascend toolkit" and says how to build with one.
    /// With a toolkit it initialises AscendCL and counts devices, then is still
    /// [`Error::Unavailable`]: the ops are not ported, so no backend is handed out.
    pub fn new() -> Result<CannBackend> {
        open()
    }

    /// The slot as a value, for this crate's tests: memory and ops all return errors.
    #[cfg(test)]
    fn slot() -> CannBackend {
        CannBackend {
            info: BackendInfo {
                name: NAME.into(),
                device: "Ascend NPU slot (ops not ported)".into(),
                memory_bytes: 0,
                shares_host_memory: false,
                max_buffer_bytes: 0,
                subgroup_size: None,
                features: vec![],
            },
        }
    }
}

#[cfg(not(moe_cann_toolkit))]
fn open() -> Result<CannBackend> {
    Err(Error::Unavailable(stub_sentence()))
}

#[cfg(moe_cann_toolkit)]
fn open() -> Result<CannBackend> {
    let n = toolkit::device_count()?;
    let found = match n {
        0 => "found no Ascend device".to_string(),
        1 => "found 1 Ascend device".to_string(),
        n => format!("found {n} Ascend devices"),
    };
    Err(Error::Unavailable(format!(
        "{NAME} is a slot: the Ascend toolkit is linked and {found}, but moe-cann's ops are not \
         ported yet, so no backend is handed out; the moe-cann crate docs map each op onto its \
         CANN operator and PORTING.md gives the steps"
    )))
}

/// The probe the toolkit build runs (unverified: run here only against a stand-in library).
#[cfg(moe_cann_toolkit)]
mod toolkit {
    use super::sys;
    use moe_hal::{Error, Result};

    /// Initialises AscendCL for this process (once; a repeat is fine) and counts NPUs.
    pub(crate) fn device_count() -> Result<u32> {
        // SAFETY: aclInit takes a NUL-terminated path or NULL (no config file); it is safe to call
        // again, which returns ACL_ERROR_REPEAT_INITIALIZE. aclFinalize is deliberately not
        // called: AscendCL may not be initialised again in the same process after it.
        let rc = unsafe { sys::aclInit(std::ptr::null()) };
        if rc != sys::ACL_SUCCESS && rc != sys::ACL_ERROR_REPEAT_INITIALIZE {
            return Err(Error::Unavailable(format!("aclInit failed with status {rc}: {}", sys::recent_error())));
        }
        let mut n = 0u32;
        // SAFETY: `n` is a valid, writable u32 for the duration of the call.
        let rc = unsafe { sys::aclrtGetDeviceCount(&mut n) };
        if rc != sys::ACL_SUCCESS {
            return Err(Error::Unavailable(format!("aclrtGetDeviceCount failed with status {rc}: {}", sys::recent_error())));
        }
        Ok(n)
    }
}

/// The error of a memory method: the slot has no device memory.
fn no_memory(what: &str, api: &str) -> Error {
    Error::Unavailable(format!("{NAME} is a slot and has no device memory: {what} would be {api}"))
}

/// The error of an op: not ported, and which CANN operator implements it.
fn not_ported(op: Op, how: &str) -> Error {
    Error::Unsupported(format!("{op} is not ported to Ascend ({NAME} is a slot); on Ascend it is {how}"))
}

impl Backend for CannBackend {
    type Buffer = CannBuffer;

    /// Name `cann`, the device in words. Once ported: `aclrtGetMemInfo(ACL_HBM_MEM, ..)` for
    /// `memory_bytes`; `subgroup_size` is `None` (the cube and vector units have no subgroup model
    /// moe-hal exposes).
    fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// Always `false`: no op runs here, so the conformance suite reports every case as
    /// "unsupported". A port answers `true` for what it runs natively or through
    /// [`moe_hal::fallback`]; on A2/A3 every operator named here takes f32, f16 and bf16
    /// (grouped matmul with the activation cast described in the crate docs).
    fn supports(&self, _op: Op, _dtype: DType) -> bool {
        false
    }

    /// Once ported: `aclrtMalloc(&ptr, bytes, ACL_MEM_MALLOC_HUGE_FIRST)`; a failure is
    /// [`Error::OutOfMemory`]. A zero-byte tensor needs no allocation (keep a null pointer).
    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<CannBuffer> {
        let bytes = dtype.tensor_bytes(shape)?;
        Err(no_memory(&format!("allocating {bytes} bytes"), "aclrtMalloc(&ptr, bytes, ACL_MEM_MALLOC_HUGE_FIRST)"))
    }

    /// Once ported: [`Backend::alloc`], then `aclrtMemcpy(ptr, bytes, host, bytes,
    /// ACL_MEMCPY_HOST_TO_DEVICE)`. Convert an `[E, N, K]` weight to FRACTAL_NZ here
    /// (`aclnnTransMatmulWeight`) if the grouped matmul path wants NZ.
    fn upload(&self, _dtype: DType, _shape: &[usize], host: &[u8]) -> Result<CannBuffer> {
        Err(no_memory(
            &format!("uploading {} bytes", host.len()),
            "aclrtMalloc, then aclrtMemcpy(dst, bytes, host, bytes, ACL_MEMCPY_HOST_TO_DEVICE)",
        ))
    }

    /// The size the buffer was allocated with (kept beside the device pointer).
    fn buffer_bytes(&self, buf: &CannBuffer) -> Option<usize> {
        Some(buf.bytes)
    }

    /// Once ported: `aclrtSynchronizeStream(stream)` (so every enqueued op has finished and any
    /// kernel failure is reported), then `aclrtMemcpy(host, len, ptr, len,
    /// ACL_MEMCPY_DEVICE_TO_HOST)`.
    fn download(&self, buf: &CannBuffer, _host: &mut [u8]) -> Result<()> {
        Err(no_memory(
            &format!("downloading {} bytes", buf.bytes),
            "aclrtSynchronizeStream, then aclrtMemcpy(host, len, ptr, len, ACL_MEMCPY_DEVICE_TO_HOST)",
        ))
    }

    /// Once ported: `aclrtSynchronizeStream` on the backend's one stream (made by
    /// `aclrtCreateStream` in `new`); a non-zero status becomes [`Error::Driver`] (or
    /// [`Error::DeviceLost`] for a device fault) with `aclGetRecentErrMsg()`.
    fn synchronize(&self) -> Result<()> {
        Err(no_memory("synchronising", "aclrtSynchronizeStream(stream)"))
    }

    /// Routing on Ascend, per [`Routing`] kind:
    ///
    /// * **Softmax, `norm_topk_prob = false`** (Qwen3-MoE configs that set it false):
    ///   `aclnnMoeGatingTopKSoftmax(x = logits [T, E] f32, finishedOptional = NULL, k, yOut =
    ///   topk_weights [T, k] f32, expertIdxOut = topk_ids [T, k] INT32, rowIdxOut = scratch
    ///   [T, k] INT32)`: softmax over E, then top-k. `rowIdxOut` (its column-major pair numbering
    ///   for `aclnnMoeInitRouting` V1) is not needed with V2 routing. The current page limits k
    ///   to 1024 and E to 2048 on Ascend 950 (256 on 310P), with no E limit on A2/A3.
    /// * **Softmax, `norm_topk_prob = true`** (Mixtral, Qwen3-MoE):
    ///   `aclnnMoeGatingTopKSoftmaxV2(.., k, renorm = 1, outputSoftmaxResultFlag = false, ..)`:
    ///   top-k of the logits, then softmax over those k, which equals the top-k of the softmax
    ///   divided by its sum (softmax is monotone). `k <= 1024`.
    /// * **Sigmoid, bias-corrected, group-limited** (DeepSeek-V3, Kimi K2) with
    ///   `norm_topk_prob = true`: `aclnnMoeGatingTopK(x = logits, biasOptional =
    ///   e_score_correction_bias [E] f32 (NULL when absent), k, kGroup = topk_group, groupCount =
    ///   n_group, groupSelectMode = 1 (a group scores the sum of its top 2), renorm = 0, normType
    ///   = 1 (sigmoid), outFlag = false, routedScalingFactor, eps = 1e-20, yOut = topk_weights,
    ///   expertIdxOut = topk_ids, outOut = NULL)`. It computes sigmoid, + bias, the group
    ///   selection, the top-k inside kept groups and `y / (sum + eps) * routedScalingFactor` in
    ///   one kernel. Limits: `E <= 2048`, `E / n_group > groupSelectMode` (the current page; an
    ///   older one asked `> 2`), and `ceil32(E / n_group) * n_group <= 2048`; Kimi K2
    ///   (`n_group = 1`, E = 384) and DeepSeek-V3 (8 groups of 32) both fit. `y` is gathered from
    ///   `s = sigmoid(x)`, DeepSeek's weights, not from `c = s + bias` (its kernel gathers the
    ///   sigmoid tensor; the crate docs give the sources).
    /// * **Sigmoid routing with `norm_topk_prob = false`**: `aclnnMoeGatingTopK` always divides by
    ///   the sum, so compose it from elementwise operators: `aclnnSigmoid` → `s`; `aclnnAdd(s,
    ///   bias)` → `c`; group scores from `aclnnTopk(c viewed [T, n_group, E/n_group], 2)` +
    ///   `aclnnReduceSum`; `aclnnTopk(group scores, topk_group)`; mask the dropped groups to minus
    ///   infinity (`aclnnMaskedFillScalar`); `aclnnTopk(c, k)` → `topk_ids`; `aclnnGather(s)` and
    ///   `aclnnMuls(routed_scaling_factor)` → `topk_weights`. Or use the ids from
    ///   `aclnnMoeGatingTopK` and only recompute the weights as above.
    ///
    /// In every case: expert ids come out as INT32 (moe-hal's u32 bits), unconfirmed: the
    /// operators' tie-breaking (moe-hal: the lower index wins) and NaN order (moe-hal: NaN ranks
    /// last; Ascend C's `TopK` puts NaN first); the conformance suite's tie and NaN cases decide
    /// whether a custom Ascend C kernel (`shaders/cann/router_topk.cpp`) is needed.
    fn router_topk(
        &self,
        logits: &Tensor<Self>,
        _bias: Option<&Tensor<Self>>,
        routing: &Routing,
        _topk_ids: &mut Tensor<Self>,
        _topk_weights: &mut Tensor<Self>,
    ) -> Result<()> {
        let e = logits.shape.get(1).copied().unwrap_or(0);
        let how = match *routing {
            Routing::Softmax { norm_topk_prob: false } => {
                format!(
                    "aclnnMoeGatingTopKSoftmax (softmax over the {e} experts, then top-k; yOut = topk_weights, expertIdxOut = topk_ids as INT32)"
                )
            }
            Routing::Softmax { norm_topk_prob: true } => {
                "aclnnMoeGatingTopKSoftmaxV2 with renorm = 1 (top-k of the logits, then softmax over the k: the renormalised softmax top-k)"
                    .to_string()
            }
            Routing::SigmoidGrouped { n_group, topk_group, norm_topk_prob: true, routed_scaling_factor } => format!(
                "aclnnMoeGatingTopK with normType = 1 (sigmoid), biasOptional = e_score_correction_bias, groupCount = {n_group}, \
                 kGroup = {topk_group}, groupSelectMode = 1 (sum of the top 2), renorm = 0, eps = 1e-20, routedScalingFactor = {routed_scaling_factor}"
            ),
            Routing::SigmoidGrouped { n_group, topk_group, norm_topk_prob: false, .. } => format!(
                "aclnnMoeGatingTopK for the ids (groupCount = {n_group}, kGroup = {topk_group}) with the weights recomputed without \
                 renormalisation (aclnnSigmoid, aclnnGather, aclnnMuls), since aclnnMoeGatingTopK always divides by the sum"
            ),
        };
        Err(not_ported(Op::RouterTopk, &how))
    }

    /// The dispatch plan on Ascend: `aclnnMoeInitRoutingV2(x, expertIdx = topk_ids [T, k] INT32,
    /// activeNum = 0, expertCapacity = 0, expertNum = E, dropPadMode = 0 (dropless),
    /// expertTokensCountOrCumsumFlag = 1 (cumulative), expertTokensBeforeCapacityFlag = false,
    /// expandedXOut [T*k, H], expandedRowIdxOut, expertTokensCountOrCumsumOut,
    /// expertTokensBeforeCapacityOut = NULL)`.
    ///
    /// * It flattens `expertIdx` row-major (pair `t * k + j`), sorts pairs by expert and writes
    ///   `expandedRowIdxOut[pair] = row`: exactly moe-hal's `row_index` (CANN's `expandedRowIdx`
    ///   is where the name comes from), passed as our `[T*k]` u32 buffer viewed INT32. The sort is
    ///   stable inside one expert on A2/A3 (its kernel sorts with the pair index as value through
    ///   Ascend C's order-keeping `Sort`/`MrgSort`), so an expert's rows follow pair order, as
    ///   moe-hal's do; Ascend 950's path was not read.
    /// * `expertTokensCountOrCumsumOut [E]` INT32 with flag 1 holds the cumulative counts: moe-hal's
    ///   `expert_offsets[1..=E]`. Pass a view of our `[E + 1]` buffer at element offset 1 and set
    ///   `expert_offsets[0] = 0` once (`aclrtMemsetAsync`).
    /// * `token_index` has no output of its own: `expandedXOut[r] = x[sortedRowIdx[r] / k]`, so
    ///   `token_index[row_index[p]] = p / k` — a scatter of `arange(T*k) / k` by `row_index`
    ///   (`aclnnArange`, integer divide, `aclnnScatter` / `aclnnInplaceIndexCopy`; unconfirmed
    ///   which is fastest), or a small Ascend C kernel (`shaders/cann/permute.cpp`). The op
    ///   needs `x` only for `expandedXOut`, the gathered hidden states; a port may keep them and
    ///   call `grouped_gemm` without a gather index instead.
    /// * V1 `aclnnMoeInitRouting` takes `rowIdx` from `aclnnMoeGatingTopKSoftmax`, numbers pairs
    ///   column-major (`j * T + t`) and has no count output: avoid it.
    /// * moe-hal requires an id `>= E` to be an [`Error::InvalidArgument`]; the operator only
    ///   documents that ids must lie in `[0, E - 1]`. Ids from [`Backend::router_topk`] always do;
    ///   for caller-supplied ids a port needs a device-side range check (e.g. `aclnnMax` compared
    ///   with `E` and surfaced at the next blocking call).
    fn permute(
        &self,
        _topk_ids: &Tensor<Self>,
        _expert_offsets: &mut Tensor<Self>,
        _row_index: &mut Tensor<Self>,
        _token_index: &mut Tensor<Self>,
    ) -> Result<()> {
        Err(not_ported(
            Op::Permute,
            "aclnnMoeInitRoutingV2 (dropless; expandedRowIdxOut = row_index, expertTokensCountOrCumsumOut with flag 1 = expert_offsets[1..]; \
             token_index scattered from p / k by row_index)",
        ))
    }

    /// Grouped GEMM on Ascend.
    ///
    /// **With `expert_offsets`** (the experts): `aclnnGroupedMatmulV4` with single tensors:
    /// `x = [x_rows]` (`[M, K]`), `weight = [w]` viewed `[G, K, N]` over our `[G, N, K]` storage
    /// (strides `[N*K, 1, K]`: the "weight transposed" case the page allows), `out = [y]`
    /// (`[M, N]`), `groupListOptional = expert_offsets[1..=G]` as INT64, `groupListType = 0`
    /// (cumulative: non-negative, non-decreasing, the last value the row count), `groupType = 0`
    /// (split along M), `splitItem = 3` (one output tensor), `actType = 0`, every quantisation
    /// argument NULL. Limits from the page: at most 1024 groups (E = 384 fits), each dimension
    /// below 2^31 after 32-byte alignment, and on A2/A3 the last cumulative value must equal M
    /// (moe-hal's "rows past `expert_offsets[G]` are zero" then needs an `aclnnInplaceZero` of the
    /// tail when they differ).
    ///
    /// * The gather: the operator has no row index, so gather first (`aclnnIndexSelect(x, 0,
    ///   token_index)` into scratch) or use `aclnnMoeInitRoutingV2`'s `expandedXOut`.
    /// * Dtypes: x and weight must share a dtype; cast the f32 activations to f16/bf16
    ///   (`aclnnCast`) and the output back, or keep f32 weights (see the crate docs). unconfirmed:
    ///   the accumulator precision for f16/bf16.
    /// * One single-tensor call takes at most 1024 groups (experts): enough for 256 and 384.
    /// * NZ: the weight may be FRACTAL_NZ (`aclnnTransMatmulWeight` at upload).
    /// * f8_e4m3 weights: no operator computes them as moe-hal does (see the crate docs, "f8_e4m3
    ///   weights on Ascend"); `supports` answers `false` for them until an Ascend C kernel does.
    /// * ggml's `mul_mat_id` uses `aclnnGroupedMatmulV3` differently: it copies the ids to the host
    ///   and builds one 1-row group per (token, slot), 128 groups per call. The cumulative group
    ///   list avoids both the host sync and the per-pair launch.
    ///
    /// **Without `expert_offsets`** (the router, the shared expert): one plain GEMM, `aclnnMatmul`
    /// (or `aclnnMm`) of `x [M, K]` with the transposed view of `w [N, K]`, f32 kept f32
    /// (`cubeMathType = 0`, KEEP_DTYPE: the parameter has no default, and 1 would lower f32 to HF32
    /// on A2/A3).
    fn grouped_gemm(
        &self,
        _x: &Tensor<Self>,
        token_index: Option<&Tensor<Self>>,
        _w: &Tensor<Self>,
        expert_offsets: Option<&Tensor<Self>>,
        _y: &mut Tensor<Self>,
    ) -> Result<()> {
        let how = match (expert_offsets.is_some(), token_index.is_some()) {
            (true, true) => {
                "aclnnGroupedMatmulV4 with expert_offsets[1..] as its cumulative group list (groupListType = 0, groupType = 0), \
                             after gathering x by token_index (aclnnIndexSelect)"
            }
            (true, false) => {
                "aclnnGroupedMatmulV4 with expert_offsets[1..] as its cumulative group list (groupListType = 0, groupType = 0)"
            }
            (false, _) => "aclnnMatmul of x with the transposed view of w (aclnnGroupedMatmulV4 serves the grouped case)",
        };
        Err(not_ported(Op::GroupedGemm, how))
    }

    /// SwiGLU on Ascend: `aclnnSwiGlu(x = gate_up [M, 2I], dim = -1, out = h [M, I])`. The page
    /// defines `out = Swish(A) * B` with `A` the first half of `x` along `dim` and `B` the second:
    /// moe-hal's gate-then-up layout, no reordering. f32, f16 and bf16 on A2/A3; f32 in, f32 out.
    /// Swish has β = 1 (silu): the operator's test reference is `F.silu(first half) * second`.
    fn activation(&self, _gate_up: &Tensor<Self>, _h: &mut Tensor<Self>) -> Result<()> {
        Err(not_ported(Op::Activation, "aclnnSwiGlu (dim = -1; gate is the first half, up the second)"))
    }

    /// Combine on Ascend: `aclnnMoeFinalizeRoutingV2(expandedX = y [T*k, H], expandedRowIdx =
    /// row_index [T*k] INT32, x1Optional = shared [T, H] (NULL without shared experts),
    /// x2Optional = NULL, biasOptional = NULL, scalesOptional = topk_weights [T, k],
    /// expertIdxOptional = NULL, dropPadMode = 2, out [T, H])`, which computes
    /// `out[t] = x1[t] + sum_j scales[t, j] * expandedX[expandedRowIdx[t*k + j]]`.
    ///
    /// `dropPadMode = 2` means dropless with the row-major index of `aclnnMoeInitRoutingV2`
    /// (moe-hal's `row_index`); 0 would mean the column-major index of V1 routing. V1
    /// `aclnnMoeFinalizeRouting` makes `x1`, `bias` and `expandedExpertIdx` mandatory and reads
    /// the column-major index: pass zeros and a transposed `row_index`, or prefer V2.
    /// Its A2/A3 kernel starts each row from `x1` and adds `scales * y` for `j = 0, 1, ..`,
    /// accumulating in the input dtype; moe-hal adds the shared expert after the routed terms, so
    /// results may differ in the last bit (within the suite's f32 tolerance).
    fn combine(
        &self,
        _y: &Tensor<Self>,
        _row_index: &Tensor<Self>,
        _topk_weights: &Tensor<Self>,
        shared: Option<&Tensor<Self>>,
        _out: &mut Tensor<Self>,
    ) -> Result<()> {
        let how = if shared.is_some() {
            "aclnnMoeFinalizeRoutingV2 (dropPadMode = 2, scalesOptional = topk_weights, the shared experts' output as x1Optional)"
        } else {
            "aclnnMoeFinalizeRoutingV2 (dropPadMode = 2, scalesOptional = topk_weights, x1Optional = NULL)"
        };
        Err(not_ported(Op::Combine, how))
    }

    /// The whole layer on Ascend, with no host round trip: `aclnnMatmul` (router logits) →
    /// `aclnnMoeGatingTopK` / `..Softmax` → `aclnnMoeInitRoutingV2` (whose `expandedXOut` is the
    /// gathered input) → `aclnnGroupedMatmulV4` (gate/up) → `aclnnSwiGlu` →
    /// `aclnnGroupedMatmulV4` (down) → shared expert (`aclnnMatmul`, `aclnnSwiGlu`,
    /// `aclnnMatmul`) → `aclnnMoeFinalizeRoutingV2`. CANN also has fused operators a port may try
    /// later (`aclnnGroupedMatmulFinalizeRouting*`, which folds the down projection into the
    /// combine); the conformance suite checks any fusion against the same oracle.
    fn forward(
        &self,
        _layer: &Layer<Self>,
        _x: &Tensor<Self>,
        _out: &mut Tensor<Self>,
        _topk_ids: &mut Tensor<Self>,
        _topk_weights: &mut Tensor<Self>,
    ) -> Result<()> {
        Err(not_ported(Op::Forward, &format!("the chain {}", operator(Op::Forward))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use moe_hal::MoeConfig;

    fn t(dtype: DType, shape: &[usize]) -> Tensor<CannBackend> {
        Tensor { buf: CannBuffer { bytes: shape.iter().product::<usize>() * dtype.size() }, dtype, shape: shape.to_vec(), scales: None }
    }

    fn unsupported(r: Result<()>) -> String {
        match r {
            Err(Error::Unsupported(s)) => s,
            other => panic!("expected Error::Unsupported, got {other:?}"),
        }
    }

    #[test]
    fn new_is_unavailable_with_the_slot_sentence() {
        let msg = match CannBackend::new() {
            Err(Error::Unavailable(s)) => s,
            Err(e) => panic!("expected Error::Unavailable, got {e:?}"),
            Ok(_) => panic!("the slot must not construct a backend"),
        };
        assert!(msg.contains("slot"), "{msg}");
        if toolkit_linked() {
            assert!(msg.contains("the Ascend toolkit is linked and found"), "{msg}");
        } else {
            assert!(msg.starts_with("cann is a slot without the Ascend toolkit"), "{msg}");
            assert!(msg.contains("ASCEND_TOOLKIT_HOME"), "{msg}");
        }
        let shown = CannBackend::new().err().map(|e| e.to_string()).unwrap_or_default();
        assert!(shown.starts_with("backend unavailable: cann is a slot"), "{shown}");
    }

    #[test]
    fn status_says_it_is_a_slot() {
        let s = status();
        println!("{s}");
        assert!(s.starts_with("slot"), "{s}");
        assert!(s.contains("Ascend"), "{s}");
    }

    #[test]
    fn router_topk_names_the_gating_operator_for_every_routing() {
        let b = CannBackend::slot();
        let logits = t(DType::F32, &[3, 8]);
        let bias = t(DType::F32, &[8]);
        let cases = [
            (Routing::Softmax { norm_topk_prob: false }, "aclnnMoeGatingTopKSoftmax "),
            (Routing::Softmax { norm_topk_prob: true }, "aclnnMoeGatingTopKSoftmaxV2"),
            (
                Routing::SigmoidGrouped { n_group: 2, topk_group: 1, norm_topk_prob: true, routed_scaling_factor: 2.5 },
                "aclnnMoeGatingTopK with normType = 1",
            ),
            (
                Routing::SigmoidGrouped { n_group: 2, topk_group: 1, norm_topk_prob: false, routed_scaling_factor: 1.0 },
                "aclnnMoeGatingTopK for the ids",
            ),
        ];
        for (routing, needle) in cases {
            let (mut ids, mut w) = (t(DType::U32, &[3, 2]), t(DType::F32, &[3, 2]));
            let bias = matches!(routing, Routing::SigmoidGrouped { .. }).then_some(&bias);
            let msg = unsupported(b.router_topk(&logits, bias, &routing, &mut ids, &mut w));
            assert!(msg.starts_with("router_topk is not ported to Ascend"), "{msg}");
            assert!(msg.contains(needle), "{routing:?}: {msg}");
        }
    }

    #[test]
    fn every_op_error_names_its_operator() {
        let b = CannBackend::slot();
        let ids = t(DType::U32, &[3, 2]);
        let (mut off, mut ri, mut ti) = (t(DType::U32, &[5]), t(DType::U32, &[6]), t(DType::U32, &[6]));
        let msg = unsupported(b.permute(&ids, &mut off, &mut ri, &mut ti));
        assert!(
            msg.starts_with("permute") && msg.contains("aclnnMoeInitRoutingV2") && msg.contains("expandedRowIdxOut = row_index"),
            "{msg}"
        );

        let x = t(DType::F32, &[3, 16]);
        let w = t(DType::BF16, &[4, 10, 16]);
        let mut y = t(DType::F32, &[6, 10]);
        for gather in [None, Some(&ti)] {
            let msg = unsupported(b.grouped_gemm(&x, gather, &w, Some(&off), &mut y));
            assert!(
                msg.starts_with("grouped_gemm") && msg.contains("aclnnGroupedMatmulV4") && msg.contains("cumulative group list"),
                "{msg}"
            );
            assert_eq!(msg.contains("aclnnIndexSelect"), gather.is_some(), "{msg}");
        }
        let dense = t(DType::F32, &[10, 16]);
        let mut yd = t(DType::F32, &[3, 10]);
        let msg = unsupported(b.grouped_gemm(&x, None, &dense, None, &mut yd));
        assert!(msg.contains("aclnnMatmul"), "{msg}");

        let gu = t(DType::F32, &[6, 8]);
        let mut h = t(DType::F32, &[6, 4]);
        let msg = unsupported(b.activation(&gu, &mut h));
        assert!(msg.starts_with("activation") && msg.contains("aclnnSwiGlu"), "{msg}");

        let yk = t(DType::F32, &[6, 16]);
        let tw = t(DType::F32, &[3, 2]);
        let shared = t(DType::F32, &[3, 16]);
        let mut out = t(DType::F32, &[3, 16]);
        for s in [None, Some(&shared)] {
            let msg = unsupported(b.combine(&yk, &ri, &tw, s, &mut out));
            assert!(msg.starts_with("combine") && msg.contains("aclnnMoeFinalizeRoutingV2"), "{msg}");
            assert_eq!(msg.contains("x1Optional = NULL"), s.is_none(), "{msg}");
        }
    }

    #[test]
    fn forward_names_the_whole_chain() {
        let b = CannBackend::slot();
        let (h, i, e, k) = (16, 4, 4, 2);
        let config = MoeConfig {
            hidden: h,
            intermediate: i,
            experts: e,
            top_k: k,
            routing: Routing::Softmax { norm_topk_prob: true },
            shared_intermediate: 0,
        };
        let layer = Layer {
            config,
            dtype: DType::F32,
            router: t(DType::F32, &[e, h]),
            bias: None,
            gate_up: t(DType::F32, &[e, 2 * i, h]),
            down: t(DType::F32, &[e, h, i]),
            shared_gate_up: None,
            shared_down: None,
        };
        let x = t(DType::F32, &[3, h]);
        let (mut out, mut ids, mut w) = (t(DType::F32, &[3, h]), t(DType::U32, &[3, k]), t(DType::F32, &[3, k]));
        let msg = unsupported(b.forward(&layer, &x, &mut out, &mut ids, &mut w));
        for op in ["aclnnMoeGatingTopK", "aclnnMoeInitRoutingV2", "aclnnGroupedMatmulV4", "aclnnSwiGlu", "aclnnMoeFinalizeRoutingV2"] {
            assert!(msg.contains(op), "{op} missing from: {msg}");
        }
    }

    #[test]
    fn memory_methods_name_the_runtime_calls_and_nothing_is_supported() {
        let b = CannBackend::slot();
        let err = |r: Result<()>| match r {
            Err(Error::Unavailable(s)) => s,
            other => panic!("expected Error::Unavailable, got {other:?}"),
        };
        assert!(err(b.alloc(DType::F32, &[2, 3]).map(|_| ())).contains("aclrtMalloc"));
        assert!(err(b.upload(DType::F32, &[1], &[0; 4]).map(|_| ())).contains("ACL_MEMCPY_HOST_TO_DEVICE"));
        let buf = CannBuffer { bytes: 4 };
        assert_eq!(buf.bytes(), 4);
        assert!(err(b.download(&buf, &mut [0; 4])).contains("ACL_MEMCPY_DEVICE_TO_HOST"));
        assert!(err(b.synchronize()).contains("aclrtSynchronizeStream"));
        for op in Op::ALL {
            assert!(!operator(op).is_empty());
            for d in DType::FLOATS {
                assert!(!b.supports(op, d), "{op} {d}");
            }
        }
        assert_eq!(b.info().name, NAME);
    }
}
