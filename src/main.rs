//! `ftvmm`: the command line of the fault-tolerant micro-VMM.

mod options;
mod payloads;
mod run;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Exit status when ftvmm itself fails (bad input, no KVM, ...), as `env` and `timeout` do.
pub const EXIT_FTVMM_ERROR: u8 = 125;
/// Exit status when the guest crashed (triple fault, unhandled VM exit).
pub const EXIT_GUEST_FAULT: u8 = 124;

#[derive(Parser)]
#[command(
    name = "ftvmm",
    version,
    about = "Fault-tolerant micro-VMM (Remus-style replication on KVM)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a payload guest and run it to completion; exits with the guest's exit code.
    Run(options::RunArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ftvmm: error: {e:#}");
            ExitCode::from(EXIT_FTVMM_ERROR)
        }
    }
}
