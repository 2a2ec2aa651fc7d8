//! `loratune runs DIR…`: compare runs (or a sweep's trials) in one table.

use std::path::PathBuf;

use anyhow::Result;

use crate::train::runs::{find_runs, render_csv, render_text, sort, table};

#[derive(clap::Args, Debug)]
pub struct RunsArgs {
    /// Run folders (an `output_dir`), or folders holding runs (their subfolders and `trials/` are searched).
    #[arg(required = true)]
    pub dirs: Vec<PathBuf>,
    /// Sort by eval_loss (best, the default), train_loss (final), tokens_per_second (fastest first), steps, run,
    /// or a config key that differs between the runs.
    #[arg(long, default_value = "eval_loss")]
    pub sort: String,
    /// Print JSON (one object per run).
    #[arg(long, conflicts_with = "csv")]
    pub json: bool,
    /// Print CSV.
    #[arg(long)]
    pub csv: bool,
}

pub fn run(a: RunsArgs) -> Result<()> {
    let runs = find_runs(&a.dirs)?;
    let mut rows = table(&runs)?;
    sort(&mut rows, &a.sort)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if a.csv {
        print!("{}", render_csv(&rows)?);
    } else {
        print!("{}", render_text(&rows));
    }
    Ok(())
}
