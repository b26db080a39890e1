//! The command line of the node daemon's commands: `ftvmm node`, `status`, `discard`, and the
//! hidden `vm-worker` (the daemon and the VM process themselves are in the `node` crate).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use std::io::BufRead;

use clap::Args;
use node::control::{Request, Response};
use node::guest::GuestImage;
use node::worker::{GuestSource, Reporter, WorkerSpec};
use node::{config, control, status};
use vmm::linux::{LinuxBoot, DEFAULT_CMDLINE};

use crate::run::{load_payload, Error};

/// `ftvmm node`: this host's daemon.
#[derive(Args, Debug, Clone)]
pub struct NodeArgs {
    /// The pair's config file (TOML; see examples/local-pair.toml).
    #[arg(long)]
    pub config: PathBuf,
    /// Which of its nodes this host is.
    #[arg(long)]
    pub name: String,
}

/// A command about one VM, to one node's daemon.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// The VM.
    pub vm: String,
    /// The pair's config file.
    #[arg(long)]
    pub config: PathBuf,
    /// The node whose daemon carries it out.
    #[arg(long)]
    pub name: String,
}

pub fn node(args: &NodeArgs) -> Result<ExitCode, Error> {
    let config = config::load(&args.config)?;
    node::daemon::run(config, &args.name)?;
    Ok(ExitCode::SUCCESS)
}

pub fn discard(args: &VmArgs) -> Result<ExitCode, Error> {
    let config = config::load(&args.config)?;
    config.vm(&args.vm)?;
    let node = config.node(&args.name)?;
    let request = Request::Discard {
        vm: args.vm.clone(),
    };
    match control::request(&node.socket, &request, STATUS_TIMEOUT)? {
        Response::Done { message } => {
            println!("{message}");
            Ok(ExitCode::SUCCESS)
        }
        Response::Refused { reason } => Err(reason.into()),
        other => Err(format!("unexpected answer from node {}: {other:?}", node.name).into()),
    }
}

/// `ftvmm drill`: rehearse a failure on a protected pair.
#[derive(Args, Debug, Clone)]
pub struct DrillArgs {
    #[command(flatten)]
    pub vm: VmArgs,
    /// The fault: kill-primary, hang-primary, kill-standby, kill-node or swap.
    #[arg(long, value_parser = parse_fault)]
    pub fault: node::drill::Fault,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

fn parse_fault(s: &str) -> Result<node::drill::Fault, String> {
    node::drill::Fault::parse(s).ok_or_else(|| {
        format!("bad fault '{s}': use kill-primary, hang-primary, kill-standby, kill-node or swap")
    })
}

pub fn drill(args: &DrillArgs) -> Result<ExitCode, Error> {
    let config = config::load(&args.vm.config)?;
    let report = node::drill::drill(&config, &args.vm.name, &args.vm.vm, args.fault)?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(ExitCode::SUCCESS)
}

/// How long `ftvmm swap` waits for the roles to turn round.
const SWAP_LIMIT: Duration = Duration::from_secs(60);

/// `ftvmm swap`: the VM's primary hands it over to its standby at an epoch's end, with no
/// loss and no resync; waits until the roles have turned round.
pub fn swap(args: &VmArgs) -> Result<ExitCode, Error> {
    let config = config::load(&args.config)?;
    config.vm(&args.vm)?;
    let asked = config.node(&args.name)?;
    let other = config.peer(&args.name)?;
    // The primary's daemon carries a swap out; ask it, whichever node was named.
    let role = |node: &config::NodeConfig| -> Option<status::Role> {
        let s = control::query_status(node, STATUS_TIMEOUT).ok()?;
        s.vms
            .into_iter()
            .find(|v| v.name == args.vm)
            .map(|v| v.role)
    };
    let (from, to) = match role(asked) {
        Some(status::Role::Primary) => (asked, other),
        _ if role(other) == Some(status::Role::Primary) => (other, asked),
        _ => (asked, other),
    };
    let request = Request::Swap {
        vm: args.vm.clone(),
    };
    let start = std::time::Instant::now();
    match control::request(&from.socket, &request, STATUS_TIMEOUT)? {
        Response::Done { message } => println!("{message}"),
        Response::Refused { reason } => return Err(reason.into()),
        other => {
            return Err(format!("unexpected answer from node {}: {other:?}", from.name).into())
        }
    }
    loop {
        let protected_there = control::query_status(to, STATUS_TIMEOUT)
            .ok()
            .and_then(|s| s.vms.into_iter().find(|v| v.name == args.vm))
            .is_some_and(|v| v.role == status::Role::Primary && v.protected);
        if protected_there && role(from) == Some(status::Role::Standby) {
            println!(
                "{}: {} runs it, protected by {} (swapped in {} ms)",
                args.vm,
                to.name,
                from.name,
                start.elapsed().as_millis()
            );
            return Ok(ExitCode::SUCCESS);
        }
        if start.elapsed() > SWAP_LIMIT {
            return Err(format!(
                "{}: the roles did not turn round within {} s",
                args.vm,
                SWAP_LIMIT.as_secs()
            )
            .into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The VM process: its spec is the first line of stdin, commands follow; reports go to stdout.
pub fn vm_worker() -> Result<ExitCode, Error> {
    let mut input = std::io::BufReader::new(std::io::stdin());
    let mut line = String::new();
    input.read_line(&mut line)?;
    let spec: WorkerSpec =
        serde_json::from_str(&line).map_err(|e| format!("bad VM process spec: {e}"))?;
    let reporter = Reporter::new(Box::new(std::io::stdout()));
    let image = match &spec.guest {
        GuestSource::Payload { payload } => GuestImage::Payload(load_payload(payload)?),
        GuestSource::Kernel {
            kernel,
            initrd,
            cmdline,
        } => GuestImage::Linux(LinuxBoot {
            kernel: kernel.clone(),
            initrd: initrd.clone(),
            cmdline: cmdline
                .clone()
                .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        }),
    };
    let commands = node::worker::commands(input);
    if let Err(e) = node::worker::run(&spec, image, &commands, &reporter) {
        reporter.event(node::role::WorkerEvent::Failed {
            reason: e.to_string(),
        });
        return Err(e.into());
    }
    Ok(ExitCode::SUCCESS)
}

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
