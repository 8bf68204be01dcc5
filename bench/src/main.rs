//! `angel-bench`: parses the flags and runs the benchmark (see the crate docs).

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = angel_bench::cli::Cli::parse();
    match angel_bench::run(&cli) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}
