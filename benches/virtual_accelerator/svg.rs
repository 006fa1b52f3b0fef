//! Minimal hand-written SVG line charts (no plotting crate).

use std::fmt::Write as _;

/// One line of a chart.
pub(crate) struct Series {
    pub(crate) name: String,
    pub(crate) points: Vec<(f64, f64)>,
    /// Dashed, for reference lines.
    pub(crate) dashed: bool,
}

const COLORS: [&str; 7] = [
    "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#7f7f7f", "#8c564b",
];

/// A line chart of `series`, with a logarithmic y axis if `log_y`.
pub(crate) fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> String {
    let (width, height) = (720.0, 440.0);
    let (left, right, top, bottom) = (80.0, 200.0, 40.0, 60.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let finite = |v: f64| v.is_finite() && (!log_y || v > 0.0);
    let xs = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|v| v.is_finite());
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|&v| finite(v));
    let x_max = xs.fold(0.0f64, f64::max) * 1.05;
    let y_values: Vec<f64> = ys.collect();
    let (y_min, y_max) = if log_y {
        let lo = y_values.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = y_values.iter().copied().fold(0.0f64, f64::max);
        (
            10f64.powf(lo.max(1e-3).log10().floor()),
            10f64.powf(hi.max(lo * 10.0).log10().ceil()),
        )
    } else {
        (0.0, y_values.iter().copied().fold(0.0f64, f64::max) * 1.1)
    };
    let x_of = |x: f64| left + x / x_max.max(1e-12) * plot_w;
    let y_of = |y: f64| {
        let t = if log_y {
            (y.log10() - y_min.log10()) / (y_max.log10() - y_min.log10())
        } else {
            (y - y_min) / (y_max - y_min).max(1e-12)
        };
        top + plot_h * (1.0 - t)
    };

    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        svg,
        r#"<rect width="{width}" height="{height}" fill="white"/><text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
        left + plot_w / 2.0,
        escape(title)
    );
    // Axes and grid.
    for i in 0..=5 {
        let x = x_max / 5.0 * i as f64;
        let px = x_of(x);
        let _ = writeln!(
            svg,
            r##"<line x1="{px:.1}" y1="{top}" x2="{px:.1}" y2="{:.1}" stroke="#eee"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + plot_h,
            top + plot_h + 16.0,
            short(x)
        );
    }
    let y_ticks: Vec<f64> = if log_y {
        let mut ticks = Vec::new();
        let mut tick = y_min;
        while tick <= y_max * 1.0001 {
            ticks.push(tick);
            tick *= 10.0;
        }
        ticks
    } else {
        (0..=5).map(|i| y_max / 5.0 * i as f64).collect()
    };
    for y in y_ticks {
        let py = y_of(y);
        let _ = writeln!(
            svg,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + plot_w,
            left - 6.0,
            py + 4.0,
            short(y)
        );
    }
    let _ = writeln!(
        svg,
        r##"<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        svg,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        left + plot_w / 2.0,
        height - 18.0,
        escape(x_label)
    );
    let _ = writeln!(
        svg,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">{}</text>"#,
        top + plot_h / 2.0,
        top + plot_h / 2.0,
        escape(y_label)
    );
    // Lines and legend.
    for (index, s) in series.iter().enumerate() {
        let color = COLORS[index % COLORS.len()];
        let points: Vec<String> = s
            .points
            .iter()
            .filter(|p| p.0.is_finite() && finite(p.1))
            .map(|&(x, y)| format!("{:.1},{:.1}", x_of(x), y_of(y.clamp(y_min, y_max))))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = writeln!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
            points.join(" ")
        );
        if !s.dashed {
            for point in &points {
                let (x, y) = point.split_once(',').expect("x,y");
                let _ = writeln!(svg, r#"<circle cx="{x}" cy="{y}" r="3" fill="{color}"/>"#);
            }
        }
        let ly = top + 14.0 + 20.0 * index as f64;
        let lx = left + plot_w + 14.0;
        let _ = writeln!(
            svg,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            escape(&s.name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn short(v: f64) -> String {
    if v >= 1000.0 {
        format!("{}k", (v / 100.0).round() / 10.0)
    } else if v >= 1.0 || v == 0.0 {
        format!("{}", (v * 10.0).round() / 10.0)
    } else {
        format!("{v}")
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
