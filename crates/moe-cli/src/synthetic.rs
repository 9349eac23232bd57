//! Seeded synthetic layers and inputs for the demo and the benchmark.

use moe_hal::{DType, HostLayer, HostTensor, MoeConfig, Result, Routing};
use rayon::prelude::*;

/// SplitMix64: tiny, fast, and the same stream on every machine.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// `n` values uniform in [-scale, scale), generated in parallel chunks so that large layers
/// are quick to make; the stream depends only on `seed`.
pub fn uniform(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut rng = Rng::new(seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        out.iter_mut().for_each(|x| *x = rng.uniform() * scale);
    });
    v
}

/// A random layer of `config` stored in `dtype`, scaled like a trained model (1/sqrt(fan-in)),
/// with a random correction bias for sigmoid routing.
pub fn random_layer(config: &MoeConfig, dtype: DType, seed: u64) -> Result<HostLayer> {
    let (h, i, e, s) = (config.hidden, config.intermediate, config.experts, config.shared_intermediate);
    let t = |shape: &[usize], fan_in: usize, salt: u64| {
        let n = shape.iter().product();
        HostTensor::new(dtype, shape, dtype.encode(&uniform(n, (3.0 / fan_in as f32).sqrt(), seed ^ salt)))
    };
    let bias = match config.routing {
        Routing::SigmoidGrouped { .. } => Some(HostTensor::from_f32(DType::F32, &[e], &uniform(e, 0.05, seed ^ 5))?),
        Routing::Softmax { .. } => None,
    };
    let shared = s > 0;
    let layer = HostLayer {
        config: config.clone(),
        dtype,
        router: t(&[e, h], h, 1)?,
        bias,
        gate_up: t(&[e, 2 * i, h], h, 2)?,
        down: t(&[e, h, i], i, 3)?,
        shared_gate_up: if shared { Some(t(&[2 * s, h], h, 6)?) } else { None },
        shared_down: if shared { Some(t(&[h, s], s, 7)?) } else { None },
    };
    layer.validate()?;
    Ok(layer)
}
