//! `big-market bench --sweep`: the bench's ceilings, the original's design and the pipeline at
//! each of [`SWEEP_CALLERS`] callers, on the configured store and transport, in one process.
//! Prints one table (Markdown, a row per caller count) and then one JSON line of figures per
//! caller count; with `--plot FILE` it draws them as an SVG line chart: awards/s per caller
//! count for every throughput figure measured, and save p99 on a second axis.

use std::path::Path;

use crate::bench::{BenchOptions, Figures};
use crate::config::Settings;
use crate::error::{Error, Result};

/// The caller counts of a sweep: few callers (latency counts), a busy front door, and enough
/// callers per shard for large group commits.
pub const SWEEP_CALLERS: [usize; 3] = [16, 64, 256];

/// Run the bench at every caller count of [`SWEEP_CALLERS`] (`opts.threads` is not used), print
/// the table and the JSON lines, and draw the chart to `plot` if given; returns the figures.
pub fn run(base: &Settings, opts: &BenchOptions, plot: Option<&Path>) -> Result<Vec<Figures>> {
    let mut points = Vec::with_capacity(SWEEP_CALLERS.len());
    for callers in SWEEP_CALLERS {
        eprintln!("bench: sweep: {callers} callers");
        let point = BenchOptions {
            threads: callers,
            ..opts.clone()
        };
        points.push(crate::bench::measure_point(base, &point)?);
    }
    print!("{}", table(&points));
    for f in &points {
        println!("{}", serde_json::to_string(f).expect("figures serialize"));
    }
    if let Some(path) = plot {
        let svg = chart(&points).map_err(|why| Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::other(format!("drawing the sweep's chart: {why}")),
        })?;
        std::fs::write(path, svg).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        eprintln!("bench: sweep: chart written to {}", path.display());
    }
    Ok(points)
}

/// The throughput figures of a point, by their JSON names (`None`: not measured here).
fn throughput(f: &Figures) -> [(&'static str, Option<f64>); 12] {
    let sqlite = f.store == "sqlite";
    [
        ("pipeline", Some(f.pipeline)),
        ("pipeline_batched", Some(f.pipeline_batched)),
        ("sqlite_limit", sqlite.then_some(f.sqlite_limit)),
        ("sqlite_e2e_limit", sqlite.then_some(f.sqlite_e2e_limit)),
        ("sqlite_group_limit", f.sqlite_group_limit),
        ("broker_limit", f.broker_limit),
        ("broker_e2e_limit", f.broker_e2e_limit),
        ("mysql_e2e_limit", f.mysql_e2e_limit),
        ("mysql_group_limit", f.mysql_group_limit),
        ("naive", f.naive),
        ("mysql_naive", f.mysql_naive),
        ("http", f.http),
    ]
}

/// The latency figures of a point, ms, drawn on the chart's second axis.
fn latency(f: &Figures) -> [(&'static str, Option<f64>); 2] {
    [
        ("save_p99_ms", Some(f.save_p99_ms)),
        ("http_p99_ms", f.http_p99_ms),
    ]
}

/// The series that some point measured: name and `(callers, value)` of each point that has it.
fn series<const N: usize>(
    points: &[Figures],
    of: impl Fn(&Figures) -> [(&'static str, Option<f64>); N],
) -> Vec<(&'static str, Vec<(usize, f64)>)> {
    let Some(first) = points.first() else {
        return Vec::new();
    };
    of(first)
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            let values = points
                .iter()
                .filter_map(|f| of(f)[i].1.map(|v| (f.threads, v)))
                .collect();
            (*name, values)
        })
        .filter(|(_, values): &(_, Vec<_>)| !values.is_empty())
        .collect()
}

/// One Markdown table, a row per point: every throughput figure measured (awards/s; the
/// broker's messages/s), the ratios the targets are set on, and the save latencies.
pub fn table(points: &[Figures]) -> String {
    let columns: Vec<&str> = series(points, throughput)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    let mut head = vec!["callers"];
    head.extend(&columns);
    head.extend([
        "pipeline / e2e",
        "batched / e2e",
        "pipeline / naive",
        "save p50 ms",
        "save p99 ms",
    ]);
    let http = points.iter().any(|f| f.http_p99_ms.is_some());
    if http {
        head.push("http p99 ms");
    }
    let mut out = format!("| {} |\n", head.join(" | "));
    out += &format!(
        "|{}\n",
        head.iter()
            .enumerate()
            .map(|(i, _)| if i == 0 { " --- |" } else { " ---: |" })
            .collect::<String>()
    );
    let or_na = |v: Option<String>| v.unwrap_or_else(|| "n/a".into());
    for f in points {
        let mut row = vec![f.threads.to_string()];
        for name in &columns {
            let value = throughput(f)
                .into_iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, v)| v);
            row.push(or_na(value.map(|v| format!("{v:.0}"))));
        }
        row.push(format!("{:.2}", f.pipeline_over_e2e_limit));
        row.push(or_na(
            f.pipeline_batched_over_e2e_limit.map(|r| format!("{r:.2}")),
        ));
        row.push(or_na(f.pipeline_over_naive.map(|r| format!("{r:.1}"))));
        row.push(format!("{:.2}", f.save_p50_ms));
        row.push(format!("{:.2}", f.save_p99_ms));
        if http {
            row.push(or_na(f.http_p99_ms.map(|v| format!("{v:.2}"))));
        }
        out += &format!("| {} |\n", row.join(" | "));
    }
    out
}

/// The points as an SVG line chart: awards/s per caller count (a log₂ axis) for every throughput
/// figure measured, solid, on the left axis; save p99 (and HTTP p99), dashed, on the right axis.
/// Each series is named in the legend by its JSON name.
pub fn chart(points: &[Figures]) -> std::result::Result<String, String> {
    use plotters::prelude::*;

    let rates = series(points, throughput);
    let latencies = series(points, latency);
    let log2 = |callers: usize| (callers.max(1) as f64).log2();
    let xs: Vec<f64> = points.iter().map(|f| log2(f.threads)).collect();
    let x_min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let x_max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !x_min.is_finite() {
        return Err("no points to draw".into());
    }
    let xr = (x_min - 0.5)..(x_max + 0.5);
    let top = |s: &[(&str, Vec<(usize, f64)>)]| {
        s.iter()
            .flat_map(|(_, v)| v.iter().map(|p| p.1))
            .fold(1.0, f64::max)
    };
    let (y_max, ms_max) = (top(&rates) * 1.1, top(&latencies) * 1.2);
    let first = &points[0];
    let title = format!(
        "bench --sweep: {} store, {} transport, {} awards per phase",
        if first.store == "sqlite" {
            "SQLite"
        } else {
            "MySQL"
        },
        if first.transport == "in-process" {
            "in-process"
        } else {
            "RabbitMQ"
        },
        first.records
    );

    let mut svg = String::new();
    {
        let e = |err: DrawingAreaErrorKind<std::io::Error>| err.to_string();
        let root = SVGBackend::with_string(&mut svg, (1000, 620)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(45)
            .y_label_area_size(75)
            .right_y_label_area_size(65)
            .build_cartesian_2d(xr.clone(), 0f64..y_max)
            .map_err(e)?
            .set_secondary_coord(xr, 0f64..ms_max);
        chart
            .configure_mesh()
            .x_labels(((x_max - x_min).round() as usize) + 1)
            .x_label_formatter(&|v| {
                if (v - v.round()).abs() < 1e-6 {
                    format!("{:.0}", 2f64.powf(v.round()))
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| format!("{v:.0}"))
            .x_desc("callers")
            .y_desc("awards/s (broker: messages/s)")
            .draw()
            .map_err(e)?;
        chart
            .configure_secondary_axes()
            .y_label_formatter(&|v| format!("{v:.1}"))
            .y_desc("p99, ms (dashed)")
            .draw()
            .map_err(e)?;
        for (i, (name, values)) in rates.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let line: Vec<(f64, f64)> = values.iter().map(|(c, v)| (log2(*c), *v)).collect();
            chart
                .draw_series(LineSeries::new(line, color.stroke_width(2)).point_size(3))
                .map_err(e)?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        for (i, (name, values)) in latencies.iter().enumerate() {
            let color = if i == 0 {
                BLACK
            } else {
                RGBColor(128, 128, 128)
            };
            let line: Vec<(f64, f64)> = values.iter().map(|(c, v)| (log2(*c), *v)).collect();
            chart
                .draw_secondary_series(DashedLineSeries::new(line, 6, 4, color.stroke_width(2)))
                .map_err(e)?
                .label(*name)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(threads: usize, pipeline: f64) -> Figures {
        Figures {
            store: "sqlite".into(),
            transport: "in-process".into(),
            records: 1000,
            threads,
            sqlite_limit: 40_000.0,
            sqlite_e2e_limit: 30_000.0,
            sqlite_group_limit: Some(25_000.0),
            naive: Some(300.0),
            pipeline,
            pipeline_batched: 20_000.0,
            save_p50_ms: 1.5,
            save_p99_ms: threads as f64 / 4.0,
            pipeline_over_e2e_limit: pipeline / 30_000.0,
            pipeline_batched_over_e2e_limit: Some(20_000.0 / 30_000.0),
            pipeline_over_naive: Some(pipeline / 300.0),
            ..Default::default()
        }
    }

    #[test]
    fn the_table_has_a_row_per_point_and_a_column_per_measured_figure() {
        let t = table(&[point(16, 6000.0), point(256, 12_000.0)]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4, "{t}");
        assert_eq!(
            lines[0],
            "| callers | pipeline | pipeline_batched | sqlite_limit | sqlite_e2e_limit | sqlite_group_limit | naive | pipeline / e2e | batched / e2e | pipeline / naive | save p50 ms | save p99 ms |"
        );
        assert_eq!(
            lines[3],
            "| 256 | 12000 | 20000 | 40000 | 30000 | 25000 | 300 | 0.40 | 0.67 | 40.0 | 1.50 | 64.00 |"
        );
        assert!(!t.contains("broker"), "no broker without one: {t}");
    }

    #[test]
    fn the_chart_is_an_svg_with_every_series_named() {
        let svg = chart(&[point(16, 6000.0), point(64, 9000.0), point(256, 12_000.0)]).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        assert_eq!(doc.root_element().tag_name().name(), "svg");
        let text: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(str::trim)
            .collect();
        for name in [
            "pipeline",
            "pipeline_batched",
            "sqlite_e2e_limit",
            "sqlite_group_limit",
            "naive",
            "save_p99_ms",
            "callers",
            "256",
        ] {
            assert!(text.contains(&name), "{name} not in {text:?}");
        }
        assert!(!text.contains(&"http"), "no http series without --http");
    }
}
