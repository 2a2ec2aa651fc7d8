//! Atomic writes: files go to a temporary name in the same folder, are fsynced, then renamed; folders are
//! built under a temporary name and swapped in, so an interrupted export never leaves a half-written result
//! under the final name (and a previous result stays loadable until the new one is complete).

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
}

impl AtomicFile {
    /// Start writing `dest` (its folder must exist).
    pub fn create(dest: &Path) -> Result<Self> {
        let name = dest
            .file_name()
            .ok_or_else(|| Error::Export(format!("{}: not a file path", dest.display())))?
            .to_string_lossy()
            .to_string();
        let tmp = dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        Ok(AtomicFile {
            tmp,
            dest: dest.to_path_buf(),
            w: Some(BufWriter::with_capacity(1 << 20, f)),
        })
    }

    /// The writer.
    pub fn writer(&mut self) -> &mut BufWriter<File> {
        self.w.as_mut().expect("writer present until commit")
    }

    /// Flush, fsync and rename into place.
    pub fn commit(mut self) -> Result<()> {
        let w = self.w.take().expect("writer present until commit");
        let f = w
            .into_inner()
            .map_err(|e| Error::io(&self.tmp, e.into_error()))?;
        f.sync_all().map_err(|e| Error::io(&self.tmp, e))?;
        drop(f);
        fs::rename(&self.tmp, &self.dest).map_err(|e| Error::io(&self.dest, e))?;
        Ok(())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.w.is_some() {
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
        let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
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
        let old = self.dest.with_file_name(format!(
            ".{}.old-{}",
            self.dest
                .file_name()
                .map(|s| s.to_string_lossy().to_string())
                .unwrap_or_default(),
            std::process::id()
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
