//! `ftvmm`: the command line of the fault-tolerant micro-VMM.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ftvmm::{bench, demo, node_args, options, pair, run, EXIT_FTVMM_ERROR};

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
    /// Run a payload as the protected primary of a replicated pair; exits with the guest's code.
    Primary(options::PrimaryArgs),
    /// Stand by for a primary: hold its checkpoints and take over if it dies.
    Standby(options::StandbyArgs),
    /// The main job: boot the stencil workload, show its progress, check its result.
    Demo,
    /// Measure boot latency, guest speed and device throughput; print a table.
    Bench(bench::BenchArgs),
    /// Run this host's node daemon: it runs, protects and re-protects the pair's VMs.
    Node(node_args::NodeArgs),
    /// Ask a node daemon how it and its VMs are (text, or JSON with --json).
    Status(node_args::StatusArgs),
    /// Swap a protected VM's roles: its primary hands it over to its standby at an epoch's
    /// end, with no loss and no resync (the old primary is the standby at once).
    Swap(node_args::VmArgs),
    /// Rehearse a failure on a protected pair and report what it cost (detection, restore,
    /// epochs lost, time to protection, the service's stall).
    Drill(node_args::DrillArgs),
    /// Discard this node's copy of a VM whose history cannot be ordered with the peer's: it
    /// takes every block from the peer.
    Discard(node_args::VmArgs),
    /// One VM's process, started by the node daemon (spec and commands on stdin).
    #[command(hide = true)]
    VmWorker,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A node daemon and its VM processes say what they do (role changes, resync progress);
    // the other commands only warn.
    let default_level = match cli.command {
        Command::Node(_) | Command::VmWorker => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVMM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal: logs in files and pipes stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Run(args) => run::run(&args),
        Command::Primary(args) => pair::primary(&args),
        Command::Standby(args) => pair::standby(&args),
        Command::Demo => demo::demo(),
        Command::Bench(args) => bench::bench(&args),
        Command::Node(args) => node_args::node(&args),
        Command::Status(args) => node_args::status(&args),
        Command::Discard(args) => node_args::discard(&args),
        Command::Swap(args) => node_args::swap(&args),
        Command::Drill(args) => node_args::drill(&args),
        Command::VmWorker => node_args::vm_worker(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ftvmm: error: {e}");
            ExitCode::from(EXIT_FTVMM_ERROR)
        }
    }
}
