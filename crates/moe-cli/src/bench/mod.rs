//! `moe bench`: the layer's time against the roofline floor of the device and against peers.
//!
//! Method (DESIGN.md, Performance): synthetic seeded weights; inputs drawn fresh for each timed
//! iteration from a pool of distinct random batches, so the routing changes every time (a fixed
//! routing flatters caches); warm-up; medians; the bytes the layer must move (router, every
//! touched expert once, the shared expert, activations in and out) and its FLOPs counted exactly;
//! the device's copy bandwidth measured in the same run; the floor
//! `max(bytes / bandwidth, flops / peak)` with the peak from [`peak_flops`] or `--peak-tflops`.

mod report;
mod roofline;

pub use report::Run;
use report::{Report, Row, Stage, commit, format_row, format_stages, print_ratios, print_runs, read_report, shape_name, today};
use roofline::{copy_bandwidth, cost, peak_flops};

use crate::backends::{Choice, Job, dispatch};
use crate::synthetic::{random_layer, uniform};
use moe_hal::{Backend, DType, Error, HostLayer, Layer, MoeConfig, Result, Routing, Tensor, ops};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Instant;

/// Published shapes of real models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// hidden 7168, expert intermediate 2048, 256 experts in 8 groups (keep 4), top-8, 1 shared.
    DeepseekV3,
    /// DeepSeek-V3's layout with 384 experts in one group, top-8, 1 shared.
    KimiK2,
    /// hidden 2048, expert intermediate 768, 128 experts, top-8, softmax.
    #[value(name = "qwen3-30b-a3b")]
    #[serde(rename = "qwen3-30b-a3b")]
    Qwen3_30bA3b,
    /// hidden 4096, intermediate 14336, 8 experts, top-2, softmax.
    #[value(name = "mixtral-8x7b")]
    #[serde(rename = "mixtral-8x7b")]
    Mixtral8x7b,
}

impl Preset {
    pub fn config(self) -> MoeConfig {
        let deepseek = |experts, n_group, topk_group, scale| MoeConfig {
            hidden: 7168,
            intermediate: 2048,
            experts,
            top_k: 8,
            routing: Routing::SigmoidGrouped { n_group, topk_group, norm_topk_prob: true, routed_scaling_factor: scale },
            shared_intermediate: 2048,
        };
        match self {
            Preset::DeepseekV3 => deepseek(256, 8, 4, 2.5),
            Preset::KimiK2 => deepseek(384, 1, 1, 2.827),
            Preset::Qwen3_30bA3b => MoeConfig {
                hidden: 2048,
                intermediate: 768,
                experts: 128,
                top_k: 8,
                routing: Routing::Softmax { norm_topk_prob: true },
                shared_intermediate: 0,
            },
            Preset::Mixtral8x7b => MoeConfig {
                hidden: 4096,
                intermediate: 14336,
                experts: 8,
                top_k: 2,
                routing: Routing::Softmax { norm_topk_prob: true },
                shared_intermediate: 0,
            },
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// Backends to measure (repeat the flag or separate with commas).
    #[arg(long = "backend", value_enum, value_delimiter = ',', default_value = "auto")]
    pub backends: Vec<Choice>,
    /// A real model's shape (default: deepseek-v3). The shape flags below override its fields.
    #[arg(long, value_enum)]
    pub preset: Option<Preset>,
    /// Hidden size.
    #[arg(long)]
    pub hidden: Option<usize>,
    /// Expert intermediate size.
    #[arg(long)]
    pub intermediate: Option<usize>,
    /// Routed experts (DeepSeek's grouping is kept where it divides them, else one group).
    #[arg(long)]
    pub experts: Option<usize>,
    /// Experts per token.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Shared experts (each of the expert intermediate size; 0 for none).
    #[arg(long)]
    pub shared: Option<usize>,
    /// Token counts, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,128,1024,4096")]
    pub tokens: Vec<usize>,
    /// Storage dtype of the weights: f32, f16, bf16 or f8_e4m3 (with 128x128 block scales).
    #[arg(long, default_value = "bf16", value_parser = crate::weight_dtype)]
    pub dtype: DType,
    /// Timed iterations per token count (the median is reported).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Untimed warm-up iterations per token count.
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Write the results as JSON (the schema the peers script writes too).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a plot of time and floor against tokens (`.svg`, or `.png` with a system TrueType font).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// A JSON file from bench/peers/ (or another `moe bench --json`) to print ratios against.
    #[arg(long)]
    pub compare: Option<PathBuf>,
    /// Use this copy bandwidth (GB/s, read+write) instead of measuring it.
    #[arg(long)]
    pub bandwidth_gbs: Option<f64>,
    /// Use this peak (TFLOP/s) instead of the device table.
    #[arg(long)]
    pub peak_tflops: Option<f64>,
    /// Seed of the synthetic weights and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also time each stage of the layer (router, top-k, permute, gate/up, down, shared, combine)
    /// on its own: the ops submitted one at a time with a synchronize after each, `--iters`
    /// more iterations per token count. Where the time goes, not a second layer time: the sum
    /// includes a synchronize per stage.
    #[arg(long)]
    pub breakdown: bool,
    /// Also time the CUDA backend with each token count's layer captured once as a CUDA graph
    /// and replayed (a second run, `cuda+cudagraph`, as `bench/peers/gpu_peers.py --cuda-graphs`
    /// names its peers' graph runs): the layer without the host's per-launch work, as inference
    /// engines run decode. Other backends ignore it.
    #[arg(long)]
    pub cuda_graphs: bool,
}

struct Measure<'a> {
    args: &'a BenchArgs,
    config: &'a MoeConfig,
    progress: &'a indicatif::ProgressBar,
    /// The synthetic layer, made by the first backend that fits it and kept for the others
    /// (DeepSeek-V3's is 22.5 GB; making it is seconds of a device lease each time).
    host: &'a std::sync::OnceLock<HostLayer>,
}

pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl Job for Measure<'_> {
    /// The backend's run, then its graph run with `--cuda-graphs` on the CUDA backend.
    type Output = Vec<Run>;
    fn run<B: Backend>(self, b: &B) -> Result<Vec<Run>> {
        let (args, c) = (self.args, self.config);
        let info = b.info().clone();
        let mut run = Run {
            backend: info.name.clone(),
            device: info.device.clone(),
            shape: shape_name(c),
            dtype: args.dtype.to_string(),
            copy_bandwidth_gbs: 0.0,
            peak_tflops: None,
            peak_source: String::new(),
            rows: vec![],
            skipped: vec![],
            note: None,
        };
        let weight_bytes = c.weight_bytes(args.dtype);
        let gib = |b: f64| b / 1073741824.0;
        // The synthetic layer is made in host memory, then uploaded: a backend whose memory is
        // the host's (the CPU backend, a software adapter) holds a second copy there meanwhile.
        let shares_host = info.shares_host_memory;
        // What is left to allocate in host memory: the synthetic layer (unless an earlier
        // backend made it) and, on such a backend, its copy.
        let copies = u64::from(self.host.get().is_none()) + u64::from(shares_host);
        let (host, host_need) = (moe_hal::host::available_bytes() as f64, (copies * weight_bytes) as f64);
        let no_room = if weight_bytes as f64 > 0.9 * info.memory_bytes as f64 {
            Some(format!(
                "skipped: the layer's {:.1} GiB of weights do not fit the {:.1} GiB of {}",
                gib(weight_bytes as f64),
                gib(info.memory_bytes as f64),
                info.device
            ))
        } else if host_need > 0.9 * host {
            Some(format!(
                "skipped: the layer's {:.1} GiB of weights ({copies} cop{} in host memory{}: {:.1} GiB) need more than 90% of the {:.1} GiB of host memory available",
                gib(weight_bytes as f64),
                if copies == 1 { "y" } else { "ies" },
                if shares_host { ", this backend's memory" } else { "" },
                gib(host_need),
                gib(host)
            ))
        } else {
            None
        };
        if let Some(msg) = no_room {
            self.progress.println(format!("{}: {msg}", info.name));
            run.skipped.push(msg);
            return Ok(vec![run]);
        }
        let bw = match args.bandwidth_gbs {
            Some(g) => g * 1e9,
            None => copy_bandwidth(b).map_err(|e| match e {
                Error::Unsupported(m) => Error::Unsupported(format!("{m}; pass --bandwidth-gbs to give the device's copy bandwidth")),
                e => e,
            })?,
        };
        run.copy_bandwidth_gbs = bw / 1e9;
        let peak = match args.peak_tflops {
            Some(p) => Some((p * 1e12, "--peak-tflops".to_string())),
            None => peak_flops(&info, args.dtype),
        };
        run.peak_tflops = peak.as_ref().map(|p| p.0 / 1e12);
        run.peak_source = peak.as_ref().map_or("unknown: floor is bandwidth-only".into(), |p| p.1.clone());

        let layer = match self.host.get() {
            Some(h) => Layer::upload(b, h)?,
            // One backend: the host copy goes as soon as it is uploaded (a CPU run near the
            // memory limit would otherwise hold the layer twice).
            None if args.backends.len() == 1 => Layer::upload(b, &random_layer(c, args.dtype, args.seed)?)?,
            None => {
                let made = random_layer(c, args.dtype, args.seed)?;
                Layer::upload(b, self.host.get_or_init(|| made))?
            }
        };
        // With --cuda-graphs on the CUDA backend: the same rows again, timed as graph replays.
        let graphs = args.cuda_graphs && crate::graphs::can_capture(b);
        let mut graph_run = Run { backend: crate::graphs::run_name(&info.name), ..run.clone() };
        if args.cuda_graphs && !graphs {
            // The progress bar counted graph iterations for a backend that turned out not CUDA.
            self.progress.inc((args.tokens.len() * (args.warmup + args.iters)) as u64);
        }
        for &t in &args.tokens {
            let mut scratch = c.forward_scratch_bytes(t) as f64;
            if graphs {
                // A graph holds its own scratch beside what the pool keeps from the eager rows.
                scratch *= 2.0;
            }
            let need = weight_bytes as f64 + scratch;
            // In host memory the weights are already allocated: the scratch must fit in what is
            // left (scratch a backend pooled at a smaller token count counts as taken: this errs
            // towards skipping).
            let no_room = need > 0.9 * info.memory_bytes as f64 || (shares_host && scratch > 0.9 * moe_hal::host::available_bytes() as f64);
            if no_room {
                let msg = format!("{t} tokens skipped: weights and scratch need {:.1} GiB", need / 1073741824.0);
                self.progress.println(format!("{}: {msg}", info.name));
                self.progress.inc(iterations(args) as u64);
                if graphs {
                    graph_run.skipped.push(msg.clone());
                    self.progress.inc((args.warmup + args.iters) as u64);
                }
                run.skipped.push(msg);
                continue;
            }
            let mut done = 0;
            let eager = self.tokens(b, &layer, t, bw, peak.as_ref(), &mut done, false);
            let lost = matches!(eager, Err(Error::DeviceLost(_)));
            match eager {
                Ok(row) => {
                    self.progress.println(format_row(&info.name, &row));
                    if !row.stages.is_empty() {
                        self.progress.println(format_stages(&row.stages));
                    }
                    run.rows.push(row);
                }
                Err(e) => {
                    // One token count failing (out of memory, say) keeps the rows measured so far
                    // and goes on; a lost device ends this backend's run.
                    let msg = format!("{t} tokens failed: {e}");
                    self.progress.println(format!("{}: {msg}", info.name));
                    run.skipped.push(msg);
                    self.progress.inc((iterations(args) - done) as u64);
                }
            }
            if lost {
                break;
            }
            if graphs {
                // After the eager row: its warm-up loaded every kernel the capture needs.
                let mut done = 0;
                match self.tokens(b, &layer, t, bw, peak.as_ref(), &mut done, true) {
                    Ok(row) => {
                        self.progress.println(format_row(&graph_run.backend, &row));
                        graph_run.rows.push(row);
                    }
                    Err(e) => {
                        let msg = format!("{t} tokens failed: {e}");
                        self.progress.println(format!("{}: {msg}", graph_run.backend));
                        graph_run.skipped.push(msg);
                        self.progress.inc((args.warmup + args.iters).saturating_sub(done) as u64);
                        if matches!(e, Error::DeviceLost(_)) {
                            break;
                        }
                    }
                }
            }
        }
        Ok(if graphs { vec![run, graph_run] } else { vec![run] })
    }
}

impl Measure<'_> {
    /// The median of `args.iters` forwards of `t` tokens, after the warm-up; `done` counts the
    /// iterations run (for the progress bar when one fails). `graph`: the layer captured once as
    /// a CUDA graph and each iteration one launch of it ([`crate::graphs::Replay`]; no stage
    /// breakdown).
    #[allow(clippy::too_many_arguments)]
    fn tokens<B: Backend>(
        &self,
        b: &B,
        layer: &Layer<B>,
        t: usize,
        bw: f64,
        peak: Option<&(f64, String)>,
        done: &mut usize,
        graph: bool,
    ) -> Result<Row> {
        let (args, c) = (self.args, self.config);
        // A pool of distinct batches (at most 256 MiB of them) so the routing changes per iteration.
        let batch = t * c.hidden;
        // (Warm-up included: a batch seen in warm-up would come back timed, routing and all.)
        let pool = (((256usize << 20) / (4 * batch).max(1)).max(2)).min((args.warmup + args.iters).max(2));
        let xs: Vec<Tensor<B>> = (0..pool)
            .map(|p| {
                Tensor::from_f32(b, DType::F32, &[t, c.hidden], &uniform(batch, 1.0, args.seed ^ ((p as u64 + 1) * 0x9E37) ^ t as u64))
            })
            .collect::<Result<_>>()?;
        let mut out = Tensor::alloc(b, DType::F32, &[t, c.hidden])?;
        let mut ids = Tensor::alloc(b, DType::U32, &[t, c.top_k])?;
        let mut w = Tensor::alloc(b, DType::F32, &[t, c.top_k])?;
        let (mut times, mut floors, mut bytes_v, mut touched_sum) = (vec![], vec![], vec![], 0usize);
        let mut flops = 0.0;
        let mut replay = if graph { Some(crate::graphs::Replay::capture(b, layer, &xs[0], &mut out, &mut ids, &mut w)?) } else { None };
        for it in 0..args.warmup + args.iters {
            let x = &xs[it % pool];
            let dt = match replay.as_mut() {
                Some(r) => r.time(b, x)?,
                None => {
                    b.synchronize()?;
                    let start = Instant::now();
                    ops::forward(b, layer, x, &mut out, &mut ids, &mut w)?;
                    b.synchronize()?;
                    start.elapsed().as_secs_f64()
                }
            };
            self.progress.inc(1);
            *done += 1;
            if it < args.warmup {
                continue;
            }
            let mut seen = vec![false; c.experts];
            // (An id out of range would be the backend's bug: not counted, never a panic here.)
            for e in ids.to_u32(b)? {
                if let Some(s) = seen.get_mut(e as usize) {
                    *s = true;
                }
            }
            let touched = seen.iter().filter(|&&s| s).count();
            let (bytes, f) = cost(c, args.dtype, t, touched);
            flops = f;
            let floor = (bytes / bw).max(peak.map_or(0.0, |p| f / p.0));
            times.push(dt);
            floors.push(floor);
            bytes_v.push(bytes);
            touched_sum += touched;
        }
        let n = times.len().max(1);
        let time_s = median(&mut times);
        let floor_s = median(&mut floors);
        let bytes = median(&mut bytes_v);
        Ok(Row {
            tokens: t,
            touched: touched_sum as f64 / n as f64,
            time_s,
            bytes,
            flops,
            floor_s,
            gbs: bytes / time_s / 1e9,
            tflops: flops / time_s / 1e12,
            fraction: floor_s / time_s,
            stages: if args.breakdown && !graph { self.stages(b, layer, &xs, &mut out, &mut ids, &mut w, done) } else { vec![] },
        })
    }

    /// `--iters` layers run stage by stage ([`moe_hal::forward::composed_in_stages`]), a
    /// synchronize after each stage: the median time of each. Empty (with a message) when the
    /// layer cannot run that way: a backend whose `forward` splits tokens into passes needs them
    /// at this size.
    #[allow(clippy::too_many_arguments)]
    fn stages<B: Backend>(
        &self,
        b: &B,
        layer: &Layer<B>,
        xs: &[Tensor<B>],
        out: &mut Tensor<B>,
        ids: &mut Tensor<B>,
        w: &mut Tensor<B>,
        done: &mut usize,
    ) -> Vec<Stage> {
        let stages = moe_hal::forward::STAGES;
        let mut times: Vec<Vec<f64>> = vec![vec![]; stages.len()];
        let mut run = |x: &Tensor<B>| -> Result<()> {
            b.synchronize()?;
            let mut mark = Instant::now();
            let mut at = 0;
            moe_hal::forward::composed_in_stages(b, layer, x, out, ids, w, &mut |_| {
                b.synchronize()?;
                times[at].push(mark.elapsed().as_secs_f64());
                at += 1;
                mark = Instant::now();
                Ok(())
            })
        };
        for it in 0..self.args.iters {
            if let Err(e) = run(&xs[it % xs.len()]) {
                self.progress.println(format!("  stage breakdown skipped: {e}"));
                self.progress.inc((self.args.iters - it) as u64);
                *done += self.args.iters - it;
                return vec![];
            }
            self.progress.inc(1);
            *done += 1;
        }
        stages.iter().zip(&mut times).map(|(name, t)| Stage { name: name.to_string(), time_s: median(t) }).collect()
    }
}

/// Iterations one token count runs (for the progress bar).
fn iterations(args: &BenchArgs) -> usize {
    args.warmup + args.iters + if args.breakdown { args.iters } else { 0 }
}

/// The config the flags describe: a preset (default DeepSeek-V3) with any field overridden.
pub fn config(args: &BenchArgs) -> Result<MoeConfig> {
    let mut c = args.preset.unwrap_or(Preset::DeepseekV3).config();
    c.hidden = args.hidden.unwrap_or(c.hidden);
    c.intermediate = args.intermediate.unwrap_or(c.intermediate);
    c.top_k = args.top_k.unwrap_or(c.top_k);
    if let Some(s) = args.shared {
        c.shared_intermediate = s
            .checked_mul(c.intermediate)
            .ok_or_else(|| Error::InvalidArgument(format!("--shared {s} experts of {} is too large", c.intermediate)))?;
    } else if c.shared_intermediate > 0 {
        c.shared_intermediate = c.intermediate;
    }
    if let Some(e) = args.experts {
        c.experts = e;
        if let Routing::SigmoidGrouped { n_group, topk_group, .. } = &mut c.routing {
            // Keep DeepSeek's grouping where it divides, else one group (as Kimi K2 does).
            if e % *n_group != 0 || c.top_k > (e / *n_group) * *topk_group {
                *n_group = 1;
                *topk_group = 1;
            }
        }
    }
    c.validate()?;
    if args.tokens.is_empty() || args.tokens.contains(&0) {
        return moe_hal::invalid!("--tokens needs positive token counts");
    }
    if args.iters == 0 {
        return moe_hal::invalid!("--iters must be at least 1");
    }
    for (flag, v) in [("--bandwidth-gbs", args.bandwidth_gbs), ("--peak-tflops", args.peak_tflops)] {
        if let Some(v) = v
            && !(v.is_finite() && v > 0.0)
        {
            return moe_hal::invalid!("{flag} must be a positive number, got {v}");
        }
    }
    Ok(c)
}

pub fn bench(args: &BenchArgs) -> Result<()> {
    let c = config(args)?;
    // Whatever would fail only after the run fails now.
    if let Some(path) = &args.plot {
        crate::plot::check(path)?;
        crate::out_file::check_writable(path, "--plot")?;
    }
    if let Some(path) = &args.json {
        crate::out_file::check_writable(path, "--json")?;
    }
    let peers = args.compare.as_deref().map(read_report).transpose()?;
    println!(
        "moe bench: {} ({}), {} weights, tokens {:?}, {} warm-up + {} timed iterations each, a distinct batch (and its routing) \
         per iteration from a pool of at most 256 MiB of inputs",
        args.preset
            .and_then(|p| clap::ValueEnum::to_possible_value(&p))
            .map_or("deepseek-v3 (default)".into(), |v| v.get_name().to_string()),
        shape_name(&c),
        args.dtype,
        args.tokens,
        args.warmup,
        args.iters
    );
    let graph_runs = if args.cuda_graphs { args.backends.iter().filter(|c| matches!(c, Choice::Cuda | Choice::Auto)).count() } else { 0 };
    let total =
        (args.backends.len() * args.tokens.len() * iterations(args) + graph_runs * args.tokens.len() * (args.warmup + args.iters)) as u64;
    let progress = indicatif::ProgressBar::new(total);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} iterations {elapsed}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let mut report = Report { date: today(), commit: commit(), runs: vec![] };
    let host = std::sync::OnceLock::new();
    // A backend that fails (unavailable, out of memory while uploading) does not lose the others'
    // results: they are printed and written, and the command then fails naming it.
    let mut failed = Vec::new();
    for &choice in &args.backends {
        let runs = match dispatch(choice, Measure { args, config: &c, progress: &progress, host: &host }) {
            Ok(runs) => runs,
            Err(e) => {
                progress.println(format!("{}: {e}", backend_name(choice)));
                failed.push((choice, e));
                continue;
            }
        };
        if let Some(run) = runs.first() {
            progress.println(format!(
                "{}: {} copy bandwidth {:.1} GB/s (measured now), peak {}",
                run.backend,
                run.device,
                run.copy_bandwidth_gbs,
                run.peak_tflops.map_or("unknown".into(), |p| format!("{p:.1} TFLOP/s ({})", run.peak_source))
            ));
        }
        report.runs.extend(runs);
    }
    progress.finish_and_clear();
    print_runs(&report);
    if let Some(peers) = &peers {
        print_ratios(&report, peers);
    }
    // Nothing measured (every backend failed, or skipped every token count): no file is worth
    // writing, and the command fails.
    if report.runs.iter().all(|r| r.rows.is_empty()) {
        return match failed.into_iter().next() {
            Some((_, e)) => Err(e),
            None => moe_hal::invalid!(
                "nothing was measured: every token count was skipped (the reasons are above){}",
                if args.json.is_some() || args.plot.is_some() { "; no file was written" } else { "" }
            ),
        };
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| Error::Io(e.to_string()))?;
        crate::out_file::write_bytes(path, text.as_bytes())?;
        println!("wrote {}", path.display());
    }
    if let Some(path) = &args.plot {
        let mut all = report.runs.clone();
        if let Some(p) = &peers {
            all.extend(p.runs.iter().filter(|r| r.shape == shape_name(&c) && r.dtype == args.dtype.to_string()).cloned());
        }
        crate::plot::plot(path, &format!("{} {}", shape_name(&c), args.dtype), &all)?;
        println!("wrote {}", path.display());
    }
    // The first failure is the command's error (every one was printed as it happened).
    match failed.into_iter().next() {
        Some((choice, e)) if !report.runs.is_empty() => {
            eprintln!("moe bench: {} failed; the results above are the other backends'", backend_name(choice));
            Err(e)
        }
        Some((_, e)) => Err(e),
        None => Ok(()),
    }
}

fn backend_name(choice: Choice) -> String {
    clap::ValueEnum::to_possible_value(&choice).map_or_else(|| format!("{choice:?}"), |v| v.get_name().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--cuda-graphs` on the CUDA backend's CPU emulator (which records a capture and replays
    /// it): a second run named `cuda+cudagraph` with a row per token count, whose replays touched
    /// the same experts as the eager rows on the same batches (the routing came from the graph's
    /// own output each time). Skips where the emulator cannot be built (no g++ 12), unless
    /// `MOE_REQUIRE_BACKENDS` names `cudaemu`.
    #[test]
    fn cuda_graph_rows_on_the_emulator() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            args: BenchArgs,
        }
        let emu = match moe_cuda::CudaBackend::emulator() {
            Ok(b) => b,
            Err(e) if std::env::var("MOE_REQUIRE_BACKENDS").is_ok_and(|v| v.split(',').any(|n| n.trim() == "cudaemu")) => {
                panic!("MOE_REQUIRE_BACKENDS names cudaemu: {e}")
            }
            Err(e) => return println!("skipping: {e}"),
        };
        let args = <Cli as clap::Parser>::try_parse_from([
            "bench",
            "--hidden",
            "64",
            "--intermediate",
            "16",
            "--experts",
            "16",
            "--top-k",
            "4",
            "--tokens",
            "1,9",
            "--iters",
            "3",
            "--warmup",
            "1",
            "--bandwidth-gbs",
            "10",
            "--cuda-graphs",
        ])
        .unwrap()
        .args;
        let c = config(&args).unwrap();
        let (progress, host) = (indicatif::ProgressBar::hidden(), std::sync::OnceLock::new());
        let runs = Measure { args: &args, config: &c, progress: &progress, host: &host }.run(&emu).unwrap();
        assert_eq!(runs.iter().map(|r| r.backend.as_str()).collect::<Vec<_>>(), ["cuda", "cuda+cudagraph"]);
        for run in &runs {
            assert!(run.skipped.is_empty(), "{}: {:?}", run.backend, run.skipped);
            assert_eq!(run.rows.iter().map(|r| r.tokens).collect::<Vec<_>>(), [1, 9]);
            assert!(run.rows.iter().all(|r| r.time_s > 0.0 && r.touched >= 4.0), "{}", run.backend);
        }
        for (eager, graph) in runs[0].rows.iter().zip(&runs[1].rows) {
            assert_eq!(eager.touched, graph.touched, "{} tokens", eager.tokens);
        }
    }
}
