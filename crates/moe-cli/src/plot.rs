//! The bench plot: time and floor against tokens, log axes, one line per backend and peer; SVG
//! or PNG by the file's extension.

use crate::bench::Run;
use moe_hal::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use std::path::Path;

/// TrueType fonts the plot's text can use, first found wins (plotters lays out text with the
/// font's metrics, for SVG too).
const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a system TrueType font as plotters' "sans-serif" (once per process).
fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<std::result::Result<(), String>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONTS.iter().find_map(|p| std::fs::read(p).ok()).ok_or_else(|| {
            format!(
                "a plot needs a TrueType font for its text and none of {} exists; install one (Debian: fonts-dejavu-core)",
                FONTS.join(", ")
            )
        })?;
        plotters::style::register_font("sans-serif", FontStyle::Normal, Box::leak(bytes.into_boxed_slice()))
            .map_err(|_| "the font file is not a TrueType font".to_string())
    })
    .clone()
    .map_err(Error::InvalidArgument)
}

/// What [`plot`] needs besides rows, checked before a bench runs: a `.svg` or `.png` name and a
/// font for the text.
pub fn check(path: &Path) -> Result<()> {
    match extension(path).as_deref() {
        Some("svg" | "png") => register_font(),
        _ => moe_hal::invalid!("--plot writes SVG or PNG; name the file *.svg or *.png (got {})", path.display()),
    }
}

/// The file's extension in lower case (`p.SVG` is an SVG too).
fn extension(path: &Path) -> Option<String> {
    path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase)
}

/// Writes the plot to `path` (atomically, [`crate::out_file::write_atomic`]): SVG for `.svg`,
/// PNG for `.png`.
pub fn plot(path: &Path, title: &str, runs: &[Run]) -> Result<()> {
    if !runs.iter().any(|r| !r.rows.is_empty()) {
        return Err(Error::InvalidArgument("nothing to plot: every row was skipped".into()));
    }
    check(path)?;
    // Both backends lay text out with the registered font's metrics; the temporary file keeps
    // the extension.
    crate::out_file::write_atomic(path, |tmp| {
        if extension(path).as_deref() == Some("svg") {
            draw(SVGBackend::new(tmp, (900, 600)).into_drawing_area(), path, title, runs)
        } else {
            draw(BitMapBackend::new(tmp, (900, 600)).into_drawing_area(), path, title, runs)
        }
    })
}

fn draw<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, path: &Path, title: &str, runs: &[Run]) -> Result<()> {
    let err = |e: &dyn std::fmt::Display| Error::Io(format!("cannot draw {}: {e}", path.display()));
    let rows = || runs.iter().flat_map(|r| r.rows.iter());
    let (tmin, tmax) = rows().fold((f64::MAX, 0f64), |(a, b), r| (a.min(r.tokens as f64), b.max(r.tokens as f64)));
    let (ymin, ymax) =
        rows().fold((f64::MAX, 0f64), |(a, b), r| (a.min(r.time_s.min(r.floor_s) * 1e3), b.max(r.time_s.max(r.floor_s) * 1e3)));
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(format!("MoE layer: {title}"), ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((tmin * 0.8..tmax * 1.25).log_scale(), (ymin * 0.7..ymax * 1.4).log_scale())
        .map_err(|e| err(&e))?;
    chart.configure_mesh().x_desc("tokens").y_desc("ms per layer").draw().map_err(|e| err(&e))?;
    for (i, run) in runs.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        let pts: Vec<(f64, f64)> = run.rows.iter().map(|r| (r.tokens as f64, r.time_s * 1e3)).collect();
        chart
            .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(format!("{} ({})", run.backend, run.device))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, color.filled()))).map_err(|e| err(&e))?;
        let floor: Vec<(f64, f64)> = run.rows.iter().map(|r| (r.tokens as f64, r.floor_s * 1e3)).collect();
        if !floor.is_empty() && run.copy_bandwidth_gbs > 0.0 {
            chart
                .draw_series(DashedLineSeries::new(floor, 6, 4, color.mix(0.6).stroke_width(1)))
                .map_err(|e| err(&e))?
                .label(format!("floor of {}", run.device))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.mix(0.6)));
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
