//! The `loratune` command line. Each subcommand lives in its own file and calls into the library.

use clap::{Parser, Subcommand};

mod bench;
mod data;
mod export;
mod generate;
mod inspect;
mod merge;
mod report;
mod runs;
mod sweep;
mod train;

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
    /// Complete a prompt (raw or with the chat template), streaming tokens; greedy or sampled.
    Generate(generate::GenerateArgs),
    /// Merge a PEFT adapter into its base model and write a Hugging Face folder.
    Merge(merge::MergeArgs),
    /// Convert a GGUF model into a standard Hugging Face folder (config, safetensors, tokenizer, template).
    Convert(merge::ConvertArgs),
    /// Fine-tune with LoRA as a YAML config says (Axolotl key names); resumes, evaluates, exports.
    Train(train::TrainArgs),
    /// Eval loss and perplexity of a run's adapter (or the base model) on the config's eval set.
    Eval(train::EvalArgs),
    /// Time the training step (forward, backward, AdamW) and report tokens/s, MFU and peak RSS.
    Bench(bench::BenchArgs),
    /// Preview rendered training samples with their trained tokens marked, or print dataset statistics.
    Data(data::DataArgs),
    /// Export for llama.cpp / Ollama: a merged GGUF, a GGUF LoRA adapter, or an Ollama folder with a Modelfile.
    Export(export::ExportArgs),
    /// Compare runs: the config keys that differ, losses, perplexity, tokens/s and status (text, --json, --csv).
    Runs(runs::RunsArgs),
    /// Write one self-contained HTML page of a run or sweep: curves, the runs table, answers before/after.
    Report(report::ReportArgs),
    /// Run the trials of the config's `sweep:` block (grid, random or successive halving); resumable.
    Sweep(sweep::SweepArgs),
    /// Serve burn-collective's orchestrator for multi-node training (nodes set `coordinator: this-host:PORT` and
    /// `host_coordinator: false`); runs until Ctrl-C.
    Coordinator(CoordinatorArgs),
}

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// Port to listen on (every interface); the nodes' data services use the next ports (PORT + 1 + node_rank).
    #[arg(long, default_value_t = 29500)]
    pub port: u16,
}

/// Entry point used by the binary.
pub fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect(a) => inspect::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Merge(a) => merge::run_merge(a),
        Command::Convert(a) => merge::run_convert(a),
        Command::Bench(a) => bench::run(a),
        Command::Runs(a) => runs::run(a),
        Command::Sweep(a) => sweep::run(a),
        Command::Report(a) => report::run(a),
        Command::Train(a) => train::run_train(a),
        Command::Eval(a) => train::run_eval(a),
        Command::Data(a) => data::run(a),
        Command::Export(a) => export::run(a),
        Command::Coordinator(a) => {
            std::net::TcpListener::bind(("0.0.0.0", a.port))
                .map(drop)
                .map_err(|e| anyhow::anyhow!("port {}: {e}; pick another with --port", a.port))?;
            crate::train::parallel::quiet_collective_logs();
            eprintln!(
                "loratune coordinator: burn-collective orchestrator on port {} (Ctrl-C stops it)",
                a.port
            );
            crate::train::parallel::serve_coordinator(a.port);
            Ok(())
        }
    }
}
