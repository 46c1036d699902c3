//! `fovea`: an inference server for vision models.

mod allocator;
mod batcher;
mod cli;
mod commands;
mod config;
mod grpc;
mod http;
mod metrics;
mod network;
mod postprocess;
mod registry;
mod serve;
mod v2;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    allocator::keep_freed_pages();
    fast_candle_defaults();
    let cli = cli::Cli::parse();
    let log_format = match &cli.command {
        cli::Command::Serve(args) => args.log_format.clone(),
        _ => "text".into(),
    };
    init_logging(&log_format);
    // Every HTTP client in the program (pulls, `fovea bench --http`) needs it.
    fovea_weights::http::install_crypto_provider();
    if !matches!(cli.command, cli::Command::Serve(_) | cli::Command::Bench(_)) {
        die_quietly_on_closed_pipe();
    }
    match commands::run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// candle runs elementwise ops on a thread pool of its own; on small
/// machines that pool costs far more than the arithmetic (a batch norm took
/// 20x longer with it). Matrix products keep every core. Set before any
/// thread starts; a user's own setting wins.
fn fast_candle_defaults() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// `fovea detect ... | head` should stop when `head` does, not panic in
/// `println!`: Rust ignores SIGPIPE, so restore its default for the one-shot
/// commands. Never for the server, where a client's closed socket must not
/// kill the process.
fn die_quietly_on_closed_pipe() {
    #[cfg(unix)]
    // SAFETY: called before any thread is started; SIG_DFL is a valid handler.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("FOVEA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
