//! The library's error type. Every variant carries enough context (file, key, tensor name, shapes)
//! for the user to find and fix the problem without reading our source.

use std::path::PathBuf;

/// Result alias used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Errors raised by loratune's library code. The CLI wraps them with `anyhow` and prints the chain.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A JSON document (config.json, adapter_config.json, a dataset line, ...) could not be parsed.
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A training config (YAML) with problems: every one, each with its line and column.
    #[error(transparent)]
    ConfigFile(#[from] crate::config::ConfigErrors),
    /// A model configuration problem (missing key, bad value) or a config value that does not fit the model.
    #[error("{0}")]
    Config(String),
    /// A model whose architecture loratune does not run.
    #[error("{}unsupported {what} `{name}`; supported: {supported}", origin.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    UnsupportedArchitecture {
        /// `architecture`, `model_type` or `GGUF architecture`.
        what: &'static str,
        name: String,
        /// The file that names it.
        origin: Option<PathBuf>,
        supported: String,
    },
    /// A weights-file problem (missing / unexpected / mis-shaped tensor, corrupt file).
    #[error("{0}")]
    Weights(String),
    /// A GGUF-file problem.
    #[error("{0}")]
    Gguf(String),
    /// A tokenizer or chat-template problem.
    #[error("{0}")]
    Tokenizer(String),
    /// A dataset problem (file, row, field).
    #[error("{0}")]
    Data(String),
    /// A LoRA / adapter problem.
    #[error("{0}")]
    Lora(String),
    /// A training-loop problem (an empty stream, a bad checkpoint, ...).
    #[error("{0}")]
    Train(String),
    /// The loss or the gradient norm of a step is NaN or infinite; nothing was applied.
    #[error(
        "step {step}: the {what} is {value} — training stopped before applying it. Lower learning_rate, enable \
         max_grad_norm, check the data for extreme lengths, or use f32 instead of bf16.{}",
        match last_checkpoint {
            Some(d) => format!(" The last good checkpoint is {}.", d.display()),
            None => " No checkpoint was written yet.".to_string(),
        }
    )]
    NonFinite {
        /// 1-based optimizer step.
        step: u64,
        /// `loss` or `gradient norm`.
        what: &'static str,
        value: f64,
        last_checkpoint: Option<PathBuf>,
    },
    /// A checkpoint written by a run with other settings than the config resuming it.
    #[error(
        "{}: written by a run with a different configuration (hash {found} ≠ {expected}); resume with the same config, or use a new output_dir",
        checkpoint.display()
    )]
    CheckpointMismatch {
        checkpoint: PathBuf,
        found: String,
        expected: String,
    },
    /// Another process holds the run folder's lock (two runs writing one folder would interleave their metrics,
    /// checkpoints and config).
    #[error(
        "{}: in use by another loratune process{} — wait for it to finish, stop it, or set another output_dir",
        dir.display(),
        match pid { Some(p) => format!(" (pid {p})"), None => String::new() }
    )]
    RunFolderBusy { dir: PathBuf, pid: Option<u32> },
    /// An export problem.
    #[error("{0}")]
    Export(String),
    /// A hub download problem.
    #[error("{0}")]
    Hub(String),
    /// Serialising a document (JSON, YAML) failed; `what` names it.
    #[error("cannot serialise {what}")]
    Serialize {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The tokenizers library refused to build or serialise a tokenizer part (`what` says which).
    #[error("{what}")]
    TokenizerBuild {
        what: String,
        #[source]
        source: tokenizers::Error,
    },
}

impl Error {
    /// Wrap an `std::io::Error` with the path it happened on.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Read a whole file, naming it in the error.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Read a whole UTF-8 file, naming it in the error.
pub fn read_to_string(path: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| Error::io(path, e))
}

thread_local! {
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Run third-party code that may panic on hostile input (the `tokenizers` crate's deserialisers `expect` on some
/// malformed files): a panic becomes `Err` with its message, and the panic hook stays quiet for it, so the user
/// sees one error naming the file instead of a crash report.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static QUIET_HOOK: std::sync::Once = std::sync::Once::new();
    QUIET_HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) {
                previous(info);
            }
        }));
    });
    let was = GUARDED.with(|g| g.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    GUARDED.with(|g| g.set(was));
    r.map_err(|payload| {
        payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown failure".to_string())
    })
}
