//! The ops: each picks its kernels and launch sizes from shapes only (worst cases, never
//! device data), enqueues them on the stream, and returns without waiting.

use moe_hal::{DType, Error, Result, Routing, Tensor};

use crate::kernels::Source;
use crate::{CudaBackend, CudaBuffer, GemmPath};

/// A 16-word parameter block from its leading words.
fn params(words: &[u32]) -> [u32; 16] {
    let mut p = [0u32; 16];
    p[..words.len()].copy_from_slice(words);
    p
}

/// `v` as a kernel's 32-bit size, or [`Error::Unsupported`] naming it.
fn dim(name: &str, v: usize) -> Result<u32> {
    u32::try_from(v)
        .map_err(|_| Error::Unsupported(format!("{name} = {v} does not fit the kernels' 32-bit indices; run fewer tokens per call")))
}

/// A grid of `blocks` blocks, checked against CUDA's limit for the x dimension.
fn grid(name: &str, blocks: usize) -> Result<u32> {
    if blocks > i32::MAX as usize {
        return Err(Error::Unsupported(format!("{name} would need {blocks} blocks; run fewer tokens per call")));
    }
    Ok(blocks.max(1) as u32)
}

/// Largest dynamic shared memory `router_topk` asks for: a block may use 48 KiB without opting in,
/// static and dynamic together, and the kernel has about 200 bytes of its own.
const SHARED_DEFAULT: usize = (48 << 10) - 1024;

/// Rows per group at or below which `grouped_gemm` streams weights (gemv) instead of tiling.
pub(crate) const GEMV_ROWS_PER_GROUP: usize = 4;

/// The kernel family `grouped_gemm` runs for one call; chosen from shapes only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// Decode: a block streams `8 * nr` weight rows of one expert once.
    Gemv { nr: u32 },
    /// Tensor cores (f16, bf16, F8E4M3 dequantized to bf16), `bm`-row tiles (64 or 128) of 128
    /// columns; `split`: activations as two 16-bit parts (hi + lo), two MMAs per product, for
    /// f32-accurate dense GEMMs.
    Mma { bm: u32, split: bool },
    /// f32 FMA, 64 x 64 tiles.
    Simt,
}

/// Picks the kernel for `m` rows of y over `g` groups of `n x k` weights stored in `dtype`
/// (`grouped`: with expert offsets), on a device of compute capability `cc` with `sms`
/// multiprocessors (see the crate docs' table). Dense GEMMs (the router, the shared expert) that
/// go to the tensor cores keep their activations f32-accurate (`split`). With the SwiGLU
/// epilogue (`swiglu`) a gemv warp must own an even number of rows (gate and up): 4 or 2.
#[allow(clippy::too_many_arguments)]
pub(crate) fn plan(force: GemmPath, m: usize, n: usize, g: usize, grouped: bool, dtype: DType, cc: u32, sms: u32, swiglu: bool) -> Plan {
    let tensor = dtype != DType::F32 && cc >= 80;
    let tiled = || {
        if !tensor { Plan::Simt } else { Plan::Mma { bm: if m <= 64 * g { 64 } else { 128 }, split: !grouped } }
    };
    let gemv = || {
        // Four weight rows per warp unless that leaves fewer than two blocks per multiprocessor.
        let slots = m.min(g).max(1);
        let blocks = slots * n.div_ceil(32);
        let few = if swiglu { 2 } else { 1 };
        Plan::Gemv { nr: if blocks >= 2 * sms as usize { 4 } else { few } }
    };
    match force {
        GemmPath::Gemv => gemv(),
        GemmPath::Tiled => tiled(),
        GemmPath::Simt => Plan::Simt,
        GemmPath::Auto if m <= GEMV_ROWS_PER_GROUP * g => gemv(),
        GemmPath::Auto => tiled(),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::F8E4M3 => "f8_e4m3",
        _ => "f32",
    }
}

/// The `extern "C"` name of a grouped_gemm kernel, as `grouped_gemm.cu` spells it: one of
/// [`Source::GroupedGemm`]'s entries (a name missing there would be this file's bug: an error,
/// never another kernel).
pub(crate) fn gemm_entry(plan: Plan, dtype: DType, k: usize) -> Result<&'static str> {
    // The vector variants load whole rows' worth of aligned vectors: 8 elements per lane and step
    // (gemv: 32 bytes of f32, 16 of f16/bf16) or per mma weight load, 4 per simt load; F8E4M3's
    // 16-byte loads are 16 elements (gemv, mma), so K must be a multiple of 16 for them.
    let width = match (plan, dtype) {
        (Plan::Simt, _) => 4,
        (_, DType::F8E4M3) => 16,
        _ => 8,
    };
    let vec = if k.is_multiple_of(width) { "vec" } else { "any" };
    let want = match plan {
        Plan::Gemv { nr } => format!("gemv_{}_r{nr}_{vec}", dtype_name(dtype)),
        Plan::Mma { bm, split } => format!("mma_{}{}_m{bm}_{vec}", if split { "split_" } else { "" }, dtype_name(dtype)),
        Plan::Simt => format!("simt_{}_{vec}", dtype_name(dtype)),
    };
    Source::GroupedGemm
        .entries()
        .iter()
        .copied()
        .find(|n| *n == want)
        .ok_or_else(|| Error::Driver(format!("grouped_gemm.cu has no kernel {want} (plan {plan:?})")))
}

impl CudaBackend {
    fn ptr(t: &Tensor<Self>) -> u64 {
        t.buf.ptr
    }

    fn ptr_or_dummy(&self, t: Option<&Tensor<Self>>) -> u64 {
        t.map_or(self.dev.dummy, |t| t.buf.ptr)
    }

    /// Scratch memory for one op, freed (in stream order) when dropped.
    fn scratch(&self, bytes: usize) -> Result<CudaBuffer> {
        CudaBuffer::new(&self.dev, bytes)
    }

    /// Blocks for a grid-stride loop over `units` items with 256 threads.
    fn stride_blocks(&self, units: usize) -> u32 {
        units.div_ceil(256).clamp(1, self.dev.facts.sms as usize * 32) as u32
    }

    pub(crate) fn op_router_topk(
        &self,
        logits: &Tensor<Self>,
        bias: Option<&Tensor<Self>>,
        routing: &Routing,
        topk_ids: &mut Tensor<Self>,
        topk_weights: &mut Tensor<Self>,
    ) -> Result<()> {
        let (t, e) = (logits.shape[0], logits.shape[1]);
        let k = topk_ids.shape[1];
        let moe_hal::RoutingParams { mode, n_group, topk_group, norm, scale } = routing.params();
        let stride = e + 2 * n_group;
        let shared = stride * 4;
        let global = shared > SHARED_DEFAULT;
        let scratch = if global { Some(self.scratch(t * stride * 4)?) } else { None };
        let p = params(&[
            dim("tokens", t)?,
            dim("experts", e)?,
            dim("top-k", k)?,
            mode,
            dim("n_group", n_group)?,
            dim("topk_group", topk_group)?,
            norm as u32,
            bias.is_some() as u32,
            scale.to_bits(),
            global as u32,
            dim("experts + 2 n_group", stride)?,
        ]);
        let ptrs = [
            Self::ptr(logits),
            self.ptr_or_dummy(bias),
            scratch.as_ref().map_or(self.dev.dummy, |s| s.ptr),
            Self::ptr(topk_ids),
            Self::ptr(topk_weights),
        ];
        let smem = if global { 0 } else { shared as u32 };
        self.dev.launch(Source::RouterTopk, "router_topk", grid("router_topk", t)?, 256, smem, &p, &ptrs)
    }

    pub(crate) fn op_permute(
        &self,
        topk_ids: &Tensor<Self>,
        expert_offsets: &mut Tensor<Self>,
        row_index: &mut Tensor<Self>,
        token_index: &mut Tensor<Self>,
    ) -> Result<()> {
        let (t, k) = (topk_ids.shape[0], topk_ids.shape[1]);
        let e = expert_offsets.shape[0] - 1;
        let pairs = t * k;
        let tiles = pairs.div_ceil(1024);
        dim("(experts + 1) * tiles", (e + 1) * tiles)?;
        let counts = self.scratch((e + 1) * tiles.max(1) * 4)?;
        let p = params(&[dim("T * k", pairs)?, dim("experts", e)?, dim("top-k", k)?, tiles as u32]);
        let (ids, ri, ti, off, errs) =
            (Self::ptr(topk_ids), Self::ptr(row_index), Self::ptr(token_index), Self::ptr(expert_offsets), self.dev.errs);
        let g = grid("permute", tiles)?;
        if tiles > 0 {
            self.dev.launch(Source::Permute, "permute_rank", g, 1024, 0, &p, &[ids, ri, counts.ptr, errs])?;
        }
        self.dev.launch(Source::Permute, "permute_scan", 1, 1024, 0, &p, &[counts.ptr, off])?;
        if tiles > 0 {
            self.dev.launch(Source::Permute, "permute_scatter", g, 1024, 0, &p, &[ids, ri, ti, counts.ptr, errs])?;
        }
        Ok(())
    }

    /// `grouped_gemm`, or with `swiglu` its fused form: `y` is then `h [M, N / 2]`, `N = 2I`.
    pub(crate) fn op_grouped_gemm(
        &self,
        x: &Tensor<Self>,
        token_index: Option<&Tensor<Self>>,
        w: &Tensor<Self>,
        expert_offsets: Option<&Tensor<Self>>,
        y: &mut Tensor<Self>,
        swiglu: bool,
    ) -> Result<()> {
        let (mx, k) = (x.shape[0], x.shape[1]);
        // n: weight rows per group (the GEMM's columns; 2I when fused); y has n or n / 2 columns.
        let (m, n) = (y.shape[0], w.shape[w.shape.len() - 2]);
        let g = expert_offsets.map_or(1, |o| o.shape[0] - 1);
        let grouped = expert_offsets.is_some();
        let gather = token_index.is_some();
        let head = [dim("M", m)?, dim("N", n)?, dim("K", k)?, dim("rows of x", mx)?, dim("groups", g)?, grouped as u32, gather as u32];
        dim("G * N", g * n)?;
        let (xp, tip, wp, offp, yp) =
            (Self::ptr(x), self.ptr_or_dummy(token_index), Self::ptr(w), self.ptr_or_dummy(expert_offsets), Self::ptr(y));

        let mut head = params(&head);
        head[11] = swiglu as u32;
        // F8E4M3: the block scales (validation guarantees them, of the right shape) and their
        // layout; every other dtype passes the dummy pointer, which its kernels never read.
        let sp = match (&w.scales, w.dtype) {
            (Some(s), DType::F8E4M3) => {
                let [br, bc] = s.block;
                // Clamped so they fit 32 bits without changing any element's block: a block at
                // least N rows (K columns) tall (wide) is the whole matrix either way. Columns clamp
                // to K rounded up to 16, a multiple of every run the kernels decode at once, so a
                // block wider than the matrix still lets them look one scale up per run.
                head[12] = dim("scale block rows", br.min(n.max(1)))?;
                head[13] = dim("scale block columns", bc.min(k.next_multiple_of(16).max(16)))?;
                head[14] = dim("scale grid rows", n.div_ceil(br))?;
                head[15] = dim("scale grid columns", k.div_ceil(bc))?;
                Self::ptr(&s.tensor)
            }
            (None, DType::F8E4M3) => return moe_hal::invalid!("f8_e4m3 weights need their block scales"),
            _ => self.dev.dummy,
        };
        if grouped || gather {
            let p = head;
            let blocks = self.stride_blocks((m * y.shape[1]).max(m).max(g));
            self.dev.launch(Source::GroupedGemm, "gemm_prep", blocks, 256, 0, &p, &[tip, offp, yp, self.dev.errs])?;
        }
        let facts = &self.dev.facts;
        let plan = plan(self.gemm_path, m, n, g, grouped, w.dtype, facts.cc, facts.sms, swiglu);
        let entry = gemm_entry(plan, w.dtype, k)?;
        match plan {
            Plan::Gemv { nr } => {
                let tiles_n = n.div_ceil(8 * nr as usize);
                let by_row = m < g;
                let slots = if by_row { m } else { g };
                let mut p = head;
                p[7] = dim("weight-row blocks", tiles_n)?;
                p[8] = dim("slots", slots)?;
                p[9] = by_row as u32;
                let blocks = grid("gemv", slots * tiles_n)?;
                self.dev.launch(Source::GroupedGemm, entry, blocks, 256, 0, &p, &[xp, tip, wp, sp, offp, yp])
            }
            Plan::Mma { .. } | Plan::Simt => {
                let bm = bm_of(plan);
                let bn = if matches!(plan, Plan::Simt) { 64 } else { 128 };
                let tiles_n = n.div_ceil(bn);
                let max_tiles = if grouped { m.min(m.div_ceil(bm) + g) } else { m.div_ceil(bm) };
                let mut p = head;
                p[7] = dim("column tiles", tiles_n)?;
                p[8] = dim("row tiles", max_tiles)?;
                p[10] = bm as u32;
                let tile_start = if grouped {
                    let ts = self.scratch((g + 1) * 4)?;
                    self.dev.launch(Source::GroupedGemm, "gemm_plan", 1, 1024, 0, &p, &[offp, ts.ptr])?;
                    Some(ts)
                } else {
                    None
                };
                let tsp = tile_start.as_ref().map_or(self.dev.dummy, |t| t.ptr);
                let blocks = grid("grouped_gemm", max_tiles * tiles_n)?;
                self.dev.launch(Source::GroupedGemm, entry, blocks, 256, 0, &p, &[xp, tip, wp, sp, offp, tsp, yp])
            }
        }
    }

    pub(crate) fn op_activation(&self, gate_up: &Tensor<Self>, h: &mut Tensor<Self>) -> Result<()> {
        let (m, i) = (h.shape[0], h.shape[1]);
        let vec = i.is_multiple_of(4);
        let units = if vec { m * i / 4 } else { m * i };
        let p = params(&[dim("rows", m)?, dim("intermediate", i)?]);
        let entry = if vec { "activation_vec" } else { "activation" };
        self.dev.launch(Source::Activation, entry, self.stride_blocks(units), 256, 0, &p, &[Self::ptr(gate_up), Self::ptr(h)])
    }

    pub(crate) fn op_combine(
        &self,
        y: &Tensor<Self>,
        row_index: &Tensor<Self>,
        topk_weights: &Tensor<Self>,
        shared: Option<&Tensor<Self>>,
        out: &mut Tensor<Self>,
    ) -> Result<()> {
        let (t, k) = (topk_weights.shape[0], topk_weights.shape[1]);
        let h = out.shape[1];
        let vec = h.is_multiple_of(4);
        let units = if vec { t * h / 4 } else { t * h };
        let p = params(&[dim("tokens", t)?, dim("hidden", h)?, dim("top-k", k)?, dim("rows of y", y.shape[0])?, shared.is_some() as u32]);
        let entry = if vec { "combine_vec" } else { "combine" };
        let ptrs = [Self::ptr(y), Self::ptr(row_index), Self::ptr(topk_weights), self.ptr_or_dummy(shared), Self::ptr(out), self.dev.errs];
        self.dev.launch(Source::Combine, entry, self.stride_blocks(units), 256, 0, &p, &ptrs)
    }
}

/// Rows per tile of a tiled plan.
fn bm_of(plan: Plan) -> usize {
    match plan {
        Plan::Mma { bm, .. } => bm as usize,
        _ => 64,
    }
}
