use clap::Parser;

fn main() -> std::process::ExitCode {
    // Structured events (one per release transition) go to stderr; `RUST_LOG=haddock=info`
    // shows them, `HADDOCK_LOG_JSON=1` makes them JSON lines.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if std::env::var_os("HADDOCK_LOG_JSON").is_some() {
        fmt.json().init();
    } else {
        fmt.init();
    }
    let cli = haddock::cli::Cli::parse();
    std::process::ExitCode::from(haddock::cli::run(cli))
}
