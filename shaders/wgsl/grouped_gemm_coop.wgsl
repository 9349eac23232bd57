// grouped_gemm on cooperative matrices (tensor cores through Vulkan's VK_KHR_cooperative_matrix,
// wgpu's experimental `wgpu_cooperative_matrix`): the `tiled` schedule of grouped_gemm.wgsl (one
// 64 x 64 tile of y per workgroup, the groups of its rows found by binary search, one pass per
// group) with every product on f16 x f16 -> f32 matrix units. Also the SwiGLU epilogue.
//
// This file is appended to grouped_gemm.wgsl (its Params, bindings and helpers). The host prepends,
// besides DT and VEC:
//   enable f16; enable wgpu_cooperative_matrix; diagnostic(off, derivative_uniformity);
//   const CS: u32        the square size of the adapter's f16 x f16 -> f32 configuration (16 on
//                        NVIDIA, 8 on lavapipe);
//   alias CA, CB, CC     coop_matCSxCS<f16, A>, <f16, B>, <f32, C>;
//   const SPLIT: bool    dense GEMMs (the router, the shared expert): each x value goes in as two
//                        f16 parts, hi + lo, multiplied separately, so activations keep ~22
//                        significant bits (the router's logits decide the routing; the CUDA
//                        backend's mma_split_* do the same).
//
// Numbers: weights become f16 (exact for f16 storage; bf16 keeps all its bits within f16's normal
// range, 6.1e-5 .. 65504, and loses low bits among f16's subnormals down to 6e-8; smaller
// magnitudes round toward zero, larger ones clamp; f8_e4m3 is scaled in f32
// first, then rounded to f16 the same way), x is rounded to f16
// (clamped to +-65504) unless SPLIT, NaN stays NaN, and every sum accumulates in f32.
//
// Subgroups: the 128 invocations form num_subgroups subgroups; the (64 / CS)^2 coop tiles of the
// workgroup tile are dealt to them round-robin, at most 4 each (the host uses this kernel only when
// 4 * 128 / (largest subgroup size) >= (64 / CS)^2). Coop ops need subgroup-uniform control flow:
// every condition guarding one depends only on uniform values and subgroup_id. naga cannot prove
// that (subgroup_id is not workgroup-uniform), hence the diagnostic filter.

const CM: u32 = 64u; // rows of the workgroup tile
const CN: u32 = 64u; // columns
const CK: u32 = 32u; // K slice staged per step
var<workgroup> ca: array<f16, 2048>; // x slice [CM][CK], row-major
var<workgroup> cl: array<f16, 2048>; // SPLIT: the lo parts of x
var<workgroup> cb: array<f16, 2048>; // weight slice [CN][CK]: B (K x N) column-major
var<workgroup> cc: array<f32, 4096>; // the tile of y [CM][CN], row-major

// f32 -> f16 without overflow to infinity, NaN kept: clamp() would turn NaN into a number
// (lavapipe: -65504), so a NaN weight or activation would vanish. The test is on the bits, which
// no compiler folds away as it may `v != v`.
fn to_f16(v: f32) -> f16 {
    if ((bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u) {
        return f16(v);
    }
    return f16(clamp(v, -65504.0, 65504.0));
}

// One CS x CS block of the tile, coop tile q (row-major over (CM / CS) x (CN / CS)), advanced by
// the CS-deep slice at kk of the staged K slice.
fn coop_step(q: u32, kk: u32, acc: CC) -> CC {
    let per_row = CN / CS;
    let a_at = (q / per_row) * CS * CK + kk;
    let b = coopLoad<CB>(&cb[(q % per_row) * CS * CK + kk], CK);
    var c = coopMultiplyAdd(coopLoadT<CA>(&ca[a_at], CK), b, acc);
    if (SPLIT) {
        c = coopMultiplyAdd(coopLoadT<CA>(&cl[a_at], CK), b, c);
    }
    return c;
}

fn coop_store(q: u32, acc: CC) {
    let per_row = CN / CS;
    coopStoreT(acc, &cc[(q / per_row) * CS * CN + (q % per_row) * CS], CN);
}

@compute @workgroup_size(128)
fn tiled_coop(@builtin(workgroup_id) wid3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32, @builtin(subgroup_id) sid: u32,
              @builtin(num_subgroups) nsg: u32) {
    let wid = wid3.x + wid3.y * nwg.x;
    if (wid >= p.total_wg) {
        return;
    }
    let m0 = (wid / p.tiles_n) * CM;
    let n0 = (wid % p.tiles_n) * CN;
    let m_end = min(m0 + CM, p.m);
    let ga = max(group_of(m0), p.g0);
    let gb = min(group_of(m_end - 1u) + 1u, p.g1);
    let nt = (CM / CS) * (CN / CS);

    for (var g = ga; g < gb; g++) {
        let r_lo = max(offset(g), m0);
        let r_hi = min(offset(g + 1u), m_end);
        let c = cols(g, n0, n0 + CN);
        if (r_lo >= r_hi || c.x >= c.y) {
            continue;
        }
        var acc0 = CC();
        var acc1 = CC();
        var acc2 = CC();
        var acc3 = CC();
        for (var k0 = 0u; k0 < p.k; k0 += CK) {
            // Stage 2048 x values and 2048 weights: 4 groups of 4 per invocation. Rows outside
            // this group and columns past K are zeros, so they add nothing.
            for (var i = 0u; i < 4u; i++) {
                let e = (lid + i * 128u) * 4u;
                let r = m0 + e / CK;
                var ok = r >= r_lo && r < r_hi;
                var src = 0u;
                if (ok) {
                    src = source(r);
                    ok = src < p.mx;
                }
                let xv = load_x4(ok, src, k0 + e % CK);
                let n = n0 + e / CK;
                let wv = load_w4(n >= c.x && n < c.y, g * p.n + wcol(n) - p.row0, k0 + e % CK);
                for (var j = 0u; j < 4u; j++) {
                    if (SPLIT) {
                        // hi: x's top 11 significant bits, cut with an integer mask (an f16 round
                        // trip, x - f32(f16(x)), is folded to 0 by some compilers: lavapipe's is),
                        // so x - hi is exact in f32 and lo carries the next 11 bits.
                        let hi = bitcast<f32>(bitcast<u32>(xv[j]) & 0xffffe000u);
                        ca[e + j] = to_f16(hi);
                        cl[e + j] = to_f16(xv[j] - hi);
                    } else {
                        ca[e + j] = to_f16(xv[j]);
                    }
                    cb[e + j] = to_f16(wv[j]);
                }
            }
            workgroupBarrier();
            for (var kk = 0u; kk < CK; kk += CS) {
                if (sid < nt) {
                    acc0 = coop_step(sid, kk, acc0);
                }
                if (sid + nsg < nt) {
                    acc1 = coop_step(sid + nsg, kk, acc1);
                }
                if (sid + 2u * nsg < nt) {
                    acc2 = coop_step(sid + 2u * nsg, kk, acc2);
                }
                if (sid + 3u * nsg < nt) {
                    acc3 = coop_step(sid + 3u * nsg, kk, acc3);
                }
            }
            workgroupBarrier();
        }
        if (sid < nt) {
            coop_store(sid, acc0);
        }
        if (sid + nsg < nt) {
            coop_store(sid + nsg, acc1);
        }
        if (sid + 2u * nsg < nt) {
            coop_store(sid + 2u * nsg, acc2);
        }
        if (sid + 3u * nsg < nt) {
            coop_store(sid + 3u * nsg, acc3);
        }
        workgroupBarrier();
        // The epilogue: only this group's rows and this part's columns (c.y is even for SwiGLU).
        if (p.swiglu != 0u) {
            for (var i = lid; i < CM * CN / 2u; i += 128u) {
                let row = i / (CN / 2u);
                let col = n0 + 2u * (i % (CN / 2u));
                let r = m0 + row;
                if (r >= r_lo && r < r_hi && col >= c.x && col < c.y) {
                    let at = row * CN + col - n0;
                    y[r * ny() + col / 2u] = silu(cc[at]) * cc[at + 1u];
                }
            }
        } else {
            for (var i = lid; i < CM * CN; i += 128u) {
                let r = m0 + i / CN;
                let col = n0 + i % CN;
                if (r >= r_lo && r < r_hi && col >= c.x && col < c.y) {
                    y[r * p.n + col] = cc[i];
                }
            }
        }
        workgroupBarrier();
    }
}
