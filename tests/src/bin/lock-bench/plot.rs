//! SVG plots of the report: throughput against node count, and contended waits.

use std::path::{Path, PathBuf};

use plotters::prelude::*;

use crate::Figure;

/// Series of (nodes, value) for one backend and scenario.
fn series(figures: &[Figure], backend: &str, scenario: &str) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = figures
        .iter()
        .filter(|f| f.backend == backend && f.scenario == scenario)
        .filter_map(|f| f.nodes.map(|n| (f64::from(n), f.value)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    points
}

/// Draws one line chart of `lines` (label, scenario, backend) over node counts.
fn line_chart(
    path: &Path,
    title: &str,
    y_label: &str,
    figures: &[Figure],
    lines: &[(&str, &str, &str)],
) -> Result<(), Box<dyn std::error::Error>> {
    let data: Vec<(&str, Vec<(f64, f64)>)> = lines
        .iter()
        .map(|(label, backend, scenario)| (*label, series(figures, backend, scenario)))
        .filter(|(_, points)| !points.is_empty())
        .collect();
    if data.is_empty() {
        return Ok(());
    }
    let top = data
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, y)| *y))
        .fold(0.0, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(0.5f64..5.5f64, 0f64..top.max(1.0))?;
    chart
        .configure_mesh()
        .x_desc("nodes")
        .y_desc(y_label)
        .draw()?;
    for (index, (label, points)) in data.into_iter().enumerate() {
        let color = Palette99::pick(index).to_rgba();
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .into_iter()
                .map(|point| Circle::new(point, 4, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Writes the plots beside the JSON report and returns their paths.
pub(crate) fn write(
    dir: &Path,
    figures: &[Figure],
) -> Result<Vec<PathBuf>, Box<dyn std::error::Error>> {
    let uncontended = crate::limit::SEQUENTIAL;
    let throughput = dir.join("throughput.svg");
    line_chart(
        &throughput,
        "Uncontended acquire+release vs node count",
        "cycles/s",
        figures,
        &[
            ("redlock (manager)", "redlock (manager)", uncontended),
            ("redlock (pool)", "redlock (pool)", uncontended),
            ("rslock", "rslock", uncontended),
        ],
    )?;
    let tuned = "contended handoff, 8 tasks, 1 ms sections, tuned: 5 ms delay + 5 ms jitter";
    let p50 = format!("{tuned}: p50 wait");
    let p99 = format!("{tuned}: p99 wait");
    let waits = dir.join("contended-waits.svg");
    line_chart(
        &waits,
        "Contended hand-off waits (8 tasks, tuned retries)",
        "ms",
        figures,
        &[
            ("ours p50", "redlock (manager, fair)", &p50),
            ("ours p99", "redlock (manager, fair)", &p99),
            ("rslock p50", "rslock", &p50),
            ("rslock p99", "rslock", &p99),
        ],
    )?;
    Ok(vec![throughput, waits])
}
