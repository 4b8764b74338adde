//! hdb's one random stream (DESIGN.md section 4): splitmix64, uniforms and Box-Muller normals
//! from it, and fnv1a64 to give every name its own stream. The LiDB basis, the pipeline's
//! seeded noise and the random weights of benchmarks and the demo all draw from it, so a seed
//! reproduces a run bit for bit in Rust, numpy and CUDA.

/// splitmix64 (see DESIGN.md section 4; the LiDB basis uses the same generator).
#[derive(Clone, Debug)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1), from 53 random bits, rounded to f32.
    pub fn next_f32(&mut self) -> f32 {
        ((self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)) as f32
    }
}

/// Uniform in (0, 1): `((next >> 11) + 0.5) * 2^-53`, never 0 so `ln` is finite.
fn uniform_open(rng: &mut SplitMix64) -> f64 {
    ((rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
}

/// hdb's documented normal generator (also the LiDB basis' and the pipeline's noise): `n`
/// standard normals by Box-Muller on consecutive uniform pairs `(u1, u2)` of
/// `uniform_open`, `sqrt(-2 ln u1) cos(2 pi u2)` then `sqrt(-2 ln u1) sin(2 pi u2)`, in f64;
/// an odd count drops the last sine.
pub fn normals(rng: &mut SplitMix64, n: usize) -> Vec<f64> {
    let mut v = Vec::with_capacity(n + 1);
    while v.len() < n {
        let (u1, u2) = (uniform_open(rng), uniform_open(rng));
        let r = (-2.0 * u1.ln()).sqrt();
        let t = 2.0 * std::f64::consts::PI * u2;
        v.push(r * t.cos());
        v.push(r * t.sin());
    }
    v.truncate(n);
    v
}

/// fnv1a64 of a string, to give every tensor name its own stream.
pub fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01B3)
    })
}
