//! Comparison against the oracle, tolerances, and poisoned outputs.

use moe_hal::{Backend, DType, Error, HostTensor, Tensor};

/// Why a case did not pass; the runner turns it into [`crate::Outcome`].
#[derive(Debug, Clone, PartialEq)]
pub enum Fail {
    /// The backend computed something else, or broke the contract.
    Wrong(String),
    /// The backend said it does not do this (through [`Backend::supports`]).
    Unsupported(String),
}

impl From<Error> for Fail {
    fn from(e: Error) -> Self {
        Fail::Wrong(format!("unexpected error: {e}"))
    }
}

/// What a case body returns: the worst relative error it saw.
pub type CaseResult = Result<f64, Fail>;

/// Shorthand for `Err(Fail::Wrong(format!(..)))`.
macro_rules! wrong {
    ($($arg:tt)*) => { Err($crate::check::Fail::Wrong(format!($($arg)*))) };
}
pub(crate) use wrong;

/// Names an unexpected error after the call that returned it.
pub trait Context<T> {
    /// Names the failing step.
    fn ctx(self, what: &str) -> Result<T, Fail>;
}

impl<T> Context<T> for moe_hal::Result<T> {
    fn ctx(self, what: &str) -> Result<T, Fail> {
        self.map_err(|e| Fail::Wrong(format!("{what}: unexpected error: {e}")))
    }
}

// ---------------------------------------------------------------------------------------------
// Tolerances
// ---------------------------------------------------------------------------------------------

/// Relative L2 error allowed for one op whose weights are stored in `dtype` (`None`: an op without
/// weights, all f32), reducing over `k` terms.
///
/// * **f32: 1e-5**, grown as `sqrt(k / 1024)` past 1024 terms (f32 rounding of a sum of `k` terms
///   grows about as `sqrt(k)` ulps; K = 7168 gives 2.6e-5). A backend that keeps f32 activations
///   and accumulates in f32 lands near 1e-7..1e-6; this is ten times that, and a hundred times
///   below any real mistake (a dropped term, a wrong row, a half-precision accumulator).
/// * **f16: 3e-3.** The oracle uses the exact stored f16 weights, so an exact f32 backend still
///   lands near 1e-6. The room is for a backend that rounds activations to f16 on the way into
///   tensor cores (unit roundoff 2^-11 ≈ 4.9e-4 per element, ~3e-4 relative over a dot product).
/// * **bf16: 1e-2**, for the same reason with bf16's 2^-8 ≈ 3.9e-3 unit roundoff.
/// * **f8_e4m3: 1e-2**, as bf16: the oracle applies the exact stored bytes and scales, and a
///   tensor-core backend feeds the scaled weights (and the activations) in as f16 or bf16. The
///   cases scale neighbouring blocks up to 64x apart, so a weight given the wrong block's scale
///   is off by far more.
pub fn op_tolerance(dtype: Option<DType>, k: usize) -> f64 {
    match dtype {
        Some(DType::F16) => 3e-3,
        Some(DType::BF16 | DType::F8E4M3) => 1e-2,
        _ => 1e-5 * (k as f64 / 1024.0).sqrt().max(1.0),
    }
}

/// Relative L2 error allowed for a layer's routing weights, whatever its weights' dtype: the
/// router computes in f32 (the spec), and tensor-core backends keep its activations to about 16
/// bits or better (split into two halves), about 1e-5.
pub const ROUTER_WEIGHTS_TOLERANCE: f64 = 1e-4;

/// Relative L2 error allowed for the whole layer's output ([`moe_hal::ops::forward`]) with
/// weights in `dtype`: three GEMMs, an activation and a weighted sum in a row compound per-op
/// rounding, so f32 1e-4, f16 5e-3, bf16 and f8_e4m3 2e-2. The routing weights are held to
/// [`ROUTER_WEIGHTS_TOLERANCE`] whatever the dtype.
pub fn layer_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 5e-3,
        DType::BF16 | DType::F8E4M3 => 2e-2,
        _ => 1e-4,
    }
}

// ---------------------------------------------------------------------------------------------
// Comparison
// ---------------------------------------------------------------------------------------------

/// `||got - want|| / ||want||` over all elements (plain `||got - want||` when `want` is zero).
///
/// NaN never passes: where `want` is a number, `got` must be a finite number; where `want` is
/// NaN (routing weights of a NaN token), `got` must be NaN too. An unwritten, poisoned element
/// ([`poisoned_f32`]: `f32::MAX`) fails either way. Lengths must match.
pub fn rel_l2(got: &[f32], want: &[f64]) -> Result<f64, String> {
    if got.len() != want.len() {
        return Err(format!("{} elements, expected {}", got.len(), want.len()));
    }
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            if !g.is_nan() {
                return Err(format!("element {i} is {g}, expected NaN"));
            }
            continue;
        }
        if !g.is_finite() {
            return Err(format!("element {i} is {g}, expected {w} (NaN and infinity never pass)"));
        }
        diff += (g as f64 - w).powi(2);
        norm += w * w;
    }
    Ok(if norm > 0.0 { (diff / norm).sqrt() } else { diff.sqrt() })
}

/// Compares `got` with `want` at `tol`; the error names `what` and the worst element.
pub fn close(what: &str, got: &[f32], want: &[f64], tol: f64) -> CaseResult {
    let err = rel_l2(got, want).map_err(|m| Fail::Wrong(format!("{what}: {m}")))?;
    if err <= tol {
        return worst_element(what, got, want, tol).map(|()| err);
    }
    let (i, g, w) = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (_, w))| !w.is_nan())
        .map(|(i, (&g, &w))| (i, g, w))
        .max_by(|a, b| (a.1 as f64 - a.2).abs().total_cmp(&(b.1 as f64 - b.2).abs()))
        .unwrap_or((0, 0.0, 0.0));
    wrong!("{what}: relative L2 error {err:.3e} > tolerance {tol:.1e} (worst element {i}: got {g}, expected {w})")
}

/// How far one element may be off, in units of `tol` times the RMS of `want`. Relative L2 over
/// `n` elements dilutes an error concentrated in one element by about `sqrt(n)`: a single wrong
/// or unwritten element (zero where a typical value belongs) passes a bf16 tolerance of 1e-2
/// over 14,000 elements. Every backend's worst element measured across the whole suite stays
/// under 6 units (the CUDA tensor-core kernels, which round activations to bf16, on the
/// emulator; the CPU under 0.2); a zeroed typical element is 1 / `tol` units (100 for bf16).
pub const ELEMENT_FACTOR: f64 = 25.0;

/// Fails when one element of `got` is off by more than [`ELEMENT_FACTOR`] `* tol *` the RMS of
/// `want` (NaN positions, already checked by [`rel_l2`], aside).
fn worst_element(what: &str, got: &[f32], want: &[f64], tol: f64) -> Result<(), Fail> {
    let (mut n, mut sum_sq, mut worst) = (0usize, 0f64, (0usize, 0f64));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        if w.is_nan() {
            continue;
        }
        n += 1;
        sum_sq += w * w;
        let d = (g as f64 - w).abs();
        if d > worst.1 {
            worst = (i, d);
        }
    }
    let rms = (sum_sq / n.max(1) as f64).sqrt();
    let (i, d) = worst;
    if rms > 0.0 && d > ELEMENT_FACTOR * tol * rms {
        return wrong!(
            "{what}: element {i} is {}, expected {}: off by {:.1} times the tolerance {tol:.1e} times the RMS {rms:.3e}, \
             an error in few elements that the relative L2 error over {n} elements would hide",
            got[i],
            want[i],
            d / (tol * rms)
        );
    }
    Ok(())
}

/// Exact comparison of u32 outputs; the error names the first difference.
pub fn same_u32(what: &str, got: &[u32], want: &[u32]) -> CaseResult {
    if got.len() != want.len() {
        return wrong!("{what}: {} elements, expected {}", got.len(), want.len());
    }
    if let Some(i) = got.iter().zip(want).position(|(g, w)| g != w) {
        let lo = i.saturating_sub(4);
        let hi = (i + 5).min(got.len());
        return wrong!(
            "{what}: element {i} is {:#x}, expected {} (0xffffffff marks an element never written); got[{lo}..{hi}] = {:?}, expected {:?}",
            got[i],
            want[i],
            &got[lo..hi],
            &want[lo..hi]
        );
    }
    Ok(0.0)
}

/// Routing must choose the same ids, in rank order; the error names the first token that differs.
pub fn same_routing(what: &str, got: &[u32], want: &[u32], k: usize) -> CaseResult {
    if got.len() != want.len() {
        return wrong!("{what}: {} ids, expected {}", got.len(), want.len());
    }
    for (t, (g, w)) in got.chunks(k.max(1)).zip(want.chunks(k.max(1))).enumerate() {
        if g != w {
            let mut gs = g.to_vec();
            let mut ws = w.to_vec();
            gs.sort_unstable();
            ws.sort_unstable();
            let how = if gs == ws { "same set, different rank order" } else { "different expert set" };
            return wrong!("{what}: token {t} chose {g:?}, expected {w:?} ({how}; 0xffffffff marks an id never written)");
        }
    }
    Ok(0.0)
}

/// The error must be [`Error::InvalidArgument`].
pub fn expect_invalid<T>(what: &str, r: moe_hal::Result<T>) -> CaseResult {
    match r {
        Err(Error::InvalidArgument(_)) => Ok(0.0),
        Err(e) => wrong!("{what}: expected Error::InvalidArgument, got {e:?}"),
        Ok(_) => wrong!("{what}: expected Error::InvalidArgument, got Ok"),
    }
}

/// For data-dependent bad input a kernel finds on the device: the op may return the error, or the
/// next blocking call ([`Backend::synchronize`]) must. Either way it is [`Error::InvalidArgument`].
pub fn expect_invalid_deferred<B: Backend>(what: &str, b: &B, r: moe_hal::Result<()>) -> CaseResult {
    match r {
        Err(_) => expect_invalid(what, r),
        Ok(()) => expect_invalid(&format!("{what} (op returned Ok, so synchronize must report it)"), b.synchronize()),
    }
}

// ---------------------------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------------------------

/// An f32 output filled with `f32::MAX`, so an element the op never writes fails the
/// comparison: far from any expected number, and not NaN, so it fails where NaN is expected
/// too (a NaN poison would pass there), and any arithmetic on it overflows.
pub fn poisoned_f32<B: Backend>(b: &B, shape: &[usize]) -> Result<Tensor<B>, Fail> {
    let n = shape.iter().product();
    Tensor::from_f32(b, DType::F32, shape, &vec![f32::MAX; n]).ctx("uploading a poisoned f32 output")
}

/// A u32 output filled with 0xFFFFFFFF (never a valid id, row or offset).
pub fn poisoned_u32<B: Backend>(b: &B, shape: &[usize]) -> Result<Tensor<B>, Fail> {
    let n = shape.iter().product();
    Tensor::from_u32(b, shape, &vec![u32::MAX; n]).ctx("uploading a poisoned u32 output")
}

/// Uploads f32 activations.
pub fn f32_tensor<B: Backend>(b: &B, shape: &[usize], v: &[f32]) -> Result<Tensor<B>, Fail> {
    Tensor::from_f32(b, DType::F32, shape, v).ctx("uploading an input")
}

/// Uploads u32 indices.
pub fn u32_tensor<B: Backend>(b: &B, shape: &[usize], v: &[u32]) -> Result<Tensor<B>, Fail> {
    Tensor::from_u32(b, shape, v).ctx("uploading an input")
}

/// Uploads f32 values stored as `dtype`; returns the tensor and the stored values as f64 (what the
/// oracle must use: the weights after rounding to the storage dtype). F8E4M3 weights are
/// quantized in [`fp8_test_block`]s after each block is scaled by its own power of two in
/// `2^-3 ..= 2^3`, so neighbouring blocks have scales up to 64x apart.
pub fn weight_tensor<B: Backend>(b: &B, dtype: DType, shape: &[usize], v: &[f32]) -> Result<(Tensor<B>, Vec<f64>), Fail> {
    if dtype == DType::F8E4M3 {
        let host = fp8_weight(shape, v, fp8_test_block(shape))?;
        let t = Tensor::from_host(b, &host).ctx("uploading weights")?;
        return Ok((t, crate::oracle::decode_tensor(&host)));
    }
    let bytes = dtype.encode(v);
    let stored = crate::oracle::decode(dtype, &bytes);
    let t = Tensor::upload(b, dtype, shape, &bytes).ctx("uploading weights")?;
    Ok((t, stored))
}

/// The block size the cases quantize an F8E4M3 weight of `shape` with: DeepSeek's 128x128 at
/// K >= 1024; 5x12 when N is odd (partial edge blocks on both sides, and a block width that is
/// no multiple of 8, which an 8-wide vector load would straddle); else 16x32 (several blocks
/// per tile of a 64x64-tiled kernel).
pub fn fp8_test_block(shape: &[usize]) -> [usize; 2] {
    let (n, k) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    if k >= 1024 {
        [128, 128]
    } else if n % 2 == 1 {
        [5, 12]
    } else {
        [16, 32]
    }
}

/// `v` (a weight of `shape`) with each `block` scaled by its own power of two, quantized to
/// F8E4M3 in those blocks.
pub fn fp8_weight(shape: &[usize], v: &[f32], block: [usize; 2]) -> Result<HostTensor, Fail> {
    let (rows, cols) = (shape[shape.len() - 2], shape[shape.len() - 1]);
    let scaled: Vec<f32> = v
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let (matrix, r, c) = (i / (rows * cols).max(1), i / cols.max(1) % rows.max(1), i % cols.max(1));
            let step = (matrix * 5 + r / block[0] * 3 + c / block[1] * 2) % 7;
            x * 2f32.powi(step as i32 - 3)
        })
        .collect();
    HostTensor::quantize(shape, &scaled, block).ctx("quantizing weights to f8_e4m3")
}

/// Downloads an f32 tensor.
pub fn read_f32<B: Backend>(b: &B, t: &Tensor<B>) -> Result<Vec<f32>, Fail> {
    t.to_f32(b).ctx("downloading an output")
}

/// Downloads a u32 tensor.
pub fn read_u32<B: Backend>(b: &B, t: &Tensor<B>) -> Result<Vec<u32>, Fail> {
    t.to_u32(b).ctx("downloading an output")
}
