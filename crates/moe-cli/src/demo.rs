//! `moe` / `moe demo`: the main job. A DeepSeek-V3-shaped layer scaled to fit this machine, run on
//! the best available backend and checked against the CPU reference.

use crate::backends::{Choice, Job, dispatch};
use crate::synthetic::{random_layer, uniform};
use moe_hal::host::Accumulate;
use moe_hal::{Backend, DType, HostLayer, Layer, MoeConfig, Result, Routing, Tensor, ops};
use std::time::Instant;

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// The backend to run on (`auto`: a hardware GPU when there is one, else the CPU).
    #[arg(long, value_enum, default_value = "auto")]
    pub backend: Choice,
    /// Tokens in the batch.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
    /// Hidden size (DeepSeek-V3: 7168; scaled down by default to fit any machine).
    #[arg(long, default_value_t = 2048)]
    pub hidden: usize,
    /// Expert intermediate size (DeepSeek-V3: 2048).
    #[arg(long, default_value_t = 512)]
    pub intermediate: usize,
    /// Routed experts (DeepSeek-V3: 256), in 8 groups of which 4 are kept, as DeepSeek-V3 does.
    #[arg(long, default_value_t = 64)]
    pub experts: usize,
    /// Experts per token.
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    /// Storage dtype of the weights.
    #[arg(long, default_value = "bf16", value_parser = crate::weight_dtype)]
    pub dtype: DType,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Seed of the synthetic weights and input.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

impl Default for DemoArgs {
    fn default() -> Self {
        DemoArgs {
            backend: Choice::Auto,
            tokens: 64,
            hidden: 2048,
            intermediate: 512,
            experts: 64,
            top_k: 8,
            dtype: DType::BF16,
            iters: 5,
            seed: 0,
        }
    }
}

/// The outcome of one layer run.
pub struct Ran {
    pub out: Vec<f32>,
    pub ids: Vec<u32>,
    pub device: String,
    pub median_s: f64,
}

/// Uploads the layer, runs it once to warm up, then `iters` timed runs (each ends in a
/// synchronize, so the time covers the device work).
pub struct Timed<'a> {
    pub layer: &'a HostLayer,
    pub x: &'a [f32],
    pub iters: usize,
}

impl Job for Timed<'_> {
    type Output = Ran;
    fn run<B: Backend>(self, b: &B) -> Result<Ran> {
        let c = &self.layer.config;
        let t = self.x.len() / c.hidden;
        let layer = Layer::upload(b, self.layer)?;
        let x = Tensor::from_f32(b, DType::F32, &[t, c.hidden], self.x)?;
        let mut out = Tensor::alloc(b, DType::F32, &[t, c.hidden])?;
        let mut ids = Tensor::alloc(b, DType::U32, &[t, c.top_k])?;
        let mut w = Tensor::alloc(b, DType::F32, &[t, c.top_k])?;
        ops::forward(b, &layer, &x, &mut out, &mut ids, &mut w)?;
        b.synchronize()?;
        let mut times = Vec::with_capacity(self.iters);
        for _ in 0..self.iters.max(1) {
            let start = Instant::now();
            ops::forward(b, &layer, &x, &mut out, &mut ids, &mut w)?;
            b.synchronize()?;
            times.push(start.elapsed().as_secs_f64());
        }
        times.sort_by(f64::total_cmp);
        Ok(Ran { out: out.to_f32(b)?, ids: ids.to_u32(b)?, device: b.info().device.clone(), median_s: times[times.len() / 2] })
    }
}

/// Relative L2 error of `got` against `want`; infinite when `got` has a NaN.
pub fn rel_l2(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.iter().zip(want) {
        num += (*g as f64 - *w as f64).powi(2);
        den += (*w as f64).powi(2);
    }
    if num.is_nan() { f64::INFINITY } else { (num / den.max(f64::MIN_POSITIVE)).sqrt() }
}

/// Bytes one forward must read at least: the router, the touched experts once each and the
/// shared expert ([`MoeConfig::weight_parts`], block scales included); nothing without tokens.
pub fn layer_bytes(c: &MoeConfig, dtype: DType, tokens: usize, touched: usize) -> f64 {
    let [router, expert, shared] = c.weight_parts(dtype);
    if tokens == 0 { 0.0 } else { (router + touched as u64 * expert + shared) as f64 }
}

pub fn demo(args: &DemoArgs) -> Result<()> {
    let groups = if args.experts.is_multiple_of(8) && args.experts >= 16 { 8 } else { 1 };
    let config = MoeConfig {
        hidden: args.hidden,
        intermediate: args.intermediate,
        experts: args.experts,
        top_k: args.top_k,
        routing: Routing::SigmoidGrouped {
            n_group: groups,
            topk_group: groups.div_ceil(2),
            norm_topk_prob: true,
            routed_scaling_factor: 2.5,
        },
        shared_intermediate: args.intermediate,
    };
    config.validate()?;
    // The host holds the weights up to three times (made here, in the CPU backend, in the f64
    // reference) and a forward's intermediates twice: refuse what cannot fit before allocating
    // (an allocation that fails aborts the process).
    let need = 3.0 * config.weight_bytes(args.dtype) as f64 + 2.0 * config.forward_scratch_bytes(args.tokens) as f64;
    let have = moe_hal::host::available_bytes() as f64;
    if need > 0.9 * have {
        return moe_hal::invalid!(
            "this demo needs about {:.1} GiB of host memory and {:.1} GiB are available; pass fewer --tokens or smaller sizes",
            need / 1073741824.0,
            have / 1073741824.0
        );
    }
    println!(
        "moe demo: a DeepSeek-V3-shaped MoE layer, scaled to fit: hidden {}, expert intermediate {}, {} experts in {} groups (keep {}), top-{}, 1 shared expert, {} weights ({:.0} MiB), {} tokens",
        config.hidden,
        config.intermediate,
        config.experts,
        groups,
        groups.div_ceil(2),
        config.top_k,
        args.dtype,
        config.weight_bytes(args.dtype) as f64 / (1 << 20) as f64,
        args.tokens
    );
    let layer = random_layer(&config, args.dtype, args.seed)?;
    let x = uniform(args.tokens * config.hidden, 1.0, args.seed ^ 0xA11CE);

    let ran = dispatch(args.backend, Timed { layer: &layer, x: &x, iters: args.iters })?;
    let reference = Timed { layer: &layer, x: &x, iters: 1 }.run(&moe_cpu::CpuBackend::new().with_accumulate(Accumulate::F64))?;

    let k = config.top_k;
    let mut per_expert = vec![0usize; config.experts];
    ran.ids.iter().for_each(|&e| per_expert[e as usize] += 1);
    let touched = per_expert.iter().filter(|&&n| n > 0).count();
    let max = per_expert.iter().max().copied().unwrap_or(0);
    let same_sets = (0..args.tokens)
        .filter(|&t| {
            let mut a = ran.ids[t * k..(t + 1) * k].to_vec();
            let mut b = reference.ids[t * k..(t + 1) * k].to_vec();
            a.sort_unstable();
            b.sort_unstable();
            a == b
        })
        .count();
    let err = rel_l2(&ran.out, &reference.out);
    let bytes = layer_bytes(&config, args.dtype, args.tokens, touched);

    println!("backend:  {}", ran.device);
    if args.backend == Choice::Auto {
        for why in crate::backends::auto_skipped() {
            println!("          (not {why})");
        }
    }
    println!(
        "routing:  {touched} of {} experts touched, {} idle, busiest expert has {max} of {} token slots; {same_sets}/{} tokens chose the same experts as the reference",
        config.experts,
        config.experts - touched,
        args.tokens * k,
        args.tokens
    );
    println!("error:    relative L2 {err:.2e} against the CPU reference (f64 accumulation)");
    let achieved = if bytes > 0.0 {
        format!("{:.1} GB/s achieved over the {:.0} MiB of weights it must read", bytes / ran.median_s / 1e9, bytes / (1 << 20) as f64)
    } else {
        "no tokens, so no weights to read".into()
    };
    println!("time:     {:.3} ms median of {} (whole layer, router included); {achieved}", ran.median_s * 1e3, args.iters.max(1));
    let tolerance = if args.dtype == DType::F32 { 1e-4 } else { 1e-2 };
    // NaN error fails too: `err < tolerance` is false for NaN.
    if same_sets != args.tokens || err.is_nan() || err >= tolerance {
        return Err(moe_hal::Error::Driver(format!(
            "the {} result differs from the CPU reference (relative L2 {err:.2e}, {same_sets}/{} routing sets equal)",
            ran.device, args.tokens
        )));
    }
    println!("ok:       matches the reference");
    Ok(())
}
