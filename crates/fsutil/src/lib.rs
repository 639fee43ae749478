//! Data at rest. [`write_atomic`] (or [`AtomicFile`], its streaming form) is the one way
//! Quiver replaces a file (snapshots, keys, traffic state, offsets, the audit head…): write a
//! temporary file beside it, fsync it, rename it over the old one, fsync the directory. A
//! reader (or a crash) sees the old contents or the new, never a mix, and a completed call
//! survives power loss. [`seal`] encrypts what Quiver stores when `[storage]
//! encryption_key_file` is set.

pub mod seal;

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// Replaces `path` with `bytes`, atomically and durably.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut file = AtomicFile::create(path)?;
    file.write_all(bytes)?;
    file.commit()
}

/// A replacement of `path` written as a stream (a snapshot larger than memory should hold
/// twice): buffered into a temporary file beside `path`; [`AtomicFile::commit`] makes it
/// `path` the way [`write_atomic`] does. Dropped uncommitted, the temporary is removed and
/// `path` is untouched.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    dir: PathBuf,
    file: Option<BufWriter<File>>,
}

impl AtomicFile {
    pub fn create(path: &Path) -> std::io::Result<AtomicFile> {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir)?;
        let tmp = temporary_of(path)?;
        let file = File::create(&tmp)?;
        Ok(AtomicFile {
            path: path.to_path_buf(),
            tmp,
            dir: dir.to_path_buf(),
            file: Some(BufWriter::with_capacity(1 << 20, file)),
        })
    }

    /// fsyncs the contents, renames them over `path`, fsyncs the directory.
    pub fn commit(mut self) -> std::io::Result<()> {
        let file = self.file.take().expect("committed once");
        let file = file.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path)?;
        File::open(&self.dir)?.sync_all()
    }
}

/// The temporary an [`AtomicFile`] for `path` writes to, beside it.
fn temporary_of(path: &Path) -> std::io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other("a file path is needed"))?;
    Ok(path.with_file_name(format!(".{}.tmp", name.to_string_lossy())))
}

/// Removes the temporary a process killed in the middle of replacing `path` left behind
/// (dropped, an [`AtomicFile`] removes its own; `kill -9` gives it no chance). Returns whether
/// there was one. Only for when nothing can be writing `path`: at start-up, before its writer.
pub fn remove_abandoned(path: &Path) -> std::io::Result<bool> {
    match std::fs::remove_file(temporary_of(path)?) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("not committed").write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn replaces_the_whole_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        super::write_atomic(&p, b"first, longer contents").unwrap();
        super::write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_temporary_abandoned_mid_write_is_removed_and_the_file_kept() {
        use super::{remove_abandoned, write_atomic, AtomicFile};
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p-0000.snap");
        write_atomic(&path, b"old").unwrap();
        let mut half = AtomicFile::create(&path).unwrap();
        half.write_all(b"half of the new").unwrap();
        half.flush().unwrap();
        std::mem::forget(half); // what kill -9 does: no drop
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
        assert!(remove_abandoned(&path).unwrap());
        assert!(!remove_abandoned(&path).unwrap(), "nothing left to remove");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("p-0000.snap")]);
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
    }

    #[test]
    fn an_uncommitted_stream_leaves_the_old_file_and_no_temporary() {
        use std::io::Write;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p-0000.snap");
        super::write_atomic(&p, b"old").unwrap();
        let mut f = super::AtomicFile::create(&p).unwrap();
        f.write_all(&[7; 3 << 20]).unwrap();
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        let mut f = super::AtomicFile::create(&p).unwrap();
        f.write_all(b"new, streamed").unwrap();
        f.commit().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new, streamed");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
