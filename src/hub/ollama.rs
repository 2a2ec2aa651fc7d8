//! `ollama://NAME[:TAG]`: a model in the local Ollama store as the base model.
//!
//! The store is `$OLLAMA_MODELS` when set, else `~/.ollama/models`, else the Linux service install's
//! `/usr/share/ollama/.ollama/models` ([`OllamaOptions::from_lookup`]). It holds OCI-style JSON manifests at
//! `manifests/<host>/<namespace>/<model>/<tag>` and content-addressed `blobs/sha256-<hex>`. Names are parsed as
//! Ollama parses them ([`OllamaName::parse`]): `llama3.2` is `registry.ollama.ai/library/llama3.2:latest`.
//!
//! [`resolve`] reads the manifest, takes its one `application/vnd.ollama.image.model` layer (a GGUF), checks the
//! blob's size and sha256 against the manifest — the hash is remembered in `verified.json` in loratune's cache,
//! keyed by the blob's path, size and mtime, so a multi-GB blob is hashed once — and returns the blob, which
//! every command then opens as any GGUF (the loaders know a GGUF by its magic, [`crate::gguf::is_gguf_file`]). The `template`, `params` and `system` layers are read too (and their digests checked): `inspect`
//! prints them, and `export --format ollama` writes a Modelfile `FROM NAME:TAG` + `ADAPTER` that keeps them.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The prefix of an Ollama `base_model` / `--model`.
pub const SCHEME: &str = "ollama://";
/// Ollama's default registry host.
pub const DEFAULT_HOST: &str = "registry.ollama.ai";
/// Ollama's default namespace.
pub const DEFAULT_NAMESPACE: &str = "library";
/// Ollama's default tag.
pub const DEFAULT_TAG: &str = "latest";

/// The weights (a GGUF file).
pub const MEDIA_MODEL: &str = "application/vnd.ollama.image.model";
/// The Go chat template.
pub const MEDIA_TEMPLATE: &str = "application/vnd.ollama.image.template";
/// The parameters (a JSON object: `stop`, `temperature`, ...).
pub const MEDIA_PARAMS: &str = "application/vnd.ollama.image.params";
/// The default system prompt.
pub const MEDIA_SYSTEM: &str = "application/vnd.ollama.image.system";
/// The licence text.
pub const MEDIA_LICENSE: &str = "application/vnd.ollama.image.license";
/// A LoRA adapter applied on top of the model (a model made with `ADAPTER`).
pub const MEDIA_ADAPTER: &str = "application/vnd.ollama.image.adapter";
/// A vision projector.
pub const MEDIA_PROJECTOR: &str = "application/vnd.ollama.image.projector";

/// Largest manifest read (real ones are under 2 KB).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Largest template / system / params layer read.
const MAX_TEXT_LAYER_BYTES: u64 = 4 << 20;
/// Models listed in an error message.
const MAX_LISTED: usize = 40;
/// Blobs at least this large get a "verifying" line on stderr while they are hashed.
const ANNOUNCE_HASH_BYTES: u64 = 256 << 20;

/// A parsed Ollama model name: `host/namespace/model:tag`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct OllamaName {
    /// Registry host (`registry.ollama.ai`).
    pub host: String,
    /// Namespace (`library`).
    pub namespace: String,
    /// Model (`llama3.2`).
    pub model: String,
    /// Tag (`latest`).
    pub tag: String,
}

fn valid_part(kind: &str, s: &str) -> bool {
    let max = if kind == "host" { 350 } else { 80 };
    if s.is_empty() || s.len() > max {
        return false;
    }
    s.bytes().enumerate().all(|(i, c)| {
        if c.is_ascii_alphanumeric() || c == b'_' {
            return true;
        }
        i > 0
            && match c {
                b'-' => true,
                b'.' => kind != "namespace",
                b':' => kind == "host",
                _ => false,
            }
    })
}

impl OllamaName {
    /// Parse `[host/][namespace/]model[:tag]`, with or without `ollama://`, filling Ollama's defaults
    /// (`registry.ollama.ai`, `library`, `latest`). Parts are letters, digits, `_`, `-` and `.` (not in a
    /// namespace), starting with a letter, digit or `_`; a host may also hold `:port`. The error is a sentence.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let raw = s.trim();
        let body = strip_scheme(raw).unwrap_or(raw);
        let bad = |why: &str| {
            Err(format!(
                "`{raw}` is not an Ollama model name ({why}); the form is ollama://NAME[:TAG], e.g. ollama://llama3.2:1b or ollama://namespace/name:tag"
            ))
        };
        if body.is_empty() {
            return bad("the name is empty");
        }
        if body.contains('@') {
            return bad("a digest (@sha256-…) cannot be given; name a tag");
        }
        let (rest, tag) = match (body.rfind(':'), body.rfind('/')) {
            (Some(c), slash) if slash.is_none_or(|s| c > s) => (&body[..c], &body[c + 1..]),
            _ => (body, DEFAULT_TAG),
        };
        let mut parts: Vec<&str> = rest.rsplitn(3, '/').collect();
        parts.reverse();
        let (host, namespace, model) = match parts.as_slice() {
            [m] => (DEFAULT_HOST, DEFAULT_NAMESPACE, *m),
            [n, m] => (DEFAULT_HOST, *n, *m),
            [h, n, m] => {
                let h = h
                    .strip_prefix("https://")
                    .or_else(|| h.strip_prefix("http://"))
                    .unwrap_or(h);
                (h, *n, *m)
            }
            _ => return bad("the name is empty"),
        };
        for (kind, v) in [
            ("host", host),
            ("namespace", namespace),
            ("model", model),
            ("tag", tag),
        ] {
            if !valid_part(kind, v) {
                return bad(&format!(
                    "invalid {kind} `{v}`: use letters, digits, `_`, `-`{}",
                    if kind == "namespace" { "" } else { " and `.`" }
                ));
            }
        }
        Ok(OllamaName {
            host: host.into(),
            namespace: namespace.into(),
            model: model.into(),
            tag: tag.into(),
        })
    }

    /// The name as Ollama shows it (`llama3.2:1b`, `ns/name:tag`, `host/ns/name:tag`): the default host and
    /// namespace left out, the tag always written. This is what a Modelfile's `FROM` names.
    pub fn short(&self) -> String {
        let default_host = self.host.eq_ignore_ascii_case(DEFAULT_HOST);
        if default_host && self.namespace.eq_ignore_ascii_case(DEFAULT_NAMESPACE) {
            format!("{}:{}", self.model, self.tag)
        } else if default_host {
            format!("{}/{}:{}", self.namespace, self.model, self.tag)
        } else {
            self.full()
        }
    }

    /// `host/namespace/model:tag`.
    pub fn full(&self) -> String {
        format!(
            "{}/{}/{}:{}",
            self.host, self.namespace, self.model, self.tag
        )
    }

    /// The manifest's path under a store's `manifests/` folder.
    fn manifest_rel(&self, lower: bool) -> PathBuf {
        let f = |s: &str| {
            if lower {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        [&self.host, &self.namespace, &self.model, &self.tag]
            .iter()
            .map(|s| f(s))
            .collect()
    }

    /// Same model (host, namespace, name), any tag; case-insensitive like Ollama.
    fn same_model(&self, o: &OllamaName) -> bool {
        self.host.eq_ignore_ascii_case(&o.host)
            && self.namespace.eq_ignore_ascii_case(&o.namespace)
            && self.model.eq_ignore_ascii_case(&o.model)
    }
}

impl std::fmt::Display for OllamaName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.short())
    }
}

/// `s` without its `ollama://` prefix (any case), or `None` when it has none.
pub fn strip_scheme(s: &str) -> Option<&str> {
    let s = s.trim();
    (s.len() >= SCHEME.len() && s[..SCHEME.len()].eq_ignore_ascii_case(SCHEME))
        .then(|| &s[SCHEME.len()..])
}

/// Where the Ollama store is and where loratune keeps what it derives from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OllamaOptions {
    /// The stores to look in, in order: `$OLLAMA_MODELS` alone when it is set, else `~/.ollama/models` and
    /// `/usr/share/ollama/.ollama/models` (the first that has the model wins).
    pub stores: Vec<PathBuf>,
    /// Whether `stores` is `$OLLAMA_MODELS` (for messages).
    pub models_env: bool,
    /// loratune's Ollama cache: `verified.json` (the blob hashes).
    /// `$XDG_CACHE_HOME/loratune/ollama`, else `~/.cache/loratune/ollama`.
    pub cache_dir: PathBuf,
}

/// The Linux service install's store (`ollama` system user).
pub const SYSTEM_STORE: &str = "/usr/share/ollama/.ollama/models";

impl Default for OllamaOptions {
    /// Nothing from the environment: only the system store, a cache under the working directory.
    fn default() -> Self {
        Self::from_lookup(|_| None)
    }
}

impl OllamaOptions {
    /// Options from the process environment.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    /// Options from any variable lookup (`OLLAMA_MODELS`, `HOME` / `USERPROFILE`, `XDG_CACHE_HOME`), testable
    /// without touching the process environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let get = |k: &str| get(k).filter(|v| !v.trim().is_empty());
        let home = get("HOME")
            .or_else(|| get("USERPROFILE"))
            .map(PathBuf::from);
        let (stores, models_env) = match get("OLLAMA_MODELS") {
            Some(m) => (vec![PathBuf::from(m)], true),
            None => {
                let mut v: Vec<PathBuf> = home
                    .iter()
                    .map(|h| h.join(".ollama").join("models"))
                    .collect();
                v.push(PathBuf::from(SYSTEM_STORE));
                (v, false)
            }
        };
        let cache_dir = match (get("XDG_CACHE_HOME"), &home) {
            (Some(x), _) => PathBuf::from(x).join("loratune"),
            (None, Some(h)) => h.join(".cache").join("loratune"),
            (None, None) => PathBuf::from(".loratune-cache"),
        }
        .join("ollama");
        OllamaOptions {
            stores,
            models_env,
            cache_dir,
        }
    }

    /// The sha256 cache file.
    pub fn verify_cache(&self) -> PathBuf {
        self.cache_dir.join("verified.json")
    }
}

/// One layer of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Layer {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    /// `sha256:<hex>`.
    pub digest: String,
    pub size: u64,
}

impl Layer {
    /// The short kind (`model`, `template`, ...) of an `application/vnd.ollama.image.*` layer.
    pub fn kind(&self) -> &str {
        self.media_type
            .strip_prefix("application/vnd.ollama.image.")
            .unwrap_or(&self.media_type)
    }
}

#[derive(serde::Deserialize)]
struct Manifest {
    #[serde(default)]
    layers: Vec<Layer>,
}

/// How the model blob's sha256 was established.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Hashed now.
    Hashed,
    /// Known from `verified.json` (same path, size and mtime as when it was hashed).
    Cached,
}

/// A model found in the Ollama store, its blob verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OllamaModel {
    /// The name, defaults filled in.
    pub name: OllamaName,
    /// The store it was found in.
    pub store: PathBuf,
    /// Its manifest.
    pub manifest: PathBuf,
    /// Every layer of the manifest, in order.
    pub layers: Vec<Layer>,
    /// The model layer's blob (`blobs/sha256-<hex>`).
    pub blob: PathBuf,
    /// The model layer's digest (`sha256:<hex>`).
    pub digest: String,
    /// The blob's size in bytes.
    pub size: u64,
    /// The template layer's text (Go template).
    pub template: Option<String>,
    /// The params layer (a JSON object), keys in file order.
    pub params: Option<serde_json::Map<String, serde_json::Value>>,
    /// The system layer's text.
    pub system: Option<String>,
    /// How the blob's sha256 was established.
    pub verification: Verification,
}

impl OllamaModel {
    /// Warnings for layers loratune does not use as part of the base (an `ADAPTER` the model was made with, a
    /// vision projector): training and generation see the model layer alone.
    pub fn notes(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.layers.iter().any(|l| l.media_type == MEDIA_ADAPTER) {
            out.push(format!(
                "ollama://{} was made with an ADAPTER layer; loratune uses its model layer alone (the base without that adapter)",
                self.name
            ));
        }
        if self.layers.iter().any(|l| l.media_type == MEDIA_PROJECTOR) {
            out.push(format!(
                "ollama://{} has a vision projector layer; loratune uses the text model only",
                self.name
            ));
        }
        out
    }
}

fn hub_err(m: String) -> Error {
    Error::Hub(m)
}

/// The store's `blobs/` file for `digest` (`sha256:<hex>`, 64 hex digits), or why not.
fn blob_path(store: &Path, digest: &str) -> std::result::Result<PathBuf, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|c| c.is_ascii_hexdigit()))
        .ok_or_else(|| format!("`{digest}` is not a sha256 digest (sha256:<64 hex digits>)"))?;
    Ok(store
        .join("blobs")
        .join(format!("sha256-{}", hex.to_ascii_lowercase())))
}

/// Every model in a store, from its `manifests/<host>/<ns>/<model>/<tag>` files, sorted.
pub fn list_models(store: &Path) -> Vec<OllamaName> {
    fn dirs(p: &Path) -> Vec<(String, PathBuf)> {
        let Ok(rd) = std::fs::read_dir(p) else {
            return Vec::new();
        };
        rd.flatten()
            .map(|e| (e.file_name().to_string_lossy().to_string(), e.path()))
            .collect()
    }
    let mut out = Vec::new();
    for (host, hp) in dirs(&store.join("manifests")) {
        for (ns, np) in dirs(&hp) {
            for (model, mp) in dirs(&np) {
                for (tag, tp) in dirs(&mp) {
                    if tp.is_file() {
                        out.push(OllamaName {
                            host: host.clone(),
                            namespace: ns.clone(),
                            model: model.clone(),
                            tag,
                        });
                    }
                }
            }
        }
    }
    out.sort_by_key(|n| n.short());
    out
}

fn listing(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(MAX_LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > MAX_LISTED {
        s.push_str(&format!(", … ({} more)", names.len() - MAX_LISTED));
    }
    s
}

fn missing_store(name: &OllamaName, opts: &OllamaOptions) -> Error {
    let tried: Vec<String> = opts
        .stores
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if opts.models_env {
        hub_err(format!(
            "ollama://{name}: OLLAMA_MODELS is set to {}, which is not a folder. Point OLLAMA_MODELS at the Ollama \
             model store (the folder holding manifests/ and blobs/), or unset it to use ~/.ollama/models",
            tried.join(", ")
        ))
    } else {
        hub_err(format!(
            "ollama://{name}: no Ollama model store found (tried {}). Pull the model with Ollama first \
             (`ollama pull {name}`), or set OLLAMA_MODELS to the folder holding its manifests/ and blobs/",
            tried.join(", ")
        ))
    }
}

fn not_found(name: &OllamaName, stores: &[&PathBuf]) -> Error {
    let wheres: Vec<String> = stores.iter().map(|s| s.display().to_string()).collect();
    let wheres = wheres.join(" and ");
    let all: Vec<OllamaName> = stores.iter().flat_map(|s| list_models(s)).collect();
    let mut tags: Vec<String> = all
        .iter()
        .filter(|n| n.same_model(name))
        .map(|n| n.tag.clone())
        .collect();
    tags.sort();
    tags.dedup();
    if !tags.is_empty() {
        return hub_err(format!(
            "ollama://{name}: tag `{}` of {} is not in the Ollama store at {wheres}; tags there: {}. \
             Pull it with `ollama pull {name}`, or use one of those tags",
            name.tag,
            OllamaName {
                tag: String::new(),
                ..name.clone()
            }
            .short()
            .trim_end_matches(':'),
            listing(&tags)
        ));
    }
    let mut models: Vec<String> = all.iter().map(OllamaName::short).collect();
    models.dedup();
    let present = if models.is_empty() {
        "the store has no models".to_string()
    } else {
        format!("models there: {}", listing(&models))
    };
    hub_err(format!(
        "ollama://{name}: no model `{}` in the Ollama store at {wheres} ({present}). Pull it with `ollama pull {name}`, \
         or set OLLAMA_MODELS to the store that has it",
        name.short()
    ))
}

fn read_limited(path: &Path, max: u64, what: &str) -> Result<Vec<u8>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut buf = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io(path, e))?;
    if buf.len() as u64 > max {
        return Err(hub_err(format!(
            "{}: the {what} is larger than {max} bytes",
            path.display()
        )));
    }
    Ok(buf)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The sha256 of a file, read in 1 MiB blocks.
fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Error::io(path, e)),
        };
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

#[derive(Default, serde::Serialize, serde::Deserialize)]
struct VerifyCache {
    #[serde(default)]
    blobs: BTreeMap<String, VerifiedBlob>,
}

#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct VerifiedBlob {
    size: u64,
    mtime_ns: u64,
    sha256: String,
}

fn read_cache(path: &Path) -> VerifyCache {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The sha256 (hex) of `blob`, from `cache` (a `verified.json`) when the blob still has the size and mtime it
/// had when it was hashed, else hashed now (streaming) and recorded there. A cache that cannot be read is
/// ignored; one that cannot be written only costs a rehash next time.
pub fn blob_sha256(blob: &Path, cache: &Path) -> Result<(String, Verification)> {
    let meta = std::fs::metadata(blob).map_err(|e| Error::io(blob, e))?;
    let key = std::fs::canonicalize(blob)
        .unwrap_or_else(|_| blob.to_path_buf())
        .to_string_lossy()
        .to_string();
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos() as u64);
    if let Some(m) = mtime_ns {
        if let Some(e) = read_cache(cache).blobs.get(&key) {
            if e.size == meta.len() && e.mtime_ns == m {
                return Ok((e.sha256.clone(), Verification::Cached));
            }
        }
    }
    if meta.len() >= ANNOUNCE_HASH_BYTES {
        eprintln!(
            "verifying the sha256 of {} ({:.1} GB; once: remembered by size and mtime)",
            blob.display(),
            meta.len() as f64 / 1e9
        );
    }
    let sha = sha256_file(blob)?;
    if let Some(m) = mtime_ns {
        // Re-read just before writing (another process may have added entries); drop entries of removed blobs.
        let mut c = read_cache(cache);
        c.blobs.retain(|k, _| Path::new(k).exists());
        c.blobs.insert(
            key,
            VerifiedBlob {
                size: meta.len(),
                mtime_ns: m,
                sha256: sha.clone(),
            },
        );
        if let (Some(dir), Ok(text)) = (cache.parent(), serde_json::to_vec_pretty(&c)) {
            let _ = std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(dir, e))
                .and_then(|_| crate::export::atomic::write_atomic(cache, &text));
        }
    }
    Ok((sha, Verification::Hashed))
}

/// A small layer's bytes, digest checked.
fn read_layer(name: &OllamaName, store: &Path, layer: &Layer, manifest: &Path) -> Result<Vec<u8>> {
    let path = blob_path(store, &layer.digest).map_err(|m| {
        hub_err(format!(
            "{}: {} layer of ollama://{name}: {m}",
            manifest.display(),
            layer.kind()
        ))
    })?;
    if !path.is_file() {
        return Err(hub_err(format!(
            "ollama://{name}: the {} layer's blob {} is missing from the store; re-pull the model (`ollama pull {name}`)",
            layer.kind(),
            path.display()
        )));
    }
    let bytes = read_limited(
        &path,
        MAX_TEXT_LAYER_BYTES,
        &format!("{} layer", layer.kind()),
    )?;
    let actual = hex(&Sha256::digest(&bytes));
    if !layer
        .digest
        .eq_ignore_ascii_case(&format!("sha256:{actual}"))
    {
        return Err(mismatch(name, &path, &layer.digest, &actual, layer.kind()));
    }
    Ok(bytes)
}

fn mismatch(name: &OllamaName, path: &Path, expected: &str, actual: &str, kind: &str) -> Error {
    hub_err(format!(
        "ollama://{name}: the {kind} blob {} is corrupt: its sha256 is {actual}, but the manifest says {}. \
         Re-pull the model (`ollama pull {name}`; re-create it if it was made with `ollama create`)",
        path.display(),
        expected.strip_prefix("sha256:").unwrap_or(expected)
    ))
}

/// Find `name` in the store, verify its model blob, and read its template / params / system layers.
pub fn resolve(name: &OllamaName, opts: &OllamaOptions) -> Result<OllamaModel> {
    let stores: Vec<&PathBuf> = opts.stores.iter().filter(|s| s.is_dir()).collect();
    if stores.is_empty() {
        return Err(missing_store(name, opts));
    }
    let found = stores.iter().find_map(|s| {
        let m = s.join("manifests");
        [false, true]
            .iter()
            .map(|lower| m.join(name.manifest_rel(*lower)))
            .find(|p| p.is_file())
            .map(|p| ((*s).clone(), p))
    });
    let Some((store, manifest)) = found else {
        return Err(not_found(name, &stores));
    };
    let bytes = read_limited(&manifest, MAX_MANIFEST_BYTES, "manifest")?;
    let m: Manifest = serde_json::from_slice(&bytes).map_err(|e| Error::Json {
        path: manifest.clone(),
        source: e,
    })?;
    let models: Vec<&Layer> = m
        .layers
        .iter()
        .filter(|l| l.media_type == MEDIA_MODEL)
        .collect();
    let layer = match models.as_slice() {
        [one] => *one,
        [] => {
            let kinds: Vec<&str> = m.layers.iter().map(|l| l.media_type.as_str()).collect();
            return Err(hub_err(format!(
                "ollama://{name}: the manifest {} has no model layer ({MEDIA_MODEL}); its layers: {}",
                manifest.display(),
                if kinds.is_empty() {
                    "none".to_string()
                } else {
                    kinds.join(", ")
                }
            )));
        }
        more => {
            return Err(hub_err(format!(
                "ollama://{name}: the manifest {} has {} model layers; loratune loads a model stored as one GGUF",
                manifest.display(),
                more.len()
            )))
        }
    };
    let blob = blob_path(&store, &layer.digest).map_err(|msg| {
        hub_err(format!(
            "{}: model layer of ollama://{name}: {msg}",
            manifest.display()
        ))
    })?;
    let meta = std::fs::metadata(&blob).map_err(|e| {
        hub_err(format!(
            "ollama://{name}: the model blob {} listed in {} is missing ({e}); re-pull the model (`ollama pull {name}`)",
            blob.display(),
            manifest.display()
        ))
    })?;
    if meta.len() != layer.size {
        return Err(hub_err(format!(
            "ollama://{name}: the model blob {} has {} bytes, but the manifest says {} (truncated, or being re-pulled). \
             Re-pull the model (`ollama pull {name}`)",
            blob.display(),
            meta.len(),
            layer.size
        )));
    }
    let (actual, verification) = blob_sha256(&blob, &opts.verify_cache())?;
    if !layer
        .digest
        .eq_ignore_ascii_case(&format!("sha256:{actual}"))
    {
        return Err(mismatch(name, &blob, &layer.digest, &actual, "model"));
    }
    if !crate::gguf::is_gguf_file(&blob) {
        return Err(hub_err(format!(
            "ollama://{name}: the model blob {} is not a GGUF file",
            blob.display()
        )));
    }

    // The last layer of a kind wins, as in Ollama.
    let last = |media: &str| m.layers.iter().rev().find(|l| l.media_type == media);
    let text = |media: &str| -> Result<Option<String>> {
        let Some(l) = last(media) else {
            return Ok(None);
        };
        let b = read_layer(name, &store, l, &manifest)?;
        String::from_utf8(b).map(Some).map_err(|_| {
            hub_err(format!(
                "ollama://{name}: the {} layer is not UTF-8 text",
                l.kind()
            ))
        })
    };
    let template = text(MEDIA_TEMPLATE)?;
    let system = text(MEDIA_SYSTEM)?;
    let params = match text(MEDIA_PARAMS)? {
        None => None,
        Some(t) => match serde_json::from_str::<serde_json::Value>(&t) {
            Ok(serde_json::Value::Object(o)) => Some(o),
            _ => {
                return Err(hub_err(format!(
                    "ollama://{name}: the params layer is not a JSON object: {}",
                    t.chars().take(200).collect::<String>()
                )))
            }
        },
    };
    Ok(OllamaModel {
        name: name.clone(),
        store,
        manifest,
        layers: m.layers.clone(),
        blob,
        digest: layer.digest.to_ascii_lowercase(),
        size: layer.size,
        template,
        params,
        system,
        verification,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(h: &str, ns: &str, m: &str, t: &str) -> OllamaName {
        OllamaName {
            host: h.into(),
            namespace: ns.into(),
            model: m.into(),
            tag: t.into(),
        }
    }

    #[test]
    fn names_parse_like_ollama() {
        let d = |m: &str, t: &str| n(DEFAULT_HOST, DEFAULT_NAMESPACE, m, t);
        assert_eq!(OllamaName::parse("llama3.2"), Ok(d("llama3.2", "latest")));
        assert_eq!(
            OllamaName::parse("ollama://llama3.2:1b"),
            Ok(d("llama3.2", "1b"))
        );
        assert_eq!(
            OllamaName::parse("OLLAMA://qwen2.5:0.5b-instruct-q4_K_M"),
            Ok(d("qwen2.5", "0.5b-instruct-q4_K_M"))
        );
        assert_eq!(
            OllamaName::parse("me/tiny:v1"),
            Ok(n(DEFAULT_HOST, "me", "tiny", "v1"))
        );
        assert_eq!(
            OllamaName::parse("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M"),
            Ok(n(
                "hf.co",
                "bartowski",
                "SmolLM2-135M-Instruct-GGUF",
                "Q4_K_M"
            ))
        );
        assert_eq!(
            OllamaName::parse("localhost:5000/me/tiny"),
            Ok(n("localhost:5000", "me", "tiny", "latest"))
        );
        assert_eq!(
            OllamaName::parse("llama3.2:1b").unwrap().short(),
            "llama3.2:1b"
        );
        assert_eq!(
            OllamaName::parse("llama3.2").unwrap().short(),
            "llama3.2:latest"
        );
        assert_eq!(OllamaName::parse("me/x").unwrap().short(), "me/x:latest");
        assert_eq!(
            OllamaName::parse("registry.ollama.ai/library/x:1")
                .unwrap()
                .short(),
            "x:1"
        );
        assert_eq!(
            OllamaName::parse("h.io/me/x").unwrap().full(),
            "h.io/me/x:latest"
        );
        for bad in [
            "",
            "ollama://",
            "a/b/c/d",
            "x:",
            ":tag",
            "my.ns/x",
            "x y",
            "../x",
            "x@sha256-00",
            "-x",
            "x:t/y",
        ] {
            let e = OllamaName::parse(bad).unwrap_err();
            assert!(e.contains("not an Ollama model name"), "{bad}: {e}");
        }
    }

    #[test]
    fn env_lookup() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let o = OllamaOptions::from_lookup(env(&[("HOME", "/home/u")]));
        assert_eq!(
            o.stores,
            vec![
                PathBuf::from("/home/u/.ollama/models"),
                PathBuf::from(SYSTEM_STORE)
            ]
        );
        assert!(!o.models_env);
        assert_eq!(o.cache_dir, PathBuf::from("/home/u/.cache/loratune/ollama"));
        assert_eq!(
            o.verify_cache(),
            PathBuf::from("/home/u/.cache/loratune/ollama/verified.json")
        );
        let o = OllamaOptions::from_lookup(env(&[
            ("HOME", "/home/u"),
            ("OLLAMA_MODELS", "/data/ollama"),
            ("XDG_CACHE_HOME", "/xdg"),
        ]));
        assert_eq!(o.stores, vec![PathBuf::from("/data/ollama")]);
        assert!(o.models_env);
        assert_eq!(o.cache_dir, PathBuf::from("/xdg/loratune/ollama"));
        let o = OllamaOptions::from_lookup(env(&[("OLLAMA_MODELS", " ")]));
        assert_eq!(o.stores, vec![PathBuf::from(SYSTEM_STORE)]);
        assert_eq!(OllamaOptions::default(), o);
    }

    #[test]
    fn blob_paths() {
        let h = "AB".repeat(32);
        assert_eq!(
            blob_path(Path::new("/s"), &format!("sha256:{h}")).unwrap(),
            PathBuf::from(format!("/s/blobs/sha256-{}", h.to_lowercase()))
        );
        assert!(blob_path(Path::new("/s"), "sha256:../../etc/passwd").is_err());
        assert!(blob_path(Path::new("/s"), &format!("md5:{h}")).is_err());
    }
}
