//! What a primary holds back per epoch: the guest's console bytes and network frames, released
//! when the epoch's checkpoint is acknowledged, and what travels in the checkpoint so that a
//! standby that takes over can release it itself; and the epoch's disk writes, which the
//! standby applies when the epoch commits.

use std::sync::Arc;
use std::time::Instant;

use disk_sync::{EpochRecorder, EpochWrites};

use crate::input::InputLog;
use netbuf::acks::EarlyAcks;
use netbuf::{ConsoleChunk, Frame, FrameGateSink, Gate, GuestAddresses, Held, Ipv4, Mode};
use serde::{Deserialize, Serialize};
use vmm::Vmm;

/// The network side of a primary's output: the frame gate and the addresses the guest used.
#[derive(Clone)]
pub struct NetOutput {
    pub gate: Gate<Frame>,
    pub addresses: GuestAddresses,
}

/// The gates of a protected guest's outputs; clones share them.
#[derive(Clone)]
pub struct Outputs {
    pub console: Gate<ConsoleChunk>,
    pub net: Option<NetOutput>,
    /// The record of the guest's disk writes, if it has a disk.
    pub disk: Option<EpochRecorder>,
    /// The count and log of the frames the guest receives, if it has a NIC.
    pub input: Option<InputLog>,
}

/// The output an epoch's checkpoint carries: everything not yet released when it was taken.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldOutput {
    pub console: Held<ConsoleChunk>,
    pub frames: Held<Frame>,
    /// The guest's IPv4 addresses, for a takeover's announcements.
    pub addresses: Vec<Ipv4>,
}

impl Outputs {
    /// Ends the running epoch as `epoch` (see [`Gate::seal`]): what its checkpoint holds, and
    /// its disk writes.
    pub fn seal(&self, epoch: u64) -> (HeldOutput, EpochWrites) {
        let disk = self
            .disk
            .as_ref()
            .map(|d| d.seal(epoch))
            .unwrap_or_default();
        let held = HeldOutput {
            console: self.console.seal(epoch),
            frames: self
                .net
                .as_ref()
                .map(|n| n.gate.seal(epoch))
                .unwrap_or_default(),
            addresses: self.addresses(),
        };
        (held, disk)
    }

    /// The IPv4 addresses the guest sent from (none without a NIC).
    pub fn addresses(&self) -> Vec<Ipv4> {
        self.net
            .as_ref()
            .map(|n| n.addresses.list())
            .unwrap_or_default()
    }

    /// Console bytes and disk-write bytes of the running epoch (frames are bounded apart: a
    /// NIC whose frames are at their bound stalls its queue).
    pub fn running_bytes(&self) -> usize {
        self.console.running_bytes() + self.disk.as_ref().map_or(0, EpochRecorder::running_bytes)
    }

    /// Frames the guest has received so far (0 without a NIC).
    pub fn input_delivered(&self) -> u64 {
        self.input.as_ref().map_or(0, InputLog::delivered)
    }

    /// The standby holds every frame the guest received before the `through`-th: the
    /// guest's pure acknowledgements of them leave now (see [`netbuf::acks`]); whether any
    /// did.
    pub fn input_held(&self, through: u64) -> bool {
        let Some(net) = &self.net else {
            return false;
        };
        let picker = EarlyAcks::new(through);
        net.gate.release_early(move |frame| picker.pick(frame))
    }

    /// When the running epoch's first console bytes or frames came, if any wait for it to end.
    pub fn waiting_since(&self) -> Option<Instant> {
        let frames = self.net.as_ref().and_then(|n| n.gate.waiting_since());
        match (self.console.waiting_since(), frames) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Calls `hook` when the running epoch gets its first console bytes or frames; None
    /// removes it.
    pub fn set_on_output(&self, hook: Option<Arc<dyn Fn() + Send + Sync>>) {
        if let Some(net) = &self.net {
            net.gate.set_on_first(hook.clone());
        }
        self.console.set_on_first(hook);
    }

    /// Checkpoint `epoch` is acknowledged: its output and all before it leave; whether any
    /// console bytes or frames did.
    pub fn release_through(&self, epoch: u64) -> bool {
        let console = self.console.release_through(epoch);
        let frames = self
            .net
            .as_ref()
            .is_some_and(|net| net.gate.release_through(epoch));
        if let Some(disk) = &self.disk {
            if let Err(e) = disk.acked(epoch) {
                // The bits stay set: a later resync copies a little more, nothing is lost.
                tracing::warn!("cannot update the disk's write-intent bitmap: {e}");
            }
        }
        console || frames
    }

    /// Unprotected from now on: everything held leaves, later output passes through.
    pub fn open(&self) {
        self.console.open();
        if let Some(net) = &self.net {
            net.gate.open();
        }
        if let Some(disk) = &self.disk {
            disk.stop();
        }
    }

    /// While `on`, acknowledged frames stay held (see [`Gate::hold_back`]): a swap hands them
    /// to the node taking over, which sends them from the guest's new place on the network.
    /// Console bytes are released here as ever: they go to this node's stream.
    pub fn hold_back_frames(&self, on: bool) {
        if let Some(net) = &self.net {
            net.gate.hold_back(on);
        }
    }

    /// Protected again: output from now on waits for its epoch's acknowledgement.
    pub fn hold(&self) {
        self.console.hold();
        if let Some(net) = &self.net {
            net.gate.hold();
        }
    }

    /// Deposed: nothing more leaves.
    pub fn close(&self) {
        self.console.close();
        if let Some(net) = &self.net {
            net.gate.close();
        }
        if let Some(disk) = &self.disk {
            disk.stop();
        }
    }
}

impl Outputs {
    /// Holds `vmm`'s output from now on: its console behind `console` (the gate the VM was
    /// built with), its NIC's frames, if it has one, behind a new gate in `mode` that holds at
    /// most `frame_limit` bytes before the NIC's queue stalls, and its disk writes in `disk`
    /// (the recorder of the backend the VM was built with). The frames it receives are
    /// counted from `input_from` on (the count of the checkpoint it resumes from, 0 for a new
    /// guest).
    pub fn attach(
        console: Gate<ConsoleChunk>,
        mode: Mode,
        vmm: &Vmm,
        frame_limit: usize,
        disk: Option<EpochRecorder>,
        input_from: u64,
    ) -> Self {
        let addresses = GuestAddresses::default();
        let log = InputLog::new(input_from);
        let input = vmm
            .wrap_net_source(|source| log.wrap(source))
            .then_some(log);
        let received = input.as_ref().map(InputLog::received).unwrap_or_default();
        let mut net = None;
        vmm.wrap_net_sink(|tap| {
            let gate = Gate::new(Box::new(tap), 0, mode);
            net = Some(NetOutput {
                gate: gate.clone(),
                addresses: addresses.clone(),
            });
            Box::new(FrameGateSink {
                gate,
                addresses,
                received,
                limit: frame_limit,
            })
        });
        if let (Some(net), Some(control)) = (&net, vmm.net_control()) {
            // Frames leaving make room: the NIC's stalled queue goes on.
            let waker = control.waker();
            net.gate.set_on_release(Box::new(move || waker.wake()));
        }
        Self {
            console,
            net,
            disk,
            input,
        }
    }
}
