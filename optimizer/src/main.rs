//! `optimizer` binary: parse the command line, hand over to the library.

use clap::Parser;

fn main() -> anyhow::Result<std::process::ExitCode> {
    let cli = optimizer::cli::Cli::parse();
    Ok(optimizer::cli::run(cli)?)
}
