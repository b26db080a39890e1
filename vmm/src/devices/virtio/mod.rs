//! Virtio devices behind the virtio-mmio (modern, version 2) transport.
//!
//! - [`mmio::MmioTransport`] implements the register window and hands configured queues to a
//!   [`VirtioDevice`] when the driver sets DRIVER_OK.
//! - [`blk::Block`] is virtio-blk over a [`super::BlockBackend`]; [`blk::RawFileBackend`] is the
//!   raw image file backend.
//! - [`net::Net`] is virtio-net with an RX worker thread; [`tap::Tap`] is its host backend.
//!
//! Every guest memory access goes through [`GuestMemory`] (vm-memory / virtio-queue), so device
//! DMA lands in the AtomicBitmap dirty set that the checkpointer harvests.

pub mod blk;
pub mod mmio;
pub mod net;
pub mod tap;

#[cfg(test)]
pub(crate) mod testutil;

use std::fmt::Debug;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

pub use super::GuestMemory;

/// Feature bit every modern device offers (virtio 1.x, no legacy layout).
pub const VIRTIO_F_VERSION_1: u32 = virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// InterruptStatus bit: the device added buffers to a used ring.
pub const VIRTIO_INT_VRING: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration changed.
pub const VIRTIO_INT_CONFIG: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// Errors a device reports to its transport.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("device expects {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("cannot start the device worker thread: {0}")]
    Worker(#[source] std::io::Error),
    #[error("saved device state does not match this device: {0}")]
    StateMismatch(String),
}

/// The interrupt line shared by a transport and its device (and the device's worker threads).
///
/// `status` is the InterruptStatus register; `irq`, when set, is signalled each time a bit is
/// raised (Linux guests wire it to an irqfd). Payload guests poll the used rings and never rely
/// on interrupts, so the eventfd is optional.
#[derive(Debug, Default)]
pub struct Interrupt {
    status: AtomicU32,
    irq: Mutex<Option<EventFd>>,
}

impl Interrupt {
    pub fn new(irq: Option<EventFd>) -> Self {
        Interrupt {
            status: AtomicU32::new(0),
            irq: Mutex::new(irq),
        }
    }

    /// Replaces the eventfd signalled on interrupts (e.g. after registering an irqfd).
    pub fn set_irq(&self, irq: Option<EventFd>) {
        *self.irq.lock().unwrap_or_else(PoisonError::into_inner) = irq;
    }

    /// Current InterruptStatus.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// Sets InterruptStatus outright (state restore).
    pub fn set_status(&self, status: u32) {
        self.status.store(status, Ordering::Release);
    }

    /// Clears the bits the driver acknowledged.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Used buffers were added: raise the vring bit and signal the irq.
    pub fn signal_used_queue(&self) {
        self.raise(VIRTIO_INT_VRING);
    }

    /// The configuration space changed.
    pub fn signal_config_change(&self) {
        self.raise(VIRTIO_INT_CONFIG);
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::AcqRel);
        if let Some(irq) = self
            .irq
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
        {
            if let Err(e) = irq.write(1) {
                tracing::warn!("cannot signal virtio irq eventfd: {e}");
            }
        }
    }
}

/// A virtio device model, driven by a transport (here [`mmio::MmioTransport`]).
///
/// Life cycle: constructed, then `activate` when the driver sets DRIVER_OK (the device owns the
/// queues from then on), `queue_notify` on each kick, `reset` when the driver writes status 0.
/// State: `save_state` / `restore_state` cover the device's own configuration; the transport
/// saves the queues it got back from `queue_states` and re-activates the device with them.
pub trait VirtioDevice: Send {
    /// Device-specific saved state (config space values, flags).
    type State: Serialize + DeserializeOwned + Clone + Debug + PartialEq;

    /// Virtio device ID (1 = net, 2 = block).
    fn device_type(&self) -> u32;
    /// Feature bits the device offers (the transport adds VIRTIO_F_VERSION_1).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space (ignored by devices with a read-only one).
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device with the driver's queues; `acked_features` are the negotiated ones.
    fn activate(
        &mut self,
        mem: GuestMemory,
        queues: Vec<Queue>,
        interrupt: Arc<Interrupt>,
        acked_features: u64,
    ) -> Result<(), DeviceError>;
    /// The driver kicked queue `index` (only called while activated).
    fn queue_notify(&mut self, index: u16);
    /// Stops the device and drops its queues; the device can be activated again.
    fn reset(&mut self);
    /// States of the queues the device owns (empty when not activated).
    fn queue_states(&self) -> Vec<QueueState>;
    fn save_state(&self) -> Self::State;
    /// Restores device configuration; called on a fresh device before it is re-activated.
    fn restore_state(&mut self, state: &Self::State) -> Result<(), DeviceError>;
    /// Stops all guest memory writes from background workers until `resume` (see net.rs).
    fn pause(&mut self) {}
    fn resume(&mut self) {}
}

/// Serializable mirror of virtio-queue's [`QueueState`] (which has no serde support).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx_enabled: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(s: QueueState) -> Self {
        QueueSnapshot {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(s: QueueSnapshot) -> Self {
        QueueState {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
        }
    }
}

/// Copies `src` (a config space image) at `offset` into `data`, zero-filling past its end.
pub(crate) fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= src.len() {
        return;
    }
    let n = data.len().min(src.len() - start);
    data[..n].copy_from_slice(&src[start..start + n]);
}
