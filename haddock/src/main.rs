//! `haddock`: see the library's documentation; this file only parses flags.
use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = haddock::cli::Cli::parse();
    // Human mode prints every step on stdout: the same events on stderr would say it twice.
    let default = match cli.log_format {
        locator_wire::logging::LogFormat::Pretty => "warn",
        locator_wire::logging::LogFormat::Json => "info",
    };
    locator_wire::logging::init_with_default(cli.log_format, default);
    std::process::ExitCode::from(haddock::cli::run(cli))
}
