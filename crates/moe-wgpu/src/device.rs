//! Adapter choice, device creation, what the backend reports about itself, and errors: the
//! uncaptured-error handler, device loss, and the device error flags kernels raise.

use std::sync::{Arc, Mutex};

use moe_hal::{BackendInfo, Error, Result};

/// Ranks an adapter: discrete before integrated before virtual before CPU; a native API (Vulkan,
/// Metal, DX12) before GL. Lower is better.
fn rank(info: &wgpu::AdapterInfo) -> (u32, u32) {
    let ty = match info.device_type {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Cpu => 3,
        wgpu::DeviceType::Other => 4,
    };
    let api = match info.backend {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    };
    (ty, api)
}

/// The adapters of an instance on `backends` that can run compute shaders, best first.
fn adapters(backends: wgpu::Backends) -> Vec<(wgpu::Instance, wgpu::Adapter)> {
    // WGPU_VALIDATION, WGPU_DEBUG and friends override the build defaults (validation in debug builds).
    let mut desc = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
    desc.backends = backends;
    let instance = wgpu::Instance::new(desc);
    let mut found = pollster::block_on(instance.enumerate_adapters(backends));
    // Compute shaders with storage buffers are all we need; GL adapters without them are skipped.
    found.retain(|a| a.get_downlevel_capabilities().flags.contains(wgpu::DownlevelFlags::COMPUTE_SHADERS));
    found.sort_by_key(|a| rank(&a.get_info()));
    found.into_iter().map(|a| (instance.clone(), a)).collect()
}

/// The adapter a [`crate::WgpuBackend`] would use, or a sentence saying why there is none: the
/// best of the native APIs (Vulkan, Metal, DX12; see [`rank`]), GL only when none has one, or
/// exactly the APIs `WGPU_BACKEND` names.
pub(crate) fn best_adapter() -> std::result::Result<(wgpu::Instance, wgpu::Adapter), String> {
    let tries = match wgpu::Backends::from_env() {
        Some(b) if b.is_empty() => {
            let v = std::env::var("WGPU_BACKEND").unwrap_or_default();
            return Err(format!("WGPU_BACKEND={v:?} names no graphics API; use vulkan, metal, dx12 or gl (comma separated), or unset it"));
        }
        Some(b) => vec![b],
        None => vec![wgpu::Backends::PRIMARY, wgpu::Backends::GL],
    };
    for backends in tries {
        if let Some(best) = adapters(backends).into_iter().next() {
            return Ok(best);
        }
    }
    Err("no wgpu adapter with compute shaders was found (no Vulkan, Metal, DX12 or GL driver; \
         on Linux without a GPU, install Mesa's lavapipe, e.g. mesa-vulkan-drivers)"
        .into())
}

/// What the kernels need of an adapter beyond compute shaders: 256 invocations per workgroup
/// (along x), 16 KiB of workgroup memory (the decode kernel's partial sums), 7 storage buffers in
/// one kernel (grouped_gemm, permute). WebGPU's defaults give all three; a GL ES 3.1 adapter at
/// its minimums (128 invocations, 4 storage blocks) does not, and would fail at every op.
/// `adapter` names it in the error.
pub(crate) fn check_limits(adapter: &str, l: &wgpu::Limits) -> std::result::Result<(), String> {
    let needs = [
        ("invocations per workgroup", l.max_compute_invocations_per_workgroup, 256),
        ("workgroup size along x", l.max_compute_workgroup_size_x, 256),
        ("bytes of workgroup memory", l.max_compute_workgroup_storage_size, 16384),
        ("storage buffers per kernel", l.max_storage_buffers_per_shader_stage, 7),
    ];
    match needs.iter().find(|(_, has, need)| has < need) {
        Some((what, has, need)) => Err(format!("{adapter} allows {has} {what}; the kernels need {need}")),
        None => Ok(()),
    }
}

/// `"<adapter name> (<API>)"`, e.g. `"llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan)"`.
pub(crate) fn describe(info: &wgpu::AdapterInfo) -> String {
    let api = match info.backend {
        wgpu::Backend::Vulkan => "Vulkan",
        wgpu::Backend::Metal => "Metal",
        wgpu::Backend::Dx12 => "Dx12",
        wgpu::Backend::Gl => "Gl",
        wgpu::Backend::BrowserWebGpu => "WebGPU",
        wgpu::Backend::Noop => "no-op",
    };
    format!("{} ({api})", info.name)
}

/// The largest device-local Vulkan memory heap, when the adapter is a Vulkan one.
pub(crate) fn vulkan_device_local_bytes(adapter: &wgpu::Adapter) -> Option<u64> {
    // SAFETY: the hal adapter is only read (one query of memory properties on its own physical
    // device with its own instance); nothing is created or destroyed through it.
    unsafe {
        let hal = adapter.as_hal::<wgpu::hal::api::Vulkan>()?;
        let props = hal.shared_instance().raw_instance().get_physical_device_memory_properties(hal.raw_physical_device());
        let n = (props.memory_heap_count as usize).min(props.memory_heaps.len());
        props.memory_heaps[..n]
            .iter()
            .filter(|h| h.flags.as_raw() & 1 != 0) // VK_MEMORY_HEAP_DEVICE_LOCAL_BIT
            .map(|h| h.size)
            .max()
    }
}

/// Memory the backend may allocate: host memory for a CPU adapter (lavapipe, WARP) or when the
/// API reports nothing; the largest device-local heap on Vulkan. wgpu has no portable query, so on
/// Metal and DX12 this is host memory as well (right for Apple's unified memory, an overestimate
/// for a discrete DX12 GPU).
pub(crate) fn memory_bytes(adapter: &wgpu::Adapter) -> u64 {
    let info = adapter.get_info();
    if info.device_type == wgpu::DeviceType::Cpu {
        return moe_hal::host::memory_bytes();
    }
    vulkan_device_local_bytes(adapter).unwrap_or_else(moe_hal::host::memory_bytes)
}

/// Whether [`memory_bytes`] is the host's memory, which a layer uploaded from the host then
/// occupies twice: a software adapter's, and an integrated GPU's where no device-local heap was
/// reported (Apple silicon on Metal). Not an integrated GPU whose Vulkan heap is a carve-out of
/// its own, nor a discrete GPU whose size was not reported.
fn shares_host_memory(adapter: &wgpu::Adapter) -> bool {
    match adapter.get_info().device_type {
        wgpu::DeviceType::Cpu => true,
        wgpu::DeviceType::IntegratedGpu => vulkan_device_local_bytes(adapter).is_none(),
        _ => false,
    }
}

/// What the adapter offers that matters to this backend, for [`BackendInfo::features`]: the
/// storage dtypes, `software-adapter` for a CPU adapter (lavapipe, WARP), `shader-f16`,
/// `subgroup <size or range>`, and one `cooperative-matrix MxNxK ab->cr` per configuration. Only
/// the dtypes are used by the kernels today; the rest says what a faster path could use.
pub(crate) fn feature_list(adapter: &wgpu::Adapter) -> Vec<String> {
    let f = adapter.features();
    let info = adapter.get_info();
    let mut out = vec!["f32".to_string(), "f16".into(), "bf16".into(), "f8_e4m3 (block scales)".into()];
    // A software rasteriser (lavapipe, WARP): `moe --backend auto` prefers the CPU backend then.
    if info.device_type == wgpu::DeviceType::Cpu {
        out.push("software-adapter".into());
    }
    if f.contains(wgpu::Features::SHADER_F16) {
        out.push("shader-f16".into());
    }
    if f.contains(wgpu::Features::SUBGROUP) {
        if info.subgroup_min_size == info.subgroup_max_size {
            out.push(format!("subgroup {}", info.subgroup_min_size));
        } else {
            out.push(format!("subgroup {}-{}", info.subgroup_min_size, info.subgroup_max_size));
        }
    }
    if f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX) {
        for c in adapter.cooperative_matrix_properties() {
            out.push(format!("cooperative-matrix {}x{}x{} {:?}->{:?}", c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type));
        }
    }
    out
}

/// The features `tiled_coop` (grouped_gemm on cooperative matrices) needs from the device.
pub(crate) const COOP_FEATURES: wgpu::Features =
    wgpu::Features::SHADER_F16.union(wgpu::Features::SUBGROUP).union(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);

/// Workgroup memory `tiled_coop` declares (`ca`, `cl`, `cb`: 2048 f16 each; `cc`: 4096 f32).
const COOP_WORKGROUP_BYTES: u32 = 3 * 2048 * 2 + 4096 * 4;

/// The cooperative-matrix size `tiled_coop` can use on `adapter`: the largest square f16 x f16 ->
/// f32 configuration of size 8 or 16, when the adapter has [`COOP_FEATURES`], 28 KiB of workgroup
/// memory (`tiled_coop` declares 3 x 4 KiB of f16 staging and a 16 KiB f32 tile), and enough subgroups in 128 invocations for 4 coop tiles each to cover a 64 x 64 tile
/// (16: subgroups of at most 32; 8: of at most 8).
pub(crate) fn coop_size(adapter: &wgpu::Adapter) -> Option<u32> {
    if !adapter.features().contains(COOP_FEATURES) || adapter.limits().max_compute_workgroup_storage_size < COOP_WORKGROUP_BYTES {
        return None;
    }
    let sg_max = adapter.get_info().subgroup_max_size.max(1);
    let f16 = wgpu::CooperativeScalarType::F16;
    let f32 = wgpu::CooperativeScalarType::F32;
    adapter
        .cooperative_matrix_properties()
        .iter()
        .filter(|c| c.ab_type == f16 && c.cr_type == f32 && c.m_size == c.n_size && c.n_size == c.k_size)
        .map(|c| c.m_size)
        .filter(|&s| (s == 8 || s == 16) && 4 * (128 / sg_max) >= (64 / s) * (64 / s))
        .max()
}

/// The subgroup size when the adapter has subgroups: the fixed size, or the largest of its range.
pub(crate) fn subgroup_size(adapter: &wgpu::Adapter) -> Option<u32> {
    if !adapter.features().contains(wgpu::Features::SUBGROUP) {
        return None;
    }
    let info = adapter.get_info();
    (info.subgroup_max_size > 0).then_some(info.subgroup_max_size)
}

/// Everything that has gone wrong on the device so far, shared with wgpu's callbacks.
#[derive(Default)]
pub(crate) struct Faults {
    /// Errors wgpu raised outside an error scope (validation, out of memory, internal), oldest first.
    pub errors: Mutex<Vec<Error>>,
    /// Set once the device is lost.
    pub lost: Mutex<Option<String>>,
}

impl Faults {
    /// Installs the handlers on `device`: errors are recorded (never a panic) and reported by the
    /// next op, `synchronize` or `download`.
    pub fn install(self: &Arc<Self>, device: &wgpu::Device) {
        let me = self.clone();
        device.on_uncaptured_error(Arc::new(move |e: wgpu::Error| {
            me.errors.lock().unwrap_or_else(|p| p.into_inner()).push(map_error(e));
        }));
        let me = self.clone();
        device.set_device_lost_callback(move |reason, msg| {
            if reason != wgpu::DeviceLostReason::Destroyed {
                *me.lost.lock().unwrap_or_else(|p| p.into_inner()) = Some(msg);
            }
        });
    }

    /// The first recorded failure, if any (and forgets the others: one call, one report).
    pub fn take(&self) -> Result<()> {
        if let Some(msg) = self.lost.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            return Err(Error::DeviceLost(format!("the wgpu device was lost: {msg}")));
        }
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        if errors.is_empty() {
            return Ok(());
        }
        let first = errors.remove(0);
        errors.clear();
        Err(first)
    }
}

/// A wgpu error as a moe-hal error: out of memory stays out of memory, everything else is a
/// driver error with wgpu's description.
pub(crate) fn map_error(e: wgpu::Error) -> Error {
    match e {
        wgpu::Error::OutOfMemory { .. } => Error::OutOfMemory("the wgpu device is out of memory".into()),
        wgpu::Error::Validation { description, .. } => Error::Driver(format!("wgpu validation error: {description}")),
        wgpu::Error::Internal { description, .. } => Error::Driver(format!("wgpu internal error: {description}")),
    }
}

/// Words of the device error-flag buffer (`errs`); the layout is [`moe_hal::flags`].
pub(crate) const ERR_WORDS: usize = moe_hal::flags::WORDS;

/// Builds the [`BackendInfo`] of an adapter.
pub(crate) fn backend_info(adapter: &wgpu::Adapter, limits: &wgpu::Limits) -> BackendInfo {
    BackendInfo {
        name: "wgpu".into(),
        device: describe(&adapter.get_info()),
        memory_bytes: memory_bytes(adapter),
        shares_host_memory: shares_host_memory(adapter),
        max_buffer_bytes: limits.max_buffer_size,
        subgroup_size: subgroup_size(adapter),
        features: feature_list(adapter),
    }
}
