//! What a run shows: a table for the terminal and an HTML page with SVG charts.

use std::fmt::Write as _;

use plotters::prelude::*;

use crate::run::{Outcome, Strategy};
use crate::scenario::Scenario;

/// Wall time and memory of a run, for the record.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunCost {
    pub wall_s: f64,
    /// Peak resident memory of the process, if the platform tells.
    pub peak_rss_mib: Option<f64>,
}

/// The comparison table, one strategy per row.
pub fn table(outcomes: &[Outcome]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<18} {:>9} {:>8} {:>9} {:>8} {:>25} {:>22} {:>7} {:>10} {:>6}",
        "strategy",
        "offered",
        "served",
        "429s",
        "outage",
        "TTFT p50/p95/p99 (ms)",
        "E2E p50/p95/p99 (s)",
        "cross",
        "cost ($)",
        "viol."
    );
    for o in outcomes {
        let _ = writeln!(
            s,
            "{:<18} {:>9} {:>7.2}% {:>9} {:>8} {:>25} {:>22} {:>6.1}% {:>10.2} {:>6}",
            o.strategy.name(),
            o.offered,
            100.0 * o.served_share(),
            o.capacity_errors,
            o.outage_errors,
            format!(
                "{:.0} / {:.0} / {:.0}",
                o.ttft_ms(0.5),
                o.ttft_ms(0.95),
                o.ttft_ms(0.99)
            ),
            format!(
                "{:.1} / {:.1} / {:.1}",
                o.e2e_ms(0.5) / 1000.0,
                o.e2e_ms(0.95) / 1000.0,
                o.e2e_ms(0.99) / 1000.0
            ),
            100.0 * o.cross_share(),
            o.cost_usd,
            o.violations
        );
    }
    s
}

/// Column headings of the Markdown and HTML tables.
const HEADINGS: [&str; 9] = [
    "strategy",
    "served",
    "capacity errors (429)",
    "lost to outage",
    "TTFT p50 / p95 / p99",
    "end-to-end p50 / p95 / p99",
    "served cross-region",
    "cost",
    "boundary violations",
];

/// One strategy's row of the Markdown and HTML tables.
fn cells(o: &Outcome) -> [String; 9] {
    [
        o.strategy.name().to_owned(),
        format!("{:.2}%", 100.0 * o.served_share()),
        o.capacity_errors.to_string(),
        o.outage_errors.to_string(),
        format!(
            "{:.0} / {:.0} / {:.0} ms",
            o.ttft_ms(0.5),
            o.ttft_ms(0.95),
            o.ttft_ms(0.99)
        ),
        format!(
            "{:.1} / {:.1} / {:.1} s",
            o.e2e_ms(0.5) / 1000.0,
            o.e2e_ms(0.95) / 1000.0,
            o.e2e_ms(0.99) / 1000.0
        ),
        format!("{:.1}%", 100.0 * o.cross_share()),
        format!("${:.2}", o.cost_usd),
        o.violations.to_string(),
    ]
}

/// A Markdown version of [`table`], for documents.
pub fn markdown(outcomes: &[Outcome]) -> String {
    let mut s = format!(
        "| {} |\n|---|{}\n",
        HEADINGS.join(" | "),
        "---:|".repeat(HEADINGS.len() - 1)
    );
    for o in outcomes {
        let _ = writeln!(s, "| {} |", cells(o).join(" | "));
    }
    s
}

fn color(s: Strategy) -> RGBColor {
    match s {
        Strategy::Bare => RGBColor(120, 120, 120),
        Strategy::RoundRobin => RGBColor(230, 159, 0),
        Strategy::Random => RGBColor(86, 180, 233),
        Strategy::LeastOutstanding => RGBColor(204, 121, 167),
        Strategy::Crisp => RGBColor(0, 114, 178),
        Strategy::Oracle => RGBColor(0, 158, 115),
    }
}

const REGION_COLORS: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(120, 120, 120),
    RGBColor(240, 228, 66),
];

type Plot = Result<String, String>;

fn err<E: std::fmt::Debug>(e: E) -> String {
    format!("drawing a chart: {e:?}")
}

/// One labelled line of a chart, with its colour in the legend.
fn line<X, Y>(
    chart: &mut ChartContext<'_, SVGBackend<'_>, Cartesian2d<X, Y>>,
    points: impl IntoIterator<Item = (f64, f64)>,
    c: RGBColor,
    label: &str,
) -> Result<(), String>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .draw_series(LineSeries::new(points, c.stroke_width(2)))
        .map_err(err)?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2)));
    Ok(())
}

/// The legend of a chart's lines, at `position`.
fn legend<'a, X, Y>(
    chart: &mut ChartContext<'a, SVGBackend<'a>, Cartesian2d<X, Y>>,
    position: SeriesLabelPosition,
) -> Result<(), String>
where
    X: Ranged<ValueType = f64>,
    Y: Ranged<ValueType = f64>,
{
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)
}

/// Lines over time: `series` is (label, colour, values per bucket).
fn time_chart(
    title: &str,
    y_desc: &str,
    bucket_s: f64,
    series: &[(String, RGBColor, Vec<f64>)],
) -> Plot {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (760, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let buckets = series.iter().map(|s| s.2.len()).max().unwrap_or(1).max(1);
        let x_max = buckets as f64 * bucket_s / 60.0;
        let y_max = series
            .iter()
            .flat_map(|s| s.2.iter().copied())
            .fold(0.0_f64, f64::max)
            .max(1e-9)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("minutes")
            .y_desc(y_desc)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for (label, c, values) in series {
            let c = *c;
            let points = values
                .iter()
                .enumerate()
                .map(|(i, v)| ((i as f64 + 0.5) * bucket_s / 60.0, *v));
            line(&mut chart, points, c, label)?;
        }
        legend(&mut chart, SeriesLabelPosition::UpperRight)?;
        root.present().map_err(err)?;
    }
    Ok(buf)
}

/// Time to first token or end to end, per served request.
fn latency(o: &Outcome, ttft: bool) -> &hdrhistogram::Histogram<u64> {
    if ttft { &o.ttft_us } else { &o.e2e_us }
}

/// Cumulative distributions of a latency per strategy, on a log axis.
fn cdf_chart(title: &str, outcomes: &[Outcome], ttft: bool) -> Plot {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (760, 340)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let x_max = outcomes
            .iter()
            .map(|o| latency(o, ttft).max() as f64 / 1000.0)
            .fold(10.0_f64, f64::max);
        let x_min = outcomes
            .iter()
            .filter(|o| o.served > 0)
            .map(|o| latency(o, ttft).min().max(1) as f64 / 1000.0)
            .fold(f64::INFINITY, f64::min)
            .min(x_max / 10.0)
            .max(0.01);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(32)
            .y_label_area_size(48)
            .build_cartesian_2d((x_min..x_max).log_scale(), 0.0..1.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("milliseconds (log)")
            .y_desc("share of served requests")
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        for o in outcomes {
            if o.served == 0 {
                continue;
            }
            let h = latency(o, ttft);
            let c = color(o.strategy);
            let points: Vec<(f64, f64)> = (0..=200)
                .map(|i| {
                    let q = f64::from(i) / 200.0;
                    ((h.value_at_quantile(q) as f64 / 1000.0).max(x_min), q)
                })
                .collect();
            line(&mut chart, points, c, o.strategy.name())?;
        }
        legend(&mut chart, SeriesLabelPosition::LowerRight)?;
        root.present().map_err(err)?;
    }
    Ok(buf)
}

/// A map-like view of where requests were served: regions at their coordinates, a line
/// from each source to each other region that served its requests, as thick as the flow.
fn flow_map(scenario: &Scenario, o: &Outcome) -> Plot {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, (900, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!(
                    "Cross-region flows, {} (line width: requests)",
                    o.strategy.name()
                ),
                ("sans-serif", 16),
            )
            .margin(10)
            .x_label_area_size(24)
            .y_label_area_size(36)
            .build_cartesian_2d(-180.0..180.0, -60.0..75.0)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("longitude")
            .y_desc("latitude")
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(err)?;
        let regions = &scenario.catalog.regions;
        let n = regions.len();
        let max_flow = (0..n)
            .flat_map(|s| (0..n).filter(move |&d| d != s).map(move |d| (s, d)))
            .map(|(s, d)| o.flows[s * n + d])
            .max()
            .unwrap_or(0)
            .max(1);
        for s in 0..n {
            for d in 0..n {
                let f = o.flows[s * n + d];
                // Flows under 2% of the largest would only draw a haze.
                if s == d || f == 0 || f * 50 < max_flow {
                    continue;
                }
                let share = f as f64 / max_flow as f64;
                let w = 1 + (9.0 * share).round() as u32;
                let (a, b) = (&regions[s], &regions[d]);
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(a.lon, a.lat), (b.lon, b.lat)],
                        RGBColor(0, 114, 178)
                            .mix(0.25 + 0.5 * share)
                            .stroke_width(w),
                    )))
                    .map_err(err)?;
            }
        }
        for (i, r) in regions.iter().enumerate() {
            let served: u64 = (0..n).map(|s| o.flows[s * n + i]).sum();
            let c = if r.has_tag("eu") {
                RGBColor(0, 51, 153)
            } else {
                RGBColor(213, 94, 0)
            };
            chart
                .draw_series(std::iter::once(Circle::new(
                    (r.lon, r.lat),
                    3 + (served as f64).log10().max(0.0) as i32,
                    c.filled(),
                )))
                .map_err(err)?;
            chart
                .draw_series(std::iter::once(Text::new(
                    r.code.clone(),
                    (r.lon + 1.5, r.lat + 1.5),
                    ("sans-serif", 10),
                )))
                .map_err(err)?;
        }
        root.present().map_err(err)?;
    }
    Ok(buf)
}

/// The regions with the most traffic, busiest first (at most `k`).
fn busiest(o: &Outcome, k: usize) -> Vec<usize> {
    let s = &o.series;
    let mut totals: Vec<(u64, usize)> = (0..s.regions)
        .map(|r| {
            let a: u64 = (0..s.buckets).map(|b| s.arrivals[b * s.regions + r]).sum();
            let v: u64 = (0..s.buckets).map(|b| s.served[b * s.regions + r]).sum();
            (a + v, r)
        })
        .collect();
    totals.sort_unstable_by(|a, b| b.cmp(a));
    totals.into_iter().take(k).map(|(_, r)| r).collect()
}

fn per_region(
    scenario: &Scenario,
    o: &Outcome,
    regions: &[usize],
    pick: impl Fn(&Outcome, usize, usize) -> f64,
) -> Vec<(String, RGBColor, Vec<f64>)> {
    regions
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            (
                scenario.catalog.regions[r].code.clone(),
                REGION_COLORS[i % REGION_COLORS.len()],
                (0..o.series.buckets).map(|b| pick(o, b, r)).collect(),
            )
        })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One chart of the report.
#[derive(Clone, Debug)]
pub struct Chart {
    /// A file-name-friendly name (`errors`, `ttft-cdf`, ...).
    pub name: String,
    pub caption: String,
    pub svg: String,
}

/// Every chart of the report, as SVG documents.
pub fn charts(scenario: &Scenario, outcomes: &[Outcome]) -> Result<Vec<Chart>, String> {
    let mut charts = Vec::new();
    let mut figure = |name: String, svg: String, caption: &str| {
        charts.push(Chart {
            name,
            caption: caption.to_owned(),
            svg,
        });
    };
    let bucket = scenario.bucket_s;
    let per_s = |v: u64| v as f64 / bucket;
    let errors: Vec<(String, RGBColor, Vec<f64>)> = outcomes
        .iter()
        .map(|o| {
            let s = &o.series;
            (
                o.strategy.name().to_owned(),
                color(o.strategy),
                (0..s.buckets)
                    .map(|b| per_s((0..s.regions).map(|r| s.errors[b * s.regions + r]).sum()))
                    .collect(),
            )
        })
        .collect();
    figure(
        "errors".to_owned(),
        time_chart(
            "Failed requests per second, whole fleet",
            "requests/s",
            bucket,
            &errors,
        )?,
        "Requests that no region took (capacity errors seen by clients), per strategy.",
    );
    if let Some(first) = outcomes.first() {
        let top = busiest(first, 8);
        figure(
            "load".to_owned(),
            time_chart(
                "Offered load per source region (busiest 8)",
                "requests/s",
                bucket,
                &per_region(scenario, first, &top, |o, b, r| {
                    per_s(o.series.arrivals[b * o.series.regions + r])
                }),
            )?,
            "Arrivals per second at each source region: the same trace for every strategy.",
        );
        for o in outcomes
            .iter()
            .filter(|o| matches!(o.strategy, Strategy::Bare | Strategy::Crisp))
        {
            figure(
                format!("utilisation-{}", o.strategy.name()),
                time_chart(
                    &format!("Slot utilisation per region, {}", o.strategy.name()),
                    "share of slots busy",
                    bucket,
                    &per_region(scenario, o, &top, |o, b, r| {
                        f64::from(o.series.utilisation[b * o.series.regions + r])
                    }),
                )?,
                "Mean share of each region's sequence slots in use.",
            );
            figure(
                format!("errors-{}", o.strategy.name()),
                time_chart(
                    &format!("Failed requests per source region, {}", o.strategy.name()),
                    "requests/s",
                    bucket,
                    &per_region(scenario, o, &top, |o, b, r| {
                        per_s(o.series.errors[b * o.series.regions + r])
                    }),
                )?,
                "Capacity errors by the region where the request came in.",
            );
        }
    }
    figure(
        "ttft-cdf".to_owned(),
        cdf_chart("Time to first token, client side", outcomes, true)?,
        "Cumulative distribution of time to first token, including the network to the inference region and back.",
    );
    figure(
        "e2e-cdf".to_owned(),
        cdf_chart("End-to-end latency, client side", outcomes, false)?,
        "Cumulative distribution of the time until the last token reached the client.",
    );
    if let Some(o) = outcomes.iter().find(|o| o.strategy == Strategy::Crisp) {
        figure(
            "flows-crisp".to_owned(),
            flow_map(scenario, o)?,
            "Blue dots: EU regions; orange: the rest. Dot size grows with requests served there; flows under 2% of the largest are not drawn.",
        );
    }
    Ok(charts)
}

/// The whole HTML report: the table and every chart, self-contained.
pub fn html(scenario: &Scenario, outcomes: &[Outcome], cost: RunCost) -> Result<String, String> {
    let mut page = String::new();
    let title = format!("crisp sim: {}", scenario.name);
    let _ = write!(
        page,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t}</title><style>\
body{{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;color:#222}}\
table{{border-collapse:collapse;font-size:14px}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right}}\
td:first-child,th:first-child{{text-align:left}}figure{{margin:1.5em 0}}</style></head><body>\
<h1>{t}</h1><p>{d}</p>",
        t = escape(&title),
        d = escape(&scenario.description)
    );
    let offered = outcomes.first().map_or(0, |o| o.offered);
    let _ = write!(
        page,
        "<p>Fleet <code>{}</code>: {} regions. Seed {}, {:.0} s of arrivals, {} requests per strategy. \
Simulated in {:.1} s of wall time{}.</p>",
        escape(&scenario.fleet_path.display().to_string()),
        scenario.catalog.regions.len(),
        scenario.seed,
        scenario.duration_s,
        offered,
        cost.wall_s,
        cost.peak_rss_mib
            .map(|m| format!(", peak memory {m:.0} MiB"))
            .unwrap_or_default()
    );
    let _ = write!(
        page,
        "<table><tr><th>{}</th></tr>",
        HEADINGS.join("</th><th>")
    );
    for o in outcomes {
        let row: Vec<String> = cells(o).iter().map(|c| escape(c)).collect();
        let _ = write!(page, "<tr><td>{}</td></tr>", row.join("</td><td>"));
    }
    page.push_str("</table>");

    for c in charts(scenario, outcomes)? {
        let _ = write!(
            page,
            "<figure>{}<figcaption>{}</figcaption></figure>",
            c.svg,
            escape(&c.caption)
        );
    }
    page.push_str("</body></html>\n");
    Ok(page)
}
