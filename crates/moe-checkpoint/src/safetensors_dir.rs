//! The safetensors files of a checkpoint directory: `model.safetensors`, or the shards listed in
//! `model.safetensors.index.json`. Files are memory-mapped on first use, so only the shards that
//! hold a requested tensor are ever opened, and only the pages of the tensors read are touched.

use std::collections::{BTreeMap, HashMap};
use std::path::{Component, Path, PathBuf};

use memmap2::Mmap;
use moe_hal::{DType, Error, Result};
use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::files;

/// The single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The index of a sharded checkpoint (`weight_map`: tensor name -> shard file name).
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Where a tensor lives and what it is; `start..end` are byte offsets into its file's map.
#[derive(Debug, Clone)]
pub struct Found {
    /// Tensor name.
    pub name: String,
    /// File name, relative to the checkpoint directory.
    pub file: String,
    /// Element type in the file.
    pub dtype: Dtype,
    /// Shape in the file.
    pub shape: Vec<usize>,
    start: usize,
    end: usize,
}

impl Found {
    /// The float dtype, or a [`Error::Checkpoint`] naming the tensor, file and dtype (F8_E4M3
    /// included: expert weights read it through `layer.rs`, with their scales).
    pub fn float_dtype(&self) -> Result<DType> {
        match self.dtype {
            Dtype::F32 => Ok(DType::F32),
            Dtype::F16 => Ok(DType::F16),
            Dtype::BF16 => Ok(DType::BF16),
            Dtype::F8_E4M3 => Err(Error::Checkpoint(format!(
                "tensor {} in {} is F8_E4M3; FP8 (with block scales) is read for expert weights only, and this tensor must be F32, F16 or BF16",
                self.name, self.file
            ))),
            other => Err(Error::Checkpoint(format!(
                "tensor {} in {} has dtype {other:?}; weights must be F32, F16 or BF16, or F8_E4M3 with block scales (expert weights only)",
                self.name, self.file
            ))),
        }
    }
}

/// One memory-mapped safetensors file with its parsed header.
struct Mapped {
    path: PathBuf,
    map: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    meta: Metadata,
}

impl Mapped {
    fn open(path: &Path, why: &str) -> Result<Mapped> {
        // Only a regular file: a FIFO would block the open, a device never end, a directory not map.
        let (file, len) = match files::open_regular(path) {
            Ok(Some(opened)) => opened,
            Ok(None) => return Err(Error::Checkpoint(format!("{} does not exist{why}", path.display()))),
            Err(Error::Checkpoint(msg)) => return Err(Error::Checkpoint(format!("{msg}{why}"))),
            Err(e) => return Err(e),
        };
        if len < 8 {
            return Err(Error::Checkpoint(format!(
                "{} is truncated: it holds {len} bytes, fewer than the 8-byte length that starts every safetensors file",
                path.display()
            )));
        }
        // SAFETY: the map is read-only and lives no longer than this load. As with every mmap
        // loader (safetensors, candle, llama.cpp), another process truncating or rewriting the file
        // while it is mapped is undefined behaviour (typically SIGBUS); checkpoints are not
        // modified while a model is loaded from them.
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::Io(format!("cannot memory-map {}: {e}", path.display())))?;
        let (header_len, meta) = SafeTensors::read_metadata(&map).map_err(|e| corrupt(path, len, &e, &map))?;
        Ok(Mapped { path: path.to_path_buf(), map, data_start: 8 + header_len, meta })
    }

    fn find(&self, name: &str, file: &str) -> Option<Found> {
        let info = self.meta.info(name)?;
        let (s, e) = info.data_offsets;
        Some(Found {
            name: name.to_string(),
            file: file.to_string(),
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: self.data_start + s,
            end: self.data_start + e,
        })
    }
}

/// A sentence for a safetensors file (`bytes`, `len` of them) whose header does not fit the file.
fn corrupt(path: &Path, len: u64, e: &SafeTensorError, bytes: &[u8]) -> Error {
    let p = path.display();
    // The crate does not say which tensor (or names it without the reason): find it.
    let entry = match e {
        SafeTensorError::TensorInvalidInfo
        | SafeTensorError::InvalidOffset(_)
        | SafeTensorError::ValidationOverflow
        | SafeTensorError::MisalignedSlice => bad_tensor(bytes),
        _ => None,
    };
    if let Some(why) = entry {
        return Error::Checkpoint(format!("{p} is not a valid safetensors file: {why}"));
    }
    Error::Checkpoint(match e {
        SafeTensorError::MetadataIncompleteBuffer => {
            format!("{p} is truncated or corrupt: its header's tensor offsets do not end at the file's end ({len} bytes)")
        }
        SafeTensorError::InvalidHeaderLength => {
            format!("{p} is truncated or corrupt: its header length runs past the file's end ({len} bytes)")
        }
        SafeTensorError::HeaderTooLarge => format!("{p} is not a safetensors file: its header length is implausibly large"),
        other => format!("{p} is not a valid safetensors file: {other}"),
    })
}

/// The first tensor, in data order, whose header entry the safetensors crate refuses (dtype and
/// shape not filling its `data_offsets`, or offsets that leave a gap or overlap), described;
/// `None` when the header cannot be read or every entry is consistent.
fn bad_tensor(bytes: &[u8]) -> Option<String> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let header = std::str::from_utf8(bytes.get(8..8usize.checked_add(n)?)?).ok()?;
    let value: serde_json::Value = serde_json::from_str(header).ok()?;
    let mut tensors: Vec<(&String, TensorInfo)> = value
        .as_object()?
        .iter()
        .filter(|(name, _)| *name != "__metadata__")
        .map(|(name, v)| Some((name, serde_json::from_value(v.clone()).ok()?)))
        .collect::<Option<_>>()?;
    tensors.sort_by_key(|(_, t)| t.data_offsets);
    let mut at = 0;
    for (name, t) in tensors {
        let (s, e) = t.data_offsets;
        let what = format!("tensor {name} ({:?} {:?}, data_offsets [{s}, {e}])", t.dtype, t.shape);
        if s != at {
            return Some(format!("{what} does not start where the data before it ends (byte {at}): tensors must be packed back to back"));
        }
        if e < s {
            return Some(format!("{what} ends before it starts"));
        }
        let bits = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).and_then(|n| n.checked_mul(t.dtype.bitsize()));
        match bits {
            None => return Some(format!("{what} has a shape whose byte count overflows")),
            Some(b) if b % 8 != 0 => return Some(format!("{what} does not fill a whole number of bytes")),
            Some(b) if b / 8 != e - s => {
                return Some(format!(
                    "tensor {name} is {:?} {:?}, which takes {} bytes, but its data_offsets [{s}, {e}] span {} bytes",
                    t.dtype,
                    t.shape,
                    b / 8,
                    e - s
                ));
            }
            Some(_) => {}
        }
        at = e;
    }
    None
}

enum Source {
    Single,
    Sharded { index: PathBuf, weight_map: HashMap<String, String> },
}

/// The safetensors files of one checkpoint directory, opened lazily.
pub struct SafetensorsDir {
    dir: PathBuf,
    source: Source,
    /// File name -> mapped file, in first-use order of their names.
    open: BTreeMap<String, Mapped>,
}

impl SafetensorsDir {
    /// Finds `model.safetensors` or `model.safetensors.index.json` in `dir` (the single file wins
    /// when both exist, as in transformers) and parses the index. Opens no weight file yet.
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        // Either present but not a regular file (a directory, FIFO or device) is an error naming it.
        let source = if files::regular_file(&single)?.is_some() {
            Source::Single
        } else if files::regular_file(&index)?.is_some() {
            Source::Sharded { weight_map: read_index(&index)?, index }
        } else {
            return Err(Error::Checkpoint(format!(
                "{} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors checkpoints are read",
                dir.display()
            )));
        };
        Ok(SafetensorsDir { dir: dir.to_path_buf(), source, open: BTreeMap::new() })
    }

    /// Locates `name`: `Ok(None)` when the checkpoint does not have it, an error when the file
    /// that should hold it is missing or corrupt.
    pub fn find(&mut self, name: &str) -> Result<Option<Found>> {
        let file = match &self.source {
            Source::Single => SINGLE_FILE.to_string(),
            Source::Sharded { weight_map, .. } => match weight_map.get(name) {
                Some(f) => f.clone(),
                None => return Ok(None),
            },
        };
        if !self.open.contains_key(&file) {
            let why = match &self.source {
                Source::Single => String::new(),
                Source::Sharded { index, .. } => format!(", but {} lists it as the shard holding {name}", index.display()),
            };
            let mapped = Mapped::open(&self.dir.join(&file), &why)?;
            self.open.insert(file.clone(), mapped);
        }
        let mapped = &self.open[&file];
        match (mapped.find(name, &file), &self.source) {
            (Some(found), _) => Ok(Some(found)),
            (None, Source::Single) => Ok(None),
            (None, Source::Sharded { index, .. }) => Err(Error::Checkpoint(format!(
                "tensor {name} is missing: {} lists it in {file}, but {} does not contain it",
                index.display(),
                mapped.path.display()
            ))),
        }
    }

    /// Like [`SafetensorsDir::find`], but a missing tensor is an error naming the files searched.
    pub fn require(&mut self, name: &str) -> Result<Found> {
        self.find(name)?.ok_or_else(|| self.missing(name, None))
    }

    /// The error for a tensor the checkpoint lacks, naming where it was looked for; `note` is
    /// appended (for instance the other layout that was tried).
    pub fn missing(&self, name: &str, note: Option<&str>) -> Error {
        let place = match &self.source {
            Source::Single => format!("{} does not contain it", self.dir.join(SINGLE_FILE).display()),
            Source::Sharded { index, .. } => format!("the weight_map of {} does not list it", index.display()),
        };
        let note = note.map_or(String::new(), |n| format!(" ({n})"));
        Error::Checkpoint(format!("tensor {name} is missing: {place}{note}"))
    }

    /// The bytes of a tensor found in this directory.
    pub fn bytes(&self, t: &Found) -> &[u8] {
        &self.open[&t.file].map[t.start..t.end]
    }

    /// Tells the OS the tensor will be read soon, so it can read ahead in parallel (Unix only; a
    /// hint, failures are ignored).
    pub fn will_need(&self, t: &Found) {
        #[cfg(unix)]
        if t.end > t.start {
            let _ = self.open[&t.file].map.advise_range(memmap2::Advice::WillNeed, t.start, t.end - t.start);
        }
        #[cfg(not(unix))]
        let _ = t;
    }

    /// The files opened so far, sorted by name.
    pub fn opened_files(&self) -> Vec<PathBuf> {
        self.open.values().map(|m| m.path.clone()).collect()
    }
}

/// Reads the `weight_map` of an index file (at most [`files::JSON_LIMIT`] bytes). Every shard name
/// must be a relative path inside the checkpoint directory: absolute paths, `..`, `.` and
/// Windows prefixes are refused, so an index cannot make the loader read files elsewhere.
fn read_index(path: &Path) -> Result<HashMap<String, String>> {
    let Some(text) = files::read_json(path)? else {
        return Err(Error::Checkpoint(format!("{} does not exist", path.display())));
    };
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::Checkpoint(format!("{} is not valid JSON: {e}", path.display())))?;
    let Some(map) = value.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(Error::Checkpoint(format!("{} has no \"weight_map\" object mapping tensor names to shard files", path.display())));
    };
    map.iter()
        .map(|(k, v)| match v.as_str() {
            Some(f) if !f.is_empty() && Path::new(f).components().all(|c| matches!(c, Component::Normal(_))) => {
                Ok((k.clone(), f.to_string()))
            }
            Some(f) => Err(Error::Checkpoint(format!(
                "{} maps tensor {k} to \"{f}\", which is not a file inside the checkpoint directory: shard names must be relative, without \"..\"",
                path.display()
            ))),
            None => Err(Error::Checkpoint(format!("{} maps tensor {k} to {v}, which is not a file name", path.display()))),
        })
        .collect()
}
