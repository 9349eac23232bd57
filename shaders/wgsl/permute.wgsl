// permute: topk_ids [T, k] u32 -> expert_offsets [E + 1], row_index [T * k], token_index [T * k].
//
// A stable counting sort in three passes, no host round trip, any T * k and any E:
// 1. rank    (one workgroup per tile of 256 pairs): each pair's rank among the earlier pairs of
//            its tile with the same expert (kept in row_index for now), and the tile's count per
//            expert (tile_counts[tile][e]).
// 2. scan    (one workgroup): per expert, an exclusive scan of its counts over the tiles (so
//            tile_counts[tile][e] becomes the rank of the tile's first pair), then an exclusive
//            scan of the expert totals: base[e] = expert_offsets[e].
// 3. scatter (one invocation per pair): row = base[e] + tile_counts[tile][e] + rank.
// Pairs keep their order within an expert, so the plan equals the host's bit for bit.
//
// An id >= E is counted in an extra bucket E after every expert (so every row and index stays in
// bounds and expert_offsets[E] counts only the valid pairs) and flagged in errs[0..3]; the host
// turns the flag into InvalidArgument at the next synchronize/download.

struct Params {
    pairs: u32,   // T * k
    e: u32,       // experts
    k: u32,       // experts per token
    tiles: u32,   // ceil(pairs / 256)
    _p: array<vec4<u32>, 3>,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> row_index: array<u32>;
@group(0) @binding(3) var<storage, read_write> token_index: array<u32>;
@group(0) @binding(4) var<storage, read_write> tile_counts: array<u32>;
@group(0) @binding(5) var<storage, read_write> base: array<u32>;
@group(0) @binding(6) var<storage, read_write> offsets: array<u32>;
@group(0) @binding(7) var<storage, read_write> errs: array<atomic<u32>>;

const TILE: u32 = 256u;
var<workgroup> sid: array<u32, TILE>;
var<workgroup> scan: array<u32, TILE>;
var<workgroup> carry: u32;

fn bucket(pair: u32, flag: bool) -> u32 {
    let id = ids[pair];
    if (id >= p.e) {
        if (flag) {
            atomicOr(&errs[0], 1u);
            atomicMax(&errs[1], id);
            atomicMax(&errs[2], p.e);
        }
        return p.e;
    }
    return id;
}

@compute @workgroup_size(256)
fn rank(@builtin(workgroup_id) wid3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) lid: u32) {
    let tile = wid3.x + wid3.y * nwg.x;
    if (tile >= p.tiles) {
        return;
    }
    let pair = tile * TILE + lid;
    var e = p.e + 1u; // no pair
    if (pair < p.pairs) {
        e = bucket(pair, true);
    }
    sid[lid] = e;
    let tb = tile * (p.e + 1u);
    for (var i = lid; i <= p.e; i += TILE) {
        tile_counts[tb + i] = 0u;
    }
    workgroupBarrier();
    storageBarrier();
    var before = 0u;
    var after = 0u;
    for (var j = 0u; j < TILE; j++) {
        if (sid[j] == e) {
            if (j < lid) {
                before += 1u;
            } else if (j > lid) {
                after += 1u;
            }
        }
    }
    if (pair < p.pairs) {
        row_index[pair] = before;
        if (after == 0u) {
            tile_counts[tb + e] = before + 1u;
        }
    }
}

@compute @workgroup_size(256)
fn scan_counts(@builtin(local_invocation_index) lid: u32) {
    let buckets = p.e + 1u;
    for (var e = lid; e < buckets; e += TILE) {
        var running = 0u;
        for (var t = 0u; t < p.tiles; t++) {
            let c = tile_counts[t * buckets + e];
            tile_counts[t * buckets + e] = running;
            running += c;
        }
        base[e] = running;
    }
    if (lid == 0u) {
        carry = 0u;
    }
    workgroupBarrier();
    storageBarrier();
    for (var c0 = 0u; c0 < buckets; c0 += TILE) {
        let i = c0 + lid;
        var v = 0u;
        if (i < buckets) {
            v = base[i];
        }
        scan[lid] = v;
        workgroupBarrier();
        for (var s = 1u; s < TILE; s = s * 2u) {
            var add = 0u;
            if (lid >= s) {
                add = scan[lid - s];
            }
            workgroupBarrier();
            scan[lid] += add;
            workgroupBarrier();
        }
        let excl = carry + scan[lid] - v;
        if (i < buckets) {
            base[i] = excl;
            offsets[i] = excl;
        }
        workgroupBarrier();
        if (lid == TILE - 1u) {
            carry = excl + v;
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn scatter(@builtin(workgroup_id) wid3: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
           @builtin(local_invocation_index) lid: u32) {
    let tile = wid3.x + wid3.y * nwg.x;
    let pair = tile * TILE + lid;
    if (pair >= p.pairs) {
        return;
    }
    let e = bucket(pair, false);
    let row = base[e] + tile_counts[tile * (p.e + 1u) + e] + row_index[pair];
    row_index[pair] = row;
    token_index[row] = pair / p.k;
}
