//! # moe-cuda: the CUDA backend of moe-hal
//!
//! [`CudaBackend`] implements [`moe_hal::Backend`] on NVIDIA GPUs through the CUDA driver API
//! ([cudarc](https://docs.rs/cudarc) 0.19, `dynamic-loading`): the crate builds and its tests run on
//! a machine with no GPU and no CUDA toolkit, and [`CudaBackend::new`] then answers
//! [`moe_hal::Error::Unavailable`] with the reason. Kernels are CUDA C++, one file per op
//! (`shaders/cuda/<op>.cu`, embedded with `include_str!`, self-contained: no `#include`, since
//! NVRTC has no system headers), compiled with NVRTC at first use for the device's own
//! architecture (`--gpu-architecture=sm_90` on Hopper: a cubin, so the driver needs no JIT), and
//! cached per device, and on disk (`cache.rs`: `~/.cache/moe-hal/cuda`, `MOE_CUDA_CACHE_DIR`,
//! `MOE_CUDA_CACHE=0` to turn it off), so only a process's first use on a machine pays NVRTC.
//!
//! | concept | CPU (`moe-cpu`) | CUDA (this crate) |
//! |---|---|---|
//! | a buffer | `Vec<u32>` | [`CudaBuffer`]: one allocation from the device's memory pool (`cuMemAllocAsync`; `cuMemAlloc` without pools) |
//! | an op | a rayon loop, done when it returns | kernels enqueued on one non-blocking stream, never waited on |
//! | blocking | never | only [`moe_hal::Backend::download`] and [`moe_hal::Backend::synchronize`] (`cuStreamSynchronize`) |
//! | a bad expert id | `Err` at once | a device flag, `Err(InvalidArgument)` at the next `synchronize`/`download` |
//! | a kernel | `moe_hal::host::grouped_gemm` | `grouped_gemm.cu`: `mma_*` (tensor cores), `simt_*`, `gemv_*` |
//! | compilation | rustc | NVRTC at first use, once per device and source file; the image kept on disk for later processes |
//! | a native failure | `OutOfMemory` from `try_reserve` | `CUDA_ERROR_OUT_OF_MEMORY` → `OutOfMemory`; illegal address, failed launch → `DeviceLost`; other `CUDA_ERROR_*` → `Driver` with the error's name; NVRTC errors → `Driver` with the compile log |
//!
//! ## Finding the driver and NVRTC
//!
//! [`CudaBackend::new`] first asks cudarc whether `libcuda` can be loaded
//! (`cudarc::driver::sys::is_culib_present`, before any call that would panic without it), then
//! `cuInit`, then finds NVRTC: the dynamic loader's own search first (`LD_LIBRARY_PATH`, the
//! ld.so cache), then `MOE_NVRTC_LIB`, `CUDA_HOME` and friends, `/usr/local/cuda*`, and NVIDIA's
//! Python wheels (`nvidia/cu13/lib` of `pip install nvidia-cuda-nvrtc`, in a virtualenv, PyTorch's
//! `/opt/torch/.venv`, the system or user site-packages). A library found in a folder is loaded by
//! its full path so cudarc's later `dlopen("libnvrtc.so.13")` finds it in the process. The whole
//! opening runs under `moe_hal::catch_panic`: a panic in the bindings is reported as
//! [`moe_hal::Error::Unavailable`], never propagated. `MOE_CUDA_DEVICE` picks a device (default 0).
//! [`available`] is the cheap probe for a device listing (no context is created).
//!
//! ## Errors
//!
//! Every driver call is checked. Fatal errors (an illegal address, a failed launch) are remembered:
//! every later call then returns the same [`moe_hal::Error::DeviceLost`]. Data-dependent bad input
//! that the contract requires to be reported (an expert id `>= E` to `permute`; offsets that do
//! not start at 0, decrease, or end past `M`, and a gather index `>= Mx` to `grouped_gemm`; a
//! `row_index` past the rows of `y` to `combine`) is found by the kernels, which clamp or skip so
//! nothing is read or written out of bounds, and set flags (`atomicOr`/`atomicMax`) in a 64-byte
//! device buffer. `synchronize` and `download` read it back (they block anyway), clear it, and
//! return [`moe_hal::Error::InvalidArgument`] with a sentence (the same as moe-wgpu's).
//!
//! ## Kernels, and which runs for which shape
//!
//! No op reads device data on the host: launch sizes come from shapes (worst cases), scratch is
//! allocated and freed in stream order, so the composed `forward` ([`moe_hal::forward::composed`])
//! runs a whole layer without a host synchronisation, and can be captured as a CUDA graph.
//!
//! ## CUDA graphs
//!
//! [`CudaBackend::capture`] records the work a closure enqueues (a whole `forward`) as one CUDA
//! graph without running it; [`CudaGraph::launch`] then enqueues all of it with one call, on the
//! buffers it was captured with (copy new input into the same input buffer first). Scratch the
//! capture allocates and drops belongs to the graph (plain allocations, freed with it); buffers
//! from outside stay allocated while a graph uses them. A synchronize, a download, an upload or a
//! capture inside a capture is refused with an error naming it, and the backend stays usable.
//! One graph per token count is how inference engines run decode: at one token a small layer's
//! kernels take less time than enqueuing them. `moe bench --cuda-graphs` times both.
//! [`CudaBackend::with_forward_graphs`] is the same behind the trait: `forward` captures a call
//! the first time and replays it when called with the same buffers and shapes again. The device
//! has one stream, which a capture holds: another thread's work on the backend waits until the
//! capture ends (it would otherwise become part of the graph). On the emulator a capture records
//! the launches and a launch replays them (the graph's scratch filled with NaN bytes first), so
//! the tests run there too: the `tests::graph` unit tests, and the conformance suite's forward
//! groups in graph mode (`cudaemu_graphs`; `cuda_graphs` on a GPU).
//!
//! | op | kernel(s) | shape |
//! |---|---|---|
//! | `router_topk` | `router_topk`: one block of 256 per token; scores in shared memory (global scratch when `E + 2 n_group` floats exceed 48 KiB), so any `E` (256, 384 and beyond); k rounds of a block-wide max over 64-bit (key, index) candidates | all |
//! | `permute` | `permute_rank` (tiles of 1024 pairs: stable in-tile rank, per-tile counts stored bucket-major), `permute_scan` (one block: exclusive scan of the counts in bucket-major order, which *is* the stable order), `permute_scatter` | all |
//! | `grouped_gemm` | `gemm_prep`: validates offsets and gather indices, zeros rows past `expert_offsets[G]` | with offsets or a gather index |
//! | | `gemv_*`: a block streams `8 NR` weight rows of one expert once (16-byte loads, 512 contiguous bytes per warp and step), for up to 8 token rows per pass (an expert of 5 to 8 rows, common at T = 128, reads its weights once; a pass skips the rows it lacks, so decode does one row of work); slots per group, or per row of `y` when `M < G` so idle experts cost one check; `NR` = 4, or 1 when that gives fewer than 2 blocks per multiprocessor (the router, a shared expert at T = 1) | `M <= 4 G` (decode; `G = 1` without offsets) |
//! | | `gemm_plan` + `mma_*`: tensor cores, `mma.sync.m16n8k16` (f16 or bf16 inputs, f32 accumulators) from inline PTX; tiles of 64 or 128 rows (64 when `M <= 64 G`) by 128 columns, 8 warps, K in slices of 32 with a register prefetch of the next slice; row tiles never span two experts (`gemm_plan` scans `ceil(rows_g / BM)`), blocks ordered in super-columns of 8 column tiles so an expert's row tiles share its weights in L2; F8E4M3 weights are dequantized (`q * scale`, rounded to bf16) on their way into shared memory and run as bf16 | `M > 4 G`, f16/bf16/F8E4M3 weights, sm_80+, with expert offsets |
//! | | `mma_split_*`: the same, each activation staged as two 16-bit parts (hi + lo) and every product issued twice, so the activations keep ~16 significant bits | the same shapes without offsets: the router and the shared expert |
//! | | `gemm_plan` + `simt_*`: the same schedule on f32 FMA, 64 x 64 tiles, 4 x 4 outputs per thread | `M > 4 G`, f32 weights (or a GPU older than sm_80) |
//! | | F8E4M3 (`*_f8_e4m3_*`, every family): the weights are bytes (16-byte loads: 16 elements for `gemv_*` and `mma_*`, 4-byte for `simt_*`), decoded exactly (on sm_89+ two bytes at a time by `cvt.rn.f16x2.e4m3x2`, then f16 to f32; before sm_89, or with `MOE_CUDA_F8_CVT=0`, arithmetically: no table, no f32 denormal) and multiplied by their block's f32 scale; a thread looks its scale up once per run of consecutive elements (one division) when the block width is a multiple of the run, and walks the scales element by element otherwise (blocks like 5 x 12) | the same shapes as f16/bf16 |
//! | `grouped_gemm_swiglu` | the `grouped_gemm` kernels with `swiglu = 1`: tile columns walk the `2I` weight rows interleaved (column `2j` = gate row `j`, `2j + 1` = up row `I + j`), so the thread holding a gate accumulator holds its up partner (the mma C fragment's column pair, simt's 4 columns, a gemv warp's `NR` rows with `NR` = 4 or 2) and writes only `silu(gate) * up`; the `[M, 2I]` intermediate never reaches memory | the same shapes as `grouped_gemm` |
//! | `activation` | grid-stride SwiGLU (`activation_vec`: float4 when `I % 4 == 0`) | all |
//! | `combine` | grid-stride weighted sum in slot order (`combine_vec`: float4 when `H % 4 == 0`) | all |
//!
//! The vector variants (`*_vec`) need `K % 8 == 0` (`K % 4 == 0` for `simt_*`; `K % 16 == 0` for
//! F8E4M3's `gemv_*` and `mma_*`), which every real model has; other `K` take the `*_any`
//! variants, element loads with bounds checks.
//! [`CudaBackend::with_gemm_path`] forces one family (for tests and benchmarks).
//!
//! ## Precision
//!
//! Activations are f32 everywhere and every sum accumulates in f32. f32 weights run on plain FMA
//! (`gemv_*`, `simt_*`; never TF32, which rounds inputs to 10 bits and would break the 1e-5 f32
//! tolerance). The decode path (`gemv_*`) keeps activations in f32 for every dtype.
//!
//! The tensor-core path of the **expert** GEMMs (`mma_*`, with offsets) rounds the f32 activations
//! to the weights' storage dtype on their way into shared memory (round to nearest even); the
//! weights are exact. Measured against `moe-cpu` on the emulator: 1.9e-4 (f16) and 1.5e-3 (bf16)
//! relative L2 error per GEMM, against conformance tolerances of 3e-3 / 1e-2 per op and 5e-3 /
//! 2e-2 per layer. **Dense** GEMMs on the tensor cores (`mma_split_*`: the router when it is stored
//! in f16/bf16, the shared expert) split each activation into `hi = round(x)` and
//! `lo = round(x - hi)` and multiply both (twice the tensor work, nothing more read from memory):
//! 2e-7 (f16) and 2e-6 (bf16). The router needs it: routing is decided by logits, which the spec
//! computes in f32, and a bf16-rounded activation moved a near-tie in the conformance suite
//! (`forward_bf16/softmax_raw_shared`). f16 rounding of an activation above 65504 gives infinity
//! (no real model's hidden states or SwiGLU outputs come near).
//!
//! **F8E4M3** weights are exact on the FMA paths (`gemv_*`, `simt_*`: `q * scale` in f32, as
//! `moe_hal::fp8` and `moe-cpu` compute it; 1e-7 to 3e-7 from `moe-cpu` on the emulator, summation
//! order only). On the tensor cores (`mma_*` and `mma_split_*`) each dequantized weight is rounded
//! once to bf16 (bf16 rather than f16: `q * scale` can be far below f16's normal range, where it
//! would lose its bits or flush to zero) and the activations go in as bf16 (`mma_*`) or as hi + lo
//! (`mma_split_*`): 1.4e-3 to 3.3e-3 relative L2 per GEMM on the emulator, split or not (the
//! weights' rounding dominates once the activations are split), against the conformance tolerance
//! of 1e-2 per op and 2e-2 per layer (the bf16 ones).
//!
//! ## The CPU emulator
//!
//! `crates/moe-cuda/emu` compiles the same `.cu` files as C++ (g++ 12+) after a prelude that
//! supplies CUDA's builtins: the threads of a block are fibers switched at every `__syncthreads`
//! and warp shuffle, `mma.sync` is emulated with the PTX ISA's m16n8k16 fragment layout exchanged
//! between the 32 lanes of a warp, f16 conversion uses `_Float16`, every allocation ends at a guard
//! page (a read past the end faults), `__ldg` checks alignment, and a barrier not every live thread
//! reaches, or a shuffle with exited lanes, aborts with the kernel's name.
//! [`CudaBackend::emulated`] runs the backend on it: the real `ops.rs` launch sizes, the real
//! kernels, one block at a time. It cannot see timing, races between blocks, memory ordering, or
//! the tensor cores' internal summation order.
//!
//! ## Verified, and not verified
//!
//! Verified on a machine **without a GPU** (x86-64, 2 cores):
//! * the crate builds with no CUDA toolkit; `new()` and [`available`] report the missing driver
//!   (`no_driver_means_unavailable_not_a_panic`), and the conformance suite skips it with that
//!   reason (and fails when `MOE_REQUIRE_BACKENDS` names `cuda`);
//! * every kernel of every source file compiles with NVRTC 13.2 (`pip install nvidia-cuda-nvrtc`,
//!   found in the wheel's folder with no `LD_LIBRARY_PATH`) to sm_90 and sm_80 cubins with an empty
//!   log (no warning), every entry point is in the PTX, the tensor-core kernels hold `mma.sync`,
//!   and ptxas reports no spill and no stack frame for any kernel (`nvrtc_compiles_every_kernel`
//!   prints the registers and shared memory of each);
//! * on the emulator: the **whole conformance suite** passes (all 23 groups, every case, F8E4M3's
//!   three included), and the `tests::device` tests force every kernel family on every dtype
//!   (tensor cores with 64- and 128-row tiles, split and not, vector and element loads; FMA tiles
//!   for every dtype; streaming with one and four rows per warp; F8E4M3 in 16 x 32, 5 x 12, 3 x 7
//!   and 128 x 128 blocks, so each family takes both the one-scale-per-run and the walking
//!   lookup; the router's global-scratch path at E = 20000; permute over 24 tiles) and match
//!   `moe-cpu` (these run in `cargo test` wherever g++ 12+ is installed);
//! * on the emulator: a captured layer (`tests::graph`) replays `forward` bit for bit on new
//!   input in both kernel regimes, a capture refuses what a graph cannot hold and leaves the
//!   backend usable, and a graph keeps the buffers it uses (freed early, the emulator's unmapped
//!   memory would fault).
//!
//! **Nothing has run on a GPU yet**: the conformance suite on a real device, compute-sanitizer,
//! `moe run --backend cuda`, the tensor cores' own arithmetic, the driver's side of graph capture
//! (a relaxed capture with `cuMemAlloc` inside it), and every timing remain for a device
//! session (`crates/moe-cuda/DEVICE_CHECK.md` has the exact steps). In particular the **F8E4M3**
//! kernels (`*_f8_e4m3_*`) were verified **only on the emulator and by NVRTC** (they compile for
//! sm_90 and sm_80 with no warning and no spill), never on a GPU: neither their results on real
//! hardware nor their speed (decode is meant to read half the bytes of bf16) has been measured.
//! The emulator runs the arithmetic E4M3 decode (as sm_80 does); sm_89+'s hardware conversion
//! path is checked only by NVRTC (the PTX holds it for sm_90, not for sm_80 nor with
//! `MOE_CUDA_F8_CVT=0`).

#![warn(missing_docs)]

mod buffer;
mod cache;
mod driver;
mod graph;
mod kernels;
mod ops;
#[cfg(test)]
mod tests;

use std::sync::Arc;

pub use buffer::CudaBuffer;
use driver::Device;
pub use graph::CudaGraph;
use moe_hal::{Backend, BackendInfo, DType, Error, Op, Result, Routing, Tensor};

/// Probes for a CUDA device without creating a context: `Ok(description)` (e.g.
/// `"NVIDIA H200 (sm_90, 132 SMs, 139.8 GiB; CUDA driver 13.0; NVRTC 13.0)"`) or `Err(why not)`,
/// for a device listing. Never panics.
pub fn available() -> std::result::Result<String, String> {
    let probe = || -> Result<String> {
        let f = driver::device_facts()?;
        let (major, minor) = kernels::nvrtc_version()?;
        Ok(format!(
            "{} (sm_{}, {} SMs, {:.1} GiB; CUDA driver {}.{}; NVRTC {major}.{minor})",
            f.name,
            f.cc,
            f.sms,
            f.total_mem as f64 / (1u64 << 30) as f64,
            f.driver_version / 1000,
            f.driver_version % 1000 / 10
        ))
    };
    let r = moe_hal::catch_panic(probe).unwrap_or_else(|p| Err(Error::Unavailable(format!("the CUDA driver panicked while probing: {p}"))));
    r.map_err(|e| match e {
        Error::Unavailable(s) => s,
        e => e.to_string(),
    })
}

/// Which kernel family `grouped_gemm` uses; [`GemmPath::Auto`] chooses from shapes (see the crate
/// docs). The others force one family for tests and benchmarks; every family is correct for every
/// shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmPath {
    /// From shapes: `gemv_*` for `M <= 4 G`, else tensor cores for f16/bf16/F8E4M3 weights on
    /// sm_80+, else f32 FMA tiles.
    #[default]
    Auto,
    /// Always the weight-streaming decode kernels (`gemv_*`).
    Gemv,
    /// Always tiles: tensor cores where the dtype and GPU allow, else FMA tiles.
    Tiled,
    /// Always the FMA tiles (`simt_*`), even for f16/bf16/F8E4M3 weights.
    Simt,
}

/// The CUDA backend: one device (its primary context, one stream, its memory pool), its compiled
/// kernels, and its error state. See the crate docs for kernels, errors and precision.
pub struct CudaBackend {
    info: BackendInfo,
    dev: Arc<Device>,
    gemm_path: GemmPath,
    /// Graph mode ([`CudaBackend::with_forward_graphs`]): the graphs `forward` replays.
    forward_graphs: Option<graph::ForwardGraphs>,
}

impl CudaBackend {
    /// Opens device 0 (or `MOE_CUDA_DEVICE`).
    ///
    /// No driver library, no device, or no NVRTC is [`Error::Unavailable`] with a sentence (e.g.
    /// "no CUDA driver (libcuda) on this machine"); a driver call that fails is mapped as the crate
    /// docs say; a panic inside the bindings is caught and reported as [`Error::Unavailable`].
    /// Kernels are compiled later, at their first use.
    pub fn new() -> Result<CudaBackend> {
        // The driver library is checked before anything that could panic without it.
        driver::driver_library().map_err(Error::Unavailable)?;
        let dev = moe_hal::catch_panic(Device::open)
            .unwrap_or_else(|p| Err(Error::Unavailable(format!("the CUDA driver bindings panicked while opening the device: {p}"))))?;
        Ok(Self::from_device(dev))
    }

    fn from_device(dev: Device) -> CudaBackend {
        let f = &dev.facts;
        let mut features = vec!["f32".to_string(), "f16".into(), "bf16".into(), "f8_e4m3 (block scales)".into(), format!("sm_{}", f.cc)];
        if f.cc >= 80 {
            features.push("tensor-cores mma.sync m16n8k16 f16/bf16->f32 (f8_e4m3 as bf16)".into());
        }
        if f.memory_pools {
            features.push("stream-ordered memory pool".into());
        }
        features.push(format!("{} ({})", dev.nvrtc, dev.target));
        features.push(format!("L2 {} MiB", f.l2_bytes >> 20));
        if let Some(bytes) = kernels::gemv_prefetch() {
            features.push(format!("gemv: L2 prefetch {bytes} bytes ahead (MOE_CUDA_GEMV_PREFETCH)"));
        }
        features.extend(moe_hal::gemv::feature());
        let info = BackendInfo {
            name: "cuda".into(),
            device: format!(
                "{} (sm_{}, {} SMs, CUDA driver {}.{})",
                f.name,
                f.cc,
                f.sms,
                f.driver_version / 1000,
                f.driver_version % 1000 / 10
            ),
            memory_bytes: f.total_mem as u64,
            // The emulator (tests only) reports a GPU's 64 GiB, not the host's memory.
            shares_host_memory: false,
            max_buffer_bytes: f.total_mem as u64,
            subgroup_size: Some(32),
            features,
        };
        CudaBackend { info, dev: Arc::new(dev), gemm_path: GemmPath::Auto, forward_graphs: None }
    }

    /// The same backend on the **CPU emulator** of its kernels instead of a GPU: the `.cu` files
    /// compiled as C++ with a shim for CUDA's builtins (`crates/moe-cuda/emu/build.sh` builds
    /// `libmoe_cuda_emu.so`; `lib` is its path). Every op runs the real kernels with the real launch
    /// sizes, one block at a time; buffers end at a guard page, so an out-of-bounds access faults.
    /// For testing kernels on a machine without a GPU: slow, and it says nothing about speed.
    pub fn emulated(lib: impl AsRef<std::path::Path>) -> Result<CudaBackend> {
        let dev = Device::emulated(lib.as_ref())?;
        Ok(Self::from_device(dev))
    }

    /// The backend on the CPU emulator built from this checkout's `.cu` files: the library named
    /// by `MOE_CUDA_EMULATOR`, none when `MOE_CUDA_NO_EMULATOR` is set, else `emu/build.sh` run
    /// once per process (into the workspace's
    /// `target/moe-cuda-emu`; needs g++ 12 or newer). [`Error::Unavailable`] with the reason when
    /// neither works. This is how the conformance suite runs the CUDA kernels on machines without
    /// a GPU (CI included).
    pub fn emulator() -> Result<CudaBackend> {
        static LIB: std::sync::OnceLock<std::result::Result<String, String>> = std::sync::OnceLock::new();
        let lib = LIB.get_or_init(|| {
            if let Ok(p) = std::env::var("MOE_CUDA_EMULATOR") {
                return Ok(p);
            }
            if std::env::var_os("MOE_CUDA_NO_EMULATOR").is_some() {
                return Err("MOE_CUDA_NO_EMULATOR is set".into());
            }
            let here = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
            let out = here.join("../../target/moe-cuda-emu");
            match std::process::Command::new("bash").arg(here.join("emu/build.sh")).arg(&out).output() {
                Ok(o) if o.status.success() => Ok(String::from_utf8_lossy(&o.stdout).trim().to_string()),
                Ok(o) => Err(format!("emu/build.sh failed: {}", String::from_utf8_lossy(&o.stderr).trim())),
                Err(e) => Err(format!("cannot run emu/build.sh: {e}")),
            }
        });
        Self::emulated(lib.clone().map_err(|why| Error::Unavailable(format!("no CUDA emulator: {why}")))?)
    }

    /// Graph mode: [`moe_hal::Backend::forward`] captures the layer as a CUDA graph the first
    /// time it is called with a set of buffers and shapes, and replays that graph (one launch)
    /// when called with the same ones again, as a decode loop with persistent buffers does. The
    /// last few graphs are kept (each keeps its scratch and the buffers it uses allocated); a
    /// call unlike all of them captures anew, which costs more than running the layer eagerly,
    /// so this is for loops that reuse their buffers. The results are those of `forward`, bit
    /// for bit. Off by default; [`CudaBackend::capture`] is the explicit form (several layers
    /// in one graph, say).
    pub fn with_forward_graphs(mut self, on: bool) -> Self {
        self.forward_graphs = on.then(Default::default);
        self
    }

    /// Forces one kernel family for `grouped_gemm` (see [`GemmPath`]).
    pub fn with_gemm_path(mut self, path: GemmPath) -> Self {
        self.gemm_path = path;
        self
    }

    /// Compiles and loads every kernel now instead of at first use (NVRTC takes a few seconds for
    /// `grouped_gemm.cu`), so a benchmark's first timed call does not include it.
    pub fn warm_up(&self) -> Result<()> {
        if self.dev.emu.is_some() {
            return Ok(());
        }
        for s in kernels::Source::ALL {
            self.dev.module(s)?;
        }
        Ok(())
    }

    /// Memory free on the device now, in bytes (0 when the driver cannot say).
    pub fn free_memory(&self) -> u64 {
        self.dev.free_memory() as u64
    }
}

impl Backend for CudaBackend {
    type Buffer = CudaBuffer;

    fn info(&self) -> &BackendInfo {
        &self.info
    }

    /// Every op runs natively for every weight dtype: f32, f16, bf16, and F8E4M3 with its block
    /// scales (decoded in the GEMM kernels).
    fn supports(&self, _op: Op, dtype: DType) -> bool {
        dtype.is_weight()
    }

    fn alloc(&self, dtype: DType, shape: &[usize]) -> Result<CudaBuffer> {
        CudaBuffer::new(&self.dev, dtype.tensor_bytes(shape)?)
    }

    fn buffer_bytes(&self, buf: &CudaBuffer) -> Option<usize> {
        Some(buf.bytes)
    }

    fn upload(&self, dtype: DType, shape: &[usize], host: &[u8]) -> Result<CudaBuffer> {
        let want = dtype.tensor_bytes(shape)?;
        if host.len() != want {
            return moe_hal::invalid!("a {dtype} tensor of shape {shape:?} needs {want} bytes, got {}", host.len());
        }
        let buf = CudaBuffer::new(&self.dev, want)?;
        self.dev.upload_raw(buf.ptr, host)?;
        Ok(buf)
    }

    fn download(&self, buf: &CudaBuffer, host: &mut [u8]) -> Result<()> {
        if host.len() != buf.bytes {
            return moe_hal::invalid!("download into {} bytes from a buffer of {} bytes", host.len(), buf.bytes);
        }
        self.dev.download_raw(buf.ptr, host)
    }

    fn synchronize(&self) -> Result<()> {
        self.dev.check_flags()
    }

    /// `cuMemcpyDtoDAsync` on the stream.
    fn copy(&self, src: &CudaBuffer, dst: &mut CudaBuffer) -> Result<()> {
        if src.bytes != dst.bytes {
            return moe_hal::invalid!("copy needs buffers of the same size ({} and {} bytes)", src.bytes, dst.bytes);
        }
        self.dev.copy_raw(dst.ptr, src.ptr, src.bytes)
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

    /// Fused: the grouped_gemm kernels with the SwiGLU epilogue (gate and up columns paired in
    /// one thread), so the `[M, 2I]` intermediate never reaches memory.
    fn grouped_gemm_swiglu(
        &self,
        x: &Tensor<Self>,
        token_index: Option<&Tensor<Self>>,
        w: &Tensor<Self>,
        expert_offsets: Option<&Tensor<Self>>,
        h: &mut Tensor<Self>,
    ) -> Result<()> {
        self.op_grouped_gemm(x, token_index, w, expert_offsets, h, true)
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

    /// The composed layer ([`moe_hal::forward::composed`]); in graph mode
    /// ([`CudaBackend::with_forward_graphs`]) one launch of a captured graph of it.
    fn forward(
        &self,
        layer: &moe_hal::Layer<Self>,
        x: &Tensor<Self>,
        out: &mut Tensor<Self>,
        topk_ids: &mut Tensor<Self>,
        topk_weights: &mut Tensor<Self>,
    ) -> Result<()> {
        match &self.forward_graphs {
            // (Inside a capture of the caller's, the layer is captured as it is.)
            Some(graphs) if !self.dev.capturing() => self.forward_graphed(graphs, layer, x, out, topk_ids, topk_weights),
            _ => moe_hal::forward::composed(self, layer, x, out, topk_ids, topk_weights),
        }
    }
}
