//! The SVG plot: requests/s and failed requests/s over time, one panel per run, events (HUPs,
//! recycles) marked along the top.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::rolls::EventRun;

/// Draws one panel per run into an SVG at `path`.
pub fn rolls_svg(path: &Path, runs: &[(String, &EventRun)]) -> anyhow::Result<()> {
    let height = 260 * u32::try_from(runs.len().max(1))?;
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let panels = root.split_evenly((runs.len().max(1), 1));
    for (panel, (title, run)) in panels.iter().zip(runs) {
        draw_panel(panel, title, run)?;
    }
    root.present().map_err(plot_err)?;
    Ok(())
}

fn draw_panel(
    panel: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    run: &EventRun,
) -> anyhow::Result<()> {
    let per_sec = 1.0 / run.load.bucket.as_secs_f64();
    let width = run.load.bucket.as_secs_f64();
    // The last bucket is partial (the run ended inside it): leave it out.
    let full = run.load.series.len().saturating_sub(1);
    let points = |pick: fn(&(u64, u64)) -> u64| -> Vec<(f64, f64)> {
        run.load.series[..full]
            .iter()
            .enumerate()
            .map(|(i, b)| ((i as f64 + 0.5) * width, pick(b) as f64 * per_sec))
            .collect()
    };
    let ok = points(|b| b.0);
    let failed = points(|b| b.1);
    let x_max = (full as f64 * width).max(1.0);
    let y_max = ok.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let mut chart = ChartBuilder::on(panel)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("seconds")
        .y_desc("per second")
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(plot_err)?;
    let marker = RGBColor(150, 150, 150);
    chart
        .draw_series(
            run.events
                .iter()
                .filter(|&&e| e < x_max)
                .map(|&e| PathElement::new(vec![(e, y_max * 0.93), (e, y_max)], marker)),
        )
        .map_err(plot_err)?
        .label("event (HUP / recycle)")
        .legend(move |(x, y)| PathElement::new(vec![(x + 10, y - 6), (x + 10, y + 6)], marker));
    chart
        .draw_series(LineSeries::new(ok, &BLUE))
        .map_err(plot_err)?
        .label("ok requests/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(LineSeries::new(failed, RED.stroke_width(2)))
        .map_err(plot_err)?
        .label("failed requests/s")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}
