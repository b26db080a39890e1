//! `ftvmm drill`: rehearses a failure on a running, protected pair. It injects the real fault
//! (SIGKILL or SIGSTOP of the VM process or of the whole node, or a swap), follows the pair
//! through failover and back to protection in the roles it started in, and reports in numbers
//! what the rehearsal cost, with a probe of the guest's service running throughout.

use std::fs::File;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command as Process, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use tracing::info;

use crate::config::{Config, Failback, GuestSpec, NodeConfig, VmConfig};
use crate::control::{self, Request, Response};
use crate::probe::{self, ConsoleWatch};
use crate::status::{Role, VmStatus};

/// The faults a drill injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL of the primary's VM process.
    KillPrimary,
    /// SIGSTOP of the primary's VM process (a hung VMM); SIGCONT once the standby took over.
    HangPrimary,
    /// SIGKILL of the standby's VM process.
    KillStandby,
    /// SIGKILL of the primary's whole node daemon (its VM processes die with it: a dead host);
    /// the drill starts the daemon again.
    KillNode,
    /// A planned swap.
    Swap,
}

impl Fault {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "kill-primary" => Fault::KillPrimary,
            "hang-primary" => Fault::HangPrimary,
            "kill-standby" => Fault::KillStandby,
            "kill-node" => Fault::KillNode,
            "swap" => Fault::Swap,
            _ => return None,
        })
    }
}

/// What a drill measured (the JSON of `ftvmm drill --json`, a contract).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub fault: Fault,
    pub vm: String,
    /// The nodes that ran the guest before the fault and while it was handled.
    pub primary: String,
    pub standby: String,
    /// From the primary's last word to the standby's decision that it was dead (for a killed
    /// standby: until the primary went on alone; 0 for a swap).
    pub detection_ms: f64,
    /// From the decision to the guest running on the standby (for a swap: from asking to the
    /// new primary protected).
    pub restore_ms: f64,
    /// Checkpoints acknowledged before the fault that the resumed guest did not hold (0).
    pub epochs_lost: u64,
    /// Output of the last checkpoint the node that took over released itself.
    pub held_frames: u64,
    pub held_console_bytes: u64,
    /// From the fault to the pair protected again (in whatever roles).
    pub reprotected_s: f64,
    /// From the fault to the pair protected in its first roles again (a swap stays swapped).
    pub home_s: f64,
    /// The longest wait the probe saw: a kv client's reply, or the console stream's growth.
    pub stall_ms: f64,
    /// What the probe was.
    pub probe: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DrillError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("refused: {0}")]
    Refused(String),
    #[error("the pair did not {what} within {secs} s")]
    Timeout { what: String, secs: u64 },
    #[error("{0}")]
    Io(String),
}

/// Bound of each wait of a drill.
const LIMIT: Duration = Duration::from_secs(120);
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Rehearses `fault` on VM `vm` of the pair that `config` describes (`asked` is the node the
/// operator named; the drill talks to both).
pub fn drill(config: &Config, asked: &str, vm: &str, fault: Fault) -> Result<Report, DrillError> {
    let vm_config = config.vm(vm)?.clone();
    let me = config.node(asked)?;
    let _lock = DrillLock::take(me, vm)?;
    let nodes = [config.node(asked)?.clone(), config.peer(asked)?.clone()];
    let vm_of = |n: &NodeConfig| -> Option<VmStatus> {
        let status = control::query_status(n, STATUS_TIMEOUT).ok()?;
        status.vms.into_iter().find(|v| v.name == vm)
    };
    let (primary, standby) = match (vm_of(&nodes[0]), vm_of(&nodes[1])) {
        (Some(a), Some(b)) if a.role == Role::Primary && a.protected && b.role == Role::Standby => {
            (nodes[0].clone(), nodes[1].clone())
        }
        (Some(a), Some(b)) if b.role == Role::Primary && b.protected && a.role == Role::Standby => {
            (nodes[1].clone(), nodes[0].clone())
        }
        (a, b) => {
            let say = |s: Option<VmStatus>| match s {
                Some(s) => format!(
                    "{}{}",
                    s.role,
                    s.why.map(|w| format!(" ({w})")).unwrap_or_default()
                ),
                None => "not answering".into(),
            };
            return Err(DrillError::Refused(format!(
                "{vm} is not protected: {} is {}, {} is {}; a drill needs a protected pair",
                nodes[0].name,
                say(a),
                nodes[1].name,
                say(b)
            )));
        }
    };
    let before = vm_of(&primary).ok_or_else(|| DrillError::Io("the primary went away".into()))?;
    let earlier_takeover = vm_of(&standby).and_then(|s| s.last_takeover);

    let stop = AtomicBool::new(false);
    let (probe_name, probe) = Probe::for_vm(&vm_config, config);
    let (report, stall) = std::thread::scope(|s| {
        let probing = s.spawn(|| probe.run(&stop));
        // Let the probe see the service running before the fault.
        std::thread::sleep(Duration::from_millis(300));
        let result = inject_and_follow(
            config,
            &vm_config,
            fault,
            &primary,
            &standby,
            &before,
            &earlier_takeover,
        );
        stop.store(true, Ordering::SeqCst);
        (result, probing.join())
    });
    let mut report = report?;
    report.stall_ms = stall
        .map_err(|_| DrillError::Io("the probe panicked".into()))?
        .map_err(DrillError::Io)?
        .as_secs_f64()
        * 1e3;
    report.probe = probe_name;
    Ok(report)
}

/// Injects `fault` and follows the pair back to protection, then home.
fn inject_and_follow(
    config: &Config,
    vm: &VmConfig,
    fault: Fault,
    primary: &NodeConfig,
    standby: &NodeConfig,
    before: &VmStatus,
    earlier_takeover: &Option<crate::status::TakeoverFigures>,
) -> Result<Report, DrillError> {
    let name = vm.name.as_str();
    let vm_of = |n: &NodeConfig| -> Option<VmStatus> {
        let status = control::query_status(n, STATUS_TIMEOUT).ok()?;
        status.vms.into_iter().find(|v| v.name == name)
    };
    let daemon_pid = |n: &NodeConfig| control::query_status(n, STATUS_TIMEOUT).ok()?.pid;
    let mut report = Report {
        fault,
        vm: name.to_string(),
        primary: primary.name.clone(),
        standby: standby.name.clone(),
        detection_ms: 0.0,
        restore_ms: 0.0,
        epochs_lost: 0,
        held_frames: 0,
        held_console_bytes: 0,
        reprotected_s: 0.0,
        home_s: 0.0,
        stall_ms: 0.0,
        probe: String::new(),
    };
    let start = Instant::now();
    let vm_pid = |s: &VmStatus| {
        s.pid
            .ok_or_else(|| DrillError::Io(format!("no VM process of {name} is running")))
    };
    info!(?fault, vm = name, primary = %primary.name, "drill: injecting the fault");
    match fault {
        Fault::KillPrimary => signal(vm_pid(before)?, libc::SIGKILL)?,
        Fault::HangPrimary => signal(vm_pid(before)?, libc::SIGSTOP)?,
        Fault::KillStandby => {
            let s = vm_of(standby).ok_or_else(|| DrillError::Io("the standby went away".into()))?;
            signal(vm_pid(&s)?, libc::SIGKILL)?;
        }
        Fault::KillNode => {
            let pid = daemon_pid(primary).ok_or_else(|| {
                DrillError::Io(format!("node {} did not say its pid", primary.name))
            })?;
            signal(pid, libc::SIGKILL)?;
        }
        Fault::Swap => swap(primary, name)?,
    }
    match fault {
        Fault::KillPrimary | Fault::HangPrimary | Fault::KillNode => {
            let took_over = wait(standby, name, "take over", |s| {
                s.role == Role::Primary && s.last_takeover != *earlier_takeover
            })?;
            if let Some(t) = &took_over.last_takeover {
                report.detection_ms = t.detection_ms;
                report.restore_ms = t.restore_ms;
                report.epochs_lost = before.acked.saturating_sub(t.epoch);
                report.held_frames = t.held_frames;
                report.held_console_bytes = t.held_console_bytes;
            }
            match fault {
                // Woken, the hung VMM reads that it was deposed and ends.
                Fault::HangPrimary => signal(vm_pid(before)?, libc::SIGCONT)?,
                Fault::KillNode => restart_node(config, primary)?,
                _ => {}
            }
            wait_protected(standby, primary, name)?;
        }
        Fault::KillStandby => {
            let alone = wait(primary, name, "go on alone", |s| !s.protected)?;
            report.detection_ms = start.elapsed().as_secs_f64() * 1e3;
            let _ = alone;
            wait_protected(primary, standby, name)?;
        }
        Fault::Swap => {
            wait_protected(standby, primary, name)?;
            report.restore_ms = start.elapsed().as_secs_f64() * 1e3;
        }
    }
    report.reprotected_s = start.elapsed().as_secs_f64();
    let moved = matches!(
        fault,
        Fault::KillPrimary | Fault::HangPrimary | Fault::KillNode
    );
    if moved {
        // Home again: by itself with automatic failback, else by a swap of the drill's.
        if vm.policy.failback == Failback::Manual || vm.policy.preferred != primary.name {
            swap(standby, name)?;
        }
        wait_protected(primary, standby, name)?;
    }
    report.home_s = start.elapsed().as_secs_f64();
    Ok(report)
}

/// Waits until VM `vm` on `node` satisfies `cond`.
fn wait(
    node: &NodeConfig,
    vm: &str,
    what: &str,
    cond: impl Fn(&VmStatus) -> bool,
) -> Result<VmStatus, DrillError> {
    let start = Instant::now();
    loop {
        let status = control::query_status(node, STATUS_TIMEOUT)
            .ok()
            .and_then(|s| s.vms.into_iter().find(|v| v.name == vm));
        if let Some(status) = status.filter(|s| cond(s)) {
            return Ok(status);
        }
        if start.elapsed() > LIMIT {
            return Err(DrillError::Timeout {
                what: format!("{what} ({vm} on {})", node.name),
                secs: LIMIT.as_secs(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until `primary` runs VM `vm` protected by `standby`.
fn wait_protected(primary: &NodeConfig, standby: &NodeConfig, vm: &str) -> Result<(), DrillError> {
    wait(primary, vm, "protect the guest again", |s| {
        s.role == Role::Primary && s.protected
    })?;
    wait(standby, vm, "stand by again", |s| s.role == Role::Standby)?;
    Ok(())
}

/// Asks `node`'s daemon to hand VM `vm` over to its peer.
fn swap(node: &NodeConfig, vm: &str) -> Result<(), DrillError> {
    let request = Request::Swap { vm: vm.to_string() };
    match control::request(&node.socket, &request, STATUS_TIMEOUT) {
        Ok(Response::Done { .. }) => Ok(()),
        Ok(Response::Refused { reason }) => Err(DrillError::Refused(reason)),
        Ok(other) => Err(DrillError::Io(format!("unexpected answer {other:?}"))),
        Err(e) => Err(DrillError::Io(e.to_string())),
    }
}

fn signal(pid: u32, sig: libc::c_int) -> Result<(), DrillError> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| DrillError::Io(format!("bad pid {pid}")))?;
    // SAFETY: kill(2) has no memory effects; the pid comes from the daemon that runs it.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc != 0 {
        return Err(DrillError::Io(format!(
            "kill({pid}, {sig}): {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

/// Starts node `node`'s daemon again after a kill-node drill, as its service manager would,
/// its log in its state directory; it outlives the drill.
fn restart_node(config: &Config, node: &NodeConfig) -> Result<(), DrillError> {
    // The killed daemon's socket file is left; it answers nothing until the new one binds.
    let exe = std::env::current_exe().map_err(|e| DrillError::Io(e.to_string()))?;
    let log_path = node.state_dir.join("node.log");
    let log = File::options()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| DrillError::Io(format!("{}: {e}", log_path.display())))?;
    let err = log.try_clone().map_err(|e| DrillError::Io(e.to_string()))?;
    Process::new(exe)
        .args(["node", "--config"])
        .arg(&config.path)
        .args(["--name", &node.name])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| DrillError::Io(format!("cannot start node {}: {e}", node.name)))?;
    info!(node = %node.name, "drill: started the node daemon again");
    Ok(())
}

/// How the drill watches the guest's service.
enum Probe {
    /// A kv client on one connection.
    Kv(SocketAddr),
    /// The console stream across the nodes' files.
    Console(ConsoleWatch),
}

impl Probe {
    /// A kv client for kv guests (their `ip=` and `port=` arguments), the console otherwise.
    fn for_vm(vm: &VmConfig, config: &Config) -> (String, Self) {
        if let GuestSpec::Payload { payload, args } = &vm.guest {
            let arg = |key: &str| {
                args.iter()
                    .find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
            };
            let ip = arg("ip").and_then(|v| v.split('/').next()?.parse::<std::net::IpAddr>().ok());
            let port = arg("port").and_then(|p| p.parse::<u16>().ok());
            if let (true, Some(ip), Some(port)) = (payload == "builtin:kv", ip, port) {
                let addr = SocketAddr::new(ip, port);
                return (format!("kv client of {addr}"), Probe::Kv(addr));
            }
        }
        let files: Vec<PathBuf> = config
            .nodes
            .iter()
            .map(|n| {
                vm.on_node
                    .get(&n.name)
                    .and_then(|c| c.console.clone())
                    .unwrap_or_else(|| n.state_dir.join(format!("{}.console", vm.name)))
            })
            .collect();
        (
            "console stream".into(),
            Probe::Console(ConsoleWatch::new(files)),
        )
    }

    /// Runs until `stop`; returns the longest stall seen.
    fn run(&self, stop: &AtomicBool) -> Result<Duration, String> {
        match self {
            Probe::Kv(addr) => {
                let progress = AtomicU64::new(0);
                let round_trips =
                    probe::kv_sequential(*addr, &progress, stop, Duration::from_millis(2))?;
                Ok(round_trips.into_iter().max().unwrap_or_default())
            }
            Probe::Console(watch) => Ok(watch.longest_stall(stop)),
        }
    }
}

/// One drill at a time per VM: an exclusive lock on a file in the asked node's state
/// directory, held while the drill runs (closing the file releases it).
struct DrillLock {
    _file: File,
}

impl DrillLock {
    fn take(node: &NodeConfig, vm: &str) -> Result<Self, DrillError> {
        let path = node.state_dir.join(format!("{vm}.drill"));
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| DrillError::Io(format!("{}: {e}", path.display())))?;
        // SAFETY: flock on a descriptor this function owns; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            return Err(DrillError::Refused(format!(
                "a drill of {vm} is running already (it holds {})",
                path.display()
            )));
        }
        Ok(Self { _file: file })
    }
}

impl Report {
    /// The report as people read it.
    pub fn render(&self) -> String {
        let mut s = format!(
            "drill {} of {} ({} primary, {} standby)\n",
            serde_json::to_value(self.fault)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default(),
            self.vm,
            self.primary,
            self.standby
        );
        let rows = [
            ("detection", format!("{:.1} ms", self.detection_ms)),
            ("restore", format!("{:.1} ms", self.restore_ms)),
            ("committed epochs lost", self.epochs_lost.to_string()),
            (
                "held output released by the new primary",
                format!(
                    "{} frames, {} console bytes",
                    self.held_frames, self.held_console_bytes
                ),
            ),
            (
                "protected again after",
                format!("{:.1} s", self.reprotected_s),
            ),
            ("home again after", format!("{:.1} s", self.home_s)),
            (
                "longest stall seen by the probe",
                format!("{:.0} ms ({})", self.stall_ms, self.probe),
            ),
        ];
        for (what, value) in rows {
            s.push_str(&format!("  {what:<40} {value}\n"));
        }
        s
    }
}
