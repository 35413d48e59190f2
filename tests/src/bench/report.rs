//! What a benchmark writes: Markdown tables (for BENCHMARKS.md), one JSON
//! file with every figure, and an SVG line plot written by hand (a few
//! dozen elements; no plotting crate needed).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;

use anyhow::{Context, Result};

/// The value at quantile `q` (0 to 1) of `values`, nearest rank; `NaN`
/// when there are none.
#[must_use]
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// The median over runs of each step: `runs[r][t]` is run `r`'s count at
/// step `t`; steps beyond the shortest run are left out.
#[must_use]
pub fn median_per_step(runs: &[&[u32]]) -> Vec<f64> {
    let steps = runs.iter().map(|r| r.len()).min().unwrap_or(0);
    (0..steps)
        .map(|t| crate::stats::median(&runs.iter().map(|r| f64::from(r[t])).collect::<Vec<_>>()))
        .collect()
}

/// Milliseconds with a precision that suits them; `–` for none.
#[must_use]
pub fn fmt_ms(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// A Markdown table: a header, then rows; columns after the first are
/// right-aligned (figures).
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    #[must_use]
    pub fn new(header: &[&str]) -> Self {
        Self {
            header: header.iter().map(|h| (*h).to_owned()).collect(),
            rows: Vec::new(),
        }
    }

    /// Adds a row (cells beyond the header's are dropped, missing ones left
    /// empty).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table in GitHub Markdown.
    #[must_use]
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "| {} |", self.header.join(" | "));
        let align: Vec<&str> = (0..self.header.len())
            .map(|i| if i == 0 { "---" } else { "---:" })
            .collect();
        let _ = writeln!(s, "|{}|", align.join("|"));
        for row in &self.rows {
            let cells: Vec<&str> = (0..self.header.len())
                .map(|i| row.get(i).map_or("", String::as_str))
                .collect();
            let _ = writeln!(s, "| {} |", cells.join(" | "));
        }
        s
    }
}

/// Writes `value` as pretty JSON to `path`.
///
/// # Errors
/// When the file cannot be written.
pub fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
}

/// One line of a [`LinePlot`].
pub struct Series {
    pub name: String,
    /// `#rrggbb`.
    pub color: String,
    /// One value per x step (0, 1, 2, …).
    pub points: Vec<f64>,
    /// A second, smaller line under the name in the legend.
    pub note: String,
    /// Drawn dashed (a reference rather than a result).
    pub dashed: bool,
}

/// A line plot of series over the same x steps, with a legend on the
/// right.
pub struct LinePlot {
    pub title: String,
    /// Under the title, smaller; `\n` starts another line.
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
}

/// The smallest of 1, 2, 2.5, 5 × 10^n at or above `v` (at least 1): a
/// round top for an axis.
#[must_use]
pub fn nice_ceiling(v: f64) -> f64 {
    let v = v.max(1.0);
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if m * mag >= v {
            return m * mag;
        }
    }
    10.0 * mag
}

/// `&`, `<`, `>` and `"` as SVG text needs them.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

impl LinePlot {
    /// The plot as a standalone SVG document.
    #[must_use]
    pub fn svg(&self) -> String {
        let steps = self
            .series
            .iter()
            .map(|s| s.points.len())
            .max()
            .unwrap_or(0)
            .max(1);
        let legend_rows = self.series.len().max(1) as f64;
        let (w, h) = (900.0, (460.0f64).max(90.0 + legend_rows * 34.0));
        let sub_lines: Vec<&str> = self.subtitle.lines().collect();
        let extra = 12.0 * sub_lines.len().saturating_sub(1) as f64;
        let (left, right, top, bottom) = (70.0, 300.0, 50.0 + extra, 60.0);
        let h = h + extra;
        let (pw, ph) = (w - left - right, h - top - bottom);
        let ymax = nice_ceiling(
            self.series
                .iter()
                .flat_map(|s| s.points.iter().copied())
                .filter(|v| v.is_finite())
                .fold(0.0, f64::max)
                * 1.05,
        );
        let x = |t: f64| left + t / steps as f64 * pw;
        let y = |v: f64| top + ph - v / ymax * ph;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
        );
        let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{}" y="22" font-size="15" text-anchor="middle">{}</text>"#,
            w / 2.0,
            escape(&self.title)
        );
        for (i, line) in sub_lines.iter().enumerate() {
            let _ = writeln!(
                s,
                r##"<text x="{}" y="{}" font-size="10" text-anchor="middle" fill="#555">{}</text>"##,
                w / 2.0,
                38.0 + 12.0 * i as f64,
                escape(line)
            );
        }
        for i in 0..=5 {
            let v = ymax * f64::from(i) / 5.0;
            let yy = y(v);
            let _ = writeln!(
                s,
                r##"<line x1="{left}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
                left + pw,
                left - 6.0,
                yy + 4.0
            );
        }
        let tick = match steps {
            0..=10 => 1,
            11..=60 => 5,
            61..=300 => 30,
            _ => 60,
        };
        for t in (0..=steps).step_by(tick) {
            let xx = x(t as f64);
            let _ = writeln!(
                s,
                r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#333"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{t}</text>"##,
                top + ph,
                top + ph + 5.0,
                top + ph + 18.0
            );
        }
        let _ = writeln!(
            s,
            r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
        );
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            left + pw / 2.0,
            h - 18.0,
            escape(&self.x_label)
        );
        let _ = writeln!(
            s,
            r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
            top + ph / 2.0,
            escape(&self.y_label)
        );
        for (i, series) in self.series.iter().enumerate() {
            let pts: Vec<String> = series
                .points
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(t, v)| format!("{:.1},{:.1}", x(t as f64 + 0.5), y(*v)))
                .collect();
            let dash = if series.dashed {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="2.2"{dash} points="{}"/>"#,
                series.color,
                pts.join(" ")
            );
            let ly = top + 10.0 + i as f64 * 34.0;
            let lx = left + pw + 15.0;
            let _ = writeln!(
                s,
                r##"<line x1="{lx:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{}" stroke-width="3"{dash}/><text x="{:.1}" y="{:.1}">{}</text><text x="{:.1}" y="{:.1}" font-size="10" fill="#555">{}</text>"##,
                lx + 24.0,
                series.color,
                lx + 30.0,
                ly + 4.0,
                escape(&series.name),
                lx + 30.0,
                ly + 17.0,
                escape(&series.note)
            );
        }
        s.push_str("</svg>\n");
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_tables_and_plots() {
        assert_eq!(quantile(&[3.0, 1.0, 2.0, 4.0], 0.5), 2.0);
        assert_eq!(quantile(&[3.0, 1.0, 2.0, 4.0], 0.99), 4.0);
        assert!(quantile(&[], 0.5).is_nan());
        assert_eq!(nice_ceiling(180.0), 200.0);
        assert_eq!(
            median_per_step(&[&[1, 5, 9], &[3, 1], &[2, 2, 2]]),
            vec![2.0, 2.0]
        );
        assert_eq!(nice_ceiling(0.2), 1.0);
        let mut t = Table::new(&["setup", "msg/s"]);
        t.row(vec!["a".into(), "1".into()]);
        assert_eq!(t.markdown(), "| setup | msg/s |\n|---|---:|\n| a | 1 |\n");
        let svg = LinePlot {
            title: "t <1>".into(),
            subtitle: String::new(),
            x_label: "s".into(),
            y_label: "m".into(),
            series: vec![Series {
                name: "a & b".into(),
                color: "#000000".into(),
                points: vec![1.0, f64::NAN, 3.0],
                note: String::new(),
                dashed: true,
            }],
        }
        .svg();
        assert!(svg.contains("t &lt;1&gt;") && svg.contains("a &amp; b"));
        assert!(svg.contains("stroke-dasharray") && svg.ends_with("</svg>\n"));
    }
}
