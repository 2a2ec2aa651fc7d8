//! `loratune report DIR`: one self-contained HTML page for a run, a sweep or a folder of runs — the loss, eval
//! and task-metric curves of every run overlaid, the `loratune runs` table (sortable), the settings they share,
//! and the held-out questions answered before and after training side by side. No network: the charts are
//! inline SVG, the little script (sorting, highlighting, picking a run's answers) is inline too.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::report::{chart_svg, read_metrics, xml_escape as esc, MetricLine, Series, Style};
use super::runs::{
    cells, config_of, find_runs, key_columns, num, table, task_columns, RunRow, COLUMNS,
};
use super::sweep::{read_state, SweepState};
use crate::error::{Error, Result};
use crate::generate::score::SampleResult;

/// The page and what it shows (for messages and tests).
#[derive(Debug, Clone)]
pub struct Page {
    pub html: String,
    /// Runs in the table (one row each).
    pub runs: usize,
    /// Curves drawn over all charts (one polyline per run and quantity).
    pub curves: usize,
    /// Runs whose held-out answers are shown before/after.
    pub answered: usize,
}

/// The palette (Tableau 10), cycled.
const COLORS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];

/// A run's held-out answers: the first (the baseline, step 0 when there is one) and the last file.
struct Answers {
    before: (u64, Vec<SampleResult>),
    after: Option<(u64, Vec<SampleResult>)>,
}

fn read_answers(run: &Path) -> Result<Option<Answers>> {
    let dir = run.join("eval_generate");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Ok(None);
    };
    let mut steps: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step = name
                .strip_prefix("step-")?
                .strip_suffix(".jsonl")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    steps.sort();
    let read = |p: &Path| -> Result<Vec<SampleResult>> {
        let text = crate::error::read_to_string(p)?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, l)| {
                serde_json::from_str(l)
                    .map_err(|e| Error::Train(format!("{}:{}: {e}", p.display(), i + 1)))
            })
            .collect()
    };
    let Some((first, first_path)) = steps.first() else {
        return Ok(None);
    };
    let before = (*first, read(first_path)?);
    let after = match steps.last() {
        Some((s, p)) if s != first => Some((*s, read(p)?)),
        _ => None,
    };
    Ok(Some(Answers { before, after }))
}

/// A run's short label: its folder name.
fn label(run: &Path) -> String {
    run.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| run.display().to_string())
}

/// Build the page for `dir` (a run folder, a sweep folder, or a folder of runs).
pub fn report_page(dir: &Path) -> Result<Page> {
    let runs = find_runs(&[dir.to_path_buf()])?;
    let rows = table(&runs)?;
    let sweep = read_state(dir).ok();
    let metrics: Vec<Vec<MetricLine>> = runs
        .iter()
        .map(|r| read_metrics(r))
        .collect::<Result<_>>()?;
    let labels: Vec<String> = runs.iter().map(|r| label(r)).collect();
    let color = |i: usize| COLORS[i % COLORS.len()].to_string();
    let best_run: Option<usize> = sweep.as_ref().and_then(|s| {
        let b = s.best?;
        let name = &s.trials.get(b - 1)?.name;
        labels.iter().position(|l| l == name)
    });

    // Charts: one curve per run and quantity.
    let mut curves = 0;
    let mut chart =
        |title: &str, style: Style, pick: &dyn Fn(&MetricLine) -> Option<f64>| -> Option<String> {
            let series: Vec<Series> = metrics
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    let points: Vec<(f64, f64)> = m
                        .iter()
                        .filter_map(|l| pick(l).map(|v| (l.step as f64, v)))
                        .collect();
                    (!points.is_empty()).then(|| Series {
                        name: labels[i].clone(),
                        color: color(i),
                        points,
                        style,
                        attrs: format!("class=\"curve\" data-run=\"{i}\""),
                    })
                })
                .collect();
            if series.is_empty() {
                return None;
            }
            curves += series.len();
            Some(format!(
                "<figure>{}</figure>",
                chart_svg(title, &series, false)
            ))
        };
    let mut charts = Vec::new();
    charts.extend(chart("Training loss", Style::Line, &|l| l.loss));
    charts.extend(chart("Eval loss", Style::LineDots, &|l| l.eval_loss));
    let tasks = task_columns(&rows);
    for t in &tasks {
        charts.extend(chart(
            &format!("Held-out questions: {t} (step 0 = before training)"),
            Style::LineDots,
            &|l| l.task.as_ref().and_then(|m| m.get(t).copied()),
        ));
    }

    // The table: `loratune runs`' columns, plus the sweep's metric at each rung.
    let keys = key_columns(&rows);
    let rung_cols: Vec<String> = match &sweep {
        Some(s) if !s.rungs.is_empty() => s
            .rungs
            .iter()
            .map(|r| format!("{} @{r}", s.metric))
            .collect(),
        _ => Vec::new(),
    };
    let sweep_results = |run: &Path| -> Vec<Option<f64>> {
        sweep
            .as_ref()
            .and_then(|s| s.trials.iter().find(|t| t.name == label(run)))
            .map(|t| t.results.clone())
            .unwrap_or_default()
    };
    let mut head = vec!["run".to_string()];
    head.extend(keys.iter().cloned());
    head.extend(COLUMNS.iter().map(|c| c.to_string()));
    head.extend(tasks.iter().map(|t| format!("task:{t}")));
    head.extend(rung_cols.iter().cloned());
    let mut table_html = String::from("<table id=\"runs\"><thead><tr>");
    for h in &head {
        table_html += &format!("<th title=\"sort\">{}</th>", esc(h));
    }
    table_html += "</tr></thead><tbody>";
    for (i, r) in rows.iter().enumerate() {
        let mut cellv = vec![format!(
            "<span class=\"swatch\" style=\"background:{}\"></span>{}",
            color(i),
            esc(&labels[i])
        )];
        cellv.extend(keys.iter().map(|k| esc(r.differs.get(k).map_or("", |v| v))));
        cellv.extend(cells(r).iter().map(|c| esc(c)));
        cellv.extend(tasks.iter().map(|t| num(r.task.get(t).copied(), 3)));
        let res = sweep_results(&r.run);
        cellv.extend((0..rung_cols.len()).map(|k| num(res.get(k).copied().flatten(), 4)));
        table_html += &format!(
            "<tr data-run=\"{i}\"{}>",
            if best_run == Some(i) {
                " class=\"best\""
            } else {
                ""
            }
        );
        for c in cellv {
            table_html += &format!("<td>{c}</td>");
        }
        table_html += "</tr>";
    }
    table_html += "</tbody></table>";

    // Settings every run shares (the differing ones are the table's columns).
    let configs: Vec<BTreeMap<String, String>> =
        runs.iter().map(|r| config_of(r)).collect::<Result<_>>()?;
    let mut shared = String::new();
    if let Some(first) = configs.first() {
        for (k, v) in first {
            if keys.contains(k) || k == "output_dir" {
                continue;
            }
            if configs.iter().all(|c| c.get(k) == Some(v)) {
                shared += &format!("<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v));
            }
        }
    }

    // Held-out answers, before and after, for each run that asked them; the best (or first) shown.
    let mut answered = 0;
    let mut options = String::new();
    let mut sections = String::new();
    for (i, r) in runs.iter().enumerate() {
        let Some(a) = read_answers(r)? else { continue };
        answered += 1;
        options += &format!(
            "<option value=\"{i}\"{}>{}</option>",
            if best_run == Some(i) { " selected" } else { "" },
            esc(&labels[i])
        );
        sections += &answers_html(i, &a);
    }
    let answers = if answered == 0 {
        String::new()
    } else {
        format!(
            "<h2>Held-out questions: before and after</h2>\n<p>Run <select id=\"answers-run\">{options}</select></p>\n{sections}"
        )
    };

    let title = match &sweep {
        Some(s) => format!(
            "Sweep {} — {} trials, {}, ranked by {} ({})",
            dir.display(),
            s.trials.len(),
            s.method,
            s.metric,
            s.goal
        ),
        None if runs.len() == 1 => format!("Run {}", runs[0].display()),
        None => format!("{} runs in {}", runs.len(), dir.display()),
    };
    let summary = sweep_summary(sweep.as_ref(), &rows, best_run, &labels);
    let legend: String = labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            format!(
                "<li data-run=\"{i}\"><span class=\"swatch\" style=\"background:{}\"></span>{}</li>",
                color(i),
                esc(l)
            )
        })
        .collect();
    let html = format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>{t}</title>\n<style>{STYLE}</style></head>\n\
<body>\n<h1>{t}</h1>\n<p class=\"meta\">Written by loratune {v} on {date}. Hover a run in the legend or the table to pick out its curves; click a column to sort.</p>\n{summary}\n\
<ul class=\"legend\">{legend}</ul>\n<div class=\"charts\">{charts}</div>\n<h2>Runs</h2>\n{table_html}\n\
<details><summary>Settings all runs share</summary><table class=\"kv\">{shared}</table></details>\n{answers}\n<script>{SCRIPT}</script>\n</body></html>\n",
        t = esc(&title),
        v = env!("CARGO_PKG_VERSION"),
        date = chrono::Local::now().format("%Y-%m-%d %H:%M"),
        charts = charts.join("\n"),
    );
    Ok(Page {
        html,
        runs: runs.len(),
        curves,
        answered,
    })
}

fn sweep_summary(
    sweep: Option<&SweepState>,
    rows: &[RunRow],
    best: Option<usize>,
    labels: &[String],
) -> String {
    let (Some(s), Some(b)) = (sweep, best) else {
        return String::new();
    };
    let row = &rows[b];
    let value = s
        .trials
        .iter()
        .find(|t| t.name == labels[b])
        .and_then(|t| t.results.last().copied().flatten());
    let params: Vec<String> = row
        .differs
        .iter()
        .map(|(k, v)| format!("{k} = {v}"))
        .collect();
    format!(
        "<p class=\"best-line\">Best: <b>{}</b> ({}) — {} {}</p>",
        esc(&labels[b]),
        esc(&params.join(", ")),
        esc(&s.metric),
        num(value, 4)
    )
}

fn answers_html(run: usize, a: &Answers) -> String {
    let (b_step, before) = &a.before;
    let after = a.after.as_ref();
    let mut s = format!(
        "<section class=\"answers\" data-run=\"{run}\"><table><thead><tr><th>question</th><th>expected</th>\
<th>step {b_step}{}</th>{}</tr></thead><tbody>",
        if *b_step == 0 { " (before training)" } else { "" },
        after.map_or(String::new(), |(st, _)| format!("<th>step {st} (after)</th>"))
    );
    let scores = |x: &SampleResult| -> String {
        x.scores
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    for (i, q) in before.iter().enumerate() {
        s += &format!(
            "<tr><td>{}</td><td>{}</td><td>{}<div class=\"score\">{}</div></td>",
            esc(&q.prompt),
            esc(&q.references.join(" · ")),
            esc(&q.answer),
            esc(&scores(q))
        );
        if let Some((_, after)) = after {
            match after.get(i).filter(|x| x.prompt == q.prompt) {
                Some(x) => {
                    s += &format!(
                        "<td>{}<div class=\"score\">{}</div></td>",
                        esc(&x.answer),
                        esc(&scores(x))
                    )
                }
                None => s += "<td>—</td>",
            }
        }
        s += "</tr>";
    }
    s += "</tbody></table></section>\n";
    s
}

const STYLE: &str = "body{font-family:sans-serif;margin:24px;color:#222;max-width:1500px}\
h1{font-size:20px}h2{font-size:17px;margin-top:28px}.meta{color:#666;font-size:13px}\
.charts{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;flex:1 1 560px;max-width:720px}\
figure svg{width:100%;height:auto}\
.legend{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:4px 16px;font-size:13px}\
.legend li{cursor:default}.swatch{display:inline-block;width:12px;height:12px;margin-right:6px;vertical-align:middle;border-radius:2px}\
table{border-collapse:collapse;font-size:13px}th,td{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}\
th{background:#f4f4f4;cursor:pointer}tr.best td{background:#eef8ee}tr.hl td{background:#fff6d5}\
.answers td{max-width:420px}.score{color:#777;font-size:11px;margin-top:3px}\
svg .curve{transition:opacity .15s}svg.dim .curve{opacity:.12}svg.dim .curve.on{opacity:1;stroke-width:3}\
.best-line{font-size:15px}details{margin-top:16px}";

/// Sorting, highlighting and the answers picker; then a note on `<body>` of what the browser laid out (the
/// headless-browser test reads it).
const SCRIPT: &str = r#"
(function () {
  var table = document.getElementById('runs');
  var body = table.tBodies[0];
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
    var asc = true;
    th.addEventListener('click', function () {
      var rows = Array.prototype.slice.call(body.rows);
      var key = function (r) {
        var t = r.cells[col].textContent.trim().split(' ')[0];
        var n = parseFloat(t);
        return isNaN(n) ? t : n;
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b);
        if (x === '—') return 1;
        if (y === '—') return -1;
        var c = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
        return asc ? c : -c;
      });
      asc = !asc;
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
  function highlight(run) {
    document.querySelectorAll('svg').forEach(function (svg) {
      svg.classList.toggle('dim', run !== null);
    });
    document.querySelectorAll('.curve').forEach(function (c) {
      c.classList.toggle('on', c.getAttribute('data-run') === run);
    });
    Array.prototype.forEach.call(body.rows, function (r) {
      r.classList.toggle('hl', r.getAttribute('data-run') === run);
    });
  }
  document.querySelectorAll('.legend li, #runs tbody tr').forEach(function (el) {
    el.addEventListener('mouseenter', function () { highlight(el.getAttribute('data-run')); });
    el.addEventListener('mouseleave', function () { highlight(null); });
  });
  var pick = document.getElementById('answers-run');
  function show() {
    document.querySelectorAll('section.answers').forEach(function (s) {
      s.style.display = s.getAttribute('data-run') === pick.value ? '' : 'none';
    });
  }
  if (pick) { pick.addEventListener('change', show); show(); }
  var drawn = 0;
  document.querySelectorAll('polyline.curve').forEach(function (p) {
    // Laid out: its chart has a size, and a curve of two or more points spans some of it.
    var b = p.getBoundingClientRect();
    var chart = p.ownerSVGElement.getBoundingClientRect();
    if (chart.width > 0 && (p.points.numberOfItems < 2 || b.width > 0 || b.height > 0)) drawn++;
  });
  var shown = 0;
  document.querySelectorAll('section.answers').forEach(function (s) {
    if (s.getBoundingClientRect().height > 0) shown++;
  });
  document.body.setAttribute('data-curves-drawn', drawn);
  document.body.setAttribute('data-rows', body.rows.length);
  document.body.setAttribute('data-answers-shown', shown);
  document.body.setAttribute('data-ready', '1');
})();
"#;
