// router_topk: logits [T, E] f32 -> topk_ids [T, k] u32 (best first), topk_weights [T, k] f32.
//
// One workgroup per token. Matches moe_hal::host::route_token exactly in its choices:
// * scores are ranked by a u32 key: larger score first, NaN below every number (key 1), an expert
//   outside the kept groups below everything (key 0), -0.0 equal to +0.0; equal keys go to the
//   lower expert index. The j-th pick is the best candidate ranking strictly below pick j-1, so no
//   per-expert "taken" array is needed and any E works (keys live in a scratch buffer, not in
//   fixed-size workgroup arrays).
// * softmax: max over non-NaN logits, the sum of exp(l - max) in index order on one invocation
//   (the host's order); any NaN logit, or an infinite max, makes every probability NaN (as on the
//   host, where NaN propagates through the sum).
// * sigmoid-grouped: s = 1/(1+exp(-l)), c = s + bias; a group's score is the sum of its best
//   min(2, group size) c; the best topk_group groups are kept; weights use s; the norm adds 1e-20.
// Weights are summed in pick order on one invocation, as the host does.

struct Params {
    t: u32,          // tokens in this dispatch
    t0: u32,         // first token of this dispatch
    e: u32,          // experts
    k: u32,          // experts per token
    mode: u32,       // 0 softmax, 1 sigmoid grouped
    n_group: u32,
    topk_group: u32,
    norm: u32,       // norm_topk_prob
    has_bias: u32,
    scale: f32,      // routed_scaling_factor (sigmoid)
    keys_stride: u32,// u32 per token in the scratch: e + n_group
    _p0: u32,
    _p1: u32, _p2: u32, _p3: u32, _p4: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> logits: array<f32>;
@group(0) @binding(2) var<storage, read> bias: array<f32>;
@group(0) @binding(3) var<storage, read_write> keys: array<u32>;
@group(0) @binding(4) var<storage, read_write> ids: array<u32>;
@group(0) @binding(5) var<storage, read_write> weights: array<f32>;

const WG: u32 = 64u;
var<workgroup> red_k: array<u32, WG>;
var<workgroup> red_i: array<u32, WG>;
var<workgroup> red_f: array<f32, WG>;
var<workgroup> sh_sum: f32;
var<workgroup> sh_max: f32;
var<workgroup> sh_nan: u32;

fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

fn is_inf(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) == 0x7f800000u;
}

fn nan() -> f32 {
    return bitcast<f32>(0x7fc00000u);
}

// Order-preserving key of a score: NaN -> 1, masked -> 0 (never produced here), numbers above.
fn key(v: f32) -> u32 {
    if (is_nan(v)) {
        return 1u;
    }
    var b = bitcast<u32>(v);
    if (b == 0x80000000u) {
        b = 0u;
    }
    if ((b & 0x80000000u) != 0u) {
        return ~b;
    }
    return b | 0x80000000u;
}

// (ka, ia) ranks above (kb, ib).
fn above(ka: u32, ia: u32, kb: u32, ib: u32) -> bool {
    return ka > kb || (ka == kb && ia < ib);
}

fn sigmoid(l: f32) -> f32 {
    if (is_nan(l)) {
        return nan();
    }
    return 1.0 / (1.0 + exp(-l));
}

fn corrected(tok: u32, i: u32) -> f32 {
    let s = sigmoid(logits[tok * p.e + i]);
    if (p.has_bias != 0u) {
        return s + bias[i];
    }
    return s;
}

fn softmax_p(tok: u32, i: u32) -> f32 {
    let l = logits[tok * p.e + i];
    if (sh_nan != 0u) {
        return nan();
    }
    return exp(l - sh_max) / sh_sum;
}

// Workgroup argmax of (red_k, red_i); the winner ends in slot 0. All invocations call it.
fn reduce_best(lid: u32) {
    workgroupBarrier();
    for (var s = WG / 2u; s > 0u; s = s / 2u) {
        if (lid < s) {
            let ok = red_k[lid + s];
            let oi = red_i[lid + s];
            if (above(ok, oi, red_k[lid], red_i[lid])) {
                red_k[lid] = ok;
                red_i[lid] = oi;
            }
        }
        workgroupBarrier();
    }
}

// The next best key among keys[base .. base + count) ranked strictly below (pk, pi) (any key
// when `first`), reduced over the workgroup: returns (key, index) of the winner to every lane.
fn next_best(base: u32, count: u32, pk: u32, pi: u32, first: bool, lid: u32) -> vec2<u32> {
    var ck = 0u;
    var ci = 0xffffffffu;
    for (var i = lid; i < count; i += WG) {
        let ki = keys[base + i];
        let below = first || above(pk, pi, ki, i);
        if (below && (ci == 0xffffffffu || above(ki, i, ck, ci))) {
            ck = ki;
            ci = i;
        }
    }
    red_k[lid] = ck;
    red_i[lid] = ci;
    reduce_best(lid);
    return vec2<u32>(red_k[0], red_i[0]);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let local_t = wid3.x + wid3.y * nwg.x;
    if (local_t >= p.t) {
        return;
    }
    let tok = p.t0 + local_t;
    let kb = local_t * p.keys_stride; // this token's keys in the scratch
    let e = p.e;

    if (p.mode == 0u) {
        // ---- softmax ----
        var m = bitcast<f32>(0xff800000u); // -inf
        var any_nan = 0u;
        for (var i = lid; i < e; i += WG) {
            let l = logits[tok * e + i];
            if (is_nan(l)) {
                any_nan = 1u;
            } else {
                m = max(m, l);
            }
        }
        red_f[lid] = m;
        red_k[lid] = any_nan;
        workgroupBarrier();
        for (var s = WG / 2u; s > 0u; s = s / 2u) {
            if (lid < s) {
                red_f[lid] = max(red_f[lid], red_f[lid + s]);
                red_k[lid] = red_k[lid] | red_k[lid + s];
            }
            workgroupBarrier();
        }
        if (lid == 0u) {
            let mx = red_f[0];
            var bad = red_k[0];
            if (is_inf(mx)) {
                bad = 1u;
            }
            var sum = 0.0;
            if (bad == 0u) {
                for (var i = 0u; i < e; i++) {
                    sum += exp(logits[tok * e + i] - mx);
                }
            }
            sh_max = mx;
            sh_sum = sum;
            sh_nan = bad;
        }
        workgroupBarrier();
        for (var i = lid; i < e; i += WG) {
            keys[kb + i] = key(softmax_p(tok, i));
        }
    } else {
        // ---- sigmoid, bias-corrected, group-limited ----
        let per = e / max(p.n_group, 1u); // n_group >= 1 (validated); never a division by zero
        let take = min(per, 2u);
        let gb = kb + e; // group keys follow the expert keys
        for (var g = lid; g < p.n_group; g += WG) {
            var bk = 0u;
            var bi = 0xffffffffu;
            for (var i = g * per; i < (g + 1u) * per; i++) {
                let ki = key(corrected(tok, i));
                if (bi == 0xffffffffu || above(ki, i, bk, bi)) {
                    bk = ki;
                    bi = i;
                }
            }
            var score = corrected(tok, bi);
            if (take == 2u) {
                var sk = 0u;
                var si = 0xffffffffu;
                for (var i = g * per; i < (g + 1u) * per; i++) {
                    let ki = key(corrected(tok, i));
                    if (above(ki, i, bk, bi) || i == bi) {
                        continue;
                    }
                    if (si == 0xffffffffu || above(ki, i, sk, si)) {
                        sk = ki;
                        si = i;
                    }
                }
                score = score + corrected(tok, si);
            }
            keys[gb + g] = key(score);
        }
        storageBarrier();
        // The topk_group-th best group is the threshold: groups ranking at or above it are kept.
        var pk = 0xffffffffu;
        var pi = 0xffffffffu;
        var first = true;
        for (var j = 0u; j < p.topk_group; j++) {
            let best = next_best(gb, p.n_group, pk, pi, first, lid);
            pk = best.x;
            pi = best.y;
            first = false;
            workgroupBarrier();
        }
        for (var i = lid; i < e; i += WG) {
            let g = i / per;
            let gk = keys[gb + g];
            var kk = 0u;
            if (!above(pk, pi, gk, g)) {
                kk = key(corrected(tok, i));
            }
            keys[kb + i] = kk;
        }
    }
    storageBarrier();

    // ---- top-k over the keys ----
    var pk = 0xffffffffu;
    var pi = 0xffffffffu;
    var first = true;
    for (var j = 0u; j < p.k; j++) {
        let best = next_best(kb, e, pk, pi, first, lid);
        pk = best.x;
        pi = best.y;
        first = false;
        if (lid == 0u) {
            ids[tok * p.k + j] = min(pi, e - 1u);
        }
        workgroupBarrier();
    }

    // ---- weights, summed in pick order on one invocation ----
    if (lid == 0u) {
        var total = 0.0;
        for (var j = 0u; j < p.k; j++) {
            let i = ids[tok * p.k + j];
            if (p.mode == 0u) {
                total += softmax_p(tok, i);
            } else {
                total += sigmoid(logits[tok * e + i]);
            }
        }
        if (p.mode != 0u) {
            total += 1e-20;
        }
        for (var j = 0u; j < p.k; j++) {
            let i = ids[tok * p.k + j];
            if (p.mode == 0u) {
                let v = softmax_p(tok, i);
                weights[tok * p.k + j] = select(v, v / total, p.norm != 0u);
            } else {
                let v = sigmoid(logits[tok * e + i]);
                weights[tok * p.k + j] = select(v, v / total, p.norm != 0u) * p.scale;
            }
        }
    }
}
