//! Device buffers: one logical tensor over one or more native `wgpu::Buffer`s.

use std::sync::Arc;

use moe_hal::{DType, Error, Result};

use crate::batch::Batches;

/// Every native buffer is a multiple of this many bytes (and at least this large): shaders read
/// tensors as `array<vec4<u32>>`/`array<vec4<f32>>`, so a binding never ends inside a vector,
/// never has size zero, and `f16`/`bf16` tensors with an odd element count still fill whole words.
pub(crate) const PAD: u64 = 16;

/// One native buffer of a [`WgpuBuffer`]: bytes `start..start + bytes` of the logical tensor.
pub(crate) struct Part {
    /// The native buffer (`bytes` rounded up to [`PAD`]; the padding reads as zero after upload).
    pub buf: wgpu::Buffer,
    /// First logical byte held by this part.
    pub start: usize,
    /// Logical bytes held by this part.
    pub bytes: usize,
}

/// A tensor on the device: one native buffer, or several when it is larger than one storage
/// binding can address (see the crate docs, "Buffers and splitting").
///
/// A buffer of `[E, N, K]` weights is split on expert boundaries (on row boundaries when one expert
/// is itself larger than a binding), so each part holds whole rows `[row0, row1)` of the `[E * N, K]`
/// view and [`crate::WgpuBackend`]'s `grouped_gemm` runs once per part. Other tensors (hidden states,
/// logits, dispatch indices) must fit one binding; an op given a split one returns
/// [`Error::Unsupported`].
pub struct WgpuBuffer {
    pub(crate) parts: Vec<Part>,
    pub(crate) bytes: usize,
    /// Scratch allocated inside `forward`: its native buffers go back for reuse when dropped
    /// (see `batch.rs`).
    pub(crate) recycle: Option<Arc<Batches>>,
}

impl Drop for WgpuBuffer {
    fn drop(&mut self) {
        if let Some(batches) = &self.recycle {
            for p in self.parts.drain(..) {
                batches.give(p.buf);
            }
        }
    }
}

impl WgpuBuffer {
    /// Logical size in bytes (without padding).
    pub fn len(&self) -> usize {
        self.bytes
    }

    /// True when the buffer holds no bytes (it still owns one small native buffer).
    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Number of native buffers this tensor is split over (1 unless it exceeds one binding).
    pub fn parts(&self) -> usize {
        self.parts.len()
    }

    /// The first native buffer (the only one of a scratch buffer).
    pub(crate) fn native(&self) -> &wgpu::Buffer {
        &self.parts[0].buf
    }

    /// The single native buffer, or [`Error::Unsupported`] naming the tensor when it is split.
    pub(crate) fn single(&self, name: &str, limit: u64) -> Result<&wgpu::Buffer> {
        match &self.parts[..] {
            [p] => Ok(&p.buf),
            _ => Err(Error::Unsupported(format!(
                "{name} holds {} MiB, more than one storage binding of this adapter ({} MiB); only \
                 weights are split across bindings, so run fewer tokens per call",
                self.bytes >> 20,
                limit >> 20
            ))),
        }
    }
}

/// Rounds `bytes` up to a whole, non-zero number of [`PAD`]s.
pub(crate) fn padded(bytes: u64) -> u64 {
    bytes.div_ceil(PAD).max(1) * PAD
}

/// How a tensor of `dtype` and `shape` is laid out over native buffers of at most `limit` bytes
/// each (`limit` a multiple of [`PAD`]): a list of `(start, bytes)` logical byte ranges.
///
/// A tensor that fits is one part. A larger one with at least two dimensions is cut on boundaries
/// of its first dimension (one expert of `[E, N, K]`, one row of `[N, K]`); when one such slice is
/// itself too large, on rows of its last-dimension view (`[E * N, K]`). A tensor whose single row
/// exceeds `limit` cannot be split: [`Error::OutOfMemory`] with a sentence.
pub(crate) fn plan(dtype: DType, shape: &[usize], limit: u64) -> Result<Vec<(usize, usize)>> {
    let elems: usize = shape.iter().product();
    let bytes = elems * dtype.size();
    if padded(bytes as u64) <= limit {
        return Ok(vec![(0, bytes)]);
    }
    let row_elems = shape.last().copied().unwrap_or(1).max(1);
    let outer_elems = if shape.len() >= 2 { shape[1..].iter().product::<usize>().max(1) } else { elems };
    let unit = if shape.len() >= 2 && (outer_elems * dtype.size()) as u64 <= limit {
        outer_elems * dtype.size()
    } else if shape.len() >= 2 && (row_elems * dtype.size()) as u64 <= limit {
        row_elems * dtype.size()
    } else {
        return Err(Error::OutOfMemory(format!(
            "a {dtype} tensor of shape {shape:?} ({} MiB) does not fit one buffer of this adapter ({} MiB) \
             and cannot be split on rows",
            bytes >> 20,
            limit >> 20
        )));
    };
    let per = (limit / unit as u64) as usize * unit;
    let mut parts = Vec::new();
    let mut start = 0;
    while start < bytes {
        let n = per.min(bytes - start);
        parts.push((start, n));
        start += n;
    }
    Ok(parts)
}
