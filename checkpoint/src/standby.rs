//! The standby: keeps the guest's memory image and last committed state, builds each epoch
//! apart from them, verifies it whole and only then commits it and acknowledges; takes over
//! when the primary dies; leaves quietly when told goodbye or that the guest exited.

use std::collections::VecDeque;
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use disk_sync::resync::{self, ResyncTarget};
use disk_sync::{EpochWrites, Replica, WriteIntentBitmap};
use tracing::{debug, error, info, info_span, warn};
use vmm::cast::{saturating_u64, usize_to_u64};
use vmm::devices::GuestMemory;
use vmm::memory::{self, MemoryError};
use vmm::{VmShell, Vmm};

use crate::delta;
use crate::input::ReceivedInput;
use crate::link::{Link, LinkError, Listener, PeerConfig, Sender, SilenceClock};
use crate::staging::{self, CheckpointState, StagedPages, StagingError};
use crate::wire::{EpochDigest, FrameReader, Message, WireError};

#[derive(Debug, thiserror::Error)]
pub enum StandbyError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("cannot allocate the standby's guest memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("cannot prepare the standby's VM: {0}")]
    Prepare(#[from] vmm::builder::BuildError),
    #[error("the primary was lost before its first checkpoint committed: nothing to resume")]
    NoCheckpoint,
    #[error("the committed checkpoint cannot be decoded: {0}")]
    State(#[from] StagingError),
    #[error("cannot start the receiver thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot take over: this node's disk no longer matches any checkpoint ({0})")]
    DiskFailed(String),
    #[error("the primary handed over checkpoint {asked}, this node holds {held}")]
    Handover { asked: u64, held: u64 },
}

/// The local resources a standby provides, checked against the primary's configuration.
#[derive(Debug, Clone)]
pub struct Local {
    pub disk_size: Option<u64>,
    /// The MAC of this node's NIC for the guest, if it has one.
    pub net_mac: Option<[u8; 6]>,
    /// The KVM device the standby's VM is prepared on.
    pub kvm_path: PathBuf,
}

impl Local {
    /// Why this node cannot stand by for a primary with `config`, if it cannot.
    pub fn check(&self, config: &PeerConfig) -> Result<(), String> {
        match (config.disk_size, self.disk_size) {
            (Some(p), Some(s)) if p != s => {
                return Err(format!(
                    "disk size differs: the primary's disk has {p} bytes, the standby's {s}"
                ))
            }
            (Some(_), None) => return Err("the primary has a disk and the standby has none".into()),
            (None, Some(_)) => return Err("the standby has a disk and the primary has none".into()),
            _ => {}
        }
        if config.net_mac != self.net_mac {
            let name = |mac: Option<[u8; 6]>| match mac {
                Some(m) => format!(
                    "MAC {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ),
                None => "no network device".into(),
            };
            return Err(format!(
                "network device differs: the primary has {}, the standby {}",
                name(config.net_mac),
                name(self.net_mac)
            ));
        }
        memory::check_mem_size(config.vm.mem_size).map_err(|e| e.to_string())?;
        Ok(())
    }
}

/// What the standby holds when it takes over: the last committed checkpoint, and a VM already
/// built on its memory.
pub struct Takeover {
    pub config: PeerConfig,
    pub shell: VmShell,
    pub state: CheckpointState,
    pub epoch: u64,
    /// Why the primary was judged dead.
    pub reason: String,
    /// When the primary was last heard from, when it was judged dead, and when every epoch
    /// that had arrived was committed and the checkpoint decoded.
    pub last_heard: Instant,
    pub decided: Instant,
    pub drained: Instant,
    /// This node's write-intent bitmap, to mark what the guest writes from now on.
    pub bitmap: Option<WriteIntentBitmap>,
    /// A swap, not a failure: the link to the old primary, which now stands by with this
    /// checkpoint; the resumed guest is protected by it at once.
    pub link: Option<Link>,
    /// Frames the guest received after its checkpoint on the old primary, to deliver to the
    /// resumed guest before any other (see [`crate::input`]).
    pub input: VecDeque<Vec<u8>>,
}

/// How a standby's watch ended.
pub enum StandbyEnd {
    /// The primary died: resume the guest from this checkpoint.
    Takeover(Box<Takeover>),
    /// The guest exited on the primary with this code.
    Exit(i32),
    /// The primary continues without this node, which must never take over.
    Goodbye,
}

/// What the receiver thread hands back: its last committed epoch and state, decoded (its
/// image is the memory of the prepared VM), and the data connection.
struct Committed {
    memory: GuestMemory,
    epoch: u64,
    state: Option<CheckpointState>,
    /// Why an epoch's disk writes could not be applied, if they could not.
    disk_failed: Option<String>,
    /// The resync target, if the disk was brought up to date (its bitmap marks after takeover).
    resync: Option<ResyncTarget>,
    data: Option<FrameReader<TcpStream>>,
}

/// What a standby begins with: the primary's configuration, the link, its guest memory and
/// the VM prepared on it, and the checkpoint it already holds, if any (after a swap).
pub struct Begin {
    pub config: PeerConfig,
    pub link: Link,
    pub memory: GuestMemory,
    pub shell: VmShell,
    pub committed: Option<(u64, CheckpointState)>,
}

/// A standby's progress as it happens, for status, and what it does when a swap begins:
/// clones share it.
#[derive(Clone, Default)]
pub struct StandbyWatch {
    progress: Arc<Mutex<StandbyProgress>>,
    on_swap: Arc<Mutex<Option<SwapHook>>>,
}

/// Called with the guest's IPv4 addresses when the primary says a swap begins, so that the
/// node taking the guest can announce its new place on the network before it resumes.
pub type SwapHook = Box<dyn FnMut(&[[u8; 4]]) + Send>;

/// What a standby has received and committed so far.
#[derive(Debug, Clone, Default)]
pub struct StandbyProgress {
    /// Bytes of disk blocks the primary said it would resync, and those written here.
    pub resync_total: u64,
    pub resync_done: u64,
    /// Bytes of guest memory, and of pre-copied pages received (rounds after the first send
    /// some pages again).
    pub precopy_total: u64,
    pub precopy_done: u64,
    /// The last committed epoch (0: none yet; the node is not a standby until it has one).
    pub committed: u64,
    /// When the last epoch committed.
    pub committed_at: Option<Instant>,
}

impl StandbyWatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, StandbyProgress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets what to do when a swap begins (see [`SwapHook`]).
    pub fn on_swap(&self, hook: SwapHook) {
        *self.on_swap.lock().unwrap_or_else(|e| e.into_inner()) = Some(hook);
    }

    fn swap_begins(&self, addresses: &[[u8; 4]]) {
        let mut hook = self.on_swap.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(hook) = hook.as_mut() {
            hook(addresses);
        }
    }

    pub fn snapshot(&self) -> StandbyProgress {
        self.lock().clone()
    }
}

/// This node's copy of the guest's disk: the image committed epochs are applied to, and the
/// resync target that brings it up to date first (which knows what it still needs).
pub struct StandbyDisk {
    pub replica: Replica,
    pub resync: ResyncTarget,
}

/// Serves one primary that connects to `listener` until it exits, says goodbye, or dies.
/// `disk` is this node's copy of the guest's disk, if it has one: the primary first resyncs
/// the blocks it needs, then committed epochs' writes go to it.
pub fn serve(
    listener: &Listener,
    local: &Local,
    disk: Option<StandbyDisk>,
    watch: &StandbyWatch,
) -> Result<StandbyEnd, StandbyError> {
    let need = disk
        .as_ref()
        .map(|d| resync::runs(&d.resync.needed(), u64::MAX))
        .unwrap_or_default();
    let (config, data, control) = listener.accept(|c| local.check(c), &need)?;
    info!(
        mem = config.vm.mem_size,
        vcpus = config.vm.vcpus,
        "primary connected; standing by"
    );
    let memory = memory::create_guest_memory(config.vm.mem_size)?;
    // Built now, so that a takeover only loads the checkpoint into it. That takes a while for
    // a large guest (KVM sizes its tables for all of memory): heartbeats meanwhile, so that
    // the primary does not take a standby that is getting ready for a dead one.
    let beats = Sender::new(&control).map_err(LinkError::Io)?;
    let shell = std::thread::scope(|s| {
        let building = s.spawn(|| Vmm::prepare(&config.vm, memory.clone(), &local.kvm_path));
        let mut last_beat = Instant::now();
        while !building.is_finished() {
            if last_beat.elapsed() >= config.heartbeat_interval() {
                last_beat = Instant::now();
                // A failed heartbeat shows up as a closed connection once standing by.
                let _ = beats.send(&Message::Heartbeat { received: 0 });
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        building
            .join()
            .map_err(|_| StandbyError::Thread(std::io::Error::other("VM builder panicked")))
    })??;
    let begin = Begin {
        config,
        link: Link {
            data: FrameReader::new(data),
            control: FrameReader::new(control),
        },
        memory,
        shell,
        committed: None,
    };
    stand_by(begin, disk, watch)
}

/// Stands by for the primary at the other end of `begin.link` until it exits, says goodbye,
/// dies, or hands the guest over.
pub fn stand_by(
    begin: Begin,
    disk: Option<StandbyDisk>,
    watch: &StandbyWatch,
) -> Result<StandbyEnd, StandbyError> {
    let Begin {
        config,
        link,
        memory,
        shell,
        committed,
    } = begin;
    let Link {
        data,
        control: mut reader,
    } = link;
    let control = Sender::new(reader.get_ref()).map_err(LinkError::Io)?;
    let data_sender = Sender::new(data.get_ref()).map_err(LinkError::Io)?;
    let data_handle = data.get_ref().try_clone().map_err(LinkError::Io)?;
    let draining = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    // The input count of the last committed checkpoint, which the receiver moves on.
    let committed_input = Arc::new(AtomicU64::new(
        committed.as_ref().map_or(0, |(_, state)| state.input),
    ));
    let mut input = ReceivedInput::default();
    {
        let mut w = watch.lock();
        w.precopy_total = config.vm.mem_size;
        if let Some((epoch, _)) = &committed {
            // A swap left this node the memory of its checkpoint: nothing to pre-copy.
            w.precopy_done = w.precopy_total;
            w.committed = *epoch;
            w.committed_at = Some(Instant::now());
        }
    }
    let receiver = {
        let (control, draining, received) = (control.clone(), draining.clone(), received.clone());
        let (watch, committed_input) = (watch.clone(), committed_input.clone());
        let receiver = Receiver {
            control,
            draining,
            received,
            committed_input,
            watch,
        };
        std::thread::Builder::new()
            .name("ckpt-recv".into())
            .spawn(move || receiver.run(data, memory, disk, committed))
            .map_err(StandbyError::Thread)?
    };

    let mut silence = SilenceClock::new(config.failover_timeout());
    let beat = config.heartbeat_interval();
    let mut last_beat = Instant::now();
    let mut last_heard = Instant::now();
    let mut handover = None;
    let reason = loop {
        match reader.read_message() {
            Ok(Message::Heartbeat { .. }) => {}
            Ok(Message::Goodbye) => {
                info!("the primary said goodbye: it continues without this standby");
                data_sender.shutdown();
                return Ok(StandbyEnd::Goodbye);
            }
            Ok(Message::Exit { code }) => {
                info!(code, "the guest exited on the primary");
                data_sender.shutdown();
                return Ok(StandbyEnd::Exit(code));
            }
            Ok(Message::SwapBegins { addresses }) => {
                info!(?addresses, "the primary begins a swap");
                watch.swap_begins(&addresses);
            }
            Ok(Message::Input { first, frames }) => {
                let committed = committed_input.load(Ordering::SeqCst);
                if let Some(through) = input.append(first, frames, committed) {
                    // A failed send shows up as a closed connection on the next read.
                    let _ = control.send(&Message::InputAck { through });
                }
            }
            Ok(Message::Handover { epoch }) => {
                handover = Some(epoch);
                break format!("the primary handed the guest over at checkpoint {epoch}");
            }
            Ok(other) => warn!("ignoring unexpected control message {other:?}"),
            Err(WireError::Idle) => {
                if silence.expired() {
                    break format!(
                        "the primary was silent for {} ms",
                        silence.silent_for().as_millis()
                    );
                }
                if last_beat.elapsed() >= beat {
                    last_beat = Instant::now();
                    // A failed heartbeat shows up as a closed connection on the next read.
                    let received = received.load(Ordering::Relaxed);
                    let _ = control.send(&Message::Heartbeat { received });
                }
                continue;
            }
            Err(WireError::Closed) => break "the primary closed the link without a goodbye".into(),
            Err(e) => break format!("control connection lost: {e}"),
        }
        silence.heard();
        last_heard = Instant::now();
    };
    let decided = Instant::now();
    // Drain: commit every complete epoch that arrived before deciding. For a takeover,
    // shutting the data connection's read side wakes the receiver at once (it still reads
    // what is buffered); a handover keeps the connection, and the primary sent nothing after
    // the checkpoint it handed over.
    draining.store(true, Ordering::SeqCst);
    if handover.is_none() {
        warn!("taking over: {reason}");
        let _ = data_handle.shutdown(Shutdown::Read);
    } else {
        info!("{reason}");
    }
    let committed = receiver
        .join()
        .map_err(|_| StandbyError::Thread(std::io::Error::other("receiver panicked")))?;
    if let Some(reason) = committed.disk_failed {
        // Memory and disk may be from different epochs: resuming would corrupt the guest.
        control.shutdown();
        return Err(StandbyError::DiskFailed(reason));
    }
    let link = match (handover, committed.data) {
        (Some(epoch), Some(data)) if epoch == committed.epoch => Some(Link {
            data,
            control: reader,
        }),
        (Some(epoch), _) => {
            control.shutdown();
            return Err(StandbyError::Handover {
                asked: epoch,
                held: committed.epoch,
            });
        }
        (None, _) => {
            let _ = control.send(&Message::TakenOver);
            control.shutdown();
            None
        }
    };
    let state = committed.state.ok_or(StandbyError::NoCheckpoint)?;
    let input = input.since(state.input);
    info!(
        epoch = committed.epoch,
        input_frames = input.len(),
        "resuming from the last committed checkpoint"
    );
    Ok(StandbyEnd::Takeover(Box::new(Takeover {
        config,
        shell,
        state,
        epoch: committed.epoch,
        reason,
        last_heard,
        decided,
        drained: Instant::now(),
        bitmap: committed.resync.map(ResyncTarget::into_bitmap),
        link,
        input,
    })))
}

/// The epoch being received, kept apart from the committed image until verified.
struct Pending {
    epoch: u64,
    /// The epoch's Pages batches as received (addresses, bytes), applied at commit.
    batches: Vec<(Vec<u64>, Vec<u8>)>,
    state: Option<Vec<u8>>,
    /// The epoch's disk writes, applied at commit.
    disk: EpochWrites,
    digest: EpochDigest,
}

impl Pending {
    fn new(epoch: u64) -> Self {
        Self {
            epoch,
            batches: Vec::new(),
            state: None,
            disk: EpochWrites::new(),
            digest: EpochDigest::new(),
        }
    }
}

/// Resync blocks written here between flushes: each flush makes them durable and tells the
/// primary, which then clears them from its bitmap.
const RESYNC_FLUSH_BYTES: u64 = 8 << 20;

/// Resync blocks the receiver may be ahead of the writer by.
const RESYNC_QUEUE: usize = 8;

/// Writes a resync's blocks into the image on a thread of its own, so that the data connection
/// is read on while a batch is made durable (the receiver alone spent about half its time in
/// writes and fdatasyncs, the link idle meanwhile).
struct ResyncWriter {
    /// Blocks to write, then `None` to make them durable and stop.
    blocks: crossbeam_channel::Sender<Option<(u64, Vec<u8>)>>,
    thread: std::thread::JoinHandle<(ResyncTarget, Result<(), String>)>,
}

impl ResyncWriter {
    fn start(mut target: ResyncTarget, control: Sender, watch: StandbyWatch) -> Self {
        let (blocks, queue) = crossbeam_channel::bounded::<Option<(u64, Vec<u8>)>>(RESYNC_QUEUE);
        let thread = std::thread::spawn(move || {
            let mut result = Ok(());
            for item in queue {
                let Some((offset, data)) = item else {
                    result = flush_resync(&mut target, &control);
                    break;
                };
                let written = target.write(offset, &data).map_err(|e| e.to_string());
                result = match written {
                    Ok(()) if target.pending_bytes() >= RESYNC_FLUSH_BYTES => {
                        flush_resync(&mut target, &control)
                    }
                    other => other,
                };
                if result.is_err() {
                    break;
                }
                watch.lock().resync_done += usize_to_u64(data.len());
            }
            (target, result)
        });
        Self { blocks, thread }
    }

    /// Queues blocks to write; false once the writer has stopped (see [`Self::finish`]).
    fn write(&self, offset: u64, data: Vec<u8>) -> bool {
        self.blocks.send(Some((offset, data))).is_ok()
    }

    /// Waits for the queued blocks to be written, and made durable if `durable`; returns the
    /// target and why writing failed, if it did.
    fn finish(self, durable: bool) -> (ResyncTarget, Result<(), String>) {
        if durable {
            let _ = self.blocks.send(None);
        }
        drop(self.blocks);
        self.thread
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

/// Makes the resync's writes durable and tells the primary which blocks it holds.
fn flush_resync(target: &mut ResyncTarget, control: &Sender) -> Result<(), String> {
    let done = target.flush().map_err(|e| e.to_string())?;
    if !done.is_empty() {
        let runs = resync::runs(&done, u64::MAX);
        let _ = control.send(&Message::Synced { runs });
    }
    Ok(())
}

/// The receiver thread's links to the rest of the standby.
struct Receiver {
    control: Sender,
    draining: Arc<AtomicBool>,
    /// Frames read on the data connection (the standby's heartbeats carry it).
    received: Arc<AtomicU64>,
    /// The input count of the last committed checkpoint (see [`crate::input`]).
    committed_input: Arc<AtomicU64>,
    watch: StandbyWatch,
}

impl Receiver {
    fn reject(&self, committed: &Committed, pending: &Pending, reason: String) {
        error!(
            "rejecting epoch {}: {reason}; staying on committed epoch {}",
            pending.epoch, committed.epoch
        );
        let _ = self.control.send(&Message::Refuse {
            reason: format!("epoch {}: {reason}", pending.epoch),
        });
    }

    /// Receives the resync and epochs on the data connection and commits each verified epoch.
    /// Stops at the end of the connection, at the first bad frame or epoch (refusing it to the
    /// primary), or, once `draining` is set, when no more bytes are waiting.
    fn run(
        self,
        mut reader: FrameReader<TcpStream>,
        memory: GuestMemory,
        disk: Option<StandbyDisk>,
        held: Option<(u64, CheckpointState)>,
    ) -> Committed {
        // On a host it shares with running guests, the standby's work must not slow them; but
        // a resync runs at the priority of the guest it protects, so as not to drag on
        // (its reads and writes yield to the guests' I/O): this thread yields after it.
        let mut yielded = false;
        let (mut replica, resync) = match disk {
            Some(d) => (Some(d.replica), Some(d.resync)),
            None => (None, None),
        };
        let (epoch, state) = match held {
            Some((epoch, state)) => (epoch, Some(state)),
            None => (0, None),
        };
        let mut committed = Committed {
            memory,
            epoch,
            state,
            disk_failed: None,
            resync,
            data: None,
        };
        let mut pending = Pending::new(epoch + 1);
        let mut writer: Option<ResyncWriter> = None;
        loop {
            let msg = match reader.read_message() {
                Ok(msg) => {
                    self.received.fetch_add(1, Ordering::Relaxed);
                    msg
                }
                Err(WireError::Idle) if self.draining.load(Ordering::SeqCst) => break,
                Err(WireError::Idle) => continue,
                Err(WireError::Closed) => break,
                Err(e) if self.draining.load(Ordering::SeqCst) => {
                    info!(
                        "dropping the incomplete epoch {} at takeover ({e}); staying on epoch {}",
                        pending.epoch, committed.epoch
                    );
                    break;
                }
                Err(e) => {
                    self.reject(&committed, &pending, e.to_string());
                    break;
                }
            };
            if !yielded && !matches!(msg, Message::ResyncPlan { .. } | Message::Resync { .. }) {
                crate::link::yield_to_guest();
                yielded = true;
            }
            let before_first = committed.state.is_none() && pending.batches.is_empty();
            match msg {
                // The resync and the pre-copy come before the first epoch: nothing is committed
                // yet, so they go straight into the image and memory.
                Message::ResyncPlan { bytes } if before_first => {
                    info!(bytes, "resync of the disk begins");
                    self.watch.lock().resync_total = bytes;
                }
                Message::Resync { offset, data } if before_first => {
                    if writer.is_none() {
                        let Some(target) = committed.resync.take() else {
                            self.reject(
                                &committed,
                                &pending,
                                "resync data and no disk here".into(),
                            );
                            break;
                        };
                        let (control, watch) = (self.control.clone(), self.watch.clone());
                        writer = Some(ResyncWriter::start(target, control, watch));
                    }
                    if !writer.as_ref().is_some_and(|w| w.write(offset, data)) {
                        // It stopped on an error: finishing says which.
                        if let Some(w) = writer.take() {
                            let (target, result) = w.finish(false);
                            committed.resync = Some(target);
                            let e = result.err().unwrap_or_else(|| "the writer stopped".into());
                            self.disk_failed(&mut committed, &pending, e);
                        }
                        break;
                    }
                }
                Message::ResyncEnd if before_first => {
                    if let Some(w) = writer.take() {
                        let (target, result) = w.finish(true);
                        committed.resync = Some(target);
                        if let Err(e) = result {
                            self.disk_failed(&mut committed, &pending, e);
                            break;
                        }
                    }
                    info!("resync of the disk complete");
                }
                Message::Pages {
                    epoch: 0,
                    gpas,
                    data,
                } if before_first => {
                    if let Err(e) = StagedPages::apply(&committed.memory, &gpas, &data) {
                        self.reject(&committed, &pending, e.to_string());
                        break;
                    }
                    self.watch.lock().precopy_done += usize_to_u64(data.len());
                }
                Message::Pages { epoch, gpas, data } if epoch == pending.epoch => {
                    pending.digest.add_pages(&gpas, &data);
                    pending.batches.push((gpas, data));
                }
                // Deltas are resolved as they come, against the committed memory: the base the
                // primary encoded each against is the page as this node last received it,
                // committed already (epochs commit in order, here, before the next epoch's
                // frames are read; each page comes once per epoch). The digest then covers the
                // pages themselves, as the primary's does.
                Message::PageDeltas {
                    epoch,
                    gpas,
                    forms,
                    mut data,
                } if epoch == pending.epoch => {
                    if let Err(e) = delta::resolve(&committed.memory, &gpas, &forms, &mut data) {
                        self.reject(&committed, &pending, e.to_string());
                        break;
                    }
                    pending.digest.add_pages(&gpas, &data);
                    pending.batches.push((gpas, data));
                }
                Message::State { epoch, bytes } if epoch == pending.epoch => {
                    pending.digest.add_state(&bytes);
                    pending.state = Some(bytes);
                }
                Message::Disk { epoch, bytes } if epoch == pending.epoch => {
                    pending.digest.add_state(&bytes);
                    match staging::decode_disk(&bytes) {
                        Ok(mut ops) => pending.disk.append(&mut ops),
                        Err(e) => {
                            self.reject(&committed, &pending, format!("bad disk writes: {e}"));
                            break;
                        }
                    }
                }
                Message::EpochEnd {
                    epoch,
                    pages,
                    state_bytes,
                    checksum,
                } if epoch == pending.epoch => {
                    if let Err(e) = pending.digest.verify(epoch, pages, state_bytes, checksum) {
                        self.reject(&committed, &pending, e.to_string());
                        break;
                    }
                    let Some(state) = pending.state.take() else {
                        self.reject(&committed, &pending, "the epoch carries no VM state".into());
                        break;
                    };
                    // Decoded now, before anything of the epoch is applied or acknowledged: a
                    // state this node could not resume from is refused like a corrupt frame.
                    let state = match CheckpointState::decode(&state) {
                        Ok(state) => state,
                        Err(e) => {
                            self.reject(&committed, &pending, e.to_string());
                            break;
                        }
                    };
                    if !self.commit(&mut committed, &mut replica, &pending, pages) {
                        break;
                    }
                    committed.epoch = epoch;
                    self.committed_input.store(state.input, Ordering::SeqCst);
                    committed.state = Some(state);
                    {
                        let mut w = self.watch.lock();
                        w.committed = epoch;
                        w.committed_at = Some(Instant::now());
                    }
                    let _ = self.control.send(&Message::Ack { epoch });
                    pending = Pending::new(epoch + 1);
                }
                other => {
                    let what = match &other {
                        Message::Pages { epoch, .. }
                        | Message::PageDeltas { epoch, .. }
                        | Message::State { epoch, .. }
                        | Message::Disk { epoch, .. }
                        | Message::EpochEnd { epoch, .. } => format!("a frame of epoch {epoch}"),
                        m => format!("{m:?}"),
                    };
                    self.reject(&committed, &pending, format!("out of order: got {what}"));
                    break;
                }
            }
        }
        // Interrupted during the resync: what was written and not made durable stays needed.
        if let Some(w) = writer.take() {
            committed.resync = Some(w.finish(false).0);
        }
        committed.data = Some(reader);
        committed
    }

    /// Refuses the pending epoch because this node's disk failed with `e`, and records why.
    fn disk_failed(&self, committed: &mut Committed, pending: &Pending, e: String) {
        let reason = format!("standby disk: {e}");
        self.reject(committed, pending, reason.clone());
        committed.disk_failed = Some(reason);
    }

    /// Applies verified epoch `pending`: its disk writes first, durably, then its pages.
    /// Returns false, having refused the epoch, if either fails.
    fn commit(
        &self,
        committed: &mut Committed,
        replica: &mut Option<Replica>,
        pending: &Pending,
        pages: u64,
    ) -> bool {
        let _span = info_span!("commit", epoch = pending.epoch).entered();
        let start = Instant::now();
        if !pending.disk.is_empty() {
            // The disk first, durably: an acknowledged epoch's writes survive this node.
            let applied = match replica.as_mut() {
                Some(replica) => replica.apply(&pending.disk).map_err(|e| e.to_string()),
                None => Err("the epoch has disk writes and this node has no disk".into()),
            };
            if let Err(e) = applied {
                let reason = format!("standby disk: {e}");
                self.reject(committed, pending, reason.clone());
                committed.disk_failed = Some(reason);
                return false;
            }
        }
        if let Err(e) = StagedPages::apply_batches(&committed.memory, &pending.batches) {
            self.reject(committed, pending, e.to_string());
            if !pending.disk.is_empty() {
                committed.disk_failed = Some(format!(
                    "epoch {}'s disk writes are applied, its pages are not: {e}",
                    pending.epoch
                ));
            }
            return false;
        }
        debug!(
            pages,
            disk_ops = pending.disk.len(),
            apply_us = saturating_u64(start.elapsed().as_micros()),
            "committed"
        );
        true
    }
}

/// How long the standby waited from the last word of the primary to deciding it was dead.
pub fn detection_time(t: &Takeover) -> Duration {
    t.decided - t.last_heard
}
