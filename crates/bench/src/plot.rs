//! `--plot DIR`: PNG charts of a sweep, latency percentiles against offered load per design.
//!
//! Text is drawn with a TrueType font read at run time (DejaVu Sans, Debian's
//! `fonts-dejavu-core`, or the file `QUIVER_PLOT_FONT` names), so the binary needs neither
//! fontconfig nor an embedded font.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Context, Result};
use plotters::prelude::*;

/// One offered load of one design.
#[derive(Clone, Debug)]
pub struct Point {
    /// Offered operations per second (events + predictions).
    pub offered: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub freshness_p99_ms: f64,
}

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];

/// Registers the chart font once per process.
fn font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let path = std::env::var("QUIVER_PLOT_FONT")
            .ok()
            .or_else(|| {
                FONT_PATHS
                    .iter()
                    .find(|p| Path::new(p).exists())
                    .map(|p| p.to_string())
            })
            .ok_or_else(|| {
                "--plot needs a TrueType font: install fonts-dejavu-core or set QUIVER_PLOT_FONT"
                    .to_string()
            })?;
        let bytes = std::fs::read(&path).map_err(|e| format!("{path}: {e}"))?;
        // plotters keeps registered fonts for the life of the process.
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| format!("{path} is not a TrueType font"))
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

const COLORS: [RGBColor; 2] = [RGBColor(0x1f, 0x77, 0xb4), RGBColor(0xd6, 0x27, 0x28)];

/// Writes `decoupling_latency.png` (predict p50/p99/p99.9) and `decoupling_freshness.png`
/// (write → visible p99) into `dir`; returns the files.
pub fn decoupling(dir: &Path, designs: &[(&str, Vec<Point>)]) -> Result<Vec<PathBuf>> {
    font()?;
    std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
    let latency = dir.join("decoupling_latency.png");
    chart(
        &latency,
        "Predict latency vs offered load",
        "predict latency (ms, log scale)",
        designs,
        &[
            ("p50", |p: &Point| p.p50_ms),
            ("p99", |p: &Point| p.p99_ms),
            ("p99.9", |p: &Point| p.p999_ms),
        ],
    )?;
    let freshness = dir.join("decoupling_freshness.png");
    chart(
        &freshness,
        "Freshness (event produced → readable) vs offered load",
        "freshness p99 (ms, log scale)",
        designs,
        &[("p99", |p: &Point| p.freshness_p99_ms)],
    )?;
    Ok(vec![latency, freshness])
}

type Metric = (&'static str, fn(&Point) -> f64);

fn chart(
    path: &Path,
    title: &str,
    y_desc: &str,
    designs: &[(&str, Vec<Point>)],
    metrics: &[Metric],
) -> Result<()> {
    let points = || designs.iter().flat_map(|(_, ps)| ps.iter());
    let values = || points().flat_map(|p| metrics.iter().map(move |(_, f)| f(p)));
    // Linear in load (a sweep spans about one decade; plotters labels a log axis only at powers
    // of ten, which such a range may not contain), logarithmic in latency.
    let x_max = points().map(|p| p.offered).fold(1.0, f64::max) * 1.1;
    // A log axis needs positive bounds; an empty histogram reads 0.
    let y_min = values()
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min)
        .clamp(1e-3, 1.0)
        / 2.0;
    let y_max = values().fold(1.0, f64::max) * 2.0;

    let root = BitMapBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut c = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(52)
        .y_label_area_size(72)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max).log_scale())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    c.configure_mesh()
        .x_desc("offered events + predictions per second")
        .x_label_formatter(&|x| format!("{:.0}k", x / 1e3))
        .y_desc(y_desc)
        .label_style(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for (d, (name, ps)) in designs.iter().enumerate() {
        let color = COLORS[d % COLORS.len()];
        for (m, (metric, f)) in metrics.iter().enumerate() {
            let style = ShapeStyle {
                color: color.mix(1.0 - 0.3 * m as f64),
                filled: true,
                stroke_width: 3 - m.min(2) as u32,
            };
            let data: Vec<(f64, f64)> = ps.iter().map(|p| (p.offered, f(p).max(y_min))).collect();
            c.draw_series(LineSeries::new(data.clone(), style))
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .label(format!("{name} {metric}"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
            c.draw_series(data.into_iter().map(|xy| Circle::new(xy, 4, style)))
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
    }
    c.configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 15))
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pngs() {
        if let Err(e) = font() {
            // CI installs fonts-dejavu-core (.ci/run); elsewhere a missing font skips the test.
            assert!(std::env::var_os("CI").is_none(), "{e}");
            eprintln!("{e}: skipped");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let pts = |k: f64| {
            (1..=3)
                .map(|i| Point {
                    offered: 1000.0 * f64::from(i),
                    p50_ms: 0.1 * k * f64::from(i),
                    p99_ms: k * f64::from(i),
                    p999_ms: 2.0 * k * f64::from(i),
                    freshness_p99_ms: 0.0,
                })
                .collect::<Vec<_>>()
        };
        let files = decoupling(dir.path(), &[("a", pts(1.0)), ("b", pts(10.0))]).unwrap();
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            assert_eq!(&bytes[1..4], b"PNG", "{}", f.display());
            assert!(
                bytes.len() > 10_000,
                "{}: {} bytes",
                f.display(),
                bytes.len()
            );
        }
    }
}
