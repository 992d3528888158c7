//! The `modelpress` command line (clap). `main.rs` only calls `cli::main`.

use crate::bench::{self, BenchOptions};
use crate::device::{list_adapters, Device};
use crate::error::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "modelpress",
    version,
    about = "Prune, quantize, patch and merge neural-network weights on any GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List the GPU adapters wgpu finds, with the limits that matter.
    Devices,
    /// Run every kernel on a built-in sample on the chosen device and
    /// compare it with the CPU reference.
    Demo {
        /// auto (a hardware GPU, else the CPU), gpu (any adapter), cpu, or an
        /// adapter name substring.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Elements per sample tensor.
        #[arg(long, default_value_t = 1 << 20)]
        elements: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
    /// Measure GPU and CPU throughput (GB/s) per kernel and size.
    Bench {
        #[arg(long, default_value = "gpu")]
        device: String,
        /// Sizes in elements, comma-separated (k and M suffixes allowed).
        #[arg(long, default_value = "1M,16M,64M", value_delimiter = ',')]
        sizes: Vec<String>,
        /// Timed repetitions per measurement (the best is kept).
        #[arg(long, default_value_t = 3)]
        reps: usize,
        /// Kernel names to run (default: all).
        #[arg(long, value_delimiter = ',')]
        kernels: Vec<String>,
    },
}

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,wgpu_hal::gles=off"),
    )
    .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("modelpress: error: {e}");
            1
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Devices => {
            let all = list_adapters();
            if all.is_empty() {
                println!("no GPU adapter found (the CPU backend is always available)");
            }
            for (i, a) in all.iter().enumerate() {
                println!("[{i}] {}", a.name);
                println!(
                    "    backend: {}  type: {}  driver: {}",
                    a.backend, a.device_type, a.driver
                );
                println!(
                    "    max storage binding: {}  max buffer: {}  workgroups/dim: {}  invocations/workgroup: {}",
                    human_bytes(a.max_storage_binding),
                    human_bytes(a.max_buffer),
                    a.max_workgroups_per_dim,
                    a.max_invocations_per_workgroup
                );
            }
            Ok(())
        }
        Command::Demo {
            device,
            elements,
            seed,
        } => {
            let dev = Device::choose(&device)?;
            crate::bench::demo(&dev, elements, seed)
        }
        Command::Bench {
            device,
            sizes,
            reps,
            kernels,
        } => {
            let dev = Device::choose(&device)?;
            let sizes = sizes
                .iter()
                .map(|s| bench::parse_count(s))
                .collect::<Result<Vec<_>>>()?;
            bench::run(
                &dev,
                &BenchOptions {
                    sizes,
                    reps,
                    kernels,
                },
            )
        }
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
