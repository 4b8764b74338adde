//! Deterministic random weights of any shape, for benchmarks and the built-in demo model (no
//! download). Scaled like PyTorch's default init so activations stay in a realistic range.

use crate::error::Result;
use crate::io::F32Weight;
use crate::model::unet::WeightSource;
use crate::rng::{fnv1a64, SplitMix64};

/// Random weights: `name` and `seed` fix the values. Matrices and kernels are uniform in
/// +-1/sqrt(fan_in); 1-D `*.weight` (norm scales) are near 1; biases small.
pub struct RandomWeights {
    pub seed: u64,
}

impl WeightSource for RandomWeights {
    fn get(&self, name: &str, shape: &[usize]) -> Result<F32Weight> {
        let n: usize = shape.iter().product();
        let fan_in: usize = shape.iter().skip(1).product::<usize>().max(1);
        let (center, scale) = if shape.len() >= 2 {
            (0.0, 1.0 / (fan_in as f32).sqrt())
        } else if name.ends_with(".weight") {
            (1.0, 0.1)
        } else {
            (0.0, 0.05)
        };
        let mut rng = SplitMix64(self.seed ^ fnv1a64(name));
        let v = (0..n)
            .map(|_| center + scale * (2.0 * rng.next_f32() - 1.0))
            .collect();
        Ok(F32Weight::Owned(v))
    }
}
