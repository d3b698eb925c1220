//! `proxy serve …`: see the library's documentation.
use clap::Parser;
use proxy::config::{Cli, Command};

// glibc's malloc/free were ~13 % of the proxy's cycles at saturation (perf); mimalloc's
// thread-local free lists serve pingora's many short-lived buffers far cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    locator_wire::logging::init(cli.log_format);
    match cli.command {
        Command::Serve(args) => proxy::server::serve(&args)?,
    }
    Ok(())
}
