use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = haddock::cli::Cli::parse();
    std::process::ExitCode::from(haddock::cli::run(cli))
}
