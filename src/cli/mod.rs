//! The `loratune` command line. Each subcommand lives in its own file and calls into the library.

use clap::{Parser, Subcommand};

mod data;
mod inspect;

/// LoRA fine-tuning for open-weight LLMs: one YAML file in, a PEFT adapter / merged model / GGUF out.
#[derive(Parser, Debug)]
#[command(name = "loratune", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show a model's architecture, sizes, dtypes and the linear modules LoRA can target.
    Inspect(inspect::InspectArgs),
    /// Preview rendered training samples with their trained tokens marked, or print dataset statistics.
    Data(data::DataArgs),
}

/// Entry point used by the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Data(a) => data::run(a),
    }
}
