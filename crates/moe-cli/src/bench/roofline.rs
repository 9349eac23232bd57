//! The roofline floor of `moe bench`: the device's peak (a documented table, or an estimate for
//! the host CPU), its copy bandwidth measured in the same run, and the bytes and FLOPs a layer
//! must at least move and compute.

use super::median;
use moe_hal::{Backend, BackendInfo, DType, Error, MoeConfig, Result};
use std::time::Instant;

/// The documented peak table (dense, per storage dtype). Where a device is not listed the floor
/// is bandwidth-only unless `--peak-tflops` is given.
///
/// | device | f16/bf16 | f32 | source |
/// |---|---|---|---|
/// | NVIDIA H200 | 791 TFLOP/s | 67 TFLOP/s | bf16: measured dense matmul on the project's H200; f32: NVIDIA spec (no tensor cores) |
/// | NVIDIA H100 SXM | 989 TFLOP/s | 67 TFLOP/s | NVIDIA spec, dense |
/// | host CPU | 2x the f32 rate with AVX512_BF16 (its dot products multiply pairs), else the f32 rate | threads x 2.5 GHz x 2 FMA units x 2 x lanes: 16 lanes with 512-bit units (AVX-512 on Intel, AMD from Zen 5), 8 with 256-bit ones (AVX2; Zen 4 runs AVX-512 on 256-bit units) | estimate |
pub fn peak_flops(info: &BackendInfo, dtype: DType) -> Option<(f64, String)> {
    let d = info.device.to_ascii_uppercase();
    let half = dtype != DType::F32;
    if d.contains("H200") {
        return Some((if half { 791e12 } else { 67e12 }, "H200 table (bf16 measured, f32 spec)".into()));
    }
    if d.contains("H100") {
        return Some((if half { 989e12 } else { 67e12 }, "H100 spec".into()));
    }
    if info.name == "cpu" {
        let threads = rayon::current_num_threads() as f64;
        let (per_cycle, why) = cpu_flops_per_cycle(half);
        return Some((threads * 2.5e9 * per_cycle, format!("CPU estimate: {threads} threads x 2.5 GHz x {per_cycle} FLOP/cycle ({why})")));
    }
    None
}

/// FLOPs per cycle per core, and why: two FMA units of 16 f32 lanes where AVX-512 runs on
/// 512-bit units, else of 8 (2 FLOPs a lane); twice that for f16/bf16 weights where AVX512_BF16's
/// dot products (two products per f32 lane) are there for a bf16 engine to use, as PyTorch does.
fn cpu_flops_per_cycle(half: bool) -> (f64, String) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let (lanes, units) = if avx512_on_256_bit_units() { (8.0, "AVX-512 on 256-bit units") } else { (16.0, "512-bit units") };
        if half && std::arch::is_x86_feature_detected!("avx512bf16") {
            return (2.0 * 2.0 * 2.0 * lanes, format!("bf16 dot products, {units}"));
        }
        return (2.0 * 2.0 * lanes, format!("f32 FMA, {units}"));
    }
    let _ = half;
    (32.0, "f32 FMA, two units of 8 lanes".into())
}

/// AMD before Zen 5 (family 0x19: Zen 4) executes AVX-512 on 256-bit units, two cycles or two
/// units per instruction, so its peak is AVX2's.
#[cfg(target_arch = "x86_64")]
fn avx512_on_256_bit_units() -> bool {
    let (vendor, version) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
    halves_avx512([vendor.ebx, vendor.edx, vendor.ecx], version.eax)
}

/// [`avx512_on_256_bit_units`] from cpuid leaf 0's vendor registers (ebx, edx, ecx) and leaf 1's
/// eax (the family: base, plus the extended family where the base is 0xf).
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn halves_avx512(vendor: [u32; 3], eax: u32) -> bool {
    let amd = vendor == [0x6874_7541, 0x6974_6e65, 0x444d_4163]; // "Auth" "enti" "cAMD"
    let base = (eax >> 8) & 0xf;
    let family = base + if base == 0xf { (eax >> 20) & 0xff } else { 0 };
    amd && family <= 0x19
}

/// The bytes and FLOPs one layer over `tokens` must at least move and compute: the router, the
/// `touched` experts and the shared expert ([`MoeConfig::weight_parts`]: F8E4M3 counts its
/// block scales), the activations in and out.
pub fn cost(c: &MoeConfig, dtype: DType, tokens: usize, touched: usize) -> (f64, f64) {
    let (h, i, e, k, s, t) =
        (c.hidden as f64, c.intermediate as f64, c.experts as f64, c.top_k as f64, c.shared_intermediate as f64, tokens as f64);
    let [router, expert, shared] = c.weight_parts(dtype).map(|b| b as f64);
    let weights = router + touched as f64 * expert + shared;
    let activations = 2.0 * t * h * 4.0 + t * k * 8.0;
    let flops = 2.0 * t * h * e + 2.0 * t * k * 3.0 * h * i + 2.0 * t * 3.0 * h * s;
    (weights + activations, flops)
}

/// Copies per timed sample of [`copy_bandwidth`] (the peers scripts use the same count).
const COPIES: usize = 8;

/// Copy bandwidth (read + write, bytes/s) of the backend, measured with its device copy: the
/// median of 7 samples, each [`COPIES`] copies between two synchronizes. The layer's bytes are
/// nearly all reads, which a device may stream faster than it copies, so a fraction of the floor
/// a little above 1 is possible: the floor is calibrated on a copy, not a hard bound.
pub(super) fn copy_bandwidth<B: Backend>(b: &B) -> Result<f64> {
    // 256 MiB (large enough to leave every cache), or the largest that one buffer of this device
    // holds, halving from there (lavapipe binds at most 128 MiB).
    let mut bytes = (b.info().memory_bytes / 16).min(256 << 20) as usize / 4 * 4;
    let (src, mut dst) = loop {
        let pair = b.upload(DType::U32, &[bytes / 4], &vec![7u8; bytes]).and_then(|s| Ok((s, b.alloc(DType::U32, &[bytes / 4])?)));
        match pair {
            Ok(p) => break p,
            Err(Error::OutOfMemory(_)) if bytes > 16 << 20 => bytes /= 2,
            Err(e) => return Err(e),
        }
    };
    b.copy(&src, &mut dst)?;
    b.synchronize()?;
    // COPIES copies between two synchronizes per sample: one 256 MiB copy takes ~115 us on an
    // H200, and the launch and synchronize around it (microseconds) would lower the bandwidth,
    // raise the floor and flatter every fraction.
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..COPIES {
                b.copy(&src, &mut dst)?;
            }
            b.synchronize()?;
            Ok(t.elapsed().as_secs_f64() / COPIES as f64)
        })
        .collect::<Result<_>>()?;
    Ok(2.0 * bytes as f64 / median(&mut times))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zen4_runs_avx512_on_256_bit_units_and_zen5_and_intel_do_not() {
        let amd = [0x6874_7541, 0x6974_6e65, 0x444d_4163];
        let intel = [0x756e_6547, 0x4965_6e69, 0x6c65_746e]; // "Genu" "ineI" "ntel"
        assert!(halves_avx512(amd, 0x00A1_0F11)); // Zen 4 (EPYC 9004): family 0x19
        assert!(!halves_avx512(amd, 0x00B0_0F00)); // Zen 5: family 0x1a
        assert!(!halves_avx512(intel, 0x0008_06F8)); // Sapphire Rapids: family 6
    }

    #[test]
    fn cpu_peak_for_half_weights_is_the_f32_rate_or_twice_it() {
        let (f32_rate, why) = cpu_flops_per_cycle(false);
        assert!([32.0, 64.0].contains(&f32_rate), "{f32_rate} ({why})");
        let (half_rate, why) = cpu_flops_per_cycle(true);
        assert!(half_rate == f32_rate || half_rate == 2.0 * f32_rate, "{half_rate} ({why})");
    }
}
