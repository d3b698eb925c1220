//! `proxy serve …`: see the library's documentation.
use clap::Parser;
use proxy::config::{Cli, Command};

// glibc's malloc/free were ~13 % of the proxy's cycles at saturation (perf); mimalloc's
// thread-local free lists serve pingora's many short-lived buffers far cheaper.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Pingora logs every failed TLS handshake at ERROR (its listener's only other lines are a
    // handshake timeout and a failed accept): any client can cause one per connection (a
    // scanner, a hello for a host we do not serve, a load tool cutting connections), so by
    // default they are off. Refusals are counted (`haddock_proxy_tls_handshakes_refused_total`);
    // RUST_LOG brings the lines back.
    locator_wire::logging::init_with_default(
        cli.log_format,
        "info,pingora_core::services::listening=off",
    );
    match cli.command {
        Command::Serve(args) => proxy::server::serve(&args)?,
    }
    Ok(())
}
