//! Tests that need no GPU (NVRTC compilation of every kernel, the choice of target and kernel, the
//! "unavailable" path), and tests against `moe-cpu` that run only where a CUDA device is (they
//! print why they skip elsewhere, and fail when `MOE_REQUIRE_BACKENDS` names `cuda`).

use crate::kernels::{self, Source, Target, choose_target};
use crate::ops::{Plan, gemm_entry, plan};
use crate::{CudaBackend, GemmPath};
use moe_hal::{DType, Error};

// ---------------------------------------------------------------------------------------------
// NVRTC: every kernel compiles, without a warning or a spill
// ---------------------------------------------------------------------------------------------

/// One kernel's line of ptxas's resource report.
#[derive(Debug, Default, Clone)]
struct Usage {
    name: String,
    registers: u32,
    stack: u32,
    spill_stores: u32,
    spill_loads: u32,
    smem: u32,
}

/// Parses `ptxas info` lines (from `--ptxas-options=-v`) into one [`Usage`] per kernel.
fn parse_ptxas(log: &str) -> Vec<Usage> {
    let mut out: Vec<Usage> = Vec::new();
    let num_before = |line: &str, unit: &str| -> u32 {
        line.find(unit)
            .and_then(|i| line[..i].split(|c: char| !c.is_ascii_digit()).rfind(|s| !s.is_empty()))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    };
    for line in log.lines() {
        if let Some(i) = line.find("Compiling entry function '") {
            let rest = &line[i + "Compiling entry function '".len()..];
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(Usage { name, ..Default::default() });
        } else if let Some(u) = out.last_mut() {
            if line.contains("bytes stack frame") {
                u.stack = num_before(line, "bytes stack frame");
                u.spill_stores = num_before(line, "bytes spill stores");
                u.spill_loads = num_before(line, "bytes spill loads");
            } else if line.contains("registers") {
                u.registers = num_before(line, "registers");
                if line.contains("bytes smem") {
                    u.smem = num_before(line, "bytes smem");
                }
            }
        }
    }
    out
}

/// Every kernel of every source file compiles with NVRTC to sm_90 and sm_80 cubins with an empty
/// log (no warning), defines every entry point the host launches, uses tensor-core instructions
/// where it should, and spills no register. Skips (printing why) where NVRTC cannot be loaded.
#[test]
fn nvrtc_compiles_every_kernel() {
    let found = match crate::driver::nvrtc_library() {
        Ok(w) => w,
        Err(why) if std::env::var_os("MOE_REQUIRE_NVRTC").is_some() => panic!("MOE_REQUIRE_NVRTC is set but NVRTC cannot be loaded: {why}"),
        Err(why) => {
            println!("skipping the NVRTC compile test: {why}");
            return;
        }
    };
    let (major, minor) = kernels::nvrtc_version().expect("NVRTC version");
    let archs = kernels::nvrtc_archs().expect("NVRTC architectures");
    println!("NVRTC {major}.{minor} ({found}); supported architectures {archs:?}");
    let mut failures = Vec::new();
    for arch in [90u32, 80] {
        if !archs.contains(&arch) {
            failures.push(format!("NVRTC {major}.{minor} does not support sm_{arch}"));
            continue;
        }
        for source in Source::ALL {
            let start = std::time::Instant::now();
            // The cubin the backend loads, with the backend's options.
            match kernels::compile(source, Target::Cubin(arch), &[]) {
                Ok(c) if !c.log.is_empty() => failures.push(format!("{} sm_{arch}: NVRTC said:\n{}", source.file(), c.log)),
                Ok(c) => println!(
                    "{:<16} sm_{arch} cubin {:>8} bytes in {:>5} ms, no warnings",
                    source.file(),
                    c.image.len(),
                    start.elapsed().as_millis()
                ),
                Err(e) => {
                    failures.push(format!("{} sm_{arch}: {e}", source.file()));
                    continue;
                }
            }
            // The PTX: every entry point is there; tensor cores where expected.
            let ptx = kernels::compile(source, Target::Ptx(arch), &[]).expect("PTX after a successful cubin");
            let text = String::from_utf8_lossy(&ptx.image).into_owned();
            for entry in source.entries() {
                if !text.contains(&format!(".entry {entry}(")) {
                    failures.push(format!("{} compute_{arch}: no kernel {entry} in the PTX", source.file()));
                }
            }
            if source == Source::GroupedGemm {
                let mma = text.matches("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32").count();
                let mma16 = text.matches("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32").count();
                println!("  grouped_gemm PTX: {mma} bf16 and {mma16} f16 mma.sync instructions");
                if mma == 0 || mma16 == 0 {
                    failures.push(format!("grouped_gemm compute_{arch}: no mma.sync for bf16 ({mma}) or f16 ({mma16})"));
                }
                // F8E4M3 decoded by the hardware conversion from sm_89 on, arithmetically before.
                let cvt = text.matches("cvt.rn.f16x2.e4m3x2").count();
                println!("  grouped_gemm PTX: {cvt} cvt.rn.f16x2.e4m3x2 instructions");
                if (cvt > 0) != (arch >= 89) {
                    failures.push(format!("grouped_gemm compute_{arch}: {cvt} cvt.rn.f16x2.e4m3x2 instructions"));
                }
                // MOE_CUDA_F8_CVT=0's define turns the conversion off.
                if arch >= 89 {
                    let off = kernels::compile(source, Target::Ptx(arch), &["-DMOE_F8_NO_CVT"]).expect("PTX with MOE_F8_NO_CVT");
                    let n = String::from_utf8_lossy(&off.image).matches("cvt.rn.f16x2.e4m3x2").count();
                    if n != 0 {
                        failures.push(format!("grouped_gemm compute_{arch} with MOE_F8_NO_CVT: {n} cvt.rn.f16x2.e4m3x2 instructions"));
                    }
                }
            }
            // ptxas's resource report: registers, shared memory, stack, spills.
            match kernels::compile(source, Target::Cubin(arch), &["--ptxas-options=-v"]) {
                Ok(c) => {
                    let usage = parse_ptxas(&c.log);
                    if usage.len() != source.entries().len() {
                        failures.push(format!(
                            "{} sm_{arch}: ptxas reported {} kernels, expected {}:\n{}",
                            source.file(),
                            usage.len(),
                            source.entries().len(),
                            c.log
                        ));
                    }
                    for u in usage {
                        println!(
                            "  {:<22} {:>3} registers {:>6} B smem {:>4} B stack {:>3} B spill stores {:>3} B spill loads",
                            u.name, u.registers, u.smem, u.stack, u.spill_stores, u.spill_loads
                        );
                        if u.spill_stores != 0 || u.spill_loads != 0 {
                            failures.push(format!(
                                "{} sm_{arch}: {} spills registers ({} B stores, {} B loads)",
                                source.file(),
                                u.name,
                                u.spill_stores,
                                u.spill_loads
                            ));
                        }
                    }
                }
                Err(e) => failures.push(format!("{} sm_{arch} with --ptxas-options=-v: {e}", source.file())),
            }
        }
    }
    assert!(failures.is_empty(), "NVRTC compile failures:\n{}", failures.join("\n"));
}

#[test]
fn a_compile_error_is_a_driver_error_with_the_log() {
    if crate::driver::nvrtc_library().is_err() {
        println!("skipping: no NVRTC");
        return;
    }
    // Not a source file of the crate: compile() only takes those, so check the mapping through an
    // option NVRTC rejects.
    match kernels::compile(Source::Activation, Target::Cubin(90), &["--no-such-option"]) {
        Err(Error::Driver(m)) => assert!(m.contains("activation.cu"), "{m}"),
        Ok(_) => panic!("a bad option compiled"),
        Err(e) => panic!("expected a driver error, got {e}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Choices made from shapes
// ---------------------------------------------------------------------------------------------

#[test]
fn target_is_the_devices_own_cubin_when_nvrtc_knows_it() {
    let archs = [75, 80, 86, 87, 89, 90, 100, 103, 120];
    assert_eq!(choose_target(90, &archs), Some(Target::Cubin(90)));
    assert_eq!(choose_target(80, &archs), Some(Target::Cubin(80)));
    // An unknown minor version: the newest cubin of the same major runs on it.
    assert_eq!(choose_target(88, &archs), Some(Target::Cubin(87)));
    // A GPU newer than NVRTC: PTX for the newest architecture, compiled by the driver.
    assert_eq!(choose_target(130, &archs), Some(Target::Ptx(120)));
    assert_eq!(choose_target(70, &archs), None);
}

#[test]
fn gemm_kernel_is_chosen_from_shapes() {
    use DType::*;
    let (cc, sms) = (90, 132);
    // DeepSeek-V3 decode: 8 rows over 256 experts: stream the weights.
    assert_eq!(plan(GemmPath::Auto, 8, 4096, 256, true, BF16, cc, sms, false), Plan::Gemv { nr: 4 });
    // The router at T = 1 (dense, N = 256): few blocks, so one weight row per warp.
    assert_eq!(plan(GemmPath::Auto, 1, 256, 1, false, F32, cc, sms, false), Plan::Gemv { nr: 1 });
    // T = 128, k = 8: 4 rows per expert on average: still streaming.
    assert_eq!(plan(GemmPath::Auto, 1024, 4096, 256, true, BF16, cc, sms, false), Plan::Gemv { nr: 4 });
    // T = 1024: 32 rows per expert: tensor cores, 64-row tiles.
    assert_eq!(plan(GemmPath::Auto, 8192, 4096, 256, true, BF16, cc, sms, false), Plan::Mma { bm: 64, split: false });
    // T = 16384: 512 rows per expert: 128-row tiles.
    assert_eq!(plan(GemmPath::Auto, 131072, 4096, 256, true, F16, cc, sms, false), Plan::Mma { bm: 128, split: false });
    // A dense bf16 GEMM (a bf16 router at T = 2048, the shared expert) keeps f32-accurate activations.
    assert_eq!(plan(GemmPath::Auto, 2048, 256, 1, false, BF16, cc, sms, false), Plan::Mma { bm: 128, split: true });
    // f32 weights never go to the tensor cores; nor does anything before sm_80.
    assert_eq!(plan(GemmPath::Auto, 8192, 4096, 256, true, F32, cc, sms, false), Plan::Simt);
    assert_eq!(plan(GemmPath::Auto, 8192, 4096, 256, true, BF16, 75, sms, false), Plan::Simt);
    // A fused gate/up at T = 1 (dense, 2I = 512: few blocks): warps keep
    // an even number of rows, so gate and up meet in one warp.
    assert_eq!(plan(GemmPath::Auto, 1, 512, 1, false, BF16, cc, sms, true), Plan::Gemv { nr: 2 });
    // Forced families.
    assert_eq!(plan(GemmPath::Gemv, 8192, 4096, 256, true, BF16, cc, sms, false), Plan::Gemv { nr: 4 });
    assert_eq!(plan(GemmPath::Simt, 8192, 4096, 256, true, BF16, cc, sms, false), Plan::Simt);
    assert_eq!(plan(GemmPath::Tiled, 8, 4096, 256, true, BF16, cc, sms, false), Plan::Mma { bm: 64, split: false });
    assert_eq!(plan(GemmPath::Tiled, 8, 4096, 256, true, F32, cc, sms, false), Plan::Simt);
    // F8E4M3 experts (DeepSeek-V3's checkpoint) take the same families as bf16: tensor cores for
    // prefill, streaming for decode, FMA tiles before sm_80.
    assert_eq!(plan(GemmPath::Auto, 8192, 4096, 256, true, F8E4M3, cc, sms, false), Plan::Mma { bm: 64, split: false });
    assert_eq!(plan(GemmPath::Auto, 8, 4096, 256, true, F8E4M3, cc, sms, true), Plan::Gemv { nr: 4 });
    assert_eq!(plan(GemmPath::Auto, 2048, 4096, 1, false, F8E4M3, cc, sms, true), Plan::Mma { bm: 128, split: true });
    assert_eq!(plan(GemmPath::Auto, 8192, 4096, 256, true, F8E4M3, 75, sms, false), Plan::Simt);
    // Entry names exist in the source's list.
    let all = Source::GroupedGemm.entries();
    for (p, d, k) in [
        (Plan::Gemv { nr: 1 }, F32, 7168),
        (Plan::Gemv { nr: 4 }, BF16, 33),
        (Plan::Gemv { nr: 2 }, F16, 64),
        (Plan::Mma { bm: 128, split: false }, F16, 7168),
        (Plan::Mma { bm: 64, split: false }, BF16, 7),
        (Plan::Mma { bm: 64, split: true }, F16, 7168),
        (Plan::Mma { bm: 128, split: true }, BF16, 9),
        (Plan::Simt, F32, 6),
        (Plan::Simt, BF16, 8),
        (Plan::Gemv { nr: 2 }, F8E4M3, 7168),
        (Plan::Gemv { nr: 1 }, F8E4M3, 40),
        (Plan::Mma { bm: 64, split: false }, F8E4M3, 7168),
        (Plan::Mma { bm: 128, split: true }, F8E4M3, 37),
        (Plan::Simt, F8E4M3, 40),
        (Plan::Simt, F8E4M3, 6),
    ] {
        let e = gemm_entry(p, d, k).unwrap();
        assert!(all.contains(&e), "{e}");
    }
    assert_eq!(gemm_entry(Plan::Mma { bm: 128, split: false }, BF16, 7168).unwrap(), "mma_bf16_m128_vec");
    assert_eq!(gemm_entry(Plan::Mma { bm: 64, split: true }, F16, 7168).unwrap(), "mma_split_f16_m64_vec");
    assert_eq!(gemm_entry(Plan::Gemv { nr: 4 }, F16, 7167).unwrap(), "gemv_f16_r4_any");
    assert_eq!(gemm_entry(Plan::Simt, F32, 6).unwrap(), "simt_f32_any");
    // F8E4M3's 16-byte loads are 16 elements: K % 16 for the vector variants of gemv and mma.
    assert_eq!(gemm_entry(Plan::Gemv { nr: 4 }, F8E4M3, 7168).unwrap(), "gemv_f8_e4m3_r4_vec");
    assert_eq!(gemm_entry(Plan::Gemv { nr: 4 }, F8E4M3, 40).unwrap(), "gemv_f8_e4m3_r4_any");
    assert_eq!(gemm_entry(Plan::Mma { bm: 128, split: false }, F8E4M3, 2048).unwrap(), "mma_f8_e4m3_m128_vec");
    assert_eq!(gemm_entry(Plan::Mma { bm: 64, split: true }, F8E4M3, 40).unwrap(), "mma_split_f8_e4m3_m64_any");
    assert_eq!(gemm_entry(Plan::Simt, F8E4M3, 40).unwrap(), "simt_f8_e4m3_vec");
    // A plan with no kernel (f32 on tensor cores: `plan` never makes one) is an error, not some
    // other kernel.
    assert!(gemm_entry(Plan::Mma { bm: 64, split: false }, F32, 8).is_err());
}

#[test]
fn no_driver_means_unavailable_not_a_panic() {
    if crate::driver::driver_library().is_ok() {
        println!("skipping: this machine has a CUDA driver");
        return;
    }
    match CudaBackend::new() {
        Err(Error::Unavailable(m)) => assert!(m.contains("libcuda"), "{m}"),
        Err(e) => panic!("expected Unavailable, got {e}"),
        Ok(_) => panic!("opened a CUDA device without a driver"),
    }
    let why = crate::available().expect_err("no device to list");
    assert!(why.contains("libcuda"), "{why}");
}

#[test]
fn flags_decode_to_sentences() {
    use moe_hal::flags::{WORDS as ERR_WORDS, decode as decode_flags};
    let mut w = [0u32; ERR_WORDS];
    assert!(decode_flags(&w).is_ok());
    w[0] = 1;
    w[1] = 99;
    w[2] = 16;
    match decode_flags(&w) {
        Err(Error::InvalidArgument(m)) => assert!(m.contains(">= 16") && m.contains("99"), "{m}"),
        r => panic!("{r:?}"),
    }
    let mut w = [0u32; ERR_WORDS];
    w[9] = 1;
    w[10] = 40;
    w[11] = 8;
    assert!(matches!(decode_flags(&w), Err(Error::InvalidArgument(m)) if m.contains("row_index holds 40")));
}

// ---------------------------------------------------------------------------------------------
// On a device: against moe-cpu
// ---------------------------------------------------------------------------------------------

mod device;
mod graph;
