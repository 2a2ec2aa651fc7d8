//! Atomic writes: files go to a temporary name in the same folder, are fsynced, then renamed; folders are
//! built under a temporary name and swapped in, so an interrupted export never leaves a half-written result
//! under the final name (and a previous result stays loadable until the new one is complete). Every failure
//! path removes the temporary; what a killed process left behind is recognised by its name
//! ([`staging_owner`]) and removed by the next run ([`remove_stale_staging`]).

use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A file being written under a temporary name; `commit` fsyncs and renames it into place.
/// Dropped without commit, the temporary file is removed.
pub struct AtomicFile {
    tmp: PathBuf,
    dest: PathBuf,
    w: Option<BufWriter<File>>,
    committed: bool,
}

impl AtomicFile {
    /// Start writing `dest` (its folder must exist).
    pub fn create(dest: &Path) -> Result<Self> {
        let name = dest
            .file_name()
            .ok_or_else(|| Error::Export(format!("{}: not a file path", dest.display())))?
            .to_string_lossy()
            .to_string();
        let tmp = dest.with_file_name(staging_name(&name, "tmp"));
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            tmp,
            dest: dest.to_path_buf(),
            w: Some(BufWriter::with_capacity(1 << 20, f)),
            committed: false,
        })
    }

    /// The writer.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.w.as_mut().expect("writer present until commit")
    }

    /// Flush, fsync and rename into place. On any failure the temporary file is removed (by `Drop`).
    pub fn commit(mut self) -> Result<()> {
        let w = self.w.take().expect("writer present until commit");
        let f = w
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(f);
        fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if !self.committed {
            // Close the file before removing it (a no-op when commit already took the writer).
            self.w = None;
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Write a whole small file atomically.
pub fn write_atomic(dest: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = AtomicFile::create(dest)?;
    f.writer()
        .write_all(bytes)
        .map_err(|e| Error::io(dest, e))?;
    f.commit()
}

/// A folder being built under a temporary name next to its destination; `commit` swaps it in.
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    committed: bool,
}

impl AtomicDir {
    /// Start building `dest` (its parent is created if needed).
    pub fn create(dest: &Path) -> Result<Self> {
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        let name = dest
            .file_name()
            .ok_or_else(|| Error::Export(format!("{}: not a folder path", dest.display())))?
            .to_string_lossy()
            .to_string();
        let tmp = parent.join(staging_name(&name, "tmp"));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicDir {
            tmp,
            dest: dest.to_path_buf(),
            committed: false,
        })
    }

    /// Where to write the folder's files now.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Replace `dest` with the finished folder. The old folder (if any) is removed only after the new one
    /// is in place under its final name.
    pub fn commit(mut self) -> Result<()> {
        // fsync the files' directory entries.
        if let Ok(d) = File::open(&self.tmp) {
            let _ = d.sync_all();
        }
        let old = self.dest.with_file_name(staging_name(
            &self
                .dest
                .file_name()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default(),
            "old",
        ));
        let had_old = self.dest.exists();
        if had_old {
            fs::rename(&self.dest, &old).map_err(|e| Error::io(&self.dest, e))?;
        }
        if let Err(e) = fs::rename(&self.tmp, &self.dest) {
            if had_old {
                let _ = fs::rename(&old, &self.dest);
            }
            return Err(Error::io(&self.dest, e));
        }
        if had_old {
            let _ = fs::remove_dir_all(&old);
        }
        self.committed = true;
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// The temporary name this process stages `name` under: `.{name}.{kind}-{pid}` (`kind` is `tmp` for what is
/// being written, `old` for a folder being replaced).
pub fn staging_name(name: &str, kind: &str) -> String {
    format!(".{name}.{kind}-{}", std::process::id())
}

/// The process id a staging entry belongs to, read from its name: `….tmp-PID`, `….old-PID` (see
/// [`staging_name`]) or `….tmp-PID-N` (the data cache's build folders). `None` for any other name.
pub fn staging_owner(file_name: &str) -> Option<u32> {
    let (i, len) = [".tmp-", ".old-"]
        .iter()
        .filter_map(|m| file_name.rfind(m).map(|i| (i, m.len())))
        .max()?;
    let rest = &file_name[i + len..];
    let pid = match rest.split_once('-') {
        Some((pid, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => pid,
        Some(_) => return None,
        None => rest,
    };
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    pid.parse().ok()
}

/// Whether process `pid` is running. Known on Linux (`/proc`); elsewhere every process counts as running, so
/// nothing of a live process is ever removed.
pub fn process_alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return true;
    }
    proc.join(pid.to_string()).exists()
}

/// Remove the staging entries in `dir` (and in its sub-folders, one level down) that another process left
/// behind: when `exclusive` (the caller holds `dir`'s lock, so no other process writes there) every
/// [`staging_name`] of another process, else only those whose process is no longer running. Returns what was
/// removed.
pub fn remove_stale_staging(dir: &Path, exclusive: bool) -> Vec<PathBuf> {
    fn scan(dir: &Path, exclusive: bool, depth: u32, removed: &mut Vec<PathBuf>) {
        let Ok(entries) = fs::read_dir(dir) else {
            return;
        };
        let me = std::process::id();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false);
            match staging_owner(&name) {
                // Under the lock, our own staging names (leading dot) are surely abandoned; anything else (a
                // data cache kept inside the folder) only once its process is gone.
                Some(pid)
                    if pid != me
                        && ((exclusive && name.starts_with('.')) || !process_alive(pid)) =>
                {
                    let gone = if is_dir {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_file(&path)
                    };
                    if gone.is_ok() {
                        removed.push(path);
                    }
                }
                Some(_) => {}
                None if is_dir && depth > 0 => scan(&path, exclusive, depth - 1, removed),
                None => {}
            }
        }
    }
    let mut removed = Vec::new();
    scan(dir, exclusive, 1, &mut removed);
    removed
}

/// An exclusive advisory lock on a folder (`dir/.lock`), held until dropped; the operating system releases it
/// when the holder dies, so a killed run never leaves a stale lock. The file records the holder's pid for the
/// message a second process gets.
pub struct FolderLock {
    file: File,
    path: PathBuf,
}

impl FolderLock {
    /// Lock `dir` (created if needed) or fail at once with [`Error::RunFolderBusy`] naming the holder. Where the
    /// file system has no locks (some network file systems), `Ok(None)`: the caller should warn.
    pub fn acquire(dir: &Path) -> Result<Option<FolderLock>> {
        use std::fs::TryLockError;
        use std::io::{Read, Seek};
        fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let path = dir.join(".lock");
        let mut file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                return Err(Error::RunFolderBusy {
                    dir: dir.to_path_buf(),
                    pid: text.trim().parse().ok(),
                });
            }
            Err(TryLockError::Error(e)) if e.kind() == std::io::ErrorKind::Unsupported => {
                return Ok(None)
            }
            Err(TryLockError::Error(e)) => return Err(Error::io(&path, e)),
        }
        file.set_len(0).map_err(|e| Error::io(&path, e))?;
        file.rewind().map_err(|e| Error::io(&path, e))?;
        writeln!(file, "{}", std::process::id()).map_err(|e| Error::io(&path, e))?;
        file.sync_all().map_err(|e| Error::io(&path, e))?;
        Ok(Some(FolderLock { file, path }))
    }

    /// Whether a live process holds `dir`'s lock (a running `train`), without touching the lock file.
    pub fn is_held(dir: &Path) -> bool {
        use std::fs::TryLockError;
        let Ok(file) = fs::File::open(dir.join(".lock")) else {
            return false;
        };
        let held = matches!(file.try_lock_shared(), Err(TryLockError::WouldBlock));
        let _ = file.unlock();
        held
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for FolderLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_names_are_recognised() {
        assert_eq!(staging_owner(".model.gguf.tmp-4242"), Some(4242));
        assert_eq!(staging_owner(".checkpoint-20.tmp-17"), Some(17));
        assert_eq!(staging_owner(".adapter.old-9"), Some(9));
        assert_eq!(staging_owner("3f2a9c.tmp-123-0"), Some(123));
        let mine = staging_name("adapter", "tmp");
        assert_eq!(staging_owner(&mine), Some(std::process::id()));
        for other in [
            "checkpoint-20",
            "adapter",
            "a.tmp",
            "x.tmp-",
            "x.tmp-12a",
            "x.tmp-1-",
            ".lock",
        ] {
            assert_eq!(staging_owner(other), None, "{other}");
        }
    }

    #[test]
    fn a_failed_commit_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // The destination is a non-empty folder: the final rename fails after flush and fsync.
        let dest = dir.path().join("m.gguf");
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("keep"), b"x").unwrap();
        let mut f = AtomicFile::create(&dest).unwrap();
        f.writer().write_all(&[7u8; 4096]).unwrap();
        assert!(f.commit().is_err());
        let left: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        assert_eq!(
            left,
            vec!["m.gguf".to_string()],
            "temporary file left behind"
        );
    }

    #[test]
    fn stale_staging_of_dead_processes_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        // pid 4194304 is above Linux's pid_max limit, so never a running process.
        let dead = 4_194_304u32;
        fs::create_dir(d.join(format!(".checkpoint-4.tmp-{dead}"))).unwrap();
        fs::write(d.join(format!(".checkpoint-4.tmp-{dead}/x")), b"x").unwrap();
        fs::create_dir(d.join("ollama")).unwrap();
        fs::write(d.join(format!("ollama/.model.gguf.tmp-{dead}")), b"x").unwrap();
        fs::write(d.join(staging_name("mine", "tmp")), b"x").unwrap();
        fs::create_dir(d.join("checkpoint-2")).unwrap();
        let mut removed = remove_stale_staging(d, false);
        removed.sort();
        if process_alive(dead) {
            // Not Linux: nothing can be known dead, so nothing is removed unless the folder is locked.
            assert!(removed.is_empty());
            removed = remove_stale_staging(d, true);
        }
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(d.join("checkpoint-2").is_dir());
        assert!(
            d.join(staging_name("mine", "tmp")).exists(),
            "our own staging is kept"
        );
    }

    #[test]
    fn a_second_lock_on_a_folder_fails_naming_the_holder() {
        let dir = tempfile::tempdir().unwrap();
        let Some(held) = FolderLock::acquire(dir.path()).unwrap() else {
            return; // no advisory locks on this file system
        };
        match FolderLock::acquire(dir.path()) {
            Err(Error::RunFolderBusy { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected RunFolderBusy, got {:?}", other.map(|_| ())),
        }
        drop(held);
        assert!(
            FolderLock::acquire(dir.path()).unwrap().is_some(),
            "released on drop"
        );
    }
}
