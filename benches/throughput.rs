//! GPU vs CPU throughput (GB/s) per kernel at 1 M, 16 M and 64 M elements.
//!
//! `cargo bench` measures; `cargo test` (no `--bench` flag) runs one tiny
//! size as a smoke test. Environment:
//!   MODELPRESS_BENCH_DEVICE  auto | gpu | cpu | adapter name (default gpu)
//!   MODELPRESS_BENCH_SIZES   comma-separated element counts (default 1M,16M,64M)
//!   MODELPRESS_BENCH_REPS    timed repetitions, best kept (default 3)
//!   MODELPRESS_BENCH_KERNELS comma-separated case-name prefixes (default all)

use modelpress::tools::bench::{self, BenchOptions};
use modelpress::Device;

fn env_list(name: &str, default: &str) -> Vec<String> {
    std::env::var(name)
        .unwrap_or_else(|_| default.to_string())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| s.trim().to_string())
        .collect()
}

fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let spec = std::env::var("MODELPRESS_BENCH_DEVICE").unwrap_or_else(|_| "gpu".into());
    let dev = match Device::choose(&spec) {
        Ok(d) => d,
        Err(e) => {
            eprintln!(
                "throughput: no device '{spec}' ({e}); measuring the CPU backend against itself"
            );
            Device::Cpu
        }
    };
    let sizes = if measuring {
        env_list("MODELPRESS_BENCH_SIZES", "1M,16M,64M")
    } else {
        vec!["4k".to_string()]
    };
    let opt = BenchOptions {
        sizes: sizes
            .iter()
            .map(|s| bench::parse_count(s).expect("MODELPRESS_BENCH_SIZES"))
            .collect(),
        reps: if measuring {
            std::env::var("MODELPRESS_BENCH_REPS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(3)
        } else {
            1
        },
        kernels: env_list("MODELPRESS_BENCH_KERNELS", ""),
    };
    if let Err(e) = bench::run(&dev, &opt) {
        eprintln!("throughput: {e}");
        std::process::exit(1);
    }
}
