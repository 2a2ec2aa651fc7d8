//! `ollama://NAME[:TAG]` base models, against Ollama stores laid out here from the documented format:
//! `manifests/<host>/<namespace>/<model>/<tag>` (an OCI-style JSON manifest whose layers name blobs by
//! `sha256:<hex>`) and `blobs/sha256-<hex>`. The model blobs are GGUF files: `gguf/families/llama.gguf`
//! (llama.cpp's converter output) for resolution and loading, and the tiny qwen2 fixture exported to GGUF (it
//! carries a tokenizer and a chat template) for training, generation and the Ollama export.

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::DType;
use loratune::hub::ollama::{
    blob_sha256, resolve, OllamaName, OllamaOptions, Verification, MEDIA_LICENSE, MEDIA_MODEL,
    MEDIA_PARAMS, MEDIA_SYSTEM, MEDIA_TEMPLATE,
};
use loratune::hub::{resolve_base_model_in, BaseModelRef, HubOptions, ResolvedModel};
use loratune::model::{self, CausalLm, TokenBatch};
use sha2::{Digest, Sha256};

use crate::common::*;

const TEMPLATE: &str = "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}\
{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n";
const PARAMS: &str = r#"{"stop":["<|im_start|>","<|im_end|>"],"temperature":0.7,"num_ctx":4096,"penalize_newline":false}"#;
const SYSTEM: &str = "You are a careful assistant.\nAnswer briefly.";

fn sha_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An Ollama store in a temporary folder, with loratune's cache beside it.
struct Store {
    tmp: tempfile::TempDir,
}

impl Store {
    fn new() -> Self {
        let s = Store {
            tmp: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(s.root().join("blobs")).unwrap();
        std::fs::create_dir_all(s.root().join("manifests")).unwrap();
        s
    }

    fn root(&self) -> PathBuf {
        self.tmp.path().join("models")
    }

    fn cache(&self) -> PathBuf {
        self.tmp.path().join("cache/loratune/ollama")
    }

    fn opts(&self) -> OllamaOptions {
        OllamaOptions {
            stores: vec![self.root()],
            models_env: true,
            cache_dir: self.cache(),
        }
    }

    /// The environment a `loratune` child process gets: this store, the cache under the temporary folder.
    fn env(&self, cmd: &mut Command) {
        cmd.env("OLLAMA_MODELS", self.root())
            .env("XDG_CACHE_HOME", self.tmp.path().join("cache"))
            .env("HOME", self.tmp.path());
    }

    /// Store `bytes` as a blob; its layer entry (`mediaType`, `digest`, `size`).
    fn blob(&self, media: &str, bytes: &[u8]) -> serde_json::Value {
        let hex = sha_hex(bytes);
        std::fs::write(self.root().join(format!("blobs/sha256-{hex}")), bytes).unwrap();
        serde_json::json!({"mediaType": media, "digest": format!("sha256:{hex}"), "size": bytes.len()})
    }

    fn blob_path(&self, layer: &serde_json::Value) -> PathBuf {
        let d = layer["digest"].as_str().unwrap().replace(':', "-");
        self.root().join("blobs").join(d)
    }

    /// Write the manifest `manifests/<host>/<ns>/<model>/<tag>` with `layers`.
    fn manifest(&self, host: &str, ns: &str, model: &str, tag: &str, layers: &[serde_json::Value]) {
        let config = self.blob(
            "application/vnd.docker.container.image.v1+json",
            br#"{"model_format":"gguf","model_family":"llama","file_type":"F32"}"#,
        );
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": config,
            "layers": layers,
        });
        let dir = self
            .root()
            .join("manifests")
            .join(host)
            .join(ns)
            .join(model);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(tag), serde_json::to_vec(&m).unwrap()).unwrap();
    }

    /// `registry.ollama.ai/library/<model>:<tag>`: the GGUF at `gguf` plus template, params, system and
    /// licence layers. Returns the model layer.
    fn model(&self, model: &str, tag: &str, gguf: &Path) -> serde_json::Value {
        let layer = self.blob(MEDIA_MODEL, &std::fs::read(gguf).unwrap());
        let layers = [
            layer.clone(),
            self.blob(MEDIA_TEMPLATE, TEMPLATE.as_bytes()),
            self.blob(MEDIA_PARAMS, PARAMS.as_bytes()),
            self.blob(MEDIA_SYSTEM, SYSTEM.as_bytes()),
            self.blob(MEDIA_LICENSE, b"Apache License 2.0"),
        ];
        self.manifest("registry.ollama.ai", "library", model, tag, &layers);
        layer
    }
}

fn llama_gguf() -> PathBuf {
    fixture("gguf/families/llama.gguf")
}

/// The tiny qwen2 fixture as an F32 GGUF with its tokenizer and chat template (what Ollama would store).
fn qwen_gguf(dir: &Path) -> PathBuf {
    let hf = fixture("models/qwen2");
    let base = model::open(&hf).unwrap();
    let out = dir.join("qwen2.gguf");
    loratune::export::gguf::export_gguf_from(
        &hf,
        &base,
        None,
        &out,
        &loratune::export::gguf::GgufExportOptions {
            out_type: loratune::export::gguf::GgufType::F32,
            name: Some("tiny-qwen".into()),
        },
    )
    .unwrap();
    out
}

fn logits(path: &Path, ids: &[u32]) -> Vec<f32> {
    let m = model::open(path).unwrap();
    let device = Default::default();
    let lm = CausalLm::<B>::load(m.config, m.source.as_ref(), &device, DType::F32).unwrap();
    to_vec(lm.forward(&TokenBatch::from_rows(&[ids.to_vec()], None)))
}

fn name(s: &str) -> OllamaName {
    OllamaName::parse(s).unwrap()
}

/// `base_model: ollama://tiny` resolves (through the environment lookup, as `train` does) to the verified model
/// blob, reads the template / params / system layers, and loads with exactly the logits of the GGUF itself.
#[test]
fn resolves_a_store_model_that_loads_like_its_gguf() {
    let s = Store::new();
    let layer = s.model("tiny", "latest", &llama_gguf());
    let (root, tmp) = (s.root(), s.tmp.path().to_path_buf());
    let hub = HubOptions::from_lookup(|k| match k {
        "OLLAMA_MODELS" => Some(root.to_string_lossy().to_string()),
        "XDG_CACHE_HOME" => Some(tmp.join("cache").to_string_lossy().to_string()),
        "HOME" => Some(tmp.to_string_lossy().to_string()),
        _ => None,
    })
    .unwrap();
    assert_eq!(hub.ollama, s.opts());
    // Config checks parse the name only, with or without file checks.
    for check in [false, true] {
        assert_eq!(
            BaseModelRef::classify("ollama://tiny", None, check),
            Ok(BaseModelRef::Ollama(name("tiny:latest")))
        );
    }
    let r = resolve_base_model_in("ollama://tiny", Some("main"), None, &hub).unwrap();
    let ResolvedModel::Ollama(m) = &r else {
        panic!("{r:?}")
    };
    assert_eq!(m.name.short(), "tiny:latest");
    assert_eq!(m.name.full(), "registry.ollama.ai/library/tiny:latest");
    assert_eq!(m.digest, layer["digest"].as_str().unwrap());
    assert_eq!(m.size, std::fs::metadata(llama_gguf()).unwrap().len());
    assert_eq!(m.blob, s.blob_path(&layer));
    assert_eq!(
        m.manifest,
        root.join("manifests/registry.ollama.ai/library/tiny/latest")
    );
    assert_eq!(m.template.as_deref(), Some(TEMPLATE));
    assert_eq!(m.system.as_deref(), Some(SYSTEM));
    assert_eq!(
        serde_json::to_string(m.params.as_ref().unwrap()).unwrap(),
        PARAMS
    );
    assert_eq!(m.verification, Verification::Hashed);
    assert_eq!(m.layers.len(), 5);
    assert!(m.notes().is_empty());
    // Every loader opens the blob itself (known as a GGUF by its magic: it has no extension).
    let path = r.path();
    assert_eq!(path, m.blob);
    assert!(path.extension().is_none(), "{}", path.display());
    assert!(loratune::gguf::is_gguf_file(path));
    let ids: Vec<u32> = vec![1, 5, 9, 2, 33, 60, 7, 0, 63, 17];
    assert_eq!(
        max_abs_diff(&logits(path, &ids), &logits(&llama_gguf(), &ids)),
        0.0
    );
}

/// Names are parsed as Ollama parses them: default host, namespace and tag, `ns/name:tag`,
/// `host[:port]/ns/name:tag`, case-insensitive (Ollama lowercases manifest paths).
#[test]
fn every_name_form_finds_its_manifest() {
    let s = Store::new();
    let model = s.blob(MEDIA_MODEL, &std::fs::read(llama_gguf()).unwrap());
    s.manifest(
        "registry.ollama.ai",
        "library",
        "tiny",
        "latest",
        std::slice::from_ref(&model),
    );
    s.manifest(
        "registry.ollama.ai",
        "me",
        "tiny",
        "v1",
        std::slice::from_ref(&model),
    );
    s.manifest(
        "example.com:5000",
        "team",
        "tiny",
        "q8",
        std::slice::from_ref(&model),
    );
    s.manifest("registry.ollama.ai", "library", "mixed", "big", &[model]);
    for (arg, short, manifest) in [
        (
            "tiny",
            "tiny:latest",
            "registry.ollama.ai/library/tiny/latest",
        ),
        (
            "tiny:latest",
            "tiny:latest",
            "registry.ollama.ai/library/tiny/latest",
        ),
        (
            "ollama://registry.ollama.ai/library/tiny:latest",
            "tiny:latest",
            "registry.ollama.ai/library/tiny/latest",
        ),
        ("me/tiny:v1", "me/tiny:v1", "registry.ollama.ai/me/tiny/v1"),
        (
            "ollama://example.com:5000/team/tiny:q8",
            "example.com:5000/team/tiny:q8",
            "example.com:5000/team/tiny/q8",
        ),
        (
            "MIXED:Big",
            "MIXED:Big",
            "registry.ollama.ai/library/mixed/big",
        ),
    ] {
        let m = resolve(&name(arg), &s.opts()).unwrap_or_else(|e| panic!("{arg}: {e}"));
        assert_eq!(m.name.short(), short, "{arg}");
        assert_eq!(
            m.manifest,
            s.root().join("manifests").join(manifest),
            "{arg}"
        );
        assert!(m.blob.is_file(), "{arg}");
    }
    // `--model ollama://…` on the command line goes through the same resolution; other paths are left alone.
    let (p, m) =
        loratune::hub::resolve_model_arg(Path::new("ollama://me/tiny:v1"), &s.opts()).unwrap();
    assert_eq!(p, m.unwrap().blob);
    let (p, m) = loratune::hub::resolve_model_arg(Path::new("some/dir"), &s.opts()).unwrap();
    assert_eq!((p, m), (PathBuf::from("some/dir"), None));
}

/// One corrupted byte (same size, so only the hash can tell) is a digest mismatch naming the blob, both digests
/// and the fix; a truncated blob is caught by its size.
#[test]
fn a_corrupt_blob_is_a_digest_mismatch() {
    let s = Store::new();
    let layer = s.model("tiny", "latest", &llama_gguf());
    let blob = s.blob_path(&layer);
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x40;
    std::fs::write(&blob, &bytes).unwrap();
    let e = resolve(&name("tiny"), &s.opts()).unwrap_err().to_string();
    let expected = layer["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap();
    assert!(e.contains(&blob.display().to_string()), "{e}");
    assert!(e.contains(expected), "{e}");
    assert!(e.contains(&sha_hex(&bytes)), "{e}");
    assert!(e.contains("ollama pull tiny:latest"), "{e}");
    assert!(e.contains("corrupt"), "{e}");

    std::fs::write(&blob, &bytes[..n - 1]).unwrap();
    let e = resolve(&name("tiny"), &s.opts()).unwrap_err().to_string();
    assert!(
        e.contains(&format!("has {} bytes, but the manifest says {n}", n - 1)),
        "{e}"
    );
    assert!(e.contains("ollama pull tiny:latest"), "{e}");

    // A corrupt template layer is caught too.
    let s = Store::new();
    s.model("tiny", "latest", &llama_gguf());
    let t = s
        .root()
        .join(format!("blobs/sha256-{}", sha_hex(TEMPLATE.as_bytes())));
    std::fs::write(&t, TEMPLATE.replace("system", "sistem")).unwrap();
    let e = resolve(&name("tiny"), &s.opts()).unwrap_err().to_string();
    assert!(e.contains("template blob") && e.contains("corrupt"), "{e}");
}

/// An unknown tag lists the tags of that model; an unknown model lists the models in the store.
#[test]
fn unknown_tags_and_models_list_what_is_there() {
    let s = Store::new();
    let model = s.blob(MEDIA_MODEL, &std::fs::read(llama_gguf()).unwrap());
    for tag in ["latest", "q8", "1b"] {
        s.manifest(
            "registry.ollama.ai",
            "library",
            "tiny",
            tag,
            std::slice::from_ref(&model),
        );
    }
    s.manifest("registry.ollama.ai", "me", "other", "v1", &[model]);
    let e = resolve(&name("tiny:3b"), &s.opts())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("tag `3b` of tiny is not in the Ollama store"),
        "{e}"
    );
    assert!(e.contains("tags there: 1b, latest, q8"), "{e}");
    assert!(e.contains("ollama pull tiny:3b"), "{e}");
    assert!(e.contains(&s.root().display().to_string()), "{e}");
    let e = resolve(&name("nope"), &s.opts()).unwrap_err().to_string();
    assert!(e.contains("no model `nope:latest`"), "{e}");
    assert!(
        e.contains("models there: me/other:v1, tiny:1b, tiny:latest, tiny:q8"),
        "{e}"
    );
    let empty = Store::new();
    let e = resolve(&name("nope"), &empty.opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("the store has no models"), "{e}");
}

/// No store: the folders tried, and how to point loratune at one.
#[test]
fn a_missing_store_names_the_folders_tried() {
    let t = tempfile::tempdir().unwrap();
    let home = t.path().join("home");
    let mut o =
        OllamaOptions::from_lookup(|k| (k == "HOME").then(|| home.to_string_lossy().to_string()));
    assert_eq!(o.stores[0], home.join(".ollama/models"));
    assert_eq!(
        o.stores[1],
        PathBuf::from("/usr/share/ollama/.ollama/models")
    );
    // Keep the test hermetic even on a machine with the Linux service install.
    o.stores[1] = t.path().join("usr/share/ollama/.ollama/models");
    let e = resolve(&name("llama3.2:1b"), &o).unwrap_err().to_string();
    for p in &o.stores {
        assert!(e.contains(&p.display().to_string()), "{e}");
    }
    assert!(
        e.contains("no Ollama model store found")
            && e.contains("OLLAMA_MODELS")
            && e.contains("ollama pull llama3.2:1b"),
        "{e}"
    );
    let o = OllamaOptions::from_lookup(|k| {
        (k == "OLLAMA_MODELS").then(|| t.path().join("nowhere").to_string_lossy().to_string())
    });
    let e = resolve(&name("llama3.2:1b"), &o).unwrap_err().to_string();
    assert!(
        e.contains("OLLAMA_MODELS is set to") && e.contains("nowhere"),
        "{e}"
    );
}

/// A manifest without a model layer (or with a blob that is not a GGUF) is a clear error.
#[test]
fn manifests_without_a_gguf_model_layer_are_refused() {
    let s = Store::new();
    let t = s.blob(MEDIA_TEMPLATE, TEMPLATE.as_bytes());
    s.manifest("registry.ollama.ai", "library", "nomodel", "latest", &[t]);
    let e = resolve(&name("nomodel"), &s.opts())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has no model layer") && e.contains(MEDIA_TEMPLATE),
        "{e}"
    );
    let notgguf = s.blob(MEDIA_MODEL, b"safetensors? no");
    s.manifest(
        "registry.ollama.ai",
        "library",
        "notgguf",
        "latest",
        &[notgguf],
    );
    let e = resolve(&name("notgguf"), &s.opts())
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a GGUF file"), "{e}");
}

/// The blob's sha256 is computed once: a second resolve takes it from `verified.json` (it does not even notice a
/// byte changed behind an unchanged size and mtime — proof that it did not rehash); a new mtime or size rehashes.
#[test]
fn the_blob_hash_is_cached_by_size_and_mtime() {
    let s = Store::new();
    let layer = s.model("tiny", "latest", &llama_gguf());
    let blob = s.blob_path(&layer);
    let o = s.opts();
    assert_eq!(
        resolve(&name("tiny"), &o).unwrap().verification,
        Verification::Hashed
    );
    assert_eq!(
        resolve(&name("tiny"), &o).unwrap().verification,
        Verification::Cached
    );
    let cache = std::fs::read_to_string(o.verify_cache()).unwrap();
    let key = std::fs::canonicalize(&blob).unwrap();
    assert!(cache.contains(&*key.to_string_lossy()), "{cache}");

    // Flip a byte in place and put the mtime back: size and mtime match, so the cached hash is used.
    let mtime = std::fs::metadata(&blob).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&blob).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();
    let set_mtime = |t: std::time::SystemTime| {
        std::fs::File::options()
            .write(true)
            .open(&blob)
            .unwrap()
            .set_modified(t)
            .unwrap()
    };
    set_mtime(mtime);
    assert_eq!(
        resolve(&name("tiny"), &o).unwrap().verification,
        Verification::Cached
    );
    // A touched mtime forces a rehash, which finds the change.
    set_mtime(mtime + std::time::Duration::from_secs(10));
    let e = resolve(&name("tiny"), &o).unwrap_err().to_string();
    assert!(e.contains("corrupt"), "{e}");
    bytes[n - 1] ^= 1;
    std::fs::write(&blob, &bytes).unwrap();
    assert_eq!(
        resolve(&name("tiny"), &o).unwrap().verification,
        Verification::Hashed
    );
    assert_eq!(
        resolve(&name("tiny"), &o).unwrap().verification,
        Verification::Cached
    );

    // A changed size rehashes (the hash function on its own, without a manifest to compare sizes with).
    let f = s.tmp.path().join("file.bin");
    let c = s.tmp.path().join("other-cache/verified.json");
    std::fs::write(&f, b"abc").unwrap();
    let (h, v) = blob_sha256(&f, &c).unwrap();
    assert_eq!(
        (h.as_str(), v),
        (sha_hex(b"abc").as_str(), Verification::Hashed)
    );
    assert_eq!(blob_sha256(&f, &c).unwrap().1, Verification::Cached);
    let m = std::fs::metadata(&f).unwrap().modified().unwrap();
    std::fs::write(&f, b"abcd").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&f)
        .unwrap()
        .set_modified(m)
        .unwrap();
    let (h, v) = blob_sha256(&f, &c).unwrap();
    assert_eq!(
        (h.as_str(), v),
        (sha_hex(b"abcd").as_str(), Verification::Hashed)
    );
    // An unreadable cache file is ignored.
    std::fs::write(&c, b"{not json").unwrap();
    assert_eq!(blob_sha256(&f, &c).unwrap().1, Verification::Hashed);
    assert_eq!(blob_sha256(&f, &c).unwrap().1, Verification::Cached);
}

fn loratune(s: &Store, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_loratune"));
    cmd.args(args);
    s.env(&mut cmd);
    let o = cmd.output().unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    )
}

/// The binary end to end on a store holding the tiny qwen2 model as `tiny-qwen:latest`: `inspect` reports the
/// source and its layers, `generate` equals generating from the GGUF itself, `data stats` and `train` take
/// `base_model: ollama://…`, and `export --format ollama` of the trained adapter writes `adapter.gguf` and a
/// Modelfile `FROM tiny-qwen:latest` + `ADAPTER` with the source's TEMPLATE, PARAMETERs and SYSTEM verbatim.
#[test]
fn cli_inspect_generate_train_and_export_from_the_store() {
    let s = Store::new();
    let gguf = qwen_gguf(s.tmp.path());
    let layer = s.model("tiny-qwen", "latest", &gguf);

    // inspect, as JSON and as text.
    let (ok, out, err) = loratune(&s, &["inspect", "--json", "ollama://tiny-qwen"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["architecture"], "Qwen2ForCausalLM");
    assert_eq!(v["ollama"]["name"], "tiny-qwen:latest");
    assert_eq!(v["ollama"]["digest"], layer["digest"]);
    assert_eq!(v["ollama"]["size"], layer["size"]);
    assert_eq!(v["ollama"]["template"], TEMPLATE);
    assert_eq!(v["ollama"]["system"], SYSTEM);
    assert_eq!(v["ollama"]["params"]["temperature"], 0.7);
    assert_eq!(v["ollama"]["params"]["stop"][1], "<|im_end|>");
    let (ok, out, err) = loratune(&s, &["inspect", "ollama://tiny-qwen:latest"]);
    assert!(ok, "{err}");
    for want in [
        "ollama         tiny-qwen:latest (registry.ollama.ai/library/tiny-qwen:latest)",
        layer["digest"].as_str().unwrap(),
        "sha256 verified earlier",
        "template     {{- if .System }}<|im_start|>system",
        r#"params       {"stop":["<|im_start|>","<|im_end|>"],"temperature":0.7"#,
        "system       You are a careful assistant.\n               Answer briefly.",
        "other layers license (18 B)",
        "Qwen2ForCausalLM",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let (ok, _, err) = loratune(&s, &["inspect", "ollama://tiny-qwen:7b"]);
    assert!(!ok && err.contains("tags there: latest"), "{err}");

    // generate: the same tokens as from the GGUF file.
    let gen = |model: &str| {
        let (ok, out, err) = loratune(
            &s,
            &[
                "generate",
                "--model",
                model,
                "--prompt",
                "hi",
                "--chat",
                "--max-new-tokens",
                "4",
                "--json",
                "--device",
                "cpu",
            ],
        );
        assert!(ok, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["generated_ids"].clone()
    };
    assert_eq!(gen("ollama://tiny-qwen"), gen(gguf.to_str().unwrap()));

    // data stats and train with `base_model: ollama://tiny-qwen`.
    let cfg = s.tmp.path().join("config.yaml");
    std::fs::write(
        &cfg,
        format!(
            "base_model: ollama://tiny-qwen\n\
             datasets:\n  - path: {data}\n    type: chat_template\n\
             dataset_prepared_path: {cache}\n\
             sequence_len: 128\nmicro_batch_size: 2\nlora_r: 4\nlora_alpha: 8\n\
             lora_target_modules: [q_proj, v_proj]\nlearning_rate: 0.01\nmax_steps: 2\nseed: 3\n\
             device: cpu\noutput_dir: {out}\n",
            data = fixture("train/facts_chat.jsonl").display(),
            cache = s.tmp.path().join("data-cache").display(),
            out = s.tmp.path().join("run").display(),
        ),
    )
    .unwrap();
    let cfg = cfg.to_str().unwrap();
    let (ok, out, err) = loratune(&s, &["data", "stats", cfg, "--json"]);
    assert!(ok, "{err}");
    assert!(out.contains("tokens"), "{out}");
    let (ok, _, err) = loratune(&s, &["train", cfg]);
    assert!(ok, "{err}");
    let adapter = s.tmp.path().join("run/adapter");
    let ad_cfg = std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap();
    assert!(ad_cfg.contains("\"ollama://tiny-qwen\""), "{ad_cfg}");
    // The run records the system message its conversations carried: 10 of facts_chat.jsonl's 48 say this.
    let facts = loratune::lora::peft::read_training_facts(&adapter).unwrap();
    assert_eq!(
        facts.system_message,
        Some(("You are Aria.".to_string(), 10))
    );

    // export --format ollama: the adapter and a Modelfile on top of the model Ollama already has.
    let dest = s.tmp.path().join("tuned");
    let export = |extra: &[&str]| {
        let mut args = vec![
            "export",
            "--model",
            "ollama://tiny-qwen",
            "--adapter",
            adapter.to_str().unwrap(),
            "--format",
            "ollama",
            "--out",
            dest.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        loratune(&s, &args)
    };
    let (ok, out, err) = export(&["--name", "tiny-tuned"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("the system prompt of 10 training conversations"),
        "{err}"
    );
    assert_eq!(
        out.trim(),
        format!(
            "ollama create tiny-tuned -f {}",
            dest.join("Modelfile").display()
        )
    );
    let mut files: Vec<String> = std::fs::read_dir(&dest)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    files.sort();
    assert_eq!(files, ["Modelfile", "adapter.gguf"]);
    let mf = std::fs::read_to_string(dest.join("Modelfile")).unwrap();
    // SYSTEM: the system message the model was trained with, not the source's own.
    let want = format!(
        "FROM tiny-qwen:latest\nADAPTER ./adapter.gguf\n\nTEMPLATE \"\"\"{TEMPLATE}\"\"\"\n\n\
         SYSTEM \"\"\"You are Aria.\"\"\"\n\n\
         PARAMETER stop \"<|im_start|>\"\nPARAMETER stop \"<|im_end|>\"\n\
         PARAMETER temperature 0.7\nPARAMETER num_ctx 4096\nPARAMETER penalize_newline false\n"
    );
    assert_eq!(mf, want);
    let a = loratune::gguf::GgufFile::open(&dest.join("adapter.gguf")).unwrap();
    assert_eq!(
        a.get("general.type").and_then(|v| v.as_str()),
        Some("adapter")
    );
    assert_eq!(a.architecture().unwrap(), "qwen2");

    // --system replaces it; --system "" writes no SYSTEM line.
    for (flag, line) in [
        ("Be brief.", Some("SYSTEM \"\"\"Be brief.\"\"\"")),
        ("", None),
    ] {
        let (ok, _, err) = export(&["--system", flag]);
        assert!(ok, "{err}");
        let mf = std::fs::read_to_string(dest.join("Modelfile")).unwrap();
        match line {
            Some(l) => assert!(mf.contains(l), "{mf}"),
            None => assert!(!mf.contains("SYSTEM"), "{mf}"),
        }
    }

    // Without an adapter there is nothing to export: the model is already in Ollama.
    let (ok, _, err) = loratune(
        &s,
        &[
            "export",
            "--model",
            "ollama://tiny-qwen",
            "--format",
            "ollama",
            "--out",
            s.tmp.path().join("x").to_str().unwrap(),
        ],
    );
    assert!(!ok && err.contains("already in Ollama"), "{err}");
}

/// The Modelfile rules on their own: the source's template, params and system when it has them; the
/// derived template (and default system prompt) when it has no template layer or `--template` forces a family,
/// with the source's params and system on top.
#[test]
fn modelfile_for_an_ollama_base_keeps_the_source_layers() {
    use loratune::export::ollama::{modelfile_for_ollama_base, TemplateFamily};
    let s = Store::new();
    let gguf = qwen_gguf(s.tmp.path());
    s.model("tiny-qwen", "latest", &gguf);
    let m = resolve(&name("tiny-qwen"), &s.opts()).unwrap();
    let tok = loratune::tokenizer::load_for_model(&m.blob).unwrap();
    let mf = modelfile_for_ollama_base(&tok, &m, None, Some("./adapter.gguf")).unwrap();
    assert_eq!(mf.from, "tiny-qwen:latest");
    assert_eq!(mf.family, None);
    assert_eq!(mf.template, TEMPLATE);
    assert_eq!(mf.system.as_deref(), Some(SYSTEM));
    assert_eq!(mf.stops, ["<|im_start|>", "<|im_end|>"]);
    assert_eq!(mf.parameters.len(), 3);

    // Only the model layer: everything derived from the GGUF's tokenizer, as for a plain GGUF base.
    let bare = loratune::hub::ollama::OllamaModel {
        template: None,
        params: None,
        system: None,
        ..m.clone()
    };
    let mf = modelfile_for_ollama_base(&tok, &bare, None, Some("./adapter.gguf")).unwrap();
    let plain = loratune::export::ollama::modelfile_for(
        &tok,
        None,
        "tiny-qwen:latest",
        Some("./adapter.gguf"),
    )
    .unwrap();
    assert_eq!(mf, plain);
    assert_eq!(mf.family, Some(TemplateFamily::ChatMl));
    assert!(mf.system.as_deref().unwrap().contains("SmolLM"));

    // A forced family replaces the template; the source's system and params stay.
    let mf = modelfile_for_ollama_base(&tok, &m, Some(TemplateFamily::ChatMl), None).unwrap();
    assert_eq!(mf.template, TemplateFamily::ChatMl.go_template());
    assert_eq!(mf.system.as_deref(), Some(SYSTEM));
    assert!(mf.render().unwrap().contains("PARAMETER temperature 0.7\n"));
}

/// Config checks accept `base_model: ollama://…` from the name alone (the store is never read, with or without
/// file checks), refuse a malformed name at its key, and say that a revision is ignored.
#[test]
fn configs_take_an_ollama_base_model_without_reading_the_store() {
    use loratune::config::{LoadOptions, TrainConfig};
    let data = fixture("train/facts_chat.jsonl");
    let yaml = |base: &str, extra: &str| {
        format!(
            "base_model: {base}\n{extra}max_steps: 1\nlearning_rate: 0.0001\ndatasets:\n  - path: {}\n    type: chat_template\n",
            data.display()
        )
    };
    for check_files in [false, true] {
        let opts = LoadOptions {
            check_files,
            ..LoadOptions::default()
        };
        let c =
            TrainConfig::from_yaml_str(&yaml("ollama://nowhere/none:1b", ""), "c.yaml", &[], &opts)
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.base_model, "ollama://nowhere/none:1b");
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        let e = TrainConfig::from_yaml_str(&yaml("ollama://bad name", ""), "c.yaml", &[], &opts)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("base_model") && e.contains("not an Ollama model name"),
            "{e}"
        );
    }
    let c = TrainConfig::from_yaml_str(
        &yaml("ollama://llama3.2:1b", "base_model_revision: v2\n"),
        "c.yaml",
        &[],
        &LoadOptions::default(),
    )
    .unwrap();
    let w = format!("{:?}", c.warnings());
    assert!(
        w.contains("base_model_revision") && w.contains("Ollama"),
        "{w}"
    );
}
