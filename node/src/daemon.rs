//! `ftvmm node`: the daemon of one host. One event loop owns every VM's role machine; threads
//! around it turn the world into events (the peer daemon's link, each VM process's reports,
//! the control socket, a tick) and the loop carries out the machines' actions: persisting
//! generation identifiers, starting VM processes, telling a primary where its standby
//! listens, publishing views to the peer.

use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{error, info, info_span, warn};

use crate::config::{Config, Failback, GuestSpec, NodeConfig, VmConfig};
use crate::control::{ControlServer, Request, Response};
use crate::generation::{show, Persisted};
use crate::guest::{ConsoleSpec, HostSpec, NetSpec};
use crate::peer::{self, Outbox, PeerEvent};
use crate::role::{Action, Event, Machine, PeerView, Role, Stopped, WorkerEvent};
use crate::status::{self, NodeStatus, PeerStatus, VmStatus};
use crate::worker::{Command, Figures, GuestSource, Report, Start, Timing, WorkerSpec};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error(transparent)]
    State(#[from] crate::generation::StateError),
    #[error("nodes.{node}.state_dir = {path}: {source}")]
    StateDir {
        node: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot find this program to start VM processes: {0}")]
    Exe(std::io::Error),
}

/// How often the loop looks at timers and refreshes status.
const TICK: Duration = Duration::from_millis(250);
/// How long a failed VM process waits before its machine tries again.
const RETRY: Duration = Duration::from_secs(2);

/// Everything the loop hears.
enum Input {
    Peer(PeerEvent),
    Worker { vm: usize, run: u64, report: Report },
    WorkerExited { vm: usize, run: u64, status: String },
    Control(Request, Sender<Response>),
    Tick,
}

/// A VM process of this node.
struct Worker {
    child: Child,
    stdin: ChildStdin,
    /// Which start of this VM it is: reports of an earlier one are stale.
    run: u64,
    /// It reported how it ended: its exit is no news.
    ended: bool,
}

/// One VM on this node.
struct Slot {
    config: VmConfig,
    machine: Machine,
    state_path: PathBuf,
    worker: Option<Worker>,
    runs: u64,
    figures: Figures,
    /// When a failed VM process is tried again.
    retry_at: Option<Instant>,
    /// The wait for the peer at start is over (or the peer came).
    waited: bool,
    resync: ResyncMeter,
    /// Since when the guest could go back to its preferred node, and whether that was asked.
    failback_since: Option<Instant>,
    failback_asked: bool,
    /// The last takeover on this node.
    takeover: Option<status::TakeoverFigures>,
}

/// The rate of the resync a VM process reports, and when its progress was last logged.
#[derive(Default)]
struct ResyncMeter {
    /// When this resync was first seen, with the bytes done then.
    since: Option<(Instant, u64)>,
    total: u64,
    logged: Option<Instant>,
    /// Bytes/s, as last measured.
    rate: Option<f64>,
}

/// How often a resync's progress is logged.
const RESYNC_LOG_EVERY: Duration = Duration::from_secs(2);

impl ResyncMeter {
    /// Takes the figures' resync counts; returns the rate in bytes/s once it is known.
    fn update(&mut self, done: u64, total: u64) -> Option<f64> {
        if total == 0 || done >= total {
            *self = Self::default();
            return None;
        }
        if total != self.total {
            *self = Self {
                since: Some((Instant::now(), done)),
                total,
                ..Self::default()
            };
        }
        let (t, from) = self.since?;
        let secs = t.elapsed().as_secs_f64();
        self.rate = (secs > 0.2).then(|| done.saturating_sub(from) as f64 / secs);
        self.rate
    }

    /// Whether the progress is due to be logged.
    fn log_due(&mut self) -> bool {
        let due = self.logged.is_none_or(|t| t.elapsed() >= RESYNC_LOG_EVERY);
        if due {
            self.logged = Some(Instant::now());
        }
        due
    }
}

/// The daemon of node `name` of `config`.
pub struct Daemon {
    config: Config,
    me: NodeConfig,
    peer: NodeConfig,
    slots: Vec<Slot>,
    outbox: Outbox,
    inputs: Sender<Input>,
    exe: PathBuf,
    started: Instant,
    peer_up: bool,
    last_heard: Option<Instant>,
    /// Status as last built, for the metrics endpoint.
    status: Arc<Mutex<NodeStatus>>,
}

/// Runs the daemon of node `name` until it is killed.
pub fn run(config: Config, name: &str) -> Result<(), DaemonError> {
    config.check_local(name)?;
    let me = config.node(name)?.clone();
    let peer = config.peer(name)?.clone();
    std::fs::create_dir_all(&me.state_dir).map_err(|source| DaemonError::StateDir {
        node: me.name.clone(),
        path: me.state_dir.clone(),
        source,
    })?;
    let (tx, rx) = mpsc::channel();
    let control = ControlServer::bind(&me.socket)?;
    let peer_events = {
        let (ptx, prx) = mpsc::channel();
        peer::listen(&me.name, me.control, &peer.name, ptx)?;
        prx
    };
    forward(peer_events, tx.clone(), Input::Peer);
    let slots = config
        .vms
        .iter()
        .map(|vm| {
            let state_path = me.state_dir.join(format!("{}.state", vm.name));
            let persisted = Persisted::load(&state_path)?;
            let preferred = vm.policy.preferred == me.name;
            Ok(Slot {
                config: vm.clone(),
                machine: Machine::new(persisted, preferred),
                state_path,
                worker: None,
                runs: 0,
                figures: Figures::default(),
                retry_at: None,
                waited: false,
                resync: ResyncMeter::default(),
                failback_since: None,
                failback_asked: false,
                takeover: None,
            })
        })
        .collect::<Result<Vec<_>, DaemonError>>()?;
    let outbox = Outbox::start(&me.name, &peer.name, peer.control);
    let status = Arc::new(Mutex::new(NodeStatus {
        node: me.name.clone(),
        pid: Some(std::process::id()),
        peer: PeerStatus {
            name: peer.name.clone(),
            connected: false,
            last_heard_ms: None,
        },
        vms: Vec::new(),
    }));
    let _metrics = match me.metrics {
        Some(addr) => {
            let status = status.clone();
            Some(crate::metrics::serve(addr, move || {
                status::render_prometheus(&status.lock().unwrap_or_else(|e| e.into_inner()))
            })?)
        }
        None => None,
    };
    let _control = {
        let tx = Mutex::new(tx.clone());
        control.serve(move |request| {
            let (reply_tx, reply_rx) = mpsc::channel();
            let sent = tx
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send(Input::Control(request, reply_tx));
            match sent
                .ok()
                .and_then(|()| reply_rx.recv_timeout(Duration::from_secs(10)).ok())
            {
                Some(response) => response,
                None => Response::Refused {
                    reason: "the node daemon did not answer".into(),
                },
            }
        })
    };
    {
        let tx = tx.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(TICK);
            if tx.send(Input::Tick).is_err() {
                return;
            }
        });
    }
    let mut daemon = Daemon {
        config,
        me,
        peer,
        slots,
        outbox,
        inputs: tx,
        exe: std::env::current_exe().map_err(DaemonError::Exe)?,
        started: Instant::now(),
        peer_up: false,
        last_heard: None,
        status,
    };
    info!(node = %daemon.me.name, peer = %daemon.peer.name, vms = daemon.slots.len(), "node daemon up");
    for vm in 0..daemon.slots.len() {
        daemon.publish(vm);
    }
    daemon.serve(&rx);
    Ok(())
}

/// Moves what `from` receives into the loop's inputs, wrapped by `wrap`.
fn forward<T: Send + 'static>(from: Receiver<T>, to: Sender<Input>, wrap: fn(T) -> Input) {
    std::thread::spawn(move || {
        for item in from {
            if to.send(wrap(item)).is_err() {
                return;
            }
        }
    });
}

impl Daemon {
    fn serve(&mut self, inputs: &Receiver<Input>) {
        for input in inputs {
            match input {
                Input::Peer(event) => self.peer_event(event),
                Input::Worker { vm, run, report } => self.worker_report(vm, run, report),
                Input::WorkerExited { vm, run, status } => self.worker_exited(vm, run, &status),
                Input::Control(request, reply) => {
                    let _ = reply.send(self.control(request));
                }
                Input::Tick => self.tick(),
            }
        }
    }

    fn peer_event(&mut self, event: PeerEvent) {
        self.last_heard = Some(Instant::now());
        match event {
            PeerEvent::Up => self.peer_up = true,
            PeerEvent::View { vm, view } => {
                self.peer_up = true;
                if let Some(i) = self.slots.iter().position(|s| s.config.name == vm) {
                    self.step(i, Event::Peer(view));
                } else {
                    warn!(
                        vm,
                        "the peer's daemon names a VM this node's config does not have"
                    );
                }
            }
            PeerEvent::Down { why } => {
                if self.peer_up {
                    warn!("the peer's daemon is gone: {why}");
                }
                self.peer_up = false;
                for vm in 0..self.slots.len() {
                    self.step(vm, Event::PeerGone);
                }
            }
        }
    }

    fn tick(&mut self) {
        for vm in 0..self.slots.len() {
            let wait = self.slots[vm].config.policy.peer_wait;
            if !self.slots[vm].waited && self.started.elapsed() >= wait {
                self.slots[vm].waited = true;
                if !self.peer_up {
                    warn!(
                        vm = %self.slots[vm].config.name,
                        "no word from the peer's daemon after {} ms",
                        wait.as_millis()
                    );
                    self.step(vm, Event::PeerWaitOver);
                }
            }
        }
        for vm in 0..self.slots.len() {
            let slot = &mut self.slots[vm];
            if slot.retry_at.is_some_and(|t| Instant::now() >= t) {
                slot.retry_at = None;
                if let Some(view) = slot.machine.peer.clone() {
                    self.step(vm, Event::Peer(view));
                }
            }
        }
        for vm in 0..self.slots.len() {
            self.failback(vm);
        }
        let status = self.status();
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    /// Whether VM `vm` runs protected here while its preferred node is its standby (a
    /// failback would take it home).
    fn failback_possible(&self, vm: usize) -> bool {
        let m = &self.slots[vm].machine;
        !m.preferred
            && m.role == (Role::Primary { protected: true })
            && m.peer.as_ref().is_some_and(|p| p.role == Role::Standby)
    }

    /// With `failback = "auto"`, hands VM `vm` back to its preferred node once that node has
    /// been its synced standby for `failback_delay`.
    fn failback(&mut self, vm: usize) {
        if !self.failback_possible(vm) {
            let slot = &mut self.slots[vm];
            slot.failback_since = None;
            slot.failback_asked = false;
            return;
        }
        let slot = &mut self.slots[vm];
        let since = *slot.failback_since.get_or_insert_with(Instant::now);
        let policy = &slot.config.policy;
        if policy.failback == Failback::Auto
            && !slot.failback_asked
            && since.elapsed() >= policy.failback_delay
        {
            slot.failback_asked = true;
            info!(
                vm = %slot.config.name,
                to = %self.peer.name,
                "failing back: the preferred node is a synced standby"
            );
            self.command(vm, &Command::Swap);
        }
    }

    fn worker_report(&mut self, vm: usize, run: u64, report: Report) {
        let Some(worker) = self.slots[vm].worker.as_mut().filter(|w| w.run == run) else {
            return;
        };
        match report {
            Report::Figures(figures) => {
                let slot = &mut self.slots[vm];
                let rate = slot
                    .resync
                    .update(figures.resync_done, figures.resync_total);
                slot.figures = figures;
                if rate.is_some() && slot.resync.log_due() {
                    let r = resync_status(&slot.figures, rate);
                    info!(
                        vm = %slot.config.name,
                        "resync {:.1} % ({:.1} of {:.1} MiB) at {:.1} MiB/s, eta {}",
                        r.percent,
                        r.done_bytes as f64 / MIB,
                        r.total_bytes as f64 / MIB,
                        r.rate_mib_s,
                        r.eta_s.map_or("-".into(), |s| format!("{s:.1} s"))
                    );
                }
            }
            Report::Event(event) => {
                if matches!(
                    event,
                    WorkerEvent::Exited { .. }
                        | WorkerEvent::Goodbye
                        | WorkerEvent::Deposed
                        | WorkerEvent::Failed { .. }
                ) {
                    worker.ended = true;
                }
                if let WorkerEvent::TookOver { figures } = &event {
                    self.slots[vm].takeover = Some(figures.clone());
                }
                self.step(vm, Event::Worker(event));
            }
        }
    }

    fn worker_exited(&mut self, vm: usize, run: u64, status: &str) {
        let slot = &mut self.slots[vm];
        let Some(worker) = slot.worker.as_mut().filter(|w| w.run == run) else {
            return;
        };
        let ended = worker.ended;
        if let Some(mut worker) = slot.worker.take() {
            let _ = worker.child.wait();
        }
        if !ended {
            let reason = format!("the VM process ended: {status}");
            error!(vm = %slot.config.name, "{reason}");
            self.step(vm, Event::Worker(WorkerEvent::Failed { reason }));
        }
    }

    /// Hands `event` to VM `vm`'s machine and carries out what it says.
    fn step(&mut self, vm: usize, event: Event) {
        let _span = info_span!("vm", name = %self.slots[vm].config.name).entered();
        let before = self.slots[vm].machine.role.clone();
        let actions = self.slots[vm].machine.step(event);
        let after = self.slots[vm].machine.role.clone();
        if before != after {
            info!(from = ?before, to = ?after, "role change");
            if let Role::Stopped {
                why: Stopped::Failed(_),
            } = after
            {
                self.slots[vm].retry_at = Some(Instant::now() + RETRY);
            }
        }
        for action in actions {
            self.act(vm, action);
        }
    }

    fn act(&mut self, vm: usize, action: Action) {
        match action {
            Action::Persist => {
                let slot = &self.slots[vm];
                if let Err(e) = slot.machine.persisted.store(&slot.state_path) {
                    // Without its state on disk the node could later take a wrong decision.
                    error!("{e}; this node stops the VM");
                    self.stop_worker(vm);
                }
            }
            Action::Boot => self.start_worker(vm, Start::Boot),
            Action::Listen { full } => self.start_worker(
                vm,
                Start::Listen {
                    ip: self.me.replication,
                    full,
                },
            ),
            Action::Protect { port } => {
                let addr = SocketAddr::new(self.peer.replication, port);
                self.command(vm, &Command::Protect { addr });
            }
            Action::Publish => self.publish(vm),
        }
    }

    fn publish(&self, vm: usize) {
        let slot = &self.slots[vm];
        self.outbox.publish(&slot.config.name, slot.machine.view());
    }

    fn command(&mut self, vm: usize, command: &Command) {
        let Some(worker) = self.slots[vm].worker.as_mut() else {
            warn!(?command, "no VM process to tell");
            return;
        };
        let sent = serde_json::to_string(command)
            .map_err(std::io::Error::other)
            .and_then(|line| writeln!(worker.stdin, "{line}"));
        if let Err(e) = sent {
            warn!("cannot tell the VM process {command:?}: {e}");
        }
    }

    fn stop_worker(&mut self, vm: usize) {
        if let Some(mut worker) = self.slots[vm].worker.take() {
            // By pid: this child, not yet reaped.
            let _ = worker.child.kill();
            let _ = worker.child.wait();
        }
    }

    /// Starts a VM process for `vm` that starts as `start`.
    fn start_worker(&mut self, vm: usize, start: Start) {
        self.stop_worker(vm);
        let spec = self.worker_spec(vm, start);
        let slot = &mut self.slots[vm];
        slot.runs += 1;
        slot.figures = Figures::default();
        let run = slot.runs;
        match spawn_worker(&self.exe, &spec) {
            Ok((child, stdin, stdout)) => {
                info!(pid = child.id(), start = ?spec.start, "VM process started");
                let tx = self.inputs.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(stdout).lines() {
                        let Ok(line) = line else { break };
                        match serde_json::from_str::<Report>(&line) {
                            Ok(report) => {
                                if tx.send(Input::Worker { vm, run, report }).is_err() {
                                    return;
                                }
                            }
                            Err(e) => warn!("a bad report from the VM process: {e}: {line}"),
                        }
                    }
                    let _ = tx.send(Input::WorkerExited {
                        vm,
                        run,
                        status: "its output ended".into(),
                    });
                });
                slot.worker = Some(Worker {
                    child,
                    stdin,
                    run,
                    ended: false,
                });
            }
            Err(e) => {
                let reason = format!("cannot start the VM process: {e}");
                error!("{reason}");
                self.step(vm, Event::Worker(WorkerEvent::Failed { reason }));
            }
        }
    }

    fn worker_spec(&self, vm: usize, start: Start) -> WorkerSpec {
        let vm = &self.slots[vm].config;
        let on_node = vm.on_node.get(&self.me.name).cloned().unwrap_or_default();
        let console = on_node
            .console
            .clone()
            .unwrap_or_else(|| self.me.state_dir.join(format!("{}.console", vm.name)));
        let (guest, args) = match &vm.guest {
            GuestSpec::Payload { payload, args } => (
                GuestSource::Payload {
                    payload: payload.clone(),
                },
                args.clone(),
            ),
            GuestSpec::Kernel {
                kernel,
                initrd,
                cmdline,
            } => (
                GuestSource::Kernel {
                    kernel: kernel.clone(),
                    initrd: initrd.clone(),
                    cmdline: cmdline.clone(),
                },
                Vec::new(),
            ),
        };
        let kind = match vm.guest {
            GuestSpec::Payload { .. } => vmm::GuestKind::Payload,
            GuestSpec::Kernel { .. } => vmm::GuestKind::Linux,
        };
        WorkerSpec {
            vm: vm.name.clone(),
            config: vmm::VmConfig {
                mem_size: vm.mem,
                vcpus: vm.vcpus,
                args,
                kind,
            },
            guest,
            host: HostSpec {
                kvm: PathBuf::from("/dev/kvm"),
                console: ConsoleSpec::File(console),
                disk: on_node.disk.clone(),
                net: match (&on_node.tap, vm.mac) {
                    (Some(tap), Some(mac)) => Some(NetSpec {
                        tap: tap.clone(),
                        mac,
                        bridge: on_node.bridge.clone(),
                    }),
                    _ => None,
                },
            },
            timing: Timing {
                epochs: vm.policy.epochs,
                failover_timeout_ms: vm.policy.failover_timeout_ms,
                ack_timeout_ms: vm.policy.ack_timeout_ms,
                resync_max_mib_s: vm.policy.resync_max_mib_s,
            },
            start,
        }
    }

    fn control(&mut self, request: Request) -> Response {
        match request {
            Request::Status => Response::Status(self.status()),
            Request::Discard { vm } => {
                let Some(i) = self.slots.iter().position(|s| s.config.name == vm) else {
                    return Response::Refused {
                        reason: format!("no VM named {vm} on this node"),
                    };
                };
                if !matches!(self.slots[i].machine.role, Role::Stopped { .. }) {
                    return Response::Refused {
                        reason: format!(
                            "{vm} runs here ({}); only a stopped copy can be discarded",
                            status_role(&self.slots[i].machine.role).name()
                        ),
                    };
                }
                self.step(i, Event::Discard);
                Response::Done {
                    message: format!(
                        "{vm}: this node's copy is discarded; it takes every block from {}",
                        self.peer.name
                    ),
                }
            }
            Request::Swap { vm } => {
                let Some(i) = self.slots.iter().position(|s| s.config.name == vm) else {
                    return Response::Refused {
                        reason: format!("no VM named {vm} on this node"),
                    };
                };
                let m = &self.slots[i].machine;
                let peer_standby = m.peer.as_ref().is_some_and(|p| p.role == Role::Standby);
                if m.role != (Role::Primary { protected: true }) || !peer_standby {
                    let why = m
                        .why_unprotected()
                        .unwrap_or_else(|| "this node is not its primary".into());
                    return Response::Refused {
                        reason: format!(
                            "{vm} cannot swap now: a swap needs it to run protected here with \
                             {} its synced standby ({why})",
                            self.peer.name
                        ),
                    };
                }
                self.command(i, &Command::Swap);
                Response::Done {
                    message: format!(
                        "{vm}: {} hands the guest over to {} at the end of this epoch",
                        self.me.name, self.peer.name
                    ),
                }
            }
            Request::Drill { .. } => Response::Refused {
                reason: "drills are run by `ftvmm drill`, not by a node".into(),
            },
        }
    }

    /// What status says now.
    fn status(&self) -> NodeStatus {
        NodeStatus {
            node: self.me.name.clone(),
            pid: Some(std::process::id()),
            peer: PeerStatus {
                name: self.peer.name.clone(),
                connected: self.peer_up,
                last_heard_ms: self
                    .last_heard
                    .map(|t| vmm::cast::saturating_u64(t.elapsed().as_millis())),
            },
            vms: self.slots.iter().map(|s| self.vm_status(s)).collect(),
        }
    }

    fn vm_status(&self, slot: &Slot) -> VmStatus {
        let m = &slot.machine;
        let f = &slot.figures;
        let g = &m.persisted.generation;
        let resync = (m.role == Role::Syncing || f.resync_total > f.resync_done)
            .then(|| resync_status(f, slot.resync.rate))
            .filter(|r| r.total_bytes > 0);
        let mut why = m.why_unprotected();
        if let (Some(r), Role::Syncing) = (&resync, &m.role) {
            why = Some(format!("syncing {:.0} %", r.percent));
        }
        if f.standby.as_deref() == Some("standby slow") {
            why = Some("peer slow".into());
        }
        VmStatus {
            name: slot.config.name.clone(),
            role: status_role(&m.role),
            protected: why.is_none(),
            hint: hint(&m.role, &slot.config.name, &self.config.path, &self.me.name).or_else(
                || {
                    (slot.failback_since.is_some()
                        && slot.config.policy.failback == Failback::Manual)
                        .then(|| {
                            format!(
                                "failback possible: ftvmm swap {} --config {} --name {}",
                                slot.config.name,
                                self.config.path.display(),
                                self.me.name
                            )
                        })
                },
            ),
            why,
            epoch: f.epoch,
            epochs_per_s: f.epochs_per_s,
            last_ack_age_ms: f.last_ack_age_ms,
            dirty_mib_s: f.dirty_mib_s,
            wire_mib_s: f.wire_mib_s,
            resync,
            generation: status::Generation {
                current: show(g.current),
                bitmap: g.bitmap.map(show),
                history: g.history.iter().copied().map(show).collect(),
                consistent: g.consistent,
            },
            peer_role: m.peer.as_ref().map(|p: &PeerView| status_role(&p.role)),
            acked: f.acked,
            pid: slot.worker.as_ref().map(|w| w.child.id()),
            last_takeover: slot.takeover.clone(),
            epoch_ms_p50: f.epoch_ms_p50,
            epoch_ms_p99: f.epoch_ms_p99,
            epoch_ends: f.epoch_ends.clone(),
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// A resync's progress from the figures, at `rate` bytes/s if known.
fn resync_status(f: &Figures, rate: Option<f64>) -> status::Resync {
    let percent = if f.resync_total == 0 {
        100.0
    } else {
        f.resync_done as f64 * 100.0 / f.resync_total as f64
    };
    let left = f.resync_total.saturating_sub(f.resync_done) as f64;
    status::Resync {
        done_bytes: f.resync_done,
        total_bytes: f.resync_total,
        rate_mib_s: rate.unwrap_or(0.0) / MIB,
        eta_s: rate.filter(|r| *r > 0.0).map(|r| left / r),
        percent,
    }
}

/// The command an operator may run for a VM in `role`, if one decides something.
fn hint(role: &Role, vm: &str, config: &Path, node: &str) -> Option<String> {
    match role {
        Role::Stopped {
            why: Stopped::SplitHistory(_) | Stopped::Unrelated | Stopped::PeerBehind,
        } => Some(format!(
            "to keep the peer's copy and resync this one from it: ftvmm discard {vm} --config {} --name {node}",
            config.display()
        )),
        _ => None,
    }
}

fn status_role(role: &Role) -> status::Role {
    match role {
        Role::Primary { .. } | Role::Booting => status::Role::Primary,
        Role::Standby => status::Role::Standby,
        Role::Syncing => status::Role::Syncing,
        Role::Stopped { .. } => status::Role::Stopped,
    }
}

/// Starts `exe vm-worker` with `spec` on its first stdin line; it dies with this process
/// (PR_SET_PDEATHSIG), so that a killed node is a dead host.
fn spawn_worker(
    exe: &Path,
    spec: &WorkerSpec,
) -> std::io::Result<(Child, ChildStdin, std::process::ChildStdout)> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Process::new(exe);
    cmd.arg("vm-worker")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    // SAFETY: prctl(PR_SET_PDEATHSIG) only sets a flag of the calling (child) process; it is
    // async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let mut stdin = child
        .stdin
        .take()
        .ok_or_else(|| std::io::Error::other("no stdin"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| std::io::Error::other("no stdout"))?;
    let line = serde_json::to_string(spec).map_err(std::io::Error::other)?;
    writeln!(stdin, "{line}")?;
    Ok((child, stdin, stdout))
}
