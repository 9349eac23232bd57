//! The on-disk cache of kernel images: what NVRTC compiled for a device and the driver then
//! loaded, kept so that the next process loads it instead of compiling again. Compiling
//! `grouped_gemm.cu` takes seconds, and every process (each `moe run`, each test binary) would
//! otherwise pay it on its first layer.
//!
//! An entry is keyed by everything the image depends on: the source text, the NVRTC options (the
//! `-D` switches the environment sets included), the target (`sm_90` cubin or PTX), NVRTC's
//! version and this crate's. It is the image followed by a checksum of it; an entry that is
//! truncated, damaged or refused by the driver is recompiled and replaced, never an error. A
//! cache is an optimisation: failing to read or write one costs only the compile.
//!
//! Where: `MOE_CUDA_CACHE_DIR`, else `$XDG_CACHE_HOME/moe-hal/cuda`, else
//! `$HOME/.cache/moe-hal/cuda`; `MOE_CUDA_CACHE=0` turns it off.

use std::path::{Path, PathBuf};

use crate::kernels::{Source, Target};

/// FNV-1a, 64-bit: stable across Rust versions and platforms (std's hasher is not promised to
/// be), which is all a cache key and a checksum need.
fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for part in parts {
        for &b in *part {
            h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h = (h ^ 0xff).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The cache directory from the environment variables `var` reads (see the module docs).
fn dir_from(var: impl Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if var("MOE_CUDA_CACHE").is_some_and(|v| v == "0") {
        return None;
    }
    if let Some(d) = var("MOE_CUDA_CACHE_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let base = var("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| var("HOME").filter(|d| !d.is_empty()).map(|h| Path::new(&h).join(".cache")))?;
    Some(base.join("moe-hal").join("cuda"))
}

/// One image's place in the cache.
pub(crate) struct Entry {
    path: PathBuf,
}

impl Entry {
    /// The entry of `source` compiled for `target` with `options` by NVRTC `nvrtc`, in the
    /// directory the environment names; `None` when the cache is off or has no home.
    pub fn new(source: Source, target: Target, options: &[String], nvrtc: (i32, i32)) -> Option<Entry> {
        let dir = dir_from(|k| std::env::var(k).ok())?;
        Some(Entry::in_dir(&dir, source, target, options, nvrtc))
    }

    fn in_dir(dir: &Path, source: Source, target: Target, options: &[String], nvrtc: (i32, i32)) -> Entry {
        let nvrtc = format!("{}.{}", nvrtc.0, nvrtc.1);
        let key = fnv1a(&[
            source.text().as_bytes(),
            options.join(" ").as_bytes(),
            target.to_string().as_bytes(),
            nvrtc.as_bytes(),
            env!("CARGO_PKG_VERSION").as_bytes(),
        ]);
        let stem = source.file().trim_end_matches(".cu");
        let kind = match target {
            Target::Cubin(a) => format!("sm_{a}"),
            Target::Ptx(a) => format!("compute_{a}"),
        };
        Entry { path: dir.join(format!("{stem}-{kind}-{key:016x}.bin")) }
    }

    /// The cached image, if there is one and its checksum holds.
    pub fn load(&self) -> Option<Vec<u8>> {
        let mut bytes = std::fs::read(&self.path).ok()?;
        let at = bytes.len().checked_sub(8)?;
        let sum = u64::from_le_bytes(bytes[at..].try_into().ok()?);
        bytes.truncate(at);
        (!bytes.is_empty() && fnv1a(&[&bytes]) == sum).then_some(bytes)
    }

    /// Stores `image` (atomically: a temporary file renamed into place, so a reader never sees
    /// half of one). Failures are ignored: the next process compiles again.
    pub fn store(&self, image: &[u8]) {
        let Some(dir) = self.path.parent() else { return };
        let Some(name) = self.path.file_name() else { return };
        // Unique per process and store: two devices of one process may store the same entry.
        static STORES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = STORES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{}.tmp-{}-{n}", name.to_string_lossy(), std::process::id()));
        let mut bytes = image.to_vec();
        bytes.extend_from_slice(&fnv1a(&[image]).to_le_bytes());
        let stored =
            std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&tmp, &bytes)).and_then(|()| std::fs::rename(&tmp, &self.path));
        if stored.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }

    /// Removes the entry (an image the driver refused).
    pub fn forget(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("moe-cuda-cache-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn where_the_environment_says() {
        let env = |pairs: &'static [(&'static str, &'static str)]| move |k: &str| pairs.iter().find(|p| p.0 == k).map(|p| p.1.to_string());
        assert_eq!(dir_from(env(&[("HOME", "/h")])), Some(PathBuf::from("/h/.cache/moe-hal/cuda")));
        assert_eq!(dir_from(env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")])), Some(PathBuf::from("/x/moe-hal/cuda")));
        assert_eq!(dir_from(env(&[("HOME", "/h"), ("MOE_CUDA_CACHE_DIR", "/c")])), Some(PathBuf::from("/c")));
        assert_eq!(dir_from(env(&[("HOME", "/h"), ("MOE_CUDA_CACHE", "0")])), None);
        assert_eq!(dir_from(env(&[])), None);
    }

    #[test]
    fn keys_follow_everything_the_image_depends_on() {
        let d = Path::new("/c");
        let opts = vec!["--gpu-architecture=sm_90".to_string()];
        let base = Entry::in_dir(d, Source::GroupedGemm, Target::Cubin(90), &opts, (13, 0)).path;
        assert!(base.file_name().unwrap().to_string_lossy().starts_with("grouped_gemm-sm_90-"), "{}", base.display());
        let with_flag = [opts.clone(), vec!["-DMOE_F8_NO_CVT".into()]].concat();
        for other in [
            Entry::in_dir(d, Source::GroupedGemm, Target::Cubin(90), &with_flag, (13, 0)),
            Entry::in_dir(d, Source::GroupedGemm, Target::Ptx(90), &opts, (13, 0)),
            Entry::in_dir(d, Source::GroupedGemm, Target::Cubin(90), &opts, (13, 1)),
            Entry::in_dir(d, Source::Combine, Target::Cubin(90), &opts, (13, 0)),
        ] {
            assert_ne!(other.path, base);
        }
        assert_eq!(Entry::in_dir(d, Source::GroupedGemm, Target::Cubin(90), &opts, (13, 0)).path, base);
    }

    #[test]
    fn damaged_entries_are_misses_and_stores_replace_them() {
        let d = scratch("roundtrip");
        let e = Entry::in_dir(&d, Source::Activation, Target::Cubin(90), &[], (13, 0));
        assert_eq!(e.load(), None, "nothing stored yet");
        let image: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
        e.store(&image);
        assert_eq!(e.load().as_deref(), Some(&image[..]));
        // Truncated, one byte flipped, too short for a checksum, empty: misses, not errors.
        let full = std::fs::read(&e.path).unwrap();
        for damaged in [
            full[..full.len() - 1].to_vec(),
            {
                let mut f = full.clone();
                f[100] ^= 1;
                f
            },
            full[..5].to_vec(),
            vec![],
        ] {
            std::fs::write(&e.path, &damaged).unwrap();
            assert_eq!(e.load(), None);
        }
        e.store(&image);
        assert_eq!(e.load().as_deref(), Some(&image[..]));
        e.forget();
        assert_eq!(e.load(), None);
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }
}
