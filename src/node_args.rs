//! The command line of the node daemon's commands: `ftvmm status` (the daemon itself is in
//! the `node` crate).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use node::{config, control, status};

use crate::run::Error;

/// How long `ftvmm status` waits for the daemon: it answers from memory at once.
const STATUS_TIMEOUT: Duration = Duration::from_secs(5);

/// `ftvmm status`: ask a node's daemon how it and its VMs are.
#[derive(Args, Debug, Clone)]
pub struct StatusArgs {
    /// The pair's config file (the one the node daemons run with).
    #[arg(long)]
    pub config: PathBuf,
    /// The node to ask (its daemon on this host).
    #[arg(long)]
    pub name: String,
    /// Print the status as JSON (one object) instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn status(args: &StatusArgs) -> Result<ExitCode, Error> {
    let config = config::load(&args.config)?;
    let node = config.node(&args.name)?;
    let node_status = control::query_status(node, STATUS_TIMEOUT)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&node_status)?);
    } else {
        print!("{}", status::render_text(&node_status));
    }
    Ok(ExitCode::SUCCESS)
}
