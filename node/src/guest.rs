//! A protected VM as one node runs it: its host resources (console, disk image, tap), booted
//! as a primary (output behind gates, disk writes recorded and marked), prepared as a standby
//! (its image brought up to date, then epochs applied to it), and resumed from the last
//! committed checkpoint at a takeover, ready to be protected again.

use std::path::{Path, PathBuf};
use std::time::Duration;

use checkpoint::input::ReplaySource;
use checkpoint::outputs::Outputs;
use checkpoint::primary::PrimaryGuest;
use checkpoint::standby::{Local, StandbyDisk, Takeover};
use disk_sync::resync::{ResyncSource, ResyncTarget};
use disk_sync::{bitmap_path, EpochRecorder, RecordingBackend, Replica, WriteIntentBitmap};
use netbuf::{ConsoleChunk, ConsoleGateSink, Gate, Ipv4, Mode, FRAME_HOLD_LIMIT};
use tracing::{info, warn};
use vmm::builder::HostIo;
use vmm::devices::console::{FileConsole, StdoutConsole};
use vmm::devices::virtio::blk::RawFileBackend;
use vmm::devices::virtio::tap::{Tap, WeakTap};
use vmm::devices::{BlockBackend, ConsoleSink, FrameSink};
use vmm::linux::LinuxBoot;
use vmm::{VmConfig, VmOutcome, Vmm};

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("cannot create console file {path}: {source}")]
    Console {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path}: {source}")]
    Disk {
        path: PathBuf,
        source: vmm::devices::virtio::blk::BlockError,
    },
    #[error(transparent)]
    DiskSync(#[from] disk_sync::DiskSyncError),
    #[error("tap {tap}: {source}")]
    Tap {
        tap: String,
        source: vmm::devices::virtio::tap::TapError,
    },
    #[error(transparent)]
    Build(#[from] vmm::builder::BuildError),
    #[error("cannot announce the guest: {0}")]
    Announce(String),
}

/// Where a guest's console goes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConsoleSpec {
    Stdio,
    /// Written at the guest's stream offsets, so that two nodes' files line up.
    File(PathBuf),
}

/// A virtio-net device on a tap.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetSpec {
    pub tap: String,
    pub mac: [u8; 6],
    pub bridge: Option<String>,
}

/// The host resources a VM uses on this node.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HostSpec {
    pub kvm: PathBuf,
    pub console: ConsoleSpec,
    pub disk: Option<PathBuf>,
    pub net: Option<NetSpec>,
}

/// What to boot.
pub enum GuestImage {
    /// A payload ELF's bytes.
    Payload(Vec<u8>),
    Linux(LinuxBoot),
}

/// The console `spec` names; a file console's stream starts at `offset`.
pub fn console_sink(spec: &ConsoleSpec, offset: u64) -> Result<Box<dyn ConsoleSink>, GuestError> {
    Ok(match spec {
        ConsoleSpec::Stdio => Box::new(StdoutConsole),
        ConsoleSpec::File(path) => Box::new(FileConsole::create(path, offset).map_err(
            |source| GuestError::Console {
                path: path.clone(),
                source,
            },
        )?),
    })
}

/// Opens the raw image at `path` as the guest's disk.
pub fn open_disk(path: Option<&Path>) -> Result<Option<Box<dyn BlockBackend>>, GuestError> {
    Ok(match path {
        Some(path) => Some(Box::new(RawFileBackend::open(path).map_err(|source| {
            GuestError::Disk {
                path: path.to_owned(),
                source,
            }
        })?)),
        None => None,
    })
}

/// Creates the tap `spec` names and puts it on its bridge.
pub fn open_net(spec: Option<&NetSpec>) -> Result<Option<(Tap, [u8; 6])>, GuestError> {
    let Some(spec) = spec else {
        return Ok(None);
    };
    let tap_err = |source| GuestError::Tap {
        tap: spec.tap.clone(),
        source,
    };
    let tap = Tap::open(&spec.tap).map_err(tap_err)?;
    if let Some(bridge) = &spec.bridge {
        tap.enslave(bridge).map_err(tap_err)?;
    }
    Ok(Some((tap, spec.mac)))
}

/// Builds the VM `config` describes and boots `image` into it.
pub fn boot(config: &VmConfig, image: &GuestImage, io: HostIo) -> Result<Vmm, GuestError> {
    Ok(match image {
        GuestImage::Payload(elf) => Vmm::boot_payload(config, elf, io)?,
        GuestImage::Linux(boot) => Vmm::boot_linux(config, boot, io)?,
    })
}

/// The record of the guest's writes to the image at `path` (opened as `inner`), marked in the
/// image's write-intent bitmap; `stopped` when the guest runs alone (writes are only marked).
fn record_disk(
    inner: Box<dyn BlockBackend>,
    path: &Path,
    stopped: bool,
) -> Result<(Box<dyn BlockBackend>, EpochRecorder), GuestError> {
    let bitmap = WriteIntentBitmap::open(&bitmap_path(path), inner.size())?;
    let (backend, recorder) = RecordingBackend::new(inner, Some(bitmap));
    if stopped {
        recorder.stop();
    }
    Ok((Box::new(backend), recorder))
}

/// Boots `image` as a primary on `host`. With `held`, output waits from its first byte for a
/// standby's acknowledgements (the guest starts protected); without, it flows until the guest
/// is protected, and disk writes are only marked meanwhile. The VM is built, not started.
pub fn boot_primary(
    config: &VmConfig,
    image: &GuestImage,
    host: &HostSpec,
    held: bool,
) -> Result<PrimaryGuest, GuestError> {
    let mode = if held { Mode::Held } else { Mode::Open };
    let console = Gate::new(Box::new(console_sink(&host.console, 0)?), 0, mode);
    let (disk, recorder, source) = match (&host.disk, open_disk(host.disk.as_deref())?) {
        (Some(path), Some(inner)) => {
            let (backend, recorder) = record_disk(inner, path, !held)?;
            (
                Some(backend),
                Some(recorder),
                Some(ResyncSource::open(path)?),
            )
        }
        _ => (None, None, None),
    };
    let io = HostIo {
        kvm_path: host.kvm.clone(),
        console: Box::new(ConsoleGateSink(console.clone())),
        disk,
        net: open_net(host.net.as_ref())?,
    };
    let vmm = boot(config, image, io)?;
    let outputs = Outputs::attach(console, mode, &vmm, FRAME_HOLD_LIMIT, recorder, 0);
    Ok(PrimaryGuest {
        vmm,
        outputs,
        image: source,
    })
}

/// A standby's resources on this node: what it checks the primary's VM against, its copy of
/// the guest's disk, and its NIC, silent until a takeover.
pub struct StandbyHost {
    pub local: Local,
    pub disk: Option<StandbyDisk>,
    net: Option<(Tap, [u8; 6])>,
    host: HostSpec,
}

/// What a takeover resumed.
pub enum Resumed {
    /// The guest runs here, alone: output flows, disk writes are marked.
    Running(PrimaryGuest),
    /// A swap: the guest is built (not started) with its output held and its writes
    /// recorded, to be protected over `link` by the old primary at once.
    Swapped {
        guest: PrimaryGuest,
        link: checkpoint::link::PrimaryLink,
    },
    /// The checkpoint was the final one of a guest that had ended this way.
    Ended(VmOutcome),
}

impl StandbyHost {
    /// Opens the resources of `host` for a standby: a bad disk or tap fails here, before any
    /// primary relies on this node. The image first needs the blocks its bitmap marks and
    /// those in `also` (every block, for an image with no history in common with the peer's).
    /// `sync_delay` slows each fdatasync (a test setting).
    pub fn open(
        host: &HostSpec,
        also: &std::collections::BTreeSet<u64>,
        sync_delay: Duration,
    ) -> Result<Self, GuestError> {
        let net = open_net(host.net.as_ref())?;
        let disk = match &host.disk {
            Some(path) => {
                let replica = Replica::open(path)?.with_sync_delay(sync_delay);
                let bitmap = WriteIntentBitmap::open(&bitmap_path(path), replica.size())?;
                let resync = ResyncTarget::open(path, bitmap, also)?;
                Some(StandbyDisk { replica, resync })
            }
            None => None,
        };
        let local = Local {
            disk_size: disk.as_ref().map(|d| d.replica.size()),
            net_mac: net.as_ref().map(|(_, mac)| *mac),
            kvm_path: host.kvm.clone(),
        };
        Ok(Self {
            local,
            disk,
            net,
            host: host.clone(),
        })
    }

    /// The standby's disk, for [`checkpoint::standby::serve`].
    pub fn take_disk(&mut self) -> Option<StandbyDisk> {
        self.disk.take()
    }

    /// Resumes the guest from takeover `t`: first releases the output its checkpoint holds
    /// (the primary may or may not have released it: a repeat lands at the same stream
    /// offset with the same bytes), sends its held frames and announces the guest's new place
    /// on the network, then builds the VM on the checkpoint and starts it. From then on the
    /// guest runs alone: its output flows through open gates and its writes are marked, so
    /// that it can be protected again.
    pub fn resume(self, mut t: Takeover) -> Result<Resumed, GuestError> {
        let detection = checkpoint::standby::detection_time(&t);
        let swap = t.link.take();
        let held = &t.state.output;
        // In a swap the old primary released its console bytes up to the checkpoint already.
        let (position, repeat) = match swap {
            Some(_) => (held.console.end(), false),
            None => (held.console.first, true),
        };
        let mut console = console_sink(&self.host.console, position)?;
        let mut net = self.net;
        if repeat {
            for chunk in &held.console.items {
                console.write_console(&chunk.0);
            }
        }
        if let Some((tap, mac)) = &mut net {
            // A swap's old primary kept back the frames it had not released when the swap
            // began: they leave from here, the guest's new place.
            for frame in &held.frames.items {
                tap.send_frame(&frame.bytes);
            }
            announce(tap.downgrade(), *mac, &held.addresses)?;
        }
        if let Some(outcome) = t.state.ended {
            info!(
                epoch = t.epoch,
                ?outcome,
                "took over a guest that had ended"
            );
            return Ok(Resumed::Ended(outcome));
        }
        // A swap's guest is protected from its first instruction here; a takeover's runs alone.
        let mode = if swap.is_some() {
            Mode::Held
        } else {
            Mode::Open
        };
        let console = Gate::<ConsoleChunk>::new(Box::new(console), held.console.end(), mode);
        let (disk, recorder, source) = match (&self.host.disk, t.bitmap) {
            (Some(path), Some(bitmap)) => {
                let inner: Box<dyn BlockBackend> = Box::new(RawFileBackend::open(path).map_err(
                    |source| GuestError::Disk {
                        path: path.clone(),
                        source,
                    },
                )?);
                let (backend, recorder) = RecordingBackend::new(inner, Some(bitmap));
                if swap.is_none() {
                    // Alone: every write is a block a returning peer must get.
                    recorder.stop();
                }
                let backend: Box<dyn BlockBackend> = Box::new(backend);
                (
                    Some(backend),
                    Some(recorder),
                    Some(ResyncSource::open(path)?),
                )
            }
            _ => (None, None, None),
        };
        let io = HostIo {
            kvm_path: self.host.kvm.clone(),
            console: Box::new(ConsoleGateSink(console.clone())),
            disk,
            net,
        };
        let mut vmm = t.shell.restore(&t.state.vmm, io)?;
        // The frames the guest received after its checkpoint reach it again, before any
        // that came here, and its count of received frames goes on from the checkpoint's.
        let replay = std::mem::take(&mut t.input);
        if !replay.is_empty() {
            info!(frames = replay.len(), "delivering the guest's input again");
        }
        vmm.wrap_net_source(|tap| Box::new(ReplaySource::new(replay, tap)));
        let outputs = Outputs::attach(
            console,
            mode,
            &vmm,
            FRAME_HOLD_LIMIT,
            recorder,
            t.state.input,
        );
        let guest = |vmm| PrimaryGuest {
            vmm,
            outputs,
            image: source,
        };
        if let Some(link) = swap {
            // Started by the protection, with dirty logging on from its first instruction.
            info!(epoch = t.epoch, "swapped in: the guest runs on this node");
            return Ok(Resumed::Swapped {
                guest: guest(vmm),
                link: link.into_primary(t.epoch),
            });
        }
        vmm.start()?;
        info!(
            epoch = t.epoch,
            detection_ms = detection.as_secs_f64() * 1e3,
            drain_ms = (t.drained - t.decided).as_secs_f64() * 1e3,
            restore_ms = t.drained.elapsed().as_secs_f64() * 1e3,
            "took over: the guest runs on this node"
        );
        Ok(Resumed::Running(guest(vmm)))
    }

    /// What this standby does when the primary begins a swap: announce the guest's place on
    /// the network here at once, so that frames sent to it during the swap wait in this
    /// node's tap for the resumed guest. None without a NIC.
    pub fn swap_announcer(&self) -> Option<checkpoint::standby::SwapHook> {
        let (tap, mac) = self.net.as_ref()?;
        let (out, mac) = (tap.downgrade(), *mac);
        Some(Box::new(move |addresses: &[Ipv4]| {
            if let Err(e) = announce(out.clone(), mac, addresses) {
                warn!("{e}");
            }
        }))
    }

    /// Whether this node's guest has a NIC (takeovers then send frames and announce).
    pub fn has_net(&self) -> bool {
        self.net.is_some()
    }
}

/// The pause before each round of announcements after a takeover (as QEMU's self-announce: a
/// switch that missed one round learns from the next).
const ANNOUNCE_GAPS_MS: [u64; 3] = [0, 50, 150];

/// Tells the network that the guest with `mac` (and `addresses`) is now behind `tap`, from a
/// thread while the guest runs. The thread holds the tap weakly: a guest that leaves this node
/// within the announcements (a second swap) must free its tap for the standby built next.
fn announce(tap: WeakTap, mac: [u8; 6], addresses: &[Ipv4]) -> Result<(), GuestError> {
    let frames = netbuf::announcements(mac, addresses);
    info!(?addresses, "announcing the guest's new location");
    std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            for gap in ANNOUNCE_GAPS_MS {
                std::thread::sleep(Duration::from_millis(gap));
                for frame in &frames {
                    if !tap.send_frame(frame) {
                        return;
                    }
                }
            }
        })
        .map_err(|e| GuestError::Announce(e.to_string()))?;
    Ok(())
}
