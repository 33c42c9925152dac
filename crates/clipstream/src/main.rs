//! `clipstream`: CLIP embeddings and zero-shot labels for image/caption
//! events. This binary holds the command line; the model lives in
//! `clipstream-model`.
//!
//! - `cli`: the argument types shared by the subcommands.
//! - `commands/`: one module per subcommand.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    init_logging(args.verbose);
    match commands::run(args.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info,ort=warn",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("CLIPSTREAM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
