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
        let name = path
            .file_name()
            .ok_or_else(|| std::io::Error::other("a file path is needed"))?;
        let tmp = dir.join(format!(".{}.tmp", name.to_string_lossy()));
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
