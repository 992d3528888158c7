//! The `modelpress` command line: clap types (`args`), one function per
//! subcommand (`commands`), what it prints (`format`) and the demo.
//! `main.rs` only calls `cli::main`.

mod args;
mod commands;
mod demo;
mod format;

use args::{Cli, Command};
use clap::Parser;
use modelpress::error::{Error, Result};

/// Runs the command line; returns the process exit code.
pub fn main() -> i32 {
    // Mesa prints a warning on every adapter scan without it.
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        std::env::set_var("XDG_RUNTIME_DIR", std::env::temp_dir());
    }
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,wgpu_hal::gles=off"),
    )
    // Warnings read as the rest of our messages: one line, no timestamp.
    .format(|buf, rec| {
        use std::io::Write;
        let level = rec.level().as_str().to_lowercase();
        if rec.target().starts_with("modelpress") {
            writeln!(buf, "modelpress: {level}: {}", rec.args())
        } else {
            writeln!(
                buf,
                "modelpress: {level} ({}): {}",
                rec.target(),
                rec.args()
            )
        }
    })
    .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        // --help, --version, or a usage error (exit 2), printed by clap.
        Err(e) => {
            return match e.print() {
                Err(p) if p.kind() == std::io::ErrorKind::BrokenPipe => 141,
                Err(_) => 1,
                Ok(()) => e.exit_code(),
            }
        }
    };
    if let Err(e) = modelpress::formats::output::install_signal_cleanup() {
        log::warn!("{e}; an interrupted job may leave temporary files");
    }
    match run(cli) {
        Ok(()) => 0,
        // A reader that went away (`| head`): end quietly, as SIGPIPE would.
        Err(Error::Stdout(e)) if e.kind() == std::io::ErrorKind::BrokenPipe => 141,
        Err(e) => {
            use std::io::Write;
            // Nothing more can be said if stderr is gone too.
            let _ = writeln!(std::io::stderr(), "modelpress: error: {e}");
            1
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inspect(a) => commands::inspect(a),
        Command::Prune(a) => commands::prune(a),
        Command::Quantize(a) => commands::quantize(a),
        Command::Dequantize(a) => commands::dequantize(a),
        Command::Transfer(a) => commands::transfer(a),
        Command::Delta(a) => commands::delta(a),
        Command::Mix(a) => commands::mix(a),
        Command::Merge(a) => commands::merge(a),
        Command::Lora(args::LoraCommand::Merge(a)) => commands::lora_merge(a),
        Command::Lora(args::LoraCommand::Extract(a)) => commands::lora_extract(a),
        Command::Moe(a) => commands::moe(a),
        Command::Sample(a) => commands::sample(a),
        Command::Devices => commands::devices(),
        Command::Demo(a) => commands::demo(a),
        Command::Check(a) => commands::check(a),
        Command::Bench(a) => commands::bench(a),
    }
}
