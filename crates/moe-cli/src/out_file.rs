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

/// Where writing `path` goes: `path` itself, or for a symbolic link the file it names (written
/// through, so the link stays a link; a dangling link's target is created).
fn resolve(path: &Path) -> PathBuf {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => match std::fs::canonicalize(path) {
            Ok(p) => p,
            Err(_) => std::fs::read_link(path).map(|t| dir_of(path).join(t)).unwrap_or_else(|_| path.to_path_buf()),
        },
        _ => path.to_path_buf(),
    }
}

/// Whether `path` exists and is neither a regular file nor a directory: a device (`/dev/null`,
/// `/dev/stdout`), a FIFO or a socket. Such a file is written in place, never replaced: a rename
/// over it would put a regular file where the device or pipe was.
fn is_special(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

/// Whether `a` and `b` are the same existing file (through links and relative paths).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Fails, naming `flag` and the reason, unless a file can be written at `path`: its directory
/// exists and takes a new file (tried with an empty temporary file, removed again), and `path` is
/// not a directory. A symbolic link is checked (and later written) as the file it names; a device
/// or a FIFO is written in place.
pub fn check_writable(path: &Path, flag: &str) -> Result<()> {
    let real = resolve(path);
    let what = || {
        if real == path {
            format!("{flag} {}", path.display())
        } else {
            format!("{flag} {} (a link to {})", path.display(), real.display())
        }
    };
    if is_special(&real) {
        return Ok(());
    }
    let dir = dir_of(&real);
    if !dir.is_dir() {
        if dir.exists() {
            return moe_hal::invalid!("{}: {} is not a directory", what(), dir.display());
        }
        return moe_hal::invalid!("{}: the directory {} does not exist", what(), dir.display());
    }
    if real.is_dir() {
        return moe_hal::invalid!("{}: is a directory; name a file", what());
    }
    let probe = temporary(&real)?;
    std::fs::File::create(&probe).map_err(|e| Error::Io(format!("{}: cannot create a file in {}: {e}", what(), dir.display())))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Writes `path` atomically: `write` fills a temporary file beside it, which is synced and renamed
/// over `path` only once complete. On any failure the temporary file is removed and `path` is
/// untouched. A symbolic link is written through (its target replaced, the link kept); a device
/// or a FIFO is written in place, by `write` itself (`/dev/stdout` gets the bytes, `/dev/null`
/// stays a device).
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let real = resolve(path);
    if is_special(&real) {
        return write(&real);
    }
    let tmp = temporary(&real)?;
    let io = |e: std::io::Error| Error::Io(format!("cannot write {}: {e}", path.display()));
    let result = write(&tmp).and_then(|()| {
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, &real).map_err(io)
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

    /// A device stays a device (a rename over /dev/null, as root, would put a regular file
    /// there), a FIFO gets the bytes in place, and a link is written through and stays a link.
    #[cfg(unix)]
    #[test]
    fn devices_fifos_and_links_are_written_through_never_replaced() {
        use std::os::unix::fs::FileTypeExt;
        let d = scratch_dir("special");
        // A FIFO (what a shell's `>(...)` gives): the bytes go through it and it stays one.
        let fifo = d.join("pipe.json");
        assert!(std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()), "mkfifo");
        let reader = {
            let fifo = fifo.clone();
            std::thread::spawn(move || std::fs::read(&fifo).unwrap())
        };
        check_writable(&fifo, "--json").unwrap();
        write_bytes(&fifo, b"through the pipe").unwrap();
        // (Before the join: a FIFO replaced by a file would leave the reader waiting forever.)
        assert!(std::fs::metadata(&fifo).unwrap().file_type().is_fifo(), "still a FIFO");
        assert_eq!(reader.join().unwrap(), b"through the pipe");
        // Devices like /dev/null and /dev/full, made in the scratch directory (root only) so a
        // regression cannot replace the system's.
        let null = d.join("null");
        let full = d.join("full");
        let mknod =
            |p: &Path, minor: &str| std::process::Command::new("mknod").arg(p).args(["c", "1", minor]).status().is_ok_and(|s| s.success());
        if mknod(&null, "3") && mknod(&full, "7") {
            check_writable(&null, "--output").unwrap();
            write_bytes(&null, b"gone").unwrap();
            assert!(std::fs::metadata(&null).unwrap().file_type().is_char_device(), "still a device");
            assert!(write_bytes(&full, b"no room").is_err(), "a full device reports its error");
            assert!(std::fs::metadata(&full).unwrap().file_type().is_char_device(), "still a device");
        }

        let target = d.join("real.json");
        let link = d.join("link.json");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        check_writable(&link, "--json").unwrap();
        write_bytes(&link, b"first").unwrap();
        write_bytes(&link, b"second").unwrap();
        assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "still a link");
        assert_eq!(std::fs::read(&target).unwrap(), b"second");

        let not_dir = d.join("plain");
        std::fs::write(&not_dir, b"x").unwrap();
        let e = check_writable(&not_dir.join("o.json"), "--json").unwrap_err().to_string();
        assert!(e.contains("is not a directory"), "{e}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
