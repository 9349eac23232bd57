//! Seeded synthetic layers and inputs for the demo and the benchmark.

use moe_conformance::Rng;
use moe_hal::{DType, HostLayer, HostTensor, MoeConfig, Result, Routing, fp8};
use rayon::prelude::*;

/// Values per independently seeded chunk of [`uniform`] and [`uniform_encoded`].
const CHUNK: usize = 1 << 16;

/// The generator of chunk `c` of a stream seeded `seed`.
fn chunk_rng(seed: u64, c: usize) -> Rng {
    Rng::new(seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03))
}

/// `n` values uniform in [-scale, scale), generated in parallel chunks so that large layers
/// are quick to make; the stream depends only on `seed`.
pub fn uniform(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut rng = chunk_rng(seed, c);
        out.iter_mut().for_each(|x| *x = rng.uniform(-1.0, 1.0) as f32 * scale);
    });
    v
}

/// [`uniform`] stored in `dtype` (`dtype.encode(&uniform(..))`, the same bytes), encoded chunk by
/// chunk in parallel: DeepSeek-V3's 7.5 billion gate/up weights never exist as f32 (30 GB), and
/// the encoding is not one thread's serial pass.
pub fn uniform_encoded(n: usize, scale: f32, seed: u64, dtype: DType) -> Vec<u8> {
    let size = dtype.size();
    let mut bytes = vec![0u8; n * size];
    bytes.par_chunks_mut(CHUNK * size).enumerate().for_each(|(c, out)| {
        let mut rng = chunk_rng(seed, c);
        let values: Vec<f32> = (0..out.len() / size).map(|_| rng.uniform(-1.0, 1.0) as f32 * scale).collect();
        out.copy_from_slice(&dtype.encode(&values));
    });
    bytes
}

/// A random layer of `config` stored in `dtype`, scaled like a trained model (1/sqrt(fan-in)),
/// with a random correction bias for sigmoid routing. F8E4M3 weights come with one scale per
/// 128x128 block and a bf16 router, as DeepSeek ships them.
pub fn random_layer(config: &MoeConfig, dtype: DType, seed: u64) -> Result<HostLayer> {
    let (h, i, e, s) = (config.hidden, config.intermediate, config.experts, config.shared_intermediate);
    let t = |shape: &[usize], fan_in: usize, salt: u64| {
        let n = shape.iter().product();
        let bound = (3.0 / fan_in as f32).sqrt();
        if dtype.is_block_scaled() {
            // Values uniform over E4M3's range and one scale bound / 448 per block: what
            // quantizing uniform(-bound, bound) weights in DeepSeek's blocks gives, made without
            // the f32 weights ever existing.
            let block = fp8::DEFAULT_BLOCK;
            let grid: usize = fp8::scale_shape(shape, block).iter().product();
            return HostTensor::fp8(shape, uniform_encoded(n, 448.0, seed ^ salt, dtype), block, vec![bound / 448.0; grid]);
        }
        HostTensor::new(dtype, shape, uniform_encoded(n, bound, seed ^ salt, dtype))
    };
    let router_dtype = if dtype.is_block_scaled() { DType::BF16 } else { dtype };
    let (eh, bound) = (e * h, (3.0 / h as f32).sqrt());
    let router = HostTensor::new(router_dtype, &[e, h], uniform_encoded(eh, bound, seed ^ 1, router_dtype))?;
    let bias = match config.routing {
        Routing::SigmoidGrouped { .. } => Some(HostTensor::from_f32(DType::F32, &[e], &uniform(e, 0.05, seed ^ 5))?),
        Routing::Softmax { .. } => None,
    };
    let shared = s > 0;
    let layer = HostLayer {
        config: config.clone(),
        dtype,
        router,
        bias,
        gate_up: t(&[e, 2 * i, h], h, 2)?,
        down: t(&[e, h, i], i, 3)?,
        shared_gate_up: if shared { Some(t(&[2 * s, h], h, 6)?) } else { None },
        shared_down: if shared { Some(t(&[h, s], s, 7)?) } else { None },
    };
    layer.validate()?;
    Ok(layer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoded_stream_is_the_f32_stream_encoded() {
        let n = 2 * CHUNK + 123;
        for dtype in DType::WEIGHTS {
            assert_eq!(uniform_encoded(n, 0.7, 42, dtype), dtype.encode(&uniform(n, 0.7, 42)), "{dtype}");
        }
    }
}
