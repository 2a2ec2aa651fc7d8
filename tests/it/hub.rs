//! `base_model` resolution against a fake Hugging Face Hub on loopback.
//!
//! The fake hub answers what the Hub answers loratune's client (`src/hub/http.rs`, the same requests hf-hub 0.5
//! and huggingface_hub make): `GET /api/models/{repo}/revision/{rev}` → JSON `{sha, siblings}`; per file
//! `GET /{repo}/resolve/{rev}/{file}` with `Range: bytes=0-0` (the metadata probe: needs `ETag` or
//! `X-Linked-Etag`, `X-Repo-Commit`, and `Content-Range: bytes 0-0/<size>` or `X-Linked-Size`), then the
//! content (with `Range: bytes=<n>-` when resuming). A [`Quirk`] makes one repo answer like a misbehaving or
//! CDN-backed hub: file requests redirected to another server, redirects without `Location`, loops, garbage
//! JSON, cut or mis-sized bodies, hostile ETags, error messages echoing the `Authorization` header.

use loratune::hub::{resolve_base_model, BaseModelRef, HubOptions, ResolvedModel};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

const SHA_A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa1";
const SHA_B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb2";

#[derive(Clone, Debug)]
struct Request {
    path: String,
    headers: HashMap<String, String>,
}

/// How a fake repo misbehaves (or, for `RedirectFilesTo`, behaves like the real Hub with a CDN).
#[derive(Clone, Debug)]
enum Quirk {
    /// File requests answer `302` to the same path on this base URL (another server), carrying the Hub's
    /// `X-Repo-Commit`, `X-Linked-Etag` and `X-Linked-Size`, as huggingface.co does for LFS files.
    RedirectFilesTo(String),
    /// File requests answer `302` with the Hub headers but no `Location`.
    FileRedirectWithoutLocation,
    /// The repo-info request answers `302` without `Location`.
    InfoRedirectWithoutLocation,
    /// File requests answer `302` with this `Location`, verbatim.
    FileRedirectTo(String),
    /// File requests answer `302` to themselves, forever.
    RedirectLoop,
    /// Every request answers `307` with a relative `Location` to the same request on this repo id (a renamed repo).
    MovedTo(String),
    /// The repo-info answer has this body.
    InfoBody(String),
    /// Content answers announce the full `Content-Length` but the connection closes after half of it.
    TruncatedBody,
    /// Content answers are this many bytes longer (or shorter) than the size the probe announced, with a
    /// matching `Content-Length` (well-framed HTTP, wrong file).
    WrongLength(isize),
    /// This `ETag` on file answers (and no `X-Linked-Etag`).
    Etag(String),
    /// File answers lack `X-Repo-Commit`.
    NoCommitHeader,
    /// Every request answers `500` with an `X-Error-Message` that echoes the `Authorization` header.
    EchoAuthInError,
}

#[derive(Clone, Default)]
struct FakeRepo {
    /// branch/tag → sha
    refs: HashMap<String, String>,
    /// sha → files
    commits: HashMap<String, Vec<(String, Vec<u8>)>>,
    /// When set, requests need `Authorization: Bearer <token>` (401 without any, 403 with another).
    gated_token: Option<String>,
    quirk: Option<Quirk>,
}

struct FakeHub {
    url: String,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl FakeHub {
    fn start(repos: HashMap<String, FakeRepo>) -> FakeHub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let log = requests.clone();
        let repos = Arc::new(repos);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (log, repos) = (log.clone(), repos.clone());
                std::thread::spawn(move || serve(stream, &repos, &log));
            }
        });
        FakeHub { url, requests }
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    /// Files fetched with content (not the `bytes=0-0` metadata probes), as `rev/file`.
    fn downloads(&self) -> Vec<String> {
        self.requests()
            .into_iter()
            .filter(|r| r.headers.get("range").map(String::as_str) != Some("bytes=0-0"))
            .filter_map(|r| {
                r.path
                    .split_once("/resolve/")
                    .map(|(_, rest)| rest.to_string())
            })
            .collect()
    }
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(&str, String)], body: &[u8]) {
    respond_claiming(stream, status, headers, body, body.len())
}

/// [`respond`] with a `Content-Length` that may differ from the body sent.
fn respond_claiming(
    stream: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
    content_length: usize,
) {
    let mut head =
        format!("HTTP/1.1 {status}\r\nContent-Length: {content_length}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
    let _ = stream.flush();
}

fn etag(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    format!("\"{h:016x}{:08x}\"", bytes.len())
}

fn serve(mut stream: TcpStream, repos: &HashMap<String, FakeRepo>, log: &Mutex<Vec<Request>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    log.lock().unwrap().push(Request {
        path: path.clone(),
        headers: headers.clone(),
    });
    let not_found = |s: &mut TcpStream, what: &str| {
        respond(
            s,
            "404 Not Found",
            &[("X-Error-Code", "RepoNotFound".into())],
            what.as_bytes(),
        )
    };

    // Split into repo id, revision and (for resolve) the file.
    let (repo_id, rev, file) = if let Some(rest) = path.strip_prefix("/api/models/") {
        match rest.split_once("/revision/") {
            Some((repo, rev)) => (repo.to_string(), rev.replace("%2F", "/"), None),
            None => return not_found(&mut stream, "bad api path"),
        }
    } else {
        let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
        if parts.len() != 5 || parts[2] != "resolve" {
            return not_found(&mut stream, "bad path");
        }
        (
            format!("{}/{}", parts[0], parts[1]),
            parts[3].replace("%2F", "/"),
            Some(parts[4].to_string()),
        )
    };
    let Some(repo) = repos.get(&repo_id) else {
        return not_found(&mut stream, "Repository not found");
    };
    match &repo.quirk {
        Some(Quirk::MovedTo(new_id)) => {
            let moved = path.replacen(&repo_id, new_id, 1);
            return respond(
                &mut stream,
                "307 Temporary Redirect",
                &[("Location", moved)],
                b"",
            );
        }
        Some(Quirk::EchoAuthInError) => {
            let auth = headers.get("authorization").cloned().unwrap_or_default();
            return respond(
                &mut stream,
                "500 Internal Server Error",
                &[(
                    "X-Error-Message",
                    format!("cannot check credentials {auth}"),
                )],
                b"oops",
            );
        }
        _ => {}
    }
    if let Some(tok) = &repo.gated_token {
        match headers.get("authorization") {
            None => return respond(&mut stream, "401 Unauthorized", &[], b"gated: log in"),
            Some(v) if *v != format!("Bearer {tok}") => {
                return respond(&mut stream, "403 Forbidden", &[], b"no access")
            }
            _ => {}
        }
    }
    let sha = match repo.refs.get(&rev) {
        Some(s) => s.clone(),
        None if repo.commits.contains_key(&rev) => rev.clone(),
        None => {
            return respond(
                &mut stream,
                "404 Not Found",
                &[("X-Error-Code", "RevisionNotFound".into())],
                b"Invalid rev id",
            )
        }
    };
    let files = &repo.commits[&sha];
    match file {
        None => {
            let siblings: Vec<serde_json::Value> = files
                .iter()
                .map(|(n, _)| serde_json::json!({ "rfilename": n }))
                .collect();
            let body = match &repo.quirk {
                Some(Quirk::InfoRedirectWithoutLocation) => {
                    return respond(&mut stream, "302 Found", &[], b"")
                }
                Some(Quirk::InfoBody(b)) => b.clone(),
                _ => serde_json::json!({ "id": repo_id, "sha": sha, "siblings": siblings })
                    .to_string(),
            };
            respond(
                &mut stream,
                "200 OK",
                &[("Content-Type", "application/json".into())],
                body.as_bytes(),
            );
        }
        Some(name) => {
            let Some((_, bytes)) = files.iter().find(|(n, _)| *n == name) else {
                return respond(
                    &mut stream,
                    "404 Not Found",
                    &[("X-Error-Code", "EntryNotFound".into())],
                    b"Entry not found",
                );
            };
            let size = bytes.len();
            // What the Hub says about the file before handing it to a CDN.
            let hub_headers = vec![
                ("X-Repo-Commit", sha.clone()),
                ("X-Linked-Etag", etag(bytes)),
                ("X-Linked-Size", size.to_string()),
            ];
            let redirect = |s: &mut TcpStream, location: Option<String>| {
                let mut h = hub_headers.clone();
                h.extend(location.map(|l| ("Location", l)));
                respond(s, "302 Found", &h, b"")
            };
            match &repo.quirk {
                Some(Quirk::RedirectFilesTo(base)) => {
                    return redirect(&mut stream, Some(format!("{base}{path}")))
                }
                Some(Quirk::FileRedirectWithoutLocation) => return redirect(&mut stream, None),
                Some(Quirk::FileRedirectTo(l)) => return redirect(&mut stream, Some(l.clone())),
                Some(Quirk::RedirectLoop) => return redirect(&mut stream, Some(path.clone())),
                _ => {}
            }
            let (start, end) = match headers.get("range").and_then(|r| r.strip_prefix("bytes=")) {
                Some(r) => {
                    let (a, b) = r.split_once('-').unwrap();
                    let a: usize = a.parse().unwrap();
                    let b: usize = if b.is_empty() {
                        size - 1
                    } else {
                        b.parse().unwrap()
                    };
                    (a, b.min(size - 1))
                }
                None => (0, size - 1),
            };
            let mut h = vec![
                ("ETag", etag(bytes)),
                ("Content-Range", format!("bytes {start}-{end}/{size}")),
            ];
            if let Some(Quirk::Etag(e)) = &repo.quirk {
                h[0].1 = e.clone();
            }
            if !matches!(repo.quirk, Some(Quirk::NoCommitHeader)) {
                h.push(("X-Repo-Commit", sha.clone()));
            }
            let body = &bytes[start..=end];
            let probe = headers.get("range").map(String::as_str) == Some("bytes=0-0");
            match &repo.quirk {
                Some(Quirk::TruncatedBody) if !probe => respond_claiming(
                    &mut stream,
                    "206 Partial Content",
                    &h,
                    &body[..body.len() / 2],
                    body.len(),
                ),
                Some(Quirk::WrongLength(delta)) if !probe => {
                    let mut b = body.to_vec();
                    b.resize((b.len() as isize + delta).max(0) as usize, b'x');
                    respond(&mut stream, "206 Partial Content", &h, &b)
                }
                _ => respond(&mut stream, "206 Partial Content", &h, body),
            }
        }
    }
}

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/llama")
}

/// The tiny llama fixture folder as repo files, plus files a trainer must not download.
fn llama_files() -> Vec<(String, Vec<u8>)> {
    let mut files: Vec<(String, Vec<u8>)> = std::fs::read_dir(fixture_dir())
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    files.push(("README.md".into(), b"# tiny llama\n".to_vec()));
    files.push(("original/consolidated.00.pth".into(), vec![0u8; 64]));
    files.sort();
    files
}

fn with_config(mut files: Vec<(String, Vec<u8>)>, config: &str) -> Vec<(String, Vec<u8>)> {
    for (n, b) in files.iter_mut() {
        if n == "config.json" {
            *b = config.as_bytes().to_vec();
        }
    }
    files
}

type Files = Vec<(String, Vec<u8>)>;

fn repo(refs: &[(&str, &str)], commits: Vec<(&str, Files)>) -> FakeRepo {
    FakeRepo {
        refs: refs
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect(),
        commits: commits
            .into_iter()
            .map(|(s, f)| (s.to_string(), f))
            .collect(),
        gated_token: None,
        quirk: None,
    }
}

fn opts(hub: &str, cache: &Path) -> HubOptions {
    HubOptions {
        endpoint: hub.to_string(),
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: false,
        progress: false,
        ollama: Default::default(),
    }
}

fn folder(r: ResolvedModel) -> loratune::hub::ModelFiles {
    match r {
        ResolvedModel::Folder(f) => f,
        other => panic!("expected a folder, got {other:?}"),
    }
}

#[test]
fn downloads_only_the_needed_files_into_the_hf_cache() {
    let hub = FakeHub::start(HashMap::from([(
        "tiny/llama".to_string(),
        repo(&[("main", SHA_A)], vec![(SHA_A, llama_files())]),
    )]));
    let home = tempfile::tempdir().unwrap();
    let o = HubOptions::from_lookup(|k| match k {
        "HF_HOME" => Some(home.path().to_string_lossy().to_string()),
        "HF_ENDPOINT" => Some(format!("{}/", hub.url)),
        _ => None,
    })
    .unwrap();
    assert_eq!(o.cache_dir, home.path().join("hub"));
    let f = folder(resolve_base_model("tiny/llama", None, &o).unwrap());

    // The standard cache layout: models--org--name/{refs,blobs,snapshots/<sha>}.
    let repo_dir = home.path().join("hub/models--tiny--llama");
    assert_eq!(f.dir, repo_dir.join("snapshots").join(SHA_A));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        SHA_A
    );
    assert_eq!(f.commit.as_deref(), Some(SHA_A));
    for (field, name) in [
        (Some(&f.config), "config.json"),
        (f.generation_config.as_ref(), "generation_config.json"),
        (f.tokenizer.as_ref(), "tokenizer.json"),
        (f.tokenizer_config.as_ref(), "tokenizer_config.json"),
        (f.weights.first(), "model.safetensors"),
    ] {
        let p = field.unwrap_or_else(|| panic!("{name} not resolved"));
        assert_eq!(p, &f.dir.join(name));
        assert_eq!(
            std::fs::read(p).unwrap(),
            std::fs::read(fixture_dir().join(name)).unwrap(),
            "{name}"
        );
    }
    assert_eq!(f.weights.len(), 1);
    assert!(
        f.weights_index.is_none() && f.special_tokens_map.is_none() && f.chat_template.is_none()
    );
    // As huggingface_hub lays it out: snapshot entries are relative links to blobs named by the ETag.
    #[cfg(unix)]
    {
        let bytes = std::fs::read(fixture_dir().join("config.json")).unwrap();
        let blob = Path::new("../../blobs").join(etag(&bytes).trim_matches('"'));
        assert_eq!(std::fs::read_link(&f.config).unwrap(), blob);
        assert!(repo_dir.join("snapshots").join(SHA_A).join(&blob).is_file());
        assert!(
            !std::fs::read_dir(repo_dir.join("blobs")).unwrap().any(|e| e
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".incomplete"))
        );
    }

    // Only what training needs was fetched, at the resolved sha, after one repo lookup.
    let reqs = hub.requests();
    assert_eq!(reqs[0].path, "/api/models/tiny/llama/revision/main");
    let mut got = hub.downloads();
    got.sort();
    let mut want: Vec<String> = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .map(|n| format!("{SHA_A}/{n}"))
    .collect();
    want.sort();
    assert_eq!(got, want);
    assert!(
        !reqs.iter().any(|r| r.path.contains("reference.safetensors")
            || r.path.contains("README")
            || r.path.contains(".pth"))
    );
    // Each file is probed with `Range: bytes=0-0` (etag, commit, size) before it is fetched.
    assert!(reqs.iter().any(|r| r.path.ends_with("/model.safetensors")
        && r.headers.get("range").map(String::as_str) == Some("bytes=0-0")));
    // No token configured → no Authorization header.
    assert!(reqs
        .iter()
        .all(|r| !r.headers.contains_key("authorization")));

    // A second online call is served from the cache: one more lookup, no file transfers.
    let n = hub.requests().len();
    let again = folder(resolve_base_model("tiny/llama", Some("main"), &o).unwrap());
    assert_eq!(again, f);
    let new: Vec<Request> = hub.requests()[n..].to_vec();
    assert_eq!(new.len(), 1, "{new:?}");
    assert!(new[0].path.starts_with("/api/models/"));
}

#[test]
fn second_call_works_offline() {
    let hub = FakeHub::start(HashMap::from([(
        "tiny/llama".to_string(),
        repo(&[("main", SHA_A)], vec![(SHA_A, llama_files())]),
    )]));
    let cache = tempfile::tempdir().unwrap();
    let online =
        folder(resolve_base_model("tiny/llama", None, &opts(&hub.url, cache.path())).unwrap());
    let n = hub.requests().len();

    // HF_HUB_OFFLINE=1: no request at all (the endpoint is even unreachable), same files.
    let mut off = opts("http://127.0.0.1:9", cache.path());
    off.offline = true;
    let offline = folder(resolve_base_model("tiny/llama", None, &off).unwrap());
    assert_eq!(offline, online);
    assert_eq!(hub.requests().len(), n);

    // Not offline but the hub is unreachable: falls back to the cached revision (as huggingface_hub does).
    let fallback = folder(
        resolve_base_model(
            "tiny/llama",
            Some("main"),
            &opts("http://127.0.0.1:9", cache.path()),
        )
        .unwrap(),
    );
    assert_eq!(fallback, online);
}

#[test]
fn offline_with_an_empty_cache_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let o = HubOptions::from_lookup(|k| match k {
        "HF_HUB_CACHE" => Some(cache.path().to_string_lossy().to_string()),
        "HOME" => Some("/nonexistent".into()),
        "HF_HUB_OFFLINE" => Some("1".into()),
        _ => None,
    })
    .unwrap();
    assert!(o.offline);
    let e = resolve_base_model("tiny/llama", None, &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("HF_HUB_OFFLINE is set"), "{e}");
    assert!(
        e.contains("`tiny/llama` (revision `main`) is not in the Hugging Face cache"),
        "{e}"
    );
    assert!(e.contains(&cache.path().display().to_string()), "{e}");
    assert!(e.contains("Unset HF_HUB_OFFLINE"), "{e}");
    // Unreachable hub and nothing cached: the network error, with the offline hint.
    let e = resolve_base_model(
        "tiny/llama",
        None,
        &opts("http://127.0.0.1:9", cache.path()),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("cannot reach http://127.0.0.1:9")
            && e.contains("not in the Hugging Face cache"),
        "{e}"
    );
}

#[test]
fn pinned_revision_is_honoured() {
    let old = with_config(llama_files(), "{\"which\": \"v1\"}");
    let new = with_config(llama_files(), "{\"which\": \"main\"}");
    let hub = FakeHub::start(HashMap::from([(
        "tiny/llama".to_string(),
        repo(
            &[("main", SHA_B), ("v1", SHA_A)],
            vec![(SHA_A, old), (SHA_B, new)],
        ),
    )]));
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub.url, cache.path());

    let v1 = folder(resolve_base_model("tiny/llama", Some("v1"), &o).unwrap());
    assert_eq!(
        std::fs::read_to_string(&v1.config).unwrap(),
        "{\"which\": \"v1\"}"
    );
    assert_eq!(v1.commit.as_deref(), Some(SHA_A));
    assert!(hub
        .requests()
        .iter()
        .any(|r| r.path == "/api/models/tiny/llama/revision/v1"));
    assert!(
        hub.downloads().iter().all(|d| d.starts_with(SHA_A)),
        "{:?}",
        hub.downloads()
    );

    let main = folder(resolve_base_model("tiny/llama", None, &o).unwrap());
    assert_eq!(
        std::fs::read_to_string(&main.config).unwrap(),
        "{\"which\": \"main\"}"
    );
    assert_ne!(main.dir, v1.dir);

    // A commit sha works as a revision, online and offline.
    let by_sha = folder(resolve_base_model("tiny/llama", Some(SHA_A), &o).unwrap());
    assert_eq!(by_sha.dir, v1.dir);
    let mut off = opts("http://127.0.0.1:9", cache.path());
    off.offline = true;
    assert_eq!(
        folder(resolve_base_model("tiny/llama", Some("v1"), &off).unwrap()).dir,
        v1.dir
    );
    assert_eq!(
        folder(resolve_base_model("tiny/llama", Some(SHA_A), &off).unwrap()).dir,
        v1.dir
    );
    assert!(resolve_base_model("tiny/llama", Some("v2"), &off).is_err());

    // An unknown revision is a 404 that names repo and revision.
    let e = resolve_base_model("tiny/llama", Some("nope"), &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not found (HTTP 404)")
            && e.contains("`tiny/llama`")
            && e.contains("revision `nope`"),
        "{e}"
    );
    let e = resolve_base_model("tiny/absent", None, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not found (HTTP 404)") && e.contains("check the repo id `tiny/absent`"),
        "{e}"
    );
}

#[test]
fn hf_token_is_sent_and_gated_models_explain_themselves() {
    let mut gated = repo(&[("main", SHA_A)], vec![(SHA_A, llama_files())]);
    gated.gated_token = Some("hf_secret".into());
    let hub = FakeHub::start(HashMap::from([("meta/gated".to_string(), gated)]));
    let cache = tempfile::tempdir().unwrap();

    // No token: 401 → the gated-model message.
    let e = resolve_base_model("meta/gated", None, &opts(&hub.url, cache.path()))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("access denied (HTTP 401; no token was sent)"),
        "{e}"
    );
    assert!(
        e.contains(&format!("accept its licence on {}/meta/gated", hub.url)),
        "{e}"
    );
    assert!(e.contains("set HF_TOKEN"), "{e}");

    // A token without access: 403.
    let mut o = opts(&hub.url, cache.path());
    o.token = Some("hf_other".into());
    let e = resolve_base_model("meta/gated", None, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("forbidden (HTTP 403)") && e.contains("Accept the licence"),
        "{e}"
    );

    // HF_TOKEN from the environment is sent as a bearer token on every request (hf-hub alone reads only
    // the token file), and it wins over the token file.
    let home = tempfile::tempdir().unwrap();
    std::fs::write(home.path().join("token"), "hf_from_file").unwrap();
    let o = HubOptions::from_lookup(|k| match k {
        "HF_HOME" => Some(home.path().to_string_lossy().to_string()),
        "HF_TOKEN" => Some("hf_secret".into()),
        "HF_ENDPOINT" => Some(hub.url.clone()),
        _ => None,
    })
    .unwrap();
    let n = hub.requests().len();
    let f = folder(resolve_base_model("meta/gated", None, &o).unwrap());
    assert!(f.config.is_file());
    let reqs = &hub.requests()[n..];
    assert!(reqs.len() >= 6);
    for r in reqs {
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some("Bearer hf_secret"),
            "{}",
            r.path
        );
    }
}

#[test]
fn unsupported_repos_say_why() {
    let cfg = ("config.json".to_string(), b"{}".to_vec());
    let pickle = vec![
        cfg.clone(),
        ("pytorch_model.bin".into(), vec![1u8; 16]),
        ("tokenizer.json".into(), b"{}".to_vec()),
    ];
    let adapter = vec![
        ("adapter_config.json".to_string(), b"{}".to_vec()),
        ("adapter_model.safetensors".into(), vec![0u8; 8]),
    ];
    let gguf = vec![("model-Q4_K_M.gguf".to_string(), vec![0u8; 8])];
    let index = serde_json::json!({
        "metadata": {"total_size": 16},
        "weight_map": {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors", "c.weight": "model-00001-of-00002.safetensors"}
    })
    .to_string();
    let sharded = vec![
        cfg.clone(),
        (
            "model.safetensors.index.json".into(),
            index.clone().into_bytes(),
        ),
        ("model-00001-of-00002.safetensors".into(), vec![1u8; 8]),
        ("model-00002-of-00002.safetensors".into(), vec![2u8; 8]),
        ("model-00003-of-00002.safetensors".into(), vec![3u8; 8]),
    ];
    let broken = vec![
        cfg,
        ("model.safetensors.index.json".into(), index.into_bytes()),
        ("model-00001-of-00002.safetensors".into(), vec![1u8; 8]),
    ];
    let hub = FakeHub::start(HashMap::from([
        (
            "o/pickle".to_string(),
            repo(&[("main", SHA_A)], vec![(SHA_A, pickle)]),
        ),
        (
            "o/adapter".to_string(),
            repo(&[("main", SHA_A)], vec![(SHA_A, adapter)]),
        ),
        (
            "o/gguf".to_string(),
            repo(&[("main", SHA_A)], vec![(SHA_A, gguf)]),
        ),
        (
            "o/sharded".to_string(),
            repo(&[("main", SHA_A)], vec![(SHA_A, sharded)]),
        ),
        (
            "o/broken".to_string(),
            repo(&[("main", SHA_A)], vec![(SHA_A, broken)]),
        ),
    ]));
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub.url, cache.path());
    let e = resolve_base_model("o/pickle", None, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("only has PyTorch pickle weights (pytorch_model.bin)")
            && e.contains("safetensors"),
        "{e}"
    );
    assert!(
        !hub.downloads().iter().any(|d| d.ends_with(".bin")),
        "pickles are never downloaded"
    );
    let e = resolve_base_model("o/adapter", None, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("is a LoRA adapter repo, not a base model"),
        "{e}"
    );
    let e = resolve_base_model("o/gguf", None, &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("holds GGUF files (model-Q4_K_M.gguf)"), "{e}");
    let e = resolve_base_model("o/broken", None, &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shard `model-00002-of-00002.safetensors` listed in model.safetensors.index.json is not in the repo"), "{e}");

    // Sharded: the index and exactly the shards it lists, in index order.
    let f = folder(resolve_base_model("o/sharded", None, &o).unwrap());
    let names: Vec<String> = f
        .weights
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    assert!(f.weights_index.is_some());
    assert!(!hub.downloads().iter().any(|d| d.contains("model-00003")));
    assert_eq!(std::fs::read(&f.weights[1]).unwrap(), vec![2u8; 8]);
}

#[test]
fn local_folders_and_gguf_files() {
    let f = folder(
        resolve_base_model(
            fixture_dir().to_str().unwrap(),
            None,
            &opts("http://127.0.0.1:9", Path::new("/nonexistent")),
        )
        .unwrap(),
    );
    assert_eq!(f.config, fixture_dir().join("config.json"));
    assert_eq!(f.weights, vec![fixture_dir().join("model.safetensors")]);
    assert_eq!(f.tokenizer, Some(fixture_dir().join("tokenizer.json")));
    assert!(f.commit.is_none());

    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("config.json"), "{}").unwrap();
    std::fs::write(t.path().join("pytorch_model.bin"), [0u8; 4]).unwrap();
    let o = opts("http://127.0.0.1:9", Path::new("/nonexistent"));
    let e = resolve_base_model(t.path().to_str().unwrap(), None, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("only has PyTorch pickle weights (pytorch_model.bin)"),
        "{e}"
    );
    std::fs::remove_file(t.path().join("config.json")).unwrap();
    let e = resolve_base_model(t.path().to_str().unwrap(), None, &o)
        .unwrap_err()
        .to_string();
    assert!(e.contains("has no config.json"), "{e}");

    let g = t.path().join("m.gguf");
    std::fs::write(&g, b"GGUF").unwrap();
    assert_eq!(
        resolve_base_model(g.to_str().unwrap(), None, &o).unwrap(),
        ResolvedModel::Gguf(g.clone())
    );
    assert_eq!(
        BaseModelRef::classify(g.to_str().unwrap(), None, true),
        Ok(BaseModelRef::Gguf(g))
    );
}

fn quirky(quirk: Quirk) -> FakeRepo {
    let mut r = repo(&[("main", SHA_A)], vec![(SHA_A, llama_files())]);
    r.quirk = Some(quirk);
    r
}

fn sorted_needed_files() -> Vec<String> {
    let mut want: Vec<String> = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    .iter()
    .map(|n| format!("{SHA_A}/{n}"))
    .collect();
    want.sort();
    want
}

#[test]
fn the_token_never_follows_a_redirect_to_another_host() {
    // A second server on another port plays the CDN: it serves the files without a token and logs what it gets.
    let cdn = FakeHub::start(HashMap::from([(
        "meta/gated".to_string(),
        repo(&[("main", SHA_A)], vec![(SHA_A, llama_files())]),
    )]));
    let mut gated = quirky(Quirk::RedirectFilesTo(cdn.url.clone()));
    gated.gated_token = Some("hf_secret".into());
    let hub = FakeHub::start(HashMap::from([("meta/gated".to_string(), gated)]));
    let cache = tempfile::tempdir().unwrap();
    let mut o = opts(&hub.url, cache.path());
    o.token = Some("hf_secret".into());

    let f = folder(resolve_base_model("meta/gated", None, &o).unwrap());
    for (name, p) in [
        ("config.json", &f.config),
        ("model.safetensors", &f.weights[0]),
        ("tokenizer.json", f.tokenizer.as_ref().unwrap()),
    ] {
        assert_eq!(
            std::fs::read(p).unwrap(),
            std::fs::read(fixture_dir().join(name)).unwrap(),
            "{name}"
        );
    }
    // The hub got the token on every request (repo lookup, probes, content requests) ...
    let at_hub = hub.requests();
    assert!(at_hub.len() >= 11, "{at_hub:?}");
    for r in &at_hub {
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some("Bearer hf_secret"),
            "{}",
            r.path
        );
    }
    // ... the other host served every file and never saw it.
    let mut got = cdn.downloads();
    got.sort();
    assert_eq!(got, sorted_needed_files());
    for r in cdn.requests() {
        assert!(
            !r.headers.contains_key("authorization"),
            "the token went to another host: {} {:?}",
            r.path,
            r.headers.get("authorization")
        );
    }

    // An error from the other host is reported as its answer, not as the repo's access rules.
    let empty_cdn = FakeHub::start(HashMap::new());
    let mut gated = quirky(Quirk::RedirectFilesTo(empty_cdn.url.clone()));
    gated.gated_token = Some("hf_secret".into());
    let hub = FakeHub::start(HashMap::from([("meta/gated".to_string(), gated)]));
    let fresh = tempfile::tempdir().unwrap();
    let e = resolve_base_model("meta/gated", None, &opts(&hub.url, fresh.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("HTTP 401"), "{e}");
    let e = resolve_base_model(
        "meta/gated",
        None,
        &HubOptions {
            endpoint: hub.url.clone(),
            cache_dir: fresh.path().to_path_buf(),
            ..o.clone()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("downloading `config.json`")
            && e.contains("127.0.0.1 (where the Hub redirected the request) answered HTTP 404")
            && !e.contains("at that revision"),
        "{e}"
    );
    assert!(empty_cdn
        .requests()
        .iter()
        .all(|r| !r.headers.contains_key("authorization")));
}

#[test]
fn same_host_redirects_keep_the_token() {
    // A renamed repo: the Hub answers 307 with a relative Location; the token must still be sent there.
    let mut gated = repo(&[("main", SHA_A)], vec![(SHA_A, llama_files())]);
    gated.gated_token = Some("hf_secret".into());
    let moved = FakeRepo {
        quirk: Some(Quirk::MovedTo("meta/new-name".into())),
        ..FakeRepo::default()
    };
    let hub = FakeHub::start(HashMap::from([
        ("meta/old-name".to_string(), moved),
        ("meta/new-name".to_string(), gated),
    ]));
    let cache = tempfile::tempdir().unwrap();
    let mut o = opts(&hub.url, cache.path());
    o.token = Some("hf_secret".into());
    let f = folder(resolve_base_model("meta/old-name", None, &o).unwrap());
    assert_eq!(
        f.dir,
        cache
            .path()
            .join("models--meta--old-name/snapshots")
            .join(SHA_A)
    );
    let reqs = hub.requests();
    assert!(reqs
        .iter()
        .any(|r| r.path.contains("/meta/old-name/resolve/")));
    assert!(reqs
        .iter()
        .any(|r| r.path.contains("/meta/new-name/resolve/")));
    for r in &reqs {
        assert_eq!(
            r.headers.get("authorization").map(String::as_str),
            Some("Bearer hf_secret"),
            "{}",
            r.path
        );
    }
}

#[test]
fn a_redirect_without_location_is_an_error_not_a_panic() {
    let hub = FakeHub::start(HashMap::from([
        (
            "o/file-302".to_string(),
            quirky(Quirk::FileRedirectWithoutLocation),
        ),
        (
            "o/info-302".to_string(),
            quirky(Quirk::InfoRedirectWithoutLocation),
        ),
    ]));
    let cache = tempfile::tempdir().unwrap();
    let o = opts(&hub.url, cache.path());
    let e = resolve_base_model("o/file-302", None, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("downloading `config.json` of `o/file-302`")
            && e.contains("HTTP 302")
            && e.contains("without a Location header"),
        "{e}"
    );
    let e = resolve_base_model("o/info-302", None, &o)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("looking up `o/info-302`") && e.contains("without a Location header"),
        "{e}"
    );
    assert!(!cache
        .path()
        .join("models--o--file-302/snapshots")
        .join(SHA_A)
        .join("config.json")
        .exists());
}

#[test]
fn credentials_never_appear_in_messages() {
    let mut gated = repo(&[("main", SHA_A)], vec![(SHA_A, llama_files())]);
    gated.gated_token = Some("hf_secret".into());
    let hub = FakeHub::start(HashMap::from([
        ("meta/gated".to_string(), gated),
        ("o/echo".to_string(), quirky(Quirk::EchoAuthInError)),
        (
            "tiny/llama".to_string(),
            repo(&[("main", SHA_A)], vec![(SHA_A, llama_files())]),
        ),
    ]));
    let with_userinfo = |url: &str| url.replacen("http://", "http://user:hunter2pw@", 1);
    let home = tempfile::tempdir().unwrap();
    let options = |endpoint: String, token: Option<&'static str>| {
        HubOptions::from_lookup(|k| match k {
            "HF_HOME" => Some(home.path().to_string_lossy().to_string()),
            "HF_ENDPOINT" => Some(endpoint.clone()),
            "HF_TOKEN" => token.map(str::to_string),
            _ => None,
        })
        .unwrap()
    };
    let shown = with_userinfo(&hub.url).replace("user:hunter2pw", "***");
    let clean = |e: &str| {
        assert!(
            !e.contains("hunter2pw") && !e.contains("hf_tok_SECRET"),
            "credential in: {e}"
        );
    };

    // A working endpoint with userinfo still works (and the token goes to it).
    let o = options(with_userinfo(&hub.url), Some("hf_tok_SECRET"));
    folder(resolve_base_model("tiny/llama", None, &o).unwrap());
    // Options print without secrets.
    clean(&format!("{o:?}"));

    // A 404 names the endpoint, redacted.
    let e = resolve_base_model("o/absent", None, &o)
        .unwrap_err()
        .to_string();
    clean(&e);
    assert!(
        e.contains(&format!("on {shown}")) && e.contains("HTTP 404"),
        "{e}"
    );
    // A 403 (a token without access) links to the repo page, redacted.
    let e = resolve_base_model("meta/gated", None, &o)
        .unwrap_err()
        .to_string();
    clean(&e);
    assert!(
        e.contains("HTTP 403") && e.contains(&format!("{shown}/meta/gated")),
        "{e}"
    );
    // Without a token the endpoint's userinfo goes as Basic auth (to the endpoint only), which the gated repo
    // refuses as well.
    let n = hub.requests().len();
    let e = resolve_base_model("meta/gated", None, &options(with_userinfo(&hub.url), None))
        .unwrap_err()
        .to_string();
    clean(&e);
    assert!(
        e.contains("HTTP 403") && e.contains(&format!("{shown}/meta/gated")),
        "{e}"
    );
    assert!(hub.requests()[n..].iter().all(|r| r
        .headers
        .get("authorization")
        .is_some_and(|a| a.starts_with("Basic "))));
    // A server message that echoes the Authorization header is shown without the token.
    let e = resolve_base_model("o/echo", None, &o)
        .unwrap_err()
        .to_string();
    clean(&e);
    assert!(e.contains("HTTP 500") && e.contains("Bearer ***"), "{e}");
    // An unreachable endpoint with userinfo.
    let e = resolve_base_model(
        "tiny/absent",
        None,
        &options(
            "http://user:hunter2pw@127.0.0.1:9".into(),
            Some("hf_tok_SECRET"),
        ),
    )
    .unwrap_err()
    .to_string();
    clean(&e);
    assert!(e.contains("cannot reach http://***@127.0.0.1:9"), "{e}");
}

#[test]
fn malformed_hub_answers_are_errors() {
    let info = |body: &str| quirky(Quirk::InfoBody(body.to_string()));
    let bad_sha = serde_json::json!({"sha": "../../../escaped", "siblings": [{"rfilename": "config.json"}, {"rfilename": "model.safetensors"}]}).to_string();
    let cases: Vec<(&str, FakeRepo, &str)> = vec![
        (
            "o/cut-json",
            info("{\"sha\": \"aaaa"),
            "not the expected JSON",
        ),
        (
            "o/html",
            info("<html>captive portal</html>"),
            "not the expected JSON",
        ),
        (
            "o/no-siblings",
            info(&format!("{{\"sha\": \"{SHA_A}\"}}")),
            "not the expected JSON",
        ),
        ("o/bad-sha", info(&bad_sha), "invalid commit id"),
        ("o/truncated", quirky(Quirk::TruncatedBody), "received"),
        ("o/short", quirky(Quirk::WrongLength(-3)), "received"),
        ("o/long", quirky(Quirk::WrongLength(5)), "more than"),
        (
            "o/no-commit",
            quirky(Quirk::NoCommitHeader),
            "X-Repo-Commit",
        ),
        (
            "o/evil-etag",
            quirky(Quirk::Etag("\"../../../escaped\"".into())),
            "ETag",
        ),
        (
            "o/loop",
            quirky(Quirk::RedirectLoop),
            "more than 10 redirects",
        ),
        (
            "o/ftp",
            quirky(Quirk::FileRedirectTo("ftp://127.0.0.1/x".into())),
            "unsupported scheme",
        ),
        (
            "o/bad-location",
            quirky(Quirk::FileRedirectTo("http://[::1".into())),
            "invalid Location",
        ),
    ];
    let hub = FakeHub::start(
        cases
            .iter()
            .map(|(id, r, _)| (id.to_string(), r.clone()))
            .collect(),
    );
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("x/cache");
    let o = opts(&hub.url, &cache);
    for (id, _, want) in &cases {
        let e = resolve_base_model(id, None, &o).unwrap_err().to_string();
        assert!(e.contains(want), "{id}: {e}");
        assert!(e.contains(&format!("`{id}`")), "{id}: {e}");
        let snapshot = cache
            .join(format!("models--{}", id.replace('/', "--")))
            .join("snapshots")
            .join(SHA_A);
        assert!(!snapshot.join("config.json").exists(), "{id}");
    }
    // TLS to a server that speaks plain HTTP: an error naming the endpoint, no panic.
    let e = resolve_base_model(
        "o/html",
        None,
        &opts(&hub.url.replace("http://", "https://"), &cache),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("cannot reach https://127.0.0.1:"), "{e}");
    // Nothing was written outside the cache (hostile ETag / commit id).
    assert!(!t.path().join("x/escaped").exists());
    assert!(!t.path().join("escaped").exists());
    assert!(!cache.join("escaped").exists());
}

#[test]
fn an_interrupted_download_resumes() {
    let cut = FakeHub::start(HashMap::from([(
        "tiny/llama".to_string(),
        quirky(Quirk::TruncatedBody),
    )]));
    let good = FakeHub::start(HashMap::from([(
        "tiny/llama".to_string(),
        repo(&[("main", SHA_A)], vec![(SHA_A, llama_files())]),
    )]));
    let cache = tempfile::tempdir().unwrap();
    let e = resolve_base_model("tiny/llama", None, &opts(&cut.url, cache.path()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("downloading `config.json`"), "{e}");
    let f = folder(resolve_base_model("tiny/llama", None, &opts(&good.url, cache.path())).unwrap());
    let config = std::fs::read(fixture_dir().join("config.json")).unwrap();
    assert_eq!(std::fs::read(&f.config).unwrap(), config);
    // The second hub was asked only for the rest of config.json.
    let half = config.len() / 2;
    let resumed: Vec<Request> = good
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/config.json"))
        .collect();
    assert!(
        resumed
            .iter()
            .any(|r| r.headers.get("range") == Some(&format!("bytes={half}-"))),
        "{resumed:?}"
    );
}
