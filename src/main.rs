fn main() {
    std::process::exit(modelpress::cli::main());
}
