//! SVG bar charts of a run (plotters' SVG backend: text is left to the
//! viewer, so no font files are needed).

use std::path::Path;

use plotters::prelude::*;

/// One bar series: a target, and its value per category (None: skipped).
pub struct Series {
    pub name: String,
    pub values: Vec<Option<f64>>,
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Grouped bars: one group per category, one bar per series.
pub fn bars(
    path: &Path,
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[Series],
) -> Result<(), String> {
    let e = |e: &dyn std::fmt::Display| format!("plot {}: {e}", path.display());
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0f64, |a, b| a.max(*b))
        .max(1.0)
        * 1.1;
    let n = categories.len().max(1);
    let root = SVGBackend::new(path, (160 * n as u32 + 200, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(48)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            // Labels at group centres only.
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < categories.len() {
                categories[i].clone()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.0}"))
        .y_desc(y_label)
        .draw()
        .map_err(|x| e(&x))?;
    let width = 0.8 / series.len().max(1) as f64;
    for (si, s) in series.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        let rects = s.values.iter().enumerate().filter_map(|(ci, v)| {
            let v = (*v)?;
            let x0 = ci as f64 + 0.1 + si as f64 * width;
            Some(Rectangle::new(
                [(x0, 0.0), (x0 + width * 0.95, v)],
                color.filled(),
            ))
        });
        chart
            .draw_series(rects)
            .map_err(|x| e(&x))?
            .label(s.name.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}
