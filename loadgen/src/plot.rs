//! Pictures: the latency percentile spectrum per phase, and throughput plus queue depth over
//! time, each as PNG and SVG.
//!
//! Contract: main thread, after the run, from the merged results. Text is drawn with a font
//! embedded in the binary (Roboto, Apache-2.0, `assets/`) through plotters' `ab_glyph`
//! backend, so a fresh machine with no fonts and no fontconfig draws the same pictures. Errors
//! come back as strings naming the file; a picture that fails does not lose the JSON and
//! histogram files written before it.

use std::path::Path;
use std::sync::Once;

use hdrhistogram::Histogram;
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::Results;
use crate::run::Outcome;
use crate::stats::Metric;

static FONT: &[u8] = include_bytes!("../assets/Roboto-Regular.ttf");
static REGISTER: Once = Once::new();

fn register_font() {
    REGISTER.call_once(|| {
        // The only font plotters will ask for is "sans-serif"; a bad embedded file is a build
        // mistake the first picture would show as missing text, not a reason to stop the run.
        if plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_err() {
            eprintln!("weir-loadgen: the embedded font did not load; pictures will lack text");
        }
    });
}

const SIZE: (u32, u32) = (1200, 700);
const COLORS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
];

type PlotResult = Result<(), Box<dyn std::error::Error>>;

/// Draws every picture into `dir`; returns the files written.
pub fn draw_all(dir: &Path, res: &Results, o: &Outcome) -> Result<Vec<String>, String> {
    register_font();
    let mut files = Vec::new();
    for (i, p) in res.phases.iter().enumerate() {
        let hs: Vec<(Metric, &Histogram<u64>)> = Metric::ALL
            .iter()
            .map(|m| (*m, &o.recorder.phases[i][*m as usize]))
            .filter(|(_, h)| !h.is_empty())
            .collect();
        if hs.is_empty() {
            continue;
        }
        let title = format!(
            "{} / {}: latency by percentile ({} shard(s), fsync {})",
            res.scenario, p.name, res.broker.shards, res.broker.fsync
        );
        for ext in ["png", "svg"] {
            let name = format!("latency-{}.{ext}", p.name);
            let path = dir.join(&name);
            let drawn = if ext == "png" {
                spectrum(
                    BitMapBackend::new(&path, SIZE).into_drawing_area(),
                    &title,
                    &hs,
                )
            } else {
                spectrum(
                    SVGBackend::new(&path, SIZE).into_drawing_area(),
                    &title,
                    &hs,
                )
            };
            drawn.map_err(|e| format!("drawing {}: {e}", path.display()))?;
            files.push(name);
        }
    }
    let title = format!(
        "{}: throughput and queue depth ({} shard(s), fsync {})",
        res.scenario, res.broker.shards, res.broker.fsync
    );
    for ext in ["png", "svg"] {
        let name = format!("timeline.{ext}");
        let path = dir.join(&name);
        let drawn = if ext == "png" {
            timeline(
                BitMapBackend::new(&path, SIZE).into_drawing_area(),
                &title,
                res,
            )
        } else {
            timeline(
                SVGBackend::new(&path, SIZE).into_drawing_area(),
                &title,
                res,
            )
        };
        drawn.map_err(|e| format!("drawing {}: {e}", path.display()))?;
        files.push(name);
    }
    Ok(files)
}

/// "90%", "99.9%", ... for an x of 1/(1-percentile).
fn percentile_label(x: &f64) -> String {
    let p = 100.0 * (1.0 - 1.0 / x.max(1.0));
    let digits = (x.log10().round() as i32 - 2).max(0) as usize;
    format!("{p:.digits$}%")
}

/// HdrHistogram's picture: latency (y) against 1/(1-percentile) on a log x axis, so the tail
/// (99%, 99.9%, 99.99%) gets as much room as the median.
fn spectrum<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    title: &str,
    hs: &[(Metric, &Histogram<u64>)],
) -> PlotResult
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE)?;
    let count = hs.iter().map(|(_, h)| h.len()).max().unwrap_or(1);
    // Enough decades to show the last percentile the data can speak for.
    let decades = ((count as f64).log10().ceil() as i32).clamp(2, 6);
    let x_max = 10f64.powi(decades);
    let y_max = hs
        .iter()
        .map(|(_, h)| h.max() as f64 / 1000.0)
        .fold(0.0, f64::max);
    let y_min = hs
        .iter()
        .map(|(_, h)| h.min().max(1) as f64 / 1000.0)
        .fold(f64::INFINITY, f64::min);
    let lines: Vec<Line> = hs
        .iter()
        .enumerate()
        .map(|(i, (m, h))| Line {
            color: COLORS[i % COLORS.len()],
            label: format!(
                "{} (n={}, p50 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms)",
                m.label(),
                h.len(),
                h.value_at_quantile(0.5) as f64 / 1000.0,
                h.value_at_quantile(0.999) as f64 / 1000.0,
                h.max() as f64 / 1000.0
            ),
            points: h
                .iter_quantiles(5)
                .filter(|v| v.quantile_iterated_to() < 1.0)
                .map(|v| {
                    (
                        (1.0 / (1.0 - v.quantile_iterated_to())).min(x_max),
                        v.value_iterated_to() as f64 / 1000.0,
                    )
                })
                .collect(),
        })
        .collect();
    // Milliseconds of confirm next to tens of seconds of backlog would flatten one line into the
    // axis: past a 50x spread between the lines' maxima the latency axis is logarithmic.
    let y_spread = y_max
        / hs.iter()
            .map(|(_, h)| h.max().max(1) as f64 / 1000.0)
            .fold(f64::INFINITY, f64::min);
    if y_spread > 50.0 {
        let mut chart = builder(&area, title).build_cartesian_2d(
            (1f64..x_max).log_scale(),
            (y_min * 0.8..y_max * 1.5).log_scale(),
        )?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms, log scale)")
            .x_label_formatter(&percentile_label)
            .y_label_formatter(&|v| format!("{v}"))
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .draw()?;
        draw_lines(&mut chart, lines, SeriesLabelPosition::LowerRight)?;
    } else {
        let mut chart = builder(&area, title)
            .build_cartesian_2d((1f64..x_max).log_scale(), 0f64..y_max * 1.08 + 1e-3)?;
        chart
            .configure_mesh()
            .x_desc("percentile")
            .y_desc("latency (ms)")
            .x_label_formatter(&percentile_label)
            .label_style(("sans-serif", 16))
            .axis_desc_style(("sans-serif", 18))
            .draw()?;
        draw_lines(&mut chart, lines, SeriesLabelPosition::UpperLeft)?;
    }
    area.present()?;
    Ok(())
}

fn builder<'a, 'b, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, Shift>,
    title: &'b str,
) -> ChartBuilder<'a, 'b, DB> {
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 24))
        .margin(16)
        .margin_right(48)
        .x_label_area_size(48)
        .y_label_area_size(80);
    b
}

struct Line {
    color: RGBColor,
    label: String,
    points: Vec<(f64, f64)>,
}

fn draw_lines<'a, DB: DrawingBackend + 'a, X, Y>(
    chart: &mut ChartContext<'a, DB, Cartesian2d<X, Y>>,
    lines: Vec<Line>,
    legend: SeriesLabelPosition,
) -> PlotResult
where
    DB::ErrorType: 'static,
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    for line in lines {
        let color = line.color;
        chart
            .draw_series(LineSeries::new(line.points, color.stroke_width(2)))?
            .label(line.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(legend)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Two panels on one time axis: messages per second (sent, confirmed, delivered) above, queue
/// depth (ready, unacked) and the oldest ready message's age below; phases marked on both.
fn timeline<DB: DrawingBackend>(
    area: DrawingArea<DB, Shift>,
    title: &str,
    res: &Results,
) -> PlotResult
where
    DB::ErrorType: 'static,
{
    area.fill(&WHITE)?;
    let area = area.titled(title, ("sans-serif", 24))?;
    let (top, bottom) = area.split_vertically(area.dim_in_pixel().1 / 2);
    let t_max = res.run_s.max(1.0);
    let rate_max = res
        .throughput
        .iter()
        .map(|t| t.sent.max(t.confirmed).max(t.delivered))
        .max()
        .unwrap_or(1)
        .max(1) as f64;
    let peak_target = res
        .settings
        .phases
        .iter()
        .flat_map(|p| [p.rate, p.rate_end])
        .flatten()
        .fold(0.0, f64::max);
    let rate_max = rate_max.max(peak_target) * 1.1;
    let mut rates = ChartBuilder::on(&top)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..t_max, 0f64..rate_max)?;
    rates
        .configure_mesh()
        .y_desc("messages / s")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("time (s)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    // Phases that never ran (the queues drained first) get no line and no name.
    for ph in res.phases.iter().filter(|p| p.duration_s > 0.0) {
        if ph.start_s > 0.0 {
            rates.draw_series(std::iter::once(PathElement::new(
                vec![(ph.start_s, 0.0), (ph.start_s, rate_max)],
                BLACK.mix(0.3),
            )))?;
        }
        rates.draw_series(std::iter::once(Text::new(
            ph.name.clone(),
            (ph.start_s + 0.1, rate_max * 0.97),
            ("sans-serif", 15).into_font().color(&BLACK.mix(0.6)),
        )))?;
    }
    // A second's count is drawn at the middle of its second.
    type Pick = fn(&crate::report::Throughput) -> u64;
    let series: [(&str, Pick); 3] = [
        ("sent", |t| t.sent),
        ("confirmed", |t| t.confirmed),
        ("delivered", |t| t.delivered),
    ];
    for (i, (label, f)) in series.iter().enumerate() {
        let color = COLORS[i];
        let points: Vec<(f64, f64)> = res
            .throughput
            .iter()
            .map(|t| (t.t_s as f64 + 0.5, f(t) as f64))
            .collect();
        rates
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(*label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    if res.settings.kind != crate::scenario::Kind::Max {
        // The schedule itself, dashed: how far "sent" strays from it is the load generator
        // falling behind (or the client waiting on the broker's in-flight limit).
        let mut target = Vec::new();
        for (ph, p) in res.phases.iter().zip(&res.settings.phases) {
            let steps = (ph.duration_s * 20.0).ceil() as usize;
            for i in 0..=steps {
                let t = (i as f64 / 20.0).min(ph.duration_s);
                target.push((ph.start_s + t, p.rate_at(t)));
            }
        }
        let grey = BLACK.mix(0.5);
        rates
            .draw_series(DashedLineSeries::new(target, 6, 4, grey.stroke_width(1)))?
            .label("target (schedule)")
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], grey.stroke_width(1))
            });
    }
    rates
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;

    let samples = &res.backlog.samples;
    let depth_max = samples
        .iter()
        .map(|s| s.ready + s.unacked)
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.1;
    let age_max = samples
        .iter()
        .filter_map(|s| s.oldest_ready_age_ms)
        .max()
        .unwrap_or(1000)
        .max(1000) as f64
        / 1000.0
        * 1.1;
    let mut depth = ChartBuilder::on(&bottom)
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(80)
        .right_y_label_area_size(70)
        .build_cartesian_2d(0f64..t_max, 0f64..depth_max)?
        .set_secondary_coord(0f64..t_max, 0f64..age_max);
    depth
        .configure_mesh()
        .y_desc("messages in the queue(s)")
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_desc("time (s)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    depth
        .configure_secondary_axes()
        .y_desc("oldest ready message age (s)")
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .draw()?;
    for ph in res.phases.iter().filter(|p| p.duration_s > 0.0) {
        if ph.start_s > 0.0 {
            depth.draw_series(std::iter::once(PathElement::new(
                vec![(ph.start_s, 0.0), (ph.start_s, depth_max)],
                BLACK.mix(0.3),
            )))?;
        }
    }
    if let Some(t) = res.backlog.drain_time_s {
        let at = res.backlog.publishing_end_s + t;
        depth.draw_series(std::iter::once(Text::new(
            format!("drained {t:.1} s after publishing ended"),
            (at.min(t_max * 0.6), depth_max * 0.5),
            ("sans-serif", 15).into_font().color(&BLACK.mix(0.7)),
        )))?;
    }
    let ready: Vec<(f64, f64)> = samples.iter().map(|s| (s.t_s, s.ready as f64)).collect();
    depth
        .draw_series(
            AreaSeries::new(ready, 0.0, COLORS[0].mix(0.25))
                .border_style(COLORS[0].stroke_width(2)),
        )?
        .label("ready")
        .legend(|(x, y)| {
            Rectangle::new([(x, y - 5), (x + 20, y + 5)], COLORS[0].mix(0.5).filled())
        });
    let unacked: Vec<(f64, f64)> = samples.iter().map(|s| (s.t_s, s.unacked as f64)).collect();
    depth
        .draw_series(LineSeries::new(unacked, COLORS[2].stroke_width(2)))?
        .label("unacked")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], COLORS[2].stroke_width(2)));
    let age: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.t_s, s.oldest_ready_age_ms.unwrap_or(0) as f64 / 1000.0))
        .collect();
    depth
        .draw_secondary_series(LineSeries::new(age, COLORS[1].stroke_width(2)))?
        .label("oldest ready age (right axis)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], COLORS[1].stroke_width(2)));
    depth
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    area.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::percentile_label;

    #[test]
    fn the_x_axis_reads_as_percentiles() {
        assert_eq!(percentile_label(&1.0), "0%");
        assert_eq!(percentile_label(&10.0), "90%");
        assert_eq!(percentile_label(&100.0), "99%");
        assert_eq!(percentile_label(&1000.0), "99.9%");
        assert_eq!(percentile_label(&10000.0), "99.99%");
    }
}
