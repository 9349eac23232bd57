//! Files the `moe` command reads whole (`moe run --input`, `moe bench --compare`): regular files
//! only, so a FIFO cannot hang the command and `/dev/zero` cannot fill its memory, and JSON
//! within a size that no report reaches.

use moe_hal::{Error, Result};
use std::io::Read;
use std::path::Path;

/// The bytes of the regular file at `path` (links followed), at most `limit` of them when given;
/// `flag` names the file in errors.
pub fn read_regular(path: &Path, flag: &str, limit: Option<u64>) -> Result<Vec<u8>> {
    let what = || format!("{flag} {}", path.display());
    let meta = std::fs::metadata(path).map_err(|e| Error::Io(format!("cannot read {}: {e}", what())))?;
    if !meta.is_file() {
        let kind = if meta.is_dir() { "a directory" } else { "not a regular file (a device, a FIFO or a socket)" };
        return moe_hal::invalid!("{} is {kind}; name a file", what());
    }
    if let Some(limit) = limit
        && meta.len() > limit
    {
        return moe_hal::invalid!("{} holds {} MiB, more than the {} MiB such a file can be", what(), meta.len() >> 20, limit >> 20);
    }
    let file = std::fs::File::open(path).map_err(|e| Error::Io(format!("cannot read {}: {e}", what())))?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    // (Bounded even if the file grows while it is read.)
    file.take(limit.unwrap_or(u64::MAX)).read_to_end(&mut bytes).map_err(|e| Error::Io(format!("cannot read {}: {e}", what())))?;
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_directories_and_oversized_files_are_refused() {
        let e = read_regular(Path::new("/dev/zero"), "--compare", Some(1 << 20)).unwrap_err().to_string();
        assert!(e.contains("--compare /dev/zero") && e.contains("not a regular file"), "{e}");
        let e = read_regular(Path::new("/"), "--input", None).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        let f = std::env::temp_dir().join(format!("moe-in-file-{}", std::process::id()));
        std::fs::write(&f, vec![b'x'; 3 << 20]).unwrap();
        let e = read_regular(&f, "--compare", Some(1 << 20)).unwrap_err().to_string();
        assert!(e.contains("3 MiB"), "{e}");
        assert_eq!(read_regular(&f, "--compare", Some(4 << 20)).unwrap().len(), 3 << 20);
        let _ = std::fs::remove_file(&f);
    }
}
