//! The CUDA driver: finding its libraries, one device with its context, stream and memory pool,
//! error mapping, and the device error flags kernels raise.
//!
//! Everything goes through cudarc's thin `result`/`sys` layers (one call, one `Result`), so every
//! driver call is checked here and mapped onto [`moe_hal::Error`] in one place ([`map_err`]).

use std::collections::HashMap;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::result::{self, DriverError};
use cudarc::driver::sys::{self, CUresult};
use moe_hal::{Error, Result};

use crate::graph::{Enqueue, Free, Gate, GraphRefs, Step};
use crate::kernels::{Module, Source, Target};

// ---------------------------------------------------------------------------------------------
// Libraries
// ---------------------------------------------------------------------------------------------

/// Folders where a CUDA toolkit or NVIDIA's Python wheels keep `libnvrtc.so.*`, best first, for
/// when the dynamic loader alone cannot find it (`LD_LIBRARY_PATH` unset).
fn nvrtc_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(p) = std::env::var_os("MOE_NVRTC_LIB") {
        let p = PathBuf::from(p);
        dirs.push(if p.is_file() { p.parent().map(Path::to_path_buf).unwrap_or_default() } else { p });
    }
    for var in ["CUDA_HOME", "CUDA_PATH", "CUDA_ROOT", "CUDA_TOOLKIT_ROOT_DIR"] {
        if let Some(root) = std::env::var_os(var) {
            let root = PathBuf::from(root);
            dirs.push(root.join("lib64"));
            dirs.push(root.join("lib"));
            dirs.push(root.join("targets/x86_64-linux/lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    dirs.push("/usr/local/cuda/targets/x86_64-linux/lib".into());
    dirs.push("/usr/local/cuda/lib".into());
    if let Ok(rd) = std::fs::read_dir("/usr/local") {
        let mut more: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("cuda-")))
            .collect();
        more.sort();
        more.reverse();
        for root in more {
            dirs.push(root.join("lib64"));
            dirs.push(root.join("targets/x86_64-linux/lib"));
        }
    }
    // NVIDIA's wheels (nvidia-cuda-nvrtc for CUDA 13, nvidia-cuda-nvrtc-cu12 for CUDA 12), in
    // every Python environment we can name: the active virtualenv, PyTorch's image venv, the
    // system and user site-packages.
    let mut prefixes: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV") {
        prefixes.push(PathBuf::from(v).join("lib"));
    }
    if let Some(v) = std::env::var_os("CONDA_PREFIX") {
        prefixes.push(PathBuf::from(v).join("lib"));
    }
    prefixes.push("/opt/torch/.venv/lib".into());
    prefixes.push("/usr/local/lib".into());
    prefixes.push("/usr/lib".into());
    if let Some(home) = std::env::var_os("HOME") {
        prefixes.push(PathBuf::from(&home).join(".local/lib"));
        let pyenv = PathBuf::from(&home).join(".pyenv/versions");
        if let Ok(rd) = std::fs::read_dir(&pyenv) {
            prefixes.extend(rd.flatten().map(|e| e.path().join("lib")));
        }
    }
    for prefix in prefixes {
        let Ok(rd) = std::fs::read_dir(&prefix) else { continue };
        let mut pys: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("python3")))
            .collect();
        pys.sort();
        pys.reverse();
        for py in pys {
            for site in ["site-packages", "dist-packages"] {
                dirs.push(py.join(site).join("nvidia/cu13/lib"));
                dirs.push(py.join(site).join("nvidia/cuda_nvrtc/lib"));
            }
        }
    }
    dirs
}

/// Loads `path` and keeps it loaded for the life of the process, so that cudarc's own `dlopen`
/// of the library's soname (`libnvrtc.so.13`, ..) finds it already in the process.
fn preload(path: &Path) -> bool {
    // SAFETY: loading NVIDIA's shared library runs only its initialisers; the handle is leaked on
    // purpose so the library stays loaded.
    match unsafe { libloading::Library::new(path) } {
        Ok(lib) => {
            std::mem::forget(lib);
            true
        }
        Err(_) => false,
    }
}

/// Finds NVRTC once per process: `Ok(where)` or `Err(why not)`. First the dynamic loader's own
/// search (`LD_LIBRARY_PATH`, the ld.so cache), then the folders of [`nvrtc_dirs`] (a library
/// found there is loaded by its full path; NVRTC then finds its `libnvrtc-builtins` beside it).
pub(crate) fn nvrtc_library() -> std::result::Result<String, String> {
    static FOUND: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let probe = || {
                // SAFETY: only tries to load the library by name.
                if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                    return Ok("found by the dynamic loader".to_string());
                }
                let names = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"];
                for dir in nvrtc_dirs() {
                    for name in names {
                        let path = dir.join(name);
                        // SAFETY: as above.
                        if path.is_file() && preload(&path) && unsafe { cudarc::nvrtc::sys::is_culib_present() } {
                            return Ok(path.display().to_string());
                        }
                    }
                }
                Err("NVRTC (libnvrtc.so.13 or .12) was not found: install the CUDA toolkit, or \
                     `pip install nvidia-cuda-nvrtc` (CUDA 13), or put the folder holding \
                     libnvrtc.so.* on LD_LIBRARY_PATH or in MOE_NVRTC_LIB"
                    .to_string())
            };
            moe_hal::catch_panic(probe).unwrap_or_else(|p| Err(format!("loading NVRTC panicked: {p}")))
        })
        .clone()
}

/// Finds the CUDA driver library (`libcuda.so.1`) once per process: the dynamic loader's search,
/// then the folders NVIDIA's container runtime and distributions use.
pub(crate) fn driver_library() -> std::result::Result<(), String> {
    static FOUND: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let probe = || {
                // SAFETY: only tries to load the library by name.
                if unsafe { sys::is_culib_present() } {
                    return Ok(());
                }
                for dir in
                    ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib/wsl/lib"]
                {
                    let path = Path::new(dir).join("libcuda.so.1");
                    // SAFETY: as above.
                    if path.is_file() && preload(&path) && unsafe { sys::is_culib_present() } {
                        return Ok(());
                    }
                }
                Err("no CUDA driver (libcuda) on this machine".to_string())
            };
            moe_hal::catch_panic(probe).unwrap_or_else(|p| Err(format!("loading the CUDA driver panicked: {p}")))
        })
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

/// Whether a driver error leaves the context unusable (CUDA's "sticky" errors).
fn is_sticky(e: CUresult) -> bool {
    // Fully qualified: a misspelt variant must not compile into a catch-all binding.
    matches!(
        e,
        CUresult::CUDA_ERROR_ILLEGAL_ADDRESS
            | CUresult::CUDA_ERROR_LAUNCH_FAILED
            | CUresult::CUDA_ERROR_HARDWARE_STACK_ERROR
            | CUresult::CUDA_ERROR_ILLEGAL_INSTRUCTION
            | CUresult::CUDA_ERROR_MISALIGNED_ADDRESS
            | CUresult::CUDA_ERROR_INVALID_ADDRESS_SPACE
            | CUresult::CUDA_ERROR_INVALID_PC
            | CUresult::CUDA_ERROR_ECC_UNCORRECTABLE
            | CUresult::CUDA_ERROR_ASSERT
            | CUresult::CUDA_ERROR_LAUNCH_TIMEOUT
            | CUresult::CUDA_ERROR_CONTEXT_IS_DESTROYED
            | CUresult::CUDA_ERROR_EXTERNAL_DEVICE
            | CUresult::CUDA_ERROR_DEVICE_UNAVAILABLE
    )
}

/// A driver error as a moe-hal error, naming the call (`what`) and CUDA's error name:
/// out of memory is [`Error::OutOfMemory`]; errors that leave the context unusable (an illegal
/// address, a failed launch, ..) are [`Error::DeviceLost`]; no device or an unusable driver is
/// [`Error::Unavailable`]; everything else is [`Error::Driver`].
pub(crate) fn map_err(what: &str, e: DriverError) -> Error {
    let text = e.error_string().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let msg = if text.is_empty() { format!("{what}: {:?}", e.0) } else { format!("{what}: {:?} ({text})", e.0) };
    match e.0 {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => Error::OutOfMemory(msg),
        CUresult::CUDA_ERROR_NO_DEVICE
        | CUresult::CUDA_ERROR_STUB_LIBRARY
        | CUresult::CUDA_ERROR_SYSTEM_DRIVER_MISMATCH
        | CUresult::CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE
        | CUresult::CUDA_ERROR_NOT_INITIALIZED
        | CUresult::CUDA_ERROR_DEINITIALIZED => Error::Unavailable(msg),
        e if is_sticky(e) => Error::DeviceLost(format!("{msg}; the CUDA context cannot be used any more")),
        _ => Error::Driver(msg),
    }
}

// ---------------------------------------------------------------------------------------------
// Device error flags
// ---------------------------------------------------------------------------------------------

/// Words of the device error-flag buffer; the layout is [`moe_hal::flags`].
pub(crate) const ERR_WORDS: usize = moe_hal::flags::WORDS;

// ---------------------------------------------------------------------------------------------
// The device
// ---------------------------------------------------------------------------------------------

/// What the driver says about a device, without creating a context.
pub(crate) struct DeviceFacts {
    pub ordinal: i32,
    pub name: String,
    /// Compute capability, e.g. 90 for sm_90.
    pub cc: u32,
    pub sms: u32,
    pub total_mem: usize,
    pub l2_bytes: u32,
    pub memory_pools: bool,
    pub driver_version: i32,
}

/// `cuInit`, then the facts of device `ordinal` (the `MOE_CUDA_DEVICE` variable, default 0).
pub(crate) fn device_facts() -> Result<DeviceFacts> {
    driver_library().map_err(Error::Unavailable)?;
    result::init().map_err(|e| map_err("cuInit", e))?;
    let count = result::device::get_count().map_err(|e| map_err("cuDeviceGetCount", e))?;
    if count <= 0 {
        return Err(Error::Unavailable("the CUDA driver sees no device".into()));
    }
    let ordinal = match std::env::var("MOE_CUDA_DEVICE") {
        Ok(s) => s.trim().parse::<i32>().map_err(|_| Error::InvalidArgument(format!("MOE_CUDA_DEVICE={s:?} is not a device number")))?,
        Err(_) => 0,
    };
    if ordinal < 0 || ordinal >= count {
        return Err(Error::Unavailable(format!("MOE_CUDA_DEVICE={ordinal} but the driver sees {count} device(s)")));
    }
    let dev = result::device::get(ordinal).map_err(|e| map_err("cuDeviceGet", e))?;
    let name = result::device::get_name(dev).map_err(|e| map_err("cuDeviceGetName", e))?;
    let attr = |a: sys::CUdevice_attribute, what: &str| {
        // SAFETY: `dev` is a valid device handle from cuDeviceGet.
        unsafe { result::device::get_attribute(dev, a) }.map_err(|e| map_err(what, e))
    };
    use sys::CUdevice_attribute::*;
    let major = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, "cuDeviceGetAttribute(compute capability)")?;
    let minor = attr(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, "cuDeviceGetAttribute(compute capability)")?;
    let sms = attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "cuDeviceGetAttribute(multiprocessors)")?;
    let l2 = attr(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, "cuDeviceGetAttribute(L2 size)")?;
    let pools = attr(CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED, "cuDeviceGetAttribute(memory pools)")?;
    // SAFETY: as above.
    let total_mem = unsafe { result::device::total_mem(dev) }.map_err(|e| map_err("cuDeviceTotalMem", e))?;
    let mut driver_version = 0i32;
    // SAFETY: writes one int.
    unsafe { sys::cuDriverGetVersion(&mut driver_version) }.result().map_err(|e| map_err("cuDriverGetVersion", e))?;
    Ok(DeviceFacts {
        ordinal,
        name,
        cc: (major * 10 + minor).max(0) as u32,
        sms: sms.max(1) as u32,
        total_mem,
        l2_bytes: l2.max(0) as u32,
        memory_pools: pools > 0,
        driver_version,
    })
}

/// One CUDA device as the backend uses it: its primary context, one non-blocking stream that
/// every op, copy and allocation is ordered on, the device's memory pool (stream-ordered
/// allocation, so freeing scratch inside `forward` never synchronises), the error flags, the
/// compiled modules, and the first fatal error seen.
pub(crate) struct Device {
    pub facts: DeviceFacts,
    dev: sys::CUdevice,
    ctx: sys::CUcontext,
    pub stream: sys::CUstream,
    pool: Option<sys::CUmemoryPool>,
    /// The device error flags ([`ERR_WORDS`] u32).
    pub errs: u64,
    /// 16 zero bytes, bound where an optional input is absent.
    pub dummy: u64,
    /// What NVRTC compiles for on this device.
    pub target: Target,
    /// NVRTC's version and where it was found, for reports.
    pub nvrtc: String,
    flag_lock: Mutex<()>,
    lost: Mutex<Option<String>>,
    pub(crate) modules: Mutex<HashMap<Source, Arc<Module>>>,
    /// The CPU emulator standing in for the GPU (tests only; see `emu/emu.h`).
    pub(crate) emu: Option<Emu>,
    /// The graph capture in progress and the calls enqueuing (`crate::graph`), and their changes
    /// signalled to the threads waiting for them.
    pub(crate) gate: Mutex<Gate>,
    pub(crate) gate_changed: std::sync::Condvar,
    /// The buffers live graphs use.
    pub(crate) graph_refs: Mutex<GraphRefs>,
    /// Allocations made with `cuMemAlloc` on a device with a pool (inside graph captures), so
    /// they are freed with `cuMemFree`, not into the pool.
    plain: Mutex<std::collections::HashSet<u64>>,
}

/// The CPU emulator of the kernels (`crates/moe-cuda/emu`): device pointers are host addresses of
/// guarded allocations, copies are `memcpy`, a launch runs the kernel's blocks one by one.
pub(crate) struct Emu {
    _lib: libloading::Library,
    pub launch: unsafe extern "C" fn(*const std::ffi::c_char, u32, u32, u32, *const u32, *const u64, i32) -> i32,
    alloc: unsafe extern "C" fn(usize) -> u64,
    free: unsafe extern "C" fn(u64),
}

// SAFETY: the raw handles are only used through the driver API, which is thread-safe once the
// context is current on the calling thread ([`Device::ready`] makes it so before every call).
unsafe impl Send for Device {}
unsafe impl Sync for Device {}

impl Device {
    /// Opens the device: context, stream, pool, flag buffer. Panics inside the driver bindings are
    /// the caller's to catch.
    pub fn open() -> Result<Device> {
        let facts = device_facts()?;
        let nvrtc_where = nvrtc_library().map_err(Error::Unavailable)?;
        let (major, minor) = crate::kernels::nvrtc_version()?;
        let target = crate::kernels::choose_target(facts.cc, &crate::kernels::nvrtc_archs()?).ok_or_else(|| {
            Error::Unsupported(format!(
                "NVRTC {major}.{minor} cannot compile for {} (sm_{}): the device is older than anything it supports",
                facts.name, facts.cc
            ))
        })?;
        let dev = result::device::get(facts.ordinal).map_err(|e| map_err("cuDeviceGet", e))?;
        // SAFETY: `dev` is valid; the primary context is released in Drop.
        let ctx = unsafe { result::primary_ctx::retain(dev) }.map_err(|e| map_err("cuDevicePrimaryCtxRetain", e))?;
        let mut device = Device {
            facts,
            dev,
            ctx,
            stream: std::ptr::null_mut(),
            pool: None,
            errs: 0,
            dummy: 0,
            target,
            nvrtc: format!("NVRTC {major}.{minor} ({nvrtc_where})"),
            flag_lock: Mutex::new(()),
            lost: Mutex::new(None),
            modules: Mutex::new(HashMap::new()),
            emu: None,
            gate: Mutex::new(Gate::default()),
            gate_changed: std::sync::Condvar::new(),
            graph_refs: Mutex::new(GraphRefs::default()),
            plain: Mutex::new(Default::default()),
        };
        device.bind()?;
        device.stream = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(|e| map_err("cuStreamCreate", e))?;
        if device.facts.memory_pools {
            // SAFETY: `dev` is valid.
            let pool = unsafe { result::device::get_default_mem_pool(dev) }.map_err(|e| map_err("cuDeviceGetDefaultMemPool", e))?;
            // Keep freed memory in the pool between synchronisations (the default, 0, hands it back
            // to the driver at every synchronize), so scratch tensors cost no driver call after the
            // first layer.
            let mut threshold: u64 = u64::MAX;
            // SAFETY: the attribute takes a u64.
            unsafe {
                result::mem_pool::set_attribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                    &mut threshold as *mut u64 as *mut c_void,
                )
            }
            .map_err(|e| map_err("cuMemPoolSetAttribute(release threshold)", e))?;
            device.pool = Some(pool);
        }
        device.errs = device.alloc_raw(ERR_WORDS * 4)?;
        device.dummy = device.alloc_raw(16)?;
        device.memset_zero(device.errs, ERR_WORDS * 4)?;
        device.memset_zero(device.dummy, 16)?;
        device.sync_stream()?;
        Ok(device)
    }

    /// A device that is the CPU emulator at `lib` (built by `crates/moe-cuda/emu/build.sh`).
    pub fn emulated(lib: &Path) -> Result<Device> {
        // SAFETY: loading our own emulator library; the symbols have the declared signatures.
        let emu = unsafe {
            let l = libloading::Library::new(lib)
                .map_err(|e| Error::Unavailable(format!("cannot load the CUDA emulator {}: {e}", lib.display())))?;
            let sym = |name: &[u8]| -> Result<*const ()> {
                l.get::<*const ()>(name)
                    .map(|s| *s)
                    .map_err(|e| Error::Unavailable(format!("the CUDA emulator {} lacks a symbol: {e}", lib.display())))
            };
            let (launch, alloc, free) = (sym(b"emu_launch\0")?, sym(b"emu_alloc\0")?, sym(b"emu_free\0")?);
            Emu {
                launch: std::mem::transmute::<
                    *const (),
                    unsafe extern "C" fn(*const std::ffi::c_char, u32, u32, u32, *const u32, *const u64, i32) -> i32,
                >(launch),
                alloc: std::mem::transmute::<*const (), unsafe extern "C" fn(usize) -> u64>(alloc),
                free: std::mem::transmute::<*const (), unsafe extern "C" fn(u64)>(free),
                _lib: l,
            }
        };
        let mut device = Device {
            facts: DeviceFacts {
                ordinal: 0,
                name: "CPU emulator of the CUDA kernels".into(),
                cc: 90,
                sms: 4,
                total_mem: 64 << 30,
                l2_bytes: 0,
                memory_pools: false,
                driver_version: 0,
            },
            dev: 0,
            ctx: std::ptr::null_mut(),
            stream: std::ptr::null_mut(),
            pool: None,
            errs: 0,
            dummy: 0,
            target: Target::Cubin(90),
            nvrtc: "no NVRTC (emulator)".into(),
            flag_lock: Mutex::new(()),
            lost: Mutex::new(None),
            modules: Mutex::new(HashMap::new()),
            emu: Some(emu),
            gate: Mutex::new(Gate::default()),
            gate_changed: std::sync::Condvar::new(),
            graph_refs: Mutex::new(GraphRefs::default()),
            plain: Mutex::new(Default::default()),
        };
        device.errs = device.alloc_raw(ERR_WORDS * 4)?;
        device.dummy = device.alloc_raw(16)?;
        device.memset_zero(device.errs, ERR_WORDS * 4)?;
        device.memset_zero(device.dummy, 16)?;
        Ok(device)
    }

    fn bind(&self) -> Result<()> {
        if self.emu.is_some() {
            return Ok(());
        }
        // SAFETY: `ctx` is a retained primary context.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(|e| map_err("cuCtxSetCurrent", e))
    }

    /// Makes the context current on this thread and fails fast once the device is lost; waits
    /// while another thread captures a graph, and holds off new captures until the returned
    /// guard drops ([`Device::enqueue`]): keep it until the driver call that enqueues.
    pub fn ready(&self) -> Result<Enqueue<'_>> {
        let slot = self.enqueue();
        if let Some(msg) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Err(Error::DeviceLost(msg.clone()));
        }
        self.bind()?;
        Ok(slot)
    }

    /// Waits for the stream and hands the memory the pool keeps (see [`Device::open`]) back to
    /// the driver, so that `cuMemAlloc` can have it (graph captures allocate with it).
    pub fn trim_pool(&self) -> Result<()> {
        let Some(pool) = self.pool else {
            return Ok(());
        };
        let _slot = self.ready()?;
        self.sync_stream()?;
        // SAFETY: the pool is the device's default pool.
        let r = unsafe { result::mem_pool::trim_to(pool, 0) };
        self.check("cuMemPoolTrimTo", r)
    }

    /// Maps a driver error and remembers a fatal one, so every later call reports it too.
    pub fn fail(&self, what: &str, e: DriverError) -> Error {
        let err = map_err(what, e);
        if let Error::DeviceLost(msg) = &err {
            let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
            if lost.is_none() {
                *lost = Some(msg.clone());
            }
        }
        err
    }

    /// Checks a driver call's result (see [`Device::fail`]).
    pub fn check<T>(&self, what: &str, r: std::result::Result<T, DriverError>) -> Result<T> {
        r.map_err(|e| self.fail(what, e))
    }

    /// Allocates at least `bytes` (rounded up to 16, never zero) on the stream: from the device's
    /// memory pool when it has one (trimmed and retried once when it is out of memory), else with
    /// `cuMemAlloc`.
    pub fn alloc_raw(&self, bytes: usize) -> Result<u64> {
        let _slot = self.ready()?;
        let size = bytes.div_ceil(16).max(1) * 16;
        if let Some(emu) = &self.emu {
            // SAFETY: the emulator's allocator.
            let p = unsafe { (emu.alloc)(size) };
            if p == 0 {
                return Err(Error::OutOfMemory(format!("the emulator cannot allocate {size} bytes")));
            }
            self.note_alloc(p, size);
            return Ok(p);
        }
        let capturing = self.capturing();
        let attempt = || match self.pool {
            // Inside a graph capture: plain memory (the capture is relaxed, see crate::graph),
            // not a graph allocation node.
            // SAFETY: plain allocation.
            Some(_) if capturing => unsafe { result::malloc_sync(size) },
            // SAFETY: the stream is ours; the memory is only used on it.
            Some(_) => unsafe { result::malloc_async(self.stream, size) },
            // SAFETY: plain allocation.
            None => unsafe { result::malloc_sync(size) },
        };
        let ptr = match (attempt(), self.pool) {
            (Err(e), Some(pool)) if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
                // Memory freed on the stream returns to the pool only once the stream reaches the
                // free: wait for it (not inside a graph capture, which cannot wait), hand unused
                // pool memory back to the driver, try again.
                if !capturing {
                    self.sync_stream()?;
                }
                // SAFETY: the pool is the device's default pool.
                let _ = unsafe { result::mem_pool::trim_to(pool, 0) };
                attempt()
            }
            (r, _) => r,
        };
        let call = if self.pool.is_some() && !capturing { "cuMemAllocAsync" } else { "cuMemAlloc" };
        let ptr = ptr.map_err(|e| match self.fail(call, e) {
            Error::OutOfMemory(_) => {
                let free = result::mem_get_info().map(|(f, _)| f).unwrap_or(0);
                Error::OutOfMemory(format!(
                    "{} cannot allocate {} MiB ({} MiB free of {} MiB)",
                    self.facts.name,
                    size >> 20,
                    free >> 20,
                    self.facts.total_mem >> 20
                ))
            }
            other => other,
        })?;
        if capturing && self.pool.is_some() {
            self.plain.lock().unwrap_or_else(|p| p.into_inner()).insert(ptr);
        }
        self.note_alloc(ptr, size);
        Ok(ptr)
    }

    /// Frees an allocation in stream order (never synchronises when the device has a pool,
    /// except for a buffer allocated inside a graph capture). Errors are dropped: a lost context
    /// has freed everything already. During a graph capture, and for a buffer a live graph uses,
    /// the free is put off (see `crate::graph`).
    pub fn free_raw(&self, ptr: u64) {
        if ptr == 0 || self.bind().is_err() {
            return;
        }
        // No capture begins between the plan and the free.
        let _slot = self.hold();
        match self.free_plan(ptr) {
            Free::Now => self.free_owned(ptr),
            // Freed when the capture ends, or with the graph.
            Free::InGraph | Free::Later => {}
        }
    }

    /// Frees an allocation now, in stream order where it came from the pool (see [`Self::free_raw`],
    /// which decides when).
    pub fn free_owned(&self, ptr: u64) {
        let _slot = self.enqueue();
        if ptr == 0 || self.bind().is_err() {
            return;
        }
        if let Some(emu) = &self.emu {
            // SAFETY: `ptr` came from the emulator's allocator and is freed once.
            unsafe { (emu.free)(ptr) };
            return;
        }
        if self.plain.lock().unwrap_or_else(|p| p.into_inner()).remove(&ptr) {
            // SAFETY: `ptr` came from cuMemAlloc and is freed once, after the stream's work
            // (cuMemFree is not stream-ordered).
            let _ = unsafe { result::stream::synchronize(self.stream).and_then(|_| result::free_sync(ptr)) };
            return;
        }
        // SAFETY: `ptr` came from alloc_raw on this device and is freed once.
        let _ = unsafe {
            match self.pool {
                Some(_) => result::free_async(ptr, self.stream),
                None => result::free_sync(ptr),
            }
        };
    }

    /// Enqueues zeroing `bytes` at `ptr` (a multiple of 4).
    pub fn memset_zero(&self, ptr: u64, bytes: usize) -> Result<()> {
        let _slot = self.enqueue();
        if self.note(&[ptr], || Some(Step::Zero { ptr, bytes })).is_some() && self.emu.is_some() {
            return Ok(());
        }
        if self.emu.is_some() {
            // SAFETY: an emulator allocation of at least `bytes` bytes.
            unsafe { std::ptr::write_bytes(ptr as *mut u8, 0, bytes) };
            return Ok(());
        }
        // SAFETY: `ptr` holds at least `bytes` bytes.
        let r = unsafe { sys::cuMemsetD32Async(ptr, 0, bytes / 4, self.stream) }.result();
        self.check("cuMemsetD32Async", r)
    }

    /// Enqueues a host-to-device copy; `host` may be dropped or reused as soon as it returns
    /// (pageable memory is staged by the driver before the call returns; for page-locked memory
    /// the call waits for the copy).
    pub fn upload_raw(&self, ptr: u64, host: &[u8]) -> Result<()> {
        let _slot = self.enqueue();
        if self.capturing() {
            return Err(Device::not_in_capture("an upload from host memory"));
        }
        if host.is_empty() {
            return Ok(());
        }
        if self.emu.is_some() {
            // SAFETY: an emulator allocation of at least `host.len()` bytes.
            unsafe { std::ptr::copy_nonoverlapping(host.as_ptr(), ptr as *mut u8, host.len()) };
            return Ok(());
        }
        // SAFETY: `ptr` holds at least `host.len()` bytes.
        let r = unsafe { result::memcpy_htod_async(ptr, host, self.stream) };
        self.check("cuMemcpyHtoDAsync", r)?;
        // Page-locked host memory (cuMemHostRegister'd, or a pinned tensor of another library)
        // is read while the copy runs, not staged before the call returns: wait for the copy
        // then, so the caller may reuse or free `host` as soon as this returns.
        if Self::driver_knows(host) {
            self.sync_stream()?;
        }
        Ok(())
    }

    /// Whether the driver knows `host`'s memory (page-locked or managed): a pointer attribute
    /// query succeeds for those and fails for plain pageable memory.
    fn driver_knows(host: &[u8]) -> bool {
        let mut memory_type: u32 = 0;
        // SAFETY: the attribute is one unsigned int, written to `memory_type`; the query only
        // reads the address.
        let r = unsafe {
            sys::cuPointerGetAttribute(
                &mut memory_type as *mut u32 as *mut c_void,
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_MEMORY_TYPE,
                host.as_ptr() as u64,
            )
        };
        r == CUresult::CUDA_SUCCESS
    }

    /// Waits for the stream.
    pub fn sync_stream(&self) -> Result<()> {
        let _slot = self.enqueue();
        if self.capturing() {
            return Err(Device::not_in_capture("synchronize (or a download, which waits)"));
        }
        if self.emu.is_some() {
            return Ok(());
        }
        // SAFETY: the stream is ours.
        let r = unsafe { result::stream::synchronize(self.stream) };
        self.check("cuStreamSynchronize (an earlier kernel or copy failed)", r)
    }

    /// Waits for everything enqueued, reads and clears the device error flags, and returns the
    /// first failure: a fatal driver error, or a flag a kernel raised.
    pub fn check_flags(&self) -> Result<()> {
        let _slot = self.ready()?;
        // Refused before the flag lock: a capturing thread waiting for it, held by a thread
        // waiting for that capture to end, would wait forever.
        if self.capturing() {
            return Err(Device::not_in_capture("synchronize (or a download, which waits)"));
        }
        let _guard = self.flag_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.sync_stream()?;
        let mut words = [0u32; ERR_WORDS];
        if self.emu.is_some() {
            // SAFETY: `errs` holds ERR_WORDS u32.
            unsafe { std::ptr::copy_nonoverlapping(self.errs as *const u32, words.as_mut_ptr(), ERR_WORDS) };
        } else {
            // SAFETY: `errs` holds ERR_WORDS u32; the copy completes before the synchronize returns.
            let r = unsafe { result::memcpy_dtoh_async(&mut words[..], self.errs, self.stream) };
            self.check("cuMemcpyDtoHAsync(error flags)", r)?;
            self.sync_stream()?;
        }
        if words.iter().any(|&w| w != 0) {
            self.memset_zero(self.errs, ERR_WORDS * 4)?;
            self.sync_stream()?;
        }
        moe_hal::flags::decode(&words)
    }

    /// Waits for everything, checks the flags, then copies `bytes` at `ptr` into `host`.
    pub fn download_raw(&self, ptr: u64, host: &mut [u8]) -> Result<()> {
        let _slot = self.ready()?;
        self.check_flags()?;
        if host.is_empty() {
            return Ok(());
        }
        if self.emu.is_some() {
            // SAFETY: an emulator allocation of at least `host.len()` bytes.
            unsafe { std::ptr::copy_nonoverlapping(ptr as *const u8, host.as_mut_ptr(), host.len()) };
            return Ok(());
        }
        // SAFETY: `ptr` holds at least `host.len()` bytes; the synchronize below completes the copy
        // before `host` is used.
        let r = unsafe { result::memcpy_dtoh_async(host, ptr, self.stream) };
        self.check("cuMemcpyDtoHAsync", r)?;
        self.sync_stream()
    }

    /// Enqueues a device-to-device copy.
    pub fn copy_raw(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        let _slot = self.ready()?;
        if bytes == 0 {
            return Ok(());
        }
        if self.note(&[dst, src], || Some(Step::Copy { dst, src, bytes })).is_some() && self.emu.is_some() {
            return Ok(());
        }
        if self.emu.is_some() {
            // SAFETY: emulator allocations of at least `bytes` bytes each.
            unsafe { std::ptr::copy(src as *const u8, dst as *mut u8, bytes) };
            return Ok(());
        }
        // SAFETY: both hold at least `bytes` bytes.
        let r = unsafe { result::memcpy_dtod_async(dst, src, bytes, self.stream) };
        self.check("cuMemcpyDtoDAsync", r)
    }

    /// Free memory on the device now, in bytes (0 when the driver cannot say).
    pub fn free_memory(&self) -> usize {
        if self.emu.is_some() || self.bind().is_err() {
            return 0;
        }
        result::mem_get_info().map(|(f, _)| f).unwrap_or(0)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        if let Some(emu) = &self.emu {
            // SAFETY: the flag and dummy buffers came from the emulator's allocator.
            unsafe {
                (emu.free)(self.errs);
                (emu.free)(self.dummy);
            }
            return;
        }
        if self.bind().is_err() {
            return;
        }
        // SAFETY: every handle below was created by this device and is released once.
        unsafe {
            let _ = result::stream::synchronize(self.stream);
            for ptr in [self.errs, self.dummy] {
                if ptr != 0 {
                    let _ = match self.pool {
                        Some(_) => result::free_async(ptr, self.stream),
                        None => result::free_sync(ptr),
                    };
                }
            }
            let _ = result::stream::synchronize(self.stream);
            let modules = std::mem::take(&mut *self.modules.lock().unwrap_or_else(|p| p.into_inner()));
            for (_, m) in modules {
                m.unload();
            }
            if !self.stream.is_null() {
                let _ = result::stream::destroy(self.stream);
            }
            let _ = result::primary_ctx::release(self.dev);
        }
    }
}
