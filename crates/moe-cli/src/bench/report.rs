//! What `moe bench` reports: the rows, runs and JSON schema the peers scripts write too, and the
//! printed tables.

use moe_hal::{Error, MoeConfig, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// One token count's measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Row {
    pub tokens: usize,
    /// Mean experts touched per iteration.
    pub touched: f64,
    /// Median seconds per layer.
    pub time_s: f64,
    /// Median bytes the layer had to move.
    pub bytes: f64,
    pub flops: f64,
    /// `max(bytes / bandwidth, flops / peak)`.
    pub floor_s: f64,
    /// Achieved GB/s and TFLOP/s, and `floor_s / time_s`.
    pub gbs: f64,
    pub tflops: f64,
    pub fraction: f64,
    /// With `--breakdown`: median seconds of each stage run on its own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stages: Vec<Stage>,
}

/// One stage of the layer timed on its own (`--breakdown`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub time_s: f64,
}

/// One backend (or peer) over all token counts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub backend: String,
    pub device: String,
    pub shape: String,
    pub dtype: String,
    pub copy_bandwidth_gbs: f64,
    pub peak_tflops: Option<f64>,
    pub peak_source: String,
    pub rows: Vec<Row>,
    #[serde(default)]
    pub skipped: Vec<String>,
    /// What was timed, where it differs from `moe bench` (the peers scripts say whether the
    /// router was timed); printed with the ratios.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// The JSON file `moe bench --json` and the peers scripts write.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub date: String,
    pub commit: String,
    pub runs: Vec<Run>,
}

pub(super) fn format_stages(stages: &[Stage]) -> String {
    let parts: Vec<String> = stages.iter().map(|s| format!("{} {:.3}", s.name, s.time_s * 1e3)).collect();
    format!("{:>8} stages (ms, each alone): {}  (sum {:.3})", "", parts.join("  "), stages.iter().map(|s| s.time_s).sum::<f64>() * 1e3)
}

pub(super) fn format_row(backend: &str, r: &Row) -> String {
    format!(
        "{backend:>8} {:>6} tok  {:>6.1} experts  {:>10.3} ms  floor {:>9.3} ms  {:>5.2} of floor  {:>8.1} GB/s  {:>7.2} TFLOP/s",
        r.tokens,
        r.touched,
        r.time_s * 1e3,
        r.floor_s * 1e3,
        r.fraction,
        r.gbs,
        r.tflops
    )
}

pub(super) fn commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

pub(super) fn today() -> String {
    std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

pub(super) fn read_report(path: &Path) -> Result<Report> {
    // 256 MiB: a report is a few KiB per run.
    let bytes = crate::in_file::read_regular(path, "--compare", Some(256 << 20))?;
    let report: Report =
        serde_json::from_slice(&bytes).map_err(|e| Error::InvalidArgument(format!("{} is not a bench report: {e}", path.display())))?;
    // A time or a floor that is not a positive number would print as a nonsense ratio.
    for run in &report.runs {
        for r in &run.rows {
            if !(r.time_s.is_finite() && r.time_s > 0.0 && r.floor_s.is_finite() && r.floor_s > 0.0) {
                return moe_hal::invalid!(
                    "{}: {} at {} tokens has time_s {} and floor_s {}; times must be positive seconds",
                    path.display(),
                    run.backend,
                    r.tokens,
                    r.time_s,
                    r.floor_s
                );
            }
        }
    }
    Ok(report)
}

/// The table of every run: a header per run (its copy bandwidth and peak where it measured
/// them), a line per token count, the stage breakdown under it, and what was skipped.
pub(super) fn print_runs(report: &Report) {
    for run in &report.runs {
        // A run skipped before measuring anything has no bandwidth or peak to show.
        let measured = if run.copy_bandwidth_gbs > 0.0 {
            format!(
                ": copy {:.1} GB/s, peak {}",
                run.copy_bandwidth_gbs,
                run.peak_tflops.map_or("unknown".into(), |p| format!("{p:.1} TFLOP/s"))
            )
        } else {
            String::new()
        };
        println!("\n{} on {} ({}, {}){measured}", run.backend, run.device, run.shape, run.dtype);
        for r in &run.rows {
            println!("{}", format_row(&run.backend, r));
            if !r.stages.is_empty() {
                println!("{}", format_stages(&r.stages));
            }
        }
        for s in &run.skipped {
            println!("  {s}");
        }
    }
}

/// Peer time over ours, per token count (above 1: we are faster). Rows pair by shape, dtype and
/// token count, and graph runs (`+cudagraph`) with graph runs only; each peer's note (what it
/// timed) is printed once, and a comparison that pairs nothing says so.
pub(super) fn print_ratios(ours: &Report, peers: &Report) {
    println!("\nratio = peer time / our time (above 1: moe-hal is faster)");
    for line in ratio_lines(ours, peers) {
        println!("{line}");
    }
}

/// The lines of [`print_ratios`] after its header.
fn ratio_lines(ours: &Report, peers: &Report) -> Vec<String> {
    let graph = |backend: &str| backend.ends_with("+cudagraph");
    let (mut lines, mut paired) = (Vec::new(), 0);
    let mut noted = std::collections::HashSet::new();
    for run in &ours.runs {
        let same = |p: &&Run| p.shape == run.shape && p.dtype == run.dtype && graph(&p.backend) == graph(&run.backend);
        for peer in peers.runs.iter().filter(same) {
            if let Some(note) = &peer.note
                && noted.insert(peer.backend.clone())
            {
                lines.push(format!("  {} timed: {note}", peer.backend));
            }
            for r in &run.rows {
                if let Some(p) = peer.rows.iter().find(|p| p.tokens == r.tokens) {
                    lines.push(format!(
                        "{:>8} vs {:<24} {:>6} tok  {:>8.3} ms vs {:>8.3} ms  ratio {:.2}",
                        run.backend,
                        peer.backend,
                        r.tokens,
                        r.time_s * 1e3,
                        p.time_s * 1e3,
                        p.time_s / r.time_s
                    ));
                    paired += 1;
                }
            }
        }
    }
    if paired == 0 {
        lines.push("  (no row pairs: the comparison file has no run of this shape, dtype and token counts)".into());
    }
    lines
}

pub(super) fn shape_name(c: &MoeConfig) -> String {
    format!("H{} I{} E{} k{} S{}", c.hidden, c.intermediate, c.experts, c.top_k, c.shared_intermediate)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(backend: &str, shape: &str, tokens_and_times: &[(usize, f64)], note: Option<&str>) -> Run {
        let row = |&(tokens, time_s): &(usize, f64)| Row {
            tokens,
            touched: 1.0,
            time_s,
            bytes: 1.0,
            flops: 1.0,
            floor_s: 1e-3,
            gbs: 1.0,
            tflops: 1.0,
            fraction: 0.5,
            stages: vec![],
        };
        Run {
            backend: backend.into(),
            device: "d".into(),
            shape: shape.into(),
            dtype: "bf16".into(),
            copy_bandwidth_gbs: 1.0,
            peak_tflops: None,
            peak_source: String::new(),
            rows: tokens_and_times.iter().map(row).collect(),
            skipped: vec![],
            note: note.map(str::to_string),
        }
    }

    /// Eager rows pair with eager peers, graph rows with graph peers, by shape and token count;
    /// each peer's note shows once; nothing to pair says so.
    #[test]
    fn ratios_pair_like_with_like_and_show_what_peers_timed() {
        let report = |runs| Report { date: String::new(), commit: String::new(), runs };
        let ours = report(vec![run("cuda", "S", &[(1, 1e-3), (16, 2e-3)], None), run("cuda+cudagraph", "S", &[(1, 5e-4)], None)]);
        let peers = report(vec![
            run("torch", "S", &[(1, 2e-3), (16, 2e-3)], Some("no router")),
            run("torch+cudagraph", "S", &[(1, 1e-3)], None),
            run("torch", "other shape", &[(1, 9.0)], None),
        ]);
        let lines = ratio_lines(&ours, &peers);
        assert_eq!(lines.iter().filter(|l| l.contains("timed: no router")).count(), 1, "{lines:#?}");
        let pairs: Vec<&String> = lines.iter().filter(|l| l.contains(" vs ")).collect();
        assert_eq!(pairs.len(), 3, "{lines:#?}");
        assert!(pairs[0].contains("cuda vs torch ") && pairs[0].ends_with("ratio 2.00"), "{}", pairs[0]);
        assert!(pairs[2].contains("cuda+cudagraph vs torch+cudagraph") && pairs[2].ends_with("ratio 2.00"), "{}", pairs[2]);
        let none = ratio_lines(&ours, &report(vec![run("torch", "other shape", &[(1, 1.0)], None)]));
        assert_eq!(none, ["  (no row pairs: the comparison file has no run of this shape, dtype and token counts)"]);
    }
}
