//! Exact target sparsity: the mask is the k smallest (|w|, flat index)
//! pairs, k = round_ties_even(s·n), identical on GPU and CPU, checked
//! against a brute-force sort on data full of ties.

mod common;
use common::*;
use modelpress::sample::Rng;
use modelpress::select::{self, count_for, key};
use modelpress::{DType, Device, Error, Tensor};

/// The specification: sort by (key, index) and zero the first k.
fn brute_force(t: &Tensor, k: u64) -> Tensor {
    let v = t.to_f32_vec();
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by_key(|&i| (key(v[i]), i));
    let mut out = t.clone();
    for &i in &order[..k as usize] {
        t.dtype.write_raw_public(&mut out.data, i, 0);
    }
    out
}

trait WriteRaw {
    fn write_raw_public(self, bytes: &mut [u8], i: usize, raw: u32);
}

impl WriteRaw for DType {
    fn write_raw_public(self, bytes: &mut [u8], i: usize, raw: u32) {
        match self.size() {
            4 => bytes[4 * i..4 * i + 4].copy_from_slice(&raw.to_le_bytes()),
            _ => bytes[2 * i..2 * i + 2].copy_from_slice(&(raw as u16).to_le_bytes()),
        }
    }
}

/// Values with many ties: a few levels, zeros, repeats, NaN and inf.
fn tied(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| match rng.below(12) {
            0 => 0.0,
            1 => -0.0,
            2 => 0.25,
            3 => -0.25,
            4 => 0.5,
            5 if rng.below(10) == 0 => f32::NAN,
            6 if rng.below(10) == 0 => f32::INFINITY,
            _ => (rng.normal() * 0.1) as f32,
        })
        .collect()
}

fn devices() -> Vec<(String, Device)> {
    let mut d = vec![("cpu".to_string(), Device::Cpu)];
    d.extend(gpu_variants());
    d
}

#[test]
fn masks_are_the_k_smallest_with_ties_to_the_lower_index() {
    let mut rng = Rng::new(seed("sparsity"));
    for (name, dev) in devices() {
        for dtype in FLOATS {
            for shape in shapes(&mut rng) {
                let n: usize = shape.iter().product();
                let t = tensor(dtype, &shape, &tied(&mut rng, n));
                for s in [0.0, 0.1, 0.25, 0.5, 0.5 + 1e-9, 0.73, 0.999, 1.0] {
                    let ctx = format!("{name} {dtype} {shape:?} s={s}");
                    let (got, st) = select::prune_to_sparsity(&dev, &t.view(), s, false).unwrap();
                    let k = count_for(s, n as u64);
                    let want = brute_force(&t, k);
                    assert_identical(&got, &want, &ctx);
                    let zeros = got.to_f32_vec().iter().filter(|x| **x == 0.0).count() as u64;
                    assert_eq!(st.zeros, zeros, "{ctx}");
                    let z0 = t.to_f32_vec().iter().filter(|x| **x == 0.0).count() as u64;
                    assert_eq!(
                        zeros,
                        k.max(z0),
                        "{ctx}: exactly k zeros (zeros already there count)"
                    );
                }
            }
        }
    }
}

#[test]
fn count_rule_is_pythons_round() {
    assert_eq!(count_for(0.5, 5), 2); // 2.5 -> 2
    assert_eq!(count_for(0.5, 3), 2); // 1.5 -> 2
    assert_eq!(count_for(0.5, 7), 4); // 3.5 -> 4
    assert_eq!(count_for(1.0, 9), 9);
    assert_eq!(count_for(0.0, 9), 0);
}

#[test]
fn pruning_twice_and_of_remaining() {
    let mut rng = Rng::new(seed("twice"));
    for (name, dev) in devices() {
        for dtype in FLOATS {
            let n = 10_000;
            let t = tensor(dtype, &[100, 100], &weights(&mut rng, n, 0.01));
            let (once, a) = select::prune_to_sparsity(&dev, &t.view(), 0.5, false).unwrap();
            let (twice, b) = select::prune_to_sparsity(&dev, &once.view(), 0.5, false).unwrap();
            assert_eq!(a.zeros, 5000, "{name} {dtype}");
            assert_eq!(b.zeros, 5000, "{name} {dtype}: twice at 50% stays at 50%");
            assert_identical(&twice, &once, &format!("{name} {dtype}"));
            let (rem, c) = select::prune_to_sparsity(&dev, &once.view(), 0.5, true).unwrap();
            assert_eq!(c.zeros, 7500, "{name} {dtype}: 50% of the remaining on top");
            let (cpu, _) =
                select::prune_to_sparsity(&Device::Cpu, &once.view(), 0.5, true).unwrap();
            assert_identical(&rem, &cpu, &format!("{name} {dtype} of remaining"));
        }
    }
}

#[test]
fn bad_sparsity_is_an_error() {
    let t = tensor(DType::F32, &[4], &[1.0, 2.0, 3.0, 4.0]);
    for (_, dev) in devices() {
        for s in [-0.1, 1.5, f64::NAN] {
            let e = select::prune_to_sparsity(&dev, &t.view(), s, false).unwrap_err();
            assert!(matches!(e, Error::Input(_)), "{s}: {e}");
        }
    }
}
