//! The WGSL kernels (embedded with `include_str!`), their pipelines (built on first use, cached),
//! and the helpers that record one dispatch.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use moe_hal::DType;

/// One source file per op, named as the trait method.
pub(crate) const ROUTER_TOPK: &str = include_str!("../../../shaders/wgsl/router_topk.wgsl");
pub(crate) const PERMUTE: &str = include_str!("../../../shaders/wgsl/permute.wgsl");
pub(crate) const GROUPED_GEMM: &str = include_str!("../../../shaders/wgsl/grouped_gemm.wgsl");
/// grouped_gemm's tensor-core kernel: appended to `GROUPED_GEMM` (it uses its helpers), compiled
/// only where the adapter has cooperative matrices (its syntax needs their `enable`).
pub(crate) const GROUPED_GEMM_COOP: &str = include_str!("../../../shaders/wgsl/grouped_gemm_coop.wgsl");
pub(crate) const ACTIVATION: &str = include_str!("../../../shaders/wgsl/activation.wgsl");
pub(crate) const COMBINE: &str = include_str!("../../../shaders/wgsl/combine.wgsl");

/// How a binding is declared: `U` uniform, `R` read-only storage, `W` read-write storage.
#[derive(Clone, Copy)]
pub(crate) enum Bind {
    U,
    R,
    W,
}
use Bind::{R, U, W};

/// Every kernel: its source, entry point and binding list (binding `i` is `binds[i]`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) enum Kernel {
    RouterTopk,
    PermuteRank,
    PermuteScan,
    PermuteScatter,
    GemmPrep,
    GemmTiled,
    GemmCoop,
    Gemv,
    Activation,
    Combine,
}

impl Kernel {
    fn source(self) -> String {
        let one = match self {
            Kernel::RouterTopk => ROUTER_TOPK,
            Kernel::PermuteRank | Kernel::PermuteScan | Kernel::PermuteScatter => PERMUTE,
            Kernel::GemmPrep | Kernel::GemmTiled | Kernel::Gemv => GROUPED_GEMM,
            Kernel::GemmCoop => return format!("{GROUPED_GEMM}\n{GROUPED_GEMM_COOP}"),
            Kernel::Activation => ACTIVATION,
            Kernel::Combine => COMBINE,
        };
        one.to_string()
    }

    fn entry(self) -> &'static str {
        match self {
            Kernel::PermuteRank => "rank",
            Kernel::PermuteScan => "scan_counts",
            Kernel::PermuteScatter => "scatter",
            Kernel::GemmPrep => "prep",
            Kernel::GemmTiled => "tiled",
            Kernel::GemmCoop => "tiled_coop",
            Kernel::Gemv => "gemv",
            _ => "main",
        }
    }

    pub(crate) fn binds(self) -> &'static [Bind] {
        match self {
            Kernel::RouterTopk => &[U, R, R, W, W, W],
            Kernel::PermuteRank | Kernel::PermuteScan | Kernel::PermuteScatter => &[U, R, W, W, W, W, W, W],
            Kernel::GemmPrep | Kernel::GemmTiled | Kernel::GemmCoop | Kernel::Gemv => &[U, R, R, R, R, W, W, R],
            Kernel::Activation => &[U, R, W],
            Kernel::Combine => &[U, R, R, R, R, W, W],
        }
    }
}

/// The compile-time variant of a kernel: weight dtype (and the scale block of F8E4M3 weights),
/// whether the aligned vector path applies, and for the tensor-core kernel its cooperative-matrix
/// size and whether x is split (hi + lo).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct Variant {
    pub dtype: DType,
    pub vec: bool,
    pub coop: Option<Coop>,
    /// Rows and columns of one scale block (`[1, 1]` without scales): constants in the shader,
    /// so the block index is a shift for DeepSeek's 128x128.
    pub block: [u32; 2],
}

/// The cooperative-matrix settings of `tiled_coop` (see `grouped_gemm_coop.wgsl`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct Coop {
    /// Square size of the f16 x f16 -> f32 configuration: 8 or 16.
    pub size: u32,
    /// x as two f16 parts (dense GEMMs, whose activations must stay f32-accurate).
    pub split: bool,
}

impl Variant {
    /// The variant of kernels that have no weights and no vector path.
    pub const PLAIN: Variant = Variant { dtype: DType::F32, vec: false, coop: None, block: [1, 1] };

    /// A variant for weights in `dtype` (`vec`: the aligned vector path).
    pub const fn of(dtype: DType, vec: bool) -> Variant {
        Variant { dtype, vec, coop: None, block: [1, 1] }
    }

    fn prelude(self) -> String {
        let dt = match self.dtype {
            DType::F16 => 1,
            DType::BF16 => 2,
            DType::F8E4M3 => 3,
            _ => 0,
        };
        // Directives (`enable`, `diagnostic`) must come before any declaration.
        let coop = match self.coop {
            Some(Coop { size: s, split }) => format!(
                "enable f16;\nenable wgpu_cooperative_matrix;\ndiagnostic(off, derivative_uniformity);\n\
                 const CS: u32 = {s}u;\nconst SPLIT: bool = {split};\n\
                 alias CA = coop_mat{s}x{s}<f16, A>;\nalias CB = coop_mat{s}x{s}<f16, B>;\nalias CC = coop_mat{s}x{s}<f32, C>;\n"
            ),
            None => String::new(),
        };
        let [sbn, sbk] = self.block;
        format!("{coop}const DT: u32 = {dt}u;\nconst VEC: bool = {};\nconst SBN: u32 = {sbn}u;\nconst SBK: u32 = {sbk}u;\n", self.vec)
    }
}

/// A compiled kernel.
pub(crate) struct Pipe {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
}

/// How every shader declares its parameters (binding 0 of group 0, a uniform buffer).
const UNIFORM_PARAMS: &str = "@group(0) @binding(0) var<uniform> p: Params;";

/// Pipelines, built on first use.
#[derive(Default)]
pub(crate) struct Pipelines {
    map: Mutex<HashMap<(Kernel, Variant), Arc<Pipe>>>,
    /// Parameters as immediates (push constants) instead of a uniform buffer per dispatch.
    immediates: bool,
    /// Compile with wgpu's shader runtime checks (`MOE_WGPU_CHECKED=1`,
    /// `WgpuBackend::with_shader_checks`), which a web page's untrusted shaders need and ours do
    /// not: a clamp on every workgroup- and private-array index, a guard on every integer
    /// division, a counter in every loop. Off by default; storage buffer accesses stay
    /// bounds-checked by the driver where it is robust (Vulkan's robustBufferAccess2), as with
    /// the checks on.
    checked: bool,
    /// Token rows per `gemv` pass, the shaders' `GEMV_RB`: 8, or 4 under `MOE_GEMV_PASS_ROWS=4`
    /// (what the kernel did before, kept to measure the difference on a device).
    gemv_rows: u32,
}

impl Pipelines {
    /// Pipelines whose parameters are immediates (`true`: the device has `IMMEDIATES` with at
    /// least [`PARAMS_BYTES`]) or a uniform buffer at binding 0, compiled with wgpu's shader
    /// runtime checks or without them (`checked`), with `gemv_rows` token rows per `gemv` pass.
    pub fn new(immediates: bool, checked: bool, gemv_rows: u32) -> Self {
        Pipelines { map: Default::default(), immediates, checked, gemv_rows }
    }

    /// Token rows per `gemv` pass.
    pub fn gemv_rows(&self) -> u32 {
        self.gemv_rows
    }

    /// Whether dispatches set their parameters with `set_immediates` (else: binding 0).
    pub fn immediates(&self) -> bool {
        self.immediates
    }

    /// The pipeline of `kernel` in `variant`, compiling it the first time.
    pub fn get(&self, device: &wgpu::Device, kernel: Kernel, variant: Variant) -> Arc<Pipe> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.entry((kernel, variant))
            .or_insert_with(|| {
                let label = format!("moe-wgpu {kernel:?} {variant:?}");
                let mut source = format!("{}const GEMV_RB: u32 = {}u;\n{}", variant.prelude(), self.gemv_rows, kernel.source());
                if self.immediates {
                    // The same struct, read from the dispatch's immediates: no buffer per dispatch.
                    assert!(source.contains(UNIFORM_PARAMS), "{kernel:?} declares its parameters differently");
                    source = source.replace(UNIFORM_PARAMS, "var<immediate> p: Params;");
                }
                let desc = wgpu::ShaderModuleDescriptor { label: Some(&label), source: wgpu::ShaderSource::Wgsl(source.into()) };
                let module = if self.checked {
                    device.create_shader_module(desc)
                } else {
                    // SAFETY: see `checked`: every index these kernels form is in bounds by
                    // construction (data-dependent ones are clamped in the WGSL itself), every
                    // loop is bounded, and no divisor is zero (the host dispatches nothing for
                    // an empty shape).
                    unsafe { device.create_shader_module_trusted(desc, wgpu::ShaderRuntimeChecks::unchecked()) }
                };
                let entries: Vec<wgpu::BindGroupLayoutEntry> = kernel
                    .binds()
                    .iter()
                    .enumerate()
                    .skip(self.immediates as usize)
                    .map(|(i, b)| wgpu::BindGroupLayoutEntry {
                        binding: i as u32,
                        visibility: wgpu::ShaderStages::COMPUTE,
                        ty: wgpu::BindingType::Buffer {
                            ty: match b {
                                Bind::U => wgpu::BufferBindingType::Uniform,
                                Bind::R => wgpu::BufferBindingType::Storage { read_only: true },
                                Bind::W => wgpu::BufferBindingType::Storage { read_only: false },
                            },
                            has_dynamic_offset: false,
                            min_binding_size: None,
                        },
                        count: None,
                    })
                    .collect();
                let layout = device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(&label), entries: &entries });
                let pl = device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                    label: Some(&label),
                    bind_group_layouts: &[Some(&layout)],
                    immediate_size: if self.immediates { PARAMS_BYTES } else { 0 },
                });
                let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: Some(&pl),
                    module: &module,
                    entry_point: Some(kernel.entry()),
                    compilation_options: wgpu::PipelineCompilationOptions { constants: &[], zero_initialize_workgroup_memory: false },
                    cache: None,
                });
                Arc::new(Pipe { pipeline, layout })
            })
            .clone()
    }
}

/// Uniform parameters of one dispatch: 16 words (64 bytes), read by each shader as its `Params`.
pub(crate) type Params = [u32; 16];

/// Bytes of [`Params`].
pub(crate) const PARAMS_BYTES: u32 = 64;

/// Fills a [`Params`] from its leading words.
pub(crate) fn params(words: &[u32]) -> Params {
    let mut p = [0u32; 16];
    p[..words.len()].copy_from_slice(words);
    p
}

/// Splits `total` workgroups over x and y so neither exceeds `max_dim`; kernels rebuild the linear
/// id as `x + y * num_workgroups.x` and return when it is `>= total`.
pub(crate) fn grid(total: u32, max_dim: u32) -> (u32, u32) {
    let x = total.clamp(1, max_dim);
    (x, total.div_ceil(x).max(1))
}
