//! The Hugging Face cache, laid out as huggingface_hub (and hf-hub) lay it out, so caches are shared with
//! Python both ways:
//!
//! ```text
//! <cache>/models--org--name/refs/<revision>            the commit sha a branch/tag resolved to (no newline)
//! <cache>/models--org--name/blobs/<etag>               file contents, named by the Hub's ETag
//! <cache>/models--org--name/blobs/<etag>.incomplete    a download in progress (resumed from its length)
//! <cache>/models--org--name/snapshots/<sha>/<file>     relative symlink to ../../blobs/<etag>
//! <cache>/.locks/models--org--name/<etag>.lock         held (flock) while a blob is written
//! ```
//!
//! Everything a server chooses and that becomes a path (ETag, commit sha, file names) is checked first.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::http::{header, shorten, Client, FetchError};

/// `models--org--name`.
pub(crate) fn repo_folder(repo_id: &str) -> String {
    format!("models--{}", repo_id.replace('/', "--"))
}

/// Whether `s` can be a commit id in a path: 40 (sha1) or 64 (sha256) hex digits.
pub(crate) fn is_commit_id(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.chars().all(|c| c.is_ascii_hexdigit())
}

/// Whether `file` is a relative path inside a repo: `/`-separated, no empty, `.` or `..` segment, no `\`.
pub(crate) fn is_repo_path(file: &str) -> bool {
    !file.is_empty()
        && !file.contains('\\')
        && !file.contains('\0')
        && file
            .split('/')
            .all(|seg| !seg.is_empty() && seg != "." && seg != "..")
}

/// The ETag as a blob name (quotes and a weak `W/` prefix removed, as huggingface_hub does), if it is safe as
/// one: 1–128 of `A-Z a-z 0-9 - _ .`, not starting with `.`.
pub(crate) fn blob_name(etag: &str) -> Option<String> {
    let e = etag.trim();
    let e = e.strip_prefix("W/").unwrap_or(e).trim_matches('"');
    let ok = !e.is_empty()
        && e.len() <= 128
        && !e.starts_with('.')
        && e.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    ok.then(|| e.to_string())
}

/// One repo's folder in the cache.
pub(crate) struct RepoCache {
    cache_dir: PathBuf,
    folder: String,
}

impl RepoCache {
    pub fn new(cache_dir: &Path, repo_id: &str) -> RepoCache {
        RepoCache {
            cache_dir: cache_dir.to_path_buf(),
            folder: repo_folder(repo_id),
        }
    }

    pub fn dir(&self) -> PathBuf {
        self.cache_dir.join(&self.folder)
    }

    /// `snapshots/<sha>/<file>` (both checked by the caller).
    pub fn pointer(&self, sha: &str, file: &str) -> PathBuf {
        let mut p = self.dir().join("snapshots").join(sha);
        p.extend(file.split('/'));
        p
    }

    fn blobs(&self) -> PathBuf {
        self.dir().join("blobs")
    }

    /// Record that `revision` is at `sha` (`refs/<revision>`; the revision is checked by the caller).
    pub fn write_ref(&self, revision: &str, sha: &str) -> Result<(), FetchError> {
        let mut path = self.dir().join("refs");
        path.extend(revision.split('/'));
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| FetchError::io(parent, e))?;
        }
        std::fs::write(&path, sha).map_err(|e| FetchError::io(&path, e))
    }
}

/// What the probe learns about a file.
struct FileMeta {
    /// The blob name (a checked ETag).
    blob: String,
    size: u64,
}

/// `snapshots/<sha>/<file>` of `cache`, downloading it from `url` (the file at `sha` on the endpoint) unless it
/// is there. A blob already present (the same file in another commit) is linked, not fetched again.
pub(crate) fn fetch_file(
    client: &Client,
    url: &str,
    cache: &RepoCache,
    sha: &str,
    file: &str,
    progress: bool,
) -> Result<PathBuf, FetchError> {
    if !is_repo_path(file) {
        return Err(FetchError::Malformed(format!(
            "`{}` is not a file name inside the repo",
            shorten(file, 200)
        )));
    }
    let pointer = cache.pointer(sha, file);
    if pointer.is_file() {
        return Ok(pointer);
    }
    let meta = probe(client, url, sha)?;
    let blobs = cache.blobs();
    let blob = blobs.join(&meta.blob);
    let complete =
        |p: &Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.len() == meta.size);
    if !complete(&blob) {
        let lock_path = cache
            .cache_dir
            .join(".locks")
            .join(&cache.folder)
            .join(format!("{}.lock", meta.blob));
        let _lock = lock(&lock_path)?;
        // Another process may have finished it while we waited.
        if !complete(&blob) {
            std::fs::create_dir_all(&blobs).map_err(|e| FetchError::io(&blobs, e))?;
            let part = blobs.join(format!("{}.incomplete", meta.blob));
            transfer(client, url, &part, meta.size, file, progress)?;
            std::fs::rename(&part, &blob).map_err(|e| FetchError::io(&blob, e))?;
        }
    }
    link(&blob, &pointer, &meta.blob, file)?;
    Ok(pointer)
}

/// `Range: bytes=0-0`: the commit (`X-Repo-Commit`), the blob name (`X-Linked-Etag` or `ETag`) and the size
/// (`X-Linked-Size`, else the `Content-Range` total, else `Content-Length` of a plain 200), all read from the
/// Hub's own answer where it redirects to a CDN.
fn probe(client: &Client, url: &str, sha: &str) -> Result<FileMeta, FetchError> {
    let answer = client
        .get(
            url,
            &[("Range", "bytes=0-0"), ("Accept-Encoding", "identity")],
        )?
        .success()?;
    let hub = &answer.hub_headers;
    let last = answer.response.headers();
    let commit = header(hub, "x-repo-commit").ok_or_else(|| {
        FetchError::Malformed(
            "the answer has no X-Repo-Commit header (is HF_ENDPOINT a Hugging Face Hub?)".into(),
        )
    })?;
    if !commit.eq_ignore_ascii_case(sha) {
        return Err(FetchError::Malformed(format!(
            "asked for commit {sha}, the Hub answered for `{}`",
            shorten(commit, 80)
        )));
    }
    let etag = header(hub, "x-linked-etag")
        .or_else(|| header(hub, "etag"))
        .ok_or_else(|| FetchError::Malformed("the answer has no ETag header".into()))?;
    let blob = blob_name(etag).ok_or_else(|| {
        FetchError::Malformed(format!(
            "the answer's ETag `{}` is not usable as a file name",
            shorten(etag, 80)
        ))
    })?;
    let number = |name: &str, v: &str| {
        v.parse::<u64>().map_err(|_| {
            FetchError::Malformed(format!("invalid {name} header `{}`", shorten(v, 80)))
        })
    };
    let size = if let Some(s) = header(hub, "x-linked-size") {
        number("X-Linked-Size", s)?
    } else if let Some(cr) = header(last, "content-range") {
        number("Content-Range", cr.rsplit('/').next().unwrap_or(""))?
    } else if let (200, Some(cl)) = (answer.status(), header(last, "content-length")) {
        number("Content-Length", cl)?
    } else {
        return Err(FetchError::Malformed(
            "the answer gives no file size (X-Linked-Size, Content-Range or Content-Length)".into(),
        ));
    };
    Ok(FileMeta { blob, size })
}

/// Download into `part` (appending to what an interrupted run left), exactly `size` bytes.
fn transfer(
    client: &Client,
    url: &str,
    part: &Path,
    size: u64,
    file: &str,
    progress: bool,
) -> Result<(), FetchError> {
    let io = |e| FetchError::io(part, e);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(part)
        .map_err(io)?;
    let mut start = out.metadata().map_err(io)?.len();
    if start > size {
        out.set_len(0).map_err(io)?;
        start = 0;
    }
    if start == size && size > 0 {
        return Ok(());
    }
    let range = format!("bytes={start}-");
    let mut headers = vec![("Accept-Encoding", "identity")];
    if start > 0 {
        headers.push(("Range", &range));
    }
    let answer = client.get(url, &headers)?.success()?;
    match answer.status() {
        200 if start > 0 => {
            // The server sent the whole file instead of the rest.
            out.set_len(0).map_err(io)?;
            start = 0;
        }
        200 => {}
        206 => {
            let from = header(answer.response.headers(), "content-range")
                .and_then(|cr| cr.strip_prefix("bytes "))
                .and_then(|cr| cr.split('-').next())
                .and_then(|a| a.trim().parse::<u64>().ok());
            if from != Some(start) {
                return Err(FetchError::Malformed(format!(
                    "asked for bytes {start}- and got a partial answer that does not start there"
                )));
            }
        }
        s => {
            return Err(FetchError::Malformed(format!(
                "unexpected HTTP {s} for the file contents"
            )))
        }
    }
    let bar = progress.then(|| progress_bar(size, start, file));
    let mut reader = answer.response.into_body().into_reader();
    let mut buf = vec![0u8; 1 << 16];
    let mut got = start;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = out.flush();
                return Err(FetchError::Truncated {
                    got,
                    want: size,
                    cause: Some(e.to_string()),
                });
            }
        };
        if got + n as u64 > size {
            // Not the file the probe described: keep nothing of it.
            drop(out);
            let _ = std::fs::remove_file(part);
            return Err(FetchError::Malformed(format!(
                "the Hub sent more than the {size} bytes it announced"
            )));
        }
        out.write_all(&buf[..n]).map_err(io)?;
        got += n as u64;
        if let Some(b) = &bar {
            b.set_position(got);
        }
    }
    out.flush().map_err(io)?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    if got != size {
        return Err(FetchError::Truncated {
            got,
            want: size,
            cause: None,
        });
    }
    Ok(())
}

fn progress_bar(size: u64, start: u64, file: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(size);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} [{elapsed_precise}] [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ({eta})",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let name: String = if file.chars().count() > 30 {
        let tail: Vec<char> = file.chars().rev().take(30).collect();
        format!("..{}", tail.into_iter().rev().collect::<String>())
    } else {
        file.to_string()
    };
    bar.set_message(name);
    bar.set_position(start);
    bar
}

/// An exclusive lock on `path` (released when dropped; `flock`, as Python's filelock takes it).
struct Lock {
    _file: std::fs::File,
}

fn lock(path: &Path) -> Result<Lock, FetchError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| FetchError::io(parent, e))?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| FetchError::io(path, e))?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: flock on a file descriptor this function owns for the duration of the call.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(FetchError::io(path, e));
            }
        }
    }
    Ok(Lock { _file: file })
}

/// Point `snapshots/<sha>/<file>` at the blob: a relative symlink (`../../blobs/<etag>`, one more `..` per
/// folder in `file`) as huggingface_hub makes it; where symlinks are not available, a copy.
fn link(blob: &Path, pointer: &Path, blob_name: &str, file: &str) -> Result<(), FetchError> {
    let parent = pointer.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| FetchError::io(parent, e))?;
    if pointer.is_file() {
        return Ok(());
    }
    if pointer.symlink_metadata().is_ok() {
        // A dangling link (its blob was deleted): replace it.
        std::fs::remove_file(pointer).map_err(|e| FetchError::io(pointer, e))?;
    }
    let mut target = PathBuf::new();
    for _ in 0..2 + file.matches('/').count() {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob_name);
    #[cfg(unix)]
    let made = {
        let _ = blob; // only the copy fallbacks read it
        std::os::unix::fs::symlink(&target, pointer)
    };
    #[cfg(windows)]
    let made = std::os::windows::fs::symlink_file(&target, pointer)
        .or_else(|_| std::fs::copy(blob, pointer).map(|_| ()));
    #[cfg(not(any(unix, windows)))]
    let made = std::fs::copy(blob, pointer).map(|_| ());
    match made {
        Ok(()) => Ok(()),
        // Another process linked it first.
        Err(_) if pointer.is_file() => Ok(()),
        Err(e) => Err(FetchError::io(pointer, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_from_the_server_are_checked() {
        assert_eq!(blob_name("\"abc123\"").as_deref(), Some("abc123"));
        assert_eq!(blob_name("W/\"a1-b2\"").as_deref(), Some("a1-b2"));
        for bad in ["", "\"\"", "../x", "a/b", ".hidden", "a b", "a\\b"] {
            assert_eq!(blob_name(bad), None, "{bad}");
        }
        assert!(is_commit_id(&"a".repeat(40)) && is_commit_id(&"0".repeat(64)));
        assert!(!is_commit_id("../../x") && !is_commit_id(&"g".repeat(40)) && !is_commit_id("abc"));
        assert!(is_repo_path("config.json") && is_repo_path("original/params.json"));
        for bad in ["", "/etc/passwd", "a/../b", "./a", "a//b", "a\\b", ".."] {
            assert!(!is_repo_path(bad), "{bad}");
        }
    }

    #[test]
    fn layout_matches_huggingface_hub() {
        let c = RepoCache::new(Path::new("/c"), "org/name");
        assert_eq!(c.dir(), Path::new("/c/models--org--name"));
        assert_eq!(
            c.pointer("abc", "sub/f.json"),
            Path::new("/c/models--org--name/snapshots/abc/sub/f.json")
        );
        assert_eq!(repo_folder("gpt2"), "models--gpt2");
    }

    #[cfg(unix)]
    #[test]
    fn snapshot_links_are_relative() {
        let t = tempfile::tempdir().unwrap();
        let c = RepoCache::new(t.path(), "o/n");
        std::fs::create_dir_all(c.blobs()).unwrap();
        let blob = c.blobs().join("e1");
        std::fs::write(&blob, b"x").unwrap();
        for file in ["a.json", "sub/b.json"] {
            let p = c.pointer("s", file);
            link(&blob, &p, "e1", file).unwrap();
            assert_eq!(std::fs::read(&p).unwrap(), b"x");
            let target = std::fs::read_link(&p).unwrap();
            assert!(target.is_relative(), "{target:?}");
            // Idempotent.
            link(&blob, &p, "e1", file).unwrap();
        }
        assert_eq!(
            std::fs::read_link(c.pointer("s", "sub/b.json")).unwrap(),
            Path::new("../../../blobs/e1")
        );
    }
}
