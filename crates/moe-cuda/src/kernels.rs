//! The CUDA kernels: one source file per op (embedded with `include_str!`), compiled with NVRTC on
//! first use for the device's own architecture, loaded as a module and cached per device, and the
//! helper that launches one kernel.

use std::ffi::{CStr, CString, c_char, c_void};
use std::sync::{Arc, Mutex};

use cudarc::driver::result as dr;
use cudarc::driver::sys as ds;
use cudarc::nvrtc::result as nr;
use cudarc::nvrtc::sys as ns;
use moe_hal::{Error, Result};

use crate::driver::Device;

/// One kernel source file per op, named as the trait method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Source {
    RouterTopk,
    Permute,
    GroupedGemm,
    Activation,
    Combine,
}

impl Source {
    /// Every source, in pipeline order.
    pub const ALL: [Source; 5] = [Source::RouterTopk, Source::Permute, Source::GroupedGemm, Source::Activation, Source::Combine];

    /// The file name, e.g. `grouped_gemm.cu`.
    pub fn file(self) -> &'static str {
        match self {
            Source::RouterTopk => "router_topk.cu",
            Source::Permute => "permute.cu",
            Source::GroupedGemm => "grouped_gemm.cu",
            Source::Activation => "activation.cu",
            Source::Combine => "combine.cu",
        }
    }

    /// The CUDA C++ text.
    pub fn text(self) -> &'static str {
        match self {
            Source::RouterTopk => include_str!("../../../shaders/cuda/router_topk.cu"),
            Source::Permute => include_str!("../../../shaders/cuda/permute.cu"),
            Source::GroupedGemm => include_str!("../../../shaders/cuda/grouped_gemm.cu"),
            Source::Activation => include_str!("../../../shaders/cuda/activation.cu"),
            Source::Combine => include_str!("../../../shaders/cuda/combine.cu"),
        }
    }

    /// The `extern "C"` kernels the file defines (the host launches nothing else); the NVRTC test
    /// checks each is in the compiled image, and a graph capture loads each first.
    pub fn entries(self) -> &'static [&'static str] {
        match self {
            Source::RouterTopk => &["router_topk"],
            Source::Permute => &["permute_rank", "permute_scan", "permute_scatter"],
            Source::GroupedGemm => &[
                "gemm_prep",
                "gemm_plan",
                "mma_f16_m64_vec",
                "mma_f16_m64_any",
                "mma_f16_m128_vec",
                "mma_f16_m128_any",
                "mma_bf16_m64_vec",
                "mma_bf16_m64_any",
                "mma_bf16_m128_vec",
                "mma_bf16_m128_any",
                "mma_f8_e4m3_m64_vec",
                "mma_f8_e4m3_m64_any",
                "mma_f8_e4m3_m128_vec",
                "mma_f8_e4m3_m128_any",
                "mma_split_f16_m64_vec",
                "mma_split_f16_m64_any",
                "mma_split_f16_m128_vec",
                "mma_split_f16_m128_any",
                "mma_split_bf16_m64_vec",
                "mma_split_bf16_m64_any",
                "mma_split_bf16_m128_vec",
                "mma_split_bf16_m128_any",
                "mma_split_f8_e4m3_m64_vec",
                "mma_split_f8_e4m3_m64_any",
                "mma_split_f8_e4m3_m128_vec",
                "mma_split_f8_e4m3_m128_any",
                "simt_f32_vec",
                "simt_f32_any",
                "simt_f16_vec",
                "simt_f16_any",
                "simt_bf16_vec",
                "simt_bf16_any",
                "simt_f8_e4m3_vec",
                "simt_f8_e4m3_any",
                "gemv_f32_r1_vec",
                "gemv_f32_r1_any",
                "gemv_f32_r2_vec",
                "gemv_f32_r2_any",
                "gemv_f32_r4_vec",
                "gemv_f32_r4_any",
                "gemv_f16_r1_vec",
                "gemv_f16_r1_any",
                "gemv_f16_r2_vec",
                "gemv_f16_r2_any",
                "gemv_f16_r4_vec",
                "gemv_f16_r4_any",
                "gemv_bf16_r1_vec",
                "gemv_bf16_r1_any",
                "gemv_bf16_r2_vec",
                "gemv_bf16_r2_any",
                "gemv_bf16_r4_vec",
                "gemv_bf16_r4_any",
                "gemv_f8_e4m3_r1_vec",
                "gemv_f8_e4m3_r1_any",
                "gemv_f8_e4m3_r2_vec",
                "gemv_f8_e4m3_r2_any",
                "gemv_f8_e4m3_r4_vec",
                "gemv_f8_e4m3_r4_any",
            ],
            Source::Activation => &["activation", "activation_vec"],
            Source::Combine => &["combine", "combine_vec"],
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NVRTC
// ---------------------------------------------------------------------------------------------

/// What NVRTC produces for a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Target {
    /// Machine code for `sm_XY` (no JIT at load time; runs on a driver older than NVRTC).
    Cubin(u32),
    /// PTX for `compute_XY`, compiled by the driver at load time (a GPU newer than NVRTC knows).
    Ptx(u32),
}

impl Target {
    /// The `--gpu-architecture` option.
    pub fn option(self) -> String {
        match self {
            Target::Cubin(a) => format!("--gpu-architecture=sm_{a}"),
            Target::Ptx(a) => format!("--gpu-architecture=compute_{a}"),
        }
    }

    /// The architecture number (90 for sm_90).
    pub fn arch(self) -> u32 {
        match self {
            Target::Cubin(a) | Target::Ptx(a) => a,
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Cubin(a) => write!(f, "sm_{a} cubin"),
            Target::Ptx(a) => write!(f, "compute_{a} PTX"),
        }
    }
}

/// What to compile for a device of compute capability `cc` (90 for 9.0) with an NVRTC that
/// supports `archs`: its own cubin when NVRTC knows it; else the cubin of the newest architecture
/// of the same major version below it (binary compatible); else PTX for the newest architecture
/// below it (the driver compiles it); `None` when NVRTC supports nothing at or below `cc`.
pub(crate) fn choose_target(cc: u32, archs: &[u32]) -> Option<Target> {
    if archs.contains(&cc) {
        return Some(Target::Cubin(cc));
    }
    let below = archs.iter().copied().filter(|&a| a <= cc);
    if let Some(a) = below.clone().filter(|&a| a / 10 == cc / 10).max() {
        return Some(Target::Cubin(a));
    }
    below.max().map(Target::Ptx)
}

fn nvrtc_err(what: &str, e: nr::NvrtcError) -> Error {
    Error::Driver(format!("NVRTC {what}: {:?}", e.0))
}

/// NVRTC's version `(major, minor)`.
pub(crate) fn nvrtc_version() -> Result<(i32, i32)> {
    crate::driver::nvrtc_library().map_err(Error::Unavailable)?;
    let (mut major, mut minor) = (0i32, 0i32);
    // SAFETY: writes two ints.
    unsafe { ns::nvrtcVersion(&mut major, &mut minor) }.result().map_err(|e| nvrtc_err("nvrtcVersion", e))?;
    Ok((major, minor))
}

/// The architectures NVRTC can compile for, e.g. `[75, 80, 86, 87, 89, 90, 100, ..]`.
pub(crate) fn nvrtc_archs() -> Result<Vec<u32>> {
    crate::driver::nvrtc_library().map_err(Error::Unavailable)?;
    let mut n = 0i32;
    // SAFETY: writes one int, then `n` ints.
    unsafe { ns::nvrtcGetNumSupportedArchs(&mut n) }.result().map_err(|e| nvrtc_err("nvrtcGetNumSupportedArchs", e))?;
    let mut archs = vec![0i32; n.max(0) as usize];
    unsafe { ns::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }.result().map_err(|e| nvrtc_err("nvrtcGetSupportedArchs", e))?;
    Ok(archs.into_iter().filter(|&a| a > 0).map(|a| a as u32).collect())
}

/// A compiled source: the image to load (a cubin, or NUL-terminated PTX) and NVRTC's log (empty
/// when it had nothing to say: no warning).
pub(crate) struct Compiled {
    pub image: Vec<u8>,
    #[cfg_attr(not(test), allow(dead_code))]
    pub log: String,
    pub target: Target,
}

/// The options every kernel is compiled with. `MOE_CUDA_F8_CVT=0` makes sm_89+ decode F8E4M3
/// arithmetically, as older GPUs do, instead of with the hardware conversion (to compare the two,
/// or to step around the conversion path should it misbehave on a driver); `MOE_GEMV_PASS_ROWS=4`
/// gives `gemv_*` passes of 4 token rows instead of 8 (to compare).
pub(crate) fn options(target: Target) -> Vec<String> {
    // No fast math: expf, division and square roots stay IEEE-accurate (the f32 tolerance is 1e-5).
    let mut opts = vec![target.option(), "-std=c++17".into(), "-lineinfo".into()];
    if std::env::var("MOE_CUDA_F8_CVT").is_ok_and(|v| v == "0") {
        opts.push("-DMOE_F8_NO_CVT".into());
    }
    if moe_hal::gemv::pass_rows() == 4 {
        opts.push("-DGEMV_RB=4".into());
    }
    if let Some(bytes) = gemv_prefetch() {
        opts.push(format!("-DGEMV_PREFETCH={bytes}"));
    }
    opts
}

/// `MOE_CUDA_GEMV_PREFETCH=B`: the decode kernels prefetch their weights into L2 `B` bytes ahead
/// (a positive multiple of 512; see `GEMV_PREFETCH` in grouped_gemm.cu); unset or 0: no prefetch.
pub(crate) fn gemv_prefetch() -> Option<u32> {
    let bytes = std::env::var("MOE_CUDA_GEMV_PREFETCH").ok()?.trim().parse::<u32>().ok()?;
    (bytes > 0 && bytes % 512 == 0).then_some(bytes)
}

/// Compiles one source for `target` with [`options`] plus `extra`. A compile error is
/// [`Error::Driver`] carrying NVRTC's log.
pub(crate) fn compile(source: Source, target: Target, extra: &[&str]) -> Result<Compiled> {
    crate::driver::nvrtc_library().map_err(Error::Unavailable)?;
    let src = CString::new(source.text()).map_err(|_| Error::Driver(format!("{} holds a NUL byte", source.file())))?;
    let name = CString::new(source.file()).unwrap_or_default();
    let prog = nr::create_program(&src, Some(&name)).map_err(|e| nvrtc_err("nvrtcCreateProgram", e))?;
    let mut opts = options(target);
    opts.extend(extra.iter().map(|s| s.to_string()));
    // SAFETY: `prog` is a live program, destroyed below on every path.
    let compiled = unsafe { nr::compile_program(prog, &opts) };
    let log = unsafe { nr::get_program_log(prog) }
        .map(|l| {
            let bytes: Vec<u8> = l.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect();
            String::from_utf8_lossy(&bytes).trim().to_string()
        })
        .unwrap_or_default();
    let image = match compiled {
        Err(e) => {
            Err(Error::Driver(format!("NVRTC could not compile {} for {target} ({:?}); options {opts:?}:\n{log}", source.file(), e.0)))
        }
        Ok(()) => match target {
            Target::Ptx(_) => {
                unsafe { nr::get_ptx(prog) }.map(|p| p.into_iter().map(|c| c as u8).collect()).map_err(|e| nvrtc_err("nvrtcGetPTX", e))
            }
            Target::Cubin(_) => unsafe { cubin(prog) },
        },
    };
    // SAFETY: destroys the program created above, once.
    let _ = unsafe { nr::destroy_program(prog) };
    Ok(Compiled { image: image?, log, target })
}

/// # Safety
/// `prog` must be a compiled program.
unsafe fn cubin(prog: ns::nvrtcProgram) -> Result<Vec<u8>> {
    let mut size = 0usize;
    unsafe { ns::nvrtcGetCUBINSize(prog, &mut size) }.result().map_err(|e| nvrtc_err("nvrtcGetCUBINSize", e))?;
    if size == 0 {
        return Err(Error::Driver("NVRTC produced an empty cubin".into()));
    }
    let mut buf = vec![0u8; size];
    unsafe { ns::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }.result().map_err(|e| nvrtc_err("nvrtcGetCUBIN", e))?;
    Ok(buf)
}

// ---------------------------------------------------------------------------------------------
// Modules and launches
// ---------------------------------------------------------------------------------------------

/// A loaded module and the functions taken from it.
pub(crate) struct Module {
    raw: ds::CUmodule,
    funcs: Mutex<std::collections::HashMap<&'static str, Func>>,
}

// SAFETY: module and function handles are plain driver handles, usable from any thread with the
// context current.
unsafe impl Send for Module {}
unsafe impl Sync for Module {}

/// A kernel handle.
#[derive(Clone, Copy)]
pub(crate) struct Func(ds::CUfunction);

// SAFETY: as for Module.
unsafe impl Send for Func {}
unsafe impl Sync for Func {}

impl Module {
    /// Unloads the module (the device is being dropped).
    pub fn unload(&self) {
        // SAFETY: called once, from Device::drop, after the stream has drained.
        let _ = unsafe { dr::module::unload(self.raw) };
    }
}

impl Device {
    /// The module of `source`, compiled and loaded on first use.
    pub(crate) fn module(&self, source: Source) -> Result<Arc<Module>> {
        // Before the lock: a thread waiting here for another thread's capture to end must not
        // hold the lock that capture's launches take.
        let _slot = self.ready()?;
        let mut map = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = map.get(&source) {
            return Ok(m.clone());
        }
        let m = Arc::new(self.load_module(source)?);
        map.insert(source, m.clone());
        Ok(m)
    }

    fn load_module(&self, source: Source) -> Result<Module> {
        let load_image = |image: &[u8]| -> std::result::Result<ds::CUmodule, dr::DriverError> {
            // SAFETY: the image is a cubin or NUL-terminated PTX from NVRTC (or the disk cache,
            // which holds only images NVRTC made and this driver loaded, checksummed).
            unsafe { dr::module::load_data(image.as_ptr() as *const c_void) }
        };
        let load = |c: &Compiled| load_image(&c.image);
        // An image compiled and loaded before, by this or an earlier process: no NVRTC.
        let cached = nvrtc_version().ok().and_then(|v| crate::cache::Entry::new(source, self.target, &options(self.target), v));
        if let Some(entry) = &cached
            && let Some(image) = entry.load()
        {
            match load_image(&image) {
                Ok(raw) => return Ok(Module { raw, funcs: Default::default() }),
                // Out of memory, or a context already lost: no fault of the image, which stays.
                Err(e) if !matches!(crate::driver::map_err("", e), Error::Driver(_)) => {
                    return Err(self.fail(&format!("cuModuleLoadData({})", source.file()), e));
                }
                // Refused (a driver changed under the cache): compile afresh below.
                Err(_) => entry.forget(),
            }
        }
        let first = compile(source, self.target, &[])?;
        match load(&first) {
            Ok(raw) => {
                if let Some(entry) = &cached {
                    entry.store(&first.image);
                }
                Ok(Module { raw, funcs: Default::default() })
            }
            // A cubin the driver refuses (a driver older than the cubin's format): try PTX, which the
            // driver compiles itself, before giving up.
            Err(e) if matches!(first.target, Target::Cubin(_)) && !matches!(e.0, ds::CUresult::CUDA_ERROR_OUT_OF_MEMORY) => {
                let ptx = compile(source, Target::Ptx(self.target.arch()), &[])?;
                match load(&ptx) {
                    Ok(raw) => Ok(Module { raw, funcs: Default::default() }),
                    Err(e2) if !matches!(crate::driver::map_err("", e2), Error::Driver(_)) => {
                        Err(self.fail(&format!("cuModuleLoadData({} as PTX)", source.file()), e2))
                    }
                    Err(e2) => Err(Error::Driver(format!(
                        "cannot load {} on {}: the {} gave {:?}, the PTX gave {:?}",
                        source.file(),
                        self.facts.name,
                        first.target,
                        e.0,
                        e2.0
                    ))),
                }
            }
            Err(e) => Err(self.fail(&format!("cuModuleLoadData({})", source.file()), e)),
        }
    }

    /// The kernel `entry` of `source`.
    pub(crate) fn func(&self, source: Source, entry: &'static str) -> Result<Func> {
        let m = self.module(source)?;
        let mut funcs = m.funcs.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = funcs.get(entry) {
            return Ok(*f);
        }
        let name = CString::new(entry).unwrap_or_default();
        // SAFETY: the module is loaded.
        let raw = unsafe { dr::module::get_function(m.raw, name) };
        let f = Func(self.check(&format!("cuModuleGetFunction({entry})"), raw)?);
        funcs.insert(entry, f);
        Ok(f)
    }

    /// Enqueues one launch of `entry` on the stream: `grid` blocks of `block` threads with `smem`
    /// bytes of dynamic shared memory. The kernel's parameters are the 64-byte parameter block
    /// `params` (each kernel reads it as its own struct of 16 32-bit fields), then `ptrs`, device
    /// pointers, in order.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch(
        &self,
        source: Source,
        entry: &'static str,
        grid: u32,
        block: u32,
        smem: u32,
        params: &[u32; 16],
        ptrs: &[u64],
    ) -> Result<()> {
        if self.emu.is_some() {
            let _slot = self.ready()?;
            let name = CString::new(entry).unwrap_or_default();
            let step = || Some(crate::graph::Step::Launch { entry: name.clone(), grid, block, smem, params: *params, ptrs: ptrs.to_vec() });
            if self.note(ptrs, step).is_some() {
                return Ok(());
            }
            return self.emu_launch(&name, grid, block, smem, params, ptrs);
        }
        // Waits out another thread's capture (so the note below belongs to this thread's, if
        // any), then holds off new ones until the launch is enqueued.
        let _slot = self.ready()?;
        let f = self.func(source, entry)?;
        // In a capture, the driver records the launch; the graph keeps `ptrs` allocated.
        self.note(ptrs, || None);
        let mut p = *params;
        let mut ptrs = ptrs.to_vec();
        let mut args: Vec<*mut c_void> = Vec::with_capacity(1 + ptrs.len());
        args.push(&mut p as *mut [u32; 16] as *mut c_void);
        for q in ptrs.iter_mut() {
            args.push(q as *mut u64 as *mut c_void);
        }
        // SAFETY: the arguments match the kernel's signature (checked by the NVRTC test and the
        // conformance suite); cuLaunchKernel copies them before it returns.
        let r = unsafe { dr::launch_kernel(f.0, (grid.max(1), 1, 1), (block, 1, 1), smem, self.stream, &mut args) };
        self.check(&format!("cuLaunchKernel({entry}, {grid} x {block})"), r)
    }

    /// Runs one launch on the emulator, whole, before returning.
    pub(crate) fn emu_launch(&self, entry: &CStr, grid: u32, block: u32, smem: u32, params: &[u32; 16], ptrs: &[u64]) -> Result<()> {
        let Some(emu) = &self.emu else {
            return Err(Error::Driver("emu_launch on a GPU".into()));
        };
        // SAFETY: the emulator reads `params` (16 words) and `ptrs` (`ptrs.len()` words) during
        // the call and runs the whole launch before returning.
        let r = unsafe { (emu.launch)(entry.as_ptr(), grid.max(1), block, smem, params.as_ptr(), ptrs.as_ptr(), ptrs.len() as i32) };
        if r == 0 { Ok(()) } else { Err(Error::Driver(format!("the emulator could not launch {} (code {r})", entry.to_string_lossy()))) }
    }
}
