//! `forward`: the composed layer recorded into one command buffer, in passes of as many tokens as
//! one storage binding holds the intermediates of.
//!
//! Every intermediate of a layer grows with the tokens: the `[T * k, H]` f32 expert outputs are
//! 229 KiB a token for DeepSeek-V3, so one 2 GiB binding (an H200 through Vulkan) holds them for
//! 9362 tokens and lavapipe's 128 MiB for 585. Rather than refuse larger calls, `forward` runs
//! the layer on consecutive token ranges ("passes"): it copies a pass's rows of `x` into a
//! scratch tensor, runs the composed layer on it, and copies the rows of `out`, `topk_ids` and
//! `topk_weights` back. Tokens are independent in an MoE layer, so a pass computes exactly what
//! the whole call would for its rows (the kernels chosen for its shape may differ, within the
//! tolerance every kernel meets). The caller's tensors may then themselves be split over
//! several native buffers (a 2-D tensor larger than one binding is split on rows): only these
//! copies touch them.
//!
//! The copies cost little where passes are needed at all: a pass is thousands of tokens and
//! compute-bound, and the copies move `2 H` f32 a token against the `2 k H` its expert outputs
//! alone are written and read.

use moe_hal::{DType, Error, Layer, Result, Tensor};

use crate::{WgpuBackend, WgpuBuffer};

impl WgpuBackend {
    /// The layer on `x`, in one pass when everything fits (the usual case) or in several.
    pub(crate) fn op_forward(
        &self,
        layer: &Layer<Self>,
        x: &Tensor<Self>,
        out: &mut Tensor<Self>,
        topk_ids: &mut Tensor<Self>,
        topk_weights: &mut Tensor<Self>,
    ) -> Result<()> {
        let t = x.shape[0];
        let per_pass = self.tokens_per_pass(layer)?;
        let whole = [&x.buf, &out.buf, &topk_ids.buf, &topk_weights.buf].iter().all(|b| b.parts.len() == 1);
        let batch = self.batch_layers.then(|| self.batches.begin(&self.device, &self.queue));
        if t <= per_pass && whole {
            moe_hal::forward::composed(self, layer, x, out, topk_ids, topk_weights)?;
        } else {
            // Equal passes (not full ones and a remainder), so no pass is needlessly small.
            let passes = t.div_ceil(per_pass);
            let size = t.div_ceil(passes);
            let (h, k) = (x.shape[1], topk_ids.shape[1]);
            for t0 in (0..t).step_by(size) {
                let n = size.min(t - t0);
                let xp = Tensor::alloc(self, DType::F32, &[n, h])?;
                self.copy_bytes(&x.buf, t0 * h * 4, &xp.buf, 0, n * h * 4)?;
                let mut op = Tensor::alloc(self, DType::F32, &[n, h])?;
                let mut ip = Tensor::alloc(self, DType::U32, &[n, k])?;
                let mut wp = Tensor::alloc(self, DType::F32, &[n, k])?;
                moe_hal::forward::composed(self, layer, &xp, &mut op, &mut ip, &mut wp)?;
                self.copy_bytes(&op.buf, 0, &out.buf, t0 * h * 4, n * h * 4)?;
                self.copy_bytes(&ip.buf, 0, &topk_ids.buf, t0 * k * 4, n * k * 4)?;
                self.copy_bytes(&wp.buf, 0, &topk_weights.buf, t0 * k * 4, n * k * 4)?;
                // Submit each pass as it is recorded: its scratch is then freed (or reused) as
                // soon as it has run, instead of every pass's scratch living until the end.
                self.batches.flush(&self.device, &self.queue);
            }
        }
        if let Some(b) = batch {
            b.submit();
        }
        self.faults.take()
    }

    /// The most tokens one pass of `forward` may hold: every tensor it allocates must fit one
    /// binding (at most the scratch limit). [`Error::Unsupported`] when not even one token fits.
    pub(crate) fn tokens_per_pass(&self, layer: &Layer<Self>) -> Result<usize> {
        let c = &layer.config;
        let k = c.top_k;
        // A fused SwiGLU writes [rows, I]; the composed fallback first writes [rows, 2I].
        let widen = |w: &Tensor<Self>| if self.can_fuse_swiglu(w) { 1 } else { 2 };
        let shared = layer.shared_gate_up.as_ref().map_or(0, |s| widen(s) * c.shared_intermediate);
        // (tensor, f32/u32 words per token) for every tensor a pass allocates.
        let per_token = [
            ("router logits", c.experts),
            ("expert activations", k * widen(&layer.gate_up) * c.intermediate),
            ("expert outputs", k * c.hidden),
            ("shared expert activations", shared),
            ("hidden states", c.hidden),
            ("dispatch indices", k),
        ];
        let limit = self.pass_limit as usize;
        let mut most = usize::MAX;
        for (name, words) in per_token {
            let bytes = words * 4;
            if bytes > limit {
                return Err(Error::Unsupported(format!(
                    "one token's {name} need {bytes} bytes, more than one storage binding of this adapter ({limit} bytes)"
                )));
            }
            most = most.min(limit / bytes.max(1));
        }
        // permute's per-tile counts: (E + 1) words for each 256 (token, slot) pairs.
        let tiles = limit / 4 / (c.experts + 1);
        Ok(most.min((tiles * 256 / k).max(1)))
    }

    /// Copies `len` bytes from byte `from` of `src` to byte `to` of `dst`, across their native
    /// parts (each copy stays inside one part of each), into the open batch or as a submit.
    /// Offsets and `len` are multiples of 4 (rows of f32/u32 tensors).
    pub(crate) fn copy_bytes(&self, src: &WgpuBuffer, from: usize, dst: &WgpuBuffer, to: usize, len: usize) -> Result<()> {
        let part_at = |b: &'_ WgpuBuffer, at: usize| b.parts.iter().position(|p| at >= p.start && at < p.start + p.bytes);
        let mut segments = Vec::new();
        let mut done = 0;
        while done < len {
            let (s, d) = (from + done, to + done);
            let (Some(i), Some(j)) = (part_at(src, s), part_at(dst, d)) else {
                return Err(Error::Driver(format!("a copy of {len} bytes from byte {from} to byte {to} runs past a buffer")));
            };
            let (sp, dp) = (&src.parts[i], &dst.parts[j]);
            let n = (len - done).min(sp.start + sp.bytes - s).min(dp.start + dp.bytes - d);
            segments.push((i, s - sp.start, j, d - dp.start, n));
            done += n;
        }
        self.faults.take()?;
        self.encode(
            || segments.iter().flat_map(|&(i, _, j, _, _)| [&src.parts[i].buf, &dst.parts[j].buf]).collect(),
            |enc| {
                for &(i, s, j, d, n) in &segments {
                    enc.copy_buffer_to_buffer(&src.parts[i].buf, s as u64, &dst.parts[j].buf, d as u64, n as u64);
                }
            },
        );
        self.faults.take()
    }
}
