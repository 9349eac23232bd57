//! Choosing a backend by name, and running generic work on whichever was chosen.
//!
//! The trait has an associated buffer type, so it is not object-safe: instead of a `dyn Backend`,
//! the command describes its work as a [`Job`] (a generic method) and [`dispatch`] calls it with
//! the concrete backend.

use moe_hal::{Backend, Result};

/// A backend named on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Choice {
    /// The best available: a hardware GPU when there is one, else the CPU.
    Auto,
    Cpu,
    Wgpu,
    Cuda,
    Cann,
}

/// Work that runs on any backend.
pub trait Job {
    type Output;
    fn run<B: Backend>(self, backend: &B) -> Result<Self::Output>;
}

fn wgpu() -> Result<moe_wgpu::WgpuBackend> {
    moe_wgpu::WgpuBackend::new()
}

/// True when the wgpu adapter is real hardware (not a software rasteriser such as lavapipe,
/// which is much slower than the CPU backend).
fn is_hardware(b: &moe_wgpu::WgpuBackend) -> bool {
    !b.info().features.iter().any(|f| f == "software-adapter")
}

/// Constructs the chosen backend and runs `job` on it.
pub fn dispatch<J: Job>(choice: Choice, job: J) -> Result<J::Output> {
    match choice {
        Choice::Cpu => job.run(&moe_cpu::CpuBackend::new()),
        Choice::Wgpu => job.run(&wgpu()?),
        Choice::Cuda => job.run(&moe_cuda::CudaBackend::new()?),
        Choice::Cann => job.run(&moe_cann::CannBackend::new()?),
        // CUDA where there is a CUDA GPU, else a hardware adapter through wgpu, else the CPU.
        Choice::Auto => match moe_cuda::CudaBackend::new() {
            Ok(b) => job.run(&b),
            Err(_) => match wgpu() {
                Ok(b) if is_hardware(&b) => job.run(&b),
                _ => job.run(&moe_cpu::CpuBackend::new()),
            },
        },
    }
}

/// Why `--backend auto` passed over the GPU backends here (empty when it chose one), for the demo
/// to print next to the backend it ran on.
pub fn auto_skipped() -> Vec<String> {
    let mut why = Vec::new();
    match moe_cuda::CudaBackend::new() {
        Ok(_) => return why,
        Err(e) => why.push(format!("cuda: {e}")),
    }
    match wgpu() {
        Ok(b) if is_hardware(&b) => return Vec::new(),
        Ok(b) => why.push(format!("wgpu: {} is a software adapter, slower than the CPU backend", b.info().device)),
        Err(e) => why.push(format!("wgpu: {e}")),
    }
    why
}

/// One line per backend for `moe devices`: whether it is available here and why not.
pub fn describe_all() -> Vec<(String, std::result::Result<String, String>)> {
    let describe = |b: &dyn Fn() -> Result<moe_hal::BackendInfo>| match b() {
        Ok(i) => {
            let mut s = format!("{}; {:.1} GiB, largest buffer {:.1} GiB", i.device, gib(i.memory_bytes), gib(i.max_buffer_bytes));
            if let Some(sg) = i.subgroup_size {
                s += &format!("; subgroup {sg}");
            }
            if !i.features.is_empty() {
                s += &format!("; features: {}", i.features.join(", "));
            }
            Ok(s)
        }
        Err(e) => Err(e.to_string()),
    };
    vec![
        ("cpu".into(), describe(&|| Ok(moe_cpu::CpuBackend::new().info().clone()))),
        ("wgpu".into(), describe(&|| Ok(wgpu()?.info().clone()))),
        ("cuda".into(), describe(&|| Ok(moe_cuda::CudaBackend::new()?.info().clone()))),
        ("cann".into(), describe(&|| Ok(moe_cann::CannBackend::new()?.info().clone()))),
    ]
}

fn gib(b: u64) -> f64 {
    b as f64 / (1u64 << 30) as f64
}
