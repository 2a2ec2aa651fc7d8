//! Resolving `base_model`: a local Hugging Face folder, a `.gguf` file, a Hub repo id downloaded into the
//! standard Hugging Face cache, or `ollama://NAME[:TAG]`, a model in the local Ollama store ([`ollama`]).
//!
//! Environment (read by [`HubOptions::from_env`], the same variables as `huggingface_hub`):
//! - `HF_HUB_CACHE` (or the legacy `HUGGINGFACE_HUB_CACHE`), else `HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else
//!   `~/.cache/huggingface/hub`: the cache (shared with Python: same `models--org--name/{blobs,refs,snapshots}`
//!   layout);
//! - `HF_TOKEN` (or the legacy `HUGGING_FACE_HUB_TOKEN`), else the token file (`HF_TOKEN_PATH`, else
//!   `HF_HOME/token`) written by `huggingface-cli login`;
//! - `HF_HUB_OFFLINE=1`: never touch the network, resolve from the cache only;
//! - `HF_ENDPOINT`: another hub (a mirror, or the loopback fake hub in the tests);
//! - `OLLAMA_MODELS` (else `~/.ollama/models`, else `/usr/share/ollama/.ollama/models`): the Ollama store that
//!   `ollama://` names are looked up in, with loratune's own notes on it under `$XDG_CACHE_HOME/loratune/ollama`
//!   (else `~/.cache/loratune/ollama`) ([`ollama::OllamaOptions`]).
//!
//! Only the files needed to train are downloaded: `config.json`, `generation_config.json`, the tokenizer files,
//! `chat_template.jinja`, and `model.safetensors` or `model.safetensors.index.json` plus the shards it lists.
//! Like `huggingface_hub.snapshot_download`, the revision is first resolved to a commit sha and every file is
//! fetched at that sha, so a branch that moves during the download cannot mix two commits.
//!
//! The requests are loratune's own (`http.rs`: plain `ureq`, the same few requests hf-hub 0.5 and huggingface_hub
//! make) so that the token goes nowhere but the configured endpoint: a redirect to another host (the Hub's CDN)
//! is followed without `Authorization`, as huggingface_hub does — hf-hub 0.5 re-sends it there. Malformed answers
//! (a redirect without `Location`, bad JSON, a cut or over-long body, a hostile ETag) are errors, never panics or
//! files outside the cache, and every message passes through [`redact`] (no token, no `user:password@`).
//! The cache layout is huggingface_hub's (`cache.rs`), so caches are shared with Python both ways.

mod cache;
mod http;
pub mod ollama;

pub use http::redact;

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use cache::{is_commit_id, is_repo_path, RepoCache};
use http::{Answer, Client, FetchError};
use ollama::{OllamaModel, OllamaName, OllamaOptions};

/// Default Hub endpoint.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// Small files fetched when the repo has them (besides `config.json`, which is required).
pub const METADATA_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// What `base_model` names, decided without network access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseModelRef {
    /// A local Hugging Face model folder.
    LocalDir(PathBuf),
    /// A local GGUF file.
    Gguf(PathBuf),
    /// A Hub repo id (`org/name`, or a legacy single `name`).
    Hub {
        /// The repo id.
        repo_id: String,
    },
    /// `ollama://NAME[:TAG]`: a model in the local Ollama store.
    Ollama(OllamaName),
}

/// Whether `s` is a syntactically valid Hub repo id (`name` or `org/name`; letters, digits, `-`, `_`, `.`).
pub fn is_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    if parts.is_empty() || parts.len() > 2 {
        return false;
    }
    parts.iter().all(|p| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with('.')
            && !p.contains("--")
            && !p.contains("..")
    })
}

impl BaseModelRef {
    /// Decide what `base_model` is. A path that exists is local; a `.gguf` name must exist; anything else
    /// must look like a repo id; `ollama://…` must be a valid Ollama name (the store is not read here). With
    /// `check_files` off, a missing local-looking path is still accepted as local (for checking configs on
    /// machines without the model). The error is a complete sentence.
    pub fn classify(
        base_model: &str,
        base_dir: Option<&Path>,
        check_files: bool,
    ) -> std::result::Result<Self, String> {
        let raw = base_model.trim();
        if ollama::strip_scheme(raw).is_some() {
            return OllamaName::parse(raw).map(BaseModelRef::Ollama);
        }
        let path = match base_dir {
            Some(b) if Path::new(raw).is_relative() => b.join(raw),
            _ => PathBuf::from(raw),
        };
        let is_gguf = raw.to_ascii_lowercase().ends_with(".gguf");
        if is_gguf {
            if path.is_file() || !check_files {
                return Ok(BaseModelRef::Gguf(path));
            }
            return Err(format!(
                "GGUF file `{}` not found (for the quickstart model run scripts/fetch-smollm2.sh first)",
                path.display()
            ));
        }
        if path.is_dir() {
            return Ok(BaseModelRef::LocalDir(path));
        }
        if path.is_file() {
            return Err(format!(
                "`{}` is a file, but base_model must be a model folder (config.json + safetensors), a .gguf file or a Hub repo id",
                path.display()
            ));
        }
        let local_looking =
            raw.starts_with(['.', '/', '~']) || raw.contains('\\') || raw.split('/').count() > 2;
        if !local_looking && is_repo_id(raw) {
            return Ok(BaseModelRef::Hub {
                repo_id: raw.to_string(),
            });
        }
        if !check_files {
            return Ok(BaseModelRef::LocalDir(path));
        }
        Err(format!(
            "model folder `{}` not found, and `{raw}` is not a Hub repo id (org/name)",
            path.display()
        ))
    }
}

/// How to reach the Hub and where the caches are (and where the Ollama store is). `Debug` shows neither the
/// token nor endpoint credentials.
#[derive(Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// Base URL, without a trailing slash.
    pub endpoint: String,
    /// The hub cache folder (the one holding `models--org--name`).
    pub cache_dir: PathBuf,
    /// Access token sent as `Authorization: Bearer …`.
    pub token: Option<String>,
    /// Resolve from the cache only (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Draw download progress bars (on stderr).
    pub progress: bool,
    /// Where `ollama://` models are looked up.
    pub ollama: OllamaOptions,
}

impl std::fmt::Debug for HubOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubOptions")
            .field("endpoint", &redact(&self.endpoint, self.token.as_deref()))
            .field("cache_dir", &self.cache_dir)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("offline", &self.offline)
            .field("progress", &self.progress)
            .field("ollama", &self.ollama)
            .finish()
    }
}

fn truthy(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_uppercase().as_str(),
        "1" | "ON" | "YES" | "TRUE"
    )
}

impl HubOptions {
    /// Options from the process environment (see the module docs).
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Options from any variable lookup (testable without touching the process environment); the Ollama part
    /// as [`OllamaOptions::from_lookup`].
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let ollama = OllamaOptions::from_lookup(&get);
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let home_cache = || -> Result<PathBuf> {
            if let Some(x) = get("XDG_CACHE_HOME") {
                return Ok(PathBuf::from(x).join("huggingface"));
            }
            match get("HOME").or_else(|| get("USERPROFILE")) {
                Some(h) => Ok(PathBuf::from(h).join(".cache").join("huggingface")),
                None => Err(Error::Hub(
                    "cannot find the Hugging Face cache: HOME is not set; set HF_HOME or HF_HUB_CACHE".into(),
                )),
            }
        };
        let hf_home = match get("HF_HOME") {
            Some(h) => PathBuf::from(h),
            None => home_cache()?,
        };
        let cache_dir = match get("HF_HUB_CACHE").or_else(|| get("HUGGINGFACE_HUB_CACHE")) {
            Some(c) => PathBuf::from(c),
            None => hf_home.join("hub"),
        };
        let token = get("HF_TOKEN")
            .or_else(|| get("HUGGING_FACE_HUB_TOKEN"))
            .or_else(|| {
                let file = get("HF_TOKEN_PATH")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(file)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            });
        let endpoint = get("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim()
            .trim_end_matches('/')
            .to_string();
        Ok(HubOptions {
            endpoint,
            cache_dir,
            token: token.map(|t| t.trim().to_string()),
            offline: get("HF_HUB_OFFLINE").is_some_and(|v| truthy(&v)),
            progress: false,
            ollama,
        })
    }
}

/// The files of a Hugging Face model folder that loratune uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelFiles {
    /// The folder (for a Hub model: `…/snapshots/<sha>`).
    pub dir: PathBuf,
    /// `config.json`.
    pub config: PathBuf,
    /// `generation_config.json`, if present.
    pub generation_config: Option<PathBuf>,
    /// `tokenizer.json`, if present.
    pub tokenizer: Option<PathBuf>,
    /// `tokenizer_config.json`, if present.
    pub tokenizer_config: Option<PathBuf>,
    /// `special_tokens_map.json`, if present.
    pub special_tokens_map: Option<PathBuf>,
    /// `chat_template.jinja`, if present.
    pub chat_template: Option<PathBuf>,
    /// `model.safetensors.index.json`, for sharded weights.
    pub weights_index: Option<PathBuf>,
    /// The safetensors files (one, or the shards in index order).
    pub weights: Vec<PathBuf>,
    /// The Hub commit sha the files come from (Hub models only).
    pub commit: Option<String>,
}

/// A resolved `base_model`.
#[allow(clippy::large_enum_variant)] // built once per run
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolvedModel {
    /// A Hugging Face folder (local, or a Hub snapshot in the cache).
    Folder(ModelFiles),
    /// A GGUF file.
    Gguf(PathBuf),
    /// A model in the Ollama store (its GGUF is [`OllamaModel::gguf`]).
    Ollama(OllamaModel),
}

impl ResolvedModel {
    /// The local path the model loaders open: the folder, or the GGUF file.
    pub fn path(&self) -> &Path {
        match self {
            ResolvedModel::Folder(f) => &f.dir,
            ResolvedModel::Gguf(p) => p,
            ResolvedModel::Ollama(m) => &m.blob,
        }
    }
}

/// A command's `--model MODEL`: a local folder or `.gguf` file as given (the loaders report a missing one), or
/// `ollama://NAME[:TAG]` resolved in the Ollama store to its verified GGUF (returned too, for what the store says
/// about it).
pub fn resolve_model_arg(
    model: &Path,
    opts: &OllamaOptions,
) -> Result<(PathBuf, Option<OllamaModel>)> {
    let Some(s) = model.to_str().filter(|s| ollama::strip_scheme(s).is_some()) else {
        return Ok((model.to_path_buf(), None));
    };
    let name = OllamaName::parse(s).map_err(Error::Hub)?;
    let m = ollama::resolve(&name, opts)?;
    Ok((m.blob.clone(), Some(m)))
}

/// Resolve `base_model` (+ revision for Hub ids) to local files, downloading when needed.
pub fn resolve_base_model(
    base_model: &str,
    revision: Option<&str>,
    opts: &HubOptions,
) -> Result<ResolvedModel> {
    resolve_base_model_in(base_model, revision, None, opts)
}

/// [`resolve_base_model`] with relative paths resolved against `base_dir`.
pub fn resolve_base_model_in(
    base_model: &str,
    revision: Option<&str>,
    base_dir: Option<&Path>,
    opts: &HubOptions,
) -> Result<ResolvedModel> {
    match BaseModelRef::classify(base_model, base_dir, true)
        .map_err(|m| Error::Hub(format!("base_model: {m}")))?
    {
        BaseModelRef::Gguf(p) => Ok(ResolvedModel::Gguf(p)),
        BaseModelRef::LocalDir(d) => Ok(ResolvedModel::Folder(inspect_folder(&d, None)?)),
        BaseModelRef::Hub { repo_id } => Ok(ResolvedModel::Folder(fetch_model(
            &repo_id,
            revision.unwrap_or("main"),
            opts,
        )?)),
        BaseModelRef::Ollama(name) => {
            Ok(ResolvedModel::Ollama(ollama::resolve(&name, &opts.ollama)?))
        }
    }
}

fn opt_file(dir: &Path, name: &str) -> Option<PathBuf> {
    let p = dir.join(name);
    p.is_file().then_some(p)
}

/// Weight-file names that are pickles (unsupported: loading them can run code).
fn is_pickle(name: &str) -> bool {
    let n = name.to_ascii_lowercase();
    [".bin", ".pt", ".pth", ".ckpt", ".pkl"]
        .iter()
        .any(|e| n.ends_with(e))
        && !n.ends_with("training_args.bin")
        && !n.contains("optimizer")
}

/// Shard file names listed in a `model.safetensors.index.json`, in first-appearance order.
pub fn index_shards(index_path: &Path) -> Result<Vec<String>> {
    let bytes = crate::error::read_file(index_path)?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: index_path.to_path_buf(),
        source: e,
    })?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::Weights(format!(
            "{}: no `weight_map` object",
            index_path.display()
        )));
    };
    let mut shards: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let Some(f) = file.as_str() else {
            return Err(Error::Weights(format!(
                "{}: weight_map entry `{tensor}` is not a file name",
                index_path.display()
            )));
        };
        if f.contains("..") || f.starts_with('/') {
            return Err(Error::Weights(format!(
                "{}: weight_map entry `{tensor}` points outside the folder (`{f}`)",
                index_path.display()
            )));
        }
        if !shards.iter().any(|s| s == f) {
            shards.push(f.to_string());
        }
    }
    if shards.is_empty() {
        return Err(Error::Weights(format!(
            "{}: `weight_map` is empty",
            index_path.display()
        )));
    }
    Ok(shards)
}

/// Check a local folder (or cached snapshot) and list its files. `what` names it in errors (a repo id).
pub fn inspect_folder(dir: &Path, what: Option<&str>) -> Result<ModelFiles> {
    let name = what
        .map(str::to_string)
        .unwrap_or_else(|| dir.display().to_string());
    let config = dir.join("config.json");
    if !config.is_file() {
        if dir.join("adapter_config.json").is_file() {
            return Err(Error::Hub(format!(
                "`{name}` is a LoRA adapter, not a base model: set base_model to the model named in its adapter_config.json (base_model_name_or_path)"
            )));
        }
        return Err(Error::Hub(format!(
            "`{name}` has no config.json: not a Hugging Face model folder (base_model may also be a .gguf file)"
        )));
    }
    let (weights_index, weights) = if let Some(single) = opt_file(dir, "model.safetensors") {
        (None, vec![single])
    } else if let Some(index) = opt_file(dir, "model.safetensors.index.json") {
        let shards = index_shards(&index)?;
        let mut files = Vec::new();
        for s in shards {
            let p = dir.join(&s);
            if !p.is_file() {
                return Err(Error::Hub(format!(
                    "`{name}`: shard `{s}` listed in model.safetensors.index.json is missing"
                )));
            }
            files.push(p);
        }
        (Some(index), files)
    } else {
        let pickles: Vec<String> = std::fs::read_dir(dir)
            .map_err(|e| Error::io(dir, e))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| is_pickle(n))
            .collect();
        return Err(no_safetensors(&name, &pickles));
    };
    Ok(ModelFiles {
        dir: dir.to_path_buf(),
        config,
        generation_config: opt_file(dir, "generation_config.json"),
        tokenizer: opt_file(dir, "tokenizer.json"),
        tokenizer_config: opt_file(dir, "tokenizer_config.json"),
        special_tokens_map: opt_file(dir, "special_tokens_map.json"),
        chat_template: opt_file(dir, "chat_template.jinja"),
        weights_index,
        weights,
        commit: None,
    })
}

fn no_safetensors(name: &str, pickles: &[String]) -> Error {
    if pickles.is_empty() {
        Error::Hub(format!(
            "`{name}` has no safetensors weights (model.safetensors or model.safetensors.index.json)"
        ))
    } else {
        Error::Hub(format!(
            "`{name}` only has PyTorch pickle weights ({}), which loratune does not load (unpickling can run arbitrary code); \
             use a revision or copy of the model with safetensors weights (e.g. convert with transformers: \
             `AutoModelForCausalLM.from_pretrained(...).save_pretrained(dir, safe_serialization=True)`)",
            pickles.join(", ")
        ))
    }
}

/// Whether `s` can be a revision (branch, tag, `refs/pr/N`, or commit sha): path-like segments, none empty,
/// `.` or `..`, no blanks (it becomes `refs/<revision>` in the cache).
fn is_revision(s: &str) -> bool {
    is_repo_path(s) && s.len() <= 255 && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The snapshot folder for `repo_id@revision` in the cache, if the revision is known there.
pub fn cached_snapshot(
    cache_dir: &Path,
    repo_id: &str,
    revision: &str,
) -> Option<(String, PathBuf)> {
    if !is_repo_id(repo_id) || !is_revision(revision) {
        return None;
    }
    let repo_dir = RepoCache::new(cache_dir, repo_id).dir();
    if is_commit_id(revision) {
        let snap = repo_dir.join("snapshots").join(revision);
        if snap.is_dir() {
            return Some((revision.to_string(), snap));
        }
    }
    let mut ref_file = repo_dir.join("refs");
    ref_file.extend(revision.split('/'));
    let sha = std::fs::read_to_string(ref_file).ok()?;
    let sha = sha.trim().to_string();
    if !is_commit_id(&sha) {
        return None;
    }
    let snap = repo_dir.join("snapshots").join(&sha);
    snap.is_dir().then_some((sha, snap))
}

fn resolve_offline(
    repo_id: &str,
    revision: &str,
    opts: &HubOptions,
    why: &str,
) -> Result<ModelFiles> {
    let Some((sha, snap)) = cached_snapshot(&opts.cache_dir, repo_id, revision) else {
        return Err(Error::Hub(format!(
            "{why}, and `{repo_id}` (revision `{revision}`) is not in the Hugging Face cache at {}. \
             Unset HF_HUB_OFFLINE and run with network access to download it, or point HF_HOME / HF_HUB_CACHE at a cache that has it",
            opts.cache_dir.display()
        )));
    };
    let mut files = inspect_folder(&snap, Some(&format!("{repo_id}@{revision} (cached)"))).map_err(|e| {
        Error::Hub(format!(
            "{e}. The cached copy is incomplete; {why}: unset HF_HUB_OFFLINE to download the missing files"
        ))
    })?;
    files.commit = Some(sha);
    Ok(files)
}

/// The answer to `GET /api/models/{repo}/revision/{rev}` (the fields loratune reads).
#[derive(serde::Deserialize)]
struct RepoInfo {
    sha: String,
    siblings: Vec<Sibling>,
}

#[derive(serde::Deserialize)]
struct Sibling {
    rfilename: String,
}

/// Download (or find in the cache) `repo_id` at `revision` and return its files. Every error message passes
/// through [`redact`].
pub fn fetch_model(repo_id: &str, revision: &str, opts: &HubOptions) -> Result<ModelFiles> {
    fetch(repo_id, revision, opts).map_err(|e| match e {
        Error::Hub(m) => Error::Hub(redact(&m, opts.token.as_deref())),
        other => other,
    })
}

fn fetch(repo_id: &str, revision: &str, opts: &HubOptions) -> Result<ModelFiles> {
    if !is_repo_id(repo_id) {
        return Err(Error::Hub(format!(
            "`{repo_id}` is not a Hub repo id (org/name)"
        )));
    }
    if !is_revision(revision) {
        return Err(Error::Hub(format!(
            "`{revision}` is not a valid revision for `{repo_id}` (base_model_revision: a branch, tag or commit sha)"
        )));
    }
    if opts.offline {
        return resolve_offline(repo_id, revision, opts, "HF_HUB_OFFLINE is set");
    }
    let client = Client::new(&opts.endpoint, opts.token.as_deref()).map_err(Error::Hub)?;
    let ctx = Ctx {
        repo_id,
        revision,
        opts,
        endpoint: redact(&opts.endpoint, opts.token.as_deref()),
    };

    let info_url = format!(
        "{}/api/models/{repo_id}/revision/{}",
        opts.endpoint,
        http::encode_path(revision, false)
    );
    let info = client
        .get(&info_url, &[])
        .and_then(Answer::success)
        .and_then(Answer::text)
        .and_then(|text| {
            serde_json::from_str::<RepoInfo>(&text).map_err(|e| {
                FetchError::Malformed(format!("the Hub's answer is not the expected JSON ({e})"))
            })
        });
    let info = match info {
        Ok(i) => i,
        Err(FetchError::Network(net)) => {
            // Like huggingface_hub: without a connection, fall back to a cached copy of this revision.
            return resolve_offline(
                repo_id,
                revision,
                opts,
                &format!(
                    "cannot reach {} ({net}; set HF_HUB_OFFLINE=1 to use the cache only)",
                    ctx.endpoint
                ),
            );
        }
        Err(e) => return Err(ctx.describe(e, None)),
    };
    let sha = info.sha.trim().to_string();
    if sha.is_empty() {
        return Err(Error::Hub(format!(
            "{}: the Hub returned no commit for `{repo_id}` at `{revision}`",
            ctx.endpoint
        )));
    }
    if !is_commit_id(&sha) {
        return Err(ctx.describe(
            FetchError::Malformed(format!(
                "the Hub returned an invalid commit id `{}`",
                http::shorten(&sha, 80)
            )),
            None,
        ));
    }
    let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let has = |n: &str| names.contains(&n);

    if !has("config.json") {
        if has("adapter_config.json") {
            return Err(Error::Hub(format!(
                "`{repo_id}` is a LoRA adapter repo, not a base model: set base_model to the model named in its adapter_config.json (base_model_name_or_path)"
            )));
        }
        let ggufs: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| n.to_ascii_lowercase().ends_with(".gguf"))
            .collect();
        if !ggufs.is_empty() {
            return Err(Error::Hub(format!(
                "`{repo_id}` holds GGUF files ({}), not a Hugging Face model folder: download one of them and set base_model to the .gguf path",
                ggufs.join(", ")
            )));
        }
        return Err(Error::Hub(format!(
            "`{repo_id}` (revision `{revision}`) has no config.json: not a transformers model repo"
        )));
    }

    // Everything is fetched at the resolved sha (a moving branch cannot mix commits).
    let repo_cache = RepoCache::new(&opts.cache_dir, repo_id);
    let get = |file: &str| -> Result<PathBuf> {
        let url = format!(
            "{}/{repo_id}/resolve/{sha}/{}",
            opts.endpoint,
            http::encode_path(file, true)
        );
        cache::fetch_file(&client, &url, &repo_cache, &sha, file, opts.progress)
            .map_err(|e| ctx.describe(e, Some(file)))
    };

    // Decide on the weights from the file list before transferring anything.
    let sharded = if has("model.safetensors") {
        false
    } else if has("model.safetensors.index.json") {
        true
    } else {
        let pickles: Vec<String> = names
            .iter()
            .filter(|n| is_pickle(n))
            .map(|n| n.to_string())
            .collect();
        return Err(no_safetensors(&format!("{repo_id}@{revision}"), &pickles));
    };

    let config = get("config.json")?;
    let mut optional = Vec::new();
    for f in METADATA_FILES {
        optional.push(if has(f) { Some(get(f)?) } else { None });
    }
    let (weights_index, weights) = if !sharded {
        (None, vec![get("model.safetensors")?])
    } else {
        let index = get("model.safetensors.index.json")?;
        let shards = index_shards(&index)?;
        if let Some(s) = shards.iter().find(|s| !has(s)) {
            return Err(Error::Hub(format!(
                "`{repo_id}` (revision `{revision}`): shard `{s}` listed in model.safetensors.index.json is not in the repo"
            )));
        }
        let mut files = Vec::new();
        for s in &shards {
            files.push(get(s)?);
        }
        (Some(index), files)
    };

    // Record the branch/tag → sha mapping so offline runs find this snapshot by the name the config uses.
    if revision != sha {
        repo_cache
            .write_ref(revision, &sha)
            .map_err(|e| ctx.describe(e, None))?;
    }

    let dir = config.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut it = optional.into_iter();
    let mut next = || it.next().flatten();
    Ok(ModelFiles {
        dir,
        config,
        generation_config: next(),
        tokenizer: next(),
        tokenizer_config: next(),
        special_tokens_map: next(),
        chat_template: next(),
        weights_index,
        weights,
        commit: Some(sha),
    })
}

struct Ctx<'a> {
    repo_id: &'a str,
    revision: &'a str,
    opts: &'a HubOptions,
    /// The endpoint as messages show it ([`redact`]ed).
    endpoint: String,
}

impl Ctx<'_> {
    /// `e` as a sentence that says what was being done, for whom, and what to do about it (redacted).
    fn describe(&self, e: FetchError, file: Option<&str>) -> Error {
        let (repo, rev, endpoint) = (self.repo_id, self.revision, &self.endpoint);
        let page = format!("{endpoint}/{repo}");
        let what = match file {
            Some(f) => format!("downloading `{f}` of `{repo}` (revision `{rev}`)"),
            None => format!("looking up `{repo}` (revision `{rev}`) on {endpoint}"),
        };
        let msg = match e {
            // An error from the host a redirect led to (a CDN) is not about the repo's access rules.
            e @ FetchError::Status {
                elsewhere: Some(_), ..
            } => format!("{what}: {e}"),
            FetchError::Status {
                code,
                server_message,
                elsewhere: None,
            } => match code {
                401 => {
                    let tok = if self.opts.token.is_some() {
                        "the token in HF_TOKEN (or the token file) was rejected or has no access"
                    } else {
                        "no token was sent"
                    };
                    format!(
                        "{what}: access denied (HTTP 401; {tok}). The model is gated or private, or the repo id is misspelled. \
                         For a gated model, accept its licence on {page} while logged in, create a read token at \
                         https://huggingface.co/settings/tokens and set HF_TOKEN to it"
                    )
                }
                403 => format!(
                    "{what}: forbidden (HTTP 403): your token has no access to this gated model. Accept the licence on {page} \
                     with the account the token belongs to (fine-grained tokens also need \"read access to public gated repos\"), \
                     then retry with HF_TOKEN set"
                ),
                404 => match file {
                    Some(f) => format!("{what}: `{f}` not found (HTTP 404) at that revision"),
                    None => format!(
                        "{what}: not found (HTTP 404): check the repo id `{repo}` and the revision `{rev}` (base_model / base_model_revision)"
                    ),
                },
                429 => format!("{what}: rate limited by the Hub (HTTP 429); wait and retry, or set HF_TOKEN"),
                _ => format!(
                    "{what}: {}",
                    FetchError::Status {
                        code,
                        server_message,
                        elsewhere: None,
                    }
                ),
            },
            FetchError::Network(net) => format!(
                "{what}: cannot reach {endpoint} ({net}). Check the network/HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use a cached copy"
            ),
            other => format!("{what}: {other}"),
        };
        Error::Hub(redact(&msg, self.opts.token.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        assert!(is_repo_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(is_repo_id("gpt2"));
        assert!(is_repo_id("Qwen/Qwen2.5-0.5B-Instruct"));
        assert!(!is_repo_id("a/b/c"));
        assert!(!is_repo_id("./models/x"));
        assert!(!is_repo_id("org/"));
        assert!(!is_repo_id("org/na me"));
        assert!(!is_repo_id("org/a--b"));
    }

    #[test]
    fn classify_paths_and_ids() {
        let t = tempfile::tempdir().unwrap();
        let g = t.path().join("m.gguf");
        std::fs::write(&g, b"GGUF").unwrap();
        assert_eq!(
            BaseModelRef::classify("m.gguf", Some(t.path()), true),
            Ok(BaseModelRef::Gguf(g))
        );
        assert_eq!(
            BaseModelRef::classify(".", Some(t.path()), true),
            Ok(BaseModelRef::LocalDir(t.path().join(".")))
        );
        assert_eq!(
            BaseModelRef::classify("org/name", Some(t.path()), true),
            Ok(BaseModelRef::Hub {
                repo_id: "org/name".into()
            })
        );
        let e = BaseModelRef::classify("missing.gguf", Some(t.path()), true).unwrap_err();
        assert!(e.contains("missing.gguf") && e.contains("not found"), "{e}");
        let e = BaseModelRef::classify("./models/nope", Some(t.path()), true).unwrap_err();
        assert!(
            e.contains("not found") && e.contains("not a Hub repo id"),
            "{e}"
        );
        assert!(BaseModelRef::classify("missing.gguf", None, false).is_ok());
        // Ollama names are parsed, never looked up here (with or without check_files).
        for check in [true, false] {
            assert_eq!(
                BaseModelRef::classify(" ollama://llama3.2:1b ", None, check),
                Ok(BaseModelRef::Ollama(
                    OllamaName::parse("llama3.2:1b").unwrap()
                ))
            );
            let e = BaseModelRef::classify("ollama://bad name", None, check).unwrap_err();
            assert!(e.contains("not an Ollama model name"), "{e}");
        }
    }

    #[test]
    fn env_lookup() {
        let t = tempfile::tempdir().unwrap();
        let home = t.path().join("hfhome");
        std::fs::create_dir_all(&home).unwrap();
        std::fs::write(home.join("token"), "file-token\n").unwrap();
        let env = |pairs: &'static [(&'static str, &'static str)], home: PathBuf| {
            move |k: &str| {
                if k == "HF_HOME" {
                    return Some(home.to_string_lossy().to_string());
                }
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let o = HubOptions::from_lookup(env(&[], home.clone())).unwrap();
        assert_eq!(o.cache_dir, home.join("hub"));
        assert_eq!(o.token.as_deref(), Some("file-token"));
        assert_eq!(o.endpoint, DEFAULT_ENDPOINT);
        assert!(!o.offline);
        let o = HubOptions::from_lookup(env(
            &[
                ("HF_TOKEN", "env-token"),
                ("HF_HUB_OFFLINE", "1"),
                ("HF_ENDPOINT", "http://127.0.0.1:9/"),
                ("HF_HUB_CACHE", "/x/cache"),
            ],
            home.clone(),
        ))
        .unwrap();
        assert_eq!(o.token.as_deref(), Some("env-token"));
        assert!(o.offline);
        assert_eq!(o.endpoint, "http://127.0.0.1:9");
        assert_eq!(o.cache_dir, PathBuf::from("/x/cache"));
        let o = HubOptions::from_lookup(env(&[("HF_HUB_OFFLINE", "0")], home.clone())).unwrap();
        assert!(!o.offline);
        let o = HubOptions::from_lookup(|k| match k {
            "HOME" => Some("/home/u".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
        assert!(HubOptions::from_lookup(|_| None).is_err());
    }
}
