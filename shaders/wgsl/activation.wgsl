// activation (SwiGLU): gate_up [M, 2I] f32 -> h [M, I] f32, h = silu(gate) * up with
// silu(g) = g / (1 + exp(-g)), gate the first I columns of a row and up the last I.
//
// The host prepends `const VEC: bool` (I % 4 == 0: one vec4 of h per step). Grid-stride loop over
// the elements of h, so any size runs with a bounded dispatch.

struct Params {
    m: u32,
    i: u32,
    _p0: u32,
    _p1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> gu: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> h: array<vec4<f32>>;

fn silu(g: f32) -> f32 {
    return g / (1.0 + exp(-g));
}

fn gu1(i: u32) -> f32 {
    return gu[i >> 2u][i & 3u];
}

@compute @workgroup_size(256)
fn main(@builtin(global_invocation_id) gid3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let stride = nwg.x * 256u;
    if (VEC) {
        let iq = p.i / 4u;
        let total = p.m * iq;
        for (var idx = gid3.x; idx < total; idx += stride) {
            let r = idx / iq;
            let c = idx % iq;
            let g = gu[r * 2u * iq + c];
            let u = gu[r * 2u * iq + iq + c];
            h[idx] = vec4<f32>(silu(g.x) * u.x, silu(g.y) * u.y, silu(g.z) * u.z, silu(g.w) * u.w);
        }
    } else {
        let total = p.m * p.i;
        for (var idx = gid3.x; idx < total; idx += stride) {
            let r = idx / p.i;
            let c = idx % p.i;
            let v = silu(gu1(r * 2u * p.i + c)) * gu1(r * 2u * p.i + p.i + c);
            h[idx >> 2u][idx & 3u] = v;
        }
    }
}
