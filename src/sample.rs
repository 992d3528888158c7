//! Seeded random weights: the built-in sample of `modelpress demo`, the
//! benchmarks and the tests. SplitMix64, so that a seed printed by a failing
//! test reproduces the same data on any machine.

use crate::tensor::{DType, Tensor};

/// A small, fast, seedable generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform integer in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize
    }

    /// Standard normal (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(f64::MIN_POSITIVE);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// `n` weights ~ N(0, std²), as trained layers roughly are.
pub fn normal_f32(rng: &mut Rng, n: usize, std: f32) -> Vec<f32> {
    (0..n).map(|_| (rng.normal() as f32) * std).collect()
}

/// A weight matrix ~ N(0, 1/cols) in `dtype` (Kaiming-like scale).
pub fn weight(rng: &mut Rng, dtype: DType, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let cols = crate::tensor::matrix_view(shape).1.max(1);
    let v = normal_f32(rng, n, 1.0 / (cols as f32).sqrt());
    Tensor::from_f32(dtype, shape, &v).expect("float dtype")
}
