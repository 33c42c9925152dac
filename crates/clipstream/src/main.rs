//! `clipstream`: CLIP embeddings and zero-shot labels for image/caption
//! events. This binary holds the command line; the model lives in
//! `clipstream-model`.
//!
//! - `cli`: the command line and its subcommands; `args`: arguments
//!   several subcommands share.
//! - `commands/`: one module per subcommand (`model` holds the four model
//!   commands: embed, classify, preprocess, tokenize); `run` below
//!   dispatches.

mod args;
mod cli;
mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    return_large_buffers_to_the_system();
    let args = cli::Cli::parse();
    init_logging(args.verbose);
    match run(args.command) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Runs a subcommand. `Err` is a set-up problem (exit 2); a failed input is
/// reported on stderr and turns the exit status into 1.
fn run(command: cli::Command) -> anyhow::Result<ExitCode> {
    use cli::Command;
    use commands::{bench, catalog, eval, model, night, run, search};
    match command {
        Command::Embed(a) => model::embed(a),
        Command::Classify(a) => model::classify(a),
        Command::Preprocess(a) => model::preprocess(a),
        Command::Tokenize(a) => model::tokenize(a),
        Command::Bench(a) => bench::run(a),
        Command::Run(a) => run::run(a),
        Command::Validate(a) => run::validate(a),
        Command::Plan(a) => catalog::plan(a),
        Command::Snapshot(a) => catalog::snapshot(a),
        Command::Night(a) => night::night(a),
        Command::Eval(a) => eval::eval(a),
        Command::Search(a) => search::search(a),
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

/// glibc serves allocations of 128 KiB and more with their own mappings,
/// given back when freed — but after the first such free it raises that
/// threshold to the freed size, and later large buffers (fetched objects,
/// decoded images, model inputs) come from the heap and stay resident after
/// they are freed: a run whose records held 90 MiB at most kept 330 MiB
/// resident. Fixing the thresholds keeps the resident size near what is in
/// use (the memory budget, `engine.max_bytes_in_flight`, means something).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn return_large_buffers_to_the_system() {
    const M_TRIM_THRESHOLD: i32 = -1;
    const M_MMAP_THRESHOLD: i32 = -3;
    unsafe extern "C" {
        fn mallopt(param: i32, value: i32) -> i32;
    }
    // SAFETY: mallopt only sets allocator parameters; called first thing,
    // before any other thread exists.
    unsafe {
        mallopt(M_MMAP_THRESHOLD, 128 << 10);
        mallopt(M_TRIM_THRESHOLD, 1 << 20);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_large_buffers_to_the_system() {}
