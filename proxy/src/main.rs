//! `proxy serve …`: see the library's documentation.
use clap::Parser;
use proxy::config::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    locator::logging::init(cli.log_format);
    match cli.command {
        Command::Serve(args) => proxy::server::serve(&args)?,
    }
    Ok(())
}
