//! Training curves as a self-contained SVG (no fonts to rasterize: text is SVG text, lines are
//! polylines), so `asq train --plot curves.svg` works on a headless machine without extra
//! libraries.

use std::fmt::Write;

/// One line of a chart.
pub struct Series {
    /// Legend text.
    pub name: String,
    /// CSS colour.
    pub color: &'static str,
    /// Points (x, y); non-finite points are skipped.
    pub points: Vec<(f64, f64)>,
}

/// A chart: title, axis labels, lines.
pub struct Chart {
    /// Title.
    pub title: String,
    /// X axis label.
    pub x_label: String,
    /// Y axis label.
    pub y_label: String,
    /// Lines.
    pub series: Vec<Series>,
}

const W: f64 = 640.0;
const H: f64 = 300.0;
/// Margins: left, right, top, bottom.
const L: f64 = 64.0;
const R: f64 = 16.0;
const T: f64 = 36.0;
const B: f64 = 44.0;

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" tick step for a range.
fn step(span: f64) -> f64 {
    let raw = span / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

impl Chart {
    /// Draws the chart at vertical offset `y0` of a document.
    fn draw(&self, out: &mut String, y0: f64) {
        let pts = || {
            self.series
                .iter()
                .flat_map(|s| s.points.iter())
                .filter(|(x, y)| x.is_finite() && y.is_finite())
        };
        let (mut x0, mut x1, mut ya, mut yb) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
        for &(x, y) in pts() {
            (x0, x1, ya, yb) = (x0.min(x), x1.max(x), ya.min(y), yb.max(y));
        }
        if x0 > x1 {
            (x0, x1, ya, yb) = (0.0, 1.0, 0.0, 1.0);
        }
        if x1 - x0 < 1e-12 {
            x1 = x0 + 1.0;
        }
        if yb - ya < 1e-12 {
            yb = ya + 1.0;
        }
        let pad = 0.05 * (yb - ya);
        let (ya, yb) = (ya - pad, yb + pad);
        let sx = |x: f64| L + (x - x0) / (x1 - x0) * (W - L - R);
        let sy = |y: f64| y0 + T + (yb - y) / (yb - ya) * (H - T - B);
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" font-size="15" text-anchor="middle" font-weight="bold">{}</text>"#,
            W / 2.0,
            y0 + 22.0,
            escape(&self.title)
        );
        let _ = write!(
            out,
            r##"<rect x="{L}" y="{}" width="{}" height="{}" fill="none" stroke="#444"/>"##,
            y0 + T,
            W - L - R,
            H - T - B
        );
        let ys = step(yb - ya);
        let mut t = (ya / ys).ceil() * ys;
        while t <= yb {
            let y = sy(t);
            let _ = write!(
                out,
                r##"<line x1="{L}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" font-size="11" text-anchor="end">{}</text>"##,
                W - R,
                L - 6.0,
                y + 4.0,
                format_tick(t, ys)
            );
            t += ys;
        }
        let xs = step(x1 - x0);
        let mut t = (x0 / xs).ceil() * xs;
        while t <= x1 {
            let _ = write!(
                out,
                r#"<text x="{:.1}" y="{}" font-size="11" text-anchor="middle">{}</text>"#,
                sx(t),
                y0 + H - B + 16.0,
                format_tick(t, xs)
            );
            t += xs;
        }
        let _ = write!(
            out,
            r#"<text x="{}" y="{}" font-size="12" text-anchor="middle">{}</text><text x="14" y="{}" font-size="12" text-anchor="middle" transform="rotate(-90 14 {})">{}</text>"#,
            (L + W - R) / 2.0,
            y0 + H - 8.0,
            escape(&self.x_label),
            y0 + H / 2.0,
            y0 + H / 2.0,
            escape(&self.y_label)
        );
        for (i, s) in self.series.iter().enumerate() {
            let coords: Vec<String> = s
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y)))
                .collect();
            let _ = write!(
                out,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                s.color,
                coords.join(" ")
            );
            let ly = y0 + T + 14.0 + 16.0 * i as f64;
            let _ = write!(
                out,
                r#"<line x1="{}" y1="{ly:.1}" x2="{}" y2="{ly:.1}" stroke="{}" stroke-width="3"/><text x="{}" y="{:.1}" font-size="11">{}</text>"#,
                W - R - 150.0,
                W - R - 130.0,
                s.color,
                W - R - 124.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
    }
}

fn format_tick(v: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{v:.decimals$}")
}

/// An SVG document with the charts stacked vertically.
pub fn svg(charts: &[Chart]) -> String {
    let height = H * charts.len() as f64;
    let mut out = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" viewBox="0 0 {W} {height}" font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>"#
    );
    for (i, c) in charts.iter().enumerate() {
        c.draw(&mut out, H * i as f64);
    }
    out.push_str("</svg>\n");
    out
}

/// Exponential moving average (`alpha` weight of the new value), for noisy per-batch curves.
pub fn smooth(values: &[f64], alpha: f64) -> Vec<f64> {
    let mut m = None;
    values
        .iter()
        .map(|&v| {
            let s = m.map_or(v, |p: f64| p + alpha * (v - p));
            m = Some(s);
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed_svg_with_every_series() {
        let chart = Chart {
            title: "loss <&>".into(),
            x_label: "step".into(),
            y_label: "loss".into(),
            series: vec![
                Series {
                    name: "train".into(),
                    color: "#1f77b4",
                    points: (0..50)
                        .map(|i| (i as f64, 2.0 / (1.0 + i as f64)))
                        .collect(),
                },
                Series {
                    name: "flat".into(),
                    color: "#d62728",
                    points: vec![(0.0, 1.0), (1.0, 1.0), (2.0, f64::NAN)],
                },
            ],
        };
        let doc = svg(&[chart]);
        assert!(doc.starts_with("<svg") && doc.trim_end().ends_with("</svg>"));
        assert_eq!(doc.matches("<polyline").count(), 2);
        assert!(doc.contains("loss &lt;&amp;&gt;") && !doc.contains("NaN"));
        // Balanced tags: every opened element is closed or self-closed.
        let opens = doc.matches('<').count();
        assert_eq!(opens, doc.matches('>').count());
        // An empty chart still renders (no division by zero).
        let empty = svg(&[Chart {
            title: String::new(),
            x_label: String::new(),
            y_label: String::new(),
            series: vec![],
        }]);
        assert!(!empty.contains("NaN") && !empty.contains("inf"));
    }

    #[test]
    fn smoothing_and_ticks() {
        assert_eq!(smooth(&[1.0, 3.0], 0.5), vec![1.0, 2.0]);
        assert_eq!(step(10.0), 2.0);
        assert_eq!(step(0.3), 0.1);
        assert_eq!(format_tick(0.25, 0.05), "0.25");
    }
}
