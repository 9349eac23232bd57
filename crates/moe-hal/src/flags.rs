//! Device error flags: how a GPU backend reports bad data its kernels found, without a host
//! round trip inside an op.
//!
//! Kernels never index out of bounds on bad input (an expert id `>= E`, offsets that are not
//! cumulative, a gather or row index past the end): they clamp or skip, and record the problem in
//! a small device buffer of [`WORDS`] u32 that the backend reads (and clears) at its next blocking
//! call (`synchronize`, `download`), turning it into an [`crate::Error::InvalidArgument`] with
//! [`decode`]. The WGSL and CUDA backends share this layout; a new port may too.
//!
//! | word | meaning (kernels `atomicOr` flags and `atomicMax` values) |
//! |---|---|
//! | 0 | nonzero: `permute` saw an expert id `>= E` |
//! | 1, 2 | the largest such id, and `E` |
//! | 3 | `grouped_gemm` offsets: bit 0 does not start at 0, bit 1 decreases, bit 2 ends past `M` |
//! | 4, 5 | the last offset, and `M` |
//! | 6 | nonzero: `grouped_gemm` saw a `token_index` `>=` the rows of `x` |
//! | 7, 8 | the largest such index, and the rows of `x` |
//! | 9 | nonzero: `combine` saw a `row_index` `>=` the rows of `y` |
//! | 10, 11 | the largest such index, and the rows of `y` |
//! | 12..16 | unused |

use crate::Result;

/// Size of the flag buffer in u32 words.
pub const WORDS: usize = 16;

/// The first error the flag words describe, or `Ok` when none is raised.
pub fn decode(w: &[u32; WORDS]) -> Result<()> {
    if w[0] != 0 {
        return crate::invalid!("topk_ids holds an expert id >= {} (largest: {}); ids must be below the expert count", w[2], w[1]);
    }
    if w[3] & 1 != 0 {
        return crate::invalid!("expert_offsets must start at 0");
    }
    if w[3] & 2 != 0 {
        return crate::invalid!("expert_offsets are not cumulative (they decrease somewhere)");
    }
    if w[3] & 4 != 0 {
        return crate::invalid!("expert_offsets ends at {} but y has only {} rows", w[4], w[5]);
    }
    if w[6] != 0 {
        return crate::invalid!("token_index holds {} but x has only {} rows", w[7], w[8]);
    }
    if w[9] != 0 {
        return crate::invalid!("row_index holds {} but y has only {} rows", w[10], w[11]);
    }
    Ok(())
}
