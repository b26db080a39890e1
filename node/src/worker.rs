//! The VMM process of one protected VM (`ftvmm vm-worker`), started and supervised by its
//! node's daemon, so that a guest fault or a VMM panic never takes the daemon or another VM
//! with it. It reads its spec, then commands, as JSON lines on stdin, and reports events and
//! figures as JSON lines on stdout. It boots the guest alone or stands by for the peer's
//! primary; a primary protects the guest whenever told where a standby listens, and goes on
//! alone when the standby is lost; a standby that takes over becomes such a primary.

use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use checkpoint::link::{self, Listener, PeerConfig};
use checkpoint::primary::{self, PrimaryEnd, PrimaryGuest, PrimaryReport, Watch};
use checkpoint::standby::{self, StandbyEnd, StandbyProgress, StandbyWatch};
use disk_sync::resync::all_blocks;
use serde::{Deserialize, Serialize};
use tracing::{info, info_span, warn};
use vmm::cast::{saturating_u64, usize_to_u64};
use vmm::{VmConfig, VmOutcome};

use crate::guest::{boot_primary, GuestError, GuestImage, HostSpec, Resumed, StandbyHost};
use crate::role::WorkerEvent;

/// How the VM process starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "start", rename_all = "kebab-case")]
pub enum Start {
    /// Boot the guest and run it alone.
    Boot,
    /// Stand by for the peer's primary on `ip` (a port of the system's choosing); the image
    /// needs every block if `full`.
    Listen { ip: IpAddr, full: bool },
}

/// What to boot, as the daemon names it; the VM process reads it (`builtin:NAME` payloads are
/// the binary's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GuestSource {
    Payload {
        payload: String,
    },
    Kernel {
        kernel: std::path::PathBuf,
        initrd: Option<std::path::PathBuf>,
        cmdline: Option<String>,
    },
}

/// The timing both nodes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timing {
    pub epoch_ms: u64,
    pub failover_timeout_ms: u64,
    pub ack_timeout_ms: u64,
}

/// Everything a VM process needs, the first line of its stdin.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub vm: String,
    pub config: VmConfig,
    pub guest: GuestSource,
    pub host: HostSpec,
    pub timing: Timing,
    pub start: Start,
}

/// What the daemon tells a running VM process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Protect the guest with the standby listening at `addr`.
    Protect { addr: SocketAddr },
}

/// Figures of a VM process, several times a second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Checkpoints taken (primary) or committed (standby).
    pub epoch: u64,
    pub epochs_per_s: f64,
    pub last_ack_age_ms: Option<u64>,
    pub dirty_mib_s: f64,
    pub wire_mib_s: f64,
    /// Disk resync: bytes done of the total (sent by a primary, written by a standby).
    pub resync_done: u64,
    pub resync_total: u64,
    /// Time the guest was held paused because its standby was behind.
    pub held_ms: u64,
    /// "ok", "standby slow" or "standby lost" on a primary.
    pub standby: Option<String>,
}

/// One line a VM process writes on stdout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "body", rename_all = "kebab-case")]
pub enum Report {
    Event(WorkerEvent),
    Figures(Figures),
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Guest(#[from] GuestError),
    #[error(transparent)]
    Link(#[from] checkpoint::link::LinkError),
    #[error(transparent)]
    Standby(#[from] checkpoint::standby::StandbyError),
    #[error(transparent)]
    Primary(#[from] checkpoint::primary::PrimaryError),
    #[error("cannot start the guest: {0}")]
    Start(#[from] vmm::builder::BuildError),
    #[error("cannot read the disk image's size: {0}")]
    DiskSize(std::io::Error),
}

/// Where reports go: stdout, one JSON line each; clones share it.
#[derive(Clone)]
pub struct Reporter(Arc<Mutex<Box<dyn Write + Send>>>);

impl Reporter {
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Self(Arc::new(Mutex::new(out)))
    }

    fn send(&self, report: &Report) {
        let mut out = lock(&self.0);
        // A daemon that stopped reading is gone: this process dies with it anyway.
        if let Ok(line) = serde_json::to_string(report) {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }

    pub fn event(&self, event: WorkerEvent) {
        info!(?event, "reporting");
        self.send(&Report::Event(event));
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How often figures are reported.
const FIGURES_EVERY: Duration = Duration::from_millis(250);
/// How long a primary waits for the standby it was told of to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads commands from `input` (after the spec line) onto a channel. The end of input means
/// the daemon is gone: so is this VM process.
pub fn commands(input: impl BufRead + Send + 'static) -> Receiver<Command> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in input.lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Command>(&line) {
                Ok(cmd) => {
                    if tx.send(cmd).is_err() {
                        return;
                    }
                }
                Err(e) => warn!("ignoring a bad command from the daemon: {e}"),
            }
        }
        warn!("the node daemon is gone; the VM process ends with it");
        std::process::exit(1);
    });
    rx
}

/// Runs the VM process: `image` is what `spec.guest` names.
pub fn run(
    spec: &WorkerSpec,
    image: GuestImage,
    commands: &Receiver<Command>,
    reporter: &Reporter,
) -> Result<(), WorkerError> {
    let _span = info_span!("vm", name = %spec.vm).entered();
    let peer = peer_config(spec)?;
    match &spec.start {
        Start::Boot => {
            let mut guest = boot_primary(&spec.config, &image, &spec.host, false)?;
            guest.vmm.start()?;
            reporter.event(WorkerEvent::Booted);
            alone(guest, &peer, commands, reporter)
        }
        Start::Listen { ip, full } => {
            let also = match (&spec.host.disk, full) {
                (Some(path), true) => all_blocks(disk_size(path)?),
                _ => Default::default(),
            };
            let mut host = StandbyHost::open(&spec.host, &also, Duration::ZERO)?;
            let listener = Listener::bind(&SocketAddr::new(*ip, 0).to_string())?;
            let port = listener.local_addr().map_err(link::LinkError::Io)?.port();
            reporter.event(WorkerEvent::Listening { port });
            let watch = StandbyWatch::default();
            let disk = host.take_disk();
            let synced = AtomicBool::new(false);
            let rates = Mutex::new(Rates::default());
            let figures = || {
                let progress = watch.snapshot();
                // Not a standby until it holds a complete checkpoint: the first commit.
                if progress.committed > 0 && !synced.swap(true, Ordering::SeqCst) {
                    reporter.event(WorkerEvent::Synced);
                }
                standby_figures(&progress, &mut lock(&rates))
            };
            let end = figures_while(reporter, figures, || {
                standby::serve(&listener, &host.local, disk, &watch)
            })?;
            match end {
                StandbyEnd::Exit(code) => {
                    reporter.event(WorkerEvent::Exited { code });
                    Ok(())
                }
                StandbyEnd::Goodbye => {
                    reporter.event(WorkerEvent::Goodbye);
                    Ok(())
                }
                StandbyEnd::Takeover(t) => {
                    let resumed = host.resume(*t)?;
                    reporter.event(WorkerEvent::TookOver);
                    match resumed {
                        Resumed::Running(guest) => alone(guest, &peer, commands, reporter),
                        Resumed::Ended(outcome) => {
                            ended(reporter, outcome);
                            Ok(())
                        }
                    }
                }
            }
        }
    }
}

/// The replication configuration this node's primary offers its standby.
fn peer_config(spec: &WorkerSpec) -> Result<PeerConfig, WorkerError> {
    Ok(PeerConfig {
        vm: spec.config.clone(),
        disk_size: match &spec.host.disk {
            Some(path) => Some(disk_size(path)?),
            None => None,
        },
        net_mac: spec.host.net.as_ref().map(|n| n.mac),
        epochs: checkpoint::policy::EpochBounds::fixed(spec.timing.epoch_ms),
        failover_timeout_ms: spec.timing.failover_timeout_ms,
        ack_timeout_ms: spec.timing.ack_timeout_ms,
    })
}

fn disk_size(path: &std::path::Path) -> Result<u64, WorkerError> {
    std::fs::metadata(path)
        .map(|m| m.len())
        .map_err(WorkerError::DiskSize)
}

/// Reports how the guest ended.
fn ended(reporter: &Reporter, outcome: VmOutcome) {
    reporter.event(match outcome {
        VmOutcome::Exited(code) => WorkerEvent::Exited { code },
        // A replicated guest's reboot ends it, as `ftvmm primary` does.
        VmOutcome::Reset => WorkerEvent::Exited { code: 0 },
        VmOutcome::Fault(reason) => WorkerEvent::Failed {
            reason: format!("guest fault: {reason}"),
        },
    });
}

/// Runs the guest alone until it ends, protecting it whenever the daemon names a standby.
fn alone(
    mut guest: PrimaryGuest,
    peer: &PeerConfig,
    commands: &Receiver<Command>,
    reporter: &Reporter,
) -> Result<(), WorkerError> {
    loop {
        if let Some(outcome) = guest.vmm.outcome() {
            ended(reporter, outcome);
            return Ok(());
        }
        let addr = match commands.recv_timeout(Duration::from_millis(50)) {
            Ok(Command::Protect { addr }) => addr,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                // The command reader ends this process when the daemon goes.
                std::thread::park();
                continue;
            }
        };
        let link = match link::connect(&addr.to_string(), peer, CONNECT_TIMEOUT) {
            Ok(link) => link,
            Err(e) => {
                reporter.event(WorkerEvent::Unprotected {
                    reason: e.to_string(),
                });
                continue;
            }
        };
        info!(%addr, "standby connected; protecting the guest");
        let watch = Watch::default();
        let protected = AtomicBool::new(false);
        let rates = Mutex::new(Rates::default());
        let figures = || {
            watch.peek(|report| {
                if report.acked > 0 && !protected.swap(true, Ordering::SeqCst) {
                    reporter.event(WorkerEvent::Protected);
                }
                primary_figures(report, &mut lock(&rates))
            })
        };
        let (end, _report) = figures_while(reporter, figures, || {
            primary::protect(guest, link, peer, &watch)
        })?;
        match end {
            PrimaryEnd::Guest(outcome) => {
                ended(reporter, outcome);
                return Ok(());
            }
            PrimaryEnd::Deposed => {
                reporter.event(WorkerEvent::Deposed);
                return Ok(());
            }
            PrimaryEnd::Alone { guest: g, reason } => {
                reporter.event(WorkerEvent::Unprotected { reason });
                guest = *g;
            }
        }
    }
}

/// Runs `work`, reporting `figures()` every [`FIGURES_EVERY`] meanwhile.
fn figures_while<T>(
    reporter: &Reporter,
    figures: impl Fn() -> Figures + Sync,
    work: impl FnOnce() -> T,
) -> T {
    let running = AtomicBool::new(true);
    std::thread::scope(|s| {
        s.spawn(|| {
            while running.load(Ordering::Relaxed) {
                reporter.send(&Report::Figures(figures()));
                std::thread::sleep(FIGURES_EVERY);
            }
            // The last figures, so that the daemon sees the final state (and the first
            // commit of a standby that took over at once).
            reporter.send(&Report::Figures(figures()));
        });
        let result = work();
        running.store(false, Ordering::Relaxed);
        result
    })
}

/// Rates from one report of figures to the next.
#[derive(Default)]
struct Rates {
    last: Option<(Instant, u64, u64, u64)>,
}

impl Rates {
    /// Epochs, dirty bytes and wire bytes per second since the last call, given the totals.
    fn per_second(&mut self, epochs: u64, dirty: u64, wire: u64) -> (f64, f64, f64) {
        let now = Instant::now();
        let rates = match self.last {
            Some((t, e, d, w)) => {
                let secs = (now - t).as_secs_f64().max(1e-9);
                let rate = |now: u64, then: u64| now.saturating_sub(then) as f64 / secs;
                (rate(epochs, e), rate(dirty, d), rate(wire, w))
            }
            None => (0.0, 0.0, 0.0),
        };
        self.last = Some((now, epochs, dirty, wire));
        rates
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// A protected primary's figures now.
fn primary_figures(r: &PrimaryReport, rates: &mut Rates) -> Figures {
    let page = usize_to_u64(checkpoint::wire::PAGE_SIZE);
    let (epochs_per_s, dirty, wire) = rates.per_second(
        r.epochs,
        r.dirty_pages_total.saturating_mul(page),
        r.wire_bytes,
    );
    Figures {
        epoch: r.epochs,
        epochs_per_s,
        last_ack_age_ms: r.oldest_unacked.map(|d| saturating_u64(d.as_millis())),
        dirty_mib_s: dirty / MIB,
        wire_mib_s: wire / MIB,
        resync_done: r.resync_sent,
        resync_total: r.resync_total,
        held_ms: saturating_u64(r.held_time.as_millis()),
        standby: Some(r.standby.as_str().to_string()),
    }
}

/// A standby's figures now.
fn standby_figures(p: &StandbyProgress, rates: &mut Rates) -> Figures {
    let (epochs_per_s, _, _) = rates.per_second(p.committed, 0, 0);
    Figures {
        epoch: p.committed,
        epochs_per_s,
        last_ack_age_ms: p
            .committed_at
            .map(|t| saturating_u64(t.elapsed().as_millis())),
        resync_done: p.resync_done,
        resync_total: p.resync_total,
        ..Figures::default()
    }
}
