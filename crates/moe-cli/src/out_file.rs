//! Files the `moe` command writes (`moe run --output`, `moe bench --json` and `--plot`): checked
//! before any work starts, so a long run cannot end in "cannot write", and written atomically, so
//! a failure leaves the old file (or none), never a half-written one.

use moe_hal::{Error, Result};
use std::path::{Path, PathBuf};

/// The directory `path` goes in (`.` for a bare file name).
fn dir_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A temporary name beside `path` that keeps its extension (the plot's backend picks SVG or PNG by
/// it), unique to this process.
fn temporary(path: &Path) -> Result<PathBuf> {
    let name = path.file_name().ok_or_else(|| Error::InvalidArgument(format!("{} is not a file name", path.display())))?;
    Ok(dir_of(path).join(format!(".tmp-{}-{}", std::process::id(), name.to_string_lossy())))
}

/// Fails, naming `flag` and the reason, unless a file can be written at `path`: its directory
/// exists and takes a new file (tried with an empty temporary file, removed again), and `path` is
/// not a directory.
pub fn check_writable(path: &Path, flag: &str) -> Result<()> {
    let what = || format!("{flag} {}", path.display());
    let dir = dir_of(path);
    if !dir.is_dir() {
        return moe_hal::invalid!("{}: the directory {} does not exist", what(), dir.display());
    }
    if path.is_dir() {
        return moe_hal::invalid!("{}: is a directory; name a file", what());
    }
    let probe = temporary(path)?;
    std::fs::File::create(&probe).map_err(|e| Error::Io(format!("{}: cannot create a file in {}: {e}", what(), dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes `path` atomically: `write` fills a temporary file beside it, which is synced and renamed
/// over `path` only once complete. On any failure the temporary file is removed and `path` is
/// untouched.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temporary(path)?;
    let io = |e: std::io::Error| Error::Io(format!("cannot write {}: {e}", path.display()));
    let result = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// [`write_atomic`] of bytes already in memory.
pub fn write_bytes(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic(path, |tmp| std::fs::write(tmp, bytes).map_err(|e| Error::Io(format!("cannot write {}: {e}", path.display()))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moe-out-file-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_missing_directory_or_a_directory_is_refused_before_any_work() {
        let d = scratch_dir("check");
        let e = check_writable(&d.join("no/such/x.json"), "--json").unwrap_err().to_string();
        assert!(e.contains("--json") && e.contains("does not exist"), "{e}");
        let e = check_writable(&d, "--plot").unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        check_writable(&d.join("x.json"), "--json").unwrap();
        // The probe leaves nothing behind.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let d = scratch_dir("atomic");
        let path = d.join("out.svg");
        write_bytes(&path, b"old").unwrap();
        let e = write_atomic(&path, |tmp| {
            assert_eq!(tmp.extension().and_then(|e| e.to_str()), Some("svg"), "the extension survives");
            std::fs::write(tmp, b"half").unwrap();
            moe_hal::invalid!("the writer failed")
        });
        assert!(e.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1, "only out.svg");
        write_bytes(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        let _ = std::fs::remove_dir_all(&d);
    }
}
