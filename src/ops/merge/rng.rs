//! Reproducible randomness for DARE: a counter-based generator, so an
//! element's draw depends only on (seed, tensor name, model, element index)
//! — the same on every device, at every chunk size, in every run. Plain
//! 32-bit integer mixing, so that a WGSL kernel can draw the same numbers.

/// A 32-bit finalizer (Wellons' lowbias32): every input bit flips about
/// half the output bits.
#[inline(always)]
pub fn mix32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^= x >> 16;
    x
}

/// FNV-1a of a tensor name.
pub fn name_hash(name: &str) -> u32 {
    name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

/// The stream of one (seed, tensor, model).
pub fn stream_key(seed: u64, tensor: &str, model: u32) -> u32 {
    let s = mix32(seed as u32 ^ mix32((seed >> 32) as u32 ^ 0x9e37_79b9));
    mix32(s ^ mix32(name_hash(tensor) ^ mix32(model.wrapping_add(0x632b_e5ab))))
}

/// A uniform draw in [0, 1) with 24 bits (exact in f32) for element `i`.
#[inline(always)]
pub fn uniform(key: u32, i: u64) -> f32 {
    draw(key, i as u32, mix32((i >> 32) as u32 ^ 0x85eb_ca6b))
}

/// Calls `f(j, lo, h)` for each run of indices `start + j..` that shares
/// the high half `(i >> 32)`: the draw of element `start + j + k` is then
/// `draw(key, lo + k, h)`, a loop that vectorizes.
#[inline(always)]
fn runs(start: u64, len: usize, mut f: impl FnMut(std::ops::Range<usize>, u32, u32)) {
    let mut j = 0;
    while j < len {
        let i = start + j as u64;
        let lo = i as u32;
        let run = ((1u64 << 32) - lo as u64).min((len - j) as u64) as usize;
        f(j..j + run, lo, mix32((i >> 32) as u32 ^ 0x85eb_ca6b));
        j += run;
    }
}

/// `uniform(key, i)` for `i` with low half `lo` and mixed high half `h`.
#[inline(always)]
fn draw(key: u32, lo: u32, h: u32) -> f32 {
    (mix32(key ^ mix32(lo ^ h)) >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// `out[j] = uniform(key, start + j) < p` for every j: the same draws in
/// a loop that vectorizes.
pub fn below(key: u32, start: u64, p: f32, out: &mut [bool]) {
    runs(start, out.len(), |r, lo, h| {
        fast!(for (k, o) in out[r.clone()].iter_mut().enumerate() {
            *o = draw(key, lo.wrapping_add(k as u32), h) < p;
        })
    });
}

/// `out[j] = uniform(key, start + j)` for every j, vectorized.
pub fn uniforms(key: u32, start: u64, out: &mut [f32]) {
    runs(start, out.len(), |r, lo, h| {
        fast!(for (k, o) in out[r.clone()].iter_mut().enumerate() {
            *o = draw(key, lo.wrapping_add(k as u32), h);
        })
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_are_uniform_and_keyed() {
        let k = stream_key(42, "model.layers.0.mlp.up_proj.weight", 1);
        assert_ne!(k, stream_key(43, "model.layers.0.mlp.up_proj.weight", 1));
        assert_ne!(k, stream_key(42, "model.layers.1.mlp.up_proj.weight", 1));
        assert_ne!(k, stream_key(42, "model.layers.0.mlp.up_proj.weight", 2));
        let n = 1_000_000u64;
        let mut bins = [0u64; 10];
        for i in 0..n {
            let u = uniform(k, i);
            assert!((0.0..1.0).contains(&u));
            bins[(u * 10.0) as usize] += 1;
        }
        // Each bin holds n/10 ± 5 standard deviations (√(n·0.1·0.9) = 300).
        for b in bins {
            assert!((b as i64 - 100_000).abs() < 1500, "{bins:?}");
        }
        // Elements past 2³² draw anew, not a repeat of the low ones.
        assert_ne!(uniform(k, 5), uniform(k, 5 + (1 << 32)));
        // The vectorized run draws the same, across the 2³² boundary too.
        for start in [0u64, 12_345, (1 << 32) - 700] {
            let mut got = vec![false; 2000];
            below(k, start, 0.37, &mut got);
            for (j, g) in got.iter().enumerate() {
                assert_eq!(
                    *g,
                    uniform(k, start + j as u64) < 0.37,
                    "start {start} j {j}"
                );
            }
            let mut u = vec![0f32; 2000];
            uniforms(k, start, &mut u);
            for (j, u) in u.iter().enumerate() {
                assert_eq!(u.to_bits(), uniform(k, start + j as u64).to_bits());
            }
        }
    }
}
