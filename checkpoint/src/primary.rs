//! The primary: runs the guest and protects it. Pre-copies memory while the guest runs, then
//! every epoch pauses it, harvests and copies the dirty pages, saves the VM state and seals the
//! epoch's output, resumes it, and streams the checkpoint (compressed by worker threads) while
//! the guest runs on. Output is released as the standby acknowledges; a standby that stops
//! answering is said goodbye to and the guest continues unprotected; a standby that has taken
//! over stops this node at once.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::TcpStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};
use tracing::{debug, error, info, info_span, warn};
use vmm::cast::{saturating_u64, u64_to_usize, usize_to_u64};
use vmm::devices::GuestMemory;
use vmm::memory::{DirtyLog, Residency};
use vmm::{VmOutcome, Vmm};

use crate::delta::{self, PageCache};
use crate::hot::HotPages;
use crate::input::InputLog;
use crate::link::{self, Link, PeerConfig, PrimaryLink, Sender, SilenceClock, TICK};
use crate::outputs::Outputs;
use crate::policy::{
    self, EpochEnd, Hold, Limits, Next, Observation, Recent, ShipMeter, TrackingMeter,
};
use crate::staging::{self, CheckpointState, Retention, StagedPages, StagingError};
use crate::wire::{self, EpochDigest, FrameReader, Message, WireError, PAGE_SIZE};
use disk_sync::resync::{self, ResyncSource};
use disk_sync::{EpochRecorder, EpochWrites};

#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("cannot checkpoint the VM: {0}")]
    Vmm(#[from] vmm::builder::BuildError),
    #[error("cannot stage a checkpoint: {0}")]
    Staging(#[from] StagingError),
    #[error("replication link: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot start a replication thread: {0}")]
    Thread(std::io::Error),
    #[error("a replication thread still holds the VM")]
    StillShared,
    #[error("disk resync: {0}")]
    Resync(#[from] disk_sync::DiskSyncError),
}

/// How a protected run ended.
pub enum PrimaryEnd {
    /// The guest ended on this node.
    Guest(VmOutcome),
    /// The standby took over: this node stopped and released nothing more.
    Deposed,
    /// The standby was lost (for `reason`): the guest runs on, unprotected, its output
    /// released as it comes and its disk writes marked in the bitmap.
    Alone {
        guest: Box<PrimaryGuest>,
        reason: String,
    },
    /// A swap: the standby runs the guest now; this node holds the checkpoint it resumed from.
    HandedOver(Box<HandedOver>),
}

impl std::fmt::Debug for PrimaryEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PrimaryEnd::Guest(outcome) => write!(f, "Guest({outcome:?})"),
            PrimaryEnd::Deposed => write!(f, "Deposed"),
            PrimaryEnd::Alone { reason, .. } => write!(f, "Alone({reason})"),
            PrimaryEnd::HandedOver(h) => write!(f, "HandedOver({})", h.epoch),
        }
    }
}

/// Figures of a protected run, for logs, status and benchmarks.
#[derive(Debug, Default, Clone)]
pub struct PrimaryReport {
    /// Checkpoints taken (pre-copy rounds not counted).
    pub epochs: u64,
    /// Highest acknowledged checkpoint.
    pub acked: u64,
    /// Guest pause of each recent checkpoint (at most [`RECENT_EPOCHS`]).
    pub pauses: Vec<Duration>,
    /// Time of each recent checkpoint's page copy alone (part of its pause).
    pub copies: Vec<Duration>,
    /// Dirty pages of each recent checkpoint.
    pub dirty_pages: Vec<usize>,
    /// Dirty pages of all checkpoints.
    pub dirty_pages_total: u64,
    /// Length of each recent epoch, as the epoch policy chose it.
    pub lengths: Vec<Duration>,
    /// Epochs by why they ended.
    pub ends: BTreeMap<EpochEnd, u64>,
    /// When the running epoch began (its checkpoint's pause included).
    pub epoch_began: Option<Instant>,
    /// How the standby keeps up, now.
    pub standby: StandbyHealth,
    /// Age of the oldest unacknowledged checkpoint, now.
    pub oldest_unacked: Option<Duration>,
    /// Times the standby became slow, and how long it was slow in all.
    pub slow_episodes: u64,
    pub slow_time: Duration,
    /// Times the guest was held paused because output or writes were at their bound while
    /// the standby was behind, and how long in all.
    pub holds: u64,
    pub held_time: Duration,
    /// Times the guest was held under output pressure because its epoch had dirtied the reply
    /// budget before the last checkpoint was acknowledged (it dirties about as fast as the pair
    /// ships), and how long in all: how much it was slowed.
    pub throttles: u64,
    pub throttled_time: Duration,
    /// Why protection was dropped, if it was.
    pub lost_reason: Option<String>,
    /// Bytes of disk blocks the resync sends, and those sent so far.
    pub resync_total: u64,
    pub resync_sent: u64,
    /// Pages sent in pre-copy.
    pub precopy_pages: usize,
    /// Frame bytes of pre-copy written to the data connection.
    pub precopy_wire_bytes: u64,
    /// Frame bytes of checkpoints written to the data connection.
    pub wire_bytes: u64,
    /// Page bytes those checkpoint frames carried (uncompressed).
    pub page_bytes: u64,
    /// Epoch at which protection was dropped, if it was.
    pub unprotected_at: Option<u64>,
}

/// How the standby keeps up with the primary.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum StandbyHealth {
    /// It acknowledges within the failover timeout.
    #[default]
    Ok,
    /// Alive (its heartbeats arrive) but its oldest unacknowledged checkpoint is older than
    /// the failover timeout: output waits longer, and past the acknowledgement timeout
    /// protection is dropped.
    Slow,
    /// Protection was dropped.
    Lost,
}

impl StandbyHealth {
    /// As status and logs say it.
    pub fn as_str(self) -> &'static str {
        match self {
            StandbyHealth::Ok => "ok",
            StandbyHealth::Slow => "standby slow",
            StandbyHealth::Lost => "standby lost",
        }
    }
}

/// Per-epoch figures kept: an hour of 40 ms epochs. Older ones are dropped, half at a time,
/// so that a guest protected for weeks does not grow the report.
pub const RECENT_EPOCHS: usize = 1 << 17;

impl PrimaryReport {
    fn record_epoch(&mut self, e: &EpochFigures) {
        if self.pauses.len() >= RECENT_EPOCHS {
            let half = RECENT_EPOCHS / 2;
            self.pauses.drain(..half);
            self.copies.drain(..half);
            self.dirty_pages.drain(..half);
            self.lengths.drain(..half);
        }
        self.pauses.push(e.pause);
        self.copies.push(e.copy);
        self.dirty_pages.push(e.dirty);
        self.lengths.push(e.length);
        self.dirty_pages_total += usize_to_u64(e.dirty);
        *self.ends.entry(e.why).or_default() += 1;
        self.epoch_began = Some(e.began);
    }
}

/// What one checkpoint adds to the report.
struct EpochFigures {
    /// When the epoch after it began.
    began: Instant,
    pause: Duration,
    copy: Duration,
    dirty: usize,
    length: Duration,
    why: EpochEnd,
}

impl PrimaryReport {
    /// The `q`-quantile of the last [`STATUS_EPOCHS`] epochs' lengths, in milliseconds.
    pub fn epoch_length_ms(&self, q: f64) -> Option<f64> {
        let recent = &self.lengths[self.lengths.len().saturating_sub(STATUS_EPOCHS)..];
        let mut v: Vec<Duration> = recent.to_vec();
        v.sort_unstable();
        let last = v.len().checked_sub(1)?;
        // A rank in 0..=last: the float only picks it.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let i = ((last as f64) * q.clamp(0.0, 1.0)).round() as usize;
        Some(v[i.min(last)].as_secs_f64() * 1e3)
    }
}

/// Epochs whose lengths status looks at (sorting more every few hundred ms would cost).
pub const STATUS_EPOCHS: usize = 1024;

/// A live view of a protected run's report, for status while it runs, and the way to ask it
/// for a swap; clones share it.
#[derive(Clone, Default)]
pub struct Watch(
    Arc<Mutex<PrimaryReport>>,
    Arc<std::sync::atomic::AtomicBool>,
);

impl Watch {
    /// Asks the run to hand its guest over to the standby at the end of the running epoch.
    pub fn ask_swap(&self) {
        self.1.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Whether a swap was asked for (once: a swap that fails is not tried again by itself).
    fn swap_asked(&self) -> bool {
        self.1.swap(false, std::sync::atomic::Ordering::SeqCst)
    }

    fn lock(&self) -> MutexGuard<'_, PrimaryReport> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The report as it is now.
    pub fn snapshot(&self) -> PrimaryReport {
        self.lock().clone()
    }

    /// `f` of the report as it is now, without copying its per-epoch figures.
    pub fn peek<T>(&self, f: impl FnOnce(&PrimaryReport) -> T) -> T {
        f(&self.lock())
    }
}

/// Disk blocks per Resync frame (1 MiB).
const RESYNC_RUN_BLOCKS: u64 = 16;
/// Resync frames read and packed ahead of the one on the link.
const RESYNC_AHEAD: usize = 4;

/// Pages per Pages frame: big enough to compress well, small enough to pipeline.
const BATCH_PAGES: usize = 256;
/// Pre-copy stops once a round finds fewer dirty pages than this (or after `PRECOPY_ROUNDS`).
const PRECOPY_DONE_PAGES: usize = 4096;
const PRECOPY_ROUNDS: usize = 5;
/// Pages the pre-copy stages at a time (16 MiB): with the sender's queue, a few such batches
/// are all the primary holds, whatever the guest's size.
const PRECOPY_BATCH_PAGES: usize = 4096;

/// Role state shared by the epoch loop, the sender and the control thread.
struct Shared {
    state: Mutex<Role>,
    changed: Condvar,
}

struct Role {
    protected: bool,
    deposed: bool,
    /// Highest acknowledged epoch.
    acked: u64,
    /// Epochs sealed and not yet acknowledged.
    unacked: VecDeque<Unacked>,
    /// How fast the standby acknowledges checkpoints, for the epoch policy.
    shipping: ShipMeter,
    /// Counts what the epoch loop waits for (acknowledgements, the sender taking a
    /// checkpoint, the first output of an epoch), so that it wakes when one happens.
    pokes: u64,
    /// When an acknowledgement last released output.
    released_at: Option<Instant>,
    /// Pre-copy is under way: the standby shows progress only by the frames it reads.
    precopy: bool,
    finished: bool,
}

/// A sealed checkpoint not yet acknowledged.
struct Unacked {
    epoch: u64,
    /// When it was sealed (moved to the present when this node is found not to have run, so
    /// that the standby gets a fresh window).
    sealed: Instant,
    /// Its bytes before compression: pages, disk writes and console bytes.
    bytes: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Role> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the epoch loop: something it may be waiting for happened.
    fn poke(&self) {
        self.lock().pokes += 1;
        self.changed.notify_all();
    }

    /// Waits until `deadline` while `waiting(role)` holds, looking again at least every TICK
    /// (some conditions, such as the guest ending, are not signalled on the condvar).
    fn wait_while(
        &self,
        deadline: Instant,
        waiting: impl Fn(&Role) -> bool,
    ) -> MutexGuard<'_, Role> {
        let mut role = self.lock();
        loop {
            let now = Instant::now();
            if now >= deadline || !waiting(&role) {
                return role;
            }
            role = self
                .changed
                .wait_timeout(role, (deadline - now).min(TICK))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// One unit of work for the sender.
struct Outgoing {
    epoch: u64,
    pages: StagedPages,
    /// The checkpoint's state; None for a pre-copy round (epoch 0), which has no end.
    state: Option<Vec<u8>>,
    /// The epoch's disk writes.
    disk: EpochWrites,
}

/// The guest as its primary runs it: the VM, the gates of its output (and the record of its
/// disk writes), and its disk image, to resync a returning standby from.
pub struct PrimaryGuest {
    pub vmm: Vmm,
    pub outputs: Outputs,
    pub image: Option<ResyncSource>,
}

/// Runs `guest` as a protected primary over `link` until the guest ends, the standby takes
/// over, or the standby is lost. The VM may be booted and not started (it starts here, its
/// output held from the first byte) or running alone (its output flows until the standby holds
/// a first checkpoint). First the disk blocks that may differ between the nodes are resynced
/// and memory is pre-copied while the guest runs. `watch` shows the run's figures meanwhile.
pub fn protect(
    guest: PrimaryGuest,
    link: PrimaryLink,
    config: &PeerConfig,
    watch: &Watch,
) -> Result<(PrimaryEnd, PrimaryReport), PrimaryError> {
    let PrimaryGuest {
        mut vmm,
        outputs,
        image,
    } = guest;
    let PrimaryLink {
        data: data_stream,
        control: control_reader,
        need,
        continuing,
    } = link;
    let shared = Arc::new(Shared {
        state: Mutex::new(Role {
            protected: true,
            deposed: false,
            acked: continuing.unwrap_or(0),
            unacked: VecDeque::new(),
            shipping: ShipMeter::default(),
            pokes: 0,
            released_at: None,
            precopy: continuing.is_none(),
            finished: false,
        }),
        changed: Condvar::new(),
    });
    let data = Sender::new(&data_stream)?;
    let control = Sender::new(control_reader.get_ref())?;

    vmm.set_dirty_logging(true)?;
    vmm.harvest_dirty()?;
    if !vmm.started() {
        vmm.start()?;
    }
    let vmm = Arc::new(vmm);

    // Compression gets the cores the vCPUs leave (at least one): the guest comes first, and a
    // checkpoint that takes longer to ship stretches the next epoch instead of slowing it.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = cores.saturating_sub(config.vm.vcpus as usize).clamp(1, 4);
    let (out_tx, out_rx) = bounded::<Outgoing>(1);
    // Staging buffers go back from the sender to the epoch loop, to be copied into again.
    let (spare_tx, spare_rx) = bounded::<StagedPages>(2);
    // What this standby holds of each page, for delta compression: new for every connection,
    // so that a delta's base is always a page this standby received; a guest smaller than the
    // cache bounds it.
    let cache = PageCache::new(delta::CACHE_BYTES.min(u64_to_usize(config.vm.mem_size)));
    let sender = {
        let (shared, data, watch) = (shared.clone(), data.clone(), watch.clone());
        std::thread::Builder::new()
            .name("ckpt-send".into())
            .spawn(move || send_loop(out_rx, spare_tx, data, shared, watch, workers, &cache))
            .map_err(PrimaryError::Thread)?
    };
    let controller = {
        let (shared, outputs, vmm) = (shared.clone(), outputs.clone(), vmm.clone());
        let (control, data, watch) = (control.clone(), data.clone(), watch.clone());
        let config = config.clone();
        std::thread::Builder::new()
            .name("ckpt-control".into())
            .spawn(move || {
                control_loop(
                    control_reader,
                    control,
                    data,
                    shared,
                    outputs,
                    vmm,
                    config,
                    watch,
                )
            })
            .map_err(PrimaryError::Thread)?
    };

    // What the guest receives goes to the standby as it comes (see `crate::input`).
    let input_sender = match &outputs.input {
        Some(log) => {
            let (log, control, shared) = (log.clone(), control.clone(), shared.clone());
            log.record(true);
            Some(
                std::thread::Builder::new()
                    .name("ckpt-input".into())
                    .spawn(move || send_input(&log, &control, &shared))
                    .map_err(PrimaryError::Thread)?,
            )
        }
        None => None,
    };

    let epochs = EpochLoop {
        vmm: &vmm,
        outputs: &outputs,
        shared: &shared,
        out: &out_tx,
        spare: &spare_rx,
        data: &data,
        control: &control,
        config,
        watch,
        limits: Limits::for_peer(config),
        recent: Mutex::new(Recent::default()),
    };
    let start = match continuing {
        Some(epoch) => Start::After(epoch),
        None => Start::Fresh {
            image: image.as_ref(),
            need: resync::blocks_of(&need),
        },
    };
    // Output that comes wakes the epoch loop, which ends the epoch if the policy says so.
    let poke = shared.clone();
    outputs.set_on_output(Some(Arc::new(move || poke.poke())));
    let result = epochs.run(start);
    outputs.set_on_output(None);
    drop(out_tx);
    let end = match result {
        Ok(end) => end,
        Err(e) => {
            vmm.stop(VmOutcome::Fault(e.to_string()));
            shared.lock().finished = true;
            return Err(e);
        }
    };
    // Finished before the Exit goes out: the standby closes the link as soon as it reads it,
    // and the control thread must not take that for the loss of the standby.
    let (mut protected, complete) = {
        let mut role = shared.lock();
        role.finished = true;
        (role.protected, role.unacked.is_empty())
    };
    shared.changed.notify_all();
    if protected && !complete && matches!(end, Ended::Guest(_)) {
        // The control thread judges the standby within the acknowledgement timeout, which
        // the final wait outlasts: it can only have stopped judging. The guest has ended here,
        // so its output is released; the standby, told goodbye, does not take over.
        let why = "the guest's final checkpoint was not acknowledged".to_string();
        error!("standby lost ({why})");
        {
            let mut r = watch.lock();
            r.standby = StandbyHealth::Lost;
            r.lost_reason = Some(why);
        }
        outputs.open();
        let _ = control.send(&Message::Goodbye);
        protected = false;
    }
    // A guest reset ends the VM like an exit with status 0 (ftvmm does not restart it).
    match (&end, protected) {
        (Ended::Guest(VmOutcome::Exited(code)), true) => {
            let _ = control.send(&Message::Exit { code: *code });
        }
        (Ended::Guest(VmOutcome::Reset), true) => {
            let _ = control.send(&Message::Exit { code: 0 });
        }
        _ => {}
    }
    if !matches!(end, Ended::HandedOver { .. }) {
        // The sender may be blocked on a dead standby's full socket: cut it loose.
        data.shutdown();
    }
    let _ = sender.join();
    if let Some(input_sender) = input_sender {
        let _ = input_sender.join();
    }
    let control_reader = controller
        .join()
        .map_err(|_| PrimaryError::Thread(std::io::Error::other("control thread panicked")))?;
    let mut report = watch.snapshot();
    if !protected {
        report.unprotected_at = Some(report.epochs);
    }
    let end = match end {
        Ended::Guest(outcome) => PrimaryEnd::Guest(outcome),
        Ended::Deposed => PrimaryEnd::Deposed,
        Ended::Alone => {
            // Every thread that shared the VM has ended.
            let vmm = Arc::try_unwrap(vmm).map_err(|_| PrimaryError::StillShared)?;
            // Alone, dirty logging only costs the guest write faults.
            vmm.set_dirty_logging(false)?;
            let reason = report.lost_reason.clone().unwrap_or_default();
            PrimaryEnd::Alone {
                guest: Box::new(PrimaryGuest {
                    vmm,
                    outputs,
                    image,
                }),
                reason,
            }
        }
        Ended::HandedOver { epoch, state } => {
            // Everything up to `epoch` is released and the guest stopped there: nothing more
            // leaves this node.
            outputs.close();
            control.send(&Message::Handover { epoch })?;
            info!(epoch, "handed the guest over to the standby");
            let vmm = Arc::try_unwrap(vmm).map_err(|_| PrimaryError::StillShared)?;
            let memory = vmm.memory().clone();
            vmm.stop(VmOutcome::Fault("handed over".into()));
            // The VM goes (its vCPUs, devices and KVM descriptors); its memory stays, the
            // checkpoint this node now stands by with.
            drop(vmm);
            drop(outputs);
            drop(image);
            PrimaryEnd::HandedOver(Box::new(HandedOver {
                epoch,
                state: *state,
                memory,
                link: Link {
                    data: FrameReader::new(data_stream),
                    control: control_reader,
                },
            }))
        }
    };
    Ok((end, report))
}

/// What a primary that handed its guest over keeps: checkpoint `epoch` (its memory and
/// state), from which it stands by for the new primary over `link`.
pub struct HandedOver {
    pub epoch: u64,
    pub state: CheckpointState,
    pub memory: GuestMemory,
    pub link: Link,
}

/// How the epoch loop ended.
enum Ended {
    Guest(VmOutcome),
    Deposed,
    /// The standby was lost; the guest runs on.
    Alone,
    /// A swap: the guest stopped at checkpoint `epoch`, acknowledged.
    HandedOver {
        epoch: u64,
        state: Box<CheckpointState>,
    },
}

/// Where the epoch loop begins.
enum Start<'a> {
    /// A standby that holds nothing of this run yet: resync the disk blocks that may differ
    /// (`need` and this node's bitmap) from `image`, pre-copy memory, then checkpoint.
    Fresh {
        image: Option<&'a ResyncSource>,
        need: BTreeSet<u64>,
    },
    /// A standby that holds checkpoint `epoch` already (a swap made it): checkpoint on.
    After(u64),
}

/// The primary's epoch loop: pre-copy, then checkpoints where the epoch policy says.
struct EpochLoop<'a> {
    vmm: &'a Vmm,
    outputs: &'a Outputs,
    shared: &'a Shared,
    out: &'a crossbeam_channel::Sender<Outgoing>,
    spare: &'a Receiver<StagedPages>,
    /// The data connection, written directly by the resync (before the sender has work).
    data: &'a Sender,
    /// The control connection, which tells the standby a swap begins.
    control: &'a Sender,
    config: &'a PeerConfig,
    watch: &'a Watch,
    limits: Limits,
    /// What the last checkpoints cost, as the policy takes it (behind a lock because the
    /// resync thread borrows the loop).
    recent: Mutex<Recent>,
}

/// Dirty tracking across epochs: which pages stay writable, and the write faults taken.
#[derive(Default)]
struct Tracking {
    hot: HotPages,
    faults: TrackingMeter,
    /// When the last epoch that output ended was checkpointed.
    last_output: Option<Instant>,
}

/// How an epoch ended: why, after how long, and how long output had waited for it.
struct Ending {
    why: EpochEnd,
    length: Duration,
    output_wait: Option<Duration>,
}

/// Whether the guest is running, or paused by the epoch loop and since when.
enum GuestRun {
    Running,
    Held { since: Instant, why: Hold },
}

impl EpochLoop<'_> {
    /// The role as the loop must act on it: deposed or alone, if so.
    fn role_change(&self) -> Option<Ended> {
        let role = self.shared.lock();
        if role.deposed {
            self.vmm.stop(VmOutcome::Fault("deposed".into()));
            return Some(Ended::Deposed);
        }
        if !role.protected {
            drop(role);
            return Some(match self.vmm.outcome() {
                Some(outcome) => Ended::Guest(outcome),
                None => Ended::Alone,
            });
        }
        None
    }

    fn run(&self, start: Start<'_>) -> Result<Ended, PrimaryError> {
        let vmm = self.vmm;
        let (mut epoch, mut carried) = match start {
            Start::Fresh { image, need } => {
                if let (Some(recorder), Some(image)) = (&self.outputs.disk, image) {
                    self.resync(recorder, image, need)?;
                }
                if let Some(ended) = self.role_change() {
                    return Ok(ended);
                }
                let log = self.precopy()?;
                if let Some(ended) = self.role_change() {
                    return Ok(ended);
                }
                // From here on the standby can take over: output waits for its checkpoint (a
                // guest that ran alone released it as it came; one just booted held it from
                // the start).
                self.outputs.hold();
                // The pages dirtied since the last round was copied (or that round itself):
                // the harvest that measured them already cleared them from the dirty log, so
                // the first checkpoint must add them.
                (0, Some(log))
            }
            Start::After(epoch) => (epoch, None),
        };

        let limits = &self.limits;
        let mut tracking = Tracking::default();
        let mut staged = self.staging_for(carried.as_ref().map_or(0, DirtyLog::count));
        let mut began = Instant::now();
        let mut guest = GuestRun::Running;
        loop {
            let ending = loop {
                if let Some(ended) = self.role_change() {
                    self.release(&mut guest);
                    return Ok(ended);
                }
                let obs = self.observe(began.elapsed());
                // Room for the dirty set so far (the pages left writable may all be in it),
                // made while the guest runs.
                staged.make_room(obs.dirty_pages.unwrap_or(0) + tracking.hot.writable());
                let ending = |why| Ending {
                    why,
                    length: obs.elapsed,
                    output_wait: obs.output_waiting,
                };
                if vmm.outcome().is_some() {
                    // The guest ended: its final checkpoint carries how.
                    break ending(EpochEnd::Exit);
                }
                if self.watch.swap_asked() {
                    // A swap: the guest stops at the end of this epoch, for good here. Its
                    // frames from now on leave from the standby, which takes the guest's place
                    // on the network at once: a frame released here after that would teach the
                    // network the old place again, and requests sent there would be lost.
                    self.outputs.hold_back_frames(true);
                    if let GuestRun::Running = guest {
                        vmm.pause();
                        guest = GuestRun::Held {
                            since: Instant::now(),
                            why: Hold::Swap,
                        };
                    }
                    let addresses = self.outputs.addresses();
                    // A lost message only costs the swap its early announcement.
                    if let Err(e) = self.control.send(&Message::SwapBegins { addresses }) {
                        warn!("cannot tell the standby the swap begins: {e}");
                    }
                    break ending(EpochEnd::Swap);
                }
                match policy::next(&obs, limits) {
                    Next::Checkpoint(why) => break ending(why),
                    Next::Run { look_in } => {
                        self.release(&mut guest);
                        self.wait(look_in);
                    }
                    Next::Hold(why) => {
                        if let GuestRun::Running = guest {
                            vmm.pause();
                            // A throttled guest is held for milliseconds, many times a second.
                            if why != Hold::Throttle {
                                info!(?why, "holding the guest until the standby catches up");
                            }
                            guest = GuestRun::Held {
                                since: Instant::now(),
                                why,
                            };
                        }
                        self.wait(why.look_in());
                    }
                }
            };
            epoch += 1;
            began = Instant::now();
            let span = info_span!("epoch", epoch).entered();
            let (unit, ended) = self.checkpoint(
                epoch,
                &ending,
                &mut guest,
                &mut tracking,
                &mut carried,
                staged,
            )?;
            drop(span);
            // The next epoch's buffer is readied now, while the guest runs.
            staged = self.staging_for(unit.pages.gpas.len());
            let handing_over = match (ending.why, &unit.state) {
                (EpochEnd::Swap, Some(bytes)) => Some(CheckpointState::decode(bytes)?),
                _ => None,
            };
            if self.out.send(unit).is_err() {
                // The sender quit (link lost): the control thread decides what that means.
                self.release(&mut guest);
                wait_role_change(self.shared, self.config.failover_timeout() * 2);
            }
            if let Some(outcome) = ended {
                return Ok(self.finish(epoch, outcome));
            }
            if let Some(state) = handing_over {
                if self.wait_ack(epoch) {
                    return Ok(Ended::HandedOver {
                        epoch,
                        state: Box::new(state),
                    });
                }
                // The standby was lost or took over meanwhile: the swap is off.
                warn!(epoch, "the swap's final checkpoint was not acknowledged");
                self.outputs.hold_back_frames(false);
                self.release(&mut guest);
            }
        }
    }

    /// A staging buffer for the next checkpoint, with room for about `pages` dirty pages: one
    /// the sender gave back, or a new one, faulted in now rather than in the pause.
    fn staging_for(&self, pages: usize) -> StagedPages {
        let mut staged = self.spare.try_recv().unwrap_or_default();
        staged.make_room(pages);
        staged
    }

    /// Waits for checkpoint `epoch`'s acknowledgement; false if the standby was lost or took
    /// over first.
    fn wait_ack(&self, epoch: u64) -> bool {
        let limit = Instant::now()
            + self.config.ack_timeout()
            + self.config.failover_timeout()
            + Duration::from_secs(1);
        let role = self.shared.wait_while(limit, |role| {
            role.protected && !role.deposed && role.acked < epoch
        });
        role.protected && !role.deposed && role.acked >= epoch
    }

    /// Resyncs the disk blocks that may differ between the nodes (those `recorder`'s bitmap
    /// marks and those the standby `need`s) from `image`, while the guest runs: first all of
    /// them, then once more those the guest wrote meanwhile, when from that moment on every
    /// write is recorded in the first epoch too. One thread reads and packs the blocks, at
    /// the lowest I/O priority so that the guest's own I/O goes first, a few frames ahead of
    /// the one that writes them to the link. Both run at the guest's CPU priority: a resync
    /// costs little CPU (lz4 only while it pays), and at a lower one it dragged on for as
    /// long as the guest kept a core busy, leaving the guest unprotected the longer.
    fn resync(
        &self,
        recorder: &EpochRecorder,
        image: &ResyncSource,
        mut blocks: BTreeSet<u64>,
    ) -> Result<(), PrimaryError> {
        let _span = info_span!("resync").entered();
        blocks.extend(recorder.begin_resync());
        if blocks.is_empty() {
            recorder.start_recording();
            return Ok(());
        }
        let start = Instant::now();
        let bytes = image.bytes_of(&blocks);
        info!(blocks = blocks.len(), bytes, "resync of the disk begins");
        self.watch.lock().resync_total = bytes;
        let (frames_tx, frames_rx) = bounded::<(u64, Vec<u8>)>(RESYNC_AHEAD);
        let (read, sent) = std::thread::scope(|s| {
            let reading = s.spawn(move || -> Result<(), PrimaryError> {
                link::lower_io_priority();
                let packing = wire::Packing::default();
                let mut pace = Pace::new(self.config.resync_max_mib_s);
                read_resync(image, &blocks, &packing, &mut pace, &frames_tx, self.shared)?;
                let again = recorder.start_recording();
                info!(
                    blocks = again.len(),
                    "resync: blocks the guest wrote meanwhile"
                );
                read_resync(image, &again, &packing, &mut pace, &frames_tx, self.shared)?;
                let (packed, as_is) = packing.counts();
                info!(
                    packed,
                    as_is, "resync: frames lz4-compressed and sent as they are"
                );
                Ok(())
            });
            let sending = (|| -> Result<u64, PrimaryError> {
                self.data.send(&Message::ResyncPlan { bytes })?;
                let mut sent = 0;
                for (len, frame) in frames_rx {
                    self.data.send_frame(&frame)?;
                    sent += len;
                    self.watch.lock().resync_sent += len;
                }
                Ok(sent)
            })();
            let read = reading.join().unwrap_or_else(|_| {
                Err(PrimaryError::Thread(std::io::Error::other(
                    "resync panicked",
                )))
            });
            (read, sending)
        });
        // The reader stops when the sender does; the sender's error says why.
        let sent = sent.and_then(|sent| read.map(|()| sent));
        let sent = sent.and_then(|sent| {
            self.data.send(&Message::ResyncEnd)?;
            Ok(sent)
        });
        match sent {
            Ok(sent) => {
                let secs = start.elapsed().as_secs_f64();
                info!(
                    sent,
                    secs,
                    mib_s = sent as f64 / (1 << 20) as f64 / secs.max(1e-9),
                    "resync of the disk sent"
                );
                Ok(())
            }
            // The link failed: the control thread says why and the standby is lost.
            Err(PrimaryError::Io(e)) => {
                warn!("resync stopped: {e}");
                recorder.stop();
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Pre-copy: all of memory but its zero pages (the standby's memory is fresh), then what
    /// the running guest dirtied meanwhile, a few rounds, each in batches of
    /// [`PRECOPY_BATCH_PAGES`]. Returns what the first checkpoint must still carry: the dirty
    /// log of the last round's harvest, and, if the round stopped early (the guest ended, the
    /// standby went), the pages it had not reached.
    fn precopy(&self) -> Result<DirtyLog, PrimaryError> {
        let vmm = self.vmm;
        let _span = info_span!("precopy").entered();
        let mut log = DirtyLog::all(vmm.memory());
        let mut residency = Residency::open();
        for round in 0..PRECOPY_ROUNDS {
            let (mut sent, mut looked) = (0, 0);
            // The last page the round took: pages go in ascending order.
            let reached = std::cell::Cell::new(None);
            let went = {
                let mut pages = log.pages().inspect(|&gpa| reached.set(Some(gpa)));
                loop {
                    let mut batch = self.spare.try_recv().unwrap_or_default();
                    let taken = batch.copy_running(
                        vmm.memory(),
                        &mut pages,
                        PRECOPY_BATCH_PAGES,
                        (round == 0).then_some(&mut residency),
                    )?;
                    if taken == 0 {
                        break true;
                    }
                    looked += taken;
                    if batch.gpas.is_empty() {
                        continue;
                    }
                    sent += batch.gpas.len();
                    self.watch.lock().precopy_pages += batch.gpas.len();
                    let out = Outgoing {
                        epoch: 0,
                        pages: batch,
                        state: None,
                        disk: EpochWrites::new(),
                    };
                    if self.out.send(out).is_err() || vmm.outcome().is_some() {
                        break false;
                    }
                }
            };
            info!(round, pages = sent, zero = looked - sent, "pre-copy round");
            let rest = (!went).then(|| log.select(|gpa| reached.get().is_none_or(|r| gpa > r)));
            log = vmm.harvest_dirty()?;
            if let Some(rest) = rest {
                log.union_with(&rest);
                break;
            }
            if log.count() < PRECOPY_DONE_PAGES {
                break;
            }
        }
        self.shared.lock().precopy = false;
        Ok(log)
    }

    /// What the epoch policy looks at, `elapsed` into the running epoch.
    fn observe(&self, elapsed: Duration) -> Observation {
        let (unacked, oldest_unacked, ship_rate) = {
            let role = self.shared.lock();
            let oldest = role.unacked.front().map(|u| u.sealed.elapsed());
            let rate = role.shipping.rate();
            (role.unacked.len(), oldest.unwrap_or_default(), rate)
        };
        let dirty_pages = self.vmm.dirty_count().unwrap_or_else(|e| {
            // The harvest will fail the same way and say so; until then, no dirty budget.
            warn!("cannot count the running epoch's dirty pages: {e}");
            None
        });
        Observation {
            elapsed,
            sender_ready: self.out.is_empty(),
            unacked,
            epoch_bytes: self.outputs.running_bytes(),
            held_bytes: self.outputs.console.held_bytes(),
            oldest_unacked,
            output_waiting: self.outputs.waiting_since().map(|t| t.elapsed()),
            dirty_pages,
            recent: Recent {
                ship_rate,
                ..self.recent()
            },
        }
    }

    fn recent(&self) -> Recent {
        *self.recent.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_recent(&self, recent: Recent) {
        *self.recent.lock().unwrap_or_else(|e| e.into_inner()) = recent;
    }

    /// Waits at most `limit` for what the policy may act on: an acknowledgement, the sender
    /// taking a checkpoint, the running epoch's first output, a role change, the guest's end.
    fn wait(&self, limit: Duration) {
        let pokes = self.shared.lock().pokes;
        drop(self.shared.wait_while(Instant::now() + limit, |role| {
            role.protected && !role.deposed && role.pokes == pokes && self.vmm.outcome().is_none()
        }));
    }

    /// Lets a held guest run again.
    fn release(&self, guest: &mut GuestRun) {
        if let GuestRun::Held { since, why } = std::mem::replace(guest, GuestRun::Running) {
            let held = since.elapsed();
            let mut r = self.watch.lock();
            if why == Hold::Throttle {
                r.throttles += 1;
                r.throttled_time += held;
            } else {
                info!(
                    ?why,
                    held_ms = saturating_u64(held.as_millis()),
                    "the standby caught up; the guest runs again"
                );
                r.holds += 1;
                r.held_time += held;
            }
            drop(r);
            self.vmm.resume();
        }
    }

    /// Takes checkpoint `epoch`: pauses the guest (unless held already), harvests and copies
    /// its dirty pages into `pages` (readied while the guest ran), saves the VM state and seals the epoch's output; lets the guest run on
    /// unless the policy holds it. Returns what the sender ships, and the guest's outcome if
    /// this is its final checkpoint.
    fn checkpoint(
        &self,
        epoch: u64,
        ending: &Ending,
        guest: &mut GuestRun,
        tracking: &mut Tracking,
        carried: &mut Option<DirtyLog>,
        mut pages: StagedPages,
    ) -> Result<(Outgoing, Option<VmOutcome>), PrimaryError> {
        let vmm = self.vmm;
        let why = ending.why;
        // The pause's copy threads, spawned meanwhile, are urgent too.
        let urgent = link::Urgent::raise();
        let start = Instant::now();
        if let GuestRun::Running = guest {
            vmm.pause();
        }
        let stopped = start.elapsed();
        let ended = vmm.outcome();
        let mut recent = self.recent();
        let since_output = tracking.last_output.map_or(Duration::MAX, |t| start - t);
        if why == EpochEnd::Output {
            tracking.last_output = Some(start);
        }
        // The output came soon after the last release: it answers what that let out.
        let released = self.shared.lock().released_at;
        let came = ending.output_wait.and_then(|w| start.checked_sub(w));
        let answers = came
            .zip(released)
            .and_then(|(came, released)| came.checked_duration_since(released))
            .is_some_and(|after| after < policy::ANSWER);
        let (limits, mut faults) = (&self.limits, 0);
        let mut log = vmm.harvest_dirty_rearming(|log| {
            // Pages left writable last time are in this harvest without a fault: the others
            // faulted when the guest wrote them (the tracking cost of this epoch).
            faults = log.count().saturating_sub(tracking.hot.writable());
            let done = policy::Done {
                why,
                length: ending.length,
                pages: log.count(),
                since_output,
                answers,
            };
            recent.pressed = policy::pressed(limits, &recent, &done);
            tracking.hot.rearm(log, policy::hot_budget(limits, &recent))
        })?;
        tracking.faults.epoch(faults);
        recent.faults = tracking.faults.per_epoch();
        self.set_recent(recent);
        if let Some(carried) = carried.take() {
            log.union_with(&carried);
        }
        let copy_start = Instant::now();
        let harvest = copy_start - start - stopped;
        pages.copy_from(vmm.memory(), &log)?;
        let copy_time = copy_start.elapsed();
        let save_start = Instant::now();
        let bytes = pages.bytes().len() + self.outputs.running_bytes();
        let (output, disk) = self.outputs.seal(epoch);
        let state = CheckpointState {
            vmm: vmm.save_state()?,
            output,
            ended: ended.clone(),
            // The NIC is paused with the guest: this is what the checkpoint has received.
            input: self.outputs.input_delivered(),
        };
        let save = save_start.elapsed();
        self.shared.lock().unacked.push_back(Unacked {
            epoch,
            sealed: Instant::now(),
            bytes: usize_to_u64(bytes),
        });
        if ended.is_none() {
            // Held output at its bound keeps the guest paused at once, rather than letting it
            // run between the checkpoint and the hold.
            let hold = match policy::next(&self.observe(Duration::ZERO), &self.limits) {
                _ if why == EpochEnd::Swap => Some(Hold::Swap),
                Next::Hold(why) => Some(why),
                _ => None,
            };
            match (&*guest, hold) {
                (GuestRun::Held { .. }, None) => self.release(guest),
                (GuestRun::Running, None) => vmm.resume(),
                (GuestRun::Running, Some(why)) => {
                    *guest = GuestRun::Held {
                        since: Instant::now(),
                        why,
                    }
                }
                (GuestRun::Held { .. }, Some(_)) => {}
            }
        }
        let pause = start.elapsed();
        drop(urgent);
        let dirty = pages.gpas.len();
        recent.pause = pause;
        self.set_recent(recent);
        debug!(
            dirty,
            ?why,
            length_us = saturating_u64(ending.length.as_micros()),
            output_wait_us = ending.output_wait.map(|w| saturating_u64(w.as_micros())),
            faults,
            hot = tracking.hot.writable(),
            answers,
            pressed = recent.pressed,
            held_frames = state.output.frames.items.len(),
            disk_ops = disk.len(),
            pause_us = saturating_u64(pause.as_micros()),
            stop_us = saturating_u64(stopped.as_micros()),
            harvest_us = saturating_u64(harvest.as_micros()),
            copy_us = saturating_u64(copy_time.as_micros()),
            save_us = saturating_u64(save.as_micros()),
            "checkpoint"
        );
        {
            let mut r = self.watch.lock();
            r.epochs = epoch;
            r.record_epoch(&EpochFigures {
                began: start,
                pause,
                copy: copy_time,
                dirty,
                length: ending.length,
                why,
            });
        }
        let unit = Outgoing {
            epoch,
            pages,
            state: Some(state.encode()?),
            disk,
        };
        Ok((unit, ended))
    }

    /// The guest ended and its final checkpoint `epoch` is on its way: wait for its ack (which
    /// releases the last output), the loss of the standby, or deposition.
    fn finish(&self, epoch: u64, outcome: VmOutcome) -> Ended {
        // Longer than the control thread takes to give up on a slow or silent standby.
        let limit = Instant::now()
            + self.config.ack_timeout()
            + self.config.failover_timeout()
            + Duration::from_secs(1);
        let role = self.shared.wait_while(limit, |role| {
            role.protected && !role.deposed && role.acked < epoch
        });
        if role.deposed {
            return Ended::Deposed;
        }
        Ended::Guest(outcome)
    }
}

/// Holds a stream of bytes to at most a rate (the pair's `resync_max_mib_s`), so that a resync
/// leaves a shared link the rest.
struct Pace {
    start: Instant,
    bytes: u64,
    /// Bytes per second; 0: unlimited.
    limit: u64,
}

impl Pace {
    fn new(mib_s: u64) -> Self {
        Self {
            start: Instant::now(),
            bytes: 0,
            limit: mib_s.saturating_mul(1 << 20),
        }
    }

    /// Waits until `bytes` more are within the rate.
    fn take(&mut self, bytes: u64) {
        self.bytes += bytes;
        if self.limit > 0 {
            let due = self.start + Duration::from_secs_f64(self.bytes as f64 / self.limit as f64);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
        }
    }
}

/// Reads `blocks` of `image` in runs of up to [`RESYNC_RUN_BLOCKS`] at `pace`, and hands each
/// frame, packed as `packing` says, with its bytes of blocks, to `frames`; stops when the
/// standby is lost.
fn read_resync(
    image: &ResyncSource,
    blocks: &BTreeSet<u64>,
    packing: &wire::Packing,
    pace: &mut Pace,
    frames: &crossbeam_channel::Sender<(u64, Vec<u8>)>,
    shared: &Shared,
) -> Result<(), PrimaryError> {
    let lost = || PrimaryError::Io(std::io::Error::other("the standby was lost"));
    for (first, count) in resync::runs(blocks, RESYNC_RUN_BLOCKS) {
        if !shared.lock().protected {
            return Err(lost());
        }
        let (offset, data) = image.read_run(first, count)?;
        pace.take(usize_to_u64(data.len()));
        let frame = packing.pack(|compress| wire::encode_resync(offset, &data, compress));
        frames
            .send((usize_to_u64(data.len()), frame))
            .map_err(|_| lost())?;
    }
    Ok(())
}

fn wait_role_change(shared: &Shared, limit: Duration) {
    let deadline = Instant::now() + limit;
    drop(shared.wait_while(deadline, |role| role.protected && !role.deposed));
}

/// Compresses each unit's pages on worker threads and writes the frames in order, then the
/// state and the epoch's end.
fn send_loop(
    input: Receiver<Outgoing>,
    spare: crossbeam_channel::Sender<StagedPages>,
    data: Sender,
    shared: Arc<Shared>,
    watch: Watch,
    workers: usize,
    cache: &PageCache,
) {
    link::yield_to_guest();
    let mut retention = Retention::default();
    let packing = wire::Packing::default();
    for mut unit in input {
        // The epoch loop may be waiting for room to seal an epoch with output waiting.
        shared.poke();
        let frames = compress(&unit, workers, &packing, cache);
        let mut digest = EpochDigest::new();
        let mut wire_bytes = 0u64;
        let mut send = |frame: &[u8]| -> std::io::Result<()> {
            wire_bytes += usize_to_u64(frame.len());
            data.send_frame(frame)
        };
        let mut result = Ok(());
        for (batch, frame) in unit.pages.gpas.chunks(BATCH_PAGES).zip(&frames) {
            let start = (batch.as_ptr() as usize - unit.pages.gpas.as_ptr() as usize) / 8;
            let bytes = &unit.pages.bytes()[start * PAGE_SIZE..(start + batch.len()) * PAGE_SIZE];
            digest.add_pages(batch, bytes);
            result = result.and_then(|()| send(frame));
        }
        if let Some(state) = &unit.state {
            // Disk writes first: the standby applies them at the epoch's end, with its pages.
            for bytes in staging::encode_disk(&unit.disk) {
                digest.add_state(&bytes);
                let msg = Message::Disk {
                    epoch: unit.epoch,
                    bytes,
                };
                result = result.and_then(|()| send(&wire::encode(&msg)));
            }
            digest.add_state(state);
            let state_msg = Message::State {
                epoch: unit.epoch,
                bytes: state.clone(),
            };
            result = result
                .and_then(|()| send(&wire::encode(&state_msg)))
                .and_then(|()| send(&wire::encode(&digest.end(unit.epoch))));
        }
        {
            let mut r = watch.lock();
            if unit.state.is_some() {
                r.wire_bytes += wire_bytes;
                r.page_bytes += usize_to_u64(unit.pages.bytes().len());
            } else {
                r.precopy_wire_bytes += wire_bytes;
            }
        }
        if let Err(e) = result {
            let role = shared.lock();
            if role.protected && !role.finished {
                warn!("sending epoch {} failed: {e}", unit.epoch);
            }
            return;
        }
        // Staging buffers go back to be copied into again (pre-copy batches too, at their
        // size until epochs take them).
        if unit.state.is_some() {
            retention.epoch(&mut unit.pages);
        }
        let _ = spare.try_send(unit.pages);
    }
}

/// The Pages frames of `unit`, its pages encoded against `cache` and packed by up to `workers`
/// threads as `packing` says, in batch order. The cache's slots are locked one page at a time,
/// and a unit names each page once (a dirty log, a pre-copy batch), so the workers never wait
/// for each other and each page's base is what the standby holds before this unit.
fn compress(
    unit: &Outgoing,
    workers: usize,
    packing: &wire::Packing,
    cache: &PageCache,
) -> Vec<Vec<u8>> {
    let batches: Vec<(usize, &[u64])> = unit
        .pages
        .gpas
        .chunks(BATCH_PAGES)
        .enumerate()
        .map(|(i, b)| (i * BATCH_PAGES, b))
        .collect();
    let encode = |(start, gpas): &(usize, &[u64])| {
        let bytes = &unit.pages.bytes()[start * PAGE_SIZE..(start + gpas.len()) * PAGE_SIZE];
        packing.pack(|compress| delta::encode_batch(cache, unit.epoch, gpas, bytes, compress))
    };
    if batches.len() < 2 || workers < 2 {
        return batches.iter().map(encode).collect();
    }
    let (job_tx, job_rx) = bounded::<usize>(batches.len());
    let (done_tx, done_rx) = bounded::<(usize, Vec<u8>)>(batches.len());
    for i in 0..batches.len() {
        let _ = job_tx.send(i);
    }
    drop(job_tx);
    std::thread::scope(|s| {
        for _ in 0..workers {
            let (job_rx, done_tx, batches) = (job_rx.clone(), done_tx.clone(), &batches);
            s.spawn(move || {
                link::yield_to_guest();
                for i in job_rx {
                    let _ = done_tx.send((i, encode(&batches[i])));
                }
            });
        }
    });
    drop(done_tx);
    let ordered: BTreeMap<usize, Vec<u8>> = done_rx.into_iter().collect();
    ordered.into_values().collect()
}

/// Everything from the standby that is already here, after `first`: messages up to the first
/// read that finds nothing more, or up to the error that ends the connection.
fn read_arrived(
    reader: &mut FrameReader<TcpStream>,
    first: Result<Message, WireError>,
) -> VecDeque<Result<Message, WireError>> {
    let mut arrived = VecDeque::from([first]);
    loop {
        // Read again even after an idle `first`: it may have timed out while this node was
        // stopped, with messages arriving meanwhile.
        let next = reader.read_message();
        let more = next.is_ok();
        arrived.push_back(next);
        if !more {
            break;
        }
    }
    arrived.retain(|m| !matches!(m, Err(WireError::Idle)));
    arrived
}

/// Sends the guest's input to the standby as `log` queues it, until the run ends or the
/// standby is lost (a failed send: the control thread finds out why).
fn send_input(log: &InputLog, control: &Sender, shared: &Shared) {
    loop {
        let ended = {
            let role = shared.lock();
            role.finished || !role.protected
        };
        let sent = match (ended, log.next_batch(TICK)) {
            (true, _) => false,
            (false, Some((first, frames))) => {
                control.send(&Message::Input { first, frames }).is_ok()
            }
            (false, None) => true,
        };
        if !sent {
            log.record(false);
            return;
        }
    }
}

/// How late the standby is, as the control thread judges it: slow while its oldest
/// unacknowledged checkpoint is older than the failover timeout (its heartbeats still arrive:
/// a silent standby is lost after the failover timeout whatever its lag), lost past the
/// acknowledgement timeout.
struct Lag {
    slow_since: Option<Instant>,
    last_said: Instant,
}

/// How often a slow standby's lag is logged while it lasts.
const SLOW_LOG_EVERY: Duration = Duration::from_secs(1);

impl Lag {
    fn new() -> Self {
        Self {
            slow_since: None,
            last_said: Instant::now(),
        }
    }

    /// Judges the lag from the oldest unacknowledged epoch and its age; returns why the
    /// standby is lost, if it is.
    fn judge(
        &mut self,
        oldest: Option<(u64, Duration)>,
        config: &PeerConfig,
        watch: &Watch,
    ) -> Option<String> {
        let ack_timeout = config.ack_timeout();
        let mut r = watch.lock();
        r.oldest_unacked = oldest.map(|(_, age)| age);
        match oldest {
            Some((epoch, age)) if age > ack_timeout => Some(format!(
                "no acknowledgement within the acknowledgement timeout of {} ms: epoch {epoch} \
                 is {} ms old",
                ack_timeout.as_millis(),
                age.as_millis()
            )),
            Some((epoch, age)) if age > config.failover_timeout() => {
                let now = Instant::now();
                if self.slow_since.is_none() {
                    self.slow_since = Some(now);
                    r.slow_episodes += 1;
                    r.standby = StandbyHealth::Slow;
                }
                if self.slow_since == Some(now) || self.last_said.elapsed() >= SLOW_LOG_EVERY {
                    self.last_said = now;
                    warn!(
                        epoch,
                        age_ms = saturating_u64(age.as_millis()),
                        ack_timeout_ms = saturating_u64(ack_timeout.as_millis()),
                        "standby slow: its heartbeats arrive but the oldest unacknowledged \
                         epoch is {} ms old; holding output",
                        age.as_millis()
                    );
                }
                None
            }
            _ => {
                if let Some(since) = self.slow_since.take() {
                    let slow = since.elapsed();
                    r.slow_time += slow;
                    r.standby = StandbyHealth::Ok;
                    info!(
                        slow_ms = saturating_u64(slow.as_millis()),
                        "the standby caught up"
                    );
                }
                None
            }
        }
    }
}

/// Reads acks, heartbeats and role messages from the standby, sends heartbeats, and decides
/// when the standby is lost: silent for the failover timeout, or alive but not acknowledging
/// within the acknowledgement timeout.
#[allow(clippy::too_many_arguments)]
fn control_loop(
    mut reader: FrameReader<TcpStream>,
    control: Sender,
    data: Sender,
    shared: Arc<Shared>,
    outputs: Outputs,
    vmm: Arc<Vmm>,
    config: PeerConfig,
    watch: Watch,
) -> FrameReader<TcpStream> {
    control_turns(
        &mut reader,
        control,
        data,
        shared,
        outputs,
        vmm,
        config,
        watch,
    );
    // Handed back: after a swap the connection serves the other way round, and what this
    // reader already holds is the new primary's.
    reader
}

/// The turns of [`control_loop`], until the standby is lost or has taken over, or the run ends.
#[allow(clippy::too_many_arguments)]
fn control_turns(
    reader: &mut FrameReader<TcpStream>,
    control: Sender,
    data: Sender,
    shared: Arc<Shared>,
    outputs: Outputs,
    vmm: Arc<Vmm>,
    config: PeerConfig,
    watch: Watch,
) {
    let mut silence = SilenceClock::new(config.failover_timeout());
    let beat = config.heartbeat_interval();
    let mut last_beat = Instant::now();
    // The standby's last sign of progress through pre-copy: a heartbeat with a new frame count.
    let mut progress_at = Instant::now();
    let mut standby_received = 0u64;
    let mut lag = Lag::new();
    // Messages read but not yet acted on, after this node was found not to have run.
    let mut backlog = VecDeque::new();
    let mut last_look = Instant::now();
    let lost = |why: String| {
        let mut role = shared.lock();
        if !role.protected || role.finished {
            return;
        }
        error!("standby lost ({why}); the guest continues unprotected");
        role.protected = false;
        drop(role);
        {
            let mut r = watch.lock();
            r.standby = StandbyHealth::Lost;
            r.lost_reason = Some(why);
        }
        shared.changed.notify_all();
        outputs.open();
        let _ = control.send(&Message::Goodbye);
        data.shutdown();
    };
    loop {
        if shared.lock().finished {
            return;
        }
        let got = match backlog.pop_front() {
            Some(got) => got,
            None => {
                let got = reader.read_message();
                if link::not_running(last_look.elapsed(), config.failover_timeout()) {
                    // This node did not run for a while (SIGSTOP, starvation): the standby may
                    // have taken over meanwhile, and the acks of the epochs it committed first
                    // sit ahead of its TakenOver. Read all that has arrived before acting on
                    // any of it, so that a deposed node releases nothing more.
                    backlog = read_arrived(reader, got);
                    if backlog.iter().any(|m| matches!(m, Ok(Message::TakenOver))) {
                        backlog = VecDeque::from([Ok(Message::TakenOver)]);
                    }
                    // The silence was this node's own: the standby gets a fresh window.
                    let now = Instant::now();
                    progress_at = now;
                    for u in shared.lock().unacked.iter_mut() {
                        u.sealed = now;
                    }
                    backlog.pop_front().unwrap_or(Err(WireError::Idle))
                } else {
                    got
                }
            }
        };
        last_look = Instant::now();
        match got {
            Ok(Message::Ack { epoch }) => {
                silence.heard();
                let released = outputs.release_through(epoch);
                let now = Instant::now();
                let mut role = shared.lock();
                role.acked = role.acked.max(epoch);
                role.pokes += 1;
                if released {
                    role.released_at = Some(now);
                }
                while let Some(u) = role.unacked.pop_front() {
                    if u.epoch > epoch {
                        role.unacked.push_front(u);
                        break;
                    }
                    role.shipping.acked(u.bytes, u.sealed, now);
                }
                drop(role);
                watch.lock().acked = epoch;
                shared.changed.notify_all();
            }
            Ok(Message::Heartbeat { received }) => {
                silence.heard();
                if received != standby_received {
                    standby_received = received;
                    progress_at = Instant::now();
                }
            }
            Ok(Message::InputAck { through }) => {
                silence.heard();
                outputs.input_held(through);
            }
            Ok(Message::Synced { runs }) => {
                silence.heard();
                progress_at = Instant::now();
                if let Some(disk) = &outputs.disk {
                    if let Err(e) = disk.synced(&resync::blocks_of(&runs)) {
                        // The bits stay set: a later resync sends those blocks again.
                        warn!("cannot clear resynced blocks from the bitmap: {e}");
                    }
                }
            }
            Ok(Message::TakenOver) => {
                error!("the standby has taken over; this node stops and releases nothing more");
                outputs.close();
                shared.lock().deposed = true;
                shared.changed.notify_all();
                vmm.stop(VmOutcome::Fault("deposed".into()));
                return;
            }
            Ok(Message::Refuse { reason }) => {
                lost(format!("it refused an epoch: {reason}"));
                return;
            }
            Ok(other) => {
                lost(format!("unexpected message {other:?}"));
                return;
            }
            Err(WireError::Idle) => {}
            Err(e) => {
                lost(e.to_string());
                return;
            }
        }
        let (protected, precopy, oldest) = {
            let role = shared.lock();
            let oldest = role.unacked.front().map(|u| (u.epoch, u.sealed.elapsed()));
            (role.protected, role.precopy, oldest)
        };
        if !protected {
            return;
        }
        if silence.expired() {
            lost(format!(
                "silent for {} ms",
                silence.silent_for().as_millis()
            ));
            return;
        }
        if precopy && standby_received >= data.frames_sent() {
            // It has read all there is: a pre-copy busy passing over zero pages is not the
            // standby's delay.
            progress_at = Instant::now();
        }
        if precopy && progress_at.elapsed() > config.ack_timeout() {
            lost(format!(
                "it read nothing of the pre-copy for the acknowledgement timeout of {} ms",
                config.ack_timeout_ms
            ));
            return;
        }
        if let Some(why) = lag.judge(oldest, &config, &watch) {
            lost(why);
            return;
        }
        if last_beat.elapsed() >= beat {
            last_beat = Instant::now();
            if let Err(e) = control.send(&Message::Heartbeat { received: 0 }) {
                lost(format!("heartbeat failed: {e}"));
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pace_holds_a_stream_to_its_rate() {
        let mut pace = Pace::new(64);
        for _ in 0..16 {
            pace.take(1 << 20);
        }
        // 16 MiB at 64 MiB/s: not before a quarter of a second (sleeps never end early).
        assert!(pace.start.elapsed() >= Duration::from_millis(250));
        let mut unlimited = Pace::new(0);
        unlimited.take(u64::MAX / 2);
        assert!(unlimited.start.elapsed() < Duration::from_secs(1));
    }
}
