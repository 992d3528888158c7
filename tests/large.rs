//! A tensor larger than the adapter's storage-binding limit (over 128 MiB of
//! f32 on lavapipe) goes through every kernel on the GPU at its default
//! chunk size, and matches the CPU reference as the other tests require.

mod common;
use common::*;
use modelpress::tools::bench::{agreement, cases, Agreement, Output, Sample};
use modelpress::{DType, Device};

#[test]
fn tensor_beyond_the_binding_limit_through_every_kernel() {
    let Some(dev) = gpu() else { return };
    let Device::Gpu(g) = &dev else { unreachable!() };
    let binding = g.context().limits().max_storage_buffer_binding_size;
    // A little over one binding of f32, capped so that a 2 GiB-binding GPU
    // does not need tens of GB of host memory for the references.
    let cap = std::env::var("MODELPRESS_LARGE_MAX_BYTES")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(3 << 30);
    let bytes = (binding + (8 << 20)).min(cap);
    let n = (bytes / 4) as usize;
    eprintln!(
        "large: {n} f32 weights ({:.1} MiB) on {} (binding limit {:.1} MiB, chunk {:.1} MiB)",
        bytes as f64 / 1048576.0,
        dev.name(),
        binding as f64 / 1048576.0,
        g.chunk_bytes() as f64 / 1048576.0
    );
    assert!(
        bytes > g.chunk_bytes(),
        "the tensor must span several chunks"
    );
    let s = Sample::new(DType::F32, n, seed("large")).unwrap();
    assert!(s.a.data.len() as u64 > g.chunk_bytes());
    // Two GGML types stand for the rest (chunking is the same for all, and
    // each K-quant costs tens of seconds at this size on lavapipe).
    let skip = |n: &str| n.starts_with("ggml.") && n != "ggml.Q4_0" && n != "ggml.Q4_K";
    for case in cases().into_iter().filter(|c| !skip(c.name)) {
        let t = std::time::Instant::now();
        let got = (case.run)(&dev, &s).unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let secs = t.elapsed().as_secs_f64();
        let want = (case.run)(&Device::Cpu, &s).unwrap();
        let agree = agreement(&got, &want);
        eprintln!("large: {:<24} {:>7.2} s  {agree}", case.name, secs);
        if agree == Agreement::Identical {
            continue;
        }
        // Float sums: the bound of tests/transfer_mix.rs, (terms + 1) ulps of
        // Σ|terms| (sums that cancel differ by many ulps of the result).
        let (Output::Float(g), Output::Float(c)) = (&got, &want) else {
            panic!("{}: {agree}", case.name)
        };
        let (a, b) = (s.a.to_f32_vec(), s.b.to_f32_vec());
        match case.name {
            "transfer.tensor" => assert_within(
                g,
                c,
                |i| 3.0 * ulp_f32((a[i].abs() + 0.3 * b[i].abs()) as f64),
                case.name,
            ),
            "mix.weighted" => assert_within(
                g,
                c,
                |i| 3.0 * ulp_f32((0.7 * a[i].abs() + 0.3 * b[i].abs()) as f64),
                case.name,
            ),
            "mix.rows" => {
                let (x, cols) = (s.rows.to_f32_vec(), s.rows.shape[1]);
                let p = &s.row_weights;
                assert_within(
                    g,
                    c,
                    |j| {
                        let sum: f64 = (0..p.len())
                            .map(|r| (p[r] * x[r * cols + j]).abs() as f64)
                            .sum();
                        (p.len() as f64 + 1.0) * ulp_f32(sum)
                    },
                    case.name,
                )
            }
            // Routing weights go through WGSL's exp: moe.rs's bound,
            // (8 + 4·R)·2⁻²⁴ relative with R ≤ twice the largest |logit|.
            "moe.route" => {
                let r = 2.0 * a.iter().fold(0f32, |m, x| m.max(x.abs())) as f64;
                let cv = c.to_f32_vec();
                assert_within(
                    g,
                    c,
                    |i| (8.0 + 4.0 * r) * 2f64.powi(-24) * cv[i].abs() as f64,
                    case.name,
                )
            }
            name => panic!("{name}: {agree}"),
        }
    }
}
