//! The `modelpress` command line: a thin binary over the library (the
//! `cli` feature, on by default).

mod cli;

fn main() {
    std::process::exit(cli::main());
}
