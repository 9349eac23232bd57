//! The decode kernels (`gemv`) of the GPU backends: what they share.
//!
//! Both the WGSL and the CUDA `gemv` read each touched expert's weights once for up to 8 token
//! rows per pass. `MOE_GEMV_PASS_ROWS=4` makes them take 4, as they did before, so a device run
//! can measure what the 8-row pass saves (DeepSeek-V3 at 128 tokens: 1.40x the weight bytes
//! with 4-row passes, 1.02x with 8, counted by simulating the routing).

/// Token rows per `gemv` pass: 8, or 4 under `MOE_GEMV_PASS_ROWS=4`.
pub fn pass_rows() -> u32 {
    match std::env::var("MOE_GEMV_PASS_ROWS").as_deref().map(str::trim) {
        Ok("4") => 4,
        _ => 8,
    }
}

/// The line a backend adds to its features (`moe devices`) when the rows per pass are not the
/// default, else `None`.
pub fn feature() -> Option<String> {
    let rows = pass_rows();
    (rows != 8).then(|| format!("gemv: {rows} token rows per pass (MOE_GEMV_PASS_ROWS)"))
}
