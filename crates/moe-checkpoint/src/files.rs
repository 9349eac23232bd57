//! Opening a checkpoint's files defensively: only regular files are read (a FIFO would block the
//! open forever, a device such as `/dev/zero` would never end, a directory cannot be mapped), and
//! the JSON files are read up to a size cap rather than to their end.

use std::fs::{self, File, FileType};
use std::io::Read;
use std::path::Path;

use moe_hal::{Error, Result};

/// The largest JSON file read (`config.json`, the shard index): DeepSeek-V3's and Kimi K2's
/// indexes, the largest on the hub, are under 10 MB.
pub(crate) const JSON_LIMIT: u64 = 64 << 20;

/// The size of the regular file at `path` (symbolic links followed), `None` when nothing is
/// there; anything else there (a directory, FIFO, device or socket, or a broken symbolic link) is
/// an [`Error::Checkpoint`] naming the path and what it is.
pub(crate) fn regular_file(path: &Path) -> Result<Option<u64>> {
    match fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(Some(m.len())),
        Ok(m) => Err(not_regular(path, m.file_type())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => match fs::symlink_metadata(path) {
            Ok(l) if l.file_type().is_symlink() => {
                let target = fs::read_link(path).map_or_else(|_| "a missing file".to_string(), |t| t.display().to_string());
                Err(Error::Checkpoint(format!("{} is a broken symbolic link: its target {target} does not exist", path.display())))
            }
            _ => Ok(None),
        },
        Err(e) => Err(Error::Io(format!("cannot read the metadata of {}: {e}", path.display()))),
    }
}

/// Opens the regular file at `path` ([`regular_file`]), with its size; `None` when nothing is there.
pub(crate) fn open_regular(path: &Path) -> Result<Option<(File, u64)>> {
    if regular_file(path)?.is_none() {
        return Ok(None);
    }
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::Io(format!("cannot open {}: {e}", path.display()))),
    };
    // The path could have been replaced between the two looks: check what was opened.
    let meta = file.metadata().map_err(|e| Error::Io(format!("cannot read the metadata of {}: {e}", path.display())))?;
    if !meta.is_file() {
        return Err(not_regular(path, meta.file_type()));
    }
    Ok(Some((file, meta.len())))
}

/// The text of the JSON file at `path`, at most [`JSON_LIMIT`] bytes; `None` when nothing is
/// there. A larger file, or one that is not UTF-8, is an [`Error::Checkpoint`] naming it.
pub(crate) fn read_json(path: &Path) -> Result<Option<String>> {
    let Some((file, len)) = open_regular(path)? else {
        return Ok(None);
    };
    let too_large = |n: u64| {
        Error::Checkpoint(format!(
            "{} holds {n} bytes, more than the {} MiB a checkpoint's JSON file is read up to",
            path.display(),
            JSON_LIMIT >> 20
        ))
    };
    if len > JSON_LIMIT {
        return Err(too_large(len));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    // Read one byte past the cap, so a file that grew since its size was read is caught too.
    file.take(JSON_LIMIT + 1).read_to_end(&mut bytes).map_err(|e| Error::Io(format!("cannot read {}: {e}", path.display())))?;
    if bytes.len() as u64 > JSON_LIMIT {
        return Err(too_large(bytes.len() as u64));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| Error::Checkpoint(format!("{} is not valid JSON: it is not UTF-8 text ({e})", path.display())))
}

/// The error for `path` holding something other than a regular file (its type `t`, after
/// following symbolic links).
fn not_regular(path: &Path, t: FileType) -> Error {
    let what = describe(t);
    let p = path.display();
    let is_link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    Error::Checkpoint(match fs::canonicalize(path) {
        Ok(target) if is_link => format!("{p} is a symbolic link to {}, which is {what}, not a regular file", target.display()),
        _ => format!("{p} is {what}, not a regular file"),
    })
}

fn describe(t: FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if t.is_char_device() {
            return "a character device";
        }
        if t.is_block_device() {
            return "a block device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if t.is_dir() { "a directory" } else { "a special file" }
}
