//! The VMM process of one protected VM (`ftvmm vm-worker`), started and supervised by its
//! node's daemon, so that a guest fault or a VMM panic never takes the daemon or another VM
//! with it. It reads its spec, then commands, as JSON lines on stdin, and reports events and
//! figures as JSON lines on stdout. It boots the guest alone or stands by for the peer's
//! primary; a primary protects the guest whenever told where a standby listens, and goes on
//! alone when the standby is lost; a standby that takes over becomes such a primary.

use crossbeam_channel::{Receiver, RecvTimeoutError};
use std::io::{BufRead, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use checkpoint::link::{self, Listener, PeerConfig, PrimaryLink};
use checkpoint::primary::{self, PrimaryEnd, PrimaryGuest, PrimaryReport, Watch};
use checkpoint::standby::{self, Begin, StandbyEnd, StandbyProgress, StandbyWatch, Takeover};
use disk_sync::resync::all_blocks;
use serde::{Deserialize, Serialize};
use tracing::{info, info_span, warn};
use vmm::cast::{saturating_u64, usize_to_u64};
use vmm::{VmConfig, VmOutcome};

use crate::guest::{boot_primary, GuestError, GuestImage, HostSpec, Resumed, StandbyHost};
use crate::role::WorkerEvent;
use crate::status::TakeoverFigures;

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
    pub epochs: checkpoint::policy::EpochBounds,
    pub failover_timeout_ms: u64,
    pub ack_timeout_ms: u64,
    pub resync_max_mib_s: u64,
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
    /// Hand the protected guest over to its standby at the end of the running epoch.
    Swap,
}

/// Figures of a VM process, several times a second.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Checkpoints taken (primary) or committed (standby).
    pub epoch: u64,
    /// The highest acknowledged (primary) or committed (standby) checkpoint.
    pub acked: u64,
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
    /// On a primary: recent epoch lengths (p50, p99) and why epochs ended.
    pub epoch_ms_p50: Option<f64>,
    pub epoch_ms_p99: Option<f64>,
    pub epoch_ends: std::collections::BTreeMap<String, u64>,
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

/// How often the VM process looks at its commands and progress while it protects or stands by.
const POLL_EVERY: Duration = Duration::from_millis(5);
/// How often figures are reported.
const FIGURES_EVERY: Duration = Duration::from_millis(250);
/// How long a primary waits for the standby it was told of to answer.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads commands from `input` (after the spec line) onto a channel. The end of input means
/// the daemon is gone: so is this VM process.
pub fn commands(input: impl BufRead + Send + 'static) -> Receiver<Command> {
    let (tx, rx) = crossbeam_channel::unbounded();
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

/// What the VM process does next.
enum Phase {
    /// Run the guest alone until told where a standby listens.
    Alone(PrimaryGuest),
    /// Protect the guest over this link.
    Protect(PrimaryGuest, PrimaryLink),
    /// Stand by on this node's resources: for a primary that connects to the listener, or
    /// with the checkpoint a swap left here.
    Standby(Box<StandbyHost>, StandbyStart),
    /// The guest ended, or this node's part in it did.
    Done,
}

/// How a standby begins.
enum StandbyStart {
    Listen(Listener),
    Continue(Box<Begin>),
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
    let mut phase = match &spec.start {
        Start::Boot => {
            let mut guest = boot_primary(&spec.config, &image, &spec.host, false)?;
            guest.vmm.start()?;
            reporter.event(WorkerEvent::Booted);
            Phase::Alone(guest)
        }
        Start::Listen { ip, full } => {
            let also = match (&spec.host.disk, full) {
                (Some(path), true) => all_blocks(disk_size(path)?),
                _ => Default::default(),
            };
            let host = StandbyHost::open(&spec.host, &also, Duration::ZERO)?;
            let listener = Listener::bind(&SocketAddr::new(*ip, 0).to_string())?;
            let port = listener.local_addr().map_err(link::LinkError::Io)?.port();
            reporter.event(WorkerEvent::Listening { port });
            Phase::Standby(Box::new(host), StandbyStart::Listen(listener))
        }
    };
    loop {
        phase = match phase {
            Phase::Alone(guest) => alone(guest, &peer, commands, reporter),
            Phase::Protect(guest, link) => protect(guest, link, spec, &peer, commands, reporter)?,
            Phase::Standby(host, start) => standby(*host, start, reporter)?,
            Phase::Done => return Ok(()),
        };
    }
}

/// Stands by until the primary exits, says goodbye, dies (this node takes over) or hands
/// the guest over (this node resumes it, protected at once).
fn standby(
    mut host: StandbyHost,
    start: StandbyStart,
    reporter: &Reporter,
) -> Result<Phase, WorkerError> {
    let watch = StandbyWatch::default();
    if let Some(hook) = host.swap_announcer() {
        watch.on_swap(hook);
    }
    let disk = host.take_disk();
    let synced = AtomicBool::new(matches!(start, StandbyStart::Continue(_)));
    let rates = Mutex::new(Rates::default());
    let poll = || {
        // Not a standby until it holds a complete checkpoint: the first commit.
        if watch.snapshot().committed > 0 && !synced.swap(true, Ordering::SeqCst) {
            reporter.event(WorkerEvent::Synced);
        }
    };
    let figures = || standby_figures(&watch.snapshot(), &mut lock(&rates));
    let end = figures_while(reporter, poll, figures, || match start {
        StandbyStart::Listen(listener) => standby::serve(&listener, &host.local, disk, &watch),
        StandbyStart::Continue(begin) => standby::stand_by(*begin, disk, &watch),
    })?;
    Ok(match end {
        StandbyEnd::Exit(code) => {
            reporter.event(WorkerEvent::Exited { code });
            Phase::Done
        }
        StandbyEnd::Goodbye => {
            reporter.event(WorkerEvent::Goodbye);
            Phase::Done
        }
        StandbyEnd::Takeover(t) => {
            let mut figures = takeover_figures(&t);
            let decided = t.decided;
            let resumed = host.resume(*t)?;
            figures.restore_ms = decided.elapsed().as_secs_f64() * 1e3;
            match resumed {
                Resumed::Running(guest) => {
                    reporter.event(WorkerEvent::TookOver { figures });
                    Phase::Alone(guest)
                }
                Resumed::Swapped { guest, link } => {
                    reporter.event(WorkerEvent::SwappedIn);
                    Phase::Protect(guest, link)
                }
                Resumed::Ended(outcome) => {
                    reporter.event(WorkerEvent::TookOver { figures });
                    ended(reporter, outcome);
                    Phase::Done
                }
            }
        }
    })
}

/// What a takeover cost so far (its restore is measured once the guest runs).
fn takeover_figures(t: &Takeover) -> TakeoverFigures {
    let held = &t.state.output;
    TakeoverFigures {
        epoch: t.epoch,
        detection_ms: standby::detection_time(t).as_secs_f64() * 1e3,
        restore_ms: 0.0,
        held_frames: usize_to_u64(held.frames.items.len()),
        held_console_bytes: held.console.end().saturating_sub(held.console.first),
        reason: t.reason.clone(),
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
        epochs: spec.timing.epochs,
        failover_timeout_ms: spec.timing.failover_timeout_ms,
        ack_timeout_ms: spec.timing.ack_timeout_ms,
        resync_max_mib_s: spec.timing.resync_max_mib_s,
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

/// Runs the guest alone until it ends, or until the daemon names a standby and it connects.
fn alone(
    guest: PrimaryGuest,
    peer: &PeerConfig,
    commands: &Receiver<Command>,
    reporter: &Reporter,
) -> Phase {
    loop {
        if let Some(outcome) = guest.vmm.outcome() {
            ended(reporter, outcome);
            return Phase::Done;
        }
        let addr = match commands.recv_timeout(Duration::from_millis(50)) {
            Ok(Command::Protect { addr }) => addr,
            Ok(Command::Swap) => {
                warn!("a swap needs a standby; this guest runs alone");
                continue;
            }
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => {
                // The command reader ends this process when the daemon goes.
                std::thread::park();
                continue;
            }
        };
        match link::connect(&addr.to_string(), peer, CONNECT_TIMEOUT) {
            Ok(link) => {
                info!(%addr, "standby connected; protecting the guest");
                return Phase::Protect(guest, link);
            }
            Err(e) => reporter.event(WorkerEvent::Unprotected {
                reason: e.to_string(),
            }),
        }
    }
}

/// Protects the guest over `link` until it ends, the standby is lost or takes over, or a swap
/// hands the guest over (this node then stands by with the checkpoint it stopped at).
fn protect(
    guest: PrimaryGuest,
    link: PrimaryLink,
    spec: &WorkerSpec,
    peer: &PeerConfig,
    commands: &Receiver<Command>,
    reporter: &Reporter,
) -> Result<Phase, WorkerError> {
    let watch = Watch::default();
    // Protected at once after a swap: the standby holds the checkpoint already.
    let protected = AtomicBool::new(link.continuing.is_some());
    let rates = Mutex::new(Rates::default());
    let poll = || {
        if let Ok(Command::Swap) = commands.try_recv() {
            info!("swap asked for: handing the guest over at the end of this epoch");
            watch.ask_swap();
        }
        if watch.peek(|report| report.acked > 0) && !protected.swap(true, Ordering::SeqCst) {
            reporter.event(WorkerEvent::Protected);
        }
    };
    let figures = || watch.peek(|report| primary_figures(report, &mut lock(&rates)));
    let (end, _report) = figures_while(reporter, poll, figures, || {
        primary::protect(guest, link, peer, &watch)
    })?;
    Ok(match end {
        PrimaryEnd::Guest(outcome) => {
            ended(reporter, outcome);
            Phase::Done
        }
        PrimaryEnd::Deposed => {
            reporter.event(WorkerEvent::Deposed);
            Phase::Done
        }
        PrimaryEnd::Alone { guest, reason } => {
            reporter.event(WorkerEvent::Unprotected { reason });
            Phase::Alone(*guest)
        }
        PrimaryEnd::HandedOver(h) => {
            let host = StandbyHost::open(&spec.host, &Default::default(), Duration::ZERO)?;
            let shell = vmm::Vmm::prepare(&peer.vm, h.memory.clone(), &spec.host.kvm)?;
            reporter.event(WorkerEvent::SwappedOut);
            let begin = Begin {
                config: peer.clone(),
                link: h.link,
                memory: h.memory,
                shell,
                committed: Some((h.epoch, h.state)),
            };
            Phase::Standby(Box::new(host), StandbyStart::Continue(Box::new(begin)))
        }
    })
}

/// Runs `work`, reporting `figures()` every [`FIGURES_EVERY`] meanwhile.
fn figures_while<T>(
    reporter: &Reporter,
    poll: impl Fn() + Sync,
    figures: impl Fn() -> Figures + Sync,
    work: impl FnOnce() -> T,
) -> T {
    let running = AtomicBool::new(true);
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut sent = Instant::now() - FIGURES_EVERY;
            while running.load(Ordering::Relaxed) {
                poll();
                if sent.elapsed() >= FIGURES_EVERY {
                    sent = Instant::now();
                    reporter.send(&Report::Figures(figures()));
                }
                std::thread::sleep(POLL_EVERY);
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
        acked: r.acked,
        epochs_per_s,
        last_ack_age_ms: r.oldest_unacked.map(|d| saturating_u64(d.as_millis())),
        dirty_mib_s: dirty / MIB,
        wire_mib_s: wire / MIB,
        resync_done: r.resync_sent,
        resync_total: r.resync_total,
        held_ms: saturating_u64(r.held_time.as_millis()),
        standby: Some(r.standby.as_str().to_string()),
        epoch_ms_p50: r.epoch_length_ms(0.5),
        epoch_ms_p99: r.epoch_length_ms(0.99),
        epoch_ends: r
            .ends
            .iter()
            .map(|(why, n)| (why.as_str().to_string(), *n))
            .collect(),
    }
}

/// A standby's figures now.
fn standby_figures(p: &StandbyProgress, rates: &mut Rates) -> Figures {
    let (epochs_per_s, _, _) = rates.per_second(p.committed, 0, 0);
    Figures {
        epoch: p.committed,
        acked: p.committed,
        epochs_per_s,
        last_ack_age_ms: p
            .committed_at
            .map(|t| saturating_u64(t.elapsed().as_millis())),
        // A node syncing gets the disk blocks that may differ, then all of memory.
        resync_done: p.resync_done + p.precopy_done.min(p.precopy_total),
        resync_total: p.resync_total + p.precopy_total,
        ..Figures::default()
    }
}
