// grouped_gemm: y [M, N] f32 = x[src(r)] . w[g]^T for the rows r of each group g.
// grouped_gemm_swiglu (p.swiglu = 1): the same GEMM over N = 2I weight rows per group, with
// SwiGLU in the epilogue, so only h [M, I] = silu(gate) * up is written. Tiles then walk the 2I
// columns *interleaved*: tile column 2j holds gate row j and column 2j + 1 up row I + j (wcol),
// so the invocation that owns column 2j owns 2j + 1 too and pairs them in registers.
//
// The host prepends these constants to this file:
//   const DT: u32   storage dtype of w: 0 f32, 1 f16, 2 bf16, 3 f8_e4m3 (read from u32 words; f16
//                   with unpack2x16float, bf16 as the high half of an f32, f8_e4m3 decoded by
//                   e4m3x4() and multiplied by its block's scale from sc). Accumulation is f32.
//   const SBN: u32, SBK: u32
//                   f8_e4m3: rows and columns of one scale block (1 for the other dtypes). Weight
//                   element [g, n, k] is e4m3(q) * sc[(g * ceil(N / SBN) + n / SBN) * ceil(K / SBK)
//                   + k / SBK], the product in f32 (as DeepSeek's and transformers' dequantization).
//   const VEC: bool the aligned path: K % 4 == 0 (tiled) or K % 8 == 0 (gemv), so rows start on
//                   whole vectors and loads are vec4; otherwise element loads with bounds checks.
//                   f8_e4m3 also needs SBK % 4 == 0, so four aligned elements share one scale.
//   const GEMV_RB: u32
//                   gemv's token rows per pass: 8 (4 under MOE_GEMV_PASS_ROWS=4, to compare).
//
// Entry points (the host picks one from shapes only, never from device data):
//   prep   validates expert_offsets and token_index (flags in errs, no out-of-bounds access) and
//          writes zeros to the rows past expert_offsets[G]. Runs once per call.
//   tiled  many rows per expert: a 64x64 tile of y per workgroup, 16-deep K slices of x and w
//          staged in workgroup memory, a 4x4 block of outputs per invocation. A tile finds the
//          groups its rows belong to by binary search in expert_offsets and loops over them.
//   gemv   few rows per expert (decode): a workgroup owns 16 weight rows of one expert and streams
//          them once (coalesced vec4 loads, 32 invocations per row), for up to 8 of the expert's
//          token rows at a time; partial sums are reduced in workgroup memory. The grid has one
//          slot per group, or, when M < G (decode: most experts idle), one slot per row of y where
//          only the first row of each group works, so idle experts cost no launch at all.
// Both run once per native part of w, which holds the rows [row0, row1) of the [G * N, K] view
// (whole experts unless one expert exceeds a binding); columns outside it are left to other parts.
// The fused mode runs only on parts of whole experts (the host checks), so a pair never straddles.

struct Params {
    m: u32,       // rows of y
    n: u32,       // columns of y (rows of one expert's weight)
    k: u32,       // reduction length
    mx: u32,      // rows of x
    g: u32,       // groups G (1 without offsets)
    grouped: u32, // expert_offsets given
    gather: u32,  // token_index given
    g0: u32,      // first group of this part
    g1: u32,      // one past the last group of this part
    row0: u32,    // first row of the [G * N, K] view in this part
    row1: u32,    // one past the last
    tiles_n: u32, // column tiles per row tile (tiled) or per group (gemv)
    total_wg: u32,// workgroups that do work
    zero_all: u32,// prep: zero every row (K = 0)
    by_row: u32,  // gemv: workgroup slots are rows of y (M < G), not groups
    swiglu: u32,  // SwiGLU epilogue: y is h [M, N / 2], tile columns interleave gate and up
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> ti: array<u32>;
@group(0) @binding(3) var<storage, read> w: array<vec4<u32>>;
@group(0) @binding(4) var<storage, read> off: array<u32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@group(0) @binding(6) var<storage, read_write> errs: array<atomic<u32>>;
@group(0) @binding(7) var<storage, read> sc: array<f32>; // f8_e4m3 block scales (else unused)

// ---- shared helpers ----

// Columns of the output: N, or I = N / 2 with the SwiGLU epilogue.
fn ny() -> u32 {
    return select(p.n, p.n / 2u, p.swiglu != 0u);
}

// The weight row (within its group) behind tile column v: v itself, or, interleaved for SwiGLU,
// gate row v / 2 for even v and up row I + v / 2 for odd v.
fn wcol(v: u32) -> u32 {
    if (p.swiglu == 0u) {
        return v;
    }
    return (v & 1u) * (p.n / 2u) + (v >> 1u);
}

// silu(g) = g / (1 + exp(-g)), as activation.wgsl computes it (g = -100: exp overflows, -0).
fn silu(g: f32) -> f32 {
    return g / (1.0 + exp(-g));
}

// expert_offsets[g] clamped to M (the whole range without offsets).
fn offset(g: u32) -> u32 {
    if (p.grouped == 0u) {
        return select(0u, p.m, g > 0u);
    }
    return min(off[g], p.m);
}

// The group of row r: the largest g < G with offset(g) <= r (0 when none). Always < G, whatever
// the offsets hold.
fn group_of(r: u32) -> u32 {
    var lo = 1u;
    var hi = p.g;
    while (lo < hi) {
        let mid = (lo + hi) / 2u;
        if (offset(mid) > r) {
            hi = mid;
        } else {
            lo = mid + 1u;
        }
    }
    return lo - 1u;
}

// The x row holding row r of y; p.mx when out of range (read as zeros, flagged by prep).
fn source(r: u32) -> u32 {
    if (p.gather != 0u) {
        return min(ti[r], p.mx);
    }
    return r;
}

fn x1(row: u32, col: u32) -> f32 {
    let i = row * p.k + col;
    return x[i >> 2u][i & 3u];
}

// float8_e4m3fn bytes (the low 8 bits of each lane) as f32, exactly: sign, 4 exponent bits (bias
// 7), 3 mantissa bits. A normal value is rebuilt as f32 bits (exponent rebiased by 120); exponent 0
// is m * 2^-9, computed, so no f32 denormal is involved (a GPU may flush those); S.1111.111 is NaN
// (built from runtime bits: WGSL rejects a NaN constant).
fn e4m3(b: vec4<u32>) -> vec4<f32> {
    let e = (b >> vec4<u32>(3u)) & vec4<u32>(15u);
    let m = b & vec4<u32>(7u);
    let normal = bitcast<vec4<f32>>(((e + vec4<u32>(120u)) << vec4<u32>(23u)) | (m << vec4<u32>(20u)));
    var v = select(normal, vec4<f32>(m) * 0.001953125, e == vec4<u32>(0u));
    v = select(v, bitcast<vec4<f32>>(vec4<u32>(0x7fc00000u) | m), (b & vec4<u32>(0x7fu)) == vec4<u32>(0x7fu));
    return select(v, -v, (b & vec4<u32>(0x80u)) != vec4<u32>(0u));
}

// The four bytes of a word, lowest first.
fn bytes4(word: u32) -> vec4<u32> {
    return (vec4<u32>(word) >> vec4<u32>(0u, 8u, 16u, 24u)) & vec4<u32>(0xffu);
}

// The four float8_e4m3fn bytes of a word (lowest first) times 2^-8, exactly: the callers put the
// 2^8 back (w4 on each value, gemv on each finished sum). e4m3() costs ~19 operations per byte,
// which at decode would bound the f8 gemv well below memory bandwidth on a GPU; this ~4 (13
// integer operations and two unpacks per word).
// Each byte's 7 magnitude bits become bits 7..13 of an f16 and its sign bit 15: E4M3's exponent
// and mantissa under f16's bias 15 instead of 7, so the value is 2^-8 of the byte's (exponent 0
// becomes an f16 subnormal, which unpack2x16float widens exactly to a normal f32). Bytes 0 and 2
// share one f16 pair, 1 and 3 the other. A word holding a NaN byte (low 7 bits all set: adding 1
// to each byte carries into its bit 7) takes e4m3(), since the f16 route would read it as 480.
fn e4m3x4(word: u32) -> vec4<f32> {
    let even = unpack2x16float(((word << 7u) & 0x3f803f80u) | ((word << 8u) & 0x80008000u));
    let odd = unpack2x16float(((word >> 1u) & 0x3f803f80u) | (word & 0x80008000u));
    if ((((word & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u) != 0u) {
        return e4m3(bytes4(word)) * 0.00390625;
    }
    return vec4<f32>(even.x, odd.x, even.y, odd.y);
}

// f8_e4m3: the scale of weight element (row, col), row local to this part.
fn wscale(row: u32, col: u32) -> f32 {
    let rg = row + p.row0; // row of the [G * N, K] view
    let grid_k = (p.k + SBK - 1u) / SBK;
    let grid_n = (p.n + SBN - 1u) / SBN;
    return sc[((rg / p.n) * grid_n + (rg % p.n) / SBN) * grid_k + col / SBK];
}

// Weight element (row, col) (row local to this part) as f32.
fn w1(row: u32, col: u32) -> f32 {
    let i = row * p.k + col;
    if (DT == 0u) {
        return bitcast<f32>(w[i >> 2u][i & 3u]);
    }
    if (DT == 3u) {
        let word = w[i >> 4u][(i >> 2u) & 3u];
        return e4m3(vec4<u32>((word >> ((i & 3u) * 8u)) & 0xffu)).x * wscale(row, col);
    }
    let word = w[i >> 3u][(i >> 1u) & 3u];
    let h = select(word & 0xffffu, word >> 16u, (i & 1u) != 0u);
    if (DT == 1u) {
        return unpack2x16float(h).x;
    }
    return bitcast<f32>(h << 16u);
}

fn unpack2(word: u32) -> vec2<f32> {
    if (DT == 1u) {
        return unpack2x16float(word);
    }
    return vec2<f32>(bitcast<f32>(word << 16u), bitcast<f32>(word & 0xffff0000u));
}

// Four weight elements from (row, col), (row * K + col) % 4 == 0 (f8_e4m3: SBK % 4 == 0 too, so
// they share one scale).
fn w4(row: u32, col: u32) -> vec4<f32> {
    let i = row * p.k + col;
    if (DT == 0u) {
        return bitcast<vec4<f32>>(w[i >> 2u]);
    }
    if (DT == 3u) {
        return e4m3x4(w[i >> 4u][(i >> 2u) & 3u]) * 256.0 * wscale(row, col);
    }
    let v = w[i >> 3u];
    let pair = select(v.xy, v.zw, (i & 4u) != 0u);
    return vec4<f32>(unpack2(pair.x), unpack2(pair.y));
}

// The columns of group g that this part holds, intersected with [c0, c1).
fn cols(g: u32, c0: u32, c1: u32) -> vec2<u32> {
    let gn = g * p.n;
    var lo = c0;
    if (p.row0 > gn) {
        lo = max(lo, p.row0 - gn);
    }
    var hi = min(c1, p.n);
    hi = min(hi, p.row1 - min(p.row1, gn));
    return vec2<u32>(lo, hi);
}

// ---- prep: validation and the zero tail ----

@compute @workgroup_size(256)
fn prep(@builtin(global_invocation_id) gid3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let i0 = gid3.x;
    let stride = nwg.x * 256u;
    if (p.grouped != 0u) {
        if (i0 == 0u) {
            if (off[0] != 0u) {
                atomicOr(&errs[3], 1u);
            }
            if (off[p.g] > p.m) {
                atomicOr(&errs[3], 4u);
                atomicMax(&errs[4], off[p.g]);
                atomicMax(&errs[5], p.m);
            }
        }
        for (var g = i0; g < p.g; g += stride) {
            if (off[g + 1u] < off[g]) {
                atomicOr(&errs[3], 2u);
            }
        }
    }
    if (p.gather != 0u) {
        for (var r = i0; r < p.m; r += stride) {
            if (ti[r] >= p.mx) {
                atomicOr(&errs[6], 1u);
                atomicMax(&errs[7], ti[r]);
                atomicMax(&errs[8], p.mx);
            }
        }
    }
    var end = offset(p.g);
    if (p.zero_all != 0u) {
        end = 0u;
    }
    let width = ny();
    for (var i = end * width + i0; i < p.m * width; i += stride) {
        y[i] = 0.0;
    }
}

// ---- tiled: many rows per group ----

const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
var<workgroup> xs: array<vec4<f32>, 256>; // [BK][BM / 4]
var<workgroup> ws: array<vec4<f32>, 256>; // [BK][BN / 4]

fn load_x4(ok: bool, src: u32, kk: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (!ok) {
        return v;
    }
    if (VEC) {
        if (kk < p.k) {
            v = x[(src * p.k + kk) >> 2u];
        }
    } else {
        for (var j = 0u; j < 4u; j++) {
            if (kk + j < p.k) {
                v[j] = x1(src, kk + j);
            }
        }
    }
    return v;
}

fn load_w4(ok: bool, wrow: u32, kk: u32) -> vec4<f32> {
    var v = vec4<f32>(0.0);
    if (!ok) {
        return v;
    }
    if (VEC) {
        if (kk < p.k) {
            v = w4(wrow, kk);
        }
    } else {
        for (var j = 0u; j < 4u; j++) {
            if (kk + j < p.k) {
                v[j] = w1(wrow, kk + j);
            }
        }
    }
    return v;
}

@compute @workgroup_size(256)
fn tiled(@builtin(workgroup_id) wid3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
         @builtin(local_invocation_index) lid: u32) {
    let wid = wid3.x + wid3.y * nwg.x;
    if (wid >= p.total_wg) {
        return;
    }
    let m0 = (wid / p.tiles_n) * BM;
    let n0 = (wid % p.tiles_n) * BN;
    let m_end = min(m0 + BM, p.m);
    let ga = max(group_of(m0), p.g0);
    let gb = min(group_of(m_end - 1u) + 1u, p.g1);

    let tx = lid % 16u; // output columns n0 + 4 tx ..
    let ty = lid / 16u; // output rows m0 + 4 ty ..
    let lr = lid / 4u;  // the x row / w row this invocation stages
    let lk = (lid % 4u) * 4u;

    for (var g = ga; g < gb; g++) {
        let r_lo = max(offset(g), m0);
        let r_hi = min(offset(g + 1u), m_end);
        let c = cols(g, n0, n0 + BN);
        if (r_lo >= r_hi || c.x >= c.y) {
            continue;
        }
        let xr = m0 + lr;
        var x_ok = xr >= r_lo && xr < r_hi;
        var src = 0u;
        if (x_ok) {
            src = source(xr);
            x_ok = src < p.mx;
        }
        let wn = n0 + lr;
        let w_ok = wn >= c.x && wn < c.y;
        let wrow = g * p.n + wcol(wn) - p.row0;

        var acc0 = vec4<f32>(0.0);
        var acc1 = vec4<f32>(0.0);
        var acc2 = vec4<f32>(0.0);
        var acc3 = vec4<f32>(0.0);
        for (var k0 = 0u; k0 < p.k; k0 += BK) {
            let xv = load_x4(x_ok, src, k0 + lk);
            let wv = load_w4(w_ok, wrow, k0 + lk);
            for (var j = 0u; j < 4u; j++) {
                xs[(lk + j) * 16u + lr / 4u][lr % 4u] = xv[j];
                ws[(lk + j) * 16u + lr / 4u][lr % 4u] = wv[j];
            }
            workgroupBarrier();
            for (var kk = 0u; kk < BK; kk++) {
                let a = xs[kk * 16u + ty];
                let b = ws[kk * 16u + tx];
                acc0 += a.x * b;
                acc1 += a.y * b;
                acc2 += a.z * b;
                acc3 += a.w * b;
            }
            workgroupBarrier();
        }
        let accs = array<vec4<f32>, 4>(acc0, acc1, acc2, acc3);
        for (var i = 0u; i < 4u; i++) {
            let r = m0 + ty * 4u + i;
            if (r < r_lo || r >= r_hi) {
                continue;
            }
            if (p.swiglu != 0u) {
                // Columns 4 tx + {0, 1} and {2, 3} are (gate, up) pairs; c.y is even.
                let a = accs[i];
                let col = n0 + tx * 4u;
                if (col < c.y) {
                    y[r * ny() + col / 2u] = silu(a.x) * a.y;
                }
                if (col + 2u < c.y) {
                    y[r * ny() + col / 2u + 1u] = silu(a.z) * a.w;
                }
                continue;
            }
            for (var j = 0u; j < 4u; j++) {
                let col = n0 + tx * 4u + j;
                if (col >= c.x && col < c.y) {
                    y[r * p.n + col] = accs[i][j];
                }
            }
        }
    }
}

// ---- gemv: few rows per group ----

const TEAM: u32 = 32u;  // invocations per weight row
const NR: u32 = 2u;     // weight rows per team
const RB: u32 = GEMV_RB; // token rows per pass, at most: 8 (4 under MOE_GEMV_PASS_ROWS=4)
const COLS: u32 = 16u;  // weight rows per workgroup: 256 / TEAM * NR
var<workgroup> red: array<f32, NR * RB * 256u>; // [NR * RB][256]: a pass's partial sums (16 KiB)
// What undoes w8's 2^-8 on f8_e4m3 (the vector path only: w1 returns whole values). Applied to a
// finished sum rather than each weight, it costs nothing in the loop; the sum is bit for bit the
// unscaled one unless a product falls below f32's normal range (|x * w| < 2^-118).
const W8_POST: f32 = select(1.0, 256.0, DT == 3u && VEC);

struct V8 {
    a: vec4<f32>,
    b: vec4<f32>,
}

// The x row behind row r of y for a gemv pass, or p.mx (reads as zeros) past the group's last
// row r_hi or for a bad token index (prep flags those).
fn gemv_src(r: u32, r_hi: u32) -> u32 {
    if (r >= r_hi) {
        return p.mx;
    }
    return source(r);
}

// Eight x elements of row `row` from column kk (kk % 8 == 0, K % 8 == 0); zeros for row p.mx.
fn x8(row: u32, kk: u32) -> V8 {
    if (row >= p.mx) {
        return V8(vec4<f32>(0.0), vec4<f32>(0.0));
    }
    let xi = (row * p.k + kk) >> 2u;
    return V8(x[xi], x[xi + 1u]);
}

// One x element, zero for row p.mx.
fn x1z(row: u32, col: u32) -> f32 {
    if (row >= p.mx) {
        return 0.0;
    }
    return x1(row, col);
}

fn dot8(a: V8, b: V8) -> f32 {
    return dot(a.a, b.a) + dot(a.b, b.b);
}

// One token row's eight x elements against the team's two weight rows: (row a, row b).
fn dots(xq: V8, wa: V8, wb: V8) -> vec2<f32> {
    return vec2<f32>(dot8(xq, wa), dot8(xq, wb));
}

// One step of up to 4 token rows (sources s, the first n of them present; n uniform, so the
// tests skip absent rows' loads and FMAs) against the team's two weight rows' 8 elements:
// acc_a.y += x row s.y . wa, and so on.
fn gemv_step4(acc_a: ptr<function, vec4<f32>>, acc_b: ptr<function, vec4<f32>>, s: vec4<u32>, n: u32, kk: u32, wa: V8, wb: V8) {
    var d = dots(x8(s.x, kk), wa, wb);
    (*acc_a).x += d.x;
    (*acc_b).x += d.y;
    if (n > 1u) {
        d = dots(x8(s.y, kk), wa, wb);
        (*acc_a).y += d.x;
        (*acc_b).y += d.y;
    }
    if (n > 2u) {
        d = dots(x8(s.z, kk), wa, wb);
        (*acc_a).z += d.x;
        (*acc_b).z += d.y;
    }
    if (n > 3u) {
        d = dots(x8(s.w, kk), wa, wb);
        (*acc_a).w += d.x;
        (*acc_b).w += d.y;
    }
}

// w8, or zeros for a weight row outside the workgroup's columns (ok false).
fn w8z(ok: bool, row: u32, col: u32) -> V8 {
    if (!ok) {
        return V8(vec4<f32>(0.0), vec4<f32>(0.0));
    }
    return w8(row, col);
}

// Eight weight elements from (row, col), (row * K + col) % 8 == 0 (f8_e4m3: two scales unless
// SBK % 8 == 0, and 2^-8 of the weights' values: gemv multiplies each finished sum by W8_POST).
fn w8(row: u32, col: u32) -> V8 {
    let i = row * p.k + col;
    if (DT == 0u) {
        return V8(bitcast<vec4<f32>>(w[i >> 2u]), bitcast<vec4<f32>>(w[(i >> 2u) + 1u]));
    }
    if (DT == 3u) {
        let v = w[i >> 4u];
        let pair = select(v.xy, v.zw, (i & 8u) != 0u);
        let s0 = wscale(row, col);
        var s1 = s0;
        if (SBK % 8u != 0u) {
            s1 = wscale(row, col + 4u);
        }
        return V8(e4m3x4(pair.x) * s0, e4m3x4(pair.y) * s1);
    }
    let v = w[i >> 3u];
    return V8(vec4<f32>(unpack2(v.x), unpack2(v.y)), vec4<f32>(unpack2(v.z), unpack2(v.w)));
}

// A pass takes up to RB = 8 token rows of its group, so an expert of at most 8 rows (DeepSeek-V3
// at T = 128 averages 4 and often has 5 to 8) reads its weights once: a second pass would reread
// them from memory, since the workgroups in flight between the two reads stream more than a
// GPU's L2 holds. `nq`, the pass's rows, is the same for the whole workgroup, so the tests on it
// are uniform branches that skip absent rows' x loads and FMAs: a pass of 5 rows does 5 rows of
// work, not 8, and decode (one row per expert) has a loop of its own.
@compute @workgroup_size(256)
fn gemv(@builtin(workgroup_id) wid3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let wid = wid3.x + wid3.y * nwg.x;
    if (wid >= p.total_wg) {
        return;
    }
    let nb = (wid % p.tiles_n) * COLS;
    let slot = wid / p.tiles_n;
    var g = p.g0 + slot;
    if (p.by_row != 0u) {
        g = group_of(slot);
        if (g < p.g0 || offset(g) != slot) {
            return; // not the first row of its group: another workgroup has the group
        }
    }
    if (g >= p.g1) {
        return;
    }
    let r_lo = offset(g);
    let r_hi = max(offset(g + 1u), r_lo);
    let c = cols(g, nb, nb + COLS);
    if (r_lo >= r_hi || c.x >= c.y) {
        return; // an idle expert costs one launch
    }
    let team = lid / TEAM;
    let lane = lid % TEAM;
    // The team's two weight rows (NR = 2), each with its own accumulators: named vectors, not
    // arrays, so no compiler has to turn a loop-indexed array back into registers.
    let n_a = nb + team * NR;
    let ok_a = n_a >= c.x && n_a < c.y;
    let ok_b = n_a + 1u >= c.x && n_a + 1u < c.y;
    let row_a = g * p.n + wcol(n_a) - p.row0;
    let row_b = g * p.n + wcol(n_a + 1u) - p.row0;

    for (var rb = r_lo; rb < r_hi; rb += RB) {
        let nq = min(r_hi - rb, RB);
        // Token rows rb..rb + 3 are the lanes of the _lo accumulators, rb + 4.. those of _hi:
        // a_lo.y is weight row a times token row rb + 1. A row past the group (or with a bad
        // index) reads zeros.
        let s_lo = vec4<u32>(gemv_src(rb, r_hi), gemv_src(rb + 1u, r_hi), gemv_src(rb + 2u, r_hi), gemv_src(rb + 3u, r_hi));
        let s_hi = vec4<u32>(gemv_src(rb + 4u, r_hi), gemv_src(rb + 5u, r_hi), gemv_src(rb + 6u, r_hi), gemv_src(rb + 7u, r_hi));
        var a_lo = vec4<f32>(0.0);
        var a_hi = vec4<f32>(0.0);
        var b_lo = vec4<f32>(0.0);
        var b_hi = vec4<f32>(0.0);
        if (VEC && nq == 1u) {
            // The pass's only row (decode: one token per expert, the common case), in a loop of
            // its own where the row count is a constant: some implementations (llvmpipe) run
            // both sides of every branch under a mask, so the general loop below would cost them
            // 4 or 8 rows of work.
            for (var kk = lane * 8u; kk < p.k; kk += TEAM * 8u) {
                gemv_step4(&a_lo, &b_lo, s_lo, 1u, kk, w8z(ok_a, row_a, kk), w8z(ok_b, row_b, kk));
            }
        } else if (VEC) {
            for (var kk = lane * 8u; kk < p.k; kk += TEAM * 8u) {
                let wa = w8z(ok_a, row_a, kk);
                let wb = w8z(ok_b, row_b, kk);
                gemv_step4(&a_lo, &b_lo, s_lo, nq, kk, wa, wb);
                if (RB > 4u && nq > 4u) {
                    gemv_step4(&a_hi, &b_hi, s_hi, nq - 4u, kk, wa, wb);
                }
            }
        } else {
            for (var kk = lane; kk < p.k; kk += TEAM) {
                var wa = 0.0;
                var wb = 0.0;
                if (ok_a) {
                    wa = w1(row_a, kk);
                }
                if (ok_b) {
                    wb = w1(row_b, kk);
                }
                let xl = vec4<f32>(x1z(s_lo.x, kk), x1z(s_lo.y, kk), x1z(s_lo.z, kk), x1z(s_lo.w, kk));
                a_lo += xl * wa;
                b_lo += xl * wb;
                if (RB > 4u && nq > 4u) {
                    let xh = vec4<f32>(x1z(s_hi.x, kk), x1z(s_hi.y, kk), x1z(s_hi.z, kk), x1z(s_hi.w, kk));
                    a_hi += xh * wa;
                    b_hi += xh * wb;
                }
            }
        }
        // red[(i * RB + q) * 256 + lid]: weight row i of the team, token row rb + q. The _hi
        // half only where the pass has it (uniform).
        red[lid] = a_lo.x;
        red[256u + lid] = a_lo.y;
        red[512u + lid] = a_lo.z;
        red[768u + lid] = a_lo.w;
        red[RB * 256u + lid] = b_lo.x;
        red[(RB + 1u) * 256u + lid] = b_lo.y;
        red[(RB + 2u) * 256u + lid] = b_lo.z;
        red[(RB + 3u) * 256u + lid] = b_lo.w;
        if (RB > 4u && nq > 4u) {
            red[1024u + lid] = a_hi.x;
            red[1280u + lid] = a_hi.y;
            red[1536u + lid] = a_hi.z;
            red[1792u + lid] = a_hi.w;
            red[(RB + 4u) * 256u + lid] = b_hi.x;
            red[(RB + 5u) * 256u + lid] = b_hi.y;
            red[(RB + 6u) * 256u + lid] = b_hi.z;
            red[(RB + 7u) * 256u + lid] = b_hi.w;
        }
        workgroupBarrier();
        // One invocation per output, column fastest, so only the first nq * COLS invocations
        // (nq * COLS / NR with SwiGLU) work. Each walks its team's 32 partial sums starting at
        // its own lane (lid % 32): the 32 invocations of a subgroup read 32 different banks.
        if (p.swiglu != 0u) {
            // A team's two rows are (gate, up) of output column (nb + team * NR) / 2.
            let t = lid % (COLS / NR);
            let q = lid / (COLS / NR);
            let n = nb + t * NR;
            if (q < nq && n >= c.x && n < c.y) {
                var sg = 0.0;
                var su = 0.0;
                for (var l = 0u; l < TEAM; l++) {
                    let j = t * TEAM + (l + lid) % TEAM;
                    sg += red[q * 256u + j];
                    su += red[(RB + q) * 256u + j];
                }
                y[(rb + q) * ny() + n / 2u] = silu(sg * W8_POST) * (su * W8_POST);
            }
        } else {
            let col = lid % COLS;
            let q = lid / COLS;
            let t = col / NR;
            let i = col % NR;
            let n = nb + col;
            if (q < nq && n >= c.x && n < c.y) {
                var s = 0.0;
                for (var l = 0u; l < TEAM; l++) {
                    s += red[(i * RB + q) * 256u + t * TEAM + (l + lid) % TEAM];
                }
                y[(rb + q) * p.n + n] = s * W8_POST;
            }
        }
        workgroupBarrier();
    }
}
