//! Shared by the test binaries: one GPU device per binary, seeded data, the
//! shapes every kernel is tried on, and comparison with stated bounds.
#![allow(dead_code)]

use modelpress::tensor::ulp_distance;
use modelpress::tools::sample::{LlamaShape, Rng};
use modelpress::{DType, Device, Tensor};
use std::sync::OnceLock;

/// A LLaMA-shaped model small enough for many runs through the binary.
pub const SMALL: LlamaShape = LlamaShape {
    hidden: 64,
    intermediate: 96,
    layers: 2,
    heads: 2,
    vocab: 128,
};

pub const FLOATS: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// The shared GPU (any adapter, software included), or None when there is
/// none. With MODELPRESS_REQUIRE_GPU=1 a missing adapter fails the test.
pub fn gpu() -> Option<Device> {
    static GPU: OnceLock<Option<Device>> = OnceLock::new();
    GPU.get_or_init(|| match Device::choose("gpu") {
        Ok(d) => {
            // Straight to the handle: the harness captures eprintln!, and the
            // log of a passing run should still name the adapter.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "GPU tests run on: {}", d.name());
            Some(d)
        }
        Err(e) => {
            if std::env::var("MODELPRESS_REQUIRE_GPU").as_deref() == Ok("1") {
                panic!("MODELPRESS_REQUIRE_GPU=1 but no adapter: {e}");
            }
            eprintln!("SKIP GPU tests: {e}");
            None
        }
    })
    .clone()
}

/// The GPU as it is, and with chunks forced down to 4 KiB so that small
/// tensors cross many chunk boundaries. Empty when there is no GPU.
pub fn gpu_variants() -> Vec<(String, Device)> {
    let Some(g) = gpu() else { return vec![] };
    let small = g.clone().with_chunk_bytes(4096).unwrap();
    let odd = g.clone().with_chunk_bytes(768).unwrap();
    vec![
        ("gpu".into(), g),
        ("gpu/4KiB chunks".into(), small),
        ("gpu/768B chunks".into(), odd),
    ]
}

/// A seed from MODELPRESS_TEST_SEED or the clock, printed so that a failure
/// reproduces.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("MODELPRESS_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: MODELPRESS_TEST_SEED={s}");
    s
}

/// Shapes every kernel is tried on: empty, one element, lengths that are
/// not multiples of 4, 256 or the chunk, rows shorter and longer than a
/// chunk, plus a few random ones.
pub fn shapes(rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut v: Vec<Vec<usize>> = vec![
        vec![0],
        vec![1],
        vec![],
        vec![3],
        vec![7],
        vec![257],
        vec![0, 5],
        vec![4, 0],
        vec![1, 1],
        vec![13, 17],
        vec![5, 1030],
        vec![1, 4099],
        vec![64, 33],
        vec![3, 5, 7],
        vec![700, 3],
        vec![2, 9000],
    ];
    for _ in 0..4 {
        v.push(vec![1 + rng.below(300), 1 + rng.below(300)]);
    }
    v.push(vec![1 + rng.below(5000)]);
    v
}

/// Values like trained weights (N(0, 0.05²)) with exact zeros, repeated
/// values and values exactly at `special` mixed in.
pub fn weights(rng: &mut Rng, n: usize, special: f32) -> Vec<f32> {
    let mut v: Vec<f32> = (0..n).map(|_| (rng.normal() * 0.05) as f32).collect();
    for i in 0..n {
        match rng.below(20) {
            0 => v[i] = 0.0,
            1 => v[i] = special,
            2 => v[i] = -special,
            3 if i > 0 => v[i] = v[i - 1],
            _ => {}
        }
    }
    v
}

pub fn tensor(dtype: DType, shape: &[usize], values: &[f32]) -> Tensor {
    Tensor::from_f32(dtype, shape, values).unwrap()
}

/// Asserts identical bytes.
pub fn assert_identical(got: &Tensor, want: &Tensor, ctx: &str) {
    assert_eq!(got.dtype, want.dtype, "{ctx}: dtype");
    assert_eq!(got.shape, want.shape, "{ctx}: shape");
    if got.data != want.data {
        let (g, w) = (got.raw_bits(), want.raw_bits());
        let i = g.iter().zip(&w).position(|(a, b)| a != b).unwrap();
        panic!(
            "{ctx}: element {i} of {}: got {:#x} ({}), want {:#x} ({})",
            g.len(),
            g[i],
            got.to_f32_vec()[i],
            w[i],
            want.to_f32_vec()[i]
        );
    }
}

/// One unit in the last place of `x` in f32 (the spacing at |x|).
pub fn ulp_f32(x: f64) -> f64 {
    let a = x.abs().max(f32::MIN_POSITIVE as f64);
    2f64.powi(a.log2().floor() as i32 - 23)
}

/// One unit in the last place of `x` in `dtype`.
pub fn ulp_dtype(dtype: DType, x: f64) -> f64 {
    let bits = match dtype {
        DType::F32 => 23,
        DType::F16 => 10,
        _ => 7,
    };
    let min_normal = match dtype {
        DType::F16 => 2f64.powi(-14),
        _ => f32::MIN_POSITIVE as f64,
    };
    let a = x.abs().max(min_normal);
    2f64.powi(a.log2().floor() as i32 - bits)
}

/// Asserts |got - want| ≤ bound(i) for every element, with NaN matching
/// NaN bit for bit and infinities matching exactly.
pub fn assert_within(got: &Tensor, want: &Tensor, bound: impl Fn(usize) -> f64, ctx: &str) {
    assert_eq!(got.dtype, want.dtype, "{ctx}: dtype");
    assert_eq!(got.shape, want.shape, "{ctx}: shape");
    let (g, w) = (got.to_f32_vec(), want.to_f32_vec());
    let (gb, wb) = (got.raw_bits(), want.raw_bits());
    for i in 0..g.len() {
        if !w[i].is_finite() || !g[i].is_finite() {
            assert_eq!(
                gb[i], wb[i],
                "{ctx}: element {i}: got {} want {}",
                g[i], w[i]
            );
            continue;
        }
        let d = (g[i] as f64 - w[i] as f64).abs();
        assert!(
            d <= bound(i),
            "{ctx}: element {i}: got {} want {} (|diff| {d:e} > bound {:e}, {} ulps)",
            g[i],
            w[i],
            bound(i),
            ulp_distance(got.dtype, gb[i], wb[i])
        );
    }
}

/// The bytes of every file directly in `dir`, in name order (to compare
/// two outputs byte for byte).
pub fn dir_bytes(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Two sets of report figures (two devices, or fused and separate): counts
/// equal, sums equal up to their summation order (f32 within blocks, f64
/// across: relative 1e-5).
pub fn assert_diff_close(
    a: &modelpress::ops::diff::Diff,
    b: &modelpress::ops::diff::Diff,
    ctx: &str,
) {
    assert_eq!(
        (
            a.elements,
            a.zeros,
            a.nonfinite_in,
            a.nonfinite_out,
            a.nonfinite_other
        ),
        (
            b.elements,
            b.zeros,
            b.nonfinite_in,
            b.nonfinite_out,
            b.nonfinite_other
        ),
        "{ctx}: counts"
    );
    assert_eq!(a.max_abs, b.max_abs, "{ctx}: max |Δ|");
    for (x, y, what) in [(a.sum_sq, b.sum_sq, "Σ Δ²"), (a.sum_x2, b.sum_x2, "Σ x²")] {
        assert!(
            (x - y).abs() <= 1e-5 * x.abs().max(y.abs()),
            "{ctx}: {what} {x} vs {y}"
        );
    }
}

/// Runs the binary (with a runtime directory, which lavapipe wants);
/// returns (success, stderr).
pub fn run_bin(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_modelpress"))
        .env("XDG_RUNTIME_DIR", std::env::temp_dir())
        .args(args)
        .output()
        .expect("run modelpress");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// A path as the `&str` an argument list takes.
pub fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// Every file under `p` with its bytes, sorted: to prove inputs unchanged.
pub fn snapshot(p: &std::path::Path) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut v = Vec::new();
    if p.is_dir() {
        for e in std::fs::read_dir(p).unwrap() {
            v.extend(snapshot(&e.unwrap().path()));
        }
    } else if p.exists() {
        v.push((p.to_path_buf(), std::fs::read(p).unwrap()));
    }
    v.sort();
    v
}
