//! `loratune report DIR`: one self-contained HTML page of a run, a sweep or a folder of runs.

use std::path::PathBuf;

use anyhow::Result;

use crate::train::page::report_page;

#[derive(clap::Args, Debug)]
pub struct ReportArgs {
    /// A run folder (`output_dir`), a sweep's folder, or a folder holding runs.
    pub dir: PathBuf,
    /// Where to write the page (default: DIR/report.html).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: ReportArgs) -> Result<()> {
    let page = report_page(&a.dir)?;
    let out = a.out.unwrap_or_else(|| a.dir.join("report.html"));
    crate::export::atomic::write_atomic(&out, page.html.as_bytes())?;
    println!(
        "wrote {} ({} run{}, {} curves, held-out answers of {} run{}; no network needed to view it)",
        out.display(),
        page.runs,
        if page.runs == 1 { "" } else { "s" },
        page.curves,
        page.answered,
        if page.answered == 1 { "" } else { "s" }
    );
    Ok(())
}
