// combine: out [T, H] f32, out[t] = sum_{j < k} topk_weights[t, j] * y[row_index[t * k + j]]
// summed in order j = 0, 1, .. from zero, then + shared[t] when given (the host's order).
//
// The host prepends `const VEC: bool` (H % 4 == 0: one vec4 of out per step). A row_index >= the
// rows of y is skipped (no out-of-bounds read) and flagged in errs[9..12]; the host reports it as
// InvalidArgument at the next synchronize/download.

struct Params {
    t: u32,
    h: u32,
    k: u32,
    rows: u32,       // rows of y (T * k)
    has_shared: u32,
    _p0: u32,
    _p1: u32,
    _p2: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> y: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read> row_index: array<u32>;
@group(0) @binding(3) var<storage, read> tw: array<f32>;
@group(0) @binding(4) var<storage, read> shared_y: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read_write> errs: array<atomic<u32>>;

fn row(t: u32, j: u32) -> u32 {
    let r = row_index[t * p.k + j];
    if (r >= p.rows) {
        atomicOr(&errs[9], 1u);
        atomicMax(&errs[10], r);
        atomicMax(&errs[11], p.rows);
    }
    return r;
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    if (VEC) {
        let hq = p.h / 4u;
        let total = p.t * hq;
        for (var idx = gid3.x; idx < total; idx += stride) {
            let t = idx / hq;
            let c = idx % hq;
            var acc = vec4<f32>(0.0);
            for (var j = 0u; j < p.k; j++) {
                let r = row(t, j);
                if (r < p.rows) {
                    acc += tw[t * p.k + j] * y[r * hq + c];
                }
            }
            if (p.has_shared != 0u) {
                acc += shared_y[idx];
            }
            out[idx] = acc;
        }
    } else {
        let total = p.t * p.h;
        for (var idx = gid3.x; idx < total; idx += stride) {
            let t = idx / p.h;
            let c = idx % p.h;
            var acc = 0.0;
            for (var j = 0u; j < p.k; j++) {
                let r = row(t, j);
                if (r < p.rows) {
                    let yi = r * p.h + c;
                    acc += tw[t * p.k + j] * y[yi >> 2u][yi & 3u];
                }
            }
            if (p.has_shared != 0u) {
                acc += shared_y[idx >> 2u][idx & 3u];
            }
            out[idx >> 2u][idx & 3u] = acc;
        }
    }
}
