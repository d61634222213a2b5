//! The `big-market` binary: parse the command line, run it, map errors to exit codes.

fn main() {
    let code = big_market::cli::main();
    std::process::exit(code);
}
