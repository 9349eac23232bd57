//! The ops: each picks its kernels and dispatch sizes from shapes only, records, submits.

use moe_hal::{DType, Result, Routing, Tensor};

use crate::WgpuBackend;
use crate::kernels::{Coop, Kernel, Params, Variant, grid, params};

/// One dispatch: a kernel variant, its parameters, the buffers of bindings 1.. and the grid.
pub(crate) struct Step<'a> {
    pub kernel: Kernel,
    pub variant: Variant,
    pub params: Params,
    pub bufs: Vec<&'a wgpu::Buffer>,
    pub groups: (u32, u32),
}

/// Workgroups of 256 for a grid-stride loop over `units` items (bounded: the loop does the rest).
fn stride_groups(units: usize, max_dim: u32) -> (u32, u32) {
    ((units.div_ceil(256)).clamp(1, max_dim.min(4096) as usize) as u32, 1)
}

/// Rows per expert at or below which `grouped_gemm` takes the gemv (decode) path.
pub(crate) const GEMV_ROWS_PER_GROUP: usize = 4;

/// Whether a grouped_gemm kernel takes its aligned vector path (`VEC`): rows of `K` in whole
/// vectors of `width` elements (8 for gemv, 4 for tiled) and, for F8E4M3 weights, scale blocks of
/// whole 4-element vectors. (From `a2dc714` the block test read `[1, 1]`, which stands for no
/// block, as a block of one column, so every f32, f16 and bf16 grouped_gemm ran on element loads
/// with bounds checks, and the suite tested no vector path but F8E4M3's.)
pub(crate) fn vector_path(k: usize, width: usize, scale_block: Option<[usize; 2]>) -> bool {
    k.is_multiple_of(width) && scale_block.is_none_or(|b| b[1].is_multiple_of(4))
}

impl WgpuBackend {
    /// Records `steps` in one compute pass, submits it, and reports any wgpu error it raised.
    pub(crate) fn run(&self, steps: &[Step<'_>]) -> Result<()> {
        use wgpu::util::DeviceExt;
        self.faults.take()?;
        let immediates = self.pipelines.immediates();
        let mut prepared = Vec::with_capacity(steps.len());
        let mut uniforms = Vec::with_capacity(steps.len());
        for s in steps {
            let pipe = self.pipelines.get(&self.device, s.kernel, s.variant);
            let mut entries = Vec::with_capacity(s.bufs.len() + 1);
            // Parameters: immediates set at dispatch, or a small uniform buffer at binding 0.
            let uniform = (!immediates).then(|| {
                self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("moe-wgpu params"),
                    contents: bytemuck::cast_slice(&s.params),
                    usage: wgpu::BufferUsages::UNIFORM,
                })
            });
            if let Some(u) = &uniform {
                entries.push(wgpu::BindGroupEntry { binding: 0, resource: u.as_entire_binding() });
            }
            for (i, b) in s.bufs.iter().enumerate() {
                entries.push(wgpu::BindGroupEntry { binding: i as u32 + 1, resource: b.as_entire_binding() });
            }
            let group = self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipe.layout, entries: &entries });
            drop(entries);
            prepared.push((pipe, group, s.groups, s.params));
            uniforms.extend(uniform);
        }
        let record = |enc: &mut wgpu::CommandEncoder| {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("moe-wgpu"), timestamp_writes: None });
            for (pipe, group, (x, y), params) in &prepared {
                pass.set_pipeline(&pipe.pipeline);
                pass.set_bind_group(0, group, &[]);
                if immediates {
                    pass.set_immediates(0, bytemuck::cast_slice(params));
                }
                pass.dispatch_workgroups(*x, *y, 1);
            }
        };
        self.encode(|| steps.iter().flat_map(|s| s.bufs.iter().copied()).chain(&uniforms).collect(), record);
        self.faults.take()
    }

    /// Records into the calling thread's open batch, or into a command buffer of its own that is
    /// submitted at once. Only a batch calls `bound`: it keeps the buffers the commands use alive
    /// until its one submit.
    pub(crate) fn encode<'b>(&self, bound: impl FnOnce() -> Vec<&'b wgpu::Buffer>, record: impl Fn(&mut wgpu::CommandEncoder)) {
        if !self.batches.record(bound, &record) {
            let mut enc = self.device.create_command_encoder(&Default::default());
            record(&mut enc);
            self.queue.submit([enc.finish()]);
        }
    }

    fn one<'a>(&self, t: &'a Tensor<Self>, name: &str) -> Result<&'a wgpu::Buffer> {
        t.buf.single(name, self.chunk)
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
        let stride = e + n_group;
        // Tokens per dispatch so the keys scratch fits one binding.
        let per = ((self.chunk as usize / 4) / stride.max(1)).clamp(1, t);
        let keys = self.scratch((per * stride * 4) as u64)?;
        let lb = self.one(logits, "logits")?;
        let bb = match bias {
            Some(b) => self.one(b, "e_score_correction_bias")?,
            None => &self.dummy,
        };
        let ib = self.one(topk_ids, "topk_ids")?;
        let wb = self.one(topk_weights, "topk_weights")?;
        let mut steps = Vec::new();
        let mut t0 = 0;
        while t0 < t {
            let tb = per.min(t - t0);
            let p = params(&[
                tb as u32,
                t0 as u32,
                e as u32,
                k as u32,
                mode,
                n_group as u32,
                topk_group as u32,
                norm as u32,
                bias.is_some() as u32,
                scale.to_bits(),
                stride as u32,
            ]);
            steps.push(Step {
                kernel: Kernel::RouterTopk,
                variant: Variant::PLAIN,
                params: p,
                bufs: vec![lb, bb, keys.native(), ib, wb],
                groups: grid(tb as u32, self.max_dim()),
            });
            t0 += tb;
        }
        self.run(&steps)
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
        let tiles = pairs.div_ceil(256);
        let counts = self.scratch((tiles * (e + 1) * 4) as u64)?;
        let base = self.scratch(((e + 1) * 4) as u64)?;
        let ids = self.one(topk_ids, "topk_ids")?;
        let ri = self.one(row_index, "row_index")?;
        let ti = self.one(token_index, "token_index")?;
        let off = self.one(expert_offsets, "expert_offsets")?;
        let p = params(&[pairs as u32, e as u32, k as u32, tiles as u32]);
        let bufs = vec![ids, ri, ti, counts.native(), base.native(), off, &self.errs];
        let mut steps = Vec::new();
        let g = grid(tiles as u32, self.max_dim());
        if tiles > 0 {
            steps.push(Step { kernel: Kernel::PermuteRank, variant: Variant::PLAIN, params: p, bufs: bufs.clone(), groups: g });
        }
        steps.push(Step { kernel: Kernel::PermuteScan, variant: Variant::PLAIN, params: p, bufs: bufs.clone(), groups: (1, 1) });
        if tiles > 0 {
            steps.push(Step { kernel: Kernel::PermuteScatter, variant: Variant::PLAIN, params: p, bufs, groups: g });
        }
        self.run(&steps)
    }

    /// Whether `grouped_gemm_swiglu` can fuse on `w`: every native part holds whole groups, so
    /// no gate row is in one part and its up row in another.
    pub(crate) fn can_fuse_swiglu(&self, w: &Tensor<Self>) -> bool {
        let rows_per_group = w.shape[w.shape.len() - 2];
        let group_bytes = rows_per_group * w.shape[w.shape.len() - 1] * w.dtype.size();
        group_bytes > 0 && w.buf.parts.iter().all(|p| p.start % group_bytes == 0 && p.bytes % group_bytes == 0)
    }

    /// `grouped_gemm`, or with `swiglu` its fused form (`y` is then `h [M, N / 2]`; the caller
    /// checked [`Self::can_fuse_swiglu`]).
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
        let xb = self.one(x, "x")?;
        let tib = match token_index {
            Some(t) => self.one(t, "token_index")?,
            None => &self.dummy,
        };
        let ob = match expert_offsets {
            Some(o) => self.one(o, "expert_offsets")?,
            None => &self.dummy,
        };
        let yb = self.one(y, "y")?;
        let grouped = expert_offsets.is_some() as u32;
        let gather = token_index.is_some() as u32;
        let head = [m as u32, n as u32, k as u32, mx as u32, g as u32, grouped, gather];

        let mut steps = Vec::new();
        let mut prep = params(&head);
        prep[13] = (k == 0) as u32;
        prep[15] = swiglu as u32;
        // A plain GEMM with K > 0 has nothing to validate and no tail to zero.
        let needs_prep = grouped != 0 || gather != 0 || k == 0;
        steps.extend(needs_prep.then(|| Step {
            kernel: Kernel::GemmPrep,
            variant: Variant::PLAIN,
            params: prep,
            bufs: vec![xb, tib, &self.dummy, ob, yb, &self.errs, &self.dummy],
            groups: stride_groups((m * y.shape[1]).max(m).max(g), self.max_dim()),
        }));
        let gemv = m <= GEMV_ROWS_PER_GROUP * g;
        // F8E4M3: the scale grid (one binding: 256 experts of 4096 x 7168 hold 7 MiB of scales),
        // and the block, which the vector paths need to be a whole number of 4-element vectors.
        let (sb, block) = match &w.scales {
            Some(s) => (self.one(&s.tensor, "the weights' block scales")?, [s.block[0] as u32, s.block[1] as u32]),
            None => (&self.dummy, [1, 1]),
        };
        let scale_block = w.scales.as_ref().map(|s| s.block);
        if k > 0 {
            let row_bytes = k * w.dtype.size();
            for part in &w.buf.parts {
                let row0 = part.start / row_bytes;
                let row1 = (part.start + part.bytes) / row_bytes;
                if row1 <= row0 {
                    continue;
                }
                let (g0, g1) = if grouped != 0 { (row0 / n, row1.div_ceil(n)) } else { (0, 1) };
                // gemv slots: one per group of this part, or one per row when there are fewer rows.
                let by_row = gemv && m < g1 - g0;
                let (kernel, variant, tiles_n, total) = if gemv {
                    let tiles_n = n.div_ceil(16);
                    let slots = if by_row { m } else { g1 - g0 };
                    let vec = vector_path(k, 8, scale_block);
                    (Kernel::Gemv, Variant { block, ..Variant::of(w.dtype, vec) }, tiles_n, slots * tiles_n)
                } else {
                    let tiles_n = n.div_ceil(64);
                    // Tensor cores for f16/bf16 weights where the adapter has them (f32 weights
                    // keep f32 products); dense GEMMs split x so their outputs stay f32-accurate.
                    let (kernel, coop) = match self.coop {
                        Some(size) if w.dtype != DType::F32 => (Kernel::GemmCoop, Some(Coop { size, split: grouped == 0 })),
                        _ => (Kernel::GemmTiled, None),
                    };
                    let vec = vector_path(k, 4, scale_block);
                    (kernel, Variant { dtype: w.dtype, vec, coop, block }, tiles_n, m.div_ceil(64) * tiles_n)
                };
                let mut p = params(&head);
                p[7] = g0 as u32;
                p[8] = g1 as u32;
                p[9] = row0 as u32;
                p[10] = row1 as u32;
                p[11] = tiles_n as u32;
                p[12] = total as u32;
                p[14] = by_row as u32;
                p[15] = swiglu as u32;
                steps.push(Step {
                    kernel,
                    variant,
                    params: p,
                    bufs: vec![xb, tib, &part.buf, ob, yb, &self.errs, sb],
                    groups: grid(total as u32, self.max_dim()),
                });
            }
        }
        self.run(&steps)
    }

    pub(crate) fn op_activation(&self, gate_up: &Tensor<Self>, h: &mut Tensor<Self>) -> Result<()> {
        let (m, i) = (h.shape[0], h.shape[1]);
        let vec = i.is_multiple_of(4);
        let units = if vec { m * i / 4 } else { m * i };
        let p = params(&[m as u32, i as u32]);
        let bufs = vec![self.one(gate_up, "gate_up")?, self.one(h, "h")?];
        self.run(&[Step {
            kernel: Kernel::Activation,
            variant: Variant::of(DType::F32, vec),
            params: p,
            bufs,
            groups: stride_groups(units, self.max_dim()),
        }])
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
        let p = params(&[t as u32, h as u32, k as u32, y.shape[0] as u32, shared.is_some() as u32]);
        let sb = match shared {
            Some(s) => self.one(s, "shared")?,
            None => &self.dummy,
        };
        let bufs = vec![
            self.one(y, "y")?,
            self.one(row_index, "row_index")?,
            self.one(topk_weights, "topk_weights")?,
            sb,
            self.one(out, "out")?,
            &self.errs,
        ];
        self.run(&[Step {
            kernel: Kernel::Combine,
            variant: Variant::of(DType::F32, vec),
            params: p,
            bufs,
            groups: stride_groups(units, self.max_dim()),
        }])
    }
}
