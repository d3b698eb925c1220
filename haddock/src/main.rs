//! `haddock`: see the library's documentation; this file only parses flags.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = haddock::cli::Cli::parse();
    locator::logging::init(cli.log_format);
    std::process::ExitCode::from(haddock::cli::run(cli))
}
