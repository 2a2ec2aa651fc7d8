//! What the user sees of a run: `metrics.jsonl` lines and the loss-curve SVG written at the end.

use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricLine {
    pub step: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    /// The routers' load-balancing loss of the logged step (mixture-of-experts models with
    /// `router_aux_loss_coef`), before its coefficient; `loss` is the language-modelling loss alone.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// Real tokens per second over every peer of the run (one device: its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens_per_second: Option<f64>,
    /// Memory per peer in MB, in rank order: the device's memory pools on a GPU, the process's peak RSS on the
    /// CPU (peers of one process share it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<Vec<f64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_loss: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<f64>,
    /// Seconds of training so far (the loops of every session of the run, resumes included, evaluations and
    /// checkpoints included; not the time before the first step).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub elapsed_seconds: Option<f64>,
    /// Task metrics on the held-out questions (`eval_generate`): metric name → mean score in [0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<std::collections::BTreeMap<String, f64>>,
}

impl MetricLine {
    /// The line's values under TensorBoard tags (the names the transformers Trainer logs).
    pub fn scalars(&self) -> Vec<(&'static str, f32)> {
        [
            ("train/loss", self.loss),
            ("train/learning_rate", self.lr),
            ("train/grad_norm", self.grad_norm),
            ("train/aux_loss", self.aux_loss),
            ("train/tokens_per_second", self.tokens_per_second),
            // An evaluation line repeats its step's epoch: logged once, with the training scalars.
            ("train/epoch", self.epoch.filter(|_| self.loss.is_some())),
            ("eval/loss", self.eval_loss),
            ("eval/perplexity", self.eval_perplexity),
        ]
        .into_iter()
        .chain(crate::generate::score::Metric::ALL.into_iter().map(|m| {
            (
                m.tensorboard_tag(),
                self.task.as_ref().and_then(|t| t.get(m.name()).copied()),
            )
        }))
        .filter_map(|(tag, v)| v.map(|v| (tag, v as f32)))
        .collect()
    }
}

/// Append-only metrics.jsonl (flushed per line so a crash loses nothing written).
pub struct MetricsWriter {
    /// `None`: a sink (a data-parallel peer other than rank 0 writes nothing).
    file: Option<std::fs::File>,
    path: std::path::PathBuf,
    pub lines: u64,
    /// The same scalars as TensorBoard events (`use_tensorboard`).
    tensorboard: Option<super::tensorboard::EventWriter>,
}

impl MetricsWriter {
    /// Open `dir/metrics.jsonl`, keeping only its first `keep_lines` lines (a resumed run drops what came after
    /// the checkpoint, so every step appears once).
    pub fn open(dir: &Path, keep_lines: u64) -> Result<Self> {
        let path = dir.join("metrics.jsonl");
        let kept: Vec<String> = std::fs::read_to_string(&path)
            .map(|t| {
                t.lines()
                    .take(keep_lines as usize)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let mut file = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        for l in &kept {
            writeln!(file, "{l}").map_err(|e| Error::io(&path, e))?;
        }
        Ok(MetricsWriter {
            file: Some(file),
            path,
            lines: kept.len() as u64,
            tensorboard: None,
        })
    }

    /// A writer that writes nothing.
    pub fn sink() -> Self {
        MetricsWriter {
            file: None,
            path: std::path::PathBuf::new(),
            lines: 0,
            tensorboard: None,
        }
    }

    /// Also write every line's scalars to TensorBoard event files.
    pub fn with_tensorboard(self, w: super::tensorboard::EventWriter) -> Self {
        MetricsWriter {
            tensorboard: Some(w),
            ..self
        }
    }

    pub fn write(&mut self, m: &MetricLine) -> Result<()> {
        let s = serde_json::to_string(m).map_err(|source| Error::Serialize {
            what: "a metrics.jsonl line".into(),
            source: source.into(),
        })?;
        let Some(file) = &mut self.file else {
            return Ok(());
        };
        writeln!(file, "{s}").map_err(|e| Error::io(&self.path, e))?;
        file.flush().map_err(|e| Error::io(&self.path, e))?;
        self.lines += 1;
        if let Some(tb) = &mut self.tensorboard {
            tb.scalars(m.step, &m.scalars())?;
        }
        Ok(())
    }
}

/// Read metrics.jsonl back.
pub fn read_metrics(dir: &Path) -> Result<Vec<MetricLine>> {
    let path = dir.join("metrics.jsonl");
    let text = crate::error::read_to_string(&path)?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .map_err(|e| Error::Train(format!("{}:{}: {e}", path.display(), i + 1)))
        })
        .collect()
}

/// Whole-step tick positions over `[x0, x1]`: multiples of the smallest 1·10ᵏ, 2·10ᵏ or 5·10ᵏ (≥ 1) that leaves
/// at most 6 ticks.
fn step_ticks(x0: f64, x1: f64) -> Vec<u64> {
    let span = (x1 - x0).max(1.0);
    let mut step = 1u64;
    'search: for k in 0..12 {
        for m in [1u64, 2, 5] {
            step = m * 10u64.pow(k);
            if span / step as f64 <= 5.0 {
                break 'search;
            }
        }
    }
    let first = (x0.max(0.0) / step as f64).ceil() as u64 * step;
    (0..)
        .map(|i| first + i * step)
        .take_while(|&t| t as f64 <= x1 + 1e-9)
        .collect()
}

/// How a [`Series`] is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    Line,
    Dots,
    LineDots,
}

/// One curve of a [`chart_svg`].
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: String,
    /// (step, value); non-finite values are left out.
    pub points: Vec<(f64, f64)>,
    pub style: Style,
    /// Extra attributes on the curve's elements (e.g. `class="curve" data-run="3"` for the report page).
    pub attrs: String,
}

/// A self-contained SVG line chart against optimizer step: grid, whole-step ticks, each series as a polyline
/// and/or dots, a legend inside the plot when `legend`.
pub fn chart_svg(title: &str, series: &[Series], legend: bool) -> String {
    let (w, h, ml, mr, mt, mb) = (720.0, 420.0, 60.0, 20.0, 40.0, 50.0);
    let finite = || {
        series
            .iter()
            .flat_map(|s| s.points.iter())
            .filter(|p| p.1.is_finite())
    };
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in finite() {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-9 {
        x1 = x0 + 1.0;
    }
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    let pad = (y1 - y0) * 0.05;
    let (y0, y1) = ((y0 - pad).max(0.0), y1 + pad);
    let sx = |x: f64| ml + (x - x0) / (x1 - x0) * (w - ml - mr);
    let sy = |y: f64| mt + (1.0 - (y - y0) / (y1 - y0)) * (h - mt - mb);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n",
        w / 2.0,
        xml_escape(title)
    );
    // Axes, ticks and grid.
    for i in 0..=5 {
        let yv = y0 + (y1 - y0) * i as f64 / 5.0;
        let y = sy(yv);
        s += &format!(
            "<line x1=\"{ml}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#e5e5e5\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{yv:.3}</text>\n",
            w - mr,
            ml - 6.0,
            y + 4.0
        );
    }
    // Step ticks: whole steps, a 1-2-5 spacing giving at most 6 of them, each label once.
    for xv in step_ticks(x0, x1) {
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{xv}</text>\n",
            sx(xv as f64),
            h - mb + 18.0
        );
    }
    s += &format!(
        "<line x1=\"{ml}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"black\"/><line x1=\"{ml}\" y1=\"{mt}\" x2=\"{ml}\" y2=\"{:.1}\" stroke=\"black\"/>\n",
        h - mb,
        w - mr,
        h - mb,
        h - mb
    );
    s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">optimizer step</text>\n",
        w / 2.0,
        h - 12.0
    );
    for se in series {
        let pts: Vec<(f64, f64)> = se
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|(x, y)| (sx(*x), sy(*y)))
            .collect();
        let attrs = if se.attrs.is_empty() {
            String::new()
        } else {
            format!(" {}", se.attrs)
        };
        if se.style != Style::Dots && !pts.is_empty() {
            let text: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            s += &format!(
                "<polyline{attrs} fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"><title>{}</title></polyline>\n",
                se.color,
                text.join(" "),
                xml_escape(&se.name)
            );
        }
        if se.style != Style::Line {
            for (x, y) in &pts {
                s += &format!(
                    "<circle{attrs} cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{}\"/>\n",
                    se.color
                );
            }
        }
    }
    if legend {
        for (i, se) in series.iter().enumerate() {
            let (x, y) = (w - mr - 150.0, mt + 5.0 + 17.0 * i as f64);
            s += &match se.style {
                Style::Dots => format!(
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"4\" fill=\"{}\"/>",
                    x + 6.0,
                    y,
                    se.color
                ),
                _ => format!(
                    "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"3\" fill=\"{}\"/>",
                    y - 1.5,
                    se.color
                ),
            };
            s += &format!(
                "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
                x + 18.0,
                y + 4.0,
                xml_escape(&se.name)
            );
        }
    }
    s += "</svg>\n";
    s
}

/// A self-contained SVG of one run's train loss (and eval loss points) against step.
pub fn loss_curve_svg(metrics: &[MetricLine], title: &str) -> String {
    let pick = |f: fn(&MetricLine) -> Option<f64>| -> Vec<(f64, f64)> {
        metrics
            .iter()
            .filter_map(|m| f(m).map(|l| (m.step as f64, l)))
            .collect()
    };
    chart_svg(
        title,
        &[
            Series {
                name: "train loss".into(),
                color: "#1f77b4".into(),
                points: pick(|m| m.loss),
                style: Style::Line,
                attrs: String::new(),
            },
            Series {
                name: "eval loss".into(),
                color: "#d62728".into(),
                points: pick(|m| m.eval_loss),
                style: Style::Dots,
                attrs: String::new(),
            },
        ],
        true,
    )
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_ticks_are_whole_and_distinct() {
        assert_eq!(step_ticks(1.0, 2.0), vec![1, 2]);
        assert_eq!(step_ticks(1.0, 30.0), vec![10, 20, 30]);
        assert_eq!(step_ticks(1.0, 12.0), vec![5, 10]);
        assert_eq!(step_ticks(0.0, 1000.0), vec![0, 200, 400, 600, 800, 1000]);
        assert_eq!(step_ticks(3.0, 3.0), vec![3]);
    }

    #[test]
    fn svg_plots_every_train_point_and_eval_point() {
        let m: Vec<MetricLine> = (1..=10)
            .map(|i| MetricLine {
                step: i,
                loss: Some(3.0 - i as f64 * 0.1),
                lr: None,
                grad_norm: None,
                aux_loss: None,
                tokens_per_second: None,
                eval_loss: if i % 5 == 0 { Some(2.5) } else { None },
                ..MetricLine::default()
            })
            .collect();
        let s = loss_curve_svg(&m, "a < b");
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        let poly = s
            .split("points=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap();
        assert_eq!(poly.split(' ').count(), 10);
        assert_eq!(s.matches("<circle").count(), 2 + 1);
        assert!(s.contains("a &lt; b"));
    }
}
