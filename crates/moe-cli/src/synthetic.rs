//! Seeded synthetic layers and inputs for the demo and the benchmark.

use moe_conformance::Rng;
use moe_hal::{DType, HostLayer, HostTensor, MoeConfig, Result, Routing};
use rayon::prelude::*;

/// `n` values uniform in [-scale, scale), generated in parallel chunks so that large layers
/// are quick to make; the stream depends only on `seed`.
pub fn uniform(n: usize, scale: f32, seed: u64) -> Vec<f32> {
    const CHUNK: usize = 1 << 16;
    let mut v = vec![0f32; n];
    v.par_chunks_mut(CHUNK).enumerate().for_each(|(c, out)| {
        let mut rng = Rng::new(seed ^ (c as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        out.iter_mut().for_each(|x| *x = rng.uniform(-1.0, 1.0) as f32 * scale);
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
