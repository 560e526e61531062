//! The report's charts: SVG strings drawn with `plotters`. Each series is drawn in one colour
//! of its own (polylines, a circle for a lone point), so a reader of the SVG can count a
//! series' points by its stroke colour; the figure that wraps a chart lists them
//! (`data-series`).

use plotters::prelude::*;
use std::ops::Range;

/// A colour as `#rrggbb` (the form the SVG carries) and as plotters' colour.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Colour(pub u8, pub u8, pub u8);

impl Colour {
    pub fn hex(self) -> String {
        format!("#{:02X}{:02X}{:02X}", self.0, self.1, self.2)
    }
    fn rgb(self) -> RGBColor {
        RGBColor(self.0, self.1, self.2)
    }
}

/// A line, broken into segments where there is no data.
pub struct Series {
    pub name: String,
    pub colour: Colour,
    pub segments: Vec<Vec<(f64, f64)>>,
}

impl Series {
    pub fn points(&self) -> usize {
        self.segments.iter().map(Vec::len).sum()
    }
}

/// A shaded x interval (e.g. a hold).
pub struct Span {
    pub x: Range<f64>,
    pub colour: Colour,
}

/// A vertical line (a chunk boundary, an instruction).
pub struct Marker {
    pub x: f64,
    pub colour: Colour,
    pub width: u32,
}

/// What a chart draws.
pub struct Chart<'a> {
    pub title: &'a str,
    pub x_label: &'a str,
    pub y_label: &'a str,
    pub size: (u32, u32),
    /// None: the data's range.
    pub x: Option<Range<f64>>,
    pub series: &'a [Series],
    pub spans: &'a [Span],
    pub markers: &'a [Marker],
    /// Same scale on both axes (paths in metres).
    pub equal_axes: bool,
}

fn data_range(values: impl Iterator<Item = f64>) -> Option<Range<f64>> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    (lo <= hi).then_some(lo..hi)
}

/// `r` widened by 5% each side (and to a unit-ish span when it is a point).
fn padded(r: Range<f64>) -> Range<f64> {
    let span = r.end - r.start;
    let pad = if span > 1e-12 {
        span * 0.05
    } else {
        r.start.abs().max(1.0) * 0.05
    };
    (r.start - pad)..(r.end + pad)
}

/// The chart as an SVG document.
pub fn svg(c: &Chart) -> Result<String, String> {
    let points = || c.series.iter().flat_map(|s| s.segments.iter().flatten());
    let mut x =
        c.x.clone()
            .or_else(|| data_range(points().map(|p| p.0)))
            .unwrap_or(0.0..1.0);
    if x.end <= x.start {
        x = x.start..x.start + 1.0;
    }
    let mut y = padded(data_range(points().map(|p| p.1)).unwrap_or(-1.0..1.0));
    if !c.series.is_empty() && c.x.is_none() {
        x = padded(x);
    }
    if c.equal_axes {
        // Same metres per pixel on both axes (plot area about size minus the label areas).
        let (w, h) = (f64::from(c.size.0 - 70), f64::from(c.size.1 - 60));
        let per_px = ((x.end - x.start) / w).max((y.end - y.start) / h);
        let (cx, cy) = ((x.start + x.end) / 2.0, (y.start + y.end) / 2.0);
        x = (cx - per_px * w / 2.0)..(cx + per_px * w / 2.0);
        y = (cy - per_px * h / 2.0)..(cy + per_px * h / 2.0);
    }
    let mut out = String::new();
    draw(c, x, y, &mut out).map_err(|e| format!("drawing the chart {:?}: {e}", c.title))?;
    Ok(out)
}

fn draw(
    c: &Chart,
    x: Range<f64>,
    y: Range<f64>,
    out: &mut String,
) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::with_string(out, c.size).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .margin(6)
        .caption(c.title, ("sans-serif", 14))
        .x_label_area_size(34)
        .y_label_area_size(56)
        .build_cartesian_2d(x.clone(), y.clone())?;
    let (xd, yd) = (decimals(&x), decimals(&y));
    let x_fmt = move |v: &f64| tick_label(*v, xd);
    let y_fmt = move |v: &f64| tick_label(*v, yd);
    chart
        .configure_mesh()
        .x_label_formatter(&x_fmt)
        .y_label_formatter(&y_fmt)
        .x_desc(c.x_label)
        .y_desc(c.y_label)
        .x_labels(10)
        .y_labels(5)
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(220, 220, 220))
        .label_style(("sans-serif", 11))
        .draw()?;
    for s in c.spans {
        let (x0, x1) = (s.x.start.max(x.start), s.x.end.min(x.end));
        if x1 > x0 {
            chart.draw_series(std::iter::once(Rectangle::new(
                [(x0, y.start), (x1, y.end)],
                s.colour.rgb().mix(0.22).filled(),
            )))?;
        }
    }
    for m in c.markers {
        if x.contains(&m.x) {
            chart.draw_series(std::iter::once(PathElement::new(
                vec![(m.x, y.start), (m.x, y.end)],
                s_style(m.colour, m.width),
            )))?;
        }
    }
    for s in c.series {
        for seg in &s.segments {
            match seg[..] {
                [] => {}
                [p] => {
                    chart.draw_series(std::iter::once(Circle::new(
                        p,
                        4,
                        s.colour.rgb().filled(),
                    )))?;
                }
                _ => {
                    chart
                        .draw_series(LineSeries::new(seg.iter().copied(), s_style(s.colour, 2)))?;
                }
            }
        }
    }
    root.present()?;
    Ok(())
}

/// Decimals that tell ticks about a tenth of `r` apart.
fn decimals(r: &Range<f64>) -> usize {
    let span = (r.end - r.start).abs().max(1e-12);
    (1.0 - span.log10().floor()).clamp(0.0, 6.0) as usize
}

/// A tick label with `decimals` digits and no "-0".
fn tick_label(v: f64, decimals: usize) -> String {
    let s = format!("{v:.decimals$}");
    if s.trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        s.trim_start_matches('-').to_owned()
    } else {
        s
    }
}

fn s_style(c: Colour, width: u32) -> ShapeStyle {
    c.rgb().stroke_width(width)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_series_is_one_colour_of_polylines_and_lone_points() {
        let blue = Colour(0x1F, 0x77, 0xB4);
        let series = [Series {
            name: "command".into(),
            colour: blue,
            segments: vec![vec![(0.0, 1.0), (0.1, 2.0), (0.2, 1.5)], vec![(0.5, 0.0)]],
        }];
        let svg = svg(&Chart {
            title: "dx",
            x_label: "bag time [s]",
            y_label: "m",
            size: (600, 160),
            x: Some(0.0..1.0),
            series: &series,
            spans: &[Span {
                x: 0.3..0.4,
                colour: Colour(200, 0, 0),
            }],
            markers: &[Marker {
                x: 0.25,
                colour: Colour(150, 100, 200),
                width: 1,
            }],
            equal_axes: false,
        })
        .expect("an SVG");
        assert!(svg.starts_with("<svg"), "{}", &svg[..60]);
        let colour = format!("stroke=\"{}\"", blue.hex());
        let polylines: Vec<&str> = svg
            .split("<polyline")
            .skip(1)
            .filter(|p| p.split("/>").next().is_some_and(|t| t.contains(&colour)))
            .collect();
        assert_eq!(polylines.len(), 1);
        let pts = polylines[0].split("points=\"").nth(1).expect("points");
        let n = pts
            .split('"')
            .next()
            .map_or(0, |p| p.split_whitespace().count());
        assert_eq!(n, 3);
        assert_eq!(svg.matches("<circle").count(), 1);
        assert!(svg.contains("<text"), "labels are text");
        assert_eq!(series[0].points(), 4);
    }

    #[test]
    fn tick_labels_fit_the_range() {
        assert_eq!(tick_label(-0.0001, decimals(&(-1.0..1.0))), "0.0");
        assert_eq!(tick_label(0.25, decimals(&(0.0..0.5))), "0.25");
        assert_eq!(tick_label(12.0, decimals(&(0.0..60.0))), "12");
    }
}
