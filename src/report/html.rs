//! `bitvla replay --html`: the replay as one self-contained HTML page (inline SVG charts, inline
//! JPEG thumbnails, no network): the run's header, the actions per dimension against the
//! recorded ones with chunk boundaries, holds and instructions marked, the latency per call,
//! what the cameras showed at each call, and the commanded end-effector path.

use super::charts::{self, Chart, Colour, Marker, Series, Span};
use super::trace::{EeFrame, TickPoint, Trace};
use crate::params::NodeParams;
use crate::replay::ReplayReport;
use base64::Engine;
use std::fmt::Write;

const COMMAND: Colour = Colour(0x1F, 0x77, 0xB4);
const RECORDED: Colour = Colour(0xFF, 0x7F, 0x0E);
const LATENCY: Colour = Colour(0x2C, 0xA0, 0x2C);
const INSTRUCTION: Colour = Colour(0x94, 0x67, 0xBD);
const CHUNK: Colour = Colour(0xB0, 0xB0, 0xB0);
const START: Colour = Colour(0x2C, 0xA0, 0x2C);
const END: Colour = Colour(0xD6, 0x27, 0x28);
const FAILED: Colour = Colour(0xD6, 0x27, 0x28);
/// Above this many ticks, the action charts plot every k-th one.
const MAX_PLOTTED_TICKS: usize = 6000;

/// The colour a hold reason is shaded with.
fn hold_colour(kind: &str) -> Colour {
    match kind {
        "estop" => Colour(0xD6, 0x27, 0x28),
        "no_instruction" => Colour(0x7F, 0x7F, 0x7F),
        "no_camera" => Colour(0x8C, 0x56, 0x4B),
        "stale_camera" => Colour(0xE3, 0x77, 0xC2),
        "no_chunk" => Colour(0xBC, 0xBD, 0x22),
        "non_finite" => Colour(0xFF, 0x00, 0x00),
        "no_ee_pose" => Colour(0x17, 0xBE, 0xCF),
        "no_joint_state" => Colour(0x39, 0x3B, 0x79),
        _ => Colour(0x60, 0x60, 0x60),
    }
}

/// What the page is about, besides the report and the trace.
pub struct Context<'a> {
    pub model: &'a str,
    /// The parameter file, None for the node's defaults (or a description such as "embedded").
    pub params_file: Option<&'a str>,
    pub params: &'a NodeParams,
}

/// HTML-escaped text.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for ch in s.chars() {
        match ch {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(ch),
        }
    }
    o
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "n/a".into(), |x| format!("{x:.1} ms"))
}

fn values(v: &[f32]) -> String {
    let parts: Vec<String> = v.iter().map(|x| format!("{x:.3}")).collect();
    format!("[{}]", parts.join(", "))
}

/// Which numbers the per-dimension charts show: the policy's actions, or (when the recorded
/// topic is a command type) the commands, as the report's comparison does.
struct Basis<'a> {
    names: &'a [String],
    what: &'static str,
    pick: fn(&TickPoint) -> Option<Vec<f64>>,
}

fn basis<'a>(report: &ReplayReport, trace: &'a Trace) -> Basis<'a> {
    let commands = report
        .recorded_vs_predicted
        .as_ref()
        .is_some_and(|c| c.against == "command");
    if commands {
        Basis {
            names: &trace.command_names,
            what: "command",
            pick: |t| t.command.clone(),
        }
    } else {
        Basis {
            names: &trace.action_names,
            what: "action",
            pick: |t| {
                t.action
                    .as_ref()
                    .map(|a| a.iter().map(|&v| f64::from(v)).collect())
            },
        }
    }
}

/// The page.
pub fn render(report: &ReplayReport, trace: &Trace, ctx: &Context) -> Result<String, String> {
    let mut h = String::with_capacity(1 << 20);
    page_head(&mut h, report);
    header(&mut h, report, trace, ctx);
    action_charts(&mut h, report, trace)?;
    latency_chart(&mut h, report, trace)?;
    thumbnails(&mut h, trace);
    ee_path(&mut h, trace, ctx)?;
    warnings(&mut h, report);
    let json = serde_json::to_string(report)
        .map_err(|e| format!("serializing the report: {e}"))?
        .replace("</", "<\\/");
    let _ = write!(
        h,
        "<script type=\"application/json\" id=\"report-json\">{json}</script>\n{SCRIPT}</body>\n</html>\n"
    );
    Ok(h)
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;\
color:#222;max-width:1100px}h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;\
border-bottom:1px solid #ddd;padding-bottom:3px}table{border-collapse:collapse;font-size:13px}\
td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}th{color:#555;font-weight:600}\
.note{color:#555;font-size:13px}.banner{background:#fff3cd;border:1px solid #e0c36b;padding:8px 12px;\
margin:10px 0}.missing{color:#8a6d00;font-size:13px}.swatch{display:inline-block;width:12px;\
height:12px;margin-right:4px;vertical-align:-1px;border:1px solid #999}.legend span{margin-right:14px;\
font-size:13px}figure{margin:6px 0}.strip{display:flex;overflow-x:auto;gap:8px;padding-bottom:8px}\
.call{flex:0 0 auto;border:1px solid #ddd;padding:4px;font-size:11px;margin:0}.call img{display:block;\
margin-bottom:2px}.call figcaption{max-width:170px}.views{display:flex;gap:12px;flex-wrap:wrap}\
code{font-size:12px}";

const SCRIPT: &str = "<script>\nwindow.addEventListener('load', function () {\n  \
var imgs = Array.prototype.slice.call(document.images);\n  \
var ok = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;\n  \
document.body.dataset.imagesDecoded = ok + '/' + imgs.length;\n  \
if (ok < imgs.length) {\n    var p = document.getElementById('image-errors');\n    \
p.textContent = (imgs.length - ok) + ' of ' + imgs.length + ' thumbnails could not be decoded by this browser';\n    \
p.hidden = false;\n  }\n});\n</script>\n";

fn page_head(h: &mut String, report: &ReplayReport) {
    let bag = report.bag.rsplit('/').next().unwrap_or(&report.bag);
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <title>bitvla replay: {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n\
         <h1>bitvla replay: {}</h1>\n<p class=\"note\">bitvla_ros {}: the bag through the node's \
         control logic, offline.</p>\n<p id=\"image-errors\" class=\"banner\" hidden></p>\n",
        esc(bag),
        esc(bag),
        env!("CARGO_PKG_VERSION")
    );
    if report.interrupted {
        let _ = writeln!(
            h,
            "<p class=\"banner\" id=\"interrupted\">Interrupted: the replay stopped after {:.2} s \
             of bag time. This report (and the output bag) cover the replay up to then.</p>",
            report.bag_duration_s
        );
    }
}

fn row(h: &mut String, key: &str, value: &str) {
    let _ = writeln!(h, "<tr><th>{}</th><td>{value}</td></tr>", esc(key));
}

fn header(h: &mut String, report: &ReplayReport, trace: &Trace, ctx: &Context) {
    let p = ctx.params;
    h.push_str("<h2>Run</h2>\n<table id=\"run\">\n");
    row(h, "bag", &format!("<code>{}</code>", esc(&report.bag)));
    row(
        h,
        "bag contents",
        &format!(
            "{} messages, {:.1} MB, {:.2} s",
            report.bag_messages,
            report.bag_bytes as f64 / 1e6,
            report.bag_duration_s
        ),
    );
    row(h, "model", &format!("<code>{}</code>", esc(ctx.model)));
    row(
        h,
        "parameters",
        &ctx.params_file.map_or_else(
            || "the node's defaults".to_owned(),
            |f| format!("<code>{}</code>", esc(f)),
        ),
    );
    if !report.output.is_empty() {
        row(
            h,
            "output bag",
            &format!("<code>{}</code>", esc(&report.output)),
        );
    }
    row(
        h,
        "command",
        &format!(
            "{} on <code>{}</code> at {} Hz{}",
            esc(&p.command_mode),
            esc(&p.command_topic),
            p.control_rate_hz,
            if p.dry_run { " (dry run)" } else { "" }
        ),
    );
    let cams: Vec<String> = trace
        .cameras
        .iter()
        .map(|t| {
            let transport = report
                .camera_transports
                .get(t)
                .map_or(String::new(), |x| format!(" ({})", esc(x)));
            format!("<code>{}</code>{transport}", esc(t))
        })
        .collect();
    row(h, "cameras", &cams.join(", "));
    row(
        h,
        "policy calls",
        &format!(
            "{} ({} failed), latency p50 {}, p95 {}, max {} [{}{}]; {} chunks ({} stale, {} late)",
            report.inferences,
            report.failed_inferences,
            ms(report.latency.p50_ms),
            ms(report.latency.p95_ms),
            ms(report.latency.max_ms),
            esc(&report.latency_model),
            if report.realtime { ", real time" } else { "" },
            report.chunks,
            report.stale_chunks,
            report.late_chunks
        ),
    );
    let commands: Vec<String> = report
        .commands
        .iter()
        .map(|(t, n)| format!("{n} on <code>{}</code>", esc(t)))
        .collect();
    row(
        h,
        "commands",
        &if commands.is_empty() {
            "none".to_owned()
        } else {
            commands.join(", ")
        },
    );
    row(
        h,
        "frames",
        &format!(
            "{} decoded, {} rejected",
            report.frames_received, report.frames_rejected
        ),
    );
    if let Some(e) = &report.expect {
        row(
            h,
            "expected output",
            &format!(
                "{}: <code>{}</code> ({} commands compared, max |diff| {:.3e}, tolerance {:.3e})",
                if e.passed { "same" } else { "<b>DIFFERENT</b>" },
                esc(&e.previous),
                e.compared,
                e.max_abs_diff,
                e.tolerance
            ),
        );
    }
    row(
        h,
        "wall time",
        &format!(
            "{:.2} s ({:.2} s in policy calls)",
            report.wall_s, report.inference_s
        ),
    );
    h.push_str("</table>\n");

    h.push_str("<h2>Instructions</h2>\n");
    if report.instructions.is_empty() {
        h.push_str(
            "<p class=\"missing\" id=\"no-instructions\">No instruction in the bag: the node \
             held throughout (pass <code>--instruction TEXT</code> to give one).</p>\n",
        );
    } else {
        h.push_str("<table id=\"instructions\"><tr><th>bag time</th><th>text</th></tr>\n");
        for i in &report.instructions {
            let _ = writeln!(
                h,
                "<tr><td>{:.2} s</td><td>{}</td></tr>",
                i.t_s,
                esc(&i.text)
            );
        }
        h.push_str("</table>\n");
    }

    h.push_str("<h2>Holds</h2>\n");
    let held: u64 = report.holds.values().sum();
    if held == 0 {
        let _ = writeln!(
            h,
            "<p class=\"note\">No tick held: all {} ticks executed an action.</p>",
            report.ticks
        );
    } else {
        h.push_str("<table id=\"holds\"><tr><th>reason</th><th>ticks</th><th>share</th></tr>\n");
        for (k, n) in &report.holds {
            let _ = writeln!(
                h,
                "<tr><td><span class=\"swatch\" style=\"background:{}\"></span>{}</td><td>{n}</td>\
                 <td>{:.1}%</td></tr>",
                hold_colour(k).hex(),
                esc(k),
                *n as f64 * 100.0 / report.ticks.max(1) as f64
            );
        }
        h.push_str("</table>\n");
    }

    if let Some(c) = &report.recorded_vs_predicted {
        let _ = writeln!(
            h,
            "<h2>Against the recorded actions</h2>\n<p class=\"note\">{} pairs of the predicted \
             {} and <code>{}</code> ({}) within one control period.</p>",
            c.pairs,
            esc(&c.against),
            esc(&c.topic),
            esc(&c.type_name)
        );
        let names = if c.against == "command" {
            &trace.command_names
        } else {
            &trace.action_names
        };
        h.push_str("<table id=\"comparison\"><tr><th></th>");
        for i in 0..c.l1.len() {
            let name = names.get(i).cloned().unwrap_or_else(|| format!("{i}"));
            let _ = write!(h, "<th>{}</th>", esc(&name));
        }
        h.push_str("</tr>\n<tr><th>L1</th>");
        for v in &c.l1 {
            let _ = write!(h, "<td>{v:.4}</td>");
        }
        h.push_str("</tr>\n<tr><th>RMSE</th>");
        for v in &c.rmse {
            let _ = write!(h, "<td>{v:.4}</td>");
        }
        h.push_str("</tr>\n</table>\n");
    }
}

/// Consecutive ticks held for the same reason, as shaded spans.
fn hold_spans(ticks: &[TickPoint], dt: f64) -> Vec<Span> {
    let mut spans: Vec<(f64, f64, &str)> = Vec::new();
    for t in ticks {
        let Some(kind) = t.hold else { continue };
        match spans.last_mut() {
            Some((_, end, k)) if *k == kind && (t.t_s - *end).abs() < dt * 0.5 => {
                *end = t.t_s + dt;
            }
            _ => spans.push((t.t_s, t.t_s + dt, kind)),
        }
    }
    spans
        .into_iter()
        .map(|(a, b, k)| Span {
            x: a..b,
            colour: hold_colour(k),
        })
        .collect()
}

fn legend(h: &mut String, items: &[(Colour, String)]) {
    h.push_str("<p class=\"legend\">");
    for (c, name) in items {
        let _ = write!(
            h,
            "<span><span class=\"swatch\" style=\"background:{}\"></span>{}</span>",
            c.hex(),
            esc(name)
        );
    }
    h.push_str("</p>\n");
}

/// A chart wrapped in a figure that says which series it holds and how many points each has.
fn figure(h: &mut String, id: &str, chart: &Chart) -> Result<(), String> {
    let svg = charts::svg(chart)?;
    let series: Vec<serde_json::Value> = chart
        .series
        .iter()
        .map(
            |s| serde_json::json!({"name": s.name, "colour": s.colour.hex(), "points": s.points()}),
        )
        .collect();
    let _ = writeln!(
        h,
        "<figure data-chart=\"{}\" data-series=\"{}\">{svg}</figure>",
        esc(id),
        esc(&serde_json::Value::Array(series).to_string())
    );
    Ok(())
}

fn x_range(report: &ReplayReport, trace: &Trace) -> std::ops::Range<f64> {
    let end = trace
        .ticks
        .last()
        .map_or(0.0, |t| t.t_s + trace.control_period_s)
        .max(report.bag_duration_s);
    0.0..end.max(1e-3)
}

fn action_charts(h: &mut String, report: &ReplayReport, trace: &Trace) -> Result<(), String> {
    let b = basis(report, trace);
    let _ = writeln!(
        h,
        "<h2>Actions</h2>\n<p class=\"note\">Each {} dimension the node executed (bag time), \
         broken where it held.</p>",
        b.what
    );
    let dt = trace.control_period_s;
    let stride = trace.ticks.len().div_ceil(MAX_PLOTTED_TICKS).max(1);
    if stride > 1 {
        let _ = writeln!(
            h,
            "<p class=\"note\">{} ticks: every {stride}th is plotted.</p>",
            trace.ticks.len()
        );
    }
    let executed = trace.ticks.iter().filter(|t| t.hold.is_none()).count();
    if executed == 0 {
        let reasons: Vec<String> = report
            .holds
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            h,
            "<p class=\"missing\" id=\"no-actions\">No action was executed: every one of the {} \
             ticks held ({}). The charts show the holds only.</p>",
            report.ticks,
            if reasons.is_empty() {
                "no tick ran".to_owned()
            } else {
                reasons.join(", ")
            }
        );
    }
    match &report.recorded_vs_predicted {
        None => h.push_str(
            "<p class=\"missing\" id=\"no-recorded\">No recorded actions to compare: pass \
             <code>--recorded-topic TOPIC</code> (the actions executed when the bag was recorded) \
             to draw them on the same axes.</p>\n",
        ),
        Some(c) if trace.recorded.is_empty() => {
            let _ = writeln!(
                h,
                "<p class=\"missing\" id=\"no-recorded\">The recorded topic <code>{}</code> had \
                 no readable message in this replay.</p>",
                esc(&c.topic)
            );
        }
        Some(_) => {}
    }
    let spans = hold_spans(&trace.ticks, dt);
    let mut markers = Vec::new();
    let mut last_chunk = None;
    for t in trace.ticks.iter().filter(|t| t.hold.is_none()) {
        if t.chunk.is_some() && t.chunk != last_chunk {
            markers.push(Marker {
                x: t.t_s,
                colour: CHUNK,
                width: 1,
            });
            last_chunk = t.chunk;
        }
    }
    let chunk_marks = markers.len();
    for i in &report.instructions {
        markers.push(Marker {
            x: i.t_s,
            colour: INSTRUCTION,
            width: 2,
        });
    }
    let mut items = vec![(COMMAND, format!("{} (this replay)", b.what))];
    if !trace.recorded.is_empty() {
        items.push((RECORDED, "recorded".to_owned()));
    }
    items.push((CHUNK, format!("chunk start ({chunk_marks})")));
    items.push((INSTRUCTION, "instruction".to_owned()));
    for k in report.holds.keys() {
        items.push((hold_colour(k), format!("held: {k}")));
    }
    legend(h, &items);
    let x = x_range(report, trace);
    for (dim, name) in b.names.iter().enumerate() {
        let mut series = vec![Series {
            name: b.what.to_owned(),
            colour: COMMAND,
            segments: Vec::new(),
        }];
        let mut prev: Option<f64> = None;
        for t in trace.ticks.iter().step_by(stride) {
            let v = if t.hold.is_none() {
                (b.pick)(t).and_then(|v| v.get(dim).copied())
            } else {
                None
            };
            match v {
                Some(v) => {
                    let gap = prev.is_none_or(|p| t.t_s - p > dt * stride as f64 * 1.5);
                    if gap {
                        series[0].segments.push(Vec::new());
                    }
                    if let Some(seg) = series[0].segments.last_mut() {
                        seg.push((t.t_s, v));
                    }
                    prev = Some(t.t_s);
                }
                None => prev = None,
            }
        }
        if trace.recorded.iter().any(|(_, v)| v.len() > dim) {
            let mut rec = Series {
                name: "recorded".to_owned(),
                colour: RECORDED,
                segments: Vec::new(),
            };
            let mut prev: Option<f64> = None;
            for (t, v) in &trace.recorded {
                let Some(&v) = v.get(dim) else { continue };
                if prev.is_none_or(|p| t - p > 0.5) {
                    rec.segments.push(Vec::new());
                }
                if let Some(seg) = rec.segments.last_mut() {
                    seg.push((*t, v));
                }
                prev = Some(*t);
            }
            series.push(rec);
        }
        figure(
            h,
            &format!("dim-{dim}"),
            &Chart {
                title: name,
                x_label: "bag time [s]",
                y_label: name,
                size: (1000, 190),
                x: Some(x.clone()),
                series: &series,
                spans: &spans,
                markers: &markers,
                equal_axes: false,
            },
        )?;
    }
    Ok(())
}

fn latency_chart(h: &mut String, report: &ReplayReport, trace: &Trace) -> Result<(), String> {
    h.push_str("<h2>Inference latency</h2>\n");
    let points: Vec<(f64, f64)> = trace
        .calls
        .iter()
        .filter_map(|c| c.latency_ms.map(|l| (c.t_s, l)))
        .collect();
    let failed: Vec<Marker> = trace
        .calls
        .iter()
        .filter(|c| c.error.is_some())
        .map(|c| Marker {
            x: c.t_s,
            colour: FAILED,
            width: 1,
        })
        .collect();
    if points.is_empty() {
        h.push_str("<p class=\"missing\" id=\"no-latency\">No policy call returned a chunk.</p>\n");
    }
    let mut items = vec![(
        LATENCY,
        "wall time of each call whose chunk was taken".to_owned(),
    )];
    if !failed.is_empty() {
        items.push((FAILED, format!("failed call ({})", failed.len())));
    }
    legend(h, &items);
    let series = [Series {
        name: "latency".to_owned(),
        colour: LATENCY,
        segments: vec![points],
    }];
    figure(
        h,
        "latency",
        &Chart {
            title: "inference latency per call",
            x_label: "bag time of the observation [s]",
            y_label: "ms",
            size: (1000, 220),
            x: Some(x_range(report, trace)),
            series: &series,
            spans: &[],
            markers: &failed,
            equal_axes: false,
        },
    )
}

fn thumbnails(h: &mut String, trace: &Trace) {
    h.push_str("<h2>What the cameras showed</h2>\n");
    let cams: Vec<String> = trace
        .cameras
        .iter()
        .map(|c| format!("<code>{}</code>", esc(c)))
        .collect();
    let kept = trace
        .calls
        .iter()
        .filter(|c| !c.thumbnails.is_empty())
        .count();
    let _ = writeln!(
        h,
        "<p class=\"note\">At each policy call, top to bottom: {}; the call's bag time and the \
         first action of its chunk.{}</p>",
        cams.join(", "),
        if trace.thumbnail_every > 1 {
            format!(
                " {} calls: one in {} is shown.",
                trace.calls.len(),
                trace.thumbnail_every
            )
        } else {
            String::new()
        }
    );
    if trace.cameras.len() < 2 {
        h.push_str(
            "<p class=\"missing\" id=\"no-wrist\">No wrist camera in this replay \
             (wrist_camera_topic is empty): one image per call.</p>\n",
        );
    }
    if let Some(e) = &trace.thumbnail_error {
        let _ = writeln!(h, "<p class=\"missing\">Thumbnails missing: {}</p>", esc(e));
    }
    if kept == 0 {
        h.push_str(
            "<p class=\"missing\" id=\"no-thumbnails\">No policy call was made, so no \
             observation to show.</p>\n",
        );
        return;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let _ = writeln!(h, "<div class=\"strip\" data-calls=\"{kept}\">");
    for c in trace.calls.iter().filter(|c| !c.thumbnails.is_empty()) {
        let _ = write!(h, "<figure class=\"call\" data-t=\"{:.3}\">", c.t_s);
        for (i, jpeg) in c.thumbnails.iter().enumerate() {
            let cam = trace.cameras.get(i).map_or("", String::as_str);
            let _ = write!(
                h,
                "<img alt=\"{} at {:.2} s\" src=\"data:image/jpeg;base64,{}\">",
                esc(cam),
                c.t_s,
                b64.encode(jpeg)
            );
        }
        let outcome = match (&c.first_action, &c.error, c.latency_ms) {
            (_, Some(e), _) => format!("<br>failed: {}", esc(e)),
            (Some(a), _, Some(l)) => format!("<br>{l:.0} ms, first action {}", values(a)),
            _ => "<br>no chunk taken (superseded or after the end)".to_owned(),
        };
        let _ = writeln!(
            h,
            "<figcaption>{:.2} s, call {}{outcome}</figcaption></figure>",
            c.t_s, c.id
        );
    }
    h.push_str("</div>\n");
}

fn ee_path(h: &mut String, trace: &Trace, ctx: &Context) -> Result<(), String> {
    h.push_str("<h2>End-effector path</h2>\n");
    let Some(frame) = trace.ee_frame else {
        let _ = writeln!(
            h,
            "<p class=\"missing\" id=\"no-ee-path\">Command mode {}: the node commands joints, \
             so there is no end-effector path to draw.</p>",
            esc(&ctx.params.command_mode)
        );
        return Ok(());
    };
    let _ = writeln!(
        h,
        "<p class=\"note\">{}</p>",
        match frame {
            EeFrame::Absolute => "The commanded end-effector positions (frame of the commands).",
            EeFrame::Integrated =>
                "The commanded linear velocity integrated over each control period, from where \
                 the end effector was at the first command (the origin).",
        }
    );
    if trace.ee_path.is_empty() {
        h.push_str("<p class=\"missing\" id=\"no-ee-path\">No command was published.</p>\n");
        return Ok(());
    }
    legend(
        h,
        &[
            (COMMAND, "commanded path".to_owned()),
            (START, "first command".to_owned()),
            (END, "last command".to_owned()),
        ],
    );
    h.push_str("<div class=\"views\">\n");
    for (id, title, a, b, label) in [
        ("ee-top", "top view (x, y)", 0, 1, "y [m]"),
        ("ee-side", "side view (x, z)", 0, 2, "z [m]"),
    ] {
        let at = |p: &[f64; 3]| (p[a], p[b]);
        let ends = |i: Option<&(f64, [f64; 3])>| i.map(|(_, p)| vec![at(p)]).into_iter().collect();
        let series = [
            Series {
                name: "path".to_owned(),
                colour: COMMAND,
                segments: vec![trace.ee_path.iter().map(|(_, p)| at(p)).collect()],
            },
            Series {
                name: "start".to_owned(),
                colour: START,
                segments: ends(trace.ee_path.first()),
            },
            Series {
                name: "end".to_owned(),
                colour: END,
                segments: ends(trace.ee_path.last()),
            },
        ];
        figure(
            h,
            id,
            &Chart {
                title,
                x_label: "x [m]",
                y_label: label,
                size: (480, 400),
                x: None,
                series: &series,
                spans: &[],
                markers: &[],
                equal_axes: true,
            },
        )?;
    }
    h.push_str("</div>\n");
    Ok(())
}

fn warnings(h: &mut String, report: &ReplayReport) {
    h.push_str("<h2>Warnings</h2>\n");
    if report.warning_count == 0 {
        h.push_str("<p class=\"note\">None.</p>\n");
        return;
    }
    h.push_str(
        "<table id=\"warnings\"><tr><th>kind</th><th>topic</th><th>count</th><th>bag time</th>\
         <th>first</th></tr>\n",
    );
    for g in &report.warning_summary {
        let when = match (g.first_s, g.last_s) {
            (Some(a), Some(b)) if g.count > 1 => format!("{a:.2}–{b:.2} s"),
            (Some(a), _) => format!("{a:.2} s"),
            _ => String::new(),
        };
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{when}</td><td>{}</td></tr>",
            esc(&g.kind),
            esc(&g.topic),
            g.count,
            esc(&g.example)
        );
    }
    h.push_str("</table>\n");
    const SHOWN: usize = 500;
    let _ = writeln!(
        h,
        "<details><summary>all {} warnings</summary><ol>",
        report.warnings.len()
    );
    for w in report.warnings.iter().take(SHOWN) {
        let _ = writeln!(h, "<li>{}</li>", esc(w));
    }
    h.push_str("</ol>");
    if report.warnings.len() > SHOWN {
        let _ = write!(
            h,
            "<p class=\"note\">and {} more: the JSON report (<code>--report</code>) keeps every one.</p>",
            report.warnings.len() - SHOWN
        );
    }
    h.push_str("</details>\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(
            esc("<b a=\"x\">&'</b>"),
            "&lt;b a=&quot;x&quot;&gt;&amp;&#39;&lt;/b&gt;"
        );
    }

    #[test]
    fn holds_merge_into_spans_per_reason() {
        let tick = |t: f64, hold| TickPoint {
            t_s: t,
            action: None,
            command: None,
            hold,
            chunk: None,
        };
        let ticks = [
            tick(0.0, Some("no_instruction")),
            tick(0.1, Some("no_instruction")),
            tick(0.2, Some("no_chunk")),
            tick(0.3, None),
            tick(0.4, Some("no_chunk")),
        ];
        let spans = hold_spans(&ticks, 0.1);
        let xs: Vec<(f64, f64)> = spans.iter().map(|s| (s.x.start, s.x.end)).collect();
        assert_eq!(xs.len(), 3);
        assert!((xs[0].1 - 0.2).abs() < 1e-9 && (xs[1].0 - 0.2).abs() < 1e-9);
    }

    #[test]
    fn a_report_with_nothing_in_it_says_so() {
        let report = ReplayReport {
            interrupted: true,
            ..Default::default()
        };
        let trace = Trace::new(vec!["dx".into()], vec![], 0.05, vec!["/cam".into()], None);
        let params = NodeParams::default();
        let html = render(
            &report,
            &trace,
            &Context {
                model: "m",
                params_file: None,
                params: &params,
            },
        )
        .expect("a page");
        for id in [
            "interrupted",
            "no-instructions",
            "no-actions",
            "no-recorded",
            "no-latency",
            "no-wrist",
            "no-thumbnails",
        ] {
            assert!(html.contains(&format!("id=\"{id}\"")), "{id} missing");
        }
        assert!(html.ends_with("</html>\n"));
    }
}
